//! `cargo xtask stack [OBJECT]`: the stack the verifier will count for every program of
//! the eBPF object, worked out from the object alone (no kernel needed).
//!
//! The verifier (`check_max_stack_depth`) walks, from each program's entry, every
//! BPF-to-BPF call chain it finds in the instructions (calls in code it found dead
//! included), adds up each function's stack depth rounded per frame, and refuses the
//! program when a chain passes 512 bytes (`MAX_BPF_STACK`): "combined stack size of N
//! calls is M. Too large". The rounding depends on the kernel:
//!
//! - Linux 5.10 to 6.8: `round_up(max(depth, 1), 32)` per frame (the interpreter's
//!   granularity), JIT or not ([`Rule::Frames32`]);
//! - Linux 6.9 and newer, JIT requested (always on Debian's kernels, which set
//!   `CONFIG_BPF_JIT_ALWAYS_ON`): `round_up(depth, 16)` ([`Rule::Frames16`], commit
//!   682158ab532a "bpf: Fix test verif_scale_strobemeta_subprogs failure due to llvm19").
//!
//! The same walk also refuses more than 8 frames (`MAX_CALL_FRAMES`) and a subprogram that
//! tail-calls when the frames above it already hold 256 bytes or more.
//!
//! A function's depth is the verifier's `stack_depth`: the largest `-offset` from the
//! frame pointer r10 that is accessed in that function's frame. Here it comes from a
//! dataflow pass over each function's control flow graph that follows r10-derived pointers
//! through copies, constant adds and 8-byte spills, and counts, like the verifier, where
//! they are used: a load or store through one (`*(u32 *)(rX + off)` counts
//! `-(rX's offset + off)`), and, as an upper bound, a pointer handed to a helper or a
//! subprogram (r1-r5 at a call), stored to memory or used in arithmetic it cannot follow
//! counts its own offset. The kernel only counts what it walks (code it proves dead, e.g.
//! behind a constant argument, and subprograms it never reaches count 0), so a static
//! depth is an upper bound of the kernel's. Kernels from 6.8 (and Debian's 6.1.192, by a
//! backport) record each depth rounded up to 8 (`grow_stack_state`), which no frame
//! rounding sees. Checked on the object of d0f7da3 against the verifiers of Debian's
//! 5.10.262, 6.1.192 and 6.12.117 and this machine's 6.18: the same functions in the same
//! order and the same depths, but for one (lb::client_rewrite under mesh_tc_ingress: 8
//! here, 0 in the kernel, which proves its lookups dead for that hook). For a kernel's
//! exact chain, give its logged depths to [`Program::chain_with_depths`].

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    fmt,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context};

use crate::build;

/// `MAX_BPF_STACK`: what every chain must fit in.
pub const MAX_BPF_STACK: u32 = 512;
/// The headroom `cargo xtask test` demands of every chain: room for the next feature on
/// the deepest path without a verifier refusal.
pub const MIN_HEADROOM: u32 = 64;
/// `MAX_CALL_FRAMES`: the verifier refuses a chain of more frames than this.
pub const MAX_CALL_FRAMES: usize = 8;
/// A subprogram that tail-calls may not be reached with this much (or more) above it.
pub const TAIL_CALL_CALLERS_MAX: u32 = 256;

/// How the verifier rounds each frame before adding them up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Rule {
    /// Linux 5.10 to 6.8 (Debian 11's 5.10, RHEL 9's 5.14, Ubuntu 22.04's 5.15, Debian
    /// 12's 6.1, Ubuntu 24.04's 6.8), and newer kernels without the JIT:
    /// `round_up(max(depth, 1), 32)`.
    Frames32,
    /// Linux 6.9 and newer with the JIT (Debian 13's 6.12, 6.18): `round_up(depth, 16)`.
    Frames16,
}

impl Rule {
    pub const ALL: [Rule; 2] = [Rule::Frames32, Rule::Frames16];

    /// One frame's share of the chain.
    pub fn round(self, depth: u32) -> u32 {
        match self {
            Rule::Frames32 => depth.max(1).div_ceil(32) * 32,
            Rule::Frames16 => depth.div_ceil(16) * 16,
        }
    }

    /// The rule a kernel `major.minor` applies (the JIT assumed on, as on Debian).
    // For the kernel matrix's per-kernel table and `cargo xtask test`.
    #[allow(dead_code)]
    pub fn for_kernel(major: u32, minor: u32) -> Rule {
        if (major, minor) >= (6, 9) {
            Rule::Frames16
        } else {
            Rule::Frames32
        }
    }

