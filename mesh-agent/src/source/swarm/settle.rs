//! Settling the backends once the containers are known (veths, health, shutdowns), and the
//! drain / warm-up / empty-hold tracker that times them. Pure.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use crate::model::{BackendSpec, Health, Model};

/// Settles the backends once the containers are known: a local task whose delivery
/// veth was not found (starting, or gone) is no backend anywhere on this node, and a
/// task whose HEALTHCHECK is not passing (`unhealthy`, still `starting`: seen by this
/// node for its own tasks, reported by its peers for theirs) takes no new flows but
/// keeps the ones it has (draining). A task the orchestrator is shutting down
/// (`stopping`) drains too, unless its service would be left with nothing to take new
/// flows: its replacement may not have reached this node's view yet, and a task in its
/// shutdown grace still answers better than no backend at all.
pub fn settle_local(
    model: &mut Model,
    endpoints: &BTreeSet<Ipv4Addr>,
    not_healthy: &BTreeSet<Ipv4Addr>,
    stopping: &BTreeSet<Ipv4Addr>,
) {
    for s in &mut model.services {
        s.backends
            .retain(|b| b.node.is_some() || endpoints.contains(&b.addr));
        for b in &mut s.backends {
            if not_healthy.contains(&b.addr) {
                b.state = Health::Draining;
            }
        }
        let others = s
            .backends
            .iter()
            .filter(|b| b.state == Health::Active && !stopping.contains(&b.addr))
            .count();
        if others > 0 {
            for b in &mut s.backends {
                if stopping.contains(&b.addr) {
                    b.state = Health::Draining;
                }
            }
        }
    }
}

/// How backends enter and leave. One that left the Swarm's view drains for a grace
/// period (Docker's default stop grace period is 10 s) instead of vanishing: its
/// established flows keep going while the task shuts down, and no new flow is sent to
/// it. One that just appeared warms up for a moment before taking new flows (Docker
/// lists a task as soon as its container runs, before it has finished programming the
/// task's ingress redirect), unless the service would otherwise have no backend taking
/// new flows. Pure, given the clock.
#[derive(Clone, Debug, Default)]
pub struct DrainTracker {
    grace: std::time::Duration,
    warmup: std::time::Duration,
    /// (service, address) -> the backend as last seen, since when it is present
    /// (`None`: since before this tracker's first look), since when it is gone.
    seen: BTreeMap<(String, Ipv4Addr), Seen>,
    started: bool,
    /// Per service: the backends that last took new flows, and since when it has had
    /// none.
    last_active: BTreeMap<String, (BTreeSet<Ipv4Addr>, Option<std::time::Instant>)>,
}

/// How long a service that suddenly has no backend taking new flows keeps its last
/// ones: Docker's view flickers during rolling updates (a task missing from one read,
/// a replacement not yet listed), and refusing every client for that moment is worse
/// than sending them to a task that is, at worst, on its way out.
const EMPTY_HOLD: std::time::Duration = std::time::Duration::from_secs(2);

/// A backend that left its service's view and is draining: what an agent leaves in its
/// state directory so that a restarted one finishes the drain rather than removing the
/// backend (and resetting its flows) on its first apply.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Draining {
    pub service: String,
    pub backend: BackendSpec,
    /// When it left, in seconds since the Unix epoch (the one clock two processes share).
    pub gone_unix: f64,
}

