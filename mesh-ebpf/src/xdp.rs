//! The underlay's ingress path at XDP, over the same maps as TC: VXLAN from known peers
//! is validated and taken apart here (what TC then needs, the peer and VNI, travels in
//! the packet's metadata), and published-port flows to tasks on this node are NATed and
//! redirected into the task's veth without an skb. Everything else (backends on other
//! nodes, refusals) is passed to the TC program, which handles it as usual.

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS, XDP_REDIRECT},
    helpers::{
        bpf_ktime_get_ns, bpf_redirect, bpf_xdp_adjust_head, bpf_xdp_adjust_meta,
        bpf_xdp_load_bytes, bpf_xdp_store_bytes,
    },
    programs::XdpContext,
};
use mesh_common::{
    config::{FEAT_XDP_BYTES, FEAT_XDP_META},
    csum,
    ct::{self, CtKey, CtState},
    lb::{BackendState, NET_DOCKER},
    parse::{Frag, Parsed},
    proto::{IPPROTO_TCP, IPPROTO_UDP},
    reason::Reason,
    stats::Hook,
};

use crate::{
    config,
    flow::Flow,
    lb,
    maps::{MESH_BE_V1, MESH_CT_V1, MESH_EP_V1, MESH_SVC_V1},
    pkt::DirectPacket,
    scratch::scratch,
    stats::{count, count_backend},
    track,
};

const HOOK: Hook = Hook::XdpUnderlay;

/// Metadata XDP leaves in front of a decapsulated packet for TC.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct TunnelMeta {
    pub magic: u32,
    pub peer: u32,
    pub vni: u32,
    pub _pad: u32,
}

/// "mesh": marks metadata that this program wrote.
pub const META_MAGIC: u32 = 0x6d65_7368;

#[inline(always)]
pub fn process(ctx: &XdpContext) -> u32 {
    let bytes = ctx.data_end() - ctx.data();
    let pkt = DirectPacket::new(ctx.data(), ctx.data_end(), bytes);
    let Some(s) = scratch() else {
        return XDP_PASS;
    };
    if crate::parse::into_scratch(&pkt, HOOK, crate::config::vxlan_port(), &mut s.parsed).is_err() {
        return XDP_DROP;
    }
    step(ctx, &s.parsed, bytes)
}

#[inline(never)]
fn step(ctx: &XdpContext, p: &Parsed, bytes: usize) -> u32 {
    if p.ip_version == 4 {
        if p.vxlan {
            return decap(ctx, p, bytes);
        }
        if p.vxlan_first_fragment {
            return if crate::vxlan::first_fragment_passes(p, HOOK, bytes) {
                XDP_PASS
            } else {
                XDP_DROP
            };
        }
        // (A fragment after the first: where it follows its first one.)
        let l4 = p.l4_off != 0 || p.frag == Frag::Followed;
        if matches!(p.l4_proto, IPPROTO_TCP | IPPROTO_UDP)
            && l4
            && !matches!(p.frag, Frag::NonFirst)
        {
            if let Some(action) = to_local_task(ctx, p, bytes) {
                return action;
            }
        }
    }
    count(HOOK, p.verdict(), bytes);
    XDP_PASS
}

/// VXLAN: drop what does not come from a known peer for a known VNI, else strip the
/// outer headers and pass the inner frame on with (peer, VNI) in the metadata.
#[inline(always)]
fn decap(ctx: &XdpContext, p: &Parsed, bytes: usize) -> u32 {
    let (peer, vni) = (p.saddr[0], p.vni);
    let net = match crate::vxlan::admit(peer, vni) {
        Ok(net) => net,
        Err(r) => {
            count(HOOK, r, bytes);
            return XDP_DROP;
        }
    };
    if net.flags & NET_DOCKER != 0 {
        count(HOOK, Reason::PassVxlanDocker, bytes);
        return XDP_PASS;
    }
    if !config::has(FEAT_XDP_META) {
        // No metadata to carry (peer, VNI) to TC on this kernel: TC validates the
        // frame again and takes it apart itself.
        count(HOOK, Reason::PassVxlan, bytes);
        return XDP_PASS;
    }
    count(HOOK, Reason::ObsDecap, bytes);
    // SAFETY: moving the start of this program's own frame.
    let ok = unsafe {
        bpf_xdp_adjust_head(ctx.ctx, p.inner_off as i32) == 0
            && bpf_xdp_adjust_meta(ctx.ctx, -(core::mem::size_of::<TunnelMeta>() as i32)) == 0
    };
    if !ok {
        count(HOOK, Reason::DropTunnelFailed, bytes);
        return XDP_DROP;
    }
    let meta = ctx.metadata();
    if meta + core::mem::size_of::<TunnelMeta>() > ctx.data() {
        count(HOOK, Reason::DropTunnelFailed, bytes);
        return XDP_DROP;
    }
    // SAFETY: bounds checked against data just above.
    unsafe {
        core::ptr::write_unaligned(
            meta as *mut TunnelMeta,
            TunnelMeta {
                magic: META_MAGIC,
                peer,
                vni,
                _pad: 0,
            },
        )
    };
    count(HOOK, Reason::PassVxlan, bytes);
    XDP_PASS
}

