//! The VXLAN encapsulation the datapath prepends (RFC 7348), built as Linux's vxlan
//! device builds it for Docker's overlay: outer IPv4 without DF, TTL 64, UDP checksum 0,
//! source port from the inner flow's hash in the ephemeral range, flags = I, the VNI;
//! then the inner Ethernet header (Docker's MACs: 02:42 + IPv4 address).

use crate::{csum, lb::docker_mac};

/// Outer Ethernet + IPv4 + UDP + VXLAN + inner Ethernet.
pub const ENCAP_LEN: usize = 14 + 20 + 8 + 8 + 14;
/// What encapsulation adds to an IPv4 packet (its own Ethernet header is reused as the
/// outer one).
pub const OVERHEAD: usize = ENCAP_LEN - 14;

/// Linux's default ephemeral range (net.ipv4.ip_local_port_range), which its vxlan
/// device draws source ports from.
pub const SPORT_MIN: u16 = 32768;
pub const SPORT_MAX: u16 = 60999;

/// Outer UDP source port for an inner flow hash.
#[inline(always)]
pub const fn source_port(hash: u32) -> u16 {
    SPORT_MIN + (hash % (SPORT_MAX - SPORT_MIN + 1) as u32) as u16
}

/// Writes the encapsulation for an inner IPv4 packet of `inner_len` bytes from
/// `inner_src` to `inner_dst` (wire order) into `out`. The outer MACs are left zero:
/// the kernel's neighbour table fills them when the packet is sent.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn header(
    out: &mut [u8; ENCAP_LEN],
    outer_src: u32,
    outer_dst: u32,
    sport: u16,
    dport: u16,
    vni: u32,
    inner_src: u32,
    inner_dst: u32,
    inner_len: u16,
    ip_id: u16,
) {
    out.fill(0);
    out[12] = 0x08;
    let ip = 14;
    let total = (20 + 8 + 8 + 14) as u16 + inner_len;
    out[ip] = 0x45;
    out[ip + 2..ip + 4].copy_from_slice(&total.to_be_bytes());
    out[ip + 4..ip + 6].copy_from_slice(&ip_id.to_be_bytes());
    out[ip + 8] = 64;
    out[ip + 9] = crate::proto::IPPROTO_UDP;
    out[ip + 12..ip + 16].copy_from_slice(&outer_src.to_ne_bytes());
    out[ip + 16..ip + 20].copy_from_slice(&outer_dst.to_ne_bytes());
    let c = !csum::fold(csum::sum(&out[ip..ip + 20], 0));
    out[ip + 10..ip + 12].copy_from_slice(&c.to_be_bytes());
    let udp = ip + 20;
    out[udp..udp + 2].copy_from_slice(&sport.to_be_bytes());
    out[udp + 2..udp + 4].copy_from_slice(&dport.to_be_bytes());
    out[udp + 4..udp + 6].copy_from_slice(&(total - 20).to_be_bytes());
    let vx = udp + 8;
    out[vx] = crate::proto::VXLAN_FLAG_I;
    out[vx + 4..vx + 7].copy_from_slice(&vni.to_be_bytes()[1..4]);
    let inner = vx + 8;
    out[inner..inner + 6].copy_from_slice(&docker_mac(inner_dst));
    out[inner + 6..inner + 12].copy_from_slice(&docker_mac(inner_src));
    out[inner + 12] = 0x08;
}

