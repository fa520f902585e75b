//! The conntrack lookup of the packet in hand, and the packets of a tracked flow: a
//! retried SYN given a backend afresh, a backend's refusal held back once, a tracked
//! request sent on to its backend (or refused when it is gone); a miss runs the new
//! flow's stages.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use mesh_common::{
    ct::{self, CtEntry, CtState, CT_HAIRPIN, CT_OVERLAY, CT_REVERSE, CT_TUNNEL},
    lb::BackendState,
    proto::TCP_RST,
    reason::Reason,
    stats::Hook,
};

use super::{
    choose::{choose, go_to},
    client::client,
    nat::to_client,
    retry::{hold_refusal, retry_salt},
    track_new::track_new,
    tunnel::tunnel_reply,
};
use crate::{
    flow::{Outcome, Pkt},
    maps::{MESH_BE_V1, MESH_CT_V1},
    scratch::scratch,
    stats::{count, note_backend},
};

/// The step for a packet of a tracked flow, or the new flow's.
#[inline(always)]
pub(super) fn lookup(pk: &Pkt) -> Outcome {
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let key = pk.f.key();
    let mut salt = 0u32;
    if let Some(e) = MESH_CT_V1.get_ptr_mut(&key) {
        // SAFETY: a map value pointer valid for this program run; plain data.
        let e = unsafe { &mut *e };
        let state = CtState::from_u8(e.state).unwrap_or(CtState::Established);
        let reverse = e.flags & CT_REVERSE != 0;
        if e.flags & CT_OVERLAY != 0 {
            // A VIP flow on Docker's overlay: the overlay hooks' own.
            return Outcome::NotOurs;
        }
        if reverse && pk.hook != Hook::TcTask {
            // Reply entries match what tasks send. On the underlay such a tuple is a
            // spoof of a task's address (genuine replies come back through the tunnel,
            // which has its own path): not ours.
            return Outcome::NotOurs;
        }
        if ct::expired(state, e.idle_s, e.last_seen_ns, now) {
            count(pk.hook, Reason::ObsCtExpired, pk.bytes);
        } else if !reverse && ct::reopens(state, pk.f.tcp_flags) {
            count(pk.hook, Reason::ObsCtReopened, pk.bytes);
        } else if !reverse && ct::syn_retried(state, pk.f.tcp_flags, e.created_ns, now) {
            // The backend never answered the first SYN (starting, shutting down, gone
            // silent): forget its way back (a late answer must not reach the client)
            // and choose again, with the retry's second as the salt.
            count(pk.hook, Reason::ObsSynRetried, pk.bytes);
            salt = retry_salt(pk, e, now);
        } else if reverse && ct::stale_reply(state, pk.f.tcp_flags) {
            // A SYN-ACK on the reply entry of a finished flow: the client reused its
            // port for a connection that is not ours. Forget the old flow; never
            // translate the new one.
            count(pk.hook, Reason::ObsCtReopened, pk.bytes);
            let _ = MESH_CT_V1.remove(&key);
            return Outcome::NotOurs;
        } else if reverse
            && e.flags & CT_TUNNEL == 0
            && pk.f.tcp_flags & TCP_RST != 0
            && hold_refusal(pk, e)
        {
            return pk.drop(Reason::DropSynRefused);
        } else {
            count(pk.hook, Reason::ObsCtHit, pk.bytes);
            note_backend(e.backend_id, false);
            e.state = ct::advance(state, pk.f.tcp_flags) as u8;
            e.last_seen_ns = now;
            return if e.flags & CT_TUNNEL != 0 {
                tunnel_reply(pk, e)
            } else if e.flags & CT_REVERSE != 0 {
                to_client(pk, e)
            } else {
                tracked_to_task(pk, e)
            };
        }
    }
    // A packet that starts (or restarts) a flow: find its service and backend, decide
    // how its client must look, track both directions, then deliver or tunnel.
    let step = choose(pk, now, salt);
    if step != Outcome::CHOSEN {
        return step;
    }
    let step = client(pk);
    if step != Outcome::CHOSEN {
        return step;
    }
    track_new(pk)
}

/// A packet of a tracked flow from the client side.
#[inline(never)]
fn tracked_to_task(pk: &Pkt, e: &mut CtEntry) -> Outcome {
    // SAFETY: a map value read at once.
    let live = unsafe { MESH_BE_V1.get(&e.backend_id) }
        .filter(|b| b.state != BackendState::Gone as u8)
        .map(|b| b.addr);
    let Some(s) = scratch() else {
        return pk.drop(Reason::DropCtFull);
    };
    let Some(be_addr) = live else {
        // Close the entry: a retried SYN reopens the flow on a live backend.
        e.state = CtState::Closed as u8;
        s.go.reason = Reason::ReplyRstBackendGone;
        return Outcome::REFUSE;
    };
    s.go.nat_addr = e.nat_addr;
    s.go.nat_port = e.nat_port;
    s.go.hairpin = if e.flags & CT_HAIRPIN != 0 {
        e.hairpin_addr
    } else {
        0
    };
    go_to(pk, s, be_addr)
}
