//! Where a node's model comes from with `--from-docker`: Docker's view of the swarm,
//! this node's tasks, a manager's facts and the peers' reports, settled into one model.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context;

use crate::{model, source::docker, source::facts, source::swarm};

/// Where this node's model comes from.
pub struct DockerSource {
    pub(crate) docker: bollard::Docker,
    pub(crate) drain: swarm::DrainTracker,
    /// This node's swarm address (known after the first snapshot).
    pub(crate) me: Option<std::net::Ipv4Addr>,
    /// What this node tells its peers (see crate::source::peers).
    pub(crate) report: Arc<Mutex<crate::source::peers::Report>>,
    /// Where the peers serve theirs (0: not exchanged).
    pub(crate) peer_port: u16,
    /// From the last full model: the managers and the ones among this node's peers,
    /// and what the quick check last saw.
    pub(crate) managers: BTreeSet<std::net::Ipv4Addr>,
    pub(crate) manager: bool,
    pub(crate) quick_seen: Option<BTreeSet<String>>,
    /// On a manager: every task seen shutting down, and when. Docker deletes a task
    /// removed by a scale-down from its store while the container may still be in its
    /// stop grace period (and in the gossiped tables): what was seen stopping stays
    /// stopping for a minute.
    pub(crate) stopping_seen: BTreeMap<String, Instant>,
    /// Label problems already reported (once each).
    pub(crate) label_warned: BTreeSet<String>,
    /// Who may ask this agent for a trace (`meshctl trace --node`): the swarm's nodes.
    pub(crate) trace_allowed: Arc<Mutex<BTreeSet<std::net::Ipv4Addr>>>,
    /// The last service facts a manager gave (a worker keeps them through a missed
    /// poll: without them its UDP ports would turn TCP for a moment).
    pub(crate) last_facts: Option<facts::ServiceFacts>,
    /// Docker's netns directory as mounted here (`--docker-netns`), if moved.
    pub(crate) netns_dir: Option<PathBuf>,
    /// Docker's netns directory as its sandboxes' paths show it.
    pub(crate) seen_netns_dir: Option<PathBuf>,
    /// Peers that run no mesh agent (stock Docker nodes).
    pub(crate) stock: crate::source::liveness::StockPeers,
    /// Which peers have gone silent (their tasks drain, then go).
    silent: crate::source::liveness::SilentPeers,
    /// The manager's endpoints failing now (their last answers are used).
    degraded: BTreeSet<&'static str>,
    /// The swarm's data-path port, from Docker on a manager, else from a manager's report.
    pub(crate) data_path_port: Option<u16>,
    /// Each network's own endpoint address on this node, as last seen.
    pub(crate) local_addrs: BTreeMap<String, std::net::Ipv4Addr>,
}

/// How long a task seen shutting down is remembered as such.
pub const STOPPING_MEMORY: Duration = Duration::from_secs(60);

impl DockerSource {
    pub fn new(docker: bollard::Docker, drain: swarm::DrainTracker, peer_port: u16) -> Self {
        DockerSource {
            docker,
            drain,
            me: None,
            report: Default::default(),
            peer_port,
            managers: BTreeSet::new(),
            manager: false,
            quick_seen: None,
            stopping_seen: Default::default(),
            label_warned: Default::default(),
            trace_allowed: Default::default(),
            last_facts: None,
            netns_dir: None,
            seen_netns_dir: None,
            stock: Default::default(),
            silent: Default::default(),
            degraded: Default::default(),
            data_path_port: None,
            local_addrs: BTreeMap::new(),
        }
    }

    /// Docker's netns directory: where it is mounted for us, else where its sandboxes
    /// were seen, else Docker's default.
    pub fn netns_dir(&self) -> PathBuf {
        self.netns_dir
            .clone()
            .or_else(|| self.seen_netns_dir.clone())
            .unwrap_or_else(|| PathBuf::from("/var/run/docker/netns"))
    }

    pub fn with_netns_dir(mut self, dir: Option<PathBuf>) -> Self {
        self.netns_dir = dir;
        self
    }

    /// Says once when a manager's `what` starts failing and once when it answers again.
    fn note_degraded(&mut self, what: &'static str, err: Option<&docker::DockerError>) {
        match err {
            Some(e) if self.degraded.insert(what) => tracing::warn!(
                "the manager's {what} fails ({e}): keeping what it last said; the rest \
                 of the node is reconciled as usual"
            ),
            None if self.degraded.remove(what) => {
                tracing::info!("the manager's {what} answers again")
            }
            _ => {}
        }
    }

