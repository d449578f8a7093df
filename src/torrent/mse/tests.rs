//! The handshake between both sides in memory, split at every offset, with both payload
//! methods; and every bad input, each ending in its own error.

use super::*;

const IH: InfoHash = InfoHash([7; 20]);
const OTHER: InfoHash = InfoHash([9; 20]);
const BOTH_RC4: Methods = Methods { allowed: PLAINTEXT | RC4, prefer_rc4: true };
const BOTH_PLAIN: Methods = Methods { allowed: PLAINTEXT | RC4, prefer_rc4: false };
const ONLY_RC4: Methods = Methods { allowed: RC4, prefer_rc4: true };
const ONLY_PLAIN: Methods = Methods { allowed: PLAINTEXT, prefer_rc4: false };

/// Deterministic "random" bytes: SHA-1 of a seed and a counter.
fn secrets(seed: u8, pad1: usize, pad2: usize) -> Secrets {
    let mut n = 0u32;
    let mut fill = |buf: &mut [u8]| {
        for chunk in buf.chunks_mut(20) {
            n += 1;
            let d = sha1_of(&[&[seed], &n.to_be_bytes()]);
            chunk.copy_from_slice(&d[..chunk.len()]);
        }
    };
    let mut private_key = [0u8; PRIVATE_LEN];
    fill(&mut private_key);
    let (mut p1, mut p2) = (vec![0; pad1], vec![0; pad2]);
    fill(&mut p1);
    fill(&mut p2);
    Secrets { private_key, pad1: p1, pad2: p2 }
}

fn serves_ih(h: &[u8; 20]) -> Option<InfoHash> {
    [OTHER, IH].into_iter().find(|ih| req2_hash(ih) == *h)
}

struct Ends {
    a: Established,
    b: Established,
    /// Bytes B received after its handshake ended (IA, raw).
    b_rest: Vec<u8>,
    /// A's output held back after step 3 (beyond IA).
    a_held: Vec<u8>,
}

/// Runs A and B against each other, moving at most `chunk` bytes per turn each way.
fn run(a_m: Methods, b_m: Methods, ia: &[u8], chunk: usize, pads: (usize, usize)) -> Result<Ends, MseError> {
    let now = Instant::now();
    let mut to_b = Vec::new();
    let mut a = Handshake::initiator(IH, a_m, secrets(1, pads.0, pads.1), now, &mut to_b);
    let mut b = Handshake::receiver(b_m, secrets(2, pads.1, pads.0), now);
    let (mut a_in, mut b_in, mut to_a) = (Vec::new(), Vec::new(), Vec::new());
    let mut held = ia.to_vec();
    let (mut a_done, mut b_done) = (None, None);
    for _ in 0..100_000 {
        let n = chunk.min(to_b.len());
        b_in.extend(to_b.drain(..n));
        if b_done.is_none() {
            let fed = b.feed(&b_in, &mut Vec::new(), &serves_ih, &mut to_a)?;
            b_in.drain(..fed.used);
            b_done = fed.done;
        }
        let n = chunk.min(to_a.len());
        a_in.extend(to_a.drain(..n));
        if a_done.is_none() {
            let fed = a.feed(&a_in, &mut held, &serves_ih, &mut to_b)?;
            a_in.drain(..fed.used);
            a_done = fed.done;
        }
        if to_b.is_empty() && to_a.is_empty() && a_done.is_some() && b_done.is_some() {
            assert!(a_in.is_empty(), "A has nothing left to read");
            let (Some(a), Some(b)) = (a_done, b_done) else { unreachable!("checked") };
            return Ok(Ends { a, b, b_rest: b_in, a_held: held });
        }
    }
    panic!("the handshake did not finish");
}

/// Sends `data` through `from`'s outbound and `to`'s inbound.
fn carry(from: &mut Established, to: &mut Established, data: &[u8]) -> Vec<u8> {
    let mut wire = data.to_vec();
    if let Some(c) = &mut from.outbound {
        c.apply(&mut wire);
    }
    let encrypted = wire != data;
    to.inbound.decrypt(&mut wire);
    assert_eq!(encrypted, from.method == RC4 && !data.is_empty(), "RC4 encrypts, plaintext does not");
    wire
}

