//! The admin socket: how bitwctl talks to bitw-control.
//!
//! A Unix socket (`[control] admin_socket`, mode `admin_socket_mode`). One
//! request per connection: the client writes one JSON object and a newline,
//! control answers with one JSON object and a newline, then closes.
//!
//! ```text
//! → {"cmd":"sa_del","name":"to-hq","direction":"out"}
//! ← {"ok":true,"data":{"message":"…","notes":[…],"dataplane":"applied","applied":{…}}}
//! ← {"ok":false,"error":"no SA named `x`","error_kind":"refused"}
//! ```
//!
//! `data` is one of the structs below, by command. Field names are stable:
//! scripts read them through `bitwctl --json`.

use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use bitw_common::proto::{Applied, LimitsSpec, RuleSpec, SaSpec, Stats};
use bitw_common::rules::Direction;

/// `ike_list` answers `[IkeSaInfo]` (each with its `[ChildInfo]`).
pub use crate::proxy::{ChildInfo, IkeSaInfo};

/// The largest request line accepted (an SA with its key is well under 2 KiB).
pub const MAX_REQUEST: u64 = 1 << 20;

/// A request from bitwctl.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum AdminRequest {
    Status,
    SaList,
    SaShow {
        name: String,
        #[serde(default)]
        direction: Option<Direction>,
    },
    /// The key travels inside `sa` (hex); control never logs it.
    SaAdd {
        sa: SaSpec,
    },
    SaDel {
        name: String,
        #[serde(default)]
        direction: Option<Direction>,
    },
    PolicyList,
    PolicyAdd {
        rule: RuleSpec,
        #[serde(default)]
        before: Option<String>,
        /// 1-based position in the whole table.
        #[serde(default)]
        position: Option<usize>,
    },
    PolicyDel {
        name: String,
    },
    Terminals,
    Counters,
    Reload,
    /// The IKE SAs the proxy holds and their Child SAs.
    IkeList,
    /// Start the IKE SA of a connection (as its terminal).
    IkeInitiate {
        connection: String,
    },
    /// Delete the IKE SA(s) of a connection, or one IKE SA by its id.
    IkeTerminate {
        /// A connection name or an IKE SA id (`bitwctl ike list`).
        name: String,
    },
}

/// Why a request failed; bitwctl turns it into its exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// Control refused (unknown name, duplicate, invalid parameters…): exit 1.
    Refused,
    /// The dataplane refused; the message is its own: exit 1.
    Dataplane,
    /// The configuration file is invalid (reload): exit 2.
    Config,
    /// The request itself was malformed: exit 2.
    BadRequest,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AdminResponse {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_kind: Option<ErrorKind>,
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub data: serde_json::Value,
}

impl AdminResponse {
    pub fn ok<T: Serialize>(data: &T) -> AdminResponse {
        match serde_json::to_value(data) {
            Ok(data) => AdminResponse {
                ok: true,
                error: None,
                error_kind: None,
                data,
            },
            Err(e) => AdminResponse::err(ErrorKind::Refused, format!("internal: {e}")),
        }
    }

    pub fn err(kind: ErrorKind, message: impl Into<String>) -> AdminResponse {
        AdminResponse {
            ok: false,
            error: Some(message.into()),
            error_kind: Some(kind),
            data: serde_json::Value::Null,
        }
    }
}

// ---- what each command answers (`data`) ----

/// `status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusInfo {
    pub version: String,
    pub protocol_version: u16,
    pub pid: u32,
    pub uptime_seconds: f64,
    pub config_file: PathBuf,
    pub admin_socket: PathBuf,
    pub metrics_listen: Option<String>,
    pub dataplane: LinkInfo,
    pub sas: SaCounts,
    pub rules: usize,
    pub default_action: String,
    pub terminals: usize,
    pub neighbors: usize,
    /// From the dataplane; `None` while it is down.
    pub held_packets: Option<usize>,
    /// Events received since control started.
    pub acquires: u64,
    pub expires: BTreeMap<String, u64>,
    pub punts: u64,
    pub hold_dropped_packets: u64,
    /// SAs that traffic is waiting for (acquires seen), newest first.
    pub acquired_sas: Vec<AcquireInfo>,
    pub last_reload: Option<ReloadInfo>,
    /// The key exchange proxy: connections and IKE SAs by state.
    #[serde(default)]
    pub ike: IkeStatus,
}

