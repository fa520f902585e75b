//! `cargo xtask kernels` (and the kernel matrix of `cargo xtask test`): Debian's 5.10,
//! 6.1 and 6.12 kernels, booted under qemu, each running the host's build through a 9p
//! share of the host's root: every program through the agent's loader (the verifier),
//! tier 2 (the fixture tables through BPF_PROG_TEST_RUN) and a tier-3 subset with real
//! traffic across namespaces inside the guest. Prints a table per kernel; fails when a
//! step fails on any kernel.

mod debian;
mod guest;
mod initramfs;
mod report;

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context};

use crate::cmd::{self, root};

#[derive(clap::Args)]
pub struct Kernels {
    /// Only these kernels (5.10, 6.1, 6.12); repeatable. Default: all three.
    #[arg(long = "kernel")]
    kernels: Vec<String>,
    /// Guests booted at once (each has 2 vCPUs).
    #[arg(long, default_value_t = JOBS)]
    jobs: usize,
    /// Only the load step (the verifier): about 15 s a kernel.
    #[arg(long)]
    load_only: bool,
    /// This eBPF object instead of a fresh `cargo xtask build` of the tree's.
    #[arg(long)]
    object: Option<PathBuf>,
}

/// A step of every guest: a test binary of mesh-tests (by its `--test` name) and the
/// arguments it runs with. The tier-3 tests are picked by name.
struct Step {
    name: &'static str,
    test: &'static str,
    args: &'static [&'static str],
}

const ONE_THREAD: &[&str] = &["--nocapture", "--test-threads", "1"];

const STEPS: [Step; 6] = [
    Step {
        name: "load",
        test: "verify",
        args: &[
            "--exact",
            "every_program_loads_through_the_agent_loader",
            "--nocapture",
        ],
    },
    Step {
        name: "tier2-fixtures",
        test: "fixtures",
        args: ONE_THREAD,
    },
    Step {
        name: "tier2-lb-fixtures",
        test: "lb_fixtures",
        args: ONE_THREAD,
    },
    // A published port to local tasks (TCP), a UDP flow, VIPs from a task, refusals.
    Step {
        name: "tier3-port-udp-vip",
        test: "lb",
        args: &[
            "--exact",
            "published_ports_udp_vip_hairpin_and_refusals",
            "--nocapture",
        ],
    },
    // A published port on each node reaching tasks on the other nodes through the tunnel.
    Step {
        name: "tier3-tunnel",
        test: "overlay",
        args: &[
            "--exact",
            "every_node_serves_tasks_on_every_node_with_the_client_ip",
            // The tunnel's MTU: bpf_check_mtu, or on 5.10 the own-mtu-check fallback.
            "path_mtu_discovery_across_the_overlay",
            "--nocapture",
        ],
    },
    // kill -9 of the agent under load, then a new agent adopting the pinned datapath.
    Step {
        name: "tier3-kill9-adopt",
        test: "agent",
        args: &[
            "--exact",
            "agent_kill9_keeps_traffic_and_restart_adopts",
            "--nocapture",
        ],
    },
];

/// Guests at once. Measured on 2 cores (quiet machine): one at a time 372 s for the
/// three, two at a time 341 s, but each guest's traffic steps then take 2-3 times as
/// long, which is what the tests that count in wall-clock time feel. One at a time.
const JOBS: usize = 1;
/// The guest's whole run; a guest still up after it is killed.
const GUEST_TIMEOUT: Duration = Duration::from_secs(900);
/// One step inside a guest.
const STEP_TIMEOUT_S: u32 = 420;

pub fn run(args: Kernels) -> anyhow::Result<()> {
    if !cmd::is_root() {
        bail!("the kernel matrix must run as root: it unpacks kernels into its cache and shares the host's root with the guests");
    }
    let object = match args.object {
        Some(o) => o,
        None => crate::build::build_ebpf()?,
    };
    let steps = if args.load_only {
        &STEPS[..1]
    } else {
        &STEPS[..]
    };
    matrix(&object, &args.kernels, args.jobs, steps, &mut Vec::new())
}

