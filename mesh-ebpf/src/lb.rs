//! Service load balancing: connection tracking, backend choice by Maglev, DNAT into a
//! local task, reverse NAT of its replies, and the answers for flows nobody serves.
//! Runs at TC on the underlay (clients) and on tasks' veths (replies, east-west).
//!
//! The steps are separate BPF functions (`inline(never)`): each gets its own stack
//! frame, which keeps every frame well under the verifier's 512 bytes.

use aya_ebpf::{bindings::TC_ACT_SHOT, helpers::bpf_ktime_get_ns, programs::TcContext};
use mesh_common::{
    config::MeshConfig,
    ct::{self, CtEntry, CtKey, CtState, CT_HAIRPIN, CT_REVERSE},
    hash::flow_hash,
    lb::{BackendState, Endpoint, Frontend, FrontendKey, FE_VIP, SVC_AFFINITY},
    parse::Parsed,
    proto::{IPPROTO_TCP, TCP_RST},
    reason::Reason,
    stats::Hook,
};

use crate::{
    maps::{
        scratch, MESH_BE_V1, MESH_CT_V1, MESH_EP_V1, MESH_FE_V1, MESH_MAGLEV_V1, MESH_NODE_V1,
        MESH_SVC_V1,
    },
    reply, skb,
    stats::count,
};

/// What the load balancer did with a packet: a TC return code, or "not ours". A plain
/// integer on purpose: an enum with an empty variant leaves a payload register
/// uninitialised on some paths, which the verifier rejects.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Outcome(i32);

impl Outcome {
    /// Not a service packet: the caller passes it on.
    #[allow(non_upper_case_globals)]
    pub const NotOurs: Outcome = Outcome(i32::MIN);

    /// Handled and counted; the TC return code.
    #[allow(non_snake_case)]
    pub const fn Done(action: i32) -> Outcome {
        Outcome(action)
    }

    /// The TC return code, if handled.
    pub fn action(self) -> Option<i32> {
        (self != Outcome::NotOurs).then_some(self.0)
    }
}

/// Everything a step needs about the packet in hand, passed by reference (BPF functions
/// take at most five arguments).
pub struct Pkt<'a> {
    pub ctx: &'a TcContext,
    pub p: &'a Parsed,
    pub f: Flow,
    pub hook: Hook,
    pub bytes: usize,
}

impl Pkt<'_> {
    #[inline(always)]
    pub fn done(&self, reason: Reason, action: i32) -> Outcome {
        count(self.hook, reason, self.bytes);
        Outcome::Done(action)
    }

    #[inline(always)]
    pub fn drop(&self, reason: Reason) -> Outcome {
        self.done(reason, TC_ACT_SHOT)
    }

    #[inline(always)]
    fn ifindex(&self) -> u32 {
        // SAFETY: reading a field of the context.
        unsafe { (*self.ctx.skb.skb).ifindex }
    }
}

/// The packet's tuple as on the wire.
#[derive(Clone, Copy)]
pub struct Flow {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub tcp_flags: u8,
}

impl Flow {
    #[inline(always)]
    pub fn of(p: &Parsed) -> Flow {
        Flow {
            saddr: p.saddr[0],
            daddr: p.daddr[0],
            sport: p.sport.to_be(),
            dport: p.dport.to_be(),
            proto: p.l4_proto,
            tcp_flags: p.tcp_flags,
        }
    }

    #[inline(always)]
    fn key(&self) -> CtKey {
        CtKey::new(self.saddr, self.daddr, self.sport, self.dport, self.proto)
    }
}

/// What a step decided; the caller acts on it, so that the heavy steps (choosing, and
/// building answers) never sit on the same call chain and their frames don't add up.
enum Step {
    Done(Outcome),
    Deliver(Endpoint, Nat),
    Refuse(Reason),
}

/// Where a flow is NATed to, and for a hairpin whom the client is made to look like.
struct Nat {
    addr: u32,
    port: u16,
    hairpin: u32,
}

/// Runs the load balancer on an IPv4 TCP/UDP packet.
#[inline(never)]
pub fn process(pk: &Pkt, cfg: &MeshConfig) -> Outcome {
    let step = lookup(pk, cfg);
    match step {
        Step::Done(o) => o,
        Step::Deliver(ep, nat) => deliver(pk, &ep, &nat),
        Step::Refuse(reason) => refuse(pk, reason),
    }
}

