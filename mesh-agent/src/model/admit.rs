//! What can be programmed (`admit`): claims held by their holder, else by name; the
//! problems left out of what is applied ([`Problem`]). Pure.

use super::*;
use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use serde::{Deserialize, Serialize};

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
    pub(super) fn new(
        service: &str,
        left_out: impl Into<String>,
        reason: impl std::fmt::Display,
    ) -> Self {
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

/// Swarm's cluster management port (managers, TCP).
pub const SWARM_CONTROL_PORT: u16 = 2377;
/// Swarm's gossip port (every node, TCP and UDP).
pub const SWARM_GOSSIP_PORT: u16 = 7946;

/// Ports a service may not publish: the node's own plumbing listens there, and a
/// frontend would hand its traffic (the agents' health polls, the swarm's gossip, the
/// overlay) to a task.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reserved(BTreeMap<(u16, Protocol), &'static str>);

impl Reserved {
    /// Swarm's own ports, the data-path port (UDP) and the agents' peer port (TCP; 0
    /// when the exchange is off).
    pub fn new(data_path_port: u16, peer_port: u16) -> Self {
        let mut r = BTreeMap::new();
        r.insert(
            (SWARM_CONTROL_PORT, Protocol::Tcp),
            "Swarm's cluster management port",
        );
        r.insert((SWARM_GOSSIP_PORT, Protocol::Tcp), "Swarm's gossip port");
        r.insert((SWARM_GOSSIP_PORT, Protocol::Udp), "Swarm's gossip port");
        r.insert(
            (data_path_port, Protocol::Udp),
            "the swarm's data-path (VXLAN) port",
        );
        if peer_port != 0 {
            r.insert((peer_port, Protocol::Tcp), "the mesh agents' peer port");
        }
        Reserved(r)
    }

    /// Why `port`/`proto` is reserved, if it is.
    pub fn why(&self, port: u16, proto: Protocol) -> Option<&'static str> {
        self.0.get(&(port, proto)).copied()
    }
}

impl Default for Reserved {
    /// The defaults: data-path port 4789, peer port 9478.
    fn default() -> Self {
        Reserved::new(
            mesh_common::proto::VXLAN_PORT_DEFAULT,
            mesh_common::proto::PEER_PORT_DEFAULT,
        )
    }
}

/// The part of `model` that can be programmed, and what was left out and why. One
/// service's fault never holds back another: a port two services claim stays with the
/// one that held it in `prior` (else the first by name), a backend the node cannot reach is left
/// out of its service alone, a published port in `reserved` is left out. `local`: the
/// addresses of this node's resolved endpoints.
pub fn admit(
    model: &Model,
    local: &BTreeSet<Ipv4Addr>,
    prior: &Claims,
    reserved: &Reserved,
) -> (Model, Vec<Problem>) {
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
            let reserved_why = |pp| Some((pp, reserved.why(pp, p.protocol)?));
            if let Some((port, why)) = p.published.and_then(reserved_why) {
                let e = ModelError::ReservedPort {
                    port,
                    proto: p.protocol.name(),
                    why,
                };
                problems.push(Problem::new(&svc.name, what, e));
                continue;
            }
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
