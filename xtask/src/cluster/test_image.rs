//! The test image `mesh-test/busybox:latest`: busybox-static (httpd, nc, sh, the
//! /cgi-bin/who page) plus `udp-who`, imported into a dockerd by `docker import`.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context};

use super::layout::ST;
use crate::cmd::{exec, output};

pub const IMAGE: &str = "mesh-test/busybox:latest";

/// `docker import` of the test image from `rootfs` into the dockerd at `host`, with the
/// docker CLI `cli`.
pub(super) fn import_image(rootfs: &Path, cli: &Path, host: &str) -> anyhow::Result<()> {
    let tar = Command::new("tar")
        .args(["-C", &rootfs.to_string_lossy(), "-c", "."])
        .stdout(Stdio::piped())
        .spawn()?;
    let st = Command::new(cli)
        .args(["-H", host, "import", "-", IMAGE])
        .stdin(tar.stdout.context("tar stdout")?)
        .stdout(Stdio::null())
        .status()?;
    if !st.success() {
        bail!("importing {IMAGE} into the dockerd at {host} failed");
    }
    Ok(())
}

pub(super) fn make_rootfs() -> anyhow::Result<PathBuf> {
    rootfs_in(Path::new(ST))
}

pub(super) fn rootfs_in(dir: &Path) -> anyhow::Result<PathBuf> {
    let r = dir.join("bbroot");
    let bb = Path::new("/bin/busybox");
    if !bb.exists() {
        bail!("/bin/busybox (busybox-static) missing: run `cargo xtask setup`");
    }
    for d in ["bin", "www/cgi-bin", "etc", "tmp"] {
        std::fs::create_dir_all(r.join(d))?;
    }
    std::fs::copy(bb, r.join("bin/busybox"))?;
    let list = output(Command::new(bb).arg("--list"))?;
    for a in list.lines().filter(|a| *a != "busybox") {
        let _ = std::os::unix::fs::symlink("busybox", r.join("bin").join(a));
    }
    std::fs::write(r.join("www/index.html"), "ok\n")?;
    // GET /cgi-bin/who: the answering container's hostname and the client address it
    // sees (tests check that the mesh keeps the client's IP).
    let who = r.join("www/cgi-bin/who");
    std::fs::write(
        &who,
        "#!/bin/sh\nprintf 'Content-Type: text/plain\\r\\n\\r\\n%s %s\\n' \"$(hostname)\" \"$REMOTE_ADDR\"\n",
    )?;
    std::fs::set_permissions(&who, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    // `udp-who PORT`: the same answer over UDP (busybox has no UDP server), std only,
    // linked statically so the image needs no libraries.
    let src = crate::cmd::root().join("xtask/fixtures/udp_who.rs");
    exec(
        Command::new("rustc")
            .args([
                "-O",
                "-C",
                "target-feature=+crt-static",
                "--edition",
                "2021",
                "-o",
            ])
            .arg(r.join("bin/udp-who"))
            .arg(&src),
    )
    .context("building the test image's udp-who")?;
    Ok(r)
}
