//! From the desired state to map writes: the minimal, ordered list of operations that
//! takes the maps from what was applied last to what is desired. Pure: it plans against
//! its own record of what it applied; [`crate::datapath::maps::MapWriter`] carries the plan out.
//!
//! Make-before-break, so that no packet ever sees a half-written service: endpoints and
//! backends are written before the Maglev slots that point at them; slots before the
//! service entry that makes them live (a resized table goes to a fresh region and the
//! service flips to it in one hash-map update); frontends last. Removals run in reverse,
//! and a freed region is reused only by a later plan.

use super::*;
use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    sync::Arc,
};

use mesh_common::lb::{
    Backend, BackendState, Endpoint, EndpointIdle, Frontend, FrontendKey, Local, Network, Service,
    TaskPort, Tunnel, SVC_AFFINITY,
};

use crate::{
    model::{Desired, Group, GroupName},
    plan::maglev,
};

#[derive(Clone, Debug)]
pub(super) struct AppliedGroup {
    pub(super) id: u32,
    pub(super) service: Service,
    pub(super) backend_ids: BTreeMap<(Ipv4Addr, u16), u32>,
    /// Backend id per slot of the current region. Shared: a plan works on a copy of the
    /// whole record (so that a failed plan records nothing), and copying 10,000 tables
    /// of 2039 slots per plan cost ~100 ms.
    pub(super) table: Arc<Vec<u32>>,
    /// The active backends (name, id) `table` was built from: an unchanged set keeps its
    /// table without rebuilding it (at 10,000 services the rebuilds were most of a
    /// plan's time).
    pub(super) built_from: Arc<Vec<(String, u32)>>,
    /// The desired group this was planned from: an identical one next time changes
    /// nothing and is skipped whole.
    pub(super) planned: Option<Arc<Group>>,
}

/// Errors of planning.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    #[error("the Maglev map is full: {need} more slots needed (raise --maglev-slots)")]
    MaglevFull { need: u32 },
    #[error("out of {0} ids")]
    IdsExhausted(&'static str),
}

/// What has been applied, and the planner.
#[derive(Clone, Debug)]
pub struct Reconciler {
    pub(super) local: Option<Local>,
    pub(super) peers: BTreeMap<Ipv4Addr, u32>,
    pub(super) networks: BTreeMap<u32, Network>,
    pub(super) tunnels: BTreeMap<Ipv4Addr, Tunnel>,
    pub(super) node_addrs: BTreeSet<Ipv4Addr>,
    pub(super) endpoints: BTreeMap<Ipv4Addr, Endpoint>,
    pub(super) endpoint_idle: BTreeMap<TaskPort, EndpointIdle>,
    pub(super) frontends: BTreeMap<FrontendKey, Frontend>,
    pub(super) groups: BTreeMap<GroupName, AppliedGroup>,
    pub(super) backends: BTreeMap<u32, Backend>,
    pub(super) regions: Regions,
    /// Ids are never reused: a conntrack entry that outlives its backend must find no
    /// backend (and answer RST), never a newer one that took its number.
    pub(super) next_svc: u32,
    pub(super) next_backend: u32,
    /// What the last plan could not give its full Maglev table (the array is full).
    pub(super) shortfalls: Vec<Shortfall>,
}

/// A group the last plan could not give the Maglev table its backends call for, the
/// shared array being full: it got a smaller table (balanced less finely), or none and
/// was left as it was (a new group: not programmed). Every other group is planned as
/// usual, and the next plan tries again (a removed service frees its region).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shortfall {
    pub group: GroupName,
    /// Slots its backends call for.
    pub want: u32,
    /// Slots it has: `None`, left as it was (or out, when new).
    pub got: Option<u32>,
}

impl Shortfall {
    /// As a problem the agent reports (log, `meshctl doctor`, metric).
    pub fn problem(&self) -> crate::model::Problem {
        let service = self.group.0.split('/').next().unwrap_or_default();
        let (left_out, how) = match self.got {
            Some(got) => (
                format!("part of {}'s Maglev table", self.group.0),
                format!("it has {got} slots"),
            ),
            None => (
                format!("{} (its Maglev table)", self.group.0),
                "it is left as it was".to_string(),
            ),
        };
        crate::model::Problem {
            service: service.to_string(),
            left_out,
            reason: format!(
                "the Maglev array is full: {} slots due, {how} (raise --maglev-slots: the agent \
                 grows the array on restart, keeping every flow)",
                self.want
            ),
        }
    }
}

