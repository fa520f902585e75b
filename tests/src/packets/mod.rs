//! Packet builders for fixtures: well-formed packets come from etherparse (checksums
//! and lengths right), malformed ones are those bytes edited in one named way. [`Pkt`]
//! describes an IPv4 packet field by field, so that a fixture's expected output reads as
//! its input with the rewritten fields changed.

use etherparse::{PacketBuilder, PacketBuilderStep, TcpOptionElement, VlanId};
use mesh_common::csum;

mod pkt;
pub use pkt::{Pkt, TCP_WINDOW};

pub const MAC_A: [u8; 6] = [0x02, 0x42, 0x0a, 0xcb, 0x00, 0x01];
pub const MAC_B: [u8; 6] = [0x02, 0x42, 0x0a, 0xcb, 0x00, 0x02];
// The addresses of the real-traffic test's namespaces: fixtures put on a wire there are
// addressed to a namespace the test created, never anywhere else.
pub const IP_A: [u8; 4] = [10, 203, 0, 1];
pub const IP_B: [u8; 4] = [10, 203, 0, 2];
pub const IP6_A: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
pub const IP6_B: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];

/// Where the IPv4/IPv6 header starts in an untagged frame.
pub const L3: usize = 14;

pub(crate) fn write<T>(b: PacketBuilderStep<T>, payload: &[u8]) -> Vec<u8>
where
    PacketBuilderStep<T>: Writable,
{
    let mut out = Vec::new();
    b.write_to(&mut out, payload);
    out
}

/// etherparse's final steps share no trait; this one names the two we use.
pub trait Writable {
    fn write_to(self, out: &mut Vec<u8>, payload: &[u8]);
}
impl Writable for PacketBuilderStep<etherparse::TcpHeader> {
    fn write_to(self, out: &mut Vec<u8>, payload: &[u8]) {
        self.write(out, payload).expect("tcp packet");
    }
}
impl Writable for PacketBuilderStep<etherparse::UdpHeader> {
    fn write_to(self, out: &mut Vec<u8>, payload: &[u8]) {
        self.write(out, payload).expect("udp packet");
    }
}
impl Writable for PacketBuilderStep<etherparse::Icmpv4Header> {
    fn write_to(self, out: &mut Vec<u8>, payload: &[u8]) {
        self.write(out, payload).expect("icmp packet");
    }
}
impl Writable for PacketBuilderStep<etherparse::Icmpv6Header> {
    fn write_to(self, out: &mut Vec<u8>, payload: &[u8]) {
        self.write(out, payload).expect("icmpv6 packet");
    }
}

pub fn tcp4(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    write(
        PacketBuilder::ethernet2(MAC_A, MAC_B)
            .ipv4(IP_A, IP_B, 64)
            .tcp(sport, dport, 1000, 65535)
            .syn(),
        payload,
    )
}

/// A SYN with MSS, SACK-permitted, timestamps and window scale (data offset 10).
pub fn tcp4_options(sport: u16, dport: u16) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv4(IP_A, IP_B, 64)
        .tcp(sport, dport, 1000, 65535)
        .syn()
        .options(&[
            TcpOptionElement::MaximumSegmentSize(1460),
            TcpOptionElement::SelectiveAcknowledgementPermitted,
            TcpOptionElement::Timestamp(1, 0),
            TcpOptionElement::Noop,
            TcpOptionElement::WindowScale(7),
        ])
        .expect("tcp options");
    write(b, &[])
}

pub fn udp4(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    write(
        PacketBuilder::ethernet2(MAC_A, MAC_B)
            .ipv4(IP_A, IP_B, 64)
            .udp(sport, dport),
        payload,
    )
}

pub fn icmp4_echo() -> Vec<u8> {
    write(
        PacketBuilder::ethernet2(MAC_A, MAC_B)
            .ipv4(IP_A, IP_B, 64)
            .icmpv4_echo_request(7, 1),
        b"ping",
    )
}

pub fn tcp6(sport: u16, dport: u16) -> Vec<u8> {
    write(
        PacketBuilder::ethernet2(MAC_A, MAC_B)
            .ipv6(IP6_A, IP6_B, 64)
            .tcp(sport, dport, 1, 65535)
            .syn(),
        &[],
    )
}

pub fn udp6(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    write(
        PacketBuilder::ethernet2(MAC_A, MAC_B)
            .ipv6(IP6_A, IP6_B, 64)
            .udp(sport, dport),
        payload,
    )
}

