//! The library API: a loaded datapath plus the reconciler that keeps its maps equal to a
//! model. `mesh-agent --config` and the tests drive the datapath through this.

use std::path::PathBuf;

use crate::{
    datapath::loader::Datapath,
    datapath::maps::MapWriter,
    host::netdev,
    model::{self, Desired, Model},
    plan::{Names, Reconciler},
    MeshError,
};

pub use crate::datapath::pins::PINNED_MAPS;

/// What one apply did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub ops: usize,
    pub writes: usize,
}

pub struct Mesh {
    pub dp: Datapath,
    reconciler: Reconciler,
    /// Where the names the maps cannot hold are saved (pinned meshes only).
    names_file: Option<PathBuf>,
    saved: Option<Names>,
    /// Addresses answered as this node's beyond the model's (the host port's).
    pub extra_node_addrs: Vec<std::net::Ipv4Addr>,
    /// Ports no service may publish (the node's own plumbing).
    pub reserved: model::Reserved,
    /// The published ports the last apply programmed: their holders keep them.
    prior: model::Claims,
    /// What the last applied model asked for that could not be programmed.
    problems: Vec<model::Problem>,
    /// A write failed: the planner's record is not what the maps hold.
    stale: bool,
}

/// What a restarted agent found pinned.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Adopted {
    pub services: usize,
    pub backends: usize,
    pub frontends: usize,
    /// Whether the saved names were there (without them, services are replaced).
    pub named: bool,
}

impl Mesh {
    pub fn new(dp: Datapath) -> Self {
        let slots = dp.maglev_slots();
        Mesh {
            dp,
            reconciler: Reconciler::new(slots),
            names_file: None,
            saved: None,
            extra_node_addrs: Vec::new(),
            reserved: Default::default(),
            prior: Default::default(),
            problems: Vec::new(),
            stale: false,
        }
    }

    /// A mesh over pinned maps that records in `names_file` what the maps cannot hold.
    /// With `adopt`, the maps' content is taken as applied (nothing is flushed: flows in
    /// conntrack keep their backends) and the next apply plans from there.
    pub fn pinned(
        mut dp: Datapath,
        names_file: PathBuf,
        adopt: bool,
    ) -> Result<(Self, Option<Adopted>), MeshError> {
        let mut report = None;
        let slots = dp.maglev_slots();
        let reconciler = if adopt {
            let snap = dp.read_snapshot()?;
            let names: Option<Names> = std::fs::read(&names_file)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
            report = Some(Adopted {
                services: snap.services.len(),
                backends: snap.backends.len(),
                frontends: snap.frontends.len(),
                named: names.is_some(),
            });
            Reconciler::adopt(&snap, &names.unwrap_or_default(), slots)
        } else {
            Reconciler::new(slots)
        };
        Ok((
            Mesh {
                dp,
                reconciler,
                names_file: Some(names_file),
                saved: None,
                extra_node_addrs: Vec::new(),
                reserved: Default::default(),
                prior: Default::default(),
                problems: Vec::new(),
                stale: false,
            },
            report,
        ))
    }

    /// Saves the names (atomically: write, then rename) if they changed.
    fn save_names(&mut self) -> Result<(), MeshError> {
        let Some(path) = &self.names_file else {
            return Ok(());
        };
        let names = self.reconciler.names();
        if self.saved.as_ref() == Some(&names) {
            return Ok(());
        }
        let json = serde_json::to_vec(&names).expect("names serialize");
        crate::host::files::write_atomic(path, &json).map_err(|source| MeshError::Io {
            what: format!("writing {}", path.display()),
            source,
        })?;
        self.saved = Some(names);
        Ok(())
    }

    /// Every backend in the maps: id -> (group name, task address, port).
    pub fn backend_names(
        &self,
    ) -> std::collections::BTreeMap<u32, (String, std::net::Ipv4Addr, u16)> {
        self.reconciler.backend_names()
    }

    /// Takes what the maps hold now as applied (something changed them behind the
    /// agent's back: `meshctl doctor --fix`), so that the next apply repairs it.
    pub fn readopt(&mut self) -> Result<(), MeshError> {
        let snap = self.dp.read_snapshot()?;
        let names = self.reconciler.names();
        self.reconciler = Reconciler::adopt(&snap, &names, self.dp.maglev_slots());
        Ok(())
    }

    /// Makes the maps match `model`, resolving endpoint interfaces in the calling
    /// thread's network namespace.
    /// What the model asked for cannot be programmed is left out (see
    /// [`Self::problems`]) and everything else applied.
    pub fn apply(&mut self, model: &Model) -> Result<Applied, MeshError> {
        let mut d = model::desired_with(model, netdev::resolve, &self.prior, &self.reserved)?;
        d.node_addrs.extend(&self.extra_node_addrs);
        let applied = self.apply_desired(&d)?;
        self.prior = std::mem::take(&mut d.claims);
        self.problems = std::mem::take(&mut d.problems);
        // And what the Maglev array had no room for.
        self.problems
            .extend(self.reconciler.shortfalls().iter().map(|s| s.problem()));
        Ok(applied)
    }

    /// What the last applied model asked for that could not be programmed.
    pub fn problems(&self) -> &[model::Problem] {
        &self.problems
    }

    /// The published ports the last apply programmed, and their services.
    pub fn claims(&self) -> &model::Claims {
        &self.prior
    }

    /// Makes the maps match `d`. A write that fails leaves the maps with part of the
    /// plan: the record is then taken from the maps again (as a restarted agent would)
    /// and the plan made once more from there, so that whatever fails, the next apply
    /// starts from what the maps really hold, never from what was only planned.
    pub fn apply_desired(&mut self, d: &Desired) -> Result<Applied, MeshError> {
        if self.stale {
            self.readopt()?;
            self.stale = false;
        }
        match self.plan_and_write(d) {
            Err(e) if self.stale => {
                tracing::warn!(
                    "a map write failed ({e}); re-read the maps, planning again from them"
                );
                self.readopt()?;
                self.stale = false;
                self.plan_and_write(d)
            }
            r => r,
        }
    }

    /// One plan and its writes; after a failed write, the record is `stale`: read
    /// from the maps again before the next plan.
    fn plan_and_write(&mut self, d: &Desired) -> Result<Applied, MeshError> {
        let ops = self.reconciler.plan(d).map_err(MeshError::Plan)?;
        // Before the writes: a restarted agent must know every id they may leave behind.
        let written = self.save_names().and_then(|()| self.dp.write_all(&ops));
        if written.is_err() {
            self.stale = true;
        }
        Ok(Applied {
            ops: ops.len(),
            writes: written?,
        })
    }
}
