//! Connection tracking: the entry layout and the pure state machine the kernel runs.
//!
//! A load-balanced flow has two entries in an LRU hash: the *forward* one, keyed by the
//! tuple as the client sent it (client -> frontend), holding the backend and the DNAT
//! target; and the *reverse* one, keyed by the reply's tuple (task -> client), holding
//! what to restore (the frontend) and where the client is (interface and MACs).

use crate::proto::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtKey {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}
crate::assert_size!(CtKey, 16);

impl CtKey {
    pub const fn new(saddr: u32, daddr: u32, sport: u16, dport: u16, proto: u8) -> Self {
        CtKey {
            saddr,
            daddr,
            sport,
            dport,
            proto,
            _pad: [0; 3],
        }
    }
}

/// Entry flags.
pub const CT_REVERSE: u8 = 1 << 0;
/// The client was SNATed (to the hairpin address when a task reaches itself; to this
/// node's overlay address when the backend is on a stock Docker node).
pub const CT_HAIRPIN: u8 = 1 << 1;
/// Reverse entry on a backend's node for a flow that arrived through the tunnel: replies
/// go back through the tunnel to `peer` on `vni`.
pub const CT_TUNNEL: u8 = 1 << 2;
/// Forward entry of a connection attempt already given a second backend (after its
/// first refused or never answered): a refusal is not held back again.
pub const CT_RETRIED: u8 = 1 << 3;
/// A task's flow to a VIP on Docker's overlay (the overlay hooks' own entries: the
/// bridge and Docker's vxlan carry the packets, the mesh only rewrites addresses).
pub const CT_OVERLAY: u8 = 1 << 4;
/// Forward entry of an overlay VIP flow whose task is on another subnet (another bridge
/// in the network's namespace) than the VIP its caller took for on its own: its packets
/// are handed to that bridge, which resolves the task's MAC.
pub const CT_ROUTED: u8 = 1 << 5;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtEntry {
    /// `bpf_ktime_get_ns` of the last packet (monotonic, boot-relative).
    pub last_seen_ns: u64,
    pub created_ns: u64,
    pub backend_id: u32,
    pub svc_id: u32,
    /// Forward: the DNAT target (delivery address, backend port).
    /// Reverse: the frontend to restore as the reply's source.
    pub nat_addr: u32,
    pub nat_port: u16,
    /// [`CtState`].
    pub state: u8,
    /// `CT_*`.
    pub flags: u8,
    /// Hairpin only. Forward: the address the client is SNATed to. Reverse: the client's
    /// real address, restored as the reply's destination.
    pub hairpin_addr: u32,
    /// Reverse: interface the client is behind (replies are redirected out of it).
    pub ifindex: u32,
    /// Idle timeout once established, seconds (from the service at creation).
    pub idle_s: u32,
    /// Reverse: MACs for the reply (destination, source) toward the client.
    pub mac_dst: [u8; 6],
    pub mac_src: [u8; 6],
    /// `CT_TUNNEL`: the node the flow came from (outer source), and its VNI.
    pub peer: u32,
    pub vni: u32,
    pub _pad: u32,
}
crate::assert_size!(CtEntry, 72);

#[cfg(feature = "user")]
mod pod {
    unsafe impl aya::Pod for super::CtKey {}
    unsafe impl aya::Pod for super::CtEntry {}
    unsafe impl aya::Pod for super::FragKey {}
    unsafe impl aya::Pod for super::FragPorts {}
}

/// A datagram, as each of its fragments shows it at one hook (before translation).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragKey {
    pub saddr: u32,
    pub daddr: u32,
    /// IPv4 identification, host order.
    pub id: u16,
    pub proto: u8,
    pub _pad: u8,
}
crate::assert_size!(FragKey, 12);

impl FragKey {
    pub const fn new(saddr: u32, daddr: u32, id: u16, proto: u8) -> Self {
        FragKey {
            saddr,
            daddr,
            id,
            proto,
            _pad: 0,
        }
    }
}

/// Its first fragment's ports (host order, as `parse::Parsed` holds them).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragPorts {
    pub sport: u16,
    pub dport: u16,
}
crate::assert_size!(FragPorts, 4);

