//! What the node may send to one address: a per-destination packet budget and
//! back-off after errors and silence. Sans-IO: time comes in as an argument.
//!
//! Mainline implementations defend themselves by counting every packet a
//! source sends them. libtorrent's default (`dht_block_ratelimit` = 5) bans a
//! source that sends 50 packets within 10 s and keeps it banned while it keeps
//! talking (`dos_blocker::incoming`). A token bucket of `rate` packets a second
//! holding `BURST_SECONDS * rate` sends at most `12 * rate` packets in any
//! 10 s: with the default rate of 3, 36, well under 50. Queries, answers and errors
//! all draw on the one bucket (the far side counts them all); queries leave
//! `REPLY_RESERVE` tokens so the node can still answer that address.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Seconds of its rate a destination's bucket holds when full (a short
/// burst, e.g. a lookup's query followed by an announce).
pub const BURST_SECONDS: f64 = 2.0;
/// Tokens a query leaves in the bucket, for answers to that address.
pub const REPLY_RESERVE: f64 = 1.0;
/// Back-off after the first failure; doubles with each one after.
pub const BACKOFF_BASE: Duration = Duration::from_secs(1);
/// Longest back-off.
pub const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// Destinations tracked at most; idle ones are forgotten first.
const MAX_TRACKED: usize = 50_000;

/// What the caller may do with a query to one destination now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Send it now.
    Send,
    /// Over budget: this address will take a query within a second or so.
    Wait,
    /// Backing off after errors or silence: ask someone else.
    Skip,
}

#[derive(Clone, Debug)]
struct Dest {
    tokens: f64,
    at: Instant,
    failures: u32,
    backoff_until: Option<Instant>,
}

/// Per-destination budgets and back-offs.
pub struct Budget {
    /// Packets a second to one destination.
    rate: f64,
    /// Packets a full bucket holds.
    burst: f64,
    dests: HashMap<SocketAddr, Dest>,
}

/// The key a destination is counted under: its IP (as the far side counts
/// sources), or IP and port on loopback, where every test node shares one IP.
fn key(addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_loopback() { addr } else { SocketAddr::new(addr.ip(), 0) }
}

impl Budget {
    /// `rate`: packets a second to any one destination (at least 1).
    pub fn new(rate: u32) -> Budget {
        let rate = f64::from(rate.max(1));
        Budget { rate, burst: rate * BURST_SECONDS, dests: HashMap::new() }
    }

    fn dest(&mut self, to: SocketAddr, now: Instant) -> &mut Dest {
        if self.dests.len() >= MAX_TRACKED {
            let (rate, burst) = (self.rate, self.burst);
            self.dests.retain(|_, d| {
                let full = d.tokens + now.saturating_duration_since(d.at).as_secs_f64() * rate >= burst;
                !full || d.backoff_until.is_some_and(|t| t > now)
            });
            if self.dests.len() >= MAX_TRACKED {
                self.dests.clear(); // all busy at once: start over rather than grow
            }
        }
        let (rate, burst) = (self.rate, self.burst);
        let d = self.dests.entry(key(to)).or_insert(Dest { tokens: burst, at: now, failures: 0, backoff_until: None });
        let earned = now.saturating_duration_since(d.at).as_secs_f64() * rate;
        d.tokens = (d.tokens + earned).min(burst);
        d.at = now;
        d
    }

    /// Whether a query to `to` may go now.
    pub fn query_verdict(&mut self, to: SocketAddr, now: Instant) -> Verdict {
        let d = self.dest(to, now);
        if d.backoff_until.is_some_and(|t| now < t) {
            Verdict::Skip
        } else if d.tokens >= 1.0 + REPLY_RESERVE {
            Verdict::Send
        } else {
            Verdict::Wait
        }
    }

    /// Whether an answer to `to` may go now (it may use the reserve).
    pub fn may_reply(&mut self, to: SocketAddr, now: Instant) -> bool {
        self.dest(to, now).tokens >= 1.0
    }

    /// One packet went to `to`.
    pub fn spend(&mut self, to: SocketAddr, now: Instant) {
        let d = self.dest(to, now);
        d.tokens -= 1.0;
    }

    /// `to` answered: its back-off ends.
    pub fn answered(&mut self, to: SocketAddr) {
        if let Some(d) = self.dests.get_mut(&key(to)) {
            d.failures = 0;
            d.backoff_until = None;
        }
    }

