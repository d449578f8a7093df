//! How many requests are prepared at once (`--max-renders`): the request's JSON parsed, its chat
//! rendered with the model's template (up to `chat::RENDER_FUEL_BASE` + 4 per byte of fuel: up
//! to ~280 MB and seconds of CPU for a hostile template and a 1 MiB body) and its prompt
//! tokenized. Each connection thread does that for its own request; without a bound, 256
//! connections (`--max-connections`) prepared at once, and `/health`, `/metrics` and every
//! other connection shared the CPU with all of them. A connection thread past the bound waits
//! (asleep, its client watched) for a place, at most [`RENDER_WAIT`], then answers 503.
//!
//! Places are given fairly across clients ([`crate::node::limits::ip_key`] of the address) and
//! in arrival order within one: each waiter takes a ticket in its client's queue, and a freed
//! place goes to the oldest ticket of the waiting client that holds the fewest places; among
//! equals, the one given a place longest ago (never: first); among those, the one waiting
//! longest. So one client's waiters never sit ahead of another's: a client arriving behind any
//! number of another's gets the next free place (before, the condition variable woke an
//! arbitrary waiter, and a victim behind 38 of one address's 1 MB chats waited 16 s, then 30 s
//! and 503). How many one client may have waiting is bounded before the gate, by
//! `--max-requests-per-client`.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The longest a request waits for a place before it is answered 503 with `Retry-After`.
pub const RENDER_WAIT: Duration = Duration::from_secs(30);

/// `--max-renders`' default: the machine's cores, at most 4.
pub fn default_max() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get()).min(4)
}

/// A counting semaphore served fairly across clients, with counts for `/metrics`.
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
    /// The next ticket handed out.
    next_ticket: u64,
    /// Places given so far: a client's `served` stamp.
    given: u64,
    /// Clients holding or waiting for a place (none without either).
    clients: HashMap<IpAddr, Client>,
}

#[derive(Default)]
struct Client {
    /// Tickets waiting, oldest first.
    queue: VecDeque<u64>,
    /// Places held.
    inside: usize,
    /// When it was last given a place ([`State::given`]; 0: not while it has been here).
    served: u64,
}

impl State {
    /// Whether `ticket` of `client` is the one the next free place goes to: the oldest ticket of
    /// the waiting client holding the fewest places, among equals the one given a place longest
    /// ago, among those the one waiting longest.
    fn is_next(&self, client: IpAddr, ticket: u64) -> bool {
        let next = self
            .clients
            .iter()
            .filter_map(|(ip, c)| c.queue.front().map(|&first| ((c.inside, c.served, first), *ip)))
            .min();
        next.is_some_and(|((_, _, first), ip)| ip == client && first == ticket)
    }

    /// Takes `ticket` out of `client`'s queue, into a place when `served`.
    fn leave(&mut self, client: IpAddr, ticket: u64, served: bool) {
        self.waiting -= 1;
        if served {
            self.running += 1;
            self.peak = self.peak.max(self.running);
            self.given += 1;
        }
        let given = self.given;
        let Some(c) = self.clients.get_mut(&client) else { return };
        c.queue.retain(|&t| t != ticket);
        if served {
            c.inside += 1;
            c.served = given;
        }
        if c.queue.is_empty() && c.inside == 0 {
            self.clients.remove(&client);
        }
    }

    /// Whether some waiter could take a place now.
    fn may_go(&self, max: usize) -> bool {
        self.waiting > 0 && self.running < max
    }
}

