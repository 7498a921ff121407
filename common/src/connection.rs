//! `[[connection]]` and `[[connection.children]]`: the IKE peerings bitw runs
//! on behalf of its terminals, written like strongSwan's swanctl.conf
//! connections. This module checks what can be checked without the IKE
//! engine (names, addresses, selectors, durations, secrets on disk);
//! bitw-control checks the proposal strings and the certificates and names
//! the line through [`Config::field_line`](crate::config::Config::field_line).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;
use zeroize::Zeroizing;

use crate::config::{ConfigError, Ctx, DurationValue, Terminal};
use crate::rules::Prefix;

/// When bitw negotiates a connection's Child SAs on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StartAction {
    /// On the terminal's first packet a child's protect rules cover.
    Trap,
    /// As soon as the dataplane is connected (and again when the IKE SA is
    /// gone), and on traffic like `trap`.
    Start,
    /// Only when the counterpart initiates; the terminal's packets meanwhile
    /// wait (held, then dropped) and are never sent in clear.
    None,
}

impl StartAction {
    pub fn as_str(self) -> &'static str {
        match self {
            StartAction::Trap => "trap",
            StartAction::Start => "start",
            StartAction::None => "none",
        }
    }
}

/// How bitw proves the terminal's identity (and checks the counterpart's).
#[derive(Clone, PartialEq, Eq)]
pub enum ConnAuth {
    /// A pre-shared key, read from `psk_file` (mode 0600 or stricter).
    Psk {
        psk_file: PathBuf,
        psk: Zeroizing<Vec<u8>>,
    },
    /// X.509: our certificate and key (PEM), the CAs the peer's must chain to.
    Pubkey {
        local_cert: PathBuf,
        local_key: PathBuf,
        ca_certs: Vec<PathBuf>,
    },
}

impl std::fmt::Debug for ConnAuth {
    // Never print the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnAuth::Psk { psk_file, .. } => f
                .debug_struct("Psk")
                .field("psk_file", psk_file)
                .finish_non_exhaustive(),
            ConnAuth::Pubkey {
                local_cert,
                local_key,
                ca_certs,
            } => f
                .debug_struct("Pubkey")
                .field("local_cert", local_cert)
                .field("local_key", local_key)
                .field("ca_certs", ca_certs)
                .finish(),
        }
    }
}

/// One `[[connection]]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Connection {
    pub name: String,
    /// The terminal bitw speaks as (its `[[terminal]]` name) and its address.
    pub terminal: String,
    pub terminal_address: IpAddr,
    /// The counterparts: the first is the one bitw initiates to; an exchange
    /// from any of them to the terminal's address is answered.
    pub remote_addrs: Vec<IpAddr>,
    /// IKE proposals in strongSwan's syntax, checked by bitw-control.
    pub proposals: Vec<String>,
    /// Identities as strongSwan writes them: an address, an FQDN, `user@fqdn`,
    /// or a DN (`C=CH, O=org, CN=name`). Default: the terminal's address.
    pub local_id: String,
    /// Default: the first remote address.
    pub remote_id: String,
    pub auth: ConnAuth,
    pub start_action: StartAction,
    /// Liveness check after this long without a message from the peer.
    pub dpd_delay: Option<Duration>,
    /// Rekey the IKE SA this long after it was set up.
    pub rekey_time: Option<Duration>,
    /// NAT-T keepalives while a NAT was detected.
    pub keepalive_interval: Option<Duration>,
    /// Retransmission of our requests (strongSwan's charon.retransmit_*):
    /// first after `retransmit_timeout`, each next `retransmit_base` times
    /// later, `retransmit_tries` transmissions in all; then the IKE SA is
    /// given up (a dead counterpart is noticed after their sum).
    pub retransmit_timeout: Duration,
    pub retransmit_base: f64,
    pub retransmit_tries: u32,
    pub children: Vec<Child>,
}

/// One `[[connection.children]]`: a Child SA (a pair of ESP SAs) and the
/// protect rules its traffic selectors give.
#[derive(Debug, Clone, PartialEq)]
pub struct Child {
    pub name: String,
    pub mode: ChildMode,
    /// ESP proposals in strongSwan's syntax (AEAD only), checked by bitw-control.
    pub esp_proposals: Vec<String>,
    pub local_ts: Vec<Prefix>,
    pub remote_ts: Vec<Prefix>,
    pub rekey_time: Option<Duration>,
    /// Deleted this long after set-up if no rekey succeeded.
    pub life_time: Option<Duration>,
    /// Rekey after this many packets / bytes in one direction (0: off),
    /// counted by the dataplane; the SA expires at the `life_` values.
    pub rekey_packets: u64,
    pub life_packets: u64,
    pub rekey_bytes: u64,
    pub life_bytes: u64,
    pub replay_window: u32,
}

