//! Docker engines for the local swarm (`cargo xtask cluster up --engine`): the system's
//! docker.io (Debian 12's 20.10), and newer Debian builds of Docker fetched from Debian's
//! archive through an apt configuration of our own (the host's sources, lists and
//! preferences are never touched), unpacked with `dpkg -x` (never installed: the host's
//! Docker stays as it is) into a cache of our own, `$MESH_ENGINES_CACHE`
//! (/var/cache/mesh-engines).
//!
//! Each engine resolves to a bin directory that goes first on its nodes' PATH: `dockerd`,
//! `containerd`, `containerd-shim-runc-v2`, `docker-proxy`, `docker-init`, `runc` and the
//! engine's own `docker` CLI. runc is always the system's (bookworm's 1.1): the newer
//! Debian runc needs glibc 2.38, this machine has 2.36. The Go binaries need glibc 2.34.
//!
//! Layout of the cache: `apt/` (sources.list, lists, apt's cache), `<engine>/root` (the
//! unpacked packages), `<engine>/bin` (relative links into root, and to the system's
//! runc), `<engine>/.mesh-complete` (what was unpacked, and each linked file's size; an
//! engine without it, or whose files no longer match it, is fetched again). An engine is
//! built in `<engine>.partial` and renamed into place when complete.

use std::{
    fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{bail, Context};

use crate::{
    apt::{lock, Apt},
    cmd::{exec, output},
};

/// The engine of a node when none is asked for: the system's docker.io.
pub const DEFAULT: &str = "20.10";

/// An engine we know how to get.
struct Spec {
    name: &'static str,
    /// Where it comes from, for messages and `cluster status`.
    what: &'static str,
    /// Debian suite of the packages (`None`: the system's installed docker.io).
    suite: Option<&'static str>,
    /// (package, version prefix it must have): the newest matching version in the suite.
    packages: &'static [(&'static str, &'static str)],
    /// (link in bin/, candidate paths inside the unpacked root, first present wins).
    links: &'static [(&'static str, &'static [&'static str])],
}

const LINKS: &[(&str, &[&str])] = &[
    ("dockerd", &["usr/sbin/dockerd", "usr/bin/dockerd"]),
    (
        "docker-proxy",
        &["usr/sbin/docker-proxy", "usr/libexec/docker/docker-proxy"],
    ),
    ("containerd", &["usr/bin/containerd"]),
    (
        "containerd-shim-runc-v2",
        &["usr/bin/containerd-shim-runc-v2"],
    ),
    ("docker-init", &["usr/bin/tini-static"]),
    ("docker", &["usr/bin/docker"]),
];

const SPECS: &[Spec] = &[
    Spec {
        name: "20.10",
        what: "the system's docker.io (Debian 12), installed by `cargo xtask setup`",
        suite: None,
        packages: &[],
        links: &[],
    },
    Spec {
        name: "28.5",
        what:
            "Debian unstable's docker.io 28.5 with containerd 2.1 and tini-static (docker-cli too)",
        suite: Some("sid"),
        packages: &[
            ("docker.io", "28.5."),
            ("docker-cli", "28.5."),
            ("containerd", "2.1."),
            ("tini-static", ""),
        ],
        links: LINKS,
    },
    Spec {
        name: "26.1",
        what: "Debian 13's docker.io 26.1 with containerd 1.7 and tini (docker-cli too)",
        suite: Some("trixie"),
        packages: &[
            ("docker.io", "26.1."),
            ("docker-cli", "26.1."),
            ("containerd", "1.7."),
            ("tini", ""),
        ],
        links: LINKS,
    },
];

/// The suites the engines come from. Lists are refreshed only when an engine is fetched.
const SOURCES: &str = "\
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian sid main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main
";

/// The key the sources above are checked with (on every Debian system).
const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

/// Marks a complete engine (written last, before the rename into place).
const COMPLETE: &str = ".mesh-complete";

/// The system's files for engine 20.10 (docker.io, containerd, tini of Debian 12).
const SYSTEM: &[(&str, &str)] = &[
    ("dockerd", "/usr/sbin/dockerd"),
    ("docker-proxy", "/usr/sbin/docker-proxy"),
    ("containerd", "/usr/bin/containerd"),
    (
        "containerd-shim-runc-v2",
        "/usr/bin/containerd-shim-runc-v2",
    ),
    ("docker-init", "/usr/bin/docker-init"),
    // Not PATH's first `docker`: a machine may have another CLI in /usr/local/bin.
    ("docker", "/usr/bin/docker"),
];