    /// Short name for reports: the kernels it covers.
    pub fn label(self) -> &'static str {
        match self {
            Rule::Frames32 => "5.10-6.8",
            Rule::Frames16 => "6.9+",
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// Everything [`report`] found in one object.
#[derive(Clone, Debug)]
pub struct Report {
    pub object: PathBuf,
    pub programs: Vec<Program>,
    /// Things the analysis could not follow exactly (each names its function); the
    /// depths stay upper bounds, but worth a look.
    pub warnings: Vec<String>,
}

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
    /// (see [`parse_verifier_depths`]), which makes the chain that kernel's exactly.
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

#[derive(clap::Args)]
pub struct Stack {
    /// The eBPF object (default: target/release/mesh.bpf.o, from `cargo xtask build`).
    object: Option<PathBuf>,
    /// Bytes each program's deepest chain must leave free of the 512, by the 6.1 rule.
    #[arg(long, default_value_t = MIN_HEADROOM)]
    min_headroom: u32,
    /// Also list every function of every program: depth, instructions, callees (in the
    /// order of the verifier's `stack depth a+b+c` line under libbpf).
    #[arg(long)]
    functions: bool,
}

pub fn run(a: Stack) -> anyhow::Result<()> {
    let obj = a.object.unwrap_or_else(build::object_path);
    if !obj.exists() {
        bail!(
            "{} does not exist: `cargo xtask build` makes it",
            obj.display()
        );
    }
    let r = report(&obj)?;
    for line in r.lines(a.min_headroom) {
        println!("{line}");
    }
    if a.functions {
        for p in &r.programs {
            println!(
                "stack: {} functions (stack depth {}):",
                p.name,
                p.functions
                    .iter()
                    .map(|f| f.depth.to_string())
                    .collect::<Vec<_>>()
                    .join("+")
            );
            for f in &p.functions {
                println!(
                    "stack:   {:>4} {:<32} {:>5} insns{}{}",
                    f.depth,
                    f.name,
                    f.insns,
                    if f.tail_call { ", tail call" } else { "" },
                    if f.calls.is_empty() {
                        String::new()
                    } else {
                        format!(
                            ", calls {}",
                            f.calls
                                .iter()
                                .map(|&c| p.functions[c].name.as_str())
                                .collect::<Vec<_>>()
                                .join(" ")
                        )
                    }
                );
            }
        }
    }
    let failures = r.failures(a.min_headroom);
    if !failures.is_empty() {
        bail!(
            "stack: {} program(s) without {} bytes of stack headroom: {}",
            failures.len(),
            a.min_headroom,
            failures.join("; ")
        );
    }
    Ok(())
}

// ---- the object ----

/// One BPF instruction slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Insn {
    code: u8,
    dst: u8,
    src: u8,
    off: i16,
    imm: i32,
}

impl Insn {
    fn decode(b: &[u8]) -> Insn {
        Insn {
            code: b[0],
            dst: b[1] & 0xf,
            src: b[1] >> 4,
            off: i16::from_le_bytes([b[2], b[3]]),
            imm: i32::from_le_bytes([b[4], b[5], b[6], b[7]]),
        }
    }
}

const CLASS_LD: u8 = 0x00;
const CLASS_LDX: u8 = 0x01;
const CLASS_ST: u8 = 0x02;
const CLASS_STX: u8 = 0x03;
const CLASS_ALU: u8 = 0x04;
const CLASS_JMP: u8 = 0x05;
const CLASS_JMP32: u8 = 0x06;
const CLASS_ALU64: u8 = 0x07;
const LD_IMM64: u8 = 0x18;
const CALL: u8 = 0x85;
const MODE_MEM: u8 = 0x60;
const MODE_ATOMIC: u8 = 0xc0;
const SIZE_DW: u8 = 0x18;
const OP_ADD: u8 = 0x00;
const OP_SUB: u8 = 0x10;
const OP_MOV: u8 = 0xb0;
const OP_JA: u8 = 0x00;
const OP_CALL: u8 = 0x80;
const OP_EXIT: u8 = 0x90;
const SRC_X: u8 = 0x08;
const PSEUDO_CALL: u8 = 1;
const PSEUDO_FUNC: u8 = 4;
const ATOMIC_FETCH: i32 = 0x01;
const ATOMIC_CMPXCHG: i32 = 0xf0 | ATOMIC_FETCH;
const HELPER_TAIL_CALL: i32 = 12;

fn access_size(code: u8) -> i64 {
    match code & 0x18 {
        0x00 => 4,
        0x08 => 2,
        0x10 => 1,
        _ => 8,
    }
}

/// Where a relocation points: a symbol's section (index into [`Module::sections`] when
/// it holds code) and value.
#[derive(Clone, Debug)]
struct RelTarget {
    section: Option<usize>,
    /// The symbol's value in bytes (0 for a section symbol).
    value: u64,
    name: String,
}

#[derive(Clone, Debug, Default)]
struct CodeSection {
    name: String,
    insns: Vec<Insn>,
    /// Relocation at an instruction index.
    relocs: HashMap<usize, RelTarget>,
    /// FUNC symbols: instruction index -> name.
    symbols: BTreeMap<usize, String>,
}

/// The executable sections of an object: all the analysis needs.
#[derive(Clone, Debug, Default)]
struct Module {
    sections: Vec<CodeSection>,
}

impl Module {
    fn from_elf(data: &[u8]) -> anyhow::Result<Module> {
        use object::{
            Object, ObjectSection, ObjectSymbol, RelocationTarget, SectionKind, SymbolKind,
            SymbolSection,
        };
        let file = object::File::parse(data).context("not an ELF object")?;
        if file.architecture() != object::Architecture::Bpf {
            bail!("not a BPF object ({:?})", file.architecture());
        }
        if !file.is_little_endian() {
            bail!("a big-endian BPF object: only bpfel is handled");
        }
        let mut m = Module::default();
        let mut by_index = HashMap::new();
        for s in file.sections() {
            if s.kind() != SectionKind::Text {
                continue;
            }
            let bytes = s.data()?;
            if bytes.len() % 8 != 0 {
                bail!(
                    "section {} is {} bytes, not whole instructions",
                    s.name()?,
                    bytes.len()
                );
            }
            by_index.insert(s.index(), m.sections.len());
            m.sections.push(CodeSection {
                name: s.name()?.to_string(),
                insns: bytes.chunks_exact(8).map(Insn::decode).collect(),
                ..CodeSection::default()
            });
        }
        for sym in file.symbols() {
            if sym.kind() != SymbolKind::Text {
                continue;
            }
            if let SymbolSection::Section(idx) = sym.section() {
                if let Some(&si) = by_index.get(&idx) {
                    m.sections[si]
                        .symbols
                        .entry((sym.address() / 8) as usize)
                        .or_insert(sym.name()?.to_string());
                }
            }
        }
        for s in file.sections() {
            let Some(&si) = by_index.get(&s.index()) else {
                continue;
            };
            for (off, rel) in s.relocations() {
                let RelocationTarget::Symbol(idx) = rel.target() else {
                    continue;
                };
                let sym = file.symbol_by_index(idx)?;
                let section = match sym.section() {
                    SymbolSection::Section(i) => by_index.get(&i).copied(),
                    _ => None,
                };
                let name = match sym.name() {
                    Ok(n) if !n.is_empty() => n.to_string(),
                    _ => section
                        .map(|i| m.sections[i].name.clone())
                        .unwrap_or_default(),
                };
                m.sections[si].relocs.insert(
                    (off / 8) as usize,
                    RelTarget {
                        section,
                        value: sym.address(),
                        name,
                    },
                );
            }
        }
        Ok(m)
    }

