//! Which queued inference jobs the next round computes: fair between clients, decode before
//! prefill, and bounded.
//!
//! Every job carries its client's `origin` (the per-client session quota's key) and the tokens it
//! computes. Jobs wait in one FIFO per client; each round takes, client by client in turn (the
//! first client served moves on every round):
//! 1. decode steps (one token) and `END_SESSION`s (none), one per client per pass, passes repeated
//!    until none is left or the round holds `max_jobs`: every client with a decode step queued
//!    gets one into this round, however many the others queued, and several sessions' decode
//!    steps still share one batched graph;
//! 2. then longer steps (prefill chunks), one per client per pass, while the round's tokens stay
//!    within `max_tokens` (the first chunk always fits: the engine splits a long one into graphs).
//!
//! A client's own jobs keep their order (a round takes a prefix of its FIFO), so a session's
//! steps, and an `END_SESSION` after them, run in the order they came. Before this, one FIFO for
//! all: one client's 64 prefill chunks (a minute of compute) delayed every other client's decode
//! step by all of it.
//!
//! Bounds: one client's queued tokens at most `per_client_tokens`, all clients' at most
//! `total_tokens`; a job past either is handed back to be refused (`BUSY`), so what strangers
//! make the node hold while it computes is bounded (each queued token is a hidden state of
//! `n_embd` f32s).

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

/// What the scheduler needs of a job.
pub trait Queued {
    /// The client's key (`origin`).
    fn origin(&self) -> &str;
    /// Tokens it computes: 1 for a decode step, 0 for an `END_SESSION`.
    fn tokens(&self) -> usize;
}

/// The bounds of a [`Scheduler`].
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Jobs in one round.
    pub max_jobs: usize,
    /// Tokens of prefill chunks a round may add (decode steps always fit).
    pub max_tokens: usize,
    /// Tokens one client may have queued.
    pub per_client_tokens: usize,
    /// Tokens all clients may have queued.
    pub total_tokens: usize,
}

/// Per-client FIFOs served in turn. See the module docs.
pub struct Scheduler<J> {
    limits: Limits,
    /// Clients with jobs queued, in serving order (the front is served first next round).
    order: VecDeque<String>,
    queues: HashMap<String, (VecDeque<J>, usize)>,
    total: usize,
    jobs: usize,
}

/// Why a job was not queued.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Its client has `per_client_tokens` queued (the count given).
    Client(usize),
    /// The node has `total_tokens` queued (the count given).
    Node(usize),
}

impl<J: Queued> Scheduler<J> {
    pub fn new(limits: Limits) -> Scheduler<J> {
        Scheduler { limits, order: VecDeque::new(), queues: HashMap::new(), total: 0, jobs: 0 }
    }

    pub fn is_empty(&self) -> bool {
        self.jobs == 0
    }

    /// Queues `job` behind its client's others, or hands it back with the reason when a bound
    /// would be passed. A decode step (one token) or an `END_SESSION` always queues: a running
    /// session is never refused its next token because others queued prompts (what it holds is
    /// bounded by the requests in flight per connection).
    pub fn push(&mut self, job: J) -> Result<(), (J, Refusal)> {
        let n = job.tokens();
        let held = self.queues.get(job.origin()).map_or(0, |(_, t)| *t);
        if n > 1 && held + n > self.limits.per_client_tokens && held > 0 {
            return Err((job, Refusal::Client(held)));
        }
        if n > 1 && self.total + n > self.limits.total_tokens && self.total > 0 {
            return Err((job, Refusal::Node(self.total)));
        }
        self.enqueue(job, false);
        Ok(())
    }

    /// Takes every queued job `gone` picks out of the queues (a closed connection's steps: see
    /// `inference::Inference::cancel`), their tokens no longer counted; the others keep their
    /// order. The jobs taken, in no particular order.
    pub fn remove(&mut self, gone: impl Fn(&J) -> bool) -> Vec<J> {
        let mut removed = Vec::new();
        for (q, held) in self.queues.values_mut() {
            let before = q.len();
            let mut kept = VecDeque::with_capacity(before);
            for job in q.drain(..) {
                if gone(&job) {
                    *held -= job.tokens();
                    self.total -= job.tokens();
                    removed.push(job);
                } else {
                    kept.push_back(job);
                }
            }
            *q = kept;
        }
        self.jobs -= removed.len();
        self.order.retain(|o| self.queues.get(o).is_some_and(|(q, _)| !q.is_empty()));
        self.queues.retain(|_, (q, _)| !q.is_empty());
        removed
    }

