#!/usr/bin/python3
"""libtorrent's DHT (Debian's python3-libtorrent) bootstrapped from a shardnet
node looks up an info hash the node announced; prints the peers it found.
Usage: lt_dht.py NODE_HOST:PORT INFO_HASH_HEX TIMEOUT_S"""
import sys
import time

import libtorrent as lt

node, info_hash, timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])
ses = lt.session({
    "listen_interfaces": "127.0.0.1:0",
    "enable_dht": True,
    "enable_lsd": False,
    "enable_upnp": False,
    "enable_natpmp": False,
    "dht_bootstrap_nodes": node,
    # A test network on one machine: every node is 127.0.0.1.
    "dht_restrict_routing_ips": False,
    "dht_restrict_search_ips": False,
    "dht_enforce_node_id": False,
    "dht_ignore_dark_internet": False,
    "alert_mask": lt.alert.category_t.all_categories,
})
ses.add_dht_node((node.rsplit(":", 1)[0], int(node.rsplit(":", 1)[1])))
deadline = time.time() + timeout
target = lt.sha1_hash(bytes.fromhex(info_hash))
found = set()
asked = 0
while time.time() < deadline and not found:
    if asked == 0 or time.time() > asked + 1.0:
        ses.dht_get_peers(target)
        asked = time.time()
    ses.wait_for_alert(200)
    for a in ses.pop_alerts():
        if a.what() == "dht_get_peers_reply" and str(a.info_hash) == info_hash:
            for p in a.peers():
                found.add("%s:%d" % (p[0], p[1]))
print(" ".join(sorted(found)))
