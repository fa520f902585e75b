//! `meshctl doctor`'s checks of what commonly breaks a mesh, one function each, run in
//! the order a user reads them (`diagnose`). Each looks at the pins, the agent's status
//! file, this node's interfaces, /proc or Docker, never writes, and says in one line
//! what is wrong and what to do. `node` holds the checks of the node and its agent,
//! `links` those of the programs and interfaces, `docker` those of Docker's side.

use std::path::Path;

use serde::Serialize;

use crate::{
    agent::state::{agent_status, live_agent_pid, AgentStatus},
    datapath::{
        maps::read_pinned,
        pins::{LinkKind, LinkPin, PinDir},
    },
    plan::Snapshot,
};

mod docker;
mod links;
mod node;

/// One check's finding.
#[derive(Clone, Debug, Serialize)]
pub struct Check {
    pub check: &'static str,
    /// ok, warn or fail.
    pub result: &'static str,
    pub detail: String,
}

impl Check {
    pub fn ok(check: &'static str, detail: impl Into<String>) -> Self {
        Self::new(check, "ok", detail)
    }
    pub fn warn(check: &'static str, detail: impl Into<String>) -> Self {
        Self::new(check, "warn", detail)
    }
    pub fn fail(check: &'static str, detail: impl Into<String>) -> Self {
        Self::new(check, "fail", detail)
    }
    fn new(check: &'static str, result: &'static str, detail: impl Into<String>) -> Self {
        Check {
            check,
            result,
            detail: detail.into(),
        }
    }
    pub fn failed(&self) -> bool {
        self.result == "fail"
    }
}

/// Where to look: the mesh pinned at `bpffs`, its agent's state in `state_dir`, Docker
/// at `docker` (asked when `ask_docker` or when the agent follows Docker).
pub struct Target<'a> {
    pub state_dir: &'a Path,
    pub bpffs: &'a Path,
    pub docker: &'a str,
    pub ask_docker: bool,
}

/// What the checks share, read once: the pins, the agent's status, the maps and the
/// program links that are really running.
struct Seen {
    pins: PinDir,
    status: Option<AgentStatus>,
    snap: Option<Snapshot>,
    links: Vec<LinkPin>,
}

impl Seen {
    fn read(t: &Target) -> Self {
        let pins = PinDir::new(t.bpffs);
        // A netlink filter's record counts only while the kernel still runs the mesh's
        // program there.
        let links = pins
            .links()
            .into_iter()
            .filter(|l| l.kind == LinkKind::Link || l.program_id().ok().flatten().is_some())
            .collect();
        Seen {
            status: agent_status(t.state_dir, t.bpffs),
            snap: read_pinned(t.bpffs).ok(),
            links,
            pins,
        }
    }
}

/// Every check, in the order they print.
pub fn diagnose(t: &Target) -> Vec<Check> {
    let mut out = vec![node::bpffs(t.bpffs)];
    let seen = Seen::read(t);
    if !seen.pins.has_maps() {
        out.push(Check::fail(
            "maps",
            format!(
                "no mesh is pinned at {}: is mesh-agent running?",
                t.bpffs.display()
            ),
        ));
        return out;
    }
    out.push(node::maps(&seen.pins));
    out.push(node::agent(seen.status.as_ref().and_then(live_agent_pid)));
    if let Some(st) = &seen.status {
        out.extend([node::kernel(st), node::model(st), node::ports(st)]);
        out.push(node::data_path_port_setting(st));
    }
    let underlay = links::underlay_index(&seen);
    out.push(links::underlay(&seen, underlay));
    if let Some(snap) = &seen.snap {
        out.push(links::tasks(&seen, snap));
        if let Some(c) = links::mtu(underlay) {
            out.push(c);
        }
    }
    let port = seen
        .status
        .as_ref()
        .map(|s| s.data_path_port)
        .filter(|p| *p != 0)
        .unwrap_or(mesh_common::proto::VXLAN_PORT_DEFAULT);
    out.push(node::data_path_port_holders(port));
    out.extend(node::firewall(port));
    out.push(docker::ipvs(&seen));
    if let Some(st) = &seen.status {
        out.push(links::host_ports(&seen, st));
    }
    if t.ask_docker || seen.status.as_ref().is_none_or(|s| s.source == "docker") {
        out.push(docker::reachable(t.docker));
    }
    if let Some(st) = &seen.status {
        out.push(docker::drift(t, &seen, st));
    }
    out
}