#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CtState {
    /// A SYN seen, nothing back yet.
    SynSent = 1,
    Established = 2,
    /// A FIN seen in this entry's direction: the flow is closing.
    FinSeen = 3,
    /// RST seen.
    Closed = 4,
    Udp = 5,
}

impl CtState {
    pub const fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::SynSent),
            2 => Some(Self::Established),
            3 => Some(Self::FinSeen),
            4 => Some(Self::Closed),
            5 => Some(Self::Udp),
            _ => None,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Self::SynSent => "syn_sent",
            Self::Established => "established",
            Self::FinSeen => "fin_seen",
            Self::Closed => "closed",
            Self::Udp => "udp",
        }
    }
}

/// Seconds a half-open flow may stay idle (as Linux's nf_conntrack SYN_SENT, 120 s,
/// halved: the client retries well within it).
pub const SYN_TIMEOUT_S: u32 = 60;
/// Closing flows (FIN seen) live this long after their last packet.
pub const FIN_TIMEOUT_S: u32 = 30;
/// Reset flows: long enough for a retransmitted RST to be translated.
pub const CLOSED_TIMEOUT_S: u32 = 10;

/// The state of a new entry for a first packet with `tcp_flags` (`proto` TCP or UDP).
#[inline(always)]
pub const fn initial(proto: u8, tcp_flags: u8) -> CtState {
    if proto != crate::proto::IPPROTO_TCP {
        return CtState::Udp;
    }
    if tcp_flags & TCP_RST != 0 {
        CtState::Closed
    } else if tcp_flags & TCP_SYN != 0 && tcp_flags & TCP_ACK == 0 {
        CtState::SynSent
    } else {
        // Mid-flow packet without an entry (entry evicted, agent restarted with a
        // flushed table): Maglev picked the same backend, carry on as established.
        CtState::Established
    }
}

/// The state after a packet with `tcp_flags` in this entry's direction.
#[inline(always)]
pub const fn advance(state: CtState, tcp_flags: u8) -> CtState {
    if matches!(state, CtState::Udp) {
        return CtState::Udp;
    }
    if tcp_flags & TCP_RST != 0 {
        return CtState::Closed;
    }
    if tcp_flags & TCP_FIN != 0 {
        return CtState::FinSeen;
    }
    match state {
        CtState::SynSent if tcp_flags & TCP_ACK != 0 => CtState::Established,
        s => s,
    }
}

/// Idle timeout of an entry in `state`, seconds.
#[inline(always)]
pub const fn timeout_s(state: CtState, idle_s: u32) -> u32 {
    match state {
        CtState::SynSent => SYN_TIMEOUT_S,
        CtState::Established | CtState::Udp => idle_s,
        CtState::FinSeen => FIN_TIMEOUT_S,
        CtState::Closed => CLOSED_TIMEOUT_S,
    }
}

/// Whether an entry last seen at `last_seen_ns` has expired at `now_ns`.
#[inline(always)]
pub const fn expired(state: CtState, idle_s: u32, last_seen_ns: u64, now_ns: u64) -> bool {
    now_ns.saturating_sub(last_seen_ns) > timeout_s(state, idle_s) as u64 * 1_000_000_000
}

/// A retransmitted SYN this long after the first means the backend chosen never
/// answered (Linux retransmits a SYN after 1 s): the flow is worth another backend.
pub const SYN_RETRY_NS: u64 = 700_000_000;

/// A SYN, again, on a flow still in its handshake, long enough after the first that the
/// first was lost or ignored (a backend that is starting, or shutting down).
#[inline(always)]
pub const fn syn_retried(state: CtState, tcp_flags: u8, created_ns: u64, now_ns: u64) -> bool {
    tcp_flags & TCP_SYN != 0
        && tcp_flags & TCP_ACK == 0
        && matches!(state, CtState::SynSent)
        && now_ns.saturating_sub(created_ns) >= SYN_RETRY_NS
}

/// A backend's RST (any flags) while its reply entry has seen nothing but the SYN it
/// was sent: the backend refused the connection.
#[inline(always)]
pub const fn refused(state: CtState, tcp_flags: u8) -> bool {
    tcp_flags & TCP_RST != 0 && matches!(state, CtState::SynSent)
}

