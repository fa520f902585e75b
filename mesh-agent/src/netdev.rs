//! Interface facts the datapath needs (index, MAC), read in the calling thread's network
//! namespace.

use std::ffi::CString;

use crate::{preflight, MeshError};

/// The interface's index and hardware address.
pub fn resolve(name: &str) -> Result<(u32, [u8; 6]), MeshError> {
    let ifindex = preflight::ifindex(name)?;
    Ok((ifindex, mac(name)?))
}

/// The interface's MAC (SIOCGIFHWADDR).
pub fn mac(name: &str) -> Result<[u8; 6], MeshError> {
    let io = |what: &str| MeshError::Io {
        what: format!("{what} of interface {name:?}"),
        source: std::io::Error::last_os_error(),
    };
    let c = CString::new(name).map_err(|_| MeshError::NoSuchInterface { name: name.into() })?;
    if c.as_bytes().len() >= libc::IFNAMSIZ {
        return Err(MeshError::NoSuchInterface { name: name.into() });
    }
    // SAFETY: a socket for the ioctl, closed below; ifreq is zeroed and the name fits.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(io("socket for the MAC"));
        }
        let mut ifr: libc::ifreq = std::mem::zeroed();
        for (d, s) in ifr.ifr_name.iter_mut().zip(c.as_bytes()) {
            *d = *s as libc::c_char;
        }
        let rc = libc::ioctl(fd, libc::SIOCGIFHWADDR as _, &mut ifr);
        let err = (rc < 0).then(|| io("reading the MAC"));
        libc::close(fd);
        if let Some(e) = err {
            return Err(e);
        }
        let sa = ifr.ifr_ifru.ifru_hwaddr.sa_data;
        Ok([
            sa[0] as u8,
            sa[1] as u8,
            sa[2] as u8,
            sa[3] as u8,
            sa[4] as u8,
            sa[5] as u8,
        ])
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn loopback_has_a_zero_mac_and_a_missing_interface_is_named() {
        assert_eq!(super::mac("lo").unwrap(), [0; 6]);
        let e = super::resolve("mesh-nope1").unwrap_err().to_string();
        assert!(e.contains("\"mesh-nope1\" does not exist"), "{e}");
    }
}

/// The interface that holds `addr` in the calling thread's network namespace.
pub fn interface_with_addr(addr: std::net::Ipv4Addr) -> Option<String> {
    ipv4_addrs()
        .into_iter()
        .find(|(_, a)| *a == addr)
        .map(|(name, _)| name)
}

/// Every (interface, IPv4 address) of the calling thread's network namespace
/// (getifaddrs).
fn ipv4_addrs() -> Vec<(String, std::net::Ipv4Addr)> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Vec::new();
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: walking the list getifaddrs returned.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() && unsafe { (*ifa.ifa_addr).sa_family } as i32 == libc::AF_INET {
            // SAFETY: an AF_INET address is a sockaddr_in; the name is NUL-terminated.
            let (sin, name) = unsafe {
                (
                    &*(ifa.ifa_addr as *const libc::sockaddr_in),
                    std::ffi::CStr::from_ptr(ifa.ifa_name),
                )
            };
            out.push((
                name.to_string_lossy().into_owned(),
                std::net::Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes()),
            ));
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: the list getifaddrs allocated.
    unsafe { libc::freeifaddrs(head) };
    out
}

#[cfg(test)]
mod addr_tests {
    #[test]
    fn loopback_addresses() {
        assert_eq!(super::ipv4_of("lo"), vec![std::net::Ipv4Addr::LOCALHOST]);
        assert!(super::ipv4_of("mesh-nope2").is_empty());
    }

    #[test]
    fn loopback_holds_127_0_0_1() {
        assert_eq!(
            super::interface_with_addr("127.0.0.1".parse().unwrap()).as_deref(),
            Some("lo")
        );
        assert_eq!(
            super::interface_with_addr("192.0.2.77".parse().unwrap()),
            None
        );
    }
}

/// A network interface as rtnetlink reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mac: Option<[u8; 6]>,
    /// For a veth, the peer's index (in the peer's namespace).
    pub peer: Option<u32>,
    /// The bridge it is a port of.
    pub master: Option<u32>,
}

