//! mesh-agent: loads the datapath with its maps and links pinned on bpffs, attaches it
//! to the underlay interface and to each local task's veth, and keeps the maps equal to
//! the model: from Docker (`--from-docker`: the Swarm, followed through /events and a
//! periodic full resync) or from a file (`--config`, re-read on SIGHUP).
//!
//! The datapath outlives the agent: on exit (SIGTERM, or kill -9) programs stay attached
//! and maps stay pinned, and the next agent adopts them without flushing anything.
//! `mesh-agent --uninstall` removes it all.

#![allow(clippy::result_large_err)] // aya errors by value, on cold paths

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context;
use aya::programs::XdpMode;
use clap::{Parser, ValueEnum};
use mesh_agent::{
    docker, facts, loader,
    mesh::Mesh,
    metrics::{self, AgentMetrics},
    model,
    pins::{Hook, PinDir},
    preflight, swarm,
};
use mesh_common::config::MeshConfig;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Switch {
    On,
    Off,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Xdp {
    /// No XDP program (TC only; the right choice on veth).
    Off,
    /// Native (driver) XDP.
    Native,
    /// Generic (skb) XDP.
    Generic,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Parser, Debug)]
#[command(
    version,
    about = "The mesh's node agent",
    long_about = "The mesh's node agent. On a swarm node: `mesh-agent --from-docker` (the \
                  defaults find the underlay interface from the node's swarm address). Every \
                  flag can also be set in the environment (MESH_*) and in a settings file \
                  (YAML, keys are the long flags: `interface: eth1`); the command line \
                  wins over the environment, which wins over the file."
)]
struct Args {
    /// Settings file (YAML: `flag: value`); read when present.
    #[arg(long, default_value = mesh_agent::settings::DEFAULT_PATH, env = "MESH_SETTINGS")]
    settings: PathBuf,
    /// Follow the Swarm of the local dockerd: services, tasks, networks, nodes and task
    /// health, through /events and a full resync every --resync-ms.
    #[arg(long, env = "MESH_FROM_DOCKER", conflicts_with = "config")]
    from_docker: bool,
    /// Instead of Docker: a static model of services, backends and local endpoints
    /// (YAML; see README), re-read on SIGHUP.
    #[arg(long, env = "MESH_CONFIG")]
    config: Option<PathBuf>,
    /// Underlay interface (default: the one holding the swarm address, or the config
    /// file's `underlay`).
    #[arg(long, env = "MESH_INTERFACE")]
    interface: Option<String>,
    /// Also attach the XDP program to the underlay interface.
    #[arg(long, value_enum, default_value = "off", env = "MESH_XDP")]
    xdp: Xdp,
    /// How TC programs are attached: tcx links (Linux 6.6), netlink clsact filters, or
    /// whichever the kernel offers. Features can also be turned off for tests with
    /// MESH_FORCE_FALLBACKS=tcx,check_mtu,xdp_bytes,xdp_meta,encap_l2_eth,netns_cookie.
    #[arg(long, value_enum, default_value = "auto", env = "MESH_TC_ATTACH")]
    tc_attach: mesh_agent::features::TcAttach,
    /// Directory on bpffs where maps and program links are pinned.
    #[arg(long, default_value = "/sys/fs/bpf/mesh", env = "MESH_BPFFS")]
    bpffs: PathBuf,
    /// Directory for the agent's small state file (service names and id counters that a
    /// restarted agent needs to adopt the pinned maps).
    #[arg(long, default_value = "/run/mesh", env = "MESH_STATE_DIR")]
    state_dir: PathBuf,
    /// VXLAN data-path port (as `docker swarm init --data-path-port`).
    /// With --from-docker the swarm's own port is used (a different one given here is
    /// reported); this is for Docker that does not say (before API 1.40) and --config.
    /// Default 4789.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..), env = "MESH_DATA_PATH_PORT")]
    data_path_port: Option<u16>,
    /// eBPF object (default: next to this binary, then /usr/local/lib/mesh).
    #[arg(long, env = "MESH_BPF_OBJECT")]
    object: Option<PathBuf>,
    /// Docker socket.
    #[arg(
        long,
        default_value = "unix:///var/run/docker.sock",
        env = "MESH_DOCKER"
    )]
    docker: String,
    /// Maglev slots for all services together (4 bytes each; a service of N backends
    /// takes the smallest prime above 400 N, e.g. 2039 at 3 backends, so the default
    /// holds ~500 such services; 1<<25 holds 16,000). Fixed while pins exist.
    #[arg(long, default_value_t = mesh_common::maps::MAGLEV.entries, env = "MESH_MAGLEV_SLOTS",
          value_parser = clap::value_parser!(u32).range(4096..=(1 << 28)))]
    maglev_slots: u32,
    /// Where Docker's netns directory (`<exec-root>/netns`: task sandboxes and overlay
    /// namespaces) is mounted for this agent, when not at the path Docker reports (the
    /// agent in a container: deploy/mesh-stack.yml mounts it at /run/docker-netns).
    #[arg(long, env = "MESH_DOCKER_NETNS")]
    docker_netns: Option<PathBuf>,
    /// Full resync period with --from-docker, milliseconds (events make most changes
    /// immediate; this heals anything an event did not say, e.g. tasks on other nodes).
    #[arg(long, default_value_t = 1000, env = "MESH_RESYNC_MS")]
    resync_ms: u64,
    /// How long a task that left the Swarm's view keeps its established flows (draining)
    /// before its backend is removed, milliseconds (Docker's default stop grace period).
    #[arg(long, default_value_t = 10_000, env = "MESH_DRAIN_MS")]
    drain_ms: u64,
    /// Port on this node's swarm address where agents exchange which of their tasks fail
    /// their HEALTHCHECK (Docker's gossip only drops such a task once it has exited);
    /// 0 turns the exchange off. Open it between nodes like the swarm's own ports.
    #[arg(long, default_value_t = 9478, env = "MESH_PEER_PORT")]
    peer_port: u16,
    /// Run `meshctl trace --node` requests from the swarm's other nodes (on --peer-port).
    /// Off by default: the endpoint is unauthenticated, and a container on any node can
    /// reach it from its node's address.
    #[arg(long, env = "MESH_SERVE_TRACES")]
    serve_traces: bool,
    /// Period of the quick check for tasks the orchestrator is shutting down (a
    /// manager's /tasks, or the managers' reports), milliseconds; 0 turns it off.
    #[arg(long, default_value_t = 200, env = "MESH_QUICK_MS")]
    quick_ms: u64,
    /// How long a task that joins a service waits before it takes new flows,
    /// milliseconds (Docker lists it before its ingress redirect is in place); skipped
    /// when the service has no other backend.
    #[arg(long, default_value_t = 1000, env = "MESH_WARMUP_MS")]
    warmup_ms: u64,
    /// Published ports (and VIPs with ports) dialled from the node itself and from its
    /// containers: cgroup socket programs point such sockets at the host port (a veth
    /// pair, mesh-host0/1) where the task program balances them.
    #[arg(long, value_enum, default_value = "on", env = "MESH_HOST_PORTS")]
    host_ports: Switch,
    /// The cgroup v2 directory the socket programs attach to (default: /sys/fs/cgroup or
    /// /sys/fs/cgroup/unified, whichever is a cgroup v2 mount).
    #[arg(long, env = "MESH_CGROUP")]
    cgroup: Option<PathBuf>,
    /// Network namespaces (files) whose sockets reach published ports through the mesh,
    /// beyond this node's own and, with --from-docker, every one in Docker's netns
    /// directory (its containers). Comma-separated in the environment.
    #[arg(long = "host-netns", env = "MESH_HOST_NETNS", value_delimiter = ',')]
    host_netns: Vec<PathBuf>,
    /// The host port's address (link-local; never leaves the node).
    #[arg(long, default_value = "169.254.42.2", env = "MESH_HOST_ADDR")]
    host_addr: std::net::Ipv4Addr,
    /// Prometheus endpoint (`/metrics`), or `off`.
    #[arg(long, default_value = "127.0.0.1:9477", env = "MESH_METRICS")]
    metrics: String,
    /// Log format on stderr (filter with MESH_LOG, e.g. MESH_LOG=debug).
    #[arg(long, value_enum, default_value = "text", env = "MESH_LOG_FORMAT")]
    log_format: LogFormat,
    /// Print the model of this node that the Swarm implies (YAML, the --config format)
    /// and exit.
    #[arg(long)]
    print_docker_model: bool,
    /// Detach the programs and remove every pin under --bpffs and the state file, then
    /// exit (connections through the mesh stop).
    #[arg(long)]
    uninstall: bool,
}

