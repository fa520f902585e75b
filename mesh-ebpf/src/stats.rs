//! Per-CPU counters by (hook, reason).

use aya_ebpf::{
    btf_maps::{LruPerCpuHashMap, PerCpuArray},
    macros::btf_map,
};
use mesh_common::{
    reason::Reason,
    stats::{stats_index, BackendCounter, Counter, Hook},
};

/// A BTF map (not aya's legacy `maps` section), so libbpf tools such as
/// `bpftool prog loadall` and `bpftool map dump` understand the object too.
#[btf_map]
static MESH_STATS_V1: PerCpuArray<Counter, { mesh_common::maps::STATS.entries as usize }> =
    PerCpuArray::new();

/// Adds one packet of `bytes` to (hook, reason). Per-CPU, so no atomics are needed.
#[inline(always)]
pub fn count(hook: Hook, reason: Reason, bytes: usize) {
    if let Some(c) = MESH_STATS_V1.get_ptr_mut(stats_index(hook, reason)) {
        // SAFETY: a per-CPU slot, only this CPU writes it while this program runs.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes as u64;
        }
    }
}

#[btf_map]
static MESH_BESTATS_V1: LruPerCpuHashMap<
    u32,
    BackendCounter,
    { mesh_common::maps::BACKEND_STATS.entries as usize },
> = LruPerCpuHashMap::new();

/// Adds a packet of `bytes` (and, for the first of a flow, the flow) to backend `id`.
#[inline(never)]
pub fn count_backend(id: u32, bytes: usize, new_flow: bool) {
    if id == 0 {
        return;
    }
    let flows = new_flow as u64;
    match MESH_BESTATS_V1.get_ptr_mut(&id) {
        // SAFETY: this CPU's cell; only this CPU writes it while this program runs.
        Some(c) => unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes as u64;
            (*c).flows += flows;
        },
        None => {
            let c = BackendCounter {
                packets: 1,
                bytes: bytes as u64,
                flows,
            };
            let _ = MESH_BESTATS_V1.insert(&id, &c, 0);
        }
    }
}

/// Notes that this packet went to backend `id` (starting a flow if `new_flow`); see
/// [`count_noted`].
#[inline(always)]
pub fn note_backend(id: u32, new_flow: bool) {
    if let Some(s) = crate::scratch::scratch() {
        s.noted_be = id;
        s.noted_new = new_flow as u8;
    }
}

/// Counts the packet of `bytes` for the backend noted while it was handled, if any. Its
/// own BPF function: it adds nothing to its caller's frame.
#[inline(never)]
pub fn count_noted(bytes: usize) {
    if let Some(s) = crate::scratch::scratch() {
        let id = core::mem::take(&mut s.noted_be);
        let new = core::mem::take(&mut s.noted_new) != 0;
        if id != 0 {
            count_backend(id, bytes, new);
        }
    }
}
