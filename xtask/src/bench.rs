//! `cargo xtask bench [--quick]`: the side-by-side benchmark (not part of the tests):
//! installs what the contenders need, builds the object and the bench in release, runs
//! it as root, and writes `bench/results/<date>[-quick]/` (report.md and PNG plots);
//! `bench/results/latest` points at the newest full run.

use std::process::Command;

use anyhow::bail;

use crate::{
    build,
    cmd::{self, exec, output, root},
    setup,
};

#[derive(clap::Args)]
pub struct Bench {
    /// Fewer and shorter runs (under 5 minutes): a smoke run of the whole bench.
    #[arg(long)]
    quick: bool,
    /// Services at the large scale.
    #[arg(long, default_value_t = 10_000)]
    services: u32,
}

pub fn run(b: Bench) -> anyhow::Result<()> {
    if !cmd::is_root() {
        bail!("the bench must run as root: it loads BPF programs and creates namespaces");
    }
    setup::run()?;
    // The contenders and the plots' font.
    setup::apt_install(&[
        "haproxy",
        "nftables",
        "iptables",
        "fonts-dejavu-core",
        "wrk",
        "iperf3",
    ])?;
    let object = build::build_ebpf()?;
    exec(Command::new("cargo").current_dir(root()).args([
        "build",
        "--release",
        "--locked",
        "-p",
        "mesh-tests",
        "--bin",
        "mesh-bench",
    ]))?;
    let date = output(Command::new("date").args(["-u", "+%Y-%m-%d"]))?;
    let name = format!("{}{}", date.trim(), if b.quick { "-quick" } else { "" });
    let out = root().join("bench/results").join(&name);
    let mut c = Command::new(root().join("target/release/mesh-bench"));
    c.arg("--out")
        .arg(&out)
        .args(["--services", &b.services.to_string()]);
    if b.quick {
        c.arg("--quick");
    }
    exec(c.env("MESH_BPF_OBJECT", &object))?;
    if !b.quick {
        let latest = root().join("bench/results/latest");
        let _ = std::fs::remove_file(&latest);
        std::os::unix::fs::symlink(&name, &latest)?;
    }
    println!("bench: {}", out.join("report.md").display());
    Ok(())
}
