//! The raw kernel calls aya and std lack: `bpf(2)` commands on pinned links and
//! programs (BPF_OBJ_GET, BPF_OBJ_GET_INFO_BY_FD, BPF_LINK_UPDATE,
//! BPF_PROG_GET_FD_BY_ID, BPF_PROG_TEST_RUN) and the network namespace cookie. Everything else reaches the kernel through aya.

use std::{
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
};

use crate::MeshError;

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> MeshError {
    let what = what.into();
    move |source| MeshError::Io { what, source }
}

/// A raw `bpf(2)` call.
pub fn bpf(cmd: u32, attr: &mut [u8; 128]) -> std::io::Result<i64> {
    // SAFETY: `attr` is a zero-padded bpf_attr of the size the kernel is told.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            attr.as_mut_ptr(),
            attr.len() as libc::c_long,
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

pub fn put32(a: &mut [u8; 128], off: usize, v: u32) {
    a[off..off + 4].copy_from_slice(&v.to_ne_bytes());
}

pub fn put64(a: &mut [u8; 128], off: usize, v: u64) {
    a[off..off + 8].copy_from_slice(&v.to_ne_bytes());
}

fn get32(a: &[u8], off: usize) -> u32 {
    u32::from_ne_bytes(a[off..off + 4].try_into().unwrap())
}

const BPF_PROG_TEST_RUN: u32 = 10;
const BPF_PROG_GET_FD_BY_ID: u32 = 13;
const BPF_OBJ_GET_INFO_BY_FD: u32 = 15;
const BPF_OBJ_GET: u32 = 7;

const BPF_LINK_UPDATE: u32 = 29;

/// An fd for the object (link, map, program) pinned at `pin` (BPF_OBJ_GET).
pub fn obj_get(pin: &Path) -> std::io::Result<OwnedFd> {
    let path = std::ffi::CString::new(pin.as_os_str().as_encoded_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    let mut a = [0u8; 128];
    put64(&mut a, 0, path.as_ptr() as u64);
    let fd = bpf(BPF_OBJ_GET, &mut a)?;
    // SAFETY: a new descriptor the kernel gave us; owned from here on.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// The id of the program attached through the link pinned at `link_pin`.
pub fn link_program_id(link_pin: &Path) -> Result<u32, MeshError> {
    let io = |what: &str| {
        let what = format!("{what} {}", link_pin.display());
        move |source| MeshError::Io { what, source }
    };
    let link = obj_get(link_pin).map_err(io("opening the link pinned at"))?;
    // struct bpf_link_info: type, id, prog_id, ...
    let mut info = [0u8; 256];
    let mut a = [0u8; 128];
    put32(&mut a, 0, link.as_raw_fd() as u32);
    put32(&mut a, 4, info.len() as u32);
    put64(&mut a, 8, info.as_mut_ptr() as u64);
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut a).map_err(io("reading the link"))?;
    Ok(get32(&info, 8))
}

/// BPF_LINK_UPDATE: the link pinned at `pin` runs `prog` from now on (aya has no such
/// call for cgroup links, nor a way to reach a pinned link's descriptor).
pub fn link_update(pin: &Path, prog: std::os::fd::BorrowedFd<'_>) -> std::io::Result<()> {
    let link = obj_get(pin)?;
    let mut a = [0u8; 128];
    put32(&mut a, 0, link.as_raw_fd() as u32);
    put32(&mut a, 4, prog.as_raw_fd() as u32);
    bpf(BPF_LINK_UPDATE, &mut a).map(|_| ())
}

/// An fd for the loaded program `id`.
pub fn program_by_id(id: u32) -> std::io::Result<OwnedFd> {
    let mut a = [0u8; 128];
    put32(&mut a, 0, id);
    let prog = bpf(BPF_PROG_GET_FD_BY_ID, &mut a)?;
    // SAFETY: a new descriptor the kernel gave us.
    Ok(unsafe { OwnedFd::from_raw_fd(prog as i32) })
}

/// Runs `frame` once through the program `prog` (BPF_PROG_TEST_RUN): its return code
/// and the frame as it left it.
pub fn test_run(prog: &OwnedFd, frame: &[u8]) -> Result<(i32, Vec<u8>), MeshError> {
    let mut out = vec![0u8; frame.len() + 256];
    let mut a = [0u8; 128];
    put32(&mut a, 0, prog.as_raw_fd() as u32);
    put32(&mut a, 8, frame.len() as u32);
    put32(&mut a, 12, out.len() as u32);
    put64(&mut a, 16, frame.as_ptr() as u64);
    put64(&mut a, 24, out.as_mut_ptr() as u64);
    put32(&mut a, 32, 1); // repeat
    bpf(BPF_PROG_TEST_RUN, &mut a).map_err(|source| MeshError::Io {
        what: "BPF_PROG_TEST_RUN".into(),
        source,
    })?;
    let retval = get32(&a, 4) as i32;
    out.truncate(get32(&a, 12) as usize);
    Ok((retval, out))
}

/// The cookie of the calling thread's network namespace (SO_NETNS_COOKIE, Linux 5.14),
/// what `bpf_get_netns_cookie` gives the socket programs.
pub fn netns_cookie() -> Result<u64, MeshError> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    // SAFETY: a plain datagram socket, closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io("a socket for the netns cookie")(
            std::io::Error::last_os_error(),
        ));
    }
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `cookie`.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    let err = std::io::Error::last_os_error();
    // SAFETY: closing the socket opened above.
    unsafe { libc::close(fd) };
    if rc != 0 {
        return Err(io("SO_NETNS_COOKIE (Linux 5.14 or later)")(err));
    }
    Ok(cookie)
}
