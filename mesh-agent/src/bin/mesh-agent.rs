//! mesh-agent: loads the datapath, attaches it to the underlay interface and keeps it
//! there until SIGINT/SIGTERM. (The Docker-driven control loop arrives with the agent
//! issue; today the agent is the loader.)

use std::path::PathBuf;

use anyhow::Context;
use aya::programs::XdpMode;
use clap::{Parser, ValueEnum};
use mesh_agent::{loader, preflight};
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
    /// Underlay interface (the one carrying the swarm's advertise address).
    #[arg(long)]
    interface: String,
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
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MESH_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run(Args::parse()) {
        // One line, the whole chain: what failed and why.
        eprintln!("mesh-agent: {e:#}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    preflight::require_root("mesh-agent loads eBPF programs")?;
    preflight::require_bpffs(&args.bpffs)?;
    preflight::ifindex(&args.interface)?;
    let object = match args.object {
        Some(p) => p,
        None => loader::find_object()?,
    };
    let cfg = MeshConfig {
        vxlan_port: args.data_path_port,
        ..MeshConfig::DEFAULT
    };
    // Block the signals before any thread exists so sigwait below receives them.
    let set = termination_signals();
    let mut dp = loader::Datapath::load(&object, &cfg)?;
    dp.attach_tc_ingress(&args.interface)?;
    match args.xdp {
        Xdp::Off => {}
        Xdp::Native => dp.attach_xdp(&args.interface, XdpMode::Driver)?,
        Xdp::Generic => dp.attach_xdp(&args.interface, XdpMode::Skb)?,
    }
    let pin = dp.pin_stats(&args.bpffs)?;
    tracing::info!(
        object = %object.display(),
        interface = %args.interface,
        xdp = ?args.xdp,
        data_path_port = args.data_path_port,
        counters = %pin.display(),
        "datapath attached"
    );
    let mut sig: libc::c_int = 0;
    // SAFETY: `set` is an initialised sigset; `sig` is a valid out-pointer.
    unsafe { libc::sigwait(&set, &mut sig) };
    tracing::info!(signal = sig, "detaching and exiting");
    std::fs::remove_file(&pin).with_context(|| format!("unpinning {}", pin.display()))?;
    Ok(())
}

fn termination_signals() -> libc::sigset_t {
    // SAFETY: plain libc signal-set manipulation on a local.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}
