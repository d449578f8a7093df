//! Command handlers: what the node answers to each request, and what it does
//! with the scan's and the workers' reports.

use std::path::PathBuf;
use std::time::Instant;

use mio::Token;
use serde_json::{Value, json};

use super::catalog::{LoadedShard, load_shard};
use super::inference::{CancelAnswer, Job, ReplyTo, ShardFile, Tenure};
use super::scan::ScanEvent;
use super::{Node, NodeEvent, Waiter};
use crate::hash::to_hex;
use crate::protocol::{
    Command, ErrorCode, ExecuteTask, LoadShard, Request, RequestError, error_payload, success_payload,
};
use crate::{info, warn};

impl Node {
    /// Answers one parsed (or unparseable) request.
    pub(super) fn dispatch(&mut self, token: Token, request: Result<Request, RequestError>) {
        let request = match request {
            Ok(r) => r,
            Err(e) => {
                self.respond(token, &e.to_frame_payload());
                return;
            }
        };
        let name = request.command.name();
        let id = request.request_id;
        let Some(conn) = self.conn(token) else { return };
        if !conn.auth.authorized() && !matches!(request.command, Command::Status | Command::Auth(_)) {
            let msg = format!(
                "{name} needs the cluster key: this node runs with --cluster-key-file, so every command but \
                 STATUS must come on a connection that proved it (AUTH handshake; shardctl: --cluster-key-file)"
            );
            return self.respond(token, &error_payload(json!(name), id, ErrorCode::AuthRequired, &msg));
        }
        match request.command {
            Command::ListFiles => {
                let files: Vec<Value> = self.catalog.files.values().map(|f| self.file_json(f)).collect();
                self.respond(token, &success_payload(name, &id, json!({ "files": files })));
            }
            Command::Status if !conn.auth.authorized() => {
                let payload = success_payload(name, &id, self.public_status());
                self.respond(token, &payload);
            }
            Command::Status => {
                let payload = self.status_payload(&id);
                self.respond(token, &payload);
            }
            Command::LoadShard(params) => self.load_shard_command(token, id, params),
            Command::FindPeers(key) => {
                // The cluster's keys only on BEP 42-valid nodes (dht::node_id).
                let secure = !matches!(key, crate::protocol::PeersKey::Hash(_));
                let key = match key {
                    crate::protocol::PeersKey::Hash(h) => crate::dht::krpc::Id(h.0),
                    crate::protocol::PeersKey::Shard(n) => {
                        let file = self.catalog.manifest_name(n).unwrap_or_else(|| format!("shard-{n}.gguf"));
                        super::dht_glue::name_key(&self.config.cluster, &file)
                    }
                    crate::protocol::PeersKey::Cluster => super::dht_glue::cluster_key(&self.config.cluster),
                };
                if !self.find_peers_command(token, id.clone(), key, secure) {
                    let msg = "the DHT is not running on this node";
                    self.respond(token, &error_payload(json!(name), id, ErrorCode::TorrentUnavailable, msg));
                }
            }
            Command::ExecuteTask(task) => self.execute_task_command(token, id, request.from, task),
            Command::Auth(step) => self.auth_command(token, id, step),
            Command::GetManifest { hash } => {
                let payload = match &self.catalog.manifest_bytes {
                    Some((bytes, h)) if *h == hash => {
                        let text = String::from_utf8_lossy(bytes);
                        success_payload(name, &id, json!({"hash": to_hex(h), "manifest": text}))
                    }
                    _ => {
                        let msg = format!("this node holds no manifest with SHA-256 {}", to_hex(&hash));
                        error_payload(json!(name), id, ErrorCode::ShardNotFound, &msg)
                    }
                };
                self.respond(token, &payload);
            }
            Command::ModelInfo => self.model_info_command(token, id),
            Command::EndSession { session_id, session_token } => {
                let Some(reply) = self.defer(token, id) else { return };
                // The client's key, as `EXECUTE_TASK` gives it (a session's queued steps' wins).
                let origin = self.conn(token).map(|c| client_key(c.peer)).unwrap_or_default();
                self.inference.submit(Job::EndSession { reply, session_id, session_token, origin });
            }
            Command::Cancel { request_ids } => {
                // Answered by the inference thread, after the `CANCELLED` answers of the steps it
                // withdraws from its queue: the answer lists what this CANCEL withdrew.
                let Some(reply) = self.defer(token, id) else { return };
                let (withdrawn, relays) = self.cancel_command(token, &request_ids);
                let conn_id = reply.conn_id;
                self.inference.cancel_requests(conn_id, request_ids, CancelAnswer { reply, withdrawn, relays });
            }
            Command::Download(params) => {
                let caller = self.caller(token);
                let payload = match self.download_command(params, &caller) {
                    Ok(result) => success_payload(name, &id, result),
                    Err((code, msg)) => error_payload(json!(name), id, code, &msg),
                };
                self.respond(token, &payload);
            }
        }
    }

    /// Runs a task on the inference worker, which answers with `NodeEvent::Answer` (after the
    /// rest of the chain, when the task names `next` hops). A shard not loaded is loaded first,
    /// unless the task says `load: false`.
    fn execute_task_command(&mut self, token: Token, id: Value, from: Option<String>, task: ExecuteTask) {
        let fail = |node: &mut Node, id: Value, code, msg: &str| {
            node.respond(token, &error_payload(json!("EXECUTE_TASK"), id, code, msg));
        };
        if let Some(why) = self.route_loop(&task) {
            return fail(self, id, ErrorCode::BadRoute, &why);
        }
        if !self.catalog.loaded.contains_key(&task.shard_id) {
            if !task.load {
                let msg = format!("shard {} is not loaded on this node (send LOAD_SHARD first)", task.shard_id);
                return fail(self, id, ErrorCode::ShardNotLoaded, &msg);
            }
            let p =
                LoadShard { shard_id: task.shard_id, info_hash: None, wait: true, filename: None, peers: Vec::new() };
            let caller = self.caller_naming(token, task.origin.as_deref());
            if let Err((code, msg)) = self.begin_load(task.shard_id, &p, &caller) {
                return fail(self, id, code, &msg);
            }
            let Some(reply) = self.defer_reserving(token, id, super::conn::answer_estimate(&task)) else { return };
            self.pending_tasks.entry(task.shard_id).or_default().push((reply, from, task, Instant::now()));
            return;
        }
        let Some(reply) = self.defer_reserving(token, id, super::conn::answer_estimate(&task)) else { return };
        self.submit_task(reply, from, task, Instant::now());
    }

