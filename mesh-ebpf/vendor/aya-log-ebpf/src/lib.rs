#![no_std]
#![warn(clippy::cast_lossless, clippy::cast_sign_loss)]

pub use aya_log_ebpf_macros::{debug, error, info, log, trace, warn};

#[doc(hidden)]
pub mod macro_support {
    #[cfg(target_arch = "bpf")]
    use aya_ebpf::macros::btf_map;
    use aya_ebpf::{Global, btf_maps::RingBuf};
    pub use aya_log_common::{
        Argument, DefaultFormatter, DisplayHint, Field, Header, IpFormatter, Level, LogValueLength,
        LowerHexFormatter, LowerMacFormatter, PointerFormatter, UpperHexFormatter,
        UpperMacFormatter,
    };

    // mesh: a BTF map (`.maps`), which libbpf >= 1.0 (bpftool) accepts; upstream's is
    // a legacy `maps` one. Same name, type and size (128 KiB).
    #[cfg_attr(target_arch = "bpf", btf_map)]
    pub static AYA_LOGS: RingBuf<(), { 1 << 17 }> = RingBuf::new();

    /// Global log level controlling which log statements are active.
    ///
    /// Userspace may patch this symbol before load via `EbpfLoader::override_global`.
    #[unsafe(no_mangle)]
    pub static AYA_LOG_LEVEL: Global<u8> = Global::new(0xff);

    /// Returns `true` if the provided level is enabled according to [`AYA_LOG_LEVEL`].
    #[inline(always)]
    pub fn level_enabled(level: Level) -> bool {
        let current_level = AYA_LOG_LEVEL.load();
        level as u8 <= current_level
    }
}
