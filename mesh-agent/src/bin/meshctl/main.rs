//! meshctl: see and explain what the mesh is doing. Reads the pinned maps directly, so
//! everything works while the agent is down; read-only unless a subcommand says
//! otherwise (`conntrack flush`, `log on|off`).
//!
//! Exit codes: 0 fine; 1 an error (one line); 2 bad usage; 3 `status`: the agent is not
//! running (the datapath may still be forwarding); 4 no mesh is pinned there; 6 `status
//! --max-age`: the agent runs but has not reconciled for that long, or a map is missing.

#![allow(clippy::result_large_err)] // aya errors by value, on cold paths

use std::{
    collections::BTreeMap,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::Context;
use clap::{Parser, Subcommand};
use mesh_agent::{
    ctl::inspect::{self, ServiceView},
    datapath::pins::PinDir,
    datapath::stats::Snapshot,
    host::preflight,
    MeshError,
};
use mesh_common::reason::Kind;

mod conntrack;
mod doctor;
mod log;
mod maglev;
mod services;
mod stats;
mod status;
mod trace;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "See and explain what the mesh is doing",
    long_about = "See and explain what the mesh is doing. Reads the maps the agent pinned, so \
                  it works while the agent is down. Exit codes: 0 fine, 1 error, 2 usage, 3 \
                  agent not running (status), 4 no mesh pinned, 5 doctor found a failing check, \
                  6 agent stalled or a map missing (status --max-age)."
)]
struct Args {
    /// Directory on bpffs where the agent pins its maps (the agent's --bpffs).
    #[arg(
        long,
        global = true,
        default_value = "/sys/fs/bpf/mesh",
        env = "MESH_BPFFS"
    )]
    bpffs: PathBuf,
    /// The agent's --state-dir (service names, the agent's status).
    #[arg(
        long,
        global = true,
        default_value = "/run/mesh",
        env = "MESH_STATE_DIR"
    )]
    state_dir: PathBuf,
    /// Machine-readable output.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Is the agent up, where are the programs attached, what do the maps hold.
    Status {
        /// A health check: exit 6 unless the agent reconciled within this many seconds
        /// and every map is pinned (the stack's HEALTHCHECK uses it; an agent following
        /// Docker reconciles every --resync-ms, one with --config only on a change).
        #[arg(long)]
        max_age: Option<f64>,
    },
    /// Every service: frontends and backends.
    Services,
    /// One service (its name, or its Docker service's: `web`): frontends, and backends
    /// with their state, where they run, their share of new flows and their traffic.
    Service { name: String },
    /// Live flows: client, frontend, backend, state, age and idle time.
    Conntrack {
        /// Only this service's flows.
        #[arg(long)]
        service: Option<String>,
        /// Only flows to this backend address.
        #[arg(long)]
        backend: Option<std::net::Ipv4Addr>,
        #[command(subcommand)]
        action: Option<CtAction>,
    },
    /// Packets and bytes by hook and reason, and per service; `--watch` shows rates.
    Stats {
        #[arg(long)]
        watch: bool,
        /// Seconds between two views with --watch.
        #[arg(long, default_value_t = 1.0)]
        interval: f64,
        /// Stop after this many views with --watch (default: until interrupted).
        #[arg(long)]
        count: Option<u64>,
    },
    /// How a service's Maglev table spreads new flows over its backends.
    Maglev { service: String },
    /// A synthetic first packet from a client through the program on this node's
    /// underlay (BPF_PROG_TEST_RUN: nothing on the wire, its conntrack entries removed
    /// after): the verdict, the backend chosen and why, the rewritten headers and, if it
    /// leaves the node, the VXLAN header around it.
    Trace {
        /// The client, ADDR:PORT.
        #[arg(long)]
        from: std::net::SocketAddrV4,
        /// What it reaches, ADDR:PORT (a node address and a published port).
        #[arg(long)]
        to: std::net::SocketAddrV4,
        #[arg(long, value_enum, default_value = "tcp")]
        proto: mesh_agent::model::Protocol,
        /// Trace on another swarm node (its name, or its address): that node's agent runs
        /// it there and answers over the agents' port (--peer-port).
        #[arg(long)]
        node: Option<String>,
    },
    /// Checks what commonly breaks a mesh: bpffs, the agent, programs on the expected
    /// interfaces, the data-path port (taken by another socket, filtered), MTU, Docker,
    /// Docker's IPVS mesh beside this one, and drift between what the agent wrote and
    /// what the maps hold. Exit code 5 when a check fails.
    Doctor {
        /// Ask the agent to repair drift and re-attach programs (SIGUSR1: it re-reads
        /// the maps and reconciles from them), then check again.
        #[arg(long)]
        fix: bool,
        /// Docker's socket (default: the one the agent follows, else the usual one).
        #[arg(long, env = "MESH_DOCKER")]
        docker: Option<String>,
    },
    /// The datapath log on this node: `on` makes the programs write a record per new
    /// flow (its backend) and per drop (its reason), which the agent logs (target
    /// mesh::datapath); `off` (the default) stops them. Without an argument: whether it
    /// is on.
    Log { set: Option<log::Switch> },
}

