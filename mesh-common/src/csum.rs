//! Internet checksum arithmetic (RFC 1071) and incremental updates (RFC 1624).
//!
//! Values are 16-bit words as they sit in the packet, read big-endian. The kernel side
//! mostly uses the `bpf_l3/l4_csum_replace` helpers; these functions are the reference
//! the tests check those rewrites against, and what XDP (which has no such helpers) uses.

/// Folds a 32-bit-or-wider one's-complement sum to 16 bits.
#[inline(always)]
pub const fn fold(mut sum: u64) -> u16 {
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// One's-complement sum of `data` (big-endian words, odd tail padded with zero).
pub fn sum(data: &[u8], initial: u64) -> u64 {
    let mut acc = initial;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc += u16::from_be_bytes([c[0], c[1]]) as u64;
    }
    if let [last] = chunks.remainder() {
        acc += (*last as u64) << 8;
    }
    acc
}

/// The Internet checksum of `data` (the value to store in a header whose checksum field
/// was zero while summing).
pub fn checksum(data: &[u8]) -> u16 {
    !fold(sum(data, 0))
}

/// Pseudo-header sum for IPv4 TCP/UDP.
pub fn ipv4_pseudo_sum(src: [u8; 4], dst: [u8; 4], proto: u8, l4_len: u16) -> u64 {
    sum(&src, 0) + sum(&dst, 0) + proto as u64 + l4_len as u64
}

/// RFC 1624 eqn. 3: the checksum after a 16-bit field changes from `old` to `new`.
#[inline(always)]
pub const fn replace16(check: u16, old: u16, new: u16) -> u16 {
    !fold(!check as u64 + !old as u64 + new as u64)
}

/// As [`replace16`] for a 32-bit field (an IPv4 address).
#[inline(always)]
pub const fn replace32(check: u16, old: u32, new: u32) -> u16 {
    let s = !check as u64
        + (!(old >> 16) & 0xffff) as u64
        + (!old & 0xffff) as u64
        + (new >> 16) as u64
        + (new & 0xffff) as u64;
    !fold(s)
}

/// UDP over IPv4: a zero checksum means "none" and stays zero; a computed zero is sent
/// as 0xffff (RFC 768).
#[inline(always)]
pub const fn udp_replace32(check: u16, old: u32, new: u32) -> u16 {
    if check == 0 {
        return 0;
    }
    match replace32(check, old, new) {
        0 => 0xffff,
        c => c,
    }
}

/// As [`udp_replace32`] for a 16-bit field (a port).
#[inline(always)]
pub const fn udp_replace16(check: u16, old: u16, new: u16) -> u16 {
    if check == 0 {
        return 0;
    }
    match replace16(check, old, new) {
        0 => 0xffff,
        c => c,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 1071's worked example: words 0001 f203 f4f5 f6f7 sum to ddf2.
    #[test]
    fn rfc1071_example() {
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(fold(sum(&data, 0)), 0xddf2);
        assert_eq!(checksum(&data), !0xddf2);
    }

    #[test]
    fn odd_length_pads_with_zero() {
        assert_eq!(sum(&[0x12, 0x34, 0x56], 0), 0x1234 + 0x5600);
    }

    /// A header that carries its own checksum sums to 0xffff.
    #[test]
    fn known_ipv4_header_verifies() {
        // 45 00 00 73 00 00 40 00 40 11 b8 61 c0 a8 00 01 c0 a8 00 c7 (Wikipedia's example)
        let h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0xb8, 0x61, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(fold(sum(&h, 0)), 0xffff);
        let mut z = h;
        z[10] = 0;
        z[11] = 0;
        assert_eq!(checksum(&z), 0xb861);
    }

    /// Incremental updates agree with a full recomputation for many address/port changes,
    /// including the corner values 0x0000 and 0xffff.
    #[test]
    fn incremental_matches_full() {
        let mut seed = 0x1234_5678_9abc_def0u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for round in 0..5000 {
            let mut hdr = [0u8; 20];
            for b in hdr.iter_mut() {
                *b = next() as u8;
            }
            if round % 7 == 0 {
                hdr[12..16].copy_from_slice(&[0xff; 4]);
            }
            hdr[10] = 0;
            hdr[11] = 0;
            let c = checksum(&hdr);
            hdr[10..12].copy_from_slice(&c.to_be_bytes());

            let old = u32::from_be_bytes([hdr[12], hdr[13], hdr[14], hdr[15]]);
            let new = if round % 5 == 0 { 0 } else { next() as u32 };
            let inc = replace32(c, old, new);
            hdr[12..16].copy_from_slice(&new.to_be_bytes());
            hdr[10] = 0;
            hdr[11] = 0;
            let full = checksum(&hdr);
            // Both encodings of zero (0x0000/0xffff) verify; RFC 1624 never yields 0xffff...
            assert_eq!(inc, full, "round {round}: old {old:#x} new {new:#x}");

            let oldp = u16::from_be_bytes([hdr[0], hdr[1]]);
            let newp = next() as u16;
            hdr[10..12].copy_from_slice(&full.to_be_bytes());
            let inc16 = replace16(full, oldp, newp);
            hdr[0..2].copy_from_slice(&newp.to_be_bytes());
            hdr[10] = 0;
            hdr[11] = 0;
            assert_eq!(
                inc16,
                checksum(&hdr),
                "round {round}: port {oldp:#x}->{newp:#x}"
            );
        }
    }

    #[test]
    fn udp_zero_checksum_is_preserved_and_zero_result_becomes_ffff() {
        assert_eq!(udp_replace32(0, 0x0a000001, 0x0a000002), 0);
        assert_eq!(udp_replace16(0, 80, 8080), 0);
        // Find a change whose incremental result is 0 and check it is sent as 0xffff.
        let check = 0x1234u16;
        // replace16(check, old, new) == 0 when !check + !old + new folds to 0xffff.
        let old = 0u16;
        let new = check; // !check + 0xffff + check == 0xffff + 0xffff -> folds to 0xffff
        assert_eq!(replace16(check, old, new), 0);
        assert_eq!(udp_replace16(check, old, new), 0xffff);
    }
}
