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
/// Keys stored at most, by default (`--dht-max-keys`).
pub const MAX_KEYS: usize = 10_000;
/// Peers kept per key at most, by default (`--dht-max-peers-per-key`).
pub const MAX_PEERS_PER_KEY: usize = 200;
/// Peers returned in one get_peers answer.
pub const PEERS_PER_ANSWER: usize = 50;
/// Entries one announcer (see [`announcer`]) keeps under one key; its next announce there
/// replaces its oldest, so one host cannot fill a key's answers with ports.
pub const MAX_PER_ANNOUNCER_PER_KEY: usize = 2;
/// Entries one announcer keeps over all keys, by default (`--dht-max-per-announcer`; 2.5% of
/// [`MAX_KEYS`]: room for a node seeding many shards in a small cluster, where every DHT node
/// stores every key); past it its announces of new entries are refused, so one host cannot fill
/// the store.
pub const MAX_PER_ANNOUNCER: usize = MAX_KEYS / 40;

/// The store's bounds (flags of `shard_listener`; defaults [`MAX_KEYS`], [`MAX_PEERS_PER_KEY`],
/// [`MAX_PER_ANNOUNCER`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoreLimits {
    /// Live keys at most; an announce of a new key past it is refused ([`Refused::Full`]).
    pub max_keys: usize,
    /// Peers per key at most; past it the stalest is dropped for the newcomer.
    pub max_peers_per_key: usize,
    /// Entries one announcer holds over all keys at most ([`Refused::AnnouncerQuota`]).
    pub max_per_announcer: usize,
}

impl Default for StoreLimits {
    fn default() -> StoreLimits {
        StoreLimits { max_keys: MAX_KEYS, max_peers_per_key: MAX_PEERS_PER_KEY, max_per_announcer: MAX_PER_ANNOUNCER }
    }
}

/// Whom the per-announcer quotas count by: an IPv4 address or an IPv6 /64 (as the connection
/// caps, [`crate::node::limits::ip_key`]); a loopback address counts by address and port,
/// since local nodes (tests, one-machine clusters) share 127.0.0.1 (as `budget::key`).
pub fn announcer(peer: SocketAddr) -> SocketAddr {
    if peer.ip().is_loopback() { peer } else { SocketAddr::new(crate::node::limits::ip_key(peer.ip()), 0) }
}

/// Why an announce was not stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// `max_keys` other keys are live.
    Full,
    /// The announcer holds `max_per_announcer` entries already.
    AnnouncerQuota,
}

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
    /// Entries held per [`announcer`] over all keys.
    per_announcer: HashMap<SocketAddr, usize>,
    limits: StoreLimits,
}

impl PeerStore {
    /// An empty store kept within `limits`.
    pub fn new(limits: StoreLimits) -> PeerStore {
        PeerStore { limits, ..PeerStore::default() }
    }

