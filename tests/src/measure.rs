//! Measurements shared by the tests that print figures and by the bench: iperf3 and
//! sequential HTTP connections from a namespace.

use std::time::{Duration, Instant};

use crate::netns::Netns;

/// A child process, killed (by its PID) and reaped when dropped.
pub struct Child(pub std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `cmd` inside `ns` in the background (stdout and stderr discarded).
pub fn spawn_in(ns: &Netns, cmd: &[&str]) -> Child {
    Child(
        std::process::Command::new("ip")
            .args(["netns", "exec", ns.name()])
            .args(cmd)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{cmd:?} in {}: {e}", ns.name())),
    )
}

/// An iperf3 server on :5201 in `ns` (killed with the guard).
pub fn iperf_server(ns: &Netns) -> Child {
    let c = spawn_in(ns, &["iperf3", "-s", "-p", "5201"]);
    std::thread::sleep(Duration::from_millis(500));
    c
}

/// One iperf3 run from `client` to `addr:port`: (Gbit/s, retransmits, slowest 1-s
/// interval in Gbit/s). Panics if iperf3 fails (tests).
pub fn iperf(client: &Netns, addr: &str, port: u16, secs: u32) -> (f64, u64, f64) {
    iperf_run(client, addr, port, secs, None).expect("iperf3")
}

/// As [`iperf`], the client pinned to `cpu` if given, failures as errors (the bench).
pub fn iperf_run(
    client: &Netns,
    addr: &str,
    port: u16,
    secs: u32,
    cpu: Option<&str>,
) -> anyhow::Result<(f64, u64, f64)> {
    let (port, secs) = (port.to_string(), secs.to_string());
    let mut cmd = match cpu {
        Some(c) => vec!["taskset", "-c", c],
        None => vec![],
    };
    cmd.extend(["iperf3", "-c", addr, "-p", &port, "-t", &secs, "-J"]);
    let out = client.exec(&cmd);
    let j: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| anyhow::anyhow!("iperf3 to {addr}:{port}: no JSON output ({e})"))?;
    if let Some(e) = j["error"].as_str() {
        anyhow::bail!("iperf3 to {addr}:{port}: {e}");
    }
    let gbps = |v: &serde_json::Value| v["bits_per_second"].as_f64().unwrap_or(0.0) / 1e9;
    let rate = gbps(&j["end"]["sum_received"]);
    let retr = j["end"]["sum_sent"]["retransmits"].as_u64().unwrap_or(0);
    let slowest = j["intervals"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|i| gbps(&i["sum"]))
                .fold(f64::INFINITY, f64::min)
        })
        .unwrap_or(0.0);
    Ok((rate, retr, slowest))
}

/// `n` sequential HTTP/1.0 connections from `client` to `addr:port`, each answer handed
/// to `check`: connections per second and the p99 latency.
pub fn conn_rate(
    client: &Netns,
    addr: &str,
    port: u16,
    n: usize,
    check: impl Fn(&str) + Send + Sync,
) -> (f64, Duration) {
    let mut lat = client.enter(|| {
        (0..n)
            .map(|_| {
                let t = Instant::now();
                check(&crate::lbtopo::http_get(addr, port).expect("request"));
                t.elapsed()
            })
            .collect::<Vec<_>>()
    });
    lat.sort();
    let total: Duration = lat.iter().sum();
    (n as f64 / total.as_secs_f64(), lat[n * 99 / 100])
}
