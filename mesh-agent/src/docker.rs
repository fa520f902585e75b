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

/// This node's swarm address and its view of every overlay network.
pub async fn snapshot(socket: &str) -> Result<(Ipv4Addr, Vec<NetworkView>), DockerError> {
    let connect = |source| DockerError::Connect {
        socket: socket.to_string(),
        source,
    };
    let docker = Docker::connect_with_unix(socket, 30, API_DEFAULT_VERSION).map_err(connect)?;
    let docker = docker.negotiate_version().await.map_err(connect)?;
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
