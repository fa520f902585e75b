//! The contract between the mesh's kernel programs and its user space.
//!
//! Everything here is `no_std`, `#[repr(C)]` where it crosses the kernel boundary, and
//! checked for size at compile time, so a layout change cannot slip through unnoticed:
//! bump [`LAYOUT_VERSION`] (and the map-name suffixes) whenever a shared layout changes.
#![cfg_attr(not(any(feature = "std", test)), no_std)]

pub mod arp;
pub mod config;
pub mod csum;
pub mod ct;
pub mod hash;
pub mod lb;
pub mod maps;
pub mod parse;
pub mod proto;
pub mod reason;
pub mod reply;
pub mod sock;
pub mod stats;
pub mod vxlan;

/// Version of every pinned map layout. Map names carry it as a suffix (`_v1`), so an
/// agent of another version never misreads a pinned map.
pub const LAYOUT_VERSION: u32 = 1;

/// Compile-time size check for types that cross the kernel boundary.
#[macro_export]
macro_rules! assert_size {
    ($t:ty, $n:expr) => {
        const _: () = assert!(core::mem::size_of::<$t>() == $n);
    };
}
