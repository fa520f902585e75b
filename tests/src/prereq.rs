//! What a privileged test needs, and what happens when it is missing: on a developer
//! machine the test prints why it skips; under `CI=true` it fails.

use std::path::PathBuf;

use mesh_agent::{datapath::loader, host::preflight};

pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Root and the eBPF object. `None` means "skip" (never under CI).
pub fn privileged(test: &str) -> Option<PathBuf> {
    let missing = if !preflight::is_root() {
        Some("not root".to_string())
    } else {
        match loader::find_object() {
            Ok(p) => return Some(p),
            Err(e) => Some(e.to_string()),
        }
    };
    let why = missing.expect("set above");
    if in_ci() {
        panic!("{test}: privileged prerequisite missing under CI=true: {why}");
    }
    eprintln!("SKIP {test}: {why} (run `cargo xtask test` as root)");
    None
}

/// How much slower than a real machine the tests run (`MESH_TEST_TIME_SCALE`, default
/// 1): the kernel matrix's guests emulate their CPU (qemu TCG), so waits for an agent to
/// start and windows counted in requests per second stretch by this factor there.
pub fn time_scale() -> u32 {
    std::env::var("MESH_TEST_TIME_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n >= 1)
        .unwrap_or(1)
}
