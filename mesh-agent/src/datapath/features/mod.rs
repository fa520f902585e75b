//! What the running kernel offers the datapath, found by probing it at load time rather
//! than by its version (distributions backport), and the named fallback in force where
//! it does not. The loader sets `MeshConfig::flags` to what is there before the object
//! is loaded (the programs take their own fallback path where a bit is clear) and
//! attaches TC programs the way the kernel allows; the agent records the fallbacks in
//! its status file, where `meshctl status` and `doctor` show them.

use std::collections::BTreeMap;

use mesh_common::config::{
    FEAT_ALL, FEAT_CHECK_MTU, FEAT_ENCAP_L2_ETH, FEAT_XDP_BYTES, FEAT_XDP_META,
};
use serde::{Deserialize, Serialize};

mod probe;
use probe::*;

/// Environment variable that turns features off although the kernel has them, so that
/// a new kernel can exercise the fallbacks: `tcx,check_mtu,xdp_bytes,xdp_meta,
/// netns_cookie,encap_l2_eth` (any of them).
pub const FORCE_ENV: &str = "MESH_FORCE_FALLBACKS";

/// A kernel facility the mesh uses where it exists and replaces where it does not.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Feature {
    /// tcx bpf links for TC programs (6.6): pinned, they keep a program attached with no
    /// process, and a restarted agent swaps its program in with BPF_LINK_UPDATE.
    Tcx,
    /// `bpf_check_mtu` (5.12).
    CheckMtu,
    /// `bpf_xdp_load_bytes` / `bpf_xdp_store_bytes` (5.18).
    XdpBytes,
    /// `bpf_xdp_adjust_meta` in XDP programs (4.15; asked all the same, as some builds
    /// refuse it).
    XdpMeta,
    /// `SO_NETNS_COOKIE` (5.14): how the agent learns the cookie of each namespace whose
    /// sockets the socket programs serve (`bpf_get_netns_cookie` is what they see).
    NetnsCookie,
    /// `bpf_skb_adjust_room`'s `BPF_F_ADJ_ROOM_ENCAP_L2_ETH` (5.13, kernel commit
    /// d01b59c9ae94): older kernels refuse the flag with -EINVAL when the helper runs,
    /// which the verifier cannot see, so the probe runs it.
    EncapL2Eth,
}

impl Feature {
    pub const ALL: [Feature; 6] = [
        Feature::Tcx,
        Feature::CheckMtu,
        Feature::XdpBytes,
        Feature::XdpMeta,
        Feature::NetnsCookie,
        Feature::EncapL2Eth,
    ];

    /// Its name in [`FORCE_ENV`] and in the status file.
    pub fn name(self) -> &'static str {
        match self {
            Feature::Tcx => "tcx",
            Feature::CheckMtu => "check_mtu",
            Feature::XdpBytes => "xdp_bytes",
            Feature::XdpMeta => "xdp_meta",
            Feature::NetnsCookie => "netns_cookie",
            Feature::EncapL2Eth => "encap_l2_eth",
        }
    }

    /// What it is, and since when Linux has it.
    pub fn what(self) -> &'static str {
        match self {
            Feature::Tcx => "tcx links (Linux 6.6)",
            Feature::CheckMtu => "bpf_check_mtu (Linux 5.12)",
            Feature::XdpBytes => "bpf_xdp_load_bytes/store_bytes (Linux 5.18)",
            Feature::XdpMeta => "bpf_xdp_adjust_meta in XDP programs",
            Feature::NetnsCookie => "SO_NETNS_COOKIE (Linux 5.14)",
            Feature::EncapL2Eth => "bpf_skb_adjust_room's BPF_F_ADJ_ROOM_ENCAP_L2_ETH (Linux 5.13)",
        }
    }

    /// The fallback's name.
    pub fn fallback(self) -> &'static str {
        match self {
            Feature::Tcx => "tc-netlink",
            Feature::CheckMtu => "own-mtu-check",
            Feature::XdpBytes => "xdp-direct-access",
            Feature::XdpMeta => "tc-decap",
            Feature::NetnsCookie => "no-host-ports",
            Feature::EncapL2Eth => "encap-no-l2-eth",
        }
    }

    /// What the mesh does instead.
    pub fn instead(self) -> &'static str {
        match self {
            Feature::Tcx => {
                "TC programs are netlink clsact filters at a fixed priority and handle, \
                 which a restarted agent replaces in place"
            }
            Feature::CheckMtu => "the datapath checks packets against the underlay's MTU itself",
            Feature::XdpBytes => "XDP reads and writes the frame by direct packet access",
            Feature::XdpMeta => {
                "XDP only validates VXLAN and leaves taking it apart to TC (no metadata \
                 carries the peer and VNI across)"
            }
            Feature::NetnsCookie => {
                "the host port is off: the socket programs could not tell the node's \
                 namespaces from others, so published ports answer from other hosts but \
                 not from the node itself or its containers"
            }
            Feature::EncapL2Eth => {
                "the encapsulation leaves the flag out (the kernel is not told the tunnel \
                 carries Ethernet)"
            }
        }
    }

    /// Its bit in `MeshConfig::flags` (0: the agent's concern alone).
    pub fn flag(self) -> u32 {
        match self {
            Feature::Tcx => 0,
            Feature::CheckMtu => FEAT_CHECK_MTU,
            Feature::XdpBytes => FEAT_XDP_BYTES,
            Feature::XdpMeta => FEAT_XDP_META,
            Feature::NetnsCookie => 0,
            Feature::EncapL2Eth => FEAT_ENCAP_L2_ETH,
        }
    }

    fn parse(name: &str) -> Option<Feature> {
        Feature::ALL.into_iter().find(|f| f.name() == name)
    }

    /// Asks the kernel.
    fn probe(self) -> bool {
        match self {
            Feature::Tcx => probe_tcx(),
            Feature::CheckMtu => probe_helper(BPF_PROG_TYPE_SCHED_CLS, BPF_FUNC_CHECK_MTU),
            Feature::XdpBytes => {
                probe_helper(BPF_PROG_TYPE_XDP, BPF_FUNC_XDP_LOAD_BYTES)
                    && probe_helper(BPF_PROG_TYPE_XDP, BPF_FUNC_XDP_STORE_BYTES)
            }
            Feature::XdpMeta => probe_helper(BPF_PROG_TYPE_XDP, BPF_FUNC_XDP_ADJUST_META),
            Feature::NetnsCookie => crate::datapath::sys::netns_cookie().is_ok(),
            Feature::EncapL2Eth => probe_encap_l2_eth(),
        }
    }
}

