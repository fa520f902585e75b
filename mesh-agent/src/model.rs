//! The desired state of this node's datapath, as a user writes it (`mesh-agent --config
//! FILE`, YAML) or as the Docker source will derive it, and its translation into the
//! kernel's terms ([`Desired`]): frontends, load-balancing groups, endpoints. Pure.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use mesh_common::lb::{
    BackendState, FrontendKey, FE_HOST, FE_INGRESS, FE_VIP, PROTO_TCP, PROTO_UDP,
    TCP_IDLE_DEFAULT_S, UDP_IDLE_DEFAULT_S,
};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Model {
    /// Interface the published ports arrive on (the swarm's advertise address).
    #[serde(default)]
    pub underlay: Option<String>,
    /// This node's addresses: published ports answer on each.
    #[serde(default)]
    pub node_addrs: Vec<Ipv4Addr>,
    #[serde(default)]
    pub services: Vec<ServiceSpec>,
    /// Tasks running on this node.
    #[serde(default)]
    pub endpoints: Vec<EndpointSpec>,
    /// This node on the underlay (needed as soon as anything is on another node).
    #[serde(default)]
    pub node: Option<NodeSpec>,
    /// The other swarm nodes: VXLAN from anyone else is dropped.
    #[serde(default)]
    pub peers: Vec<PeerSpec>,
    /// Overlay networks this node is on.
    #[serde(default)]
    pub networks: Vec<NetworkSpec>,
    /// Tasks on other nodes that tasks here may reach directly (backends on other nodes
    /// are reachable without being listed here).
    #[serde(default)]
    pub remote_tasks: Vec<RemoteTaskSpec>,
    /// Local tasks' overlay veths (in Docker's namespace of each overlay network): the
    /// overlay hooks answer ARP for every-port VIPs there and balance flows to them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub overlay_ports: Vec<OverlayPortSpec>,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OverlayPortSpec {
    /// The overlay network's namespace (`<docker exec-root>/netns/1-<network id>`).
    pub netns: std::path::PathBuf,
    /// Host side of the task's veth there, and its index (a name is reused when a task
    /// is replaced; the index is not).
    pub interface: String,
    pub ifindex: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSpec {
    /// This node's underlay address (the swarm advertise address): outer source of VXLAN.
    pub addr: Ipv4Addr,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerSpec {
    pub addr: Ipv4Addr,
    /// Runs stock Docker (kernel VXLAN), not the mesh: flows to its tasks are SNATed.
    #[serde(default)]
    pub stock: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkSpec {
    pub name: String,
    /// Docker's `com.docker.network.driver.overlay.vxlanid_list`: the first subnet's
    /// VNI (the mesh's own tunnels use it)...
    pub vni: u32,
    /// ...and the other subnets' (a network created with `--subnet` twice), whose
    /// VXLAN is Docker's and must pass as the first one's does.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub more_vnis: Vec<u32>,
    /// This node's own address on the network (Docker's per-node endpoint, e.g. the
    /// ingress sandbox's): the source of flows SNATed toward stock nodes.
    pub local_addr: Ipv4Addr,
    /// Docker's kernel vxlan carries this network's traffic (a user overlay): the mesh
    /// leaves its VXLAN to it and balances only VIP flows, at the tasks' overlay veths.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub docker: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteTaskSpec {
    pub addr: Ipv4Addr,
    /// Underlay address of its node (one of `peers`).
    pub node: Ipv4Addr,
    /// Network it is reached on (default: the first of `networks`).
    #[serde(default)]
    pub network: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    pub name: String,
    #[serde(default)]
    pub ports: Vec<PortSpec>,
    /// Virtual IPs (one per network); each answers on every port's target port.
    #[serde(default)]
    pub vips: Vec<Ipv4Addr>,
    #[serde(default)]
    pub backends: Vec<BackendSpec>,
    /// Idle timeout of established TCP flows, seconds (default 8000).
    #[serde(default)]
    pub tcp_idle: Option<u32>,
    /// Idle timeout of UDP flows, seconds (default 300).
    #[serde(default)]
    pub udp_idle: Option<u32>,
    /// Client-IP affinity: every connection from one client address goes to one backend.
    #[serde(default)]
    pub affinity: bool,
    /// The VIPs take every port and protocol to the same port of a task, which the
    /// task reaches over Docker's overlay (Docker's own VIP behaviour; `ports` are not
    /// needed). Without it, a VIP answers on the ports' target ports, for tasks behind
    /// delivery veths.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub every_port: bool,
}

#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => PROTO_TCP,
            Protocol::Udp => PROTO_UDP,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PublishMode {
    /// Every node answers; any healthy task serves.
    #[default]
    Ingress,
    /// Only nodes with a task answer, and only their own tasks serve.
    Host,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortSpec {
    /// Published port; none for a port reachable only through the VIPs.
    #[serde(default)]
    pub published: Option<u16>,
    /// Port the tasks listen on.
    pub target: u16,
    #[serde(default = "tcp")]
    pub protocol: Protocol,
    #[serde(default)]
    pub mode: PublishMode,
}

fn tcp() -> Protocol {
    Protocol::Tcp
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// Takes new flows.
    #[default]
    Active,
    /// Keeps its flows, takes no new ones (the task is stopping).
    Draining,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendSpec {
    /// The task's address.
    pub addr: Ipv4Addr,
    #[serde(default)]
    pub state: Health,
    /// Underlay address of the node it runs on, when that is not this node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<Ipv4Addr>,
    /// Network it is reached on (default: the first of `networks`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// Docker's name of the task (`web.2.<task id>`), for people reading the mesh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointSpec {
    /// The task's address (as in its service's backends).
    pub addr: Ipv4Addr,
    /// Host side of the task's veth.
    pub interface: String,
    /// The task's MAC on that veth.
    pub mac: MacAddr,
    /// Address to DNAT to (default: `addr`).
    #[serde(default)]
    pub delivery_addr: Option<Ipv4Addr>,
}

/// A MAC address, written `02:42:0a:00:00:04`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl std::str::FromStr for MacAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() != 6 {
            return Err(format!(
                "{s:?} is not a MAC address (want six hex bytes like 02:42:0a:00:00:04)"
            ));
        }
        let mut m = [0u8; 6];
        for (i, p) in parts.iter().enumerate() {
            m[i] = u8::from_str_radix(p, 16)
                .map_err(|_| format!("{s:?} is not a MAC address: {p:?} is not a hex byte"))?;
        }
        Ok(MacAddr(m))
    }
}

impl std::fmt::Display for MacAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// Errors in a model: each names the service or endpoint and what to fix.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ModelError {
    #[error("service {0:?} is defined twice")]
    DuplicateService(String),
    #[error("service {service:?}: backend {addr} is listed twice")]
    DuplicateBackend { service: String, addr: Ipv4Addr },
    #[error("{what} {port}/{proto:?} is claimed by both {a:?} and {b:?}")]
    PortClash {
        what: &'static str,
        port: u16,
        proto: Protocol,
        a: String,
        b: String,
    },
    #[error("endpoint {0} is listed twice")]
    DuplicateEndpoint(Ipv4Addr),
    #[error("service {0:?}: port 0 is not a port")]
    PortZero(String),
    #[error("{what} {addr} is on node {node}, which is not in `peers`")]
    UnknownPeer {
        what: &'static str,
        addr: Ipv4Addr,
        node: Ipv4Addr,
    },
    #[error("{what} {addr}: no network {network:?} in `networks`")]
    UnknownNetwork {
        what: &'static str,
        addr: Ipv4Addr,
        network: String,
    },
    #[error("tasks on other nodes need `node:` (this node's underlay address) and `underlay:`")]
    NoNode,
    #[error("backend {0} is on this node but has no endpoint")]
    NoEndpoint(Ipv4Addr),
}

/// Identity of a load-balancing group: a service's target port, or one host-mode port
/// (whose group has only this node's tasks).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GroupName(pub String);

/// A load-balancing group: the backends (task address, port, state) and the knobs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Group {
    pub backends: BTreeMap<(Ipv4Addr, u16), BackendState>,
    pub tcp_idle_s: u32,
    pub udp_idle_s: u32,
    pub affinity: bool,
}

