//! Connection limits: how many connections of each kind the node holds, in all
//! and per IP; the memory of partially received frames; idle, frame and write
//! deadlines; and what the node does at each limit.
//!
//! A connection is *unclassified* until its first byte, then a *command* or a
//! *peer-wire* connection (DESIGN section 3). At a cap the node sheds its oldest
//! idle connection (unclassified, or a command connection with nothing in flight,
//! buffered or unsent) where one may be shed, and refuses the newcomer otherwise:
//! a refused command connection gets a `TOO_MANY_CONNECTIONS` error frame, anything
//! else is just closed. At the peer-wire caps a newcomer sheds the accepted peer-wire
//! connection that is least useful ([`Node::shed_least_useful`]): one still in its handshake
//! (MSE or BitTorrent) first, else the one that moved no whole block's bytes for longest,
//! once that is over `--peer-shed-grace`. A quarter of `--max-peer-connections` is kept for the
//! node's own dials ([`inbound_peer_cap`]), and a handshake unfinished [`PEER_HANDSHAKE_TIMEOUT`]
//! after the connection began is closed (red-team round 10: 8 addresses x 32 plaintext
//! handshakes and keep-alives held all 256 slots, so the node neither seeded nor downloaded).
//!
//! [`Census`] is the bookkeeping, sans-IO; the `impl Node` below applies it to sockets.

use std::collections::HashMap;
use std::io::{self, Write};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Interest, Token};
use serde_json::{Value, json};

use super::conn::{Conn, Kind};
use super::{FIRST_CONN, Node};
use crate::protocol::{ErrorCode, error_payload};
use crate::torrent::swarm::USEFUL_BYTES;
use crate::{debug, info, warn};

/// How soon `accept` is tried again after it failed (EMFILE and the like): edge-triggered
/// readiness raises no new event for connections already waiting in the backlog.
pub(super) const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// A peer-wire connection whose BitTorrent handshake has not arrived this long after the
/// connection began (its connect, for one we dial; an MSE handshake first included) is closed:
/// libtorrent's `handshake_timeout` (10 s).
pub const PEER_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepted peer-wire connections the node holds at most under `--max-peer-connections`
/// `total`: three quarters of it (at least 1); the rest is kept for the node's own dials, so
/// strangers filling the accepts cannot stop its downloads.
pub fn inbound_peer_cap(total: usize) -> usize {
    (total - total / 4).max(1)
}

/// Outgoing peer-wire connections that the downloads strangers started (`Caller::stranger`)
/// may hold together under `--max-peer-connections` `total`: half the dial reserve (the quarter
/// [`inbound_peer_cap`] leaves), at least 1; 32 of 256 by default. The other half stays for
/// the node's own and keyed callers' downloads (red-team round 12: one stranger's 4 downloads
/// naming 128 peers that handshake and then only keep alive took every dial).
pub fn strangers_dial_cap(total: usize) -> usize {
    ((total - inbound_peer_cap(total)) / 2).max(1)
}

/// What per-IP caps count by: an IPv4 address, or an IPv6 /64 (one host's usual share; a
/// per-address cap would be no cap for IPv6). IPv4-mapped IPv6 counts as its IPv4 address.
pub fn ip_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        },
    }
}

fn slot(kind: Kind) -> usize {
    match kind {
        Kind::Unknown => 0,
        Kind::Command => 1,
        Kind::PeerWire => 2,
    }
}

/// Why connections were shed, refused or closed by a limit, since the node started.
#[derive(Default, Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitStats {
    /// Idle connections closed to make room for a newcomer.
    pub shed_idle: u64,
    /// Accepted peer-wire connections still in an MSE handshake, closed to make room for a
    /// newcomer at the peer-wire caps.
    pub shed_handshakes: u64,
    /// Accepted peer-wire connections past their handshake, closed at the peer-wire caps for a
    /// newcomer: none exchanged a request or a block for over `--peer-shed-grace`.
    pub shed_inactive_peers: u64,
    /// Peer-wire connections closed for a handshake unfinished after
    /// [`PEER_HANDSHAKE_TIMEOUT`].
    pub peer_handshake_timeouts: u64,
    /// Newcomers refused at a cap with nothing idle to shed.
    pub refused: u64,
    pub idle_timeouts: u64,
    pub frame_timeouts: u64,
    pub write_timeouts: u64,
    /// Connections closed because partial frames went over `--frame-memory`.
    pub frame_memory_closes: u64,
    /// `accept` failures (EMFILE and the like).
    pub accept_errors: u64,
}

