//! IPv6 sockets beside the IPv4 ones on the node's port: IPV6_V6ONLY, so the
//! IPv4 and IPv6 sockets of one port stay separate (the IPv4 DHT and the IPv6
//! DHT keep their own routing tables, BEP 32), and a host without IPv6 is told
//! apart from other bind errors.

use std::io;
use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};

/// Connections a listener queues before `accept` (as the standard library's).
const BACKLOG: i32 = 1024;

/// Whether `e`, from binding an IPv6 socket, means the host has no IPv6 (disabled in the
/// kernel, or no such address): the node then runs on IPv4 only.
pub fn no_ipv6(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EAFNOSUPPORT | libc::EADDRNOTAVAIL | libc::EPROTONOSUPPORT))
}

fn socket6(kind: Type, protocol: Protocol) -> io::Result<Socket> {
    let s = Socket::new(Domain::IPV6, kind, Some(protocol))?;
    s.set_only_v6(true)?;
    s.set_nonblocking(true)?;
    Ok(s)
}

/// A non-blocking TCP listener on IPv6 `addr`, IPv6 only (errors: the bind's).
pub fn bind_tcp6(addr: SocketAddr) -> io::Result<mio::net::TcpListener> {
    let s = socket6(Type::STREAM, Protocol::TCP)?;
    // As std and mio do on Unix: a restarted node rebinds its port at once.
    s.set_reuse_address(true)?;
    s.bind(&addr.into())?;
    s.listen(BACKLOG)?;
    Ok(mio::net::TcpListener::from_std(s.into()))
}

/// A non-blocking UDP socket on IPv6 `addr`, IPv6 only (errors: the bind's).
pub fn bind_udp6(addr: SocketAddr) -> io::Result<mio::net::UdpSocket> {
    let s = socket6(Type::DGRAM, Protocol::UDP)?;
    s.bind(&addr.into())?;
    Ok(mio::net::UdpSocket::from_std(s.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_and_v6_share_a_port_separately() {
        let v4 = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
        let port = v4.local_addr().unwrap().port();
        match bind_tcp6(SocketAddr::new(std::net::Ipv6Addr::UNSPECIFIED.into(), port)) {
            Ok(l) => assert_eq!(l.local_addr().unwrap().port(), port),
            Err(e) => assert!(no_ipv6(&e), "IPv6 beside IPv4 on port {port}: {e}"),
        }
        let u4 = std::net::UdpSocket::bind(("0.0.0.0", port)).unwrap();
        match bind_udp6(SocketAddr::new(std::net::Ipv6Addr::UNSPECIFIED.into(), port)) {
            Ok(u) => assert_eq!(u.local_addr().unwrap().port(), port),
            Err(e) => assert!(no_ipv6(&e), "{e}"),
        }
        drop(u4);
    }
}
