//! The model in the kernel's terms ([`Desired`]): frontend keys, load-balancing groups with
//! their backends and knobs, resolved endpoints; all the encoding of addresses, ports and
//! protocols into the maps' values is here. Pure.

use super::*;
use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use mesh_common::lb::{
    BackendState, EndpointIdle, FrontendKey, TaskPort, FE_HOST, FE_INGRESS, FE_VIP,
    TCP_IDLE_DEFAULT_S, UDP_IDLE_DEFAULT_S,
};

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
    /// Each local task port's idle timeouts, for flows that reach it through a tunnel.
    pub endpoint_idle: BTreeMap<TaskPort, EndpointIdle>,
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
    desired_with(model, resolve, &Claims::new(), &Reserved::default())
}

/// Published ports and who holds them.
pub type Claims = BTreeMap<(u16, Protocol), String>;

/// As [`desired`]; where two services claim one port, the holder in `prior` (the
/// claims applied last time, [`Desired::claims`]) keeps it, so that a newcomer never
/// takes a running service's port; a port in `reserved` is never published.
pub fn desired_with(
    model: &Model,
    mut resolve: impl FnMut(&str) -> Result<(u32, [u8; 6]), crate::MeshError>,
    prior: &Claims,
    reserved: &Reserved,
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
    let (admitted, problems) = admit(model, &local, prior, reserved);
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
    d.endpoint_idle = endpoint_idle(&d);
    Ok(d)
}

/// Each local task port's idle timeouts: its service's (the longest, should two groups
/// with different ones share the port: only in a hand-written model, a Swarm task is one
/// service's).
fn endpoint_idle(d: &Desired) -> BTreeMap<TaskPort, EndpointIdle> {
    let mut out: BTreeMap<TaskPort, EndpointIdle> = BTreeMap::new();
    for g in d.groups.values() {
        for (a, p) in g
            .backends
            .keys()
            .filter(|(a, _)| d.endpoints.contains_key(a))
        {
            let key = TaskPort {
                addr: u32::from_ne_bytes(a.octets()),
                port: p.to_be(),
                _pad: 0,
            };
            let t = out.entry(key).or_default();
            t.tcp_idle_s = t.tcp_idle_s.max(g.tcp_idle_s);
            t.udp_idle_s = t.udp_idle_s.max(g.udp_idle_s);
        }
    }
    out
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

pub(super) fn fe_key(addr: u32, port: u16, proto: u8) -> FrontendKey {
    FrontendKey {
        addr,
        port: port.to_be(),
        proto,
        _pad: 0,
    }
}