fn addr(a: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(a.octets())
}

impl Reconciler {
    /// A reconciler for empty maps with `maglev_slots` slots in the Maglev array.
    pub fn new(maglev_slots: u32) -> Self {
        Reconciler {
            local: None,
            peers: BTreeMap::new(),
            networks: BTreeMap::new(),
            tunnels: BTreeMap::new(),
            node_addrs: BTreeSet::new(),
            endpoints: BTreeMap::new(),
            endpoint_idle: BTreeMap::new(),
            frontends: BTreeMap::new(),
            groups: BTreeMap::new(),
            backends: BTreeMap::new(),
            regions: Regions::new(maglev_slots),
            // 0 means "none" in every map.
            next_svc: 1,
            next_backend: 1,
            shortfalls: Vec::new(),
        }
    }

    /// What the last plan could not give its full Maglev table.
    pub fn shortfalls(&self) -> &[Shortfall] {
        &self.shortfalls
    }

    /// The table size a group with `active` backends gets: its due size `want` when it
    /// has it or it fits; else a larger one it has (shrinking waits for room), or the
    /// largest smaller one that fits (its present one always does), never one that
    /// cannot hold every backend; `None`: none fits.
    fn table_size(&self, want: u32, have: u32, active: usize) -> Option<u32> {
        let fits = |m: u32| m == have || self.regions.fits(m);
        if want == 0 || fits(want) {
            return Some(want);
        }
        if have > want {
            return Some(have);
        }
        maglev::SIZES
            .iter()
            .copied()
            .chain((have > 0).then_some(have))
            .filter(|m| *m < want && *m as usize > active && fits(*m))
            .max()
    }

    /// Every backend in the maps: id -> (its group's name, task address, port).
    pub fn backend_names(&self) -> BTreeMap<u32, (String, Ipv4Addr, u16)> {
        self.groups
            .iter()
            .flat_map(|(name, g)| {
                g.backend_ids
                    .iter()
                    .map(move |((a, p), id)| (*id, (name.0.clone(), *a, *p)))
            })
            .collect()
    }

    fn new_id(next: &mut u32, what: &'static str) -> Result<u32, PlanError> {
        let id = *next;
        *next = next.checked_add(1).ok_or(PlanError::IdsExhausted(what))?;
        Ok(id)
    }

    /// Plans the writes from the applied state to `d`, and records `d` as applied. On
    /// error nothing is recorded.
    pub fn plan(&mut self, d: &Desired) -> Result<Vec<Op>, PlanError> {
        let mut next = self.clone();
        let ops = next.plan_into(d)?;
        *self = next;
        Ok(ops)
    }

