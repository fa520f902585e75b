//! The bench's report: markdown tables (median, spread, ratio to direct and to the best
//! alternative), the goals marked met or not, PNG plots, the machine's facts.

use std::{fmt::Write as _, path::Path, process::Command};

use plotters::prelude::*;

use super::{contenders::Kind, median, percentile, Results, WORKLOADS};

pub fn machine_facts() -> Vec<(String, String)> {
    let sh = |cmd: &[&str]| -> String {
        Command::new(cmd[0])
            .args(&cmd[1..])
            .output()
            .map(|o| {
                let t = if o.stdout.is_empty() {
                    o.stderr
                } else {
                    o.stdout
                };
                String::from_utf8_lossy(&t)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_string()
            })
            .unwrap_or_else(|_| "not found".into())
    };
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .next()
        .unwrap_or("")
        .to_string();
    vec![
        ("date".into(), sh(&["date", "-u", "+%Y-%m-%d %H:%M UTC"])),
        ("kernel".into(), sh(&["uname", "-r"])),
        ("cpu".into(), format!("{model} x {}", sh(&["nproc"]))),
        ("memory".into(), mem.split_whitespace().skip(1).collect::<Vec<_>>().join(" ")),
        ("wrk".into(), sh(&["wrk", "-v"])),
        ("iperf3".into(), sh(&["iperf3", "--version"])),
        ("haproxy".into(), sh(&["haproxy", "-v"])),
        ("nftables".into(), sh(&["nft", "--version"])),
        ("iptables".into(), sh(&["iptables-legacy", "--version"])),
        (
            "CPU pinning".into(),
            format!(
                "load generators (wrk, iperf3 client, UDP sender) pinned to CPU {} by taskset / sched_setaffinity; servers, HAProxy and the forwarding softirq unpinned",
                super::work::LOAD_CPU
            ),
        ),
    ]
}

