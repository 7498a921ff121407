//! What defines a security association: transform, mode, encapsulation,
//! lifetimes and key material. Shared by the dataplane (which runs SAs) and
//! control (which configures and negotiates them).

use std::fmt;
use std::net::IpAddr;

use zeroize::Zeroizing;

use crate::rules::Direction;

/// AEAD transforms, named as strongSwan names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AeadAlg {
    /// AES-GCM with a 128-bit key and 16-byte ICV (RFC 4106).
    Aes128Gcm16,
    /// AES-GCM with a 256-bit key and 16-byte ICV (RFC 4106).
    Aes256Gcm16,
    /// ChaCha20-Poly1305 (RFC 7634).
    ChaCha20Poly1305,
}

/// Bytes of the salt that follows the key in the key material (RFC 4106 §8.1, RFC 7634 §3).
pub const SALT_LEN: usize = 4;
/// Bytes of the explicit IV carried in each packet.
pub const IV_LEN: usize = 8;
/// Bytes of the integrity check value.
pub const ICV_LEN: usize = 16;

impl AeadAlg {
    pub fn from_name(s: &str) -> Option<AeadAlg> {
        match s {
            "aes128gcm16" | "aes128gcm128" => Some(AeadAlg::Aes128Gcm16),
            "aes256gcm16" | "aes256gcm128" => Some(AeadAlg::Aes256Gcm16),
            "chacha20poly1305" => Some(AeadAlg::ChaCha20Poly1305),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            AeadAlg::Aes128Gcm16 => "aes128gcm16",
            AeadAlg::Aes256Gcm16 => "aes256gcm16",
            AeadAlg::ChaCha20Poly1305 => "chacha20poly1305",
        }
    }

    /// Key length without the salt.
    pub fn key_len(self) -> usize {
        match self {
            AeadAlg::Aes128Gcm16 => 16,
            AeadAlg::Aes256Gcm16 | AeadAlg::ChaCha20Poly1305 => 32,
        }
    }
}

/// The UDP port of ESP-in-UDP unless an SA says otherwise (RFC 3948).
pub const NAT_T_PORT_DEFAULT: u16 = 4500;

/// Tunnel or transport mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// ESP between the original IP header and its payload; addresses unchanged.
    Transport,
    /// The whole packet inside a new IP header from `src` to `dst`.
    Tunnel { src: IpAddr, dst: IpAddr },
}

/// UDP encapsulation of ESP (RFC 3948).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encap {
    None,
    Udp { sport: u16, dport: u16 },
}

/// Soft and hard limits; 0 = none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Limits {
    pub soft: u64,
    pub hard: u64,
}

/// Everything that defines an SA, keys included.
#[derive(Clone, PartialEq, Eq)]
pub struct SaParams {
    pub name: String,
    pub direction: Direction,
    pub spi: u32,
    pub mode: Mode,
    pub encap: Encap,
    pub alg: AeadAlg,
    /// Key followed by the 4-byte salt; zeroed when dropped.
    pub key_material: Zeroizing<Vec<u8>>,
    pub esn: bool,
    /// Inbound: the anti-replay window in packets (0 = no replay check).
    pub replay_window: u32,
    pub lifetime_packets: Limits,
    pub lifetime_bytes: Limits,
    /// Inbound: the name inbound protect rules use for this SA (several SAs
    /// may share one, e.g. the old and the new SA of a Child SA being
    /// rekeyed); `None`: the SA's own name. Outbound SAs have none.
    pub policy: Option<String>,
}

impl SaParams {
    /// The name an inbound protect rule gives to accept this SA's packets:
    /// `policy` if set, else the SA's name.
    pub fn policy_name(&self) -> &str {
        self.policy.as_deref().unwrap_or(&self.name)
    }
}

impl fmt::Debug for SaParams {
    // Never print keys.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SaParams")
            .field("name", &self.name)
            .field("direction", &self.direction)
            .field("spi", &format_args!("{:#010x}", self.spi))
            .field("mode", &self.mode)
            .field("encap", &self.encap)
            .field("alg", &self.alg)
            .field("esn", &self.esn)
            .field("replay_window", &self.replay_window)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

/// Events an SA raises for the control process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaEvent {
    SoftLifetime,
    HardLifetime,
    SequenceExhausted,
}
