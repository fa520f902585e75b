//! The Swarm as every node sees it, and what the mesh makes of it. Pure.
//!
//! The source is Docker's gossiped view of each overlay network (`GET /networks/{id}
//! ?verbose=true`), which every node has, workers included (only managers answer
//! /services and /tasks): per service its VIP on the network, its ports, and the tasks
//! Docker considers up (running, and healthy when they have a HEALTHCHECK), each with its
//! address and the underlay address of its node; plus the network's peers.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use serde::Deserialize;

use crate::model::{
    BackendSpec, Health, Model, NetworkSpec, NodeSpec, PeerSpec, PortSpec, Protocol, PublishMode,
    ServiceSpec,
};

/// One overlay network as this node sees it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NetworkView {
    /// Docker's network id.
    pub id: String,
    pub name: String,
    pub ingress: bool,
    /// One VNI per subnet (`vxlanid_list`), the first subnet's first; empty: unknown.
    pub vnis: Vec<u32>,
    /// This node's own endpoint on the network (ingress-sbox / lb-<name>).
    pub local_addr: Option<Ipv4Addr>,
    pub peers: Vec<Ipv4Addr>,
    pub services: BTreeMap<String, GossipService>,
}

/// A service in a network's verbose inspect output (Docker's field names).
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct GossipService {
    #[serde(rename = "VIP", default)]
    pub vip: String,
    #[serde(rename = "Ports", default)]
    pub ports: Option<Vec<String>>,
    #[serde(rename = "Tasks", default)]
    pub tasks: Option<Vec<GossipTask>>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct GossipTask {
    #[serde(rename = "Name", default)]
    pub name: String,
    #[serde(rename = "EndpointIP", default)]
    pub endpoint_ip: String,
    #[serde(rename = "Info", default)]
    pub info: BTreeMap<String, String>,
}

/// "Target: 80, Publish: 8080" -> (80, 8080).
pub fn parse_port(s: &str) -> Option<(u16, u16)> {
    let mut target = None;
    let mut publish = None;
    for part in s.split(',') {
        let (k, v) = part.split_once(':')?;
        let v: u16 = v.trim().parse().ok()?;
        match k.trim() {
            "Target" => target = Some(v),
            "Publish" => publish = Some(v),
            _ => {}
        }
    }
    Some((target?, publish?))
}

/// Docker's `vxlanid_list` ("4097,4098": one VNI per subnet, in the subnets' order).
/// A list that does not read as VNIs gives none: the network is then skipped whole
/// rather than half known.
pub fn parse_vnis(s: &str) -> Vec<u32> {
    let vnis: Option<Vec<u32>> = s
        .split(',')
        .map(|v| v.trim().parse().ok().filter(|v| *v > 0 && *v < 1 << 24))
        .collect();
    vnis.unwrap_or_default()
}

fn addr(s: &str) -> Option<Ipv4Addr> {
    s.split('/').next()?.parse().ok()
}

/// The model of this node (underlay address `me`, interface `underlay`) from the
/// networks it sees. Tasks on this node are listed as local backends; their endpoints
/// (veths) come from the node's plumbing, not from here. Published ports' protocol is
/// not in the gossiped view: TCP is assumed (a manager's /services knows better).
pub fn model_from(networks: &[NetworkView], me: Ipv4Addr, underlay: &str) -> Model {
    let mut m = Model {
        underlay: Some(underlay.to_string()),
        node_addrs: vec![me],
        node: Some(NodeSpec { addr: me }),
        ..Default::default()
    };
    let peers: BTreeSet<Ipv4Addr> = networks
        .iter()
        .flat_map(|n| n.peers.iter().copied())
        .filter(|p| *p != me)
        .collect();
    m.peers = peers
        .into_iter()
        .map(|addr| PeerSpec { addr, stock: false })
        .collect();
    for n in networks {
        let (Some(&vni), Some(local_addr)) = (n.vnis.first(), n.local_addr) else {
            continue;
        };
        m.networks.push(NetworkSpec {
            name: n.name.clone(),
            vni,
            more_vnis: n.vnis[1..].to_vec(),
            local_addr,
            // The mesh tunnels its own flows on the ingress network only.
            docker: !n.ingress,
        });
    }
    for n in networks {
        if n.vnis.is_empty() || n.local_addr.is_none() {
            continue;
        }
        for (svc_name, s) in &n.services {
            let ports: Vec<(u16, u16)> = s
                .ports
                .iter()
                .flatten()
                .filter_map(|p| parse_port(p))
                .collect();
            let backends: Vec<BackendSpec> = s
                .tasks
                .iter()
                .flatten()
                .filter_map(|t| {
                    let a = addr(&t.endpoint_ip)?;
                    let host = t.info.get("Host IP").and_then(|h| addr(h));
                    Some(BackendSpec {
                        addr: a,
                        state: Health::Active,
                        node: host.filter(|h| *h != me),
                        network: Some(n.name.clone()),
                        task: Some(t.name.clone()).filter(|n| !n.is_empty()),
                    })
                })
                .collect();
            let spec = |name: String, ports: Vec<PortSpec>, vips: Vec<Ipv4Addr>| ServiceSpec {
                name,
                ports,
                vips,
                backends: backends.clone(),
                tcp_idle: None,
                udp_idle: None,
                affinity: false,
                every_port: false,
            };
            if n.ingress {
                // The ingress network carries the published ports. Docker programs each
                // task to take them on its ingress address *at the published port* and
                // redirect to the target port itself: that is where we deliver.
                let p = ports
                    .iter()
                    .map(|(_target, publish)| PortSpec {
                        published: Some(*publish),
                        target: *publish,
                        protocol: Protocol::Tcp,
                        mode: PublishMode::Ingress,
                    })
                    .collect::<Vec<_>>();
                if !p.is_empty() {
                    m.services.push(spec(svc_name.clone(), p, vec![]));
                }
            } else if let Some(vip) = addr(&s.vip) {
                // A user network: the service's VIP there takes every port, as Docker's
                // does (published or not), on to tasks reached over the overlay.
                m.services.push(ServiceSpec {
                    every_port: true,
                    ..spec(format!("{svc_name}@{}", n.name), vec![], vec![vip])
                });
            }
        }
    }
    m
}

/// Where a network's verbose `Containers` lists this node's own endpoint on it: the
/// ingress sandbox's (`<name>-sbox`: an ingress network re-created under another name
/// keeps the pattern) or the network's load balancer's (`lb-<name>`).
pub fn local_endpoint_key(network: &str, ingress: bool) -> String {
    match ingress {
        true => format!("{network}-sbox"),
        false => format!("lb-{network}"),
    }
}

/// Fills in each network's own endpoint address (`local_addr`) where this view lacks it
/// from what earlier views showed (`seen`, updated here; networks no longer listed are
/// forgotten). Docker's verbose inspect now and then leaves an endpoint out (it logs
/// "Inconsistent driver and libnetwork state for endpoint"), and a network without its
/// local endpoint is skipped whole: every published port of the node would go for a
/// resync. The address does not change while the network exists.
pub fn remember_local_addrs(networks: &mut [NetworkView], seen: &mut BTreeMap<String, Ipv4Addr>) {
    seen.retain(|name, _| networks.iter().any(|n| &n.name == name));
    for n in networks {
        match n.local_addr {
            Some(a) => {
                seen.insert(n.name.clone(), a);
            }
            None => n.local_addr = seen.get(&n.name).copied(),
        }
    }
}

/// The data-path port to use: the swarm's when Docker says it, else the flag's, else
/// 4789; and, when the flag names another port than the swarm's, what to tell the user
/// (Docker's own overlays use the swarm's port, and the mesh must meet them there).
pub fn data_path_port(flag: Option<u16>, swarm: Option<u16>) -> (u16, Option<String>) {
    let default = mesh_common::proto::VXLAN_PORT_DEFAULT;
    match (flag, swarm) {
        (Some(f), Some(s)) if f != s => (
            s,
            Some(format!(
                "--data-path-port {f} differs from the swarm's data-path port {s} (docker \
                 info; set by `docker swarm init --data-path-port`): using {s}; drop the flag"
            )),
        ),
        (_, Some(s)) => (s, None),
        (Some(f), None) => (f, None),
        (None, None) => (default, None),
    }
}

/// A duration label: seconds, or a number with s, m, h or d.
fn duration_s(v: &str) -> Option<u32> {
    let v = v.trim();
    let (n, unit) = match v.char_indices().last()? {
        (i, c) if c.is_ascii_alphabetic() => (&v[..i], c),
        _ => (v, 's'),
    };
    let n: u32 = n.parse().ok()?;
    n.checked_mul(match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        _ => return None,
    })
}

