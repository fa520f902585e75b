//! moby's Swarm networking spec (daemon/libnetwork/docs/spec/swarm-networking.md), the
//! rows that concern the mesh, on a real swarm: each phase names its rows (README's
//! conformance table maps every row to its phase). Phases run in order on one swarm and
//! leave their services behind (names and ports do not collide with the other phases').

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use mesh_tests::swarm::{http, Swarm};

use super::{create_httpd, task_and_client, udp_who, who, IMAGE};

/// A service of the test image running `sh -c SCRIPT`, with `args` (name, ports...).
fn create_sh(s: &Swarm, args: &[&str], script: &str) {
    let mut a = vec!["service", "create", "-d", "--hostname", "{{.Task.Name}}"];
    a.extend_from_slice(args);
    a.extend_from_slice(&["--no-resolve-image", IMAGE, "sh", "-c", script]);
    s.docker(1, &a);
}

/// `docker network create -d overlay --attachable ARGS` on node 1 (ARGS end with the
/// network's name).
fn attachable_overlay(s: &Swarm, args: &[&str]) {
    let mut a = vec!["network", "create", "-d", "overlay", "--attachable"];
    a.extend_from_slice(args);
    s.docker(1, &a);
}

/// A global service `name` on `network` that only sleeps: a task on every node to
/// call from; returns once every node runs one.
fn global_caller(s: &Swarm, name: &str, network: &str) {
    s.docker(
        1,
        &[
            "service",
            "create",
            "-d",
            "--name",
            name,
            "--mode",
            "global",
            "--network",
            network,
            "--no-resolve-image",
            IMAGE,
            "sleep",
            "1000000",
        ],
    );
    s.wait_running(name, s.nodes as usize, Duration::from_secs(60));
}

/// The backends of load-balancing group `group` in node `n`'s maps, as `meshctl
/// services --json` shows them.
pub(crate) fn group_backends(s: &Swarm, n: u32, group: &str) -> Vec<serde_json::Value> {
    let (code, out, err) = s.meshctl(n, &["services", "--json"]);
    assert_eq!(code, 0, "node {n}: meshctl services: {err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    v.as_array()
        .unwrap()
        .iter()
        .filter(|x| x["name"] == group)
        .flat_map(|x| x["backends"].as_array().unwrap().clone())
        .collect()
}

/// Retries `f` until it returns `Some`, for at most `within`; panics with `what`.
pub(crate) fn eventually<T>(what: &str, within: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let t0 = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(t0.elapsed() < within, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// `meshctl doctor --json` on node `n`: check name -> (result, detail).
fn doctor(s: &Swarm, n: u32) -> std::collections::BTreeMap<String, (String, String)> {
    let (_, out, err) = s.meshctl(n, &["doctor", "--json"]);
    let v: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("node {n}: doctor: {e}: {out}{err}"));
    v.as_array()
        .expect("a list of checks")
        .iter()
        .map(|c| {
            (
                c["check"].as_str().unwrap_or_default().to_string(),
                (
                    c["result"].as_str().unwrap_or_default().to_string(),
                    c["detail"].as_str().unwrap_or_default().to_string(),
                ),
            )
        })
        .collect()
}

/// Lines of node `n`'s agent log (a process of the harness) that contain every one of
/// `words`.
fn agent_log(n: u32, words: &[&str]) -> Vec<String> {
    let text = std::fs::read_to_string(format!("/run/mesh-cluster/node{n}/mesh-agent.log"))
        .unwrap_or_default();
    text.lines()
        .filter(|l| words.iter().all(|w| l.contains(w)))
        .map(str::to_string)
        .collect()
}

/// From container `ctr` on node `n` (busybox's nc), `GET /cgi-bin/who` of `to` port 80,
/// `times` times: the last line of each answer ("" where none came).
fn who_from(s: &Swarm, n: u32, ctr: &str, to: &str, times: usize) -> Vec<String> {
    who_from_at(s, n, ctr, to, 80, times)
}

/// As `who_from`, to `port`.
fn who_from_at(s: &Swarm, n: u32, ctr: &str, to: &str, port: u16, times: usize) -> Vec<String> {
    let script = format!(
        "for i in $(seq {times}); do r=$(printf 'GET /cgi-bin/who HTTP/1.0\\r\\n\\r\\n' | \
         nc -w 2 {to} {port} | tail -1); echo \"got:$r\"; done"
    );
    let out = s.try_docker(n, &["exec", ctr, "sh", "-c", &script]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("got:"))
        .map(|l| l.trim().to_string())
        .collect()
}

/// A UDP datagram of `size` bytes to `to` ("big..."), and the answer: (task, client it
/// saw, answer's length).
fn udp_big(to: SocketAddr, size: usize) -> std::io::Result<(String, String, usize)> {
    let u = UdpSocket::bind("0.0.0.0:0")?;
    u.set_read_timeout(Some(Duration::from_secs(2)))?;
    u.connect(to)?;
    let mut q = b"big".to_vec();
    q.resize(size, b'q');
    u.send(&q)?;
    let mut buf = vec![0u8; 65536];
    let n = u.recv(&mut buf)?;
    let text = String::from_utf8_lossy(&buf[..n]);
    let first = text.lines().next().unwrap_or_default();
    let (t, c) = task_and_client(first);
    assert!(
        text.contains(&format!("got {size} bytes")),
        "{to}: the task got all of the {size}-byte datagram: {:?}",
        &text[..text.len().min(200)]
    );
    Ok((t, c, n))
}

/// The VIP of `service` on `network`, if it has one there now.
fn try_vip_of(s: &Swarm, service: &str, network: &str) -> Option<Ipv4Addr> {
    let net = s.docker(1, &["network", "inspect", "-f", "{{.Id}}", network]);
    let vips = s.docker(
        1,
        &[
            "service",
            "inspect",
            "-f",
            "{{range .Endpoint.VirtualIPs}}{{.NetworkID}} {{.Addr}}\n{{end}}",
            service,
        ],
    );
    vips.lines().find_map(|l| {
        let (id, addr) = l.split_once(' ')?;
        (id == net).then(|| addr.split('/').next()?.parse().ok())?
    })
}

/// The VIP of `service` on `network`.
fn vip_of(s: &Swarm, service: &str, network: &str) -> Ipv4Addr {
    try_vip_of(s, service, network).unwrap_or_else(|| panic!("{service} has no VIP on {network}"))
}

/// Rows 7/protocols, 11.4/tcp-udp-both, 11.4/tcp-udp-rm, and the model rows: a service
/// publishing one port on TCP and UDP (every DNS server) is served on every node, and
/// so is every service created after it (once, each agent rejected its whole model and
/// kept its previous state for good); two services sharing a number under the two
/// protocols are both served, and removing one leaves the other answering throughout.
pub fn tcp_and_udp_on_one_port(s: &Swarm) {
    create_sh(
        s,
        &[
            "--name",
            "dns",
            "--replicas",
            "2",
            "-p",
            "5354:53/tcp",
            "-p",
            "5354:53/udp",
        ],
        "udp-who 53 & exec httpd -f -p 53 -h /www",
    );
    create_httpd(s, &["--name", "after", "-p", "8099:80", "--replicas", "2"]);
    create_httpd(
        s,
        &["--name", "tcpside", "-p", "5355:80", "--replicas", "2"],
    );
    create_sh(
        s,
        &["--name", "udpside", "--replicas", "2", "-p", "5355:53/udp"],
        "exec udp-who 53",
    );
    for svc in ["dns", "after", "tcpside", "udpside"] {
        s.wait_running(svc, 2, Duration::from_secs(60));
    }
    for node in 1..=s.nodes {
        let a = s.addr(node);
        for (port, what) in [(5354, "dns/tcp"), (8099, "after"), (5355, "tcpside")] {
            let body = eventually(
                &format!("node {node}: {what}"),
                Duration::from_secs(15),
                || {
                    s.client(|| http(a, port, "/cgi-bin/who", Duration::from_secs(2)))
                        .ok()
                },
            );
            let (_, client) = task_and_client(&body);
            assert_eq!(client, s.client_addr().to_string(), "{what} on node {node}");
        }
        for (port, what) in [(5354, "dns/udp"), (5355, "udpside")] {
            let (task, client, _) = eventually(
                &format!("node {node}: {what}"),
                Duration::from_secs(15),
                || s.client(|| udp_who((a, port).into(), true)).ok(),
            );
            assert!(
                task.starts_with(what.split('/').next().unwrap()),
                "{what}: {task}"
            );
            assert_eq!(client, s.client_addr().to_string(), "{what} on node {node}");
        }
        let d = doctor(s, node);
        assert_eq!(d["model"].0, "ok", "node {node}: {:?}", d["model"]);
    }
    // Removing the TCP one: the UDP one answers on every node all along.
    let stop = std::sync::atomic::AtomicBool::new(false);
    let retried = std::sync::atomic::AtomicU32::new(0);
    let t0 = Instant::now();
    let load = std::thread::scope(|sc| {
        let h = sc.spawn(|| {
            let mut ok = 0u32;
            let mut failed = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for node in 1..=s.nodes {
                    // As a resolver does, a datagram unanswered in 2 s is sent once more
                    // (a rare loss in the datapath, counted as drop_rewrite_failed, is
                    // known and not what this checks); both unanswered is a failure.
                    let ask = || s.client(|| udp_who((s.addr(node), 5355).into(), true));
                    match ask().or_else(|_| {
                        retried.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        ask()
                    }) {
                        Ok(_) => ok += 1,
                        Err(e) => failed.push(format!(
                            "node {node} at {:.1} s after {ok} answers: {e}",
                            t0.elapsed().as_secs_f64()
                        )),
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
            (ok, failed)
        });
        std::thread::sleep(Duration::from_secs(1));
        s.docker(1, &["service", "rm", "tcpside"]);
        std::thread::sleep(Duration::from_secs(3));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        h.join().expect("load thread")
    });
    assert!(
        load.1.is_empty(),
        "udpside while tcpside left: {:?}",
        load.1
    );
    assert!(load.0 > 10, "udpside answered only {} times", load.0);
    println!(
        "swarm: TCP and UDP on 5354 in one service, 8099 after it, 5355 TCP and UDP in two \
         services: every node answers each with the client's address; udpside answered all \
         {} requests while tcpside was removed ({} needed a second datagram)",
        load.0,
        retried.load(std::sync::atomic::Ordering::Relaxed)
    );
}

/// The model rows (11.6/lb-fail-logged, 13/auto-vs-host-port): an auto-assigned ingress
/// port that a host-mode port of another service already takes on a node cannot be
/// programmed there for both. The newcomer's is left out on that node only (the
/// host-mode task keeps its port), said by doctor (and the agent's log and metrics);
/// every other service there keeps being reconciled (a service created afterwards
/// answers); removing the clash clears it.
pub fn a_model_problem_costs_only_its_service(s: &Swarm) {
    // Docker refuses a host-mode port that an ingress port holds, but not the other
    // way round: an auto-assigned ingress port (from 30000) may land on a host-mode one.
    // (On an overlay: the mesh serves its host-mode port; one on docker0 alone is
    // Docker's own mapping, which `port_in_use` covers.)
    s.docker(1, &["network", "create", "-d", "overlay", "clashnet"]);
    create_httpd(
        s,
        &[
            "--name",
            "clash-b",
            "--publish",
            "mode=host,published=30000,target=80",
            "--replicas",
            "1",
            "--constraint",
            "node.hostname==mc-n2",
            "--network",
            "clashnet",
        ],
    );
    s.wait_running("clash-b", 1, Duration::from_secs(60));
    create_httpd(
        s,
        &[
            "--name",
            "clash-a",
            "-p",
            "80",
            "--replicas",
            "1",
            "--hostname",
            "{{.Task.Name}}",
        ],
    );
    s.wait_running("clash-a", 1, Duration::from_secs(60));
    let port = s.docker(
        1,
        &[
            "service",
            "inspect",
            "-f",
            "{{range .Endpoint.Ports}}{{.PublishedPort}}{{end}}",
            "clash-a",
        ],
    );
    assert_eq!(
        port, "30000",
        "clash-a's auto-assigned port (the first of Docker's range)"
    );
    for node in [1, 3] {
        let body = eventually(
            &format!("node {node}: the auto-assigned 30000"),
            Duration::from_secs(15),
            || who(s, node, 30000).ok(),
        );
        assert!(body.starts_with("clash-a."), "{body}");
    }
    let problem = eventually(
        "node 2: doctor's model check names the clash",
        Duration::from_secs(15),
        || {
            let d = doctor(s, 2);
            (d["model"].0 == "fail" && d["model"].1.contains("30000")).then(|| d["model"].1.clone())
        },
    );
    // Everything else on node 2 is still reconciled: a new service answers there.
    create_httpd(
        s,
        &["--name", "afterclash", "-p", "8202:80", "--replicas", "1"],
    );
    s.wait_running("afterclash", 1, Duration::from_secs(60));
    let a = s.addr(2);
    eventually(
        "node 2: afterclash answers",
        Duration::from_secs(15),
        || {
            s.client(|| http(a, 8202, "/cgi-bin/who", Duration::from_secs(2)))
                .ok()
        },
    );
    let metrics = s.metrics(2).unwrap_or_default();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("mesh_model_problems{") && l.contains("30000")),
        "node 2: mesh_model_problems names it:\n{metrics}"
    );
    for node in [1, 3] {
        assert_eq!(doctor(s, node)["model"].0, "ok", "node {node} has no clash");
    }
    let logged = agent_log(2, &["ERROR", "clash-a", "30000"]);
    assert_eq!(
        logged.len(),
        1,
        "node 2: logged once, at error level: {logged:?}"
    );
    s.docker(1, &["service", "rm", "clash-b"]);
    eventually("node 2: the clash clears", Duration::from_secs(15), || {
        (doctor(s, 2)["model"].0 == "ok").then_some(())
    });
    // Recovered: clash-a's port answers on node 2 now.
    let body = eventually(
        "node 2: 30000 answers once the clash is gone",
        Duration::from_secs(15),
        || who(s, 2, 30000).ok(),
    );
    assert!(body.starts_with("clash-a."), "{body}");
    // Row 11.6/no-stale-log: once cleared, a change of the service (a new task) logs no
    // failure for it.
    let errors_before = agent_log(2, &["ERROR", "clash-a"]).len();
    s.docker(1, &["service", "scale", "-d", "clash-a=2"]);
    s.wait_running("clash-a", 2, Duration::from_secs(60));
    std::thread::sleep(Duration::from_secs(3));
    let errors = agent_log(2, &["ERROR", "clash-a"]);
    assert_eq!(
        errors.len(),
        errors_before,
        "node 2: no failure logged for clash-a after it cleared: {errors:?}"
    );
    println!(
        "swarm: node 2: {problem}; afterclash still answered there; cleared when clash-b \
         left, and a new task of clash-a logged no failure"
    );
}

/// Rows 7/protocols (beyond the MTU), 6/protocols: a 4,000-byte UDP datagram (three IP
/// fragments) and its 4,000-byte answer through a published port on every node, and
/// through a VIP from a task on every node; a 64 KB HTTP body both ways (TCP segments).
pub fn beyond_the_mtu(s: &Swarm) {
    s.docker(1, &["network", "create", "-d", "overlay", "bignet"]);
    create_sh(
        s,
        &[
            "--name",
            "bigudp",
            "--replicas",
            "3",
            "--replicas-max-per-node",
            "1",
            "-p",
            "5357:53/udp",
            "-p",
            "8203:80",
            "--network",
            "bignet",
        ],
        "dd if=/dev/zero bs=1024 count=64 2>/dev/null | tr '\\0' x > /www/big; \
         udp-who 53 & exec httpd -f -p 80 -h /www",
    );
    let tasks = s.wait_running("bigudp", 3, Duration::from_secs(60));
    let names: BTreeSet<String> = tasks.iter().map(|(t, _)| t.clone()).collect();
    for node in 1..=s.nodes {
        let a = s.addr(node);
        let mut seen = BTreeSet::new();
        let t0 = Instant::now();
        while seen != names {
            // The first datagram toward a task on another node teaches the client the
            // tunnel's MTU (ICMP fragmentation needed) and is lost: sent again.
            let (task, client, n) = eventually(
                &format!("node {node}: a 4000-byte datagram to 5357 answered"),
                Duration::from_secs(10),
                || s.client(|| udp_big((a, 5357).into(), 4000)).ok(),
            );
            assert_eq!(n, 4000, "node {node}: the whole answer");
            assert_eq!(client, s.client_addr().to_string());
            seen.insert(task);
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "node {node}: 4000-byte datagrams reached only {seen:?} of {names:?}"
            );
        }
        let body = s
            .client(|| http(a, 8203, "/big", Duration::from_secs(5)))
            .unwrap_or_else(|e| panic!("node {node}: 64 KB over TCP: {e}"));
        assert_eq!(body.len(), 65536, "node {node}: the whole body");
    }
    // Through the VIP, from a task on every node (the `bigcall` global service).
    global_caller(s, "bigcall", "bignet");
    let vip = vip_of(s, "bigudp", "bignet");
    for node in 1..=s.nodes {
        let id = s.docker(node, &["ps", "-q", "-f", "name=bigcall"]);
        let (task, _, n) = eventually(
            &format!("node {node}: 4000 bytes to the VIP"),
            Duration::from_secs(15),
            || {
                s.in_container(node, &id, || udp_big((vip, 53).into(), 4000))
                    .ok()
            },
        );
        assert_eq!(n, 4000);
        assert!(names.contains(&task), "{task} is a bigudp task");
        let body = s
            .in_container(node, &id, || http(vip, 80, "/big", Duration::from_secs(5)))
            .unwrap_or_else(|e| panic!("node {node}: 64 KB from the VIP: {e}"));
        assert_eq!(body.len(), 65536);
    }
    println!(
        "swarm: 4000-byte UDP datagrams answered in full through 5357 on every node (every \
         task) and through bigudp's VIP from every node; 64 KB over TCP both ways"
    );
}

/// Rows 7/udp-no-listener: UDP to a published port where no task listens gets ICMP port
/// unreachable at the client, from every node (task local or remote).
pub fn udp_without_listener(s: &Swarm) {
    create_sh(
        s,
        &["--name", "deaf", "--replicas", "1", "-p", "5358:53/udp"],
        "exec sleep 1000000",
    );
    s.wait_running("deaf", 1, Duration::from_secs(60));
    for node in 1..=s.nodes {
        let a = s.addr(node);
        let err = eventually(
            &format!("node {node}: port unreachable"),
            Duration::from_secs(15),
            || match s.client(|| udp_who((a, 5358).into(), true)) {
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Some(e),
                _ => None,
            },
        );
        println!("swarm: node {node}: UDP to 5358 with no listener: {err}");
    }
}

/// Rows 2.1/vxlanid-opt, 2.3/vni-honored, 4/unicast (ctr), 4/cross-subnet: an
/// attachable overlay with two subnets on VNIs 5101 and 5102; plain containers on the
/// second subnet reach each other across nodes (Docker's own VXLAN on VNI 5102 passes
/// the mesh's underlay hook), and the first subnet reaches the second.
pub fn two_subnets(s: &Swarm) {
    attachable_overlay(
        s,
        &[
            "--subnet",
            "10.60.1.0/24",
            "--subnet",
            "10.60.2.0/24",
            "-o",
            "com.docker.network.driver.overlay.vxlanid_list=5101,5102",
            "two",
        ],
    );
    let run = |node: u32, name: &str, ip: &str| {
        s.docker(
            node,
            &[
                "run",
                "-d",
                "--name",
                name,
                "--hostname",
                name,
                "--network",
                "two",
                "--ip",
                ip,
                IMAGE,
                "httpd",
                "-f",
                "-p",
                "80",
                "-h",
                "/www",
            ],
        )
    };
    run(1, "sub2a", "10.60.2.11");
    run(2, "sub2b", "10.60.2.12");
    run(3, "sub1c", "10.60.1.13");
    let get = |node: u32, ctr: &str, to: &str| -> String { who_from(s, node, ctr, to, 1).concat() };
    for (node, from, to, who) in [
        (1, "sub2a", "10.60.2.12", "sub2b"),
        (2, "sub2b", "10.60.2.11", "sub2a"),
        (3, "sub1c", "10.60.2.11", "sub2a"),
        (1, "sub2a", "10.60.1.13", "sub1c"),
    ] {
        let body = eventually(
            &format!("{from} (node {node}) -> {to}"),
            Duration::from_secs(30),
            || {
                let b = get(node, from, to);
                b.starts_with(who).then_some(b)
            },
        );
        println!("swarm: two subnets (VNIs 5101, 5102): {from} on node {node} -> {to}: {body}");
    }
}

/// Rows 6/reach (ctr), 6/protocols (ctr), 5/name-vip (ctr): a plain container on an
/// attachable overlay reaches a service by name (its VIP), TCP and UDP, answered by its
/// tasks, which see the container's own address. Node 1's container is on the network's
/// other subnet, off the VIP's: it sends to its gateway, and the flow must be routed
/// on to the tasks' subnet (it once went out on the wrong bridge and was lost: the
/// phase failed whenever Docker happened to put that container there).
pub fn vip_from_a_plain_container(s: &Swarm) {
    create_sh(
        s,
        &["--name", "ctrapi", "--replicas", "2", "--network", "two"],
        "udp-who 53 & exec httpd -f -p 80 -h /www",
    );
    s.wait_running("ctrapi", 2, Duration::from_secs(60));
    let vip = vip_of(s, "ctrapi", "two");
    // Node 1's container on the subnet the VIP is not on (Docker 28.5 allocates the VIP
    // on the first, 20.10 on the second).
    let off = match vip.octets()[2] {
        1 => "10.60.2.21",
        _ => "10.60.1.21",
    };
    for node in 1..=s.nodes {
        let name = format!("plain{node}");
        let mut run = vec!["run", "-d", "--name", &name, "--network", "two"];
        if node == 1 {
            run.extend(["--ip", off]);
        }
        run.extend([IMAGE, "sleep", "1000000"]);
        let id = s.docker(node, &run);
        let me = addr_on(s, node, &id, "two");
        let body = eventually(
            &format!("node {node}: {name} -> ctrapi by name"),
            Duration::from_secs(20),
            || {
                let b = who_from(s, node, &id, "ctrapi", 1).concat();
                b.starts_with("ctrapi.").then_some(b)
            },
        );
        let (_, client) = task_and_client(&body);
        assert_eq!(
            client, me,
            "node {node}: the task sees the container's address"
        );
        let (task, client, _) = eventually(
            &format!("node {node}: UDP to the VIP"),
            Duration::from_secs(10),
            || {
                s.in_container(node, &id, || udp_who((vip, 53).into(), true))
                    .ok()
            },
        );
        assert!(task.starts_with("ctrapi."), "{task}");
        assert_eq!(client, me);
        println!("swarm: node {node}: plain container {me} -> ctrapi (VIP {vip}) TCP and UDP: answered by its tasks, seeing {client}");
    }
}

/// Rows 7.2.1/port-in-use and 11.6/port-in-use-logged (a documented difference: the
/// mesh serves the port and says so): a process on node 2 that listens on a port a
/// service then publishes is found by `meshctl doctor` and in the agent's metrics.
pub fn port_in_use(s: &Swarm) {
    let (done, wait) = std::sync::mpsc::channel::<()>();
    let ready = std::sync::Barrier::new(2);
    let found = std::thread::scope(|sc| {
        // A listener of the test's own in node 2's namespace, held until the end.
        let ready = &ready;
        let h = sc.spawn(move || {
            s.on_node(2, move || {
                let l =
                    std::net::TcpListener::bind(("0.0.0.0", 8205)).expect("bind 8205 on node 2");
                ready.wait();
                let _ = wait.recv();
                drop(l);
            })
        });
        ready.wait();
        create_httpd(
            s,
            &["--name", "busyport", "-p", "8205:80", "--replicas", "1"],
        );
        s.wait_running("busyport", 1, Duration::from_secs(60));
        let found = eventually(
            "node 2: doctor finds 8205 in use",
            Duration::from_secs(15),
            || {
                let d = doctor(s, 2);
                (d["ports"].0 == "fail" && d["ports"].1.contains("8205"))
                    .then(|| d["ports"].1.clone())
            },
        );
        let metrics = s.metrics(2).unwrap_or_default();
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with("mesh_port_in_use{port=\"8205\"")),
            "node 2: mesh_port_in_use names it:\n{metrics}"
        );
        assert_eq!(
            doctor(s, 1)["ports"].0,
            "ok",
            "nothing listens on 8205 on node 1"
        );
        let logged = agent_log(2, &["ERROR", "port 8205/tcp", "busyport"]);
        assert_eq!(
            logged.len(),
            1,
            "node 2: logged once, at error level, naming the port: {logged:?}"
        );
        let _ = done.send(());
        h.join().expect("holder");
        found
    });
    println!("swarm: node 2: {found}");
}

