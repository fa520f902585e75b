//! Tier 3, published ports and VIPs dialled from the node itself and from a container on
//! it (the cgroup socket programs and the host port), in the overlay cluster: node 1's
//! own namespace and a "container" namespace behind a bridge-like veth on node 1 reach
//! services with tasks on node 1 and on nodes 2 and 3, TCP and UDP, ingress and host
//! mode, and every client sees the address it dialled as its peer. Real traffic only
//! between these namespaces; the programs sit on this machine's cgroup v2 root but act
//! only for the namespaces put in their scope.

#![allow(clippy::result_large_err)] // aya errors by value, on cold paths

use std::{
    collections::BTreeSet,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket},
    path::PathBuf,
    time::Duration,
};

use mesh_agent::{
    datapath::loader::Datapath,
    datapath::mesh::Mesh,
    datapath::stats::Snapshot,
    host::hostport::{self, HostPorts},
    model::{Model, PortSpec, Protocol, PublishMode, ServiceSpec},
};
use mesh_common::{config::MeshConfig, reason::Reason, stats::Hook};
use mesh_tests::{
    cluster::{backend, Cluster, NODES, VIP},
    netns::Netns,
    prereq,
};

const HOST_ADDR: Ipv4Addr = Ipv4Addr::new(169, 254, 42, 2);
/// The container's side of its bridge-like link to node 1, and node 1's (its gateway).
const CONTAINER: &str = "172.31.0.2";
const BRIDGE_GW: &str = "172.31.0.1";
/// A VIP with a UDP port (the cluster's VIP has web's TCP port).
const UDP_VIP: &str = "10.0.1.20";

fn ip(a: &str) -> Ipv4Addr {
    a.parse().unwrap()
}

/// The cluster's model for node `i`, plus: `dns` (5353/udp -> 53 on t1..t3, VIP
/// 10.0.1.20:53), host-mode `hweb` (8090 -> 80) and `hdns` (5390/udp -> 53) on t1 only.
fn model(cl: &Cluster, i: usize) -> Model {
    let mut m = cl.model(i, &[true; 3]);
    let svc = |name: &str, port: PortSpec, vips: Vec<Ipv4Addr>, tasks: &[usize]| ServiceSpec {
        name: name.into(),
        ports: vec![port],
        vips,
        backends: tasks.iter().map(|t| backend(i, *t)).collect(),
        tcp_idle: None,
        udp_idle: None,
        affinity: false,
        every_port: false,
    };
    let port = |published: u16, target: u16, protocol: Protocol, mode: PublishMode| PortSpec {
        published: Some(published),
        target,
        protocol,
        mode,
    };
    m.services.extend([
        svc(
            "dns",
            port(5353, 53, Protocol::Udp, PublishMode::Ingress),
            vec![ip(UDP_VIP)],
            &[0, 1, 2],
        ),
        svc(
            "hweb",
            port(8090, 80, Protocol::Tcp, PublishMode::Host),
            vec![],
            &[0],
        ),
        svc(
            "hdns",
            port(5390, 53, Protocol::Udp, PublishMode::Host),
            vec![],
            &[0],
        ),
    ]);
    m
}

struct Setup {
    cl: Cluster,
    meshes: Vec<Mesh>,
    /// Node 1's "container".
    k: Netns,
}

