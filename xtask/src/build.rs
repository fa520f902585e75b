//! `cargo xtask build`: the kernel side with Debian's rustc for bpfel-unknown-none, the
//! user side with the machine's rustup stable, both in release.

use std::{path::PathBuf, process::Command};

use anyhow::{bail, Context};

use crate::cmd::{self, exec, path_with_cargo_bin, root};

/// Where the object ends up: next to the release binaries, where the agent looks.
pub fn object_path() -> PathBuf {
    root().join("target/release/mesh.bpf.o")
}

pub fn run() -> anyhow::Result<()> {
    let obj = build_ebpf()?;
    exec(Command::new("cargo").current_dir(root()).args([
        "build",
        "--release",
        "--locked",
        "--workspace",
        "--bins",
    ]))?;
    println!(
        "build: user side in {}",
        root().join("target/release").display()
    );
    println!("build: eBPF object {}", obj.display());
    Ok(())
}

/// Builds mesh-ebpf and copies the object to [`object_path`].
pub fn build_ebpf() -> anyhow::Result<PathBuf> {
    for need in ["/usr/bin/rustc", "/usr/bin/cargo"] {
        if !std::path::Path::new(need).exists() {
            bail!("{need} is missing: Debian's rustc-web builds the eBPF side; run `cargo xtask setup` as root");
        }
    }
    if !cmd::cargo_bin_dir().join("bpf-linker").exists() {
        bail!(
            "bpf-linker is missing from {}: run `cargo xtask setup` as root",
            cmd::cargo_bin_dir().display()
        );
    }
    let target_dir = root().join("target/ebpf");
    let mut c = Command::new("/usr/bin/cargo");
    c.current_dir(root().join("mesh-ebpf"))
        .args([
            "build",
            "--release",
            "--locked",
            "--target",
            "bpfel-unknown-none",
        ])
        .env("CARGO_TARGET_DIR", &target_dir)
        .env("RUSTC", "/usr/bin/rustc")
        // aya-ebpf uses unstable features; Debian's stable rustc allows them with this.
        .env("RUSTC_BOOTSTRAP", "1")
        .env("PATH", path_with_cargo_bin());
    // We run under rustup's cargo: keep its toolchain choice out of Debian's cargo.
    for var in [
        "RUSTUP_TOOLCHAIN",
        "RUSTC_WRAPPER",
        "RUSTDOC",
        "CARGO_BUILD_TARGET",
        "CARGO",
    ] {
        c.env_remove(var);
    }
    println!(
        "build: eBPF side with Debian's rustc ({})",
        rustc_version()?
    );
    exec(&mut c)?;
    let built = target_dir.join("bpfel-unknown-none/release/mesh");
    let obj = object_path();
    std::fs::create_dir_all(obj.parent().unwrap())?;
    std::fs::copy(&built, &obj)
        .with_context(|| format!("copying {} to {}", built.display(), obj.display()))?;
    Ok(obj)
}

fn rustc_version() -> anyhow::Result<String> {
    Ok(
        cmd::output(Command::new("/usr/bin/rustc").arg("--version"))?
            .trim()
            .to_string(),
    )
}
