//! The mesh's user-space library: loading and attaching the kernel programs, the model
//! of a node (from a file, or derived from the Swarm) and the reconciler that keeps the
//! maps equal to it, reading the counters, and the checks that turn a missing
//! prerequisite into one line a user can act on. The `mesh-agent` daemon and the
//! `meshctl` CLI are thin layers over it.

// MeshError carries aya's errors by value; they occur on cold paths (load, attach,
// map writes), where a larger Result costs nothing that matters.
#![allow(clippy::result_large_err)]

pub mod agent;
pub mod ctl;
pub mod datapath;
pub mod error;
pub mod host;
pub mod http;
pub mod model;
pub mod plan;
pub mod source;

pub use error::MeshError;