/// A local endpoint, with its interface resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResolvedEndpoint {
    pub ifindex: u32,
    pub host_mac: [u8; 6],
    pub mac: [u8; 6],
    pub delivery_addr: Ipv4Addr,
}

/// The kernel's view of a model.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    pub node_addrs: BTreeSet<Ipv4Addr>,
    /// Frontend -> (group, FE_* flags).
    pub frontends: BTreeMap<FrontendKey, (GroupName, u32)>,
    pub groups: BTreeMap<GroupName, Group>,
    pub endpoints: BTreeMap<Ipv4Addr, ResolvedEndpoint>,
    /// This node on the underlay.
    pub local: Option<mesh_common::lb::Local>,
    pub peers: BTreeMap<Ipv4Addr, u32>,
    pub networks: BTreeMap<u32, mesh_common::lb::Network>,
    /// Tasks on other nodes.
    pub tunnels: BTreeMap<Ipv4Addr, mesh_common::lb::Tunnel>,
    /// What the model asked for that cannot be programmed (left out of the above).
    pub problems: Vec<Problem>,
    /// The published ports programmed, and their services.
    pub claims: Claims,
}

/// Turns `model` into kernel terms; `resolve` gives an endpoint interface's (ifindex,
/// host-side MAC). What cannot be programmed is left out and listed in
/// [`Desired::problems`]; the rest is applied.
pub fn desired(
    model: &Model,
    resolve: impl FnMut(&str) -> Result<(u32, [u8; 6]), crate::MeshError>,
) -> Result<Desired, crate::MeshError> {
    desired_with(model, resolve, &Claims::new())
}