#[test]
fn both_sides_agree_on_rc4_and_carry_ia_and_payload_both_ways() {
    let ia: Vec<u8> = (0..68u8).collect();
    let mut e = run(BOTH_RC4, BOTH_RC4, &ia, usize::MAX, (100, 30)).unwrap();
    assert_eq!((e.a.method, e.b.method), (RC4, RC4));
    assert_eq!((e.a.info_hash, e.b.info_hash), (IH, IH));
    assert!(e.a_held.is_empty(), "all of it went as IA");
    assert_ne!(e.b_rest, ia, "IA travels encrypted");
    e.b.inbound.decrypt(&mut e.b_rest);
    assert_eq!(e.b_rest, ia);
    for round in 0..3 {
        let msg = vec![round as u8; 5000];
        assert_eq!(carry(&mut e.a, &mut e.b, &msg), msg);
        assert_eq!(carry(&mut e.b, &mut e.a, &msg), msg);
    }
}

#[test]
fn a_receiver_preferring_plaintext_selects_it_and_only_ia_is_rc4() {
    let ia = b"\x13BitTorrent protocol and the rest of a handshake".to_vec();
    let mut e = run(BOTH_RC4, BOTH_PLAIN, &ia, usize::MAX, (0, 512)).unwrap();
    assert_eq!((e.a.method, e.b.method), (PLAINTEXT, PLAINTEXT));
    assert!(e.a.outbound.is_none() && e.b.outbound.is_none());
    // IA and then plaintext arrive in one read: the inbound turns plaintext after IA.
    let mut wire = e.b_rest.clone();
    wire.extend_from_slice(b"plain after IA");
    e.b.inbound.decrypt(&mut wire);
    assert_eq!(&wire[..ia.len()], &ia[..]);
    assert_eq!(&wire[ia.len()..], b"plain after IA");
    assert_eq!(carry(&mut e.b, &mut e.a, b"handshake back"), b"handshake back");
}

#[test]
fn every_split_of_the_byte_streams_gives_the_same_result() {
    let ia = vec![0x13; 68];
    for chunk in [1, 2, 7, 19, 20, 21, 95, 96, 97, 500, 1000] {
        for (b_m, method) in [(BOTH_RC4, RC4), (BOTH_PLAIN, PLAINTEXT)] {
            let mut e = run(BOTH_RC4, b_m, &ia, chunk, (37, 511)).unwrap();
            assert_eq!((e.a.method, e.b.method), (method, method), "chunk {chunk}");
            e.b.inbound.decrypt(&mut e.b_rest);
            assert_eq!(e.b_rest, ia, "chunk {chunk}");
        }
    }
}

#[test]
fn an_initiator_requiring_rc4_gets_rc4_and_no_ia_is_fine() {
    let mut e = run(ONLY_RC4, BOTH_PLAIN, &[], 64, (512, 0)).unwrap();
    assert_eq!(e.b.method, RC4, "plaintext was not offered");
    assert!(e.b_rest.is_empty());
    assert_eq!(carry(&mut e.a, &mut e.b, b"\x13BitTorrent protocol"), b"\x13BitTorrent protocol");
}

#[test]
fn ia_longer_than_a_u16_is_cut_and_the_rest_held() {
    let ia = vec![1u8; 70_000];
    let e = run(BOTH_RC4, BOTH_RC4, &ia, usize::MAX, (0, 0)).unwrap();
    assert_eq!(e.a_held.len(), 70_000 - 65_535);
}

#[test]
fn keys_are_96_bytes_and_both_sides_derive_one_secret() {
    let (x, y) = (Keys::new(&[0xff; 20]), Keys::new(&[1; 20]));
    let (s1, s2) = (x.shared(&y.public).unwrap(), y.shared(&x.public).unwrap());
    assert_eq!(s1, s2);
    // 2^1 mod P = 2: a small public key is written with leading zeros.
    let two = Keys::new(&{
        let mut k = [0; 20];
        k[19] = 1;
        k
    });
    assert_eq!(two.public[..95], [0; 95]);
    assert_eq!(two.public[95], 2);
}

// ---- bad input ----

/// A's step 1 and, after B's step 2, A's step 3, split apart: (Ya+PadA, step 3).
fn initiator_messages(a_m: Methods, ia: &[u8], pad_a: usize, pad_c: usize) -> (Vec<u8>, Vec<u8>, Handshake) {
    let now = Instant::now();
    let mut step1 = Vec::new();
    let mut a = Handshake::initiator(IH, a_m, secrets(1, pad_a, pad_c), now, &mut step1);
    let mut b = Handshake::receiver(BOTH_RC4, secrets(2, 0, 0), now);
    let mut step2 = Vec::new();
    b.feed(&step1[..KEY_LEN], &mut Vec::new(), &serves_ih, &mut step2).unwrap();
    let mut step3 = Vec::new();
    let fed = a.feed(&step2, &mut ia.to_vec(), &serves_ih, &mut step3).unwrap();
    assert_eq!(fed.used, step2.len());
    (step1, step3, b)
}

