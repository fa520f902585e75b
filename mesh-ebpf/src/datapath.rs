//! What every entry point does with a packet: parse it, count it, decide.

use mesh_common::{config::MeshConfig, parse, parse::Packet, stats::Hook};

use crate::stats;

pub enum Action {
    Pass,
    Drop,
}

#[inline(always)]
pub fn process<P: Packet>(pkt: &P, hook: Hook, cfg: &MeshConfig) -> Action {
    let bytes = pkt.frame_len();
    match parse::parse(pkt, cfg.vxlan_port) {
        Ok(parsed) => {
            for obs in parsed.observations().into_iter().flatten() {
                stats::count(hook, obs, bytes);
            }
            stats::count(hook, parsed.verdict(), bytes);
            Action::Pass
        }
        Err(reason) => {
            stats::count(hook, reason, bytes);
            Action::Drop
        }
    }
}
