//! A real Docker Swarm for tests: either N nodes driven through `cargo xtask cluster`'s
//! command line (the interface users have: up with the mesh on every node but the stock
//! ones, each node on the Docker engine asked for, the node engine's docker CLI per node,
//! requests from the cluster's client namespace, `down` on drop, also on failure), or one
//! node on this machine's own dockerd (started if none runs) with a client namespace on a
//! veth of its own, torn down the same way.

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
    /// Where the nodes' links meet (a cluster's `cluster status`; none on the machine).
    underlay_netns: Option<String>,
    machine: Option<Machine>,
    /// Per node (index 0 is node 1): its engine ("20.10", "28.5", "26.1"), the dockerd's
    /// version, and whether it is a stock Docker node (no mesh-agent).
    engines: Vec<String>,
    versions: Vec<String>,
    stock: Vec<bool>,
    /// The swarm's VXLAN port (`docker swarm init --data-path-port`, 4789 by default).
    pub data_path_port: u16,
    /// When `cluster up` was asked for (the test's wall time is reported on drop).
    t0: Instant,
}

/// What `Swarm::up_with` makes: `nodes` nodes (node 1 the only manager) on `engines`
/// (one name for every node, or one per node; none: the harness's default, the system's
/// 20.10), with mesh-agent on every node but the `stock` ones.
#[derive(Clone, Copy, Debug)]
pub struct Opts<'a> {
    pub nodes: u32,
    pub engines: &'a [&'a str],
    pub stock: &'a [u32],
    /// `docker swarm init --data-path-port` (Docker's 4789 without it).
    pub data_path_port: Option<u16>,
    /// dockerd's `userland-proxy` on every node (Docker's default: true).
    pub userland_proxy: bool,
}

impl Default for Opts<'_> {
    fn default() -> Self {
        Opts {
            nodes: 3,
            engines: &[],
            stock: &[],
            data_path_port: None,
            userland_proxy: true,
        }
    }
}

/// The single-node swarm on this machine's dockerd, and what the test made for it.
struct Machine {
    /// The client namespace (its veth's other end is the node's underlay).
    client: crate::netns::Netns,
    /// dockerd, when the test started it (stopped at the end, by this PID).
    dockerd: Option<std::process::Child>,
    /// iptables' FORWARD policy before the test's dockerd changed it.
    forward_policy: Option<String>,
    agent: Option<std::process::Child>,
    agent_bin: PathBuf,
    object: PathBuf,
    bpffs: String,
    state_dir: String,
    log: PathBuf,
}

/// The machine's Docker socket.
const MACHINE_DOCKER: &str = "unix:///var/run/docker.sock";
/// The node's underlay address (host side of the client's veth) and the client's.
pub const MACHINE_NODE_ADDR: Ipv4Addr = Ipv4Addr::new(10, 250, 77, 1);
pub const MACHINE_CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(10, 250, 77, 2);

fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    out
}

