//! Published ports and VIPs dialled from the node itself and from its containers: what
//! the cgroup socket programs share with the agent.
//!
//! Traffic born on the node never crosses the underlay's ingress hook. At `connect()` /
//! `sendmsg()` a socket dialling a published port on one of the node's addresses is
//! pointed at the *host port* address instead (`MeshConfig::host_addr`, routed into the
//! mesh's own veth pair, where the task-side TC program balances it as it does a task's
//! request); the dialled address is remembered per socket so `getpeername()` and
//! `recvmsg()` give it back. Only sockets in the node's own network namespaces are
//! touched: several nodes (the namespace cluster) may share one machine's cgroup root.

/// The node's own namespace: loopback (`localhost:8080`) is the node's too.
pub const NETNS_HOST: u32 = 1;
/// A container's namespace on this node: its loopback is its own, untouched.
pub const NETNS_CONTAINER: u32 = 2;

/// A socket and the port it dialled (network byte order, as the kernel gives it).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockKey {
    pub cookie: u64,
    pub port: u16,
    pub proto: u8,
    pub _pad: [u8; 5],
}
crate::assert_size!(SockKey, 16);

impl SockKey {
    pub const fn new(cookie: u64, port: u16, proto: u8) -> SockKey {
        SockKey {
            cookie,
            port,
            proto,
            _pad: [0; 5],
        }
    }
}

/// The address a socket dialled, before it was pointed at the host port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockOrig {
    pub addr: u32,
}
crate::assert_size!(SockOrig, 4);

/// Whether `addr` (network order) is in 127.0.0.0/8.
#[inline(always)]
pub const fn is_loopback(addr: u32) -> bool {
    u32::from_be(addr) >> 24 == 127
}

#[cfg(feature = "user")]
unsafe impl aya::Pod for SockKey {}
#[cfg(feature = "user")]
unsafe impl aya::Pod for SockOrig {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_the_whole_slash_8() {
        for a in [[127, 0, 0, 1], [127, 255, 1, 2], [127, 0, 0, 0]] {
            assert!(is_loopback(u32::from_ne_bytes(a)), "{a:?}");
        }
        for a in [[128, 0, 0, 1], [10, 0, 0, 127], [126, 255, 255, 255]] {
            assert!(!is_loopback(u32::from_ne_bytes(a)), "{a:?}");
        }
    }
}
