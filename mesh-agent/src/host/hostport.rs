//! The host port: published ports dialled from the node itself and from its containers
//! (the kernel half is `mesh_common::sock`). Here: the veth pair the redirected sockets
//! are routed into (the task program runs on its far end, so these flows take the same
//! path as a task's own request: Maglev, conntrack, tunnel, RST when nobody serves), its
//! routes, the network namespaces whose sockets are ours, and the cgroup v2 directory the
//! socket programs attach to.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use crate::{host::netdev, MeshError};

/// Where the node's redirected sockets send (no ARP: the far end takes every frame).
pub const HOST_DEV: &str = "mesh-host0";
/// Its peer, with the task program at ingress.
pub const HOST_PEER: &str = "mesh-host1";
/// What VXLAN adds (outer Ethernet, IPv4, UDP, VXLAN): the host port's MTU is the
/// underlay's less this, so a flow tunnelled to another node never needs fragmenting.
pub const VXLAN_OVERHEAD: u32 = 50;

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
/// Where cgroup v2 is mounted on a unified host, and on a hybrid (systemd) one.
pub const CGROUP2_CANDIDATES: [&str; 2] = ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"];

/// Whether `dir` is the top of a cgroup v2 mount.
pub fn is_cgroup2(dir: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs fills the struct we own from a NUL-terminated path.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    (unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0) && st.f_type as i64 == CGROUP2_SUPER_MAGIC
}

/// The cgroup v2 directory the socket programs attach to: `explicit`, which must be a
/// cgroup v2 mount or hold one as `unified` (a hybrid host's /sys/fs/cgroup, mounted
/// into the agent's container), else the first of [`CGROUP2_CANDIDATES`] that is one.
pub fn cgroup2_dir(explicit: Option<&Path>) -> Result<PathBuf, MeshError> {
    match explicit {
        Some(p) if is_cgroup2(p) => Ok(p.to_path_buf()),
        Some(p) if is_cgroup2(&p.join("unified")) => Ok(p.join("unified")),
        Some(p) => Err(MeshError::HostPort(format!(
            "{} is not a cgroup v2 mount: pass --cgroup with one (`mount -t cgroup2 none DIR`), \
             or --host-ports off",
            p.display()
        ))),
        None => CGROUP2_CANDIDATES
            .iter()
            .map(Path::new)
            .find(|p| is_cgroup2(p))
            .map(Path::to_path_buf)
            .ok_or_else(|| {
                MeshError::HostPort(
                    "no cgroup v2 mount at /sys/fs/cgroup or /sys/fs/cgroup/unified: mount one \
                     (`mount -t cgroup2 none /sys/fs/cgroup/unified`) and pass --cgroup, or \
                     --host-ports off"
                        .into(),
                )
            }),
    }
}

/// The cookie of the network namespace at `netns`.
pub fn netns_cookie_of(netns: &Path) -> Result<u64, MeshError> {
    netdev::in_netns(netns, crate::datapath::sys::netns_cookie)
}

/// Creates the host port (the veth pair [`HOST_DEV`] / [`HOST_PEER`], no ARP on
/// [`HOST_DEV`], both up) unless it is there, and sets its MTU. Returns the peer's index.
/// Kept across agent restarts: sockets connected through it keep working.
pub fn ensure_device(mtu: u32) -> Result<u32, MeshError> {
    use rtnetlink::{LinkUnspec, LinkVeth};
    if crate::host::preflight::ifindex(HOST_DEV).is_err() {
        netdev::with_rtnetlink(
            "creating the host port (veth mesh-host0/mesh-host1)",
            |h| async move {
                let veth = LinkVeth::new(HOST_DEV, HOST_PEER).build();
                h.link().add(veth).execute().await.map_err(netdev::io_error)
            },
        )?;
    }
    let (dev, peer) = (
        crate::host::preflight::ifindex(HOST_DEV)?,
        crate::host::preflight::ifindex(HOST_PEER)?,
    );
    netdev::with_rtnetlink("bringing the host port up", |h| async move {
        for (ix, arp) in [(dev, false), (peer, true)] {
            let m = LinkUnspec::new_with_index(ix)
                .up()
                .arp(arp)
                .mtu(mtu)
                .build();
            h.link().set(m).execute().await.map_err(netdev::io_error)?;
        }
        Ok(())
    })?;
    Ok(peer)
}

