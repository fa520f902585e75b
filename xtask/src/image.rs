//! `cargo xtask image`: the agent's container image, `mesh/agent:latest`, made from the
//! release binaries by `docker import` (no registry, no base image to download): the two
//! binaries (stripped), the eBPF object where the agent looks for it, and the few shared
//! libraries they link (found by ldd), nothing else.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context};

use crate::cmd::{self, output};

pub const TAG: &str = "mesh/agent:latest";

/// The image's configuration (`docker import --change`): the agent follows the local
/// Swarm; deploy/mesh-stack.yml adds the mounts, capabilities and health check.
const CHANGES: &[&str] = &[
    "ENV PATH=/usr/local/bin:/usr/bin:/bin",
    "ENTRYPOINT [\"/usr/local/bin/mesh-agent\"]",
    "CMD [\"--from-docker\"]",
];

#[derive(clap::Args)]
pub struct Image {
    /// The dockerd to import into (repeatable); default the local one.
    #[arg(long)]
    docker: Vec<String>,
    /// Import into every node of the local cluster (`cargo xtask cluster up`).
    #[arg(long)]
    cluster: bool,
    /// Also write the image's root filesystem as a tar here (to `docker import` it on
    /// other nodes with the `--change` lines this command prints).
    #[arg(long)]
    tar: Option<PathBuf>,
}

pub fn run(a: Image) -> anyhow::Result<()> {
    let mut hosts = a.docker;
    if a.cluster {
        hosts.extend(crate::cluster::node_socks()?);
    }
    if hosts.is_empty() && a.tar.is_none() {
        hosts.push("unix:///var/run/docker.sock".into());
    }
    let dir = crate::cluster::tempdir("mesh-image")?;
    let r = (|| {
        let root = rootfs(&dir)?;
        if let Some(t) = &a.tar {
            cmd::exec(
                Command::new("tar")
                    .args(["-C", &root.to_string_lossy(), "-cf"])
                    .arg(t)
                    .arg("."),
            )?;
            println!(
                "image: root filesystem in {}; on another node:",
                t.display()
            );
            let changes: Vec<String> = CHANGES.iter().map(|c| format!("--change '{c}'")).collect();
            println!(
                "  docker import {} {} {TAG}",
                changes.join(" "),
                t.display()
            );
        }
        for h in &hosts {
            import(&root, h)?;
            println!("image: {TAG} imported into {h}");
        }
        anyhow::Ok(())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    r
}

/// Imports the image into every dockerd in `hosts`, building it once.
pub fn import_into(hosts: &[String]) -> anyhow::Result<()> {
    let dir = crate::cluster::tempdir("mesh-image")?;
    let r = rootfs(&dir).and_then(|root| hosts.iter().try_for_each(|h| import(&root, h)));
    let _ = std::fs::remove_dir_all(&dir);
    r
}

fn import(root: &Path, host: &str) -> anyhow::Result<()> {
    let tar = Command::new("tar")
        .args(["-C", &root.to_string_lossy(), "-c", "."])
        .stdout(Stdio::piped())
        .spawn()?;
    let mut c = Command::new("docker");
    c.args(["-H", host, "import"]);
    for ch in CHANGES {
        c.args(["--change", ch]);
    }
    let rev = output(Command::new("git").arg("-C").arg(cmd::root()).args([
        "rev-parse",
        "--short",
        "HEAD",
    ]))
    .unwrap_or_default();
    if !rev.trim().is_empty() {
        c.args([
            "--change",
            &format!("LABEL org.opencontainers.image.revision={}", rev.trim()),
        ]);
    }
    let st = c
        .args(["-", TAG])
        .stdin(tar.stdout.context("tar stdout")?)
        .stdout(Stdio::null())
        .status()
        .context("running docker import")?;
    if !st.success() {
        bail!("importing {TAG} into the dockerd at {host} failed");
    }
    Ok(())
}

/// The image's root filesystem under `dir`.
fn rootfs(dir: &Path) -> anyhow::Result<PathBuf> {
    let (agent, object) = crate::cluster::agent_paths();
    let meshctl = agent.with_file_name("meshctl");
    for f in [&agent, &meshctl, &object] {
        if !f.is_file() {
            bail!("{} missing: run `cargo xtask build` first", f.display());
        }
    }
    let r = dir.join("rootfs");
    for d in [
        "usr/local/bin",
        "usr/local/lib/mesh",
        "etc/mesh",
        "run/mesh",
        "tmp",
        "sys",
        "proc",
        "dev",
    ] {
        std::fs::create_dir_all(r.join(d))?;
    }
    for bin in [&agent, &meshctl] {
        let to = r
            .join("usr/local/bin")
            .join(bin.file_name().context("binary name")?);
        cmd::exec(Command::new("strip").arg("-o").arg(&to).arg(bin))?;
        for lib in shared_libs(bin)? {
            let to = r.join(lib.strip_prefix("/")?);
            if !to.exists() {
                std::fs::create_dir_all(to.parent().context("library directory")?)?;
                // Copies the file a symlink points to: the image has no other.
                std::fs::copy(&lib, &to).with_context(|| format!("copying {}", lib.display()))?;
            }
        }
    }
    std::fs::copy(&object, r.join("usr/local/lib/mesh/mesh.bpf.o"))?;
    std::fs::write(
        r.join("etc/passwd"),
        "root:x:0:0:root:/:/usr/local/bin/meshctl\n",
    )?;
    Ok(r)
}

/// The shared libraries `bin` loads, as ldd resolves them (the loader included).
fn shared_libs(bin: &Path) -> anyhow::Result<Vec<PathBuf>> {
    Ok(parse_ldd(&output(Command::new("ldd").arg(bin))?))
}

fn parse_ldd(text: &str) -> Vec<PathBuf> {
    text.lines()
        .filter_map(|l| {
            let l = l.trim();
            let path = match l.split_once("=>") {
                Some((_, right)) => right.trim(),
                None => l,
            };
            let path = path.split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

#[cfg(test)]
#[test]
fn ldd_output_gives_every_library_and_the_loader() {
    let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x1)\n\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x2)\n\t/lib64/ld-linux-x86-64.so.2 (0x3)\n";
    assert_eq!(
        parse_ldd(text),
        vec![
            PathBuf::from("/lib/x86_64-linux-gnu/libgcc_s.so.1"),
            PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
            PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
        ]
    );
}
