//! The node and its agent: bpffs, the pinned maps, the agent's process, the kernel's
//! fallbacks, the model's problems, ports shared with a process, the data-path port.

use std::path::Path;

use super::Check;
use crate::{
    agent::state::AgentStatus,
    datapath::{features::Why, pins::PinDir},
    host::{listeners, preflight, procnet},
    model::{Protocol, PublishMode},
};

/// The bpffs the pins live on.
pub(super) fn bpffs(bpffs: &Path) -> Check {
    let root = bpffs.parent().unwrap_or(bpffs);
    if preflight::on_bpffs(root) {
        Check::ok("bpffs", format!("{} is a bpffs", root.display()))
    } else {
        Check::fail(
            "bpffs",
            format!(
                "{} is not a bpffs: `mount -t bpf bpf {}`",
                root.display(),
                root.display()
            ),
        )
    }
}

/// Every map of the layout pinned.
pub(super) fn maps(pins: &PinDir) -> Check {
    let missing: Vec<&str> = crate::datapath::pins::PINNED_MAPS
        .iter()
        .copied()
        .filter(|m| !pins.map(m).exists())
        .collect();
    if missing.is_empty() {
        Check::ok(
            "maps",
            format!("layout v{}, every map pinned", mesh_common::LAYOUT_VERSION),
        )
    } else {
        Check::fail(
            "maps",
            format!(
                "missing: {} (mesh-agent --uninstall, then start it)",
                missing.join(", ")
            ),
        )
    }
}

/// The agent that wrote the status file, alive.
pub(super) fn agent(live: Option<u32>) -> Check {
    match live {
        Some(pid) => Check::ok("agent", format!("running, pid {pid}")),
        None => Check::fail(
            "agent",
            "not running: the pinned datapath forwards what it was last told; start mesh-agent",
        ),
    }
}

/// The kernel the agent loaded on, and the fallbacks in force there: expected on an
/// older kernel (ok), a warning where they were forced (tests, not production).
pub(super) fn kernel(st: &AgentStatus) -> Check {
    let kernel = if st.kernel.is_empty() {
        "this kernel".to_string()
    } else {
        format!("Linux {}", st.kernel)
    };
    if st.fallbacks.is_empty() {
        return Check::ok(
            "kernel",
            format!("{kernel}: every feature the datapath uses, no fallback in force"),
        );
    }
    let list = st
        .fallbacks
        .iter()
        .map(|f| f.to_string())
        .collect::<Vec<_>>()
        .join("; ");
    if st.fallbacks.iter().any(|f| f.why == Why::Forced) {
        Check::warn(
            "kernel",
            format!(
                "{kernel}: fallbacks in force: {list}; forced ones come from \
                 MESH_FORCE_FALLBACKS or --tc-attach netlink (for tests)"
            ),
        )
    } else {
        Check::ok("kernel", format!("{kernel}: fallbacks in force: {list}"))
    }
}

/// What the agent left out of the model (every other service is applied).
pub(super) fn model(st: &AgentStatus) -> Check {
    if st.problems.is_empty() {
        return Check::ok("model", "every service in the model is programmed");
    }
    let list = st
        .problems
        .iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join("; ");
    Check::fail(
        "model",
        format!("left out (every other service is applied): {list}"),
    )
}

/// Published ports that a process of this node also listens on: looked up here (meshctl
/// on the host sees every process) and as the agent saw them.
pub(super) fn ports(st: &AgentStatus) -> Check {
    let published: listeners::Published = st
        .published
        .iter()
        .filter_map(|(k, v)| {
            let (port, proto) = k.split_once('/')?;
            let proto = match proto {
                "tcp" => Protocol::Tcp,
                "udp" => Protocol::Udp,
                _ => return None,
            };
            let (svc, mode) = v.split_once(' ').unwrap_or((v, "ingress"));
            let mode = if mode == "host" {
                PublishMode::Host
            } else {
                PublishMode::Ingress
            };
            Some(((proto, port.parse().ok()?), (svc.to_string(), mode)))
        })
        .collect();
    let mut found = listeners::scan(Path::new("/proc"), &published);
    for p in &st.ports_in_use {
        if !found
            .iter()
            .any(|f| f.port == p.port && f.protocol == p.protocol)
        {
            found.push(p.clone());
        }
    }
    if found.is_empty() {
        return Check::ok(
            "ports",
            format!(
                "no process of this node listens on the {} published ports",
                published.len()
            ),
        );
    }
    let list = found
        .iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join("; ");
    Check::fail("ports", list)
}

/// The data-path port the agent uses, and whether its flag disagreed with the swarm's.
pub(super) fn data_path_port_setting(st: &AgentStatus) -> Check {
    match &st.data_path_port_mismatch {
        Some(m) => Check::warn("data-path port", m.clone()),
        None => Check::ok("data-path port", format!("{}/udp", st.data_path_port)),
    }
}

/// A process's socket on the data-path port; the kernel's own (Docker's vxlan devices)
/// are expected on a swarm node.
pub(super) fn data_path_port_holders(port: u16) -> Check {
    let holders: Vec<(u32, String)> = ["/proc/net/udp", "/proc/net/udp6"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .flat_map(|t| procnet::udp_port_holders(&t, port))
        .flat_map(procnet::socket_owners)
        .collect();
    if holders.is_empty() {
        return Check::ok("data-path port", format!("UDP {port}: no process holds it"));
    }
    Check::fail(
        "data-path port",
        format!(
            "UDP {port} is held by {}: another VXLAN user (Calico, NSX, ...) clashes with \
             the mesh; free it or use another --data-path-port",
            holders
                .iter()
                .map(|(pid, comm)| format!("{comm} (pid {pid})"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    )
}

/// An iptables rule on INPUT dropping the data-path port (only said when there is one).
pub(super) fn firewall(port: u16) -> Option<Check> {
    let o = std::process::Command::new("iptables")
        .args(["-S", "INPUT"])
        .output()
        .ok()?;
    let rules = String::from_utf8_lossy(&o.stdout);
    let dropped: Vec<&str> = rules
        .lines()
        .filter(|l| {
            l.contains("-p udp")
                && l.contains(&format!("--dport {port}"))
                && (l.contains("-j DROP") || l.contains("-j REJECT"))
        })
        .collect();
    (!dropped.is_empty()).then(|| {
        Check::warn(
            "firewall",
            format!(
                "iptables drops UDP {port} on INPUT ({}): Docker's own overlay traffic will \
                 not arrive",
                dropped.join("; ")
            ),
        )
    })
}