/// A SYN on an entry of a closed or closing flow starts a new flow (the client reused
/// its port): pick a backend afresh.
#[inline(always)]
pub const fn reopens(state: CtState, tcp_flags: u8) -> bool {
    tcp_flags & TCP_SYN != 0
        && tcp_flags & TCP_ACK == 0
        && matches!(state, CtState::FinSeen | CtState::Closed)
}

/// A SYN-ACK on a reply entry whose flow is past its handshake: the tuple was reused by a
/// connection that did not go through the load balancer.
#[inline(always)]
pub const fn stale_reply(state: CtState, tcp_flags: u8) -> bool {
    tcp_flags & TCP_SYN != 0 && tcp_flags & TCP_ACK != 0 && !matches!(state, CtState::SynSent)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{IPPROTO_TCP, IPPROTO_UDP, TCP_PSH};

    const S: u64 = 1_000_000_000;

    #[test]
    fn tcp_lifecycle() {
        let mut s = initial(IPPROTO_TCP, TCP_SYN);
        assert_eq!(s, CtState::SynSent);
        assert_eq!(timeout_s(s, 8000), SYN_TIMEOUT_S);
        s = advance(s, TCP_ACK);
        assert_eq!(s, CtState::Established);
        s = advance(s, TCP_ACK | TCP_PSH);
        assert_eq!(s, CtState::Established);
        assert_eq!(timeout_s(s, 8000), 8000);
        s = advance(s, TCP_FIN | TCP_ACK);
        assert_eq!(s, CtState::FinSeen);
        assert_eq!(timeout_s(s, 8000), FIN_TIMEOUT_S);
        // Closing stays closing on ACKs.
        assert_eq!(advance(s, TCP_ACK), CtState::FinSeen);
        assert_eq!(advance(s, TCP_RST), CtState::Closed);
    }

    #[test]
    fn rst_closes_from_any_state() {
        for s in [CtState::SynSent, CtState::Established, CtState::FinSeen] {
            assert_eq!(advance(s, TCP_RST | TCP_ACK), CtState::Closed);
        }
        assert_eq!(initial(IPPROTO_TCP, TCP_RST), CtState::Closed);
    }

    #[test]
    fn midflow_packet_without_entry_is_established() {
        assert_eq!(initial(IPPROTO_TCP, TCP_ACK), CtState::Established);
        assert_eq!(
            initial(IPPROTO_TCP, TCP_ACK | TCP_PSH),
            CtState::Established
        );
        assert_eq!(
            initial(IPPROTO_TCP, TCP_SYN | TCP_ACK),
            CtState::Established
        );
    }

    #[test]
    fn udp_is_udp() {
        let s = initial(IPPROTO_UDP, 0);
        assert_eq!(s, CtState::Udp);
        assert_eq!(advance(s, TCP_FIN), CtState::Udp);
        assert_eq!(timeout_s(s, 300), 300);
    }

    #[test]
    fn expiry_uses_the_state_timeout() {
        let t0 = 1000 * S;
        assert!(!expired(CtState::Established, 8000, t0, t0 + 7999 * S));
        assert!(expired(CtState::Established, 8000, t0, t0 + 8001 * S));
        // Far beyond IPVS's 900 s.
        assert!(!expired(CtState::Established, 8000, t0, t0 + 901 * S));
        assert!(expired(CtState::FinSeen, 8000, t0, t0 + 31 * S));
        assert!(expired(CtState::Closed, 8000, t0, t0 + 11 * S));
        assert!(!expired(CtState::SynSent, 8000, t0, t0 + 59 * S));
        // A clock that reads earlier than last_seen (another CPU) is not expiry.
        assert!(!expired(CtState::Closed, 8000, t0, t0 - S));
    }

    #[test]
    fn an_rst_before_any_answer_is_a_refusal() {
        assert!(refused(CtState::SynSent, TCP_RST | TCP_ACK));
        assert!(!refused(CtState::Established, TCP_RST));
        assert!(!refused(CtState::SynSent, TCP_ACK));
    }

    #[test]
    fn a_late_syn_in_the_handshake_is_a_retry() {
        let t0 = 5_000_000_000;
        assert!(syn_retried(
            CtState::SynSent,
            TCP_SYN,
            t0,
            t0 + 1_000_000_000
        ));
        assert!(
            !syn_retried(CtState::SynSent, TCP_SYN, t0, t0 + 100_000_000),
            "a duplicate, not a retry"
        );
        assert!(!syn_retried(
            CtState::Established,
            TCP_SYN,
            t0,
            t0 + 1_000_000_000
        ));
        assert!(!syn_retried(
            CtState::SynSent,
            TCP_SYN | TCP_ACK,
            t0,
            t0 + 1_000_000_000
        ));
    }

    #[test]
    fn syn_ack_on_a_finished_reply_entry_is_stale() {
        assert!(stale_reply(CtState::FinSeen, TCP_SYN | TCP_ACK));
        assert!(stale_reply(CtState::Established, TCP_SYN | TCP_ACK));
        assert!(
            !stale_reply(CtState::SynSent, TCP_SYN | TCP_ACK),
            "the legit handshake"
        );
        assert!(!stale_reply(CtState::FinSeen, TCP_ACK));
    }

    #[test]
    fn syn_reopens_only_closed_or_closing_flows() {
        assert!(reopens(CtState::FinSeen, TCP_SYN));
        assert!(reopens(CtState::Closed, TCP_SYN));
        assert!(!reopens(CtState::Established, TCP_SYN));
        assert!(!reopens(CtState::Closed, TCP_SYN | TCP_ACK));
    }

    /// Issue 19's property test of the state machine: seeded random flag sequences from
    /// every first packet. UDP stays UDP; an RST always closes; a FIN always closes
    /// (unless an RST comes with it); a closing or closed flow never comes back through
    /// `advance` (only a new SYN reopens it, as a new flow); nothing but an ACK leaves
    /// the handshake forward; a closing or closed flow never outlives an open one's
    /// timeouts; expiry is monotone in time; retries and refusals only in the handshake.
    #[test]
    fn random_flag_sequences_keep_the_state_machine_rules() {
        let mut seed = 0x6d65_7368_0019_u64;
        let mut next = move || {
            seed ^= seed >> 12;
            seed ^= seed << 25;
            seed ^= seed >> 27;
            seed.wrapping_mul(0x2545_f491_4f6c_dd1d)
        };
        let rank = |s: CtState| match s {
            CtState::SynSent | CtState::Established | CtState::Udp => 0,
            CtState::FinSeen => 1,
            CtState::Closed => 2,
        };
        for _ in 0..20_000 {
            let proto = if next() % 4 == 0 {
                IPPROTO_UDP
            } else {
                IPPROTO_TCP
            };
            let flags = (next() & 0x3f) as u8;
            let mut s = initial(proto, flags);
            let idle = 1 + (next() % 100_000) as u32;
            for _ in 0..(next() % 12) {
                let f = (next() & 0x3f) as u8;
                let t = advance(s, f);
                if s == CtState::Udp {
                    assert_eq!(t, CtState::Udp);
                } else if f & TCP_RST != 0 {
                    assert_eq!(t, CtState::Closed, "{s:?} + {f:#x}");
                } else if f & TCP_FIN != 0 {
                    assert_eq!(t, CtState::FinSeen, "{s:?} + {f:#x}");
                } else {
                    assert!(rank(t) >= rank(s), "{s:?} + {f:#x} -> {t:?}: came back");
                    if s == CtState::SynSent && t != s {
                        assert!(f & TCP_ACK != 0 && t == CtState::Established, "{f:#x}");
                    }
                }
                assert!(!refused(t, f) || t == CtState::SynSent);
                assert!(!syn_retried(t, f, 0, u64::MAX) || t == CtState::SynSent);
                assert!(!reopens(t, f) || rank(t) > 0);
                if rank(t) > 0 {
                    assert!(timeout_s(t, idle) <= FIN_TIMEOUT_S.max(CLOSED_TIMEOUT_S));
                }
                let (a, b) = (next() % (200 * S), next() % (200 * S));
                let (early, late) = (a.min(b), a.max(b));
                assert!(!expired(t, idle, 0, early) || expired(t, idle, 0, late));
                s = t;
            }
        }
    }
}
