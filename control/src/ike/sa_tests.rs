//! The IKE SA engine against itself: an initiator and a responder exchange
//! datagrams in memory under fake time, with deterministic randomness.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::*;
use crate::ike::message::MessageView;
use crate::ike::message::{Flags, Message, NotifyType, Payload, PayloadsExt};
use crate::ike::proposal::{parse_proposals, Protocol};
use rand_core::RngCore;

use crate::ike::test_rng::CountingRng as TestRng;

/// SPIs from counters: IKE SPIs `base+1, base+2, ...`, ESP SPIs likewise.
struct CountingSpis {
    ike: u64,
    esp: u32,
}

impl SpiAllocator for CountingSpis {
    fn ike_spi(&mut self) -> u64 {
        self.ike += 1;
        self.ike
    }
    fn esp_spi(&mut self) -> u32 {
        self.esp += 1;
        self.esp
    }
}

const I_ADDR: &str = "10.0.0.1:500";
const R_ADDR: &str = "10.0.0.2:500";

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn prefix(s: &str) -> TsRange {
    let (a, len) = s.split_once('/').unwrap();
    prefix_selector(a.parse().unwrap(), len.parse().unwrap()).unwrap()
}

fn config(name: &str, local: &str, remote: &str, psk: &[u8]) -> Config {
    Config {
        name: name.to_string(),
        local_id: Identity::Fqdn(local.to_string()),
        remote_id: Identity::Fqdn(remote.to_string()),
        send_remote_id: true,
        send_initial_contact: true,
        auth: Auth::Psk(Psk::new(psk.to_vec())),
        ike_proposals: parse_proposals(Protocol::Ike, "aes128gcm16-prfsha256-x25519").unwrap(),
        children: vec![child_config("net", &[], &[])],
        ike_rekey_time: None,
        dpd_delay: None,
        keepalive_interval: None,
        retransmit: Retransmit::default(),
    }
}

fn child_config(name: &str, local: &[&str], remote: &[&str]) -> ChildConfig {
    ChildConfig {
        name: name.to_string(),
        esp_proposals: parse_proposals(Protocol::Esp, "aes128gcm16").unwrap(),
        local_ts: local.iter().map(|s| prefix(s)).collect(),
        remote_ts: remote.iter().map(|s| prefix(s)).collect(),
        mode: ChildMode::Tunnel,
        rekey_time: None,
        life_time: None,
    }
}

fn initiator_config() -> Config {
    let mut c = config("net", "left.example", "right.example", b"secret");
    c.children[0].local_ts = vec![prefix("10.1.0.0/16")];
    c.children[0].remote_ts = vec![prefix("10.2.0.0/16")];
    c
}

fn responder_config() -> Config {
    let mut c = config("net", "right.example", "left.example", b"secret");
    c.children[0].local_ts = vec![prefix("10.2.0.0/16")];
    c.children[0].remote_ts = vec![prefix("10.1.0.0/16")];
    c
}

/// Two engines and the wire between them.
struct Pair {
    now: Instant,
    initiator: IkeSa,
    responder: IkeSa,
    i_events: Vec<IkeEvent>,
    r_events: Vec<IkeEvent>,
    /// Rewrites (or drops) datagrams in flight; `true` = initiator → responder.
    wire: Box<dyn FnMut(bool, Datagram) -> Option<Datagram>>,
}

impl Pair {
    fn new(i: Config, r: Config) -> Pair {
        let now = Instant::now();
        let initiator = IkeSa::initiate(
            now,
            i,
            "net",
            addr(I_ADDR),
            addr(R_ADDR),
            Box::new(TestRng(1)),
            Box::new(CountingSpis {
                ike: 0x1000,
                esp: 0x1000,
            }),
        );
        let responder = IkeSa::responder(
            r,
            addr(R_ADDR),
            addr(I_ADDR),
            Box::new(TestRng(2)),
            Box::new(CountingSpis {
                ike: 0x2000,
                esp: 0x2000,
            }),
        );
        Pair {
            now,
            initiator,
            responder,
            i_events: Vec::new(),
            r_events: Vec::new(),
            wire: Box::new(|_, d| Some(d)),
        }
    }

    /// Delivers datagrams both ways until neither side has any.
    fn pump(&mut self) {
        for _ in 0..32 {
            let mut moved = false;
            while let Some(d) = self.initiator.poll_transmit() {
                moved = true;
                if let Some(d) = (self.wire)(true, d) {
                    self.responder.handle(self.now, d);
                }
            }
            while let Some(d) = self.responder.poll_transmit() {
                moved = true;
                if let Some(d) = (self.wire)(false, d) {
                    self.initiator.handle(self.now, d);
                }
            }
            self.drain_events();
            if !moved {
                return;
            }
        }
        panic!("the engines never went quiet");
    }

    fn drain_events(&mut self) {
        while let Some(e) = self.initiator.poll_event() {
            self.i_events.push(e);
        }
        while let Some(e) = self.responder.poll_event() {
            self.r_events.push(e);
        }
    }

    /// Runs both engines' timers up to `end`, delivering what they send.
    fn run_until(&mut self, end: Instant) {
        for _ in 0..10_000 {
            self.pump();
            let next = [self.initiator.poll_timeout(), self.responder.poll_timeout()]
                .into_iter()
                .flatten()
                .min();
            match next {
                Some(t) if t <= end => {
                    self.now = self.now.max(t);
                    self.initiator.handle_timeout(self.now);
                    self.responder.handle_timeout(self.now);
                }
                _ => {
                    self.now = end;
                    return;
                }
            }
        }
        panic!("the timers never settled");
    }

    fn run_for(&mut self, d: Duration) {
        self.run_until(self.now + d);
    }

    fn advance(&mut self, by: Duration) {
        self.now += by;
        self.initiator.handle_timeout(self.now);
        self.responder.handle_timeout(self.now);
    }
}

fn child(events: &[IkeEvent]) -> &ChildSaEstablished {
    events
        .iter()
        .find_map(|e| match e {
            IkeEvent::ChildSaEstablished(c) => Some(c),
            _ => None,
        })
        .expect("a Child SA was established")
}

fn failed(events: &[IkeEvent]) -> Option<&'static str> {
    events.iter().find_map(|e| match e {
        IkeEvent::Failed { reason, .. } => Some(*reason),
        _ => None,
    })
}

fn child_failed(events: &[IkeEvent]) -> Option<&'static str> {
    events.iter().find_map(|e| match e {
        IkeEvent::ChildSaFailed { reason, .. } => Some(*reason),
        _ => None,
    })
}

fn established(events: &[IkeEvent]) -> bool {
    events
        .iter()
        .any(|e| matches!(e, IkeEvent::IkeSaEstablished { .. }))
}

fn assert_keys_crossed(i: &ChildSaEstablished, r: &ChildSaEstablished) {
    assert_eq!(i.outbound_spi, r.inbound_spi);
    assert_eq!(i.inbound_spi, r.outbound_spi);
    assert_eq!(
        i.outbound_keys.encryption.as_bytes(),
        r.inbound_keys.encryption.as_bytes()
    );
    assert_eq!(
        i.inbound_keys.encryption.as_bytes(),
        r.outbound_keys.encryption.as_bytes()
    );
    assert_ne!(
        i.inbound_keys.encryption.as_bytes(),
        i.outbound_keys.encryption.as_bytes()
    );
    assert!(i.outbound_keys.integrity.is_empty());
}

// ------------------------------------------------------------------ handshake

#[test]
fn initiator_and_responder_agree_on_spis_and_crossed_keys() {
    let mut p = Pair::new(initiator_config(), responder_config());
    p.pump();
    assert!(p.initiator.is_established());
    assert!(p.responder.is_established());
    assert_eq!(p.initiator.spis(), p.responder.spis());
    assert_eq!(p.initiator.spis(), (0x1001, 0x2001));
    let (i, r) = (child(&p.i_events), child(&p.r_events));
    assert_keys_crossed(i, r);
    assert_eq!(i.inbound_spi, 0x1001);
    assert_eq!(r.inbound_spi, 0x2001);
    assert_eq!(i.aead, AeadAlg::Aes128Gcm16);
    assert_eq!(i.outbound_keys.encryption.len(), 16 + 4);
    assert_eq!(i.mode, ChildMode::Tunnel);
    assert_eq!(i.udp_encap, None);
    assert_eq!(r.udp_encap, None);
    assert_eq!(i.local_ts, vec![prefix("10.1.0.0/16")]);
    assert_eq!(r.remote_ts, vec![prefix("10.1.0.0/16")]);
    assert_eq!(r.local_ts, vec![prefix("10.2.0.0/16")]);
    match &p.r_events[0] {
        IkeEvent::IkeSaEstablished {
            remote_id,
            initiator,
            suite,
            initial_contact,
            ..
        } => {
            assert!(initial_contact);
            assert_eq!(*remote_id, Identity::Fqdn("left.example".into()));
            assert!(!initiator);
            assert_eq!(suite.dh, proposal::DhGroup::Curve25519);
        }
        other => panic!("unexpected first event {other:?}"),
    }
    assert_eq!(p.responder.stats().rejected_total(), 0);
    assert_eq!(p.initiator.stats().rejected_total(), 0);
    assert_eq!(p.initiator.poll_timeout(), None);
}

#[test]
fn keys_are_never_printed() {
    let mut p = Pair::new(initiator_config(), responder_config());
    p.pump();
    let text = format!(
        "{:?} {:?} {:?}",
        p.i_events,
        p.initiator,
        initiator_config()
    );
    let key = child(&p.i_events)
        .outbound_keys
        .encryption
        .as_bytes()
        .to_vec();
    assert!(!text.contains(&format!("{key:?}")));
    assert!(!text.contains(&hex::encode(&key)));
    assert!(!text.contains("secret"));
}

#[test]
fn every_ike_cipher_and_group_establishes() {
    for (ike, esp) in [
        ("aes256gcm16-prfsha384-ecp384", "aes256gcm16-esn"),
        ("aes128-sha256-ecp256", "chacha20poly1305"),
        ("chacha20poly1305-prfsha512-modp2048", "aes128gcm16"),
    ] {
        let mut i = initiator_config();
        let mut r = responder_config();
        for c in [&mut i, &mut r] {
            c.ike_proposals = parse_proposals(Protocol::Ike, ike).unwrap();
            c.children[0].esp_proposals = parse_proposals(Protocol::Esp, esp).unwrap();
        }
        let mut p = Pair::new(i, r);
        p.pump();
        assert!(p.initiator.is_established(), "{ike}");
        assert_keys_crossed(child(&p.i_events), child(&p.r_events));
    }
}

#[test]
fn transport_mode_only_when_both_want_it() {
    let mut i = initiator_config();
    let mut r = responder_config();
    i.children[0].mode = ChildMode::Transport;
    r.children[0].mode = ChildMode::Transport;
    let mut p = Pair::new(i, r);
    p.pump();
    assert_eq!(child(&p.i_events).mode, ChildMode::Transport);
    assert_eq!(child(&p.r_events).mode, ChildMode::Transport);

    let mut i = initiator_config();
    i.children[0].mode = ChildMode::Transport;
    let mut p = Pair::new(i, responder_config());
    p.pump();
    assert_eq!(child(&p.r_events).mode, ChildMode::Tunnel);
    assert_eq!(child_failed(&p.i_events), Some("mode_mismatch"));
}

