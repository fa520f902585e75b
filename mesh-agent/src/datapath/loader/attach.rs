//! Attaching the loaded programs: TC (tcx links, or netlink clsact filters before 6.6),
//! XDP, and the cgroup socket programs; as pinned links a restarted agent takes over
//! (`BPF_LINK_UPDATE`), or unpinned ones that live as long as the `Datapath`.

use super::*;
use std::path::{Path, PathBuf};

use aya::programs::{
    links::{FdLink, PinnedLink},
    tc::SchedClassifierLink,
    xdp::XdpLink,
    CgroupAttachMode, CgroupSockAddr, SchedClassifier, TcAttachType, XdpMode,
};
use mesh_common::config::programs;

use crate::{
    datapath::features::Feature,
    datapath::pins::{Hook, LinkKind, PinDir},
    host::netdev,
    host::preflight,
    MeshError,
};

/// The cgroup directory, open, and its inode (what names its link pins).
fn open_cgroup(cgroup: &Path) -> Result<(std::fs::File, u32), MeshError> {
    use std::os::unix::fs::MetadataExt;
    let io = |source| MeshError::Io {
        what: format!("opening the cgroup v2 directory {}", cgroup.display()),
        source,
    };
    let dir = std::fs::File::open(cgroup).map_err(io)?;
    let ino = dir.metadata().map_err(io)?.ino() as u32;
    Ok((dir, ino))
}

impl Datapath {
    /// Attaches the underlay program to `interface`'s TC ingress (a tcx link, or a
    /// netlink clsact filter where the kernel has none). The attachment lives as long as
    /// this `Datapath`.
    pub fn attach_tc_ingress(&mut self, interface: &str) -> Result<(), MeshError> {
        self.attach_tc(programs::TC_UNDERLAY_INGRESS, interface)
    }

    /// Attaches the task program to the TC ingress of a task's veth (host side): what
    /// the task sends.
    pub fn attach_tc_task(&mut self, interface: &str) -> Result<(), MeshError> {
        self.attach_tc(programs::TC_TASK, interface)
    }

    /// Attaches the overlay programs to a task's overlay veth (host side, in the calling
    /// thread's namespace): ingress, what the task sends; egress, what reaches it. As
    /// [`Self::attach_tc_ingress`], unpinned (the agent pins them, `attach_pinned_in`).
    pub fn attach_tc_overlay(&mut self, interface: &str) -> Result<(), MeshError> {
        self.attach_tc_as(programs::TC_OVERLAY_IN, interface, TcAttachType::Ingress)?;
        self.attach_tc_as(programs::TC_OVERLAY_OUT, interface, TcAttachType::Egress)
    }

    fn attach_tc(&mut self, program: &'static str, interface: &str) -> Result<(), MeshError> {
        self.attach_tc_as(program, interface, TcAttachType::Ingress)
    }

    fn attach_tc_as(
        &mut self,
        program: &'static str,
        interface: &str,
        at: TcAttachType,
    ) -> Result<(), MeshError> {
        use aya::programs::{
            tc::{NlOptions, TcAttachOptions},
            LinkOrder,
        };
        let ifindex = preflight::ifindex(interface)?;
        let options = if self.features.has(Feature::Tcx) {
            TcAttachOptions::TcxOrder(LinkOrder::default())
        } else {
            crate::datapath::tcnl::add_clsact(ifindex)?;
            TcAttachOptions::Netlink(NlOptions::default())
        };
        let id = self
            .program_mut::<SchedClassifier>(program)?
            .attach_with_options(interface, at, options)
            .map_err(|source| MeshError::Attach {
                program,
                interface: interface.into(),
                source,
            })?;
        self.tc_links.push((program, id));
        Ok(())
    }

    /// Detaches every TC program attached through this `Datapath` (the maps stay): the
    /// interfaces see no mesh until attached again.
    pub fn detach_tc(&mut self) -> Result<(), MeshError> {
        for (program, id) in std::mem::take(&mut self.tc_links) {
            self.program_mut::<SchedClassifier>(program)?
                .detach(id)
                .map_err(|source| MeshError::Attach {
                    program,
                    interface: "(detach)".into(),
                    source,
                })?;
        }
        Ok(())
    }

    /// Attaches the XDP program to `interface` in `mode`.
    pub fn attach_xdp(&mut self, interface: &str, mode: XdpMode) -> Result<(), MeshError> {
        preflight::ifindex(interface)?;
        self.xdp_mut()?
            .attach(interface, mode)
            .map_err(|source| MeshError::Attach {
                program: programs::XDP_UNDERLAY,
                interface: interface.into(),
                source,
            })?;
        Ok(())
    }

