//! Per-CPU scratch memory: what the programs' steps hand each other instead of passing
//! it on the stack (the verifier's 512 bytes are for the whole call chain), and the
//! records kept there. Depends on nothing else in the crate, so every step can use it.

use aya_ebpf::macros::btf_map;
use mesh_common::{
    ct::{CtEntry, CtKey},
    lb::{Endpoint, Tunnel},
    reason::Reason,
};

/// Where a packet is sent on, for the step codes [`Outcome::DELIVER`], [`Outcome::TUNNEL`]
/// and [`Outcome::REFUSE`]: per-CPU scratch memory (`Scratch::go`), so that a step
/// returns a plain integer and no payload sits on any frame of the call chain.
pub struct Go {
    /// The local task (DELIVER).
    pub ep: Endpoint,
    /// The node and VNI to tunnel to (TUNNEL).
    pub tun: Tunnel,
    /// The DNAT target.
    pub nat_addr: u32,
    pub nat_port: u16,
    /// Whether the backend is a local task (`ep`) or on another node (`tun`).
    pub local: u8,
    /// Whom the client is made to look like (0: itself).
    pub hairpin: u32,
    /// Why a flow is refused (REFUSE, TCP).
    pub reason: Reason,
    /// The backend's task address (for the hairpin rules).
    pub be_addr: u32,
}

/// A flow's pair of entries being built (scratch memory: `Scratch::nf`).
pub struct NewFlow {
    /// The reply's tuple (task -> client), and what a reply needs.
    pub rev_key: CtKey,
    pub rev: CtEntry,
    /// The request's tuple (client -> frontend), and what a request needs.
    pub fwd_key: CtKey,
    pub fwd: CtEntry,
}

/// Where a decapsulated packet came from (`Scratch::from`).
pub struct From {
    pub peer: u32,
    pub vni: u32,
    /// Size of the frame as it arrived (for the counters).
    pub bytes: u32,
}

/// Per-CPU working memory for what does not fit the 512-byte stack: the parsed headers,
/// a conntrack entry being built, the answer being built. Only programs attached at
/// ingress (softirq, never nested on one CPU) use it.
pub struct Scratch {
    pub parsed: mesh_common::parse::Parsed,
    /// A new flow's conntrack entries, for `track::commit`.
    pub nf: NewFlow,
    /// Where the load balancer sends the packet in hand ([`Go`]).
    pub go: Go,
    pub quote: [u8; mesh_common::reply::QUOTE_LEN],
    pub rst: [u8; mesh_common::reply::RST_LEN],
    pub unreach: [u8; mesh_common::reply::UNREACH_LEN],
    pub encap: [u8; mesh_common::vxlan::ENCAP_LEN],
    /// A frame's MACs, swapped for an answer.
    pub macs: [u8; 12],
    /// Where the packet in hand came from, when it came through the tunnel.
    pub from: From,
    /// Where the load balancer wants the packet tunnelled (see `flow::Outcome::ENCAP`).
    pub encap_to: Tunnel,
    /// `CT_RETRIED` while a retried SYN is given a new backend (set by the retry, read
    /// and cleared where the new entry is written: no extra stack on the deep path).
    pub retry: u8,
    /// The backend this packet was balanced to, and whether it starts a flow: noted on
    /// the deep path (`stats::note_backend`), counted at the top of the call chain
    /// (`stats::count_noted`), where its frame does not add to the deep path's.
    pub noted_be: u32,
    pub noted_new: u8,
    /// The reason the packet in hand was dropped, noted for the datapath log while it is
    /// on (`log::note_drop`; 0: none).
    pub log_drop: u32,
    /// `bpf_fib_lookup`'s parameters (64 bytes: not on the stack).
    pub fib: aya_ebpf::bindings::bpf_fib_lookup,
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
