//! The packet in hand as the load balancer's steps pass it along: [`Pkt`] (the
//! context, what the parser found, the tuple, the hook), [`Flow`] (the tuple as on the
//! wire) and [`Outcome`] (a step's plain result code). Shared by `lb`, `vip`, `icmp`,
//! `reply` and `vxlan`.

use aya_ebpf::{bindings::TC_ACT_SHOT, programs::TcContext};
use mesh_common::{
    ct::CtKey,
    lb::Tunnel,
    parse::{Frag, Parsed},
    reason::{Kind, Reason},
    stats::Hook,
};

use crate::{scratch::scratch, stats::count, track};

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

    /// Steps inside the load balancer, their payload in `Scratch::go`: to the local
    /// task, into the tunnel, refused; and a new flow's stage done, on to the next.
    pub(crate) const DELIVER: Outcome = Outcome(i32::MIN + 2);
    pub(crate) const TUNNEL: Outcome = Outcome(i32::MIN + 3);
    pub(crate) const REFUSE: Outcome = Outcome(i32::MIN + 4);
    pub(crate) const CHOSEN: Outcome = Outcome(i32::MIN + 5);
    /// A VIP's new flow found no backend: the caller refuses it.
    pub const NO_BACKEND: Outcome = Outcome(i32::MIN + 6);

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
        // A first fragment translated: the rest of its datagram will follow it.
        if matches!(reason.kind(), Kind::Forward) && self.p.frag == Frag::First {
            track::record_first(self.p);
        }
        Outcome::Done(action)
    }

    /// The L4 protocol for the checksum helpers and the port rewrites: none for a
    /// fragment that follows its first one (its L4 header is in that first one).
    #[inline(always)]
    pub fn l4_proto(&self) -> u8 {
        if self.p.frag == Frag::Followed {
            0
        } else {
            self.f.proto
        }
    }

    #[inline(always)]
    pub fn drop(&self, reason: Reason) -> Outcome {
        crate::log::note_drop(reason);
        self.done(reason, TC_ACT_SHOT)
    }

    #[inline(always)]
    pub(crate) fn ifindex(&self) -> u32 {
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

/// Asks the caller to encapsulate toward (node, vni): the encapsulation runs at the top
/// of the call chain, where its stack frame does not add to the load balancer's.
#[inline(always)]
pub(crate) fn encap_later(node: u32, vni: u32) -> Outcome {
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
