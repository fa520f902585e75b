//! What agents tell each other. Docker keeps a task in its gossiped service tables
//! until its container has exited (seen here: ~13 s after it turned unhealthy or the
//! orchestrator began shutting it down), so other nodes would keep sending it new
//! flows. Each agent serves, on the underlay, the addresses of its local tasks whose
//! HEALTHCHECK is not passing and, on a manager, the tasks being shut down; every agent
//! reads every peer's report on each resync, and those tasks stop receiving new flows
//! from every node within about one resync period.
//!
//! Trust is that of the data path: the underlay is the Swarm's. A worker speaks only for
//! its own tasks (addresses the gossip places on that node); only managers (as `docker
//! info` lists them) speak for the orchestrator. A peer that does not answer reports
//! nothing (fail open: its tasks stay as Docker shows them), unless it answered before
//! and has gone silent: then its node is taken for dead ([`crate::source::liveness::SilentPeers`]).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

pub const PATH: &str = "/v1/report";

/// What one agent reports.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Report {
    /// Its tasks whose HEALTHCHECK is not passing.
    pub not_healthy: BTreeSet<Ipv4Addr>,
    /// On a manager: ids of the tasks being shut down.
    #[serde(default)]
    pub stopping: BTreeSet<String>,
    /// On a manager: services' `mesh.*` labels (workers cannot read services).
    #[serde(default)]
    pub labels: crate::source::facts::MeshLabels,
    /// On a manager: the protocols of services' published ports (not in the gossip).
    #[serde(default)]
    pub protocols: crate::source::facts::Protocols,
    /// On a manager: every service's ingress-published ports as its spec has them.
    #[serde(default)]
    pub ingress: Option<crate::source::facts::IngressPorts>,
    /// Every address of its local tasks: their health is in `not_healthy` (absent: an
    /// agent that does not say).
    #[serde(default)]
    pub known: Option<BTreeSet<Ipv4Addr>>,
    /// On a manager: the swarm's data-path port (Docker tells only managers).
    #[serde(default)]
    pub data_path_port: Option<u16>,
}

/// The service facts the managers report (the first manager that answers).
pub fn manager_facts(
    reports: &BTreeMap<Ipv4Addr, Report>,
    managers: &BTreeSet<Ipv4Addr>,
) -> Option<crate::source::facts::ServiceFacts> {
    reports
        .iter()
        .find(|(p, _)| managers.contains(p))
        .map(|(_, r)| crate::source::facts::ServiceFacts {
            labels: r.labels.clone(),
            protocols: r.protocols.clone(),
            ingress: r.ingress.clone(),
        })
}

/// Where `meshctl trace --node` asks another node's agent to trace a packet there.
pub const TRACE_PATH: &str = "/v1/trace";

/// What the trace endpoint needs: the mesh it traces in, and who may ask (this swarm's
/// nodes, kept current by the agent). Served only with `mesh-agent --serve-traces`: it is
/// unauthenticated, and anything that reaches the agents' port from a node's address
/// (a container there, masqueraded) can ask.
#[derive(Clone, Debug)]
pub struct TraceAccess {
    pub state_dir: std::path::PathBuf,
    pub bpffs: std::path::PathBuf,
    pub allowed: Arc<Mutex<BTreeSet<Ipv4Addr>>>,
}

/// `from=IP:PORT&to=IP:PORT&proto=tcp|udp` of a trace request.
pub fn trace_query(
    query: &str,
) -> Option<(
    std::net::SocketAddrV4,
    std::net::SocketAddrV4,
    crate::model::Protocol,
)> {
    let mut from = None;
    let mut to = None;
    let mut proto = crate::model::Protocol::Tcp;
    for kv in query.split('&') {
        let (k, v) = kv.split_once('=')?;
        match k {
            "from" => from = v.parse().ok(),
            "to" => to = v.parse().ok(),
            "proto" => {
                proto = match v {
                    "tcp" => crate::model::Protocol::Tcp,
                    "udp" => crate::model::Protocol::Udp,
                    _ => return None,
                }
            }
            _ => return None,
        }
    }
    Some((from?, to?, proto))
}

/// One trace at a time: each is a test run plus two conntrack entries made and removed.
static TRACING: Mutex<()> = Mutex::new(());

fn traced(access: &TraceAccess, query: &str) -> String {
    let Some((from, to, proto)) = trace_query(query) else {
        return serde_json::json!({ "error": "want from=IP:PORT&to=IP:PORT[&proto=tcp|udp]" })
            .to_string();
    };
    let _one = TRACING.lock().unwrap_or_else(|p| p.into_inner());
    match crate::ctl::trace::run(&access.state_dir, &access.bpffs, from, to, proto) {
        Ok(r) => serde_json::json!({ "text": r.render(), "report": r }).to_string(),
        Err(e) => serde_json::json!({ "error": e.to_string() }).to_string(),
    }
}

