//! Relays: a hop's result carried to the next node, and the chain's answer carried back, as
//! non-blocking work of the event loop.
//!
//! The inference thread builds the request frame for the next hop (a binary frame: its hidden
//! state as raw bytes, see [`crate::protocol::binary`]) as an [`Outgoing`] and submits it itself
//! ([`Relays::submit_direct`], through [`Shared`], the relays under one lock): queued on its link
//! behind whatever waits there, and written from that thread at once when the link is connected
//! and had nothing queued, so a hop costs no wake-up of the event loop. What the socket does not
//! take stays queued; the loop, which keeps every link registered for writability, writes it
//! (frames go out whole, in the order submitted, sealed once on a keyed link: every frame is
//! sealed into the link's one output buffer under the lock). Without a second poll handle (or
//! with `SHARDNET_DIRECT_WRITE=0`) the inference thread hands the `Outgoing` to the loop, which
//! submits it. A link sends binary frames once its next hop has answered one (every relayed
//! request asks `encoding_format: "binary"`); until then, and to a node that never does, the
//! request goes as JSON with the tensor in base64, so older nodes keep working. The loop keeps one outbound connection ([`Link`])
//! per next-hop address, writes every relayed request for that address on it, and matches the
//! answers to requests by `request_id` (a number this node chose), so any number of chains wait
//! at once without a thread each and without a connect per request. An answer becomes the frame
//! for our own caller: the next hop's result with this hop's entry put first in `hops`, or its
//! error with the hop that failed (`failed_hop`). A next hop that cannot be reached, closes, or
//! does not answer by the request's deadline becomes `HOP_FAILED` naming it.
//!
//! When the node has a cluster key, a link first runs the key handshake as a client
//! ([`ClientHandshake`]: hello, check the next node's proof, send ours) without blocking, and
//! seals every request after it; requests submitted meanwhile wait on the link.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Interest, Registry, Token};
use serde_json::{Value, json};

use super::inference::ReplyTo;
use crate::protocol::auth::{ClientHandshake, ClusterKey, FrameMac, NONCE_LEN, random_bytes};
use crate::protocol::frame::{self, Decoded};
use crate::protocol::{Encoding, ErrorCode, Hop, TaskOutput, binary, request_payload};

/// Closed command connections remembered, so that a relay the inference thread submits for one
/// after it closed is dropped (see [`Relays::submit_direct`]).
const GONE_IDS: usize = 4096;
/// Tokens at and above this are relay links (below: the listener, the waker, the UDP socket and
/// accepted connections).
pub const TOKEN_BASE: usize = 1 << 40;
/// Bytes read from one link per event before others get a turn.
const READ_CHUNK: usize = 64 * 1024;
/// Ids of requests that expired on a link (and may still be answered late) kept per link.
const LATE_IDS: usize = 256;
/// The one error text for a next hop that does not speak shardnet: the reason (and any byte it
/// sent) goes to this node's log only, so relays do not tell a stranger what listens where.
const NOT_SHARDNET: &str = "did not answer as a shardnet node";
/// The largest frame a link takes beside answers to relayed requests: the cluster-key handshake's
/// (a few hundred bytes) and `CANCEL`'s answers (the ids it withdrew: at most
/// `MAX_CANCEL_IDS` (1,024) relay ids of up to 20 digits, ~22 KB).
const CONTROL_FRAME: usize = 32 * 1024;

/// What bounds relays (`--max-relays`, `--max-relays-per-client`, `--relay-link-buffer`,
/// `--relay-memory`, `--io-timeout`).
#[derive(Clone, Copy, Debug)]
pub struct RelayLimits {
    /// Relays in flight at once, node-wide.
    pub max_relays: usize,
    /// Relays in flight at once for one client (the per-client session quota's key), so that
    /// one client cannot take the node-wide count.
    pub per_client: usize,
    /// Unsent request bytes one link may hold.
    pub link_buffer: usize,
    /// Unsent request bytes all links together may hold.
    pub memory: usize,
    /// A link whose connect or unsent bytes make no progress this long is closed.
    pub io_timeout: Duration,
}

/// A request for the next hop, built by the inference thread.
pub struct Outgoing {
    /// Our caller, who gets the chain's answer.
    pub reply: ReplyTo,
    /// The client the relay counts for (the per-client session quota's key).
    pub origin: String,
    pub next: Hop,
    /// The `request_id` inside `payload`: unique among this node's relays.
    pub id: u64,
    /// The `EXECUTE_TASK` for `next` (JSON; the link frames it, and seals it on a keyed link).
    pub payload: Vec<u8>,
    /// This hop's entry for the answer's `hops`.
    pub hop: Value,
    /// How long the next hop has to answer.
    pub timeout: Duration,
    /// How our caller asked for its answer's tensors.
    pub encoding: Encoding,
    /// What the answer must be: checked before it is read whole (its size) and after it is
    /// parsed (its counts).
    pub expect: Expect,
}

/// What a well-formed answer to a relayed request is, from the request itself.
#[derive(Clone, Copy, Debug)]
pub struct Expect {
    pub output: TaskOutput,
    /// Hops from the next one to the chain's end: the most entries the answer's `hops` has.
    pub hops: usize,
    /// The model's vocabulary (token ids of a `top_k` are below it).
    pub n_vocab: usize,
    /// The largest frame the answer may be ([`crate::protocol::answer_limit`]).
    pub max_bytes: usize,
}

