//! KRPC, the mainline DHT's messages (BEP 5): bencoded dictionaries over UDP.
//! A sans-IO codec with strict checks: ids are 20 bytes, compact node lists a
//! multiple of 26 bytes, compact peers 6 bytes, transaction ids short.
//!
//! ```text
//! query:    {t, y:"q", q:method, a:{id, ...}, ro?:1}
//! response: {t, y:"r", r:{id, nodes?, values?, token?}, ip?}
//! error:    {t, y:"e", e:[code, message]}
//! ```
//! `ro: 1` marks a read-only node's query (BEP 43); `ip` in a response is
//! the querier's address as the responder saw it (BEP 42), compact.
//! A response does not name its query: the caller matches `t` to what it sent.

use std::borrow::Cow;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4};

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

/// A node's id and address (IPv4 compact form: 26 bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NodeInfo {
    pub id: Id,
    pub addr: SocketAddrV4,
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
    pub nodes: Vec<NodeInfo>,
    pub values: Vec<SocketAddrV4>,
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

pub fn encode_nodes(nodes: &[NodeInfo]) -> Vec<u8> {
    let mut out = Vec::with_capacity(nodes.len() * 26);
    for n in nodes {
        out.extend_from_slice(&n.id.0);
        out.extend_from_slice(&n.addr.ip().octets());
        out.extend_from_slice(&n.addr.port().to_be_bytes());
    }
    out
}

fn decode_nodes(b: &[u8]) -> Option<Vec<NodeInfo>> {
    if !b.len().is_multiple_of(26) {
        return None;
    }
    Some(
        b.chunks_exact(26)
            .map(|c| NodeInfo {
                id: Id(c[..20].try_into().expect("20 bytes")),
                addr: SocketAddrV4::new(Ipv4Addr::new(c[20], c[21], c[22], c[23]), u16::from_be_bytes([c[24], c[25]])),
            })
            .filter(|n| n.addr.port() != 0)
            .collect(),
    )
}

pub fn encode_peer(p: &SocketAddrV4) -> [u8; 6] {
    let mut out = [0u8; 6];
    out[..4].copy_from_slice(&p.ip().octets());
    out[4..].copy_from_slice(&p.port().to_be_bytes());
    out
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

fn decode_peer(b: &[u8]) -> Option<SocketAddrV4> {
    if b.len() != 6 {
        return None;
    }
    Some(SocketAddrV4::new(Ipv4Addr::new(b[0], b[1], b[2], b[3]), u16::from_be_bytes([b[4], b[5]])))
}

impl Message {
    /// A message with no BEP 42/43 extras.
    pub fn new(tid: Vec<u8>, body: Body) -> Message {
        Message { tid, body, ro: false, ip: None }
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
                if let Some(t) = &response.token {
                    r.push(("token", Value::bytes(&t[..])));
                }
                if !response.values.is_empty() {
                    r.push((
                        "values",
                        Value::List(response.values.iter().map(|p| Value::bytes(encode_peer(p).to_vec())).collect()),
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
                    let values = match r.get("values") {
                        None => Vec::new(),
                        Some(list) => list
                            .as_list()
                            .ok_or_else(|| fail(t.clone(), code::PROTOCOL, "values is not a list".into()))?
                            .iter()
                            .take(MAX_VALUES)
                            .filter_map(|p| p.as_bytes().and_then(decode_peer))
                            .collect(),
                    };
                    let token = r.get("token").and_then(Value::as_bytes).filter(|t| t.len() <= 64).map(<[u8]>::to_vec);
                    Body::Response { id, response: Response { nodes, values, token } }
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
        Ok(Message { tid, body, ro, ip })
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
                response: Response { nodes, values: vec!["1.2.3.4:5".parse().unwrap()], token: Some(b"tok".to_vec()) },
            },
            ro: false,
            ip: Some("[2001:db8::1]:6881".parse().unwrap()),
        };
        assert_eq!(Message::decode(&m.encode()).unwrap(), m);
        for q in [Query::Ping, Query::FindNode { target: id(3) }, Query::GetPeers { info_hash: id(4) }] {
            let m = Message { tid: b"t".to_vec(), body: Body::Query { id: id(5), query: q }, ro: true, ip: None };
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

    #[test]
    fn distance_is_xor() {
        let a = Id([0xff; 20]);
        let mut b = [0xff; 20];
        b[19] = 0xfe;
        assert_eq!(a.distance(&Id(b))[19], 1);
        assert_eq!(a.distance(&a), [0; 20]);
    }
}