    /// Where the call or function address at `sec`/`i` leads, as libbpf resolves it.
    fn callee(&self, sec: usize, i: usize) -> anyhow::Result<Option<(usize, usize)>> {
        let s = &self.sections[sec];
        let ins = s.insns[i];
        let rel = s.relocs.get(&i);
        let is_call = ins.code == CALL && ins.src == PSEUDO_CALL;
        let is_func_addr = ins.code == LD_IMM64
            && (ins.src == PSEUDO_FUNC || rel.is_some_and(|r| r.section.is_some()));
        if !is_call && !is_func_addr {
            return Ok(None);
        }
        let target = match rel {
            Some(r) => {
                let Some(tsec) = r.section else {
                    if is_call {
                        // An extern (a kfunc): not a subprogram.
                        return Ok(None);
                    }
                    bail!(
                        "{}+{i}: function address relocated against {}, which is not in a code section",
                        s.name,
                        r.name
                    );
                };
                let base = r.value as i64 / 8;
                let idx = if is_call {
                    base + i64::from(ins.imm) + 1
                } else {
                    (r.value as i64 + i64::from(ins.imm)) / 8
                };
                (tsec, idx)
            }
            None => (sec, i as i64 + i64::from(ins.imm) + 1),
        };
        let n = self.sections[target.0].insns.len() as i64;
        if target.1 < 0 || target.1 >= n {
            bail!(
                "{}+{i}: call to instruction {} of {}, which has {n}",
                s.name,
                target.1,
                self.sections[target.0].name
            );
        }
        Ok(Some((target.0, target.1 as usize)))
    }

    fn analyze(&self) -> anyhow::Result<Report> {
        // Function starts: FUNC symbols and every call target, as the verifier splits
        // subprograms.
        let mut starts: Vec<BTreeSet<usize>> = self
            .sections
            .iter()
            .map(|s| s.symbols.keys().copied().collect())
            .collect();
        for (si, s) in self.sections.iter().enumerate() {
            for i in 0..s.insns.len() {
                if let Some((ts, ti)) = self.callee(si, i)? {
                    starts[ts].insert(ti);
                }
            }
        }
        struct Func {
            section: usize,
            start: usize,
            end: usize,
            symbol: String,
            frame: FrameInfo,
            calls: Vec<usize>,
        }
        let mut funcs: Vec<Func> = Vec::new();
        let mut id_of: HashMap<(usize, usize), usize> = HashMap::new();
        for (si, s) in self.sections.iter().enumerate() {
            let st: Vec<usize> = starts[si].iter().copied().collect();
            for (k, &start) in st.iter().enumerate() {
                let end = st.get(k + 1).copied().unwrap_or(s.insns.len());
                let symbol = s
                    .symbols
                    .get(&start)
                    .cloned()
                    .unwrap_or_else(|| format!("{}+{start}", s.name));
                id_of.insert((si, start), funcs.len());
                funcs.push(Func {
                    section: si,
                    start,
                    end,
                    frame: analyze_frame(&s.insns[start..end]),
                    symbol,
                    calls: Vec::new(),
                });
            }
        }
        for f in funcs.iter_mut() {
            for i in f.start..f.end {
                if let Some(t) = self.callee(f.section, i)? {
                    let id = id_of[&t];
                    if !f.calls.contains(&id) {
                        f.calls.push(id);
                    }
                }
            }
        }
        let mut warnings = Vec::new();
        for f in &funcs {
            for n in &f.frame.notes {
                warnings.push(format!("{}: {n}", demangle(&f.symbol)));
            }
        }
        // Programs: every function in an executable section other than .text, as libbpf.
        let calls: Vec<Vec<usize>> = funcs.iter().map(|f| f.calls.clone()).collect();
        let names: Vec<String> = funcs.iter().map(|f| demangle(&f.symbol)).collect();
        let mut programs = Vec::new();
        for (si, s) in self.sections.iter().enumerate() {
            if s.name == ".text" {
                continue;
            }
            for &start in s.symbols.keys() {
                let entry = id_of[&(si, start)];
                let order = libbpf_order(entry, &calls, &names)
                    .with_context(|| format!("program {}", names[entry]))?;
                let local: HashMap<usize, usize> =
                    order.iter().enumerate().map(|(k, &g)| (g, k)).collect();
                let functions: Vec<Function> = order
                    .iter()
                    .map(|&g| {
                        let f = &funcs[g];
                        Function {
                            name: demangle(&f.symbol),
                            symbol: f.symbol.clone(),
                            depth: f.frame.depth,
                            insns: f.end - f.start,
                            calls: f.calls.iter().map(|c| local[c]).collect(),
                            tail_call: f.frame.tail_call,
                        }
                    })
                    .collect();
                programs.push(Program::new(
                    demangle(&funcs[entry].symbol),
                    s.name.clone(),
                    functions,
                ));
            }
        }
        Ok(Report {
            object: PathBuf::new(),
            programs,
            warnings,
        })
    }
}

/// The functions reachable from `entry` in libbpf's layout: the entry, then each
/// subprogram when first called, appended and relocated at once (depth first). Errors on
/// recursion, which the verifier refuses.
fn libbpf_order(
    entry: usize,
    calls: &[Vec<usize>],
    names: &[String],
) -> anyhow::Result<Vec<usize>> {
    fn visit(
        f: usize,
        calls: &[Vec<usize>],
        names: &[String],
        order: &mut Vec<usize>,
        on_path: &mut Vec<usize>,
    ) -> anyhow::Result<()> {
        for &g in &calls[f] {
            if on_path.contains(&g) {
                let mut cycle: Vec<&str> = on_path.iter().map(|&x| names[x].as_str()).collect();
                cycle.push(&names[g]);
                bail!(
                    "recursion, which the verifier refuses: {}",
                    cycle.join(" > ")
                );
            }
            if order.contains(&g) {
                continue;
            }
            order.push(g);
            on_path.push(g);
            visit(g, calls, names, order, on_path)?;
            on_path.pop();
        }
        Ok(())
    }
    let mut order = vec![entry];
    visit(entry, calls, names, &mut order, &mut vec![entry])?;
    Ok(order)
}

impl Program {
    fn new(name: String, section: String, functions: Vec<Function>) -> Program {
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

// ---- one function's frame ----

/// What one register or spilled slot may hold, for the stack's purposes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Val {
    /// Not a pointer into this frame (as far as the analysis knows).
    Other,
    /// A known constant (to follow `r1 = -64; r2 = r10; r2 += r1`).
    Const(i64),
    /// Maybe a pointer into this frame, at `r10 + lo` or above (`exact`: at `r10 + lo`
    /// whenever it is one).
    Stack { lo: i64, exact: bool },
}

fn join_val(a: Val, b: Val) -> Val {
    match (a, b) {
        _ if a == b => a,
        (Val::Stack { lo: x, .. }, Val::Stack { lo: y, .. }) => Val::Stack {
            lo: x.min(y),
            exact: false,
        },
        (s @ Val::Stack { .. }, _) | (_, s @ Val::Stack { .. }) => s,
        _ => Val::Other,
    }
}

/// The lowest frame offset followed: a pointer moving down the stack in a loop is widened
/// to it (a depth no verifier accepts, so the report shows it), and arithmetic stops there.
const STACK_FLOOR: i64 = -4096;
/// Visits of one instruction before widening.
const WIDEN_AFTER: u32 = 16;

#[derive(Clone, Debug, PartialEq, Eq)]
struct State {
    regs: [Val; 11],
    /// 8-byte spills of stack pointers to fixed offsets of this frame.
    slots: BTreeMap<i64, Val>,
}

impl State {
    fn entry() -> State {
        let mut regs = [Val::Other; 11];
        regs[10] = Val::Stack { lo: 0, exact: true };
        State {
            regs,
            slots: BTreeMap::new(),
        }
    }

