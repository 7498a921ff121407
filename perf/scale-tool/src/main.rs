//! `bitw-scale`: what `perf/scale.py` needs besides Python's standard library.
//!
//! - `esp-pcap`: encrypts the frames of a plaintext capture into ESP (tunnel
//!   mode, AES-GCM, RFC 4106) for many SPIs: frame `i` gets SPI
//!   `spi_base + i % spis`, all with one key, so a looping capture spreads
//!   inbound traffic over every SA.
//! - `drive`: one control-channel session to a running dataplane: measure
//!   the forwarding rate (two `GetStats` a window apart), install many SAs in
//!   `Apply` batches as fast as the dataplane takes them (frames encoded
//!   before the clock starts, a few in flight), then measure again. Prints
//!   one JSON object.
//!
//! It speaks the control channel itself (4-byte big-endian length + JSON,
//! `bitw_common::proto` types) so that pre-encoded frames can be sent as
//! they are.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow_lite::{bail, Context, Result};
use bitw_common::proto::{
    Batch, Hello, LimitsSpec, Origin, Request, SaChange, SaSpec, ToDataplane, MAX_FRAME,
};
use bitw_common::rules::Direction;
use clap::{Parser, Subcommand};
use ring::aead;
use serde_json::{json, Value};
use zeroize::Zeroizing;

/// A tiny error type: messages with context, enough for a benchmark helper.
mod anyhow_lite {
    pub type Result<T> = std::result::Result<T, String>;
    pub trait Context<T> {
        fn context(self, what: &str) -> Result<T>;
    }
    impl<T, E: std::fmt::Display> Context<T> for std::result::Result<T, E> {
        fn context(self, what: &str) -> Result<T> {
            self.map_err(|e| format!("{what}: {e}"))
        }
    }
    macro_rules! bail {
        ($($t:tt)*) => { return Err(format!($($t)*)) };
    }
    pub(crate) use bail;
}

#[derive(Parser)]
#[command(
    version,
    about = "perf/scale.py's helper (ESP captures over many SPIs, bulk SA installs)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Encrypt a plaintext capture's frames into ESP over many SPIs.
    EspPcap(EspPcap),
    /// Write plaintext UDP frames to many destinations (one per outbound rule).
    UdpPcap(UdpPcap),
    /// Measure forwarding and install SAs over the control channel.
    Drive(Drive),
}

#[derive(clap::Args)]
struct UdpPcap {
    #[arg(long)]
    out: PathBuf,
    /// Destinations: frame i goes to 10.0.0.0 + 1 + i % flows (from 192.168.100.1 + i % 250).
    #[arg(long)]
    flows: u32,
    #[arg(long)]
    packets: usize,
    /// Frame length without FCS.
    #[arg(long, default_value_t = 60)]
    length: usize,
}

#[derive(clap::Args)]
struct EspPcap {
    /// Plaintext capture (Ethernet / IPv4 frames).
    #[arg(long)]
    plain: PathBuf,
    #[arg(long)]
    out: PathBuf,
    /// SPIs used, spi_base .. spi_base + spis - 1, frame i gets spi_base + i % spis.
    #[arg(long)]
    spis: u32,
    #[arg(long)]
    spi_base: u32,
    /// Frames to write (the plaintext capture's frames repeat).
    #[arg(long)]
    packets: usize,
    /// AES-128-GCM key and 4-byte salt, hex (40 digits).
    #[arg(long)]
    key: String,
    #[arg(long, default_value = "172.16.0.2")]
    src: Ipv4Addr,
    #[arg(long, default_value = "172.16.0.1")]
    dst: Ipv4Addr,
}

#[derive(clap::Args)]
struct Drive {
    /// The dataplane's control socket.
    #[arg(long)]
    socket: PathBuf,
    /// Forwarding-rate windows before installing (the idle rate).
    #[arg(long, default_value_t = 0)]
    idle_runs: usize,
    /// SAs to install (0: none).
    #[arg(long, default_value_t = 0)]
    install: u32,
    /// Index of the first SA to install (names and SPIs follow from it).
    #[arg(long, default_value_t = 0)]
    start: u32,
    /// SAs per Apply.
    #[arg(long, default_value_t = 10_000)]
    batch: usize,
    /// Apply requests in flight at once.
    #[arg(long, default_value_t = 2)]
    window: usize,
    /// in | out
    #[arg(long, default_value = "in")]
    direction: String,
    /// SA i is named `<prefix><i>`, SPI spi_base + i.
    #[arg(long, default_value = "sa-")]
    name_prefix: String,
    #[arg(long)]
    spi_base: u32,
    /// AES-128-GCM key and 4-byte salt, hex, shared by every SA.
    #[arg(long)]
    key: String,
    /// Inbound SAs: their policy name (the inbound protect rule names it).
    #[arg(long)]
    policy: Option<String>,
    #[arg(long)]
    tunnel_src: IpAddr,
    #[arg(long)]
    tunnel_dst: IpAddr,
    /// Inbound replay window (0: off).
    #[arg(long, default_value_t = 0)]
    replay_window: u32,
    /// Forwarding-rate windows after installing.
    #[arg(long, default_value_t = 0)]
    runs: usize,
    /// Length of a forwarding-rate window.
    #[arg(long, default_value_t = 1.0)]
    seconds: f64,
}

