//! meshctl: see and explain what the mesh is doing. Reads the pinned maps directly, so
//! everything works while the agent is down; read-only unless a subcommand says
//! otherwise (`conntrack flush`).
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
    inspect::{self, ServiceView},
    pins::PinDir,
    preflight,
    stats::Snapshot,
    MeshError,
};
use mesh_common::reason::Kind;

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
        Cmd::Status { max_age } => status(args, *max_age),
        Cmd::Services => services(args, None).map(|_| 0),
        Cmd::Service { name } => services(args, Some(name)).map(|_| 0),
        Cmd::Conntrack {
            service,
            backend,
            action: None,
        } => conntrack(args, service.as_deref(), *backend).map(|_| 0),
        Cmd::Conntrack {
            action: Some(CtAction::Flush { service, yes }),
            ..
        } => flush(args, service, *yes).map(|_| 0),
        Cmd::Stats {
            watch,
            interval,
            count,
        } => stats(args, *watch, *interval, *count).map(|_| 0),
        Cmd::Maglev { service } => maglev(args, service).map(|_| 0),
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
            doctor(args, *fix, &docker, ask)
        }
        Cmd::Trace {
            from,
            to,
            proto,
            node: None,
        } => trace(args, *from, *to, *proto).map(|_| 0),
        Cmd::Trace {
            from,
            to,
            proto,
            node: Some(node),
        } => trace_on(args, node, *from, *to, *proto).map(|_| 0),
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
fn agent_status(args: &Args) -> Option<inspect::AgentStatus> {
    inspect::agent_status(&args.state_dir, &args.bpffs)
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

fn services(args: &Args, one: Option<&str>) -> anyhow::Result<()> {
    let mut all = all_services(args)?;
    if let Some(q) = one {
        all = find(all, q)?;
    }
    if args.json {
        return print_json(&all);
    }
    if one.is_none() {
        println!(
            "{:<32} {:<40} {:>7} {:>9} {:>10}",
            "SERVICE", "FRONTENDS", "ACTIVE", "DRAINING", "FLOWS"
        );
        for s in &all {
            let count = |st: &str| s.backends.iter().filter(|b| b.state == st).count();
            let fes: Vec<String> = s.frontends.iter().map(|f| f.to_string()).collect();
            println!(
                "{:<32} {:<40} {:>7} {:>9} {:>10}",
                s.name,
                fes.join(" "),
                count("active"),
                count("draining"),
                s.backends.iter().map(|b| b.flows).sum::<u64>()
            );
        }
        return Ok(());
    }
    for s in &all {
        println!(
            "service {} (id {}): table {} slots{}, idle timeout tcp {} s, udp {} s",
            s.name,
            s.id,
            s.table_size,
            if s.affinity {
                ", client-ip affinity"
            } else {
                ""
            },
            s.tcp_idle_s,
            s.udp_idle_s
        );
        for f in &s.frontends {
            println!("  frontend {f}");
        }
        println!(
            "  {:<22} {:<32} {:<9} {:<22} {:>7} {:>10} {:>12} {:>8}",
            "BACKEND", "TASK", "STATE", "WHERE", "SHARE", "PACKETS", "BYTES", "FLOWS"
        );
        for b in &s.backends {
            let addr = match b.port {
                Some(p) => format!("{}:{p}", b.addr),
                None => format!("{}:*", b.addr),
            };
            let share = if s.table_size > 0 {
                format!("{:.1}%", 100.0 * b.slots as f64 / s.table_size as f64)
            } else {
                "-".into()
            };
            println!(
                "  {addr:<22} {:<32} {:<9} {:<22} {share:>7} {:>10} {:>12} {:>8}",
                b.task.as_deref().unwrap_or("-"),
                b.state,
                b.at,
                b.packets,
                b.bytes,
                b.flows
            );
        }
    }
    Ok(())
}

fn conntrack(
    args: &Args,
    service: Option<&str>,
    backend: Option<std::net::Ipv4Addr>,
) -> anyhow::Result<()> {
    let names = inspect::read_names(&inspect::names_path(&args.state_dir, &args.bpffs));
    let entries = inspect::read_conntrack(&args.bpffs)?;
    let mut flows = inspect::flows(&entries, inspect::monotonic_ns(), &names);
    if let Some(q) = service {
        let ids: Vec<String> = find(all_services(args)?, q)?
            .into_iter()
            .map(|s| s.name)
            .collect();
        flows.retain(|f| ids.contains(&f.service));
    }
    if let Some(b) = backend {
        let prefix = format!("{b}:");
        flows.retain(|f| f.backend.starts_with(&prefix));
    }
    if args.json {
        return print_json(&flows);
    }
    println!(
        "{:<5} {:<22} {:<22} {:<22} {:<24} {:<12} {:>8} {:>8}",
        "PROTO", "CLIENT", "FRONTEND", "BACKEND", "SERVICE", "STATE", "AGE", "IDLE"
    );
    for f in &flows {
        println!(
            "{:<5} {:<22} {:<22} {:<22} {:<24} {:<12} {:>7.1}s {:>7.1}s",
            f.proto, f.client, f.frontend, f.backend, f.service, f.state, f.age_s, f.idle_s
        );
    }
    eprintln!("{} flows", flows.len());
    Ok(())
}

fn flush(args: &Args, service: &str, yes: bool) -> anyhow::Result<()> {
    let targets = find(all_services(args)?, service)?;
    let names: Vec<&str> = targets.iter().map(|s| s.name.as_str()).collect();
    if !yes {
        use std::io::{BufRead, IsTerminal, Write};
        anyhow::ensure!(
            std::io::stdin().is_terminal(),
            "refusing to flush the flows of {} without a terminal to ask on: pass --yes",
            names.join(", ")
        );
        eprint!(
            "forget every flow of {} (established TCP connections will be reset)? [y/N] ",
            names.join(", ")
        );
        std::io::stderr().flush()?;
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line)?;
        if !matches!(line.trim(), "y" | "Y" | "yes") {
            eprintln!("nothing flushed");
            return Ok(());
        }
    }
    let mut total = 0;
    for s in &targets {
        total += inspect::flush_service(&args.bpffs, s.id)
            .with_context(|| format!("flushing {}", s.name))?;
    }
    if args.json {
        return print_json(&serde_json::json!({ "services": names, "flows_flushed": total }));
    }
    println!("flushed {total} flows of {}", names.join(", "));
    Ok(())
}