    fn submit_task(&mut self, reply: ReplyTo, from: Option<String>, task: ExecuteTask, queued: Instant) {
        let Some(shard) = self.catalog.loaded.get(&task.shard_id) else {
            let msg = format!("shard {} is not loaded on this node", task.shard_id);
            let payload =
                error_payload(json!("EXECUTE_TASK"), reply.request_id.clone(), ErrorCode::ShardNotLoaded, &msg);
            return self.on_answer(reply.token, reply.conn_id, reply.reserved, &payload);
        };
        let info_hash =
            self.catalog.files.get(&shard.filename).and_then(|f| f.meta.as_ref()).map(|m| m.info_hash.to_hex());
        let weights =
            ShardFile { map: shard.map.clone(), file: shard.file.clone(), path: shard.path.clone(), info_hash };
        // The address the caller reached us at (the bind address may be 0.0.0.0), asked of the
        // socket once per connection.
        let me = self
            .conn(reply.token)
            .and_then(|c| *c.local_addr.get_or_insert_with(|| c.stream.local_addr().ok()))
            .unwrap_or(self.local_addr);
        // The per-client quota's key: a keyed relay names its caller; anyone else is known by
        // address (and port on loopback, where every test client shares the IP), whatever
        // `origin` it names. Only a keyed relay's sessions belong to its chain; on a node without
        // a key a request naming an `origin` says it relays, which nothing proves: its sessions
        // outlive the connection only while they are used (see `Tenure`).
        let (origin, tenure) = match (self.conn(reply.token), &task.origin) {
            (Some(c), Some(o)) if c.auth.established() => (o.clone(), Tenure::Chain),
            (Some(c), Some(_)) => (client_key(c.peer), Tenure::Claimed),
            (Some(c), _) => (client_key(c.peer), Tenure::Connection),
            (None, o) => (o.clone().unwrap_or_default(), Tenure::Connection),
        };
        let job = Job::Execute { reply, task, from, origin, tenure, shard: weights, queued, me, prefix: None };
        self.inference.submit(job);
    }

    /// Why a task's route would visit a hop twice (this node's hop included), if it would.
    fn route_loop(&self, task: &ExecuteTask) -> Option<String> {
        let mut seen = std::collections::HashSet::new();
        let port = self.local_addr.port();
        for hop in &task.next {
            let me = hop.address.port() == port
                && (hop.address.ip().is_loopback()
                    || hop.address.ip().is_unspecified()
                    || hop.address.ip() == self.local_addr.ip());
            if me && hop.shard_id == task.shard_id {
                return Some(format!("next sends shard {} back to this node: a loop", hop.shard_id));
            }
            if !seen.insert((hop.address, hop.shard_id)) {
                return Some(format!("next names {} for shard {} twice: a loop", hop.address, hop.shard_id));
            }
        }
        None
    }

    /// Tasks waiting for their shard's load: run them, or tell them why not.
    fn run_pending_tasks(&mut self, shard_id: u32, error: Option<(ErrorCode, String)>) {
        for (reply, from, task, queued) in self.pending_tasks.remove(&shard_id).unwrap_or_default() {
            match &error {
                None => self.submit_task(reply, from, task, queued),
                Some((code, msg)) => {
                    let payload = error_payload(json!("EXECUTE_TASK"), reply.request_id.clone(), *code, msg);
                    self.on_answer(reply.token, reply.conn_id, reply.reserved, &payload);
                }
            }
        }
    }

    /// The model's shape and tokenizer, read from a loaded shard's map or a shard file on a worker.
    fn model_info_command(&mut self, token: Token, id: Value) {
        let source = match self.catalog.loaded.values().next() {
            Some(s) => Ok(s.map.clone()),
            None => match self.catalog.files.values().find(|f| f.gguf.is_ok()) {
                Some(f) => Err(f.path.clone()),
                None => {
                    let msg = "this node has no GGUF file to describe the model from";
                    return self.respond(token, &error_payload(json!("MODEL_INFO"), id, ErrorCode::ShardNotFound, msg));
                }
            },
        };
        let Some(reply) = self.defer(token, id) else { return };
        let (tx, waker, ctx_size) = (self.events_tx.clone(), self.waker.clone(), self.config.ctx_size);
        self.pool.handle().submit(move || {
            let payload = match super::inference::model_info(source, ctx_size) {
                Ok(result) => success_payload("MODEL_INFO", &reply.request_id, result),
                Err(e) => error_payload(json!("MODEL_INFO"), reply.request_id.clone(), ErrorCode::ShardInvalid, &e),
            };
            let _ = tx.send(NodeEvent::Answer {
                token: reply.token,
                conn_id: reply.conn_id,
                reserved: reply.reserved,
                payload,
            });
            let _ = waker.wake();
        });
    }