/// An engine ready to run.
#[derive(Clone, Debug)]
pub struct Engine {
    /// "20.10", "28.5", "26.1".
    pub name: String,
    /// Put first on PATH: dockerd, containerd, shim, docker-proxy, docker-init, runc, docker.
    pub bin: PathBuf,
    /// `dockerd --version`'s version ("28.5.2+dfsg4").
    pub version: String,
}

impl Engine {
    pub fn dockerd(&self) -> PathBuf {
        self.bin.join("dockerd")
    }
    pub fn cli(&self) -> PathBuf {
        self.bin.join("docker")
    }
}

/// The names `--engine` takes.
pub fn names() -> Vec<&'static str> {
    SPECS.iter().map(|s| s.name).collect()
}

/// The cache: `$MESH_ENGINES_CACHE`, else /var/cache/mesh-engines.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("MESH_ENGINES_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/mesh-engines"))
}

/// Engine `name`, fetched and unpacked first unless the cache holds it complete.
pub fn resolve(name: &str) -> anyhow::Result<Engine> {
    let spec = SPECS.iter().find(|s| s.name == name).with_context(|| {
        format!(
            "unknown Docker engine {name:?}: one of {}",
            names().join(", ")
        )
    })?;
    let cache = cache_dir();
    fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;
    if spec.suite.is_none() {
        return system(spec, &cache);
    }
    if let Some(e) = cached(spec, &cache) {
        return Ok(e);
    }
    let _lock = lock(&cache)?;
    // Another run may have fetched it while we waited for the lock.
    if let Some(e) = cached(spec, &cache) {
        return Ok(e);
    }
    fetch(spec, &cache)
}

