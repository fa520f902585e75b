//! The plan's unit: one map write ([`Op`]), in the order the plan must carry it out.

use mesh_common::lb::{
    Backend, Endpoint, EndpointIdle, Frontend, FrontendKey, Local, Network, Service, TaskPort,
    Tunnel,
};

/// One map write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    PutLocal(Local),
    PutPeer(u32, u32),
    PutNetwork(u32, Network),
    PutTunnel(u32, Tunnel),
    DelTunnel(u32),
    DelNetwork(u32),
    DelPeer(u32),
    PutNodeAddr(u32),
    PutEndpoint(u32, Endpoint),
    /// A local task's service's idle timeouts (for flows that come through a tunnel).
    PutEndpointIdle(TaskPort, EndpointIdle),
    PutBackend(u32, Backend),
    /// Maglev slots: (absolute index, backend id).
    PutSlots(Vec<(u32, u32)>),
    PutService(u32, Service),
    PutFrontend(FrontendKey, Frontend),
    DelFrontend(FrontendKey),
    DelService(u32),
    DelBackend(u32),
    DelEndpoint(u32),
    DelEndpointIdle(TaskPort),
    DelNodeAddr(u32),
}

impl Op {
    /// Map entries this operation writes (slots count one each).
    pub fn writes(&self) -> usize {
        match self {
            Op::PutSlots(s) => s.len(),
            _ => 1,
        }
    }
}
