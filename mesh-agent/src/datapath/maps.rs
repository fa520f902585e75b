//! Carrying out a plan: [`MapWriter`] over the loaded maps, and [`MemMaps`], an
//! in-memory stand-in with the kernel's lookup logic in miniature, for unit tests of
//! the planner.

use std::collections::{BTreeMap, BTreeSet};

use aya::maps::{Array, HashMap, MapData};
use mesh_common::{
    lb::maglev_slot,
    lb::{
        Backend, BackendState, Endpoint, EndpointIdle, Frontend, FrontendKey, Local, Network,
        NodeAddrFlags, Service, TaskPort, Tunnel,
    },
};

use crate::{
    datapath::loader::Datapath,
    plan::{Op, Snapshot},
    MeshError,
};

/// Something that can carry out one [`Op`].
pub trait MapWriter {
    fn write(&mut self, op: &Op) -> Result<(), MeshError>;

    fn write_all(&mut self, ops: &[Op]) -> Result<usize, MeshError> {
        let mut n = 0;
        for op in ops {
            self.write(op)?;
            n += op.writes();
        }
        Ok(n)
    }
}

fn map_err(map: &'static str) -> impl Fn(aya::maps::MapError) -> MeshError {
    move |source| MeshError::Map { map, source }
}

impl Datapath {
    fn hash_map<K: aya::Pod, V: aya::Pod>(
        &mut self,
        name: &'static str,
    ) -> Result<HashMap<&mut MapData, K, V>, MeshError> {
        let map = self.ebpf_mut().map_mut(name).ok_or(MeshError::Map {
            map: name,
            source: aya::maps::MapError::InvalidName { name: name.into() },
        })?;
        HashMap::try_from(map).map_err(map_err(name))
    }

    fn array<V: aya::Pod>(
        &mut self,
        name: &'static str,
    ) -> Result<Array<&mut MapData, V>, MeshError> {
        let map = self.ebpf_mut().map_mut(name).ok_or(MeshError::Map {
            map: name,
            source: aya::maps::MapError::InvalidName { name: name.into() },
        })?;
        Array::try_from(map).map_err(map_err(name))
    }

    fn remove<K: aya::Pod, V: aya::Pod>(
        &mut self,
        name: &'static str,
        k: &K,
    ) -> Result<(), MeshError> {
        match self.hash_map::<K, V>(name)?.remove(k) {
            // Already gone is what we wanted.
            Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            r => r.map_err(map_err(name)),
        }
    }
}

impl Datapath {
    /// Puts the network namespace with `cookie` in the socket programs' scope as `kind`
    /// (`NETNS_HOST`, `NETNS_CONTAINER`), or takes it out (`None`).
    pub fn scope_netns(&mut self, cookie: u64, kind: Option<u32>) -> Result<(), MeshError> {
        let name = mesh_common::maps::NETNS.name;
        match kind {
            Some(k) => self
                .hash_map::<u64, u32>(name)?
                .insert(cookie, k, 0)
                .map_err(map_err(name)),
            None => self.remove::<u64, u32>(name, &cookie),
        }
    }

    /// The namespaces in the socket programs' scope (cookie -> kind).
    pub fn scoped_netns(&mut self) -> Result<BTreeMap<u64, u32>, MeshError> {
        self.entries(mesh_common::maps::NETNS.name)
    }
}

/// Where the load-balancing maps are read from: the loaded object's, or the pins of a
/// running (or departed) agent, which is how meshctl reads them.
trait MapSource {
    fn entries<K: aya::Pod + Ord, V: aya::Pod>(
        &mut self,
        name: &'static str,
    ) -> Result<BTreeMap<K, V>, MeshError>;
    fn slots<V: aya::Pod>(
        &mut self,
        name: &'static str,
        range: std::ops::Range<u32>,
    ) -> Result<Vec<V>, MeshError>;
}

