#!/bin/sh
# `make demo`: four nodes on loopback. Node 0 seeds every shard of the model; nodes 1-3 start
# empty. `shardctl infer` finds them through the DHT, has each load a shard (nodes 1-3 download
# theirs through the swarm), streams the text and prints a summary. Every node is stopped at the end.
#
# Ports: node k listens (TCP and UDP) on DEMO_PORT+k, DEMO_PORT 51920 by default; a port that is
# in use is replaced by a free one the system picks (and the script says so).
# Files: the nodes' logs and nodes 1-3's downloaded shards go to $MODELS/demo (removed at the next
# run). BIN, MODELS, PROMPT and N (tokens to generate) may be set too.
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
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# start K PORT DIR [FLAGS...]: starts node K on 127.0.0.1:PORT and sets ADDR to its address once
# it answers. A port in use (TCP, or UDP for the DHT) is retried with port 0, a free one.
start() {
    k=$1 port=$2 want=$2 dir=$3
    shift 3
    for try in 1 2 3; do
        "$BIN/shard_listener" --listen "127.0.0.1:$port" --shards-dir "$dir" --cluster demo \
            --enable-torrent --log-level warn "$@" >"$DEMO/node-$k.out" 2>"$DEMO/node-$k.log" &
        pid=$!
        i=0
        ADDR=""
        while [ "$i" -lt 100 ] && kill -0 "$pid" 2>/dev/null; do
            ADDR=$(grep -o '127\.0\.0\.1:[0-9]*' "$DEMO/node-$k.out" 2>/dev/null || true)
            [ -n "$ADDR" ] && break
            i=$((i + 1))
            sleep 0.1
        done
        if [ -n "$ADDR" ] && ! grep -q "DHT: cannot bind" "$DEMO/node-$k.log"; then
            pids="$pids $pid"
            if [ "$port" = 0 ]; then echo "port $want in use; node $k on $ADDR instead"; fi
            return 0
        fi
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
        if [ "$port" != 0 ] && grep -qi "in use\|cannot bind" "$DEMO/node-$k.log"; then
            port=0
        elif [ "$port" != 0 ]; then
            break
        fi
    done
    echo "node $k did not start:"
    cat "$DEMO/node-$k.log"
    exit 1
}

start 0 "$BASE" "$MODELS/shards"
BOOT=$ADDR
ADDRS=$ADDR
for k in 1 2 3; do
    mkdir -p "$DEMO/node-$k/shards"
    start "$k" $((BASE + k)) "$DEMO/node-$k/shards" --bootstrap "$BOOT"
    ADDRS="$ADDRS $ADDR"
    if [ "$k" = 1 ]; then NODE1=$ADDR; fi
done
# Wait (at most 20 s) until the DHT lists the three new nodes under the cluster key and node 0
# under the last shard's name.
i=0
until [ "$("$BIN/shardctl" --node "$BOOT" peers --cluster 2>/dev/null | grep -c '127.0.0.1')" -ge 3 ] &&
    "$BIN/shardctl" --node "$NODE1" peers --shard 1 2>/dev/null | grep -q "$BOOT"; do
    i=$((i + 1))
    if [ "$i" -gt 200 ]; then break; fi
    sleep 0.1
done
echo "4 nodes on$(printf ' %s' $ADDRS); node 0 seeds every shard, nodes 1-3 start empty"
echo "prompt: $PROMPT"
"$BIN/shardctl" infer --bootstrap "$BOOT" --cluster demo --prompt "$PROMPT" -n "$N"
