//! One function's frame: the verifier's `stack_depth`, by a dataflow pass over its
//! control flow graph that follows frame pointers (r10 and what derives from it).

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use super::insn::*;

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
pub(super) struct FrameInfo {
    /// The verifier's `stack_depth` for this function (an upper bound).
    pub(super) depth: u32,
    /// Instruction (function-relative) where the deepest access happens.
    deepest_at: Option<usize>,
    pub(super) tail_call: bool,
    pub(super) notes: BTreeSet<String>,
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
pub(super) fn analyze_frame(insns: &[Insn]) -> FrameInfo {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stack::{insn::build::*, MAX_BPF_STACK};

    fn depth(code: &[Insn]) -> u32 {
        analyze_frame(code).depth
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
}
