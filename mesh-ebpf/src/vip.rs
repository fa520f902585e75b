//! East-west on Docker's overlay: a task reaching a service VIP through its overlay
//! interface (Docker's DNS answers the VIP; without IPVS in the task nothing else does).
//! Runs at TC on the host side of each local task's overlay veth, in the overlay
//! network's namespace. Ingress (what the task sends): answers ARP for VIPs, and
//! rewrites a flow to a VIP toward the task Maglev picks, addressed to that task's MAC;
//! Docker's bridge and vxlan device then carry it, locally or to another node. Egress
//! (what reaches the task): replies of those flows get the VIP back as their source.
//! The flow's entries carry `CT_OVERLAY`: no other hook acts on them.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, TC_ACT_UNSPEC},
    helpers::{bpf_fib_lookup, bpf_ktime_get_ns, bpf_redirect_neigh},
    programs::TcContext,
};
use mesh_common::{
    arp,
    ct::{self, CtKey, CtState, CT_OVERLAY, CT_REVERSE, CT_ROUTED},
    lb::{any_port_vip, docker_mac, BackendState, FE_VIP},
    parse::{Frag, Parsed},
    proto::{IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP},
    reason::Reason,
    stats::Hook,
};

use crate::{
    flow::{Outcome, Pkt},
    icmp, lb,
    maps::{MESH_BE_V1, MESH_CT_V1, MESH_FE_V1, MESH_SVC_V1},
    scratch::scratch,
    skb,
    stats::{count, note_backend},
    track,
};

/// Ingress on a task's overlay veth.
#[inline(never)]
pub fn from_task(ctx: &TcContext, p: &Parsed, bytes: usize) -> i32 {
    let hook = Hook::TcOverlayIn;
    if p.eth_type == arp::ETH_P_ARP && p.vlan_tags == 0 {
        return answer_arp(ctx, bytes);
    }
    if !ipv4_l4(p) {
        count(hook, p.verdict(), bytes);
        return TC_ACT_UNSPEC;
    }
    let pk = Pkt::new(ctx, p, hook, bytes);
    let mut outcome = forward(&pk);
    if outcome == Outcome::NO_BACKEND {
        // Called from here, not from the new flow's frame: the frames never add up.
        outcome = lb::refuse(&pk, Reason::ReplyRstNoBackend);
    }
    crate::stats::count_noted(bytes);
    match outcome.action() {
        Some(action) => action,
        None => {
            count(hook, p.verdict(), bytes);
            TC_ACT_UNSPEC
        }
    }
}

/// Egress on a task's overlay veth: replies of the task's VIP flows, and ICMP errors
/// about them (the chosen task's port unreachable: the caller must see it from the VIP).
#[inline(never)]
pub fn to_task(ctx: &TcContext, p: &Parsed, bytes: usize) -> i32 {
    let hook = Hook::TcOverlayOut;
    if ipv4_l4(p) {
        let pk = Pkt::new(ctx, p, hook, bytes);
        let outcome = reply(&pk);
        crate::stats::count_noted(bytes);
        if let Some(action) = outcome.action() {
            return action;
        }
    } else if icmp_error(p) {
        let pk = Pkt::new(ctx, p, hook, bytes);
        if let Some(action) = icmp::translate(&pk, false).action() {
            return action;
        }
    }
    count(hook, p.verdict(), bytes);
    TC_ACT_UNSPEC
}

/// IPv4 TCP/UDP with its ports: an L4 header, or a fragment that follows its first one.
#[inline(always)]
fn ipv4_l4(p: &Parsed) -> bool {
    p.ip_version == 4
        && p.l3_off == 14
        && (p.l4_off != 0 || p.frag == Frag::Followed)
        && !matches!(p.frag, Frag::NonFirst)
        && matches!(p.l4_proto, IPPROTO_TCP | IPPROTO_UDP)
}

#[inline(always)]
fn icmp_error(p: &Parsed) -> bool {
    p.ip_version == 4
        && p.l3_off == 14
        && p.l4_off != 0
        && p.l4_proto == IPPROTO_ICMP
        && icmp::is_error(p.icmp_type)
}

