//! From the desired state to map writes: the minimal, ordered list of operations that
//! takes the maps from what was applied last to what is desired. Pure: it plans against
//! its own record of what it applied; [`crate::maps::MapWriter`] carries the plan out.
//!
//! Make-before-break, so that no packet ever sees a half-written service: endpoints and
//! backends are written before the Maglev slots that point at them; slots before the
//! service entry that makes them live (a resized table goes to a fresh region and the
//! service flips to it in one hash-map update); frontends last. Removals run in reverse,
//! and a freed region is reused only by a later plan.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    sync::Arc,
};

use mesh_common::lb::{
    Backend, BackendState, Endpoint, Frontend, FrontendKey, Local, Network, Service, Tunnel,
    SVC_AFFINITY,
};

use crate::{
    maglev,
    model::{Desired, Group, GroupName},
};

/// One map write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    PutLocal(Local),
    PutPeer(u32, u32),
    PutNetwork(u32, Network),
    PutTunnel(u32, Tunnel),
    DelTunnel(u32),
    DelNetwork(u32),
    DelPeer(u32),
    PutNodeAddr(u32),
    PutEndpoint(u32, Endpoint),
    PutBackend(u32, Backend),
    /// Maglev slots: (absolute index, backend id).
    PutSlots(Vec<(u32, u32)>),
    PutService(u32, Service),
    PutFrontend(FrontendKey, Frontend),
    DelFrontend(FrontendKey),
    DelService(u32),
    DelBackend(u32),
    DelEndpoint(u32),
    DelNodeAddr(u32),
}

impl Op {
    /// Map entries this operation writes (slots count one each).
    pub fn writes(&self) -> usize {
        match self {
            Op::PutSlots(s) => s.len(),
            _ => 1,
        }
    }
}

/// Regions of the shared Maglev array.
#[derive(Clone, Debug)]
struct Regions {
    /// offset -> length of free space.
    free: BTreeMap<u32, u32>,
    /// Freed by the last plan; free for the next one (a packet may still be reading).
    quarantine: Vec<(u32, u32)>,
}

impl Regions {
    fn new(capacity: u32) -> Self {
        Regions {
            free: BTreeMap::from([(0, capacity)]),
            quarantine: Vec::new(),
        }
    }

    fn alloc(&mut self, len: u32) -> Option<u32> {
        let (&off, &flen) = self.free.iter().find(|(_, l)| **l >= len)?;
        self.free.remove(&off);
        if flen > len {
            self.free.insert(off + len, flen - len);
        }
        Some(off)
    }

    fn release(&mut self, off: u32, len: u32) {
        self.quarantine.push((off, len));
    }

    /// Returns quarantined regions to the free list, merging neighbours.
    fn settle(&mut self) {
        for (off, len) in std::mem::take(&mut self.quarantine) {
            self.free.insert(off, len);
        }
        let mut merged: BTreeMap<u32, u32> = BTreeMap::new();
        for (off, len) in std::mem::take(&mut self.free) {
            if let Some((&poff, plen)) = merged.iter_mut().next_back() {
                if poff + *plen == off {
                    *plen += len;
                    continue;
                }
            }
            merged.insert(off, len);
        }
        self.free = merged;
    }
}

