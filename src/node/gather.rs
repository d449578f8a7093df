//! How long the inference thread holds a round open for steps that are about to arrive.
//!
//! A coordinator drives each session one step at a time: a step's answer goes back, the client
//! samples, and the next step comes in. With many sessions, the steps of a round are answered
//! together and come back together, but not at the same instant: taking only what has queued
//! when the thread looks would split them into a small round and a large one, and a small
//! round costs nearly as much as a full one (every weight is read either way). So the thread
//! learns, per session, the gap between an answer leaving and that session's next step
//! arriving, and waits for the sessions predicted back within a share of the last round's
//! compute time. A session that is far away (a pipeline whose other stages take longer than
//! that share) or long overdue (its client stopped) is not waited for; a single session never
//! waits.
//!
//! Only a node that is busy gains by waiting: its rounds follow each other with little idle
//! time between them, so a step that misses a round waits a whole round, and merging saves a
//! round. A node that is idle much of the time (a stage of a pipeline, whose steps spend most
//! of their time at the other stages) loses by waiting: a step that arrives runs at once in a
//! round of its own, while holding it back for the others makes the streams move through the
//! pipeline in lockstep, one stage busy at a time (4 streams through a 4-node pipeline: 83
//! against 100 tok/s without the wait, in one A/B run). So rounds are held open only while the
//! inference thread's share of time computing (an average over recent rounds, against its time
//! blocked on an empty queue) is at least [`BUSY_FROM`]. Sans-IO: every call takes the time.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

/// A session on a shard: `(session_id, shard_id)`.
pub type Key = (String, u32);

/// Share of the last round's duration a new round may wait for expected steps.
const WAIT_SHARE: f64 = 0.25;
/// The longest wait, whatever the last round took.
pub const MAX_WAIT: Duration = Duration::from_millis(20);
/// Lateness forgiven beyond twice a session's usual gap (scheduling noise).
const SLACK: Duration = Duration::from_millis(1);
/// Sessions answered longer ago than this are forgotten.
const FORGET_AFTER: Duration = Duration::from_secs(10);
/// Sessions remembered at most (more are simply not waited for).
pub const MAX_REMEMBERED: usize = 4096;
/// Share of time in rounds (against idle) from which a node holds rounds open.
pub const BUSY_FROM: f64 = 0.8;
/// Weight of the last round in the busy share's moving average.
const BUSY_WEIGHT: f64 = 0.25;

struct Seen {
    /// When its last step's answer left.
    answered: Instant,
    /// Time from that answer to the session's next step arriving, last seen.
    gap: Option<Duration>,
}

#[derive(Default)]
pub struct Gather {
    recent: HashMap<Key, Seen>,
    /// How long the last round took (compute and answers).
    last_round: Duration,
    /// Time blocked on an empty queue since the last round.
    idle: Duration,
    /// Moving average of each round's share of the time since the one before (the round
    /// against the idle time before it); starts at 0: no wait until rounds show the node busy.
    busy: f64,
}

impl Gather {
    /// A step of `key` arrived (queued) at `at`: learns the session's gap.
    pub fn arrived(&mut self, key: &Key, at: Instant) {
        if let Some(s) = self.recent.get_mut(key) {
            s.gap = Some(at.saturating_duration_since(s.answered));
        }
    }

    /// The inference thread waited `d` for a job with nothing queued.
    pub fn idle(&mut self, d: Duration) {
        self.idle += d;
    }