fn fmt(v: f64) -> String {
    if v.is_nan() {
        "-".into()
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// Higher is better for every workload figure (rates).
fn med(res: &Results, w: &str, scale: u32, k: Kind) -> f64 {
    res.runs
        .iter()
        .find(|((ww, s, kk), _)| *ww == w && *s == scale && *kk == k)
        .map_or(f64::NAN, |(_, r)| median(&r.values).0)
}

fn p99(res: &Results, w: &str, scale: u32, k: Kind) -> f64 {
    res.runs
        .iter()
        .find(|((ww, s, kk), _)| *ww == w && *s == scale && *kk == k)
        .map_or(f64::NAN, |(_, r)| median(&r.p99).0)
}

fn scales(res: &Results) -> Vec<u32> {
    let mut s: Vec<u32> = res.runs.keys().map(|(_, s, _)| *s).collect();
    s.sort();
    s.dedup();
    s
}

const ALTERNATIVES: [Kind; 3] = [Kind::Iptables, Kind::Nft, Kind::Haproxy];

pub fn write(dir: &Path, res: &Results) -> anyhow::Result<()> {
    let mut md = String::new();
    let large = res.large;
    writeln!(md, "# mesh bench\n")?;
    writeln!(
        md,
        "Side by side on one machine, in one run ({:.0} s). Every figure is the median of {} runs of {} s \
         with its spread (min-max); contenders interleaved (each round starts with the next one). \
         Ratios are the result: absolute numbers on a shared 2-core VM are noise.\n",
        res.elapsed_s, res.runs_per_figure, res.secs_per_run
    )?;
    writeln!(md, "| machine | |\n| --- | --- |")?;
    for (k, v) in &res.facts {
        writeln!(md, "| {k} | {v} |")?;
    }
    writeln!(
        md,
        "\nTopology: client namespace -> node namespace (the load balancer) -> three task \
         namespaces on veths; servers: an HTTP/1.1 keep-alive server, a UDP sink and iperf3 \
         in the tasks. Contenders (all in the node, each with its own ports, switched on one \
         at a time): **direct** (client to task 1, routed: the limit), **iptables** \
         (kube-proxy's layout, iptables-legacy: KUBE-SERVICES matched in order, `statistic \
         --mode random`, DNAT; the measured service is the last of {large}), **nftables** \
         (kube-proxy's nft layout: a `daddr . l4proto . dport` verdict map, `numgen random`, \
         DNAT), **haproxy** (TCP mode, round robin; one service only: its cost does not \
         depend on other listeners; no UDP), **mesh (tc)** (the mesh's programs on the \
         node's veths, services as published ports). XDP is not a contender here: traffic \
         from a namespace arrives as an skb, and XDP on veth only pays off for frames \
         XDP-redirected from a NIC.\n"
    )?;
    for (w, title) in WORKLOADS {
        writeln!(md, "## {title}\n")?;
        let lat = matches!(w, "conn" | "keepalive");
        if lat {
            writeln!(md, "| services | contender | median | spread | p50 µs | p99 µs | errors | vs direct | vs best alternative |")?;
            writeln!(
                md,
                "| ---: | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |"
            )?;
        } else {
            writeln!(
                md,
                "| services | contender | median | spread | vs direct | vs best alternative |"
            )?;
            writeln!(md, "| ---: | --- | ---: | --- | ---: | ---: |")?;
        }
        for scale in scales(res) {
            let direct = med(res, w, scale, Kind::Direct);
            let best_alt = ALTERNATIVES
                .iter()
                .map(|k| med(res, w, scale, *k))
                .filter(|v| !v.is_nan())
                .fold(f64::NAN, f64::max);
            for k in Kind::ALL {
                let Some(r) = res.runs.get(&(w, scale, k)) else {
                    continue;
                };
                let (m, lo, hi) = median(&r.values);
                let vs_alt = if k == Kind::Mesh {
                    fmt(m / best_alt) + "x"
                } else {
                    "".into()
                };
                if lat {
                    writeln!(
                        md,
                        "| {scale} | {} | {} | {}-{} | {} | {} | {} | {}x | {vs_alt} |",
                        k.name(),
                        fmt(m),
                        fmt(lo),
                        fmt(hi),
                        fmt(median(&r.p50).0),
                        fmt(median(&r.p99).0),
                        r.errors,
                        fmt(m / direct)
                    )?;
                } else {
                    writeln!(
                        md,
                        "| {scale} | {} | {} | {}-{} | {}x | {vs_alt} |",
                        k.name(),
                        fmt(m),
                        fmt(lo),
                        fmt(hi),
                        fmt(m / direct)
                    )?;
                }
            }
        }
        writeln!(md)?;
    }

    writeln!(
        md,
        "## Control plane at {large} services (3 backends each)\n"
    )?;
    writeln!(
        md,
        "| contender | install all | add one: p50 / p99 | remove one: p50 / p99 | ops |"
    )?;
    writeln!(md, "| --- | ---: | ---: | ---: | ---: |")?;
    for (k, add, del) in &res.churn {
        let inst = res
            .install_s
            .iter()
            .find(|(kk, _)| kk == k)
            .map_or(f64::NAN, |(_, s)| *s);
        writeln!(
            md,
            "| {} | {} s | {} / {} ms | {} / {} ms | {} |",
            k.name(),
            fmt(inst),
            fmt(percentile(add, 50.0) * 1e3),
            fmt(percentile(add, 99.0) * 1e3),
            fmt(percentile(del, 50.0) * 1e3),
            fmt(percentile(del, 99.0) * 1e3),
            add.len()
        )?;
    }
    writeln!(
        md,
        "\niptables: kube-proxy's partial sync (`iptables-restore --noflush` rewriting \
         KUBE-SERVICES whole, plus the service's chain); nftables: one chain and one map \
         element; the mesh: its planner and map writes (`Mesh::apply`) for a model with the \
         service added or removed. Docker event -> maps written is measured by the swarm \
         tests from the agents' metrics (printed by `cargo xtask test`), not here.\n"
    )?;

    writeln!(md, "## Memory: BPF map bytes per service\n")?;
    writeln!(
        md,
        "| backends | bytes per service | from |\n| ---: | ---: | --- |"
    )?;
    for (b, bytes, how) in &res.bytes_per_service {
        writeln!(md, "| {b} | {bytes:.0} | {how} |")?;
    }
    writeln!(
        md,
        "\nEntries x (key + value) as the kernel maps hold them after the install; the hash \
         maps are preallocated at their maximum size whatever is used (conntrack: 1,048,576 \
         entries), which these figures leave out.\n"
    )?;

    writeln!(
        md,
        "## Overlay: mesh vs Linux's vxlan device, across nodes\n"
    )?;
    writeln!(md, "| figure | mesh | spread | vxlan device | spread | ratio |\n| --- | ---: | --- | ---: | --- | ---: |")?;
    for (what, m, k) in &res.overlay {
        let (mm, ml, mh) = median(m);
        let (km, kl, kh) = median(k);
        writeln!(
            md,
            "| {what} | {} | {}-{} | {} | {}-{} | {}x |",
            fmt(mm),
            fmt(ml),
            fmt(mh),
            fmt(km),
            fmt(kl),
            fmt(kh),
            fmt(mm / km)
        )?;
    }

    writeln!(
        md,
        "\n## Per-packet cost of the mesh's programs (bpf_stats: run_time_ns / run_cnt)\n"
    )?;
    writeln!(md, "| workload | services | program | ns per run (median of runs) |\n| --- | ---: | --- | ---: |")?;
    for ((w, scale), v) in &res.per_packet {
        for prog in ["mesh_tc_ingress", "mesh_tc_task"] {
            let ns: Vec<f64> = v
                .iter()
                .filter(|(p, _)| p == prog)
                .map(|(_, n)| *n)
                .collect();
            if !ns.is_empty() {
                writeln!(md, "| {w} | {scale} | {prog} | {:.0} |", median(&ns).0)?;
            }
        }
    }

    writeln!(md, "\n## Goals\n")?;
    let mut goal = |what: &str, value: f64, target: &str, met: bool| {
        let _ = writeln!(
            md,
            "- {} {what}: {} (goal {target})",
            if met { "MET" } else { "NOT MET" },
            fmt(value)
        );
    };
    let c = |s: u32, k: Kind| med(res, "conn", s, k);
    for s in [1, large] {
        let r = c(s, Kind::Mesh) / c(s, Kind::Direct);
        goal(
            &format!("new-connection rate vs direct at {s} service(s)"),
            r,
            ">= 0.9x",
            r >= 0.9,
        );
    }
    let r = c(large, Kind::Mesh) / c(large, Kind::Iptables);
    goal(
        &format!("new-connection rate vs iptables at {large}"),
        r,
        ">= 2x",
        r >= 2.0,
    );
    for s in [1, large] {
        let r = p99(res, "keepalive", s, Kind::Mesh) / p99(res, "keepalive", s, Kind::Direct);
        goal(
            &format!("keep-alive p99 vs direct at {s} service(s)"),
            r,
            "<= 1.1x",
            r <= 1.1,
        );
    }
    if let Some((_, add, del)) = res.churn.iter().find(|(k, _, _)| *k == Kind::Mesh) {
        let worst = percentile(add, 99.0).max(percentile(del, 99.0)) * 1e3;
        goal(
            &format!("add/remove one service at {large}, p99 ms"),
            worst,
            "<= 5 ms",
            worst <= 5.0,
        );
    }
    if let Some((_, b, _)) = res.bytes_per_service.iter().find(|(n, _, _)| *n == 3) {
        goal(
            "map memory per service at 3 backends, KiB",
            b / 1024.0,
            "<= 16 KiB",
            *b <= 16.0 * 1024.0,
        );
    }
    if let Some((_, m, k)) = res.overlay.first() {
        let r = median(m).0 / median(k).0;
        goal(
            "overlay TCP throughput vs Linux's vxlan device",
            r,
            ">= 1.0x",
            r >= 1.0,
        );
    }
    writeln!(md, "\nPlots: ![new connections](conn.png) ![keep-alive p99](keepalive_p99.png) ![UDP](udp.png)")?;
    std::fs::write(dir.join("report.md"), md)?;

    plots(dir, res)?;
    Ok(())
}

fn plots(dir: &Path, res: &Results) -> anyhow::Result<()> {
    let font = std::fs::read("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")
        .map_err(|e| anyhow::anyhow!("DejaVuSans.ttf (fonts-dejavu-core): {e}"))?;
    let font: &'static [u8] = Box::leak(font.into_boxed_slice());
    let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, font);
    let s = scales(res);
    let series = |f: &dyn Fn(u32, Kind) -> f64| -> Vec<(Kind, Vec<(usize, f64)>)> {
        Kind::ALL
            .iter()
            .map(|k| {
                let pts = s
                    .iter()
                    .enumerate()
                    .map(|(i, sc)| (i, f(*sc, *k)))
                    .filter(|(_, v)| !v.is_nan())
                    .collect();
                (*k, pts)
            })
            .collect()
    };
    line_plot(
        &dir.join("conn.png"),
        "New TCP connections per second vs services",
        "connections/s",
        &s,
        &series(&|sc, k| med(res, "conn", sc, k)),
    )?;
    line_plot(
        &dir.join("keepalive_p99.png"),
        "Keep-alive request p99 latency vs services",
        "p99 µs",
        &s,
        &series(&|sc, k| p99(res, "keepalive", sc, k)),
    )?;
    line_plot(
        &dir.join("udp.png"),
        "64-byte UDP datagrams delivered per second vs services",
        "datagrams/s",
        &s,
        &series(&|sc, k| med(res, "udp", sc, k)),
    )?;
    Ok(())
}

fn line_plot(
    path: &Path,
    title: &str,
    ylabel: &str,
    scales: &[u32],
    series: &[(Kind, Vec<(usize, f64)>)],
) -> anyhow::Result<()> {
    let root = BitMapBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let ymax = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|(_, v)| *v))
        .fold(0.0f64, f64::max)
        * 1.15;
    let n = scales.len().max(2);
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d(-0.3f64..(n as f64 - 0.7), 0.0..ymax.max(1.0))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_labels(n)
        .x_label_formatter(&|x| {
            let i = x.round() as usize;
            if (x - i as f64).abs() < 0.01 && i < scales.len() {
                format!("{} service(s)", scales[i])
            } else {
                String::new()
            }
        })
        .y_desc(ylabel)
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let colors = [BLACK, RED, BLUE, MAGENTA, GREEN];
    for (i, (k, pts)) in series.iter().enumerate() {
        if pts.is_empty() {
            continue;
        }
        let color = colors[i % colors.len()];
        let data: Vec<(f64, f64)> = pts.iter().map(|(x, y)| (*x as f64, *y)).collect();
        chart
            .draw_series(LineSeries::new(data.clone(), color.stroke_width(2)))
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .label(k.name())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart
            .draw_series(data.into_iter().map(|p| Circle::new(p, 4, color.filled())))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerLeft)
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}
