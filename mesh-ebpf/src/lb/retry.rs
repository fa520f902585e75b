//! A refused or unanswered SYN given another backend: a backend's RST to the SYN held
//! back once per connection where the service has another (`hold_refusal`), and the salt
//! for the retransmitted SYN's new choice (`retry_salt`). Used by the conntrack lookup and
//! by flows arriving through the tunnel.

use mesh_common::{
    ct::{self, CtEntry, CtKey, CtState, CT_HAIRPIN, CT_RETRIED},
    proto::IPPROTO_TCP,
};

use super::choose::maglev_pick_salted;
use crate::{
    flow::Pkt,
    maps::{MESH_CT_V1, MESH_SVC_V1},
    scratch::scratch,
};

/// A backend refused a new connection (RST to the SYN it was sent; `e` is the reply
/// entry, not yet advanced): true when the refusal is to be held back. A task Docker is
/// deactivating refuses at once, before any agent can know; held back once per
/// connection where the service has another backend, the client's SYN retransmit a
/// second later is given another one (`retry_salt`). Its own BPF function.
#[inline(never)]
pub(super) fn hold_refusal(pk: &Pkt, e: &CtEntry) -> bool {
    let state = CtState::from_u8(e.state).unwrap_or(CtState::Established);
    if pk.f.proto != IPPROTO_TCP || !ct::refused(state, pk.f.tcp_flags) {
        return false;
    }
    let client = if e.flags & CT_HAIRPIN != 0 {
        e.hairpin_addr
    } else {
        pk.f.daddr
    };
    let fkey = CtKey::new(client, e.nat_addr, pk.f.dport, e.nat_port, pk.f.proto);
    let Some(fwd) = MESH_CT_V1.get_ptr_mut(&fkey) else {
        return false;
    };
    // SAFETY: a map value pointer for this run.
    let fwd = unsafe { &mut *fwd };
    if fwd.flags & CT_RETRIED != 0 {
        return false;
    }
    // SAFETY: copied out at once.
    let active = unsafe { MESH_SVC_V1.get(&fwd.svc_id) }.map_or(0, |s| s.active);
    if active < 2 {
        return false;
    }
    fwd.flags |= CT_RETRIED;
    true
}

/// A retried SYN: removes the reply entry of the forward entry `e` (a late answer from
/// the silent backend must not reach the client) and returns the salt for the new
/// choice: the retry's second (odd, so never 0) or the next odd salt whose slot names
/// another backend, where the service has one. Its own BPF function: its frame is gone
/// before the new flow's deeper call chain starts.
#[inline(never)]
pub(super) fn retry_salt(pk: &Pkt, e: &CtEntry, now: u64) -> u32 {
    let client = if e.flags & CT_HAIRPIN != 0 {
        e.hairpin_addr
    } else {
        pk.f.saddr
    };
    let rev = CtKey::new(e.nat_addr, client, e.nat_port, pk.f.sport, pk.f.proto);
    let _ = MESH_CT_V1.remove(&rev);
    if let Some(s) = scratch() {
        s.retry = CT_RETRIED;
    }
    let base = (now / 1_000_000_000) as u32 | 1;
    // SAFETY: copied out at once.
    let Some(svc) = (unsafe { MESH_SVC_V1.get(&e.svc_id) }).copied() else {
        return base;
    };
    if svc.maglev_size == 0 || svc.active < 2 {
        return base;
    }
    // Up to eight tries (each a fresh slot): another backend, all but surely.
    let mut k = 0;
    while k < 8 {
        let salt = base.wrapping_add(k * 2);
        if maglev_pick_salted(&svc, &pk.f, salt) != Some(e.backend_id) {
            return salt;
        }
        k += 1;
    }
    base
}
