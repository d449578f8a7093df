//! The inference queue against strangers (red team round 8): work asked for by a connection that
//! closes is dropped (its queued steps not computed, its relays' slots freed), and a long prefill
//! is computed in parts while another session decodes. Real node processes on loopback; a fake
//! next hop is a thread of the test speaking the frame protocol.
mod common;

use common::*;
use serde_json::{Value, json};
use shardnet::gguf::demo::{self, DemoConfig};
use shardnet::gguf::split;
use std::io::Write;
use std::net::TcpListener;
use std::path::PathBuf;

/// The demo model (4 layers, 2048 positions) split in `shards` into `dir/shards`.
fn shards(dir: &TempDir, shards: u32) -> PathBuf {
    let model = dir.path().join("demo.gguf");
    demo::write(&DemoConfig { layers: 4, context: 2048, ..Default::default() }, &model).unwrap();
    let out = dir.path().join("shards");
    split::split(&model, shards, &out, None).unwrap();
    out
}

/// The demo model cut in `n` shards into `dir/sub`.
fn shards_in(dir: &TempDir, sub: &str, n: u32) -> PathBuf {
    let model = dir.path().join(format!("{sub}.gguf"));
    demo::write(&DemoConfig { layers: 4, context: 2048, ..Default::default() }, &model).unwrap();
    let out = dir.path().join(sub);
    split::split(&model, n, &out, None).unwrap();
    out
}

fn step(session: &str, token: &Value, pos: u32) -> Value {
    json!({"session_id": session, "session_token": token, "shard_id": 0, "pos": pos,
        "input": {"tokens": [5]}, "output": "top_k", "k": 1})
}

fn request(id: u64, params: Value) -> Vec<u8> {
    let body = serde_json::to_vec(&json!({"command": "EXECUTE_TASK", "request_id": id, "params": params})).unwrap();
    let mut wire = (body.len() as u32).to_be_bytes().to_vec();
    wire.extend_from_slice(&body);
    wire
}

fn prefill(session: &str, tokens: usize) -> Value {
    let input: Vec<u32> = (0..tokens as u32).map(|i| 1 + i % 200).collect();
    json!({"session_id": session, "shard_id": 0, "pos": 0, "input": {"tokens": input}, "output": "top_k", "k": 1})
}

fn chain(session: &str, next: &str, tokens: usize, timeout_ms: u64) -> Value {
    let mut p = prefill(session, tokens);
    p["next"] = json!([{"address": next, "shard_id": 1}]);
    p["hop_timeout_ms"] = json!(timeout_ms);
    p
}

fn inference(node: &NodeProc) -> Value {
    node.call("STATUS", json!({}))["result"]["inference"].clone()
}

fn relays(node: &NodeProc) -> Value {
    node.call("STATUS", json!({}))["result"]["relays"].clone()
}

/// Waits until the inference thread has nothing queued or running, `dropped` at least `dropped`.
fn settled(node: &NodeProc, dropped: u64) -> Value {
    wait_for(WAIT, || {
        let s = inference(node);
        let idle = s["queued"] == json!(0) && s["running"] == json!(0);
        (idle && s["dropped"].as_u64().unwrap() >= dropped).then_some(s)
    })
}