    /// Puts `job` back at the front of its client's FIFO, ahead of the rest (the remainder of a
    /// step split by [`PrefillShare`], or a step a round had no room for). No bound applies: its
    /// tokens were admitted when it was first queued.
    pub fn push_front(&mut self, job: J) {
        self.enqueue(job, true);
    }

    /// Queues `job` at the back (or `front`) of its client's FIFO, counting its tokens; a client
    /// new to the queues joins the round-robin order last.
    fn enqueue(&mut self, job: J, front: bool) {
        let n = job.tokens();
        let origin = job.origin().to_string();
        let entry = self.queues.entry(origin.clone()).or_insert_with(|| {
            self.order.push_back(origin);
            (VecDeque::new(), 0)
        });
        if front {
            entry.0.push_front(job);
        } else {
            entry.0.push_back(job);
        }
        entry.1 += n;
        self.total += n;
        self.jobs += 1;
    }

    /// Whether a decode step (one token) waits in any client's queue.
    pub fn has_decode_step(&self) -> bool {
        self.queues.values().any(|(q, _)| q.iter().any(|j| j.tokens() == 1))
    }

    /// The next round's jobs, in an order that keeps each client's own order.
    pub fn next_round(&mut self) -> Vec<J> {
        let mut round = Vec::new();
        // Tokens of prefill chunks in the round.
        let mut prefill = 0usize;
        // Clients whose next job must wait for the next round (passes 1 and 2 take prefixes).
        let mut blocked: Vec<String> = Vec::new();
        let small = |j: &J| j.tokens() <= 1;
        // Pass 1: decode steps and END_SESSIONs, one per client per pass.
        loop {
            let mut took = false;
            for origin in &self.order {
                if round.len() >= self.limits.max_jobs {
                    break;
                }
                let (q, held) = self.queues.get_mut(origin).expect("ordered clients have queues");
                if q.front().is_some_and(small) {
                    let job = q.pop_front().expect("a front");
                    *held -= job.tokens();
                    self.total -= job.tokens();
                    round.push(job);
                    took = true;
                }
            }
            if !took || round.len() >= self.limits.max_jobs {
                break;
            }
        }
        // Pass 2: prefill chunks, one per client per pass, within the round's token budget.
        loop {
            let mut took = false;
            for origin in &self.order {
                if round.len() >= self.limits.max_jobs || blocked.contains(origin) {
                    continue;
                }
                let (q, held) = self.queues.get_mut(origin).expect("ordered clients have queues");
                let Some(n) = q.front().map(|j| j.tokens()) else { continue };
                if n <= 1 {
                    // A decode step behind this client's prefill chunk: next round, in order.
                    blocked.push(origin.clone());
                    continue;
                }
                if prefill > 0 && prefill + n > self.limits.max_tokens {
                    blocked.push(origin.clone());
                    continue;
                }
                let job = q.pop_front().expect("a front");
                *held -= n;
                self.total -= n;
                prefill += n;
                round.push(job);
                took = true;
            }
            if !took {
                break;
            }
        }
        self.jobs -= round.len();
        // Drop emptied clients; the first client served moves on.
        self.order.retain(|o| self.queues.get(o).is_some_and(|(q, _)| !q.is_empty()));
        self.queues.retain(|_, (q, _)| !q.is_empty());
        if self.order.len() > 1 {
            self.order.rotate_left(1);
        }
        round
    }
}

/// Prefill a round may compute while other sessions' decode steps wait, in seconds of compute:
/// a decode step then waits at most about two such rounds (the one computing when it arrives,
/// then its own), instead of two rounds of [`crate::engine::MAX_BATCH_TOKENS`] prefill tokens
/// (red-team round 8: a victim's step 20 ms -> 4.7 s behind a stranger's 512-token chunks on a
/// one-thread node). 50 ms is what one 512-token ubatch of a small model costs on a GPU
/// (llama.cpp's n_ubatch), so a node fast enough keeps whole chunks.
pub const CONTENDED_PREFILL: Duration = Duration::from_millis(50);
/// The fewest prefill tokens a contended round computes: below this a CPU's batched matrix
/// products lose much of their throughput, and a prompt would crawl; and a part of fewer than
/// [`crate::engine::PREFILL_GRANULE`] rows would take ggml's F16 attention kernel, so that the
/// prompt's result would depend on the load (see there).
pub const MIN_PREFILL_CHUNK: usize = crate::engine::PREFILL_GRANULE;