/// Feeds `bytes` to `b` in one go and returns the error.
fn fails(b: &mut Handshake, bytes: &[u8]) -> MseError {
    let mut out = Vec::new();
    match b.feed(bytes, &mut Vec::new(), &serves_ih, &mut out) {
        Err(e) => e,
        Ok(f) => panic!("accepted: used {} done {}", f.used, f.done.is_some()),
    }
}

/// B after step 1 with a real Ya, so the secret is A's; `step3` replaced by the test.
fn receiver_after_step1(b_m: Methods) -> (Handshake, Vec<u8>, [u8; KEY_LEN]) {
    let now = Instant::now();
    let mut step1 = Vec::new();
    let a_keys = Keys::new(&secrets(1, 0, 0).private_key);
    let _ = Handshake::initiator(IH, BOTH_RC4, secrets(1, 0, 0), now, &mut step1);
    let mut b = Handshake::receiver(b_m, secrets(2, 0, 0), now);
    let mut step2 = Vec::new();
    b.feed(&step1, &mut Vec::new(), &serves_ih, &mut step2).unwrap();
    let secret = a_keys.shared(&step2[..KEY_LEN]).unwrap();
    (b, step1, secret)
}

/// A step 3 written by hand: `fields` (VC, provide, len(PadC), PadC, len(IA)) encrypted with keyA.
fn step3(secret: &[u8; KEY_LEN], skey: &InfoHash, fields: &[u8]) -> Vec<u8> {
    let mut m = sha1_of(&[b"req1", secret]).to_vec();
    let req3 = sha1_of(&[b"req3", secret]);
    m.extend(req2_hash(skey).iter().zip(req3).map(|(a, b)| a ^ b));
    let mut enc = fields.to_vec();
    Cipher::new(b"keyA", secret, skey).apply(&mut enc);
    m.extend(enc);
    m
}

fn fields(vc: [u8; 8], provide: u32, pad: u16, ia: u16) -> Vec<u8> {
    let mut f = vc.to_vec();
    f.extend(provide.to_be_bytes());
    f.extend(pad.to_be_bytes());
    f.extend(vec![0xAA; (pad as usize).min(600)]);
    f.extend(ia.to_be_bytes());
    f
}

#[test]
fn a_hand_written_step_3_is_accepted_so_the_bad_ones_below_fail_for_their_fault_alone() {
    let (mut b, _, secret) = receiver_after_step1(BOTH_RC4);
    let mut out = Vec::new();
    let fed = b.feed(&step3(&secret, &IH, &fields(VC, RC4, 10, 0)), &mut Vec::new(), &serves_ih, &mut out).unwrap();
    assert!(fed.done.is_some());
}

#[test]
fn a_wrong_verification_constant_is_refused_by_the_receiver() {
    let (mut b, _, secret) = receiver_after_step1(BOTH_RC4);
    let e = fails(&mut b, &step3(&secret, &IH, &fields([0, 0, 0, 0, 0, 0, 0, 1], RC4, 0, 0)));
    assert_eq!(e, MseError::VerificationConstant);
}

#[test]
fn a_wrong_verification_constant_from_the_receiver_is_never_synchronised_on() {
    // The initiator searches PadB for ENCRYPT(VC); B's step 4 with a flipped VC bit is not it,
    // and after 512 bytes of pad the search gives up.
    let now = Instant::now();
    let mut to_b = Vec::new();
    let mut a = Handshake::initiator(IH, BOTH_RC4, secrets(1, 0, 0), now, &mut to_b);
    let mut b = Handshake::receiver(BOTH_RC4, secrets(2, 0, 0), now);
    let mut to_a = Vec::new();
    b.feed(&to_b, &mut Vec::new(), &serves_ih, &mut to_a).unwrap();
    let mut held = Vec::new();
    let fed = a.feed(&to_a[..KEY_LEN], &mut held, &serves_ih, &mut Vec::new()).unwrap();
    assert_eq!(fed.used, KEY_LEN);
    let secret = b.secret;
    let mut step4 = fields([0, 0, 0, 0, 0, 0, 0, 1], RC4, 0, 0);
    step4.truncate(14);
    Cipher::new(b"keyB", &secret, &IH).apply(&mut step4);
    let mut junk = step4.clone();
    junk.resize(MAX_PAD + 7, 0x55);
    assert!(a.feed(&junk, &mut held, &serves_ih, &mut Vec::new()).unwrap().done.is_none(), "may still come");
    junk.push(0x55);
    assert_eq!(a.feed(&junk, &mut held, &serves_ih, &mut Vec::new()).err(), Some(MseError::SyncNotFound));
}