/// "Who has VIP?" from the task: "at `vip_mac(VIP)`", sent straight back into the task.
/// Any other ARP goes on to the bridge.
#[inline(never)]
fn answer_arp(ctx: &TcContext, bytes: usize) -> i32 {
    let hook = Hook::TcOverlayIn;
    let Ok(mut frame) = ctx.load::<[u8; arp::FRAME_LEN]>(0) else {
        count(hook, Reason::PassNonIp, bytes);
        return TC_ACT_UNSPEC;
    };
    let vip = arp::request_target(&frame);
    // SAFETY: copied out at once.
    let known = vip.and_then(|v| unsafe { MESH_FE_V1.get(&any_port_vip(v)) }.copied());
    let (Some(vip), Some(fe)) = (vip, known) else {
        count(hook, Reason::PassNonIp, bytes);
        return TC_ACT_UNSPEC;
    };
    if fe.flags & FE_VIP == 0 {
        count(hook, Reason::PassNonIp, bytes);
        return TC_ACT_UNSPEC;
    }
    arp::answer(&mut frame, arp::vip_mac(vip));
    if ctx.store(0, &frame, 0).is_err() {
        count(hook, Reason::DropRewriteFailed, bytes);
        return TC_ACT_SHOT;
    }
    count(hook, Reason::ReplyArpVip, bytes);
    // SAFETY: reading a field of the context.
    skb::redirect(unsafe { (*ctx.skb.skb).ifindex })
}

/// A task's packet: a tracked VIP flow, or a new one to a VIP; anything else is not ours.
#[inline(always)]
fn forward(pk: &Pkt) -> Outcome {
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some(e) = MESH_CT_V1.get_ptr_mut(&pk.f.key()) {
        // SAFETY: a map value pointer for this run.
        let e = unsafe { &mut *e };
        if e.flags & CT_OVERLAY != 0 && e.flags & CT_REVERSE == 0 {
            let state = CtState::from_u8(e.state).unwrap_or(CtState::Established);
            // SAFETY: copied out at once.
            let live = unsafe { MESH_BE_V1.get(&e.backend_id) }
                .is_some_and(|b| b.state != BackendState::Gone as u8);
            if live
                && !ct::expired(state, e.idle_s, e.last_seen_ns, now)
                && !ct::reopens(state, pk.f.tcp_flags)
            {
                count(pk.hook, Reason::ObsCtHit, pk.bytes);
                note_backend(e.backend_id, false);
                e.state = ct::advance(state, pk.f.tcp_flags) as u8;
                e.last_seen_ns = now;
                return toward(pk, e.nat_addr, e.nat_port, e.flags & CT_ROUTED != 0);
            }
        }
    }
    new_flow(pk, now)
}

/// A new flow to an every-port VIP: pick, track both ways, rewrite.
#[inline(never)]
fn new_flow(pk: &Pkt, now: u64) -> Outcome {
    let f = &pk.f;
    if pk.p.frag == Frag::Followed {
        // Its first fragment's flow is gone: a fragment never starts one.
        return Outcome::NotOurs;
    }
    // SAFETY: copied out at once.
    let Some(fe) = (unsafe { MESH_FE_V1.get(&any_port_vip(f.daddr)) }).copied() else {
        return Outcome::NotOurs;
    };
    if fe.flags & FE_VIP == 0 {
        return Outcome::NotOurs;
    }
    let Some((be_id, addr, port)) = pick(pk, fe.svc_id) else {
        return Outcome::NO_BACKEND;
    };
    let routed = on_link(pk) && other_bridge(pk, f.daddr, addr) != 0;
    let Some(s) = scratch() else {
        return pk.drop(Reason::DropCtFull);
    };
    // SAFETY: a map value read at once.
    let idle_s = unsafe { MESH_SVC_V1.get(&fe.svc_id) }.map_or(0, |svc| {
        if f.proto == IPPROTO_TCP {
            svc.tcp_idle_s
        } else {
            svc.udp_idle_s
        }
    });
    let nf = &mut s.nf;
    track::begin(nf, &f.key(), f.tcp_flags, now, idle_s);
    nf.rev_key = CtKey::new(addr, f.saddr, port, f.sport, f.proto);
    nf.rev.backend_id = be_id;
    nf.rev.svc_id = fe.svc_id;
    nf.rev.nat_addr = f.daddr;
    nf.rev.nat_port = f.dport;
    nf.rev.flags = CT_REVERSE | CT_OVERLAY;
    nf.fwd.backend_id = be_id;
    nf.fwd.svc_id = fe.svc_id;
    nf.fwd.nat_addr = addr;
    nf.fwd.nat_port = port;
    nf.fwd.flags = if routed {
        CT_OVERLAY | CT_ROUTED
    } else {
        CT_OVERLAY
    };
    if track::commit(true).is_err() {
        return pk.drop(Reason::DropCtFull);
    }
    count(pk.hook, Reason::ObsCtNew, pk.bytes);
    note_backend(be_id, true);
    toward(pk, addr, port, routed)
}

