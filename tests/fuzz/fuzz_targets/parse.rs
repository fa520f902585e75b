//! Any frame through mesh-common's parser, as the kernel programs run it (and, when it
//! is VXLAN on the data-path port, its inner frame, as decapsulation does). The parser
//! must never panic, and what it reports must describe the frame: offsets inside it, a
//! drop reason for what it refuses and a pass reason for what it accepts.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_common::{
    parse::{parse, Bytes, Frag, Parsed},
    reason::Kind,
};

const VXLAN_PORT: u16 = 4789;

fn check(frame: &[u8], depth: u8) {
    let p = match parse(&Bytes(frame), VXLAN_PORT) {
        Ok(p) => p,
        Err(reason) => {
            assert_eq!(
                reason.kind(),
                Kind::Drop,
                "refused with {reason:?}, not a drop reason"
            );
            return;
        }
    };
    described(&p, frame.len());
    if p.vxlan && depth == 0 {
        check(&frame[p.inner_off as usize..], 1);
    }
}

fn described(p: &Parsed, len: usize) {
    let v = p.verdict();
    assert_eq!(v.kind(), Kind::Pass, "accepted with the drop reason {v:?}");
    if p.ip_version == 0 {
        assert_eq!(p.l4_off, 0);
        return;
    }
    let (l3, end, l4) = (p.l3_off as usize, p.l3_end as usize, p.l4_off as usize);
    assert!(
        l3 < end && end <= len,
        "IP datagram {l3}..{end} in a {len}-byte frame"
    );
    if l4 != 0 {
        assert!(l3 < l4 && l4 < end, "L4 at {l4} outside {l3}..{end}");
        assert!(
            !matches!(p.frag, Frag::NonFirst),
            "an L4 header in a later fragment"
        );
    }
    if p.vxlan {
        assert!(!p.vxlan_first_fragment);
        let inner = p.inner_off as usize;
        assert!(
            l4 + 16 == inner && inner + 14 <= end,
            "inner frame at {inner} of {end}"
        );
    }
    if p.vxlan_first_fragment {
        assert!(matches!(p.frag, Frag::First) && p.inner_off == 0);
    }
}

fuzz_target!(|frame: &[u8]| check(frame, 0));
