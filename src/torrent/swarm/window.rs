//! How many blocks to keep asked of one peer, sans-IO: the request window.
//!
//! A peer's rate is bounded by what we keep asked of it divided by the time a
//! request takes to come back. Two kinds of peer make that time long: a
//! distant one (the round trip) and a bursty one (Transmission answers every
//! 500 ms). The window therefore starts small and doubles each time the peer
//! answers all of it in one burst, quicker than half a round trip (it was
//! waiting on us, not on its link: TCP's slow start; a peer whose link is full
//! sends a steady stream, which does not grow it), and never drops under what
//! the measured rate needs: a burst period at the best rate seen, and twice
//! the bandwidth-delay product (rate x least round trip). It stays within
//! `PIPELINE` and under the peer's `reqq`.

use std::time::{Duration, Instant};

use crate::torrent::wire::BLOCK_SIZE;

/// Most blocks asked of one peer at once: 2048 x 16 KiB = 32 MiB in flight,
/// the bandwidth-delay product of 400 MB/s at 80 ms (or 64 MB/s from a peer
/// that sends every 500 ms). The pieces being gathered (`MAX_BUFFERED`, 32
/// MiB a download) bound it too.
pub const PIPELINE: usize = 2048;
/// Blocks first asked of a peer.
pub const START_WINDOW: usize = 16;
/// Fewest blocks asked of one peer at once.
pub const MIN_PIPELINE: usize = 4;
/// Requests a peer queues when its extension handshake does not say (`reqq`;
/// libtorrent's default).
pub const DEFAULT_REQQ: usize = 250;
/// Blocks arriving closer together than this belong to one burst.
const BURST_GAP: Duration = Duration::from_millis(10);
/// A peer that sends in bursts (Transmission: every 500 ms) is asked for a
/// whole burst period at the best rate it has shown.
const BURST_PERIOD: f64 = 0.5;
/// Blocks kept in flight per round trip at the measured rate: twice the
/// bandwidth-delay product, so that a faster link can show itself (the
/// window grows with the rate it measures).
const BDP_HEADROOM: f64 = 2.0;
/// How often the download rate is re-estimated.
const RATE_WINDOW: Duration = Duration::from_millis(100);

/// One peer's request window and the measurements that size it.
pub struct RequestWindow {
    /// Requests the peer queues at most (its `reqq`, BEP 10).
    pub reqq: usize,
    /// Download rate (bytes/s, smoothed), the sample being gathered, and the
    /// best sample seen.
    rate: f64,
    sample_start: Instant,
    sample_bytes: u64,
    best_rate: f64,
    /// Blocks to keep asked, grown while the peer answers all of it at once.
    window: usize,
    /// Blocks of the current burst, when it began and when its last one came.
    burst_blocks: usize,
    burst_start: Instant,
    burst_last: Instant,
    /// The least request-to-block time of the connection: the round trip
    /// with the least queueing at the peer. (Never measured afresh: with our
    /// own requests queued there, a fresh measure would include the queue, and
    /// a window sized from it would grow the queue, and so on.)
    min_rtt: Option<Duration>,
}

impl RequestWindow {
    pub fn new(now: Instant) -> RequestWindow {
        RequestWindow {
            reqq: DEFAULT_REQQ,
            rate: 0.0,
            sample_start: now,
            sample_bytes: 0,
            best_rate: 0.0,
            window: START_WINDOW,
            burst_blocks: 0,
            burst_start: now,
            burst_last: now,
            min_rtt: None,
        }
    }

    /// Blocks to keep asked of this peer: the window; at least a burst period
    /// at the best rate seen and twice the bandwidth-delay product; at most
    /// [`Self::cap`].
    pub fn pipeline(&self) -> usize {
        let cap = self.cap();
        let blocks = |bytes: f64| (bytes / BLOCK_SIZE as f64) as usize;
        let burst = blocks(self.best_rate * BURST_PERIOD);
        let bdp = blocks(self.rate * self.min_rtt.map_or(0.0, |r| r.as_secs_f64()) * BDP_HEADROOM);
        self.window.max(burst).max(bdp).clamp(MIN_PIPELINE.min(cap), cap)
    }

