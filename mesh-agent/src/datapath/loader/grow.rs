//! Growing the pinned Maglev array (a restart with a larger `--maglev-slots`) without
//! flushing anything: a larger array is made, every slot copied at the same index (each
//! service keeps its region, so the services map stays true), and its pin takes the old
//! one's place by rename. The attached programs keep reading the old array (whole and
//! unchanged: nothing writes it now) until the load that follows links the new ones in;
//! conntrack, and so every flow, is untouched.

use aya::maps::{Array, Map, MapData};

use crate::{datapath::pins::PinDir, MeshError};

const NAME: &str = mesh_common::maps::MAGLEV.name;

fn map_err(source: aya::maps::MapError) -> MeshError {
    MeshError::Map { map: NAME, source }
}

/// Grows the pinned Maglev array to `slots` when it is smaller; returns the old size
/// when it did. A larger pinned array is left for the layout check to refuse (a region
/// may lie beyond `slots`).
pub fn grow_maglev(pins: &PinDir, slots: u32) -> Result<Option<u32>, MeshError> {
    let path = pins.map(NAME);
    let Some(have) = pins.entries(NAME) else {
        return Ok(None);
    };
    if have >= slots {
        return Ok(None);
    }
    let old: Array<MapData, u32> =
        Array::try_from(Map::Array(MapData::from_pin(&path).map_err(map_err)?)).map_err(map_err)?;
    let obj = aya_obj::Map::new_from_params(
        aya_obj::generated::bpf_map_type::BPF_MAP_TYPE_ARRAY as u32,
        4,
        4,
        slots,
        0,
    );
    let mut new: Array<MapData, u32> = Array::try_from(Map::Array(
        MapData::create(obj, NAME, None).map_err(map_err)?,
    ))
    .map_err(map_err)?;
    for i in 0..have {
        let id = old.get(&i, 0).map_err(map_err)?;
        if id != 0 {
            new.set(i, id, 0).map_err(map_err)?;
        }
    }
    // (bpffs takes no '.' in a name.)
    let staged = path.with_file_name(format!("{NAME}_grown"));
    let _ = std::fs::remove_file(&staged);
    new.pin(&staged).map_err(|e| MeshError::Io {
        what: format!("pinning the grown {NAME} at {}", staged.display()),
        source: std::io::Error::other(e.to_string()),
    })?;
    std::fs::rename(&staged, &path).map_err(|source| MeshError::Io {
        what: format!("renaming {} to {}", staged.display(), path.display()),
        source,
    })?;
    Ok(Some(have))
}
