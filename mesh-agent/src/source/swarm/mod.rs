//! The Swarm as every node sees it, and what the mesh makes of it. Pure.
//!
//! The source is Docker's gossiped view of each overlay network (`GET /networks/{id}
//! ?verbose=true`), which every node has, workers included (only managers answer
//! /services and /tasks): per service its VIP on the network, its ports, and the tasks
//! Docker considers up (running, and healthy when they have a HEALTHCHECK), each with its
//! address and the underlay address of its node; plus the network's peers.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use ipnetwork::Ipv4Network;
use serde::Deserialize;

use crate::model::{
    BackendSpec, Health, Model, NetworkSpec, NodeSpec, PeerSpec, PortSpec, Protocol, PublishMode,
    ServiceSpec,
};

mod labels;
mod settle;

pub use labels::*;
pub use settle::*;

/// One overlay network as this node sees it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NetworkView {
    /// Docker's network id.
    pub id: String,
    pub name: String,
    pub ingress: bool,
    /// One VNI per subnet (`vxlanid_list`), the first subnet's first; empty: unknown.
    pub vnis: Vec<u32>,
    /// IPAM's subnets, in the VNIs' order.
    pub subnets: Vec<Ipv4Network>,
    /// This node's own endpoint on the network (ingress-sbox / lb-<name>).
    pub local_addr: Option<Ipv4Addr>,
    pub peers: Vec<Ipv4Addr>,
    pub services: BTreeMap<String, GossipService>,
}

