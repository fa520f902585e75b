//! Docker's side: its IPVS mesh beside this one, its API reachable and in a swarm, and
//! the maps against what the agent wrote from Docker's view (drift).

use std::{path::Path, time::Duration};

use super::{Check, Seen, Target};
use crate::{
    agent::state::{names_path, read_names, AgentStatus},
    ctl::inspect::{drift as drift_of, services},
    host::ipvs,
};

/// Docker's IPVS mesh, as the agent saw it (it knows where Docker's namespaces are),
/// else as seen from here; and what the mesh holds.
pub(super) fn ipvs(seen: &Seen) -> Check {
    let dm = seen
        .status
        .as_ref()
        .and_then(|s| s.docker_mesh.clone())
        .unwrap_or_else(|| ipvs::detect(Path::new("/sys"), Path::new("/var/run/docker/netns")));
    let (mut ports, mut vips) = (Vec::new(), Vec::new());
    if let Some(snap) = &seen.snap {
        for k in snap.frontends.keys() {
            let proto = match k.proto {
                mesh_common::proto::IPPROTO_TCP => "tcp",
                mesh_common::proto::IPPROTO_UDP => "udp",
                _ => "any",
            };
            if k.addr == 0 {
                ports.push(format!("{}/{proto}", u16::from_be(k.port)));
            } else {
                vips.push(std::net::Ipv4Addr::from(u32::from_be(k.addr)).to_string());
            }
        }
    }
    ports.sort();
    ports.dedup();
    vips.sort();
    vips.dedup();
    let (fine, line) = ipvs::ownership(&dm, &ports, &vips);
    if fine {
        Check::ok("ipvs", line)
    } else {
        Check::warn("ipvs", line)
    }
}

/// Docker reachable, and in swarm mode.
pub(super) fn reachable(socket: &str) -> Check {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return Check::warn("docker", format!("cannot ask Docker: {e}")),
    };
    rt.block_on(async {
        let docker = match crate::source::docker::connect(socket).await {
            Ok(d) => d,
            Err(e) => return Check::fail("docker", format!("{socket}: {e}")),
        };
        match tokio::time::timeout(Duration::from_secs(5), docker.info()).await {
            Ok(Ok(info)) => {
                let state = info
                    .swarm
                    .and_then(|s| s.local_node_state)
                    .map(|s| format!("{s:?}").to_lowercase())
                    .unwrap_or_default();
                if state == "active" {
                    Check::ok("docker", format!("{socket}: swarm active"))
                } else {
                    Check::fail(
                        "docker",
                        format!(
                            "{socket}: not in a swarm ({state}): `docker swarm init` or `join`"
                        ),
                    )
                }
            }
            Ok(Err(e)) => Check::fail("docker", format!("{socket}: {e}")),
            Err(_) => Check::fail("docker", format!("{socket}: no answer in 5 s")),
        }
    })
}

/// The maps against what the agent last wrote.
pub(super) fn drift(t: &Target, seen: &Seen, st: &AgentStatus) -> Check {
    // The snapshot the other checks read; drift compares names and backends only, so
    // no traffic counters.
    let names = read_names(&names_path(t.state_dir, t.bpffs));
    let views = seen
        .snap
        .as_ref()
        .map(|snap| services(snap, &names, &Default::default(), &st.tasks))
        .unwrap_or_default();
    let d = drift_of(&st.applied, &views);
    if d.is_empty() {
        return Check::ok(
            "drift",
            format!(
                "the maps hold what the agent wrote ({} services)",
                views.len()
            ),
        );
    }
    Check::fail(
        "drift",
        d.iter()
            .map(|x| {
                format!(
                    "{}: missing [{}] extra [{}]",
                    x.service,
                    x.missing.join(" "),
                    x.extra.join(" ")
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
            + " (meshctl doctor --fix)",
    )
}
