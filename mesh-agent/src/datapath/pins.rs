//! What lives on bpffs: the maps (which a restarted agent adopts), the program links
//! (which keep the datapath attached while no agent runs), and the layout check between
//! what is pinned and what this agent's object expects.
//!
//! ```text
//! <dir>/MESH_*_V1              maps
//! <dir>/links/<hook>-<ifindex> links in the agent's namespace: tc_underlay,
//!                              xdp_underlay, tc_task (bpffs refuses dots in names)
//! <dir>/links/<hook>-<netns>-<ifindex>
//!                              links in another namespace (its inode): tc_ovl_in,
//!                              tc_ovl_out on tasks' overlay veths
//! ```
//!
//! Where TC programs are netlink clsact filters (no tcx links, see [`crate::datapath::tcnl`]),
//! nothing can be pinned; the same names are then symlinks (which bpffs holds) whose
//! target records the filter: `tc-netlink:` and the path of its network namespace (empty
//! for the agent's own). So everything that lists the pins (status, doctor, trace, the
//! agent's pruning, uninstall) sees those attachments too, and [`PinDir::unpin`] removes
//! the filter; a reboot clears both, as it clears the filters.

use std::path::{Path, PathBuf};

use aya::maps::MapInfo;

use crate::MeshError;

/// Every map the agent pins (and meshctl reads): `mesh_common::maps::PINNED`'s names.
pub const PINNED_MAPS: &[&str] = &mesh_common::maps::PINNED_NAMES;

/// Where a program is attached, as named in link pins.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Hook {
    TcUnderlay,
    XdpUnderlay,
    TcTask,
    /// Ingress of a task's overlay veth (host side, in the overlay's namespace).
    TcOverlayIn,
    /// Egress of the same.
    TcOverlayOut,
    /// Ingress of the host port's far end (the node's own sockets, through the task
    /// program).
    TcHost,
    /// The cgroup socket programs, at the cgroup v2 root ("ifindex": the cgroup's inode).
    SockConnect4,
    SockSendmsg4,
    SockRecvmsg4,
    SockGetpeername4,
}

impl Hook {
    pub const ALL: [Hook; 10] = [
        Hook::TcUnderlay,
        Hook::XdpUnderlay,
        Hook::TcTask,
        Hook::TcOverlayIn,
        Hook::TcOverlayOut,
        Hook::TcHost,
        Hook::SockConnect4,
        Hook::SockSendmsg4,
        Hook::SockRecvmsg4,
        Hook::SockGetpeername4,
    ];
    /// The cgroup socket programs.
    pub const SOCK: [Hook; 4] = [
        Hook::SockConnect4,
        Hook::SockSendmsg4,
        Hook::SockRecvmsg4,
        Hook::SockGetpeername4,
    ];

    /// The program this hook runs.
    pub fn program(self) -> &'static str {
        use mesh_common::config::programs;
        match self {
            Hook::TcUnderlay => programs::TC_UNDERLAY_INGRESS,
            Hook::XdpUnderlay => programs::XDP_UNDERLAY,
            Hook::TcTask => programs::TC_TASK,
            Hook::TcOverlayIn => programs::TC_OVERLAY_IN,
            Hook::TcOverlayOut => programs::TC_OVERLAY_OUT,
            Hook::TcHost => programs::TC_TASK,
            Hook::SockConnect4 => programs::SOCK_CONNECT4,
            Hook::SockSendmsg4 => programs::SOCK_SENDMSG4,
            Hook::SockRecvmsg4 => programs::SOCK_RECVMSG4,
            Hook::SockGetpeername4 => programs::SOCK_GETPEERNAME4,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Hook::TcUnderlay => "tc_underlay",
            Hook::XdpUnderlay => "xdp_underlay",
            Hook::TcTask => "tc_task",
            Hook::TcOverlayIn => "tc_ovl_in",
            Hook::TcOverlayOut => "tc_ovl_out",
            Hook::TcHost => "tc_host",
            Hook::SockConnect4 => "sock_connect4",
            Hook::SockSendmsg4 => "sock_sendmsg4",
            Hook::SockRecvmsg4 => "sock_recvmsg4",
            Hook::SockGetpeername4 => "sock_getpeername4",
        }
    }

    /// Whether it is attached to a cgroup rather than an interface.
    pub fn sock(self) -> bool {
        Hook::SOCK.contains(&self)
    }

    /// Whether it lives on a task's overlay veth, in another network namespace.
    pub fn overlay(self) -> bool {
        matches!(self, Hook::TcOverlayIn | Hook::TcOverlayOut)
    }

    /// Whether it runs a TC program.
    pub fn tc(self) -> bool {
        !self.sock() && self != Hook::XdpUnderlay
    }

    /// Its netlink filter on `ifindex` (TC hooks): priority 1, so the mesh runs before
    /// any other filter as with tcx, and a handle of its own per hook, which a restarted
    /// agent finds again.
    pub fn tc_filter(self, ifindex: u32) -> Option<crate::datapath::tcnl::Filter> {
        self.tc().then(|| crate::datapath::tcnl::Filter {
            ifindex,
            egress: self == Hook::TcOverlayOut,
            priority: 1,
            // "MES" and the hook.
            handle: 0x4d45_5300 | (self as u32 + 1),
        })
    }
}

