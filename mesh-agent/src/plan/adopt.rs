//! A restarted agent's record: what the maps hold read back ([`Snapshot`]), what they
//! cannot hold ([`Names`]: group names, id counters), and `adopt`, which rebuilds the
//! reconciler's record from both.

use super::*;
use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    sync::Arc,
};

use mesh_common::lb::{
    Backend, Endpoint, EndpointIdle, Frontend, FrontendKey, Local, Network, Service, TaskPort,
    Tunnel,
};

use crate::model::GroupName;

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
    pub endpoint_idle: BTreeMap<TaskPort, EndpointIdle>,
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
        r.endpoint_idle = snap.endpoint_idle.clone();
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
