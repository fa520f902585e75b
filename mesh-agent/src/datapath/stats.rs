//! Reading the per-CPU counters into per-(hook, reason) totals.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use aya::maps::{Map, MapData, PerCpuArray};
use mesh_common::{
    reason::Reason,
    stats::{stats_index, Counter, Hook},
};

use crate::MeshError;

/// Counters summed over CPUs, keyed by (hook, reason); zero cells are left out.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub cells: BTreeMap<(u32, u32), Counter>,
}

impl Snapshot {
    pub fn read<T: std::borrow::Borrow<MapData>>(
        map: &PerCpuArray<T, Counter>,
    ) -> Result<Snapshot, MeshError> {
        let mut cells = BTreeMap::new();
        for hook in Hook::ALL {
            for reason in Reason::ALL {
                let per_cpu =
                    map.get(&stats_index(*hook, *reason), 0)
                        .map_err(|source| MeshError::Map {
                            map: mesh_common::maps::STATS.name,
                            source,
                        })?;
                let total = Counter::sum(per_cpu.iter());
                if total != Counter::default() {
                    cells.insert((*hook as u32, *reason as u32), total);
                }
            }
        }
        Ok(Snapshot { cells })
    }

    /// Reads the map pinned under `dir` (what meshctl does while the agent runs).
    pub fn read_pinned(dir: &Path) -> Result<Snapshot, MeshError> {
        let path: PathBuf = dir.join(mesh_common::maps::STATS.name);
        if !path.exists() {
            return Err(MeshError::NotPinned {
                path: dir.to_path_buf(),
            });
        }
        let data = MapData::from_pin(&path).map_err(|source| MeshError::Map {
            map: mesh_common::maps::STATS.name,
            source,
        })?;
        let map =
            PerCpuArray::try_from(Map::PerCpuArray(data)).map_err(|source| MeshError::Map {
                map: mesh_common::maps::STATS.name,
                source,
            })?;
        Snapshot::read(&map)
    }

    pub fn get(&self, hook: Hook, reason: Reason) -> Counter {
        self.cells
            .get(&(hook as u32, reason as u32))
            .copied()
            .unwrap_or_default()
    }

    /// What happened between `earlier` and `self` (counters only grow).
    pub fn since(&self, earlier: &Snapshot) -> Snapshot {
        let cells = self
            .cells
            .iter()
            .filter_map(|(k, now)| {
                let then = earlier.cells.get(k).copied().unwrap_or_default();
                let d = Counter {
                    packets: now.packets.wrapping_sub(then.packets),
                    bytes: now.bytes.wrapping_sub(then.bytes),
                };
                (d != Counter::default()).then_some((*k, d))
            })
            .collect();
        Snapshot { cells }
    }

    /// (hook, reason, counter) for every non-zero cell, in index order.
    pub fn iter(&self) -> impl Iterator<Item = (Hook, Reason, Counter)> + '_ {
        self.cells.iter().filter_map(|((h, r), c)| {
            let hook = *Hook::ALL.iter().find(|x| **x as u32 == *h)?;
            Some((hook, Reason::from_u32(*r)?, *c))
        })
    }
}

/// The per-backend counters (summed over CPUs) by backend id, read from the map pinned
/// under `dir`.
pub fn backends_pinned(
    dir: &Path,
) -> Result<BTreeMap<u32, mesh_common::stats::BackendCounter>, MeshError> {
    use aya::maps::PerCpuHashMap;
    use mesh_common::stats::BackendCounter;
    let err = |source| MeshError::Map {
        map: mesh_common::maps::BACKEND_STATS.name,
        source,
    };
    let data = MapData::from_pin(dir.join(mesh_common::maps::BACKEND_STATS.name)).map_err(err)?;
    // An LRU per-CPU hash (mesh-ebpf/src/stats.rs).
    let map: PerCpuHashMap<_, u32, BackendCounter> =
        PerCpuHashMap::try_from(Map::PerCpuLruHashMap(data)).map_err(err)?;
    Ok(map
        .iter()
        .filter_map(Result::ok)
        .map(|(id, cells)| (id, BackendCounter::sum(cells.iter())))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_subtracts_and_drops_unchanged() {
        let mut a = Snapshot::default();
        a.cells.insert(
            (0, 1),
            Counter {
                packets: 5,
                bytes: 500,
            },
        );
        a.cells.insert(
            (0, 2),
            Counter {
                packets: 1,
                bytes: 60,
            },
        );
        let mut b = a.clone();
        b.cells.insert(
            (0, 1),
            Counter {
                packets: 7,
                bytes: 640,
            },
        );
        b.cells.insert(
            (1, 16),
            Counter {
                packets: 1,
                bytes: 20,
            },
        );
        let d = b.since(&a);
        assert_eq!(
            d.get(Hook::XdpUnderlay, Reason::PassTcp),
            Counter {
                packets: 2,
                bytes: 140
            }
        );
        assert_eq!(
            d.get(Hook::XdpUnderlay, Reason::PassUdp),
            Counter::default()
        );
        assert_eq!(
            d.get(Hook::TcUnderlayIngress, Reason::DropTruncatedEth),
            Counter {
                packets: 1,
                bytes: 20
            }
        );
        assert_eq!(d.iter().count(), 2);
    }
}
