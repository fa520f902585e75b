//! Finding and loading the kernel programs (their config, the probed features, maps
//! pinned or adopted), and reaching the loaded programs and maps; attaching them is
//! `attach`'s.

use std::path::{Path, PathBuf};

use aya::{
    maps::{MapData, PerCpuArray},
    programs::{CgroupSockAddr, SchedClassifier, Xdp},
    Ebpf, EbpfLoader,
};
use mesh_common::{
    config::{programs, MeshConfig, CONFIG_GLOBAL},
    stats::Counter,
};

use crate::{
    datapath::features::{Features, TcAttach},
    datapath::pins::{Hook, PinDir, Sizes, PINNED_MAPS},
    MeshError,
};

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

mod attach;
mod grow;

/// The loaded (not necessarily attached) programs and maps.
pub struct Datapath {
    pub(super) ebpf: Ebpf,
    /// TC attachments made by [`Datapath::attach_tc_ingress`] / `attach_tc_task`, so they
    /// can be undone without dropping the maps ([`Datapath::detach_tc`]).
    pub(super) tc_links: Vec<(&'static str, aya::programs::tc::SchedClassifierLinkId)>,
    /// What the kernel offers (and the fallbacks in force), as loaded.
    pub(super) features: Features,
}

impl Datapath {
    /// Loads the object with `cfg` baked into its read-only config (less the features
    /// this kernel lacks, [`Features::detect`]), and loads every program into the kernel
    /// (which runs the verifier on each).
    pub fn load(object: &Path, cfg: &MeshConfig) -> Result<Self, MeshError> {
        Self::load_with(
            object,
            cfg,
            None,
            Sizes::OBJECT,
            Features::detect(TcAttach::Auto)?,
        )
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
            Sizes {
                maglev_slots,
                ..Sizes::OBJECT
            },
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
    /// there (by an agent that is gone) are adopted as they are, after a layout check
    /// (against `sizes` for the maps the agent sizes); the others are created at `sizes`
    /// and pinned. TC programs are attached as `features` says (tcx links, or netlink
    /// filters). Returns whether anything was adopted.
    pub fn load_pinned(
        object: &Path,
        cfg: &MeshConfig,
        pins: &PinDir,
        sizes: Sizes,
        features: Features,
    ) -> Result<(Self, bool), MeshError> {
        let bytes = std::fs::read(object).map_err(|source| MeshError::Io {
            what: format!("reading {}", object.display()),
            source,
        })?;
        let adopted = pins.has_maps();
        if adopted {
            if let Some(had) = grow::grow_maglev(pins, sizes.maglev_slots)? {
                tracing::info!(
                    from = had,
                    to = sizes.maglev_slots,
                    "grew the pinned Maglev array (every slot copied, nothing flushed)"
                );
            }
            pins.check_layout(&bytes, sizes)?;
        }
        pins.create()?;
        Ok((
            Self::load_with(object, cfg, Some(pins), sizes, features)?,
            adopted,
        ))
    }

    fn load_with(
        object: &Path,
        cfg: &MeshConfig,
        pins: Option<&PinDir>,
        sizes: Sizes,
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
        loader.map_max_entries(mesh_common::maps::MAGLEV.name, sizes.maglev_slots);
        loader.map_max_entries(mesh_common::maps::CONNTRACK.name, sizes.ct_entries);
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

    pub(super) fn program_mut<'a, T>(
        &'a mut self,
        name: &'static str,
    ) -> Result<&'a mut T, MeshError>
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

    pub(super) fn program<'a, T>(&'a self, name: &'static str) -> Result<&'a T, MeshError>
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

    /// The loaded map `name` (an error naming it when the object has none).
    pub(super) fn loaded_map(&self, name: &'static str) -> Result<&aya::maps::Map, MeshError> {
        self.ebpf.map(name).ok_or(MeshError::Map {
            map: name,
            source: aya::maps::MapError::InvalidName { name: name.into() },
        })
    }

    /// Every conntrack entry of the loaded map, pinned or not (the tests' view; meshctl
    /// reads the pinned map: `datapath/conntrack.rs`).
    pub fn conntrack_entries(
        &self,
    ) -> Result<Vec<(mesh_common::ct::CtKey, mesh_common::ct::CtEntry)>, MeshError> {
        let name = mesh_common::maps::CONNTRACK.name;
        let map: aya::maps::HashMap<&MapData, mesh_common::ct::CtKey, mesh_common::ct::CtEntry> =
            aya::maps::HashMap::try_from(self.loaded_map(name)?)
                .map_err(|source| MeshError::Map { map: name, source })?;
        Ok(map.iter().filter_map(Result::ok).collect())
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
