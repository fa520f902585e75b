//! The object's code as the analysis needs it: the executable sections, their FUNC
//! symbols and relocations, and where a call or a function address leads.

use std::collections::{BTreeMap, HashMap};

use anyhow::{bail, Context};

use super::insn::{Insn, CALL, LD_IMM64, PSEUDO_CALL, PSEUDO_FUNC};

/// Where a relocation points: a symbol's section (index into [`Module::sections`] when
/// it holds code) and value.
#[derive(Clone, Debug)]
pub(super) struct RelTarget {
    pub(super) section: Option<usize>,
    /// The symbol's value in bytes (0 for a section symbol).
    pub(super) value: u64,
    pub(super) name: String,
}

#[derive(Clone, Debug, Default)]
pub(super) struct CodeSection {
    pub(super) name: String,
    pub(super) insns: Vec<Insn>,
    /// Relocation at an instruction index.
    pub(super) relocs: HashMap<usize, RelTarget>,
    /// FUNC symbols: instruction index -> name.
    pub(super) symbols: BTreeMap<usize, String>,
}

/// The executable sections of an object: all the analysis needs.
#[derive(Clone, Debug, Default)]
pub(super) struct Module {
    pub(super) sections: Vec<CodeSection>,
}

impl Module {
    pub(super) fn from_elf(data: &[u8]) -> anyhow::Result<Module> {
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
    pub(super) fn callee(&self, sec: usize, i: usize) -> anyhow::Result<Option<(usize, usize)>> {
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
}
