//! Reading the Swarm from the local dockerd (bollard, API version negotiated).

use std::{collections::BTreeMap, net::Ipv4Addr};

use bollard::{
    query_parameters::{InspectNetworkOptionsBuilder, ListNetworksOptionsBuilder},
    Docker, API_DEFAULT_VERSION,
};

use crate::source::facts::{HostPort, IngressPort, IngressPorts, LocalTasks, ServiceFacts};
use crate::source::swarm::{GossipService, NetworkView};

/// Errors talking to Docker, each with what to check.
#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    #[error("Docker socket {socket}: {source} (is dockerd running? is the socket mounted?)")]
    Connect {
        socket: String,
        #[source]
        source: bollard::errors::Error,
    },
    #[error("Docker API {what}: {source}")]
    Api {
        what: &'static str,
        #[source]
        source: bollard::errors::Error,
    },
    #[error("this node is not in a swarm (docker swarm init / join first)")]
    NotSwarm,
}

/// A client for the dockerd at `socket`, API version negotiated (Docker 20.10 speaks
/// 1.41; newer engines more).
pub async fn connect(socket: &str) -> Result<Docker, DockerError> {
    let connect = |source| DockerError::Connect {
        socket: socket.to_string(),
        source,
    };
    let docker = Docker::connect_with_unix(socket, 30, API_DEFAULT_VERSION).map_err(connect)?;
    docker.negotiate_version().await.map_err(connect)
}

/// What this node knows of the Swarm.
#[derive(Clone, Debug)]
pub struct SwarmView {
    /// This node's swarm (underlay) address.
    pub me: Ipv4Addr,
    /// Whether this node is a manager (answers /services and /tasks).
    pub manager: bool,
    /// The managers' addresses.
    pub managers: std::collections::BTreeSet<Ipv4Addr>,
    pub networks: Vec<NetworkView>,
    /// The swarm's VXLAN port (`docker swarm init --data-path-port`), where Docker says
    /// (API 1.40 on; 0 there means 4789).
    pub data_path_port: Option<u16>,
}

/// This node's swarm address and role, the managers, and its view of every overlay
/// network.
pub async fn snapshot(docker: &Docker) -> Result<SwarmView, DockerError> {
    let api = |what| move |source| DockerError::Api { what, source };
    let info = docker.info().await.map_err(api("info"))?;
    let swarm = info.swarm.ok_or(DockerError::NotSwarm)?;
    let me: Ipv4Addr = swarm
        .node_addr
        .as_deref()
        .and_then(|a| a.parse().ok())
        .ok_or(DockerError::NotSwarm)?;
    let data_path_port = swarm
        .cluster
        .as_ref()
        .and_then(|c| c.data_path_port)
        .map(|p| match u16::try_from(p) {
            Ok(0) => mesh_common::proto::VXLAN_PORT_DEFAULT,
            Ok(p) => p,
            Err(_) => mesh_common::proto::VXLAN_PORT_DEFAULT,
        });
    let manager = swarm.control_available.unwrap_or(false);
    let managers = swarm
        .remote_managers
        .unwrap_or_default()
        .into_iter()
        .filter_map(|p| p.addr?.rsplit_once(':')?.0.parse().ok())
        .collect();
    let filters = BTreeMap::from([("driver", vec!["overlay"])]);
    let nets = docker
        .list_networks(Some(
            ListNetworksOptionsBuilder::default()
                .filters(&filters.into_iter().collect())
                .build(),
        ))
        .await
        .map_err(api("list networks"))?;
    let mut out = Vec::new();
    for n in nets {
        let Some(id) = n.id else { continue };
        let opts = InspectNetworkOptionsBuilder::default()
            .verbose(true)
            .build();
        let v = docker
            .inspect_network(&id, Some(opts))
            .await
            .map_err(api("inspect network"))?;
        let name = v.name.unwrap_or_default();
        let vnis = v
            .options
            .as_ref()
            .and_then(|o| o.get("com.docker.network.driver.overlay.vxlanid_list"))
            .map(|s| crate::source::swarm::parse_vnis(s))
            .unwrap_or_default();
        let ingress = v.ingress.unwrap_or(false);
        let endpoint = crate::source::swarm::local_endpoint_key(&name, ingress);
        let local_addr = v
            .containers
            .as_ref()
            .and_then(|c| c.get(&endpoint))
            .and_then(|e| e.ipv4_address.as_deref())
            .and_then(|a| a.parse::<ipnetwork::Ipv4Network>().ok())
            .map(|n| n.ip());
        let subnets = v
            .ipam
            .as_ref()
            .and_then(|i| i.config.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|c| c.subnet.as_deref()?.parse().ok())
            .collect();
        let peers = v
            .peers
            .unwrap_or_default()
            .into_iter()
            .filter_map(|p| p.ip?.parse().ok())
            .collect();
        let services = v
            .services
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(k, val)| Some((k, serde_json::from_value::<GossipService>(val).ok()?)))
            .collect();
        out.push(NetworkView {
            id: id.clone(),
            name,
            ingress,
            vnis,
            subnets,
            local_addr,
            peers,
            services,
        });
    }
    Ok(SwarmView {
        data_path_port,
        me,
        manager,
        managers,
        networks: out,
    })
}

