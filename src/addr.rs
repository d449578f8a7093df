//! Peer addresses as users write them (`--bootstrap`, request `peers`, `shardctl --node`):
//! multiaddrs and `HOST:PORT`. Below both `config` (flags) and `protocol` (requests), which use it.

use std::net::SocketAddr;

/// A peer address as given by a user: resolved when used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerAddr {
    pub host: String,
    pub port: u16,
}

impl std::fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Parses `/ip4/A.B.C.D/tcp/PORT`, `/ip6/ADDR/tcp/PORT`, `/dns[46]/HOST/tcp/PORT`
/// (trailing `/p2p/...` ignored), `HOST:PORT` or `[V6]:PORT`.
pub fn parse_peer_addr(s: &str) -> Result<PeerAddr, String> {
    if let Some(rest) = s.strip_prefix('/') {
        let parts: Vec<&str> = rest.split('/').collect();
        if parts.len() < 4 || !matches!(parts[2], "tcp" | "udp") {
            return Err(format!("{s:?} is not a multiaddr of the form /ip4/A.B.C.D/tcp/PORT"));
        }
        let host = match parts[0] {
            "ip4" => parts[1]
                .parse::<std::net::Ipv4Addr>()
                .map_err(|_| format!("{:?} in {s:?} is not an IPv4 address", parts[1]))?
                .to_string(),
            "ip6" => parts[1]
                .parse::<std::net::Ipv6Addr>()
                .map_err(|_| format!("{:?} in {s:?} is not an IPv6 address", parts[1]))?
                .to_string(),
            "dns" | "dns4" | "dns6" if !parts[1].is_empty() => parts[1].to_string(),
            other => return Err(format!("multiaddr protocol {other:?} in {s:?} is not ip4, ip6 or dns")),
        };
        let port = parse_port(parts[3]).map_err(|e| format!("{e} in {s:?}"))?;
        return Ok(PeerAddr { host, port });
    }
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Ok(PeerAddr { host: sa.ip().to_string(), port: sa.port() });
    }
    let (host, port) = s.rsplit_once(':').ok_or_else(|| format!("{s:?} is not HOST:PORT or a multiaddr"))?;
    if host.is_empty() || host.contains(':') {
        return Err(format!("{s:?} is not HOST:PORT or a multiaddr"));
    }
    Ok(PeerAddr { host: host.to_string(), port: parse_port(port).map_err(|e| format!("{e} in {s:?}"))? })
}

fn parse_port(s: &str) -> Result<u16, String> {
    match s.parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(format!("port {s:?} is not 1-65535")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_addresses() {
        let p = |s| parse_peer_addr(s);
        assert_eq!(p("/ip6/::1/tcp/7").unwrap(), PeerAddr { host: "::1".into(), port: 7 });
        assert_eq!(p("[::1]:7").unwrap().to_string(), "[::1]:7");
        assert_eq!(p("node0.lan:51820").unwrap().host, "node0.lan");
        assert_eq!(p("/dns4/node0.lan/tcp/1/p2p/Qm").unwrap().port, 1);
        assert!(p("/ip4/1.2.3.4/tcp/0").is_err());
        assert!(p("/ip4/1.2.3.4").is_err());
        assert!(p("/onion3/x/tcp/1").is_err());
        assert!(p("nohost").is_err());
        assert!(p(":80").is_err());
    }
}
