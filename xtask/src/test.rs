//! `cargo xtask test`: setup, build, then the three tiers.
//!
//! 1. host unit tests (no root): layouts, parser, checksums, fixture table vs the parser;
//! 2. the fixture table through BPF_PROG_TEST_RUN on the XDP and TC entry points;
//! 3. real traffic across network namespaces with the programs attached;
//!
//! then the kernel matrix (Debian's 5.10, 6.1 and 6.12 under qemu, `kernels`), and the
//! real swarms.
//!
//! Without root, tiers 2 and 3 skip with a printed reason; under `CI=true` a missing
//! privileged prerequisite fails the run instead.

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
};

use anyhow::{bail, Context};

use crate::{
    build,
    cmd::{self, exec, root},
    setup,
};

pub fn run() -> anyhow::Result<()> {
    let privileged = cmd::is_root();
    if privileged {
        setup::run()?;
    } else if cmd::in_ci() {
        bail!("CI=true and not root: tiers 2 and 3 need root (BPF, network namespaces); run `cargo xtask test` as root");
    } else {
        println!("test: not root: skipping setup; tiers 2 and 3 will report themselves skipped");
    }

    let object = match build::build_ebpf() {
        Ok(o) => Some(o),
        Err(e) if !privileged && !cmd::in_ci() => {
            println!("test: eBPF build skipped: {e:#}");
            None
        }
        Err(e) => return Err(e),
    };
    if let (Some(obj), true) = (&object, privileged) {
        verify_with_bpftool(obj)?;
    }

    let mut summary = Vec::new();
    // Every program's deepest call chain against the verifier's 512 bytes, by each
    // kernel's rounding: under 64 bytes of headroom anywhere fails the run.
    if let Some(obj) = &object {
        println!("\n== stack: the deepest call chain of every program ==");
        for line in crate::stack::check(obj, crate::stack::MIN_HEADROOM)? {
            println!("{line}");
            summary.push(format!("  {line}"));
        }
    }
    // A fresh Debian 12 root runs README's setup and build from nothing: what this
    // machine has installed by hand cannot stand in for what setup installs.
    if privileged {
        println!("\n== fresh root: setup and build on a fresh Debian 12 ==");
        let line = crate::fresh::self_test()?;
        println!("fresh-root: {line}");
        summary.push(format!("  fresh-root: {line}"));
    } else {
        summary.push("  SKIP fresh-root: not root".into());
    }
    println!("\n== tier 1: host unit tests ==");
    cargo_test(
        &["--workspace", "--exclude", "mesh-tests"],
        &[],
        object.as_deref(),
        &mut summary,
    )?;
    cargo_test(
        &["-p", "mesh-tests", "--lib"],
        &[],
        object.as_deref(),
        &mut summary,
    )?;
    println!("\n== tier 1: coverage-guided fuzzing, a short run of each target ==");
    fuzz_briefly(&mut summary)?;
    println!("\n== tier 2: fixture tables through BPF_PROG_TEST_RUN ==");
    cargo_test(
        &[
            "-p",
            "mesh-tests",
            "--test",
            "fixtures",
            "--test",
            "lb_fixtures",
        ],
        &["--nocapture", "--test-threads", "1"],
        object.as_deref(),
        &mut summary,
    )?;
    println!("\n== tier 3: real traffic across network namespaces ==");
    // The agent test runs the real binaries.
    cmd::build_agent_bins()?;
    cargo_test(
        &[
            "-p",
            "mesh-tests",
            "--test",
            "traffic",
            "--test",
            "agent",
            "--test",
            "lb",
            "--test",
            "overlay",
            "--test",
            "hostport",
            "--test",
            "vxlan_wire",
            "--test",
            "bootstrap",
        ],
        // One at a time: the load-balancing and overlay tests measure rates.
        &["--nocapture", "--test-threads", "1"],
        object.as_deref(),
        &mut summary,
    )?;

    println!("\n== the kernel matrix: Debian's 5.10, 6.1 and 6.12 under qemu (every program through the loader, tier 2, a tier-3 subset) ==");
    match (&object, privileged) {
        (Some(obj), true) => crate::kernels::for_test(obj, &mut summary)?,
        // Under CI=true both are there (checked above).
        _ => {
            println!("kernels: SKIP: not root");
            summary.push("kernels: SKIP: not root".into());
        }
    }

    if privileged {
        println!("\n== tier 3: the real-swarm harness (cargo xtask cluster) ==");
        let line = crate::cluster::self_test()?;
        println!("swarm: {line}");
        summary.push(format!("  swarm: {line}"));
    } else {
        summary.push("  SKIP swarm harness: not root".into());
    }
    // The swarms' engines beforehand (a first fetch takes ~15 s), so that their time
    // and any failure to fetch show here rather than inside a test.
    if privileged {
        println!("\n== Docker engines for the swarms (cargo xtask cluster up --engine) ==");
        for name in ["20.10", "28.5"] {
            let t = std::time::Instant::now();
            let e = crate::engines::resolve(name)?;
            let line = format!(
                "engines: {name}: dockerd {} from {} ({:.1} s)",
                e.version,
                e.bin.display(),
                t.elapsed().as_secs_f64()
            );
            println!("{line}");
            summary.push(format!("  {line}"));
        }
    }
    println!("\n== tier 3: real swarms with the mesh (3 nodes in namespaces on Docker 20.10, the same on 28.5, a mixed 28.5/20.10 swarm with a stock node; 1 node on the machine's dockerd); the deployment kit (cargo xtask demo, the stack's rolling update, bootstrap on a node) ==");
    cargo_test(
        &["-p", "mesh-tests", "--test", "swarm", "--test", "deploy"],
        &["--nocapture", "--test-threads", "1"],
        object.as_deref(),
        &mut summary,
    )?;

    println!("\n== summary ==");
    for l in &summary {
        println!("{l}");
    }
    Ok(())
}