/// The matrix for `cargo xtask test`: the kernels of `$MESH_KERNELS` (comma-separated;
/// `off` skips, never under `CI=true`), else all; summary lines start with `kernels:`.
pub fn for_test(object: &Path, summary: &mut Vec<String>) -> anyhow::Result<()> {
    let chosen = std::env::var("MESH_KERNELS").unwrap_or_default();
    if cmd::in_ci() && !chosen.is_empty() {
        bail!(
            "MESH_KERNELS={chosen} under CI=true: the kernel matrix always runs every kernel in CI"
        );
    }
    if chosen == "off" {
        println!("kernels: SKIP (MESH_KERNELS=off)");
        summary.push("kernels: SKIP (MESH_KERNELS=off)".into());
        return Ok(());
    }
    let chosen: Vec<String> = chosen
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect();
    matrix(object, &chosen, JOBS, &STEPS, summary)
}

/// One kernel's outcome.
struct Outcome {
    kernel: String,
    /// (step, passed, "12.3 s" or why it has no result).
    steps: Vec<(String, bool, String)>,
    verify: report::Verify,
    wall: Duration,
}

fn matrix(
    object: &Path,
    chosen: &[String],
    jobs: usize,
    steps: &[Step],
    summary: &mut Vec<String>,
) -> anyhow::Result<()> {
    let series: Vec<&'static debian::Series> = if chosen.is_empty() {
        debian::SERIES.iter().collect()
    } else {
        chosen
            .iter()
            .map(|c| {
                debian::SERIES
                    .iter()
                    .find(|s| s.name == c)
                    .with_context(|| format!("unknown kernel {c:?} (5.10, 6.1 or 6.12)"))
            })
            .collect::<anyhow::Result<_>>()?
    };
    let kernels = debian::fetch(&series)?;
    if Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_err()
    {
        bail!("qemu-system-x86_64 is missing: run `cargo xtask setup` as root");
    }
    let runs = root().join("target/kernels");
    let (bins, agent_dir, object) = stage(&test_binaries(steps)?, object, &runs.join("bin"))?;
    let object = object.as_path();

    // The host first: the same loader step, for the table.
    let host = host_verify(&bins, object)?;

    let started = Instant::now();
    // Guests take the kernels in turn, `jobs` at a time.
    let next = std::sync::atomic::AtomicUsize::new(0);
    let slots: Vec<std::sync::Mutex<Option<anyhow::Result<Outcome>>>> = kernels
        .iter()
        .map(|_| std::sync::Mutex::new(None))
        .collect();
    std::thread::scope(|sc| {
        for _ in 0..jobs.clamp(1, kernels.len().max(1)) {
            sc.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(k) = kernels.get(i) else { break };
                let r = boot(k, &runs.join(k.series), steps, &bins, object, &agent_dir);
                *slots[i].lock().unwrap() = Some(r);
            });
        }
    });
    let outcomes: Vec<anyhow::Result<Outcome>> = slots
        .into_iter()
        .map(|s| {
            s.into_inner()
                .unwrap()
                .unwrap_or_else(|| Err(anyhow::anyhow!("guest thread panicked")))
        })
        .collect();
    let total = started.elapsed();

    // The static stack analysis, rounded per kernel in the table.
    let stack = crate::stack::report(object)
        .map_err(|e| println!("kernels: no stack report: {e:#}"))
        .ok();
    println!("\n== kernel matrix ==");
    let mut failed = Vec::new();
    let mut lines = vec![format!(
        "kernels: host ({}): {}",
        host.release,
        report::table(&format!("host ({})", host.release), &host, stack.as_ref())
    )];
    if !host.passed() {
        failed.push("host: load".to_string());
    }
    for (k, o) in kernels.iter().zip(&outcomes) {
        match o {
            Ok(o) => {
                let load = report::table(&o.kernel, &o.verify, stack.as_ref());
                let steps: Vec<String> = o
                    .steps
                    .iter()
                    .map(|(n, ok, d)| format!("{} {n}{d}", if *ok { "PASS" } else { "FAIL" }))
                    .collect();
                lines.push(format!(
                    "kernels: {} {} ({} {}), {:.0} s: {}",
                    k.series,
                    k.distro,
                    k.release,
                    k.version,
                    o.wall.as_secs_f64(),
                    steps.join(", ")
                ));
                lines.push(format!("kernels: {}: {load}", k.series));
                for (n, ok, _) in &o.steps {
                    if !ok {
                        failed.push(format!("{}: {n}", k.series));
                    }
                }
            }
            Err(e) => {
                lines.push(format!("kernels: {} FAIL: {e:#}", k.series));
                failed.push(format!("{}: {e:#}", k.series));
            }
        }
    }
    lines.push(format!(
        "kernels: {} kernel(s) in {:.0} s, {} at a time; logs in {}",
        kernels.len(),
        total.as_secs_f64(),
        jobs.max(1),
        runs.display()
    ));
    println!();
    for l in &lines {
        println!("{l}");
    }
    summary.extend(lines);
    if !failed.is_empty() {
        bail!("kernel matrix: {}", failed.join("; "));
    }
    Ok(())
}

