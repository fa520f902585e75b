//! The probes themselves: tiny programs loaded (never attached) through raw bpf(2) to ask
//! the running kernel whether it knows a helper, tcx links, or bpf_skb_adjust_room's L2
//! encapsulation flag (run once through BPF_PROG_TEST_RUN); and RLIMIT_MEMLOCK lifted for
//! kernels that charge BPF memory to it.

use super::*;
use std::os::fd::FromRawFd;

use crate::datapath::sys::{bpf, put32, put64};

pub(super) const BPF_PROG_LOAD: u32 = 5;
pub(super) const BPF_LINK_CREATE: u32 = 28;
pub(super) const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
pub(super) const BPF_PROG_TYPE_XDP: u32 = 6;
pub(super) const BPF_TCX_INGRESS: u32 = 46;
pub(super) const BPF_FUNC_SKB_ADJUST_ROOM: i32 = 50;
pub(super) const BPF_FUNC_XDP_ADJUST_META: i32 = 54;
pub(super) const BPF_FUNC_CHECK_MTU: i32 = 163;
pub(super) const BPF_FUNC_XDP_LOAD_BYTES: i32 = 189;
pub(super) const BPF_FUNC_XDP_STORE_BYTES: i32 = 190;

/// One BPF instruction: opcode, registers (dst low nibble, src high), offset, immediate.
pub(super) fn insn(code: u8, regs: u8, off: i16, imm: i32) -> [u8; 8] {
    let mut i = [0u8; 8];
    i[0] = code;
    i[1] = regs;
    i[2..4].copy_from_slice(&off.to_ne_bytes());
    i[4..8].copy_from_slice(&imm.to_ne_bytes());
    i
}
pub(super) const MOV64_IMM: u8 = 0xb7; // BPF_ALU64 | BPF_MOV | BPF_K
pub(super) const LD_IMM64: u8 = 0x18; // BPF_LD | BPF_DW | BPF_IMM (two instructions)
pub(super) const CALL: u8 = 0x85; // BPF_JMP | BPF_CALL
pub(super) const EXIT: u8 = 0x95; // BPF_JMP | BPF_EXIT

/// Loads `insns` as a program of `prog_type`: its descriptor, or the error and the
/// verifier's log.
pub(super) fn prog_load(
    prog_type: u32,
    insns: &[[u8; 8]],
) -> Result<std::os::fd::OwnedFd, (std::io::Error, String)> {
    let code: Vec<u8> = insns.concat();
    let license = c"GPL";
    let mut log = vec![0u8; 64 * 1024];
    let mut a = [0u8; 128];
    put32(&mut a, 0, prog_type);
    put32(&mut a, 4, insns.len() as u32);
    put64(&mut a, 8, code.as_ptr() as u64);
    put64(&mut a, 16, license.as_ptr() as u64);
    put32(&mut a, 24, 1); // log_level
    put32(&mut a, 28, log.len() as u32);
    put64(&mut a, 32, log.as_mut_ptr() as u64);
    match bpf(BPF_PROG_LOAD, &mut a) {
        // SAFETY: a new descriptor the kernel gave us; owned from here on.
        Ok(fd) => Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) }),
        Err(e) => {
            let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
            Err((e, String::from_utf8_lossy(&log[..end]).into_owned()))
        }
    }
}

/// Whether the kernel lets programs of `prog_type` call helper `id`, as libbpf's
/// `libbpf_probe_bpf_helper` asks: a program that only calls it; the verifier names a
/// helper it does not know ("invalid func unknown#163") or one this program type may
/// not call ("unknown func ...", since 6.x "program of this type cannot use helper
/// ..."); any other verdict of the verifier (even a refusal of the arguments) means it
/// may. A refusal before the verifier ran (no log: EPERM, a memlock limit) tells
/// nothing: the fallback, which every kernel runs, is taken.
pub(super) fn probe_helper(prog_type: u32, id: i32) -> bool {
    match prog_load(prog_type, &[insn(CALL, 0, 0, id), insn(EXIT, 0, 0, 0)]) {
        Ok(_) => true,
        Err((e, log)) if log.trim().is_empty() => {
            tracing::warn!(
                "probing helper {id}: load refused before verification ({e}); taken as missing"
            );
            false
        }
        Err((_, log)) => !helper_unknown(&log),
    }
}

/// Lifts RLIMIT_MEMLOCK: before Linux 5.11 BPF programs and maps are charged to it (from
/// 5.11 to the memory cgroup), and its usual 64 KiB or 8 MiB refuse the mesh's maps, and
/// the probes once an earlier agent's pinned maps hold the user's share. Best effort:
/// where it cannot be raised, the load says so.
pub(super) fn lift_memlock() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: a valid rlimit struct for this process.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        tracing::debug!(
            "RLIMIT_MEMLOCK stays as it is ({}); kernels before 5.11 charge BPF memory to it",
            std::io::Error::last_os_error()
        );
    }
}

pub(super) fn helper_unknown(log: &str) -> bool {
    log.contains("invalid func ")
        || log.contains("unknown func ")
        || log.contains("program of this type cannot use helper ")
}

