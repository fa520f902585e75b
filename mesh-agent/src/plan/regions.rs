//! The shared Maglev array's regions: each service owns one; a region freed by a plan is
//! reused only by a later plan (a packet may still be reading it).

use std::collections::BTreeMap;

/// Regions of the shared Maglev array.
#[derive(Clone, Debug)]
pub(super) struct Regions {
    /// offset -> length of free space.
    pub(super) free: BTreeMap<u32, u32>,
    /// Freed by the last plan; free for the next one (a packet may still be reading).
    pub(super) quarantine: Vec<(u32, u32)>,
}

impl Regions {
    pub(super) fn new(capacity: u32) -> Self {
        Regions {
            free: BTreeMap::from([(0, capacity)]),
            quarantine: Vec::new(),
        }
    }

    pub(super) fn alloc(&mut self, len: u32) -> Option<u32> {
        let (&off, &flen) = self.free.iter().find(|(_, l)| **l >= len)?;
        self.free.remove(&off);
        if flen > len {
            self.free.insert(off + len, flen - len);
        }
        Some(off)
    }

    /// Whether a region of `len` slots can be had now.
    pub(super) fn fits(&self, len: u32) -> bool {
        self.free.values().any(|l| *l >= len)
    }

    pub(super) fn release(&mut self, off: u32, len: u32) {
        self.quarantine.push((off, len));
    }

    /// Returns quarantined regions to the free list, merging neighbours.
    pub(super) fn settle(&mut self) {
        for (off, len) in std::mem::take(&mut self.quarantine) {
            self.free.insert(off, len);
        }
        let mut merged: BTreeMap<u32, u32> = BTreeMap::new();
        for (off, len) in std::mem::take(&mut self.free) {
            if let Some((&poff, plen)) = merged.iter_mut().next_back() {
                if poff + *plen == off {
                    *plen += len;
                    continue;
                }
            }
            merged.insert(off, len);
        }
        self.free = merged;
    }
}
