//! The agent's Prometheus endpoint: its own work (reconciles, their latency, the lag
//! from a Docker event to the maps written) and, read from the pinned maps at scrape
//! time, the datapath's packets and drops by hook and reason and conntrack occupancy.
//! The text format is rendered here (pure, unit-tested); the HTTP side is a minimal
//! GET-only responder bound to localhost by default.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::Ipv4Addr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use mesh_common::{reason::Kind, stats::BackendCounter};

/// A cumulative histogram with fixed bucket bounds (seconds).
#[derive(Clone, Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
    /// Every observation, for quantiles in reports (bounded).
    recent: Vec<f64>,
}

const LATENCY_BOUNDS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];
const RECENT: usize = 1024;

impl Histogram {
    pub fn new() -> Self {
        Histogram {
            bounds: LATENCY_BOUNDS,
            counts: vec![0; LATENCY_BOUNDS.len()],
            sum: 0.0,
            count: 0,
            recent: Vec::new(),
        }
    }

    pub fn observe(&mut self, d: Duration) {
        let s = d.as_secs_f64();
        for (b, c) in self.bounds.iter().zip(&mut self.counts) {
            if s <= *b {
                *c += 1;
            }
        }
        self.sum += s;
        self.count += 1;
        if self.recent.len() == RECENT {
            self.recent.remove(0);
        }
        self.recent.push(s);
    }

    /// The q-quantile (0..=1) of the recent observations, seconds.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let mut v = self.recent.clone();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let i = ((v.len() - 1) as f64 * q).round() as usize;
        Some(v[i])
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {c}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}\n{name}_count {}", self.sum, self.count);
        // Quantiles of the last observations, for people reading the endpoint by eye
        // (and for reports); Prometheus users derive them from the buckets.
        let q = format!("{name}_recent");
        let _ = writeln!(
            out,
            "# HELP {q} Quantiles of the last {RECENT} observations.\n# TYPE {q} gauge"
        );
        for p in [0.5, 0.99] {
            if let Some(v) = self.quantile(p) {
                let _ = writeln!(out, "{q}{{quantile=\"{p}\"}} {v}");
            }
        }
    }
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

/// What the agent itself counts.
#[derive(Clone, Debug, Default)]
pub struct AgentMetrics {
    pub reconciles: u64,
    pub reconcile_errors: u64,
    pub map_writes: u64,
    pub events: u64,
    pub services: u64,
    pub backends: u64,
    pub endpoints: u64,
    pub reconcile_seconds: Histogram,
    pub event_lag_seconds: Histogram,
    /// Unix time of the last successful reconcile.
    pub last_reconcile_unix: f64,
    /// What the model asked for that the agent left out (each logged once).
    pub problems: Vec<crate::model::Problem>,
    /// Published ports a process of this node also listens on.
    pub ports_in_use: Vec<crate::listeners::PortInUse>,
    /// Every backend in the maps: id -> (group name, task address, port), for the
    /// per-service and per-backend counters.
    pub backend_names: BTreeMap<u32, (String, Ipv4Addr, u16)>,
}

/// Per-service traffic that never goes backwards in Prometheus' eyes: when a backend
/// leaves, its last reading stays in its service's total.
#[derive(Clone, Debug, Default)]
pub struct ServiceTotals {
    last: BTreeMap<u32, (String, BackendCounter)>,
    retired: BTreeMap<String, BackendCounter>,
}

/// One scrape's per-service totals and per-backend rows (service, backend, counter).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    pub services: BTreeMap<String, BackendCounter>,
    pub backends: Vec<(String, String, BackendCounter)>,
}

