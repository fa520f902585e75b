//! The pristine Debian 12 root: the newest complete one in the cache, or a new one by
//! debootstrap (run inside the namespace), with the machine's packages.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Context;

use super::{
    cache::cache_dir,
    namespace::{chmod, in_namespace, mount_system},
    MACHINE_PKGS, MIRROR, PATH, SECURITY, SUITE,
};
use crate::cmd::{exec, output};

/// The newest complete base root younger than $MESH_FRESH_BASE_DAYS (7), or a new one.
pub(super) fn ensure_base(cache: &Path) -> anyhow::Result<(PathBuf, bool)> {
    let bases = cache.join("base");
    fs::create_dir_all(&bases)?;
    let max_age = std::env::var("MESH_FRESH_BASE_DAYS")
        .ok()
        .and_then(|d| d.parse::<u64>().ok())
        .unwrap_or(7)
        * 86_400;
    let mut complete: Vec<PathBuf> = fs::read_dir(&bases)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join(".fresh-complete").exists())
        .collect();
    complete.sort();
    if let Some(newest) = complete.last() {
        let age = fs::metadata(newest.join(".fresh-complete"))?
            .modified()?
            .elapsed()
            .unwrap_or_default();
        if age.as_secs() < max_age {
            return Ok((newest.clone(), false));
        }
    }
    let day = output(Command::new("date").args(["-u", "+%Y%m%d"]))?;
    let name = format!("{SUITE}-{}", day.trim());
    let tmp = bases.join(format!("{name}.tmp"));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).with_context(|| format!("removing {}", tmp.display()))?;
    }
    println!("fresh: making the base root {name} with debootstrap (minbase) from {MIRROR}");
    in_namespace(&["--inner", "base", "--base-dir"], &tmp, false)?;
    fs::write(tmp.join(".fresh-complete"), "")?;
    let done = bases.join(&name);
    for old in complete.iter().chain(std::iter::once(&done)) {
        if old.exists() {
            fs::remove_dir_all(old).with_context(|| format!("removing {}", old.display()))?;
        }
    }
    fs::rename(&tmp, &done)?;
    Ok((done, true))
}

/// debootstrap, the sources a real Debian 12 has, its updates, and the machine's packages.
pub(super) fn inner_base(dir: &Path) -> anyhow::Result<()> {
    let cache = cache_dir();
    let debs = cache.join("debootstrap");
    fs::create_dir_all(&debs)?;
    exec(
        Command::new("debootstrap")
            .args([
                "--variant=minbase",
                "--keyring=/usr/share/keyrings/debian-archive-keyring.gpg",
            ])
            .arg(format!("--cache-dir={}", debs.display()))
            .arg(SUITE)
            .arg(dir)
            .arg(MIRROR),
    )?;
    // apt must not start services (docker.io, iperf3...) in a chroot.
    let policy = dir.join("usr/sbin/policy-rc.d");
    fs::write(&policy, "#!/bin/sh\nexit 101\n")?;
    chmod(&policy, 0o755)?;
    let _ = fs::remove_file(dir.join("etc/apt/sources.list"));
    fs::write(
        dir.join("etc/apt/sources.list.d/debian.sources"),
        format!(
            "Types: deb\nURIs: {MIRROR}\nSuites: {SUITE} {SUITE}-updates\nComponents: main\n\
             Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n\
             Types: deb\nURIs: {SECURITY}\nSuites: {SUITE}-security\nComponents: main\n\
             Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
        ),
    )?;
    mount_system(dir, &cache)?;
    let apt = |args: &[&str]| -> anyhow::Result<()> {
        exec(
            Command::new("chroot")
                .arg(dir)
                .args(["/usr/bin/env", "-i", &format!("PATH={PATH}")])
                .arg("DEBIAN_FRONTEND=noninteractive")
                .arg("apt-get")
                .args(args),
        )
    };
    apt(&["update", "-qq"])?;
    apt(&["upgrade", "-y", "-qq"])?;
    let mut install = vec!["install", "-y", "-qq", "--no-install-recommends"];
    install.extend_from_slice(MACHINE_PKGS);
    apt(&install)
}
