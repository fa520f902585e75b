//! `cargo xtask demo`: the mesh as users deploy it, on a local 3-node swarm. The cluster
//! (`cluster up`), the agent's image in every node (`image`), the agent as the global
//! service of deploy/mesh-stack.yml, a demo web service with a published port and a
//! HEALTHCHECK; then, from the client namespace, proof that every node answers, that
//! tasks on every node reply, and that they see the client's own address. Leaves the
//! cluster up to play with and says how to take it down. Fails (non-zero) if any of
//! those checks does not hold.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context};

use crate::{
    cluster::{self, CLIENT_ADDR},
    cmd::{self, exec, output},
};

const NODES: u32 = 3;
pub const STACK: &str = "mesh";
pub const AGENT_SERVICE: &str = "mesh_agent";
pub const WEB: &str = "demo-web";
pub const WEB_PORT: u16 = 8080;
/// Requests per node for the proof.
const REQUESTS: usize = 12;

pub fn run() -> anyhow::Result<()> {
    if !cmd::is_root() {
        bail!("the demo must run as root: it creates namespaces and runs dockerd");
    }
    // The tests hand over their own build (MESH_AGENT_BIN_DIR); users get theirs made.
    if std::env::var_os("MESH_AGENT_BIN_DIR").is_none() {
        crate::setup::run()?;
        crate::build::run()?;
    }
    let t0 = Instant::now();
    step("a 3-node swarm in network namespaces (cargo xtask cluster up)");
    if cluster::process_agents_running() {
        bail!("this cluster runs mesh-agent as processes (`cluster up --mesh`): `cargo xtask cluster down` first");
    }
    cluster::run(cluster::Cluster::Up {
        nodes: NODES,
        managers: 1,
        mesh: false,
        engine: None,
        engines: Vec::new(),
        stock: Vec::new(),
        data_path_port: None,
        userland_proxy: true,
    })?;
    let socks = cluster::node_socks()?;
    step("the agent's image mesh/agent:latest in every node (cargo xtask image, docker import)");
    crate::image::import_into(&socks)?;
    step("the mesh as a global service: docker stack deploy -c deploy/mesh-stack.yml mesh");
    deploy_stack()?;
    wait_agents(Duration::from_secs(60))?;
    step(&format!(
        "a web service: {WEB}, 3 replicas (one per node), HEALTHCHECK, published port {WEB_PORT}"
    ));
    create_web()?;
    wait_answering(Duration::from_secs(90))?;
    wait_backends(Duration::from_secs(60))?;
    step(&format!(
        "{REQUESTS} requests to each node's {WEB_PORT} from the client {CLIENT_ADDR}"
    ));
    prove()?;
    step("meshctl services (inside node 1's agent container)");
    let ctr = agent_container(1)?;
    exec(&mut cluster::docker(
        1,
        &["exec", &ctr, "meshctl", "services"],
    ))?;
    println!(
        "\ndemo: done in {:.0} s. Try:\n  \
         cargo xtask cluster client -- curl -s http://10.251.0.12:{WEB_PORT}/cgi-bin/who\n  \
         cargo xtask cluster docker 1 -- service ls\n  \
         cargo xtask cluster docker 1 -- exec {ctr} meshctl stats\n\
         Tear down: cargo xtask cluster down",
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

fn step(what: &str) {
    println!("\n== {what}");
}

/// The stack file's paths, pointed at each node's own dockerd (Swarm expands
/// `{{.Node.Hostname}}` per node; `cluster up` links `by-host/<hostname>` to the node's
/// exec-root) and its own pins (all nodes share this machine's bpffs).
fn deploy_stack() -> anyhow::Result<()> {
    let by_host = cluster::by_host_dir();
    let settings = Path::new(cluster::ST).join("etc-mesh");
    std::fs::create_dir_all(&settings)?;
    std::fs::create_dir_all(cluster::AGENT_STATE_DIR)?;
    let node = "{{.Node.Hostname}}";
    exec(
        cluster::docker(1, &["stack", "deploy", "--resolve-image", "never", "-c"])
            .arg(cmd::root().join("deploy/mesh-stack.yml"))
            .arg(STACK)
            .env("MESH_BPFFS", format!("/sys/fs/bpf/mesh-{node}"))
            .env(
                "MESH_DOCKER_SOCK",
                format!("{}/{node}/docker.sock", by_host.display()),
            )
            .env(
                "MESH_DOCKER_NETNS",
                format!("{}/{node}/netns", by_host.display()),
            )
            .env("MESH_STATE_DIR", cluster::AGENT_STATE_DIR)
            .env("MESH_SETTINGS_DIR", &settings)
            .stdout(Stdio::null()),
    )
}

/// Until every node's agent task runs and has reconciled (its status file is fresh).
pub fn wait_agents(within: Duration) -> anyhow::Result<()> {
    let start = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs_f64();
    let deadline = Instant::now() + within;
    loop {
        let fresh: Vec<u32> = (1..=NODES)
            .filter(|n| {
                let st = std::fs::read(cluster::agent_state_file(*n, "status"))
                    .ok()
                    .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok());
                st.is_some_and(|s| {
                    s["last_reconcile_unix"].as_f64().unwrap_or(0.0) > start
                        && s["pid_ns"].as_u64().unwrap_or(0) != 0
                })
            })
            .collect();
        if fresh.len() == NODES as usize {
            println!("demo: mesh-agent running in a container on nodes {fresh:?}");
            return Ok(());
        }
        if Instant::now() > deadline {
            let ps = output(&mut cluster::docker(
                1,
                &["service", "ps", "--no-trunc", AGENT_SERVICE],
            ))
            .unwrap_or_default();
            bail!("the agents did not all start within {within:?} (reconciled: {fresh:?}):\n{ps}");
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn create_web() -> anyhow::Result<()> {
    let have = output(&mut cluster::docker(
        1,
        &["service", "ls", "--format", "{{.Name}}"],
    ))?;
    if have.lines().any(|l| l.trim() == WEB) {
        println!("demo: {WEB} exists already");
        return Ok(());
    }
    exec(
        cluster::docker(1, &["service", "create", "-d", "--name", WEB])
            .args(["--replicas", "3", "--replicas-max-per-node", "1"])
            .args(["-p", &format!("{WEB_PORT}:80")])
            .args([
                "--health-cmd",
                "wget -q -O /dev/null http://127.0.0.1/ || exit 1",
            ])
            .args(["--health-interval", "2s", "--health-retries", "2"])
            .args(["--no-resolve-image", cluster::IMAGE])
            .args(["httpd", "-f", "-p", "80", "-h", "/www"])
            .stdout(Stdio::null()),
    )
}

/// `GET path` on node `n`'s published port from the client namespace; the body.
fn get(n: u32, path: &str) -> Option<String> {
    let out = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", cluster::CLIENT_NS))
        .args(["curl", "-s", "-f", "-m", "3"])
        .arg(format!("http://{}:{WEB_PORT}{path}", cluster::node_addr(n)))
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Until every node answers (the tasks have started and passed their HEALTHCHECK).
fn wait_answering(within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    while !(1..=NODES).all(|n| get(n, "/").is_some()) {
        if Instant::now() > deadline {
            let ps = output(&mut cluster::docker(1, &["service", "ps", WEB])).unwrap_or_default();
            bail!("{WEB} did not answer on every node within {within:?}:\n{ps}");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    Ok(())
}

/// Active backends of the web service in node `n`'s maps (its agent's meshctl), with
/// Maglev slots.
fn active_backends(n: u32) -> usize {
    let Ok(ctr) = agent_container(n) else {
        return 0;
    };
    let Ok(text) = output(
        cluster::docker(n, &["exec", &ctr, "meshctl", "services", "--json"]).stderr(Stdio::null()),
    ) else {
        return 0;
    };
    let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    v.as_array()
        .into_iter()
        .flatten()
        .filter(|s| {
            s["name"]
                .as_str()
                .is_some_and(|n| n.starts_with(&format!("{WEB}/")))
        })
        .flat_map(|s| s["backends"].as_array().cloned().unwrap_or_default())
        .filter(|b| b["state"] == "active" && b["slots"].as_u64().unwrap_or(0) > 0)
        .count()
}

/// Until every node's mesh sends new flows to all three tasks (each passed its
/// HEALTHCHECK, Docker's gossip has spread it, and its warm-up is over).
fn wait_backends(within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    // Held for 3 s: a node can list a remote task from Docker's gossip a moment before
    // that task's node reports its HEALTHCHECK still starting, and drain it again.
    let mut since: Option<Instant> = None;
    loop {
        let counts: Vec<usize> = (1..=NODES).map(active_backends).collect();
        if counts.iter().all(|&c| c == NODES as usize) {
            let t = *since.get_or_insert_with(Instant::now);
            if t.elapsed() >= Duration::from_secs(3) {
                println!("demo: every node's mesh has {NODES} active backends for {WEB}");
                return Ok(());
            }
        } else {
            since = None;
        }
        if Instant::now() > deadline {
            bail!(
                "active backends per node stayed at {counts:?} (want {NODES} each) for {within:?}"
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Container hostname (its short id) -> the node it runs on, for the web service.
fn task_nodes() -> anyhow::Result<BTreeMap<String, u32>> {
    let mut out = BTreeMap::new();
    for n in 1..=NODES {
        let ids = output(&mut cluster::docker(
            n,
            &[
                "ps",
                "-q",
                "--filter",
                &format!("label=com.docker.swarm.service.name={WEB}"),
            ],
        ))?;
        for id in ids.split_whitespace() {
            out.insert(id.to_string(), n);
        }
    }
    Ok(out)
}

fn prove() -> anyhow::Result<()> {
    let tasks = task_nodes()?;
    let mut served_by: BTreeSet<u32> = BTreeSet::new();
    let mut problems = Vec::new();
    for n in 1..=NODES {
        let mut per_task: BTreeMap<String, usize> = BTreeMap::new();
        let mut ok = 0;
        for _ in 0..REQUESTS {
            let Some(body) = get(n, "/cgi-bin/who") else {
                continue;
            };
            let mut it = body.split_whitespace();
            let (Some(host), Some(peer)) = (it.next(), it.next()) else {
                problems.push(format!("node {n}: unexpected answer {body:?}"));
                continue;
            };
            let peer = peer.trim_matches(['[', ']']).trim_start_matches("::ffff:");
            if peer != CLIENT_ADDR {
                problems.push(format!(
                    "node {n}: task {host} saw the client as {peer}, not {CLIENT_ADDR}"
                ));
            }
            match tasks.get(host) {
                Some(&on) => {
                    served_by.insert(on);
                }
                None => problems.push(format!("node {n}: answered by unknown task {host}")),
            }
            *per_task.entry(host.to_string()).or_default() += 1;
            ok += 1;
        }
        if per_task.len() < 2 {
            problems.push(format!(
                "node {n}: every answer came from one task ({spread:?})",
                spread = per_task.keys()
            ));
        }
        if ok < REQUESTS {
            problems.push(format!(
                "node {n}: {} of {REQUESTS} requests failed",
                REQUESTS - ok
            ));
        }
        let spread: Vec<String> = per_task
            .iter()
            .map(|(t, c)| format!("{t} (node {}) x{c}", tasks.get(t).copied().unwrap_or(0)))
            .collect();
        println!(
            "node {n} ({}): {ok}/{REQUESTS} answered by {}",
            cluster::node_addr(n),
            spread.join(", ")
        );
    }
    println!("replies came from tasks on nodes {served_by:?}; every task saw the client as {CLIENT_ADDR}");
    if served_by.len() != NODES as usize {
        problems.push(format!("replies came only from nodes {served_by:?}"));
    }
    if !problems.is_empty() {
        // What each node's mesh did, to explain the failure.
        for n in 1..=NODES {
            if let Ok(ctr) = agent_container(n) {
                println!("-- node {n}: meshctl stats, meshctl services");
                let _ = exec(&mut cluster::docker(n, &["exec", &ctr, "meshctl", "stats"]));
                let _ = exec(&mut cluster::docker(
                    n,
                    &["exec", &ctr, "meshctl", "services", "--json"],
                ));
            }
        }
        bail!("demo checks failed:\n  {}", problems.join("\n  "));
    }
    Ok(())
}

/// The agent container of the stack on node `n`.
pub fn agent_container(n: u32) -> anyhow::Result<String> {
    let ids = output(&mut cluster::docker(
        n,
        &[
            "ps",
            "-q",
            "--filter",
            &format!("label=com.docker.swarm.service.name={AGENT_SERVICE}"),
        ],
    ))?;
    ids.split_whitespace()
        .next()
        .map(str::to_string)
        .with_context(|| format!("no {AGENT_SERVICE} container on node {n}"))
}