impl MapSource for Datapath {
    fn entries<K: aya::Pod + Ord, V: aya::Pod>(
        &mut self,
        name: &'static str,
    ) -> Result<BTreeMap<K, V>, MeshError> {
        let map = self.hash_map::<K, V>(name)?;
        map.iter().map(|r| r.map_err(map_err(name))).collect()
    }

    fn slots<V: aya::Pod>(
        &mut self,
        name: &'static str,
        range: std::ops::Range<u32>,
    ) -> Result<Vec<V>, MeshError> {
        let arr = self.array::<V>(name)?;
        range
            .map(|i| arr.get(&i, 0).map_err(map_err(name)))
            .collect()
    }
}

/// The maps pinned under a directory.
struct Pinned<'a>(&'a std::path::Path);

impl Pinned<'_> {
    fn open(&self, name: &'static str) -> Result<MapData, MeshError> {
        let path = self.0.join(name);
        if !path.exists() {
            return Err(MeshError::NotPinned {
                path: self.0.to_path_buf(),
            });
        }
        MapData::from_pin(&path).map_err(map_err(name))
    }
}

impl MapSource for Pinned<'_> {
    fn entries<K: aya::Pod + Ord, V: aya::Pod>(
        &mut self,
        name: &'static str,
    ) -> Result<BTreeMap<K, V>, MeshError> {
        let map: HashMap<MapData, K, V> =
            HashMap::try_from(aya::maps::Map::HashMap(self.open(name)?)).map_err(map_err(name))?;
        map.iter().map(|r| r.map_err(map_err(name))).collect()
    }

    fn slots<V: aya::Pod>(
        &mut self,
        name: &'static str,
        range: std::ops::Range<u32>,
    ) -> Result<Vec<V>, MeshError> {
        let arr: Array<MapData, V> =
            Array::try_from(aya::maps::Map::Array(self.open(name)?)).map_err(map_err(name))?;
        range
            .map(|i| arr.get(&i, 0).map_err(map_err(name)))
            .collect()
    }
}

/// Reads back what the load-balancing maps hold.
fn snapshot_from(src: &mut impl MapSource) -> Result<Snapshot, MeshError> {
    let services: BTreeMap<u32, Service> = src.entries(mesh_common::maps::SERVICES.name)?;
    let mut tables = BTreeMap::new();
    for (id, s) in &services {
        tables.insert(
            *id,
            src.slots::<u32>(
                mesh_common::maps::MAGLEV.name,
                s.maglev_off..s.maglev_off + s.maglev_size,
            )?,
        );
    }
    let local = src
        .slots::<Local>(mesh_common::maps::LOCAL.name, 0..1)?
        .pop()
        .filter(|l| *l != Local::default());
    Ok(Snapshot {
        local,
        peers: src.entries(mesh_common::maps::PEERS.name)?,
        networks: src.entries(mesh_common::maps::NETWORKS.name)?,
        tunnels: src.entries(mesh_common::maps::TUNNELS.name)?,
        node_addrs: src
            .entries::<u32, NodeAddrFlags>(mesh_common::maps::NODE_ADDRS.name)?
            .into_keys()
            .collect(),
        endpoints: src.entries(mesh_common::maps::ENDPOINTS.name)?,
        // (Pins from before this map have none: their tasks get the defaults until
        // the first plan writes them.)
        endpoint_idle: src
            .entries(mesh_common::maps::ENDPOINT_IDLE.name)
            .unwrap_or_default(),
        frontends: src.entries(mesh_common::maps::FRONTENDS.name)?,
        services,
        backends: src.entries(mesh_common::maps::BACKENDS.name)?,
        tables,
    })
}

impl Datapath {
    /// Reads back what the load-balancing maps hold (what a restarted agent adopts).
    pub fn read_snapshot(&mut self) -> Result<Snapshot, MeshError> {
        snapshot_from(self)
    }
}

/// What the load-balancing maps pinned under `dir` hold.
pub fn read_pinned(dir: &std::path::Path) -> Result<Snapshot, MeshError> {
    snapshot_from(&mut Pinned(dir))
}

