//! KRPC, the mainline DHT's messages (BEP 5): bencoded dictionaries over UDP.
//! A sans-IO codec with strict checks: ids are 20 bytes, compact node lists a
//! multiple of 26 bytes (`nodes`, IPv4) or 38 bytes (`nodes6`, IPv6, BEP 32),
//! compact peers 6 or 18 bytes, transaction ids short.
//!
//! ```text
//! query:    {t, y:"q", q:method, a:{id, ..., want?:["n4","n6"]}, ro?:1}
//! response: {t, y:"r", r:{id, nodes?, nodes6?, values?, token?}, ip?}
//! error:    {t, y:"e", e:[code, message]}
//! ```
//! `ro: 1` marks a read-only node's query (BEP 43); `ip` in a response is
//! the querier's address as the responder saw it (BEP 42), compact.
//! `want` (BEP 32, find_node and get_peers) asks for `nodes` (`n4`), `nodes6`
//! (`n6`) or both; without it a node answers in the family of the socket the
//! query came on. Read leniently: a `want` that is not a list counts as
//! absent (as libtorrent reads it); unknown items are skipped; one naming
//! neither `n4` nor `n6` counts as absent too (libtorrent then sends no nodes). A `nodes6` entry holding an IPv4-mapped address (`::ffff:a.b.c.d`)
//! is dropped: an IPv4 node belongs in `nodes`, and the IPv6 table stays IPv6.
//! A response does not name its query: the caller matches `t` to what it sent.

use std::borrow::Cow;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::bencode::{self, Value};

/// Largest datagram accepted (mainline clients send under 1,500 bytes).
pub const MAX_PACKET: usize = 1472;
/// Longest transaction id accepted.
pub const MAX_TID: usize = 16;
/// Most entries of `values` kept from one response.
pub const MAX_VALUES: usize = 200;

/// BEP 5 error codes.
pub mod code {
    pub const GENERIC: i64 = 201;
    pub const SERVER: i64 = 202;
    pub const PROTOCOL: i64 = 203;
    pub const METHOD_UNKNOWN: i64 = 204;
}

/// A 160-bit DHT id (node ids and info hashes share the space).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Id(pub [u8; 20]);

impl Id {
    /// XOR distance to `other`, comparable as a big-endian number.
    pub fn distance(&self, other: &Id) -> [u8; 20] {
        let mut d = [0u8; 20];
        for (i, b) in d.iter_mut().enumerate() {
            *b = self.0[i] ^ other.0[i];
        }
        d
    }

    fn from_bytes(b: &[u8]) -> Option<Id> {
        Some(Id(b.try_into().ok()?))
    }
}

impl fmt::Debug for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", crate::hash::to_hex(&self.0[..4]))
    }
}

/// A node's id and address (compact form: 26 bytes for IPv4, 38 for IPv6).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NodeInfo {
    pub id: Id,
    pub addr: SocketAddr,
}

/// BEP 32's `want`: which node lists a find_node or get_peers answer carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Want {
    /// `n4`: `nodes` (IPv4).
    pub n4: bool,
    /// `n6`: `nodes6` (IPv6).
    pub n6: bool,
}

impl Want {
    /// Reads a `want` argument: `None` unless it is a list naming `n4` or `n6`
    /// (other items, of any type, are skipped).
    fn decode(v: Option<&Value>) -> Option<Want> {
        let list = v?.as_list()?;
        let has = |name: &[u8]| list.iter().any(|i| i.as_bytes() == Some(name));
        let w = Want { n4: has(b"n4"), n6: has(b"n6") };
        (w.n4 || w.n6).then_some(w)
    }