/// One connection queues 32 prefill steps of 512 tokens (the per-client token cap) and closes at
/// once. Before, the node computed every one (minutes on a real model, with every other
/// client's decode step waiting behind a prefill round); now the steps not yet started are
/// dropped (STATUS `inference.dropped`). The same through a route that relays to the node
/// itself (shard 0, then this node's shard 1): nothing is left queued or in flight. Another
/// client's session carries on.
#[test]
fn a_closed_connections_queued_steps_are_dropped() {
    const N: u64 = 32;
    let dir = TempDir::new("closed-queue");
    let a = NodeProc::start(&shards(&dir, 2), &["--threads", "1"]);
    // The victim's session (and shard 0 loaded, so the burst queues for compute), on one
    // connection (a session ends with the connection that owns it).
    let mut v = a.client();
    let r = v.request("EXECUTE_TASK", prefill("victim", 3)).unwrap();
    assert_eq!(r["status"], "success", "{r}");
    let token = r["result"]["session_token"].clone();
    let before = inference(&a)["tasks"].as_u64().unwrap();

    let mut s = a.raw();
    let burst: Vec<u8> = (0..N).flat_map(|i| request(i, prefill(&format!("dead{i}"), 512))).collect();
    s.write_all(&burst).unwrap();
    drop(s);
    let st = settled(&a, 1);
    let (computed, dropped) = (st["tasks"].as_u64().unwrap() - before, st["dropped"].as_u64().unwrap());
    // A step computing when the close lands is stopped part-way (`aborted` counts graphs; a
    // graph holds one of these 512-token steps, the most a round takes).
    let aborted = st["aborted"].as_u64().unwrap();
    assert_eq!(computed + dropped + aborted, N, "every step computed, dropped or stopped: {st}");
    assert!(dropped >= N / 2, "most of the closed connection's steps were computed: {st}");

    // One process: shard 1 is this node's too, reached through a relay link to itself.
    let r = a.call("LOAD_SHARD", json!({"shard_id": 1}));
    assert_eq!(r["status"], "success", "{r}");
    let mut s = a.raw();
    let burst: Vec<u8> = (0..N).flat_map(|i| request(i, chain(&format!("relayed{i}"), &a.addr, 512, 60_000))).collect();
    s.write_all(&burst).unwrap();
    drop(s);
    settled(&a, dropped + 1);
    wait_for(WAIT, || (relays(&a)["in_flight"] == json!(0)).then_some(()));
    let st = settled(&a, dropped + 1);
    assert!(st["dropped"].as_u64().unwrap() - dropped >= N / 2, "{st}");

    let r = v
        .request(
            "EXECUTE_TASK",
            json!({"session_id": "victim", "session_token": token, "shard_id": 0, "pos": 3,
            "input": {"tokens": [5]}, "output": "top_k", "k": 1}),
        )
        .unwrap();
    assert_eq!(r["status"], "success", "the victim's session goes on: {r}");
    a.assert_serving();
}