/// Builds the test binaries the guests run (and the agent's binaries the kill -9 test
/// starts); returns `--test` name -> executable.
fn test_binaries(steps: &[Step]) -> anyhow::Result<BTreeMap<String, PathBuf>> {
    cmd::build_agent_bins()?;
    let mut c = Command::new("cargo");
    c.current_dir(root())
        .args(["test", "--no-run", "--locked", "-p", "mesh-tests"])
        .args(steps.iter().flat_map(|s| ["--test", s.test]))
        .arg("--message-format=json-render-diagnostics");
    let out = cmd::output(&mut c)?;
    let mut bins = BTreeMap::new();
    for line in out.lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let (Some(exe), Some(name)) = (msg["executable"].as_str(), msg["target"]["name"].as_str())
        else {
            continue;
        };
        if msg["target"]["kind"][0] == "test" {
            bins.insert(name.to_string(), PathBuf::from(exe));
        }
    }
    for s in steps {
        if !bins.contains_key(s.test) {
            bail!("cargo built no test binary `{}`", s.test);
        }
    }
    Ok(bins)
}

/// Links (or copies) what the guests run into `dir`, so that a build on the host during
/// the run (cargo replaces its outputs) cannot change a guest's files under it: test
/// binaries, the agent's binaries, the object. Returns them from there.
fn stage(
    bins: &BTreeMap<String, PathBuf>,
    object: &Path,
    dir: &Path,
) -> anyhow::Result<(BTreeMap<String, PathBuf>, PathBuf, PathBuf)> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let place = |from: &Path, name: &str| -> anyhow::Result<PathBuf> {
        let to = dir.join(name);
        if std::fs::hard_link(from, &to).is_err() {
            std::fs::copy(from, &to)
                .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
        }
        Ok(to)
    };
    let mut staged = BTreeMap::new();
    for (test, exe) in bins {
        staged.insert(test.clone(), place(exe, &format!("test-{test}"))?);
    }
    for agent_bin in ["mesh-agent", "meshctl"] {
        place(&root().join("target/debug").join(agent_bin), agent_bin)?;
    }
    // build_ebpf rewrites the object in place: a copy, not a link.
    let obj = dir.join(crate::build::object_path().file_name().unwrap_or_default());
    std::fs::copy(object, &obj)
        .with_context(|| format!("copying {} to {}", object.display(), obj.display()))?;
    Ok((staged, dir.to_path_buf(), obj))
}

/// The load step on the host's own kernel.
fn host_verify(bins: &BTreeMap<String, PathBuf>, object: &Path) -> anyhow::Result<report::Verify> {
    let step = &STEPS[0];
    let out = Command::new(&bins[step.test])
        .args(step.args)
        .current_dir(root().join("tests"))
        .env("MESH_BPF_OBJECT", object)
        .env("CI", "true")
        .output()
        .context("running the verify test on the host")?;
    Ok(report::Verify::parse(&String::from_utf8_lossy(&out.stdout)))
}

