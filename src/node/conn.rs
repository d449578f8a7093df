//! One TCP connection's buffers and state. The event loop does the I/O; this
//! type decides how much may be read, what is a frame, and when to close.
//!
//! Memory per connection is bounded: input holds at most one partial frame
//! (at most `--max-frame` + 4 bytes) plus one read; output stops growing from
//! new requests once it passes [`OUT_HIGH_WATER`] (the connection is not read
//! until it drains below [`OUT_LOW_WATER`]), and at most [`MAX_IN_FLIGHT`]
//! deferred answers can be added on top. Answers still being computed count too:
//! each deferred `EXECUTE_TASK` holds an estimate of its answer
//! ([`answer_estimate`]) against [`ANSWER_BUDGET`] until it is queued, so a
//! client that sends many large requests and reads nothing gets one (or a few)
//! computed, not 64 (before, requests were admitted on the bytes already queued
//! alone: 64 answers of `all_logits` were built and queued at once). The input buffer grows with the bytes
//! that arrive, never from a declared length, and all connections' partial
//! frames together are bounded by the node's `--frame-memory` (`limits.rs`).

use std::io::{self, Read};
use std::net::SocketAddr;
use std::time::Instant;

use mio::net::TcpStream;

use super::outq::OutQueue;
use super::peer_crypto::{self, Crypt, First};
use crate::protocol::auth::{AuthError, NodeAuth};
use crate::protocol::frame::{self, Decoded};
use crate::torrent::InfoHash;
use crate::torrent::mse::MseError;
use crate::torrent::storage::View;
use crate::torrent::wire::PieceHeader;

/// Stop reading requests while this much output is unsent.
pub const OUT_HIGH_WATER: usize = 1024 * 1024;
/// Resume reading once output drains below this.
pub const OUT_LOW_WATER: usize = 256 * 1024;
/// Deferred requests (answered by a worker) per connection at most.
pub const MAX_IN_FLIGHT: usize = 64;
/// A peer-wire connection is not read while this many bytes of output wait for the peer to
/// take them; reading resumes once it took enough (red-team round 8: ut_metadata requests from
/// a peer that never reads grew its output by ~350 MB). Above the serving high water
/// (`peer_wire::PEER_OUT_HIGH`, 4 MiB of blocks) by 2 MiB of control messages, so two nodes
/// serving each other never both stop reading. A connection's output stays under this plus
/// one read turn (`READ_BUDGET`, 1 MiB: rejects and control answers are no larger than the
/// requests read) plus `MAX_METADATA_OUT` (64 KiB) of metadata pieces: about 7.1 MiB.
pub const PEER_OUT_MAX: usize = 6 * 1024 * 1024;
/// Bytes of answers queued and estimated in flight past which a connection takes no new request.
pub const ANSWER_BUDGET: usize = 16 * 1024 * 1024;
/// Estimated answer bytes per row: a row of hidden state (n_embd floats, base64), a row of
/// logits (n_vocab floats: 49152 for SmolLM2, up to 256k), and a last-token answer.
const HIDDEN_ROW_ESTIMATE: usize = 4 * 1024;
const LOGITS_ROW_ESTIMATE: usize = 256 * 1024;
const SMALL_ANSWER_ESTIMATE: usize = 4 * 1024;

/// What an `EXECUTE_TASK`'s answer is estimated to take, from its rows and output (the real
/// width depends on the last shard's model, not known here): `all_logits` for 64 rows holds the
/// whole [`ANSWER_BUDGET`], a decode step 4 KiB.
pub fn answer_estimate(task: &crate::protocol::ExecuteTask) -> usize {
    use crate::protocol::{TaskInput, TaskOutput};
    let rows = match &task.input {
        TaskInput::Tokens(t) => t.len(),
        TaskInput::Hidden { rows, .. } => *rows,
    };
    match task.output {
        TaskOutput::Hidden => rows * HIDDEN_ROW_ESTIMATE,
        TaskOutput::Logits { all: true } => rows * LOGITS_ROW_ESTIMATE,
        TaskOutput::Logits { all: false } => LOGITS_ROW_ESTIMATE,
        TaskOutput::TopK(_) => SMALL_ANSWER_ESTIMATE,
    }
}
/// Input buffer kept across reads; a larger one (a big frame) is freed when empty.
const INPUT_KEEP: usize = 1024 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// No byte received yet.
    Unknown,
    /// Length-prefixed JSON commands.
    Command,
    /// A BitTorrent handshake (first byte 19).
    PeerWire,
}

