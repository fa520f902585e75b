//! Service load balancing: connection tracking, backend choice by Maglev, DNAT into a
//! local task, reverse NAT of its replies, and the answers for flows nobody serves.
//! Runs at TC on the underlay (clients) and on tasks' veths (replies, east-west).
//!
//! The steps are separate BPF functions (`inline(never)`) called one after the other
//! from [`process`], never from each other where that can be helped: their frames do not
//! add up. What they hand each other lives in per-CPU scratch memory (`Scratch::go`,
//! `Scratch::nf`), and a step returns a plain code ([`Outcome`]).

use aya_ebpf::{bindings::TC_ACT_SHOT, helpers::bpf_ktime_get_ns, programs::TcContext};
use mesh_common::{
    ct::{
        self, CtEntry, CtKey, CtState, CT_HAIRPIN, CT_OVERLAY, CT_RETRIED, CT_REVERSE, CT_TUNNEL,
    },
    lb::{
        BackendState, Frontend, FrontendKey, FE_VIP,
        TCP_IDLE_DEFAULT_S, TUN_STOCK, UDP_IDLE_DEFAULT_S,
    },
    parse::Frag,
    proto::{IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, TCP_ACK, TCP_RST, TCP_SYN},
    reason::Reason,
    stats::Hook,
};

use crate::{
    flow::{encap_later, Flow, Outcome, Pkt},
    maps::{
        MESH_BE_V1, MESH_CT_V1, MESH_EP_V1, MESH_FE_V1, MESH_MAGLEV_V1, MESH_NET_V1,
        MESH_NODE_V1, MESH_SVC_V1, MESH_TUN_V1,
    },
    icmp, reply,
    scratch::{scratch, Scratch},
    skb, track, vxlan,
    stats::{count, note_backend},
};

/// Runs the load balancer on an IPv4 TCP/UDP packet: the conntrack lookup, or the new
/// flow's stages (each its own BPF function, called from here, so that their frames
/// never add up), then the step.
#[inline(never)]
pub fn process(pk: &Pkt) -> Outcome {
    let step = lookup(pk);
    act(pk, step)
}

#[inline(always)]
fn act(pk: &Pkt, step: Outcome) -> Outcome {
    match step {
        Outcome::DELIVER => deliver(pk),
        Outcome::TUNNEL => tunnel_out(pk),
        Outcome::REFUSE => refuse_go(pk),
        o => o,
    }
}

