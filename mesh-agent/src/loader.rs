//! Finding, loading and attaching the kernel programs.

use std::path::{Path, PathBuf};

use aya::{
    maps::{MapData, PerCpuArray},
    programs::{
        links::{FdLink, PinnedLink},
        tc::SchedClassifierLink,
        xdp::XdpLink,
        CgroupAttachMode, CgroupSockAddr, SchedClassifier, TcAttachType, Xdp, XdpMode,
    },
    Ebpf, EbpfLoader,
};
use mesh_common::{
    config::{programs, MeshConfig, CONFIG_GLOBAL},
    stats::Counter,
};

use crate::{
    features::{Feature, Features, TcAttach},
    netdev,
    pins::{Hook, LinkKind, PinDir, PINNED_MAPS},
    preflight, MeshError,
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

/// Says once per process which fallbacks are in force (the first load decides them).
fn log_fallbacks(features: &Features) {
    static LOGGED: std::sync::Once = std::sync::Once::new();
    LOGGED.call_once(|| {
        for f in features.fallbacks() {
            tracing::info!(feature = %f.feature, why = ?f.why, "fallback in force: {f}");
        }
    });
}

/// Environment variable that names the eBPF object explicitly.
pub const OBJECT_ENV: &str = "MESH_BPF_OBJECT";
/// File name `cargo xtask build` gives the object, next to the release binaries.
pub const OBJECT_NAME: &str = "mesh.bpf.o";
/// Where an installed agent looks last.
pub const INSTALLED_OBJECT: &str = "/usr/local/lib/mesh/mesh.bpf.o";

/// Finds the eBPF object: `$MESH_BPF_OBJECT`, then next to the running executable (and
/// its parent, for test binaries under `target/*/deps`), then the installed location.
pub fn find_object() -> Result<PathBuf, MeshError> {
    let mut tried = Vec::new();
    if let Some(p) = std::env::var_os(OBJECT_ENV) {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Ok(p);
        }
        tried.push(format!("${OBJECT_ENV}={}", p.display()));
    }
    let mut candidates = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        for dir in exe.ancestors().skip(1).take(2) {
            candidates.push(dir.join(OBJECT_NAME));
        }
    }
    candidates.push(PathBuf::from(INSTALLED_OBJECT));
    for c in candidates {
        if c.is_file() {
            return Ok(c);
        }
        tried.push(c.display().to_string());
    }
    Err(MeshError::ObjectNotFound {
        tried: tried.join(", "),
    })
}

/// The loaded (not necessarily attached) programs and maps.
pub struct Datapath {
    ebpf: Ebpf,
    /// TC attachments made by [`Datapath::attach_tc_ingress`] / `attach_tc_task`, so they
    /// can be undone without dropping the maps ([`Datapath::detach_tc`]).
    tc_links: Vec<(&'static str, aya::programs::tc::SchedClassifierLinkId)>,
    /// What the kernel offers (and the fallbacks in force), as loaded.
    features: Features,
}

impl Datapath {
    /// Loads the object with `cfg` baked into its read-only config (less the features
    /// this kernel lacks, [`Features::detect`]), and loads every program into the kernel
    /// (which runs the verifier on each).
    pub fn load(object: &Path, cfg: &MeshConfig) -> Result<Self, MeshError> {
        Self::load_with(object, cfg, None, None, Features::detect(TcAttach::Auto)?)
    }

    /// As [`Datapath::load`], with room for `maglev_slots` Maglev slots in all (the
    /// object's default, [`mesh_common::maps::MAGLEV.entries`], holds ~500 services of 3 backends).
    pub fn load_sized(
        object: &Path,
        cfg: &MeshConfig,
        maglev_slots: u32,
    ) -> Result<Self, MeshError> {
        Self::load_with(
            object,
            cfg,
            None,
            Some(maglev_slots),
            Features::detect(TcAttach::Auto)?,
        )
    }

    /// How many Maglev slots the loaded (or adopted) table has.
    pub fn maglev_slots(&self) -> u32 {
        match self.ebpf.map(mesh_common::maps::MAGLEV.name) {
            Some(aya::maps::Map::Array(d)) => d
                .info()
                .map_or(mesh_common::maps::MAGLEV.entries, |i| i.max_entries()),
            _ => mesh_common::maps::MAGLEV.entries,
        }
    }

    /// Loads as [`Datapath::load`], with the maps pinned in `pins`: maps already pinned
    /// there (by an agent that is gone) are adopted as they are, after a layout check;
    /// the others are created and pinned. TC programs are attached as `features` says
    /// (tcx links, or netlink filters). Returns whether anything was adopted.
    pub fn load_pinned(
        object: &Path,
        cfg: &MeshConfig,
        pins: &PinDir,
        maglev_slots: u32,
        features: Features,
    ) -> Result<(Self, bool), MeshError> {
        let bytes = std::fs::read(object).map_err(|source| MeshError::Io {
            what: format!("reading {}", object.display()),
            source,
        })?;
        let adopted = pins.has_maps();
        if adopted {
            pins.check_layout(&bytes, maglev_slots)?;
        }
        pins.create()?;
        Ok((
            Self::load_with(object, cfg, Some(pins), Some(maglev_slots), features)?,
            adopted,
        ))
    }

