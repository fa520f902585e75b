//! New flow, stage 2: whom the client is made to look like (hairpin, stock node SNAT,
//! the node's address for a gwbridge client).

use mesh_common::{lb::TUN_STOCK, reason::Reason, stats::Hook};

use crate::{
    flow::{Outcome, Pkt},
    maps::{MESH_EP_V1, MESH_NET_V1, MESH_NODE_V1},
    scratch::scratch,
    stats::count,
};

/// New flow, stage 2: whom the client is made to look like (`Scratch::go.hairpin`). A
/// task that lands on itself would see its own address as the source and drop the
/// packet as martian: it sees the hairpin address instead. So does one that calls from
/// another of its addresses (its docker_gwbridge one, to a published port): it would
/// answer itself through its loopback, never through us. A stock Docker node can only
/// answer overlay addresses: the client becomes this node's address there.
#[inline(never)]
pub(super) fn client(pk: &Pkt) -> Outcome {
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
