//! `cargo xtask setup`: idempotent, says what it does, root only.

use std::process::Command;

use anyhow::{bail, Context};

use crate::cmd::{self, cargo_bin_dir, exec, output};

/// bpf-linker version we build the kernel side with (0.13 knows LLVM 21, 22, 23).
pub const BPF_LINKER_VERSION: &str = "0.13.0";
/// Debian's rustc for the BPF target (and the prebuilt core for bpfel/bpfeb), and the
/// cargo that drives it (`/usr/bin/cargo`: rustup's cargo would pick rustup's rustc).
const TOOLCHAIN_PKGS: &[&str] = &["rustc-web", "cargo-web", "libstd-rust-web-dev-bpf"];
/// Everything else the build, the tests and later the agent and benches use.
const TOOL_PKGS: &[&str] = &[
    "zlib1g-dev",
    "libzstd-dev",
    "bpftool",
    "iproute2",
    "ethtool",
    "curl",
    "iperf3",
    "wrk",
    "tcpdump",
    "busybox-static",
    "docker.io",
    // `cargo xtask fresh-root` makes its fresh Debian 12 root with it.
    "debootstrap",
    // The kernel matrix (`cargo xtask kernels`): its guests, and Debian 13's modules
    // (xz-compressed) unpacked into their initramfs.
    "qemu-system-x86",
    "xz-utils",
    // `cargo xtask fuzz`: libfuzzer-sys builds libFuzzer, C++.
    "g++",
];

pub fn run() -> anyhow::Result<()> {
    if !cmd::is_root() {
        bail!("setup must run as root: it installs Debian packages and mounts bpffs (try `sudo -E cargo xtask setup`)");
    }
    apt_install(TOOLCHAIN_PKGS)?;
    let llvm = llvm_major()?;
    println!(
        "setup: Debian's rustc uses LLVM {llvm}; bpf-linker will be built against llvm-{llvm}"
    );
    let llvm_pkgs = [format!("llvm-{llvm}-dev"), format!("libpolly-{llvm}-dev")];
    let mut pkgs: Vec<&str> = llvm_pkgs.iter().map(String::as_str).collect();
    pkgs.extend_from_slice(TOOL_PKGS);
    apt_install(&pkgs)?;
    bpf_linker(llvm)?;
    cargo_fuzz()?;
    mount_bpffs()?;
    println!("setup: done");
    Ok(())
}

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

pub fn apt_install(pkgs: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = pkgs.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        println!("setup: Debian packages present: {}", pkgs.join(" "));
        return Ok(());
    }
    println!("setup: installing Debian packages: {}", missing.join(" "));
    exec(Command::new("apt-get").args(["update", "-qq"]))?;
    exec(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

/// The LLVM major version of Debian's rustc ("LLVM version: 22.1.2" -> 22).
pub fn llvm_major() -> anyhow::Result<u32> {
    let vv = output(Command::new("/usr/bin/rustc").arg("-vV"))?;
    let line = vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .context("`/usr/bin/rustc -vV` printed no LLVM version")?;
    line.split('.')
        .next()
        .and_then(|m| m.trim().parse().ok())
        .with_context(|| format!("unreadable LLVM version {line:?}"))
}

/// Whether `cargo_bin_dir()/<command>` answers `version_args` with `version`; says so,
/// or says it replaces another version.
fn cargo_installed(command: &str, version_args: &[&str], version: &str) -> bool {
    let bin = cargo_bin_dir().join(command);
    let Ok(v) = output(Command::new(&bin).args(version_args)) else {
        return false;
    };
    if v.contains(version) {
        println!("setup: {command} {version} present at {}", bin.display());
        return true;
    }
    println!("setup: replacing {} ({})", bin.display(), v.trim());
    false
}

fn cargo_fuzz() -> anyhow::Result<()> {
    let v = crate::fuzz::CARGO_FUZZ_VERSION;
    if cargo_installed("cargo-fuzz", &["fuzz", "--version"], v) {
        return Ok(());
    }
    println!("setup: building cargo-fuzz {v} (about a minute on 2 cores)");
    exec(Command::new("cargo").args([
        "install",
        "--locked",
        "--force",
        "cargo-fuzz",
        "--version",
        v,
    ]))
}

fn bpf_linker(llvm: u32) -> anyhow::Result<()> {
    if cargo_installed("bpf-linker", &["--version"], BPF_LINKER_VERSION) {
        return Ok(());
    }
    println!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against llvm-{llvm} (a few minutes on 2 cores)"
    );
    let prefix = format!("/usr/lib/llvm-{llvm}");
    exec(
        Command::new("cargo")
            .args([
                "install",
                "--locked",
                "--force",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
            ])
            .args([
                "--no-default-features",
                "--features",
                &format!("llvm-{llvm}"),
            ])
            .env("LLVM_PREFIX", &prefix)
            .env(
                "PATH",
                format!("{prefix}/bin:{}", std::env::var("PATH").unwrap_or_default()),
            ),
    )
}

fn mount_bpffs() -> anyhow::Result<()> {
    let mounts =
        std::fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.contains(" bpf "))
    {
        println!("setup: bpffs mounted at /sys/fs/bpf");
        return Ok(());
    }
    println!("setup: mounting bpffs at /sys/fs/bpf");
    exec(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
}
