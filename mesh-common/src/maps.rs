//! Every map the kernel and user space share, in one table: the name it is pinned under
//! (the kernel's static of that name) and its capacity in the object. The kernel sizes
//! its statics from here, the agent pins [`PINNED`], and meshctl, the metrics and the
//! tests find maps by these names. A loader may resize a map (the Maglev array, with
//! `--maglev-slots`): a running node's capacity is read from the map itself.
//! Names are versioned: see [`crate::LAYOUT_VERSION`].

/// One shared map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapDef {
    /// The kernel's static and the pin's file name.
    pub name: &'static str,
    /// `max_entries` in the object.
    pub entries: u32,
}

/// (address, port, protocol) -> `lb::Frontend`.
pub const FRONTENDS: MapDef = MapDef {
    name: "MESH_FE_V1",
    entries: 1 << 16,
};
/// Service id -> `lb::Service` (its Maglev region and timeouts).
pub const SERVICES: MapDef = MapDef {
    name: "MESH_SVC_V1",
    entries: 1 << 16,
};
/// The shared Maglev array of backend ids (2^20 x 4 B = 4 MiB: 514 services of 3
/// backends at 2039 slots each); services own regions of it.
pub const MAGLEV: MapDef = MapDef {
    name: "MESH_MAGLEV_V1",
    entries: 1 << 20,
};
/// Backend id -> `lb::Backend`.
pub const BACKENDS: MapDef = MapDef {
    name: "MESH_BE_V1",
    entries: 1 << 18,
};
/// Local task address -> `lb::Endpoint` (its veth and MAC).
pub const ENDPOINTS: MapDef = MapDef {
    name: "MESH_EP_V1",
    entries: 1 << 16,
};
/// `lb::TaskPort` (a local task's address and port) -> `lb::EndpointIdle` (its
/// service's idle timeouts, for flows that reach it through a tunnel).
pub const ENDPOINT_IDLE: MapDef = MapDef {
    name: "MESH_EPIDLE_V1",
    entries: ENDPOINTS.entries,
};
/// Addresses of this node: a frontend with address 0 answers on each of them.
pub const NODE_ADDRS: MapDef = MapDef {
    name: "MESH_NODE_V1",
    entries: 256,
};
/// Connection tracking, an LRU: each flow takes two entries. The object's own size
/// (65,536 flows: tests, a bare load); the agent sizes it by `--ct-entries`
/// ([`CONNTRACK_AGENT_ENTRIES`] by default).
pub const CONNTRACK: MapDef = MapDef {
    name: "MESH_CT_V1",
    entries: 1 << 17,
};
/// The agent's conntrack size unless `--ct-entries` says otherwise: 1,048,576 flows
/// (an LRU is allocated whole: 304 MiB of kernel memory at 72-byte entries, as bpftool
/// reports it on 6.18).
pub const CONNTRACK_AGENT_ENTRIES: u32 = 1 << 21;
/// A translated first fragment's ports, for the rest of its datagram (an LRU: a record
/// is needed for the life of one datagram).
pub const FRAGMENTS: MapDef = MapDef {
    name: "MESH_FRAG_V1",
    entries: 8192,
};
/// Tasks on other nodes: task address -> `lb::Tunnel`.
pub const TUNNELS: MapDef = MapDef {
    name: "MESH_TUN_V1",
    entries: 1 << 18,
};
/// Known swarm nodes (underlay address -> `PEER_*` flags).
pub const PEERS: MapDef = MapDef {
    name: "MESH_PEER_V1",
    entries: 4096,
};
/// Overlay networks this node is on, by VNI.
pub const NETWORKS: MapDef = MapDef {
    name: "MESH_NET_V1",
    entries: 4096,
};
/// This node on the underlay (one `lb::Local`).
pub const LOCAL: MapDef = MapDef {
    name: "MESH_LOCAL_V1",
    entries: 1,
};
/// Socket cookie + dialled port -> the dialled address (an LRU: sockets are never told
/// to us when they close).
pub const SOCKETS: MapDef = MapDef {
    name: "MESH_SOCK_V1",
    entries: 1 << 16,
};
/// Network namespace cookie -> `sock::NETNS_*`: the namespaces whose sockets are ours.
pub const NETNS: MapDef = MapDef {
    name: "MESH_NETNS_V1",
    entries: 4096,
};
/// Per-CPU counters, one per (hook, reason).
pub const STATS: MapDef = MapDef {
    name: "MESH_STATS_V1",
    entries: crate::stats::STATS_ENTRIES,
};
/// Per-CPU counters per backend (an LRU: the least recently used backend's cell goes
/// first when full).
pub const BACKEND_STATS: MapDef = MapDef {
    name: "MESH_BESTATS_V1",
    entries: 1 << 16,
};

/// The datapath log's switch (element 0; nonzero: on), which `meshctl log on|off`
/// flips: the programs write aya-log records only while it is on.
pub const LOG_SWITCH: MapDef = MapDef {
    name: "MESH_LOG_V1",
    entries: 1,
};

/// Every map the agent pins (and meshctl reads).
pub const PINNED: [MapDef; 18] = [
    STATS,
    BACKEND_STATS,
    CONNTRACK,
    FRAGMENTS,
    FRONTENDS,
    SERVICES,
    MAGLEV,
    BACKENDS,
    ENDPOINTS,
    ENDPOINT_IDLE,
    NODE_ADDRS,
    TUNNELS,
    PEERS,
    NETWORKS,
    LOCAL,
    SOCKETS,
    NETNS,
    LOG_SWITCH,
];

/// The names of [`PINNED`], in its order.
pub const PINNED_NAMES: [&str; PINNED.len()] = {
    let mut names = [""; PINNED.len()];
    let mut i = 0;
    while i < PINNED.len() {
        names[i] = PINNED[i].name;
        i += 1;
    }
    names
};

#[cfg(test)]
mod tests {
    #[test]
    fn names_are_unique_and_versioned() {
        let names: std::collections::BTreeSet<_> = super::PINNED.iter().map(|m| m.name).collect();
        assert_eq!(names.len(), super::PINNED.len());
        assert!(names
            .iter()
            .all(|n| n.starts_with("MESH_") && n.ends_with("_V1")));
    }
}
