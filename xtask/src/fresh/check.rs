//! The check as the host runs it: prerequisites and network, the base root, the run in
//! its namespace, no mount leaked, and the timing recorded beside the last cold and
//! cached runs.

use std::{
    fs,
    net::{TcpStream, ToSocketAddrs},
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context};

use super::{
    base::ensure_base,
    cache::{cache_dir, dir_is_empty, empty_cache, keep_targets_for, lock},
    namespace::in_namespace,
};
use crate::cmd::{self, output};

pub(super) fn check(cold: bool, committed: bool) -> anyhow::Result<String> {
    if !cmd::is_root() {
        bail!("fresh-root must run as root: it runs debootstrap, mounts and chroot");
    }
    for (tool, why) in [
        ("/usr/sbin/debootstrap", "`cargo xtask setup` installs it"),
        ("/usr/bin/unshare", "util-linux"),
        ("/usr/sbin/chroot", "coreutils"),
    ] {
        if !Path::new(tool).exists() {
            bail!("fresh-root: {tool} is missing ({why})");
        }
    }
    for (host, port, what) in [
        ("deb.debian.org", 80, "Debian's archive"),
        ("index.crates.io", 443, "crates.io"),
    ] {
        reachable(host, port).with_context(|| {
            format!(
                "fresh-root: no network to {what} ({host}:{port}); the fresh root installs from it"
            )
        })?;
    }
    let cache = cache_dir();
    fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;
    let _lock = lock(&cache)?;
    if cold {
        println!("fresh: --cold: emptying {}", cache.display());
        empty_cache(&cache)?;
    }
    let t0 = Instant::now();
    let fully_cold = !cache.join("base").exists()
        && dir_is_empty(&cache.join("apt-archives"))
        && dir_is_empty(&cache.join("cargo-registry"));

    let tb = Instant::now();
    let (base, built) = ensure_base(&cache)?;
    let base_secs = tb.elapsed().as_secs();
    println!(
        "fresh: base {} {} in {}",
        base.file_name().unwrap().to_string_lossy(),
        if built { "built" } else { "cached" },
        mmss(base_secs)
    );
    let mut rebuilt: Vec<&str> = if built { vec!["base"] } else { vec![] };
    rebuilt.extend(keep_targets_for(&cache, &base, committed)?);

    let _ = fs::remove_file(cache.join("phases"));
    let r = in_namespace(&["--inner", "run", "--base-dir"], &base, committed).context(
        "fresh-root: setup + build failed in the fresh Debian 12 root (its error is above)",
    );
    // The overlay, tmpfs and bind mounts lived in the namespace only: none may show here.
    let leaked = mounts_under(&cache)?;
    if !leaked.is_empty() {
        bail!(
            "fresh-root: mounts leaked onto the host: {}",
            leaked.join(", ")
        );
    }
    r?;
    let total = t0.elapsed().as_secs();
    let phases = fs::read_to_string(cache.join("phases")).unwrap_or_default();
    // Only the two ends are recorded: a run that rebuilt part of the cache is neither.
    let kind = if fully_cold {
        record(&cache, "cold", total)?;
        "cold".to_string()
    } else if rebuilt.is_empty() {
        record(&cache, "cached", total)?;
        "cached".to_string()
    } else {
        format!("partly cached ({} rebuilt)", rebuilt.join(", "))
    };
    let others = ["cold", "cached"]
        .iter()
        .filter(|k| **k != kind)
        .map(|k| match recorded(&cache, k) {
            Some((secs, day)) => format!("last {k} run {} ({day})", mmss(secs)),
            None => format!("no {k} run recorded"),
        })
        .collect::<Vec<_>>()
        .join(", ");
    println!("fresh: cache {} holds {}", cache.display(), du(&cache));
    Ok(format!(
        "setup + build on a fresh Debian 12 root passed in {} {kind} (base {}, {}); {others}",
        mmss(total),
        mmss(base_secs),
        phases.trim()
    ))
}

fn reachable(host: &str, port: u16) -> anyhow::Result<()> {
    let addrs: Vec<_> = (host, port)
        .to_socket_addrs()
        .with_context(|| format!("resolving {host}"))?
        .collect();
    let mut last = None;
    for a in addrs {
        match TcpStream::connect_timeout(&a, Duration::from_secs(10)) {
            Ok(_) => return Ok(()),
            Err(e) => last = Some(e),
        }
    }
    match last {
        Some(e) => Err(e.into()),
        None => bail!("{host} has no address"),
    }
}

/// Mount points under `dir` as the host sees them.
fn mounts_under(dir: &Path) -> anyhow::Result<Vec<String>> {
    let dir = fs::canonicalize(dir)?;
    let mounts = fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
    Ok(mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|m| Path::new(m).starts_with(&dir))
        .map(String::from)
        .collect())
}

/// Remembers the last cold and cached totals, to print them side by side.
fn record(cache: &Path, kind: &str, secs: u64) -> anyhow::Result<()> {
    let day = output(Command::new("date").args(["-u", "+%Y-%m-%d"]))?;
    fs::write(
        cache.join(format!("last-{kind}")),
        format!("{secs} {}", day.trim()),
    )?;
    Ok(())
}

fn recorded(cache: &Path, kind: &str) -> Option<(u64, String)> {
    let s = fs::read_to_string(cache.join(format!("last-{kind}"))).ok()?;
    let (secs, day) = s.trim().split_once(' ')?;
    Some((secs.parse().ok()?, day.to_string()))
}

fn du(p: &Path) -> String {
    output(Command::new("du").args(["-sh"]).arg(p))
        .ok()
        .and_then(|s| s.split_whitespace().next().map(String::from))
        .unwrap_or_else(|| "?".into())
}

pub(super) fn mmss(secs: u64) -> String {
    format!("{}m{:02}s", secs / 60, secs % 60)
}