/// Relays of a connection that closed free their `--max-relays` slots at once (before: they
/// held them until `hop_timeout_ms`, up to 10 minutes, so a few strangers' chains into a silent
/// hop denied every chain through the node). A late answer to one is dropped without harming the
/// link another client's chain waits on; a link no chain waits on any more is closed, so the
/// next hop sees the caller go.
#[test]
fn a_closed_connections_relays_free_their_slots() {
    let dir = TempDir::new("closed-relays");
    let a = NodeProc::start(&shards(&dir, 2), &["--threads", "1", "--max-relays", "4"]);
    let hop = TcpListener::bind("127.0.0.1:0").unwrap();
    let h_addr = hop.local_addr().unwrap().to_string();

    let victim = spawn_chain(&a.addr, chain("victim", &h_addr, 3, 60_000));
    let (mut f, _) = hop.accept().unwrap();
    f.set_read_timeout(Some(WAIT)).unwrap();
    let victim_id = read_frame(&mut f)["request_id"].as_u64().unwrap();

    // The attacker: one connection, three chains into the hop (the node is then full), gone.
    let mut s = a.raw();
    for i in 0..3 {
        s.write_all(&request(i, chain(&format!("gone{i}"), &h_addr, 3, 60_000))).unwrap();
    }
    let gone: Vec<u64> = (0..3).map(|_| read_frame(&mut f)["request_id"].as_u64().unwrap()).collect();
    assert_eq!(relays(&a)["in_flight"], json!(4));
    let r = a.call("EXECUTE_TASK", chain("full", &h_addr, 3, 60_000));
    assert_eq!(r["code"], "BUSY", "{r}");
    drop(s);
    wait_for(WAIT, || (relays(&a)["in_flight"] == json!(1)).then_some(()));
    // The link stays (the victim's relay waits on it), and the hop is told to drop the three.
    let cancel = read_frame(&mut f);
    assert_eq!(cancel["command"], "CANCEL", "{cancel}");
    let mut ids: Vec<u64> =
        cancel["params"]["request_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
    ids.sort();
    let mut want = gone.clone();
    want.sort();
    assert_eq!(ids, want, "{cancel}");

    // The slots are free: another chain is relayed.
    let after = spawn_chain(&a.addr, chain("after", &h_addr, 3, 60_000));
    let after_id = read_frame(&mut f)["request_id"].as_u64().unwrap();
    // Late answers for the cancelled relays are dropped; the link (and the victim's relay) stays.
    let answer = |id: u64, tok: u32| {
        let v = json!({"command": "EXECUTE_TASK", "request_id": id, "status": "success",
            "result": {"top_k": [{"id": tok, "logit": 1.0}], "hops": [{"address": h_addr, "shard_id": 1}]}});
        let body = serde_json::to_vec(&v).unwrap();
        let mut wire = (body.len() as u32).to_be_bytes().to_vec();
        wire.extend_from_slice(&body);
        wire
    };
    for id in &gone {
        f.write_all(&answer(*id, 666)).unwrap();
    }
    f.write_all(&answer(victim_id, 7)).unwrap();
    f.write_all(&answer(after_id, 8)).unwrap();
    let r = victim.join().unwrap();
    assert_eq!(r["result"]["top_k"][0]["id"], json!(7), "the victim's chain got its answer: {r}");
    let r = after.join().unwrap();
    assert_eq!(r["result"]["top_k"][0]["id"], json!(8), "{r}");
    assert_eq!(relays(&a)["links"], json!(1));

    // A chain alone on its link: its caller gone, the link closes and the hop sees it.
    let mut s = a.raw();
    s.write_all(&request(9, chain("alone", &h_addr, 3, 60_000))).unwrap();
    read_frame(&mut f);
    drop(s);
    assert!(closed_within(&mut f, WAIT), "the link stayed open with no relay waiting on it");
    wait_for(WAIT, || (relays(&a)["in_flight"] == json!(0) && relays(&a)["links"] == json!(0)).then_some(()));
    a.assert_serving();
}

/// A long prefill while another session decodes (red-team round 8: the victim's decode step
/// waited a whole 512-token round, 20 ms -> 4.7 s): the node computes the prefill in parts of at
/// most one contended round's share, and the victim's steps go between them (STATUS
/// `inference.split`). The split step's answer (the hidden state of every row) equals the one
/// computed whole, with no other session about, bit for bit: the node cuts only at multiples of
/// 64 tokens (`engine::PREFILL_GRANULE`), so the parts' sizes, which follow the load, do not
/// change the result.
#[test]
fn a_long_prefill_is_computed_in_parts_while_another_session_decodes() {
    let dir = TempDir::new("split-prefill");
    // Wide enough layers that one thread computes well under 64 x 20 prefill tokens a second, so
    // that the contended share is at its floor and the parts are as small as the node cuts them.
    let model = dir.path().join("wide.gguf");
    let cfg = DemoConfig { layers: 8, embd: 256, ffn: 4096, context: 2048, ..Default::default() };
    demo::write(&cfg, &model).unwrap();
    let out = dir.path().join("shards");
    split::split(&model, 2, &out, None).unwrap();
    let a = NodeProc::start(&out, &["--threads", "1", "--ctx-size", "2048"]);
    let hidden = |session: &str| {
        let r = a.call(
            "EXECUTE_TASK",
            json!({"session_id": session, "shard_id": 0, "pos": 0,
            "input": {"tokens": (0..1000u32).map(|i| 1 + i * 7 % 500).collect::<Vec<_>>()}, "output": "hidden"}),
        );
        assert_eq!(r["status"], "success", "{r}");
        r["result"].clone()
    };
    let whole = hidden("whole");
    assert_eq!(inference(&a)["split"], json!(0), "nobody else decodes: computed whole");

    // The victim decodes, one step after another, until told to stop.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let victim = {
        let (addr, stop) = (a.addr.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut c = shardnet::client::Client::connect(&addr, WAIT).unwrap();
            let r = c.request("EXECUTE_TASK", prefill("victim", 3)).unwrap();
            let token = r["result"]["session_token"].clone();
            let mut pos = 3;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) && pos < 1500 {
                let r = c
                    .request(
                        "EXECUTE_TASK",
                        json!({"session_id": "victim", "session_token": token, "shard_id": 0,
                        "pos": pos, "input": {"tokens": [5]}, "output": "top_k", "k": 1}),
                    )
                    .unwrap();
                assert_eq!(r["status"], "success", "{r}");
                pos += 1;
            }
            pos
        })
    };
    wait_for(WAIT, || (inference(&a)["tasks"].as_u64().unwrap() >= 5).then_some(()));
    let parts = hidden("parts");
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(victim.join().unwrap() > 3);
    assert!(inference(&a)["split"].as_u64().unwrap() >= 1, "the prefill was not split: {}", inference(&a));

    assert_eq!(parts["n_tokens"], json!(1000), "{}", parts["n_tokens"]);
    assert_eq!(parts["pos"], json!(0));
    let (w, p) = (&whole["hidden"], &parts["hidden"]);
    assert_eq!(p["shape"], w["shape"], "every row's hidden state");
    let floats = |v: &Value| shardnet::protocol::tensor::f32_from_json(v, usize::MAX).unwrap().0;
    let (w, p) = (floats(w), floats(p));
    assert_eq!(w.len(), p.len());
    // Bit for bit, whatever the load made the parts (engine::PREFILL_GRANULE): a part at the wrong
    // positions, dropped, twice, or of under 64 rows changes values.
    let differ = w.iter().zip(&p).filter(|(x, y)| x.to_bits() != y.to_bits()).count();
    let worst = w.iter().zip(&p).map(|(x, y)| (x - y).abs() / (1.0 + x.abs())).fold(0f32, f32::max);
    assert_eq!(differ, 0, "the parts' hidden states differ from the whole's in {differ} values, by up to {worst}");
    a.assert_serving();
}

