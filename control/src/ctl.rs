//! `bitwctl`: the administrator's CLI. It talks to bitw-control over the
//! admin socket ([`crate::admin`]) and prints a table, or with `--json`
//! the answer's `data` as it is (stable field names).
//!
//! Exit codes: 0 ok; 1 control refused or failed the request; 2 usage or
//! configuration error; 3 cannot reach bitw-control.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use zeroize::Zeroizing;

use bitw_common::proto::{LimitsSpec, Origin, RuleSpec, SaSpec, Stats};
use bitw_common::rules::Direction;
use bitw_common::sa_params::AeadAlg;

use crate::admin::{
    self, AdminRequest, AdminResponse, ChangeResult, ClientError, ErrorKind, IkeResult, IkeSaInfo,
    PolicyEntry, SaEntry, StatusInfo, TerminalsInfo,
};

pub const DEFAULT_SOCKET: &str = "/run/bitw/control.sock";

pub const EXIT_OK: i32 = 0;
pub const EXIT_REFUSED: i32 = 1;
pub const EXIT_USAGE: i32 = 2;
pub const EXIT_UNREACHABLE: i32 = 3;

const EXAMPLES: &str = "\
Examples:
  bitwctl status
  bitwctl --config /etc/bitw/bitw.toml sa list
  bitwctl sa list --json
  bitwctl sa add --name to-hq --direction out --spi 0x1001 --mode tunnel \\
      --tunnel-src 172.16.0.1 --tunnel-dst 172.16.0.2 \\
      --aead aes128gcm16 --key-file /etc/bitw/to-hq.key
  bitwctl policy add --name web --direction out --src 10.0.0.0/24 --dst 10.1.0.0/16 \\
      --proto tcp --dport 443 --action protect --sa to-hq --before default-deny
  bitwctl sa del to-hq --direction out
  bitwctl counters
  bitwctl ike list
  bitwctl ike initiate meter-hq
  bitwctl ike terminate meter-hq      (or an IKE SA id from `ike list`)
  bitwctl reload

Exit codes: 0 ok; 1 bitw-control refused or failed the request (its message
is printed); 2 usage or configuration error; 3 bitw-control cannot be reached.";

/// Administer a running bitw-control (SAs, filter rules, terminals, counters).
#[derive(Parser, Debug)]
#[command(name = "bitwctl", version, after_help = EXAMPLES)]
pub struct Cli {
    /// bitw-control's admin socket [default: `[control] admin_socket` of
    /// --config, else /run/bitw/control.sock]
    #[arg(long, global = true, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// The configuration file bitw-control runs with (to find its admin socket)
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Print the answer as JSON (stable field names) instead of a table
    #[arg(long, global = true)]
    pub json: bool,
    /// Seconds to wait for bitw-control's answer
    #[arg(long, global = true, value_name = "SECONDS", default_value_t = 30)]
    pub timeout: u64,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Control's version and uptime, the dataplane link, SA and rule counts, events, last reload
    Status,
    /// Security associations
    #[command(subcommand)]
    Sa(SaCmd),
    /// The filter table
    #[command(subcommand)]
    Policy(PolicyCmd),
    /// Configured terminals and the neighbours the dataplane learned
    Terminals,
    /// The dataplane's counters: ports, workers, drops, ESP, SAs
    Counters,
    /// The key exchange proxy: IKE SAs and their Child SAs
    #[command(subcommand)]
    Ike(IkeCmd),
    /// Re-read the configuration file and apply only what changed
    Reload,
}

#[derive(Subcommand, Debug)]
pub enum SaCmd {
    /// All SAs with their counters and state
    List,
    /// One SA in detail (both directions unless --direction)
    Show {
        name: String,
        #[arg(long)]
        direction: Option<Dir>,
    },
    /// Install an SA (origin admin); the key is read from a 0600 file
    Add(SaAddArgs),
    /// Remove an SA (both directions unless --direction)
    Del {
        name: String,
        #[arg(long)]
        direction: Option<Dir>,
    },
}