/// Per-service totals (packets, bytes, flows) from the per-backend counters.
fn per_service(args: &Args) -> anyhow::Result<BTreeMap<String, (u64, u64, u64)>> {
    let mut out = BTreeMap::new();
    for s in all_services(args)? {
        let t = s.backends.iter().fold((0, 0, 0), |a, b| {
            (a.0 + b.packets, a.1 + b.bytes, a.2 + b.flows)
        });
        out.insert(s.name, t);
    }
    Ok(out)
}

fn stats(args: &Args, watch: bool, interval: f64, count: Option<u64>) -> anyhow::Result<()> {
    if !watch {
        let snap = Snapshot::read_pinned(&args.bpffs)?;
        let svcs = per_service(args)?;
        if args.json {
            // One array: a row per (hook, reason), then a row per service.
            let mut rows: Vec<_> = snap
                .iter()
                .map(|(h, r, c)| {
                    serde_json::json!({
                        "hook": h.name(), "reason": r.name(),
                        "kind": format!("{:?}", r.kind()).to_lowercase(),
                        "packets": c.packets, "bytes": c.bytes,
                    })
                })
                .collect();
            rows.extend(svcs.iter().map(|(name, (p, b, f))| {
                serde_json::json!({ "service": name, "packets": p, "bytes": b, "flows": f })
            }));
            return print_json(&rows);
        }
        print_reasons(&snap, 0.0);
        print_services(&svcs, None, 0.0);
        return Ok(());
    }
    anyhow::ensure!(interval > 0.0, "--interval must be positive");
    let mut before = (
        Snapshot::read_pinned(&args.bpffs)?,
        per_service(args)?,
        Instant::now(),
    );
    let mut n = 0;
    while count.is_none_or(|c| n < c) {
        std::thread::sleep(Duration::from_secs_f64(interval));
        let now = (
            Snapshot::read_pinned(&args.bpffs)?,
            per_service(args)?,
            Instant::now(),
        );
        let secs = now.2.duration_since(before.2).as_secs_f64();
        let d = now.0.since(&before.0);
        if args.json {
            let rows: Vec<_> = d
                .iter()
                .map(|(h, r, c)| {
                    serde_json::json!({
                        "hook": h.name(), "reason": r.name(),
                        "packets_per_s": c.packets as f64 / secs,
                        "bytes_per_s": c.bytes as f64 / secs,
                    })
                })
                .collect();
            let svcs: BTreeMap<&String, serde_json::Value> = now
                .1
                .iter()
                .map(|(k, v)| {
                    let b = before.1.get(k).copied().unwrap_or_default();
                    (
                        k,
                        serde_json::json!({
                            "packets_per_s": v.0.saturating_sub(b.0) as f64 / secs,
                            "bytes_per_s": v.1.saturating_sub(b.1) as f64 / secs,
                            "flows_per_s": v.2.saturating_sub(b.2) as f64 / secs,
                        }),
                    )
                })
                .collect();
            println!(
                "{}",
                serde_json::json!({ "interval_s": secs, "reasons": rows, "services": svcs })
            );
        } else {
            println!("--- per second over the last {secs:.1} s");
            print_reasons(&d, secs);
            print_services(&now.1, Some(&before.1), secs);
        }
        before = now;
        n += 1;
    }
    Ok(())
}

