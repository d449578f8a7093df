//! A blocking command-protocol client, for `shardctl`, tests and benchmarks. With a cluster
//! key it runs the handshake of [`crate::protocol::auth`] at connect and seals every frame.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Value, json};

use crate::addr::parse_peer_addr;
use crate::protocol::auth::{self, ClientHandshake, ClusterKey, FrameMac};
use crate::protocol::frame::{self, DEFAULT_MAX_FRAME};
use crate::protocol::{binary, request_payload};

pub struct Client {
    stream: TcpStream,
    next_id: u64,
    max_frame: u32,
    /// Bounds each whole answer (every frame read until the one answering the request), not
    /// only each read: a node that drips its answer a byte at a time fails by then.
    timeout: Duration,
    /// Seals our frames and opens the node's, once the handshake is done.
    tx: Option<FrameMac>,
    rx: Option<FrameMac>,
}

static DEFAULT_KEY: std::sync::OnceLock<Option<ClusterKey>> = std::sync::OnceLock::new();

/// Sets the key [`Client::connect`] authenticates with, once per process (`shardctl` sets it
/// from `--cluster-key-file` or the environment). False if it was set already.
pub fn set_default_key(key: Option<ClusterKey>) -> bool {
    DEFAULT_KEY.set(key).is_ok()
}

/// The key [`Client::connect`] uses, if any.
pub fn default_key() -> Option<&'static ClusterKey> {
    DEFAULT_KEY.get().and_then(Option::as_ref)
}

impl Client {
    /// Connects to `addr` (`HOST:PORT` or a multiaddr); every read and write
    /// is bounded by `timeout`. Authenticates with the process's default key, if set.
    pub fn connect(addr: &str, timeout: Duration) -> Result<Client> {
        Client::connect_with_key(addr, timeout, default_key())
    }

    /// As `connect`, proving `key` (none: an unauthenticated connection, which a keyed node
    /// serves `STATUS` only). Errors: the node lacks the key, or has none (open to anyone:
    /// a keyed client does not talk to it).
    pub fn connect_with_key(addr: &str, timeout: Duration, key: Option<&ClusterKey>) -> Result<Client> {
        let mut client = Client::connect_plain(addr, timeout)?;
        if let Some(key) = key {
            client.authenticate(key).with_context(|| format!("authenticating to {addr}"))?;
        }
        Ok(client)
    }

    fn connect_plain(addr: &str, timeout: Duration) -> Result<Client> {
        let peer = parse_peer_addr(addr).map_err(|e| anyhow!(e))?;
        let addrs: Vec<_> =
            (peer.host.as_str(), peer.port).to_socket_addrs().with_context(|| format!("resolving {peer}"))?.collect();
        let mut last = None;
        for a in addrs {
            match TcpStream::connect_timeout(&a, timeout) {
                Ok(stream) => {
                    stream.set_read_timeout(Some(timeout))?;
                    stream.set_write_timeout(Some(timeout))?;
                    let _ = stream.set_nodelay(true);
                    return Ok(Client {
                        stream,
                        next_id: 1,
                        max_frame: DEFAULT_MAX_FRAME,
                        timeout,
                        tx: None,
                        rx: None,
                    });
                }
                Err(e) => last = Some(e),
            }
        }
        Err(match last {
            Some(e) => anyhow!("connecting to {peer}: {e} (is shard_listener running there?)"),
            None => anyhow!("{peer} resolves to no address"),
        })
    }

    /// The cluster-key handshake: hello, send our proof, check the node's in its sealed answer;
    /// every frame after the hello's answer is sealed.
    fn authenticate(&mut self, key: &ClusterKey) -> Result<()> {
        let nonce = auth::random_bytes::<{ auth::NONCE_LEN }>().context("reading /dev/urandom")?;
        let hs = ClientHandshake::new(key.clone(), nonce);
        let hello = self.request_from("AUTH", hs.hello_params(), "shardctl")?;
        if hello["code"] == "AUTH_UNAVAILABLE" {
            bail!("the node has no cluster key (it is open to anyone); refusing to use it with a key");
        }
        let challenge = into_result(hello).context("the node refused the handshake")?;
        let proof = hs.answer(&challenge).map_err(|e| anyhow!("{e}"))?;
        let id = json!(format!("ctl-{}", self.next_id));
        self.next_id += 1;
        self.send_payload(&request_payload("AUTH", &id, "shardctl", proof.params.clone()))?;
        (self.tx, self.rx) = (Some(proof.tx.clone()), Some(proof.rx.clone()));
        let answer = into_result(self.read_proof_answer()?).context("the node refused our proof")?;
        // The node proves the key only now, after us: nothing is trusted before this check.
        if let Err(e) = proof.check_node(&answer) {
            (self.tx, self.rx) = (None, None);
            bail!("the node did not prove the cluster key: {e}");
        }
        Ok(())
    }

