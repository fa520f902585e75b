//! The answers for flows nobody serves: a TCP RST or an ICMP port unreachable, back out
//! of the interface the packet came in on.

use mesh_common::{
    parse::Frag,
    proto::{IPPROTO_TCP, TCP_RST},
    reason::Reason,
};

use crate::{
    flow::{Outcome, Pkt},
    reply,
    scratch::scratch,
    skb,
};

/// [`refuse`] for the reason in `Scratch::go`.
#[inline(always)]
pub(super) fn refuse_go(pk: &Pkt) -> Outcome {
    let reason = scratch().map_or(Reason::ReplyRstNoBackend, |s| s.go.reason);
    refuse(pk, reason)
}

/// Nobody will serve this flow: answer it (TCP RST, ICMP port unreachable for UDP) back
/// out of the interface it came in on, rather than black-holing it. `tcp_reason` names
/// why, for TCP.
#[inline(never)]
pub(crate) fn refuse(pk: &Pkt, tcp_reason: Reason) -> Outcome {
    if pk.p.frag == Frag::Followed {
        // No answer from a fragment after the first: its first one had it.
        return pk.drop(Reason::DropCannotReply);
    }
    let (reason, built) = if pk.f.proto == IPPROTO_TCP {
        if pk.f.tcp_flags & TCP_RST != 0 {
            // Never answer a RST.
            return pk.drop(Reason::DropCannotReply);
        }
        (tcp_reason, reply::tcp_rst(pk.ctx, pk.p, &pk.f))
    } else {
        (
            Reason::ReplyIcmpUnreachable,
            reply::port_unreachable(pk.ctx, pk.p),
        )
    };
    if built.is_err() {
        return pk.drop(Reason::DropCannotReply);
    }
    pk.done(reason, skb::redirect(pk.ifindex()))
}
