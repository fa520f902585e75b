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
    stats::Hook,
};

use crate::{
    icmp,
    lb::{self, Outcome},
    maps,
    pkt::DirectPacket,
    stats, vxlan,
};

pub enum Action {
    Pass,
    Drop,
}

/// Parses and counts observations; a malformed packet is counted under its reason.
#[inline(always)]
fn parse_counted<P: Packet>(pkt: &P, hook: Hook, cfg: &MeshConfig) -> Result<Parsed, ()> {
    let bytes = pkt.frame_len();
    match parse::parse(pkt, cfg.vxlan_port) {
        Ok(parsed) => {
            for obs in parsed.observations().into_iter().flatten() {
                stats::count(hook, obs, bytes);
            }
            Ok(parsed)
        }
        Err(reason) => {
            stats::count(hook, reason, bytes);
            Err(())
        }
    }
}

/// XDP: validate and count (the XDP load balancer arrives with the overlay).
#[inline(always)]
pub fn process<P: Packet>(pkt: &P, hook: Hook, cfg: &MeshConfig) -> Action {
    match parse_counted(pkt, hook, cfg) {
        Ok(parsed) => {
            stats::count(hook, parsed.verdict(), pkt.frame_len());
            Action::Pass
        }
        Err(()) => Action::Drop,
    }
}

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
    lb::from_tunnel_parsed(ctx, &s.parsed, hook, cfg, &from)
}

#[inline(never)]
fn parse_into_scratch<P: Packet>(pkt: &P, hook: Hook, vxlan_port: u16, out: &mut Parsed) -> Result<(), ()> {
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
        let pk = lb::Pkt {
            ctx,
            p,
            f: lb::Flow::of(p),
            hook,
            bytes,
        };
        let outcome = match p.l4_proto {
            IPPROTO_TCP | IPPROTO_UDP => lb::process(&pk, cfg),
            IPPROTO_ICMP if icmp::is_error(p.icmp_type) => icmp::translate(&pk),
            _ => Outcome::NotOurs,
        };
        if let Some(action) = outcome.action() {
            return action;
        }
    }
    stats::count(hook, p.verdict(), bytes);
    // TCX_NEXT: traffic that is not ours goes on to whatever else is attached.
    TC_ACT_UNSPEC
}
