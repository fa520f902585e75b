//! What lives on bpffs: the maps (which a restarted agent adopts), the program links
//! (which keep the datapath attached while no agent runs), and the layout check between
//! what is pinned and what this agent's object expects.
//!
//! ```text
//! <dir>/MESH_*_V1              maps
//! <dir>/links/<hook>-<ifindex> links: tc_underlay, xdp_underlay, tc_task (bpffs
//!                              refuses dots in names)
//! ```

use std::path::{Path, PathBuf};

use aya::maps::MapInfo;
use mesh_common::{ct::CT_MAP, lb, stats::STATS_MAP};

use crate::MeshError;

/// Every map the agent pins (and meshctl reads).
pub const PINNED_MAPS: &[&str] = &[
    STATS_MAP,
    CT_MAP,
    lb::FRONTENDS_MAP,
    lb::SERVICES_MAP,
    lb::MAGLEV_MAP,
    lb::BACKENDS_MAP,
    lb::ENDPOINTS_MAP,
    lb::NODE_ADDRS_MAP,
    lb::TUNNELS_MAP,
    lb::PEERS_MAP,
    lb::NETWORKS_MAP,
    lb::LOCAL_MAP,
];

/// Where a program is attached, as named in link pins.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Hook {
    TcUnderlay,
    XdpUnderlay,
    TcTask,
}

impl Hook {
    pub const ALL: [Hook; 3] = [Hook::TcUnderlay, Hook::XdpUnderlay, Hook::TcTask];

    /// The program this hook runs.
    pub fn program(self) -> &'static str {
        use mesh_common::config::programs;
        match self {
            Hook::TcUnderlay => programs::TC_UNDERLAY_INGRESS,
            Hook::XdpUnderlay => programs::XDP_UNDERLAY,
            Hook::TcTask => programs::TC_TASK,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Hook::TcUnderlay => "tc_underlay",
            Hook::XdpUnderlay => "xdp_underlay",
            Hook::TcTask => "tc_task",
        }
    }
}

/// A pinned link: which hook, on which interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkPin {
    pub hook: Hook,
    pub ifindex: u32,
    pub path: PathBuf,
}

/// The agent's directory on bpffs.
#[derive(Clone, Debug)]
pub struct PinDir {
    root: PathBuf,
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> MeshError {
    move |source| MeshError::Io { what, source }
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
        self.root
            .join("links")
            .join(format!("{}-{ifindex}", hook.name()))
    }

    /// Creates the directories (the bpffs mount itself is checked by preflight).
    pub fn create(&self) -> Result<(), MeshError> {
        let links = self.root.join("links");
        std::fs::create_dir_all(&links).map_err(io(format!("creating {}", links.display())))
    }

    /// Whether a previous agent left maps here.
    pub fn has_maps(&self) -> bool {
        PINNED_MAPS.iter().any(|m| self.map(m).exists())
    }

    /// Refuses maps pinned with another layout than `object` defines (another mesh
    /// version): adopting them would misread every entry.
    pub fn check_layout(&self, object: &[u8]) -> Result<(), MeshError> {
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
            let (w, h) = (
                (want.key_size(), want.value_size(), want.max_entries()),
                (have.key_size(), have.value_size(), have.max_entries()),
            );
            if w != h {
                return Err(MeshError::Layout {
                    dir: self.root.clone(),
                    detail: format!(
                        "{name} is pinned with key/value/entries {}/{}/{} but this agent's \
                         object has {}/{}/{}",
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
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let (hook, ifindex) = name.split_once('-')?;
                let hook = Hook::ALL.into_iter().find(|h| h.name() == hook)?;
                Some(LinkPin {
                    hook,
                    ifindex: ifindex.parse().ok()?,
                    path: e.path(),
                })
            })
            .collect();
        out.sort_by_key(|l| (l.hook, l.ifindex));
        out
    }

    /// Removes a link pin: the program leaves that interface (unless something else
    /// holds the link).
    pub fn unpin(&self, path: &Path) -> Result<(), MeshError> {
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