    /// A step of the cluster-key handshake (`protocol::auth`). A failed step closes the
    /// connection; a node without a key says so and keeps it open.
    fn auth_command(&mut self, token: Token, id: Value, step: crate::protocol::auth::AuthStep) {
        use crate::protocol::auth::{AuthStep, NONCE_LEN, random_bytes};
        let Some(key) = self.config.cluster_key.clone() else {
            let msg = "this node has no cluster key: it is open to anyone (no AUTH needed)";
            return self.respond(token, &error_payload(json!("AUTH"), id, ErrorCode::AuthUnavailable, msg));
        };
        let now = Instant::now();
        let Some(conn) = self.conn(token) else { return };
        let outcome = match step {
            AuthStep::Hello { client_nonce } => match random_bytes::<NONCE_LEN>() {
                Ok(node_nonce) => conn.auth.hello(&key, &client_nonce, &node_nonce, now).map_err(|e| e.to_string()),
                Err(e) => Err(format!("no randomness for a nonce: {e}")),
            },
            AuthStep::Proof { client_proof } => conn.auth.proof(&key, &client_proof).map_err(|e| e.to_string()),
        };
        let peer = conn.peer;
        match outcome {
            Ok(result) => self.respond(token, &success_payload("AUTH", &id, result)),
            Err(msg) => {
                warn!("conn from {peer}: cluster-key handshake failed: {msg}; closing");
                self.respond(
                    token,
                    &error_payload(json!("AUTH"), id, ErrorCode::AuthFailed, &format!("{msg}; closing")),
                );
                if let Some(conn) = self.conn(token) {
                    conn.discard_input();
                    conn.close_after_flush = true;
                }
            }
        }
    }

    /// Counts a request as in flight on its connection and says where its answer goes.
    fn defer(&mut self, token: Token, request_id: Value) -> Option<ReplyTo> {
        self.defer_reserving(token, request_id, 0)
    }

    /// As [`Node::defer`], holding `reserved` bytes of the connection's answer budget
    /// ([`conn::ANSWER_BUDGET`]) until the answer is queued: answers being computed count
    /// against the connection's output before they exist.
    fn defer_reserving(&mut self, token: Token, request_id: Value, reserved: usize) -> Option<ReplyTo> {
        let conn = self.conn(token)?;
        conn.in_flight += 1;
        conn.reserved += reserved;
        Some(ReplyTo { token, conn_id: conn.id, request_id, reserved })
    }

    /// A worker's answer: sent if its connection is still the one that asked.
    pub(super) fn on_answer(&mut self, token: Token, conn_id: u64, reserved: usize, payload: &[u8]) {
        let Some(conn) = self.conn(token).filter(|c| c.id == conn_id) else { return };
        let was_paused = conn.backpressured();
        conn.in_flight -= 1;
        conn.reserved -= reserved;
        self.respond(token, payload);
        self.resume_or_settle(token, was_paused);
    }

    /// STATUS answers are frequent (health checks, benchmarks): everything
    /// but the clock, the connection count and transfers is serialized once
    /// per change of state (`status_cache` is cleared by scan and load events).
    fn status_payload(&mut self, request_id: &Value) -> Vec<u8> {
        if self.status_cache.is_none() {
            let mut fixed = serde_json::to_vec(&self.status()).expect("JSON values serialize");
            fixed.pop(); // the closing '}'; the live fields follow
            self.status_cache = Some(fixed);
        }
        let fixed = self.status_cache.as_deref().expect("just filled");
        let mut out = Vec::with_capacity(fixed.len() + 128);
        crate::protocol::success_prefix("STATUS", request_id, &mut out);
        out.extend_from_slice(fixed);
        // One read of the counters: the top-level `sessions` is `inference.sessions`.
        let inference = self.inference.stats.to_json();
        // Read at once: the inference thread takes the same lock to submit a relay.
        let (relays_in_flight, links, binary_links, refused, cancelled_down, finished_off_loop) = {
            let r = self.relays.lock();
            (r.counts().0, r.counts().1, r.binary_links(), r.refused, r.cancelled_down, r.finished_off_loop)
        };
        let live = format!(
            ",\"uptime_ms\":{},\"sessions\":{},\"connections\":{},\"connection_counts\":{},\"encryption\":{},\"uploaded\":{},\"downloads\":{},\"peer_wire\":{},\"dht\":{},\
            \"inference\":{},\"relays\":{{\"in_flight\":{},\"links\":{},\"binary_links\":{},\"refused\":{},\"cancelled_down\":{},\"finished_off_loop\":{}}}}}}}",
            self.started.elapsed().as_millis(),
            inference["sessions"],
            self.census.total(),
            self.census.to_json(),
            self.mse.to_json(self.config.encryption),
            self.uploaded_total(),
            self.downloads_json(),
            self.peer_wire_json(),
            self.dht_status(),
            inference,
            relays_in_flight,
            links,
            binary_links,
            refused,
            cancelled_down,
            finished_off_loop,
        );
        out.extend_from_slice(live.as_bytes());
        out
    }

    /// STATUS for a connection that has not proved the cluster key of a keyed node: only what
    /// identifies the node and what a client needs to connect (no paths, downloads, peers,
    /// addresses or counters).
    fn public_status(&self) -> Value {
        let mut limits = self.config.limits_json();
        limits["unauthenticated_max_frame"] = json!(super::UNAUTHENTICATED_MAX_FRAME);
        json!({
            "node_id": to_hex(&self.node_id),
            "cluster": self.config.cluster,
            "version": env!("CARGO_PKG_VERSION"),
            "auth": {
                "cluster_key": self.config.cluster_key.is_some(),
                "open_to_anyone": self.config.cluster_key.is_none(),
                "scheme": self.config.cluster_key.as_ref().map(|_| crate::protocol::auth::SCHEME),
                "private_swarms": self.config.private,
                "required": true,
            },
            "limits": limits,
            "uptime_ms": self.started.elapsed().as_millis() as u64,
            "partial": "authenticate (AUTH) for the full STATUS",
        })
    }