/// How a pinned attachment holds its program.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkKind {
    /// A bpf link pinned on bpffs (tcx, XDP, cgroup).
    Link,
    /// A netlink clsact filter, recorded by a symlink: the path of its network namespace
    /// (`None`: the agent's own).
    Netlink { netns: Option<PathBuf> },
}

/// Target prefix of the symlinks that record netlink filters.
const NETLINK_RECORD: &str = "tc-netlink:";

/// A pinned link: which hook, on which interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkPin {
    pub hook: Hook,
    /// Inode of the network namespace it is in; 0: the agent's own.
    pub netns: u64,
    pub ifindex: u32,
    pub path: PathBuf,
    pub kind: LinkKind,
}

impl LinkPin {
    /// Reads the pin at `path` (named `<hook>-[<netns>-]<ifindex>`).
    fn read(path: &Path) -> Option<LinkPin> {
        let name = path.file_name()?.to_str()?;
        let (hook, rest) = name.split_once('-')?;
        let hook = Hook::ALL.into_iter().find(|h| h.name() == hook)?;
        let (netns, ifindex) = match rest.split_once('-') {
            Some((ns, ix)) => (ns.parse().ok()?, ix),
            None => (0, rest),
        };
        let kind = match std::fs::read_link(path) {
            Ok(target) => {
                let ns = target.to_str()?.strip_prefix(NETLINK_RECORD)?;
                LinkKind::Netlink {
                    netns: (!ns.is_empty()).then(|| PathBuf::from(ns)),
                }
            }
            Err(_) => LinkKind::Link,
        };
        Some(LinkPin {
            hook,
            netns,
            ifindex: ifindex.parse().ok()?,
            path: path.to_path_buf(),
            kind,
        })
    }

    /// Its netlink filter, if it is one.
    fn filter(&self) -> Option<(crate::datapath::tcnl::Filter, Option<&Path>)> {
        match &self.kind {
            LinkKind::Netlink { netns } => {
                Some((self.hook.tc_filter(self.ifindex)?, netns.as_deref()))
            }
            LinkKind::Link => None,
        }
    }

    /// Runs `f` in the filter's network namespace; `None` when that namespace is gone
    /// (and the filter with it).
    fn in_netns<R: Send>(
        &self,
        netns: Option<&Path>,
        f: impl FnOnce() -> Result<R, MeshError> + Send,
    ) -> Result<Option<R>, MeshError> {
        match netns {
            None if self.netns == 0 => f().map(Some),
            None => Ok(None),
            Some(p) => match crate::host::netdev::netns_id(p) {
                Ok(id) if id == self.netns => crate::host::netdev::in_netns(p, f).map(Some),
                _ => Ok(None),
            },
        }
    }

    /// The id of the program attached there now (a netlink filter's: `None` when the
    /// filter is gone, e.g. deleted behind the agent's back).
    pub fn program_id(&self) -> Result<Option<u32>, MeshError> {
        match self.filter() {
            None => crate::datapath::sys::link_program_id(&self.path).map(Some),
            Some((filter, netns)) => Ok(self
                .in_netns(netns, || filter.program())?
                .flatten()
                .filter(|a| a.name == self.hook.program())
                .map(|a| a.id)),
        }
    }

    /// How it is attached, in one word: tcx, xdp, cgroup or netlink.
    pub fn mode(&self) -> &'static str {
        match (&self.kind, self.hook) {
            (LinkKind::Netlink { .. }, _) => "netlink",
            (_, Hook::XdpUnderlay) => "xdp",
            (_, h) if h.sock() => "cgroup",
            _ => "tcx",
        }
    }
}

/// The agent's directory on bpffs.
#[derive(Clone, Debug)]
pub struct PinDir {
    root: PathBuf,
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> MeshError {
    move |source| MeshError::Io { what, source }
}

/// The map sizes the agent chooses (flags), not the object: fixed while pins exist.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sizes {
    pub maglev_slots: u32,
    pub ct_entries: u32,
}

impl Sizes {
    /// The object's own sizes.
    pub const OBJECT: Sizes = Sizes {
        maglev_slots: mesh_common::maps::MAGLEV.entries,
        ct_entries: mesh_common::maps::CONNTRACK.entries,
    };
}

