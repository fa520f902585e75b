//! [`Pkt`]: an IPv4 packet described field by field and built by etherparse.

use etherparse::{icmpv4::DestUnreachableHeader, Icmpv4Type, PacketBuilder};

use super::{ipv4_fragments, set_be16, write, IP_A, IP_B, L3, MAC_A, MAC_B};

/// An Ethernet + IPv4 packet described by its fields and built by etherparse, so that
/// its lengths and checksums are computed independently of the datapath:
/// `Pkt::tcp().eth(a, b).from(client, 40000).to(vip, 80).syn().seq(100)`. Every method
/// returns a changed copy, so a fixture's expected output is its input with the
/// rewritten fields changed: `syn.to(task, 80).eth(host_mac, task_mac)`.
#[derive(Clone, Debug)]
pub struct Pkt {
    eth: ([u8; 6], [u8; 6]),
    src: [u8; 4],
    dst: [u8; 4],
    l4: L4,
    payload: Vec<u8>,
}

#[derive(Clone, Debug)]
enum L4 {
    Tcp(Tcp),
    Udp {
        sport: u16,
        dport: u16,
        zero_csum: bool,
    },
    Icmp(Icmpv4Type),
}

#[derive(Clone, Debug)]
struct Tcp {
    sport: u16,
    dport: u16,
    seq: u32,
    ack: Option<u32>,
    window: u16,
    syn: bool,
    rst: bool,
}

/// The window of the TCP segments `Pkt` builds unless told otherwise (Linux's first
/// window on a 1500-byte link).
pub const TCP_WINDOW: u16 = 64240;

impl Pkt {
    fn new(l4: L4) -> Pkt {
        Pkt {
            eth: (MAC_A, MAC_B),
            src: IP_A,
            dst: IP_B,
            l4,
            payload: Vec::new(),
        }
    }

    /// A TCP segment with no flags, sequence number 0 and window [`TCP_WINDOW`].
    pub fn tcp() -> Pkt {
        Pkt::new(L4::Tcp(Tcp {
            sport: 0,
            dport: 0,
            seq: 0,
            ack: None,
            window: TCP_WINDOW,
            syn: false,
            rst: false,
        }))
    }

    /// A UDP datagram, its checksum computed.
    pub fn udp() -> Pkt {
        Pkt::new(L4::Udp {
            sport: 0,
            dport: 0,
            zero_csum: false,
        })
    }

    /// An ICMP message of `kind`; its payload is usually [`Pkt::quoting`] a packet.
    pub fn icmp(kind: Icmpv4Type) -> Pkt {
        Pkt::new(L4::Icmp(kind))
    }

