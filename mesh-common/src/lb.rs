//! Load-balancing maps: frontends, services, Maglev slots, backends, local endpoints,
//! node addresses. Addresses and ports are stored in network byte order, exactly as
//! they appear in packets, so the kernel compares and copies them without swapping.

/// Default capacities (overridable at load time).
pub const MAX_FRONTENDS: u32 = 65536;

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// (frontend address, port, protocol). `addr == 0` means "any address of this node"
/// (an ingress- or host-mode published port). `port == 0 && proto == 0` is a VIP on
/// Docker's overlay that takes every port and protocol, as Docker's own VIPs do (its
/// backends' port 0: the port the client dialled); only the overlay hooks look it up.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FrontendKey {
    pub addr: u32,
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}
crate::assert_size!(FrontendKey, 8);

pub const FE_INGRESS: u32 = 1 << 0;
pub const FE_HOST: u32 = 1 << 1;
pub const FE_VIP: u32 = 1 << 2;

/// The key of an every-port VIP (see [`FrontendKey`]).
#[inline(always)]
pub const fn any_port_vip(addr: u32) -> FrontendKey {
    FrontendKey {
        addr,
        port: 0,
        proto: 0,
        _pad: 0,
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Frontend {
    /// Index into the services map (never 0).
    pub svc_id: u32,
    /// `FE_*`.
    pub flags: u32,
}
crate::assert_size!(Frontend, 8);

pub const SVC_AFFINITY: u32 = 1 << 0;

/// A load-balancing group: its Maglev region and its flow timeouts. A host-mode port
/// gets its own group whose table holds only this node's tasks.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Service {
    /// First slot of this service's region in the Maglev array.
    pub maglev_off: u32,
    /// Region size (a prime > 100 x backends), 0 when there is no active backend.
    pub maglev_size: u32,
    pub active: u32,
    /// `SVC_*`.
    pub flags: u32,
    /// Idle timeout of an established TCP flow, seconds.
    pub tcp_idle_s: u32,
    /// Idle timeout of a UDP flow, seconds.
    pub udp_idle_s: u32,
    /// Client-IP affinity window, seconds (with `SVC_AFFINITY`).
    pub affinity_s: u32,
    pub _pad: u32,
}
crate::assert_size!(Service, 32);

/// The slot of a flow in its service's Maglev region (an offset from `maglev_off`; the
/// region must not be empty): the flow's hash, or the client address's alone with
/// client affinity. `salt` (0: the flow's own slot) moves a retry to another slot,
/// unless affinity must keep it. The one formula: the kernel, `meshctl trace` and the
/// agent's model of the maps all pick with it.
#[inline(always)]
pub const fn maglev_slot(
    svc: &Service,
    saddr: u32,
    daddr: u32,
    sport: u16,
    dport: u16,
    proto: u8,
    salt: u32,
) -> u32 {
    let h = if svc.flags & SVC_AFFINITY != 0 {
        crate::hash::flow_hash(saddr, 0, 0, 0, proto)
    } else {
        crate::hash::flow_hash(saddr, daddr, sport, dport, proto)
            .wrapping_add(salt.wrapping_mul(0x9e37_79b1))
    };
    h % svc.maglev_size
}

pub const TCP_IDLE_DEFAULT_S: u32 = 8000;
pub const UDP_IDLE_DEFAULT_S: u32 = 300;

#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum BackendState {
    /// Takes new flows (is in the Maglev table).
    Active = 1,
    /// Keeps its flows, takes no new ones (not in the table).
    Draining = 2,
    /// Its flows are answered with RST / ICMP unreachable.
    Gone = 3,
}

impl BackendState {
    pub const fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Active),
            2 => Some(Self::Draining),
            3 => Some(Self::Gone),
            _ => None,
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    /// The task's address (the key of its endpoint when it runs on this node).
    pub addr: u32,
    /// Port the task listens on.
    pub port: u16,
    /// `BackendState`.
    pub state: u8,
    pub _pad: u8,
    pub svc_id: u32,
}
crate::assert_size!(Backend, 12);

/// A task on this node: how to hand it a packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Endpoint {
    /// Host-side interface of the task's veth.
    pub ifindex: u32,
    /// Address the task is reached at on that veth (DNAT target).
    pub delivery_addr: u32,
    /// The task's MAC on the veth.
    pub mac: [u8; 6],
    /// The host side's MAC (source of what we hand the task).
    pub host_mac: [u8; 6],
}
crate::assert_size!(Endpoint, 20);

