#!/usr/bin/python3
"""libtorrent's DHT (Debian's python3-libtorrent) bootstrapped from a shardnet
node, over IPv4 or, when NODE_HOST is an IPv6 address such as ::1, over IPv6
(BEP 32), with libtorrent's default rate limits (dht_block_ratelimit 5 a second,
dht_block_timeout 300 s) and BEP 42 settings left as they are: it adds a torrent
for ANNOUNCE_HASH, announces it to the DHT every ANNOUNCE_EVERY_S (default 5) and
looks up INFO_HASH every 2 s for DURATION seconds. Prints `LISTEN port` at once,
then at the end `FOUND peers...` (from answers in the last FOUND_LAST_S, default
20; an IPv6 peer as [addr]:port) and `BANNED n` (libtorrent's "BANNING PEER" log
lines, also written to stderr: sources it stopped answering for flooding it).
Usage: lt_dht.py NODE_HOST:PORT INFO_HASH_HEX DURATION_S ANNOUNCE_HASH_HEX [ANNOUNCE_EVERY_S [FOUND_LAST_S]]"""
import sys
import tempfile
import time

import libtorrent as lt

node, info_hash, duration, announce = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
announce_every = float(sys.argv[5]) if len(sys.argv) > 5 else 5.0
found_last = float(sys.argv[6]) if len(sys.argv) > 6 else 20.0
host, port = node.rsplit(":", 1)
host = host.strip("[]")
v6 = ":" in host
ses = lt.session({
    "listen_interfaces": "[%s]:0" % host if v6 else "%s:0" % host,
    "enable_dht": True,
    "enable_lsd": False,
    "enable_upnp": False,
    "enable_natpmp": False,
    # Over IPv6 the node is added below only (the setting's own parser is IPv4-minded).
    "dht_bootstrap_nodes": "" if v6 else node,
    # A test network on one machine: every node is loopback, a "dark" address.
    # The rate limits (dht_block_ratelimit, dht_block_timeout) keep their defaults.
    "dht_restrict_routing_ips": False,
    "dht_restrict_search_ips": False,
    "dht_ignore_dark_internet": False,
    "alert_mask": lt.alert.category_t.all_categories,
})
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
    if now > announced + announce_every:
        handle.force_dht_announce()
        announced = now
    ses.wait_for_alert(200)
    for a in ses.pop_alerts():
        if a.what() == "dht_log" and "BANNING" in a.message():
            banned += 1
            print(a.message(), file=sys.stderr, flush=True)
        if a.what() == "dht_get_peers_reply" and str(a.info_hash) == info_hash:
            if time.time() > start + duration - found_last:
                for p in a.peers():
                    found.add(("[%s]:%d" if ":" in p[0] else "%s:%d") % (p[0], p[1]))
print("FOUND " + " ".join(sorted(found)), flush=True)
print("BANNED %d" % banned, flush=True)
