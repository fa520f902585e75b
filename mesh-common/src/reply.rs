//! Answers the datapath builds in place of a black hole: a TCP RST for a flow nobody
//! will serve, an ICMP port unreachable for such a UDP datagram. Pure functions over
//! header bytes, so the kernel and the tests build exactly the same packets.

use crate::csum;

/// Bytes of IPv4 + TCP headers of a RST.
pub const RST_LEN: usize = 40;
/// Bytes of IPv4 + ICMP headers + the quoted IPv4 header and 8 bytes of L4.
pub const UNREACH_LEN: usize = 56;
/// What an ICMP error quotes of the offending packet: its (option-less) IPv4 header and
/// the first 8 bytes of its L4 header.
pub const QUOTE_LEN: usize = 28;

const TTL: u8 = 64;

#[inline(always)]
fn ipv4_header(out: &mut [u8], total: u16, proto: u8, src: u32, dst: u32) {
    out[0] = 0x45;
    out[1] = 0;
    out[2..4].copy_from_slice(&total.to_be_bytes());
    out[4..6].copy_from_slice(&[0, 0]);
    out[6..8].copy_from_slice(&[0x40, 0]); // DF
    out[8] = TTL;
    out[9] = proto;
    out[10..12].copy_from_slice(&[0, 0]);
    out[12..16].copy_from_slice(&src.to_ne_bytes());
    out[16..20].copy_from_slice(&dst.to_ne_bytes());
    let c = !csum::fold(csum::sum(&out[..20], 0));
    out[10..12].copy_from_slice(&c.to_be_bytes());
}

/// The RST answering a TCP segment from `saddr:sport` to `daddr:dport` (addresses and
/// ports as on the wire) with sequence `seq`, acknowledgment `ack`, `flags` and
/// `payload_len` bytes of data (RFC 9293 §3.10.7.1: a segment with ACK is answered by
/// <SEQ=SEG.ACK><CTL=RST>, one without by <SEQ=0><ACK=SEG.SEQ+SEG.LEN><CTL=RST,ACK>).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn tcp_rst(
    saddr: u32,
    daddr: u32,
    sport: u16,
    dport: u16,
    seq: u32,
    ack: u32,
    flags: u8,
    payload_len: u32,
) -> [u8; RST_LEN] {
    let mut out = [0u8; RST_LEN];
    tcp_rst_into(
        &mut out,
        saddr,
        daddr,
        sport,
        dport,
        seq,
        ack,
        flags,
        payload_len,
    );
    out
}

/// As [`tcp_rst`], into `out` (which the kernel keeps off its stack).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn tcp_rst_into(
    out: &mut [u8; RST_LEN],
    saddr: u32,
    daddr: u32,
    sport: u16,
    dport: u16,
    seq: u32,
    ack: u32,
    flags: u8,
    payload_len: u32,
) {
    use crate::proto::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};
    out.fill(0);
    ipv4_header(out, RST_LEN as u16, crate::proto::IPPROTO_TCP, daddr, saddr);
    let (rseq, rack, rflags) = if flags & TCP_ACK != 0 {
        (ack, 0, TCP_RST)
    } else {
        let len = payload_len + (flags & TCP_SYN != 0) as u32 + (flags & TCP_FIN != 0) as u32;
        (0, seq.wrapping_add(len), TCP_RST | TCP_ACK)
    };
    let t = &mut out[20..];
    t[0..2].copy_from_slice(&dport.to_ne_bytes());
    t[2..4].copy_from_slice(&sport.to_ne_bytes());
    t[4..8].copy_from_slice(&rseq.to_be_bytes());
    t[8..12].copy_from_slice(&rack.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = rflags;
    let pseudo = csum::sum(&daddr.to_ne_bytes(), 0)
        + csum::sum(&saddr.to_ne_bytes(), 0)
        + crate::proto::IPPROTO_TCP as u64
        + 20;
    let c = !csum::fold(csum::sum(&out[20..], pseudo));
    out[36..38].copy_from_slice(&c.to_be_bytes());
}

/// ICMP destination unreachable, port unreachable (type 3, code 3), from the address
/// the offending datagram was sent to, quoting it (`quote`: its IPv4 header and first
/// 8 bytes of UDP).
#[inline(always)]
pub fn icmp_port_unreachable(quote: &[u8; QUOTE_LEN]) -> [u8; UNREACH_LEN] {
    let mut out = [0u8; UNREACH_LEN];
    icmp_port_unreachable_into(&mut out, quote);
    out
}

/// As [`icmp_port_unreachable`], into `out`.
#[inline(always)]
pub fn icmp_port_unreachable_into(out: &mut [u8; UNREACH_LEN], quote: &[u8; QUOTE_LEN]) {
    icmp_unreachable_into(out, quote, 3, 0)
}