/// `status`: the IKE proxy in numbers.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct IkeStatus {
    /// Configured `[[connection]]`s.
    pub connections: usize,
    /// IKE SAs up, and being set up (IKE_SA_INIT/IKE_AUTH under way).
    pub established: usize,
    pub connecting: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LinkInfo {
    /// "up" or "down".
    pub state: String,
    pub endpoint: String,
    /// The connection as the channel describes it (socket path, TLS peer).
    pub peer: Option<String>,
    pub instance: Option<String>,
    pub software: Option<String>,
    pub protocol_version: Option<u16>,
    /// When the link went up or down (Unix seconds).
    pub since_unix: f64,
    /// The last ping's round trip.
    pub last_rtt_seconds: Option<f64>,
    /// Why it is down.
    pub last_error: Option<String>,
    /// The last reconcile with this dataplane succeeded.
    pub reconciled: bool,
    pub connects: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SaCounts {
    pub total: usize,
    pub config: usize,
    pub admin: usize,
    pub ike: usize,
    /// Of the above, found in the dataplane (no key held by control).
    pub adopted: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AcquireInfo {
    pub sa: String,
    pub direction: Direction,
    pub count: u64,
    pub last_unix: f64,
    /// The last flow: "10.0.0.1:1234 -> 10.1.0.1:80 proto 6 (rule r)".
    pub last_flow: String,
    /// Control has the SA, or one of its rules names it: the packets wait for
    /// it (until the dataplane's hold timeout). Otherwise they are dropped.
    pub known: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReloadInfo {
    pub at_unix: f64,
    pub ok: bool,
    pub message: String,
}

/// One row of `sa list` / `sa show`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SaEntry {
    pub name: String,
    pub direction: Direction,
    pub spi: u32,
    pub spi_hex: String,
    pub mode: String,
    pub tunnel_src: Option<IpAddr>,
    pub tunnel_dst: Option<IpAddr>,
    pub encap: String,
    pub udp_sport: Option<u16>,
    pub udp_dport: Option<u16>,
    pub aead: String,
    pub esn: bool,
    pub replay_window: u32,
    /// `None` for adopted SAs (control never had their parameters in full).
    pub lifetime_packets: Option<LimitsSpec>,
    pub lifetime_bytes: Option<LimitsSpec>,
    pub origin: String,
    pub adopted: bool,
    /// installed | expired | not_installed (the dataplane lacks it) |
    /// differs (the dataplane holds other parameters under this name) |
    /// unknown (the dataplane is down)
    pub state: String,
    pub packets: Option<u64>,
    pub bytes: Option<u64>,
    pub sequence: Option<u64>,
    pub owner_worker: Option<usize>,
    pub fingerprint: Option<String>,
    /// Inbound: the name inbound protect rules use for the SA when it is not
    /// its own (`null`: the SA's name).
    pub policy: Option<String>,
    /// Protect rules naming the SA (inbound: naming its policy name).
    pub rules: Vec<String>,
    pub acquires: u64,
}

/// One row of `policy list`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PolicyEntry {
    /// 1-based, over the whole table.
    pub position: usize,
    pub name: String,
    pub direction: Direction,
    pub src: String,
    pub dst: String,
    pub proto: String,
    pub sport: String,
    pub dport: String,
    pub action: String,
    pub sa: Option<String>,
    pub origin: String,
    pub adopted: bool,
    /// Protect rules: whether their SA is installed (`None` when unknown).
    pub sa_installed: Option<bool>,
}

/// `counters`: the dataplane's [`Stats`] as it sent them, plus `drops`:
/// the totals by reason over the workers and the control side.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CountersInfo {
    #[serde(flatten)]
    pub stats: Stats,
    pub drops: BTreeMap<String, u64>,
}

/// `terminals`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TerminalsInfo {
    pub terminals: Vec<TerminalEntry>,
    pub neighbors: Vec<NeighborEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TerminalEntry {
    pub name: String,
    pub address: IpAddr,
    /// Where the dataplane saw it, if it did.
    pub port: Option<String>,
    pub mac: Option<String>,
    pub last_seen_unix: Option<f64>,
    /// The `[[connection]]`s bitw runs IKE for as this terminal.
    #[serde(default)]
    pub connections: Vec<TerminalConnection>,
}

/// A connection of a terminal and the state of its IKE SA.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TerminalConnection {
    pub name: String,
    /// established | connecting | none (no IKE SA)
    pub ike: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NeighborEntry {
    pub port: String,
    pub ip: IpAddr,
    pub mac: String,
    /// When control first and last heard of it (Unix seconds).
    pub first_seen_unix: f64,
    pub last_seen_unix: f64,
    /// The configured terminal with this address.
    pub terminal: Option<String>,
}

/// What `ike initiate` / `ike terminate` started (the negotiation and the
/// deletion go on after the answer: watch `bitwctl ike list`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IkeResult {
    pub message: String,
}

