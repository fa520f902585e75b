//! What a fresh machine of this kind brings into the root: its own CAs, rustup's
//! toolchain (read-only, with nothing else of ~/.cargo/bin), and the checkout.

use std::{
    fs,
    io::ErrorKind,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Context;

use super::{namespace::bind, PATH};
use crate::cmd::{exec, output, root};

/// The CAs this machine trusts beyond Debian's bundle (its network's egress proxy signs
/// crates.io's certificate with one): a fresh machine of this kind has them too.
pub(super) fn machine_cas(r: &Path) -> anyhow::Result<()> {
    let mut found = Vec::new();
    for dir in ["/usr/local/share/ca-certificates", "/etc/ssl/certs"] {
        let Ok(entries) = fs::read_dir(dir) else {
            continue;
        };
        for e in entries {
            let p = e?.path();
            let name = p
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            let is_cert = name.ends_with(".crt") || name.ends_with(".pem");
            // In /etc/ssl/certs, the package's certificates are symlinks; plain files
            // were put there by the machine (snakeoil is ssl-cert's own host key pair).
            if !is_cert
                || p.is_symlink()
                || name == "ca-certificates.crt"
                || name.starts_with("ssl-cert-snakeoil")
            {
                continue;
            }
            let stem = name.trim_end_matches(".crt").trim_end_matches(".pem");
            let to = r
                .join("usr/local/share/ca-certificates")
                .join(format!("{stem}.crt"));
            fs::create_dir_all(to.parent().unwrap())?;
            fs::copy(&p, &to).with_context(|| format!("copying {}", p.display()))?;
            if !found.iter().any(|f| f == stem) {
                found.push(stem.to_string());
            }
        }
    }
    if found.is_empty() {
        return Ok(());
    }
    println!("fresh: the machine's own CAs: {}", found.join(" "));
    exec(
        Command::new("chroot")
            .arg(r)
            .args(["/usr/bin/env", "-i", &format!("PATH={PATH}")])
            .args(["update-ca-certificates", "--fresh"])
            .stdout(std::process::Stdio::null()),
    )
}

/// rustup's default toolchain read-only, and ~/.cargo/bin with rustup's proxies only
/// (nothing else from the host's ~/.cargo/bin, e.g. no bpf-linker).
pub(super) fn rustup_in(r: &Path) -> anyhow::Result<()> {
    let home = PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()));
    let rustup = std::env::var_os("RUSTUP_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| home.join(".rustup"));
    let cargo = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| home.join(".cargo"));
    let settings = fs::read_to_string(rustup.join("settings.toml"))
        .with_context(|| format!("reading {}/settings.toml", rustup.display()))?;
    let toolchain = settings
        .lines()
        .find_map(|l| l.strip_prefix("default_toolchain = "))
        .map(|v| v.trim().trim_matches('"').to_string())
        .context("rustup has no default toolchain")?;
    let rr = r.join("root/.rustup");
    fs::create_dir_all(&rr)?;
    fs::write(rr.join("settings.toml"), &settings)?;
    let src = fs::canonicalize(rustup.join("toolchains").join(&toolchain))
        .with_context(|| format!("rustup toolchain {toolchain}"))?;
    bind(&src, &rr.join("toolchains").join(&toolchain), true)?;

    let bin = r.join("root/.cargo/bin");
    fs::create_dir_all(&bin)?;
    fs::copy(cargo.join("bin/rustup"), bin.join("rustup")).context("copying rustup")?;
    let mut left_out = Vec::new();
    for e in fs::read_dir(cargo.join("bin"))? {
        let e = e?;
        let name = e.file_name();
        if name == "rustup" {
            continue;
        }
        match fs::read_link(e.path()) {
            Ok(t) if t.file_name().is_some_and(|n| n == "rustup") => {
                symlink("rustup", bin.join(&name))?
            }
            _ => left_out.push(name.to_string_lossy().into_owned()),
        }
    }
    if cargo.join("env").exists() {
        fs::copy(cargo.join("env"), r.join("root/.cargo/env"))?;
    }
    println!(
        "fresh: rustup toolchain {toolchain} bound in read-only; left out of ~/.cargo/bin: {}",
        if left_out.is_empty() {
            "nothing".into()
        } else {
            left_out.join(" ")
        }
    );
    Ok(())
}

/// Copies the checkout to `dest` with fresh mtimes (so cargo rebuilds it over a cached
/// target directory). Returns the number of files.
pub(super) fn checkout_into(dest: &Path, committed: bool) -> anyhow::Result<usize> {
    fs::create_dir_all(dest)?;
    let repo = root();
    if committed {
        let tar = dest.with_extension("tar");
        exec(
            Command::new("git")
                .arg("-C")
                .arg(&repo)
                .args(["archive", "--format=tar", "-o"])
                .arg(&tar)
                .arg("HEAD"),
        )?;
        exec(
            Command::new("tar")
                .args(["-x", "-m", "-f"])
                .arg(&tar)
                .arg("-C")
                .arg(dest),
        )?;
        fs::remove_file(&tar)?;
        let list = output(Command::new("git").arg("-C").arg(&repo).args([
            "ls-tree",
            "-r",
            "--name-only",
            "HEAD",
        ]))?;
        return Ok(list.lines().count());
    }
    let list = output(Command::new("git").arg("-C").arg(&repo).args([
        "ls-files",
        "-z",
        "--cached",
        "--others",
        "--exclude-standard",
    ]))?;
    let mut n = 0;
    for rel in list.split('\0').filter(|s| !s.is_empty()) {
        let from = repo.join(rel);
        let to = dest.join(rel);
        let meta = match fs::symlink_metadata(&from) {
            Ok(m) => m,
            Err(e) if e.kind() == ErrorKind::NotFound => continue, // deleted, not yet committed
            Err(e) => return Err(e).with_context(|| format!("reading {}", from.display())),
        };
        if let Some(parent) = to.parent() {
            fs::create_dir_all(parent)?;
        }
        if meta.file_type().is_symlink() {
            symlink(fs::read_link(&from)?, &to)?;
        } else if meta.is_file() {
            fs::copy(&from, &to).with_context(|| format!("copying {}", from.display()))?;
        } else {
            continue; // a submodule's directory
        }
        n += 1;
    }
    Ok(n)
}