/// On a manager: every service's `mesh.*` labels and ingress-published ports.
pub async fn service_facts(docker: &Docker) -> Result<ServiceFacts, DockerError> {
    use bollard::models::{
        EndpointPortConfigProtocolEnum as P, EndpointPortConfigPublishModeEnum as M,
    };
    let services = docker
        .list_services(None::<bollard::query_parameters::ListServicesOptions>)
        .await
        .map_err(|source| DockerError::Api {
            what: "list services",
            source,
        })?;
    let mut facts = ServiceFacts {
        ingress: Some(IngressPorts::new()),
        ..Default::default()
    };
    for s in services {
        let Some(spec) = s.spec else { continue };
        let Some(name) = spec.name else { continue };
        let labels: BTreeMap<String, String> = spec
            .labels
            .unwrap_or_default()
            .into_iter()
            .filter(|(k, _)| k.starts_with("mesh."))
            .collect();
        if !labels.is_empty() {
            facts.labels.insert(name.clone(), labels);
        }
        let ports: Vec<IngressPort> = s
            .endpoint
            .and_then(|e| e.ports)
            .unwrap_or_default()
            .into_iter()
            .filter(|p| !matches!(p.publish_mode, Some(M::HOST)))
            .filter_map(|p| {
                let proto = match p.protocol {
                    Some(P::UDP) => crate::model::Protocol::Udp,
                    Some(P::TCP) | None => crate::model::Protocol::Tcp,
                    // SCTP: not balanced by the mesh.
                    _ => return None,
                };
                Some(IngressPort {
                    published: u16::try_from(p.published_port?).ok()?,
                    target: u16::try_from(p.target_port?).ok()?,
                    protocol: proto,
                })
            })
            .collect();
        if !ports.is_empty() {
            facts.protocols.insert(
                name.clone(),
                ports.iter().map(|p| (p.published, p.protocol)).collect(),
            );
        }
        if let Some(ingress) = facts.ingress.as_mut() {
            ingress.insert(name, ports);
        }
    }
    Ok(facts)
}

/// On a manager: the tasks the orchestrator is shutting down or has shut down (desired
/// state no longer running). Docker keeps such a task in its gossiped tables until its
/// container has exited and a moment longer, but it may refuse connections as soon as
/// the shutdown begins. Ids, not addresses: a finished task's address may already
/// belong to a new task, its id never does (the gossip names tasks by id).
pub async fn stopping_tasks(
    docker: &Docker,
) -> Result<std::collections::BTreeSet<String>, DockerError> {
    let tasks = docker
        .list_tasks(None::<bollard::query_parameters::ListTasksOptions>)
        .await
        .map_err(|source| DockerError::Api {
            what: "list tasks",
            source,
        })?;
    Ok(tasks
        .into_iter()
        .filter(|t| t.desired_state.is_some_and(stopping_state))
        .filter_map(|t| t.id)
        .collect())
}

