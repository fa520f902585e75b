//! One program as the verifier's stack walk sees it: its functions in libbpf's order, the
//! deepest chain by each rule, and what the walk would refuse.

use std::{
    collections::{BTreeSet, HashMap},
    fmt,
};

use anyhow::bail;

use super::{Rule, MAX_BPF_STACK, MAX_CALL_FRAMES, TAIL_CALL_CALLERS_MAX};

/// One program (a function in a program section) and the functions it can call.
#[derive(Clone, Debug)]
pub struct Program {
    pub name: String,
    /// ELF section, e.g. `classifier`, `xdp`, `cgroup/connect4`.
    pub section: String,
    /// The entry first, then every subprogram it can reach in the order libbpf appends
    /// them (first call first, depth first): the order of the numbers in the verifier's
    /// `stack depth a+b+c` line when libbpf (bpftool) loads the program.
    pub functions: Vec<Function>,
    /// The deepest chain by each rule of [`Rule::ALL`], in that order.
    pub chains: Vec<Chain>,
    /// Frames in the longest call chain (the entry's counts).
    pub frames: usize,
}

/// One function as the verifier sees it (a subprogram: from a call target to the next).
#[derive(Clone, Debug)]
pub struct Function {
    /// Demangled and without the crate, e.g. `lb::new_flow`, `memset`.
    pub name: String,
    /// The ELF symbol (or `section+insn` when there is none).
    #[allow(dead_code)]
    pub symbol: String,
    /// Static stack depth in bytes, before rounding.
    pub depth: u32,
    /// Instruction slots (an `ld_imm64` takes two, as in the kernel's counts).
    pub insns: usize,
    /// Functions it calls, as indexes into [`Program::functions`], in instruction order
    /// (each once).
    pub calls: Vec<usize>,
    /// Calls `bpf_tail_call`.
    pub tail_call: bool,
}

/// A call chain from a program's entry and what it adds up to under one rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chain {
    pub rule: Rule,
    pub frames: Vec<Frame>,
    /// Sum of the rounded frames: what the verifier compares with 512.
    pub total: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub function: String,
    pub depth: u32,
    pub rounded: u32,
}

impl Chain {
    /// Bytes left of the 512 (negative: the verifier refuses the program).
    pub fn headroom(&self) -> i64 {
        i64::from(MAX_BPF_STACK) - i64::from(self.total)
    }
}

impl fmt::Display for Chain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, fr) in self.frames.iter().enumerate() {
            if i > 0 {
                f.write_str(" > ")?;
            }
            if fr.depth == fr.rounded {
                write!(f, "{} {}", fr.function, fr.depth)?;
            } else {
                write!(f, "{} {}->{}", fr.function, fr.depth, fr.rounded)?;
            }
        }
        write!(f, " = {}", self.total)
    }
}

impl Program {
    /// The deepest chain by `rule` with the static depths.
    pub fn chain(&self, rule: Rule) -> &Chain {
        self.chains
            .iter()
            .find(|c| c.rule == rule)
            .expect("a chain per rule")
    }

    /// Combined stack of the deepest chain by `rule`.
    pub fn depth(&self, rule: Rule) -> u32 {
        self.chain(rule).total
    }

    /// Bytes left of the 512 by `rule`.
    pub fn headroom(&self, rule: Rule) -> i64 {
        self.chain(rule).headroom()
    }

    /// Instruction slots of the entry and every subprogram it can reach.
    pub fn insns(&self) -> usize {
        self.functions.iter().map(|f| f.insns).sum()
    }

