//! The load-time configuration (`mesh_common::config::MeshConfig`), a global the loader
//! sets and freezes. Each field is read where it is used, straight from the global (a
//! volatile read: the compiler must not fold in the object's defaults), so that no copy
//! of it sits on a stack frame, and so that the verifier, which knows a frozen global's
//! contents, sees a feature flag as a constant and never looks at the path it rules out
//! (a helper this kernel lacks).

use aya_ebpf::Global;
use mesh_common::config::MeshConfig;

/// Set by the loader (`mesh_common::config::CONFIG_GLOBAL`).
#[no_mangle]
static MESH_CONFIG: Global<MeshConfig> = Global::new(MeshConfig::DEFAULT);

#[inline(always)]
fn cfg() -> *const MeshConfig {
    // `Global` is `repr(transparent)` over the value.
    &MESH_CONFIG as *const Global<MeshConfig> as *const MeshConfig
}

/// VXLAN data-path port (host byte order).
#[inline(always)]
pub fn vxlan_port() -> u16 {
    // SAFETY: a read of the frozen global.
    unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*cfg()).vxlan_port)) }
}

/// The hairpin SNAT address (network order).
#[inline(always)]
pub fn hairpin_addr() -> u32 {
    // SAFETY: as above.
    unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*cfg()).hairpin_addr)) }
}

/// The host-port address (network order); 0: the socket programs are off.
#[inline(always)]
pub fn host_addr() -> u32 {
    // SAFETY: as above.
    unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*cfg()).host_addr)) }
}

/// The underlay's MTU when the programs were loaded (0: unknown).
#[inline(always)]
pub fn underlay_mtu() -> u32 {
    // SAFETY: as above.
    unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*cfg()).underlay_mtu)) as u32 }
}

/// Whether the running kernel offers `feature` (`mesh_common::config::FEAT_*`).
#[inline(always)]
pub fn has(feature: u32) -> bool {
    // SAFETY: as above.
    unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*cfg()).flags)) & feature != 0 }
}
