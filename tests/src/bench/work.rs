//! The bench's servers (in the task namespaces) and load generators (in the client
//! namespace): the same for every contender.

use std::{
    io::{Read, Write},
    net::{TcpListener, UdpSocket},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context};

use crate::netns::Netns;

/// The tasks' HTTP ports: one per contender ([`super::contenders::Kind::http_port`]).
/// Each keeps its own so that no contender's TIME_WAIT meets another's connections on
/// the server: the mesh and DNAT keep the client's address, so their server-side tuples
/// equal the direct ones, but the client's TCP timestamps differ per destination, and
/// PAWS would drop a reused tuple's SYN (a 1 s retransmit).
pub const HTTP_PORTS: std::ops::RangeInclusive<u16> = 8088..=8092;
pub const UDP_PORT: u16 = 9000;
pub const IPERF_PORT: u16 = 5201;
/// The CPU the load generators are pinned to (`taskset`); the other runs the servers'
/// and the forwarding's softirq as the scheduler places them.
pub const LOAD_CPU: &str = "1";

/// HTTP/1.1 with keep-alive on [`HTTP_PORTS`] (a 3-byte body; `Connection: close`
/// honoured) and a UDP sink on [`UDP_PORT`] counting datagrams, in each task namespace.
pub struct Servers {
    stop: Arc<AtomicBool>,
    pub udp_received: Arc<AtomicU64>,
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl Servers {
    pub fn start(tasks: &[Netns]) -> Servers {
        let s = Servers {
            stop: Arc::new(AtomicBool::new(false)),
            udp_received: Arc::new(AtomicU64::new(0)),
        };
        for t in tasks {
            let (https, udp) = t.enter(|| {
                (
                    HTTP_PORTS
                        .map(|p| TcpListener::bind(("0.0.0.0", p)).expect("bind http"))
                        .collect::<Vec<_>>(),
                    UdpSocket::bind(("0.0.0.0", UDP_PORT)).expect("bind udp"),
                )
            });
            for http in https {
                let stop = s.stop.clone();
                std::thread::spawn(move || {
                    for c in http.incoming() {
                        if stop.load(Ordering::Relaxed) {
                            return;
                        }
                        let Ok(c) = c else { continue };
                        std::thread::spawn(move || serve_conn(c));
                    }
                });
            }
            let (stop, count) = (s.stop.clone(), s.udp_received.clone());
            std::thread::spawn(move || {
                let _ = udp.set_read_timeout(Some(Duration::from_millis(200)));
                let mut buf = [0u8; 2048];
                while !stop.load(Ordering::Relaxed) {
                    if udp.recv(&mut buf).is_ok() {
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
        s
    }
}

/// Answers every request on `c` until the client closes or asks to.
fn serve_conn(mut c: std::net::TcpStream) {
    let _ = c.set_nodelay(true);
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        let n = match c.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        while let Some(end) = find(&buf, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            buf.drain(..end + 4);
            let close = head.contains("connection: close");
            let reply: &[u8] = if close {
                b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n"
            } else {
                b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n"
            };
            if c.write_all(reply).is_err() || close {
                return;
            }
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// What wrk measured.
#[derive(Clone, Copy, Debug, Default)]
pub struct Wrk {
    pub rps: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub errors: u64,
}

/// wrk from `client` (pinned to [`LOAD_CPU`]) for `secs` against `addr:port`, 8
/// connections; `close`: a new connection per request.
pub fn wrk(client: &Netns, addr: &str, port: u16, secs: u32, close: bool) -> anyhow::Result<Wrk> {
    let url = format!("http://{addr}:{port}/");
    let d = format!("{secs}s");
    let mut cmd = vec![
        "taskset",
        "-c",
        LOAD_CPU,
        "wrk",
        "-t1",
        "-c8",
        "-d",
        &d,
        "--latency",
    ];
    if close {
        cmd.extend(["-H", "Connection: close"]);
    }
    cmd.push(&url);
    let out = client.exec(&cmd);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!("wrk {url}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    parse_wrk(&text).with_context(|| format!("wrk {url} printed:\n{text}"))
}

pub fn parse_wrk(text: &str) -> Option<Wrk> {
    let mut w = Wrk::default();
    let mut seen = false;
    for l in text.lines().map(str::trim) {
        if let Some(v) = l.strip_prefix("Requests/sec:") {
            w.rps = v.trim().parse().ok()?;
            seen = true;
        } else if let Some(v) = l.strip_prefix("50%") {
            w.p50_us = duration_us(v.trim())?;
        } else if let Some(v) = l.strip_prefix("99%") {
            w.p99_us = duration_us(v.trim())?;
        } else if let Some(v) = l.strip_prefix("Socket errors:") {
            w.errors += v
                .split(',')
                .filter_map(|p| p.split_whitespace().last()?.parse::<u64>().ok())
                .sum::<u64>();
        } else if let Some(v) = l.strip_prefix("Non-2xx or 3xx responses:") {
            w.errors += v.trim().parse::<u64>().ok()?;
        }
    }
    seen.then_some(w)
}

/// wrk's "1.23ms" / "456.00us" / "1.02s" in microseconds.
fn duration_us(v: &str) -> Option<f64> {
    let (num, mul) = if let Some(n) = v.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix("ms") {
        (n, 1e3)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1e6)
    } else {
        return None;
    };
    Some(num.parse::<f64>().ok()? * mul)
}

/// Small UDP datagrams (64-byte payload) from 32 source ports in `client`, as fast as one
/// thread pinned to [`LOAD_CPU`] sends them, for `secs`: (sent, delivered) per second,
/// delivered counted by the task sinks.
pub fn udp_blast(
    client: &Netns,
    addr: &str,
    port: u16,
    secs: u32,
    delivered: &AtomicU64,
) -> (f64, f64) {
    let target: std::net::SocketAddr = format!("{addr}:{port}").parse().expect("udp target");
    let before = delivered.load(Ordering::Relaxed);
    let sent = client.enter(|| {
        pin_to(LOAD_CPU.parse().unwrap_or(1));
        let socks: Vec<UdpSocket> = (0..32)
            .map(|_| UdpSocket::bind("0.0.0.0:0").expect("udp socket"))
            .collect();
        let payload = [0x5au8; 64];
        let t = Instant::now();
        let mut sent = 0u64;
        while t.elapsed() < Duration::from_secs(secs as u64) {
            for s in &socks {
                if s.send_to(&payload, target).is_ok() {
                    sent += 1;
                }
            }
        }
        sent
    });
    // Datagrams still in flight land within a moment.
    std::thread::sleep(Duration::from_millis(300));
    let got = delivered.load(Ordering::Relaxed) - before;
    (sent as f64 / secs as f64, got as f64 / secs as f64)
}

fn pin_to(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET writes within it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// iperf3 (pinned) from `client` to `addr:port` for `secs`: Gbit/s received.
pub fn iperf_gbps(client: &Netns, addr: &str, port: u16, secs: u32) -> anyhow::Result<f64> {
    Ok(crate::measure::iperf_run(client, addr, port, secs, Some(LOAD_CPU))?.0)
}

#[cfg(test)]
#[test]
fn wrk_output_is_read_with_its_units() {
    let text = "Running 2s test @ http://10.210.0.1:20001/\n  1 threads and 8 connections\n  Thread Stats   Avg      Stdev     Max   +/- Stdev\n    Latency   616.92us  357.13us   6.03ms   89.62%\n  Latency Distribution\n     50%  533.00us\n     75%  689.00us\n     90%    0.93ms\n     99%    1.98ms\n  25622 requests in 2.00s, 2.13MB read\n  Socket errors: connect 0, read 2, write 0, timeout 1\nRequests/sec:  12808.55\nTransfer/sec:      1.06MB\n";
    let w = parse_wrk(text).unwrap();
    assert_eq!(w.rps, 12808.55);
    assert_eq!(w.p50_us, 533.0);
    assert_eq!(w.p99_us, 1980.0);
    assert_eq!(w.errors, 3);
    assert!(parse_wrk("nothing").is_none());
}
