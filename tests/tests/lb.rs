//! Tier 3, load balancing on one node: a client namespace, a node namespace with the
//! programs attached, three task namespaces. Real TCP/UDP, real kernel.

#![allow(clippy::result_large_err)] // aya errors by value, on cold paths

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, ErrorKind, Write},
    net::{Ipv4Addr, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use mesh_agent::{loader::Datapath, mesh::Mesh, model::Health, stats::Snapshot};
use mesh_common::{config::MeshConfig, reason::Reason, stats::Hook};
use mesh_tests::{
    lbtopo::{http_get, LbTopo, ALL_ACTIVE, CLIENT, DIRECT_PORT, NODE, SOLO_VIP, TASKS, VIP},
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
        setup("backends_leave_and_drain_without_breaking_other_flows", "r")
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