fn main() {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::EspPcap(a) => esp_pcap(a),
        Cmd::UdpPcap(a) => udp_pcap(a),
        Cmd::Drive(a) => drive(a),
    };
    if let Err(e) = r {
        eprintln!("bitw-scale: {e}");
        std::process::exit(1);
    }
}

// ---------------------------------------------------------------- pcaps

fn read_pcap(path: &PathBuf) -> Result<Vec<Vec<u8>>> {
    let data = std::fs::read(path).context(&path.display().to_string())?;
    if data.len() < 24 {
        bail!("{}: not a pcap", path.display());
    }
    let magic = u32::from_le_bytes(data[..4].try_into().unwrap());
    let le = match magic {
        0xA1B2_C3D4 | 0xA1B2_3C4D => true,
        0xD4C3_B2A1 | 0x4D3C_B2A1 => false,
        _ => bail!("{}: not a classic pcap", path.display()),
    };
    let u32_at = |o: usize| {
        let b: [u8; 4] = data[o..o + 4].try_into().unwrap();
        if le {
            u32::from_le_bytes(b)
        } else {
            u32::from_be_bytes(b)
        }
    };
    let mut off = 24;
    let mut frames = Vec::new();
    while off + 16 <= data.len() {
        let incl = u32_at(off + 8) as usize;
        off += 16;
        if off + incl > data.len() {
            bail!("{}: truncated record", path.display());
        }
        frames.push(data[off..off + incl].to_vec());
        off += incl;
    }
    Ok(frames)
}

