//! The datapath log, opt-in: the kernel programs write aya-log records of a few events
//! (a new flow's backend, a drop and its reason) only while the switch, element 0 of
//! the pinned `MESH_LOG_V1`, is on. `meshctl log on|off` flips it ([`set`]); the agent
//! reads the records ([`Reader`]) into its own log, target `mesh::datapath`. Off by
//! default, and a new pin starts off.

use std::path::Path;

use aya::maps::{Array, Map, MapData};
use aya_log::EbpfLogger;

use crate::{datapath::loader::Datapath, MeshError};

const SWITCH: &str = mesh_common::maps::LOG_SWITCH.name;

/// The switch pinned under `dir`.
fn pinned_switch(dir: &Path) -> Result<Array<MapData, u32>, MeshError> {
    let err = |source| MeshError::Map {
        map: SWITCH,
        source,
    };
    let path = dir.join(SWITCH);
    if !path.exists() {
        // An agent older than the log pinned this mesh (a newer one adds the map when it
        // adopts it), or nothing is pinned at all.
        return Err(MeshError::NotPinned {
            path: dir.to_path_buf(),
        });
    }
    Array::try_from(Map::Array(MapData::from_pin(&path).map_err(err)?)).map_err(err)
}

/// Turns the datapath log of the mesh pinned under `dir` on or off.
pub fn set(dir: &Path, on: bool) -> Result<(), MeshError> {
    pinned_switch(dir)?
        .set(0, u32::from(on), 0)
        .map_err(|source| MeshError::Map {
            map: SWITCH,
            source,
        })
}

/// Whether the datapath log of the mesh pinned under `dir` is on.
pub fn is_on(dir: &Path) -> Result<bool, MeshError> {
    pinned_switch(dir)?
        .get(&0, 0)
        .map(|v| v != 0)
        .map_err(|source| MeshError::Map {
            map: SWITCH,
            source,
        })
}

/// Hands aya-log's records to `tracing` (target `mesh::datapath`), a drop's reason by
/// its name.
struct ToTracing;

impl log::Log for ToTracing {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let msg = describe(&record.args().to_string());
        match record.level() {
            log::Level::Error => tracing::error!(target: "mesh::datapath", "{msg}"),
            log::Level::Warn => tracing::warn!(target: "mesh::datapath", "{msg}"),
            log::Level::Info => tracing::info!(target: "mesh::datapath", "{msg}"),
            log::Level::Debug => tracing::debug!(target: "mesh::datapath", "{msg}"),
            log::Level::Trace => tracing::trace!(target: "mesh::datapath", "{msg}"),
        }
    }

    fn flush(&self) {}
}

/// A record's text with `reason=<number>` (the kernel writes the number: a name would be
/// a string copy on the kernel side) as `reason=<name>`.
pub fn describe(msg: &str) -> String {
    const KEY: &str = "reason=";
    let Some(at) = msg.find(KEY) else {
        return msg.to_string();
    };
    let rest = &msg[at + KEY.len()..];
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    match rest[..digits]
        .parse()
        .ok()
        .and_then(mesh_common::reason::Reason::from_u32)
    {
        Some(r) => format!("{}{KEY}{}{}", &msg[..at], r.name(), &rest[digits..]),
        None => msg.to_string(),
    }
}

/// The reader of the loaded programs' records (their ring buffer, `AYA_LOGS`).
pub struct Reader(EbpfLogger<ToTracing>);

impl Reader {
    /// Takes the ring buffer from the loaded object (after its programs are loaded: they
    /// hold it from then on).
    pub fn take(dp: &mut Datapath) -> Result<Reader, MeshError> {
        EbpfLogger::init_with_logger(dp.ebpf_mut(), ToTracing)
            .map(Reader)
            .map_err(|e| MeshError::Io {
                what: "reading the datapath log".into(),
                source: std::io::Error::other(e),
            })
    }

    /// Forwards records as they come, for as long as the agent runs.
    pub async fn run(self) {
        let interest = tokio::io::Interest::READABLE;
        // SAFETY: the logger owns the ring buffer's fd and keeps it open, unchanged, for
        // as long as the AsyncFd owns the logger.
        let registered =
            unsafe { tokio::io::unix::AsyncFd::register_with_interest(self.0, interest) };
        let mut fd = match registered {
            Ok(fd) => fd,
            Err(e) => {
                tracing::warn!("the datapath log cannot be read: {e}");
                return;
            }
        };
        loop {
            let Ok(mut ready) = fd.readable_mut().await else {
                return;
            };
            ready.get_inner_mut().flush();
            ready.clear_ready();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::describe;

    #[test]
    fn a_reason_is_named() {
        let n = mesh_common::reason::Reason::DropCtFull as u32;
        assert_eq!(
            describe(&format!(
                "drop reason={n} 10.0.0.1:5 -> 10.0.0.2:80 proto 6"
            )),
            "drop reason=drop_ct_full 10.0.0.1:5 -> 10.0.0.2:80 proto 6"
        );
        assert_eq!(describe("new flow 1.2.3.4:5"), "new flow 1.2.3.4:5");
        assert_eq!(describe("reason=9999 x"), "reason=9999 x");
    }
}
