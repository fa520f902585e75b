//! `cargo xtask fresh-root`: README's `cargo xtask setup` then `cargo xtask build`, as
//! root, on a fresh Debian 12 root made by debootstrap from Debian's archive, with only
//! what a fresh machine of this kind has (gcc, git, CA certificates, rustup's stable
//! toolchain bound in read-only). A package installed by hand on this machine cannot make
//! it pass: nothing of the host's packages, /usr/local or ~/.cargo/bin gets in.
//!
//! How: the pristine root (cached, rebuilt when older than a week) is the lower layer of
//! an overlay whose upper layer is a tmpfs, so every run starts from it with none of
//! setup's packages installed. Everything runs in a private mount and PID namespace
//! (`unshare`): setup's bpffs mount, /proc, /sys, /dev and the overlay exist only there
//! and vanish with it, failed or not; the host's apt, packages and /sys/fs/bpf are never
//! touched. Cached between runs, under $MESH_FRESH_CACHE (default /var/cache/mesh-fresh):
//! the base root, the .deb files apt fetched (apt checks them against the signed
//! indexes), cargo's crates.io downloads, and the target directories of bpf-linker's
//! build (dropped with the base and whenever setup.rs changes) and of the build (dropped
//! with the base). The checkout is copied with fresh mtimes, so cargo rebuilds it.

use std::{
    fs,
    io::ErrorKind,
    net::{TcpStream, ToSocketAddrs},
    os::unix::{fs::symlink, process::CommandExt},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{bail, Context};

use crate::cmd::{self, exec, output, root};

const SUITE: &str = "bookworm";
const MIRROR: &str = "http://deb.debian.org/debian";
const SECURITY: &str = "http://deb.debian.org/debian-security";
/// What a fresh machine of this kind has besides a minimal Debian 12 (and rustup).
const MACHINE_PKGS: &[&str] = &["ca-certificates", "gcc", "g++", "libc6-dev", "make", "git"];
/// Where the checkout lands in the root.
const SRC: &str = "/root/mesh";
/// Target directory for `cargo install bpf-linker` (set for the setup step only).
const INSTALL_TARGET: &str = "/var/cache/fresh-cargo-install";
/// A fresh machine's PATH for root, with rustup's bin first (as ~/.cargo/env puts it).
const PATH: &str = "/root/.cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

#[derive(clap::Args)]
pub struct FreshRoot {
    /// Empty the cache first: what the first run on a new machine costs.
    #[arg(long)]
    cold: bool,
    /// Test HEAD (`git archive`) instead of the working tree (tracked and untracked,
    /// not ignored, files: what `git add -A` would commit).
    #[arg(long)]
    committed: bool,
    /// Internal: the part that runs inside the private namespace ("base" or "run").
    #[arg(long, hide = true)]
    inner: Option<String>,
    /// Internal: the base root's directory.
    #[arg(long, hide = true)]
    base_dir: Option<PathBuf>,
}

pub fn run(a: FreshRoot) -> anyhow::Result<()> {
    match (a.inner.as_deref(), &a.base_dir) {
        (Some("base"), Some(dir)) => inner_base(dir),
        (Some("run"), Some(dir)) => inner_run(dir, a.committed),
        (Some(other), _) => bail!("fresh-root: unknown inner step {other:?}"),
        (None, _) => {
            let line = if a.cold || a.committed {
                check(a.cold, a.committed)?
            } else {
                self_test()?
            };
            println!("fresh-root: {line}");
            Ok(())
        }
    }
}

/// The check as `cargo xtask test` runs it: working tree, caches kept. Returns the
/// summary line (total time, cold or cached, and the other kind's last time).
pub fn self_test() -> anyhow::Result<String> {
    check(false, false)
}

fn cache_dir() -> PathBuf {
    std::env::var_os("MESH_FRESH_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/mesh-fresh"))
}