    /// Most blocks this peer may be asked for at once: `PIPELINE`, and one
    /// under its `reqq` (Transmission drops, unanswered, the request that
    /// would fill its queue).
    pub fn cap(&self) -> usize {
        PIPELINE.min(self.reqq.saturating_sub(1)).max(1)
    }

    /// A block asked at `asked` arrived at `now` with `bytes` of data.
    pub fn on_block(&mut self, bytes: u64, asked: Instant, now: Instant) {
        self.count_rtt(asked, now);
        self.count_burst(now);
        self.count_rate(bytes, now);
    }

    fn count_rtt(&mut self, asked: Instant, now: Instant) {
        let sample = now.saturating_duration_since(asked);
        self.min_rtt = Some(self.min_rtt.map_or(sample, |m| m.min(sample)));
    }

    /// A whole window in one burst, quicker than half a round trip (or
    /// `BURST_GAP`), doubles the window: the peer answered everything asked at
    /// once, and more would have come too. A steady stream as fast as the link
    /// goes (blocks close together, but a window taking longer) does not.
    fn count_burst(&mut self, now: Instant) {
        if now.saturating_duration_since(self.burst_last) > BURST_GAP {
            self.burst_blocks = 0;
            self.burst_start = now;
        }
        self.burst_last = now;
        self.burst_blocks += 1;
        if self.burst_blocks >= self.window.min(self.cap()) {
            let quick = self.min_rtt.map_or(BURST_GAP, |r| (r / 2).max(BURST_GAP));
            if now.saturating_duration_since(self.burst_start) <= quick {
                self.window = (self.window * 2).min(PIPELINE);
            }
            self.burst_blocks = 0;
            self.burst_start = now;
        }
    }

    fn count_rate(&mut self, bytes: u64, now: Instant) {
        self.sample_bytes += bytes;
        let dt = now.saturating_duration_since(self.sample_start);
        if dt >= RATE_WINDOW {
            let sample = self.sample_bytes as f64 / dt.as_secs_f64();
            self.best_rate = self.best_rate.max(sample);
            self.rate = if self.rate == 0.0 { sample } else { 0.5 * self.rate + 0.5 * sample };
            self.sample_start = now;
            self.sample_bytes = 0;
        }
    }

    /// The window grown so far (blocks), before the floors and the cap.
    #[cfg(test)]
    pub fn window(&self) -> usize {
        self.window
    }

    /// The round-trip estimate, once a block has come back.
    pub fn min_rtt(&self) -> Option<Duration> {
        self.min_rtt
    }