/// What Docker cannot express, from service labels (documented in README):
/// `mesh.disable=true` takes the service out of the mesh (no frontend anywhere),
/// `mesh.idle-timeout=DURATION` sets the TCP idle timeout of its flows,
/// `mesh.udp-idle-timeout=DURATION` the UDP one, `mesh.affinity=client-ip` sends each
/// client to one task. Applies to the service's published ports, VIPs and host-mode
/// ports; a label it cannot read is reported and ignored.
pub fn apply_labels(model: &mut Model, labels: &crate::facts::MeshLabels) -> Vec<String> {
    let mut bad = Vec::new();
    model.services.retain(|s| {
        let base = s.name.split('@').next().unwrap_or(&s.name);
        labels
            .get(base)
            .and_then(|l| l.get("mesh.disable"))
            .is_none_or(|v| v != "true")
    });
    for s in &mut model.services {
        let base = s.name.split('@').next().unwrap_or(&s.name).to_string();
        let Some(l) = labels.get(&base) else { continue };
        for (k, v) in l {
            match k.as_str() {
                "mesh.disable" => {}
                "mesh.idle-timeout" => match duration_s(v) {
                    Some(t) if t > 0 => s.tcp_idle = Some(t),
                    _ => bad.push(format!("{base}: {k}={v} (a duration: 3600, 90m, 2h)")),
                },
                "mesh.udp-idle-timeout" => match duration_s(v) {
                    Some(t) if t > 0 => s.udp_idle = Some(t),
                    _ => bad.push(format!("{base}: {k}={v} (a duration: 300, 5m)")),
                },
                "mesh.affinity" => match v.as_str() {
                    "client-ip" => s.affinity = true,
                    "none" => s.affinity = false,
                    _ => bad.push(format!("{base}: {k}={v} (client-ip or none)")),
                },
                _ => bad.push(format!("{base}: unknown label {k}")),
            }
        }
    }
    bad.sort();
    bad.dedup();
    bad
}

/// Gives each service the ingress-published ports a manager reported from its spec, in
/// place of the gossip's (which, during an update that moves a port, flip between the
/// old and the new with every read, and carry no protocol). A service the manager did
/// not list (created since) keeps the gossip's; one it lists without ingress ports has
/// none. From a manager that reports only protocols, see `apply_protocols`.
pub fn apply_published(model: &mut Model, facts: &crate::facts::ServiceFacts) {
    let Some(ingress) = &facts.ingress else {
        return apply_protocols(model, &facts.protocols);
    };
    for s in &mut model.services {
        if s.name.contains('@') || !s.ports.iter().any(|p| p.mode == PublishMode::Ingress) {
            continue;
        }
        let Some(known) = ingress.get(&s.name) else {
            continue;
        };
        // Delivered at the published port, as `model_from` does (the task's own redirect
        // takes it to the target port).
        let mut ports: Vec<PortSpec> = known
            .iter()
            .map(|p| PortSpec {
                published: Some(p.published),
                target: p.published,
                protocol: p.protocol,
                mode: PublishMode::Ingress,
            })
            .collect();
        ports.sort_by_key(|p| (p.published, p.protocol, p.target));
        ports.dedup();
        s.ports = ports;
    }
    // A service whose ports were all taken away has nothing left to serve here.
    model
        .services
        .retain(|s| !s.ports.is_empty() || !s.vips.is_empty() || s.every_port);
}