/// A frame for a caller.
pub struct Answer {
    pub reply: ReplyTo,
    pub body: Body,
}

/// What an [`Answer`] carries.
pub enum Body {
    /// The frame, finished.
    Frame(Vec<u8>),
    /// A next hop's binary answer with a data section over [`FINISH_ON_LOOP`]: our caller's frame
    /// is made of it off the event loop ([`Finish::frame`]).
    Finish(Finish),
}

/// The largest data section a relayed answer is made into its caller's frame with on the event
/// loop. Past it (a hidden state or logits of several tokens: `all_logits` for 64 tokens is
/// 12.6 MB at SmolLM2's vocabulary, 16.8 MB in base64) the copy, and for a JSON caller the
/// base64 and JSON text, are made on the `relay` thread: measured, one such answer held the
/// loop (another client's STATUS) for 126 ms.
pub const FINISH_ON_LOOP: usize = 1 << 20;

/// A next hop's answer to be made our caller's frame: `answer` is its header (our request id and
/// hop already in it), `payload[data_at..]` its raw tensors.
pub struct Finish {
    answer: Value,
    payload: Vec<u8>,
    data_at: usize,
    encoding: Encoding,
    next: Hop,
}

impl Finish {
    /// Our caller's frame, in the form it asked for: to a binary caller the data section goes on
    /// untouched; to a JSON caller raw tensors become base64. A data section that does not match
    /// its header is the next hop's failure (`HOP_FAILED`).
    pub fn frame(mut self) -> Vec<u8> {
        let data = &self.payload[self.data_at..];
        match self.encoding {
            Encoding::Binary => {
                let header = serde_json::to_vec(&self.answer).expect("JSON values serialize");
                let mut payload = Vec::with_capacity(binary::PREFIX_LEN + header.len() + data.len());
                binary::encode(&header, data, &mut payload);
                payload
            }
            Encoding::Base64 => match binary::inline_tensors(&mut self.answer, data, &RESULT_TENSORS) {
                Ok(()) => serde_json::to_vec(&self.answer).expect("JSON values serialize"),
                Err((_, why)) => {
                    let msg = format!(
                        "next hop {} (shard {}) answered a bad binary frame: {why}",
                        self.next.address, self.next.shard_id
                    );
                    hop_failed_frame(&self.answer["request_id"], &self.next, &msg)
                }
            },
        }
    }
}

/// Where a link stands with the cluster-key handshake.
enum LinkAuth {
    /// No key: frames go plain.
    Open,
    /// Hello sent; waiting for the next node's challenge.
    Hello(ClientHandshake),
    /// Proof sent; waiting for the first sealed answer.
    Proof { tx: FrameMac, rx: FrameMac },
    /// Every frame sealed both ways.
    Ready { tx: FrameMac, rx: FrameMac },
}

const AUTH_HELLO_ID: &str = "relay-auth-hello";
/// The `request_id` of every `CANCEL` a link sends; its answer (or an older node's
/// `UNKNOWN_COMMAND`) is read and dropped.
const CANCEL_ID: &str = "relay-cancel";
const AUTH_PROOF_ID: &str = "relay-auth-proof";

/// One outbound connection to a next hop.
struct Link {
    addr: SocketAddr,
    stream: TcpStream,
    connected: bool,
    auth: LinkAuth,
    /// Requests waiting for the handshake to finish.
    held: Vec<Vec<u8>>,
    out: Vec<u8>,
    input: Vec<u8>,
    /// Relay ids waiting on this link, with the largest answer each may take: an answer is
    /// taken only for one of these.
    waiting: HashMap<u64, usize>,
    /// Ids that expired on this link: a late answer to one is dropped, not taken as foreign.
    late: VecDeque<u64>,
    /// The largest answer an expired request on this link could have taken (its late answer
    /// is read, then dropped).
    late_bytes: usize,
    /// When the link last received a whole answer.
    last_answer: Option<Instant>,
    /// Whether the next hop ever sent a valid shardnet frame (before that, every failure gets
    /// the one generic text).
    spoke: bool,
    /// Whether the next hop has answered a binary frame: requests go to it as binary frames
    /// from then on (before, as JSON).
    binary: bool,
    /// When the connect began or unsent bytes last went out (`--io-timeout` runs from here).
    write_progress: Instant,
}

impl Link {
    /// Queues one request frame: length-prefixed on an open link, sealed on a keyed one whose
    /// handshake is done, else held until it is. The bytes it added to [`Link::queued`]; the
    /// write clock starts when the link had nothing queued.
    fn queue_frame(&mut self, payload: Vec<u8>, now: Instant) -> usize {
        let before = self.queued();
        if before == 0 {
            self.write_progress = now;
        }
        match &mut self.auth {
            LinkAuth::Open => frame::encode(&payload, &mut self.out),
            LinkAuth::Ready { tx, .. } => tx.seal_frame(&payload, &mut self.out),
            LinkAuth::Hello(_) | LinkAuth::Proof { .. } => self.held.push(payload),
        }
        self.queued() - before
    }

    /// Unsent request bytes (queued and held for the handshake).
    fn queued(&self) -> usize {
        self.out.len() + self.held.iter().map(Vec::len).sum::<usize>()
    }

