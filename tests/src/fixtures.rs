//! The fixture table: packets and what the datapath must do with them.
//!
//! The same table is checked three ways: against the pure parser on the host (no root),
//! and through BPF_PROG_TEST_RUN against the loaded XDP and TC programs.

use mesh_common::{proto::VXLAN_PORT_DEFAULT as VXLAN, reason::Reason};

use crate::packets::*;

pub struct Fixture {
    pub name: &'static str,
    pub packet: Vec<u8>,
    /// The one verdict counter the packet must land in.
    pub verdict: Reason,
    /// Observation counters it must also increment.
    pub observations: Vec<Reason>,
}

impl Fixture {
    pub fn malformed(&self) -> bool {
        self.verdict.kind() == mesh_common::reason::Kind::Drop
    }
}

fn f(name: &'static str, packet: Vec<u8>, verdict: Reason) -> Fixture {
    Fixture {
        name,
        packet,
        verdict,
        observations: Vec::new(),
    }
}

fn fo(name: &'static str, packet: Vec<u8>, verdict: Reason, obs: &[Reason]) -> Fixture {
    Fixture {
        name,
        packet,
        verdict,
        observations: obs.to_vec(),
    }
}

/// Offsets in an untagged IPv4 frame with a 20-byte header.
const L4: usize = L3 + 20;
const L4_V6: usize = L3 + 40;

