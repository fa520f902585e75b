//! What meshctl shows, computed from what the maps hold (read back from pins, so it works
//! while the agent is down): services with their frontends and backends, live flows,
//! Maglev spreads. The views are pure functions of a [`Snapshot`], the saved names and
//! the counters, unit-tested against maps the planner filled.

use std::{collections::BTreeMap, net::Ipv4Addr, path::Path};

use mesh_common::{
    ct::{CtEntry, CtKey, CtState, CT_OVERLAY, CT_REVERSE, CT_TUNNEL},
    lb::{BackendState, FE_HOST, FE_INGRESS, FE_VIP, SVC_AFFINITY},
    stats::BackendCounter,
};
use serde::Serialize;

use crate::{
    agent::state::{agent_status, names_path, read_names},
    plan::{Names, Snapshot},
    MeshError,
};

fn ip(a: u32) -> Ipv4Addr {
    Ipv4Addr::from(a.to_ne_bytes())
}

fn proto_name(p: u8) -> &'static str {
    match p {
        mesh_common::lb::PROTO_TCP => "tcp",
        mesh_common::lb::PROTO_UDP => "udp",
        0 => "any",
        _ => "other",
    }
}

pub fn services_pinned(state_dir: &Path, bpffs: &Path) -> Result<Vec<ServiceView>, MeshError> {
    let snap = crate::datapath::maps::read_pinned(bpffs)?;
    let names = read_names(&names_path(state_dir, bpffs));
    let traffic = crate::datapath::stats::backends_pinned(bpffs).unwrap_or_default();
    let tasks = agent_status(state_dir, bpffs)
        .map(|s| s.tasks)
        .unwrap_or_default();
    Ok(services(&snap, &names, &traffic, &tasks))
}

/// One service's drift between what the agent wrote and what the maps hold.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Drift {
    pub service: String,
    /// Backends the agent wrote that the maps no longer hold.
    pub missing: Vec<String>,
    /// Backends in the maps the agent did not write.
    pub extra: Vec<String>,
}

