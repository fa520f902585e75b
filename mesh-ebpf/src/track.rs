//! The one conntrack writer. Every hook that starts a flow (TC's load balancer, a flow
//! arriving through the tunnel, a VIP flow on Docker's overlay, XDP) builds the flow's
//! entries in per-CPU scratch memory ([`NewFlow`]) with [`begin`] and its own fields,
//! then [`commit`] writes them: the reverse entry first, so that a reply can never find
//! a forward entry without its way back. Neither function takes anything on the stack
//! but a flag: their frames stay small wherever they sit on a call chain.

use mesh_common::{
    ct::{self, CtKey, CtState, CT_REVERSE},
    proto::IPPROTO_TCP,
};

use crate::{
    maps::MESH_CT_V1,
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
    nf.rev.state = if tcp { CtState::SynSent as u8 } else { CtState::Udp as u8 };
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