    /// The largest frame the link takes now: an answer no request waiting on it (or expired on
    /// it) could have asked for is refused from its length prefix, never buffered or parsed.
    fn frame_limit(&self, max_frame: u32) -> usize {
        let asked = self.waiting.values().copied().fold(CONTROL_FRAME.max(self.late_bytes), usize::max);
        asked.min(max_frame as usize)
    }

    /// Moves `id` (waiting) to the expired ids.
    fn expire(&mut self, id: u64) {
        if let Some(bytes) = self.waiting.remove(&id) {
            self.late_bytes = self.late_bytes.max(bytes);
        }
        if self.late.len() == LATE_IDS {
            self.late.pop_front();
        }
        self.late.push_back(id);
    }
}

struct Pending {
    reply: ReplyTo,
    encoding: Encoding,
    origin: String,
    next: Hop,
    hop: Value,
    sent: Instant,
    deadline: Instant,
    link: Token,
    expect: Expect,
}

pub struct Relays {
    by_addr: HashMap<SocketAddr, Token>,
    links: HashMap<Token, Link>,
    pending: HashMap<u64, Pending>,
    /// Relays in flight per client.
    per_client: HashMap<String, usize>,
    next_token: usize,
    max_frame: u32,
    key: Option<ClusterKey>,
    limits: RelayLimits,
    /// Unsent request bytes over all links.
    queued: usize,
    /// Relays refused for a limit (STATUS `relays.refused`).
    pub refused: u64,
    /// Relays withdrawn from a link that stayed open, with a `CANCEL` sent down it (STATUS
    /// `relays.cancels_sent`).
    pub cancelled_down: u64,
    /// Answers made into their callers' frames off the loop ([`Body::Finish`]; STATUS
    /// `relays.finished_off_loop`).
    pub finished_off_loop: u64,
    /// Where a link's socket is read into ([`READ_CHUNK`] bytes, allocated once).
    scratch: Vec<u8>,
    /// Command connections closed with work in flight ([`Relays::cancel`]), the last
    /// [`GONE_IDS`] of them: the inference thread's relays for them are dropped.
    gone: HashSet<u64>,
    gone_order: VecDeque<u64>,
    /// When the event loop wakes next on its own (set before each poll): a relay submitted from
    /// another thread whose deadline comes earlier wakes it.
    loop_wakes_at: Option<Instant>,
}

/// The relays as the event loop and the inference thread share them: the inference thread
/// submits a hop's request itself ([`Relays::submit_direct`]) and writes it to the link's socket
/// when the link has nothing queued, instead of handing it to the loop and waking it; the loop
/// reads answers, finishes partial writes and connects, and keeps the deadlines. Each holds the
/// lock only for the bookkeeping and one non-blocking `write`.
#[derive(Clone)]
pub struct Shared(Arc<Mutex<Relays>>);

impl Shared {
    pub fn new(relays: Relays) -> Shared {
        Shared(Arc::new(Mutex::new(relays)))
    }

    /// The relays, locked. A thread that panicked holding the lock left them consistent (every
    /// method keeps its counts before it can panic), so a poisoned lock is taken as it is.
    pub fn lock(&self) -> MutexGuard<'_, Relays> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What the inference thread needs to submit relays itself: the shared relays and a handle on
/// the loop's poll registry (a new link is registered from that thread).
pub struct Direct {
    pub relays: Shared,
    pub registry: Registry,
}

impl Relays {
    /// Relays whose links authenticate with `key` when the node has one.
    pub fn new(max_frame: u32, key: Option<ClusterKey>, limits: RelayLimits) -> Relays {
        Relays {
            by_addr: HashMap::new(),
            links: HashMap::new(),
            pending: HashMap::new(),
            per_client: HashMap::new(),
            next_token: TOKEN_BASE,
            max_frame,
            key,
            limits,
            queued: 0,
            refused: 0,
            cancelled_down: 0,
            finished_off_loop: 0,
            scratch: Vec::new(),
            gone: HashSet::new(),
            gone_order: VecDeque::new(),
            loop_wakes_at: None,
        }
    }

    /// The loop's next wake of its own (`at`, before its relays' deadlines are counted), moved
    /// earlier to the first relay deadline; kept so that [`Relays::submit_direct`] knows when
    /// the loop must be woken for a new deadline.
    pub fn plan_wake(&mut self, at: Instant) -> Instant {
        let at = self.next_deadline().map_or(at, |d| d.min(at));
        self.loop_wakes_at = Some(at);
        at
    }

    /// [`Relays::submit`] from the inference thread: a relay for a command connection that
    /// closed meanwhile is dropped (as the loop drops one), else it is submitted, and written at
    /// once when its link is connected with nothing queued. The answers to give at once (a
    /// refusal, an unreachable hop), and whether the loop must be woken: for those answers, or
    /// because the relay's deadline comes before the loop's next wake.
    pub fn submit_direct(&mut self, registry: &Registry, out: Outgoing, now: Instant) -> (Vec<Answer>, bool) {
        if self.gone.contains(&out.reply.conn_id) {
            return (Vec::new(), false);
        }
        let deadline = now + out.timeout;
        let answers = self.submit(registry, out, now);
        let wake = !answers.is_empty() || self.loop_wakes_at.is_some_and(|t| deadline < t);
        (answers, wake)
    }

    /// Removes a relay from those in flight, and from its client's count.
    fn take(&mut self, id: u64) -> Option<Pending> {
        let p = self.pending.remove(&id)?;
        if let Some(n) = self.per_client.get_mut(&p.origin) {
            *n -= 1;
            if *n == 0 {
                self.per_client.remove(&p.origin);
            }
        }
        Some(p)
    }

