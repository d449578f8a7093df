//! The extension protocol (BEP 10) and metadata exchange (BEP 9) of a swarm:
//! the extension handshake, serving our info dict in 16 KiB pieces, and
//! fetching one (bounded, verified against the info hash) for a magnet link.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Result, anyhow};

use super::{
    Action, MAX_METADATA, MAX_METADATA_OUT, MAX_PEER_REQUESTS, METADATA_PIECE, MIN_PIPELINE, Metadata, REQUEST_TIMEOUT,
    Swarm, UT_METADATA,
};
use crate::bencode::{self, Value};
use crate::hash;
use crate::torrent::metainfo::{Info, Metainfo};
use crate::torrent::picker::PeerKey;
use crate::torrent::wire::{self, Bitfield, Message};

impl Swarm {
    pub(super) fn on_extended(&mut self, key: PeerKey, id: u8, payload: &[u8], now: Instant) -> Result<()> {
        if id == 0 {
            // Saturating: an integer past 64 bits (`reqq` = 2^66) is out of range like any other
            // too-large value below, not a reason to drop the peer.
            let v = bencode::decode_saturating(payload).map_err(|e| anyhow!("extension handshake: {e}"))?;
            let ut = v.get("m").and_then(|m| m.get("ut_metadata")).and_then(Value::as_int);
            let size = v.get("metadata_size").and_then(Value::as_int);
            let reqq = v.get("reqq").and_then(Value::as_int).and_then(|q| usize::try_from(q).ok());
            let peer = self.peer(key)?;
            peer.their_ut_metadata = ut.filter(|i| (1..=255).contains(i)).map(|i| i as u8);
            if let Some(q) = reqq {
                peer.pipe.reqq = q.clamp(MIN_PIPELINE, MAX_PEER_REQUESTS);
            }
            self.on_private_handshake(key, &v)?;
            self.on_pex_handshake(key, &v)?;
            if let (Metadata::Unknown, Some(size)) = (&self.meta, size) {
                if size <= 0 || size as u64 > MAX_METADATA {
                    return Err(anyhow!("metadata_size {size} outside 1..={MAX_METADATA}"));
                }
                let n = (size as usize).div_ceil(METADATA_PIECE);
                self.meta = Metadata::Fetching { size: size as usize, pieces: vec![None; n], asked: HashMap::new() };
            }
            self.request_metadata(now);
            return Ok(());
        }
        if id == super::private::SHARDNET_AUTH && self.is_private() {
            return self.on_private_proof(key, payload);
        }
        if id == super::pex::UT_PEX {
            return self.on_pex(key, payload, now);
        }
        if id != UT_METADATA {
            return Ok(()); // an extension we did not announce: ignored
        }
        let (dict, used) = bencode::decode_prefix(payload).map_err(|e| anyhow!("ut_metadata: {e}"))?;
        let msg_type =
            dict.get("msg_type").and_then(Value::as_int).ok_or_else(|| anyhow!("ut_metadata without msg_type"))?;
        let piece = dict
            .get("piece")
            .and_then(Value::as_int)
            .filter(|p| *p >= 0)
            .ok_or_else(|| anyhow!("ut_metadata without piece"))?;
        match msg_type {
            0 => self.serve_metadata(key, piece as u32),
            1 => self.on_metadata_piece(piece as u32, &payload[used..])?,
            _ => {}
        }
        Ok(())
    }

    /// Answers a `request` (BEP 9 msg_type 0) for `piece` of our info dict: the piece
    /// (msg_type 1), or a `reject` (msg_type 2) when we have no such piece or when
    /// [`MAX_METADATA_OUT`] bytes already wait in the peer's output. A reject is no larger than
    /// the request it answers, so a flood of requests grows the output by at most the bytes
    /// read; the node stops reading a peer whose output passes
    /// [`crate::node::conn::PEER_OUT_MAX`] (red-team round 8: 26 MB of requests cost 1.4 GB).
    fn serve_metadata(&mut self, key: PeerKey, piece: u32) {
        if !self.admitted(key) {
            return; // private swarm: not before the peer proved the key
        }
        let raw: &[u8] = match &self.meta {
            Metadata::Known(m) => &m.raw_info,
            _ => &[],
        };
        let Some(peer) = self.peers.get_mut(&key) else { return };
        let Some(their_id) = peer.their_ut_metadata else { return };
        let start = piece as usize * METADATA_PIECE;
        let answer = start < raw.len() && peer.out.len() < MAX_METADATA_OUT;
        let mut payload = if answer {
            bencode::dict([
                ("msg_type", Value::Int(1)),
                ("piece", Value::Int(piece as i64)),
                ("total_size", Value::Int(raw.len() as i64)),
            ])
            .encode()
        } else {
            self.stats.metadata_rejects_sent += 1;
            bencode::dict([("msg_type", Value::Int(2)), ("piece", Value::Int(piece as i64))]).encode()
        };
        if answer {
            payload.extend_from_slice(&raw[start..(start + METADATA_PIECE).min(raw.len())]);
        }
        wire::encode(&Message::Extended { id: their_id, payload: &payload }, &mut peer.out);
    }