    /// Records `peer` under `key` (a re-announce refreshes it). A new entry from an announcer
    /// already holding [`MAX_PER_ANNOUNCER_PER_KEY`] under `key` replaces its oldest there.
    /// Errors: [`Refused::Full`] when the store holds `max_keys` other live keys,
    /// [`Refused::AnnouncerQuota`] when the announcer holds `max_per_announcer` entries.
    pub fn announce(&mut self, key: Id, peer: SocketAddr, now: Instant) -> Result<(), Refused> {
        let who = announcer(peer);
        if let Some(entry) = self.keys.get_mut(&key).and_then(|ps| ps.iter_mut().find(|(p, _)| *p == peer)) {
            entry.1 = now;
            return Ok(());
        }
        let mine = |p: &SocketAddr| announcer(*p) == who;
        if let Some(peers) = self.keys.get_mut(&key)
            && peers.iter().filter(|(p, _)| mine(p)).count() >= MAX_PER_ANNOUNCER_PER_KEY
        {
            let oldest = (peers.iter().enumerate().filter(|(_, (p, _))| mine(p)))
                .min_by_key(|(_, (_, t))| *t)
                .map(|(i, _)| i)
                .expect("at the quota");
            peers[oldest] = (peer, now);
            return Ok(());
        }
        // No sweep here (one per refused packet would be a scan of the store per packet): the
        // periodic `expire` frees an announcer's stale entries.
        let StoreLimits { max_keys, max_peers_per_key, max_per_announcer } = self.limits;
        if self.per_announcer.get(&who).copied().unwrap_or(0) >= max_per_announcer {
            return Err(Refused::AnnouncerQuota);
        }
        if !self.keys.contains_key(&key) && self.keys.len() >= max_keys {
            self.expire(now);
            if self.keys.len() >= max_keys {
                return Err(Refused::Full);
            }
        }
        let peers = self.keys.entry(key).or_default();
        if peers.len() >= max_peers_per_key {
            // Drop the stalest to keep the newest announcers.
            let oldest = peers.iter().enumerate().min_by_key(|(_, (_, t))| *t).map(|(i, _)| i).expect("full");
            let (gone, _) = peers.swap_remove(oldest);
            Self::forget(&mut self.per_announcer, gone);
        }
        peers.push((peer, now));
        *self.per_announcer.entry(who).or_default() += 1;
        Ok(())
    }