#[inline(always)]
fn lookup(pk: &Pkt, cfg: &MeshConfig) -> Step {
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let key = pk.f.key();
    if let Some(e) = MESH_CT_V1.get_ptr_mut(&key) {
        // SAFETY: a map value pointer valid for this program run; plain data.
        let e = unsafe { &mut *e };
        let state = CtState::from_u8(e.state).unwrap_or(CtState::Established);
        let reverse = e.flags & CT_REVERSE != 0;
        if ct::expired(state, e.idle_s, e.last_seen_ns, now) {
            count(pk.hook, Reason::ObsCtExpired, pk.bytes);
        } else if !reverse && ct::reopens(state, pk.f.tcp_flags) {
            count(pk.hook, Reason::ObsCtReopened, pk.bytes);
        } else if reverse && ct::stale_reply(state, pk.f.tcp_flags) {
            // A SYN-ACK on the reply entry of a finished flow: the client reused its
            // port for a connection that is not ours. Forget the old flow; never
            // translate the new one.
            count(pk.hook, Reason::ObsCtReopened, pk.bytes);
            let _ = MESH_CT_V1.remove(&key);
            return Step::Done(Outcome::NotOurs);
        } else {
            count(pk.hook, Reason::ObsCtHit, pk.bytes);
            e.state = ct::advance(state, pk.f.tcp_flags) as u8;
            e.last_seen_ns = now;
            return if e.flags & CT_REVERSE != 0 {
                Step::Done(to_client(pk, e))
            } else {
                tracked_to_task(pk, e)
            };
        }
    }
    new_flow(pk, cfg, now)
}

/// A packet of a tracked flow from the client side.
#[inline(never)]
fn tracked_to_task(pk: &Pkt, e: &mut CtEntry) -> Step {
    // SAFETY: copied out at once.
    let be = unsafe { MESH_BE_V1.get(&e.backend_id) }.copied();
    let Some(be) = be.filter(|b| b.state != BackendState::Gone as u8) else {
        // Close the entry: a retried SYN reopens the flow on a live backend.
        e.state = CtState::Closed as u8;
        return Step::Refuse(Reason::ReplyRstBackendGone);
    };
    // SAFETY: copied out at once.
    let Some(ep) = (unsafe { MESH_EP_V1.get(&be.addr) }).copied() else {
        return Step::Done(pk.drop(Reason::DropBackendNotLocal));
    };
    let nat = Nat {
        addr: e.nat_addr,
        port: e.nat_port,
        hairpin: if e.flags & CT_HAIRPIN != 0 { e.hairpin_addr } else { 0 },
    };
    Step::Deliver(ep, nat)
}

/// Frontend for (daddr, dport, proto): an exact entry, else, when `daddr` is one of this
/// node's addresses, the "any node address" entry (published ports).
#[inline(always)]
fn frontend(pk: &Pkt) -> Option<Frontend> {
    let f = &pk.f;
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
    if fe.flags & FE_VIP != 0 && pk.hook != Hook::TcTask {
        return None;
    }
    Some(fe)
}

/// A packet that starts (or restarts) a flow: find its service, pick a backend, track
/// both directions, deliver.
#[inline(never)]
fn new_flow(pk: &Pkt, cfg: &MeshConfig, now: u64) -> Step {
    let f = &pk.f;
    let Some(fe) = frontend(pk) else {
        return Step::Done(Outcome::NotOurs);
    };
    // SAFETY: copied out at once.
    let svc = unsafe { MESH_SVC_V1.get(&fe.svc_id) }.copied();
    let Some(svc) = svc.filter(|s| s.active > 0 && s.maglev_size > 0) else {
        return Step::Refuse(Reason::ReplyRstNoBackend);
    };
    let h = if svc.flags & SVC_AFFINITY != 0 {
        flow_hash(f.saddr, 0, 0, 0, f.proto)
    } else {
        flow_hash(f.saddr, f.daddr, f.sport, f.dport, f.proto)
    };
    let slot = svc.maglev_off.wrapping_add(h % svc.maglev_size);
    let be_id = match MESH_MAGLEV_V1.get(slot) {
        Some(id) if *id != 0 => *id,
        _ => return Step::Done(pk.drop(Reason::DropNoBackendSlot)),
    };
    // SAFETY: copied out at once.
    let Some(be) = (unsafe { MESH_BE_V1.get(&be_id) }).copied() else {
        return Step::Done(pk.drop(Reason::DropNoBackendSlot));
    };
    // SAFETY: copied out at once.
    let Some(ep) = (unsafe { MESH_EP_V1.get(&be.addr) }).copied() else {
        return Step::Done(pk.drop(Reason::DropBackendNotLocal));
    };
    // A task that lands on itself would see its own address as the source and drop the
    // packet as martian: it sees the hairpin address instead.
    let hairpin = f.saddr == be.addr || f.saddr == ep.delivery_addr;
    let client = if hairpin { cfg.hairpin_addr } else { f.saddr };
    if hairpin {
        count(pk.hook, Reason::ObsHairpin, pk.bytes);
    }
    let Ok(macs) = pk.ctx.load::<[u8; 12]>(0) else {
        return Step::Done(pk.drop(Reason::DropRewriteFailed));
    };

    // One entry in scratch memory, written twice: reverse first, so that a reply can
    // never find a forward entry without its way back.
    let Some(s) = scratch() else {
        return Step::Done(pk.drop(Reason::DropCtFull));
    };
    let e = &mut s.ct;
    *e = CtEntry {
        last_seen_ns: now,
        created_ns: now,
        backend_id: be_id,
        svc_id: fe.svc_id,
        nat_addr: f.daddr,
        nat_port: f.dport,
        state: if f.proto == IPPROTO_TCP { CtState::SynSent as u8 } else { CtState::Udp as u8 },
        flags: CT_REVERSE | if hairpin { CT_HAIRPIN } else { 0 },
        hairpin_addr: if hairpin { f.saddr } else { 0 },
        ifindex: pk.ifindex(),
        idle_s: if f.proto == IPPROTO_TCP { svc.tcp_idle_s } else { svc.udp_idle_s },
        mac_dst: [0; 6],
        mac_src: [0; 6],
        _pad: 0,
    };
    // The reply goes back to where this came from: to its source MAC, from our MAC.
    e.mac_dst.copy_from_slice(&macs[6..12]);
    e.mac_src.copy_from_slice(&macs[0..6]);
    let rev_key = CtKey::new(ep.delivery_addr, client, be.port, f.sport, f.proto);
    if MESH_CT_V1.insert(&rev_key, &*e, 0).is_err() {
        return Step::Done(pk.drop(Reason::DropCtFull));
    }
    e.nat_addr = ep.delivery_addr;
    e.nat_port = be.port;
    e.state = ct::initial(f.proto, f.tcp_flags) as u8;
    e.flags = if hairpin { CT_HAIRPIN } else { 0 };
    e.hairpin_addr = if hairpin { client } else { 0 };
    e.ifindex = ep.ifindex;
    if MESH_CT_V1.insert(&f.key(), &*e, 0).is_err() {
        return Step::Done(pk.drop(Reason::DropCtFull));
    }
    count(pk.hook, Reason::ObsCtNew, pk.bytes);
    let nat = Nat {
        addr: ep.delivery_addr,
        port: be.port,
        hairpin: if hairpin { client } else { 0 },
    };
    Step::Deliver(ep, nat)
}