#[derive(Clone, Debug)]
struct AppliedGroup {
    id: u32,
    service: Service,
    backend_ids: BTreeMap<(Ipv4Addr, u16), u32>,
    /// Backend id per slot of the current region. Shared: a plan works on a copy of the
    /// whole record (so that a failed plan records nothing), and copying 10,000 tables
    /// of 2039 slots per plan cost ~100 ms.
    table: Arc<Vec<u32>>,
    /// The active backends (name, id) `table` was built from: an unchanged set keeps its
    /// table without rebuilding it (at 10,000 services the rebuilds were most of a
    /// plan's time).
    built_from: Arc<Vec<(String, u32)>>,
    /// The desired group this was planned from: an identical one next time changes
    /// nothing and is skipped whole.
    planned: Option<Arc<Group>>,
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
    local: Option<Local>,
    peers: BTreeMap<Ipv4Addr, u32>,
    networks: BTreeMap<u32, Network>,
    tunnels: BTreeMap<Ipv4Addr, Tunnel>,
    node_addrs: BTreeSet<Ipv4Addr>,
    endpoints: BTreeMap<Ipv4Addr, Endpoint>,
    frontends: BTreeMap<FrontendKey, Frontend>,
    groups: BTreeMap<GroupName, AppliedGroup>,
    backends: BTreeMap<u32, Backend>,
    regions: Regions,
    /// Ids are never reused: a conntrack entry that outlives its backend must find no
    /// backend (and answer RST), never a newer one that took its number.
    next_svc: u32,
    next_backend: u32,
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
            frontends: BTreeMap::new(),
            groups: BTreeMap::new(),
            backends: BTreeMap::new(),
            regions: Regions::new(maglev_slots),
            // 0 means "none" in every map.
            next_svc: 1,
            next_backend: 1,
        }
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
            let size = maglev::size_for(active.len());
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
        let want_fe: BTreeMap<FrontendKey, Frontend> = d
            .frontends
            .iter()
            .map(|(k, (g, flags))| {
                (
                    *k,
                    Frontend {
                        svc_id: self.groups[g].id,
                        flags: *flags,
                    },
                )
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

/// What the load-balancing maps hold, read back (addresses in the maps' byte order).
/// `tables` holds each service's Maglev region.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub local: Option<Local>,
    pub peers: BTreeMap<u32, u32>,
    pub networks: BTreeMap<u32, Network>,
    pub tunnels: BTreeMap<u32, Tunnel>,
    pub node_addrs: BTreeSet<u32>,
    pub endpoints: BTreeMap<u32, Endpoint>,
    pub frontends: BTreeMap<FrontendKey, Frontend>,
    pub services: BTreeMap<u32, Service>,
    pub backends: BTreeMap<u32, Backend>,
    pub tables: BTreeMap<u32, Vec<u32>>,
}

/// What the maps cannot hold and a restarted agent needs: group names per service id,
/// and the id counters (ids are never reused, even ids whose entries are gone). Saved
/// before the writes of every plan, so it always covers what the maps hold.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Names {
    pub next_svc: u32,
    pub next_backend: u32,
    pub groups: BTreeMap<u32, String>,
}

fn ip(a: u32) -> Ipv4Addr {
    Ipv4Addr::from(a.to_ne_bytes())
}

impl Reconciler {
    /// The names and counters to save before carrying out the last plan.
    pub fn names(&self) -> Names {
        Names {
            next_svc: self.next_svc,
            next_backend: self.next_backend,
            groups: self
                .groups
                .iter()
                .map(|(n, g)| (g.id, n.0.clone()))
                .collect(),
        }
    }