/// Open connections by kind, in all and per IP (accepted ones only: a peer we dial is not
/// counted against its IP), and the input memory charged to partial frames.
#[derive(Default)]
pub struct Census {
    by_kind: [usize; 3],
    /// Accepted connections by kind (the rest we dialled).
    accepted: [usize; 3],
    per_ip: HashMap<IpAddr, [usize; 3]>,
    /// Sum of every connection's `charged` input bytes.
    pub frame_bytes: usize,
    pub stats: LimitStats,
}

impl Census {
    pub fn total(&self) -> usize {
        self.by_kind.iter().sum()
    }

    pub fn count(&self, kind: Kind) -> usize {
        self.by_kind[slot(kind)]
    }

    /// Accepted connections of `kind`.
    pub fn accepted(&self, kind: Kind) -> usize {
        self.accepted[slot(kind)]
    }

    /// Accepted connections of `kind` from `ip`'s key.
    pub fn per_ip(&self, ip: IpAddr, kind: Kind) -> usize {
        self.per_ip.get(&ip_key(ip)).map_or(0, |c| c[slot(kind)])
    }

    /// A connection opened (`incoming`: accepted, so counted per IP).
    pub fn opened(&mut self, ip: IpAddr, kind: Kind, incoming: bool) {
        self.by_kind[slot(kind)] += 1;
        if incoming {
            self.accepted[slot(kind)] += 1;
            self.per_ip.entry(ip_key(ip)).or_default()[slot(kind)] += 1;
        }
    }

    /// A connection closed, of the kind it had then.
    pub fn closed(&mut self, ip: IpAddr, kind: Kind, incoming: bool) {
        self.by_kind[slot(kind)] -= 1;
        if incoming {
            self.accepted[slot(kind)] -= 1;
            let key = ip_key(ip);
            if let Some(c) = self.per_ip.get_mut(&key) {
                c[slot(kind)] -= 1;
                if c.iter().all(|&n| n == 0) {
                    self.per_ip.remove(&key);
                }
            }
        }
    }

    /// An unclassified connection became `to`.
    pub fn classified(&mut self, ip: IpAddr, to: Kind, incoming: bool) {
        self.closed(ip, Kind::Unknown, incoming);
        self.opened(ip, to, incoming);
    }

    /// Live counts for `STATUS` (`connection_counts`).
    pub fn to_json(&self) -> Value {
        let s = &self.stats;
        json!({
            "unclassified": self.count(Kind::Unknown),
            "command": self.count(Kind::Command),
            "peer_wire": self.count(Kind::PeerWire),
            "peer_wire_accepted": self.accepted(Kind::PeerWire),
            "ips": self.per_ip.len(),
            "frame_memory_used": self.frame_bytes,
            "shed_idle": s.shed_idle,
            "shed_handshakes": s.shed_handshakes,
            "shed_inactive_peers": s.shed_inactive_peers,
            "peer_handshake_timeouts": s.peer_handshake_timeouts,
            "refused": s.refused,
            "idle_timeouts": s.idle_timeouts,
            "frame_timeouts": s.frame_timeouts,
            "write_timeouts": s.write_timeouts,
            "frame_memory_closes": s.frame_memory_closes,
            "accept_errors": s.accept_errors,
        })
    }
}

/// The candidate idle longest, if any: `(token, idle since)` pairs.
fn oldest(candidates: impl Iterator<Item = (Token, Instant)>) -> Option<Token> {
    candidates.min_by_key(|&(_, t)| t).map(|(token, _)| token)
}

