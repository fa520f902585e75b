//! Tier 3: real Docker Swarms with `mesh-agent --from-docker` on every node: 3 nodes
//! (`cargo xtask cluster`, one dockerd per network namespace) on Docker 20.10 and again on
//! Docker 28.5; a mixed swarm (28.5 and 20.10 nodes, one stock node without the mesh);
//! and 1 node on this machine's own dockerd. This kernel has no IPVS: Docker alone
//! answers on no published port and no VIP here, so every check below is the mesh's.
//!
//! One swarm per test, phases in order (a swarm costs ~20 s to build and tear down):
//! published port on every node with the client's IP kept; scale and rolling updates
//! under load with zero failed requests; an unhealthy task out of rotation on every node
//! within 2 s of Docker reporting it; `kill -9` of an agent under load; draining a node
//! under load; host-mode publishing; a service's VIP from another service's tasks;
//! service labels; the agents' event lag, from their metrics; then moby's Swarm
//! networking spec rows (`swarm/conformance.rs`, README's conformance table).

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use mesh_tests::swarm::{http, Load, Swarm};

#[path = "swarm/conformance.rs"]
mod conformance;

const IMAGE: &str = "mesh-test/busybox:latest";

/// `docker service create -d ARGS` of the test image's httpd (serving /www, with the
/// `/cgi-bin/who` page) on port 80.
fn create_httpd(s: &Swarm, args: &[&str]) {
    let mut a = vec!["service", "create", "-d"];
    a.extend_from_slice(args);
    a.extend_from_slice(&[
        "--no-resolve-image",
        IMAGE,
        "httpd",
        "-f",
        "-p",
        "80",
        "-h",
        "/www",
    ]);
    s.docker(1, &a);
}

fn who(s: &Swarm, node: u32, port: u16) -> std::io::Result<String> {
    let a = s.addr(node);
    s.client(|| http(a, port, "/cgi-bin/who", Duration::from_secs(2)))
}

/// Answers per task over `n` requests to each node's `port`.
fn spread(s: &Swarm, port: u16, n: usize) -> BTreeMap<u32, BTreeMap<String, usize>> {
    (1..=s.nodes)
        .map(|node| {
            let mut m = BTreeMap::new();
            for _ in 0..n {
                let body = who(s, node, port)
                    .unwrap_or_else(|e| panic!("node {node}:{port} did not answer: {e}"));
                let task = body.split_whitespace().next().unwrap_or("").to_string();
                assert!(
                    body.contains(&s.client_addr().to_string()),
                    "the task sees the client's address, not a node's: {body:?}"
                );
                *m.entry(task).or_insert(0) += 1;
            }
            (node, m)
        })
        .collect()
}

