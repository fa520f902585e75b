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

mod callgraph;
mod cli;
mod demangle;
mod elf;
mod frame;
mod insn;
mod program;
mod report;
mod rule;

pub use cli::{run, Stack};
pub use program::Program;
pub use report::{check, report, Report};
pub use rule::Rule;

/// `MAX_BPF_STACK`: what every chain must fit in.
pub const MAX_BPF_STACK: u32 = 512;
/// The headroom `cargo xtask test` demands of every chain: room for the next feature on
/// the deepest path without a verifier refusal.
pub const MIN_HEADROOM: u32 = 64;
/// `MAX_CALL_FRAMES`: the verifier refuses a chain of more frames than this.
pub const MAX_CALL_FRAMES: usize = 8;
/// A subprogram that tail-calls may not be reached with this much (or more) above it.
pub const TAIL_CALL_CALLERS_MAX: u32 = 256;