/// What the sweep closes a connection for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Deadline {
    /// The cluster-key handshake was not finished within `--auth-timeout`.
    Auth,
    /// An MSE handshake was not finished within `mse::HANDSHAKE_TIMEOUT`.
    Encryption,
    /// A peer-wire connection's BitTorrent handshake did not arrive within
    /// [`PEER_HANDSHAKE_TIMEOUT`] of its start.
    PeerHandshake,
    Frame,
    Write,
    Idle,
}

/// The deadlines the sweep applies.
#[derive(Clone, Copy)]
struct Deadlines {
    auth: Duration,
    mse: Duration,
    frame: Duration,
    write: Duration,
    idle: Option<Duration>,
}

/// Which deadline, if any, a connection has passed at `now` (a paused connection's frame clock
/// stops: [`Conn::note_pause`]).
fn passed(c: &mut Conn, now: Instant, d: Deadlines) -> Option<Deadline> {
    let paused = c.note_pause(now);
    let Deadlines { auth, mse, frame, write, idle } = d;
    if c.auth.expired(now, auth) {
        return Some(Deadline::Auth);
    }
    if c.crypt.expired(now, mse) {
        return Some(Deadline::Encryption);
    }
    // An MSE handshake has its own deadline (`--mse-timeout`, possibly longer); the BitTorrent
    // handshake after it, or a plaintext one, this one.
    if c.kind == Kind::PeerWire
        && !c.handshaken
        && !c.crypt.handshaking()
        && now.saturating_duration_since(c.opened) > PEER_HANDSHAKE_TIMEOUT + mse_after(c, mse)
    {
        return Some(Deadline::PeerHandshake);
    }
    if !paused && c.frame_started.is_some_and(|t| now.saturating_duration_since(t) > frame) {
        return Some(Deadline::Frame);
    }
    if c.pending_output() > 0 && now.duration_since(c.write_progress) > write {
        return Some(Deadline::Write);
    }
    if idle.is_some_and(|d| c.is_idle() && now.duration_since(c.last_activity) > d) {
        return Some(Deadline::Idle);
    }
    None
}

/// Time an encrypted connection may have spent in its MSE handshake before its BitTorrent
/// handshake is due (zero for a plaintext one).
fn mse_after(c: &Conn, mse: Duration) -> Duration {
    if matches!(c.crypt, crate::node::peer_crypto::Crypt::Plain) { Duration::ZERO } else { mse }
}

/// Raises this process's soft limit on open files to its hard limit (at most 2^20), so that
/// the connection caps, not the descriptor limit, decide who is served. Returns the soft and
/// hard limits in force after.
pub fn raise_fd_limit() -> io::Result<(u64, u64)> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes one rlimit into memory we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let want = lim.rlim_max.min(1 << 20);
    if lim.rlim_cur < want {
        let raised = libc::rlimit { rlim_cur: want, rlim_max: lim.rlim_max };
        // SAFETY: setrlimit reads one rlimit from memory we own.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(io::Error::last_os_error());
        }
        lim = raised;
    }
    Ok((lim.rlim_cur, lim.rlim_max))
}

/// Makes glibc serve allocations of 1 MiB and more (large partial frames) from their own
/// mappings, grown with `mremap` and unmapped when freed. By default glibc raises that
/// threshold after the first large free, up to 32 MiB: frames then grow in the heap (a copy
/// and twice the memory while growing) and stay resident after they are freed.
///
/// Setting that threshold also fixes the trim threshold at glibc's 128 KiB, so each free of a
/// step's logits (SmolLM2: 192 KiB, allocated and freed every token) gave the heap's top back to
/// the kernel and the next token faulted its pages in again (~100 us a token on the last hop).
/// Free memory under [`TRIM_THRESHOLD`] at the heap's top is now kept for the next allocation.
pub fn map_large_allocations() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; called once at start-up.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD as i32);
    }
}

