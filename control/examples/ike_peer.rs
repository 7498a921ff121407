//! A test driver of the IKEv2 engine (`bitw_control::ike::sa`) over real UDP
//! sockets, for interop tests against strongSwan (tests/test_ike_engine_interop.py).
//!
//! Authentication: `--psk-file FILE`, or certificates with `--cert FILE`
//! (PEM, ours then intermediates), `--key FILE` (PEM private key) and `--ca
//! FILE[,FILE...]` (the CAs the peer's certificate must chain to). IDs:
//! an address, user@host (e-mail), `dn:HEX` (a DER distinguished name), or
//! an FQDN.
//!
//! It binds UDP 500 and 4500 on `--local`, strips / adds the non-ESP marker
//! on 4500, runs one IKE SA as responder or initiator and prints one JSON line
//! per event on stdout. THIS IS A TEST TOOL: it prints the Child SA's ESP keys
//! so that the test can compare them with charon's log.
//!
//! Options beyond the connection: `--child NAME` (the Child SA's name,
//! default `ike_peer`), `--rekey-ike-at S` / `--rekey-child-at S` (rekey the
//! IKE SA / the first Child SA S seconds after the first Child SA is up),
//! `--liveness-at S` (a liveness check then), `--dpd S` and `--keepalive S`
//! (the engine's timers).
//!
//! Exit status: 0 once the first Child SA is established and `--linger`
//! seconds of answering have passed (or the peer deleted the SA in that
//! time); 1 when the engine fails or `--timeout` passes first; 2 on bad
//! arguments.

use std::io::{ErrorKind, Write};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use bitw_control::ike::message::{AddressRange, TsRange};
use bitw_control::ike::proposal::{parse_proposals, Protocol};
use bitw_control::ike::sa::{
    prefix_selector, Auth, ChildConfig, ChildMode, Config, Datagram, Identity, IkeEvent, IkeSa,
    Psk, PubkeyAuth, RandomSpis, Retransmit, NAT_KEEPALIVE,
};
use rand_core::OsRng;
use serde_json::{json, Value};

const IKE_PORT: u16 = 500;
const NAT_T_PORT: u16 = 4500;
const NON_ESP_MARKER: [u8; 4] = [0; 4];

struct Args {
    initiator: bool,
    local: IpAddr,
    remote: IpAddr,
    local_id: Identity,
    remote_id: Identity,
    auth: Auth,
    ike_proposals: String,
    esp_proposals: String,
    local_ts: TsRange,
    remote_ts: TsRange,
    timeout: Duration,
    linger: Duration,
    child: String,
    rekey_ike_at: Option<Duration>,
    rekey_child_at: Option<Duration>,
    liveness_at: Option<Duration>,
    dpd: Option<Duration>,
    keepalive: Option<Duration>,
}

fn identity(s: &str) -> Result<Identity> {
    if let Some(der) = s.strip_prefix("dn:") {
        return Ok(Identity::DerDn(
            hex::decode(der).with_context(|| format!("bad DN hex in {s:?}"))?,
        ));
    }
    Ok(match s.parse::<IpAddr>() {
        Ok(IpAddr::V4(a)) => Identity::Ipv4(a),
        Ok(IpAddr::V6(a)) => Identity::Ipv6(a),
        Err(_) if s.contains('@') => Identity::Rfc822(s.to_string()),
        Err(_) => Identity::Fqdn(s.to_string()),
    })
}

fn cidr(s: &str) -> Result<TsRange> {
    let (addr, len) = match s.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (s, None),
    };
    let addr: IpAddr = addr
        .parse()
        .with_context(|| format!("bad address in {s:?}"))?;
    let len = match len {
        Some(l) => l
            .parse()
            .with_context(|| format!("bad prefix length in {s:?}"))?,
        None if addr.is_ipv4() => 32,
        None => 128,
    };
    prefix_selector(addr, len).ok_or_else(|| anyhow!("prefix too long in {s:?}"))
}

fn secs(s: &str) -> Result<Duration> {
    Duration::try_from_secs_f64(s.parse().with_context(|| format!("bad seconds {s:?}"))?)
        .map_err(|e| anyhow!("bad seconds {s:?}: {e}"))
}

