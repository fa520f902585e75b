//! What this node makes of its peers' answers, round after round: which run no mesh
//! agent (they refuse the exchange: [`StockPeers`]) and which have gone silent (their
//! node is down, frozen or cut off: [`SilentPeers`]). Pure, given the clock.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    time::Duration,
};

use crate::source::peers::Poll;

/// How many rounds in a row a peer must refuse the exchange to be taken as a stock
/// Docker node: an agent restarting (kill -9, an upgrade) is back within a round or
/// two, and its pinned datapath serves meanwhile.
pub const STOCK_AFTER: u32 = 3;

/// Which peers run no mesh agent: a node of the swarm whose host refuses the agents'
/// port (stock Docker, as during a rollout, or a node where the mesh was removed). The
/// mesh reaches their tasks as Docker does (SNAT to this node's address on the overlay,
/// so that the reply comes back through the tunnel). A peer that is silent (down, cut
/// off) keeps what it was; one that answers is a mesh node at once.
#[derive(Clone, Debug, Default)]
pub struct StockPeers {
    refusals: BTreeMap<Ipv4Addr, u32>,
}

impl StockPeers {
    /// Folds in one round over `peers`; returns the peers whose kind changed, with
    /// whether they are stock now.
    pub fn observe(&mut self, peers: &[Ipv4Addr], round: &Poll) -> Vec<(Ipv4Addr, bool)> {
        let mut changed = Vec::new();
        self.refusals.retain(|p, _| peers.contains(p));
        for p in peers {
            let was = self.is_stock(*p);
            let n = self.refusals.entry(*p).or_default();
            if round.reports.contains_key(p) {
                *n = 0;
            } else if round.refused.contains(p) {
                *n = n.saturating_add(1);
            }
            let now = self.is_stock(*p);
            if now != was {
                changed.push((*p, now));
            }
        }
        changed
    }

    pub fn is_stock(&self, peer: Ipv4Addr) -> bool {
        self.refusals.get(&peer).is_some_and(|n| *n >= STOCK_AFTER)
    }
}

/// How long a peer that stops answering (no answer at all, not even a refusal: the node
/// or the underlay to it is gone) may stay silent, over at least two rounds, before its
/// tasks take no new flows from this node...
pub const SILENT_DRAIN: Duration = Duration::from_secs(1);
/// ...and before its backends are removed here, which resets the flows pinned to them
/// (their next packet is answered with a RST) rather than leaving them to hang.
pub const SILENT_REMOVE: Duration = Duration::from_secs(15);

/// What this node makes of a peer's silence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Silence {
    Answering,
    /// Silent for [`SILENT_DRAIN`]: its tasks drain here.
    Draining,
    /// Silent for [`SILENT_REMOVE`]: its tasks are no backends here.
    Gone,
}

/// Which peers have gone silent. Each node judges the others, never itself: a node cut
/// off from every peer takes their tasks out of its own selection (it cannot reach them)
/// and keeps serving its clients from its own tasks, and the other nodes take its tasks
/// out of theirs. A peer that refuses the exchange (its agent is down, the host is up)
/// is not silent: see [`StockPeers`]; nor is one never heard from (fail open).
#[derive(Clone, Debug, Default)]
pub struct SilentPeers {
    /// Since when, and for how many rounds in a row, each silent peer has not answered.
    since: BTreeMap<Ipv4Addr, (std::time::Instant, u32)>,
    /// What the last round made of each.
    said: BTreeMap<Ipv4Addr, Silence>,
    /// Peers that have answered since this agent started: only their silence counts (a
    /// peer never heard, e.g. behind a firewall closed to the exchange, fails open).
    heard: BTreeSet<Ipv4Addr>,
}

impl SilentPeers {
    /// Folds in one round over `peers` at `now`; returns the peers whose silence changed.
    pub fn observe(
        &mut self,
        peers: &[Ipv4Addr],
        round: &Poll,
        now: std::time::Instant,
    ) -> Vec<(Ipv4Addr, Silence)> {
        self.since.retain(|p, _| peers.contains(p));
        self.said.retain(|p, _| peers.contains(p));
        self.heard.retain(|p| peers.contains(p));
        for p in peers {
            if round.reports.contains_key(p) {
                self.heard.insert(*p);
            }
            if round.reports.contains_key(p) || round.refused.contains(p) {
                self.since.remove(p);
            } else if self.heard.contains(p) {
                self.since.entry(*p).or_insert((now, 0)).1 += 1;
            }
        }
        let mut changed = Vec::new();
        for p in peers {
            let now_is = self.silence(*p, now);
            let was = self.said.insert(*p, now_is).unwrap_or(Silence::Answering);
            if was != now_is {
                changed.push((*p, now_is));
            }
        }
        changed
    }

    pub fn silence(&self, peer: Ipv4Addr, now: std::time::Instant) -> Silence {
        match self.since.get(&peer) {
            Some((t, rounds)) if *rounds >= 2 => match now.saturating_duration_since(*t) {
                d if d >= SILENT_REMOVE => Silence::Gone,
                d if d >= SILENT_DRAIN => Silence::Draining,
                _ => Silence::Answering,
            },
            _ => Silence::Answering,
        }
    }