/// Counters (totals), or, with `rate_secs > 0`, the delta `snap` as rates.
fn print_reasons(snap: &Snapshot, rate_secs: f64) {
    let per = |v: u64| {
        if rate_secs > 0.0 {
            format!("{:.1}", v as f64 / rate_secs)
        } else {
            v.to_string()
        }
    };
    println!(
        "{:<22} {:<28} {:>12} {:>14}",
        "HOOK", "REASON", "PACKETS", "BYTES"
    );
    for (h, r, c) in snap.iter() {
        let mark = if r.kind() == Kind::Drop { "!" } else { " " };
        println!(
            "{:<22} {mark}{:<27} {:>12} {:>14}",
            h.name(),
            r.name(),
            per(c.packets),
            per(c.bytes)
        );
    }
}

fn print_services(
    now: &BTreeMap<String, (u64, u64, u64)>,
    before: Option<&BTreeMap<String, (u64, u64, u64)>>,
    secs: f64,
) {
    if now.is_empty() {
        return;
    }
    println!(
        "{:<51} {:>12} {:>14} {:>10}",
        "SERVICE", "PACKETS", "BYTES", "FLOWS"
    );
    for (name, v) in now {
        let b = before
            .and_then(|b| b.get(name))
            .copied()
            .unwrap_or_default();
        let f = |x: u64, y: u64| match before {
            Some(_) => format!("{:.1}", x.saturating_sub(y) as f64 / secs),
            None => x.to_string(),
        };
        println!(
            "{name:<51} {:>12} {:>14} {:>10}",
            f(v.0, b.0),
            f(v.1, b.1),
            f(v.2, b.2)
        );
    }
}