pub fn icmp6_echo() -> Vec<u8> {
    write(
        PacketBuilder::ethernet2(MAC_A, MAC_B)
            .ipv6(IP6_A, IP6_B, 64)
            .icmpv6_echo_request(7, 1),
        b"ping",
    )
}

pub fn vlan_tcp4(vid: u16) -> Vec<u8> {
    write(
        PacketBuilder::ethernet2(MAC_A, MAC_B)
            .single_vlan(VlanId::try_new(vid).unwrap())
            .ipv4(IP_A, IP_B, 64)
            .tcp(1234, 80, 1, 1024)
            .syn(),
        &[],
    )
}

pub fn qinq_udp4(outer: u16, inner: u16) -> Vec<u8> {
    write(
        PacketBuilder::ethernet2(MAC_A, MAC_B)
            .double_vlan(
                VlanId::try_new(outer).unwrap(),
                VlanId::try_new(inner).unwrap(),
            )
            .ipv4(IP_A, IP_B, 64)
            .udp(5353, 53),
        b"q",
    )
}

/// An Ethernet frame with `ethertype` and raw `payload`.
pub fn eth(ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(14 + payload.len());
    v.extend_from_slice(&MAC_B);
    v.extend_from_slice(&MAC_A);
    v.extend_from_slice(&ethertype.to_be_bytes());
    v.extend_from_slice(payload);
    v
}

/// An ARP request for IP_B.
pub fn arp() -> Vec<u8> {
    let mut p = vec![0, 1, 8, 0, 6, 4, 0, 1];
    p.extend_from_slice(&MAC_A);
    p.extend_from_slice(&IP_A);
    p.extend_from_slice(&[0; 6]);
    p.extend_from_slice(&IP_B);
    eth(0x0806, &p)
}

/// A VXLAN frame (RFC 7348) carrying an inner Ethernet+IPv4+UDP packet, to `dport`.
pub fn vxlan4(dport: u16, vni: u32) -> Vec<u8> {
    udp4(40000, dport, &vxlan_payload(vni))
}

pub fn vxlan6(dport: u16, vni: u32) -> Vec<u8> {
    udp6(40000, dport, &vxlan_payload(vni))
}

fn vxlan_payload(vni: u32) -> Vec<u8> {
    vxlan(vni, &udp4(1111, 2222, b"inner"))
}

/// A VXLAN header (I flag, `vni`) followed by the `inner` frame: a UDP payload.
pub fn vxlan(vni: u32, inner: &[u8]) -> Vec<u8> {
    let mut v = vec![0x08, 0, 0, 0];
    v.extend_from_slice(&(vni << 8).to_be_bytes());
    v.extend_from_slice(inner);
    v
}

/// An ARP request (to the broadcast address) from `sender` (MAC, IPv4) for `target`.
pub fn arp_request(sender: ([u8; 6], [u8; 4]), target: [u8; 4]) -> Vec<u8> {
    arp_frame([0xff; 6], 1, sender, ([0; 6], target))
}

/// An ARP reply from `sender` (MAC, IPv4: the answer) to `to` (who asked).
pub fn arp_reply(sender: ([u8; 6], [u8; 4]), to: ([u8; 6], [u8; 4])) -> Vec<u8> {
    arp_frame(to.0, 2, sender, to)
}

fn arp_frame(
    eth_dst: [u8; 6],
    op: u16,
    sender: ([u8; 6], [u8; 4]),
    target: ([u8; 6], [u8; 4]),
) -> Vec<u8> {
    let mut p = vec![0, 1, 8, 0, 6, 4];
    p.extend_from_slice(&op.to_be_bytes());
    p.extend_from_slice(&sender.0);
    p.extend_from_slice(&sender.1);
    p.extend_from_slice(&target.0);
    p.extend_from_slice(&target.1);
    let mut f = eth_dst.to_vec();
    f.extend_from_slice(&sender.0);
    f.extend_from_slice(&0x0806u16.to_be_bytes());
    f.extend_from_slice(&p);
    f
}

// ---- edits -------------------------------------------------------------------------

pub fn be16_at(p: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([p[off], p[off + 1]])
}

pub fn set_be16(p: &mut [u8], off: usize, v: u16) {
    p[off..off + 2].copy_from_slice(&v.to_be_bytes());
}

/// Recomputes the IPv4 header checksum of the header at `l3`.
pub fn ipv4_fix_csum(p: &mut [u8], l3: usize) {
    let hlen = ((p[l3] & 0x0f) as usize) * 4;
    p[l3 + 10] = 0;
    p[l3 + 11] = 0;
    let c = csum::checksum(&p[l3..l3 + hlen]);
    set_be16(p, l3 + 10, c);
}

