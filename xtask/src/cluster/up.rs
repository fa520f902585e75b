//! `cluster up`: every engine resolved, the underlay bridge and the namespaces, each
//! node's dockerd, the test image, then `swarm init` and the joins.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::bail;

use super::{
    dockerd::{docker, start_node, wait_node},
    layout::{
        by_host_dir, exec_root, node_addr, node_rec, recorded_nodes, sock, write_rec, CLIENT_ADDR,
        CLIENT_NS, POOL, ST, ST_DIR_DATA_PATH_PORT, ST_NO_USERLAND_PROXY, UL,
    },
    pids::dockerd_pid,
    test_image::{import_image, make_rootfs},
};
use crate::{
    cmd::{self, exec, output},
    engines::{self, Engine},
};

/// The engine of each node: `--engines` (one per node), else `--engine` for all, else
/// the default.
pub(super) fn engine_plan(
    nodes: u32,
    engine: Option<&str>,
    engines: &[String],
) -> anyhow::Result<Vec<String>> {
    if engines.is_empty() {
        let e = engine.unwrap_or(engines::DEFAULT);
        return Ok((1..=nodes).map(|_| e.to_string()).collect());
    }
    if engines.len() != nodes as usize {
        bail!(
            "--engines names {} engines for {nodes} nodes: one per node, in node order",
            engines.len()
        );
    }
    Ok(engines.iter().map(|e| e.trim().to_string()).collect())
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    exec(Command::new("ip").args(args))
}

/// `names`: the engine of each node; `stock`: the nodes that will run no agent;
/// `data_path_port`: the swarm's VXLAN port (Docker's default without it);
/// `userland_proxy`: dockerd's setting of that name.
pub(super) fn up(
    nodes: u32,
    managers: u32,
    names: &[String],
    stock: &BTreeSet<u32>,
    data_path_port: Option<u16>,
    userland_proxy: bool,
) -> anyhow::Result<()> {
    if !cmd::is_root() {
        bail!("cluster up must run as root: it creates namespaces and runs dockerd");
    }
    if !(1..=9).contains(&nodes) || managers < 1 || managers > nodes {
        bail!("--nodes must be 1..9 and --managers 1..nodes");
    }
    assert_eq!(names.len(), nodes as usize);
    if let Some(have) = recorded_nodes() {
        let same = have == nodes
            && (1..=nodes).all(|n| {
                node_rec(n).is_some_and(|r| {
                    r.engine == names[n as usize - 1] && r.stock == stock.contains(&n)
                })
            });
        if same && (1..=nodes).all(|n| dockerd_pid(n).is_some()) {
            println!("cluster: already up with {nodes} nodes");
            return Ok(());
        }
        let what: Vec<String> = (1..=have)
            .map(|n| match node_rec(n) {
                Some(r) => format!("{}{}", r.engine, if r.stock { " stock" } else { "" }),
                None => "?".into(),
            })
            .collect();
        bail!(
            "a cluster of {have} nodes ({}) is (partly) up: run `cargo xtask cluster down` first",
            what.join(", ")
        );
    }
    for need in ["nsenter", "unshare"] {
        if which(need).is_none() {
            bail!("{need} not found: run `cargo xtask setup` (util-linux)");
        }
    }
    // Every engine first (a fetch can fail; then nothing was made).
    let mut resolved: Vec<Engine> = Vec::new();
    for name in names {
        if !resolved.iter().any(|e| &e.name == name) {
            let t = Instant::now();
            let e = engines::resolve(name)?;
            println!(
                "cluster: engine {name}: dockerd {} from {} ({:.1} s)",
                e.version,
                e.bin.display(),
                t.elapsed().as_secs_f64()
            );
            resolved.push(e);
        }
    }
    let engine_of = |n: u32| -> &Engine {
        let name = &names[n as usize - 1];
        resolved.iter().find(|e| &e.name == name).expect("resolved")
    };
    let t0 = Instant::now();
    std::fs::create_dir_all(ST)?;
    std::fs::write(Path::new(ST).join("nodes"), nodes.to_string())?;
    let no_proxy = Path::new(ST).join(ST_NO_USERLAND_PROXY);
    if userland_proxy {
        let _ = std::fs::remove_file(&no_proxy);
    } else {
        std::fs::write(&no_proxy, "")?;
    }
    for n in 1..=nodes {
        write_rec(n, engine_of(n), stock.contains(&n))?;
    }
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
        start_node(n, engine_of(n))?;
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
        import_image(&rootfs, &engine_of(n).cli(), &sock(n))?;
    }
    let a1 = node_addr(1);
    let listen = format!("{a1}:2377");
    let mut init = vec![
        "swarm",
        "init",
        "--advertise-addr",
        &a1,
        "--listen-addr",
        &listen,
        "--default-addr-pool",
        POOL,
        "--default-addr-pool-mask-length",
        "24",
    ];
    let port = data_path_port.map(|p| p.to_string());
    if let Some(p) = &port {
        init.extend(["--data-path-port", p]);
    }
    // The agents get it as a node's settings would give it (bootstrap-node.sh writes it
    // to /etc/mesh/agent.yaml): a worker learns the swarm's port only from a manager's
    // report, which its first model may not have yet.
    let record = ST_DIR_DATA_PATH_PORT;
    match &port {
        Some(p) => std::fs::write(Path::new(ST).join(record), p)?,
        None => {
            let _ = std::fs::remove_file(Path::new(ST).join(record));
        }
    }
    exec(docker(1, &init).stdout(Stdio::null()))?;
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
    let engines_line: Vec<String> = (1..=nodes)
        .map(|n| {
            format!(
                "{}{}",
                engine_of(n).name,
                if stock.contains(&n) { " (stock)" } else { "" }
            )
        })
        .collect();
    println!(
        "cluster: {nodes} nodes ({managers} managers) up in {:.1} s, engines {}; client namespace {CLIENT_NS} at {CLIENT_ADDR}; export DOCKER_HOST={}",
        t0.elapsed().as_secs_f64(),
        engines_line.join(", "),
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