impl ServiceTotals {
    /// Folds in a reading of the per-backend map (`read`, by id) for the backends now in
    /// the maps (`names`). A backend without a cell (no traffic yet, or its cell
    /// evicted) keeps its last reading.
    pub fn update(
        &mut self,
        names: &BTreeMap<u32, (String, Ipv4Addr, u16)>,
        read: &BTreeMap<u32, BackendCounter>,
    ) -> Traffic {
        let gone: Vec<u32> = self
            .last
            .keys()
            .filter(|id| !names.contains_key(id))
            .copied()
            .collect();
        for id in gone {
            if let Some((svc, c)) = self.last.remove(&id) {
                let r = self.retired.entry(svc).or_default();
                *r = r.plus(&c);
            }
        }
        let mut t = Traffic {
            services: self.retired.clone(),
            ..Default::default()
        };
        for (id, (svc, addr, port)) in names {
            let before = self.last.get(id).map(|(_, c)| *c).unwrap_or_default();
            let c = read
                .get(id)
                .copied()
                .filter(|c| {
                    c.packets >= before.packets
                        && c.bytes >= before.bytes
                        && c.flows >= before.flows
                })
                .unwrap_or(before);
            self.last.insert(*id, (svc.clone(), c));
            let total = t.services.entry(svc.clone()).or_default();
            *total = total.plus(&c);
            let backend = match port {
                // An every-port VIP's backend: the port is the client's.
                0 => addr.to_string(),
                p => format!("{addr}:{p}"),
            };
            t.backends.push((svc.clone(), backend, c));
        }
        t
    }
}

fn counter(out: &mut String, name: &str, help: &str, v: impl std::fmt::Display) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
    );
}

fn gauge(out: &mut String, name: &str, help: &str, v: impl std::fmt::Display) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
}