    /// Whether this connection proved the cluster key.
    pub fn authenticated(&self) -> bool {
        self.tx.is_some()
    }

    /// Sends a request and returns the whole response object.
    pub fn request(&mut self, command: &str, params: Value) -> Result<Value> {
        self.request_from(command, params, "shardctl")
    }

    /// As `request`, naming the sender (`from`): sessions belong to the coordinator that
    /// started them.
    pub fn request_from(&mut self, command: &str, params: Value, from: &str) -> Result<Value> {
        let id = json!(format!("ctl-{}", self.next_id));
        self.next_id += 1;
        self.send_payload(&request_payload(command, &id, from, params))?;
        let bounds = Bounds::within(self.timeout);
        loop {
            let response = self.read_response_by(&bounds)?;
            if response.get("request_id") == Some(&id) {
                return Ok(response);
            }
        }
    }

    /// As `request_from`, for a request that may be answered with a binary frame (it asks
    /// `encoding_format: "binary"`): the response object and its data section (empty for a JSON
    /// answer), where its raw tensors are (read them with
    /// [`crate::protocol::tensor::f32_from_json_in`]).
    pub fn request_parts(&mut self, command: &str, params: Value, from: &str) -> Result<(Value, Vec<u8>)> {
        let bounds = Bounds::within(self.timeout);
        self.request_parts_by(command, params, from, &bounds)
    }

    /// As `request_parts`, within `bounds`: the whole answer by its deadline, no frame over its
    /// `max_answer` bytes (refused from its length prefix, before it is read), and given up
    /// as soon as its `cancel` flag is set. Errors: [`AnswerTimedOut`] and [`Cancelled`] (find
    /// them with `e.downcast_ref` / `e.chain()`), a frame over the bound, and the node's I/O
    /// errors. After any error the connection is mid-answer: drop it.
    pub fn request_parts_by(
        &mut self,
        command: &str,
        params: Value,
        from: &str,
        bounds: &Bounds,
    ) -> Result<(Value, Vec<u8>)> {
        let id = json!(format!("ctl-{}", self.next_id));
        self.next_id += 1;
        self.send_payload(&request_payload(command, &id, from, params))?;
        loop {
            let payload = self.read_payload_by(bounds)?;
            let (response, data) = if binary::is_binary(&payload) {
                let parts = binary::split(&payload).map_err(|e| anyhow!("response from the node: {e}"))?;
                let v: Value = serde_json::from_slice(parts.header).context("response header is not JSON")?;
                (v, parts.data.to_vec())
            } else {
                (serde_json::from_slice(&payload).context("response is not JSON")?, Vec::new())
            };
            if response.get("request_id") == Some(&id) {
                return Ok((response, data));
            }
        }
    }

    /// Sends a request and returns its `result`, or its error as an `Err`.
    pub fn call(&mut self, command: &str, params: Value) -> Result<Value> {
        into_result(self.request(command, params)?)
    }

    /// The address this client is connected to.
    pub fn peer_addr(&self) -> Result<std::net::SocketAddr> {
        Ok(self.stream.peer_addr()?)
    }

    /// Bounds every later read and write by `timeout`.
    pub fn set_timeout(&mut self, timeout: Duration) -> Result<()> {
        self.timeout = timeout;
        self.stream.set_read_timeout(Some(timeout))?;
        self.stream.set_write_timeout(Some(timeout))?;
        Ok(())
    }

    pub fn send_payload(&mut self, payload: &[u8]) -> Result<()> {
        let mut wire = Vec::with_capacity(payload.len() + 4 + auth::TAG_LEN);
        match &mut self.tx {
            Some(tx) => tx.seal_frame(payload, &mut wire),
            None => frame::encode(payload, &mut wire),
        }
        self.stream.write_all(&wire).context("sending the request")
    }

    /// Reads one response frame; a binary one ([`binary`]) comes back as JSON, its raw result
    /// tensors in base64.
    pub fn read_response(&mut self) -> Result<Value> {
        let bounds = Bounds::within(self.timeout);
        self.read_response_by(&bounds)
    }

    fn read_response_by(&mut self, bounds: &Bounds) -> Result<Value> {
        let payload = self.read_payload_by(bounds)?;
        if binary::is_binary(&payload) {
            return binary::to_json(&payload, &["/result/hidden", "/result/logits"])
                .map_err(|(_, e)| anyhow!("response from the node: {e}"));
        }
        serde_json::from_slice(&payload).context("response is not JSON")
    }

    /// One response frame's payload, opened when the connection is sealed.
    fn read_payload_by(&mut self, bounds: &Bounds) -> Result<Vec<u8>> {
        let payload = self.read_frame_body(bounds)?;
        match &mut self.rx {
            Some(rx) => Ok(rx.open(&payload).map_err(|e| anyhow!("response from the node: {e}"))?.to_vec()),
            None => Ok(payload),
        }
    }

