//! Tier 3: the `mesh-agent` and `meshctl` binaries for real: the agent attaches to a veth
//! in a test namespace, traffic flows, meshctl reads the pinned counters, SIGTERM
//! detaches and unpins.

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

/// Kills the agent (by the PID we started) if the test ends before it exits, and removes
/// the pin directory.
struct AgentGuard {
    child: Child,
    pin_dir: PathBuf,
}

impl Drop for AgentGuard {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
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
/// exec`, which remounts /sys and hides bpffs) and waits until every map is pinned.
fn start_agent(
    ns: &mesh_tests::netns::Netns,
    agent: &Path,
    object: &Path,
    args: &[&std::ffi::OsStr],
    tag: &str,
) -> AgentGuard {
    let pin_dir = PathBuf::from(format!("/sys/fs/bpf/mesh-{tag}-{}", std::process::id()));
    let child = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", ns.name()))
        .arg(agent)
        .args(args)
        .arg("--bpffs")
        .arg(&pin_dir)
        .env("MESH_BPF_OBJECT", object)
        .stderr(Stdio::piped())
        .spawn()
        .expect("start mesh-agent");
    let mut guard = AgentGuard { child, pin_dir };
    let last = guard
        .pin_dir
        .join(mesh_agent::mesh::PINNED_MAPS.last().unwrap());
    let deadline = Instant::now() + Duration::from_secs(10);
    while !last.exists() {
        if let Some(st) = guard.child.try_wait().unwrap() {
            let out = guard.child.wait_with_output_ref();
            panic!("mesh-agent exited early ({st}): {out}");
        }
        assert!(
            Instant::now() < deadline,
            "mesh-agent did not pin its maps in 10 s"
        );
        std::thread::sleep(Duration::from_millis(50));
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
    let pin = pin_dir.join(mesh_common::stats::STATS_MAP);

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

    // SIGTERM: a clean exit that unpins and detaches.
    let pid = guard.child.id() as i32;
    // SAFETY: signalling the child we spawned (its PID is ours to use until we reap it).
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let status = guard.child.wait().expect("wait for mesh-agent");
    assert!(status.success(), "mesh-agent exit on SIGTERM: {status}");
    assert!(!pin.exists(), "counters unpinned on exit");
    let shown = pair.b.exec(&["bpftool", "net", "show", "dev", "vb"]);
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(
        !shown.contains("mesh_tc_ingress"),
        "still attached after exit: {shown}"
    );
    let err = Command::new(&meshctl)
        .args(["stats", "--bpffs"])
        .arg(&pin_dir)
        .output()
        .unwrap();
    assert_eq!(err.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&err.stderr).contains("no mesh is pinned"));
}

/// Reads what the child wrote to stderr (for a failure message).
trait StderrOf {
    fn wait_with_output_ref(&mut self) -> String;
}

impl StderrOf for Child {
    fn wait_with_output_ref(&mut self) -> String {
        use std::io::Read;
        let mut s = String::new();
        if let Some(e) = self.stderr.as_mut() {
            let _ = e.read_to_string(&mut s);
        }
        s
    }
}

/// `mesh-agent --config FILE` drives the load balancer; SIGHUP re-reads the file.
#[test]
fn agent_config_file_and_reload() {
    use mesh_agent::model::{to_yaml, Health};
    use mesh_tests::lbtopo::{http_get, LbTopo, ALL_ACTIVE, NODE};

    let Some(object) = prereq::privileged("agent_config_file_and_reload") else {
        return;
    };
    let Some((agent, meshctl)) = binaries() else {
        return;
    };
    let topo = LbTopo::new("a");
    let dir = std::env::temp_dir().join(format!("mesh-agent-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("mesh.yaml");
    std::fs::write(&config, to_yaml(&topo.model(&ALL_ACTIVE))).unwrap();
    let mut guard = start_agent(
        &topo.n,
        &agent,
        &object,
        &["--config".as_ref(), config.as_os_str()],
        "cfg",
    );
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