/// Waits until every node's `port` answers (the first answer each), returning when.
fn wait_answering(s: &Swarm, port: u16, within: Duration) -> Vec<Duration> {
    let t0 = Instant::now();
    (1..=s.nodes)
        .map(|node| loop {
            if who(s, node, port).is_ok() {
                break t0.elapsed();
            }
            assert!(
                t0.elapsed() < within,
                "node {node}:{port} not answering within {within:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        })
        .collect()
}

/// The caller container on `node`.
fn caller(s: &Swarm, node: u32) -> String {
    let id = s.docker(node, &["ps", "-q", "-f", "name=caller"]);
    assert!(!id.is_empty(), "no caller container on node {node}");
    id
}

/// `n` requests from node `node`'s caller to the api service by name (its VIP): the
/// (task, client address it saw) of each answer, and the caller's own address.
fn vip_answers(s: &Swarm, node: u32, n: usize) -> (Vec<(String, String)>, String) {
    let script = format!(
        "ip -4 -o addr show eth0 | awk '{{print $4}}'; for i in $(seq {n}); do \
         printf 'GET /cgi-bin/who HTTP/1.0\\r\\n\\r\\n' | nc -w 2 api 80 | tail -1; done"
    );
    let out = s.docker(node, &["exec", &caller(s, node), "sh", "-c", &script]);
    let mut lines = out.lines();
    let me = lines
        .next()
        .and_then(|l| l.split('/').next())
        .unwrap_or_default()
        .to_string();
    let answers = lines
        .filter_map(|l| {
            // "api.2.<task id> [::ffff:10.0.1.8]"
            let (task, client) = l.split_once(' ')?;
            let client = client
                .trim()
                .trim_start_matches("[::ffff:")
                .trim_end_matches(']');
            Some((task.to_string(), client.to_string()))
        })
        .collect();
    (answers, me)
}

fn all_nodes(s: &Swarm, port: u16) -> Vec<(std::net::Ipv4Addr, u16)> {
    (1..=s.nodes).map(|n| (s.addr(n), port)).collect()
}

fn assert_no_failures(what: &str, load: Load) -> u64 {
    let slow = load.slow.clone();
    let (ok, failed) = load.finish();
    println!(
        "swarm: {what}: {} of {ok} answered requests took over 0.9 s (a SYN retried)",
        slow.load(std::sync::atomic::Ordering::Relaxed)
    );
    assert!(
        failed.is_empty(),
        "{what}: {} of {} requests failed: {:?}",
        failed.len(),
        ok + failed.len() as u64,
        &failed[..failed.len().min(10)]
    );
    // A sanity check that the load ran (short phases answer a few hundred; each
    // request that needed a SYN retry costs a second of this sequential client).
    assert!(ok > 20, "{what}: only {ok} requests answered");
    ok
}

/// 3 nodes on Docker 20.10 (Debian 12's docker.io, the harness's default engine).
#[test]
fn swarm_three_nodes() {
    if mesh_tests::prereq::privileged("swarm_three_nodes").is_none() {
        return;
    }
    let Some(mut s) = Swarm::up_with(mesh_tests::swarm::Opts {
        nodes: 3,
        engines: &["20.10"],
        stock: &[],
        data_path_port: None,
        userland_proxy: true,
    }) else {
        return;
    };
    three_node_phases(&mut s);
}

/// The same phases with every node on Docker 28.5 (Debian unstable's docker.io, with
/// containerd 2.1; fetched into the engines' cache on first use).
#[test]
fn swarm_three_nodes_docker_28() {
    if mesh_tests::prereq::privileged("swarm_three_nodes_docker_28").is_none() {
        return;
    }
    let Some(mut s) = Swarm::up_with(mesh_tests::swarm::Opts {
        nodes: 3,
        engines: &["28.5"],
        stock: &[],
        data_path_port: None,
        userland_proxy: true,
    }) else {
        return;
    };
    three_node_phases(&mut s);
}

/// The phases of a 3-node swarm with the mesh on every node, in order.
fn three_node_phases(s: &mut Swarm) {
    publish(s);
    updates_under_load(s);
    unhealthy_out_within_2s(s);
    kill_agent_under_load(s, 2);
    drain_across_an_agent_restart(s);
    drain_under_load(s);
    host_mode(s);
    from_the_node(s);
    vip_east_west(s);
    meshctl_views(s);
    labels(s);
    event_lag(s);
    conformance_phases(s);
}

/// moby's spec rows on a swarm with the mesh on every node (tests/swarm/conformance.rs),
/// each phase's time printed (the CI's budget is spent here).
fn conformance_phases(s: &Swarm) {
    let timed = |name: &str, phase: &dyn Fn(&Swarm)| {
        let t = Instant::now();
        phase(s);
        println!("swarm: phase {name}: {:.0} s", t.elapsed().as_secs_f64());
    };
    timed(
        "tcp_and_udp_on_one_port",
        &conformance::tcp_and_udp_on_one_port,
    );
    timed(
        "a_model_problem_costs_only_its_service",
        &conformance::a_model_problem_costs_only_its_service,
    );
    timed("beyond_the_mtu", &conformance::beyond_the_mtu);
    timed("udp_without_listener", &conformance::udp_without_listener);
    timed("two_subnets", &conformance::two_subnets);
    timed(
        "vip_from_a_plain_container",
        &conformance::vip_from_a_plain_container,
    );
    timed("vip_across_subnets", &conformance::vip_across_subnets);
    timed(
        "lone_task_calls_its_own_vip",
        &conformance::lone_task_calls_its_own_vip,
    );
    timed("port_in_use", &conformance::port_in_use);
    timed(
        "docker_s_own_port_mappings",
        &conformance::docker_s_own_port_mappings,
    );
    timed("vip_through_churn", &conformance::vip_through_churn);
    timed("health_on_vips", &conformance::health_on_vips);
    timed(
        "isolation_and_udp_on_overlays",
        &conformance::isolation_and_udp_on_overlays,
    );
    // Row 11.2/heal-persists checks 310 s after the heal: the phases between fill the
    // wait (it costs no CI time); the first ones after it do not involve node 3 (Docker's
    // overlay toward a healed node took 20-40 s more to come back, measured by hand).
    let t = Instant::now();
    let healed = conformance::partition_heals(s);
    println!(
        "swarm: phase partition_heals: {:.0} s",
        t.elapsed().as_secs_f64()
    );
    timed("broadcast_and_multicast_as_docker", &|s| {
        conformance::broadcast_and_multicast_as_docker(s, 2, 1)
    });
    timed("forged_vxlan", &conformance::forged_vxlan);
    timed(
        "vxlan_to_the_advertise_address",
        &conformance::vxlan_to_the_advertise_address,
    );
    timed("host_mode_variants", &conformance::host_mode_variants);
    timed("ingress_isolation", &conformance::ingress_isolation);
    timed("address_moves", &conformance::address_moves);
    timed(
        "network_add_and_remove",
        &conformance::network_add_and_remove,
    );
    timed("vip_and_dnsrr", &conformance::vip_and_dnsrr);
    timed(
        "published_port_lifecycle",
        &conformance::published_port_lifecycle,
    );
    timed("graceful_stop", &conformance::graceful_stop);
    timed("dockerd_restarts", &conformance::dockerd_restarts);
    // Engine-independent for the mesh and the costliest phase (Docker takes 1-2 min to
    // start a task on 100 networks): on one engine.
    if s.engine(1) == "28.5" {
        timed("a_hundred_networks", &conformance::a_hundred_networks);
    }
    timed("heal_persists", &|s| conformance::heal_persists(s, healed));
    timed("rejoin", &conformance::rejoin);
    // Last: it removes every service and re-creates the ingress network.
    timed("custom_ingress", &conformance::custom_ingress);
}

/// A swarm in the middle of a rollout, on mixed engines: node 1 (the manager) on Docker
/// 28.5 and node 2 on 20.10, both with the mesh; node 3 a stock Docker 20.10 node
/// without it. For now, what works today: a published port answers on both mesh nodes
/// from a task on every node (the stock node's too, reached through its kernel VXLAN),
/// tasks on mesh nodes seeing the client's address; the stock node itself answers
/// nothing (Docker's IPVS mesh cannot run on this kernel).
#[test]
fn swarm_mixed() {
    if mesh_tests::prereq::privileged("swarm_mixed").is_none() {
        return;
    }
    let Some(s) = Swarm::up_with(mesh_tests::swarm::Opts {
        nodes: 3,
        engines: &["28.5", "20.10", "20.10"],
        stock: &[3],
        // Row 1/dp-port: a swarm on a data-path port of its own (4789 is taken on some
        // networks, VMware NSX's for one); the stock node speaks it too.
        data_path_port: Some(7789),
        // Row 7.1/proxy-agnostic: the 3-node swarms run Docker's default (true).
        userland_proxy: false,
    }) else {
        return;
    };
    for n in [1, 2] {
        let (_, out, err) = s.meshctl(n, &["status", "--json"]);
        let v: serde_json::Value = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("node {n}: status --json: {e}: {out}{err}"));
        assert_eq!(
            v["agent"]["status"]["data_path_port"], 7789,
            "node {n}: the swarm's port: {out}"
        );
        assert!(
            v["agent"]["status"]["data_path_port_mismatch"].is_null(),
            "node {n}: no mismatch: {out}"
        );
    }
    assert_eq!(
        (s.engine(1), s.engine(2), s.engine(3)),
        ("28.5", "20.10", "20.10")
    );
    assert!(!s.is_stock(1) && !s.is_stock(2) && s.is_stock(3));
    let t_create = Instant::now();
    create_httpd(
        &s,
        &[
            "--name",
            "web",
            "--replicas",
            "3",
            "--replicas-max-per-node",
            "1",
            "-p",
            "8080:80",
            "--hostname",
            "{{.Task.Name}}",
        ],
    );
    // "web.2" -> "mc-n3"
    let placed: BTreeMap<String, String> = s
        .wait_running("web", 3, Duration::from_secs(60))
        .into_iter()
        .collect();
    let nodes_of: BTreeSet<&String> = placed.values().collect();
    assert_eq!(nodes_of.len(), 3, "one task per node: {placed:?}");
    let node_of = |task: &str| -> u32 {
        let slot = task.split('.').take(2).collect::<Vec<_>>().join(".");
        s.node_index(&placed[&slot])
    };
    // Each mesh node answers, from all three tasks, once the gossip has reached it.
    let mut seen: BTreeMap<(u32, String), BTreeSet<String>> = BTreeMap::new();
    for node in [1, 2] {
        loop {
            let answers: Vec<std::io::Result<String>> =
                (0..30).map(|_| who(&s, node, 8080)).collect();
            let fresh = t_create.elapsed() < Duration::from_secs(60);
            let mut tasks = BTreeSet::new();
            let mut failed = Vec::new();
            for a in answers {
                match a {
                    Ok(body) => {
                        let (task, client) = task_and_client(&body);
                        tasks.insert(task.clone());
                        seen.entry((node, task)).or_default().insert(client);
                    }
                    Err(e) => failed.push(e.to_string()),
                }
            }
            if failed.is_empty() && tasks.len() == 3 {
                break;
            }
            assert!(
                fresh,
                "node {node}:8080 did not answer from all 3 tasks within 60 s: tasks \
                 {tasks:?}, failures {failed:?}"
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }
    for ((node, task), clients) in &seen {
        let on = node_of(task);
        if s.is_stock(on) {
            println!(
                "swarm: mixed: node {node} -> {task} on the stock node {on}: the task saw \
                 {clients:?}"
            );
        } else {
            assert_eq!(
                clients,
                &BTreeSet::from([s.client_addr().to_string()]),
                "node {node} -> {task} on mesh node {on}: the task sees the client's address"
            );
        }
    }
    assert!(
        who(&s, 3, 8080).is_err(),
        "the stock node answers on 8080 without the mesh: is IPVS there after all?"
    );
    println!(
        "swarm: mixed ({} / {} / {} stock): 8080 answered on both mesh nodes from the tasks \
         on all 3 nodes by {:.1} s after service create, client IP kept by the tasks on mesh \
         nodes; the stock node answers nothing (no IPVS)",
        s.engine_version(1),
        s.engine_version(2),
        s.engine_version(3),
        t_create.elapsed().as_secs_f64()
    );
    conformance::stock_node_tasks_from_mesh_nodes(&s, 3);
    conformance::overlay_across_mesh_and_stock_nodes(&s, 3);
    // The hairpins with userland-proxy false (the stock node answers none: no IPVS).
    hairpins(&s, &[1, 2]);
    // Docker's own broadcast and multicast: the stock node sending, then a mesh node.
    conformance::broadcast_and_multicast_as_docker(&s, 3, 1);
    conformance::broadcast_and_multicast_as_docker(&s, 1, 3);
}

/// The same on one node: this machine's own dockerd (started if none runs), with a
/// client namespace on a veth of the test's as the node's underlay.
#[test]
fn swarm_one_node_on_the_machines_dockerd() {
    if mesh_tests::prereq::privileged("swarm_one_node_on_the_machines_dockerd").is_none() {
        return;
    }
    let Some(mut s) = Swarm::machine() else {
        return;
    };
    publish(&s);
    vip_east_west(&s);
    host_mode(&s);
    from_the_node(&s);
    meshctl_views(&s);
    updates_under_load(&s);
    unhealthy_out_within_2s(&s);
    kill_agent_under_load(&mut s, 1);
}

/// A published port answers on every node, from every task, client IP kept.
fn publish(s: &Swarm) {
    let t_create = Instant::now();
    create_httpd(
        s,
        &[
            "--name",
            "web",
            "--replicas",
            "3",
            "-p",
            "8080:80",
            "--hostname",
            "{{.Task.Name}}",
        ],
    );
    let firsts = wait_answering(s, 8080, Duration::from_secs(60));
    let create_to_all = t_create.elapsed();
    s.wait_running("web", 3, Duration::from_secs(30));
    // Every node's table holds all three tasks once each agent has seen them (a task
    // reaches the other nodes through Docker's gossip, read on the next resync).
    let all_three = loop {
        let sp = spread(s, 8080, 30);
        if sp.values().all(|m| m.len() == 3) {
            break t_create.elapsed();
        }
        assert!(
            t_create.elapsed() < Duration::from_secs(60),
            "every node spreads over all three tasks: {sp:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    println!(
        "swarm ({} node(s)): service create -> first answer on each node after {} s (all by \
         {:.2} s), every node spreading over all 3 tasks by {:.2} s; client IP kept",
        s.nodes,
        firsts
            .iter()
            .map(|d| format!("{:.2}", d.as_secs_f64()))
            .collect::<Vec<_>>()
            .join("/"),
        create_to_all.as_secs_f64(),
        all_three.as_secs_f64()
    );
}

/// Scale and rolling updates under load: zero failed requests.
fn updates_under_load(s: &Swarm) {
    let load = Load::start(s, all_nodes(s, 8080), "/");
    let t = Instant::now();
    load.mark("scale web=5");
    s.docker(1, &["service", "scale", "-d", "web=5"]);
    s.wait_running("web", 5, Duration::from_secs(60));
    std::thread::sleep(Duration::from_secs(2));
    load.mark("scale web=2");
    s.docker(1, &["service", "scale", "-d", "web=2"]);
    s.wait_running("web", 2, Duration::from_secs(60));
    std::thread::sleep(Duration::from_secs(3));
    for order in ["start-first", "stop-first"] {
        load.mark(order);
        s.docker(
            1,
            &[
                "service",
                "update",
                "--update-order",
                order,
                "--force",
                "web",
            ],
        );
        s.wait_running("web", 2, Duration::from_secs(90));
        std::thread::sleep(Duration::from_secs(3));
    }
    let n = assert_no_failures("scale 3->5->2, update start-first and stop-first", load);
    println!(
        "swarm: scale 3->5->2 and rolling updates (start-first, stop-first) under load: {n} \
         requests, 0 failed, {:.0} s",
        t.elapsed().as_secs_f64()
    );
}

/// A task whose HEALTHCHECK fails: out of rotation on every node within 2 s.
fn unhealthy_out_within_2s(s: &Swarm) {
    s.docker(
        1,
        &[
            "service",
            "create",
            "-d",
            "--name",
            "hc",
            "--replicas",
            "3",
            "-p",
            "8082:80",
            "--hostname",
            "{{.Task.Name}}",
            "--health-cmd",
            "test -f /tmp/ok",
            "--health-interval",
            "1s",
            "--health-retries",
            "1",
            "--health-timeout",
            "1s",
            "--no-resolve-image",
            IMAGE,
            "sh",
            "-c",
            "touch /tmp/ok; exec httpd -f -p 80 -h /www",
        ],
    );
    let hc = s.wait_running("hc", 3, Duration::from_secs(60));
    wait_answering(s, 8082, Duration::from_secs(30));
    let (victim, vnode) = hc[0].clone();
    let vnode = s.node_index(&vnode);
    let cid = s.docker(
        vnode,
        &[
            "ps",
            "-q",
            "--filter",
            &format!("name={victim}"),
            "--filter",
            "status=running",
        ],
    );
    assert!(!cid.is_empty(), "container of {victim} on node {vnode}");
    // The victim serves before (its HEALTHCHECK passes after its first interval, and a
    // new task warms up for a second: wait for it, do not race it).
    let t_serving = Instant::now();
    loop {
        let sp = spread(s, 8082, 15);
        if sp
            .values()
            .any(|m| m.keys().any(|t| t.starts_with(&victim)))
        {
            break;
        }
        assert!(
            t_serving.elapsed() < Duration::from_secs(20),
            "the victim never served: {sp:?}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    s.docker(vnode, &["exec", &cid, "rm", "/tmp/ok"]);
    let t_exec = Instant::now();
    let reported = loop {
        let st = s.docker(vnode, &["inspect", "-f", "{{.State.Health.Status}}", &cid]);
        if st == "unhealthy" {
            break Instant::now();
        }
        assert!(
            t_exec.elapsed() < Duration::from_secs(15),
            "never unhealthy: {st}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    // When did the last new connection reach it, on any node?
    let mut last_hit = None;
    while reported.elapsed() < Duration::from_secs(2) {
        for node in 1..=s.nodes {
            if who(s, node, 8082).is_ok_and(|b| b.starts_with(&victim)) {
                last_hit = Some(reported.elapsed());
            }
        }
    }
    let sp = spread(s, 8082, 20);
    assert!(
        sp.values()
            .all(|m| !m.keys().any(|t| t.starts_with(&victim))),
        "2 s after Docker reported it unhealthy, {victim} still gets new connections: {sp:?}"
    );
    println!(
        "swarm: unhealthy task out of rotation on all {} node(s) within 2 s of Docker \
         reporting it (last new connection to it {})",
        s.nodes,
        last_hit.map_or("before the report".to_string(), |d| format!(
            "{:.2} s after",
            d.as_secs_f64()
        ))
    );
    s.docker(1, &["service", "rm", "hc"]);
}

/// kill -9 of an agent under load, then its restart: no failed request.
fn kill_agent_under_load(s: &mut Swarm, node: u32) {
    let load = Load::start(s, all_nodes(s, 8080), "/");
    std::thread::sleep(Duration::from_millis(500));
    s.agent(node, "kill");
    std::thread::sleep(Duration::from_secs(2));
    s.agent(node, "start");
    std::thread::sleep(Duration::from_secs(2));
    let n = assert_no_failures(&format!("kill -9 and restart of node {node}'s agent"), load);
    println!(
        "swarm: kill -9 of node {node}'s agent under load, 2 s without it, restart: {n} \
         requests, 0 failed"
    );
}

/// The backends of `service` in node `n`'s maps: address -> state.
fn backends(s: &Swarm, n: u32, service: &str) -> BTreeMap<String, String> {
    conformance::group_backends(s, n, service)
        .iter()
        .map(|b| {
            (
                b["addr"].as_str().unwrap().to_string(),
                b["state"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// A task that left the swarm's view drains for the agents' grace period (10 s) on
/// every node; an agent restarted in the middle of it finishes the drain (its state
/// directory keeps what is draining, since when) instead of removing the backend, and
/// resetting its flows, on its first apply.
fn drain_across_an_agent_restart(s: &mut Swarm) {
    create_httpd(s, &["--name", "dr", "--replicas", "3", "-p", "8099:80"]);
    s.wait_running("dr", 3, Duration::from_secs(60));
    let group = "dr/tcp/8099";
    conformance::eventually("node 1: 3 dr backends", Duration::from_secs(30), || {
        (backends(s, 1, group)
            .values()
            .filter(|st| *st == "active")
            .count()
            == 3)
            .then_some(())
    });
    s.docker(1, &["service", "scale", "-d", "dr=2"]);
    // A node whose agent records the drain of a task on another node (a task of its
    // own leaves with its veth: nothing is left to drain there).
    let nodes = s.nodes;
    let (n, victim) = conformance::eventually(
        "an agent recording the drain of a dr task on another node",
        Duration::from_secs(40),
        || {
            (1..=nodes).find_map(|n| {
                let file = format!("/run/mesh/mesh-mc-n{n}.draining.json");
                let out = s.cli(&["cluster", "exec", &n.to_string(), "--", "cat", &file]);
                let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
                v.as_array()?
                    .iter()
                    .find(|d| d["service"] == "dr" && !d["backend"]["node"].is_null())
                    .and_then(|d| d["backend"]["addr"].as_str())
                    .map(|a| (n, a.to_string()))
            })
        },
    );
    let began = Instant::now();
    let before = backends(s, n, group);
    assert_eq!(
        before.get(&victim).map(String::as_str),
        Some("draining"),
        "node {n}: {victim} left the swarm's view: {before:?}"
    );
    s.agent(n, "kill");
    s.agent(n, "start");
    let after = backends(s, n, group);
    let restarted = began.elapsed();
    assert_eq!(
        after.get(&victim).map(String::as_str),
        Some("draining"),
        "node {n}'s agent, restarted {:.1} s into {victim}'s drain, did not keep it draining: {after:?}",
        restarted.as_secs_f64()
    );
    conformance::eventually(
        &format!("{victim}'s drain to end on node {n}"),
        Duration::from_secs(20),
        || (!backends(s, n, group).contains_key(&victim)).then_some(()),
    );
    println!(
        "swarm: node {n}'s agent killed and restarted {:.1} s into {victim}'s drain kept it \
         draining; its backend left {:.1} s after the drain was recorded",
        restarted.as_secs_f64(),
        began.elapsed().as_secs_f64()
    );
    s.docker(1, &["service", "rm", "dr"]);
}

/// Drain a node under load: its tasks move, traffic follows.
fn drain_under_load(s: &Swarm) {
    s.docker(1, &["service", "scale", "-d", "web=3"]);
    s.wait_running("web", 3, Duration::from_secs(60));
    std::thread::sleep(Duration::from_secs(2));
    let load = Load::start(s, all_nodes(s, 8080), "/");
    let t = Instant::now();
    s.docker(1, &["node", "update", "--availability", "drain", "mc-n3"]);
    let moved = loop {
        let placed = s.wait_running("web", 3, Duration::from_secs(90));
        if placed.iter().all(|(_, n)| n != "mc-n3") {
            break placed;
        }
        assert!(
            t.elapsed() < Duration::from_secs(90),
            "tasks still on mc-n3: {placed:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    std::thread::sleep(Duration::from_secs(3));
    let n = assert_no_failures("drain of node 3", load);
    let sp = spread(s, 8080, 15);
    assert_eq!(sp.len(), 3, "the drained node still answers: {sp:?}");
    println!(
        "swarm: node 3 drained under load, tasks moved to {:?}: {n} requests, 0 failed; every \
         node, the drained one too, still answers",
        moved
            .iter()
            .map(|(_, n)| n.as_str())
            .collect::<BTreeSet<_>>()
    );
    s.docker(1, &["node", "update", "--availability", "active", "mc-n3"]);
}

/// Host-mode publishing answers only where a task runs (Docker's own port
/// mapping is not there in these nodes; the mesh takes the port from the task's
/// container). On an overlay network, so that the task has a docker_gwbridge leg.
fn host_mode(s: &Swarm) {
    s.docker(1, &["network", "create", "-d", "overlay", "hostnet"]);
    create_httpd(
        s,
        &[
            "--name",
            "hostmode",
            "--replicas",
            "1",
            "--network",
            "hostnet",
            "--publish",
            "mode=host,published=8090,target=80",
            "--hostname",
            "{{.Task.Name}}",
        ],
    );
    let placed = s.wait_running("hostmode", 1, Duration::from_secs(60));
    let at = s.node_index(&placed[0].1);
    let deadline = Instant::now() + Duration::from_secs(20);
    let body = loop {
        if let Ok(b) = who(s, at, 8090) {
            break b;
        }
        assert!(
            Instant::now() < deadline,
            "host-mode port on node {at} never answered"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        body.starts_with("hostmode.1.") && body.contains(&s.client_addr().to_string()),
        "{body}"
    );
    for node in (1..=s.nodes).filter(|n| *n != at) {
        assert!(
            who(s, node, 8090).is_err(),
            "node {node} answers a host-mode port it runs no task for"
        );
    }
    println!(
        "swarm: host-mode port 8090 answers on node {at} (its task's, client IP kept) and on no other node"
    );
}

/// East-west: a task of another service reaches a service's VIP by name (Docker's
/// DNS answers the VIP; nothing in Docker answers it without IPVS) and gets answers
/// from its tasks on its own node and on the others; plain traffic between tasks on
/// the overlay is left to Docker's vxlan.
fn vip_east_west(s: &Swarm) {
    s.docker(1, &["network", "create", "-d", "overlay", "appnet"]);
    create_httpd(
        s,
        &[
            "--name",
            "api",
            "--replicas",
            "3",
            "--network",
            "appnet",
            "--hostname",
            "{{.Task.Name}}",
        ],
    );
    s.docker(
        1,
        &[
            "service",
            "create",
            "-d",
            "--name",
            "caller",
            "--mode",
            "global",
            "--network",
            "appnet",
            "--no-resolve-image",
            IMAGE,
            "sleep",
            "1000000",
        ],
    );
    let api = s.wait_running("api", 3, Duration::from_secs(60));
    s.wait_running("caller", s.nodes as usize, Duration::from_secs(60));
    let t = Instant::now();
    for node in 1..=s.nodes {
        let local: Vec<&str> = api
            .iter()
            .filter(|(_, n)| s.node_index(n) == node)
            .map(|(t, _)| t.as_str())
            .collect();
        let (answers, me) = loop {
            let (answers, me) = vip_answers(s, node, 30);
            let tasks: BTreeSet<&str> = answers.iter().map(|(t, _)| t.as_str()).collect();
            if answers.len() == 30 && tasks.len() == 3 {
                break (answers, me);
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "node {node}: the caller's 30 requests to api:80 (the VIP) got {} answers from \
                 {tasks:?}",
                answers.len()
            );
            std::thread::sleep(Duration::from_millis(500));
        };
        for (task, client) in &answers {
            assert_eq!(client, &me, "{task} sees the caller's own address");
        }
        let mut tasks: BTreeMap<&str, usize> = BTreeMap::new();
        for (t, _) in &answers {
            *tasks.entry(t.as_str()).or_insert(0) += 1;
        }
        let same_node = local
            .iter()
            .any(|l| answers.iter().any(|(t, _)| t.starts_with(&format!("{l}."))));
        assert!(
            local.is_empty() || same_node,
            "node {node}: its own api task {local:?} never answered: {tasks:?}"
        );
        // Docker's overlay itself, task to task by address, across nodes.
        let direct = s.docker(
            node,
            &[
                "exec",
                &caller(s, node),
                "sh",
                "-c",
                "for a in $(nslookup tasks.api 2>/dev/null | awk '/^Address: /{print $2}'); do \
                 printf 'GET /cgi-bin/who HTTP/1.0\\r\\n\\r\\n' | nc -w 2 $a 80 | tail -1; done",
            ],
        );
        assert_eq!(
            direct.lines().filter(|l| l.contains(&me)).count(),
            3,
            "node {node}: every api task answers at its own overlay address: {direct:?}"
        );
        println!(
            "swarm: node {node}: caller {me} -> api VIP: 30 of 30 answered by {tasks:?} (the \
             task on this node: {local:?}); each task also by its own address"
        );
    }
}

/// Service labels: client-IP affinity, and opting a service out of the mesh.
fn labels(s: &Swarm) {
    s.docker(
        1,
        &[
            "service",
            "update",
            "-d",
            "--label-add",
            "mesh.affinity=client-ip",
            "web",
        ],
    );
    let t = Instant::now();
    let sticky = loop {
        let sp = spread(s, 8080, 10);
        let tasks: BTreeSet<&String> = sp.values().flat_map(|m| m.keys()).collect();
        if tasks.len() == 1 {
            break ((*tasks.iter().next().unwrap()).clone(), t.elapsed());
        }
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "mesh.affinity=client-ip: still spread over {tasks:?}"
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    create_httpd(
        s,
        &[
            "--name",
            "optout",
            "--replicas",
            "2",
            "-p",
            "8083:80",
            "--label",
            "mesh.disable=true",
        ],
    );
    s.wait_running("optout", 2, Duration::from_secs(60));
    std::thread::sleep(Duration::from_secs(3));
    for node in 1..=s.nodes {
        assert!(
            who(s, node, 8083).is_err(),
            "node {node} answers a service labelled mesh.disable=true"
        );
    }
    println!(
        "swarm: mesh.affinity=client-ip sends this client to {} from every node ({:.1} s \
         after the label); mesh.disable=true leaves the service to Docker (nothing answers \
         without IPVS)",
        sticky.0,
        sticky.1.as_secs_f64()
    );
}

/// meshctl on every node, both formats: the agent and its programs, the Docker
/// services with their tasks, the VIP, live flows.
fn meshctl_views(s: &Swarm) {
    for node in 1..=s.nodes {
        let (code, text, err) = s.meshctl(node, &["status"]);
        assert_eq!(code, 0, "node {node}: meshctl status: {text}{err}");
        assert!(
            text.contains("agent: running") && text.contains("program: mesh_tc_ingress on"),
            "node {node}: {text}"
        );
        assert!(
            text.contains("mesh_tc_overlay_in on"),
            "node {node}: overlay hooks: {text}"
        );
        let (code, out, err) = s.meshctl(node, &["services", "--json"]);
        assert_eq!(code, 0, "node {node}: {err}");
        let v: serde_json::Value = serde_json::from_str(&out).expect("json");
        let web = v
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["name"] == "web/tcp/8080")
            .unwrap_or_else(|| panic!("node {node}: web in {out}"));
        let active = web["backends"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|b| b["state"] == "active")
            .count();
        assert_eq!(active, 3, "node {node}: web's backends: {web}");
        assert!(
            web["backends"]
                .as_array()
                .unwrap()
                .iter()
                .all(|b| b["task"].as_str().is_some_and(|t| t.starts_with("web."))),
            "node {node}: Docker's task names: {web}"
        );
        let api = v
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["name"] == "api@appnet/vip")
            .unwrap_or_else(|| panic!("node {node}: the api VIP in {out}"));
        assert_eq!(api["frontends"][0]["kind"], "vip", "{api}");
        let (code, text, _) = s.meshctl(node, &["service", "web"]);
        assert!(
            code == 0 && text.contains("frontend *:8080/tcp (ingress)"),
            "{text}"
        );
        // trace agrees with real traffic on the same 5-tuple (a port outside the client's
        // ephemeral range, so that no earlier request used it).
        let client = s.client_addr().to_string();
        let port = 61_300 + node as u16;
        let from = format!("{client}:{port}");
        let to = format!("{}:8080", s.addr(node));
        let (code, out, err) = s.meshctl(node, &["trace", "--from", &from, "--to", &to, "--json"]);
        assert_eq!(code, 0, "{err}");
        let t: serde_json::Value = serde_json::from_str(&out).expect("json");
        assert_eq!(t["service"], "web/tcp/8080", "{t}");
        assert_eq!(t["conntrack_entries_removed"], 2, "{t}");
        let task = t["backend"]["task"]
            .as_str()
            .unwrap_or_else(|| panic!("{t}"))
            .to_string();
        let at = t["backend"]["at"].as_str().unwrap().to_string();
        if let Some(peer) = at.strip_prefix("node ") {
            assert_eq!(
                t["output"]["vxlan"]["outer_dst"], peer,
                "tunnelled to its node: {t}"
            );
        } else {
            assert!(t["output"]["vxlan"].is_null(), "{t}");
        }
        let node_addr = s.addr(node).to_string();
        let real = s
            .client(|| {
                mesh_tests::bound::http_get_from(&client, port, &node_addr, 8080, "/cgi-bin/who")
            })
            .expect("GET from the traced port");
        assert!(
            real.starts_with(&task),
            "node {node}: trace said {task} ({at}), real traffic reached {real}"
        );
        println!("swarm: node {node}: meshctl trace {from} -> {to} named {task} ({at}); a real connection from that port reached it");
        // From the manager, the same trace run on another node by that node's agent
        // (`--node`) says what that node says itself.
        if node == 1 && s.nodes > 1 {
            let from2 = format!("{client}:61302");
            let to2 = format!("{}:8080", s.addr(2));
            let args = [
                "trace",
                "--from",
                from2.as_str(),
                "--to",
                to2.as_str(),
                "--json",
            ];
            let mut remote = args.to_vec();
            remote.extend_from_slice(&["--node", "mc-n2"]);
            let (code, out, err) = s.meshctl(1, &remote);
            assert_eq!(code, 0, "trace --node mc-n2 from node 1: {out}{err}");
            let there: serde_json::Value = serde_json::from_str(&out).expect("json");
            let (code, out, err) = s.meshctl(2, &args);
            assert_eq!(code, 0, "{err}");
            let here: serde_json::Value = serde_json::from_str(&out).expect("json");
            assert_eq!(
                there["backend"]["task"], here["backend"]["task"],
                "{there} vs {here}"
            );
            assert_eq!(there["output"], here["output"], "{there} vs {here}");
            // Only the swarm's nodes may ask: the client (not a node) is refused.
            let asked = s.client(|| {
                http(
                    s.addr(2),
                    9478,
                    &format!("/v1/trace?from={from2}&to={to2}"),
                    Duration::from_secs(2),
                )
            });
            assert!(asked.is_err(), "a non-node got a trace: {asked:?}");
            println!(
                "swarm: node 1: meshctl trace --node mc-n2 {from2} -> {to2}: node 2's agent named {}, as node 2's own meshctl does",
                there["backend"]["task"]
            );
        }
        // East-west: a trace from this node's caller task to the api VIP, through the
        // overlay program, agrees with the caller's own connection from that port.
        let vip = api["frontends"][0]["addr"].as_str().unwrap().to_string();
        let caller_ip = s
            .docker(
                node,
                &[
                    "exec",
                    &caller(s, node),
                    "sh",
                    "-c",
                    "ip -4 -o addr show eth0 | awk '{print $4}'",
                ],
            )
            .split('/')
            .next()
            .unwrap()
            .to_string();
        let vfrom = format!("{caller_ip}:61400");
        let vto = format!("{vip}:80");
        let (code, out, err) =
            s.meshctl(node, &["trace", "--from", &vfrom, "--to", &vto, "--json"]);
        assert_eq!(code, 0, "{err}");
        let t: serde_json::Value = serde_json::from_str(&out).expect("json");
        assert_eq!(t["program"]["name"], "mesh_tc_overlay_in", "{t}");
        assert_eq!(t["service"], "api@appnet/vip", "{t}");
        assert_eq!(t["conntrack_entries_removed"], 2, "{t}");
        let vtask = t["backend"]["task"]
            .as_str()
            .unwrap_or_else(|| panic!("{t}"))
            .to_string();
        let vback = t["backend"]["addr"].as_str().unwrap().to_string();
        assert_eq!(t["output"]["headers"]["dst"], format!("{vback}:80"), "{t}");
        // busybox nc ignores -p when it connects: a socket of the test's own, bound to
        // that port inside the caller's namespace.
        let real = s
            .in_container(node, &caller(s, node), || {
                mesh_tests::bound::http_get_from(&caller_ip, 61400, &vip, 80, "/cgi-bin/who")
            })
            .expect("GET from the caller's namespace");
        if !real.starts_with(&vtask) {
            let (_, flows, _) = s.meshctl(node, &["conntrack", "--json"]);
            let (_, svc, _) = s.meshctl(node, &["service", "api", "--json"]);
            panic!(
                "node {node}: trace {vfrom} -> {vto} said {vtask} ({t}), the caller reached \
                 {real:?}; conntrack: {}; api: {svc}",
                flows
                    .lines()
                    .filter(|l| l.contains("61400") || l.contains("backend"))
                    .collect::<Vec<_>>()
                    .join(" ")
            );
        }
        println!("swarm: node {node}: meshctl trace {vfrom} -> {vto} (a VIP, from a task) named {vtask}; the task's own connection from that port reached it");
        let (code, out, err) = s.meshctl(node, &["doctor", "--json"]);
        let checks: serde_json::Value =
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}{err}"));
        let result = |c: &str| {
            checks
                .as_array()
                .unwrap()
                .iter()
                .find(|x| x["check"] == c)
                .map(|x| x["result"].as_str().unwrap().to_string())
        };
        assert_eq!(code, 0, "node {node}: doctor: {checks}");
        for c in [
            "agent",
            "underlay",
            "tasks",
            "docker",
            "ipvs",
            "host ports",
            "drift",
        ] {
            assert_eq!(
                result(c).as_deref(),
                Some("ok"),
                "node {node}: {c}: {checks}"
            );
        }
        // The other format of each, and the rest of the subcommands.
        for (args, want) in [
            (&["status", "--json"][..], "\"running\": true"),
            (&["services"][..], "web/tcp/8080"),
            (&["service", "web", "--json"][..], "\"task\": \"web."),
            (&["conntrack", "--service", "web"][..], "web/tcp/8080"),
            (&["maglev", "web"][..], "VS IDEAL"),
            (&["maglev", "web", "--json"][..], "\"share\""),
            (&["stats"][..], "fwd_to_task"),
            (&["stats", "--json"][..], "\"service\": \"web/tcp/8080\""),
            (
                &["stats", "--watch", "--interval", "0.3", "--count", "1"][..],
                "per second",
            ),
            (
                &["trace", "--from", from.as_str(), "--to", to.as_str()][..],
                "why:",
            ),
            (&["doctor"][..], "ok   drift"),
        ] {
            let (code, out, err) = s.meshctl(node, args);
            assert!(
                code == 0 && out.contains(want),
                "node {node}: meshctl {args:?} ({code}): want {want:?} in:\n{out}{err}"
            );
        }
        let (code, out, err) = s.meshctl(node, &["conntrack", "--service", "web", "--json"]);
        assert_eq!(code, 0, "{err}");
        let flows: serde_json::Value = serde_json::from_str(&out).expect("json");
        println!(
            "swarm: node {node}: meshctl status, services, service web, conntrack ({} web flows \
             in conntrack) all answer",
            flows.as_array().map_or(0, Vec::len)
        );
    }
}

/// What the agents measured: the lag from a Docker event to the maps written.
fn event_lag(s: &Swarm) {
    for node in 1..=s.nodes {
        let text = s.metrics(node).expect("the cluster's agents serve metrics");
        let get = |k: &str| {
            text.lines()
                .find(|l| l.starts_with(k))
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or_else(|| panic!("node {node}: no {k} in its metrics:\n{text}"))
        };
        // Per-service and per-backend traffic: this node balanced flows of web.
        let web_flows = get("mesh_service_flows_total{service=\"web/tcp/8080\"}");
        let backends = text
            .lines()
            .filter(|l| l.starts_with("mesh_backend_flows_total{service=\"web/tcp/8080\""))
            .count();
        assert!(
            web_flows > 0.0 && backends > 0,
            "node {node}: per-service counters:\n{text}"
        );
        println!(
            "swarm: node {node}: web balanced {web_flows} flows here, {backends} backend rows"
        );
        let n = get("mesh_event_lag_seconds_count");
        assert!(n > 0.0, "node {node} applied Docker events");
        println!(
            "swarm: node {node}: {n} Docker events applied, lag event -> maps written p50 {:.1} ms, p99 {:.1} ms; {} reconciles",
            get("mesh_event_lag_seconds_recent{quantile=\"0.5\"}") * 1e3,
            get("mesh_event_lag_seconds_recent{quantile=\"0.99\"}") * 1e3,
            get("mesh_reconciles_total")
        );
    }
}

const ASK: Duration = Duration::from_secs(2);

/// The task that answered (its name without the task id: "near.2") from a `who`
/// answer ("near.2.<id> <client>"), and the client address it saw.
fn task_and_client(body: &str) -> (String, String) {
    let (host, client) = body.trim().split_once(' ').unwrap_or((body.trim(), ""));
    let task = host.splitn(3, '.').take(2).collect::<Vec<_>>().join(".");
    // httpd's REMOTE_ADDR is "[::ffff:10.0.0.5]".
    let client = client
        .trim()
        .trim_start_matches("[::ffff:")
        .trim_end_matches(']');
    (task, client.to_string())
}

/// GET /cgi-bin/who from the calling thread's namespace: (task, client it saw, the
/// peer the socket reports).
fn who_at(to: std::net::SocketAddr) -> std::io::Result<(String, String, std::net::SocketAddr)> {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect_timeout(&to, ASK)?;
    let peer = c.peer_addr()?;
    c.set_read_timeout(Some(ASK))?;
    c.write_all(b"GET /cgi-bin/who HTTP/1.0\r\n\r\n")?;
    let mut buf = String::new();
    c.read_to_string(&mut buf)?;
    let body = buf.split("\r\n\r\n").nth(1).unwrap_or_default();
    let (t, cl) = task_and_client(body);
    Ok((t, cl, peer))
}

/// One datagram to `to` (connected or sendto) and the answer: (task, client it saw,
/// where the answer came from).
fn udp_who(
    to: std::net::SocketAddr,
    connected: bool,
) -> std::io::Result<(String, String, std::net::SocketAddr)> {
    let u = std::net::UdpSocket::bind("0.0.0.0:0")?;
    u.set_read_timeout(Some(ASK))?;
    if connected {
        u.connect(to)?;
        assert_eq!(u.peer_addr()?, to, "getpeername of a connected UDP socket");
        u.send(b"q")?;
    } else {
        u.send_to(b"q", to)?;
    }
    let mut buf = [0u8; 512];
    let (n, from) = u.recv_from(&mut buf)?;
    let (t, cl) = task_and_client(&String::from_utf8_lossy(&buf[..n]));
    Ok((t, cl, from))
}

/// From the calling thread's namespace, through each of `addrs`: the TCP service `near`
/// (8081) reaches every task in `near`, UDP `udpwho` (5353) every task in `udp`, the
/// host-mode UDP port (5390) the task `local_udp` only; every client sees what it
/// dialled as its peer (getpeername, recvfrom). `me`: the client address the tasks must
/// see, when known. Waits up to 20 s for the first answer (the agent's next pass puts
/// a new container's namespace in its scope).
fn check_from(
    who: &str,
    addrs: &[std::net::Ipv4Addr],
    me: Option<std::net::Ipv4Addr>,
    near: &BTreeSet<String>,
    udp: &BTreeSet<String>,
    local_udp: &str,
    on_stock: &BTreeSet<String>,
) {
    for a in addrs {
        let tcp = std::net::SocketAddr::from((*a, 8081));
        let deadline = Instant::now() + Duration::from_secs(20);
        while who_at(tcp).is_err() {
            assert!(Instant::now() < deadline, "{who}: {tcp} never answered");
            std::thread::sleep(Duration::from_millis(200));
        }
        // At least 30 answers, until every task has answered (a task on another node
        // reaches this node's agent through Docker's gossip, a resync or so later).
        let mut seen = BTreeSet::new();
        let until = Instant::now() + Duration::from_secs(30);
        for i in 0.. {
            if i >= 30 && (&seen == near || Instant::now() > until) {
                break;
            }
            let (t, cl, peer) = who_at(tcp).unwrap_or_else(|e| panic!("{who}: {tcp}: {e}"));
            assert_eq!(peer, tcp, "{who}: getpeername is what was dialled");
            // A stock node's task sees the calling node's ingress address, as Docker's
            // own SNAT gives it.
            if let Some(me) = me.filter(|_| !on_stock.contains(&t)) {
                assert_eq!(
                    cl,
                    me.to_string(),
                    "{who}: the client address the task sees"
                );
            }
            seen.insert(t);
        }
        assert_eq!(
            &seen, near,
            "{who} via {tcp}: every task, on this node and the others"
        );
        let to = std::net::SocketAddr::from((*a, 5353));
        let mut seen = BTreeSet::new();
        let until = Instant::now() + Duration::from_secs(30);
        for i in 0.. {
            if i >= 30 && (&seen == udp || Instant::now() > until) {
                break;
            }
            let (t, _, from) =
                udp_who(to, i % 2 == 0).unwrap_or_else(|e| panic!("{who}: {to}/udp: {e}"));
            assert_eq!(from, to, "{who}: the answer comes from what was dialled");
            seen.insert(t);
        }
        assert_eq!(&seen, udp, "{who} via {to}/udp: every task");
        let host = std::net::SocketAddr::from((*a, 5390));
        for connected in [false, true] {
            let (t, _, from) =
                udp_who(host, connected).unwrap_or_else(|e| panic!("{who}: {host}/udp: {e}"));
            assert_eq!(
                (t.as_str(), from),
                (local_udp, host),
                "{who}: host-mode UDP"
            );
        }
    }
}

/// Published ports from each node itself (localhost and its own address) and from
/// containers on node 1 (one on a user bridge network, one task on docker_gwbridge),
/// TCP and UDP, ingress and host mode, tasks on the same node and on the others.
fn from_the_node(s: &Swarm) {
    let every: Vec<u32> = (1..=s.nodes).collect();
    let local = std::net::Ipv4Addr::LOCALHOST;
    hairpins(s, &every);
    // The host-mode TCP port of `hostmode` (host_mode's), from its own node.
    let placed = s.wait_running("hostmode", 1, Duration::from_secs(10));
    let at = s.node_index(&placed[0].1);
    let (t, _, peer) = s
        .on_node(at, || who_at((local, 8090).into()))
        .expect("host-mode port from its node");
    assert_eq!((t.as_str(), peer), ("hostmode.1", (local, 8090).into()));
    println!("swarm: host-mode TCP 8090 from its node {at}: answered, getpeername as dialled");
}

/// Rows 7.1 (hairpins): published ports reached from each of `nodes` (localhost and its
/// address) and from a bridge and a task container on the first of them: TCP 8081 and
/// UDP 5353 reach every task (one per node), host-mode UDP 5390 the local one.
fn hairpins(s: &Swarm, nodes: &[u32]) {
    let n = s.nodes.to_string();
    let spread = ["--replicas", &n, "--replicas-max-per-node", "1"];
    let mut args = vec![
        "--name",
        "near",
        "-p",
        "8081:80",
        "--hostname",
        "{{.Task.Name}}",
    ];
    args.extend_from_slice(&spread);
    create_httpd(s, &args);
    let mut udp = vec![
        "service",
        "create",
        "-d",
        "--name",
        "udpwho",
        "--hostname",
        "{{.Task.Name}}",
        "-p",
        "5353:53/udp",
        "--publish",
        "mode=host,published=5390,target=53,protocol=udp",
    ];
    udp.extend_from_slice(&spread);
    udp.extend_from_slice(&["--no-resolve-image", IMAGE, "udp-who", "53"]);
    s.docker(1, &udp);
    let near = s.wait_running("near", s.nodes as usize, Duration::from_secs(60));
    let udp = s.wait_running("udpwho", s.nodes as usize, Duration::from_secs(60));
    let names = |v: &[(String, String)]| v.iter().map(|(t, _)| t.clone()).collect::<BTreeSet<_>>();
    let (near_names, udp_names) = (names(&near), names(&udp));
    // "Running" is before udp-who has bound its port: until every task has answered once
    // (from the client, through node 1), a datagram may meet the task's port
    // unreachable, which the mesh now rightly hands back (ECONNREFUSED).
    let via = s.addr(nodes[0]);
    let t0 = Instant::now();
    let mut ready = BTreeSet::new();
    while ready != udp_names {
        if let Ok((t, _, _)) = s.client(|| udp_who((via, 5353).into(), true)) {
            ready.insert(t);
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "udpwho: only {ready:?} of {udp_names:?} answered within 30 s"
        );
    }
    let local_udp = |node: u32| {
        udp.iter()
            .find(|(_, h)| s.node_index(h) == node)
            .map(|(t, _)| t.clone())
            .expect("a udpwho task on every node")
    };
    let on_stock: BTreeSet<String> = near
        .iter()
        .filter(|(_, h)| s.is_stock(s.node_index(h)))
        .map(|(t, _)| t.clone())
        .collect();
    let local = std::net::Ipv4Addr::LOCALHOST;
    for &node in nodes {
        let me = s.addr(node);
        let lu = local_udp(node);
        s.on_node(node, || {
            check_from(
                &format!("node {node}"),
                &[local, me],
                Some(me),
                &near_names,
                &udp_names,
                &lu,
                &on_stock,
            )
        });
    }
    // Containers on the first node: a plain one on a user bridge network, and a task (its
    // docker_gwbridge side), both dialling the node's address.
    let first = nodes[0];
    s.docker(first, &["network", "create", "-d", "bridge", "probenet"]);
    let probe = s.docker(
        first,
        &[
            "run",
            "-d",
            "--name",
            "probe",
            "--network",
            "probenet",
            IMAGE,
            "sleep",
            "600",
        ],
    );
    let task = s.docker(first, &["ps", "-q", "-f", "name=near"]);
    let lu = local_udp(first);
    let me = s.addr(first);
    for (what, id) in [("a bridge container", &probe), ("a task container", &task)] {
        s.in_container(first, id, || {
            check_from(
                &format!("node {first}, {what}"),
                &[me],
                None,
                &near_names,
                &udp_names,
                &lu,
                &on_stock,
            )
        });
    }
    s.docker(first, &["rm", "-f", "probe"]);
    s.docker(first, &["network", "rm", "probenet"]);
    println!(
        "swarm: from nodes {nodes:?} (localhost and its address) and from a bridge and a \
         task container on node {first}: TCP 8081 and UDP 5353 reach all {} tasks, \
         host-mode UDP 5390 the local one; getpeername/recvfrom give what was dialled",
        s.nodes
    );
}