/// Routes `dst`/32 into the host port, from `src` (the node's address: what a task on
/// another node sees as the client). Replaces what is there.
pub fn route(dst: Ipv4Addr, src: Ipv4Addr) -> Result<(), MeshError> {
    let dev = crate::host::preflight::ifindex(HOST_DEV)?;
    netdev::with_rtnetlink(&format!("routing {dst} into {HOST_DEV}"), |h| async move {
        let m = route_msg(dst, dev).pref_source(src).build();
        h.route()
            .add(m)
            .replace()
            .execute()
            .await
            .map_err(netdev::io_error)
    })
}

/// Removes the route to `dst`/32 through the host port (gone already: fine).
pub fn unroute(dst: Ipv4Addr) -> Result<(), MeshError> {
    let Ok(dev) = crate::host::preflight::ifindex(HOST_DEV) else {
        return Ok(());
    };
    match netdev::with_rtnetlink(&format!("removing the route to {dst}"), |h| async move {
        let m = route_msg(dst, dev).build();
        h.route().del(m).execute().await.map_err(netdev::io_error)
    }) {
        Err(MeshError::Io { source, .. }) if source.raw_os_error() == Some(libc::ESRCH) => Ok(()),
        r => r,
    }
}

/// A route to `dst`/32 out of `dev`: table main, static, link scope, unicast.
fn route_msg(dst: Ipv4Addr, dev: u32) -> rtnetlink::RouteMessageBuilder<Ipv4Addr> {
    rtnetlink::RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(dst, 32)
        .output_interface(dev)
        .scope(netlink_packet_route::route::RouteScope::Link)
}

/// Removes the host port (its routes go with it).
pub fn remove_device() -> Result<(), MeshError> {
    let Ok(ix) = crate::host::preflight::ifindex(HOST_DEV) else {
        return Ok(());
    };
    netdev::with_rtnetlink("removing the host port", |h| async move {
        h.link().del(ix).execute().await.map_err(netdev::io_error)
    })
}

/// The network namespaces whose sockets the mesh redirects, beyond the agent's own:
/// every namespace file directly in `dirs` (Docker's netns directory: its containers'
/// sandboxes) and every file in `files`. Unreadable ones are skipped (a container going
/// away): the next pass has them or not.
pub fn namespaces(dirs: &[PathBuf], files: &[PathBuf]) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = files.to_vec();
    for d in dirs {
        if let Ok(rd) = std::fs::read_dir(d) {
            out.extend(rd.flatten().map(|e| e.path()).filter(|p| p.is_file()));
        }
    }
    out.sort();
    out.dedup();
    out
}

/// The VIPs the node's own sockets reach through the host port: those of services with
/// ports (Docker's every-port VIPs live on its overlay, reached from tasks there).
pub fn port_vips(model: &crate::model::Model) -> std::collections::BTreeSet<Ipv4Addr> {
    model
        .services
        .iter()
        .filter(|s| !s.every_port && !s.ports.is_empty())
        .flat_map(|s| s.vips.iter().copied())
        .collect()
}

/// The host port of one node, set up: device, routes, programs, scope.
#[derive(Debug)]
pub struct HostPorts {
    pub host_addr: Ipv4Addr,
    pub node_addr: Ipv4Addr,
    pub cgroup: PathBuf,
    own: u64,
    /// Namespace files in the scope, by path, with (inode, cookie).
    scoped: std::collections::BTreeMap<PathBuf, (u64, u64)>,
    vips: std::collections::BTreeSet<Ipv4Addr>,
}

impl HostPorts {
    /// Sets the host port up in the calling thread's network namespace (the node's):
    /// the veth pair with its MTU from `underlay`'s, the route to `host_addr` from
    /// `node_addr`, the task program on the far end, the socket programs on the cgroup
    /// (pinned in `pins` when given: they stay when the agent goes), and this namespace
    /// in the scope. Idempotent: a restarted agent takes over what is there.
    pub fn setup(
        dp: &mut crate::datapath::loader::Datapath,
        cgroup: Option<&Path>,
        underlay: &str,
        node_addr: Ipv4Addr,
        host_addr: Ipv4Addr,
        pins: Option<&crate::datapath::pins::PinDir>,
    ) -> Result<HostPorts, MeshError> {
        let cgroup = cgroup2_dir(cgroup)?;
        let mtu = netdev::mtu(underlay).unwrap_or(1500);
        ensure_device(mtu.saturating_sub(VXLAN_OVERHEAD).max(576))?;
        route(host_addr, node_addr)?;
        match pins {
            Some(p) => {
                dp.attach_pinned(
                    crate::datapath::pins::Hook::TcHost,
                    HOST_PEER,
                    p,
                    aya::programs::XdpMode::default(),
                )?;
                dp.attach_sock_pinned(&cgroup, p)?;
            }
            None => {
                dp.attach_tc_task(HOST_PEER)?;
                dp.attach_sock(&cgroup)?;
            }
        }
        let own = crate::datapath::sys::netns_cookie()?;
        dp.scope_netns(own, Some(mesh_common::sock::NETNS_HOST))?;
        Ok(HostPorts {
            host_addr,
            node_addr,
            cgroup,
            own,
            scoped: Default::default(),
            vips: Default::default(),
        })
    }