fn machine_docker(args: &[&str]) -> Output {
    Command::new("docker")
        .args(["-H", MACHINE_DOCKER])
        .args(args)
        .output()
        .expect("run docker (docker.io)")
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
    /// An N-node swarm (1 manager) on the default engine with mesh-agent on every node.
    /// `None`: skip (never under CI, where a missing prerequisite fails).
    pub fn up(nodes: u32) -> Option<Swarm> {
        Swarm::up_with(Opts {
            nodes,
            ..Opts::default()
        })
    }

    /// A swarm as `o` says (engines per node, stock nodes). An engine not cached yet is
    /// fetched by `cluster up` first (about 15 s). `None`: skip (never under CI).
    pub fn up_with(o: Opts) -> Option<Swarm> {
        assert!(
            o.engines.len() <= 1 || o.engines.len() == o.nodes as usize,
            "Opts.engines: one engine, or one per node"
        );
        let s = Swarm::fresh(o.nodes)?;
        let n = o.nodes.to_string();
        let mut args = vec!["cluster", "up", "--nodes", &n, "--managers", "1", "--mesh"];
        let engines = o.engines.join(",");
        match o.engines.len() {
            0 => {}
            1 => args.extend(["--engine", &engines]),
            _ => args.extend(["--engines", &engines]),
        }
        let stock = o
            .stock
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(",");
        if !o.stock.is_empty() {
            args.extend(["--stock", &stock]);
        }
        let port = o.data_path_port.map(|p| p.to_string());
        if let Some(p) = &port {
            args.extend(["--data-path-port", p]);
        }
        if !o.userland_proxy {
            args.extend(["--userland-proxy", "false"]);
        }
        // From here on the guard tears down whatever `up` managed to build.
        let t = Instant::now();
        let out = s.cli(&args);
        assert!(
            out.status.success(),
            "{}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let mut s = s.with_client();
        s.data_path_port = o.data_path_port.unwrap_or(4789);
        println!(
            "swarm: `{}` in {:.1} s: {}",
            args.join(" "),
            t.elapsed().as_secs_f64(),
            (1..=s.nodes)
                .map(|n| format!(
                    "node {n} Docker {}{}",
                    s.engine_version(n),
                    if s.is_stock(n) { " (stock)" } else { "" }
                ))
                .collect::<Vec<_>>()
                .join(", ")
        );
        Some(s)
    }

    /// Node `n`'s engine as `cluster up` took it: "20.10", "28.5", "26.1" (on the
    /// machine's own dockerd: its major.minor).
    pub fn engine(&self, n: u32) -> &str {
        &self.engines[n as usize - 1]
    }

    /// Node `n`'s dockerd version ("28.5.2+dfsg4").
    pub fn engine_version(&self, n: u32) -> &str {
        &self.versions[n as usize - 1]
    }

    /// Whether node `n` is a stock Docker node (no mesh-agent).
    pub fn is_stock(&self, n: u32) -> bool {
        self.stock[n as usize - 1]
    }

    /// `cargo xtask demo`: 3 nodes with the mesh deployed as deploy/mesh-stack.yml's
    /// global service and the demo web service; the swarm and what the demo printed.
    pub fn demo() -> Option<(Swarm, String)> {
        let s = Swarm::fresh(3)?;
        let out = s.cli(&["demo"]);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "cargo xtask demo failed:\n{text}");
        Some((s.with_client(), text))
    }

    /// The guard for a cluster this test is about to make (none may be up already).
    fn fresh(nodes: u32) -> Option<Swarm> {
        let Some(x) = xtask() else {
            let why = "xtask binary not found (run through `cargo xtask test`)";
            assert!(!crate::prereq::in_ci(), "{why}");
            eprintln!("SKIP swarm test: {why}");
            return None;
        };
        let s = Swarm {
            xtask: x,
            nodes,
            client_netns: "mc-c".into(),
            underlay_netns: None,
            machine: None,
            engines: Vec::new(),
            versions: Vec::new(),
            stock: Vec::new(),
            data_path_port: 4789,
            t0: Instant::now(),
        };
        let out = s.cli(&["cluster", "status", "--json"]);
        let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        assert!(
            st["up"] != true,
            "a cluster is up already (`cargo xtask cluster down` first): the swarm test needs its own"
        );
        Some(s)
    }

    fn with_client(mut self) -> Swarm {
        let st: serde_json::Value =
            serde_json::from_slice(&self.cli(&["cluster", "status", "--json"]).stdout).unwrap();
        self.underlay_netns = st["underlay_netns"].as_str().map(String::from);
        self.client_netns = st["client_netns"]
            .as_str()
            .expect("client_netns")
            .to_string();
        let nodes = st["nodes"].as_array().expect("nodes");
        let field = |k: &str| -> Vec<String> {
            nodes
                .iter()
                .map(|n| n[k].as_str().unwrap_or("?").to_string())
                .collect()
        };
        self.engines = field("engine");
        self.versions = field("engine_version");
        self.stock = nodes
            .iter()
            .map(|n| n["stock"].as_bool().unwrap_or(false))
            .collect();
        self
    }

    /// One node: this machine's dockerd (started if none runs; refused if it is in a
    /// swarm already, which the test must not touch), `docker swarm init` on a veth whose
    /// other end is a client namespace of the test's, the test image, and mesh-agent.
    /// `None`: skip (never under CI).
    pub fn machine() -> Option<Swarm> {
        let Some(x) = xtask() else {
            let why = "xtask binary not found (run through `cargo xtask test`)";
            assert!(!crate::prereq::in_ci(), "{why}");
            eprintln!("SKIP single-node swarm test: {why}");
            return None;
        };
        let bin_dir = std::env::var_os("MESH_AGENT_BIN_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| x.parent().unwrap().to_path_buf());
        let object = PathBuf::from(
            std::env::var_os("MESH_BPF_OBJECT").expect("MESH_BPF_OBJECT (set by cargo xtask test)"),
        );
        let pid = std::process::id();
        let client = crate::netns::Netns::new("sn");
        let mut s = Swarm {
            xtask: x,
            nodes: 1,
            engines: Vec::new(),
            versions: Vec::new(),
            stock: vec![false],
            data_path_port: 4789,
            t0: Instant::now(),
            client_netns: client.name().to_string(),
            underlay_netns: None,
            machine: Some(Machine {
                client,
                dockerd: None,
                forward_policy: None,
                agent: None,
                agent_bin: bin_dir.join("mesh-agent"),
                object,
                bpffs: format!("/sys/fs/bpf/mesh-test-sn{pid}"),
                state_dir: format!("/run/mesh-test-sn{pid}"),
                log: std::env::temp_dir().join(format!("mesh-test-sn{pid}-agent.log")),
            }),
        };
        // From here on, Drop undoes whatever was made.
        let m = s.machine.as_mut().unwrap();
        let host_if = format!("mt{pid}sn");
        run_ok(Command::new("ip").args([
            "link",
            "add",
            &host_if,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            m.client.name(),
        ]));
        run_ok(Command::new("ip").args(["addr", "add", "10.250.77.1/24", "dev", &host_if]));
        run_ok(Command::new("ip").args(["link", "set", &host_if, "up"]));
        m.client
            .ip(&["addr", "add", "10.250.77.2/24", "dev", "eth0"]);
        m.client.ip(&["link", "set", "eth0", "up"]);
        if !machine_docker(&["info"]).status.success() {
            m.forward_policy = iptables_forward_policy();
            let log =
                File::create(std::env::temp_dir().join(format!("mesh-test-sn{pid}-dockerd.log")))
                    .expect("dockerd log");
            let child = Command::new("dockerd")
                .args(["-H", MACHINE_DOCKER])
                .stdin(std::process::Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("start dockerd (docker.io)");
            m.dockerd = Some(child);
            let t = Instant::now();
            while !machine_docker(&["info"]).status.success() {
                assert!(
                    t.elapsed() < Duration::from_secs(60),
                    "dockerd did not answer within 60 s"
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        let v = machine_docker(&["version", "--format", "{{.Server.Version}}"]);
        let v = String::from_utf8_lossy(&v.stdout).trim().to_string();
        s.engines = vec![v.split('.').take(2).collect::<Vec<_>>().join(".")];
        s.versions = vec![v];
        let state = machine_docker(&["info", "--format", "{{.Swarm.LocalNodeState}}"]);
        let state = String::from_utf8_lossy(&state.stdout).trim().to_string();
        assert_eq!(
            state, "inactive",
            "this machine's dockerd is in a swarm already: the single-node test needs one of \
             its own (leave it, or run the test elsewhere)"
        );
        let out = machine_docker(&[
            "swarm",
            "init",
            "--advertise-addr",
            "10.250.77.1",
            "--default-addr-pool",
            "10.253.0.0/16",
        ]);
        assert!(
            out.status.success(),
            "swarm init: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = s.cli(&["cluster", "image", "--docker", MACHINE_DOCKER]);
        assert!(
            out.status.success(),
            "image import: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        s.agent(1, "start");
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

    /// `docker ARGS` against node `n` with `input` on its stdin (a confirmation prompt).
    pub fn docker_answering(&self, n: u32, args: &[&str], input: &str) -> Output {
        use std::io::Write;
        let node = n.to_string();
        let mut c = Command::new(&self.xtask);
        c.args(["cluster", "docker", &node, "--"])
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = c.spawn().expect("run xtask");
        if let Some(mut i) = child.stdin.take() {
            let _ = i.write_all(input.as_bytes());
        }
        child.wait_with_output().expect("wait for xtask")
    }

    pub fn try_docker(&self, n: u32, args: &[&str]) -> Output {
        if self.machine.is_some() {
            return machine_docker(args);
        }
        let node = n.to_string();
        let mut a = vec!["cluster", "docker", &node, "--"];
        a.extend_from_slice(args);
        self.cli(&a)
    }

    /// `xtask cluster agent N ACTION` (start, stop, kill, restart), asserting success.
    pub fn agent(&mut self, n: u32, action: &str) {
        if let Some(m) = &mut self.machine {
            m.agent(action);
            return;
        }
        let out = self.cli(&["cluster", "agent", &n.to_string(), action]);
        assert!(
            out.status.success(),
            "cluster agent {n} {action}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `xtask cluster dockerd N ACTION` (restart, kill), asserting success: node `n`'s
    /// dockerd stopped or killed and started again, its agent with it.
    pub fn dockerd(&self, n: u32, action: &str) {
        assert!(self.machine.is_none(), "a cluster's node only");
        let out = self.cli(&["cluster", "dockerd", &n.to_string(), action]);
        assert!(
            out.status.success(),
            "cluster dockerd {n} {action}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn addr(&self, n: u32) -> Ipv4Addr {
        if self.machine.is_some() {
            return MACHINE_NODE_ADDR;
        }
        Ipv4Addr::new(10, 251, 0, 10 + n as u8)
    }

    /// `meshctl ARGS` on node `n`, against its agent's pins: (exit code, stdout, stderr).
    pub fn meshctl(&self, n: u32, args: &[&str]) -> (i32, String, String) {
        let bin_dir = std::env::var_os("MESH_AGENT_BIN_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| self.xtask.parent().unwrap().to_path_buf());
        let bin = bin_dir.join("meshctl");
        let bin = bin.to_str().expect("utf-8 path");
        let out = match &self.machine {
            Some(m) => Command::new(bin)
                .args(args)
                .args(["--bpffs", &m.bpffs, "--state-dir", &m.state_dir])
                .output()
                .expect("run meshctl"),
            None => {
                let node = n.to_string();
                let pins = format!("/sys/fs/bpf/mesh-mc-n{n}");
                let mut a = vec!["cluster", "exec", &node, "--", bin];
                a.extend_from_slice(args);
                a.extend_from_slice(&["--bpffs", &pins]);
                self.cli(&a)
            }
        };
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Runs `f` on a thread inside the network namespace of container `id` on node `n`
    /// (through its init process, which the node's dockerd shares the PID namespace of).
    pub fn in_container<R: Send>(&self, n: u32, id: &str, f: impl FnOnce() -> R + Send) -> R {
        let pid = self.docker(n, &["inspect", "-f", "{{.State.Pid}}", id]);
        in_netns(&format!("/proc/{pid}/ns/net"), f)
    }

    /// The client's address, as the tasks should see it.
    pub fn client_addr(&self) -> Ipv4Addr {
        if self.machine.is_some() {
            return MACHINE_CLIENT_ADDR;
        }
        Ipv4Addr::new(10, 251, 0, 100)
    }

    /// What node `n`'s agent serves on /metrics (`None` on the machine, whose agent
    /// serves none: the test sends nothing to the machine's own addresses).
    pub fn metrics(&self, n: u32) -> Option<String> {
        if self.machine.is_some() {
            return None;
        }
        let out = self.cli(&[
            "cluster",
            "exec",
            &n.to_string(),
            "--",
            "curl",
            "-s",
            "http://127.0.0.1:9477/metrics",
        ]);
        Some(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs `f` on a thread inside node `n`'s own network namespace (the machine's, for
    /// the single node on this machine's dockerd).
    pub fn on_node<R: Send>(&self, n: u32, f: impl FnOnce() -> R + Send) -> R {
        if self.machine.is_some() {
            return in_netns("/proc/self/ns/net", f);
        }
        in_netns(&format!("/run/netns/mc-n{n}"), f)
    }

    /// Runs `f` on a thread inside the underlay's namespace, where the nodes' links meet
    /// on a bridge: what is seen there is what crossed the wire (no node's XDP or TC in
    /// the way). Only on a cluster of namespaces.
    pub fn on_wire<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        let ul = self
            .underlay_netns
            .as_ref()
            .expect("an underlay namespace (`cluster status`; the machine's node has none)");
        in_netns(&format!("/run/netns/{ul}"), f)
    }

    /// Runs `f` on a thread inside the client namespace.
    pub fn client<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        in_netns(&format!("/run/netns/{}", self.client_netns), f)
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

    /// The node name ("mc-n2") -> 2; the machine's node is 1.
    pub fn node_index(&self, name: &str) -> u32 {
        if self.machine.is_some() {
            return 1;
        }
        name.trim_start_matches("mc-n").parse().expect("node name")
    }
}

fn iptables_forward_policy() -> Option<String> {
    let out = Command::new("iptables")
        .args(["-S", "FORWARD"])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("-P FORWARD ").map(str::to_string))
}

impl Machine {
    fn agent(&mut self, action: &str) {
        match action {
            "start" => self.start_agent(),
            "stop" => self.stop_agent(libc::SIGTERM),
            "kill" => self.stop_agent(libc::SIGKILL),
            "restart" => {
                self.stop_agent(libc::SIGTERM);
                self.start_agent();
            }
            other => panic!("agent action {other}"),
        }
    }

    fn start_agent(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("agent log");
        let before = std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .matches("datapath attached")
            .count();
        let child = Command::new(&self.agent_bin)
            .args(["--from-docker", "--docker", MACHINE_DOCKER])
            .args(["--bpffs", &self.bpffs, "--state-dir", &self.state_dir])
            .args(["--metrics", "off", "--peer-port", "0"])
            .env("MESH_BPF_OBJECT", &self.object)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e}", self.agent_bin.display()));
        self.agent = Some(child);
        let t = Instant::now();
        while std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .matches("datapath attached")
            .count()
            == before
        {
            let exited = self.agent.as_mut().unwrap().try_wait().ok().flatten();
            assert!(
                exited.is_none() && t.elapsed() < Duration::from_secs(30),
                "mesh-agent did not start ({exited:?}): {}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn stop_agent(&mut self, sig: i32) {
        if let Some(mut c) = self.agent.take() {
            // SAFETY: a signal to our own child, by its PID.
            unsafe { libc::kill(c.id() as i32, sig) };
            let _ = c.wait();
        }
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        self.stop_agent(libc::SIGTERM);
        let _ = Command::new(&self.agent_bin)
            .args([
                "--uninstall",
                "--bpffs",
                &self.bpffs,
                "--state-dir",
                &self.state_dir,
            ])
            .output();
        if std::thread::panicking() {
            eprintln!(
                "single-node swarm test failed: agent log in {}",
                self.log.display()
            );
        } else {
            let _ = std::fs::remove_file(&self.log);
        }
        let _ = machine_docker(&["swarm", "leave", "--force"]);
        if let Some(mut d) = self.dockerd.take() {
            // SAFETY: a signal to the dockerd this test started, by its PID.
            unsafe { libc::kill(d.id() as i32, libc::SIGTERM) };
            let _ = d.wait();
            if let Some(p) = &self.forward_policy {
                let _ = Command::new("iptables").args(["-P", "FORWARD", p]).output();
            }
        }
        // The client namespace goes with `client` (and the veth with it).
    }
}

impl Drop for Swarm {
    fn drop(&mut self) {
        if self.machine.is_some() {
            return;
        }
        if std::thread::panicking() {
            // Keep the agents' and dockerds' logs for the post-mortem, per test.
            let test = std::thread::current()
                .name()
                .unwrap_or("swarm")
                .replace("::", "-");
            let keep = std::env::temp_dir().join("mesh-swarm-test-logs").join(test);
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
        println!(
            "swarm: {} nodes on Docker {}: {:.0} s from `cluster up` to `cluster down` done",
            self.nodes,
            self.engines.join(","),
            self.t0.elapsed().as_secs_f64()
        );
    }
}

/// Runs `f` on a thread inside the network namespace at `path`.
fn in_netns<R: Send>(path: &str, f: impl FnOnce() -> R + Send) -> R {
    let file = File::open(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    std::thread::scope(|s| {
        s.spawn(|| {
            enter(&file);
            f()
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
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
