//! Transports of the control channel: length-prefixed JSON frames over a
//! Unix socket (the default) or TCP with mutual TLS 1.3 (one control process
//! serving dataplanes on other hosts: both sides present a certificate
//! signed by the configured CA).
//!
//! A [`Conn`] is owned by one thread that alternates between
//! [`Conn::recv`] with a short timeout and sending what it has queued, so
//! both transports behave the same and no TLS stream has to be split.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::proto::MAX_FRAME;

/// Where the dataplane listens and control connects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A Unix socket path (`/run/bitw/dataplane.sock` or `unix:/path`).
    Unix(PathBuf),
    /// `tls://host:port`: TCP with mutual TLS.
    Tls(String),
}

impl std::str::FromStr for Endpoint {
    type Err = String;
    fn from_str(s: &str) -> Result<Endpoint, String> {
        if let Some(addr) = s.strip_prefix("tls://") {
            if !addr.contains(':') {
                return Err(format!("`{s}`: expected tls://host:port"));
            }
            Ok(Endpoint::Tls(addr.to_string()))
        } else if s.starts_with("tcp://") {
            Err(format!(
                "`{s}`: plain TCP is not offered; use tls://host:port with tls_cert, tls_key and tls_ca"
            ))
        } else {
            let p = s.strip_prefix("unix:").unwrap_or(s);
            if p.is_empty() {
                return Err("empty socket path".into());
            }
            Ok(Endpoint::Unix(PathBuf::from(p)))
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "{}", p.display()),
            Endpoint::Tls(a) => write!(f, "tls://{a}"),
        }
    }
}

/// Certificate, key and CA for mutual TLS (PEM files).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
    /// The name (DNS or IP) the dataplane's certificate must carry; default:
    /// the host part of the endpoint.
    pub server_name: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("the peer closed the connection")]
    Closed,
    #[error("frame of {0} bytes is larger than the {MAX_FRAME} allowed")]
    TooLarge(usize),
    #[error("undecodable message: {0}")]
    Decode(String),
    #[error("TLS: {0}")]
    Tls(String),
}

trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

/// Sets timeouts on the socket under a stream.
enum Sock {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Sock {
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Sock::Unix(s) => s.set_read_timeout(t),
            Sock::Tcp(s) => s.set_read_timeout(t),
        }
    }
    fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        match self {
            Sock::Unix(s) => s.set_nonblocking(on),
            Sock::Tcp(s) => s.set_nonblocking(on),
        }
    }
    fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Sock::Unix(s) => s.set_write_timeout(t),
            Sock::Tcp(s) => s.set_write_timeout(t),
        }
    }
}

/// Waits shorter than this are polled (see [`Conn::recv`]).
const SHORT_WAIT: Duration = Duration::from_millis(20);
/// The polling step of a short wait.
const POLL_STEP: Duration = Duration::from_micros(200);

/// One end of a control channel.
pub struct Conn {
    stream: Box<dyn Stream>,
    sock: Sock,
    buf: Vec<u8>,
    peer: String,
}

impl fmt::Debug for Conn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Conn({})", self.peer)
    }
}

/// Writes can block this long before the peer is given up.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

impl Conn {
    fn new(stream: Box<dyn Stream>, sock: Sock, peer: String) -> io::Result<Conn> {
        sock.set_write_timeout(Some(WRITE_TIMEOUT))?;
        Ok(Conn {
            stream,
            sock,
            buf: Vec::with_capacity(64 * 1024),
            peer,
        })
    }

    /// Who is at the other end (socket path or address, TLS subject).
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// Sends one message.
    pub fn send<T: Serialize>(&mut self, msg: &T) -> Result<(), ChannelError> {
        let body = serde_json::to_vec(msg).map_err(|e| ChannelError::Decode(e.to_string()))?;
        if body.len() > MAX_FRAME {
            return Err(ChannelError::TooLarge(body.len()));
        }
        let mut frame = Vec::with_capacity(4 + body.len());
        frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
        frame.extend_from_slice(&body);
        self.stream.write_all(&frame)?;
        self.stream.flush()?;
        Ok(())
    }

