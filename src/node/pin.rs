//! The model a node serves: its `manifest.json`, and the pin `--model HASH` puts on it
//! (DESIGN section 11). A pinned node keeps only a manifest whose SHA-256 is the pin; lacking
//! one, it finds holders under [`manifest_dht_key`], asks them `GET_MANIFEST` (authenticated
//! with the cluster key), keeps the first answer that hashes to the pin and checks, saves it in
//! the shards dir, and from then on takes every shard's info hash from it alone: the holders'
//! vote under a shard's name key is never asked.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{Value, json};

use super::dht_glue::Purpose;
use super::handlers::Caller;
use super::{Node, NodeEvent};
use crate::client::Client;
use crate::dht::krpc::Id;
use crate::dht::node::LookupKind;
use crate::gguf::manifest::{Manifest, manifest_dht_key, manifest_hash};
use crate::hash::to_hex;
use crate::protocol::ErrorCode;
use crate::protocol::auth::ClusterKey;
use crate::{info, warn};

/// Holders asked for the manifest, one after another.
const MANIFEST_ASK: usize = 8;

impl Node {
    /// Takes `bytes` as the node's manifest. With a pin they must hash to it and pass every check
    /// of [`Manifest::parse`]; without, the shard table is read leniently (as `split` without
    /// info hashes writes it).
    pub(super) fn adopt_manifest(&mut self, bytes: Vec<u8>, source: &str) -> Result<(), String> {
        let hash = manifest_hash(&bytes);
        let (table, model) = match &self.config.model_pin {
            Some(pin) => {
                let m = Manifest::parse_pinned(&bytes, pin)?;
                let table = m.shards.iter().map(|s| (s.shard_id, (s.filename.clone(), s.info_hash))).collect();
                (table, Some(m.model_id))
            }
            None => {
                let table = super::catalog::manifest_table(&bytes).ok_or("manifest.json is not a manifest")?;
                let model = serde_json::from_slice::<Value>(&bytes)
                    .ok()
                    .and_then(|v| v["model_id"].as_str().map(str::to_string));
                (table, model)
            }
        };
        info!(
            "manifest {} ({source}): model {}, {} shards{}",
            to_hex(&hash),
            model.as_deref().unwrap_or("?"),
            table.len(),
            if self.config.model_pin.is_some() { ", pinned" } else { "" }
        );
        self.catalog.manifest = table;
        self.catalog.manifest_model = model;
        self.catalog.manifest_bytes = Some((bytes, hash));
        self.status_cache = None;
        Ok(())
    }

    /// `manifest.json` found by the scan.
    pub(super) fn on_scan_manifest(&mut self, bytes: Vec<u8>) {
        if let Err(e) = self.adopt_manifest(bytes, "shards dir") {
            warn!("manifest.json in the shards dir refused: {e}; the pinned manifest is fetched from peers");
        }
    }

    /// Whether the node is pinned and still lacks its manifest.
    pub(super) fn pin_unsatisfied(&self) -> bool {
        self.config.model_pin.is_some() && self.catalog.manifest_bytes.is_none()
    }

    /// Starts fetching the pinned manifest for shard `shard_id`'s load; false without a DHT.
    pub(super) fn dht_fetch_manifest(&mut self, shard_id: u32, filename: String, client: Option<Caller>) -> bool {
        let Some(pin) = self.config.model_pin else { return false };
        let key = Id(manifest_dht_key(&pin));
        self.start_lookup(key, LookupKind::GetPeers, Purpose::Manifest { shard_id, filename, client }, true)
    }

    /// The lookup for the manifest's holders ended: ask them on a worker.
    pub(super) fn on_manifest_holders(
        &mut self,
        shard_id: u32,
        filename: String,
        peers: Vec<SocketAddr>,
        client: Option<Caller>,
    ) {
        let pin = self.config.model_pin.expect("only pinned nodes fetch");
        if peers.is_empty() {
            let msg = format!("no peer in the DHT holds the pinned manifest {}", to_hex(&pin));
            return self.fail_waiters(shard_id, ErrorCode::TorrentUnavailable, msg);
        }
        let (tx, waker, key) = (self.events_tx.clone(), self.waker.clone(), self.config.cluster_key.clone());
        self.pool.handle().submit(move || {
            let result = ask_manifest(&peers, &pin, key.as_ref());
            let _ = tx.send(NodeEvent::ManifestFetched { shard_id, filename, result, client });
            let _ = waker.wake();
        });
    }