    fn encode(&self) -> Value<'static> {
        let mut items = Vec::new();
        if self.n4 {
            items.push(Value::str("n4"));
        }
        if self.n6 {
            items.push(Value::str("n6"));
        }
        Value::List(items)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Query {
    Ping,
    FindNode { target: Id },
    GetPeers { info_hash: Id },
    AnnouncePeer { info_hash: Id, port: u16, implied_port: bool, token: Vec<u8> },
}

impl Query {
    pub fn method(&self) -> &'static str {
        match self {
            Query::Ping => "ping",
            Query::FindNode { .. } => "find_node",
            Query::GetPeers { .. } => "get_peers",
            Query::AnnouncePeer { .. } => "announce_peer",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Response {
    /// IPv4 nodes (`nodes`, 26 bytes each).
    pub nodes: Vec<NodeInfo>,
    /// IPv6 nodes (`nodes6`, 38 bytes each, BEP 32).
    pub nodes6: Vec<NodeInfo>,
    /// Peers, compact: 6 bytes (IPv4) or 18 (IPv6) each; entries of other
    /// lengths are skipped.
    pub values: Vec<SocketAddr>,
    pub token: Option<Vec<u8>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Body {
    Query { id: Id, query: Query },
    Response { id: Id, response: Response },
    Error { code: i64, message: String },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub tid: Vec<u8>,
    pub body: Body,
    /// The sender is read-only (BEP 43): it answers no queries, and must not
    /// be put in routing tables.
    pub ro: bool,
    /// In a response: the querier's address as the responder saw it (BEP 42).
    pub ip: Option<SocketAddr>,
    /// In a find_node or get_peers query: the node lists wanted (BEP 32).
    pub want: Option<Want>,
}

/// Why a packet was refused; `code` is the BEP 5 error to answer with (a
/// query from a sender that can be answered) or `None` (drop silently).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KrpcError {
    pub tid: Option<Vec<u8>>,
    pub code: i64,
    pub message: String,
}

impl fmt::Display for KrpcError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KRPC error {}: {}", self.code, self.message)
    }
}

/// `nodes`: the IPv4 entries of `nodes`, 26 bytes each (IPv6 ones are left out).
pub fn encode_nodes(nodes: &[NodeInfo]) -> Vec<u8> {
    encode_family(nodes, false)
}

/// `nodes6`: the IPv6 entries of `nodes`, 38 bytes each (IPv4 ones are left out).
pub fn encode_nodes6(nodes: &[NodeInfo]) -> Vec<u8> {
    encode_family(nodes, true)
}

fn encode_family(nodes: &[NodeInfo], v6: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(nodes.len() * if v6 { 38 } else { 26 });
    for n in nodes.iter().filter(|n| n.addr.is_ipv6() == v6) {
        out.extend_from_slice(&n.id.0);
        out.extend_from_slice(&encode_addr(&n.addr));
    }
    out
}

/// Reads `nodes` (26-byte entries); `None` for a length not a multiple of 26.
/// Entries with port 0 are skipped.
pub fn decode_nodes(b: &[u8]) -> Option<Vec<NodeInfo>> {
    decode_family(b, 26)
}

/// Reads `nodes6` (38-byte entries); `None` for a length not a multiple of 38.
/// Entries with port 0 or an IPv4-mapped address are skipped.
pub fn decode_nodes6(b: &[u8]) -> Option<Vec<NodeInfo>> {
    decode_family(b, 38)
}

fn decode_family(b: &[u8], entry: usize) -> Option<Vec<NodeInfo>> {
    if !b.len().is_multiple_of(entry) {
        return None;
    }
    // As many entries as the bytes hold: bounded by the datagram, not by a count it claims.
    Some(
        b.chunks_exact(entry)
            .filter_map(|c| {
                let addr = decode_addr(&c[20..])?;
                let mapped = matches!(addr, SocketAddr::V6(a) if a.ip().to_ipv4_mapped().is_some());
                (addr.port() != 0 && !mapped).then(|| NodeInfo { id: Id(c[..20].try_into().expect("20 bytes")), addr })
            })
            .collect(),
    )
}

/// A compact address: 6 bytes (IPv4) or 18 (IPv6), port big-endian.
pub fn encode_addr(a: &SocketAddr) -> Vec<u8> {
    let mut out = match a.ip() {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    };
    out.extend_from_slice(&a.port().to_be_bytes());
    out
}

/// The inverse of [`encode_addr`]; `None` for any other length.
pub fn decode_addr(b: &[u8]) -> Option<SocketAddr> {
    let port = |p: &[u8]| u16::from_be_bytes([p[0], p[1]]);
    match b.len() {
        6 => Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3])), port(&b[4..]))),
        18 => {
            let ip: [u8; 16] = b[..16].try_into().expect("16 bytes");
            Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(ip)), port(&b[16..])))
        }
        _ => None,
    }
}

