//! A namespace cluster: three mesh nodes and one "stock Docker" node (Linux's vxlan
//! device and a bridge, configured as Docker's overlay namespace is) on an underlay
//! bridge, a client on the same underlay, one task per node on the overlay 10.0.0.0/24
//! (VNI 4096, data-path port 4789).
//!
//! ```text
//!  ul: bridge br0 --- c  (10.230.0.100)
//!                 --- n1 (10.230.0.1) --h1-- t1 (10.0.0.11)   overlay endpoint 10.0.0.2
//!                 --- n2 (10.230.0.2) --h2-- t2 (10.0.0.12)   overlay endpoint 10.0.0.3
//!                 --- n3 (10.230.0.3) --h3-- t3 (10.0.0.13)   overlay endpoint 10.0.0.4
//!                 --- s4 (10.230.0.4) vx0+br0 -- t4 (10.0.0.14)   stock: kernel VXLAN
//! ```
//!
//! Every task runs the HTTP servers of [`crate::lbtopo`] (`<task> <peer>` on :80).

use std::net::Ipv4Addr;

use mesh_agent::model::{
    BackendSpec, EndpointSpec, Health, MacAddr, Model, NetworkSpec, NodeSpec, PeerSpec, PortSpec,
    Protocol, PublishMode, RemoteTaskSpec, ServiceSpec,
};

use crate::{
    lbtopo::{plug_task, Servers},
    netns::Netns,
};

pub const VNI: u32 = 4096;
pub const CLIENT: &str = "10.230.0.100";
pub const NODES: [&str; 4] = ["10.230.0.1", "10.230.0.2", "10.230.0.3", "10.230.0.4"];
pub const TASKS: [&str; 4] = ["10.0.0.11", "10.0.0.12", "10.0.0.13", "10.0.0.14"];
/// Each node's own endpoint on the overlay (Docker's ingress sandbox address).
pub const NODE_OVERLAY: [&str; 4] = ["10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5"];
pub const VIP: &str = "10.0.1.10";
pub const GATEWAY: &str = "10.0.0.1";

pub fn docker_mac(a: &str) -> [u8; 6] {
    let o = a.parse::<Ipv4Addr>().unwrap().octets();
    [0x02, 0x42, o[0], o[1], o[2], o[3]]
}

fn mac_str(m: [u8; 6]) -> String {
    MacAddr(m).to_string()
}

/// Task `t` as a healthy backend in node `i`'s model (on another node unless t == i).
pub fn backend(i: usize, t: usize) -> BackendSpec {
    let ip = |a: &str| a.parse::<Ipv4Addr>().unwrap();
    BackendSpec {
        addr: ip(TASKS[t]),
        state: Health::Active,
        node: (t != i).then(|| ip(NODES[t])),
        network: None,
        task: None,
    }
}

pub struct Cluster {
    pub servers: Servers,
    pub c: Netns,
    /// n1..n3 (mesh), s4 (stock).
    pub nodes: Vec<Netns>,
    /// t1..t4.
    pub tasks: Vec<Netns>,
    pub ul: Netns,
}