/// A connection's sessions end when its client closes it (red-team round 8: a stranger's sessions
/// held their KV memory until evicted): STATUS `inference.sessions` drops at once and
/// `inference.sessions_closed` counts them. Another connection's sessions stay, and so do the
/// sessions a relaying node opened over its link (they belong to chains, which other clients
/// may still be using): the next hop keeps them when the link goes.
#[test]
fn a_closed_connections_sessions_are_freed_at_once() {
    let dir = TempDir::new("closed-sessions");
    let a = NodeProc::start(&shards_in(&dir, "a", 2), &["--threads", "1"]);
    let b = NodeProc::start(&shards_in(&dir, "b", 2), &["--threads", "1"]);
    let b_hop = b.addr.clone();
    let via_b = |session: &str| {
        let mut p = prefill(session, 3);
        p["next"] = json!([{"address": b_hop, "shard_id": 1}]);
        p
    };
    let mut keeper = a.client();
    let r = keeper.request("EXECUTE_TASK", via_b("kept")).unwrap();
    assert_eq!(r["status"], "success", "{r}");
    let token = r["result"]["session_token"].clone();
    let mut gone = a.client();
    for p in [via_b("gone"), prefill("gone2", 3)] {
        let r = gone.request("EXECUTE_TASK", p).unwrap();
        assert_eq!(r["status"], "success", "{r}");
    }
    assert_eq!(inference(&a)["sessions"], json!(3), "{}", inference(&a));
    assert_eq!(inference(&b)["sessions"], json!(2), "{}", inference(&b));

    drop(gone);
    let st = wait_for(WAIT, || {
        let st = inference(&a);
        (st["sessions"] == json!(1)).then_some(st)
    });
    assert_eq!(st["sessions_closed"], json!(2), "{st}");
    // The keeper's session goes on, through both nodes.
    let mut p = step("kept", &token, 3);
    p["next"] = json!([{"address": b.addr, "shard_id": 1}]);
    let r = keeper.request("EXECUTE_TASK", p).unwrap();
    assert_eq!(r["status"], "success", "{r}");

    // The next hop's sessions were opened by a relay link: they stay when it closes (here: its
    // node goes). An END_SESSION of nothing goes through b's inference thread after the close.
    let mut a = a;
    a.kill();
    wait_for(WAIT, || {
        (b.call("STATUS", json!({}))["result"]["connection_counts"]["command"] == json!(1)).then_some(())
    });
    let r = b.call("END_SESSION", json!({"session_id": "nothing"}));
    assert_eq!(r["result"]["freed"], json!(0), "{r}");
    let st = inference(&b);
    assert_eq!((st["sessions"].clone(), st["sessions_closed"].clone()), (json!(2), json!(0)), "{st}");
    b.assert_serving();
}