    /// ICMP fragmentation needed, with the next hop's `mtu`.
    pub fn frag_needed(mtu: u16) -> Pkt {
        Pkt::icmp(Icmpv4Type::DestinationUnreachable(
            DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: mtu },
        ))
    }

    /// ICMP port unreachable.
    pub fn port_unreachable() -> Pkt {
        Pkt::icmp(Icmpv4Type::DestinationUnreachable(
            DestUnreachableHeader::Port,
        ))
    }

    fn with(&self, f: impl FnOnce(&mut Pkt)) -> Pkt {
        let mut p = self.clone();
        f(&mut p);
        p
    }

    fn with_tcp(&self, what: &str, f: impl FnOnce(&mut Tcp)) -> Pkt {
        self.with(|p| match &mut p.l4 {
            L4::Tcp(t) => f(t),
            other => panic!("{what} on a packet that is not TCP: {other:?}"),
        })
    }

    /// Ethernet source and destination (etherparse's order).
    pub fn eth(&self, src: [u8; 6], dst: [u8; 6]) -> Pkt {
        self.with(|p| p.eth = (src, dst))
    }

    /// IPv4 source address.
    pub fn src(&self, addr: [u8; 4]) -> Pkt {
        self.with(|p| p.src = addr)
    }

    /// IPv4 destination address.
    pub fn dst(&self, addr: [u8; 4]) -> Pkt {
        self.with(|p| p.dst = addr)
    }

    /// Source address and port.
    pub fn from(&self, addr: [u8; 4], port: u16) -> Pkt {
        self.src(addr).with(|p| *p.ports_mut("from").0 = port)
    }

    /// Destination address and port.
    pub fn to(&self, addr: [u8; 4], port: u16) -> Pkt {
        self.dst(addr).with(|p| *p.ports_mut("to").1 = port)
    }

    fn ports_mut(&mut self, what: &str) -> (&mut u16, &mut u16) {
        match &mut self.l4 {
            L4::Tcp(Tcp { sport, dport, .. }) | L4::Udp { sport, dport, .. } => (sport, dport),
            L4::Icmp(_) => panic!("{what}: ICMP has no ports (src/dst set the address)"),
        }
    }

    /// The L4 payload.
    pub fn payload(&self, data: &[u8]) -> Pkt {
        self.with(|p| p.payload = data.to_vec())
    }

    /// The payload of an ICMP error: the IPv4 header and first 8 bytes of L4 of `frame`
    /// (an Ethernet frame: bytes, or a `Pkt`).
    pub fn quoting(&self, frame: impl Into<Vec<u8>>) -> Pkt {
        let frame = frame.into();
        let ihl = ((frame[L3] & 0x0f) as usize) * 4;
        self.payload(&frame[L3..L3 + ihl + 8])
    }

    /// TCP: the SYN flag.
    pub fn syn(&self) -> Pkt {
        self.with_tcp("syn", |t| t.syn = true)
    }

    /// TCP: the RST flag.
    pub fn rst(&self) -> Pkt {
        self.with_tcp("rst", |t| t.rst = true)
    }

    /// TCP: the ACK flag and acknowledgment number.
    pub fn ack(&self, n: u32) -> Pkt {
        self.with_tcp("ack", |t| t.ack = Some(n))
    }

    /// TCP: the sequence number.
    pub fn seq(&self, n: u32) -> Pkt {
        self.with_tcp("seq", |t| t.seq = n)
    }

    /// TCP: the window.
    pub fn window(&self, w: u16) -> Pkt {
        self.with_tcp("window", |t| t.window = w)
    }

    /// UDP: no checksum (zero), as a sender may choose over IPv4.
    pub fn no_checksum(&self) -> Pkt {
        self.with(|p| match &mut p.l4 {
            L4::Udp { zero_csum, .. } => *zero_csum = true,
            other => panic!("no_checksum on a packet that is not UDP: {other:?}"),
        })
    }

    /// The frame's bytes.
    pub fn build(&self) -> Vec<u8> {
        let ip = PacketBuilder::ethernet2(self.eth.0, self.eth.1).ipv4(self.src, self.dst, 64);
        match &self.l4 {
            L4::Tcp(t) => {
                let mut b = ip.tcp(t.sport, t.dport, t.seq, t.window);
                if t.syn {
                    b = b.syn();
                }
                if t.rst {
                    b = b.rst();
                }
                if let Some(n) = t.ack {
                    b = b.ack(n);
                }
                write(b, &self.payload)
            }
            L4::Udp {
                sport,
                dport,
                zero_csum,
            } => {
                let mut v = write(ip.udp(*sport, *dport), &self.payload);
                if *zero_csum {
                    let ihl = ((v[L3] & 0x0f) as usize) * 4;
                    set_be16(&mut v, L3 + ihl + 6, 0);
                }
                v
            }
            L4::Icmp(kind) => write(ip.icmpv4(kind.clone()), &self.payload),
        }
    }

    /// The frame cut into IPv4 fragments of at most `mtu` IP bytes, IP id `id`, as
    /// [`ipv4_fragments`] does.
    pub fn fragments(&self, id: u16, mtu: usize) -> Vec<Vec<u8>> {
        ipv4_fragments(&self.build(), id, mtu)
    }
}

impl From<Pkt> for Vec<u8> {
    fn from(p: Pkt) -> Vec<u8> {
        p.build()
    }
}

impl From<&Pkt> for Vec<u8> {
    fn from(p: &Pkt) -> Vec<u8> {
        p.build()
    }
}
