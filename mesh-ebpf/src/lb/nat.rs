//! The rewrites: DNAT toward the backend (and SNAT of a client made to look like
//! another), into the task's veth; reverse NAT of a task's reply, back to the client.

use mesh_common::{
    ct::{CtEntry, CT_HAIRPIN},
    reason::Reason,
};

use crate::{
    flow::{Outcome, Pkt},
    scratch::scratch,
    skb,
};

/// DNAT to the backend (and SNAT a hairpinned client), then hand the packet to the task
/// (`Scratch::go`).
#[inline(never)]
pub(super) fn deliver(pk: &Pkt) -> Outcome {
    let Some(s) = scratch() else {
        return pk.drop(Reason::DropRewriteFailed);
    };
    let ep = s.go.ep;
    if toward_backend(pk, s.go.nat_addr, s.go.nat_port, s.go.hairpin)
        .and_then(|_| skb::set_macs(pk.ctx, &ep.mac, &ep.host_mac))
        .is_err()
    {
        return pk.drop(Reason::DropRewriteFailed);
    }
    pk.done(Reason::FwdToTask, skb::redirect(ep.ifindex))
}

/// The forward NAT: destination to `addr:port`, and the source to `hairpin` when the
/// client is SNATed (0: unchanged).
#[inline(always)]
pub(super) fn toward_backend(pk: &Pkt, addr: u32, port: u16, hairpin: u32) -> skb::Res {
    let (ctx, f, proto) = (pk.ctx, &pk.f, pk.l4_proto());
    let (l3, l4) = (pk.p.l3_off as usize, pk.p.l4_off as usize);
    skb::set_addr(ctx, l3, 16, l4, proto, f.daddr, addr)?;
    if proto != 0 {
        skb::set_port(ctx, l4, 2, proto, f.dport, port)?;
    }
    if hairpin != 0 {
        skb::set_addr(ctx, l3, 12, l4, proto, f.saddr, hairpin)?;
    }
    Ok(())
}

/// The reverse NAT: source back to `addr:port` (the frontend), and the destination back
/// to `client` when the client was SNATed (0: unchanged).
#[inline(always)]
pub(super) fn toward_client(pk: &Pkt, addr: u32, port: u16, client: u32) -> skb::Res {
    let (ctx, f, proto) = (pk.ctx, &pk.f, pk.l4_proto());
    let (l3, l4) = (pk.p.l3_off as usize, pk.p.l4_off as usize);
    skb::set_addr(ctx, l3, 12, l4, proto, f.saddr, addr)?;
    if proto != 0 {
        skb::set_port(ctx, l4, 0, proto, f.sport, port)?;
    }
    if client != 0 {
        skb::set_addr(ctx, l3, 16, l4, proto, f.daddr, client)?;
    }
    Ok(())
}

/// A reply from a task: the source becomes the frontend again (and a hairpinned client
/// its own address), and it goes back where the request came from.
#[inline(never)]
pub(super) fn to_client(pk: &Pkt, e: &CtEntry) -> Outcome {
    let client = if e.flags & CT_HAIRPIN != 0 {
        e.hairpin_addr
    } else {
        0
    };
    if toward_client(pk, e.nat_addr, e.nat_port, client)
        .and_then(|_| skb::set_macs(pk.ctx, &e.mac_dst, &e.mac_src))
        .is_err()
    {
        return pk.drop(Reason::DropRewriteFailed);
    }
    pk.done(Reason::FwdReplyToClient, skb::redirect(e.ifindex))
}