/// Row 6/self-vip: a lone task calling its own service's VIP reaches a task (itself).
pub fn lone_task_calls_its_own_vip(s: &Swarm) {
    create_sh(
        s,
        &["--name", "loner", "--replicas", "1", "--network", "two"],
        "exec httpd -f -p 80 -h /www",
    );
    let placed = s.wait_running("loner", 1, Duration::from_secs(60));
    let node = s.node_index(&placed[0].1);
    let id = s.docker(node, &["ps", "-q", "-f", "name=loner"]);
    let body = eventually("loner -> its own VIP", Duration::from_secs(15), || {
        let b = who_from(s, node, &id, "loner", 1).concat();
        b.starts_with("loner.1").then_some(b)
    });
    println!("swarm: a lone task calling its own VIP is answered by itself: {body}");
}

/// Host-mode ports with no overlay (the common case on a real node: Docker's port
/// mapping on docker0) and `docker run -p` beside the mesh: both left to Docker's own
/// mapping, which answers with the client's address.
pub fn docker_s_own_port_mappings(s: &Swarm) {
    create_httpd(
        s,
        &[
            "--name",
            "bridged",
            "--publish",
            "mode=host,published=8206,target=80",
            "--replicas",
            "1",
            "--constraint",
            "node.hostname==mc-n3",
            "--hostname",
            "{{.Task.Name}}",
        ],
    );
    s.wait_running("bridged", 1, Duration::from_secs(60));
    s.docker(
        2,
        &[
            "run",
            "-d",
            "--name",
            "mapped",
            "--hostname",
            "mapped",
            "-p",
            "8207:80",
            IMAGE,
            "httpd",
            "-f",
            "-p",
            "80",
            "-h",
            "/www",
        ],
    );
    for (node, port, want) in [(3, 8206, "bridged.1"), (2, 8207, "mapped")] {
        let body = eventually(
            &format!("node {node}:{port}"),
            Duration::from_secs(20),
            || who(s, node, port).ok(),
        );
        let (task, client) = task_and_client(&body);
        assert_eq!(task, want, "node {node}:{port}");
        assert_eq!(
            client,
            s.client_addr().to_string(),
            "Docker's DNAT keeps the client's address"
        );
        println!("swarm: node {node}:{port} (Docker's own port mapping on docker0) answered by {task}, seeing {client}");
    }
}

/// Row 10.1/mixed (published ports): in a swarm where node `stock` runs no mesh agent,
/// every mesh node knows it (status) and serves a published port whose only task runs
/// there, SNATed to its own ingress address as Docker does (the stock node's kernel
/// VXLAN and bridge deliver it; the reply comes back through the tunnel).
pub fn stock_node_tasks_from_mesh_nodes(s: &Swarm, stock: u32) {
    let on_stock = format!("node.hostname==mc-n{stock}");
    create_httpd(
        s,
        &[
            "--name",
            "onstock",
            "-p",
            "8210:80",
            "--replicas",
            "1",
            "--constraint",
            &on_stock,
            "--hostname",
            "{{.Task.Name}}",
        ],
    );
    s.wait_running("onstock", 1, Duration::from_secs(60));
    let stock_addr = s.addr(stock).to_string();
    for node in (1..=s.nodes).filter(|n| *n != stock) {
        let status = eventually(
            &format!("node {node} takes node {stock} as stock"),
            Duration::from_secs(20),
            || {
                let (_, out, _) = s.meshctl(node, &["status"]);
                out.lines()
                    .find(|l| l.starts_with("stock Docker nodes") && l.contains(&stock_addr))
                    .map(str::to_string)
            },
        );
        let body = eventually(
            &format!("node {node}:8210 -> the stock node's task"),
            Duration::from_secs(20),
            || who(s, node, 8210).ok(),
        );
        let (task, client) = task_and_client(&body);
        assert_eq!(task, "onstock.1");
        println!("swarm: node {node}: {status}; 8210 answered by {task} there (it saw {client}, this node's ingress address, as with Docker)");
    }
}