pub struct Conn {
    pub stream: TcpStream,
    pub peer: SocketAddr,
    /// Unique over the node's life: tells a reused slot from the connection
    /// a worker's answer was meant for.
    pub id: u64,
    pub kind: Kind,
    /// Received bytes: `input[start..end]` are not yet consumed; the rest is
    /// room that reads fill in place (initialised once, reused).
    input: Vec<u8>,
    start: usize,
    end: usize,
    output: OutQueue,
    pub in_flight: usize,
    /// Estimated bytes of the answers in flight ([`answer_estimate`]), released as each is queued.
    pub reserved: usize,
    /// When the partial frame now buffered began arriving (moved later by the time the node
    /// itself did not read the connection, [`Conn::note_pause`]).
    pub frame_started: Option<Instant>,
    /// Since when the node has not read this connection because the client has not taken its
    /// answers (seen by the deadline sweep); `None` while the node reads it.
    paused_since: Option<Instant>,
    /// When output last made progress (or was first queued).
    pub write_progress: Instant,
    /// When the connection last received a byte or had output queued or written: how long an
    /// idle connection has been idle.
    pub last_activity: Instant,
    /// When the connection was accepted or dialled.
    pub opened: Instant,
    /// Input bytes the node's frame-memory total counts for this connection.
    pub charged: usize,
    /// The peer closed its sending side.
    pub read_closed: bool,
    /// Close once the output is flushed (after a fatal protocol error).
    pub close_after_flush: bool,
    pub wants_writable: bool,
    /// Peer wire: the torrent, once the handshake named it (or we dialled for it).
    pub torrent: Option<InfoHash>,
    /// Peer wire: the remote handshake has been read.
    pub handshaken: bool,
    /// Peer wire: we dialled this peer.
    pub outgoing: bool,
    /// Peer wire: a non-blocking connect not yet complete.
    pub connecting: bool,
    /// Commands: the cluster-key handshake's state; frames are opened and sealed through it.
    pub auth: NodeAuth,
    /// Peer wire: Message Stream Encryption (none, handshaking, or done).
    pub crypt: Crypt,
    /// Commands: the address the peer reached us at, asked of the socket once (the hop address
    /// of every EXECUTE_TASK answer) and kept.
    pub local_addr: Option<Option<SocketAddr>>,
    /// Set when this node closes the connection for one of its limits (idle shed or
    /// `--idle-timeout`): its sessions are kept (see `Inference::closed`).
    pub closed_by_limit: bool,
}

/// What the next buffered bytes are.
pub enum Next<'a> {
    /// A frame's payload (its MAC checked and removed on an authenticated connection), and the
    /// frame's length less its prefix, for [`Conn::consume`].
    Frame(&'a [u8], usize),
    /// A frame on an authenticated connection whose MAC does not verify.
    BadMac(AuthError),
    NeedMore,
    TooLarge {
        declared: u32,
        limit: u32,
    },
    PeerWire,
}

impl Conn {
    pub fn new(stream: TcpStream, peer: SocketAddr, id: u64) -> Conn {
        Conn {
            stream,
            peer,
            id,
            kind: Kind::Unknown,
            input: Vec::new(),
            start: 0,
            end: 0,
            output: OutQueue::default(),
            in_flight: 0,
            reserved: 0,
            frame_started: None,
            paused_since: None,
            write_progress: Instant::now(),
            last_activity: Instant::now(),
            opened: Instant::now(),
            charged: 0,
            read_closed: false,
            close_after_flush: false,
            wants_writable: false,
            torrent: None,
            handshaken: false,
            outgoing: false,
            connecting: false,
            auth: NodeAuth::Open,
            crypt: Crypt::Plain,
            local_addr: None,
            closed_by_limit: false,
        }
    }

    /// A peer-wire connection we dial for `torrent`.
    pub fn outgoing(stream: TcpStream, peer: SocketAddr, id: u64, torrent: InfoHash) -> Conn {
        let mut c = Conn::new(stream, peer, id);
        c.kind = Kind::PeerWire;
        c.torrent = Some(torrent);
        c.outgoing = true;
        c.connecting = true;
        c
    }