/// The outer UDP checksum by local checksum offload (LCO, as Linux's `lco_csum`):
/// computed from headers alone. Once the inner IPv4 and L4 checksums hold, the inner IPv4
/// header sums to 0xffff and the inner L4 segment to the complement of its pseudo-header,
/// so the outer checksum needs no pass over the payload. `hdr` is the encapsulation
/// (with a zero UDP checksum), `inner_pseudo` the inner L4 pseudo-header sum.
#[inline(always)]
pub fn lco_checksum(hdr: &[u8; ENCAP_LEN], inner_pseudo: u64) -> u16 {
    // Word by word with indices: no iterator state, so the kernel side keeps it in
    // registers (its stack is 512 bytes for the whole call chain).
    let words = |from: usize, to: usize| {
        let mut s = 0u64;
        let mut i = from;
        while i < to {
            s += ((hdr[i] as u64) << 8) | hdr[i + 1] as u64;
            i += 2;
        }
        s
    };
    let udp_len = u16::from_be_bytes([hdr[38], hdr[39]]);
    let mut s = words(26, 34) + crate::proto::IPPROTO_UDP as u64 + udp_len as u64;
    s += words(34, ENCAP_LEN);
    s += 0xffff; // the inner IPv4 header, checksum included
    s += !csum::fold(inner_pseudo) as u64; // the inner L4 segment, checksum included
    match !csum::fold(s) {
        0 => 0xffff,
        c => c,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_parses_back_and_verifies() {
        let mut h = [0u8; ENCAP_LEN];
        let src = u32::from_ne_bytes([10, 230, 0, 1]);
        let dst = u32::from_ne_bytes([10, 230, 0, 2]);
        let isrc = u32::from_ne_bytes([10, 0, 0, 2]);
        let idst = u32::from_ne_bytes([10, 0, 0, 12]);
        header(&mut h, src, dst, 40000, 4789, 4096, isrc, idst, 60, 7);
        let mut frame = h.to_vec();
        frame.extend_from_slice(&[0x45; 60]);
        let p = crate::parse::parse(&crate::parse::Bytes(&frame), 4789).unwrap();
        assert!(p.vxlan);
        assert_eq!(p.vni, 4096);
        assert_eq!((p.sport, p.dport), (40000, 4789));
        assert_eq!(p.l3_end as usize, frame.len());
        assert_eq!(
            csum::fold(csum::sum(&h[14..34], 0)),
            0xffff,
            "outer IP checksum"
        );
        assert_eq!(
            &h[40..42],
            &[0, 0],
            "UDP checksum 0, as Linux's vxlan by default"
        );
        assert_eq!(h[20] & 0x40, 0, "no DF, as Linux's vxlan by default");
        assert_eq!(&h[50..56], &[0x02, 0x42, 10, 0, 0, 12]);
        assert_eq!(&h[56..62], &[0x02, 0x42, 10, 0, 0, 2]);
    }

    /// LCO gives what a full pass over the whole datagram gives.
    #[test]
    fn lco_equals_the_full_checksum() {
        let inner = {
            let mut v = Vec::new();
            etherparse::PacketBuilder::ipv4([10, 230, 0, 100], [10, 0, 0, 12], 64)
                .tcp(40000, 80, 7, 1000)
                .ack(9)
                .write(&mut v, b"some payload of odd length")
                .unwrap();
            v
        };
        let mut h = [0u8; ENCAP_LEN];
        let src = u32::from_ne_bytes([10, 230, 0, 1]);
        let dst = u32::from_ne_bytes([10, 230, 0, 2]);
        header(
            &mut h,
            src,
            dst,
            40001,
            4789,
            4096,
            0,
            0,
            inner.len() as u16,
            1,
        );
        let l4_len = (inner.len() - 20) as u64;
        let pseudo = csum::sum(&inner[12..20], 0) + 6 + l4_len;
        let lco = lco_checksum(&h, pseudo);
        let mut frame = h.to_vec();
        frame.extend_from_slice(&inner);
        let udp = &frame[34..];
        let full = !csum::fold(csum::sum(
            udp,
            csum::sum(&frame[26..34], 0) + 17 + udp.len() as u64,
        ));
        assert_eq!(lco, full);
    }

    #[test]
    fn source_ports_stay_in_the_ephemeral_range() {
        for h in [0, 1, u32::MAX, 28231, 28232, 0x8000_0000] {
            let p = source_port(h);
            assert!((SPORT_MIN..=SPORT_MAX).contains(&p), "{h} -> {p}");
        }
    }
}
