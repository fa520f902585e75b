//! `cargo xtask fresh-root`: README's `cargo xtask setup` then `cargo xtask build`, as
//! root, on a fresh Debian 12 root made by debootstrap from Debian's archive, with only
//! what a fresh machine of this kind has (gcc, git, CA certificates, rustup's stable
//! toolchain bound in read-only). A package installed by hand on this machine cannot make
//! it pass: nothing of the host's packages, /usr/local or ~/.cargo/bin gets in.
//!
//! How: the pristine root (cached, rebuilt when older than a week) is the lower layer of
//! an overlay whose upper layer is a tmpfs, so every run starts from it with none of
//! setup's packages installed. Everything runs in a private mount and PID namespace
//! (`unshare`): setup's bpffs mount, /proc, /sys, /dev and the overlay exist only there
//! and vanish with it, failed or not; the host's apt, packages and /sys/fs/bpf are never
//! touched. Cached between runs, under $MESH_FRESH_CACHE (default /var/cache/mesh-fresh):
//! the base root, the .deb files apt fetched (apt checks them against the signed
//! indexes), cargo's crates.io downloads, and the target directories of bpf-linker's
//! build (dropped with the base and whenever setup.rs changes) and of the build (dropped
//! with the base). The checkout is copied with fresh mtimes, so cargo rebuilds it.
//!
//! Files: `check` (the host side: prerequisites, the run, its timing), `cache` (the
//! cache directory, its lock and the target directories kept), `namespace` (this xtask
//! again in a private mount + PID namespace, and the mounts made there), `base` (the
//! pristine root by debootstrap), `inside` (the run inside: the overlay, setup and build
//! in the chroot, the artifacts checked), `machine` (what a fresh machine brings into the
//! root: its CAs, rustup's toolchain, the checkout).

mod base;
mod cache;
mod check;
mod inside;
mod machine;
mod namespace;

use std::path::PathBuf;

use anyhow::bail;

use self::{base::inner_base, check::check, inside::inner_run};

const SUITE: &str = "bookworm";
const MIRROR: &str = "http://deb.debian.org/debian";
const SECURITY: &str = "http://deb.debian.org/debian-security";
/// What a fresh machine of this kind has besides a minimal Debian 12 (and rustup).
const MACHINE_PKGS: &[&str] = &["ca-certificates", "gcc", "g++", "libc6-dev", "make", "git"];
/// Where the checkout lands in the root.
const SRC: &str = "/root/mesh";
/// Target directory for `cargo install bpf-linker` (set for the setup step only).
const INSTALL_TARGET: &str = "/var/cache/fresh-cargo-install";
/// A fresh machine's PATH for root, with rustup's bin first (as ~/.cargo/env puts it).
const PATH: &str = "/root/.cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

#[derive(clap::Args)]
pub struct FreshRoot {
    /// Empty the cache first: what the first run on a new machine costs.
    #[arg(long)]
    cold: bool,
    /// Test HEAD (`git archive`) instead of the working tree (tracked and untracked,
    /// not ignored, files: what `git add -A` would commit).
    #[arg(long)]
    committed: bool,
    /// Internal: the part that runs inside the private namespace ("base" or "run").
    #[arg(long, hide = true)]
    inner: Option<String>,
    /// Internal: the base root's directory.
    #[arg(long, hide = true)]
    base_dir: Option<PathBuf>,
}

pub fn run(a: FreshRoot) -> anyhow::Result<()> {
    match (a.inner.as_deref(), &a.base_dir) {
        (Some("base"), Some(dir)) => inner_base(dir),
        (Some("run"), Some(dir)) => inner_run(dir, a.committed),
        (Some(other), _) => bail!("fresh-root: unknown inner step {other:?}"),
        (None, _) => {
            let line = if a.cold || a.committed {
                check(a.cold, a.committed)?
            } else {
                self_test()?
            };
            println!("fresh-root: {line}");
            Ok(())
        }
    }
}

/// The check as `cargo xtask test` runs it: working tree, caches kept. Returns the
/// summary line (total time, cold or cached, and the other kind's last time).
pub fn self_test() -> anyhow::Result<String> {
    check(false, false)
}
