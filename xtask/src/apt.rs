//! apt-get and apt-cache with sources, lists and a cache of our own (the kernel matrix's
//! and the engines'): Debian's archive read without touching the host's apt
//! configuration, pinning or package state.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, SystemTime},
};

use anyhow::Context;

use crate::cmd::exec;

/// How long fetched package lists are used before `apt-get update` runs again.
pub const LISTS_MAX_AGE: Duration = Duration::from_secs(24 * 3600);

pub struct Apt {
    dir: PathBuf,
    opts: Vec<String>,
}

impl Apt {
    /// An apt configuration in `<cache>/apt` reading `sources` (a sources.list).
    pub fn new(cache: &Path, sources: &str) -> anyhow::Result<Self> {
        let dir = cache.join("apt");
        for d in ["lists/partial", "cache/archives/partial", "preferences.d"] {
            fs::create_dir_all(dir.join(d))
                .with_context(|| format!("creating {}", dir.join(d).display()))?;
        }
        let list = dir.join("sources.list");
        if fs::read_to_string(&list).ok().as_deref() != Some(sources) {
            fs::write(&list, sources).with_context(|| format!("writing {}", list.display()))?;
            // New sources: the lists on disk are for others.
            let _ = fs::remove_file(dir.join("lists/.mesh-updated"));
        }
        let d = |p: &str| dir.join(p).display().to_string();
        let opts = [
            format!("Dir::Etc::sourcelist={}", d("sources.list")),
            "Dir::Etc::sourceparts=-".into(),
            // No pinning of the host's applies to our lists.
            format!("Dir::Etc::preferences={}", d("preferences")),
            format!("Dir::Etc::preferencesparts={}", d("preferences.d")),
            format!("Dir::State::lists={}", d("lists")),
            format!("Dir::Cache={}", d("cache")),
            // Our files are root's; apt's sandbox user could not write them.
            "APT::Sandbox::User=root".into(),
        ]
        .into_iter()
        .flat_map(|o| ["-o".to_string(), o])
        .collect();
        Ok(Apt { dir, opts })
    }

    /// `prog` (apt-get, apt-cache) with this configuration.
    pub fn cmd(&self, prog: &str) -> Command {
        let mut c = Command::new(prog);
        c.args(&self.opts);
        c
    }

    /// `apt-get update` unless the lists are younger than [`LISTS_MAX_AGE`]; `say` is
    /// printed before it runs.
    pub fn refresh(&self, say: &str) -> anyhow::Result<()> {
        let stamp = self.dir.join("lists/.mesh-updated");
        let age = fs::metadata(&stamp)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| SystemTime::now().duration_since(t).ok());
        if age.is_some_and(|a| a < LISTS_MAX_AGE) {
            return Ok(());
        }
        println!("{say}");
        exec(self.cmd("apt-get").args(["-qq", "update"]))?;
        fs::write(&stamp, b"").with_context(|| format!("writing {}", stamp.display()))
    }
}

/// Serialises the runs that fetch into one cache (two xtasks downloading at once would
/// race); held until the file is dropped.
pub fn lock(cache: &Path) -> anyhow::Result<fs::File> {
    use std::os::fd::AsRawFd;
    let path = cache.join(".lock");
    let f = fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    // SAFETY: flock on a descriptor we own; released when the file is dropped.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("locking {}", path.display()));
    }
    Ok(f)
}