/// Serves this node's report, and (with `trace`) traces for the swarm's other nodes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    local: Arc<Mutex<Report>>,
    trace: Option<TraceAccess>,
) {
    crate::http::serve(listener, move |path, caller| {
        if path == PATH {
            let r = local.lock().expect("report lock").clone();
            return Some(serde_json::to_string(&r).expect("report serializes") + "\n");
        }
        let query = path.strip_prefix(TRACE_PATH)?.strip_prefix('?')?;
        let access = trace.as_ref()?;
        let ok = match caller {
            std::net::IpAddr::V4(a) => access.allowed.lock().expect("allowed lock").contains(&a),
            std::net::IpAddr::V6(_) => false,
        };
        if !ok {
            return None;
        }
        Some(traced(access, query) + "\n")
    })
    .await
}

/// Each peer's report (peers that did not answer in `timeout` are left out).
pub async fn poll(peers: &[Ipv4Addr], port: u16, timeout: Duration) -> BTreeMap<Ipv4Addr, Report> {
    poll_all(peers, port, timeout).await.reports
}

/// One round of asking every peer.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Poll {
    pub reports: BTreeMap<Ipv4Addr, Report>,
    /// Peers whose host refused the connection: nothing listens on the port there.
    pub refused: BTreeSet<Ipv4Addr>,
}

/// A peer's answer as a report; anything else (not JSON, another shape) is no report:
/// that peer says nothing this round. Fuzzed (`tests/fuzz`, target `report`).
pub fn decode(body: &str) -> Option<Report> {
    serde_json::from_str(body).ok()
}

/// Each peer's report, and which peers refused.
pub async fn poll_all(peers: &[Ipv4Addr], port: u16, timeout: Duration) -> Poll {
    use crate::http::Answer;
    let asks = peers.iter().map(|p| async move {
        let a = crate::http::ask(SocketAddr::from((*p, port)), PATH, timeout).await;
        (*p, a)
    });
    let mut out = Poll::default();
    for (p, a) in futures_util::future::join_all(asks).await {
        match a {
            Answer::Body(b) => {
                if let Some(r) = decode(&b) {
                    out.reports.insert(p, r);
                }
            }
            Answer::Refused => {
                out.refused.insert(p);
            }
            Answer::Silent => {}
        }
    }
    out
}

/// The task addresses the reports credibly take out of rotation: (a peer's own tasks
/// that fail their health check, tasks a manager says are being shut down). `tasks`:
/// task id -> addresses, from this node's gossiped view.
pub fn credible(
    model: &crate::model::Model,
    reports: &BTreeMap<Ipv4Addr, Report>,
    managers: &BTreeSet<Ipv4Addr>,
    tasks: &BTreeMap<String, Vec<Ipv4Addr>>,
) -> (BTreeSet<Ipv4Addr>, BTreeSet<Ipv4Addr>) {
    let sick: BTreeSet<Ipv4Addr> = model
        .services
        .iter()
        .flat_map(|s| &s.backends)
        .filter_map(|b| {
            let node = b.node?;
            reports
                .get(&node)
                .is_some_and(|r| r.not_healthy.contains(&b.addr))
                .then_some(b.addr)
        })
        .collect();
    let mut stopping = BTreeSet::new();
    for (peer, r) in reports {
        if managers.contains(peer) {
            stopping.extend(r.stopping.iter().filter_map(|id| tasks.get(id)).flatten());
        }
    }
    (sick, stopping)
}