impl MapWriter for Datapath {
    fn write(&mut self, op: &Op) -> Result<(), MeshError> {
        match op {
            Op::PutNodeAddr(a) => self
                .hash_map::<u32, NodeAddrFlags>(mesh_common::maps::NODE_ADDRS.name)?
                .insert(a, 0, 0)
                .map_err(map_err(mesh_common::maps::NODE_ADDRS.name)),
            Op::PutEndpoint(a, e) => self
                .hash_map::<u32, Endpoint>(mesh_common::maps::ENDPOINTS.name)?
                .insert(a, e, 0)
                .map_err(map_err(mesh_common::maps::ENDPOINTS.name)),
            Op::PutEndpointIdle(a, t) => self
                .hash_map::<TaskPort, EndpointIdle>(mesh_common::maps::ENDPOINT_IDLE.name)?
                .insert(a, t, 0)
                .map_err(map_err(mesh_common::maps::ENDPOINT_IDLE.name)),
            Op::PutBackend(id, b) => self
                .hash_map::<u32, Backend>(mesh_common::maps::BACKENDS.name)?
                .insert(id, b, 0)
                .map_err(map_err(mesh_common::maps::BACKENDS.name)),
            Op::PutSlots(slots) => {
                let mut arr = self.array::<u32>(mesh_common::maps::MAGLEV.name)?;
                for (i, id) in slots {
                    arr.set(*i, id, 0)
                        .map_err(map_err(mesh_common::maps::MAGLEV.name))?;
                }
                Ok(())
            }
            Op::PutService(id, s) => self
                .hash_map::<u32, Service>(mesh_common::maps::SERVICES.name)?
                .insert(id, s, 0)
                .map_err(map_err(mesh_common::maps::SERVICES.name)),
            Op::PutFrontend(k, f) => self
                .hash_map::<FrontendKey, Frontend>(mesh_common::maps::FRONTENDS.name)?
                .insert(k, f, 0)
                .map_err(map_err(mesh_common::maps::FRONTENDS.name)),
            Op::DelFrontend(k) => {
                self.remove::<FrontendKey, Frontend>(mesh_common::maps::FRONTENDS.name, k)
            }
            Op::DelService(id) => self.remove::<u32, Service>(mesh_common::maps::SERVICES.name, id),
            Op::DelBackend(id) => self.remove::<u32, Backend>(mesh_common::maps::BACKENDS.name, id),
            Op::DelEndpoint(a) => {
                self.remove::<u32, Endpoint>(mesh_common::maps::ENDPOINTS.name, a)
            }
            Op::DelEndpointIdle(a) => {
                self.remove::<TaskPort, EndpointIdle>(mesh_common::maps::ENDPOINT_IDLE.name, a)
            }
            Op::DelNodeAddr(a) => {
                self.remove::<u32, NodeAddrFlags>(mesh_common::maps::NODE_ADDRS.name, a)
            }
            Op::PutLocal(l) => {
                let mut arr = self.array::<Local>(mesh_common::maps::LOCAL.name)?;
                arr.set(0, l, 0)
                    .map_err(map_err(mesh_common::maps::LOCAL.name))
            }
            Op::PutPeer(a, f) => self
                .hash_map::<u32, u32>(mesh_common::maps::PEERS.name)?
                .insert(a, f, 0)
                .map_err(map_err(mesh_common::maps::PEERS.name)),
            Op::PutNetwork(vni, n) => self
                .hash_map::<u32, Network>(mesh_common::maps::NETWORKS.name)?
                .insert(vni, n, 0)
                .map_err(map_err(mesh_common::maps::NETWORKS.name)),
            Op::PutTunnel(a, t) => self
                .hash_map::<u32, Tunnel>(mesh_common::maps::TUNNELS.name)?
                .insert(a, t, 0)
                .map_err(map_err(mesh_common::maps::TUNNELS.name)),
            Op::DelTunnel(a) => self.remove::<u32, Tunnel>(mesh_common::maps::TUNNELS.name, a),
            Op::DelNetwork(vni) => {
                self.remove::<u32, Network>(mesh_common::maps::NETWORKS.name, vni)
            }
            Op::DelPeer(a) => self.remove::<u32, u32>(mesh_common::maps::PEERS.name, a),
        }
    }
}