    fn on_metadata_piece(&mut self, piece: u32, data: &[u8]) -> Result<()> {
        let Metadata::Fetching { size, pieces, asked } = &mut self.meta else { return Ok(()) };
        let i = piece as usize;
        if i >= pieces.len() {
            return Err(anyhow!("metadata piece {piece} of {}", pieces.len()));
        }
        let expect = (*size - i * METADATA_PIECE).min(METADATA_PIECE);
        if data.len() != expect {
            return Err(anyhow!("metadata piece {piece} of {} bytes, expected {expect}", data.len()));
        }
        pieces[i] = Some(data.to_vec());
        asked.remove(&piece);
        if pieces.iter().all(Option::is_some) {
            let raw: Vec<u8> = pieces.iter().flat_map(|p| p.as_deref().expect("all present")).copied().collect();
            if hash::sha1(&raw) != self.info_hash.0 {
                self.meta = Metadata::Unknown;
                return Err(anyhow!("metadata does not hash to the info hash"));
            }
            let info = Info::parse_raw(&raw)?;
            let mut m = Metainfo::new(info);
            m.raw_info = raw;
            m.info_hash = self.info_hash;
            // The node decides (name, disk budget) before any file is created; then
            // [`Swarm::accept_metadata`] opens the storage.
            self.meta = Metadata::Received(Arc::new(m));
            self.actions.push(Action::MetadataReady);
        }
        Ok(())
    }

    /// Pieces of the info dict held: all of them once it is known, the ones fetched so far for a
    /// magnet (a measure of progress before any block can come).
    pub fn metadata_pieces_held(&self) -> usize {
        match &self.meta {
            Metadata::Unknown => 0,
            Metadata::Fetching { pieces, .. } => pieces.iter().filter(|p| p.is_some()).count(),
            Metadata::Received(m) | Metadata::Known(m) => m.raw_info.len().div_ceil(METADATA_PIECE),
        }
    }

    /// Metadata received from peers and verified against the info hash, waiting for the node to
    /// admit it ([`Swarm::accept_metadata`]).
    pub fn received_metadata(&self) -> Option<&Arc<Metainfo>> {
        match &self.meta {
            Metadata::Received(m) => Some(m),
            _ => None,
        }
    }

    /// The node admitted the received metadata: open the `.part` file and start fetching pieces.
    pub fn accept_metadata(&mut self) -> Result<()> {
        let Metadata::Received(m) = &self.meta else { return Ok(()) };
        self.open_storage(m.clone())?;
        // Now that the piece count is known: what each peer told us
        // before, what we have, and what we want.
        let have = self.picker.as_ref().expect("storage opened").have().clone();
        let n = have.len();
        let keys: Vec<PeerKey> = self.peers.keys().copied().collect();
        for k in keys {
            let p = self.peers.get_mut(&k).expect("listed");
            p.bits = Bitfield::new(n);
            if !p.handshaken || !p.proved() {
                // Not yet (a private swarm's peer before its proof): the proof announces.
            } else if p.fast.we_announced {
                // It heard HAVE_NONE already: what a resumed .part holds goes as haves.
                for i in have.ones() {
                    wire::encode(&Message::Have(i), &mut p.out);
                }
            } else {
                super::fast::announce(p, Some(&have), &mut self.stats);
            }
            let (bits, haves) = (p.early_bits.take(), std::mem::take(&mut p.early_haves));
            let applied = bits
                .map_or(Ok(()), |b| self.on_bitfield(k, &b))
                .and_then(|()| haves.into_iter().try_for_each(|i| self.on_have(k, i)));
            if let Err(e) = applied {
                self.actions.push(Action::Disconnect(k, format!("{e}")));
            }
            self.apply_early_fast(k);
            self.update_interest(k);
        }
        Ok(())
    }

    /// Asks peers that have metadata for pieces not yet asked (or timed out).
    pub(super) fn request_metadata(&mut self, now: Instant) {
        let Metadata::Fetching { pieces, asked, .. } = &mut self.meta else { return };
        asked.retain(|_, at| now.duration_since(*at) < REQUEST_TIMEOUT);
        let missing: Vec<u32> =
            (0..pieces.len() as u32).filter(|i| pieces[*i as usize].is_none() && !asked.contains_key(i)).collect();
        let mut sources = self.peers.values_mut().filter(|p| p.their_ut_metadata.is_some());
        for piece in missing {
            let Some(p) = sources.next() else { break };
            let payload = bencode::dict([("msg_type", Value::Int(0)), ("piece", Value::Int(piece as i64))]).encode();
            wire::encode(
                &Message::Extended { id: p.their_ut_metadata.expect("filtered"), payload: &payload },
                &mut p.out,
            );
            asked.insert(piece, now);
        }
    }
}
