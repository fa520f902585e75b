//! Tier 3: the `mesh-agent` and `meshctl` binaries for real: the agent attaches to a veth
//! in a test namespace, traffic flows, meshctl reads the pinned counters; the datapath
//! outlives the agent (SIGTERM, kill -9) and a restarted agent adopts it without breaking
//! a connection; `--uninstall` detaches and unpins.

#![allow(clippy::result_large_err)] // aya errors by value, on cold paths

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use mesh_tests::{
    prereq,
    topology::{udp_ping, VethPair},
};

/// The binaries `cargo xtask test` built (`$MESH_AGENT_BIN_DIR`), else the test's own
/// target directory.
fn bin(name: &str) -> Option<PathBuf> {
    let dir = std::env::var_os("MESH_AGENT_BIN_DIR")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::current_exe()
                .ok()?
                .parent()?
                .parent()
                .map(Path::to_path_buf)
        })?;
    let p = dir.join(name);
    p.is_file().then_some(p)
}

/// The `mesh-agent` and `meshctl` binaries; missing ones fail under `CI=true` and skip
/// (saying so) otherwise.
fn binaries() -> Option<(PathBuf, PathBuf)> {
    if let (Some(agent), Some(meshctl)) = (bin("mesh-agent"), bin("meshctl")) {
        return Some((agent, meshctl));
    }
    let why = "mesh-agent/meshctl binaries not built (cargo xtask test builds them)";
    assert!(!prereq::in_ci(), "{why}");
    eprintln!("SKIP agent test: {why}");
    None
}

/// Kills the agent (by the PID we started) if the test ends before it exits, then
/// uninstalls what it pinned (links, maps, state file).
struct AgentGuard {
    child: Child,
    pin_dir: PathBuf,
    agent: PathBuf,
    ns: String,
    /// Everything the agent wrote to stderr so far (a reader thread fills it).
    log: std::sync::Arc<std::sync::Mutex<String>>,
    /// Set when a restarted agent's guard takes over the pins.
    handed_over: bool,
}

impl AgentGuard {
    fn stop_child(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for AgentGuard {
    fn drop(&mut self) {
        self.stop_child();
        if self.handed_over {
            return;
        }
        let _ = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.ns))
            .arg(&self.agent)
            .arg("--uninstall")
            .arg("--bpffs")
            .arg(&self.pin_dir)
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.pin_dir);
    }
}