/// Gives ingress-published ports the protocols a manager reported (the gossip, which
/// `model_from` reads, has none and TCP is assumed): a port published for UDP only
/// becomes UDP, one published for both is both. Ports the manager did not report stay
/// as they are.
pub fn apply_protocols(model: &mut Model, protocols: &crate::facts::Protocols) {
    for s in &mut model.services {
        if s.name.contains('@') {
            continue;
        }
        let Some(known) = protocols.get(&s.name) else {
            continue;
        };
        let mut ports = Vec::new();
        for p in &s.ports {
            let (PublishMode::Ingress, Some(published)) = (p.mode, p.published) else {
                ports.push(p.clone());
                continue;
            };
            let mut protos: Vec<Protocol> = known
                .iter()
                .filter(|(pp, _)| *pp == published)
                .map(|(_, proto)| *proto)
                .collect();
            protos.sort();
            protos.dedup();
            if protos.is_empty() {
                protos.push(p.protocol);
            }
            for protocol in protos {
                ports.push(PortSpec {
                    protocol,
                    ..p.clone()
                });
            }
        }
        // Docker lists a port once per protocol, and each became both above.
        let mut unique: Vec<PortSpec> = Vec::new();
        for p in ports {
            if !unique.contains(&p) {
                unique.push(p);
            }
        }
        s.ports = unique;
    }
}

/// Adds this node's host-mode published ports (from its own containers: Docker's
/// gossiped tables do not have them): one service per (service, protocol, published
/// port), answering on this node's addresses with this node's tasks only.
pub fn add_host_ports(model: &mut Model, ports: &[crate::facts::HostPort]) {
    let mut groups: BTreeMap<(String, Protocol, u16), (u16, Vec<Ipv4Addr>)> = BTreeMap::new();
    for p in ports {
        let g = groups
            .entry((p.service.clone(), p.protocol, p.published))
            .or_insert((p.target, Vec::new()));
        g.1.push(p.addr);
    }
    for ((service, protocol, published), (target, addrs)) in groups {
        model.services.push(ServiceSpec {
            name: format!("{service}@host/{protocol:?}/{published}").to_lowercase(),
            ports: vec![PortSpec {
                published: Some(published),
                target,
                protocol,
                mode: PublishMode::Host,
            }],
            vips: vec![],
            backends: addrs
                .into_iter()
                .map(|addr| BackendSpec {
                    addr,
                    state: Health::Active,
                    node: None,
                    network: None,
                    task: None,
                })
                .collect(),
            tcp_idle: None,
            udp_idle: None,
            affinity: false,
            every_port: false,
        });
    }
}

/// Task id -> its addresses, from the gossiped names (`<service>.<slot>.<task id>`).
pub fn task_addrs(networks: &[NetworkView]) -> BTreeMap<String, Vec<Ipv4Addr>> {
    let mut out: BTreeMap<String, Vec<Ipv4Addr>> = BTreeMap::new();
    for n in networks {
        for s in n.services.values() {
            for t in s.tasks.iter().flatten() {
                let (Some(id), Some(a)) = (t.name.rsplit('.').next(), addr(&t.endpoint_ip)) else {
                    continue;
                };
                if !id.is_empty() && id != t.name {
                    out.entry(id.to_string()).or_default().push(a);
                }
            }
        }
    }
    out
}

/// Settles the backends once the containers are known: a local task whose delivery
/// veth was not found (starting, or gone) is no backend anywhere on this node, and a
/// task whose HEALTHCHECK is not passing (`unhealthy`, still `starting`: seen by this
/// node for its own tasks, reported by its peers for theirs) takes no new flows but
/// keeps the ones it has (draining). A task the orchestrator is shutting down
/// (`stopping`) drains too, unless its service would be left with nothing to take new
/// flows: its replacement may not have reached this node's view yet, and a task in its
/// shutdown grace still answers better than no backend at all.
pub fn settle_local(
    model: &mut Model,
    endpoints: &BTreeSet<Ipv4Addr>,
    not_healthy: &BTreeSet<Ipv4Addr>,
    stopping: &BTreeSet<Ipv4Addr>,
) {
    for s in &mut model.services {
        s.backends
            .retain(|b| b.node.is_some() || endpoints.contains(&b.addr));
        for b in &mut s.backends {
            if not_healthy.contains(&b.addr) {
                b.state = Health::Draining;
            }
        }
        let others = s
            .backends
            .iter()
            .filter(|b| b.state == Health::Active && !stopping.contains(&b.addr))
            .count();
        if others > 0 {
            for b in &mut s.backends {
                if stopping.contains(&b.addr) {
                    b.state = Health::Draining;
                }
            }
        }
    }
}

