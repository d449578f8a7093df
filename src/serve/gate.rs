//! How many requests are prepared at once (`--max-renders`): the request's JSON parsed, its chat
//! rendered with the model's template (up to `chat::RENDER_FUEL_BASE` + 4 per byte of fuel: up
//! to ~280 MB and seconds of CPU for a hostile template and a 1 MiB body) and its prompt
//! tokenized. Each connection thread does that for its own request; without a bound, 256
//! connections (`--max-connections`) prepared at once, and `/health`, `/metrics` and every
//! other connection shared the CPU with all of them. A connection thread past the bound waits
//! (asleep, its client watched) for a place, at most [`RENDER_WAIT`], then answers 503.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The longest a request waits for a place before it is answered 503 with `Retry-After`.
pub const RENDER_WAIT: Duration = Duration::from_secs(30);

/// `--max-renders`' default: the machine's cores, at most 4.
pub fn default_max() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get()).min(4)
}

/// A counting semaphore with counts for `/metrics`.
pub struct Gate {
    max: usize,
    state: Mutex<State>,
    freed: Condvar,
}

#[derive(Default)]
struct State {
    running: usize,
    waiting: usize,
    /// The most ever running at once.
    peak: usize,
    /// Requests that waited [`RENDER_WAIT`] in vain.
    refused: u64,
}

/// A place held: given back when dropped.
pub struct Pass<'a>(&'a Gate);

/// Why no place was given.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// The client went away while waiting.
    Gone,
    /// No place came free within the limit.
    Timeout,
}

impl Gate {
    /// At most `max` (at least 1) at once.
    pub fn new(max: usize) -> Gate {
        Gate { max: max.max(1), state: Mutex::new(State::default()), freed: Condvar::new() }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A place, waiting for one up to `limit`; every `every` meanwhile `gone` is asked whether
    /// the client has left (then [`Refused::Gone`]).
    pub fn enter(&self, limit: Duration, every: Duration, gone: impl Fn() -> bool) -> Result<Pass<'_>, Refused> {
        let deadline = Instant::now() + limit;
        let mut state = self.lock();
        state.waiting += 1;
        let outcome = loop {
            if state.running < self.max {
                break Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                state.refused += 1;
                break Err(Refused::Timeout);
            }
            let wait = every.min(deadline - now);
            state = self.freed.wait_timeout(state, wait).unwrap_or_else(|e| e.into_inner()).0;
            if state.running >= self.max && gone() {
                break Err(Refused::Gone);
            }
        };
        state.waiting -= 1;
        outcome?;
        state.running += 1;
        state.peak = state.peak.max(state.running);
        Ok(Pass(self))
    }

    /// `/metrics` lines: running, waiting, the most ever running at once, requests refused.
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write;
        let s = self.lock();
        let _ = write!(
            out,
            "# HELP shardnet_serve_renders_running Requests being prepared (parsed, rendered, tokenized) now.\n\
             # TYPE shardnet_serve_renders_running gauge\nshardnet_serve_renders_running {}\n\
             # HELP shardnet_serve_renders_waiting Requests waiting for a place to be prepared (--max-renders).\n\
             # TYPE shardnet_serve_renders_waiting gauge\nshardnet_serve_renders_waiting {}\n\
             # HELP shardnet_serve_renders_peak The most requests ever prepared at once.\n\
             # TYPE shardnet_serve_renders_peak gauge\nshardnet_serve_renders_peak {}\n\
             # HELP shardnet_serve_renders_refused_total Requests answered 503 after waiting for a place.\n\
             # TYPE shardnet_serve_renders_refused_total counter\nshardnet_serve_renders_refused_total {}\n",
            s.running, s.waiting, s.peak, s.refused
        );
    }
}

impl Drop for Pass<'_> {
    fn drop(&mut self) {
        self.0.lock().running -= 1;
        self.0.freed.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Eight threads through a gate of two: never more than two inside, every one gets in.
    #[test]
    fn at_most_max_are_inside_and_all_get_in() {
        let gate = Arc::new(Gate::new(2));
        let inside = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (gate, inside, most) = (gate.clone(), inside.clone(), most.clone());
                std::thread::spawn(move || {
                    let _pass = gate.enter(Duration::from_secs(20), Duration::from_millis(10), || false).unwrap();
                    let n = inside.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(n, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(20));
                    inside.fetch_sub(1, Ordering::SeqCst);
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(most.load(Ordering::SeqCst), 2);
        let mut text = String::new();
        gate.render(&mut text);
        assert!(text.contains("shardnet_serve_renders_peak 2\n"), "{text}");
        assert!(text.contains("shardnet_serve_renders_running 0\n"), "{text}");
    }

    /// A full gate refuses after the limit, or at once when the client has gone; a place
    /// given back lets the next in.
    #[test]
    fn a_full_gate_times_out_or_notices_the_client_gone() {
        let gate = Gate::new(1);
        let held = gate.enter(Duration::ZERO, Duration::from_millis(5), || false).unwrap();
        let t = Instant::now();
        let r = gate.enter(Duration::from_millis(50), Duration::from_millis(5), || false);
        assert_eq!(r.err(), Some(Refused::Timeout));
        assert!(t.elapsed() >= Duration::from_millis(50));
        let r = gate.enter(Duration::from_secs(20), Duration::from_millis(5), || true);
        assert_eq!(r.err(), Some(Refused::Gone));
        drop(held);
        assert!(gate.enter(Duration::ZERO, Duration::from_millis(5), || false).is_ok());
        let mut text = String::new();
        gate.render(&mut text);
        assert!(text.contains("shardnet_serve_renders_refused_total 1\n"), "{text}");
    }
}