    /// Refuses a relay over a limit: `BUSY` to its caller at once, nothing buffered.
    fn refuse(&mut self, out: Outgoing, why: String) -> Vec<Answer> {
        self.refused += 1;
        crate::debug!("relay to {} refused: {why}", out.next.address);
        let v = json!({"command": "EXECUTE_TASK", "request_id": out.reply.request_id, "status": "error",
            "error": format!("this node cannot relay now: {why}; retry later"), "code": ErrorCode::Busy.as_str()});
        vec![Answer { reply: out.reply, body: Body::Frame(serde_json::to_vec(&v).expect("JSON values serialize")) }]
    }

    /// Relays in flight and open links, for STATUS.
    pub fn counts(&self) -> (usize, usize) {
        (self.pending.len(), self.links.len())
    }

    /// Open links whose next hop reads binary frames (STATUS `relays.binary_links`).
    pub fn binary_links(&self) -> usize {
        self.links.values().filter(|l| l.binary).count()
    }

    /// The earliest deadline of a relay in flight (the loop's poll timeout).
    pub fn next_deadline(&self) -> Option<Instant> {
        self.pending.values().map(|p| p.deadline).min()
    }

    /// Sends `out` on the link to its next hop (connecting one if there is none). Answers at once
    /// only when the hop cannot be reached.
    ///
    /// Over `--max-relays` relays in flight, or a request that would take its link's unsent bytes
    /// past `--relay-link-buffer` (or all links' past `--relay-memory`), is answered `BUSY` at
    /// once and never buffered.
    pub fn submit(&mut self, registry: &Registry, out: Outgoing, now: Instant) -> Vec<Answer> {
        if self.pending.len() >= self.limits.max_relays {
            let why = format!("{} relays in flight, the most --max-relays allows", self.pending.len());
            return self.refuse(out, why);
        }
        let mine = self.per_client.get(&out.origin).copied().unwrap_or(0);
        if mine >= self.limits.per_client {
            let why = format!("this client has {mine} relays in flight, the most --max-relays-per-client allows");
            return self.refuse(out, why);
        }
        let size = out.payload.len() + frame::HEADER_LEN + 64;
        if self.queued > 0 && self.queued + size > self.limits.memory {
            let why =
                format!("relay requests of {} bytes unsent, --relay-memory is {}", self.queued, self.limits.memory);
            return self.refuse(out, why);
        }
        if let Some(l) = self.by_addr.get(&out.next.address).and_then(|t| self.links.get(t))
            && l.queued() > 0
            && l.queued() + size > self.limits.link_buffer
        {
            let why = format!(
                "the next hop has {} bytes unsent, --relay-link-buffer is {}",
                l.queued(),
                self.limits.link_buffer
            );
            return self.refuse(out, why);
        }
        let token = match self.by_addr.get(&out.next.address) {
            Some(t) => *t,
            None => match TcpStream::connect(out.next.address) {
                Ok(mut stream) => {
                    let token = Token(self.next_token);
                    self.next_token += 1;
                    if let Err(e) = registry.register(&mut stream, token, Interest::READABLE | Interest::WRITABLE) {
                        return vec![hop_failed(out.reply, &out.next, &format!("registering: {e}"))];
                    }
                    let _ = stream.set_nodelay(true);
                    let mut first = Vec::new();
                    let auth = match &self.key {
                        None => LinkAuth::Open,
                        Some(key) => match random_bytes::<NONCE_LEN>() {
                            Ok(nonce) => {
                                let hs = ClientHandshake::new(key.clone(), nonce);
                                let hello = request_payload("AUTH", &json!(AUTH_HELLO_ID), "relay", hs.hello_params());
                                frame::encode(&hello, &mut first);
                                LinkAuth::Hello(hs)
                            }
                            Err(e) => return vec![hop_failed(out.reply, &out.next, &format!("no nonce: {e}"))],
                        },
                    };
                    let link = Link {
                        addr: out.next.address,
                        stream,
                        connected: false,
                        auth,
                        held: Vec::new(),
                        out: first,
                        input: Vec::new(),
                        waiting: HashMap::new(),
                        late: VecDeque::new(),
                        late_bytes: 0,
                        last_answer: None,
                        spoke: false,
                        binary: false,
                        write_progress: now,
                    };
                    self.queued += link.out.len();
                    self.links.insert(token, link);
                    self.by_addr.insert(out.next.address, token);
                    token
                }
                Err(e) => {
                    crate::debug!("relay to {}: connect: {e}", out.next.address);
                    let msg = format!("next hop {} (shard {}): {NOT_SHARDNET}", out.next.address, out.next.shard_id);
                    return vec![hop_failed(out.reply, &out.next, &msg)];
                }
            },
        };
        let link = self.links.get_mut(&token).expect("indexed");
        let payload = if link.binary || !binary::is_binary(&out.payload) {
            out.payload
        } else {
            // A next hop not known to read binary frames gets the request as JSON.
            match binary::to_json(&out.payload, &["/params/input/hidden"]) {
                Ok(v) => serde_json::to_vec(&v).expect("JSON values serialize"),
                Err((_, why)) => {
                    let msg = format!("relay request for {} could not be encoded: {why}", out.next.address);
                    return vec![internal_error(out.reply, &msg)];
                }
            }
        };
        self.queued += link.queue_frame(payload, now);
        link.waiting.insert(out.id, out.expect.max_bytes);
        *self.per_client.entry(out.origin.clone()).or_default() += 1;
        let pending = Pending {
            reply: out.reply,
            encoding: out.encoding,
            origin: out.origin,
            next: out.next,
            hop: out.hop,
            sent: now,
            deadline: now + out.timeout,
            link: token,
            expect: out.expect,
        };
        self.pending.insert(out.id, pending);
        if link.connected { self.flush(registry, token, now) } else { Vec::new() }
    }

