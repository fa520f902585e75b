//! `meshctl services` and `meshctl service`: every service, or one, with its frontends and backends.

use super::*;

pub(crate) fn services(args: &Args, one: Option<&str>) -> anyhow::Result<()> {
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