/// How backends enter and leave. One that left the Swarm's view drains for a grace
/// period (Docker's default stop grace period is 10 s) instead of vanishing: its
/// established flows keep going while the task shuts down, and no new flow is sent to
/// it. One that just appeared warms up for a moment before taking new flows (Docker
/// lists a task as soon as its container runs, before it has finished programming the
/// task's ingress redirect), unless the service would otherwise have no backend taking
/// new flows. Pure, given the clock.
#[derive(Clone, Debug, Default)]
pub struct DrainTracker {
    grace: std::time::Duration,
    warmup: std::time::Duration,
    /// (service, address) -> the backend as last seen, since when it is present
    /// (`None`: since before this tracker's first look), since when it is gone.
    seen: BTreeMap<(String, Ipv4Addr), Seen>,
    started: bool,
    /// Per service: the backends that last took new flows, and since when it has had
    /// none.
    last_active: BTreeMap<String, (BTreeSet<Ipv4Addr>, Option<std::time::Instant>)>,
}

/// How long a service that suddenly has no backend taking new flows keeps its last
/// ones: Docker's view flickers during rolling updates (a task missing from one read,
/// a replacement not yet listed), and refusing every client for that moment is worse
/// than sending them to a task that is, at worst, on its way out.
const EMPTY_HOLD: std::time::Duration = std::time::Duration::from_secs(2);

#[derive(Clone, Debug)]
struct Seen {
    spec: BackendSpec,
    since: Option<std::time::Instant>,
    gone: Option<std::time::Instant>,
}

impl DrainTracker {
    pub fn new(grace: std::time::Duration) -> Self {
        DrainTracker {
            grace,
            ..Default::default()
        }
    }

    /// With a warm-up for backends that appear after the first look.
    pub fn with_warmup(mut self, warmup: std::time::Duration) -> Self {
        self.warmup = warmup;
        self
    }

    /// Adds to `model` the backends of its services that left less than the grace
    /// period ago, as draining, and holds back new ones that are still warming up.
    pub fn apply(&mut self, model: &mut Model, now: std::time::Instant) {
        let mut present = BTreeSet::new();
        let first = !self.started;
        self.started = true;
        for s in &model.services {
            for b in &s.backends {
                let key = (s.name.clone(), b.addr);
                present.insert(key.clone());
                let since = match self.seen.get(&key) {
                    Some(old) if old.gone.is_none() => old.since,
                    _ if first => None,
                    _ => Some(now),
                };
                self.seen.insert(
                    key,
                    Seen {
                        spec: b.clone(),
                        since,
                        gone: None,
                    },
                );
            }
        }
        let services: BTreeSet<String> = model.services.iter().map(|s| s.name.clone()).collect();
        let grace = self.grace;
        self.seen.retain(|key, seen| {
            if present.contains(key) {
                return true;
            }
            let since = *seen.gone.get_or_insert(now);
            services.contains(&key.0) && now.duration_since(since) < grace
        });
        for s in &mut model.services {
            for ((svc, addr), seen) in &self.seen {
                if seen.gone.is_some()
                    && *svc == s.name
                    && !s.backends.iter().any(|b| b.addr == *addr)
                {
                    s.backends.push(BackendSpec {
                        state: Health::Draining,
                        ..seen.spec.clone()
                    });
                }
            }
        }
    }

    /// Holds back backends still warming up, unless that would leave their service
    /// without a backend taking new flows. Runs once health and shutdowns are settled,
    /// so that "another backend is ready" means ready.
    pub fn hold_warming(&mut self, model: &mut Model, now: std::time::Instant) {
        self.hold_warming_and(model, now, &BTreeSet::new());
    }

    /// As [`Self::hold_warming`], holding back `unseen` backends too (remote tasks their
    /// own node's agent has not looked at yet: [`crate::peers::unseen`]).
    pub fn hold_warming_and(
        &mut self,
        model: &mut Model,
        now: std::time::Instant,
        unseen: &BTreeSet<Ipv4Addr>,
    ) {
        for s in &mut model.services {
            let warming = |b: &BackendSpec| {
                unseen.contains(&b.addr)
                    || self
                        .seen
                        .get(&(s.name.clone(), b.addr))
                        .and_then(|x| x.since)
                        .is_some_and(|t| now.duration_since(t) < self.warmup)
            };
            let hold: Vec<bool> = s.backends.iter().map(warming).collect();
            let ready = s
                .backends
                .iter()
                .zip(&hold)
                .filter(|(b, h)| b.state == Health::Active && !**h)
                .count();
            if ready == 0 {
                continue;
            }
            for (b, hold) in s.backends.iter_mut().zip(hold) {
                if hold {
                    b.state = Health::Draining;
                }
            }
        }
        self.hold_empty(model, now);
    }