/// Rows 10.1/mixed (overlays and VIPs), 4/unicast across mesh and stock nodes: on an
/// overlay spanning both, tasks reach each other by address both ways (Docker's own
/// VXLAN through the mesh's underlay hook), and a mesh node's task reaches, through the
/// VIP, every task of a service with one on the stock node.
pub fn overlay_across_mesh_and_stock_nodes(s: &Swarm, stock: u32) {
    attachable_overlay(s, &["mixnet"]);
    create_httpd(
        s,
        &[
            "--name",
            "mixapi",
            "--replicas",
            &s.nodes.to_string(),
            "--replicas-max-per-node",
            "1",
            "--network",
            "mixnet",
            "--hostname",
            "{{.Task.Name}}",
        ],
    );
    global_caller(s, "mixcaller", "mixnet");
    let api = s.wait_running("mixapi", s.nodes as usize, Duration::from_secs(60));
    let all: BTreeSet<String> = api.iter().map(|(t, _)| t.clone()).collect();
    for node in 1..=s.nodes {
        let id = s.docker(node, &["ps", "-q", "-f", "name=mixcaller"]);
        // Every task by its own address, from every node (stock included).
        let direct = eventually(
            &format!("node {node}: every mixapi task by address"),
            Duration::from_secs(30),
            || {
                let out = s.try_docker(
                node,
                &[
                    "exec", &id, "sh", "-c",
                    "for a in $(nslookup tasks.mixapi 2>/dev/null | awk '/^Address: /{print $2}'); do \
                     printf 'GET /cgi-bin/who HTTP/1.0\\r\\n\\r\\n' | nc -w 2 $a 80 | tail -1; done",
                ],
            );
                let text = String::from_utf8_lossy(&out.stdout).to_string();
                let seen: BTreeSet<String> = text.lines().map(|l| task_and_client(l).0).collect();
                (seen.len() == all.len()).then_some(seen)
            },
        );
        if node == stock {
            println!("swarm: stock node {node}: its caller reached every mixapi task by address: {direct:?}");
            continue;
        }
        // The VIP from a mesh node: every task, the stock node's too.
        let seen = eventually(
            &format!("node {node}: mixapi VIP reaches every task"),
            Duration::from_secs(30),
            || {
                let seen: BTreeSet<String> = who_from(s, node, &id, "mixapi", 30)
                    .iter()
                    .map(|l| task_and_client(l).0)
                    .collect();
                (seen.len() == all.len()).then_some(seen)
            },
        );
        println!(
            "swarm: mesh node {node}: every mixapi task by address, and through the VIP: {seen:?}"
        );
    }
}

/// Rows 11.3/net-add and 11.3/net-rm: a service that joins a network (`service update
/// --network-add`) is reachable there by name from a task as soon as its new task runs,
/// every call answered; after `--network-rm` its VIP there answers no more.
pub fn network_add_and_remove(s: &Swarm) {
    attachable_overlay(s, &["joinnet"]);
    global_caller(s, "joincaller", "joinnet");
    create_httpd(
        s,
        &[
            "--name",
            "late",
            "--replicas",
            "2",
            "--hostname",
            "{{.Task.Name}}",
        ],
    );
    s.wait_running("late", 2, Duration::from_secs(60));
    s.docker(
        1,
        &["service", "update", "--network-add", "joinnet", "late"],
    );
    let t0 = Instant::now();
    s.wait_running("late", 2, Duration::from_secs(60));
    let vip = vip_of(s, "late", "joinnet");
    let converged = t0.elapsed();
    for node in 1..=s.nodes {
        let id = s.docker(node, &["ps", "-q", "-f", "name=joincaller"]);
        let out = who_from(s, node, &id, "late", 10);
        let answered = out.iter().filter(|l| l.starts_with("late.")).count();
        assert_eq!(
            answered, 10,
            "node {node}: calls to late (VIP {vip}) right after it joined joinnet \
             ({converged:?} after the update): {out:?}"
        );
    }
    println!("swarm: late joined joinnet (VIP {vip}), its tasks running {converged:?} after the update: 10 of 10 calls by name answered from every node");
    s.docker(1, &["service", "update", "--network-rm", "joinnet", "late"]);
    let id = s.docker(1, &["ps", "-q", "-f", "name=joincaller"]);
    eventually(
        "late's old VIP on joinnet answers no more",
        Duration::from_secs(20),
        || {
            (!who_from(s, 1, &id, &vip.to_string(), 1)
                .concat()
                .contains("late."))
            .then_some(())
        },
    );
}

/// Is anything answering TCP on node `n`'s `port`? (`Err` kinds: refused or silent.)
fn tcp_refused(s: &Swarm, n: u32, port: u16) -> bool {
    let a = s.addr(n);
    s.client(|| {
        matches!(
            std::net::TcpStream::connect_timeout(&(a, port).into(), Duration::from_secs(1)),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused
        )
    })
}

/// Rows 7/unpublished, 7/new-port, 7/old-port-closed, 7/rm-closed, 7.2.1/reach-reported:
/// a port a task listens on but the service does not publish is closed at the nodes;
/// after a port change the new port answers on every node and the old one is closed;
/// once the service is removed nothing answers on its port.
pub fn published_port_lifecycle(s: &Swarm) {
    // httpd on 80 and 81; only 80 published, as 8220.
    create_sh(
        s,
        &["--name", "mover", "--replicas", "2", "-p", "8220:80"],
        "httpd -p 81 -h /www; exec httpd -f -p 80 -h /www",
    );
    s.wait_running("mover", 2, Duration::from_secs(60));
    for node in 1..=s.nodes {
        eventually(
            &format!("node {node}: 8220"),
            Duration::from_secs(15),
            || who(s, node, 8220).ok(),
        );
        for port in [80, 81] {
            assert!(
                tcp_refused(s, node, port),
                "node {node}: the tasks' unpublished {port} is closed"
            );
        }
    }
    s.docker(
        1,
        // (--publish-rm takes the target port.)
        &[
            "service",
            "update",
            "-d",
            "--publish-rm",
            "80",
            "--publish-add",
            "8221:80",
            "mover",
        ],
    );
    for node in 1..=s.nodes {
        eventually(
            &format!("node {node}: 8221 after the change"),
            Duration::from_secs(20),
            || who(s, node, 8221).ok(),
        );
        eventually(
            &format!("node {node}: 8220 closed after the change"),
            Duration::from_secs(20),
            || tcp_refused(s, node, 8220).then_some(()),
        );
    }
    s.docker(1, &["service", "rm", "mover"]);
    for node in 1..=s.nodes {
        eventually(
            &format!("node {node}: 8221 closed after rm"),
            Duration::from_secs(30),
            || tcp_refused(s, node, 8221).then_some(()),
        );
    }
    println!("swarm: unpublished ports closed; 8220 -> 8221: the new port answers and the old is closed on every node; after rm nothing answers");
}

/// Rows 11.3/vip-to-dnsrr and 11.3/dnsrr-to-vip: after vip -> dnsrr the old VIP reaches
/// the service no more; after dnsrr -> vip the new VIP balances over its tasks.
pub fn vip_and_dnsrr(s: &Swarm) {
    create_httpd(
        s,
        &[
            "--name",
            "modal",
            "--replicas",
            "2",
            "--network",
            "joinnet",
            "--hostname",
            "{{.Task.Name}}",
            "--stop-grace-period",
            "2s",
        ],
    );
    s.wait_running("modal", 2, Duration::from_secs(60));
    let id = s.docker(1, &["ps", "-q", "-f", "name=joincaller"]);
    let get = |to: &str| -> String { who_from(s, 1, &id, to, 1).concat() };
    let old = vip_of(s, "modal", "joinnet").to_string();
    eventually("modal's VIP answers", Duration::from_secs(20), || {
        get(&old).starts_with("modal.").then_some(())
    });
    s.docker(
        1,
        &[
            "service",
            "update",
            "-d",
            "--endpoint-mode",
            "dnsrr",
            "modal",
        ],
    );
    // "After" the change: once the rolling update is done (until the old tasks are gone,
    // Docker's own records still carry the VIP, as its IPVS does).
    wait_updated(s, "modal", Duration::from_secs(120));
    eventually(
        "the old VIP reaches modal no more",
        Duration::from_secs(20),
        || (!get(&old).starts_with("modal.")).then_some(()),
    );
    // Wait for dnsrr to settle (no VIP) before going back.
    eventually(
        "modal in dnsrr mode has no VIP",
        Duration::from_secs(30),
        || {
            s.docker(
                1,
                &[
                    "service",
                    "inspect",
                    "-f",
                    "{{len .Endpoint.VirtualIPs}}",
                    "modal",
                ],
            )
            .eq("0")
            .then_some(())
        },
    );
    s.docker(
        1,
        &["service", "update", "-d", "--endpoint-mode", "vip", "modal"],
    );
    let new = eventually("modal has a VIP again", Duration::from_secs(30), || {
        try_vip_of(s, "modal", "joinnet").map(|v| v.to_string())
    });
    let seen = eventually(
        "the new VIP balances over both tasks",
        Duration::from_secs(30),
        || {
            let seen: BTreeSet<String> = (0..12).map(|_| task_and_client(&get(&new)).0).collect();
            (seen.len() == 2 && seen.iter().all(|t| t.starts_with("modal."))).then_some(seen)
        },
    );
    println!(
        "swarm: modal vip ({old}) -> dnsrr: the old VIP answers no more; -> vip ({new}): {seen:?}"
    );
}

/// A container of the test's own on `network` on node `n` that only sleeps: to call
/// from. Its id.
fn sleeper(s: &Swarm, n: u32, name: &str, network: &str) -> String {
    s.docker(
        n,
        &[
            "run",
            "-d",
            "--name",
            name,
            "--network",
            network,
            IMAGE,
            "sleep",
            "1000000",
        ],
    )
}

/// Container `ctr`'s address on `network` (node `n`'s view).
fn addr_on(s: &Swarm, n: u32, ctr: &str, network: &str) -> String {
    let f = format!("{{{{.NetworkSettings.Networks.{network}.IPAddress}}}}");
    s.docker(n, &["inspect", "-f", &f, ctr])
}

/// Node `n`'s task of the global `service`: its container's name and its address on
/// `network`.
fn local_task(s: &Swarm, n: u32, service: &str, network: &str) -> (String, String) {
    let filter = format!("name={service}.");
    let task = s.docker(n, &["ps", "--filter", &filter, "--format", "{{.Names}}"]);
    let addr = addr_on(s, n, &task, network);
    (task, addr)
}

/// Waits until the container `<prefix><n>` on each node `n` of `from` reaches `addr`
/// and is answered by a task of `service`.
fn reached_from(
    s: &Swarm,
    from: &[u32],
    prefix: &str,
    addr: &str,
    service: &str,
    within: Duration,
) {
    for &n in from {
        eventually(&format!("node {n} -> {service} at {addr}"), within, || {
            let b = who_from(s, n, &format!("{prefix}{n}"), addr, 1).concat();
            b.starts_with(&format!("{service}.")).then_some(())
        });
    }
}

/// The tasks of `service` that run now (`service.slot` or `service.node id`).
fn running_tasks(s: &Swarm, service: &str, n: usize) -> BTreeSet<String> {
    s.wait_running(service, n, Duration::from_secs(90))
        .into_iter()
        .map(|(t, _)| t)
        .collect()
}

/// Waits until the rolling update of `service` has completed.
fn wait_updated(s: &Swarm, service: &str, within: Duration) {
    eventually(&format!("{service}: update completed"), within, || {
        let st = s.docker(
            1,
            &[
                "service",
                "inspect",
                "-f",
                "{{if .UpdateStatus}}{{.UpdateStatus.State}}{{end}}",
                service,
            ],
        );
        (st == "completed").then_some(())
    });
}

/// Rows 11.3/update-vip-live, 11.3/update-done, 11.3/rapid-scale, 11.2/task-replaced
/// (VIP) and 6/task-free-node: a service's VIP, called by name from a plain container on
/// every node (node 3 runs none of its tasks), through a rolling update (stop-first,
/// one at a time) and a rapid scale 3 -> 6 -> 2 -> 3. No node's callers go without an
/// answer for 5 s (Docker's spec allows 300), and once it is over every new flow is
/// answered by a task that runs.
pub fn vip_through_churn(s: &Swarm) {
    create_sh(
        s,
        &[
            "--name",
            "churn",
            "--replicas",
            "3",
            "--network",
            "two",
            "--constraint",
            "node.hostname!=mc-n3",
            "--stop-grace-period",
            "2s",
        ],
        "exec httpd -f -p 80 -h /www",
    );
    s.wait_running("churn", 3, Duration::from_secs(60));
    let callers: Vec<String> = (1..=s.nodes)
        .map(|n| sleeper(s, n, &format!("churnc{n}"), "two"))
        .collect();
    let caller = |n: u32| callers[(n - 1) as usize].as_str();
    for n in 1..=s.nodes {
        eventually(
            &format!("node {n}: churn by name"),
            Duration::from_secs(20),
            || {
                who_from(s, n, caller(n), "churn", 1)
                    .concat()
                    .starts_with("churn.")
                    .then_some(())
            },
        );
    }
    let stop = AtomicBool::new(false);
    let results = std::thread::scope(|sc| {
        let calls: Vec<_> = (1..=s.nodes)
            .map(|n| {
                let stop = &stop;
                sc.spawn(move || {
                    let (mut ok, mut failed) = (0u32, 0u32);
                    let mut last_ok = Instant::now();
                    let mut worst = Duration::ZERO;
                    while !stop.load(Ordering::Relaxed) {
                        for got in who_from(s, n, caller(n), "churn", 5) {
                            if got.starts_with("churn.") {
                                ok += 1;
                                worst = worst.max(last_ok.elapsed());
                                last_ok = Instant::now();
                            } else {
                                failed += 1;
                            }
                        }
                    }
                    (n, ok, failed, worst.max(last_ok.elapsed()))
                })
            })
            .collect();
        s.docker(1, &["service", "update", "-d", "--force", "churn"]);
        wait_updated(s, "churn", Duration::from_secs(120));
        for replicas in ["churn=6", "churn=2", "churn=3"] {
            s.docker(1, &["service", "scale", "-d", replicas]);
            std::thread::sleep(Duration::from_secs(1));
        }
        s.wait_running("churn", 3, Duration::from_secs(90));
        std::thread::sleep(Duration::from_secs(2));
        stop.store(true, Ordering::Relaxed);
        calls
            .into_iter()
            .map(|h| h.join().expect("caller thread"))
            .collect::<Vec<_>>()
    });
    for (n, ok, failed, worst) in &results {
        println!(
            "swarm: node {n}: churn's VIP through an update and scale 3->6->2->3: {ok} calls \
             answered, {failed} not, longest silence {:.1} s",
            worst.as_secs_f64()
        );
        assert!(*ok > 0, "node {n}: no call answered");
        assert!(
            *worst < Duration::from_secs(5),
            "node {n}: churn's VIP silent for {worst:?}"
        );
    }
    let placed = s.wait_running("churn", 3, Duration::from_secs(30));
    assert!(
        placed.iter().all(|(_, node)| node != "mc-n3"),
        "node 3 runs none of churn's tasks: {placed:?}"
    );
    let running: BTreeSet<String> = placed.into_iter().map(|(t, _)| t).collect();
    for n in 1..=s.nodes {
        let got = who_from(s, n, caller(n), "churn", 10);
        for g in &got {
            let (task, _) = task_and_client(g);
            assert!(
                running.contains(&task),
                "node {n}: after the churn, a new flow went to {g:?}, not one of {running:?}"
            );
        }
        assert_eq!(got.len(), 10, "node {n}: {got:?}");
    }
    s.docker(1, &["service", "rm", "churn"]);
    for n in 1..=s.nodes {
        s.docker(n, &["rm", "-f", &format!("churnc{n}")]);
    }
}

