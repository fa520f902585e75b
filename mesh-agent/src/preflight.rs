//! Prerequisite checks, each failing with one actionable line.

use std::{ffi::CString, path::Path};

use crate::MeshError;

/// `BPF_FS_MAGIC` from linux/magic.h.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

pub fn require_root(what: &'static str) -> Result<(), MeshError> {
    if is_root() {
        Ok(())
    } else {
        Err(MeshError::NotRoot { what })
    }
}

/// The oldest kernel the agent runs on: tcx (6.6) is what lets a pinned link keep a TC
/// program attached with no process holding it.
pub const MIN_KERNEL: (u32, u32) = (6, 6);

/// (major, minor) of a kernel release string such as `6.18.44-fc-v669`.
pub fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut it = release.split(|c: char| !c.is_ascii_digit());
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

/// Refuses a kernel older than [`MIN_KERNEL`] (an unreadable release is let through:
/// the attach itself then says what is missing).
pub fn require_kernel() -> Result<(), MeshError> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let release = release.trim();
    match kernel_version(release) {
        Some(v) if v < MIN_KERNEL => Err(MeshError::KernelTooOld {
            release: release.to_string(),
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
#[test]
fn kernel_releases_parse() {
    assert_eq!(kernel_version("6.18.44-fc-v669"), Some((6, 18)));
    assert_eq!(kernel_version("5.15.0-91-generic"), Some((5, 15)));
    assert_eq!(kernel_version("6.6"), Some((6, 6)));
    assert_eq!(kernel_version("weird"), None);
    assert!((5, 15) < MIN_KERNEL && (6, 6) >= MIN_KERNEL && (6, 18) >= MIN_KERNEL);
    let e = MeshError::KernelTooOld {
        release: "5.15.0".into(),
    }
    .to_string();
    assert!(
        e.contains("kernel 5.15.0 is too old") && e.contains("6.6"),
        "{e}"
    );
}

/// True if `path` (or, if it does not exist yet, its parent) is on a bpffs.
pub fn on_bpffs(path: &Path) -> bool {
    let probe = if path.exists() {
        path
    } else {
        match path.parent() {
            Some(p) => p,
            None => return false,
        }
    };
    let Ok(c) = CString::new(probe.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and out-pointer.
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    rc == 0 && st.f_type as i64 == BPF_FS_MAGIC
}

/// The pin directory must live on a mounted bpffs; it is created if missing.
pub fn require_bpffs(dir: &Path) -> Result<(), MeshError> {
    if !on_bpffs(dir) {
        let mount = dir
            .ancestors()
            .find(|a| a.file_name().is_some_and(|n| n == "bpf"))
            .unwrap_or(dir);
        return Err(MeshError::BpffsNotMounted {
            path: mount.to_path_buf(),
        });
    }
    std::fs::create_dir_all(dir).map_err(|source| MeshError::Io {
        what: format!("creating pin directory {}", dir.display()),
        source,
    })
}

/// The interface's index in the current network namespace.
pub fn ifindex(name: &str) -> Result<u32, MeshError> {
    let c = CString::new(name).map_err(|_| MeshError::NoSuchInterface { name: name.into() })?;
    // SAFETY: valid C string.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => Err(MeshError::NoSuchInterface { name: name.into() }),
        i => Ok(i),
    }
}

/// The name of interface `index` in this network namespace, if it exists.
pub fn ifname(index: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: buf has IF_NAMESIZE bytes, as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: on success buf holds a NUL-terminated name.
    let name = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    Some(name.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_interface_is_one_clear_line() {
        let e = ifindex("mesh-nope0").unwrap_err().to_string();
        assert!(e.contains("\"mesh-nope0\" does not exist"), "{e}");
        assert!(!e.contains('\n'));
    }

    #[test]
    fn tmp_is_not_bpffs() {
        assert!(!on_bpffs(Path::new("/tmp")));
        let e = require_bpffs(Path::new("/tmp/mesh-not-bpffs/x"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("bpffs is not mounted"), "{e}");
    }
}
