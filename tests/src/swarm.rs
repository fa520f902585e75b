//! A real Docker Swarm for tests, driven through `cargo xtask cluster`'s command line
//! (the interface users have): up with the mesh on every node, the docker CLI per node,
//! requests from the cluster's client namespace, and `down` on drop, also on failure.

use std::{
    fs::File,
    io::{Read, Write},
    net::{Ipv4Addr, TcpStream},
    os::fd::AsRawFd,
    path::PathBuf,
    process::{Command, Output},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

pub struct Swarm {
    xtask: PathBuf,
    pub nodes: u32,
    client_netns: String,
}

/// The xtask binary: `$MESH_XTASK_BIN` (set by `cargo xtask test`), else the debug
/// build next to the tests.
fn xtask() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("MESH_XTASK_BIN") {
        return Some(PathBuf::from(p));
    }
    let p = std::env::current_exe()
        .ok()?
        .parent()?
        .parent()?
        .join("xtask");
    p.is_file().then_some(p)
}

impl Swarm {
    /// An N-node swarm (1 manager) with mesh-agent on every node. `None`: skip (never
    /// under CI, where a missing prerequisite fails).
    pub fn up(nodes: u32) -> Option<Swarm> {
        let Some(x) = xtask() else {
            let why = "xtask binary not found (run through `cargo xtask test`)";
            assert!(!crate::prereq::in_ci(), "{why}");
            eprintln!("SKIP swarm test: {why}");
            return None;
        };
        let mut s = Swarm {
            xtask: x,
            nodes,
            client_netns: "mc-c".into(),
        };
        let out = s.cli(&["cluster", "status", "--json"]);
        let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        assert!(
            st["up"] != true,
            "a cluster is up already (`cargo xtask cluster down` first): the swarm test needs its own"
        );
        let n = nodes.to_string();
        // From here on the guard tears down whatever `up` managed to build.
        let out = s.cli(&["cluster", "up", "--nodes", &n, "--managers", "1", "--mesh"]);
        assert!(
            out.status.success(),
            "cluster up: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let st: serde_json::Value =
            serde_json::from_slice(&s.cli(&["cluster", "status", "--json"]).stdout).unwrap();
        s.client_netns = st["client_netns"]
            .as_str()
            .expect("client_netns")
            .to_string();
        Some(s)
    }

    /// `xtask ARGS`.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(&self.xtask)
            .args(args)
            .output()
            .expect("run xtask")
    }

