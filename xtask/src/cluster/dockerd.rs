//! A node's dockerd: started through `node-entry.sh` in the node's namespaces, waited
//! for, its CLI, restarted or killed with its containerd and shims, and stopped.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context};

use super::{
    agent::{agent_paths, agent_state, start_agent, stop_agent},
    layout::{data_root, exec_root, node_addr, node_dir, node_rec, sock, ST, ST_NO_USERLAND_PROXY},
    pids::{alive, cmdline, dockerd_pid, kill_checked, read_pid, wait_gone},
};
use crate::{
    cmd::output,
    engines::{self, Engine},
};

/// What each node's dockerd is started through (see the script's header).
const NODE_ENTRY: &str = include_str!("node-entry.sh");

/// The docker CLI of node `n`'s engine, against its dockerd (any CLI on PATH if the
/// node has no record).
pub fn docker(n: u32, args: &[&str]) -> Command {
    let cli = node_rec(n)
        .map(|r| r.bin.join("docker"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("docker"));
    let mut c = Command::new(cli);
    c.arg("-H").arg(sock(n)).args(args);
    c
}

pub(super) fn start_node(n: u32, engine: &Engine) -> anyhow::Result<()> {
    let d = node_dir(n);
    std::fs::create_dir_all(&d)?;
    std::fs::create_dir_all(exec_root(n))?;
    std::fs::create_dir_all(data_root(n))?;
    // The engine ID file per node (20.10 keeps it in key.json, by default shared); the
    // engine's own tini and userland proxy, whatever its dockerd would look for.
    std::fs::write(
        d.join("daemon.json"),
        format!(
            "{{ \"deprecated-key-path\": \"{}/key.json\", \"init-path\": \"{}\", \"userland-proxy-path\": \"{}\", \"userland-proxy\": {} }}\n",
            data_root(n),
            engine.bin.join("docker-init").display(),
            engine.bin.join("docker-proxy").display(),
            !Path::new(ST).join(ST_NO_USERLAND_PROXY).exists(),
        ),
    )?;
    let log = std::fs::File::create(d.join("dockerd.log"))?;
    let child = Command::new("setsid")
        .arg("nsenter")
        .arg(format!("--net=/run/netns/mc-n{n}"))
        .args([
            "unshare",
            "--mount",
            "--uts",
            "--propagation",
            "slave",
            "--",
            "bash",
            "-c",
            NODE_ENTRY,
            "entry",
        ])
        .arg(n.to_string())
        .arg(engine.dockerd())
        .arg("--config-file")
        .arg(d.join("daemon.json"))
        .args(["--data-root", &data_root(n), "--exec-root", &exec_root(n)])
        .args([
            "-H",
            &sock(n),
            "--pidfile",
            &format!("{}/docker.pid", exec_root(n)),
        ])
        // docker0 as on any node (172.17.0.1/16, each node in its own namespace).
        .args([
            "--cgroup-parent",
            &format!("/mesh-swarm{n}"),
            "--iptables=true",
        ])
        .args(["--swarm-default-advertise-addr", &node_addr(n)])
        // The engine's binaries first: containerd, its shim, runc, docker-proxy.
        .env(
            "PATH",
            format!(
                "{}:{}",
                engine.bin.display(),
                std::env::var("PATH").unwrap_or_default()
            ),
        )
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting dockerd")?;
    // setsid, nsenter, unshare and bash all exec: this PID becomes dockerd's.
    std::fs::write(d.join("dockerd.pid"), child.id().to_string())?;
    std::mem::forget(child);
    Ok(())
}

pub(super) fn wait_node(n: u32) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if docker(n, &["version"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()?
            .success()
        {
            break;
        }
        let pid = read_pid(&node_dir(n).join("dockerd.pid")).unwrap_or(0);
        if !alive(pid) {
            bail!(
                "dockerd of node {n} died: see {}",
                node_dir(n).join("dockerd.log").display()
            );
        }
        if Instant::now() > deadline {
            bail!(
                "dockerd of node {n} not ready in 30 s: see {}",
                node_dir(n).join("dockerd.log").display()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    if let Ok(c) = std::fs::read_to_string(format!("{}/containerd/containerd.pid", exec_root(n))) {
        std::fs::write(node_dir(n).join("containerd.pid"), c.trim())?;
    }
    Ok(())
}

/// `cluster dockerd N restart|kill` (see the subcommand).
pub(super) fn restart_dockerd(n: u32, action: DockerdAction) -> anyhow::Result<()> {
    let rec = node_rec(n).with_context(|| format!("node {n} is not up"))?;
    let engine = engines::resolve(&rec.engine)?;
    let pid = dockerd_pid(n).with_context(|| format!("node {n}'s dockerd is not running"))?;
    let had_agent = agent_state(n).0 == "running";
    if had_agent {
        stop_agent(n);
    }
    let must = format!("{}/docker.sock", exec_root(n));
    let t = Instant::now();
    match action {
        DockerdAction::Restart => {
            kill_checked(pid, &must, libc::SIGTERM);
            if !wait_gone(pid, 60) {
                bail!("node {n}'s dockerd did not stop within 60 s of SIGTERM");
            }
        }
        DockerdAction::Kill => {
            kill_checked(pid, &must, libc::SIGKILL);
            wait_gone(pid, 5);
        }
    }
    // Its containerd and shims: gone after a graceful stop; killed after a crash (they
    // live in the node's old mount namespace, which the new dockerd cannot reach).
    kill_containerd(n);
    // A killed dockerd or containerd leaves its pidfile, and until something reaps it,
    // a zombie under that PID, which the new dockerd takes for that daemon still running
    // (and waits for a containerd that never answers).
    for pidfile in [
        format!("{}/docker.pid", exec_root(n)),
        format!("{}/containerd/containerd.pid", exec_root(n)),
    ] {
        if read_pid(Path::new(&pidfile)).is_some_and(|p| !alive(p)) {
            let _ = std::fs::remove_file(&pidfile);
        }
    }
    start_node(n, &engine)?;
    wait_node(n)?;
    println!(
        "cluster: node {n}'s dockerd {} and started again in {:.1} s",
        match action {
            DockerdAction::Restart => "stopped (SIGTERM)",
            DockerdAction::Kill => "killed (SIGKILL, with its containerd and shims)",
        },
        t.elapsed().as_secs_f64()
    );
    if had_agent {
        let (agent, object) = agent_paths();
        start_agent(n, &agent, &object)?;
    }
    Ok(())
}

/// Node `n`'s containerd (by its recorded PID) and its shims (by their command line).
fn kill_containerd(n: u32) {
    if let Some(c) = read_pid(&node_dir(n).join("containerd.pid")) {
        let must = format!("{}/containerd/containerd.toml", exec_root(n));
        kill_checked(c, &must, libc::SIGTERM);
        if !wait_gone(c, 10) {
            kill_checked(c, &must, libc::SIGKILL);
            wait_gone(c, 5);
        }
    }
    let shim = format!("-address {}/containerd/containerd.sock", exec_root(n));
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            if let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() {
                if cmdline(pid).contains(&shim) {
                    // SAFETY: a shim of our own containerd, by its command line.
                    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                }
            }
        }
    }
    // What a killed shim leaves running: the containers' processes, in the cgroups runc
    // made under the node's --cgroup-parent.
    for pid in node_cgroup_pids(n) {
        // SAFETY: a process in this node's own cgroup tree (a container of its engine).
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
}

/// The processes in node `n`'s cgroups (`/sys/fs/cgroup/<hierarchy>/mesh-swarm<n>/...`).
fn node_cgroup_pids(n: u32) -> BTreeSet<u32> {
    let mut out = BTreeSet::new();
    let Ok(rd) = std::fs::read_dir("/sys/fs/cgroup") else {
        return out;
    };
    for h in rd.flatten() {
        let root = h.path().join(format!("mesh-swarm{n}"));
        let mut dirs = vec![root];
        while let Some(d) = dirs.pop() {
            let Ok(entries) = std::fs::read_dir(&d) else {
                continue;
            };
            if let Ok(procs) = std::fs::read_to_string(d.join("cgroup.procs")) {
                out.extend(procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
            }
            dirs.extend(entries.flatten().map(|e| e.path()).filter(|p| p.is_dir()));
        }
    }
    out
}

pub(super) fn stop_node(n: u32) {
    let quiet = |c: &mut Command| {
        let _ = c.stdout(Stdio::null()).stderr(Stdio::null()).status();
    };
    if let Some(pid) = dockerd_pid(n) {
        // The node's own CLI, under a timeout.
        let timed = |secs: &str, args: &[&str]| {
            let d = docker(n, args);
            let mut c = Command::new("timeout");
            c.arg(secs).arg(d.get_program()).args(d.get_args());
            c
        };
        quiet(&mut timed("20", &["swarm", "leave", "--force"]));
        if let Ok(ids) = output(&mut docker(n, &["ps", "-aq"])) {
            let ids: Vec<&str> = ids.split_whitespace().collect();
            if !ids.is_empty() {
                let mut args = vec!["rm", "-f"];
                args.extend(&ids);
                quiet(&mut timed("30", &args));
            }
        }
        let must = format!("{}/docker.sock", exec_root(n));
        kill_checked(pid, &must, libc::SIGTERM);
        if !wait_gone(pid, 30) {
            kill_checked(pid, &must, libc::SIGKILL);
            wait_gone(pid, 5);
        }
    }
    kill_containerd(n);
    std::thread::sleep(Duration::from_millis(300));
    // The cgroups runc made under --cgroup-parent /mesh-swarmN.
    if let Ok(rd) = std::fs::read_dir("/sys/fs/cgroup") {
        for e in rd.flatten() {
            let cg = e.path().join(format!("mesh-swarm{n}"));
            if cg.is_dir() {
                let _ = Command::new("find")
                    .arg(&cg)
                    .args(["-depth", "-type", "d", "-exec", "rmdir", "{}", ";"])
                    .status();
            }
        }
    }
}

/// What `cluster dockerd N` does to a node's dockerd.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DockerdAction {
    Restart,
    Kill,
}