#[test]
fn pad_a_over_512_bytes_is_refused() {
    let (step1, step3, _) = initiator_messages(BOTH_RC4, &[], 0, 0);
    let mut wire = step1[..KEY_LEN].to_vec();
    wire.extend(vec![0x11; MAX_PAD + 1]);
    wire.extend(&step3);
    let (_, _, mut b) = initiator_messages(BOTH_RC4, &[], 0, 0);
    assert_eq!(fails(&mut b, &wire[KEY_LEN..]), MseError::SyncNotFound);
    // 512 bytes of PadA are fine.
    let (step1, step3, mut b) = initiator_messages(BOTH_RC4, &[], 0, 0);
    let mut wire = vec![0x11; MAX_PAD];
    wire.extend(&step3);
    let fed = b.feed(&wire, &mut Vec::new(), &serves_ih, &mut Vec::new()).unwrap();
    assert!(fed.done.is_some(), "{} of {} bytes used", fed.used, step1.len());
}

#[test]
fn pad_c_over_512_bytes_is_refused() {
    let (mut b, _, secret) = receiver_after_step1(BOTH_RC4);
    assert_eq!(fails(&mut b, &step3(&secret, &IH, &fields(VC, RC4, 513, 0))), MseError::PadTooLong(513));
    let (mut b, _, secret) = receiver_after_step1(BOTH_RC4);
    assert_eq!(fails(&mut b, &step3(&secret, &IH, &fields(VC, RC4, 0xffff, 0))), MseError::PadTooLong(0xffff));
}

/// A after step 3, and the secret, to answer it with a hand-written step 4.
fn initiator_after_step3(a_m: Methods) -> (Handshake, [u8; KEY_LEN]) {
    let now = Instant::now();
    let mut to_b = Vec::new();
    let mut a = Handshake::initiator(IH, a_m, secrets(1, 0, 0), now, &mut to_b);
    let b_keys = Keys::new(&secrets(2, 0, 0).private_key);
    a.feed(&b_keys.public, &mut Vec::new(), &serves_ih, &mut Vec::new()).unwrap();
    let secret = b_keys.shared(&to_b[..KEY_LEN]).unwrap();
    (a, secret)
}

fn step4(secret: &[u8; KEY_LEN], select: u32, pad: u16) -> Vec<u8> {
    let mut f = fields(VC, select, pad, 0);
    f.truncate(f.len() - 2); // no len(IA) in step 4
    Cipher::new(b"keyB", secret, &IH).apply(&mut f);
    f
}

#[test]
fn pad_d_over_512_bytes_and_unknown_selections_are_refused_by_the_initiator() {
    let (mut a, secret) = initiator_after_step3(BOTH_RC4);
    let ok = a.feed(&step4(&secret, RC4, 5), &mut Vec::new(), &serves_ih, &mut Vec::new()).unwrap();
    assert!(ok.done.is_some(), "the hand-written step 4 is right");
    let (mut a, secret) = initiator_after_step3(BOTH_RC4);
    assert_eq!(fails(&mut a, &step4(&secret, RC4, 513)), MseError::PadTooLong(513));
    for select in [0, 0x03, 0x04, 0x8000_0002] {
        let (mut a, secret) = initiator_after_step3(BOTH_RC4);
        assert_eq!(fails(&mut a, &step4(&secret, select, 0)), MseError::BadSelect(select), "{select:#x}");
    }
    // RC4 when only plaintext was offered.
    let (mut a, secret) = initiator_after_step3(ONLY_PLAIN);
    assert_eq!(fails(&mut a, &step4(&secret, RC4, 0)), MseError::BadSelect(RC4));
}

