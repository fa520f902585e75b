//! How each kernel rounds a frame before adding a chain up: [`Rule`].

use std::fmt;

/// How the verifier rounds each frame before adding them up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Rule {
    /// Linux 5.10 to 6.8 (Debian 11's 5.10, RHEL 9's 5.14, Ubuntu 22.04's 5.15, Debian
    /// 12's 6.1, Ubuntu 24.04's 6.8), and newer kernels without the JIT:
    /// `round_up(max(depth, 1), 32)`.
    Frames32,
    /// Linux 6.9 and newer with the JIT (Debian 13's 6.12, 6.18): `round_up(depth, 16)`.
    Frames16,
}

impl Rule {
    pub const ALL: [Rule; 2] = [Rule::Frames32, Rule::Frames16];

    /// One frame's share of the chain.
    pub fn round(self, depth: u32) -> u32 {
        match self {
            Rule::Frames32 => depth.max(1).div_ceil(32) * 32,
            Rule::Frames16 => depth.div_ceil(16) * 16,
        }
    }

    /// The rule a kernel `major.minor` applies (the JIT assumed on, as on Debian).
    // For the kernel matrix's per-kernel table and `cargo xtask test`.
    #[allow(dead_code)]
    pub fn for_kernel(major: u32, minor: u32) -> Rule {
        if (major, minor) >= (6, 9) {
            Rule::Frames16
        } else {
            Rule::Frames32
        }
    }

    /// Short name for reports: the kernels it covers.
    pub fn label(self) -> &'static str {
        match self {
            Rule::Frames32 => "5.10-6.8",
            Rule::Frames16 => "6.9+",
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_per_kernel() {
        assert_eq!(Rule::Frames32.round(0), 32);
        assert_eq!(Rule::Frames32.round(104), 128);
        assert_eq!(Rule::Frames32.round(96), 96);
        assert_eq!(Rule::Frames32.round(208), 224);
        assert_eq!(Rule::Frames16.round(0), 0);
        assert_eq!(Rule::Frames16.round(104), 112);
        assert_eq!(Rule::Frames16.round(8), 16);
        assert_eq!(Rule::for_kernel(5, 10), Rule::Frames32);
        assert_eq!(Rule::for_kernel(6, 1), Rule::Frames32);
        assert_eq!(Rule::for_kernel(6, 8), Rule::Frames32);
        assert_eq!(Rule::for_kernel(6, 12), Rule::Frames16);
        assert_eq!(Rule::for_kernel(6, 18), Rule::Frames16);
    }
}
