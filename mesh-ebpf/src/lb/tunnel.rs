//! The tunnel: a flow's packets out toward a backend on another node and a tunnelled
//! task's replies back to the node that balanced them; what comes out of the tunnel
//! (replies for our clients, packets for local tasks); ICMP "fragmentation needed" when a
//! packet will not fit once encapsulated.

use aya_ebpf::{bindings::TC_ACT_SHOT, helpers::bpf_ktime_get_ns, programs::TcContext};
use mesh_common::{
    ct::{self, CtEntry, CtKey, CtState, CT_OVERLAY, CT_REVERSE, CT_TUNNEL},
    lb::{TaskPort, TCP_IDLE_DEFAULT_S, UDP_IDLE_DEFAULT_S},
    parse::Frag,
    proto::{IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, TCP_ACK, TCP_RST, TCP_SYN},
    reason::Reason,
    stats::Hook,
};

use super::{
    nat::{deliver, to_client, toward_backend, toward_client},
    retry::hold_refusal,
};
use crate::{
    flow::{encap_later, Outcome, Pkt},
    icmp,
    maps::{MESH_CT_V1, MESH_EPIDLE_V1, MESH_EP_V1},
    reply,
    scratch::scratch,
    skb,
    stats::{count, note_backend},
    track, vxlan,
};

/// The packet will not fit the underlay once encapsulated: tell its sender the overlay
/// MTU (ICMP fragmentation needed, built from the packet as the sender sent it).
#[inline(never)]
fn too_big(pk: &Pkt, mtu: u32) -> Outcome {
    if pk.p.frag == Frag::Followed || reply::frag_needed(pk.ctx, pk.p, mtu).is_err() {
        return pk.drop(Reason::DropCannotReply);
    }
    pk.done(Reason::ReplyIcmpFragNeeded, skb::redirect(pk.ifindex()))
}

/// NAT as for a local delivery (`Scratch::go`), then into the tunnel toward the
/// backend's node.
#[inline(never)]
pub(super) fn tunnel_out(pk: &Pkt) -> Outcome {
    if let Some(mtu) = vxlan::too_big(pk.ctx, pk.p.l4_off as usize) {
        return too_big(pk, mtu);
    }
    let Some(s) = scratch() else {
        return pk.drop(Reason::DropRewriteFailed);
    };
    let (node, vni) = (s.go.tun.node, s.go.tun.vni);
    if pk.p.l3_off != 14 || toward_backend(pk, s.go.nat_addr, s.go.nat_port, s.go.hairpin).is_err()
    {
        return pk.drop(Reason::DropRewriteFailed);
    }
    encap_later(node, vni)
}

/// A task's reply to a flow that reached it through the tunnel: back through the tunnel
/// to the node the flow came from (which reverse-NATs it for the client).
#[inline(never)]
pub(super) fn tunnel_reply(pk: &Pkt, e: &CtEntry) -> Outcome {
    if let Some(mtu) = vxlan::too_big(pk.ctx, pk.p.l4_off as usize) {
        return too_big(pk, mtu);
    }
    if pk.p.l3_off != 14 || toward_client(pk, e.nat_addr, e.nat_port, 0).is_err() {
        return pk.drop(Reason::DropRewriteFailed);
    }
    encap_later(e.peer, e.vni)
}

/// The parsed inner packet of VXLAN from a peer (`Scratch::parsed`, `Scratch::from`).
#[inline(never)]
pub fn from_tunnel(ctx: &TcContext, hook: Hook) -> i32 {
    let Some(s) = scratch() else {
        return TC_ACT_SHOT;
    };
    let (p, from) = (&s.parsed, &s.from);
    let pk = Pkt::new(ctx, p, hook, from.bytes as usize);
    if p.ip_version == 4 {
        match p.l4_proto {
            // (A fragment after the first: where it follows its first one.)
            IPPROTO_TCP | IPPROTO_UDP if p.l4_off != 0 || p.frag == Frag::Followed => {
                return from_tunnel_flow(&pk, from.peer, from.vni);
            }
            // A task's ICMP error about a flow this node balanced (its port unreachable,
            // through its node's tunnel): translated for the client.
            IPPROTO_ICMP if p.l4_off != 0 && icmp::is_error(p.icmp_type) => {
                if let Some(action) = icmp::translate(&pk, true).action() {
                    return action;
                }
            }
            _ => {}
        }
    }
    pk.drop(Reason::DropVxlanBadInner)
        .action()
        .unwrap_or(TC_ACT_SHOT)
}