/// Every interface of the calling thread's network namespace (RTM_GETLINK dump).
pub fn links() -> Result<Vec<Link>, MeshError> {
    use netlink_packet_core::{
        NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST,
    };
    use netlink_packet_route::{
        link::{LinkAttribute, LinkMessage},
        RouteNetlinkMessage,
    };
    use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
    let io = |what: &str, source: std::io::Error| MeshError::Io {
        what: format!("rtnetlink: {what}"),
        source,
    };
    let mut socket = Socket::new(NETLINK_ROUTE).map_err(|e| io("socket", e))?;
    socket.bind_auto().map_err(|e| io("bind", e))?;
    socket
        .connect(&SocketAddr::new(0, 0))
        .map_err(|e| io("connect", e))?;
    let mut req = NetlinkMessage::new(
        NetlinkHeader::default(),
        NetlinkPayload::from(RouteNetlinkMessage::GetLink(LinkMessage::default())),
    );
    req.header.flags = NLM_F_DUMP | NLM_F_REQUEST;
    req.header.sequence_number = 1;
    req.finalize();
    let mut buf = vec![0; req.buffer_len()];
    req.serialize(&mut buf[..]);
    socket.send(&buf, 0).map_err(|e| io("send", e))?;
    let mut out = Vec::new();
    let mut rx = vec![0u8; 65536];
    loop {
        let size = socket
            .recv(&mut &mut rx[..], 0)
            .map_err(|e| io("recv", e))?;
        let mut offset = 0;
        while offset < size {
            let msg: NetlinkMessage<RouteNetlinkMessage> =
                NetlinkMessage::deserialize(&rx[offset..size])
                    .map_err(|e| io("decode", std::io::Error::other(e.to_string())))?;
            match msg.payload {
                NetlinkPayload::Done(_) => return Ok(out),
                NetlinkPayload::Error(e) => {
                    return Err(io("dump", std::io::Error::other(format!("{e:?}"))))
                }
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(l)) => {
                    let mut link = Link {
                        index: l.header.index,
                        ..Default::default()
                    };
                    for a in l.attributes {
                        match a {
                            LinkAttribute::IfName(n) => link.name = n,
                            LinkAttribute::Address(m) if m.len() == 6 => {
                                link.mac = m.try_into().ok()
                            }
                            LinkAttribute::Link(p) => link.peer = Some(p),
                            LinkAttribute::Controller(m) => link.master = Some(m),
                            _ => {}
                        }
                    }
                    out.push(link);
                }
                _ => {}
            }
            if msg.header.length == 0 {
                break;
            }
            offset += msg.header.length as usize;
        }
    }
}

/// The IPv4 addresses of interface `name` in the calling thread's network namespace.
pub fn ipv4_of(name: &str) -> Vec<std::net::Ipv4Addr> {
    ipv4_addrs()
        .into_iter()
        .filter(|(n, _)| n == name)
        .map(|(_, a)| a)
        .collect()
}

/// As [`links`], in the network namespace at `netns` (a path such as a container's
/// sandbox key), on a thread that enters it.
pub fn links_in(netns: &std::path::Path) -> Result<Vec<Link>, MeshError> {
    in_netns(netns, links)
}

/// The links of the network namespace at `netns` and the IPv4 addresses of each.
pub fn links_and_addrs_in(
    netns: &std::path::Path,
) -> Result<Vec<(Link, Vec<std::net::Ipv4Addr>)>, MeshError> {
    in_netns(netns, || {
        Ok(links()?
            .into_iter()
            .map(|l| {
                let a = ipv4_of(&l.name);
                (l, a)
            })
            .collect())
    })
}

/// Every IPv4 address of the calling thread's network namespace, once each.
pub fn all_ipv4() -> Vec<std::net::Ipv4Addr> {
    let mut out: Vec<_> = ipv4_addrs().into_iter().map(|(_, a)| a).collect();
    out.sort();
    out.dedup();
    out
}

/// Request flags for [`request`]: create (and fail if it exists); create or replace.
pub const CREATE: u16 = netlink_packet_core::NLM_F_CREATE | netlink_packet_core::NLM_F_EXCL;
pub const REPLACE: u16 = netlink_packet_core::NLM_F_CREATE | netlink_packet_core::NLM_F_REPLACE;

/// Sends one rtnetlink request in the calling thread's network namespace and waits for
/// its acknowledgement; `what` names it in the error.
pub fn request(
    msg: netlink_packet_route::RouteNetlinkMessage,
    flags: u16,
    what: impl Into<String>,
) -> Result<(), MeshError> {
    use netlink_packet_core::{NetlinkPayload, NLM_F_ACK};
    let what = what.into();
    match exchange(msg, NLM_F_ACK | flags, &what)? {
        NetlinkPayload::Error(e) if e.code.is_some() => Err(MeshError::Io {
            what,
            source: e.to_io(),
        }),
        _ => Ok(()),
    }
}

