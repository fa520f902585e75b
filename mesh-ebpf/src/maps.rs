//! The shared maps: each static is named and sized as `mesh_common::maps` says (the
//! loader may resize one: `EbpfLoader::map_max_entries`); its key and value types come
//! from `mesh_common` too.

use aya_ebpf::{
    btf_maps::{Array, HashMap, LruHashMap},
    macros::btf_map,
};
use mesh_common::{
    ct::{CtEntry, CtKey, FragKey, FragPorts},
    lb::{
        Backend, Endpoint, EndpointIdle, Frontend, FrontendKey, Local, Network, NodeAddrFlags,
        Service, TaskPort, Tunnel,
    },
    maps,
    sock::{SockKey, SockOrig},
};

#[btf_map]
pub static MESH_FE_V1: HashMap<FrontendKey, Frontend, { maps::FRONTENDS.entries as usize }> =
    HashMap::new();

#[btf_map]
pub static MESH_SVC_V1: HashMap<u32, Service, { maps::SERVICES.entries as usize }> = HashMap::new();

/// Backend ids; services own regions of it (`Service::maglev_off/size`).
#[btf_map]
pub static MESH_MAGLEV_V1: Array<u32, { maps::MAGLEV.entries as usize }> = Array::new();

#[btf_map]
pub static MESH_BE_V1: HashMap<u32, Backend, { maps::BACKENDS.entries as usize }> = HashMap::new();

#[btf_map]
pub static MESH_EP_V1: HashMap<u32, Endpoint, { maps::ENDPOINTS.entries as usize }> =
    HashMap::new();

/// A local task's address and port -> its service's idle timeouts (flows that come
/// through a tunnel).
#[btf_map]
pub static MESH_EPIDLE_V1: HashMap<
    TaskPort,
    EndpointIdle,
    { maps::ENDPOINT_IDLE.entries as usize },
> = HashMap::new();

/// Addresses of this node: a frontend with address 0 answers on each of them.
#[btf_map]
pub static MESH_NODE_V1: HashMap<u32, NodeAddrFlags, { maps::NODE_ADDRS.entries as usize }> =
    HashMap::new();

#[btf_map]
pub static MESH_CT_V1: LruHashMap<CtKey, CtEntry, { maps::CONNTRACK.entries as usize }> =
    LruHashMap::new();

/// A translated first fragment's ports, for the rest of its datagram (`track::follow`).
#[btf_map]
pub static MESH_FRAG_V1: LruHashMap<FragKey, FragPorts, { maps::FRAGMENTS.entries as usize }> =
    LruHashMap::new();

/// Tasks on other nodes: task address -> where to tunnel.
#[btf_map]
pub static MESH_TUN_V1: HashMap<u32, Tunnel, { maps::TUNNELS.entries as usize }> = HashMap::new();

/// Known swarm nodes (underlay address -> PEER_* flags): VXLAN from anyone else is dropped.
#[btf_map]
pub static MESH_PEER_V1: HashMap<u32, u32, { maps::PEERS.entries as usize }> = HashMap::new();

/// Overlay networks this node is on, by VNI.
#[btf_map]
pub static MESH_NET_V1: HashMap<u32, Network, { maps::NETWORKS.entries as usize }> = HashMap::new();

/// This node on the underlay.
#[btf_map]
pub static MESH_LOCAL_V1: Array<Local, { maps::LOCAL.entries as usize }> = Array::new();

/// Sockets pointed at the host port: (socket cookie, dialled port, proto) -> dialled address.
#[btf_map]
pub static MESH_SOCK_V1: LruHashMap<SockKey, SockOrig, { maps::SOCKETS.entries as usize }> =
    LruHashMap::new();

/// This node's network namespaces (cookie -> `NETNS_HOST` / `NETNS_CONTAINER`): the
/// socket programs' scope.
#[btf_map]
pub static MESH_NETNS_V1: HashMap<u64, u32, { maps::NETNS.entries as usize }> = HashMap::new();
