#!/usr/bin/python3
"""A libtorrent peer (Debian's python3-libtorrent, default settings but for
loopback) trading a file with a shardnet node over the peer wire.

Usage:
  lt_peer.py leech TORRENT OUT_DIR NODE_HOST:PORT TIMEOUT_S
      downloads from the node; prints "complete rc4" (or "complete not-rc4")
      once every piece verified: whether a connection to it was RC4 (MSE).
  lt_peer.py seed TORRENT DATA_DIR TIMEOUT_S
      seeds DATA_DIR's copy; prints "port N" once checked and listening,
      then serves until stdin closes or the timeout.
  --encryption forced|enabled|disabled (before the mode)
      libtorrent's in_enc_policy and out_enc_policy; forced also sets
      allowed_enc_level to RC4 only [default: libtorrent's, enabled].
With LT_PEER_LOG=1 in the environment, libtorrent's peer log lines of the Fast
extension (BEP 6) and the extension handshake go to stdout as "peer_log: ...",
e.g. "<== HAVE_ALL" (received) or "==> HAVE_ALL" (sent; only when both sides
set the fast bit)."""
import os
import select
import sys
import time

import libtorrent as lt


def session(encryption):
    settings = {
        "listen_interfaces": "127.0.0.1:0",
        "enable_dht": False,
        "enable_lsd": False,
        "enable_upnp": False,
        "enable_natpmp": False,
        # Every peer of a test network is 127.0.0.1.
        "allow_multiple_connections_per_ip": True,
        "alert_mask": lt.alert.category_t.error_notification | lt.alert.category_t.status_notification
        | (lt.alert.category_t.peer_log_notification if PEER_LOG else 0),
    }
    if encryption is not None:
        # settings_pack: pe_forced 0, pe_enabled 1, pe_disabled 2; allowed_enc_level pe_rc4 2.
        policy = {"forced": 0, "enabled": 1, "disabled": 2}[encryption]
        settings.update({"in_enc_policy": policy, "out_enc_policy": policy})
        if encryption == "forced":
            settings.update({"allowed_enc_level": 2, "prefer_rc4": True})
    return lt.session(settings)


PEER_LOG = os.environ.get("LT_PEER_LOG") == "1"
FAST_EVENTS = ("HAVE_ALL", "HAVE_NONE", "ALLOWED_FAST", "REJECT", "SUGGEST", "EXTENDED_HANDSHAKE")


def errors(ses):
    for a in ses.pop_alerts():
        if a.category() & lt.alert.category_t.error_notification:
            print("alert:", a.message(), file=sys.stderr)
        elif PEER_LOG and isinstance(a, lt.peer_log_alert) and any(e in a.message() for e in FAST_EVENTS):
            print("peer_log:", a.message(), flush=True)


def main():
    encryption = None
    if sys.argv[1] == "--encryption":
        encryption = sys.argv[2]
        del sys.argv[1:3]
    mode = sys.argv[1]
    info = lt.torrent_info(sys.argv[2])
    ses = session(encryption)
    h = ses.add_torrent({"ti": info, "save_path": sys.argv[3]})
    deadline = time.time() + float(sys.argv[-1])
    if mode == "leech":
        host, port = sys.argv[4].rsplit(":", 1)
        connected = 0
        rc4 = False
        while time.time() < deadline:
            for p in h.get_peer_info():
                rc4 = rc4 or bool(p.flags & lt.peer_info.rc4_encrypted)
            s = h.status()
            if s.is_seeding:
                # Whether any connection to the node was RC4-encrypted (MSE).
                print("complete", "rc4" if rc4 else "not-rc4", flush=True)
                return 0
            # As a peer from a tracker or the DHT: added once (libtorrent
            # tries uTP, falls back to TCP, then plaintext after encrypted);
            # again only if that led nowhere. Adding it again at once would
            # restart the uTP attempt and cut the fallback short.
            if s.num_peers == 0 and time.time() > connected + 10.0:
                h.connect_peer((host, int(port)))
                connected = time.time()
            ses.wait_for_alert(100)
            errors(ses)
        s = h.status()
        print("timed out at %.1f%% with %d peers" % (s.progress * 100, s.num_peers), file=sys.stderr)
        return 1
    while time.time() < deadline and not h.status().is_seeding:
        ses.wait_for_alert(100)
        errors(ses)
    if not h.status().is_seeding:
        print("the seed's data did not check", file=sys.stderr)
        return 1
    print("port %d" % ses.listen_port(), flush=True)
    while time.time() < deadline:
        if select.select([sys.stdin], [], [], 0.2)[0] and not sys.stdin.read(1):
            return 0
        errors(ses)
    return 0


sys.exit(main())
