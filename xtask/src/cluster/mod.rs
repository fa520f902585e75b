//! `cargo xtask cluster`: a real Docker Swarm of N nodes on this machine, one network
//! namespace (and mount and UTS namespace) per node with its own dockerd, joined by a
//! bridge in an underlay namespace, plus a client namespace on that underlay. Recipe and
//! pitfalls: ../shared/notes/docker-here.md. Nothing gets a default route: no traffic
//! leaves the machine.
//!
//! Layout: state in /run/mesh-cluster (node count, PIDs, logs, rootfs, each node's
//! engine and stock flag); namespaces `mc-ul` (bridge), `mc-n<i>` (nodes), `mc-c`
//! (client); per node exec-root /run/mesh-swarm<i> (docker.sock) and data-root
//! /var/lib/mesh-swarm<i>.
//!
//! Engines: each node runs one of `crate::engines` (the system's docker.io 20.10 by
//! default, or Debian's 28.5 or 26.1 from the engines' cache), with that engine's bin
//! directory first on its dockerd's PATH and that engine's own docker CLI for everything
//! the harness asks of the node. Nodes run dockerd as real nodes do: with docker0
//! (172.17.0.1/16 in each node's namespace), iptables and the userland proxy on.
//! Stock nodes (`--stock`) never run mesh-agent: a plain Docker node beside mesh nodes,
//! as during a rollout.
//!
//! Files: `cli` (the subcommands), `layout` (the state directory, namespaces, addresses
//! and each node's record), `up` and `down`, `dockerd` (a node's dockerd: started through
//! `node-entry.sh`, waited for, restarted, stopped), `agent` (a node's mesh-agent),
//! `pids` (recorded PIDs, signalled only after checking their command line), `status`,
//! `test_image` (busybox plus `udp-who`), `self_test`.

mod agent;
mod cli;
mod dockerd;
mod down;
mod layout;
mod pids;
mod self_test;
mod status;
mod test_image;
mod up;

pub use agent::{agent_paths, agent_state_file, process_agents_running, AGENT_STATE_DIR};
pub use cli::{run, Cluster};
pub use dockerd::docker;
pub use layout::{by_host_dir, node_addr, node_socks, tempdir, CLIENT_ADDR, CLIENT_NS, ST};
pub use self_test::self_test;
pub use test_image::IMAGE;
