//! `meshctl status`: the agent, where the programs are attached, what the maps hold.

use super::*;

/// `meshctl status`: 0 when the agent runs, 3 when it does not (the pinned datapath
/// may still forward), 4 when nothing is pinned, 6 with `max_age` when the agent has
/// not reconciled within it or a map is missing.
pub(crate) fn status(args: &Args, max_age: Option<f64>) -> anyhow::Result<i32> {
    let pins = PinDir::new(&args.bpffs);
    if !pins.has_maps() {
        return Err(MeshError::NotPinned {
            path: args.bpffs.clone(),
        }
        .into());
    }
    let missing: Vec<&str> = mesh_agent::datapath::pins::PINNED_MAPS
        .iter()
        .copied()
        .filter(|m| !pins.map(m).exists())
        .collect();
    let st = agent_status(args);
    let live = st
        .as_ref()
        .and_then(mesh_agent::agent::state::live_agent_pid);
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
            let present = present
                && (l.kind == mesh_agent::datapath::pins::LinkKind::Link || program_id.is_some());
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
    let entries = mesh_agent::datapath::conntrack::read_conntrack(&args.bpffs)?;
    let capacity = mesh_agent::datapath::conntrack::conntrack_capacity(&args.bpffs)?;
    let flows = inspect::flows(
        &entries,
        mesh_agent::datapath::conntrack::monotonic_ns(),
        &Default::default(),
    )
    .len();
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

pub(crate) fn ms(s: Option<f64>) -> String {
    s.map_or("-".into(), |v| format!("{:.0} ms", v * 1e3))
}
