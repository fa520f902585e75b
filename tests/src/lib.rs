//! Helpers for the mesh's privileged integration tests (tier 2: fixture tables through
//! BPF_PROG_TEST_RUN; tier 3: real traffic across network namespaces). The tests
//! themselves live in `tests/tests/`; `cargo xtask test` runs them.

// MeshError carries aya's errors by value; they occur on cold paths (load, attach,
// map writes), where a larger Result costs nothing that matters.
#![allow(clippy::result_large_err)]

pub mod bench;
pub mod bound;
pub mod cluster;
pub mod fixture_runner;
pub mod fixtures;
pub mod lbtopo;
pub mod measure;
pub mod netns;
pub mod packets;
pub mod prereq;
pub mod scratch;
pub mod swarm;
pub mod topology;