impl Cluster {
    pub fn new(tag: &str) -> Cluster {
        let ul = Netns::new(&format!("{tag}ul"));
        ul.ip(&["link", "add", "br0", "type", "bridge"]);
        ul.ip(&["link", "set", "br0", "up"]);
        let c = Netns::new(&format!("{tag}c"));
        let nodes: Vec<Netns> = (1..=4).map(|i| Netns::new(&format!("{tag}n{i}"))).collect();
        let tasks: Vec<Netns> = (1..=4).map(|i| Netns::new(&format!("{tag}t{i}"))).collect();
        for ns in std::iter::once(&c).chain(&nodes).chain(&tasks) {
            ns.exec(&["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"]);
            ns.exec(&["sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1"]);
        }
        let plug = |ns: &Netns, port: &str, addr: &str| {
            ns.ip(&[
                "link",
                "add",
                "u",
                "type",
                "veth",
                "peer",
                "name",
                port,
                "netns",
                ul.name(),
            ]);
            ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", "u"]);
            ns.ip(&["link", "set", "u", "up"]);
            ul.ip(&["link", "set", port, "master", "br0"]);
            ul.ip(&["link", "set", port, "up"]);
        };
        plug(&c, "pc", CLIENT);
        for (i, n) in nodes.iter().enumerate() {
            plug(n, &format!("p{}", i + 1), NODES[i]);
        }
        // Mesh nodes: each task on a veth, /32 with a default route via the gateway
        // address every host side holds; overlay MTU 1450 as Docker sets it.
        for i in 0..3 {
            let h = format!("h{}", i + 1);
            plug_task(
                &nodes[i],
                &tasks[i],
                &h,
                TASKS[i],
                docker_mac(TASKS[i]),
                GATEWAY,
                1450,
            );
        }
        // The stock node, as Docker's overlay namespace is: a bridge with the kernel's
        // vxlan device (VNI 4096, port 4789, learning off) and the task's veth; static
        // FDB and neighbour entries for every remote endpoint.
        let (s, t4) = (&nodes[3], &tasks[3]);
        s.ip(&["link", "add", "br0", "type", "bridge"]);
        s.ip(&[
            "link",
            "add",
            "vx0",
            "mtu",
            "1450",
            "type",
            "vxlan",
            "id",
            &VNI.to_string(),
            "dstport",
            "4789",
            "local",
            NODES[3],
            "dev",
            "u",
            "nolearning",
        ]);
        s.ip(&["link", "set", "vx0", "master", "br0"]);
        t4.ip(&[
            "link",
            "add",
            "eth0",
            "address",
            &mac_str(docker_mac(TASKS[3])),
            "mtu",
            "1450",
            "type",
            "veth",
            "peer",
            "name",
            "h4",
            "netns",
            s.name(),
        ]);
        t4.ip(&["addr", "add", &format!("{}/24", TASKS[3]), "dev", "eth0"]);
        t4.ip(&["link", "set", "eth0", "up"]);
        s.ip(&["link", "set", "h4", "master", "br0"]);
        for dev in ["vx0", "h4", "br0"] {
            s.ip(&["link", "set", dev, "up"]);
        }
        for i in 0..3 {
            for addr in [TASKS[i], NODE_OVERLAY[i]] {
                let mac = mac_str(docker_mac(addr));
                s.exec(&[
                    "bridge",
                    "fdb",
                    "add",
                    &mac,
                    "dev",
                    "vx0",
                    "dst",
                    NODES[i],
                    "self",
                    "permanent",
                ]);
                t4.ip(&[
                    "neigh",
                    "add",
                    addr,
                    "lladdr",
                    &mac,
                    "dev",
                    "eth0",
                    "nud",
                    "permanent",
                ]);
            }
        }
        let servers = Servers::new();
        for t in &tasks {
            let i = tasks.iter().position(|x| std::ptr::eq(x, t)).unwrap();
            servers.serve(t, &format!("t{}", i + 1));
        }
        Cluster {
            servers,
            c,
            nodes,
            tasks,
            ul,
        }
    }

