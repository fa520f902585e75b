//! One node namespace with a client namespace on its "underlay" and three task
//! namespaces on veths, as DATAPATH.md's single-node paths need:
//!
//! ```text
//!  c (10.210.0.2) --uc/un-- n (10.210.0.1) --h1/eth0-- t1 (10.211.0.11)
//!                                          --h2/eth0-- t2 (10.211.0.12)
//!                                          --h3/eth0-- t3 (10.211.0.13)
//! ```
//!
//! Tasks have a /32 and a default route via 10.211.0.1 (which every host-side veth
//! holds), so everything they send crosses their veth's TC hook. The node routes between
//! client and tasks (for the "direct" baseline). Every task runs small servers on
//! threads of this process: HTTP on :80 (answers `<task> <peer address>`), a line echo
//! on :7000 that keeps its connections (answers each line with the task's name), a
//! UDP responder on :53 (answers `<task> <peer address>`), and a UDP echo on :54 that
//! answers a datagram of any size with one as long (nothing listens on UDP :59).

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use mesh_agent::model::{
    BackendSpec, EndpointSpec, Health, MacAddr, Model, PortSpec, Protocol, PublishMode, ServiceSpec,
};

use crate::netns::Netns;

pub const NODE: &str = "10.210.0.1";
pub const CLIENT: &str = "10.210.0.2";
pub const GATEWAY: &str = "10.211.0.1";
pub const TASKS: [&str; 3] = ["10.211.0.11", "10.211.0.12", "10.211.0.13"];
pub const VIP: &str = "10.212.0.10";
/// Tasks also serve HTTP here, outside any service: the "direct" baseline uses it, so its
/// connections never share a tuple (and a server-side TIME_WAIT) with the mesh's.
pub const DIRECT_PORT: u16 = 8000;
/// A VIP whose only backend is t1: t1 reaching it lands on itself.
pub const SOLO_VIP: &str = "10.212.0.20";
/// The tasks' UDP echo: a datagram of any size is answered with one as long that
/// starts `<task> <peer address>\n` and goes on with the datagram's own bytes.
pub const ECHO_UDP_PORT: u16 = 54;
/// A UDP port no task listens on: a task's kernel answers with port unreachable.
pub const CLOSED_UDP_PORT: u16 = 59;

pub fn task_mac(i: usize) -> [u8; 6] {
    [0x02, 0x42, 10, 211, 0, 11 + i as u8]
}

fn mac_str(m: [u8; 6]) -> String {
    MacAddr(m).to_string()
}

/// A task namespace on a veth into its node: `eth0` (MAC `mac`, address `addr`/32, the
/// `mtu`) in the task, `host_if` in the node; the task's default route goes via
/// `gateway`, which the host side holds, so everything the task sends crosses the
/// host side's TC hook; the node routes `addr` to it.
pub fn plug_task(
    node: &Netns,
    task: &Netns,
    host_if: &str,
    addr: &str,
    mac: [u8; 6],
    gateway: &str,
    mtu: u32,
) {
    let mtu = mtu.to_string();
    task.ip(&[
        "link",
        "add",
        "eth0",
        "address",
        &mac_str(mac),
        "mtu",
        &mtu,
        "type",
        "veth",
        "peer",
        "name",
        host_if,
        "netns",
        node.name(),
    ]);
    task.ip(&["addr", "add", &format!("{addr}/32"), "dev", "eth0"]);
    task.ip(&["link", "set", "eth0", "up"]);
    task.ip(&["route", "add", gateway, "dev", "eth0"]);
    task.ip(&["route", "add", "default", "via", gateway]);
    node.ip(&["link", "set", host_if, "mtu", &mtu]);
    node.ip(&["addr", "add", &format!("{gateway}/32"), "dev", host_if]);
    node.ip(&["link", "set", host_if, "up"]);
    node.ip(&["route", "add", &format!("{addr}/32"), "dev", host_if]);
}

