//! One BPF instruction slot, decoded, and the opcode fields the analysis reads.

/// One BPF instruction slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Insn {
    pub(super) code: u8,
    pub(super) dst: u8,
    pub(super) src: u8,
    pub(super) off: i16,
    pub(super) imm: i32,
}

impl Insn {
    pub(super) fn decode(b: &[u8]) -> Insn {
        Insn {
            code: b[0],
            dst: b[1] & 0xf,
            src: b[1] >> 4,
            off: i16::from_le_bytes([b[2], b[3]]),
            imm: i32::from_le_bytes([b[4], b[5], b[6], b[7]]),
        }
    }
}

pub(super) const CLASS_LD: u8 = 0x00;
pub(super) const CLASS_LDX: u8 = 0x01;
pub(super) const CLASS_ST: u8 = 0x02;
pub(super) const CLASS_STX: u8 = 0x03;
pub(super) const CLASS_ALU: u8 = 0x04;
pub(super) const CLASS_JMP: u8 = 0x05;
pub(super) const CLASS_JMP32: u8 = 0x06;
pub(super) const CLASS_ALU64: u8 = 0x07;
pub(super) const LD_IMM64: u8 = 0x18;
pub(super) const CALL: u8 = 0x85;
pub(super) const MODE_MEM: u8 = 0x60;
pub(super) const MODE_ATOMIC: u8 = 0xc0;
pub(super) const SIZE_DW: u8 = 0x18;
pub(super) const OP_ADD: u8 = 0x00;
pub(super) const OP_SUB: u8 = 0x10;
pub(super) const OP_MOV: u8 = 0xb0;
pub(super) const OP_JA: u8 = 0x00;
pub(super) const OP_CALL: u8 = 0x80;
pub(super) const OP_EXIT: u8 = 0x90;
pub(super) const SRC_X: u8 = 0x08;
pub(super) const PSEUDO_CALL: u8 = 1;
pub(super) const PSEUDO_FUNC: u8 = 4;
pub(super) const ATOMIC_FETCH: i32 = 0x01;
pub(super) const ATOMIC_CMPXCHG: i32 = 0xf0 | ATOMIC_FETCH;
pub(super) const HELPER_TAIL_CALL: i32 = 12;

pub(super) fn access_size(code: u8) -> i64 {
    match code & 0x18 {
        0x00 => 4,
        0x08 => 2,
        0x10 => 1,
        _ => 8,
    }
}

/// Instruction builders for the tests (dst, src as register numbers).
#[cfg(test)]
pub(super) mod build {
    use super::*;

    pub fn ins(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
        Insn {
            code,
            dst,
            src,
            off,
            imm,
        }
    }
    pub fn mov(dst: u8, src: u8) -> Insn {
        ins(0xbf, dst, src, 0, 0)
    }
    pub fn mov_imm(dst: u8, imm: i32) -> Insn {
        ins(0xb7, dst, 0, 0, imm)
    }
    pub fn add_imm(dst: u8, imm: i32) -> Insn {
        ins(0x07, dst, 0, 0, imm)
    }
    pub fn add(dst: u8, src: u8) -> Insn {
        ins(0x0f, dst, src, 0, 0)
    }
    pub fn stx_dw(dst: u8, off: i16, src: u8) -> Insn {
        ins(0x7b, dst, src, off, 0)
    }
    pub fn stx_w(dst: u8, off: i16, src: u8) -> Insn {
        ins(0x63, dst, src, off, 0)
    }
    pub fn st_b(dst: u8, off: i16, imm: i32) -> Insn {
        ins(0x72, dst, 0, off, imm)
    }
    pub fn ldx_dw(dst: u8, src: u8, off: i16) -> Insn {
        ins(0x79, dst, src, off, 0)
    }
    pub fn call(helper: i32) -> Insn {
        ins(0x85, 0, 0, 0, helper)
    }
    pub fn call_sub(rel: i32) -> Insn {
        ins(0x85, 0, PSEUDO_CALL, 0, rel)
    }
    pub fn jeq_imm(dst: u8, imm: i32, off: i16) -> Insn {
        ins(0x15, dst, 0, off, imm)
    }
    pub fn jlt_imm(dst: u8, imm: i32, off: i16) -> Insn {
        ins(0xa5, dst, 0, off, imm)
    }
    pub fn ja(off: i16) -> Insn {
        ins(0x05, 0, 0, off, 0)
    }
    pub fn exit() -> Insn {
        ins(0x95, 0, 0, 0, 0)
    }
}