impl Message {
    /// A message with no BEP 42/43 extras.
    pub fn new(tid: Vec<u8>, body: Body) -> Message {
        Message { tid, body, ro: false, ip: None, want: None }
    }

    pub fn encode(&self) -> Vec<u8> {
        let tid = Value::bytes(&self.tid[..]);
        let v = match &self.body {
            Body::Query { id, query } => {
                let mut args = vec![("id", Value::bytes(&id.0[..]))];
                match query {
                    Query::Ping => {}
                    Query::FindNode { target } => args.push(("target", Value::bytes(&target.0[..]))),
                    Query::GetPeers { info_hash } => args.push(("info_hash", Value::bytes(&info_hash.0[..]))),
                    Query::AnnouncePeer { info_hash, port, implied_port, token } => {
                        args.push(("info_hash", Value::bytes(&info_hash.0[..])));
                        args.push(("port", Value::Int(*port as i64)));
                        args.push(("token", Value::bytes(&token[..])));
                        if *implied_port {
                            args.push(("implied_port", Value::Int(1)));
                        }
                    }
                }
                if let (Some(w), Query::FindNode { .. } | Query::GetPeers { .. }) = (&self.want, query) {
                    args.push(("want", w.encode()));
                }
                let mut top = vec![
                    ("a", bencode::dict(args)),
                    ("q", Value::str(query.method())),
                    ("t", tid),
                    ("y", Value::str("q")),
                ];
                if self.ro {
                    top.push(("ro", Value::Int(1)));
                }
                bencode::dict(top)
            }
            Body::Response { id, response } => {
                let mut r = vec![("id", Value::bytes(&id.0[..]))];
                if !response.nodes.is_empty() {
                    r.push(("nodes", Value::bytes(encode_nodes(&response.nodes))));
                }
                if !response.nodes6.is_empty() {
                    r.push(("nodes6", Value::bytes(encode_nodes6(&response.nodes6))));
                }
                if let Some(t) = &response.token {
                    r.push(("token", Value::bytes(&t[..])));
                }
                if !response.values.is_empty() {
                    r.push((
                        "values",
                        Value::List(response.values.iter().map(|p| Value::bytes(encode_addr(p))).collect()),
                    ));
                }
                let mut top = vec![("r", bencode::dict(r)), ("t", tid), ("y", Value::str("r"))];
                if let Some(ip) = &self.ip {
                    top.push(("ip", Value::bytes(encode_addr(ip))));
                }
                bencode::dict(top)
            }
            Body::Error { code, message } => bencode::dict([
                ("e", Value::List(vec![Value::Int(*code), Value::Bytes(Cow::Borrowed(message.as_bytes()))])),
                ("t", tid),
                ("y", Value::str("e")),
            ]),
        };
        v.encode()
    }