#[test]
fn an_offer_without_a_method_we_allow_is_refused() {
    let (mut b, _, secret) = receiver_after_step1(ONLY_RC4);
    assert_eq!(fails(&mut b, &step3(&secret, &IH, &fields(VC, PLAINTEXT, 0, 0))), MseError::NoCommonMethod(1));
    let (mut b, _, secret) = receiver_after_step1(BOTH_RC4);
    assert_eq!(fails(&mut b, &step3(&secret, &IH, &fields(VC, 0x0c, 0, 0))), MseError::NoCommonMethod(0x0c));
    // Unknown bits beside a known one are ignored.
    let (mut b, _, secret) = receiver_after_step1(BOTH_RC4);
    let fed = b.feed(&step3(&secret, &IH, &fields(VC, 0xfe, 0, 0)), &mut Vec::new(), &serves_ih, &mut Vec::new());
    assert_eq!(fed.unwrap().done.unwrap().method, RC4);
}

#[test]
fn a_torrent_we_do_not_serve_is_refused() {
    let (mut b, _, secret) = receiver_after_step1(BOTH_RC4);
    let unknown = InfoHash([3; 20]);
    assert_eq!(fails(&mut b, &step3(&secret, &unknown, &fields(VC, RC4, 0, 0))), MseError::UnknownInfoHash);
    // Both torrents served are found.
    let (mut b, _, secret) = receiver_after_step1(BOTH_RC4);
    let fed = b.feed(&step3(&secret, &OTHER, &fields(VC, RC4, 0, 0)), &mut Vec::new(), &serves_ih, &mut Vec::new());
    assert_eq!(fed.unwrap().done.unwrap().info_hash, OTHER);
}

#[test]
fn degenerate_public_keys_are_refused() {
    let p = prime();
    for y in [BigUint::from(0u32), BigUint::from(1u32), p - 1u32, p.clone()] {
        let mut b = Handshake::receiver(BOTH_RC4, secrets(2, 0, 0), Instant::now());
        assert_eq!(fails(&mut b, &to_key_bytes(&y)), MseError::BadPublicKey);
    }
    let mut b = Handshake::receiver(BOTH_RC4, secrets(2, 0, 0), Instant::now());
    assert_eq!(fails(&mut b, &[0xff; KEY_LEN]), MseError::BadPublicKey, "above P");
}

#[test]
fn a_handshake_that_stops_halfway_waits_and_then_expires() {
    let (step1, step3, mut b) = initiator_messages(BOTH_RC4, &[1; 68], 0, 0);
    // The sync hash, the obfuscated info hash and part of the encrypted fields.
    let half = &step3[..48];
    let start = Instant::now();
    let fed = b.feed(half, &mut Vec::new(), &serves_ih, &mut Vec::new()).unwrap();
    assert!(fed.done.is_none());
    assert_eq!(fed.used, 20, "the sync hash is used, the rest waits");
    assert_eq!(step1.len(), KEY_LEN);
    assert!(!b.expired(start + Duration::from_secs(1), HANDSHAKE_TIMEOUT));
    assert!(b.expired(start + HANDSHAKE_TIMEOUT + Duration::from_millis(1), HANDSHAKE_TIMEOUT));
}

#[test]
fn random_bytes_are_given_up_on_within_the_bound() {
    // Not MSE at all (a valid-looking key, then noise): the receiver reads at most the key, 512
    // bytes of pad and the sync hash before it gives up, whatever else is buffered.
    let mut noise = secrets(9, 5000, 0).pad1;
    noise.truncate(5000);
    let mut b = Handshake::receiver(BOTH_RC4, secrets(2, 0, 0), Instant::now());
    let mut out = Vec::new();
    let fed = b.feed(&noise[..KEY_LEN + 100], &mut Vec::new(), &serves_ih, &mut out).unwrap();
    assert_eq!(fed.used, KEY_LEN, "key read, pad searched");
    assert_eq!(fails(&mut b, &noise[KEY_LEN..]), MseError::SyncNotFound);
    const { assert!(KEY_LEN + MAX_PAD + 20 <= MAX_HANDSHAKE_BYTES) };
}

#[test]
fn secrets_random_pads_stay_within_512() {
    let mut k = 0u8;
    for _ in 0..50 {
        let s = Secrets::random(&mut |b: &mut [u8]| {
            for x in b.iter_mut() {
                k = k.wrapping_mul(31).wrapping_add(17);
                *x = k;
            }
        });
        assert!(s.pad1.len() <= MAX_PAD && s.pad2.len() <= MAX_PAD);
    }
}
