//! The per-kernel table: what the load step printed (tests/tests/verify.rs's `verify:`
//! lines: instructions verified, refusals, fallbacks in force) beside each program's
//! deepest stack chain by that kernel's rounding (xtask/src/stack/).

use crate::stack::{self, Rule, MAX_BPF_STACK};

/// What the load step printed.
#[derive(Default)]
pub struct Verify {
    /// `uname -r` where it ran.
    pub release: String,
    /// (program, verified instructions, xlated instructions) of the loaded programs.
    pub loaded: Vec<(String, String, String)>,
    /// (program, the verifier's reason) of the refused ones.
    pub refused: Vec<(String, String)>,
    /// The loader's fallbacks in force ("none"), as one line.
    pub fallbacks: String,
    /// The loader's refusal, when it refused.
    pub loader: Option<String>,
}

impl Verify {
    pub fn parse(out: &str) -> Self {
        let mut v = Verify::default();
        for l in out.lines().filter_map(|l| l.strip_prefix("verify: ")) {
            if let Some(rest) = l.strip_prefix("program ") {
                let mut w = rest.splitn(3, ' ');
                let (name, verdict, more) = (
                    w.next().unwrap_or(""),
                    w.next().unwrap_or(""),
                    w.next().unwrap_or(""),
                );
                let field = |k: &str| {
                    more.split_whitespace()
                        .find_map(|f| f.strip_prefix(k))
                        .unwrap_or("-")
                        .to_string()
                };
                if verdict == "loaded" {
                    v.loaded.push((
                        name.into(),
                        field("verified_insns="),
                        field("xlated_insns="),
                    ));
                } else {
                    v.refused.push((name.into(), name_helper(more)));
                }
            } else if let Some(r) = l.strip_prefix("kernel ") {
                v.release = r.trim().to_string();
            } else if let Some(f) = l.strip_prefix("fallbacks ") {
                v.fallbacks = f.to_string();
            } else if let Some(e) = l.strip_prefix("loader refused: ") {
                v.loader = Some(e.to_string());
            }
        }
        v
    }

    /// Every program went through the agent's loader.
    pub fn passed(&self) -> bool {
        self.loader.is_none() && self.refused.is_empty() && !self.loaded.is_empty()
    }
}

/// Helpers the datapath calls that older kernels lack, by number: the verifier of such a
/// kernel only says `invalid func unknown#N`.
const NEWER_HELPERS: [(u32, &str); 3] = [
    (163, "bpf_check_mtu, Linux 5.12"),
    (189, "bpf_xdp_load_bytes, Linux 5.18"),
    (190, "bpf_xdp_store_bytes, Linux 5.18"),
];

/// `... unknown#163` -> `... unknown#163 (bpf_check_mtu, Linux 5.12)`.
fn name_helper(why: &str) -> String {
    let n = why
        .rsplit_once("unknown#")
        .and_then(|(_, n)| n.trim().parse::<u32>().ok());
    match NEWER_HELPERS.iter().find(|(h, _)| Some(*h) == n) {
        Some((_, name)) => format!("{why} ({name})"),
        None => why.to_string(),
    }
}

/// The verifier's frame rounding on `release` (e.g. "6.1.0-57-amd64").
fn rule(release: &str) -> Rule {
    let mut n = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|p| p.parse().ok());
    let (major, minor) = (n.next().unwrap_or(0), n.next().unwrap_or(0));
    Rule::for_kernel(major, minor)
}

/// Prints the table of one kernel; returns its one-line summary (after `kernels: NAME`).
pub fn table(name: &str, v: &Verify, stack: Option<&stack::Report>) -> String {
    println!("\nkernel {name}");
    if v.loaded.is_empty() && v.refused.is_empty() {
        println!("  (no load results)");
        return "load: no results".into();
    }
    let rule = rule(&v.release);
    if let Some(e) = &v.loader {
        println!("  the agent's loader REFUSED: {e}");
        println!(
            "  (so each program was loaded alone, outside the loader, with the probed features)"
        );
    }
    let chain = |prog: &str| stack.and_then(|r| r.programs.iter().find(|p| p.name == prog));
    let stack_cell = |prog: &str| {
        chain(prog).map_or("?".to_string(), |p| {
            format!("{}/{MAX_BPF_STACK}", p.chain(rule).total)
        })
    };
    println!(
        "  {:<24} {:>9} {:>7} {:>9}  verdict   (stack: deepest call chain, {rule} rounding)",
        "program", "verified", "xlated", "stack"
    );
    for (prog, verified, xlated) in &v.loaded {
        println!(
            "  {prog:<24} {verified:>9} {xlated:>7} {:>9}  loaded",
            stack_cell(prog)
        );
    }
    for (prog, why) in &v.refused {
        println!(
            "  {prog:<24} {:>9} {:>7} {:>9}  REFUSED: {why}",
            "-",
            "-",
            stack_cell(prog)
        );
    }
    let deepest = v
        .loaded
        .iter()
        .map(|r| &r.0)
        .chain(v.refused.iter().map(|r| &r.0))
        .filter_map(|p| chain(p))
        .max_by_key(|p| p.chain(rule).total);
    if let Some(p) = deepest {
        println!("  deepest chain: {}: {}", p.name, p.chain(rule));
    }
    let fallbacks = if v.fallbacks.is_empty() {
        "(not reported)"
    } else {
        &v.fallbacks
    };
    println!("  fallbacks in force: {fallbacks}");

    let most = v
        .loaded
        .iter()
        .filter_map(|(p, n, _)| Some((n.parse::<u64>().ok()?, p)))
        .max();
    let mut line = format!(
        "load {}/{} programs",
        v.loaded.len(),
        v.loaded.len() + v.refused.len()
    );
    if !v.refused.is_empty() {
        let names: Vec<&str> = v.refused.iter().map(|r| r.0.as_str()).collect();
        line.push_str(&format!(" (refused: {})", names.join(", ")));
    }
    match most {
        Some((n, p)) => line.push_str(&format!(", most verified {n} insns ({p})")),
        None => line.push_str(", verified insns not reported (Linux < 5.16)"),
    }
    if let Some(p) = deepest {
        line.push_str(&format!(
            ", deepest stack {}/{MAX_BPF_STACK} ({}, {rule})",
            p.chain(rule).total,
            p.name
        ));
    }
    line.push_str(&format!(", fallbacks: {fallbacks}"));
    line
}
