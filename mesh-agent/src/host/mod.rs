//! The node around the datapath: its interfaces (`netdev`), the host port for published
//! ports dialled from the node (`hostport`), Docker's IPVS mesh beside this one
//! (`ipvs`), processes sharing a published port (`listeners`), the prerequisite
//! checks (`preflight`), and the agent's files written whole (`files`).

pub mod files;
pub mod hostport;
pub mod ipvs;
pub mod listeners;
pub mod netdev;
pub mod preflight;
pub mod procnet;
