//! mesh-agent: loads the datapath, attaches it to the underlay interface (and to each
//! local task's veth), makes the maps match the model of `--config FILE`, and keeps them
//! so until SIGINT/SIGTERM; SIGHUP re-reads the file. (The Docker source arrives with the
//! agent issue.)

#![allow(clippy::result_large_err)] // aya errors by value, on cold paths

use std::path::PathBuf;

use anyhow::Context;
use aya::programs::XdpMode;
use clap::{Parser, ValueEnum};
use mesh_agent::{loader, mesh::Mesh, model, preflight};
use mesh_common::config::MeshConfig;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Xdp {
    /// No XDP program (TC only; the right choice on veth).
    Off,
    /// Native (driver) XDP.
    Native,
    /// Generic (skb) XDP.
    Generic,
}

#[derive(Parser, Debug)]
#[command(version, about = "The mesh's node agent")]
struct Args {
    /// Underlay interface (the one carrying the swarm's advertise address); default: the
    /// config file's `underlay`.
    #[arg(long)]
    interface: Option<String>,
    /// Static model of services, backends and local endpoints (YAML; see README).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Also attach the XDP program to the underlay interface.
    #[arg(long, value_enum, default_value = "off")]
    xdp: Xdp,
    /// Directory on bpffs where maps are pinned.
    #[arg(long, default_value = "/sys/fs/bpf/mesh")]
    bpffs: PathBuf,
    /// VXLAN data-path port (as `docker swarm init --data-path-port`).
    #[arg(long, default_value_t = mesh_common::proto::VXLAN_PORT_DEFAULT,
          value_parser = clap::value_parser!(u16).range(1..))]
    data_path_port: u16,
    /// eBPF object (default: $MESH_BPF_OBJECT, next to this binary, /usr/local/lib/mesh).
    #[arg(long)]
    object: Option<PathBuf>,
    /// Docker socket (the Swarm this node is in).
    #[arg(long, default_value = "unix:///var/run/docker.sock")]
    docker: String,
    /// Print the model of this node that the Swarm implies (YAML, the --config format)
    /// and exit, with this node's tasks' delivery veths found in their sandboxes.
    #[arg(long)]
    print_docker_model: bool,
    /// Follow the Swarm: derive the model from Docker (as --print-docker-model) and apply
    /// it, again every --resync-ms and on SIGHUP. (Docker events come next.)
    #[arg(long, conflicts_with = "config")]
    from_docker: bool,
    /// Resync period with --from-docker, milliseconds.
    #[arg(long, default_value_t = 2000)]
    resync_ms: u64,
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MESH_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if let Err(e) = run(Args::parse()) {
        // One line, the whole chain: what failed and why.
        eprintln!("mesh-agent: {e:#}");
        std::process::exit(1);
    }
}

/// The first model from Docker: retried with backoff (and said so) until Docker answers,
/// since the agent may start before dockerd.
fn first_docker_model(
    rt: &tokio::runtime::Runtime,
    socket: &str,
) -> (bollard::Docker, model::Model) {
    let mut wait = std::time::Duration::from_millis(500);
    loop {
        let attempt = rt
            .block_on(mesh_agent::docker::connect(socket))
            .map_err(anyhow::Error::from)
            .and_then(|d| docker_model(rt, &d).map(|m| (d, m)));
        match attempt {
            Ok(dm) => return dm,
            Err(e) => {
                tracing::warn!("waiting for Docker ({e:#}); retrying in {wait:?}");
                std::thread::sleep(wait);
                wait = (wait * 2).min(std::time::Duration::from_secs(10));
            }
        }
    }
}

fn read_model(path: &std::path::Path) -> anyhow::Result<model::Model> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    model::from_yaml(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

fn print_docker_model(socket: &str) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let docker = rt.block_on(mesh_agent::docker::connect(socket))?;
    print!("{}", model::to_yaml(&docker_model(&rt, &docker)?));
    Ok(())
}

/// The model of this node that the Swarm implies, with its tasks' veths.
fn docker_model(
    rt: &tokio::runtime::Runtime,
    docker: &bollard::Docker,
) -> anyhow::Result<model::Model> {
    let (me, networks) = rt.block_on(mesh_agent::docker::snapshot(docker))?;
    let underlay = mesh_agent::netdev::interface_with_addr(me)
        .with_context(|| format!("no interface holds this node's swarm address {me}"))?;
    let mut model = mesh_agent::swarm::model_from(&networks, me, &underlay);
    let local: std::collections::BTreeSet<_> = model
        .services
        .iter()
        .flat_map(|s| &s.backends)
        .filter(|b| b.node.is_none())
        .map(|b| b.addr)
        .collect();
    model.endpoints = rt.block_on(mesh_agent::docker::local_endpoints(docker, &local))?;
    Ok(model)
}

