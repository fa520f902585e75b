//! `cargo xtask cluster`: a real Docker Swarm of N nodes on this machine, one network
//! namespace (and mount and UTS namespace) per node with its own dockerd, joined by a
//! bridge in an underlay namespace, plus a client namespace on that underlay. Recipe and
//! pitfalls: ../shared/notes/docker-here.md. Nothing gets a default route: no traffic
//! leaves the machine.
//!
//! Layout: state in /run/mesh-cluster (node count, PIDs, logs, rootfs, each node's
//! engine and stock flag); namespaces `mc-ul` (bridge), `mc-n<i>` (nodes), `mc-c`
//! (client); per node exec-root /run/mesh-swarm<i> (docker.sock) and data-root
//! /var/lib/mesh-swarm<i>.
//!
//! Engines: each node runs one of `crate::engines` (the system's docker.io 20.10 by
//! default, or Debian's 28.5 or 26.1 from the engines' cache), with that engine's bin
//! directory first on its dockerd's PATH and that engine's own docker CLI for everything
//! the harness asks of the node. Nodes run dockerd as real nodes do: with docker0
//! (172.17.0.1/16 in each node's namespace), iptables and the userland proxy on.
//! Stock nodes (`--stock`) never run mesh-agent: a plain Docker node beside mesh nodes,
//! as during a rollout.

mod self_test;
pub use self_test::self_test;

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use clap::Subcommand;

use crate::{
    cmd::{self, exec, output},
    engines::{self, Engine},
};

pub const ST: &str = "/run/mesh-cluster";
const UL: &str = "mc-ul";
pub const CLIENT_NS: &str = "mc-c";
pub const IMAGE: &str = "mesh-test/busybox:latest";
const NET: &str = "10.251.0";
const POOL: &str = "10.252.0.0/16";