fn csum(data: &[u8]) -> u16 {
    let mut s: u32 = 0;
    for c in data.chunks(2) {
        s += (c[0] as u32) << 8 | *c.get(1).unwrap_or(&0) as u32;
    }
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

fn parse_key(hex_key: &str) -> Result<(aead::LessSafeKey, [u8; 4])> {
    let k = Zeroizing::new(hex::decode(hex_key.trim()).context("key")?);
    if k.len() != 20 {
        bail!("key: {} bytes, AES-128-GCM wants 16 + 4 (salt)", k.len());
    }
    let unbound = aead::UnboundKey::new(&aead::AES_128_GCM, &k[..16]).map_err(|_| "key")?;
    Ok((
        aead::LessSafeKey::new(unbound),
        k[16..20].try_into().unwrap(),
    ))
}

/// One ESP tunnel-mode frame (IPv4 outer, 32-bit sequence numbers) carrying `frame`'s IP packet.
fn esp_frame(
    frame: &[u8],
    spi: u32,
    seq: u32,
    key: &aead::LessSafeKey,
    salt: &[u8; 4],
    src: Ipv4Addr,
    dst: Ipv4Addr,
) -> Vec<u8> {
    let inner = &frame[14..];
    let inner_v6 = inner.first().is_some_and(|b| b >> 4 == 6);
    let mut pt = inner.to_vec();
    let pad = (4 - (pt.len() + 2) % 4) % 4;
    pt.extend((1..=pad as u8).collect::<Vec<_>>());
    pt.push(pad as u8);
    pt.push(if inner_v6 { 41 } else { 4 });
    let iv: [u8; 8] = (((spi as u64) << 32) | seq as u64).to_be_bytes();
    let mut nonce = [0u8; 12];
    nonce[..4].copy_from_slice(salt);
    nonce[4..].copy_from_slice(&iv);
    let mut aad = [0u8; 8];
    aad[..4].copy_from_slice(&spi.to_be_bytes());
    aad[4..].copy_from_slice(&seq.to_be_bytes());
    let tag = key
        .seal_in_place_separate_tag(
            aead::Nonce::assume_unique_for_key(nonce),
            aead::Aad::from(&aad[..]),
            &mut pt,
        )
        .expect("small packet");
    let total = 20 + 8 + 8 + pt.len() + 16;
    let mut out = Vec::with_capacity(14 + total);
    out.extend_from_slice(&frame[..12]);
    out.extend_from_slice(&0x0800u16.to_be_bytes());
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[1] = if inner_v6 { 0 } else { inner[1] };
    ip[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    let df = !inner_v6 && inner.len() > 7 && inner[6] & 0x40 != 0;
    ip[6] = if df || inner_v6 { 0x40 } else { 0 };
    ip[8] = 64;
    ip[9] = 50;
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&dst.octets());
    let c = csum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    out.extend_from_slice(&ip);
    out.extend_from_slice(&spi.to_be_bytes());
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(&iv);
    out.extend_from_slice(&pt);
    out.extend_from_slice(tag.as_ref());
    out
}

fn esp_pcap(a: EspPcap) -> Result<()> {
    if a.spis == 0 || a.packets == 0 {
        bail!("--spis and --packets must be at least 1");
    }
    let plain = read_pcap(&a.plain)?;
    if plain.is_empty() || plain.iter().any(|f| f.len() < 34) {
        bail!("{}: no frames, or a frame too short", a.plain.display());
    }
    let (key, salt) = parse_key(&a.key)?;
    let mut w = PcapWriter::create(&a.out)?;
    for i in 0..a.packets {
        let spi = a.spi_base.wrapping_add((i % a.spis as usize) as u32);
        // Every SA starts at 1 and counts up over the capture.
        let seq = (i / a.spis as usize) as u32 + 1;
        w.frame(&esp_frame(
            &plain[i % plain.len()],
            spi,
            seq,
            &key,
            &salt,
            a.src,
            a.dst,
        ))?;
    }
    w.finish()?;
    println!(
        "{}",
        json!({"packets": a.packets, "spis": a.spis, "out": a.out.display().to_string()})
    );
    Ok(())
}

struct PcapWriter(std::io::BufWriter<std::fs::File>, usize);

impl PcapWriter {
    fn create(path: &PathBuf) -> Result<PcapWriter> {
        let f = std::fs::File::create(path).context(&path.display().to_string())?;
        let mut w = std::io::BufWriter::new(f);
        let mut hdr = Vec::new();
        hdr.extend_from_slice(&0xA1B2_C3D4u32.to_le_bytes());
        hdr.extend_from_slice(&2u16.to_le_bytes());
        hdr.extend_from_slice(&4u16.to_le_bytes());
        hdr.extend_from_slice(&[0u8; 8]);
        hdr.extend_from_slice(&65535u32.to_le_bytes());
        hdr.extend_from_slice(&1u32.to_le_bytes());
        w.write_all(&hdr).context("write")?;
        Ok(PcapWriter(w, 0))
    }
    fn frame(&mut self, fr: &[u8]) -> Result<()> {
        let i = self.1;
        self.1 += 1;
        let mut rec = [0u8; 16];
        rec[..4].copy_from_slice(&((i / 1_000_000) as u32).to_le_bytes());
        rec[4..8].copy_from_slice(&((i % 1_000_000) as u32).to_le_bytes());
        rec[8..12].copy_from_slice(&(fr.len() as u32).to_le_bytes());
        rec[12..16].copy_from_slice(&(fr.len() as u32).to_le_bytes());
        self.0.write_all(&rec).context("write")?;
        self.0.write_all(fr).context("write")
    }
    fn finish(mut self) -> Result<()> {
        self.0.flush().context("write")
    }
}

fn udp_pcap(a: UdpPcap) -> Result<()> {
    if a.flows == 0 || a.flows > 1 << 24 || a.length < 42 || a.length > 1514 {
        bail!("--flows 1..16777216, --length 42..1514");
    }
    let mut w = PcapWriter::create(&a.out)?;
    for i in 0..a.packets {
        let j = (i % a.flows as usize) as u32;
        let src = 0xC0A8_6400u32 + 1 + (i % 250) as u32;
        let dst = 0x0A00_0000u32 + 1 + j;
        let mut f = vec![0u8; a.length];
        f[..6].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
        f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
        f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        let ip_len = (a.length - 14) as u16;
        let ip = &mut f[14..34];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
        ip[4..6].copy_from_slice(&(i as u16).to_be_bytes());
        ip[8] = 64;
        ip[9] = 17;
        ip[12..16].copy_from_slice(&src.to_be_bytes());
        ip[16..20].copy_from_slice(&dst.to_be_bytes());
        let c = csum(ip);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        let udp = &mut f[34..42];
        udp[..2].copy_from_slice(&(1024 + (i % 256) as u16).to_be_bytes());
        udp[2..4].copy_from_slice(&5001u16.to_be_bytes());
        udp[4..6].copy_from_slice(&(ip_len - 20).to_be_bytes());
        // UDP checksum 0: none (IPv4).
        w.frame(&f)?;
    }
    w.finish()?;
    println!("{}", json!({"packets": a.packets, "flows": a.flows}));
    Ok(())
}

// ---------------------------------------------------------------- control channel

struct Chan {
    s: UnixStream,
    next_id: u64,
}

impl Chan {
    fn connect(path: &PathBuf) -> Result<Chan> {
        let s = UnixStream::connect(path).context(&path.display().to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(120)))
            .context("socket")?;
        let mut c = Chan { s, next_id: 1 };
        c.send_value(&serde_json::to_vec(&Hello::new("bitw-scale")).unwrap())?;
        let r = c.recv()?;
        if r.get("result").and_then(Value::as_str) != Some("welcome") {
            bail!("the dataplane refused the session: {r}");
        }
        Ok(c)
    }

    fn send_value(&mut self, body: &[u8]) -> Result<()> {
        if body.len() > MAX_FRAME {
            bail!("frame of {} bytes: more than {MAX_FRAME}", body.len());
        }
        self.s
            .write_all(&(body.len() as u32).to_be_bytes())
            .context("send")?;
        self.s.write_all(body).context("send")
    }

    fn recv(&mut self) -> Result<Value> {
        let mut len = [0u8; 4];
        self.s.read_exact(&mut len).context("receive")?;
        let n = u32::from_be_bytes(len) as usize;
        if n > MAX_FRAME {
            bail!("frame of {n} bytes");
        }
        let mut body = vec![0u8; n];
        self.s.read_exact(&mut body).context("receive")?;
        serde_json::from_slice(&body).context("decode")
    }

    /// Encodes a request; returns (id, frame body).
    fn encode(&mut self, request: Request) -> (u64, Vec<u8>) {
        let id = self.next_id;
        self.next_id += 1;
        let body = serde_json::to_vec(&ToDataplane { id, request }).expect("serialises");
        (id, body)
    }

    /// The reply to `id` (events in between are skipped).
    fn reply(&mut self, id: u64) -> Result<Value> {
        loop {
            let m = self.recv()?;
            if m.get("kind").and_then(Value::as_str) != Some("reply") {
                continue;
            }
            let got = m.get("id").and_then(Value::as_u64);
            if got != Some(id) {
                bail!("reply {got:?} while waiting for {id}: {m}");
            }
            if m.get("type").and_then(Value::as_str) == Some("error") {
                bail!("request {id} failed: {}", m["message"]);
            }
            return Ok(m);
        }
    }

    fn call(&mut self, request: Request) -> Result<Value> {
        let (id, body) = self.encode(request);
        self.send_value(&body)?;
        self.reply(id)
    }

    fn stats(&mut self) -> Result<Sample> {
        let r = self.call(Request::GetStats { sa_limit: 0 })?;
        Sample::from(&r)
    }
}

