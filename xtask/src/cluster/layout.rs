//! Where everything of the cluster lives: the state directory and what `up` records in
//! it, the namespaces, the underlay's addresses, each node's exec-root and data-root.

use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::engines::Engine;

pub const ST: &str = "/run/mesh-cluster";
pub(super) const UL: &str = "mc-ul";
pub const CLIENT_NS: &str = "mc-c";
const NET: &str = "10.251.0";
pub(super) const POOL: &str = "10.252.0.0/16";
pub const CLIENT_ADDR: &str = "10.251.0.100";

/// The swarm's data-path port, when `up` was given one (a file in the cluster's state
/// directory), for the agents.
pub(super) const ST_DIR_DATA_PATH_PORT: &str = "data-path-port";

/// Present when `up` was given `--userland-proxy false`: every start of a node's
/// dockerd (`dockerd N restart` too) keeps the setting.
pub(super) const ST_NO_USERLAND_PROXY: &str = "no-userland-proxy";

pub(super) fn node_dir(n: u32) -> PathBuf {
    Path::new(ST).join(format!("node{n}"))
}

pub(super) fn exec_root(n: u32) -> String {
    format!("/run/mesh-swarm{n}")
}

pub(super) fn data_root(n: u32) -> String {
    format!("/var/lib/mesh-swarm{n}")
}

pub fn sock(n: u32) -> String {
    format!("unix://{}/docker.sock", exec_root(n))
}

pub fn node_addr(n: u32) -> String {
    format!("{NET}.{}", 10 + n)
}

/// `<hostname>` -> the node's exec-root links (see `up`).
pub fn by_host_dir() -> PathBuf {
    Path::new(ST).join("by-host")
}

/// The docker sockets of the local cluster's nodes (it must be up).
pub fn node_socks() -> anyhow::Result<Vec<String>> {
    let n = recorded_nodes().context("no local cluster: run `cargo xtask cluster up` first")?;
    Ok((1..=n).map(sock).collect())
}

pub(super) fn recorded_nodes() -> Option<u32> {
    std::fs::read_to_string(Path::new(ST).join("nodes"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// What `up` recorded of a node: its engine and whether it is a stock Docker node.
#[derive(Debug)]
pub struct NodeRec {
    pub engine: String,
    pub bin: PathBuf,
    pub version: String,
    pub stock: bool,
}

pub(super) fn write_rec(n: u32, e: &Engine, stock: bool) -> anyhow::Result<()> {
    let d = node_dir(n);
    std::fs::create_dir_all(&d)?;
    std::fs::write(
        d.join("engine"),
        format!(
            "name {}\nbin {}\nversion {}\n",
            e.name,
            e.bin.display(),
            e.version
        ),
    )?;
    if stock {
        std::fs::write(d.join("stock"), "")?;
    }
    Ok(())
}

pub fn node_rec(n: u32) -> Option<NodeRec> {
    let text = std::fs::read_to_string(node_dir(n).join("engine")).ok()?;
    let field = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{k} ")))
            .map(str::to_string)
    };
    Some(NodeRec {
        engine: field("name")?,
        bin: PathBuf::from(field("bin")?),
        version: field("version").unwrap_or_default(),
        stock: is_stock(n),
    })
}

pub(super) fn is_stock(n: u32) -> bool {
    node_dir(n).join("stock").exists()
}

/// A fresh directory under the system's temporary directory, named for this process.
pub fn tempdir(tag: &str) -> anyhow::Result<PathBuf> {
    let d = std::env::temp_dir().join(format!("{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d)?;
    Ok(d)
}