/// A service in a network's verbose inspect output (Docker's field names).
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct GossipService {
    #[serde(rename = "VIP", default)]
    pub vip: String,
    #[serde(rename = "Ports", default)]
    pub ports: Option<Vec<String>>,
    #[serde(rename = "Tasks", default)]
    pub tasks: Option<Vec<GossipTask>>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct GossipTask {
    #[serde(rename = "Name", default)]
    pub name: String,
    #[serde(rename = "EndpointIP", default)]
    pub endpoint_ip: String,
    #[serde(rename = "Info", default)]
    pub info: BTreeMap<String, String>,
}

/// "Target: 80, Publish: 8080" -> (80, 8080).
pub fn parse_port(s: &str) -> Option<(u16, u16)> {
    let mut target = None;
    let mut publish = None;
    for part in s.split(',') {
        let (k, v) = part.split_once(':')?;
        let v: u16 = v.trim().parse().ok()?;
        match k.trim() {
            "Target" => target = Some(v),
            "Publish" => publish = Some(v),
            _ => {}
        }
    }
    Some((target?, publish?))
}

/// Docker's `vxlanid_list` ("4097,4098": one VNI per subnet, in the subnets' order).
/// A list that does not read as VNIs gives none: the network is then skipped whole
/// rather than half known.
pub fn parse_vnis(s: &str) -> Vec<u32> {
    let vnis: Option<Vec<u32>> = s
        .split(',')
        .map(|v| v.trim().parse().ok().filter(|v| *v > 0 && *v < 1 << 24))
        .collect();
    vnis.unwrap_or_default()
}

fn addr(s: &str) -> Option<Ipv4Addr> {
    s.split('/').next()?.parse().ok()
}

/// The model of this node (underlay address `me`, interface `underlay`) from the
/// networks it sees. Tasks on this node are listed as local backends; their endpoints
/// (veths) come from the node's plumbing, not from here. Published ports' protocol is
/// not in the gossiped view: TCP is assumed (a manager's /services knows better).
pub fn model_from(networks: &[NetworkView], me: Ipv4Addr, underlay: &str) -> Model {
    let mut m = Model {
        underlay: Some(underlay.to_string()),
        node_addrs: vec![me],
        node: Some(NodeSpec { addr: me }),
        ..Default::default()
    };
    let peers: BTreeSet<Ipv4Addr> = networks
        .iter()
        .flat_map(|n| n.peers.iter().copied())
        .filter(|p| *p != me)
        .collect();
    m.peers = peers
        .into_iter()
        .map(|addr| PeerSpec { addr, stock: false })
        .collect();
    for n in networks {
        let (Some(&vni), Some(local_addr)) = (n.vnis.first(), n.local_addr) else {
            continue;
        };
        m.networks.push(NetworkSpec {
            name: n.name.clone(),
            vni,
            more_vnis: n.vnis[1..].to_vec(),
            subnets: n.subnets.clone(),
            local_addr,
            // The mesh tunnels its own flows on the ingress network only.
            docker: !n.ingress,
        });
    }
    for n in networks {
        if n.vnis.is_empty() || n.local_addr.is_none() {
            continue;
        }
        for (svc_name, s) in &n.services {
            let ports: Vec<(u16, u16)> = s
                .ports
                .iter()
                .flatten()
                .filter_map(|p| parse_port(p))
                .collect();
            let backends: Vec<BackendSpec> = s
                .tasks
                .iter()
                .flatten()
                .filter_map(|t| {
                    let a = addr(&t.endpoint_ip)?;
                    let host = t.info.get("Host IP").and_then(|h| addr(h));
                    Some(BackendSpec {
                        addr: a,
                        state: Health::Active,
                        node: host.filter(|h| *h != me),
                        network: Some(n.name.clone()),
                        task: Some(t.name.clone()).filter(|n| !n.is_empty()),
                    })
                })
                .collect();
            let spec = |name: String, ports: Vec<PortSpec>, vips: Vec<Ipv4Addr>| ServiceSpec {
                name,
                ports,
                vips,
                backends: backends.clone(),
                tcp_idle: None,
                udp_idle: None,
                affinity: false,
                every_port: false,
            };
            if n.ingress {
                // The ingress network carries the published ports. Docker programs each
                // task to take them on its ingress address *at the published port* and
                // redirect to the target port itself: that is where we deliver.
                let p = ports
                    .iter()
                    .map(|(_target, publish)| PortSpec {
                        published: Some(*publish),
                        target: *publish,
                        protocol: Protocol::Tcp,
                        mode: PublishMode::Ingress,
                    })
                    .collect::<Vec<_>>();
                if !p.is_empty() {
                    m.services.push(spec(svc_name.clone(), p, vec![]));
                }
            } else if let Some(vip) = addr(&s.vip) {
                // A user network: the service's VIP there takes every port, as Docker's
                // does (published or not), on to tasks reached over the overlay.
                m.services.push(ServiceSpec {
                    every_port: true,
                    ..spec(format!("{svc_name}@{}", n.name), vec![], vec![vip])
                });
            }
        }
    }
    m
}

/// Where a network's verbose `Containers` lists this node's own endpoint on it: the
/// ingress sandbox's (`<name>-sbox`: an ingress network re-created under another name
/// keeps the pattern) or the network's load balancer's (`lb-<name>`).
pub fn local_endpoint_key(network: &str, ingress: bool) -> String {
    match ingress {
        true => format!("{network}-sbox"),
        false => format!("lb-{network}"),
    }
}

/// Fills in each network's own endpoint address (`local_addr`) where this view lacks it
/// from what earlier views showed (`seen`, updated here; networks no longer listed are
/// forgotten). Docker's verbose inspect now and then leaves an endpoint out (it logs
/// "Inconsistent driver and libnetwork state for endpoint"), and a network without its
/// local endpoint is skipped whole: every published port of the node would go for a
/// resync. The address does not change while the network exists.
pub fn remember_local_addrs(networks: &mut [NetworkView], seen: &mut BTreeMap<String, Ipv4Addr>) {
    seen.retain(|name, _| networks.iter().any(|n| &n.name == name));
    for n in networks {
        match n.local_addr {
            Some(a) => {
                seen.insert(n.name.clone(), a);
            }
            None => n.local_addr = seen.get(&n.name).copied(),
        }
    }
}

/// Task id -> its addresses, from the gossiped names (`<service>.<slot>.<task id>`).
pub fn task_addrs(networks: &[NetworkView]) -> BTreeMap<String, Vec<Ipv4Addr>> {
    let mut out: BTreeMap<String, Vec<Ipv4Addr>> = BTreeMap::new();
    for n in networks {
        for s in n.services.values() {
            for t in s.tasks.iter().flatten() {
                let (Some(id), Some(a)) = (t.name.rsplit('.').next(), addr(&t.endpoint_ip)) else {
                    continue;
                };
                if !id.is_empty() && id != t.name {
                    out.entry(id.to_string()).or_default().push(a);
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests;