/// The prefill tokens one round computes while others' decode steps wait, from the node's
/// measured prefill rate: [`CONTENDED_PREFILL`] worth, within [`MIN_PREFILL_CHUNK`] and
/// `max_tokens` (which it is, uncontended), rounded down to a multiple of
/// [`crate::engine::PREFILL_GRANULE`], so that a prompt is only ever cut at multiples of it.
#[derive(Debug, Default)]
pub struct PrefillShare {
    /// Tokens per second of prefill rounds, smoothed; `None` until one is measured.
    rate: Option<f64>,
}

impl PrefillShare {
    /// A round computed `tokens` prefill tokens (with whatever decode steps) in `took`.
    pub fn record(&mut self, tokens: usize, took: Duration) {
        if tokens < MIN_PREFILL_CHUNK || took.is_zero() {
            return;
        }
        let sample = tokens as f64 / took.as_secs_f64();
        self.rate = Some(self.rate.map_or(sample, |r| 0.7 * r + 0.3 * sample));
    }

    /// Prefill tokens for a contended round (before any is measured: a quarter of `max_tokens`);
    /// a multiple of [`crate::engine::PREFILL_GRANULE`] when `max_tokens` is at least that.
    pub fn chunk(&self, max_tokens: usize) -> usize {
        let n = self.rate.map_or(max_tokens / 4, |r| (r * CONTENDED_PREFILL.as_secs_f64()) as usize);
        let n = n.clamp(MIN_PREFILL_CHUNK.min(max_tokens), max_tokens);
        let g = crate::engine::PREFILL_GRANULE;
        if n >= g { n / g * g } else { n }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, PartialEq)]
    struct J(&'static str, usize, u32);

    impl Queued for J {
        fn origin(&self) -> &str {
            self.0
        }
        fn tokens(&self) -> usize {
            self.1
        }
    }

    fn limits() -> Limits {
        Limits { max_jobs: 64, max_tokens: 512, per_client_tokens: 4096, total_tokens: 8192 }
    }

    /// The red-team's starvation: a client's 64 prefill chunks queued before another's decode
    /// step. In one FIFO the decode step waited for all 64; here it is in the first round.
    #[test]
    fn a_decode_step_is_not_queued_behind_another_clients_prefill() {
        let mut s = Scheduler::new(limits());
        for i in 0..8 {
            s.push(J("flood", 512, i)).unwrap();
        }
        s.push(J("victim", 1, 0)).unwrap();
        let round = s.next_round();
        assert!(round.contains(&J("victim", 1, 0)), "{round:?}");
        assert_eq!(round.iter().map(|j| j.1).sum::<usize>(), 513, "one 512-token chunk besides: {round:?}");
        // The rest follows, one graph's worth a round.
        for i in 1..8 {
            assert_eq!(s.next_round(), vec![J("flood", 512, i)]);
        }
        assert!(s.is_empty());
    }

    #[test]
    fn decode_steps_of_many_sessions_share_a_round_and_clients_take_turns() {
        let mut s = Scheduler::new(limits());
        for i in 0..16 {
            s.push(J("serve", 1, i)).unwrap();
        }
        s.push(J("other", 1, 0)).unwrap();
        let round = s.next_round();
        assert_eq!(round.len(), 17, "every decode step in one batched round: {round:?}");
        assert_eq!(round[1], J("other", 1, 0), "the second client's step right after the first's");
        // Past max_jobs, clients alternate.
        let mut s = Scheduler::new(Limits { max_jobs: 4, ..limits() });
        for i in 0..10 {
            s.push(J("a", 1, i)).unwrap();
        }
        for i in 0..2 {
            s.push(J("b", 1, i)).unwrap();
        }
        let r = s.next_round();
        assert_eq!(r, vec![J("a", 1, 0), J("b", 1, 0), J("a", 1, 1), J("b", 1, 1)]);
    }

    #[test]
    fn a_clients_own_order_is_kept() {
        let mut s = Scheduler::new(limits());
        s.push(J("a", 300, 0)).unwrap();
        s.push(J("a", 1, 1)).unwrap();
        s.push(J("a", 0, 2)).unwrap(); // END_SESSION
        s.push(J("a", 300, 3)).unwrap();
        s.push(J("b", 300, 0)).unwrap();
        let mut seen = Vec::new();
        while !s.is_empty() {
            let r = s.next_round();
            assert!(!r.is_empty());
            seen.extend(r);
        }
        let a: Vec<u32> = seen.iter().filter(|j| j.0 == "a").map(|j| j.2).collect();
        assert_eq!(a, vec![0, 1, 2, 3]);
        assert_eq!(seen.len(), 5);
    }

    #[test]
    fn queued_tokens_are_bounded_per_client_and_in_all() {
        let mut s = Scheduler::new(Limits { per_client_tokens: 1000, total_tokens: 1500, ..limits() });
        s.push(J("a", 600, 0)).unwrap();
        assert_eq!(s.push(J("a", 600, 1)).unwrap_err().1, Refusal::Client(600));
        s.push(J("a", 400, 2)).unwrap();
        s.push(J("b", 400, 0)).unwrap();
        assert_eq!(s.push(J("c", 400, 0)).unwrap_err().1, Refusal::Node(1400));
        // No tokens (END_SESSION) and decode steps always queue; one step alone may be as long
        // as it is.
        s.push(J("a", 0, 3)).unwrap();
        s.push(J("a", 1, 4)).unwrap();
        s.push(J("c", 1, 1)).unwrap();
        let mut fresh = Scheduler::new(Limits { per_client_tokens: 10, total_tokens: 10, ..limits() });
        fresh.push(J("a", 2048, 0)).unwrap();
        // Tokens come back as rounds are taken.
        while !s.is_empty() {
            s.next_round();
        }
        s.push(J("c", 1000, 0)).unwrap();
    }

    /// A closed connection's queued steps leave the queue and give their tokens back.
    #[test]
    fn removed_jobs_release_their_tokens_and_the_rest_keep_order() {
        let mut s = Scheduler::new(Limits { per_client_tokens: 1000, total_tokens: 1500, ..limits() });
        s.push(J("a", 500, 0)).unwrap();
        s.push(J("a", 1, 1)).unwrap();
        s.push(J("a", 400, 2)).unwrap();
        s.push(J("b", 500, 0)).unwrap();
        assert_eq!(s.push(J("c", 500, 0)).unwrap_err().1, Refusal::Node(1401));
        assert_eq!(s.push(J("a", 450, 9)).unwrap_err().1, Refusal::Client(901));
        let mut gone = s.remove(|j| j.0 == "a" && j.2 != 1);
        gone.sort_by_key(|j| j.2);
        assert_eq!(gone, vec![J("a", 500, 0), J("a", 400, 2)]);
        // Their tokens are free again, per client and node-wide.
        s.push(J("c", 500, 0)).unwrap();
        s.push(J("a", 450, 3)).unwrap();
        let mut seen = Vec::new();
        while !s.is_empty() {
            seen.extend(s.next_round());
        }
        let a: Vec<u32> = seen.iter().filter(|j| j.0 == "a").map(|j| j.2).collect();
        assert_eq!(a, vec![1, 3]);
        assert_eq!(seen.len(), 4);
        assert!(s.remove(|_| true).is_empty());
    }

    #[test]
    fn the_contended_prefill_share_follows_the_measured_rate() {
        let mut p = PrefillShare::default();
        assert_eq!(p.chunk(512), 128, "unmeasured: a quarter");
        // 110 tokens/s (the red-team's one-thread node): the floor.
        p.record(512, Duration::from_millis(4650));
        assert_eq!(p.chunk(512), MIN_PREFILL_CHUNK);
        // 5,000 tokens/s: 250 tokens in 50 ms.
        let mut p = PrefillShare::default();
        p.record(500, Duration::from_millis(100));
        assert_eq!(p.chunk(512), 192, "250, cut to a multiple of 64");
        // A GPU: whole chunks.
        p.record(512, Duration::from_millis(5));
        p.record(512, Duration::from_millis(5));
        assert_eq!(p.chunk(512), 512);
        // Rounds with too few tokens to tell are not counted.
        let before = p.chunk(512);
        p.record(3, Duration::from_secs(1));
        assert_eq!(p.chunk(512), before);
    }

    #[test]
    fn a_job_put_back_is_next_for_its_client() {
        let mut s = Scheduler::new(limits());
        s.push(J("a", 300, 1)).unwrap();
        s.push(J("b", 1, 0)).unwrap();
        assert!(s.has_decode_step());
        s.push_front(J("a", 200, 0));
        let mut seen = Vec::new();
        while !s.is_empty() {
            seen.extend(s.next_round());
        }
        let a: Vec<u32> = seen.iter().filter(|j| j.0 == "a").map(|j| j.2).collect();
        assert_eq!(a, vec![0, 1]);
        assert!(!s.has_decode_step());
    }

    #[test]
    fn a_long_step_runs_alone_and_the_budget_holds() {
        let mut s = Scheduler::new(limits());
        s.push(J("a", 2048, 0)).unwrap();
        s.push(J("b", 100, 0)).unwrap();
        assert_eq!(s.next_round(), vec![J("a", 2048, 0)]);
        assert_eq!(s.next_round(), vec![J("b", 100, 0)]);
    }
}