    /// Joins `other` in: (this state grew, a stack pointer was widened). With `widen`, a
    /// stack pointer that went lower goes to the floor at once.
    fn join(&mut self, other: &State, widen: bool) -> (bool, bool) {
        let old = self.clone();
        let mut widened = false;
        let mut merge = |cur: Val, new: Val| match (cur, join_val(cur, new)) {
            (Val::Stack { lo: a, .. }, Val::Stack { lo: b, .. }) if widen && b < a => {
                widened = true;
                Val::Stack {
                    lo: STACK_FLOOR,
                    exact: false,
                }
            }
            (_, j) => j,
        };
        for r in 0..11 {
            self.regs[r] = merge(self.regs[r], other.regs[r]);
        }
        for (&k, &v) in &other.slots {
            let cur = self.slots.get(&k).copied().unwrap_or(Val::Other);
            self.slots.insert(k, merge(cur, v));
        }
        (*self != old, widened)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct FrameInfo {
    /// The verifier's `stack_depth` for this function (an upper bound).
    depth: u32,
    /// Instruction (function-relative) where the deepest access happens.
    deepest_at: Option<usize>,
    tail_call: bool,
    notes: BTreeSet<String>,
}

impl FrameInfo {
    /// An access at `r10 + addr` from instruction `i`.
    fn touch(&mut self, addr: i64, i: usize) {
        if addr < 0 {
            let d = u32::try_from(-addr).unwrap_or(u32::MAX);
            if d > self.depth {
                self.depth = d;
                self.deepest_at = Some(i);
            }
        }
    }

    /// A maybe-stack value leaves what the analysis follows: count all of it from `lo`.
    fn escape(&mut self, v: Val, i: usize) {
        if let Val::Stack { lo, .. } = v {
            self.touch(lo, i);
        }
    }

    /// An access through `base + off`.
    fn access(&mut self, base: Val, off: i16, i: usize) {
        if let Val::Stack { lo, .. } = base {
            self.touch(lo + i64::from(off), i);
        }
    }
}

/// The stack depth of one function: `insns` runs from its entry to its end.
fn analyze_frame(insns: &[Insn]) -> FrameInfo {
    let n = insns.len();
    let mut info = FrameInfo::default();
    if n == 0 {
        return info;
    }
    let mut states: Vec<Option<State>> = vec![None; n];
    let mut visits = vec![0u32; n];
    let mut queued = vec![false; n];
    let mut work = VecDeque::new();
    states[0] = Some(State::entry());
    work.push_back(0);
    queued[0] = true;
    while let Some(i) = work.pop_front() {
        queued[i] = false;
        let mut st = states[i].clone().expect("queued with a state");
        let succs = step(insns, i, &mut st, &mut info);
        for s in succs {
            if s >= n {
                info.notes.insert(format!(
                    "instruction {i} jumps to {s}, outside the function ({n} instructions)"
                ));
                continue;
            }
            let grew = match &mut states[s] {
                None => {
                    states[s] = Some(st.clone());
                    true
                }
                Some(old) => {
                    visits[s] += 1;
                    let (grew, widened) = old.join(&st, visits[s] > WIDEN_AFTER);
                    if widened {
                        info.notes.insert(format!(
                            "a stack pointer moves down in a loop at instruction {s}: depth unknown, counted as {}",
                            -STACK_FLOOR
                        ));
                    }
                    grew
                }
            };
            if grew && !queued[s] {
                queued[s] = true;
                work.push_back(s);
            }
        }
    }
    info
}

/// Applies instruction `i` to `st`, recording accesses; returns its successors.
fn step(insns: &[Insn], i: usize, st: &mut State, info: &mut FrameInfo) -> Vec<usize> {
    let ins = insns[i];
    let (d, s) = (ins.dst as usize, ins.src as usize);
    if d > 10 || s > 10 {
        info.notes
            .insert(format!("instruction {i} names a register above r10"));
        return vec![i + 1];
    }
    let class = ins.code & 0x07;
    let mode = ins.code & 0xe0;
    let next = vec![i + 1];
    match class {
        CLASS_LD => {
            if ins.code == LD_IMM64 {
                st.regs[d] = Val::Other;
                return vec![i + 2];
            }
            // LD_ABS / LD_IND: a call in disguise (r0 out, r1-r5 clobbered).
            info.escape(st.regs[s], i);
            clobber_call(st);
            next
        }
        CLASS_LDX => {
            let base = st.regs[s];
            info.access(base, ins.off, i);
            st.regs[d] = match base {
                Val::Stack { lo, exact: true }
                    if mode == MODE_MEM && ins.code & 0x18 == SIZE_DW =>
                {
                    st.slots
                        .get(&(lo + i64::from(ins.off)))
                        .copied()
                        .unwrap_or(Val::Other)
                }
                _ => Val::Other,
            };
            next
        }
        CLASS_ST => {
            info.access(st.regs[d], ins.off, i);
            store(st, d, ins, Val::Other, info, i);
            next
        }
        CLASS_STX => {
            info.access(st.regs[d], ins.off, i);
            if mode == MODE_ATOMIC {
                info.escape(st.regs[s], i);
                store(st, d, ins, Val::Other, info, i);
                if ins.imm == ATOMIC_CMPXCHG {
                    st.regs[0] = Val::Other;
                } else if ins.imm & ATOMIC_FETCH != 0 {
                    st.regs[s] = Val::Other;
                }
            } else {
                let v = st.regs[s];
                store(st, d, ins, v, info, i);
            }
            next
        }
        CLASS_ALU | CLASS_ALU64 => {
            alu(st, ins, class == CLASS_ALU64, info, i);
            next
        }
        CLASS_JMP | CLASS_JMP32 => {
            let op = ins.code & 0xf0;
            if class == CLASS_JMP && op == OP_CALL {
                // Helpers, kfuncs and subprograms alike: a frame pointer in r1-r5 is
                // handed over, and the callee may touch all of it.
                for r in 1..=5 {
                    info.escape(st.regs[r], i);
                }
                if ins.src == 0 && ins.imm == HELPER_TAIL_CALL {
                    info.tail_call = true;
                }
                clobber_call(st);
                return next;
            }
            if class == CLASS_JMP && op == OP_EXIT {
                info.escape(st.regs[0], i);
                return Vec::new();
            }
            let target = |off: i64| (i as i64 + 1 + off).max(0) as usize;
            if op == OP_JA {
                let off = if class == CLASS_JMP32 {
                    i64::from(ins.imm)
                } else {
                    i64::from(ins.off)
                };
                return vec![target(off)];
            }
            // Conditional jumps (and may_goto): both ways.
            vec![i + 1, target(i64::from(ins.off))]
        }
        _ => next,
    }
}

fn clobber_call(st: &mut State) {
    for r in 0..=5 {
        st.regs[r] = Val::Other;
    }
}

/// A store of `v` through register `base` (instruction `ins`): tracks 8-byte spills of
/// frame pointers to fixed slots, counts every other frame pointer stored as escaping.
fn store(st: &mut State, base: usize, ins: Insn, v: Val, info: &mut FrameInfo, i: usize) {
    let size = access_size(ins.code);
    match st.regs[base] {
        Val::Stack { lo, exact: true } => {
            let at = lo + i64::from(ins.off);
            // Whatever overlaps [at, at + size) is overwritten.
            let hit: Vec<i64> = st.slots.range(at - 7..at + size).map(|(&k, _)| k).collect();
            for k in hit {
                st.slots.remove(&k);
            }
            if matches!(v, Val::Stack { .. }) {
                if size == 8 && ins.code & 0xe0 == MODE_MEM {
                    st.slots.insert(at, v);
                } else {
                    info.escape(v, i);
                }
            }
        }
        _ => info.escape(v, i),
    }
}

fn alu(st: &mut State, ins: Insn, is64: bool, info: &mut FrameInfo, i: usize) {
    let (d, s) = (ins.dst as usize, ins.src as usize);
    let op = ins.code & 0xf0;
    let from_reg = ins.code & SRC_X != 0;
    let dv = st.regs[d];
    let sv = if from_reg {
        st.regs[s]
    } else {
        Val::Const(i64::from(ins.imm))
    };
    let out = if !is64 {
        // 32-bit: no pointer survives it.
        info.escape(sv, i);
        if op != OP_MOV {
            info.escape(dv, i);
        }
        match (op, sv) {
            (OP_MOV, Val::Const(c)) if !from_reg => Val::Const(i64::from(c as u32)),
            _ => Val::Other,
        }
    } else {
        match op {
            OP_MOV if ins.off == 0 => sv,
            OP_ADD | OP_SUB => {
                let sign = if op == OP_ADD { 1 } else { -1 };
                match (dv, sv) {
                    (Val::Stack { lo, exact }, Val::Const(c)) => Val::Stack {
                        lo: lo.saturating_add(sign * c).max(STACK_FLOOR),
                        exact,
                    },
                    (Val::Const(c), Val::Stack { lo, exact }) if op == OP_ADD => Val::Stack {
                        lo: lo.saturating_add(c).max(STACK_FLOOR),
                        exact,
                    },
                    (Val::Const(a), Val::Const(b)) => Val::Const(a.wrapping_add(sign * b)),
                    // Pointer minus pointer: a number.
                    (Val::Stack { .. }, Val::Stack { .. }) if op == OP_SUB => Val::Other,
                    (Val::Stack { .. }, _) | (_, Val::Stack { .. }) => {
                        info.escape(dv, i);
                        info.escape(sv, i);
                        info.notes.insert(format!(
                            "instruction {i} adds an unknown amount to a stack pointer: the depth counts only where it started"
                        ));
                        Val::Other
                    }
                    _ => Val::Other,
                }
            }
            _ => {
                info.escape(dv, i);
                info.escape(sv, i);
                Val::Other
            }
        }
    };
    st.regs[d] = out;
}

// ---- names ----

/// `_RNvNtCs7ejwpq4MZjP_4mesh2lb8new_flow` -> `lb::new_flow` (Rust v0 mangling, crate
/// dropped, generic arguments dropped); anything else as it is.
pub fn demangle(sym: &str) -> String {
    let Some(rest) = sym.strip_prefix("_R") else {
        return sym.to_string();
    };
    let mut p = V0 {
        s: rest.as_bytes(),
        i: 0,
    };
    match p.path(true) {
        Some(segs) if segs.len() > 1 => segs[1..].join("::"),
        Some(segs) if !segs.is_empty() => segs.join("::"),
        _ => sym.to_string(),
    }
}

struct V0<'a> {
    s: &'a [u8],
    i: usize,
}

impl V0<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let c = self.peek()?;
        self.i += 1;
        Some(c)
    }