    /// Takes the tasks of silent peers out of `model`: drained, or gone.
    pub fn apply(&self, model: &mut crate::model::Model, now: std::time::Instant) {
        for s in &mut model.services {
            s.backends
                .retain(|b| b.node.is_none_or(|n| self.silence(n, now) != Silence::Gone));
            for b in &mut s.backends {
                if b.node
                    .is_some_and(|n| self.silence(n, now) == Silence::Draining)
                {
                    b.state = crate::model::Health::Draining;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::peers::Report;

    /// A node whose host refuses the exchange is taken as stock after STOCK_AFTER
    /// rounds; one that answers is a mesh node at once; silence changes nothing.
    #[test]
    fn peers_that_refuse_the_exchange_are_stock() {
        let a: Ipv4Addr = "10.0.0.1".parse().unwrap();
        let b: Ipv4Addr = "10.0.0.2".parse().unwrap();
        let peers = [a, b];
        let refused = Poll {
            refused: BTreeSet::from([a]),
            ..Default::default()
        };
        let answered = Poll {
            reports: BTreeMap::from([(a, Report::default())]),
            ..Default::default()
        };
        let mut s = StockPeers::default();
        for _ in 1..STOCK_AFTER {
            assert!(s.observe(&peers, &refused).is_empty());
        }
        assert_eq!(s.observe(&peers, &refused), vec![(a, true)]);
        assert!(s.is_stock(a) && !s.is_stock(b));
        // Silent: a stock node stays stock, a mesh node stays mesh.
        assert!(s.observe(&peers, &Poll::default()).is_empty());
        assert!(s.is_stock(a));
        assert_eq!(s.observe(&peers, &answered), vec![(a, false)]);
        // A peer that leaves the swarm is forgotten.
        for _ in 0..STOCK_AFTER {
            s.observe(&peers, &refused);
        }
        s.observe(&[b], &Poll::default());
        assert!(!s.is_stock(a));
    }

    /// A peer silent over two rounds for a second drains its tasks here, for 15 s
    /// removes them; one lost answer does nothing; an answer or a refusal ends it.
    #[test]
    fn silent_peers_drain_then_go() {
        let a: Ipv4Addr = "10.0.0.1".parse().unwrap();
        let b: Ipv4Addr = "10.0.0.2".parse().unwrap();
        let peers = [a, b];
        let t0 = std::time::Instant::now();
        let s = |n: u64| std::time::Duration::from_millis(n);
        let only_b = Poll {
            reports: BTreeMap::from([(b, Report::default())]),
            ..Default::default()
        };
        let both = Poll {
            reports: BTreeMap::from([(a, Report::default()), (b, Report::default())]),
            ..Default::default()
        };
        let mut sp = SilentPeers::default();
        // Never heard: silence changes nothing.
        for t in [0, 1000, 2000] {
            assert!(sp.observe(&peers, &Poll::default(), t0 + s(t)).is_empty());
        }
        let t0 = t0 + s(3000);
        sp.observe(&peers, &both, t0);
        assert!(
            sp.observe(&peers, &only_b, t0).is_empty(),
            "one round: nothing"
        );
        assert!(
            sp.observe(&peers, &only_b, t0 + s(500)).is_empty(),
            "two rounds in 0.5 s"
        );
        assert_eq!(
            sp.observe(&peers, &only_b, t0 + s(1000)),
            vec![(a, Silence::Draining)]
        );
        let mut m = crate::model::from_yaml(
            "services:\n  - name: web\n    backends: [{addr: 10.255.0.5, node: 10.0.0.1}, {addr: 10.255.0.6, node: 10.0.0.2}, {addr: 10.255.0.7}]\n",
        )
        .unwrap();
        sp.apply(&mut m, t0 + s(1000));
        let states: Vec<_> = m.services[0].backends.iter().map(|b| b.state).collect();
        use crate::model::Health::*;
        assert_eq!(
            states,
            vec![Draining, Active, Active],
            "a's task only; local ones never"
        );
        assert_eq!(
            sp.observe(&peers, &only_b, t0 + s(15_000)),
            vec![(a, Silence::Gone)]
        );
        sp.apply(&mut m, t0 + s(15_000));
        assert_eq!(m.services[0].backends.len(), 2);
        // It answers (or refuses): at once back.
        let refused = Poll {
            refused: BTreeSet::from([a]),
            ..only_b.clone()
        };
        assert_eq!(
            sp.observe(&peers, &refused, t0 + s(16_000)),
            vec![(a, Silence::Answering)]
        );
        // Every peer silent (this node is the one cut off): each is judged alike.
        let none = Poll::default();
        for t in [17_000, 18_000] {
            sp.observe(&peers, &none, t0 + s(t));
        }
        assert_eq!(sp.silence(a, t0 + s(18_000)), Silence::Draining);
        assert_eq!(sp.silence(b, t0 + s(18_000)), Silence::Draining);
    }
}