/// `wall` in seconds since the Unix epoch (0 before it).
fn unix_seconds(wall: std::time::SystemTime) -> f64 {
    wall.duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

#[derive(Clone, Debug)]
struct Seen {
    spec: BackendSpec,
    since: Option<std::time::Instant>,
    gone: Option<std::time::Instant>,
}

impl DrainTracker {
    pub fn new(grace: std::time::Duration) -> Self {
        DrainTracker {
            grace,
            ..Default::default()
        }
    }

    /// With a warm-up for backends that appear after the first look.
    pub fn with_warmup(mut self, warmup: std::time::Duration) -> Self {
        self.warmup = warmup;
        self
    }

    /// The backends draining because they left, by service and address; `now` and
    /// `wall` are the same moment by the monotonic clock and the wall clock.
    pub fn draining(&self, now: std::time::Instant, wall: std::time::SystemTime) -> Vec<Draining> {
        let epoch = unix_seconds(wall);
        self.seen
            .iter()
            .filter_map(|((service, _), seen)| {
                let ago = now.saturating_duration_since(seen.gone?).as_secs_f64();
                Some(Draining {
                    service: service.clone(),
                    backend: seen.spec.clone(),
                    gone_unix: epoch - ago,
                })
            })
            .collect()
    }

    /// Takes up the drains an earlier agent began (before the first [`Self::apply`]):
    /// each backend drains for what is left of its grace period. A clock that went
    /// back counts as no time passed.
    pub fn resume(
        &mut self,
        drains: Vec<Draining>,
        now: std::time::Instant,
        wall: std::time::SystemTime,
    ) {
        let epoch = unix_seconds(wall);
        for d in drains {
            let ago =
                std::time::Duration::try_from_secs_f64(epoch - d.gone_unix).unwrap_or_default();
            if ago >= self.grace {
                continue;
            }
            let gone = now.checked_sub(ago).unwrap_or(now);
            self.seen.insert(
                (d.service, d.backend.addr),
                Seen {
                    spec: d.backend,
                    since: None,
                    gone: Some(gone),
                },
            );
        }
    }

    /// Adds to `model` the backends of its services that left less than the grace
    /// period ago, as draining, and holds back new ones that are still warming up.
    pub fn apply(&mut self, model: &mut Model, now: std::time::Instant) {
        let mut present = BTreeSet::new();
        let first = !self.started;
        self.started = true;
        for s in &model.services {
            for b in &s.backends {
                let key = (s.name.clone(), b.addr);
                present.insert(key.clone());
                let since = match self.seen.get(&key) {
                    Some(old) if old.gone.is_none() => old.since,
                    _ if first => None,
                    _ => Some(now),
                };
                self.seen.insert(
                    key,
                    Seen {
                        spec: b.clone(),
                        since,
                        gone: None,
                    },
                );
            }
        }
        let services: BTreeSet<String> = model.services.iter().map(|s| s.name.clone()).collect();
        let grace = self.grace;
        self.seen.retain(|key, seen| {
            if present.contains(key) {
                return true;
            }
            let since = *seen.gone.get_or_insert(now);
            services.contains(&key.0) && now.duration_since(since) < grace
        });
        for s in &mut model.services {
            for ((svc, addr), seen) in &self.seen {
                if seen.gone.is_some()
                    && *svc == s.name
                    && !s.backends.iter().any(|b| b.addr == *addr)
                {
                    s.backends.push(BackendSpec {
                        state: Health::Draining,
                        ..seen.spec.clone()
                    });
                }
            }
        }
    }

    /// Holds back backends still warming up, unless that would leave their service
    /// without a backend taking new flows. Runs once health and shutdowns are settled,
    /// so that "another backend is ready" means ready.
    pub fn hold_warming(&mut self, model: &mut Model, now: std::time::Instant) {
        self.hold_warming_and(model, now, &BTreeSet::new());
    }

    /// As [`Self::hold_warming`], holding back `unseen` backends too (remote tasks their
    /// own node's agent has not looked at yet: [`crate::source::peers::unseen`]).
    pub fn hold_warming_and(
        &mut self,
        model: &mut Model,
        now: std::time::Instant,
        unseen: &BTreeSet<Ipv4Addr>,
    ) {
        for s in &mut model.services {
            let warming = |b: &BackendSpec| {
                unseen.contains(&b.addr)
                    || self
                        .seen
                        .get(&(s.name.clone(), b.addr))
                        .and_then(|x| x.since)
                        .is_some_and(|t| now.duration_since(t) < self.warmup)
            };
            let hold: Vec<bool> = s.backends.iter().map(warming).collect();
            let ready = s
                .backends
                .iter()
                .zip(&hold)
                .filter(|(b, h)| b.state == Health::Active && !**h)
                .count();
            if ready == 0 {
                continue;
            }
            for (b, hold) in s.backends.iter_mut().zip(hold) {
                if hold {
                    b.state = Health::Draining;
                }
            }
        }
        self.hold_empty(model, now);
    }

    /// A service left with no backend taking new flows keeps the ones that last did, if
    /// they are still listed (draining), for [`EMPTY_HOLD`].
    fn hold_empty(&mut self, model: &mut Model, now: std::time::Instant) {
        let names: BTreeSet<&String> = model.services.iter().map(|s| &s.name).collect();
        self.last_active.retain(|n, _| names.contains(n));
        for s in &mut model.services {
            let active: BTreeSet<Ipv4Addr> = s
                .backends
                .iter()
                .filter(|b| b.state == Health::Active)
                .map(|b| b.addr)
                .collect();
            let entry = self
                .last_active
                .entry(s.name.clone())
                .or_insert_with(|| (BTreeSet::new(), None));
            if !active.is_empty() {
                *entry = (active, None);
                continue;
            }
            let since = *entry.1.get_or_insert(now);
            if now.duration_since(since) < EMPTY_HOLD {
                for b in &mut s.backends {
                    if entry.0.contains(&b.addr) {
                        b.state = Health::Active;
                    }
                }
            }
        }
    }
}
