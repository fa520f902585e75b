//! Two namespaces joined by a veth: the client side `a` (va, 10.203.0.1, MAC_A) and
//! the node side `b` (vb, 10.203.0.2, MAC_B), where the programs attach. All traffic a
//! test sends goes from `a` to `b`'s own address over this veth.

use crate::{
    netns::Netns,
    packets::{MAC_A, MAC_B},
};

pub const ADDR_A: &str = "10.203.0.1";
pub const ADDR_B: &str = "10.203.0.2";

pub struct VethPair {
    // Field order matters: namespaces are deleted when the pair drops, after any user
    // of the pair's sockets has finished.
    pub a: Netns,
    pub b: Netns,
}

fn mac(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

impl VethPair {
    pub fn new(tag: &str) -> VethPair {
        let a = Netns::new(&format!("{tag}a"));
        let b = Netns::new(&format!("{tag}b"));
        for ns in [&a, &b] {
            // No IPv6 autoconfiguration chatter: the tests count every packet.
            ns.exec(&["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"]);
            ns.exec(&["sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1"]);
        }
        a.ip(&[
            "link",
            "add",
            "va",
            "address",
            &mac(MAC_A),
            "type",
            "veth",
            "peer",
            "name",
            "vb",
            "address",
            &mac(MAC_B),
            "netns",
            b.name(),
        ]);
        for (ns, dev, addr) in [(&a, "va", ADDR_A), (&b, "vb", ADDR_B)] {
            ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", dev]);
            ns.ip(&["link", "set", dev, "up"]);
        }
        // Static neighbours: no ARP on the wire while counting.
        a.ip(&[
            "neigh",
            "add",
            ADDR_B,
            "lladdr",
            &mac(MAC_B),
            "dev",
            "va",
            "nud",
            "permanent",
        ]);
        b.ip(&[
            "neigh",
            "add",
            ADDR_A,
            "lladdr",
            &mac(MAC_A),
            "dev",
            "vb",
            "nud",
            "permanent",
        ]);
        VethPair { a, b }
    }
}

/// Sends raw Ethernet frames out of `ifname` (call inside the namespace that owns it).
pub fn send_raw(ifname: &str, frames: &[&[u8]]) {
    let ifindex = mesh_agent::host::preflight::ifindex(ifname).expect("ifindex");
    // SAFETY: plain socket/sendto calls with valid buffers; the fd is closed below.
    unsafe {
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
        assert!(
            fd >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        let mut sll: libc::sockaddr_ll = std::mem::zeroed();
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_ifindex = ifindex as i32;
        sll.sll_halen = 6;
        for f in frames {
            sll.sll_addr[..6].copy_from_slice(&f[..6]);
            let n = libc::sendto(
                fd,
                f.as_ptr().cast(),
                f.len(),
                0,
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            );
            assert_eq!(
                n,
                f.len() as isize,
                "sendto: {}",
                std::io::Error::last_os_error()
            );
        }
        libc::close(fd);
    }
}

/// Sends `n` UDP datagrams of `payload` bytes from `a` to `b`'s port `port`, one in
/// flight at a time, and asserts each one arrives.
pub fn udp_ping(pair: &VethPair, port: u16, n: u64, payload: usize) {
    use std::{net::UdpSocket, time::Duration};
    let srv = pair
        .b
        .enter(|| UdpSocket::bind((ADDR_B, port)).expect("bind udp in b"));
    let cli = pair
        .a
        .enter(|| UdpSocket::bind((ADDR_A, 0)).expect("bind udp in a"));
    srv.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = vec![0u8; payload + 1];
    for i in 0..n {
        cli.send_to(&vec![i as u8; payload], (ADDR_B, port))
            .expect("udp send");
        let (got, _) = srv.recv_from(&mut buf).expect("udp datagram lost");
        assert_eq!(got, payload);
    }
}
