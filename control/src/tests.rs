//! The control process end to end against [`crate::fake_dataplane`]:
//! reconcile, reload, adoption, admin changes, events, the link, metrics.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bitw_common::channel::Endpoint;
use bitw_common::config::Config;
use bitw_common::proto::{
    Acquire, DefaultActionName, Event, ExpireReason, Mac, Neighbor, Origin, PolicySpec, PortName,
    Request, RuleSpec, SaChange, SaInfo, SaSpec,
};
use bitw_common::rules::Direction;
use crossbeam_channel::unbounded;

use crate::admin::{
    self, AdminRequest, AdminResponse, ChangeResult, CountersInfo, ErrorKind, PolicyEntry, SaEntry,
    StatusInfo, TerminalsInfo,
};
use crate::daemon::Daemon;
use crate::desired::Desired;
use crate::fake_dataplane::FakeDp;
use crate::link::{self, LinkCmd, LinkConfig, LinkEvent};
use crate::metrics::Metrics;

const KEY_A: &str = "000102030405060708090a0b0c0d0e0f10111213\n";
const KEY_B: &str = "101112131415161718191a1b1c1d1e1f20212223\n";

struct Env {
    dir: PathBuf,
    cfg: PathBuf,
    dp: PathBuf,
    ctl: PathBuf,
}