/// Free bytes at the top of a heap that glibc keeps rather than returns to the kernel (each
/// allocation below 1 MiB comes from a heap; larger ones are their own mappings).
pub const TRIM_THRESHOLD: usize = 4 << 20;

impl Node {
    /// Accepts every waiting connection. When accepting fails for want of descriptors, the
    /// oldest idle connection is shed and accepting goes on; with none to shed (or on another
    /// error) it is tried again after [`ACCEPT_RETRY`], never in a busy loop.
    pub(super) fn accept(&mut self) {
        self.accept_retry = None;
        self.accept_from(false);
        if self.listener6.is_some() {
            self.accept_from(true);
        }
    }

    /// Accepts on the main listener, or (`second`) on the other family's.
    fn accept_from(&mut self, second: bool) {
        loop {
            let accepted = match (second, &self.listener6) {
                (true, Some(l)) => l.accept(),
                _ => self.listener.accept(),
            };
            match accepted {
                Ok((stream, peer)) => {
                    // Read at once: a newcomer whose first bytes are already here is classified
                    // now, not taken for an idle connection by the next shedding.
                    if let Some(token) = self.admit_connection(stream, peer) {
                        self.on_readable(token);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => continue,
                Err(e) => {
                    self.census.stats.accept_errors += 1;
                    let out_of_fds = matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE));
                    if out_of_fds && self.shed_oldest_idle(|_| true, "descriptors exhausted") {
                        continue;
                    }
                    if !self.accept_stalled {
                        warn!("accept: {e}; retrying every {} ms while it lasts", ACCEPT_RETRY.as_millis());
                        self.accept_stalled = true;
                    }
                    self.accept_retry = Some(Instant::now() + ACCEPT_RETRY);
                    return;
                }
            }
            self.accept_stalled = false;
        }
    }

    /// Takes in one accepted connection, making room under the unclassified and total caps.
    fn admit_connection(&mut self, mut stream: TcpStream, peer: SocketAddr) -> Option<Token> {
        if self.census.count(Kind::Unknown) >= self.config.max_unclassified {
            self.shed_oldest_idle(|c| c.kind == Kind::Unknown, "--max-unclassified");
        }
        if self.census.total() >= self.config.max_connections && !self.shed_oldest_idle(|_| true, "--max-connections") {
            self.census.stats.refused += 1;
            debug!("refusing {peer}: {} connections open, none idle", self.census.total());
            let msg =
                format!("the node holds its --max-connections {}, none idle; try later", self.config.max_connections);
            let payload = error_payload(Value::Null, Value::Null, ErrorCode::TooManyConnections, &msg);
            let mut frame = Vec::with_capacity(payload.len() + 4);
            crate::protocol::frame::encode(&payload, &mut frame);
            let _ = stream.write(&frame); // best effort: a fresh socket takes a small frame
            return None; // dropping the stream closes it
        }
        let _ = stream.set_nodelay(true);
        let slot = self.free.pop().unwrap_or_else(|| {
            self.conns.push(None);
            self.conns.len() - 1
        });
        let token = Token(slot + FIRST_CONN);
        if let Err(e) = self.poll.registry().register(&mut stream, token, Interest::READABLE) {
            warn!("registering {peer}: {e}");
            self.free.push(slot);
            return None;
        }
        let id = self.next_conn_id;
        self.next_conn_id += 1;
        let mut conn = Conn::new(stream, peer, id);
        conn.auth = crate::protocol::auth::NodeAuth::new(self.config.cluster_key.is_some());
        self.conns[slot] = Some(conn);
        self.conn_ids.insert(id, token);
        self.census.opened(peer.ip(), Kind::Unknown, true);
        debug!("conn {id} from {peer}");
        Some(token)
    }

