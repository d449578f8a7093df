#!/bin/sh
# `make demo`: four nodes on loopback. Node 0 seeds every shard of the model; nodes 1-3 start
# empty. `shardctl infer` finds them through the DHT, has each load a shard (nodes 1-3 download
# theirs through the swarm), streams the text and prints a summary. Every node is stopped at the end.
set -eu
BIN=${BIN:-target/release}
MODELS=${MODELS:-models_cache}
BASE=${DEMO_PORT:-51920}
PROMPT=${PROMPT:-The capital of France is}
N=${N:-48}
DEMO=$MODELS/demo
rm -rf "$DEMO"
mkdir -p "$DEMO"
pids=""
cleanup() {
    for p in $pids; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

ready() {
    i=0
    until "$BIN/shardctl" --node "127.0.0.1:$1" --timeout 1 status >/dev/null 2>&1; do
        i=$((i + 1))
        if [ "$i" -gt 100 ]; then echo "node on port $1 did not start (see $DEMO/node-*.log)"; exit 1; fi
        sleep 0.1
    done
}

"$BIN/shard_listener" --listen "127.0.0.1:$BASE" --shards-dir "$MODELS/shards" --cluster demo \
    --enable-torrent --log-level warn >"$DEMO/node-0.log" 2>&1 &
pids="$pids $!"
ready "$BASE"
for k in 1 2 3; do
    port=$((BASE + k))
    mkdir -p "$DEMO/node-$k/shards"
    "$BIN/shard_listener" --listen "127.0.0.1:$port" --shards-dir "$DEMO/node-$k/shards" --cluster demo \
        --bootstrap "127.0.0.1:$BASE" --enable-torrent --log-level warn >"$DEMO/node-$k.log" 2>&1 &
    pids="$pids $!"
    ready "$port"
done
# Wait (at most 20 s) until the DHT lists the three new nodes under the cluster key and node 0
# under the last shard's name.
i=0
until [ "$("$BIN/shardctl" --node "127.0.0.1:$BASE" peers --cluster 2>/dev/null | grep -c '127.0.0.1')" -ge 3 ] &&
    "$BIN/shardctl" --node "127.0.0.1:$((BASE + 1))" peers --shard 1 2>/dev/null | grep -q "127.0.0.1:$BASE"; do
    i=$((i + 1))
    if [ "$i" -gt 200 ]; then break; fi
    sleep 0.1
done
echo "4 nodes on 127.0.0.1:$BASE-$((BASE + 3)); node 0 seeds every shard, nodes 1-3 start empty"
echo "prompt: $PROMPT"
"$BIN/shardctl" infer --bootstrap "127.0.0.1:$BASE" --cluster demo --prompt "$PROMPT" -n "$N"