impl PinDir {
    pub fn new(root: &Path) -> Self {
        PinDir { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    pub fn link(&self, hook: Hook, ifindex: u32) -> PathBuf {
        self.link_in(hook, 0, ifindex)
    }

    /// The pin of `hook`'s link on `ifindex` of network namespace `netns` (its inode; 0:
    /// the agent's own).
    pub fn link_in(&self, hook: Hook, netns: u64, ifindex: u32) -> PathBuf {
        let name = match netns {
            0 => format!("{}-{ifindex}", hook.name()),
            ns => format!("{}-{ns}-{ifindex}", hook.name()),
        };
        self.root.join("links").join(name)
    }

    /// Creates the directories (the bpffs mount itself is checked by preflight).
    pub fn create(&self) -> Result<(), MeshError> {
        let links = self.root.join("links");
        std::fs::create_dir_all(&links).map_err(io(format!("creating {}", links.display())))
    }

    /// The size of the map `name` pinned here, if there is one.
    pub fn entries(&self, name: &str) -> Option<u32> {
        MapInfo::from_pin(self.map(name))
            .ok()
            .map(|i| i.max_entries())
    }

    /// Whether a previous agent left maps here.
    pub fn has_maps(&self) -> bool {
        PINNED_MAPS.iter().any(|m| self.map(m).exists())
    }

    /// Refuses maps pinned with another layout than `object` defines (another mesh
    /// version): adopting them would misread every entry. The Maglev table's and the
    /// conntrack's sizes are the agent's (`sizes`), not the object's.
    pub fn check_layout(&self, object: &[u8], sizes: Sizes) -> Result<(), MeshError> {
        let obj = aya_obj::Object::parse(object).map_err(|e| MeshError::Layout {
            dir: self.root.clone(),
            detail: format!("cannot parse the eBPF object: {e}"),
        })?;
        for name in PINNED_MAPS {
            let path = self.map(name);
            if !path.exists() {
                continue;
            }
            let want = obj.maps.get(*name).ok_or_else(|| MeshError::Layout {
                dir: self.root.clone(),
                detail: format!("the eBPF object has no map {name}"),
            })?;
            let have = MapInfo::from_pin(&path).map_err(|e| MeshError::Layout {
                dir: self.root.clone(),
                detail: format!("{} is not a readable map pin: {e}", path.display()),
            })?;
            let (want_entries, or) = match *name {
                n if n == mesh_common::maps::MAGLEV.name => {
                    (sizes.maglev_slots, ", or another --maglev-slots")
                }
                n if n == mesh_common::maps::CONNTRACK.name => {
                    (sizes.ct_entries, ", or another --ct-entries")
                }
                _ => (want.max_entries(), ""),
            };
            let (w, h) = (
                (want.key_size(), want.value_size(), want_entries),
                (have.key_size(), have.value_size(), have.max_entries()),
            );
            if w != h {
                return Err(MeshError::Layout {
                    dir: self.root.clone(),
                    detail: format!(
                        "{name} is pinned with key/value/entries {}/{}/{} but this agent \
                         wants {}/{}/{} (another version{or})",
                        h.0, h.1, h.2, w.0, w.1, w.2
                    ),
                });
            }
        }
        Ok(())
    }

    /// The pinned links.
    pub fn links(&self) -> Vec<LinkPin> {
        let Ok(dir) = std::fs::read_dir(self.root.join("links")) else {
            return Vec::new();
        };
        let mut out: Vec<LinkPin> = dir
            .flatten()
            .filter_map(|e| LinkPin::read(&e.path()))
            .collect();
        out.sort_by_key(|l| (l.hook, l.netns, l.ifindex));
        out
    }

    /// The pin at `path`, if there is one.
    pub fn pin(&self, path: &Path) -> Option<LinkPin> {
        path.symlink_metadata().ok()?;
        LinkPin::read(path)
    }

    /// Records a netlink filter at `path`, its pin's name (`link_in`), with the path of
    /// its network namespace (`None`: the agent's own), which unpinning enters.
    pub fn record_netlink(&self, path: &Path, netns_path: Option<&Path>) -> Result<(), MeshError> {
        let target = format!(
            "{NETLINK_RECORD}{}",
            netns_path
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        );
        if std::fs::read_link(path).is_ok_and(|t| t.as_os_str() == target.as_str()) {
            return Ok(());
        }
        // A record of another namespace path: rewritten (never the filter removed).
        let _ = std::fs::remove_file(path);
        std::os::unix::fs::symlink(&target, path)
            .map_err(io(format!("recording the tc filter at {}", path.display())))
    }

    /// Removes a link pin: the program leaves that interface (unless something else
    /// holds the link). For a netlink filter's record, the filter goes first.
    pub fn unpin(&self, path: &Path) -> Result<(), MeshError> {
        if let Some(pin) = self.pin(path) {
            if let Some((filter, netns)) = pin.filter() {
                let ours = pin.hook.program();
                pin.in_netns(netns, || filter.detach(ours))?;
            }
        }
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(io(format!("removing {}", path.display()))(e))
            }
            _ => Ok(()),
        }
    }

    /// Removes everything: links (detaching the programs), maps, the directories.
    pub fn remove_all(&self) -> Result<(), MeshError> {
        for l in self.links() {
            self.unpin(&l.path)?;
        }
        for m in PINNED_MAPS {
            self.unpin(&self.map(m))?;
        }
        let _ = std::fs::remove_dir(self.root.join("links"));
        let _ = std::fs::remove_dir(&self.root);
        Ok(())
    }
}
