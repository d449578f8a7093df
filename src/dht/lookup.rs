//! An iterative Kademlia lookup (find_node or get_peers), sans-IO.
//!
//! Up to `ALPHA` queries are in flight; a query silent for `SOFT_TIMEOUT`
//! stops counting against that and leaves the frontier (it may still answer),
//! so a dead node costs a quarter second, not the full query timeout. The
//! lookup ends as soon as the `K` closest nodes that are neither failed nor
//! silent have all answered: it converges rather than waiting for stragglers.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::budget::Verdict;
use super::krpc::{Id, NodeInfo};
use super::routing::K;

/// Parallel queries (Kademlia's alpha).
pub const ALPHA: usize = 3;
/// A query unanswered this long frees its slot for another.
pub const SOFT_TIMEOUT: Duration = Duration::from_millis(250);
/// Candidates kept, closest first.
const MAX_CANDIDATES: usize = 8 * K;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Fresh,
    InFlight(Instant),
    Stalled,
    Responded,
    Failed,
}

#[derive(Clone, Debug)]
struct Candidate {
    node: NodeInfo,
    state: State,
    token: Option<Vec<u8>>,
    /// Hops from our routing table: 1 for nodes we knew.
    depth: u32,
    /// Held back at least once: its address's budget was spent.
    held: bool,
}

pub struct Lookup {
    pub target: Id,
    candidates: Vec<Candidate>,
    pub peers: Vec<SocketAddr>,
    /// Queries sent.
    pub messages: u32,
    pub started: Instant,
    /// When the first peer arrived (get_peers).
    pub first_peer: Option<Instant>,
    /// Candidates held back at least once by their address's budget (`Verdict::Wait`).
    pub budget_waits: u32,
}

impl Lookup {
    pub fn new(target: Id, seeds: Vec<NodeInfo>, now: Instant) -> Lookup {
        let mut l = Lookup {
            target,
            candidates: Vec::new(),
            peers: Vec::new(),
            messages: 0,
            started: now,
            first_peer: None,
            budget_waits: 0,
        };
        for n in seeds {
            l.add(n, 1);
        }
        l
    }

    fn add(&mut self, node: NodeInfo, depth: u32) {
        if self.candidates.iter().any(|c| c.node.id == node.id) {
            return;
        }
        let d = node.id.distance(&self.target);
        let at = self.candidates.partition_point(|c| c.node.id.distance(&self.target) < d);
        if at >= MAX_CANDIDATES {
            return;
        }
        self.candidates.insert(at, Candidate { node, state: State::Fresh, token: None, depth, held: false });
        self.candidates.truncate(MAX_CANDIDATES);
    }

    /// The K closest candidates not known to be failed or silent: a node
    /// past its soft timeout no longer holds the lookup back (if it answers
    /// late, its answer is still used).
    fn frontier(&self) -> impl Iterator<Item = &Candidate> {
        self.candidates.iter().filter(|c| !matches!(c.state, State::Failed | State::Stalled)).take(K)
    }

    /// Nodes to query now (the caller sends the queries). `verdict` says
    /// whether a node may be asked now: one over its budget (`Wait`) stays
    /// fresh and the next closest is asked instead; one backing off
    /// (`Skip`) is treated as failed.
    pub fn next(&mut self, now: Instant, mut verdict: impl FnMut(&NodeInfo) -> Verdict) -> Vec<NodeInfo> {
        for c in &mut self.candidates {
            if let State::InFlight(at) = c.state
                && now.duration_since(at) >= SOFT_TIMEOUT
            {
                c.state = State::Stalled;
            }
        }
        let busy = self.candidates.iter().filter(|c| matches!(c.state, State::InFlight(_))).count();
        let mut out = Vec::new();
        let mut slots = ALPHA.saturating_sub(busy);
        while slots > 0 {
            let fresh: Vec<NodeInfo> = self.frontier().filter(|c| c.state == State::Fresh).map(|c| c.node).collect();
            let mut skipped = false;
            for node in fresh {
                if slots == 0 {
                    break;
                }
                let c = self.candidates.iter_mut().find(|c| c.node.id == node.id).expect("listed");
                match verdict(&node) {
                    Verdict::Send => {
                        c.state = State::InFlight(now);
                        self.messages += 1;
                        out.push(node);
                        slots -= 1;
                    }
                    Verdict::Wait => {
                        if !c.held {
                            c.held = true;
                            self.budget_waits += 1;
                        }
                    }
                    Verdict::Skip => {
                        c.state = State::Failed;
                        skipped = true;
                    }
                }
            }
            // A skipped node lets a farther one into the frontier: look again.
            if !skipped {
                break;
            }
        }
        out
    }

