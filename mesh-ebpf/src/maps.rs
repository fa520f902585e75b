//! The load-balancing maps (types and names from `mesh_common`). Capacities here are the
//! object's defaults; the loader may resize them (`EbpfLoader::map_max_entries`).

use aya_ebpf::{
    btf_maps::{Array, HashMap, LruHashMap},
    macros::btf_map,
};
use mesh_common::{
    ct::{CtEntry, CtKey, FragKey, FragPorts, FRAG_ENTRIES},
    sock::{SockKey, SockOrig},
    lb::{Backend, Endpoint, Frontend, FrontendKey, Local, Network, NodeAddrFlags, Service, Tunnel},
};

#[btf_map]
pub static MESH_FE_V1: HashMap<FrontendKey, Frontend, 65536> = HashMap::new();

#[btf_map]
pub static MESH_SVC_V1: HashMap<u32, Service, 65536> = HashMap::new();

/// Backend ids; services own regions of it (`Service::maglev_off/size`).
#[btf_map]
pub static MESH_MAGLEV_V1: Array<u32, { 1 << 20 }> = Array::new();

#[btf_map]
pub static MESH_BE_V1: HashMap<u32, Backend, 262144> = HashMap::new();

#[btf_map]
pub static MESH_EP_V1: HashMap<u32, Endpoint, 65536> = HashMap::new();

/// Addresses of this node: a frontend with address 0 answers on each of them.
#[btf_map]
pub static MESH_NODE_V1: HashMap<u32, NodeAddrFlags, 256> = HashMap::new();

#[btf_map]
pub static MESH_CT_V1: LruHashMap<CtKey, CtEntry, { mesh_common::ct::CT_ENTRIES as usize }> =
    LruHashMap::new();

/// A translated first fragment's ports, for the rest of its datagram (`track::follow`).
#[btf_map]
pub static MESH_FRAG_V1: LruHashMap<FragKey, FragPorts, { FRAG_ENTRIES as usize }> =
    LruHashMap::new();

/// Tasks on other nodes: task address -> where to tunnel.
#[btf_map]
pub static MESH_TUN_V1: HashMap<u32, Tunnel, 262144> = HashMap::new();

/// Known swarm nodes (underlay address -> PEER_* flags): VXLAN from anyone else is dropped.
#[btf_map]
pub static MESH_PEER_V1: HashMap<u32, u32, 4096> = HashMap::new();

/// Overlay networks this node is on, by VNI.
#[btf_map]
pub static MESH_NET_V1: HashMap<u32, Network, 4096> = HashMap::new();

/// This node on the underlay.
#[btf_map]
pub static MESH_LOCAL_V1: Array<Local, 1> = Array::new();

/// Sockets pointed at the host port: (socket cookie, dialled port, proto) -> dialled address.
#[btf_map]
pub static MESH_SOCK_V1: LruHashMap<SockKey, SockOrig, 65536> = LruHashMap::new();

/// This node's network namespaces (cookie -> `NETNS_HOST` / `NETNS_CONTAINER`): the
/// socket programs' scope.
#[btf_map]
pub static MESH_NETNS_V1: HashMap<u64, u32, 4096> = HashMap::new();


