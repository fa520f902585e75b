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

/// The oldest kernel the agent runs on. Newer facilities are probed at load time, each
/// with its fallback ([`crate::datapath::features`]); these have none.
pub const MIN_KERNEL: (u32, u32) = (5, 10);

/// What the mesh needs with no fallback, and the Linux release that brought it.
const NEEDS: &[((u32, u32), &str)] = &[
    ((5, 7), "cgroup bpf links and BPF_LINK_UPDATE (5.7)"),
    ((5, 7), "bpf_get_netns_cookie in socket programs (5.7)"),
    ((5, 8), "getpeername socket hooks (5.8)"),
    ((5, 9), "XDP bpf links (5.9)"),
    ((5, 10), "bpf_redirect_neigh (5.10)"),
];

/// (major, minor) of a kernel release string such as `6.18.44-fc-v669`.
pub fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut it = release.split(|c: char| !c.is_ascii_digit());
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

/// What a kernel of `version` lacks of [`NEEDS`].
pub fn missing(version: (u32, u32)) -> Vec<&'static str> {
    NEEDS
        .iter()
        .filter(|(since, _)| version < *since)
        .map(|(_, what)| *what)
        .collect()
}

/// The running kernel's release (`uname -r`).
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// Refuses a kernel older than [`MIN_KERNEL`], naming what it lacks (an unreadable
/// release is let through: the load itself then says what is missing).
pub fn require_kernel() -> Result<(), MeshError> {
    check_kernel(&kernel_release())
}

fn check_kernel(release: &str) -> Result<(), MeshError> {
    match kernel_version(release) {
        Some(v) if v < MIN_KERNEL => Err(MeshError::KernelTooOld {
            release: release.to_string(),
            missing: missing(v).join(", "),
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
#[test]
fn kernel_releases_parse() {
    assert_eq!(kernel_version("6.18.44-fc-v669"), Some((6, 18)));
    assert_eq!(kernel_version("5.15.0-91-generic"), Some((5, 15)));
    assert_eq!(kernel_version("5.10.0-46-amd64"), Some((5, 10)));
    assert_eq!(kernel_version("6.6"), Some((6, 6)));
    assert_eq!(kernel_version("weird"), None);
    for ok in [
        "5.10.0-46-amd64",
        "5.14.0-570.el9.x86_64",
        "6.1.0-57-amd64",
        "6.18.44",
        "weird",
    ] {
        assert!(check_kernel(ok).is_ok(), "{ok}");
    }
    assert!(
        missing(MIN_KERNEL).is_empty(),
        "the minimum lacks nothing it needs"
    );
    let e = check_kernel("5.4.0-200-generic").unwrap_err().to_string();
    assert!(
        e.contains("kernel 5.4.0-200-generic is too old")
            && e.contains("Linux 5.10 or later")
            && e.contains("getpeername socket hooks (5.8)")
            && e.contains("bpf_redirect_neigh (5.10)")
            && !e.contains('\n'),
        "{e}"
    );
    let e = check_kernel("5.9.16").unwrap_err().to_string();
    assert!(e.ends_with("(missing: bpf_redirect_neigh (5.10))"), "{e}");
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

/// The host port's address must be link-local: the node's redirected sockets take it as
/// their source, and any other address could be routed off the node or taken by a
/// network of its own.
pub fn require_link_local(flag: &'static str, addr: std::net::Ipv4Addr) -> Result<(), MeshError> {
    if addr.is_link_local() {
        return Ok(());
    }
    Err(MeshError::Setting {
        what: format!("{flag} {addr} is not link-local: pick an address in 169.254.0.0/16 (default 169.254.42.2)"),
    })
}

#[cfg(test)]
#[test]
fn the_host_address_must_be_link_local() {
    let ok = "169.254.42.2".parse().unwrap();
    assert!(require_link_local("--host-addr", ok).is_ok());
    let e = require_link_local("--host-addr", "10.0.0.2".parse().unwrap()).unwrap_err();
    assert_eq!(
        e.to_string(),
        "--host-addr 10.0.0.2 is not link-local: pick an address in 169.254.0.0/16 (default 169.254.42.2)"
    );
}
