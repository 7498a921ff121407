//! The proxy with an engine as the counterpart, no I/O: datagrams go from
//! the engine as punts, the proxy's injected IP datagrams are taken apart and
//! handed back, SA changes are "applied" by the test.

use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use bitw_common::config::Config;
use bitw_common::proto::{Mac, Packet, PortName, Punt};
use bitw_common::rules::Direction;
use rand_core::OsRng;

use super::{engine_config, Action, Proxy};
use crate::ike::sa::{Config as IkeConfig, Datagram, IkeEvent, IkeSa, RandomSpis};

const T: &str = "10.99.0.1";
const C: &str = "10.99.0.2";

/// A PSK file of its own for each test (they run in parallel).
fn psk_file(test: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("bitw-proxy-{test}-{}.psk", std::process::id()));
    std::fs::write(&p, "proxy unit test pre-shared key").unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

/// A config where `me` is the terminal and `peer` the counterpart.
fn config(me: &str, peer: &str, psk: &Path) -> Config {
    let text = format!(
        "[ports.inside]\ndevice = \"net_null0\"\n[ports.outside]\ndevice = \"net_null1\"\n\n\
         [[terminal]]\nname = \"meter\"\naddress = \"{me}\"\n\n\
         [[connection]]\nname = \"meter-hq\"\nterminal = \"meter\"\nremote_addrs = [\"{peer}\"]\n\
         proposals = [\"aes128gcm16-prfsha256-x25519\"]\nauth = \"psk\"\npsk_file = \"{}\"\n\n\
         [[connection.children]]\nname = \"data\"\nesp_proposals = [\"aes128gcm16\"]\n",
        psk.display()
    );
    Config::parse(Path::new("test.toml"), &text).unwrap()
}

/// The UDP datagram inside an injected IPv4 packet, marker removed.
fn datagram_of(packet: &[u8]) -> Datagram {
    assert_eq!(packet[0] >> 4, 4);
    let ihl = usize::from(packet[0] & 0x0f) * 4;
    let ip = |o: usize| IpAddr::from([packet[o], packet[o + 1], packet[o + 2], packet[o + 3]]);
    let port = |o: usize| u16::from_be_bytes([packet[o], packet[o + 1]]);
    let (src, dst) = (
        SocketAddr::new(ip(12), port(ihl)),
        SocketAddr::new(ip(16), port(ihl + 2)),
    );
    let mut payload = packet[ihl + 8..].to_vec();
    if dst.port() == 4500 && payload.len() > 1 {
        assert_eq!(&payload[..4], &[0; 4], "non-ESP marker on 4500");
        payload.drain(..4);
    }
    Datagram { src, dst, payload }
}

/// The counterpart: an engine initiating child `data` to the terminal.
fn counterpart(now: Instant, cfg: &IkeConfig) -> IkeSa {
    IkeSa::initiate(
        now,
        cfg.clone(),
        "data",
        format!("{C}:500").parse().unwrap(),
        format!("{T}:500").parse().unwrap(),
        Box::new(OsRng),
        Box::new(RandomSpis(OsRng)),
    )
}

fn punt(d: &Datagram) -> Punt {
    Punt {
        port: PortName::Outside,
        src_mac: Mac([2, 0, 0, 0, 0, 2]),
        dst_mac: Mac([2, 0, 0, 0, 0, 1]),
        vlans: vec![],
        src: d.src.ip(),
        dst: d.dst.ip(),
        sport: d.src.port(),
        dport: d.dst.port(),
        nat_t: d.dst.port() == 4500,
        payload: Packet(d.payload.clone()),
    }
}