fn run(args: Args) -> anyhow::Result<()> {
    if args.print_docker_model {
        return print_docker_model(&args.docker);
    }
    preflight::require_root("mesh-agent loads eBPF programs")?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (docker, model) = match (&args.config, args.from_docker) {
        (Some(p), _) => (None, read_model(p)?),
        (None, true) => {
            let (d, m) = first_docker_model(&rt, &args.docker);
            (Some(d), m)
        }
        (None, false) => (None, model::Model::default()),
    };
    let Some(underlay) = args.interface.clone().or_else(|| model.underlay.clone()) else {
        anyhow::bail!("no underlay interface: pass --interface or set `underlay:` in the config");
    };
    preflight::require_bpffs(&args.bpffs)?;
    preflight::ifindex(&underlay)?;
    let object = match &args.object {
        Some(p) => p.clone(),
        None => loader::find_object()?,
    };
    let cfg = MeshConfig {
        vxlan_port: args.data_path_port,
        ..MeshConfig::DEFAULT
    };
    // Block the signals before any thread exists so sigwait below receives them.
    let set = signals();
    let mut dp = loader::Datapath::load(&object, &cfg)?;
    dp.attach_tc_ingress(&underlay)?;
    match args.xdp {
        Xdp::Off => {}
        Xdp::Native => dp.attach_xdp(&underlay, XdpMode::Driver)?,
        Xdp::Generic => dp.attach_xdp(&underlay, XdpMode::Skb)?,
    }
    let mut mesh = Mesh::new(dp);
    let mut attached = std::collections::BTreeSet::new();
    apply(&mut mesh, &model, &mut attached)?;
    let pins = mesh.pin(&args.bpffs)?;
    tracing::info!(
        object = %object.display(),
        interface = %underlay,
        xdp = ?args.xdp,
        data_path_port = args.data_path_port,
        pinned = %args.bpffs.display(),
        "datapath attached"
    );
    loop {
        let period = libc::timespec {
            tv_sec: (args.resync_ms / 1000) as libc::time_t,
            tv_nsec: ((args.resync_ms % 1000) * 1_000_000) as libc::c_long,
        };
        // SAFETY: `set` is an initialised sigset; a null siginfo is allowed.
        let sig = if args.from_docker {
            unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &period) }
        } else {
            let mut sig: libc::c_int = 0;
            unsafe { libc::sigwait(&set, &mut sig) };
            sig
        };
        if sig > 0 && sig != libc::SIGHUP {
            tracing::info!(signal = sig, "detaching and exiting");
            break;
        }
        if let Some(docker) = &docker {
            // A Docker hiccup is reported and the running state kept.
            match docker_model(&rt, docker).and_then(|m| apply(&mut mesh, &m, &mut attached)) {
                Ok(()) => {}
                Err(e) => {
                    tracing::warn!("resync from Docker failed, keeping the previous state: {e:#}")
                }
            }
            continue;
        }
        let Some(path) = &args.config else { continue };
        // A bad file is reported and the running state kept.
        match read_model(path).and_then(|m| apply(&mut mesh, &m, &mut attached)) {
            Ok(()) => {}
            Err(e) => tracing::error!(
                "reload of {} failed, keeping the previous state: {e:#}",
                path.display()
            ),
        }
    }
    for p in pins {
        std::fs::remove_file(&p).with_context(|| format!("unpinning {}", p.display()))?;
    }
    // The pin directory goes too if nothing else is in it.
    let _ = std::fs::remove_dir(&args.bpffs);
    Ok(())
}

/// Attaches the task program to new endpoints' interfaces, then applies the model.
fn apply(
    mesh: &mut Mesh,
    model: &model::Model,
    attached: &mut std::collections::BTreeSet<String>,
) -> anyhow::Result<()> {
    for ep in &model.endpoints {
        if !attached.contains(&ep.interface) {
            mesh.dp.attach_tc_task(&ep.interface)?;
            attached.insert(ep.interface.clone());
        }
    }
    let a = mesh.apply(model)?;
    if a.ops == 0 {
        return Ok(());
    }
    tracing::info!(
        services = model.services.len(),
        endpoints = model.endpoints.len(),
        ops = a.ops,
        writes = a.writes,
        "model applied"
    );
    Ok(())
}

fn signals() -> libc::sigset_t {
    // SAFETY: plain libc signal-set manipulation on a local.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGHUP);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}
