//! Tier 3, load balancing on one node: a client namespace, a node namespace with the
//! programs attached, three task namespaces. Real TCP/UDP, real kernel.

#![allow(clippy::result_large_err)] // aya errors by value, on cold paths

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, ErrorKind, Write},
    net::{Ipv4Addr, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use mesh_agent::{
    datapath::loader::Datapath, datapath::mesh::Mesh, datapath::stats::Snapshot, model::Health,
};
use mesh_common::{config::MeshConfig, reason::Reason, stats::Hook};
use mesh_tests::{
    lbtopo::{
        http_get, udp_echo, udp_refused, udp_service, LbTopo, ALL_ACTIVE, CLIENT, CLOSED_UDP_PORT,
        DIRECT_PORT, ECHO_UDP_PORT, NODE, SOLO_VIP, TASKS, VIP,
    },
    prereq,
};

fn setup(test: &str, tag: &str) -> Option<(LbTopo, Mesh)> {
    let object = prereq::privileged(test)?;
    let topo = LbTopo::new(tag);
    let dp = Datapath::load(&object, &MeshConfig::DEFAULT).expect("load datapath");
    let mut mesh = Mesh::new(dp);
    let model = topo.model(&ALL_ACTIVE);
    topo.n.enter(|| {
        mesh.dp.attach_tc_ingress("un").expect("attach un");
        for h in ["h1", "h2", "h3"] {
            mesh.dp.attach_tc_task(h).expect("attach task veth");
        }
        mesh.apply(&model).expect("apply model");
    });
    Some((topo, mesh))
}

fn apply(topo: &LbTopo, mesh: &mut Mesh, backends: &[(usize, Health)]) {
    let model = topo.model(backends);
    topo.n.enter(|| mesh.apply(&model).expect("apply model"));
}

fn counters(mesh: &Mesh) -> Snapshot {
    Snapshot::read(&mesh.dp.stats().unwrap()).unwrap()
}

/// "tN <peer>" -> (task index, peer).
fn split(body: &str) -> (usize, String) {
    let (t, peer) = body
        .split_once(' ')
        .unwrap_or_else(|| panic!("unexpected answer {body:?}"));
    let i: usize = t.trim_start_matches('t').parse().unwrap();
    (i - 1, peer.to_string())
}

#[test]
fn published_ports_udp_vip_hairpin_and_refusals() {
    let Some((topo, mesh)) = setup("published_ports_udp_vip_hairpin_and_refusals", "l") else {
        return;
    };
    let before = counters(&mesh);

    // curl through the published port: a task answers and sees the client's address.
    let out = topo.c.exec(&[
        "curl",
        "-s",
        "--max-time",
        "5",
        &format!("http://{NODE}:8080/"),
    ]);
    let body = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let (_, peer) = split(&body);
    assert_eq!(peer, CLIENT, "the task sees the real client IP");

    // 3000 new connections spread within +-10% of even.
    let mut per_task = [0u32; 3];
    topo.c.enter(|| {
        for _ in 0..3000 {
            let (t, peer) = split(&http_get(NODE, 8080).expect("request through the mesh"));
            assert_eq!(peer, CLIENT);
            per_task[t] += 1;
        }
    });
    println!("\nlb: 3000 connections to {NODE}:8080 landed {per_task:?}");
    for n in per_task {
        assert!((900..=1100).contains(&n), "uneven: {per_task:?}");
    }

    // Host mode: this node's tasks.
    let (_, peer) = split(
        &topo
            .c
            .enter(|| http_get(NODE, 8081))
            .expect("host-mode port"),
    );
    assert_eq!(peer, CLIENT);

    // UDP request/response; the reply comes from the published address.
    let (answer, from) = topo.c.enter(|| {
        let s = UdpSocket::bind((CLIENT, 0)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        s.send_to(b"q", (NODE, 5353)).unwrap();
        let mut buf = [0u8; 256];
        let (n, from) = s.recv_from(&mut buf).expect("udp answer");
        (String::from_utf8_lossy(&buf[..n]).to_string(), from)
    });
    assert_eq!(
        from.to_string(),
        format!("{NODE}:5353"),
        "reply source is the frontend"
    );
    assert_eq!(split(&answer).1, CLIENT);

    // East-west: t1 to the VIP reaches every task; t1 landing on itself is hairpinned.
    let mut seen = BTreeMap::new();
    topo.t[0].enter(|| {
        for _ in 0..60 {
            let (t, peer) = split(&http_get(VIP, 80).expect("VIP from a task"));
            let want = if t == 0 { "169.254.42.1" } else { TASKS[0] };
            assert_eq!(peer, want, "peer seen by t{}", t + 1);
            *seen.entry(t).or_insert(0) += 1;
        }
    });
    assert_eq!(seen.len(), 3, "VIP spread: {seen:?}");
    let solo = topo.t[0].enter(|| (http_get(SOLO_VIP, 80), http_get(NODE, 8082)));
    assert_eq!(solo.0.expect("hairpin via VIP"), "t1 169.254.42.1");
    assert_eq!(
        solo.1.expect("hairpin via published port"),
        "t1 169.254.42.1"
    );

    // No backend: TCP is refused at once (RST), UDP gets port unreachable.
    let (tcp, udp) = topo.c.enter(|| {
        let t0 = Instant::now();
        let tcp = TcpStream::connect_timeout(
            &(NODE.parse::<Ipv4Addr>().unwrap(), 8090).into(),
            Duration::from_secs(3),
        )
        .map(|_| ())
        .map_err(|e| (e.kind(), t0.elapsed()));
        let s = UdpSocket::bind((CLIENT, 0)).unwrap();
        s.connect((NODE, 5354)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        s.send(b"q").unwrap();
        let udp = s.recv(&mut [0u8; 64]).map(|_| ()).map_err(|e| e.kind());
        (tcp, udp)
    });
    let (kind, took) = tcp.expect_err("connect to a service without backends");
    assert_eq!(kind, ErrorKind::ConnectionRefused);
    assert!(
        took < Duration::from_secs(1),
        "refused, not timed out ({took:?})"
    );
    assert_eq!(
        udp.expect_err("udp to a service without backends"),
        ErrorKind::ConnectionRefused
    );

    let d = counters(&mesh).since(&before);
    let u = Hook::TcUnderlayIngress;
    assert!(d.get(u, Reason::FwdToTask).packets >= 3000 * 3, "{d:?}");
    assert!(d.get(Hook::TcTask, Reason::FwdReplyToClient).packets >= 3000 * 2);
    assert_eq!(d.get(u, Reason::ReplyRstNoBackend).packets, 1);
    assert_eq!(d.get(u, Reason::ReplyIcmpUnreachable).packets, 1);
    assert_eq!(
        d.get(Hook::TcTask, Reason::ObsHairpin).packets,
        (seen[&0] + 2) as u64
    );
    for (h, r, c) in d.iter() {
        assert!(
            r.kind() != mesh_common::reason::Kind::Drop,
            "unexpected drops {}/{}: {c:?}",
            h.name(),
            r.name()
        );
    }
}

/// An open echo connection and the task that serves it.
struct Conn {
    w: TcpStream,
    r: BufReader<TcpStream>,
    task: String,
}

impl Conn {
    fn open() -> Conn {
        let w = TcpStream::connect_timeout(
            &(NODE.parse::<Ipv4Addr>().unwrap(), 7000).into(),
            Duration::from_secs(3),
        )
        .expect("connect echo");
        w.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let mut c = Conn {
            r: BufReader::new(w.try_clone().unwrap()),
            w,
            task: String::new(),
        };
        c.task = c.ask().expect("first echo");
        c
    }

    fn ask(&mut self) -> std::io::Result<String> {
        self.w.write_all(b"ping\n")?;
        let mut line = String::new();
        if self.r.read_line(&mut line)? == 0 {
            return Err(ErrorKind::UnexpectedEof.into());
        }
        Ok(line.trim().to_string())
    }
}

fn open_many(topo: &LbTopo, n: usize) -> Vec<Conn> {
    topo.c.enter(|| (0..n).map(|_| Conn::open()).collect())
}

fn tasks_of(conns: &[Conn]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for c in conns {
        *m.entry(c.task.clone()).or_insert(0) += 1;
    }
    m
}

#[test]
fn backends_leave_and_drain_without_breaking_other_flows() {
    let Some((topo, mut mesh)) =
        setup("backends_leave_and_drain_without_breaking_other_flows", "d")
    else {
        return;
    };
    // 20 long-lived connections over the three tasks.
    let mut conns = open_many(&topo, 20);
    assert_eq!(tasks_of(&conns).len(), 3, "{:?}", tasks_of(&conns));

    // t3 leaves: the others' flows carry on, t3's are reset, new flows avoid t3.
    apply(
        &topo,
        &mut mesh,
        &[(0, Health::Active), (1, Health::Active)],
    );
    for c in &mut conns {
        let r = c.ask();
        if c.task == "t3" {
            assert!(
                r.is_err(),
                "a flow whose backend is gone is reset, got {r:?}"
            );
        } else {
            assert_eq!(r.expect("surviving flow"), c.task, "flow kept its backend");
        }
    }
    let fresh = open_many(&topo, 100);
    assert!(
        !tasks_of(&fresh).contains_key("t3"),
        "{:?}",
        tasks_of(&fresh)
    );
    drop(fresh);

    // Back to three; then t2 drains: its flows continue, it takes no new ones.
    apply(&topo, &mut mesh, &ALL_ACTIVE);
    let mut conns = open_many(&topo, 20);
    assert_eq!(tasks_of(&conns).len(), 3);
    apply(
        &topo,
        &mut mesh,
        &[
            (0, Health::Active),
            (1, Health::Draining),
            (2, Health::Active),
        ],
    );
    for c in &mut conns {
        assert_eq!(c.ask().expect("flow during drain"), c.task);
    }
    let fresh = open_many(&topo, 100);
    assert!(
        !tasks_of(&fresh).contains_key("t2"),
        "{:?}",
        tasks_of(&fresh)
    );
    // Drained away for good: its remaining flows are reset, the rest carry on.
    apply(
        &topo,
        &mut mesh,
        &[(0, Health::Active), (2, Health::Active)],
    );
    for c in &mut conns {
        let r = c.ask();
        if c.task == "t2" {
            assert!(r.is_err(), "gone after draining: reset, got {r:?}");
        } else {
            assert_eq!(r.expect("surviving flow"), c.task);
        }
    }
    let d = counters(&mesh);
    assert!(
        d.get(Hook::TcUnderlayIngress, Reason::ReplyRstBackendGone)
            .packets
            >= 2
    );
}

/// Connection setup time through the mesh vs to one task directly (routed by the node):
/// interleaved rounds, medians and p99 printed; and the programs' per-packet cost.
#[test]
fn new_connection_rate_mesh_vs_direct() {
    let Some((topo, mesh)) = setup("new_connection_rate_mesh_vs_direct", "m") else {
        return;
    };
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).expect("BPF_ENABLE_STATS");
    let info = |p: &aya::programs::SchedClassifier| {
        let i = p.info().unwrap();
        (i.run_time().as_nanos() as u64, i.run_count())
    };
    let ing0 = info(mesh.dp.tc_ingress().unwrap());
    let task0 = info(mesh.dp.tc_task().unwrap());
    let mut lat: BTreeMap<&str, Vec<Duration>> = BTreeMap::new();
    const ROUNDS: usize = 6;
    const PER_ROUND: usize = 300;
    topo.c.enter(|| {
        for _ in 0..ROUNDS {
            for (name, addr, port) in [("mesh", NODE, 8080), ("direct", TASKS[0], DIRECT_PORT)] {
                for _ in 0..PER_ROUND {
                    let t = Instant::now();
                    http_get(addr, port).expect("request");
                    lat.entry(name).or_default().push(t.elapsed());
                }
            }
        }
    });
    let ing1 = info(mesh.dp.tc_ingress().unwrap());
    let task1 = info(mesh.dp.tc_task().unwrap());
    for (name, v) in &mut lat {
        v.sort();
        let total: Duration = v.iter().sum();
        println!(
            "\nbench: {name}: {} connections, {:.0} conn/s sequential, p50 {:?}, p99 {:?}",
            v.len(),
            v.len() as f64 / total.as_secs_f64(),
            v[v.len() / 2],
            v[v.len() * 99 / 100]
        );
    }
    let per = |a: (u64, u64), b: (u64, u64)| (b.0 - a.0) as f64 / (b.1 - a.1).max(1) as f64;
    println!(
        "\nbench: per-packet cost (bpf_stats run_time_ns/run_cnt): tc underlay {:.0} ns over {} runs, tc task {:.0} ns over {} runs",
        per(ing0, ing1),
        ing1.1 - ing0.1,
        per(task0, task1),
        task1.1 - task0.1
    );
    assert!(ing1.1 > ing0.1 && task1.1 > task0.1, "programs ran");
}

/// A backend that silently drops new connections (a task starting, or shutting down
/// behind Docker's back): the client's retransmitted SYN, a second later, is given
/// another backend, so every request succeeds (the unlucky ones a second late).
#[test]
fn a_retransmitted_syn_gets_another_backend() {
    let Some((topo, mesh)) = setup("a_retransmitted_syn_gets_another_backend", "r") else {
        return;
    };
    // t2 drops every SYN to its server (the mesh delivers to :80).
    topo.t[1].exec(&[
        "iptables", "-I", "INPUT", "-p", "tcp", "--dport", "80", "--syn", "-j", "DROP",
    ]);
    let before = counters(&mesh);
    let mut served = BTreeMap::new();
    let mut slow = 0;
    topo.c.enter(|| {
        for _ in 0..30 {
            let t = Instant::now();
            let Ok(body) = http_get(NODE, 8080) else {
                let d = counters(&mesh).since(&before);
                panic!(
                    "not answered despite the silent backend; counters: {:?}",
                    d.iter().collect::<Vec<_>>()
                );
            };
            if t.elapsed() > Duration::from_millis(700) {
                slow += 1;
            }
            *served.entry(split(&body).0).or_insert(0) += 1;
        }
    });
    let d = counters(&mesh).since(&before);
    let retried = d
        .get(Hook::TcUnderlayIngress, Reason::ObsSynRetried)
        .packets;
    println!(
        "lb: silent backend: 30 of 30 requests answered by {served:?}, {slow} after a SYN \
         retransmit, {retried} SYNs retried on another choice"
    );
    assert!(
        !served.contains_key(&1),
        "the silent task answered: {served:?}"
    );
    assert!(
        slow > 0 && retried >= slow as u64,
        "retries seen: {retried}, slow: {slow}"
    );
}

/// A backend that refuses new connections (RST, as a task does once Docker has begun
/// deactivating it, before any agent can know): the refusal is held back once, and the
/// client's SYN retransmit goes to another backend; every request succeeds.
#[test]
fn a_refused_syn_gets_another_backend_once() {
    let Some((topo, mesh)) = setup("a_refused_syn_gets_another_backend_once", "f") else {
        return;
    };
    topo.t[1].exec(&[
        "iptables",
        "-I",
        "INPUT",
        "-p",
        "tcp",
        "--dport",
        "80",
        "--syn",
        "-j",
        "REJECT",
        "--reject-with",
        "tcp-reset",
    ]);
    let before = counters(&mesh);
    let mut served = BTreeMap::new();
    topo.c.enter(|| {
        for _ in 0..30 {
            let body = http_get(NODE, 8080).expect("answered despite the refusing backend");
            *served.entry(split(&body).0).or_insert(0) += 1;
        }
    });
    let d = counters(&mesh).since(&before);
    let held = d.get(Hook::TcTask, Reason::DropSynRefused).packets;
    let retried = d
        .get(Hook::TcUnderlayIngress, Reason::ObsSynRetried)
        .packets;
    println!(
        "lb: refusing backend: 30 of 30 requests answered by {served:?}; {held} refusals held \
         back, {retried} SYNs retried on another backend"
    );
    assert!(
        !served.contains_key(&1),
        "the refusing task answered: {served:?}"
    );
    assert!(
        held > 0 && retried >= held,
        "held {held}, retried {retried}"
    );
}

/// Published UDP ports and VIPs of the datagram tests: `big` (the tasks' echo) and
/// `closed` (a port nobody listens on) on every task.
const BIG_PORT: u16 = 5356;
const BIG_VIP: &str = "10.212.0.30";
const CLOSED_PORT: u16 = 5357;
/// `closed` on t2 and t3 only (t1 calls it), and on t1 only (t1 lands on itself).
const CLOSED_VIP: &str = "10.212.0.31";
const CLOSED_SOLO_VIP: &str = "10.212.0.32";

fn sock(addr: &str, port: u16) -> std::net::SocketAddr {
    (addr.parse::<Ipv4Addr>().unwrap(), port).into()
}

/// UDP datagrams bigger than the MTU (4,000 bytes: three IPv4 fragments) through a
/// published port to each local task and back, at TC and with XDP on the underlay, and
/// through a VIP from a task; UDP to a port where the chosen task has no listener gives
/// the sender's socket ECONNREFUSED (the task's port unreachable, translated), from the
/// client through the published port and from a task through a VIP, also when the task
/// lands on itself.
#[test]
fn datagrams_bigger_than_the_mtu_and_port_unreachable() {
    let Some(object) = prereq::privileged("datagrams_bigger_than_the_mtu_and_port_unreachable")
    else {
        return;
    };
    let topo = LbTopo::new("b");
    let ip = |a: &str| a.parse::<Ipv4Addr>().unwrap();
    let mut model = topo.model(&ALL_ACTIVE);
    let tasks = |list: &[usize]| {
        let m = topo.model(
            &list
                .iter()
                .map(|i| (*i, Health::Active))
                .collect::<Vec<_>>(),
        );
        m.services[0].backends.clone()
    };
    model.services.extend([
        udp_service(
            "big",
            Some(BIG_PORT),
            ECHO_UDP_PORT,
            vec![ip(BIG_VIP)],
            tasks(&[0, 1, 2]),
        ),
        udp_service(
            "closed",
            Some(CLOSED_PORT),
            CLOSED_UDP_PORT,
            vec![],
            tasks(&[0, 1, 2]),
        ),
        udp_service(
            "closedvip",
            None,
            CLOSED_UDP_PORT,
            vec![ip(CLOSED_VIP)],
            tasks(&[1, 2]),
        ),
        udp_service(
            "closedsolo",
            None,
            CLOSED_UDP_PORT,
            vec![ip(CLOSED_SOLO_VIP)],
            tasks(&[0]),
        ),
    ]);
    let dp = Datapath::load(&object, &MeshConfig::DEFAULT).expect("load datapath");
    let mut mesh = Mesh::new(dp);
    topo.n.enter(|| {
        mesh.dp.attach_tc_ingress("un").expect("attach un");
        for h in ["h1", "h2", "h3"] {
            mesh.dp.attach_tc_task(h).expect("attach task veth");
        }
        mesh.apply(&model).expect("apply model");
    });
    let (u, t) = (Hook::TcUnderlayIngress, Hook::TcTask);
    let show = |d: &Snapshot| {
        d.iter()
            .map(|(h, r, c)| format!("{}/{}={}", h.name(), r.name(), c.packets))
            .collect::<Vec<_>>()
            .join(" ")
    };

    // No listener: the task's port unreachable reaches the client as ECONNREFUSED. (The
    // tasks' kernels would send one per second per destination after a burst of six.)
    for ts in &topo.t {
        ts.exec(&["sysctl", "-qw", "net.ipv4.icmp_ratelimit=0"]);
    }
    let before = counters(&mesh);
    topo.c.enter(|| {
        for _ in 0..12 {
            udp_refused(0, sock(NODE, CLOSED_PORT))
                .unwrap_or_else(|e| panic!("{e}; {}", show(&counters(&mesh).since(&before))));
        }
    });
    topo.t[0].enter(|| {
        for _ in 0..6 {
            udp_refused(0, sock(CLOSED_VIP, CLOSED_UDP_PORT))
                .unwrap_or_else(|e| panic!("t1: {e}; {}", show(&counters(&mesh).since(&before))));
            udp_refused(0, sock(CLOSED_SOLO_VIP, CLOSED_UDP_PORT)).unwrap_or_else(|e| {
                panic!(
                    "t1 landing on itself: {e}; {}",
                    show(&counters(&mesh).since(&before))
                )
            });
        }
    });
    let d = counters(&mesh).since(&before);
    println!(
        "lb: 24 datagrams to ports where nothing listens refused: {}",
        show(&d)
    );
    assert_eq!(d.get(t, Reason::FwdIcmpError).packets, 24, "{}", show(&d));

    // From the client through the published port: each flow (a source port of its
    // own) to one task, the datagram and its answer in one go.
    let before = counters(&mesh);
    let mut seen = BTreeMap::new();
    topo.c.enter(|| {
        for _ in 0..24 {
            let (task, peer, sends) = udp_echo(sock(NODE, BIG_PORT), 4000, 3).unwrap_or_else(|e| {
                panic!(
                    "4,000 bytes via {NODE}:{BIG_PORT}: {e}; {}",
                    show(&counters(&mesh).since(&before))
                )
            });
            assert_eq!((peer.as_str(), sends), (CLIENT, 1), "via {task}");
            *seen.entry(task).or_insert(0) += 1;
        }
    });
    assert_eq!(seen.len(), 3, "every task answered: {seen:?}");
    let d = counters(&mesh).since(&before);
    println!("\nlb: 24 datagrams of 4,000 bytes via {NODE}:{BIG_PORT} and their answers, landed {seen:?}: {}", show(&d));
    // Three fragments each way, every one translated.
    assert!(
        d.get(u, Reason::FwdToTask).packets >= 24 * 3,
        "{}",
        show(&d)
    );
    assert!(
        d.get(u, Reason::ObsFragmentNonFirst).packets >= 24 * 2,
        "{}",
        show(&d)
    );
    assert!(
        d.get(t, Reason::FwdReplyToClient).packets >= 24 * 3,
        "{}",
        show(&d)
    );
    assert!(
        d.get(t, Reason::ObsFragmentNonFirst).packets >= 24 * 2,
        "{}",
        show(&d)
    );
    for h in [u, t] {
        assert_eq!(
            d.get(h, Reason::PassFragmentUnmatched).packets,
            0,
            "{}",
            show(&d)
        );
    }

    // From t1 through the VIP (t1 itself answers as seen from the hairpin address).
    let before = counters(&mesh);
    let mut seen = BTreeMap::new();
    topo.t[0].enter(|| {
        for _ in 0..24 {
            let (task, peer, sends) = udp_echo(sock(BIG_VIP, ECHO_UDP_PORT), 4000, 3)
                .unwrap_or_else(|e| {
                    panic!(
                        "4,000 bytes to the VIP: {e}; {}",
                        show(&counters(&mesh).since(&before))
                    )
                });
            let want = if task == "t1" {
                "169.254.42.1"
            } else {
                TASKS[0]
            };
            assert_eq!((peer.as_str(), sends), (want, 1), "via {task}");
            *seen.entry(task).or_insert(0) += 1;
        }
    });
    assert_eq!(seen.len(), 3, "the VIP reached every task: {seen:?}");
    let d = counters(&mesh).since(&before);
    println!("lb: 24 datagrams of 4,000 bytes from t1 to {BIG_VIP}:{ECHO_UDP_PORT} and their answers, landed {seen:?}");
    assert!(
        d.get(t, Reason::FwdToTask).packets >= 24 * 3,
        "{}",
        show(&d)
    );
    assert_eq!(
        d.get(t, Reason::PassFragmentUnmatched).packets,
        0,
        "{}",
        show(&d)
    );

    // XDP on the underlay: fragments follow their first one there too.
    topo.c.exec(&["ethtool", "-K", "uc", "tx", "off"]);
    for ts in &topo.t {
        ts.exec(&["ethtool", "-K", "eth0", "gro", "on"]);
    }
    topo.n.enter(|| {
        mesh.dp
            .attach_xdp("un", aya::programs::XdpMode::Driver)
            .expect("attach xdp")
    });
    let before = counters(&mesh);
    topo.c.enter(|| {
        for _ in 0..12 {
            let (task, peer, sends) = udp_echo(sock(NODE, BIG_PORT), 4000, 3).unwrap_or_else(|e| {
                panic!(
                    "4,000 bytes via XDP: {e}; {}",
                    show(&counters(&mesh).since(&before))
                )
            });
            assert_eq!((peer.as_str(), sends), (CLIENT, 1), "via {task}");
        }
    });
    let d = counters(&mesh).since(&before);
    let x = Hook::XdpUnderlay;
    println!(
        "lb: with XDP, 12 datagrams of 4,000 bytes and their answers: {}",
        show(&d)
    );
    assert!(
        d.get(x, Reason::FwdToTask).packets >= 12 * 3,
        "{}",
        show(&d)
    );
    assert!(
        d.get(x, Reason::ObsFragmentNonFirst).packets >= 12 * 2,
        "{}",
        show(&d)
    );
    assert_eq!(
        d.get(x, Reason::PassFragmentUnmatched).packets,
        0,
        "{}",
        show(&d)
    );
}

/// A VIP on Docker's overlay (every port), reached through the overlay veth hooks as on
/// a swarm's user overlay network: a bridge in the overlay's namespace with three tasks
/// on the overlay's MTU (1450). t1's 4,000-byte datagrams to the VIP are rewritten
/// fragment by fragment toward t2 or t3, their 4,000-byte answers come back from the
/// VIP; a port nobody listens on gives t1's socket ECONNREFUSED.
#[test]
fn an_overlay_vip_takes_big_datagrams_and_answers_port_unreachable() {
    use mesh_agent::model::{BackendSpec, EndpointSpec, MacAddr, Model, ServiceSpec};
    use mesh_tests::{lbtopo::Servers, netns::Netns};
    let Some(object) =
        prereq::privileged("an_overlay_vip_takes_big_datagrams_and_answers_port_unreachable")
    else {
        return;
    };
    const OVL_TASKS: [&str; 3] = ["10.0.2.11", "10.0.2.12", "10.0.2.13"];
    const OVL_VIP: &str = "10.0.2.10";
    let ip = |a: &str| a.parse::<Ipv4Addr>().unwrap();
    let mac = |a: &str| {
        let o = ip(a).octets();
        format!("02:42:{:02x}:{:02x}:{:02x}:{:02x}", o[0], o[1], o[2], o[3])
    };
    // Docker's namespace of the overlay network: its bridge and one veth per task.
    let o = Netns::new("vo");
    o.ip(&["link", "add", "br0", "type", "bridge"]);
    o.ip(&["link", "set", "br0", "up"]);
    let tasks: Vec<Netns> = (1..=3).map(|i| Netns::new(&format!("vt{i}"))).collect();
    for (i, t) in tasks.iter().enumerate() {
        t.exec(&["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"]);
        let host = format!("v{}", i + 1);
        t.ip(&[
            "link",
            "add",
            "eth0",
            "address",
            &mac(OVL_TASKS[i]),
            "mtu",
            "1450",
            "type",
            "veth",
            "peer",
            "name",
            &host,
            "netns",
            o.name(),
        ]);
        t.ip(&[
            "addr",
            "add",
            &format!("{}/24", OVL_TASKS[i]),
            "dev",
            "eth0",
        ]);
        t.ip(&["link", "set", "eth0", "up"]);
        o.ip(&["link", "set", &host, "mtu", "1450", "master", "br0", "up"]);
        // The tasks' kernels would send one port unreachable per second per
        // destination after a burst of six.
        t.exec(&["sysctl", "-qw", "net.ipv4.icmp_ratelimit=0"]);
    }
    let servers = Servers::new();
    for (i, t) in tasks.iter().enumerate() {
        servers.serve(t, &format!("t{}", i + 1));
    }
    let backend = |a: &str| BackendSpec {
        addr: ip(a),
        state: Health::Active,
        node: None,
        network: None,
        task: None,
    };
    let model = Model {
        services: vec![ServiceSpec {
            name: "api".into(),
            ports: vec![],
            vips: vec![ip(OVL_VIP)],
            backends: vec![backend(OVL_TASKS[1]), backend(OVL_TASKS[2])],
            tcp_idle: None,
            udp_idle: None,
            affinity: false,
            every_port: true,
        }],
        // The tasks of this node (here reached on their overlay veths).
        endpoints: (0..3)
            .map(|i| EndpointSpec {
                addr: ip(OVL_TASKS[i]),
                interface: format!("v{}", i + 1),
                mac: MacAddr({
                    let o = ip(OVL_TASKS[i]).octets();
                    [0x02, 0x42, o[0], o[1], o[2], o[3]]
                }),
                delivery_addr: None,
            })
            .collect(),
        ..Default::default()
    };
    let dp = Datapath::load(&object, &MeshConfig::DEFAULT).expect("load datapath");
    let mut mesh = Mesh::new(dp);
    o.enter(|| {
        for h in ["v1", "v2", "v3"] {
            mesh.dp.attach_tc_overlay(h).expect("attach overlay veth");
        }
        mesh.apply(&model).expect("apply model");
    });
    let show = |d: &Snapshot| {
        d.iter()
            .map(|(h, r, c)| format!("{}/{}={}", h.name(), r.name(), c.packets))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let before = counters(&mesh);
    // First a port nobody listens on, then the big datagrams.
    let mut refused = 0;
    tasks[0].enter(|| {
        for _ in 0..6 {
            udp_refused(0, sock(OVL_VIP, CLOSED_UDP_PORT))
                .unwrap_or_else(|e| panic!("t1: {e}; {}", show(&counters(&mesh).since(&before))));
            refused += 1;
        }
    });
    let mut seen = BTreeMap::new();
    tasks[0].enter(|| {
        for _ in 0..16 {
            let (task, peer, sends) = udp_echo(sock(OVL_VIP, ECHO_UDP_PORT), 4000, 3)
                .unwrap_or_else(|e| {
                    panic!(
                        "4,000 bytes to the overlay VIP: {e}; {}",
                        show(&counters(&mesh).since(&before))
                    )
                });
            assert_eq!((peer.as_str(), sends), (OVL_TASKS[0], 1), "via {task}");
            *seen.entry(task).or_insert(0) += 1;
        }
    });
    assert_eq!(seen.len(), 2, "both tasks answered: {seen:?}");
    let d = counters(&mesh).since(&before);
    let (oi, oo) = (Hook::TcOverlayIn, Hook::TcOverlayOut);
    println!(
        "\nlb: overlay VIP {OVL_VIP}: 16 datagrams of 4,000 bytes from t1 and their answers, landed {seen:?}; {refused} datagrams to a closed port refused: {}",
        show(&d)
    );
    assert!(
        d.get(oi, Reason::FwdVipToTask).packets >= 16 * 3,
        "{}",
        show(&d)
    );
    assert!(
        d.get(oi, Reason::ObsFragmentNonFirst).packets >= 16 * 2,
        "{}",
        show(&d)
    );
    assert!(
        d.get(oo, Reason::FwdVipReply).packets >= 16 * 3,
        "{}",
        show(&d)
    );
    assert_eq!(d.get(oo, Reason::FwdIcmpError).packets, 6, "{}", show(&d));
    drop(servers);
}

/// A map write that fails part-way (here the node-address map, 256 entries, asked for
/// 300: the first writes of a plan) leaves the maps with part of the plan. The next
/// apply must start from what the maps hold: once the model fits again, every service
/// is programmed and a second apply writes nothing. (Before the repair, the planner took
/// the failed plan as written and never wrote the service's frontend, backend or table.)
#[test]
fn a_failed_map_write_is_repaired_by_the_next_apply() {
    let Some(object) = prereq::privileged("a_failed_map_write_is_repaired_by_the_next_apply")
    else {
        return;
    };
    let dp = Datapath::load(&object, &MeshConfig::DEFAULT).expect("load datapath");
    let mut mesh = Mesh::new(dp);
    let model = |addrs: usize| {
        let node_addrs: Vec<String> = (0..addrs)
            .map(|i| format!("10.77.{}.{}", i / 250, 1 + i % 250))
            .collect();
        mesh_agent::model::from_yaml(&format!(
            "node_addrs: [{}]\nservices:\n  - name: web\n    ports: [{{published: 8080, target: 80}}]\n    backends: [{{addr: 10.0.1.4}}, {{addr: 10.0.1.5}}]\nendpoints:\n  - {{addr: 10.0.1.4, interface: va, mac: '02:42:0a:00:01:04'}}\n  - {{addr: 10.0.1.5, interface: vb, mac: '02:42:0a:00:01:05'}}\n",
            node_addrs.join(", ")
        ))
        .expect("model")
    };
    let resolve = |name: &str| -> Result<(u32, [u8; 6]), mesh_agent::MeshError> {
        Ok((name.len() as u32 + 10, [2, 0, 0, 0, 0, 1]))
    };
    let desired = |addrs| mesh_agent::model::desired(&model(addrs), resolve).expect("desired");
    let capacity = mesh_common::maps::NODE_ADDRS.entries as usize;
    let err = mesh
        .apply_desired(&desired(capacity + 44))
        .expect_err("more node addresses than the map holds");
    let snap = mesh.dp.read_snapshot().expect("snapshot");
    assert_eq!(snap.node_addrs.len(), capacity, "{err}");
    assert!(snap.frontends.is_empty(), "nothing after the failed write");

    let applied = mesh.apply_desired(&desired(10)).expect("a model that fits");
    let snap = mesh.dp.read_snapshot().expect("snapshot");
    assert_eq!(snap.node_addrs.len(), 10);
    assert_eq!(snap.frontends.len(), 1, "web's frontend: {applied:?}");
    assert_eq!(snap.services.len(), 1);
    assert_eq!(snap.backends.len(), 2);
    let table = snap.tables.values().next().expect("web's Maglev table");
    assert!(
        table.iter().all(|id| snap.backends.contains_key(id)),
        "every slot names a backend in the map"
    );
    let again = mesh.apply_desired(&desired(10)).expect("again");
    assert_eq!(again.writes, 0, "a second apply writes nothing");
    println!(
        "lb: a plan that failed at node address {} of {} was re-read from the maps; the next \
         apply wrote {} entries ({} addresses removed, web programmed) and a third none",
        capacity + 1,
        capacity + 44,
        applied.writes,
        capacity - 10
    );
}