/// What a change (`sa add/del`, `policy add/del`, `reload`) did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChangeResult {
    pub message: String,
    pub notes: Vec<String>,
    /// applied | unchanged (nothing to send) | pending (dataplane down:
    /// applied when it is back)
    pub dataplane: String,
    /// SAs newly installed, replaced (other parameters), left untouched
    /// (same fingerprint: counters and sequence numbers kept) and removed.
    pub sas_installed: usize,
    pub sas_replaced: usize,
    pub sas_unchanged: usize,
    pub sas_removed: usize,
    /// Found in the dataplane and taken over (see `bitwctl sa list`).
    pub sas_adopted: usize,
    pub rules_adopted: usize,
    /// The dataplane's own account of the batch (`None` when none was sent).
    pub applied: Option<Applied>,
}

// ---- server ----

/// The listening admin socket; removes its file when dropped.
pub struct AdminServer {
    listener: UnixListener,
    path: PathBuf,
}

impl AdminServer {
    /// Binds `path` with `mode`, creating its directory. A stale socket file
    /// (nobody answering) is replaced; a live one means another bitw-control.
    pub fn bind(path: &Path, mode: u32) -> io::Result<AdminServer> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", dir.display())))?;
        }
        if std::fs::symlink_metadata(path).is_ok() {
            if UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!(
                        "{}: another bitw-control is running (its admin socket answers); stop it first",
                        path.display()
                    ),
                ));
            }
            std::fs::remove_file(path).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("{}: cannot replace the stale socket: {e}", path.display()),
                )
            })?;
        }
        let listener = UnixListener::bind(path)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
        listener.set_nonblocking(true)?;
        Ok(AdminServer {
            listener,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves until `stop` is set: each connection on its own short-lived
    /// thread (at most [`MAX_CLIENTS`] at once) so a slow client holds up
    /// nobody. `handle` answers a request (it forwards to the engine).
    pub fn serve<F>(self, stop: Arc<AtomicBool>, handle: F)
    where
        F: Fn(AdminRequest) -> AdminResponse + Send + Sync + 'static,
    {
        let handle = Arc::new(handle);
        let active = Arc::new(AtomicUsize::new(0));
        while !stop.load(Ordering::Relaxed) {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if active.load(Ordering::Relaxed) >= MAX_CLIENTS {
                        let _ = answer(
                            stream,
                            &AdminResponse::err(
                                ErrorKind::Refused,
                                "too many admin clients at once; retry",
                            ),
                        );
                        continue;
                    }
                    active.fetch_add(1, Ordering::Relaxed);
                    let (h, a) = (handle.clone(), active.clone());
                    let spawned = std::thread::Builder::new()
                        .name("admin-client".into())
                        .spawn(move || {
                            serve_one(stream, &*h);
                            a.fetch_sub(1, Ordering::Relaxed);
                        });
                    if spawned.is_err() {
                        active.fetch_sub(1, Ordering::Relaxed);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => {
                    crate::info!("admin socket: accept failed: {e}");
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
    }
}

impl Drop for AdminServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

pub const MAX_CLIENTS: usize = 16;

fn serve_one(stream: UnixStream, handle: &dyn Fn(AdminRequest) -> AdminResponse) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(10)));
    let Ok(reader) = stream.try_clone() else {
        return;
    };
    // The line may hold a key: zeroed when dropped.
    let mut line = Zeroizing::new(String::new());
    let read = BufReader::new(reader.take(MAX_REQUEST)).read_line(&mut line);
    let resp = match read {
        Ok(0) => return,
        Ok(_) if !line.ends_with('\n') && line.len() as u64 >= MAX_REQUEST => AdminResponse::err(
            ErrorKind::BadRequest,
            format!("request longer than {MAX_REQUEST} bytes"),
        ),
        Ok(_) => match serde_json::from_str::<AdminRequest>(line.trim()) {
            Ok(req) => handle(req),
            // serde's message names the field, never echoes values.
            Err(e) => AdminResponse::err(ErrorKind::BadRequest, format!("bad request: {e}")),
        },
        Err(e) => AdminResponse::err(ErrorKind::BadRequest, format!("reading the request: {e}")),
    };
    let _ = answer(stream, &resp);
}

fn answer(mut stream: UnixStream, resp: &AdminResponse) -> io::Result<()> {
    let _ = stream.set_nonblocking(false);
    let mut text = serde_json::to_string(resp).map_err(io::Error::other)?;
    text.push('\n');
    stream.write_all(text.as_bytes())?;
    stream.flush()
}

// ---- client ----

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nobody answers on the socket (exit code 3).
    #[error("cannot reach bitw-control at {path}: {source}")]
    Connect { path: PathBuf, source: io::Error },
    #[error("talking to bitw-control at {path}: {message}")]
    Protocol { path: PathBuf, message: String },
}