/// Inserts IPv4 options (padded to 4 bytes with End-of-List) after the header at `l3`,
/// fixing IHL, total length and the header checksum.
pub fn ipv4_with_options(mut p: Vec<u8>, l3: usize, opts: &[u8]) -> Vec<u8> {
    let mut o = opts.to_vec();
    while !o.len().is_multiple_of(4) {
        o.push(0);
    }
    let hlen = ((p[l3] & 0x0f) as usize) * 4;
    let at = l3 + hlen;
    p.splice(at..at, o.iter().copied());
    p[l3] = 0x40 | ((hlen + o.len()) / 4) as u8;
    let total = be16_at(&p, l3 + 2) + o.len() as u16;
    set_be16(&mut p, l3 + 2, total);
    ipv4_fix_csum(&mut p, l3);
    p
}

/// Sets the IPv4 flags/fragment-offset field (`more`: MF, `offset` in 8-byte units).
pub fn ipv4_fragment(mut p: Vec<u8>, more: bool, offset: u16) -> Vec<u8> {
    let v = if more { 0x2000 } else { 0 } | (offset & 0x1fff);
    set_be16(&mut p, L3 + 6, v);
    ipv4_fix_csum(&mut p, L3);
    p
}

/// Sets the IPv4 total length (and checksum) without touching the frame.
pub fn ipv4_total_len(mut p: Vec<u8>, total: u16) -> Vec<u8> {
    set_be16(&mut p, L3 + 2, total);
    ipv4_fix_csum(&mut p, L3);
    p
}

/// Cuts the frame to `len` bytes and makes the IPv4 total length agree, so that the
/// truncation is seen at the next header, not as a bad IP length.
pub fn ipv4_cut(mut p: Vec<u8>, len: usize) -> Vec<u8> {
    p.truncate(len);
    let total = (len - L3) as u16;
    ipv4_total_len(p, total)
}

/// As [`ipv4_cut`] for IPv6 (payload length).
pub fn ipv6_cut(mut p: Vec<u8>, len: usize) -> Vec<u8> {
    p.truncate(len);
    let payload = (len - L3 - 40) as u16;
    set_be16(&mut p, L3 + 4, payload);
    p
}

/// Inserts an 8-byte IPv6 extension header of type `ext` before the L4 header.
pub fn ipv6_with_ext(mut p: Vec<u8>, ext: u8) -> Vec<u8> {
    let next = p[L3 + 6];
    p[L3 + 6] = ext;
    let hdr = [next, 0, 1, 4, 0, 0, 0, 0]; // hdr-ext-len 0; a PadN option
    let at = L3 + 40;
    p.splice(at..at, hdr);
    let plen = be16_at(&p, L3 + 4) + 8;
    set_be16(&mut p, L3 + 4, plen);
    p
}

/// Pads a frame to the Ethernet minimum of 60 bytes (without FCS), as NICs do.
pub fn pad60(mut p: Vec<u8>) -> Vec<u8> {
    if p.len() < 60 {
        p.resize(60, 0);
    }
    p
}

/// Cuts the IPv4 datagram in `frame` (Ethernet + IPv4 without options + payload) into
/// fragments of at most `mtu` IP bytes, as Linux's ip_fragment does: every fragment
/// keeps the Ethernet header, gets IP id `id` (DF cleared), its offset and MF, and its
/// own header checksum; all but the last carry a multiple of 8 bytes. One fragment
/// (no MF, offset 0) when the datagram fits.
pub fn ipv4_fragments(frame: &[u8], id: u16, mtu: usize) -> Vec<Vec<u8>> {
    let ihl = ((frame[L3] & 0x0f) as usize) * 4;
    let total = be16_at(frame, L3 + 2) as usize;
    let data = &frame[L3 + ihl..L3 + total];
    let per = (mtu - ihl) & !7;
    let mut out = Vec::new();
    let mut off = 0;
    while off < data.len() || out.is_empty() {
        let end = (off + per).min(data.len());
        let more = end < data.len();
        let mut f = frame[..L3 + ihl].to_vec();
        f.extend_from_slice(&data[off..end]);
        set_be16(&mut f, L3 + 2, (ihl + end - off) as u16);
        set_be16(&mut f, L3 + 4, id);
        set_be16(
            &mut f,
            L3 + 6,
            if more { 0x2000 } else { 0 } | (off / 8) as u16,
        );
        ipv4_fix_csum(&mut f, L3);
        out.push(f);
        off = end;
    }
    out
}
