//! `cargo xtask bench`: the mesh side by side with what users would pick instead, on one
//! namespace topology (client -> node -> three tasks, [`crate::lbtopo`]), contenders
//! interleaved round by round, every figure the median of the runs with its spread.
//! Ratios are the result; absolute numbers on a shared 2-core machine are noise.

pub mod contenders;
pub mod report;
pub mod work;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::Context;
use contenders::{Installed, Kind};
use mesh_agent::{datapath::loader::Datapath, datapath::mesh::Mesh};
use mesh_common::config::MeshConfig;

use crate::lbtopo::LbTopo;

pub struct Opts {
    pub quick: bool,
    pub object: PathBuf,
    pub out: PathBuf,
    /// Services at the large scale (10,000).
    pub large: u32,
    /// Only the control plane and memory figures (no traffic): for working on them.
    pub control_only: bool,
}

/// One workload's figure for one contender at one scale, per run.
#[derive(Clone, Debug, Default)]
pub struct Runs {
    pub values: Vec<f64>,
    /// p50 / p99 latencies (µs), per run, where the workload has them.
    pub p50: Vec<f64>,
    pub p99: Vec<f64>,
    pub errors: u64,
}

pub const WORKLOADS: [(&str, &str); 4] = [
    ("conn", "new TCP connections/s (HTTP, Connection: close)"),
    ("keepalive", "keep-alive requests/s"),
    ("tput", "single-stream TCP Gbit/s"),
    ("udp", "64-byte UDP datagrams delivered/s"),
];