    /// A service left with no backend taking new flows keeps the ones that last did, if
    /// they are still listed (draining), for [`EMPTY_HOLD`].
    fn hold_empty(&mut self, model: &mut Model, now: std::time::Instant) {
        let names: BTreeSet<&String> = model.services.iter().map(|s| &s.name).collect();
        self.last_active.retain(|n, _| names.contains(n));
        for s in &mut model.services {
            let active: BTreeSet<Ipv4Addr> = s
                .backends
                .iter()
                .filter(|b| b.state == Health::Active)
                .map(|b| b.addr)
                .collect();
            let entry = self
                .last_active
                .entry(s.name.clone())
                .or_insert_with(|| (BTreeSet::new(), None));
            if !active.is_empty() {
                *entry = (active, None);
                continue;
            }
            let since = *entry.1.get_or_insert(now);
            if now.duration_since(since) < EMPTY_HOLD {
                for b in &mut s.backends {
                    if entry.0.contains(&b.addr) {
                        b.state = Health::Active;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Shaped as `docker network inspect --verbose ingress` printed on a real swarm here.
    const WEB: &str = r#"{
        "VIP": "10.0.0.3",
        "Ports": ["Target: 80, Publish: 8080"],
        "LocalLBIndex": 256,
        "Tasks": [
            {"Name": "web.1.yz6us", "EndpointID": "a", "EndpointIP": "10.0.0.4", "Info": {"Host IP": "10.251.0.11"}},
            {"Name": "web.2.k2jq1", "EndpointID": "b", "EndpointIP": "10.0.0.5", "Info": {"Host IP": "10.251.0.12"}}
        ]
    }"#;

    fn ingress() -> NetworkView {
        NetworkView {
            id: "ingressid".into(),
            name: "ingress".into(),
            ingress: true,
            vnis: vec![4096],
            local_addr: Some("10.0.0.2".parse().unwrap()),
            peers: vec![
                "10.251.0.11".parse().unwrap(),
                "10.251.0.12".parse().unwrap(),
            ],
            services: BTreeMap::from([("web".into(), serde_json::from_str(WEB).unwrap())]),
        }
    }

    /// `docker network create --ingress ... myingress` (row 2.4/custom-ingress): its
    /// sandbox's endpoint is `myingress-sbox`; once only `ingress-sbox` was looked for,
    /// and a re-created ingress network served no published port.
    #[test]
    fn the_local_endpoint_of_any_ingress_network() {
        assert_eq!(local_endpoint_key("ingress", true), "ingress-sbox");
        assert_eq!(local_endpoint_key("myingress", true), "myingress-sbox");
        assert_eq!(local_endpoint_key("two", false), "lb-two");
    }

    #[test]
    fn labels_set_what_docker_cannot_express() {
        let me: Ipv4Addr = "10.251.0.11".parse().unwrap();
        let mut n = ingress();
        n.services
            .insert("db".into(), serde_json::from_str(WEB).unwrap());
        let label = |k: &str, v: &str| (k.to_string(), v.to_string());
        let labels = BTreeMap::from([
            (
                "web".to_string(),
                BTreeMap::from([
                    label("mesh.idle-timeout", "2h"),
                    label("mesh.affinity", "client-ip"),
                    label("mesh.colour", "blue"),
                ]),
            ),
            (
                "db".to_string(),
                BTreeMap::from([label("mesh.disable", "true")]),
            ),
        ]);
        let mut m = model_from(&[n], me, "eth0");
        let bad = apply_labels(&mut m, &labels);
        assert_eq!(bad, vec!["web: unknown label mesh.colour".to_string()]);
        assert!(m.services.iter().all(|s| s.name != "db"), "opted out");
        assert_eq!(web(&m).tcp_idle, Some(7200));
        assert!(web(&m).affinity);
        assert_eq!(duration_s("90m"), Some(5400));
        assert_eq!(duration_s("300"), Some(300));
        assert_eq!(duration_s("x"), None);
    }

    #[test]
    fn host_mode_ports_come_from_local_containers() {
        let me: Ipv4Addr = "10.251.0.11".parse().unwrap();
        let mut m = model_from(&[ingress()], me, "eth0");
        let hp = |addr: &str| crate::facts::HostPort {
            service: "hm".into(),
            protocol: Protocol::Tcp,
            published: 8090,
            target: 80,
            addr: addr.parse().unwrap(),
        };
        add_host_ports(&mut m, &[hp("172.18.0.3"), hp("172.18.0.4")]);
        let s = m
            .services
            .iter()
            .find(|s| s.name == "hm@host/tcp/8090")
            .unwrap();
        assert_eq!(s.ports[0].mode, PublishMode::Host);
        assert_eq!((s.ports[0].published, s.ports[0].target), (Some(8090), 80));
        assert_eq!(s.backends.len(), 2);
        assert!(s.backends.iter().all(|b| b.node.is_none()));
    }

    #[test]
    fn task_ids_map_to_their_addresses() {
        let t = task_addrs(&[ingress()]);
        assert_eq!(t["yz6us"], vec!["10.0.0.4".parse::<Ipv4Addr>().unwrap()]);
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn ports_parse() {
        assert_eq!(parse_port("Target: 80, Publish: 8080"), Some((80, 8080)));
        assert_eq!(parse_port("Target: 80"), None);
        assert_eq!(parse_port("garbage"), None);
    }

    #[test]
    fn published_port_with_local_and_remote_tasks() {
        let me: Ipv4Addr = "10.251.0.11".parse().unwrap();
        let m = model_from(&[ingress()], me, "eth0");
        assert_eq!(
            m.peers,
            vec![PeerSpec {
                addr: "10.251.0.12".parse().unwrap(),
                stock: false
            }]
        );
        assert_eq!(m.networks[0].vni, 4096);
        let web = &m.services[0];
        assert_eq!(web.name, "web");
        // Delivered on the published port: the task redirects it to 80 itself.
        assert_eq!(
            (web.ports[0].published, web.ports[0].target),
            (Some(8080), 8080)
        );
        assert_eq!(web.backends.len(), 2);
        assert_eq!(web.backends[0].node, None, "the task on this node is local");
        assert_eq!(web.backends[1].node, Some("10.251.0.12".parse().unwrap()));
    }

    #[test]
    fn published_ports_take_the_managers_protocols() {
        let mut m = model_from(&[ingress()], "10.251.0.11".parse().unwrap(), "eth0");
        assert_eq!(
            web(&m).ports[0].protocol,
            Protocol::Tcp,
            "assumed without a manager"
        );
        let published = web(&m).ports[0].published.unwrap();
        let udp = crate::facts::Protocols::from([("web".into(), vec![(published, Protocol::Udp)])]);
        let mut only_udp = m.clone();
        apply_protocols(&mut only_udp, &udp);
        let p: Vec<Protocol> = web(&only_udp).ports.iter().map(|p| p.protocol).collect();
        assert_eq!(p, vec![Protocol::Udp]);
        let both = crate::facts::Protocols::from([(
            "web".into(),
            vec![(published, Protocol::Udp), (published, Protocol::Tcp)],
        )]);
        apply_protocols(&mut m, &both);
        let p: Vec<Protocol> = web(&m).ports.iter().map(|p| p.protocol).collect();
        assert_eq!(p, vec![Protocol::Tcp, Protocol::Udp]);
        // Two groups, one per protocol (endpoints do not matter here), named by the
        // port they deliver to.
        m.services
            .iter_mut()
            .for_each(|s| s.backends.retain(|b| b.node.is_some()));
        let d = crate::model::desired(&m, |_| Ok((1, [0; 6]))).expect("both protocols are valid");
        assert!(d
            .groups
            .keys()
            .any(|g| g.0 == format!("web/udp/{published}")));
        assert!(d
            .groups
            .keys()
            .any(|g| g.0 == format!("web/tcp/{published}")));
    }

    /// `service update --publish-rm 80 --publish-add 8221:80`: until the old tasks are
    /// gone Docker's view shows 8220 or 8221 at random with each read (seen on 20.10 and
    /// 28.5: the port answered now and then, on no node for 20 s). The manager's spec
    /// decides; a service it does not list yet keeps the gossip's ports.
    #[test]
    fn published_ports_follow_the_spec_not_the_gossip() {
        use crate::facts::{IngressPort, ServiceFacts};
        let me = "10.251.0.11".parse().unwrap();
        let mut n = ingress();
        n.services
            .insert("gone".into(), serde_json::from_str(WEB).unwrap());
        n.services
            .insert("new".into(), serde_json::from_str(WEB).unwrap());
        let mut m = model_from(&[n], me, "eth0");
        let port = |published, target, protocol| IngressPort {
            published,
            target,
            protocol,
        };
        let facts = ServiceFacts {
            ingress: Some(BTreeMap::from([
                (
                    "web".to_string(),
                    vec![
                        port(8221, 80, Protocol::Udp),
                        port(8221, 80, Protocol::Tcp),
                        port(8221, 80, Protocol::Tcp),
                    ],
                ),
                ("gone".to_string(), vec![]),
            ])),
            ..Default::default()
        };
        apply_published(&mut m, &facts);
        let ports = |m: &Model, name: &str| -> Vec<(Option<u16>, u16, Protocol)> {
            m.services
                .iter()
                .find(|s| s.name == name)
                .map(|s| {
                    s.ports
                        .iter()
                        .map(|p| (p.published, p.target, p.protocol))
                        .collect()
                })
                .unwrap_or_default()
        };
        assert_eq!(
            ports(&m, "web"),
            vec![
                (Some(8221), 8221, Protocol::Tcp),
                (Some(8221), 8221, Protocol::Udp)
            ]
        );
        assert!(
            !m.services.iter().any(|s| s.name == "gone"),
            "listed without ingress ports: nothing to serve"
        );
        assert_eq!(ports(&m, "new"), vec![(Some(8080), 8080, Protocol::Tcp)]);
        // An older manager's report (protocols only) still applies.
        let mut old = model_from(&[ingress()], me, "eth0");
        let facts = ServiceFacts {
            protocols: BTreeMap::from([("web".into(), vec![(8080, Protocol::Udp)])]),
            ..Default::default()
        };
        apply_published(&mut old, &facts);
        assert_eq!(ports(&old, "web"), vec![(Some(8080), 8080, Protocol::Udp)]);
    }

    /// `-p 5353:53/tcp -p 5353:53/udp`: the gossip lists the port twice, without
    /// protocols. With the managers' facts both are served; without them, TCP; never a
    /// clash of the service with itself (which once froze every service on the node).
    #[test]
    fn one_port_on_tcp_and_udp_in_one_service() {
        let mut n = ingress();
        n.services.get_mut("web").unwrap().ports = Some(vec![
            "Target: 53, Publish: 5353".into(),
            "Target: 53, Publish: 5353".into(),
        ]);
        let m = model_from(&[n], "10.251.0.99".parse().unwrap(), "eth0");
        let d = crate::model::desired(&m, |_| Ok((1, [0; 6]))).unwrap();
        assert!(d.problems.is_empty(), "{:?}", d.problems);
        let both = crate::facts::Protocols::from([(
            "web".into(),
            vec![(5353, Protocol::Tcp), (5353, Protocol::Udp)],
        )]);
        let mut m = m;
        apply_protocols(&mut m, &both);
        let p: Vec<Protocol> = web(&m).ports.iter().map(|p| p.protocol).collect();
        assert_eq!(p, vec![Protocol::Tcp, Protocol::Udp]);
        let d = crate::model::desired(&m, |_| Ok((1, [0; 6]))).unwrap();
        assert!(d.problems.is_empty(), "{:?}", d.problems);
        assert_eq!(d.frontends.len(), 2);
    }

    /// `--subnet` twice: Docker carries each subnet on its own VNI, and VXLAN for any
    /// of them must pass the underlay hook (only the first once did: the second
    /// subnet's containers could not reach each other across nodes).
    #[test]
    fn every_vni_of_a_multi_subnet_network_is_known() {
        assert_eq!(parse_vnis("5101,5102"), vec![5101, 5102]);
        assert_eq!(parse_vnis("4097"), vec![4097]);
        assert!(parse_vnis("5101,x").is_empty(), "half a list is no list");
        assert!(parse_vnis("16777216").is_empty(), "VNIs have 24 bits");
        let mut n = ingress();
        n.ingress = false;
        n.name = "two".into();
        n.vnis = vec![5101, 5102];
        let m = model_from(&[n], "10.251.0.11".parse().unwrap(), "eth0");
        let d = crate::model::desired(&m, |_| Ok((1, [0; 6]))).unwrap();
        for vni in [5101, 5102] {
            assert_eq!(
                d.networks.get(&vni).map(|n| n.flags),
                Some(mesh_common::lb::NET_DOCKER),
                "VNI {vni}"
            );
        }
    }

    /// The swarm's data-path port wins over the flag, and a mismatch is said.
    #[test]
    fn the_data_path_port_comes_from_the_swarm() {
        assert_eq!(data_path_port(None, None), (4789, None));
        assert_eq!(data_path_port(Some(7789), None), (7789, None));
        assert_eq!(data_path_port(None, Some(7789)), (7789, None));
        assert_eq!(data_path_port(Some(7789), Some(7789)), (7789, None));
        let (p, why) = data_path_port(Some(4789), Some(7789));
        assert_eq!(p, 7789);
        assert!(why
            .unwrap()
            .contains("--data-path-port 4789 differs from the swarm's data-path port 7789"));
    }

    /// A view that leaves the node's endpoint out (Docker does, now and then) keeps the
    /// network, and so the node's published ports; a network gone is forgotten.
    #[test]
    fn a_local_endpoint_left_out_of_one_view_is_remembered() {
        let mut seen = BTreeMap::new();
        let mut first = vec![ingress()];
        remember_local_addrs(&mut first, &mut seen);
        let mut second = vec![ingress()];
        second[0].local_addr = None;
        remember_local_addrs(&mut second, &mut seen);
        assert_eq!(second[0].local_addr, Some("10.0.0.2".parse().unwrap()));
        let m = model_from(&second, "10.251.0.11".parse().unwrap(), "eth0");
        assert_eq!(m.services.len(), 1, "the published port stays");
        remember_local_addrs(&mut [], &mut seen);
        assert!(seen.is_empty());
    }

    #[test]
    fn a_dnsrr_service_gets_no_vip() {
        let mut n = ingress();
        n.ingress = false;
        n.name = "meshnet".into();
        // endpoint_mode dnsrr: Docker's DNS answers task addresses; there is no VIP.
        n.services.get_mut("web").unwrap().vip = String::new();
        let m = model_from(&[n], "10.251.0.11".parse().unwrap(), "eth0");
        assert!(m.services.is_empty(), "{:?}", m.services);
    }

    #[test]
    fn vip_on_a_user_network() {
        let mut n = ingress();
        n.ingress = false;
        n.name = "meshnet".into();
        let m = model_from(&[n], "10.251.0.11".parse().unwrap(), "eth0");
        let s = &m.services[0];
        assert_eq!(s.name, "web@meshnet");
        assert_eq!(s.vips, vec!["10.0.0.3".parse::<Ipv4Addr>().unwrap()]);
        assert!(s.every_port, "Docker's VIPs take every port");
        assert!(s.ports.is_empty());
        // A service nobody publishes still has its VIP.
        let mut n = ingress();
        n.ingress = false;
        n.name = "meshnet".into();
        n.services.get_mut("web").unwrap().ports = None;
        // Seen from a node without tasks: every backend is remote (no endpoints needed).
        let m = model_from(&[n], "10.251.0.99".parse().unwrap(), "eth0");
        assert_eq!(m.services[0].name, "web@meshnet");
        let d = crate::model::desired(&m, |_| Ok((1, [0; 6]))).unwrap_or_else(|e| panic!("{e}"));
        let vip = u32::from_ne_bytes([10, 0, 0, 3]);
        let (group, flags) = &d.frontends[&mesh_common::lb::any_port_vip(vip)];
        assert_eq!(*flags, mesh_common::lb::FE_VIP);
        assert!(
            d.groups[group].backends.keys().all(|(_, port)| *port == 0),
            "port 0: the port the client dialled"
        );
    }

    #[test]
    fn a_network_without_vni_or_local_endpoint_is_skipped() {
        let mut n = ingress();
        n.local_addr = None;
        let m = model_from(&[n], "10.251.0.11".parse().unwrap(), "eth0");
        assert!(m.networks.is_empty() && m.services.is_empty());
    }

    /// The ingress view once the remote task has left it.
    fn without_remote_task() -> NetworkView {
        let mut n = ingress();
        n.services
            .get_mut("web")
            .unwrap()
            .tasks
            .as_mut()
            .unwrap()
            .pop();
        n
    }

    fn web(m: &Model) -> &ServiceSpec {
        m.services.iter().find(|s| s.name == "web").unwrap()
    }

    fn web_mut(m: &mut Model) -> &mut ServiceSpec {
        m.services.iter_mut().find(|s| s.name == "web").unwrap()
    }

    #[test]
    fn local_tasks_need_a_veth_and_a_passing_healthcheck() {
        let me: Ipv4Addr = "10.251.0.11".parse().unwrap();
        let mut m = model_from(&[ingress()], me, "eth0");
        let local: Ipv4Addr = "10.0.0.4".parse().unwrap();
        // No veth found yet: not a backend; the remote task stays.
        settle_local(&mut m, &BTreeSet::new(), &BTreeSet::new(), &BTreeSet::new());
        assert_eq!(web(&m).backends.len(), 1);
        assert!(web(&m).backends[0].node.is_some());
        let mut m = model_from(&[ingress()], me, "eth0");
        settle_local(
            &mut m,
            &BTreeSet::from([local]),
            &BTreeSet::from([local]),
            &BTreeSet::new(),
        );
        assert_eq!(web(&m).backends[0].state, Health::Draining);
        assert_eq!(web(&m).backends[1].state, Health::Active);
        // Shutting down: drained while another takes new flows, kept while it is the
        // last one.
        let remote: Ipv4Addr = "10.0.0.5".parse().unwrap();
        let mut m = model_from(&[ingress()], me, "eth0");
        settle_local(
            &mut m,
            &BTreeSet::from([local]),
            &BTreeSet::new(),
            &BTreeSet::from([remote]),
        );
        assert_eq!(web(&m).backends[1].state, Health::Draining);
        let mut m = model_from(&[ingress()], me, "eth0");
        let both = BTreeSet::from([local, remote]);
        settle_local(&mut m, &BTreeSet::from([local]), &BTreeSet::new(), &both);
        assert!(web(&m).backends.iter().all(|b| b.state == Health::Active));
    }

    #[test]
    fn a_vanished_task_drains_for_the_grace_period() {
        let me: Ipv4Addr = "10.251.0.11".parse().unwrap();
        let t0 = std::time::Instant::now();
        let grace = std::time::Duration::from_secs(10);
        let mut d = DrainTracker::new(grace);
        let mut m = model_from(&[ingress()], me, "eth0");
        d.apply(&mut m, t0);
        assert_eq!(web(&m).backends.len(), 2);
        // The remote task leaves Docker's view.
        let n = without_remote_task();
        let mut m = model_from(std::slice::from_ref(&n), me, "eth0");
        d.apply(&mut m, t0 + std::time::Duration::from_secs(1));
        let gone = web(&m).backends.iter().find(|b| b.node.is_some()).unwrap();
        assert_eq!(gone.state, Health::Draining);
        // Still draining just before the grace period ends, gone after.
        let mut m = model_from(std::slice::from_ref(&n), me, "eth0");
        d.apply(&mut m, t0 + std::time::Duration::from_millis(10_900));
        assert_eq!(web(&m).backends.len(), 2);
        let mut m = model_from(std::slice::from_ref(&n), me, "eth0");
        d.apply(&mut m, t0 + std::time::Duration::from_secs(12));
        assert_eq!(web(&m).backends.len(), 1);
        // And it does not come back.
        let mut m = model_from(&[n], me, "eth0");
        d.apply(&mut m, t0 + std::time::Duration::from_secs(13));
        assert_eq!(web(&m).backends.len(), 1);
    }

    #[test]
    fn a_task_that_returns_is_active_again() {
        let me: Ipv4Addr = "10.251.0.11".parse().unwrap();
        let t0 = std::time::Instant::now();
        let mut d = DrainTracker::new(std::time::Duration::from_secs(10));
        d.apply(&mut model_from(&[ingress()], me, "eth0"), t0);
        let n = without_remote_task();
        d.apply(&mut model_from(&[n], me, "eth0"), t0);
        let mut m = model_from(&[ingress()], me, "eth0");
        d.apply(&mut m, t0);
        assert!(web(&m).backends.iter().all(|b| b.state == Health::Active));
        assert_eq!(web(&m).backends.len(), 2);
    }

    #[test]
    fn a_service_that_flickers_to_no_backend_keeps_its_last_ones_briefly() {
        let me: Ipv4Addr = "10.251.0.11".parse().unwrap();
        let t0 = std::time::Instant::now();
        let ms = std::time::Duration::from_millis;
        let mut d = DrainTracker::new(ms(10_000));
        let mut m = model_from(&[ingress()], me, "eth0");
        d.apply(&mut m, t0);
        d.hold_warming(&mut m, t0);
        // Docker's view loses both tasks for a moment: they drain, but stay active for
        // the hold, then drain for real.
        let mut n = ingress();
        n.services.get_mut("web").unwrap().tasks = Some(vec![]);
        for (at, active) in [(100, true), (1900, true), (2200, false)] {
            let mut m = model_from(std::slice::from_ref(&n), me, "eth0");
            d.apply(&mut m, t0 + ms(at));
            d.hold_warming(&mut m, t0 + ms(at));
            assert_eq!(web(&m).backends.len(), 2);
            assert!(
                web(&m)
                    .backends
                    .iter()
                    .all(|b| (b.state == Health::Active) == active),
                "at {at} ms: {:?}",
                web(&m).backends
            );
        }
    }

    #[test]
    fn a_new_task_warms_up_unless_it_is_the_only_one() {
        let me: Ipv4Addr = "10.251.0.11".parse().unwrap();
        let t0 = std::time::Instant::now();
        let ms = std::time::Duration::from_millis;
        let mut d = DrainTracker::new(ms(10_000)).with_warmup(ms(1000));
        // What is there at the first look takes flows at once.
        let n = without_remote_task();
        let mut m = model_from(&[n], me, "eth0");
        d.apply(&mut m, t0);
        d.hold_warming(&mut m, t0);
        assert!(web(&m).backends.iter().all(|b| b.state == Health::Active));
        // A second task appears: held back for the warm-up, then active.
        let mut m = model_from(&[ingress()], me, "eth0");
        d.apply(&mut m, t0 + ms(100));
        d.hold_warming(&mut m, t0 + ms(100));
        assert_eq!(web(&m).backends[1].state, Health::Draining);
        // ... unless the one ready backend is itself on its way out (settled
        // draining after apply): then the newcomer takes flows at once.
        let mut m = model_from(&[ingress()], me, "eth0");
        d.apply(&mut m, t0 + ms(200));
        web_mut(&mut m).backends[0].state = Health::Draining;
        d.hold_warming(&mut m, t0 + ms(200));
        assert_eq!(web(&m).backends[1].state, Health::Active);
        let mut m = model_from(&[ingress()], me, "eth0");
        d.apply(&mut m, t0 + ms(1200));
        d.hold_warming(&mut m, t0 + ms(1200));
        assert_eq!(web(&m).backends[1].state, Health::Active);
        // A service whose tasks are all new takes them at once.
        let mut d = DrainTracker::new(ms(10_000)).with_warmup(ms(1000));
        d.apply(&mut Model::default(), t0);
        let mut m = model_from(&[ingress()], me, "eth0");
        d.apply(&mut m, t0 + ms(100));
        d.hold_warming(&mut m, t0 + ms(100));
        assert!(web(&m).backends.iter().all(|b| b.state == Health::Active));
    }
}
