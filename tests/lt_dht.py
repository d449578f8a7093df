#!/usr/bin/python3
"""libtorrent's DHT (Debian's python3-libtorrent) bootstrapped from a shardnet
node, with libtorrent's default rate limits (dht_block_ratelimit 5 a second,
dht_block_timeout 300 s) and BEP 42 settings left as they are: it adds a
torrent for ANNOUNCE_HASH and announces it to the DHT every 5 s and looks up INFO_HASH every 2 s for DURATION seconds. Prints `LISTEN port` at once, then at the end `FOUND peers...` (from
answers in the last 20 s only) and `BANNED n` (libtorrent's "BANNING PEER" log
lines: sources it stopped answering for flooding it).
Usage: lt_dht.py NODE_HOST:PORT INFO_HASH_HEX DURATION_S ANNOUNCE_HASH_HEX"""
import sys
import tempfile
import time

import libtorrent as lt

node, info_hash, duration, announce = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
ses = lt.session({
    "listen_interfaces": "127.0.0.1:0",
    "enable_dht": True,
    "enable_lsd": False,
    "enable_upnp": False,
    "enable_natpmp": False,
    "dht_bootstrap_nodes": node,
    # A test network on one machine: every node is 127.0.0.1, a "dark" address.
    # The rate limits (dht_block_ratelimit, dht_block_timeout) keep their defaults.
    "dht_restrict_routing_ips": False,
    "dht_restrict_search_ips": False,
    "dht_ignore_dark_internet": False,
    "alert_mask": lt.alert.category_t.all_categories,
})
host, port = node.rsplit(":", 1)
ses.add_dht_node((host, int(port)))
atp = lt.parse_magnet_uri("magnet:?xt=urn:btih:" + announce)
atp.save_path = tempfile.mkdtemp(prefix="lt-dht-")
handle = ses.add_torrent(atp)
print("LISTEN %d" % ses.listen_port(), flush=True)
start = time.time()
target = lt.sha1_hash(bytes.fromhex(info_hash))
found = set()
banned = 0
asked = announced = 0.0
while time.time() < start + duration:
    now = time.time()
    if now > asked + 2.0:
        ses.dht_get_peers(target)
        asked = now
    if now > announced + 5.0:
        handle.force_dht_announce()
        announced = now
    ses.wait_for_alert(200)
    for a in ses.pop_alerts():
        if a.what() == "dht_log" and "BANNING" in a.message():
            banned += 1
            print(a.message(), file=sys.stderr, flush=True)
        if a.what() == "dht_get_peers_reply" and str(a.info_hash) == info_hash:
            if time.time() > start + duration - 20:
                for p in a.peers():
                    found.add("%s:%d" % (p[0], p[1]))
print("FOUND " + " ".join(sorted(found)), flush=True)
print("BANNED %d" % banned, flush=True)