    /// Attaches `hook`'s program to `interface` through a link pinned in `pins`, so that
    /// it stays attached when this agent exits (or is killed). A link already pinned for
    /// that interface (left by an earlier agent) is taken over in place: its program is
    /// swapped for this one atomically (BPF_LINK_UPDATE), with no instant unattached.
    pub fn attach_pinned(
        &mut self,
        hook: Hook,
        interface: &str,
        pins: &PinDir,
        xdp_mode: XdpMode,
    ) -> Result<(), MeshError> {
        self.attach_pinned_as(hook, interface, pins, xdp_mode, (0, None))
            .map(|_| ())
    }

    /// As [`Self::attach_pinned`], to `interface` of the network namespace at `netns` (a
    /// task's overlay veth in Docker's namespace of an overlay network). Returns the pin.
    pub fn attach_pinned_in(
        &mut self,
        hook: Hook,
        netns: &Path,
        interface: &str,
        pins: &PinDir,
    ) -> Result<PathBuf, MeshError> {
        let id = netdev::netns_id(netns)?;
        // The interface name, and the link's target, resolve in the calling thread's
        // namespace: attach from a thread inside it.
        netdev::in_netns(netns, || {
            self.attach_pinned_as(hook, interface, pins, XdpMode::default(), (id, Some(netns)))
        })
    }

    /// `netns`: the namespace's inode (0: the agent's own) and path.
    fn attach_pinned_as(
        &mut self,
        hook: Hook,
        interface: &str,
        pins: &PinDir,
        xdp_mode: XdpMode,
        netns: (u64, Option<&Path>),
    ) -> Result<PathBuf, MeshError> {
        let ifindex = preflight::ifindex(interface)?;
        let path = pins.link_in(hook, netns.0, ifindex);
        if hook.tc() && !self.features.has(Feature::Tcx) {
            return self.attach_netlink(hook, ifindex, &path, pins, netns.1);
        }
        let program = hook.program();
        let attach_err = |source| MeshError::Attach {
            program,
            interface: interface.into(),
            source,
        };
        let unpinnable = |e: aya::programs::links::LinkError| MeshError::Link {
            hook: hook.name(),
            interface: interface.into(),
            detail: e.to_string(),
        };
        let mut was_netlink = false;
        match pins.pin(&path).map(|p| p.kind) {
            Some(LinkKind::Link) => match self.take_over(hook, &path) {
                Ok(()) => return Ok(path),
                Err(e) => {
                    // A link whose interface went away, or a foreign pin: replace it.
                    tracing::warn!(link = %path.display(), "not taking over a pinned link ({e}); attaching afresh");
                    pins.unpin(&path)?;
                }
            },
            // An earlier agent's netlink filter (forced, or before a kernel upgrade that
            // kept bpffs): it goes once the link, which runs first, is in place.
            Some(LinkKind::Netlink { .. }) => was_netlink = true,
            None => {}
        }
        let fd: FdLink = match hook {
            Hook::XdpUnderlay => {
                let prog = self.xdp_mut()?;
                let id = prog.attach(interface, xdp_mode).map_err(attach_err)?;
                let link = prog.take_link(id).map_err(attach_err)?;
                link.try_into().map_err(unpinnable)?
            }
            Hook::SockConnect4
            | Hook::SockSendmsg4
            | Hook::SockRecvmsg4
            | Hook::SockGetpeername4 => {
                return Err(MeshError::Link {
                    hook: hook.name(),
                    interface: interface.into(),
                    detail: "a cgroup program (attach_sock_pinned)".into(),
                })
            }
            Hook::TcUnderlay
            | Hook::TcTask
            | Hook::TcHost
            | Hook::TcOverlayIn
            | Hook::TcOverlayOut => {
                let side = if hook == Hook::TcOverlayOut {
                    TcAttachType::Egress
                } else {
                    TcAttachType::Ingress
                };
                let prog = self.program_mut::<SchedClassifier>(program)?;
                let id = prog.attach(interface, side).map_err(attach_err)?;
                let link = prog.take_link(id).map_err(attach_err)?;
                link.try_into().map_err(unpinnable)?
            }
        };
        if was_netlink {
            pins.unpin(&path)?;
        }
        // The pin is the link's only owner once `fd` is dropped.
        fd.pin(&path).map_err(|source| MeshError::Pin {
            what: format!("{} link", hook.name()),
            path: path.clone(),
            source,
        })?;
        Ok(path)
    }

    /// [`Self::attach_pinned`] for a TC hook where TC programs are netlink filters: the
    /// hook's filter (fixed priority and handle) is created, or, left by an earlier
    /// agent, given this agent's program in place (never a moment without one); the
    /// filter is recorded at the link's pin name for whoever lists the pins.
    fn attach_netlink(
        &mut self,
        hook: Hook,
        ifindex: u32,
        path: &Path,
        pins: &PinDir,
        netns: Option<&Path>,
    ) -> Result<PathBuf, MeshError> {
        let program = hook.program();
        let filter = hook.tc_filter(ifindex).ok_or(MeshError::Program {
            program,
            source: aya::programs::ProgramError::UnexpectedProgramType,
        })?;
        let prog = self.program::<SchedClassifier>(program)?;
        let fd = prog
            .fd()
            .map_err(|source| MeshError::Program { program, source })?;
        filter.attach(std::os::fd::AsFd::as_fd(fd), program)?;
        // A tcx link pinned here by an agent that had them ran first; it goes now that
        // the filter is there.
        if pins.pin(path).is_some_and(|p| p.kind == LinkKind::Link) {
            pins.unpin(path)?;
        }
        pins.record_netlink(path, netns)?;
        Ok(path.to_path_buf())
    }