/// Whether the task sent the frame to the VIP itself (it takes the VIP for on its own
/// subnet), not to its gateway.
#[inline(always)]
fn on_link(pk: &Pkt) -> bool {
    pk.ctx
        .load::<[u8; 6]>(0)
        .map_or(true, |mac| mac == arp::vip_mac(pk.f.daddr))
}

/// The bridge `task` is on in the network's namespace, when it is not the one `vip` is
/// on (a network with several subnets, the task on another than the VIP's, and so than
/// its caller's); 0 otherwise. FIB lookups there, from the caller's veth. (Plain
/// integers, not `Option`s: a spilled `None` leaves its payload's stack slot unwritten,
/// and verifiers before 5.19 refuse the later read of the whole value.)
#[inline(never)]
fn other_bridge(pk: &Pkt, vip: u32, task: u32) -> u32 {
    let via_vip = bridge_of(pk, vip);
    let via_task = bridge_of(pk, task);
    if via_vip != 0 && via_task != 0 && via_vip != via_task {
        via_task
    } else {
        0
    }
}

/// The device the network's namespace routes `dst` out of (found whether or not the
/// neighbour is known yet); 0 if none.
#[inline(always)]
fn bridge_of(pk: &Pkt, dst: u32) -> u32 {
    let Some(s) = scratch() else {
        return 0;
    };
    let p = &mut s.fib;
    // SAFETY: plain data.
    *p = unsafe { core::mem::zeroed() };
    p.family = 2; // AF_INET
                  // SAFETY: reading a field of the context.
    p.ifindex = unsafe { (*pk.ctx.skb.skb).ifindex };
    p.__bindgen_anon_4.ipv4_dst = dst;
    // SAFETY: the parameters live in map memory, of their own size.
    let rc = unsafe {
        bpf_fib_lookup(
            pk.ctx.skb.skb as *mut _,
            p,
            core::mem::size_of::<aya_ebpf::bindings::bpf_fib_lookup>() as i32,
            0,
        )
    };
    // BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LKUP_RET_NO_NEIGH.
    if matches!(rc, 0 | 7) {
        p.ifindex
    } else {
        0
    }
}

/// The backend (id, address, port) for a new flow of service `svc_id`: Maglev's pick,
/// never the calling task itself while the service has another (a packet from its own
/// address would be dropped by the task as martian).
#[inline(never)]
fn pick(pk: &Pkt, svc_id: u32) -> Option<(u32, u32, u16)> {
    // SAFETY: copied out at once.
    let mut svc = unsafe { MESH_SVC_V1.get(&svc_id) }.copied()?;
    if svc.active == 0 || svc.maglev_size == 0 {
        return None;
    }
    let mut salt = 0u32;
    while salt < 8 {
        let id = lb::maglev_pick_salted(&svc, &pk.f, salt)?;
        // SAFETY: copied out at once.
        let be = unsafe { MESH_BE_V1.get(&id) }.copied()?;
        if be.addr != pk.f.saddr {
            // Port 0: the port the client dialled (every-port VIP).
            let port = if be.port == 0 { pk.f.dport } else { be.port };
            return Some((id, be.addr, port));
        }
        if svc.active < 2 {
            return None;
        }
        // Client-IP affinity ignores the salt; for the caller itself it gives way.
        svc.flags &= !mesh_common::lb::SVC_AFFINITY;
        salt += 1;
    }
    None
}

