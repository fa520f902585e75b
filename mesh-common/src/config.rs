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
    /// The underlay interface's MTU when the agent loaded the programs: the datapath's
    /// own MTU check where the kernel has no `bpf_check_mtu` (0: no check).
    pub underlay_mtu: u16,
    /// What the running kernel offers ([`FEAT_CHECK_MTU`], ...), probed by the loader.
    /// The programs read it straight from the frozen global, so the verifier knows it
    /// as a constant and never looks at the path a kernel cannot run.
    pub flags: u32,
    /// Address (network order) a task is SNATed to when it reaches its own service and
    /// lands on itself: a packet from its own address would be dropped as martian.
    pub hairpin_addr: u32,
    /// Address (network order) sockets of the node that dial a published port are
    /// pointed at by the cgroup programs; 0 turns them off.
    pub host_addr: u32,
}
crate::assert_size!(MeshConfig, 16);

/// `MeshConfig::flags`: `bpf_check_mtu` (Linux 5.12); without it, the datapath compares
/// against `underlay_mtu` itself.
pub const FEAT_CHECK_MTU: u32 = 1 << 0;
/// `bpf_xdp_load_bytes` / `bpf_xdp_store_bytes` (Linux 5.18); without them, XDP reads and
/// writes the frame by direct packet access.
pub const FEAT_XDP_BYTES: u32 = 1 << 1;
/// `bpf_xdp_adjust_meta` in XDP programs (Linux 4.15, but some kernels' builds refuse
/// it): without it, XDP validates VXLAN and leaves taking it apart to TC (no metadata
/// can carry the peer and VNI across).
pub const FEAT_XDP_META: u32 = 1 << 2;
/// `bpf_skb_adjust_room`'s `BPF_F_ADJ_ROOM_ENCAP_L2_ETH` (Linux 5.13), which tells the
/// kernel the tunnel carries Ethernet (for GSO); without it the flag is left out (the
/// helper refuses a flag it does not know, at run time: the verifier cannot tell).
pub const FEAT_ENCAP_L2_ETH: u32 = 1 << 3;
/// Every feature.
pub const FEAT_ALL: u32 = FEAT_CHECK_MTU | FEAT_XDP_BYTES | FEAT_XDP_META | FEAT_ENCAP_L2_ETH;
/// Offset of `flags` in [`MeshConfig`] (the programs read that word alone).
pub const FLAGS_OFFSET: usize = 4;

impl MeshConfig {
    pub const DEFAULT: MeshConfig = MeshConfig {
        vxlan_port: crate::proto::VXLAN_PORT_DEFAULT,
        underlay_mtu: 0,
        // The object assumes nothing: the loader sets what it probed, and a plain
        // `bpftool prog loadall` verifies the paths every kernel can run.
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