fn parse_args() -> Result<Args> {
    let mut it = std::env::args().skip(1);
    let mut get = std::collections::BTreeMap::new();
    while let Some(k) = it.next() {
        let Some(name) = k.strip_prefix("--") else {
            bail!("unexpected argument {k:?}");
        };
        let v = it.next().ok_or_else(|| anyhow!("--{name} needs a value"))?;
        get.insert(name.to_string(), v);
    }
    let mut take = |k: &str| get.remove(k).ok_or_else(|| anyhow!("--{k} is required"));
    let role = take("role")?;
    let initiator = match role.as_str() {
        "initiator" => true,
        "responder" => false,
        _ => bail!("--role must be initiator or responder, not {role:?}"),
    };
    let auth = match (take("psk-file"), take("cert")) {
        (Ok(psk_file), Err(_)) => {
            let mut psk =
                std::fs::read(&psk_file).with_context(|| format!("reading {psk_file}"))?;
            while psk.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                psk.pop();
            }
            Auth::Psk(Psk::new(psk))
        }
        (Err(_), Ok(cert)) => {
            let key = take("key")?;
            let cas: Vec<PathBuf> = take("ca")?.split(',').map(PathBuf::from).collect();
            let pubkey =
                PubkeyAuth::load(cert.as_ref(), key.as_ref(), &cas).map_err(|e| anyhow!(e))?;
            Auth::Pubkey(Arc::new(pubkey))
        }
        _ => bail!("give either --psk-file or --cert (with --key and --ca)"),
    };
    let args = Args {
        initiator,
        local: take("local")?.parse().context("--local")?,
        remote: take("remote")?.parse().context("--remote")?,
        local_id: identity(&take("local-id")?)?,
        remote_id: identity(&take("remote-id")?)?,
        auth,
        ike_proposals: take("ike-proposals")?,
        esp_proposals: take("esp-proposals")?,
        local_ts: cidr(&take("local-ts")?)?,
        remote_ts: cidr(&take("remote-ts")?)?,
        timeout: take("timeout").map_or(Ok(Duration::from_secs(10)), |s| secs(&s))?,
        linger: take("linger").map_or(Ok(Duration::from_secs(1)), |s| secs(&s))?,
        child: take("child").unwrap_or_else(|_| "ike_peer".to_string()),
        rekey_ike_at: take("rekey-ike-at").ok().map(|s| secs(&s)).transpose()?,
        rekey_child_at: take("rekey-child-at").ok().map(|s| secs(&s)).transpose()?,
        liveness_at: take("liveness-at").ok().map(|s| secs(&s)).transpose()?,
        dpd: take("dpd").ok().map(|s| secs(&s)).transpose()?,
        keepalive: take("keepalive").ok().map(|s| secs(&s)).transpose()?,
    };
    if let Some(k) = get.keys().next() {
        bail!("unknown option --{k}");
    }
    Ok(args)
}

fn ts_json(ts: &[TsRange]) -> Value {
    ts.iter()
        .map(|t| {
            let (start, end) = match t.addresses {
                AddressRange::V4 { start, end } => (start.to_string(), end.to_string()),
                AddressRange::V6 { start, end } => (start.to_string(), end.to_string()),
            };
            json!({"start": start, "end": end, "protocol": t.ip_protocol,
                   "start_port": t.start_port, "end_port": t.end_port})
        })
        .collect()
}