/// Rows 6.2/health-first and 6.2/unhealthy-out on VIPs: a task whose HEALTHCHECK has
/// not passed yet gets no VIP flow from any node, and once it turns unhealthy it gets
/// none again (2 s after Docker reports it).
pub fn health_on_vips(s: &Swarm) {
    create_sh(
        s,
        &[
            "--name",
            "hcv",
            "--replicas",
            "3",
            "--network",
            "two",
            "--stop-grace-period",
            "2s",
            "--health-cmd",
            "test -f /tmp/ok",
            "--health-interval",
            "1s",
            "--health-retries",
            "1",
            "--health-timeout",
            "1s",
            // Failures before the first pass do not count (no restart): `starting`.
            "--health-start-period",
            "30s",
        ],
        // Serving at once, healthy only after 6 s.
        "(sleep 6; touch /tmp/ok) & exec httpd -f -p 80 -h /www",
    );
    let first = running_tasks(s, "hcv", 3);
    let callers: Vec<String> = (1..=s.nodes)
        .map(|n| sleeper(s, n, &format!("hcvc{n}"), "two"))
        .collect();
    let caller = |n: u32| callers[(n - 1) as usize].as_str();
    let ask = |n: u32| -> Option<String> {
        let g = who_from(s, n, caller(n), "hcv", 1).concat();
        g.starts_with("hcv.").then(|| task_and_client(&g).0)
    };
    for n in 1..=s.nodes {
        eventually(
            &format!("node {n}: hcv by name"),
            Duration::from_secs(30),
            || ask(n),
        );
    }
    s.docker(1, &["service", "scale", "-d", "hcv=4"]);
    // The new task, once its container runs (health `starting`).
    let (task, node, cid) = eventually("hcv's fourth task", Duration::from_secs(30), || {
        let ps = s.docker(
            1,
            &[
                "service",
                "ps",
                "hcv",
                "--filter",
                "desired-state=running",
                "--format",
                "{{.Name}} {{.Node}}",
            ],
        );
        let (t, nd) = ps
            .lines()
            .filter_map(|l| l.split_once(' '))
            .find(|(t, _)| !first.contains(*t))?;
        let n = s.node_index(nd);
        let cid = s.docker(n, &["ps", "-q", "--filter", &format!("name={t}.")]);
        (!cid.is_empty()).then(|| (t.to_string(), n, cid))
    });
    let health = |cid: &str| s.docker(node, &["inspect", "-f", "{{.State.Health.Status}}", cid]);
    let mut while_starting = 0;
    while health(&cid) == "starting" {
        for n in 1..=s.nodes {
            if let Some(t) = ask(n) {
                assert_ne!(
                    t, task,
                    "node {n}: a VIP flow reached {task} before its HEALTHCHECK passed"
                );
                while_starting += 1;
            }
        }
    }
    assert!(
        while_starting > 0,
        "no call answered while {task} was starting"
    );
    let healthy = Instant::now();
    eventually(
        &format!("{task} answers once healthy"),
        Duration::from_secs(30),
        || {
            (1..=s.nodes)
                .any(|n| ask(n).as_deref() == Some(task.as_str()))
                .then_some(())
        },
    );
    let joined = healthy.elapsed();
    s.docker(node, &["exec", &cid, "rm", "/tmp/ok"]);
    eventually(
        &format!("{task} unhealthy"),
        Duration::from_secs(15),
        || (health(&cid) == "unhealthy").then_some(()),
    );
    std::thread::sleep(Duration::from_secs(2));
    let mut after = 0;
    for _ in 0..5 {
        for n in 1..=s.nodes {
            if let Some(t) = ask(n) {
                assert_ne!(
                    t, task,
                    "node {n}: a new VIP flow reached {task} 2 s after it turned unhealthy"
                );
                after += 1;
            }
        }
    }
    assert!(after > 0, "no call answered after {task} turned unhealthy");
    println!(
        "swarm: hcv's VIP: {while_starting} calls while {task} was starting, none to it; it \
         answered {:.1} s after Docker reported it healthy; {after} calls 2 s after it \
         turned unhealthy, none to it",
        joined.as_secs_f64()
    );
    s.docker(1, &["service", "rm", "hcv"]);
    for n in 1..=s.nodes {
        s.docker(n, &["rm", "-f", &format!("hcvc{n}")]);
    }
}

/// Rows 4/no-shared-net, 4/gwbridge-isolation and 4/protocols (UDP): `isoc` on a second
/// attachable overlay `iso` (node 2) answers TCP and UDP across nodes to a container on
/// `iso`, but not to containers on `two` only (on its node or another) at its overlay
/// address, nor at its docker_gwbridge address from a container on its own node (that
/// address answers from the node itself, so it is live).
pub fn isolation_and_udp_on_overlays(s: &Swarm) {
    attachable_overlay(s, &["--subnet", "10.61.0.0/24", "iso"]);
    s.docker(
        2,
        &[
            "run",
            "-d",
            "--name",
            "isoc",
            "--hostname",
            "isoc",
            "--network",
            "iso",
            IMAGE,
            "sh",
            "-c",
            "udp-who 53 & exec httpd -f -p 80 -h /www",
        ],
    );
    let isob = sleeper(s, 1, "isob", "iso");
    sleeper(s, 1, "twoa", "two");
    sleeper(s, 2, "twod", "two");
    let isoc = addr_on(s, 2, "isoc", "iso");
    let me = addr_on(s, 1, "isob", "iso");
    let gw = s
        .docker(2, &["exec", "isoc", "ip", "-4", "-o", "addr"])
        .split_whitespace()
        .find_map(|w| {
            w.strip_prefix("172.18.")
                .map(|rest| format!("172.18.{rest}"))
        })
        .and_then(|a| a.split('/').next().map(str::to_string))
        .expect("isoc's docker_gwbridge address");
    let body = eventually(
        "isob (node 1) -> isoc (node 2)",
        Duration::from_secs(30),
        || {
            let b = who_from(s, 1, "isob", &isoc, 1).concat();
            b.starts_with("isoc").then_some(b)
        },
    );
    let to: SocketAddr = (isoc.parse::<Ipv4Addr>().expect("address"), 53).into();
    let (task, client, _) = eventually("UDP isob -> isoc", Duration::from_secs(10), || {
        s.in_container(1, &isob, || udp_who(to, true)).ok()
    });
    assert_eq!((task.as_str(), client.as_str()), ("isoc", me.as_str()));
    for (n, ctr, target, why) in [
        (1, "twoa", &isoc, "no network in common, another node"),
        (2, "twod", &isoc, "no network in common, the same node"),
        (2, "twod", &gw, "its docker_gwbridge address"),
    ] {
        let got = who_from(s, n, ctr, target, 2);
        assert!(
            got.iter().all(|g| g.is_empty()),
            "{ctr} (node {n}) reached isoc at {target} ({why}): {got:?}"
        );
    }
    let from_node = s.on_node(2, || {
        http(
            gw.parse().expect("address"),
            80,
            "/cgi-bin/who",
            Duration::from_secs(2),
        )
    });
    assert!(
        from_node.is_ok(),
        "isoc's gwbridge address {gw} answers from its node: {from_node:?}"
    );
    println!(
        "swarm: iso: isob -> isoc across nodes TCP ({body}) and UDP; containers on `two` \
         reach neither its overlay address {isoc} nor its gwbridge address {gw}"
    );
    for (n, c) in [(2, "isoc"), (1, "isob"), (1, "twoa"), (2, "twod")] {
        s.docker(n, &["rm", "-f", c]);
    }
    s.docker(1, &["network", "rm", "iso"]);
}

/// Rows 7.3/dnsrr-host, 7.3/auto-host-port, 7.1/host-self and 7.1/overlay-other: a
/// global dnsrr service with a host-mode port answers on every node from that node's
/// task, and so does a host-mode port Docker picks (read from `docker port`); a
/// host-mode task reaches its own port through its node's address; a container on an
/// overlay the service is not on reaches an ingress-published port through its node.
pub fn host_mode_variants(s: &Swarm) {
    create_sh(
        s,
        &[
            "--name",
            "hdns",
            "--mode",
            "global",
            "--endpoint-mode",
            "dnsrr",
            "--publish",
            "mode=host,target=80,published=8290",
            "--stop-grace-period",
            "2s",
        ],
        "exec httpd -f -p 80 -h /www",
    );
    create_sh(
        s,
        &[
            "--name",
            "hauto",
            "--mode",
            "global",
            "--publish",
            "mode=host,target=80",
            "--stop-grace-period",
            "2s",
        ],
        "exec httpd -f -p 80 -h /www",
    );
    create_sh(
        s,
        &[
            "--name",
            "pubx",
            "--replicas",
            "1",
            "-p",
            "8291:80",
            "--stop-grace-period",
            "2s",
        ],
        "exec httpd -f -p 80 -h /www",
    );
    s.wait_running("hdns", s.nodes as usize, Duration::from_secs(60));
    s.wait_running("hauto", s.nodes as usize, Duration::from_secs(60));
    s.wait_running("pubx", 1, Duration::from_secs(60));
    let local = |n: u32, svc: &str| -> String {
        s.docker(
            n,
            &[
                "ps",
                "--filter",
                &format!("name={svc}."),
                "--format",
                "{{.Names}}",
            ],
        )
    };
    for n in 1..=s.nodes {
        let hdns = local(n, "hdns");
        let body = eventually(&format!("node {n}: 8290"), Duration::from_secs(20), || {
            who(s, n, 8290).ok()
        });
        let (task, client) = task_and_client(&body);
        assert!(
            hdns.starts_with(&task),
            "node {n}: 8290 answered by {task}, not its own {hdns}"
        );
        assert_eq!(client, s.client_addr().to_string());
        let hauto = local(n, "hauto");
        let port: u16 = s
            .docker(n, &["port", &hauto, "80/tcp"])
            .lines()
            .find_map(|l| l.rsplit(':').next()?.trim().parse().ok())
            .expect("the port Docker picked");
        let body = eventually(
            &format!("node {n}: hauto's {port}"),
            Duration::from_secs(20),
            || who(s, n, port).ok(),
        );
        let (task, _) = task_and_client(&body);
        assert!(
            hauto.starts_with(&task),
            "node {n}: {port} answered by {task}, not {hauto}"
        );
        println!("swarm: node {n}: dnsrr host-mode 8290 and Docker's pick {port} answered by the node's own tasks");
    }
    let node1 = s.addr(1).to_string();
    let hdns1 = local(1, "hdns");
    let body = eventually(
        "hdns on node 1 -> its own port through node 1",
        Duration::from_secs(20),
        || {
            let b = who_from_at(s, 1, &hdns1, &node1, 8290, 1).concat();
            (!b.is_empty()).then_some(b)
        },
    );
    assert!(hdns1.starts_with(&task_and_client(&body).0), "{body}");
    sleeper(s, 1, "ovo", "two");
    let body = eventually(
        "a container on `two` -> pubx's 8291 through node 1",
        Duration::from_secs(20),
        || {
            let b = who_from_at(s, 1, "ovo", &node1, 8291, 1).concat();
            b.starts_with("pubx.").then_some(b)
        },
    );
    println!("swarm: host-mode task -> its own 8290 through its node; a container on `two` -> 8291 (pubx): {body}");
    s.docker(1, &["rm", "-f", "ovo"]);
    s.docker(1, &["service", "rm", "hdns", "hauto", "pubx"]);
}

