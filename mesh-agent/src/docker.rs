//! Reading the Swarm from the local dockerd (bollard, API version negotiated).

use std::{collections::BTreeMap, net::Ipv4Addr};

use bollard::{
    query_parameters::{InspectNetworkOptionsBuilder, ListNetworksOptionsBuilder},
    Docker, API_DEFAULT_VERSION,
};

use crate::swarm::{GossipService, NetworkView};

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

/// This node's swarm address and its view of every overlay network.
pub async fn snapshot(docker: &Docker) -> Result<(Ipv4Addr, Vec<NetworkView>), DockerError> {
    let api = |what| move |source| DockerError::Api { what, source };
    let info = docker.info().await.map_err(api("info"))?;
    let me: Ipv4Addr = info
        .swarm
        .and_then(|s| s.node_addr)
        .and_then(|a| a.parse().ok())
        .ok_or(DockerError::NotSwarm)?;
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
        let vni = v
            .options
            .as_ref()
            .and_then(|o| o.get("com.docker.network.driver.overlay.vxlanid_list"))
            .and_then(|s| s.split(',').next()?.parse().ok());
        let ingress = v.ingress.unwrap_or(false);
        let endpoint = if ingress {
            "ingress-sbox".to_string()
        } else {
            format!("lb-{name}")
        };
        let local_addr = v
            .containers
            .as_ref()
            .and_then(|c| c.get(&endpoint))
            .and_then(|e| e.ipv4_address.as_deref())
            .and_then(|a| a.split('/').next()?.parse().ok());
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
            name,
            ingress,
            vni,
            local_addr,
            peers,
            services,
        });
    }
    Ok((me, out))
}

/// The delivery interfaces of this node's tasks that hold one of `addrs`: the host side
/// of each task's docker_gwbridge veth, and the task's MAC there. Docker's API does not
/// show the gwbridge endpoint, so it is found from the links: in the task's sandbox, the
/// veth whose peer is a port of this node's docker_gwbridge.
pub async fn local_endpoints(
    docker: &Docker,
    addrs: &std::collections::BTreeSet<Ipv4Addr>,
) -> Result<Vec<crate::model::EndpointSpec>, DockerError> {
    use bollard::query_parameters::ListContainersOptionsBuilder;
    let api = |what| move |source| DockerError::Api { what, source };
    let filters = BTreeMap::from([("label", vec!["com.docker.swarm.task.id"])]);
    let list = docker
        .list_containers(Some(
            ListContainersOptionsBuilder::default()
                .filters(&filters.into_iter().collect())
                .build(),
        ))
        .await
        .map_err(api("list containers"))?;
    let node_links = crate::netdev::links().unwrap_or_default();
    let Some(gw) = node_links
        .iter()
        .find(|l| l.name == "docker_gwbridge")
        .map(|l| l.index)
    else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for c in list {
        let Some(id) = c.id else { continue };
        let insp = docker
            .inspect_container(&id, None)
            .await
            .map_err(api("inspect container"))?;
        let Some(ns) = insp.network_settings else {
            continue;
        };
        let (Some(nets), Some(sandbox)) = (ns.networks, ns.sandbox_key) else {
            continue;
        };
        let mine: Vec<Ipv4Addr> = nets
            .values()
            .filter_map(|e| e.ip_address.as_deref()?.parse().ok())
            .filter(|a| addrs.contains(a))
            .collect();
        if mine.is_empty() {
            continue;
        }
        // Best effort per task: a sandbox that is going away is skipped, not fatal.
        let Ok(links) = crate::netdev::links_in(std::path::Path::new(&sandbox)) else {
            continue;
        };
        let found = links.iter().find_map(|l| {
            let host = node_links
                .iter()
                .find(|h| Some(h.index) == l.peer && h.master == Some(gw))?;
            Some((host.name.clone(), l.mac?))
        });
        let Some((interface, mac)) = found else {
            continue;
        };
        for addr in mine {
            out.push(crate::model::EndpointSpec {
                addr,
                interface: interface.clone(),
                mac: crate::model::MacAddr(mac),
                delivery_addr: None,
            });
        }
    }
    Ok(out)
}
