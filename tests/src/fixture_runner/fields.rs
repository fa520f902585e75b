//! [`Fields`]: what must hold of an output packet when its exact bytes cannot be known
//! in advance (a reply the datapath builds, a packet whose backend is chosen by hash):
//! addresses, ports, MACs, TCP flags, VXLAN encapsulation, valid checksums.

use mesh_common::csum;

use crate::packets::{be16_at, L3};

/// Fields an untagged Ethernet + IPv4 frame must carry; each is checked only when set.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Fields {
    vxlan: Option<u32>,
    eth: Option<([u8; 6], [u8; 6])>,
    addrs: Option<([u8; 4], [u8; 4])>,
    ports: Option<(u16, u16)>,
    rst: bool,
    checksums: bool,
}

impl Fields {
    pub fn new() -> Fields {
        Fields::default()
    }

    /// The frame is VXLAN with `vni`; the fields set below are the inner frame's (the
    /// checksums are checked on both).
    pub fn vxlan(mut self, vni: u32) -> Fields {
        self.vxlan = Some(vni);
        self
    }

    /// Ethernet source and destination.
    pub fn eth(mut self, src: [u8; 6], dst: [u8; 6]) -> Fields {
        self.eth = Some((src, dst));
        self
    }

    /// IPv4 source and destination.
    pub fn addrs(mut self, src: [u8; 4], dst: [u8; 4]) -> Fields {
        self.addrs = Some((src, dst));
        self
    }

    /// TCP or UDP source and destination ports.
    pub fn ports(mut self, sport: u16, dport: u16) -> Fields {
        self.ports = Some((sport, dport));
        self
    }

    /// A TCP segment with RST set.
    pub fn rst(mut self) -> Fields {
        self.rst = true;
        self
    }

    /// The IPv4 header checksum and the TCP, UDP (unless zero) or ICMP checksum are
    /// valid (the L4 one only on a first or whole datagram).
    pub fn checksums(mut self) -> Fields {
        self.checksums = true;
        self
    }

    /// Every field of `frame` that differs from what is set, described.
    pub fn check(&self, frame: &[u8]) -> Vec<String> {
        let mut errs = Vec::new();
        let Some(outer) = Ipv4::parse(frame, &mut errs) else {
            return errs;
        };
        if self.checksums {
            outer.checksums(frame, "", &mut errs);
        }
        let (frame, inner) = match self.vxlan {
            None => (frame, None),
            Some(vni) => match outer.vxlan(frame) {
                Some((got, at)) => {
                    if got != vni {
                        errs.push(format!("VNI {got}, want {vni}"));
                    }
                    let inner = &frame[at..];
                    let Some(ip) = Ipv4::parse(inner, &mut errs) else {
                        return errs;
                    };
                    if self.checksums {
                        ip.checksums(inner, "inner ", &mut errs);
                    }
                    (inner, Some(ip))
                }
                None => {
                    errs.push("not VXLAN (UDP with the I flag and a whole inner frame)".into());
                    return errs;
                }
            },
        };
        let ip = inner.unwrap_or(outer);
        let mut want = |what: &str, got: String, want: String| {
            if got != want {
                errs.push(format!("{what} {got}, want {want}"));
            }
        };
        if let Some((src, dst)) = self.eth {
            want(
                "eth",
                format!("{:02x?} -> {:02x?}", &frame[6..12], &frame[0..6]),
                format!("{src:02x?} -> {dst:02x?}"),
            );
        }
        if let Some((src, dst)) = self.addrs {
            want(
                "addresses",
                format!(
                    "{:?} -> {:?}",
                    &frame[L3 + 12..L3 + 16],
                    &frame[L3 + 16..L3 + 20]
                ),
                format!("{src:?} -> {dst:?}"),
            );
        }
        if let Some((sport, dport)) = self.ports {
            let got = match ip.l4_ports(frame) {
                Some((s, d)) => format!("{s} -> {d}"),
                None => "none (not a first TCP/UDP fragment)".into(),
            };
            want("ports", got, format!("{sport} -> {dport}"));
        }
        if self.rst {
            let rst = ip.proto == 6 && frame.get(ip.l4 + 13).is_some_and(|f| f & 0x04 != 0);
            want("TCP RST", rst.to_string(), true.to_string());
        }
        errs
    }
}

/// Where an untagged IPv4 frame's headers are.
#[derive(Clone, Copy)]
struct Ipv4 {
    proto: u8,
    /// L4 offset in the frame.
    l4: usize,
    /// End of the IP datagram in the frame.
    end: usize,
    /// A fragment after the first: no L4 header.
    later_fragment: bool,
    /// A fragment of any kind: the L4 checksum covers bytes elsewhere.
    fragment: bool,
}

impl Ipv4 {
    fn parse(frame: &[u8], errs: &mut Vec<String>) -> Option<Ipv4> {
        if frame.len() < L3 + 20 || be16_at(frame, 12) != 0x0800 || frame[L3] >> 4 != 4 {
            errs.push(format!("not an untagged IPv4 frame: {:02x?}", frame));
            return None;
        }
        let ihl = ((frame[L3] & 0x0f) as usize) * 4;
        let end = L3 + be16_at(frame, L3 + 2) as usize;
        if ihl < 20 || end < L3 + ihl || end > frame.len() {
            errs.push(format!(
                "IPv4 header length {ihl} or total length {end} wrong"
            ));
            return None;
        }
        let frag = be16_at(frame, L3 + 6);
        Some(Ipv4 {
            proto: frame[L3 + 9],
            l4: L3 + ihl,
            end,
            later_fragment: frag & 0x1fff != 0,
            fragment: frag & 0x3fff != 0,
        })
    }