#[test]
fn invalid_ke_payload_makes_the_initiator_retry_with_the_wanted_group() {
    let mut i = initiator_config();
    i.ike_proposals =
        parse_proposals(Protocol::Ike, "aes128gcm16-prfsha256-x25519-ecp256").unwrap();
    let mut r = responder_config();
    r.ike_proposals = parse_proposals(Protocol::Ike, "aes128gcm16-prfsha256-ecp256").unwrap();
    let mut p = Pair::new(i, r);
    p.pump();
    assert!(p.initiator.is_established());
    assert!(p.responder.is_established());
    assert_eq!(
        p.responder.stats().errors_sent.get("invalid_ke_payload"),
        Some(&1)
    );
    assert_keys_crossed(child(&p.i_events), child(&p.r_events));
    match &p.i_events[0] {
        IkeEvent::IkeSaEstablished { suite, .. } => {
            assert_eq!(suite.dh, proposal::DhGroup::Ecp256)
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn invalid_ke_payload_for_a_group_we_do_not_offer_fails() {
    let mut i = initiator_config();
    i.ike_proposals = parse_proposals(Protocol::Ike, "aes128gcm16-prfsha256-x25519").unwrap();
    let mut p = Pair::new(i, responder_config());
    // Answer the IKE_SA_INIT with INVALID_KE_PAYLOAD(ecp384) ourselves.
    let request = p.initiator.poll_transmit().unwrap();
    let header = Message::decode(&request.payload).unwrap().header;
    let answer = Message::new(
        header.response(),
        vec![Payload::Notify(NotifyPayload::invalid_ke(20))],
    );
    p.initiator.handle(
        p.now,
        Datagram {
            src: request.dst,
            dst: request.src,
            payload: answer.encode().unwrap(),
        },
    );
    p.drain_events();
    assert_eq!(failed(&p.i_events), Some("invalid_ke_payload"));
    assert!(p.initiator.is_closed());
}

#[test]
fn cookie_is_repeated() {
    let mut p = Pair::new(initiator_config(), responder_config());
    let request = p.initiator.poll_transmit().unwrap();
    let header = Message::decode(&request.payload).unwrap().header;
    let answer = Message::new(
        header.response(),
        vec![Payload::Notify(NotifyPayload::cookie(vec![7; 16]))],
    );
    p.initiator.handle(
        p.now,
        Datagram {
            src: request.dst,
            dst: request.src,
            payload: answer.encode().unwrap(),
        },
    );
    let retry = p.initiator.poll_transmit().unwrap();
    let m = Message::decode(&retry.payload).unwrap();
    assert!(
        matches!(&m.payloads[0], Payload::Notify(n) if n.notify_type == NotifyType::COOKIE && n.data == vec![7; 16])
    );
    // The retry goes through to an ordinary responder.
    p.responder.handle(p.now, retry);
    p.pump();
    assert!(p.initiator.is_established());
}

#[test]
fn wrong_psk_is_authentication_failed_on_both_sides() {
    let mut r = responder_config();
    r.auth = Auth::Psk(Psk::new(b"other".to_vec()));
    let mut p = Pair::new(initiator_config(), r);
    p.pump();
    assert_eq!(failed(&p.r_events), Some("auth_failed"));
    assert_eq!(failed(&p.i_events), Some("auth_failed"));
    assert_eq!(p.responder.stats().errors_sent.get("auth_failed"), Some(&1));
    assert!(p.initiator.is_closed());
    assert!(p.responder.is_closed());
    assert!(!established(&p.r_events));
}

#[test]
fn wrong_identity_is_authentication_failed() {
    let mut r = responder_config();
    r.remote_id = Identity::Fqdn("someone.else".into());
    let mut p = Pair::new(initiator_config(), r);
    p.pump();
    assert_eq!(failed(&p.r_events), Some("peer_id_mismatch"));
    assert_eq!(failed(&p.i_events), Some("auth_failed"));
}

#[test]
fn ike_proposal_mismatch_is_no_proposal_chosen() {
    let mut r = responder_config();
    r.ike_proposals = parse_proposals(Protocol::Ike, "aes256gcm16-prfsha384-x25519").unwrap();
    let mut p = Pair::new(initiator_config(), r);
    p.pump();
    assert_eq!(failed(&p.r_events), Some("no_proposal_chosen"));
    assert_eq!(failed(&p.i_events), Some("no_proposal_chosen"));
}

#[test]
fn esp_proposal_mismatch_keeps_the_ike_sa_without_a_child() {
    let mut r = responder_config();
    r.children[0].esp_proposals = parse_proposals(Protocol::Esp, "chacha20poly1305").unwrap();
    let mut p = Pair::new(initiator_config(), r);
    p.pump();
    assert!(p.initiator.is_established());
    assert!(p.responder.is_established());
    assert_eq!(child_failed(&p.r_events), Some("no_proposal_chosen"));
    assert_eq!(child_failed(&p.i_events), Some("no_proposal_chosen"));
}

#[test]
fn traffic_selectors_are_narrowed_by_the_responder() {
    let mut r = responder_config();
    r.children[0].local_ts = vec![prefix("10.2.3.0/24")];
    let mut p = Pair::new(initiator_config(), r);
    p.pump();
    let (i, r) = (child(&p.i_events), child(&p.r_events));
    assert_eq!(r.local_ts, vec![prefix("10.2.3.0/24")]);
    assert_eq!(i.remote_ts, vec![prefix("10.2.3.0/24")]);
    assert_eq!(i.local_ts, vec![prefix("10.1.0.0/16")]);
}

#[test]
fn disjoint_traffic_selectors_are_ts_unacceptable() {
    let mut r = responder_config();
    r.children[0].local_ts = vec![prefix("192.168.0.0/16")];
    let mut p = Pair::new(initiator_config(), r);
    p.pump();
    assert_eq!(child_failed(&p.r_events), Some("ts_unacceptable"));
    assert_eq!(child_failed(&p.i_events), Some("ts_unacceptable"));
    assert!(p.initiator.is_established());
}

#[test]
fn intersection_of_selectors() {
    let mut a = prefix("10.0.0.0/8");
    a.ip_protocol = 6;
    a.start_port = 80;
    a.end_port = 443;
    let b = prefix("10.1.0.0/16");
    let both = intersect(&a, &b).unwrap();
    assert_eq!(both.ip_protocol, 6);
    assert_eq!((both.start_port, both.end_port), (80, 443));
    assert_eq!(both.addresses, b.addresses);
    assert_eq!(intersect(&a, &prefix("11.0.0.0/8")), None);
    assert_eq!(intersect(&a, &prefix("::/0")), None);
    let mut udp = b;
    udp.ip_protocol = 17;
    assert_eq!(intersect(&a, &udp), None);
    assert_eq!(prefix_selector("10.0.0.1".parse().unwrap(), 33), None);
    assert_eq!(
        prefix("0.0.0.0/0").addresses.end(),
        "255.255.255.255".parse::<std::net::IpAddr>().unwrap()
    );
}

// ------------------------------------------------------------------ NAT

#[test]
fn nat_between_the_peers_moves_ike_to_4500_and_encapsulates_esp() {
    let mut p = Pair::new(initiator_config(), responder_config());
    // A NAT in front of the initiator: 10.0.0.1:p appears as 203.0.113.5:p+1000.
    p.wire = Box::new(|to_responder, mut d| {
        if to_responder {
            d.src = SocketAddr::new("203.0.113.5".parse().unwrap(), d.src.port() + 1000);
        } else {
            d.dst = SocketAddr::new("10.0.0.1".parse().unwrap(), d.dst.port() - 1000);
        }
        Some(d)
    });
    p.pump();
    assert!(p.initiator.is_established());
    assert_eq!(
        p.initiator.addresses(),
        (addr("10.0.0.1:4500"), addr("10.0.0.2:4500"))
    );
    assert_eq!(
        p.responder.addresses(),
        (addr("10.0.0.2:4500"), addr("203.0.113.5:5500"))
    );
    let (i, r) = (child(&p.i_events), child(&p.r_events));
    assert_eq!(
        i.udp_encap,
        Some(UdpEncap {
            local_port: 4500,
            remote_port: 4500
        })
    );
    assert_eq!(
        r.udp_encap,
        Some(UdpEncap {
            local_port: 4500,
            remote_port: 5500
        })
    );
}

#[test]
fn a_faked_source_hash_reads_as_nat() {
    // strongSwan with kernel-libipsec sends a random source hash.
    let (spi_i, src, dst) = (7, addr(I_ADDR), addr(R_ADDR));
    let honest = vec![
        Payload::Notify(NotifyPayload::nat_detection_source(spi_i, 0, src)),
        Payload::Notify(NotifyPayload::nat_detection_destination(spi_i, 0, dst)),
    ];
    assert!(!detect_nat(&honest, spi_i, 0, src, dst));
    let faked = vec![
        Payload::Notify(NotifyPayload::new(
            NotifyType::NAT_DETECTION_SOURCE_IP,
            vec![0xab; 20],
        )),
        Payload::Notify(NotifyPayload::nat_detection_destination(spi_i, 0, dst)),
    ];
    assert!(detect_nat(&faked, spi_i, 0, src, dst));
    assert!(!detect_nat(&[], spi_i, 0, src, dst));
}

// ------------------------------------------------------------------ loss and retransmission

#[test]
fn a_lost_first_request_is_sent_again_after_the_timeout() {
    let mut p = Pair::new(initiator_config(), responder_config());
    let first = p.initiator.poll_transmit().unwrap();
    assert_eq!(
        p.initiator.poll_timeout(),
        Some(p.now + Duration::from_secs(1))
    );
    p.advance(Duration::from_millis(999));
    assert!(p.initiator.poll_transmit().is_none());
    p.advance(Duration::from_millis(1));
    let second = p.initiator.poll_transmit().unwrap();
    assert_eq!(first, second);
    assert_eq!(
        p.initiator.poll_timeout(),
        Some(p.now + Duration::from_secs(2))
    );
    p.responder.handle(p.now, second);
    p.pump();
    assert!(p.initiator.is_established());
    assert_eq!(p.initiator.stats().retransmits_sent, 1);
}

#[test]
fn no_answer_fails_with_timeout_after_the_tries() {
    let mut i = initiator_config();
    i.retransmit = Retransmit {
        timeout: Duration::from_secs(1),
        backoff: 2.0,
        tries: 4,
    };
    let mut p = Pair::new(i, responder_config());
    let mut sent = 0;
    let mut waits = Vec::new();
    while let Some(deadline) = p.initiator.poll_timeout() {
        while p.initiator.poll_transmit().is_some() {
            sent += 1;
        }
        waits.push(deadline - p.now);
        p.now = deadline;
        p.initiator.handle_timeout(p.now);
    }
    assert_eq!(sent, 4);
    assert_eq!(waits, [1, 2, 4, 8].map(Duration::from_secs).to_vec());
    p.drain_events();
    assert_eq!(failed(&p.i_events), Some("timeout"));
    assert!(p.initiator.is_closed());
}

#[test]
fn a_half_open_responder_gives_up_without_ike_auth() {
    let mut p = Pair::new(initiator_config(), responder_config());
    let init = p.initiator.poll_transmit().unwrap();
    p.responder.handle(p.now, init);
    assert_eq!(p.responder.poll_timeout(), Some(p.now + HALF_OPEN_TIMEOUT));
    p.now += HALF_OPEN_TIMEOUT;
    p.responder.handle_timeout(p.now);
    p.drain_events();
    assert_eq!(failed(&p.r_events), Some("half_open_timeout"));
    assert!(p.responder.is_closed());
    assert_eq!(p.responder.poll_timeout(), None);
}

#[test]
fn a_lost_ike_auth_response_is_answered_from_the_cache() {
    let mut p = Pair::new(initiator_config(), responder_config());
    let mut drops = 0;
    // Drop the responder's first IKE_AUTH response.
    p.wire = Box::new(move |to_responder, d| {
        let m = Message::decode(&d.payload).unwrap();
        if !to_responder && m.header.exchange == ExchangeType::IKE_AUTH && drops == 0 {
            drops += 1;
            return None;
        }
        Some(d)
    });
    p.pump();
    assert!(p.responder.is_established());
    assert!(!p.initiator.is_established());
    p.advance(Duration::from_secs(1));
    p.pump();
    assert!(p.initiator.is_established());
    assert_eq!(p.responder.stats().retransmits_answered, 1);
    assert_keys_crossed(child(&p.i_events), child(&p.r_events));
    // Exactly one Child SA on the responder despite the retransmission.
    assert_eq!(
        p.r_events
            .iter()
            .filter(|e| matches!(e, IkeEvent::ChildSaEstablished(_)))
            .count(),
        1
    );
}

#[test]
fn duplicate_requests_get_the_identical_cached_response() {
    let mut p = Pair::new(initiator_config(), responder_config());
    let init = p.initiator.poll_transmit().unwrap();
    p.responder.handle(p.now, init.clone());
    let r1 = p.responder.poll_transmit().unwrap();
    p.responder.handle(p.now, init.clone());
    let r2 = p.responder.poll_transmit().unwrap();
    assert_eq!(r1, r2);
    p.initiator.handle(p.now, r1);
    let auth = p.initiator.poll_transmit().unwrap();
    p.responder.handle(p.now, auth.clone());
    let a1 = p.responder.poll_transmit().unwrap();
    p.responder.handle(p.now, auth);
    let a2 = p.responder.poll_transmit().unwrap();
    assert_eq!(a1, a2);
    assert_eq!(p.responder.stats().retransmits_answered, 2);
    // The first IKE_SA_INIT request is no longer the cached one (its SPIr
    // is zero): dropped.
    p.responder.handle(p.now, init);
    assert!(p.responder.poll_transmit().is_none());
    assert_eq!(p.responder.stats().rejected("bad_spi"), 1);
    p.initiator.handle(p.now, a1);
    assert!(p.initiator.is_established());
}

// ------------------------------------------------------------------ INFORMATIONAL

#[test]
fn liveness_checks_are_answered_both_ways() {
    let mut p = Pair::new(initiator_config(), responder_config());
    p.pump();
    assert!(p.initiator.send_liveness_check(p.now));
    assert!(
        p.initiator.send_liveness_check(p.now),
        "merged with the outstanding one"
    );
    p.pump();
    assert_eq!(p.initiator.poll_timeout(), None);
    assert!(p.responder.send_liveness_check(p.now));
    p.pump();
    assert_eq!(p.responder.poll_timeout(), None);
    assert!(p.initiator.send_liveness_check(p.now));
    p.pump();
    assert_eq!(p.responder.stats().requests_answered, 4);
    assert_eq!(p.initiator.stats().requests_answered, 1);
    assert!(p.initiator.is_established() && p.responder.is_established());
    assert_eq!(
        p.initiator.stats().rejected_total() + p.responder.stats().rejected_total(),
        0
    );
}

#[test]
fn a_child_delete_is_answered_with_ours() {
    let mut p = Pair::new(initiator_config(), responder_config());
    p.pump();
    let (i_in, r_in) = (
        child(&p.i_events).inbound_spi,
        child(&p.r_events).inbound_spi,
    );
    // Watch the responder's answer for its own SPI.
    let answers = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
    let seen = answers.clone();
    p.wire = Box::new(move |_, d| {
        seen.borrow_mut().push(d.clone());
        Some(d)
    });
    assert!(p.initiator.delete_child(p.now, i_in));
    p.pump();
    let deleted = |events: &[IkeEvent]| {
        events.iter().find_map(|e| match e {
            IkeEvent::ChildSaDeleted {
                inbound_spi,
                outbound_spi,
                ..
            } => Some((*inbound_spi, *outbound_spi)),
            _ => None,
        })
    };
    assert_eq!(deleted(&p.r_events), Some((r_in, i_in)));
    assert_eq!(deleted(&p.i_events), Some((i_in, r_in)));
    assert_eq!(answers.borrow().len(), 2);
    assert!(p.initiator.is_established());
    assert!(!p.initiator.delete_child(p.now, i_in), "already gone");
}

#[test]
fn an_ike_delete_closes_both_sides() {
    let mut p = Pair::new(initiator_config(), responder_config());
    p.pump();
    assert!(p.responder.delete(p.now));
    p.pump();
    assert!(p.initiator.is_closed());
    assert!(p.responder.is_closed());
    assert!(matches!(p.i_events.last(), Some(IkeEvent::Deleted)));
    assert!(matches!(p.r_events.last(), Some(IkeEvent::Deleted)));
}

/// Sends `payloads` as a CREATE_CHILD_SA request from the initiator to the
/// responder and returns the decrypted response's payloads.
fn create_child(p: &mut Pair, message_id: u32, payloads: &[Payload]) -> Vec<Payload> {
    let header = Header::request(
        ExchangeType::CREATE_CHILD_SA,
        0x1001,
        0x2001,
        message_id,
        true,
    );
    let bytes = p.initiator.seal(header, payloads).unwrap();
    p.responder.handle(
        p.now,
        Datagram {
            src: addr(I_ADDR),
            dst: addr(R_ADDR),
            payload: bytes,
        },
    );
    let answer = p
        .responder
        .poll_transmit()
        .expect("a CREATE_CHILD_SA response");
    let view = MessageView::new_checked(&answer.payload).unwrap();
    assert!(view.header().flags.is_response());
    let (first, plaintext) = p.initiator.open(&view).unwrap();
    p.drain_events();
    crate::ike::message::decode_payload_chain(first, &plaintext).unwrap()
}

fn pfs_configs() -> (Config, Config) {
    let mut i = initiator_config();
    let mut r = responder_config();
    for c in [&mut i, &mut r] {
        c.children[0].esp_proposals = parse_proposals(Protocol::Esp, "aes128gcm16-x25519").unwrap();
    }
    (i, r)
}

#[test]
fn a_child_rekey_with_pfs_is_answered_with_matching_keys() {
    let (i, r) = pfs_configs();
    let mut p = Pair::new(i, r);
    p.pump();
    let (old_i_in, old_r_in) = (
        child(&p.i_events).inbound_spi,
        child(&p.r_events).inbound_spi,
    );
    let esp = p.initiator.config.children[0].esp_proposals.clone();
    let pair = KeyPair::generate(dh::DhGroup::Curve25519, &mut TestRng(5)).unwrap();
    let ni = vec![9u8; 32];
    let request = vec![
        Payload::Notify(NotifyPayload::rekey_esp(old_i_in)),
        Payload::Sa(offer(
            &esp,
            &0x5555u32.to_be_bytes(),
            DhMode::Negotiate { ke_group: Some(31) },
        )),
        Payload::Nonce(ni.clone()),
        Payload::Ke(KePayload {
            group: 31,
            data: pair.public_value().to_vec(),
        }),
        Payload::TsI(ts_payload(&[prefix("10.1.0.0/16")])),
        Payload::TsR(ts_payload(&[prefix("10.2.0.0/16")])),
    ];
    let reply = create_child(&mut p, 2, &request);
    let agreed = accept_reply(
        &esp,
        reply.sa().unwrap(),
        DhMode::Negotiate { ke_group: Some(31) },
    )
    .unwrap();
    let new_r_in = u32::from_be_bytes(agreed.peer_spi.as_slice().try_into().unwrap());
    let ke = reply.ke().unwrap();
    let shared = pair.agree(&ke.data).unwrap();
    let lengths = ChildSaKeyLengths::for_esp(crypto::Encryption::Aes128Gcm16, None).unwrap();
    let expected = p
        .initiator
        .cur
        .keys
        .as_ref()
        .unwrap()
        .child_sa_keys(
            Some(shared.as_bytes()),
            &ni,
            reply.nonce().unwrap(),
            lengths,
        )
        .unwrap();
    let rekeyed = p
        .r_events
        .iter()
        .filter_map(|e| match e {
            IkeEvent::ChildSaEstablished(c) if c.rekeys.is_some() => Some(c),
            _ => None,
        })
        .next()
        .expect("the rekeyed Child SA");
    assert_eq!(rekeyed.rekeys, Some(old_r_in));
    assert_eq!(rekeyed.inbound_spi, new_r_in);
    assert_eq!(rekeyed.outbound_spi, 0x5555);
    assert_eq!(
        rekeyed.inbound_keys.encryption.as_bytes(),
        expected.initiator_to_responder.encryption.as_bytes()
    );
    assert_eq!(
        rekeyed.outbound_keys.encryption.as_bytes(),
        expected.responder_to_initiator.encryption.as_bytes()
    );
    assert_ne!(
        rekeyed.inbound_keys.encryption.as_bytes(),
        child(&p.r_events).inbound_keys.encryption.as_bytes()
    );
    // The old SA goes when the rekey's initiator deletes it (the message
    // ID after the hand-made request).
    p.initiator.cur.our_next_id = 3;
    assert!(p.initiator.delete_child(p.now, old_i_in));
    p.pump();
    assert!(p.r_events.iter().any(|e| matches!(e,
        IkeEvent::ChildSaDeleted { inbound_spi, .. } if *inbound_spi == old_r_in)));
    assert!(p.responder.is_established());
}

fn rekeyed(events: &[IkeEvent]) -> Option<&ChildSaEstablished> {
    events.iter().find_map(|e| match e {
        IkeEvent::ChildSaEstablished(c) if c.rekeys.is_some() => Some(c),
        _ => None,
    })
}

#[test]
fn engines_rekey_a_child_sa_with_and_without_pfs_from_either_side() {
    for (pfs, by_initiator) in [(true, true), (false, true), (true, false)] {
        let (i, r) = if pfs {
            pfs_configs()
        } else {
            (initiator_config(), responder_config())
        };
        let mut p = Pair::new(i, r);
        p.pump();
        let (old_i, old_r) = (
            child(&p.i_events).inbound_spi,
            child(&p.r_events).inbound_spi,
        );
        let (rekeyer_old, other_old) = if by_initiator {
            (old_i, old_r)
        } else {
            (old_r, old_i)
        };
        let rekeyer = if by_initiator {
            &mut p.initiator
        } else {
            &mut p.responder
        };
        assert!(rekeyer.rekey_child(p.now, rekeyer_old));
        assert!(
            rekeyer.rekey_child(p.now, rekeyer_old),
            "merged with the outstanding one"
        );
        p.pump();
        let (new_i, new_r) = (rekeyed(&p.i_events).unwrap(), rekeyed(&p.r_events).unwrap());
        assert_keys_crossed(new_i, new_r);
        assert_ne!(
            new_i.outbound_keys.encryption.as_bytes(),
            child(&p.i_events).outbound_keys.encryption.as_bytes()
        );
        assert_eq!(new_i.rekeys, Some(old_i));
        assert_eq!(new_r.rekeys, Some(old_r));
        assert_eq!(new_i.local_ts, child(&p.i_events).local_ts);
        // The rekeyer deleted the old SA on both sides by itself.
        let rekeyer = if by_initiator {
            &mut p.initiator
        } else {
            &mut p.responder
        };
        assert!(!rekeyer.delete_child(p.now, rekeyer_old), "already gone");
        let deleted: Vec<u32> = p
            .i_events
            .iter()
            .chain(&p.r_events)
            .filter_map(|e| match e {
                IkeEvent::ChildSaDeleted { inbound_spi, .. } => Some(*inbound_spi),
                _ => None,
            })
            .collect();
        assert_eq!(deleted.len(), 2);
        assert!(deleted.contains(&rekeyer_old) && deleted.contains(&other_old));
        assert_eq!(
            p.initiator.stats().rejected_total() + p.responder.stats().rejected_total(),
            0
        );
        assert!(p.initiator.is_established() && p.responder.is_established());
    }
}

#[test]
fn create_child_sa_refusals_keep_the_ike_sa() {
    let (i, mut r) = pfs_configs();
    r.children[0].esp_proposals =
        parse_proposals(Protocol::Esp, "aes128gcm16-ecp256-x25519").unwrap();
    let mut p = Pair::new(i, r);
    p.pump();
    let esp = parse_proposals(Protocol::Esp, "aes128gcm16-ecp256-x25519").unwrap();
    let ts = [
        Payload::TsI(ts_payload(&[prefix("10.1.0.0/16")])),
        Payload::TsR(ts_payload(&[prefix("10.2.0.0/16")])),
    ];
    let ke = |group: u16| {
        let g = dh::DhGroup::from_iana_id(group).unwrap();
        let pair = KeyPair::generate(g, &mut TestRng(6)).unwrap();
        Payload::Ke(KePayload {
            group,
            data: pair.public_value().to_vec(),
        })
    };
    let sa = Payload::Sa(offer(
        &esp,
        &[0, 0, 0x55, 0x55],
        DhMode::Negotiate { ke_group: Some(31) },
    ));

    // Rekeying an SA that does not exist.
    let mut request = vec![
        Payload::Notify(NotifyPayload::rekey_esp(0xdead)),
        sa.clone(),
        Payload::Nonce(vec![1; 32]),
        ke(31),
    ];
    request.extend(ts.iter().cloned());
    let reply = create_child(&mut p, 2, &request);
    assert!(reply.notify(NotifyType::CHILD_SA_NOT_FOUND).is_some());

    // The peer's preferred group is ecp256 but the KE is x25519... accepted:
    // select prefers the KE's group when a proposal allows it.
    let mut request = vec![sa.clone(), Payload::Nonce(vec![1; 32]), ke(31)];
    request.extend(ts.iter().cloned());
    let reply = create_child(&mut p, 3, &request);
    assert_eq!(reply.ke().unwrap().group, 31);

    // A KE of a group no proposal has: INVALID_KE_PAYLOAD naming ecp256.
    let mut request = vec![sa.clone(), Payload::Nonce(vec![1; 32]), ke(20)];
    request.extend(ts.iter().cloned());
    let reply = create_child(&mut p, 4, &request);
    assert_eq!(
        reply.notifies().find_map(NotifyPayload::invalid_ke_group),
        Some(19)
    );

    // Selectors outside ours.
    let mut request = vec![sa, Payload::Nonce(vec![1; 32]), ke(31)];
    request.push(Payload::TsI(ts_payload(&[prefix("192.168.0.0/16")])));
    request.push(Payload::TsR(ts_payload(&[prefix("10.2.0.0/16")])));
    let reply = create_child(&mut p, 5, &request);
    assert!(reply.notify(NotifyType::TS_UNACCEPTABLE).is_some());

    // An IKE rekey with proposals we do not accept.
    let ike = parse_proposals(Protocol::Ike, "aes256gcm16-prfsha384-x25519").unwrap();
    let request = vec![
        Payload::Sa(offer(
            &ike,
            &[1; 8],
            DhMode::Negotiate { ke_group: Some(31) },
        )),
        Payload::Nonce(vec![1; 32]),
        ke(31),
    ];
    let reply = create_child(&mut p, 6, &request);
    assert!(reply.notify(NotifyType::NO_PROPOSAL_CHOSEN).is_some());

    // Garbage inside a valid SK payload.
    let reply = create_child(&mut p, 7, &[Payload::Nonce(vec![1; 32])]);
    assert!(reply.notify(NotifyType::INVALID_SYNTAX).is_some());

    let sent = &p.responder.stats().errors_sent;
    for reason in [
        "child_sa_not_found",
        "invalid_ke_payload",
        "ts_unacceptable",
        "no_proposal_chosen",
        "invalid_syntax",
    ] {
        assert_eq!(sent.get(reason), Some(&1), "{reason}");
    }
    assert!(p.responder.is_established());
    // The initiator's own counter did not move with the hand-made requests.
    p.initiator.cur.our_next_id = 8;
    assert!(p.initiator.send_liveness_check(p.now));
    p.pump();
    assert_eq!(p.initiator.poll_timeout(), None);
    assert_eq!(p.responder.stats().rejected_total(), 0);
}

// ------------------------------------------------------------------ hostile input

/// Runs the handshake up to the IKE_AUTH request and returns it.
fn pair_at_ike_auth() -> (Pair, Datagram) {
    let mut p = Pair::new(initiator_config(), responder_config());
    let init = p.initiator.poll_transmit().unwrap();
    p.responder.handle(p.now, init);
    let resp = p.responder.poll_transmit().unwrap();
    p.initiator.handle(p.now, resp);
    let auth = p.initiator.poll_transmit().unwrap();
    (p, auth)
}

#[test]
fn truncated_ike_auth_at_every_offset_is_rejected_without_state_change() {
    let (mut p, auth) = pair_at_ike_auth();
    for len in 0..auth.payload.len() {
        let mut cut = auth.clone();
        cut.payload.truncate(len);
        p.responder.handle(p.now, cut);
        assert!(
            p.responder.poll_transmit().is_none(),
            "answered a {len}-byte prefix"
        );
        assert!(!p.responder.is_established());
        assert!(!p.responder.is_closed());
    }
    assert_eq!(
        p.responder.stats().rejected_total(),
        auth.payload.len() as u64
    );
    assert!(p.responder.stats().rejected("truncated") > 0);
    p.responder.handle(p.now, auth);
    p.pump();
    assert!(p.initiator.is_established());
    assert!(p.responder.is_established());
}

#[test]
fn truncated_ike_sa_init_at_every_offset_is_rejected() {
    let mut p = Pair::new(initiator_config(), responder_config());
    let init = p.initiator.poll_transmit().unwrap();
    for len in 0..init.payload.len() {
        let mut cut = init.clone();
        cut.payload.truncate(len);
        p.responder.handle(p.now, cut);
        assert!(
            p.responder.poll_transmit().is_none(),
            "answered a {len}-byte prefix"
        );
    }
    assert_eq!(
        p.responder.stats().rejected_total(),
        init.payload.len() as u64
    );
    p.responder.handle(p.now, init);
    p.pump();
    assert!(p.initiator.is_established());
}

#[test]
fn altered_ike_auth_fails_the_integrity_check() {
    let (mut p, auth) = pair_at_ike_auth();
    for at in [40, auth.payload.len() / 2, auth.payload.len() - 1] {
        let mut bad = auth.clone();
        bad.payload[at] ^= 1;
        p.responder.handle(p.now, bad);
    }
    assert_eq!(p.responder.stats().rejected("icv"), 3);
    assert!(p.responder.poll_transmit().is_none());
    p.responder.handle(p.now, auth);
    p.pump();
    assert!(p.responder.is_established());
}

#[test]
fn wrong_spi_and_wrong_message_id_are_dropped_and_counted() {
    let (mut p, auth) = pair_at_ike_auth();
    let mut wrong_spi = auth.clone();
    wrong_spi.payload[15] ^= 0xff;
    p.responder.handle(p.now, wrong_spi);
    let mut wrong_id = auth.clone();
    wrong_id.payload[23] = 5;
    p.responder.handle(p.now, wrong_id);
    let mut response_flag = auth.clone();
    response_flag.payload[19] |= Flags::RESPONSE.0;
    p.responder.handle(p.now, response_flag);
    assert_eq!(p.responder.stats().rejected("bad_spi"), 1);
    assert_eq!(p.responder.stats().rejected("bad_message_id"), 1);
    assert_eq!(p.responder.stats().rejected("unexpected_response"), 1);
    assert!(p.responder.poll_transmit().is_none());
    p.responder.handle(p.now, auth.clone());
    p.pump();
    assert!(p.responder.is_established());

    // After a later exchange, the old IKE_AUTH is a replay: dropped.
    assert!(p.initiator.send_liveness_check(p.now));
    p.pump();
    p.responder.handle(p.now, auth);
    assert!(p.responder.poll_transmit().is_none());
    assert_eq!(p.responder.stats().rejected("bad_message_id"), 2);
}

#[test]
fn random_garbage_never_panics() {
    let (mut p, auth) = pair_at_ike_auth();
    let mut rng = TestRng(99);
    for round in 0..2000 {
        let mut d = auth.clone();
        // Keep the header mostly, scramble a few bytes anywhere.
        for _ in 0..(round % 7 + 1) {
            let at = (rng.next_u32() as usize) % d.payload.len();
            d.payload[at] = rng.next_u32() as u8;
        }
        if round % 3 == 0 {
            let len = (rng.next_u32() as usize) % (d.payload.len() + 1);
            d.payload.truncate(len);
        }
        p.responder.handle(p.now, d);
        while p.responder.poll_transmit().is_some() {}
    }
    // Whatever happened, an unaltered request still completes the handshake
    // unless a garbage datagram had exactly its bytes.
    p.responder.handle(p.now, auth);
    p.pump();
    assert!(p.responder.is_established());
}

#[test]
fn responses_nobody_asked_for_are_dropped() {
    let mut p = Pair::new(initiator_config(), responder_config());
    p.pump();
    let header = Header::request(ExchangeType::INFORMATIONAL, 0x1001, 0x2001, 9, false).response();
    let bytes = Message::new(header, vec![]).encode().unwrap();
    p.initiator.handle(
        p.now,
        Datagram {
            src: addr(R_ADDR),
            dst: addr(I_ADDR),
            payload: bytes,
        },
    );
    assert_eq!(p.initiator.stats().rejected("unexpected_response"), 1);
}

#[test]
fn ike_sa_init_request_with_a_short_nonce_gets_invalid_syntax() {
    let mut p = Pair::new(initiator_config(), responder_config());
    let init = p.initiator.poll_transmit().unwrap();
    let mut m = Message::decode(&init.payload).unwrap();
    for payload in &mut m.payloads {
        if let Payload::Nonce(n) = payload {
            n.truncate(8);
        }
    }
    assert!(m.payloads.nonce().is_some());
    p.responder.handle(
        p.now,
        Datagram {
            payload: m.encode().unwrap(),
            ..init
        },
    );
    let answer = Message::decode(&p.responder.poll_transmit().unwrap().payload).unwrap();
    assert!(answer.payloads.notify(NotifyType::INVALID_SYNTAX).is_some());
    assert_eq!(p.responder.stats().rejected("bad_nonce"), 1);
    assert!(!p.responder.is_closed());
}

// ------------------------------------------------------------------ strongSwan

#[test]
fn a_real_strongswan_ike_sa_init_request_is_answered() {
    use crate::ike::message::strongswan_vectors::session;
    let s = session();
    let request = s.find(ExchangeType::IKE_SA_INIT, false);
    let mut r = config("net", "10.99.0.2", "10.99.0.1", b"secret");
    r.local_id = Identity::Ipv4("10.99.0.2".parse().unwrap());
    r.remote_id = Identity::Ipv4("10.99.0.1".parse().unwrap());
    let mut responder = IkeSa::responder(
        r,
        request.dst,
        request.src,
        Box::new(TestRng(3)),
        Box::new(CountingSpis {
            ike: 0x2000,
            esp: 0x2000,
        }),
    );
    let now = Instant::now();
    responder.handle(
        now,
        Datagram {
            src: request.src,
            dst: request.dst,
            payload: request.bytes.clone(),
        },
    );
    assert_eq!(responder.stats().rejected_total(), 0);
    let answer = responder.poll_transmit().expect("an IKE_SA_INIT response");
    assert_eq!((answer.src, answer.dst), (request.dst, request.src));
    let m = Message::decode(&answer.payload).unwrap();
    assert_eq!(m.header.spi_i, 0x6287_7673_86c7_00a1);
    assert_eq!(m.header.spi_r, 0x2001);
    assert_eq!(m.payloads.ke().unwrap().group, 31);
    assert_eq!(m.payloads.nonce().unwrap().len(), 32);
    let proposal = &m.payloads.sa().unwrap().proposals[0];
    assert_eq!(
        proposal::describe_proposal(proposal),
        "IKE:aes128gcm16-prfsha256-x25519"
    );
    // charon ran with kernel-libipsec, which fakes its source hash: a NAT.
    assert!(responder.nat_detected());

    // The captured IKE_AUTH names charon's SPIr, not ours: dropped. With
    // our SPIr written in, it is still sealed under charon's keys: rejected
    // on its integrity check. Neither is answered or changes the state.
    let auth = s.find(ExchangeType::IKE_AUTH, false);
    let mut datagram = Datagram {
        src: auth.src,
        dst: auth.dst,
        payload: auth.bytes.clone(),
    };
    responder.handle(now, datagram.clone());
    assert_eq!(responder.stats().rejected("bad_spi"), 1);
    datagram.payload[8..16].copy_from_slice(&0x2001u64.to_be_bytes());
    responder.handle(now, datagram);
    assert_eq!(responder.stats().rejected("icv"), 1);
    assert!(responder.poll_transmit().is_none());
    assert!(!responder.is_closed());
}

#[test]
fn a_real_strongswan_ike_auth_request_is_acceptable_to_our_child_logic() {
    use crate::ike::message::strongswan_vectors::session;
    let s = session();
    let auth = s.find(ExchangeType::IKE_AUTH, false);
    let inner = s.inner(&auth.bytes);
    let idi = Identity::from_payload(inner.id_i().unwrap());
    assert!(
        matches!(idi, Identity::Ipv4(_) | Identity::Fqdn(_)),
        "{idi:?}"
    );
    assert_eq!(
        inner.auth().unwrap().method,
        AuthMethod::SHARED_KEY_MESSAGE_INTEGRITY_CODE
    );
    let esp = parse_proposals(Protocol::Esp, "aes128gcm16").unwrap();
    let agreed = select(&esp, inner.sa().unwrap(), DhMode::Skip).unwrap();
    assert_eq!(agreed.peer_spi.len(), 4);
    let any = [prefix("0.0.0.0/0")];
    let ts_i = narrow(&inner.ts_i().unwrap().selectors, &any);
    let ts_r = narrow(&inner.ts_r().unwrap().selectors, &any);
    assert!(!ts_i.is_empty() && !ts_r.is_empty());
    // And charon's answer is what our initiator accepts as a reply to that
    // offer (same proposals, so the same numbering).
    let response = s.inner(&s.find(ExchangeType::IKE_AUTH, true).bytes);
    let charon_offer = inner.sa().unwrap();
    assert!(response.sa().unwrap().proposals[0].number <= charon_offer.proposals.len() as u8);
    assert!(all_within(
        &ranges(&response.ts_i().unwrap().selectors),
        &ranges(&inner.ts_i().unwrap().selectors)
    ));
}

#[test]
fn garbage_to_established_engines_changes_nothing() {
    let mut p = Pair::new(initiator_config(), responder_config());
    p.pump();
    // A genuine request from each side, scrambled.
    assert!(p.initiator.send_liveness_check(p.now));
    let from_i = p.initiator.poll_transmit().unwrap();
    let mut rng = TestRng(7);
    for round in 0..2000u32 {
        let mut d = from_i.clone();
        for _ in 0..(round % 5 + 1) {
            let at = (rng.next_u32() as usize) % d.payload.len();
            d.payload[at] ^= (rng.next_u32() as u8) | 1;
        }
        if round % 4 == 0 {
            let len = (rng.next_u32() as usize) % d.payload.len();
            d.payload.truncate(len);
        }
        p.responder.handle(p.now, d.clone());
        p.initiator.handle(p.now, d);
    }
    assert!(p.responder.poll_transmit().is_none());
    assert!(p.initiator.poll_transmit().is_none());
    p.drain_events();
    assert!(p
        .i_events
        .iter()
        .all(|e| !matches!(e, IkeEvent::Failed { .. } | IkeEvent::Deleted)));
    assert_eq!(p.responder.stats().rejected_total(), 2000);
    // The genuine request still goes through.
    p.responder.handle(p.now, from_i);
    p.pump();
    assert_eq!(p.initiator.poll_timeout(), None);
    assert!(p.initiator.is_established() && p.responder.is_established());
}

// ------------------------------------------------------------------ several Child SAs

fn children_established(events: &[IkeEvent]) -> Vec<&ChildSaEstablished> {
    events
        .iter()
        .filter_map(|e| match e {
            IkeEvent::ChildSaEstablished(c) => Some(c),
            _ => None,
        })
        .collect()
}

fn deleted_children(events: &[IkeEvent]) -> Vec<u32> {
    events
        .iter()
        .filter_map(|e| match e {
            IkeEvent::ChildSaDeleted { inbound_spi, .. } => Some(*inbound_spi),
            _ => None,
        })
        .collect()
}

fn rekeys(events: &[IkeEvent]) -> Vec<((u64, u64), (u64, u64))> {
    events
        .iter()
        .filter_map(|e| match e {
            IkeEvent::IkeSaRekeyed { old_spis, new_spis } => Some((*old_spis, *new_spis)),
            _ => None,
        })
        .collect()
}

fn no_trouble(p: &Pair) {
    for events in [&p.i_events, &p.r_events] {
        assert!(
            events.iter().all(|e| !matches!(
                e,
                IkeEvent::Failed { .. }
                    | IkeEvent::Rejected { .. }
                    | IkeEvent::ChildSaFailed { .. }
            )),
            "{events:#?}"
        );
    }
    assert_eq!(
        p.initiator.stats().rejected_total() + p.responder.stats().rejected_total(),
        0
    );
}

/// Initiator children "net" (10.1/16 - 10.2/16) and "extra" (10.1.5/24 -
/// 10.2.5/24, PFS); the responder has "other" (192.168/16, matching
/// nothing), "web" (10.2.5/24, PFS) and "net".
fn multi_child_configs() -> (Config, Config) {
    let mut i = initiator_config();
    let mut extra = child_config("extra", &["10.1.5.0/24"], &["10.2.5.0/24"]);
    extra.esp_proposals = parse_proposals(Protocol::Esp, "aes128gcm16-x25519").unwrap();
    i.children.push(extra);
    let mut r = responder_config();
    let mut web = child_config("web", &["10.2.5.0/24"], &["10.1.0.0/16"]);
    web.esp_proposals = parse_proposals(
        Protocol::Esp,
        "aes256gcm16-x25519,aes128gcm16-x25519,aes128gcm16",
    )
    .unwrap();
    let net = r.children.remove(0);
    r.children = vec![
        child_config("other", &["192.168.0.0/16"], &["192.168.0.0/16"]),
        web,
        net,
    ];
    (i, r)
}

#[test]
fn the_responder_takes_the_first_child_config_whose_selectors_meet() {
    let (i, r) = multi_child_configs();
    let mut p = Pair::new(i, r);
    p.pump();
    // "net" proposes 10.2.0.0/16: "web" (10.2.5.0/24) meets it first.
    let (ci, cr) = (child(&p.i_events), child(&p.r_events));
    assert_eq!(cr.name, "web");
    assert_eq!(ci.name, "net");
    assert_eq!(cr.local_ts, vec![prefix("10.2.5.0/24")]);
    assert_eq!(ci.remote_ts, vec![prefix("10.2.5.0/24")]);
    assert_keys_crossed(ci, cr);
    no_trouble(&p);
}

#[test]
fn initiating_with_an_unknown_child_fails_with_config() {
    let mut sa = IkeSa::initiate(
        Instant::now(),
        initiator_config(),
        "nope",
        addr(I_ADDR),
        addr(R_ADDR),
        Box::new(TestRng(1)),
        Box::new(CountingSpis { ike: 0, esp: 0 }),
    );
    assert!(sa.is_closed());
    assert!(sa.poll_transmit().is_none());
    assert!(matches!(
        sa.poll_event(),
        Some(IkeEvent::Failed {
            reason: "config",
            ..
        })
    ));
}

#[test]
fn create_child_sets_up_another_child_sa_from_either_side() {
    let (i, r) = multi_child_configs();
    let mut p = Pair::new(i, r);
    p.pump();
    assert!(!p.initiator.create_child(p.now, "nope"));
    assert!(p.initiator.create_child(p.now, "extra"));
    p.pump();
    let (ci, cr) = (
        children_established(&p.i_events),
        children_established(&p.r_events),
    );
    assert_eq!(ci.len(), 2);
    assert_eq!(cr.len(), 2);
    assert_eq!((ci[1].name.as_str(), cr[1].name.as_str()), ("extra", "web"));
    assert_eq!((ci[1].rekeys, cr[1].rekeys), (None, None));
    assert_keys_crossed(ci[1], cr[1]);
    assert_eq!(ci[1].aead, AeadAlg::Aes128Gcm16);
    assert_eq!(ci[1].local_ts, vec![prefix("10.1.5.0/24")]);
    // The responder's side: its "net" with the whole prefixes.
    assert!(p.responder.create_child(p.now, "net"));
    p.pump();
    let (ci, cr) = (
        children_established(&p.i_events),
        children_established(&p.r_events),
    );
    assert_eq!((ci.len(), cr.len()), (3, 3));
    assert_eq!((ci[2].name.as_str(), cr[2].name.as_str()), ("net", "net"));
    assert_keys_crossed(ci[2], cr[2]);
    no_trouble(&p);
}

#[test]
fn a_refused_create_child_is_child_sa_failed() {
    let mut i = initiator_config();
    i.children
        .push(child_config("far", &["172.16.0.0/12"], &["172.16.0.0/12"]));
    let mut p = Pair::new(i, responder_config());
    p.pump();
    assert!(p.initiator.create_child(p.now, "far"));
    p.pump();
    assert!(p.i_events.iter().any(|e| matches!(e,
        IkeEvent::ChildSaFailed { name, reason: "ts_unacceptable" } if name == "far")));
    assert!(p.initiator.is_established() && p.responder.is_established());
}

// ------------------------------------------------------------------ request queue

#[test]
fn requests_queue_behind_the_outstanding_one_and_go_in_order() {
    let (i, r) = multi_child_configs();
    let mut p = Pair::new(i, r);
    p.pump();
    let first = child(&p.i_events).inbound_spi;
    // Watch the requests on the wire: never two outstanding.
    let log = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
    let seen = log.clone();
    p.wire = Box::new(move |to_responder, d| {
        let m = Message::decode(&d.payload).unwrap();
        seen.borrow_mut().push((to_responder, m.header));
        Some(d)
    });
    assert!(p.initiator.send_liveness_check(p.now));
    assert!(p.initiator.create_child(p.now, "extra"));
    assert!(p.initiator.rekey_child(p.now, first));
    assert!(p.initiator.delete_child(p.now, first));
    assert!(p.initiator.rekey_ike(p.now));
    assert!(
        p.initiator.send_liveness_check(p.now),
        "merged with the first"
    );
    assert!(p.initiator.create_child(p.now, "net"));
    // Only the first went out yet.
    assert_eq!(p.initiator.transmit.len(), 1);
    p.pump();
    let requests: Vec<_> = log
        .borrow()
        .iter()
        .filter(|(to_r, _)| *to_r)
        .map(|(_, h)| (h.exchange, h.spi_i, h.message_id))
        .collect();
    use ExchangeType as X;
    let (old, new) = rekeys(&p.i_events)[0];
    assert_eq!(
        requests,
        vec![
            (X::INFORMATIONAL, old.0, 2),
            (X::CREATE_CHILD_SA, old.0, 3),
            (X::CREATE_CHILD_SA, old.0, 4),
            (X::INFORMATIONAL, old.0, 5), // the delete, asked for and after the rekey (merged)
            (X::CREATE_CHILD_SA, old.0, 6), // the IKE rekey
            (X::INFORMATIONAL, old.0, 7), // the old IKE SA's Delete
            (X::CREATE_CHILD_SA, new.0, 0), // the last Child SA, under the new SA
        ]
    );
    // On each IKE SA, every request was answered before the next went out.
    let log = log.borrow();
    for spi in [old.0, new.0] {
        let on_sa: Vec<_> = log.iter().filter(|(_, h)| h.spi_i == spi).collect();
        for pair in on_sa.chunks(2) {
            assert!(pair[0].0 && !pair[1].0, "{pair:?}");
            assert_eq!(pair[0].1.message_id, pair[1].1.message_id);
        }
    }
    assert_eq!(
        deleted_children(&p.i_events),
        vec![first],
        "{:#?}",
        p.i_events
    );
    assert_eq!(
        children_established(&p.i_events).len(),
        4,
        "{:#?}",
        p.i_events
    );
    assert_eq!(p.initiator.queue.len(), 0);
    assert_eq!(p.initiator.poll_timeout(), None);
    no_trouble(&p);
}

#[test]
fn requests_are_refused_only_when_they_make_no_sense() {
    let mut p = Pair::new(initiator_config(), responder_config());
    // Not established yet.
    assert!(!p.initiator.send_liveness_check(p.now));
    assert!(!p.initiator.rekey_ike(p.now));
    assert!(!p.initiator.create_child(p.now, "net"));
    assert!(!p.initiator.delete(p.now));
    p.pump();
    assert!(!p.initiator.rekey_child(p.now, 0xdead));
    assert!(!p.initiator.delete_child(p.now, 0xdead));
    assert!(p.initiator.delete(p.now));
    p.pump();
    assert!(p.initiator.is_closed());
    assert!(!p.initiator.send_liveness_check(p.now));
    assert!(!p.initiator.rekey_ike(p.now));
}

// ------------------------------------------------------------------ timers

#[test]
fn a_child_sa_is_rekeyed_at_its_rekey_time_with_jitter_and_the_old_one_deleted() {
    let mut i = initiator_config();
    i.children[0].rekey_time = Some(Duration::from_secs(1000));
    i.children[0].life_time = Some(Duration::from_secs(1100));
    let mut p = Pair::new(i, responder_config());
    p.pump();
    let start = p.now;
    let old = child(&p.i_events).inbound_spi;
    let at = p.initiator.poll_timeout().unwrap();
    assert!(at > start + Duration::from_secs(899) && at <= start + Duration::from_secs(1000));
    p.run_for(Duration::from_secs(899));
    assert!(rekeyed(&p.i_events).is_none());
    p.run_for(Duration::from_secs(101));
    let new = rekeyed(&p.i_events).expect("rekeyed").inbound_spi;
    assert_eq!(rekeyed(&p.i_events).unwrap().rekeys, Some(old));
    assert_eq!(deleted_children(&p.i_events), vec![old]);
    // The new one is rekeyed in turn, about 1000 s later; never deleted by
    // its life time because the rekey comes first.
    p.run_for(Duration::from_secs(1000));
    let all = children_established(&p.i_events);
    assert_eq!(all.len(), 3);
    assert_eq!(all[2].rekeys, Some(new));
    assert_eq!(deleted_children(&p.i_events), vec![old, new]);
    no_trouble(&p);
}

#[test]
fn a_child_sa_is_deleted_at_its_life_time() {
    let mut r = responder_config();
    r.children[0].life_time = Some(Duration::from_secs(50));
    let mut p = Pair::new(initiator_config(), r);
    p.pump();
    let spi = child(&p.r_events).inbound_spi;
    p.run_for(Duration::from_secs(49));
    assert!(deleted_children(&p.r_events).is_empty());
    p.run_for(Duration::from_secs(1));
    assert_eq!(deleted_children(&p.r_events), vec![spi]);
    assert_eq!(deleted_children(&p.i_events).len(), 1);
    assert!(p.responder.is_established());
    assert_eq!(p.responder.poll_timeout(), None);
}

#[test]
fn the_ike_sa_is_rekeyed_at_its_rekey_time() {
    let mut r = responder_config();
    r.ike_rekey_time = Some(Duration::from_secs(3600));
    let mut p = Pair::new(initiator_config(), r);
    p.pump();
    p.run_for(Duration::from_secs(3239));
    assert!(rekeys(&p.r_events).is_empty());
    p.run_for(Duration::from_secs(361));
    assert_eq!(rekeys(&p.r_events).len(), 1);
    assert_eq!(rekeys(&p.i_events), rekeys(&p.r_events));
    // And again about an hour later, under the new SA.
    p.run_for(Duration::from_secs(3600));
    assert_eq!(rekeys(&p.r_events).len(), 2);
    assert_eq!(p.initiator.spis(), p.responder.spis());
    no_trouble(&p);
}

#[test]
fn dpd_checks_a_silent_peer_and_fails_when_it_is_gone() {
    let mut i = initiator_config();
    i.dpd_delay = Some(Duration::from_secs(30));
    let mut p = Pair::new(i, responder_config());
    p.pump();
    assert_eq!(
        p.initiator.poll_timeout(),
        Some(p.now + Duration::from_secs(30))
    );
    p.run_for(Duration::from_secs(30));
    assert_eq!(
        p.responder.stats().requests_answered,
        3,
        "one liveness check"
    );
    // Traffic from the peer postpones the next check.
    p.run_for(Duration::from_secs(20));
    assert!(p.responder.send_liveness_check(p.now));
    p.pump();
    p.run_for(Duration::from_secs(29));
    assert_eq!(p.responder.stats().requests_answered, 3);
    p.run_for(Duration::from_secs(1));
    assert_eq!(p.responder.stats().requests_answered, 4);
    // The peer disappears: the check goes unanswered and the SA fails.
    p.wire = Box::new(|_, _| None);
    p.run_for(Duration::from_secs(600));
    assert_eq!(failed(&p.i_events), Some("timeout"));
    assert!(p.initiator.is_closed());
    assert_eq!(p.initiator.poll_timeout(), None);
}

#[test]
fn nat_t_keepalives_go_from_4500_to_4500_while_a_nat_is_detected() {
    let mut i = initiator_config();
    i.keepalive_interval = Some(Duration::from_secs(20));
    let mut p = Pair::new(i, responder_config());
    // A NAT in front of the initiator.
    p.wire = Box::new(|to_responder, mut d| {
        if to_responder {
            d.src = SocketAddr::new("203.0.113.5".parse().unwrap(), d.src.port() + 1000);
        } else {
            d.dst = SocketAddr::new("10.0.0.1".parse().unwrap(), d.dst.port() - 1000);
        }
        Some(d)
    });
    p.pump();
    assert!(p.initiator.nat_detected());
    p.now += Duration::from_secs(20);
    p.initiator.handle_timeout(p.now);
    let keepalive = p.initiator.poll_transmit().expect("a keepalive");
    assert_eq!(keepalive.payload, vec![0xff]);
    assert_eq!(
        (keepalive.src, keepalive.dst),
        (addr("10.0.0.1:4500"), addr("10.0.0.2:4500"))
    );
    assert!(p.initiator.poll_transmit().is_none());
    assert_eq!(
        p.initiator.poll_timeout(),
        Some(p.now + Duration::from_secs(20))
    );
    // A keepalive reaching an engine is rejected harmlessly.
    p.responder.handle(p.now, keepalive);
    assert!(p.responder.is_established());
    // Without a NAT, no keepalives.
    let mut i = initiator_config();
    i.keepalive_interval = Some(Duration::from_secs(20));
    let mut p = Pair::new(i, responder_config());
    p.pump();
    assert_eq!(p.initiator.poll_timeout(), None);
}

// ------------------------------------------------------------------ IKE SA rekey

#[test]
fn the_ike_sa_is_rekeyed_from_either_side_and_keeps_working() {
    for by_initiator in [true, false] {
        let (i, r) = pfs_configs();
        let mut p = Pair::new(i, r);
        p.pump();
        let before = p.initiator.spis();
        // A request under the old SA, to replay later.
        assert!(p.initiator.send_liveness_check(p.now));
        let old_request = p.initiator.transmit.front().cloned().unwrap();
        p.pump();
        let rekeyer = if by_initiator {
            &mut p.initiator
        } else {
            &mut p.responder
        };
        assert!(rekeyer.rekey_ike(p.now));
        p.pump();
        let (ri, rr) = (rekeys(&p.i_events), rekeys(&p.r_events));
        assert_eq!(ri.len(), 1, "{by_initiator}");
        assert_eq!(ri, rr);
        let (old, new) = ri[0];
        assert_eq!(old, before);
        assert_eq!(p.initiator.spis(), new);
        assert_eq!(p.responder.spis(), new);
        assert_ne!(new.0, old.0);
        assert_ne!(new.1, old.1);
        // The rekey's initiator is the new SA's initiator (its SPI first).
        if by_initiator {
            assert_eq!(new.0 & 0xf000, 0x1000);
        } else {
            assert_eq!(new.0 & 0xf000, 0x2000);
        }
        // The old SA's Delete is done: only the new SPIs remain.
        assert_eq!(p.initiator.all_spis(), vec![new]);
        assert_eq!(p.responder.all_spis(), vec![new]);
        assert!(p.initiator.olds.is_empty() && p.responder.olds.is_empty());
        assert_eq!(p.initiator.cur.our_next_id + p.responder.cur.our_next_id, 0);
        // Child SAs are created and rekeyed under the new SA.
        let first = child(&p.i_events).inbound_spi;
        assert!(p.initiator.rekey_child(p.now, first));
        assert!(p.responder.create_child(p.now, "net"));
        p.pump();
        let (ci, cr) = (
            children_established(&p.i_events),
            children_established(&p.r_events),
        );
        assert_eq!((ci.len(), cr.len()), (3, 3));
        for c in &ci {
            let other = cr.iter().find(|r| r.inbound_spi == c.outbound_spi).unwrap();
            assert_keys_crossed(c, other);
        }
        assert_eq!(deleted_children(&p.i_events), vec![first]);
        assert!(p.initiator.send_liveness_check(p.now));
        p.pump();
        no_trouble(&p);
        // The old SA's datagrams are no longer accepted.
        p.responder.handle(p.now, old_request);
        assert!(p.responder.poll_transmit().is_none());
        assert_eq!(p.responder.stats().rejected("bad_spi"), 1);
        p.drain_events();
        assert!(matches!(
            p.r_events.last(),
            Some(IkeEvent::Rejected {
                reason: "bad_spi",
                ..
            })
        ));
        // And the new SA can be deleted.
        assert!(p.responder.delete(p.now));
        p.pump();
        assert!(p.initiator.is_closed() && p.responder.is_closed());
    }
}

#[test]
fn the_old_ike_sa_answers_until_its_delete_and_a_lost_rekey_response_is_repeated() {
    let mut p = Pair::new(initiator_config(), responder_config());
    p.pump();
    // Drop the first IKE rekey response: the rekey's initiator retransmits
    // under the old SA, the responder (already on the new SA) answers from
    // the old SA's cache.
    let mut dropped = false;
    p.wire = Box::new(move |to_responder, d| {
        let m = Message::decode(&d.payload).unwrap();
        if !to_responder && m.header.exchange == ExchangeType::CREATE_CHILD_SA && !dropped {
            dropped = true;
            return None;
        }
        Some(d)
    });
    assert!(p.initiator.rekey_ike(p.now));
    p.pump();
    assert_eq!(rekeys(&p.r_events).len(), 1);
    assert!(rekeys(&p.i_events).is_empty());
    assert_eq!(p.responder.all_spis().len(), 2);
    p.advance(Duration::from_secs(1));
    p.pump();
    assert_eq!(rekeys(&p.i_events), rekeys(&p.r_events));
    assert_eq!(p.responder.stats().retransmits_answered, 1);
    assert_eq!(p.responder.all_spis().len(), 1);
    no_trouble(&p);
}

#[test]
fn an_old_ike_sa_without_a_delete_is_dropped_after_a_while() {
    let mut p = Pair::new(initiator_config(), responder_config());
    p.pump();
    // The initiator's Delete of the old SA never arrives.
    p.wire = Box::new(|to_responder, d| {
        let m = Message::decode(&d.payload).unwrap();
        (!(to_responder && m.header.exchange == ExchangeType::INFORMATIONAL)).then_some(d)
    });
    assert!(p.initiator.rekey_ike(p.now));
    p.pump();
    assert_eq!(p.responder.all_spis().len(), 2);
    p.run_for(OLD_IKE_SA_WAIT);
    assert_eq!(p.responder.all_spis().len(), 1);
    assert_eq!(
        p.initiator.all_spis().len(),
        1,
        "gave up retransmitting the Delete"
    );
    assert!(p.initiator.is_established() && p.responder.is_established());
    assert_eq!(p.initiator.poll_timeout(), None);
}

/// Both ends rekey the IKE SA at once; `cross` delivers both requests
/// before either response, else the initiator's exchange completes before
/// the responder's request arrives. Returns the pair when quiet.
fn simultaneous_rekeys(seed: u64, cross: bool) -> Pair {
    let mut p = Pair::new(initiator_config(), responder_config());
    p.initiator.rng = Box::new(TestRng(100 + seed));
    p.pump();
    assert!(p.initiator.rekey_ike(p.now));
    assert!(p.responder.rekey_ike(p.now));
    let from_i = p.initiator.poll_transmit().unwrap();
    let from_r = p.responder.poll_transmit().unwrap();
    if cross {
        p.responder.handle(p.now, from_i);
        p.initiator.handle(p.now, from_r);
    } else {
        p.responder.handle(p.now, from_i);
        let answer = p.responder.poll_transmit().unwrap();
        p.initiator.handle(p.now, answer);
        p.initiator.handle(p.now, from_r);
    }
    p.pump();
    p
}

#[test]
fn simultaneous_ike_rekeys_end_in_one_new_ike_sa() {
    let mut outcomes = std::collections::BTreeSet::new();
    for (seed, cross) in (0..8u64).flat_map(|s| [(s, true), (s, false)]) {
        let mut p = simultaneous_rekeys(seed, cross);
        let (ri, rr) = (rekeys(&p.i_events), rekeys(&p.r_events));
        assert_eq!(ri.len(), 1, "seed {seed} {cross}: {:#?}", p.i_events);
        assert_eq!(rr.len(), 1, "seed {seed} {cross}: {:#?}", p.r_events);
        assert_eq!(p.initiator.spis(), p.responder.spis());
        assert_eq!(ri[0].1, p.initiator.spis());
        // The loser and the old SA are deleted on both sides.
        assert_eq!(p.initiator.all_spis().len(), 1, "seed {seed} {cross}");
        assert_eq!(p.responder.all_spis().len(), 1, "seed {seed} {cross}");
        assert_eq!(
            p.initiator.stats().ike_rekeys_failed + p.responder.stats().ike_rekeys_failed,
            1
        );
        // Whose rekey won: the initiator's SPI comes first in the new pair.
        outcomes.insert((cross, p.initiator.spis().0 & 0xf000 == 0x1000));
        // The new SA works.
        assert!(p.initiator.create_child(p.now, "net"));
        p.pump();
        let (ci, cr) = (
            children_established(&p.i_events),
            children_established(&p.r_events),
        );
        assert_keys_crossed(ci[1], cr[1]);
        assert!(p.initiator.is_established() && p.responder.is_established());
        assert_eq!(
            p.initiator.stats().rejected_total() + p.responder.stats().rejected_total(),
            0
        );
        assert_eq!(p.initiator.poll_timeout(), None);
    }
    // Crossing requests: each side's rekey won for some seed.
    assert!(outcomes.contains(&(true, true)) && outcomes.contains(&(true, false)));
}

// ------------------------------------------------------------------ cookies, rejections

#[test]
fn an_initiator_follows_the_cookie_jar_end_to_end() {
    let mut p = Pair::new(initiator_config(), responder_config());
    let mut jar = crate::ike::cookie::CookieJar::new(p.now, Box::new(TestRng(9)));
    let first = p.initiator.poll_transmit().unwrap();
    let answer = jar.check(p.now, &first).unwrap_err();
    p.initiator.handle(p.now, answer);
    let retry = p.initiator.poll_transmit().unwrap();
    assert_eq!(jar.check(p.now, &retry), Ok(()));
    p.responder.handle(p.now, retry);
    p.pump();
    assert!(p.initiator.is_established() && p.responder.is_established());
    assert_keys_crossed(child(&p.i_events), child(&p.r_events));
}

#[test]
fn every_rejected_datagram_is_an_event() {
    let mut p = Pair::new(initiator_config(), responder_config());
    p.pump();
    p.responder.handle(
        p.now,
        Datagram {
            src: addr(I_ADDR),
            dst: addr(R_ADDR),
            payload: vec![1, 2, 3],
        },
    );
    p.drain_events();
    match p.r_events.last() {
        Some(IkeEvent::Rejected { reason, detail }) => {
            assert_eq!(*reason, "truncated");
            assert!(detail.contains("3 octets from 10.0.0.1:500"), "{detail}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(p.responder.stats().rejected_total(), 1);
}

#[test]
fn invalid_ke_payload_in_create_child_sa_is_followed_once() {
    let mut i = initiator_config();
    let mut r = responder_config();
    i.children[0].esp_proposals =
        parse_proposals(Protocol::Esp, "aes128gcm16-x25519-ecp256").unwrap();
    r.children[0].esp_proposals = parse_proposals(Protocol::Esp, "aes128gcm16-ecp256").unwrap();
    let mut p = Pair::new(i, r);
    p.pump();
    assert!(p.initiator.create_child(p.now, "net"));
    p.pump();
    let (ci, cr) = (
        children_established(&p.i_events),
        children_established(&p.r_events),
    );
    assert_eq!((ci.len(), cr.len()), (2, 2));
    assert_keys_crossed(ci[1], cr[1]);
    assert_eq!(
        p.responder.stats().errors_sent.get("invalid_ke_payload"),
        Some(&1)
    );
    // The IKE SA rekey likewise, when the responder now wants ecp256.
    p.responder.config.ike_proposals =
        parse_proposals(Protocol::Ike, "aes128gcm16-prfsha256-ecp256").unwrap();
    p.initiator.config.ike_proposals =
        parse_proposals(Protocol::Ike, "aes128gcm16-prfsha256-x25519-ecp256").unwrap();
    assert!(p.initiator.rekey_ike(p.now));
    p.pump();
    assert_eq!(rekeys(&p.i_events).len(), 1);
    assert_eq!(rekeys(&p.i_events), rekeys(&p.r_events));
    assert_eq!(
        p.responder.stats().errors_sent.get("invalid_ke_payload"),
        Some(&2)
    );
    assert_eq!(p.initiator.cur.suite.unwrap().dh, DhGroup::Ecp256);
    assert_eq!(p.initiator.stats().ike_rekeys_failed, 0);
    assert!(p.initiator.send_liveness_check(p.now));
    p.pump();
    assert_eq!(p.initiator.poll_timeout(), None);
}

// ------------------------------------------------------------------ simultaneous Child SA rekeys

/// One side's dataplane as the proxy keeps it (`proxy::child_up` and
/// `remove_child`): inbound SAs by SPI, one outbound SA replaced in place,
/// and the peer's rekeys waiting for the old SA's deletion before their
/// outbound SA takes over.
#[derive(Default, Debug)]
struct Dataplane {
    inbound: std::collections::BTreeSet<u32>,
    outbound: Option<u32>,
    /// New inbound SPI -> (old inbound SPI, outbound SPI to take over).
    successors: BTreeMap<u32, (u32, u32)>,
}

impl Dataplane {
    fn apply(&mut self, event: &IkeEvent) {
        match event {
            IkeEvent::ChildSaEstablished(c) => {
                assert!(self.inbound.insert(c.inbound_spi), "reported twice");
                match c.rekeys {
                    Some(old) if !c.initiated => {
                        self.successors.insert(c.inbound_spi, (old, c.outbound_spi));
                    }
                    Some(old) => {
                        self.outbound = Some(c.outbound_spi);
                        self.successors.retain(|_, (o, _)| *o != old);
                    }
                    None => self.outbound = Some(c.outbound_spi),
                }
            }
            IkeEvent::ChildSaDeleted { inbound_spi, .. } => {
                assert!(self.inbound.remove(inbound_spi), "deleted, never reported");
                self.successors.remove(inbound_spi);
                let next: Vec<u32> = self
                    .successors
                    .iter()
                    .filter(|(_, (old, _))| old == inbound_spi)
                    .map(|(new, _)| *new)
                    .collect();
                assert!(next.len() <= 1, "two successors of {inbound_spi:x}");
                if let Some((_, out)) = next.first().and_then(|n| self.successors.remove(n)) {
                    self.outbound = Some(out);
                } else if self.inbound.is_empty() {
                    self.outbound = None;
                }
            }
            _ => {}
        }
    }
}

/// What simultaneous Child SA rekeys ended in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum RekeyOutcome {
    /// Both exchanges completed; the lowest nonce's initiator deleted its
    /// new SA.
    InitiatorLost,
    ResponderLost,
    /// One exchange completed before the other's request arrived, which
    /// got TEMPORARY_FAILURE (or CHILD_SA_NOT_FOUND after the old SA's
    /// Delete).
    InitiatorRefused,
    ResponderRefused,
}

/// Both ends rekey their only Child SA at once; the datagrams in flight are
/// delivered in an order drawn from `order_seed` (crossing or not, a Delete
/// before a response, ...), with nonces drawn from `nonce_seed`. After each
/// delivery, each side's outbound SA must be installed on the other side
/// (no gap). Returns the outcome; the pair is quiet with one Child SA.
fn simultaneous_child_rekeys(nonce_seed: u64, order_seed: u64, pfs: bool) -> RekeyOutcome {
    let (i, r) = if pfs {
        pfs_configs()
    } else {
        (initiator_config(), responder_config())
    };
    let mut p = Pair::new(i, r);
    p.pump();
    let mut planes = [Dataplane::default(), Dataplane::default()];
    for e in &p.i_events {
        planes[0].apply(e);
    }
    for e in &p.r_events {
        planes[1].apply(e);
    }
    let (old_i, old_r) = (
        child(&p.i_events).inbound_spi,
        child(&p.r_events).inbound_spi,
    );
    p.initiator.rng = Box::new(TestRng(1000 + nonce_seed));
    p.responder.rng = Box::new(TestRng(2000 + nonce_seed));
    assert!(p.initiator.rekey_child(p.now, old_i));
    assert!(p.responder.rekey_child(p.now, old_r));
    let mut order = TestRng(order_seed);
    // In flight: (to the responder, datagram).
    let mut wire: Vec<(bool, Datagram)> = Vec::new();
    let (mut ie, mut re) = (p.i_events.len(), p.r_events.len());
    for _ in 0..100 {
        while let Some(d) = p.initiator.poll_transmit() {
            wire.push((true, d));
        }
        while let Some(d) = p.responder.poll_transmit() {
            wire.push((false, d));
        }
        if wire.is_empty() {
            break;
        }
        let pick = (order.next_u64() % wire.len() as u64) as usize;
        let (to_responder, d) = wire.remove(pick);
        if to_responder {
            p.responder.handle(p.now, d);
        } else {
            p.initiator.handle(p.now, d);
        }
        p.drain_events();
        for e in &p.i_events[ie..] {
            planes[0].apply(e);
        }
        for e in &p.r_events[re..] {
            planes[1].apply(e);
        }
        (ie, re) = (p.i_events.len(), p.r_events.len());
        for (from, to) in [(0, 1), (1, 0)] {
            let out = planes[from].outbound.expect("an outbound SA all along");
            assert!(
                planes[to].inbound.contains(&out),
                "seeds {nonce_seed}/{order_seed}: side {from} sends on {out:x}, not installed: {planes:x?}"
            );
        }
    }
    assert!(wire.is_empty(), "never quiet");
    // One Child SA on each side, a new one, the same pair; the dataplanes
    // hold exactly it.
    let ctx = format!(
        "seeds {nonce_seed}/{order_seed}: {:#?} {:#?}",
        p.i_events, p.r_events
    );
    assert_eq!(p.initiator.children.len(), 1, "{ctx}");
    assert_eq!(p.responder.children.len(), 1, "{ctx}");
    let (ci, cr) = (&p.initiator.children[0], &p.responder.children[0]);
    assert_eq!(
        (ci.inbound_spi, ci.outbound_spi),
        (cr.outbound_spi, cr.inbound_spi)
    );
    assert!(ci.inbound_spi != old_i && cr.inbound_spi != old_r, "{ctx}");
    assert!(!ci.replaced && !cr.replaced);
    assert_eq!(planes[0].inbound, [ci.inbound_spi].into(), "{ctx}");
    assert_eq!(planes[1].inbound, [cr.inbound_spi].into(), "{ctx}");
    assert_eq!(planes[0].outbound, Some(ci.outbound_spi));
    assert_eq!(planes[1].outbound, Some(cr.outbound_spi));
    assert!(planes[0].successors.is_empty() && planes[1].successors.is_empty());
    // The survivor's keys agree on both sides.
    let survivor = |events: &[IkeEvent], spi: u32| {
        children_established(events)
            .into_iter()
            .find(|c| c.inbound_spi == spi)
            .map(|c| {
                (
                    c.outbound_keys.encryption.as_bytes().to_vec(),
                    c.inbound_keys.encryption.as_bytes().to_vec(),
                )
            })
            .unwrap()
    };
    let (si, sr) = (
        survivor(&p.i_events, ci.inbound_spi),
        survivor(&p.r_events, cr.inbound_spi),
    );
    assert_eq!((si.0, si.1), (sr.1, sr.0));
    // Nothing rejected or failed but a refused rekey.
    for events in [&p.i_events, &p.r_events] {
        for e in events {
            match e {
                IkeEvent::Failed { .. } | IkeEvent::Rejected { .. } => panic!("{ctx}"),
                IkeEvent::ChildSaFailed { reason, .. } => assert!(
                    ["temporary_failure", "child_sa_not_found"].contains(reason),
                    "{ctx}"
                ),
                _ => {}
            }
        }
    }
    assert_eq!(p.initiator.poll_timeout(), None);
    assert_eq!(p.responder.poll_timeout(), None);
    assert!(p.initiator.peer_child_rekey.is_none() && p.responder.peer_child_rekey.is_none());
    let (si, sr) = (p.initiator.stats(), p.responder.stats());
    // TEMPORARY_FAILURE, or CHILD_SA_NOT_FOUND when the old SA's Delete
    // came first.
    let refused = |s: &Stats| {
        ["temporary_failure", "child_sa_not_found"]
            .iter()
            .filter_map(|r| s.errors_sent.get(r))
            .sum::<u64>()
    };
    let outcome = match (
        si.child_rekeys_redundant,
        sr.child_rekeys_redundant,
        refused(si),
        refused(sr),
    ) {
        (1, 0, 0, 0) => RekeyOutcome::InitiatorLost,
        (0, 1, 0, 0) => RekeyOutcome::ResponderLost,
        // The responder refused the initiator's rekey.
        (0, 0, 0, 1) => RekeyOutcome::InitiatorRefused,
        (0, 0, 1, 0) => RekeyOutcome::ResponderRefused,
        other => panic!("{other:?}: {ctx}"),
    };
    // The loser's new SA was reported on the side that answered it, and
    // reported deleted there; the side that created it never reported it.
    let reported = |events: &[IkeEvent]| children_established(events).len();
    let (ri, rr) = (reported(&p.i_events), reported(&p.r_events));
    match outcome {
        RekeyOutcome::InitiatorLost => assert_eq!((ri, rr), (2, 3), "{ctx}"),
        RekeyOutcome::ResponderLost => assert_eq!((ri, rr), (3, 2), "{ctx}"),
        _ => assert_eq!((ri, rr), (2, 2), "{ctx}"),
    }
    assert_eq!(deleted_children(&p.i_events).len(), ri - 1);
    assert_eq!(deleted_children(&p.r_events).len(), rr - 1);
    outcome
}

#[test]
fn simultaneous_child_rekeys_keep_one_new_sa_without_a_gap() {
    let mut outcomes = BTreeMap::new();
    for seed in 0..200u64 {
        let outcome = simultaneous_child_rekeys(seed % 16, seed, seed % 8 == 0);
        *outcomes.entry(outcome).or_insert(0) += 1;
    }
    // Each side won by the nonces, and each side's exchange completed
    // first, for some seeds.
    assert_eq!(outcomes.len(), 4, "{outcomes:?}");
}

#[test]
fn crossing_child_rekeys_are_decided_by_the_lowest_nonce() {
    // Both requests delivered before either response, in both orders.
    for seed in 0..8u64 {
        for initiator_first in [true, false] {
            let mut p = Pair::new(initiator_config(), responder_config());
            p.pump();
            let (old_i, old_r) = (
                child(&p.i_events).inbound_spi,
                child(&p.r_events).inbound_spi,
            );
            p.initiator.rng = Box::new(TestRng(300 + seed));
            assert!(p.initiator.rekey_child(p.now, old_i));
            assert!(p.responder.rekey_child(p.now, old_r));
            let from_i = p.initiator.poll_transmit().unwrap();
            let from_r = p.responder.poll_transmit().unwrap();
            if initiator_first {
                p.responder.handle(p.now, from_i);
                p.initiator.handle(p.now, from_r);
            } else {
                p.initiator.handle(p.now, from_r);
                p.responder.handle(p.now, from_i);
            }
            // Both answered the other's rekey while their own was out.
            assert!(p.initiator.peer_child_rekey.is_some());
            assert!(p.responder.peer_child_rekey.is_some());
            p.pump();
            no_trouble(&p);
            let (ni, nr) = (
                p.initiator.stats().child_rekeys_redundant,
                p.responder.stats().child_rekeys_redundant,
            );
            assert_eq!(ni + nr, 1);
            let i_won = nr == 1;
            let winner_events = if i_won { &p.i_events } else { &p.r_events };
            let won = children_established(winner_events)
                .into_iter()
                .find(|c| c.initiated && c.rekeys.is_some())
                .unwrap();
            assert_eq!(won.rekeys, Some(if i_won { old_i } else { old_r }));
            assert_eq!(p.initiator.children.len(), 1);
            assert_eq!(p.responder.children.len(), 1);
            // Both old SAs and the loser's new SA (on the side that
            // answered it) were reported deleted.
            let (di, dr) = (deleted_children(&p.i_events), deleted_children(&p.r_events));
            assert!(di.contains(&old_i) && dr.contains(&old_r));
            assert_eq!(di.len() + dr.len(), 3);
            // The survivor works: it is rekeyed again without trouble.
            let spi = p.initiator.children[0].inbound_spi;
            assert!(p.initiator.rekey_child(p.now, spi));
            p.pump();
            no_trouble(&p);
            assert_eq!(p.initiator.children.len(), 1);
            assert_ne!(p.initiator.children[0].inbound_spi, spi);
        }
    }
}

#[test]
fn a_rekey_of_a_replaced_child_sa_gets_temporary_failure() {
    let mut p = Pair::new(initiator_config(), responder_config());
    p.pump();
    let (old_i, old_r) = (
        child(&p.i_events).inbound_spi,
        child(&p.r_events).inbound_spi,
    );
    assert!(p.initiator.rekey_child(p.now, old_i));
    assert!(p.responder.rekey_child(p.now, old_r));
    let from_i = p.initiator.poll_transmit().unwrap();
    let from_r = p.responder.poll_transmit().unwrap();
    // The initiator's exchange completes first; the responder's request
    // then names an SA being deleted.
    p.responder.handle(p.now, from_i);
    let answer = p.responder.poll_transmit().unwrap();
    p.initiator.handle(p.now, answer);
    assert!(!p.initiator.rekey_child(p.now, old_i), "replaced");
    p.initiator.handle(p.now, from_r);
    p.pump();
    assert_eq!(child_failed(&p.r_events), Some("temporary_failure"));
    assert_eq!(
        p.initiator.stats().errors_sent.get("temporary_failure"),
        Some(&1)
    );
    // The responder does not try again: its old SA is gone.
    assert_eq!(p.responder.children.len(), 1);
    assert_eq!(p.responder.poll_timeout(), None);
    assert_eq!(
        p.initiator.children[0].inbound_spi,
        p.responder.children[0].outbound_spi
    );
}

#[path = "auth_tests.rs"]
mod auth;