/// Counters at one moment (dataplane clock).
#[derive(Clone, Copy)]
struct Sample {
    uptime: f64,
    tx: u64,
    decrypted: u64,
    encrypted: u64,
    sa_count: u64,
}

impl Sample {
    fn from(r: &Value) -> Result<Sample> {
        let mut s = Sample {
            uptime: r["uptime_seconds"].as_f64().ok_or("stats: no uptime")?,
            tx: 0,
            decrypted: 0,
            encrypted: 0,
            sa_count: r["sa_count"].as_u64().unwrap_or(0),
        };
        for w in r["workers"].as_array().ok_or("stats: no workers")? {
            let n = |k: &str| w[k].as_u64().unwrap_or(0);
            s.tx += w["tx_inside"]["packets"].as_u64().unwrap_or(0)
                + w["tx_outside"]["packets"].as_u64().unwrap_or(0);
            s.decrypted += n("esp_decrypted");
            s.encrypted += n("esp_encrypted");
        }
        Ok(s)
    }
}

/// Rates between two samples, Mpps.
fn window(a: Sample, b: Sample) -> Value {
    let dt = (b.uptime - a.uptime).max(1e-9);
    json!({
        "seconds": dt,
        "tx_mpps": (b.tx - a.tx) as f64 / dt / 1e6,
        "decrypted_mpps": (b.decrypted - a.decrypted) as f64 / dt / 1e6,
        "encrypted_mpps": (b.encrypted - a.encrypted) as f64 / dt / 1e6,
        "tx_packets": b.tx - a.tx,
    })
}

