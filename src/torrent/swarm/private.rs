//! Private swarms (`--private`): the peer wire serves only peers that prove the cluster key
//! in the BEP 10 extension handshake. Sans-IO, like the rest of the swarm.
//!
//! Each side's extension handshake carries `shardnet_nonce` (32 fresh bytes for this
//! connection) and announces the extension `shardnet_auth` in `m`. On the peer's handshake
//! each side sends `shardnet_auth` with `{proof: auth::peer_proof(K, info_hash, their_nonce,
//! our_nonce, our_peer_id)}` and checks the peer's proof against its own nonce. Until a peer
//! has proved the key it gets no bitfield, no `have`, no unchoke and no metadata; a wrong proof
//! or none within [`PROOF_TIMEOUT`] closes the connection. A captured proof is bound to the
//! nonce of the connection it was made for, so it opens no other.

use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};

use super::{Swarm, wire};
use crate::bencode::{self, Value};
use crate::protocol::auth::{self, ClusterKey, NONCE_LEN};
use crate::torrent::picker::PeerKey;
use crate::torrent::wire::Message;

/// Our extended-message id for `shardnet_auth` (ut_metadata is 1).
pub const SHARDNET_AUTH: u8 = 2;
/// A peer that has not proved the key this long after connecting is closed.
pub const PROOF_TIMEOUT: Duration = Duration::from_secs(10);

/// A private swarm's key, and the generator of its per-connection nonces.
pub struct Private {
    key: ClusterKey,
    /// HMAC under a random seed over a counter: unpredictable, never repeated.
    nonces: ClusterKey,
    counter: u64,
}

impl Private {
    /// `seed`: 32 random bytes from the caller (the node reads the kernel's CSPRNG).
    pub fn new(key: ClusterKey, seed: [u8; 32]) -> Private {
        Private { key, nonces: ClusterKey::from_bytes(&seed).expect("32 bytes"), counter: 0 }
    }

    fn next_nonce(&mut self) -> [u8; NONCE_LEN] {
        self.counter += 1;
        self.nonces.mac(&[&self.counter.to_be_bytes()])
    }
}

/// One peer's side of the proof.
pub struct PeerProof {
    ours: [u8; NONCE_LEN],
    theirs: Option<[u8; NONCE_LEN]>,
    pub proved: bool,
    since: Instant,
}

impl Swarm {
    /// Makes this swarm private: only peers proving `key` are served.
    pub fn set_private(&mut self, key: ClusterKey, seed: [u8; 32]) {
        self.private = Some(Private::new(key, seed));
    }

    pub fn is_private(&self) -> bool {
        self.private.is_some()
    }

    /// A new peer's proof state (private swarms only).
    pub(super) fn new_proof(&mut self, now: Instant) -> Option<PeerProof> {
        let p = self.private.as_mut()?;
        Some(PeerProof { ours: p.next_nonce(), theirs: None, proved: false, since: now })
    }

    /// Whether `key` may be served: a public swarm, or a peer that proved the key.
    pub(super) fn admitted(&self, key: PeerKey) -> bool {
        self.peers.get(&key).is_some_and(|p| p.proof.as_ref().is_none_or(|x| x.proved))
    }

    /// Our extension handshake's additions for `key`: the nonce, and `shardnet_auth` in `m`.
    pub(super) fn private_handshake_fields(&self, key: PeerKey) -> Option<[u8; NONCE_LEN]> {
        self.peers.get(&key)?.proof.as_ref().map(|p| p.ours)
    }

