//! Running commands, with the command line in every error.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context};

/// The workspace root (xtask lives one level below it).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask has a parent directory")
        .to_path_buf()
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

fn describe(c: &Command) -> String {
    let mut s = c.get_program().to_string_lossy().into_owned();
    for a in c.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `c`, inheriting stdio; fails with the command line if it fails.
pub fn exec(c: &mut Command) -> anyhow::Result<()> {
    let what = describe(c);
    let status = c.status().with_context(|| format!("starting `{what}`"))?;
    if !status.success() {
        bail!("`{what}` failed ({status})");
    }
    Ok(())
}

/// Runs `c` and returns its stdout (stderr inherited).
pub fn output(c: &mut Command) -> anyhow::Result<String> {
    let what = describe(c);
    let out = c
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("starting `{what}`"))?;
    if !out.status.success() {
        bail!("`{what}` failed ({})", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `~/.cargo/bin` (or `$CARGO_HOME/bin`), where bpf-linker is installed.
pub fn cargo_bin_dir() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
        .join("bin")
}

/// PATH with `cargo_bin_dir()` first.
pub fn path_with_cargo_bin() -> String {
    format!(
        "{}:{}",
        cargo_bin_dir().display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

/// Builds the agent's binaries (`mesh-agent`, `meshctl`) in debug: the tests that run
/// them, on the host and in the kernel matrix's guests, find them in `target/debug`.
pub fn build_agent_bins() -> anyhow::Result<()> {
    exec(Command::new("cargo").current_dir(root()).args([
        "build",
        "--locked",
        "-p",
        "mesh-agent",
        "--bins",
    ]))
}

/// Removes `p`, a file or a directory tree.
pub fn remove_path(p: &std::path::Path) -> anyhow::Result<()> {
    use anyhow::Context;
    if p.is_dir() {
        std::fs::remove_dir_all(p)
    } else {
        std::fs::remove_file(p)
    }
    .with_context(|| format!("removing {}", p.display()))
}
