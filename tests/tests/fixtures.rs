//! Tier 2: the fixture table through BPF_PROG_TEST_RUN, for the XDP and the TC entry
//! point: verdict, output bytes, and exact counter deltas.

#![allow(clippy::result_large_err)] // aya errors by value, on cold paths

use mesh_agent::{datapath::loader::Datapath, datapath::stats::Snapshot};
use mesh_common::{
    config::MeshConfig,
    reason::{Kind, Reason},
    stats::{Counter, Hook},
};
use mesh_tests::{
    fixture_runner::{test_run, Ret},
    fixtures::{self, Fixture},
    prereq,
};

/// Runs one fixture through one hook; returns a description of each mismatch.
fn run(dp: &Datapath, fx: &Fixture, hook: Hook) -> Vec<String> {
    let mut errs = Vec::new();
    let stats = dp.stats().expect("stats map");
    let before = Snapshot::read(&stats).expect("read counters");
    let res = test_run(dp, hook, &fx.packet, 1).unwrap_or_else(|e| panic!("{}: {e:#}", fx.name));

    // With no peers configured, the underlay's programs (which take IPv4 VXLAN apart)
    // refuse well-formed VXLAN from an unknown sender.
    let ipv4 = fx.packet[12..14] == [0x08, 0x00];
    let underlay = matches!(hook, Hook::XdpUnderlay | Hook::TcUnderlayIngress);
    let verdict = if underlay && fx.verdict == Reason::PassVxlan && ipv4 {
        Reason::DropVxlanUnknownPeer
    } else {
        fx.verdict
    };
    let pass = verdict.kind() == Kind::Pass;
    let want = match (hook, pass) {
        (Hook::XdpUnderlay, true) => Ret::XdpPass,
        (Hook::XdpUnderlay, false) => Ret::XdpDrop,
        (_, true) => Ret::TcUnspec,
        (_, false) => Ret::TcShot,
    };
    if res.ret != want.code() {
        errs.push(format!(
            "returned {} (want {want:?})",
            Ret::describe(hook, res.ret)
        ));
    }
    if pass && res.out != fx.packet {
        errs.push("passed packet was modified".into());
    }

    let delta = Snapshot::read(&stats)
        .expect("read counters")
        .since(&before);
    let cell = Counter {
        packets: 1,
        bytes: fx.packet.len() as u64,
    };
    let mut expected = Snapshot::default();
    for r in std::iter::once(&verdict).chain(&fx.observations) {
        expected.cells.insert((hook as u32, *r as u32), cell);
    }
    if delta != expected {
        let show = |s: &Snapshot| {
            s.iter()
                .map(|(h, r, c)| format!("{}/{}={}p/{}B", h.name(), r.name(), c.packets, c.bytes))
                .collect::<Vec<_>>()
                .join(", ")
        };
        errs.push(format!(
            "counter deltas [{}], want [{}]",
            show(&delta),
            show(&expected)
        ));
    }
    errs
}

/// The kernel's skb test runner (bpf_prog_test_run_skb) refuses, with EINVAL, a frame
/// with nothing after the Ethernet header and one whose untagged EtherType announces an
/// IPv4/IPv6 header that is not all there. XDP's runner takes them, and the
/// real-traffic test puts such frames on a wire.
fn runnable(fx: &Fixture, hook: Hook) -> bool {
    use mesh_common::proto::*;
    if hook == Hook::XdpUnderlay {
        return true;
    }
    let p = &fx.packet;
    let l3 = p.len().saturating_sub(ETH_HLEN);
    match u16::from_be_bytes([p[12], p[13]]) {
        ETH_P_IP => l3 >= IPV4_MIN_HLEN,
        ETH_P_IPV6 => l3 >= IPV6_HLEN,
        _ => l3 > 0,
    }
}

/// Runs the table through every hook that can take each packet; returns the run count.
fn run_table(dp: &Datapath, table: &[Fixture]) -> usize {
    let mut failures = Vec::new();
    let mut runs = 0;
    for fx in table {
        for hook in Hook::PACKET.iter().filter(|h| runnable(fx, **h)) {
            runs += 1;
            for e in run(dp, fx, *hook) {
                failures.push(format!("{} [{}]: {e}", fx.name, hook.name()));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} fixture failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
    runs
}

#[test]
fn fixture_table_through_xdp_and_tc() {
    let Some(object) = prereq::privileged("fixture_table_through_xdp_and_tc") else {
        return;
    };
    let dp = Datapath::load(&object, &MeshConfig::DEFAULT).expect("load datapath");
    let table = fixtures::all();
    let runs = run_table(&dp, &table);
    let malformed = table.iter().filter(|f| f.malformed()).count();
    let reasons: std::collections::BTreeSet<Reason> = table
        .iter()
        .filter(|f| f.malformed())
        .map(|f| f.verdict)
        .collect();
    println!(
        "\nfixtures: {} packets ({malformed} malformed, {} distinct drop reasons), {runs} runs \
         through BPF_PROG_TEST_RUN on the xdp and tc entry points: verdicts, outputs and \
         counter deltas all as expected",
        table.len(),
        reasons.len(),
    );
}

#[test]
fn data_path_port_is_load_time_configuration() {
    let Some(object) = prereq::privileged("data_path_port_is_load_time_configuration") else {
        return;
    };
    let cfg = MeshConfig {
        vxlan_port: fixtures::ALT_VXLAN_PORT,
        ..MeshConfig::DEFAULT
    };
    let dp = Datapath::load(&object, &cfg).expect("load datapath");
    assert_eq!(
        run_table(&dp, &fixtures::alt_port()),
        3 * Hook::PACKET.len()
    );
}