    /// A manager's shutting-down tasks: what /tasks says now and what it said in the
    /// last minute.
    pub async fn stopping(&mut self) -> Result<BTreeSet<String>, docker::DockerError> {
        let now = Instant::now();
        for id in docker::stopping_tasks(&self.docker).await? {
            self.stopping_seen.entry(id).or_insert(now);
        }
        self.stopping_seen
            .retain(|_, t| now.duration_since(*t) < STOPPING_MEMORY);
        Ok(self.stopping_seen.keys().cloned().collect())
    }

    /// The orchestrator's shutdowns, cheaply: on a manager from its own /tasks, else
    /// from the managers' reports. True when they changed since the last look (then a
    /// full resync follows at once: Docker's gossip shows a task being shut down until
    /// its container has exited, and it may refuse connections well before that).
    pub async fn quick_changed(&mut self) -> bool {
        let stopping = if self.manager {
            self.stopping().await.ok()
        } else if self.peer_port != 0 && !self.managers.is_empty() {
            let managers: Vec<_> = self.managers.iter().copied().collect();
            let reports =
                crate::source::peers::poll(&managers, self.peer_port, Duration::from_millis(150))
                    .await;
            Some(reports.into_values().flat_map(|r| r.stopping).collect())
        } else {
            None
        };
        let Some(stopping) = stopping else {
            return false;
        };
        let changed = self.quick_seen.as_ref().is_some_and(|s| *s != stopping);
        self.quick_seen = Some(stopping);
        changed
    }