/// Renders the Prometheus text exposition of `m`, the datapath counters and the
/// conntrack occupancy (when the maps could be read).
pub fn render(
    m: &AgentMetrics,
    stats: Option<&crate::stats::Snapshot>,
    conntrack: Option<crate::inspect::Occupancy>,
    traffic: Option<&Traffic>,
) -> String {
    let mut out = String::new();
    if let Some(t) = traffic {
        render_traffic(&mut out, t);
    }
    counter(
        &mut out,
        "mesh_reconciles_total",
        "Reconciles that completed.",
        m.reconciles,
    );
    counter(
        &mut out,
        "mesh_reconcile_errors_total",
        "Reconciles that failed (the previous state was kept).",
        m.reconcile_errors,
    );
    counter(
        &mut out,
        "mesh_map_writes_total",
        "Map entries written.",
        m.map_writes,
    );
    counter(
        &mut out,
        "mesh_docker_events_total",
        "Docker events that triggered a resync.",
        m.events,
    );
    gauge(
        &mut out,
        "mesh_services",
        "Load-balancing groups in the maps.",
        m.services,
    );
    gauge(
        &mut out,
        "mesh_backends",
        "Backends in the maps.",
        m.backends,
    );
    gauge(
        &mut out,
        "mesh_local_endpoints",
        "Tasks on this node.",
        m.endpoints,
    );
    let name = "mesh_model_problems";
    let _ = writeln!(
        out,
        "# HELP {name} Parts of the model left out because they cannot be programmed \
         (`meshctl doctor` says why); every other service is applied.\n# TYPE {name} gauge"
    );
    let esc = |v: &str| v.replace('\\', "\\\\").replace('"', "\\\"");
    for p in &m.problems {
        let _ = writeln!(
            out,
            "{name}{{service=\"{}\",left_out=\"{}\"}} 1",
            esc(&p.service),
            esc(&p.left_out)
        );
    }
    let name = "mesh_port_in_use";
    let _ = writeln!(
        out,
        "# HELP {name} Published ports a process of this node also listens on (it gets no \
         new connection on the node's addresses while the service publishes the port).\n\
         # TYPE {name} gauge"
    );
    for p in &m.ports_in_use {
        let _ = writeln!(
            out,
            "{name}{{port=\"{}\",protocol=\"{}\",service=\"{}\",process=\"{}\"}} 1",
            p.port,
            format!("{:?}", p.protocol).to_lowercase(),
            esc(&p.service),
            esc(&p.process)
        );
    }
    gauge(
        &mut out,
        "mesh_last_reconcile_timestamp_seconds",
        "Unix time of the last successful reconcile.",
        m.last_reconcile_unix,
    );
    m.reconcile_seconds.render(
        &mut out,
        "mesh_reconcile_duration_seconds",
        "Time to derive the desired state and write the maps.",
    );
    m.event_lag_seconds.render(
        &mut out,
        "mesh_event_lag_seconds",
        "From a Docker event's timestamp to the maps written after it.",
    );
    if let Some(ct) = conntrack {
        gauge(
            &mut out,
            "mesh_conntrack_entries",
            "Entries in the conntrack map.",
            ct.entries,
        );
        gauge(
            &mut out,
            "mesh_conntrack_capacity",
            "Capacity of the conntrack map (its max_entries, as the kernel has it; two entries per flow).",
            ct.capacity,
        );
    }
    if let Some(s) = stats {
        for (name, help, drops) in [
            (
                "mesh_packets_total",
                "Packets by hook and verdict reason.",
                false,
            ),
            (
                "mesh_drops_total",
                "Packets dropped, by hook and reason.",
                true,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (hook, reason, c) in s.iter() {
                if drops != (reason.kind() == Kind::Drop) {
                    continue;
                }
                let _ = writeln!(
                    out,
                    "{name}{{hook=\"{}\",reason=\"{}\"}} {}",
                    hook.name(),
                    reason.name(),
                    c.packets
                );
            }
        }
        let name = "mesh_bytes_total";
        let _ = writeln!(
            out,
            "# HELP {name} Bytes by hook and verdict reason.\n# TYPE {name} counter"
        );
        for (hook, reason, c) in s.iter() {
            let _ = writeln!(
                out,
                "{name}{{hook=\"{}\",reason=\"{}\"}} {}",
                hook.name(),
                reason.name(),
                c.bytes
            );
        }
    }
    out
}

fn render_traffic(out: &mut String, t: &Traffic) {
    type Field = fn(&BackendCounter) -> u64;
    let fields: [(&str, &str, Field); 3] = [
        (
            "packets",
            "Packets both ways of the flows balanced here",
            |c| c.packets,
        ),
        ("bytes", "Bytes both ways of the flows balanced here", |c| {
            c.bytes
        }),
        ("flows", "Flows balanced here", |c| c.flows),
    ];
    for (what, help, get) in fields {
        let name = format!("mesh_service_{what}_total");
        let _ = writeln!(
            out,
            "# HELP {name} {help}, by service (load-balancing group).\n# TYPE {name} counter"
        );
        for (svc, c) in &t.services {
            let _ = writeln!(out, "{name}{{service=\"{svc}\"}} {}", get(c));
        }
        let name = format!("mesh_backend_{what}_total");
        let _ = writeln!(
            out,
            "# HELP {name} {help}, by backend.\n# TYPE {name} counter"
        );
        for (svc, be, c) in &t.backends {
            let _ = writeln!(
                out,
                "{name}{{service=\"{svc}\",backend=\"{be}\"}} {}",
                get(c)
            );
        }
    }
}

/// Serves `GET /metrics` until the runtime stops; `pins` is where the maps are read
/// from at each scrape.
pub async fn serve(
    listener: tokio::net::TcpListener,
    shared: Arc<Mutex<AgentMetrics>>,
    pins: PathBuf,
) {
    let totals = Arc::new(Mutex::new(ServiceTotals::default()));
    crate::http::serve(listener, move |path, _| {
        if path != "/metrics" {
            return None;
        }
        let m = shared.lock().expect("metrics lock").clone();
        let stats = crate::stats::Snapshot::read_pinned(&pins).ok();
        let ct = crate::inspect::conntrack_occupancy(&pins).ok();
        let traffic = crate::stats::backends_pinned(&pins).ok().map(|read| {
            totals
                .lock()
                .expect("totals lock")
                .update(&m.backend_names, &read)
        });
        Some(render(&m, stats.as_ref(), ct, traffic.as_ref()))
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_common::{reason::Reason, stats::Counter, stats::Hook};

    fn c(packets: u64, flows: u64) -> BackendCounter {
        BackendCounter {
            packets,
            bytes: packets * 100,
            flows,
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
        let mut h = Histogram::new();
        for ms in [1u64, 3, 3, 40, 700] {
            h.observe(Duration::from_millis(ms));
        }
        let mut out = String::new();
        h.render(&mut out, "x", "help");
        assert!(out.contains("x_bucket{le=\"0.001\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"0.005\"} 3\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"0.05\"} 4\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 5\n"), "{out}");
        assert!(out.contains("x_count 5\n"), "{out}");
        assert_eq!(h.quantile(0.5), Some(0.003));
        assert_eq!(h.quantile(1.0), Some(0.7));
    }

    #[test]
    fn drops_and_passes_are_separate_families() {
        let mut s = crate::stats::Snapshot::default();
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
        let ct = crate::inspect::Occupancy {
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
}
