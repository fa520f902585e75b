//! A client connection from a chosen source port (bound before connecting), to check that
//! real traffic on a 5-tuple does what `meshctl trace` said it would.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, TcpStream},
    os::fd::FromRawFd,
    time::Duration,
};

fn sockaddr(a: Ipv4Addr, port: u16) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(a.octets()),
        },
        sin_zero: [0; 8],
    }
}

/// One HTTP/1.0 GET of `path` from `src:sport` to `dst:dport`, in the calling thread's
/// network namespace: the body.
pub fn http_get_from(
    src: &str,
    sport: u16,
    dst: &str,
    dport: u16,
    path: &str,
) -> std::io::Result<String> {
    let bad = |e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e);
    let (a, b) = (
        sockaddr(src.parse().map_err(bad)?, sport),
        sockaddr(dst.parse().map_err(bad)?, dport),
    );
    let len = std::mem::size_of::<libc::sockaddr_in>() as u32;
    // SAFETY: a new socket, owned by the TcpStream at once; plain socket calls on it.
    let mut s = unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let s = TcpStream::from_raw_fd(fd);
        let one: libc::c_int = 1;
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            &one as *const _ as *const libc::c_void,
            4,
        );
        if libc::bind(fd, &a as *const _ as *const libc::sockaddr, len) != 0
            || libc::connect(fd, &b as *const _ as *const libc::sockaddr, len) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        s
    };
    get_on(&mut s, path)
}

/// One HTTP/1.0 GET of `path` on the connected stream `s`: the body (5 s to answer).
pub fn get_on(s: &mut TcpStream, path: &str) -> std::io::Result<String> {
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or("")
        .trim()
        .to_string())
}
