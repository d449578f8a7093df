//! A blocking command-protocol client, for `shardctl`, tests and benchmarks.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Value, json};

use crate::addr::parse_peer_addr;
use crate::protocol::frame::{self, DEFAULT_MAX_FRAME};
use crate::protocol::request_payload;

pub struct Client {
    stream: TcpStream,
    next_id: u64,
    max_frame: u32,
}

impl Client {
    /// Connects to `addr` (`HOST:PORT` or a multiaddr); every read and write
    /// is bounded by `timeout`.
    pub fn connect(addr: &str, timeout: Duration) -> Result<Client> {
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
                    return Ok(Client { stream, next_id: 1, max_frame: DEFAULT_MAX_FRAME });
                }
                Err(e) => last = Some(e),
            }
        }
        Err(match last {
            Some(e) => anyhow!("connecting to {peer}: {e} (is shard_listener running there?)"),
            None => anyhow!("{peer} resolves to no address"),
        })
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
        let mut wire = Vec::with_capacity(payload.len() + 4);
        frame::encode(payload, &mut wire);
        self.stream.write_all(&wire).context("sending the request")
    }

    /// Reads one response frame.
    pub fn read_response(&mut self) -> Result<Value> {
        let mut len = [0u8; 4];
        self.stream.read_exact(&mut len).context("reading a response (did the node close the connection?)")?;
        let len = u32::from_be_bytes(len);
        if len > self.max_frame {
            bail!("response frame of {len} bytes exceeds {} bytes", self.max_frame);
        }
        let mut payload = vec![0u8; len as usize];
        self.stream.read_exact(&mut payload).context("reading a response body")?;
        serde_json::from_slice(&payload).context("response is not JSON")
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