/// Backends on other nodes that their node's agent has not looked at yet: Docker's
/// gossip can list a task a moment before its own node's report says whether its
/// HEALTHCHECK passes (a task still "starting" would take flows, then drain). Only for
/// nodes whose report lists what it knows.
pub fn unseen(
    model: &crate::model::Model,
    reports: &BTreeMap<Ipv4Addr, Report>,
) -> BTreeSet<Ipv4Addr> {
    model
        .services
        .iter()
        .flat_map(|s| &s.backends)
        .filter_map(|b| {
            let known = reports.get(&b.node?)?.known.as_ref()?;
            (!known.contains(&b.addr)).then_some(b.addr)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{BackendSpec, Model, ServiceSpec};

    /// One service `web` over `backends`: (address, node; `None`: this one).
    fn web(backends: &[(&str, Option<Ipv4Addr>)]) -> Model {
        Model {
            services: vec![ServiceSpec {
                name: "web".into(),
                ports: vec![],
                vips: vec![],
                backends: backends
                    .iter()
                    .map(|(addr, node)| BackendSpec {
                        addr: addr.parse().unwrap(),
                        state: Default::default(),
                        node: *node,
                        network: None,
                        task: None,
                    })
                    .collect(),
                tcp_idle: None,
                udp_idle: None,
                affinity: false,
                every_port: false,
            }],
            ..Default::default()
        }
    }

    #[test]
    fn a_remote_task_is_unseen_until_its_node_reports_it() {
        let ip = |a: &str| a.parse::<Ipv4Addr>().unwrap();
        let (n2, n3) = (ip("10.251.0.12"), ip("10.251.0.13"));
        let m = web(&[
            ("10.0.0.5", None),
            ("10.0.0.6", Some(n2)),
            ("10.0.0.7", Some(n2)),
            ("10.0.0.8", Some(n3)),
        ]);
        let reports = BTreeMap::from([
            (
                n2,
                Report {
                    known: Some(BTreeSet::from([ip("10.0.0.6")])),
                    ..Default::default()
                },
            ),
            // An agent that does not say what it knows holds nothing back.
            (n3, Report::default()),
        ]);
        assert_eq!(unseen(&m, &reports), BTreeSet::from([ip("10.0.0.7")]));
        assert!(
            unseen(&m, &BTreeMap::new()).is_empty(),
            "no reports, nothing held"
        );
    }

    #[test]
    fn a_peer_speaks_only_for_its_own_tasks() {
        let (n2, n3): (Ipv4Addr, Ipv4Addr) = (
            "10.251.0.12".parse().unwrap(),
            "10.251.0.13".parse().unwrap(),
        );
        let m = web(&[
            ("10.0.0.4", None),
            ("10.0.0.5", Some(n2)),
            ("10.0.0.6", Some(n3)),
        ]);
        let all: BTreeSet<Ipv4Addr> = ["10.0.0.4", "10.0.0.5", "10.0.0.6"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        // n2 claims everything: only its own task counts; its word on the
        // orchestrator counts only if it is a manager.
        let tasks = BTreeMap::from([("t6".to_string(), vec!["10.0.0.6".parse().unwrap()])]);
        let reports = BTreeMap::from([(
            n2,
            Report {
                not_healthy: all,
                stopping: BTreeSet::from(["t6".to_string()]),
                labels: BTreeMap::new(),
                protocols: BTreeMap::new(),
                ingress: None,
                known: None,
                data_path_port: None,
            },
        )]);
        let five = BTreeSet::from(["10.0.0.5".parse().unwrap()]);
        assert_eq!(
            credible(&m, &reports, &BTreeSet::new(), &tasks),
            (five.clone(), BTreeSet::new())
        );
        assert_eq!(
            credible(&m, &reports, &BTreeSet::from([n2]), &tasks),
            (five, BTreeSet::from(["10.0.0.6".parse().unwrap()]))
        );
    }

    #[test]
    fn trace_queries_parse() {
        let (f, t, p) = trace_query("from=10.0.0.1:5000&to=10.0.0.2:8080&proto=udp").unwrap();
        assert_eq!(
            (f.to_string(), t.to_string()),
            ("10.0.0.1:5000".into(), "10.0.0.2:8080".into())
        );
        assert_eq!(p, crate::model::Protocol::Udp);
        assert!(trace_query("from=10.0.0.1:5000").is_none());
        assert!(trace_query("from=x&to=10.0.0.2:80").is_none());
        assert!(trace_query("from=10.0.0.1:1&to=10.0.0.2:80&rm=-rf").is_none());
    }

    #[tokio::test]
    async fn served_reports_are_read_back() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let report = Report {
            not_healthy: BTreeSet::from(["10.0.0.9".parse().unwrap()]),
            stopping: BTreeSet::from(["abc".to_string()]),
            labels: BTreeMap::from([(
                "web".to_string(),
                BTreeMap::from([("mesh.affinity".to_string(), "client-ip".to_string())]),
            )]),
            protocols: BTreeMap::from([(
                "dns".to_string(),
                vec![(5353, crate::model::Protocol::Udp)],
            )]),
            ingress: Some(BTreeMap::from([(
                "dns".to_string(),
                vec![crate::source::facts::IngressPort {
                    published: 5353,
                    target: 53,
                    protocol: crate::model::Protocol::Udp,
                }],
            )])),
            known: Some(BTreeSet::from(["10.0.0.9".parse().unwrap()])),
            data_path_port: Some(7789),
        };
        let local = Arc::new(Mutex::new(report.clone()));
        tokio::spawn(serve(listener, local, None));
        let me: Ipv4Addr = "127.0.0.1".parse().unwrap();
        let got = poll(&[me], port, Duration::from_secs(2)).await;
        assert_eq!(got[&me], report);
        // Nobody listening: no report, quickly.
        let none = poll(
            &["127.0.0.2".parse().unwrap()],
            port,
            Duration::from_millis(300),
        )
        .await;
        assert!(none.is_empty());
    }
}
