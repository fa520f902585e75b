//! The private mount + PID namespace this xtask runs itself again in, and the mounts it
//! makes there (gone with it).

use std::{
    fs,
    os::unix::{fs::symlink, process::CommandExt},
    path::Path,
    process::Command,
};

use anyhow::Context;

use crate::cmd::exec;

/// Runs this xtask again as `ARGS DIR` in a private mount + PID namespace, where it is
/// PID 1: when it ends, every process and mount it made ends with it.
pub(super) fn in_namespace(args: &[&str], dir: &Path, committed: bool) -> anyhow::Result<()> {
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

/// /proc, a read-only /sys, a minimal /dev, /run, and apt's .deb cache, for `r`.
pub(super) fn mount_system(r: &Path, cache: &Path) -> anyhow::Result<()> {
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

pub(super) fn mount(args: &[&str], target: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(target).with_context(|| format!("creating {}", target.display()))?;
    exec(Command::new("mount").args(args).arg(target))
}

pub(super) fn bind(src: &Path, target: &Path, read_only: bool) -> anyhow::Result<()> {
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

pub(super) fn chmod(p: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(p, fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", p.display()))
}