#[derive(Subcommand, Debug)]
pub enum IkeCmd {
    /// IKE SAs (addresses, state, role, SPIs, NAT, age) and their Child SAs
    List,
    /// Start a connection's IKE SA (and its Child SA) as its terminal
    Initiate {
        /// A `[[connection]]` name
        connection: String,
    },
    /// Delete IKE SAs with the peer; their Child SAs leave the dataplane
    Terminate {
        /// A connection name (all its IKE SAs) or an IKE SA id
        #[arg(value_name = "CONNECTION|ID")]
        name: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum PolicyCmd {
    /// The rules in order (first match per direction wins)
    List,
    /// Add a rule (origin admin); appended unless --before or --position
    Add(PolicyAddArgs),
    /// Remove a rule
    Del { name: String },
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    /// inside -> outside
    Out,
    /// outside -> inside
    In,
}

impl From<Dir> for Direction {
    fn from(d: Dir) -> Direction {
        match d {
            Dir::Out => Direction::Out,
            Dir::In => Direction::In,
        }
    }
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModeArg {
    Tunnel,
    Transport,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum EncapArg {
    None,
    Udp,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActionArg {
    Protect,
    Bypass,
    Discard,
}

#[derive(Args, Debug)]
pub struct SaAddArgs {
    #[arg(long)]
    pub name: String,
    #[arg(long)]
    pub direction: Dir,
    /// 0x00001001 or decimal (256 and up)
    #[arg(long, value_parser = parse_spi)]
    pub spi: u32,
    #[arg(long)]
    pub mode: ModeArg,
    /// Tunnel mode: the outer source address
    #[arg(long, value_name = "IP")]
    pub tunnel_src: Option<IpAddr>,
    /// Tunnel mode: the outer destination address
    #[arg(long, value_name = "IP")]
    pub tunnel_dst: Option<IpAddr>,
    /// udp: ESP in UDP (RFC 3948)
    #[arg(long, default_value = "none")]
    pub encap: EncapArg,
    /// With --encap udp [default: 4500]
    #[arg(long, value_name = "PORT")]
    pub udp_sport: Option<u16>,
    /// With --encap udp [default: 4500]
    #[arg(long, value_name = "PORT")]
    pub udp_dport: Option<u16>,
    /// aes128gcm16 | aes256gcm16 | chacha20poly1305
    #[arg(long, value_parser = parse_aead)]
    pub aead: String,
    /// Hex key then the 4-byte salt; mode 0600 or stricter
    #[arg(long, value_name = "PATH")]
    pub key_file: PathBuf,
    /// 64-bit extended sequence numbers (the default)
    #[arg(long, overrides_with = "no_esn")]
    pub esn: bool,
    /// 32-bit sequence numbers
    #[arg(long, overrides_with = "esn")]
    pub no_esn: bool,
    /// Inbound SAs: anti-replay window in packets, 0 = off [default: 1024]
    #[arg(long, value_name = "N")]
    pub replay_window: Option<u32>,
    /// SOFT:HARD packets, 0 = no limit
    #[arg(long, value_parser = parse_limits, value_name = "SOFT:HARD")]
    pub lifetime_packets: Option<LimitsSpec>,
    /// SOFT:HARD bytes, 0 = no limit
    #[arg(long, value_parser = parse_limits, value_name = "SOFT:HARD")]
    pub lifetime_bytes: Option<LimitsSpec>,
    /// Inbound SAs: the name inbound protect rules use for this SA (several
    /// SAs may share one, e.g. the old and new SA of a rekey) [default: --name]
    #[arg(long, value_name = "NAME")]
    pub policy: Option<String>,
}

#[derive(Args, Debug)]
pub struct PolicyAddArgs {
    #[arg(long)]
    pub name: String,
    #[arg(long)]
    pub direction: Dir,
    /// Prefix or any
    #[arg(long, default_value = "any")]
    pub src: String,
    /// Prefix or any
    #[arg(long, default_value = "any")]
    pub dst: String,
    /// any | tcp | udp | sctp | icmp | icmpv6 | a number
    #[arg(long, default_value = "any")]
    pub proto: String,
    /// any | 443 | 1000-2000 (icmp: the type)
    #[arg(long, default_value = "any")]
    pub sport: String,
    /// any | 443 | 1000-2000 (icmp: the code)
    #[arg(long, default_value = "any")]
    pub dport: String,
    #[arg(long)]
    pub action: ActionArg,
    /// The SA of a protect rule (it may be installed later)
    #[arg(long)]
    pub sa: Option<String>,
    /// Insert before this rule
    #[arg(long, value_name = "RULE", conflicts_with = "position")]
    pub before: Option<String>,
    /// Insert at this position (1 = first)
    #[arg(long, value_name = "N")]
    pub position: Option<usize>,
}

pub fn parse_spi(s: &str) -> Result<u32, String> {
    let t = s.trim();
    let v = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(h) => u32::from_str_radix(h, 16),
        None => t.parse(),
    }
    .map_err(|_| format!("`{s}` is not an SPI: 0x00001001 or a decimal number"))?;
    if v < 256 {
        return Err(format!("SPI {v:#x} is reserved (1-255; RFC 4303 §2.1)"));
    }
    Ok(v)
}

fn parse_aead(s: &str) -> Result<String, String> {
    AeadAlg::from_name(s)
        .map(|a| a.name().to_string())
        .ok_or_else(|| format!("`{s}`: expected aes128gcm16, aes256gcm16 or chacha20poly1305"))
}

pub fn parse_limits(s: &str) -> Result<LimitsSpec, String> {
    let bad = || format!("`{s}`: expected SOFT:HARD, e.g. 900000:1000000 (0 = no limit)");
    let (soft, hard) = s.split_once(':').ok_or_else(bad)?;
    let soft: u64 = soft.trim().parse().map_err(|_| bad())?;
    let hard: u64 = hard.trim().parse().map_err(|_| bad())?;
    if soft != 0 && hard != 0 && soft >= hard {
        return Err(format!(
            "`{s}`: the soft limit must be below the hard limit"
        ));
    }
    Ok(LimitsSpec { soft, hard })
}

impl SaAddArgs {
    /// The SA to send, key read from the key file; errors are usage errors.
    pub fn to_spec(&self) -> Result<SaSpec, String> {
        let direction: Direction = self.direction.into();
        if self.encap == EncapArg::None && (self.udp_sport.is_some() || self.udp_dport.is_some()) {
            return Err("--udp-sport/--udp-dport need --encap udp".into());
        }
        if direction == Direction::Out && self.replay_window.is_some() {
            return Err("--replay-window is for inbound SAs (--direction in)".into());
        }
        if direction == Direction::Out && self.policy.is_some() {
            return Err(
                "--policy is for inbound SAs (--direction in); an outbound SA is replaced by name"
                    .into(),
            );
        }
        let key = crate::keyfile::read_key_file(&self.key_file)?;
        let spec = SaSpec {
            name: self.name.trim().to_string(),
            direction,
            spi: self.spi,
            mode: match self.mode {
                ModeArg::Tunnel => "tunnel",
                ModeArg::Transport => "transport",
            }
            .into(),
            tunnel_src: self.tunnel_src,
            tunnel_dst: self.tunnel_dst,
            encap: match self.encap {
                EncapArg::None => "none",
                EncapArg::Udp => "udp",
            }
            .into(),
            udp_sport: self.udp_sport.unwrap_or(4500),
            udp_dport: self.udp_dport.unwrap_or(4500),
            aead: self.aead.clone(),
            key: Zeroizing::new(hex::encode(&key[..])),
            esn: !self.no_esn,
            replay_window: self.replay_window.unwrap_or(match direction {
                Direction::In => 1024,
                Direction::Out => 0,
            }),
            lifetime_packets: self.lifetime_packets.unwrap_or_default(),
            lifetime_bytes: self.lifetime_bytes.unwrap_or_default(),
            origin: Origin::Admin,
            policy: self.policy.as_ref().map(|p| p.trim().to_string()),
        };
        // The same checks control and the dataplane make, with a message that
        // names the field (never the key).
        spec.to_params()?;
        Ok(spec)
    }
}

impl PolicyAddArgs {
    pub fn to_spec(&self) -> Result<RuleSpec, String> {
        let spec = RuleSpec {
            name: self.name.trim().to_string(),
            direction: self.direction.into(),
            src: self.src.clone(),
            dst: self.dst.clone(),
            proto: self.proto.clone(),
            sport: self.sport.clone(),
            dport: self.dport.clone(),
            action: match self.action {
                ActionArg::Protect => "protect",
                ActionArg::Bypass => "bypass",
                ActionArg::Discard => "discard",
            }
            .into(),
            sa: self.sa.clone(),
            origin: Origin::Admin,
        };
        spec.to_rule()?;
        Ok(spec)
    }
}

/// The admin socket: `--socket`, else `[control] admin_socket` of
/// `--config`, else the default. The config file is read leniently (only
/// that key), so a file being edited still tells where control listens.
pub fn resolve_socket(cli: &Cli) -> Result<PathBuf, String> {
    if let Some(s) = &cli.socket {
        return Ok(s.clone());
    }
    let Some(cfg) = &cli.config else {
        return Ok(PathBuf::from(DEFAULT_SOCKET));
    };
    let text = std::fs::read_to_string(cfg)
        .map_err(|e| format!("{}: cannot read the file: {e}", cfg.display()))?;
    let value: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| format!("{}: {}", cfg.display(), e.message()))?;
    match value.get("control").and_then(|c| c.get("admin_socket")) {
        None => Ok(PathBuf::from(DEFAULT_SOCKET)),
        Some(toml::Value::String(s)) if !s.is_empty() => Ok(PathBuf::from(s)),
        Some(_) => Err(format!(
            "{}: field `control.admin_socket`: expected a path",
            cfg.display()
        )),
    }
}

/// Builds the request for a command (reading key files); errors are usage errors.
pub fn request(cmd: &Cmd) -> Result<AdminRequest, String> {
    Ok(match cmd {
        Cmd::Status => AdminRequest::Status,
        Cmd::Terminals => AdminRequest::Terminals,
        Cmd::Counters => AdminRequest::Counters,
        Cmd::Reload => AdminRequest::Reload,
        Cmd::Sa(SaCmd::List) => AdminRequest::SaList,
        Cmd::Sa(SaCmd::Show { name, direction }) => AdminRequest::SaShow {
            name: name.clone(),
            direction: direction.map(Into::into),
        },
        Cmd::Sa(SaCmd::Add(a)) => AdminRequest::SaAdd { sa: a.to_spec()? },
        Cmd::Sa(SaCmd::Del { name, direction }) => AdminRequest::SaDel {
            name: name.clone(),
            direction: direction.map(Into::into),
        },
        Cmd::Policy(PolicyCmd::List) => AdminRequest::PolicyList,
        Cmd::Policy(PolicyCmd::Add(p)) => AdminRequest::PolicyAdd {
            rule: p.to_spec()?,
            before: p.before.clone(),
            position: p.position,
        },
        Cmd::Policy(PolicyCmd::Del { name }) => AdminRequest::PolicyDel { name: name.clone() },
        Cmd::Ike(IkeCmd::List) => AdminRequest::IkeList,
        Cmd::Ike(IkeCmd::Initiate { connection }) => AdminRequest::IkeInitiate {
            connection: connection.trim().to_string(),
        },
        Cmd::Ike(IkeCmd::Terminate { name }) => AdminRequest::IkeTerminate {
            name: name.trim().to_string(),
        },
    })
}

/// Runs bitwctl; returns the exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    run(&cli, &mut std::io::stdout())
}

pub fn run(cli: &Cli, out: &mut dyn std::io::Write) -> i32 {
    let fail = |code: i32, msg: &str| {
        eprintln!("bitwctl: {msg}");
        code
    };
    let socket = match resolve_socket(cli) {
        Ok(s) => s,
        Err(e) => return fail(EXIT_USAGE, &e),
    };
    let req = match request(&cli.cmd) {
        Ok(r) => r,
        Err(e) => return fail(EXIT_USAGE, &e),
    };
    let resp = match admin::call(&socket, &req, Duration::from_secs(cli.timeout.max(1))) {
        Ok(r) => r,
        Err(e @ ClientError::Connect { .. }) => {
            return fail(
                EXIT_UNREACHABLE,
                &format!(
                    "{e}\n  Is bitw-control running? Start it with `bitw-control --config /etc/bitw/bitw.toml`,\n  or point bitwctl at its socket with --socket PATH or --config FILE."
                ),
            )
        }
        Err(e) => return fail(EXIT_UNREACHABLE, &e.to_string()),
    };
    // The table's footer names the default action, which `status` knows.
    let default_action = match (&cli.cmd, cli.json, resp.ok) {
        (Cmd::Policy(PolicyCmd::List), false, true) => admin::call(
            &socket,
            &AdminRequest::Status,
            Duration::from_secs(cli.timeout.max(1)),
        )
        .ok()
        .and_then(|r| decode::<StatusInfo>(r.data).ok())
        .map(|s| s.default_action),
        _ => None,
    };
    print_response(cli, &resp, default_action, out)
}

fn print_response(
    cli: &Cli,
    resp: &AdminResponse,
    default_action: Option<String>,
    out: &mut dyn std::io::Write,
) -> i32 {
    if !resp.ok {
        let msg = resp.error.clone().unwrap_or_else(|| "failed".into());
        if cli.json {
            let _ = writeln!(
                out,
                "{}",
                serde_json::to_string_pretty(resp).unwrap_or_default()
            );
        }
        eprintln!("bitwctl: {msg}");
        return match resp.error_kind {
            Some(ErrorKind::Config | ErrorKind::BadRequest) => EXIT_USAGE,
            _ => EXIT_REFUSED,
        };
    }
    if cli.json {
        let _ = writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&resp.data).unwrap_or_default()
        );
        return EXIT_OK;
    }
    let data = resp.data.clone();
    let text = match &cli.cmd {
        Cmd::Status => decode::<StatusInfo>(data).map(|s| fmt_status(&s)),
        Cmd::Sa(SaCmd::List) => decode::<Vec<SaEntry>>(data).map(|v| fmt_sa_list(&v)),
        Cmd::Sa(SaCmd::Show { .. }) => decode::<Vec<SaEntry>>(data).map(|v| fmt_sa_show(&v)),
        Cmd::Policy(PolicyCmd::List) => {
            decode::<Vec<PolicyEntry>>(data).map(|p| fmt_policy(&p, default_action.as_deref()))
        }
        Cmd::Terminals => decode::<TerminalsInfo>(data).map(|t| fmt_terminals(&t)),
        Cmd::Counters => decode::<Stats>(data).map(|s| fmt_counters(&s)),
        Cmd::Ike(IkeCmd::List) => decode::<Vec<IkeSaInfo>>(data).map(|v| fmt_ike_list(&v)),
        Cmd::Ike(_) => decode::<IkeResult>(data).map(|r| format!("{}\n", r.message)),
        _ => decode::<ChangeResult>(data).map(|c| fmt_change(&c)),
    };
    match text {
        Ok(t) => {
            let _ = write!(out, "{t}");
            EXIT_OK
        }
        Err(e) => {
            eprintln!("bitwctl: cannot read bitw-control's answer: {e}");
            EXIT_REFUSED
        }
    }
}

