//! `cargo xtask cluster`'s subcommands and their dispatch.

use std::{collections::BTreeSet, path::Path, process::Command};

use anyhow::{bail, Context};
use clap::Subcommand;

use super::{
    agent::{agent_paths, start_agent, stop_agent},
    dockerd::{docker, restart_dockerd, DockerdAction},
    down::down,
    layout::{is_stock, node_dir, tempdir, CLIENT_NS, ST},
    pids::dockerd_pid,
    pids::{alive, kill_checked, read_pid, wait_gone},
    self_test,
    status::status,
    test_image::{import_image, rootfs_in, IMAGE},
    up::{engine_plan, up},
};

#[derive(Subcommand)]
pub enum Cluster {
    /// Build the swarm (idempotent): N nodes, M of them managers, the busybox image
    /// `mesh-test/busybox:latest` imported into every node, a client namespace.
    Up {
        #[arg(long, default_value_t = 3)]
        nodes: u32,
        #[arg(long, default_value_t = 1)]
        managers: u32,
        /// Also run `mesh-agent --from-docker` on every node but the stock ones (release
        /// build; `cargo xtask build` first).
        #[arg(long)]
        mesh: bool,
        /// The Docker engine of every node: 20.10 (the system's docker.io), 28.5 (Debian
        /// unstable's, fetched into $MESH_ENGINES_CACHE on first use), 26.1 (Debian 13's).
        #[arg(long)]
        engine: Option<String>,
        /// One engine per node, in node order (`28.5,20.10,20.10`); overrides --engine.
        #[arg(long, value_delimiter = ',')]
        engines: Vec<String>,
        /// Stock Docker nodes (`--stock 3` or `2,3`): no mesh-agent there, even with
        /// --mesh, as on a node a rollout has not reached yet.
        #[arg(long, value_delimiter = ',')]
        stock: Vec<u32>,
        /// The swarm's VXLAN port (`docker swarm init --data-path-port`); Docker's
        /// default 4789 without it.
        #[arg(long)]
        data_path_port: Option<u16>,
        /// dockerd's `userland-proxy` on every node (Docker's default: true).
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        userland_proxy: bool,
    },
    /// Nodes, their underlay addresses, roles and dockerd state; the client's address.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// The docker CLI against node NODE (1-based): `cluster docker 1 -- service ls`.
    Docker {
        node: u32,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run a command inside node NODE (its network, mount and UTS namespaces).
    Exec {
        node: u32,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        cmd: Vec<String>,
    },
    /// Run a command inside the client namespace.
    Client {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        cmd: Vec<String>,
    },
    /// Control node NODE's mesh-agent: `start`, `stop` (SIGTERM: the pinned datapath
    /// keeps forwarding), `kill` (SIGKILL, as a crash would), `restart`. `start` and
    /// `restart` refuse on a stock node (`up --stock`) unless `--force` (the rollout
    /// reaching that node; it stays recorded as stock).
    Agent {
        node: u32,
        #[arg(value_enum)]
        action: AgentAction,
        /// Start the agent on a stock node all the same.
        #[arg(long)]
        force: bool,
    },
    /// Restart node NODE's dockerd, as an engine upgrade or a crash would: `restart`
    /// (SIGTERM: Docker stops its containers and tears its networks down) or `kill`
    /// (SIGKILL of dockerd, then of its containerd and shims: nothing is cleaned up),
    /// then start it again with the node's engine. The node's mesh-agent, which lives in
    /// dockerd's mount namespace here, is stopped before (SIGTERM: its datapath keeps
    /// forwarding) and started after, adopting its pins.
    Dockerd {
        node: u32,
        #[arg(value_enum)]
        action: DockerdAction,
    },
    /// Stop only what `up` started (recorded PIDs) and remove every namespace, interface,
    /// mount and directory it made.
    Down,
    /// The harness's own check, as `cargo xtask test` runs it (2 nodes, a service, the
    /// agents' Docker source, the mesh on both, `down` leaving nothing behind).
    #[command(hide = true)]
    SelfTest,
    /// Import the test image `mesh-test/busybox:latest` (busybox-static: httpd, nc, sh,
    /// and the /cgi-bin/who page) into the dockerd at DOCKER, e.g.
    /// `unix:///var/run/docker.sock` (the single-node test's machine dockerd).
    Image {
        #[arg(long)]
        docker: String,
    },
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum AgentAction {
    Start,
    Stop,
    Kill,
    Restart,
}

pub fn run(c: Cluster) -> anyhow::Result<()> {
    match c {
        Cluster::Up {
            nodes,
            managers,
            mesh,
            engine,
            engines,
            stock,
            data_path_port,
            userland_proxy,
        } => {
            let names = engine_plan(nodes, engine.as_deref(), &engines)?;
            let stock: BTreeSet<u32> = stock.into_iter().collect();
            if let Some(bad) = stock.iter().find(|s| !(1..=nodes).contains(*s)) {
                bail!("--stock {bad}: nodes are 1..{nodes}");
            }
            up(
                nodes,
                managers,
                &names,
                &stock,
                data_path_port,
                userland_proxy,
            )?;
            if mesh {
                let (agent, object) = agent_paths();
                for n in (1..=nodes).filter(|n| !stock.contains(n)) {
                    if read_pid(&node_dir(n).join("mesh-agent.pid")).is_some_and(alive) {
                        continue;
                    }
                    start_agent(n, &agent, &object)?;
                }
                if stock.is_empty() {
                    println!("cluster: mesh-agent running on every node (logs in {ST}/node<N>/mesh-agent.log)");
                } else {
                    println!(
                        "cluster: mesh-agent running on every node but the stock ones ({}) (logs in {ST}/node<N>/mesh-agent.log)",
                        stock.iter().map(u32::to_string).collect::<Vec<_>>().join(", ")
                    );
                }
            }
            Ok(())
        }
        Cluster::Status { json } => status(json),
        Cluster::Docker { node, args } => {
            if !node_dir(node).exists() {
                bail!("node {node} is not up (`cargo xtask cluster up` first)");
            }
            let st = docker(node, &[])
                .args(&args)
                .status()
                .context("running docker")?;
            std::process::exit(st.code().unwrap_or(1));
        }
        Cluster::Dockerd { node, action } => restart_dockerd(node, action),
        Cluster::Exec { node, cmd } => {
            let pid = dockerd_pid(node).with_context(|| format!("node {node} is not up"))?;
            let st = Command::new("nsenter")
                .args(["-t", &pid.to_string(), "-n", "-m", "-u", "--"])
                .args(&cmd)
                .status()?;
            std::process::exit(st.code().unwrap_or(1));
        }
        Cluster::Client { cmd } => {
            let st = Command::new("nsenter")
                .arg(format!("--net=/run/netns/{CLIENT_NS}"))
                .arg("--")
                .args(&cmd)
                .status()?;
            std::process::exit(st.code().unwrap_or(1));
        }
        Cluster::Agent {
            node,
            action,
            force,
        } => {
            if !node_dir(node).exists() {
                bail!("node {node} is not up (`cargo xtask cluster up` first)");
            }
            let starts = matches!(action, AgentAction::Start | AgentAction::Restart);
            if starts && is_stock(node) && !force {
                bail!(
                    "node {node} is a stock Docker node (`cluster up --stock`): it runs no \
                     mesh-agent; `cluster agent {node} start --force` starts one all the same"
                );
            }
            let (agent, object) = agent_paths();
            match action {
                AgentAction::Start => {
                    start_agent(node, &agent, &object)?;
                }
                AgentAction::Stop => stop_agent(node),
                AgentAction::Kill => {
                    let pid = read_pid(&node_dir(node).join("mesh-agent.pid"))
                        .with_context(|| format!("no mesh-agent recorded on node {node}"))?;
                    kill_checked(pid, "mesh-agent", libc::SIGKILL);
                    wait_gone(pid, 5);
                    let _ = std::fs::remove_file(node_dir(node).join("mesh-agent.pid"));
                }
                AgentAction::Restart => {
                    stop_agent(node);
                    start_agent(node, &agent, &object)?;
                }
            }
            Ok(())
        }
        Cluster::Down => down(),
        Cluster::SelfTest => {
            println!("swarm: {}", self_test()?);
            Ok(())
        }
        Cluster::Image { docker } => {
            let dir = tempdir("mesh-image")?;
            let r =
                rootfs_in(&dir).and_then(|root| import_image(&root, Path::new("docker"), &docker));
            let _ = std::fs::remove_dir_all(&dir);
            r?;
            println!("cluster: {IMAGE} imported into {docker}");
            Ok(())
        }
    }
}
