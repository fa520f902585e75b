//! Per-CPU counters by (hook, reason).

use aya_ebpf::{btf_maps::PerCpuArray, macros::btf_map};
use mesh_common::{
    reason::Reason,
    stats::{stats_index, Counter, Hook, STATS_ENTRIES},
};

/// A BTF map (not aya's legacy `maps` section), so libbpf tools such as
/// `bpftool prog loadall` and `bpftool map dump` understand the object too.
#[btf_map]
static MESH_STATS_V1: PerCpuArray<Counter, { STATS_ENTRIES as usize }> = PerCpuArray::new();

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
