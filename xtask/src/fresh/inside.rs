//! The run inside the namespace: the overlay on the base, the machine's things in,
//! README's `cargo xtask setup` and `cargo xtask build` in the chroot, then the artifacts
//! checked.

use std::{
    fs,
    path::Path,
    process::Command,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{bail, Context};

use super::{
    cache::cache_dir,
    check::mmss,
    machine::{checkout_into, machine_cas, rustup_in},
    namespace::{bind, mount, mount_system},
    INSTALL_TARGET, PATH, SRC,
};
use crate::cmd::exec;

/// The run itself: overlay on the base, the toolchain and the checkout in, then
/// README's two commands in the chroot, then the artifacts checked.
pub(super) fn inner_run(base: &Path, committed: bool) -> anyhow::Result<()> {
    let cache = cache_dir();
    let scratch = cache.join("mnt");
    fs::create_dir_all(&scratch)?;
    // The run's writes go to this tmpfs, gone when the namespace ends.
    mount(
        &["-t", "tmpfs", "-o", "mode=755,size=24g", "fresh"],
        &scratch,
    )?;
    for d in ["upper", "work", "root"] {
        fs::create_dir_all(scratch.join(d))?;
    }
    let r = scratch.join("root");
    mount(
        &[
            "-t",
            "overlay",
            "-o",
            &format!(
                "lowerdir={},upperdir={},workdir={}",
                base.display(),
                scratch.join("upper").display(),
                scratch.join("work").display()
            ),
            "overlay",
        ],
        &r,
    )?;
    let t = Instant::now();
    mount_system(&r, &cache)?;
    machine_cas(&r)?;
    rustup_in(&r)?;
    let registry = cache.join("cargo-registry");
    bind(&registry, &r.join("root/.cargo/registry"), false)?;
    let files = checkout_into(&r.join(SRC.trim_start_matches('/')), committed)?;
    bind(
        &cache.join("targets/mesh"),
        &r.join(SRC.trim_start_matches('/')).join("target"),
        false,
    )?;
    bind(
        &cache.join("targets/bpf-linker"),
        &r.join(INSTALL_TARGET.trim_start_matches('/')),
        false,
    )?;
    println!(
        "fresh: root ready in {} ({files} files of the {} at {SRC})",
        mmss(t.elapsed().as_secs()),
        if committed {
            "HEAD commit"
        } else {
            "working tree"
        }
    );

    let t = Instant::now();
    // The target dir only caches bpf-linker's build (`cargo install` honours it).
    in_chroot(
        &r,
        &["cargo", "xtask", "setup"],
        &[("CARGO_TARGET_DIR", INSTALL_TARGET)],
    )
    .context("`cargo xtask setup` failed in the fresh root")?;
    let setup = t.elapsed().as_secs();
    println!("fresh: `cargo xtask setup` passed in {}", mmss(setup));

    let built_after = SystemTime::now() - Duration::from_secs(2);
    let t = Instant::now();
    in_chroot(&r, &["cargo", "xtask", "build"], &[])
        .context("`cargo xtask build` failed in the fresh root")?;
    let build = t.elapsed().as_secs();
    println!("fresh: `cargo xtask build` passed in {}", mmss(build));

    // The target directory is cached: the files must be this run's, not a previous one's.
    let release = r.join(SRC.trim_start_matches('/')).join("target/release");
    for f in ["mesh.bpf.o", "mesh-agent", "meshctl"] {
        let p = release.join(f);
        let m = fs::metadata(&p)
            .with_context(|| format!("fresh-root: no {SRC}/target/release/{f} after the build"))?;
        if m.len() == 0 || m.modified()? < built_after {
            bail!("fresh-root: {SRC}/target/release/{f} is empty or older than this build");
        }
    }
    println!("fresh: target/release/mesh.bpf.o, mesh-agent and meshctl built in the fresh root");
    // Drop .debs no longer in the archive, so the cache does not grow forever.
    in_chroot(&r, &["apt-get", "autoclean", "-qq"], &[])?;
    fs::write(
        cache.join("phases"),
        format!("setup {}, build {}", mmss(setup), mmss(build)),
    )?;
    Ok(())
}

/// `cmd` as root in the chroot, from the checkout, with a fresh machine's environment.
fn in_chroot(r: &Path, cmd: &[&str], env: &[(&str, &str)]) -> anyhow::Result<()> {
    let term = std::env::var("TERM").unwrap_or_else(|_| "dumb".into());
    let mut c = Command::new("chroot");
    c.arg(r).args(["/usr/bin/env", "-i", "-C", SRC]).args([
        "HOME=/root".to_string(),
        "USER=root".into(),
        "LOGNAME=root".into(),
        "SHELL=/bin/bash".into(),
        "LANG=C.UTF-8".into(),
        format!("TERM={term}"),
        format!("PATH={PATH}"),
    ]);
    for (k, v) in env {
        c.arg(format!("{k}={v}"));
    }
    exec(c.args(cmd))
}
