//! The agent's life: signals, the first model, the datapath loaded and attached, the
//! servers (metrics, peers), then the loop of Docker events, resyncs, quick checks and
//! signals, each ending in an apply.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context;
use aya::programs::XdpMode;
use mesh_common::config::MeshConfig;

use crate::{
    agent::metrics::{self, AgentMetrics},
    datapath::loader,
    datapath::mesh::Mesh,
    datapath::pins::{Hook, PinDir, Sizes},
    host::preflight,
    model,
    source::docker,
    source::swarm,
};

use super::*;
use crate::source::from_docker::*;

pub(super) struct Agent {
    pub(super) mesh: Mesh,
    /// The host port, when on.
    pub(super) host: Option<crate::host::hostport::HostPorts>,
    /// Docker's netns directory (its containers' namespaces: the host port serves them
    /// all), with --from-docker.
    pub(super) docker_netns: Option<PathBuf>,
    /// More namespaces the host port serves (`--host-netns`).
    pub(super) host_netns: Vec<PathBuf>,
    pub(super) pins: PinDir,
    pub(super) attached: BTreeSet<String>,
    /// Tasks' overlay veths with the overlay hooks, and their link pins.
    pub(super) overlay: BTreeMap<model::OverlayPortSpec, Vec<PathBuf>>,
    pub(super) metrics: Arc<Mutex<AgentMetrics>>,
    /// Where `meshctl status` reads how the agent is doing, and what it says there.
    pub(super) status_file: PathBuf,
    pub(super) status: crate::agent::state::AgentStatus,
    /// The listening sockets on published ports last looked at, and their owners.
    pub(super) port_owners: (BTreeSet<u64>, BTreeMap<u64, (u32, String)>),
}

pub(super) async fn agent(args: Flags, pins: PinDir) -> anyhow::Result<()> {
    // Signals first: a SIGTERM during start-up must not kill us half-attached.
    use tokio::signal::unix::{signal, SignalKind};
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sighup = signal(SignalKind::hangup())?;
    // `meshctl doctor --fix`: the maps drifted from what this agent wrote; re-read them.
    let mut sigusr1 = signal(SignalKind::user_defined1())?;

    // Drains an earlier agent began (a restart, an upgrade) are finished, not cut.
    let (mut drain_file, drains) = crate::agent::state::DrainFile::open(
        crate::agent::state::draining_path(&args.state_dir, &args.bpffs),
    );
    let (mut source, model) = match (&args.config, args.from_docker) {
        (Some(p), _) => (None, read_model(p)?),
        (None, true) => {
            let (s, m) = first_docker_model(
                &args.docker,
                Duration::from_millis(args.drain_ms),
                args.warmup_ms,
                args.peer_port,
                args.docker_netns.clone(),
                drains,
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
    let features = crate::datapath::features::Features::detect(args.tc_attach)?;
    // Without namespace cookies the socket programs cannot be scoped: the host port
    // stays off (a named fallback, in the status).
    let host_ports = if features.has(crate::datapath::features::Feature::NetnsCookie) {
        args.host_ports
    } else {
        Switch::Off
    };
    if host_ports == Switch::On {
        preflight::require_link_local("--host-addr", args.host_addr)?;
    }
    let cfg = MeshConfig {
        vxlan_port: data_path_port,
        // For the datapath's own MTU check where the kernel has no bpf_check_mtu (read
        // at load: a changed MTU takes a restart of the agent).
        underlay_mtu: crate::host::netdev::mtu(&underlay)
            .map_or(0, |m| m.min(u32::from(u16::MAX)) as u16),
        host_addr: match host_ports {
            Switch::On => u32::from_ne_bytes(args.host_addr.octets()),
            Switch::Off => 0,
        },
        ..MeshConfig::DEFAULT
    };
    let sizes = Sizes {
        maglev_slots: args
            .maglev_slots
            .or_else(|| pins.entries(mesh_common::maps::MAGLEV.name))
            .unwrap_or(mesh_common::maps::MAGLEV.entries),
        // An upgrade keeps the conntrack it finds (and its flows) unless told otherwise.
        ct_entries: args
            .ct_entries
            .or_else(|| pins.entries(mesh_common::maps::CONNTRACK.name))
            .unwrap_or(mesh_common::maps::CONNTRACK_AGENT_ENTRIES),
    };
    let (mut dp, adopt) = loader::Datapath::load_pinned(&object, &cfg, &pins, sizes, features)?;
    let fallbacks = dp.features().fallbacks();
    // The datapath log's records (written only while `meshctl log on`) into this log.
    match crate::datapath::log::Reader::take(&mut dp) {
        Ok(reader) => {
            tokio::spawn(reader.run());
        }
        Err(e) => tracing::warn!("the datapath log cannot be read: {e}"),
    }
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
            crate::host::hostport::remove_device()?;
            None
        }
        Switch::On => {
            let node = source
                .as_ref()
                .and_then(|s| s.me)
                .or(model.node.as_ref().map(|n| n.addr))
                .or(model.node_addrs.first().copied())
                .or(crate::host::netdev::ipv4_of(&underlay).first().copied())
                .with_context(|| {
                    format!(
                        "host ports need this node's address: {underlay} has none and the \
                         config sets no `node:`; add one, or pass --host-ports off"
                    )
                })?;
            let h = crate::host::hostport::HostPorts::setup(
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
    let (mut mesh, adopted) = Mesh::pinned(dp, names_file(&args), adopt)?;
    mesh.reserved = crate::model::Reserved::new(data_path_port, args.peer_port);
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
        let trace = args
            .serve_traces
            .then(|| crate::source::peers::TraceAccess {
                state_dir: args.state_dir.clone(),
                bpffs: args.bpffs.clone(),
                allowed: src.trace_allowed.clone(),
            });
        // On a thread of its own: an apply blocks this runtime (seconds, for a large
        // install), and a peer that does not answer is taken for a dead node.
        let listener = l.into_std().context("the peer listener")?;
        let report = src.report.clone();
        std::thread::Builder::new()
            .name("peer-server".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a runtime for the peer server");
                rt.block_on(async move {
                    match tokio::net::TcpListener::from_std(listener) {
                        Ok(l) => crate::source::peers::serve(l, report, trace).await,
                        Err(e) => tracing::error!("the peer server cannot listen: {e}"),
                    }
                });
            })
            .context("starting the peer server's thread")?;
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
        status_file: crate::agent::state::status_path(&args.state_dir, &args.bpffs),
        status: crate::agent::state::AgentStatus {
            pid: std::process::id(),
            pid_ns: crate::agent::state::own_pid_ns(),
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
                    drain_file.save(&src.drain.draining(Instant::now(), SystemTime::now()));
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