    /// Receives one message; `Ok(None)` when `timeout` passed first (a frame
    /// that arrived in part is kept for the next call). `None` as timeout
    /// waits for ever.
    pub fn recv<T: DeserializeOwned>(
        &mut self,
        timeout: Option<Duration>,
    ) -> Result<Option<T>, ChannelError> {
        // The kernel counts socket timeouts in jiffies (10 ms with HZ=100):
        // short waits are polled instead, with precise sleeps, or every IKE
        // round trip through the punt and inject path would take 10 ms a hop.
        let deadline = timeout
            .filter(|t| *t < SHORT_WAIT)
            .map(|t| std::time::Instant::now() + t);
        loop {
            if let Some(frame) = self.take_frame()? {
                return serde_json::from_slice(&frame)
                    .map(Some)
                    .map_err(|e| ChannelError::Decode(e.to_string()));
            }
            let mut chunk = [0u8; 16 * 1024];
            let got = match deadline {
                Some(deadline) => {
                    self.sock.set_nonblocking(true)?;
                    let r = self.stream.read(&mut chunk);
                    self.sock.set_nonblocking(false)?;
                    match r {
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            let left =
                                deadline.saturating_duration_since(std::time::Instant::now());
                            if left.is_zero() {
                                return Ok(None);
                            }
                            std::thread::sleep(left.min(POLL_STEP));
                            continue;
                        }
                        r => r,
                    }
                }
                None => {
                    self.sock.set_read_timeout(timeout)?;
                    self.stream.read(&mut chunk)
                }
            };
            match got {
                Ok(0) => return Err(ChannelError::Closed),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Ok(None)
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    return Err(ChannelError::Closed)
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Like [`Conn::recv`] but waits at most `timeout` and treats silence as an error.
    pub fn recv_within<T: DeserializeOwned>(
        &mut self,
        timeout: Duration,
    ) -> Result<T, ChannelError> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(ChannelError::Io(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no answer within {timeout:?}"),
                )));
            }
            if let Some(m) = self.recv(Some(left))? {
                return Ok(m);
            }
        }
    }

    fn take_frame(&mut self) -> Result<Option<Vec<u8>>, ChannelError> {
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
        if len > MAX_FRAME {
            return Err(ChannelError::TooLarge(len));
        }
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        let frame = self.buf[4..4 + len].to_vec();
        self.buf.drain(..4 + len);
        Ok(Some(frame))
    }
}

/// The dataplane's listening side.
pub enum Listener {
    Unix(UnixListener, PathBuf),
    Tls(TcpListener, Arc<rustls::ServerConfig>),
}