/// How TC programs are attached (`mesh-agent --tc-attach`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum TcAttach {
    /// tcx links where the kernel has them, else netlink clsact filters.
    #[default]
    Auto,
    /// tcx links only (refused where the kernel has none).
    Tcx,
    /// netlink clsact filters, even where tcx links exist (tests the fallback).
    Netlink,
}

/// Why a feature is not used.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Why {
    /// The kernel does not have it.
    Missing,
    /// Turned off by [`FORCE_ENV`] or `--tc-attach netlink`.
    Forced,
}

/// A fallback in force, as the status file records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fallback {
    /// The fallback's name ([`Feature::fallback`]: `tc-netlink`, `own-mtu-check`, ...).
    pub name: String,
    /// The feature it stands in for ([`Feature::name`]: `tcx`, `check_mtu`, ...).
    pub feature: String,
    pub why: Why,
    /// What is missing (or forced off) and what the mesh does instead, in words.
    pub detail: String,
}

impl std::fmt::Display for Fallback {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.name, self.detail)
    }
}

/// The features the datapath uses on this kernel.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Features {
    /// Features not used, and why; every other one is.
    off: BTreeMap<Feature, Why>,
}

impl Features {
    /// Probes the kernel (once per process), then applies [`FORCE_ENV`] and the TC
    /// attachment asked for. `TcAttach::Tcx` on a kernel without tcx links is an error.
    pub fn detect(tc: TcAttach) -> Result<Features, crate::MeshError> {
        static PROBED: std::sync::OnceLock<Vec<Feature>> = std::sync::OnceLock::new();
        let missing = PROBED.get_or_init(|| {
            lift_memlock();
            Feature::ALL.into_iter().filter(|f| !f.probe()).collect()
        });
        let forced = std::env::var(FORCE_ENV).unwrap_or_default();
        Self::resolve(missing, &forced, tc)
    }