fn check(cold: bool, committed: bool) -> anyhow::Result<String> {
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

/// One run at a time: they share the target directories.
fn lock(cache: &Path) -> anyhow::Result<fs::File> {
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

fn empty_cache(cache: &Path) -> anyhow::Result<()> {
    for e in fs::read_dir(cache)? {
        let p = e?.path();
        if p.file_name().is_some_and(|n| n == "lock") {
            continue;
        }
        crate::cmd::remove_path(&p)?;
    }
    Ok(())
}

fn dir_is_empty(p: &Path) -> bool {
    fs::read_dir(p).map_or(true, |mut d| d.next().is_none())
}

/// The newest complete base root younger than $MESH_FRESH_BASE_DAYS (7), or a new one.
fn ensure_base(cache: &Path) -> anyhow::Result<(PathBuf, bool)> {
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

/// Target directories are kept only for the same base; bpf-linker's also only for the
/// same setup.rs, since it links against setup's packages: a package setup no longer
/// installs must not hide behind an old binary. (The workspace has no -sys crate that
/// builds against Debian's -dev packages, and its crates are rebuilt on every run.)
/// Returns the names of those that start empty.
fn keep_targets_for(
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

/// Runs this xtask again as `ARGS DIR` in a private mount + PID namespace, where it is
/// PID 1: when it ends, every process and mount it made ends with it.
fn in_namespace(args: &[&str], dir: &Path, committed: bool) -> anyhow::Result<()> {
    let me = std::env::current_exe().context("locating the xtask binary")?;
    let mut c = Command::new("unshare");
    c.args([
        "--mount",
        "--propagation",
        "private",
        "--pid",
        "--fork",
        "--kill-child",
        "--mount-proc",
        "--",
    ])
    .arg(me)
    .arg("fresh-root")
    .args(args)
    .arg(dir);
    if committed {
        c.arg("--committed");
    }
    // debootstrap, chroot and mount live in sbin, which a `sudo` PATH may lack.
    c.env(
        "PATH",
        format!(
            "/usr/sbin:/usr/bin:/sbin:/bin:{}",
            std::env::var("PATH").unwrap_or_default()
        ),
    );
    // SAFETY: prctl only; if this xtask dies (timeout, ^C), unshare and its child go too.
    unsafe {
        c.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    exec(&mut c)
}

// ---- inside the namespace ----

/// debootstrap, the sources a real Debian 12 has, its updates, and the machine's packages.
fn inner_base(dir: &Path) -> anyhow::Result<()> {
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

/// The run itself: overlay on the base, the toolchain and the checkout in, then
/// README's two commands in the chroot, then the artifacts checked.
fn inner_run(base: &Path, committed: bool) -> anyhow::Result<()> {
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

/// /proc, a read-only /sys, a minimal /dev, /run, and apt's .deb cache, for `r`.
fn mount_system(r: &Path, cache: &Path) -> anyhow::Result<()> {
    mount(&["-t", "proc", "proc"], &r.join("proc"))?;
    // Read-only: sysfs is the host kernel's. Setup's bpffs mounts on top, in here only.
    mount(
        &["-t", "sysfs", "-o", "ro,nosuid,nodev,noexec", "sysfs"],
        &r.join("sys"),
    )?;
    let dev = r.join("dev");
    mount(&["-t", "tmpfs", "-o", "mode=755,nosuid", "dev"], &dev)?;
    for n in ["null", "zero", "full", "random", "urandom", "tty"] {
        fs::write(dev.join(n), "")?;
        bind(&Path::new("/dev").join(n), &dev.join(n), false)?;
    }
    fs::create_dir_all(dev.join("pts"))?;
    mount(
        &[
            "-t",
            "devpts",
            "-o",
            "newinstance,ptmxmode=0666,mode=620",
            "devpts",
        ],
        &dev.join("pts"),
    )?;
    symlink("pts/ptmx", dev.join("ptmx"))?;
    fs::create_dir_all(dev.join("shm"))?;
    mount(
        &["-t", "tmpfs", "-o", "mode=1777,nosuid,nodev", "shm"],
        &dev.join("shm"),
    )?;
    for (l, t) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        symlink(t, dev.join(l))?;
    }
    mount(
        &["-t", "tmpfs", "-o", "mode=755,nosuid,nodev", "run"],
        &r.join("run"),
    )?;
    let archives = cache.join("apt-archives");
    fs::create_dir_all(archives.join("partial"))?;
    bind(&archives, &r.join("var/cache/apt/archives"), false)?;
    let resolv = r.join("etc/resolv.conf");
    let _ = fs::remove_file(&resolv);
    fs::copy("/etc/resolv.conf", &resolv).context("copying /etc/resolv.conf into the root")?;
    Ok(())
}

/// The CAs this machine trusts beyond Debian's bundle (its network's egress proxy signs
/// crates.io's certificate with one): a fresh machine of this kind has them too.
fn machine_cas(r: &Path) -> anyhow::Result<()> {
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
fn rustup_in(r: &Path) -> anyhow::Result<()> {
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
fn checkout_into(dest: &Path, committed: bool) -> anyhow::Result<usize> {
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

fn mount(args: &[&str], target: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(target).with_context(|| format!("creating {}", target.display()))?;
    exec(Command::new("mount").args(args).arg(target))
}

fn bind(src: &Path, target: &Path, read_only: bool) -> anyhow::Result<()> {
    if !target.exists() {
        fs::create_dir_all(target)?;
    }
    fs::create_dir_all(src).ok();
    exec(Command::new("mount").arg("--bind").arg(src).arg(target))?;
    if read_only {
        exec(
            Command::new("mount")
                .args(["-o", "remount,bind,ro"])
                .arg(target),
        )?;
    }
    Ok(())
}

fn chmod(p: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(p, fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", p.display()))
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

fn mmss(secs: u64) -> String {
    format!("{}m{:02}s", secs / 60, secs % 60)
}
