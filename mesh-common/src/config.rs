//! Static configuration handed to the programs by the loader (a read-only global).

/// Symbol name of the global the loader overrides.
pub const CONFIG_GLOBAL: &str = "MESH_CONFIG";

/// Default hairpin SNAT address: link-local, never routed, as Cilium's 169.254.42.1.
pub const HAIRPIN_ADDR_DEFAULT: [u8; 4] = [169, 254, 42, 1];

/// Default host-port address: where sockets on the node that dial a published port are
/// pointed (routed into the mesh's veth pair; see [`crate::sock`]). Link-local too.
pub const HOST_ADDR_DEFAULT: [u8; 4] = [169, 254, 42, 2];

/// Load-time configuration of the datapath.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MeshConfig {
    /// VXLAN data-path port, host byte order (Docker's `--data-path-port`).
    pub vxlan_port: u16,
    pub _pad: u16,
    /// Reserved for feature flags; zero today.
    pub flags: u32,
    /// Address (network order) a task is SNATed to when it reaches its own service and
    /// lands on itself: a packet from its own address would be dropped as martian.
    pub hairpin_addr: u32,
    /// Address (network order) sockets of the node that dial a published port are
    /// pointed at by the cgroup programs; 0 turns them off.
    pub host_addr: u32,
}
crate::assert_size!(MeshConfig, 16);

impl MeshConfig {
    pub const DEFAULT: MeshConfig = MeshConfig {
        vxlan_port: crate::proto::VXLAN_PORT_DEFAULT,
        _pad: 0,
        flags: 0,
        hairpin_addr: u32::from_ne_bytes(HAIRPIN_ADDR_DEFAULT),
        host_addr: u32::from_ne_bytes(HOST_ADDR_DEFAULT),
    };
}

impl Default for MeshConfig {
    fn default() -> Self {
        Self::DEFAULT
    }
}

#[cfg(feature = "user")]
unsafe impl aya::Pod for MeshConfig {}

/// Names of the programs in the eBPF object (the entry points' function names).
pub mod programs {
    pub const XDP_UNDERLAY: &str = "mesh_xdp";
    pub const TC_UNDERLAY_INGRESS: &str = "mesh_tc_ingress";
    pub const TC_TASK: &str = "mesh_tc_task";
    pub const TC_OVERLAY_IN: &str = "mesh_tc_overlay_in";
    pub const TC_OVERLAY_OUT: &str = "mesh_tc_overlay_out";
    pub const SOCK_CONNECT4: &str = "mesh_sock_connect4";
    pub const SOCK_SENDMSG4: &str = "mesh_sock_sendmsg4";
    pub const SOCK_RECVMSG4: &str = "mesh_sock_recvmsg4";
    pub const SOCK_GETPEERNAME4: &str = "mesh_sock_getpeername4";
}