fn decode<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> Result<T, String> {
    serde_json::from_value(v).map_err(|e| e.to_string())
}

// ---- tables ----

/// Columns padded to their widest cell.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut w: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if i < w.len() {
                w[i] = w[i].max(c.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                let width = w.get(i).copied().unwrap_or(0);
                s.push_str(&format!("{c:<width$}  "));
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut s = line(headers.to_vec());
    for r in rows {
        s.push_str(&line(r.iter().map(|c| c.as_str()).collect()));
    }
    s
}

fn dur(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        3600..=86399 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

fn ago(unix: f64) -> String {
    format!("{} ago", dur(crate::unix_now() - unix))
}

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map_or("-".into(), |v| v.to_string())
}

fn fmt_status(s: &StatusInfo) -> String {
    let d = &s.dataplane;
    let mut o = format!(
        "bitw-control {} (protocol {}), pid {}, up {}\n",
        s.version,
        s.protocol_version,
        s.pid,
        dur(s.uptime_seconds)
    );
    o += &format!("config      {}\n", s.config_file.display());
    o += &format!(
        "last reload {}\n",
        match &s.last_reload {
            None => "none since start".into(),
            Some(r) if r.ok => format!("ok, {}", ago(r.at_unix)),
            Some(r) => format!("FAILED {}: {}", ago(r.at_unix), r.message),
        }
    );
    if d.state == "up" {
        o += &format!(
            "dataplane   up for {} at {}: instance {}, protocol v{}, {}; last ping {}; {}\n",
            dur(crate::unix_now() - d.since_unix),
            d.endpoint,
            opt(d.instance.clone()),
            opt(d.protocol_version),
            opt(d.software.clone()),
            d.last_rtt_seconds
                .map_or("-".into(), |r| format!("{:.3} ms", r * 1e3)),
            if d.reconciled {
                "reconciled"
            } else {
                "not reconciled"
            }
        );
    } else {
        o += &format!(
            "dataplane   DOWN for {} at {}: {}\n",
            dur(crate::unix_now() - d.since_unix),
            d.endpoint,
            opt(d.last_error.clone())
        );
    }
    o += &format!(
        "SAs         {} (config {}, admin {}, ike {}; {} adopted)\n",
        s.sas.total, s.sas.config, s.sas.admin, s.sas.ike, s.sas.adopted
    );
    o += &format!(
        "rules       {} (default action {})\n",
        s.rules, s.default_action
    );
    o += &format!(
        "terminals   {} configured, {} neighbours learned\n",
        s.terminals, s.neighbors
    );
    if s.ike.connections > 0 {
        o += &format!(
            "IKE         {} connection{}; IKE SAs: {} established, {} connecting\n",
            s.ike.connections,
            if s.ike.connections == 1 { "" } else { "s" },
            s.ike.established,
            s.ike.connecting
        );
    }
    o += &format!(
        "held        {}\n",
        s.held_packets
            .map_or("- (dataplane down)".into(), |h| format!("{h} packets"))
    );
    let ex = |r: &str| s.expires.get(r).copied().unwrap_or(0);
    o += &format!(
        "events      {} acquires; expires: {} soft, {} hard, {} sequence exhausted; {} punted; {} held packets dropped\n",
        s.acquires,
        ex("soft_lifetime"),
        ex("hard_lifetime"),
        ex("sequence_exhausted"),
        s.punts,
        s.hold_dropped_packets
    );
    if let Some(m) = &s.metrics_listen {
        o += &format!("metrics     http://{m}/metrics\n");
    }
    if !s.acquired_sas.is_empty() {
        o += "\nacquired SAs (traffic waiting for an SA):\n";
        let rows: Vec<Vec<String>> = s
            .acquired_sas
            .iter()
            .map(|a| {
                vec![
                    a.sa.clone(),
                    a.direction.as_str().into(),
                    a.count.to_string(),
                    ago(a.last_unix),
                    if a.known { "yes" } else { "no" }.into(),
                    a.last_flow.clone(),
                ]
            })
            .collect();
        o += &table(
            &["SA", "DIR", "ACQUIRES", "LAST", "KNOWN", "LAST FLOW"],
            &rows,
        );
    }
    o
}

