//! The agent's Prometheus endpoint: its own work (reconciles, their latency, the lag
//! from a Docker event to the maps written) and, read from the pinned maps at scrape
//! time, the datapath's packets and drops by hook and reason and conntrack occupancy.
//! Each scrape is one `prometheus-client` collector, encoded in the Prometheus text
//! format (0.0.4) by that crate; the HTTP side is `crate::http`, bound to localhost by
//! default.

use std::{
    collections::BTreeMap,
    fmt,
    net::Ipv4Addr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use mesh_common::{reason::Kind, stats::BackendCounter};
use prometheus_client::{
    collector::Collector,
    encoding::{prometheus_text, DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge, histogram, MetricType},
    registry::Registry,
};

/// A latency histogram (seconds) with fixed buckets, plus the last observations for
/// quantiles in reports and the status file.
#[derive(Clone, Debug)]
pub struct Histogram {
    /// The buckets Prometheus reads. Clones share them: a scrape's copy of
    /// `AgentMetrics` reads the live counts.
    buckets: histogram::Histogram,
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
            buckets: histogram::Histogram::new(LATENCY_BOUNDS.iter().copied()),
            recent: Vec::new(),
        }
    }

    pub fn observe(&mut self, d: Duration) {
        let s = d.as_secs_f64();
        self.buckets.observe(s);
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

    /// The histogram as `name`, and `<name>_recent`: quantiles of the last
    /// observations, for people reading the endpoint by eye (and for reports);
    /// Prometheus users derive them from the buckets.
    fn encode(&self, enc: &mut DescriptorEncoder, name: &str, help: &str) -> fmt::Result {
        one(enc, name, help, &self.buckets)?;
        let quantiles = [0.5, 0.99].into_iter().filter_map(|p| {
            let v = self.quantile(p)?;
            Some(([("quantile", p.to_string())], ConstGauge::new(v)))
        });
        family(
            enc,
            &format!("{name}_recent"),
            &format!("Quantiles of the last {RECENT} observations."),
            MetricType::Gauge,
            quantiles,
        )
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
    pub ports_in_use: Vec<crate::host::listeners::PortInUse>,
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

/// One metric without labels. Counters are named without `_total`: the encoder adds it.
fn one(enc: &mut DescriptorEncoder, name: &str, help: &str, m: &impl EncodeMetric) -> fmt::Result {
    m.encode(enc.encode_descriptor(name, help, None, m.metric_type())?)
}

/// One family: a series per label set, in the order given.
fn family<S: EncodeLabelSet, M: EncodeMetric>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    series: impl IntoIterator<Item = (S, M)>,
) -> fmt::Result {
    let mut family = enc.encode_descriptor(name, help, None, kind)?;
    for (labels, m) in series {
        m.encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// One scrape: what the agent counted and what was read from the maps (None where
/// they could not be read). A collector rather than registered families: every value
/// is read at scrape time, and the series keep their order from one scrape to the next.
#[derive(Debug)]
struct Scrape {
    agent: AgentMetrics,
    stats: Option<crate::datapath::stats::Snapshot>,
    conntrack: Option<crate::datapath::conntrack::Occupancy>,
    traffic: Option<Traffic>,
}

impl Collector for Scrape {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let enc = &mut enc;
        let m = &self.agent;
        if let Some(t) = &self.traffic {
            encode_traffic(enc, t)?;
        }
        for (name, help, v) in [
            (
                "mesh_reconciles",
                "Reconciles that completed.",
                m.reconciles,
            ),
            (
                "mesh_reconcile_errors",
                "Reconciles that failed (the previous state was kept).",
                m.reconcile_errors,
            ),
            ("mesh_map_writes", "Map entries written.", m.map_writes),
            (
                "mesh_docker_events",
                "Docker events that triggered a resync.",
                m.events,
            ),
        ] {
            one(enc, name, help, &ConstCounter::new(v))?;
        }
        for (name, help, v) in [
            (
                "mesh_services",
                "Load-balancing groups in the maps.",
                m.services,
            ),
            ("mesh_backends", "Backends in the maps.", m.backends),
            ("mesh_local_endpoints", "Tasks on this node.", m.endpoints),
        ] {
            one(enc, name, help, &ConstGauge::new(v))?;
        }
        family(
            enc,
            "mesh_model_problems",
            "Parts of the model left out because they cannot be programmed \
             (`meshctl doctor` says why); every other service is applied.",
            MetricType::Gauge,
            m.problems.iter().map(|p| {
                let labels = [("service", p.service.as_str()), ("left_out", &p.left_out)];
                (labels, ConstGauge::new(1))
            }),
        )?;
        family(
            enc,
            "mesh_port_in_use",
            "Published ports a process of this node also listens on (it gets no new \
             connection on the node's addresses while the service publishes the port).",
            MetricType::Gauge,
            m.ports_in_use.iter().map(|p| {
                let labels = [
                    ("port", p.port.to_string()),
                    ("protocol", format!("{:?}", p.protocol).to_lowercase()),
                    ("service", p.service.clone()),
                    ("process", p.process.clone()),
                ];
                (labels, ConstGauge::new(1))
            }),
        )?;
        one(
            enc,
            "mesh_last_reconcile_timestamp_seconds",
            "Unix time of the last successful reconcile.",
            &ConstGauge::new(m.last_reconcile_unix),
        )?;
        m.reconcile_seconds.encode(
            enc,
            "mesh_reconcile_duration_seconds",
            "Time to derive the desired state and write the maps.",
        )?;
        m.event_lag_seconds.encode(
            enc,
            "mesh_event_lag_seconds",
            "From a Docker event's timestamp to the maps written after it.",
        )?;
        if let Some(ct) = self.conntrack {
            one(
                enc,
                "mesh_conntrack_entries",
                "Entries in the conntrack map.",
                &ConstGauge::new(ct.entries),
            )?;
            one(
                enc,
                "mesh_conntrack_capacity",
                "Capacity of the conntrack map (its max_entries, as the kernel has it; two entries per flow).",
                &ConstGauge::new(ct.capacity),
            )?;
        }
        if let Some(s) = &self.stats {
            let by_reason = |drops: bool| {
                s.iter()
                    .filter(move |(_, reason, _)| drops == (reason.kind() == Kind::Drop))
                    .map(|(hook, reason, c)| {
                        let labels = [("hook", hook.name()), ("reason", reason.name())];
                        (labels, ConstCounter::new(c.packets))
                    })
            };
            family(
                enc,
                "mesh_packets",
                "Packets by hook and verdict reason.",
                MetricType::Counter,
                by_reason(false),
            )?;
            family(
                enc,
                "mesh_drops",
                "Packets dropped, by hook and reason.",
                MetricType::Counter,
                by_reason(true),
            )?;
            family(
                enc,
                "mesh_bytes",
                "Bytes by hook and verdict reason.",
                MetricType::Counter,
                s.iter().map(|(hook, reason, c)| {
                    let labels = [("hook", hook.name()), ("reason", reason.name())];
                    (labels, ConstCounter::new(c.bytes))
                }),
            )?;
        }
        Ok(())
    }
}

fn encode_traffic(enc: &mut DescriptorEncoder, t: &Traffic) -> fmt::Result {
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
        family(
            enc,
            &format!("mesh_service_{what}"),
            &format!("{help}, by service (load-balancing group)."),
            MetricType::Counter,
            t.services
                .iter()
                .map(|(svc, c)| ([("service", svc.as_str())], ConstCounter::new(get(c)))),
        )?;
        family(
            enc,
            &format!("mesh_backend_{what}"),
            &format!("{help}, by backend."),
            MetricType::Counter,
            t.backends.iter().map(|(svc, be, c)| {
                let labels = [("service", svc.as_str()), ("backend", be)];
                (labels, ConstCounter::new(get(c)))
            }),
        )?;
    }
    Ok(())
}

/// Renders the Prometheus text exposition of `m`, the datapath counters and the
/// conntrack occupancy (when the maps could be read).
pub fn render(
    m: &AgentMetrics,
    stats: Option<&crate::datapath::stats::Snapshot>,
    conntrack: Option<crate::datapath::conntrack::Occupancy>,
    traffic: Option<&Traffic>,
) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Scrape {
        agent: m.clone(),
        stats: stats.cloned(),
        conntrack,
        traffic: traffic.cloned(),
    }));
    let mut out = String::new();
    // Writing into a String cannot fail, nor can the values above.
    prometheus_text::encode(&mut out, &registry).expect("metrics encode");
    out
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
        let stats = crate::datapath::stats::Snapshot::read_pinned(&pins).ok();
        let ct = crate::datapath::conntrack::conntrack_occupancy(&pins).ok();
        let traffic = crate::datapath::stats::backends_pinned(&pins)
            .ok()
            .map(|read| {
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
mod tests;
