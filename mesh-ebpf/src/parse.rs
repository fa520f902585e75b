//! The parser at every entry point: the packet's headers into per-CPU scratch, its
//! observations or the reason it is malformed counted, and a fragment after the first
//! given its first one's ports (`track::follow`).

use mesh_common::{
    parse::{self, Packet, Parsed},
    stats::Hook,
};

use crate::{scratch, stats, track};

/// Parses `pkt` as `hook` sees it into `out`; `Err` when it is malformed (counted).
#[inline(never)]
pub fn into_scratch<P: Packet>(
    pkt: &P,
    hook: Hook,
    vxlan_port: u16,
    out: &mut Parsed,
) -> Result<(), ()> {
    let bytes = pkt.frame_len();
    scratch::zero(out);
    match parse::parse_into(pkt, vxlan_port, out) {
        Ok(()) => {
            for obs in out.observations().into_iter().flatten() {
                stats::count(hook, obs, bytes);
            }
            // A fragment after the first: its ports, if its first one was translated.
            track::follow(out);
            Ok(())
        }
        Err(reason) => {
            stats::count(hook, reason, bytes);
            Err(())
        }
    }
}
