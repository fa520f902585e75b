//! The programs where the maps say traffic arrives and tasks live: the underlay's, each
//! local task's veth, the host port's and the socket programs; and the underlay's MTU.

use super::{Check, Seen};
use crate::{
    agent::state::AgentStatus,
    datapath::pins::Hook,
    host::{hostport::HOST_DEV, netdev, preflight},
    plan::Snapshot,
};

/// Whether a program of `hook` runs on interface `ix` of this namespace.
fn has(seen: &Seen, hook: Hook, ix: u32) -> bool {
    seen.links
        .iter()
        .any(|l| l.hook == hook && l.netns == 0 && l.ifindex == ix)
}

/// The underlay's ifindex: the maps' record, else the link pinned there.
pub(super) fn underlay_index(seen: &Seen) -> Option<u32> {
    seen.snap
        .as_ref()
        .and_then(|s| s.local)
        .map(|l| l.ifindex)
        .or_else(|| {
            seen.links
                .iter()
                .find(|l| l.hook == Hook::TcUnderlay)
                .map(|l| l.ifindex)
        })
}

/// The underlay program on the underlay.
pub(super) fn underlay(seen: &Seen, underlay: Option<u32>) -> Check {
    match underlay {
        Some(ix) if has(seen, Hook::TcUnderlay, ix) && preflight::ifname(ix).is_some() => {
            Check::ok(
                "underlay",
                format!(
                    "mesh_tc_ingress on {}",
                    preflight::ifname(ix).unwrap_or_default()
                ),
            )
        }
        Some(ix) => Check::fail(
            "underlay",
            format!(
                "no mesh_tc_ingress on the underlay ({}): published ports and the overlay do \
                 not work here; restart mesh-agent",
                preflight::ifname(ix).unwrap_or_else(|| format!("ifindex {ix}, gone"))
            ),
        ),
        None => Check::fail("underlay", "no underlay program pinned: restart mesh-agent"),
    }
}

/// The task program on every local task's veth.
pub(super) fn tasks(seen: &Seen, snap: &Snapshot) -> Check {
    let bare: Vec<String> = snap
        .endpoints
        .iter()
        .filter(|(_, ep)| !has(seen, Hook::TcTask, ep.ifindex))
        .map(|(a, ep)| {
            format!(
                "{} ({})",
                preflight::ifname(ep.ifindex).unwrap_or_else(|| format!("ifindex {}", ep.ifindex)),
                std::net::Ipv4Addr::from(a.to_ne_bytes())
            )
        })
        .collect();
    if bare.is_empty() {
        return Check::ok(
            "tasks",
            format!(
                "mesh_tc_task on all {} local task veths",
                snap.endpoints.len()
            ),
        );
    }
    Check::fail(
        "tasks",
        format!(
            "no mesh_tc_task on {}: their replies are not translated (meshctl doctor --fix)",
            bare.join(", ")
        ),
    )
}

/// What the underlay's MTU leaves for Docker's overlays (VXLAN takes 50 bytes).
pub(super) fn mtu(underlay: Option<u32>) -> Option<Check> {
    let name = underlay.and_then(preflight::ifname)?;
    Some(match netdev::mtu(&name) {
        Some(m) if m >= 1500 => Check::ok(
            "mtu",
            format!(
                "{name} MTU {m}: room for overlays of {} (Docker's default 1450)",
                m - 50
            ),
        ),
        Some(m) => Check::warn(
            "mtu",
            format!(
                "{name} MTU {m} leaves {} for overlays, below Docker's default 1450: \
                 create overlays with --opt com.docker.network.driver.mtu={}",
                m.saturating_sub(50),
                m.saturating_sub(50)
            ),
        ),
        None => Check::warn("mtu", format!("cannot read {name}'s MTU")),
    })
}

/// The host port: the socket programs and the host port's task program attached, or
/// why it is off.
pub(super) fn host_ports(seen: &Seen, st: &AgentStatus) -> Check {
    let have: Vec<Hook> = seen.links.iter().map(|l| l.hook).collect();
    let missing: Vec<&str> = Hook::SOCK
        .into_iter()
        .chain([Hook::TcHost])
        .filter(|h| !have.contains(h))
        .map(|h| h.name())
        .collect();
    match (&st.host_ports, missing.is_empty()) {
        (Some(h), true) => Check::ok(
            "host ports",
            format!(
                "the node's own sockets and its containers' ({} namespaces) reach published \
                 ports: socket programs on {}, host port {HOST_DEV} ({})",
                h.namespaces, h.cgroup, h.host_addr
            ),
        ),
        (Some(_), false) => Check::fail(
            "host ports",
            format!(
                "{} not attached: published ports do not answer from this node; restart \
                 mesh-agent",
                missing.join(", ")
            ),
        ),
        (None, _) if st.fallbacks.iter().any(|f| f.feature == "netns_cookie") => Check::warn(
            "host ports",
            "off: this kernel has no SO_NETNS_COOKIE (Linux 5.14), which the socket \
             programs' scope needs: published ports answer from other hosts only, not \
             from this node or its containers",
        ),
        (None, _) => Check::warn(
            "host ports",
            "off (mesh-agent --host-ports off): published ports answer from other hosts \
             only, not from this node or its containers",
        ),
    }
}
