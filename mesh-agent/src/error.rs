//! Errors of the library. Each says what failed and what to do about it, on one line.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    #[error("must run as root (or with CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON): {what}")]
    NotRoot { what: &'static str },

    #[error(
        "bpffs is not mounted at {path}: run `mount -t bpf bpf {path}` (or `cargo xtask setup`)"
    )]
    BpffsNotMounted { path: PathBuf },

    #[error(
        "kernel {release} is too old: the mesh needs Linux {}.{} or later (missing: {missing})",
        crate::host::preflight::MIN_KERNEL.0,
        crate::host::preflight::MIN_KERNEL.1
    )]
    KernelTooOld { release: String, missing: String },

    /// A setting the agent cannot honour here.
    #[error("{what}")]
    Setting { what: String },

    #[error("interface {name:?} does not exist in this network namespace: check `ip link`")]
    NoSuchInterface { name: String },

    #[error("eBPF object not found (looked in: {tried}); run `cargo xtask build` or set MESH_BPF_OBJECT")]
    ObjectNotFound { tried: String },

    #[error("loading eBPF object {path}: {source}")]
    Load {
        path: PathBuf,
        #[source]
        source: aya::EbpfError,
    },

    #[error("program {program} in the eBPF object: {source}")]
    Program {
        program: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },

    #[error("attaching {program} to {interface}: {source}")]
    Attach {
        program: &'static str,
        interface: String,
        #[source]
        source: aya::programs::ProgramError,
    },

    #[error(
        "{hook} link on {interface} cannot be pinned ({detail}): the mesh needs bpf links \
             (XDP: Linux >= 5.9; cgroup: 5.7; TC: tcx links, 6.6, or netlink filters)"
    )]
    Link {
        hook: &'static str,
        interface: String,
        detail: String,
    },

    #[error("map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: aya::maps::MapError,
    },

    #[error("pinning {what} at {path}: {source}")]
    Pin {
        what: String,
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },

    #[error("trace: {what}")]
    Trace { what: String },

    #[error("no mesh is pinned at {path}: is mesh-agent running? (start it, or pass --bpffs)")]
    NotPinned { path: PathBuf },

    #[error(
        "the mesh pinned at {dir} has another layout ({detail}): it was pinned by another \
             mesh version; stop that agent, then run `mesh-agent --uninstall --bpffs {dir}` \
             (established connections through the mesh are reset) and start this one"
    )]
    Layout { dir: PathBuf, detail: String },

    #[error("{0}")]
    Plan(#[from] crate::plan::PlanError),

    #[error("model: {0}")]
    Model(#[from] crate::model::ModelError),

    /// The host port (published ports from the node itself) cannot be set up.
    #[error("host ports: {0}")]
    HostPort(String),

    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}
