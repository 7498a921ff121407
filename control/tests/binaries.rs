//! The two binaries as an operator (or pytest) drives them: exit codes, log
//! lines, signals, the admin socket, and a minimal dataplane end built on
//! `channel::Listener`.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bitw_common::channel::{Endpoint, Listener};
use bitw_common::proto::{
    negotiate, Applied, DataplaneState, FromDataplane, Hello, HelloReply, Reply, Request, SaChange,
    ToDataplane,
};
use crossbeam_channel::{unbounded, Receiver};

const CONTROL: &str = env!("CARGO_BIN_EXE_bitw-control");
const CTL: &str = env!("CARGO_BIN_EXE_bitwctl");
const KEY: &str = "000102030405060708090a0b0c0d0e0f10111213";

struct Env {
    dir: PathBuf,
    cfg: PathBuf,
    ctl: PathBuf,
    dp: PathBuf,
}

impl Env {
    fn new(tag: &str) -> Env {
        let dir = std::env::temp_dir().join(format!("bitwb-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let e = Env {
            cfg: dir.join("bitw.toml"),
            ctl: dir.join("run/ctl.sock"),
            dp: dir.join("dp.sock"),
            dir,
        };
        e.key("a.key", 0o600);
        e.write_config();
        e
    }

    fn key(&self, name: &str, mode: u32) -> PathBuf {
        let p = self.dir.join(name);
        std::fs::write(&p, KEY).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    fn write_config(&self) {
        let d = self.dir.display();
        std::fs::write(
            &self.cfg,
            format!(
                "[ports.inside]\ndevice = \"net_null0\"\n[ports.outside]\ndevice = \"net_null1\"\n\
                 [control]\nsocket = \"{d}/dp.sock\"\nadmin_socket = \"{d}/run/ctl.sock\"\n\
                 metrics_listen = \"127.0.0.1:0\"\nping_interval = \"500ms\"\nreconnect_interval = \"50ms\"\n\
                 [[policy]]\nname = \"to-hq\"\ndirection = \"out\"\nsrc = \"10.0.0.0/24\"\naction = \"protect\"\nsa = \"a\"\n\
                 [[sa]]\nname = \"a\"\ndirection = \"out\"\nspi = \"0x1001\"\nmode = \"transport\"\n\
                 aead = \"aes128gcm16\"\nkey_file = \"{d}/a.key\"\n"
            ),
        )
        .unwrap();
    }

    fn ctl(&self, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(CTL)
            .arg("--config")
            .arg(&self.cfg)
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A running bitw-control with its stderr lines on a channel.
struct Control {
    child: Child,
    lines: Receiver<String>,
    seen: Vec<String>,
}

impl Control {
    fn start(cfg: &Path) -> Control {
        let mut child = Command::new(CONTROL)
            .arg("--config")
            .arg(cfg)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, rx) = unbounded();
        let err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for l in BufReader::new(err).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        Control {
            child,
            lines: rx,
            seen: vec![],
        }
    }

    /// Waits for a log line containing `needle`; returns it.
    fn expect(&mut self, needle: &str) -> String {
        if let Some(l) = self.seen.iter().find(|l| l.contains(needle)) {
            return l.clone();
        }
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            let left = until.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if l.contains(needle) {
                        return l;
                    }
                }
                Err(_) => panic!(
                    "no log line with `{needle}`; saw:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok);
    }

    fn wait_exit(&mut self) -> i32 {
        let until = Instant::now() + Duration::from_secs(10);
        while Instant::now() < until {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s.code().unwrap_or(-1);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        panic!("bitw-control did not exit");
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The smallest dataplane end: welcomes, keeps SAs by name, answers in order.
fn tiny_dataplane(path: &Path, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    let l = Listener::bind(&Endpoint::Unix(path.to_path_buf()), None, 0o600).unwrap();
    std::thread::spawn(move || {
        let mut sas = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let Ok(Some(mut c)) = l.accept() else {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            };
            let Ok(h) = c.recv_within::<Hello>(Duration::from_secs(2)) else {
                continue;
            };
            let version = negotiate(&h).unwrap();
            c.send(&HelloReply::Welcome {
                version,
                software: "tiny".into(),
                instance: "tiny-1".into(),
            })
            .unwrap();
            while !stop.load(Ordering::Relaxed) {
                let m = match c.recv::<ToDataplane>(Some(Duration::from_millis(20))) {
                    Ok(Some(m)) => m,
                    Ok(None) => continue,
                    Err(_) => break,
                };
                let reply = match m.request {
                    Request::GetState => Reply::State(DataplaneState {
                        instance: "tiny-1".into(),
                        ..Default::default()
                    }),
                    Request::Apply(b) => {
                        let n = b.sas.len();
                        for ch in b.sas {
                            if let SaChange::Install(s) = ch {
                                sas.push(s.name.clone());
                            }
                        }
                        Reply::Applied(Applied {
                            sas_installed: n,
                            ..Default::default()
                        })
                    }
                    _ => Reply::Pong,
                };
                if c.send(&FromDataplane::Reply { id: m.id, reply }).is_err() {
                    break;
                }
            }
        }
    })
}

#[test]
fn config_errors_exit_2_with_file_line_field() {
    let env = Env::new("cfgerr");
    std::fs::write(&env.cfg, "[ports.inside]\ndevice = \"a\"\n[ports.outside]\ndevice = \"b\"\n[control]\nping_interval = \"soon\"\n").unwrap();
    let out = Command::new(CONTROL)
        .arg("--config")
        .arg(&env.cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bitw.toml:6: field `control.ping_interval`"),
        "{err}"
    );
    let help = Command::new(CONTROL).arg("--help").output().unwrap();
    assert!(String::from_utf8_lossy(&help.stdout).contains("Examples:"));
    let v = Command::new(CTL).arg("--version").output().unwrap();
    assert!(String::from_utf8_lossy(&v.stdout).starts_with("bitwctl "));
    let h = Command::new(CTL)
        .args(["sa", "add", "--help"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&h.stdout).contains("--key-file"));
}

#[test]
fn runs_without_a_dataplane_serves_bitwctl_and_stops_on_sigterm() {
    let env = Env::new("nodp");
    let mut control = Control::start(&env.cfg);
    control.expect("dataplane link down: cannot connect: ");
    let metrics = control.expect("metrics on http://");
    assert!(metrics.contains("127.0.0.1:"), "{metrics}");
    // status (JSON), counters refused (1), a second control refused.
    let (code, out, _) = env.ctl(&["status", "--json"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["dataplane"]["state"], "down");
    assert_eq!(v["sas"]["config"], 1);
    let (code, _, err) = env.ctl(&["counters"]);
    assert_eq!(code, 1, "{err}");
    let second = Command::new(CONTROL)
        .arg("--config")
        .arg(&env.cfg)
        .output()
        .unwrap();
    assert_eq!(second.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&second.stderr).contains("another bitw-control is running"));
    // sa add: a loose key file is a usage error; a private one is taken.
    let add = |key: &Path| {
        env.ctl(&[
            "sa",
            "add",
            "--name",
            "b",
            "--direction",
            "in",
            "--spi",
            "0x2001",
            "--mode",
            "transport",
            "--aead",
            "aes128gcm16",
            "--key-file",
            &key.display().to_string(),
        ])
    };
    let (code, _, err) = add(&env.key("loose.key", 0o644));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("chmod 600"), "{err}");
    let (code, out, err) = add(&env.key("b.key", 0o600));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("applied when it is back"), "{out}");
    let (code, out, _) = env.ctl(&["sa", "list"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("0x00002001") && out.contains("admin") && !out.contains(KEY),
        "{out}"
    );
    let (_, out, _) = env.ctl(&["sa", "show", "a", "--json"]);
    assert!(
        !out.contains(KEY) && out.contains("\"spi_hex\": \"0x00001001\""),
        "{out}"
    );
    // A broken config: `bitwctl reload` exits 2 with the place; SIGHUP logs it.
    std::fs::write(
        &env.cfg,
        format!(
            "{}\n[[terminal]]\nname = \"x\"\naddress = \"10.0.0\"\n",
            std::fs::read_to_string(&env.cfg).unwrap()
        ),
    )
    .unwrap();
    let (code, _, err) = env.ctl(&["reload"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("bitw.toml:") && err.contains("terminal[0].address"),
        "{err}"
    );
    control.signal("-HUP");
    control.expect("reload failed, keeping the running configuration");
    env.write_config();
    let (code, out, err) = env.ctl(&["reload"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("reload of"), "{out}");
    control.signal("-TERM");
    assert_eq!(control.wait_exit(), 0);
    assert!(!env.ctl.exists(), "admin socket removed");
    let (code, _, err) = env.ctl(&["status"]);
    assert_eq!(code, 3);
    assert!(
        err.contains("cannot reach bitw-control")
            && err.contains("ctl.sock")
            && err.contains("Start it"),
        "{err}"
    );
}

#[test]
fn log_lines_for_link_up_and_reconcile() {
    let env = Env::new("tiny");
    let stop = Arc::new(AtomicBool::new(false));
    let dp = tiny_dataplane(&env.dp, stop.clone());
    let mut control = Control::start(&env.cfg);
    let up = control.expect("bitw-control: dataplane link up (instance tiny-1");
    assert!(up.contains("protocol v1"), "{up}");
    control.expect("bitw-control: reconciled: 1 installed, 0 unchanged, 0 removed, 0 adopted");
    let (code, out, _) = env.ctl(&["status"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("dataplane   up") && out.contains("reconciled"),
        "{out}"
    );
    let (_, out, _) = env.ctl(&["policy", "list"]);
    assert!(
        out.contains("to-hq") && out.contains("default action: bypass"),
        "{out}"
    );
    let (_, out, _) = env.ctl(&["policy", "list", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v[0]["name"], "to-hq", "a plain list of rules: {out}");
    control.signal("-INT");
    assert_eq!(control.wait_exit(), 0);
    stop.store(true, Ordering::Relaxed);
    dp.join().unwrap();
}
