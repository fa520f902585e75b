//! The node's files the agent keeps (its state directory): written whole or not at all.

use std::path::Path;

/// Writes `bytes` to `path` whole or not at all (write beside it, then rename), making
/// its directory if needed: a reader (meshctl, a restarted agent) never sees half a file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}