fn fmt_sa_list(v: &[SaEntry]) -> String {
    if v.is_empty() {
        return "no SAs\n".into();
    }
    let rows: Vec<Vec<String>> = v
        .iter()
        .map(|e| {
            vec![
                e.name.clone(),
                e.direction.as_str().into(),
                e.spi_hex.clone(),
                e.mode.clone(),
                e.aead.clone(),
                if e.adopted {
                    format!("{} (adopted)", e.origin)
                } else {
                    e.origin.clone()
                },
                opt(e.packets),
                opt(e.bytes),
                opt(e.sequence),
                e.state.clone(),
            ]
        })
        .collect();
    table(
        &[
            "NAME", "DIR", "SPI", "MODE", "AEAD", "ORIGIN", "PACKETS", "BYTES", "SEQ", "STATE",
        ],
        &rows,
    )
}

fn fmt_sa_show(v: &[SaEntry]) -> String {
    let mut o = String::new();
    for (i, e) in v.iter().enumerate() {
        if i > 0 {
            o.push('\n');
        }
        let lim = |l: &Option<LimitsSpec>| {
            l.map_or("- (adopted: not known)".into(), |l| {
                format!("soft {} hard {} (0 = none)", l.soft, l.hard)
            })
        };
        let mut kv: Vec<(&str, String)> = vec![
            ("name", e.name.clone()),
            ("direction", e.direction.as_str().into()),
            ("spi", e.spi_hex.clone()),
            ("mode", e.mode.clone()),
        ];
        if e.mode == "tunnel" {
            kv.push((
                "tunnel",
                format!("{} -> {}", opt(e.tunnel_src), opt(e.tunnel_dst)),
            ));
        }
        kv.push(("encap", e.encap.clone()));
        if let (Some(s), Some(d)) = (e.udp_sport, e.udp_dport) {
            kv.push(("udp ports", format!("{s} -> {d}")));
        }
        kv.extend([
            ("aead", e.aead.clone()),
            ("esn", e.esn.to_string()),
            ("replay window", e.replay_window.to_string()),
        ]);
        if e.direction == Direction::In {
            kv.push((
                "policy",
                match &e.policy {
                    Some(p) => p.clone(),
                    None => format!("{} (its name)", e.name),
                },
            ));
        }
        kv.extend([
            ("lifetime packets", lim(&e.lifetime_packets)),
            ("lifetime bytes", lim(&e.lifetime_bytes)),
            (
                "origin",
                if e.adopted {
                    format!(
                        "{} (adopted from the dataplane; control holds no key)",
                        e.origin
                    )
                } else {
                    e.origin.clone()
                },
            ),
            ("state", e.state.clone()),
            ("packets", opt(e.packets)),
            ("bytes", opt(e.bytes)),
            ("sequence", opt(e.sequence)),
            ("owner worker", opt(e.owner_worker)),
            ("fingerprint", opt(e.fingerprint.clone())),
            (
                "protect rules",
                if e.rules.is_empty() {
                    "none".into()
                } else {
                    e.rules.join(", ")
                },
            ),
            ("acquires", e.acquires.to_string()),
        ]);
        for (k, v) in kv {
            o += &format!("{k:<17} {v}\n");
        }
    }
    o
}

