//! The deployment kit, as users run it: `cargo xtask demo` (a real 3-node swarm, the
//! agent image by `docker import`, the mesh as deploy/mesh-stack.yml's global service, a
//! web service with a HEALTHCHECK), then a rolling update of the mesh service itself
//! under load (zero failed requests: the pinned datapath covers each node's stop-first
//! window), then deploy/bootstrap-node.sh for real on a node of that swarm, whose
//! installed meshctl must see the live agent.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::Duration,
};

use mesh_tests::{
    scratch::Scratch,
    swarm::{Load, Swarm},
};

/// The stack's agent container on each node (node -> container id).
fn agent_containers(s: &Swarm) -> BTreeMap<u32, String> {
    (1..=s.nodes)
        .map(|n| {
            let id = s.docker(
                n,
                &[
                    "ps",
                    "-q",
                    "--filter",
                    "label=com.docker.swarm.service.name=mesh_agent",
                ],
            );
            (n, id)
        })
        .collect()
}

#[test]
fn demo_then_a_rolling_update_of_the_mesh_then_bootstrap_on_a_node() {
    let Some(object) = mesh_tests::prereq::privileged("deploy") else {
        return;
    };
    let Some((s, demo)) = Swarm::demo() else {
        return;
    };
    eprintln!("{demo}");
    // The demo checks these itself and fails otherwise; the test holds it to its word.
    for want in [
        "mesh-agent running in a container on nodes [1, 2, 3]",
        "every node's mesh has 3 active backends for demo-web",
        "replies came from tasks on nodes {1, 2, 3}; every task saw the client as 10.251.0.100",
        "Tear down: cargo xtask cluster down",
    ] {
        assert!(demo.contains(want), "the demo did not say {want:?}");
    }
    for n in 1..=3 {
        assert!(
            demo.contains(&format!("node {n} (10.251.0.1{n}): 12/12 answered")),
            "node {n} did not answer every request"
        );
    }

    // Rolling update of the mesh itself: every node's agent container is replaced, one
    // node at a time, stop-first, while a client keeps asking every node.
    let before = agent_containers(&s);
    assert!(
        before.values().all(|id| !id.is_empty()),
        "agents: {before:?}"
    );
    let targets = (1..=s.nodes).map(|n| (s.addr(n), 8080)).collect();
    let load = Load::start(&s, targets, "/cgi-bin/who");
    std::thread::sleep(Duration::from_secs(2));
    load.mark("docker service update --force mesh_agent");
    s.docker(
        1,
        &[
            "service",
            "update",
            "--force",
            "--detach=false",
            "mesh_agent",
        ],
    );
    load.mark("converged");
    std::thread::sleep(Duration::from_secs(3));
    let (ok, failures) = load.finish();
    let after = agent_containers(&s);
    eprintln!(
        "rolling update: {ok} requests answered, {} failed; agents {before:?} -> {after:?}",
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "requests failed during the rolling update: {failures:?}"
    );
    assert!(ok > 100, "too little load to mean anything: {ok}");
    for n in 1..=s.nodes {
        assert!(
            !after[&n].is_empty() && after[&n] != before[&n],
            "node {n}'s agent was not replaced: {before:?} -> {after:?}"
        );
        // The new agent took over the pinned datapath instead of starting afresh.
        let out = s.try_docker(n, &["logs", &after[&n]]);
        let logs = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            logs.contains("adopted the pinned datapath (nothing flushed)"),
            "node {n}'s new agent did not adopt the pins:\n{logs}"
        );
        let (code, out, err) = s.meshctl(n, &["status"]);
        assert_eq!(code, 0, "meshctl status on node {n}: {out}{err}");
        assert!(out.contains("agent: running"), "node {n}: {out}");
    }

    // The stack's health check catches a stuck agent: stopped (SIGSTOP, by the PID
    // Docker gives for its container) it stays "running" but stops reconciling.
    let pid: i32 = s
        .docker(2, &["inspect", "-f", "{{.State.Pid}}", &after[&2]])
        .parse()
        .expect("agent pid");
    assert!(pid > 1);
    let (code, out, _) = s.meshctl(2, &["status", "--max-age", "5"]);
    assert_eq!(code, 0, "a live agent is healthy: {out}");
    // SAFETY: signals the agent process of node 2's container, which this test's swarm runs.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    std::thread::sleep(Duration::from_secs(7));
    let (stuck, out, _) = s.meshctl(2, &["status", "--max-age", "5"]);
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    assert_eq!(
        stuck, 6,
        "a stopped agent must fail the health check: {out}"
    );
    assert!(out.contains("unhealthy: no reconcile for"), "{out}");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while s.meshctl(2, &["status", "--max-age", "5"]).0 != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the agent did not recover after SIGCONT"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // The bootstrap script for real on node 1 (its network and mount namespaces: the
    // live checks, bpffs and sysctls are the node's), files under a scratch root.
    let root = Scratch::new("deploy-root");
    let from = Scratch::new("deploy-from");
    let bin_dir = std::env::var_os("MESH_AGENT_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug"));
    for b in ["mesh-agent", "meshctl"] {
        std::os::unix::fs::symlink(bin_dir.join(b), from.path().join(b)).unwrap();
    }
    std::os::unix::fs::symlink(&object, from.path().join("mesh.bpf.o")).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/bootstrap-node.sh");
    let bootstrap = |extra: &[&str]| {
        let mut a = vec![
            "cluster".to_string(),
            "exec".into(),
            "1".into(),
            "--".into(),
            script.display().to_string(),
            "--root".into(),
            root.path().display().to_string(),
            "--from".into(),
            from.path().display().to_string(),
            "--no-docker-install".into(),
        ];
        a.extend(extra.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = a.iter().map(String::as_str).collect();
        let out = s.cli(&refs);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    };
    let (ok, text) = bootstrap(&["--data-path-port", "4789"]);
    eprintln!("{text}");
    assert!(ok, "bootstrap on node 1 failed:\n{text}");
    for want in [
        "ok: kernel",
        "ok: BTF",
        "ok: Docker present",
        "ok: bpffs mounted at /sys/fs/bpf",
        "ok: net.ipv4.ip_forward = 1",
    ] {
        assert!(
            text.contains(want),
            "bootstrap did not say {want:?}:\n{text}"
        );
    }
    let meshctl = root.path().join("usr/local/bin/meshctl");
    assert_eq!(
        std::fs::read(&meshctl).unwrap(),
        std::fs::read(bin_dir.join("meshctl")).unwrap(),
        "installed meshctl differs from the build"
    );
    let yaml = std::fs::read_to_string(root.path().join("etc/mesh/agent.yaml")).unwrap();
    assert!(yaml.contains("data-path-port: 4789"), "{yaml}");
    assert!(root.path().join("run/mesh").is_dir());
    let (ok, again) = bootstrap(&[]);
    assert!(
        ok && !again.contains("changed:"),
        "a second run changed things:\n{again}"
    );
    // The meshctl it installed, run on the node, sees the agent in its container.
    let out = s.cli(&[
        "cluster",
        "exec",
        "1",
        "--",
        &meshctl.display().to_string(),
        "status",
        "--bpffs",
        "/sys/fs/bpf/mesh-mc-n1",
        "--state-dir",
        "/run/mesh",
    ]);
    let st = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && st.contains("agent: running"),
        "installed meshctl status:\n{st}"
    );
}