    /// The smoothed download rate, bytes/s.
    pub fn rate(&self) -> f64 {
        self.rate
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BLOCK: u64 = BLOCK_SIZE as u64;

    /// Feeds `blocks` blocks spread evenly over `span`, each asked `rtt` before it arrives.
    fn flow(w: &mut RequestWindow, start: Instant, blocks: u32, span: Duration, rtt: Duration) {
        for i in 0..blocks {
            let now = start + span * i / blocks;
            w.on_block(BLOCK, now - rtt, now);
        }
    }

    /// A peer 600 ms away (beyond a burst period) sending a steady 0.8 MB/s (a block every
    /// 20 ms, so never a burst): the window covers twice its bandwidth-delay product, more
    /// than the start window or the burst floor would give.
    #[test]
    fn a_distant_steady_peer_gets_twice_its_bandwidth_delay_product() {
        let t0 = Instant::now() + Duration::from_secs(1);
        let mut w = RequestWindow::new(t0);
        w.reqq = 4000;
        flow(&mut w, t0, 100, Duration::from_secs(2), Duration::from_millis(600));
        assert_eq!(w.window(), START_WINDOW, "no burst: the window itself did not grow");
        let rate = w.rate();
        assert!((0.6e6..1.1e6).contains(&rate), "rate {rate}");
        assert_eq!(w.min_rtt(), Some(Duration::from_millis(600)));
        let bdp = (rate * 0.6 * 2.0 / BLOCK as f64) as usize;
        let burst_floor = (w.best_rate * BURST_PERIOD / BLOCK as f64) as usize;
        assert_eq!(w.pipeline(), bdp);
        assert!(bdp > burst_floor && bdp > START_WINDOW, "{bdp} over {burst_floor} and {START_WINDOW}");
    }

    /// A peer whose rate fell (Transmission between bursts, a link shared for a while) is still
    /// asked for a burst period at the best rate it showed, not sized down to its recent rate.
    #[test]
    fn the_best_rate_seen_keeps_a_burst_period_asked() {
        let t0 = Instant::now() + Duration::from_secs(1);
        let mut w = RequestWindow::new(t0);
        w.reqq = 4000;
        let near = Duration::from_millis(1);
        // 1 s of a block every 12 ms (1.37 MB/s, no burst), then 2 s of one every 50 ms.
        flow(&mut w, t0, 83, Duration::from_secs(1), near);
        let best = w.pipeline();
        flow(&mut w, t0 + Duration::from_secs(1), 40, Duration::from_secs(2), near);
        assert!(w.rate() < 0.5e6, "the rate fell: {}", w.rate());
        assert_eq!(w.window(), START_WINDOW);
        // Half a second at 1.37 MB/s is 42 blocks; a 100 ms sample holds 9 or 10 blocks.
        assert!((38..=52).contains(&best), "half a second at the best sample: {best}");
        assert_eq!(w.pipeline(), best, "kept after the rate fell");
    }

    /// A peer whose link is full sends a steady stream, blocks close together (2 ms apart: 8 MB/s)
    /// but a whole window taking longer than half the round trip: the window does not grow, so
    /// its queue at the peer stays a burst period at the rate it showed, not the cap.
    #[test]
    fn a_steady_stream_at_the_link_rate_does_not_grow_the_window() {
        let t0 = Instant::now() + Duration::from_secs(1);
        let mut w = RequestWindow::new(t0);
        w.reqq = 100_000;
        flow(&mut w, t0, 2000, Duration::from_secs(4), Duration::from_millis(20));
        assert_eq!(w.window(), START_WINDOW);
        let floor = (w.best_rate * BURST_PERIOD / BLOCK as f64) as usize;
        assert_eq!(w.pipeline(), floor);
        assert!((200..=300).contains(&floor), "half a second at 8 MB/s is 244 blocks: {floor}");
    }

    /// The round trip is the least time seen on the connection: later, longer times (our own
    /// requests queued at the peer) never raise it, so the window never feeds its own queue.
    #[test]
    fn queueing_at_the_peer_does_not_raise_the_round_trip() {
        let t0 = Instant::now() + Duration::from_secs(1);
        let mut w = RequestWindow::new(t0);
        flow(&mut w, t0, 50, Duration::from_secs(1), Duration::from_millis(80));
        flow(&mut w, t0 + Duration::from_secs(20), 50, Duration::from_secs(1), Duration::from_millis(400));
        assert_eq!(w.min_rtt(), Some(Duration::from_millis(80)));
    }

    /// The window doubles per whole-window burst and stops one under the peer's `reqq`.
    #[test]
    fn the_window_doubles_per_burst_and_stays_under_reqq() {
        let t0 = Instant::now() + Duration::from_secs(1);
        let mut w = RequestWindow::new(t0);
        w.reqq = 512; // Transmission's
        let mut seen = Vec::new();
        let mut start = t0;
        for _ in 0..8 {
            let n = w.pipeline();
            seen.push(n);
            // The whole window at once, 1 us apart, asked 1 ms before; the next burst 1 s later
            // keeps the rate samples small (so the floors stay out of the way).
            for i in 0..n as u32 {
                let now = start + Duration::from_micros(1) * i;
                w.on_block(1, now - Duration::from_millis(1), now);
            }
            start += Duration::from_secs(1);
        }
        assert_eq!(seen, vec![16, 32, 64, 128, 256, 511, 511, 511]);
        w.reqq = 3;
        assert_eq!(w.pipeline(), 2, "one under a tiny reqq");
        w.reqq = 0;
        assert_eq!(w.pipeline(), 1);
    }
}