fn fmt_policy(rules: &[PolicyEntry], default_action: Option<&str>) -> String {
    let rows: Vec<Vec<String>> = rules
        .iter()
        .map(|r| {
            let sa = match (&r.sa, r.sa_installed) {
                (None, _) => "-".into(),
                (Some(s), Some(false)) => format!("{s} (not installed)"),
                (Some(s), _) => s.clone(),
            };
            vec![
                r.position.to_string(),
                r.name.clone(),
                r.direction.as_str().into(),
                r.src.clone(),
                r.dst.clone(),
                r.proto.clone(),
                r.sport.clone(),
                r.dport.clone(),
                r.action.clone(),
                sa,
                if r.adopted {
                    format!("{} (adopted)", r.origin)
                } else {
                    r.origin.clone()
                },
            ]
        })
        .collect();
    let mut o = if rows.is_empty() {
        "no rules\n".to_string()
    } else {
        table(
            &[
                "#", "NAME", "DIR", "SRC", "DST", "PROTO", "SPORT", "DPORT", "ACTION", "SA",
                "ORIGIN",
            ],
            &rows,
        )
    };
    if let Some(d) = default_action {
        o += &format!("default action: {d}\n");
    }
    o
}

fn fmt_terminals(t: &TerminalsInfo) -> String {
    let mut o = String::new();
    if t.terminals.is_empty() {
        o += "no terminals configured\n";
    } else {
        let rows: Vec<Vec<String>> = t
            .terminals
            .iter()
            .map(|x| {
                vec![
                    x.name.clone(),
                    x.address.to_string(),
                    opt(x.port.clone()),
                    opt(x.mac.clone()),
                    x.last_seen_unix.map_or("never".into(), ago),
                    if x.connections.is_empty() {
                        "-".into()
                    } else {
                        x.connections
                            .iter()
                            .map(|c| format!("{} ({})", c.name, c.ike))
                            .collect::<Vec<_>>()
                            .join(", ")
                    },
                ]
            })
            .collect();
        o += &table(
            &[
                "TERMINAL",
                "ADDRESS",
                "PORT",
                "MAC",
                "LAST SEEN",
                "CONNECTIONS (IKE)",
            ],
            &rows,
        );
    }
    o.push('\n');
    if t.neighbors.is_empty() {
        o += "no neighbours learned\n";
    } else {
        let rows: Vec<Vec<String>> = t
            .neighbors
            .iter()
            .map(|n| {
                vec![
                    n.port.clone(),
                    n.ip.to_string(),
                    n.mac.clone(),
                    ago(n.first_seen_unix),
                    ago(n.last_seen_unix),
                    opt(n.terminal.clone()),
                ]
            })
            .collect();
        o += &table(
            &["PORT", "IP", "MAC", "FIRST SEEN", "LAST SEEN", "TERMINAL"],
            &rows,
        );
    }
    o
}

fn fmt_counters(s: &Stats) -> String {
    let mut o = format!(
        "dataplane {} ({}), up {}, burst {}\n\n",
        s.instance,
        s.software,
        dur(s.uptime_seconds),
        s.burst_size
    );
    let rows: Vec<Vec<String>> = s
        .ports
        .iter()
        .map(|p| {
            vec![
                p.name.clone(),
                p.rx.packets.to_string(),
                p.rx.bytes.to_string(),
                p.tx.packets.to_string(),
                p.tx.bytes.to_string(),
                p.rx_missed.to_string(),
                p.rx_errors.to_string(),
                p.tx_errors.to_string(),
            ]
        })
        .collect();
    o += &table(
        &[
            "PORT",
            "RX PKTS",
            "RX BYTES",
            "TX PKTS",
            "TX BYTES",
            "RX MISSED",
            "RX ERR",
            "TX ERR",
        ],
        &rows,
    );
    o.push('\n');
    let rows: Vec<Vec<String>> = s
        .workers
        .iter()
        .map(|w| {
            let busy = if w.total_cycles > 0 {
                format!(
                    "{:.1}%",
                    w.busy_cycles as f64 * 100.0 / w.total_cycles as f64
                )
            } else {
                "-".into()
            };
            let fill = if w.rx_bursts > 0 && s.burst_size > 0 {
                format!(
                    "{:.1}%",
                    w.rx_burst_packets as f64 * 100.0 / w.rx_bursts as f64 / s.burst_size as f64
                )
            } else {
                "-".into()
            };
            vec![
                w.worker.to_string(),
                w.lcore.to_string(),
                w.rx_inside
                    .packets
                    .saturating_add(w.rx_outside.packets)
                    .to_string(),
                w.tx_inside
                    .packets
                    .saturating_add(w.tx_outside.packets)
                    .to_string(),
                w.esp_encrypted.to_string(),
                w.esp_decrypted.to_string(),
                w.handed_off.to_string(),
                busy,
                fill,
                if w.latency.packets > 0 {
                    let us = |ns: u64| ns as f64 / 1e3;
                    let l = &w.latency;
                    format!(
                        "{:.1}/{:.1}/{:.1}",
                        us(l.recent_p50_ns),
                        us(l.recent_p99_ns),
                        us(l.recent_p999_ns)
                    )
                } else {
                    "-".into()
                },
            ]
        })
        .collect();
    o += &table(
        &[
            "WORKER",
            "LCORE",
            "RX",
            "TX",
            "ENCRYPTED",
            "DECRYPTED",
            "HANDED OFF",
            "BUSY",
            "BURST FILL",
            "LATENCY US P50/P99/P99.9",
        ],
        &rows,
    );
    o.push('\n');
    let mut drops: Vec<(String, u64)> = s.drops_total().into_iter().collect();
    // Non-zero first (largest first), then the rest by name.
    drops.sort_by(|a, b| {
        (b.1 > 0)
            .cmp(&(a.1 > 0))
            .then(b.1.cmp(&a.1))
            .then(a.0.cmp(&b.0))
    });
    let rows: Vec<Vec<String>> = drops
        .iter()
        .map(|(r, n)| vec![r.clone(), n.to_string()])
        .collect();
    o += &table(&["DROP REASON", "PACKETS"], &rows);
    o.push('\n');
    let enc = s
        .workers
        .iter()
        .fold(0u64, |t, w| t.saturating_add(w.esp_encrypted));
    let dec = s
        .workers
        .iter()
        .fold(0u64, |t, w| t.saturating_add(w.esp_decrypted));
    o += &format!(
        "ESP: {enc} encrypted, {dec} decrypted; held {} packets; {} acquires; {} punted; {} injected ({} failed)\n",
        s.held_packets, s.acquires, s.punted, s.injected, s.inject_failed
    );
    if !s.expires.is_empty() {
        let e: Vec<String> = s.expires.iter().map(|(k, v)| format!("{k} {v}")).collect();
        o += &format!("expires: {}\n", e.join(", "));
    }
    o.push('\n');
    if s.sas.is_empty() {
        o += &format!("{} SAs\n", s.sa_count);
    } else {
        let rows: Vec<Vec<String>> = s
            .sas
            .iter()
            .map(|a| {
                vec![
                    a.name.clone(),
                    a.direction.as_str().into(),
                    format!("{:#010x}", a.spi),
                    a.packets.to_string(),
                    a.bytes.to_string(),
                    if a.expired { "expired" } else { "" }.into(),
                ]
            })
            .collect();
        o += &table(&["SA", "DIR", "SPI", "PACKETS", "BYTES", ""], &rows);
        if s.sa_count > s.sas.len() {
            o += &format!("(and {} more SAs)\n", s.sa_count - s.sas.len());
        }
    }
    o
}