    /// Readiness of a link's socket: finishes a connect, writes queued requests, reads answers.
    pub fn on_event(
        &mut self,
        registry: &Registry,
        token: Token,
        writable: bool,
        readable: bool,
        now: Instant,
    ) -> Vec<Answer> {
        let Some(link) = self.links.get_mut(&token) else { return Vec::new() };
        if !link.connected && (writable || readable) {
            match link.stream.take_error() {
                Ok(Some(e)) | Err(e) => return self.close(registry, token, &format!("connect: {e}")),
                Ok(None) => {}
            }
            match link.stream.peer_addr() {
                Ok(_) => link.connected = true,
                Err(e) if e.kind() == io::ErrorKind::NotConnected => return Vec::new(),
                Err(e) => return self.close(registry, token, &format!("connect: {e}")),
            }
        }
        let mut answers = self.flush(registry, token, now);
        if readable && self.links.contains_key(&token) {
            answers.extend(self.read(registry, token, now));
        }
        answers
    }

    /// The command connection `conn_id` closed: its relays in flight are dropped unanswered (their
    /// `--max-relays` and `--max-relays-per-client` slots free at once; before, a closed client's
    /// relays into a silent hop held them for up to `hop_timeout_ms`, 10 minutes). A late answer
    /// to one is discarded as after a deadline. A link left with no relay waiting is closed, so
    /// the next hop sees its caller go and drops the steps it has queued for it in turn (on this
    /// node too, when a route relays to this node itself). A link other chains still wait on
    /// stays, and gets a `CANCEL` naming the withdrawn requests: the next hop drops them (it
    /// honours a `CANCEL` only for requests that came on the connection it came on). The
    /// connection is remembered (the last [`GONE_IDS`]), so a relay the inference thread submits
    /// for it afterwards is dropped ([`Relays::submit_direct`]).
    pub fn cancel(&mut self, registry: &Registry, conn_id: u64, now: Instant) {
        if self.gone.insert(conn_id) {
            self.gone_order.push_back(conn_id);
            if self.gone_order.len() > GONE_IDS
                && let Some(old) = self.gone_order.pop_front()
            {
                self.gone.remove(&old);
            }
        }
        let ids: Vec<u64> =
            self.pending.iter().filter(|(_, p)| p.reply.conn_id == conn_id).map(|(id, _)| *id).collect();
        for (token, ids) in self.withdraw(ids) {
            if self.links.get(&token).is_some_and(|l| l.waiting.is_empty()) {
                // No relay waits on it: nothing to answer.
                let answers = self.close(registry, token, "its callers closed their connections");
                debug_assert!(answers.is_empty());
            } else {
                self.send_cancel(registry, token, ids, now);
            }
        }
    }

    /// A `CANCEL` from connection `conn_id`: its relays in flight among `request_ids` (its own
    /// request ids) are answered `CANCELLED` now, and a `CANCEL` goes down each of their links.
    pub fn cancel_requests(
        &mut self,
        registry: &Registry,
        conn_id: u64,
        request_ids: &[Value],
        now: Instant,
    ) -> Vec<Answer> {
        let ids: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.reply.conn_id == conn_id && request_ids.contains(&p.reply.request_id))
            .map(|(id, _)| *id)
            .collect();
        let mut answers = Vec::new();
        for id in &ids {
            if let Some(p) = self.pending.get(id) {
                let v = json!({"command": "EXECUTE_TASK", "request_id": p.reply.request_id, "status": "error",
                    "error": "withdrawn by CANCEL", "code": ErrorCode::Cancelled.as_str()});
                let reply = ReplyTo { request_id: p.reply.request_id.clone(), ..p.reply };
                answers
                    .push(Answer { reply, body: Body::Frame(serde_json::to_vec(&v).expect("JSON values serialize")) });
            }
        }
        for (token, ids) in self.withdraw(ids) {
            self.send_cancel(registry, token, ids, now);
        }
        answers
    }

    /// Takes relays `ids` out of flight (a late answer to one is dropped); by link, the ids
    /// withdrawn from it.
    fn withdraw(&mut self, ids: Vec<u64>) -> HashMap<Token, Vec<u64>> {
        let mut touched: HashMap<Token, Vec<u64>> = HashMap::new();
        for id in ids {
            let Some(p) = self.take(id) else { continue };
            if let Some(l) = self.links.get_mut(&p.link) {
                l.expire(id);
                touched.entry(p.link).or_default().push(id);
            }
        }
        touched
    }

    /// Queues a `CANCEL` of `ids` on a link (after the requests it names; sealed on a keyed link).
    fn send_cancel(&mut self, registry: &Registry, token: Token, ids: Vec<u64>, now: Instant) {
        let Some(link) = self.links.get_mut(&token) else { return };
        for ids in ids.chunks(crate::protocol::MAX_CANCEL_IDS) {
            self.cancelled_down += ids.len() as u64;
            let payload = request_payload("CANCEL", &json!(CANCEL_ID), "relay", json!({ "request_ids": ids }));
            self.queued += link.queue_frame(payload, now);
        }
        if link.connected {
            let answers = self.flush(registry, token, now);
            debug_assert!(answers.is_empty());
        }
    }