/// ICMP fragmentation needed (type 3, code 4) with the next-hop `mtu`, quoting the
/// packet that did not fit (RFC 1191), from the address it was sent to.
#[inline(always)]
pub fn icmp_frag_needed_into(out: &mut [u8; UNREACH_LEN], quote: &[u8; QUOTE_LEN], mtu: u16) {
    icmp_unreachable_into(out, quote, 4, mtu)
}

#[inline(always)]
fn icmp_unreachable_into(out: &mut [u8; UNREACH_LEN], quote: &[u8; QUOTE_LEN], code: u8, mtu: u16) {
    out.fill(0);
    let src = u32::from_ne_bytes([quote[16], quote[17], quote[18], quote[19]]);
    let dst = u32::from_ne_bytes([quote[12], quote[13], quote[14], quote[15]]);
    ipv4_header(
        out,
        UNREACH_LEN as u16,
        crate::proto::IPPROTO_ICMP,
        src,
        dst,
    );
    out[20] = 3;
    out[21] = code;
    out[26..28].copy_from_slice(&mtu.to_be_bytes());
    out[28..].copy_from_slice(quote);
    let c = !csum::fold(csum::sum(&out[20..], 0));
    out[22..24].copy_from_slice(&c.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(a: [u8; 4]) -> u32 {
        u32::from_ne_bytes(a)
    }

    #[test]
    fn rst_for_a_syn_acks_it_and_verifies() {
        let r = tcp_rst(
            ip([10, 1, 0, 2]),
            ip([10, 1, 0, 1]),
            40000u16.to_be(),
            8080u16.to_be(),
            1000,
            0,
            crate::proto::TCP_SYN,
            0,
        );
        let ip4 = etherparse::Ipv4HeaderSlice::from_slice(&r).unwrap();
        assert_eq!(ip4.source(), [10, 1, 0, 1]);
        assert_eq!(ip4.destination(), [10, 1, 0, 2]);
        assert_eq!(
            ip4.header_checksum(),
            ip4.to_header().calc_header_checksum()
        );
        let tcp = etherparse::TcpHeaderSlice::from_slice(&r[20..]).unwrap();
        assert!(tcp.rst() && tcp.ack() && !tcp.syn());
        assert_eq!((tcp.source_port(), tcp.destination_port()), (8080, 40000));
        assert_eq!(
            (tcp.sequence_number(), tcp.acknowledgment_number()),
            (0, 1001)
        );
        let want = tcp
            .to_header()
            .calc_checksum_ipv4_raw([10, 1, 0, 1], [10, 1, 0, 2], &[])
            .unwrap();
        assert_eq!(tcp.checksum(), want);
    }

    #[test]
    fn rst_for_an_ack_takes_its_sequence_from_the_ack() {
        let r = tcp_rst(1, 2, 3, 4, 500, 777, crate::proto::TCP_ACK, 100);
        let tcp = etherparse::TcpHeaderSlice::from_slice(&r[20..]).unwrap();
        assert!(tcp.rst() && !tcp.ack());
        assert_eq!(tcp.sequence_number(), 777);
    }

    #[test]
    fn frag_needed_carries_the_mtu() {
        let mut quote = [0u8; QUOTE_LEN];
        quote[0] = 0x45;
        quote[12..16].copy_from_slice(&[10, 1, 0, 2]);
        quote[16..20].copy_from_slice(&[10, 1, 0, 1]);
        let mut out = [0u8; UNREACH_LEN];
        icmp_frag_needed_into(&mut out, &quote, 1450);
        assert_eq!(&out[20..22], &[3, 4]);
        assert_eq!(u16::from_be_bytes([out[26], out[27]]), 1450);
        assert_eq!(csum::fold(csum::sum(&out[20..], 0)), 0xffff);
    }

    #[test]
    fn port_unreachable_quotes_and_verifies() {
        let mut quote = [0u8; QUOTE_LEN];
        quote[0] = 0x45;
        quote[9] = 17;
        quote[12..16].copy_from_slice(&[10, 1, 0, 2]);
        quote[16..20].copy_from_slice(&[10, 1, 0, 1]);
        quote[20..28].copy_from_slice(&[0x9c, 0x40, 0x1f, 0x90, 0, 12, 0, 0]);
        let r = icmp_port_unreachable(&quote);
        let ip4 = etherparse::Ipv4HeaderSlice::from_slice(&r).unwrap();
        assert_eq!(ip4.source(), [10, 1, 0, 1]);
        assert_eq!(ip4.destination(), [10, 1, 0, 2]);
        assert_eq!(ip4.total_len(), 56);
        assert_eq!(
            ip4.header_checksum(),
            ip4.to_header().calc_header_checksum()
        );
        assert_eq!(&r[20..22], &[3, 3]);
        assert_eq!(csum::fold(csum::sum(&r[20..], 0)), 0xffff, "icmp checksum");
        assert_eq!(&r[28..], &quote);
    }
}
