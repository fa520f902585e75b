//! `meshctl trace`: a synthetic first packet through this node's program, or another node's.

use super::*;

pub(crate) fn trace(
    args: &Args,
    from: std::net::SocketAddrV4,
    to: std::net::SocketAddrV4,
    proto: mesh_agent::model::Protocol,
) -> anyhow::Result<()> {
    let report = mesh_agent::ctl::trace::run(&args.state_dir, &args.bpffs, from, to, proto)?;
    if args.json {
        return print_json(&report);
    }
    print!("{}", report.render());
    Ok(())
}

/// `trace --node NAME`: the node's agent traces there; its answer is printed here.
pub(crate) fn trace_on(
    args: &Args,
    node: &str,
    from: std::net::SocketAddrV4,
    to: std::net::SocketAddrV4,
    proto: mesh_agent::model::Protocol,
) -> anyhow::Result<()> {
    let st = agent_status(args);
    let port = st
        .as_ref()
        .map(|s| s.peer_port)
        .filter(|p| *p != 0)
        .unwrap_or(mesh_common::proto::PEER_PORT_DEFAULT);
    let socket = st
        .as_ref()
        .map(|s| s.docker.clone())
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| "unix:///var/run/docker.sock".into());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let body = rt.block_on(async {
        let addr: std::net::Ipv4Addr = match node.parse() {
            Ok(a) => a,
            Err(_) => {
                // A node name: its address from Docker (a manager's view).
                let docker = mesh_agent::source::docker::connect(&socket).await?;
                let n = docker.inspect_node(node).await.with_context(|| {
                    format!(
                        "cannot look up swarm node {node:?} through {socket} (names need a \
                             manager; give the node's address instead)"
                    )
                })?;
                // A manager's own record of its address is the reliable one (Docker may
                // report 0.0.0.0 in Status.Addr for managers).
                let manager = n
                    .manager_status
                    .and_then(|m| m.addr)
                    .and_then(|a| a.rsplit_once(':').map(|(h, _)| h.to_string()));
                let status = n.status.and_then(|s| s.addr);
                manager
                    .into_iter()
                    .chain(status)
                    .filter_map(|a| a.parse::<std::net::Ipv4Addr>().ok())
                    .find(|a| !a.is_unspecified() && !a.is_loopback())
                    .with_context(|| format!("swarm node {node:?} has no usable address"))?
            }
        };
        let path = format!(
            "{}?from={from}&to={to}&proto={}",
            mesh_agent::source::peers::TRACE_PATH,
            format!("{proto:?}").to_lowercase()
        );
        mesh_agent::http::get((addr, port).into(), &path, Duration::from_secs(10))
            .await
            .with_context(|| {
                format!(
                    "node {node} ({addr}:{port}) did not answer the trace: its agent must run \
                     with --serve-traces (and --peer-port {port}), and this node must be one of \
                     the swarm's"
                )
            })
    })?;
    let v: serde_json::Value = serde_json::from_str(&body).context("the node's answer")?;
    if let Some(e) = v["error"].as_str() {
        anyhow::bail!("node {node}: {e}");
    }
    if args.json {
        return print_json(&v["report"]);
    }
    println!("node:     {node}");
    print!("{}", v["text"].as_str().unwrap_or(""));
    Ok(())
}