    /// Brings the scope and the VIP routes in line: `namespaces` (files) and this node's
    /// own namespace are in the scope, nothing else; each of `vips` is routed into the
    /// host port. A namespace that cannot be entered (its container is going away) is
    /// left out until a later pass.
    pub fn sync(
        &mut self,
        dp: &mut crate::datapath::loader::Datapath,
        namespaces: &[PathBuf],
        vips: &std::collections::BTreeSet<Ipv4Addr>,
    ) -> Result<(), MeshError> {
        use std::os::unix::fs::MetadataExt;
        let mut next = std::collections::BTreeMap::new();
        for ns in namespaces {
            let Ok(ino) = std::fs::metadata(ns).map(|m| m.ino()) else {
                continue;
            };
            let cookie = match self.scoped.get(ns) {
                Some((i, c)) if *i == ino => *c,
                _ => match netns_cookie_of(ns) {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::debug!(netns = %ns.display(), "not in the host ports' scope yet: {e}");
                        continue;
                    }
                },
            };
            next.insert(ns.clone(), (ino, cookie));
        }
        use mesh_common::sock::{NETNS_CONTAINER, NETNS_HOST};
        let mut want: std::collections::BTreeMap<u64, u32> =
            next.values().map(|(_, c)| (*c, NETNS_CONTAINER)).collect();
        // A file naming the node's own namespace stays the host's.
        want.insert(self.own, NETNS_HOST);
        let have = dp.scoped_netns()?;
        for (c, k) in &want {
            if have.get(c) != Some(k) {
                dp.scope_netns(*c, Some(*k))?;
            }
        }
        for c in have.keys().filter(|c| !want.contains_key(c)) {
            dp.scope_netns(*c, None)?;
        }
        self.scoped = next;
        for v in vips.difference(&self.vips) {
            route(*v, self.node_addr)?;
        }
        for v in self.vips.difference(vips) {
            unroute(*v)?;
        }
        self.vips = vips.clone();
        Ok(())
    }

    /// The addresses a socket of the node or of its containers may dial a published port
    /// on: every non-loopback IPv4 address of the node (as Docker's mesh answers on
    /// each), and the host port's own (the task program finds the frontend by it).
    pub fn node_addrs(&self) -> Vec<Ipv4Addr> {
        let mut v: Vec<Ipv4Addr> = netdev::all_ipv4()
            .into_iter()
            .filter(|a| !a.is_loopback())
            .collect();
        v.push(self.host_addr);
        v
    }

    /// How many namespaces are in the scope (this node's own included).
    pub fn scope_len(&self) -> usize {
        self.scoped.len() + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_explicit_cgroup_that_is_not_v2_is_refused_in_one_line() {
        let e = cgroup2_dir(Some(Path::new("/proc")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/proc is not a cgroup v2 mount"), "{e}");
        assert!(e.contains("--host-ports off"), "{e}");
        assert!(!e.contains('\n'), "{e}");
    }

    #[test]
    fn namespaces_are_the_files_of_the_dirs_and_the_files_given() {
        let d = std::env::temp_dir().join(format!("mesh-hp-{}", std::process::id()));
        std::fs::create_dir_all(d.join("sub")).unwrap();
        for f in ["a", "b"] {
            std::fs::write(d.join(f), b"").unwrap();
        }
        let got = namespaces(
            &[d.clone(), d.join("missing")],
            &[PathBuf::from("/x/c"), d.join("a")],
        );
        std::fs::remove_dir_all(&d).unwrap();
        let mut want = vec![PathBuf::from("/x/c"), d.join("a"), d.join("b")];
        want.sort();
        assert_eq!(got, want, "sorted, once each, no directories");
    }

    #[test]
    fn only_vips_of_services_with_ports_are_routed() {
        let m: crate::model::Model = serde_yaml_ng::from_str(
            r#"
services:
  - name: web
    ports: [{published: 8080, target: 80}]
    vips: [10.0.1.10]
    backends: []
  - name: any
    every_port: true
    vips: [10.0.1.11]
    backends: []
"#,
        )
        .unwrap();
        assert_eq!(
            port_vips(&m).into_iter().collect::<Vec<_>>(),
            vec!["10.0.1.10".parse::<Ipv4Addr>().unwrap()]
        );
    }
}