    /// The peer's extension handshake `v` arrived: record its nonce and send our proof.
    pub(super) fn on_private_handshake(&mut self, key: PeerKey, v: &Value) -> Result<()> {
        let Some(private) = &self.private else { return Ok(()) };
        let info_hash = self.info_hash.0;
        let my_id = self.my_id;
        let their_nonce: [u8; NONCE_LEN] = v
            .get("shardnet_nonce")
            .and_then(Value::as_bytes)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| anyhow!("private swarm: the peer's extension handshake has no shardnet_nonce"))?;
        let their_id =
            v.get("m")
                .and_then(|m| m.get("shardnet_auth"))
                .and_then(Value::as_int)
                .filter(|i| (1..=255).contains(i))
                .ok_or_else(|| anyhow!("private swarm: the peer does not speak shardnet_auth"))? as u8;
        let key_ = private.key.clone();
        let peer = self.peer(key)?;
        let proof = peer.proof.as_mut().ok_or_else(|| anyhow!("no proof state"))?;
        if proof.theirs.is_some() {
            return Err(anyhow!("private swarm: a second extension handshake"));
        }
        proof.theirs = Some(their_nonce);
        let mac = auth::peer_proof(&key_, &info_hash, &their_nonce, &proof.ours, &my_id);
        let payload = bencode::dict([("proof", Value::bytes(&mac[..]))]).encode();
        wire::encode(&Message::Extended { id: their_id, payload: &payload }, &mut peer.out);
        Ok(())
    }

    /// `shardnet_auth` from the peer: checks its proof; once proved, the peer sees our pieces.
    pub(super) fn on_private_proof(&mut self, key: PeerKey, payload: &[u8]) -> Result<()> {
        let Some(private) = &self.private else { return Ok(()) };
        let (info_hash, k) = (self.info_hash.0, private.key.clone());
        let have = self.picker.as_ref().map(|p| p.have().clone());
        let peer = self.peers.get_mut(&key).ok_or_else(|| anyhow!("unknown peer"))?;
        let their_id = peer.peer_id;
        let proof = peer.proof.as_mut().ok_or_else(|| anyhow!("no proof state"))?;
        let theirs = proof.theirs.ok_or_else(|| anyhow!("private swarm: a proof before the extension handshake"))?;
        let v = bencode::decode(payload).map_err(|e| anyhow!("shardnet_auth: {e}"))?;
        let got = v.get("proof").and_then(Value::as_bytes).unwrap_or_default();
        let want_parts: [&[u8]; 5] = [b"shardnet-peer-v1", &info_hash, &proof.ours, &theirs, &their_id];
        if !k.verify(&want_parts, got) {
            return Err(anyhow!("private swarm: the peer's proof of the cluster key does not verify"));
        }
        if proof.proved {
            return Ok(());
        }
        proof.proved = true;
        super::fast::announce(peer, have.as_ref(), &mut self.stats);
        self.rechoke();
        Ok(())
    }

    /// Peers that have not proved the key in time, to close.
    pub(super) fn unproved_expired(&self, now: Instant) -> Vec<PeerKey> {
        self.peers
            .iter()
            .filter(|(_, p)| p.proof.as_ref().is_some_and(|x| !x.proved && now.duration_since(x.since) > PROOF_TIMEOUT))
            .map(|(k, _)| *k)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::torrent::create;
    use crate::torrent::wire::Handshake;
    use crate::workers::WorkerPool;
    use std::net::SocketAddr;
    use std::sync::Arc;

    fn ext_handshake(nonce: &[u8; 32]) -> Vec<u8> {
        let m = bencode::dict([("shardnet_auth", Value::Int(2)), ("ut_metadata", Value::Int(1))]);
        bencode::dict([("m", m), ("shardnet_nonce", Value::bytes(&nonce[..]))]).encode()
    }

    fn proof_msg(mac: [u8; 32]) -> Vec<u8> {
        bencode::dict([("proof", Value::bytes(mac.to_vec()))]).encode()
    }

    /// A private seed: a peer sees nothing until its proof verifies; a proof made for one
    /// connection (or with another key) opens no other; silence is closed after the timeout.
    #[test]
    fn only_a_fresh_proof_of_the_key_admits_a_peer() {
        let dir = std::env::temp_dir().join(format!("shardnet-private-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let src = dir.join("f.gguf");
        std::fs::write(&src, vec![7u8; 300_000]).unwrap();
        let pool = WorkerPool::new("t", 1);
        let m = Arc::new(create::create(&src, None, &pool.handle()).unwrap());
        let now = Instant::now();
        let key = ClusterKey::from_bytes(b"0123456789abcdef0123456789abcdef").unwrap();
        let mut seed = Swarm::seed(m.clone(), &src, [1; 20], now).unwrap();
        seed.set_private(key.clone(), [9; 32]);
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let them = [2u8; 20];
        let their_nonce = [5u8; 32];
        let connect = |seed: &mut Swarm, k: PeerKey| {
            seed.add_peer(k, addr, false, now).unwrap();
            // A plain peer (no Fast bit): our pieces go as a bitfield.
            seed.on_handshake(k, &Handshake::new(m.info_hash, them).without_fast(), false).unwrap();
            seed.on_message(k, Message::Extended { id: 0, payload: &ext_handshake(&their_nonce) }, now).unwrap();
            seed.on_message(k, Message::Interested, now).unwrap();
            seed.private_handshake_fields(k).unwrap()
        };
        let mut bitfield = Vec::new();
        wire::encode(&Message::Bitfield(seed.have().unwrap().as_bytes()), &mut bitfield);
        let ours = connect(&mut seed, 2);
        let out = std::mem::take(&mut seed.peers.get_mut(&2).unwrap().out);
        assert!(!out.windows(bitfield.len()).any(|w| w == bitfield), "no bitfield before the proof");
        assert!(!seed.admitted(2));
        assert!(seed.peers[&2].am_choking, "no unchoke before the proof");
        // The seed proved itself to the peer with the peer's nonce.
        let seed_proof = auth::peer_proof(&key, &m.info_hash.0, &their_nonce, &ours, &[1; 20]);
        assert!(out.windows(32).any(|w| w == seed_proof), "the seed's proof is in its output");
        // A proof under another key: closed.
        let other = ClusterKey::from_bytes(b"another key 12345 another key 12345").unwrap();
        let bad = auth::peer_proof(&other, &m.info_hash.0, &ours, &their_nonce, &them);
        assert!(seed.on_message(2, Message::Extended { id: SHARDNET_AUTH, payload: &proof_msg(bad) }, now).is_err());
        // The right proof: admitted, bitfield sent, unchoked.
        let good = auth::peer_proof(&key, &m.info_hash.0, &ours, &their_nonce, &them);
        seed.on_message(2, Message::Extended { id: SHARDNET_AUTH, payload: &proof_msg(good) }, now).unwrap();
        assert!(seed.admitted(2));
        assert!(!seed.peers[&2].am_choking);
        assert!(seed.peers[&2].out.windows(bitfield.len()).any(|w| w == bitfield));
        // The same proof replayed on a new connection (same peer id, same nonce): refused.
        seed.remove_peer(2);
        connect(&mut seed, 3);
        let replay = Message::Extended { id: SHARDNET_AUTH, payload: &proof_msg(good) };
        assert!(seed.on_message(3, replay, now).is_err());
        assert!(!seed.admitted(3));
        // A peer that never proves anything is closed after the timeout.
        seed.remove_peer(3);
        connect(&mut seed, 4);
        assert!(seed.unproved_expired(now + PROOF_TIMEOUT / 2).is_empty());
        assert!(seed.unproved_expired(now + PROOF_TIMEOUT * 2).contains(&4));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