/// The maps in memory, for tests.
#[derive(Debug, Default)]
pub struct MemMaps {
    local: Option<Local>,
    peers: BTreeMap<u32, u32>,
    nets: BTreeMap<u32, Network>,
    tun: BTreeMap<u32, Tunnel>,
    node: BTreeSet<u32>,
    ep: BTreeMap<u32, Endpoint>,
    ep_idle: BTreeMap<TaskPort, EndpointIdle>,
    be: BTreeMap<u32, Backend>,
    maglev: Vec<u32>,
    svc: BTreeMap<u32, Service>,
    fe: BTreeMap<FrontendKey, Frontend>,
}

fn show(addr: u32, port: u16) -> String {
    let a = addr.to_ne_bytes();
    format!("{}.{}.{}.{}:{}", a[0], a[1], a[2], a[3], u16::from_be(port))
}

impl MemMaps {
    pub fn new(slots: u32) -> Self {
        MemMaps {
            maglev: vec![0; slots as usize],
            ..Default::default()
        }
    }

    pub fn apply(&mut self, op: &Op) {
        match op {
            Op::PutNodeAddr(a) => {
                self.node.insert(*a);
            }
            Op::PutEndpoint(a, e) => {
                self.ep.insert(*a, *e);
            }
            Op::PutEndpointIdle(a, t) => {
                self.ep_idle.insert(*a, *t);
            }
            Op::PutBackend(id, b) => {
                self.be.insert(*id, *b);
            }
            Op::PutSlots(s) => s.iter().for_each(|(i, id)| self.maglev[*i as usize] = *id),
            Op::PutService(id, s) => {
                self.svc.insert(*id, *s);
            }
            Op::PutFrontend(k, f) => {
                self.fe.insert(*k, *f);
            }
            Op::DelFrontend(k) => {
                self.fe.remove(k);
            }
            Op::DelService(id) => {
                self.svc.remove(id);
            }
            Op::DelBackend(id) => {
                self.be.remove(id);
            }
            Op::DelEndpoint(a) => {
                self.ep.remove(a);
            }
            Op::DelEndpointIdle(a) => {
                self.ep_idle.remove(a);
            }
            Op::DelNodeAddr(a) => {
                self.node.remove(a);
            }
            Op::PutLocal(l) => self.local = Some(*l),
            Op::PutPeer(a, f) => {
                self.peers.insert(*a, *f);
            }
            Op::PutNetwork(v, n) => {
                self.nets.insert(*v, *n);
            }
            Op::PutTunnel(a, t) => {
                self.tun.insert(*a, *t);
            }
            Op::DelTunnel(a) => {
                self.tun.remove(a);
            }
            Op::DelNetwork(v) => {
                self.nets.remove(v);
            }
            Op::DelPeer(a) => {
                self.peers.remove(a);
            }
        }
    }

    fn frontend(&self, daddr: u32, dport: u16, proto: u8) -> Option<Frontend> {
        let mut k = FrontendKey {
            addr: daddr,
            port: dport.to_be(),
            proto,
            _pad: 0,
        };
        if let Some(f) = self.fe.get(&k) {
            return Some(*f);
        }
        if !self.node.contains(&daddr) {
            return None;
        }
        k.addr = 0;
        self.fe.get(&k).copied()
    }

    /// The backend ("a.b.c.d:port") a new flow gets, as the kernel would choose it.
    pub fn lookup(
        &self,
        daddr: [u8; 4],
        dport: u16,
        proto: u8,
        saddr: [u8; 4],
        sport: u16,
    ) -> Option<String> {
        let (d, s) = (u32::from_ne_bytes(daddr), u32::from_ne_bytes(saddr));
        let fe = self.frontend(d, dport, proto)?;
        let svc = self.svc.get(&fe.svc_id)?;
        if svc.active == 0 || svc.maglev_size == 0 {
            return None;
        }
        let slot = maglev_slot(svc, s, d, sport.to_be(), dport.to_be(), proto, 0);
        let id = self.maglev[(svc.maglev_off + slot) as usize];
        let be = self.be.get(&id)?;
        Some(show(be.addr, be.port))
    }