    /// The steps of `keys` were answered at `now`, the round having taken `took`.
    pub fn answered<'k>(&mut self, keys: impl IntoIterator<Item = &'k Key>, now: Instant, took: Duration) {
        self.last_round = took;
        let share = took.as_secs_f64() / (took + self.idle).as_secs_f64().max(1e-9);
        self.busy += BUSY_WEIGHT * (share - self.busy);
        self.idle = Duration::ZERO;
        self.recent.retain(|_, s| now.saturating_duration_since(s.answered) < FORGET_AFTER);
        for key in keys {
            let room = self.recent.len() < MAX_REMEMBERED;
            match self.recent.get_mut(key) {
                Some(s) => s.answered = now,
                None if room => {
                    self.recent.insert(key.clone(), Seen { answered: now, gap: None });
                }
                None => {}
            }
        }
    }

    /// The session ended: never wait for it.
    pub fn ended(&mut self, session_id: &str) {
        self.recent.retain(|(id, _), _| id != session_id);
    }

    /// Whether a session that `mine` does not pick is due back at `now`: it has a usual gap and
    /// is not overdue (past twice its gap plus [`SLACK`]), whatever the wait budget. A round that
    /// would compute a long prefill then computes less of it (see `schedule::PrefillShare`).
    pub fn expects_other(&self, mine: impl Fn(&Key) -> bool, now: Instant) -> bool {
        self.recent.iter().any(|(key, s)| s.gap.is_some_and(|gap| !mine(key) && s.answered + gap * 2 + SLACK > now))
    }

    /// For a round holding the sessions `have` says are queued, at `now`: the sessions worth waiting for, and the latest time
    /// to wait until (`None`: start now, always while the node's busy share is under
    /// [`BUSY_FROM`]). A session is waited for when its next step is
    /// predicted (its last answer plus its gap) within the wait budget (a share of the last
    /// round, at most [`MAX_WAIT`]), and not overdue (past twice its gap plus [`SLACK`]).
    pub fn plan(&self, have: impl Fn(&Key) -> bool, now: Instant) -> Option<(Instant, HashSet<Key>)> {
        if self.busy < BUSY_FROM {
            return None;
        }
        let budget = self.last_round.mul_f64(WAIT_SHARE).min(MAX_WAIT);
        let limit = now + budget;
        let mut until = now;
        let mut waiting = HashSet::new();
        for (key, s) in &self.recent {
            let Some(gap) = s.gap else { continue };
            if have(key) || s.answered + gap > limit {
                continue;
            }
            let late = s.answered + gap * 2 + SLACK;
            if late <= now {
                continue;
            }
            until = until.max(late.min(limit));
            waiting.insert(key.clone());
        }
        (!waiting.is_empty()).then_some((until, waiting))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> Key {
        (s.to_string(), 0)
    }

    const MS: Duration = Duration::from_millis(1);

    /// A node whose rounds have followed each other without idle time.
    fn busy() -> Gather {
        Gather { busy: 1.0, ..Gather::default() }
    }

    #[test]
    fn a_node_idle_much_of_the_time_never_waits_and_a_busy_one_does() {
        let t0 = Instant::now();
        let mut g = Gather::default();
        let (a, b) = (key("a"), key("b"));
        let have = HashSet::from([a.clone()]);
        // Rounds of 10 ms with 10 ms idle before each (a pipeline stage): busy share 0.5.
        let mut t = t0;
        for _ in 0..20 {
            g.idle(10 * MS);
            t += 20 * MS;
            g.answered([&a, &b], t, 10 * MS);
            g.arrived(&a, t + MS / 2);
            g.arrived(&b, t + MS);
        }
        assert!((g.busy - 0.5).abs() < 0.05, "{}", g.busy);
        assert!(
            g.plan(|k| have.contains(k), t + MS / 2).is_none(),
            "b is due in 1 ms, but the node is idle half the time"
        );
        // Rounds back to back: the share climbs past BUSY_FROM and b is waited for again.
        for _ in 0..10 {
            g.answered([&a, &b], t, 10 * MS);
        }
        assert!(g.busy >= BUSY_FROM);
        let (_, waiting) = g.plan(|k| have.contains(k), t + MS / 2).expect("b is due and the node is busy");
        assert_eq!(waiting, HashSet::from([b]));
    }

    #[test]
    fn a_lone_session_never_waits() {
        let t0 = Instant::now();
        let mut g = busy();
        g.answered([&key("a")], t0, 80 * MS);
        g.arrived(&key("a"), t0 + MS);
        let have = HashSet::from([key("a")]);
        assert!(g.plan(|k| have.contains(k), t0 + MS).is_none());
    }

    #[test]
    fn waits_for_sessions_due_back_within_the_budget_and_no_longer() {
        let t0 = Instant::now();
        let mut g = busy();
        let (a, b, far) = (key("a"), key("b"), key("far"));
        g.answered([&a, &b, &far], t0, 80 * MS);
        // Gaps learned on the next arrivals: a and b come back after 1 ms, `far` after 50 ms.
        g.arrived(&a, t0 + MS);
        g.arrived(&b, t0 + MS);
        g.arrived(&far, t0 + 50 * MS);
        let t1 = t0 + 100 * MS;
        g.answered([&a, &b, &far], t1, 80 * MS);
        // a is back; b is expected by t1 + 2 ms + slack; far is beyond 25% of 80 ms.
        let have = HashSet::from([a.clone()]);
        let (until, waiting) = g.plan(|k| have.contains(k), t1 + MS / 2).expect("b is due");
        assert_eq!(waiting, HashSet::from([b.clone()]));
        assert_eq!(until, t1 + 3 * MS);
        // Overdue: b's client stopped; no wait.
        assert!(g.plan(|k| have.contains(k), t1 + 4 * MS).is_none());
        // An ended session is not waited for.
        g.ended("b");
        assert!(g.plan(|k| have.contains(k), t1 + MS / 2).is_none());
    }

    #[test]
    fn sessions_due_back_are_expected_until_overdue() {
        let t0 = Instant::now();
        let mut g = Gather::default();
        let (a, b) = (key("a"), key("b"));
        g.answered([&a, &b], t0, 40 * MS);
        // No gap learned yet: nothing expected.
        assert!(!g.expects_other(|_| false, t0));
        g.arrived(&a, t0 + 2 * MS);
        let t1 = t0 + 50 * MS;
        g.answered([&a], t1, 40 * MS);
        assert!(g.expects_other(|_| false, t1 + MS));
        assert!(!g.expects_other(|k| *k == a, t1 + MS), "a session's own steps do not count");
        assert!(!g.expects_other(|_| false, t1 + 6 * MS), "overdue");
    }

    #[test]
    fn the_wait_is_bounded_by_a_share_of_the_last_round() {
        let t0 = Instant::now();
        let mut g = busy();
        let (a, b) = (key("a"), key("b"));
        g.answered([&a, &b], t0, 40 * MS);
        g.arrived(&a, t0 + 9 * MS);
        g.arrived(&b, t0 + 9 * MS);
        let t1 = t0 + 60 * MS;
        g.answered([&a, &b], t1, 40 * MS);
        let have = HashSet::from([a.clone()]);
        let (until, _) = g.plan(|k| have.contains(k), t1).expect("b is due in 9 ms, within 10 ms");
        assert_eq!(until, t1 + 10 * MS, "at most 25% of the 40 ms round");
        // A huge last round still waits at most MAX_WAIT.
        g.answered([&a, &b], t1, Duration::from_secs(10));
        assert_eq!(g.plan(|k| have.contains(k), t1).unwrap().0, t1 + MAX_WAIT.min(9 * 2 * MS + SLACK));
    }

    #[test]
    fn remembers_a_bounded_number_of_sessions_and_forgets_old_ones() {
        let t0 = Instant::now();
        let mut g = busy();
        let keys: Vec<Key> = (0..MAX_REMEMBERED + 100).map(|i| key(&i.to_string())).collect();
        g.answered(&keys, t0, MS);
        assert_eq!(g.recent.len(), MAX_REMEMBERED);
        g.answered([], t0 + FORGET_AFTER, MS);
        assert!(g.recent.is_empty());
    }
}
