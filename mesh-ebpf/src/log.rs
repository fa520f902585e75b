//! The datapath log, opt-in: aya-log records of a few events (a new flow's backend, a
//! drop and its reason), written only while the switch `MESH_LOG_V1[0]` is on (`meshctl
//! log on`; the agent reads them into its own log). Off, a log point costs one array
//! lookup and a branch: no record is built. The records are written at the top of a TC
//! program's call chain ([`after`]), where a frame adds nothing to the deep path's; the
//! deep path only notes a drop's reason in scratch memory ([`note_drop`]), and only
//! while the switch is on.

use aya_ebpf::{btf_maps::Array, macros::btf_map, programs::TcContext};
use aya_log_ebpf::{info, warn};
use mesh_common::{maps, reason::Reason};

use crate::{maps::MESH_BE_V1, scratch::scratch};

#[btf_map]
pub static MESH_LOG_V1: Array<u32, { maps::LOG_SWITCH.entries as usize }> = Array::new();

/// Whether the switch is on.
#[inline(always)]
pub fn on() -> bool {
    MESH_LOG_V1.get(0).is_some_and(|v| *v != 0)
}

/// Notes the reason the packet in hand is dropped, for [`after`] (while the log is on).
#[inline(always)]
pub fn note_drop(reason: Reason) {
    if on() {
        if let Some(s) = scratch() {
            s.log_drop = reason as u32;
        }
    }
}

/// The log points of a TC program, once it has decided (while the log is on): a new
/// flow's backend (`Scratch::noted_be`, before `stats::count_noted` takes it) and a drop
/// noted on the way. Its own BPF function, called from the entry point.
#[inline(never)]
pub fn after(ctx: &TcContext) {
    let Some(s) = scratch() else {
        return;
    };
    let drop = core::mem::take(&mut s.log_drop);
    let p = &s.parsed;
    let (saddr, daddr) = (p.saddr[0].to_ne_bytes(), p.daddr[0].to_ne_bytes());
    // (Ports as parsed: host order; addresses and a backend's port: network order.)
    let (sport, dport) = (p.sport, p.dport);
    let proto = p.l4_proto;
    if drop != 0 {
        warn!(
            ctx,
            "drop reason={} {:i}:{} -> {:i}:{} proto {}", drop, saddr, sport, daddr, dport, proto
        );
    } else if s.noted_new != 0 && s.noted_be != 0 {
        let id = s.noted_be;
        // SAFETY: a map value read at once.
        let (be, be_port) = unsafe { MESH_BE_V1.get(&id) }.map_or((0, 0), |b| (b.addr, b.port));
        info!(
            ctx,
            "new flow {:i}:{} -> {:i}:{} proto {}: backend {} {:i}:{}",
            saddr,
            sport,
            daddr,
            dport,
            proto,
            id,
            be.to_ne_bytes(),
            u16::from_be(be_port)
        );
    }
}