    /// Relays past their deadline become `HOP_FAILED`. A link that has answered nothing since
    /// such a request was sent is taken for dead and closed (its other requests fail with it),
    /// so the next request connects afresh.
    pub fn expire(&mut self, registry: &Registry, now: Instant) -> Vec<Answer> {
        let late: Vec<u64> = self.pending.iter().filter(|(_, p)| p.deadline <= now).map(|(id, _)| *id).collect();
        let mut answers = Vec::new();
        for id in late {
            let Some(p) = self.take(id) else { continue };
            let waited = now.duration_since(p.sent).as_millis();
            let msg =
                format!("next hop {} (shard {}) did not answer within {waited} ms", p.next.address, p.next.shard_id);
            let dead = self.links.get_mut(&p.link).is_some_and(|l| {
                l.expire(id);
                l.last_answer.is_none_or(|t| t < p.sent)
            });
            answers.push(hop_failed(p.reply, &p.next, &msg));
            if dead {
                answers.extend(self.close(registry, p.link, "its next hop went silent"));
            }
        }
        // A link whose connect, or whose unsent bytes, made no progress for --io-timeout: the
        // next hop does not read (its requests would pile up), so it is closed.
        let stuck: Vec<Token> = self
            .links
            .iter()
            .filter(|(_, l)| {
                (!l.connected || l.queued() > 0) && now.duration_since(l.write_progress) >= self.limits.io_timeout
            })
            .map(|(t, _)| *t)
            .collect();
        for token in stuck {
            let why = format!("it took no bytes for {} s (--io-timeout)", self.limits.io_timeout.as_secs());
            answers.extend(self.close(registry, token, &why));
        }
        answers
    }

