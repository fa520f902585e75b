//! `cluster down`: only what `up` started stopped (recorded PIDs), and every namespace,
//! mount and directory it made removed.

use std::process::{Command, Stdio};

use anyhow::bail;

use super::{
    agent::{stop_agent, uninstall_agent},
    dockerd::stop_node,
    layout::{data_root, exec_root, node_dir, recorded_nodes, CLIENT_NS, ST, UL},
};
use crate::cmd;

pub(super) fn down() -> anyhow::Result<()> {
    if !cmd::is_root() {
        bail!("cluster down must run as root");
    }
    let nodes = recorded_nodes().unwrap_or(9);
    for n in 1..=nodes {
        stop_agent(n);
    }
    // dockerd stops the containers, the stack's agents among them, before their pins go.
    for n in (1..=nodes).rev() {
        if node_dir(n).exists() {
            stop_node(n);
        }
    }
    for n in 1..=nodes {
        uninstall_agent(n);
    }
    for ns in (1..=nodes)
        .map(|n| format!("mc-n{n}"))
        .chain([CLIENT_NS.to_string(), UL.to_string()])
    {
        let _ = Command::new("ip")
            .args(["netns", "del", &ns])
            .stderr(Stdio::null())
            .status();
    }
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    for n in 1..=nodes {
        let (e, d) = (exec_root(n), data_root(n));
        let busy = mounts
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1))
            .any(|m| {
                m == e
                    || m.starts_with(&format!("{e}/"))
                    || m == d
                    || m.starts_with(&format!("{d}/"))
            });
        if busy {
            eprintln!("cluster: mounts still present under node {n}, not deleting {e} and {d}");
            continue;
        }
        let _ = std::fs::remove_dir_all(&e);
        let _ = std::fs::remove_dir_all(&d);
    }
    let _ = std::fs::remove_dir_all(ST);
    println!("cluster: down");
    Ok(())
}