    /// The model of this node that the Swarm implies, with its tasks' veths and health.
    pub async fn model(&mut self) -> anyhow::Result<model::Model> {
        let mut view = docker::snapshot(&self.docker).await?;
        swarm::remember_local_addrs(&mut view.networks, &mut self.local_addrs);
        let me = view.me;
        self.me = Some(me);
        self.managers = view.managers.clone();
        self.manager = view.manager;
        let underlay = crate::host::netdev::interface_with_addr(me)
            .with_context(|| format!("no interface holds this node's swarm address {me}"))?;
        let mut model = swarm::model_from(&view.networks, me, &underlay);
        let now = Instant::now();
        self.drain.apply(&mut model, now);
        // The overlays the snapshot listed (a plain container on one calls VIPs).
        let overlays = view.networks.iter().map(|n| n.id.clone()).collect();
        let tasks =
            docker::local_endpoints(&self.docker, self.netns_dir.as_deref(), &overlays).await?;
        if let Some(d) = &tasks.netns_dir {
            self.seen_netns_dir = Some(d.clone());
        }
        swarm::add_host_ports(&mut model, &tasks.host_ports);
        let found: BTreeSet<_> = tasks.endpoints.iter().map(|e| e.addr).collect();
        // A manager whose orchestrator does not answer (quorum lost) keeps what it last
        // knew of shutdowns and services; everything else is reconciled as usual.
        let stopping = if view.manager {
            let r = self.stopping().await;
            self.note_degraded("/tasks", r.as_ref().err());
            r.unwrap_or_else(|_| self.stopping_seen.keys().cloned().collect())
        } else {
            BTreeSet::new()
        };
        let ids = swarm::task_addrs(&view.networks);
        let mut not_healthy = tasks.not_healthy.clone();
        let mut stopping_addrs: BTreeSet<_> = stopping
            .iter()
            .filter_map(|id| ids.get(id))
            .flatten()
            .copied()
            .collect();
        let mut facts = if view.manager {
            let r = docker::service_facts(&self.docker).await;
            self.note_degraded("/services", r.as_ref().err());
            r.ok().or_else(|| self.last_facts.clone())
        } else {
            None
        };
        *self.report.lock().expect("report lock") = crate::source::peers::Report {
            not_healthy: tasks.not_healthy,
            stopping,
            labels: facts.as_ref().map(|f| f.labels.clone()).unwrap_or_default(),
            protocols: facts
                .as_ref()
                .map(|f| f.protocols.clone())
                .unwrap_or_default(),
            ingress: facts.as_ref().and_then(|f| f.ingress.clone()),
            known: Some(tasks.known.clone()),
            data_path_port: view.data_path_port,
        };
        if view.data_path_port.is_some() {
            self.data_path_port = view.data_path_port;
        }
        let mut unseen = BTreeSet::new();
        if self.peer_port != 0 {
            let peers: Vec<_> = model.peers.iter().map(|p| p.addr).collect();
            let round =
                crate::source::peers::poll_all(&peers, self.peer_port, Duration::from_millis(250))
                    .await;
            for (peer, stock) in self.stock.observe(&peers, &round) {
                if stock {
                    tracing::warn!(
                        %peer,
                        port = self.peer_port,
                        "no mesh agent answers on this node: taken as a stock Docker node \
                         (flows to its tasks are SNATed to this node's overlay address, as \
                         Docker does, so that they answer through the tunnel)"
                    );
                } else {
                    tracing::info!(%peer, "a mesh agent answers on this node again");
                }
            }
            for p in &mut model.peers {
                p.stock = self.stock.is_stock(p.addr);
            }
            for (peer, silence) in self.silent.observe(&peers, &round, now) {
                match silence {
                    crate::source::liveness::Silence::Draining => tracing::warn!(
                        %peer,
                        "no answer from this node (nor a refusal): its tasks take no new \
                         flows here"
                    ),
                    crate::source::liveness::Silence::Gone => tracing::warn!(
                        %peer,
                        "still no answer: its tasks are removed here (their flows reset)"
                    ),
                    crate::source::liveness::Silence::Answering => {
                        tracing::info!(%peer, "this node answers again")
                    }
                }
            }
            self.silent.apply(&mut model, now);
            let reports = round.reports;
            if self.data_path_port.is_none() {
                self.data_path_port = reports
                    .iter()
                    .filter(|(p, _)| view.managers.contains(p))
                    .find_map(|(_, r)| r.data_path_port);
            }
            if facts.is_none() {
                facts = crate::source::peers::manager_facts(&reports, &view.managers);
            }
            let (sick, stop) =
                crate::source::peers::credible(&model, &reports, &view.managers, &ids);
            unseen = crate::source::peers::unseen(&model, &reports);
            not_healthy.extend(sick);
            stopping_addrs.extend(stop);
        }
        match &facts {
            Some(f) => self.last_facts = Some(f.clone()),
            None => facts = self.last_facts.clone(),
        }
        if let Some(f) = &facts {
            swarm::apply_published(&mut model, f);
            for bad in swarm::apply_labels(&mut model, &f.labels) {
                if self.label_warned.insert(bad.clone()) {
                    tracing::warn!("service label ignored: {bad}");
                }
            }
        }
        if !stopping_addrs.is_empty() {
            tracing::debug!(?stopping_addrs, ?not_healthy, "settling local tasks");
        }
        swarm::settle_local(&mut model, &found, &not_healthy, &stopping_addrs);
        self.drain.hold_warming_and(&mut model, now, &unseen);
        model.endpoints = tasks.endpoints;
        model.overlay_ports = tasks.overlay_ports;
        *self.trace_allowed.lock().expect("trace_allowed lock") = model
            .peers
            .iter()
            .map(|p| p.addr)
            .chain(std::iter::once(me))
            .collect();
        Ok(model)
    }
}

/// The first model from Docker: retried with backoff (and said so) until Docker answers,
/// since the agent may start before dockerd.
pub async fn first_docker_model(
    socket: &str,
    drain: Duration,
    warmup_ms: u64,
    peer_port: u16,
    netns_dir: Option<PathBuf>,
    resume: Vec<swarm::Draining>,
) -> (DockerSource, model::Model) {
    let mut wait = Duration::from_millis(500);
    loop {
        let attempt = async {
            let docker = docker::connect(socket).await?;
            let mut tracker =
                swarm::DrainTracker::new(drain).with_warmup(Duration::from_millis(warmup_ms));
            tracker.resume(resume.clone(), Instant::now(), std::time::SystemTime::now());
            let mut src =
                DockerSource::new(docker, tracker, peer_port).with_netns_dir(netns_dir.clone());
            let m = src.model().await?;
            anyhow::Ok((src, m))
        };
        match attempt.await {
            Ok(sm) => return sm,
            Err(e) => {
                tracing::warn!("waiting for Docker ({e:#}); retrying in {wait:?}");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(10));
            }
        }
    }
}
