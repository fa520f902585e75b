//! ICMP errors about load-balanced flows (fragmentation needed, time exceeded, ...)
//! carry the offending packet's headers as the sender saw them. Translate both the
//! quoted headers and the outer address so that the other side can match the error to
//! its socket: this is what makes path MTU discovery work through the NAT.

use aya_ebpf::{bindings::TC_ACT_OK, programs::TcContext};
use mesh_common::{
    csum,
    ct::{CtKey, CT_HAIRPIN, CT_OVERLAY, CT_REVERSE, CT_TUNNEL},
    proto::{IPPROTO_TCP, IPPROTO_UDP},
    reason::Reason,
    stats::Hook,
};

use crate::{
    flow::{encap_later, Outcome, Pkt},
    maps::{MESH_BE_V1, MESH_CT_V1, MESH_EP_V1},
    skb,
};

/// ICMP types that quote an offending datagram.
#[inline(always)]
pub const fn is_error(icmp_type: u8) -> bool {
    matches!(icmp_type, 3 | 11 | 12)
}

#[inline(always)]
fn be32(b: &[u8], i: usize) -> u32 {
    u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

/// Rewrites the quoted address at `inner + field` (12 source, 16 destination) and the
/// quoted port at `inner + 20 + pfield`, and the other quoted address to `other` unless
/// 0 (a SNATed client's own), keeping the quoted IP checksum and the ICMP checksum
/// right.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn rewrite_quote(
    ctx: &TcContext,
    icmp: usize,
    inner: usize,
    q: &[u8; 24],
    field: usize,
    pfield: usize,
    addr: u32,
    port: u16,
    other: u32,
) -> skb::Res {
    let old_addr = be32(q, field);
    let old_port = u16::from_ne_bytes([q[20 + pfield], q[21 + pfield]]);
    let old_ck = u16::from_be_bytes([q[10], q[11]]);
    let mut new_ck = csum::replace32(old_ck, u32::from_be(old_addr), u32::from_be(addr));
    let ck_off = icmp + 2;
    let e = |r: Result<(), aya_ebpf::cty::c_long>| r.map_err(|_| ());
    if other != 0 {
        let of = 28 - field;
        let old_other = be32(q, of);
        new_ck = csum::replace32(new_ck, u32::from_be(old_other), u32::from_be(other));
        e(ctx.l4_csum_replace(ck_off, old_other as u64, other as u64, 4))?;
        e(ctx.store(inner + of, &other, 0))?;
    }
    e(ctx.l4_csum_replace(ck_off, old_addr as u64, addr as u64, 4))?;
    e(ctx.l4_csum_replace(ck_off, old_ck.to_be() as u64, new_ck.to_be() as u64, 2))?;
    e(ctx.l4_csum_replace(ck_off, old_port as u64, port as u64, 2))?;
    e(ctx.store(inner + field, &addr, 0))?;
    e(ctx.store(inner + 10, &new_ck.to_be(), 0))?;
    e(ctx.store(inner + 20 + pfield, &port, 0))
}

/// Translates an ICMP error quoting a NATed flow; `NotOurs` for anything else.
/// `tunnelled`: it came out of the tunnel (a remote task's error about a flow this node
/// balanced), where only such flows' reply entries may match. A VIP flow on Docker's
/// overlay is translated only at the task's overlay veth (`TcOverlayOut`) and left to
/// Docker's bridge; a task's error about a flow that reached it through the tunnel goes
/// back through the tunnel (the caller encapsulates, `Outcome::ENCAP`).
#[inline(never)]
pub fn translate(pk: &Pkt, tunnelled: bool) -> Outcome {
    let (ctx, p) = (pk.ctx, pk.p);
    let l3 = p.l3_off as usize;
    let icmp = p.l4_off as usize;
    let inner = icmp + 8;
    let Ok(q) = ctx.load::<[u8; 24]>(inner) else {
        return Outcome::NotOurs;
    };
    if q[0] != 0x45 || !matches!(q[9], IPPROTO_TCP | IPPROTO_UDP) {
        return Outcome::NotOurs;
    }
    // The quoted packet travelled toward the error's sender; we track the flow by the
    // packets coming the other way.
    let key = CtKey::new(
        be32(&q, 16),
        be32(&q, 12),
        u16::from_ne_bytes([q[22], q[23]]),
        u16::from_ne_bytes([q[20], q[21]]),
        q[9],
    );
    // SAFETY: a map value read in place (no copy on this frame), nothing kept.
    let Some(e) = (unsafe { MESH_CT_V1.get(&key) }) else {
        return Outcome::NotOurs;
    };
    let overlay = pk.hook == Hook::TcOverlayOut;
    let reverse = e.flags & CT_REVERSE != 0;
    let tunnel = e.flags & CT_TUNNEL != 0;
    if (e.flags & CT_HAIRPIN != 0 && !reverse)
        || (e.flags & CT_OVERLAY != 0) != overlay
        || (overlay && !reverse)
        || (tunnelled && (!reverse || tunnel))
        || (tunnel && pk.hook != Hook::TcTask)
    {
        return Outcome::NotOurs;
    }
    let outer_src = p.saddr[0];
    let outer_dst = p.daddr[0];
    let result = if reverse {
        // From the task's side, about a packet the client sent (client -> task): the
        // client must see its own packet (client -> frontend), from the frontend; a
        // SNATed client (a task landing on itself, ...) its own address again.
        let client = if e.flags & CT_HAIRPIN != 0 {
            e.hairpin_addr
        } else {
            0
        };
        let quoted = rewrite_quote(ctx, icmp, inner, &q, 16, 2, e.nat_addr, e.nat_port, client)
            .and_then(|_| skb::set_addr(ctx, l3, 12, icmp, 0, outer_src, e.nat_addr))
            .and_then(|_| match client {
                0 => Ok(()),
                _ => skb::set_addr(ctx, l3, 16, icmp, 0, outer_dst, client),
            });
        if quoted.is_err() {
            return pk.drop(Reason::DropRewriteFailed);
        }
        if overlay {
            // Docker's bridge delivers it, as it did the flow's packets.
            return pk.done(Reason::FwdIcmpError, TC_ACT_OK);
        }
        if tunnel {
            // Back to the node that balanced the flow, which translates it again.
            return encap_later(e.peer, e.vni);
        }
        skb::set_macs(ctx, &e.mac_dst, &e.mac_src).map(|_| e.ifindex)
    } else {
        // From the client's side, about a reply (frontend -> client): the task must see
        // its own packet (task -> client), addressed to it.
        // SAFETY: map values read in place, nothing kept.
        let ep = unsafe { MESH_BE_V1.get(&e.backend_id) }
            .and_then(|b| unsafe { MESH_EP_V1.get(&b.addr) });
        match ep {
            None => Err(()),
            Some(ep) => rewrite_quote(ctx, icmp, inner, &q, 12, 0, e.nat_addr, e.nat_port, 0)
                .and_then(|_| skb::set_addr(ctx, l3, 16, icmp, 0, outer_dst, e.nat_addr))
                .and_then(|_| skb::set_macs(ctx, &ep.mac, &ep.host_mac))
                .map(|_| ep.ifindex),
        }
    };
    match result {
        Ok(ifindex) => pk.done(Reason::FwdIcmpError, skb::redirect(ifindex)),
        Err(()) => pk.drop(Reason::DropRewriteFailed),
    }
}
