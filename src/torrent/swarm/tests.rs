//! The swarm without sockets: two swarms wired to each other in memory.

use super::*;
use crate::torrent::create;
use crate::workers::WorkerPool;

/// Moves one side's queued bytes into the other swarm, handshake first.
fn deliver(from: &mut Swarm, fk: PeerKey, to: &mut Swarm, tk: PeerKey, inbox: &mut Vec<u8>, outgoing: bool) {
    let out = std::mem::take(&mut from.peers.get_mut(&fk).unwrap().out);
    inbox.extend_from_slice(&out);
    let now = Instant::now();
    loop {
        if !to.peers[&tk].handshaken {
            let Some(hs) = Handshake::decode(inbox).unwrap() else { return };
            inbox.drain(..wire::HANDSHAKE_LEN);
            to.on_handshake(tk, &hs, outgoing).unwrap();
            continue;
        }
        let Some((_, used)) = wire::decode(inbox, to.max_message()).unwrap() else { return };
        // An owned copy of the message: `inbox` is drained first.
        let bytes: Vec<u8> = inbox.drain(..used).collect();
        let (m, _) = wire::decode(&bytes, to.max_message()).unwrap().unwrap();
        to.on_message(tk, m, now).unwrap();
    }
}

/// Runs hash actions at once; returns whether the download completed.
fn run_actions(s: &mut Swarm) -> bool {
    let mut complete = false;
    for a in std::mem::take(&mut s.actions) {
        match a {
            // What the node's hash worker and disk thread do (node/peer_wire.rs `run_action`):
            // `PieceData::verify`, then the writer for a verified piece gathered in memory.
            Action::Hash { piece, data, offset, len, expected, blocks } => {
                let (ok, digests) = data.verify(offset, len, expected, blocks);
                if let (true, PieceData::Memory(buf, writer)) = (ok, &data) {
                    writer.write(offset, buf.as_slice()).unwrap();
                }
                s.on_hashed(piece, ok, &digests);
            }
            Action::Complete => complete = true,
            // What the node does once its admission checks pass.
            Action::MetadataReady => {
                assert!(s.storage_mut().is_none(), "no file before the metadata is admitted");
                s.accept_metadata().unwrap();
            }
            _ => {}
        }
    }
    complete
}