#[test]
fn answers_as_the_terminal_and_holds_its_answer_until_the_sa_is_installed() {
    let psk = psk_file("answer");
    let ours = config(T, C, &psk);
    let theirs = config(C, T, &psk);
    let mut proxy = Proxy::new(&ours).unwrap();
    let now = Instant::now();
    let peer_cfg = engine_config(&theirs, 0, &theirs.connections[0]).unwrap();
    let mut peer = counterpart(now, &peer_cfg);
    let mut changes = Vec::new();
    let mut peer_child = None;
    let deliver = |peer: &mut IkeSa, packet: &[u8]| {
        let d = datagram_of(packet);
        // bitw speaks from the terminal's address, never its own
        assert_eq!(d.src.ip().to_string(), T);
        peer.handle(now, d);
    };
    for _round in 0..10 {
        while let Some(d) = peer.poll_transmit() {
            proxy.punt(now, &punt(&d));
        }
        let actions: Vec<Action> = std::iter::from_fn(|| proxy.poll_action()).collect();
        let installs = actions.iter().any(|a| matches!(a, Action::Change(_)));
        for a in actions {
            match a {
                Action::Inject { port, packet } => {
                    assert_eq!(port, PortName::Outside);
                    // The answer that lets the peer use the Child SA waits
                    // until the dataplane took it.
                    assert!(
                        !installs,
                        "IKE_AUTH answered before the Child SA was installed"
                    );
                    deliver(&mut peer, &packet);
                }
                Action::Change(c) => {
                    proxy.change_done(now, c.id, true);
                    changes.push(c);
                    while let Some(a) = proxy.poll_action() {
                        match a {
                            Action::Inject { packet, .. } => deliver(&mut peer, &packet),
                            other => panic!("{other:?}"),
                        }
                    }
                }
                Action::AcquireFailed { sa } => panic!("acquire failed for {sa}"),
            }
        }
        while let Some(e) = peer.poll_event() {
            if let IkeEvent::ChildSaEstablished(c) = e {
                peer_child = Some(c);
            }
        }
        if peer_child.is_some() {
            break;
        }
    }
    let child = peer_child.expect("the counterpart has its Child SA");
    assert_eq!(changes.len(), 1);
    let install = &changes[0].install;
    let inb = install
        .iter()
        .find(|s| s.direction == Direction::In)
        .unwrap();
    let out = install
        .iter()
        .find(|s| s.direction == Direction::Out)
        .unwrap();
    // one side's outbound SA is the other's inbound, with the same key
    assert_eq!(inb.spi, child.outbound_spi);
    assert_eq!(out.spi, child.inbound_spi);
    assert_eq!(
        *inb.key,
        hex::encode(child.outbound_keys.encryption.as_bytes())
    );
    assert_eq!(out.name, "meter-hq/data");
    assert_eq!(inb.name, format!("meter-hq/data/{:08x}", inb.spi));
    assert_eq!(inb.policy.as_deref(), Some("meter-hq/data"));
    assert_eq!(
        (out.tunnel_src, out.tunnel_dst),
        (Some(T.parse().unwrap()), Some(C.parse().unwrap()))
    );
    let list = proxy.list(now);
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].state, "established");
    assert!(list[0].children[0].installed);
    assert_eq!(proxy.stats.handshakes.get("ok"), Some(&1));
    let _ = std::fs::remove_file(psk);
}

#[test]
fn hostile_datagrams_are_counted_not_answered() {
    let psk = psk_file("hostile");
    let mut proxy = Proxy::new(&config(T, C, &psk)).unwrap();
    let now = Instant::now();
    let d = |src: &str, payload: Vec<u8>| Datagram {
        src: format!("{src}:500").parse().unwrap(),
        dst: format!("{T}:500").parse().unwrap(),
        payload,
    };
    proxy.punt(now, &punt(&d(C, vec![1, 2, 3])));
    let mut header = vec![0u8; 28];
    header[..8].copy_from_slice(&7u64.to_be_bytes());
    header[8..16].copy_from_slice(&9u64.to_be_bytes());
    header[17] = 0x20;
    header[18] = 37; // INFORMATIONAL
    header[24..28].copy_from_slice(&28u32.to_be_bytes());
    proxy.punt(now, &punt(&d(C, header.clone())));
    header[8..16].fill(0);
    header[18] = 34; // IKE_SA_INIT from a stranger
    proxy.punt(now, &punt(&d("192.0.2.9", header)));
    assert!(proxy.poll_action().is_none());
    assert_eq!(proxy.stats.rejected.get("malformed"), Some(&1));
    assert_eq!(proxy.stats.rejected.get("unknown_spi"), Some(&1));
    assert_eq!(proxy.stats.rejected.get("no_connection"), Some(&1));
    let _ = std::fs::remove_file(psk);
}