/// The inner packet of VXLAN from `peer`: a reply to a flow this node balanced (back to
/// its client), or a packet for a task on this node (delivered; its replies will go
/// back through the tunnel to `peer`).
#[inline(always)]
fn from_tunnel_flow(pk: &Pkt, peer: u32, vni: u32) -> i32 {
    let f = &pk.f;
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some(e) = MESH_CT_V1.get_ptr_mut(&f.key()) {
        // SAFETY: a map value pointer for this run.
        let e = unsafe { &mut *e };
        let state = CtState::from_u8(e.state).unwrap_or(CtState::Established);
        if e.flags & CT_REVERSE != 0
            && e.flags & (CT_TUNNEL | CT_OVERLAY) == 0
            && !ct::expired(state, e.idle_s, e.last_seen_ns, now)
        {
            // Only an RST can be a refusal: the call stays off every other reply.
            if f.tcp_flags & TCP_RST != 0 && hold_refusal(pk, e) {
                return pk
                    .drop(Reason::DropSynRefused)
                    .action()
                    .unwrap_or(TC_ACT_SHOT);
            }
            count(pk.hook, Reason::ObsCtHit, pk.bytes);
            note_backend(e.backend_id, false);
            e.state = ct::advance(state, f.tcp_flags) as u8;
            e.last_seen_ns = now;
            return to_client(pk, e).action().unwrap_or(TC_ACT_SHOT);
        }
    }
    tunnelled_to_task(pk, peer, vni, now)
        .action()
        .unwrap_or(TC_ACT_SHOT)
}

/// A packet for a task on this node from `peer`'s tunnel: delivered, with a reply entry
/// that sends what the task answers back through the tunnel (written afresh unless the
/// same flow already has it).
#[inline(never)]
fn tunnelled_to_task(pk: &Pkt, peer: u32, vni: u32, now: u64) -> Outcome {
    let f = &pk.f;
    let Some(s) = scratch() else {
        return pk.drop(Reason::DropCtFull);
    };
    // SAFETY: a map value copied out at once.
    let Some(ep) = (unsafe { MESH_EP_V1.get(&f.daddr) }) else {
        return pk.drop(Reason::DropVxlanNoTarget);
    };
    s.go.ep = *ep;
    let rkey = CtKey::new(ep.delivery_addr, f.saddr, f.dport, f.sport, f.proto);
    let fresh = match MESH_CT_V1.get_ptr_mut(&rkey) {
        // SAFETY: a map value pointer for this run.
        Some(e) => unsafe {
            let e = &mut *e;
            let same = e.flags & CT_TUNNEL != 0 && e.peer == peer && e.vni == vni;
            if same {
                e.last_seen_ns = now;
                if f.proto == IPPROTO_TCP
                    && f.tcp_flags & TCP_SYN != 0
                    && f.tcp_flags & TCP_ACK == 0
                {
                    // A new flow on a tuple whose last flow finished (the client
                    // reused its port): without this the task's SYN-ACK would meet a
                    // finished entry, be taken for someone else's reply and never
                    // reach the tunnel (a 1 s SYN retransmit for the client).
                    e.state = CtState::SynSent as u8;
                    e.created_ns = now;
                }
            }
            !same
        },
        None => true,
    };
    if fresh {
        let tcp = f.proto == IPPROTO_TCP;
        // The task's service's timeouts (the node that balanced the flow has them in
        // its service entry; this one only knows the task), else the defaults.
        let at = |port| TaskPort {
            addr: f.daddr,
            port,
            _pad: 0,
        };
        // SAFETY: map values copied out at once.
        let idle = unsafe {
            MESH_EPIDLE_V1
                .get(&at(f.dport))
                .or_else(|| MESH_EPIDLE_V1.get(&at(0)))
        }
        .copied()
        .unwrap_or_default();
        let idle_s = match (tcp, idle.tcp_idle_s, idle.udp_idle_s) {
            (true, 0, _) => TCP_IDLE_DEFAULT_S,
            (true, t, _) => t,
            (false, _, 0) => UDP_IDLE_DEFAULT_S,
            (false, _, u) => u,
        };
        track::begin(&mut s.nf, &f.key(), f.tcp_flags, now, idle_s);
        let nf = &mut s.nf;
        nf.rev_key = rkey;
        nf.rev.nat_addr = f.daddr;
        nf.rev.nat_port = f.dport;
        // Picked up mid-flow (this node's agent restarted, the LRU forgot): established.
        if tcp && f.tcp_flags & TCP_SYN == 0 {
            nf.rev.state = CtState::Established as u8;
        }
        nf.rev.flags = CT_REVERSE | CT_TUNNEL;
        nf.rev.peer = peer;
        nf.rev.vni = vni;
        if track::commit(false).is_err() {
            return pk.drop(Reason::DropCtFull);
        }
    }
    s.go.nat_addr = s.go.ep.delivery_addr;
    s.go.nat_port = f.dport;
    s.go.hairpin = 0;
    deliver(pk)
}