/// Hands the settings file's values to the flag parser as the flags' environment
/// variables, where neither the command line nor the environment set them already.
fn apply_settings_file() -> anyhow::Result<()> {
    use clap::CommandFactory;
    let argv: Vec<String> = std::env::args().collect();
    let explicit = argv
        .iter()
        .position(|a| a == "--settings")
        .and_then(|i| argv.get(i + 1).cloned())
        .or_else(|| {
            argv.iter()
                .find_map(|a| a.strip_prefix("--settings=").map(String::from))
        })
        .or_else(|| std::env::var("MESH_SETTINGS").ok());
    let path = explicit
        .clone()
        .unwrap_or_else(|| mesh_agent::settings::DEFAULT_PATH.into());
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && explicit.is_none() => return Ok(()),
        Err(e) => anyhow::bail!("settings file {path}: {e}"),
    };
    let cmd = Args::command();
    let flags: std::collections::BTreeMap<String, String> = cmd
        .get_arguments()
        .filter(|a| a.get_id() != "settings")
        .filter_map(|a| {
            Some((
                a.get_long()?.to_string(),
                a.get_env()?.to_string_lossy().into_owned(),
            ))
        })
        .collect();
    let env = mesh_agent::settings::to_env(&text, &flags)
        .map_err(|e| anyhow::anyhow!("settings file {path}: {e}"))?;
    for (k, v) in env {
        let long = flags.iter().find(|(_, e)| **e == k).map(|(l, _)| l.clone());
        let on_command_line = long.is_some_and(|l| {
            argv.iter()
                .any(|a| *a == format!("--{l}") || a.starts_with(&format!("--{l}=")))
        });
        if std::env::var_os(&k).is_none() && !on_command_line {
            // Single-threaded still: nothing else reads the environment yet.
            std::env::set_var(k, v);
        }
    }
    Ok(())
}

fn main() {
    if let Err(e) = apply_settings_file() {
        eprintln!("mesh-agent: {e:#}");
        std::process::exit(1);
    }
    let args = Args::parse();
    let filter =
        tracing_subscriber::EnvFilter::try_from_env("MESH_LOG").unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
    if let Err(e) = run(args) {
        // One line, the whole chain: what failed and why.
        eprintln!("mesh-agent: {e:#}");
        std::process::exit(1);
    }
}

fn names_file(args: &Args) -> PathBuf {
    mesh_agent::inspect::names_path(&args.state_dir, &args.bpffs)
}

