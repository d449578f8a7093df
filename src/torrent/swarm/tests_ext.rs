//! The Fast extension (BEP 6) and PEX (BEP 11) of a swarm, without sockets: every message
//! both ways, and bad input for each.

use super::fast::{ALLOWED_FAST_SET, MAX_ALLOWED_IN};
use super::pex::{self, MAX_PEX_TAKE, PEX_INTERVAL, PexMessage, UT_PEX};
use super::*;
use crate::protocol::auth::ClusterKey;
use crate::torrent::create;
use crate::workers::WorkerPool;

struct Fixture {
    dir: std::path::PathBuf,
    src: std::path::PathBuf,
    meta: Arc<Metainfo>,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A 4 MiB file (16 pieces of 256 KiB) and its metainfo.
fn fixture(tag: &str) -> Fixture {
    let dir = std::env::temp_dir().join(format!("shardnet-ext-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("seed")).unwrap();
    let src = dir.join("seed").join("f.gguf");
    let data: Vec<u8> = (0..(4u32 << 20)).map(|i| (i.wrapping_mul(2654435761) >> 11) as u8).collect();
    std::fs::write(&src, data).unwrap();
    let pool = WorkerPool::new("t", 1);
    let meta = Arc::new(create::create(&src, None, &pool.handle()).unwrap());
    assert_eq!(meta.info.pieces.len(), 16);
    Fixture { dir, src, meta }
}

fn seed(f: &Fixture) -> Swarm {
    let mut s = Swarm::seed(f.meta.clone(), &f.src, *b"-SN0001-seedseedseed", Instant::now()).unwrap();
    s.set_listen_port(7000);
    s
}

fn leech(f: &Fixture, magnet: bool) -> Swarm {
    let meta = (!magnet).then(|| f.meta.clone());
    let now = Instant::now();
    // A directory of its own: a second leech over the first one's .part would recheck it.
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let dir = f.dir.join(format!("leech{}", NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)));
    let mut s = Swarm::download(f.meta.info_hash, meta, "f.gguf", &dir, *b"-SN0001-leechleechle", now, false).unwrap();
    s.set_listen_port(7001);
    s
}

/// Adds peer `k` at `addr`, handshaken with (`fast`) or without the Fast bit.
fn connect(s: &mut Swarm, k: PeerKey, addr: &str, fast: bool, outgoing: bool) {
    let now = Instant::now();
    s.add_peer(k, addr.parse().unwrap(), outgoing, now).unwrap();
    let mut id = [b'p'; 20];
    id[..8].copy_from_slice(&k.to_be_bytes());
    let hs = Handshake::new(s.info_hash, id);
    s.on_handshake(k, &if fast { hs } else { hs.without_fast() }, outgoing).unwrap();
}

/// What the swarm queued for peer `k` since the last call, handshake skipped.
fn sent(s: &mut Swarm, k: PeerKey) -> Vec<Message<'static>> {
    let mut out: &'static [u8] = Box::leak(std::mem::take(&mut s.peers.get_mut(&k).unwrap().out).into_boxed_slice());
    if out.first() == Some(&19) {
        out = &out[wire::HANDSHAKE_LEN..];
    }
    let mut msgs = Vec::new();
    while let Some((m, used)) = wire::decode(out, 1 << 20).unwrap() {
        msgs.push(m);
        out = &out[used..];
    }
    msgs
}

fn msg(s: &mut Swarm, k: PeerKey, m: Message<'_>) -> Result<()> {
    s.on_message(k, m, Instant::now())
}

fn requests(msgs: &[Message<'_>]) -> Vec<Block> {
    msgs.iter().filter_map(|m| if let Message::Request(b) = m { Some(*b) } else { None }).collect()
}

#[test]
fn a_seed_sends_have_all_a_fast_peer_and_a_bitfield_a_plain_one() {
    let f = fixture("announce");
    let mut s = seed(&f);
    connect(&mut s, 1, "127.0.0.1:1", true, false);
    let m = sent(&mut s, 1);
    assert!(m.contains(&Message::HaveAll), "{m:?}");
    assert!(!m.iter().any(|m| matches!(m, Message::Bitfield(_))));
    connect(&mut s, 2, "127.0.0.1:2", false, false);
    let m = sent(&mut s, 2);
    assert!(m.iter().any(|m| matches!(m, Message::Bitfield(_))) && !m.contains(&Message::HaveAll), "{m:?}");
    // A leech with nothing, and one without metadata (magnet): HAVE_NONE to a fast peer.
    for magnet in [false, true] {
        let mut l = leech(&f, magnet);
        connect(&mut l, 1, "127.0.0.1:3", true, true);
        assert!(sent(&mut l, 1).contains(&Message::HaveNone));
        connect(&mut l, 2, "127.0.0.1:4", false, true);
        assert!(sent(&mut l, 2).iter().all(|m| matches!(m, Message::Extended { .. })), "a plain peer: nothing");
    }
    assert_eq!(s.stats.have_all_sent, 1);
    assert_eq!(s.stats.fast_peers, 1);
}

#[test]
fn fast_messages_from_a_peer_without_the_bit_close_it() {
    let f = fixture("nofast");
    let b = Block { index: 0, begin: 0, length: 16384 };
    let bad = [
        Message::HaveAll,
        Message::HaveNone,
        Message::RejectRequest(b),
        Message::AllowedFast(1),
        Message::SuggestPiece(1),
    ];
    for (i, m) in bad.into_iter().enumerate() {
        let mut s = leech(&f, false);
        connect(&mut s, 1, "127.0.0.1:1", false, true);
        let e = msg(&mut s, 1, m.clone()).expect_err("a fast message without the bit");
        assert!(e.to_string().contains("did not negotiate the Fast extension"), "{m:?}: {e}");
        assert_eq!(s.stats.fast_closed, 1, "{i}");
    }
}

#[test]
fn pieces_are_announced_once() {
    let f = fixture("once");
    let mut s = leech(&f, false);
    let bits = Bitfield::full(16);
    // HAVE_ALL or HAVE_NONE after a bitfield, after each other, or twice.
    let cases: [(Message<'_>, Message<'_>); 4] = [
        (Message::Bitfield(bits.as_bytes()), Message::HaveAll),
        (Message::Bitfield(bits.as_bytes()), Message::HaveNone),
        (Message::HaveAll, Message::HaveNone),
        (Message::HaveNone, Message::HaveNone),
    ];
    for (k, (first, second)) in cases.into_iter().enumerate() {
        let k = k as PeerKey + 1;
        connect(&mut s, k, &format!("127.0.0.1:{k}"), true, true);
        msg(&mut s, k, first).unwrap();
        assert!(msg(&mut s, k, second).is_err(), "peer {k}");
    }
    assert_eq!(s.stats.fast_closed, 4);
    // A bitfield after HAVE_NONE (aria2, once it has its first piece) is merged, not refused.
    connect(&mut s, 8, "127.0.0.1:8", true, true);
    msg(&mut s, 8, Message::HaveNone).unwrap();
    let mut one = Bitfield::new(16);
    one.set(3);
    msg(&mut s, 8, Message::Bitfield(one.as_bytes())).unwrap();
    assert!(s.peers[&8].bits.get(3));
    // HAVE_ALL: the peer has every piece, and we are interested.
    connect(&mut s, 9, "127.0.0.1:9", true, true);
    msg(&mut s, 9, Message::HaveAll).unwrap();
    assert!(s.peers[&9].bits.is_complete());
    assert!(sent(&mut s, 9).contains(&Message::Interested));
}

/// Leech side: a reject frees the block for another peer; a reject of a block never asked
/// closes; a reject of a block we cancelled is the answer the BEP asks for.
#[test]
fn a_reject_frees_the_block_for_another_peer() {
    let f = fixture("reject");
    let mut s = leech(&f, false);
    for k in [1, 2] {
        connect(&mut s, k, &format!("127.0.0.1:{k}"), true, true);
        msg(&mut s, k, Message::HaveAll).unwrap();
    }
    msg(&mut s, 1, Message::Unchoke).unwrap();
    let asked = requests(&sent(&mut s, 1));
    assert!(!asked.is_empty());
    let b = asked[0];
    // Peer 2 unchokes: it gets other blocks, not b.
    msg(&mut s, 2, Message::Unchoke).unwrap();
    assert!(!requests(&sent(&mut s, 2)).contains(&b));
    // Peer 1 rejects b: b goes to peer 2 (which has room once it delivers or at once if it has).
    s.peers.get_mut(&2).unwrap().requested.clear();
    msg(&mut s, 1, Message::RejectRequest(b)).unwrap();
    assert!(!s.peers[&1].requested.iter().any(|(r, _)| *r == b));
    let to_2 = requests(&sent(&mut s, 2));
    assert!(to_2.contains(&b), "the rejected block asked of the other peer: {to_2:?}");
    assert_eq!(s.stats.rejects_received, 1);
    // The same reject again: b is no longer asked of peer 1, so it was never requested.
    let e = msg(&mut s, 1, Message::RejectRequest(b)).unwrap_err();
    assert!(e.to_string().contains("never requested"), "{e}");
    // A cancelled request (timed out) may be rejected later.
    let mut s = leech(&f, false);
    connect(&mut s, 1, "127.0.0.1:1", true, true);
    msg(&mut s, 1, Message::HaveAll).unwrap();
    msg(&mut s, 1, Message::Unchoke).unwrap();
    let b = requests(&sent(&mut s, 1))[0];
    s.tick(Instant::now() + REQUEST_TIMEOUT + Duration::from_secs(1));
    assert!(sent(&mut s, 1).contains(&Message::Cancel(b)));
    msg(&mut s, 1, Message::RejectRequest(b)).expect("a reject answering our cancel");
}

/// Leech side: a choking fast peer is asked only for its allowed-fast pieces, and its choke
/// keeps what was asked (it will answer each with a block or a reject).
#[test]
fn a_choked_leech_asks_only_allowed_fast_pieces() {
    let f = fixture("allowed");
    let mut s = leech(&f, false);
    connect(&mut s, 1, "127.0.0.1:1", true, true);
    msg(&mut s, 1, Message::HaveAll).unwrap();
    assert!(requests(&sent(&mut s, 1)).is_empty(), "choked: nothing asked");
    msg(&mut s, 1, Message::AllowedFast(5)).unwrap();
    let asked = requests(&sent(&mut s, 1));
    assert!(!asked.is_empty() && asked.iter().all(|b| b.index == 5), "{asked:?}");
    assert_eq!(s.stats.allowed_fast_received, 1);
    msg(&mut s, 1, Message::Unchoke).unwrap();
    let more = requests(&sent(&mut s, 1));
    msg(&mut s, 1, Message::Choke).unwrap();
    assert_eq!(s.peers[&1].requested.len(), asked.len() + more.len(), "a fast choke rejects nothing");
    // Left unanswered, they expire (asked of others), but a choking peer is not snubbing us.
    s.tick(Instant::now() + REQUEST_TIMEOUT * 3);
    assert!(s.peers[&1].requested.iter().all(|(b, _)| b.index == 5), "only allowed-fast pieces asked again");
    assert!(!s.actions.iter().any(|a| matches!(a, Action::Disconnect(..))), "not dropped as snubbed");
    // A plain peer's choke drops everything asked of it.
    connect(&mut s, 2, "127.0.0.1:2", false, true);
    msg(&mut s, 2, Message::Bitfield(Bitfield::full(16).as_bytes())).unwrap();
    msg(&mut s, 2, Message::Unchoke).unwrap();
    assert!(!s.peers[&2].requested.is_empty());
    msg(&mut s, 2, Message::Choke).unwrap();
    assert!(s.peers[&2].requested.is_empty());
}

/// Bounded: 10,000 ALLOWED_FAST messages keep at most MAX_ALLOWED_IN; pieces out of range
/// or already had, and suggestions out of range, are ignored and counted.
#[test]
fn an_allowed_fast_flood_is_bounded_and_bad_indexes_ignored() {
    let f = fixture("flood");
    let mut s = leech(&f, false);
    connect(&mut s, 1, "127.0.0.1:1", true, true);
    for i in 0..10_000u32 {
        msg(&mut s, 1, Message::AllowedFast(i % 16)).unwrap();
    }
    assert!(s.peers[&1].fast.allowed_in.len() <= 16);
    for i in 16..10_016u32 {
        msg(&mut s, 1, Message::AllowedFast(i)).unwrap();
    }
    assert!(s.peers[&1].fast.allowed_in.len() <= MAX_ALLOWED_IN);
    assert!(s.stats.fast_ignored >= 10_000, "out of range: ignored, counted ({})", s.stats.fast_ignored);
    // Before the metadata (magnet) no index is out of range: the set's bound is what holds.
    let mut m = leech(&f, true);
    connect(&mut m, 1, "127.0.0.1:1", true, true);
    for i in 0..10_000u32 {
        msg(&mut m, 1, Message::AllowedFast(i)).unwrap();
    }
    assert_eq!(m.peers[&1].fast.allowed_in.len(), MAX_ALLOWED_IN);
    assert_eq!(m.stats.fast_ignored, (10_000 - MAX_ALLOWED_IN) as u64);
    msg(&mut s, 1, Message::SuggestPiece(16)).unwrap();
    msg(&mut s, 1, Message::SuggestPiece(u32::MAX)).unwrap();
    assert!(s.peers[&1].fast.suggested.is_empty(), "out of range: ignored");
    // A suggested piece is asked first once the peer unchokes.
    let mut s = leech(&f, false);
    connect(&mut s, 1, "127.0.0.1:1", true, true);
    msg(&mut s, 1, Message::SuggestPiece(11)).unwrap();
    assert_eq!(s.stats.suggests_received, 1);
    msg(&mut s, 1, Message::HaveAll).unwrap();
    msg(&mut s, 1, Message::Unchoke).unwrap();
    let asked = requests(&sent(&mut s, 1));
    assert_eq!(asked.first().map(|b| b.index), Some(11), "{asked:?}");
}

/// Seed side: every request of a fast peer is answered, by a block or a reject; a plain
/// peer's request while choked is dropped silently, as before.
#[test]
fn every_request_of_a_fast_peer_gets_a_block_or_a_reject() {
    let f = fixture("answer");
    let mut s = seed(&f);
    connect(&mut s, 1, "127.0.0.1:1", true, false);
    sent(&mut s, 1);
    let b = Block { index: 2, begin: 0, length: 16384 };
    // Choked (not interested yet): rejected.
    msg(&mut s, 1, Message::Request(b)).unwrap();
    assert_eq!(sent(&mut s, 1), vec![Message::RejectRequest(b)]);
    // Interested: the allowed-fast set (BEP 6) and an unchoke.
    msg(&mut s, 1, Message::Interested).unwrap();
    let m = sent(&mut s, 1);
    let set = fast::allowed_fast_set("127.0.0.1".parse().unwrap(), &f.meta.info_hash, 16, ALLOWED_FAST_SET);
    let allowed: Vec<u32> =
        m.iter().filter_map(|m| if let Message::AllowedFast(i) = m { Some(*i) } else { None }).collect();
    assert_eq!(allowed, set);
    assert!(m.contains(&Message::Unchoke));
    // Queued, then cancelled: rejected; not interested with requests queued: all rejected.
    msg(&mut s, 1, Message::Request(b)).unwrap();
    msg(&mut s, 1, Message::Cancel(b)).unwrap();
    assert_eq!(sent(&mut s, 1), vec![Message::RejectRequest(b)]);
    let c = Block { index: 3, begin: 16384, length: 16384 };
    msg(&mut s, 1, Message::Request(b)).unwrap();
    msg(&mut s, 1, Message::Request(c)).unwrap();
    msg(&mut s, 1, Message::NotInterested).unwrap();
    let m = sent(&mut s, 1);
    assert!(m.contains(&Message::RejectRequest(b)) && m.contains(&Message::RejectRequest(c)), "{m:?}");
    assert!(!s.has_queued(1));
    // A plain peer, choked: its request is dropped without a word.
    connect(&mut s, 2, "127.0.0.1:2", false, false);
    sent(&mut s, 2);
    msg(&mut s, 2, Message::Request(b)).unwrap();
    assert!(sent(&mut s, 2).is_empty());
    assert!(!s.has_queued(2));
}

/// Seed side: with every slot taken, a choked fast peer is served its allowed-fast pieces and
/// rejected the rest.
#[test]
fn a_choked_fast_peer_is_served_its_allowed_fast_pieces() {
    let f = fixture("served");
    let mut s = seed(&f);
    for k in 1..=UNCHOKE_SLOTS as u64 {
        connect(&mut s, k, &format!("127.0.0.1:{k}"), false, false);
        msg(&mut s, k, Message::Interested).unwrap();
    }
    let k = 100;
    connect(&mut s, k, "10.1.2.3:4", true, false);
    msg(&mut s, k, Message::Interested).unwrap();
    assert!(s.peers[&k].am_choking, "no slot left");
    let set = fast::allowed_fast_set("10.1.2.3".parse().unwrap(), &f.meta.info_hash, 16, ALLOWED_FAST_SET);
    let other = (0..16).find(|i| !set.contains(i)).unwrap();
    sent(&mut s, k);
    let ok = Block { index: set[0], begin: 0, length: 16384 };
    let no = Block { index: other, begin: 0, length: 16384 };
    msg(&mut s, k, Message::Request(ok)).unwrap();
    msg(&mut s, k, Message::Request(no)).unwrap();
    assert_eq!(sent(&mut s, k), vec![Message::RejectRequest(no)]);
    let (mut budget, mut served) = (u64::MAX, Vec::new());
    s.serve(k, 1 << 20, &mut budget, &mut served, Instant::now());
    assert_eq!(served.len(), 1);
    assert_eq!(served[0].header, wire::piece_header(ok.index, 0, 16384));
}

/// Red-team rounds 11 and 12: a peer that only pokes (a 1-byte request of an allowed-fast piece
/// now and then) is not useful, nor one that asks the same whole block again and again; a piece's
/// worth ([`USEFUL_BYTES`]) of distinct blocks served, in any number of requests, is.
#[test]
fn a_peer_is_useful_for_the_distinct_bytes_it_moved_not_for_its_requests() {
    let f = fixture("useful");
    let mut s = seed(&f);
    for k in 1..=UNCHOKE_SLOTS as u64 {
        connect(&mut s, k, &format!("127.0.0.1:{k}"), false, false);
        msg(&mut s, k, Message::Interested).unwrap();
    }
    let k = 100;
    connect(&mut s, k, "10.1.2.3:4", true, false);
    let t0 = s.peers[&k].useful_at;
    msg(&mut s, k, Message::Interested).unwrap();
    let set = fast::allowed_fast_set("10.1.2.3".parse().unwrap(), &f.meta.info_hash, 16, ALLOWED_FAST_SET);
    let serve = |s: &mut Swarm, now: Instant| {
        let (mut budget, mut served) = (u64::MAX, Vec::new());
        s.serve(k, 1 << 20, &mut budget, &mut served, now)
    };
    // Pokes, each served: the peer's usefulness does not move.
    let mut now = t0;
    for i in 0..100u32 {
        now += Duration::from_secs(20);
        let poke = Block { index: set[0], begin: i, length: 1 };
        s.on_message(k, Message::Request(poke), now).unwrap();
        assert_eq!(serve(&mut s, now), 1);
        assert_eq!(s.peers[&k].useful_at, t0, "a 1-byte request made the peer useful");
    }
    // The same whole block, far more than a piece's worth of bytes: still not useful.
    let same = Block { index: set[1], begin: 0, length: 16384 };
    for _ in 0..2 * USEFUL_BYTES / 16384 {
        now += Duration::from_secs(1);
        s.on_message(k, Message::Request(same), now).unwrap();
        assert_eq!(serve(&mut s, now), 16384);
        assert_eq!(s.peers[&k].useful_at, t0, "the same block again made the peer useful");
    }
    // Distinct blocks: useful once a piece's worth is counted (the poked span and the repeated
    // block once each, then the rest of the piece set[1] and of another).
    let pieces = [set[1], set[2]];
    let blocks =
        pieces.iter().flat_map(|&index| (0..16u32).map(move |i| Block { index, begin: i * 16384, length: 16384 }));
    let mut counted = 1 + 16384;
    for b in blocks.skip(1) {
        now += Duration::from_secs(1);
        s.on_message(k, Message::Request(b), now).unwrap();
        assert_eq!(serve(&mut s, now), 16384);
        counted += 16384;
        if counted >= USEFUL_BYTES {
            assert_eq!(s.peers[&k].useful_at, now, "a piece's worth of distinct blocks");
            return;
        }
        assert_eq!(s.peers[&k].useful_at, t0, "{counted} bytes counted");
    }
    panic!("never useful");
}

// ---- PEX (BEP 11) ----

fn pex_handshake(id: u8, port: Option<u16>) -> Vec<u8> {
    let mut d = vec![("m", bencode::dict([("ut_pex", Value::Int(id as i64))]))];
    if let Some(p) = port {
        d.push(("p", Value::Int(p as i64)));
    }
    bencode::dict(d).encode()
}

fn pex_sent(msgs: &[Message<'static>], id: u8) -> Vec<PexMessage<'static>> {
    msgs.iter()
        .filter_map(|m| match m {
            Message::Extended { id: i, payload } if *i == id => Some(PexMessage::parse(payload).unwrap()),
            _ => None,
        })
        .collect()
}

fn ext_handshake_sent(msgs: &[Message<'static>]) -> Value<'static> {
    msgs.iter()
        .find_map(|m| match m {
            Message::Extended { id: 0, payload } => Some(bencode::decode(payload).unwrap()),
            _ => None,
        })
        .expect("an extension handshake")
}

#[test]
fn pex_tells_each_peer_the_others_at_most_once_a_minute() {
    let f = fixture("pexsend");
    let mut s = seed(&f);
    let now = Instant::now();
    // 1 speaks PEX; 2 we dialled; 3 dialled us and said its port; 4 dialled us and did not.
    connect(&mut s, 1, "127.0.0.1:5001", true, false);
    let hs = ext_handshake_sent(&sent(&mut s, 1));
    assert_eq!(hs.get("m").and_then(|m| m.get("ut_pex")).and_then(Value::as_int), Some(UT_PEX as i64));
    assert_eq!(hs.get("p").and_then(Value::as_int), Some(7000), "our listening port");
    msg(&mut s, 1, Message::Extended { id: 0, payload: &pex_handshake(9, Some(5001)) }).unwrap();
    connect(&mut s, 2, "127.0.0.1:5002", true, true);
    connect(&mut s, 3, "127.0.0.1:40003", true, false);
    msg(&mut s, 3, Message::Extended { id: 0, payload: &pex_handshake(0, Some(5003)) }).unwrap();
    connect(&mut s, 4, "127.0.0.1:40004", true, false);
    sent(&mut s, 1);
    s.send_pex(now);
    let m = pex_sent(&sent(&mut s, 1), 9);
    assert_eq!(m.len(), 1);
    let added: Vec<(SocketAddr, u8)> = m[0].added().collect();
    assert_eq!(
        added,
        vec![("127.0.0.1:5002".parse().unwrap(), pex::FLAG_REACHABLE), ("127.0.0.1:5003".parse().unwrap(), 0)],
        "the peer we dialled (reachable) and the one that told its port; not itself, not 4"
    );
    // Within the minute: nothing, whatever changes.
    connect(&mut s, 5, "127.0.0.1:5005", true, true);
    s.remove_peer(2);
    s.send_pex(now + PEX_INTERVAL / 2);
    assert!(pex_sent(&sent(&mut s, 1), 9).is_empty());
    // A minute on: 5 added, 2 dropped.
    s.send_pex(now + PEX_INTERVAL);
    let m = pex_sent(&sent(&mut s, 1), 9);
    assert_eq!(m[0].added().map(|(a, _)| a).collect::<Vec<_>>(), vec!["127.0.0.1:5005".parse().unwrap()]);
    assert_eq!(m[0].dropped, 1);
    // No change: no (empty) message.
    s.send_pex(now + PEX_INTERVAL * 3);
    assert!(pex_sent(&sent(&mut s, 1), 9).is_empty());
    // 60 peers: at most 50 added in one message, the rest a minute later.
    for k in 10..70u64 {
        connect(&mut s, k, &format!("127.0.0.1:{}", 6000 + k), true, true);
    }
    s.send_pex(now + PEX_INTERVAL * 4);
    assert_eq!(pex_sent(&sent(&mut s, 1), 9)[0].added_len(), pex::MAX_PEX_ADDED);
    s.send_pex(now + PEX_INTERVAL * 5);
    assert_eq!(pex_sent(&sent(&mut s, 1), 9)[0].added_len(), 60 - pex::MAX_PEX_ADDED);
    assert_eq!(s.stats.pex_sent, 4);
}

fn compact_peers(n: usize, first: [u8; 2]) -> Vec<u8> {
    (0..n).flat_map(|i| [first[0], first[1], (i >> 8) as u8, i as u8, 0x1a, 0xe1]).collect()
}

fn pex_payload(added: Vec<u8>) -> Vec<u8> {
    bencode::dict([("added", Value::bytes(added))]).encode()
}

fn pex_action(s: &mut Swarm) -> Vec<SocketAddr> {
    std::mem::take(&mut s.actions)
        .into_iter()
        .flat_map(|a| if let Action::PexPeers(v) = a { v } else { Vec::new() })
        .collect()
}

/// A PEX message listing 10,000 peers: at most MAX_PEX_TAKE taken; a second message within
/// the minute ignored; the swarm's per-minute budget holds over several peers.
#[test]
fn a_pex_message_of_10000_peers_adds_at_most_the_cap() {
    let f = fixture("pex10k");
    let mut s = leech(&f, false);
    let now = Instant::now();
    connect(&mut s, 1, "8.8.8.8:1", true, true);
    let big = pex_payload(compact_peers(10_000, [9, 9]));
    s.on_message(1, Message::Extended { id: UT_PEX, payload: &big }, now).unwrap();
    let got = pex_action(&mut s);
    assert_eq!(got.len(), MAX_PEX_TAKE);
    assert_eq!(s.stats.pex_ignored, (10_000 - MAX_PEX_TAKE) as u64);
    // Again at once: ignored (one message per peer per PEX_MIN_GAP).
    let other = pex_payload(compact_peers(10, [7, 7]));
    s.on_message(1, Message::Extended { id: UT_PEX, payload: &other }, now + Duration::from_secs(1)).unwrap();
    assert!(pex_action(&mut s).is_empty());
    // Other peers within the minute: the swarm's budget (100 a minute) is the bound.
    let mut total = got.len();
    for k in 2..6u64 {
        connect(&mut s, k, &format!("8.8.4.{k}:1"), true, true);
        let p = pex_payload(compact_peers(100, [20, k as u8]));
        s.on_message(k, Message::Extended { id: UT_PEX, payload: &p }, now + Duration::from_secs(2)).unwrap();
        total += pex_action(&mut s).len();
    }
    assert_eq!(total, pex::MAX_PEX_PER_MINUTE);
    // Known addresses are not taken twice.
    s.on_message(1, Message::Extended { id: UT_PEX, payload: &big }, now + PEX_INTERVAL * 2).unwrap();
    let again = pex_action(&mut s);
    assert!(again.iter().all(|a| !got.contains(a)));
}

/// Addresses a stranger may not point us at, IPv6 entries, and malformed messages.
#[test]
fn pex_addresses_are_filtered_and_malformed_messages_close() {
    let f = fixture("pexbad");
    let mut s = leech(&f, false);
    let now = Instant::now();
    connect(&mut s, 1, "8.8.8.8:1", true, true);
    let mut added = Vec::new();
    for (ip, port) in [
        ([127, 0, 0, 1], 80u16),
        ([10, 0, 0, 1], 80),
        ([192, 168, 1, 1], 80),
        ([1, 2, 3, 4], 0),
        ([224, 0, 0, 1], 80),
        ([0, 0, 0, 0], 80),
        ([1, 2, 3, 4], 6881),
    ] {
        added.extend_from_slice(&ip);
        added.extend_from_slice(&u16::to_be_bytes(port));
    }
    let mut v6 = "2001:db8::1".parse::<std::net::Ipv6Addr>().unwrap().octets().to_vec();
    v6.extend_from_slice(&6881u16.to_be_bytes());
    let p = bencode::dict([
        ("added", Value::bytes(added)),
        ("added6", Value::bytes(v6)),
        ("added6.f", Value::bytes(vec![2])),
    ])
    .encode();
    s.on_message(1, Message::Extended { id: UT_PEX, payload: &p }, now).unwrap();
    assert_eq!(
        pex_action(&mut s),
        vec!["1.2.3.4:6881".parse().unwrap(), "[2001:db8::1]:6881".parse().unwrap()],
        "only the public unicast addresses with a port, v6 included"
    );
    // From a loopback peer, loopback addresses are fine (a test network).
    connect(&mut s, 2, "127.0.0.1:2", true, true);
    let p = pex_payload(vec![127, 0, 0, 1, 0x1a, 0xe1]);
    s.on_message(2, Message::Extended { id: UT_PEX, payload: &p }, now).unwrap();
    assert_eq!(pex_action(&mut s), vec!["127.0.0.1:6881".parse().unwrap()]);
    // Malformed: closed, counted.
    let bad: [&[u8]; 5] = [b"le", b"d5:added7:abcdefge", b"d5:addedi5ee", b"d8:dropped5:abcdee", b"not bencode"];
    for (i, b) in bad.into_iter().enumerate() {
        let k = 10 + i as u64;
        connect(&mut s, k, &format!("8.8.8.{k}:1"), true, true);
        assert!(s.on_message(k, Message::Extended { id: UT_PEX, payload: b }, now).is_err(), "{i}");
    }
    assert_eq!(s.stats.pex_closed, 5);
    // A seed takes nothing (it dials nobody), but counts the message.
    let mut seed = seed(&f);
    connect(&mut seed, 1, "8.8.8.8:1", true, true);
    seed.on_message(1, Message::Extended { id: UT_PEX, payload: &pex_payload(compact_peers(5, [9, 9])) }, now).unwrap();
    assert!(pex_action(&mut seed).is_empty());
    assert_eq!(seed.stats.pex_received, 1);
}

#[test]
fn a_private_swarm_speaks_no_pex() {
    let f = fixture("pexpriv");
    let mut s = leech(&f, false);
    s.set_private(ClusterKey::from_bytes(b"0123456789abcdef0123456789abcdef").unwrap(), [3; 32]);
    let now = Instant::now();
    connect(&mut s, 1, "8.8.8.8:1", true, true);
    let hs = ext_handshake_sent(&sent(&mut s, 1));
    assert!(hs.get("m").unwrap().get("ut_pex").is_none(), "not advertised");
    s.on_message(1, Message::Extended { id: UT_PEX, payload: &pex_payload(compact_peers(5, [9, 9])) }, now).unwrap();
    assert!(pex_action(&mut s).is_empty(), "nothing taken");
    assert_eq!(s.stats.pex_ignored, 1);
    s.peers.get_mut(&1).unwrap().pex.their_id = Some(9);
    connect(&mut s, 2, "8.8.4.4:1", true, true);
    s.send_pex(now);
    assert!(pex_sent(&sent(&mut s, 1), 9).is_empty(), "nothing sent");
}

#[test]
fn pex_messages_round_trip() {
    let added: Vec<(SocketAddr, u8)> =
        vec![("1.2.3.4:5".parse().unwrap(), 0x12), ("[2001:db8::7]:6881".parse().unwrap(), 0x02)];
    let dropped: Vec<SocketAddr> = vec!["5.6.7.8:9".parse().unwrap(), "[::1]:2".parse().unwrap()];
    let bytes = pex::encode(&added, &dropped);
    assert!(bytes.starts_with(b"d5:added6:\x01\x02\x03\x04\x00\x05"), "{bytes:?}");
    let m = PexMessage::parse(&bytes).unwrap();
    assert_eq!(m.added().collect::<Vec<_>>(), added);
    assert_eq!(m.dropped, 2);
    // Keys in any order (some clients do not sort), and a missing added.f: flags 0.
    let m = PexMessage::parse(b"d7:dropped0:5:added6:\x01\x02\x03\x04\x00\x05e").unwrap();
    assert_eq!(m.added().collect::<Vec<_>>(), vec![("1.2.3.4:5".parse().unwrap(), 0)]);
}

/// A `reqq` past 64 bits (2^66) in an extension handshake is out of range like any too-large
/// `reqq`: clamped, and the peer stays (the whole handshake used to fail to decode, dropping it).
#[test]
fn an_extension_handshake_with_a_reqq_past_64_bits_keeps_the_peer() {
    let f = fixture("bigreqq");
    let mut l = leech(&f, false);
    connect(&mut l, 1, "10.0.0.1:6881", true, true);
    let payload = b"d1:md6:ut_pexi1ee4:reqqi73786976294838206464ee";
    l.on_message(1, Message::Extended { id: 0, payload }, Instant::now()).expect("the peer stays");
    let peer = l.peers.get(&1).expect("still connected");
    assert_eq!(peer.pipe.reqq, MAX_PEER_REQUESTS, "clamped like any too-large reqq");
    // A negative one past 64 bits is ignored: the default stays.
    connect(&mut l, 2, "10.0.0.2:6881", true, true);
    let before = l.peers.get(&2).unwrap().pipe.reqq;
    l.on_message(2, Message::Extended { id: 0, payload: b"d4:reqqi-73786976294838206464ee" }, Instant::now()).unwrap();
    assert_eq!(l.peers.get(&2).unwrap().pipe.reqq, before);
}