fn maglev(args: &Args, service: &str) -> anyhow::Result<()> {
    let found = find(all_services(args)?, service)?;
    if args.json {
        let v: Vec<_> = found
            .iter()
            .map(|s| {
                serde_json::json!({
                    "service": s.name,
                    "table_size": s.table_size,
                    "backends": s.backends.iter().map(|b| serde_json::json!({
                        "addr": b.addr, "port": b.port, "state": b.state, "slots": b.slots,
                        "share": if s.table_size > 0 { b.slots as f64 / s.table_size as f64 } else { 0.0 },
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        return print_json(&v);
    }
    for s in &found {
        let active = s.backends.iter().filter(|b| b.slots > 0).count();
        println!(
            "service {}: Maglev table of {} slots over {active} backend(s) taking new flows",
            s.name, s.table_size
        );
        if s.table_size == 0 {
            println!("  (no backend takes new flows: new connections are refused)");
            continue;
        }
        let ideal = s.table_size as f64 / active.max(1) as f64;
        println!(
            "  {:<22} {:<9} {:>7} {:>7} {:>10}",
            "BACKEND", "STATE", "SLOTS", "SHARE", "VS IDEAL"
        );
        for b in &s.backends {
            let vs = if b.slots > 0 {
                format!("{:+.1}%", 100.0 * (b.slots as f64 - ideal) / ideal)
            } else {
                "-".into()
            };
            println!(
                "  {:<22} {:<9} {:>7} {:>6.1}% {:>10}",
                b.addr,
                b.state,
                b.slots,
                100.0 * b.slots as f64 / s.table_size as f64,
                vs
            );
        }
    }
    Ok(())
}

/// `meshctl status`: 0 when the agent runs, 3 when it does not (the pinned datapath
/// may still forward), 4 when nothing is pinned, 6 with `max_age` when the agent has
/// not reconciled within it or a map is missing.
fn status(args: &Args, max_age: Option<f64>) -> anyhow::Result<i32> {
    let pins = PinDir::new(&args.bpffs);
    if !pins.has_maps() {
        return Err(MeshError::NotPinned {
            path: args.bpffs.clone(),
        }
        .into());
    }
    let missing: Vec<&str> = mesh_agent::pins::PINNED_MAPS
        .iter()
        .copied()
        .filter(|m| !pins.map(m).exists())
        .collect();
    let st = agent_status(args);
    let live = st.as_ref().and_then(mesh_agent::inspect::live_agent_pid);
    let running = live.is_some();
    let links: Vec<serde_json::Value> = pins
        .links()
        .iter()
        .map(|l| {
            let (interface, present) = if l.hook.sock() {
                (format!("cgroup inode {}", l.ifindex), true)
            } else if l.netns == 0 {
                match preflight::ifname(l.ifindex) {
                    Some(n) => (n, true),
                    None => (format!("ifindex {} (gone)", l.ifindex), false),
                }
            } else {
                (format!("ifindex {} in netns {}", l.ifindex, l.netns), true)
            };
            // A netlink filter can be deleted behind the record's back: present only if
            // the kernel still runs the mesh's program there.
            let program_id = l.program_id().ok().flatten();
            let present =
                present && (l.kind == mesh_agent::pins::LinkKind::Link || program_id.is_some());
            serde_json::json!({
                "hook": l.hook.name(), "program": l.hook.program(),
                "interface": interface, "present": present,
                "mode": l.mode(), "program_id": program_id,
            })
        })
        .collect();
    let all = all_services(args)?;
    let backends = all.iter().map(|s| s.backends.len()).sum::<usize>();
    let draining = all
        .iter()
        .flat_map(|s| &s.backends)
        .filter(|b| b.state == "draining")
        .count();
    let frontends = all.iter().map(|s| s.frontends.len()).sum::<usize>();
    let entries = inspect::read_conntrack(&args.bpffs)?;
    let capacity = inspect::conntrack_capacity(&args.bpffs)?;
    let flows = inspect::flows(&entries, inspect::monotonic_ns(), &Default::default()).len();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64();
    let age = st.as_ref().map(|s| now - s.last_reconcile_unix);
    let stalled = max_age.is_some_and(|m| age.is_none_or(|a| a > m) || !missing.is_empty());
    let code = match (running, stalled) {
        (false, _) => 3,
        (true, true) => 6,
        (true, false) => 0,
    };
    if args.json {
        print_json(&serde_json::json!({
            "agent": { "running": running, "status": st },
            "fallbacks": st.as_ref().map(|s| s.fallbacks.clone()).unwrap_or_default(),
            "layout_version": mesh_common::LAYOUT_VERSION,
            "maps_missing": missing,
            "links": links,
            "services": all.len(), "frontends": frontends, "backends": backends,
            "draining": draining, "flows": flows,
            "conntrack_entries": entries.len(), "conntrack_capacity": capacity,
        }))?;
        return Ok(code);
    }
    match (&st, running) {
        (Some(s), true) => println!(
            "agent: running (pid {}, from {}), last reconcile {:.1} s ago, {} reconciles, {} \
             Docker events, event lag p50 {} / p99 {}",
            live.unwrap_or(s.pid),
            s.source,
            now - s.last_reconcile_unix,
            s.reconciles,
            s.events,
            ms(s.event_lag_p50_s),
            ms(s.event_lag_p99_s)
        ),
        (Some(s), false) => println!(
            "agent: NOT running (last seen as pid {}, last reconcile {:.0} s ago); the pinned \
             datapath keeps forwarding what it was last told",
            s.pid,
            now - s.last_reconcile_unix
        ),
        (None, _) => println!(
            "agent: NOT running (no status in {}); the pinned datapath keeps forwarding",
            args.state_dir.display()
        ),
    }
    // (A status file from an agent before fallbacks existed records no kernel.)
    if let Some(s) = st.as_ref().filter(|s| !s.kernel.is_empty()) {
        println!(
            "kernel: {}, fallbacks in force: {}",
            s.kernel,
            if s.fallbacks.is_empty() {
                "none".to_string()
            } else {
                s.fallbacks.len().to_string()
            }
        );
        for f in &s.fallbacks {
            println!("fallback: {f}");
        }
    }
    if let Some(s) = st.as_ref().filter(|s| !s.stock_peers.is_empty()) {
        println!(
            "stock Docker nodes (no mesh agent answers; their tasks are reached through \
             Docker's overlay, SNATed): {}",
            s.stock_peers.join(", ")
        );
    }
    for p in st.iter().flat_map(|s| &s.problems) {
        println!("left out: {p}");
    }
    println!(
        "maps: layout v{} at {}{}",
        mesh_common::LAYOUT_VERSION,
        args.bpffs.display(),
        if missing.is_empty() {
            String::new()
        } else {
            format!(" (missing: {})", missing.join(", "))
        }
    );
    for l in &links {
        println!(
            "program: {} on {} ({}, {})",
            l["program"].as_str().unwrap_or(""),
            l["interface"].as_str().unwrap_or(""),
            l["hook"].as_str().unwrap_or(""),
            l["mode"].as_str().unwrap_or("")
        );
    }
    println!(
        "services: {}, frontends: {frontends}, backends: {backends} ({draining} draining), \
         flows: {flows} (conntrack {} of {} entries)",
        all.len(),
        entries.len(),
        capacity
    );
    if code == 6 {
        println!(
            "unhealthy: {}",
            if missing.is_empty() {
                format!(
                    "no reconcile for {:.0} s (more than --max-age {:.0} s): the agent is stuck",
                    age.unwrap_or(f64::INFINITY),
                    max_age.unwrap_or_default()
                )
            } else {
                format!("maps missing: {}", missing.join(", "))
            }
        );
    }
    Ok(code)
}

fn ms(s: Option<f64>) -> String {
    s.map_or("-".into(), |v| format!("{:.0} ms", v * 1e3))
}

/// One check of `meshctl doctor`.
#[derive(serde::Serialize)]
struct Check {
    check: &'static str,
    /// ok, warn or fail.
    result: &'static str,
    detail: String,
}

fn check(check: &'static str, result: &'static str, detail: impl Into<String>) -> Check {
    Check {
        check,
        result,
        detail: detail.into(),
    }
}

fn doctor(args: &Args, fix: bool, docker: &str, ask_docker: bool) -> anyhow::Result<i32> {
    let mut checks = diagnose(args, docker, ask_docker);
    if fix {
        let st = agent_status(args);
        let (Some(st), Some(pid)) = (
            st.clone(),
            st.as_ref().and_then(mesh_agent::inspect::live_agent_pid),
        ) else {
            anyhow::bail!(
                "--fix asks the agent to repair, and no agent is running: start mesh-agent"
            );
        };
        let before = st.last_reconcile_unix;
        // SAFETY: a signal to the running mesh-agent named in its own status file (its
        // command name checked just above).
        unsafe { libc::kill(pid as i32, libc::SIGUSR1) };
        let t = Instant::now();
        // The agent re-reads the maps on the signal and reconciles on its next turn.
        while t.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(200));
            if agent_status(args).is_some_and(|s| s.last_reconcile_unix > before + 0.0) {
                std::thread::sleep(Duration::from_millis(200));
                break;
            }
        }
        checks = diagnose(args, docker, ask_docker);
    }
    let failed = checks.iter().any(|c| c.result == "fail");
    if args.json {
        print_json(&checks)?;
    } else {
        for c in &checks {
            let mark = match c.result {
                "ok" => "ok  ",
                "warn" => "WARN",
                _ => "FAIL",
            };
            println!("{mark} {:<16} {}", c.check, c.detail);
        }
    }
    Ok(if failed { 5 } else { 0 })
}

/// The kernel the agent loaded on, and the fallbacks in force there: expected on an
/// older kernel (ok), a warning where they were forced (tests, not production).
fn kernel_check(st: &inspect::AgentStatus) -> Check {
    use mesh_agent::features::Why;
    let kernel = if st.kernel.is_empty() {
        "this kernel".to_string()
    } else {
        format!("Linux {}", st.kernel)
    };
    if st.fallbacks.is_empty() {
        return check(
            "kernel",
            "ok",
            format!("{kernel}: every feature the datapath uses, no fallback in force"),
        );
    }
    let list = st
        .fallbacks
        .iter()
        .map(|f| f.to_string())
        .collect::<Vec<_>>()
        .join("; ");
    if st.fallbacks.iter().any(|f| f.why == Why::Forced) {
        check(
            "kernel",
            "warn",
            format!(
                "{kernel}: fallbacks in force: {list}; forced ones come from \
                 MESH_FORCE_FALLBACKS or --tc-attach netlink (for tests)"
            ),
        )
    } else {
        check(
            "kernel",
            "ok",
            format!("{kernel}: fallbacks in force: {list}"),
        )
    }
}

/// Published ports that a process of this node also listens on: looked up here (meshctl
/// on the host sees every process) and as the agent saw them.
fn ports_check(st: &inspect::AgentStatus) -> Check {
    use mesh_agent::{listeners, model::Protocol};
    let published: listeners::Published = st
        .published
        .iter()
        .filter_map(|(k, v)| {
            let (port, proto) = k.split_once('/')?;
            let proto = match proto {
                "tcp" => Protocol::Tcp,
                "udp" => Protocol::Udp,
                _ => return None,
            };
            let (svc, mode) = v.split_once(' ').unwrap_or((v, "ingress"));
            let mode = if mode == "host" {
                mesh_agent::model::PublishMode::Host
            } else {
                mesh_agent::model::PublishMode::Ingress
            };
            Some(((proto, port.parse().ok()?), (svc.to_string(), mode)))
        })
        .collect();
    let mut found = listeners::scan(std::path::Path::new("/proc"), &published);
    for p in &st.ports_in_use {
        if !found
            .iter()
            .any(|f| f.port == p.port && f.protocol == p.protocol)
        {
            found.push(p.clone());
        }
    }
    if found.is_empty() {
        return check(
            "ports",
            "ok",
            format!(
                "no process of this node listens on the {} published ports",
                published.len()
            ),
        );
    }
    let list = found
        .iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join("; ");
    check("ports", "fail", list)
}

/// What the agent left out of the model (every other service is applied).
fn model_check(st: &inspect::AgentStatus) -> Check {
    if st.problems.is_empty() {
        return check("model", "ok", "every service in the model is programmed");
    }
    let list = st
        .problems
        .iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join("; ");
    check(
        "model",
        "fail",
        format!("left out (every other service is applied): {list}"),
    )
}

fn diagnose(args: &Args, docker: &str, ask_docker: bool) -> Vec<Check> {
    let mut out = Vec::new();
    let pins = PinDir::new(&args.bpffs);
    let bpffs_root = args.bpffs.parent().unwrap_or(&args.bpffs);
    out.push(if preflight::on_bpffs(bpffs_root) {
        check(
            "bpffs",
            "ok",
            format!("{} is a bpffs", bpffs_root.display()),
        )
    } else {
        check(
            "bpffs",
            "fail",
            format!(
                "{} is not a bpffs: `mount -t bpf bpf {}`",
                bpffs_root.display(),
                bpffs_root.display()
            ),
        )
    });
    if !pins.has_maps() {
        out.push(check(
            "maps",
            "fail",
            format!(
                "no mesh is pinned at {}: is mesh-agent running?",
                args.bpffs.display()
            ),
        ));
        return out;
    }
    let missing: Vec<&str> = mesh_agent::pins::PINNED_MAPS
        .iter()
        .copied()
        .filter(|m| !pins.map(m).exists())
        .collect();
    out.push(if missing.is_empty() {
        check(
            "maps",
            "ok",
            format!("layout v{}, every map pinned", mesh_common::LAYOUT_VERSION),
        )
    } else {
        check(
            "maps",
            "fail",
            format!(
                "missing: {} (mesh-agent --uninstall, then start it)",
                missing.join(", ")
            ),
        )
    });
    let st = agent_status(args);
    let live = st.as_ref().and_then(mesh_agent::inspect::live_agent_pid);
    let running = live.is_some();
    out.push(if running {
        check(
            "agent",
            "ok",
            format!("running, pid {}", live.unwrap_or_default()),
        )
    } else {
        check(
            "agent",
            "fail",
            "not running: the pinned datapath forwards what it was last told; start mesh-agent",
        )
    });
    if let Some(st) = &st {
        out.push(kernel_check(st));
        out.push(model_check(st));
        out.push(ports_check(st));
        out.push(match &st.data_path_port_mismatch {
            Some(m) => check("data-path port", "warn", m.clone()),
            None => check("data-path port", "ok", format!("{}/udp", st.data_path_port)),
        });
    }
    // Programs where the maps say traffic arrives and tasks live (a netlink filter's
    // record counts only while the kernel still runs the mesh's program there).
    let snap = mesh_agent::maps::read_pinned(&args.bpffs).ok();
    let links: Vec<mesh_agent::pins::LinkPin> = pins
        .links()
        .into_iter()
        .filter(|l| {
            l.kind == mesh_agent::pins::LinkKind::Link || l.program_id().ok().flatten().is_some()
        })
        .collect();
    let has = |hook: mesh_agent::pins::Hook, ix: u32| {
        links
            .iter()
            .any(|l| l.hook == hook && l.netns == 0 && l.ifindex == ix)
    };
    let underlay = snap
        .as_ref()
        .and_then(|s| s.local)
        .map(|l| l.ifindex)
        .or_else(|| {
            links
                .iter()
                .find(|l| l.hook == mesh_agent::pins::Hook::TcUnderlay)
                .map(|l| l.ifindex)
        });
    match underlay {
        Some(ix)
            if has(mesh_agent::pins::Hook::TcUnderlay, ix) && preflight::ifname(ix).is_some() =>
        {
            out.push(check(
                "underlay",
                "ok",
                format!(
                    "mesh_tc_ingress on {}",
                    preflight::ifname(ix).unwrap_or_default()
                ),
            ))
        }
        Some(ix) => out.push(check(
            "underlay",
            "fail",
            format!(
                "no mesh_tc_ingress on the underlay ({}): published ports and the overlay do \
                 not work here; restart mesh-agent",
                preflight::ifname(ix).unwrap_or_else(|| format!("ifindex {ix}, gone"))
            ),
        )),
        None => out.push(check(
            "underlay",
            "fail",
            "no underlay program pinned: restart mesh-agent",
        )),
    }
    if let Some(snap) = &snap {
        let bare: Vec<String> = snap
            .endpoints
            .iter()
            .filter(|(_, ep)| !has(mesh_agent::pins::Hook::TcTask, ep.ifindex))
            .map(|(a, ep)| {
                format!(
                    "{} ({})",
                    preflight::ifname(ep.ifindex)
                        .unwrap_or_else(|| format!("ifindex {}", ep.ifindex)),
                    std::net::Ipv4Addr::from(a.to_ne_bytes())
                )
            })
            .collect();
        out.push(if bare.is_empty() {
            check("tasks", "ok", format!("mesh_tc_task on all {} local task veths", snap.endpoints.len()))
        } else {
            check(
                "tasks",
                "fail",
                format!(
                    "no mesh_tc_task on {}: their replies are not translated (meshctl doctor --fix)",
                    bare.join(", ")
                ),
            )
        });
        // MTU: what the underlay leaves for Docker's overlays (VXLAN takes 50 bytes).
        if let Some(name) = underlay.and_then(preflight::ifname) {
            let mtu = mesh_agent::netdev::mtu(&name);
            out.push(match mtu {
                Some(m) if m >= 1500 => check(
                    "mtu",
                    "ok",
                    format!(
                        "{name} MTU {m}: room for overlays of {} (Docker's default 1450)",
                        m - 50
                    ),
                ),
                Some(m) => check(
                    "mtu",
                    "warn",
                    format!(
                        "{name} MTU {m} leaves {} for overlays, below Docker's default 1450: \
                         create overlays with --opt com.docker.network.driver.mtu={}",
                        m.saturating_sub(50),
                        m.saturating_sub(50)
                    ),
                ),
                None => check("mtu", "warn", format!("cannot read {name}'s MTU")),
            });
        }
    }
    // The data-path port: another socket on it, or a firewall rule dropping it.
    let port = st
        .as_ref()
        .map(|s| s.data_path_port)
        .filter(|p| *p != 0)
        .unwrap_or(4789);
    // A process's socket on the port; the kernel's own (Docker's vxlan devices) are
    // expected on a swarm node.
    let holders: Vec<(u32, String)> = ["/proc/net/udp", "/proc/net/udp6"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .flat_map(|t| inspect::udp_port_holders(&t, port))
        .flat_map(inspect::socket_owners)
        .collect();
    out.push(if holders.is_empty() {
        check(
            "data-path port",
            "ok",
            format!("UDP {port}: no process holds it"),
        )
    } else {
        check(
            "data-path port",
            "fail",
            format!(
                "UDP {port} is held by {}: another VXLAN user (Calico, NSX, ...) clashes with \
                 the mesh; free it or use another --data-path-port",
                holders
                    .iter()
                    .map(|(pid, comm)| format!("{comm} (pid {pid})"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )
    });
    if let Ok(o) = std::process::Command::new("iptables")
        .args(["-S", "INPUT"])
        .output()
    {
        let rules = String::from_utf8_lossy(&o.stdout);
        let dropped: Vec<&str> = rules
            .lines()
            .filter(|l| {
                l.contains("-p udp")
                    && l.contains(&format!("--dport {port}"))
                    && (l.contains("-j DROP") || l.contains("-j REJECT"))
            })
            .collect();
        if !dropped.is_empty() {
            out.push(check(
                "firewall",
                "warn",
                format!("iptables drops UDP {port} on INPUT ({}): Docker's own overlay traffic will not arrive", dropped.join("; ")),
            ));
        }
    }
    // Docker's IPVS mesh, as the agent saw it (it knows where Docker's namespaces are),
    // else as seen from here; and what the mesh holds.
    let dm = st
        .as_ref()
        .and_then(|s| s.docker_mesh.clone())
        .unwrap_or_else(|| {
            mesh_agent::ipvs::detect(
                std::path::Path::new("/sys"),
                std::path::Path::new("/var/run/docker/netns"),
            )
        });
    let (mut ports, mut vips) = (Vec::new(), Vec::new());
    if let Some(snap) = &snap {
        for k in snap.frontends.keys() {
            let proto = match k.proto {
                mesh_common::proto::IPPROTO_TCP => "tcp",
                mesh_common::proto::IPPROTO_UDP => "udp",
                _ => "any",
            };
            if k.addr == 0 {
                ports.push(format!("{}/{proto}", u16::from_be(k.port)));
            } else {
                vips.push(std::net::Ipv4Addr::from(u32::from_be(k.addr)).to_string());
            }
        }
    }
    ports.sort();
    ports.dedup();
    vips.sort();
    vips.dedup();
    let (fine, line) = mesh_agent::ipvs::ownership(&dm, &ports, &vips);
    out.push(check("ipvs", if fine { "ok" } else { "warn" }, line));
    if let Some(st) = &st {
        let have: Vec<mesh_agent::pins::Hook> = links.iter().map(|l| l.hook).collect();
        let want = mesh_agent::pins::Hook::SOCK
            .into_iter()
            .chain([mesh_agent::pins::Hook::TcHost]);
        let missing: Vec<&str> = want
            .filter(|h| !have.contains(h))
            .map(|h| h.name())
            .collect();
        out.push(match (&st.host_ports, missing.is_empty()) {
            (Some(h), true) => check(
                "host ports",
                "ok",
                format!(
                    "the node's own sockets and its containers' ({} namespaces) reach published \
                     ports: socket programs on {}, host port {} ({})",
                    h.namespaces,
                    h.cgroup,
                    mesh_agent::hostport::HOST_DEV,
                    h.host_addr
                ),
            ),
            (Some(_), false) => check(
                "host ports",
                "fail",
                format!(
                    "{} not attached: published ports do not answer from this node; restart \
                     mesh-agent",
                    missing.join(", ")
                ),
            ),
            (None, _) if st.fallbacks.iter().any(|f| f.feature == "netns_cookie") => check(
                "host ports",
                "warn",
                "off: this kernel has no SO_NETNS_COOKIE (Linux 5.14), which the socket \
                 programs' scope needs: published ports answer from other hosts only, not \
                 from this node or its containers",
            ),
            (None, _) => check(
                "host ports",
                "warn",
                "off (mesh-agent --host-ports off): published ports answer from other hosts \
                 only, not from this node or its containers",
            ),
        });
    }
    if ask_docker || st.as_ref().is_none_or(|s| s.source == "docker") {
        out.push(docker_check(docker));
    }
    if let Some(st) = &st {
        let views = all_services(args).unwrap_or_default();
        let d = inspect::drift(&st.applied, &views);
        out.push(if d.is_empty() {
            check(
                "drift",
                "ok",
                format!(
                    "the maps hold what the agent wrote ({} services)",
                    views.len()
                ),
            )
        } else {
            check(
                "drift",
                "fail",
                d.iter()
                    .map(|x| {
                        format!(
                            "{}: missing [{}] extra [{}]",
                            x.service,
                            x.missing.join(" "),
                            x.extra.join(" ")
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("; ")
                    + " (meshctl doctor --fix)",
            )
        });
    }
    out
}

/// Docker reachable, and in swarm mode.
fn docker_check(socket: &str) -> Check {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return check("docker", "warn", format!("cannot ask Docker: {e}")),
    };
    rt.block_on(async {
        let docker = match mesh_agent::docker::connect(socket).await {
            Ok(d) => d,
            Err(e) => return check("docker", "fail", format!("{socket}: {e}")),
        };
        match tokio::time::timeout(Duration::from_secs(5), docker.info()).await {
            Ok(Ok(info)) => {
                let state = info
                    .swarm
                    .and_then(|s| s.local_node_state)
                    .map(|s| format!("{s:?}").to_lowercase())
                    .unwrap_or_default();
                if state == "active" {
                    check("docker", "ok", format!("{socket}: swarm active"))
                } else {
                    check(
                        "docker",
                        "fail",
                        format!(
                            "{socket}: not in a swarm ({state}): `docker swarm init` or `join`"
                        ),
                    )
                }
            }
            Ok(Err(e)) => check("docker", "fail", format!("{socket}: {e}")),
            Err(_) => check("docker", "fail", format!("{socket}: no answer in 5 s")),
        }
    })
}

fn trace(
    args: &Args,
    from: std::net::SocketAddrV4,
    to: std::net::SocketAddrV4,
    proto: mesh_agent::model::Protocol,
) -> anyhow::Result<()> {
    let report = mesh_agent::trace::run(&args.state_dir, &args.bpffs, from, to, proto)?;
    if args.json {
        return print_json(&report);
    }
    print!("{}", report.render());
    Ok(())
}

/// `trace --node NAME`: the node's agent traces there; its answer is printed here.
fn trace_on(
    args: &Args,
    node: &str,
    from: std::net::SocketAddrV4,
    to: std::net::SocketAddrV4,
    proto: mesh_agent::model::Protocol,
) -> anyhow::Result<()> {
    let st = agent_status(args);
    let port = st
        .as_ref()
        .map(|s| s.peer_port)
        .filter(|p| *p != 0)
        .unwrap_or(9478);
    let socket = st
        .as_ref()
        .map(|s| s.docker.clone())
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| "unix:///var/run/docker.sock".into());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let body = rt.block_on(async {
        let addr: std::net::Ipv4Addr = match node.parse() {
            Ok(a) => a,
            Err(_) => {
                // A node name: its address from Docker (a manager's view).
                let docker = mesh_agent::docker::connect(&socket).await?;
                let n = docker.inspect_node(node).await.with_context(|| {
                    format!(
                        "cannot look up swarm node {node:?} through {socket} (names need a \
                             manager; give the node's address instead)"
                    )
                })?;
                // A manager's own record of its address is the reliable one (Docker may
                // report 0.0.0.0 in Status.Addr for managers).
                let manager = n
                    .manager_status
                    .and_then(|m| m.addr)
                    .and_then(|a| a.rsplit_once(':').map(|(h, _)| h.to_string()));
                let status = n.status.and_then(|s| s.addr);
                manager
                    .into_iter()
                    .chain(status)
                    .filter_map(|a| a.parse::<std::net::Ipv4Addr>().ok())
                    .find(|a| !a.is_unspecified() && !a.is_loopback())
                    .with_context(|| format!("swarm node {node:?} has no usable address"))?
            }
        };
        let path = format!(
            "{}?from={from}&to={to}&proto={}",
            mesh_agent::peers::TRACE_PATH,
            format!("{proto:?}").to_lowercase()
        );
        mesh_agent::http::get((addr, port).into(), &path, Duration::from_secs(10))
            .await
            .with_context(|| {
                format!(
                    "node {node} ({addr}:{port}) did not answer the trace: its agent must run \
                     with --serve-traces (and --peer-port {port}), and this node must be one of \
                     the swarm's"
                )
            })
    })?;
    let v: serde_json::Value = serde_json::from_str(&body).context("the node's answer")?;
    if let Some(e) = v["error"].as_str() {
        anyhow::bail!("node {node}: {e}");
    }
    if args.json {
        return print_json(&v["report"]);
    }
    println!("node:     {node}");
    print!("{}", v["text"].as_str().unwrap_or(""));
    Ok(())
}