    /// The deepest chain by `rule` with other per-function depths, in the order of
    /// [`Program::functions`]: e.g. the numbers of a verifier's `stack depth a+b+c` line
    /// (see [`parse_verifier_depths`](super::report::parse_verifier_depths)), which makes
    /// the chain that kernel's exactly.
    // For the kernel matrix's per-kernel table and `cargo xtask test`.
    #[allow(dead_code)]
    pub fn chain_with_depths(&self, rule: Rule, depths: &[u32]) -> anyhow::Result<Chain> {
        if depths.len() != self.functions.len() {
            bail!(
                "{}: {} depths for {} functions ({})",
                self.name,
                depths.len(),
                self.functions.len(),
                self.functions
                    .iter()
                    .map(|f| f.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        Ok(deepest_chain(&self.functions, rule, depths))
    }

    /// What the verifier's walk (`check_max_stack_depth`) prints refusing this program by
    /// `rule`, with the static depths; `None` when it passes. See [`Program::refusal_with`].
    pub fn refusal(&self, rule: Rule) -> Option<String> {
        let depths: Vec<u32> = self.functions.iter().map(|f| f.depth).collect();
        self.refusal_with(rule, &depths)
    }

    /// What the verifier's walk prints refusing this program by `rule` with `depths` (in
    /// the order of [`Program::functions`]), or `None`: it goes depth first through the
    /// calls in instruction order and stops at the first chain that passes 512 bytes
    /// ("combined stack size of 4 calls is 544. Too large": not always the deepest
    /// chain), goes 8 frames deep, or reaches a tail-calling subprogram with 256 bytes or
    /// more of frames above it.
    pub fn refusal_with(&self, rule: Rule, depths: &[u32]) -> Option<String> {
        fn walk(
            f: usize,
            above: u32,
            frame: usize,
            functions: &[Function],
            rule: Rule,
            depths: &[u32],
            seen: &mut BTreeSet<(usize, u32, usize)>,
        ) -> Option<String> {
            if !seen.insert((f, above, frame)) {
                return None;
            }
            if frame > 0 && functions[f].tail_call && above >= TAIL_CALL_CALLERS_MAX {
                return Some(format!(
                    "tail_calls are not allowed when call stack of previous frames is {above} bytes. Too large"
                ));
            }
            let depth = above + rule.round(depths.get(f).copied().unwrap_or(0));
            if depth > MAX_BPF_STACK {
                return Some(format!(
                    "combined stack size of {} calls is {depth}. Too large",
                    frame + 1
                ));
            }
            for &g in &functions[f].calls {
                if frame + 1 >= MAX_CALL_FRAMES {
                    return Some(format!(
                        "the call stack of {} frames is too deep !",
                        frame + 1
                    ));
                }
                if let Some(m) = walk(g, depth, frame + 1, functions, rule, depths, seen) {
                    return Some(m);
                }
            }
            None
        }
        if self.functions.is_empty() {
            return None;
        }
        walk(0, 0, 0, &self.functions, rule, depths, &mut BTreeSet::new())
    }
}

impl Program {
    pub(super) fn new(name: String, section: String, functions: Vec<Function>) -> Program {
        let depths: Vec<u32> = functions.iter().map(|f| f.depth).collect();
        let chains = Rule::ALL
            .iter()
            .map(|&r| deepest_chain(&functions, r, &depths))
            .collect();
        let frames = longest_path(&functions);
        Program {
            name,
            section,
            functions,
            chains,
            frames,
        }
    }
}

/// The chain from `functions[0]` with the largest sum of rounded depths (the first such in
/// call order). The call graph must be acyclic.
fn deepest_chain(functions: &[Function], rule: Rule, depths: &[u32]) -> Chain {
    fn best(
        f: usize,
        functions: &[Function],
        rule: Rule,
        depths: &[u32],
        memo: &mut HashMap<usize, (u32, Vec<usize>)>,
    ) -> (u32, Vec<usize>) {
        if let Some(b) = memo.get(&f) {
            return b.clone();
        }
        let mut below: (u32, Vec<usize>) = (0, Vec::new());
        for &g in &functions[f].calls {
            let b = best(g, functions, rule, depths, memo);
            if b.0 > below.0 || below.1.is_empty() {
                below = b;
            }
        }
        let mut path = vec![f];
        path.extend(below.1);
        let r = (rule.round(depths[f]) + below.0, path);
        memo.insert(f, r.clone());
        r
    }
    if functions.is_empty() {
        return Chain {
            rule,
            frames: Vec::new(),
            total: 0,
        };
    }
    let (total, path) = best(0, functions, rule, depths, &mut HashMap::new());
    Chain {
        rule,
        total,
        frames: path
            .into_iter()
            .map(|f| Frame {
                function: functions[f].name.clone(),
                depth: depths[f],
                rounded: rule.round(depths[f]),
            })
            .collect(),
    }
}

/// Frames in the longest chain from `functions[0]`.
fn longest_path(functions: &[Function]) -> usize {
    fn len(f: usize, functions: &[Function], memo: &mut HashMap<usize, usize>) -> usize {
        if let Some(&l) = memo.get(&f) {
            return l;
        }
        let l = 1 + functions[f]
            .calls
            .iter()
            .map(|&g| len(g, functions, memo))
            .max()
            .unwrap_or(0);
        memo.insert(f, l);
        l
    }
    if functions.is_empty() {
        0
    } else {
        len(0, functions, &mut HashMap::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stack::report::parse_verifier_depths;

    #[test]
    fn the_6_1_refusal_from_verifier_depths() {
        // The Debian 6.1 log: mesh_tc_ingress 104, dispatch 96, process 96, new_flow 208.
        let f = |name: &str, calls: Vec<usize>| Function {
            name: name.into(),
            symbol: name.into(),
            depth: 0,
            insns: 1,
            calls,
            tail_call: false,
        };
        let p = Program::new(
            "mesh_tc_ingress".into(),
            "classifier".into(),
            vec![
                f("mesh_tc_ingress", vec![1, 4]),
                f("dispatch", vec![2]),
                f("process", vec![3]),
                f("new_flow", vec![]),
                f("other", vec![]),
            ],
        );
        let depths = parse_verifier_depths("processed 1\nstack depth 104+96+96+208+312\n").unwrap();
        let c = p.chain_with_depths(Rule::Frames32, &depths).unwrap();
        assert_eq!(c.total, 544);
        let c = p
            .chain_with_depths(Rule::Frames32, &[104, 96, 96, 208, 424])
            .unwrap();
        assert_eq!(
            c.to_string(),
            "mesh_tc_ingress 104->128 > other 424->448 = 576"
        );
        let depths = [104, 96, 96, 208, 16];
        assert_eq!(
            p.chain_with_depths(Rule::Frames32, &depths).unwrap().total,
            544
        );
        assert_eq!(
            p.chain_with_depths(Rule::Frames16, &depths).unwrap().total,
            512
        );
        assert!(p.chain_with_depths(Rule::Frames16, &depths[..3]).is_err());
    }
}
