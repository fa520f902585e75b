//! Tier 2/3: our VXLAN encapsulation (out of BPF_PROG_TEST_RUN) compared field by field
//! with what Linux's vxlan device produces for the same inner frame (captured on a veth
//! in namespaces the test creates).

#![allow(clippy::result_large_err)] // aya errors by value, on cold paths

use std::time::Duration;

use aya::programs::{TestRun, TestRunOptions};
use mesh_agent::{
    datapath::loader::Datapath,
    datapath::mesh::Mesh,
    model::{desired, from_yaml},
};
use mesh_common::{config::MeshConfig, vxlan};
use mesh_tests::{netns::Netns, packets, prereq, topology::send_raw};

const MODEL: &str = r#"
underlay: u
node: {addr: 10.240.0.1}
node_addrs: [10.240.0.1]
peers: [{addr: 10.240.0.2}]
networks: [{name: ingress, vni: 4096, local_addr: 10.0.0.2}]
services:
  - name: web
    ports: [{published: 8080, target: 80}]
    backends: [{addr: 10.0.0.12, node: 10.240.0.2}]
"#;

/// Our encapsulation of a SYN to the published port (backend on the other node).
fn ours(object: &std::path::Path, port: u16) -> Vec<u8> {
    let cfg = MeshConfig {
        vxlan_port: port,
        ..MeshConfig::DEFAULT
    };
    let mut mesh = Mesh::new(Datapath::load(object, &cfg).expect("load"));
    let d = desired(&from_yaml(MODEL).unwrap(), |_| Ok((1, [0; 6]))).unwrap();
    mesh.apply_desired(&d).unwrap();
    let syn = {
        let mut v = Vec::new();
        etherparse::PacketBuilder::ethernet2(packets::MAC_A, packets::MAC_B)
            .ipv4([10, 230, 0, 100], [10, 240, 0, 1], 64)
            .tcp(40000, 8080, 7, 64240)
            .syn()
            .write(&mut v, &[])
            .unwrap();
        v
    };
    let mut out = vec![0u8; syn.len() + 128];
    let r = mesh
        .dp
        .tc_ingress()
        .unwrap()
        .test_run(TestRunOptions {
            data_in: Some(&syn),
            data_out: Some(&mut out),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(
        r.return_value, 7,
        "TC_ACT_REDIRECT (to the underlay, by the neighbour table)"
    );
    out.truncate(r.data_size_out as usize);
    assert_eq!(out.len(), syn.len() + vxlan::OVERHEAD);
    out
}

/// Linux's vxlan device's encapsulation of `inner`, captured on the wire.
fn kernel(inner: &[u8]) -> Vec<u8> {
    let a = Netns::new("wa");
    let b = Netns::new("wb");
    a.ip(&[
        "link",
        "add",
        "va",
        "type",
        "veth",
        "peer",
        "name",
        "vb",
        "netns",
        b.name(),
    ]);
    a.ip(&["addr", "add", "10.240.0.1/24", "dev", "va"]);
    b.ip(&["addr", "add", "10.240.0.2/24", "dev", "vb"]);
    a.ip(&["link", "set", "va", "up"]);
    b.ip(&["link", "set", "vb", "up"]);
    a.ip(&[
        "link",
        "add",
        "vx0",
        "type",
        "vxlan",
        "id",
        "4096",
        "dstport",
        "4789",
        "local",
        "10.240.0.1",
        "dev",
        "va",
        "nolearning",
    ]);
    a.ip(&["link", "set", "vx0", "up"]);
    let dst_mac = mesh_agent::model::MacAddr(inner[..6].try_into().unwrap()).to_string();
    a.exec(&[
        "bridge",
        "fdb",
        "add",
        &dst_mac,
        "dev",
        "vx0",
        "dst",
        "10.240.0.2",
        "self",
        "permanent",
    ]);
    // Static neighbour on the underlay: no ARP in the capture.
    let vb_mac = String::from_utf8(b.exec(&["cat", "/sys/class/net/vb/address"]).stdout).unwrap();
    a.ip(&[
        "neigh",
        "add",
        "10.240.0.2",
        "lladdr",
        vb_mac.trim(),
        "dev",
        "va",
        "nud",
        "permanent",
    ]);
    // Capture in b: an AF_PACKET socket on vb, opened before the frame is sent.
    let fd = b.enter(|| unsafe {
        let fd = libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW,
            (libc::ETH_P_ALL as u16).to_be() as i32,
        );
        assert!(fd >= 0);
        let mut sll: libc::sockaddr_ll = std::mem::zeroed();
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
        sll.sll_ifindex = mesh_agent::host::preflight::ifindex("vb").unwrap() as i32;
        assert_eq!(
            libc::bind(
                fd,
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32
            ),
            0
        );
        let tv = libc::timeval {
            tv_sec: 3,
            tv_usec: 0,
        };
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        );
        fd
    });
    a.enter(|| send_raw("vx0", &[inner]));
    let mut buf = vec![0u8; 4096];
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        // SAFETY: reading into our buffer from our socket.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
        assert!(
            n > 0,
            "no VXLAN frame captured: {}",
            std::io::Error::last_os_error()
        );
        let f = &buf[..n as usize];
        // IPv4, UDP, to 4789.
        if f.len() > 42 && f[12..14] == [8, 0] && f[23] == 17 && f[36..38] == 4789u16.to_be_bytes()
        {
            unsafe { libc::close(fd) };
            return f.to_vec();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no VXLAN frame captured"
        );
    }
}