/// Row 2.4/custom-ingress: the ingress network removed and created again with a subnet
/// and gateway of its own (`docker network create --ingress`); a published port then
/// answers on every node, from tasks on every node. Runs last: every service with a
/// published port must be gone before Docker lets the network go.
pub fn custom_ingress(s: &Swarm) {
    let ls = s.docker(1, &["service", "ls", "-q"]);
    for id in ls.lines() {
        s.docker(1, &["service", "rm", id]);
    }
    // Until every node's tasks are gone, their nodes keep the old ingress sandbox.
    for n in 1..=s.nodes {
        eventually(
            &format!("node {n}: no task left"),
            Duration::from_secs(60),
            || {
                let ps = s.docker(
                    n,
                    &["ps", "-aq", "--filter", "label=com.docker.swarm.service.id"],
                );
                ps.is_empty().then_some(())
            },
        );
    }
    // Docker asks for confirmation on stdin; it refuses while tasks still hold the network.
    eventually("ingress removed", Duration::from_secs(60), || {
        s.docker_answering(1, &["network", "rm", "ingress"], "y\n")
            .status
            .success()
            .then_some(())
    });
    s.docker(
        1,
        &[
            "network",
            "create",
            "-d",
            "overlay",
            "--ingress",
            "--subnet",
            "10.70.0.0/24",
            "--gateway",
            "10.70.0.1",
            "myingress",
        ],
    );
    create_sh(
        s,
        &[
            "--name",
            "oningress",
            "--mode",
            "global",
            "-p",
            "8293:80",
            "--stop-grace-period",
            "2s",
        ],
        "exec httpd -f -p 80 -h /www",
    );
    s.wait_running("oningress", s.nodes as usize, Duration::from_secs(90));
    let mut seen = BTreeSet::new();
    for n in 1..=s.nodes {
        let body = eventually(
            &format!("node {n}: 8293 on myingress"),
            Duration::from_secs(30),
            || who(s, n, 8293).ok(),
        );
        assert_eq!(task_and_client(&body).1, s.client_addr().to_string());
        for _ in 0..12 {
            if let Ok(b) = who(s, n, 8293) {
                seen.insert(task_and_client(&b).0);
            }
        }
    }
    assert_eq!(
        seen.len(),
        s.nodes as usize,
        "tasks on every node answer: {seen:?}"
    );
    println!("swarm: ingress re-created as myingress (10.70.0.0/24): 8293 answers on every node, from {seen:?}");
    s.docker(1, &["service", "rm", "oningress"]);
}

/// Rows 11.1/restart-overlay, 11.1/restart-ports, 11.1/restart-others,
/// 11.1/kill-overlay, 11.1/kill-ports and 11.1/vni-reuse: node 2's dockerd restarted (SIGTERM), then
/// killed (SIGKILL, with its containerd) and started again, each time under a load
/// through nodes 1 and 3 to a service whose tasks run there (no request fails); then
/// node 2's published port answers and its task of a global service is reached over
/// the overlay from nodes 1 and 3.
pub fn dockerd_restarts(s: &Swarm) {
    create_sh(
        s,
        &[
            "--name",
            "steady",
            "--replicas",
            "2",
            "-p",
            "8294:80",
            "--constraint",
            "node.hostname!=mc-n2",
            "--stop-grace-period",
            "2s",
        ],
        "exec httpd -f -p 80 -h /www",
    );
    create_sh(
        s,
        &[
            "--name",
            "everywhere",
            "--mode",
            "global",
            "--network",
            "two",
            "--stop-grace-period",
            "2s",
        ],
        "exec httpd -f -p 80 -h /www",
    );
    s.wait_running("steady", 2, Duration::from_secs(60));
    s.wait_running("everywhere", s.nodes as usize, Duration::from_secs(60));
    for n in [1, 3] {
        sleeper(s, n, &format!("rc{n}"), "two");
    }
    for n in 1..=s.nodes {
        eventually(&format!("node {n}: 8294"), Duration::from_secs(20), || {
            who(s, n, 8294).ok()
        });
    }
    // Row 11.1/vni-reuse: VNI 5301 in use across nodes 1 and 2 before the kill, and by
    // another network after it.
    let vni_net = |name: &str| {
        attachable_overlay(
            s,
            &[
                "-o",
                "com.docker.network.driver.overlay.vxlanid_list=5301",
                name,
            ],
        );
        s.docker(
            1,
            &[
                "run",
                "-d",
                "--name",
                "vra",
                "--hostname",
                "vra",
                "--network",
                name,
                IMAGE,
                "httpd",
                "-f",
                "-p",
                "80",
                "-h",
                "/www",
            ],
        );
        sleeper(s, 2, "vrb", name);
        let a = addr_on(s, 1, "vra", name);
        eventually(
            &format!("{name} (VNI 5301): node 2 -> node 1"),
            Duration::from_secs(30),
            || {
                who_from(s, 2, "vrb", &a, 1)
                    .concat()
                    .starts_with("vra")
                    .then_some(())
            },
        );
    };
    vni_net("vr1");
    for action in ["restart", "kill"] {
        let load = super::Load::start(s, vec![(s.addr(1), 8294), (s.addr(3), 8294)], "/");
        std::thread::sleep(Duration::from_millis(500));
        let t = Instant::now();
        s.dockerd(2, action);
        let back = t.elapsed();
        s.wait_running("everywhere", s.nodes as usize, Duration::from_secs(120));
        let port = eventually(
            &format!("node 2: 8294 after dockerd {action}"),
            Duration::from_secs(60),
            || who(s, 2, 8294).ok(),
        );
        let (task, addr) = local_task(s, 2, "everywhere", "two");
        reached_from(
            s,
            &[1, 3],
            "rc",
            &addr,
            "everywhere",
            Duration::from_secs(60),
        );
        let done = super::assert_no_failures(
            &format!("dockerd {action} on node 2, load through nodes 1 and 3"),
            load,
        );
        println!(
            "swarm: dockerd {action} on node 2 (back in {:.1} s): {done} requests through \
             nodes 1 and 3, 0 failed; node 2's 8294 answers ({}), its task {task} is \
             reached over `two` from nodes 1 and 3",
            back.as_secs_f64(),
            port.trim()
        );
    }
    s.docker(1, &["rm", "-f", "vra"]);
    let _ = s.try_docker(2, &["rm", "-f", "vrb"]);
    eventually("vr1 removed", Duration::from_secs(30), || {
        s.try_docker(1, &["network", "rm", "vr1"])
            .status
            .success()
            .then_some(())
    });
    vni_net("vr2");
    println!("swarm: VNI 5301 of vr1 before node 2's dockerd was killed serves vr2 after it");
    s.docker(1, &["rm", "-f", "vra"]);
    s.docker(2, &["rm", "-f", "vrb"]);
    s.docker(1, &["network", "rm", "vr2"]);
    s.docker(1, &["service", "rm", "steady", "everywhere"]);
    for n in [1, 3] {
        s.docker(n, &["rm", "-f", &format!("rc{n}")]);
    }
}

