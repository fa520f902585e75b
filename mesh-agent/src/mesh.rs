//! The library API: a loaded datapath plus the reconciler that keeps its maps equal to a
//! model. `mesh-agent --config` and the tests drive the datapath through this.

use std::path::{Path, PathBuf};

use mesh_common::{ct::CT_MAP, lb, stats::STATS_MAP};

use crate::{
    loader::Datapath,
    maps::MapWriter,
    model::{self, Desired, Model},
    netdev,
    reconcile::Reconciler,
    MeshError,
};

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

/// What one apply did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub ops: usize,
    pub writes: usize,
}

pub struct Mesh {
    pub dp: Datapath,
    reconciler: Reconciler,
}

impl Mesh {
    pub fn new(dp: Datapath) -> Self {
        Mesh {
            dp,
            reconciler: Reconciler::new(lb::MAGLEV_SLOTS),
        }
    }

    /// Makes the maps match `model`, resolving endpoint interfaces in the calling
    /// thread's network namespace.
    pub fn apply(&mut self, model: &Model) -> Result<Applied, MeshError> {
        let d = model::desired(model, netdev::resolve)?;
        self.apply_desired(&d)
    }

    pub fn apply_desired(&mut self, d: &Desired) -> Result<Applied, MeshError> {
        let ops = self.reconciler.plan(d).map_err(MeshError::Plan)?;
        let writes = self.dp.write_all(&ops)?;
        Ok(Applied {
            ops: ops.len(),
            writes,
        })
    }

    /// Pins every map under `dir` (replacing stale pins); returns the paths.
    pub fn pin(&self, dir: &Path) -> Result<Vec<PathBuf>, MeshError> {
        PINNED_MAPS
            .iter()
            .map(|m| self.dp.pin_map(m, dir))
            .collect()
    }
}
