//! The overlay: VXLAN encapsulation toward other nodes and decapsulation of what they
//! send. Only VXLAN from known nodes, for known VNIs, is taken apart.

use aya_ebpf::{
    bindings::bpf_check_mtu_ret::BPF_MTU_CHK_RET_FRAG_NEEDED,
    bindings::{TC_ACT_REDIRECT, TC_ACT_SHOT, TC_ACT_UNSPEC},
    helpers::{bpf_check_mtu, bpf_redirect_neigh, bpf_skb_adjust_room},
    programs::TcContext,
};
use mesh_common::{
    config::{FEAT_CHECK_MTU, FEAT_ENCAP_L2_ETH},
    hash::flow_hash,
    lb::{Network, Tunnel, NET_DOCKER},
    parse::Parsed,
    proto::{IPPROTO_TCP, IPPROTO_UDP, IP_MF, IP_OFFSET_MASK},
    reason::Reason,
    stats::Hook,
    vxlan::{self, OVERHEAD},
};

use crate::{
    config,
    flow::Flow,
    maps::{MESH_LOCAL_V1, MESH_NET_V1, MESH_PEER_V1},
    scratch::scratch,
    stats::count,
};

use aya_ebpf::bindings::{
    bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, BPF_ADJ_ROOM_ENCAP_L2_MASK, BPF_ADJ_ROOM_ENCAP_L2_SHIFT,
    BPF_F_ADJ_ROOM_ENCAP_L2_ETH, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L4_UDP,
    BPF_F_ADJ_ROOM_FIXED_GSO,
};

const ENCAP_L3_IPV4: u64 = BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 as u64;
/// Marks a GSO packet as a UDP tunnel, so that segmentation repeats the outer headers.
const ENCAP_L4_UDP: u64 = BPF_F_ADJ_ROOM_ENCAP_L4_UDP as u64;
const ENCAP_L2_ETH: u64 = BPF_F_ADJ_ROOM_ENCAP_L2_ETH as u64;
/// Keep the GSO segment size: the inner MTU (1450 on Docker's overlay) already leaves
/// room for the encapsulation, and a changed size makes the kernel drop GRO'd packets
/// whose length falls at or below it (tcp_gso_segment's `skb->len <= mss` check).
const FIXED_GSO: u64 = BPF_F_ADJ_ROOM_FIXED_GSO as u64;
const fn encap_l2(len: u64) -> u64 {
    (len & BPF_ADJ_ROOM_ENCAP_L2_MASK as u64) << BPF_ADJ_ROOM_ENCAP_L2_SHIFT
}

/// Encapsulates the (already rewritten) IPv4 packet in `ctx` toward `to.node` on
/// `to.vni` and sends it out of the underlay: `TC_ACT_REDIRECT`, or `TC_ACT_SHOT` on
/// failure. `f` is the flow, for the outer source port. (Four arguments and a scalar
/// result: a BPF function takes at most five, and returns in a register.)
#[inline(never)]
pub fn encap(ctx: &TcContext, f: &Flow, to: &Tunnel) -> i32 {
    match try_encap(ctx, f, to.node, to.vni) {
        Ok(()) => TC_ACT_REDIRECT,
        Err(()) => TC_ACT_SHOT,
    }
}