/// Destination to the backend task, and its MAC, so that the bridge hands it on. A
/// frame the task sent to its gateway (a VIP off its own subnet, on a network with
/// several) keeps the gateway as its next hop: the network's namespace routes it on to
/// the chosen task's subnet, where a task MAC on this bridge would reach no one. A
/// `routed` flow (the task on another subnet than the VIP its caller took for its own)
/// is handed to the task's bridge, which resolves the task's MAC.
#[inline(never)]
fn toward(pk: &Pkt, addr: u32, port: u16, routed: bool) -> Outcome {
    let (ctx, f, proto) = (pk.ctx, &pk.f, pk.l4_proto());
    let (l3, l4) = (pk.p.l3_off as usize, pk.p.l4_off as usize);
    let on_link = on_link(pk);
    let bridge = if routed && on_link {
        bridge_of(pk, addr)
    } else {
        0
    };
    let done = skb::set_addr(ctx, l3, 16, l4, proto, f.daddr, addr)
        .and_then(|_| match proto {
            0 => Ok(()),
            _ => skb::set_port(ctx, l4, 2, proto, f.dport, port),
        })
        .and_then(|_| match on_link && bridge == 0 {
            true => ctx.store(0, &docker_mac(addr), 0).map_err(|_| ()),
            false => Ok(()),
        });
    if done.is_err() {
        return pk.drop(Reason::DropRewriteFailed);
    }
    if bridge != 0 {
        // SAFETY: no parameters struct: the kernel resolves the task's MAC there.
        let r = unsafe { bpf_redirect_neigh(bridge, core::ptr::null_mut(), 0, 0) } as i32;
        if r == TC_ACT_REDIRECT as i32 {
            return pk.done(Reason::FwdVipToTask, r);
        }
        return pk.drop(Reason::DropRewriteFailed);
    }
    pk.done(Reason::FwdVipToTask, TC_ACT_OK)
}

/// A packet to the task that answers one of its VIP flows: the source becomes the VIP.
#[inline(never)]
fn reply(pk: &Pkt) -> Outcome {
    let Some(e) = MESH_CT_V1.get_ptr_mut(&pk.f.key()) else {
        return Outcome::NotOurs;
    };
    // SAFETY: a map value pointer for this run.
    let e = unsafe { &mut *e };
    if e.flags & (CT_OVERLAY | CT_REVERSE) != CT_OVERLAY | CT_REVERSE {
        return Outcome::NotOurs;
    }
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let state = CtState::from_u8(e.state).unwrap_or(CtState::Established);
    if ct::expired(state, e.idle_s, e.last_seen_ns, now) {
        count(pk.hook, Reason::ObsCtExpired, pk.bytes);
        return Outcome::NotOurs;
    }
    count(pk.hook, Reason::ObsCtHit, pk.bytes);
    note_backend(e.backend_id, false);
    e.state = ct::advance(state, pk.f.tcp_flags) as u8;
    e.last_seen_ns = now;
    let (ctx, f, proto) = (pk.ctx, &pk.f, pk.l4_proto());
    let (l3, l4) = (pk.p.l3_off as usize, pk.p.l4_off as usize);
    if skb::set_addr(ctx, l3, 12, l4, proto, f.saddr, e.nat_addr)
        .and_then(|_| match proto {
            0 => Ok(()),
            _ => skb::set_port(ctx, l4, 0, proto, f.sport, e.nat_port),
        })
        .is_err()
    {
        return pk.drop(Reason::DropRewriteFailed);
    }
    pk.done(Reason::FwdVipReply, TC_ACT_OK)
}