fn setup(test: &str, tag: &str) -> Option<Setup> {
    let object = prereq::privileged(test)?;
    let cl = Cluster::new(tag);
    // The container: a namespace behind a veth on node 1, default route via node 1,
    // as a container on docker0 or docker_gwbridge is.
    let k = Netns::new(&format!("{tag}k"));
    let n1 = &cl.nodes[0];
    n1.ip(&[
        "link",
        "add",
        "kh",
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        k.name(),
    ]);
    n1.ip(&["addr", "add", &format!("{BRIDGE_GW}/24"), "dev", "kh"]);
    n1.ip(&["link", "set", "kh", "up"]);
    n1.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    k.exec(&["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"]);
    k.ip(&["addr", "add", &format!("{CONTAINER}/24"), "dev", "eth0"]);
    k.ip(&["link", "set", "eth0", "up"]);
    k.ip(&["route", "add", "default", "via", BRIDGE_GW]);
    let k_path = PathBuf::from("/run/netns").join(k.name());
    let mut meshes = Vec::new();
    for i in 0..3 {
        let dp = Datapath::load(&object, &MeshConfig::DEFAULT).expect("load datapath");
        let mut mesh = Mesh::new(dp);
        let m = model(&cl, i);
        cl.nodes[i].enter(|| {
            mesh.dp.attach_tc_ingress("u").expect("attach underlay");
            mesh.dp
                .attach_tc_task(&format!("h{}", i + 1))
                .expect("attach task veth");
            if i == 0 {
                let mut h =
                    HostPorts::setup(&mut mesh.dp, None, "u", ip(NODES[0]), HOST_ADDR, None)
                        .expect("host ports on node 1");
                mesh.extra_node_addrs = h.node_addrs();
                mesh.apply(&m).expect("apply model");
                h.sync(
                    &mut mesh.dp,
                    std::slice::from_ref(&k_path),
                    &hostport::port_vips(&m),
                )
                .expect("host ports' scope and routes");
                assert_eq!(h.scope_len(), 2, "node 1 and its container");
            } else {
                mesh.apply(&m).expect("apply model");
            }
        });
        meshes.push(mesh);
    }
    Some(Setup { cl, meshes, k })
}

const TIMEOUT: Duration = Duration::from_secs(3);

/// One HTTP/1.0 GET to `to`: the body ("<task> <peer the task saw>") and the peer the
/// client's socket reports (getpeername).
fn tcp_get(to: SocketAddr) -> (String, String, SocketAddr) {
    let mut s = TcpStream::connect_timeout(&to, TIMEOUT).unwrap_or_else(|e| panic!("{to}: {e}"));
    let peer = s.peer_addr().expect("getpeername");
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf)
        .unwrap_or_else(|e| panic!("{to}: {e}"));
    let body = buf
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or("")
        .trim()
        .to_string();
    let (t, p) = body
        .split_once(' ')
        .unwrap_or_else(|| panic!("{to}: unexpected answer {buf:?}"));
    (t.into(), p.into(), peer)
}

/// One datagram to `to` and its answer: (task, peer the task saw, where the answer came
/// from). `connected`: through connect() (and getpeername() is checked), else sendto().
fn udp_ask(to: SocketAddr, connected: bool) -> (String, String, SocketAddr) {
    let s = UdpSocket::bind("0.0.0.0:0").unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    if connected {
        s.connect(to).unwrap();
        assert_eq!(
            s.peer_addr().unwrap(),
            to,
            "getpeername of a connected UDP socket"
        );
        s.send(b"q").unwrap();
    } else {
        s.send_to(b"q", to).unwrap();
    }
    let mut buf = [0u8; 256];
    let (n, from) = s
        .recv_from(&mut buf)
        .unwrap_or_else(|e| panic!("{to} (connected: {connected}): {e}"));
    let body = String::from_utf8_lossy(&buf[..n]).to_string();
    let (t, p) = body
        .split_once(' ')
        .unwrap_or_else(|| panic!("{to}: unexpected answer {body:?}"));
    (t.into(), p.into(), from)
}

