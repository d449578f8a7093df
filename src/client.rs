//! A blocking command-protocol client, for `shardctl`, tests and benchmarks. With a cluster
//! key it runs the handshake of [`crate::protocol::auth`] at connect and seals every frame.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

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
                    return Ok(Client { stream, next_id: 1, max_frame: DEFAULT_MAX_FRAME, tx: None, rx: None });
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
        loop {
            let response = self.read_response()?;
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
        let id = json!(format!("ctl-{}", self.next_id));
        self.next_id += 1;
        self.send_payload(&request_payload(command, &id, from, params))?;
        loop {
            let payload = self.read_payload()?;
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
        let payload = self.read_payload()?;
        if binary::is_binary(&payload) {
            return binary::to_json(&payload, &["/result/hidden", "/result/logits"])
                .map_err(|(_, e)| anyhow!("response from the node: {e}"));
        }
        serde_json::from_slice(&payload).context("response is not JSON")
    }

    /// One response frame's payload, opened when the connection is sealed.
    fn read_payload(&mut self) -> Result<Vec<u8>> {
        let payload = self.read_frame_body()?;
        match &mut self.rx {
            Some(rx) => Ok(rx.open(&payload).map_err(|e| anyhow!("response from the node: {e}"))?.to_vec()),
            None => Ok(payload),
        }
    }

    /// The answer to our `AUTH` proof: sealed when the node accepted it; a refusal comes plain
    /// (the node has no keys for a client that did not prove the key), and only a refusal is
    /// taken plain.
    fn read_proof_answer(&mut self) -> Result<Value> {
        let payload = self.read_frame_body()?;
        let rx = self.rx.as_mut().expect("set before the proof is sent");
        if let Ok(opened) = rx.open(&payload) {
            return serde_json::from_slice(opened).context("response is not JSON");
        }
        match serde_json::from_slice::<Value>(&payload) {
            Ok(v) if v["status"] == "error" => Ok(v),
            _ => bail!("response from the node: {}", auth::AuthError::BadMac),
        }
    }

    fn read_frame_body(&mut self) -> Result<Vec<u8>> {
        let mut len = [0u8; 4];
        self.stream.read_exact(&mut len).context("reading a response (did the node close the connection?)")?;
        let len = u32::from_be_bytes(len);
        if len > self.max_frame {
            bail!("response frame of {len} bytes exceeds {} bytes", self.max_frame);
        }
        let mut payload = vec![0u8; len as usize];
        self.stream.read_exact(&mut payload).context("reading a response body")?;
        Ok(payload)
    }
}

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