    /// [`Self::detect`] past the probes: what the kernel lacks, the force list, the TC
    /// attachment asked for.
    fn resolve(
        missing: &[Feature],
        forced: &str,
        tc: TcAttach,
    ) -> Result<Features, crate::MeshError> {
        let mut off: BTreeMap<Feature, Why> = missing.iter().map(|f| (*f, Why::Missing)).collect();
        let mut force = |f: Feature| {
            off.entry(f).or_insert(Why::Forced);
        };
        for name in forced.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            force(
                Feature::parse(name).ok_or_else(|| crate::MeshError::Setting {
                    what: format!(
                        "{FORCE_ENV}: unknown feature {name:?} (known: {})",
                        Feature::ALL.map(Feature::name).join(", ")
                    ),
                })?,
            );
        }
        match tc {
            TcAttach::Auto => {}
            TcAttach::Netlink => force(Feature::Tcx),
            TcAttach::Tcx if off.contains_key(&Feature::Tcx) => {
                return Err(crate::MeshError::Setting {
                    what: format!(
                        "--tc-attach tcx: {} {}; use --tc-attach auto",
                        Feature::Tcx.what(),
                        if off[&Feature::Tcx] == Why::Forced {
                            "are forced off by MESH_FORCE_FALLBACKS"
                        } else {
                            "are missing on this kernel"
                        }
                    ),
                })
            }
            TcAttach::Tcx => {}
        }
        Ok(Features { off })
    }

    pub fn has(&self, f: Feature) -> bool {
        !self.off.contains_key(&f)
    }

    /// `MeshConfig::flags`: every feature (the object assumes none) but those not used
    /// here.
    pub fn flags(&self) -> u32 {
        self.off.keys().fold(FEAT_ALL, |fl, f| fl & !f.flag())
    }

    /// The fallbacks in force, for logs and the status file.
    pub fn fallbacks(&self) -> Vec<Fallback> {
        self.off
            .iter()
            .map(|(f, why)| Fallback {
                name: f.fallback().into(),
                feature: f.name().into(),
                why: *why,
                detail: match why {
                    Why::Missing => format!("no {} here, so {}", f.what(), f.instead()),
                    Why::Forced => format!("{} forced off, so {}", f.what(), f.instead()),
                },
            })
            .collect()
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn force_list_and_tc_choice() {
        let f = Features::resolve(&[], "", TcAttach::Auto).unwrap();
        assert!(f.fallbacks().is_empty());
        assert_eq!(f.flags(), FEAT_ALL);

        let f = Features::resolve(&[Feature::CheckMtu], "xdp_bytes, tcx", TcAttach::Auto).unwrap();
        assert_eq!(f.flags(), FEAT_XDP_META | FEAT_ENCAP_L2_ETH);
        assert!(!f.has(Feature::Tcx));
        let fb = f.fallbacks();
        let names: Vec<&str> = fb.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["tc-netlink", "own-mtu-check", "xdp-direct-access"]);
        assert_eq!(fb[0].why, Why::Forced);
        assert_eq!(fb[1].why, Why::Missing);
        assert_eq!(
            fb[1].to_string(),
            "own-mtu-check: no bpf_check_mtu (Linux 5.12) here, so the datapath checks \
             packets against the underlay's MTU itself"
        );
        assert!(
            fb[0]
                .to_string()
                .starts_with("tc-netlink: tcx links (Linux 6.6) forced off, so TC"),
            "{}",
            fb[0]
        );

        let f = Features::resolve(&[], "", TcAttach::Netlink).unwrap();
        assert!(!f.has(Feature::Tcx) && f.has(Feature::CheckMtu));
        assert_eq!(f.flags(), FEAT_ALL);

        // The encapsulation's flag: missing (5.10 to 5.12) or forced off, its bit clear
        // and its fallback named; forced off where missing is still missing.
        let f = Features::resolve(&[], "encap_l2_eth", TcAttach::Auto).unwrap();
        assert!(!f.has(Feature::EncapL2Eth) && f.has(Feature::XdpMeta));
        assert_eq!(f.flags(), FEAT_ALL & !FEAT_ENCAP_L2_ETH);
        assert_eq!(f.flags(), FEAT_CHECK_MTU | FEAT_XDP_BYTES | FEAT_XDP_META);
        let fb = f.fallbacks();
        assert_eq!(fb.len(), 1);
        assert_eq!(
            (fb[0].name.as_str(), fb[0].feature.as_str()),
            ("encap-no-l2-eth", "encap_l2_eth")
        );
        assert_eq!(fb[0].why, Why::Forced);
        assert_eq!(
            fb[0].to_string(),
            "encap-no-l2-eth: bpf_skb_adjust_room's BPF_F_ADJ_ROOM_ENCAP_L2_ETH (Linux 5.13) \
             forced off, so the encapsulation leaves the flag out (the kernel is not told \
             the tunnel carries Ethernet)"
        );
        let f = Features::resolve(
            &[Feature::CheckMtu, Feature::XdpBytes, Feature::EncapL2Eth],
            "encap_l2_eth,xdp_meta",
            TcAttach::Auto,
        )
        .unwrap();
        assert_eq!(f.flags(), 0);
        let why: Vec<(String, Why)> = f
            .fallbacks()
            .into_iter()
            .map(|f| (f.feature, f.why))
            .collect();
        assert_eq!(
            why,
            [
                ("check_mtu".into(), Why::Missing),
                ("xdp_bytes".into(), Why::Missing),
                ("xdp_meta".into(), Why::Forced),
                ("encap_l2_eth".into(), Why::Missing),
            ]
        );

        let e = Features::resolve(&[Feature::Tcx], "", TcAttach::Tcx)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("tcx links (Linux 6.6) are missing on this kernel") && !e.contains('\n'),
            "{e}"
        );
        let e = Features::resolve(&[], "check_mtu,bogus", TcAttach::Auto)
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown feature \"bogus\""), "{e}");
    }

    /// The probes on this machine's kernel: a feature its release has must be found
    /// (an older release may have it backported, so only that way round). Root only.
    #[test]
    fn probes_find_what_this_kernel_has() {
        if !crate::host::preflight::is_root() {
            eprintln!("SKIP probes_find_what_this_kernel_has: not root");
            return;
        }
        let release = crate::host::preflight::kernel_release();
        let v = crate::host::preflight::kernel_version(&release).expect("a kernel release");
        // (bpf_xdp_adjust_meta, 4.15, is refused by some builds: no release rule.)
        let meta = if Feature::XdpMeta.probe() {
            "found"
        } else {
            "missing"
        };
        eprintln!("{release}: xdp_meta {meta}");
        for (f, since) in [
            (Feature::Tcx, (6, 6)),
            (Feature::CheckMtu, (5, 12)),
            (Feature::XdpBytes, (5, 18)),
            (Feature::NetnsCookie, (5, 14)),
            (Feature::EncapL2Eth, (5, 13)),
        ] {
            let found = f.probe();
            eprintln!(
                "{release}: {} {}",
                f.name(),
                if found { "found" } else { "missing" }
            );
            assert!(
                found || v < since,
                "{release} has {} but the probe missed it",
                f.name()
            );
        }
        // A helper no kernel knows is reported missing (the probe's other answer).
        assert!(!probe_helper(BPF_PROG_TYPE_XDP, 100_000));
        // bpf_skb_adjust_room's two answers the encap_l2_eth probe tells apart: room
        // made for the flags every kernel knows, -EINVAL for a flag it does not (bit 30:
        // no kernel's); and the probe's own flags as the feature's probe found them.
        let known = ENCAP_FLAGS & !BPF_F_ADJ_ROOM_ENCAP_L2_ETH;
        assert_eq!(adjust_room_returns(known), Ok(0));
        assert_eq!(adjust_room_returns(known | 1 << 30), Ok(-libc::EINVAL));
        let l2 = adjust_room_returns(ENCAP_FLAGS);
        eprintln!("{release}: bpf_skb_adjust_room with BPF_F_ADJ_ROOM_ENCAP_L2_ETH: {l2:?}");
        assert_eq!(
            l2,
            Ok(if Feature::EncapL2Eth.probe() {
                0
            } else {
                -libc::EINVAL
            })
        );
        // Forced off, whatever the kernel has.
        let f = Features::resolve(&[], "check_mtu", TcAttach::Netlink).unwrap();
        assert_eq!(f.flags(), FEAT_ALL & !FEAT_CHECK_MTU);
    }

    /// The probe's program and frame, as the kernel will read them.
    #[test]
    fn encap_probe_program_and_frame() {
        assert_eq!(ENCAP_FLAGS, 0x0e00_0000_0000_0052);
        let p = adjust_room_prog(ENCAP_FLAGS);
        // ld_imm64 r4: the low word in the first instruction, the high in the second.
        assert_eq!(p[2][..2], [LD_IMM64, 4]);
        assert_eq!(i32::from_ne_bytes(p[2][4..8].try_into().unwrap()), 0x52);
        assert_eq!(p[3][..4], [0; 4]);
        assert_eq!(
            i32::from_ne_bytes(p[3][4..8].try_into().unwrap()),
            0x0e00_0000
        );
        assert_eq!(i32::from_ne_bytes(p[4][4..8].try_into().unwrap()), 50);
        let f = probe_frame();
        // The IPv4 header sums to 0xffff with its checksum in; the lengths agree.
        let sum = f[14..34]
            .chunks(2)
            .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
            .sum::<u32>();
        assert_eq!((sum & 0xffff) + (sum >> 16), 0xffff);
        assert_eq!(u16::from_be_bytes([f[16], f[17]]) as usize, f.len() - 14);
        assert_eq!(u16::from_be_bytes([f[38], f[39]]) as usize, f.len() - 34);
    }

    #[test]
    fn unknown_helper_logs() {
        // As 5.10's verifier words a helper it does not know, and one the program type
        // may not call.
        assert!(helper_unknown(
            "0: (85) call unknown#163\ninvalid func unknown#163\n"
        ));
        assert!(helper_unknown("unknown func bpf_xdp_load_bytes#189\n"));
        assert!(helper_unknown(
            "program of this type cannot use helper bpf_xdp_adjust_meta#54\n"
        ));
        assert!(!helper_unknown("R1 type=ctx expected=fp\n"));
    }
}