    fn flush(&mut self, registry: &Registry, token: Token, now: Instant) -> Vec<Answer> {
        let Some(link) = self.links.get_mut(&token) else { return Vec::new() };
        while !link.out.is_empty() {
            match link.stream.write(&link.out) {
                Ok(0) => return self.close(registry, token, "the connection took no bytes"),
                Ok(n) => {
                    link.out.drain(..n);
                    self.queued -= n;
                    link.write_progress = now;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return self.close(registry, token, &format!("write error: {e}")),
            }
        }
        Vec::new()
    }

    fn read(&mut self, registry: &Registry, token: Token, now: Instant) -> Vec<Answer> {
        let mut answers = Vec::new();
        let mut closed = None;
        {
            let Some(link) = self.links.get_mut(&token) else { return answers };
            // One buffer for every read (a fresh zeroed 64 KiB per answer cost more than the read).
            let chunk = &mut self.scratch;
            chunk.resize(READ_CHUNK, 0);
            loop {
                match link.stream.read(chunk) {
                    Ok(0) => {
                        closed = Some("closed by the next hop".to_string());
                        break;
                    }
                    Ok(n) => link.input.extend_from_slice(&chunk[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        closed = Some(format!("read error: {e}"));
                        break;
                    }
                }
            }
        }
        // Whole frames: answers to our requests.
        loop {
            let Some(link) = self.links.get_mut(&token) else { break };
            let limit = link.frame_limit(self.max_frame);
            match frame::decode(&link.input, limit.min(u32::MAX as usize) as u32) {
                Decoded::NeedMore(_) => break,
                Decoded::TooLarge { declared, limit } => {
                    closed = Some(format!(
                        "a frame of {declared} bytes declared, over the {limit} bytes what was asked of it allows"
                    ));
                    break;
                }
                Decoded::Frame { len } => {
                    // The frame taken whole (a move when it is all that is buffered), not byte by byte.
                    let total = frame::HEADER_LEN + len;
                    let mut body = if link.input.len() == total {
                        std::mem::take(&mut link.input)
                    } else {
                        let rest = link.input.split_off(total);
                        std::mem::replace(&mut link.input, rest)
                    };
                    body.drain(..frame::HEADER_LEN);
                    let payload = match &mut link.auth {
                        LinkAuth::Open | LinkAuth::Hello(_) => body,
                        LinkAuth::Proof { rx, .. } | LinkAuth::Ready { rx, .. } => match rx.open(&body) {
                            Ok(p) => {
                                // The payload is the frame less its tag.
                                let n = p.len();
                                body.truncate(n);
                                body
                            }
                            Err(e) => {
                                closed = Some(format!("an answer failed its MAC: {e}"));
                                break;
                            }
                        },
                    };
                    // Every relayed request asks a binary answer: a JSON frame past
                    // FINISH_ON_LOOP (a next hop from before binary frames, or one answering what
                    // was not asked) would be parsed on the loop, holding every other client.
                    if !binary::is_binary(&payload) && payload.len() > FINISH_ON_LOOP {
                        closed = Some(format!(
                            "a JSON answer of {} bytes where a binary one was asked (at most {FINISH_ON_LOOP} bytes \
                             of JSON are taken)",
                            payload.len()
                        ));
                        break;
                    }
                    // A binary answer: its header is parsed, its data section passed on as it is.
                    let (header, data) = if binary::is_binary(&payload) {
                        match binary::split(&payload) {
                            Ok(parts) => (parts.header, parts.data),
                            Err(why) => {
                                closed = Some(format!("the next hop sent a bad binary frame: {why}"));
                                break;
                            }
                        }
                    } else {
                        (&payload[..], &[][..])
                    };
                    let data_at = payload.len() - data.len();
                    let Ok(answer) = serde_json::from_slice::<Value>(header) else {
                        closed = Some("the next hop sent a frame that is not JSON".into());
                        break;
                    };
                    link.spoke = true;
                    if !matches!(link.auth, LinkAuth::Open | LinkAuth::Ready { .. }) {
                        let before = link.queued();
                        let step = link.handshake(&answer);
                        self.queued += link.queued();
                        self.queued -= before;
                        if let Err(why) = step {
                            closed = Some(why);
                            break;
                        }
                        continue;
                    }
                    // Only an answer to a request sent on this very link is taken: ids are
                    // matched per link, so a next hop can never answer (or fail) a request
                    // that went to another.
                    let id = answer["request_id"].as_u64();
                    match id {
                        Some(id) if link.waiting.remove(&id).is_some() => {
                            link.last_answer = Some(now);
                            link.binary |= binary::is_binary(&payload);
                            let p = self.take(id).expect("waiting on a link: pending");
                            // An answer that is not what was asked (more hops than the route
                            // has, a top_k past k or outside the vocabulary) is its hop's failure.
                            let shape = if answer["status"] == "success" {
                                let e = &p.expect;
                                crate::protocol::check_answer(&answer["result"], e.output, e.hops, e.n_vocab)
                            } else {
                                Ok(())
                            };
                            match shape {
                                Ok(()) => answers.push(relay_answer(p, answer, payload, data_at, now)),
                                Err(why) => {
                                    let msg = format!(
                                        "next hop {} (shard {}) answered what was not asked: {why}",
                                        p.next.address, p.next.shard_id
                                    );
                                    answers.push(hop_failed(p.reply, &p.next, &msg));
                                }
                            }
                        }
                        Some(id) if link.late.contains(&id) => {
                            // Answered after its deadline (its caller already has HOP_FAILED).
                            link.late.retain(|l| *l != id);
                            link.last_answer = Some(now);
                        }
                        // The answer to a CANCEL we sent (an older node's UNKNOWN_COMMAND too).
                        None if answer["request_id"] == CANCEL_ID => {}
                        _ => {
                            closed = Some(format!(
                                "an answer to request id {} that was not sent on this link",
                                answer["request_id"]
                            ));
                            break;
                        }
                    }
                }
            }
        }
        if let Some(why) = closed {
            answers.extend(self.close(registry, token, &why));
        } else {
            answers.extend(self.flush(registry, token, now));
        }
        answers
    }

    /// Closes a link; every relay waiting on it fails naming its next hop.
    fn close(&mut self, registry: &Registry, token: Token, why: &str) -> Vec<Answer> {
        let Some(mut link) = self.links.remove(&token) else { return Vec::new() };
        let _ = registry.deregister(&mut link.stream);
        self.queued -= link.queued();
        if self.by_addr.get(&link.addr) == Some(&token) {
            self.by_addr.remove(&link.addr);
        }
        // The reason, with whatever the other side sent, is for this node's log; a caller hears
        // it only from a next hop that has spoken shardnet on this link (or a silent one).
        crate::info!("relay link to {}: {why}; closed", link.addr);
        let told = if link.spoke || why.starts_with("its next hop went silent") { why } else { NOT_SHARDNET };
        link.waiting
            .keys()
            .filter_map(|id| self.take(*id))
            .map(|p| {
                let msg = format!("next hop {} (shard {}): {told}", p.next.address, p.next.shard_id);
                hop_failed(p.reply, &p.next, &msg)
            })
            .collect()
    }
}

impl Link {
    /// The next step of the key handshake, on the answer `answer`.
    fn handshake(&mut self, answer: &Value) -> Result<(), String> {
        let refused = |what: &str| {
            format!("the next node refused the cluster-key {what}: {}", answer["error"].as_str().unwrap_or("?"))
        };
        match std::mem::replace(&mut self.auth, LinkAuth::Open) {
            LinkAuth::Hello(hs) => {
                if answer["request_id"] != AUTH_HELLO_ID {
                    return Err("an answer arrived before the handshake".into());
                }
                if answer["code"] == "AUTH_UNAVAILABLE" {
                    return Err("the next node has no cluster key (it is open to anyone); not relaying to it".into());
                }
                if answer["status"] != "success" {
                    return Err(refused("handshake"));
                }
                let proof = hs.answer(&answer["result"]).map_err(|e| format!("the next node's proof: {e}"))?;
                let params = request_payload("AUTH", &json!(AUTH_PROOF_ID), "relay", proof.params);
                frame::encode(&params, &mut self.out);
                self.auth = LinkAuth::Proof { tx: proof.tx, rx: proof.rx };
                Ok(())
            }
            LinkAuth::Proof { mut tx, rx } => {
                if answer["request_id"] != AUTH_PROOF_ID || answer["status"] != "success" {
                    return Err(refused("proof"));
                }
                for payload in self.held.drain(..) {
                    tx.seal_frame(&payload, &mut self.out);
                }
                self.auth = LinkAuth::Ready { tx, rx };
                Ok(())
            }
            other => {
                self.auth = other;
                Ok(())
            }
        }
    }
}

/// Where a result's tensors are: what a binary answer's raw tensors are looked up at when the
/// caller wants JSON.
const RESULT_TENSORS: [&str; 2] = ["/result/hidden", "/result/logits"];

/// Our caller's answer from the next hop's (`answer`, its header, and `payload[data_at..]`, the
/// data section of a binary one): its request id, our hop first in `hops`, or the error with the
/// hop that failed; in the form our caller asked for ([`Finish::frame`]), made here when the data
/// section is small, else off the loop ([`Body::Finish`]).
fn relay_answer(p: Pending, mut answer: Value, payload: Vec<u8>, data_at: usize, now: Instant) -> Answer {
    answer["request_id"] = p.reply.request_id.clone();
    if answer["status"] == "error" {
        if answer.get("failed_hop").is_none() {
            answer["failed_hop"] = hop_json(&p.next);
        }
    } else if let Some(hops) = answer["result"]["hops"].as_array_mut() {
        let mut me = p.hop;
        me["next_rtt_ms"] = json!(now.duration_since(p.sent).as_secs_f64() * 1e3);
        hops.insert(0, me);
    }
    let big = payload.len() - data_at > FINISH_ON_LOOP;
    let finish = Finish { answer, payload, data_at, encoding: p.encoding, next: p.next };
    let body = if big { Body::Finish(finish) } else { Body::Frame(finish.frame()) };
    Answer { reply: p.reply, body }
}

fn internal_error(reply: ReplyTo, msg: &str) -> Answer {
    let v = json!({"command": "EXECUTE_TASK", "request_id": reply.request_id, "status": "error",
        "error": msg, "code": ErrorCode::Internal.as_str()});
    Answer { reply, body: Body::Frame(serde_json::to_vec(&v).expect("JSON values serialize")) }
}

fn hop_failed(reply: ReplyTo, next: &Hop, msg: &str) -> Answer {
    let body = Body::Frame(hop_failed_frame(&reply.request_id, next, msg));
    Answer { reply, body }
}

fn hop_failed_frame(request_id: &Value, next: &Hop, msg: &str) -> Vec<u8> {
    let v = json!({"command": "EXECUTE_TASK", "request_id": request_id, "status": "error",
        "error": msg, "code": ErrorCode::HopFailed.as_str(), "failed_hop": hop_json(next)});
    serde_json::to_vec(&v).expect("JSON values serialize")
}

pub fn hop_json(h: &Hop) -> Value {
    json!({"address": h.address.to_string(), "shard_id": h.shard_id})
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Relays with room for 8 in flight and 1 MiB buffered, no cluster key.
    fn relays() -> Relays {
        let limits = RelayLimits {
            max_relays: 8,
            per_client: 8,
            link_buffer: 1 << 20,
            memory: 1 << 20,
            io_timeout: Duration::from_secs(30),
        };
        Relays::new(1 << 20, None, limits)
    }

    fn outgoing(conn_id: u64, next: SocketAddr, id: u64) -> Outgoing {
        Outgoing {
            reply: ReplyTo { token: Token(7), conn_id, request_id: json!(1), reserved: 0 },
            origin: "127.0.0.1".into(),
            next: Hop { address: next, shard_id: 1 },
            id,
            payload: request_payload("EXECUTE_TASK", &json!(id), "relay", json!({})),
            hop: json!({}),
            timeout: Duration::from_secs(60),
            encoding: Encoding::Base64,
            expect: Expect { output: TaskOutput::TopK(1), hops: 1, n_vocab: 32, max_bytes: 4096 },
        }
    }

    /// A relay the inference thread submits for a command connection that closed while its step
    /// computed (the loop already withdrew that connection's relays) is dropped: no link, no
    /// relay in flight, no answer. Another connection's relay still goes out.
    #[test]
    fn a_relay_for_a_connection_closed_meanwhile_is_dropped() {
        let poll = mio::Poll::new().unwrap();
        let next = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = next.local_addr().unwrap();
        let mut relays = relays();
        let now = Instant::now();
        relays.cancel(poll.registry(), 5, now);
        let (answers, wake) = relays.submit_direct(poll.registry(), outgoing(5, addr, 1), now);
        assert!(answers.is_empty() && !wake);
        assert_eq!(relays.counts(), (0, 0), "nothing in flight, no link for a gone connection");
        let (answers, _) = relays.submit_direct(poll.registry(), outgoing(6, addr, 2), now);
        assert!(answers.is_empty());
        assert_eq!(relays.counts(), (1, 1), "another connection's relay goes out");
    }

    /// A relay whose deadline comes before the loop's next planned wake wakes it; one after does
    /// not.
    #[test]
    fn a_relay_due_before_the_loops_next_wake_wakes_it() {
        let poll = mio::Poll::new().unwrap();
        let next = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = next.local_addr().unwrap();
        let mut relays = relays();
        let now = Instant::now();
        relays.plan_wake(now + Duration::from_secs(120));
        let (_, wake) = relays.submit_direct(poll.registry(), outgoing(1, addr, 1), now);
        assert!(wake, "due in 60 s, the loop planned to sleep 120 s");
        assert_eq!(relays.plan_wake(now + Duration::from_secs(120)), now + Duration::from_secs(60));
        let (_, wake) = relays.submit_direct(poll.registry(), outgoing(1, addr, 2), now);
        assert!(!wake, "the loop already wakes for the first one's deadline");
    }
}