impl Env {
    fn new(tag: &str) -> Env {
        let dir = std::env::temp_dir().join(format!("bitwc-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let e = Env {
            cfg: dir.join("bitw.toml"),
            dp: dir.join("dp.sock"),
            ctl: dir.join("ctl.sock"),
            dir,
        };
        e.key("a.key", KEY_A);
        e.key("b.key", KEY_B);
        e.write_config("");
        e
    }

    fn key(&self, name: &str, text: &str) {
        let p = self.dir.join(name);
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    }

    fn write_config(&self, extra: &str) {
        let d = self.dir.display();
        std::fs::write(
            &self.cfg,
            format!(
                r#"[ports.inside]
device = "net_null0"
[ports.outside]
device = "net_null1"

[control]
socket = "{d}/dp.sock"
admin_socket = "{d}/ctl.sock"
metrics_listen = "127.0.0.1:0"
ping_interval = "500ms"
reconnect_interval = "50ms"

[[terminal]]
name = "meter"
address = "10.0.0.7"

[[policy]]
name = "to-hq"
direction = "out"
src = "10.0.0.0/24"
dst = "10.1.0.0/16"
action = "protect"
sa = "a"

[[policy]]
name = "from-hq"
direction = "in"
src = "10.1.0.0/16"
dst = "10.0.0.0/24"
action = "protect"
sa = "b"

[[sa]]
name = "a"
direction = "out"
spi = "0x1001"
mode = "transport"
aead = "aes128gcm16"
key_file = "{d}/a.key"

[[sa]]
name = "b"
direction = "in"
spi = "0x2001"
mode = "transport"
aead = "aes128gcm16"
key_file = "{d}/b.key"
{extra}"#
            ),
        )
        .unwrap();
    }

    fn config(&self) -> Config {
        Config::load(&self.cfg).unwrap()
    }

    fn call(&self, req: AdminRequest) -> AdminResponse {
        admin::call(&self.ctl, &req, Duration::from_secs(10)).unwrap()
    }

    fn ok<T: serde::de::DeserializeOwned>(&self, req: AdminRequest) -> T {
        let r = self.call(req);
        assert!(r.ok, "{r:?}");
        serde_json::from_value(r.data).unwrap()
    }

    fn status(&self) -> StatusInfo {
        self.ok(AdminRequest::Status)
    }

    fn wait_reconciled(&self, instance: &str) {
        wait("reconciled", || {
            let s = self.status();
            s.dataplane.reconciled && s.dataplane.instance.as_deref() == Some(instance)
        });
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn wait(what: &str, f: impl Fn() -> bool) {
    let until = Instant::now() + Duration::from_secs(10);
    while Instant::now() < until {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("timed out waiting for {what}");
}

fn rule_names(p: &Option<PolicySpec>) -> Vec<String> {
    p.as_ref()
        .map(|p| p.rules.iter().map(|r| r.name.clone()).collect())
        .unwrap_or_default()
}

fn sa_spec(name: &str, direction: Direction, spi: u32, key: &str) -> SaSpec {
    SaSpec {
        name: name.into(),
        direction,
        spi,
        mode: "transport".into(),
        tunnel_src: None,
        tunnel_dst: None,
        encap: "none".into(),
        udp_sport: 4500,
        udp_dport: 4500,
        aead: "aes128gcm16".into(),
        key: zeroize::Zeroizing::new(key.trim().into()),
        esn: true,
        replay_window: if direction == Direction::In { 1024 } else { 0 },
        lifetime_packets: Default::default(),
        lifetime_bytes: Default::default(),
        origin: Origin::Admin,
        policy: None,
    }
}

#[test]
fn reconcile_then_reload_applies_only_the_difference() {
    let env = Env::new("reload");
    let dp = FakeDp::start(&env.dp);
    let daemon = Daemon::start(env.config()).unwrap();
    dp.wait_for("config installed", |s| {
        s.sas.len() == 2 && s.policy.is_some() && !s.punt_addrs.is_empty()
    });
    env.wait_reconciled("fake-1");
    {
        let s = dp.state();
        assert_eq!(s.batches.len(), 1, "one batch for the whole reconcile");
        assert_eq!(rule_names(&s.policy), ["to-hq", "from-hq"]);
        assert_eq!(s.punt_addrs, ["10.0.0.7".parse::<IpAddr>().unwrap()]);
        assert!(s.sas.iter().all(|x| x.origin == Origin::Config));
    }
    // Traffic moved SA a on.
    {
        let mut s = dp.state();
        let a = s.sas.iter_mut().find(|x| x.name == "a").unwrap();
        a.packets = 10;
        a.sequence = 10;
    }
    let list: Vec<SaEntry> = env.ok(AdminRequest::SaList);
    let a = list.iter().find(|e| e.name == "a").unwrap();
    assert_eq!(
        (a.packets, a.sequence, a.state.as_str()),
        (Some(10), Some(10), "installed")
    );
    // New key for b: only b is replaced; a keeps its counters and sequence.
    env.key("b.key", "aa1112131415161718191a1b1c1d1e1f20212223\n");
    let r: ChangeResult = env.ok(AdminRequest::Reload);
    assert_eq!(r.dataplane, "applied", "{r:?}");
    assert_eq!(
        (
            r.sas_installed,
            r.sas_replaced,
            r.sas_unchanged,
            r.sas_removed
        ),
        (0, 1, 1, 0),
        "{r:?}"
    );
    assert_eq!(r.applied.unwrap().sas_replaced, 1);
    {
        let s = dp.state();
        let last = s.batches.last().unwrap();
        assert!(
            matches!(&last.sas[..], [SaChange::Install(x)] if x.name == "b"),
            "{last:?}"
        );
        assert!(last.policy.is_none() && last.punt_addrs.is_none());
        let a = s.sas.iter().find(|x| x.name == "a").unwrap();
        assert_eq!(
            (a.packets, a.sequence),
            (10, 10),
            "unchanged SA kept its state"
        );
    }
    // Nothing changed: nothing sent.
    let n = dp.state().batches.len();
    let r: ChangeResult = env.ok(AdminRequest::Reload);
    assert_eq!(r.dataplane, "unchanged");
    assert_eq!(dp.state().batches.len(), n);
    // A broken config: refused with file/line/field, the old one keeps running.
    std::fs::write(&env.cfg, "[ports.inside]\ndevice = \"x\"\n[ports.outside]\ndevice = \"y\"\n[[policy]]\nname = \"p\"\ndirection = \"sideways\"\naction = \"bypass\"\n").unwrap();
    let r = env.call(AdminRequest::Reload);
    assert_eq!(r.error_kind, Some(ErrorKind::Config));
    let msg = r.error.unwrap();
    assert!(
        msg.contains("bitw.toml:7") && msg.contains("sideways"),
        "{msg}"
    );
    let st = env.status();
    assert!(!st.last_reload.as_ref().unwrap().ok);
    assert_eq!((st.sas.total, st.rules), (2, 2));
    assert_eq!(dp.state().batches.len(), n);
    // SIGHUP's path: a reload with nobody to answer.
    env.write_config("");
    daemon.reload();
    wait("SIGHUP reload", || {
        env.status().last_reload.is_some_and(|r| r.ok)
    });
    daemon.stop();
    assert!(!env.ctl.exists(), "admin socket removed on stop");
}

#[test]
fn control_restart_adopts_and_dataplane_restart_reinstalls() {
    let env = Env::new("adopt");
    let cfg = env.config();
    let dp = FakeDp::start(&env.dp);
    // What a dataplane holds after a control that is gone: config SAs, an
    // admin SA and an admin rule between the config rules.
    {
        let mut s = dp.state();
        for p in &cfg.sas {
            s.sas
                .push(SaInfo::from_spec(&SaSpec::from_params(p, Origin::Config)));
        }
        s.sas[0].packets = 5;
        s.sas[0].sequence = 5;
        s.sas.push(SaInfo::from_spec(&sa_spec(
            "adm",
            Direction::Out,
            0x3001,
            KEY_A,
        )));
        let d = Desired::from_config(&cfg);
        let mut rules: Vec<RuleSpec> = d.rules.iter().map(|r| r.spec.clone()).collect();
        let mut adm = rules[0].clone();
        adm.name = "adm-rule".into();
        adm.sa = Some("adm".into());
        adm.origin = Origin::Admin;
        rules.insert(1, adm);
        s.policy = Some(PolicySpec {
            rules,
            default_action: DefaultActionName::Bypass,
        });
        s.punt_addrs = vec!["10.0.0.7".parse().unwrap()];
    }
    let daemon = Daemon::start(cfg).unwrap();
    env.wait_reconciled("fake-1");
    assert!(
        dp.state().batches.is_empty(),
        "nothing differed: nothing sent"
    );
    let st = env.status();
    assert_eq!((st.sas.total, st.sas.admin, st.sas.adopted), (3, 1, 1));
    let list: Vec<SaEntry> = env.ok(AdminRequest::SaList);
    let adm = list.iter().find(|e| e.name == "adm").unwrap();
    assert!(adm.adopted && adm.state == "installed" && adm.lifetime_packets.is_none());
    assert_eq!(
        list.iter().find(|e| e.name == "a").unwrap().sequence,
        Some(5)
    );
    let pol: Vec<PolicyEntry> = env.ok(AdminRequest::PolicyList);
    let order: Vec<&str> = pol.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(order, ["to-hq", "adm-rule", "from-hq"]);
    assert!(pol[1].adopted && pol[1].origin == "admin");
    // The dataplane restarts empty: everything control can re-install comes
    // back; the adopted SA cannot (no key) and is dropped.
    dp.restart("fake-2");
    env.wait_reconciled("fake-2");
    {
        let s = dp.state();
        let mut names: Vec<&str> = s.sas.iter().map(|x| x.name.as_str()).collect();
        names.sort();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(rule_names(&s.policy), ["to-hq", "adm-rule", "from-hq"]);
        assert_eq!(s.punt_addrs.len(), 1);
    }
    let st = env.status();
    assert_eq!(
        (st.sas.total, st.sas.adopted, st.dataplane.connects),
        (2, 0, 2)
    );
    daemon.stop();
}

#[test]
fn admin_changes_go_through_and_dataplane_errors_come_back_verbatim() {
    let env = Env::new("admin");
    let dp = FakeDp::start(&env.dp);
    let daemon = Daemon::start(env.config()).unwrap();
    env.wait_reconciled("fake-1");
    let r: ChangeResult = env.ok(AdminRequest::SaAdd {
        sa: sa_spec("c", Direction::Out, 0x3001, KEY_A),
    });
    assert_eq!(r.dataplane, "applied");
    assert!(dp
        .state()
        .sas
        .iter()
        .any(|x| x.name == "c" && x.origin == Origin::Admin));
    let dup = env.call(AdminRequest::SaAdd {
        sa: sa_spec("c", Direction::Out, 0x3002, KEY_A),
    });
    assert_eq!(dup.error_kind, Some(ErrorKind::Refused));
    let mut rule = RuleSpec {
        name: "c-rule".into(),
        direction: Direction::Out,
        src: "10.0.5.0/24".into(),
        dst: "any".into(),
        proto: "udp".into(),
        sport: "any".into(),
        dport: "53".into(),
        action: "protect".into(),
        sa: Some("c".into()),
        origin: Origin::Admin,
    };
    let _: ChangeResult = env.ok(AdminRequest::PolicyAdd {
        rule: rule.clone(),
        before: Some("from-hq".into()),
        position: None,
    });
    assert_eq!(
        rule_names(&dp.state().policy),
        ["to-hq", "c-rule", "from-hq"]
    );
    rule.name = "later-rule".into();
    rule.sa = Some("later".into());
    let r: ChangeResult = env.ok(AdminRequest::PolicyAdd {
        rule,
        before: None,
        position: None,
    });
    assert!(
        r.notes.iter().any(|n| n.contains("held and acquired")),
        "{r:?}"
    );
    // The dataplane refuses: its message, verbatim; control keeps nothing of it.
    dp.state().reject_apply = Some("SA `d`: the dataplane says no".into());
    let r = env.call(AdminRequest::SaAdd {
        sa: sa_spec("d", Direction::Out, 0x3003, KEY_A),
    });
    assert_eq!(r.error_kind, Some(ErrorKind::Dataplane));
    assert_eq!(r.error.as_deref(), Some("SA `d`: the dataplane says no"));
    let r = env.call(AdminRequest::SaShow {
        name: "d".into(),
        direction: None,
    });
    assert_eq!(r.error_kind, Some(ErrorKind::Refused));
    // Deleting a config SA works, with a warning; a reload brings it back and
    // keeps the admin additions where they were.
    let r: ChangeResult = env.ok(AdminRequest::SaDel {
        name: "a".into(),
        direction: None,
    });
    assert!(
        r.notes
            .iter()
            .any(|n| n.contains("comes back on the next reload")),
        "{r:?}"
    );
    assert!(!dp.state().sas.iter().any(|x| x.name == "a"));
    let _: ChangeResult = env.ok(AdminRequest::Reload);
    {
        let s = dp.state();
        let mut names: Vec<&str> = s.sas.iter().map(|x| x.name.as_str()).collect();
        names.sort();
        assert_eq!(names, ["a", "b", "c"]);
        assert_eq!(
            rule_names(&s.policy),
            ["to-hq", "c-rule", "from-hq", "later-rule"]
        );
    }
    let shown: Vec<SaEntry> = env.ok(AdminRequest::SaShow {
        name: "c".into(),
        direction: Some(Direction::Out),
    });
    assert_eq!(
        (shown[0].spi_hex.as_str(), shown[0].origin.as_str()),
        ("0x00003001", "admin")
    );
    assert_eq!(shown[0].rules, ["c-rule"]);
    let _: ChangeResult = env.ok(AdminRequest::PolicyDel {
        name: "c-rule".into(),
    });
    assert_eq!(
        rule_names(&dp.state().policy),
        ["to-hq", "from-hq", "later-rule"]
    );
    let c: CountersInfo = env.ok(AdminRequest::Counters);
    assert_eq!(
        c.drops["malformed"], 4,
        "totals over workers: {:?}",
        c.drops
    );
    assert_eq!(c.stats.sa_count, 3);
    // With the dataplane gone a change is taken and applied on reconnect.
    drop(dp);
    wait("link down", || env.status().dataplane.state == "down");
    let r: ChangeResult = env.ok(AdminRequest::PolicyDel {
        name: "later-rule".into(),
    });
    assert_eq!(r.dataplane, "pending");
    let dp = FakeDp::start(&env.dp);
    env.wait_reconciled("fake-1");
    assert_eq!(rule_names(&dp.state().policy), ["to-hq", "from-hq"]);
    assert_eq!(dp.state().sas.len(), 3);
    daemon.stop();
}

#[test]
fn events_are_counted_and_unknown_acquires_fail() {
    let env = Env::new("events");
    let dp = FakeDp::start(&env.dp);
    let daemon = Daemon::start(env.config()).unwrap();
    env.wait_reconciled("fake-1");
    let acquire = |sa: &str| {
        Event::Acquire(Acquire {
            sa: sa.into(),
            rule: "r".into(),
            direction: Direction::Out,
            src: "10.0.0.7".parse().unwrap(),
            dst: "10.1.0.1".parse().unwrap(),
            proto: 6,
            sport: 1234,
            dport: 80,
        })
    };
    // `later` is named by a rule an administrator added: its packets wait.
    let mut later = Desired::from_config(&env.config()).rules[0].spec.clone();
    later.name = "later-rule".into();
    later.sa = Some("later".into());
    let _: ChangeResult = env.ok(AdminRequest::PolicyAdd {
        rule: later,
        before: None,
        position: None,
    });
    dp.push_event(acquire("later"));
    dp.push_event(acquire("zz"));
    dp.push_event(acquire("a"));
    dp.push_event(Event::Expire {
        sa: "a".into(),
        direction: Direction::Out,
        spi: 0x1001,
        reason: ExpireReason::HardLifetime,
    });
    dp.push_event(Event::Learned(Neighbor {
        port: PortName::Inside,
        ip: "10.0.0.7".parse().unwrap(),
        mac: "02:00:00:00:00:07".parse::<Mac>().unwrap(),
    }));
    dp.push_event(Event::HoldDropped {
        sa: "zz".into(),
        packets: 3,
        reason: "acquire failed".into(),
    });
    wait("events", || env.status().hold_dropped_packets == 3);
    dp.wait_for("AcquireFailed", |s| s.acquire_failed == ["zz"]);
    let st = env.status();
    assert_eq!(st.acquires, 3);
    assert_eq!(
        dp.state().acquire_failed,
        ["zz"],
        "only the SA nobody names"
    );
    assert_eq!(st.expires["hard_lifetime"], 1);
    let known: Vec<(&str, bool)> = st
        .acquired_sas
        .iter()
        .map(|a| (a.sa.as_str(), a.known))
        .collect();
    assert!(
        known.contains(&("zz", false))
            && known.contains(&("a", true))
            && known.contains(&("later", true)),
        "{known:?}"
    );
    let t: TerminalsInfo = env.ok(AdminRequest::Terminals);
    assert_eq!(t.terminals[0].mac.as_deref(), Some("02:00:00:00:00:07"));
    assert_eq!(t.neighbors[0].terminal.as_deref(), Some("meter"));
    // An admin adds the missing SA: installed normally.
    let _: ChangeResult = env.ok(AdminRequest::SaAdd {
        sa: sa_spec("zz", Direction::Out, 0x4001, KEY_B),
    });
    assert!(dp.state().sas.iter().any(|x| x.name == "zz"));
    daemon.stop();
}

fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: test\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map_or("", |b| b.1).to_string();
    (status, body)
}

#[test]
fn metrics_over_http_follow_the_link() {
    let env = Env::new("metrics");
    let dp = FakeDp::start(&env.dp);
    let daemon = Daemon::start(env.config()).unwrap();
    env.wait_reconciled("fake-1");
    let addr = daemon.metrics_addr.unwrap();
    wait("a ping", || dp.state().pings > 0);
    let (code, body) = http_get(addr, "/metrics");
    assert_eq!(code, 200);
    for needle in [
        "bitw_dataplane_up 1",
        "bitw_control_channel_connects_total 1",
        "bitw_sas{direction=\"out\"} 1",
        "bitw_sas{direction=\"in\"} 1",
        "bitw_sa_installs_total 2",
        "bitw_sa_install_seconds_count 1",
        "bitw_sa_install_quantile_seconds{quantile=\"0.99\"}",
        "bitw_port_packets_total{direction=\"rx\",port=\"inside\"} 200",
        "bitw_sa_packets_total{direction=\"out\",sa=\"a\",spi=\"0x00001001\"} 0",
        "bitw_sa_series_limited 0",
        "bitw_terminals 1",
        "bitw_config_last_reload_success_timestamp_seconds",
    ] {
        assert!(body.contains(needle), "{needle} missing in:\n{body}");
    }
    assert!(!body.contains(&KEY_A[..16]), "keys never appear in metrics");
    crate::metrics::tests::check_with_promtool(&body);
    assert_eq!(http_get(addr, "/nope").0, 404);
    let (code, index) = http_get(addr, "/");
    assert!(code == 200 && index.contains("/metrics"));
    drop(dp);
    wait("down in metrics", || {
        let (_, b) = http_get(addr, "/metrics");
        b.contains("bitw_dataplane_up 0") && !b.contains("bitw_port_packets_total")
    });
    let (_, body) = http_get(addr, "/metrics");
    assert!(
        body.contains("bitw_control_channel_disconnects_total 1"),
        "{body}"
    );
    daemon.stop();
}

#[test]
fn link_handshake_refusal_reconnect_and_silence() {
    let env = Env::new("link");
    let (cmd_tx, cmd_rx) = unbounded();
    let (ev_tx, ev_rx) = unbounded();
    let stop = Arc::new(AtomicBool::new(false));
    let cfg = LinkConfig {
        endpoint: Endpoint::Unix(env.dp.clone()),
        tls: None,
        ping_interval: Duration::from_millis(200),
        reconnect_interval: Duration::from_millis(20),
        software: "test".into(),
    };
    let s = stop.clone();
    let t = std::thread::spawn(move || link::run(cfg, cmd_rx, ev_tx, Metrics::new(), s));
    let next = |want: &str| -> LinkEvent {
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            let left = until.saturating_duration_since(Instant::now());
            let ev = ev_rx
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no {want} event"));
            let name = format!("{ev:?}");
            if name.starts_with(want) {
                return ev;
            }
        }
    };
    // Nobody there yet.
    assert!(
        matches!(next("ConnectFailed"), LinkEvent::ConnectFailed { reason } if reason.contains("dp.sock"))
    );
    let dp = FakeDp::start(&env.dp);
    dp.state().refuse = Some("another control is connected".into());
    assert!(
        matches!(next("Refused"), LinkEvent::Refused { reason } if reason == "another control is connected")
    );
    dp.state().refuse = None;
    let LinkEvent::Up {
        session,
        instance,
        version,
        ..
    } = next("Up")
    else {
        unreachable!()
    };
    assert_eq!((session, instance.as_str(), version), (1, "fake-1", 1));
    // A request round trip, and one for an old session that must not be sent.
    cmd_tx
        .send(LinkCmd::Request {
            session: 1,
            token: 7,
            request: Request::GetState,
        })
        .unwrap();
    assert!(matches!(next("Reply"), LinkEvent::Reply { token: 7, .. }));
    cmd_tx
        .send(LinkCmd::Request {
            session: 99,
            token: 8,
            request: Request::GetState,
        })
        .unwrap();
    assert!(matches!(next("Failed"), LinkEvent::Failed { token: 8, .. }));
    assert!(matches!(next("Rtt"), LinkEvent::Rtt(_)));
    // The dataplane drops the connection: down, then up again as session 2.
    dp.state().drop_now = true;
    assert!(matches!(next("Down"), LinkEvent::Down { session: 1, .. }));
    assert!(matches!(next("Up"), LinkEvent::Up { session: 2, .. }));
    // A dataplane that stops answering is given up after three ping intervals.
    dp.state().silent = true;
    let started = Instant::now();
    let LinkEvent::Down { reason, .. } = next("Down") else {
        unreachable!()
    };
    assert!(reason.contains("ping"), "{reason}");
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "{:?}",
        started.elapsed()
    );
    dp.state().silent = false;
    assert!(matches!(next("Up"), LinkEvent::Up { session: 3, .. }));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    drop(cmd_tx);
    t.join().unwrap();
}

#[test]
fn a_second_control_is_refused() {
    let env = Env::new("twice");
    let daemon = Daemon::start(env.config()).unwrap();
    let e = Daemon::start(env.config()).err().unwrap();
    assert!(
        format!("{e:#}").contains("another bitw-control is running"),
        "{e:#}"
    );
    // With no dataplane: status says down, counters are refused.
    wait("down", || {
        env.status()
            .dataplane
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("dp.sock"))
    });
    let st = env.status();
    assert_eq!(st.dataplane.state, "down");
    assert!(st.held_packets.is_none());
    let r = env.call(AdminRequest::Counters);
    assert_eq!(r.error_kind, Some(ErrorKind::Dataplane));
    daemon.stop();
}

