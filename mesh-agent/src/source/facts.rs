//! What Docker tells the mesh, as plain data: what `docker` reads through bollard
//! (a manager's service facts, this node's tasks) and `swarm` translates into the
//! model, and what the peers' reports carry between nodes. No I/O here.

use std::{collections::BTreeMap, net::Ipv4Addr};

/// Service labels the mesh reads (`mesh.*`), per service name. Managers only.
pub type MeshLabels = BTreeMap<String, BTreeMap<String, String>>;

/// Protocols of each service's ingress-published ports: service -> (published port,
/// protocol) pairs. Docker's gossiped tables, all a worker has, carry no protocol.
pub type Protocols = BTreeMap<String, Vec<(u16, crate::model::Protocol)>>;

/// One ingress-published port of a service, as the service's spec has it now.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct IngressPort {
    pub published: u16,
    pub target: u16,
    pub protocol: crate::model::Protocol,
}

/// Every service a manager lists -> its ingress-published ports (empty: none). The
/// gossiped tables are no authority on ports: each task's record carries the ports of
/// the spec it was created from, and Docker's verbose view shows one record's at random,
/// so during an update that moves a port the view flips between old and new.
pub type IngressPorts = BTreeMap<String, Vec<IngressPort>>;

/// What only a manager's `/services` tells about services.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceFacts {
    pub labels: MeshLabels,
    /// What an older manager reports instead of `ingress`.
    pub protocols: Protocols,
    /// `None` from a manager whose agent predates it.
    pub ingress: Option<IngressPorts>,
}

/// This node's tasks as their containers show them.
#[derive(Clone, Debug, Default)]
pub struct LocalTasks {
    pub endpoints: Vec<crate::model::EndpointSpec>,
    /// Task addresses whose HEALTHCHECK is not passing.
    pub not_healthy: std::collections::BTreeSet<Ipv4Addr>,
    /// Every address of every local task container (its health is known here).
    pub known: std::collections::BTreeSet<Ipv4Addr>,
    /// Host-mode published ports of local tasks (not in Docker's gossiped tables).
    pub host_ports: Vec<HostPort>,
    /// The tasks' overlay veths, where east-west flows to VIPs start.
    pub overlay_ports: Vec<crate::model::OverlayPortSpec>,
    /// Where Docker's network namespaces are, as seen here (from a sandbox's path).
    pub netns_dir: Option<std::path::PathBuf>,
}

/// A host-mode published port of a task on this node, delivered to the task's address
/// on docker_gwbridge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostPort {
    pub service: String,
    pub protocol: crate::model::Protocol,
    pub published: u16,
    pub target: u16,
    pub addr: Ipv4Addr,
}
