//! The one conntrack writer. Every hook that starts a flow (TC's load balancer, a flow
//! arriving through the tunnel, a VIP flow on Docker's overlay, XDP) builds the flow's
//! entries in per-CPU scratch memory ([`NewFlow`]) with [`begin`] and its own fields,
//! then [`commit`] writes them: the reverse entry first, so that a reply can never find
//! a forward entry without its way back. Neither function takes anything on the stack
//! but a flag: their frames stay small wherever they sit on a call chain.
//!
//! Fragments: a datagram's fragments after the first have no L4 header. When a first
//! fragment is translated its ports are recorded ([`record_first`]); the others get
//! them back right after parsing ([`follow`]) and take the same conntrack path.

use mesh_common::{
    ct::{self, CtKey, CtState, FragKey, FragPorts, CT_REVERSE},
    parse::{Frag, Parsed},
    proto::{IPPROTO_TCP, IPPROTO_UDP},
};

use crate::{
    maps::{MESH_CT_V1, MESH_FRAG_V1},
    scratch::{scratch, zero, NewFlow},
};

/// Starts the entries of a new flow whose request has tuple `fwd_key` and TCP flags
/// `tcp_flags`, seen at `now`: both entries idle out after `idle_s`; the reverse one is
/// `CT_REVERSE` and waits for the reply (TCP: `SynSent`), the forward one starts in the
/// state the request implies. Everything else is zero: the caller fills in the rest.
#[inline(never)]
pub fn begin(nf: &mut NewFlow, fwd_key: &CtKey, tcp_flags: u8, now: u64, idle_s: u32) {
    let tcp = fwd_key.proto == IPPROTO_TCP;
    zero(nf);
    nf.fwd_key = *fwd_key;
    nf.rev.last_seen_ns = now;
    nf.rev.created_ns = now;
    nf.rev.state = if tcp {
        CtState::SynSent as u8
    } else {
        CtState::Udp as u8
    };
    nf.rev.flags = CT_REVERSE;
    nf.rev.idle_s = idle_s;
    nf.fwd.last_seen_ns = now;
    nf.fwd.created_ns = now;
    nf.fwd.state = ct::initial(fwd_key.proto, tcp_flags) as u8;
    nf.fwd.idle_s = idle_s;
}

/// Writes the flow in scratch memory: the reverse entry, then (`both`) the forward one.
/// `Err` when the table refused an entry (the caller counts `DropCtFull`).
#[inline(never)]
pub fn commit(both: bool) -> Result<(), ()> {
    let Some(s) = scratch() else {
        return Err(());
    };
    let nf = &s.nf;
    MESH_CT_V1.insert(&nf.rev_key, &nf.rev, 0).map_err(|_| ())?;
    if both {
        MESH_CT_V1.insert(&nf.fwd_key, &nf.fwd, 0).map_err(|_| ())?;
    }
    Ok(())
}

/// The fragment table's key for the datagram `p` belongs to (as this hook sees it).
#[inline(always)]
fn frag_key(p: &Parsed) -> FragKey {
    FragKey::new(p.saddr[0], p.daddr[0], p.ip_id, p.l4_proto)
}

/// A first fragment (TCP/UDP) was translated: records its ports for the rest of its
/// datagram. A failed insert only leaves those unmatched (counted where they pass).
#[inline(never)]
pub fn record_first(p: &Parsed) {
    if p.frag != Frag::First || !matches!(p.l4_proto, IPPROTO_TCP | IPPROTO_UDP) {
        return;
    }
    let ports = FragPorts {
        sport: p.sport,
        dport: p.dport,
    };
    let _ = MESH_FRAG_V1.insert(&frag_key(p), &ports, 0);
}

/// A non-first TCP/UDP fragment whose first one was translated here: its ports back
/// from the record, and `Frag::Followed` (only its L3 header will be rewritten). Any
/// other packet is left as parsed.
#[inline(never)]
pub fn follow(p: &mut Parsed) {
    if p.frag != Frag::NonFirst
        || p.ip_version != 4
        || !matches!(p.l4_proto, IPPROTO_TCP | IPPROTO_UDP)
    {
        return;
    }
    // SAFETY: copied out at once.
    if let Some(ports) = unsafe { MESH_FRAG_V1.get(&frag_key(p)) }.copied() {
        p.sport = ports.sport;
        p.dport = ports.dport;
        p.frag = Frag::Followed;
    }
}
