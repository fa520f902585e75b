//! New flow, stage 3: both conntrack entries written, then the step toward the backend.

use aya_ebpf::programs::TcContext;
use mesh_common::{
    ct::{CtKey, CT_HAIRPIN},
    reason::Reason,
};

use crate::{
    flow::{Outcome, Pkt},
    scratch::scratch,
    stats::count,
    track,
};

/// New flow, stage 3: both conntrack entries (the reply goes back to where the request
/// came from: to its source MAC, from our MAC), written by [`track::commit`]; then the
/// step toward the backend.
#[inline(never)]
pub(super) fn track_new(pk: &Pkt) -> Outcome {
    let Some(s) = scratch() else {
        return pk.drop(Reason::DropCtFull);
    };
    let f = &pk.f;
    let snat = s.go.hairpin != 0;
    let client = if snat { s.go.hairpin } else { f.saddr };
    let nf = &mut s.nf;
    if load6(pk.ctx, 6, &mut nf.rev.mac_dst) || load6(pk.ctx, 0, &mut nf.rev.mac_src) {
        return pk.drop(Reason::DropRewriteFailed);
    }
    nf.rev_key = CtKey::new(s.go.nat_addr, client, s.go.nat_port, f.sport, f.proto);
    nf.rev.nat_addr = f.daddr;
    nf.rev.nat_port = f.dport;
    nf.rev.ifindex = pk.ifindex();
    nf.fwd.nat_addr = s.go.nat_addr;
    nf.fwd.nat_port = s.go.nat_port;
    nf.fwd.flags = s.retry;
    s.retry = 0;
    nf.fwd.ifindex = if s.go.local != 0 { s.go.ep.ifindex } else { 0 };
    if snat {
        nf.rev.flags |= CT_HAIRPIN;
        nf.rev.hairpin_addr = f.saddr;
        nf.fwd.flags |= CT_HAIRPIN;
        nf.fwd.hairpin_addr = client;
    }
    if track::commit(true).is_err() {
        return pk.drop(Reason::DropCtFull);
    }
    count(pk.hook, Reason::ObsCtNew, pk.bytes);
    // What `note_backend` does, with the scratch memory already in hand.
    s.noted_be = s.nf.fwd.backend_id;
    s.noted_new = 1;
    if s.go.local != 0 {
        Outcome::DELIVER
    } else {
        Outcome::TUNNEL
    }
}

/// Copies 6 bytes at `off` of the packet into `to`; true on failure. (A constant length:
/// the verifier needs it, which `TcContext::load_bytes` does not give.)
#[inline(always)]
fn load6(ctx: &TcContext, off: u32, to: &mut [u8; 6]) -> bool {
    // SAFETY: the helper writes exactly 6 bytes into `to`.
    unsafe {
        aya_ebpf::helpers::bpf_skb_load_bytes(
            ctx.skb.skb as *const _,
            off,
            to.as_mut_ptr() as *mut _,
            6,
        ) != 0
    }
}