/// A published-port flow whose backend is a task on this node: NAT and redirect here.
/// `None`: not a flow XDP finishes (passed to TC).
#[inline(always)]
fn to_local_task(ctx: &XdpContext, p: &Parsed, bytes: usize) -> Option<u32> {
    let f = Flow::of(p);
    let key = CtKey::new(f.saddr, f.daddr, f.sport, f.dport, f.proto);
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let (be_id, be) = match MESH_CT_V1.get_ptr_mut(&key) {
        Some(e) => {
            // SAFETY: a map value pointer for this run.
            let e = unsafe { &mut *e };
            let state = CtState::from_u8(e.state).unwrap_or(CtState::Established);
            if e.flags != 0
                || ct::expired(state, e.idle_s, e.last_seen_ns, now)
                || ct::reopens(state, f.tcp_flags)
            {
                return None;
            }
            // SAFETY: copied out.
            let be = unsafe { MESH_BE_V1.get(&e.backend_id) }.copied()?;
            if be.state == BackendState::Gone as u8 {
                return None;
            }
            e.state = ct::advance(state, f.tcp_flags) as u8;
            e.last_seen_ns = now;
            count(HOOK, Reason::ObsCtHit, bytes);
            count_backend(e.backend_id, bytes, false);
            (e.backend_id, be)
        }
        None if p.frag == Frag::Followed => return None,
        None => {
            let fe = lb::frontend_for(&f, HOOK)?;
            // SAFETY: copied out.
            let svc = unsafe { MESH_SVC_V1.get(&fe.svc_id) }.copied()?;
            if svc.active == 0 || svc.maglev_size == 0 {
                return None;
            }
            let id = lb::maglev_pick(&svc, &f)?;
            // SAFETY: copied out.
            let be = unsafe { MESH_BE_V1.get(&id) }.copied()?;
            // SAFETY: copied out.
            let ep = unsafe { MESH_EP_V1.get(&be.addr) }.copied()?;
            if f.saddr == be.addr || f.saddr == ep.delivery_addr {
                return None;
            }
            let nf = NewFlow {
                svc_id: fe.svc_id,
                be_id: id,
                target: ep.delivery_addr,
                port: be.port,
                ifindex: ep.ifindex,
                idle_s: if f.proto == IPPROTO_TCP {
                    svc.tcp_idle_s
                } else {
                    svc.udp_idle_s
                },
                now,
            };
            track(ctx, &f, &key, &nf)?;
            count(HOOK, Reason::ObsCtNew, bytes);
            count_backend(id, bytes, true);
            (id, be)
        }
    };
    let _ = be_id;
    // SAFETY: copied out.
    let ep = unsafe { MESH_EP_V1.get(&be.addr) }.copied()?;
    if dnat(ctx, p, &f, ep.delivery_addr, be.port).is_err()
        || xstore(ctx, 0, &ep.mac).is_err()
        || xstore(ctx, 6, &ep.host_mac).is_err()
    {
        count(HOOK, Reason::DropRewriteFailed, bytes);
        return Some(XDP_DROP);
    }
    // SAFETY: a helper call with plain integer arguments.
    let r = unsafe { bpf_redirect(ep.ifindex, 0) } as u32;
    count(HOOK, Reason::FwdToTask, bytes);
    // A first fragment translated: the rest of its datagram will follow it.
    track::record_first(p);
    Some(if r == XDP_REDIRECT {
        XDP_REDIRECT
    } else {
        XDP_DROP
    })
}

/// What a new flow was given.
#[derive(Clone, Copy)]
struct NewFlow {
    svc_id: u32,
    be_id: u32,
    target: u32,
    port: u16,
    ifindex: u32,
    idle_s: u32,
    now: u64,
}

