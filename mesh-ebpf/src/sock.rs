//! The cgroup socket programs: published ports dialled from the node itself and from its
//! containers (see `mesh_common::sock`). `point` runs at connect() and sendmsg(),
//! `restore` at getpeername() and recvmsg(); both always allow the call.

use aya_ebpf::{
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    programs::SockAddrContext,
};
use mesh_common::{
    lb::{FrontendKey, FE_VIP},
    proto::{IPPROTO_TCP, IPPROTO_UDP},
    reason::Reason,
    sock::{is_loopback, SockKey, SockOrig, NETNS_HOST},
    stats::Hook,
};

use crate::{
    maps::{MESH_FE_V1, MESH_NETNS_V1, MESH_NODE_V1, MESH_SOCK_V1},
    stats::count,
};

const AF_INET: u32 = 2;
/// What a cgroup socket program returns to let the call go on.
const ALLOW: i32 = 1;

/// A socket of one of this node's namespaces dialling a published port on one of the
/// node's addresses (or on loopback) is pointed at the host port; the dialled address is
/// remembered for `restore`. The port is kept: the TC program on the host port finds
/// the frontend by it, as it does for any node address.
#[inline(always)]
pub fn point(ctx: &SockAddrContext) -> i32 {
    let host_addr = crate::config::host_addr();
    // SAFETY: the context the kernel passed; the fields read and written are the ones
    // these attach points allow.
    let sa = unsafe { &mut *ctx.sock_addr };
    if host_addr == 0 || sa.user_family != AF_INET {
        return ALLOW;
    }
    let proto = sa.protocol as u8;
    let addr = sa.user_ip4;
    if (proto != IPPROTO_TCP && proto != IPPROTO_UDP) || addr == host_addr {
        return ALLOW;
    }
    let loopback = is_loopback(addr);
    // SAFETY: copied out at once.
    if !loopback && unsafe { MESH_NODE_V1.get(&addr) }.is_none() {
        return ALLOW;
    }
    // Several nodes may share this machine's cgroup root: only our namespaces' sockets,
    // and loopback only in the node's own (a container's localhost is its own).
    // SAFETY: a helper on the context the kernel passed.
    let ns = unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) };
    // SAFETY: copied out at once.
    match unsafe { MESH_NETNS_V1.get(&ns) }.copied() {
        Some(NETNS_HOST) => {}
        Some(_) if !loopback => {}
        _ => return ALLOW,
    }
    let port = sa.user_port as u16;
    let mut key = FrontendKey {
        addr,
        port,
        proto,
        _pad: 0,
    };
    // SAFETY: copied out at once.
    let fe = match unsafe { MESH_FE_V1.get(&key) } {
        Some(fe) => *fe,
        None => {
            key.addr = 0;
            // SAFETY: as above.
            match unsafe { MESH_FE_V1.get(&key) } {
                Some(fe) => *fe,
                None => return ALLOW,
            }
        }
    };
    if fe.flags & FE_VIP != 0 {
        return ALLOW;
    }
    // SAFETY: a helper on the context the kernel passed.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    let skey = SockKey::new(cookie, port, proto);
    // SAFETY: copied out at once.
    let known = unsafe { MESH_SOCK_V1.get(&skey) }.is_some_and(|o| o.addr == addr);
    if !known && MESH_SOCK_V1.insert(&skey, &SockOrig { addr }, 0).is_err() {
        // Without the way back the application would see the host port's address as
        // its peer: leave this socket alone.
        return ALLOW;
    }
    sa.user_ip4 = host_addr;
    count(Hook::Sock, Reason::FwdToTask, 0);
    ALLOW
}

/// getpeername() and recvmsg() of a socket `point` redirected: the host port's address
/// becomes the one the application dialled.
#[inline(always)]
pub fn restore(ctx: &SockAddrContext) -> i32 {
    let host_addr = crate::config::host_addr();
    // SAFETY: as in `point`.
    let sa = unsafe { &mut *ctx.sock_addr };
    if host_addr == 0 || sa.user_family != AF_INET || sa.user_ip4 != host_addr {
        return ALLOW;
    }
    // SAFETY: a helper on the context the kernel passed.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    let key = SockKey::new(cookie, sa.user_port as u16, sa.protocol as u8);
    // SAFETY: copied out at once.
    if let Some(o) = unsafe { MESH_SOCK_V1.get(&key) }.copied() {
        sa.user_ip4 = o.addr;
    }
    ALLOW
}