/// A desired state past running: the orchestrator is ending the task. Not the states
/// before running: a stop-first update's replacement waits with desired state `ready`
/// until the old task has stopped (found the hard way: counted as stopping, it left
/// its service with nothing to drain to, and the old task kept taking new flows until
/// it was killed).
fn stopping_state(d: bollard::models::TaskState) -> bool {
    use bollard::models::TaskState as S;
    matches!(
        d,
        S::COMPLETE | S::SHUTDOWN | S::FAILED | S::REJECTED | S::REMOVE | S::ORPHANED
    )
}

#[cfg(test)]
#[test]
fn a_replacement_waiting_to_start_is_not_stopping() {
    use bollard::models::TaskState as S;
    assert!(!stopping_state(S::READY) && !stopping_state(S::RUNNING) && !stopping_state(S::NEW));
    assert!(stopping_state(S::SHUTDOWN) && stopping_state(S::REMOVE));
}

#[cfg(test)]
#[test]
fn a_sandbox_is_found_where_the_netns_directory_is_mounted() {
    use std::path::{Path, PathBuf};
    let key = "/var/run/docker/netns/2d5c3e1a9f00";
    assert_eq!(sandbox_here(key, None), PathBuf::from(key));
    assert_eq!(
        sandbox_here(key, Some(Path::new("/run/docker-netns"))),
        PathBuf::from("/run/docker-netns/2d5c3e1a9f00")
    );
}

/// "80/tcp" with bindings [{HostPort: "8090"}] -> (protocol, target, published ports).
fn parse_binding(
    key: &str,
    host_ports: &[Option<String>],
) -> Option<(crate::model::Protocol, u16, Vec<u16>)> {
    let (port, proto) = key.split_once('/')?;
    let protocol = match proto {
        "tcp" => crate::model::Protocol::Tcp,
        "udp" => crate::model::Protocol::Udp,
        _ => return None,
    };
    let published = host_ports
        .iter()
        .filter_map(|p| p.as_deref()?.parse().ok())
        .filter(|p| *p != 0)
        .collect();
    Some((protocol, port.parse().ok()?, published))
}

/// What a Docker event tells the agent: when it happened (for the lag from the event to
/// the maps written) and a short description for the logs.
#[derive(Clone, Debug)]
pub struct Event {
    pub at: std::time::SystemTime,
    pub what: String,
}

/// Follows `/events` for what changes this node's datapath (services, nodes, networks,
/// task containers starting, dying or changing health), sending each to `tx`. Returns
/// when the stream ends or fails; the caller resyncs fully and calls again.
pub async fn follow_events(
    docker: &Docker,
    tx: &tokio::sync::mpsc::UnboundedSender<Event>,
) -> Result<(), DockerError> {
    use futures_util::StreamExt;
    let filters = BTreeMap::from([("type", vec!["service", "node", "network", "container"])]);
    let mut stream = docker.events(Some(
        bollard::query_parameters::EventsOptionsBuilder::default()
            .filters(&filters.into_iter().collect())
            .build(),
    ));
    while let Some(ev) = stream.next().await {
        let ev = ev.map_err(|source| DockerError::Api {
            what: "events",
            source,
        })?;
        let kind = ev.typ.map(|t| t.to_string()).unwrap_or_default();
        let action = ev.action.unwrap_or_default();
        let attrs = ev.actor.and_then(|a| a.attributes).unwrap_or_default();
        let relevant = match kind.as_str() {
            // What changes reachability: swarm tasks starting, stopping and changing
            // health; any container starting or going (it may call VIPs from an
            // attachable overlay).
            "container" => {
                matches!(action.as_str(), "start" | "die" | "destroy")
                    || (attrs.contains_key("com.docker.swarm.task.id")
                        && (matches!(action.as_str(), "kill" | "stop")
                            || action.starts_with("health_status")))
            }
            _ => true,
        };
        if !relevant {
            continue;
        }
        let at = ev
            .time_nano
            .and_then(|n| u64::try_from(n).ok())
            .map(|n| std::time::UNIX_EPOCH + std::time::Duration::from_nanos(n))
            .unwrap_or_else(std::time::SystemTime::now);
        let name = attrs.get("name").cloned().unwrap_or_default();
        if tx
            .send(Event {
                at,
                what: format!("{kind} {action} {name}"),
            })
            .is_err()
        {
            return Ok(());
        }
    }
    Ok(())
}