/// Sends one rtnetlink GET of a single object (a link, a tc filter) in the calling
/// thread's network namespace: the kernel's answer, or `None` where it has no such
/// object (ENOENT, or ENODEV for a device that is gone).
pub fn get(
    msg: netlink_packet_route::RouteNetlinkMessage,
    what: impl Into<String>,
) -> Result<Option<netlink_packet_route::RouteNetlinkMessage>, MeshError> {
    use netlink_packet_core::NetlinkPayload;
    let what = what.into();
    match exchange(msg, 0, &what)? {
        NetlinkPayload::InnerMessage(m) => Ok(Some(m)),
        NetlinkPayload::Error(e) => match e.to_io() {
            io if matches!(io.raw_os_error(), Some(libc::ENOENT) | Some(libc::ENODEV)) => Ok(None),
            source => Err(MeshError::Io { what, source }),
        },
        other => Err(MeshError::Io {
            what,
            source: std::io::Error::other(format!("unexpected answer {other:?}")),
        }),
    }
}

/// One request, one answer (the first message the kernel sends back).
fn exchange(
    msg: netlink_packet_route::RouteNetlinkMessage,
    flags: u16,
    what: &str,
) -> Result<netlink_packet_core::NetlinkPayload<netlink_packet_route::RouteNetlinkMessage>, MeshError>
{
    use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_REQUEST};
    use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
    let err = |source: std::io::Error| MeshError::Io {
        what: what.to_string(),
        source,
    };
    let mut socket = Socket::new(NETLINK_ROUTE).map_err(err)?;
    socket.bind_auto().map_err(err)?;
    socket.connect(&SocketAddr::new(0, 0)).map_err(err)?;
    let mut req = NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::from(msg));
    req.header.flags = NLM_F_REQUEST | flags;
    req.header.sequence_number = 1;
    req.finalize();
    let mut buf = vec![0; req.buffer_len()];
    req.serialize(&mut buf[..]);
    socket.send(&buf, 0).map_err(err)?;
    let mut rx = vec![0u8; 16384];
    let size = socket.recv(&mut &mut rx[..], 0).map_err(err)?;
    let msg: NetlinkMessage<netlink_packet_route::RouteNetlinkMessage> =
        NetlinkMessage::deserialize(&rx[..size])
            .map_err(|e| err(std::io::Error::other(e.to_string())))?;
    Ok(msg.payload)
}

/// The identity of the network namespace at `netns`: its inode.
pub fn netns_id(netns: &std::path::Path) -> Result<u64, MeshError> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(netns)
        .map(|m| m.ino())
        .map_err(|source| MeshError::Io {
            what: format!("network namespace {}", netns.display()),
            source,
        })
}

/// Runs `f` on a thread that has entered the network namespace at `netns`.
pub fn in_netns<R: Send>(
    netns: &std::path::Path,
    f: impl FnOnce() -> Result<R, MeshError> + Send,
) -> Result<R, MeshError> {
    let file = std::fs::File::open(netns).map_err(|source| MeshError::Io {
        what: format!("opening network namespace {}", netns.display()),
        source,
    })?;
    std::thread::scope(|s| {
        s.spawn(|| {
            use std::os::fd::AsRawFd;
            // SAFETY: setns on this thread only, with a namespace fd we opened.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(MeshError::Io {
                    what: format!("entering network namespace {}", netns.display()),
                    source: std::io::Error::last_os_error(),
                });
            }
            f()
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

#[cfg(test)]
mod link_tests {
    #[test]
    fn loopback_is_listed() {
        let l = super::links().unwrap();
        assert!(l.iter().any(|l| l.name == "lo" && l.index == 1), "{l:?}");
    }
}

/// The MTU of interface `name` in the calling thread's network namespace (SIOCGIFMTU:
/// sysfs shows the mount namespace's view, not necessarily this network namespace's).
pub fn mtu(name: &str) -> Option<u32> {
    if name.len() >= libc::IFNAMSIZ {
        return None;
    }
    // SAFETY: a plain datagram socket, closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: ifreq is plain data; the name fits (checked above) and stays NUL-terminated.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    // SAFETY: SIOCGIFMTU fills ifr_ifru.ifru_mtu of the ifreq we own.
    let rc = unsafe { libc::ioctl(fd, libc::SIOCGIFMTU, &mut ifr) };
    // SAFETY: closing the socket opened above.
    unsafe { libc::close(fd) };
    if rc != 0 {
        return None;
    }
    // SAFETY: the union member SIOCGIFMTU wrote.
    Some(unsafe { ifr.ifr_ifru.ifru_mtu } as u32)
}

#[cfg(test)]
#[test]
fn loopback_has_an_mtu() {
    assert!(mtu("lo").is_some_and(|m| m >= 1500));
    assert_eq!(mtu("mesh-nope0"), None);
}