    fn path(&mut self, top: bool) -> Option<Vec<String>> {
        match self.next()? {
            b'C' => Some(vec![self.ident()?]),
            b'N' => {
                let ns = self.next()?;
                let mut p = self.path(false)?;
                let id = self.ident()?;
                p.push(match (ns, id.is_empty()) {
                    (b'C', true) => "{closure}".to_string(),
                    (_, true) => "{anon}".to_string(),
                    _ => id,
                });
                Some(p)
            }
            // Generic instantiation: the path is enough (arguments follow, then `E`).
            b'I' if top => self.path(false),
            _ => None,
        }
    }

    fn ident(&mut self) -> Option<String> {
        if self.peek() == Some(b's') {
            self.i += 1;
            while self.next()? != b'_' {}
        }
        if self.peek() == Some(b'u') {
            self.i += 1;
        }
        let start = self.i;
        while self.peek()?.is_ascii_digit() {
            self.i += 1;
        }
        let len: usize = std::str::from_utf8(&self.s[start..self.i])
            .ok()?
            .parse()
            .ok()?;
        if self.peek() == Some(b'_') {
            self.i += 1;
        }
        let id = self.s.get(self.i..self.i + len)?;
        self.i += len;
        String::from_utf8(id.to_vec()).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Instruction builders (dst, src as register numbers).
    fn ins(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
        Insn {
            code,
            dst,
            src,
            off,
            imm,
        }
    }
    fn mov(dst: u8, src: u8) -> Insn {
        ins(0xbf, dst, src, 0, 0)
    }
    fn mov_imm(dst: u8, imm: i32) -> Insn {
        ins(0xb7, dst, 0, 0, imm)
    }
    fn add_imm(dst: u8, imm: i32) -> Insn {
        ins(0x07, dst, 0, 0, imm)
    }
    fn add(dst: u8, src: u8) -> Insn {
        ins(0x0f, dst, src, 0, 0)
    }
    fn stx_dw(dst: u8, off: i16, src: u8) -> Insn {
        ins(0x7b, dst, src, off, 0)
    }
    fn stx_w(dst: u8, off: i16, src: u8) -> Insn {
        ins(0x63, dst, src, off, 0)
    }
    fn st_b(dst: u8, off: i16, imm: i32) -> Insn {
        ins(0x72, dst, 0, off, imm)
    }
    fn ldx_dw(dst: u8, src: u8, off: i16) -> Insn {
        ins(0x79, dst, src, off, 0)
    }
    fn call(helper: i32) -> Insn {
        ins(0x85, 0, 0, 0, helper)
    }
    fn call_sub(rel: i32) -> Insn {
        ins(0x85, 0, PSEUDO_CALL, 0, rel)
    }
    fn jeq_imm(dst: u8, imm: i32, off: i16) -> Insn {
        ins(0x15, dst, 0, off, imm)
    }
    fn jlt_imm(dst: u8, imm: i32, off: i16) -> Insn {
        ins(0xa5, dst, 0, off, imm)
    }
    fn ja(off: i16) -> Insn {
        ins(0x05, 0, 0, off, 0)
    }
    fn exit() -> Insn {
        ins(0x95, 0, 0, 0, 0)
    }
    fn depth(code: &[Insn]) -> u32 {
        analyze_frame(code).depth
    }

    #[test]
    fn rounding_per_kernel() {
        assert_eq!(Rule::Frames32.round(0), 32);
        assert_eq!(Rule::Frames32.round(104), 128);
        assert_eq!(Rule::Frames32.round(96), 96);
        assert_eq!(Rule::Frames32.round(208), 224);
        assert_eq!(Rule::Frames16.round(0), 0);
        assert_eq!(Rule::Frames16.round(104), 112);
        assert_eq!(Rule::Frames16.round(8), 16);
        assert_eq!(Rule::for_kernel(5, 10), Rule::Frames32);
        assert_eq!(Rule::for_kernel(6, 1), Rule::Frames32);
        assert_eq!(Rule::for_kernel(6, 8), Rule::Frames32);
        assert_eq!(Rule::for_kernel(6, 12), Rule::Frames16);
        assert_eq!(Rule::for_kernel(6, 18), Rule::Frames16);
    }

    #[test]
    fn direct_frame_accesses() {
        assert_eq!(depth(&[mov_imm(0, 0), exit()]), 0);
        assert_eq!(depth(&[stx_dw(10, -8, 1), exit()]), 8);
        assert_eq!(
            depth(&[
                stx_w(10, -4, 1),
                ldx_dw(2, 10, -24),
                st_b(10, -13, 0),
                exit()
            ]),
            24
        );
    }

    #[test]
    fn pointer_handed_to_a_helper() {
        // r2 = r10; r2 += -64; call map_lookup_elem
        let code = [mov(2, 10), add_imm(2, -64), call(1), exit()];
        assert_eq!(depth(&code), 64);
        // to a subprogram, likewise
        let code = [mov(1, 10), add_imm(1, -72), call_sub(1), exit(), exit()];
        assert_eq!(analyze_frame(&code[..4]).depth, 72);
    }

    #[test]
    fn derived_pointer_counts_where_used() {
        // Made but never used: nothing (the verifier counts accesses).
        assert_eq!(depth(&[mov(1, 10), add_imm(1, -48), exit()]), 0);
        // Copied, then a field 4 bytes in: 44.
        let code = [
            mov(1, 10),
            add_imm(1, -48),
            mov(2, 1),
            st_b(2, 4, 0),
            exit(),
        ];
        assert_eq!(depth(&code), 44);
        // Below where the pointer was made: deeper.
        let code = [mov(6, 10), add_imm(6, -16), stx_dw(6, -48, 1), exit()];
        assert_eq!(depth(&code), 64);
        // Offset from a constant in a register.
        let code = [mov_imm(3, -40), mov(1, 10), add(1, 3), call(1), exit()];
        assert_eq!(depth(&code), 40);
        // A 32-bit operation on a frame pointer: counted where it started.
        let code = [mov(1, 10), add_imm(1, -96), ins(0x04, 1, 0, 0, 0), exit()];
        assert_eq!(depth(&code), 96);
    }

    #[test]
    fn spilled_pointer_followed_through_the_fill() {
        let code = [
            mov(1, 10),
            add_imm(1, -100),
            stx_dw(10, -8, 1), // spill (an 8-byte access: 8)
            mov_imm(1, 0),
            ldx_dw(3, 10, -8), // fill
            call(1),           // r3 handed over: 100
            exit(),
        ];
        let f = analyze_frame(&code);
        assert_eq!(f.depth, 100);
        assert_eq!(f.deepest_at, Some(5));
        // Overwritten before the fill: only the slot itself.
        let code = [
            mov(1, 10),
            add_imm(1, -100),
            stx_dw(10, -8, 1),
            mov_imm(1, 0),
            st_b(10, -8, 0),
            ldx_dw(3, 10, -8),
            call(1),
            exit(),
        ];
        assert_eq!(depth(&code), 8);
        // Stored anywhere else: escapes, counted whole.
        let code = [mov(1, 10), add_imm(1, -100), stx_dw(6, 0, 1), exit()];
        assert_eq!(depth(&code), 100);
    }

    #[test]
    fn branches_join_to_the_deepest() {
        // if r1 == 0 { r2 = fp-32 } else { r2 = fp-96 }; call
        let code = [
            mov(2, 10),
            jeq_imm(1, 0, 2),
            add_imm(2, -96),
            ja(1),
            add_imm(2, -32),
            call(1),
            exit(),
        ];
        assert_eq!(depth(&code), 96);
    }

    #[test]
    fn unreachable_code_is_not_counted() {
        let code = [mov_imm(0, 0), exit(), stx_dw(10, -256, 1), exit()];
        assert_eq!(depth(&code), 0);
    }

    #[test]
    fn loops_terminate() {
        // Zero 64 bytes upwards from fp-64.
        let code = [
            mov(1, 10),
            add_imm(1, -64),
            mov_imm(2, 0),
            st_b(1, 0, 0), // 3
            add_imm(1, 1),
            add_imm(2, 1),
            jlt_imm(2, 64, -4),
            exit(),
        ];
        let f = analyze_frame(&code);
        assert_eq!(f.depth, 64);
        assert!(f.notes.is_empty(), "{:?}", f.notes);
        // Downwards without end: widened, and said.
        let code = [
            mov(1, 10),
            add_imm(1, -8),
            st_b(1, 0, 0), // 2
            add_imm(1, -8),
            jlt_imm(2, 64, -3),
            exit(),
        ];
        let f = analyze_frame(&code);
        assert!(f.depth > MAX_BPF_STACK, "{}", f.depth);
        assert!(
            f.notes.iter().any(|n| n.contains("moves down")),
            "{:?}",
            f.notes
        );
    }

    #[test]
    fn variable_offset_is_reported() {
        let code = [mov(1, 10), add_imm(1, -32), add(1, 6), call(1), exit()];
        let f = analyze_frame(&code);
        assert_eq!(f.depth, 32);
        assert!(f.notes.iter().any(|n| n.contains("unknown amount")));
    }

    #[test]
    fn tail_call_and_ld_imm64() {
        let code = [
            ins(LD_IMM64, 2, 1, 0, 7),
            ins(0, 0, 0, 0, 0),
            mov_imm(3, 0),
            call(HELPER_TAIL_CALL),
            exit(),
        ];
        let f = analyze_frame(&code);
        assert!(f.tail_call);
        assert_eq!(f.depth, 0);
    }

    /// A program section calling into .text through a relocation against the .text
    /// section symbol (as LLVM emits for static functions), and .text calling itself
    /// pc-relative.
    fn module(deep: i16) -> Module {
        let text = CodeSection {
            name: ".text".into(),
            insns: vec![
                // 0: a: 40 bytes, calls b pc-relative, then memset by relocation
                stx_dw(10, -40, 1),
                call_sub(2),  // -> 4
                call_sub(-1), // relocated -> memset (7)
                exit(),
                // 4: b: `deep` bytes
                st_b(10, deep, 0),
                mov_imm(0, 0),
                exit(),
                // 7: memset: no stack
                mov_imm(0, 0),
                exit(),
            ],
            relocs: HashMap::from([(
                2,
                RelTarget {
                    section: Some(1),
                    value: 7 * 8,
                    name: "memset".into(),
                },
            )]),
            symbols: BTreeMap::from([
                (0, "_RNvNtCs7ejwpq4MZjP_4mesh8datapath8dispatch".to_string()),
                (4, "_RNvNtCs7ejwpq4MZjP_4mesh2lb8new_flow".to_string()),
                (7, "memset".to_string()),
            ]),
        };
        let prog = CodeSection {
            name: "classifier".into(),
            insns: vec![
                stx_dw(10, -104, 1),
                call_sub(-1), // relocated against .text + 0: imm = 0 - 1
                exit(),
                // a second program in the same section
                mov_imm(0, 0),
                exit(),
            ],
            relocs: HashMap::from([(
                1,
                RelTarget {
                    section: Some(1),
                    value: 0,
                    name: ".text".into(),
                },
            )]),
            symbols: BTreeMap::from([
                (0, "mesh_tc_ingress".to_string()),
                (3, "mesh_tc_other".to_string()),
            ]),
        };
        Module {
            sections: vec![prog, text],
        }
    }

    #[test]
    fn call_graph_and_chains() {
        let r = module(-200).analyze().unwrap();
        assert!(r.warnings.is_empty(), "{:?}", r.warnings);
        let names: Vec<&str> = r.programs.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["mesh_tc_ingress", "mesh_tc_other"]);
        let p = &r.programs[0];
        assert_eq!(p.section, "classifier");
        let order: Vec<&str> = p.functions.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(
            order,
            [
                "mesh_tc_ingress",
                "datapath::dispatch",
                "lb::new_flow",
                "memset"
            ]
        );
        let depths: Vec<u32> = p.functions.iter().map(|f| f.depth).collect();
        assert_eq!(depths, [104, 40, 200, 0]);
        assert_eq!(p.frames, 3);
        assert_eq!(p.insns(), 3 + 4 + 3 + 2);
        let c = p.chain(Rule::Frames32);
        assert_eq!(c.total, 128 + 64 + 224);
        assert_eq!(
            c.to_string(),
            "mesh_tc_ingress 104->128 > datapath::dispatch 40->64 > lb::new_flow 200->224 = 416"
        );
        assert_eq!(p.depth(Rule::Frames16), 112 + 48 + 208);
        assert_eq!(p.headroom(Rule::Frames32), 96);
        assert!(r.failures(64).is_empty());
        assert_eq!(r.failures(97).len(), 1);
        let other = &r.programs[1];
        assert_eq!(other.depth(Rule::Frames32), 32);
        assert_eq!(other.depth(Rule::Frames16), 0);
        // Every line is a `stack:` line.
        assert!(r.lines(64).iter().all(|l| l.starts_with("stack:")));
    }

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

