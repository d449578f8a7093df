//! Node ids bound to IP addresses (BEP 42, "DHT security extension").
//!
//! The first 21 bits of a node id are the top 21 bits of
//! `crc32c((ip & mask) | (r << 29))` (IPv4 mask `03 0f 3f ff`, IPv6 the first
//! 8 bytes masked by `01 03 07 0f 1f 3f 7f ff`, `r` in the top 3 bits of the
//! first byte), and the last byte of the id is a random byte whose low 3
//! bits are `r`. A node cannot then choose an id near a key it wants to
//! capture without also controlling many addresses. Addresses of local
//! networks are exempt (BEP 42): 10/8, 172.16/12, 192.168/16, 169.254/16,
//! 127/8, and for IPv6 loopback, link-local and unique-local addresses.

use std::net::IpAddr;

use super::krpc::Id;

/// The masked address bytes, `r` mixed in, that the CRC runs over.
fn masked(ip: IpAddr, r: u8) -> ([u8; 8], usize) {
    const V4_MASK: [u8; 4] = [0x03, 0x0f, 0x3f, 0xff];
    const V6_MASK: [u8; 8] = [0x01, 0x03, 0x07, 0x0f, 0x1f, 0x3f, 0x7f, 0xff];
    let mut b = [0u8; 8];
    let n = match ip {
        IpAddr::V4(v4) => {
            for (i, o) in v4.octets().iter().enumerate() {
                b[i] = o & V4_MASK[i];
            }
            4
        }
        IpAddr::V6(v6) => {
            for (i, o) in v6.octets()[..8].iter().enumerate() {
                b[i] = o & V6_MASK[i];
            }
            8
        }
    };
    b[0] |= (r & 0x7) << 5;
    (b, n)
}

fn crc(ip: IpAddr, r: u8) -> u32 {
    let (b, n) = masked(ip, r);
    crc32c::crc32c(&b[..n])
}

/// Whether BEP 42 leaves `ip` out: local-network addresses.
pub fn is_exempt(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback() || v4.is_private() || v4.is_link_local() || v4.is_unspecified(),
        IpAddr::V6(v6) => {
            let seg0 = v6.segments()[0];
            v6.is_loopback() || v6.is_unspecified() || (seg0 & 0xffc0) == 0xfe80 || (seg0 & 0xfe00) == 0xfc00
        }
    }
}

/// A node id for external address `ip`: `random` fills the free bits
/// (its last byte's low 3 bits become `r`).
pub fn generate_id(ip: IpAddr, random: [u8; 20]) -> Id {
    let mut id = random;
    let r = id[19] & 0x7;
    let c = crc(ip, r);
    id[0] = (c >> 24) as u8;
    id[1] = (c >> 16) as u8;
    id[2] = ((c >> 8) as u8 & 0xf8) | (id[2] & 0x7);
    Id(id)
}

/// Whether `id` is a valid BEP 42 id for `ip` (always true for exempt addresses).
pub fn verify_id(id: &Id, ip: IpAddr) -> bool {
    if is_exempt(ip) {
        return true;
    }
    let c = crc(ip, id.0[19] & 0x7);
    id.0[0] == (c >> 24) as u8 && id.0[1] == (c >> 16) as u8 && (id.0[2] & 0xf8) == ((c >> 8) as u8 & 0xf8)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> [u8; 20] {
        let mut b = [0u8; 20];
        for (i, o) in b.iter_mut().enumerate() {
            *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap();
        }
        b
    }

    /// BEP 42's table of examples: IP, rand, node id.
    const EXAMPLES: [(&str, u8, &str); 5] = [
        ("124.31.75.21", 1, "5fbfbff10c5d6a4ec8a88e4c6ab4c28b95eee401"),
        ("21.75.31.124", 86, "5a3ce9c14e7a08645677bbd1cfe7d8f956d53256"),
        ("65.23.51.170", 22, "a5d43220bc8f112a3d426c84764f8c2a1150e616"),
        ("84.124.73.14", 65, "1b0321dd1bb1fe518101ceef99462b947a01ff41"),
        ("43.213.53.83", 90, "e56f6cbf5b7c4be0237986d5243b87aa6d51305a"),
    ];

    #[test]
    fn the_beps_examples_verify_and_generate() {
        for (ip, rand, id) in EXAMPLES {
            let ip: IpAddr = ip.parse().unwrap();
            let id = hex(id);
            assert_eq!(id[19], rand);
            assert!(verify_id(&Id(id), ip), "{ip}");
            // Generating from the example's own free bits gives the example.
            assert_eq!(generate_id(ip, id), Id(id), "{ip}");
        }
    }

    #[test]
    fn an_id_from_another_address_or_with_other_bits_fails() {
        let (ip, _, id) = EXAMPLES[0];
        let ip: IpAddr = ip.parse().unwrap();
        let mut id = hex(id);
        assert!(!verify_id(&Id(id), "8.8.8.8".parse().unwrap()));
        id[19] ^= 1; // another r
        assert!(!verify_id(&Id(id), ip));
        id[19] ^= 1;
        id[2] ^= 0x08; // the 21st bit
        assert!(!verify_id(&Id(id), ip));
        id[2] ^= 0x08 | 0x04; // a free bit
        assert!(verify_id(&Id(id), ip));
    }

    #[test]
    fn local_addresses_are_exempt_and_ipv6_ids_verify() {
        let any = Id([0xab; 20]);
        for ip in ["127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.0.1", "::1", "fe80::1", "fd00::1"] {
            assert!(verify_id(&any, ip.parse().unwrap()), "{ip}");
        }
        assert!(!verify_id(&any, "8.8.8.8".parse().unwrap()));
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        let id = generate_id(v6, [7; 20]);
        assert!(verify_id(&id, v6));
        assert!(!verify_id(&id, "2001:db9::1".parse().unwrap()));
    }
}