fn emit(v: Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

fn event_json(ev: &IkeEvent, t0: Instant) -> Value {
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    match ev {
        IkeEvent::IkeSaEstablished {
            local_id,
            remote_id,
            suite,
            spi_i,
            spi_r,
            initiator,
            local,
            remote,
            nat_detected,
            initial_contact,
        } => json!({
            "event": "ike_sa_established", "ms": ms,
            "local_id": local_id.to_string(), "remote_id": remote_id.to_string(),
            "suite": format!(
                "{}{}-{}-{}",
                suite.encryption.name(),
                suite.integrity.map(|i| format!("-{}", i.name())).unwrap_or_default(),
                suite.prf.name(),
                suite.dh.name()
            ),
            "spi_i": format!("{spi_i:016x}"), "spi_r": format!("{spi_r:016x}"),
            "initiator": initiator, "local": local.to_string(), "remote": remote.to_string(),
            "nat_detected": nat_detected, "initial_contact": initial_contact,
        }),
        IkeEvent::ChildSaEstablished(c) => json!({
            "event": "child_sa_established", "ms": ms, "name": c.name,
            "mode": format!("{:?}", c.mode).to_lowercase(),
            "inbound_spi": format!("{:08x}", c.inbound_spi),
            "outbound_spi": format!("{:08x}", c.outbound_spi),
            "aead": c.aead.name(), "esn": c.esn,
            "inbound_key": hex::encode(c.inbound_keys.encryption.as_bytes()),
            "outbound_key": hex::encode(c.outbound_keys.encryption.as_bytes()),
            "local_ts": ts_json(&c.local_ts), "remote_ts": ts_json(&c.remote_ts),
            "udp_encap": c.udp_encap.map(|u| json!({"local_port": u.local_port,
                                                     "remote_port": u.remote_port})),
            "local": c.local.to_string(), "remote": c.remote.to_string(),
        }),
        IkeEvent::ChildSaFailed { name, reason } => {
            json!({"event": "child_sa_failed", "ms": ms, "name": name, "reason": reason})
        }
        IkeEvent::ChildSaDeleted {
            name,
            inbound_spi,
            outbound_spi,
        } => json!({
            "event": "child_sa_deleted", "ms": ms, "name": name,
            "inbound_spi": format!("{inbound_spi:08x}"),
            "outbound_spi": format!("{outbound_spi:08x}"),
        }),
        IkeEvent::Failed { reason, detail } => {
            json!({"event": "failed", "ms": ms, "reason": reason, "detail": detail})
        }
        IkeEvent::Deleted => json!({"event": "deleted", "ms": ms}),
        IkeEvent::IkeSaRekeyed { old_spis, new_spis } => json!({
            "event": "ike_sa_rekeyed", "ms": ms,
            "old_spi_i": format!("{:016x}", old_spis.0), "old_spi_r": format!("{:016x}", old_spis.1),
            "spi_i": format!("{:016x}", new_spis.0), "spi_r": format!("{:016x}", new_spis.1),
        }),
        IkeEvent::Rejected { reason, detail } => {
            json!({"event": "rejected", "ms": ms, "reason": reason, "detail": detail})
        }
    }
}

fn run(args: Args) -> Result<bool> {
    let config = Config {
        name: "ike_peer".to_string(),
        local_id: args.local_id.clone(),
        remote_id: args.remote_id.clone(),
        send_remote_id: true,
        send_initial_contact: true,
        auth: args.auth.clone(),
        ike_proposals: parse_proposals(Protocol::Ike, &args.ike_proposals)
            .context("--ike-proposals")?,
        children: vec![ChildConfig {
            name: args.child.clone(),
            esp_proposals: parse_proposals(Protocol::Esp, &args.esp_proposals)
                .context("--esp-proposals")?,
            local_ts: vec![args.local_ts],
            remote_ts: vec![args.remote_ts],
            mode: ChildMode::Tunnel,
            rekey_time: None,
            life_time: None,
        }],
        ike_rekey_time: None,
        dpd_delay: args.dpd,
        keepalive_interval: args.keepalive,
        retransmit: Retransmit {
            timeout: Duration::from_millis(500),
            backoff: 1.5,
            tries: 5,
        },
    };
    let s500 = UdpSocket::bind(SocketAddr::new(args.local, IKE_PORT)).context("bind 500")?;
    let s4500 = UdpSocket::bind(SocketAddr::new(args.local, NAT_T_PORT)).context("bind 4500")?;
    for s in [&s500, &s4500] {
        s.set_nonblocking(true)?;
    }
    let local = SocketAddr::new(args.local, IKE_PORT);
    let remote = SocketAddr::new(args.remote, IKE_PORT);
    let t0 = Instant::now();
    let deadline = t0 + args.timeout;
    let mut sa = if args.initiator {
        IkeSa::initiate(
            Instant::now(),
            config,
            &args.child,
            local,
            remote,
            Box::new(OsRng),
            Box::new(RandomSpis(OsRng)),
        )
    } else {
        IkeSa::responder(
            config,
            local,
            remote,
            Box::new(OsRng),
            Box::new(RandomSpis(OsRng)),
        )
    };
    emit(
        json!({"event": "started", "role": if args.initiator {"initiator"} else {"responder"},
                "local": args.local.to_string(), "remote": args.remote.to_string()}),
    );
    let mut done_at: Option<Instant> = None;
    // The first Child SA: when it came up, and its inbound SPI.
    let mut first_child: Option<(Instant, u32)> = None;
    let mut actions = [
        (args.rekey_ike_at, "rekey_ike"),
        (args.rekey_child_at, "rekey_child"),
        (args.liveness_at, "liveness"),
    ]
    .into_iter()
    .filter_map(|(at, what)| at.map(|at| (at, what)))
    .collect::<Vec<_>>();
    let mut buf = vec![0u8; 65536];
    loop {
        // send what the engine queued
        while let Some(d) = sa.poll_transmit() {
            let (sock, payload) = if d.payload == [NAT_KEEPALIVE] {
                // RFC 3948 §2.3: a keepalive goes without the non-ESP marker.
                (&s4500, d.payload)
            } else if d.src.port() == NAT_T_PORT || d.dst.port() == NAT_T_PORT {
                let mut p = NON_ESP_MARKER.to_vec();
                p.extend_from_slice(&d.payload);
                (&s4500, p)
            } else {
                (&s500, d.payload)
            };
            if let Err(e) = sock.send_to(&payload, d.dst) {
                eprintln!("ike_peer: send to {} failed: {e}", d.dst);
            }
        }
        // report events
        while let Some(ev) = sa.poll_event() {
            emit(event_json(&ev, t0));
            match ev {
                IkeEvent::ChildSaEstablished(c) if done_at.is_none() => {
                    done_at = Some(Instant::now() + args.linger);
                    first_child = Some((Instant::now(), c.inbound_spi));
                }
                IkeEvent::Failed { .. } => return Ok(false),
                IkeEvent::Deleted => return Ok(done_at.is_some()),
                _ => {}
            }
        }
        let now = Instant::now();
        if let Some((up, spi)) = first_child {
            actions.retain(|(at, what)| {
                if now < up + *at {
                    return true;
                }
                let ok = match *what {
                    "rekey_ike" => sa.rekey_ike(now),
                    "rekey_child" => sa.rekey_child(now, spi),
                    _ => sa.send_liveness_check(now),
                };
                emit(json!({"event": "action", "action": what, "ok": ok,
                            "ms": t0.elapsed().as_secs_f64() * 1e3}));
                false
            });
        }
        if let Some(at) = done_at {
            if now >= at {
                return Ok(true);
            }
        } else if now >= deadline {
            emit(json!({"event": "timeout", "ms": t0.elapsed().as_secs_f64() * 1e3}));
            return Ok(false);
        }
        if sa.poll_timeout().is_some_and(|t| now >= t) {
            sa.handle_timeout(now);
            continue;
        }
        // receive from either socket
        let mut got = false;
        for (sock, port) in [(&s500, IKE_PORT), (&s4500, NAT_T_PORT)] {
            match sock.recv_from(&mut buf) {
                Ok((n, src)) => {
                    got = true;
                    let data = &buf[..n];
                    let payload = if port == NAT_T_PORT {
                        match data.strip_prefix(&NON_ESP_MARKER) {
                            Some(p) => p,
                            None => continue, // ESP in UDP: not ours here
                        }
                    } else {
                        data
                    };
                    let dst = SocketAddr::new(args.local, port);
                    sa.handle(
                        Instant::now(),
                        Datagram {
                            src,
                            dst,
                            payload: payload.to_vec(),
                        },
                    );
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => eprintln!("ike_peer: recv on {port}: {e}"),
            }
        }
        if !got {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("ike_peer: {e:#}");
            return ExitCode::from(2);
        }
    };
    match run(args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            emit(json!({"event": "error", "detail": format!("{e:#}")}));
            ExitCode::from(1)
        }
    }
}