fn measure(c: &mut Chan, runs: usize, seconds: f64) -> Result<Vec<Value>> {
    let mut out = Vec::new();
    for _ in 0..runs {
        let a = c.stats()?;
        std::thread::sleep(Duration::from_secs_f64(seconds));
        let b = c.stats()?;
        out.push(window(a, b));
    }
    Ok(out)
}

fn spec(a: &Drive, i: u32, direction: Direction) -> SaSpec {
    SaSpec {
        name: format!("{}{}", a.name_prefix, i),
        direction,
        spi: a.spi_base.wrapping_add(i),
        mode: "tunnel".into(),
        tunnel_src: Some(a.tunnel_src),
        tunnel_dst: Some(a.tunnel_dst),
        encap: "none".into(),
        udp_sport: 4500,
        udp_dport: 4500,
        aead: "aes128gcm16".into(),
        key: Zeroizing::new(a.key.clone()),
        esn: false,
        replay_window: if direction == Direction::In {
            a.replay_window
        } else {
            0
        },
        lifetime_packets: LimitsSpec::default(),
        lifetime_bytes: LimitsSpec::default(),
        origin: Origin::Admin,
        policy: if direction == Direction::In {
            a.policy.clone()
        } else {
            None
        },
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn drive(a: Drive) -> Result<()> {
    let direction = match a.direction.as_str() {
        "in" => Direction::In,
        "out" => Direction::Out,
        d => bail!("--direction {d}: expected in or out"),
    };
    if a.batch == 0 || a.window == 0 {
        bail!("--batch and --window must be at least 1");
    }
    let mut c = Chan::connect(&a.socket)?;
    let idle = measure(&mut c, a.idle_runs, a.seconds)?;

    let mut install = Value::Null;
    if a.install > 0 {
        // Every frame is encoded before the clock starts.
        let mut frames: VecDeque<(u64, Vec<u8>, usize)> = VecDeque::new();
        let end = a.start + a.install;
        let mut i = a.start;
        while i < end {
            let n = (end - i).min(a.batch as u32);
            let batch = Batch {
                sas: (i..i + n)
                    .map(|k| SaChange::Install(spec(&a, k, direction)))
                    .collect(),
                ..Default::default()
            };
            let (id, body) = c.encode(Request::Apply(batch));
            frames.push_back((id, body, n as usize));
            i += n;
        }
        let batches = frames.len();
        let before = c.stats()?;
        let t0 = Instant::now();
        let mut in_flight: VecDeque<(u64, Instant)> = VecDeque::new();
        let mut client_batch = Vec::new();
        let mut server_apply = Vec::new();
        let mut installed = 0u64;
        while !frames.is_empty() || !in_flight.is_empty() {
            while in_flight.len() < a.window {
                let Some((id, body, _)) = frames.pop_front() else {
                    break;
                };
                c.send_value(&body)?;
                in_flight.push_back((id, Instant::now()));
            }
            if let Some((id, sent)) = in_flight.pop_front() {
                let r = c.reply(id)?;
                client_batch.push(sent.elapsed().as_secs_f64());
                server_apply.push(r["apply_seconds"].as_f64().unwrap_or(0.0));
                installed += r["sas_installed"].as_u64().unwrap_or(0)
                    + r["sas_replaced"].as_u64().unwrap_or(0);
            }
        }
        let took = t0.elapsed().as_secs_f64();
        let after = c.stats()?;
        let max = |v: &[f64]| v.iter().cloned().fold(0.0, f64::max);
        install = json!({
            "sas": a.install,
            "installed": installed,
            "batch": a.batch,
            "batches": batches,
            "window": a.window,
            "seconds": took,
            "sas_per_second": installed as f64 / took.max(1e-9),
            "apply_seconds_median": median(server_apply.clone()),
            "apply_seconds_max": max(&server_apply),
            "apply_seconds_first": server_apply.first().copied().unwrap_or(0.0),
            "apply_seconds_last": server_apply.last().copied().unwrap_or(0.0),
            "batch_seconds_median": median(client_batch.clone()),
            "forwarding": window(before, after),
            "sa_count_after": after.sa_count,
        });
    }
    let runs = measure(&mut c, a.runs, a.seconds)?;
    let sa_count = c.stats()?.sa_count;
    println!(
        "{}",
        json!({"idle": idle, "install": install, "runs": runs, "sa_count": sa_count})
    );
    Ok(())
}