#[inline(always)]
fn try_encap(ctx: &TcContext, f: &Flow, node: u32, vni: u32) -> Result<(), ()> {
    let local = MESH_LOCAL_V1.get(0).copied().ok_or(())?;
    if local.ifindex == 0 {
        return Err(());
    }
    let inner_len = ctx.len().checked_sub(14).ok_or(())?;
    let inner_src: u32 = ctx.load(14 + 12).map_err(|_| ())?;
    let inner_dst: u32 = ctx.load(14 + 16).map_err(|_| ())?;
    let vihl: u8 = ctx.load(14).map_err(|_| ())?;
    let proto: u8 = ctx.load(14 + 9).map_err(|_| ())?;
    let ihl = ((vihl & 0x0f) as u32) * 4;
    // A fragment's L4 bytes do not sum to its pseudo-header, nor does a UDP datagram
    // sent without a checksum: LCO has nothing to stand on (the outer checksum stays 0).
    let frag: u16 = ctx.load(14 + 6).map_err(|_| ())?;
    let lco = u16::from_be(frag) & (IP_MF | IP_OFFSET_MASK) == 0
        && (proto != IPPROTO_UDP || ctx.load::<u16>(14 + ihl as usize + 6).map_err(|_| ())? != 0);
    // SAFETY: reading a field of the context.
    let gso = unsafe { (*ctx.skb.skb).gso_size } != 0;
    let h = flow_hash(f.saddr, f.daddr, f.sport, f.dport, f.proto);
    let mut flags = ENCAP_L3_IPV4 | ENCAP_L4_UDP | encap_l2(14) | FIXED_GSO;
    if config::has(FEAT_ENCAP_L2_ETH) {
        flags |= ENCAP_L2_ETH;
    }
    // SAFETY: the skb this program owns; room is inserted after the MAC header.
    if unsafe { bpf_skb_adjust_room(ctx.skb.skb, OVERHEAD as i32, BPF_ADJ_ROOM_MAC, flags) } != 0 {
        return Err(());
    }
    let s = scratch().ok_or(())?;
    vxlan::header(
        &mut s.encap,
        local.addr,
        node,
        vxlan::source_port(h),
        crate::config::vxlan_port(),
        vni,
        inner_src,
        inner_dst,
        inner_len as u16,
        h as u16,
    );
    // The outer UDP checksum, as Linux's vxlan device sets it by default, by local
    // checksum offload. GSO packets keep zero (RFC 7348 §5 allows it): each segment
    // would need its own, and bpf_skb_adjust_room cannot ask for SKB_GSO_UDP_TUNNEL_CSUM.
    if !gso && lco {
        let l4_len = inner_len.saturating_sub(ihl);
        let (a, b) = (
            u32::from_be(inner_src) as u64,
            u32::from_be(inner_dst) as u64,
        );
        let pseudo = match proto {
            IPPROTO_TCP | IPPROTO_UDP => {
                (a >> 16) + (a & 0xffff) + (b >> 16) + (b & 0xffff) + proto as u64 + l4_len as u64
            }
            _ => 0,
        };
        set_lco(&mut s.encap, pseudo);
    }
    ctx.store(0, &s.encap, 0).map_err(|_| ())?;
    // The kernel picks the route and fills the outer MACs from its neighbour table.
    // SAFETY: no parameters struct: the helper does the FIB lookup itself.
    let r = unsafe { bpf_redirect_neigh(local.ifindex, core::ptr::null_mut(), 0, 0) };
    if r as i32 == TC_ACT_REDIRECT {
        Ok(())
    } else {
        Err(())
    }
}

/// The overlay MTU if the packet in `ctx` (IPv4 header at 14, L4 header at `l4_off`)
/// would not fit the underlay once encapsulated. A GSO packet is judged by the size of
/// its segments: a TSO'd segment too big for the wire is lost as surely as a big packet.
#[inline(always)]
pub fn too_big(ctx: &TcContext, l4_off: usize) -> Option<u32> {
    let local = MESH_LOCAL_V1.get(0).copied()?;
    // SAFETY: reading a field of the context.
    let gso_size = unsafe { (*ctx.skb.skb).gso_size };
    let own = !config::has(FEAT_CHECK_MTU);
    let mut mtu: u32 = 0;
    if gso_size == 0 {
        if own {
            // No `bpf_check_mtu` (before 5.12): the underlay's MTU as loaded.
            mtu = config::underlay_mtu();
            let l3_len = ctx.len().saturating_sub(14);
            return (mtu != 0 && l3_len + OVERHEAD as u32 > mtu).then(|| mtu - OVERHEAD as u32);
        }
        // SAFETY: the skb this program owns; `mtu` is an out-parameter on our stack.
        let r = unsafe {
            bpf_check_mtu(
                ctx.skb.skb.cast(),
                local.ifindex,
                &mut mtu,
                OVERHEAD as i32,
                0,
            )
        };
        return (r == BPF_MTU_CHK_RET_FRAG_NEEDED as i64)
            .then(|| mtu.saturating_sub(OVERHEAD as u32));
    }
    // GSO: the helper only reads the device's MTU here; the segment is IP + L4 headers
    // + gso_size of payload.
    if own {
        mtu = config::underlay_mtu();
    } else {
        // SAFETY: as above.
        unsafe { bpf_check_mtu(ctx.skb.skb.cast(), local.ifindex, &mut mtu, 0, 0) };
    }
    let doff: u8 = ctx.load(l4_off + 12).unwrap_or(0x50);
    let seg = (l4_off - 14) as u32 + ((doff >> 4) as u32) * 4 + gso_size;
    (mtu != 0 && seg + OVERHEAD as u32 > mtu).then(|| mtu - OVERHEAD as u32)
}

