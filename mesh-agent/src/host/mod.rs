//! The node around the datapath: its interfaces (`netdev`), the host port for published
//! ports dialled from the node (`hostport`), Docker's IPVS mesh beside this one
//! (`ipvs`), processes sharing a published port (`listeners`), and the prerequisite
//! checks (`preflight`).

pub mod hostport;
pub mod ipvs;
pub mod listeners;
pub mod netdev;
pub mod preflight;
pub mod procnet;