    /// The parts of STATUS that change only with the node's state.
    fn status(&self) -> Value {
        let meta_ready = self.catalog.files.values().filter(|f| f.meta.is_some()).count();
        let scan = self.scan.done.map(|s| {
            json!({
                "elapsed_ms": s.elapsed.as_secs_f64() * 1e3,
                "bytes_hashed": s.bytes_hashed,
                "hash_rate_mb_s": if s.elapsed.is_zero() { 0.0 } else { s.bytes_hashed as f64 / 1e6 / s.elapsed.as_secs_f64() },
            })
        });
        let mut limits = self.config.limits_json();
        limits["unauthenticated_max_frame"] = json!(super::UNAUTHENTICATED_MAX_FRAME);
        json!({
            "node_id": to_hex(&self.node_id),
            "address": self.local_addr.to_string(),
            "cluster": self.config.cluster,
            "version": env!("CARGO_PKG_VERSION"),
            "shard_id": self.config.shard_id,
            "total_shards": self.config.total_shards,
            "torrent_enabled": self.config.enable_torrent,
            "bootstrap": self.config.bootstrap.iter().map(|b| b.to_string()).collect::<Vec<_>>(),
            "shards_dir": self.config.shards_dir.display().to_string(),
            "shards_seeded": self.catalog.files.values().filter(|f| f.meta.is_some()).map(|f| &f.filename).collect::<Vec<_>>(),
            "shards_loaded": self.catalog.loaded.values().map(|s| json!({
                "shard_id": s.shard_id,
                "filename": s.filename,
                "layers": s.summary.layers.map(|(b, e)| [b, e]),
                "bytes": s.map.len(),
            })).collect::<Vec<_>>(),
            "metadata": {
                "files": self.catalog.files.len(),
                "ready": meta_ready,
                "cached": self.scan.cached,
                "hashed": self.scan.hashed,
                "scan_done": self.scan.done.is_some(),
                "scan": scan,
            },
            "hash_workers": self.config.hash_workers,
            "download_limits": {
                "max_downloads": self.config.max_downloads,
                "max_downloads_per_client": self.config.max_downloads_per_client,
                "max_downloads_strangers": strangers_download_cap(self.config.max_downloads),
                "max_download_peers": self.config.max_download_peers,
                "disk_budget": self.config.disk_budget,
                "disk_reserve": self.config.disk_reserve,
                "part_expiry_s": self.config.part_expiry.as_secs(),
                "redial_give_up_s": self.config.redial_give_up.as_secs(),
                "download_stall_timeout_s": self.config.download_stall_timeout.as_secs(),
            },
            "auth": {
                "cluster_key": self.config.cluster_key.is_some(),
                "open_to_anyone": self.config.cluster_key.is_none(),
                "scheme": self.config.cluster_key.as_ref().map(|_| crate::protocol::auth::SCHEME),
                "private_swarms": self.config.private,
            },
            "model": self.model_status(),
            "limits": limits,
        })
    }

    fn load_shard_command(&mut self, token: Token, request_id: Value, mut p: LoadShard) {
        let reply_err = |node: &mut Node, code: ErrorCode, msg: String| {
            node.respond(token, &error_payload(json!("LOAD_SHARD"), request_id.clone(), code, &msg));
        };
        let id = p.shard_id;
        // Pinned: the manifest's info hash is the only one this shard may have.
        if self.config.model_pin.is_some()
            && let Some(pinned) = self.catalog.manifest_hash(id)
        {
            if let Some(asked) = p.info_hash.filter(|h| *h != pinned) {
                let msg = format!("info_hash {asked} is not shard {id} of the pinned model ({pinned})");
                return reply_err(self, ErrorCode::ManifestMismatch, msg);
            }
            p.info_hash = Some(pinned);
        }
        if let Some(total) = self.config.total_shards
            && id >= total
        {
            return reply_err(
                self,
                ErrorCode::OutOfRange,
                format!("shard_id {id} is not below --total-shards {total}"),
            );
        }
        // A loaded shard whose file changed length is dropped and loaded again.
        if self
            .catalog
            .loaded
            .get(&id)
            .is_some_and(|l| l.file.metadata().map(|m| m.len()).ok() != Some(l.map.len() as u64))
        {
            warn!("shard {id}: its file changed on disk; loading it again");
            self.catalog.loaded.remove(&id);
            self.status_cache = None;
        }
        if let Some(loaded) = self.catalog.loaded.get(&id) {
            let same_file = p.filename.as_ref().is_none_or(|f| *f == loaded.filename);
            let loaded_hash =
                self.catalog.files.get(&loaded.filename).and_then(|f| f.meta.as_ref()).map(|m| m.info_hash);
            let same_hash = p.info_hash.is_none_or(|h| loaded_hash == Some(h));
            if same_file && same_hash {
                let result = loaded_json(loaded, "cache", Instant::now());
                return self.respond(token, &success_payload("LOAD_SHARD", &request_id, result));
            }
        }
        let started = Instant::now();
        let caller = self.caller(token);
        let path = match self.begin_load(id, &p, &caller) {
            Ok(path) => path,
            Err((code, msg)) => return reply_err(self, code, msg),
        };
        if !p.wait {
            let result = json!({"shard_id": id, "status": "loading", "path": path.display().to_string()});
            self.respond(token, &success_payload("LOAD_SHARD", &request_id, result));
            return;
        }
        let conn_id = self.conn(token).map_or(0, |c| c.id);
        if let Some(c) = self.conn(token) {
            c.in_flight += 1;
        }
        self.loading.entry(id).or_default().push(Waiter { token, conn_id, request_id, started });
    }