    /// A manifest fetched for shard `shard_id` (checked against the pin on the worker): adopt it,
    /// save it, and download the shard by its info hash (`client`'s download: the caller whose
    /// load asked for it).
    pub(super) fn on_manifest_fetched(
        &mut self,
        shard_id: u32,
        filename: String,
        result: Result<Vec<u8>, String>,
        client: Option<Caller>,
    ) {
        let bytes = match result {
            Ok(b) => b,
            Err(e) => return self.fail_waiters(shard_id, ErrorCode::ManifestMismatch, e),
        };
        if let Err(e) = self.adopt_manifest(bytes.clone(), "fetched from a peer") {
            return self.fail_waiters(shard_id, ErrorCode::ManifestMismatch, e);
        }
        let dir = self.config.shards_dir.clone();
        self.pool.handle().submit(move || {
            let tmp = dir.join(".manifest.json.tmp");
            let saved = std::fs::write(&tmp, &bytes).and_then(|()| std::fs::rename(&tmp, dir.join("manifest.json")));
            if let Err(e) = saved {
                warn!("saving the pinned manifest in {}: {e}", dir.display());
            }
        });
        self.announce_due(std::time::Instant::now());
        let Some(h) = self.catalog.manifest_hash(shard_id) else {
            let msg = format!("the pinned manifest has no shard {shard_id}");
            return self.fail_waiters(shard_id, ErrorCode::OutOfRange, msg);
        };
        // The right file may be here already.
        let here = self.catalog.files.values().find(|f| f.meta.as_ref().is_some_and(|m| m.info_hash == h));
        if let Some(path) = here.map(|f| f.path.clone()) {
            return self.start_load(shard_id, path);
        }
        let name = self.catalog.manifest_name(shard_id).unwrap_or(filename);
        if !self.dht_find_peers(h, Some(shard_id), name, client) {
            self.fail_waiters(shard_id, ErrorCode::TorrentUnavailable, "the DHT is not running".into());
        }
    }

    /// STATUS `model`: the pin and the manifest in use.
    pub(super) fn model_status(&self) -> Value {
        json!({
            "pin": self.config.model_pin.map(|p| to_hex(&p)),
            "manifest": self.catalog.manifest_bytes.as_ref().map(|(_, h)| to_hex(h)),
            "model_id": self.catalog.manifest_model,
            "shards": self.catalog.manifest.len(),
        })
    }
}

/// Asks holders for the manifest of hash `pin` until one answers bytes that hash to it and
/// check out.
fn ask_manifest(peers: &[SocketAddr], pin: &[u8; 32], key: Option<&ClusterKey>) -> Result<Vec<u8>, String> {
    let mut errors = Vec::new();
    for p in peers.iter().take(MANIFEST_ASK) {
        let answer = Client::connect_with_key(&p.to_string(), Duration::from_secs(2), key)
            .and_then(|mut c| c.call("GET_MANIFEST", json!({"hash": to_hex(pin)})));
        let text = match answer {
            Ok(r) => r["manifest"].as_str().map(str::to_string),
            Err(e) => {
                errors.push(format!("{p}: {e:#}"));
                continue;
            }
        };
        let Some(text) = text else {
            errors.push(format!("{p}: no manifest in the answer"));
            continue;
        };
        match Manifest::parse_pinned(text.as_bytes(), pin) {
            Ok(_) => return Ok(text.into_bytes()),
            Err(e) => {
                warn!("manifest from {p} refused: {e}");
                errors.push(format!("{p}: {e}"));
            }
        }
    }
    Err(format!("no holder gave the pinned manifest {} ({})", to_hex(pin), errors.join("; ")))
}