    /// Backends in the table behind the "any node address" frontend on `port`/tcp.
    pub fn table_backends(&self, port: u16) -> BTreeSet<String> {
        let k = FrontendKey {
            addr: 0,
            port: port.to_be(),
            proto: 6,
            _pad: 0,
        };
        let Some(svc) = self.fe.get(&k).and_then(|f| self.svc.get(&f.svc_id)) else {
            return BTreeSet::new();
        };
        let r = svc.maglev_off as usize..(svc.maglev_off + svc.maglev_size) as usize;
        self.maglev[r]
            .iter()
            .filter_map(|id| self.be.get(id))
            .map(|b| show(b.addr, b.port))
            .collect()
    }

    pub fn backend_state(&self, addr: &str) -> Option<BackendState> {
        let a: std::net::Ipv4Addr = addr.parse().ok()?;
        let a = u32::from_ne_bytes(a.octets());
        self.be
            .values()
            .find(|b| b.addr == a)
            .and_then(|b| BackendState::from_u8(b.state))
    }

    /// What a restarted agent would read back from these maps.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            local: self.local,
            peers: self.peers.clone(),
            networks: self.nets.clone(),
            tunnels: self.tun.clone(),
            node_addrs: self.node.clone(),
            endpoints: self.ep.clone(),
            endpoint_idle: self.ep_idle.clone(),
            frontends: self.fe.clone(),
            services: self.svc.clone(),
            backends: self.be.clone(),
            tables: self
                .svc
                .iter()
                .map(|(id, s)| {
                    let r = s.maglev_off as usize..(s.maglev_off + s.maglev_size) as usize;
                    (*id, self.maglev[r].to_vec())
                })
                .collect(),
        }
    }

    /// Every entry, for comparing two sets of maps.
    pub fn same_as(&self, other: &MemMaps) -> bool {
        self.snapshot() == other.snapshot()
    }

    pub fn is_empty(&self) -> bool {
        self.node.is_empty()
            && self.ep.is_empty()
            && self.be.is_empty()
            && self.svc.is_empty()
            && self.fe.is_empty()
    }

    /// What the kernel relies on at every instant: every frontend's service exists, and
    /// every slot of a live table names an existing, active backend of that service
    /// whose task has an endpoint.
    pub fn check_consistent(&self) -> Result<(), String> {
        for (k, f) in &self.fe {
            let svc = self
                .svc
                .get(&f.svc_id)
                .ok_or(format!("frontend {k:?} -> missing service {}", f.svc_id))?;
            if svc.maglev_size == 0 {
                continue;
            }
            for i in svc.maglev_off..svc.maglev_off + svc.maglev_size {
                let id = self.maglev[i as usize];
                let be = self
                    .be
                    .get(&id)
                    .ok_or(format!("slot {i} -> missing backend {id}"))?;
                if be.state != BackendState::Active as u8 {
                    return Err(format!("slot {i} -> backend {id} in state {}", be.state));
                }
                if be.svc_id != f.svc_id {
                    return Err(format!("slot {i} -> backend {id} of service {}", be.svc_id));
                }
                if !self.ep.contains_key(&be.addr) {
                    // On another node: its tunnel, peer and network must all be there.
                    let t = self.tun.get(&be.addr).ok_or(format!(
                        "slot {i} -> backend {id} with neither endpoint nor tunnel"
                    ))?;
                    if !self.peers.contains_key(&t.node)
                        || !self.nets.contains_key(&t.vni)
                        || self.local.is_none()
                    {
                        return Err(format!(
                            "slot {i} -> backend {id} tunnel to an unknown peer/network"
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}