/// The step for a packet of a tracked flow, or the new flow's.
#[inline(always)]
fn lookup(pk: &Pkt) -> Outcome {
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

/// A backend refused a new connection (RST to the SYN it was sent; `e` is the reply
/// entry, not yet advanced): true when the refusal is to be held back. A task Docker is
/// deactivating refuses at once, before any agent can know; held back once per
/// connection where the service has another backend, the client's SYN retransmit a
/// second later is given another one (`retry_salt`). Its own BPF function.
#[inline(never)]
fn hold_refusal(pk: &Pkt, e: &CtEntry) -> bool {
    let state = CtState::from_u8(e.state).unwrap_or(CtState::Established);
    if pk.f.proto != IPPROTO_TCP || !ct::refused(state, pk.f.tcp_flags) {
        return false;
    }
    let client = if e.flags & CT_HAIRPIN != 0 { e.hairpin_addr } else { pk.f.daddr };
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
fn retry_salt(pk: &Pkt, e: &CtEntry, now: u64) -> u32 {
    let client = if e.flags & CT_HAIRPIN != 0 { e.hairpin_addr } else { pk.f.saddr };
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
    s.go.hairpin = if e.flags & CT_HAIRPIN != 0 { e.hairpin_addr } else { 0 };
    go_to(pk, s, be_addr)
}

/// Points `s.go` at the task `addr`: a local one (its endpoint) or one on another node
/// (its tunnel).
#[inline(always)]
fn go_to(pk: &Pkt, s: &mut Scratch, addr: u32) -> Outcome {
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
fn choose(pk: &Pkt, now: u64, salt: u32) -> Outcome {
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
    let idle_s = if f.proto == IPPROTO_TCP { svc.tcp_idle_s } else { svc.udp_idle_s };
    // SAFETY: as above.
    let Some(be) = (unsafe { MESH_BE_V1.get(&be_id) }) else {
        return pk.drop(Reason::DropNoBackendSlot);
    };
    s.go.be_addr = be.addr;
    s.go.nat_port = be.port;
    let step = go_to(pk, s, be.addr);
    // A local task is reached at its delivery address; a remote one at its own.
    s.go.nat_addr = if step == Outcome::DELIVER { s.go.ep.delivery_addr } else { be.addr };
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

/// New flow, stage 2: whom the client is made to look like (`Scratch::go.hairpin`). A
/// task that lands on itself would see its own address as the source and drop the
/// packet as martian: it sees the hairpin address instead. So does one that calls from
/// another of its addresses (its docker_gwbridge one, to a published port): it would
/// answer itself through its loopback, never through us. A stock Docker node can only
/// answer overlay addresses: the client becomes this node's address there.
#[inline(never)]
fn client(pk: &Pkt) -> Outcome {
    let Some(s) = scratch() else {
        return pk.drop(Reason::DropCtFull);
    };
    let f = &pk.f;
    let local = s.go.local != 0;
    let how = client_rewrite(pk, if local { s.go.ep.ifindex } else { 0 }, !local);
    s.go.hairpin = 0;
    if f.saddr == s.go.be_addr || f.saddr == s.go.nat_addr || how == REWRITE_HAIRPIN {
        s.go.hairpin = crate::config::hairpin_addr();
        count(pk.hook, Reason::ObsHairpin, pk.bytes);
    } else if !local && s.go.tun.flags & TUN_STOCK != 0 {
        // SAFETY: a map value read at once.
        let Some(net) = (unsafe { MESH_NET_V1.get(&s.go.tun.vni) }) else {
            return pk.drop(Reason::DropTunnelFailed);
        };
        s.go.hairpin = net.local_addr;
        count(pk.hook, Reason::ObsStockSnat, pk.bytes);
    } else if how != 0 {
        // The node's own address: the remote task answers it through its gwbridge veth,
        // where the tunnel's reply entry waits (an overlay address would be answered
        // over Docker's overlay instead).
        s.go.hairpin = how;
        count(pk.hook, Reason::ObsStockSnat, pk.bytes);
    }
    if s.go.hairpin == f.saddr {
        s.go.hairpin = 0;
    }
    Outcome::CHOSEN
}

/// New flow, stage 3: both conntrack entries (the reply goes back to where the request
/// came from: to its source MAC, from our MAC), written by [`track::commit`]; then the
/// step toward the backend.
#[inline(never)]
fn track_new(pk: &Pkt) -> Outcome {
    let Some(s) = scratch() else {
        return pk.drop(Reason::DropCtFull);
    };
    let f = &pk.f;
    let snat = s.go.hairpin != 0;
    let client = if snat { s.go.hairpin } else { f.saddr };
    let nf = &mut s.nf;
    if load6(pk.ctx, 6, &mut nf.rev.mac_dst) || load6(pk.ctx, 0, &mut nf.rev.mac_src) {
        return pk.drop(Reason::DropRewriteFailed);
    }
    nf.rev_key = CtKey::new(s.go.nat_addr, client, s.go.nat_port, f.sport, f.proto);
    nf.rev.nat_addr = f.daddr;
    nf.rev.nat_port = f.dport;
    nf.rev.ifindex = pk.ifindex();
    nf.fwd.nat_addr = s.go.nat_addr;
    nf.fwd.nat_port = s.go.nat_port;
    nf.fwd.flags = s.retry;
    s.retry = 0;
    nf.fwd.ifindex = if s.go.local != 0 { s.go.ep.ifindex } else { 0 };
    if snat {
        nf.rev.flags |= CT_HAIRPIN;
        nf.rev.hairpin_addr = f.saddr;
        nf.fwd.flags |= CT_HAIRPIN;
        nf.fwd.hairpin_addr = client;
    }
    if track::commit(true).is_err() {
        return pk.drop(Reason::DropCtFull);
    }
    count(pk.hook, Reason::ObsCtNew, pk.bytes);
    // What `note_backend` does, with the scratch memory already in hand.
    s.noted_be = s.nf.fwd.backend_id;
    s.noted_new = 1;
    if s.go.local != 0 {
        Outcome::DELIVER
    } else {
        Outcome::TUNNEL
    }
}

/// [`client_rewrite`]'s answer for a hairpin (never an address a client has).
const REWRITE_HAIRPIN: u32 = 1;

/// How a task-side flow's client must be rewritten beyond the usual cases:
/// [`REWRITE_HAIRPIN`] when the packet would be delivered back into the veth it came
/// from (the task calling itself from another of its addresses: it would answer itself
/// through its loopback); this node's underlay address when the flow is `tunnelled` and
/// the client's address means nothing on other nodes (not a task's overlay address, not
/// one of the node's: a task's docker_gwbridge address, a container's bridge address;
/// every node has its own 172.x of the same name, maybe the remote task's own); else 0.
/// Its own BPF function (the deep path's frame).
#[inline(never)]
fn client_rewrite(pk: &Pkt, ifindex: u32, tunnelled: bool) -> u32 {
    if pk.hook != Hook::TcTask {
        return 0;
    }
    if ifindex != 0 && ifindex == pk.ifindex() {
        return REWRITE_HAIRPIN;
    }
    let a = pk.f.saddr;
    // SAFETY: lookups only, nothing kept.
    if !tunnelled
        || unsafe { MESH_EP_V1.get(&a) }.is_some()
        || unsafe { MESH_NODE_V1.get(&a) }.is_some()
    {
        return 0;
    }
    crate::maps::MESH_LOCAL_V1.get(0).map_or(0, |l| l.addr)
}

/// Copies 6 bytes at `off` of the packet into `to`; true on failure. (A constant length:
/// the verifier needs it, which `TcContext::load_bytes` does not give.)
#[inline(always)]
fn load6(ctx: &TcContext, off: u32, to: &mut [u8; 6]) -> bool {
    // SAFETY: the helper writes exactly 6 bytes into `to`.
    unsafe {
        aya_ebpf::helpers::bpf_skb_load_bytes(ctx.skb.skb as *const _, off, to.as_mut_ptr() as *mut _, 6) != 0
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
pub(crate) fn maglev_pick_salted(svc: &mesh_common::lb::Service, f: &Flow, salt: u32) -> Option<u32> {
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
fn tunnel_out(pk: &Pkt) -> Outcome {
    if let Some(mtu) = vxlan::too_big(pk.ctx, pk.p.l4_off as usize) {
        return too_big(pk, mtu);
    }
    let Some(s) = scratch() else {
        return pk.drop(Reason::DropRewriteFailed);
    };
    let (node, vni) = (s.go.tun.node, s.go.tun.vni);
    if pk.p.l3_off != 14 || toward_backend(pk, s.go.nat_addr, s.go.nat_port, s.go.hairpin).is_err() {
        return pk.drop(Reason::DropRewriteFailed);
    }
    encap_later(node, vni)
}

/// A task's reply to a flow that reached it through the tunnel: back through the tunnel
/// to the node the flow came from (which reverse-NATs it for the client).
#[inline(never)]
fn tunnel_reply(pk: &Pkt, e: &CtEntry) -> Outcome {
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
    pk.drop(Reason::DropVxlanBadInner).action().unwrap_or(TC_ACT_SHOT)
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
                return pk.drop(Reason::DropSynRefused).action().unwrap_or(TC_ACT_SHOT);
            }
            count(pk.hook, Reason::ObsCtHit, pk.bytes);
            note_backend(e.backend_id, false);
            e.state = ct::advance(state, f.tcp_flags) as u8;
            e.last_seen_ns = now;
            return to_client(pk, e).action().unwrap_or(TC_ACT_SHOT);
        }
    }
    tunnelled_to_task(pk, peer, vni, now).action().unwrap_or(TC_ACT_SHOT)
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
        let idle_s = if tcp { TCP_IDLE_DEFAULT_S } else { UDP_IDLE_DEFAULT_S };
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

/// DNAT to the backend (and SNAT a hairpinned client), then hand the packet to the task
/// (`Scratch::go`).
#[inline(never)]
fn deliver(pk: &Pkt) -> Outcome {
    let Some(s) = scratch() else {
        return pk.drop(Reason::DropRewriteFailed);
    };
    let ep = s.go.ep;
    if toward_backend(pk, s.go.nat_addr, s.go.nat_port, s.go.hairpin)
        .and_then(|_| skb::set_macs(pk.ctx, &ep.mac, &ep.host_mac))
        .is_err()
    {
        return pk.drop(Reason::DropRewriteFailed);
    }
    pk.done(Reason::FwdToTask, skb::redirect(ep.ifindex))
}

/// The forward NAT: destination to `addr:port`, and the source to `hairpin` when the
/// client is SNATed (0: unchanged).
#[inline(always)]
fn toward_backend(pk: &Pkt, addr: u32, port: u16, hairpin: u32) -> skb::Res {
    let (ctx, f, proto) = (pk.ctx, &pk.f, pk.l4_proto());
    let (l3, l4) = (pk.p.l3_off as usize, pk.p.l4_off as usize);
    skb::set_addr(ctx, l3, 16, l4, proto, f.daddr, addr)?;
    if proto != 0 {
        skb::set_port(ctx, l4, 2, proto, f.dport, port)?;
    }
    if hairpin != 0 {
        skb::set_addr(ctx, l3, 12, l4, proto, f.saddr, hairpin)?;
    }
    Ok(())
}

/// The reverse NAT: source back to `addr:port` (the frontend), and the destination back
/// to `client` when the client was SNATed (0: unchanged).
#[inline(always)]
fn toward_client(pk: &Pkt, addr: u32, port: u16, client: u32) -> skb::Res {
    let (ctx, f, proto) = (pk.ctx, &pk.f, pk.l4_proto());
    let (l3, l4) = (pk.p.l3_off as usize, pk.p.l4_off as usize);
    skb::set_addr(ctx, l3, 12, l4, proto, f.saddr, addr)?;
    if proto != 0 {
        skb::set_port(ctx, l4, 0, proto, f.sport, port)?;
    }
    if client != 0 {
        skb::set_addr(ctx, l3, 16, l4, proto, f.daddr, client)?;
    }
    Ok(())
}

/// A reply from a task: the source becomes the frontend again (and a hairpinned client
/// its own address), and it goes back where the request came from.
#[inline(never)]
fn to_client(pk: &Pkt, e: &CtEntry) -> Outcome {
    let client = if e.flags & CT_HAIRPIN != 0 { e.hairpin_addr } else { 0 };
    if toward_client(pk, e.nat_addr, e.nat_port, client)
        .and_then(|_| skb::set_macs(pk.ctx, &e.mac_dst, &e.mac_src))
        .is_err()
    {
        return pk.drop(Reason::DropRewriteFailed);
    }
    pk.done(Reason::FwdReplyToClient, skb::redirect(e.ifindex))
}

/// [`refuse`] for the reason in `Scratch::go`.
#[inline(always)]
fn refuse_go(pk: &Pkt) -> Outcome {
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
        (Reason::ReplyIcmpUnreachable, reply::port_unreachable(pk.ctx, pk.p))
    };
    if built.is_err() {
        return pk.drop(Reason::DropCannotReply);
    }
    pk.done(reason, skb::redirect(pk.ifindex()))
}