/// Runs `cmd` in node `n`'s namespaces (`cluster exec`), asserting success.
fn node_exec(s: &Swarm, n: u32, cmd: &[&str]) {
    let node = n.to_string();
    let mut a = vec!["cluster", "exec", &node, "--"];
    a.extend_from_slice(cmd);
    let out = s.cli(&a);
    assert!(
        out.status.success(),
        "node {n}: {}: {}",
        cmd.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `n` answers in a row from `f` (a new flow each), within `within`.
fn answers_in_a_row(what: &str, n: usize, within: Duration, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    let mut row = 0;
    while row < n {
        assert!(
            t0.elapsed() < within,
            "{what}: not {n} answers in a row within {within:?}"
        );
        if f() {
            row += 1;
        } else {
            row = 0;
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

/// Rows 11.2/partition-vip, 11.2/leave-avoided and 11.2/heal: node 3 cut off the
/// underlay (its link down): within 120 s, VIP flows from nodes 1 and 2 and their
/// published port reach only running tasks on their side (10 answers in a row each); the
/// link back: within 180 s node 3's published port and its container's VIP calls answer
/// again. Returns when the heal was seen, for `heal_persists`; leaves `part` and the
/// containers `pc<n>` on `two` for it and `rejoin`.
pub fn partition_heals(s: &Swarm) -> Instant {
    create_sh(
        s,
        &[
            "--name",
            "part",
            "--replicas",
            "3",
            "--replicas-max-per-node",
            "2",
            "--network",
            "two",
            "-p",
            "8295:80",
            "--stop-grace-period",
            "2s",
        ],
        "exec httpd -f -p 80 -h /www",
    );
    s.wait_running("part", 3, Duration::from_secs(60));
    // Restarted with their dockerd (`dockerd_restarts` runs before `heal_persists`).
    for n in 1..=s.nodes {
        s.docker(
            n,
            &[
                "run",
                "-d",
                "--restart",
                "always",
                "--name",
                &format!("pc{n}"),
                "--network",
                "two",
                IMAGE,
                "sleep",
                "1000000",
            ],
        );
    }
    let vip_call = |n: u32| who_from(s, n, &format!("pc{n}"), "part", 1).concat();
    for n in 1..=s.nodes {
        eventually(
            &format!("node {n}: part by name"),
            Duration::from_secs(20),
            || vip_call(n).starts_with("part.").then_some(()),
        );
    }
    // Issue 19.12: each agent takes a silent node's tasks out of new-flow selection
    // within 3 s; node 3, cut off, keeps its own tasks.
    let part_backends = |n: u32| -> Vec<(String, String)> {
        group_backends(s, n, "part/tcp/8295")
            .iter()
            .map(|b| {
                (
                    b["at"].as_str().unwrap_or("").to_string(),
                    b["state"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect()
    };
    let on_node_3 = format!("node {}", s.addr(3));
    for n in [1, 2] {
        let b = part_backends(n);
        assert!(
            b.iter().any(|(at, st)| *at == on_node_3 && st == "active"),
            "node {n}: a part task on node 3 active before the cut: {b:?}"
        );
    }
    let t = Instant::now();
    node_exec(s, 3, &["ip", "link", "set", "eth0", "down"]);
    // When each of nodes 1 and 2 was first seen without node 3's tasks active.
    let mut out_at: [Option<Duration>; 2] = [None, None];
    eventually(
        "nodes 1 and 2: node 3's part tasks out of new-flow selection",
        Duration::from_secs(10),
        || {
            for (i, n) in [1u32, 2].into_iter().enumerate() {
                if out_at[i].is_none()
                    && part_backends(n)
                        .iter()
                        .all(|(at, st)| *at != on_node_3 || st != "active")
                {
                    out_at[i] = Some(t.elapsed());
                }
            }
            out_at.iter().all(Option::is_some).then_some(())
        },
    );
    let out_at = out_at.map(Option::unwrap_or_default);
    let own = part_backends(3);
    assert!(
        own.iter().any(|(at, st)| at == "local" && st == "active"),
        "node 3, cut off, keeps its own part tasks: {own:?}"
    );
    // The goal is 3 s; this observer adds up to ~0.5 s of its own (meshctl on two nodes
    // in turn, every 250 ms).
    let slowest = out_at.iter().max().copied().unwrap_or_default();
    assert!(
        slowest <= Duration::from_millis(3500),
        "node 3's tasks left nodes 1 and 2's selection only after {out_at:?}"
    );
    println!(
        "swarm: node 3 cut off: its tasks out of new-flow selection on nodes 1 and 2 after \
         {:.1} and {:.1} s; node 3 keeps its own",
        out_at[0].as_secs_f64(),
        out_at[1].as_secs_f64()
    );
    // Once node 3 is known down, only tasks of nodes 1 and 2 answer there.
    let on_our_side = |body: &str| -> bool {
        let (task, _) = task_and_client(body);
        !task.is_empty()
            && s.wait_running("part", 3, Duration::from_secs(120))
                .iter()
                .any(|(t, node)| *t == task && node != "mc-n3")
    };
    eventually("node 3 down in the swarm", Duration::from_secs(120), || {
        let st = s.docker(1, &["node", "inspect", "-f", "{{.Status.State}}", "mc-n3"]);
        (st == "down").then_some(())
    });
    let detected = t.elapsed();
    for n in [1, 2] {
        answers_in_a_row(
            &format!("node {n}: part's VIP on its side of the partition"),
            10,
            Duration::from_secs(120),
            || on_our_side(&vip_call(n)),
        );
        answers_in_a_row(
            &format!("node {n}: 8295 on its side of the partition"),
            10,
            Duration::from_secs(120),
            || who(s, n, 8295).is_ok_and(|b| on_our_side(&b)),
        );
    }
    let avoided = t.elapsed();
    node_exec(s, 3, &["ip", "link", "set", "eth0", "up"]);
    let t = Instant::now();
    eventually("node 3 ready again", Duration::from_secs(180), || {
        let st = s.docker(1, &["node", "inspect", "-f", "{{.Status.State}}", "mc-n3"]);
        (st == "ready").then_some(())
    });
    answers_in_a_row(
        "node 3: 8295 after the heal",
        5,
        Duration::from_secs(180),
        || who(s, 3, 8295).is_ok(),
    );
    answers_in_a_row(
        "node 3: part's VIP after the heal",
        5,
        Duration::from_secs(180),
        || vip_call(3).starts_with("part."),
    );
    let healed = t.elapsed();
    println!(
        "swarm: node 3 cut off: down in the swarm after {:.0} s, nodes 1 and 2 answered only \
         from their side {:.0} s after the cut; healed: node 3's port and VIP answer {:.0} s \
         after the link came back",
        detected.as_secs_f64(),
        avoided.as_secs_f64(),
        healed.as_secs_f64()
    );
    Instant::now()
}

/// Row 11.2/heal-persists: what the heal restored still holds once Docker's forwarding
/// entries have aged (300 s after `partition_heals` saw it; other phases run in
/// between): node 1's container and node 3's reach each other at their overlay
/// addresses, node 3's container reaches `part` through its VIP, and node 3's published
/// port answers. (Node 2's dockerd was restarted and killed in between: its `pc2` may
/// not have come back, a Docker behaviour with attachable overlays, so it is started
/// again for `rejoin`.)
pub fn heal_persists(s: &Swarm, healed: Instant) {
    let age = Duration::from_secs(310);
    let waited = age.saturating_sub(healed.elapsed());
    std::thread::sleep(waited);
    let ping = |from: u32, to: u32| {
        let addr = addr_on(s, to, &format!("pc{to}"), "two");
        let out = s.try_docker(
            from,
            &[
                "exec",
                &format!("pc{from}"),
                "ping",
                "-c",
                "3",
                "-W",
                "2",
                &addr,
            ],
        );
        assert!(
            out.status.success(),
            "node {from}'s container reaches node {to}'s ({addr}) {:.0} s after the heal: {}{}",
            healed.elapsed().as_secs_f64(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    ping(1, 3);
    ping(3, 1);
    answers_in_a_row(
        "node 3: part's VIP long after the heal",
        5,
        Duration::from_secs(30),
        || {
            who_from(s, 3, "pc3", "part", 1)
                .concat()
                .starts_with("part.")
        },
    );
    answers_in_a_row(
        "node 3: 8295 long after the heal",
        5,
        Duration::from_secs(30),
        || who(s, 3, 8295).is_ok(),
    );
    println!(
        "swarm: {:.0} s after the heal (waited {:.0} s of it): node 1's and node 3's \
         containers reach each other, node 3's container reaches part's VIP, node 3's 8295 \
         answers",
        healed.elapsed().as_secs_f64(),
        waited.as_secs_f64()
    );
    s.try_docker(2, &["start", "pc2"]);
}

/// Rows 11.2/rejoin-tasks, 11.2/rejoin-ports and 11.2/rejoin-reached: node 3 leaves the
/// swarm and joins again: within 120 s the global service's new task there is reached
/// from nodes 1 and 2, node 3's published port answers, and node 1's reaches node 3's
/// new task. Removes what `partition_heals` left.
pub fn rejoin(s: &Swarm) {
    // Leave and join again.
    let token = s.docker(1, &["swarm", "join-token", "-q", "worker"]);
    s.docker(3, &["rm", "-f", "pc3"]);
    s.docker(3, &["swarm", "leave"]);
    eventually("node 3 seen leaving", Duration::from_secs(60), || {
        let ls = s.docker(1, &["node", "ls", "--format", "{{.Hostname}} {{.Status}}"]);
        ls.lines()
            .filter(|l| l.starts_with("mc-n3 "))
            .all(|l| l.ends_with(" Down"))
            .then_some(())
    });
    let old = s.docker(1, &["node", "ls", "-q", "--filter", "name=mc-n3"]);
    for id in old.lines() {
        s.docker(1, &["node", "rm", "--force", id]);
    }
    let t = Instant::now();
    let manager = format!("{}:2377", s.addr(1));
    s.docker(3, &["swarm", "join", "--token", &token, &manager]);
    create_sh(
        s,
        &[
            "--name",
            "back",
            "--mode",
            "global",
            "--network",
            "two",
            "-p",
            "8296:80",
            "--stop-grace-period",
            "2s",
        ],
        "exec httpd -f -p 80 -h /www",
    );
    s.wait_running("back", s.nodes as usize, Duration::from_secs(120));
    let (task, addr) = local_task(s, 3, "back", "two");
    reached_from(s, &[1, 2], "pc", &addr, "back", Duration::from_secs(120));
    eventually(
        "node 3: 8296 after the rejoin",
        Duration::from_secs(120),
        || who(s, 3, 8296).ok(),
    );
    eventually(
        "node 1: 8296 reaches node 3's new task",
        Duration::from_secs(120),
        || {
            who(s, 1, 8296)
                .ok()
                .filter(|b| task.starts_with(&task_and_client(b).0))
        },
    );
    println!(
        "swarm: node 3 left and joined again: its new task {task} reached from nodes 1 and 2, \
         its 8296 answers, node 1's 8296 reaches it, {:.0} s after the join",
        t.elapsed().as_secs_f64()
    );
    s.docker(1, &["service", "rm", "part", "back"]);
    for n in [1, 2] {
        s.docker(n, &["rm", "-f", &format!("pc{n}")]);
    }
}

/// The kernel's uptime (s): a clock the tasks read too (`/proc/uptime`).
fn uptime() -> f64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse().ok())
        .expect("/proc/uptime")
}

/// An established connection to the echo server of a `grace` task: its first line is the
/// task's hostname.
struct Echo {
    stream: std::net::TcpStream,
    lines: std::io::BufReader<std::net::TcpStream>,
}

impl Echo {
    fn open(s: &Swarm, node: u32, port: u16) -> std::io::Result<(String, Echo)> {
        use std::io::BufRead;
        let a = s.addr(node);
        let stream = s.client(|| {
            std::net::TcpStream::connect_timeout(&(a, port).into(), Duration::from_secs(2))
        })?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut lines = std::io::BufReader::new(stream.try_clone()?);
        let mut host = String::new();
        lines.read_line(&mut host)?;
        let task = host
            .trim()
            .splitn(3, '.')
            .take(2)
            .collect::<Vec<_>>()
            .join(".");
        Ok((task, Echo { stream, lines }))
    }

    fn echo(&mut self, msg: &str) -> bool {
        use std::io::{BufRead, Write};
        let mut back = String::new();
        self.stream.write_all(format!("{msg}\n").as_bytes()).is_ok()
            && self.lines.read_line(&mut back).is_ok()
            && back.trim() == msg
    }
}

/// Rows 6.2/grace-established, 6.2/stop-own-node and 6.2/stop-other-nodes: a task scaled
/// away keeps running through its 6 s grace period (its shell traps SIGTERM and notes
/// when it came). An established connection to it through a published port keeps
/// flowing both ways until it is killed, and no new flow that starts after the signal,
/// from any node, reaches it.
pub fn graceful_stop(s: &Swarm) {
    create_sh(
        s,
        &[
            "--name",
            "grace",
            "--replicas",
            "3",
            "--replicas-max-per-node",
            "1",
            "-p",
            "8297:80",
            "-p",
            "8298:81",
            "--stop-grace-period",
            "6s",
        ],
        "printf '#!/bin/sh\\nhostname\\nexec cat\\n' > /tmp/echo; chmod +x /tmp/echo; \
         nc -ll -p 81 -e /tmp/echo & httpd -f -p 80 -h /www & \
         trap 'cat /proc/uptime > /tmp/term' TERM; while true; do sleep 0.1; done",
    );
    s.wait_running("grace", 3, Duration::from_secs(60));
    for n in 1..=s.nodes {
        eventually(&format!("node {n}: 8297"), Duration::from_secs(20), || {
            who(s, n, 8297).ok()
        });
    }
    // One established connection to every task.
    let mut conns = std::collections::BTreeMap::new();
    eventually(
        "a connection to every grace task",
        Duration::from_secs(30),
        || {
            if let Ok((task, e)) = Echo::open(s, 1 + conns.len() as u32 % s.nodes, 8298) {
                conns.entry(task).or_insert(e);
            }
            (conns.len() == 3).then_some(())
        },
    );
    s.docker(1, &["service", "scale", "-d", "grace=2"]);
    let (task, node) = eventually("the task being stopped", Duration::from_secs(20), || {
        let ps = s.docker(
            1,
            &[
                "service",
                "ps",
                "grace",
                "--format",
                "{{.Name}} {{.Node}} {{.DesiredState}}",
            ],
        );
        ps.lines().find_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            (w.len() == 3 && matches!(w[2], "Shutdown" | "Remove"))
                .then(|| (w[0].to_string(), s.node_index(w[1])))
        })
    });
    let cid = s.docker(node, &["ps", "-q", "--filter", &format!("name={task}.")]);
    let mut mine = conns
        .remove(&task)
        .expect("a connection to the stopping task");
    let stop = AtomicBool::new(false);
    let (echoes, calls, term) = std::thread::scope(|sc| {
        let stop = &stop;
        let echoes = sc.spawn(move || {
            let mut out = Vec::new();
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let t = uptime();
                let ok = mine.echo(&format!("line {i}"));
                out.push((t, ok));
                if !ok {
                    break;
                }
                i += 1;
                std::thread::sleep(Duration::from_millis(200));
            }
            out
        });
        let calls: Vec<_> = (1..=s.nodes)
            .map(|n| {
                sc.spawn(move || {
                    let mut out = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        let t = uptime();
                        if let Ok(b) = who(s, n, 8297) {
                            out.push((n, t, task_and_client(&b).0));
                        }
                    }
                    out
                })
            })
            .collect();
        // When its SIGTERM came (read while it still runs), then until it is gone
        // (killed at the end of its grace period).
        let term: f64 = eventually(
            &format!("{task}'s SIGTERM"),
            Duration::from_secs(20),
            || {
                let out = s.try_docker(node, &["exec", &cid, "cat", "/tmp/term"]);
                String::from_utf8_lossy(&out.stdout)
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            },
        );
        eventually(&format!("{task} gone"), Duration::from_secs(30), || {
            s.docker(node, &["ps", "-q", "--filter", &format!("id={cid}")])
                .is_empty()
                .then_some(())
        });
        stop.store(true, Ordering::Relaxed);
        let calls: Vec<_> = calls
            .into_iter()
            .flat_map(|h| h.join().expect("calls"))
            .collect();
        (echoes.join().expect("echoes"), calls, term)
    });
    let late: Vec<_> = calls
        .iter()
        .filter(|(_, t, who)| *t > term && *who == task)
        .collect();
    assert!(
        late.is_empty(),
        "new flows reached {task} after its SIGTERM: {late:?}"
    );
    let after_term = calls.iter().filter(|(_, t, _)| *t > term).count();
    assert!(after_term > 0, "no call answered after the SIGTERM");
    let kept: Vec<_> = echoes.iter().filter(|(t, _)| *t > term).collect();
    let broken = kept.iter().position(|(_, ok)| !ok);
    let flowing = broken.unwrap_or(kept.len());
    assert!(
        kept[..flowing].iter().all(|(_, ok)| *ok) && flowing >= 10,
        "the established connection to {task} flowed for only {flowing} lines after its \
         SIGTERM: {echoes:?}"
    );
    let last = kept[..flowing].last().map_or(term, |(t, _)| *t);
    println!(
        "swarm: {task} scaled away: its connection echoed {flowing} lines over {:.1} s of \
         its grace period; {after_term} new flows from every node after its SIGTERM, none \
         to it",
        last - term
    );
    s.docker(1, &["service", "rm", "grace"]);
}

/// Row 11.2/addr-moves: an address on `two` (10.60.1.50) moves from a container on node 1
/// to one on node 2, then back to node 1 with another MAC; a container on node 3 reaches
/// it at each new place.
pub fn address_moves(s: &Swarm) {
    sleeper(s, 3, "amc", "two");
    for (i, (node, mac)) in [(1, None), (2, None), (1, Some("02:42:0a:3c:01:99"))]
        .into_iter()
        .enumerate()
    {
        let name = format!("am{i}");
        let mut run = vec![
            "run",
            "-d",
            "--name",
            &name,
            "--hostname",
            &name,
            "--network",
            "two",
            "--ip",
            "10.60.1.50",
        ];
        if let Some(m) = mac {
            run.extend(["--mac-address", m]);
        }
        run.extend([IMAGE, "httpd", "-f", "-p", "80", "-h", "/www"]);
        s.docker(node, &run);
        let t = Instant::now();
        eventually(
            &format!("node 3 -> 10.60.1.50 at {name} on node {node}"),
            // A new MAC waits for the caller's neighbour entry to expire (~45 s seen):
            // Docker's overlay, which the mesh passes.
            Duration::from_secs(120),
            || {
                who_from(s, 3, "amc", "10.60.1.50", 1)
                    .concat()
                    .starts_with(&name)
                    .then_some(())
            },
        );
        println!(
            "swarm: 10.60.1.50 moved to {name} on node {node}{}: reached from node 3 in {:.1} s",
            mac.map_or(String::new(), |m| format!(" (MAC {m})")),
            t.elapsed().as_secs_f64()
        );
        s.docker(node, &["rm", "-f", &name]);
    }
    s.docker(3, &["rm", "-f", "amc"]);
}

/// Row 6/reach across subnets: a network whose first subnet (a /28) has no room for all
/// sixteen tasks, so some land on its second; a container that holds the first subnet's
/// last address takes the VIP for on its own subnet and sends to it directly: its flows
/// must still reach every task (those on the second subnet were once addressed to the
/// task on the caller's bridge, where they are not, and lost).
pub fn vip_across_subnets(s: &Swarm) {
    attachable_overlay(
        s,
        &[
            "--subnet",
            "10.63.1.0/28",
            "--subnet",
            "10.63.2.0/24",
            "tiny",
        ],
    );
    // The caller first, on the /28's last address.
    let caller = s.docker(
        1,
        &[
            "run",
            "-d",
            "--name",
            "tinyc",
            "--network",
            "tiny",
            "--ip",
            "10.63.1.14",
            IMAGE,
            "sleep",
            "1000000",
        ],
    );
    // More tasks than the /28 has addresses (14).
    create_sh(
        s,
        &[
            "--name",
            "tinysvc",
            "--replicas",
            "16",
            "--network",
            "tiny",
            "--stop-grace-period",
            "2s",
        ],
        "udp-who 53 & exec httpd -f -p 80 -h /www",
    );
    s.wait_running("tinysvc", 16, Duration::from_secs(120));
    let vip = vip_of(s, "tinysvc", "tiny");
    // Task name ("tinysvc.3.<id>") -> its address.
    let tasks: std::collections::BTreeMap<String, String> = s
        .docker(
            1,
            &[
                "network",
                "inspect",
                "-v",
                "tiny",
                "--format",
                "{{range $k, $v := .Services}}{{range $v.Tasks}}{{.Name}} {{.EndpointIP}}\n{{end}}{{end}}",
            ],
        )
        .lines()
        .filter_map(|l| l.split_once(' '))
        .filter(|(n, _)| n.starts_with("tinysvc."))
        .map(|(n, a)| (n.to_string(), a.trim().to_string()))
        .collect();
    // The tasks off the caller's subnet (the /28). With the VIP on the /28 the caller
    // takes it for on-link and its flows to those tasks must be handed to their bridge
    // (the case this phase is for); Docker sometimes allocates the VIP on the second
    // subnet, and then the caller sends to its gateway, which routes them.
    let off: BTreeSet<&String> = tasks
        .iter()
        .filter(|(_, a)| !a.starts_with("10.63.1."))
        .map(|(n, _)| n)
        .collect();
    assert!(!off.is_empty(), "tasks off the /28: {tasks:?}");
    // Every task off the caller's subnet answers it.
    let mut seen = BTreeSet::new();
    let t = Instant::now();
    while !off.iter().all(|n| seen.contains(*n)) {
        assert!(
            t.elapsed() < Duration::from_secs(90),
            "tinyc (10.63.1.14) -> tinysvc (VIP {vip}): the tasks off its subnet {off:?} did \
             not all answer; answered: {seen:?}"
        );
        let b = who_from(s, 1, &caller, "tinysvc", 1).concat();
        if b.starts_with("tinysvc.") {
            let host = b.split_whitespace().next().unwrap_or_default().to_string();
            let (_, client) = task_and_client(&b);
            assert_eq!(client, "10.63.1.14", "the task sees the caller");
            seen.insert(host);
        }
    }
    let (task, client, _) = eventually("UDP tinyc -> tinysvc", Duration::from_secs(10), || {
        s.in_container(1, &caller, || udp_who((vip, 53).into(), true))
            .ok()
    });
    assert!(
        task.starts_with("tinysvc.") && client == "10.63.1.14",
        "{task} {client}"
    );
    println!(
        "swarm: tinyc 10.63.1.14 -> tinysvc's VIP {vip}: answered by the {} tasks off the \
         caller's subnet ({} distinct tasks in all), and over UDP",
        off.len(),
        seen.len()
    );
    s.docker(1, &["rm", "-f", "tinyc"]);
    s.docker(1, &["service", "rm", "tinysvc"]);
}

/// Who answers a UDP broadcast to `to` (port 53, `udp-who`): (address, first line).
fn broadcast_who(to: Ipv4Addr) -> Vec<(String, String)> {
    let Ok(u) = UdpSocket::bind("0.0.0.0:0") else {
        return vec![];
    };
    let _ = u.set_broadcast(true);
    let _ = u.set_read_timeout(Some(Duration::from_secs(2)));
    if u.send_to(b"who", (to, 53)).is_err() {
        return vec![];
    }
    let mut got = Vec::new();
    let mut buf = [0u8; 2048];
    while let Ok((n, from)) = u.recv_from(&mut buf) {
        let text = String::from_utf8_lossy(&buf[..n]);
        got.push((
            from.ip().to_string(),
            text.lines().next().unwrap_or_default().to_string(),
        ));
    }
    got.sort();
    got
}

/// Whether each of `members` (node, container), joined to `group` on its address on
/// the overlay, gets a datagram sent to the group from container `sender` on node
/// `from`, whose address there is `sender_addr` (the interface it sends on: a
/// container's default route is its gateway bridge).
fn multicast_reaches(
    s: &Swarm,
    (from, sender, sender_addr): (u32, &str, Ipv4Addr),
    members: &[(u32, &str, Ipv4Addr)],
    group: Ipv4Addr,
) -> Vec<bool> {
    let (ready, go) = std::sync::mpsc::channel();
    std::thread::scope(|t| {
        let got: Vec<_> = members
            .iter()
            .map(|&(n, ctr, addr)| {
                let ready = ready.clone();
                t.spawn(move || {
                    s.in_container(n, ctr, move || {
                        let u = UdpSocket::bind(("0.0.0.0", 5556)).expect("bind in a member");
                        u.join_multicast_v4(&group, &addr).expect("join the group");
                        u.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
                        ready.send(()).unwrap();
                        let mut buf = [0u8; 64];
                        matches!(u.recv_from(&mut buf), Ok((n, _)) if &buf[..n] == b"to the group")
                    })
                })
            })
            .collect();
        for _ in members {
            go.recv().expect("a member's socket");
        }
        s.in_container(from, sender, || {
            let u = UdpSocket::bind((sender_addr, 0)).expect("bind the sender");
            // SAFETY: setsockopt on this socket with an in_addr that lives across it.
            let rc = unsafe {
                let ifaddr = libc::in_addr {
                    s_addr: u32::from_ne_bytes(sender_addr.octets()),
                };
                libc::setsockopt(
                    std::os::fd::AsRawFd::as_raw_fd(&u),
                    libc::IPPROTO_IP,
                    libc::IP_MULTICAST_IF,
                    std::ptr::addr_of!(ifaddr).cast(),
                    std::mem::size_of::<libc::in_addr>() as libc::socklen_t,
                )
            };
            assert_eq!(
                rc,
                0,
                "IP_MULTICAST_IF: {}",
                std::io::Error::last_os_error()
            );
            for _ in 0..3 {
                u.send_to(b"to the group", (group, 5556))
                    .expect("send to the group");
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        got.into_iter()
            .map(|h| h.join().expect("a member's side"))
            .collect()
    })
}

/// Rows 4/broadcast and 4/multicast, as Docker does them: a broadcast or a multicast
/// datagram on an overlay subnet reaches the other containers of the subnet (the
/// group's members) on the sender's node, and none on other nodes: Docker's overlay has
/// no flood list. The sender sits on node `a`, with one container beside it and one on
/// node `b`. On the mixed swarm, with the stock node sending, this is Docker's own
/// behaviour (a stock node sends nothing across); on mesh nodes, the mesh passes
/// Docker's VXLAN and keeps exactly that.
pub fn broadcast_and_multicast_as_docker(s: &Swarm, a: u32, b: u32) {
    // A network of its own per call (Docker may hold a removed network's name a moment).
    let (net, subnet) = (format!("bnet{a}"), format!("10.65.{a}.0/24"));
    attachable_overlay(s, &["--subnet", &subnet, &net]);
    let ctrs = [(a, "bca"), (a, "bcb"), (b, "bcc")];
    for (n, name) in ctrs {
        s.docker(
            n,
            &[
                "run",
                "-d",
                "--name",
                name,
                "--hostname",
                name,
                "--network",
                &net,
                IMAGE,
                "udp-who",
                "53",
            ],
        );
    }
    let sender = s.docker(a, &["inspect", "-f", "{{.Id}}", "bca"]);
    let got = eventually(
        "a broadcast from bca reaches bcb",
        Duration::from_secs(20),
        || {
            let got = s.in_container(a, &sender, || {
                broadcast_who(Ipv4Addr::new(10, 65, a as u8, 255))
            });
            got.iter()
                .any(|(_, w)| w.starts_with("bcb "))
                .then_some(got)
        },
    );
    assert!(
        !got.iter().any(|(_, w)| w.starts_with("bcc ")),
        "a broadcast crossed nodes, which Docker's overlay does not do: {got:?}"
    );
    let addr = |n: u32, c: &str| -> Ipv4Addr { addr_on(s, n, c, &net).parse().unwrap() };
    let group = Ipv4Addr::new(239, 1, 2, 3);
    let reached = multicast_reaches(
        s,
        (a, "bca", addr(a, "bca")),
        &[(a, "bcb", addr(a, "bcb")), (b, "bcc", addr(b, "bcc"))],
        group,
    );
    assert_eq!(
        reached,
        [true, false],
        "a datagram to {group} from bca on node {a}: reached (bcb beside it, bcc on node {b})"
    );
    println!(
        "swarm: broadcast and multicast ({group}) from bca on node {a}: answered by {got:?}, \
         the group's member beside it reached, the one on node {b} not (same node only, as \
         Docker)"
    );
    for (n, name) in ctrs {
        s.docker(n, &["rm", "-f", name]);
    }
    s.docker(1, &["network", "rm", &net]);
}

/// Row 7.2/ingress-isolation: a task cannot reach another service's task through that
/// task's ingress address (its published, target and unpublished ports) nor through the
/// service's ingress VIP, though its published port answers through the nodes. Measured
/// the same on stock Docker 28.5 nodes without the mesh.
pub fn ingress_isolation(s: &Swarm) {
    create_sh(
        s,
        &[
            "--name",
            "isola",
            "--replicas",
            "1",
            "--constraint",
            "node.hostname==mc-n2",
            "-p",
            "8400:80",
            "--stop-grace-period",
            "2s",
        ],
        "httpd -p 81 -h /www; exec httpd -f -p 80 -h /www",
    );
    create_sh(
        s,
        &[
            "--name",
            "isolb",
            "--replicas",
            "1",
            "--constraint",
            "node.hostname==mc-n1",
            "-p",
            "8401:80",
            "--stop-grace-period",
            "2s",
        ],
        "exec httpd -f -p 80 -h /www",
    );
    s.wait_running("isola", 1, Duration::from_secs(60));
    s.wait_running("isolb", 1, Duration::from_secs(60));
    let body = eventually(
        "isola's 8400 through node 1",
        Duration::from_secs(20),
        || who(s, 1, 8400).ok(),
    );
    assert!(body.starts_with("isola."), "{body}");
    let (_, ia) = local_task(s, 2, "isola", "ingress");
    let ib = s.docker(1, &["ps", "-q", "--filter", "name=isolb."]);
    let vip = vip_of(s, "isola", "ingress").to_string();
    for (to, port) in [(&ia, 80), (&ia, 81), (&ia, 8400), (&vip, 80), (&vip, 8400)] {
        let got = who_from_at(s, 1, &ib, to, port, 1);
        assert!(
            got.iter().all(|g| g.is_empty()),
            "isolb reached isola at {to}:{port} over the ingress network: {got:?}"
        );
    }
    println!(
        "swarm: isolb (node 1) reaches isola (node 2) neither at its ingress address {ia} (80, 81, \
         8400) nor at its ingress VIP {vip} (80, 8400); isola's 8400 answers through node 1"
    );
    s.docker(1, &["service", "rm", "isola", "isolb"]);
}

/// The (first) VNI Docker gave overlay `network`.
fn vni_of(s: &Swarm, network: &str) -> u32 {
    let list = s.docker(
        1,
        &[
            "network",
            "inspect",
            "-f",
            "{{index .Options \"com.docker.network.driver.overlay.vxlanid_list\"}}",
            network,
        ],
    );
    list.split(',')
        .next()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{network}'s VNI: {list:?}"))
}

/// Packets node `n`'s hooks counted for `reason` (a pass or observation), every hook
/// summed.
fn packets(s: &Swarm, n: u32, reason: &str) -> u64 {
    counted(s, n, "mesh_packets_total", reason)
}

/// Packets node `n`'s hooks dropped for `reason`, every hook summed.
fn drops(s: &Swarm, n: u32, reason: &str) -> u64 {
    counted(s, n, "mesh_drops_total", reason)
}

fn counted(s: &Swarm, n: u32, metric: &str, reason: &str) -> u64 {
    let text = s.metrics(n).unwrap_or_default();
    let (start, label) = (format!("{metric}{{"), format!("reason=\"{reason}\"}}"));
    text.lines()
        .filter(|l| l.starts_with(&start) && l.contains(&label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// An IPv4 packet from `src` to `dst` carrying a UDP datagram from `sport` to `dport`
/// with `payload`.
fn ipv4_udp(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let b = etherparse::PacketBuilder::ipv4(src.octets(), dst.octets(), 64).udp(sport, dport);
    let mut p = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut p, payload).expect("an IPv4/UDP packet");
    p
}

/// A VXLAN payload (RFC 7348 header, then the inner frame) carrying a UDP datagram
/// "forged" from `src` to `dst`:`port` in an Ethernet frame to `dst_mac`.
fn vxlan_datagram(vni: u32, dst_mac: [u8; 6], src: Ipv4Addr, dst: Ipv4Addr, port: u16) -> Vec<u8> {
    let inner = etherparse::PacketBuilder::ethernet2([0x02, 0x42, 0x0a, 0xee, 0xee, 0xee], dst_mac)
        .ipv4(src.octets(), dst.octets(), 64)
        .udp(40000, port);
    let mut f = vec![0x08, 0, 0, 0];
    f.extend_from_slice(&(vni << 8).to_be_bytes());
    inner.write(&mut f, b"forged").expect("an Ethernet frame");
    f
}

/// Sends the IPv4 packet `packet` as it is (a raw socket: its source address may be
/// another host's), from the current namespace.
fn send_raw(packet: &[u8]) {
    let dst = Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]);
    // SAFETY: a raw socket of this thread's, closed below; sendto reads `packet` and a
    // sockaddr_in built here.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW);
        assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
        let mut to: libc::sockaddr_in = std::mem::zeroed();
        to.sin_family = libc::AF_INET as libc::sa_family_t;
        to.sin_addr.s_addr = u32::from_ne_bytes(dst.octets());
        let rc = libc::sendto(
            fd,
            packet.as_ptr().cast(),
            packet.len(),
            0,
            std::ptr::addr_of!(to).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        assert!(rc >= 0, "raw sendto {dst}: {err}");
    }
}

/// Whether a datagram `send` forges reaches the plain container `ctr` on node 1: a
/// socket bound in its namespace waits for it for 3 s.
fn forged_reaches(s: &Swarm, ctr: &str, port: u16, send: impl FnOnce() + Send) -> bool {
    let (ready, go) = std::sync::mpsc::channel();
    std::thread::scope(|t| {
        let got = t.spawn(|| {
            s.in_container(1, ctr, move || {
                let u = UdpSocket::bind(("0.0.0.0", port)).expect("bind in the container");
                u.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
                ready.send(()).unwrap();
                let mut buf = [0u8; 64];
                matches!(u.recv_from(&mut buf), Ok((n, _)) if &buf[..n] == b"forged")
            })
        });
        go.recv().expect("the container's socket");
        send();
        got.join().expect("the container's side")
    })
}

/// Row 9/forged-dropped: cleartext VXLAN forged for an encrypted overlay's VNI does not
/// reach its containers. From a host outside the swarm with a swarm node's address as
/// its source (the mesh takes it for the peer's and passes user overlays' VXLAN to the
/// kernel, where Docker's rule for the encrypted VNI drops it), or with its own (the
/// mesh drops VXLAN from non-peers, counted as `drop_vxlan_unknown_peer`). The control:
/// the same forgery for a plain overlay's VNI, with node 2's address, reaches its
/// container, so the forgery itself is sound. A swarm node cannot even send it: its
/// own IPsec policy for the encrypted VNI refuses the datagram (EREMOTE). This kernel
/// has no ESP, so encrypted traffic itself cannot flow here; Docker installs its drop
/// rule all the same.
pub fn forged_vxlan(s: &Swarm) {
    attachable_overlay(
        s,
        &["--opt", "encrypted", "--subnet", "10.67.0.0/24", "fenc"],
    );
    attachable_overlay(s, &["--subnet", "10.67.1.0/24", "fplain"]);
    let enc = sleeper(s, 1, "fe1", "fenc");
    let plain = sleeper(s, 1, "fp1", "fplain");
    // Containers on node 2 too: the peers Docker programs each network's tunnel with.
    sleeper(s, 2, "fe2", "fenc");
    sleeper(s, 2, "fp2", "fplain");
    let mac_of = |ctr: &str, net: &str| -> [u8; 6] {
        let f = format!("{{{{.NetworkSettings.Networks.{net}.MacAddress}}}}");
        let text = s.docker(1, &["inspect", "-f", &f, ctr]);
        let b: Vec<u8> = text
            .split(':')
            .filter_map(|x| u8::from_str_radix(x, 16).ok())
            .collect();
        b.try_into()
            .unwrap_or_else(|_| panic!("{ctr}'s MAC on {net}: {text:?}"))
    };
    // The VXLAN datagram from `from` to node 1 for container `ctr` on `net`.
    let forged = |ctr: &str, net: &str, inner_src: &str, from: Ipv4Addr| {
        let dst: Ipv4Addr = addr_on(s, 1, ctr, net).parse().unwrap();
        let inner = vxlan_datagram(
            vni_of(s, net),
            mac_of(ctr, net),
            inner_src.parse().unwrap(),
            dst,
            5555,
        );
        ipv4_udp(from, s.addr(1), 40000, s.data_path_port, &inner)
    };
    let from_client = |packet: Vec<u8>| {
        move || {
            for _ in 0..3 {
                s.client(|| send_raw(&packet));
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    };
    // The control first: Docker may take a moment to program node 1's side.
    let p = forged(&plain, "fplain", "10.67.1.200", s.addr(2));
    eventually(
        "VXLAN forged with node 2's address for a plain overlay reaches its container (the \
         control)",
        Duration::from_secs(20),
        || forged_reaches(s, &plain, 5555, from_client(p.clone())).then_some(()),
    );
    let p = forged(&enc, "fenc", "10.67.0.200", s.addr(2));
    let before = packets(s, 1, "pass_vxlan_docker");
    assert!(
        !forged_reaches(s, &enc, 5555, from_client(p)),
        "cleartext VXLAN with node 2's address reached a container on the encrypted overlay"
    );
    let passed = packets(s, 1, "pass_vxlan_docker") - before;
    assert!(
        passed >= 3,
        "node 1's mesh passed {passed} of the 3 datagrams to Docker's rules (pass_vxlan_docker)"
    );
    let before = drops(s, 1, "drop_vxlan_unknown_peer");
    for (ctr, net, inner_src) in [
        (&enc, "fenc", "10.67.0.200"),
        (&plain, "fplain", "10.67.1.200"),
    ] {
        let p = forged(ctr, net, inner_src, s.client_addr());
        assert!(
            !forged_reaches(s, ctr, 5555, from_client(p)),
            "VXLAN from a host outside the swarm reached a container on {net}"
        );
    }
    let dropped = drops(s, 1, "drop_vxlan_unknown_peer") - before;
    assert!(
        dropped >= 6,
        "node 1 counted {dropped} drop_vxlan_unknown_peer for 6 datagrams from outside"
    );
    // The outsider's forgery for the plain overlay again, cut into fragments (what a
    // datagram over the MTU becomes): node 1's kernel would put them together for
    // Docker's vxlan socket, which takes any sender, so the first one is checked as a
    // whole datagram is.
    let before = drops(s, 1, "drop_vxlan_unknown_peer");
    let whole = forged(&plain, "fplain", "10.67.1.200", s.client_addr());
    let in_fragments = move || {
        for id in 0..3u16 {
            let mut frame = vec![0u8; 12];
            frame.extend_from_slice(&[0x08, 0x00]);
            frame.extend_from_slice(&whole);
            // 48 bytes after the IP header: UDP, VXLAN and the inner Ethernet header.
            for f in mesh_tests::packets::ipv4_fragments(&frame, 0x4d00 + id, 20 + 48) {
                s.client(|| send_raw(&f[14..]));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    assert!(
        !forged_reaches(s, &plain, 5555, in_fragments),
        "VXLAN in fragments from a host outside the swarm reached a container on fplain"
    );
    let fragments = drops(s, 1, "drop_vxlan_unknown_peer") - before;
    assert!(
        fragments >= 3,
        "node 1 counted {fragments} drop_vxlan_unknown_peer for 3 first fragments from outside"
    );
    println!(
        "swarm: forged VXLAN: a plain overlay's, with node 2's address, reaches its \
         container; an encrypted one's does not (Docker's rule); from an outsider's address \
         neither, whole or in fragments ({dropped} and {fragments} counted \
         drop_vxlan_unknown_peer on node 1)"
    );
    for (n, c) in [(1, "fe1"), (1, "fp1"), (2, "fe2"), (2, "fp2")] {
        s.docker(n, &["rm", "-f", c]);
    }
    for net in ["fenc", "fplain"] {
        s.docker(1, &["network", "rm", net]);
    }
}

/// Row 11.4/100-networks: 100 overlay networks, each with a task on two nodes (one
/// global service attached to all of them, on nodes 1 and 2), all pass traffic: node 1's
/// task reaches node 2's on each network at its address (Docker's VXLAN, which the mesh
/// passes for every VNI it knows) and the service's VIP on each network (the mesh's,
/// on 100 veths in each task), which takes it to node 2's task: the mesh never gives a
/// task its own call while the service has another task.
pub fn a_hundred_networks(s: &Swarm) {
    let names: Vec<String> = (1..=100).map(|i| format!("hn{i}")).collect();
    for (i, net) in names.iter().enumerate() {
        let subnet = format!("10.90.{}.0/24", i + 1);
        s.docker(
            1,
            &[
                "network", "create", "-d", "overlay", "--subnet", &subnet, net,
            ],
        );
    }
    let mut a = vec![
        "--name",
        "hundred",
        "--mode",
        "global",
        "--constraint",
        "node.hostname!=mc-n3",
        "--hostname",
        "{{.Task.Name}}",
    ];
    for net in &names {
        a.extend(["--network", net]);
    }
    let t0 = Instant::now();
    create_httpd(s, &a);
    s.wait_running("hundred", 2, Duration::from_secs(300));
    let running = t0.elapsed();
    let (here, _) = local_task(s, 1, "hundred", "hn1");
    let (there, _) = local_task(s, 2, "hundred", "hn1");
    let addrs: Vec<Ipv4Addr> = names
        .iter()
        .map(|net| addr_on(s, 2, &there, net).parse().unwrap())
        .collect();
    let vips: Vec<Ipv4Addr> = names.iter().map(|net| vip_of(s, "hundred", net)).collect();
    let call = |to: Ipv4Addr| http(to, 80, "/cgi-bin/who", Duration::from_secs(2));
    // Each task's address first: once node 2's answers everywhere, the gossip is in.
    let failed = eventually(
        "node 1's task reaches node 2's on all 100 networks",
        Duration::from_secs(60),
        || {
            let failed: Vec<Ipv4Addr> = s.in_container(1, &here, || {
                addrs
                    .iter()
                    .filter(|a| call(**a).is_err())
                    .copied()
                    .collect()
            });
            failed.is_empty().then_some(failed)
        },
    );
    assert!(failed.is_empty());
    // Then every VIP; the first pass's misses are reported (node 2's task joins node
    // 1's tables once node 2's agent reports it).
    let mut first_misses = None;
    let answered = eventually(
        "the service's VIP answers on all 100 networks",
        Duration::from_secs(30),
        || {
            let answered: Vec<Option<String>> = s.in_container(1, &here, || {
                vips.iter()
                    .map(|v| {
                        call(*v)
                            .ok()
                            .map(|b| b.split_whitespace().next().unwrap_or("").to_string())
                    })
                    .collect()
            });
            let missing: Vec<Ipv4Addr> = vips
                .iter()
                .zip(&answered)
                .filter(|(_, a)| a.as_deref() != Some(there.as_str()))
                .map(|(v, _)| *v)
                .collect();
            first_misses.get_or_insert(missing.clone());
            missing.is_empty().then_some(answered)
        },
    );
    let tasks: BTreeSet<&str> = answered.iter().flatten().map(String::as_str).collect();
    println!(
        "swarm: 100 overlays: the 2 tasks running {:.0} s after create; node 1's task \
         reached node 2's on all 100, and through the VIP on all 100 (answered by {tasks:?}; \
         the first pass missed {:?})",
        running.as_secs_f64(),
        first_misses.unwrap_or_default()
    );
    s.docker(1, &["service", "rm", "hundred"]);
    // Docker removes a service's tasks from the networks asynchronously.
    let mut rm = vec!["network", "rm"];
    rm.extend(names.iter().map(String::as_str));
    eventually("the 100 networks removed", Duration::from_secs(60), || {
        s.try_docker(1, &rm).status.success().then_some(())
    });
}

/// VXLAN datagrams seen in the current namespace (every interface, both directions)
/// for `within`: (outer source, outer destination, VNI). `ready` is told once the
/// capture runs.
fn capture_vxlan(
    port: u16,
    within: Duration,
    ready: std::sync::mpsc::Sender<()>,
) -> Vec<(Ipv4Addr, Ipv4Addr, u32)> {
    // SAFETY: a packet socket of this thread's, read into a local buffer and closed
    // below; setsockopt with a timeval that lives across the call.
    unsafe {
        // Every protocol: a bridge port's frames reach only these (ptype_all) taps, before
        // the bridge takes them; the IPv4 ones are picked out below.
        let proto = (libc::ETH_P_ALL as u16).to_be();
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_DGRAM, i32::from(proto));
        assert!(
            fd >= 0,
            "packet socket: {}",
            std::io::Error::last_os_error()
        );
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 200_000,
        };
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            std::ptr::addr_of!(tv).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        );
        ready.send(()).unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; 2048];
        let t0 = Instant::now();
        while t0.elapsed() < within {
            let n = libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0);
            if n <= 0 {
                continue;
            }
            use etherparse::{NetSlice, SlicedPacket, TransportSlice};
            let Ok(p) = SlicedPacket::from_ip(&buf[..n as usize]) else {
                continue;
            };
            let (Some(NetSlice::Ipv4(ip)), Some(TransportSlice::Udp(udp))) = (p.net, p.transport)
            else {
                continue;
            };
            let v = udp.payload();
            if udp.destination_port() != port || v.len() < 8 {
                continue;
            }
            let (src, dst) = (ip.header().source_addr(), ip.header().destination_addr());
            seen.push((src, dst, u32::from_be_bytes([0, v[4], v[5], v[6]])));
        }
        libc::close(fd);
        seen
    }
}

/// Row 1/dp-addr-default: with no data-path address, VXLAN goes to the advertise
/// address, the mesh's tunnels and Docker's overlay alike, even when a node has
/// another address on the same network (nodes 1 and 2 get one for the phase). Captured
/// on the wire (the underlay's bridge: inside a node, the mesh's XDP would hide its
/// tunnel from a capture) while node 1 forwards a published port to node 2's only task
/// (the mesh's tunnel) and node 1's container pings node 2's over an overlay (Docker's
/// VXLAN).
pub fn vxlan_to_the_advertise_address(s: &Swarm) {
    attachable_overlay(s, &["--subnet", "10.68.0.0/24", "dpnet"]);
    create_sh(
        s,
        &[
            "--name",
            "dpa",
            "--replicas",
            "1",
            "--constraint",
            "node.hostname==mc-n2",
            "-p",
            "8297:80",
        ],
        "exec httpd -f -p 80 -h /www",
    );
    s.wait_running("dpa", 1, Duration::from_secs(60));
    sleeper(s, 1, "dp1", "dpnet");
    sleeper(s, 2, "dp2", "dpnet");
    let to = addr_on(s, 2, "dp2", "dpnet");
    eventually("node 1: 8297 answers", Duration::from_secs(30), || {
        who(s, 1, 8297).ok()
    });
    let others = [(1, "10.251.0.211/24"), (2, "10.251.0.212/24")];
    for (n, a) in others {
        node_exec(s, n, &["ip", "addr", "add", a, "dev", "eth0"]);
    }
    let (ready, go) = std::sync::mpsc::channel();
    let port = s.data_path_port;
    let seen = std::thread::scope(|t| {
        let cap = t.spawn(|| s.on_wire(move || capture_vxlan(port, Duration::from_secs(6), ready)));
        go.recv().expect("the capture");
        for _ in 0..5 {
            who(s, 1, 8297).expect("node 1: 8297 during the capture");
        }
        let out = s.try_docker(1, &["exec", "dp1", "ping", "-c", "3", "-W", "2", &to]);
        assert!(out.status.success(), "dp1 pings dp2 at {to}");
        cap.join().expect("the capture's thread")
    });
    for (n, a) in others {
        node_exec(s, n, &["ip", "addr", "del", a, "dev", "eth0"]);
    }
    let docker_vni = vni_of(s, "dpnet");
    let (a1, a2) = (s.addr(1), s.addr(2));
    let second: Vec<Ipv4Addr> = others
        .iter()
        .map(|(_, a)| a.split('/').next().unwrap().parse().unwrap())
        .collect();
    let stray: Vec<_> = seen
        .iter()
        .filter(|(src, dst, _)| {
            second.contains(src) || second.contains(dst) || (*src == a1 && *dst != a2)
        })
        .collect();
    assert!(
        stray.is_empty(),
        "VXLAN between nodes 1 and 2 not between their advertise addresses: {stray:?}"
    );
    let between: Vec<_> = seen
        .iter()
        .filter(|(src, dst, _)| *src == a1 && *dst == a2)
        .collect();
    let docker = between
        .iter()
        .filter(|(src, _, v)| *src == a1 && *v == docker_vni)
        .count();
    let mesh = between
        .iter()
        .filter(|(src, _, v)| *src == a1 && *v != docker_vni)
        .count();
    assert!(
        docker >= 3,
        "Docker's VXLAN (VNI {docker_vni}) from node 1 seen on node 2: {docker}"
    );
    assert!(
        mesh >= 5,
        "the mesh's tunnel from node 1 seen on node 2: {mesh} datagrams"
    );
    println!(
        "swarm: VXLAN from node 1 to node 2 with a second address on each: {mesh} sightings \
         of the mesh's tunnel and {docker} of Docker's (VNI {docker_vni}; each datagram is \
         seen at both bridge ports), every one between the advertise addresses {a1} and \
         {a2}"
    );
    s.docker(1, &["service", "rm", "dpa"]);
    s.docker(1, &["rm", "-f", "dp1"]);
    s.docker(2, &["rm", "-f", "dp2"]);
    eventually("dpnet removed", Duration::from_secs(30), || {
        s.try_docker(1, &["network", "rm", "dpnet"])
            .status
            .success()
            .then_some(())
    });
}