/// Published ports and who holds them.
pub type Claims = BTreeMap<(u16, Protocol), String>;

/// As [`desired`]; where two services claim one port, the holder in `prior` (the
/// claims applied last time, [`Desired::claims`]) keeps it, so that a newcomer never
/// takes a running service's port.
pub fn desired_with(
    model: &Model,
    mut resolve: impl FnMut(&str) -> Result<(u32, [u8; 6]), crate::MeshError>,
    prior: &Claims,
) -> Result<Desired, crate::MeshError> {
    let mut d = Desired {
        node_addrs: model.node_addrs.iter().copied().collect(),
        ..Default::default()
    };
    let mut eps = BTreeSet::new();
    for ep in &model.endpoints {
        if !eps.insert(ep.addr) {
            return Err(ModelError::DuplicateEndpoint(ep.addr).into());
        }
        // A veth gone between listing and applying costs only its task.
        let (ifindex, host_mac) = match resolve(&ep.interface) {
            Ok(r) => r,
            Err(e) => {
                d.problems
                    .push(Problem::new("", format!("endpoint {}", ep.addr), e));
                continue;
            }
        };
        d.endpoints.insert(
            ep.addr,
            ResolvedEndpoint {
                ifindex,
                host_mac,
                mac: ep.mac.0,
                delivery_addr: ep.delivery_addr.unwrap_or(ep.addr),
            },
        );
    }
    let local: BTreeSet<Ipv4Addr> = d.endpoints.keys().copied().collect();
    let (admitted, problems) = admit(model, &local, prior);
    d.problems.extend(problems);
    d.claims = admitted
        .services
        .iter()
        .flat_map(|s| {
            s.ports
                .iter()
                .filter_map(|p| Some(((p.published?, p.protocol), s.name.clone())))
        })
        .collect();
    let model = &admitted;
    overlay(model, &mut d, &mut resolve)?;
    for svc in &model.services {
        let backends = |port: u16, local_only: bool| -> BTreeMap<(Ipv4Addr, u16), BackendState> {
            svc.backends
                .iter()
                .filter(|b| !local_only || (b.node.is_none() && d.endpoints.contains_key(&b.addr)))
                .map(|b| {
                    let st = match b.state {
                        Health::Active => BackendState::Active,
                        Health::Draining => BackendState::Draining,
                    };
                    ((b.addr, port), st)
                })
                .collect()
        };
        let group = |backends| Group {
            backends,
            tcp_idle_s: svc.tcp_idle.unwrap_or(TCP_IDLE_DEFAULT_S),
            udp_idle_s: svc.udp_idle.unwrap_or(UDP_IDLE_DEFAULT_S),
            affinity: svc.affinity,
        };
        if svc.every_port && !svc.vips.is_empty() {
            // Port 0 in the group: the port the client dialled.
            let name = GroupName(format!("{}/vip", svc.name).to_lowercase());
            d.groups.insert(name.clone(), group(backends(0, false)));
            for vip in &svc.vips {
                d.frontends.insert(
                    mesh_common::lb::any_port_vip(u32::from_ne_bytes(vip.octets())),
                    (name.clone(), FE_VIP),
                );
            }
        }
        for p in &svc.ports {
            let proto = p.protocol.number();
            let shared =
                GroupName(format!("{}/{:?}/{}", svc.name, p.protocol, p.target).to_lowercase());
            if !svc.vips.is_empty() || p.mode == PublishMode::Ingress {
                d.groups
                    .entry(shared.clone())
                    .or_insert_with(|| group(backends(p.target, false)));
            }
            for vip in svc.vips.iter().filter(|_| !svc.every_port) {
                d.frontends.insert(
                    fe_key(u32::from_ne_bytes(vip.octets()), p.target, proto),
                    (shared.clone(), FE_VIP),
                );
            }
            let Some(published) = p.published else {
                continue;
            };
            match p.mode {
                PublishMode::Ingress => {
                    d.frontends
                        .insert(fe_key(0, published, proto), (shared.clone(), FE_INGRESS));
                }
                PublishMode::Host => {
                    let local = backends(p.target, true);
                    // A node without a task of the service does not claim the port.
                    if local.is_empty() {
                        continue;
                    }
                    let name = GroupName(
                        format!("{}/host/{:?}/{}", svc.name, p.protocol, published).to_lowercase(),
                    );
                    d.groups.insert(name.clone(), group(local));
                    d.frontends
                        .insert(fe_key(0, published, proto), (name, FE_HOST));
                }
            }
        }
    }
    Ok(d)
}