/// DNAT to the backend (and SNAT a hairpinned client), then hand the packet to the task
/// behind `ep`.
#[inline(never)]
fn deliver(pk: &Pkt, ep: &Endpoint, nat: &Nat) -> Outcome {
    let (ctx, f) = (pk.ctx, &pk.f);
    let l3 = pk.p.l3_off as usize;
    let l4 = pk.p.l4_off as usize;
    let rewrite = || -> skb::Res {
        skb::set_addr(ctx, l3, 16, l4, f.proto, f.daddr, nat.addr)?;
        skb::set_port(ctx, l4, 2, f.proto, f.dport, nat.port)?;
        if nat.hairpin != 0 {
            skb::set_addr(ctx, l3, 12, l4, f.proto, f.saddr, nat.hairpin)?;
        }
        skb::set_macs(ctx, &ep.mac, &ep.host_mac)
    };
    if rewrite().is_err() {
        return pk.drop(Reason::DropRewriteFailed);
    }
    pk.done(Reason::FwdToTask, skb::redirect(ep.ifindex))
}

/// A reply from a task: the source becomes the frontend again (and a hairpinned client
/// its own address), and it goes back where the request came from.
#[inline(never)]
fn to_client(pk: &Pkt, e: &CtEntry) -> Outcome {
    let (ctx, f) = (pk.ctx, &pk.f);
    let l3 = pk.p.l3_off as usize;
    let l4 = pk.p.l4_off as usize;
    let rewrite = || -> skb::Res {
        skb::set_addr(ctx, l3, 12, l4, f.proto, f.saddr, e.nat_addr)?;
        skb::set_port(ctx, l4, 0, f.proto, f.sport, e.nat_port)?;
        if e.flags & CT_HAIRPIN != 0 {
            skb::set_addr(ctx, l3, 16, l4, f.proto, f.daddr, e.hairpin_addr)?;
        }
        skb::set_macs(ctx, &e.mac_dst, &e.mac_src)
    };
    if rewrite().is_err() {
        return pk.drop(Reason::DropRewriteFailed);
    }
    pk.done(Reason::FwdReplyToClient, skb::redirect(e.ifindex))
}

/// Nobody will serve this flow: answer it (TCP RST, ICMP port unreachable for UDP) back
/// out of the interface it came in on, rather than black-holing it. `tcp_reason` names
/// why, for TCP.
#[inline(never)]
fn refuse(pk: &Pkt, tcp_reason: Reason) -> Outcome {
    let (reason, built) = if pk.f.proto == IPPROTO_TCP {
        if pk.f.tcp_flags & TCP_RST != 0 {
            // Never answer a RST.
            return pk.drop(Reason::DropCannotReply);
        }
        (tcp_reason, reply::tcp_rst(pk.ctx, pk.p, &pk.f))
    } else {
        (Reason::ReplyIcmpUnreachable, reply::port_unreachable(pk.ctx, pk.p))
    };
    if built.is_err() {
        return pk.drop(Reason::DropCannotReply);
    }
    pk.done(reason, skb::redirect(pk.ifindex()))
}
