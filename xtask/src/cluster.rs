//! `cargo xtask cluster`: a real Docker Swarm of N nodes on this machine, one network
//! namespace (and mount and UTS namespace) per node with its own dockerd, joined by a
//! bridge in an underlay namespace, plus a client namespace on that underlay. Recipe and
//! pitfalls: ../shared/notes/docker-here.md. Nothing gets a default route: no traffic
//! leaves the machine.
//!
//! Layout: state in /run/mesh-cluster (node count, PIDs, logs, rootfs); namespaces
//! `mc-ul` (bridge), `mc-n<i>` (nodes), `mc-c` (client); per node exec-root
//! /run/mesh-swarm<i> (docker.sock) and data-root /var/lib/mesh-swarm<i>.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use clap::Subcommand;

use crate::cmd::{self, exec, output};

pub const ST: &str = "/run/mesh-cluster";
const UL: &str = "mc-ul";
pub const CLIENT_NS: &str = "mc-c";
pub const IMAGE: &str = "mesh-test/busybox:latest";
const NET: &str = "10.251.0";
const POOL: &str = "10.252.0.0/16";

#[derive(Subcommand)]
pub enum Cluster {
    /// Build the swarm (idempotent): N nodes, M of them managers, the busybox image
    /// `mesh-test/busybox:latest` imported into every node, a client namespace.
    Up {
        #[arg(long, default_value_t = 3)]
        nodes: u32,
        #[arg(long, default_value_t = 1)]
        managers: u32,
        /// Also run `mesh-agent --from-docker` on every node (release build; `cargo
        /// xtask build` first).
        #[arg(long)]
        mesh: bool,
    },
    /// Nodes, their underlay addresses, roles and dockerd state; the client's address.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// The docker CLI against node NODE (1-based): `cluster docker 1 -- service ls`.
    Docker {
        node: u32,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run a command inside node NODE (its network, mount and UTS namespaces).
    Exec {
        node: u32,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        cmd: Vec<String>,
    },
    /// Run a command inside the client namespace.
    Client {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        cmd: Vec<String>,
    },
    /// Control node NODE's mesh-agent: `start`, `stop` (SIGTERM: the pinned datapath
    /// keeps forwarding), `kill` (SIGKILL, as a crash would), `restart`.
    Agent {
        node: u32,
        #[arg(value_enum)]
        action: AgentAction,
    },
    /// Stop only what `up` started (recorded PIDs) and remove every namespace, interface,
    /// mount and directory it made.
    Down,
    /// Import the test image `mesh-test/busybox:latest` (busybox-static: httpd, nc, sh,
    /// and the /cgi-bin/who page) into the dockerd at DOCKER, e.g.
    /// `unix:///var/run/docker.sock` (the single-node test's machine dockerd).
    Image {
        #[arg(long)]
        docker: String,
    },
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum AgentAction {
    Start,
    Stop,
    Kill,
    Restart,
}

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

pub fn run(c: Cluster) -> anyhow::Result<()> {
    match c {
        Cluster::Up {
            nodes,
            managers,
            mesh,
        } => {
            up(nodes, managers)?;
            if mesh {
                let (agent, object) = agent_paths();
                for n in 1..=nodes {
                    if read_pid(&node_dir(n).join("mesh-agent.pid")).is_some_and(alive) {
                        continue;
                    }
                    start_agent(n, &agent, &object)?;
                }
                println!("cluster: mesh-agent running on every node (logs in {ST}/node<N>/mesh-agent.log)");
            }
            Ok(())
        }
        Cluster::Status { json } => status(json),
        Cluster::Docker { node, args } => {
            let st = std::process::Command::new("docker")
                .arg("-H")
                .arg(sock(node))
                .args(&args)
                .status()
                .context("running docker")?;
            std::process::exit(st.code().unwrap_or(1));
        }
        Cluster::Exec { node, cmd } => {
            let pid = dockerd_pid(node).with_context(|| format!("node {node} is not up"))?;
            let st = Command::new("nsenter")
                .args(["-t", &pid.to_string(), "-n", "-m", "-u", "--"])
                .args(&cmd)
                .status()?;
            std::process::exit(st.code().unwrap_or(1));
        }
        Cluster::Client { cmd } => {
            let st = Command::new("nsenter")
                .arg(format!("--net=/run/netns/{CLIENT_NS}"))
                .arg("--")
                .args(&cmd)
                .status()?;
            std::process::exit(st.code().unwrap_or(1));
        }
        Cluster::Agent { node, action } => {
            if !node_dir(node).exists() {
                bail!("node {node} is not up (`cargo xtask cluster up` first)");
            }
            let (agent, object) = agent_paths();
            match action {
                AgentAction::Start => {
                    start_agent(node, &agent, &object)?;
                }
                AgentAction::Stop => stop_agent(node),
                AgentAction::Kill => {
                    let pid = read_pid(&node_dir(node).join("mesh-agent.pid"))
                        .with_context(|| format!("no mesh-agent recorded on node {node}"))?;
                    kill_checked(pid, "mesh-agent", libc::SIGKILL);
                    wait_gone(pid, 5);
                    let _ = std::fs::remove_file(node_dir(node).join("mesh-agent.pid"));
                }
                AgentAction::Restart => {
                    stop_agent(node);
                    start_agent(node, &agent, &object)?;
                }
            }
            Ok(())
        }
        Cluster::Down => down(),
        Cluster::Image { docker } => {
            let dir = tempdir("mesh-image")?;
            let r = rootfs_in(&dir).and_then(|root| import_image(&root, &docker));
            let _ = std::fs::remove_dir_all(&dir);
            r?;
            println!("cluster: {IMAGE} imported into {docker}");
            Ok(())
        }
    }
}

/// A fresh directory under the system's temporary directory, named for this process.
pub fn tempdir(tag: &str) -> anyhow::Result<PathBuf> {
    let d = std::env::temp_dir().join(format!("{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

/// What each node's dockerd is started through: in a fresh mount namespace, a sysfs of
/// the node's network namespace with the host's cgroup hierarchies and bpffs bound back
/// in (`ip netns exec` would lose them and dockerd would die), and a private tmpfs on
/// /run/containerd (containerd's shim socket directory is hard-coded).
const NODE_ENTRY: &str = r#"
set -e
n=$1; shift
hostname "mc-n$n"
old=/run/mesh-swarm$n/.oldsys
mkdir -p "$old"
mount --rbind /sys "$old"
mount -t sysfs sysfs /sys
for sub in fs/cgroup fs/bpf kernel/debug kernel/tracing; do
  if [ -d "$old/$sub" ] && mountpoint -q "$old/$sub"; then mount --rbind "$old/$sub" "/sys/$sub"; fi
done
mountpoint -q /sys/fs/cgroup || { echo "no /sys/fs/cgroup in node $n" >&2; exit 1; }
umount -l "$old"; rmdir "$old"
mkdir -p /run/containerd
mount -t tmpfs -o mode=0711,size=16m "mesh-swarm$n-containerd" /run/containerd
# A shared mount at the exec-root, as / is on a systemd host: the agent's container
# mounts Docker's netns directory with rslave propagation, which Docker refuses on a
# private mount.
mount --bind "/run/mesh-swarm$n" "/run/mesh-swarm$n"
mount --make-rshared "/run/mesh-swarm$n"
exec "$@"
"#;

fn node_dir(n: u32) -> PathBuf {
    Path::new(ST).join(format!("node{n}"))
}

fn exec_root(n: u32) -> String {
    format!("/run/mesh-swarm{n}")
}

fn data_root(n: u32) -> String {
    format!("/var/lib/mesh-swarm{n}")
}

pub fn sock(n: u32) -> String {
    format!("unix://{}/docker.sock", exec_root(n))
}

pub fn node_addr(n: u32) -> String {
    format!("{NET}.{}", 10 + n)
}

pub const CLIENT_ADDR: &str = "10.251.0.100";

/// Running (a zombie is not: when `up` ran in this very process, dockerd is our child
/// and lingers as one until reaped).
fn alive(pid: u32) -> bool {
    // SAFETY: reaps `pid` only if it is our own exited child; harmless otherwise.
    unsafe { libc::waitpid(pid as i32, std::ptr::null_mut(), libc::WNOHANG) };
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}

fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

fn read_pid(p: &Path) -> Option<u32> {
    std::fs::read_to_string(p).ok()?.trim().parse().ok()
}

/// dockerd's PID for node `n`, if it is still our dockerd.
fn dockerd_pid(n: u32) -> Option<u32> {
    let pid = read_pid(&node_dir(n).join("dockerd.pid"))?;
    (alive(pid) && cmdline(pid).contains(&format!("{}/docker.sock", exec_root(n)))).then_some(pid)
}

/// `<hostname>` -> the node's exec-root links (see `up`).
pub fn by_host_dir() -> PathBuf {
    Path::new(ST).join("by-host")
}

/// Whether `up --mesh` / `cluster agent start` agents (processes) run on some node.
pub fn process_agents_running() -> bool {
    (1..=recorded_nodes().unwrap_or(0))
        .any(|n| read_pid(&node_dir(n).join("mesh-agent.pid")).is_some_and(alive))
}

/// The docker sockets of the local cluster's nodes (it must be up).
pub fn node_socks() -> anyhow::Result<Vec<String>> {
    let n = recorded_nodes().context("no local cluster: run `cargo xtask cluster up` first")?;
    Ok((1..=n).map(sock).collect())
}

fn recorded_nodes() -> Option<u32> {
    std::fs::read_to_string(Path::new(ST).join("nodes"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

pub fn docker(n: u32, args: &[&str]) -> Command {
    let mut c = Command::new("docker");
    c.arg("-H").arg(sock(n)).args(args);
    c
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    exec(Command::new("ip").args(args))
}

fn up(nodes: u32, managers: u32) -> anyhow::Result<()> {
    if !cmd::is_root() {
        bail!("cluster up must run as root: it creates namespaces and runs dockerd");
    }
    if !(1..=9).contains(&nodes) || managers < 1 || managers > nodes {
        bail!("--nodes must be 1..9 and --managers 1..nodes");
    }
    if let Some(have) = recorded_nodes() {
        if have == nodes && (1..=nodes).all(|n| dockerd_pid(n).is_some()) {
            println!("cluster: already up with {nodes} nodes");
            return Ok(());
        }
        bail!("a cluster of {have} nodes is (partly) up: run `cargo xtask cluster down` first");
    }
    for need in ["dockerd", "docker", "nsenter", "unshare"] {
        if which(need).is_none() {
            bail!("{need} not found: run `cargo xtask setup` (docker.io, util-linux)");
        }
    }
    let t0 = Instant::now();
    std::fs::create_dir_all(ST)?;
    std::fs::write(Path::new(ST).join("nodes"), nodes.to_string())?;
    let rootfs = make_rootfs()?;
    // Underlay: a bridge in its own namespace (no host iptables involved).
    ip(&["netns", "add", UL])?;
    ip(&["-n", UL, "link", "set", "lo", "up"])?;
    ip(&["-n", UL, "link", "add", "br0", "type", "bridge"])?;
    ip(&["-n", UL, "link", "set", "br0", "up"])?;
    let plug = |ns: &str, port: &str, addr: &str| -> anyhow::Result<()> {
        ip(&["netns", "add", ns])?;
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
        ip(&[
            "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", port, "netns", UL,
        ])?;
        ip(&["-n", UL, "link", "set", port, "master", "br0", "up"])?;
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", ns, "link", "set", "eth0", "up"])
    };
    for n in 1..=nodes {
        plug(&format!("mc-n{n}"), &format!("v{n}"), &node_addr(n))?;
    }
    plug(CLIENT_NS, "vc", CLIENT_ADDR)?;
    for n in 1..=nodes {
        start_node(n)?;
        // `by-host/<hostname>`: the node's exec-root under the name Swarm's templates
        // give (`{{.Node.Hostname}}`), so one stack file mounts each node's own socket.
        let by_host = by_host_dir();
        std::fs::create_dir_all(&by_host)?;
        let link = by_host.join(format!("mc-n{n}"));
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(exec_root(n), link)?;
    }
    for n in 1..=nodes {
        wait_node(n)?;
    }
    for n in 1..=nodes {
        import_image(&rootfs, &sock(n))?;
    }
    let a1 = node_addr(1);
    exec(
        docker(
            1,
            &[
                "swarm",
                "init",
                "--advertise-addr",
                &a1,
                "--listen-addr",
                &format!("{a1}:2377"),
                "--default-addr-pool",
                POOL,
                "--default-addr-pool-mask-length",
                "24",
            ],
        )
        .stdout(Stdio::null()),
    )?;
    let mtok = output(&mut docker(1, &["swarm", "join-token", "-q", "manager"]))?;
    let wtok = output(&mut docker(1, &["swarm", "join-token", "-q", "worker"]))?;
    for n in 2..=nodes {
        let tok = if n <= managers {
            mtok.trim()
        } else {
            wtok.trim()
        };
        let a = node_addr(n);
        exec(
            docker(
                n,
                &[
                    "swarm",
                    "join",
                    "--advertise-addr",
                    &a,
                    "--listen-addr",
                    &format!("{a}:2377"),
                    "--token",
                    tok,
                    &format!("{a1}:2377"),
                ],
            )
            .stdout(Stdio::null()),
        )?;
    }
    println!(
        "cluster: {nodes} nodes ({managers} managers) up in {:.1} s; client namespace {CLIENT_NS} at {CLIENT_ADDR}; export DOCKER_HOST={}",
        t0.elapsed().as_secs_f64(),
        sock(1)
    );
    Ok(())
}

fn which(bin: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(bin))
        .find(|p| p.is_file())
}

/// `docker import` of the test image from `rootfs` into the dockerd at `host`.
fn import_image(rootfs: &Path, host: &str) -> anyhow::Result<()> {
    let tar = Command::new("tar")
        .args(["-C", &rootfs.to_string_lossy(), "-c", "."])
        .stdout(Stdio::piped())
        .spawn()?;
    let st = Command::new("docker")
        .args(["-H", host, "import", "-", IMAGE])
        .stdin(tar.stdout.context("tar stdout")?)
        .stdout(Stdio::null())
        .status()?;
    if !st.success() {
        bail!("importing {IMAGE} into the dockerd at {host} failed");
    }
    Ok(())
}

fn make_rootfs() -> anyhow::Result<PathBuf> {
    rootfs_in(Path::new(ST))
}

fn rootfs_in(dir: &Path) -> anyhow::Result<PathBuf> {
    let r = dir.join("bbroot");
    let bb = Path::new("/bin/busybox");
    if !bb.exists() {
        bail!("/bin/busybox (busybox-static) missing: run `cargo xtask setup`");
    }
    for d in ["bin", "www/cgi-bin", "etc", "tmp"] {
        std::fs::create_dir_all(r.join(d))?;
    }
    std::fs::copy(bb, r.join("bin/busybox"))?;
    let list = output(Command::new(bb).arg("--list"))?;
    for a in list.lines().filter(|a| *a != "busybox") {
        let _ = std::os::unix::fs::symlink("busybox", r.join("bin").join(a));
    }
    std::fs::write(r.join("www/index.html"), "ok\n")?;
    // GET /cgi-bin/who: the answering container's hostname and the client address it
    // sees (tests check that the mesh keeps the client's IP).
    let who = r.join("www/cgi-bin/who");
    std::fs::write(
        &who,
        "#!/bin/sh\nprintf 'Content-Type: text/plain\\r\\n\\r\\n%s %s\\n' \"$(hostname)\" \"$REMOTE_ADDR\"\n",
    )?;
    std::fs::set_permissions(&who, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    // `udp-who PORT`: the same answer over UDP (busybox has no UDP server), std only,
    // linked statically so the image needs no libraries.
    let src = crate::cmd::root().join("xtask/fixtures/udp_who.rs");
    exec(
        Command::new("rustc")
            .args([
                "-O",
                "-C",
                "target-feature=+crt-static",
                "--edition",
                "2021",
                "-o",
            ])
            .arg(r.join("bin/udp-who"))
            .arg(&src),
    )
    .context("building the test image's udp-who")?;
    Ok(r)
}

fn start_node(n: u32) -> anyhow::Result<()> {
    let d = node_dir(n);
    std::fs::create_dir_all(&d)?;
    std::fs::create_dir_all(exec_root(n))?;
    std::fs::create_dir_all(data_root(n))?;
    std::fs::write(
        d.join("daemon.json"),
        format!(
            "{{ \"deprecated-key-path\": \"{}/key.json\" }}\n",
            data_root(n)
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
        .args(["dockerd", "--config-file"])
        .arg(d.join("daemon.json"))
        .args(["--data-root", &data_root(n), "--exec-root", &exec_root(n)])
        .args([
            "-H",
            &sock(n),
            "--pidfile",
            &format!("{}/docker.pid", exec_root(n)),
        ])
        .args([
            "--bridge",
            "none",
            "--cgroup-parent",
            &format!("/mesh-swarm{n}"),
            "--iptables=true",
        ])
        .args(["--swarm-default-advertise-addr", &node_addr(n)])
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

fn wait_node(n: u32) -> anyhow::Result<()> {
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

fn status(json: bool) -> anyhow::Result<()> {
    let Some(nodes) = recorded_nodes() else {
        if json {
            println!("{{\"up\": false}}");
        } else {
            println!("cluster: not up");
        }
        return Ok(());
    };
    let roles = output(&mut docker(
        1,
        &["node", "ls", "--format", "{{.Hostname}} {{.ManagerStatus}}"],
    ))
    .unwrap_or_default();
    let mut rows = Vec::new();
    for n in 1..=nodes {
        let host = format!("mc-n{n}");
        let role = roles
            .lines()
            .find_map(|l| {
                l.strip_prefix(&format!("{host} "))
                    .map(|s| s.trim().to_string())
            })
            .map(|s| {
                if s.is_empty() {
                    "worker".to_string()
                } else {
                    "manager".to_string()
                }
            })
            .unwrap_or_else(|| "unknown".into());
        rows.push((n, node_addr(n), role, dockerd_pid(n), agent_state(n)));
    }
    if json {
        let nodes: Vec<String> = rows
            .iter()
            .map(|(n, a, r, p, ag)| {
                format!(
                    "{{\"node\": {n}, \"name\": \"mc-n{n}\", \"addr\": \"{a}\", \"role\": \"{r}\", \"dockerd\": {}, \"docker_host\": \"{}\", \"agent\": \"{}\", \"agent_pid\": {}}}",
                    p.map(|p| p.to_string()).unwrap_or("null".into()),
                    sock(*n),
                    ag.0,
                    ag.1.map(|p| p.to_string()).unwrap_or("null".into()),
                )
            })
            .collect();
        println!("{{\"up\": true, \"client\": \"{CLIENT_ADDR}\", \"client_netns\": \"{CLIENT_NS}\", \"nodes\": [{}]}}", nodes.join(", "));
    } else {
        println!("NODE   NAME     ADDRESS        ROLE     DOCKERD      MESH-AGENT");
        for (n, a, r, p, ag) in rows {
            println!(
                "{n:<6} mc-n{n:<4} {a:<14} {r:<8} {:<12} {}",
                p.map(|p| format!("pid {p}")).unwrap_or("down".into()),
                match ag.1 {
                    Some(pid) => format!("{} (pid {pid})", ag.0),
                    None => ag.0.to_string(),
                }
            );
        }
        println!("client namespace {CLIENT_NS} at {CLIENT_ADDR}");
    }
    Ok(())
}

/// Node `n`'s agent: "running" (its recorded PID alive), "datapath-only" (no agent, its
/// pinned datapath still forwarding), or "none".
fn agent_state(n: u32) -> (&'static str, Option<u32>) {
    match read_pid(&node_dir(n).join("mesh-agent.pid")) {
        Some(pid) if alive(pid) && cmdline(pid).contains("mesh-agent") => ("running", Some(pid)),
        _ if Path::new(&agent_pins(n)).join("links").exists() => ("datapath-only", None),
        _ => ("none", None),
    }
}

fn kill_checked(pid: u32, must: &str, sig: i32) {
    if alive(pid) && cmdline(pid).contains(must) {
        // SAFETY: signalling a PID we recorded, after checking it is still ours.
        unsafe { libc::kill(pid as i32, sig) };
    }
}

fn wait_gone(pid: u32, secs: u64) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while alive(pid) {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    true
}

fn stop_node(n: u32) {
    let quiet = |c: &mut Command| {
        let _ = c.stdout(Stdio::null()).stderr(Stdio::null()).status();
    };
    if let Some(pid) = dockerd_pid(n) {
        quiet(
            Command::new("timeout")
                .arg("20")
                .arg("docker")
                .arg("-H")
                .arg(sock(n))
                .args(["swarm", "leave", "--force"]),
        );
        if let Ok(ids) = output(&mut docker(n, &["ps", "-aq"])) {
            let ids: Vec<&str> = ids.split_whitespace().collect();
            if !ids.is_empty() {
                quiet(
                    Command::new("timeout")
                        .arg("30")
                        .arg("docker")
                        .arg("-H")
                        .arg(sock(n))
                        .arg("rm")
                        .arg("-f")
                        .args(&ids),
                );
            }
        }
        let must = format!("{}/docker.sock", exec_root(n));
        kill_checked(pid, &must, libc::SIGTERM);
        if !wait_gone(pid, 30) {
            kill_checked(pid, &must, libc::SIGKILL);
            wait_gone(pid, 5);
        }
    }
    if let Some(c) = read_pid(&node_dir(n).join("containerd.pid")) {
        let must = format!("{}/containerd/containerd.toml", exec_root(n));
        kill_checked(c, &must, libc::SIGTERM);
        if !wait_gone(c, 10) {
            kill_checked(c, &must, libc::SIGKILL);
        }
    }
    // Leftover shims of this node's containerd, by their command line.
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

fn down() -> anyhow::Result<()> {
    if !cmd::is_root() {
        bail!("cluster down must run as root");
    }
    let nodes = recorded_nodes().unwrap_or(9);
    for n in 1..=nodes {
        stop_agent(n);
    }
    // dockerd stops the containers, the stack's agents among them, before their pins go.
    for n in (1..=nodes).rev() {
        if node_dir(n).exists() {
            stop_node(n);
        }
    }
    for n in 1..=nodes {
        uninstall_agent(n);
    }
    for ns in (1..=nodes)
        .map(|n| format!("mc-n{n}"))
        .chain([CLIENT_NS.to_string(), UL.to_string()])
    {
        let _ = Command::new("ip")
            .args(["netns", "del", &ns])
            .stderr(Stdio::null())
            .status();
    }
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    for n in 1..=nodes {
        let (e, d) = (exec_root(n), data_root(n));
        let busy = mounts
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1))
            .any(|m| {
                m == e
                    || m.starts_with(&format!("{e}/"))
                    || m == d
                    || m.starts_with(&format!("{d}/"))
            });
        if busy {
            eprintln!("cluster: mounts still present under node {n}, not deleting {e} and {d}");
            continue;
        }
        let _ = std::fs::remove_dir_all(&e);
        let _ = std::fs::remove_dir_all(&d);
    }
    let _ = std::fs::remove_dir_all(ST);
    println!("cluster: down");
    Ok(())
}

/// A two-replica busybox httpd service publishing `port` (ingress mode) to its port 80.
fn create_web(name: &str, port: u16) -> anyhow::Result<()> {
    exec(
        docker(
            1,
            &["service", "create", "-d", "--name", name, "--replicas", "2"],
        )
        .args(["-p", &format!("{port}:80"), "--no-resolve-image", IMAGE])
        .args(["httpd", "-f", "-p", "80", "-h", "/www"])
        .stdout(Stdio::null()),
    )
}

/// The HTTP status the client gets from node `n`'s `port` ("" if none).
fn http_code(n: u32, port: u16, timeout_s: u32) -> String {
    output(
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{CLIENT_NS}"))
            .args(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}"])
            .args(["--max-time", &timeout_s.to_string()])
            .arg(format!("http://{}:{port}/", node_addr(n))),
    )
    .unwrap_or_default()
}

/// Starts `mesh-agent --from-docker` in node `n` (dockerd's mount and network
/// namespaces, where the task sandboxes are), records its PID, waits until it says the datapath is attached.
fn start_agent(n: u32, agent: &Path, object: &Path) -> anyhow::Result<u32> {
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
    let child = Command::new("nsenter")
        .args(["-t", &pid, "-m", "-n", "--"])
        .arg(agent)
        .args(["--from-docker", "--docker", &sock(n)])
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

/// Removes node `n`'s pinned datapath (after its agent stopped).
fn uninstall_agent(n: u32) {
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
        let _ = std::fs::remove_file(format!("/run/mesh/mesh-mc-n{n}.names.json"));
        let _ = std::fs::remove_file(format!("/run/mesh/mesh-mc-n{n}.status.json"));
    }
}

/// Stops node `n`'s mesh-agent (SIGTERM, by its recorded PID, if it is still ours).
fn stop_agent(n: u32) {
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

/// The harness checked for real (part of `cargo xtask test`): two nodes up, a
/// two-replica service scheduled on both, `up` again is a no-op, and `down` leaves no
/// namespace, directory or dockerd behind. Always tears down, also on failure.
pub fn self_test() -> anyhow::Result<String> {
    if recorded_nodes().is_some() {
        bail!("a cluster is up already (`cargo xtask cluster down` first): the harness test needs its own");
    }
    let t0 = Instant::now();
    let result = (|| -> anyhow::Result<String> {
        up(2, 1)?;
        up(2, 1)?;
        create_web("harness", 8080)?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ps = output(&mut docker(
                1,
                &[
                    "service",
                    "ps",
                    "harness",
                    "--format",
                    "{{.Node}} {{.CurrentState}}",
                ],
            ))?;
            let running: std::collections::BTreeSet<&str> = ps
                .lines()
                .filter(|l| l.contains("Running"))
                .filter_map(|l| l.split_whitespace().next())
                .collect();
            if running.len() == 2 {
                break;
            }
            if Instant::now() > deadline {
                bail!("the harness service did not run on both nodes in 60 s:\n{ps}");
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        let running = t0.elapsed();
        // The agent's Docker source, on each node (a manager and a worker): the model it
        // derives from Docker's gossip has the published port and both tasks, one local.
        let agent = crate::cmd::root().join("target/debug/mesh-agent");
        for n in 1..=2 {
            let deadline = Instant::now() + Duration::from_secs(30);
            let pid = dockerd_pid(n).context("dockerd gone")?.to_string();
            loop {
                // In dockerd's mount namespace: the task sandboxes are mounted there.
                let yaml = output(
                    Command::new("nsenter")
                        .args(["-t", &pid, "-m", "-n"])
                        .arg(&agent)
                        .args(["--print-docker-model", "--docker", &sock(n)]),
                )?;
                let ok = yaml.contains("published: 8080")
                    && yaml.matches("network: ingress").count() == 2
                    && yaml.matches("node: ").count() == 1
                    && yaml.contains(&format!("addr: {}", node_addr(3 - n)))
                    && yaml.contains("interface: veth");
                if ok {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("node {n}: the Docker source did not show the service in 30 s:\n{yaml}");
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        }
        // Now the mesh itself on both nodes. First the premise:
        // Docker has no IPVS here, so without the mesh nothing answers on 8080.
        let curl = |n: u32| http_code(n, 8080, 3);
        if curl(1) == "200" {
            bail!("node 1's 8080 answers without the mesh: is IPVS there after all?");
        }
        let object = crate::build::object_path();
        // The agents follow the Swarm themselves (--from-docker), deriving the models
        // checked above. (Debug build: the tests built it.)
        for n in 1..=2u32 {
            start_agent(n, &agent, &object)?;
        }
        for n in 1..=2 {
            for _ in 0..20 {
                let code = curl(n);
                if code != "200" {
                    bail!("node {n}'s published port through the mesh answered {code:?}");
                }
            }
        }
        let stats = output(
            Command::new(crate::cmd::root().join("target/debug/meshctl")).args([
                "stats",
                "--json",
                "--bpffs",
                "/sys/fs/bpf/mesh-mc-n1",
            ]),
        )?;
        for reason in ["\"fwd_to_task\"", "\"fwd_to_tunnel\"", "\"obs_decap\""] {
            if !stats.contains(reason) {
                bail!("node 1's counters lack {reason}: {stats}");
            }
        }
        // A new service while the agents run: time from `docker service create` to the
        // first answer on every node's published port.
        let t_create = Instant::now();
        create_web("second", 8081)?;
        let mut first = Vec::new();
        for n in 1..=2 {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let code = http_code(n, 8081, 1);
                if code == "200" {
                    first.push(t_create.elapsed());
                    break;
                }
                if Instant::now() > deadline {
                    bail!("node {n}'s 8081 did not answer within 60 s of service create");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        for n in 1..=2 {
            stop_agent(n);
        }
        Ok(format!(
            "2 nodes up and a 2-replica service running on both in {:.1} s; each node's Docker \
             source derives the published port with one local and one remote task and the \
             task's veth; without the mesh 8080 does not answer (no IPVS); with mesh-agent \
             --from-docker on both nodes, 40 of 40 requests answered, served locally and \
             through the VXLAN tunnel; a new service answered on node 1 {:.1} s and node 2 \
             {:.1} s after `docker service create` (Docker events, 1 s resync)",
            running.as_secs_f64(),
            first[0].as_secs_f64(),
            first[1].as_secs_f64()
        ))
    })();
    let t1 = Instant::now();
    let torn = down();
    let summary = result?;
    torn?;
    let leftovers: Vec<String> = ["mc-n1", "mc-n2", CLIENT_NS, UL]
        .iter()
        .filter(|ns| Path::new(&format!("/run/netns/{ns}")).exists())
        .map(|s| s.to_string())
        .chain(
            [
                ST.to_string(),
                exec_root(1),
                exec_root(2),
                data_root(1),
                data_root(2),
            ]
            .into_iter()
            .filter(|d| Path::new(d).exists()),
        )
        .collect();
    if !leftovers.is_empty() {
        bail!("cluster down left {leftovers:?}");
    }
    Ok(format!(
        "{summary}; down in {:.1} s, nothing left behind",
        t1.elapsed().as_secs_f64()
    ))
}