    /// Starts loading shard `id` (from the shards dir, or downloading it first) unless a load is
    /// under way; `on_loaded` answers whoever waits in `loading`. Returns the file's path.
    /// `caller` is charged with a download this starts (`--max-downloads-per-client`).
    fn begin_load(&mut self, id: u32, p: &LoadShard, caller: &Caller) -> Result<PathBuf, (ErrorCode, String)> {
        // Pinned: a file here is used only when its info hash is the manifest's (a manifest not
        // here yet is fetched first, see `download_shard`).
        // Unpinned, a manifest.json that lists the shard is held to the same way (a request's
        // info_hash other than the manifest's asks for another file, and is downloaded).
        let pinned = self.config.model_pin.is_some();
        if pinned && !self.pin_unsatisfied() && self.catalog.manifest_hash(id).is_none() {
            return Err((ErrorCode::OutOfRange, format!("the pinned model has no shard {id}")));
        }
        let listed = self.catalog.manifest_hash(id);
        let want = if pinned { listed } else { p.info_hash.or(listed) };
        let target = p.filename.clone().or_else(|| self.catalog.manifest_name(id));
        let entry = match &p.filename {
            Some(name) => self.catalog.files.get(name),
            None => self.catalog.file_for_shard(id),
        };
        let (path, local) = match entry {
            Some(f) => {
                if let Err(e) = &f.gguf {
                    return Err((ErrorCode::ShardInvalid, format!("{} cannot be loaded: {e}", f.filename)));
                }
                match (want, f.meta.as_ref().map(|m| m.info_hash)) {
                    // The file holds the name the right one would be downloaded to: refused
                    // until removed (a download could never replace it).
                    (Some(want), Some(have))
                        if want != have && listed == Some(want) && target.as_deref() == Some(f.filename.as_str()) =>
                    {
                        let msg = format!(
                            "{} is torrent {have}, but the manifest lists {want} for shard {id}: not this model's shard (remove it)",
                            f.filename
                        );
                        return Err((ErrorCode::ManifestMismatch, msg));
                    }
                    (Some(want), Some(have)) if want != have => (f.path.clone(), false),
                    (None, _) if pinned => (f.path.clone(), false),
                    (Some(_), None) if pinned || listed.is_some() => {
                        let msg = format!(
                            "{} is still being hashed; it loads once its info hash is checked against the pinned manifest: try again",
                            f.filename
                        );
                        return Err((ErrorCode::Busy, msg));
                    }
                    _ => (f.path.clone(), true),
                }
            }
            None => {
                // Not seen by the scan: the file may have arrived since.
                let name = p
                    .filename
                    .clone()
                    .or_else(|| self.catalog.manifest_name(id))
                    .unwrap_or_else(|| format!("shard-{id}.gguf"));
                let path = self.config.shards_dir.join(name);
                // Pinned, an unhashed file is not trusted: it is downloaded (and replaced).
                let exists = path.is_file() && !pinned;
                (path, exists)
            }
        };
        if !local {
            self.download_shard(id, p, &path, caller)?;
        }
        let first = !self.loading.contains_key(&id);
        self.loading.entry(id).or_default();
        if first && local {
            self.start_load(id, path.clone());
        }
        Ok(path)
    }

    /// Starts (or joins) the download of shard `id`: its info hash from the
    /// request or the manifest, its peers from the request.
    fn download_shard(
        &mut self,
        id: u32,
        p: &LoadShard,
        path: &std::path::Path,
        caller: &Caller,
    ) -> Result<(), (ErrorCode, String)> {
        if !self.config.enable_torrent {
            return Err(self.not_found_message(id));
        }
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("shard.gguf").to_string();
        let no_dht = |what: &str| {
            (
                ErrorCode::TorrentUnavailable,
                format!("Shard {id} not found locally, {what}, and the DHT is not running."),
            )
        };
        if self.pin_unsatisfied() {
            // Pinned: the manifest first (from the peers holding it), then the shard it names.
            return if self.dht_fetch_manifest(id, name, Some(caller.clone())) {
                Ok(())
            } else {
                Err(no_dht("the pinned manifest is not here"))
            };
        }
        let Some(h) = p.info_hash.or_else(|| self.catalog.manifest_hash(id)) else {
            // Unknown info hash: ask the peers holding the shard's name.
            return if self.dht_resolve_shard(id, name, Some(caller.clone())) {
                Ok(())
            } else {
                Err(no_dht("its info hash is unknown"))
            };
        };
        if p.peers.is_empty() {
            if self.downloads.get(&h).is_some_and(|d| d.failed.is_none()) {
                return Ok(()); // joins the download under way (not one that failed)
            }
            return if self.dht_find_peers(h, Some(id), name, Some(caller.clone())) {
                Ok(())
            } else {
                Err(no_dht("no peers were given"))
            };
        }
        self.start_download(h, None, &name, &p.peers, Some(id), Some(caller))
    }

    /// `DOWNLOAD`: starts fetching a torrent into the shards dir; progress
    /// shows in STATUS `downloads`.
    fn download_command(
        &mut self,
        d: crate::protocol::Download,
        caller: &Caller,
    ) -> Result<Value, (ErrorCode, String)> {
        if !self.config.enable_torrent {
            return Err((ErrorCode::TorrentUnavailable, "this node runs without --enable-torrent".into()));
        }
        let meta = match &d.torrent {
            None => None,
            Some(bytes) => {
                let m = crate::torrent::Metainfo::parse(bytes)
                    .map_err(|e| (ErrorCode::WrongType, format!("torrent_hex: {e:#}")))?;
                if m.info_hash != d.info_hash {
                    return Err((ErrorCode::WrongType, format!("the torrent is {}, not {}", m.info_hash, d.info_hash)));
                }
                Some(std::sync::Arc::new(m))
            }
        };
        if let Some(f) =
            self.catalog.files.values().find(|f| f.meta.as_ref().is_some_and(|m| m.info_hash == d.info_hash))
        {
            return Ok(
                json!({"info_hash": d.info_hash.to_hex(), "status": "complete", "path": f.path.display().to_string()}),
            );
        }
        let name = meta.as_ref().map_or_else(|| d.info_hash.to_hex(), |m| m.info.name.clone());
        self.start_download(d.info_hash, meta, &name, &d.peers, None, Some(caller))?;
        Ok(json!({"info_hash": d.info_hash.to_hex(), "status": "downloading"}))
    }