/// A graph computing only a closed connection's step stops part-way (ggml's abort callback,
/// checked after every node): a 512-token prefill whose client leaves frees the inference
/// thread at once, and another client's decode step is answered well before the prefill would
/// have ended (red-team round 9: a gone client's 2000-token prompt kept the thread for 8 s).
/// STATUS `inference.aborted`. The node computes whole prefills as before afterwards.
#[test]
fn a_closed_connections_running_prefill_stops_early() {
    use shardnet::gguf::types::GgmlType;
    let dir = TempDir::new("abort-prefill");
    let model = dir.path().join("big.gguf");
    let cfg = DemoConfig {
        layers: 8,
        embd: 768,
        heads: 12,
        kv_heads: 4,
        ffn: 2048,
        context: 1024,
        weight_type: GgmlType::Q8_0,
        ..Default::default()
    };
    demo::write(&cfg, &model).unwrap();
    let out = dir.path().join("shards");
    split::split(&model, 1, &out, None).unwrap();
    let a = NodeProc::start(&out, &["--threads", "1"]);
    let mut victim = a.client();
    victim.set_timeout(std::time::Duration::from_secs(120)).unwrap();
    let r = victim.request("EXECUTE_TASK", prefill("victim", 3)).unwrap();
    assert_eq!(r["status"], "success", "{r}");
    let token = r["result"]["session_token"].clone();
    // The prefill's time, computed whole with nobody else about.
    let whole = |session: &str| {
        let mut c = a.client();
        c.set_timeout(std::time::Duration::from_secs(120)).unwrap();
        let r = c.request("EXECUTE_TASK", prefill(session, 512)).unwrap();
        assert_eq!(r["status"], "success", "{r}");
        r["result"]["hops"][0]["timings"]["compute_ms"].as_f64().unwrap()
    };
    let whole_ms = whole("whole");
    // (`running` is 1 until a round's counters are in, a moment after its answers left.)
    settled(&a, 0);

    let mut s = a.raw();
    s.write_all(&request(1, prefill("gone", 512))).unwrap();
    wait_for(WAIT, || (inference(&a)["running"] == json!(1)).then_some(()));
    drop(s);
    let t = std::time::Instant::now();
    let r = victim.request("EXECUTE_TASK", step("victim", &token, 3)).unwrap();
    let waited_ms = t.elapsed().as_secs_f64() * 1e3;
    assert_eq!(r["status"], "success", "{r}");
    let st = settled(&a, 0);
    eprintln!("victim's step waited {waited_ms:.1} ms; a whole 512-token prefill computes in {whole_ms:.1} ms");
    assert_eq!(st["aborted"], json!(1), "the prefill ran to its end: {st}");
    assert!(
        waited_ms < whole_ms / 2.0,
        "the victim's step waited {waited_ms:.0} ms; the whole prefill computes in {whole_ms:.0} ms"
    );
    // The next graph is not stopped.
    whole("after");
    assert_eq!(inference(&a)["aborted"], json!(1));
    a.assert_serving();
}

