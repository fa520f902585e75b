//! What every entry point does with a packet: parse it, count it, decide; at TC also
//! load-balance it.

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC},
    programs::TcContext,
};
use mesh_common::{
    config::MeshConfig,
    parse::{self, Frag, Packet, Parsed},
    proto::{IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP},
    reason::Reason,
    stats::Hook,
};

use crate::{
    icmp,
    lb::{self, Outcome},
    maps,
    pkt::DirectPacket,
    stats, vip, vxlan,
};

/// TC (underlay ingress and task veths): validate, count, load-balance. The parsed
/// headers live in per-CPU scratch memory; parsing and dispatch are separate BPF
/// functions so that their stack frames never add up.
#[inline(always)]
pub fn process_tc<P: Packet>(ctx: &TcContext, pkt: &P, hook: Hook, cfg: &MeshConfig) -> i32 {
    let Some(s) = maps::scratch() else {
        return TC_ACT_UNSPEC;
    };
    if parse_into_scratch(pkt, hook, cfg.vxlan_port, &mut s.parsed).is_err() {
        return TC_ACT_SHOT;
    }
    let p = &s.parsed;
    if hook == Hook::TcUnderlayIngress {
        if let Some(from) = xdp_decapsulated(ctx, pkt.frame_len()) {
            // XDP took the VXLAN apart already; what it learnt is in the metadata.
            return lb::from_tunnel_parsed(ctx, p, hook, &from);
        }
    }
    if !(p.vxlan && hook == Hook::TcUnderlayIngress && p.ip_version == 4) {
        return dispatch(ctx, p, hook, cfg, pkt.frame_len());
    }
    // The overlay: validate and take apart, then parse the inner packet in its place.
    let from = vxlan::From {
        peer: p.saddr[0],
        vni: p.vni,
        bytes: pkt.frame_len(),
    };
    if let Err(action) = vxlan::decap(ctx, p, hook, from.bytes) {
        return action;
    }
    let inner = DirectPacket::new(ctx.data(), ctx.data_end(), ctx.len() as usize);
    if parse_into_scratch(&inner, hook, cfg.vxlan_port, &mut s.parsed).is_err() {
        return TC_ACT_SHOT;
    }
    lb::from_tunnel_parsed(ctx, &s.parsed, hook, &from)
}

/// The overlay hooks (a task's overlay veth): parse and count, then VIPs.
#[inline(always)]
pub fn process_overlay<P: Packet>(ctx: &TcContext, pkt: &P, hook: Hook, cfg: &MeshConfig) -> i32 {
    let Some(s) = maps::scratch() else {
        return TC_ACT_UNSPEC;
    };
    if parse_into_scratch(pkt, hook, cfg.vxlan_port, &mut s.parsed).is_err() {
        return TC_ACT_SHOT;
    }
    if hook == Hook::TcOverlayIn {
        vip::from_task(ctx, &s.parsed, pkt.frame_len())
    } else {
        vip::to_task(ctx, &s.parsed, pkt.frame_len())
    }
}

/// (peer, VNI) left by the XDP program in front of a frame it decapsulated.
#[inline(always)]
fn xdp_decapsulated(ctx: &TcContext, bytes: usize) -> Option<vxlan::From> {
    // SAFETY: reading fields of the context.
    let (meta, data) = unsafe { ((*ctx.skb.skb).data_meta as usize, (*ctx.skb.skb).data as usize) };
    if meta + core::mem::size_of::<crate::xdp::TunnelMeta>() > data {
        return None;
    }
    // SAFETY: bounds checked against data just above.
    let m = unsafe { core::ptr::read_unaligned(meta as *const crate::xdp::TunnelMeta) };
    (m.magic == crate::xdp::META_MAGIC).then_some(vxlan::From {
        peer: m.peer,
        vni: m.vni,
        bytes,
    })
}

#[inline(never)]
pub fn parse_into_scratch<P: Packet>(pkt: &P, hook: Hook, vxlan_port: u16, out: &mut Parsed) -> Result<(), ()> {
    let bytes = pkt.frame_len();
    *out = Parsed::default();
    match parse::parse_into(pkt, vxlan_port, out) {
        Ok(()) => {
            for obs in out.observations().into_iter().flatten() {
                stats::count(hook, obs, bytes);
            }
            Ok(())
        }
        Err(reason) => {
            stats::count(hook, reason, bytes);
            Err(())
        }
    }
}

#[inline(never)]
fn dispatch(ctx: &TcContext, p: &Parsed, hook: Hook, cfg: &MeshConfig, bytes: usize) -> i32 {
    if p.ip_version == 4 && !matches!(p.frag, Frag::NonFirst) && p.l4_off != 0 && !p.vxlan {
        let pk = lb::Pkt::new(ctx, p, hook, bytes);
        let outcome = match p.l4_proto {
            IPPROTO_TCP | IPPROTO_UDP => lb::process(&pk, cfg),
            IPPROTO_ICMP if icmp::is_error(p.icmp_type) => icmp::translate(&pk),
            _ => Outcome::NotOurs,
        };
        if outcome == Outcome::ENCAP {
            let Some(s) = maps::scratch() else {
                return TC_ACT_SHOT;
            };
            let to = s.encap_to;
            return match vxlan::encap(ctx, &pk.f, &to, cfg) {
                TC_ACT_SHOT => pk.drop(Reason::DropTunnelFailed).action().unwrap_or(TC_ACT_SHOT),
                action => pk.done(Reason::FwdToTunnel, action).action().unwrap_or(TC_ACT_SHOT),
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