/// Writes the outer UDP checksum (LCO) into the header. Its own BPF function: a frame
/// of its own keeps `encap`'s small enough for the deepest call chain.
#[inline(never)]
fn set_lco(hdr: &mut [u8; vxlan::ENCAP_LEN], inner_pseudo: u64) {
    let c = vxlan::lco_checksum(hdr, inner_pseudo);
    hdr[40..42].copy_from_slice(&c.to_be_bytes());
}

/// Whether VXLAN from `peer` (an underlay address as on the wire) for `vni` is taken:
/// the network it belongs to, or why not. The one rule for XDP and TC, whole datagrams
/// and first fragments alike.
#[inline(always)]
pub fn admit(peer: u32, vni: u32) -> Result<Network, Reason> {
    // SAFETY: values copied out.
    if unsafe { MESH_PEER_V1.get(&peer) }.is_none() {
        return Err(Reason::DropVxlanUnknownPeer);
    }
    // SAFETY: as above.
    (unsafe { MESH_NET_V1.get(&vni) })
        .copied()
        .ok_or(Reason::DropVxlanUnknownVni)
}

/// The first fragment of a datagram to the data-path port (the kernel would reassemble
/// it for Docker's vxlan socket, which takes any sender): passed, whole, only from a
/// peer for a known VNI; else dropped, so the rest never reassembles. `true`: pass.
#[inline(always)]
pub fn first_fragment_passes(p: &Parsed, hook: Hook, bytes: usize) -> bool {
    match admit(p.saddr[0], p.vni) {
        Ok(_) => {
            count(hook, Reason::PassVxlan, bytes);
            true
        }
        Err(r) => {
            count(hook, r, bytes);
            false
        }
    }
}

/// A VXLAN packet on the underlay: validate the sender and the VNI and take it apart.
/// `Err` carries the TC action for a packet that was dropped (and counted).
#[inline(never)]
pub fn decap(ctx: &TcContext, p: &Parsed, hook: Hook, bytes: usize) -> Result<(), i32> {
    let fail = |r: Reason| {
        count(hook, r, bytes);
        Err(TC_ACT_SHOT)
    };
    let net = match admit(p.saddr[0], p.vni) {
        Ok(net) => net,
        Err(r) => return fail(r),
    };
    if net.flags & NET_DOCKER != 0 {
        count(hook, Reason::PassVxlanDocker, bytes);
        return Err(TC_ACT_UNSPEC);
    }
    if p.l3_off != 14 || p.inner_off < 14 {
        return fail(Reason::DropTunnelFailed);
    }
    count(hook, Reason::ObsDecap, bytes);
    // Remove outer IP, UDP, VXLAN and the inner Ethernet header; the outer Ethernet
    // header stays (delivery rewrites its MACs).
    // SAFETY: the skb this program owns.
    if unsafe {
        bpf_skb_adjust_room(
            ctx.skb.skb,
            -(p.inner_off as i32),
            BPF_ADJ_ROOM_MAC,
            FIXED_GSO,
        )
    } != 0
    {
        return fail(Reason::DropTunnelFailed);
    }
    let len = ctx.len();
    let _ = ctx.pull_data(if len < 128 { len } else { 128 });
    Ok(())
}
