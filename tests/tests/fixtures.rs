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
    try_run(dp, fx, hook).unwrap_or_else(|e| panic!("{}: {e}", fx.name))
}

/// As [`run`]; `Err` when the kernel's test runner refused the frame.
fn try_run(dp: &Datapath, fx: &Fixture, hook: Hook) -> Result<Vec<String>, String> {
    let mut errs = Vec::new();
    let stats = dp.stats().expect("stats map");
    let before = Snapshot::read(&stats).expect("read counters");
    let res = test_run(dp, hook, &fx.packet, 1).map_err(|e| format!("{e:#}"))?;

    // With no peers configured, the underlay's programs (which take IPv4 VXLAN apart)
    // refuse well-formed VXLAN from an unknown sender.
    let ipv4 = mesh_common::parse::parse(&mesh_common::parse::Bytes(&fx.packet), 0)
        .is_ok_and(|p| p.ip_version == 4);
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
    Ok(errs)
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

/// Issue 19's property test of the parser against the kernel: frames mutated from the
/// table (seeded: the same frames on every machine and kernel) go through the host's
/// parser and, with BPF_PROG_TEST_RUN, through every entry point that takes them: the
/// kernel counts the verdict and observations the parser gives, and passes what it
/// passes unchanged.
#[test]
fn mutated_frames_get_the_host_parsers_verdict_in_the_kernel() {
    let Some(object) =
        prereq::privileged("mutated_frames_get_the_host_parsers_verdict_in_the_kernel")
    else {
        return;
    };
    use mesh_common::{parse, proto::VXLAN_PORT_DEFAULT};
    let dp = Datapath::load(&object, &MeshConfig::DEFAULT).expect("load datapath");
    let table: Vec<Fixture> = fixtures::all()
        .into_iter()
        .filter(|f| f.packet.len() >= 14)
        .collect();
    // 40 frames a fixture; 8 in the kernel matrix's emulated guests (a slower clock).
    let per = (40 / prereq::time_scale() as usize).max(8);
    let mutants = fixtures::mutants(&table, per, 0x6d65_7368_0019);
    let (mut runs, mut refused) = (0, 0);
    let mut failures = Vec::new();
    let mut verdicts = std::collections::BTreeMap::<Reason, usize>::new();
    for (i, m) in mutants.iter().enumerate() {
        let (verdict, observations) =
            match parse::parse(&parse::Bytes(&m.packet), VXLAN_PORT_DEFAULT) {
                Ok(p) => (
                    p.verdict(),
                    p.observations().into_iter().flatten().collect(),
                ),
                Err(r) => (r, Vec::new()),
            };
        *verdicts.entry(verdict).or_default() += 1;
        let fx = Fixture {
            name: m.origin,
            packet: m.packet.clone(),
            verdict,
            observations,
        };
        for hook in Hook::PACKET.iter().filter(|h| runnable(&fx, **h)) {
            match try_run(&dp, &fx, *hook) {
                Ok(errs) => {
                    runs += 1;
                    for e in errs {
                        let hex: String = m.packet.iter().map(|b| format!("{b:02x}")).collect();
                        failures.push(format!(
                            "mutant {i} of {:?} ({}) [{}]: {e}\n    {hex}",
                            m.origin,
                            m.how,
                            hook.name()
                        ));
                    }
                }
                Err(_) => refused += 1,
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} disagreements, the first ones:\n{}",
        failures.len(),
        failures
            .iter()
            .take(12)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    let malformed: usize = verdicts
        .iter()
        .filter(|(r, _)| r.kind() == Kind::Drop)
        .map(|(_, n)| n)
        .sum();
    println!(
        "\nfixtures: {} frames mutated from {} fixtures ({malformed} malformed, {} distinct \
         verdicts), {runs} runs through BPF_PROG_TEST_RUN ({refused} refused by the runner): \
         the kernel's verdicts and observations are the host parser's",
        mutants.len(),
        table.len(),
        verdicts.len()
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