/// Checks, from the calling thread's namespace, every kind of destination through
/// `addrs` (the addresses this client dials published ports on); `me` is the address
/// node 1's task must see as the client, `remote` the one the other nodes' tasks see
/// (a container's bridge address means nothing there: node 1's own address).
fn check_all(addrs: &[&str], me: &str, remote: &str, who: &str) {
    let seen_as = |t: &str| if t == "t1" { me } else { remote };
    let all: BTreeSet<String> = ["t1", "t2", "t3"].map(String::from).into();
    for a in addrs {
        let to = |port| SocketAddr::from((ip(a), port));
        // Ingress TCP: tasks on this node and on the other two.
        let mut seen = BTreeSet::new();
        for _ in 0..40 {
            let (t, p, peer) = tcp_get(to(8080));
            assert_eq!(peer, to(8080), "{who}: getpeername is what was dialled");
            assert_eq!(p, seen_as(&t), "{who}: the client's address as {t} sees it");
            seen.insert(t);
        }
        assert_eq!(seen, all, "{who} via {a}:8080 reaches every node's task");
        // A service whose only task is on node 2.
        let (t, _, peer) = tcp_get(to(8086));
        assert_eq!((t.as_str(), peer), ("t2", to(8086)), "{who} via {a}:8086");
        // Host mode: the local task only.
        for _ in 0..5 {
            let (t, _, peer) = tcp_get(to(8090));
            assert_eq!((t.as_str(), peer), ("t1", to(8090)), "{who} via {a}:8090");
        }
        // UDP, unconnected (sendmsg / recvmsg) and connected.
        let mut seen = BTreeSet::new();
        for i in 0..40 {
            let (t, p, from) = udp_ask(to(5353), i % 2 == 0);
            assert_eq!(
                from,
                to(5353),
                "{who}: the answer comes from what was dialled"
            );
            assert_eq!(
                p,
                seen_as(&t),
                "{who}: the client's address as {t} sees it (UDP)"
            );
            seen.insert(t);
        }
        assert_eq!(
            seen, all,
            "{who} via {a}:5353/udp reaches every node's task"
        );
        for connected in [false, true] {
            let (t, _, from) = udp_ask(to(5390), connected);
            assert_eq!(
                (t.as_str(), from),
                ("t1", to(5390)),
                "{who} via {a}:5390/udp"
            );
        }
    }
    // VIPs with ports, TCP and UDP, routed into the host port.
    let (vip, udp_vip) = (
        SocketAddr::from((ip(VIP), 80)),
        SocketAddr::from((ip(UDP_VIP), 53)),
    );
    let mut seen = BTreeSet::new();
    for i in 0..40 {
        let (t, p, peer) = tcp_get(vip);
        assert_eq!((p.as_str(), peer), (seen_as(&t), vip), "{who}: VIP {vip}");
        let (u, p, from) = udp_ask(udp_vip, i % 2 == 1);
        assert_eq!(
            (p.as_str(), from),
            (seen_as(&u), udp_vip),
            "{who}: VIP {udp_vip}"
        );
        seen.insert(t);
        seen.insert(u);
    }
    assert_eq!(seen, all, "{who}: the VIPs reach every node's task");
}

#[test]
fn the_node_and_its_containers_reach_published_ports_and_vips() {
    let Some(s) = setup(
        "the_node_and_its_containers_reach_published_ports_and_vips",
        "hp",
    ) else {
        return;
    };
    let (n1, k) = (&s.cl.nodes[0], &s.k);
    n1.enter(|| {
        check_all(
            &["127.0.0.1", NODES[0], BRIDGE_GW],
            NODES[0],
            NODES[0],
            "node 1",
        )
    });
    k.enter(|| {
        check_all(
            &[NODES[0], BRIDGE_GW],
            CONTAINER,
            NODES[0],
            "node 1's container",
        )
    });
    let snap = Snapshot::read(&s.meshes[0].dp.stats().unwrap()).unwrap();
    let pointed = snap.get(Hook::Sock, Reason::FwdToTask).packets;
    assert!(
        pointed >= 2 * 200,
        "sockets pointed at the host port: {pointed}"
    );
    assert!(
        snap.get(Hook::TcTask, Reason::FwdToTunnel).packets > 0,
        "remote tasks tunnelled"
    );
}

#[test]
fn other_namespaces_and_a_containers_loopback_are_left_alone() {
    let Some(s) = setup(
        "other_namespaces_and_a_containers_loopback_are_left_alone",
        "hq",
    ) else {
        return;
    };
    let refused = |to: &str| {
        let e = TcpStream::connect_timeout(&SocketAddr::from((ip(to), 8080)), TIMEOUT)
            .expect_err("nothing listens there");
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{to}: {e}");
    };
    // The container's own loopback is its own; node 2's namespace is not in node 1's
    // scope (its own agent has no host port here), nor is the client's.
    s.k.enter(|| refused("127.0.0.1"));
    s.cl.nodes[1].enter(|| refused("127.0.0.1"));
    s.cl.c.enter(|| refused("127.0.0.1"));
    let snap = Snapshot::read(&s.meshes[0].dp.stats().unwrap()).unwrap();
    assert_eq!(snap.get(Hook::Sock, Reason::FwdToTask).packets, 0);
    // And node 1 itself is served: the programs are there.
    s.cl.nodes[0].enter(|| {
        let (t, _, peer) = tcp_get(SocketAddr::from((ip("127.0.0.1"), 8086)));
        assert_eq!(
            (t.as_str(), peer.to_string().as_str()),
            ("t2", "127.0.0.1:8086")
        );
    });
}