#[derive(Subcommand)]
pub enum Cluster {
    /// Build the swarm (idempotent): N nodes, M of them managers, the busybox image
    /// `mesh-test/busybox:latest` imported into every node, a client namespace.
    Up {
        #[arg(long, default_value_t = 3)]
        nodes: u32,
        #[arg(long, default_value_t = 1)]
        managers: u32,
        /// Also run `mesh-agent --from-docker` on every node but the stock ones (release
        /// build; `cargo xtask build` first).
        #[arg(long)]
        mesh: bool,
        /// The Docker engine of every node: 20.10 (the system's docker.io), 28.5 (Debian
        /// unstable's, fetched into $MESH_ENGINES_CACHE on first use), 26.1 (Debian 13's).
        #[arg(long)]
        engine: Option<String>,
        /// One engine per node, in node order (`28.5,20.10,20.10`); overrides --engine.
        #[arg(long, value_delimiter = ',')]
        engines: Vec<String>,
        /// Stock Docker nodes (`--stock 3` or `2,3`): no mesh-agent there, even with
        /// --mesh, as on a node a rollout has not reached yet.
        #[arg(long, value_delimiter = ',')]
        stock: Vec<u32>,
        /// The swarm's VXLAN port (`docker swarm init --data-path-port`); Docker's
        /// default 4789 without it.
        #[arg(long)]
        data_path_port: Option<u16>,
        /// dockerd's `userland-proxy` on every node (Docker's default: true).
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        userland_proxy: bool,
    },
    /// Nodes, their underlay addresses, roles and dockerd state; the client's address.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// The docker CLI against node NODE (1-based): `cluster docker 1 -- service ls`.
    Docker {
        node: u32,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run a command inside node NODE (its network, mount and UTS namespaces).
    Exec {
        node: u32,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        cmd: Vec<String>,
    },
    /// Run a command inside the client namespace.
    Client {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        cmd: Vec<String>,
    },
    /// Control node NODE's mesh-agent: `start`, `stop` (SIGTERM: the pinned datapath
    /// keeps forwarding), `kill` (SIGKILL, as a crash would), `restart`. `start` and
    /// `restart` refuse on a stock node (`up --stock`) unless `--force` (the rollout
    /// reaching that node; it stays recorded as stock).
    Agent {
        node: u32,
        #[arg(value_enum)]
        action: AgentAction,
        /// Start the agent on a stock node all the same.
        #[arg(long)]
        force: bool,
    },
    /// Restart node NODE's dockerd, as an engine upgrade or a crash would: `restart`
    /// (SIGTERM: Docker stops its containers and tears its networks down) or `kill`
    /// (SIGKILL of dockerd, then of its containerd and shims: nothing is cleaned up),
    /// then start it again with the node's engine. The node's mesh-agent, which lives in
    /// dockerd's mount namespace here, is stopped before (SIGTERM: its datapath keeps
    /// forwarding) and started after, adopting its pins.
    Dockerd {
        node: u32,
        #[arg(value_enum)]
        action: DockerdAction,
    },
    /// Stop only what `up` started (recorded PIDs) and remove every namespace, interface,
    /// mount and directory it made.
    Down,
    /// The harness's own check, as `cargo xtask test` runs it (2 nodes, a service, the
    /// agents' Docker source, the mesh on both, `down` leaving nothing behind).
    #[command(hide = true)]
    SelfTest,
    /// Import the test image `mesh-test/busybox:latest` (busybox-static: httpd, nc, sh,
    /// and the /cgi-bin/who page) into the dockerd at DOCKER, e.g.
    /// `unix:///var/run/docker.sock` (the single-node test's machine dockerd).
    Image {
        #[arg(long)]
        docker: String,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DockerdAction {
    Restart,
    Kill,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum AgentAction {
    Start,
    Stop,
    Kill,
    Restart,
}

/// The agent binaries: `$MESH_AGENT_BIN_DIR` (the tests' debug build), else the release
/// build; the object: `$MESH_BPF_OBJECT`, else the release one.
pub fn agent_paths() -> (PathBuf, PathBuf) {
    let bin = std::env::var_os("MESH_AGENT_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| cmd::root().join("target/release"));
    let object = std::env::var_os("MESH_BPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| cmd::root().join("target/release/mesh.bpf.o"));
    (bin.join("mesh-agent"), object)
}

pub fn run(c: Cluster) -> anyhow::Result<()> {
    match c {
        Cluster::Up {
            nodes,
            managers,
            mesh,
            engine,
            engines,
            stock,
            data_path_port,
            userland_proxy,
        } => {
            let names = engine_plan(nodes, engine.as_deref(), &engines)?;
            let stock: BTreeSet<u32> = stock.into_iter().collect();
            if let Some(bad) = stock.iter().find(|s| !(1..=nodes).contains(*s)) {
                bail!("--stock {bad}: nodes are 1..{nodes}");
            }
            up(
                nodes,
                managers,
                &names,
                &stock,
                data_path_port,
                userland_proxy,
            )?;
            if mesh {
                let (agent, object) = agent_paths();
                for n in (1..=nodes).filter(|n| !stock.contains(n)) {
                    if read_pid(&node_dir(n).join("mesh-agent.pid")).is_some_and(alive) {
                        continue;
                    }
                    start_agent(n, &agent, &object)?;
                }
                if stock.is_empty() {
                    println!("cluster: mesh-agent running on every node (logs in {ST}/node<N>/mesh-agent.log)");
                } else {
                    println!(
                        "cluster: mesh-agent running on every node but the stock ones ({}) (logs in {ST}/node<N>/mesh-agent.log)",
                        stock.iter().map(u32::to_string).collect::<Vec<_>>().join(", ")
                    );
                }
            }
            Ok(())
        }
        Cluster::Status { json } => status(json),
        Cluster::Docker { node, args } => {
            if !node_dir(node).exists() {
                bail!("node {node} is not up (`cargo xtask cluster up` first)");
            }
            let st = docker(node, &[])
                .args(&args)
                .status()
                .context("running docker")?;
            std::process::exit(st.code().unwrap_or(1));
        }
        Cluster::Dockerd { node, action } => restart_dockerd(node, action),
        Cluster::Exec { node, cmd } => {
            let pid = dockerd_pid(node).with_context(|| format!("node {node} is not up"))?;
            let st = Command::new("nsenter")
                .args(["-t", &pid.to_string(), "-n", "-m", "-u", "--"])
                .args(&cmd)
                .status()?;
            std::process::exit(st.code().unwrap_or(1));
        }
        Cluster::Client { cmd } => {
            let st = Command::new("nsenter")
                .arg(format!("--net=/run/netns/{CLIENT_NS}"))
                .arg("--")
                .args(&cmd)
                .status()?;
            std::process::exit(st.code().unwrap_or(1));
        }
        Cluster::Agent {
            node,
            action,
            force,
        } => {
            if !node_dir(node).exists() {
                bail!("node {node} is not up (`cargo xtask cluster up` first)");
            }
            let starts = matches!(action, AgentAction::Start | AgentAction::Restart);
            if starts && is_stock(node) && !force {
                bail!(
                    "node {node} is a stock Docker node (`cluster up --stock`): it runs no \
                     mesh-agent; `cluster agent {node} start --force` starts one all the same"
                );
            }
            let (agent, object) = agent_paths();
            match action {
                AgentAction::Start => {
                    start_agent(node, &agent, &object)?;
                }
                AgentAction::Stop => stop_agent(node),
                AgentAction::Kill => {
                    let pid = read_pid(&node_dir(node).join("mesh-agent.pid"))
                        .with_context(|| format!("no mesh-agent recorded on node {node}"))?;
                    kill_checked(pid, "mesh-agent", libc::SIGKILL);
                    wait_gone(pid, 5);
                    let _ = std::fs::remove_file(node_dir(node).join("mesh-agent.pid"));
                }
                AgentAction::Restart => {
                    stop_agent(node);
                    start_agent(node, &agent, &object)?;
                }
            }
            Ok(())
        }
        Cluster::Down => down(),
        Cluster::SelfTest => {
            println!("swarm: {}", self_test()?);
            Ok(())
        }
        Cluster::Image { docker } => {
            let dir = tempdir("mesh-image")?;
            let r =
                rootfs_in(&dir).and_then(|root| import_image(&root, Path::new("docker"), &docker));
            let _ = std::fs::remove_dir_all(&dir);
            r?;
            println!("cluster: {IMAGE} imported into {docker}");
            Ok(())
        }
    }
}

/// A fresh directory under the system's temporary directory, named for this process.
pub fn tempdir(tag: &str) -> anyhow::Result<PathBuf> {
    let d = std::env::temp_dir().join(format!("{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

/// The swarm's data-path port, when `up` was given one (a file in the cluster's state
/// directory), for the agents.
const ST_DIR_DATA_PATH_PORT: &str = "data-path-port";

/// Present when `up` was given `--userland-proxy false`: every start of a node's
/// dockerd (`dockerd N restart` too) keeps the setting.
const ST_NO_USERLAND_PROXY: &str = "no-userland-proxy";

/// What each node's dockerd is started through (see the script's header).
const NODE_ENTRY: &str = include_str!("cluster/node-entry.sh");

fn node_dir(n: u32) -> PathBuf {
    Path::new(ST).join(format!("node{n}"))
}

fn exec_root(n: u32) -> String {
    format!("/run/mesh-swarm{n}")
}

fn data_root(n: u32) -> String {
    format!("/var/lib/mesh-swarm{n}")
}

pub fn sock(n: u32) -> String {
    format!("unix://{}/docker.sock", exec_root(n))
}

pub fn node_addr(n: u32) -> String {
    format!("{NET}.{}", 10 + n)
}

pub const CLIENT_ADDR: &str = "10.251.0.100";

/// Running (a zombie is not: when `up` ran in this very process, dockerd is our child
/// and lingers as one until reaped).
fn alive(pid: u32) -> bool {
    // SAFETY: reaps `pid` only if it is our own exited child; harmless otherwise.
    unsafe { libc::waitpid(pid as i32, std::ptr::null_mut(), libc::WNOHANG) };
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}

fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

fn read_pid(p: &Path) -> Option<u32> {
    std::fs::read_to_string(p).ok()?.trim().parse().ok()
}

/// dockerd's PID for node `n`, if it is still our dockerd.
fn dockerd_pid(n: u32) -> Option<u32> {
    let pid = read_pid(&node_dir(n).join("dockerd.pid"))?;
    (alive(pid) && cmdline(pid).contains(&format!("{}/docker.sock", exec_root(n)))).then_some(pid)
}

/// `<hostname>` -> the node's exec-root links (see `up`).
pub fn by_host_dir() -> PathBuf {
    Path::new(ST).join("by-host")
}

/// Whether `up --mesh` / `cluster agent start` agents (processes) run on some node.
pub fn process_agents_running() -> bool {
    (1..=recorded_nodes().unwrap_or(0))
        .any(|n| read_pid(&node_dir(n).join("mesh-agent.pid")).is_some_and(alive))
}

/// The docker sockets of the local cluster's nodes (it must be up).
pub fn node_socks() -> anyhow::Result<Vec<String>> {
    let n = recorded_nodes().context("no local cluster: run `cargo xtask cluster up` first")?;
    Ok((1..=n).map(sock).collect())
}

fn recorded_nodes() -> Option<u32> {
    std::fs::read_to_string(Path::new(ST).join("nodes"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The docker CLI of node `n`'s engine, against its dockerd (any CLI on PATH if the
/// node has no record).
pub fn docker(n: u32, args: &[&str]) -> Command {
    let cli = node_rec(n)
        .map(|r| r.bin.join("docker"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("docker"));
    let mut c = Command::new(cli);
    c.arg("-H").arg(sock(n)).args(args);
    c
}

/// What `up` recorded of a node: its engine and whether it is a stock Docker node.
#[derive(Debug)]
pub struct NodeRec {
    pub engine: String,
    pub bin: PathBuf,
    pub version: String,
    pub stock: bool,
}

fn write_rec(n: u32, e: &Engine, stock: bool) -> anyhow::Result<()> {
    let d = node_dir(n);
    std::fs::create_dir_all(&d)?;
    std::fs::write(
        d.join("engine"),
        format!(
            "name {}\nbin {}\nversion {}\n",
            e.name,
            e.bin.display(),
            e.version
        ),
    )?;
    if stock {
        std::fs::write(d.join("stock"), "")?;
    }
    Ok(())
}

pub fn node_rec(n: u32) -> Option<NodeRec> {
    let text = std::fs::read_to_string(node_dir(n).join("engine")).ok()?;
    let field = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{k} ")))
            .map(str::to_string)
    };
    Some(NodeRec {
        engine: field("name")?,
        bin: PathBuf::from(field("bin")?),
        version: field("version").unwrap_or_default(),
        stock: is_stock(n),
    })
}

fn is_stock(n: u32) -> bool {
    node_dir(n).join("stock").exists()
}

/// The engine of each node: `--engines` (one per node), else `--engine` for all, else
/// the default.
fn engine_plan(
    nodes: u32,
    engine: Option<&str>,
    engines: &[String],
) -> anyhow::Result<Vec<String>> {
    if engines.is_empty() {
        let e = engine.unwrap_or(engines::DEFAULT);
        return Ok((1..=nodes).map(|_| e.to_string()).collect());
    }
    if engines.len() != nodes as usize {
        bail!(
            "--engines names {} engines for {nodes} nodes: one per node, in node order",
            engines.len()
        );
    }
    Ok(engines.iter().map(|e| e.trim().to_string()).collect())
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    exec(Command::new("ip").args(args))
}

/// `names`: the engine of each node; `stock`: the nodes that will run no agent;
/// `data_path_port`: the swarm's VXLAN port (Docker's default without it);
/// `userland_proxy`: dockerd's setting of that name.
fn up(
    nodes: u32,
    managers: u32,
    names: &[String],
    stock: &BTreeSet<u32>,
    data_path_port: Option<u16>,
    userland_proxy: bool,
) -> anyhow::Result<()> {
    if !cmd::is_root() {
        bail!("cluster up must run as root: it creates namespaces and runs dockerd");
    }
    if !(1..=9).contains(&nodes) || managers < 1 || managers > nodes {
        bail!("--nodes must be 1..9 and --managers 1..nodes");
    }
    assert_eq!(names.len(), nodes as usize);
    if let Some(have) = recorded_nodes() {
        let same = have == nodes
            && (1..=nodes).all(|n| {
                node_rec(n).is_some_and(|r| {
                    r.engine == names[n as usize - 1] && r.stock == stock.contains(&n)
                })
            });
        if same && (1..=nodes).all(|n| dockerd_pid(n).is_some()) {
            println!("cluster: already up with {nodes} nodes");
            return Ok(());
        }
        let what: Vec<String> = (1..=have)
            .map(|n| match node_rec(n) {
                Some(r) => format!("{}{}", r.engine, if r.stock { " stock" } else { "" }),
                None => "?".into(),
            })
            .collect();
        bail!(
            "a cluster of {have} nodes ({}) is (partly) up: run `cargo xtask cluster down` first",
            what.join(", ")
        );
    }
    for need in ["nsenter", "unshare"] {
        if which(need).is_none() {
            bail!("{need} not found: run `cargo xtask setup` (util-linux)");
        }
    }
    // Every engine first (a fetch can fail; then nothing was made).
    let mut resolved: Vec<Engine> = Vec::new();
    for name in names {
        if !resolved.iter().any(|e| &e.name == name) {
            let t = Instant::now();
            let e = engines::resolve(name)?;
            println!(
                "cluster: engine {name}: dockerd {} from {} ({:.1} s)",
                e.version,
                e.bin.display(),
                t.elapsed().as_secs_f64()
            );
            resolved.push(e);
        }
    }
    let engine_of = |n: u32| -> &Engine {
        let name = &names[n as usize - 1];
        resolved.iter().find(|e| &e.name == name).expect("resolved")
    };
    let t0 = Instant::now();
    std::fs::create_dir_all(ST)?;
    std::fs::write(Path::new(ST).join("nodes"), nodes.to_string())?;
    let no_proxy = Path::new(ST).join(ST_NO_USERLAND_PROXY);
    if userland_proxy {
        let _ = std::fs::remove_file(&no_proxy);
    } else {
        std::fs::write(&no_proxy, "")?;
    }
    for n in 1..=nodes {
        write_rec(n, engine_of(n), stock.contains(&n))?;
    }
    let rootfs = make_rootfs()?;
    // Underlay: a bridge in its own namespace (no host iptables involved).
    ip(&["netns", "add", UL])?;
    ip(&["-n", UL, "link", "set", "lo", "up"])?;
    ip(&["-n", UL, "link", "add", "br0", "type", "bridge"])?;
    ip(&["-n", UL, "link", "set", "br0", "up"])?;
    let plug = |ns: &str, port: &str, addr: &str| -> anyhow::Result<()> {
        ip(&["netns", "add", ns])?;
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
        ip(&[
            "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", port, "netns", UL,
        ])?;
        ip(&["-n", UL, "link", "set", port, "master", "br0", "up"])?;
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", ns, "link", "set", "eth0", "up"])
    };
    for n in 1..=nodes {
        plug(&format!("mc-n{n}"), &format!("v{n}"), &node_addr(n))?;
    }
    plug(CLIENT_NS, "vc", CLIENT_ADDR)?;
    for n in 1..=nodes {
        start_node(n, engine_of(n))?;
        // `by-host/<hostname>`: the node's exec-root under the name Swarm's templates
        // give (`{{.Node.Hostname}}`), so one stack file mounts each node's own socket.
        let by_host = by_host_dir();
        std::fs::create_dir_all(&by_host)?;
        let link = by_host.join(format!("mc-n{n}"));
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(exec_root(n), link)?;
    }
    for n in 1..=nodes {
        wait_node(n)?;
    }
    for n in 1..=nodes {
        import_image(&rootfs, &engine_of(n).cli(), &sock(n))?;
    }
    let a1 = node_addr(1);
    let listen = format!("{a1}:2377");
    let mut init = vec![
        "swarm",
        "init",
        "--advertise-addr",
        &a1,
        "--listen-addr",
        &listen,
        "--default-addr-pool",
        POOL,
        "--default-addr-pool-mask-length",
        "24",
    ];
    let port = data_path_port.map(|p| p.to_string());
    if let Some(p) = &port {
        init.extend(["--data-path-port", p]);
    }
    // The agents get it as a node's settings would give it (bootstrap-node.sh writes it
    // to /etc/mesh/agent.yaml): a worker learns the swarm's port only from a manager's
    // report, which its first model may not have yet.
    let record = ST_DIR_DATA_PATH_PORT;
    match &port {
        Some(p) => std::fs::write(Path::new(ST).join(record), p)?,
        None => {
            let _ = std::fs::remove_file(Path::new(ST).join(record));
        }
    }
    exec(docker(1, &init).stdout(Stdio::null()))?;
    let mtok = output(&mut docker(1, &["swarm", "join-token", "-q", "manager"]))?;
    let wtok = output(&mut docker(1, &["swarm", "join-token", "-q", "worker"]))?;
    for n in 2..=nodes {
        let tok = if n <= managers {
            mtok.trim()
        } else {
            wtok.trim()
        };
        let a = node_addr(n);
        exec(
            docker(
                n,
                &[
                    "swarm",
                    "join",
                    "--advertise-addr",
                    &a,
                    "--listen-addr",
                    &format!("{a}:2377"),
                    "--token",
                    tok,
                    &format!("{a1}:2377"),
                ],
            )
            .stdout(Stdio::null()),
        )?;
    }
    let engines_line: Vec<String> = (1..=nodes)
        .map(|n| {
            format!(
                "{}{}",
                engine_of(n).name,
                if stock.contains(&n) { " (stock)" } else { "" }
            )
        })
        .collect();
    println!(
        "cluster: {nodes} nodes ({managers} managers) up in {:.1} s, engines {}; client namespace {CLIENT_NS} at {CLIENT_ADDR}; export DOCKER_HOST={}",
        t0.elapsed().as_secs_f64(),
        engines_line.join(", "),
        sock(1)
    );
    Ok(())
}

fn which(bin: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(bin))
        .find(|p| p.is_file())
}

/// `docker import` of the test image from `rootfs` into the dockerd at `host`, with the
/// docker CLI `cli`.
fn import_image(rootfs: &Path, cli: &Path, host: &str) -> anyhow::Result<()> {
    let tar = Command::new("tar")
        .args(["-C", &rootfs.to_string_lossy(), "-c", "."])
        .stdout(Stdio::piped())
        .spawn()?;
    let st = Command::new(cli)
        .args(["-H", host, "import", "-", IMAGE])
        .stdin(tar.stdout.context("tar stdout")?)
        .stdout(Stdio::null())
        .status()?;
    if !st.success() {
        bail!("importing {IMAGE} into the dockerd at {host} failed");
    }
    Ok(())
}

fn make_rootfs() -> anyhow::Result<PathBuf> {
    rootfs_in(Path::new(ST))
}

fn rootfs_in(dir: &Path) -> anyhow::Result<PathBuf> {
    let r = dir.join("bbroot");
    let bb = Path::new("/bin/busybox");
    if !bb.exists() {
        bail!("/bin/busybox (busybox-static) missing: run `cargo xtask setup`");
    }
    for d in ["bin", "www/cgi-bin", "etc", "tmp"] {
        std::fs::create_dir_all(r.join(d))?;
    }
    std::fs::copy(bb, r.join("bin/busybox"))?;
    let list = output(Command::new(bb).arg("--list"))?;
    for a in list.lines().filter(|a| *a != "busybox") {
        let _ = std::os::unix::fs::symlink("busybox", r.join("bin").join(a));
    }
    std::fs::write(r.join("www/index.html"), "ok\n")?;
    // GET /cgi-bin/who: the answering container's hostname and the client address it
    // sees (tests check that the mesh keeps the client's IP).
    let who = r.join("www/cgi-bin/who");
    std::fs::write(
        &who,
        "#!/bin/sh\nprintf 'Content-Type: text/plain\\r\\n\\r\\n%s %s\\n' \"$(hostname)\" \"$REMOTE_ADDR\"\n",
    )?;
    std::fs::set_permissions(&who, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    // `udp-who PORT`: the same answer over UDP (busybox has no UDP server), std only,
    // linked statically so the image needs no libraries.
    let src = crate::cmd::root().join("xtask/fixtures/udp_who.rs");
    exec(
        Command::new("rustc")
            .args([
                "-O",
                "-C",
                "target-feature=+crt-static",
                "--edition",
                "2021",
                "-o",
            ])
            .arg(r.join("bin/udp-who"))
            .arg(&src),
    )
    .context("building the test image's udp-who")?;
    Ok(r)
}

fn start_node(n: u32, engine: &Engine) -> anyhow::Result<()> {
    let d = node_dir(n);
    std::fs::create_dir_all(&d)?;
    std::fs::create_dir_all(exec_root(n))?;
    std::fs::create_dir_all(data_root(n))?;
    // The engine ID file per node (20.10 keeps it in key.json, by default shared); the
    // engine's own tini and userland proxy, whatever its dockerd would look for.
    std::fs::write(
        d.join("daemon.json"),
        format!(
            "{{ \"deprecated-key-path\": \"{}/key.json\", \"init-path\": \"{}\", \"userland-proxy-path\": \"{}\", \"userland-proxy\": {} }}\n",
            data_root(n),
            engine.bin.join("docker-init").display(),
            engine.bin.join("docker-proxy").display(),
            !Path::new(ST).join(ST_NO_USERLAND_PROXY).exists(),
        ),
    )?;
    let log = std::fs::File::create(d.join("dockerd.log"))?;
    let child = Command::new("setsid")
        .arg("nsenter")
        .arg(format!("--net=/run/netns/mc-n{n}"))
        .args([
            "unshare",
            "--mount",
            "--uts",
            "--propagation",
            "slave",
            "--",
            "bash",
            "-c",
            NODE_ENTRY,
            "entry",
        ])
        .arg(n.to_string())
        .arg(engine.dockerd())
        .arg("--config-file")
        .arg(d.join("daemon.json"))
        .args(["--data-root", &data_root(n), "--exec-root", &exec_root(n)])
        .args([
            "-H",
            &sock(n),
            "--pidfile",
            &format!("{}/docker.pid", exec_root(n)),
        ])
        // docker0 as on any node (172.17.0.1/16, each node in its own namespace).
        .args([
            "--cgroup-parent",
            &format!("/mesh-swarm{n}"),
            "--iptables=true",
        ])
        .args(["--swarm-default-advertise-addr", &node_addr(n)])
        // The engine's binaries first: containerd, its shim, runc, docker-proxy.
        .env(
            "PATH",
            format!(
                "{}:{}",
                engine.bin.display(),
                std::env::var("PATH").unwrap_or_default()
            ),
        )
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting dockerd")?;
    // setsid, nsenter, unshare and bash all exec: this PID becomes dockerd's.
    std::fs::write(d.join("dockerd.pid"), child.id().to_string())?;
    std::mem::forget(child);
    Ok(())
}

fn wait_node(n: u32) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if docker(n, &["version"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()?
            .success()
        {
            break;
        }
        let pid = read_pid(&node_dir(n).join("dockerd.pid")).unwrap_or(0);
        if !alive(pid) {
            bail!(
                "dockerd of node {n} died: see {}",
                node_dir(n).join("dockerd.log").display()
            );
        }
        if Instant::now() > deadline {
            bail!(
                "dockerd of node {n} not ready in 30 s: see {}",
                node_dir(n).join("dockerd.log").display()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    if let Ok(c) = std::fs::read_to_string(format!("{}/containerd/containerd.pid", exec_root(n))) {
        std::fs::write(node_dir(n).join("containerd.pid"), c.trim())?;
    }
    Ok(())
}

fn status(json: bool) -> anyhow::Result<()> {
    let Some(nodes) = recorded_nodes() else {
        if json {
            println!("{{\"up\": false}}");
        } else {
            println!("cluster: not up");
        }
        return Ok(());
    };
    let roles = output(&mut docker(
        1,
        &["node", "ls", "--format", "{{.Hostname}} {{.ManagerStatus}}"],
    ))
    .unwrap_or_default();
    let mut rows = Vec::new();
    for n in 1..=nodes {
        let host = format!("mc-n{n}");
        let role = roles
            .lines()
            .find_map(|l| {
                l.strip_prefix(&format!("{host} "))
                    .map(|s| s.trim().to_string())
            })
            .map(|s| {
                if s.is_empty() {
                    "worker".to_string()
                } else {
                    "manager".to_string()
                }
            })
            .unwrap_or_else(|| "unknown".into());
        rows.push((
            n,
            node_addr(n),
            role,
            dockerd_pid(n),
            agent_state(n),
            node_rec(n),
        ));
    }
    if json {
        let nodes: Vec<serde_json::Value> = rows
            .iter()
            .map(|(n, a, r, p, ag, rec)| {
                serde_json::json!({
                    "node": n,
                    "name": format!("mc-n{n}"),
                    "addr": a,
                    "role": r,
                    "dockerd": p,
                    "docker_host": sock(*n),
                    "engine": rec.as_ref().map(|r| r.engine.clone()),
                    "engine_version": rec.as_ref().map(|r| r.version.clone()),
                    "docker_cli": rec.as_ref().map(|r| r.bin.join("docker")),
                    "stock": rec.as_ref().is_some_and(|r| r.stock),
                    "agent": ag.0,
                    "agent_pid": ag.1,
                })
            })
            .collect();
        let st = serde_json::json!({
            "up": true,
            "client": CLIENT_ADDR,
            "client_netns": CLIENT_NS,
            "underlay_netns": UL,
            "engines_cache": engines::cache_dir(),
            "nodes": nodes,
        });
        println!("{st}");
    } else {
        println!(
            "NODE   NAME     ADDRESS        ROLE     ENGINE                      DOCKERD      MESH-AGENT"
        );
        for (n, a, r, p, ag, rec) in rows {
            let engine = match &rec {
                Some(r) => format!(
                    "{} ({}){}",
                    r.engine,
                    r.version,
                    if r.stock { " stock" } else { "" }
                ),
                None => "?".into(),
            };
            println!(
                "{n:<6} mc-n{n:<4} {a:<14} {r:<8} {engine:<27} {:<12} {}",
                p.map(|p| format!("pid {p}")).unwrap_or("down".into()),
                match ag.1 {
                    Some(pid) => format!("{} (pid {pid})", ag.0),
                    None => ag.0.to_string(),
                }
            );
        }
        println!("client namespace {CLIENT_NS} at {CLIENT_ADDR}");
    }
    Ok(())
}

/// Node `n`'s agent: "running" (its recorded PID alive), "datapath-only" (no agent, its
/// pinned datapath still forwarding), or "none".
fn agent_state(n: u32) -> (&'static str, Option<u32>) {
    match read_pid(&node_dir(n).join("mesh-agent.pid")) {
        Some(pid) if alive(pid) && cmdline(pid).contains("mesh-agent") => ("running", Some(pid)),
        _ if Path::new(&agent_pins(n)).join("links").exists() => ("datapath-only", None),
        _ => ("none", None),
    }
}

fn kill_checked(pid: u32, must: &str, sig: i32) {
    if alive(pid) && cmdline(pid).contains(must) {
        // SAFETY: signalling a PID we recorded, after checking it is still ours.
        unsafe { libc::kill(pid as i32, sig) };
    }
}

fn wait_gone(pid: u32, secs: u64) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while alive(pid) {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    true
}

/// `cluster dockerd N restart|kill` (see the subcommand).
fn restart_dockerd(n: u32, action: DockerdAction) -> anyhow::Result<()> {
    let rec = node_rec(n).with_context(|| format!("node {n} is not up"))?;
    let engine = engines::resolve(&rec.engine)?;
    let pid = dockerd_pid(n).with_context(|| format!("node {n}'s dockerd is not running"))?;
    let had_agent = agent_state(n).0 == "running";
    if had_agent {
        stop_agent(n);
    }
    let must = format!("{}/docker.sock", exec_root(n));
    let t = Instant::now();
    match action {
        DockerdAction::Restart => {
            kill_checked(pid, &must, libc::SIGTERM);
            if !wait_gone(pid, 60) {
                bail!("node {n}'s dockerd did not stop within 60 s of SIGTERM");
            }
        }
        DockerdAction::Kill => {
            kill_checked(pid, &must, libc::SIGKILL);
            wait_gone(pid, 5);
        }
    }
    // Its containerd and shims: gone after a graceful stop; killed after a crash (they
    // live in the node's old mount namespace, which the new dockerd cannot reach).
    kill_containerd(n);
    // A killed dockerd or containerd leaves its pidfile, and until something reaps it,
    // a zombie under that PID, which the new dockerd takes for that daemon still running
    // (and waits for a containerd that never answers).
    for pidfile in [
        format!("{}/docker.pid", exec_root(n)),
        format!("{}/containerd/containerd.pid", exec_root(n)),
    ] {
        if read_pid(Path::new(&pidfile)).is_some_and(|p| !alive(p)) {
            let _ = std::fs::remove_file(&pidfile);
        }
    }
    start_node(n, &engine)?;
    wait_node(n)?;
    println!(
        "cluster: node {n}'s dockerd {} and started again in {:.1} s",
        match action {
            DockerdAction::Restart => "stopped (SIGTERM)",
            DockerdAction::Kill => "killed (SIGKILL, with its containerd and shims)",
        },
        t.elapsed().as_secs_f64()
    );
    if had_agent {
        let (agent, object) = agent_paths();
        start_agent(n, &agent, &object)?;
    }
    Ok(())
}

/// Node `n`'s containerd (by its recorded PID) and its shims (by their command line).
fn kill_containerd(n: u32) {
    if let Some(c) = read_pid(&node_dir(n).join("containerd.pid")) {
        let must = format!("{}/containerd/containerd.toml", exec_root(n));
        kill_checked(c, &must, libc::SIGTERM);
        if !wait_gone(c, 10) {
            kill_checked(c, &must, libc::SIGKILL);
            wait_gone(c, 5);
        }
    }
    let shim = format!("-address {}/containerd/containerd.sock", exec_root(n));
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            if let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() {
                if cmdline(pid).contains(&shim) {
                    // SAFETY: a shim of our own containerd, by its command line.
                    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                }
            }
        }
    }
    // What a killed shim leaves running: the containers' processes, in the cgroups runc
    // made under the node's --cgroup-parent.
    for pid in node_cgroup_pids(n) {
        // SAFETY: a process in this node's own cgroup tree (a container of its engine).
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
}

/// The processes in node `n`'s cgroups (`/sys/fs/cgroup/<hierarchy>/mesh-swarm<n>/...`).
fn node_cgroup_pids(n: u32) -> BTreeSet<u32> {
    let mut out = BTreeSet::new();
    let Ok(rd) = std::fs::read_dir("/sys/fs/cgroup") else {
        return out;
    };
    for h in rd.flatten() {
        let root = h.path().join(format!("mesh-swarm{n}"));
        let mut dirs = vec![root];
        while let Some(d) = dirs.pop() {
            let Ok(entries) = std::fs::read_dir(&d) else {
                continue;
            };
            if let Ok(procs) = std::fs::read_to_string(d.join("cgroup.procs")) {
                out.extend(procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
            }
            dirs.extend(entries.flatten().map(|e| e.path()).filter(|p| p.is_dir()));
        }
    }
    out
}

fn stop_node(n: u32) {
    let quiet = |c: &mut Command| {
        let _ = c.stdout(Stdio::null()).stderr(Stdio::null()).status();
    };
    if let Some(pid) = dockerd_pid(n) {
        // The node's own CLI, under a timeout.
        let timed = |secs: &str, args: &[&str]| {
            let d = docker(n, args);
            let mut c = Command::new("timeout");
            c.arg(secs).arg(d.get_program()).args(d.get_args());
            c
        };
        quiet(&mut timed("20", &["swarm", "leave", "--force"]));
        if let Ok(ids) = output(&mut docker(n, &["ps", "-aq"])) {
            let ids: Vec<&str> = ids.split_whitespace().collect();
            if !ids.is_empty() {
                let mut args = vec!["rm", "-f"];
                args.extend(&ids);
                quiet(&mut timed("30", &args));
            }
        }
        let must = format!("{}/docker.sock", exec_root(n));
        kill_checked(pid, &must, libc::SIGTERM);
        if !wait_gone(pid, 30) {
            kill_checked(pid, &must, libc::SIGKILL);
            wait_gone(pid, 5);
        }
    }
    kill_containerd(n);
    std::thread::sleep(Duration::from_millis(300));
    // The cgroups runc made under --cgroup-parent /mesh-swarmN.
    if let Ok(rd) = std::fs::read_dir("/sys/fs/cgroup") {
        for e in rd.flatten() {
            let cg = e.path().join(format!("mesh-swarm{n}"));
            if cg.is_dir() {
                let _ = Command::new("find")
                    .arg(&cg)
                    .args(["-depth", "-type", "d", "-exec", "rmdir", "{}", ";"])
                    .status();
            }
        }
    }
}

fn down() -> anyhow::Result<()> {
    if !cmd::is_root() {
        bail!("cluster down must run as root");
    }
    let nodes = recorded_nodes().unwrap_or(9);
    for n in 1..=nodes {
        stop_agent(n);
    }
    // dockerd stops the containers, the stack's agents among them, before their pins go.
    for n in (1..=nodes).rev() {
        if node_dir(n).exists() {
            stop_node(n);
        }
    }
    for n in 1..=nodes {
        uninstall_agent(n);
    }
    for ns in (1..=nodes)
        .map(|n| format!("mc-n{n}"))
        .chain([CLIENT_NS.to_string(), UL.to_string()])
    {
        let _ = Command::new("ip")
            .args(["netns", "del", &ns])
            .stderr(Stdio::null())
            .status();
    }
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    for n in 1..=nodes {
        let (e, d) = (exec_root(n), data_root(n));
        let busy = mounts
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1))
            .any(|m| {
                m == e
                    || m.starts_with(&format!("{e}/"))
                    || m == d
                    || m.starts_with(&format!("{d}/"))
            });
        if busy {
            eprintln!("cluster: mounts still present under node {n}, not deleting {e} and {d}");
            continue;
        }
        let _ = std::fs::remove_dir_all(&e);
        let _ = std::fs::remove_dir_all(&d);
    }
    let _ = std::fs::remove_dir_all(ST);
    println!("cluster: down");
    Ok(())
}

/// A two-replica busybox httpd service publishing `port` (ingress mode) to its port 80.
fn create_web(name: &str, port: u16) -> anyhow::Result<()> {
    exec(
        docker(
            1,
            &["service", "create", "-d", "--name", name, "--replicas", "2"],
        )
        .args(["-p", &format!("{port}:80"), "--no-resolve-image", IMAGE])
        .args(["httpd", "-f", "-p", "80", "-h", "/www"])
        .stdout(Stdio::null()),
    )
}

/// The HTTP status the client gets from node `n`'s `port` ("" if none).
fn http_code(n: u32, port: u16, timeout_s: u32) -> String {
    output(
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{CLIENT_NS}"))
            .args(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}"])
            .args(["--max-time", &timeout_s.to_string()])
            .arg(format!("http://{}:{port}/", node_addr(n))),
    )
    .unwrap_or_default()
}

/// Starts `mesh-agent --from-docker` in node `n` (dockerd's mount and network
/// namespaces, where the task sandboxes are), records its PID, waits until it says the datapath is attached.
fn start_agent(n: u32, agent: &Path, object: &Path) -> anyhow::Result<u32> {
    if !agent.is_file() || !object.is_file() {
        bail!(
            "{} or {} missing: run `cargo xtask build`",
            agent.display(),
            object.display()
        );
    }
    let pid = dockerd_pid(n)
        .with_context(|| format!("node {n} is not up"))?
        .to_string();
    let pins = agent_pins(n);
    let log_path = node_dir(n).join("mesh-agent.log");
    // Appended: a restarted agent's log follows its predecessor's.
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)?;
    let ready_before = std::fs::read_to_string(&log_path)
        .unwrap_or_default()
        .matches("datapath attached")
        .count();
    let mut port = Vec::new();
    if let Ok(p) = std::fs::read_to_string(Path::new(ST).join(ST_DIR_DATA_PATH_PORT)) {
        port = vec!["--data-path-port".to_string(), p.trim().to_string()];
    }
    let child = Command::new("nsenter")
        .args(["-t", &pid, "-m", "-n", "--"])
        .arg(agent)
        .args(["--from-docker", "--docker", &sock(n)])
        .args(&port)
        // A cluster to try the mesh on: `meshctl trace --node` works between its nodes.
        .arg("--serve-traces")
        .args(["--bpffs", &pins])
        .env("MESH_BPF_OBJECT", object)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?;
    let agent_pid = child.id();
    std::fs::write(node_dir(n).join("mesh-agent.pid"), agent_pid.to_string())?;
    std::mem::forget(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        if text.matches("datapath attached").count() > ready_before {
            break;
        }
        if !alive(agent_pid) || Instant::now() > deadline {
            bail!(
                "mesh-agent on node {n} did not start: see {}",
                log_path.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(agent_pid)
}

/// Node `n`'s pins: the same for the agent run by `cluster agent` and the one run by the
/// stack (`MESH_BPFFS=/sys/fs/bpf/mesh-{{.Node.Hostname}}`), so `down` removes both.
fn agent_pins(n: u32) -> String {
    format!("/sys/fs/bpf/mesh-mc-n{n}")
}

/// Removes node `n`'s pinned datapath (after its agent stopped).
fn uninstall_agent(n: u32) {
    let (agent, _) = agent_paths();
    let pins = agent_pins(n);
    if !Path::new(&pins).exists() {
        return;
    }
    let ok = Command::new(&agent)
        .args(["--uninstall", "--bpffs", &pins])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        // No agent binary at hand: the pins are ours all the same.
        let _ = std::fs::remove_dir_all(&pins);
        let _ = std::fs::remove_file(format!("/run/mesh/mesh-mc-n{n}.names.json"));
        let _ = std::fs::remove_file(format!("/run/mesh/mesh-mc-n{n}.status.json"));
    }
}

/// Stops node `n`'s mesh-agent (SIGTERM, by its recorded PID, if it is still ours).
fn stop_agent(n: u32) {
    let Some(pid) = read_pid(&node_dir(n).join("mesh-agent.pid")) else {
        return;
    };
    kill_checked(pid, "mesh-agent", libc::SIGTERM);
    if !wait_gone(pid, 10) {
        kill_checked(pid, "mesh-agent", libc::SIGKILL);
        wait_gone(pid, 5);
    }
    let _ = std::fs::remove_file(node_dir(n).join("mesh-agent.pid"));
}
