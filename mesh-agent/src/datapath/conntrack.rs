//! The pinned conntrack map read, sized and flushed from user space (meshctl, the metrics,
//! the agent), and the programs' clock (CLOCK_MONOTONIC) to age its entries against.

use std::path::Path;

use mesh_common::ct::{CtEntry, CtKey, CT_REVERSE};

use crate::MeshError;

/// The conntrack map pinned under `dir`.
fn pinned_conntrack(
    dir: &Path,
) -> Result<aya::maps::HashMap<aya::maps::MapData, CtKey, CtEntry>, MeshError> {
    use aya::maps::{HashMap, Map, MapData};
    let err = |source| MeshError::Map {
        map: mesh_common::maps::CONNTRACK.name,
        source,
    };
    let path = dir.join(mesh_common::maps::CONNTRACK.name);
    if !path.exists() {
        return Err(MeshError::NotPinned {
            path: dir.to_path_buf(),
        });
    }
    HashMap::try_from(Map::LruHashMap(MapData::from_pin(&path).map_err(err)?)).map_err(err)
}

/// The conntrack map pinned under `dir`, as (key, entry) pairs.
pub fn read_conntrack(dir: &Path) -> Result<Vec<(CtKey, CtEntry)>, MeshError> {
    Ok(pinned_conntrack(dir)?
        .iter()
        .filter_map(Result::ok)
        .collect())
}

/// How full the conntrack map is: its entries, and its capacity as the kernel has it
/// (the map's own `max_entries`, whatever the object or the loader made it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Occupancy {
    pub entries: usize,
    pub capacity: u32,
}

/// The conntrack map's capacity as the kernel has it (its `max_entries`).
pub fn conntrack_capacity(dir: &Path) -> Result<u32, MeshError> {
    let ct = mesh_common::maps::CONNTRACK.name;
    let info = aya::maps::MapInfo::from_pin(dir.join(ct))
        .map_err(|source| MeshError::Map { map: ct, source })?;
    Ok(info.max_entries())
}

/// The conntrack map's occupancy (walks its keys).
pub fn conntrack_occupancy(dir: &Path) -> Result<Occupancy, MeshError> {
    let entries = pinned_conntrack(dir)?.keys().filter(Result::is_ok).count();
    Ok(Occupancy {
        entries,
        capacity: conntrack_capacity(dir)?,
    })
}

/// Removes every conntrack entry (both directions) of service `svc_id` pinned under
/// `dir`; returns how many flows (forward entries) went. Their next packet is a new
/// flow: a TCP connection in the middle is answered with a RST by its backend.
pub fn flush_service(dir: &Path, svc_id: u32) -> Result<usize, MeshError> {
    let err = |source| MeshError::Map {
        map: mesh_common::maps::CONNTRACK.name,
        source,
    };
    let mut map = pinned_conntrack(dir)?;
    let doomed: Vec<(CtKey, bool)> = map
        .iter()
        .filter_map(Result::ok)
        .filter(|(_, e)| e.svc_id == svc_id)
        .map(|(k, e)| (k, e.flags & CT_REVERSE == 0))
        .collect();
    let mut flows = 0;
    for (k, forward) in doomed {
        match map.remove(&k) {
            Ok(()) => flows += usize::from(forward),
            Err(aya::maps::MapError::KeyNotFound) => {}
            Err(e) => return Err(err(e)),
        }
    }
    Ok(flows)
}

/// CLOCK_MONOTONIC now, nanoseconds (`bpf_ktime_get_ns`'s clock).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