    fn plan_into(&mut self, d: &Desired) -> Result<Vec<Op>, PlanError> {
        self.regions.settle();
        self.shortfalls.clear();
        let mut puts_ep = Vec::new();
        let mut puts_be = Vec::new();
        let mut puts_slots = Vec::new();
        let mut puts_svc = Vec::new();
        let mut puts_fe = Vec::new();
        let mut demotions = Vec::new();
        let mut dels_fe = Vec::new();
        let mut dels_svc = Vec::new();
        let mut dels_be = Vec::new();
        let mut dels_ep = Vec::new();
        let mut node_puts = Vec::new();
        let mut node_dels = Vec::new();

        for a in d.node_addrs.difference(&self.node_addrs) {
            node_puts.push(Op::PutNodeAddr(addr(*a)));
        }
        // The overlay's maps: written with the endpoints (before anything points at a
        // tunnel), removed with them.
        let mut overlay_puts = Vec::new();
        let mut overlay_dels = Vec::new();
        if let Some(l) = d.local.filter(|l| Some(*l) != self.local) {
            overlay_puts.push(Op::PutLocal(l));
        }
        self.local = d.local;
        diff(
            &self.peers,
            &d.peers,
            |k, v| Op::PutPeer(addr(*k), *v),
            |k| Op::DelPeer(addr(*k)),
            &mut overlay_puts,
            &mut overlay_dels,
        );
        diff(
            &self.networks,
            &d.networks,
            |k, v| Op::PutNetwork(*k, *v),
            |k| Op::DelNetwork(*k),
            &mut overlay_puts,
            &mut overlay_dels,
        );
        diff(
            &self.tunnels,
            &d.tunnels,
            |k, v| Op::PutTunnel(addr(*k), *v),
            |k| Op::DelTunnel(addr(*k)),
            &mut overlay_puts,
            &mut overlay_dels,
        );
        self.peers = d.peers.clone();
        self.networks = d.networks.clone();
        self.tunnels = d.tunnels.clone();
        for a in self.node_addrs.difference(&d.node_addrs) {
            node_dels.push(Op::DelNodeAddr(addr(*a)));
        }
        self.node_addrs = d.node_addrs.clone();

        let want_eps: BTreeMap<Ipv4Addr, Endpoint> = d
            .endpoints
            .iter()
            .map(|(a, e)| {
                (
                    *a,
                    Endpoint {
                        ifindex: e.ifindex,
                        delivery_addr: addr(e.delivery_addr),
                        mac: e.mac,
                        host_mac: e.host_mac,
                    },
                )
            })
            .collect();
        for (a, e) in &want_eps {
            if self.endpoints.get(a) != Some(e) {
                puts_ep.push(Op::PutEndpoint(addr(*a), *e));
            }
        }
        diff(
            &self.endpoint_idle,
            &d.endpoint_idle,
            |k, t| Op::PutEndpointIdle(*k, *t),
            |k| Op::DelEndpointIdle(*k),
            &mut puts_ep,
            &mut dels_ep,
        );
        self.endpoint_idle = d.endpoint_idle.clone();
        for a in self.endpoints.keys().filter(|a| !want_eps.contains_key(a)) {
            dels_ep.push(Op::DelEndpoint(addr(*a)));
        }
        self.endpoints = want_eps;

        // Groups.
        let gone: Vec<GroupName> = self
            .groups
            .keys()
            .filter(|g| !d.groups.contains_key(*g))
            .cloned()
            .collect();
        for (name, want) in &d.groups {
            if self
                .groups
                .get(name)
                .and_then(|g| g.planned.as_deref())
                .is_some_and(|p| p == want)
            {
                continue;
            }
            let active_n = want
                .backends
                .values()
                .filter(|s| **s == BackendState::Active)
                .count();
            let due = maglev::size_for(active_n);
            let have = self.groups.get(name).map_or(0, |g| g.service.maglev_size);
            let Some(size) = self.table_size(due, have, active_n) else {
                // Nothing fits: the group stays as it was applied (a new one is not
                // programmed, nor its frontends).
                self.shortfalls.push(Shortfall {
                    group: name.clone(),
                    want: due,
                    got: None,
                });
                continue;
            };
            if size < due {
                self.shortfalls.push(Shortfall {
                    group: name.clone(),
                    want: due,
                    got: Some(size),
                });
            }
            let mut g = match self.groups.remove(name) {
                Some(g) => g,
                None => AppliedGroup {
                    id: Self::new_id(&mut self.next_svc, "service")?,
                    service: Service::default(),
                    backend_ids: BTreeMap::new(),
                    table: Arc::default(),
                    built_from: Arc::default(),
                    planned: None,
                },
            };
            // Backends: stable ids per (address, port).
            let mut ids = BTreeMap::new();
            for (key, state) in &want.backends {
                let id = match g.backend_ids.get(key) {
                    Some(id) => *id,
                    None => Self::new_id(&mut self.next_backend, "backend")?,
                };
                ids.insert(*key, id);
                let be = Backend {
                    addr: addr(key.0),
                    port: key.1.to_be(),
                    state: *state as u8,
                    _pad: 0,
                    svc_id: g.id,
                };
                if self.backends.get(&id) != Some(&be) {
                    // New or (re)activated: before the slots that point at it. Demoted
                    // (draining): after the slots stop pointing at it.
                    if *state == BackendState::Active || !self.backends.contains_key(&id) {
                        puts_be.push(Op::PutBackend(id, be));
                    } else {
                        demotions.push(Op::PutBackend(id, be));
                    }
                    self.backends.insert(id, be);
                }
            }
            for (key, id) in &g.backend_ids {
                if !ids.contains_key(key) {
                    dels_be.push(Op::DelBackend(*id));
                    self.backends.remove(id);
                }
            }
            g.backend_ids = ids;

            // The Maglev table over the active backends, by name.
            let active: Vec<(String, u32)> = want
                .backends
                .iter()
                .filter(|(_, s)| **s == BackendState::Active)
                .map(|((a, p), _)| (format!("{a}:{p}"), g.backend_ids[&(*a, *p)]))
                .collect();
            let same = size == g.service.maglev_size
                && *g.built_from == active
                && g.table.len() == size as usize;
            let table: Arc<Vec<u32>> = if same {
                // Unchanged: the diff below sees no slot to write.
                g.table.clone()
            } else {
                let names: Vec<String> = active.iter().map(|(n, _)| n.clone()).collect();
                Arc::new(
                    maglev::build(&names, size)
                        .into_iter()
                        .map(|i| active[i as usize].1)
                        .collect(),
                )
            };
            let mut svc = Service {
                maglev_off: g.service.maglev_off,
                maglev_size: size,
                active: active.len() as u32,
                flags: if want.affinity { SVC_AFFINITY } else { 0 },
                tcp_idle_s: want.tcp_idle_s,
                udp_idle_s: want.udp_idle_s,
                affinity_s: 0,
                _pad: 0,
            };
            if size != g.service.maglev_size {
                if g.service.maglev_size > 0 {
                    self.regions
                        .release(g.service.maglev_off, g.service.maglev_size);
                }
                svc.maglev_off = 0;
                if size > 0 {
                    svc.maglev_off = self
                        .regions
                        .alloc(size)
                        .ok_or(PlanError::MaglevFull { need: size })?;
                    puts_slots.push(Op::PutSlots(
                        table
                            .iter()
                            .enumerate()
                            .map(|(i, id)| (svc.maglev_off + i as u32, *id))
                            .collect(),
                    ));
                }
            } else if size > 0 && !same {
                let changed: Vec<(u32, u32)> = table
                    .iter()
                    .zip(g.table.iter())
                    .enumerate()
                    .filter(|(_, (new, old))| new != old)
                    .map(|(i, (new, _))| (svc.maglev_off + i as u32, *new))
                    .collect();
                if !changed.is_empty() {
                    puts_slots.push(Op::PutSlots(changed));
                }
            }
            g.table = table;
            if !same {
                g.built_from = Arc::new(active);
            }
            g.planned = Some(Arc::new(want.clone()));
            if svc != g.service {
                puts_svc.push(Op::PutService(g.id, svc));
                g.service = svc;
            }
            self.groups.insert(name.clone(), g);
        }
        for name in gone {
            let g = self.groups.remove(&name).expect("listed above");
            dels_svc.push(Op::DelService(g.id));
            if g.service.maglev_size > 0 {
                self.regions
                    .release(g.service.maglev_off, g.service.maglev_size);
            }
            for id in g.backend_ids.values() {
                dels_be.push(Op::DelBackend(*id));
                self.backends.remove(id);
            }
        }

        // Frontends.
        // (A group left out for want of Maglev slots has none.)
        let want_fe: BTreeMap<FrontendKey, Frontend> = d
            .frontends
            .iter()
            .filter_map(|(k, (g, flags))| {
                Some((
                    *k,
                    Frontend {
                        svc_id: self.groups.get(g)?.id,
                        flags: *flags,
                    },
                ))
            })
            .collect();
        for (k, fe) in &want_fe {
            if self.frontends.get(k) != Some(fe) {
                puts_fe.push(Op::PutFrontend(*k, *fe));
            }
        }
        for k in self.frontends.keys().filter(|k| !want_fe.contains_key(k)) {
            dels_fe.push(Op::DelFrontend(*k));
        }
        self.frontends = want_fe;

        let mut ops = node_puts;
        for part in [
            overlay_puts,
            puts_ep,
            puts_be,
            puts_slots,
            puts_svc,
            puts_fe,
            demotions,
            dels_fe,
            dels_svc,
            dels_be,
            dels_ep,
            overlay_dels,
            node_dels,
        ] {
            ops.extend(part);
        }
        Ok(ops)
    }
}

/// Puts for what is new or changed, deletes for what is gone.
fn diff<K: Ord, V: PartialEq>(
    old: &BTreeMap<K, V>,
    new: &BTreeMap<K, V>,
    put: impl Fn(&K, &V) -> Op,
    del: impl Fn(&K) -> Op,
    puts: &mut Vec<Op>,
    dels: &mut Vec<Op>,
) {
    for (k, v) in new {
        if old.get(k) != Some(v) {
            puts.push(put(k, v));
        }
    }
    for k in old.keys().filter(|k| !new.contains_key(k)) {
        dels.push(del(k));
    }
}

#[cfg(test)]
mod tests;
