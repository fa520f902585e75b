//! Service load balancing: connection tracking, backend choice by Maglev, DNAT into a
//! local task, reverse NAT of its replies, and the answers for flows nobody serves.
//! Runs at TC on the underlay (clients) and on tasks' veths (replies, east-west).
//!
//! The steps are separate BPF functions (`inline(never)`): each gets its own stack
//! frame, which keeps every frame well under the verifier's 512 bytes.

use aya_ebpf::{bindings::TC_ACT_SHOT, helpers::bpf_ktime_get_ns, programs::TcContext};
use mesh_common::{
    config::MeshConfig,
    ct::{
        self, CtEntry, CtKey, CtState, CT_HAIRPIN, CT_OVERLAY, CT_RETRIED, CT_REVERSE, CT_TUNNEL,
    },
    hash::flow_hash,
    lb::{
        BackendState, Endpoint, Frontend, FrontendKey, Tunnel, FE_VIP, SVC_AFFINITY,
        TCP_IDLE_DEFAULT_S, TUN_STOCK, UDP_IDLE_DEFAULT_S,
    },
    parse::Parsed,
    proto::{IPPROTO_TCP, IPPROTO_UDP, TCP_ACK, TCP_RST, TCP_SYN},
    reason::Reason,
    stats::Hook,
};

use crate::{
    maps::{
        scratch, MESH_BE_V1, MESH_CT_V1, MESH_EP_V1, MESH_FE_V1, MESH_MAGLEV_V1, MESH_NET_V1,
        MESH_NODE_V1, MESH_SVC_V1, MESH_TUN_V1,
    },
    reply, skb, vxlan,
    stats::{count, note_backend},
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

    /// Rewritten; the caller encapsulates toward `Scratch::encap_to` and counts.
    pub const ENCAP: Outcome = Outcome(i32::MIN + 1);

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

impl<'a> Pkt<'a> {
    /// The packet `p` as `hook` saw it (`bytes` long).
    #[inline(always)]
    pub fn new(ctx: &'a TcContext, p: &'a Parsed, hook: Hook, bytes: usize) -> Pkt<'a> {
        Pkt {
            ctx,
            p,
            f: Flow::of(p),
            hook,
            bytes,
        }
    }

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
    pub fn key(&self) -> CtKey {
        CtKey::new(self.saddr, self.daddr, self.sport, self.dport, self.proto)
    }
}

/// What a step decided; the caller acts on it, so that the heavy steps (choosing, and
/// building answers) never sit on the same call chain and their frames don't add up.
enum Step {
    Done(Outcome),
    Deliver(Endpoint, Nat),
    /// The backend (or the destination task) is on another node.
    Tunnel(Tunnel, Nat),
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
    act(pk, step)
}

#[inline(always)]
fn act(pk: &Pkt, step: Step) -> Outcome {
    match step {
        Step::Done(o) => o,
        Step::Deliver(ep, nat) => deliver(pk, &ep, &nat),
        Step::Tunnel(t, nat) => tunnel_out(pk, &t, &nat),
        Step::Refuse(reason) => refuse(pk, reason),
    }
}