    /// A LIST_FILES entry: a file whose name the manifest lists under another info hash gets
    /// `mismatch` (the reason), so no peer takes it for the shard of that name.
    fn file_json(&self, f: &super::catalog::FileEntry) -> Value {
        let mut v = f.to_json();
        if let Some(have) = f.meta.as_ref().map(|m| m.info_hash)
            && let Some(want) = self.catalog.manifest_mismatch(&f.filename, have)
        {
            v["mismatch"] = json!(format!("the manifest lists {want} for {}, this file is {have}", f.filename));
        }
        v
    }

    /// `CANCEL`: withdraws this connection's `EXECUTE_TASK`s `ids`: those waiting for their
    /// shard to load are answered `CANCELLED` now, queued ones by the inference thread
    /// ([`super::inference::Inference::cancel_requests`], which also stops a graph computing only
    /// withdrawn steps), and relays in flight are answered `CANCELLED` with a `CANCEL` sent down
    /// their link. Another connection's requests of the same ids are untouched. Returns the
    /// relays withdrawn.
    /// The `CANCEL` of `ids` from the connection `token`, on the loop's side: its steps waiting for
    /// a shard and its relays in flight are answered `CANCELLED`. The ids withdrawn, and how many
    /// of them were relays.
    fn cancel_command(&mut self, token: Token, ids: &[Value]) -> (Vec<Value>, usize) {
        let Some(conn_id) = self.conn(token).map(|c| c.id) else { return (Vec::new(), 0) };
        let mut withdrawn = Vec::new();
        for tasks in self.pending_tasks.values_mut() {
            let (gone, kept): (Vec<_>, Vec<_>) =
                tasks.drain(..).partition(|(reply, ..)| reply.conn_id == conn_id && ids.contains(&reply.request_id));
            *tasks = kept;
            withdrawn.extend(gone);
        }
        self.pending_tasks.retain(|_, tasks| !tasks.is_empty());
        let mut ids_withdrawn: Vec<Value> = withdrawn.iter().map(|(reply, ..)| reply.request_id.clone()).collect();
        for (reply, ..) in withdrawn {
            let payload = error_payload(
                json!("EXECUTE_TASK"),
                reply.request_id.clone(),
                ErrorCode::Cancelled,
                "withdrawn by CANCEL before it was computed",
            );
            self.on_answer(reply.token, reply.conn_id, reply.reserved, &payload);
        }
        let answers = self.relays.lock().cancel_requests(self.poll.registry(), conn_id, ids, Instant::now());
        let n = answers.len();
        ids_withdrawn.extend(answers.iter().map(|a| a.reply.request_id.clone()));
        self.deliver(answers);
        (ids_withdrawn, n)
    }

    /// Answers every request waiting for shard `id` with an error.
    pub(super) fn fail_waiters(&mut self, id: u32, code: ErrorCode, msg: String) {
        for w in self.loading.remove(&id).unwrap_or_default() {
            let Some(conn) = self.conn(w.token).filter(|c| c.id == w.conn_id) else { continue };
            let was_paused = conn.backpressured();
            conn.in_flight -= 1;
            self.respond(w.token, &error_payload(json!("LOAD_SHARD"), w.request_id, code, &msg));
            self.resume_or_settle(w.token, was_paused);
        }
        self.run_pending_tasks(id, Some((code, msg)));
    }

    /// Maps and checks a shard on a worker; the answer comes as `NodeEvent::Loaded`.
    pub(super) fn start_load(&mut self, id: u32, path: PathBuf) {
        self.loading.entry(id).or_default();
        // Another shard of the model here names the model the new one must be of.
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
        // The manifest's model comes first: a shard of another model is refused even on a node
        // that has no other shard yet.
        let model = self.catalog.manifest_model.clone().or_else(|| {
            self.catalog
                .files
                .values()
                .filter(|f| f.filename != name)
                .find_map(|f| f.gguf.as_ref().ok().and_then(|s| s.model_id.clone()))
        });
        // A manifest (pinned or the shards dir's) that lists the shard names its info hash: the
        // file's own, from the scan's metadata, is checked against it by `check_shard`.
        let listed = self
            .catalog
            .manifest_hash(id)
            .map(|want| (want, self.catalog.files.get(&name).and_then(|f| f.meta.as_ref()).map(|m| m.info_hash)));
        let (tx, waker) = (self.events_tx.clone(), self.waker.clone());
        self.pool.handle().submit(move || {
            let result = load_shard(id, &path, model.as_deref(), listed);
            let _ = tx.send(NodeEvent::Loaded { shard_id: id, result });
            let _ = waker.wake();
        });
    }

