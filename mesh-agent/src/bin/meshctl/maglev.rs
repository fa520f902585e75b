//! `meshctl maglev`: how a service's Maglev table spreads new flows.

use super::*;

pub(crate) fn maglev(args: &Args, service: &str) -> anyhow::Result<()> {
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