    /// `from` answered with closer `nodes`, maybe `values` (peers) and a token.
    pub fn on_response(
        &mut self,
        from: &Id,
        nodes: &[NodeInfo],
        values: &[SocketAddr],
        token: Option<Vec<u8>>,
        now: Instant,
    ) {
        let Some(c) = self.candidates.iter_mut().find(|c| c.node.id == *from) else { return };
        c.state = State::Responded;
        c.token = token;
        let depth = c.depth + 1;
        for n in nodes {
            self.add(*n, depth);
        }
        for p in values {
            if !self.peers.contains(p) {
                self.peers.push(*p);
                self.first_peer.get_or_insert(now);
            }
        }
    }

    pub fn on_failure(&mut self, id: &Id) {
        if let Some(c) = self.candidates.iter_mut().find(|c| c.node.id == *id) {
            c.state = State::Failed;
        }
    }

    /// Done when the K closest live candidates have all answered, or when
    /// nothing is left to ask and nothing is in flight.
    pub fn is_done(&self) -> bool {
        let frontier_answered = self.frontier().all(|c| c.state == State::Responded);
        let idle = !self.candidates.iter().any(|c| matches!(c.state, State::Fresh | State::InFlight(_)));
        frontier_answered || idle
    }

    /// The closest nodes that answered, with their tokens (for announces).
    pub fn responded(&self) -> Vec<(NodeInfo, Option<Vec<u8>>)> {
        self.candidates
            .iter()
            .filter(|c| c.state == State::Responded)
            .take(K)
            .map(|c| (c.node, c.token.clone()))
            .collect()
    }

    /// Hops to the farthest node in the final K (the lookup's round trips).
    pub fn rounds(&self) -> u32 {
        self.candidates.iter().filter(|c| c.state == State::Responded).take(K).map(|c| c.depth).max().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(b: u8) -> NodeInfo {
        let mut id = [0u8; 20];
        id[0] = b;
        NodeInfo { id: Id(id), addr: SocketAddr::new([127, 0, 0, 1].into(), 1000 + b as u16) }
    }

    #[test]
    fn converges_on_the_closest_and_stops() {
        let now = Instant::now();
        let mut l = Lookup::new(Id([0; 20]), vec![n(200), n(150), n(100)], now);
        let first = l.next(now, |_| Verdict::Send);
        assert_eq!(first.len(), ALPHA);
        assert!(l.next(now, |_| Verdict::Send).is_empty(), "alpha in flight");
        // Each answer brings closer nodes.
        l.on_response(&n(100).id, &[n(10), n(20)], &[], None, now);
        l.on_response(&n(150).id, &[n(5)], &[], None, now);
        l.on_response(&n(200).id, &[], &[], None, now);
        let second = l.next(now, |_| Verdict::Send);
        assert_eq!(second.iter().map(|x| x.id.0[0]).collect::<Vec<_>>(), vec![5, 10, 20]);
        for x in &second {
            l.on_response(&x.id, &[], &[SocketAddr::new([1, 1, 1, 1].into(), 1)], Some(b"t".to_vec()), now);
        }
        assert!(l.is_done());
        assert_eq!(l.peers.len(), 1);
        assert_eq!(l.rounds(), 2);
        assert_eq!(l.responded()[0].0.id, n(5).id);
        assert_eq!(l.messages, 6);
    }

    #[test]
    fn a_silent_node_frees_its_slot_after_the_soft_timeout() {
        let now = Instant::now();
        let mut l = Lookup::new(Id([0; 20]), vec![n(1), n(2), n(3), n(4)], now);
        assert_eq!(l.next(now, |_| Verdict::Send).len(), 3);
        assert!(l.next(now + Duration::from_millis(10), |_| Verdict::Send).is_empty());
        let later = now + SOFT_TIMEOUT;
        assert_eq!(l.next(later, |_| Verdict::Send).len(), 1, "stalled queries do not hold slots");
        l.on_failure(&n(1).id);
        assert!(!l.is_done());
    }

    #[test]
    fn ends_when_nothing_is_left() {
        let now = Instant::now();
        let mut l = Lookup::new(Id([0; 20]), vec![n(1)], now);
        l.next(now, |_| Verdict::Send);
        l.on_failure(&n(1).id);
        assert!(l.is_done());
    }

    #[test]
    fn nodes_over_budget_wait_and_backing_off_nodes_are_passed_over() {
        let now = Instant::now();
        let mut l = Lookup::new(Id([0; 20]), vec![n(1), n(2), n(3), n(4), n(5)], now);
        // n(1) is over its budget, n(2) backing off: the next closest are asked.
        let asked = l.next(now, |x| match x.id.0[0] {
            1 => Verdict::Wait,
            2 => Verdict::Skip,
            _ => Verdict::Send,
        });
        assert_eq!(asked.iter().map(|x| x.id.0[0]).collect::<Vec<_>>(), vec![3, 4, 5]);
        for x in &asked {
            l.on_response(&x.id, &[], &[], None, now);
        }
        assert!(!l.is_done(), "n(1) is still to be asked");
        assert_eq!(l.next(now, |_| Verdict::Send).iter().map(|x| x.id.0[0]).collect::<Vec<_>>(), vec![1]);
        assert!(Lookup::new(Id([0; 20]), vec![], now).is_done());
    }
}