    /// The first byte of an unclassified connection arrived: count it as a command or
    /// peer-wire connection, shedding or refusing under that kind's caps.
    pub(super) fn classify(&mut self, token: Token) {
        let mse = self.config.enable_torrent && self.config.encryption != crate::config::Encryption::Disable;
        let Some(conn) = self.conn(token) else { return };
        let kind = conn.classify(mse);
        if kind == Kind::Unknown {
            return;
        }
        let (ip, incoming, newcomer) = (conn.peer.ip(), !conn.outgoing, conn.id);
        self.census.classified(ip, kind, incoming);
        let c = &self.config;
        let over = match kind {
            Kind::Command => {
                let (per_ip, total) = (c.max_command_connections_per_ip, c.max_command_connections);
                let key = ip_key(ip);
                let same_ip = move |o: &Conn| o.kind == Kind::Command && ip_key(o.peer.ip()) == key;
                if self.census.per_ip(ip, kind) > per_ip
                    && !self.shed_oldest_idle(same_ip, "--max-command-connections-per-ip")
                {
                    Some(format!(
                        "{} command connections from {key} are open (--max-command-connections-per-ip {per_ip}), none idle",
                        per_ip
                    ))
                } else if self.census.count(kind) > total
                    && !self.shed_oldest_idle(|o| o.kind == Kind::Command, "--max-command-connections")
                {
                    Some(format!("{total} command connections are open (--max-command-connections), none idle"))
                } else {
                    None
                }
            }
            _ => {
                let (per_ip, total) = (c.max_peer_connections_per_ip, c.max_peer_connections);
                let inbound = inbound_peer_cap(total);
                let key = ip_key(ip);
                let others = move |o: &Conn| o.id != newcomer && o.kind == Kind::PeerWire;
                if self.census.per_ip(ip, kind) > per_ip
                    && !self.shed_least_useful(
                        move |o| others(o) && ip_key(o.peer.ip()) == key,
                        "--max-peer-connections-per-ip",
                    )
                {
                    Some(format!("--max-peer-connections-per-ip {per_ip}"))
                } else if (self.census.accepted(kind) > inbound || self.census.count(kind) > total)
                    && !self.shed_least_useful(others, "--max-peer-connections")
                {
                    Some(format!("--max-peer-connections {total} ({inbound} accepted at most)"))
                } else {
                    None
                }
            }
        };
        if let Some(why) = over {
            self.census.stats.refused += 1;
            let Some(conn) = self.conn(token) else { return };
            debug!("refusing conn {} from {}: {why}", conn.id, conn.peer);
            conn.discard_input();
            conn.close_after_flush = true;
            if kind == Kind::Command {
                let msg = format!("{why}; try later");
                let payload = error_payload(Value::Null, Value::Null, ErrorCode::TooManyConnections, &msg);
                conn.queue_frame(&payload, Instant::now());
            }
        }
    }

    /// Closes the least useful accepted peer-wire connection `filter` accepts, false if none
    /// may be shed: one still in its handshake (MSE or BitTorrent; the one waiting longest since
    /// its last input) first, else the handshaken one whose last piece's worth of distinct blocks
    /// moved (`swarm::Peer::useful_at`, [`USEFUL_BYTES`], from its handshake on) is oldest, if that is over
    /// `--peer-shed-grace` ago. A peer busy with a download is thus never shed for a newcomer,
    /// and connections that only keep alive make room for one.
    pub(super) fn shed_least_useful(&mut self, filter: impl Fn(&Conn) -> bool, why: &str) -> bool {
        let now = Instant::now();
        let mut handshaking_victim: Option<(Token, Instant)> = None;
        let mut inactive_victim: Option<(Token, Instant)> = None;
        for (slot, c) in self.conns.iter().enumerate() {
            let Some(c) = c.as_ref() else { continue };
            if c.outgoing || !filter(c) {
                continue;
            }
            let token = Token(slot + FIRST_CONN);
            if !c.handshaken {
                if handshaking_victim.is_none_or(|(_, t)| c.last_activity < t) {
                    handshaking_victim = Some((token, c.last_activity));
                }
                continue;
            }
            let useful = c.torrent.and_then(|h| self.swarms.get(&h)?.peers.get(&c.id)).map(|p| p.useful_at);
            let Some(useful) = useful else { continue };
            if now.saturating_duration_since(useful) > self.config.peer_shed_grace
                && inactive_victim.is_none_or(|(_, t)| useful < t)
            {
                inactive_victim = Some((token, useful));
            }
        }
        if let Some((victim, _)) = handshaking_victim {
            self.census.stats.shed_handshakes += 1;
            self.close(victim, &format!("shed (handshake unfinished) to make room: {why}"));
            return true;
        }
        let Some((victim, since)) = inactive_victim else { return false };
        self.census.stats.shed_inactive_peers += 1;
        let secs = now.saturating_duration_since(since).as_secs();
        self.close(
            victim,
            &format!("shed (under {USEFUL_BYTES} bytes of distinct blocks moved in {secs} s) to make room: {why}"),
        );
        true
    }