    fn take_over(&mut self, hook: Hook, path: &Path) -> Result<(), String> {
        if hook.sock() {
            let prog = self
                .program::<CgroupSockAddr>(hook.program())
                .map_err(|e| e.to_string())?;
            let prog_fd = prog.fd().map_err(|e| e.to_string())?;
            return crate::datapath::sys::link_update(path, std::os::fd::AsFd::as_fd(prog_fd))
                .map_err(|e| e.to_string());
        }
        let fd: FdLink = PinnedLink::from_pin(path)
            .map_err(|e| e.to_string())?
            .into();
        match hook {
            Hook::XdpUnderlay => {
                let link = XdpLink::try_from(fd).map_err(|e| e.to_string())?;
                let prog = self.xdp_mut().map_err(|e| e.to_string())?;
                let id = prog.attach_to_link(link).map_err(|e| e.to_string())?;
                // Owned by the pin from here on; dropping our fd leaves it attached.
                drop(prog.take_link(id).map_err(|e| e.to_string())?);
            }
            Hook::SockConnect4
            | Hook::SockSendmsg4
            | Hook::SockRecvmsg4
            | Hook::SockGetpeername4 => unreachable!("taken over above"),
            Hook::TcUnderlay
            | Hook::TcTask
            | Hook::TcHost
            | Hook::TcOverlayIn
            | Hook::TcOverlayOut => {
                let link = SchedClassifierLink::try_from(fd).map_err(|e| e.to_string())?;
                let prog = self
                    .program_mut::<SchedClassifier>(hook.program())
                    .map_err(|e| e.to_string())?;
                let id = prog.attach_to_link(link).map_err(|e| e.to_string())?;
                drop(prog.take_link(id).map_err(|e| e.to_string())?);
            }
        }
        Ok(())
    }

    /// Attaches the cgroup socket programs to the cgroup v2 directory `cgroup` (its root:
    /// every process of the machine) through links pinned in `pins`; links pinned by an
    /// earlier agent are taken over in place (BPF_LINK_UPDATE). As links, they run beside
    /// other programs there (another node's agent, in the namespace cluster).
    pub fn attach_sock_pinned(&mut self, cgroup: &Path, pins: &PinDir) -> Result<(), MeshError> {
        let (dir, ino) = open_cgroup(cgroup)?;
        for hook in Hook::SOCK {
            let path = pins.link(hook, ino);
            if path.exists() {
                match self.take_over(hook, &path) {
                    Ok(()) => continue,
                    Err(e) => {
                        tracing::warn!(link = %path.display(), "not taking over a pinned link ({e}); attaching afresh");
                        pins.unpin(&path)?;
                    }
                }
            }
            let fd = self.attach_sock_one(hook, &dir, cgroup, true)?;
            if let Some(fd) = fd {
                fd.pin(&path).map_err(|source| MeshError::Pin {
                    what: format!("{} link", hook.name()),
                    path: path.clone(),
                    source,
                })?;
            }
        }
        Ok(())
    }

    /// As [`Self::attach_sock_pinned`], unpinned: the programs leave the cgroup when this
    /// datapath is dropped (tests).
    pub fn attach_sock(&mut self, cgroup: &Path) -> Result<(), MeshError> {
        let (dir, _) = open_cgroup(cgroup)?;
        for hook in Hook::SOCK {
            self.attach_sock_one(hook, &dir, cgroup, false)?;
        }
        Ok(())
    }

    fn attach_sock_one(
        &mut self,
        hook: Hook,
        dir: &std::fs::File,
        cgroup: &Path,
        take: bool,
    ) -> Result<Option<FdLink>, MeshError> {
        let program = hook.program();
        let attach_err = |source| MeshError::Attach {
            program,
            interface: cgroup.display().to_string(),
            source,
        };
        let prog = self.program_mut::<CgroupSockAddr>(program)?;
        // A bpf_link takes no flags (BPF_LINK_CREATE refuses ALLOW_MULTI): links to one
        // cgroup always run side by side.
        let id = prog
            .attach(dir, CgroupAttachMode::Single)
            .map_err(attach_err)?;
        if !take {
            return Ok(None);
        }
        let link = prog.take_link(id).map_err(attach_err)?;
        let fd: FdLink = link
            .try_into()
            .map_err(|e: aya::programs::links::LinkError| MeshError::Link {
                hook: hook.name(),
                interface: cgroup.display().to_string(),
                detail: e.to_string(),
            })?;
        Ok(Some(fd))
    }
}
