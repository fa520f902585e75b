//! `cargo xtask fuzz`: coverage-guided fuzzing of what strangers and users hand the mesh
//! (`tests/fuzz`: `parse` packets, `report` peer answers, `model` model files), with
//! libFuzzer through cargo-fuzz (`cargo xtask setup` installs it) on stable Rust, which
//! allows coverage instrumentation without a sanitizer (`--sanitizer none`).
//!
//! Each target starts from its checked-in seeds (`tests/fuzz/seeds/<target>`) and the
//! corpus earlier runs grew (`target/fuzz/corpus/<target>`, where new inputs go). A
//! finding (a panic, a failed check) stops the run with the input that caused it under
//! `target/fuzz/artifacts/<target>/`: `cargo xtask fuzz --reproduce FILE <target>`
//! runs it alone.

use std::{path::PathBuf, process::Command, time::Duration};

use anyhow::{bail, Context};

use crate::cmd::{self, path_with_cargo_bin, root};

/// Every target, in the order a run takes them.
pub const TARGETS: &[&str] = &["parse", "report", "model"];

/// cargo-fuzz's release we drive (setup installs it).
pub const CARGO_FUZZ_VERSION: &str = "0.13.2";

#[derive(clap::Args)]
pub struct Fuzz {
    /// Seconds per target.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Run this input (a finding) through the target once instead of fuzzing.
    #[arg(long)]
    reproduce: Option<PathBuf>,
    /// Targets to run (default: all of them).
    targets: Vec<String>,
}

/// What one target's run did.
pub struct Run {
    pub target: &'static str,
    pub executions: u64,
    pub seconds: u64,
    /// Coverage edges reached and inputs in the corpus at the end.
    pub coverage: u64,
    pub corpus: u64,
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "fuzz {:<6} {:>12} executions in {:>5} s, {:>5} edges, {:>5} inputs in the corpus, no findings",
            self.target, self.executions, self.seconds, self.coverage, self.corpus
        )
    }
}

pub fn run(f: Fuzz) -> anyhow::Result<()> {
    let targets = pick(&f.targets)?;
    if let Some(input) = &f.reproduce {
        let [t] = targets[..] else {
            bail!("--reproduce takes one target");
        };
        return cmd::exec(cargo_fuzz(t).arg(input));
    }
    build()?;
    for t in targets {
        println!("{}", fuzz(t, Duration::from_secs(f.seconds))?);
    }
    Ok(())
}

fn pick(names: &[String]) -> anyhow::Result<Vec<&'static str>> {
    if names.is_empty() {
        return Ok(TARGETS.to_vec());
    }
    names
        .iter()
        .map(|n| {
            TARGETS
                .iter()
                .find(|t| *t == n)
                .copied()
                .with_context(|| format!("no fuzz target {n:?} (there are {})", TARGETS.join(", ")))
        })
        .collect()
}

fn fuzz_dir() -> PathBuf {
    root().join("tests/fuzz")
}

fn work_dir() -> PathBuf {
    root().join("target/fuzz")
}

/// `cargo fuzz <verb>` with this project's settings.
fn cargo_fuzz_cmd(verb: &str) -> Command {
    let mut c = Command::new("cargo");
    c.current_dir(root())
        .env("PATH", path_with_cargo_bin())
        .args(["fuzz", verb, "--sanitizer", "none", "--fuzz-dir"])
        .arg(fuzz_dir())
        .arg("--target-dir")
        .arg(work_dir());
    c
}

fn cargo_fuzz(target: &str) -> Command {
    let mut c = cargo_fuzz_cmd("run");
    c.arg(target);
    c
}

/// Builds every target (instrumented, release with debug assertions).
pub fn build() -> anyhow::Result<()> {
    cmd::exec(&mut cargo_fuzz_cmd("build"))
}

/// Fuzzes `target` for `time`; fails on a finding, naming the input that caused it.
pub fn fuzz(target: &'static str, time: Duration) -> anyhow::Result<Run> {
    let corpus = work_dir().join("corpus").join(target);
    let artifacts = work_dir().join("artifacts").join(target);
    for d in [&corpus, &artifacts] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let out = cargo_fuzz(target)
        .arg(&corpus)
        .arg(fuzz_dir().join("seeds").join(target))
        .arg("--")
        .arg(format!("-max_total_time={}", time.as_secs()))
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .arg("-print_final_stats=1")
        .output()
        .with_context(|| format!("starting cargo fuzz for {target}"))?;
    // libFuzzer reports on stderr.
    let log = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!(
            "fuzz target {target} found a failure ({}); the input is under {} (`cargo xtask fuzz --reproduce FILE {target}`):\n{}",
            out.status,
            artifacts.display(),
            tail.join("\n")
        );
    }
    parse_stats(target, &log).with_context(|| {
        format!("libFuzzer's final stats for {target} not found in its output:\n{log}")
    })
}

/// The figures from libFuzzer's last status line (`#N DONE cov: C ft: F corp: K/...`)
/// and its final stats (`stat::number_of_executed_units: N`, `stat::...`).
fn parse_stats(target: &'static str, log: &str) -> Option<Run> {
    let stat = |name: &str| {
        log.lines()
            .find_map(|l| l.strip_prefix(&format!("stat::{name}:")))
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    let done = log
        .lines()
        .rev()
        .find(|l| l.starts_with('#') && l.contains("DONE "))?;
    let field = |name: &str| {
        let mut words = done.split_whitespace();
        words.find(|w| *w == name)?;
        words.next()?.split('/').next()?.parse::<u64>().ok()
    };
    let seconds = log
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("Done "))
        .and_then(|l| l.split(" in ").nth(1))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|s| s.parse().ok())?;
    Some(Run {
        target,
        executions: stat("number_of_executed_units")?,
        seconds,
        coverage: field("cov:")?,
        corpus: field("corp:")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libfuzzers_final_figures_are_read() {
        let log = "INFO: Seed: 1\n#2164589\tDONE   cov: 4216 ft: 7594 corp: 1977/300Kb lim: 2671 exec/s: 103075 rss: 59Mb\nDone 2164589 runs in 21 second(s)\nstat::number_of_executed_units: 2164589\nstat::average_exec_per_sec:     103075\n";
        let r = parse_stats("report", log).unwrap();
        assert_eq!(
            (r.executions, r.seconds, r.coverage, r.corpus),
            (2_164_589, 21, 4216, 1977)
        );
        assert!(parse_stats("report", "INFO: Seed: 1\n").is_none());
    }
}
