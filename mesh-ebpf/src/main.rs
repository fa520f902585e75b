//! The mesh's kernel programs. Entry points are thin: they adapt their context to a
//! [`pkt::DirectPacket`] and hand it to [`datapath`], which owns the logic.
#![no_std]
#![no_main]

mod config;
mod datapath;
mod flow;
mod icmp;
mod lb;
mod log;
mod maps;
mod parse;
mod pkt;
mod reply;
mod scratch;
mod skb;
mod sock;
mod stats;
mod track;
mod vip;
mod vxlan;
mod xdp;

use aya_ebpf::{
    macros::{cgroup_sock_addr, classifier, xdp},
    programs::{SockAddrContext, TcContext, XdpContext},
};
use mesh_common::stats::Hook;

use crate::pkt::DirectPacket;

/// How much of the frame TC pulls into the linear area before parsing: enough for
/// Ethernet, two VLAN tags, IPv4 with options, UDP, VXLAN and the inner headers.
const TC_PULL_LEN: u32 = 256;

/// XDP on the underlay interface.
#[xdp]
pub fn mesh_xdp(ctx: XdpContext) -> u32 {
    xdp::process(&ctx)
}

/// TC ingress on the underlay interface: clients reaching published ports.
#[classifier]
pub fn mesh_tc_ingress(ctx: TcContext) -> i32 {
    tc(ctx, Hook::TcUnderlayIngress)
}

/// TC ingress on a task's veth (host side): the task's replies, and its own requests to
/// VIPs and published ports.
#[classifier]
pub fn mesh_tc_task(ctx: TcContext) -> i32 {
    tc(ctx, Hook::TcTask)
}

/// TC ingress on a task's overlay veth (host side, in the overlay network's namespace):
/// what the task sends on the overlay, ARP for VIPs and flows to them.
#[classifier]
pub fn mesh_tc_overlay_in(ctx: TcContext) -> i32 {
    overlay(ctx, Hook::TcOverlayIn)
}

/// TC egress on the same veth: what reaches the task, replies of its VIP flows.
#[classifier]
pub fn mesh_tc_overlay_out(ctx: TcContext) -> i32 {
    overlay(ctx, Hook::TcOverlayOut)
}

/// cgroup connect() (IPv4): a socket of this node dialling a published port is pointed
/// at the host port (TCP, connected UDP).
#[cgroup_sock_addr(connect4)]
pub fn mesh_sock_connect4(ctx: SockAddrContext) -> i32 {
    sock::point(&ctx)
}

/// cgroup sendmsg() (IPv4): the same for unconnected UDP, per datagram.
#[cgroup_sock_addr(sendmsg4)]
pub fn mesh_sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    sock::point(&ctx)
}

/// cgroup recvmsg() (IPv4): a datagram from the host port reads as from the address the
/// application dialled.
#[cgroup_sock_addr(recvmsg4)]
pub fn mesh_sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    sock::restore(&ctx)
}

/// cgroup getpeername() (IPv4): the peer is the address the application dialled.
#[cgroup_sock_addr(getpeername4)]
pub fn mesh_sock_getpeername4(ctx: SockAddrContext) -> i32 {
    sock::restore(&ctx)
}

#[inline(always)]
fn pulled(ctx: &TcContext) -> DirectPacket {
    let len = ctx.len();
    let want = if len < TC_PULL_LEN { len } else { TC_PULL_LEN };
    if ctx.data_end() - ctx.data() < want as usize {
        // Failure leaves the skb as it was; the parser then reports what it cannot reach.
        let _ = ctx.pull_data(want);
    }
    DirectPacket::new(ctx.data(), ctx.data_end(), len as usize)
}

#[inline(always)]
fn overlay(ctx: TcContext, hook: Hook) -> i32 {
    let pkt = pulled(&ctx);
    let action = datapath::process_overlay(&ctx, &pkt, hook);
    if log::on() {
        log::after(&ctx);
    }
    action
}

#[inline(always)]
fn tc(ctx: TcContext, hook: Hook) -> i32 {
    let pkt = pulled(&ctx);
    let action = datapath::process_tc(&ctx, &pkt, hook);
    // The datapath log's events (off: a lookup and a branch), before the counters take
    // the noted backend.
    if log::on() {
        log::after(&ctx);
    }
    // Per-backend counters, for what the load balancer noted on the way (out here, its
    // frame adds nothing to the deep path's).
    stats::count_noted(ctx.len() as usize);
    action
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // A reachable panic makes the verifier reject the program; this is never called.
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