impl Connection {
    /// The dataplane name of a child's outbound SA, and the prefix of every
    /// name the connection's SAs and rules carry.
    pub fn child_sa_name(&self, child: &str) -> String {
        format!("{}/{child}", self.name)
    }
}

/// What a connection offers and accepts when `proposals` is not given:
/// AEAD first, then CBC with HMAC, every PRF and DH group bitw has.
pub const DEFAULT_IKE_PROPOSALS: &[&str] = &[
    "aes128gcm16-aes256gcm16-prfsha256-prfsha384-prfsha512-x25519-ecp256-ecp384-modp2048",
    "aes128-aes256-sha256-sha384-sha512-x25519-ecp256-ecp384-modp2048",
];

/// ESP proposals when `esp_proposals` is not given: every AEAD the dataplane runs.
pub const DEFAULT_ESP_PROPOSALS: &[&str] = &["aes128gcm16-aes256gcm16-chacha20poly1305"];

fn default_ike_proposals() -> Vec<String> {
    DEFAULT_IKE_PROPOSALS
        .iter()
        .map(|s| s.to_string())
        .collect()
}

fn default_esp_proposals() -> Vec<String> {
    DEFAULT_ESP_PROPOSALS
        .iter()
        .map(|s| s.to_string())
        .collect()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConnection {
    name: Spanned<String>,
    terminal: Spanned<String>,
    remote_addrs: Spanned<Vec<String>>,
    proposals: Option<Spanned<Vec<String>>>,
    local_id: Option<Spanned<String>>,
    remote_id: Option<Spanned<String>>,
    auth: Spanned<String>,
    psk_file: Option<Spanned<PathBuf>>,
    local_cert: Option<Spanned<PathBuf>>,
    local_key: Option<Spanned<PathBuf>>,
    #[serde(default)]
    ca_certs: Vec<PathBuf>,
    start_action: Option<StartAction>,
    dpd_delay: Option<DurationValue>,
    rekey_time: Option<DurationValue>,
    keepalive_interval: Option<DurationValue>,
    retransmit_timeout: Option<Spanned<DurationValue>>,
    retransmit_base: Option<Spanned<f64>>,
    retransmit_tries: Option<Spanned<u32>>,
    #[serde(default)]
    children: Vec<RawChild>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawChild {
    name: Spanned<String>,
    mode: Option<ChildMode>,
    esp_proposals: Option<Spanned<Vec<String>>>,
    local_ts: Option<Spanned<Vec<String>>>,
    remote_ts: Option<Spanned<Vec<String>>>,
    rekey_time: Option<DurationValue>,
    life_time: Option<Spanned<DurationValue>>,
    #[serde(default)]
    rekey_packets: u64,
    #[serde(default)]
    life_packets: u64,
    #[serde(default)]
    rekey_bytes: u64,
    #[serde(default)]
    life_bytes: u64,
    replay_window: Option<u32>,
}

/// A Child SA's ESP mode (tunnel: the SA's outer addresses are the
/// terminal's and the counterpart's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChildMode {
    Tunnel,
    Transport,
}

/// A duration where "0" means off.
fn optional(d: Option<DurationValue>, default: Option<Duration>) -> Option<Duration> {
    match d {
        Some(DurationValue(d)) if d.is_zero() => None,
        Some(DurationValue(d)) => Some(d),
        None => default,
    }
}

/// Where each connection field was written, for messages bitw-control
/// produces later (proposal syntax, certificates).
pub(crate) type FieldLines = BTreeMap<String, usize>;

pub(crate) fn load_connections(
    ctx: &Ctx,
    raw: Vec<RawConnection>,
    terminals: &[Terminal],
    static_names: &[&str],
    lines: &mut FieldLines,
) -> Result<Vec<Connection>, ConfigError> {
    let mut out: Vec<Connection> = Vec::with_capacity(raw.len());
    for (i, r) in raw.into_iter().enumerate() {
        let field = |f: &str| format!("connection[{i}].{f}");
        lines.insert(field("name"), line_of_span(ctx, r.name.span()));
        let proposals = match &r.proposals {
            Some(p) if p.get_ref().is_empty() => {
                return ctx.err(
                    p.span(),
                    field("proposals"),
                    "at least one proposal is needed".into(),
                )
            }
            Some(p) => {
                lines.insert(field("proposals"), line_of_span(ctx, p.span()));
                p.get_ref().clone()
            }
            None => {
                lines.insert(field("proposals"), line_of_span(ctx, r.name.span()));
                default_ike_proposals()
            }
        };
        let name = r.name.get_ref().trim().to_string();
        check_name(ctx, &r.name, &name, field("name"), "connection")?;
        if out.iter().any(|c| c.name == name) {
            return ctx.err(
                r.name.span(),
                field("name"),
                format!("connection name `{name}` is used twice"),
            );
        }
        if let Some(s) = static_names
            .iter()
            .find(|s| s.starts_with(&format!("{name}/")))
        {
            return ctx.err(
                r.name.span(),
                field("name"),
                format!("the static SA or rule `{s}` would collide with this connection's SA and rule names (`{name}/...`): rename one"),
            );
        }
        let tname = r.terminal.get_ref().trim();
        let Some(terminal) = terminals.iter().find(|t| t.name == tname) else {
            let known: Vec<&str> = terminals.iter().map(|t| t.name.as_str()).collect();
            return ctx.err(
                r.terminal.span(),
                field("terminal"),
                if known.is_empty() {
                    format!("no [[terminal]] is named `{tname}` (there are none)")
                } else {
                    format!(
                        "no [[terminal]] is named `{tname}` (known: {})",
                        known.join(", ")
                    )
                },
            );
        };
        let mut remote_addrs = Vec::new();
        for a in r.remote_addrs.get_ref() {
            let addr: IpAddr = a.trim().parse().or_else(|_| {
                ctx.err(
                    r.remote_addrs.span(),
                    field("remote_addrs"),
                    format!("`{a}` is not an IPv4 or IPv6 address"),
                )
            })?;
            if addr.is_ipv4() != terminal.address.is_ipv4() {
                return ctx.err(
                    r.remote_addrs.span(),
                    field("remote_addrs"),
                    format!(
                        "{addr} and the terminal's address {} are of different families: IKE runs between the two",
                        terminal.address
                    ),
                );
            }
            remote_addrs.push(addr);
        }
        if remote_addrs.is_empty() {
            return ctx.err(
                r.remote_addrs.span(),
                field("remote_addrs"),
                "at least one counterpart address is needed".into(),
            );
        }
        for c in &out {
            if c.terminal == terminal.name {
                if let Some(a) = c.remote_addrs.iter().find(|a| remote_addrs.contains(a)) {
                    return ctx.err(
                        r.remote_addrs.span(),
                        field("remote_addrs"),
                        format!(
                            "connection `{}` already pairs terminal `{}` with {a}: put further Child SAs into that connection's [[connection.children]]",
                            c.name, terminal.name
                        ),
                    );
                }
            }
        }
        let id = |v: &Option<Spanned<String>>, f: &str, default: String| match v {
            Some(s) if s.get_ref().trim().is_empty() => {
                ctx.err(s.span(), field(f), "empty identity".into())
            }
            Some(s) => Ok(s.get_ref().trim().to_string()),
            None => Ok(default),
        };
        let local_id = id(&r.local_id, "local_id", terminal.address.to_string())?;
        let remote_id = id(&r.remote_id, "remote_id", remote_addrs[0].to_string())?;
        let auth = match r.auth.get_ref().trim() {
            "psk" => {
                let Some(f) = &r.psk_file else {
                    return ctx.err(
                        r.auth.span(),
                        field("psk_file"),
                        "auth = \"psk\" needs psk_file (the pre-shared key, mode 0600)".into(),
                    );
                };
                let psk = read_psk_file(f.get_ref())
                    .or_else(|e| ctx.err(f.span(), field("psk_file"), e))?;
                ConnAuth::Psk {
                    psk_file: f.get_ref().clone(),
                    psk,
                }
            }
            "pubkey" => {
                let (Some(cert), Some(key)) = (&r.local_cert, &r.local_key) else {
                    return ctx.err(
                        r.auth.span(),
                        field("local_cert"),
                        "auth = \"pubkey\" needs local_cert, local_key and ca_certs".into(),
                    );
                };
                if r.ca_certs.is_empty() {
                    return ctx.err(
                        r.auth.span(),
                        field("ca_certs"),
                        "auth = \"pubkey\" needs ca_certs: the CAs the counterpart's certificate must chain to".into(),
                    );
                }
                lines.insert(field("local_cert"), line_of_span(ctx, cert.span()));
                lines.insert(field("local_key"), line_of_span(ctx, key.span()));
                lines.insert(field("ca_certs"), line_of_span(ctx, r.auth.span()));
                ConnAuth::Pubkey {
                    local_cert: cert.get_ref().clone(),
                    local_key: key.get_ref().clone(),
                    ca_certs: r.ca_certs.clone(),
                }
            }
            other => {
                return ctx.err(
                    r.auth.span(),
                    field("auth"),
                    format!("`{other}`: expected \"psk\" or \"pubkey\""),
                )
            }
        };
        let retransmit_timeout = match r.retransmit_timeout {
            Some(t) if t.get_ref().0.is_zero() => {
                return ctx.err(
                    t.span(),
                    field("retransmit_timeout"),
                    "must be more than 0".into(),
                )
            }
            Some(t) => t.into_inner().0,
            None => Duration::from_secs(1),
        };
        let retransmit_base = match r.retransmit_base {
            Some(b) if !(1.0..=10.0).contains(b.get_ref()) => {
                return ctx.err(
                    b.span(),
                    field("retransmit_base"),
                    format!("{} is not in 1.0..=10.0", b.get_ref()),
                )
            }
            Some(b) => b.into_inner(),
            None => 2.0,
        };
        let retransmit_tries = match r.retransmit_tries {
            Some(t) if !(1..=20).contains(t.get_ref()) => {
                return ctx.err(
                    t.span(),
                    field("retransmit_tries"),
                    format!("{} is not in 1..=20", t.get_ref()),
                )
            }
            Some(t) => t.into_inner(),
            None => 5,
        };
        if r.children.is_empty() {
            return ctx.err(
                r.name.span(),
                field("children"),
                "a connection needs at least one [[connection.children]]".into(),
            );
        }
        let mut children: Vec<Child> = Vec::new();
        for (j, c) in r.children.into_iter().enumerate() {
            let cfield = |f: &str| format!("connection[{i}].children[{j}].{f}");
            let cname = c.name.get_ref().trim().to_string();
            check_name(ctx, &c.name, &cname, cfield("name"), "child")?;
            if children.iter().any(|o| o.name == cname) {
                return ctx.err(
                    c.name.span(),
                    cfield("name"),
                    format!("child name `{cname}` is used twice in connection `{name}`"),
                );
            }
            lines.insert(cfield("name"), line_of_span(ctx, c.name.span()));
            let esp_proposals = match &c.esp_proposals {
                Some(p) if p.get_ref().is_empty() => {
                    return ctx.err(
                        p.span(),
                        cfield("esp_proposals"),
                        "at least one ESP proposal is needed".into(),
                    )
                }
                Some(p) => {
                    lines.insert(cfield("esp_proposals"), line_of_span(ctx, p.span()));
                    p.get_ref().clone()
                }
                None => {
                    lines.insert(cfield("esp_proposals"), line_of_span(ctx, c.name.span()));
                    default_esp_proposals()
                }
            };
            let selectors = |v: &Option<Spanned<Vec<String>>>, f: &str, default: Vec<IpAddr>| {
                let Some(list) = v else {
                    return Ok(default
                        .into_iter()
                        .map(|a| Prefix {
                            addr: a,
                            len: if a.is_ipv4() { 32 } else { 128 },
                        })
                        .collect::<Vec<_>>());
                };
                if list.get_ref().is_empty() {
                    return ctx.err(
                        list.span(),
                        cfield(f),
                        "at least one prefix is needed".into(),
                    );
                }
                list.get_ref()
                    .iter()
                    .map(|s| {
                        s.parse::<Prefix>()
                            .or_else(|e| ctx.err(list.span(), cfield(f), e))
                    })
                    .collect()
            };
            let local_ts = selectors(&c.local_ts, "local_ts", vec![terminal.address])?;
            let remote_ts = selectors(&c.remote_ts, "remote_ts", remote_addrs.clone())?;
            let v4 = |ts: &[Prefix]| ts.iter().any(|p| p.addr.is_ipv4());
            let v6 = |ts: &[Prefix]| ts.iter().any(|p| p.addr.is_ipv6());
            if (v4(&local_ts) && !v4(&remote_ts)) || (v6(&local_ts) && !v6(&remote_ts)) {
                let span = c
                    .remote_ts
                    .as_ref()
                    .or(c.local_ts.as_ref())
                    .map_or(c.name.span(), |s| s.span());
                return ctx.err(
                    span,
                    cfield("remote_ts"),
                    "local_ts and remote_ts must cover the same address families (a packet has one family)".into(),
                );
            }
            let rekey_time = optional(c.rekey_time, Some(Duration::from_secs(3600)));
            let life_time = match c.life_time {
                Some(l) => {
                    let v = optional(Some(DurationValue(l.get_ref().0)), None);
                    if let (Some(life), Some(rekey)) = (v, rekey_time) {
                        if life <= rekey {
                            return ctx.err(
                                l.span(),
                                cfield("life_time"),
                                format!("{life:?} is not after rekey_time ({rekey:?}): the SA would die before it is rekeyed"),
                            );
                        }
                    }
                    v
                }
                // strongSwan's default: 10 % after the rekey time.
                None => rekey_time.map(|r| r.mul_f64(1.1)),
            };
            let limits = [
                ("packets", c.rekey_packets, c.life_packets),
                ("bytes", c.rekey_bytes, c.life_bytes),
            ];
            for (what, rekey, life) in limits {
                if rekey > 0 && life > 0 && life <= rekey {
                    return ctx.err(
                        c.name.span(),
                        cfield(&format!("life_{what}")),
                        format!("life_{what} ({life}) must be more than rekey_{what} ({rekey})"),
                    );
                }
            }
            children.push(Child {
                name: cname,
                mode: c.mode.unwrap_or(ChildMode::Tunnel),
                esp_proposals,
                local_ts,
                remote_ts,
                rekey_time,
                life_time,
                rekey_packets: c.rekey_packets,
                life_packets: c.life_packets,
                rekey_bytes: c.rekey_bytes,
                life_bytes: c.life_bytes,
                replay_window: c.replay_window.unwrap_or(1024),
            });
        }
        out.push(Connection {
            name,
            terminal: terminal.name.clone(),
            terminal_address: terminal.address,
            remote_addrs,
            proposals,
            local_id,
            remote_id,
            auth,
            start_action: r.start_action.unwrap_or(StartAction::Trap),
            dpd_delay: optional(r.dpd_delay, Some(Duration::from_secs(30))),
            rekey_time: optional(r.rekey_time, Some(Duration::from_secs(4 * 3600))),
            keepalive_interval: optional(r.keepalive_interval, Some(Duration::from_secs(20))),
            retransmit_timeout,
            retransmit_base,
            retransmit_tries,
            children,
        });
    }
    Ok(out)
}

fn line_of_span(ctx: &Ctx, span: std::ops::Range<usize>) -> usize {
    crate::config::line_of(ctx.text, span.start)
}

/// Connection and child names become parts of SA and rule names.
fn check_name(
    ctx: &Ctx,
    spanned: &Spanned<String>,
    name: &str,
    field: String,
    what: &str,
) -> Result<(), ConfigError> {
    if name.is_empty() {
        return ctx.err(spanned.span(), field, format!("empty {what} name"));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return ctx.err(
            spanned.span(),
            field,
            format!("{what} name `{name}`: use letters, digits, `-`, `_` and `.` only"),
        );
    }
    Ok(())
}

/// Reads a pre-shared key file: the secret as text (surrounding whitespace
/// trimmed), or `0x` and hex digits for a binary one, as in strongSwan's
/// secrets. Like key files it must not be readable by group or others.
pub fn read_psk_file(path: &Path) -> Result<Zeroizing<Vec<u8>>, String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read the PSK file: {e}"))?;
    let mode = meta.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(format!(
            "the PSK file is readable by others (mode {:o}); run `chmod 600 {}`",
            mode & 0o777,
            path.display()
        ));
    }
    let text = Zeroizing::new(
        std::fs::read_to_string(path).map_err(|e| format!("cannot read the PSK file: {e}"))?,
    );
    let t = text.trim();
    let bytes = match t.strip_prefix("0x") {
        Some(hex) => {
            if !hex.len().is_multiple_of(2) || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
                return Err(
                    "a PSK starting with 0x must continue with hex digits (an even number of them)"
                        .into(),
                );
            }
            (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex checked above"))
                .collect()
        }
        None => t.as_bytes().to_vec(),
    };
    // RFC 7296 §2.15 asks for keys as strong as the PRF's; a short one is a
    // configuration mistake worth stopping for.
    if bytes.len() < 16 {
        return Err(format!(
            "the PSK is {} bytes long; use at least 16 (e.g. `openssl rand -hex 32`)",
            bytes.len()
        ));
    }
    Ok(Zeroizing::new(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::os::unix::fs::PermissionsExt;

    const BASE: &str = "[ports.inside]\ndevice = \"net_null0\"\n[ports.outside]\ndevice = \"net_null1\"\n\n[[terminal]]\nname = \"meter\"\naddress = \"10.99.0.1\"\n";

    fn psk_file(tag: &str, mode: u32, content: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("bitw-conn-{tag}-{}.psk", std::process::id()));
        std::fs::write(&p, content).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    fn with_conn(psk: &Path, conn_extra: &str, child_extra: &str) -> String {
        format!(
            "{BASE}\n[[connection]]\nname = \"meter-hq\"\nterminal = \"meter\"\nremote_addrs = [\"10.99.0.2\"]\nauth = \"psk\"\npsk_file = \"{}\"\n{conn_extra}\n[[connection.children]]\nname = \"data\"\n{child_extra}",
            psk.display()
        )
    }

    fn parse(text: &str) -> Result<Config, crate::config::ConfigError> {
        Config::parse(Path::new("bitw.toml"), text)
    }

    #[test]
    fn defaults_follow_strongswan() {
        let psk = psk_file("defaults", 0o600, "a strong pre-shared key\n");
        let c = parse(&with_conn(&psk, "", "")).unwrap();
        let conn = &c.connections[0];
        assert_eq!(
            conn.terminal_address,
            "10.99.0.1".parse::<IpAddr>().unwrap()
        );
        assert_eq!(conn.local_id, "10.99.0.1");
        assert_eq!(conn.remote_id, "10.99.0.2");
        assert_eq!(conn.start_action, StartAction::Trap);
        assert_eq!(conn.rekey_time, Some(Duration::from_secs(4 * 3600)));
        assert_eq!(conn.dpd_delay, Some(Duration::from_secs(30)));
        assert_eq!(conn.proposals, default_ike_proposals());
        match &conn.auth {
            ConnAuth::Psk { psk, .. } => assert_eq!(&psk[..], b"a strong pre-shared key"),
            other => panic!("{other:?}"),
        }
        let child = &conn.children[0];
        assert_eq!(child.mode, ChildMode::Tunnel);
        assert_eq!(child.local_ts, vec!["10.99.0.1/32".parse().unwrap()]);
        assert_eq!(child.remote_ts, vec!["10.99.0.2/32".parse().unwrap()]);
        assert_eq!(child.rekey_time, Some(Duration::from_secs(3600)));
        assert_eq!(child.life_time, Some(Duration::from_secs(3960)));
        assert_eq!(conn.child_sa_name("data"), "meter-hq/data");
        // the PSK never shows in Debug
        assert!(!format!("{c:?}").contains("strong pre-shared"));
        let _ = std::fs::remove_file(psk);
    }

    #[test]
    fn hex_psk_and_zero_durations() {
        let psk = psk_file("hex", 0o600, "0x00112233445566778899aabbccddeeff\n");
        let c = parse(&with_conn(
            &psk,
            "dpd_delay = \"0s\"\nrekey_time = 0\nstart_action = \"none\"\n",
            "rekey_time = \"0\"\nmode = \"transport\"\nlocal_ts = [\"10.99.0.0/24\"]\nremote_ts = [\"10.0.0.0/8\", \"192.0.2.0/24\"]\n",
        ))
        .unwrap();
        let conn = &c.connections[0];
        assert_eq!(conn.dpd_delay, None);
        assert_eq!(conn.rekey_time, None);
        assert_eq!(conn.start_action, StartAction::None);
        match &conn.auth {
            ConnAuth::Psk { psk, .. } => assert_eq!(psk.len(), 16),
            other => panic!("{other:?}"),
        }
        let child = &conn.children[0];
        assert_eq!((child.rekey_time, child.life_time), (None, None));
        assert_eq!(child.mode, ChildMode::Transport);
        assert_eq!(child.remote_ts.len(), 2);
        let _ = std::fs::remove_file(psk);
    }

    #[test]
    fn errors_name_line_and_field() {
        let psk = psk_file("errs", 0o600, "a strong pre-shared key\n");
        let loose = psk_file("loose", 0o644, "a strong pre-shared key\n");
        let short = psk_file("short", 0o600, "tiny\n");
        let cases: Vec<(String, &str, &str)> = vec![
            (
                with_conn(&psk, "", "").replace("terminal = \"meter\"", "terminal = \"nobody\""),
                "connection[0].terminal",
                "no [[terminal]] is named `nobody`",
            ),
            (
                with_conn(&psk, "", "").replace("[\"10.99.0.2\"]", "[\"fd00::2\"]"),
                "connection[0].remote_addrs",
                "different families",
            ),
            (
                with_conn(&psk, "", "").replace("[\"10.99.0.2\"]", "[\"10.99.0\"]"),
                "connection[0].remote_addrs",
                "not an IPv4 or IPv6 address",
            ),
            (
                with_conn(&psk, "", "").replace("[\"10.99.0.2\"]", "[]"),
                "connection[0].remote_addrs",
                "at least one",
            ),
            (
                with_conn(&psk, "", "").replace("auth = \"psk\"", "auth = \"eap\""),
                "connection[0].auth",
                "\"psk\" or \"pubkey\"",
            ),
            (
                with_conn(&loose, "", ""),
                "connection[0].psk_file",
                "readable by others",
            ),
            (
                with_conn(&short, "", ""),
                "connection[0].psk_file",
                "at least 16",
            ),
            (
                with_conn(&psk, "", "").replace("auth = \"psk\"", "auth = \"pubkey\""),
                "connection[0].local_cert",
                "needs local_cert",
            ),
            (
                with_conn(&psk, "", "local_ts = [\"10.99.0.1/24\"]\n"),
                "connection[0].children[0].local_ts",
                "host bits",
            ),
            (
                with_conn(&psk, "", "local_ts = [\"fd00::/64\"]\n"),
                "connection[0].children[0].remote_ts",
                "same address families",
            ),
            (
                with_conn(&psk, "", "rekey_time = \"1h\"\nlife_time = \"30m\"\n"),
                "connection[0].children[0].life_time",
                "not after rekey_time",
            ),
            (
                with_conn(&psk, "", "").replace("name = \"data\"", "name = \"da/ta\""),
                "connection[0].children[0].name",
                "letters, digits",
            ),
            (
                with_conn(&psk, "", "").replace("name = \"meter-hq\"", "name = \"\""),
                "connection[0].name",
                "empty",
            ),
        ];
        for (text, field, needle) in cases {
            let e = parse(&text).unwrap_err();
            assert_eq!(e.field.as_deref(), Some(field), "{e}");
            assert!(e.message.contains(needle), "{e}");
            assert!(e.line.is_some(), "{e}");
        }
        // two connections pairing the same terminal and counterpart
        let text = with_conn(&psk, "", "");
        let twice = format!(
            "{text}{}",
            &text[text.find("\n[[connection]]").unwrap()..].replace("meter-hq", "meter-hq2")
        );
        let e = parse(&twice).unwrap_err();
        assert_eq!(
            e.field.as_deref(),
            Some("connection[1].remote_addrs"),
            "{e}"
        );
        // a connection without children
        let text = with_conn(&psk, "", "");
        let e = parse(&text[..text.find("[[connection.children]]").unwrap()]).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("connection[0].children"), "{e}");
        for f in [psk, loose, short] {
            let _ = std::fs::remove_file(f);
        }
    }

    #[test]
    fn field_lines_reach_control() {
        let psk = psk_file("lines", 0o600, "a strong pre-shared key\n");
        let c = parse(&with_conn(
            &psk,
            "proposals = [\"bogus\"]\n",
            "esp_proposals = [\"x\"]\n",
        ))
        .unwrap();
        let e = c.field_error("connection[0].proposals", "bad");
        assert_eq!(e.line, Some(16), "{e}");
        let e = c.field_error("connection[0].children[0].esp_proposals", "bad");
        assert_eq!(e.line, Some(20), "{e}");
        assert!(e
            .to_string()
            .starts_with("bitw.toml:20: field `connection[0].children[0].esp_proposals`"));
        let _ = std::fs::remove_file(psk);
    }
}