    /// A peer-wire connection we dial for `torrent` with an MSE handshake under `policy`: step 1
    /// is queued at once (sent when the connect completes).
    pub fn outgoing_encrypted(
        stream: TcpStream,
        peer: SocketAddr,
        id: u64,
        torrent: InfoHash,
        policy: crate::config::Encryption,
        now: Instant,
    ) -> Conn {
        let mut c = Conn::outgoing(stream, peer, id, torrent);
        let mut step1 = Vec::new();
        c.crypt = Crypt::initiator(torrent, policy, now, &mut step1);
        c.output.push_bytes(&step1);
        c
    }

    /// Runs the MSE handshake over the buffered input: consumes what it used, queues its
    /// replies, and once done decrypts what is buffered after it. `Ok(Some(..))`: the
    /// handshake finished (the torrent and the method); `Ok(None)`: more input is needed.
    pub fn mse_feed(
        &mut self,
        serves: &dyn Fn(&[u8; 20]) -> Option<InfoHash>,
        now: Instant,
    ) -> Result<Option<(InfoHash, u32)>, MseError> {
        let Crypt::Handshaking { hs, held } = &mut self.crypt else { return Ok(None) };
        let mut out = Vec::new();
        let fed = hs.feed(&self.input[self.start..self.end], held, serves, &mut out);
        if !out.is_empty() {
            self.mark_queued(now);
            self.output.push_bytes(&out);
        }
        let fed = fed?;
        self.consume_raw(fed.used, now);
        let Some(est) = fed.done else { return Ok(None) };
        let held = match &mut self.crypt {
            Crypt::Handshaking { held, .. } => std::mem::take(held),
            _ => Vec::new(),
        };
        let (info_hash, method) = (est.info_hash, est.method);
        let mut inbound = est.inbound;
        inbound.decrypt(&mut self.input[self.start..self.end]);
        self.crypt = Crypt::Done { inbound: Box::new(inbound), outbound: est.outbound.map(Box::new), method };
        // What the swarm queued after IA went out waits no longer.
        self.queue_raw(&held, now);
        Ok(Some((info_hash, method)))
    }

    /// Unconsumed input (peer wire).
    pub fn input(&self) -> &[u8] {
        &self.input[self.start..self.end]
    }

    /// Marks `n` bytes of input used (peer wire).
    pub fn consume_raw(&mut self, n: usize, now: Instant) {
        self.start += n;
        debug_assert!(self.start <= self.end);
        if self.start == self.end {
            (self.start, self.end) = (0, 0);
        }
        self.frame_started = self.has_partial_input().then_some(now);
        self.paused_since = None;
    }

    /// Reads at most `max` bytes from the socket straight into the input
    /// buffer (no intermediate copy). `Ok(0)`: the peer closed its side.
    pub fn read_input(&mut self, max: usize, now: Instant) -> io::Result<usize> {
        if self.input.len() - self.end < max {
            // Move the partial frame to the front, then grow only if needed.
            if self.start > 0 {
                self.input.copy_within(self.start..self.end, 0);
                (self.start, self.end) = (0, self.end - self.start);
            }
            if self.input.len() - self.end < max {
                self.input.resize(self.end + max, 0);
            }
        }
        let n = self.stream.read(&mut self.input[self.end..self.end + max])?;
        if n > 0 {
            self.last_activity = now;
            if self.start == self.end {
                self.frame_started = Some(now);
                self.paused_since = None;
            }
        }
        if let Crypt::Done { inbound, .. } = &mut self.crypt {
            inbound.decrypt(&mut self.input[self.end..self.end + n]);
        }
        self.end += n;
        Ok(n)
    }

    /// Queues raw bytes (peer wire): encrypted on an RC4 connection, held during an MSE
    /// handshake.
    pub fn queue_raw(&mut self, bytes: &[u8], now: Instant) {
        if bytes.is_empty() {
            return;
        }
        self.mark_queued(now);
        match &mut self.crypt {
            Crypt::Plain | Crypt::Incoming | Crypt::Done { outbound: None, .. } => self.output.push_bytes(bytes),
            Crypt::Handshaking { held, .. } => held.extend_from_slice(bytes),
            Crypt::Done { outbound: Some(c), .. } => self.output.push_with(|out| {
                let start = out.len();
                out.extend_from_slice(bytes);
                c.apply(&mut out[start..]);
            }),
        }
    }