impl Listener {
    /// Binds `endpoint`. A Unix socket gets `mode` (e.g. 0o600) and its
    /// directory is created; a stale socket file (nobody listening) is
    /// replaced, a live one is an error.
    pub fn bind(
        endpoint: &Endpoint,
        tls: Option<&TlsFiles>,
        mode: u32,
    ) -> Result<Listener, ChannelError> {
        match endpoint {
            Endpoint::Unix(path) => {
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir)?;
                }
                if path.exists() {
                    if UnixStream::connect(path).is_ok() {
                        return Err(ChannelError::Io(io::Error::new(
                            io::ErrorKind::AddrInUse,
                            format!("{}: another process is listening there", path.display()),
                        )));
                    }
                    std::fs::remove_file(path)?;
                }
                let l = UnixListener::bind(path)
                    .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
                l.set_nonblocking(true)?;
                Ok(Listener::Unix(l, path.clone()))
            }
            Endpoint::Tls(addr) => {
                let files = tls.ok_or_else(|| {
                    ChannelError::Tls(format!(
                        "tls://{addr} needs control.tls_cert, control.tls_key and control.tls_ca"
                    ))
                })?;
                let config = server_config(files)?;
                let l = TcpListener::bind(addr)
                    .map_err(|e| io::Error::new(e.kind(), format!("{addr}: {e}")))?;
                l.set_nonblocking(true)?;
                Ok(Listener::Tls(l, Arc::new(config)))
            }
        }
    }

    /// Accepts one connection; `Ok(None)` when none is waiting (the listener
    /// is non-blocking so the caller can also watch for shutdown). The TLS
    /// handshake (with the client's certificate checked) completes here.
    pub fn accept(&self) -> Result<Option<Conn>, ChannelError> {
        match self {
            Listener::Unix(l, path) => match l.accept() {
                Ok((s, _)) => {
                    s.set_nonblocking(false)?;
                    let sock = Sock::Unix(s.try_clone()?);
                    Ok(Some(Conn::new(
                        Box::new(s),
                        sock,
                        format!("unix:{}", path.display()),
                    )?))
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
                Err(e) => Err(e.into()),
            },
            Listener::Tls(l, config) => match l.accept() {
                Ok((s, addr)) => {
                    s.set_nonblocking(false)?;
                    s.set_nodelay(true)?;
                    s.set_read_timeout(Some(Duration::from_secs(10)))?;
                    let sock = Sock::Tcp(s.try_clone()?);
                    let conn = rustls::ServerConnection::new(config.clone())
                        .map_err(|e| ChannelError::Tls(e.to_string()))?;
                    let mut tls = rustls::StreamOwned::new(conn, s);
                    while tls.conn.is_handshaking() {
                        tls.conn
                            .complete_io(&mut tls.sock)
                            .map_err(|e| ChannelError::Tls(format!("{addr}: {e}")))?;
                    }
                    let subject = peer_subject(tls.conn.peer_certificates());
                    Ok(Some(Conn::new(
                        Box::new(tls),
                        sock,
                        format!("tls:{addr} ({subject})"),
                    )?))
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
                Err(e) => Err(e.into()),
            },
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Connects to a dataplane (control's side).
pub fn connect(endpoint: &Endpoint, tls: Option<&TlsFiles>) -> Result<Conn, ChannelError> {
    match endpoint {
        Endpoint::Unix(path) => {
            let s = UnixStream::connect(path)
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
            let sock = Sock::Unix(s.try_clone()?);
            Conn::new(Box::new(s), sock, format!("unix:{}", path.display())).map_err(Into::into)
        }
        Endpoint::Tls(addr) => {
            let files = tls.ok_or_else(|| {
                ChannelError::Tls(format!(
                    "tls://{addr} needs control.tls_cert, control.tls_key and control.tls_ca"
                ))
            })?;
            let config = Arc::new(client_config(files)?);
            let host = files.server_name.clone().unwrap_or_else(|| {
                let h = addr.rsplit_once(':').map_or(addr.as_str(), |(h, _)| h);
                h.trim_start_matches('[').trim_end_matches(']').to_string()
            });
            let name = rustls::pki_types::ServerName::try_from(host.clone())
                .map_err(|e| ChannelError::Tls(format!("server name `{host}`: {e}")))?;
            let s = TcpStream::connect(addr)
                .map_err(|e| io::Error::new(e.kind(), format!("{addr}: {e}")))?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            let sock = Sock::Tcp(s.try_clone()?);
            let conn = rustls::ClientConnection::new(config, name)
                .map_err(|e| ChannelError::Tls(e.to_string()))?;
            let mut tls = rustls::StreamOwned::new(conn, s);
            while tls.conn.is_handshaking() {
                tls.conn
                    .complete_io(&mut tls.sock)
                    .map_err(|e| ChannelError::Tls(format!("{addr}: {e}")))?;
            }
            Conn::new(Box::new(tls), sock, format!("tls:{addr}")).map_err(Into::into)
        }
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn load_certs(
    path: &Path,
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, ChannelError> {
    use rustls::pki_types::pem::PemObject;
    let certs: Vec<_> = rustls::pki_types::CertificateDer::pem_file_iter(path)
        .map_err(|e| ChannelError::Tls(format!("{}: {e}", path.display())))?
        .collect::<Result<_, _>>()
        .map_err(|e| ChannelError::Tls(format!("{}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(ChannelError::Tls(format!(
            "{}: no PEM certificate in the file",
            path.display()
        )));
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<rustls::pki_types::PrivateKeyDer<'static>, ChannelError> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::PrivateKeyDer::from_pem_file(path)
        .map_err(|e| ChannelError::Tls(format!("{}: {e}", path.display())))
}

fn roots(ca: &Path) -> Result<Arc<rustls::RootCertStore>, ChannelError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in load_certs(ca)? {
        roots
            .add(c)
            .map_err(|e| ChannelError::Tls(format!("{}: {e}", ca.display())))?;
    }
    Ok(Arc::new(roots))
}

fn server_config(files: &TlsFiles) -> Result<rustls::ServerConfig, ChannelError> {
    let tls = |e: rustls::Error| ChannelError::Tls(e.to_string());
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots(&files.ca)?, provider())
            .build()
            .map_err(|e| ChannelError::Tls(e.to_string()))?;
    rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(&files.cert)?, load_key(&files.key)?)
        .map_err(tls)
}

fn client_config(files: &TlsFiles) -> Result<rustls::ClientConfig, ChannelError> {
    let tls = |e: rustls::Error| ChannelError::Tls(e.to_string());
    rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls)?
        .with_root_certificates(roots(&files.ca)?)
        .with_client_auth_cert(load_certs(&files.cert)?, load_key(&files.key)?)
        .map_err(tls)
}

/// A short description of the client's certificate, for logs.
fn peer_subject(certs: Option<&[rustls::pki_types::CertificateDer<'_>]>) -> String {
    match certs.and_then(|c| c.first()) {
        Some(c) => format!("client certificate of {} bytes verified", c.len()),
        None => "no client certificate".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{Hello, HelloReply};

    #[test]
    fn endpoints_parse() {
        assert_eq!(
            "/run/bitw/dataplane.sock".parse::<Endpoint>(),
            Ok(Endpoint::Unix("/run/bitw/dataplane.sock".into()))
        );
        assert_eq!(
            "unix:/tmp/x".parse::<Endpoint>(),
            Ok(Endpoint::Unix("/tmp/x".into()))
        );
        assert_eq!(
            "tls://10.0.0.1:9470".parse::<Endpoint>(),
            Ok(Endpoint::Tls("10.0.0.1:9470".into()))
        );
        assert!("tcp://10.0.0.1:9470"
            .parse::<Endpoint>()
            .unwrap_err()
            .contains("tls://"));
    }

    #[test]
    fn frames_over_a_unix_socket_with_partial_reads_and_timeouts() {
        let dir = std::env::temp_dir().join(format!("bitw-chan-{}", std::process::id()));
        let path = dir.join("dp.sock");
        let ep = Endpoint::Unix(path.clone());
        let l = Listener::bind(&ep, None, 0o600).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // A second listener on a live socket is refused.
        // (Its probe connection reaches the live listener and closes at once.)
        assert!(Listener::bind(&ep, None, 0o600).is_err());
        let accept = || loop {
            if let Some(s) = l.accept().unwrap() {
                break s;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let mut probe = accept();
        assert!(matches!(
            probe.recv::<Hello>(None),
            Err(ChannelError::Closed)
        ));
        let mut c = connect(&ep, None).unwrap();
        let mut s = accept();
        // Nothing sent yet: a timeout, not an error.
        assert!(s
            .recv::<Hello>(Some(Duration::from_millis(20)))
            .unwrap()
            .is_none());
        c.send(&Hello::new("test")).unwrap();
        let h: Hello = s.recv(None).unwrap().unwrap();
        assert_eq!(h.software, "test");
        s.send(&HelloReply::Refused {
            reason: "busy".into(),
        })
        .unwrap();
        let r: HelloReply = c.recv_within(Duration::from_secs(2)).unwrap();
        assert!(matches!(r, HelloReply::Refused { .. }));
        // A frame header claiming too much is refused without allocating it.
        use std::io::Write as _;
        let mut raw = UnixStream::connect(&path).unwrap();
        let mut s2 = accept();
        raw.write_all(&u32::MAX.to_be_bytes()).unwrap();
        assert!(matches!(
            s2.recv::<Hello>(None),
            Err(ChannelError::TooLarge(_))
        ));
        drop(c);
        assert!(matches!(s.recv::<Hello>(None), Err(ChannelError::Closed)));
        drop(l);
        assert!(!path.exists(), "the listener removes its socket");
        let _ = std::fs::remove_dir_all(dir);
    }
}