    /// Closes the connection idle longest among those `filter` accepts; false if none is.
    pub(super) fn shed_oldest_idle(&mut self, filter: impl Fn(&Conn) -> bool, why: &str) -> bool {
        let candidates = self.conns.iter().enumerate().filter_map(|(slot, c)| {
            let c = c.as_ref()?;
            (c.is_idle() && filter(c)).then_some((Token(slot + FIRST_CONN), c.last_activity))
        });
        let Some(victim) = oldest(candidates) else { return false };
        self.census.stats.shed_idle += 1;
        self.close_by_limit(victim, &format!("shed (idle) to make room: {why}"));
        true
    }

    /// Closes a connection for a limit of this node (an idle one shed or timed out): its
    /// sessions stay (see `Inference::closed`), so its client may go on on a new connection.
    fn close_by_limit(&mut self, token: Token, why: &str) {
        if let Some(c) = self.conns.get_mut(token.0 - FIRST_CONN).and_then(Option::as_mut) {
            c.closed_by_limit = true;
        }
        self.close(token, why);
    }

    /// Recounts the input memory `token` holds for a partial frame.
    pub(super) fn charge_input(&mut self, token: Token) {
        let Some(conn) = self.conns.get_mut(token.0 - FIRST_CONN).and_then(Option::as_mut) else { return };
        let held = conn.input_held();
        self.census.frame_bytes = self.census.frame_bytes - conn.charged + held;
        conn.charged = held;
    }

    /// Over `--frame-memory`: recounts exactly (input consumed since the last charge), then
    /// closes the connections holding the largest partial frames until the total fits.
    pub(super) fn enforce_frame_memory(&mut self) {
        let budget = self.config.frame_memory as usize;
        if self.census.frame_bytes <= budget {
            return;
        }
        for slot in 0..self.conns.len() {
            self.charge_input(Token(slot + FIRST_CONN));
        }
        while self.census.frame_bytes > budget {
            let largest = self.conns.iter().enumerate().filter_map(|(slot, c)| {
                let c = c.as_ref()?;
                (c.charged > 0).then_some((Token(slot + FIRST_CONN), c.charged))
            });
            let Some((token, held)) = largest.max_by_key(|&(_, held)| held) else { return };
            self.census.stats.frame_memory_closes += 1;
            let msg = format!(
                "partial frames hold {} bytes, over the node's --frame-memory {budget}; this connection's {held} bytes \
                 are the most; closing",
                self.census.frame_bytes
            );
            self.close_with_error(token, ErrorCode::FrameMemoryExceeded, &msg);
        }
    }

    /// Drops a connection's input and closes it once an error frame (commands only) is
    /// written.
    fn close_with_error(&mut self, token: Token, code: ErrorCode, msg: &str) {
        let Some(conn) = self.conn(token) else { return };
        debug!("conn {} from {}: {msg}", conn.id, conn.peer);
        conn.discard_input();
        if conn.kind != Kind::Command {
            return self.close(token, msg);
        }
        conn.frame_started = None;
        conn.close_after_flush = true;
        let payload = error_payload(Value::Null, Value::Null, code, msg);
        conn.queue_frame(&payload, Instant::now());
        self.charge_input(token);
        self.after_io(token);
    }

