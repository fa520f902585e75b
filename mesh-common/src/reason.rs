//! Verdicts, drop reasons and observations: the indices of the per-CPU counters.
//!
//! Every packet a program sees is counted under exactly one *verdict* (a `pass_*` class
//! or a `drop_*` reason) and under zero or more *observations* (things worth knowing that
//! do not decide its fate, such as IPv4 options). The numbering is part of the pinned
//! layout: append new reasons, never renumber.

/// What a reason means for the packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Passed on (to the stack, or later to a rewrite).
    Pass,
    /// Rewritten by the mesh and redirected to where it belongs (a task, a client).
    Forward,
    /// Answered by the mesh (TCP RST, ICMP unreachable) instead of being black-holed.
    Reply,
    /// Dropped by the mesh.
    Drop,
    /// Counted in addition to the verdict.
    Observation,
}

macro_rules! reasons {
    ($( $(#[$doc:meta])* $variant:ident = $val:literal, $name:literal, $kind:ident; )+) => {
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub enum Reason {
            $( $(#[$doc])* $variant = $val, )+
        }

        impl Reason {
            /// Every reason, in index order.
            pub const ALL: &'static [Reason] = &[$(Reason::$variant),+];

            /// Stable snake_case name used by meshctl, metrics and JSON.
            pub const fn name(self) -> &'static str {
                match self { $(Reason::$variant => $name,)+ }
            }

            pub const fn kind(self) -> Kind {
                match self { $(Reason::$variant => Kind::$kind,)+ }
            }

            pub const fn from_u32(v: u32) -> Option<Reason> {
                match v { $($val => Some(Reason::$variant),)+ _ => None }
            }

            pub fn from_name(name: &str) -> Option<Reason> {
                match name { $($name => Some(Reason::$variant),)+ _ => None }
            }
        }
    };
}

reasons! {
    /// Not IPv4/IPv6 (ARP, LLDP, ...): not ours.
    PassNonIp = 0, "pass_non_ip", Pass;
    PassTcp = 1, "pass_tcp", Pass;
    PassUdp = 2, "pass_udp", Pass;
    PassIcmp = 3, "pass_icmp", Pass;
    PassIcmpv6 = 4, "pass_icmpv6", Pass;
    /// Well-formed VXLAN on the data-path port.
    PassVxlan = 5, "pass_vxlan", Pass;
    /// A non-first IPv4 fragment of another protocol than TCP/UDP: no L4 header, left
    /// to the stack's reassembly.
    PassFragment = 6, "pass_fragment", Pass;
    /// IPv6 with extension headers: passed through untouched.
    PassIpv6Ext = 7, "pass_ipv6_ext", Pass;
    /// IP with another L4 protocol (GRE, SCTP, ...).
    PassOtherL4 = 8, "pass_other_l4", Pass;
    /// More VLAN tags than the parser follows: not ours, passed untouched.
    PassVlanTooDeep = 9, "pass_vlan_too_deep", Pass;

    /// DNATed to a backend and redirected into its task's veth.
    FwdToTask = 10, "fwd_to_task", Forward;
    /// A reply reverse-NATed (source back to the frontend) and redirected to the client.
    FwdReplyToClient = 11, "fwd_reply_to_client", Forward;
    /// Encapsulated in VXLAN toward the node that runs the backend (or the client's node).
    FwdToTunnel = 58, "fwd_to_tunnel", Forward;
    /// An ICMP error about a NATed flow, translated and redirected.
    FwdIcmpError = 12, "fwd_icmp_error", Forward;
    /// New TCP flow to a service with no active backend: answered with RST.
    ReplyRstNoBackend = 13, "reply_rst_no_backend", Reply;
    /// TCP packet of a flow whose backend is gone: answered with RST.
    ReplyRstBackendGone = 14, "reply_rst_backend_gone", Reply;
    /// UDP to a service with no active backend, or whose backend is gone: answered
    /// with ICMP port unreachable.
    ReplyIcmpUnreachable = 15, "reply_icmp_unreachable", Reply;

    DropTruncatedEth = 16, "drop_truncated_eth", Drop;
    DropTruncatedVlan = 17, "drop_truncated_vlan", Drop;
    DropTruncatedIpv4 = 18, "drop_truncated_ipv4", Drop;
    DropIpv4BadVersion = 19, "drop_ipv4_bad_version", Drop;
    /// IHL < 5.
    DropIpv4BadIhl = 20, "drop_ipv4_bad_ihl", Drop;
    /// Total length shorter than the header or longer than the frame.
    DropIpv4BadTotalLen = 21, "drop_ipv4_bad_total_len", Drop;
    DropTruncatedIpv6 = 22, "drop_truncated_ipv6", Drop;
    DropIpv6BadVersion = 23, "drop_ipv6_bad_version", Drop;
    /// Payload length longer than the frame.
    DropIpv6BadPayloadLen = 24, "drop_ipv6_bad_payload_len", Drop;
    DropTruncatedTcp = 25, "drop_truncated_tcp", Drop;
    /// TCP data offset < 5 or beyond the IP payload.
    DropTcpBadDataOffset = 26, "drop_tcp_bad_data_offset", Drop;
    DropTruncatedUdp = 27, "drop_truncated_udp", Drop;
    /// UDP length < 8 (e.g. zero) or beyond the IP payload.
    DropUdpBadLength = 28, "drop_udp_bad_length", Drop;
    DropTruncatedIcmp = 29, "drop_truncated_icmp", Drop;
    /// UDP to the data-path port too short for a VXLAN header and an inner Ethernet header.
    DropVxlanTruncated = 30, "drop_vxlan_truncated", Drop;
    /// VXLAN flags other than exactly I, or reserved bits set (as Linux's vxlan driver).
    DropVxlanBadFlags = 31, "drop_vxlan_bad_flags", Drop;
    /// The chosen backend runs on another node (the overlay is not attached).
    DropBackendNotLocal = 32, "drop_backend_not_local", Drop;
    /// The backend is local but its endpoint (veth) is unknown.
    DropNoEndpoint = 33, "drop_no_endpoint", Drop;
    /// A rewrite helper failed (packet not writable, checksum helper error).
    DropRewriteFailed = 34, "drop_rewrite_failed", Drop;
    /// Connection tracking could not store the flow.
    DropCtFull = 35, "drop_ct_full", Drop;
    /// A Maglev slot pointed at no backend (table being rewritten or corrupt).
    DropNoBackendSlot = 36, "drop_no_backend_slot", Drop;
    /// A reply could not be built (IP options or a frame too short to answer), or the
    /// packet is a fragment after the first, which cannot be answered (its flow refused,
    /// or too big for the tunnel: the first fragment carries the answer).
    DropCannotReply = 37, "drop_cannot_reply", Drop;
    /// VXLAN from an address that is not a known swarm node.
    DropVxlanUnknownPeer = 38, "drop_vxlan_unknown_peer", Drop;
    /// VXLAN for a VNI this node is not on.
    DropVxlanUnknownVni = 39, "drop_vxlan_unknown_vni", Drop;
    /// Decapsulated frame for an address that is not a task on this node (nor a flow we
    /// track).
    DropVxlanNoTarget = 40, "drop_vxlan_no_target", Drop;
    /// The inner frame of a VXLAN packet is malformed, not IPv4 TCP/UDP, an ICMP error
    /// about no flow of ours, or a fragment after the first that follows no first one.
    DropVxlanBadInner = 41, "drop_vxlan_bad_inner", Drop;
    /// Encapsulation or decapsulation failed (no room, no underlay configured).
    DropTunnelFailed = 42, "drop_tunnel_failed", Drop;
    /// An ARP request for a service VIP from a task on the overlay, answered.
    ReplyArpVip = 43, "reply_arp_vip", Reply;
    /// A task's packet to a VIP on the overlay, rewritten toward the chosen task.
    FwdVipToTask = 44, "fwd_vip_to_task", Forward;
    /// A reply to a VIP flow on the overlay, its source made the VIP again.
    FwdVipReply = 45, "fwd_vip_reply", Forward;
    /// VXLAN of a network Docker's own vxlan device carries (a user overlay): left to it.
    PassVxlanDocker = 46, "pass_vxlan_docker", Pass;
    /// A non-first TCP/UDP fragment that follows no translated first fragment (it came
    /// before its first one, its first one was not ours, or its record was evicted):
    /// passed untouched, to the stack's reassembly.
    PassFragmentUnmatched = 47, "pass_fragment_unmatched", Pass;

    /// One or two 802.1Q/802.1ad tags were followed.
    ObsVlan = 48, "obs_vlan", Observation;
    /// IPv4 header with options (IHL > 5).
    ObsIpv4Options = 49, "obs_ipv4_options", Observation;
    /// First fragment of a fragmented IPv4 datagram (L4 header present).
    ObsFragmentFirst = 50, "obs_fragment_first", Observation;
    /// A non-first IPv4 fragment.
    ObsFragmentNonFirst = 51, "obs_fragment_non_first", Observation;
    /// IPv6 packet carrying extension headers.
    ObsIpv6ExtHeaders = 52, "obs_ipv6_ext_headers", Observation;
    /// A new flow was given a backend.
    ObsCtNew = 53, "obs_ct_new", Observation;
    /// A packet of a tracked flow.
    ObsCtHit = 54, "obs_ct_hit", Observation;
    /// A tracked flow had expired and was given a backend afresh.
    ObsCtExpired = 55, "obs_ct_expired", Observation;
    /// A SYN reused the tuple of a closed flow: new backend choice.
    ObsCtReopened = 56, "obs_ct_reopened", Observation;
    /// A task reached its own service and landed on itself.
    ObsHairpin = 57, "obs_hairpin", Observation;
    /// A VXLAN packet from a known peer was decapsulated.
    ObsDecap = 59, "obs_decap", Observation;
    /// A flow to a backend on another node was SNATed: to this node's overlay address
    /// when the backend's node is a stock Docker node, to its underlay address when the
    /// client's address means nothing there (a task calling from its docker_gwbridge
    /// address, a container's bridge address: every node has its own 172.x of the same
    /// name).
    ObsStockSnat = 60, "obs_stock_snat", Observation;
    /// A packet too big for the underlay once encapsulated: answered with ICMP
    /// fragmentation needed (the overlay MTU), so the sender's path MTU discovery works.
    ReplyIcmpFragNeeded = 61, "reply_icmp_frag_needed", Reply;
    /// A client retransmitted the SYN of a flow its backend never answered: the flow
    /// was given a backend afresh (another one, where the service has several).
    ObsSynRetried = 62, "obs_syn_retried", Observation;
    /// A backend answered a new connection's SYN with RST (a task Docker is already
    /// deactivating refuses before any agent can know) while the service has others:
    /// held back, once per connection, so that the client's SYN retransmit is given
    /// another backend.
    DropSynRefused = 63, "drop_syn_refused", Drop;
}

/// Size of the reason index space per hook (room to append reasons without a relayout).
pub const REASON_SLOTS: u32 = 64;

const _: () = {
    let mut i = 0;
    while i < Reason::ALL.len() {
        assert!((Reason::ALL[i] as u32) < REASON_SLOTS);
        i += 1;
    }
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbering_round_trips_and_names_are_unique() {
        for r in Reason::ALL {
            assert_eq!(Reason::from_u32(*r as u32), Some(*r));
            assert_eq!(Reason::from_name(r.name()), Some(*r));
            let prefix = match r.kind() {
                Kind::Pass => "pass_",
                Kind::Forward => "fwd_",
                Kind::Reply => "reply_",
                Kind::Drop => "drop_",
                Kind::Observation => "obs_",
            };
            assert!(
                r.name().starts_with(prefix),
                "{} is not {:?}",
                r.name(),
                r.kind()
            );
        }
        let mut names: Vec<_> = Reason::ALL.iter().map(|r| r.name()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), Reason::ALL.len());
        // The first number past the space is none.
        assert_eq!(Reason::from_u32(REASON_SLOTS), None);
    }
}