    /// Queues a `piece` message whose data stays in `view` until the socket
    /// takes it (peer wire). False if `view` lacks the range. An RC4 connection copies the
    /// block out of the map and encrypts it; a plaintext one writes it from the map.
    pub fn queue_block(&mut self, header: PieceHeader, view: View, offset: u64, len: usize, now: Instant) -> bool {
        self.mark_queued(now);
        match &mut self.crypt {
            Crypt::Plain | Crypt::Incoming | Crypt::Done { outbound: None, .. } => {
                self.output.push_block(header, view, offset, len)
            }
            Crypt::Handshaking { held, .. } => {
                let data = view.bytes(offset, len as u64);
                if data.len() != len {
                    return false;
                }
                held.extend_from_slice(&header);
                held.extend_from_slice(data);
                true
            }
            Crypt::Done { outbound: Some(c), .. } => {
                let data = view.bytes(offset, len as u64);
                if data.len() != len {
                    return false;
                }
                // One copy, out of the map into the output buffer, encrypted there.
                self.output.push_with(|out| {
                    let start = out.len();
                    out.extend_from_slice(&header);
                    out.extend_from_slice(data);
                    c.apply(&mut out[start..]);
                });
                true
            }
        }
    }

    /// Output about to be queued: if none was waiting, the clock for a peer
    /// that does not read starts now.
    fn mark_queued(&mut self, now: Instant) {
        if self.pending_output() == 0 {
            self.write_progress = now;
        }
        self.last_activity = now;
    }

    pub fn pending_output(&self) -> usize {
        self.output.pending()
    }

    /// Whether new requests must wait for the client to read its answers.
    /// A peer-wire connection: whether [`PEER_OUT_MAX`] bytes wait (its block requests are
    /// bounded by the swarm's queue, its other requests by this bound on its unsent answers).
    pub fn backpressured(&self) -> bool {
        if self.kind == Kind::PeerWire {
            return self.pending_output() >= PEER_OUT_MAX;
        }
        self.pending_output() > OUT_HIGH_WATER
            || (self.in_flight > 0 && self.pending_output() + self.reserved >= ANSWER_BUDGET)
            || self.in_flight >= MAX_IN_FLIGHT
    }

    /// Whether the connection may take more requests now.
    pub fn may_read(&self) -> bool {
        if self.read_closed || self.close_after_flush || self.connecting {
            return false;
        }
        !self.backpressured()
    }

    /// Keeps the time the node does not read a command connection (its answers not taken:
    /// [`Conn::backpressured`]) out of the frame deadline, and tells whether it is paused now.
    /// Requests buffered behind a paused connection are not "a frame not whole": the client may
    /// have sent all of them long ago. A paused connection is still bounded: its unsent output
    /// by `--io-timeout`, its answers in flight by their own deadlines, its buffered bytes by
    /// `--frame-memory`. Called by the sweep, so a pause is seen within one sweep period.
    pub fn note_pause(&mut self, now: Instant) -> bool {
        let paused = self.kind == Kind::Command && self.has_partial_input() && self.backpressured();
        match (paused, self.paused_since) {
            (true, None) => self.paused_since = Some(now),
            (false, Some(since)) => {
                self.paused_since = None;
                if let Some(t) = &mut self.frame_started {
                    *t += now.saturating_duration_since(since);
                }
            }
            _ => {}
        }
        paused
    }

    /// Whether a paused connection has drained enough to read again.
    pub fn drained(&self) -> bool {
        self.pending_output() < OUT_LOW_WATER
            && (self.in_flight == 0 || self.pending_output() + self.reserved < ANSWER_BUDGET)
            && self.in_flight < MAX_IN_FLIGHT
    }

    /// Whether bytes of an incomplete frame are buffered.
    pub fn has_partial_input(&self) -> bool {
        self.end > self.start
    }

    /// Memory the input buffer holds for a partially received frame (or message): the whole
    /// buffer while any unconsumed byte is in it, else nothing.
    pub fn input_held(&self) -> usize {
        if self.has_partial_input() { self.input.len() } else { 0 }
    }

    /// Whether the connection may be shed to make room: not yet classified, or a command
    /// connection with nothing in flight, buffered or unsent (and not already closing).
    pub fn is_idle(&self) -> bool {
        self.kind != Kind::PeerWire
            && self.in_flight == 0
            && !self.has_partial_input()
            && self.pending_output() == 0
            && !self.close_after_flush
    }

    /// Tells commands from the peer wire, plaintext or MSE, by the first bytes received
    /// (once; `mse`: whether this node speaks MSE; see [`peer_crypto::classify`]); `Unknown`
    /// until they tell.
    pub fn classify(&mut self, mse: bool) -> Kind {
        if self.kind == Kind::Unknown {
            match peer_crypto::classify(self.input(), mse) {
                First::NeedMore => {}
                First::Command => self.kind = Kind::Command,
                First::PeerWire => self.kind = Kind::PeerWire,
                First::Encrypted => {
                    self.kind = Kind::PeerWire;
                    self.crypt = Crypt::Incoming;
                }
            }
        }
        self.kind
    }