    pub(super) fn on_loaded(&mut self, shard_id: u32, result: Result<LoadedShard, (ErrorCode, String)>) {
        let waiters = self.loading.remove(&shard_id).unwrap_or_default();
        let downloaded = self.download_bytes.remove(&shard_id);
        match &result {
            Ok(s) => info!("shard {shard_id} loaded from {} ({} bytes mapped)", s.path.display(), s.map.len()),
            Err((_, e)) => warn!("shard {shard_id} not loaded: {e}"),
        }
        for w in waiters {
            let Some(conn) = self.conn(w.token).filter(|c| c.id == w.conn_id) else { continue };
            let was_paused = conn.backpressured();
            conn.in_flight -= 1;
            let payload = match &result {
                Ok(s) => {
                    let mut result = loaded_json(s, if downloaded.is_some() { "torrent" } else { "local" }, w.started);
                    result["bytes_downloaded"] = json!(downloaded.unwrap_or(0));
                    success_payload("LOAD_SHARD", &w.request_id, result)
                }
                Err((ErrorCode::ShardNotFound, _)) => {
                    let (code, msg) = self.not_found_message(shard_id);
                    error_payload(json!("LOAD_SHARD"), w.request_id, code, &msg)
                }
                Err((code, msg)) => error_payload(json!("LOAD_SHARD"), w.request_id, *code, msg),
            };
            self.respond(w.token, &payload);
            self.resume_or_settle(w.token, was_paused);
        }
        if let (Err((ErrorCode::ShardInvalid | ErrorCode::ManifestMismatch, msg)), Some(_)) = (&result, downloaded) {
            self.discard_download(shard_id, msg);
        }
        let error = match &result {
            Ok(_) => None,
            Err((ErrorCode::ShardNotFound, _)) => Some(self.not_found_message(shard_id)),
            Err(e) => Some(e.clone()),
        };
        if let Ok(s) = result {
            self.catalog.loaded.insert(shard_id, s);
            self.status_cache = None;
        }
        self.run_pending_tasks(shard_id, error);
    }

    fn not_found_message(&self, id: u32) -> (ErrorCode, String) {
        if self.config.enable_torrent {
            (
                ErrorCode::TorrentUnavailable,
                format!("Shard {id} not found locally, and this node cannot download shards from peers yet."),
            )
        } else {
            (ErrorCode::ShardNotFound, format!("Shard {id} not found. Torrent download required."))
        }
    }

    pub(super) fn on_scan_event(&mut self, ev: ScanEvent) {
        self.status_cache = None;
        match ev {
            ScanEvent::Found(entry) => {
                self.catalog.files.insert(entry.filename.clone(), entry);
            }
            ScanEvent::Manifest(bytes, _) => self.on_scan_manifest(bytes),
            ScanEvent::Listed => {
                self.scan.listed = true;
                info!("shards dir {}: {} GGUF files", self.config.shards_dir.display(), self.catalog.files.len());
                if let Some(id) = self.config.shard_id {
                    self.preload(id);
                }
            }
            ScanEvent::Metadata { filename, result, cached } => {
                let Some(entry) = self.catalog.files.get_mut(&filename) else { return };
                match result {
                    Ok(m) => {
                        if cached {
                            self.scan.cached += 1;
                        } else {
                            self.scan.hashed += 1;
                        }
                        info!(
                            "torrent metadata for {filename}: info hash {} ({} bytes, {})",
                            m.info_hash,
                            m.info.length,
                            if cached { "cached" } else { "hashed now" }
                        );
                        entry.meta = Some(m);
                        let entry = entry.clone();
                        self.seed_file(&entry);
                        self.announce_due(Instant::now());
                    }
                    Err(e) => {
                        warn!("{filename}: no torrent metadata: {e}");
                        entry.meta_error = Some(e);
                    }
                }
            }
            ScanEvent::Done(stats) => {
                info!(
                    "metadata ready for {} files ({} cached, {} hashed, {:.1} MB in {:.0} ms)",
                    stats.files,
                    stats.cached,
                    stats.hashed,
                    stats.bytes_hashed as f64 / 1e6,
                    stats.elapsed.as_secs_f64() * 1e3
                );
                self.scan.done = Some(stats);
                if let (Some(id), Some(_)) = (self.config.shard_id, self.config.model_pin) {
                    self.preload(id);
                }
            }
        }
    }

    /// Loads the node's own `--shard-id` at startup, when it has the file.
    fn preload(&mut self, id: u32) {
        let Some(f) = self.catalog.file_for_shard(id) else {
            info!("shard {id} (--shard-id) is not in the shards dir; it loads on LOAD_SHARD");
            return;
        };
        if self.loading.contains_key(&id) || f.gguf.is_err() || self.catalog.loaded.contains_key(&id) {
            return;
        }
        // Pinned: only once the file's info hash is known and is the manifest's (tried again when
        // the scan is done).
        if self.config.model_pin.is_some() {
            let have = f.meta.as_ref().map(|m| m.info_hash);
            if have.is_none() || have != self.catalog.manifest_hash(id) {
                return;
            }
        }
        let path = f.path.clone();
        self.start_load(id, path);
    }
}

fn loaded_json(s: &LoadedShard, source: &str, started: Instant) -> Value {
    json!({
        "shard_id": s.shard_id,
        "status": "loaded",
        "path": s.path.display().to_string(),
        "filename": s.filename,
        "source": source,
        "layers": s.summary.layers.map(|(b, e)| [b, e]),
        "bytes": s.map.len(),
        "bytes_downloaded": 0,
        "elapsed_ms": started.elapsed().as_secs_f64() * 1e3,
    })
}

/// A client as the per-client quotas (sessions, queued tokens, relays) know it: its IPv4 address
/// or IPv6 /64, as the connection limits count it ([`super::limits::ip_key`]: one host is
/// commonly given a whole /64, so per address one attacker was 2^64 clients; red-team round 8
/// filled `--max-relays` from four addresses of one /64), and the address with its port on
/// loopback (where every local client shares the IP).
impl Node {
    /// The caller on connection `token`, for download shares (see [`Caller`]).
    pub(super) fn caller(&mut self, token: Token) -> Caller {
        self.caller_naming(token, None)
    }

