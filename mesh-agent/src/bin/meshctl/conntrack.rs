//! `meshctl conntrack` and `conntrack flush`: live flows, and removing a service's.

use super::*;

pub(crate) fn conntrack(
    args: &Args,
    service: Option<&str>,
    backend: Option<std::net::Ipv4Addr>,
) -> anyhow::Result<()> {
    let names = mesh_agent::agent::state::read_names(&mesh_agent::agent::state::names_path(
        &args.state_dir,
        &args.bpffs,
    ));
    let entries = mesh_agent::datapath::conntrack::read_conntrack(&args.bpffs)?;
    let mut flows = inspect::flows(
        &entries,
        mesh_agent::datapath::conntrack::monotonic_ns(),
        &names,
    );
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

pub(crate) fn flush(args: &Args, service: &str, yes: bool) -> anyhow::Result<()> {
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
        total += mesh_agent::datapath::conntrack::flush_service(&args.bpffs, s.id)
            .with_context(|| format!("flushing {}", s.name))?;
    }
    if args.json {
        return print_json(&serde_json::json!({ "services": names, "flows_flushed": total }));
    }
    println!("flushed {total} flows of {}", names.join(", "));
    Ok(())
}