#[test]
fn our_encapsulation_matches_linux_vxlan_field_by_field() {
    let Some(object) = prereq::privileged("our_encapsulation_matches_linux_vxlan_field_by_field")
    else {
        return;
    };
    let o = ours(&object, 4789);
    let k = kernel(&o[vxlan::ENCAP_LEN - 14..]);
    assert_eq!(o.len(), k.len(), "frame length");
    let field = |name: &str, r: std::ops::Range<usize>| {
        assert_eq!(
            o[r.clone()],
            k[r.clone()],
            "{name} (bytes {r:?}): ours {:02x?}, Linux {:02x?}",
            &o[r.clone()],
            &k[r.clone()]
        );
    };
    field("ethertype", 12..14);
    field("IP version/IHL and TOS", 14..16);
    field("IP total length", 16..18);
    field("IP flags (DF) and fragment offset", 20..22);
    field("IP TTL and protocol", 22..24);
    field("IP source and destination", 26..34);
    field("UDP destination port", 36..38);
    field("UDP length", 38..40);
    // UDP checksum: Linux's vxlan device (and so Docker's overlay, which does not set
    // IFLA_VXLAN_UDP_CSUM) checksums IPv4 VXLAN, and so do we (by local checksum
    // offload). Ours verifies over the whole datagram; Linux's, captured on a veth, is
    // left for checksum offload to finish (the pseudo-header sum only), so it is only
    // checked to be there. (The values differ with the source ports anyway.)
    let udp_ok = |f: &[u8]| {
        let udp = &f[34..];
        let pseudo = mesh_common::csum::sum(&f[26..34], 0) + 17 + udp.len() as u64;
        u16::from_be_bytes([f[40], f[41]]) != 0
            && mesh_common::csum::fold(mesh_common::csum::sum(udp, pseudo)) == 0xffff
    };
    assert!(udp_ok(&o), "our UDP checksum is present and verifies");
    assert_ne!(k[40..42], [0, 0], "Linux's UDP checksum is present");
    field("VXLAN header (flags, VNI)", 42..50);
    field("inner frame", 50..o.len());
    // Not compared byte for byte: the IP ID and header checksum (Linux numbers its
    // packets) and the UDP source port (each side hashes the flow its own way), but
    // both take the source port from the same range.
    for f in [&o, &k] {
        let sport = u16::from_be_bytes([f[34], f[35]]);
        assert!(
            (vxlan::SPORT_MIN..=vxlan::SPORT_MAX).contains(&sport),
            "source port {sport}"
        );
        assert_eq!(
            mesh_common::csum::fold(mesh_common::csum::sum(&f[14..34], 0)),
            0xffff,
            "IP checksum"
        );
    }
    println!(
        "\nvxlan wire: our encapsulation equals Linux's vxlan device's in every field but IP id/checksum \
         and UDP source port (and so the UDP checksum value; ours verifies) ({} bytes)",
        o.len()
    );
}

#[test]
fn the_data_path_port_is_configurable() {
    let Some(object) = prereq::privileged("the_data_path_port_is_configurable") else {
        return;
    };
    let o = ours(&object, 7789);
    assert_eq!(u16::from_be_bytes([o[36], o[37]]), 7789);
}