    /// Closes connections past a deadline: a frame not whole `--frame-timeout` after its first
    /// byte (told why with `FRAME_TIMEOUT`), output not taken for `--io-timeout`, or idle for
    /// `--idle-timeout`.
    pub(super) fn sweep_deadlines(&mut self) {
        let now = Instant::now();
        let c = &self.config;
        let d = Deadlines {
            auth: c.auth_timeout,
            mse: c.mse_timeout,
            frame: c.frame_timeout,
            write: c.io_timeout,
            idle: c.idle_timeout,
        };
        let due: Vec<(Token, Deadline)> = self
            .conns
            .iter_mut()
            .enumerate()
            .filter_map(|(slot, c)| Some((Token(slot + FIRST_CONN), passed(c.as_mut()?, now, d)?)))
            .collect();
        if due.is_empty() {
            return;
        }
        let (frame, auth) = (d.frame, d.auth);
        let mut counts = [0usize; 3];
        for (token, deadline) in due {
            match deadline {
                Deadline::Auth => {
                    let Some(c) = self.conn(token) else { continue };
                    info!("closing connection from {}: handshake unfinished for over {}s", c.peer, auth.as_secs());
                    c.auth = crate::protocol::auth::NodeAuth::Unauthenticated;
                    let msg = format!(
                        "the cluster-key handshake did not finish within {}s (--auth-timeout); closing",
                        auth.as_secs()
                    );
                    self.close_with_error(token, ErrorCode::AuthTimeout, &msg);
                }
                Deadline::Encryption => {
                    self.mse.timeouts += 1;
                    let secs = d.mse.as_secs();
                    self.close(token, &format!("MSE handshake unfinished after {secs} s (--mse-timeout)"));
                }
                Deadline::PeerHandshake => {
                    self.census.stats.peer_handshake_timeouts += 1;
                    let secs = PEER_HANDSHAKE_TIMEOUT.as_secs();
                    self.close(token, &format!("peer-wire handshake unfinished after {secs} s"));
                }
                Deadline::Frame => {
                    counts[0] += 1;
                    self.census.stats.frame_timeouts += 1;
                    let msg = format!(
                        "a frame not whole {} s after its first byte (--frame-timeout); closing",
                        frame.as_secs()
                    );
                    self.close_with_error(token, ErrorCode::FrameTimeout, &msg);
                }
                Deadline::Write => {
                    counts[1] += 1;
                    self.census.stats.write_timeouts += 1;
                    self.close(token, "not reading its responses (--io-timeout)");
                }
                Deadline::Idle => {
                    counts[2] += 1;
                    self.census.stats.idle_timeouts += 1;
                    self.close_by_limit(token, "idle (--idle-timeout)");
                }
            }
        }
        let [f, w, i] = counts;
        if f + w > 0 {
            info!("closed {f} connections past --frame-timeout, {w} not reading their responses, {i} idle");
        } else {
            debug!("closed {i} idle connections");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_counts_by_64_and_mapped_ipv4_as_ipv4() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(ip_key(a), ip_key(b));
        assert_ne!(ip_key(a), ip_key(c));
        assert_eq!(ip_key("::ffff:10.0.0.1".parse().unwrap()), "10.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(ip_key("127.0.0.2".parse().unwrap()), "127.0.0.2".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn census_counts_kinds_and_ips_and_forgets_empty_ips() {
        let mut c = Census::default();
        let (x, y): (IpAddr, IpAddr) = ("127.0.0.2".parse().unwrap(), "127.0.0.3".parse().unwrap());
        c.opened(x, Kind::Unknown, true);
        c.opened(x, Kind::Unknown, true);
        c.opened(y, Kind::Unknown, true);
        c.opened(y, Kind::PeerWire, false); // dialled: not counted per IP
        c.classified(x, Kind::Command, true);
        assert_eq!((c.total(), c.count(Kind::Unknown), c.count(Kind::Command)), (4, 2, 1));
        assert_eq!((c.per_ip(x, Kind::Command), c.per_ip(x, Kind::Unknown), c.per_ip(y, Kind::PeerWire)), (1, 1, 0));
        assert_eq!((c.accepted(Kind::PeerWire), c.accepted(Kind::Unknown), c.accepted(Kind::Command)), (0, 2, 1));
        c.closed(x, Kind::Command, true);
        c.closed(x, Kind::Unknown, true);
        assert!(!c.per_ip.contains_key(&x), "an IP with nothing open is forgotten");
        c.closed(y, Kind::PeerWire, false);
        c.closed(y, Kind::Unknown, true);
        assert_eq!((c.total(), c.per_ip.len()), (0, 0));
    }

    #[test]
    fn a_quarter_of_the_peer_cap_is_kept_for_dials() {
        assert_eq!((inbound_peer_cap(256), inbound_peer_cap(16), inbound_peer_cap(10)), (192, 12, 8));
        assert_eq!((inbound_peer_cap(1), inbound_peer_cap(3)), (1, 3));
    }

    #[test]
    fn the_oldest_candidate_is_shed() {
        let t = Instant::now();
        let s = Duration::from_secs(1);
        let all = [(Token(5), t + s), (Token(7), t), (Token(9), t + 2 * s)];
        assert_eq!(oldest(all.into_iter()), Some(Token(7)));
        assert_eq!(oldest(std::iter::empty()), None);
    }

    /// A real socket pair: the deadlines a connection passes as its state changes.
    #[test]
    fn deadlines_follow_the_connections_state() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut tx = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (rx, peer) = listener.accept().unwrap();
        rx.set_nonblocking(true).unwrap();
        let mut conn = Conn::new(TcpStream::from_std(rx), peer, 1);
        let d = Deadlines {
            auth: Duration::from_secs(5),
            mse: Duration::from_secs(10),
            frame: Duration::from_secs(10),
            write: Duration::from_secs(20),
            idle: Some(Duration::from_secs(30)),
        };
        let t0 = conn.last_activity;
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert!(conn.is_idle(), "unclassified is idle");
        assert_eq!(passed(&mut conn, at(29), d), None);
        assert_eq!(passed(&mut conn, at(31), d), Some(Deadline::Idle));
        assert_eq!(passed(&mut conn, at(31), Deadlines { idle: None, ..d }), None, "--idle-timeout 0: never");
        // Part of a frame: no longer idle; the frame deadline runs from its first byte.
        tx.write_all(&[0, 0, 0, 9, b'{']).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while conn.read_input(64, t0).map_or(true, |n| n == 0) {
            assert!(Instant::now() < deadline, "no input");
        }
        assert_eq!(conn.classify(false), Kind::Command);
        assert!(!conn.is_idle());
        assert!(conn.input_held() >= 5);
        assert_eq!(passed(&mut conn, at(9), d), None);
        assert_eq!(passed(&mut conn, at(11), d), Some(Deadline::Frame));
        // Consumed: idle again, nothing charged.
        conn.consume_raw(5, at(12));
        assert_eq!((conn.is_idle(), conn.input_held()), (true, 0));
        // A request in flight is never idle.
        conn.in_flight = 1;
        assert_eq!(passed(&mut conn, at(100), d), None);
        // A request buffered while the node does not read (the client's answers not taken): its
        // clock stops for the pause and runs on from where it was after.
        conn.in_flight = super::super::conn::MAX_IN_FLIGHT;
        tx.write_all(&[0, 0, 0, 9, b'{']).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while conn.read_input(64, at(100)).map_or(true, |n| n == 0) {
            assert!(Instant::now() < deadline, "no input");
        }
        assert_eq!(passed(&mut conn, at(105), d), None, "paused at 105");
        assert_eq!(passed(&mut conn, at(200), d), None, "a paused connection's frame clock stopped");
        conn.in_flight = 0;
        assert_eq!(passed(&mut conn, at(201), d), None, "resumed at 201: 5 s counted");
        assert_eq!(passed(&mut conn, at(205), d), None, "9 s counted");
        assert_eq!(passed(&mut conn, at(207), d), Some(Deadline::Frame), "11 s counted");
    }
}