/// Every fixture. Frames shorter than an Ethernet header are in [`host_only`]: the
/// kernel's BPF_PROG_TEST_RUN refuses input shorter than ETH_HLEN.
pub fn all() -> Vec<Fixture> {
    use Reason::*;
    let router_alert = [0x94, 0x04, 0x00, 0x00];
    let max_options = [0x01u8; 40]; // 40 bytes of NOP: IHL 15
    vec![
        // ---- well-formed ------------------------------------------------------------
        f("ipv4 tcp syn", tcp4(40000, 80, &[]), PassTcp),
        f(
            "ipv4 tcp with payload",
            tcp4(40000, 80, b"GET / HTTP/1.0\r\n\r\n"),
            PassTcp,
        ),
        f(
            "ipv4 tcp syn with options (doff 10)",
            tcp4_options(40001, 443),
            PassTcp,
        ),
        f("ipv4 udp", udp4(5353, 53, b"query"), PassUdp),
        f(
            "ipv4 udp zero checksum",
            {
                let mut p = udp4(5000, 6000, b"x");
                set_be16(&mut p, L4 + 6, 0);
                p
            },
            PassUdp,
        ),
        f("ipv4 udp empty payload", udp4(5000, 6000, &[]), PassUdp),
        f("ipv4 icmp echo", icmp4_echo(), PassIcmp),
        f(
            "ipv4 tcp padded to 60 bytes",
            pad60(tcp4(1, 2, &[])),
            PassTcp,
        ),
        f(
            "ipv4 gre (other l4)",
            {
                let mut p = udp4(1, 2, b"greish");
                p[L3 + 9] = 47;
                ipv4_fix_csum(&mut p, L3);
                p
            },
            PassOtherL4,
        ),
        fo(
            "ipv4 udp with router-alert option (ihl 6)",
            ipv4_with_options(udp4(1, 2, b"igmp-ish"), L3, &router_alert),
            PassUdp,
            &[ObsIpv4Options],
        ),
        fo(
            "ipv4 tcp with 40 bytes of options (ihl 15)",
            ipv4_with_options(tcp4(3, 4, b"x"), L3, &max_options),
            PassTcp,
            &[ObsIpv4Options],
        ),
        fo(
            "ipv4 first fragment (udp length covers the whole datagram)",
            ipv4_cut(ipv4_fragment(udp4(7, 8, &[0xab; 64]), true, 0), L4 + 8 + 24),
            PassUdp,
            &[ObsFragmentFirst],
        ),
        // The first fragment of a VXLAN datagram: checked as VXLAN is (the underlay's
        // programs drop it from an unknown sender), never taken apart.
        fo(
            "ipv4 first fragment of vxlan on the data-path port",
            ipv4_fragment(vxlan4(VXLAN, 4096), true, 0),
            PassVxlan,
            &[ObsFragmentFirst],
        ),
        f(
            "ipv4 first fragment to the data-path port with a bad vxlan header",
            {
                let mut p = vxlan4(VXLAN, 4096);
                p[L4 + 8] = 0x0c;
                ipv4_fragment(p, true, 0)
            },
            DropVxlanBadFlags,
        ),
        // A TCP/UDP fragment after the first with no translated first one (here, none
        // at all: it came first) is passed under its own name.
        fo(
            "ipv4 non-first fragment",
            ipv4_fragment(udp4(7, 8, &[0xab; 32]), false, 3),
            PassFragmentUnmatched,
            &[ObsFragmentNonFirst],
        ),
        fo(
            "ipv4 middle fragment (MF and offset)",
            ipv4_fragment(udp4(7, 8, &[0xab; 32]), true, 2),
            PassFragmentUnmatched,
            &[ObsFragmentNonFirst],
        ),
        fo(
            "ipv4 tcp non-first fragment",
            ipv4_fragment(tcp4(7, 8, &[0xab; 32]), false, 4),
            PassFragmentUnmatched,
            &[ObsFragmentNonFirst],
        ),
        fo(
            "ipv4 icmp non-first fragment",
            ipv4_fragment(icmp4_echo(), false, 1),
            PassFragment,
            &[ObsFragmentNonFirst],
        ),
        f("ipv6 tcp syn", tcp6(40000, 80), PassTcp),
        f("ipv6 udp", udp6(40000, 53, b"q"), PassUdp),
        f("ipv6 icmpv6 echo", icmp6_echo(), PassIcmpv6),
        fo(
            "ipv6 hop-by-hop extension header",
            ipv6_with_ext(udp6(1, 2, b"x"), 0),
            PassIpv6Ext,
            &[ObsIpv6ExtHeaders],
        ),
        fo(
            "ipv6 fragment extension header",
            ipv6_with_ext(udp6(1, 2, b"x"), 44),
            PassIpv6Ext,
            &[ObsIpv6ExtHeaders],
        ),
        f("arp request", arp(), PassNonIp),
        fo("802.1q ipv4 tcp", vlan_tcp4(100), PassTcp, &[ObsVlan]),
        fo(
            "802.1ad+802.1q ipv4 udp",
            qinq_udp4(10, 20),
            PassUdp,
            &[ObsVlan],
        ),
        fo(
            "three vlan tags (not followed)",
            {
                let mut p = qinq_udp4(10, 20);
                // Turn the inner EtherType (IPv4) into a third 802.1Q tag.
                set_be16(&mut p, 12 + 8, 0x8100);
                p
            },
            PassVlanTooDeep,
            &[ObsVlan],
        ),
        f(
            "vxlan on the data-path port",
            vxlan4(VXLAN, 4096),
            PassVxlan,
        ),
        f("vxlan over ipv6", vxlan6(VXLAN, 4097), PassVxlan),
        f(
            "vxlan-looking udp on another port (not ours)",
            {
                let mut p = vxlan4(4790, 4096);
                p[L4 + 8] = 0xff;
                p
            },
            PassUdp,
        ),
        // ---- malformed ----------------------------------------------------------------
        f(
            "cut inside the vlan tag",
            {
                let mut p = vlan_tcp4(5);
                p.truncate(16);
                p
            },
            DropTruncatedVlan,
        ),
        f(
            "cut inside the second vlan tag",
            {
                let mut p = qinq_udp4(5, 6);
                p.truncate(20);
                p
            },
            DropTruncatedVlan,
        ),
        f(
            "ethernet header only, ethertype ipv4",
            eth(0x0800, &[]),
            DropTruncatedIpv4,
        ),
        f(
            "cut inside the ipv4 header",
            {
                let mut p = udp4(1, 2, &[]);
                p.truncate(L3 + 10);
                p
            },
            DropTruncatedIpv4,
        ),
        f(
            "ipv4 version 5",
            {
                let mut p = udp4(1, 2, b"x");
                p[L3] = 0x55;
                p
            },
            DropIpv4BadVersion,
        ),
        f(
            "ipv4 ihl 4",
            {
                let mut p = udp4(1, 2, b"x");
                p[L3] = 0x44;
                p
            },
            DropIpv4BadIhl,
        ),
        f(
            "ipv4 ihl 0",
            {
                let mut p = udp4(1, 2, b"x");
                p[L3] = 0x40;
                p
            },
            DropIpv4BadIhl,
        ),
        f(
            "ipv4 options cut by the frame (ihl 15, 20-byte frame)",
            {
                let mut p = eth(0x0800, &udp4(1, 2, &[])[L3..L3 + 20]);
                p[L3] = 0x4f;
                p
            },
            DropTruncatedIpv4,
        ),
        f(
            "ipv4 total length beyond the frame",
            {
                let p = udp4(1, 2, b"abcd");
                let t = be16_at(&p, L3 + 2) + 100;
                ipv4_total_len(p, t)
            },
            DropIpv4BadTotalLen,
        ),
        f(
            "ipv4 total length below the header",
            ipv4_total_len(udp4(1, 2, b"abcd"), 12),
            DropIpv4BadTotalLen,
        ),
        f(
            "cut inside the tcp header",
            ipv4_cut(tcp4(1, 2, &[]), L4 + 10),
            DropTruncatedTcp,
        ),
        f(
            "ip ends at the tcp header (frame padding is not tcp)",
            pad60(ipv4_cut(tcp4(1, 2, &[]), L4)),
            DropTruncatedTcp,
        ),
        f(
            "tcp data offset 4",
            {
                let mut p = tcp4(1, 2, b"x");
                p[L4 + 12] = 0x40;
                p
            },
            DropTcpBadDataOffset,
        ),
        f(
            "tcp data offset 15 beyond the segment",
            {
                let mut p = tcp4(1, 2, &[]);
                p[L4 + 12] = 0xf0;
                p
            },
            DropTcpBadDataOffset,
        ),
        f(
            "cut inside the udp header",
            ipv4_cut(udp4(1, 2, &[]), L4 + 4),
            DropTruncatedUdp,
        ),
        f(
            "udp length 0",
            {
                let mut p = udp4(1, 2, b"x");
                set_be16(&mut p, L4 + 4, 0);
                p
            },
            DropUdpBadLength,
        ),
        f(
            "udp length beyond the ip payload",
            {
                let mut p = udp4(1, 2, b"x");
                set_be16(&mut p, L4 + 4, 200);
                p
            },
            DropUdpBadLength,
        ),
        f(
            "cut inside the icmp header",
            ipv4_cut(icmp4_echo(), L4 + 4),
            DropTruncatedIcmp,
        ),
        f(
            "cut inside the icmpv6 header",
            ipv6_cut(icmp6_echo(), L4_V6 + 4),
            DropTruncatedIcmp,
        ),
        f(
            "cut inside the ipv6 header",
            {
                let mut p = udp6(1, 2, b"x");
                p.truncate(L3 + 30);
                p
            },
            DropTruncatedIpv6,
        ),
        f(
            "ipv6 version 4",
            {
                let mut p = udp6(1, 2, b"x");
                p[L3] = 0x40;
                p
            },
            DropIpv6BadVersion,
        ),
        f(
            "ipv6 payload length beyond the frame",
            {
                let mut p = udp6(1, 2, b"x");
                set_be16(&mut p, L3 + 4, 500);
                p
            },
            DropIpv6BadPayloadLen,
        ),
        f(
            "vxlan cut inside its header",
            {
                let p = vxlan4(VXLAN, 4096);
                let mut p = ipv4_cut(p, L4 + 8 + 4);
                set_be16(&mut p, L4 + 4, 12);
                p
            },
            DropVxlanTruncated,
        ),
        f(
            "vxlan without a whole inner ethernet header",
            {
                let p = vxlan4(VXLAN, 4096);
                let mut p = ipv4_cut(p, L4 + 8 + 8 + 6);
                set_be16(&mut p, L4 + 4, 8 + 8 + 6);
                p
            },
            DropVxlanTruncated,
        ),
        f(
            "vxlan without the I flag",
            {
                let mut p = vxlan4(VXLAN, 4096);
                p[L4 + 8] = 0;
                p
            },
            DropVxlanBadFlags,
        ),
        f(
            "vxlan with an extra flag (gbp)",
            {
                let mut p = vxlan4(VXLAN, 4096);
                p[L4 + 8] = 0x88;
                p
            },
            DropVxlanBadFlags,
        ),
        f(
            "vxlan reserved byte set",
            {
                let mut p = vxlan4(VXLAN, 4096);
                p[L4 + 8 + 7] = 1;
                p
            },
            DropVxlanBadFlags,
        ),
    ]
}

