//! The cookie jar against hand-made IKE_SA_INIT requests.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::*;
use crate::ike::message::{Header, KePayload};
use crate::ike::test_rng::CountingRng;

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// An IKE_SA_INIT request from `src` with SPIi `spi_i`, with `cookie` first
/// if given.
fn init_request(src: &str, spi_i: u64, cookie: Option<Vec<u8>>) -> Datagram {
    let mut payloads = Vec::new();
    if let Some(c) = cookie {
        payloads.push(Payload::Notify(NotifyPayload::cookie(c)));
    }
    payloads.push(Payload::Ke(KePayload {
        group: 31,
        data: vec![9; 32],
    }));
    payloads.push(Payload::Nonce(vec![7; 32]));
    let header = Header::request(ExchangeType::IKE_SA_INIT, spi_i, 0, 0, true);
    Datagram {
        src: addr(src),
        dst: addr("10.0.0.2:500"),
        payload: Message::new(header, payloads).encode().unwrap(),
    }
}

/// The cookie of a COOKIE answer.
fn cookie_of(answer: &Datagram) -> Vec<u8> {
    let m = Message::decode(&answer.payload).unwrap();
    assert!(m.header.flags.is_response());
    assert_eq!((m.header.message_id, m.header.spi_r), (0, 0));
    match &m.payloads[..] {
        [Payload::Notify(n)] if n.notify_type == NotifyType::COOKIE => n.data.clone(),
        other => panic!("not a COOKIE answer: {other:?}"),
    }
}

fn jar(now: Instant) -> CookieJar {
    CookieJar::with_rotation(now, Duration::from_secs(60), Box::new(CountingRng(11)))
}

#[test]
fn a_request_without_a_cookie_gets_one_and_passes_with_it() {
    let now = Instant::now();
    let mut jar = jar(now);
    let first = init_request("10.0.0.1:500", 0x1001, None);
    let answer = jar.check(now, &first).unwrap_err();
    assert_eq!((answer.src, answer.dst), (first.dst, first.src));
    let cookie = cookie_of(&answer);
    assert_eq!(cookie.len(), 33);
    assert_eq!(cookie[0], 0, "the version octet");
    let retry = init_request("10.0.0.1:500", 0x1001, Some(cookie.clone()));
    assert_eq!(jar.check(now, &retry), Ok(()));
    // The same cookie again (a retransmission) passes too: no state.
    assert_eq!(jar.check(now, &retry), Ok(()));
}

#[test]
fn a_wrong_cookie_gets_a_fresh_one() {
    let now = Instant::now();
    let mut jar = jar(now);
    let cookie = cookie_of(
        &jar.check(now, &init_request("10.0.0.1:500", 1, None))
            .unwrap_err(),
    );
    // Another source address, another SPIi, an altered hash, a short one.
    let mut altered = cookie.clone();
    altered[20] ^= 1;
    for (src, spi, c) in [
        ("10.0.0.9:500", 1, cookie.clone()),
        ("10.0.0.1:500", 2, cookie.clone()),
        ("10.0.0.1:500", 1, altered),
        ("10.0.0.1:500", 1, vec![0]),
        ("10.0.0.1:500", 1, vec![]),
    ] {
        let answer = jar
            .check(now, &init_request(src, spi, Some(c)))
            .unwrap_err();
        let fresh = cookie_of(&answer);
        assert_eq!(fresh.len(), 33);
    }
    // The port does not matter (a NAT may change it between tries).
    assert_eq!(
        jar.check(now, &init_request("10.0.0.1:4500", 1, Some(cookie))),
        Ok(())
    );
}

#[test]
fn the_previous_secret_is_accepted_for_one_rotation() {
    let t0 = Instant::now();
    let mut jar = jar(t0);
    let request = init_request("10.0.0.1:500", 5, None);
    let old = cookie_of(&jar.check(t0, &request).unwrap_err());
    // After one rotation: the old cookie still passes, new ones are v1.
    let t1 = t0 + Duration::from_secs(61);
    assert_eq!(
        jar.check(t1, &init_request("10.0.0.1:500", 5, Some(old.clone()))),
        Ok(())
    );
    let new = cookie_of(&jar.check(t1, &request).unwrap_err());
    assert_eq!(new[0], 1);
    assert_ne!(new, old);
    // After the second rotation the old one is refused, the newer passes.
    let t2 = t1 + Duration::from_secs(61);
    assert!(jar
        .check(t2, &init_request("10.0.0.1:500", 5, Some(old)))
        .is_err());
    assert_eq!(
        jar.check(t2, &init_request("10.0.0.1:500", 5, Some(new.clone()))),
        Ok(())
    );
    // Long silence: both secrets are replaced.
    let t3 = t2 + Duration::from_secs(600);
    assert!(jar
        .check(t3, &init_request("10.0.0.1:500", 5, Some(new)))
        .is_err());
}

#[test]
fn anything_else_passes_untouched() {
    let now = Instant::now();
    let mut jar = jar(now);
    let mut garbage = init_request("10.0.0.1:500", 5, None);
    garbage.payload.truncate(20);
    assert_eq!(jar.check(now, &garbage), Ok(()));
    let header = Header::request(ExchangeType::IKE_AUTH, 5, 6, 1, true);
    let auth = Datagram {
        payload: Message::new(header, vec![]).encode().unwrap(),
        ..garbage
    };
    assert_eq!(jar.check(now, &auth), Ok(()));
}