/// Peers, networks, this node, and a tunnel for every task on another node.
fn overlay(
    model: &Model,
    d: &mut Desired,
    resolve: &mut impl FnMut(&str) -> Result<(u32, [u8; 6]), crate::MeshError>,
) -> Result<(), crate::MeshError> {
    use mesh_common::lb::{Local, Network, Tunnel, PEER_MESH, PEER_STOCK, TUN_STOCK};
    let ne = |a: Ipv4Addr| u32::from_ne_bytes(a.octets());
    for p in &model.peers {
        d.peers
            .insert(p.addr, if p.stock { PEER_STOCK } else { PEER_MESH });
    }
    for n in &model.networks {
        for vni in std::iter::once(n.vni).chain(n.more_vnis.iter().copied()) {
            d.networks.insert(
                vni,
                Network {
                    local_addr: ne(n.local_addr),
                    flags: if n.docker {
                        mesh_common::lb::NET_DOCKER
                    } else {
                        0
                    },
                },
            );
        }
    }
    let remote = model
        .services
        .iter()
        .flat_map(|s| &s.backends)
        .filter_map(|b| {
            b.node
                .map(|node| ("backend", b.addr, node, b.network.clone()))
        })
        .chain(
            model
                .remote_tasks
                .iter()
                .map(|t| ("remote task", t.addr, t.node, t.network.clone())),
        );
    for (what, addr, node, network) in remote {
        let Some(flags) = d.peers.get(&node).copied() else {
            return Err(ModelError::UnknownPeer { what, addr, node }.into());
        };
        let net = match &network {
            Some(name) => model.networks.iter().find(|n| &n.name == name),
            None => model.networks.first(),
        };
        let Some(net) = net else {
            return Err(ModelError::UnknownNetwork {
                what,
                addr,
                network: network.unwrap_or_default(),
            }
            .into());
        };
        d.tunnels.insert(
            addr,
            Tunnel {
                node: ne(node),
                vni: net.vni,
                flags: if flags & PEER_STOCK != 0 {
                    TUN_STOCK
                } else {
                    0
                },
                _pad: 0,
            },
        );
    }
    if let Some(node) = &model.node {
        let Some(underlay) = &model.underlay else {
            return Err(ModelError::NoNode.into());
        };
        let (ifindex, _) = resolve(underlay)?;
        d.local = Some(Local {
            ifindex,
            addr: ne(node.addr),
        });
    } else if !d.tunnels.is_empty() {
        return Err(ModelError::NoNode.into());
    }
    for b in model.services.iter().flat_map(|s| &s.backends) {
        if b.node.is_none() && !d.endpoints.contains_key(&b.addr) {
            return Err(ModelError::NoEndpoint(b.addr).into());
        }
    }
    Ok(())
}