    fn forget(per_announcer: &mut HashMap<SocketAddr, usize>, peer: SocketAddr) {
        let who = announcer(peer);
        if let Some(n) = per_announcer.get_mut(&who) {
            *n -= 1;
            if *n == 0 {
                per_announcer.remove(&who);
            }
        }
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
        let per_announcer = &mut self.per_announcer;
        self.keys.retain(|_, peers| {
            peers.retain(|&(p, t)| {
                let live = now.duration_since(t) < PEER_TTL;
                if !live {
                    Self::forget(per_announcer, p);
                }
                live
            });
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
            assert!(s.announce(key, p, now + Duration::from_millis(i as u64)).is_ok());
        }
        assert_eq!(s.keys[&key].len(), MAX_PEERS_PER_KEY);
        assert_eq!(s.peers(&key, now).len(), PEERS_PER_ANSWER);
        s.expire(now + PEER_TTL + Duration::from_secs(1));
        assert!(s.is_empty());
        for k in 0..MAX_KEYS as u32 {
            let mut id = [0u8; 20];
            id[..4].copy_from_slice(&k.to_le_bytes());
            let from = SocketAddr::new(std::net::Ipv4Addr::from(0x0b00_0000 + k).into(), 5);
            s.announce(Id(id), from, now).unwrap();
        }
        assert_eq!(s.announce(Id([0xee; 20]), SocketAddr::new([1, 2, 3, 4].into(), 5), now), Err(Refused::Full));
    }

    fn at(addr: &str) -> SocketAddr {
        addr.parse().unwrap()
    }

    /// Red-team finding: one IP announcing 205 ports on one key filled every get_peers answer.
    #[test]
    fn one_host_keeps_few_entries_per_key_and_its_newest_replace_its_oldest() {
        let now = Instant::now();
        let mut s = PeerStore::default();
        let key = Id([3; 20]);
        s.announce(key, at("10.9.9.9:1"), now).unwrap();
        for port in 1..=205u16 {
            s.announce(key, SocketAddr::new([10, 0, 0, 1].into(), port), now + Duration::from_millis(port.into()))
                .unwrap();
        }
        // One /64 is one host.
        for (i, a) in ["[2001:db8::1]:9", "[2001:db8::2]:9", "[2001:db8::3]:9"].iter().enumerate() {
            s.announce(key, at(a), now + Duration::from_secs(1 + i as u64)).unwrap();
        }
        let got = s.peers(&key, now + Duration::from_secs(5));
        let host = |ip: &str| got.iter().filter(|p| p.ip().to_string() == ip).count();
        assert_eq!(got.len(), 1 + 2 * MAX_PER_ANNOUNCER_PER_KEY, "{got:?}");
        assert_eq!(host("10.9.9.9"), 1);
        assert!(got.contains(&at("10.0.0.1:205")) && got.contains(&at("10.0.0.1:204")), "newest kept: {got:?}");
        assert!(!got.contains(&at("[2001:db8::1]:9")), "the /64's oldest replaced: {got:?}");
        // Re-announcing a kept entry refreshes it without displacing another.
        s.announce(key, at("10.0.0.1:204"), now + Duration::from_secs(9)).unwrap();
        assert!(s.peers(&key, now + Duration::from_secs(9)).contains(&at("10.0.0.1:205")));
        // Loopback counts by address and port: local nodes sharing 127.0.0.1 are all kept.
        for port in 1..=10u16 {
            s.announce(key, SocketAddr::new([127, 0, 0, 1].into(), port), now).unwrap();
        }
        assert_eq!(s.peers(&key, now).iter().filter(|p| p.ip().is_loopback()).count(), 10);
    }

    /// The flags' limits (`--dht-max-keys`, `--dht-max-peers-per-key`, `--dht-max-per-announcer`)
    /// are the ones applied.
    #[test]
    fn configured_limits_bound_the_store() {
        let now = Instant::now();
        let limits = StoreLimits { max_keys: 3, max_peers_per_key: 4, max_per_announcer: 2 };
        let mut s = PeerStore::new(limits);
        let key = |k: u8| Id([k; 20]);
        let host = |i: u32| SocketAddr::new(std::net::Ipv4Addr::from(0x0a00_0000 + i).into(), 1);
        s.announce(key(1), host(1), now).unwrap();
        s.announce(key(2), host(1), now).unwrap();
        assert_eq!(s.announce(key(3), host(1), now), Err(Refused::AnnouncerQuota), "2 entries per announcer");
        s.announce(key(3), host(2), now).unwrap();
        assert_eq!(s.announce(key(4), host(3), now), Err(Refused::Full), "3 keys");
        for i in 10..20 {
            s.announce(key(1), host(i), now + Duration::from_secs(i.into())).unwrap();
        }
        let kept = s.peers(&key(1), now + Duration::from_secs(30));
        assert_eq!(kept.len(), 4, "4 peers per key: {kept:?}");
        assert!(kept.contains(&host(19)) && !kept.contains(&host(1)), "the stalest gave way: {kept:?}");
    }

    /// Red-team finding: one IP filled all MAX_KEYS keys, refusing every other announcer.
    #[test]
    fn one_host_cannot_fill_the_store() {
        let now = Instant::now();
        let mut s = PeerStore::default();
        let attacker = at("10.0.0.1:6881");
        let key = |k: u32| {
            let mut id = [0u8; 20];
            id[..4].copy_from_slice(&k.to_le_bytes());
            Id(id)
        };
        let mut refused = 0;
        for k in 0..MAX_KEYS as u32 {
            match s.announce(key(k), attacker, now) {
                Ok(()) => {}
                Err(e) => {
                    assert_eq!(e, Refused::AnnouncerQuota);
                    refused += 1;
                }
            }
        }
        assert_eq!(s.len(), MAX_PER_ANNOUNCER);
        assert_eq!(refused, MAX_KEYS - MAX_PER_ANNOUNCER);
        // Everyone else is still served, on old keys and new.
        s.announce(key(0), at("10.0.0.2:1"), now).unwrap();
        s.announce(Id([0xee; 20]), at("10.0.0.2:1"), now).unwrap();
        // A re-announce at the quota refreshes.
        s.announce(key(0), attacker, now + Duration::from_secs(60)).unwrap();
        // Expired entries give the quota back.
        s.expire(now + PEER_TTL + Duration::from_secs(1));
        assert_eq!(s.len(), 1, "key 0, refreshed");
        s.announce(key(MAX_KEYS as u32 + 1), attacker, now + PEER_TTL + Duration::from_secs(2)).unwrap();
    }
}