pub struct LbTopo {
    pub servers: Servers,
    pub c: Netns,
    pub n: Netns,
    pub t: Vec<Netns>,
}

/// The tasks' servers (threads of this process with sockets in the task namespaces).
pub struct Servers {
    stop: Arc<AtomicBool>,
}

impl Drop for Servers {
    fn drop(&mut self) {
        // Server threads notice on their next wake-up; the namespaces go with their
        // owners (sockets in them close when the threads let go).
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl Default for Servers {
    fn default() -> Self {
        Self::new()
    }
}

impl LbTopo {
    pub fn new(tag: &str) -> LbTopo {
        let c = Netns::new(&format!("{tag}c"));
        let n = Netns::new(&format!("{tag}n"));
        let t: Vec<Netns> = (1..=3).map(|i| Netns::new(&format!("{tag}t{i}"))).collect();
        for ns in std::iter::once(&c).chain([&n]).chain(&t) {
            ns.exec(&["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"]);
            ns.exec(&["sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1"]);
        }
        n.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        c.ip(&[
            "link",
            "add",
            "uc",
            "type",
            "veth",
            "peer",
            "name",
            "un",
            "netns",
            n.name(),
        ]);
        c.ip(&["addr", "add", &format!("{CLIENT}/24"), "dev", "uc"]);
        c.ip(&["link", "set", "uc", "up"]);
        c.ip(&["route", "add", "10.211.0.0/16", "via", NODE]);
        c.ip(&["route", "add", "10.212.0.0/16", "via", NODE]);
        n.ip(&["addr", "add", &format!("{NODE}/24"), "dev", "un"]);
        n.ip(&["link", "set", "un", "up"]);
        for (i, ts) in t.iter().enumerate() {
            plug_task(
                &n,
                ts,
                &format!("h{}", i + 1),
                TASKS[i],
                task_mac(i),
                GATEWAY,
                1500,
            );
        }
        let servers = Servers::new();
        for (i, ts) in t.iter().enumerate() {
            servers.serve(ts, &format!("t{}", i + 1));
        }
        LbTopo { servers, c, n, t }
    }
}

impl Servers {
    pub fn new() -> Self {
        Servers {
            stop: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Starts, in `ns`, HTTP on :80 and on [`DIRECT_PORT`], the line echo on :7000 and the
    /// UDP responder on :53, all answering as `name`.
    pub fn serve(&self, ns: &Netns, name: &str) {
        let (http, direct, echo, udp, big) = ns.enter(|| {
            (
                TcpListener::bind(("0.0.0.0", 80)).expect("bind :80"),
                TcpListener::bind(("0.0.0.0", DIRECT_PORT)).expect("bind direct port"),
                TcpListener::bind(("0.0.0.0", 7000)).expect("bind :7000"),
                UdpSocket::bind(("0.0.0.0", 53)).expect("bind :53"),
                UdpSocket::bind(("0.0.0.0", ECHO_UDP_PORT)).expect("bind udp echo"),
            )
        });
        let stop = self.stop.clone();
        let n = name.to_string();
        std::thread::spawn(move || {
            let _ = big.set_read_timeout(Some(Duration::from_millis(500)));
            let mut buf = vec![0u8; 65536];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((len, peer)) = big.recv_from(&mut buf) {
                    let head = format!("{n} {}\n", peer.ip());
                    let mut answer = buf[..len].to_vec();
                    if len >= head.len() {
                        answer[..head.len()].copy_from_slice(head.as_bytes());
                    }
                    let _ = big.send_to(&answer, peer);
                }
            }
        });
        for http in [http, direct] {
            self.serve_http(http, name.to_string());
        }
        let stop = self.stop.clone();
        let n = name.to_string();
        std::thread::spawn(move || {
            for s in echo.incoming() {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(s) = s else { continue };
                let n = n.clone();
                std::thread::spawn(move || {
                    let mut w = s.try_clone().expect("clone");
                    for line in BufReader::new(s).lines() {
                        if line.is_err() || writeln!(w, "{n}").is_err() {
                            return;
                        }
                    }
                });
            }
        });
        let stop = self.stop.clone();
        let name = name.to_string();
        std::thread::spawn(move || {
            let _ = udp.set_read_timeout(Some(Duration::from_millis(500)));
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((_, peer)) = udp.recv_from(&mut buf) {
                    let _ = udp.send_to(format!("{name} {}", peer.ip()).as_bytes(), peer);
                }
            }
        });
    }

    fn serve_http(&self, http: TcpListener, n: String) {
        let stop = self.stop.clone();
        std::thread::spawn(move || {
            for s in http.incoming() {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(mut s) = s else { continue };
                let n = n.clone();
                std::thread::spawn(move || {
                    let peer = s
                        .peer_addr()
                        .map(|a| a.ip().to_string())
                        .unwrap_or_default();
                    let mut buf = [0u8; 1024];
                    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                    let _ = s.read(&mut buf);
                    let _ = write!(
                        s,
                        "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n{n} {peer}\n"
                    );
                });
            }
        });
    }
}

impl LbTopo {
    /// The model of the tests' services over `backends` (task index, health).
    pub fn model(&self, backends: &[(usize, Health)]) -> Model {
        let be = |list: &[(usize, Health)]| -> Vec<BackendSpec> {
            list.iter()
                .map(|(i, h)| BackendSpec {
                    addr: TASKS[*i].parse().unwrap(),
                    state: *h,
                    node: None,
                    network: None,
                    task: None,
                })
                .collect()
        };
        let port =
            |published: Option<u16>, target: u16, protocol: Protocol, mode: PublishMode| PortSpec {
                published,
                target,
                protocol,
                mode,
            };
        let svc = |name: &str,
                   ports: Vec<PortSpec>,
                   vips: Vec<Ipv4Addr>,
                   backends: Vec<BackendSpec>| ServiceSpec {
            name: name.into(),
            ports,
            vips,
            backends,
            tcp_idle: None,
            udp_idle: None,
            affinity: false,
            every_port: false,
        };
        use Protocol::*;
        use PublishMode::*;
        Model {
            underlay: Some("un".into()),
            node_addrs: vec![NODE.parse().unwrap()],
            services: vec![
                svc(
                    "web",
                    vec![port(Some(8080), 80, Tcp, Ingress)],
                    vec![VIP.parse().unwrap()],
                    be(backends),
                ),
                svc(
                    "webhost",
                    vec![port(Some(8081), 80, Tcp, Host)],
                    vec![],
                    be(backends),
                ),
                svc(
                    "echo",
                    vec![port(Some(7000), 7000, Tcp, Ingress)],
                    vec![],
                    be(backends),
                ),
                svc(
                    "dns",
                    vec![port(Some(5353), 53, Udp, Ingress)],
                    vec![],
                    be(backends),
                ),
                svc(
                    "solo",
                    vec![port(Some(8082), 80, Tcp, Ingress)],
                    vec![SOLO_VIP.parse().unwrap()],
                    be(&[(0, Health::Active)]),
                ),
                svc(
                    "empty",
                    vec![
                        port(Some(8090), 80, Tcp, Ingress),
                        port(Some(5354), 53, Udp, Ingress),
                    ],
                    vec![],
                    vec![],
                ),
            ],
            endpoints: (0..3)
                .map(|i| EndpointSpec {
                    addr: TASKS[i].parse().unwrap(),
                    interface: format!("h{}", i + 1),
                    mac: MacAddr(task_mac(i)),
                    delivery_addr: None,
                })
                .collect(),
            ..Default::default()
        }
    }
}

/// One HTTP/1.0 request from the current namespace; returns the body.
pub fn http_get(addr: &str, port: u16) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(
        &(addr.parse::<Ipv4Addr>().unwrap(), port).into(),
        Duration::from_secs(3),
    )?;
    crate::bound::get_on(&mut s, "/")
}

/// All three tasks healthy.
pub const ALL_ACTIVE: [(usize, Health); 3] = [
    (0, Health::Active),
    (1, Health::Active),
    (2, Health::Active),
];

/// A UDP service `name` over `backends`: published on `published` (ingress mode) if
/// given, on its `vips` (port `target`) otherwise or as well.
pub fn udp_service(
    name: &str,
    published: Option<u16>,
    target: u16,
    vips: Vec<Ipv4Addr>,
    backends: Vec<BackendSpec>,
) -> ServiceSpec {
    ServiceSpec {
        name: name.into(),
        ports: vec![PortSpec {
            published,
            target,
            protocol: Protocol::Udp,
            mode: PublishMode::Ingress,
        }],
        vips,
        backends,
        tcp_idle: None,
        udp_idle: None,
        affinity: false,
        every_port: false,
    }
}

/// A `len`-byte datagram to the UDP echo at `to` from the current namespace, and its
/// answer: (task, peer address the task saw, sends it took). Each send waits up to a
/// second; up to `tries` sends (a datagram too big for the path teaches the sender's
/// kernel its MTU, by ICMP fragmentation needed, and is lost once). The answer must come
/// from `to`, be as long and carry the datagram's own bytes.
pub fn udp_echo(
    to: SocketAddr,
    len: usize,
    tries: usize,
) -> Result<(String, String, usize), String> {
    let s = UdpSocket::bind(("0.0.0.0", 0)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(1)))
        .map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 65536];
    for attempt in 1..=tries {
        // The bytes after the answer's header, and the attempt, are checked.
        let mut data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        data[64..68].copy_from_slice(&(attempt as u32).to_be_bytes());
        s.send_to(&data, to)
            .map_err(|e| format!("send to {to}: {e}"))?;
        let deadline = std::time::Instant::now() + Duration::from_secs(1);
        while std::time::Instant::now() < deadline {
            let Ok((n, from)) = s.recv_from(&mut buf) else {
                break;
            };
            if n < 68 || buf[64..68] != data[64..68] {
                continue; // an earlier attempt's answer
            }
            if from != to {
                return Err(format!("answer from {from}, not {to}"));
            }
            if n != len {
                return Err(format!("answer of {n} bytes to {len}"));
            }
            let text = String::from_utf8_lossy(&buf[..64]).to_string();
            let head = text.split('\n').next().unwrap_or("").to_string();
            if buf[head.len() + 1..n] != data[head.len() + 1..] {
                return Err(format!(
                    "answer's bytes differ from the datagram's ({head})"
                ));
            }
            let (task, peer) = head
                .split_once(' ')
                .ok_or_else(|| format!("unexpected answer {head:?}"))?;
            return Ok((task.to_string(), peer.to_string(), attempt));
        }
    }
    Err(format!(
        "no answer from {to} to {tries} datagrams of {len} bytes"
    ))
}

/// A datagram from `from_port` (0: any) of the current namespace to `to`, where nothing
/// listens, on a connected socket: `Ok` when the socket learns it (ECONNREFUSED, the
/// ICMP port unreachable translated back to `to`), else what happened instead.
pub fn udp_refused(from_port: u16, to: SocketAddr) -> Result<(), String> {
    let s = UdpSocket::bind(("0.0.0.0", from_port)).map_err(|e| e.to_string())?;
    s.connect(to).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    s.send(b"anyone there?").map_err(|e| e.to_string())?;
    match s.recv(&mut [0u8; 256]) {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Ok(()),
        Err(e) => Err(format!("{to}: {e} (no port unreachable)")),
        Ok(n) => Err(format!("{to}: an answer of {n} bytes")),
    }
}