/// Compares the agent's record (`applied`) with the services the maps hold.
pub fn drift(applied: &BTreeMap<String, Vec<String>>, maps: &[ServiceView]) -> Vec<Drift> {
    let held: BTreeMap<&str, std::collections::BTreeSet<String>> = maps
        .iter()
        .map(|s| {
            (
                s.name.as_str(),
                s.backends
                    .iter()
                    .map(|b| format!("{}:{}", b.addr, b.port.unwrap_or(0)))
                    .collect(),
            )
        })
        .collect();
    let mut out = Vec::new();
    let names: std::collections::BTreeSet<&str> = applied
        .keys()
        .map(String::as_str)
        .chain(held.keys().copied())
        .collect();
    for name in names {
        let want: std::collections::BTreeSet<String> =
            applied.get(name).into_iter().flatten().cloned().collect();
        let have = held.get(name).cloned().unwrap_or_default();
        let missing: Vec<String> = want.difference(&have).cloned().collect();
        let extra: Vec<String> = have.difference(&want).cloned().collect();
        if !missing.is_empty() || !extra.is_empty() {
            out.push(Drift {
                service: name.to_string(),
                missing,
                extra,
            });
        }
    }
    out
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FrontendView {
    /// `None`: every address of this node (a published port).
    pub addr: Option<Ipv4Addr>,
    /// `None`: every port (a VIP on Docker's overlay).
    pub port: Option<u16>,
    pub proto: &'static str,
    /// ingress, host or vip.
    pub kind: &'static str,
}

impl std::fmt::Display for FrontendView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let a = self.addr.map_or("*".to_string(), |a| a.to_string());
        let p = self.port.map_or("*".to_string(), |p| p.to_string());
        write!(f, "{a}:{p}/{} ({})", self.proto, self.kind)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BackendView {
    pub id: u32,
    pub addr: Ipv4Addr,
    /// Docker's name of the task, where the agent knows it.
    pub task: Option<String>,
    /// `None`: the port the client dialled (every-port VIP).
    pub port: Option<u16>,
    /// active, draining or gone.
    pub state: &'static str,
    /// "local" (a task on this node), "node <addr>" (through the tunnel) or "unknown".
    pub at: String,
    /// Maglev slots it holds (its share of new flows).
    pub slots: usize,
    pub packets: u64,
    pub bytes: u64,
    pub flows: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServiceView {
    pub id: u32,
    /// The agent's name for the load-balancing group (`web/tcp/8080`, `api@net/vip`), or
    /// `#<id>` without the names file.
    pub name: String,
    pub frontends: Vec<FrontendView>,
    pub backends: Vec<BackendView>,
    pub table_size: u32,
    pub affinity: bool,
    pub tcp_idle_s: u32,
    pub udp_idle_s: u32,
}

impl ServiceView {
    /// Whether `query` names this service: its whole name, or the Docker service it
    /// belongs to (`web` for `web/tcp/8080`, `api` for `api@appnet/vip`).
    pub fn matches(&self, query: &str) -> bool {
        self.name == query || docker_service(&self.name) == query
    }
}

/// The Docker service a group name belongs to.
pub fn docker_service(group: &str) -> &str {
    group.split(['/', '@']).next().unwrap_or(group)
}

fn state_name(s: u8) -> &'static str {
    match BackendState::from_u8(s) {
        Some(BackendState::Active) => "active",
        Some(BackendState::Draining) => "draining",
        Some(BackendState::Gone) => "gone",
        None => "?",
    }
}

/// Every service in `snap`, named from `names`, with per-backend traffic from `traffic`
/// and task names (by address) from `tasks`.
pub fn services(
    snap: &Snapshot,
    names: &Names,
    traffic: &BTreeMap<u32, BackendCounter>,
    tasks: &BTreeMap<String, String>,
) -> Vec<ServiceView> {
    let mut out: Vec<ServiceView> = snap
        .services
        .iter()
        .map(|(id, s)| {
            let table = snap.tables.get(id).cloned().unwrap_or_default();
            let mut slots: BTreeMap<u32, usize> = BTreeMap::new();
            for b in table {
                if b != 0 {
                    *slots.entry(b).or_default() += 1;
                }
            }
            let frontends = snap
                .frontends
                .iter()
                .filter(|(_, fe)| fe.svc_id == *id)
                .map(|(k, fe)| FrontendView {
                    addr: (k.addr != 0).then(|| ip(k.addr)),
                    port: (k.port != 0).then(|| u16::from_be(k.port)),
                    proto: proto_name(k.proto),
                    kind: if fe.flags & FE_VIP != 0 {
                        "vip"
                    } else if fe.flags & FE_HOST != 0 {
                        "host"
                    } else if fe.flags & FE_INGRESS != 0 {
                        "ingress"
                    } else {
                        "?"
                    },
                })
                .collect();
            let backends = snap
                .backends
                .iter()
                .filter(|(_, b)| b.svc_id == *id)
                .map(|(bid, b)| {
                    let at = if snap.endpoints.contains_key(&b.addr) {
                        "local".to_string()
                    } else if let Some(t) = snap.tunnels.get(&b.addr) {
                        format!("node {}", ip(t.node))
                    } else {
                        "unknown".to_string()
                    };
                    let c = traffic.get(bid).copied().unwrap_or_default();
                    BackendView {
                        id: *bid,
                        addr: ip(b.addr),
                        task: tasks.get(&ip(b.addr).to_string()).cloned(),
                        port: (b.port != 0).then(|| u16::from_be(b.port)),
                        state: state_name(b.state),
                        at,
                        slots: slots.get(bid).copied().unwrap_or(0),
                        packets: c.packets,
                        bytes: c.bytes,
                        flows: c.flows,
                    }
                })
                .collect();
            ServiceView {
                id: *id,
                name: names
                    .groups
                    .get(id)
                    .cloned()
                    .unwrap_or_else(|| format!("#{id}")),
                frontends,
                backends,
                table_size: s.maglev_size,
                affinity: s.flags & SVC_AFFINITY != 0,
                tcp_idle_s: s.tcp_idle_s,
                udp_idle_s: s.udp_idle_s,
            }
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// A live flow, from its forward conntrack entry.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FlowView {
    pub proto: &'static str,
    pub client: String,
    /// What the client reached (a published port, a VIP).
    pub frontend: String,
    /// Where it goes (the backend's delivery address and port).
    pub backend: String,
    pub backend_id: u32,
    pub service: String,
    pub state: &'static str,
    pub age_s: f64,
    pub idle_s: f64,
    /// "overlay" for a VIP flow on Docker's overlay, "" otherwise.
    pub path: &'static str,
}

/// The flows in conntrack `entries` (forward entries only: one row per flow), with ages
/// against `now_ns` (CLOCK_MONOTONIC, the programs' clock).
pub fn flows(entries: &[(CtKey, CtEntry)], now_ns: u64, names: &Names) -> Vec<FlowView> {
    let mut out: Vec<FlowView> = entries
        .iter()
        .filter(|(_, e)| e.flags & (CT_REVERSE | CT_TUNNEL) == 0 && e.backend_id != 0)
        .map(|(k, e)| {
            let secs = |t: u64| now_ns.saturating_sub(t) as f64 / 1e9;
            FlowView {
                proto: proto_name(k.proto),
                client: format!("{}:{}", ip(k.saddr), u16::from_be(k.sport)),
                frontend: format!("{}:{}", ip(k.daddr), u16::from_be(k.dport)),
                backend: format!("{}:{}", ip(e.nat_addr), u16::from_be(e.nat_port)),
                backend_id: e.backend_id,
                service: names
                    .groups
                    .get(&e.svc_id)
                    .cloned()
                    .unwrap_or_else(|| format!("#{}", e.svc_id)),
                state: CtState::from_u8(e.state).map_or("?", |s| s.name()),
                age_s: (secs(e.created_ns) * 10.0).round() / 10.0,
                idle_s: (secs(e.last_seen_ns) * 10.0).round() / 10.0,
                path: if e.flags & CT_OVERLAY != 0 {
                    "overlay"
                } else {
                    ""
                },
            }
        })
        .collect();
    out.sort_by(|a, b| (&a.service, &a.client).cmp(&(&b.service, &b.client)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        datapath::maps::MemMaps,
        model::{desired, from_yaml},
        plan::Reconciler,
    };

    const MODEL: &str = "node_addrs: [192.168.1.10]
services:
  - name: web
    ports: [{published: 8080, target: 80}]
    backends:
      - {addr: 10.0.0.4}
      - {addr: 10.0.0.5, state: draining}
  - name: api@appnet
    vips: [10.0.1.2]
    every_port: true
    backends: [{addr: 10.0.0.4}]
endpoints:
  - {addr: 10.0.0.4, interface: t1, mac: '02:42:0a:00:00:04'}
  - {addr: 10.0.0.5, interface: t2, mac: '02:42:0a:00:00:05'}
";

    fn filled() -> (Snapshot, Names) {
        let d = desired(&from_yaml(MODEL).unwrap(), |_| Ok((7, [0; 6]))).unwrap();
        let mut r = Reconciler::new(1 << 16);
        let mut m = MemMaps::new(1 << 16);
        for op in r.plan(&d).unwrap() {
            m.apply(&op);
        }
        (m.snapshot(), r.names())
    }

    #[test]
    fn services_show_frontends_backends_and_their_share() {
        let (snap, names) = filled();
        let tasks = BTreeMap::from([("10.0.0.4".to_string(), "web.1.abc".to_string())]);
        let v = services(&snap, &names, &BTreeMap::new(), &tasks);
        let web = v.iter().find(|s| s.name == "web/tcp/80").expect("web");
        assert!(web.matches("web") && !web.matches("we"));
        assert_eq!(web.frontends.len(), 1);
        assert_eq!(web.frontends[0].to_string(), "*:8080/tcp (ingress)");
        let states: Vec<(String, &str, usize)> = web
            .backends
            .iter()
            .map(|b| (b.addr.to_string(), b.state, b.slots))
            .collect();
        assert_eq!(
            states,
            vec![
                ("10.0.0.4".into(), "active", web.table_size as usize),
                ("10.0.0.5".into(), "draining", 0)
            ]
        );
        assert!(web.backends.iter().all(|b| b.at == "local"));
        assert_eq!(web.backends[0].task.as_deref(), Some("web.1.abc"));
        assert_eq!(web.backends[1].task, None);
        let api = v.iter().find(|s| s.matches("api")).expect("api");
        assert_eq!(api.frontends[0].to_string(), "10.0.1.2:*/any (vip)");
        assert_eq!(api.backends[0].port, None, "every port");
    }

    #[test]
    fn flows_are_forward_entries_with_their_ages() {
        let (_, names) = filled();
        let fwd = CtEntry {
            created_ns: 1_000_000_000,
            last_seen_ns: 4_000_000_000,
            backend_id: 1,
            svc_id: *names.groups.keys().next().unwrap(),
            nat_addr: u32::from_ne_bytes([10, 0, 0, 4]),
            nat_port: 80u16.to_be(),
            state: CtState::Established as u8,
            ..Default::default()
        };
        let key = CtKey::new(
            u32::from_ne_bytes([10, 9, 0, 1]),
            u32::from_ne_bytes([192, 168, 1, 10]),
            40000u16.to_be(),
            8080u16.to_be(),
            6,
        );
        let rev = CtEntry {
            flags: CT_REVERSE,
            ..fwd
        };
        let v = flows(&[(key, fwd), (key, rev)], 5_000_000_000, &names);
        assert_eq!(v.len(), 1, "one row per flow");
        assert_eq!(v[0].client, "10.9.0.1:40000");
        assert_eq!(v[0].frontend, "192.168.1.10:8080");
        assert_eq!(v[0].backend, "10.0.0.4:80");
        assert_eq!((v[0].age_s, v[0].idle_s), (4.0, 1.0));
        assert_eq!(v[0].state, "established");
    }

    #[test]
    fn drift_names_what_went_missing_and_what_appeared() {
        let applied = BTreeMap::from([(
            "web/tcp/80".to_string(),
            vec!["10.0.0.4:80".to_string(), "10.0.0.5:80".to_string()],
        )]);
        let (snap, names) = tests_fill();
        let v = services(&snap, &names, &BTreeMap::new(), &BTreeMap::new());
        let d = drift(&applied, &v);
        assert!(d.iter().all(|x| x.service != "web/tcp/80"), "{d:?}");
        let mut less = applied.clone();
        less.get_mut("web/tcp/80").unwrap().pop();
        let d = drift(&less, &v);
        let web = d.iter().find(|x| x.service == "web/tcp/80").unwrap();
        assert_eq!(web.extra, vec!["10.0.0.5:80".to_string()]);
    }

    fn tests_fill() -> (Snapshot, Names) {
        use crate::{datapath::maps::MemMaps, model::desired, plan::Reconciler};
        let m = crate::model::from_yaml(
            "node_addrs: [192.168.1.10]
services:
  - name: web
    ports: [{published: 8080, target: 80}]
    backends: [{addr: 10.0.0.4}, {addr: 10.0.0.5}]
endpoints:
  - {addr: 10.0.0.4, interface: t1, mac: '02:42:0a:00:00:04'}
  - {addr: 10.0.0.5, interface: t2, mac: '02:42:0a:00:00:05'}
",
        )
        .unwrap();
        let d = desired(&m, |_| Ok((7, [0; 6]))).unwrap();
        let mut r = Reconciler::new(1 << 16);
        let mut mm = MemMaps::new(1 << 16);
        for op in r.plan(&d).unwrap() {
            mm.apply(&op);
        }
        (mm.snapshot(), r.names())
    }
}
