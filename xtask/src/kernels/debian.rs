//! Debian's own kernel packages, from the Debian archive through apt with a configuration
//! of our own (the host's sources, lists and preferences are never touched), unpacked with
//! `dpkg -x` (never installed) into a cache that later runs reuse.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context};

use crate::{
    apt::{lock, Apt},
    cmd::{exec, output},
};

/// A kernel series of the matrix: the newest `linux-image-<prefix>N<suffix>` (N all
/// digits) in the suites below is the one booted.
pub struct Series {
    pub name: &'static str,
    /// Where Swarm users meet it.
    pub distro: &'static str,
    prefix: &'static str,
    suffix: &'static str,
}

pub const SERIES: [Series; 3] = [
    Series {
        name: "5.10",
        distro: "Debian 11",
        prefix: "linux-image-5.10.0-",
        suffix: "-amd64",
    },
    // Digits only between prefix and suffix: bullseye's backport 6.1.0-0.deb11.N is not
    // Debian 12's kernel.
    Series {
        name: "6.1",
        distro: "Debian 12",
        prefix: "linux-image-6.1.0-",
        suffix: "-amd64",
    },
    Series {
        name: "6.12",
        distro: "Debian 13",
        prefix: "linux-image-6.12.",
        suffix: "+deb13-amd64",
    },
];

/// The suites holding those series' newest images (security updates included).
const SOURCES: &str = "\
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian-security bullseye-security main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian-security bookworm-security main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian-security trixie-security main
";

/// Marks a completely unpacked tree (an interrupted `dpkg -x` leaves none).
const COMPLETE: &str = ".mesh-complete";

/// An unpacked kernel package.
pub struct Kernel {
    pub series: &'static str,
    pub distro: &'static str,
    pub package: String,
    /// The package version (e.g. 6.1.192-3).
    pub version: String,
    /// `uname -r` of the kernel (e.g. 6.1.0-57-amd64).
    pub release: String,
    pub vmlinuz: PathBuf,
    /// `lib/modules/<release>` of the unpacked package.
    pub modules: PathBuf,
}

/// The cache: `$MESH_KERNELS_CACHE`, else /var/cache/mesh-kernels.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("MESH_KERNELS_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/mesh-kernels"))
}

/// The newest kernel of each series, downloaded and unpacked unless cached.
pub fn fetch(series: &[&'static Series]) -> anyhow::Result<Vec<Kernel>> {
    let cache = cache_dir();
    let apt = Apt::new(&cache, SOURCES)?;
    let _lock = lock(&cache)?;
    let fresh = apt.refresh(
        "kernels: refreshing the Debian package lists (bullseye-security, bookworm, trixie)",
    );
    if let Err(e) = &fresh {
        println!("kernels: apt-get update failed ({e:#}); using the cache");
    }
    let mut kernels = Vec::new();
    for s in series {
        let newest = match &fresh {
            Ok(()) => apt.newest(s)?,
            Err(_) => None,
        };
        let kernel = match newest {
            Some(pkg) => match unpacked(&cache, s, &pkg) {
                Some(k) => k,
                None => download_and_unpack(&apt, &cache, s, &pkg)?,
            },
            None => match newest_cached(&cache, s) {
                Some(k) => {
                    let why = fresh.as_ref().err().map_or_else(
                        || "the archive lists none".to_string(),
                        |e| format!("{e:#}"),
                    );
                    println!("kernels: {}: using cached {} ({why})", s.name, k.package);
                    k
                }
                None => match &fresh {
                    Err(e) => bail!(
                        "no {} kernel cached, and the archive is unreachable: {e:#}",
                        s.name
                    ),
                    Ok(()) => bail!(
                        "the Debian archive lists no {}N{} package",
                        s.prefix,
                        s.suffix
                    ),
                },
            },
        };
        kernels.push(kernel);
    }
    Ok(kernels)
}

/// What the kernel matrix needs of apt beyond [`Apt`].
trait Newest {
    fn newest(&self, s: &Series) -> anyhow::Result<Option<String>>;
}

impl Newest for Apt {
    /// The newest package of `s` the lists hold.
    fn newest(&self, s: &Series) -> anyhow::Result<Option<String>> {
        let names = output(self.cmd("apt-cache").args(["pkgnames", s.prefix]))?;
        Ok(names
            .lines()
            .filter_map(|n| Some((s.number(n)?, n)))
            .max()
            .map(|(_, n)| n.to_string()))
    }
}

impl Series {
    /// N of `<prefix>N<suffix>`, for a package name of this series.
    fn number(&self, package: &str) -> Option<u64> {
        let n = package
            .strip_prefix(self.prefix)?
            .strip_suffix(self.suffix)?;
        if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        n.parse().ok()
    }
}

fn download_and_unpack(
    apt: &Apt,
    cache: &Path,
    s: &'static Series,
    pkg: &str,
) -> anyhow::Result<Kernel> {
    let debs = cache.join("debs");
    fs::create_dir_all(&debs).with_context(|| format!("creating {}", debs.display()))?;
    let deb = match find_deb(&debs, pkg)? {
        Some(d) => d,
        None => {
            println!("kernels: {}: downloading {pkg}", s.name);
            exec(
                apt.cmd("apt-get")
                    .current_dir(&debs)
                    .args(["-qq", "download", pkg]),
            )?;
            find_deb(&debs, pkg)?.with_context(|| {
                format!("apt-get download {pkg} left no .deb in {}", debs.display())
            })?
        }
    };
    let version = deb
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix(&format!("{pkg}_")))
        .and_then(|n| n.split('_').next())
        .unwrap_or("?")
        .replace("%3a", ":");
    let tree = cache.join(pkg);
    let partial = cache.join(format!("{pkg}.partial"));
    let _ = fs::remove_dir_all(&partial);
    println!("kernels: {}: unpacking {} (dpkg -x)", s.name, deb.display());
    exec(Command::new("dpkg").arg("-x").arg(&deb).arg(&partial))?;
    fs::write(partial.join(COMPLETE), format!("{pkg} {version}\n"))?;
    let _ = fs::remove_dir_all(&tree);
    fs::rename(&partial, &tree)
        .with_context(|| format!("renaming {} to {}", partial.display(), tree.display()))?;
    prune(cache, s, pkg)?;
    unpacked(cache, s, pkg)
        .with_context(|| format!("{} unpacked, but holds no kernel", tree.display()))
}

