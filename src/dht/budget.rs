//! What the node may send to one address: a per-destination packet budget and
//! back-off after errors and silence. Sans-IO: time comes in as an argument.
//!
//! Mainline implementations defend themselves by counting every packet a
//! source sends them. libtorrent's default (`dht_block_ratelimit` = 5) bans a
//! source that sends 50 packets within 10 s and keeps it banned while it keeps
//! talking (`dos_blocker::incoming`). A token bucket of `rate` packets a second
//! holding `BURST_SECONDS * rate` sends at most `(BURST_SECONDS + 10) * rate`
//! packets in any 10 s: with the default rate of 3, 45, under 50. Queries,
//! answers and errors all draw on the one bucket (the far side counts them
//! all); queries leave `REPLY_RESERVE` tokens so the node can still answer
//! that address.
//!
//! Queries come in two priorities. Background ones (announces, joins, table
//! refreshes: the node's own upkeep, which nobody waits on) may only use the
//! upper part of the bucket (`BACKGROUND_SHARE`), so a lookup someone waits on
//! (a FIND_PEERS, a shard's load) finds tokens there at once instead of
//! queueing behind the node's announces: a seed announcing ten keys sends two
//! packets per key to every node near them, and with one bucket for all, a
//! coordinator's FIND_PEERS of the cluster waited 6.7 s for twenty packets'
//! worth of budget at 3 a second. The split only orders what is sent; the
//! bucket and its rate are the same for both, so the bound on packets per
//! 10 s holds. So that a flood of foreground lookups (a client asking
//! FIND_PEERS without pause) cannot silence the node's announces, a background
//! query held `BACKGROUND_MAX_WAIT` goes as a foreground one would.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Seconds of its rate a destination's bucket holds when full: a short burst
/// (a few lookups someone waits on, while the node answers and announces).
pub const BURST_SECONDS: f64 = 5.0;
/// Tokens a query leaves in the bucket, for answers to that address.
pub const REPLY_RESERVE: f64 = 1.0;
/// The part of the bucket above `REPLY_RESERVE` that background queries may use (the upper
/// part); the rest is kept for foreground queries.
pub const BACKGROUND_SHARE: f64 = 0.5;
/// A background query held this long at one destination may go as a foreground one: the node's
/// upkeep gets at least one packet a second per destination however busy the foreground.
pub const BACKGROUND_MAX_WAIT: Duration = Duration::from_secs(1);
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

/// Who waits on a query: decides how deep into a destination's bucket it may go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Priority {
    /// Someone waits on the answer: a command's lookup, a shard's load, a download's peers.
    Foreground,
    /// The node's own upkeep (announces, joins, refreshes): only the upper part of the bucket
    /// (`BACKGROUND_SHARE`).
    Background,
}