    /// A query to `to` timed out or got an error: back off, doubling.
    pub fn failed(&mut self, to: SocketAddr, now: Instant) {
        let d = self.dest(to, now);
        d.failures = d.failures.saturating_add(1);
        let wait = BACKOFF_BASE.saturating_mul(1 << (d.failures - 1).min(16)).min(BACKOFF_MAX);
        d.backoff_until = Some(now + wait);
    }

    /// When `to`'s back-off ends, if it is backing off.
    pub fn backoff_until(&self, to: SocketAddr, now: Instant) -> Option<Instant> {
        self.dests.get(&key(to)).and_then(|d| d.backoff_until).filter(|t| *t > now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// libtorrent's `dos_blocker::incoming`: a source is banned once it has
    /// sent `10 * limit` packets in less than 10 s.
    struct LibtorrentBlocker {
        count: u32,
        limit: Option<Instant>,
        banned: bool,
    }

    impl LibtorrentBlocker {
        fn incoming(&mut self, now: Instant) {
            let Some(limit) = self.limit else {
                self.count = 1;
                self.limit = Some(now + Duration::from_secs(10));
                return;
            };
            self.count += 1;
            if self.count >= 50 {
                if now < limit {
                    self.banned = true;
                }
                self.count = 0;
                self.limit = Some(now + Duration::from_secs(10));
            }
        }
    }

    #[test]
    fn a_greedy_sender_stays_under_libtorrents_ban_threshold() {
        let start = Instant::now();
        let mut b = Budget::new(3);
        let mut lt = LibtorrentBlocker { count: 0, limit: None, banned: false };
        let mut sent = 0;
        // Try to send a query and an answer every millisecond for two minutes.
        for ms in 0..120_000u64 {
            let now = start + Duration::from_millis(ms);
            if b.query_verdict(a("1.2.3.4:6881"), now) == Verdict::Send {
                b.spend(a("1.2.3.4:6881"), now);
                lt.incoming(now);
                sent += 1;
            }
            if b.may_reply(a("1.2.3.4:6881"), now) {
                b.spend(a("1.2.3.4:6881"), now);
                lt.incoming(now);
                sent += 1;
            }
        }
        assert!(!lt.banned, "libtorrent would ban us");
        assert!(sent >= 3 * 119, "the budget is used: {sent}");
        assert!(sent <= 3 * 122, "{sent}");
    }

    #[test]
    fn queries_leave_room_for_answers_and_other_destinations_are_separate() {
        let now = Instant::now();
        let mut b = Budget::new(3);
        let mut queries = 0;
        while b.query_verdict(a("1.2.3.4:1"), now) == Verdict::Send {
            b.spend(a("1.2.3.4:1"), now);
            queries += 1;
        }
        assert_eq!(queries, (3.0 * BURST_SECONDS - REPLY_RESERVE) as u32);
        assert_eq!(b.query_verdict(a("1.2.3.4:2"), now), Verdict::Wait, "one IP, other port: same budget");
        assert!(b.may_reply(a("1.2.3.4:1"), now));
        assert_eq!(b.query_verdict(a("5.6.7.8:1"), now), Verdict::Send);
        // On loopback each port is its own destination (test networks).
        for _ in 0..6 {
            b.spend(a("127.0.0.1:1"), now);
        }
        assert_eq!(b.query_verdict(a("127.0.0.1:2"), now), Verdict::Send);
        assert_eq!(b.query_verdict(a("1.2.3.4:1"), now + Duration::from_secs(1)), Verdict::Send);
    }

    #[test]
    fn failures_back_off_doubling_and_an_answer_ends_it() {
        let now = Instant::now();
        let mut b = Budget::new(3);
        let to = a("9.9.9.9:1");
        b.failed(to, now);
        assert_eq!(b.query_verdict(to, now), Verdict::Skip);
        assert_eq!(b.query_verdict(to, now + BACKOFF_BASE), Verdict::Send);
        b.failed(to, now);
        b.failed(to, now);
        assert_eq!(b.backoff_until(to, now), Some(now + 4 * BACKOFF_BASE));
        for _ in 0..20 {
            b.failed(to, now);
        }
        assert_eq!(b.backoff_until(to, now), Some(now + BACKOFF_MAX));
        b.answered(to);
        assert_eq!(b.query_verdict(to, now), Verdict::Send);
    }
}
