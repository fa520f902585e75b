//! The flow hash: the kernel picks a Maglev slot with it, user space (tests, meshctl's
//! simulator) computes the same value. Murmur3's finaliser over the tuple's words:
//! cheap, no tables, well mixed.

#[inline(always)]
pub const fn fmix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}

#[inline(always)]
const fn mix(h: u32, w: u32) -> u32 {
    let k = w
        .wrapping_mul(0xcc9e_2d51)
        .rotate_left(15)
        .wrapping_mul(0x1b87_3593);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

/// Hash of a flow (addresses and ports as on the wire). Services with client affinity
/// hash the client address alone (`sport = dport = 0`, `daddr = 0`).
#[inline(always)]
pub const fn flow_hash(saddr: u32, daddr: u32, sport: u16, dport: u16, proto: u8) -> u32 {
    let mut h = 0x9747_b28c;
    h = mix(h, saddr);
    h = mix(h, daddr);
    h = mix(h, ((sport as u32) << 16) | dport as u32);
    h = mix(h, proto as u32);
    fmix32(h ^ 13)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spreads_over_buckets() {
        let mut buckets = [0u32; 7];
        for p in 0..70_000u32 {
            let h = flow_hash(0x0a00_0001, 0x0a00_0002, p as u16, 80, 6);
            buckets[(h % 7) as usize] += 1;
        }
        for b in buckets {
            assert!((9_500..=10_500).contains(&b), "{buckets:?}");
        }
    }

    #[test]
    fn depends_on_every_field() {
        let base = flow_hash(1, 2, 3, 4, 6);
        assert_ne!(base, flow_hash(9, 2, 3, 4, 6));
        assert_ne!(base, flow_hash(1, 9, 3, 4, 6));
        assert_ne!(base, flow_hash(1, 2, 9, 4, 6));
        assert_ne!(base, flow_hash(1, 2, 3, 9, 6));
        assert_ne!(base, flow_hash(1, 2, 3, 4, 17));
    }
}
