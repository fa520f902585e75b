use super::*;
use mesh_common::{reason::Reason, stats::Counter, stats::Hook};

fn c(packets: u64, flows: u64) -> BackendCounter {
    BackendCounter {
        packets,
        bytes: packets * 100,
        flows,
    }
}

/// One scrape with every family populated: the agent's counts and both histograms,
/// a problem, a port in use, a pass and a drop, conntrack and per-backend traffic.
fn full_scrape() -> String {
    let mut m = AgentMetrics {
        reconciles: 3,
        reconcile_errors: 1,
        map_writes: 40,
        events: 5,
        services: 2,
        backends: 4,
        endpoints: 1,
        last_reconcile_unix: 1_700_000_000.5,
        problems: vec![crate::model::Problem {
            service: "db".into(),
            left_out: "port 8080/tcp".into(),
            reason: "taken".into(),
        }],
        ports_in_use: vec![crate::host::listeners::PortInUse {
            port: 8080,
            protocol: crate::model::Protocol::Tcp,
            service: "web".into(),
            process: "nginx (pid 812)".into(),
        }],
        ..Default::default()
    };
    for ms in [1u64, 3, 700] {
        m.reconcile_seconds.observe(Duration::from_millis(ms));
        m.event_lag_seconds.observe(Duration::from_millis(ms * 2));
    }
    let mut s = crate::datapath::stats::Snapshot::default();
    for r in [
        Reason::ALL[0],
        *Reason::ALL.iter().find(|r| r.kind() == Kind::Drop).unwrap(),
    ] {
        s.cells.insert(
            (Hook::TcTask as u32, r as u32),
            Counter {
                packets: 9,
                bytes: 900,
            },
        );
    }
    let ct = crate::datapath::conntrack::Occupancy {
        entries: 12,
        capacity: 131_072,
    };
    let names = BTreeMap::from([(
        1,
        ("web/tcp/80".to_string(), "10.0.0.4".parse().unwrap(), 80),
    )]);
    let t = ServiceTotals::default().update(&names, &BTreeMap::from([(1, c(10, 2))]));
    render(&m, Some(&s), Some(ct), Some(&t))
}