/// Boots `k` with the steps; reads the verdicts back from the run's share.
fn boot(
    k: &debian::Kernel,
    dir: &Path,
    steps: &[Step],
    bins: &BTreeMap<String, PathBuf>,
    object: &Path,
    agent_dir: &Path,
) -> anyhow::Result<Outcome> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let initrd = dir.join("initramfs.cpio");
    let modules = initramfs::build(k, include_str!("kernels/init.sh"), &initrd)?;
    println!(
        "kernels: [{}] booting {} ({}) with modules {}",
        k.series,
        k.release,
        k.version,
        modules.join(" ")
    );
    let mut script = include_str!("kernels/steps.sh").to_string();
    writeln!(script, "export STEP_TIMEOUT={STEP_TIMEOUT_S}")?;
    writeln!(script, "export MESH_BPF_OBJECT={}", sh(object))?;
    writeln!(script, "export MESH_AGENT_BIN_DIR={}", sh(agent_dir))?;
    // Where cargo runs a package's tests.
    writeln!(script, "cd {}", sh(&root().join("tests")))?;
    for s in steps {
        write!(script, "step {} {}", s.name, sh(&bins[s.test]))?;
        for a in s.args {
            write!(script, " {a}")?;
        }
        writeln!(script)?;
    }
    std::fs::write(dir.join("steps.sh"), script)?;
    let ran = guest::Guest {
        kernel: k,
        initramfs: initrd,
        run_dir: dir.to_path_buf(),
        timeout: GUEST_TIMEOUT,
    }
    .run()?;

    // Written by the guest's steps.sh: none means the guest never got that far.
    let results = std::fs::read_to_string(dir.join("results")).ok();
    if results.is_none() {
        print_failure(k.series, dir, "boot");
    }
    let mut verdicts = Vec::new();
    for s in steps {
        let line = results.as_deref().and_then(|r| {
            r.lines()
                .find(|l| l.split_whitespace().nth(1) == Some(s.name))
        });
        let (ok, detail) = match line.map(|l| l.split_whitespace().collect::<Vec<_>>()) {
            Some(f) if f.len() >= 4 => (f[2] == "PASS", format!(" {} s", f[3])),
            _ if ran.timed_out => (false, " (guest killed at its deadline)".into()),
            _ if results.is_none() => (false, " (not run: the guest did not boot)".into()),
            _ => (false, " (no result: see console.log)".into()),
        };
        if !ok && results.is_some() {
            print_failure(k.series, dir, s.name);
        }
        verdicts.push((s.name.to_string(), ok, detail));
    }
    let verify =
        report::Verify::parse(&std::fs::read_to_string(dir.join("load.log")).unwrap_or_default());
    Ok(Outcome {
        kernel: format!("{} ({})", k.series, k.release),
        steps: verdicts,
        verify,
        wall: ran.wall,
    })
}

/// A path for the guest's shell (ours have no quotes; quote anyway).
fn sh(p: &Path) -> String {
    format!("'{}'", p.display())
}

/// The end of a failed step's log, or of the console when the step never ran.
fn print_failure(series: &str, dir: &Path, step: &str) {
    let log = dir.join(format!("{step}.log"));
    let (what, text) = match std::fs::read_to_string(&log) {
        Ok(t) => (log, t),
        Err(_) => {
            let c = dir.join("console.log");
            let t = std::fs::read_to_string(&c).unwrap_or_default();
            (c, t)
        }
    };
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| !l.trim_start().starts_with("at ") && !l.starts_with("  "))
        .collect();
    println!(
        "kernels: [{series}] {step} FAILED; the end of {}:",
        what.display()
    );
    for l in &lines[lines.len().saturating_sub(30)..] {
        println!("    {l}");
    }
}