fn fe_key(addr: u32, port: u16, proto: u8) -> FrontendKey {
    FrontendKey {
        addr,
        port: port.to_be(),
        proto,
        _pad: 0,
    }
}

/// What the agent could not program, left out of what it applies (logged once,
/// counted, shown by `meshctl doctor`); everything else in the model is applied.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Problem {
    /// The service ("" for a part of the node's plumbing).
    pub service: String,
    /// What was left out: "port 8080/tcp", "backend 10.0.0.5", "the service".
    pub left_out: String,
    pub reason: String,
}

impl Problem {
    fn new(service: &str, left_out: impl Into<String>, reason: impl std::fmt::Display) -> Self {
        Problem {
            service: service.into(),
            left_out: left_out.into(),
            reason: reason.to_string(),
        }
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.service.is_empty() {
            write!(f, "{} left out: {}", self.left_out, self.reason)
        } else {
            write!(
                f,
                "service {:?}: {} left out: {}",
                self.service, self.left_out, self.reason
            )
        }
    }
}

/// The part of `model` that can be programmed, and what was left out and why. One
/// service's fault never holds back another: a port two services claim stays with the
/// one that held it in `prior` (else the first by name), a backend the node cannot reach is left
/// out of its service alone. `local`: the addresses of this node's resolved endpoints.
pub fn admit(model: &Model, local: &BTreeSet<Ipv4Addr>, prior: &Claims) -> (Model, Vec<Problem>) {
    let mut problems = Vec::new();
    let mut out = Model {
        services: Vec::new(),
        remote_tasks: Vec::new(),
        ..model.clone()
    };
    let peers: BTreeSet<Ipv4Addr> = model.peers.iter().map(|p| p.addr).collect();
    let networks: BTreeSet<&str> = model.networks.iter().map(|n| n.name.as_str()).collect();
    // Where a task on another node is reached; `None` when it cannot be.
    let unreachable = |what: &'static str, addr, node, network: &Option<String>| {
        if !peers.contains(&node) {
            return Some(ModelError::UnknownPeer { what, addr, node });
        }
        match network {
            Some(n) if !networks.contains(n.as_str()) => Some(ModelError::UnknownNetwork {
                what,
                addr,
                network: n.clone(),
            }),
            None if networks.is_empty() => Some(ModelError::UnknownNetwork {
                what,
                addr,
                network: String::new(),
            }),
            _ => None,
        }
    };
    // A port stays with its holder while the holder still asks for it; the rest is
    // settled by name.
    let mut order: Vec<&ServiceSpec> = model.services.iter().collect();
    order.sort_by_key(|s| s.name.as_str());
    let mut names = BTreeSet::new();
    let mut published: BTreeMap<(u16, Protocol), &str> = prior
        .iter()
        .filter(|((port, proto), holder)| {
            model.services.iter().any(|s| {
                &s.name == *holder
                    && s.ports
                        .iter()
                        .any(|p| p.published == Some(*port) && p.protocol == *proto)
            })
        })
        .map(|(k, v)| (*k, v.as_str()))
        .collect();
    let mut vip_ports: BTreeMap<(Ipv4Addr, u16, Protocol), &str> = BTreeMap::new();
    for svc in order {
        if !names.insert(svc.name.as_str()) {
            let e = ModelError::DuplicateService(svc.name.clone());
            problems.push(Problem::new(&svc.name, "a second definition", e));
            continue;
        }
        let mut s = ServiceSpec {
            ports: Vec::new(),
            backends: Vec::new(),
            ..svc.clone()
        };
        let mut seen = BTreeSet::new();
        for b in &svc.backends {
            let what = format!("backend {}", b.addr);
            let fault = if !seen.insert(b.addr) {
                Some(ModelError::DuplicateBackend {
                    service: svc.name.clone(),
                    addr: b.addr,
                })
            } else if let Some(node) = b.node {
                unreachable("backend", b.addr, node, &b.network)
            } else if !local.contains(&b.addr) {
                Some(ModelError::NoEndpoint(b.addr))
            } else {
                None
            };
            match fault {
                Some(e) => problems.push(Problem::new(&svc.name, what, e)),
                None => s.backends.push(b.clone()),
            }
        }
        for p in &svc.ports {
            // The same port written twice (Docker lists a port once per protocol) is one.
            if s.ports.contains(p) {
                continue;
            }
            let what = format!(
                "port {}/{}",
                p.published.unwrap_or(p.target),
                format!("{:?}", p.protocol).to_lowercase()
            );
            if p.target == 0 || p.published == Some(0) {
                let e = ModelError::PortZero(svc.name.clone());
                problems.push(Problem::new(&svc.name, what, e));
                continue;
            }
            let clash = |what: &'static str, port, other: &str| ModelError::PortClash {
                what,
                port,
                proto: p.protocol,
                a: other.into(),
                b: svc.name.clone(),
            };
            if let Some(pp) = p.published {
                match published.get(&(pp, p.protocol)) {
                    Some(other) if *other != svc.name => {
                        let e = clash("published port", pp, other);
                        problems.push(Problem::new(&svc.name, what, e));
                        continue;
                    }
                    _ => {}
                }
            }
            let taken = svc.vips.iter().find_map(|v| {
                vip_ports
                    .get(&(*v, p.target, p.protocol))
                    .filter(|o| **o != svc.name)
            });
            if let Some(other) = taken {
                let e = clash("VIP port", p.target, other);
                problems.push(Problem::new(&svc.name, what, e));
                continue;
            }
            if let Some(pp) = p.published {
                published.insert((pp, p.protocol), &svc.name);
            }
            for v in &svc.vips {
                vip_ports.insert((*v, p.target, p.protocol), &svc.name);
            }
            s.ports.push(p.clone());
        }
        out.services.push(s);
    }
    // Back in the model's order: the planner's output does not depend on it, people do.
    out.services.sort_by_key(|s| {
        model
            .services
            .iter()
            .position(|m| m.name == s.name)
            .unwrap_or(usize::MAX)
    });
    for t in &model.remote_tasks {
        match unreachable("remote task", t.addr, t.node, &t.network) {
            Some(e) => problems.push(Problem::new("", format!("remote task {}", t.addr), e)),
            None => out.remote_tasks.push(t.clone()),
        }
    }
    problems.sort();
    problems.dedup();
    (out, problems)
}

