#!/usr/bin/python3
"""libtorrent's IPv6 DHT (Debian's python3-libtorrent, BEP 32) on ::1, bootstrapped
from a shardnet node on ::1: it announces ANNOUNCE_HASH every 3 s and looks up
INFO_HASH every 2 s for DURATION seconds. Prints `LISTEN port` at once, then at the
end `FOUND [addr]:port ...` (every peer its get_peers answers gave).
Usage: lt_dht6.py NODE_PORT INFO_HASH_HEX DURATION_S ANNOUNCE_HASH_HEX"""
import sys
import tempfile
import time

import libtorrent as lt

port, info_hash, duration, announce = int(sys.argv[1]), sys.argv[2], float(sys.argv[3]), sys.argv[4]
ses = lt.session({
    "listen_interfaces": "[::1]:0",
    "enable_dht": True,
    "enable_lsd": False,
    "enable_upnp": False,
    "enable_natpmp": False,
    "dht_bootstrap_nodes": "",
    # A test network on one machine: every node is ::1.
    "dht_restrict_routing_ips": False,
    "dht_restrict_search_ips": False,
    "dht_ignore_dark_internet": False,
    "alert_mask": lt.alert.category_t.all_categories,
})
ses.add_dht_node(("::1", port))
atp = lt.parse_magnet_uri("magnet:?xt=urn:btih:" + announce)
atp.save_path = tempfile.mkdtemp(prefix="lt-dht6-")
handle = ses.add_torrent(atp)
print("LISTEN %d" % ses.listen_port(), flush=True)
start = time.time()
target = lt.sha1_hash(bytes.fromhex(info_hash))
found = set()
asked = announced = 0.0
while time.time() < start + duration:
    now = time.time()
    if now > asked + 2.0:
        ses.dht_get_peers(target)
        asked = now
    if now > announced + 3.0:
        handle.force_dht_announce()
        announced = now
    ses.wait_for_alert(200)
    for a in ses.pop_alerts():
        if a.what() == "dht_get_peers_reply" and str(a.info_hash) == info_hash:
            for p in a.peers():
                found.add(("[%s]:%d" if ":" in p[0] else "%s:%d") % (p[0], p[1]))
        if a.what() == "dht_log" and "BANNING" in a.message():
            print(a.message(), file=sys.stderr, flush=True)
print("FOUND " + " ".join(sorted(found)), flush=True)