    /// The caller on connection `token` of a request naming `origin` (a relayed step's original
    /// caller, see [`crate::protocol::ExecuteTask::origin`]): on a connection without the cluster
    /// key an origin that is not the node's host makes the caller a stranger, charged under that
    /// origin's key (red-team round 12: a stranger's step relayed by this node to itself arrived
    /// from the node's own address and its download took the host's slot). The origin is
    /// self-declared, so it can only make a caller more of a stranger, never less.
    pub(super) fn caller_naming(&mut self, token: Token, origin: Option<&str>) -> Caller {
        let Some(c) = self.conn(token) else { return Caller { key: String::new(), stranger: true } };
        let local = *c.local_addr.get_or_insert_with(|| c.stream.local_addr().ok());
        let (peer, keyed) = (c.peer, c.auth.established());
        let same_host = local.is_some_and(|l| l.ip() == peer.ip());
        let stranger = !same_host && !keyed;
        match origin {
            Some(o) if !stranger && !keyed && !local.is_some_and(|l| origin_is_host(o, l.ip())) => {
                Caller { key: o.to_string(), stranger: true }
            }
            _ => Caller { key: client_key(peer), stranger },
        }
    }
}

/// Whether a relayed step's `origin` (a [`client_key`]: `ip:port` on loopback, an IPv4 address,
/// an IPv6 `/64`) names the node's own host reached at `local`: `local`'s own address (its /64
/// for IPv6, all an origin tells), or a loopback address when `local` is not one (the host
/// called over loopback, the step came back over its public address). On loopback, where
/// test networks give each party its own 127/8 address, only `local`'s. Anything else,
/// unparsable included, is not the host.
pub(super) fn origin_is_host(origin: &str, local: std::net::IpAddr) -> bool {
    use std::net::{IpAddr, SocketAddr};
    let ip = origin
        .parse::<SocketAddr>()
        .map(|a| a.ip())
        .or_else(|_| origin.parse::<IpAddr>())
        .or_else(|_| origin.strip_suffix("/64").unwrap_or("-").parse::<IpAddr>());
    let ip_key = super::limits::ip_key;
    ip.is_ok_and(|ip| ip_key(ip) == ip_key(local) || (ip.is_loopback() && !local.is_loopback()))
}

/// Who asked for a download: charged with it under `--max-downloads-per-client`, and, when a
/// stranger, under the strangers' share of `--max-downloads` ([`strangers_download_cap`]).
#[derive(Clone, Debug)]
pub struct Caller {
    /// [`client_key`] of its address.
    pub key: String,
    /// Neither authenticated with the cluster key nor on the node's own host (a connection
    /// whose peer address is the address it reached: the host talking to itself).
    pub stranger: bool,
}

/// Downloads that strangers' commands may hold at once under `--max-downloads` `total`: three
/// quarters of it (at least 1), so the operator (on the node's host) and cluster members (keyed)
/// always find a slot however many addresses a stranger uses (red-team round 11: two addresses
/// took all 8).
pub fn strangers_download_cap(total: usize) -> usize {
    (total - total / 4).max(1)
}

pub(super) fn client_key(peer: std::net::SocketAddr) -> String {
    let ip = super::limits::ip_key(peer.ip());
    if peer.ip().is_loopback() || ip.is_loopback() {
        peer.to_string()
    } else if ip.is_ipv6() {
        format!("{ip}/64")
    } else {
        ip.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::{client_key, origin_is_host};

    /// Red-team round 12, finding 3: a relayed step's origin that is not the node's host makes
    /// its caller a stranger; the host's own keys (as `client_key` writes them) pass.
    #[test]
    fn a_relayed_steps_origin_is_the_host_only_at_the_hosts_own_address() {
        let host = |o: &str, local: &str| origin_is_host(o, local.parse().unwrap());
        // The node reached at 127.0.0.1 (tests): its own loopback address only.
        assert!(host("127.0.0.1:4000", "127.0.0.1"));
        assert!(!host("127.0.0.2:4000", "127.0.0.1"), "another loopback party is a stranger");
        // Reached at a public address: that address, its /64, or any loopback caller.
        assert!(host("45.99.1.1", "45.99.1.1"));
        assert!(host("127.0.0.1:4000", "45.99.1.1"));
        assert!(!host("45.99.1.12", "45.99.1.1"));
        assert!(host("fd00:99:0:1::/64", "fd00:99:0:1::5"));
        assert!(!host("fd00:99:0:2::/64", "fd00:99:0:1::5"));
        assert!(host(&client_key("[::1]:4000".parse().unwrap()), "fd00:99:0:1::5"));
        // Unparsable origins are not the host.
        for o in ["", "host", "45.99.1.1/64x", "/64", "relay"] {
            assert!(!host(o, "45.99.1.1"), "{o}");
        }
    }

    #[test]
    fn clients_are_keyed_by_ipv4_address_or_ipv6_64_and_by_port_on_loopback() {
        let key = |s: &str| client_key(s.parse().unwrap());
        // Every address of one /64 is one client; another /64 is another.
        assert_eq!(key("[fd00:99:0:1::100]:4000"), "fd00:99:0:1::/64");
        assert_eq!(key("[fd00:99:0:1:ffff:1:2:3]:5000"), "fd00:99:0:1::/64");
        assert_ne!(key("[fd00:99:0:2::100]:4000"), key("[fd00:99:0:1::100]:4000"));
        // IPv4: the address, whatever the port; v4-mapped IPv6 is the same client.
        assert_eq!(key("10.99.0.1:4000"), "10.99.0.1");
        assert_eq!(key("10.99.0.1:4001"), "10.99.0.1");
        assert_eq!(key("[::ffff:10.99.0.1]:4001"), "10.99.0.1");
        assert_ne!(key("10.99.0.2:4000"), key("10.99.0.1:4000"));
        // Loopback: address and port (every local client shares the IP).
        assert_eq!(key("127.0.0.1:4000"), "127.0.0.1:4000");
        assert_eq!(key("[::1]:4000"), "[::1]:4000");
        assert_eq!(key("[::ffff:127.0.0.1]:4000"), "[::ffff:127.0.0.1]:4000");
        assert_ne!(key("[::1]:4000"), key("[::1]:4001"));
    }
}
