//! The load-balancing maps (types and names from `mesh_common`). Capacities here are the
//! object's defaults; the loader may resize them (`EbpfLoader::map_max_entries`).

use aya_ebpf::{
    btf_maps::{Array, HashMap, LruHashMap},
    macros::btf_map,
};
use mesh_common::{
    ct::{CtEntry, CtKey},
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
pub static MESH_CT_V1: LruHashMap<CtKey, CtEntry, 131072> = LruHashMap::new();

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

/// Per-CPU working memory for what does not fit the 512-byte stack: the parsed headers,
/// a conntrack entry being built, the answer being built. Only programs attached at
/// ingress (softirq, never nested on one CPU) use it.
pub struct Scratch {
    pub parsed: mesh_common::parse::Parsed,
    /// A new flow's conntrack entries, for `track::commit`.
    pub nf: crate::track::NewFlow,
    /// Where the load balancer sends the packet in hand (`lb::Go`).
    pub go: crate::lb::Go,
    pub quote: [u8; mesh_common::reply::QUOTE_LEN],
    pub rst: [u8; mesh_common::reply::RST_LEN],
    pub unreach: [u8; mesh_common::reply::UNREACH_LEN],
    pub encap: [u8; mesh_common::vxlan::ENCAP_LEN],
    /// A frame's MACs, swapped for an answer.
    pub macs: [u8; 12],
    /// Where the packet in hand came from, when it came through the tunnel.
    pub from: crate::vxlan::From,
    /// Where the load balancer wants the packet tunnelled (see `lb::Outcome::ENCAP`).
    pub encap_to: Tunnel,
    /// `CT_RETRIED` while a retried SYN is given a new backend (set by the retry, read
    /// and cleared where the new entry is written: no extra stack on the deep path).
    pub retry: u8,
    /// The backend this packet was balanced to, and whether it starts a flow: noted on
    /// the deep path (`stats::note_backend`), counted at the top of the call chain
    /// (`stats::count_noted`), where its frame does not add to the deep path's.
    pub noted_be: u32,
    pub noted_new: u8,
}

#[btf_map]
pub static MESH_SCRATCH: aya_ebpf::btf_maps::PerCpuArray<Scratch, 1> =
    aya_ebpf::btf_maps::PerCpuArray::new();

/// This CPU's scratch memory.
#[inline(always)]
pub fn scratch() -> Option<&'static mut Scratch> {
    // SAFETY: a per-CPU slot; see `Scratch` for why nothing else uses it concurrently.
    MESH_SCRATCH.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}

/// Zeroes `v` (scratch memory) word by word. Volatile stores: the compiler would merge
/// plain ones into a call of `memset`, a BPF function of its own, whose frame the
/// verifier adds to the deepest call chain (32 bytes on Linux 6.1).
#[inline(always)]
pub fn zero<T>(v: &mut T) {
    let words = core::mem::size_of::<T>() / 8;
    let p = v as *mut T as *mut u64;
    let mut i = 0;
    while i < words {
        // SAFETY: within `v`; scratch values are 8-byte aligned map memory.
        unsafe { core::ptr::write_volatile(p.add(i), 0) };
        i += 1;
    }
    let b = v as *mut T as *mut u8;
    let mut j = words * 8;
    while j < core::mem::size_of::<T>() {
        // SAFETY: within `v`.
        unsafe { core::ptr::write_volatile(b.add(j), 0) };
        j += 1;
    }
}