/// Where a sandbox Docker names `key` is found by this agent: the same path, or the same
/// file in `netns_dir` when Docker's netns directory is mounted elsewhere (a container).
pub fn sandbox_here(key: &str, netns_dir: Option<&std::path::Path>) -> std::path::PathBuf {
    let key = std::path::Path::new(key);
    match (netns_dir, key.file_name()) {
        (Some(dir), Some(name)) => dir.join(name),
        _ => key.to_path_buf(),
    }
}

/// A task's overlay veths: for each network it is on whose namespace Docker keeps next
/// to the task's sandbox (`1-<first 10 of the network id>`: an overlay), the host side
/// of the veth that holds the task's address there (the peer of the task's interface).
fn overlay_ports(
    sandbox: &std::path::Path,
    nets: &std::collections::HashMap<String, bollard::models::EndpointSettings>,
    task_links: &[(crate::host::netdev::Link, Vec<Ipv4Addr>)],
    cache: &mut BTreeMap<std::path::PathBuf, Vec<crate::host::netdev::Link>>,
) -> Vec<crate::model::OverlayPortSpec> {
    let Some(dir) = sandbox.parent() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in nets.values() {
        let (Some(id), Some(ip)) = (e.network_id.as_deref(), e.ip_address.as_deref()) else {
            continue;
        };
        let (Some(prefix), Ok(ip)) = (id.get(..10), ip.parse::<Ipv4Addr>()) else {
            continue;
        };
        let netns = dir.join(format!("1-{prefix}"));
        let Some(peer) = task_links
            .iter()
            .find(|(_, a)| a.contains(&ip))
            .and_then(|(l, _)| l.peer)
        else {
            continue;
        };
        if !cache.contains_key(&netns) {
            // Not an overlay (no such namespace), or going away: nothing to attach.
            let Ok(links) = crate::host::netdev::links_in(&netns) else {
                continue;
            };
            cache.insert(netns.clone(), links);
        }
        if let Some(l) = cache[&netns].iter().find(|l| l.index == peer) {
            out.push(crate::model::OverlayPortSpec {
                netns,
                interface: l.name.clone(),
                ifindex: l.index,
            });
        }
    }
    out
}

/// Whether a listed container is on one of the `overlays` (network ids): a cheap look
/// before entering its sandbox.
fn on_an_overlay(
    c: &bollard::models::ContainerSummary,
    overlays: &std::collections::BTreeSet<String>,
) -> bool {
    c.network_settings
        .as_ref()
        .and_then(|n| n.networks.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|(_, e)| e.network_id.as_ref())
        .any(|id| overlays.contains(id))
}