#[test]
fn a_seed_and_a_leech_exchange_a_file_without_sockets() {
    let dir = std::env::temp_dir().join(format!("shardnet-swarm-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("seed")).unwrap();
    let data: Vec<u8> = (0..700_000u32).map(|i| (i.wrapping_mul(2654435761) >> 7) as u8).collect();
    let src = dir.join("seed").join("f.gguf");
    std::fs::write(&src, &data).unwrap();
    let pool = WorkerPool::new("t", 1);
    let m = Arc::new(create::create(&src, None, &pool.handle()).unwrap());
    let now = Instant::now();
    let mut seed = Swarm::seed(m.clone(), &src, *b"-SN0001-seedseedseed", now).unwrap();
    // The leech has only the info hash: the metadata comes over ut_metadata.
    let mut leech =
        Swarm::download(m.info_hash, None, "f.gguf", &dir.join("leech"), *b"-SN0001-leechleechle", now, true).unwrap();
    let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
    leech.add_peer(1, addr, true, now).unwrap();
    seed.add_peer(2, addr, false, now).unwrap();
    let (mut to_seed, mut to_leech) = (Vec::new(), Vec::new());
    let mut complete = false;
    for _ in 0..10_000 {
        deliver(&mut leech, 1, &mut seed, 2, &mut to_seed, false);
        let (mut budget, mut served) = (u64::MAX, Vec::new());
        seed.serve(2, 1 << 20, &mut budget, &mut served, Instant::now());
        let view = seed.view().unwrap();
        let out = &mut seed.peers.get_mut(&2).unwrap().out;
        for b in served {
            out.extend_from_slice(&b.header);
            out.extend_from_slice(view.bytes(b.offset, b.len as u64));
        }
        deliver(&mut seed, 2, &mut leech, 1, &mut to_leech, true);
        complete |= run_actions(&mut leech);
        if complete {
            break;
        }
    }
    assert!(complete, "the download finished");
    let storage = leech.storage_mut().unwrap();
    storage.finish_job().unwrap()().unwrap();
    assert_eq!(std::fs::read(dir.join("leech").join("f.gguf")).unwrap(), data);
    assert_eq!(seed.uploaded, data.len() as u64);
    assert_eq!(leech.wasted, 0);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn protocol_violations_are_errors() {
    let dir = std::env::temp_dir().join(format!("shardnet-swarm-bad-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join("f.gguf");
    std::fs::write(&src, vec![1u8; 300_000]).unwrap();
    let pool = WorkerPool::new("t", 1);
    let m = Arc::new(create::create(&src, None, &pool.handle()).unwrap());
    let now = Instant::now();
    let mut seed = Swarm::seed(m.clone(), &src, [1; 20], now).unwrap();
    let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
    seed.add_peer(2, addr, false, now).unwrap();
    seed.on_handshake(2, &Handshake::new(m.info_hash, [2; 20]), false).unwrap();
    assert!(seed.on_message(2, Message::Have(99), now).is_err());
    assert!(seed.on_message(2, Message::Bitfield(&[0xff, 0xff]), now).is_err(), "2 pieces need 1 byte");
    assert!(seed.on_message(2, Message::Bitfield(&[0xff]), now).is_err(), "spare bits set");
    assert!(seed.on_message(2, Message::Request(Block { index: 0, begin: 0, length: 32768 }), now).is_err());
    assert!(seed.on_message(2, Message::Request(Block { index: 5, begin: 0, length: 16 }), now).is_err());
    assert!(seed.on_message(2, Message::Unknown { id: 42, len: 3 }, now).is_ok());
    // An unchoked peer may queue MAX_PEER_REQUESTS requests (our reqq); one more is a flood.
    seed.on_message(2, Message::Interested, now).unwrap();
    let b = Block { index: 0, begin: 0, length: 16384 };
    for _ in 0..MAX_PEER_REQUESTS {
        seed.on_message(2, Message::Request(b), now).unwrap();
    }
    assert!(seed.on_message(2, Message::Request(b), now).is_err(), "request {} is a flood", MAX_PEER_REQUESTS + 1);
    // A self-connection and a duplicate peer id are refused.
    seed.add_peer(3, addr, false, now).unwrap();
    assert!(seed.on_handshake(3, &Handshake::new(m.info_hash, [1; 20]), false).is_err());
    assert!(seed.on_handshake(3, &Handshake::new(m.info_hash, [2; 20]), false).is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A peer that answers in bursts (as Transmission does every 500 ms, or any
/// peer one long round trip away) returns the whole window at once: the
/// window at least doubles each burst, up to `PIPELINE`, and the file arrives whole.
#[test]
fn a_bursty_peer_gets_a_window_that_doubles_each_burst() {
    let dir = std::env::temp_dir().join(format!("shardnet-swarm-burst-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("seed")).unwrap();
    let data: Vec<u8> = (0..(16u32 << 20)).map(|i| (i.wrapping_mul(2654435761) >> 9) as u8).collect();
    let src = dir.join("seed").join("f.gguf");
    std::fs::write(&src, &data).unwrap();
    let pool = WorkerPool::new("t", 1);
    let m = Arc::new(create::create(&src, None, &pool.handle()).unwrap());
    let now = Instant::now();
    let mut seed = Swarm::seed(m.clone(), &src, *b"-SN0001-seedseedseed", now).unwrap();
    let mut leech = Swarm::download(
        m.info_hash,
        Some(m.clone()),
        "f.gguf",
        &dir.join("leech"),
        *b"-SN0001-leechleechle",
        now,
        true,
    )
    .unwrap();
    let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
    leech.add_peer(1, addr, true, now).unwrap();
    seed.add_peer(2, addr, false, now).unwrap();
    let (mut to_seed, mut to_leech) = (Vec::new(), Vec::new());
    let mut windows = Vec::new();
    let mut complete = false;
    for _ in 0..1000 {
        deliver(&mut leech, 1, &mut seed, 2, &mut to_seed, false);
        windows.push(leech.peers[&1].requested.len());
        // One burst: everything asked so far, at once.
        let (mut budget, mut served) = (u64::MAX, Vec::new());
        seed.serve(2, 64 << 20, &mut budget, &mut served, Instant::now());
        let view = seed.view().unwrap();
        let out = &mut seed.peers.get_mut(&2).unwrap().out;
        for b in served {
            out.extend_from_slice(&b.header);
            out.extend_from_slice(view.bytes(b.offset, b.len as u64));
        }
        deliver(&mut seed, 2, &mut leech, 1, &mut to_leech, true);
        complete |= run_actions(&mut leech);
        if complete {
            break;
        }
    }
    assert!(complete, "the download finished");
    // The first window is 16 blocks; each burst at least doubles it, until the blocks left (or
    // the cap) are all asked. (More than double where a rate sample's floor is larger: that
    // depends on how fast this test runs, so it is allowed.)
    let grown: Vec<usize> = windows.iter().copied().filter(|w| *w > 0).collect();
    assert_eq!(grown[0], 16, "windows per burst: {windows:?}");
    let mut left = data.len().div_ceil(BLOCK_SIZE as usize) - grown[0];
    for pair in grown.windows(2) {
        let want = (2 * pair[0]).min(left).min(PIPELINE);
        assert!(pair[1] >= want, "{} after {}: windows per burst {windows:?}", pair[1], pair[0]);
        left -= pair[1];
    }
    assert_eq!(left, 0, "every block asked once: {windows:?}");
    let storage = leech.storage_mut().unwrap();
    storage.finish_job().unwrap()().unwrap();
    assert_eq!(std::fs::read(dir.join("leech").join("f.gguf")).unwrap(), data);
    std::fs::remove_dir_all(&dir).unwrap();
}
