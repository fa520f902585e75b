//! The packet parser shared by every entry point (XDP and TC), and by the host tests.
//!
//! It is generic over [`Packet`], a bounds-checked reader: in the kernel the reader
//! compares against `data_end` (which is what the verifier wants to see), on the host it
//! is a byte slice. Every offset stays small and bounded (at most two VLAN tags, IHL <= 15,
//! TCP doff <= 15), which keeps the verifier's range tracking simple.

use crate::proto::*;
use crate::reason::Reason;

/// A bounds-checked view of a packet.
pub trait Packet {
    /// Length of the whole frame (for TC, `skb->len`: possibly more than `load` reaches
    /// until the program pulls the headers into the linear area).
    fn frame_len(&self) -> usize;
    /// Reads a `T` at `off`, or `None` if `off + size_of::<T>()` is past the end.
    fn load<T: Copy>(&self, off: usize) -> Option<T>;
}

/// A packet in a byte slice (host tests, meshctl's simulator).
#[derive(Clone, Copy, Debug)]
pub struct Bytes<'a>(pub &'a [u8]);

impl Packet for Bytes<'_> {
    fn frame_len(&self) -> usize {
        self.0.len()
    }

    fn load<T: Copy>(&self, off: usize) -> Option<T> {
        let end = off.checked_add(core::mem::size_of::<T>())?;
        if end > self.0.len() {
            return None;
        }
        // SAFETY: in bounds (checked above); read_unaligned copes with any alignment.
        Some(unsafe { core::ptr::read_unaligned(self.0.as_ptr().add(off) as *const T) })
    }
}

/// IPv4 fragmentation state.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Frag {
    #[default]
    None = 0,
    /// Offset 0 with More Fragments: the L4 header is here.
    First = 1,
    /// Offset > 0: no L4 header.
    NonFirst = 2,
    /// Never the parser's: a non-first fragment whose first one was translated, its
    /// ports taken from the record that first one left (the datapath's fragment table).
    /// Its L4 header is elsewhere (`l4_off` stays 0): only its L3 header is rewritten.
    /// Passed on, it counts as a packet of its protocol.
    Followed = 3,
}

/// What the parser found. Addresses are kept in network byte order exactly as on the
/// wire (IPv4 in `saddr[0]`); ports and the VNI are in host order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Parsed {
    /// EtherType after any VLAN tags.
    pub eth_type: u16,
    pub vlan_tags: u8,
    /// More VLAN tags than we follow; nothing past L2 was parsed.
    pub vlan_too_deep: bool,
    /// 0 (not IP), 4 or 6.
    pub ip_version: u8,
    pub l3_off: u16,
    /// End of the IP datagram (l3_off + IP total length); less than the frame if padded.
    pub l3_end: u16,
    /// 0 when no L4 header was parsed (non-IP, non-first fragment, IPv6 extension headers).
    pub l4_off: u16,
    pub l4_proto: u8,
    pub frag: Frag,
    /// IPv4 identification (host order): with the addresses and protocol, what the
    /// fragments of one datagram share.
    pub ip_id: u16,
    pub ipv4_options: bool,
    pub ipv6_ext: bool,
    pub saddr: [u32; 4],
    pub daddr: [u32; 4],
    pub sport: u16,
    pub dport: u16,
    pub tcp_flags: u8,
    pub icmp_type: u8,
    pub icmp_code: u8,
    /// VXLAN on the data-path port: its VNI and where the inner Ethernet header starts.
    pub vxlan: bool,
    /// The first fragment of a datagram to the data-path port whose VXLAN header checks
    /// out: `vni` is set, `vxlan` and `inner_off` are not (nothing takes a fragment apart).
    pub vxlan_first_fragment: bool,
    pub vni: u32,
    pub inner_off: u16,
}

/// Observation bits, see [`Parsed::observations`].
const OBSERVATIONS: [Reason; 5] = [
    Reason::ObsVlan,
    Reason::ObsIpv4Options,
    Reason::ObsFragmentFirst,
    Reason::ObsFragmentNonFirst,
    Reason::ObsIpv6ExtHeaders,
];

impl Parsed {
    /// The verdict class of a well-formed packet.
    pub const fn verdict(&self) -> Reason {
        if self.vlan_too_deep {
            return Reason::PassVlanTooDeep;
        }
        if self.ip_version == 0 {
            return Reason::PassNonIp;
        }
        if matches!(self.frag, Frag::NonFirst) {
            // TCP/UDP fragments after the first follow it where it was translated
            // (`Frag::Followed`, then counted as their protocol's).
            return match self.l4_proto {
                IPPROTO_TCP | IPPROTO_UDP => Reason::PassFragmentUnmatched,
                _ => Reason::PassFragment,
            };
        }
        if self.ipv6_ext {
            return Reason::PassIpv6Ext;
        }
        match self.l4_proto {
            IPPROTO_TCP => Reason::PassTcp,
            IPPROTO_UDP if self.vxlan || self.vxlan_first_fragment => Reason::PassVxlan,
            IPPROTO_UDP => Reason::PassUdp,
            IPPROTO_ICMP if self.ip_version == 4 => Reason::PassIcmp,
            IPPROTO_ICMPV6 if self.ip_version == 6 => Reason::PassIcmpv6,
            _ => Reason::PassOtherL4,
        }
    }