    /// `docker ARGS` against node `n`; panics unless it succeeds; its stdout.
    pub fn docker(&self, n: u32, args: &[&str]) -> String {
        let out = self.try_docker(n, args);
        assert!(
            out.status.success(),
            "docker {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    pub fn try_docker(&self, n: u32, args: &[&str]) -> Output {
        let node = n.to_string();
        let mut a = vec!["cluster", "docker", &node, "--"];
        a.extend_from_slice(args);
        self.cli(&a)
    }

    /// `xtask cluster agent N ACTION`, asserting success.
    pub fn agent(&self, n: u32, action: &str) {
        let out = self.cli(&["cluster", "agent", &n.to_string(), action]);
        assert!(
            out.status.success(),
            "cluster agent {n} {action}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn addr(&self, n: u32) -> Ipv4Addr {
        Ipv4Addr::new(10, 251, 0, 10 + n as u8)
    }

    /// Runs `f` on a thread inside the client namespace.
    pub fn client<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        let file = File::open(format!("/run/netns/{}", self.client_netns)).expect("client netns");
        std::thread::scope(|s| {
            s.spawn(|| {
                enter(&file);
                f()
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }

    /// Waits until `service` has exactly `n` tasks running (desired running) and
    /// returns (task name, node name) of each.
    pub fn wait_running(&self, service: &str, n: usize, within: Duration) -> Vec<(String, String)> {
        let deadline = Instant::now() + within;
        loop {
            let ps = self.docker(
                1,
                &[
                    "service",
                    "ps",
                    service,
                    "--filter",
                    "desired-state=running",
                    "--format",
                    "{{.Name}} {{.Node}} {{.CurrentState}}",
                ],
            );
            let running: Vec<(String, String)> = ps
                .lines()
                .filter(|l| l.contains(" Running "))
                .filter_map(|l| {
                    let mut w = l.split_whitespace();
                    Some((w.next()?.to_string(), w.next()?.to_string()))
                })
                .collect();
            let all = ps.lines().count();
            if running.len() == n && all == n {
                return running;
            }
            assert!(
                Instant::now() < deadline,
                "{service}: {n} tasks not running within {within:?}:\n{ps}"
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// The node name ("mc-n2") -> 2.
    pub fn node_index(name: &str) -> u32 {
        name.trim_start_matches("mc-n").parse().expect("node name")
    }
}

impl Drop for Swarm {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // Keep the agents' and dockerds' logs for the post-mortem.
            let keep = std::env::temp_dir().join("mesh-swarm-test-logs");
            let _ = std::fs::remove_dir_all(&keep);
            for n in 1..=self.nodes {
                let dir = keep.join(format!("node{n}"));
                let _ = std::fs::create_dir_all(&dir);
                for f in ["mesh-agent.log", "dockerd.log"] {
                    let _ = std::fs::copy(format!("/run/mesh-cluster/node{n}/{f}"), dir.join(f));
                }
            }
            eprintln!("swarm test failed: node logs kept in {}", keep.display());
        }
        let out = self.cli(&["cluster", "down"]);
        if !out.status.success() {
            eprintln!(
                "cluster down failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

fn enter(netns: &File) {
    // SAFETY: setns on this thread only, with a valid namespace fd.
    let rc = unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
}

/// One HTTP/1.0 GET from the current namespace; the body.
pub fn http(addr: Ipv4Addr, port: u16, path: &str, timeout: Duration) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&(addr, port).into(), timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let (head, body) = out
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other(format!("no HTTP answer: {out:?}")))?;
    if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
        return Err(std::io::Error::other(format!("answer: {head}")));
    }
    Ok(body.trim().to_string())
}

/// A load generator in the client namespace: sequential requests, round-robin over
/// `targets`, counting answers, slow answers (a SYN retransmitted) and failures (with
/// what failed, for the message). 10 s to connect and to answer.
pub struct Load {
    pub t0: Instant,
    /// Requests that took over 900 ms (a SYN retransmitted, at least).
    pub slow: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    pub ok: Arc<AtomicU64>,
    pub failures: Arc<Mutex<Vec<String>>>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Load {
    /// Says when (on the failures' clock) a step happens.
    pub fn mark(&self, what: &str) {
        let unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        eprintln!(
            "  {:.2}s (unix {unix:.3}) {what}",
            self.t0.elapsed().as_secs_f64()
        );
    }

    pub fn start(swarm: &Swarm, targets: Vec<(Ipv4Addr, u16)>, path: &'static str) -> Load {
        let file = File::open(format!("/run/netns/{}", swarm.client_netns)).expect("client netns");
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let (s, o, f) = (stop.clone(), ok.clone(), failures.clone());
        let slow = Arc::new(AtomicU64::new(0));
        let sl = slow.clone();
        let t0 = Instant::now();
        let handle = std::thread::spawn(move || {
            enter(&file);
            let mut i = 0;
            while !s.load(Ordering::Relaxed) {
                let (a, p) = targets[i % targets.len()];
                i += 1;
                let t = Instant::now();
                // A client's usual patience (curl and browsers wait far longer to
                // connect): room for the SYN retransmits at 1 s and 3 s.
                match http(a, p, path, Duration::from_secs(10)) {
                    Ok(_) => {
                        o.fetch_add(1, Ordering::Relaxed);
                        if t.elapsed() > Duration::from_millis(900) {
                            sl.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Err(e) => f
                        .lock()
                        .unwrap()
                        .push(format!("{:.2}s {a}:{p}: {e}", t0.elapsed().as_secs_f64())),
                }
            }
        });
        Load {
            t0,
            slow,
            stop,
            ok,
            failures,
            handle: Some(handle),
        }
    }

    /// Stops and returns (answered, failures).
    pub fn finish(mut self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        (
            self.ok.load(Ordering::Relaxed),
            self.failures.lock().unwrap().clone(),
        )
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