#[inline(always)]
fn lookup(pk: &Pkt, cfg: &MeshConfig) -> Step {
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
            return Step::Done(Outcome::NotOurs);
        }
        if reverse && pk.hook != Hook::TcTask {
            // Reply entries match what tasks send. On the underlay such a tuple is a
            // spoof of a task's address (genuine replies come back through the tunnel,
            // which has its own path): not ours.
            return Step::Done(Outcome::NotOurs);
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
            return Step::Done(Outcome::NotOurs);
        } else if reverse
            && e.flags & CT_TUNNEL == 0
            && pk.f.tcp_flags & TCP_RST != 0
            && hold_refusal(pk, e)
        {
            return Step::Done(pk.drop(Reason::DropSynRefused));
        } else {
            count(pk.hook, Reason::ObsCtHit, pk.bytes);
            note_backend(e.backend_id, false);
            e.state = ct::advance(state, pk.f.tcp_flags) as u8;
            e.last_seen_ns = now;
            return if e.flags & CT_TUNNEL != 0 {
                Step::Done(tunnel_reply(pk, e))
            } else if e.flags & CT_REVERSE != 0 {
                Step::Done(to_client(pk, e))
            } else {
                tracked_to_task(pk, e)
            };
        }
    }
    new_flow(pk, cfg, now, salt)
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
fn tracked_to_task(pk: &Pkt, e: &mut CtEntry) -> Step {
    // SAFETY: copied out at once.
    let be = unsafe { MESH_BE_V1.get(&e.backend_id) }.copied();
    let Some(be) = be.filter(|b| b.state != BackendState::Gone as u8) else {
        // Close the entry: a retried SYN reopens the flow on a live backend.
        e.state = CtState::Closed as u8;
        return Step::Refuse(Reason::ReplyRstBackendGone);
    };
    let nat = Nat {
        addr: e.nat_addr,
        port: e.nat_port,
        hairpin: if e.flags & CT_HAIRPIN != 0 { e.hairpin_addr } else { 0 },
    };
    // SAFETY: copied out at once.
    if let Some(ep) = (unsafe { MESH_EP_V1.get(&be.addr) }).copied() {
        return Step::Deliver(ep, nat);
    }
    // SAFETY: copied out at once.
    match unsafe { MESH_TUN_V1.get(&be.addr) }.copied() {
        Some(t) => Step::Tunnel(t, nat),
        None => Step::Done(pk.drop(Reason::DropBackendNotLocal)),
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

/// A packet that starts (or restarts) a flow: find its service, pick a backend, track
/// both directions, deliver.
#[inline(never)]
fn new_flow(pk: &Pkt, cfg: &MeshConfig, now: u64, salt: u32) -> Step {
    let f = &pk.f;
    let Some(fe) = frontend(pk) else {
        return overlay_route(pk);
    };
    // SAFETY: copied out at once.
    let svc = unsafe { MESH_SVC_V1.get(&fe.svc_id) }.copied();
    let Some(svc) = svc.filter(|s| s.active > 0 && s.maglev_size > 0) else {
        return Step::Refuse(Reason::ReplyRstNoBackend);
    };
    let Some(be_id) = maglev_pick_salted(&svc, f, salt) else {
        return Step::Done(pk.drop(Reason::DropNoBackendSlot));
    };
    // SAFETY: copied out at once.
    let Some(be) = (unsafe { MESH_BE_V1.get(&be_id) }).copied() else {
        return Step::Done(pk.drop(Reason::DropNoBackendSlot));
    };
    // Local task (an endpoint), or a task on another node (a tunnel).
    // SAFETY: copied out at once.
    let ep = unsafe { MESH_EP_V1.get(&be.addr) }.copied();
    // SAFETY: copied out at once.
    let tun = if ep.is_none() { unsafe { MESH_TUN_V1.get(&be.addr) }.copied() } else { None };
    let (target, ifindex) = match (&ep, &tun) {
        (Some(ep), _) => (ep.delivery_addr, ep.ifindex),
        (None, Some(_)) => (be.addr, 0),
        (None, None) => return Step::Done(pk.drop(Reason::DropBackendNotLocal)),
    };
    // A task that lands on itself would see its own address as the source and drop the
    // packet as martian: it sees the hairpin address instead. So does one that calls
    // from another of its addresses (its docker_gwbridge one, to a published port): it
    // would answer itself through its loopback, never through us. A stock Docker node
    // can only answer overlay addresses: the client becomes this node's address there.
    let how = client_rewrite(pk, ifindex, tun.is_some());
    let hairpin = f.saddr == be.addr || f.saddr == target || how == REWRITE_HAIRPIN;
    let mut client = f.saddr;
    if hairpin {
        client = cfg.hairpin_addr;
        count(pk.hook, Reason::ObsHairpin, pk.bytes);
    } else if let Some(t) = tun.filter(|t| t.flags & TUN_STOCK != 0) {
        // SAFETY: copied out at once.
        let Some(net) = (unsafe { MESH_NET_V1.get(&t.vni) }).copied() else {
            return Step::Done(pk.drop(Reason::DropTunnelFailed));
        };
        client = net.local_addr;
        count(pk.hook, Reason::ObsStockSnat, pk.bytes);
    } else if how != 0 {
        // The node's own address: the remote task answers it through its gwbridge veth,
        // where the tunnel's reply entry waits (an overlay address would be answered
        // over Docker's overlay instead).
        client = how;
        count(pk.hook, Reason::ObsStockSnat, pk.bytes);
    }
    let snat = client != f.saddr;

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
        flags: CT_REVERSE | if snat { CT_HAIRPIN } else { 0 },
        hairpin_addr: if snat { f.saddr } else { 0 },
        ifindex: pk.ifindex(),
        idle_s: if f.proto == IPPROTO_TCP { svc.tcp_idle_s } else { svc.udp_idle_s },
        mac_dst: [0; 6],
        mac_src: [0; 6],
        peer: 0,
        vni: 0,
        _pad: 0,
    };
    // The reply goes back to where this came from: to its source MAC, from our MAC
    // (loaded straight into the entry: no room for them on this frame).
    if load6(pk.ctx, 6, &mut e.mac_dst) || load6(pk.ctx, 0, &mut e.mac_src) {
        return Step::Done(pk.drop(Reason::DropRewriteFailed));
    }
    let rev_key = CtKey::new(target, client, be.port, f.sport, f.proto);
    if MESH_CT_V1.insert(&rev_key, &*e, 0).is_err() {
        return Step::Done(pk.drop(Reason::DropCtFull));
    }
    e.nat_addr = target;
    e.nat_port = be.port;
    e.state = ct::initial(f.proto, f.tcp_flags) as u8;
    e.flags = if snat { CT_HAIRPIN } else { 0 } | s.retry;
    s.retry = 0;
    e.hairpin_addr = if snat { client } else { 0 };
    e.ifindex = ifindex;
    if MESH_CT_V1.insert(&f.key(), &*e, 0).is_err() {
        return Step::Done(pk.drop(Reason::DropCtFull));
    }
    count(pk.hook, Reason::ObsCtNew, pk.bytes);
    // What `note_backend` does, with the scratch memory already in hand.
    s.noted_be = be_id;
    s.noted_new = 1;
    let nat = Nat {
        addr: target,
        port: be.port,
        hairpin: if snat { client } else { 0 },
    };
    match (ep, tun) {
        (Some(ep), _) => Step::Deliver(ep, nat),
        (None, Some(t)) => Step::Tunnel(t, nat),
        (None, None) => Step::Done(pk.drop(Reason::DropBackendNotLocal)),
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
    let h = if svc.flags & SVC_AFFINITY != 0 {
        flow_hash(f.saddr, 0, 0, 0, f.proto)
    } else {
        flow_hash(f.saddr, f.daddr, f.sport, f.dport, f.proto)
            .wrapping_add(salt.wrapping_mul(0x9e37_79b1))
    };
    let slot = svc.maglev_off.wrapping_add(h % svc.maglev_size);
    match MESH_MAGLEV_V1.get(slot) {
        Some(id) if *id != 0 => Some(*id),
        _ => None,
    }
}

/// No frontend: a task sending to a task on another node is tunnelled there as it is
/// (the overlay's plain routing); anything else is not ours.
#[inline(always)]
fn overlay_route(pk: &Pkt) -> Step {
    if pk.hook != Hook::TcTask {
        return Step::Done(Outcome::NotOurs);
    }
    // SAFETY: copied out at once.
    match unsafe { MESH_TUN_V1.get(&pk.f.daddr) }.copied() {
        Some(t) => Step::Tunnel(
            t,
            Nat {
                addr: pk.f.daddr,
                port: pk.f.dport,
                hairpin: 0,
            },
        ),
        None => Step::Done(Outcome::NotOurs),
    }
}

/// The packet will not fit the underlay once encapsulated: tell its sender the overlay
/// MTU (ICMP fragmentation needed, built from the packet as the sender sent it).
#[inline(never)]
fn too_big(pk: &Pkt, mtu: u32) -> Outcome {
    if reply::frag_needed(pk.ctx, pk.p, mtu).is_err() {
        return pk.drop(Reason::DropCannotReply);
    }
    pk.done(Reason::ReplyIcmpFragNeeded, skb::redirect(pk.ifindex()))
}

/// NAT as for a local delivery, then into the tunnel toward the backend's node.
#[inline(never)]
fn tunnel_out(pk: &Pkt, t: &Tunnel, nat: &Nat) -> Outcome {
    if let Some(mtu) = vxlan::too_big(pk.ctx, pk.p.l4_off as usize) {
        return too_big(pk, mtu);
    }
    if pk.p.l3_off != 14 || toward_backend(pk, nat).is_err() {
        return pk.drop(Reason::DropRewriteFailed);
    }
    encap_later(t.node, t.vni)
}

/// Asks the caller to encapsulate toward (node, vni): the encapsulation runs at the top
/// of the call chain, where its stack frame does not add to the load balancer's.
#[inline(always)]
fn encap_later(node: u32, vni: u32) -> Outcome {
    match scratch() {
        Some(s) => {
            s.encap_to = Tunnel {
                node,
                vni,
                flags: 0,
                _pad: 0,
            };
            Outcome::ENCAP
        }
        None => Outcome::Done(TC_ACT_SHOT),
    }
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

/// The parsed inner packet of VXLAN `from` a peer.
#[inline(never)]
pub fn from_tunnel_parsed(ctx: &TcContext, p: &Parsed, hook: Hook, from: &vxlan::From) -> i32 {
    let pk = Pkt::new(ctx, p, hook, from.bytes);
    if p.ip_version != 4 || p.l4_off == 0 || !matches!(p.l4_proto, IPPROTO_TCP | IPPROTO_UDP) {
        return pk.drop(Reason::DropVxlanBadInner).action().unwrap_or(TC_ACT_SHOT);
    }
    from_tunnel(&pk, from.peer, from.vni)
}

/// The inner packet of VXLAN from `peer`: a reply to a flow this node balanced (back to
/// its client), or a packet for a task on this node (delivered; its replies will go
/// back through the tunnel to `peer`).
#[inline(always)]
fn from_tunnel(pk: &Pkt, peer: u32, vni: u32) -> i32 {
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
    // SAFETY: copied out at once.
    let Some(ep) = (unsafe { MESH_EP_V1.get(&f.daddr) }).copied() else {
        return pk.drop(Reason::DropVxlanNoTarget).action().unwrap_or(TC_ACT_SHOT);
    };
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
        let Some(s) = scratch() else {
            return TC_ACT_SHOT;
        };
        let tcp = f.proto == IPPROTO_TCP;
        s.ct = CtEntry {
            last_seen_ns: now,
            created_ns: now,
            backend_id: 0,
            svc_id: 0,
            nat_addr: f.daddr,
            nat_port: f.dport,
            state: if !tcp {
                CtState::Udp as u8
            } else if f.tcp_flags & TCP_SYN != 0 {
                CtState::SynSent as u8
            } else {
                CtState::Established as u8
            },
            flags: CT_REVERSE | CT_TUNNEL,
            hairpin_addr: 0,
            ifindex: 0,
            idle_s: if tcp { TCP_IDLE_DEFAULT_S } else { UDP_IDLE_DEFAULT_S },
            mac_dst: [0; 6],
            mac_src: [0; 6],
            peer,
            vni,
            _pad: 0,
        };
        if MESH_CT_V1.insert(&rkey, &s.ct, 0).is_err() {
            return pk.drop(Reason::DropCtFull).action().unwrap_or(TC_ACT_SHOT);
        }
    }
    let nat = Nat {
        addr: ep.delivery_addr,
        port: f.dport,
        hairpin: 0,
    };
    deliver(pk, &ep, &nat).action().unwrap_or(TC_ACT_SHOT)
}

/// DNAT to the backend (and SNAT a hairpinned client), then hand the packet to the task
/// behind `ep`.
#[inline(never)]
fn deliver(pk: &Pkt, ep: &Endpoint, nat: &Nat) -> Outcome {
    if toward_backend(pk, nat)
        .and_then(|_| skb::set_macs(pk.ctx, &ep.mac, &ep.host_mac))
        .is_err()
    {
        return pk.drop(Reason::DropRewriteFailed);
    }
    pk.done(Reason::FwdToTask, skb::redirect(ep.ifindex))
}

/// The forward NAT: destination to `nat.addr:nat.port`, and the source to `nat.hairpin`
/// when the client is SNATed.
#[inline(always)]
fn toward_backend(pk: &Pkt, nat: &Nat) -> skb::Res {
    let (ctx, f) = (pk.ctx, &pk.f);
    let (l3, l4) = (pk.p.l3_off as usize, pk.p.l4_off as usize);
    skb::set_addr(ctx, l3, 16, l4, f.proto, f.daddr, nat.addr)?;
    skb::set_port(ctx, l4, 2, f.proto, f.dport, nat.port)?;
    if nat.hairpin != 0 {
        skb::set_addr(ctx, l3, 12, l4, f.proto, f.saddr, nat.hairpin)?;
    }
    Ok(())
}

/// The reverse NAT: source back to `addr:port` (the frontend), and the destination back
/// to `client` when the client was SNATed (0: unchanged).
#[inline(always)]
fn toward_client(pk: &Pkt, addr: u32, port: u16, client: u32) -> skb::Res {
    let (ctx, f) = (pk.ctx, &pk.f);
    let (l3, l4) = (pk.p.l3_off as usize, pk.p.l4_off as usize);
    skb::set_addr(ctx, l3, 12, l4, f.proto, f.saddr, addr)?;
    skb::set_port(ctx, l4, 0, f.proto, f.sport, port)?;
    if client != 0 {
        skb::set_addr(ctx, l3, 16, l4, f.proto, f.daddr, client)?;
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

/// Nobody will serve this flow: answer it (TCP RST, ICMP port unreachable for UDP) back
/// out of the interface it came in on, rather than black-holing it. `tcp_reason` names
/// why, for TCP.
#[inline(never)]
pub(crate) fn refuse(pk: &Pkt, tcp_reason: Reason) -> Outcome {
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