#[derive(Clone, Debug)]
struct Dest {
    tokens: f64,
    at: Instant,
    failures: u32,
    backoff_until: Option<Instant>,
    /// Since when a background query to it has been held (cleared when one goes).
    background_held_since: Option<Instant>,
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
        let d = self.dests.entry(key(to)).or_insert(Dest {
            tokens: burst,
            at: now,
            failures: 0,
            backoff_until: None,
            background_held_since: None,
        });
        let earned = now.saturating_duration_since(d.at).as_secs_f64() * rate;
        d.tokens = (d.tokens + earned).min(burst);
        d.at = now;
        d
    }

    /// Whether a query of `priority` to `to` may go now.
    pub fn query_verdict(&mut self, to: SocketAddr, priority: Priority, now: Instant) -> Verdict {
        let floor = 1.0 + REPLY_RESERVE;
        let reserved = (self.burst - (self.burst - floor) * BACKGROUND_SHARE).max(floor);
        let d = self.dest(to, now);
        if d.backoff_until.is_some_and(|t| now < t) {
            return Verdict::Skip;
        }
        let need = match priority {
            Priority::Foreground => floor,
            Priority::Background
                if d.background_held_since.is_some_and(|t| now.saturating_duration_since(t) >= BACKGROUND_MAX_WAIT) =>
            {
                floor
            }
            Priority::Background => reserved,
        };
        if d.tokens >= need {
            if priority == Priority::Background {
                d.background_held_since = None;
            }
            Verdict::Send
        } else {
            if priority == Priority::Background {
                d.background_held_since.get_or_insert(now);
            }
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
            if b.query_verdict(a("1.2.3.4:6881"), Priority::Foreground, now) == Verdict::Send {
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
        assert!(sent as f64 <= 3.0 * (120.0 + BURST_SECONDS) + 1.0, "{sent}");
    }

    #[test]
    fn queries_leave_room_for_answers_and_other_destinations_are_separate() {
        let now = Instant::now();
        let mut b = Budget::new(3);
        let mut queries = 0;
        while b.query_verdict(a("1.2.3.4:1"), Priority::Foreground, now) == Verdict::Send {
            b.spend(a("1.2.3.4:1"), now);
            queries += 1;
        }
        assert_eq!(queries, (3.0 * BURST_SECONDS - REPLY_RESERVE) as u32);
        assert_eq!(
            b.query_verdict(a("1.2.3.4:2"), Priority::Foreground, now),
            Verdict::Wait,
            "one IP, other port: same budget"
        );
        assert!(b.may_reply(a("1.2.3.4:1"), now));
        assert_eq!(b.query_verdict(a("5.6.7.8:1"), Priority::Foreground, now), Verdict::Send);
        // On loopback each port is its own destination (test networks).
        for _ in 0..6 {
            b.spend(a("127.0.0.1:1"), now);
        }
        assert_eq!(b.query_verdict(a("127.0.0.1:2"), Priority::Foreground, now), Verdict::Send);
        assert_eq!(b.query_verdict(a("1.2.3.4:1"), Priority::Foreground, now + Duration::from_secs(1)), Verdict::Send);
    }

    #[test]
    fn background_queries_leave_room_for_foreground_ones() {
        let now = Instant::now();
        let mut b = Budget::new(3);
        let to = a("1.2.3.4:1");
        let mut background = 0;
        while b.query_verdict(to, Priority::Background, now) == Verdict::Send {
            b.spend(to, now);
            background += 1;
        }
        // 15 tokens at 3 a second: background goes down to 8 (of the 13 above the answer
        // reserve, the upper half), foreground lookups then still go at once, down to the
        // answer reserve.
        assert_eq!(background, 7);
        for _ in 0..7 {
            assert_eq!(b.query_verdict(to, Priority::Foreground, now), Verdict::Send);
            b.spend(to, now);
        }
        assert_eq!(b.query_verdict(to, Priority::Foreground, now), Verdict::Wait);
        assert!(b.may_reply(to, now));
        // Refilled, the foreground goes first: background waits until the reserve is back.
        let later = now + Duration::from_millis(334);
        assert_eq!(b.query_verdict(to, Priority::Background, later), Verdict::Wait);
        assert_eq!(b.query_verdict(to, Priority::Foreground, later), Verdict::Send);
        // A bucket too small for the reserve (1 packet a second) still sends background queries.
        let mut small = Budget::new(1);
        assert_eq!(small.query_verdict(to, Priority::Background, now), Verdict::Send);
    }

    #[test]
    fn a_foreground_flood_cannot_silence_the_background() {
        // Foreground queries take every token as it comes; background upkeep still goes,
        // at least once per BACKGROUND_MAX_WAIT.
        let start = Instant::now();
        let mut b = Budget::new(3);
        let to = a("1.2.3.4:1");
        let mut background = Vec::new();
        for ms in 0..10_000u64 {
            let now = start + Duration::from_millis(ms);
            if b.query_verdict(to, Priority::Background, now) == Verdict::Send {
                b.spend(to, now);
                background.push(ms);
            }
            while b.query_verdict(to, Priority::Foreground, now) == Verdict::Send {
                b.spend(to, now);
            }
        }
        assert!(background.len() >= 8, "{background:?}");
        let worst_gap = background.windows(2).map(|w| w[1] - w[0]).max().unwrap();
        assert!(worst_gap <= BACKGROUND_MAX_WAIT.as_millis() as u64 + 400, "{background:?}");
    }

    #[test]
    fn background_and_foreground_together_stay_under_libtorrents_ban_threshold() {
        let start = Instant::now();
        let mut b = Budget::new(3);
        let mut lt = LibtorrentBlocker { count: 0, limit: None, banned: false };
        let to = a("1.2.3.4:6881");
        let mut sent = 0;
        for ms in 0..120_000u64 {
            let now = start + Duration::from_millis(ms);
            for p in [Priority::Background, Priority::Foreground] {
                if b.query_verdict(to, p, now) == Verdict::Send {
                    b.spend(to, now);
                    lt.incoming(now);
                    sent += 1;
                }
            }
        }
        assert!(!lt.banned, "libtorrent would ban us");
        assert!(sent as f64 <= 3.0 * (120.0 + BURST_SECONDS) + 1.0, "{sent}");
    }

    #[test]
    fn failures_back_off_doubling_and_an_answer_ends_it() {
        let now = Instant::now();
        let mut b = Budget::new(3);
        let to = a("9.9.9.9:1");
        b.failed(to, now);
        assert_eq!(b.query_verdict(to, Priority::Foreground, now), Verdict::Skip);
        assert_eq!(b.query_verdict(to, Priority::Foreground, now + BACKOFF_BASE), Verdict::Send);
        b.failed(to, now);
        b.failed(to, now);
        assert_eq!(b.backoff_until(to, now), Some(now + 4 * BACKOFF_BASE));
        for _ in 0..20 {
            b.failed(to, now);
        }
        assert_eq!(b.backoff_until(to, now), Some(now + BACKOFF_MAX));
        b.answered(to);
        assert_eq!(b.query_verdict(to, Priority::Foreground, now), Verdict::Send);
    }
}
