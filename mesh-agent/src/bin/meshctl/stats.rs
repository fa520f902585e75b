//! `meshctl stats`: packets and bytes by hook and reason, and per service.

use super::*;

/// Per-service totals (packets, bytes, flows) from the per-backend counters.
pub(crate) fn per_service(args: &Args) -> anyhow::Result<BTreeMap<String, (u64, u64, u64)>> {
    let mut out = BTreeMap::new();
    for s in all_services(args)? {
        let t = s.backends.iter().fold((0, 0, 0), |a, b| {
            (a.0 + b.packets, a.1 + b.bytes, a.2 + b.flows)
        });
        out.insert(s.name, t);
    }
    Ok(out)
}

pub(crate) fn stats(
    args: &Args,
    watch: bool,
    interval: f64,
    count: Option<u64>,
) -> anyhow::Result<()> {
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
pub(crate) fn print_reasons(snap: &Snapshot, rate_secs: f64) {
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

pub(crate) fn print_services(
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