/// Sends one request and waits up to `timeout` for the answer.
pub fn call(
    path: &Path,
    req: &AdminRequest,
    timeout: Duration,
) -> Result<AdminResponse, ClientError> {
    let proto = |message: String| ClientError::Protocol {
        path: path.to_path_buf(),
        message,
    };
    let mut stream = UnixStream::connect(path).map_err(|source| ClientError::Connect {
        path: path.to_path_buf(),
        source,
    })?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|_| stream.set_write_timeout(Some(timeout)))
        .map_err(|e| proto(e.to_string()))?;
    let mut line = Zeroizing::new(serde_json::to_string(req).map_err(|e| proto(e.to_string()))?);
    line.push('\n');
    stream
        .write_all(line.as_bytes())
        .map_err(|e| proto(format!("sending the request: {e}")))?;
    let mut answer = String::new();
    BufReader::new(stream.take(64 << 20))
        .read_line(&mut answer)
        .map_err(|e| match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                proto(format!("no answer within {timeout:?}"))
            }
            _ => proto(format!("reading the answer: {e}")),
        })?;
    if answer.is_empty() {
        return Err(proto("it closed the connection without answering".into()));
    }
    serde_json::from_str(&answer).map_err(|e| proto(format!("undecodable answer: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_tagged_json() {
        let r: AdminRequest =
            serde_json::from_str(r#"{"cmd":"sa_del","name":"x","direction":"in"}"#).unwrap();
        assert!(matches!(
            r,
            AdminRequest::SaDel {
                direction: Some(Direction::In),
                ..
            }
        ));
        let r: AdminRequest = serde_json::from_str(r#"{"cmd":"sa_show","name":"x"}"#).unwrap();
        assert!(matches!(
            r,
            AdminRequest::SaShow {
                direction: None,
                ..
            }
        ));
        assert_eq!(
            serde_json::to_string(&AdminRequest::Reload).unwrap(),
            r#"{"cmd":"reload"}"#
        );
        assert!(serde_json::from_str::<AdminRequest>(r#"{"cmd":"format_disk"}"#).is_err());
        let r: AdminRequest =
            serde_json::from_str(r#"{"cmd":"ike_initiate","connection":"meter-hq"}"#).unwrap();
        assert!(matches!(r, AdminRequest::IkeInitiate { connection } if connection == "meter-hq"));
        let r: AdminRequest =
            serde_json::from_str(r#"{"cmd":"ike_terminate","name":"3"}"#).unwrap();
        assert!(matches!(r, AdminRequest::IkeTerminate { name } if name == "3"));
        assert_eq!(
            serde_json::to_string(&AdminRequest::IkeList).unwrap(),
            r#"{"cmd":"ike_list"}"#
        );
        assert!(serde_json::from_str::<AdminRequest>(r#"{"cmd":"ike_initiate"}"#).is_err());
    }

    #[test]
    fn server_answers_replaces_stale_and_refuses_second() {
        let dir = std::env::temp_dir().join(format!("bitw-admin-{}", std::process::id()));
        let path = dir.join("sub/control.sock");
        let _ = std::fs::remove_dir_all(&dir);
        // A stale socket file (bound, then its listener dropped without unlinking).
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let server = AdminServer::bind(&path, 0o600).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let e = AdminServer::bind(&path, 0o600).err().unwrap();
        assert!(
            e.to_string().contains("another bitw-control is running"),
            "{e}"
        );
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        let t = std::thread::spawn(move || {
            server.serve(s2, |req| match req {
                AdminRequest::Status => AdminResponse::ok(&"fine"),
                _ => AdminResponse::err(ErrorKind::Refused, "no"),
            })
        });
        let r = call(&path, &AdminRequest::Status, Duration::from_secs(5)).unwrap();
        assert!(r.ok && r.data == "fine");
        let r = call(&path, &AdminRequest::Reload, Duration::from_secs(5)).unwrap();
        assert_eq!(r.error_kind, Some(ErrorKind::Refused));
        // Garbage gets an answer, not a crash.
        let mut raw = UnixStream::connect(&path).unwrap();
        raw.write_all(b"{not json\n").unwrap();
        let mut text = String::new();
        BufReader::new(raw).read_line(&mut text).unwrap();
        let resp: AdminResponse = serde_json::from_str(&text).unwrap();
        assert_eq!(resp.error_kind, Some(ErrorKind::BadRequest));
        stop.store(true, Ordering::Relaxed);
        t.join().unwrap();
        assert!(!path.exists(), "the socket is removed on the way out");
        assert!(matches!(
            call(&path, &AdminRequest::Status, Duration::from_secs(1)),
            Err(ClientError::Connect { .. })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