/// Both conntrack entries of a new flow, as TC's load balancer writes them (by the one
/// writer, `track`).
#[inline(never)]
fn track(ctx: &XdpContext, f: &Flow, key: &CtKey, nf: &NewFlow) -> Option<()> {
    let NewFlow {
        svc_id,
        be_id,
        target,
        port,
        ifindex,
        idle_s,
        now,
    } = *nf;
    let s = scratch()?;
    let macs: [u8; 12] = xload(ctx, 0).ok()?;
    let t = &mut s.nf;
    track::begin(t, key, f.tcp_flags, now, idle_s);
    t.rev_key = CtKey::new(target, f.saddr, port, f.sport, f.proto);
    t.rev.backend_id = be_id;
    t.rev.svc_id = svc_id;
    t.rev.nat_addr = f.daddr;
    t.rev.nat_port = f.dport;
    // SAFETY: reading a field of the XDP context.
    t.rev.ifindex = unsafe { (*ctx.ctx).ingress_ifindex };
    t.rev.mac_dst.copy_from_slice(&macs[6..12]);
    t.rev.mac_src.copy_from_slice(&macs[0..6]);
    t.fwd.backend_id = be_id;
    t.fwd.svc_id = svc_id;
    t.fwd.nat_addr = target;
    t.fwd.nat_port = port;
    t.fwd.ifindex = ifindex;
    track::commit(true).ok()
}

/// Reads `T` at `off`: through the kernel's bounds-checked helper (offsets vary with IP
/// options and VLAN tags; the helper spares the verifier the range proofs), or by direct
/// packet access where the kernel has no such helper (before 5.18).
#[inline(always)]
fn xload<T: Copy>(ctx: &XdpContext, off: usize) -> Result<T, ()> {
    if !config::has(FEAT_XDP_BYTES) {
        let at = direct::<T>(ctx, off)?;
        // SAFETY: `direct` checked `size_of::<T>()` bytes at `at` against data_end.
        return Ok(unsafe { core::ptr::read_unaligned(at as *const T) });
    }
    let mut v = core::mem::MaybeUninit::<T>::uninit();
    // SAFETY: the helper writes exactly size_of::<T>() bytes into `v`, or fails.
    let r = unsafe {
        bpf_xdp_load_bytes(
            ctx.ctx,
            off as u32,
            v.as_mut_ptr().cast(),
            core::mem::size_of::<T>() as u32,
        )
    };
    // SAFETY: initialised by the helper when it returns 0.
    (r == 0).then(|| unsafe { v.assume_init() }).ok_or(())
}

#[inline(always)]
fn xstore<T: Copy>(ctx: &XdpContext, off: usize, v: &T) -> Result<(), ()> {
    if !config::has(FEAT_XDP_BYTES) {
        let at = direct::<T>(ctx, off)?;
        // SAFETY: as in `xload`.
        unsafe { core::ptr::write_unaligned(at as *mut T, *v) };
        return Ok(());
    }
    // SAFETY: the helper reads size_of::<T>() bytes from `v`.
    let r = unsafe {
        bpf_xdp_store_bytes(
            ctx.ctx,
            off as u32,
            v as *const T as *mut _,
            core::mem::size_of::<T>() as u32,
        )
    };
    (r == 0).then_some(()).ok_or(())
}

/// The address of `size_of::<T>()` bytes at `off` in the frame, checked against its end
/// the way the verifier tracks it (the offset bounded first, so that its range is known).
#[inline(always)]
fn direct<T>(ctx: &XdpContext, off: usize) -> Result<usize, ()> {
    let at = ctx.data() + (off & 0x1ff);
    if at + core::mem::size_of::<T>() > ctx.data_end() {
        return Err(());
    }
    Ok(at)
}

/// DNAT in place with incremental checksums (XDP has no checksum helpers).
#[inline(never)]
fn dnat(ctx: &XdpContext, p: &Parsed, f: &Flow, addr: u32, port: u16) -> Result<(), ()> {
    let l3 = p.l3_off as usize;
    let l4 = p.l4_off as usize;
    let (old_a, new_a) = (u32::from_be(f.daddr), u32::from_be(addr));
    let (old_p, new_p) = (u16::from_be(f.dport), u16::from_be(port));
    let ip_ck = u16::from_be(xload::<u16>(ctx, l3 + 10)?);
    xstore(ctx, l3 + 10, &csum::replace32(ip_ck, old_a, new_a).to_be())?;
    xstore(ctx, l3 + 16, &addr)?;
    if p.frag == Frag::Followed {
        // A fragment after the first: its L4 header (and checksum) is in the first.
        return Ok(());
    }
    let (off, udp) = if f.proto == IPPROTO_TCP {
        (l4 + 16, false)
    } else {
        (l4 + 6, true)
    };
    let ck = u16::from_be(xload::<u16>(ctx, off)?);
    let ck = if udp {
        csum::udp_replace16(csum::udp_replace32(ck, old_a, new_a), old_p, new_p)
    } else {
        csum::replace16(csum::replace32(ck, old_a, new_a), old_p, new_p)
    };
    xstore(ctx, off, &ck.to_be())?;
    xstore(ctx, l4 + 2, &port)
}
