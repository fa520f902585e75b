//! The desired state of this node's datapath, as a user writes it (`mesh-agent --config
//! FILE`, YAML) or as the Docker source will derive it, its YAML and its errors.
//! What can be programmed is `admit`'s; the translation into the kernel's terms
//! ([`Desired`]) is `kernel`'s. Pure.

use std::net::Ipv4Addr;

use mesh_common::lb::{PROTO_TCP, PROTO_UDP};
use serde::{Deserialize, Serialize};

mod admit;
mod kernel;

pub use admit::*;
pub use kernel::*;

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
    /// Its subnets (Docker's IPAM), in the VNIs' order: what `--print-docker-model`
    /// and meshctl show of the network; the datapath needs none of them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subnets: Vec<ipnetwork::Ipv4Network>,
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
    /// "tcp" or "udp", as Docker writes it.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }

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
    #[error(
        "{port}/{proto} is {why} on every node: a service may not publish it (publish another \
         port)"
    )]
    ReservedPort {
        port: u16,
        proto: &'static str,
        why: &'static str,
    },
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

/// Writes a model as YAML (the `--config` format).
pub fn to_yaml(model: &Model) -> String {
    serde_yaml_ng::to_string(model).expect("a model always serialises")
}

/// Reads a model from YAML.
pub fn from_yaml(text: &str) -> Result<Model, String> {
    serde_yaml_ng::from_str(text).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests;
