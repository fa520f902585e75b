//! New flow, stage 1: the frontend (exact, else "any node address"), the service, the
//! Maglev slot, the backend, and where it is: a local endpoint or a tunnel.

use mesh_common::{
    lb::{Frontend, FrontendKey, FE_VIP},
    parse::Frag,
    proto::IPPROTO_TCP,
    reason::Reason,
    stats::Hook,
};

use crate::{
    flow::{Flow, Outcome, Pkt},
    maps::{
        MESH_BE_V1, MESH_EP_V1, MESH_FE_V1, MESH_MAGLEV_V1, MESH_NODE_V1, MESH_SVC_V1, MESH_TUN_V1,
    },
    scratch::{scratch, Scratch},
    track,
};

/// Points `s.go` at the task `addr`: a local one (its endpoint) or one on another node
/// (its tunnel).
#[inline(always)]
pub(super) fn go_to(pk: &Pkt, s: &mut Scratch, addr: u32) -> Outcome {
    // SAFETY: map values copied out at once.
    if let Some(ep) = unsafe { MESH_EP_V1.get(&addr) } {
        s.go.ep = *ep;
        s.go.local = 1;
        return Outcome::DELIVER;
    }
    // SAFETY: as above.
    match unsafe { MESH_TUN_V1.get(&addr) } {
        Some(t) => {
            s.go.tun = *t;
            s.go.local = 0;
            Outcome::TUNNEL
        }
        None => pk.drop(Reason::DropBackendNotLocal),
    }
}

/// Frontend for (daddr, dport, proto): an exact entry, else, when `daddr` is one of this
/// node's addresses, the "any node address" entry (published ports).
#[inline(always)]
fn frontend(pk: &Pkt) -> Option<Frontend> {
    frontend_for(&pk.f, pk.hook)
}

/// As [`frontend`], for any hook (XDP shares it).
#[inline(always)]
pub fn frontend_for(f: &Flow, hook: Hook) -> Option<Frontend> {
    let mut key = FrontendKey {
        addr: f.daddr,
        port: f.dport,
        proto: f.proto,
        _pad: 0,
    };
    // SAFETY: values are copied out before any map update.
    let fe = match unsafe { MESH_FE_V1.get(&key) } {
        Some(fe) => *fe,
        None => {
            // SAFETY: as above.
            unsafe { MESH_NODE_V1.get(&f.daddr) }?;
            key.addr = 0;
            *unsafe { MESH_FE_V1.get(&key) }?
        }
    };
    // A VIP is for tasks (east-west), not for the outside world.
    if fe.flags & FE_VIP != 0 && hook != Hook::TcTask {
        return None;
    }
    Some(fe)
}

/// New flow, stage 1: its service and backend (Maglev, moved by `salt` for a retried
/// SYN), where that backend is, and the start of its conntrack entries, all in scratch
/// memory. [`Outcome::CHOSEN`], or the flow's final step (not ours, refused, dropped,
/// or a task-to-task flow tunnelled as it is).
#[inline(never)]
pub(super) fn choose(pk: &Pkt, now: u64, salt: u32) -> Outcome {
    let f = &pk.f;
    let Some(fe) = frontend(pk) else {
        return overlay_route(pk);
    };
    if pk.p.frag == Frag::Followed {
        // Its first fragment's flow is gone (expired, evicted): a fragment never starts
        // one.
        return Outcome::NotOurs;
    }
    let Some(s) = scratch() else {
        return pk.drop(Reason::DropCtFull);
    };
    // SAFETY: a map value read in place, nothing kept.
    let svc = unsafe { MESH_SVC_V1.get(&fe.svc_id) };
    let Some(svc) = svc.filter(|s| s.active > 0 && s.maglev_size > 0) else {
        s.go.reason = Reason::ReplyRstNoBackend;
        return Outcome::REFUSE;
    };
    let Some(be_id) = maglev_pick_salted(svc, f, salt) else {
        return pk.drop(Reason::DropNoBackendSlot);
    };
    let idle_s = if f.proto == IPPROTO_TCP {
        svc.tcp_idle_s
    } else {
        svc.udp_idle_s
    };
    // SAFETY: as above.
    let Some(be) = (unsafe { MESH_BE_V1.get(&be_id) }) else {
        return pk.drop(Reason::DropNoBackendSlot);
    };
    s.go.be_addr = be.addr;
    s.go.nat_port = be.port;
    let step = go_to(pk, s, be.addr);
    // A local task is reached at its delivery address; a remote one at its own.
    s.go.nat_addr = if step == Outcome::DELIVER {
        s.go.ep.delivery_addr
    } else {
        be.addr
    };
    track::begin(&mut s.nf, &f.key(), f.tcp_flags, now, idle_s);
    s.nf.rev.backend_id = be_id;
    s.nf.rev.svc_id = fe.svc_id;
    s.nf.fwd.backend_id = be_id;
    s.nf.fwd.svc_id = fe.svc_id;
    if step == Outcome::DELIVER || step == Outcome::TUNNEL {
        Outcome::CHOSEN
    } else {
        step
    }
}

/// The backend id the Maglev table of `svc` gives flow `f` (client IP only with
/// affinity).
#[inline(always)]
pub fn maglev_pick(svc: &mesh_common::lb::Service, f: &Flow) -> Option<u32> {
    maglev_pick_salted(svc, f, 0)
}

/// As [`maglev_pick`], moved by `salt` (0: the flow's own slot) unless the service has
/// client affinity, which a retry must keep.
#[inline(always)]
pub(crate) fn maglev_pick_salted(
    svc: &mesh_common::lb::Service,
    f: &Flow,
    salt: u32,
) -> Option<u32> {
    let slot = svc.maglev_off.wrapping_add(mesh_common::lb::maglev_slot(
        svc, f.saddr, f.daddr, f.sport, f.dport, f.proto, salt,
    ));
    match MESH_MAGLEV_V1.get(slot) {
        Some(id) if *id != 0 => Some(*id),
        _ => None,
    }
}

/// No frontend: a task sending to a task on another node is tunnelled there as it is
/// (the overlay's plain routing); anything else is not ours.
#[inline(always)]
fn overlay_route(pk: &Pkt) -> Outcome {
    if pk.hook != Hook::TcTask {
        return Outcome::NotOurs;
    }
    // SAFETY: a map value copied out at once.
    let (Some(t), Some(s)) = (unsafe { MESH_TUN_V1.get(&pk.f.daddr) }, scratch()) else {
        return Outcome::NotOurs;
    };
    s.go.tun = *t;
    s.go.local = 0;
    s.go.nat_addr = pk.f.daddr;
    s.go.nat_port = pk.f.dport;
    s.go.hairpin = 0;
    Outcome::TUNNEL
}