/// `ike list`: one line per IKE SA, its Child SAs indented below it (the
/// child lines aligned over the whole list).
pub fn fmt_ike_list(v: &[IkeSaInfo]) -> String {
    if v.is_empty() {
        return "no IKE SAs\n".into();
    }
    let rows: Vec<Vec<String>> = v
        .iter()
        .map(|i| {
            vec![
                i.id.to_string(),
                i.connection.clone(),
                i.terminal.clone(),
                format!("{} <-> {}", i.local, i.remote),
                i.state.clone(),
                if i.initiator {
                    "initiator"
                } else {
                    "responder"
                }
                .into(),
                format!("{}_i {}_r", i.spi_i, i.spi_r),
                if i.nat { "yes" } else { "no" }.into(),
                dur(i.age_seconds),
            ]
        })
        .collect();
    let ike = table(
        &[
            "ID",
            "CONNECTION",
            "TERMINAL",
            "LOCAL <-> REMOTE",
            "STATE",
            "ROLE",
            "IKE SPIS",
            "NAT",
            "AGE",
        ],
        &rows,
    );
    let child_rows: Vec<Vec<String>> = v
        .iter()
        .flat_map(|i| &i.children)
        .map(|c| {
            vec![
                c.name.clone(),
                format!("in {}", c.inbound_spi),
                format!("out {}", c.outbound_spi),
                c.aead.clone(),
                if c.encap { "udp-encap" } else { "esp" }.into(),
                if c.installed {
                    "installed"
                } else {
                    "not installed"
                }
                .into(),
                dur(c.age_seconds),
            ]
        })
        .collect();
    // One table over every child so the columns line up; its header line
    // is dropped (the values are labelled).
    let children = table(&["", "", "", "", "", "", ""], &child_rows);
    let mut child_lines = children.lines().skip(1);
    let mut lines = ike.lines();
    let mut o = format!("{}\n", lines.next().unwrap_or_default());
    for (i, line) in v.iter().zip(lines) {
        o += line;
        o.push('\n');
        for _ in &i.children {
            if let Some(c) = child_lines.next() {
                o += &format!("    {c}\n");
            }
        }
    }
    o
}

fn fmt_change(c: &ChangeResult) -> String {
    // The message already has the counts; notes say what to watch out for.
    let mut o = format!("{}\n", c.message);
    for n in &c.notes {
        o += &format!("note: {n}\n");
    }
    o
}