/// Every family's `# TYPE` line and every series' name with its label names, as
/// Prometheus and the tests (tests/tests/swarm.rs) read them.
#[test]
fn every_metric_name_and_label_set_is_kept() {
    let out = full_scrape();
    let mut seen = std::collections::BTreeSet::new();
    for line in out.lines() {
        if line.starts_with("# TYPE ") {
            seen.insert(line.to_string());
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let series = line.rsplit_once(' ').expect("a value").0;
        let (name, labels) = series.split_once('{').unwrap_or((series, ""));
        let keys: Vec<&str> = labels
            .split(',')
            .filter_map(|kv| kv.split_once('=').map(|(k, _)| k))
            .collect();
        seen.insert(format!("{name}{{{}}}", keys.join(",")));
    }
    let want = [
        "# TYPE mesh_backend_bytes_total counter",
        "# TYPE mesh_backend_flows_total counter",
        "# TYPE mesh_backend_packets_total counter",
        "# TYPE mesh_backends gauge",
        "# TYPE mesh_bytes_total counter",
        "# TYPE mesh_conntrack_capacity gauge",
        "# TYPE mesh_conntrack_entries gauge",
        "# TYPE mesh_docker_events_total counter",
        "# TYPE mesh_drops_total counter",
        "# TYPE mesh_event_lag_seconds histogram",
        "# TYPE mesh_event_lag_seconds_recent gauge",
        "# TYPE mesh_last_reconcile_timestamp_seconds gauge",
        "# TYPE mesh_local_endpoints gauge",
        "# TYPE mesh_map_writes_total counter",
        "# TYPE mesh_model_problems gauge",
        "# TYPE mesh_packets_total counter",
        "# TYPE mesh_port_in_use gauge",
        "# TYPE mesh_reconcile_duration_seconds histogram",
        "# TYPE mesh_reconcile_duration_seconds_recent gauge",
        "# TYPE mesh_reconcile_errors_total counter",
        "# TYPE mesh_reconciles_total counter",
        "# TYPE mesh_service_bytes_total counter",
        "# TYPE mesh_service_flows_total counter",
        "# TYPE mesh_service_packets_total counter",
        "# TYPE mesh_services gauge",
        "mesh_backend_bytes_total{service,backend}",
        "mesh_backend_flows_total{service,backend}",
        "mesh_backend_packets_total{service,backend}",
        "mesh_backends{}",
        "mesh_bytes_total{hook,reason}",
        "mesh_conntrack_capacity{}",
        "mesh_conntrack_entries{}",
        "mesh_docker_events_total{}",
        "mesh_drops_total{hook,reason}",
        "mesh_event_lag_seconds_bucket{le}",
        "mesh_event_lag_seconds_count{}",
        "mesh_event_lag_seconds_recent{quantile}",
        "mesh_event_lag_seconds_sum{}",
        "mesh_last_reconcile_timestamp_seconds{}",
        "mesh_local_endpoints{}",
        "mesh_map_writes_total{}",
        "mesh_model_problems{service,left_out}",
        "mesh_packets_total{hook,reason}",
        "mesh_port_in_use{port,protocol,service,process}",
        "mesh_reconcile_duration_seconds_bucket{le}",
        "mesh_reconcile_duration_seconds_count{}",
        "mesh_reconcile_duration_seconds_recent{quantile}",
        "mesh_reconcile_duration_seconds_sum{}",
        "mesh_reconcile_errors_total{}",
        "mesh_reconciles_total{}",
        "mesh_service_bytes_total{service}",
        "mesh_service_flows_total{service}",
        "mesh_service_packets_total{service}",
        "mesh_services{}",
    ];
    let want: std::collections::BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
    assert_eq!(seen, want, "{out}");
    // Every bucket bound, in order, and the series the swarm test reads.
    let le: Vec<&str> = out
        .lines()
        .filter_map(|l| l.strip_prefix("mesh_event_lag_seconds_bucket{le=\""))
        .filter_map(|l| l.split_once('"').map(|(b, _)| b))
        .collect();
    assert_eq!(
        le,
        [
            "0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1", "2.5",
            "5", "+Inf"
        ],
        "{out}"
    );
    for line in [
            "mesh_event_lag_seconds_count 3\n",
            "mesh_event_lag_seconds_recent{quantile=\"0.5\"} 0.006\n",
            "mesh_event_lag_seconds_recent{quantile=\"0.99\"} 1.4\n",
            "mesh_reconciles_total 3\n",
            "mesh_service_flows_total{service=\"web/tcp/80\"} 2\n",
            "mesh_backend_flows_total{service=\"web/tcp/80\",backend=\"10.0.0.4:80\"} 2\n",
            "mesh_model_problems{service=\"db\",left_out=\"port 8080/tcp\"} 1\n",
            "mesh_port_in_use{port=\"8080\",protocol=\"tcp\",service=\"web\",process=\"nginx (pid 812)\"} 1\n",
        ] {
            assert!(out.contains(line), "{line:?} in:\n{out}");
        }
}

#[test]
fn service_totals_never_go_backwards() {
    let a: Ipv4Addr = "10.0.0.4".parse().unwrap();
    let b: Ipv4Addr = "10.0.0.5".parse().unwrap();
    let mut names = BTreeMap::from([
        (1, ("web/tcp/80".to_string(), a, 80)),
        (2, ("web/tcp/80".to_string(), b, 80)),
        (3, ("api@net/vip".to_string(), a, 0)),
    ]);
    let mut t = ServiceTotals::default();
    let r = t.update(
        &names,
        &BTreeMap::from([(1, c(10, 2)), (2, c(5, 1)), (3, c(4, 1))]),
    );
    assert_eq!(r.services["web/tcp/80"], c(15, 3));
    assert!(r
        .backends
        .contains(&("api@net/vip".into(), "10.0.0.4".into(), c(4, 1))));
    assert!(r
        .backends
        .contains(&("web/tcp/80".into(), "10.0.0.5:80".into(), c(5, 1))));
    // Backend 2 leaves: its traffic stays in the service's total, its row goes.
    names.remove(&2);
    let r = t.update(&names, &BTreeMap::from([(1, c(12, 2)), (3, c(4, 1))]));
    assert_eq!(r.services["web/tcp/80"], c(17, 3));
    assert!(!r.backends.iter().any(|(_, be, _)| be == "10.0.0.5:80"));
    // A cell gone from the map (evicted) keeps its last reading.
    let r = t.update(&names, &BTreeMap::from([(3, c(6, 2))]));
    assert_eq!(r.services["web/tcp/80"], c(17, 3));
    assert_eq!(r.services["api@net/vip"], c(6, 2));
    let out = render(&AgentMetrics::default(), None, None, Some(&r));
    assert!(
        out.contains(
            "mesh_backend_flows_total{service=\"web/tcp/80\",backend=\"10.0.0.4:80\"} 2\n"
        ),
        "{out}"
    );
    assert!(
        out.contains("mesh_service_packets_total{service=\"api@net/vip\"} 6\n"),
        "{out}"
    );
}

#[test]
fn histogram_buckets_are_cumulative_and_quantiles_come_from_observations() {
    let mut m = AgentMetrics::default();
    let h = &mut m.reconcile_seconds;
    for ms in [1u64, 3, 3, 40, 700] {
        h.observe(Duration::from_millis(ms));
    }
    let out = render(&m, None, None, None);
    let x = "mesh_reconcile_duration_seconds";
    assert!(
        out.contains(&format!("{x}_bucket{{le=\"0.001\"}} 1\n")),
        "{out}"
    );
    assert!(
        out.contains(&format!("{x}_bucket{{le=\"0.005\"}} 3\n")),
        "{out}"
    );
    assert!(
        out.contains(&format!("{x}_bucket{{le=\"0.05\"}} 4\n")),
        "{out}"
    );
    assert!(
        out.contains(&format!("{x}_bucket{{le=\"+Inf\"}} 5\n")),
        "{out}"
    );
    assert!(out.contains(&format!("{x}_count 5\n")), "{out}");
    let h = &m.reconcile_seconds;
    assert_eq!(h.quantile(0.5), Some(0.003));
    assert_eq!(h.quantile(1.0), Some(0.7));
}

#[test]
fn drops_and_passes_are_separate_families() {
    let mut s = crate::datapath::stats::Snapshot::default();
    let drop = Reason::ALL
        .iter()
        .find(|r| r.kind() == Kind::Drop)
        .copied()
        .unwrap();
    let pass = Reason::ALL
        .iter()
        .find(|r| r.kind() != Kind::Drop)
        .copied()
        .unwrap();
    for (r, n) in [(drop, 7), (pass, 9)] {
        s.cells.insert(
            (Hook::TcTask as u32, r as u32),
            Counter {
                packets: n,
                bytes: n * 100,
            },
        );
    }
    let m = AgentMetrics {
        reconciles: 3,
        ..Default::default()
    };
    let ct = crate::datapath::conntrack::Occupancy {
        entries: 12,
        capacity: 131_072,
    };
    let out = render(&m, Some(&s), Some(ct), None);
    assert!(out.contains("mesh_reconciles_total 3\n"));
    assert!(out.contains(&format!(
        "mesh_drops_total{{hook=\"tc_task\",reason=\"{}\"}} 7\n",
        drop.name()
    )));
    assert!(out.contains(&format!(
        "mesh_packets_total{{hook=\"tc_task\",reason=\"{}\"}} 9\n",
        pass.name()
    )));
    assert!(!out.contains(&format!(
        "mesh_packets_total{{hook=\"tc_task\",reason=\"{}\"}}",
        drop.name()
    )));
    assert!(out.contains("mesh_conntrack_entries 12\n"));
    assert!(out.contains("mesh_conntrack_capacity 131072\n"));
}