/// A task's port on this node (port in network order; 0: every port, an every-port
/// VIP's backend).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct TaskPort {
    pub addr: u32,
    pub port: u16,
    pub _pad: u16,
}
crate::assert_size!(TaskPort, 8);

/// A task's port on this node: its service's idle timeouts, for the flows that reach it
/// through a tunnel (this node did not balance them, so it has no service for them).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointIdle {
    pub tcp_idle_s: u32,
    pub udp_idle_s: u32,
}
crate::assert_size!(EndpointIdle, 8);

/// Value of the node-address map: flags (reserved).
pub type NodeAddrFlags = u32;

#[cfg(feature = "user")]
mod pod {
    use super::*;
    unsafe impl aya::Pod for FrontendKey {}
    unsafe impl aya::Pod for Frontend {}
    unsafe impl aya::Pod for Service {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for Endpoint {}
    unsafe impl aya::Pod for EndpointIdle {}
    unsafe impl aya::Pod for TaskPort {}
}

// ---- the overlay ----------------------------------------------------------------------

pub const MAX_TUNNELS: u32 = 262144;
pub const MAX_PEERS: u32 = 4096;
pub const MAX_NETWORKS: u32 = 4096;

/// The remote node runs stock Docker (the kernel's vxlan device): it cannot return a
/// reply to a client address outside the overlay, so flows to it are SNATed to this
/// node's address on the network (DATAPATH path 3).
pub const TUN_STOCK: u32 = 1 << 0;

/// A task on another node: where to tunnel to reach it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tunnel {
    /// The node's underlay address (outer destination).
    pub node: u32,
    /// VNI of the network the task is reached on.
    pub vni: u32,
    /// `TUN_*`.
    pub flags: u32,
    pub _pad: u32,
}
crate::assert_size!(Tunnel, 16);

pub const PEER_MESH: u32 = 1 << 0;
pub const PEER_STOCK: u32 = 1 << 1;

/// [`Network::flags`]: Docker's kernel vxlan device carries this network's traffic (a
/// user overlay network); the mesh passes its VXLAN on untouched and acts only at the
/// tasks' overlay veths (VIPs). Without it (the ingress network, the test topologies)
/// the mesh's own tunnels use the VNI and it takes their VXLAN apart itself.
pub const NET_DOCKER: u32 = 1 << 0;

/// An overlay network this node is on, by VNI.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Network {
    /// This node's own address on the network (Docker's per-node ingress endpoint): the
    /// source of SNATed flows to stock nodes, and of the inner MAC (02:42 + address).
    pub local_addr: u32,
    /// `NET_*`.
    pub flags: u32,
}
crate::assert_size!(Network, 8);

/// This node on the underlay (a one-entry array).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Local {
    /// The underlay interface: encapsulated packets leave through it.
    pub ifindex: u32,
    /// This node's underlay address: outer source of what it encapsulates.
    pub addr: u32,
}
crate::assert_size!(Local, 8);

/// Docker's MAC convention for an overlay endpoint: 02:42 followed by its IPv4 address.
#[inline(always)]
pub const fn docker_mac(addr: u32) -> [u8; 6] {
    let a = addr.to_ne_bytes();
    [0x02, 0x42, a[0], a[1], a[2], a[3]]
}

#[cfg(feature = "user")]
mod pod_overlay {
    use super::*;
    unsafe impl aya::Pod for Tunnel {}
    unsafe impl aya::Pod for Network {}
    unsafe impl aya::Pod for Local {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maglev_slot_keeps_affinity_and_moves_retries() {
        let svc = Service {
            maglev_size: 1021,
            ..Service::default()
        };
        let slot =
            |s: &Service, sport, salt| maglev_slot(s, 0x0a00_0001, 0x0a00_0002, sport, 80, 6, salt);
        assert!((0..2000).all(|p| slot(&svc, p, 0) < 1021));
        assert_eq!(
            slot(&svc, 40000, 0),
            crate::hash::flow_hash(0x0a00_0001, 0x0a00_0002, 40000, 80, 6) % 1021
        );
        assert_ne!(slot(&svc, 40000, 0), slot(&svc, 40000, 1), "a retry moves");
        assert_ne!(
            slot(&svc, 40000, 0),
            slot(&svc, 40001, 0),
            "another flow, another slot"
        );
        let sticky = Service {
            flags: SVC_AFFINITY,
            ..svc
        };
        assert_eq!(
            slot(&sticky, 40000, 0),
            slot(&sticky, 40001, 3),
            "affinity: the client alone"
        );
    }
}