    #[test]
    fn refusals_beyond_the_sum() {
        // Too deep at 600 bytes.
        let r = module(-600 + 128 + 64).analyze().unwrap();
        let p = &r.programs[0];
        assert_eq!(p.depth(Rule::Frames32), 128 + 64 + 416);
        assert_eq!(
            p.refusal(Rule::Frames32).unwrap(),
            "combined stack size of 3 calls is 608. Too large"
        );
        assert_eq!(r.failures(0).len(), 1);
        // The walk stops at the first chain over 512, which need not be the deepest.
        let d = [104, 96, 96, 208, 8];
        let f = |calls: Vec<usize>| Function {
            name: String::new(),
            symbol: String::new(),
            depth: 0,
            insns: 1,
            calls,
            tail_call: false,
        };
        let p = Program::new(
            "p".into(),
            "s".into(),
            vec![f(vec![1]), f(vec![2]), f(vec![3]), f(vec![4]), f(vec![])],
        );
        assert_eq!(
            p.refusal_with(Rule::Frames32, &d).unwrap(),
            "combined stack size of 4 calls is 544. Too large"
        );
        assert_eq!(p.chain_with_depths(Rule::Frames32, &d).unwrap().total, 576);
        assert_eq!(p.refusal_with(Rule::Frames16, &[104, 96, 96, 208, 0]), None);
        // Nine nested frames.
        let text = CodeSection {
            name: ".text".into(),
            insns: (0..9)
                .flat_map(|k| {
                    if k < 8 {
                        [call_sub(1), exit()]
                    } else {
                        [mov_imm(0, 0), exit()]
                    }
                })
                .collect(),
            ..CodeSection::default()
        };
        let m = Module {
            sections: vec![
                CodeSection {
                    name: "xdp".into(),
                    insns: vec![call_sub(-1), exit()],
                    relocs: HashMap::from([(
                        0,
                        RelTarget {
                            section: Some(1),
                            value: 0,
                            name: ".text".into(),
                        },
                    )]),
                    symbols: BTreeMap::from([(0, "mesh_xdp".to_string())]),
                },
                text,
            ],
        };
        let r = m.analyze().unwrap();
        assert_eq!(r.programs[0].frames, 10);
        assert_eq!(
            r.programs[0].refusal(Rule::Frames16).unwrap(),
            "the call stack of 8 frames is too deep !"
        );
        // A tail call under 256 bytes of frames.
        let mut m = module(-8);
        m.sections[1].insns[4] = call(HELPER_TAIL_CALL);
        m.sections[0].insns[0] = stx_dw(10, -250, 1);
        let r = m.analyze().unwrap();
        let p = &r.programs[0];
        assert!(p.functions[2].tail_call);
        assert_eq!(
            p.refusal(Rule::Frames32).unwrap(),
            "tail_calls are not allowed when call stack of previous frames is 320 bytes. Too large"
        );
        // 256 + 48 by the 16-byte rule: refused as well; 232 above it would pass.
        assert!(p.refusal(Rule::Frames16).is_some());
    }

    #[test]
    fn recursion_is_an_error() {
        let mut m = module(-8);
        m.sections[1].insns[5] = call_sub(-6); // new_flow calls dispatch
        let e = m.analyze().unwrap_err();
        assert!(format!("{e:#}").contains("recursion"), "{e:#}");
    }

    #[test]
    fn demangles_v0() {
        assert_eq!(
            demangle("_RNvNtCs7ejwpq4MZjP_4mesh2lb8new_flow"),
            "lb::new_flow"
        );
        assert_eq!(
            demangle("_RINvNtCs7ejwpq4MZjP_4mesh8datapath18parse_into_scratchNtNtB4_3pkt12DirectPacketEB4_"),
            "datapath::parse_into_scratch"
        );
        assert_eq!(demangle("memset"), "memset");
        assert_eq!(demangle("_Rbroken"), "_Rbroken");
    }

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
