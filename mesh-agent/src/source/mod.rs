//! Where the model comes from: Docker (bollard) and what it says as plain data (`docker`,
//! `facts`), the pure translation of the Swarm into the model (`swarm`), what agents tell
//! each other (`peers`), and the node's model put together from all of them
//! (`from_docker`).

pub mod docker;
pub mod facts;
pub mod from_docker;
pub mod liveness;
pub mod peers;
pub mod swarm;