/// Whether BPF_LINK_CREATE knows tcx: a link to no interface at all (ifindex
/// u32::MAX) fails with ENODEV where it does, EINVAL (unknown attach type) where not.
/// Nothing is ever attached.
pub(super) fn probe_tcx() -> bool {
    use std::os::fd::AsRawFd;
    let Ok(prog) = prog_load(
        BPF_PROG_TYPE_SCHED_CLS,
        &[insn(MOV64_IMM, 0, 0, 0), insn(EXIT, 0, 0, 0)],
    ) else {
        return false;
    };
    let mut a = [0u8; 128];
    put32(&mut a, 0, prog.as_raw_fd() as u32);
    put32(&mut a, 4, u32::MAX); // target_ifindex
    put32(&mut a, 8, BPF_TCX_INGRESS);
    match bpf(BPF_LINK_CREATE, &mut a) {
        Err(e) => e.raw_os_error() == Some(libc::ENODEV),
        Ok(fd) => {
            // Cannot happen (no such interface); never keep it if it did.
            // SAFETY: a descriptor the kernel gave us, closed at once.
            drop(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) });
            true
        }
    }
}

/// `bpf_skb_adjust_room`'s mode and flags (include/uapi/linux/bpf.h).
pub(super) const BPF_ADJ_ROOM_MAC: i32 = 1;
pub(super) const BPF_F_ADJ_ROOM_ENCAP_L3_IPV4: u64 = 1 << 1;
pub(super) const BPF_F_ADJ_ROOM_ENCAP_L4_UDP: u64 = 1 << 4;
pub(super) const BPF_F_ADJ_ROOM_ENCAP_L2_ETH: u64 = 1 << 6;
pub(super) const BPF_ADJ_ROOM_ENCAP_L2_SHIFT: u64 = 56;

/// The flags of the datapath's encapsulation the probe asks about: outer IPv4 and
/// UDP, an inner Ethernet header of 14 bytes, and the flag in question.
pub(super) const ENCAP_FLAGS: u64 = BPF_F_ADJ_ROOM_ENCAP_L3_IPV4
    | BPF_F_ADJ_ROOM_ENCAP_L4_UDP
    | BPF_F_ADJ_ROOM_ENCAP_L2_ETH
    | (14 << BPF_ADJ_ROOM_ENCAP_L2_SHIFT);

/// A program that makes room for VXLAN in front of its packet as the datapath's
/// encapsulation does, `bpf_skb_adjust_room(skb, 50, BPF_ADJ_ROOM_MAC, flags)`, and
/// returns what the helper returned.
pub(super) fn adjust_room_prog(flags: u64) -> [[u8; 8]; 6] {
    [
        // r1: the skb, as the program was given it.
        insn(MOV64_IMM, 2, 0, 50), // r2 = len_diff: outer IPv4 + UDP + VXLAN + inner Ethernet
        insn(MOV64_IMM, 3, 0, BPF_ADJ_ROOM_MAC), // r3 = mode
        insn(LD_IMM64, 4, 0, flags as u32 as i32), // r4 = flags: low word ...
        insn(0, 0, 0, (flags >> 32) as u32 as i32), // ... and high word
        insn(CALL, 0, 0, BPF_FUNC_SKB_ADJUST_ROOM),
        insn(EXIT, 0, 0, 0), // r0: the helper's return
    ]
}

/// A 64-byte Ethernet/IPv4/UDP frame (10.0.0.1:40000 -> 10.0.0.2:4789), checksummed.
pub(super) fn probe_frame() -> [u8; 64] {
    let mut f = [0u8; 64];
    f[0..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 2]);
    f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 1]);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip = &mut f[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&50u16.to_be_bytes()); // total length
    ip[8] = 64; // TTL
    ip[9] = 17; // UDP
    ip[12..16].copy_from_slice(&[10, 0, 0, 1]);
    ip[16..20].copy_from_slice(&[10, 0, 0, 2]);
    let sum = ip
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum::<u32>();
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = !((sum & 0xffff) + (sum >> 16)) as u16;
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    let udp = &mut f[34..42];
    udp[0..2].copy_from_slice(&40000u16.to_be_bytes());
    udp[2..4].copy_from_slice(&4789u16.to_be_bytes());
    udp[4..6].copy_from_slice(&30u16.to_be_bytes()); // length; checksum 0 (none)
    f
}

/// What `bpf_skb_adjust_room` returns for `flags`, run once over [`probe_frame`] by
/// [`adjust_room_prog`] (BPF_PROG_TEST_RUN: no device, nothing sent).
pub(super) fn adjust_room_returns(flags: u64) -> Result<i32, String> {
    let prog = prog_load(BPF_PROG_TYPE_SCHED_CLS, &adjust_room_prog(flags))
        .map_err(|(e, log)| format!("load refused ({e}): {}", log.trim()))?;
    crate::datapath::sys::test_run(&prog, &probe_frame())
        .map(|(retval, _)| retval)
        .map_err(|e| e.to_string())
}

/// Whether `bpf_skb_adjust_room` takes `BPF_F_ADJ_ROOM_ENCAP_L2_ETH`. The verifier
/// cannot tell (the flags are a run-time argument), so the probe runs the helper. It
/// checks its flags before anything else: 0 is room made, the flag known; -EINVAL is
/// a flag it does not know (before 5.13). Any other outcome is unexpected, logged and
/// taken as missing: leaving the flag out works on every kernel.
pub(super) fn probe_encap_l2_eth() -> bool {
    match adjust_room_returns(ENCAP_FLAGS) {
        Ok(0) => true,
        Ok(r) if r == -libc::EINVAL => false,
        Ok(r) => {
            tracing::warn!(
                "probing {}: bpf_skb_adjust_room returned {r}; taken as missing",
                Feature::EncapL2Eth.name()
            );
            false
        }
        Err(e) => {
            tracing::warn!(
                "probing {}: {e}; taken as missing",
                Feature::EncapL2Eth.name()
            );
            false
        }
    }
}