    pub fn decode(packet: &[u8]) -> Result<Message, KrpcError> {
        let fail = |tid: Option<Vec<u8>>, code: i64, message: String| KrpcError { tid, code, message };
        if packet.len() > MAX_PACKET {
            return Err(fail(None, code::PROTOCOL, format!("packet of {} bytes", packet.len())));
        }
        // Be liberal in key order on input (some clients do not sort), strict otherwise.
        let v =
            bencode::decode(packet).or_else(|_| lenient_decode(packet)).map_err(|e| fail(None, code::PROTOCOL, e))?;
        if v.as_dict().is_none() {
            return Err(fail(None, code::PROTOCOL, "not a dictionary".into()));
        }
        let tid = v
            .get("t")
            .and_then(Value::as_bytes)
            .filter(|t| t.len() <= MAX_TID)
            .ok_or_else(|| fail(None, code::PROTOCOL, "missing or oversized transaction id".into()))?
            .to_vec();
        let t = Some(tid.clone());
        let body =
            match v.get("y").and_then(Value::as_bytes) {
                Some(b"q") => {
                    let method = v
                        .get("q")
                        .and_then(Value::as_bytes)
                        .ok_or_else(|| fail(t.clone(), code::PROTOCOL, "query without q".into()))?;
                    let a = v
                        .get("a")
                        .filter(|a| a.as_dict().is_some())
                        .ok_or_else(|| fail(t.clone(), code::PROTOCOL, "query without a".into()))?;
                    let id = a
                        .get("id")
                        .and_then(Value::as_bytes)
                        .and_then(Id::from_bytes)
                        .ok_or_else(|| fail(t.clone(), code::PROTOCOL, "id is not 20 bytes".into()))?;
                    let id20 = |k: &str| a.get(k).and_then(Value::as_bytes).and_then(Id::from_bytes);
                    let query = match method {
                        b"ping" => Query::Ping,
                        b"find_node" => Query::FindNode {
                            target: id20("target")
                                .ok_or_else(|| fail(t.clone(), code::PROTOCOL, "target is not 20 bytes".into()))?,
                        },
                        b"get_peers" => Query::GetPeers {
                            info_hash: id20("info_hash")
                                .ok_or_else(|| fail(t.clone(), code::PROTOCOL, "info_hash is not 20 bytes".into()))?,
                        },
                        b"announce_peer" => {
                            let info_hash = id20("info_hash")
                                .ok_or_else(|| fail(t.clone(), code::PROTOCOL, "info_hash is not 20 bytes".into()))?;
                            let implied_port = a.get("implied_port").and_then(Value::as_int).is_some_and(|i| i != 0);
                            let port = a.get("port").and_then(Value::as_int).and_then(|p| u16::try_from(p).ok());
                            let port = match (port, implied_port) {
                                (Some(p), _) => p,
                                (None, true) => 0,
                                (None, false) => {
                                    return Err(fail(t, code::PROTOCOL, "announce_peer without a valid port".into()));
                                }
                            };
                            let token =
                                a.get("token").and_then(Value::as_bytes).filter(|t| t.len() <= 64).ok_or_else(
                                    || fail(t.clone(), code::PROTOCOL, "announce_peer without token".into()),
                                )?;
                            Query::AnnouncePeer { info_hash, port, implied_port, token: token.to_vec() }
                        }
                        other => {
                            return Err(fail(
                                t,
                                code::METHOD_UNKNOWN,
                                format!("method {:?} unknown", String::from_utf8_lossy(other)),
                            ));
                        }
                    };
                    Body::Query { id, query }
                }
                Some(b"r") => {
                    let r = v
                        .get("r")
                        .filter(|r| r.as_dict().is_some())
                        .ok_or_else(|| fail(t.clone(), code::PROTOCOL, "response without r".into()))?;
                    let id = r
                        .get("id")
                        .and_then(Value::as_bytes)
                        .and_then(Id::from_bytes)
                        .ok_or_else(|| fail(t.clone(), code::PROTOCOL, "id is not 20 bytes".into()))?;
                    let nodes = match r.get("nodes") {
                        None => Vec::new(),
                        Some(n) => n.as_bytes().and_then(decode_nodes).ok_or_else(|| {
                            fail(t.clone(), code::PROTOCOL, "nodes is not a multiple of 26 bytes".into())
                        })?,
                    };
                    let nodes6 = match r.get("nodes6") {
                        None => Vec::new(),
                        Some(n) => n.as_bytes().and_then(decode_nodes6).ok_or_else(|| {
                            fail(t.clone(), code::PROTOCOL, "nodes6 is not a multiple of 38 bytes".into())
                        })?,
                    };
                    let values = match r.get("values") {
                        None => Vec::new(),
                        Some(list) => list
                            .as_list()
                            .ok_or_else(|| fail(t.clone(), code::PROTOCOL, "values is not a list".into()))?
                            .iter()
                            .take(MAX_VALUES)
                            .filter_map(|p| p.as_bytes().and_then(decode_addr).filter(|a| a.port() != 0))
                            .collect(),
                    };
                    let token = r.get("token").and_then(Value::as_bytes).filter(|t| t.len() <= 64).map(<[u8]>::to_vec);
                    Body::Response { id, response: Response { nodes, nodes6, values, token } }
                }
                Some(b"e") => {
                    let e = v
                        .get("e")
                        .and_then(Value::as_list)
                        .ok_or_else(|| fail(t.clone(), code::PROTOCOL, "error without e".into()))?;
                    let code = e.first().and_then(Value::as_int).unwrap_or(code::GENERIC);
                    let message = e
                        .get(1)
                        .and_then(Value::as_bytes)
                        .map(|m| String::from_utf8_lossy(m).into_owned())
                        .unwrap_or_default();
                    Body::Error { code, message }
                }
                _ => return Err(fail(t, code::PROTOCOL, "y is not q, r or e".into())),
            };
        // Extras read leniently: a malformed one is ignored, as other clients do.
        let ro = v.get("ro").and_then(Value::as_int).is_some_and(|r| r == 1);
        let ip = v.get("ip").and_then(Value::as_bytes).and_then(decode_addr);
        let want = match &body {
            Body::Query { query: Query::FindNode { .. } | Query::GetPeers { .. }, .. } => {
                Want::decode(v.get("a").and_then(|a| a.get("want")))
            }
            _ => None,
        };
        Ok(Message { tid, body, ro, ip, want })
    }
}

