//! Tier 3: real traffic across network namespaces made by the test, with the programs
//! attached to a veth. The datapath's counters are checked against what was sent and
//! against the kernel's own SNMP counters in the receiving namespace.

#![allow(clippy::result_large_err)] // aya errors by value, on cold paths

use std::{
    io::{Read, Write},
    net::{Shutdown, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use aya::programs::XdpMode;
use mesh_agent::{datapath::loader::Datapath, datapath::stats::Snapshot};
use mesh_common::{
    config::MeshConfig,
    reason::{Kind, Reason},
    stats::{Counter, Hook},
};
use mesh_tests::{
    fixtures,
    netns::snmp,
    prereq,
    topology::{send_raw, udp_ping, VethPair, ADDR_B},
};

const UDP_DATAGRAMS: u64 = 200;
const UDP_PAYLOAD: usize = 100;
const TCP_BYTES: usize = 200_000;

fn snapshot(dp: &Datapath) -> Snapshot {
    Snapshot::read(&dp.stats().expect("stats map")).expect("read counters")
}

fn drops(s: &Snapshot, hook: Hook) -> u64 {
    s.iter()
        .filter(|(h, r, _)| *h == hook && r.kind() == Kind::Drop)
        .map(|(_, _, c)| c.packets)
        .sum()
}

/// Polls `f` until it returns the same value twice 200 ms apart (in-flight packets have
/// landed), up to 10 s.
fn settled<T: PartialEq + Clone>(mut f: impl FnMut() -> T) -> T {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = f();
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let now = f();
        if now == last || Instant::now() > deadline {
            return now;
        }
        last = now;
    }
}

/// TCP and UDP from `a` to `b`; returns (TCP segments, UDP datagrams) that `b`'s
/// kernel counted in, once everything has landed.
fn exchange(pair: &VethPair) -> (u64, u64) {
    let (in_segs0, in_dgrams0) = pair
        .b
        .enter(|| (snmp("Tcp", "InSegs"), snmp("Udp", "InDatagrams")));
    let listener = pair
        .b
        .enter(|| TcpListener::bind((ADDR_B, 8080)).expect("bind tcp in b"));
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        let mut got = Vec::new();
        s.read_to_end(&mut got).expect("server read");
        s.write_all(&(got.len() as u64).to_be_bytes())
            .expect("server write");
        got.len()
    });
    let mut client = pair.a.enter(|| {
        TcpStream::connect_timeout(
            &(ADDR_B.parse::<std::net::Ipv4Addr>().unwrap(), 8080).into(),
            Duration::from_secs(5),
        )
        .expect("connect from a to b")
    });
    client
        .write_all(&vec![0x5a; TCP_BYTES])
        .expect("client write");
    client.shutdown(Shutdown::Write).expect("shutdown");
    let mut reply = Vec::new();
    client.read_to_end(&mut reply).expect("client read");
    drop(client);
    assert_eq!(server.join().expect("server thread"), TCP_BYTES);
    assert_eq!(reply, (TCP_BYTES as u64).to_be_bytes());

    udp_ping(pair, 9090, UDP_DATAGRAMS, UDP_PAYLOAD);
    let (in_segs, in_dgrams) = settled(|| {
        pair.b
            .enter(|| (snmp("Tcp", "InSegs"), snmp("Udp", "InDatagrams")))
    });
    (in_segs - in_segs0, in_dgrams - in_dgrams0)
}

/// Puts every fixture in `bad` on the wire from `a` and checks that `hook` counted each
/// under its drop reason, with its bytes, and that nothing else was counted anywhere.
fn wire_drops(pair: &VethPair, dp: &Datapath, bad: &[fixtures::Fixture], hook: Hook) {
    let before = snapshot(dp);
    let frames: Vec<&[u8]> = bad.iter().map(|f| f.packet.as_slice()).collect();
    pair.a.enter(|| send_raw("va", &frames));
    let d = settled(|| snapshot(dp)).since(&before);
    let mut want = Snapshot::default();
    for f in bad {
        let c = want
            .cells
            .entry((hook as u32, f.verdict as u32))
            .or_default();
        c.packets += 1;
        c.bytes += f.packet.len() as u64;
    }
    assert_eq!(
        d,
        want,
        "malformed frames on the wire, counted at {} only",
        hook.name()
    );
}

