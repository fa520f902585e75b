//! Rewriting an skb in place: addresses and ports with checksum fix-ups by the kernel's
//! helpers (which also handle CHECKSUM_PARTIAL and UDP's zero checksum), MACs, and
//! redirects.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_REDIRECT},
    helpers::bpf_redirect,
    programs::TcContext,
};
use mesh_common::proto::{IPPROTO_TCP, IPPROTO_UDP};

pub type Res = Result<(), ()>;

#[inline(always)]
fn ok(r: Result<(), aya_ebpf::cty::c_long>) -> Res {
    r.map_err(|_| ())
}

/// Offset of the L4 checksum field, and the helper flags its protocol needs.
#[inline(always)]
fn l4_csum(l4_off: usize, proto: u8) -> Option<(usize, u64)> {
    match proto {
        IPPROTO_TCP => Some((l4_off + 16, 0)),
        IPPROTO_UDP => Some((l4_off + 6, BPF_F_MARK_MANGLED_0 as u64)),
        _ => None,
    }
}

/// Replaces the IPv4 address at `l3_off + field` (12: source, 16: destination).
#[inline(always)]
pub fn set_addr(
    ctx: &TcContext,
    l3_off: usize,
    field: usize,
    l4_off: usize,
    proto: u8,
    old: u32,
    new: u32,
) -> Res {
    if old == new {
        return Ok(());
    }
    if let Some((off, flags)) = l4_csum(l4_off, proto) {
        ok(ctx.l4_csum_replace(
            off,
            old as u64,
            new as u64,
            flags | BPF_F_PSEUDO_HDR as u64 | 4,
        ))?;
    }
    ok(ctx.l3_csum_replace(l3_off + 10, old as u64, new as u64, 4))?;
    ok(ctx.store(l3_off + field, &new, 0))
}

/// Replaces the port at `l4_off + field` (0: source, 2: destination).
#[inline(always)]
pub fn set_port(
    ctx: &TcContext,
    l4_off: usize,
    field: usize,
    proto: u8,
    old: u16,
    new: u16,
) -> Res {
    if old == new {
        return Ok(());
    }
    if let Some((off, flags)) = l4_csum(l4_off, proto) {
        ok(ctx.l4_csum_replace(off, old as u64, new as u64, flags | 2))?;
    }
    ok(ctx.store(l4_off + field, &new, 0))
}

/// Writes destination and source MACs.
#[inline(always)]
pub fn set_macs(ctx: &TcContext, dst: &[u8; 6], src: &[u8; 6]) -> Res {
    let mut m = [0u8; 12];
    m[..6].copy_from_slice(dst);
    m[6..].copy_from_slice(src);
    ok(ctx.store(0, &m, 0))
}

/// Redirects out of `ifindex` (into the task, for a task's veth).
#[inline(always)]
pub fn redirect(ifindex: u32) -> i32 {
    // SAFETY: a helper call with plain integer arguments.
    let r = unsafe { bpf_redirect(ifindex, 0) };
    if r as i32 == TC_ACT_REDIRECT {
        TC_ACT_REDIRECT
    } else {
        aya_ebpf::bindings::TC_ACT_SHOT
    }
}