/// Frames the kernel's test runner will not take (shorter than ETH_HLEN): checked against
/// the pure parser only.
pub fn host_only() -> Vec<Fixture> {
    vec![
        f("empty frame", Vec::new(), Reason::DropTruncatedEth),
        f("one byte", vec![0x02], Reason::DropTruncatedEth),
        f("13 bytes", arp()[..13].to_vec(), Reason::DropTruncatedEth),
    ]
}

/// The data-path port is configuration: with 8472 configured, VXLAN on 4789 is plain
/// UDP and VXLAN on 8472 is checked as VXLAN.
pub const ALT_VXLAN_PORT: u16 = 8472;

pub fn alt_port() -> Vec<Fixture> {
    vec![
        f(
            "vxlan on 4789 with port 8472 configured",
            vxlan4(VXLAN, 4096),
            Reason::PassUdp,
        ),
        f(
            "vxlan on 8472 with port 8472 configured",
            vxlan4(ALT_VXLAN_PORT, 4096),
            Reason::PassVxlan,
        ),
        f(
            "bad vxlan on 8472 with port 8472 configured",
            {
                let mut p = vxlan4(ALT_VXLAN_PORT, 4096);
                p[L4 + 8] = 0;
                p
            },
            Reason::DropVxlanBadFlags,
        ),
    ]
}