#[derive(Subcommand, Debug)]
enum CtAction {
    /// Forget a service's flows (their next packets start new ones; TCP connections in
    /// the middle are reset by their backends). Asks first, unless --yes.
    Flush {
        #[arg(long)]
        service: String,
        #[arg(long)]
        yes: bool,
    },
}

fn main() {
    let args = Args::parse();
    let result = run(&args);
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("meshctl: {e:#}");
            let not_pinned = e
                .downcast_ref::<MeshError>()
                .is_some_and(|m| matches!(m, MeshError::NotPinned { .. }));
            std::process::exit(if not_pinned { 4 } else { 1 });
        }
    }
}

fn run(args: &Args) -> anyhow::Result<i32> {
    preflight::require_root("meshctl reads pinned BPF maps")?;
    match &args.cmd {
        Cmd::Status { max_age } => status::status(args, *max_age),
        Cmd::Services => services::services(args, None).map(|_| 0),
        Cmd::Service { name } => services::services(args, Some(name)).map(|_| 0),
        Cmd::Conntrack {
            service,
            backend,
            action: None,
        } => conntrack::conntrack(args, service.as_deref(), *backend).map(|_| 0),
        Cmd::Conntrack {
            action: Some(CtAction::Flush { service, yes }),
            ..
        } => conntrack::flush(args, service, *yes).map(|_| 0),
        Cmd::Stats {
            watch,
            interval,
            count,
        } => stats::stats(args, *watch, *interval, *count).map(|_| 0),
        Cmd::Maglev { service } => maglev::maglev(args, service).map(|_| 0),
        Cmd::Log { set } => log::log(args, *set).map(|_| 0),
        Cmd::Doctor { fix, docker } => {
            // Docker is checked when the agent follows it, or when asked by name.
            let ask = docker.is_some();
            let docker = docker
                .clone()
                .or_else(|| {
                    agent_status(args)
                        .map(|s| s.docker)
                        .filter(|d| !d.is_empty())
                })
                .unwrap_or_else(|| "unix:///var/run/docker.sock".into());
            doctor::doctor(args, *fix, &docker, ask)
        }
        Cmd::Trace {
            from,
            to,
            proto,
            node: None,
        } => trace::trace(args, *from, *to, *proto).map(|_| 0),
        Cmd::Trace {
            from,
            to,
            proto,
            node: Some(node),
        } => trace::trace_on(args, node, *from, *to, *proto).map(|_| 0),
    }
}

fn print_json(v: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// Every service in the pinned maps, named.
fn all_services(args: &Args) -> anyhow::Result<Vec<ServiceView>> {
    Ok(inspect::services_pinned(&args.state_dir, &args.bpffs)?)
}

/// What the agent last said in its status file.
fn agent_status(args: &Args) -> Option<mesh_agent::agent::state::AgentStatus> {
    mesh_agent::agent::state::agent_status(&args.state_dir, &args.bpffs)
}

/// The services `query` names; an error naming the known ones when none.
fn find(all: Vec<ServiceView>, query: &str) -> anyhow::Result<Vec<ServiceView>> {
    let known: Vec<String> = all.iter().map(|s| s.name.clone()).collect();
    let found: Vec<ServiceView> = all.into_iter().filter(|s| s.matches(query)).collect();
    anyhow::ensure!(
        !found.is_empty(),
        "no service {query:?} in the mesh (known: {})",
        if known.is_empty() {
            "none".to_string()
        } else {
            known.join(", ")
        }
    );
    Ok(found)
}
