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

use serde::Deserialize;

use crate::model::{
    BackendSpec, Health, Model, NetworkSpec, NodeSpec, PeerSpec, PortSpec, Protocol, PublishMode,
    ServiceSpec,
};

/// One overlay network as this node sees it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NetworkView {
    pub name: String,
    pub ingress: bool,
    pub vni: Option<u32>,
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
        let (Some(vni), Some(local_addr)) = (n.vni, n.local_addr) else {
            continue;
        };
        m.networks.push(NetworkSpec {
            name: n.name.clone(),
            vni,
            local_addr,
        });
    }
    for n in networks {
        if n.vni.is_none() || n.local_addr.is_none() {
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
                // A user network: the service's VIP there, on its target ports.
                let p = ports
                    .iter()
                    .map(|(target, _)| *target)
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .map(|target| PortSpec {
                        published: None,
                        target,
                        protocol: Protocol::Tcp,
                        mode: PublishMode::Ingress,
                    })
                    .collect::<Vec<_>>();
                if !p.is_empty() {
                    m.services
                        .push(spec(format!("{svc_name}@{}", n.name), p, vec![vip]));
                }
            }
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Shaped as `docker network inspect --verbose ingress` printed on a real swarm here.
    const WEB: &str = r#"{
        "VIP": "10.0.0.3",
        "Ports": ["Target: 80, Publish: 8080"],
        "LocalLBIndex": 256,
        "Tasks": [
            {"Name": "web.1.yz6us", "EndpointID": "a", "EndpointIP": "10.0.0.4", "Info": {"Host IP": "10.251.0.11"}},
            {"Name": "web.2.k2jq1", "EndpointID": "b", "EndpointIP": "10.0.0.5", "Info": {"Host IP": "10.251.0.12"}}
        ]
    }"#;

    fn ingress() -> NetworkView {
        NetworkView {
            name: "ingress".into(),
            ingress: true,
            vni: Some(4096),
            local_addr: Some("10.0.0.2".parse().unwrap()),
            peers: vec![
                "10.251.0.11".parse().unwrap(),
                "10.251.0.12".parse().unwrap(),
            ],
            services: BTreeMap::from([("web".into(), serde_json::from_str(WEB).unwrap())]),
        }
    }

    #[test]
    fn ports_parse() {
        assert_eq!(parse_port("Target: 80, Publish: 8080"), Some((80, 8080)));
        assert_eq!(parse_port("Target: 80"), None);
        assert_eq!(parse_port("garbage"), None);
    }

    #[test]
    fn published_port_with_local_and_remote_tasks() {
        let me: Ipv4Addr = "10.251.0.11".parse().unwrap();
        let m = model_from(&[ingress()], me, "eth0");
        assert_eq!(
            m.peers,
            vec![PeerSpec {
                addr: "10.251.0.12".parse().unwrap(),
                stock: false
            }]
        );
        assert_eq!(m.networks[0].vni, 4096);
        let web = &m.services[0];
        assert_eq!(web.name, "web");
        // Delivered on the published port: the task redirects it to 80 itself.
        assert_eq!(
            (web.ports[0].published, web.ports[0].target),
            (Some(8080), 8080)
        );
        assert_eq!(web.backends.len(), 2);
        assert_eq!(web.backends[0].node, None, "the task on this node is local");
        assert_eq!(web.backends[1].node, Some("10.251.0.12".parse().unwrap()));
    }

    #[test]
    fn vip_on_a_user_network() {
        let mut n = ingress();
        n.ingress = false;
        n.name = "meshnet".into();
        let m = model_from(&[n], "10.251.0.11".parse().unwrap(), "eth0");
        let s = &m.services[0];
        assert_eq!(s.name, "web@meshnet");
        assert_eq!(s.vips, vec!["10.0.0.3".parse::<Ipv4Addr>().unwrap()]);
        assert_eq!((s.ports[0].published, s.ports[0].target), (None, 80));
    }

    #[test]
    fn a_network_without_vni_or_local_endpoint_is_skipped() {
        let mut n = ingress();
        n.local_addr = None;
        let m = model_from(&[n], "10.251.0.11".parse().unwrap(), "eth0");
        assert!(m.networks.is_empty() && m.services.is_empty());
    }
}
