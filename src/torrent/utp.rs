//! Just enough of uTP (BEP 29) to say "no": the node speaks the peer wire
//! over TCP only, and a uTP connection request (`ST_SYN`) arriving on its UDP
//! port (shared with the DHT) is answered with `ST_RESET`, as a TCP port that
//! nobody listens on answers RST. Clients that try uTP first (libtorrent,
//! qBittorrent, Transmission) then fail fast and fall back to TCP instead of
//! waiting out a uTP connect timeout.

/// uTP header: type and version, extension, connection id, two timestamps,
/// window, sequence and ack numbers.
pub const HEADER_LEN: usize = 20;
const VERSION: u8 = 1;
const ST_RESET: u8 = 3;
const ST_SYN: u8 = 4;

/// The `ST_RESET` answering `packet`, if `packet` is a uTP `ST_SYN`.
/// `now_us`: the sender's clock in microseconds (truncated to 32 bits).
pub fn reset_for_syn(packet: &[u8], now_us: u32) -> Option<[u8; HEADER_LEN]> {
    if packet.len() < HEADER_LEN || packet[0] != (ST_SYN << 4 | VERSION) {
        return None;
    }
    // The SYN carries the initiator's receive id: packets to it use that id.
    let connection_id = [packet[2], packet[3]];
    let their_seq = [packet[16], packet[17]];
    let their_time = u32::from_be_bytes([packet[4], packet[5], packet[6], packet[7]]);
    let mut r = [0u8; HEADER_LEN];
    r[0] = ST_RESET << 4 | VERSION;
    r[2..4].copy_from_slice(&connection_id);
    r[4..8].copy_from_slice(&now_us.to_be_bytes());
    r[8..12].copy_from_slice(&now_us.wrapping_sub(their_time).to_be_bytes());
    // Window 0, our sequence number 0, acknowledging their SYN.
    r[18..20].copy_from_slice(&their_seq);
    Some(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_syn_gets_a_reset_for_its_connection_and_nothing_else_does() {
        // A SYN as libtorrent sends it: type 4 version 1, no extension,
        // connection id 0x1234, timestamp 1000, window 1 MiB, seq 0x0042.
        let mut syn = [0u8; 20];
        syn[0] = 0x41;
        syn[2..4].copy_from_slice(&0x1234u16.to_be_bytes());
        syn[4..8].copy_from_slice(&1000u32.to_be_bytes());
        syn[12..16].copy_from_slice(&(1u32 << 20).to_be_bytes());
        syn[16..18].copy_from_slice(&0x42u16.to_be_bytes());
        let r = reset_for_syn(&syn, 5000).unwrap();
        assert_eq!(r[0], 0x31);
        assert_eq!(u16::from_be_bytes([r[2], r[3]]), 0x1234);
        assert_eq!(u32::from_be_bytes([r[8], r[9], r[10], r[11]]), 4000);
        assert_eq!(u16::from_be_bytes([r[18], r[19]]), 0x42);
        assert_eq!(reset_for_syn(&syn[..19], 0), None, "short");
        assert_eq!(reset_for_syn(b"d1:ad2:id20:aaaaaaaaaaaaaaaaaaaae1:q4:ping1:t2:aa1:y1:qe", 0), None, "KRPC");
        let mut data = syn;
        data[0] = 0x01; // ST_DATA
        assert_eq!(reset_for_syn(&data, 0), None);
        let mut reset = syn;
        reset[0] = 0x31; // never answer a reset (no ping-pong)
        assert_eq!(reset_for_syn(&reset, 0), None);
    }
}