fn read_model(path: &Path) -> anyhow::Result<model::Model> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    model::from_yaml(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// Where this node's model comes from.
struct DockerSource {
    docker: bollard::Docker,
    drain: swarm::DrainTracker,
    /// This node's swarm address (known after the first snapshot).
    me: Option<std::net::Ipv4Addr>,
    /// What this node tells its peers (see mesh_agent::peers).
    report: Arc<Mutex<mesh_agent::peers::Report>>,
    /// Where the peers serve theirs (0: not exchanged).
    peer_port: u16,
    /// From the last full model: the managers and the ones among this node's peers,
    /// and what the quick check last saw.
    managers: BTreeSet<std::net::Ipv4Addr>,
    manager: bool,
    quick_seen: Option<BTreeSet<String>>,
    /// On a manager: every task seen shutting down, and when. Docker deletes a task
    /// removed by a scale-down from its store while the container may still be in its
    /// stop grace period (and in the gossiped tables): what was seen stopping stays
    /// stopping for a minute.
    stopping_seen: BTreeMap<String, Instant>,
    /// Label problems already reported (once each).
    label_warned: BTreeSet<String>,
    /// Who may ask this agent for a trace (`meshctl trace --node`): the swarm's nodes.
    trace_allowed: Arc<Mutex<BTreeSet<std::net::Ipv4Addr>>>,
    /// The last service facts a manager gave (a worker keeps them through a missed
    /// poll: without them its UDP ports would turn TCP for a moment).
    last_facts: Option<facts::ServiceFacts>,
    /// Docker's netns directory as mounted here (`--docker-netns`), if moved.
    netns_dir: Option<PathBuf>,
    /// Docker's netns directory as its sandboxes' paths show it.
    seen_netns_dir: Option<PathBuf>,
    /// Peers that run no mesh agent (stock Docker nodes).
    stock: mesh_agent::peers::StockPeers,
    /// The swarm's data-path port, from Docker on a manager, else from a manager's report.
    data_path_port: Option<u16>,
    /// Each network's own endpoint address on this node, as last seen.
    local_addrs: BTreeMap<String, std::net::Ipv4Addr>,
}

/// How long a task seen shutting down is remembered as such.
const STOPPING_MEMORY: Duration = Duration::from_secs(60);

impl DockerSource {
    fn new(docker: bollard::Docker, drain: swarm::DrainTracker, peer_port: u16) -> Self {
        DockerSource {
            docker,
            drain,
            me: None,
            report: Default::default(),
            peer_port,
            managers: BTreeSet::new(),
            manager: false,
            quick_seen: None,
            stopping_seen: Default::default(),
            label_warned: Default::default(),
            trace_allowed: Default::default(),
            last_facts: None,
            netns_dir: None,
            seen_netns_dir: None,
            stock: Default::default(),
            data_path_port: None,
            local_addrs: BTreeMap::new(),
        }
    }

    /// Docker's netns directory: where it is mounted for us, else where its sandboxes
    /// were seen, else Docker's default.
    fn netns_dir(&self) -> PathBuf {
        self.netns_dir
            .clone()
            .or_else(|| self.seen_netns_dir.clone())
            .unwrap_or_else(|| PathBuf::from("/var/run/docker/netns"))
    }

    fn with_netns_dir(mut self, dir: Option<PathBuf>) -> Self {
        self.netns_dir = dir;
        self
    }

    /// A manager's shutting-down tasks: what /tasks says now and what it said in the
    /// last minute.
    async fn stopping(&mut self) -> Result<BTreeSet<String>, docker::DockerError> {
        let now = Instant::now();
        for id in docker::stopping_tasks(&self.docker).await? {
            self.stopping_seen.entry(id).or_insert(now);
        }
        self.stopping_seen
            .retain(|_, t| now.duration_since(*t) < STOPPING_MEMORY);
        Ok(self.stopping_seen.keys().cloned().collect())
    }

    /// The orchestrator's shutdowns, cheaply: on a manager from its own /tasks, else
    /// from the managers' reports. True when they changed since the last look (then a
    /// full resync follows at once: Docker's gossip shows a task being shut down until
    /// its container has exited, and it may refuse connections well before that).
    async fn quick_changed(&mut self) -> bool {
        let stopping = if self.manager {
            self.stopping().await.ok()
        } else if self.peer_port != 0 && !self.managers.is_empty() {
            let managers: Vec<_> = self.managers.iter().copied().collect();
            let reports =
                mesh_agent::peers::poll(&managers, self.peer_port, Duration::from_millis(150))
                    .await;
            Some(reports.into_values().flat_map(|r| r.stopping).collect())
        } else {
            None
        };
        let Some(stopping) = stopping else {
            return false;
        };
        let changed = self.quick_seen.as_ref().is_some_and(|s| *s != stopping);
        self.quick_seen = Some(stopping);
        changed
    }

    /// The model of this node that the Swarm implies, with its tasks' veths and health.
    async fn model(&mut self) -> anyhow::Result<model::Model> {
        let mut view = docker::snapshot(&self.docker).await?;
        swarm::remember_local_addrs(&mut view.networks, &mut self.local_addrs);
        let me = view.me;
        self.me = Some(me);
        self.managers = view.managers.clone();
        self.manager = view.manager;
        let underlay = mesh_agent::netdev::interface_with_addr(me)
            .with_context(|| format!("no interface holds this node's swarm address {me}"))?;
        let mut model = swarm::model_from(&view.networks, me, &underlay);
        let now = Instant::now();
        self.drain.apply(&mut model, now);
        // The overlays the snapshot listed (a plain container on one calls VIPs).
        let overlays = view.networks.iter().map(|n| n.id.clone()).collect();
        let tasks =
            docker::local_endpoints(&self.docker, self.netns_dir.as_deref(), &overlays).await?;
        if let Some(d) = &tasks.netns_dir {
            self.seen_netns_dir = Some(d.clone());
        }
        swarm::add_host_ports(&mut model, &tasks.host_ports);
        let found: BTreeSet<_> = tasks.endpoints.iter().map(|e| e.addr).collect();
        let stopping = if view.manager {
            self.stopping().await?
        } else {
            BTreeSet::new()
        };
        let ids = swarm::task_addrs(&view.networks);
        let mut not_healthy = tasks.not_healthy.clone();
        let mut stopping_addrs: BTreeSet<_> = stopping
            .iter()
            .filter_map(|id| ids.get(id))
            .flatten()
            .copied()
            .collect();
        let mut facts = if view.manager {
            Some(docker::service_facts(&self.docker).await?)
        } else {
            None
        };
        *self.report.lock().expect("report lock") = mesh_agent::peers::Report {
            not_healthy: tasks.not_healthy,
            stopping,
            labels: facts.as_ref().map(|f| f.labels.clone()).unwrap_or_default(),
            protocols: facts
                .as_ref()
                .map(|f| f.protocols.clone())
                .unwrap_or_default(),
            ingress: facts.as_ref().and_then(|f| f.ingress.clone()),
            known: Some(tasks.known.clone()),
            data_path_port: view.data_path_port,
        };
        if view.data_path_port.is_some() {
            self.data_path_port = view.data_path_port;
        }
        let mut unseen = BTreeSet::new();
        if self.peer_port != 0 {
            let peers: Vec<_> = model.peers.iter().map(|p| p.addr).collect();
            let round =
                mesh_agent::peers::poll_all(&peers, self.peer_port, Duration::from_millis(250))
                    .await;
            for (peer, stock) in self.stock.observe(&peers, &round) {
                if stock {
                    tracing::warn!(
                        %peer,
                        port = self.peer_port,
                        "no mesh agent answers on this node: taken as a stock Docker node \
                         (flows to its tasks are SNATed to this node's overlay address, as \
                         Docker does, so that they answer through the tunnel)"
                    );
                } else {
                    tracing::info!(%peer, "a mesh agent answers on this node again");
                }
            }
            for p in &mut model.peers {
                p.stock = self.stock.is_stock(p.addr);
            }
            let reports = round.reports;
            if self.data_path_port.is_none() {
                self.data_path_port = reports
                    .iter()
                    .filter(|(p, _)| view.managers.contains(p))
                    .find_map(|(_, r)| r.data_path_port);
            }
            if facts.is_none() {
                facts = mesh_agent::peers::manager_facts(&reports, &view.managers);
            }
            let (sick, stop) = mesh_agent::peers::credible(&model, &reports, &view.managers, &ids);
            unseen = mesh_agent::peers::unseen(&model, &reports);
            not_healthy.extend(sick);
            stopping_addrs.extend(stop);
        }
        match &facts {
            Some(f) => self.last_facts = Some(f.clone()),
            None => facts = self.last_facts.clone(),
        }
        if let Some(f) = &facts {
            swarm::apply_published(&mut model, f);
            for bad in swarm::apply_labels(&mut model, &f.labels) {
                if self.label_warned.insert(bad.clone()) {
                    tracing::warn!("service label ignored: {bad}");
                }
            }
        }
        if !stopping_addrs.is_empty() {
            tracing::debug!(?stopping_addrs, ?not_healthy, "settling local tasks");
        }
        swarm::settle_local(&mut model, &found, &not_healthy, &stopping_addrs);
        self.drain.hold_warming_and(&mut model, now, &unseen);
        model.endpoints = tasks.endpoints;
        model.overlay_ports = tasks.overlay_ports;
        *self.trace_allowed.lock().expect("trace_allowed lock") = model
            .peers
            .iter()
            .map(|p| p.addr)
            .chain(std::iter::once(me))
            .collect();
        Ok(model)
    }
}

/// The first model from Docker: retried with backoff (and said so) until Docker answers,
/// since the agent may start before dockerd.
async fn first_docker_model(
    socket: &str,
    drain: Duration,
    warmup_ms: u64,
    peer_port: u16,
    netns_dir: Option<PathBuf>,
) -> (DockerSource, model::Model) {
    let mut wait = Duration::from_millis(500);
    loop {
        let attempt = async {
            let docker = docker::connect(socket).await?;
            let mut src = DockerSource::new(
                docker,
                swarm::DrainTracker::new(drain).with_warmup(Duration::from_millis(warmup_ms)),
                peer_port,
            )
            .with_netns_dir(netns_dir.clone());
            let m = src.model().await?;
            anyhow::Ok((src, m))
        };
        match attempt.await {
            Ok(sm) => return sm,
            Err(e) => {
                tracing::warn!("waiting for Docker ({e:#}); retrying in {wait:?}");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(10));
            }
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    if args.print_docker_model {
        return rt.block_on(async {
            let docker = docker::connect(&args.docker).await?;
            let mut src = DockerSource::new(docker, swarm::DrainTracker::new(Duration::ZERO), 0)
                .with_netns_dir(args.docker_netns.clone());
            print!("{}", model::to_yaml(&src.model().await?));
            Ok(())
        });
    }
    preflight::require_root("mesh-agent loads eBPF programs")?;
    preflight::require_kernel()?;
    preflight::require_bpffs(&args.bpffs)?;
    let pins = PinDir::new(&args.bpffs);
    if args.uninstall {
        pins.remove_all()?;
        mesh_agent::hostport::remove_device()?;
        let _ = std::fs::remove_file(names_file(&args));
        let _ = std::fs::remove_file(mesh_agent::inspect::status_path(
            &args.state_dir,
            &args.bpffs,
        ));
        // The state directory goes too if nothing else is in it.
        let _ = std::fs::remove_dir(&args.state_dir);
        eprintln!(
            "mesh-agent: removed the mesh pinned at {}",
            args.bpffs.display()
        );
        return Ok(());
    }
    rt.block_on(agent(args, pins))
}

struct Agent {
    mesh: Mesh,
    /// The host port, when on.
    host: Option<mesh_agent::hostport::HostPorts>,
    /// Docker's netns directory (its containers' namespaces: the host port serves them
    /// all), with --from-docker.
    docker_netns: Option<PathBuf>,
    /// More namespaces the host port serves (`--host-netns`).
    host_netns: Vec<PathBuf>,
    pins: PinDir,
    attached: BTreeSet<String>,
    /// Tasks' overlay veths with the overlay hooks, and their link pins.
    overlay: BTreeMap<model::OverlayPortSpec, Vec<PathBuf>>,
    metrics: Arc<Mutex<AgentMetrics>>,
    /// Where `meshctl status` reads how the agent is doing, and what it says there.
    status_file: PathBuf,
    status: mesh_agent::inspect::AgentStatus,
    /// The listening sockets on published ports last looked at, and their owners.
    port_owners: (BTreeSet<u64>, BTreeMap<u64, (u32, String)>),
}

async fn agent(args: Args, pins: PinDir) -> anyhow::Result<()> {
    // Signals first: a SIGTERM during start-up must not kill us half-attached.
    use tokio::signal::unix::{signal, SignalKind};
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sighup = signal(SignalKind::hangup())?;
    // `meshctl doctor --fix`: the maps drifted from what this agent wrote; re-read them.
    let mut sigusr1 = signal(SignalKind::user_defined1())?;

    let (mut source, model) = match (&args.config, args.from_docker) {
        (Some(p), _) => (None, read_model(p)?),
        (None, true) => {
            let (s, m) = first_docker_model(
                &args.docker,
                Duration::from_millis(args.drain_ms),
                args.warmup_ms,
                args.peer_port,
                args.docker_netns.clone(),
            )
            .await;
            (Some(s), m)
        }
        (None, false) => (None, model::Model::default()),
    };
    let (data_path_port, mismatch) = swarm::data_path_port(
        args.data_path_port,
        source.as_ref().and_then(|s| s.data_path_port),
    );
    if let Some(m) = &mismatch {
        tracing::error!("{m}");
    }
    let Some(underlay) = args.interface.clone().or_else(|| model.underlay.clone()) else {
        anyhow::bail!("no underlay interface: pass --interface or set `underlay:` in the config");
    };
    preflight::ifindex(&underlay)?;
    let object = match &args.object {
        Some(p) => p.clone(),
        None => loader::find_object()?,
    };
    let metrics_listener = match args.metrics.as_str() {
        "off" => None,
        addr => Some(tokio::net::TcpListener::bind(addr).await.with_context(|| {
            format!("metrics endpoint {addr} (pass --metrics ADDR or --metrics off)")
        })?),
    };
    let features = mesh_agent::features::Features::detect(args.tc_attach)?;
    // Without namespace cookies the socket programs cannot be scoped: the host port
    // stays off (a named fallback, in the status).
    let host_ports = if features.has(mesh_agent::features::Feature::NetnsCookie) {
        args.host_ports
    } else {
        Switch::Off
    };
    let cfg = MeshConfig {
        vxlan_port: data_path_port,
        // For the datapath's own MTU check where the kernel has no bpf_check_mtu (read
        // at load: a changed MTU takes a restart of the agent).
        underlay_mtu: mesh_agent::netdev::mtu(&underlay)
            .map_or(0, |m| m.min(u32::from(u16::MAX)) as u16),
        host_addr: match host_ports {
            Switch::On => u32::from_ne_bytes(args.host_addr.octets()),
            Switch::Off => 0,
        },
        ..MeshConfig::DEFAULT
    };
    let (mut dp, adopt) =
        loader::Datapath::load_pinned(&object, &cfg, &pins, args.maglev_slots, features)?;
    let fallbacks = dp.features().fallbacks();
    // Links of interfaces that are gone do nothing; their pins go.
    for l in pins.links() {
        if l.netns == 0 && !l.hook.sock() && preflight::ifname(l.ifindex).is_none() {
            pins.unpin(&l.path)?;
        }
    }
    let underlay_ix = preflight::ifindex(&underlay)?;
    for l in pins.links() {
        let stale = match l.hook {
            Hook::TcUnderlay => l.ifindex != underlay_ix,
            Hook::XdpUnderlay => l.ifindex != underlay_ix || matches!(args.xdp, Xdp::Off),
            // Checked against the tasks after the first model is applied.
            Hook::TcTask | Hook::TcOverlayIn | Hook::TcOverlayOut => false,
            Hook::TcHost
            | Hook::SockConnect4
            | Hook::SockSendmsg4
            | Hook::SockRecvmsg4
            | Hook::SockGetpeername4 => host_ports == Switch::Off,
        };
        if stale {
            pins.unpin(&l.path)?;
        }
    }
    dp.attach_pinned(Hook::TcUnderlay, &underlay, &pins, XdpMode::default())?;
    match args.xdp {
        Xdp::Off => {}
        Xdp::Native => dp.attach_pinned(Hook::XdpUnderlay, &underlay, &pins, XdpMode::Driver)?,
        Xdp::Generic => dp.attach_pinned(Hook::XdpUnderlay, &underlay, &pins, XdpMode::Skb)?,
    }
    let host = match host_ports {
        Switch::Off => {
            // Turned off: the host port goes with its programs' links (unpinned above).
            mesh_agent::hostport::remove_device()?;
            None
        }
        Switch::On => {
            let node = source
                .as_ref()
                .and_then(|s| s.me)
                .or(model.node.as_ref().map(|n| n.addr))
                .or(model.node_addrs.first().copied())
                .or(mesh_agent::netdev::ipv4_of(&underlay).first().copied())
                .with_context(|| {
                    format!(
                        "host ports need this node's address: {underlay} has none and the \
                         config sets no `node:`; add one, or pass --host-ports off"
                    )
                })?;
            let h = mesh_agent::hostport::HostPorts::setup(
                &mut dp,
                args.cgroup.as_deref(),
                &underlay,
                node,
                args.host_addr,
                Some(&pins),
            )?;
            tracing::info!(
                cgroup = %h.cgroup.display(),
                host_addr = %h.host_addr,
                "host ports: the node's own sockets and its containers' reach published ports"
            );
            Some(h)
        }
    };
    let (mesh, adopted) = Mesh::pinned(dp, names_file(&args), adopt)?;
    if let Some(a) = adopted {
        if a.named {
            tracing::info!(
                services = a.services,
                backends = a.backends,
                frontends = a.frontends,
                "adopted the pinned datapath (nothing flushed)"
            );
        } else {
            tracing::warn!(
                services = a.services,
                state = %names_file(&args).display(),
                "adopted pinned maps without the agent's state file: services are \
                 replaced, established connections through them may be reset"
            );
        }
    }
    if let (Some(src), true) = (&source, args.peer_port != 0) {
        let me = src.me.expect("known after the first model");
        let l = tokio::net::TcpListener::bind((me, args.peer_port))
            .await
            .with_context(|| {
                format!(
                    "health exchange on {me}:{} (pass --peer-port PORT, or 0 to turn it off)",
                    args.peer_port
                )
            })?;
        let trace = args.serve_traces.then(|| mesh_agent::peers::TraceAccess {
            state_dir: args.state_dir.clone(),
            bpffs: args.bpffs.clone(),
            allowed: src.trace_allowed.clone(),
        });
        tokio::spawn(mesh_agent::peers::serve(l, src.report.clone(), trace));
    }
    let shared = Arc::new(Mutex::new(AgentMetrics::default()));
    if let Some(l) = metrics_listener {
        tracing::info!(addr = %l.local_addr()?, "metrics on /metrics");
        tokio::spawn(metrics::serve(l, shared.clone(), pins.root().to_path_buf()));
    }
    let mut agent = Agent {
        mesh,
        host,
        docker_netns: source.as_ref().map(|s| s.netns_dir()),
        host_netns: args.host_netns.clone(),
        pins: pins.clone(),
        attached: BTreeSet::new(),
        overlay: BTreeMap::new(),
        metrics: shared,
        port_owners: Default::default(),
        status_file: mesh_agent::inspect::status_path(&args.state_dir, &args.bpffs),
        status: mesh_agent::inspect::AgentStatus {
            pid: std::process::id(),
            pid_ns: mesh_agent::inspect::own_pid_ns(),
            started_unix: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64(),
            source: if source.is_some() { "docker" } else { "config" }.into(),
            data_path_port,
            data_path_port_mismatch: mismatch,
            docker: args.docker.clone(),
            peer_port: args.peer_port,
            kernel: preflight::kernel_release(),
            fallbacks,
            ..Default::default()
        },
    };
    let started = Instant::now();
    agent.apply(&model, None)?;
    // Task links left by an earlier agent for interfaces that are no task's now.
    agent.prune_task_links()?;
    tracing::info!(
        object = %object.display(),
        interface = %underlay,
        xdp = ?args.xdp,
        data_path_port,
        pinned = %args.bpffs.display(),
        ready_ms = started.elapsed().as_millis() as u64,
        "datapath attached"
    );

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<docker::Event>();
    if let Some(src) = &source {
        let docker = src.docker.clone();
        tokio::spawn(async move {
            loop {
                match docker::follow_events(&docker, &tx).await {
                    Ok(()) if tx.is_closed() => return,
                    Ok(()) => {
                        tracing::warn!("Docker event stream ended; resyncing and following again")
                    }
                    Err(e) => tracing::warn!(
                        "Docker event stream failed ({e}); resyncing and following again"
                    ),
                }
                // A full resync covers whatever the gap hid.
                let _ = tx.send(docker::Event {
                    at: SystemTime::now(),
                    what: "event stream restart".into(),
                });
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }
    let mut tick = tokio::time::interval(Duration::from_millis(args.resync_ms.max(50)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut quick = tokio::time::interval(Duration::from_millis(args.quick_ms.max(50)));
    quick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let mut event = None;
        tokio::select! {
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
            _ = sighup.recv() => {}
            _ = sigusr1.recv() => {
                match agent.mesh.readopt() {
                    Ok(()) => tracing::info!("re-read the pinned maps (asked to repair drift); reconciling from them"),
                    Err(e) => tracing::warn!("re-reading the pinned maps failed: {e}"),
                }
                // Forget what the planner recorded so that the next status says afresh,
                // and re-attach every program (a link unpinned behind our back).
                agent.status.applied.clear();
                agent.attached.clear();
                agent.overlay.clear();
            }
            _ = tick.tick(), if source.is_some() => {}
            _ = quick.tick(), if source.is_some() && args.quick_ms > 0 => {
                let changed = match source.as_mut() {
                    Some(src) => src.quick_changed().await,
                    None => false,
                };
                if !changed {
                    continue;
                }
                tracing::debug!("tasks being shut down changed");
            }
            Some(ev) = rx.recv() => {
                // Coalesce what is already queued: one resync answers them all, and
                // the lag is measured from the oldest.
                let mut n = 1;
                let mut oldest = ev.at;
                while let Ok(more) = rx.try_recv() {
                    oldest = oldest.min(more.at);
                    n += 1;
                }
                tracing::debug!(what = %ev.what, queued = n, "Docker event");
                agent.metrics.lock().expect("metrics").events += n;
                event = Some(oldest);
            }
        }
        if let Some(src) = source.as_mut() {
            // A Docker hiccup is reported and the running state kept.
            let r = match src.model().await {
                Ok(m) => {
                    agent.docker_netns = Some(src.netns_dir());
                    agent.apply(&m, event)
                }
                Err(e) => Err(e),
            };
            if let Err(e) = r {
                agent.metrics.lock().expect("metrics").reconcile_errors += 1;
                tracing::warn!("resync from Docker failed, keeping the previous state: {e:#}");
            }
            continue;
        }
        let Some(path) = &args.config else { continue };
        // A bad file is reported and the running state kept.
        if let Err(e) = read_model(path).and_then(|m| agent.apply(&m, None)) {
            tracing::error!(
                "reload of {} failed, keeping the previous state: {e:#}",
                path.display()
            );
        }
    }
    tracing::info!(
        pinned = %args.bpffs.display(),
        "exiting; the datapath stays attached (`mesh-agent --uninstall` removes it)"
    );
    Ok(())
}

impl Agent {
    /// Says once what the model asked for that cannot be programmed (the rest is
    /// applied), and once when it is programmed again.
    fn report_problems(&mut self) {
        let now: Vec<model::Problem> = self.mesh.problems().to_vec();
        for p in now.iter().filter(|p| !self.status.problems.contains(p)) {
            tracing::error!(service = %p.service, "{p}; every other service is applied");
        }
        for p in self.status.problems.iter().filter(|p| !now.contains(p)) {
            tracing::info!(service = %p.service, "{}: no longer left out", p.left_out);
        }
        self.metrics.lock().expect("metrics").problems = now.clone();
        self.status.problems = now;
    }

    /// Finds published ports that a process of this node also listens on, and says
    /// so once each (and once when they are free again). Owners are looked up only
    /// when the listening sockets on published ports change.
    fn check_ports(&mut self, model: &model::Model) {
        use mesh_agent::listeners;
        let published = listeners::published(model, self.mesh.claims());
        let proc = Path::new("/proc");
        let listening: Vec<listeners::Listener> = listeners::listeners(proc)
            .into_iter()
            .filter(|l| published.contains_key(&(l.protocol, l.port)))
            .collect();
        let inodes: BTreeSet<u64> = listening.iter().map(|l| l.inode).collect();
        if inodes != self.port_owners.0 {
            self.port_owners = (inodes.clone(), listeners::owners(proc, &inodes));
        }
        let now = listeners::in_use(&published, &listening, &self.port_owners.1, false);
        for p in now.iter().filter(|p| !self.status.ports_in_use.contains(p)) {
            tracing::error!(port = p.port, service = %p.service, "{p}");
        }
        for p in self.status.ports_in_use.iter().filter(|p| !now.contains(p)) {
            tracing::info!(port = p.port, service = %p.service, "port {} no longer shared with {}", p.port, p.process);
        }
        self.metrics.lock().expect("metrics").ports_in_use = now.clone();
        self.status.ports_in_use = now;
        self.status.published = published
            .into_iter()
            .map(|((proto, port), (svc, mode))| {
                let mode = if mode == model::PublishMode::Host {
                    "host"
                } else {
                    "ingress"
                };
                (
                    format!("{port}/{}", format!("{proto:?}").to_lowercase()),
                    format!("{svc} {mode}"),
                )
            })
            .collect();
    }

    /// Attaches the task program to new endpoints' interfaces, applies the model, and
    /// detaches from interfaces that no longer hold a task.
    fn apply(&mut self, model: &model::Model, event: Option<SystemTime>) -> anyhow::Result<()> {
        let t0 = Instant::now();
        for ep in &model.endpoints {
            if !self.attached.contains(&ep.interface) {
                self.mesh.dp.attach_pinned(
                    Hook::TcTask,
                    &ep.interface,
                    &self.pins,
                    XdpMode::default(),
                )?;
                self.attached.insert(ep.interface.clone());
            }
        }
        self.attach_overlay(&model.overlay_ports);
        if let Some(h) = &self.host {
            self.mesh.extra_node_addrs = h.node_addrs();
        }
        let a = self.mesh.apply(model)?;
        self.report_problems();
        self.check_ports(model);
        self.status.stock_peers = model
            .peers
            .iter()
            .filter(|p| p.stock)
            .map(|p| p.addr.to_string())
            .collect();
        if let Some(h) = &mut self.host {
            let dirs: Vec<PathBuf> = self.docker_netns.iter().cloned().collect();
            let ns = mesh_agent::hostport::namespaces(&dirs, &self.host_netns);
            h.sync(
                &mut self.mesh.dp,
                &ns,
                &mesh_agent::hostport::port_vips(model),
            )?;
            self.status.host_ports = Some(mesh_agent::inspect::HostPortsStatus {
                cgroup: h.cgroup.display().to_string(),
                host_addr: h.host_addr.to_string(),
                namespaces: h.scope_len(),
            });
        }
        if let Some(dir) = &self.docker_netns {
            let d = mesh_agent::ipvs::detect(Path::new("/sys"), dir);
            if d.active() && self.status.docker_mesh.as_ref().is_none_or(|p| !p.active()) {
                tracing::warn!(
                    ipvs_services = d.ipvs_services,
                    "Docker's IPVS mesh is also active on this node: the mesh's hooks see \
                     published-port and VIP traffic first, so Docker's rules stay unused; \
                     `meshctl doctor` lists the ports; bootstrap-node.sh --keep-ipvs-off \
                     keeps ip_vs from loading"
                );
            }
            self.status.docker_mesh = Some(d);
        }
        let want: BTreeSet<&String> = model.endpoints.iter().map(|e| &e.interface).collect();
        let gone: Vec<String> = self
            .attached
            .iter()
            .filter(|i| !want.contains(i))
            .cloned()
            .collect();
        for i in gone {
            // After the maps stopped pointing at it; the veth may already be gone.
            if let Ok(ix) = preflight::ifindex(&i) {
                self.pins.unpin(&self.pins.link(Hook::TcTask, ix))?;
            }
            self.attached.remove(&i);
        }
        let want: BTreeSet<&model::OverlayPortSpec> = model.overlay_ports.iter().collect();
        self.overlay.retain(|p, _| want.contains(p));
        self.prune_task_links()?;
        // The planner's backends, read once for the metrics' names and the status
        // file's record (which `meshctl doctor` compares with the maps).
        let stale = a.ops > 0
            || self.status.applied.is_empty()
            || self
                .metrics
                .lock()
                .expect("metrics")
                .backend_names
                .is_empty();
        let names = stale.then(|| self.mesh.backend_names());
        if let Some(n) = &names {
            let mut applied: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for (group, addr, port) in n.values() {
                applied
                    .entry(group.clone())
                    .or_default()
                    .push(format!("{addr}:{port}"));
            }
            self.status.applied = applied;
        }
        let mut m = self.metrics.lock().expect("metrics");
        if let Some(n) = names {
            m.backend_names = n;
        }
        m.reconciles += 1;
        m.map_writes += a.writes as u64;
        m.reconcile_seconds.observe(t0.elapsed());
        m.services = model.services.len() as u64;
        m.backends = model.services.iter().map(|s| s.backends.len() as u64).sum();
        m.endpoints = model.endpoints.len() as u64;
        m.last_reconcile_unix = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        self.status.last_reconcile_unix = m.last_reconcile_unix;
        if a.ops > 0 || self.status.tasks.is_empty() {
            self.status.tasks = model
                .services
                .iter()
                .flat_map(|s| &s.backends)
                .filter_map(|b| Some((b.addr.to_string(), b.task.clone()?)))
                .collect();
        }
        self.status.reconciles = m.reconciles;
        self.status.reconcile_errors = m.reconcile_errors;
        self.status.events = m.events;
        // Best effort: a status file that cannot be written costs only meshctl's view.
        if let Ok(text) = serde_json::to_vec(&self.status) {
            let tmp = self.status_file.with_extension("tmp");
            if std::fs::write(&tmp, text).is_ok() {
                let _ = std::fs::rename(&tmp, &self.status_file);
            }
        }
        if let Some(at) = event {
            let lag = SystemTime::now().duration_since(at).unwrap_or_default();
            m.event_lag_seconds.observe(lag);
            self.status.event_lag_p50_s = m.event_lag_seconds.quantile(0.5);
            self.status.event_lag_p99_s = m.event_lag_seconds.quantile(0.99);
            tracing::debug!(
                lag_ms = lag.as_secs_f64() * 1e3,
                ops = a.ops,
                "event applied"
            );
        }
        if a.ops > 0 && tracing::enabled!(tracing::Level::DEBUG) {
            for s in &model.services {
                let b: Vec<String> = s
                    .backends
                    .iter()
                    .map(|b| {
                        format!(
                            "{}{}",
                            b.addr,
                            if b.state == model::Health::Active {
                                ""
                            } else {
                                "(draining)"
                            }
                        )
                    })
                    .collect();
                tracing::debug!(service = %s.name, backends = %b.join(" "), "backends");
            }
        }
        if a.ops > 0 {
            tracing::info!(
                services = model.services.len(),
                endpoints = model.endpoints.len(),
                ops = a.ops,
                writes = a.writes,
                "model applied"
            );
        }
        Ok(())
    }

    /// Attaches the overlay hooks to new overlay veths of tasks. A veth that cannot be
    /// attached (its task is going away) is reported and tried again next time: it must
    /// not hold up the rest of the model.
    fn attach_overlay(&mut self, ports: &[model::OverlayPortSpec]) {
        for p in ports {
            if self.overlay.contains_key(p) {
                continue;
            }
            let mut paths = Vec::new();
            for hook in [Hook::TcOverlayIn, Hook::TcOverlayOut] {
                match self
                    .mesh
                    .dp
                    .attach_pinned_in(hook, &p.netns, &p.interface, &self.pins)
                {
                    Ok(path) => paths.push(path),
                    Err(e) => tracing::warn!(
                        netns = %p.netns.display(),
                        interface = %p.interface,
                        "overlay veth not attached yet: {e}"
                    ),
                }
            }
            if paths.len() == 2 {
                self.overlay.insert(p.clone(), paths);
            } else {
                for path in paths {
                    let _ = self.pins.unpin(&path);
                }
            }
        }
    }

    /// Unpins task links whose interface is gone or holds no task now: never a program
    /// left on a vanished interface.
    fn prune_task_links(&mut self) -> anyhow::Result<()> {
        let keep: BTreeSet<u32> = self
            .attached
            .iter()
            .filter_map(|i| preflight::ifindex(i).ok())
            .collect();
        for l in self.pins.links() {
            if l.hook == Hook::TcTask && !keep.contains(&l.ifindex) {
                self.pins.unpin(&l.path)?;
            }
        }
        let keep: BTreeSet<&PathBuf> = self.overlay.values().flatten().collect();
        for l in self.pins.links() {
            if l.hook.overlay() && !keep.contains(&l.path) {
                self.pins.unpin(&l.path)?;
            }
        }
        Ok(())
    }
}