    /// Observations for this packet, as a fixed array of optional reasons (no allocation,
    /// a bounded loop for the verifier).
    pub const fn observations(&self) -> [Option<Reason>; 5] {
        let flags = [
            self.vlan_tags > 0,
            self.ipv4_options,
            matches!(self.frag, Frag::First),
            matches!(self.frag, Frag::NonFirst | Frag::Followed),
            self.ipv6_ext,
        ];
        let mut out = [None; 5];
        let mut i = 0;
        while i < 5 {
            if flags[i] {
                out[i] = Some(OBSERVATIONS[i]);
            }
            i += 1;
        }
        out
    }
}

#[inline(always)]
const fn be16(hi: u8, lo: u8) -> u16 {
    ((hi as u16) << 8) | lo as u16
}

#[inline(always)]
const fn is_vlan(eth_type: u16) -> bool {
    eth_type == ETH_P_8021Q || eth_type == ETH_P_8021AD
}

#[inline(always)]
fn word(b: &[u8], i: usize) -> u32 {
    u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

/// Parses Ethernet, up to two VLAN tags, IPv4/IPv6, TCP/UDP/ICMP/ICMPv6 and VXLAN on
/// `vxlan_port`. A malformed packet yields the drop reason that names what is wrong.
#[inline(always)]
pub fn parse<P: Packet>(p: &P, vxlan_port: u16) -> Result<Parsed, Reason> {
    let mut out = Parsed::default();
    parse_into(p, vxlan_port, &mut out)?;
    Ok(out)
}

/// As [`parse`], into `out` (the kernel keeps it in per-CPU scratch memory rather than
/// on its 512-byte stack). `out` must start as `Parsed::default()`.
#[inline(always)]
pub fn parse_into<P: Packet>(p: &P, vxlan_port: u16, out: &mut Parsed) -> Result<(), Reason> {
    let eth: [u8; ETH_HLEN] = p.load(0).ok_or(Reason::DropTruncatedEth)?;
    let mut eth_type = be16(eth[12], eth[13]);
    let mut off = ETH_HLEN;
    // Two tags, unrolled: 802.1ad outer + 802.1Q inner is the deepest we follow.
    if is_vlan(eth_type) {
        let tag: [u8; VLAN_HLEN] = p.load(off).ok_or(Reason::DropTruncatedVlan)?;
        eth_type = be16(tag[2], tag[3]);
        off += VLAN_HLEN;
        out.vlan_tags = 1;
        if is_vlan(eth_type) {
            let tag: [u8; VLAN_HLEN] = p.load(off).ok_or(Reason::DropTruncatedVlan)?;
            eth_type = be16(tag[2], tag[3]);
            off += VLAN_HLEN;
            out.vlan_tags = 2;
            if is_vlan(eth_type) {
                out.vlan_too_deep = true;
                out.eth_type = eth_type;
                return Ok(());
            }
        }
    }
    out.eth_type = eth_type;
    match eth_type {
        ETH_P_IP => parse_ipv4(p, off, out, vxlan_port)?,
        ETH_P_IPV6 => parse_ipv6(p, off, out, vxlan_port)?,
        _ => {}
    }
    Ok(())
}

#[inline(always)]
fn parse_ipv4<P: Packet>(
    p: &P,
    off: usize,
    out: &mut Parsed,
    vxlan_port: u16,
) -> Result<(), Reason> {
    let h: [u8; IPV4_MIN_HLEN] = p.load(off).ok_or(Reason::DropTruncatedIpv4)?;
    if h[0] >> 4 != 4 {
        return Err(Reason::DropIpv4BadVersion);
    }
    let hlen = ((h[0] & 0x0f) as usize) * 4;
    if hlen < IPV4_MIN_HLEN {
        return Err(Reason::DropIpv4BadIhl);
    }
    if off + hlen > p.frame_len() {
        return Err(Reason::DropTruncatedIpv4);
    }
    let total = be16(h[2], h[3]) as usize;
    if total < hlen || off + total > p.frame_len() {
        return Err(Reason::DropIpv4BadTotalLen);
    }
    out.ip_version = 4;
    out.l3_off = off as u16;
    out.l3_end = (off + total) as u16;
    out.l4_proto = h[9];
    out.saddr[0] = word(&h, 12);
    out.daddr[0] = word(&h, 16);
    out.ipv4_options = hlen > IPV4_MIN_HLEN;
    out.ip_id = be16(h[4], h[5]);
    let frag = be16(h[6], h[7]);
    if frag & IP_OFFSET_MASK != 0 {
        out.frag = Frag::NonFirst;
        return Ok(());
    }
    if frag & IP_MF != 0 {
        out.frag = Frag::First;
    }
    parse_l4(p, off + hlen, off + total, out, vxlan_port)
}

#[inline(always)]
fn parse_ipv6<P: Packet>(
    p: &P,
    off: usize,
    out: &mut Parsed,
    vxlan_port: u16,
) -> Result<(), Reason> {
    let h: [u8; IPV6_HLEN] = p.load(off).ok_or(Reason::DropTruncatedIpv6)?;
    if h[0] >> 4 != 6 {
        return Err(Reason::DropIpv6BadVersion);
    }
    let end = off + IPV6_HLEN + be16(h[4], h[5]) as usize;
    if end > p.frame_len() {
        return Err(Reason::DropIpv6BadPayloadLen);
    }
    out.ip_version = 6;
    out.l3_off = off as u16;
    out.l3_end = end as u16;
    out.l4_proto = h[6];
    let mut i = 0;
    while i < 4 {
        out.saddr[i] = word(&h, 8 + 4 * i);
        out.daddr[i] = word(&h, 24 + 4 * i);
        i += 1;
    }
    if is_ipv6_ext_header(h[6]) {
        out.ipv6_ext = true;
        return Ok(());
    }
    parse_l4(p, off + IPV6_HLEN, end, out, vxlan_port)
}

/// `l3_end` is where the IP datagram (or this fragment of it) ends.
#[inline(always)]
fn parse_l4<P: Packet>(
    p: &P,
    off: usize,
    l3_end: usize,
    out: &mut Parsed,
    vxlan_port: u16,
) -> Result<(), Reason> {
    match out.l4_proto {
        IPPROTO_TCP => {
            let h: [u8; TCP_MIN_HLEN] = p.load(off).ok_or(Reason::DropTruncatedTcp)?;
            if off + TCP_MIN_HLEN > l3_end {
                return Err(Reason::DropTruncatedTcp);
            }
            let doff = ((h[12] >> 4) as usize) * 4;
            if doff < TCP_MIN_HLEN || off + doff > l3_end {
                return Err(Reason::DropTcpBadDataOffset);
            }
            out.sport = be16(h[0], h[1]);
            out.dport = be16(h[2], h[3]);
            out.tcp_flags = h[13];
        }
        IPPROTO_UDP => {
            let h: [u8; UDP_HLEN] = p.load(off).ok_or(Reason::DropTruncatedUdp)?;
            if off + UDP_HLEN > l3_end {
                return Err(Reason::DropTruncatedUdp);
            }
            let ulen = be16(h[4], h[5]) as usize;
            // A first fragment carries only part of the datagram the UDP length covers.
            let whole = !matches!(out.frag, Frag::First);
            if ulen < UDP_HLEN || (whole && off + ulen > l3_end) {
                return Err(Reason::DropUdpBadLength);
            }
            out.sport = be16(h[0], h[1]);
            out.dport = be16(h[2], h[3]);
            if out.dport == vxlan_port {
                if whole {
                    parse_vxlan(p, off + UDP_HLEN, off + ulen, out)?;
                } else {
                    // The first fragment of a datagram to the data-path port: the kernel
                    // would reassemble it for a vxlan socket that accepts any sender, so
                    // its header is checked here as a whole datagram's is (peer and VNI
                    // then), though it is never taken apart.
                    parse_vxlan(p, off + UDP_HLEN, l3_end, out)?;
                    out.vxlan = false;
                    out.vxlan_first_fragment = true;
                    out.inner_off = 0;
                }
            }
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 => {
            let h: [u8; ICMP_HLEN] = p.load(off).ok_or(Reason::DropTruncatedIcmp)?;
            if off + ICMP_HLEN > l3_end {
                return Err(Reason::DropTruncatedIcmp);
            }
            out.icmp_type = h[0];
            out.icmp_code = h[1];
        }
        _ => return Ok(()),
    }
    out.l4_off = off as u16;
    Ok(())
}

#[inline(always)]
fn parse_vxlan<P: Packet>(
    p: &P,
    off: usize,
    udp_end: usize,
    out: &mut Parsed,
) -> Result<(), Reason> {
    let h: [u8; VXLAN_HLEN] = p.load(off).ok_or(Reason::DropVxlanTruncated)?;
    if off + VXLAN_HLEN + ETH_HLEN > udp_end {
        return Err(Reason::DropVxlanTruncated);
    }
    // Linux's vxlan_rcv drops anything but exactly the I flag with zero reserved fields.
    if h[0] != VXLAN_FLAG_I || h[1] | h[2] | h[3] | h[7] != 0 {
        return Err(Reason::DropVxlanBadFlags);
    }
    out.vxlan = true;
    out.vni = u32::from_be_bytes([0, h[4], h[5], h[6]]);
    out.inner_off = (off + VXLAN_HLEN) as u16;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A UDP fragment at `offset` (8-byte units) of datagram `id`, 8 bytes of payload.
    fn udp_fragment(id: u16, offset: u16, proto: u8) -> [u8; 42] {
        let mut f = [0u8; 42];
        f[12] = 0x08;
        let ip = &mut f[14..34];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&28u16.to_be_bytes());
        ip[4..6].copy_from_slice(&id.to_be_bytes());
        ip[6..8].copy_from_slice(&(IP_MF | offset).to_be_bytes());
        ip[8] = 64;
        ip[9] = proto;
        f[34..36].copy_from_slice(&1000u16.to_be_bytes());
        f[36..38].copy_from_slice(&53u16.to_be_bytes());
        f[38..40].copy_from_slice(&3000u16.to_be_bytes());
        f
    }

    #[test]
    fn fragments_keep_their_datagram_id_and_name_what_follows() {
        let first = parse(&Bytes(&udp_fragment(0xbeef, 0, IPPROTO_UDP)), 4789).unwrap();
        assert_eq!((first.frag, first.ip_id), (Frag::First, 0xbeef));
        assert_eq!(
            (first.sport, first.dport, first.verdict()),
            (1000, 53, Reason::PassUdp)
        );
        let mut next = parse(&Bytes(&udp_fragment(0xbeef, 185, IPPROTO_UDP)), 4789).unwrap();
        assert_eq!(
            (next.frag, next.ip_id, next.l4_off),
            (Frag::NonFirst, 0xbeef, 0)
        );
        assert_eq!(next.verdict(), Reason::PassFragmentUnmatched);
        // Given its first one's ports, it passes as the UDP packet it belongs to.
        next.frag = Frag::Followed;
        assert_eq!(next.verdict(), Reason::PassUdp);
        assert_eq!(next.observations()[3], Some(Reason::ObsFragmentNonFirst));
        let other = parse(&Bytes(&udp_fragment(1, 185, 47)), 4789).unwrap();
        assert_eq!(other.verdict(), Reason::PassFragment);
    }

    /// The first fragment of a datagram to the data-path port, carrying `after_udp`
    /// (the UDP length says 4,000 bytes: the whole datagram's).
    fn vxlan_first_fragment(after_udp: &[u8]) -> Vec<u8> {
        let mut f = udp_fragment(7, 0, IPPROTO_UDP).to_vec();
        f.truncate(42);
        f.extend_from_slice(after_udp);
        let total = (f.len() - 14) as u16;
        f[16..18].copy_from_slice(&total.to_be_bytes());
        f[36..38].copy_from_slice(&4789u16.to_be_bytes());
        f[38..40].copy_from_slice(&4000u16.to_be_bytes());
        f
    }

    #[test]
    fn a_first_fragment_to_the_data_path_port_is_vxlan_checked_but_not_taken_apart() {
        let mut v = vec![0x08, 0, 0, 0, 0, 0x10, 0x01, 0];
        v.extend_from_slice(&[0u8; 40]);
        let first = parse(&Bytes(&vxlan_first_fragment(&v)), 4789).unwrap();
        assert!(first.vxlan_first_fragment && !first.vxlan, "{first:?}");
        assert_eq!(
            (first.vni, first.inner_off, first.frag),
            (0x1001, 0, Frag::First)
        );
        assert_eq!(first.verdict(), Reason::PassVxlan);
        // Another data-path port: plain UDP, as before.
        let other = parse(&Bytes(&vxlan_first_fragment(&v)), 8472).unwrap();
        assert!(!other.vxlan_first_fragment);
        assert_eq!(other.verdict(), Reason::PassUdp);
        // A header Linux would refuse, or none whole in the fragment: malformed.
        let mut bad = v.clone();
        bad[0] = 0x0c;
        assert_eq!(
            parse(&Bytes(&vxlan_first_fragment(&bad)), 4789),
            Err(Reason::DropVxlanBadFlags)
        );
        assert_eq!(
            parse(&Bytes(&vxlan_first_fragment(&v[..12])), 4789),
            Err(Reason::DropVxlanTruncated)
        );
    }
}
