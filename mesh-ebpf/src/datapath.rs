//! What every entry point does with a packet: parse it, count it, decide; at TC also
//! load-balance it.

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC},
    programs::TcContext,
};
use mesh_common::{
    parse::{Frag, Packet, Parsed},
    proto::{IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP},
    reason::Reason,
    stats::Hook,
};

use crate::{
    config,
    flow::{Outcome, Pkt},
    icmp, lb,
    pkt::DirectPacket,
    scratch::{self, From},
    stats, vip, vxlan,
};

/// TC (underlay ingress and task veths): validate, count, load-balance. The parsed
/// headers live in per-CPU scratch memory; parsing, decapsulation, the tunnel's way in
/// and dispatch are separate BPF functions called from here, so that their stack frames
/// never add up.
#[inline(always)]
pub fn process_tc<P: Packet>(ctx: &TcContext, pkt: &P, hook: Hook) -> i32 {
    let Some(s) = scratch::scratch() else {
        return TC_ACT_UNSPEC;
    };
    let bytes = pkt.frame_len();
    if crate::parse::into_scratch(pkt, hook, config::vxlan_port(), &mut s.parsed).is_err() {
        return TC_ACT_SHOT;
    }
    if hook != Hook::TcUnderlayIngress {
        return dispatch(ctx, &s.parsed, hook, bytes);
    }
    if xdp_decapsulated(ctx, &mut s.from) {
        // XDP took the VXLAN apart already; what it learnt is in the metadata.
        s.from.bytes = bytes as u32;
        return lb::from_tunnel(ctx, hook);
    }
    let p = &s.parsed;
    if p.vxlan_first_fragment && p.ip_version == 4 {
        return if vxlan::first_fragment_passes(p, hook, bytes) {
            TC_ACT_UNSPEC
        } else {
            TC_ACT_SHOT
        };
    }
    if !(p.vxlan && p.ip_version == 4) {
        return dispatch(ctx, p, hook, bytes);
    }
    // The overlay: validate and take apart, then parse the inner packet in its place.
    s.from = From {
        peer: p.saddr[0],
        vni: p.vni,
        bytes: bytes as u32,
    };
    if let Err(action) = vxlan::decap(ctx, p, hook, bytes) {
        return action;
    }
    let inner = DirectPacket::new(ctx.data(), ctx.data_end(), ctx.len() as usize);
    if crate::parse::into_scratch(&inner, hook, config::vxlan_port(), &mut s.parsed).is_err() {
        return TC_ACT_SHOT;
    }
    lb::from_tunnel(ctx, hook)
}

/// The overlay hooks (a task's overlay veth): parse and count, then VIPs.
#[inline(always)]
pub fn process_overlay<P: Packet>(ctx: &TcContext, pkt: &P, hook: Hook) -> i32 {
    let Some(s) = scratch::scratch() else {
        return TC_ACT_UNSPEC;
    };
    if crate::parse::into_scratch(pkt, hook, config::vxlan_port(), &mut s.parsed).is_err() {
        return TC_ACT_SHOT;
    }
    if hook == Hook::TcOverlayIn {
        vip::from_task(ctx, &s.parsed, pkt.frame_len())
    } else {
        vip::to_task(ctx, &s.parsed, pkt.frame_len())
    }
}

/// (peer, VNI) left by the XDP program in front of a frame it decapsulated, into `to`.
#[inline(always)]
fn xdp_decapsulated(ctx: &TcContext, to: &mut From) -> bool {
    // SAFETY: reading fields of the context.
    let (meta, data) = unsafe {
        (
            (*ctx.skb.skb).data_meta as usize,
            (*ctx.skb.skb).data as usize,
        )
    };
    if meta + core::mem::size_of::<crate::xdp::TunnelMeta>() > data {
        return false;
    }
    // SAFETY: bounds checked against data just above.
    let m = unsafe { core::ptr::read_unaligned(meta as *const crate::xdp::TunnelMeta) };
    if m.magic != crate::xdp::META_MAGIC {
        return false;
    }
    to.peer = m.peer;
    to.vni = m.vni;
    true
}

#[inline(never)]
fn dispatch(ctx: &TcContext, p: &Parsed, hook: Hook, bytes: usize) -> i32 {
    // A fragment after the first has no L4 header: it goes on only where it follows its
    // first one (`track::follow`).
    let l4 = p.l4_off != 0 || p.frag == Frag::Followed;
    if p.ip_version == 4 && !matches!(p.frag, Frag::NonFirst) && l4 && !p.vxlan {
        let pk = Pkt::new(ctx, p, hook, bytes);
        let outcome = match p.l4_proto {
            IPPROTO_TCP | IPPROTO_UDP => lb::process(&pk),
            IPPROTO_ICMP if icmp::is_error(p.icmp_type) => icmp::translate(&pk, false),
            _ => Outcome::NotOurs,
        };
        if outcome == Outcome::ENCAP {
            let Some(s) = scratch::scratch() else {
                return TC_ACT_SHOT;
            };
            return match vxlan::encap(ctx, &pk.f, &s.encap_to) {
                TC_ACT_SHOT => pk
                    .drop(Reason::DropTunnelFailed)
                    .action()
                    .unwrap_or(TC_ACT_SHOT),
                action => pk
                    .done(Reason::FwdToTunnel, action)
                    .action()
                    .unwrap_or(TC_ACT_SHOT),
            };
        }
        if let Some(action) = outcome.action() {
            return action;
        }
    }
    stats::count(hook, p.verdict(), bytes);
    // TCX_NEXT: traffic that is not ours goes on to whatever else is attached.
    TC_ACT_UNSPEC
}
