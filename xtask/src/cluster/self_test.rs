//! `cluster::self_test`: the harness checked for real, cheaply (two nodes on the
//! system's engine: nothing to fetch), by `cargo xtask test`.

use std::{
    collections::BTreeSet,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context};

use super::{
    agent::{start_agent, stop_agent},
    dockerd::docker,
    down::down,
    layout::{data_root, exec_root, node_addr, node_rec, recorded_nodes, sock, CLIENT_NS, ST, UL},
    pids::dockerd_pid,
    test_image::IMAGE,
    up::up,
};
use crate::{
    cmd::{exec, output},
    engines,
};

/// The harness checked for real (part of `cargo xtask test`): two nodes up on the
/// default engine, each with its engine recorded and its own docker0, a two-replica
/// service scheduled on both, `up` again is a no-op, the agents' Docker source and the
/// mesh on both nodes, and `down` leaves no namespace, directory or dockerd behind.
/// Always tears down, also on failure.
pub fn self_test() -> anyhow::Result<String> {
    if recorded_nodes().is_some() {
        bail!("a cluster is up already (`cargo xtask cluster down` first): the harness test needs its own");
    }
    let t0 = Instant::now();
    let result = (|| -> anyhow::Result<String> {
        let names = vec![engines::DEFAULT.to_string(); 2];
        up(2, 1, &names, &BTreeSet::new(), None, true)?;
        up(2, 1, &names, &BTreeSet::new(), None, true)?;
        for n in 1..=2 {
            let rec = node_rec(n).with_context(|| format!("node {n}: no engine recorded"))?;
            if rec.engine != engines::DEFAULT || rec.stock {
                bail!("node {n}: recorded {rec:?}");
            }
            // docker0, as on any Docker node, in the node's own namespace.
            let br = output(Command::new("ip").args([
                "-n",
                &format!("mc-n{n}"),
                "-4",
                "-br",
                "addr",
                "show",
                "docker0",
            ]))?;
            if !br.contains("172.17.0.1/16") {
                bail!("node {n}: docker0 is not 172.17.0.1/16: {br:?}");
            }
        }
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
