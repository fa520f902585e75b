//! Service load balancing: connection tracking, backend choice by Maglev, DNAT into a
//! local task, reverse NAT of its replies, and the answers for flows nobody serves.
//! Runs at TC on the underlay (clients) and on tasks' veths (replies, east-west).
//!
//! The steps are separate BPF functions (`inline(never)`) called one after the other
//! from [`process`], never from each other where that can be helped: their frames do not
//! add up. What they hand each other lives in per-CPU scratch memory (`Scratch::go`,
//! `Scratch::nf`), and a step returns a plain code ([`Outcome`]).
//!
//! The rooms: `conntrack` (the lookup and a tracked flow's packets), the new flow's
//! three stages `choose`, `client` and `track_new`, `nat` (the rewrites toward the task
//! and back to the client), `tunnel` (into and out of the tunnel), `refuse` (the answers
//! for flows nobody serves), `retry` (a refused or unanswered SYN given another backend).

mod choose;
mod client;
mod conntrack;
mod nat;
mod refuse;
mod retry;
mod track_new;
mod tunnel;

use crate::flow::{Outcome, Pkt};

pub(crate) use choose::maglev_pick_salted;
pub use choose::{frontend_for, maglev_pick};
pub(crate) use refuse::refuse;
pub use tunnel::from_tunnel;

use self::{conntrack::lookup, nat::deliver, refuse::refuse_go, tunnel::tunnel_out};

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