#[test]
fn reload_merge_keeps_admin_parts_and_their_places() {
    let env = Env::new("merge");
    let old = env.config();
    let d = Desired::from_config(&old);
    let mut rule = d.rules[0].spec.clone();
    rule.name = "adm-after-to-hq".into();
    rule.sa = Some("x".into());
    let (d, _) = d.add_rule(rule.clone(), Some("from-hq"), None).unwrap();
    rule.name = "adm-first".into();
    let (d, _) = d.add_rule(rule, None, Some(1)).unwrap();
    let (d, _) = d
        .add_sa(sa_spec("x", Direction::Out, 0x5001, KEY_A))
        .unwrap();
    let (d, _) = d
        .add_sa(sa_spec("y", Direction::Out, 0x6001, KEY_A))
        .unwrap();
    // The new config drops rule `to-hq` (the admin rule's anchor), adds a
    // rule at the end, and takes over SA `x` by name and y's SPI.
    let text = std::fs::read_to_string(&env.cfg).unwrap();
    let start = text.find("[[policy]]\nname = \"to-hq\"").unwrap();
    let end = text.find("[[policy]]\nname = \"from-hq\"").unwrap();
    let text = format!(
        "{}{}\n[[policy]]\nname = \"new\"\ndirection = \"out\"\naction = \"discard\"\n\n[[sa]]\nname = \"x\"\ndirection = \"out\"\nspi = \"0x7001\"\nmode = \"transport\"\naead = \"aes128gcm16\"\nkey_file = \"{d}/a.key\"\n\n[[sa]]\nname = \"z\"\ndirection = \"out\"\nspi = \"0x6001\"\nmode = \"transport\"\naead = \"aes128gcm16\"\nkey_file = \"{d}/a.key\"\n",
        &text[..start],
        &text[end..],
        d = env.dir.display()
    );
    std::fs::write(&env.cfg, text).unwrap();
    let new = env.config();
    let (merged, warnings) = d.with_config(&new);
    let order: Vec<&str> = merged.rules.iter().map(|r| r.spec.name.as_str()).collect();
    // `adm-after-to-hq` followed to-hq, which is gone: it stays at the front
    // of what remains, before from-hq, as it was.
    assert_eq!(order, ["adm-first", "adm-after-to-hq", "from-hq", "new"]);
    let x = merged.find_sa("x", Direction::Out).unwrap();
    assert_eq!((x.origin, x.spi()), (Origin::Config, 0x7001));
    assert!(
        merged.find_sa("y", Direction::Out).is_none(),
        "its SPI went to config SA z"
    );
    assert!(
        merged.find_sa("a", Direction::Out).is_some()
            && merged.find_sa("z", Direction::Out).is_some()
    );
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    assert!(warnings
        .iter()
        .any(|w| w.contains("`x`") && w.contains("config's parameters")));
    assert!(warnings
        .iter()
        .any(|w| w.contains("`y`") && w.contains("SPI")));
}

