//! Stateless cookies for a responder under load (RFC 7296 §2.6).
//!
//! The I/O layer decides when cookies are required (e.g. while the number of
//! half-open SAs is over a threshold) and then passes every IKE_SA_INIT
//! request through [`CookieJar::check`] before it creates a responder: a
//! request without a valid COOKIE gets the COOKIE answer and costs us
//! nothing but a hash, and no state.
//!
//! Cookie = VersionID | SHA-256(Ni | IPi | SPIi | secret), as the RFC
//! suggests: one octet naming the secret, then the hash. The secret comes
//! from the injected random source and is replaced every rotation period;
//! cookies made with the previous secret stay valid for one more period, so
//! an initiator that got a cookie just before a rotation still gets in.

use std::fmt;
use std::time::{Duration, Instant};

use rand_core::CryptoRngCore;
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use crate::ike::message::{ExchangeType, Message, MessageView, NotifyPayload, NotifyType, Payload};
use crate::ike::sa::Datagram;

/// How often the secret is replaced by default.
pub const DEFAULT_ROTATION: Duration = Duration::from_secs(120);

const SECRET_LEN: usize = 32;

/// One secret and the version octet that names it in cookies.
struct Secret {
    version: u8,
    bytes: Zeroizing<[u8; SECRET_LEN]>,
}

/// The responder's cookie secrets. See the module documentation.
pub struct CookieJar {
    rng: Box<dyn CryptoRngCore + Send>,
    current: Secret,
    previous: Option<Secret>,
    rotation: Duration,
    rotate_at: Instant,
}

impl fmt::Debug for CookieJar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CookieJar")
            .field("version", &self.current.version)
            .field("rotation", &self.rotation)
            .finish_non_exhaustive()
    }
}

impl CookieJar {
    /// A jar whose secret is replaced every [`DEFAULT_ROTATION`].
    pub fn new(now: Instant, rng: Box<dyn CryptoRngCore + Send>) -> CookieJar {
        CookieJar::with_rotation(now, DEFAULT_ROTATION, rng)
    }

    /// A jar whose secret is replaced every `rotation` (at least 1 s).
    pub fn with_rotation(
        now: Instant,
        rotation: Duration,
        mut rng: Box<dyn CryptoRngCore + Send>,
    ) -> CookieJar {
        let rotation = rotation.max(Duration::from_secs(1));
        let current = Secret {
            version: 0,
            bytes: random_secret(&mut *rng),
        };
        CookieJar {
            rng,
            current,
            previous: None,
            rotation,
            rotate_at: now.checked_add(rotation).unwrap_or(now),
        }
    }

    /// Replaces the secret now; the previous one stays valid for one
    /// rotation period.
    pub fn rotate(&mut self, now: Instant) {
        let next = Secret {
            version: self.current.version.wrapping_add(1),
            bytes: random_secret(&mut *self.rng),
        };
        self.previous = Some(std::mem::replace(&mut self.current, next));
        self.rotate_at = now.checked_add(self.rotation).unwrap_or(now);
    }

    /// Vets an IKE_SA_INIT request: `Ok` if it carries a valid COOKIE
    /// notify as its first payload, else `Err` with the answer to send (from
    /// `datagram.dst` to `datagram.src`: the COOKIE notify, message ID 0,
    /// responder SPI 0). Anything that is not a well-formed IKE_SA_INIT
    /// request passes (`Ok`): no cookie can be made for it, and the engine
    /// rejects it without keeping state.
    pub fn check(&mut self, now: Instant, datagram: &Datagram) -> Result<(), Datagram> {
        self.rotate_if_due(now);
        let Ok(view) = MessageView::new_checked(&datagram.payload) else {
            return Ok(());
        };
        let header = view.header();
        if header.exchange != ExchangeType::IKE_SA_INIT
            || header.flags.is_response()
            || header.spi_r != 0
            || header.message_id != 0
        {
            return Ok(());
        }
        let Ok(payloads) = view.decode_payloads() else {
            return Ok(());
        };
        let Some(ni) = payloads.iter().find_map(|p| match p {
            Payload::Nonce(n) => Some(n.as_slice()),
            _ => None,
        }) else {
            return Ok(());
        };
        let ip = match datagram.src.ip() {
            std::net::IpAddr::V4(a) => a.octets().to_vec(),
            std::net::IpAddr::V6(a) => a.octets().to_vec(),
        };
        if let Some(Payload::Notify(n)) = payloads.first() {
            if n.notify_type == NotifyType::COOKIE && self.valid(&n.data, ni, &ip, header.spi_i) {
                return Ok(());
            }
        }
        let cookie = make_cookie(&self.current, ni, &ip, header.spi_i);
        let answer = Message::new(
            header.response(),
            vec![Payload::Notify(NotifyPayload::cookie(cookie))],
        );
        match answer.encode() {
            Ok(payload) => Err(Datagram {
                src: datagram.dst,
                dst: datagram.src,
                payload,
            }),
            // Cannot happen for a one-notify message; let the engine decide.
            Err(_) => Ok(()),
        }
    }

    fn rotate_if_due(&mut self, now: Instant) {
        if now < self.rotate_at {
            return;
        }
        // Two periods without a check: the previous secret is too old too.
        let stale = now >= self.rotate_at.checked_add(self.rotation).unwrap_or(now);
        self.rotate(now);
        if stale {
            self.rotate(now);
        }
    }

    fn valid(&self, cookie: &[u8], ni: &[u8], ip: &[u8], spi_i: u64) -> bool {
        let Some(&version) = cookie.first() else {
            return false;
        };
        [Some(&self.current), self.previous.as_ref()]
            .into_iter()
            .flatten()
            .filter(|s| s.version == version)
            .any(|s| bool::from(make_cookie(s, ni, ip, spi_i).as_slice().ct_eq(cookie)))
    }
}

fn random_secret(rng: &mut dyn CryptoRngCore) -> Zeroizing<[u8; SECRET_LEN]> {
    let mut bytes = Zeroizing::new([0u8; SECRET_LEN]);
    rng.fill_bytes(&mut *bytes);
    bytes
}

/// VersionID | SHA-256(Ni | IPi | SPIi | secret).
fn make_cookie(secret: &Secret, ni: &[u8], ip: &[u8], spi_i: u64) -> Vec<u8> {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(ni);
    ctx.update(ip);
    ctx.update(&spi_i.to_be_bytes());
    ctx.update(&*secret.bytes);
    let mut cookie = vec![secret.version];
    cookie.extend_from_slice(ctx.finish().as_ref());
    cookie
}

#[cfg(test)]
#[path = "cookie_tests.rs"]
mod tests;
