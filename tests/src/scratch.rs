//! A scratch directory under the system's temporary directory, removed when dropped
//! (also when a test or the bench fails half-way).

use std::path::{Path, PathBuf};

pub struct Scratch(PathBuf);

impl Scratch {
    /// `<tmp>/mesh-<tag>-<pid>`, empty.
    pub fn new(tag: &str) -> Scratch {
        let p = std::env::temp_dir().join(format!("mesh-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        Scratch(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