/// The system's runc (bookworm's; Debian's newer runc needs a newer glibc).
fn system_runc() -> anyhow::Result<PathBuf> {
    ["/usr/sbin/runc", "/usr/bin/runc"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .context("runc not found (/usr/sbin/runc): run `cargo xtask setup` (docker.io brings it)")
}

/// `<bin> --version`'s first line, or why it would not run.
fn version_of(bin: &Path) -> anyhow::Result<String> {
    let out = Command::new(bin)
        .arg("--version")
        .output()
        .with_context(|| format!("running {} --version", bin.display()))?;
    if !out.status.success() {
        bail!(
            "{} --version failed ({}): {}",
            bin.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or("")
        .trim()
        .to_string())
}

/// "Docker version 28.5.2+dfsg4, build 3ef3c07" -> "28.5.2+dfsg4".
fn docker_version(line: &str) -> String {
    line.strip_prefix("Docker version ")
        .and_then(|r| r.split(',').next())
        .unwrap_or(line)
        .trim()
        .to_string()
}

/// Engine 20.10: links to the system's binaries (made afresh each time: cheap, and an
/// upgrade of the system's packages is followed).
fn system(spec: &Spec, cache: &Path) -> anyhow::Result<Engine> {
    let dockerd = Path::new("/usr/sbin/dockerd");
    if !dockerd.is_file() {
        bail!(
            "engine {}: /usr/sbin/dockerd missing: run `cargo xtask setup` (docker.io)",
            spec.name
        );
    }
    let version = docker_version(&version_of(dockerd)?);
    if !version.starts_with(&format!("{}.", spec.name)) {
        bail!(
            "engine {} is {}, but the system's dockerd is {version}: on this machine use \
             another --engine ({})",
            spec.name,
            spec.what,
            names().join(", ")
        );
    }
    let dir = cache.join(spec.name);
    let bin = dir.join("bin");
    fs::create_dir_all(&bin).with_context(|| format!("creating {}", bin.display()))?;
    let runc = system_runc()?;
    for (name, target) in SYSTEM
        .iter()
        .map(|(n, t)| (*n, PathBuf::from(t)))
        .chain([("runc", runc)])
    {
        if !target.is_file() {
            bail!(
                "engine {}: {} missing: run `cargo xtask setup` (docker.io)",
                spec.name,
                target.display()
            );
        }
        let link = bin.join(name);
        if fs::read_link(&link).ok().as_deref() != Some(target.as_path()) {
            let _ = fs::remove_file(&link);
            symlink(&target, &link).with_context(|| format!("linking {}", link.display()))?;
        }
    }
    let cli = docker_version(&version_of(&bin.join("docker"))?);
    if !cli.starts_with(&format!("{}.", spec.name)) {
        bail!(
            "engine {}: /usr/bin/docker is {cli}, not the system docker.io's CLI",
            spec.name
        );
    }
    Ok(Engine {
        name: spec.name.into(),
        bin,
        version,
    })
}

/// The engine in the cache if it is complete: its marker present and every linked file
/// of the size the marker recorded (no process is run: a hit takes milliseconds).
fn cached(spec: &Spec, cache: &Path) -> Option<Engine> {
    let dir = cache.join(spec.name);
    let marker = fs::read_to_string(dir.join(COMPLETE)).ok()?;
    let mut version = None;
    for line in marker.lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        match w.as_slice() {
            ["version", v] => version = Some(v.to_string()),
            ["file", name, size] => {
                let len = fs::metadata(dir.join("bin").join(name)).ok()?.len();
                if size.parse::<u64>().ok()? != len {
                    return None;
                }
            }
            _ => {}
        }
    }
    let incomplete = spec
        .links
        .iter()
        .map(|(n, _)| *n)
        .chain(["runc"])
        .any(|n| !marker.contains(&format!("file {n} ")));
    if incomplete {
        return None;
    }
    Some(Engine {
        name: spec.name.into(),
        bin: dir.join("bin"),
        version: version?,
    })
}

/// Downloads, unpacks, links and checks `spec` into `<cache>/<name>`.
fn fetch(spec: &Spec, cache: &Path) -> anyhow::Result<Engine> {
    let t0 = Instant::now();
    let suite = spec.suite.expect("fetched engines have a suite");
    let dir = cache.join(spec.name);
    if dir.exists() {
        println!(
            "engines: {}: {} is incomplete: fetching it again",
            spec.name,
            dir.display()
        );
    } else {
        println!(
            "engines: {}: fetching {} from deb.debian.org ({suite}) into {}",
            spec.name,
            spec.what,
            dir.display()
        );
    }
    if !Path::new(KEYRING).is_file() {
        bail!("{KEYRING} missing: the engines are fetched from Debian's archive, checked with its keys (apt-get install debian-archive-keyring)");
    }
    let apt = Apt::new(cache, SOURCES)?;
    apt.refresh("engines: refreshing the Debian package lists (sid, trixie)")
        .context("apt-get update with the engines' own sources (deb.debian.org)")?;
    let mut chosen = Vec::new();
    for (pkg, prefix) in spec.packages {
        chosen.push((*pkg, apt.newest(pkg, suite, prefix)?));
    }
    let partial = cache.join(format!("{}.partial", spec.name));
    let _ = fs::remove_dir_all(&partial);
    let debs = partial.join("debs");
    let root = partial.join("root");
    let bin = partial.join("bin");
    for d in [&debs, &root, &bin] {
        fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let wanted: Vec<String> = chosen.iter().map(|(p, v)| format!("{p}={v}")).collect();
    println!(
        "engines: {}: apt-get download {}",
        spec.name,
        wanted.join(" ")
    );
    exec(
        apt.cmd("apt-get")
            .current_dir(&debs)
            .args(["-qq", "download"])
            .args(&wanted),
    )?;
    for e in fs::read_dir(&debs).with_context(|| format!("reading {}", debs.display()))? {
        let deb = e?.path();
        exec(Command::new("dpkg").arg("-x").arg(&deb).arg(&root))?;
    }
    fs::remove_dir_all(&debs).with_context(|| format!("removing {}", debs.display()))?;
    // Relative links: the tree is renamed into place afterwards.
    let mut marker = String::new();
    for (pkg, v) in &chosen {
        marker.push_str(&format!("package {pkg} {v}\n"));
    }
    for (name, candidates) in spec.links {
        let rel = candidates
            .iter()
            .find(|c| root.join(c).is_file())
            .with_context(|| {
                format!(
                    "engine {}: none of {candidates:?} in the unpacked packages",
                    spec.name
                )
            })?;
        symlink(Path::new("../root").join(rel), bin.join(name))
            .with_context(|| format!("linking {name}"))?;
    }
    symlink(system_runc()?, bin.join("runc")).context("linking runc")?;
    // Each runs here (glibc, architecture), and the versions are what was asked for.
    let dockerd = docker_version(&version_of(&bin.join("dockerd"))?);
    let cli = docker_version(&version_of(&bin.join("docker"))?);
    let containerd = version_of(&bin.join("containerd"))?;
    version_of(&bin.join("docker-init"))?;
    let shim = Command::new(bin.join("containerd-shim-runc-v2"))
        .arg("-v")
        .output()
        .context("running containerd-shim-runc-v2 -v")?;
    if !shim.status.success() {
        bail!(
            "engine {}: containerd-shim-runc-v2 -v failed: {}",
            spec.name,
            String::from_utf8_lossy(&shim.stderr).trim()
        );
    }
    for (what, v) in [("dockerd", &dockerd), ("docker CLI", &cli)] {
        if !v.starts_with(&format!("{}.", spec.name)) {
            bail!("engine {}: the {what} unpacked is {v}", spec.name);
        }
    }
    marker.push_str(&format!("version {dockerd}\n"));
    for name in spec.links.iter().map(|(n, _)| *n).chain(["runc"]) {
        let len = fs::metadata(bin.join(name))
            .with_context(|| format!("{} in {}", name, bin.display()))?
            .len();
        marker.push_str(&format!("file {name} {len}\n"));
    }
    fs::write(partial.join(COMPLETE), marker)?;
    let _ = fs::remove_dir_all(&dir);
    fs::rename(&partial, &dir)
        .with_context(|| format!("renaming {} to {}", partial.display(), dir.display()))?;
    let size = output(Command::new("du").arg("-sh").arg(&dir))
        .ok()
        .and_then(|s| s.split_whitespace().next().map(String::from))
        .unwrap_or_else(|| "?".into());
    println!(
        "engines: {}: dockerd {dockerd}, {containerd}, runc {} (the system's); {size} in {}, fetched in {:.1} s",
        spec.name,
        system_runc()?.display(),
        dir.display(),
        t0.elapsed().as_secs_f64()
    );
    cached(spec, cache).with_context(|| {
        format!(
            "engine {}: {} incomplete right after the fetch",
            spec.name,
            dir.display()
        )
    })
}

/// What the engines need of apt beyond [`Apt`].
trait Newest {
    fn newest(&self, pkg: &str, suite: &str, prefix: &str) -> anyhow::Result<String>;
}

impl Newest for Apt {
    /// The newest version of `pkg` in `suite` starting with `prefix`.
    fn newest(&self, pkg: &str, suite: &str, prefix: &str) -> anyhow::Result<String> {
        let text = output(self.cmd("apt-cache").args(["madison", pkg]))?;
        // " docker.io | 28.5.2+dfsg4-5 | http://deb.debian.org/debian sid/main amd64 Packages"
        let all: Vec<(String, String)> = text
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split('|').map(str::trim).collect();
                let suite = f.get(2)?.split_whitespace().nth(1)?.split('/').next()?;
                Some((f.get(1)?.to_string(), suite.to_string()))
            })
            .collect();
        let mut fit: Vec<&String> = all
            .iter()
            .filter(|(v, s)| s == suite && v.starts_with(prefix))
            .map(|(v, _)| v)
            .collect();
        // Newest first, by dpkg's ordering.
        fit.sort_by(|a, b| {
            if a == b {
                std::cmp::Ordering::Equal
            } else if Command::new("dpkg")
                .args(["--compare-versions", a, "gt", b])
                .status()
                .is_ok_and(|s| s.success())
            {
                std::cmp::Ordering::Less
            } else {
                std::cmp::Ordering::Greater
            }
        });
        match fit.first() {
            Some(v) => Ok(v.to_string()),
            None => bail!(
                "Debian's {suite} has no {pkg} {prefix}x any more (it has: {}); the engine \
                 cannot be fetched (a cached one still works)",
                all.iter()
                    .map(|(v, s)| format!("{v} in {s}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_versions_parse() {
        assert_eq!(
            docker_version("Docker version 28.5.2+dfsg4, build 3ef3c07c883b"),
            "28.5.2+dfsg4"
        );
        assert_eq!(
            docker_version("Docker version 20.10.24+dfsg1, build 5d6db84"),
            "20.10.24+dfsg1"
        );
    }

    #[test]
    fn every_fetched_engine_links_what_a_node_runs() {
        for s in SPECS.iter().filter(|s| s.suite.is_some()) {
            for need in [
                "dockerd",
                "containerd",
                "containerd-shim-runc-v2",
                "docker-proxy",
                "docker-init",
                "docker",
            ] {
                assert!(s.links.iter().any(|(n, _)| *n == need), "{} {need}", s.name);
            }
        }
        assert!(names().contains(&DEFAULT));
    }
}