/// Writes a model as YAML (the `--config` format).
pub fn to_yaml(model: &Model) -> String {
    serde_yaml_ng::to_string(model).expect("a model always serialises")
}

/// Reads a model from YAML.
pub fn from_yaml(text: &str) -> Result<Model, String> {
    serde_yaml_ng::from_str(text).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const YAML: &str = r#"
underlay: eth0
node_addrs: [192.168.1.10]
services:
  - name: web
    ports:
      - {published: 8080, target: 80}
      - {published: 8081, target: 80, mode: host}
      - {published: 5353, target: 53, protocol: udp}
    vips: [10.0.1.2]
    backends:
      - {addr: 10.0.1.4}
      - {addr: 10.0.1.5, state: draining, node: 192.168.1.11}
      - {addr: 10.0.1.6, node: 192.168.1.12}
    tcp_idle: 86400
    affinity: true
endpoints:
  - {addr: 10.0.1.4, interface: veth4, mac: "02:42:0a:00:01:04"}
node: {addr: 192.168.1.10}
peers: [{addr: 192.168.1.11}, {addr: 192.168.1.12, stock: true}]
networks: [{name: ingress, vni: 4096, local_addr: 10.0.1.2}]
"#;

    fn resolve(name: &str) -> Result<(u32, [u8; 6]), crate::MeshError> {
        Ok((name.len() as u32, [2, 0, 0, 0, 0, 1]))
    }

    #[test]
    fn yaml_to_desired() {
        let m = from_yaml(YAML).unwrap();
        let d = desired(&m, resolve).unwrap();
        assert_eq!(d.node_addrs.len(), 1);
        // 8080 (ingress), 8081 (host), 5353/udp, VIP:80/tcp, VIP:53/udp.
        assert_eq!(d.frontends.len(), 5);
        let (g, flags) = &d.frontends[&fe_key(0, 8081, PROTO_TCP)];
        assert_eq!(*flags, FE_HOST);
        // Host mode: only the local task.
        assert_eq!(d.groups[g].backends.len(), 1);
        assert!(d.groups[g]
            .backends
            .contains_key(&("10.0.1.4".parse().unwrap(), 80)));
        let (g, flags) = &d.frontends[&fe_key(0, 8080, PROTO_TCP)];
        assert_eq!(*flags, FE_INGRESS);
        let grp = &d.groups[g];
        assert_eq!(grp.backends.len(), 3);
        assert_eq!(
            grp.backends[&("10.0.1.5".parse().unwrap(), 80)],
            BackendState::Draining
        );
        assert_eq!(grp.tcp_idle_s, 86400);
        assert_eq!(grp.udp_idle_s, UDP_IDLE_DEFAULT_S);
        assert!(grp.affinity);
        // The overlay: two tunnels, the stock node's flagged; this node's underlay.
        assert_eq!(d.tunnels.len(), 2);
        let stock = d.tunnels[&"10.0.1.6".parse().unwrap()];
        assert_eq!(stock.flags, mesh_common::lb::TUN_STOCK);
        assert_eq!(stock.vni, 4096);
        assert_eq!(d.local.unwrap().addr, u32::from_ne_bytes([192, 168, 1, 10]));
        assert_eq!(
            d.local.unwrap().ifindex,
            4,
            "resolved from `underlay: eth0`"
        );
        let vip = u32::from_ne_bytes([10, 0, 1, 2]);
        assert_eq!(
            d.frontends[&fe_key(vip, 80, PROTO_TCP)].0,
            *g,
            "VIP shares the ingress group"
        );
        assert_eq!(d.endpoints.len(), 1);
    }

    /// The README's example is a valid model.
    #[test]
    fn readme_example_is_valid() {
        let readme = include_str!("../../README.md");
        let start = readme.find("```yaml\n").expect("a yaml block in README") + 8;
        let end = start + readme[start..].find("```").unwrap();
        let m = from_yaml(&readme[start..end]).unwrap_or_else(|e| panic!("README model: {e}"));
        let d = desired(&m, resolve).unwrap_or_else(|e| panic!("README model: {e}"));
        assert!(!d.frontends.is_empty() && !d.tunnels.is_empty());
    }

    #[test]
    fn yaml_round_trips() {
        let m = from_yaml(YAML).unwrap();
        assert_eq!(from_yaml(&to_yaml(&m)).unwrap(), m);
    }

    #[test]
    fn host_mode_port_without_local_task_is_not_claimed() {
        let mut m = from_yaml(YAML).unwrap();
        m.endpoints.clear();
        m.services[0].backends[0].node = Some("192.168.1.11".parse().unwrap());
        let d = desired(&m, resolve).unwrap();
        assert!(!d.frontends.contains_key(&fe_key(0, 8081, PROTO_TCP)));
        assert!(d.frontends.contains_key(&fe_key(0, 8080, PROTO_TCP)));
    }

    /// Problems name what to fix, and cost only what they concern.
    #[test]
    fn errors_name_what_to_fix_and_leave_the_rest() {
        let problems = |m: &Model| -> (Desired, String) {
            let d = desired(m, resolve).unwrap();
            let text = d
                .problems
                .iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join("; ");
            (d, text)
        };
        let mut m = from_yaml(YAML).unwrap();
        m.services.push(m.services[0].clone());
        let (d, e) = problems(&m);
        assert!(e.contains("\"web\" is defined twice"), "{e}");
        assert!(
            d.frontends.contains_key(&fe_key(0, 8080, PROTO_TCP)),
            "the first stays"
        );

        let mut m = from_yaml(YAML).unwrap();
        let mut other = m.services[0].clone();
        other.name = "www".into();
        other.vips.clear();
        other.ports.push(PortSpec {
            published: Some(9000),
            target: 90,
            protocol: Protocol::Tcp,
            mode: PublishMode::Ingress,
        });
        m.services.push(other);
        let (d, e) = problems(&m);
        assert!(
            e.contains("published port 8080") && e.contains("\"www\": port 8080/tcp left out"),
            "{e}"
        );
        // `www` loses only the ports `web` holds (first by name); `web` keeps them, `www` its own.
        assert_eq!(d.frontends[&fe_key(0, 8080, PROTO_TCP)].0 .0, "web/tcp/80");
        assert_eq!(d.frontends[&fe_key(0, 9000, PROTO_TCP)].0 .0, "www/tcp/90");
        // A service applied before keeps its port against a newcomer, whatever the names.
        let prior = Claims::from([((8080, Protocol::Tcp), "www".to_string())]);
        let d = desired_with(&m, resolve, &prior).unwrap();
        // And again with what that apply held: stable (no flip back by name).
        let d = desired_with(&m, resolve, &d.claims).unwrap();
        assert_eq!(d.frontends[&fe_key(0, 8080, PROTO_TCP)].0 .0, "www/tcp/80");

        let mut m = from_yaml(YAML).unwrap();
        m.services[0].backends[1].node = Some("192.168.1.99".parse().unwrap());
        let (d, e) = problems(&m);
        assert!(
            e.contains("backend 10.0.1.5 left out: backend 10.0.1.5 is on node 192.168.1.99, which is not in `peers`"),
            "{e}"
        );
        assert_eq!(d.groups[&GroupName("web/tcp/80".into())].backends.len(), 2);

        let mut m = from_yaml(YAML).unwrap();
        m.services[0].backends[0].addr = "10.0.1.40".parse().unwrap();
        let (_, e) = problems(&m);
        assert!(
            e.contains("10.0.1.40 is on this node but has no endpoint"),
            "{e}"
        );

        // An interface that cannot be resolved costs its endpoint (and so its backend).
        let m = from_yaml(YAML).unwrap();
        let d = desired(&m, |name| {
            if name == "veth4" {
                Err(crate::MeshError::NoSuchInterface { name: name.into() })
            } else {
                resolve(name)
            }
        })
        .unwrap();
        assert!(d.endpoints.is_empty());
        assert_eq!(d.problems.len(), 2, "{:?}", d.problems);
        assert!(d.frontends.contains_key(&fe_key(0, 8080, PROTO_TCP)));

        let mut m = from_yaml(YAML).unwrap();
        m.endpoints.push(m.endpoints[0].clone());
        let e = desired(&m, resolve).unwrap_err().to_string();
        assert!(e.contains("endpoint 10.0.1.4 is listed twice"), "{e}");

        let e = from_yaml("services: [{name: x, portz: []}]").unwrap_err();
        assert!(e.contains("unknown field `portz`"), "{e}");
        let e = from_yaml("endpoints: [{addr: 10.0.0.1, interface: v, mac: zz}]").unwrap_err();
        assert!(e.contains("not a MAC address"), "{e}");
    }

    /// `-p 5353:53/tcp -p 5353:53/udp` (every DNS server): one service, both protocols,
    /// and a port written twice is one port, not a clash with itself.
    #[test]
    fn one_port_on_tcp_and_udp() {
        let mut m = from_yaml(YAML).unwrap();
        let p = |protocol| PortSpec {
            published: Some(5300),
            target: 53,
            protocol,
            mode: PublishMode::Ingress,
        };
        m.services[0].ports = vec![
            p(Protocol::Tcp),
            p(Protocol::Udp),
            p(Protocol::Tcp),
            p(Protocol::Udp),
        ];
        let d = desired(&m, resolve).unwrap();
        assert!(d.problems.is_empty(), "{:?}", d.problems);
        assert!(d.frontends.contains_key(&fe_key(0, 5300, PROTO_TCP)));
        assert!(d.frontends.contains_key(&fe_key(0, 5300, PROTO_UDP)));
        // Across services: TCP in one, UDP in the other.
        let mut other = m.services[0].clone();
        other.name = "dns-udp".into();
        other.vips.clear();
        other.ports = vec![PortSpec {
            published: Some(5301),
            ..p(Protocol::Udp)
        }];
        m.services[0].ports = vec![PortSpec {
            published: Some(5301),
            ..p(Protocol::Tcp)
        }];
        m.services.push(other);
        let d = desired(&m, resolve).unwrap();
        assert!(d.problems.is_empty(), "{:?}", d.problems);
        assert_eq!(d.frontends[&fe_key(0, 5301, PROTO_TCP)].0 .0, "web/tcp/53");
        assert_eq!(
            d.frontends[&fe_key(0, 5301, PROTO_UDP)].0 .0,
            "dns-udp/udp/53"
        );
    }
}
