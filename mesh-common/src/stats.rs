//! Per-CPU counters: one [`Counter`] per (hook, reason), in a `PERCPU_ARRAY`.

use crate::reason::{Reason, REASON_SLOTS};

/// Where a program runs. Part of the counters' index.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Hook {
    /// XDP on the underlay interface.
    XdpUnderlay = 0,
    /// TC ingress on the underlay interface.
    TcUnderlayIngress = 1,
    /// TC ingress on a task's delivery veth (host side): what the task sends.
    TcTask = 2,
    /// TC ingress on a task's overlay veth (host side, in the overlay network's
    /// namespace): what the task sends on the overlay (ARP and VIPs).
    TcOverlayIn = 3,
    /// TC egress on the same veth: what reaches the task (replies from VIP flows).
    TcOverlayOut = 4,
    /// The cgroup socket programs: `fwd_to_task` counts a connect() or sendmsg() pointed
    /// at the host port (nothing else is counted there).
    Sock = 5,
}

impl Hook {
    pub const ALL: &'static [Hook] = &[
        Hook::XdpUnderlay,
        Hook::TcUnderlayIngress,
        Hook::TcTask,
        Hook::TcOverlayIn,
        Hook::TcOverlayOut,
        Hook::Sock,
    ];
    /// The hooks that see packets (every one but the socket programs').
    pub const PACKET: &'static [Hook] = &[
        Hook::XdpUnderlay,
        Hook::TcUnderlayIngress,
        Hook::TcTask,
        Hook::TcOverlayIn,
        Hook::TcOverlayOut,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Hook::XdpUnderlay => "xdp_underlay",
            Hook::TcUnderlayIngress => "tc_underlay_ingress",
            Hook::TcTask => "tc_task",
            Hook::TcOverlayIn => "tc_overlay_in",
            Hook::TcOverlayOut => "tc_overlay_out",
            Hook::Sock => "sock",
        }
    }
}

/// Hook slots reserved in the counters map (room for the task-side hooks to come).
pub const HOOK_SLOTS: u32 = 8;
/// Entries in the counters map.
pub const STATS_ENTRIES: u32 = HOOK_SLOTS * REASON_SLOTS;

/// Index of (hook, reason) in the counters map.
#[inline(always)]
pub const fn stats_index(hook: Hook, reason: Reason) -> u32 {
    hook as u32 * REASON_SLOTS + reason as u32
}

/// One counter cell (per CPU in the kernel; summed in user space).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    /// Bytes of the whole frame as the hook saw it.
    pub bytes: u64,
}
crate::assert_size!(Counter, 16);

#[cfg(feature = "user")]
unsafe impl aya::Pod for Counter {}

/// Traffic of one backend, counted where the load balancer decides for it: packets and
/// bytes both ways (requests and replies, on the node that balanced the flow) and the
/// flows it was given.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendCounter {
    pub packets: u64,
    pub bytes: u64,
    pub flows: u64,
}
crate::assert_size!(BackendCounter, 24);

#[cfg(feature = "user")]
unsafe impl aya::Pod for BackendCounter {}

impl BackendCounter {
    /// Sums per-CPU cells.
    pub fn sum<'a>(cells: impl IntoIterator<Item = &'a BackendCounter>) -> BackendCounter {
        cells
            .into_iter()
            .fold(BackendCounter::default(), |a, c| a.plus(c))
    }

    pub fn plus(&self, c: &BackendCounter) -> BackendCounter {
        BackendCounter {
            packets: self.packets.wrapping_add(c.packets),
            bytes: self.bytes.wrapping_add(c.bytes),
            flows: self.flows.wrapping_add(c.flows),
        }
    }
}

impl Counter {
    /// Sums per-CPU cells (user space reads one value per possible CPU).
    pub fn sum<'a>(cells: impl IntoIterator<Item = &'a Counter>) -> Counter {
        cells
            .into_iter()
            .fold(Counter::default(), |acc, c| Counter {
                packets: acc.packets.wrapping_add(c.packets),
                bytes: acc.bytes.wrapping_add(c.bytes),
            })
    }
}

const _: () = assert!((Hook::Sock as u32) < HOOK_SLOTS);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indices_are_disjoint_per_hook() {
        let mut seen = std::collections::HashSet::new();
        for h in Hook::ALL {
            for r in Reason::ALL {
                let i = stats_index(*h, *r);
                assert!(i < STATS_ENTRIES);
                assert!(seen.insert(i), "index {i} reused");
            }
        }
    }

    #[test]
    fn sum_adds_cells() {
        let cells = [
            Counter {
                packets: 1,
                bytes: 60,
            },
            Counter {
                packets: 2,
                bytes: 100,
            },
        ];
        assert_eq!(
            Counter::sum(&cells),
            Counter {
                packets: 3,
                bytes: 160
            }
        );
    }
}
