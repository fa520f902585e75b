//! What one object adds up to: every program's chains, the report's `stack:` lines, the
//! failures `cargo xtask test` stops on, and a verifier log's depths.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

use super::{elf::Module, Program, Rule, MAX_BPF_STACK};

/// Everything [`report`] found in one object.
#[derive(Clone, Debug)]
pub struct Report {
    pub object: PathBuf,
    pub programs: Vec<Program>,
    /// Things the analysis could not follow exactly (each names its function); the
    /// depths stay upper bounds, but worth a look.
    pub warnings: Vec<String>,
}

impl Report {
    /// The report, one line each, every line starting `stack:`.
    pub fn lines(&self, min_headroom: u32) -> Vec<String> {
        let bar = MAX_BPF_STACK.saturating_sub(min_headroom);
        let mut out = vec![format!(
            "stack: {}: {} programs; frames rounded as the verifier does: {} round_up(max(d,1),32), {} (JIT) round_up(d,16); each chain <= {bar} of {MAX_BPF_STACK} bytes by the {} rule ({min_headroom} bytes of headroom)",
            self.object.display(),
            self.programs.len(),
            Rule::Frames32,
            Rule::Frames16,
            Rule::Frames32,
        )];
        for p in &self.programs {
            let verdict = if self.program_fails(p, min_headroom) {
                "FAIL"
            } else {
                "ok"
            };
            let by_rule = Rule::ALL
                .iter()
                .map(|&r| format!("{r}: {} (headroom {})", p.depth(r), p.headroom(r)))
                .collect::<Vec<_>>()
                .join(", ");
            out.push(format!(
                "stack: {} [{}] {verdict}: {by_rule}; {} functions, {} insns, {} frames deep",
                p.name,
                p.section,
                p.functions.len(),
                p.insns(),
                p.frames
            ));
            for &r in &Rule::ALL {
                out.push(format!("stack:   {r} chain: {}", p.chain(r)));
            }
            for &r in &Rule::ALL {
                if let Some(m) = p.refusal(r) {
                    out.push(format!("stack:   {r} verifier walk, static depths: {m}"));
                }
            }
        }
        for w in &self.warnings {
            out.push(format!("stack: warning: {w}"));
        }
        out
    }

    fn program_fails(&self, p: &Program, min_headroom: u32) -> bool {
        p.headroom(Rule::Frames32) < i64::from(min_headroom)
            || Rule::ALL.iter().any(|&r| p.refusal(r).is_some())
    }

    /// One line per program that leaves less than `min_headroom` by the 5.10-6.8 (6.1)
    /// rule or that a verifier would refuse for another stack reason.
    pub fn failures(&self, min_headroom: u32) -> Vec<String> {
        self.programs
            .iter()
            .filter(|p| self.program_fails(p, min_headroom))
            .map(|p| {
                let mut s = format!(
                    "{} has {} bytes of headroom by the {} rule (chain {}), {min_headroom} wanted",
                    p.name,
                    p.headroom(Rule::Frames32),
                    Rule::Frames32,
                    p.chain(Rule::Frames32)
                );
                for &r in &Rule::ALL {
                    if let Some(m) = p.refusal(r) {
                        s.push_str(&format!("; {r}: \"{m}\""));
                    }
                }
                s
            })
            .collect()
    }
}

/// Analyses the object at `obj`.
pub fn report(obj: &Path) -> anyhow::Result<Report> {
    let data = std::fs::read(obj).with_context(|| format!("reading {}", obj.display()))?;
    let module = Module::from_elf(&data).with_context(|| format!("reading {}", obj.display()))?;
    let mut r = module.analyze()?;
    r.object = obj.to_path_buf();
    Ok(r)
}

/// The report's lines (each starting `stack:`) when every program's deepest chain leaves
/// at least `min_headroom` of the 512 bytes by the 6.1 rule (and nothing else in the
/// stack walk would be refused); otherwise an error holding the failures and the lines.
// For `cargo xtask test`.
#[allow(dead_code)]
pub fn check(obj: &Path, min_headroom: u32) -> anyhow::Result<Vec<String>> {
    let r = report(obj)?;
    let lines = r.lines(min_headroom);
    let failures = r.failures(min_headroom);
    if failures.is_empty() {
        Ok(lines)
    } else {
        bail!(
            "stack: {} program(s) without {min_headroom} bytes of stack headroom: {}\n{}",
            failures.len(),
            failures.join("; "),
            lines.join("\n")
        )
    }
}

/// The per-function depths of a verifier log at log_level 4 (its `stack depth 104+96+0`
/// line), in the order of [`Program::functions`] when libbpf loaded the program.
// For the kernel matrix's per-kernel table.
#[allow(dead_code)]
pub fn parse_verifier_depths(log: &str) -> Option<Vec<u32>> {
    let line = log
        .lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix("stack depth "))?;
    line.trim()
        .split('+')
        .map(|d| d.trim().parse().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `MESH_STACK_OBJECT=/tmp/stack-baseline.bpf.o cargo test -p xtask stack`: the
    /// object of 2026-12-06 (d0f7da3), which Debian 12's 6.1 refused with "combined stack
    /// size of 4 calls is 544" and 6.18 loads at exactly 512.
    #[test]
    fn baseline_object_matches_the_kernels() {
        let Some(obj) = std::env::var_os("MESH_STACK_OBJECT") else {
            return;
        };
        let r = report(Path::new(&obj)).unwrap();
        let p = r
            .programs
            .iter()
            .find(|p| p.name == "mesh_tc_ingress")
            .unwrap();
        // Static: the deepest chain runs on into client_rewrite (8 bytes).
        assert_eq!(
            p.chain(Rule::Frames32).to_string(),
            "mesh_tc_ingress 104->128 > datapath::dispatch 96 > lb::process 96 > lb::new_flow 208->224 > lb::client_rewrite 8->32 = 576"
        );
        assert_eq!(p.depth(Rule::Frames16), 528);
        // What Debian 12's 6.1 printed.
        assert_eq!(
            p.refusal(Rule::Frames32).unwrap(),
            "combined stack size of 4 calls is 544. Too large"
        );
        // 6.18's own depths (vload, log_level 4): it proves client_rewrite's lookups dead
        // in this program (pk.hook != TcTask), so 0 there, and loads it at exactly 512.
        let k = parse_verifier_depths(
            "stack depth 104+312+0+152+64+24+80+96+96+208+0+16+144+72+64+8+72+72+32+56+272+136+104+8+32+16",
        )
        .unwrap();
        let c = p.chain_with_depths(Rule::Frames16, &k).unwrap();
        assert_eq!(
            c.to_string(),
            "mesh_tc_ingress 104->112 > datapath::dispatch 96 > lb::process 96 > lb::new_flow 208 > lb::client_rewrite 0 = 512"
        );
        assert_eq!(p.refusal_with(Rule::Frames16, &k), None);
        // Static and kernel agree elsewhere, up to 6.8+'s rounding of each depth to 8.
        for (f, &kd) in p.functions.iter().zip(&k) {
            if f.name != "lb::client_rewrite" {
                assert_eq!(f.depth.div_ceil(8) * 8, kd, "{}", f.name);
            }
        }
        assert!(check(Path::new(&obj), 64).is_err());
    }
}