#[test]
fn half_open_pile_up_asks_for_cookies_and_a_returning_initiator_gets_in() {
    let psk = psk_file("cookies");
    let ours = config(T, C, &psk);
    let theirs = config(C, T, &psk);
    let mut proxy = Proxy::new(&ours).unwrap();
    let now = Instant::now();
    let peer_cfg = engine_config(&theirs, 0, &theirs.connections[0]).unwrap();
    let start = |proxy: &mut Proxy| {
        let mut peer = counterpart(now, &peer_cfg);
        let d = peer.poll_transmit().unwrap();
        proxy.punt(now, &punt(&d));
        peer
    };
    // A repeated IKE_SA_INIT (our answer lost) is answered again by the
    // same responder, not by a second one.
    let mut first = counterpart(now, &peer_cfg);
    let init = first.poll_transmit().unwrap();
    proxy.punt(now, &punt(&init));
    proxy.punt(now, &punt(&init));
    let answers: Vec<Vec<u8>> = std::iter::from_fn(|| proxy.poll_action())
        .map(|a| match a {
            Action::Inject { packet, .. } => datagram_of(&packet).payload,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(answers.len(), 2);
    assert_eq!(answers[0], answers[1], "the same answer, from the cache");
    assert_eq!(proxy.counts().connecting, 1);
    // Half-open SAs up to the threshold are answered without a cookie.
    for _ in 1..super::COOKIE_THRESHOLD {
        start(&mut proxy);
        let answers: Vec<Action> = std::iter::from_fn(|| proxy.poll_action()).collect();
        assert_eq!(answers.len(), 1);
    }
    assert_eq!(proxy.stats.cookies_sent, 0);
    // The next one is asked for a cookie (no state kept for it) ...
    let mut peer = start(&mut proxy);
    let Some(Action::Inject { packet, .. }) = proxy.poll_action() else {
        panic!("no answer");
    };
    assert_eq!(proxy.stats.cookies_sent, 1);
    assert_eq!(proxy.counts().connecting, super::COOKIE_THRESHOLD);
    // ... and, coming back with it, is answered properly.
    peer.handle(now, datagram_of(&packet));
    let retry = peer
        .poll_transmit()
        .expect("the initiator repeats with the cookie");
    proxy.punt(now, &punt(&retry));
    let Some(Action::Inject { packet, .. }) = proxy.poll_action() else {
        panic!("no answer to the cookie");
    };
    assert_eq!(proxy.stats.cookies_sent, 1);
    assert_eq!(proxy.counts().connecting, super::COOKIE_THRESHOLD + 1);
    peer.handle(now, datagram_of(&packet));
    // The IKE_SA_INIT answer moved the initiator on to IKE_AUTH.
    assert!(peer.poll_transmit().is_some());
    let _ = std::fs::remove_file(psk);
}

#[test]
fn default_proposals_parse_and_bad_ones_name_the_line() {
    let psk = psk_file("defaults");
    let base = format!(
        "[ports.inside]\ndevice = \"net_null0\"\n[ports.outside]\ndevice = \"net_null1\"\n\n\
         [[terminal]]\nname = \"meter\"\naddress = \"{T}\"\n\n\
         [[connection]]\nname = \"meter-hq\"\nterminal = \"meter\"\nremote_addrs = [\"{C}\"]\n\
         auth = \"psk\"\npsk_file = \"{}\"\n\n[[connection.children]]\nname = \"data\"\n",
        psk.display()
    );
    // strongSwan-like defaults: AEAD and CBC/HMAC, every group; every AEAD for ESP
    let c = Config::parse(Path::new("d.toml"), &base).unwrap();
    assert!(super::check(&c).is_ok());
    let bad = base.replace(
        "name = \"data\"\n",
        "name = \"data\"\nesp_proposals = [\"aes128-sha256\"]\n",
    );
    let c = Config::parse(Path::new("d.toml"), &bad).unwrap();
    let e = super::check(&c).unwrap_err();
    assert_eq!(
        e.field.as_deref(),
        Some("connection[0].children[0].esp_proposals")
    );
    assert_eq!(e.line, Some(19), "{e}");
    assert!(e.message.contains("AEAD ciphers only"), "{e}");
    let _ = std::fs::remove_file(psk);
}

#[test]
fn rejected_datagrams_are_logged_once_per_reason_and_second() {
    use super::{left_out, RejectLog};
    use std::time::Duration;
    let mut log = RejectLog::default();
    let t0 = Instant::now();
    let ms = |n: u64| t0 + Duration::from_millis(n);
    assert_eq!(log.admit(t0, "malformed"), Some(0));
    // Others are left out (counted) for a second; each reason on its own.
    assert_eq!(log.admit(ms(10), "malformed"), None);
    assert_eq!(log.admit(ms(20), "unknown_spi"), Some(0));
    assert_eq!(log.admit(ms(999), "malformed"), None);
    assert_eq!(log.admit(ms(1000), "malformed"), Some(2));
    assert_eq!(log.admit(ms(1500), "malformed"), None);
    assert_eq!(log.admit(ms(1500), "unknown_spi"), Some(0));
    assert_eq!(log.admit(ms(5000), "malformed"), Some(1));
    assert_eq!(log.admit(ms(5000), "malformed"), None);
    assert_eq!(left_out(0), "");
    assert_eq!(left_out(3), " (+3 more since the last line)");
}
