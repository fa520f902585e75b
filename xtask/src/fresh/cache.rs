//! The cache under $MESH_FRESH_CACHE: one run at a time, emptied by `--cold`, and the
//! target directories kept only while their base (and setup.rs) stay the same.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context};

use crate::cmd::{output, root};

pub(super) fn cache_dir() -> PathBuf {
    std::env::var_os("MESH_FRESH_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/mesh-fresh"))
}

/// One run at a time: they share the target directories.
pub(super) fn lock(cache: &Path) -> anyhow::Result<fs::File> {
    use std::os::fd::AsRawFd;
    let f = fs::File::create(cache.join("lock"))?;
    // SAFETY: flock on a file descriptor we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        bail!(
            "fresh-root: another run holds {}",
            cache.join("lock").display()
        );
    }
    Ok(f)
}

pub(super) fn empty_cache(cache: &Path) -> anyhow::Result<()> {
    for e in fs::read_dir(cache)? {
        let p = e?.path();
        if p.file_name().is_some_and(|n| n == "lock") {
            continue;
        }
        crate::cmd::remove_path(&p)?;
    }
    Ok(())
}

pub(super) fn dir_is_empty(p: &Path) -> bool {
    fs::read_dir(p).map_or(true, |mut d| d.next().is_none())
}

/// Target directories are kept only for the same base; bpf-linker's also only for the
/// same setup.rs, since it links against setup's packages: a package setup no longer
/// installs must not hide behind an old binary. (The workspace has no -sys crate that
/// builds against Debian's -dev packages, and its crates are rebuilt on every run.)
/// Returns the names of those that start empty.
pub(super) fn keep_targets_for(
    cache: &Path,
    base: &Path,
    committed: bool,
) -> anyhow::Result<Vec<&'static str>> {
    let targets = cache.join("targets");
    // The setup.rs that will run: HEAD's or the working tree's.
    let setup = if committed {
        output(
            Command::new("git")
                .arg("-C")
                .arg(root())
                .args(["show", "HEAD:xtask/src/setup.rs"]),
        )?
    } else {
        fs::read_to_string(root().join("xtask/src/setup.rs"))?
    };
    let base = base.display().to_string();
    let mut reset = Vec::new();
    for (dir, key) in [
        ("mesh", base.clone()),
        ("bpf-linker", format!("{base}\n{setup}")),
    ] {
        let key_file = targets.join(format!("{dir}.key"));
        if fs::read_to_string(&key_file).ok().as_deref() == Some(key.as_str()) {
            continue;
        }
        let d = targets.join(dir);
        if d.exists() {
            println!("fresh: new base or setup.rs: target directory {dir} starts empty");
            fs::remove_dir_all(&d).with_context(|| format!("removing {}", d.display()))?;
        }
        fs::create_dir_all(&d)?;
        fs::write(&key_file, key)?;
        reset.push(dir);
    }
    Ok(reset)
}