    /// Looks at the next buffered frame; call [`Conn::consume`] after using it.
    pub fn next(&mut self, max_frame: u32) -> Next<'_> {
        match self.kind {
            Kind::Unknown => return Next::NeedMore,
            Kind::PeerWire => return Next::PeerWire,
            Kind::Command => {}
        }
        let rest = &self.input[self.start..self.end];
        match frame::decode(rest, max_frame) {
            Decoded::Frame { len } => match self.auth.open(&rest[frame::HEADER_LEN..frame::HEADER_LEN + len]) {
                Ok(payload) => Next::Frame(payload, len),
                Err(e) => Next::BadMac(e),
            },
            Decoded::NeedMore(_) => Next::NeedMore,
            Decoded::TooLarge { declared, limit } => Next::TooLarge { declared, limit },
        }
    }

    /// Marks the frame returned by `next` as used (`len`: the frame less its prefix).
    pub fn consume(&mut self, len: usize, now: Instant) {
        self.consume_raw(frame::HEADER_LEN + len, now);
    }

    /// Frees a large input buffer once nothing is buffered (after a big
    /// command frame), so an idle connection holds little memory.
    pub fn trim_input(&mut self) {
        if self.start == self.end && self.input.len() > INPUT_KEEP {
            self.input = Vec::new();
            (self.start, self.end) = (0, 0);
        }
    }

    /// Discards all buffered input (after a fatal framing error).
    pub fn discard_input(&mut self) {
        self.input = Vec::new();
        (self.start, self.end) = (0, 0);
        self.frame_started = None;
    }

    /// Queues one response frame (sealed on an authenticated connection).
    pub fn queue_frame(&mut self, payload: &[u8], now: Instant) {
        self.mark_queued(now);
        let auth = &mut self.auth;
        self.output.push_with(|out| auth.encode(payload, out));
    }

    /// Writes as much output as the socket takes. `Ok(true)` when all is sent.
    pub fn flush(&mut self, now: Instant) -> io::Result<bool> {
        if self.connecting {
            return Ok(false);
        }
        while self.output.pending() > 0 {
            match self.output.write_to(&mut self.stream) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(_) => (self.write_progress, self.last_activity) = (now, now),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(self.output.pending() == 0)
    }

    /// Whether nothing more will happen on this connection.
    pub fn finished(&self) -> bool {
        self.pending_output() == 0 && (self.close_after_flush || (self.read_closed && self.in_flight == 0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// Reads of every size into the reused input buffer, consumed in uneven
    /// pieces, give back exactly the bytes sent, and the buffer stays bounded.
    #[test]
    fn input_read_in_place_keeps_every_byte_in_order() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut tx = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (rx, peer) = listener.accept().unwrap();
        rx.set_nonblocking(true).unwrap();
        let mut conn = Conn::new(TcpStream::from_std(rx), peer, 1);
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 31 + i / 7) as u8).collect();
        let writer = std::thread::spawn(move || {
            for chunk in data.chunks(7919) {
                tx.write_all(chunk).unwrap();
            }
            data
        });
        let now = Instant::now();
        let (mut got, mut take, mut max_len) = (Vec::new(), 1usize, 0usize);
        let deadline = Instant::now() + std::time::Duration::from_secs(10);
        while got.len() < 300_000 && Instant::now() < deadline {
            let max = [1, 13, 4096, 65536][got.len() % 4];
            match conn.read_input(max, now) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::yield_now(),
                Err(e) => panic!("{e}"),
            }
            // Consume like a parser: whole "messages" of a growing size,
            // leaving a partial one behind.
            while conn.input().len() >= take {
                got.extend_from_slice(&conn.input()[..take]);
                conn.consume_raw(take, now);
                take = take % 20_000 + 977;
            }
            assert_eq!(conn.has_partial_input(), !conn.input().is_empty());
            max_len = max_len.max(conn.input.len());
        }
        got.extend_from_slice(conn.input());
        let data = writer.join().unwrap();
        assert_eq!(got, data);
        assert!(max_len <= 20_977 + 65536, "the buffer holds one partial message and one read ({max_len})");
    }
}