/// A place held by a client: given back when dropped.
pub struct Pass<'a> {
    gate: &'a Gate,
    client: IpAddr,
}

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

    /// A place for a request of `client` (an address as [`crate::node::limits::ip_key`] makes
    /// it), waiting for one up to `limit`, served fairly across clients (see the module) and in
    /// arrival order within one; every `every` meanwhile `gone` is asked whether the client has left
    /// (then [`Refused::Gone`]).
    pub fn enter(
        &self,
        client: IpAddr,
        limit: Duration,
        every: Duration,
        gone: impl Fn() -> bool,
    ) -> Result<Pass<'_>, Refused> {
        let deadline = Instant::now() + limit;
        let mut state = self.lock();
        let ticket = state.next_ticket;
        state.next_ticket += 1;
        state.waiting += 1;
        state.clients.entry(client).or_default().queue.push_back(ticket);
        let outcome = loop {
            if state.running < self.max && state.is_next(client, ticket) {
                break Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                state.refused += 1;
                break Err(Refused::Timeout);
            }
            let wait = every.min(deadline - now);
            state = self.freed.wait_timeout(state, wait).unwrap_or_else(|e| e.into_inner()).0;
            if !(state.running < self.max && state.is_next(client, ticket)) && gone() {
                break Err(Refused::Gone);
            }
        };
        state.leave(client, ticket, outcome.is_ok());
        // The next in turn may be able to go now (a place still free, or this waiter was first).
        if state.may_go(self.max) {
            self.freed.notify_all();
        }
        outcome.map(|()| Pass { gate: self, client })
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
        let mut state = self.gate.lock();
        state.running -= 1;
        if let Some(c) = state.clients.get_mut(&self.client) {
            c.inside -= 1;
            if c.inside == 0 && c.queue.is_empty() {
                state.clients.remove(&self.client);
            }
        }
        // Every waiter wakes and the one whose turn it is goes (one condition variable for all:
        // waiters are at most `--max-connections`, and a place is held for a whole preparation).
        if state.may_go(self.gate.max) {
            self.gate.freed.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const ME: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    /// The names waiters record once in, in the order they got in.
    type Order = Arc<Mutex<Vec<&'static str>>>;

    /// Polls `done` every millisecond; fails with `what` after 20 s.
    fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
        let t = Instant::now();
        while !done() {
            assert!(t.elapsed() < Duration::from_secs(20), "{what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Queues `waiters` (client, name) on `gate`, each waiting before the next arrives. Each
    /// records its name in `order` once in, then keeps its place until `hold` yields (a message
    /// or the sender dropped), or gives it back at once without `hold`.
    fn queue(
        gate: &Arc<Gate>,
        waiters: &[(IpAddr, &'static str)],
        order: &Order,
        hold: Option<Arc<Mutex<std::sync::mpsc::Receiver<()>>>>,
    ) -> Vec<std::thread::JoinHandle<()>> {
        let mut threads = Vec::new();
        for (n, &(client, name)) in waiters.iter().enumerate() {
            let (gate2, order, hold) = (gate.clone(), order.clone(), hold.clone());
            threads.push(std::thread::spawn(move || {
                let _pass = gate2.enter(client, Duration::from_secs(20), Duration::from_millis(5), || false).unwrap();
                order.lock().unwrap().push(name);
                if let Some(hold) = hold {
                    let _ = hold.lock().unwrap().recv_timeout(Duration::from_secs(20));
                }
            }));
            wait_until(&format!("waiter {name} never queued"), || gate.lock().waiting > n);
        }
        threads
    }

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
                    let _pass = gate.enter(ME, Duration::from_secs(20), Duration::from_millis(10), || false).unwrap();
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
        let held = gate.enter(ME, Duration::ZERO, Duration::from_millis(5), || false).unwrap();
        let t = Instant::now();
        let r = gate.enter(ME, Duration::from_millis(50), Duration::from_millis(5), || false);
        assert_eq!(r.err(), Some(Refused::Timeout));
        assert!(t.elapsed() >= Duration::from_millis(50));
        let r = gate.enter(ME, Duration::from_secs(20), Duration::from_millis(5), || true);
        assert_eq!(r.err(), Some(Refused::Gone));
        drop(held);
        assert!(gate.enter(ME, Duration::ZERO, Duration::from_millis(5), || false).is_ok());
        let mut text = String::new();
        gate.render(&mut text);
        assert!(text.contains("shardnet_serve_renders_refused_total 1\n"), "{text}");
    }

    /// One place held by a third client; client A queues three waiters, then client B one. Places
    /// alternate across clients and keep arrival order within one: A's first, B's, then A's
    /// second and third (before: whichever waiter the condition variable woke, B usually last).
    #[test]
    fn places_go_round_robin_across_clients_and_in_order_within_one() {
        let gate = Arc::new(Gate::new(1));
        let order = Order::default();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let held = gate.enter(ME, Duration::ZERO, Duration::from_millis(5), || false).unwrap();
        let threads = queue(&gate, &[(a, "a1"), (a, "a2"), (a, "a3"), (b, "b1")], &order, None);
        drop(held);
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(*order.lock().unwrap(), ["a1", "b1", "a2", "a3"]);
        let s = gate.lock();
        assert!(s.clients.is_empty() && s.waiting == 0 && s.running == 0);
    }

    /// Two places, one held by client A and one by another; A queues a waiter, then B one. The
    /// place given back goes to B, who holds none, before A, who holds one already (plain
    /// arrival order or round-robin would give it to A).
    #[test]
    fn a_client_holding_fewer_places_goes_first() {
        let gate = Arc::new(Gate::new(2));
        let order = Order::default();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let a_inside = gate.enter(a, Duration::ZERO, Duration::from_millis(5), || false).unwrap();
        let held = gate.enter(ME, Duration::ZERO, Duration::from_millis(5), || false).unwrap();
        // Places kept until the test has seen both in.
        let (release, released) = std::sync::mpsc::channel::<()>();
        let threads = queue(&gate, &[(a, "a"), (b, "b")], &order, Some(Arc::new(Mutex::new(released))));
        drop(held);
        wait_until("nobody got the free place", || !order.lock().unwrap().is_empty());
        assert_eq!(*order.lock().unwrap(), ["b"]);
        drop(a_inside);
        wait_until("A's waiter never got in", || order.lock().unwrap().len() >= 2);
        assert_eq!(*order.lock().unwrap(), ["b", "a"]);
        drop(release);
        for t in threads {
            t.join().unwrap();
        }
        let s = gate.lock();
        assert!(s.clients.is_empty() && s.running == 0 && s.waiting == 0);
    }

    /// One place, held by client A, which queues two more; then client B queues one. The place A
    /// gives back goes to B, given none yet, before A's older waiters (the s12 red team's case:
    /// a victim behind one address's many huge chats).
    #[test]
    fn a_client_given_a_place_longest_ago_goes_before_older_waiters_of_another() {
        let gate = Arc::new(Gate::new(1));
        let order = Order::default();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let a_inside = gate.enter(a, Duration::ZERO, Duration::from_millis(5), || false).unwrap();
        let threads = queue(&gate, &[(a, "a2"), (a, "a3"), (b, "b1")], &order, None);
        drop(a_inside);
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(*order.lock().unwrap(), ["b1", "a2", "a3"]);
        let s = gate.lock();
        assert!(s.clients.is_empty() && s.running == 0 && s.waiting == 0);
    }

    /// A waiter that leaves (here its time is up) while first in turn passes the turn on: the
    /// next client's waiter gets the place once it is free, and the queues are left empty.
    #[test]
    fn a_waiter_leaving_passes_the_turn_on() {
        let gate = Arc::new(Gate::new(1));
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let held = gate.enter(ME, Duration::ZERO, Duration::from_millis(5), || false).unwrap();
        let g = gate.clone();
        let first = std::thread::spawn(move || {
            g.enter(a, Duration::from_millis(300), Duration::from_millis(5), || false).err()
        });
        wait_until("A's waiter never queued", || gate.lock().waiting >= 1);
        let g = gate.clone();
        let second =
            std::thread::spawn(move || g.enter(b, Duration::from_secs(20), Duration::from_millis(5), || false).is_ok());
        while gate.lock().waiting < 2 && !first.is_finished() {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(first.join().unwrap(), Some(Refused::Timeout));
        drop(held);
        assert!(second.join().unwrap(), "the second client never got its turn");
        let s = gate.lock();
        assert!(s.clients.is_empty() && s.waiting == 0);
    }
}