/// Decodes with the strict decoder's limits but any key order (the real
/// network has clients that do not sort keys); errors as text.
fn lenient_decode(packet: &[u8]) -> Result<Value<'_>, String> {
    bencode::decode_unsorted(packet).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(b: u8) -> Id {
        Id([b; 20])
    }

    #[test]
    fn bep5_example_packets_decode() {
        // The examples of BEP 5, ids padded to 20 bytes.
        let ping = b"d1:ad2:id20:abcdefghij0123456789e1:q4:ping1:t2:aa1:y1:qe";
        let m = Message::decode(ping).unwrap();
        assert_eq!(m.tid, b"aa");
        assert_eq!(m.body, Body::Query { id: Id(*b"abcdefghij0123456789"), query: Query::Ping });
        assert_eq!(m.encode(), ping);
        let pong = b"d1:rd2:id20:mnopqrstuvwxyz123456e1:t2:aa1:y1:re";
        let m = Message::decode(pong).unwrap();
        assert_eq!(m.encode(), pong);
        let err = b"d1:eli201e23:A Generic Error Ocurrede1:t2:aa1:y1:ee";
        let m = Message::decode(err).unwrap();
        assert_eq!(m.body, Body::Error { code: 201, message: "A Generic Error Ocurred".into() });
        assert_eq!(m.encode(), err);
        let announce = b"d1:ad2:id20:abcdefghij012345678912:implied_porti1e9:info_hash20:mnopqrstuvwxyz1234564:porti6881e5:token8:aoeusnthe1:q13:announce_peer1:t2:aa1:y1:qe";
        let m = Message::decode(announce).unwrap();
        assert_eq!(
            m.body,
            Body::Query {
                id: Id(*b"abcdefghij0123456789"),
                query: Query::AnnouncePeer {
                    info_hash: Id(*b"mnopqrstuvwxyz123456"),
                    port: 6881,
                    implied_port: true,
                    token: b"aoeusnth".to_vec()
                }
            }
        );
        assert_eq!(m.encode(), announce);
    }

    #[test]
    fn responses_round_trip() {
        let nodes = vec![
            NodeInfo { id: id(1), addr: "10.0.0.1:6881".parse().unwrap() },
            NodeInfo { id: id(2), addr: "127.0.0.1:1".parse().unwrap() },
        ];
        let m = Message {
            tid: b"xy".to_vec(),
            body: Body::Response {
                id: id(9),
                response: Response {
                    nodes,
                    nodes6: vec![NodeInfo { id: id(3), addr: "[2001:db8::1]:6881".parse().unwrap() }],
                    values: vec!["1.2.3.4:5".parse().unwrap(), "[2001:db8::2]:6".parse().unwrap()],
                    token: Some(b"tok".to_vec()),
                },
            },
            ro: false,
            ip: Some("[2001:db8::1]:6881".parse().unwrap()),
            want: None,
        };
        assert_eq!(Message::decode(&m.encode()).unwrap(), m);
        for q in [Query::Ping, Query::FindNode { target: id(3) }, Query::GetPeers { info_hash: id(4) }] {
            let m = Message {
                tid: b"t".to_vec(),
                body: Body::Query { id: id(5), query: q },
                ro: true,
                ip: None,
                want: None,
            };
            assert_eq!(Message::decode(&m.encode()).unwrap(), m);
        }
    }

    #[test]
    fn bad_packets_are_refused_with_codes() {
        let code = |p: &[u8]| Message::decode(p).unwrap_err().code;
        assert_eq!(code(b"garbage"), code::PROTOCOL);
        assert_eq!(code(b"le"), code::PROTOCOL);
        assert_eq!(code(b"d1:y1:qe"), code::PROTOCOL, "no tid");
        assert_eq!(code(b"d1:t17:aaaaaaaaaaaaaaaaa1:y1:qe"), code::PROTOCOL, "tid too long");
        assert_eq!(code(b"d1:ad2:id3:abce1:q4:ping1:t2:aa1:y1:qe"), code::PROTOCOL, "short id");
        assert_eq!(code(b"d1:ad2:id20:abcdefghij0123456789e1:q4:frob1:t2:aa1:y1:qe"), code::METHOD_UNKNOWN);
        assert_eq!(
            code(b"d1:rd2:id20:abcdefghij01234567895:nodes5:abcdee1:t2:aa1:y1:re"),
            code::PROTOCOL,
            "nodes not 26n"
        );
        assert_eq!(code(&vec![b'x'; MAX_PACKET + 1]), code::PROTOCOL, "oversized");
        let e = Message::decode(b"d1:ad2:id20:abcdefghij0123456789e1:q4:frob1:t2:aa1:y1:qe").unwrap_err();
        assert_eq!(e.tid.as_deref(), Some(&b"aa"[..]), "the error can be answered");
    }

    #[test]
    fn unsorted_keys_from_other_clients_are_accepted() {
        let m = Message::decode(b"d1:t2:aa1:y1:q1:q4:ping1:ad2:id20:abcdefghij0123456789ee").unwrap();
        assert_eq!(m.body, Body::Query { id: Id(*b"abcdefghij0123456789"), query: Query::Ping });
    }

    #[test]
    fn bep42_ip_and_bep43_ro_are_read_and_bad_ones_ignored() {
        // BEP 43's example shape: ro at the top level of a query.
        let q = b"d1:ad2:id20:abcdefghij0123456789e1:q4:ping2:roi1e1:t2:aa1:y1:qe";
        let m = Message::decode(q).unwrap();
        assert!(m.ro);
        assert_eq!(m.encode(), q);
        // BEP 42's ip in a response: 6 bytes for IPv4.
        let r = b"d2:ip6:\x7c\x1f\x4b\x15\x1a\xe11:rd2:id20:mnopqrstuvwxyz123456e1:t2:aa1:y1:re";
        let m = Message::decode(r).unwrap();
        assert_eq!(m.ip, Some("124.31.75.21:6881".parse().unwrap()));
        assert_eq!(m.encode(), r);
        // A 5-byte ip, ro of 2 or a string: ignored, the message still read.
        let m = Message::decode(b"d2:ip5:abcde1:rd2:id20:mnopqrstuvwxyz123456e1:t2:aa1:y1:re").unwrap();
        assert_eq!(m.ip, None);
        for ro in [&b"i2e"[..], b"1:1", b"i0e"] {
            let q = [&b"d1:ad2:id20:abcdefghij0123456789e1:q4:ping2:ro"[..], ro, b"1:t2:aa1:y1:qe"].concat();
            assert!(!Message::decode(&q).unwrap().ro, "{}", String::from_utf8_lossy(ro));
        }
    }

    /// A find_node query from the libtorrent/BEP 32 shape, `want` given raw.
    fn find_node_with_want(want: &[u8]) -> Vec<u8> {
        [
            &b"d1:ad2:id20:abcdefghij01234567896:target20:mnopqrstuvwxyz1234564:want"[..],
            want,
            b"e1:q9:find_node1:t2:aa1:y1:qe",
        ]
        .concat()
    }

    /// A response `{id, <key>: <bytes>}` with `bytes` as a bencoded string.
    fn response_with(key: &str, bytes: &[u8]) -> Vec<u8> {
        let mut keys = vec![("id", Value::bytes(&b"mnopqrstuvwxyz123456"[..]))];
        keys.push((key, Value::bytes(bytes)));
        keys.sort_by_key(|k| k.0);
        bencode::dict([("r", bencode::dict(keys)), ("t", Value::str("aa")), ("y", Value::str("r"))]).encode()
    }

    fn compact6(id: u8, addr: &str) -> Vec<u8> {
        let a: SocketAddr = addr.parse().unwrap();
        [&[id; 20][..], &encode_addr(&a)].concat()
    }

    #[test]
    fn bep32_want_nodes6_and_ipv6_values_round_trip() {
        // want: both, in BEP 32's form.
        let q = find_node_with_want(b"l2:n42:n6e");
        let m = Message::decode(&q).unwrap();
        assert_eq!(m.want, Some(Want { n4: true, n6: true }));
        assert_eq!(m.encode(), q, "re-encoded byte for byte");
        let m = Message::decode(&find_node_with_want(b"l2:n6e")).unwrap();
        assert_eq!(m.want, Some(Want { n4: false, n6: true }));
        // nodes6: 38 bytes an entry, the address 16 bytes and the port big-endian.
        let entry = compact6(7, "[2001:db8::7]:6881");
        assert_eq!(entry.len(), 38);
        assert_eq!(&entry[36..], &6881u16.to_be_bytes());
        let r = Message::decode(&response_with("nodes6", &[entry.clone(), compact6(8, "[::1]:9")].concat())).unwrap();
        let Body::Response { response, .. } = r.body else { panic!("not a response") };
        assert_eq!(response.nodes6.len(), 2);
        assert_eq!(response.nodes6[0], NodeInfo { id: Id([7; 20]), addr: "[2001:db8::7]:6881".parse().unwrap() });
        assert!(response.nodes.is_empty());
        // encode_nodes / encode_nodes6 each keep their own family.
        let mixed = vec![
            NodeInfo { id: id(1), addr: "10.0.0.1:1".parse().unwrap() },
            NodeInfo { id: id(2), addr: "[2001:db8::2]:2".parse().unwrap() },
        ];
        assert_eq!(encode_nodes(&mixed).len(), 26);
        assert_eq!(encode_nodes6(&mixed).len(), 38);
        assert_eq!(decode_nodes6(&encode_nodes6(&mixed)).unwrap(), vec![mixed[1]]);
    }

    #[test]
    fn nodes6_not_a_multiple_of_38_bytes_is_refused() {
        let entry = compact6(7, "[2001:db8::7]:6881");
        for bad in [&entry[..37], &[&entry[..], &entry[..1]].concat()[..], &entry[..26]] {
            let e = Message::decode(&response_with("nodes6", bad)).unwrap_err();
            assert_eq!(e.code, code::PROTOCOL, "{} bytes", bad.len());
            assert!(e.message.contains("nodes6"), "{}", e.message);
        }
        assert!(Message::decode(&response_with("nodes6", &entry)).is_ok());
        assert!(Message::decode(&response_with("nodes6", b"")).is_ok(), "no entries is fine");
    }

    #[test]
    fn values_entries_of_other_lengths_are_skipped() {
        let v4 = encode_addr(&"1.2.3.4:5".parse().unwrap());
        let v6 = encode_addr(&"[2001:db8::9]:7".parse().unwrap());
        let both = [v6.clone(), v4.clone()].concat();
        let values = Value::List(vec![
            Value::bytes(&v4[..]),
            Value::bytes(&b"1234567"[..]),
            Value::bytes(&v6[..]),
            Value::bytes(&v6[..17]),
            Value::bytes(&both[..]),
            Value::Int(5),
            Value::bytes(&[0u8; 6][..]), // port 0
        ]);
        let r = bencode::dict([
            ("r", bencode::dict([("id", Value::bytes(&b"mnopqrstuvwxyz123456"[..])), ("values", values)])),
            ("t", Value::str("aa")),
            ("y", Value::str("r")),
        ])
        .encode();
        let Body::Response { response, .. } = Message::decode(&r).unwrap().body else { panic!("not a response") };
        assert_eq!(response.values, vec!["1.2.3.4:5".parse().unwrap(), "[2001:db8::9]:7".parse().unwrap()]);
    }

    #[test]
    fn want_not_a_list_or_naming_nothing_known_counts_as_absent() {
        for (want, expect) in [
            (&b"2:n6"[..], None),                                               // a string, not a list
            (b"i6e", None),                                                     // an integer
            (b"de", None),                                                      // a dictionary
            (b"le", None),                                                      // empty
            (b"l2:n82:x9i4ee", None),                                           // nothing known
            (b"l2:n6i4e3:n44ld2:n4i1eeee", Some(Want { n4: false, n6: true })), // unknown items skipped
            (b"l3:N4_2:n4e", Some(Want { n4: true, n6: false })),
        ] {
            let m = Message::decode(&find_node_with_want(want));
            let m = m.unwrap_or_else(|e| panic!("{}: {e}", String::from_utf8_lossy(want)));
            assert_eq!(m.want, expect, "{}", String::from_utf8_lossy(want));
        }
        // want on a ping means nothing.
        let ping = b"d1:ad2:id20:abcdefghij01234567894:wantl2:n6ee1:q4:ping1:t2:aa1:y1:qe";
        assert_eq!(Message::decode(ping).unwrap().want, None);
    }

    #[test]
    fn ipv4_mapped_addresses_in_nodes6_are_dropped() {
        let mapped = compact6(1, "[::ffff:10.0.0.1]:6881");
        let real = compact6(2, "[2001:db8::2]:6881");
        let port0 = compact6(3, "[2001:db8::3]:0");
        let bytes = [mapped, real, port0].concat();
        let Body::Response { response, .. } = Message::decode(&response_with("nodes6", &bytes)).unwrap().body else {
            panic!("not a response")
        };
        assert_eq!(response.nodes6, vec![NodeInfo { id: Id([2; 20]), addr: "[2001:db8::2]:6881".parse().unwrap() }]);
    }

    #[test]
    fn distance_is_xor() {
        let a = Id([0xff; 20]);
        let mut b = [0xff; 20];
        b[19] = 0xfe;
        assert_eq!(a.distance(&Id(b))[19], 1);
        assert_eq!(a.distance(&a), [0; 20]);
    }
}