#[test]
fn tcp_and_udp_through_a_veth_with_xdp_and_tc_attached() {
    let Some(object) = prereq::privileged("tcp_and_udp_through_a_veth_with_xdp_and_tc_attached")
    else {
        return;
    };
    let pair = VethPair::new("x");
    let mut dp = Datapath::load(&object, &MeshConfig::DEFAULT).expect("load datapath");
    pair.b.enter(|| {
        dp.attach_xdp("vb", XdpMode::Driver)
            .expect("attach xdp (native) to vb");
        dp.attach_tc_ingress("vb").expect("attach tc to vb");
    });

    let before = snapshot(&dp);
    let (tcp_segs, udp_dgrams) = exchange(&pair);
    let d = settled(|| snapshot(&dp)).since(&before);

    let udp_frame = (14 + 20 + 8 + UDP_PAYLOAD) as u64;
    let udp = Counter {
        packets: UDP_DATAGRAMS,
        bytes: UDP_DATAGRAMS * udp_frame,
    };
    assert_eq!(udp_dgrams, UDP_DATAGRAMS, "kernel's Udp InDatagrams in b");
    for hook in &[Hook::XdpUnderlay, Hook::TcUnderlayIngress] {
        assert_eq!(d.get(*hook, Reason::PassUdp), udp, "udp at {}", hook.name());
        assert_eq!(
            drops(&d, *hook),
            0,
            "no drops of good traffic at {}",
            hook.name()
        );
        let tcp = d.get(*hook, Reason::PassTcp);
        assert!(
            tcp.bytes >= TCP_BYTES as u64,
            "tcp bytes at {}: {tcp:?}",
            hook.name()
        );
    }
    // TC sees what the stack sees: one skb per segment the kernel counts in.
    assert_eq!(
        d.get(Hook::TcUnderlayIngress, Reason::PassTcp).packets,
        tcp_segs,
        "tc's pass_tcp vs the kernel's Tcp InSegs in b"
    );
    // XDP sees every frame before the stack, GRO included: at least as many.
    assert!(d.get(Hook::XdpUnderlay, Reason::PassTcp).packets >= tcp_segs);
    println!(
        "\ntraffic (xdp+tc on vb): {tcp_segs} tcp segments / {} tcp frames at xdp, \
         {UDP_DATAGRAMS} udp datagrams, counters match the kernel's",
        d.get(Hook::XdpUnderlay, Reason::PassTcp).packets
    );

    // Malformed frames on the wire: XDP drops each under its reason; TC never sees them.
    let bad: Vec<_> = fixtures::all()
        .into_iter()
        .filter(|f| f.malformed())
        .collect();
    wire_drops(&pair, &dp, &bad, Hook::XdpUnderlay);
    println!(
        "\ntraffic: {} malformed frames dropped at xdp under their reasons",
        bad.len()
    );
}

#[test]
fn malformed_frames_on_the_wire_are_dropped_at_tc() {
    let Some(object) = prereq::privileged("malformed_frames_on_the_wire_are_dropped_at_tc") else {
        return;
    };
    let pair = VethPair::new("t");
    let mut dp = Datapath::load(&object, &MeshConfig::DEFAULT).expect("load datapath");
    pair.b
        .enter(|| dp.attach_tc_ingress("vb").expect("attach tc to vb"));
    // Untagged only: the stack takes an outer VLAN tag off (skb_vlan_untag) before TC.
    let bad: Vec<_> = fixtures::all()
        .into_iter()
        .filter(|f| {
            f.malformed()
                && !matches!(
                    u16::from_be_bytes([f.packet[12], f.packet[13]]),
                    0x8100 | 0x88a8
                )
        })
        .collect();
    wire_drops(&pair, &dp, &bad, Hook::TcUnderlayIngress);
    // And the path still carries good traffic afterwards.
    let (_, udp) = exchange(&pair);
    assert_eq!(udp, UDP_DATAGRAMS);
}
