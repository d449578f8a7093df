//! What a DHT node keeps for others: write tokens (BEP 5) and the announced
//! peers per key, both bounded and expiring. Sans-IO: time is an argument.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use super::krpc::Id;
use crate::hash;

/// How often the token secret changes; the previous one is still accepted,
/// so a token is good for 5 to 10 minutes (BEP 5).
pub const TOKEN_ROTATION: Duration = Duration::from_secs(5 * 60);
/// How long an announced peer is kept without a re-announce.
pub const PEER_TTL: Duration = Duration::from_secs(30 * 60);
/// Keys stored at most.
pub const MAX_KEYS: usize = 10_000;
/// Peers kept per key at most.
pub const MAX_PEERS_PER_KEY: usize = 200;
/// Peers returned in one get_peers answer.
pub const PEERS_PER_ANSWER: usize = 50;

/// Tokens: SHA-1 of a rotating secret and the asker's IP, truncated.
pub struct Tokens {
    current: [u8; 20],
    previous: [u8; 20],
    rotated: Instant,
}

impl Tokens {
    pub fn new(seed: [u8; 20], now: Instant) -> Tokens {
        Tokens { current: seed, previous: hash::sha1(&seed), rotated: now }
    }

    fn rotate_if_due(&mut self, now: Instant) {
        if now.duration_since(self.rotated) >= TOKEN_ROTATION {
            self.previous = self.current;
            let mut next = self.current.to_vec();
            next.extend_from_slice(&now.duration_since(self.rotated).as_nanos().to_le_bytes());
            self.current = hash::sha1(&next);
            self.rotated = now;
        }
    }

    fn token(secret: &[u8; 20], ip: IpAddr) -> Vec<u8> {
        let mut data = secret.to_vec();
        match ip {
            IpAddr::V4(v4) => data.extend_from_slice(&v4.octets()),
            IpAddr::V6(v6) => data.extend_from_slice(&v6.octets()),
        }
        hash::sha1(&data)[..8].to_vec()
    }

    pub fn issue(&mut self, ip: IpAddr, now: Instant) -> Vec<u8> {
        self.rotate_if_due(now);
        Tokens::token(&self.current, ip)
    }

    pub fn check(&mut self, ip: IpAddr, token: &[u8], now: Instant) -> bool {
        self.rotate_if_due(now);
        token == Tokens::token(&self.current, ip) || token == Tokens::token(&self.previous, ip)
    }
}

/// Announced peers per key.
#[derive(Default)]
pub struct PeerStore {
    keys: HashMap<Id, Vec<(SocketAddr, Instant)>>,
}

impl PeerStore {
    /// Records `peer` under `key`; `false` when the store is full of other keys.
    pub fn announce(&mut self, key: Id, peer: SocketAddr, now: Instant) -> bool {
        if !self.keys.contains_key(&key) && self.keys.len() >= MAX_KEYS {
            self.expire(now);
            if self.keys.len() >= MAX_KEYS {
                return false;
            }
        }
        let peers = self.keys.entry(key).or_default();
        match peers.iter_mut().find(|(p, _)| *p == peer) {
            Some(entry) => entry.1 = now,
            None => {
                if peers.len() >= MAX_PEERS_PER_KEY {
                    // Drop the stalest to keep the newest announcers.
                    let oldest = peers.iter().enumerate().min_by_key(|(_, (_, t))| *t).map(|(i, _)| i).expect("full");
                    peers.swap_remove(oldest);
                }
                peers.push((peer, now));
            }
        }
        true
    }

    /// Up to `PEERS_PER_ANSWER` live peers for `key`, newest first.
    pub fn peers(&self, key: &Id, now: Instant) -> Vec<SocketAddr> {
        let Some(list) = self.keys.get(key) else { return Vec::new() };
        let mut live: Vec<&(SocketAddr, Instant)> =
            list.iter().filter(|(_, t)| now.duration_since(*t) < PEER_TTL).collect();
        live.sort_by_key(|(_, t)| std::cmp::Reverse(*t));
        live.into_iter().take(PEERS_PER_ANSWER).map(|(p, _)| *p).collect()
    }

    pub fn expire(&mut self, now: Instant) {
        self.keys.retain(|_, peers| {
            peers.retain(|(_, t)| now.duration_since(*t) < PEER_TTL);
            !peers.is_empty()
        });
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_per_ip_and_survive_one_rotation() {
        let now = Instant::now();
        let mut t = Tokens::new([1; 20], now);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let tok = t.issue(a, now);
        assert!(t.check(a, &tok, now));
        assert!(!t.check(b, &tok, now), "another address");
        assert!(!t.check(a, b"forged!!", now));
        let later = now + TOKEN_ROTATION;
        assert!(t.check(a, &tok, later), "previous secret still accepted");
        let much_later = later + TOKEN_ROTATION;
        assert!(!t.check(a, &tok, much_later), "two rotations: expired");
    }

    #[test]
    fn store_is_bounded_and_expires() {
        let now = Instant::now();
        let mut s = PeerStore::default();
        let key = Id([7; 20]);
        for i in 0..(MAX_PEERS_PER_KEY as u32 + 50) {
            let p = SocketAddr::new(std::net::Ipv4Addr::from(i).into(), 1);
            assert!(s.announce(key, p, now + Duration::from_millis(i as u64)));
        }
        assert_eq!(s.keys[&key].len(), MAX_PEERS_PER_KEY);
        assert_eq!(s.peers(&key, now).len(), PEERS_PER_ANSWER);
        s.expire(now + PEER_TTL + Duration::from_secs(1));
        assert!(s.is_empty());
        for k in 0..MAX_KEYS as u32 {
            let mut id = [0u8; 20];
            id[..4].copy_from_slice(&k.to_le_bytes());
            s.announce(Id(id), SocketAddr::new([1, 2, 3, 4].into(), 5), now);
        }
        assert!(!s.announce(Id([0xee; 20]), SocketAddr::new([1, 2, 3, 4].into(), 5), now), "full");
    }
}