#[test]
fn ike_admin_requests_status_terminals_and_metrics() {
    use crate::admin::IkeSaInfo;
    let env = Env::new("ike");
    env.key("hq.psk", "a pre-shared key of some length\n");
    let d = env.dir.display();
    env.write_config(&format!(
        r#"
[[connection]]
name = "meter-hq"
terminal = "meter"
remote_addrs = ["198.51.100.1"]
local_id = "10.0.0.7"
remote_id = "198.51.100.1"
auth = "psk"
psk_file = "{d}/hq.psk"
start_action = "trap"

[[connection.children]]
name = "data"
mode = "tunnel"
local_ts = ["10.0.0.7/32"]
remote_ts = ["198.51.100.1/32"]
"#
    ));
    let dp = FakeDp::start(&env.dp);
    let daemon = Daemon::start(env.config()).unwrap();
    env.wait_reconciled("fake-1");
    let list = |env: &Env| env.ok::<Vec<IkeSaInfo>>(AdminRequest::IkeList);
    assert!(list(&env).is_empty());
    let s = env.status();
    assert_eq!(
        (s.ike.connections, s.ike.established, s.ike.connecting),
        (1, 0, 0)
    );
    let t: TerminalsInfo = env.ok(AdminRequest::Terminals);
    let c = &t.terminals[0].connections;
    assert_eq!(
        (c.len(), c[0].name.as_str(), c[0].ike.as_str()),
        (1, "meter-hq", "none")
    );

    // Unknown connection: refused (bitwctl exit 1).
    let r = env.call(AdminRequest::IkeInitiate {
        connection: "nope".into(),
    });
    assert_eq!(r.error_kind, Some(ErrorKind::Refused), "{r:?}");
    assert!(r.error.unwrap().contains("nope"));

    let r: crate::admin::IkeResult = env.ok(AdminRequest::IkeInitiate {
        connection: "meter-hq".into(),
    });
    assert!(r.message.contains("meter-hq"), "{}", r.message);
    let l = list(&env);
    assert_eq!(l.len(), 1);
    assert_eq!(
        (
            l[0].connection.as_str(),
            l[0].terminal.as_str(),
            l[0].state.as_str(),
            l[0].initiator
        ),
        ("meter-hq", "meter", "connecting", true)
    );
    assert!(l[0].local.starts_with("10.0.0.7") && l[0].remote.starts_with("198.51.100.1"));
    // The IKE_SA_INIT went to the dataplane to be injected.
    wait("the IKE_SA_INIT injected", || dp.state().injected > 0);
    // One IKE SA per connection.
    let r = env.call(AdminRequest::IkeInitiate {
        connection: "meter-hq".into(),
    });
    assert_eq!(r.error_kind, Some(ErrorKind::Refused), "{r:?}");
    let s = env.status();
    assert_eq!((s.ike.established, s.ike.connecting), (0, 1));
    let t: TerminalsInfo = env.ok(AdminRequest::Terminals);
    assert_eq!(t.terminals[0].connections[0].ike, "connecting");

    let addr = daemon.metrics_addr.unwrap();
    let (_, body) = http_get(addr, "/metrics");
    for needle in [
        "bitw_ike_connections 1",
        "bitw_ike_sas{state=\"connecting\"} 1",
        "bitw_ike_sas{state=\"established\"} 0",
        "bitw_ike_handshakes_total{result=\"ok\"} 0",
        "bitw_ike_handshake_duration_seconds_count 0",
        "bitw_ike_retransmits_total 0",
    ] {
        assert!(body.contains(needle), "{needle} missing in:\n{body}");
    }
    crate::metrics::tests::check_with_promtool(&body);

    // By id: an unknown one is refused; the connection's name works.
    let r = env.call(AdminRequest::IkeTerminate { name: "99".into() });
    assert_eq!(r.error_kind, Some(ErrorKind::Refused), "{r:?}");
    let id = l[0].id.to_string();
    let r: crate::admin::IkeResult = env.ok(AdminRequest::IkeTerminate { name: id });
    assert!(
        r.message.contains(&format!("#{}", l[0].id)),
        "{}",
        r.message
    );
    assert!(list(&env).is_empty());
    let (_, body) = http_get(addr, "/metrics");
    assert!(
        body.contains("bitw_ike_sas{state=\"connecting\"} 0"),
        "{body}"
    );
    daemon.stop();
}
