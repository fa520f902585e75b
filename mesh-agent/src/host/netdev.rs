//! Interfaces and addresses of a network namespace, read in the calling thread's: index
//! and MAC and MTU (the interface ioctls), and over rtnetlink (the `rtnetlink` crate) the
//! link dump, every IPv4 address, and one-shot requests for what has no builder there
//! (tc, `crate::datapath::tcnl`). Another namespace is entered for the call on a thread
//! of its own ([`in_netns`]): a netlink socket stays bound to the namespace it was
//! opened in.

use std::{ffi::CString, future::Future, net::Ipv4Addr};

use futures_util::{StreamExt, TryStreamExt};
use netlink_packet_core::{NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_REQUEST};
use netlink_packet_route::{
    address::AddressAttribute,
    link::{LinkAttribute, LinkMessage},
    AddressFamily, RouteNetlinkMessage,
};

use crate::{host::preflight, MeshError};

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

/// Runs `f` on an rtnetlink connection opened in the calling thread's network namespace,
/// to completion, on a private current-thread runtime: the callers are synchronous
/// (meshctl, preflight, the tests, a thread inside another namespace). Called from
/// within a tokio runtime (the agent's), where a second one cannot be started, it runs
/// on a scoped thread of its own, which shares the caller's namespace. Any error is
/// reported as `what`.
pub fn with_rtnetlink<R, Fut>(
    what: &str,
    f: impl FnOnce(rtnetlink::Handle) -> Fut + Send,
) -> Result<R, MeshError>
where
    R: Send,
    Fut: Future<Output = std::io::Result<R>>,
{
    let run = || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()?;
        rt.block_on(async {
            let (connection, handle, _) = rtnetlink::new_connection()?;
            // Dropped with the runtime when `f` is done: the socket closes with it.
            tokio::spawn(connection);
            f(handle).await
        })
    };
    let result = if tokio::runtime::Handle::try_current().is_ok() {
        std::thread::scope(|s| {
            s.spawn(run)
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    } else {
        run()
    };
    result.map_err(|source| MeshError::Io {
        what: what.to_string(),
        source,
    })
}

/// The kernel's errno as the I/O error it is; rtnetlink's own errors as text.
pub fn io_error(e: rtnetlink::Error) -> std::io::Error {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.to_io(),
        e => std::io::Error::other(e.to_string()),
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

impl From<LinkMessage> for Link {
    fn from(l: LinkMessage) -> Link {
        let mut link = Link {
            index: l.header.index,
            ..Default::default()
        };
        for a in l.attributes {
            match a {
                LinkAttribute::IfName(n) => link.name = n,
                LinkAttribute::Address(m) => link.mac = m.try_into().ok(),
                LinkAttribute::Link(p) => link.peer = Some(p),
                LinkAttribute::Controller(m) => link.master = Some(m),
                _ => {}
            }
        }
        link
    }
}

/// Every interface of the calling thread's network namespace (RTM_GETLINK dump).
pub fn links() -> Result<Vec<Link>, MeshError> {
    with_rtnetlink("rtnetlink: dump", |h| async move { dump_links(&h).await })
}

/// As [`links`], in the network namespace at `netns` (a path such as a container's
/// sandbox key), on a thread that enters it.
pub fn links_in(netns: &std::path::Path) -> Result<Vec<Link>, MeshError> {
    in_netns(netns, links)
}

/// The links of the network namespace at `netns` and the IPv4 addresses of each.
pub fn links_and_addrs_in(
    netns: &std::path::Path,
) -> Result<Vec<(Link, Vec<Ipv4Addr>)>, MeshError> {
    in_netns(netns, || {
        with_rtnetlink("rtnetlink: dump", |h| async move {
            let links = dump_links(&h).await?;
            // As for [`ipv4_of`], a failed address dump is no addresses.
            let addrs = dump_ipv4(&h, Some(&links)).await.unwrap_or_default();
            Ok(links
                .into_iter()
                .map(|l| {
                    let a = addrs
                        .iter()
                        .filter(|(n, _)| *n == l.name)
                        .map(|(_, a)| *a)
                        .collect();
                    (l, a)
                })
                .collect())
        })
    })
}

async fn dump_links(h: &rtnetlink::Handle) -> std::io::Result<Vec<Link>> {
    h.link()
        .get()
        .execute()
        .map_ok(Link::from)
        .try_collect()
        .await
        .map_err(io_error)
}

/// Every (interface, IPv4 address) of the namespace, named as getifaddrs(3) names them:
/// by the address's label (an alias such as `eth0:1` keeps its own), else by the name
/// of its interface (from `links`, or a dump of them if not given), and the local
/// address rather than a point-to-point peer.
async fn dump_ipv4(
    h: &rtnetlink::Handle,
    links: Option<&[Link]>,
) -> std::io::Result<Vec<(String, Ipv4Addr)>> {
    let mut req = h.address().get();
    req.message_mut().header.family = AddressFamily::Inet;
    let msgs: Vec<_> = req.execute().try_collect().await.map_err(io_error)?;
    let mut dumped = None;
    let mut out = Vec::new();
    for m in msgs {
        let (mut label, mut local, mut address) = (None, None, None);
        for a in m.attributes {
            match a {
                AddressAttribute::Label(l) => label = Some(l),
                AddressAttribute::Local(std::net::IpAddr::V4(a)) => local = Some(a),
                AddressAttribute::Address(std::net::IpAddr::V4(a)) => address = Some(a),
                _ => {}
            }
        }
        let Some(addr) = local.or(address) else {
            continue;
        };
        let name = match label {
            Some(l) => l,
            None => {
                let links = match links {
                    Some(l) => l,
                    None => match &mut dumped {
                        Some(d) => d,
                        d => d.insert(dump_links(h).await?),
                    },
                };
                match links.iter().find(|l| l.index == m.header.index) {
                    Some(l) => l.name.clone(),
                    None => continue,
                }
            }
        };
        out.push((name, addr));
    }
    Ok(out)
}

/// Every (interface, IPv4 address) of the calling thread's network namespace; none if
/// rtnetlink cannot tell.
fn ipv4_addrs() -> Vec<(String, Ipv4Addr)> {
    with_rtnetlink("rtnetlink: address dump", |h| async move {
        dump_ipv4(&h, None).await
    })
    .unwrap_or_default()
}

/// The interface that holds `addr` in the calling thread's network namespace.
pub fn interface_with_addr(addr: Ipv4Addr) -> Option<String> {
    ipv4_addrs()
        .into_iter()
        .find(|(_, a)| *a == addr)
        .map(|(name, _)| name)
}

/// The IPv4 addresses of interface `name` in the calling thread's network namespace.
pub fn ipv4_of(name: &str) -> Vec<Ipv4Addr> {
    ipv4_addrs()
        .into_iter()
        .filter(|(n, _)| n == name)
        .map(|(_, a)| a)
        .collect()
}

/// Every IPv4 address of the calling thread's network namespace, once each.
pub fn all_ipv4() -> Vec<Ipv4Addr> {
    let mut out: Vec<_> = ipv4_addrs().into_iter().map(|(_, a)| a).collect();
    out.sort();
    out.dedup();
    out
}

/// Sends one rtnetlink request in the calling thread's network namespace and waits for
/// its acknowledgement; `what` names it in the error. For messages rtnetlink has no
/// request for (a tc filter running a BPF program at a fixed priority and handle).
pub fn request(
    msg: RouteNetlinkMessage,
    flags: u16,
    what: impl Into<String>,
) -> Result<(), MeshError> {
    with_rtnetlink(&what.into(), |mut h| async move {
        let mut req = NetlinkMessage::from(msg);
        req.header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
        let mut answers = h.request(req).map_err(io_error)?;
        while let Some(answer) = answers.next().await {
            match answer.payload {
                NetlinkPayload::Error(e) if e.code.is_some() => return Err(e.to_io()),
                _ => {}
            }
        }
        Ok(())
    })
}

/// Sends one rtnetlink GET of a single object (a tc filter) in the calling thread's
/// network namespace: the kernel's answer, or `None` where it has no such object
/// (ENOENT, or ENODEV for a device that is gone).
pub fn get(
    msg: RouteNetlinkMessage,
    what: impl Into<String>,
) -> Result<Option<RouteNetlinkMessage>, MeshError> {
    let what = what.into();
    let answer = with_rtnetlink(&what, |mut h| async move {
        let mut req = NetlinkMessage::from(msg);
        req.header.flags = NLM_F_REQUEST;
        let mut answers = h.request(req).map_err(io_error)?;
        answers
            .next()
            .await
            .ok_or_else(|| std::io::Error::other("no answer"))
    })?;
    match answer.payload {
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
mod tests {
    #[test]
    fn loopback_has_a_zero_mac_and_a_missing_interface_is_named() {
        assert_eq!(super::mac("lo").unwrap(), [0; 6]);
        let e = super::resolve("mesh-nope1").unwrap_err().to_string();
        assert!(e.contains("\"mesh-nope1\" does not exist"), "{e}");
    }

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

    #[test]
    fn loopback_is_listed() {
        let l = super::links().unwrap();
        assert!(l.iter().any(|l| l.name == "lo" && l.index == 1), "{l:?}");
    }

    #[test]
    fn loopback_has_an_mtu() {
        assert!(super::mtu("lo").is_some_and(|m| m >= 1500));
        assert_eq!(super::mtu("mesh-nope0"), None);
    }

    /// The agent calls in from its current-thread runtime, where starting another
    /// runtime would panic.
    #[tokio::test]
    async fn works_from_inside_a_runtime() {
        let l = super::links().unwrap();
        assert!(l.iter().any(|l| l.name == "lo"), "{l:?}");
        assert!(super::all_ipv4().contains(&std::net::Ipv4Addr::LOCALHOST));
    }
}