/// Everything measured, for the report.
#[derive(Default)]
pub struct Results {
    /// (workload, scale, contender) -> runs.
    pub runs: BTreeMap<(&'static str, u32, Kind), Runs>,
    /// (contender, install seconds at the large scale).
    pub install_s: Vec<(Kind, f64)>,
    /// (contender, add seconds, remove seconds) at the large scale.
    pub churn: Vec<contenders::Churn>,
    /// Map bytes per service at (3, 10) backends.
    pub bytes_per_service: Vec<(usize, f64, String)>,
    /// (workload, scale) -> (program, ns per run) from bpf_stats during the mesh's runs.
    pub per_packet: BTreeMap<(&'static str, u32), Vec<(String, f64)>>,
    /// Overlay: (figure, mesh runs, kernel vxlan runs).
    pub overlay: Vec<(&'static str, Vec<f64>, Vec<f64>)>,
    pub facts: Vec<(String, String)>,
    pub runs_per_figure: usize,
    pub secs_per_run: u32,
    pub elapsed_s: f64,
    /// Services at the large scale.
    pub large: u32,
}

pub fn run(o: &Opts) -> anyhow::Result<PathBuf> {
    let t0 = Instant::now();
    let (runs, secs) = if o.quick { (3, 1) } else { (5, 4) };
    let mut res = Results {
        runs_per_figure: runs,
        secs_per_run: secs,
        facts: report::machine_facts(),
        large: o.large,
        ..Default::default()
    };
    std::fs::create_dir_all(&o.out)?;
    let stats_before =
        std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").unwrap_or_default();
    // bpf_stats (run_time_ns / run_cnt per program) is machine-wide: restored at the end.
    std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "1").context("enabling bpf_stats")?;
    let r = measure_all(o, &mut res, runs, secs);
    let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", stats_before.trim());
    r?;
    res.elapsed_s = t0.elapsed().as_secs_f64();
    report::write(&o.out, &res)?;
    Ok(o.out.join("report.md"))
}

fn measure_all(o: &Opts, res: &mut Results, runs: usize, secs: u32) -> anyhow::Result<()> {
    let topo = LbTopo::new("b");
    let servers = work::Servers::start(&topo.t);
    let _iperf = crate::measure::iperf_server(&topo.t[0]);
    let scratch = crate::scratch::Scratch::new("bench");
    let scales: &[u32] = if o.control_only {
        &[o.large]
    } else {
        &[1, o.large]
    };
    for &scale in scales {
        eprintln!("bench: installing every contender for {scale} service(s)");
        let mut inst = Installed::new(&topo, &o.object, scale, scratch.path())?;
        if scale == o.large {
            res.install_s = inst.install_s.clone();
        }
        // HAProxy's cost does not depend on how many other listeners it has: measured
        // at one service only.
        let kinds: Vec<Kind> = Kind::ALL
            .into_iter()
            .filter(|k| scale == 1 || *k != Kind::Haproxy)
            .collect();
        for round in 0..if o.control_only { 0 } else { runs } {
            // Interleaved: each round starts with another contender.
            let mut order = kinds.clone();
            order.rotate_left(round % kinds.len());
            for k in order {
                inst.enable(&topo, k)?;
                let r = one_round(&topo, &mut inst, &servers, k, scale, secs, res);
                inst.disable(&topo, k)?;
                r?;
            }
            eprintln!(
                "bench: {scale} service(s): round {} of {runs} done",
                round + 1
            );
        }
        if scale == o.large {
            eprintln!("bench: control plane at {scale} services");
            let ops = if o.quick { 10 } else { 30 };
            res.churn = inst.churn(&topo, ops, if o.quick { 3 } else { 6 })?;
            res.bytes_per_service
                .push(bytes_per_service(&mut inst.mesh, 3)?);
        }
        inst.uninstall();
    }
    drop(scratch);
    res.bytes_per_service.push(ten_backends(&topo, &o.object)?);
    drop(servers);
    drop(topo);
    if !o.control_only {
        eprintln!("bench: overlay, mesh vs Linux's vxlan device");
        overlay(o, res, runs, secs)?;
    }
    Ok(())
}

/// Every workload once against contender `k` (enabled).
fn one_round(
    topo: &LbTopo,
    inst: &mut Installed,
    servers: &work::Servers,
    k: Kind,
    scale: u32,
    secs: u32,
    res: &mut Results,
) -> anyhow::Result<()> {
    let (addr, http, tput, udp) = k.targets(scale);
    for (w, _) in WORKLOADS {
        if k == Kind::Haproxy && w == "udp" {
            continue; // HAProxy has no UDP
        }
        let before = (k == Kind::Mesh).then(|| prog_stats(&inst.mesh));
        let e = res.runs.entry((w, scale, k)).or_default();
        match w {
            "conn" | "keepalive" => {
                let r = work::wrk(&topo.c, &addr, http, secs, w == "conn")?;
                e.values.push(r.rps);
                e.p50.push(r.p50_us);
                e.p99.push(r.p99_us);
                e.errors += r.errors;
            }
            "tput" => e.values.push(work::iperf_gbps(&topo.c, &addr, tput, secs)?),
            _ => {
                let (_, delivered) =
                    work::udp_blast(&topo.c, &addr, udp, secs, &servers.udp_received);
                e.values.push(delivered);
            }
        }
        if let Some(b) = before {
            let a = prog_stats(&inst.mesh);
            let per: Vec<(String, f64)> = a
                .iter()
                .zip(&b)
                .filter(|((_, _, ca), (_, _, cb))| ca > cb)
                .map(|((n, ta, ca), (_, tb, cb))| (n.clone(), (ta - tb) as f64 / (ca - cb) as f64))
                .collect();
            res.per_packet.entry((w, scale)).or_default().extend(per);
        }
    }
    Ok(())
}

/// (program, run_time_ns, run_cnt) of the TC programs.
fn prog_stats(m: &Mesh) -> Vec<(String, u64, u64)> {
    let mut out = Vec::new();
    for (name, p) in [
        ("mesh_tc_ingress", m.dp.tc_ingress()),
        ("mesh_tc_task", m.dp.tc_task()),
    ] {
        if let Ok(info) = p.and_then(|p| {
            p.info().map_err(|e| mesh_agent::MeshError::Program {
                program: "info",
                source: e,
            })
        }) {
            out.push((
                name.to_string(),
                info.run_time().as_nanos() as u64,
                info.run_count(),
            ));
        }
    }
    out
}

/// Bytes of BPF map entries per service, from what the kernel maps hold.
fn bytes_per_service(m: &mut Mesh, backends: usize) -> anyhow::Result<(usize, f64, String)> {
    use mesh_common::lb::{Backend, Frontend, FrontendKey, Service};
    use std::mem::size_of;
    let snap = m.dp.read_snapshot()?;
    let n = snap.services.len().max(1) as f64;
    let fe = snap.frontends.len() * (size_of::<FrontendKey>() + size_of::<Frontend>());
    let svc = snap.services.len() * (4 + size_of::<Service>());
    let be = snap.backends.len() * (4 + size_of::<Backend>());
    let slots: usize = snap.services.values().map(|s| s.maglev_size as usize).sum();
    let maglev = slots * 4;
    let total = (fe + svc + be + maglev) as f64;
    let how = format!(
        "{} services: frontends {fe} B, services {svc} B, backends {be} B, Maglev {slots} slots x 4 B",
        snap.services.len()
    );
    Ok((backends, total / n, how))
}

/// The same figure for services of 10 backends (a separate mesh of 200 such services).
fn ten_backends(topo: &LbTopo, object: &Path) -> anyhow::Result<(usize, f64, String)> {
    let dp = Datapath::load_sized(object, &MeshConfig::DEFAULT, contenders::BENCH_MAGLEV_SLOTS)?;
    let mut mesh = Mesh::new(dp);
    let mut model = contenders::mesh_model(200, 10);
    model.services.retain(|s| s.backends.len() == 10);
    topo.n.enter(|| mesh.apply(&model))?;
    bytes_per_service(&mut mesh, 10)
}

/// Across nodes: client -> node 1's published port -> the mesh's tunnel -> t2 on node
/// 2, against client -> node 1 -> Linux's vxlan device -> node 2 -> t2 (the namespace
/// cluster of the overlay tests).
fn overlay(o: &Opts, res: &mut Results, runs: usize, secs: u32) -> anyhow::Result<()> {
    use crate::cluster::{Cluster, NODES, TASKS};
    let cl = Cluster::new("bo");
    let mut meshes = Vec::new();
    for i in 0..3 {
        let dp = Datapath::load(&o.object, &MeshConfig::DEFAULT)?;
        let mut mesh = Mesh::new(dp);
        let model = cl.model(i, &[true; 3]);
        cl.nodes[i].enter(|| -> anyhow::Result<()> {
            mesh.dp.attach_tc_ingress("u")?;
            mesh.dp.attach_tc_task(&format!("h{}", i + 1))?;
            mesh.apply(&model)?;
            Ok(())
        })?;
        meshes.push(mesh);
    }
    cl.kernel_vxlan_path();
    let _server = crate::measure::iperf_server(&cl.tasks[1]);
    let (mut tm, mut tk, mut cm, mut ck) = (vec![], vec![], vec![], vec![]);
    let conns = if o.quick { 150 } else { 400 };
    for _ in 0..runs {
        tm.push(crate::measure::iperf(&cl.c, NODES[0], 5201, secs).0);
        tk.push(crate::measure::iperf(&cl.c, TASKS[1], 5201, secs).0);
        cm.push(crate::measure::conn_rate(&cl.c, NODES[0], 8086, conns, |_| {}).0);
        ck.push(
            crate::measure::conn_rate(&cl.c, TASKS[1], crate::lbtopo::DIRECT_PORT, conns, |_| {}).0,
        );
    }
    res.overlay.push(("cross-node TCP Gbit/s (iperf3)", tm, tk));
    res.overlay
        .push(("cross-node new connections/s (sequential HTTP/1.0)", cm, ck));
    std::thread::sleep(Duration::from_millis(10));
    Ok(())
}

/// Median and (min, max) of `v`.
pub fn median(v: &[f64]) -> (f64, f64, f64) {
    if v.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let m = if s.len() % 2 == 1 {
        s[s.len() / 2]
    } else {
        (s[s.len() / 2 - 1] + s[s.len() / 2]) / 2.0
    };
    (m, s[0], s[s.len() - 1])
}

/// The p-th percentile (0..=100) of `v`, nearest rank.
pub fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0) * s.len() as f64).ceil().max(1.0) as usize;
    s[rank.min(s.len()) - 1]
}