/// The delivery interfaces of this node's tasks (all of them, also those the gossiped
/// view does not list yet: another node may learn of a new task first and send it a
/// flow, which must find its endpoint here): the host side
/// of each task's docker_gwbridge veth, and the task's MAC there. Docker's API does not
/// show the gwbridge endpoint, so it is found from the links: in the task's sandbox, the
/// veth whose peer is a port of this node's docker_gwbridge.
pub async fn local_endpoints(
    docker: &Docker,
    netns_dir: Option<&std::path::Path>,
    overlays: &std::collections::BTreeSet<String>,
) -> Result<LocalTasks, DockerError> {
    use bollard::query_parameters::ListContainersOptionsBuilder;
    let api = |what| move |source| DockerError::Api { what, source };
    // Every running container: tasks are backends, and any container on an overlay
    // (a task, or a plain `docker run --network X` on an attachable one) calls VIPs.
    let list = docker
        .list_containers(Some(ListContainersOptionsBuilder::default().build()))
        .await
        .map_err(api("list containers"))?;
    let node_links = crate::host::netdev::links().unwrap_or_default();
    let Some(gw) = node_links
        .iter()
        .find(|l| l.name == "docker_gwbridge")
        .map(|l| l.index)
    else {
        return Ok(LocalTasks::default());
    };
    let mut out = LocalTasks::default();
    // Links of each overlay network's namespace, listed once per call.
    let mut overlay_links = BTreeMap::new();
    for c in list {
        let task = c
            .labels
            .as_ref()
            .is_some_and(|l| l.contains_key("com.docker.swarm.task.id"));
        if !task && !on_an_overlay(&c, overlays) {
            continue;
        }
        let Some(id) = c.id else { continue };
        let insp = match docker.inspect_container(&id, None).await {
            Ok(i) => i,
            // Listed a moment ago, gone now (a task stopping): not an error.
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => continue,
            Err(e) => return Err(api("inspect container")(e)),
        };
        let Some(ns) = insp.network_settings else {
            continue;
        };
        let Some(sandbox) = ns
            .sandbox_key
            .filter(|k| !k.is_empty())
            .map(|k| sandbox_here(&k, netns_dir))
        else {
            continue;
        };
        if out.netns_dir.is_none() {
            out.netns_dir = sandbox.parent().map(std::path::Path::to_path_buf);
        }
        let nets = ns.networks.unwrap_or_default();
        if !task {
            // A plain container: only its overlay veths, where its VIP calls start (it
            // is no backend, and its `-p` ports are Docker's own mapping).
            if let Ok(links) = crate::host::netdev::links_and_addrs_in(&sandbox) {
                out.overlay_ports.extend(overlay_ports(
                    &sandbox,
                    &nets,
                    &links,
                    &mut overlay_links,
                ));
            }
            continue;
        }
        let mut mine: Vec<Ipv4Addr> = nets
            .values()
            .filter_map(|e| e.ip_address.as_deref()?.parse().ok())
            .collect();
        out.known.extend(mine.iter().copied());
        let bindings: Vec<(crate::model::Protocol, u16, Vec<u16>)> = insp
            .host_config
            .as_ref()
            .and_then(|h| h.port_bindings.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|(k, v)| {
                let ports: Vec<Option<String>> =
                    v.iter().flatten().map(|b| b.host_port.clone()).collect();
                parse_binding(k, &ports)
            })
            .collect();
        if mine.is_empty() && bindings.is_empty() {
            continue;
        }
        let service = c
            .labels
            .as_ref()
            .and_then(|l| l.get("com.docker.swarm.service.name"))
            .cloned()
            .unwrap_or_default();
        // A HEALTHCHECK that is not (yet) passing: "starting" or "unhealthy".
        let health = insp
            .state
            .as_ref()
            .and_then(|st| st.health.as_ref())
            .and_then(|h| h.status);
        let sick = matches!(
            health,
            Some(
                bollard::models::HealthStatusEnum::STARTING
                    | bollard::models::HealthStatusEnum::UNHEALTHY
            )
        );
        // Best effort per task: a sandbox that is going away is skipped, not fatal.
        let Ok(links) = crate::host::netdev::links_and_addrs_in(&sandbox) else {
            continue;
        };
        out.overlay_ports
            .extend(overlay_ports(&sandbox, &nets, &links, &mut overlay_links));
        let found = links.iter().find_map(|(l, addrs)| {
            let host = node_links
                .iter()
                .find(|h| Some(h.index) == l.peer && h.master == Some(gw))?;
            Some((host.name.clone(), l.mac?, addrs.first().copied()))
        });
        let Some((interface, mac, gw_addr)) = found else {
            continue;
        };
        if let (Some(a), false) = (gw_addr, bindings.is_empty()) {
            for (protocol, target, published) in &bindings {
                for p in published {
                    out.host_ports.push(HostPort {
                        service: service.clone(),
                        protocol: *protocol,
                        published: *p,
                        target: *target,
                        addr: a,
                    });
                }
            }
            mine.push(a);
        }
        if sick {
            out.not_healthy.extend(mine.iter().copied());
        }
        for addr in mine {
            out.endpoints.push(crate::model::EndpointSpec {
                addr,
                interface: interface.clone(),
                mac: crate::model::MacAddr(mac),
                delivery_addr: None,
            });
        }
    }
    Ok(out)
}