fn meshctl_stats(meshctl: &Path, pin_dir: &Path) -> serde_json::Value {
    let out = Command::new(meshctl)
        .args(["stats", "--json", "--bpffs"])
        .arg(pin_dir)
        .output()
        .expect("run meshctl");
    assert!(
        out.status.success(),
        "meshctl stats: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("meshctl --json output")
}

fn packets(stats: &serde_json::Value, hook: &str, reason: &str) -> u64 {
    stats
        .as_array()
        .expect("array")
        .iter()
        .find(|r| r["hook"] == hook && r["reason"] == reason)
        .map(|r| r["packets"].as_u64().unwrap())
        .unwrap_or(0)
}

/// Starts `mesh-agent ARGS --bpffs <unique dir>` inside `ns` (with nsenter, not `ip netns
/// exec`, which remounts /sys and hides bpffs) and waits until it says the datapath is
/// attached (the model applied).
fn start_agent(
    ns: &mesh_tests::netns::Netns,
    agent: &Path,
    object: &Path,
    args: &[&std::ffi::OsStr],
    tag: &str,
) -> AgentGuard {
    let pin_dir = PathBuf::from(format!("/sys/fs/bpf/mesh-{tag}-{}", std::process::id()));
    let guard = spawn_agent(ns, agent, object, args, &pin_dir);
    wait_ready(guard, 1)
}

/// The agent in `topo`'s node, from a model file of it with all three tasks active:
/// the guard and the file.
fn start_config_agent(
    topo: &mesh_tests::lbtopo::LbTopo,
    agent: &Path,
    object: &Path,
    tag: &str,
) -> (AgentGuard, PathBuf) {
    let config = model_file(topo, tag);
    let guard = start_agent(
        &topo.n,
        agent,
        object,
        &["--config".as_ref(), config.as_os_str()],
        tag,
    );
    (guard, config)
}

/// A model file of `topo` with all three tasks active, in a directory of the test's.
fn model_file(topo: &mesh_tests::lbtopo::LbTopo, tag: &str) -> PathBuf {
    use mesh_agent::model::to_yaml;
    let dir = std::env::temp_dir().join(format!("mesh-{tag}-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("mesh.yaml");
    std::fs::write(
        &config,
        to_yaml(&topo.model(&mesh_tests::lbtopo::ALL_ACTIVE)),
    )
    .unwrap();
    config
}

fn spawn_agent(
    ns: &mesh_tests::netns::Netns,
    agent: &Path,
    object: &Path,
    args: &[&std::ffi::OsStr],
    pin_dir: &Path,
) -> AgentGuard {
    spawn_agent_env(ns, agent, object, args, pin_dir, &[])
}

/// As [`spawn_agent`], with more environment for the agent.
/// `mesh-agent --uninstall` of the datapath pinned in `pin_dir`, in namespace `netns`;
/// it must succeed.
fn uninstall(netns: &str, agent: &Path, pin_dir: &Path) {
    let out = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{netns}"))
        .arg(agent)
        .args(["--uninstall", "--bpffs"])
        .arg(pin_dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn spawn_agent_env(
    ns: &mesh_tests::netns::Netns,
    agent: &Path,
    object: &Path,
    args: &[&std::ffi::OsStr],
    pin_dir: &Path,
    env: &[(&str, &str)],
) -> AgentGuard {
    let mut child = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", ns.name()))
        .arg(agent)
        .args(args)
        .arg("--bpffs")
        .arg(pin_dir)
        .env("MESH_BPF_OBJECT", object)
        .env("MESH_LOG_FORMAT", "text")
        .envs(env.iter().copied())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start mesh-agent");
    let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let stderr = child.stderr.take().expect("piped stderr");
    let sink = log.clone();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let mut l = sink.lock().unwrap();
            l.push_str(&line);
            l.push('\n');
        }
    });
    AgentGuard {
        child,
        pin_dir: pin_dir.to_path_buf(),
        agent: agent.to_path_buf(),
        ns: ns.name().to_string(),
        log,
        handed_over: false,
    }
}

/// Waits until the agent's log says "datapath attached" for the `nth` time.
fn wait_ready(mut guard: AgentGuard, nth: usize) -> AgentGuard {
    let within = 10 * prereq::time_scale();
    let deadline = Instant::now() + Duration::from_secs(within.into());
    while guard.log().matches("datapath attached").count() < nth {
        if let Some(st) = guard.child.try_wait().unwrap() {
            std::thread::sleep(Duration::from_millis(100));
            panic!("mesh-agent exited early ({st}): {}", guard.log());
        }
        assert!(
            Instant::now() < deadline,
            "mesh-agent not ready in {within} s: {}",
            guard.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    guard
}

#[test]
fn agent_attaches_meshctl_reads_sigterm_detaches() {
    let Some(object) = prereq::privileged("agent_attaches_meshctl_reads_sigterm_detaches") else {
        return;
    };
    let Some((agent, meshctl)) = binaries() else {
        return;
    };
    let pair = VethPair::new("g");
    let mut guard = start_agent(
        &pair.b,
        &agent,
        &object,
        &["--interface".as_ref(), "vb".as_ref()],
        "test",
    );
    let pin_dir = guard.pin_dir.clone();
    let pin = pin_dir.join(mesh_common::maps::STATS.name);

    udp_ping(&pair, 7070, 50, 64);
    let stats = meshctl_stats(&meshctl, &pin_dir);
    assert_eq!(
        packets(&stats, "tc_underlay_ingress", "pass_udp"),
        50,
        "{stats}"
    );
    assert_eq!(
        packets(&stats, "xdp_underlay", "pass_udp"),
        0,
        "no XDP unless asked"
    );

    // SIGTERM: a clean exit that leaves the datapath attached and counting.
    let pid = guard.child.id() as i32;
    // SAFETY: signalling the child we spawned (its PID is ours to use until we reap it).
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let status = guard.child.wait().expect("wait for mesh-agent");
    assert!(status.success(), "mesh-agent exit on SIGTERM: {status}");
    assert!(pin.exists(), "counters stay pinned after exit");
    udp_ping(&pair, 7070, 20, 64);
    let stats = meshctl_stats(&meshctl, &pin_dir);
    assert_eq!(
        packets(&stats, "tc_underlay_ingress", "pass_udp"),
        70,
        "still attached and counting with no agent: {stats}"
    );

    // --uninstall: detached, unpinned. The counters, held open here, stop counting.
    let held = aya::maps::MapData::from_pin(&pin).expect("open pinned counters");
    let held = aya::maps::PerCpuArray::<_, mesh_common::stats::Counter>::try_from(
        aya::maps::Map::PerCpuArray(held),
    )
    .unwrap();
    let udp = |m: &aya::maps::PerCpuArray<aya::maps::MapData, _>| {
        mesh_agent::datapath::stats::Snapshot::read(m)
            .unwrap()
            .get(
                mesh_common::stats::Hook::TcUnderlayIngress,
                mesh_common::reason::Reason::PassUdp,
            )
            .packets
    };
    assert_eq!(udp(&held), 70);
    uninstall(pair.b.name(), &agent, &pin_dir);
    assert!(!pin_dir.exists(), "pin directory removed");
    udp_ping(&pair, 7070, 20, 64);
    assert_eq!(udp(&held), 70, "detached by --uninstall");
    let err = Command::new(&meshctl)
        .args(["stats", "--bpffs"])
        .arg(&pin_dir)
        .output()
        .unwrap();
    assert_eq!(
        err.status.code(),
        Some(4),
        "meshctl's exit code for no mesh pinned"
    );
    assert!(String::from_utf8_lossy(&err.stderr).contains("no mesh is pinned"));
}

/// `mesh-agent --config FILE` drives the load balancer; SIGHUP re-reads the file.
#[test]
fn agent_config_file_and_reload() {
    use mesh_agent::model::{to_yaml, Health};
    use mesh_tests::lbtopo::{http_get, LbTopo, NODE};

    let Some(object) = prereq::privileged("agent_config_file_and_reload") else {
        return;
    };
    let Some((agent, meshctl)) = binaries() else {
        return;
    };
    let topo = LbTopo::new("a");
    let (mut guard, config) = start_config_agent(&topo, &agent, &object, "cfg");
    let dir = config.parent().unwrap().to_path_buf();
    let pin_dir = guard.pin_dir.clone();
    let served = |n: usize| -> std::collections::BTreeSet<String> {
        topo.c.enter(|| {
            (0..n)
                .map(|_| {
                    let body = http_get(NODE, 8080).expect("request through the agent's mesh");
                    body.split(' ').next().unwrap().to_string()
                })
                .collect()
        })
    };
    assert_eq!(served(60).len(), 3, "all three tasks serve");

    // t3 leaves the file; SIGHUP; new connections avoid it.
    std::fs::write(
        &config,
        to_yaml(&topo.model(&[(0, Health::Active), (1, Health::Active)])),
    )
    .unwrap();
    // SAFETY: signalling the child we spawned.
    assert_eq!(
        unsafe { libc::kill(guard.child.id() as i32, libc::SIGHUP) },
        0
    );
    // Until the reload lands, a request may still reach t3, and one caught on t3 when
    // it leaves is reset (its backend is gone): poll with requests that may fail, then
    // demand a clean round.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s: std::collections::BTreeSet<String> = topo.c.enter(|| {
            (0..30)
                .filter_map(|_| http_get(NODE, 8080).ok())
                .map(|b| b.split(' ').next().unwrap().to_string())
                .collect()
        });
        if !s.is_empty() && !s.contains("t3") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "reload did not take t3 out: {s:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!served(60).contains("t3"), "t3 out for good");
    // A broken file is refused and the running state kept.
    std::fs::write(&config, "services: [{name: x, bogus: 1}]").unwrap();
    assert_eq!(
        unsafe { libc::kill(guard.child.id() as i32, libc::SIGHUP) },
        0
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        guard.child.try_wait().unwrap().is_none(),
        "agent survives a bad reload"
    );
    assert_eq!(served(30).len(), 2);

    let stats = meshctl_stats(&meshctl, &pin_dir);
    assert!(packets(&stats, "tc_underlay_ingress", "fwd_to_task") >= 120 * 3);
    assert!(packets(&stats, "tc_task", "fwd_reply_to_client") >= 120 * 2);
    assert_eq!(
        unsafe { libc::kill(guard.child.id() as i32, libc::SIGTERM) },
        0
    );
    assert!(guard.child.wait().unwrap().success());
    let _ = std::fs::remove_dir_all(&dir);
}

/// `kill -9` of the agent under load: no request fails and an established connection
/// keeps its task; the restarted agent adopts the pinned maps without flushing them
/// (the same connection is still answered by the same task), then reconciles changes.
#[test]
fn agent_kill9_keeps_traffic_and_restart_adopts() {
    kill9_and_adopt("agent_kill9_keeps_traffic_and_restart_adopts", "auto");
}

/// The same with TC programs as netlink clsact filters (kernels before 6.6 have no tcx
/// links; forced here): no filter can be pinned, so the restarted agent replaces the
/// program in each filter in place, and `--uninstall` removes the filters.
#[test]
fn agent_kill9_with_netlink_filters_keeps_traffic_and_restart_adopts() {
    kill9_and_adopt(
        "agent_kill9_with_netlink_filters_keeps_traffic_and_restart_adopts",
        "netlink",
    );
}

/// The program ids behind every TC attachment the agent pinned in `pin_dir`, by pin
/// name, read in `ns` (where the filters are), with how each is attached.
fn tc_programs(
    ns: &mesh_tests::netns::Netns,
    pin_dir: &Path,
) -> std::collections::BTreeMap<String, (&'static str, Option<u32>)> {
    let pins = mesh_agent::datapath::pins::PinDir::new(pin_dir);
    ns.enter(|| {
        pins.links()
            .into_iter()
            .filter(|l| l.hook.tc())
            .map(|l| {
                let name = l.path.file_name().unwrap().to_string_lossy().into_owned();
                (
                    name,
                    (l.mode(), l.program_id().expect("read the attachment")),
                )
            })
            .collect()
    })
}

/// The ids of the BPF programs process `pid` holds open (its fdinfo).
fn programs_held(pid: u32) -> std::collections::BTreeSet<u32> {
    std::fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| std::fs::read_to_string(e.path()).ok())
                .filter_map(|t| {
                    t.lines()
                        .find_map(|l| l.strip_prefix("prog_id:"))
                        .and_then(|v| v.trim().parse().ok())
                })
                .collect()
        })
        .unwrap_or_default()
}