    fn load_with(
        object: &Path,
        cfg: &MeshConfig,
        pins: Option<&PinDir>,
        maglev_slots: Option<u32>,
        features: Features,
    ) -> Result<Self, MeshError> {
        log_fallbacks(&features);
        // The programs read the flags as a constant: a kernel without a helper never
        // sees the call to it. The object assumes no feature; the probes decide.
        let cfg = MeshConfig {
            flags: features.flags(),
            ..*cfg
        };
        let mut loader = EbpfLoader::new();
        loader.override_global(CONFIG_GLOBAL, &cfg, true);
        if let Some(n) = maglev_slots {
            loader.map_max_entries(mesh_common::maps::MAGLEV.name, n);
        }
        if let Some(pins) = pins {
            for m in PINNED_MAPS {
                loader.map_pin_path(m, pins.map(m));
            }
        }
        let ebpf = loader.load_file(object).map_err(|source| MeshError::Load {
            path: object.to_path_buf(),
            source,
        })?;
        let mut dp = Datapath {
            ebpf,
            tc_links: Vec::new(),
            features,
        };
        dp.xdp_mut()?.load().map_err(|source| MeshError::Program {
            program: programs::XDP_UNDERLAY,
            source,
        })?;
        for name in [
            programs::TC_UNDERLAY_INGRESS,
            programs::TC_TASK,
            programs::TC_OVERLAY_IN,
            programs::TC_OVERLAY_OUT,
        ] {
            dp.program_mut::<SchedClassifier>(name)?
                .load()
                .map_err(|source| MeshError::Program {
                    program: name,
                    source,
                })?;
        }
        for hook in Hook::SOCK {
            let name = hook.program();
            dp.program_mut::<CgroupSockAddr>(name)?
                .load()
                .map_err(|source| MeshError::Program {
                    program: name,
                    source,
                })?;
        }
        Ok(dp)
    }

    /// What the kernel offers, and the fallbacks in force.
    pub fn features(&self) -> &Features {
        &self.features
    }

    pub(crate) fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    fn program_mut<'a, T>(&'a mut self, name: &'static str) -> Result<&'a mut T, MeshError>
    where
        &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
    {
        let prog = self.ebpf.program_mut(name).ok_or(MeshError::Program {
            program: name,
            source: aya::programs::ProgramError::UnexpectedProgramType,
        })?;
        prog.try_into().map_err(|source| MeshError::Program {
            program: name,
            source,
        })
    }

    fn program<'a, T>(&'a self, name: &'static str) -> Result<&'a T, MeshError>
    where
        &'a T: TryFrom<&'a aya::programs::Program, Error = aya::programs::ProgramError>,
    {
        let prog = self.ebpf.program(name).ok_or(MeshError::Program {
            program: name,
            source: aya::programs::ProgramError::UnexpectedProgramType,
        })?;
        prog.try_into().map_err(|source| MeshError::Program {
            program: name,
            source,
        })
    }

    pub fn xdp(&self) -> Result<&Xdp, MeshError> {
        self.program(programs::XDP_UNDERLAY)
    }

    pub fn tc_ingress(&self) -> Result<&SchedClassifier, MeshError> {
        self.program(programs::TC_UNDERLAY_INGRESS)
    }

    pub fn tc_task(&self) -> Result<&SchedClassifier, MeshError> {
        self.program(programs::TC_TASK)
    }

    pub fn tc_overlay_in(&self) -> Result<&SchedClassifier, MeshError> {
        self.program(programs::TC_OVERLAY_IN)
    }

    pub fn tc_overlay_out(&self) -> Result<&SchedClassifier, MeshError> {
        self.program(programs::TC_OVERLAY_OUT)
    }

    fn xdp_mut(&mut self) -> Result<&mut Xdp, MeshError> {
        self.program_mut(programs::XDP_UNDERLAY)
    }

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
            crate::tcnl::add_clsact(ifindex)?;
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
            return crate::sys::link_update(path, std::os::fd::AsFd::as_fd(prog_fd))
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

    /// The loaded map `name` (an error naming it when the object has none).
    fn loaded_map(&self, name: &'static str) -> Result<&aya::maps::Map, MeshError> {
        self.ebpf.map(name).ok_or(MeshError::Map {
            map: name,
            source: aya::maps::MapError::InvalidName { name: name.into() },
        })
    }

    /// The per-backend counters, summed over CPUs, by backend id.
    pub fn backend_stats(
        &self,
    ) -> Result<std::collections::BTreeMap<u32, mesh_common::stats::BackendCounter>, MeshError>
    {
        use mesh_common::stats::BackendCounter;
        let err = |source| MeshError::Map {
            map: mesh_common::maps::BACKEND_STATS.name,
            source,
        };
        let map = self.loaded_map(mesh_common::maps::BACKEND_STATS.name)?;
        let map: aya::maps::PerCpuHashMap<&MapData, u32, BackendCounter> =
            aya::maps::PerCpuHashMap::try_from(map).map_err(err)?;
        Ok(map
            .iter()
            .filter_map(Result::ok)
            .map(|(id, cells)| (id, BackendCounter::sum(cells.iter())))
            .collect())
    }

    /// The per-CPU counters.
    pub fn stats(&self) -> Result<PerCpuArray<&MapData, Counter>, MeshError> {
        let map = self.loaded_map(mesh_common::maps::STATS.name)?;
        PerCpuArray::try_from(map).map_err(|source| MeshError::Map {
            map: mesh_common::maps::STATS.name,
            source,
        })
    }
}