/// True when `path` is a file readable only by its owner (mode 0600 or stricter).
pub fn private_file(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o077 == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("bitwctl").chain(args.iter().copied()))
    }

    fn key(tag: &str, mode: u32) -> PathBuf {
        let p = std::env::temp_dir().join(format!("bitwctl-{}-{tag}.key", std::process::id()));
        std::fs::write(&p, "000102030405060708090a0b0c0d0e0f10111213\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    fn sa_add(extra: &[&str], key_file: &Path) -> Vec<String> {
        let mut v: Vec<String> = [
            "sa",
            "add",
            "--name",
            "to-hq",
            "--direction",
            "out",
            "--spi",
            "0x1001",
            "--mode",
            "tunnel",
            "--tunnel-src",
            "172.16.0.1",
            "--tunnel-dst",
            "172.16.0.2",
            "--aead",
            "aes128gcm16",
            "--key-file",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.push(key_file.display().to_string());
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    }

    fn req_of(args: &[String]) -> Result<AdminRequest, String> {
        let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        request(&parse(&a).map_err(|e| e.to_string())?.cmd)
    }

    #[test]
    fn sa_add_reads_a_private_key_file_only() {
        let k = key("ok", 0o600);
        let AdminRequest::SaAdd { sa } =
            req_of(&sa_add(&["--no-esn", "--lifetime-packets", "90:100"], &k)).unwrap()
        else {
            panic!("not an sa add")
        };
        assert_eq!((sa.spi, sa.esn, sa.origin), (0x1001, false, Origin::Admin));
        assert_eq!(
            sa.lifetime_packets,
            LimitsSpec {
                soft: 90,
                hard: 100
            }
        );
        assert_eq!(sa.replay_window, 0);
        assert!(sa.to_params().is_ok());
        // Group- or world-readable key files are refused before anything is sent.
        let loose = key("loose", 0o644);
        let e = req_of(&sa_add(&[], &loose)).unwrap_err();
        assert!(e.contains("chmod 600"), "{e}");
        assert!(!private_file(&loose) && private_file(&k));
        // The wrong key length for the algorithm.
        let mut args = sa_add(&[], &k);
        let i = args.iter().position(|a| a == "aes128gcm16").unwrap();
        args[i] = "aes256gcm16".into();
        let e = req_of(&args).unwrap_err();
        assert!(e.contains("key") && !e.contains("0001020304"), "{e}");
        // A replay window on an outbound SA, UDP ports without encap.
        assert!(req_of(&sa_add(&["--replay-window", "64"], &k))
            .unwrap_err()
            .contains("inbound"));
        assert!(req_of(&sa_add(&["--udp-sport", "4500"], &k))
            .unwrap_err()
            .contains("--encap udp"));
        // A policy name: inbound only, and it reaches the spec.
        assert!(req_of(&sa_add(&["--policy", "p"], &k))
            .unwrap_err()
            .contains("--policy is for inbound SAs"));
        let mut args = sa_add(&["--policy", "hq-in"], &k);
        let i = args.iter().position(|a| a == "out").unwrap();
        args[i] = "in".into();
        let AdminRequest::SaAdd { sa } = req_of(&args).unwrap() else {
            panic!("not an sa add")
        };
        assert_eq!(sa.policy.as_deref(), Some("hq-in"));
        assert_eq!(sa.to_params().unwrap().policy_name(), "hq-in");
    }

    #[test]
    fn argument_errors_are_usage_errors() {
        let k = key("args", 0o600);
        for bad in [
            sa_add(&["--lifetime-bytes", "100:10"], &k),
            sa_add(&["--lifetime-bytes", "100"], &k),
            sa_add(&["--aead", "des"], &k),
            vec!["sa".into(), "add".into(), "--name".into(), "x".into()],
            vec![
                "policy".into(),
                "add".into(),
                "--name".into(),
                "x".into(),
                "--direction".into(),
                "out".into(),
                "--action".into(),
                "bypass".into(),
                "--before".into(),
                "a".into(),
                "--position".into(),
                "2".into(),
            ],
            vec![
                "sa".into(),
                "show".into(),
                "x".into(),
                "--direction".into(),
                "sideways".into(),
            ],
        ] {
            let a: Vec<&str> = bad.iter().map(|s| s.as_str()).collect();
            let e = parse(&a)
                .err()
                .unwrap_or_else(|| panic!("accepted {bad:?}"));
            assert_eq!(e.exit_code(), EXIT_USAGE, "{bad:?}");
        }
        assert_eq!(parse_spi("0x1001"), Ok(0x1001));
        assert_eq!(parse_spi("4097"), Ok(4097));
        assert!(parse_spi("17").unwrap_err().contains("reserved"));
        assert!(parse_spi("zz").is_err());
    }

    #[test]
    fn policy_add_and_global_flags() {
        let cli = parse(&[
            "policy",
            "add",
            "--name",
            "web",
            "--direction",
            "out",
            "--src",
            "10.0.0.0/24",
            "--proto",
            "tcp",
            "--dport",
            "443",
            "--action",
            "protect",
            "--sa",
            "to-hq",
            "--before",
            "deny",
            "--json",
            "--socket",
            "/tmp/x.sock",
        ])
        .unwrap();
        assert!(cli.json);
        assert_eq!(resolve_socket(&cli).unwrap(), PathBuf::from("/tmp/x.sock"));
        let AdminRequest::PolicyAdd {
            rule,
            before,
            position,
        } = request(&cli.cmd).unwrap()
        else {
            panic!()
        };
        assert_eq!(
            (
                rule.dst.as_str(),
                rule.sa.as_deref(),
                before.as_deref(),
                position
            ),
            ("any", Some("to-hq"), Some("deny"), None)
        );
        // Invalid selectors are caught before sending.
        let cli = parse(&[
            "policy",
            "add",
            "--name",
            "x",
            "--direction",
            "in",
            "--src",
            "10.0.0.1/24",
            "--action",
            "bypass",
        ])
        .unwrap();
        assert!(request(&cli.cmd).unwrap_err().contains("host bits"));
        let cli = parse(&[
            "policy",
            "add",
            "--name",
            "x",
            "--direction",
            "in",
            "--action",
            "protect",
        ])
        .unwrap();
        assert!(request(&cli.cmd).unwrap_err().contains("sa"));
    }

    #[test]
    fn socket_from_config_or_default() {
        let dir = std::env::temp_dir().join(format!("bitwctl-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = dir.join("bitw.toml");
        // Only [control] admin_socket is read: the rest may be mid-edit.
        std::fs::write(&cfg, "[ports.inside]\ndevice = \"x\"\n[control]\nadmin_socket = \"/tmp/ctl.sock\"\nbogus_key = 1\n").unwrap();
        let c = cfg.display().to_string();
        let cli = parse(&["--config", &c, "status"]).unwrap();
        assert_eq!(
            resolve_socket(&cli).unwrap(),
            PathBuf::from("/tmp/ctl.sock")
        );
        std::fs::write(&cfg, "[eal]\n").unwrap();
        assert_eq!(
            resolve_socket(&parse(&["--config", &c, "status"]).unwrap()).unwrap(),
            PathBuf::from(DEFAULT_SOCKET)
        );
        std::fs::write(&cfg, "[control\n").unwrap();
        assert!(resolve_socket(&parse(&["--config", &c, "status"]).unwrap()).is_err());
        assert_eq!(
            resolve_socket(&parse(&["status"]).unwrap()).unwrap(),
            PathBuf::from(DEFAULT_SOCKET)
        );
        // Nobody listening: exit code 3.
        let cli = parse(&[
            "--socket",
            &dir.join("none.sock").display().to_string(),
            "status",
        ])
        .unwrap();
        assert_eq!(run(&cli, &mut Vec::new()), EXIT_UNREACHABLE);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn ike_subcommands_parse_into_requests() {
        let req = |args: &[&str]| request(&parse(args).unwrap().cmd).unwrap();
        assert!(matches!(req(&["ike", "list"]), AdminRequest::IkeList));
        assert!(matches!(
            req(&["ike", "initiate", "meter-hq"]),
            AdminRequest::IkeInitiate { connection } if connection == "meter-hq"
        ));
        assert!(matches!(
            req(&["ike", "terminate", "7", "--json"]),
            AdminRequest::IkeTerminate { name } if name == "7"
        ));
        assert!(parse(&["ike", "list", "--json"]).unwrap().json);
        for bad in [
            &["ike"][..],
            &["ike", "initiate"],
            &["ike", "terminate"],
            &["ike", "initiate", "a", "b"],
            &["ike", "rekey", "a"],
        ] {
            let e = parse(bad)
                .err()
                .unwrap_or_else(|| panic!("accepted {bad:?}"));
            assert_eq!(e.exit_code(), EXIT_USAGE, "{bad:?}");
        }
    }

    fn ike_sample() -> Vec<IkeSaInfo> {
        use crate::admin::ChildInfo;
        vec![
            IkeSaInfo {
                id: 1,
                connection: "meter-hq".into(),
                terminal: "meter".into(),
                local: "10.0.0.7:4500".into(),
                remote: "198.51.100.1:4500".into(),
                state: "established".into(),
                initiator: false,
                spi_i: "0123456789abcdef".into(),
                spi_r: "fedcba9876543210".into(),
                nat: true,
                age_seconds: 302.0,
                children: vec![
                    ChildInfo {
                        name: "meter-hq/data".into(),
                        inbound_spi: "c1a2b3c4".into(),
                        outbound_spi: "0badf00d".into(),
                        aead: "aes128gcm16".into(),
                        encap: true,
                        installed: true,
                        age_seconds: 301.0,
                    },
                    ChildInfo {
                        name: "meter-hq/data".into(),
                        inbound_spi: "c1a2b3c5".into(),
                        outbound_spi: "0badf00e".into(),
                        aead: "aes256gcm16".into(),
                        encap: true,
                        installed: false,
                        age_seconds: 1.0,
                    },
                ],
            },
            IkeSaInfo {
                id: 12,
                connection: "cam".into(),
                terminal: "camera".into(),
                local: "10.0.0.8:500".into(),
                remote: "203.0.113.9:500".into(),
                state: "connecting".into(),
                initiator: true,
                spi_i: "1111111111111111".into(),
                spi_r: "0000000000000000".into(),
                nat: false,
                age_seconds: 2.0,
                children: vec![],
            },
        ]
    }

    #[test]
    fn ike_list_shows_sas_with_their_children_indented() {
        let text = fmt_ike_list(&ike_sample());
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 5, "{text}");
        assert!(
            lines[0].starts_with("ID  CONNECTION  TERMINAL  LOCAL <-> REMOTE"),
            "{text}"
        );
        assert!(
            lines[0].ends_with(
                "STATE        ROLE       IKE SPIS                               NAT  AGE"
            ),
            "{text}"
        );
        assert_eq!(
            lines[1],
            "1   meter-hq    meter     10.0.0.7:4500 <-> 198.51.100.1:4500  established  responder  0123456789abcdef_i fedcba9876543210_r  yes  5m02s"
        );
        assert_eq!(
            lines[2],
            "    meter-hq/data  in c1a2b3c4  out 0badf00d  aes128gcm16  udp-encap  installed      5m01s"
        );
        assert_eq!(
            lines[3],
            "    meter-hq/data  in c1a2b3c5  out 0badf00e  aes256gcm16  udp-encap  not installed  1s"
        );
        assert!(
            lines[4].starts_with("12  cam         camera    10.0.0.8:500 <-> 203.0.113.9:500"),
            "{text}"
        );
        assert!(
            lines[4]
                .contains("connecting   initiator  1111111111111111_i 0000000000000000_r  no   2s"),
            "{text}"
        );
        assert_eq!(fmt_ike_list(&[]), "no IKE SAs\n");
    }

    /// A reply as bitw-control would send it, printed by bitwctl.
    fn printed(args: &[&str], resp: AdminResponse) -> (i32, String) {
        let cli = parse(args).unwrap();
        let mut out = Vec::new();
        let code = print_response(&cli, &resp, None, &mut out);
        (code, String::from_utf8(out).unwrap())
    }

    #[test]
    fn ike_answers_print_as_tables_json_or_errors() {
        let (code, text) = printed(&["ike", "list"], AdminResponse::ok(&ike_sample()));
        assert_eq!(code, EXIT_OK);
        assert!(text.contains("meter-hq/data  in c1a2b3c4"), "{text}");
        // --json: the IkeSaInfo list as control sent it.
        let (code, text) = printed(&["ike", "list", "--json"], AdminResponse::ok(&ike_sample()));
        assert_eq!(code, EXIT_OK);
        let v: Vec<IkeSaInfo> = serde_json::from_str(&text).unwrap();
        assert_eq!((v.len(), v[0].children.len()), (2, 2));
        assert!(text.contains("\"spi_i\": \"0123456789abcdef\""), "{text}");
        let ok = AdminResponse::ok(&IkeResult {
            message: "initiating connection `cam` (IKE SA #3)".into(),
        });
        let (code, text) = printed(&["ike", "initiate", "cam"], ok);
        assert_eq!(
            (code, text.as_str()),
            (EXIT_OK, "initiating connection `cam` (IKE SA #3)\n")
        );
        // Refused (unknown connection, one already up): exit 1, message on stderr.
        let no = AdminResponse::err(ErrorKind::Refused, "no connection named `x`");
        let (code, text) = printed(&["ike", "initiate", "x"], no.clone());
        assert_eq!((code, text.as_str()), (EXIT_REFUSED, ""));
        let (code, text) = printed(&["ike", "terminate", "x", "--json"], no);
        assert_eq!(code, EXIT_REFUSED);
        assert!(text.contains("\"error_kind\": \"refused\""), "{text}");
    }

    #[test]
    fn status_and_terminals_show_connections() {
        use crate::admin::{IkeStatus, TerminalConnection, TerminalEntry};
        let status: StatusInfo = serde_json::from_value(serde_json::json!({
            "version": "0.1.0", "protocol_version": 1, "pid": 1, "uptime_seconds": 5.0,
            "config_file": "/etc/bitw/bitw.toml", "admin_socket": "/run/bitw/control.sock",
            "metrics_listen": null,
            "dataplane": {"state": "down", "endpoint": "unix:/x", "peer": null, "instance": null,
                "software": null, "protocol_version": null, "since_unix": 0.0,
                "last_rtt_seconds": null, "last_error": "refused", "reconciled": false,
                "connects": 0},
            "sas": {"total": 0, "config": 0, "admin": 0, "ike": 0, "adopted": 0},
            "rules": 0, "default_action": "bypass", "terminals": 1, "neighbors": 0,
            "held_packets": null, "acquires": 0, "expires": {}, "punts": 0,
            "hold_dropped_packets": 0, "acquired_sas": [], "last_reload": null
        }))
        .expect("an answer without `ike` (an older control) still reads");
        assert!(!fmt_status(&status).contains("IKE"));
        let status = StatusInfo {
            ike: IkeStatus {
                connections: 2,
                established: 1,
                connecting: 1,
            },
            ..status
        };
        assert!(fmt_status(&status)
            .contains("IKE         2 connections; IKE SAs: 1 established, 1 connecting\n"));
        let t = TerminalsInfo {
            terminals: vec![
                TerminalEntry {
                    name: "meter".into(),
                    address: "10.0.0.7".parse().unwrap(),
                    port: None,
                    mac: None,
                    last_seen_unix: None,
                    connections: vec![
                        TerminalConnection {
                            name: "meter-hq".into(),
                            ike: "established".into(),
                        },
                        TerminalConnection {
                            name: "meter-dr".into(),
                            ike: "none".into(),
                        },
                    ],
                },
                TerminalEntry {
                    name: "printer".into(),
                    address: "10.0.0.9".parse().unwrap(),
                    port: Some("inside".into()),
                    mac: None,
                    last_seen_unix: None,
                    connections: vec![],
                },
            ],
            neighbors: vec![],
        };
        let text = fmt_terminals(&t);
        assert!(
            text.lines().next().unwrap().ends_with("CONNECTIONS (IKE)"),
            "{text}"
        );
        assert!(
            text.contains("never      meter-hq (established), meter-dr (none)\n"),
            "{text}"
        );
        assert!(text.contains("never      -\n"), "{text}");
    }

    #[test]
    fn tables_align() {
        let t = table(
            &["A", "BB"],
            &[vec!["xxx".into(), "y".into()], vec!["z".into(), "".into()]],
        );
        assert_eq!(t, "A    BB\nxxx  y\nz\n");
    }
}