/// A chain's caller leaves while the link to its next hop carries another client's chain, so the
/// link stays open: the relaying node sends a `CANCEL` of the withdrawn requests down it, and the
/// next hop drops those steps still queued (answered `CANCELLED`, STATUS `inference.cancelled`)
/// and passes the `CANCEL` on to its own next hop (here itself, for shard 2). Before, it
/// computed every one. The other client's chain is untouched.
#[test]
fn a_closed_callers_steps_are_cancelled_down_a_shared_link() {
    cancelled_down_a_shared_link(false);
}

/// The same between keyed nodes: the `CANCEL` goes sealed on the authenticated link, its sealed
/// answer keeps the link's frame counters in step (the link and the other chain carry on).
#[test]
fn a_closed_callers_steps_are_cancelled_down_a_shared_keyed_link() {
    cancelled_down_a_shared_link(true);
}

fn cancelled_down_a_shared_link(keyed: bool) {
    const N: u64 = 16;
    let dir = TempDir::new(if keyed { "cancel-down-keyed" } else { "cancel-down" });
    let key_text = "7d3c1b0a9f8e7d6c5b4a39281706f5e4d3c2b1a09f8e7d6c5b4a392817a6b5c4";
    let key_path = dir.path().join("cluster.key");
    std::fs::write(&key_path, key_text).unwrap();
    std::fs::set_permissions(&key_path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let key = keyed.then(|| shardnet::protocol::auth::ClusterKey::from_bytes(key_text.as_bytes()).unwrap());
    let mut args = vec!["--threads", "1"];
    if keyed {
        args.extend(["--cluster-key-file", key_path.to_str().unwrap()]);
    }
    let a = NodeProc::start(&shards_in(&dir, "a", 3), &args);
    let b = NodeProc::start(&shards_in(&dir, "b", 3), &args);
    let client = |node: &NodeProc| {
        let mut c = shardnet::client::Client::connect_with_key(&node.addr, WAIT, key.as_ref()).unwrap();
        c.set_timeout(std::time::Duration::from_secs(60)).unwrap();
        c
    };
    let status = |node: &NodeProc, part: &str| client(node).call("STATUS", json!({})).unwrap()[part].clone();
    for (node, id) in [(&a, 0), (&b, 1), (&b, 2)] {
        let r = client(node).request("LOAD_SHARD", json!({"shard_id": id})).unwrap();
        assert_eq!(r["status"], "success", "{r}");
    }
    // The other client's chain waits on a next hop that never answers: the link a -> b stays.
    let hop = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut p = prefill("victim", 3);
    p["next"] =
        json!([{"address": b.addr, "shard_id": 1}, {"address": hop.local_addr().unwrap().to_string(), "shard_id": 2}]);
    p["hop_timeout_ms"] = json!(60_000);
    let mut v = client(&a);
    let victim = std::thread::spawn(move || v.request("EXECUTE_TASK", p).unwrap());
    let (mut f, _) = hop.accept().unwrap();
    f.set_read_timeout(Some(WAIT)).unwrap();
    if !keyed {
        read_frame(&mut f);
    }

    // The caller that leaves: N chains a:0 -> b:1 -> b:2 (b computes two steps for each of a's).
    let mut gone = client(&a);
    for i in 0..N {
        let mut p = prefill(&format!("gone{i}"), 512);
        p["next"] = json!([{"address": b.addr, "shard_id": 1}, {"address": b.addr, "shard_id": 2}]);
        p["hop_timeout_ms"] = json!(60_000);
        let body = shardnet::protocol::request_payload("EXECUTE_TASK", &json!(i), "test", p);
        gone.send_payload(&body).unwrap();
    }
    wait_for(WAIT, || (status(&b, "inference")["queued"].as_u64().unwrap() >= 2).then_some(()));
    drop(gone);
    wait_for(WAIT, || {
        let st = status(&a, "inference");
        (st["queued"] == json!(0) && st["running"] == json!(0)).then_some(())
    });
    let st = wait_for(WAIT, || {
        let st = status(&b, "inference");
        (st["queued"] == json!(0) && st["running"] == json!(0)).then_some(st)
    });
    assert!(st["cancelled"].as_u64().unwrap() >= 1, "the next hop computed every withdrawn step: {st}");
    let computed = st["tasks"].as_u64().unwrap();
    assert!(computed < 2 * N, "{st}");
    assert!(status(&a, "relays")["cancelled_down"].as_u64().unwrap() >= 1, "{}", status(&a, "relays"));
    // Only the other client's relay is left on the link, which stays.
    wait_for(WAIT, || {
        (status(&a, "relays")["in_flight"] == json!(1) && status(&b, "relays")["in_flight"] == json!(1)).then_some(())
    });
    assert_eq!(status(&a, "relays")["links"], json!(1));
    // Its chain ends as it would have: its silent hop is named.
    drop(f);
    drop(hop);
    let r = victim.join().unwrap();
    assert_eq!(r["code"], "HOP_FAILED", "{r}");
    a.assert_serving();
    b.assert_serving();
}

/// On a node without a cluster key nothing proves that a connection naming an `origin` is a
/// relaying node's link (red-team round 11: a stranger naming one kept 8 sessions, 189 MB of KV,
/// after it closed, for good). Such sessions still outlive their connection (a relay link closes
/// when its callers leave while other chains' sessions go on, their next steps on a new link),
/// but only while used: idle for `--orphan-session-idle` they end (STATUS
/// `inference.sessions_closed`). One stepped again on another connection is that connection's.
/// Sessions count against the connection's address whatever `origin` each names: one
/// connection naming a new origin per session holds at most `--max-sessions-per-client`.
#[test]
fn a_strangers_origin_keeps_its_sessions_only_while_used() {
    let dir = TempDir::new("origin-orphans");
    let a = NodeProc::start(
        &shards(&dir, 1),
        &["--threads", "1", "--max-sessions-per-client", "4", "--orphan-session-idle", "2"],
    );
    let mut stranger = a.client();
    let mut tokens = Vec::new();
    for i in 0..10 {
        let mut p = prefill(&format!("s{i}"), 3);
        p["origin"] = json!(format!("10.0.{i}.1:5"));
        let r = stranger.request("EXECUTE_TASK", p).unwrap();
        assert_eq!(r["status"], "success", "{r}");
        tokens.push(r["result"]["session_token"].clone());
    }
    // Ten origins named, one connection: its quota of 4 (its own oldest evicted).
    assert_eq!(inference(&a)["sessions"], json!(4), "{}", inference(&a));
    drop(stranger);
    // Kept for now: a chain's next step may come on a new link.
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(inference(&a)["sessions"], json!(4), "{}", inference(&a));
    let mut next = a.client();
    let r = next.request("EXECUTE_TASK", step("s9", &tokens[9], 3)).unwrap();
    assert_eq!(r["status"], "success", "{r}");
    // The other three end once idle; s9 is `next`'s now.
    let st = wait_for(WAIT, || {
        let st = inference(&a);
        (st["sessions"] == json!(1)).then_some(st)
    });
    assert_eq!(st["sessions_closed"], json!(3), "{st}");
    drop(next);
    let st = wait_for(WAIT, || {
        let st = inference(&a);
        (st["sessions"] == json!(0)).then_some(st)
    });
    assert_eq!(st["sessions_closed"], json!(4), "{st}");
    a.assert_serving();
}

/// `CANCEL` answers the request ids it withdrew (answered `CANCELLED`), not the count asked
/// (red-team round 11): of eight queued prefills, those still queued; not an id never sent, nor
/// another connection's, nor the one computing.
#[test]
fn cancel_answers_the_requests_it_withdrew() {
    let dir = TempDir::new("cancel-answer");
    let a = NodeProc::start(&shards(&dir, 1), &["--threads", "1"]);
    let mut other = a.raw();
    other.write_all(&request(3, prefill("other", 512))).unwrap();
    let mut s = a.raw();
    for i in 0..8 {
        s.write_all(&request(i, prefill(&format!("c{i}"), 512))).unwrap();
    }
    wait_for(WAIT, || (inference(&a)["queued"].as_u64().unwrap() >= 4).then_some(()));
    let ids: Vec<u64> = (0..8).chain([99]).collect();
    let cancel = json!({"command": "CANCEL", "request_id": "c", "params": {"request_ids": ids}});
    let body = serde_json::to_vec(&cancel).unwrap();
    let mut wire = (body.len() as u32).to_be_bytes().to_vec();
    wire.extend_from_slice(&body);
    s.write_all(&wire).unwrap();
    let (mut cancelled, mut computed) = (Vec::new(), Vec::new());
    let answer = loop {
        let f = read_frame(&mut s);
        match (f["command"].as_str(), f["code"].as_str()) {
            (Some("CANCEL"), _) => break f,
            (_, Some("CANCELLED")) => cancelled.push(f["request_id"].as_u64().unwrap()),
            _ => computed.push(f["request_id"].as_u64().unwrap()),
        }
    };
    assert_eq!(answer["status"], "success", "{answer}");
    let mut said: Vec<u64> = answer["result"]["request_ids"]
        .as_array()
        .expect("a list of ids")
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    said.sort();
    cancelled.sort();
    assert!(!said.is_empty(), "{answer}");
    assert_eq!(said, cancelled, "{answer}");
    assert_eq!(answer["result"]["relays"], json!(0), "{answer}");
    // What was not withdrawn is answered as computed; the other connection's step too.
    while cancelled.len() + computed.len() < 8 {
        let f = read_frame(&mut s);
        assert_eq!(f["status"], "success", "{f}");
        computed.push(f["request_id"].as_u64().unwrap());
    }
    let f = read_frame(&mut other);
    assert_eq!((f["request_id"].clone(), f["status"].clone()), (json!(3), json!("success")), "{f}");
    a.assert_serving();
}

/// On a keyed node a connection that proved the key and names an `origin` is a relaying node's
/// link, which other chains share: its sessions are the chain's and outlive it, past
/// `--orphan-session-idle` too, until `END_SESSION` or eviction; they count for the origin named.
#[test]
fn a_keyed_relays_sessions_outlive_its_link() {
    let dir = TempDir::new("origin-keyed");
    let key_text = "0a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9";
    let key_path = dir.path().join("cluster.key");
    std::fs::write(&key_path, key_text).unwrap();
    std::fs::set_permissions(&key_path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let key = shardnet::protocol::auth::ClusterKey::from_bytes(key_text.as_bytes()).unwrap();
    let a = NodeProc::start(
        &shards(&dir, 1),
        &["--threads", "1", "--orphan-session-idle", "1", "--cluster-key-file", key_path.to_str().unwrap()],
    );
    let client = || shardnet::client::Client::connect_with_key(&a.addr, WAIT, Some(&key)).unwrap();
    let status = || client().call("STATUS", json!({})).unwrap()["inference"].clone();
    let mut link = client();
    for i in 0..3 {
        let mut p = prefill(&format!("k{i}"), 3);
        p["origin"] = json!("10.1.2.3:4");
        let r = link.request("EXECUTE_TASK", p).unwrap();
        assert_eq!(r["status"], "success", "{r}");
    }
    drop(link);
    std::thread::sleep(std::time::Duration::from_millis(2500));
    let st = status();
    assert_eq!((st["sessions"].clone(), st["sessions_closed"].clone()), (json!(3), json!(0)), "{st}");
    a.assert_serving();
}