    /// A reconciler whose record is exactly what the maps hold, so that the next plan
    /// takes the maps, as they are, to the desired state without flushing anything.
    /// A service id with no saved name (an agent killed between saving and writing, or
    /// lost names) becomes a group no model names, which the next plan removes after
    /// its replacement is live. Counters never go below an id seen in the maps.
    pub fn adopt(snap: &Snapshot, names: &Names, maglev_slots: u32) -> Self {
        let mut r = Reconciler::new(maglev_slots);
        r.local = snap.local;
        r.peers = snap.peers.iter().map(|(a, f)| (ip(*a), *f)).collect();
        r.networks = snap.networks.clone();
        r.tunnels = snap.tunnels.iter().map(|(a, t)| (ip(*a), *t)).collect();
        r.node_addrs = snap.node_addrs.iter().map(|a| ip(*a)).collect();
        r.endpoints = snap.endpoints.iter().map(|(a, e)| (ip(*a), *e)).collect();
        r.frontends = snap.frontends.clone();
        r.backends = snap.backends.clone();
        let mut used: Vec<(u32, u32)> = Vec::new();
        for (id, svc) in &snap.services {
            let name = names
                .groups
                .get(id)
                .cloned()
                .unwrap_or_else(|| format!("adopted/unnamed/{id}"));
            let backend_ids = snap
                .backends
                .iter()
                .filter(|(_, b)| b.svc_id == *id)
                .map(|(bid, b)| ((ip(b.addr), u16::from_be(b.port)), *bid))
                .collect();
            if svc.maglev_size > 0 {
                used.push((svc.maglev_off, svc.maglev_size));
            }
            r.groups.insert(
                GroupName(name),
                AppliedGroup {
                    id: *id,
                    service: *svc,
                    backend_ids,
                    table: Arc::new(snap.tables.get(id).cloned().unwrap_or_default()),
                    built_from: Arc::default(),
                    planned: None,
                },
            );
        }
        // Backends whose service is gone (a write cut short): a group of their own, so
        // the next plan deletes them.
        for (bid, b) in &snap.backends {
            if !snap.services.contains_key(&b.svc_id) {
                r.groups
                    .entry(GroupName(format!("adopted/orphans/{}", b.svc_id)))
                    .or_insert_with(|| AppliedGroup {
                        id: b.svc_id,
                        service: Service::default(),
                        backend_ids: BTreeMap::new(),
                        table: Arc::default(),
                        built_from: Arc::default(),
                        planned: None,
                    })
                    .backend_ids
                    .insert((ip(b.addr), u16::from_be(b.port)), *bid);
            }
        }
        used.sort();
        let mut free = BTreeMap::new();
        let mut at = 0;
        for (off, len) in used {
            if off > at {
                free.insert(at, off - at);
            }
            at = at.max(off + len);
        }
        if at < maglev_slots {
            free.insert(at, maglev_slots - at);
        }
        r.regions.free = free;
        let max_svc = snap
            .services
            .keys()
            .chain(snap.backends.values().map(|b| &b.svc_id));
        r.next_svc = names
            .next_svc
            .max(max_svc.max().map_or(1, |m| m + 1))
            .max(1);
        r.next_backend = names
            .next_backend
            .max(snap.backends.keys().max().map_or(1, |m| m + 1))
            .max(1);
        r
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
mod tests {
    use super::*;
    use crate::{
        maps::MemMaps,
        model::{desired, from_yaml, Model},
    };

    fn resolve(name: &str) -> Result<(u32, [u8; 6]), crate::MeshError> {
        Ok((name.len() as u32 + 10, [2, 0, 0, 0, 0, 1]))
    }

    fn model(backends: &[(&str, &str)]) -> Model {
        let mut y = String::from(
            "node_addrs: [192.168.1.10]\nservices:\n  - name: web\n    ports: [{published: 8080, target: 80}]\n    vips: [10.0.1.2]\n    backends:\n",
        );
        for (a, s) in backends {
            y.push_str(&format!("      - {{addr: {a}, state: {s}}}\n"));
        }
        y.push_str("endpoints:\n");
        for (a, _) in backends {
            y.push_str(&format!(
                "  - {{addr: {a}, interface: v{a}, mac: \"02:42:00:00:00:01\"}}\n"
            ));
        }
        from_yaml(&y).unwrap()
    }

    const ACTIVE: &str = "active";

    /// Applies op by op and checks, after every single write, that every frontend
    /// resolves a spread of flows to live, active backends or to "no backend" (never to
    /// a dangling id): no packet can see a half-written service.
    fn apply_checked(maps: &mut MemMaps, ops: &[Op]) {
        for (i, op) in ops.iter().enumerate() {
            maps.apply(op);
            if let Err(e) = maps.check_consistent() {
                panic!("after op {i} ({op:?}): {e}");
            }
        }
    }

    #[test]
    fn first_apply_then_nothing_to_do() {
        let mut r = Reconciler::new(1 << 16);
        let mut maps = MemMaps::new(1 << 16);
        let d = desired(
            &model(&[
                ("10.0.1.4", ACTIVE),
                ("10.0.1.5", ACTIVE),
                ("10.0.1.6", ACTIVE),
            ]),
            resolve,
        )
        .unwrap();
        let ops = r.plan(&d).unwrap();
        apply_checked(&mut maps, &ops);
        // 1 node addr, 3 endpoints, 3 backends, 2039 slots, 1 service, 2 frontends.
        assert_eq!(
            ops.iter().map(Op::writes).sum::<usize>(),
            1 + 3 + 3 + 2039 + 1 + 2
        );
        assert!(
            r.plan(&d).unwrap().is_empty(),
            "a second apply writes nothing"
        );
        // Flows spread over the three.
        let mut seen = BTreeSet::new();
        for port in 0..300u16 {
            seen.insert(
                maps.lookup([192, 168, 1, 10], 8080, 6, [10, 9, 9, 9], 1000 + port)
                    .unwrap(),
            );
        }
        assert_eq!(seen.len(), 3);
    }

    #[test]
    fn adding_a_backend_writes_only_the_slots_that_move() {
        let mut r = Reconciler::new(1 << 16);
        let mut maps = MemMaps::new(1 << 16);
        let three = [
            ("10.0.1.4", ACTIVE),
            ("10.0.1.5", ACTIVE),
            ("10.0.1.6", ACTIVE),
        ];
        apply_checked(
            &mut maps,
            &r.plan(&desired(&model(&three), resolve).unwrap()).unwrap(),
        );
        let four = [three[0], three[1], three[2], ("10.0.1.7", ACTIVE)];
        let ops = r.plan(&desired(&model(&four), resolve).unwrap()).unwrap();
        apply_checked(&mut maps, &ops);
        let slots: usize = ops
            .iter()
            .filter(|o| matches!(o, Op::PutSlots(_)))
            .map(Op::writes)
            .sum();
        // Same size class (2039): about a quarter of the slots move to the newcomer.
        assert!(slots > 400 && slots < 650, "{slots} slots rewritten");
        assert!(
            matches!(ops[0], Op::PutEndpoint(..)),
            "endpoint before anything points at it"
        );
        let kinds: Vec<_> = ops.iter().map(std::mem::discriminant).collect();
        let pos = |o: &Op| {
            kinds
                .iter()
                .position(|k| *k == std::mem::discriminant(o))
                .unwrap()
        };
        assert!(pos(&Op::PutBackend(0, Backend::default())) < pos(&Op::PutSlots(vec![])));
        assert!(pos(&Op::PutSlots(vec![])) < pos(&Op::PutService(0, Service::default())));
    }

    #[test]
    fn draining_leaves_the_table_and_removal_deletes_last() {
        let mut r = Reconciler::new(1 << 16);
        let mut maps = MemMaps::new(1 << 16);
        let all = [
            ("10.0.1.4", ACTIVE),
            ("10.0.1.5", ACTIVE),
            ("10.0.1.6", ACTIVE),
        ];
        apply_checked(
            &mut maps,
            &r.plan(&desired(&model(&all), resolve).unwrap()).unwrap(),
        );
        let drain = [all[0], ("10.0.1.5", "draining"), all[2]];
        let ops = r.plan(&desired(&model(&drain), resolve).unwrap()).unwrap();
        apply_checked(&mut maps, &ops);
        assert!(!maps.table_backends(8080).is_empty());
        assert!(maps.table_backends(8080).iter().all(|a| a != "10.0.1.5:80"));
        assert!(maps.backend_state("10.0.1.5") == Some(BackendState::Draining));
        // Resized table (2 active -> 1021 slots): a fresh region, then the service flips.
        let removed = [all[0], all[2]];
        let ops = r
            .plan(&desired(&model(&removed), resolve).unwrap())
            .unwrap();
        apply_checked(&mut maps, &ops);
        assert!(maps.backend_state("10.0.1.5").is_none());
        assert!(matches!(ops.last(), Some(Op::DelEndpoint(_))));
    }

    #[test]
    fn no_backends_and_back() {
        let mut r = Reconciler::new(1 << 16);
        let mut maps = MemMaps::new(1 << 16);
        apply_checked(
            &mut maps,
            &r.plan(&desired(&model(&[("10.0.1.4", ACTIVE)]), resolve).unwrap())
                .unwrap(),
        );
        apply_checked(
            &mut maps,
            &r.plan(&desired(&model(&[]), resolve).unwrap()).unwrap(),
        );
        assert_eq!(
            maps.lookup([192, 168, 1, 10], 8080, 6, [1, 2, 3, 4], 5),
            None
        );
        apply_checked(
            &mut maps,
            &r.plan(&desired(&model(&[("10.0.1.9", ACTIVE)]), resolve).unwrap())
                .unwrap(),
        );
        assert_eq!(
            maps.lookup([192, 168, 1, 10], 8080, 6, [1, 2, 3, 4], 5)
                .as_deref(),
            Some("10.0.1.9:80")
        );
    }

    #[test]
    fn removing_the_service_cleans_every_map() {
        let mut r = Reconciler::new(1 << 16);
        let mut maps = MemMaps::new(1 << 16);
        apply_checked(
            &mut maps,
            &r.plan(&desired(&model(&[("10.0.1.4", ACTIVE)]), resolve).unwrap())
                .unwrap(),
        );
        let empty = Desired::default();
        apply_checked(&mut maps, &r.plan(&empty).unwrap());
        assert!(maps.is_empty(), "{maps:?}");
    }

    /// A backend leaving one service while another gains one, in one plan: the newcomer
    /// must not take the leaver's id (its delete would run after the put, and the
    /// leaver's tracked flows would find the newcomer).
    #[test]
    fn ids_are_never_reused() {
        let mut r = Reconciler::new(1 << 16);
        let mut maps = MemMaps::new(1 << 16);
        let mut m = model(&[("10.0.1.4", ACTIVE)]);
        let mut other = m.services[0].clone();
        other.name = "api".into();
        other.vips = vec!["10.0.1.3".parse().unwrap()];
        other.ports[0].published = Some(9090);
        other.backends.clear();
        m.services.push(other);
        apply_checked(&mut maps, &r.plan(&desired(&m, resolve).unwrap()).unwrap());
        let first: BTreeSet<u32> = r.backends.keys().copied().collect();
        m.services[1].backends = vec![crate::model::BackendSpec {
            addr: "10.0.1.4".parse().unwrap(),
            state: crate::model::Health::Active,
            node: None,
            network: None,
            task: None,
        }];
        m.services[0].backends.clear();
        apply_checked(&mut maps, &r.plan(&desired(&m, resolve).unwrap()).unwrap());
        assert_eq!(
            maps.lookup([192, 168, 1, 10], 9090, 6, [1, 2, 3, 4], 5)
                .as_deref(),
            Some("10.0.1.4:80")
        );
        assert_eq!(first.len(), 1);
        assert_eq!(r.backends.len(), 1);
        assert!(
            r.backends.keys().all(|id| !first.contains(id)),
            "id reused: {first:?} -> {:?}",
            r.backends.keys()
        );
    }

    /// Backends on other nodes: tunnels, peers, networks and this node are written before
    /// any slot points at them; a node that disappears takes its tasks out of the table
    /// before its tunnels go.
    #[test]
    fn remote_backends_and_a_node_leaving() {
        let yaml = |with_n2: bool| {
            let n2 = if with_n2 {
                "      - {addr: 10.0.0.12, node: 192.168.1.11}\n"
            } else {
                ""
            };
            from_yaml(&format!(
                r#"underlay: eth0
node: {{addr: 192.168.1.10}}
node_addrs: [192.168.1.10]
networks: [{{name: ingress, vni: 4096, local_addr: 10.0.0.2}}]
peers: [{{addr: 192.168.1.11}}, {{addr: 192.168.1.12, stock: true}}]
services:
  - name: web
    ports: [{{published: 8080, target: 80}}]
    backends:
      - {{addr: 10.0.0.11}}
      - {{addr: 10.0.0.13, node: 192.168.1.12}}
{n2}endpoints: [{{addr: 10.0.0.11, interface: v1, mac: "02:42:0a:00:00:0b"}}]
"#
            ))
            .unwrap()
        };
        let mut r = Reconciler::new(1 << 16);
        let mut maps = MemMaps::new(1 << 16);
        let ops = r.plan(&desired(&yaml(true), resolve).unwrap()).unwrap();
        apply_checked(&mut maps, &ops);
        assert_eq!(maps.table_backends(8080).len(), 3);
        let ops = r.plan(&desired(&yaml(false), resolve).unwrap()).unwrap();
        apply_checked(&mut maps, &ops);
        assert_eq!(maps.table_backends(8080).len(), 2);
        assert!(ops.iter().any(|o| matches!(o, Op::DelTunnel(_))));
        let kinds: Vec<_> = ops.iter().map(std::mem::discriminant).collect();
        let pos = |o: &Op| {
            kinds
                .iter()
                .position(|k| *k == std::mem::discriminant(o))
                .unwrap()
        };
        assert!(pos(&Op::PutSlots(vec![])) < pos(&Op::DelTunnel(0)));
    }

    #[test]
    fn regions_are_reused_only_after_a_plan() {
        let mut reg = Regions::new(100);
        let a = reg.alloc(60).unwrap();
        reg.release(a, 60);
        assert_eq!(reg.alloc(60), None, "quarantined");
        reg.settle();
        assert_eq!(reg.alloc(100), Some(0), "merged back");
    }

    #[test]
    fn maglev_full_is_an_error_that_records_nothing() {
        let mut r = Reconciler::new(100);
        let e = r
            .plan(&desired(&model(&[("10.0.1.4", ACTIVE)]), resolve).unwrap())
            .unwrap_err();
        assert!(matches!(e, PlanError::MaglevFull { .. }));
        assert!(r.frontends.is_empty());
    }

    /// Where a spread of flows to the published port and the VIP land.
    fn spread(maps: &MemMaps) -> Vec<Option<String>> {
        (0..200u16)
            .flat_map(|sport| {
                [
                    maps.lookup([192, 168, 1, 10], 8080, 6, [1, 2, 3, 4], 1000 + sport),
                    maps.lookup([10, 0, 1, 2], 80, 6, [1, 2, 3, 4], 1000 + sport),
                ]
            })
            .collect()
    }

    #[test]
    fn an_adopting_reconciler_has_nothing_to_do() {
        let mut r = Reconciler::new(1 << 16);
        let mut maps = MemMaps::new(1 << 16);
        let d = desired(
            &model(&[("10.0.1.4", ACTIVE), ("10.0.1.5", "draining")]),
            resolve,
        )
        .unwrap();
        apply_checked(&mut maps, &r.plan(&d).unwrap());
        let mut adopted = Reconciler::adopt(&maps.snapshot(), &r.names(), 1 << 16);
        assert_eq!(adopted.plan(&d).unwrap(), vec![]);
        assert_eq!(adopted.names(), r.names());
    }

    /// An agent killed after any number of a plan's writes: the next agent adopts the
    /// maps as they are (with the names saved before the writes) and converges, every
    /// single write keeping the maps consistent, to what the full plan gives.
    #[test]
    fn adopting_a_plan_cut_short_converges() {
        let before = model(&[
            ("10.0.1.4", ACTIVE),
            ("10.0.1.5", ACTIVE),
            ("10.0.1.6", ACTIVE),
        ]);
        let after = model(&[
            ("10.0.1.4", ACTIVE),
            ("10.0.1.6", "draining"),
            ("10.0.1.7", ACTIVE),
            ("10.0.1.8", ACTIVE),
        ]);
        let (d1, d2) = (
            desired(&before, resolve).unwrap(),
            desired(&after, resolve).unwrap(),
        );
        let mut full = MemMaps::new(1 << 16);
        let mut r = Reconciler::new(1 << 16);
        apply_checked(&mut full, &r.plan(&d1).unwrap());
        let ops = r.plan(&d2).unwrap();
        apply_checked(&mut full, &ops);
        for cut in 0..=ops.len() {
            let mut maps = MemMaps::new(1 << 16);
            let mut r = Reconciler::new(1 << 16);
            apply_checked(&mut maps, &r.plan(&d1).unwrap());
            let ops = r.plan(&d2).unwrap();
            let names = r.names();
            apply_checked(&mut maps, &ops[..cut]);
            let mut adopted = Reconciler::adopt(&maps.snapshot(), &names, 1 << 16);
            apply_checked(&mut maps, &adopted.plan(&d2).unwrap());
            assert_eq!(spread(&maps), spread(&full), "cut after {cut} ops");
            assert_eq!(maps.backend_state("10.0.1.6"), Some(BackendState::Draining));
            assert_eq!(adopted.plan(&d2).unwrap(), vec![], "converged");
        }
    }

    #[test]
    fn adopting_without_names_replaces_groups_and_never_reuses_ids() {
        let mut r = Reconciler::new(1 << 16);
        let mut maps = MemMaps::new(1 << 16);
        let d = desired(&model(&[("10.0.1.4", ACTIVE)]), resolve).unwrap();
        apply_checked(&mut maps, &r.plan(&d).unwrap());
        let old_ids: BTreeSet<u32> = maps.snapshot().backends.keys().copied().collect();
        let mut adopted = Reconciler::adopt(&maps.snapshot(), &Names::default(), 1 << 16);
        apply_checked(&mut maps, &adopted.plan(&d).unwrap());
        let snap = maps.snapshot();
        assert_eq!(snap.services.len(), 1, "the unnamed group was removed");
        assert!(snap.backends.keys().all(|id| !old_ids.contains(id)));
        assert_eq!(
            maps.lookup([192, 168, 1, 10], 8080, 6, [1, 2, 3, 4], 5)
                .as_deref(),
            Some("10.0.1.4:80")
        );
    }
}