fn kill9_and_adopt(test: &str, tc_attach: &str) {
    use mesh_agent::model::{to_yaml, Health};
    use mesh_tests::lbtopo::{http_get, LbTopo, ALL_ACTIVE, NODE};
    use std::{
        io::{BufRead, BufReader, Write},
        sync::atomic::{AtomicBool, AtomicU64, Ordering},
    };

    let Some(object) = prereq::privileged(test) else {
        return;
    };
    let Some((agent, _)) = binaries() else {
        return;
    };
    let netlink = tc_attach == "netlink";
    let tag = if netlink { "kn" } else { "k" };
    let topo = LbTopo::new(tag);
    let dir = std::env::temp_dir().join(format!("mesh-agent-{tag}9-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("mesh.yaml");
    std::fs::write(&config, to_yaml(&topo.model(&ALL_ACTIVE))).unwrap();
    let args: [&std::ffi::OsStr; 4] = [
        "--config".as_ref(),
        config.as_os_str(),
        "--tc-attach".as_ref(),
        tc_attach.as_ref(),
    ];
    let pin_dir = PathBuf::from(format!("/sys/fs/bpf/mesh-{tag}9-{}", std::process::id()));
    // With netlink filters, the datapath's own MTU check and XDP's direct access too:
    // what a 5.10 kernel gets (the programs' fallback paths through the verifier).
    let env: &[(&str, &str)] = if netlink {
        &[("MESH_FORCE_FALLBACKS", "check_mtu,xdp_bytes")]
    } else {
        &[]
    };
    let spawn = || spawn_agent_env(&topo.n, &agent, &object, &args, &pin_dir, env);
    let mut guard = wait_ready(spawn(), 1);
    // Every TC hook attached as asked: the underlay, three task veths, and the host port
    // where the kernel lets the agent scope it (SO_NETNS_COOKIE, 5.14; else no-host-ports).
    let features = mesh_agent::datapath::features::Features::detect(
        mesh_agent::datapath::features::TcAttach::Auto,
    )
    .unwrap();
    let host_port = features.has(mesh_agent::datapath::features::Feature::NetnsCookie);
    let before = tc_programs(&topo.n, &pin_dir);
    assert_eq!(before.len(), 4 + host_port as usize, "{before:?}");
    // auto: tcx links where this kernel has them (a guest of the kernel matrix may not).
    let tcx = mesh_agent::datapath::features::Features::detect(
        mesh_agent::datapath::features::TcAttach::Auto,
    )
    .unwrap()
    .has(mesh_agent::datapath::features::Feature::Tcx);
    let mode = if netlink || !tcx { "netlink" } else { "tcx" };
    assert!(
        before.values().all(|(m, id)| *m == mode && id.is_some()),
        "{before:?}"
    );
    let first_agent = programs_held(guard.child.id());
    assert!(
        before
            .values()
            .all(|(_, id)| first_agent.contains(&id.unwrap())),
        "the first agent's programs run: {before:?} {first_agent:?}"
    );
    if netlink {
        assert!(
            guard
                .log()
                .contains("fallback in force: tc-netlink: tcx links (Linux 6.6) forced off"),
            "{}",
            guard.log()
        );
        // The status file says which, and meshctl shows it.
        let (_, ctl) = binaries().unwrap();
        let st = meshctl_json(topo.n.name(), &ctl, &pin_dir, &["status"]);
        // Forced here; an older kernel lacks them anyway ("missing").
        let names: Vec<&str> = st["fallbacks"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|f| f["why"] == "forced" || f["why"] == "missing")
            .map(|f| f["name"].as_str().unwrap())
            .collect();
        for want in ["tc-netlink", "own-mtu-check", "xdp-direct-access"] {
            assert!(names.contains(&want), "{want}: {st}");
        }
        let (_, text, _) = meshctl(topo.n.name(), &ctl, &pin_dir, &["status"]);
        assert!(
            text.lines()
                .any(|l| l.starts_with("fallback: own-mtu-check: ")),
            "{text}"
        );
    }

    // An established connection through the mesh (line echo on :7000).
    let echo = topo.c.enter(|| {
        std::net::TcpStream::connect_timeout(
            &(NODE.parse::<std::net::Ipv4Addr>().unwrap(), 7000).into(),
            Duration::from_secs(3),
        )
        .expect("connect to the echo service")
    });
    echo.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut lines = BufReader::new(echo.try_clone().unwrap());
    let mut ask = |w: &mut std::net::TcpStream| -> String {
        writeln!(w, "who").expect("write on the established connection");
        let mut l = String::new();
        lines
            .read_line(&mut l)
            .expect("answer on the established connection");
        l.trim().to_string()
    };
    let mut w = echo.try_clone().unwrap();
    let first = ask(&mut w);
    assert!(first.starts_with('t'), "echo answered by a task: {first:?}");

    let stop = AtomicBool::new(false);
    let (ok, failed) = (AtomicU64::new(0), AtomicU64::new(0));
    // Stops the load generator however the scope ends: a failed assertion must fail the
    // test, not leave the scope waiting on the generator for ever.
    struct StopOnDrop<'a>(&'a AtomicBool);
    impl Drop for StopOnDrop<'_> {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
    std::thread::scope(|sc| {
        let _stop = StopOnDrop(&stop);
        sc.spawn(|| {
            topo.c.enter(|| {
                while !stop.load(Ordering::Relaxed) {
                    match http_get(NODE, 8080) {
                        Ok(b) if b.starts_with('t') => ok.fetch_add(1, Ordering::Relaxed),
                        _ => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        });
        std::thread::sleep(Duration::from_millis(500));
        // SIGKILL by the PID we started: no chance to clean anything up.
        guard.child.kill().expect("kill -9 mesh-agent");
        guard.child.wait().unwrap();
        let at_kill = ok.load(Ordering::Relaxed);
        std::thread::sleep(Duration::from_secs(prereq::time_scale().into()));
        assert!(
            ok.load(Ordering::Relaxed) > at_kill + 50,
            "requests keep being answered with no agent"
        );
        assert_eq!(
            ask(&mut w),
            first,
            "the connection keeps its task with no agent"
        );

        let restarted = spawn();
        guard.handed_over = true;
        guard = wait_ready(restarted, 1);
        assert!(
            guard.log().contains("adopted the pinned datapath"),
            "{}",
            guard.log()
        );
        // Every pinned link, the cgroup socket programs' too, taken over in place.
        assert!(
            !guard.log().contains("not taking over a pinned link"),
            "{}",
            guard.log()
        );
        // Every TC hook now runs the new agent's program, in the same link or filter.
        let after = tc_programs(&topo.n, &pin_dir);
        let second_agent = programs_held(guard.child.id());
        assert_eq!(
            after.keys().collect::<Vec<_>>(),
            before.keys().collect::<Vec<_>>(),
            "the same attachments"
        );
        for (pin, (m, id)) in &after {
            let id = id.unwrap_or_else(|| panic!("{pin}: nothing attached after the restart"));
            assert_eq!(*m, mode, "{pin}");
            assert_ne!(
                Some(id),
                before[pin].1,
                "{pin}: the old agent's program still runs"
            );
            assert!(
                second_agent.contains(&id),
                "{pin}: program {id} is not the new agent's ({second_agent:?})"
            );
        }
        assert_eq!(
            ask(&mut w),
            first,
            "the connection keeps its task across the restart"
        );
        std::thread::sleep(Duration::from_millis(500));

        // The adopted state reconciles like any other: t3 leaves.
        std::fs::write(
            &config,
            to_yaml(&topo.model(&[
                (0, Health::Active),
                (1, Health::Draining),
                (2, Health::Active),
            ])),
        )
        .unwrap();
        // SAFETY: signalling the child we spawned.
        assert_eq!(
            unsafe { libc::kill(guard.child.id() as i32, libc::SIGHUP) },
            0
        );
        std::thread::sleep(Duration::from_millis(500));
        stop.store(true, Ordering::Relaxed);
    });
    let (ok, failed) = (ok.into_inner(), failed.into_inner());
    eprintln!("kill -9 / restart under load: {ok} requests answered, {failed} failed");
    assert_eq!(failed, 0, "no request fails across kill -9 and restart");
    assert!(ok > 200, "{ok} requests");
    let served: std::collections::BTreeSet<String> = topo.c.enter(|| {
        (0..40)
            .map(|_| {
                http_get(NODE, 8080)
                    .unwrap()
                    .split(' ')
                    .next()
                    .unwrap()
                    .to_string()
            })
            .collect()
    });
    assert_eq!(
        served,
        ["t1", "t3"].map(String::from).into_iter().collect(),
        "the draining task takes no new connections"
    );
    assert!(!guard.log().contains("without the agent's state file"));
    // --uninstall takes every program off its interface: the netlink filters too, which
    // no pin held.
    guard.stop_child();
    uninstall(topo.n.name(), &agent, &pin_dir);
    guard.handed_over = true;
    let left = topo.n.enter(|| {
        ["un", "h1", "h2", "h3"]
            .iter()
            .filter(|i| {
                let ix = mesh_agent::host::preflight::ifindex(i).unwrap();
                let f = mesh_agent::datapath::pins::Hook::TcUnderlay
                    .tc_filter(ix)
                    .unwrap();
                let t = mesh_agent::datapath::pins::Hook::TcTask
                    .tc_filter(ix)
                    .unwrap();
                f.program().unwrap().is_some() || t.program().unwrap().is_some()
            })
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
    });
    assert!(
        left.is_empty(),
        "filters left after --uninstall on {left:?}"
    );
    assert!(!pin_dir.exists(), "pin directory removed");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Netlink filters on an interface of another network namespace (a task's overlay veth
/// in Docker's namespace of its network) are recorded with that namespace's path: a
/// second datapath replaces their programs in place, and removing the pins removes the
/// filters there.
#[test]
fn netlink_filters_in_another_namespace_are_recorded_and_removed() {
    use mesh_agent::{
        datapath::features::{Features, TcAttach},
        datapath::loader::Datapath,
        datapath::pins::{Hook, LinkKind, PinDir},
    };
    let Some(object) =
        prereq::privileged("netlink_filters_in_another_namespace_are_recorded_and_removed")
    else {
        return;
    };
    let pair = VethPair::new("o");
    let netns = PathBuf::from(format!("/run/netns/{}", pair.b.name()));
    let pins = PinDir::new(Path::new(&format!(
        "/sys/fs/bpf/mesh-ovl-{}",
        std::process::id()
    )));
    struct Unpin<'a>(&'a PinDir);
    impl Drop for Unpin<'_> {
        fn drop(&mut self) {
            let _ = self.0.remove_all();
        }
    }
    let _unpin = Unpin(&pins);
    let attach = || {
        let features = Features::detect(TcAttach::Netlink).unwrap();
        let (mut dp, _) = Datapath::load_pinned(
            &object,
            &mesh_common::config::MeshConfig::DEFAULT,
            &pins,
            mesh_agent::datapath::pins::Sizes::OBJECT,
            features,
        )
        .expect("load");
        for hook in [Hook::TcOverlayIn, Hook::TcOverlayOut] {
            dp.attach_pinned_in(hook, &netns, "vb", &pins)
                .expect("attach in the other namespace");
        }
        // The datapath goes; the filters stay.
    };
    let ids = || -> Vec<(Hook, Option<u32>)> {
        pins.links()
            .iter()
            .map(|l| {
                assert_eq!(
                    l.kind,
                    LinkKind::Netlink {
                        netns: Some(netns.clone())
                    }
                );
                (l.hook, l.program_id().unwrap())
            })
            .collect()
    };
    attach();
    let first = ids();
    assert_eq!(first.len(), 2, "{first:?}");
    assert!(first.iter().all(|(_, id)| id.is_some()), "{first:?}");
    attach();
    let second = ids();
    assert_eq!(second.len(), 2);
    for ((h1, a), (h2, b)) in first.iter().zip(&second) {
        assert_eq!(h1, h2);
        assert!(
            b.is_some() && a != b,
            "{h1:?}: replaced in place ({a:?} -> {b:?})"
        );
    }
    let vb = pair
        .b
        .enter(|| mesh_agent::host::preflight::ifindex("vb").unwrap());
    pins.remove_all().expect("remove the pins");
    for hook in [Hook::TcOverlayIn, Hook::TcOverlayOut] {
        let f = hook.tc_filter(vb).unwrap();
        assert_eq!(
            pair.b.enter(|| f.program()).unwrap(),
            None,
            "{hook:?}'s filter removed with its record"
        );
    }
}

/// Maps pinned by another mesh version (another layout) are refused with one line that
/// says what to do, and nothing is attached.
#[test]
fn agent_refuses_a_pinned_layout_it_does_not_know() {
    let Some(object) = prereq::privileged("agent_refuses_a_pinned_layout_it_does_not_know") else {
        return;
    };
    let Some((agent, _)) = binaries() else {
        return;
    };
    let pair = VethPair::new("y");
    let pin_dir = PathBuf::from(format!("/sys/fs/bpf/mesh-layout-{}", std::process::id()));
    // With `map` pinned as `bpftool map create` makes it from `spec`, the agent (with
    // `args`) must exit 1 with one line on stderr; that line.
    let refusal = |map: &str, spec: &[&str], args: &[&str]| -> String {
        std::fs::create_dir_all(&pin_dir).unwrap();
        let path = pin_dir.join(map);
        let st = Command::new("bpftool")
            .args(["map", "create"])
            .arg(&path)
            .args(spec)
            .args(["name", map])
            .status()
            .expect("run bpftool");
        assert!(st.success(), "bpftool map create");
        let out = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", pair.b.name()))
            .arg(&agent)
            .args(["--interface", "vb", "--metrics", "off"])
            .args(args)
            .arg("--bpffs")
            .arg(&pin_dir)
            .env("MESH_BPF_OBJECT", &object)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_dir_all(&pin_dir);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        err
    };
    // MESH_BE_V1 with 8-byte values, as no version of this agent has it.
    let err = refusal(
        mesh_common::maps::BACKENDS.name,
        &["type", "hash", "key", "4", "value", "8", "entries", "16"],
        &[],
    );
    assert!(
        err.contains("another layout") && err.contains("MESH_BE_V1") && err.contains("--uninstall"),
        "one actionable line: {err}"
    );
    // A Maglev table pinned larger than --maglev-slots asks for (it cannot shrink: a
    // service's region may lie beyond).
    let err = refusal(
        mesh_common::maps::MAGLEV.name,
        &[
            "type", "array", "key", "4", "value", "4", "entries", "16384",
        ],
        &["--maglev-slots", "8192"],
    );
    assert!(
        err.contains("MESH_MAGLEV_V1")
            && err.contains("4/4/16384")
            && err.contains("--maglev-slots"),
        "one actionable line: {err}"
    );
}

/// Issue 19's conntrack sizing: `--ct-entries` sizes the map (the capacity `meshctl
/// status` shows is the map's); a restarted agent without the flag keeps the size it
/// finds pinned (an upgrade keeps its flows); one asking for another size while pins
/// exist is refused with one line naming the flag.
#[test]
fn conntrack_is_sized_by_ct_entries_and_kept_across_restarts() {
    let Some(object) =
        prereq::privileged("conntrack_is_sized_by_ct_entries_and_kept_across_restarts")
    else {
        return;
    };
    let Some((agent, meshctl)) = binaries() else {
        return;
    };
    let topo = mesh_tests::lbtopo::LbTopo::new("cz");
    let config = model_file(&topo, "cz");
    let pin_dir = PathBuf::from(format!("/sys/fs/bpf/mesh-cz-{}", std::process::id()));
    let ct = pin_dir.join(mesh_common::maps::CONNTRACK.name);
    let pinned_entries = || -> u64 {
        let out = Command::new("bpftool")
            .args(["-j", "map", "show", "pinned"])
            .arg(&ct)
            .output()
            .expect("run bpftool");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool -j");
        v["max_entries"].as_u64().expect("max_entries")
    };
    let ns = topo.n.name().to_string();
    let run = |extra: &[&str]| -> AgentGuard {
        let mut args: Vec<&std::ffi::OsStr> = vec!["--config".as_ref(), config.as_os_str()];
        args.extend(extra.iter().map(|a| std::ffi::OsStr::new(*a)));
        wait_ready(spawn_agent(&topo.n, &agent, &object, &args, &pin_dir), 1)
    };
    let capacity =
        || meshctl_json(&ns, &meshctl, &pin_dir, &["status"])["conntrack_capacity"].clone();

    let mut g = run(&["--ct-entries", "4096"]);
    assert_eq!(pinned_entries(), 4096);
    assert_eq!(capacity(), 4096);
    g.stop_child();
    g.handed_over = true;
    drop(g);
    // Restarted without the flag: the pinned map, its size and its entries, adopted.
    let mut g = run(&[]);
    assert!(g.log().contains("adopted"), "{}", g.log());
    assert_eq!(pinned_entries(), 4096);
    assert_eq!(capacity(), 4096);
    g.stop_child();
    g.handed_over = true;
    drop(g);
    // Another size while the pins exist: one line, naming the flag; nothing changed.
    let out = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{ns}"))
        .arg(&agent)
        .args(["--config".as_ref(), config.as_os_str()])
        .args(["--ct-entries", "8192", "--bpffs"])
        .arg(&pin_dir)
        .env("MESH_BPF_OBJECT", &object)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("MESH_CT_V1") && err.contains("/4096 but") && err.contains("--ct-entries"),
        "one actionable line: {err}"
    );
    assert_eq!(pinned_entries(), 4096);
    uninstall(&ns, &agent, &pin_dir);
    let _ = std::fs::remove_dir_all(config.parent().unwrap());
}

/// `bpftool -j map show pinned PATH`.
fn pinned_map(path: &Path) -> serde_json::Value {
    let out = Command::new("bpftool")
        .args(["-j", "map", "show", "pinned"])
        .arg(path)
        .output()
        .expect("run bpftool");
    serde_json::from_slice(&out.stdout).expect("bpftool -j")
}

/// Issue 19.7: a Maglev array too small for the model (4,096 slots: two 3-backend
/// services' tables) freezes only what does not fit: the agent runs and applies the
/// rest, and says what it left out (`meshctl status`, `meshctl doctor`). Restarted with a
/// larger `--maglev-slots` it grows the pinned array without flushing anything (a
/// connection open through the mesh keeps flowing, conntrack is the same map) and
/// programs what was left out. (Before: the agent exited at start, the plan refused
/// whole.)
#[test]
fn a_full_maglev_array_leaves_out_what_does_not_fit_and_grows_without_a_flush() {
    use mesh_tests::lbtopo::{http_get, LbTopo, NODE};
    use std::io::{BufRead, Write};
    let test = "a_full_maglev_array_leaves_out_what_does_not_fit_and_grows_without_a_flush";
    let Some(object) = prereq::privileged(test) else {
        return;
    };
    let Some((agent, ctl)) = binaries() else {
        return;
    };
    let topo = LbTopo::new("mx");
    let config = model_file(&topo, "mx");
    let pin_dir = PathBuf::from(format!("/sys/fs/bpf/mesh-mx-{}", std::process::id()));
    let ns = topo.n.name().to_string();
    let run = |extra: &[&str]| -> AgentGuard {
        let mut args: Vec<&std::ffi::OsStr> = vec!["--config".as_ref(), config.as_os_str()];
        args.extend(extra.iter().map(|a| std::ffi::OsStr::new(*a)));
        wait_ready(spawn_agent(&topo.n, &agent, &object, &args, &pin_dir), 1)
    };
    let maglev = || pinned_map(&pin_dir.join(mesh_common::maps::MAGLEV.name));
    let conntrack = || pinned_map(&pin_dir.join(mesh_common::maps::CONNTRACK.name))["id"].clone();
    let short_of_room = || -> Vec<String> {
        let st = meshctl_json(&ns, &ctl, &pin_dir, &["status"]);
        st["agent"]["status"]["problems"]
            .as_array()
            .unwrap_or_else(|| panic!("problems in {st}"))
            .iter()
            .filter(|p| {
                p["reason"]
                    .as_str()
                    .unwrap_or("")
                    .contains("Maglev array is full")
            })
            .map(|p| p["left_out"].as_str().unwrap().to_string())
            .collect()
    };

    let mut g = run(&["--maglev-slots", "4096"]);
    assert_eq!(maglev()["max_entries"], 4096);
    let left = short_of_room();
    assert!(
        left.iter().any(|l| l.starts_with("web/tcp/80")),
        "web left out for want of room: {left:?}\n{}",
        g.log()
    );
    let (code, doctor, _) = meshctl(&ns, &ctl, &pin_dir, &["doctor"]);
    assert!(
        doctor.contains("Maglev array is full") && doctor.contains("--maglev-slots"),
        "doctor ({code}) says what was left out: {doctor}"
    );
    // What fits is served (echo, on a connection kept open); web has no frontend.
    let (mut conn, mut lines) = topo.c.enter(|| {
        let s = std::net::TcpStream::connect((NODE, 7000)).expect("echo through the mesh");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let r = std::io::BufReader::new(s.try_clone().unwrap());
        (s, r)
    });
    let mut echo = |msg: &str| -> String {
        conn.write_all(format!("{msg}\n").as_bytes()).unwrap();
        let mut line = String::new();
        lines.read_line(&mut line).expect("an echo");
        line.trim().to_string()
    };
    // (The echo server answers each line with its task's name.)
    let first = echo("before");
    assert!(first.starts_with('t'), "{first}");
    assert!(
        topo.c.enter(|| http_get(NODE, 8080)).is_err(),
        "web is left out"
    );
    let ct = conntrack();

    g.stop_child();
    g.handed_over = true;
    drop(g);
    let mut g = run(&["--maglev-slots", "65536"]);
    assert!(
        g.log().contains("grew the pinned Maglev array"),
        "{}",
        g.log()
    );
    assert_eq!(maglev()["max_entries"], 65536);
    assert_eq!(conntrack(), ct, "the same conntrack map: nothing flushed");
    assert!(short_of_room().is_empty(), "{:?}", short_of_room());
    let after = echo("after");
    assert_eq!(
        after, first,
        "the open connection flows on, to the same task"
    );
    topo.c
        .enter(|| http_get(NODE, 8080))
        .expect("web, programmed once there is room");
    g.stop_child();
    g.handed_over = true;
    drop(g);
    // Without the flag the grown size is kept.
    let mut g = run(&[]);
    assert_eq!(maglev()["max_entries"], 65536);
    g.stop_child();
    g.handed_over = true;
    drop(g);
    println!(
        "agent: with 4096 Maglev slots {} left out (the rest served); restarted with 65536 the \
         array grew, an open connection flowed on and web was programmed",
        left.join(", ")
    );
    uninstall(&ns, &agent, &pin_dir);
    let _ = std::fs::remove_dir_all(config.parent().unwrap());
}

/// Runs `meshctl ARGS --bpffs DIR` in the node's namespace `ns` (where the interfaces
/// it names are): (exit code, stdout, stderr).
fn meshctl(ns: &str, meshctl: &Path, pin_dir: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{ns}"))
        .arg(meshctl)
        .args(args)
        .arg("--bpffs")
        .arg(pin_dir)
        .stdin(Stdio::null())
        .output()
        .expect("run meshctl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn meshctl_json(ns: &str, bin: &Path, pin_dir: &Path, args: &[&str]) -> serde_json::Value {
    let mut a = args.to_vec();
    a.push("--json");
    let (code, out, err) = meshctl(ns, bin, pin_dir, &a);
    assert_eq!(code, 0, "meshctl {args:?}: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("meshctl {args:?} --json: {e}: {out}"))
}

/// meshctl against a live mesh (the agent from a model file, real traffic through it),
/// every subcommand in both formats, then with the agent gone.
#[test]
fn meshctl_explains_a_live_mesh() {
    use mesh_tests::lbtopo::{http_get, LbTopo, CLIENT, NODE, TASKS};
    use std::io::{BufRead, Write};

    let Some(object) = prereq::privileged("meshctl_explains_a_live_mesh") else {
        return;
    };
    let Some((agent, bin)) = binaries() else {
        return;
    };
    let topo = LbTopo::new("k");
    let (mut guard, config) = start_config_agent(&topo, &agent, &object, "ctl");
    let dir = config.parent().unwrap().to_path_buf();
    let pins = guard.pin_dir.clone();
    let ns = topo.n.name().to_string();
    const REQUESTS: u64 = 45;
    let served: Vec<String> = topo.c.enter(|| {
        (0..REQUESTS)
            .map(|_| http_get(NODE, 8080).expect("through the mesh"))
            .collect()
    });
    assert_eq!(served.len() as u64, REQUESTS);
    // A connection that stays open: a live flow for `conntrack`.
    let held = topo.c.enter(|| {
        let mut s = std::net::TcpStream::connect((NODE, 7000)).expect("echo through the mesh");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"hi\n").unwrap();
        let mut line = String::new();
        std::io::BufReader::new(s.try_clone().unwrap())
            .read_line(&mut line)
            .unwrap();
        (s, line.trim().to_string())
    });
    let (stream, echo_task) = held;
    let client_port = stream.local_addr().unwrap().port();

    // status: the agent, its programs, what the maps hold.
    let (code, text, err) = meshctl(&ns, &bin, &pins, &["status"]);
    assert_eq!(code, 0, "{text}{err}");
    println!("\n$ meshctl status\n{text}");
    assert!(text.contains("agent: running"), "{text}");
    assert!(text.contains("program: mesh_tc_ingress on un"), "{text}");
    for h in ["h1", "h2", "h3"] {
        assert!(
            text.contains(&format!("program: mesh_tc_task on {h}")),
            "{text}"
        );
    }
    let st = meshctl_json(&ns, &bin, &pins, &["status"]);
    assert_eq!(st["agent"]["running"], true);
    assert_eq!(st["agent"]["status"]["source"], "config");
    assert_eq!(st["services"], 7, "{st}");
    assert!(st["flows"].as_u64().unwrap() >= 1, "{st}");
    assert_eq!(st["maps_missing"].as_array().unwrap().len(), 0);
    // The conntrack capacity shown is the map's, as the kernel reports it to bpftool.
    let ct = pins.join(mesh_common::maps::CONNTRACK.name);
    let out = Command::new("bpftool")
        .args(["-j", "map", "show", "pinned"])
        .arg(&ct)
        .output()
        .expect("run bpftool");
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool -j");
    assert!(shown["max_entries"].as_u64().is_some(), "{shown}");
    assert_eq!(st["conntrack_capacity"], shown["max_entries"], "{st}");
    assert!(
        text.contains(&format!(" of {} entries)", shown["max_entries"])),
        "{text}"
    );

    // services / service: names, frontends, backends, shares, traffic.
    let (code, text, _) = meshctl(&ns, &bin, &pins, &["services"]);
    assert_eq!(code, 0);
    for name in [
        "web/tcp/80",
        "echo/tcp/7000",
        "dns/udp/53",
        "webhost/host/tcp/8081",
    ] {
        assert!(text.contains(name), "{name} in {text}");
    }
    let web = meshctl_json(&ns, &bin, &pins, &["service", "web"]);
    let web = &web.as_array().unwrap()[0];
    assert_eq!(web["name"], "web/tcp/80");
    let fes: Vec<String> = web["frontends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| format!("{}/{}", f["port"], f["kind"]))
        .collect();
    assert!(
        fes.contains(&"8080/\"ingress\"".to_string()) && fes.contains(&"80/\"vip\"".to_string()),
        "{fes:?}"
    );
    let backends = web["backends"].as_array().unwrap();
    assert_eq!(backends.len(), 3);
    let slots: u64 = backends.iter().map(|b| b["slots"].as_u64().unwrap()).sum();
    assert_eq!(
        slots,
        web["table_size"].as_u64().unwrap(),
        "every slot names a backend"
    );
    let flows: u64 = backends.iter().map(|b| b["flows"].as_u64().unwrap()).sum();
    assert_eq!(
        flows, REQUESTS,
        "one flow per request, counted by the programs"
    );
    for b in backends {
        assert_eq!(
            (b["state"].as_str(), b["at"].as_str()),
            (Some("active"), Some("local"))
        );
        assert!(b["packets"].as_u64().unwrap() > 0, "every task served: {b}");
    }
    let (code, text, _) = meshctl(&ns, &bin, &pins, &["service", "web"]);
    assert_eq!(code, 0);
    assert!(
        text.contains("frontend *:8080/tcp (ingress)") && text.contains(TASKS[0]),
        "{text}"
    );
    println!("$ meshctl service web\n{text}");
    let (code, _, err) = meshctl(&ns, &bin, &pins, &["service", "nope"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("no service \"nope\"") && err.contains("web/tcp/80"),
        "{err}"
    );

    // conntrack: the open connection, with its backend and state.
    let flows = meshctl_json(&ns, &bin, &pins, &["conntrack", "--service", "echo"]);
    let mine: Vec<&serde_json::Value> = flows
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| {
            f["client"]
                .as_str()
                .unwrap()
                .ends_with(&format!(":{client_port}"))
        })
        .collect();
    assert_eq!(mine.len(), 1, "{flows}");
    assert_eq!(mine[0]["state"], "established");
    assert_eq!(mine[0]["frontend"], format!("{NODE}:7000"));
    let task_addr = TASKS[echo_task.trim_start_matches('t').parse::<usize>().unwrap() - 1];
    assert_eq!(mine[0]["backend"], format!("{task_addr}:7000"));
    let (code, text, _) = meshctl(&ns, &bin, &pins, &["conntrack", "--backend", task_addr]);
    assert_eq!(code, 0);
    assert!(text.contains(&format!(":{client_port}")), "{text}");

    // maglev: the table's spread.
    let mg = meshctl_json(&ns, &bin, &pins, &["maglev", "web"]);
    let shares: Vec<f64> = mg[0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["share"].as_f64().unwrap())
        .collect();
    assert!(
        shares.iter().all(|s| (s - 1.0 / 3.0).abs() < 0.02),
        "{shares:?}"
    );
    let (code, text, _) = meshctl(&ns, &bin, &pins, &["maglev", "web"]);
    assert!(code == 0 && text.contains("VS IDEAL"), "{text}");

    // stats: totals per service; --watch: rates while traffic flows.
    let st = meshctl_json(&ns, &bin, &pins, &["stats"]);
    let web_row = st
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["service"] == "web/tcp/80")
        .expect("a row for web")
        .clone();
    assert_eq!(web_row["flows"], REQUESTS);
    let watcher = {
        let (bin, pins, ns) = (bin.clone(), pins.clone(), ns.clone());
        std::thread::spawn(move || {
            meshctl(
                &ns,
                &bin,
                &pins,
                &[
                    "stats",
                    "--watch",
                    "--interval",
                    "0.5",
                    "--count",
                    "3",
                    "--json",
                ],
            )
        })
    };
    topo.c.enter(|| {
        let t = Instant::now();
        while t.elapsed() < Duration::from_millis(1600) {
            let _ = http_get(NODE, 8080);
        }
    });
    let (code, out, err) = watcher.join().unwrap();
    assert_eq!(code, 0, "{err}");
    let views: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(views.len(), 3);
    assert!(
        views
            .iter()
            .any(|v| v["services"]["web/tcp/80"]["flows_per_s"].as_f64().unwrap() > 0.0),
        "new flows per second seen: {out}"
    );

    // flush asks first; refuses without a terminal; does it with --yes.
    let (code, _, err) = meshctl(
        &ns,
        &bin,
        &pins,
        &["conntrack", "flush", "--service", "echo"],
    );
    assert_eq!(code, 1);
    assert!(err.contains("pass --yes"), "{err}");
    let f = meshctl_json(
        &ns,
        &bin,
        &pins,
        &["conntrack", "flush", "--service", "echo", "--yes"],
    );
    assert!(f["flows_flushed"].as_u64().unwrap() >= 1, "{f}");
    let left = meshctl_json(&ns, &bin, &pins, &["conntrack", "--service", "echo"]);
    assert_eq!(left.as_array().unwrap().len(), 0, "{left}");
    drop(stream);

    // trace: a synthetic first packet from a client port through the underlay program
    // names the backend; no conntrack entry stays; a real connection from that very port
    // then lands on that backend.
    // Outside the ephemeral range: no earlier request of this test used it.
    let port = 61_210u16;
    let t = meshctl_json(
        &ns,
        &bin,
        &pins,
        &[
            "trace",
            "--from",
            &format!("{CLIENT}:{port}"),
            "--to",
            &format!("{NODE}:8080"),
        ],
    );
    assert_eq!(t["return_code"], 7, "redirected into a task: {t}");
    assert_eq!(t["service"], "web/tcp/80");
    assert_eq!(t["conntrack"], "new flow");
    assert_eq!(t["conntrack_entries_removed"], 2, "{t}");
    let backend = t["backend"]["addr"].as_str().unwrap().to_string();
    assert_eq!(
        t["output"]["headers"]["dst"],
        format!("{backend}:80"),
        "the rewritten destination is the backend's: {t}"
    );
    assert_eq!(
        t["output"]["headers"]["src"],
        format!("{CLIENT}:{port}"),
        "client IP kept"
    );
    let left = meshctl_json(&ns, &bin, &pins, &["conntrack"]);
    assert!(
        !left
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["client"] == format!("{CLIENT}:{port}")),
        "no conntrack entry left by the trace: {left}"
    );
    let (code, text, _) = meshctl(
        &ns,
        &bin,
        &pins,
        &[
            "trace",
            "--from",
            &format!("{CLIENT}:{port}"),
            "--to",
            &format!("{NODE}:8080"),
        ],
    );
    assert!(
        code == 0 && text.contains("why:      new flow; Maglev slot"),
        "{text}"
    );
    println!("$ meshctl trace --from {CLIENT}:{port} --to {NODE}:8080\n{text}");
    let real = topo.c.enter(|| {
        mesh_tests::bound::http_get_from(CLIENT, port, NODE, 8080, "/")
            .expect("GET from the traced port")
    });
    let task = TASKS
        .iter()
        .position(|a| *a == backend)
        .map(|i| format!("t{}", i + 1))
        .unwrap();
    assert!(
        real.starts_with(&task),
        "trace said {task} ({backend}); real traffic: {real}"
    );
    let t = meshctl_json(
        &ns,
        &bin,
        &pins,
        &[
            "trace",
            "--from",
            &format!("{CLIENT}:61211"),
            "--to",
            &format!("{NODE}:8090"),
        ],
    );
    assert_eq!(t["service"], "empty/tcp/80", "{t}");
    assert_eq!(
        t["output"]["headers"]["flags"], "ack,rst",
        "a service without backends refuses: {t}"
    );

    // doctor: all well; then each fault it checks, induced, found, and (where the agent
    // can) repaired by --fix.
    let doc = |extra: &[&str]| {
        let mut a = vec!["doctor", "--json"];
        a.extend_from_slice(extra);
        let (code, out, err) = meshctl(&ns, &bin, &pins, &a);
        let v: serde_json::Value =
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("doctor json: {e}: {out}{err}"));
        let by: std::collections::BTreeMap<String, (String, String)> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                (
                    c["check"].as_str().unwrap().to_string(),
                    (
                        c["result"].as_str().unwrap().to_string(),
                        c["detail"].as_str().unwrap().to_string(),
                    ),
                )
            })
            .collect();
        (code, by)
    };
    let (code, by) = doc(&[]);
    assert_eq!(code, 0, "a healthy mesh: {by:?}");
    for c in [
        "bpffs",
        "maps",
        "agent",
        "underlay",
        "tasks",
        "mtu",
        "data-path port",
        "ipvs",
        "host ports",
        "drift",
    ] {
        assert_eq!(by.get(c).map(|x| x.0.as_str()), Some("ok"), "{c}: {by:?}");
    }
    // A socket on the data-path port (a Calico/NSX-style clash).
    let squatter = topo
        .n
        .enter(|| std::net::UdpSocket::bind("0.0.0.0:4789").expect("bind 4789"));
    // A program detached behind the agent's back.
    let h1 = topo
        .n
        .enter(|| mesh_agent::host::preflight::ifindex("h1").unwrap());
    std::fs::remove_file(pins.join(format!("links/tc_task-{h1}"))).expect("unpin h1's link");
    // A backend removed from the maps behind the agent's back.
    let web_be = web["backends"][0]["id"].as_u64().unwrap() as u32;
    {
        use aya::maps::{HashMap, Map, MapData};
        let data = MapData::from_pin(pins.join(mesh_common::maps::BACKENDS.name)).unwrap();
        let mut m: HashMap<MapData, u32, mesh_common::lb::Backend> =
            HashMap::try_from(Map::HashMap(data)).unwrap();
        m.remove(&web_be).expect("remove a backend");
    }
    let (_, text, _) = meshctl(&ns, &bin, &pins, &["doctor"]);
    println!("$ meshctl doctor\n{text}");
    let (code, by) = doc(&[]);
    assert_eq!(code, 5, "{by:?}");
    assert_eq!(by["data-path port"].0, "fail");
    assert!(
        by["data-path port"].1.contains("UDP 4789 is held by")
            && by["data-path port"]
                .1
                .contains(&format!("(pid {})", std::process::id())),
        "{by:?}"
    );
    assert_eq!(by["tasks"].0, "fail");
    assert!(by["tasks"].1.contains("h1"), "{by:?}");
    assert_eq!(by["drift"].0, "fail");
    assert!(by["drift"].1.contains("web/tcp/80: missing"), "{by:?}");
    drop(squatter);
    let (code, by) = doc(&["--fix"]);
    assert_eq!(code, 0, "after --fix: {by:?}");
    assert_eq!(
        (by["tasks"].0.as_str(), by["drift"].0.as_str()),
        ("ok", "ok"),
        "{by:?}"
    );
    assert!(
        // (symlink_metadata: a netlink filter's record is a symlink to no file.)
        pins.join(format!("links/tc_task-{h1}"))
            .symlink_metadata()
            .is_ok(),
        "h1's program is back"
    );
    let after: Vec<String> = topo.c.enter(|| {
        (0..30)
            .map(|_| http_get(NODE, 8080).expect("served after the repair"))
            .map(|b| b.split(' ').next().unwrap().to_string())
            .collect()
    });
    assert_eq!(
        after
            .iter()
            .collect::<std::collections::BTreeSet<_>>()
            .len(),
        3,
        "all three tasks serve after the repair: {after:?}"
    );

    // The other faults doctor checks, each induced and found (Docker's IPVS mesh cannot
    // be: this kernel has no IPVS).
    let n = topo.n.name().to_string();
    let sh = |cmd: &[&str]| {
        let st = Command::new("ip")
            .args(["netns", "exec", &n])
            .args(cmd)
            .status()
            .unwrap();
        assert!(st.success(), "{cmd:?}");
    };
    sh(&[
        "iptables", "-A", "INPUT", "-p", "udp", "--dport", "4789", "-j", "DROP",
    ]);
    let (_, by) = doc(&[]);
    assert_eq!(
        by.get("firewall").map(|x| x.0.as_str()),
        Some("warn"),
        "{by:?}"
    );
    sh(&[
        "iptables", "-D", "INPUT", "-p", "udp", "--dport", "4789", "-j", "DROP",
    ]);
    topo.n.ip(&["link", "set", "un", "mtu", "1400"]);
    let (_, by) = doc(&[]);
    assert_eq!(by["mtu"].0, "warn", "{by:?}");
    assert!(by["mtu"].1.contains("MTU 1400"), "{by:?}");
    topo.n.ip(&["link", "set", "un", "mtu", "1500"]);
    let (code, by) = doc(&["--docker", "unix:///run/mesh-no-docker-here.sock"]);
    assert_eq!((code, by["docker"].0.as_str()), (5, "fail"), "{by:?}");
    let (code, out, _) = meshctl(
        &ns,
        &bin,
        Path::new("/tmp/mesh-not-bpffs/mesh"),
        &["doctor"],
    );
    assert!(
        code == 5 && out.contains("FAIL bpffs") && out.contains("FAIL maps"),
        "{out}"
    );

    // With the agent gone, everything but the agent's own status still reads the pins.
    assert_eq!(
        unsafe { libc::kill(guard.child.id() as i32, libc::SIGTERM) },
        0
    );
    assert!(guard.child.wait().unwrap().success());
    let (code, text, _) = meshctl(&ns, &bin, &pins, &["status"]);
    assert_eq!(code, 3, "{text}");
    assert!(text.contains("agent: NOT running"), "{text}");
    let (code, text, _) = meshctl(&ns, &bin, &pins, &["services"]);
    assert!(code == 0 && text.contains("web/tcp/80"), "{text}");
    let (code, by) = doc(&[]);
    assert_eq!(
        (code, by["agent"].0.as_str()),
        (5, "fail"),
        "the agent is down: {by:?}"
    );
    let underlay = pins
        .join("links")
        .read_dir()
        .unwrap()
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with("tc_underlay-"))
        .expect("the underlay link pin")
        .path();
    std::fs::remove_file(&underlay).unwrap();
    let (_, by) = doc(&[]);
    assert_eq!(
        by["underlay"].0, "fail",
        "a detached underlay program: {by:?}"
    );
    let (code, _, err) = meshctl(
        &ns,
        &bin,
        Path::new("/sys/fs/bpf/mesh-none-here"),
        &["status"],
    );
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("no mesh is pinned"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The datapath log: off by default (no record for a new flow), `meshctl log on` makes
/// the programs write one per new flow, which the agent logs with its backend, and
/// `meshctl log off` stops them again.
#[test]
fn datapath_log_is_switched_by_meshctl() {
    use mesh_tests::lbtopo::{http_get, LbTopo, NODE};

    let Some(object) = prereq::privileged("datapath_log_is_switched_by_meshctl") else {
        return;
    };
    let Some((agent, bin)) = binaries() else {
        return;
    };
    let topo = LbTopo::new("l");
    let (guard, config) = start_config_agent(&topo, &agent, &object, "log");
    let (ns, pins) = (topo.n.name().to_string(), guard.pin_dir.clone());
    let request = || {
        topo.c
            .enter(|| http_get(NODE, 8080))
            .expect("a request through the mesh")
    };
    let records = || guard.log().matches("mesh::datapath: new flow").count();
    let settle = Duration::from_millis(500 * u64::from(prereq::time_scale()));

    assert_eq!(
        meshctl_json(&ns, &bin, &pins, &["log"])["log"],
        "off",
        "off by default"
    );
    request();
    std::thread::sleep(settle);
    assert_eq!(records(), 0, "no record while off: {}", guard.log());

    let (code, out, err) = meshctl(&ns, &bin, &pins, &["log", "on"]);
    assert_eq!((code, out.trim()), (0, "datapath log: on"), "{err}");
    request();
    let deadline = Instant::now() + Duration::from_secs(5 * u64::from(prereq::time_scale()));
    while records() == 0 {
        assert!(
            Instant::now() < deadline,
            "no record of the new flow while on: {}",
            guard.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = guard.log();
    let line = log
        .lines()
        .find(|l| l.contains("mesh::datapath: new flow"))
        .unwrap();
    println!("{line}");
    assert!(
        line.contains(&format!("-> {NODE}:8080 proto 6: backend ")),
        "the flow and its backend: {line}"
    );

    let (code, out, err) = meshctl(&ns, &bin, &pins, &["log", "off"]);
    assert_eq!((code, out.trim()), (0, "datapath log: off"), "{err}");
    let before = records();
    request();
    std::thread::sleep(settle);
    assert_eq!(records(), before, "no record once off again");
    drop(guard);
    let _ = std::fs::remove_dir_all(config.parent().unwrap());
}