fn find_deb(debs: &Path, pkg: &str) -> anyhow::Result<Option<PathBuf>> {
    let prefix = format!("{pkg}_");
    for e in fs::read_dir(debs).with_context(|| format!("reading {}", debs.display()))? {
        let p = e?.path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with(&prefix) && name.ends_with(".deb") {
            return Ok(Some(p));
        }
    }
    Ok(None)
}

/// Removes older trees and .debs of the series: the cache holds one kernel per series.
fn prune(cache: &Path, s: &Series, keep: &str) -> anyhow::Result<()> {
    for dir in [cache.to_path_buf(), cache.join("debs")] {
        for e in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let p = e?.path();
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            let pkg = name.split('_').next().unwrap_or("");
            if s.number(pkg).is_some() && pkg != keep {
                println!("kernels: {}: removing the older {}", s.name, p.display());
                crate::cmd::remove_path(&p)?;
            }
        }
    }
    Ok(())
}

/// The newest completely unpacked kernel of `s` in the cache.
fn newest_cached(cache: &Path, s: &'static Series) -> Option<Kernel> {
    let mut pkgs: Vec<(u64, String)> = fs::read_dir(cache)
        .ok()?
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            Some((s.number(&name)?, name))
        })
        .collect();
    pkgs.sort();
    pkgs.into_iter()
        .rev()
        .find_map(|(_, pkg)| unpacked(cache, s, &pkg))
}

/// The kernel unpacked at `<cache>/<pkg>`, if complete.
fn unpacked(cache: &Path, s: &'static Series, pkg: &str) -> Option<Kernel> {
    let tree = cache.join(pkg);
    let marker = fs::read_to_string(tree.join(COMPLETE)).ok()?;
    let version = marker.split_whitespace().nth(1).unwrap_or("?").to_string();
    let vmlinuz = fs::read_dir(tree.join("boot"))
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })?;
    let release = vmlinuz
        .file_name()?
        .to_str()?
        .strip_prefix("vmlinuz-")?
        .to_string();
    // Debian 13 ships its modules under /usr (merged /usr).
    let modules = ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|d| tree.join(d).join(&release))
        .find(|d| d.is_dir())?;
    Some(Kernel {
        series: s.name,
        distro: s.distro,
        package: pkg.to_string(),
        version,
        release,
        vmlinuz,
        modules,
    })
}
