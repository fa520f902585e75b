//! A node's mesh-agent: where its binaries and pins are, started in dockerd's mount and
//! network namespaces, stopped, its state told, its pinned datapath removed.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context};

use super::{
    layout::{node_dir, recorded_nodes, sock, ST, ST_DIR_DATA_PATH_PORT},
    pids::dockerd_pid,
    pids::{alive, cmdline, kill_checked, read_pid, wait_gone},
};
use crate::cmd;

/// The agent binaries: `$MESH_AGENT_BIN_DIR` (the tests' debug build), else the release
/// build; the object: `$MESH_BPF_OBJECT`, else the release one.
pub fn agent_paths() -> (PathBuf, PathBuf) {
    let bin = std::env::var_os("MESH_AGENT_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| cmd::root().join("target/release"));
    let object = std::env::var_os("MESH_BPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| cmd::root().join("target/release/mesh.bpf.o"));
    (bin.join("mesh-agent"), object)
}

/// Whether `up --mesh` / `cluster agent start` agents (processes) run on some node.
pub fn process_agents_running() -> bool {
    (1..=recorded_nodes().unwrap_or(0))
        .any(|n| read_pid(&node_dir(n).join("mesh-agent.pid")).is_some_and(alive))
}

/// Node `n`'s agent: "running" (its recorded PID alive), "datapath-only" (no agent, its
/// pinned datapath still forwarding), or "none".
pub(super) fn agent_state(n: u32) -> (&'static str, Option<u32>) {
    match read_pid(&node_dir(n).join("mesh-agent.pid")) {
        Some(pid) if alive(pid) && cmdline(pid).contains("mesh-agent") => ("running", Some(pid)),
        _ if Path::new(&agent_pins(n)).join("links").exists() => ("datapath-only", None),
        _ => ("none", None),
    }
}

/// Starts `mesh-agent --from-docker` in node `n` (dockerd's mount and network
/// namespaces, where the task sandboxes are), records its PID, waits until it says the datapath is attached.
pub(super) fn start_agent(n: u32, agent: &Path, object: &Path) -> anyhow::Result<u32> {
    if !agent.is_file() || !object.is_file() {
        bail!(
            "{} or {} missing: run `cargo xtask build`",
            agent.display(),
            object.display()
        );
    }
    let pid = dockerd_pid(n)
        .with_context(|| format!("node {n} is not up"))?
        .to_string();
    let pins = agent_pins(n);
    let log_path = node_dir(n).join("mesh-agent.log");
    // Appended: a restarted agent's log follows its predecessor's.
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)?;
    let ready_before = std::fs::read_to_string(&log_path)
        .unwrap_or_default()
        .matches("datapath attached")
        .count();
    let mut port = Vec::new();
    if let Ok(p) = std::fs::read_to_string(Path::new(ST).join(ST_DIR_DATA_PATH_PORT)) {
        port = vec!["--data-path-port".to_string(), p.trim().to_string()];
    }
    let child = Command::new("nsenter")
        .args(["-t", &pid, "-m", "-n", "--"])
        .arg(agent)
        .args(["--from-docker", "--docker", &sock(n)])
        .args(&port)
        // A cluster to try the mesh on: `meshctl trace --node` works between its nodes.
        .arg("--serve-traces")
        .args(["--bpffs", &pins])
        .env("MESH_BPF_OBJECT", object)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?;
    let agent_pid = child.id();
    std::fs::write(node_dir(n).join("mesh-agent.pid"), agent_pid.to_string())?;
    std::mem::forget(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        if text.matches("datapath attached").count() > ready_before {
            break;
        }
        if !alive(agent_pid) || Instant::now() > deadline {
            bail!(
                "mesh-agent on node {n} did not start: see {}",
                log_path.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(agent_pid)
}

/// Node `n`'s pins: the same for the agent run by `cluster agent` and the one run by the
/// stack (`MESH_BPFFS=/sys/fs/bpf/mesh-{{.Node.Hostname}}`), so `down` removes both.
fn agent_pins(n: u32) -> String {
    format!("/sys/fs/bpf/mesh-mc-n{n}")
}

/// The agents' state directory: mesh-agent's default `--state-dir`, which the agents
/// `cluster agent` starts keep and the demo's stack is given.
pub const AGENT_STATE_DIR: &str = "/run/mesh";

/// Node `n`'s agent state file `what` (`names`, `status` or `draining`):
/// `<state dir>/<pins' name>.<what>.json`, the rule of mesh-agent's
/// `inspect::names_path` and `inspect::status_path`, repeated here once because xtask
/// does not link mesh-agent.
pub fn agent_state_file(n: u32, what: &str) -> PathBuf {
    let pins = agent_pins(n);
    let tag = Path::new(&pins)
        .file_name()
        .expect("the pins' path has a name")
        .to_string_lossy()
        .into_owned();
    Path::new(AGENT_STATE_DIR).join(format!("{tag}.{what}.json"))
}

/// Removes node `n`'s pinned datapath (after its agent stopped).
pub(super) fn uninstall_agent(n: u32) {
    let (agent, _) = agent_paths();
    let pins = agent_pins(n);
    if !Path::new(&pins).exists() {
        return;
    }
    let ok = Command::new(&agent)
        .args(["--uninstall", "--bpffs", &pins])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        // No agent binary at hand: the pins are ours all the same.
        let _ = std::fs::remove_dir_all(&pins);
        for what in ["names", "status", "draining"] {
            let _ = std::fs::remove_file(agent_state_file(n, what));
        }
    }
}

/// Stops node `n`'s mesh-agent (SIGTERM, by its recorded PID, if it is still ours).
pub(super) fn stop_agent(n: u32) {
    let Some(pid) = read_pid(&node_dir(n).join("mesh-agent.pid")) else {
        return;
    };
    kill_checked(pid, "mesh-agent", libc::SIGTERM);
    if !wait_gone(pid, 10) {
        kill_checked(pid, "mesh-agent", libc::SIGKILL);
        wait_gone(pid, 5);
    }
    let _ = std::fs::remove_file(node_dir(n).join("mesh-agent.pid"));
}
