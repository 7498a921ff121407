//! Raw AEAD seal rate on one pinned core, the per-core limit of ESP: the two
//! backends bitw can use on the packet path (intel-ipsec-mb for AES-GCM, ring)
//! next to the RustCrypto crates, for the ESP
//! payload sizes of the perf runs. Each case runs `--runs` times for
//! `--millis`; the median goes to stdout as JSON lines and a table on stderr.
//!
//! The AAD is 8 bytes (SPI + 32-bit sequence number) as in ESP without ESN,
//! the data is sealed in place, and the nonce changes per call, as on the wire.

use std::time::{Duration, Instant};

use aes_gcm::aead::{AeadInPlace, KeyInit};
use bitw_dataplane::dpdk::{GcmKey, IpsecMb};
use clap::Parser;
use ring::aead;

#[derive(Parser)]
#[command(about = "Raw AEAD seal rate per core: ring, intel-ipsec-mb, RustCrypto")]
struct Cli {
    /// CPU to pin to.
    #[arg(long, default_value_t = 1)]
    core: usize,
    /// Runs per case (the median is reported).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Milliseconds per run.
    #[arg(long, default_value_t = 300)]
    millis: u64,
    /// Payload sizes in bytes (the ESP plaintext: inner packet + trailer).
    #[arg(long, value_delimiter = ',', default_value = "64,128,512,1420,1500")]
    sizes: Vec<usize>,
}

fn measure(millis: u64, len: usize, mut seal: impl FnMut(u64, &mut [u8])) -> f64 {
    let mut buf = vec![0xa5u8; len];
    let until = Duration::from_millis(millis);
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < until {
        for _ in 0..64 {
            seal(n, &mut buf);
            n += 1;
        }
    }
    n as f64 / start.elapsed().as_secs_f64()
}

const KEY32: [u8; 32] = [7u8; 32];
const AAD: [u8; 8] = [1, 2, 3, 4, 0, 0, 0, 1];

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let cli = Cli::parse();
    if let Some(core) =
        core_affinity::get_core_ids().and_then(|ids| ids.into_iter().find(|c| c.id == cli.core))
    {
        core_affinity::set_for_current(core);
    }
    type Seal = Box<dyn FnMut(u64, &mut [u8])>;
    type Case = (&'static str, &'static str, Box<dyn Fn() -> Seal>);
    let ring_seal = |alg: &'static aead::Algorithm, klen: usize| -> Seal {
        let key = aead::LessSafeKey::new(aead::UnboundKey::new(alg, &KEY32[..klen]).unwrap());
        Box::new(move |n, buf| {
            let mut nonce = [0u8; 12];
            nonce[4..].copy_from_slice(&n.to_be_bytes());
            let tag = key
                .seal_in_place_separate_tag(
                    aead::Nonce::assume_unique_for_key(nonce),
                    aead::Aad::from(&AAD),
                    buf,
                )
                .unwrap();
            std::hint::black_box(tag.as_ref()[0]);
        })
    };
    macro_rules! rustcrypto {
        ($t:ty, $klen:expr) => {{
            let c = <$t>::new_from_slice(&KEY32[..$klen]).unwrap();
            Box::new(move |n: u64, buf: &mut [u8]| {
                let mut nonce = [0u8; 12];
                nonce[4..].copy_from_slice(&n.to_be_bytes());
                let tag = c
                    .encrypt_in_place_detached(&nonce.into(), &AAD, buf)
                    .unwrap();
                std::hint::black_box(tag);
            }) as Seal
        }};
    }
    // intel-ipsec-mb through the dataplane's own wrapper: the code bitw runs.
    let imb_seal = |klen: usize| -> Seal {
        let lib = IpsecMb::get().expect("intel-ipsec-mb");
        let key = GcmKey::new(lib, &KEY32[..klen]).unwrap();
        Box::new(move |n, buf| {
            let mut iv = [0u8; 12];
            iv[4..].copy_from_slice(&n.to_be_bytes());
            std::hint::black_box(key.seal(&iv, &AAD, buf)[0]);
        })
    };
    let mut cases: Vec<Case> = vec![
        (
            "aes128gcm16",
            "ring",
            Box::new(move || ring_seal(&aead::AES_128_GCM, 16)),
        ),
        (
            "aes128gcm16",
            "aes-gcm",
            Box::new(move || rustcrypto!(aes_gcm::Aes128Gcm, 16)),
        ),
        (
            "aes256gcm16",
            "ring",
            Box::new(move || ring_seal(&aead::AES_256_GCM, 32)),
        ),
        (
            "aes256gcm16",
            "aes-gcm",
            Box::new(move || rustcrypto!(aes_gcm::Aes256Gcm, 32)),
        ),
        (
            "chacha20poly1305",
            "ring",
            Box::new(move || ring_seal(&aead::CHACHA20_POLY1305, 32)),
        ),
        (
            "chacha20poly1305",
            "chacha20poly1305",
            Box::new(move || rustcrypto!(chacha20poly1305::ChaCha20Poly1305, 32)),
        ),
    ];
    match IpsecMb::get() {
        Ok(lib) => {
            eprintln!(
                "intel-ipsec-mb {}: {} code path{}",
                lib.version,
                lib.arch,
                if lib.vaes {
                    " with VAES/VPCLMULQDQ"
                } else {
                    ""
                }
            );
            cases.insert(
                1,
                (
                    "aes128gcm16",
                    "intel-ipsec-mb",
                    Box::new(move || imb_seal(16)),
                ),
            );
            cases.insert(
                4,
                (
                    "aes256gcm16",
                    "intel-ipsec-mb",
                    Box::new(move || imb_seal(32)),
                ),
            );
        }
        Err(e) => eprintln!("intel-ipsec-mb not measured: {e}"),
    }
    eprintln!(
        "{:<18} {:<18} {:>6} {:>10} {:>10}",
        "aead", "library", "bytes", "Mops", "Gbit/s"
    );
    for (alg, lib, make) in &cases {
        for &len in &cli.sizes {
            let rates: Vec<f64> = (0..cli.runs)
                .map(|_| measure(cli.millis, len, make()))
                .collect();
            let ops = median(rates.clone());
            let gbps = ops * len as f64 * 8.0 / 1e9;
            eprintln!(
                "{alg:<18} {lib:<18} {len:>6} {:>10.2} {:>10.2}",
                ops / 1e6,
                gbps
            );
            println!(
                "{}",
                serde_json::json!({"aead": alg, "library": lib, "bytes": len, "mops": ops / 1e6,
                                   "gbps": gbps, "runs": rates.iter().map(|r| r / 1e6).collect::<Vec<_>>()})
            );
        }
    }
}
