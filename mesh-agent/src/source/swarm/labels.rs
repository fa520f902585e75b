//! What the gossip does not carry, applied to the model: the data-path port, the `mesh.*`
//! service labels, the published ports and protocols from a manager's service spec, host-
//! mode ports.

use std::{collections::BTreeMap, net::Ipv4Addr};

use crate::model::{BackendSpec, Health, Model, PortSpec, Protocol, PublishMode, ServiceSpec};

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
pub(super) fn duration_s(v: &str) -> Option<u32> {
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
pub fn apply_labels(model: &mut Model, labels: &crate::source::facts::MeshLabels) -> Vec<String> {
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
pub fn apply_published(model: &mut Model, facts: &crate::source::facts::ServiceFacts) {
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
pub fn apply_protocols(model: &mut Model, protocols: &crate::source::facts::Protocols) {
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
pub fn add_host_ports(model: &mut Model, ports: &[crate::source::facts::HostPort]) {
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