    /// The model mesh node `i` (0..3) applies: `web` (8080 -> 80) over t1..t3 and VIP
    /// 10.0.1.10, `stock` (8085 -> 80) over t4 on the stock node, `remote` (8086 -> 80)
    /// and `iperf` (5201) over t2 only, `echo` (7000) over t1..t3. `present[t]` says
    /// whether task t is still listed.
    pub fn model(&self, i: usize, present: &[bool; 3]) -> Model {
        let ip = |a: &str| a.parse::<Ipv4Addr>().unwrap();
        let backend = |t: usize| backend(i, t);
        let port = |published: u16| PortSpec {
            published: Some(published),
            target: 80,
            protocol: Protocol::Tcp,
            mode: PublishMode::Ingress,
        };
        let svc = |name: &str, published: u16, vips: Vec<Ipv4Addr>, backends: Vec<BackendSpec>| {
            ServiceSpec {
                name: name.into(),
                ports: vec![port(published)],
                vips,
                backends,
                tcp_idle: None,
                udp_idle: None,
                affinity: false,
                every_port: false,
            }
        };
        let web: Vec<BackendSpec> = (0..3).filter(|t| present[*t]).map(backend).collect();
        Model {
            underlay: Some("u".into()),
            node_addrs: vec![ip(NODES[i])],
            services: vec![
                svc("web", 8080, vec![ip(VIP)], web),
                svc("stock", 8085, vec![], vec![backend(3)]),
                svc(
                    "remote",
                    8086,
                    vec![],
                    if present[1] { vec![backend(1)] } else { vec![] },
                ),
                ServiceSpec {
                    ports: vec![PortSpec {
                        published: Some(5201),
                        target: 5201,
                        protocol: Protocol::Tcp,
                        mode: PublishMode::Ingress,
                    }],
                    ..svc(
                        "iperf",
                        0,
                        vec![],
                        if present[1] { vec![backend(1)] } else { vec![] },
                    )
                },
                ServiceSpec {
                    ports: vec![PortSpec {
                        published: Some(7000),
                        target: 7000,
                        protocol: Protocol::Tcp,
                        mode: PublishMode::Ingress,
                    }],
                    ..svc(
                        "echo",
                        0,
                        vec![],
                        (0..3).filter(|t| present[*t]).map(backend).collect(),
                    )
                },
            ],
            endpoints: vec![EndpointSpec {
                addr: ip(TASKS[i]),
                interface: format!("h{}", i + 1),
                mac: MacAddr(docker_mac(TASKS[i])),
                delivery_addr: None,
            }],
            node: Some(NodeSpec { addr: ip(NODES[i]) }),
            peers: (0..4)
                .filter(|p| *p != i)
                .map(|p| PeerSpec {
                    addr: ip(NODES[p]),
                    stock: p == 3,
                })
                .collect(),
            networks: vec![NetworkSpec {
                name: "ingress".into(),
                vni: VNI,
                more_vnis: vec![],
                subnets: vec![],
                local_addr: ip(NODE_OVERLAY[i]),
                docker: false,
            }],
            remote_tasks: vec![RemoteTaskSpec {
                addr: ip(TASKS[3]),
                node: ip(NODES[3]),
                network: None,
            }],
            overlay_ports: vec![],
        }
    }
}

impl Cluster {
    /// Linux's own VXLAN between nodes 1 and 2 (VNI 5000, port 4790, so the mesh's
    /// programs see it as plain UDP), and routes that send the client's traffic for t2
    /// through it both ways: the baseline the mesh's overlay is measured against.
    pub fn kernel_vxlan_path(&self) {
        for (i, (me, other, addr)) in [(0, 1, "10.99.0.1"), (1, 0, "10.99.0.2")]
            .into_iter()
            .enumerate()
        {
            let n = &self.nodes[me];
            n.ip(&[
                "link",
                "add",
                "vxk",
                "mtu",
                "1450",
                "type",
                "vxlan",
                "id",
                "5000",
                "dstport",
                "4790",
                "local",
                NODES[me],
                "dev",
                "u",
                "nolearning",
            ]);
            n.ip(&["addr", "add", &format!("{addr}/24"), "dev", "vxk"]);
            n.ip(&["link", "set", "vxk", "up"]);
            n.exec(&[
                "bridge",
                "fdb",
                "append",
                "00:00:00:00:00:00",
                "dev",
                "vxk",
                "dst",
                NODES[other],
            ]);
            n.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
            let _ = i;
        }
        self.c
            .ip(&["route", "add", &format!("{}/32", TASKS[1]), "via", NODES[0]]);
        self.nodes[0].ip(&[
            "route",
            "add",
            &format!("{}/32", TASKS[1]),
            "via",
            "10.99.0.2",
            "dev",
            "vxk",
        ]);
        self.nodes[1].ip(&[
            "route",
            "add",
            &format!("{CLIENT}/32"),
            "via",
            "10.99.0.1",
            "dev",
            "vxk",
        ]);
    }
}