    /// The answer to our `AUTH` proof: sealed when the node accepted it; a refusal comes plain
    /// (the node has no keys for a client that did not prove the key), and only a refusal is
    /// taken plain.
    fn read_proof_answer(&mut self) -> Result<Value> {
        let payload = self.read_frame_body(&Bounds::within(self.timeout))?;
        let rx = self.rx.as_mut().expect("set before the proof is sent");
        if let Ok(opened) = rx.open(&payload) {
            return serde_json::from_slice(opened).context("response is not JSON");
        }
        match serde_json::from_slice::<Value>(&payload) {
            Ok(v) if v["status"] == "error" => Ok(v),
            _ => bail!("response from the node: {}", auth::AuthError::BadMac),
        }
    }

    /// One frame's body, read whole within `bounds`; its buffer grows with the bytes that came
    /// (never to what the length prefix claims before they do).
    fn read_frame_body(&mut self, bounds: &Bounds) -> Result<Vec<u8>> {
        let mut len = [0u8; 4];
        self.read_exact_by(&mut len, bounds).context("reading a response (did the node close the connection?)")?;
        let len = u32::from_be_bytes(len) as usize;
        let limit = (self.max_frame as usize).min(bounds.max_answer);
        if len > limit {
            let what = if limit < self.max_frame as usize { "what was asked allows" } else { "the frame limit" };
            bail!("response frame of {len} bytes exceeds {limit} bytes ({what}); not read");
        }
        let mut payload = Vec::with_capacity(len.min(1 << 20));
        while payload.len() < len {
            let have = payload.len();
            payload.resize((have + (1 << 20)).min(len), 0);
            self.read_exact_by(&mut payload[have..], bounds).context("reading a response body")?;
        }
        Ok(payload)
    }

    /// Fills `buf` by `bounds.deadline`, checking `bounds.cancel` at least every
    /// [`CANCEL_POLL`].
    fn read_exact_by(&mut self, buf: &mut [u8], bounds: &Bounds) -> Result<()> {
        let mut done = 0;
        while done < buf.len() {
            if bounds.cancelled() {
                return Err(anyhow::Error::new(Cancelled));
            }
            let now = Instant::now();
            if now >= bounds.deadline {
                return Err(anyhow::Error::new(AnswerTimedOut(bounds.within)));
            }
            let mut wait = bounds.deadline - now;
            if bounds.cancel.is_some() {
                wait = wait.min(CANCEL_POLL);
            }
            self.stream.set_read_timeout(Some(wait.max(Duration::from_millis(1))))?;
            match self.stream.read(&mut buf[done..]) {
                Ok(0) => return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into()),
                Ok(n) => done += n,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut | std::io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
}

/// How often a read waiting on a cancellable answer checks its flag.
pub const CANCEL_POLL: Duration = Duration::from_millis(100);

/// What bounds one answer: a deadline for all of it, its largest frame, and a flag that abandons
/// it (a client that went away).
pub struct Bounds<'a> {
    pub deadline: Instant,
    /// The wait the deadline was set from (for the error).
    pub within: Duration,
    /// The largest frame taken (bytes); `--max-frame`'s default bounds every frame besides.
    pub max_answer: usize,
    pub cancel: Option<&'a AtomicBool>,
}

impl<'a> Bounds<'a> {
    /// The whole answer within `within` from now; any frame up to the frame limit.
    pub fn within(within: Duration) -> Bounds<'a> {
        Bounds { deadline: Instant::now() + within, within, max_answer: usize::MAX, cancel: None }
    }

    fn cancelled(&self) -> bool {
        self.cancel.is_some_and(|c| c.load(Ordering::Relaxed))
    }
}

/// The answer did not arrive whole within the wait (the node is silent, or sends too slowly).
#[derive(Debug)]
pub struct AnswerTimedOut(pub Duration);

impl std::fmt::Display for AnswerTimedOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "no whole answer within {} ms (the node is silent or sends too slowly)", self.0.as_millis())
    }
}

impl std::error::Error for AnswerTimedOut {}

/// The request was abandoned: its cancel flag was set (the client it was for went away).
#[derive(Debug)]
pub struct Cancelled;

impl std::fmt::Display for Cancelled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("cancelled: the client went away")
    }
}

impl std::error::Error for Cancelled {}

/// A response's `result`, or an error saying its code and message.
pub fn into_result(response: Value) -> Result<Value> {
    match response.get("status").and_then(Value::as_str) {
        Some("success") => Ok(response.get("result").cloned().unwrap_or(Value::Null)),
        Some("error") => Err(anyhow!(
            "{} ({})",
            response.get("error").and_then(Value::as_str).unwrap_or("unknown error"),
            response.get("code").and_then(Value::as_str).unwrap_or("NO_CODE")
        )),
        _ => Err(anyhow!("malformed response: {response}")),
    }
}