/// Seconds per fuzz target in `cargo xtask test` (`cargo xtask fuzz` runs longer).
const FUZZ_SECONDS: u64 = 20;

/// A short run of every fuzz target (none when cargo-fuzz is missing and setup did not
/// run: without root, outside CI).
fn fuzz_briefly(summary: &mut Vec<String>) -> anyhow::Result<()> {
    if !cmd::is_root() && !cmd::in_ci() {
        println!("test: not root: setup did not install cargo-fuzz; fuzzing skipped");
        summary.push("  SKIP fuzz: not root (setup installs cargo-fuzz)".into());
        return Ok(());
    }
    crate::fuzz::build()?;
    for t in crate::fuzz::TARGETS {
        let run = crate::fuzz::fuzz(t, std::time::Duration::from_secs(FUZZ_SECONDS))?;
        println!("{run}");
        summary.push(format!("  {run}"));
    }
    Ok(())
}

/// Runs `cargo test ARGS -- TEST_ARGS`, streaming its output and keeping the lines
/// worth repeating in the summary (results, skips, fixture and traffic reports).
fn cargo_test(
    args: &[&str],
    test_args: &[&str],
    object: Option<&std::path::Path>,
    summary: &mut Vec<String>,
) -> anyhow::Result<()> {
    let mut c = Command::new("cargo");
    c.current_dir(root())
        .args(["test", "--locked"])
        .args(args)
        .arg("--")
        .args(test_args)
        .stdout(Stdio::piped());
    if let Some(o) = object {
        c.env("MESH_BPF_OBJECT", o);
    }
    c.env("MESH_AGENT_BIN_DIR", root().join("target/debug"));
    // The swarm test drives `cargo xtask cluster` through this very binary.
    if let Ok(me) = std::env::current_exe() {
        c.env("MESH_XTASK_BIN", me);
    }
    let what = format!("cargo test {}", args.join(" "));
    let mut child = c.spawn().with_context(|| format!("starting `{what}`"))?;
    let out = child.stdout.take().expect("piped");
    for line in BufReader::new(out).lines() {
        let line = line?;
        println!("{line}");
        if [
            "fixtures:",
            "traffic",
            "SKIP",
            "lb:",
            "lb fixtures:",
            "bench:",
            "overlay:",
            "vxlan wire:",
            "xdp:",
            "swarm:",
        ]
        .iter()
        .any(|p| line.starts_with(p))
        {
            summary.push(format!("  {line}"));
        }
        if line.starts_with("test result:") && !line.contains(" 0 passed") {
            summary.push(format!("{what}: {line}"));
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("`{what}` failed ({status})");
    }
    Ok(())
}

/// Loads every program of the object with libbpf's loader (bpftool), which runs the
/// verifier on each, independently of aya; reports instruction counts, then unpins.
fn verify_with_bpftool(obj: &std::path::Path) -> anyhow::Result<()> {
    let dir = std::path::PathBuf::from(format!("/sys/fs/bpf/mesh-verify-{}", std::process::id()));
    let result = (|| {
        exec(
            Command::new("bpftool")
                .arg("prog")
                .arg("loadall")
                .arg(obj)
                .arg(&dir),
        )?;
        for entry in std::fs::read_dir(&dir)? {
            let p = entry?.path();
            let show = cmd::output(
                Command::new("bpftool")
                    .arg("prog")
                    .arg("show")
                    .arg("pinned")
                    .arg(&p),
            )?;
            let insns = show
                .split_whitespace()
                .skip_while(|w| *w != "xlated")
                .take(4)
                .collect::<Vec<_>>()
                .join(" ");
            println!(
                "verifier: {} loads with bpftool ({insns})",
                p.file_name().unwrap().to_string_lossy()
            );
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}