    fn l4_ports(&self, frame: &[u8]) -> Option<(u16, u16)> {
        let tcp_udp = self.proto == 6 || self.proto == 17;
        (tcp_udp && !self.later_fragment && self.l4 + 4 <= self.end)
            .then(|| (be16_at(frame, self.l4), be16_at(frame, self.l4 + 2)))
    }

    /// (VNI, inner frame offset) when this is UDP carrying VXLAN with the I flag.
    fn vxlan(&self, frame: &[u8]) -> Option<(u32, usize)> {
        let v = self.l4 + 8;
        let whole = self.proto == 17 && !self.fragment && v + 8 + L3 <= self.end;
        (whole && frame[v] == 0x08).then(|| {
            let vni = u32::from_be_bytes([0, frame[v + 4], frame[v + 5], frame[v + 6]]);
            (vni, v + 8)
        })
    }

    fn checksums(&self, frame: &[u8], level: &str, errs: &mut Vec<String>) {
        if csum::checksum(&frame[L3..self.l4]) != 0 {
            errs.push(format!("{level}IPv4 header checksum wrong"));
        }
        if self.fragment {
            return;
        }
        let l4 = &frame[self.l4..self.end];
        let src = frame[L3 + 12..L3 + 16].try_into().expect("4 bytes");
        let dst = frame[L3 + 16..L3 + 20].try_into().expect("4 bytes");
        let pseudo = csum::ipv4_pseudo_sum(src, dst, self.proto, l4.len() as u16);
        let ok = match self.proto {
            6 => l4.len() >= 20 && csum::fold(csum::sum(l4, pseudo)) == 0xffff,
            17 => {
                l4.len() >= 8
                    && (be16_at(l4, 6) == 0 || csum::fold(csum::sum(l4, pseudo)) == 0xffff)
            }
            1 => l4.len() >= 8 && csum::checksum(l4) == 0,
            _ => true,
        };
        if !ok {
            errs.push(format!(
                "{level}L4 (protocol {}) checksum wrong",
                self.proto
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    //! Tier 1: the checker against packets built by etherparse, no root needed.
    use super::*;
    use crate::packets::{vxlan, Pkt, MAC_A, MAC_B};

    const A: [u8; 4] = [10, 0, 0, 1];
    const B: [u8; 4] = [10, 0, 0, 2];

    fn syn() -> Pkt {
        Pkt::tcp().eth(MAC_A, MAC_B).from(A, 1000).to(B, 80).syn()
    }

    #[test]
    fn fields_that_hold_pass() {
        let f = Fields::new()
            .eth(MAC_A, MAC_B)
            .addrs(A, B)
            .ports(1000, 80)
            .checksums();
        assert_eq!(f.check(&syn().build()), Vec::<String>::new());
        assert_eq!(
            f.clone().rst().check(&syn().rst().build()),
            Vec::<String>::new()
        );
        let udp = Pkt::udp().eth(MAC_A, MAC_B).from(A, 1000).to(B, 80);
        assert!(f.check(&udp.payload(b"x").build()).is_empty());
        assert!(f.check(&udp.no_checksum().build()).is_empty());
        let icmp = Pkt::port_unreachable().eth(MAC_A, MAC_B).src(A).dst(B);
        let icmp = icmp.quoting(&udp).build();
        assert!(Fields::new()
            .addrs(A, B)
            .checksums()
            .check(&icmp)
            .is_empty());
    }

    #[test]
    fn each_field_that_differs_is_named() {
        let f = Fields::new()
            .eth(MAC_B, MAC_A)
            .addrs(B, A)
            .ports(80, 1000)
            .rst();
        let errs = f.check(&syn().build());
        assert_eq!(errs.len(), 4, "{errs:?}");
        for (e, what) in errs.iter().zip(["eth", "addresses", "ports", "TCP RST"]) {
            assert!(e.starts_with(what), "{e}");
        }
    }

    #[test]
    fn a_wrong_checksum_is_found() {
        let mut p = syn().build();
        let n = p.len();
        p[n - 1] ^= 1; // the TCP header's last byte
        assert_eq!(
            Fields::new().checksums().check(&p),
            vec!["L4 (protocol 6) checksum wrong"]
        );
        let mut p = syn().build();
        p[L3 + 8] = 1; // TTL
        assert_eq!(
            Fields::new().checksums().check(&p),
            vec!["IPv4 header checksum wrong"]
        );
    }

    #[test]
    fn vxlan_fields_are_the_inner_frames() {
        let inner = syn().build();
        let outer = Pkt::udp()
            .eth(MAC_B, MAC_A)
            .from([192, 0, 2, 1], 50000)
            .to([192, 0, 2, 2], 4789)
            .payload(&vxlan(4097, &inner))
            .build();
        let f = Fields::new()
            .vxlan(4097)
            .eth(MAC_A, MAC_B)
            .addrs(A, B)
            .ports(1000, 80)
            .checksums();
        assert_eq!(f.check(&outer), Vec::<String>::new());
        assert_eq!(
            f.clone().vxlan(4096).check(&outer),
            vec!["VNI 4097, want 4096"]
        );
        assert_eq!(
            f.check(&inner),
            vec!["not VXLAN (UDP with the I flag and a whole inner frame)"]
        );
    }
}