/// A frame derived from a fixture by `mutants`: where it came from and what was done.
pub struct Mutant {
    pub origin: &'static str,
    pub how: String,
    pub packet: Vec<u8>,
}

/// xorshift64*: a fixed seed gives the same frames on every machine and kernel.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// `per` frames from each fixture of `table`, seeded by `seed`: header bytes set at
/// random, truncations, IPv4 fragment fields, and datagrams turned into VXLAN on the
/// data-path port (with a header that is sometimes well-formed, sometimes not). Every
/// frame keeps its Ethernet header (14 bytes).
pub fn mutants(table: &[Fixture], per: usize, seed: u64) -> Vec<Mutant> {
    let mut rng = Rng(seed | 1);
    let mut out = Vec::new();
    for fx in table {
        for _ in 0..per {
            let mut p = fx.packet.clone();
            // Where an IPv4 header's options end (past the frame when there is none).
            let l4 = p
                .get(L3)
                .map_or(usize::MAX / 2, |b| L3 + ((b & 0x0f) as usize) * 4);
            let how = match rng.below(4) {
                0 => {
                    let n = 1 + rng.below(3);
                    let mut at = Vec::new();
                    for _ in 0..n {
                        let i = rng.below(p.len().min(96));
                        p[i] = rng.next() as u8;
                        at.push(i);
                    }
                    format!("bytes {at:?} set")
                }
                1 if p.len() > L3 => {
                    let len = L3 + rng.below(p.len() - L3);
                    p.truncate(len);
                    format!("cut to {len} bytes")
                }
                2 if p.len() >= l4 && p.len() >= L4 && p[12..14] == [0x08, 0x00] => {
                    let v = (rng.next() as u16) & 0x3fff;
                    set_be16(&mut p, L3 + 6, v);
                    ipv4_fix_csum(&mut p, L3);
                    format!("flags/offset {v:#06x}")
                }
                3 if p.len() >= l4 + 8
                    && p.len() >= L4 + 8
                    && p[12..14] == [0x08, 0x00]
                    && p[L3 + 9] == 17 =>
                {
                    set_be16(&mut p, l4 + 2, VXLAN);
                    let h = l4 + 8;
                    if p.len() >= h + 8 {
                        let hdr: [u8; 8] = if rng.below(2) == 0 {
                            [0x08, 0, 0, 0, rng.next() as u8, rng.next() as u8, 1, 0]
                        } else {
                            (rng.next()).to_be_bytes()
                        };
                        p[h..h + 8].copy_from_slice(&hdr);
                    }
                    "to the data-path port".to_string()
                }
                _ => {
                    let i = rng.below(p.len());
                    p[i] ^= 0xff;
                    format!("byte {i} inverted")
                }
            };
            out.push(Mutant {
                origin: fx.name,
                how,
                packet: p,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    //! Tier 1: the table against the pure parser, no root needed.
    use mesh_common::parse::{parse, Bytes};

    use super::*;

    fn check(fx: &[Fixture], port: u16) {
        for fx in fx {
            let got = parse(&Bytes(&fx.packet), port);
            let (verdict, obs) = match got {
                Ok(p) => (
                    p.verdict(),
                    p.observations().into_iter().flatten().collect(),
                ),
                Err(r) => (r, Vec::new()),
            };
            assert_eq!(verdict, fx.verdict, "{}: {:02x?}", fx.name, fx.packet);
            assert_eq!(obs, fx.observations, "{}", fx.name);
        }
    }

    #[test]
    fn table_against_the_pure_parser() {
        check(&all(), VXLAN);
        check(&host_only(), VXLAN);
        check(&alt_port(), ALT_VXLAN_PORT);
    }

    #[test]
    fn table_is_big_enough() {
        let all = all();
        assert!(all.len() >= 30, "{} fixtures", all.len());
        assert!(all.iter().filter(|f| f.malformed()).count() >= 12);
        let mut names: Vec<_> = all.iter().map(|f| f.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), all.len(), "fixture names must be unique");
    }

    /// The parser agrees with etherparse on addresses and ports of well-formed packets.
    #[test]
    fn fields_agree_with_etherparse() {
        use etherparse::{NetSlice, SlicedPacket, TransportSlice};
        for fx in all().iter().filter(|f| !f.malformed()) {
            let ours = parse(&Bytes(&fx.packet), VXLAN).unwrap();
            let Ok(theirs) = SlicedPacket::from_ethernet(&fx.packet) else {
                continue;
            };
            match &theirs.net {
                Some(NetSlice::Ipv4(v4)) => {
                    assert_eq!(ours.ip_version, 4, "{}", fx.name);
                    assert_eq!(
                        ours.saddr[0].to_ne_bytes(),
                        v4.header().source(),
                        "{}",
                        fx.name
                    );
                    assert_eq!(
                        ours.daddr[0].to_ne_bytes(),
                        v4.header().destination(),
                        "{}",
                        fx.name
                    );
                }
                Some(NetSlice::Ipv6(v6)) => {
                    assert_eq!(ours.ip_version, 6, "{}", fx.name);
                    let s: Vec<u8> = ours.saddr.iter().flat_map(|w| w.to_ne_bytes()).collect();
                    assert_eq!(s, v6.header().source(), "{}", fx.name);
                }
                None => assert_eq!(ours.ip_version, 0, "{}", fx.name),
            }
            if ours.l4_off == 0 {
                // Extension headers and non-first fragments: no L4 parse, by design.
                continue;
            }
            match &theirs.transport {
                Some(TransportSlice::Tcp(t)) => {
                    assert_eq!(
                        (ours.sport, ours.dport),
                        (t.source_port(), t.destination_port()),
                        "{}",
                        fx.name
                    );
                }
                Some(TransportSlice::Udp(u)) => {
                    assert_eq!(
                        (ours.sport, ours.dport),
                        (u.source_port(), u.destination_port()),
                        "{}",
                        fx.name
                    );
                }
                _ => {}
            }
        }
    }

    #[test]
    fn vxlan_vni_and_inner_offset() {
        let p = vxlan4(VXLAN, 4097);
        let parsed = parse(&Bytes(&p), VXLAN).unwrap();
        assert!(parsed.vxlan);
        assert_eq!(parsed.vni, 4097);
        assert_eq!(parsed.inner_off as usize, L4 + 16);
        // The inner frame parses as the UDP packet it is.
        let inner = parse(&Bytes(&p[parsed.inner_off as usize..]), VXLAN).unwrap();
        assert_eq!((inner.sport, inner.dport), (1111, 2222));
    }

    /// Never a panic, whatever the bytes: every prefix and single-byte corruption of
    /// every fixture parses to some verdict or drop reason.
    #[test]
    fn prefixes_and_corruptions_never_panic() {
        for fx in all() {
            for n in 0..=fx.packet.len() {
                let _ = parse(&Bytes(&fx.packet[..n]), VXLAN);
            }
            for i in 0..fx.packet.len() {
                for v in [0x00, 0x0f, 0x45, 0x80, 0xff] {
                    let mut p = fx.packet.clone();
                    p[i] = v;
                    let _ = parse(&Bytes(&p), VXLAN);
                }
            }
        }
    }
}
