//! The agent's flags (each also a `MESH_*` environment variable and a key of the
//! settings file): what `mesh-agent` parses and the agent runs with.

use std::path::PathBuf;

use clap::{Parser, ValueEnum};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Switch {
    On,
    Off,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Xdp {
    /// No XDP program (TC only; the right choice on veth).
    Off,
    /// Native (driver) XDP.
    Native,
    /// Generic (skb) XDP.
    Generic,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Parser, Debug)]
#[command(
    version,
    about = "The mesh's node agent",
    long_about = "The mesh's node agent. On a swarm node: `mesh-agent --from-docker` (the \
                  defaults find the underlay interface from the node's swarm address). Every \
                  flag can also be set in the environment (MESH_*) and in a settings file \
                  (YAML, keys are the long flags: `interface: eth1`); the command line \
                  wins over the environment, which wins over the file."
)]
pub struct Flags {
    /// Settings file (YAML: `flag: value`); read when present.
    #[arg(long, default_value = crate::agent::settings::DEFAULT_PATH, env = "MESH_SETTINGS")]
    pub settings: PathBuf,
    /// Follow the Swarm of the local dockerd: services, tasks, networks, nodes and task
    /// health, through /events and a full resync every --resync-ms.
    #[arg(long, env = "MESH_FROM_DOCKER", conflicts_with = "config")]
    pub from_docker: bool,
    /// Instead of Docker: a static model of services, backends and local endpoints
    /// (YAML; see README), re-read on SIGHUP.
    #[arg(long, env = "MESH_CONFIG")]
    pub config: Option<PathBuf>,
    /// Underlay interface (default: the one holding the swarm address, or the config
    /// file's `underlay`).
    #[arg(long, env = "MESH_INTERFACE")]
    pub interface: Option<String>,
    /// Also attach the XDP program to the underlay interface.
    #[arg(long, value_enum, default_value = "off", env = "MESH_XDP")]
    pub xdp: Xdp,
    /// How TC programs are attached: tcx links (Linux 6.6), netlink clsact filters, or
    /// whichever the kernel offers. Features can also be turned off for tests with
    /// MESH_FORCE_FALLBACKS=tcx,check_mtu,xdp_bytes,xdp_meta,encap_l2_eth,netns_cookie.
    #[arg(long, value_enum, default_value = "auto", env = "MESH_TC_ATTACH")]
    pub tc_attach: crate::datapath::features::TcAttach,
    /// Directory on bpffs where maps and program links are pinned.
    #[arg(long, default_value = "/sys/fs/bpf/mesh", env = "MESH_BPFFS")]
    pub bpffs: PathBuf,
    /// Directory for the agent's small state file (service names and id counters that a
    /// restarted agent needs to adopt the pinned maps).
    #[arg(long, default_value = "/run/mesh", env = "MESH_STATE_DIR")]
    pub state_dir: PathBuf,
    /// VXLAN data-path port (as `docker swarm init --data-path-port`).
    /// With --from-docker the swarm's own port is used (a different one given here is
    /// reported); this is for Docker that does not say (before API 1.40) and --config.
    /// Default 4789.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..), env = "MESH_DATA_PATH_PORT")]
    pub data_path_port: Option<u16>,
    /// eBPF object (default: next to this binary, then /usr/local/lib/mesh).
    #[arg(long, env = "MESH_BPF_OBJECT")]
    pub object: Option<PathBuf>,
    /// Docker socket.
    #[arg(
        long,
        default_value = "unix:///var/run/docker.sock",
        env = "MESH_DOCKER"
    )]
    pub docker: String,
    /// Maglev slots for all services together (4 bytes each; a service of N backends
    /// takes the smallest prime above 400 N, e.g. 2039 at 3 backends, so the default
    /// 1,048,576 holds ~500 such services; 1<<25 holds 16,000). Without this flag a
    /// restarted agent keeps the pinned array's size; a larger one grows it, keeping
    /// every flow; a smaller one is refused while pins exist.
    #[arg(long, env = "MESH_MAGLEV_SLOTS",
          value_parser = clap::value_parser!(u32).range(4096..=(1 << 28)))]
    pub maglev_slots: Option<u32>,
    /// Conntrack entries, two per flow (an LRU, allocated whole: 152 bytes an entry).
    /// Default 2,097,152 (1,048,576 flows, 304 MiB). Fixed while pins exist: without
    /// this flag a restarted agent keeps the pinned map's size.
    #[arg(long, env = "MESH_CT_ENTRIES",
          value_parser = clap::value_parser!(u32).range(1024..=(1 << 28)))]
    pub ct_entries: Option<u32>,
    /// Where Docker's netns directory (`<exec-root>/netns`: task sandboxes and overlay
    /// namespaces) is mounted for this agent, when not at the path Docker reports (the
    /// agent in a container: deploy/mesh-stack.yml mounts it at /run/docker-netns).
    #[arg(long, env = "MESH_DOCKER_NETNS")]
    pub docker_netns: Option<PathBuf>,
    /// Full resync period with --from-docker, milliseconds (events make most changes
    /// immediate; this heals anything an event did not say, e.g. tasks on other nodes).
    #[arg(long, default_value_t = 1000, env = "MESH_RESYNC_MS")]
    pub resync_ms: u64,
    /// How long a task that left the Swarm's view keeps its established flows (draining)
    /// before its backend is removed, milliseconds (Docker's default stop grace period).
    #[arg(long, default_value_t = 10_000, env = "MESH_DRAIN_MS")]
    pub drain_ms: u64,
    /// Port on this node's swarm address where agents exchange which of their tasks fail
    /// their HEALTHCHECK (Docker's gossip only drops such a task once it has exited);
    /// 0 turns the exchange off. Open it between nodes like the swarm's own ports.
    #[arg(long, default_value_t = mesh_common::proto::PEER_PORT_DEFAULT, env = "MESH_PEER_PORT")]
    pub peer_port: u16,
    /// Run `meshctl trace --node` requests from the swarm's other nodes (on --peer-port).
    /// Off by default: the endpoint is unauthenticated, and a container on any node can
    /// reach it from its node's address.
    #[arg(long, env = "MESH_SERVE_TRACES")]
    pub serve_traces: bool,
    /// Period of the quick check for tasks the orchestrator is shutting down (a
    /// manager's /tasks, or the managers' reports), milliseconds; 0 turns it off.
    #[arg(long, default_value_t = 200, env = "MESH_QUICK_MS")]
    pub quick_ms: u64,
    /// How long a task that joins a service waits before it takes new flows,
    /// milliseconds (Docker lists it before its ingress redirect is in place); skipped
    /// when the service has no other backend.
    #[arg(long, default_value_t = 1000, env = "MESH_WARMUP_MS")]
    pub warmup_ms: u64,
    /// Published ports (and VIPs with ports) dialled from the node itself and from its
    /// containers: cgroup socket programs point such sockets at the host port (a veth
    /// pair, mesh-host0/1) where the task program balances them.
    #[arg(long, value_enum, default_value = "on", env = "MESH_HOST_PORTS")]
    pub host_ports: Switch,
    /// The cgroup v2 directory the socket programs attach to (default: /sys/fs/cgroup or
    /// /sys/fs/cgroup/unified, whichever is a cgroup v2 mount).
    #[arg(long, env = "MESH_CGROUP")]
    pub cgroup: Option<PathBuf>,
    /// Network namespaces (files) whose sockets reach published ports through the mesh,
    /// beyond this node's own and, with --from-docker, every one in Docker's netns
    /// directory (its containers). Comma-separated in the environment.
    #[arg(long = "host-netns", env = "MESH_HOST_NETNS", value_delimiter = ',')]
    pub host_netns: Vec<PathBuf>,
    /// The host port's address (link-local; never leaves the node).
    #[arg(long, default_value = "169.254.42.2", env = "MESH_HOST_ADDR")]
    pub host_addr: std::net::Ipv4Addr,
    /// Prometheus endpoint (`/metrics`), or `off`.
    #[arg(long, default_value = "127.0.0.1:9477", env = "MESH_METRICS")]
    pub metrics: String,
    /// Log format on stderr (filter with MESH_LOG, e.g. MESH_LOG=debug).
    #[arg(long, value_enum, default_value = "text", env = "MESH_LOG_FORMAT")]
    pub log_format: LogFormat,
    /// Print the model of this node that the Swarm implies (YAML, the --config format)
    /// and exit.
    #[arg(long)]
    pub print_docker_model: bool,
    /// Detach the programs and remove every pin under --bpffs and the state file, then
    /// exit (connections through the mesh stop).
    #[arg(long)]
    pub uninstall: bool,
}
