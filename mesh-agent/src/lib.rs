//! The mesh's user-space library: loading and attaching the kernel programs, the model
//! of a node (from a file, or derived from the Swarm) and the reconciler that keeps the
//! maps equal to it, reading the counters, and the checks that turn a missing
//! prerequisite into one line a user can act on. The `mesh-agent` daemon and the
//! `meshctl` CLI are thin layers over it.

// MeshError carries aya's errors by value; they occur on cold paths (load, attach,
// map writes), where a larger Result costs nothing that matters.
#![allow(clippy::result_large_err)]

pub mod agent;
pub mod docker;
pub mod error;
pub mod facts;
pub mod features;
pub mod hostport;
pub mod http;
pub mod inspect;
pub mod ipvs;
pub mod listeners;
pub mod loader;
pub mod maglev;
pub mod maps;
pub mod mesh;
pub mod metrics;
pub mod model;
pub mod netdev;
pub mod peers;
pub mod pins;
pub mod preflight;
pub mod reconcile;
pub mod settings;
pub mod stats;
pub mod swarm;
pub mod sys;
pub mod tcnl;
pub mod trace;

pub use error::MeshError;