#[cfg(test)]
#[test]
fn medians_and_percentiles() {
    assert_eq!(median(&[3.0, 1.0, 2.0]), (2.0, 1.0, 3.0));
    assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]).0, 2.5);
    let v: Vec<f64> = (1..=100).map(f64::from).collect();
    assert_eq!(percentile(&v, 99.0), 99.0);
    assert_eq!(percentile(&v, 50.0), 50.0);
    assert!(median(&[]).0.is_nan());
}

/// `mesh-bench --probe`: new connections through the mesh and directly, with what the
/// client retransmitted and the mesh's counters (diagnostics, no report).
pub fn probe(o: &Opts) -> anyhow::Result<()> {
    let topo = LbTopo::new("p");
    let servers = work::Servers::start(&topo.t);
    let scratch = crate::scratch::Scratch::new("bench-probe");
    let mut inst = Installed::new(&topo, &o.object, 1, scratch.path())?;
    for k in [Kind::Direct, Kind::Mesh, Kind::Direct, Kind::Mesh] {
        inst.enable(&topo, k)?;
        let (addr, http, _, _) = k.targets(1);
        let retr = || topo.c.enter(|| crate::netns::snmp("Tcp", "RetransSegs"));
        let before = (
            retr(),
            mesh_agent::datapath::stats::Snapshot::read(&inst.mesh.dp.stats()?)?,
        );
        let w = work::wrk(&topo.c, &addr, http, 5, true)?;
        let after = (
            retr(),
            mesh_agent::datapath::stats::Snapshot::read(&inst.mesh.dp.stats()?)?,
        );
        println!(
            "{}: {:.0} conn/s p50 {} p99 {} errors {}; client retransmitted {} segments",
            k.name(),
            w.rps,
            w.p50_us,
            w.p99_us,
            w.errors,
            after.0 - before.0
        );
        if k == Kind::Mesh {
            for ((h, r), c) in after.1.since(&before.1).cells {
                if c.packets > 0 {
                    println!("  hook {h} reason {r}: {} packets", c.packets);
                }
            }
        }
        inst.disable(&topo, k)?;
    }
    drop(servers);
    inst.uninstall();
    Ok(())
}
