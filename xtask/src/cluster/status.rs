//! `cluster status [--json]`: nodes, addresses, roles, engines, dockerd and agent state.

use super::{
    agent::agent_state,
    dockerd::docker,
    layout::{node_addr, node_rec, recorded_nodes, sock, CLIENT_ADDR, CLIENT_NS, UL},
    pids::dockerd_pid,
};
use crate::{cmd::output, engines};

pub(super) fn status(json: bool) -> anyhow::Result<()> {
    let Some(nodes) = recorded_nodes() else {
        if json {
            println!("{{\"up\": false}}");
        } else {
            println!("cluster: not up");
        }
        return Ok(());
    };
    let roles = output(&mut docker(
        1,
        &["node", "ls", "--format", "{{.Hostname}} {{.ManagerStatus}}"],
    ))
    .unwrap_or_default();
    let mut rows = Vec::new();
    for n in 1..=nodes {
        let host = format!("mc-n{n}");
        let role = roles
            .lines()
            .find_map(|l| {
                l.strip_prefix(&format!("{host} "))
                    .map(|s| s.trim().to_string())
            })
            .map(|s| {
                if s.is_empty() {
                    "worker".to_string()
                } else {
                    "manager".to_string()
                }
            })
            .unwrap_or_else(|| "unknown".into());
        rows.push((
            n,
            node_addr(n),
            role,
            dockerd_pid(n),
            agent_state(n),
            node_rec(n),
        ));
    }
    if json {
        let nodes: Vec<serde_json::Value> = rows
            .iter()
            .map(|(n, a, r, p, ag, rec)| {
                serde_json::json!({
                    "node": n,
                    "name": format!("mc-n{n}"),
                    "addr": a,
                    "role": r,
                    "dockerd": p,
                    "docker_host": sock(*n),
                    "engine": rec.as_ref().map(|r| r.engine.clone()),
                    "engine_version": rec.as_ref().map(|r| r.version.clone()),
                    "docker_cli": rec.as_ref().map(|r| r.bin.join("docker")),
                    "stock": rec.as_ref().is_some_and(|r| r.stock),
                    "agent": ag.0,
                    "agent_pid": ag.1,
                })
            })
            .collect();
        let st = serde_json::json!({
            "up": true,
            "client": CLIENT_ADDR,
            "client_netns": CLIENT_NS,
            "underlay_netns": UL,
            "engines_cache": engines::cache_dir(),
            "nodes": nodes,
        });
        println!("{st}");
    } else {
        println!(
            "NODE   NAME     ADDRESS        ROLE     ENGINE                      DOCKERD      MESH-AGENT"
        );
        for (n, a, r, p, ag, rec) in rows {
            let engine = match &rec {
                Some(r) => format!(
                    "{} ({}){}",
                    r.engine,
                    r.version,
                    if r.stock { " stock" } else { "" }
                ),
                None => "?".into(),
            };
            println!(
                "{n:<6} mc-n{n:<4} {a:<14} {r:<8} {engine:<27} {:<12} {}",
                p.map(|p| format!("pid {p}")).unwrap_or("down".into()),
                match ag.1 {
                    Some(pid) => format!("{} (pid {pid})", ag.0),
                    None => ag.0.to_string(),
                }
            );
        }
        println!("client namespace {CLIENT_NS} at {CLIENT_ADDR}");
    }
    Ok(())
}
