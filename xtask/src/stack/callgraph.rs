//! The call graph: the object's code cut into subprograms as the verifier cuts it, each
//! frame measured, and every program's reachable functions in libbpf's order.

use std::{
    collections::{BTreeSet, HashMap},
    path::PathBuf,
};

use anyhow::{bail, Context};

use super::{
    demangle::demangle,
    elf::Module,
    frame::{analyze_frame, FrameInfo},
    program::Function,
    Program, Report,
};

impl Module {
    pub(super) fn analyze(&self) -> anyhow::Result<Report> {
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

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap};

    use super::*;
    use crate::stack::{
        elf::{CodeSection, RelTarget},
        insn::{build::*, HELPER_TAIL_CALL},
        Rule,
    };

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
}
