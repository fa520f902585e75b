//! Turning the packet in hand into the answer (a RST, an ICMP port unreachable): the
//! headers are built by `mesh_common::reply`, the frame resized and overwritten here.

use aya_ebpf::{
    helpers::{bpf_skb_change_tail, bpf_skb_load_bytes},
    programs::TcContext,
};
use mesh_common::{parse::Parsed, reply as build};

use crate::{flow::Flow, scratch::scratch};

/// Swaps the MACs, resizes the frame to `l3 + N` and writes `hdr` at `l3` (the MACs
/// pass through scratch memory: nothing on this frame).
#[inline(always)]
fn rewrite<const N: usize>(ctx: &TcContext, l3: usize, hdr: &[u8; N]) -> Result<(), ()> {
    let s = scratch().ok_or(())?;
    // SAFETY: the helper writes exactly 12 bytes into scratch memory of that size.
    if unsafe { bpf_skb_load_bytes(ctx.skb.skb as *const _, 0, s.macs.as_mut_ptr().cast(), 12) }
        != 0
    {
        return Err(());
    }
    let mut i = 0;
    while i < 6 {
        s.macs.swap(i, i + 6);
        i += 1;
    }
    // SAFETY: resizing the skb this program owns.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, (l3 + N) as u32, 0) } != 0 {
        return Err(());
    }
    ctx.store(0, &s.macs, 0).map_err(|_| ())?;
    ctx.store(l3, hdr, 0).map_err(|_| ())
}

/// The TCP segment in `ctx` becomes the RST that answers it.
#[inline(never)]
pub fn tcp_rst(ctx: &TcContext, p: &Parsed, f: &Flow) -> Result<(), ()> {
    let l3 = p.l3_off as usize;
    let l4 = p.l4_off as usize;
    let seq = u32::from_be(ctx.load::<u32>(l4 + 4).map_err(|_| ())?);
    let ack = u32::from_be(ctx.load::<u32>(l4 + 8).map_err(|_| ())?);
    let doff = ((ctx.load::<u8>(l4 + 12).map_err(|_| ())? >> 4) as u32) * 4;
    let payload = (p.l3_end as u32).saturating_sub(l4 as u32 + doff);
    let s = scratch().ok_or(())?;
    build::tcp_rst_into(
        &mut s.rst,
        f.saddr,
        f.daddr,
        f.sport,
        f.dport,
        seq,
        ack,
        f.tcp_flags,
        payload,
    );
    rewrite(ctx, l3, &s.rst)
}

/// Copies what an ICMP error quotes of the packet (its option-less IPv4 header and 8
/// bytes of L4) into scratch memory.
#[inline(always)]
fn quote(ctx: &TcContext, p: &Parsed) -> Result<&'static mut crate::scratch::Scratch, ()> {
    if p.ipv4_options {
        // The quote would need the options; such packets are rare enough to drop.
        return Err(());
    }
    let s = scratch().ok_or(())?;
    // The helper directly, with a constant length (aya's wrapper clamps the length to
    // what is left of the skb, which the verifier sees as possibly zero).
    // SAFETY: writes exactly QUOTE_LEN bytes into scratch memory of that size.
    let r = unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb as *const _,
            p.l3_off as u32,
            s.quote.as_mut_ptr().cast(),
            s.quote.len() as u32,
        )
    };
    (r == 0).then_some(s).ok_or(())
}

/// The UDP datagram in `ctx` becomes the ICMP port unreachable that answers it.
#[inline(never)]
pub fn port_unreachable(ctx: &TcContext, p: &Parsed) -> Result<(), ()> {
    let s = quote(ctx, p)?;
    build::icmp_port_unreachable_into(&mut s.unreach, &s.quote);
    rewrite(ctx, p.l3_off as usize, &s.unreach)
}

/// The packet in `ctx` (which would not fit the underlay once encapsulated) becomes the
/// ICMP fragmentation needed that tells its sender the overlay's MTU.
#[inline(never)]
pub fn frag_needed(ctx: &TcContext, p: &Parsed, mtu: u32) -> Result<(), ()> {
    let s = quote(ctx, p)?;
    build::icmp_frag_needed_into(&mut s.unreach, &s.quote, mtu as u16);
    rewrite(ctx, p.l3_off as usize, &s.unreach)
}
