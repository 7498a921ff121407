//! IKEv2's symmetric cryptography: the PRFs and prf+, SKEYSEED and the IKE SA
//! key schedule (RFC 7296 §2.13, §2.14, §2.18), Child SA KEYMAT (§2.17), the
//! Encrypted (SK) payload (§3.14, RFC 5282, RFC 7634) and AUTH for pre-shared
//! keys (§2.15).
//!
//! The engine's path through it:
//!
//! 1. after IKE_SA_INIT: [`IkeSaKeys::initial`] with the negotiated
//!    [`IkeSuite`], g^ir from [`super::dh`], both nonces and both SPIs;
//! 2. every later message: [`SkCipher::seal`] / [`SkCipher::open`] on
//!    [`IkeSaKeys::initiator_cipher`] (what the IKE SA's original initiator
//!    sends) or [`IkeSaKeys::responder_cipher`];
//! 3. IKE_AUTH: [`IkeSaKeys::initiator_signed_octets`] /
//!    [`IkeSaKeys::responder_signed_octets`], then [`auth_psk`] /
//!    [`verify_auth_psk`] (or a signature over the same octets);
//! 4. each Child SA: [`IkeSaKeys::child_sa_keys`]; rekeying the IKE SA:
//!    [`IkeSaKeys::rekeyed`].
//!
//! Crates: ring for HMAC and both AEADs (already the project's AEAD, and the
//! one the dataplane uses); RustCrypto `aes` + `cbc` for AES-CBC, which ring
//! does not offer; `subtle` for the constant-time ICV and AUTH comparisons
//! (ring's `hmac::verify` cannot check a truncated ICV).
//!
//! Keys: every key this module holds or returns is a [`SecretBytes`]: zeroed
//! on drop, and `Debug` prints only its length. No error carries key bytes.
//! ring's expanded key schedules (HMAC pads, AES round keys) are not zeroed by
//! ring, so they are built per operation from the zeroing copies and live only
//! for that call; nothing long-lived holds them. The RustCrypto AES key
//! schedule zeroes itself on drop (`zeroize` feature).

use std::fmt;
use std::sync::{Mutex, PoisonError};

use cbc::cipher::block_padding::NoPadding;
use cbc::cipher::{BlockDecryptMut, BlockEncryptMut, KeyIvInit};
use rand_core::CryptoRngCore;
use ring::{aead, hmac};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

/// Key bytes: zeroed on drop, never printed.
pub struct SecretBytes(Zeroizing<Vec<u8>>);

impl SecretBytes {
    fn new(bytes: Vec<u8>) -> SecretBytes {
        SecretBytes(Zeroizing::new(bytes))
    }

    /// The key itself, for handing to the next stage (a cipher, the dataplane).
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Length in octets.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True for the empty key (SK_a / ESP integrity under an AEAD).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<{} octets redacted>", self.0.len())
    }
}

/// Everything that can go wrong here. Messages name algorithms, lengths and
/// the fault; never key bytes, never plaintext.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    #[error("prf+ can produce at most 255 blocks ({max} octets with this PRF); {requested} were asked for")]
    PrfPlusTooLong { requested: usize, max: usize },
    #[error("{what} must be {expected} octets, got {actual}")]
    KeyLength {
        what: &'static str,
        expected: usize,
        actual: usize,
    },
    #[error("invalid transform combination: {0}")]
    InvalidSuite(&'static str),
    #[error("the IV must be {expected} octets for this cipher, got {actual}")]
    IvLength { expected: usize, actual: usize },
    #[error("the AEAD IV counter of this key is exhausted; rekey the IKE SA")]
    IvSpaceExhausted,
    #[error("the random number generator failed")]
    RandomSource,
    #[error("the Encrypted payload body is {actual} octets; this cipher needs at least {min}")]
    Truncated { actual: usize, min: usize },
    #[error("the ciphertext is {actual} octets, not a multiple of the {block}-octet block")]
    Misaligned { actual: usize, block: usize },
    #[error("integrity check failed: the Encrypted payload or the message around it was altered, or the keys differ")]
    IntegrityCheckFailed,
    #[error("the Pad Length ({pad_len}) exceeds the decrypted data ({available} octets)")]
    BadPadding { pad_len: usize, available: usize },
    #[error("the Encrypted payload would be {actual} octets; a payload length field holds at most {max}")]
    TooLong { actual: usize, max: usize },
    #[error("AUTH payload mismatch: the peer does not hold the same pre-shared key, or the signed octets differ")]
    AuthenticationFailed,
}

// ------------------------------------------------------------------ transforms

/// A pseudo-random function (IANA Transform Type 2), the HMAC-SHA2 family of
/// RFC 4868. Its key may be any length (HMAC hashes long keys), which is why
/// SKEYSEED can key it with Ni | Nr directly (RFC 7296 §2.14); PRFs with a
/// fixed key size (AES-XCBC, AES-CMAC) would need the nonce halves instead and
/// are not supported.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Prf {
    /// PRF_HMAC_SHA2_256 (5).
    HmacSha256,
    /// PRF_HMAC_SHA2_384 (6).
    HmacSha384,
    /// PRF_HMAC_SHA2_512 (7).
    HmacSha512,
}

impl Prf {
    pub const ALL: [Prf; 3] = [Prf::HmacSha256, Prf::HmacSha384, Prf::HmacSha512];

    /// IANA Transform Type 2 ID.
    pub const fn iana_id(self) -> u16 {
        match self {
            Prf::HmacSha256 => 5,
            Prf::HmacSha384 => 6,
            Prf::HmacSha512 => 7,
        }
    }

    pub fn from_iana_id(id: u16) -> Option<Prf> {
        Prf::ALL.into_iter().find(|p| p.iana_id() == id)
    }

    /// strongSwan's proposal keyword.
    pub const fn name(self) -> &'static str {
        match self {
            Prf::HmacSha256 => "prfsha256",
            Prf::HmacSha384 => "prfsha384",
            Prf::HmacSha512 => "prfsha512",
        }
    }

    /// Output length in octets (one prf+ block).
    pub const fn output_len(self) -> usize {
        match self {
            Prf::HmacSha256 => 32,
            Prf::HmacSha384 => 48,
            Prf::HmacSha512 => 64,
        }
    }

    /// The PRF's preferred key length, which RFC 7296 §2.14 makes the length
    /// of SK_d, SK_pi and SK_pr; RFC 4868 sets it to the output length.
    pub const fn key_len(self) -> usize {
        self.output_len()
    }

    fn algorithm(self) -> hmac::Algorithm {
        match self {
            Prf::HmacSha256 => hmac::HMAC_SHA256,
            Prf::HmacSha384 => hmac::HMAC_SHA384,
            Prf::HmacSha512 => hmac::HMAC_SHA512,
        }
    }

    /// prf(key, data).
    pub fn compute(self, key: &[u8], data: &[u8]) -> SecretBytes {
        self.compute_parts(key, &[data])
    }

    /// prf(key, parts[0] | parts[1] | …), without copying secrets into a
    /// concatenation buffer first.
    fn compute_parts(self, key: &[u8], parts: &[&[u8]]) -> SecretBytes {
        let key = hmac::Key::new(self.algorithm(), key);
        let mut context = hmac::Context::with_key(&key);
        for part in parts {
            context.update(part);
        }
        SecretBytes::new(context.sign().as_ref().to_vec())
    }
}

impl fmt::Display for Prf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An integrity algorithm (IANA Transform Type 3): HMAC-SHA2 truncated to
/// half its output (RFC 4868), for the CBC ciphers; AEADs have none.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Integrity {
    /// AUTH_HMAC_SHA2_256_128 (12).
    HmacSha256_128,
    /// AUTH_HMAC_SHA2_384_192 (13).
    HmacSha384_192,
    /// AUTH_HMAC_SHA2_512_256 (14).
    HmacSha512_256,
}

impl Integrity {
    pub const ALL: [Integrity; 3] = [
        Integrity::HmacSha256_128,
        Integrity::HmacSha384_192,
        Integrity::HmacSha512_256,
    ];

    /// IANA Transform Type 3 ID.
    pub const fn iana_id(self) -> u16 {
        match self {
            Integrity::HmacSha256_128 => 12,
            Integrity::HmacSha384_192 => 13,
            Integrity::HmacSha512_256 => 14,
        }
    }

    pub fn from_iana_id(id: u16) -> Option<Integrity> {
        Integrity::ALL.into_iter().find(|i| i.iana_id() == id)
    }

    /// strongSwan's proposal keyword.
    pub const fn name(self) -> &'static str {
        match self {
            Integrity::HmacSha256_128 => "sha256",
            Integrity::HmacSha384_192 => "sha384",
            Integrity::HmacSha512_256 => "sha512",
        }
    }

    /// Key length (SK_ai / SK_ar, or the ESP integrity key): the hash output
    /// length (RFC 4868).
    pub const fn key_len(self) -> usize {
        match self {
            Integrity::HmacSha256_128 => 32,
            Integrity::HmacSha384_192 => 48,
            Integrity::HmacSha512_256 => 64,
        }
    }

    /// The truncated ICV length.
    pub const fn icv_len(self) -> usize {
        self.key_len() / 2
    }

    fn algorithm(self) -> hmac::Algorithm {
        match self {
            Integrity::HmacSha256_128 => hmac::HMAC_SHA256,
            Integrity::HmacSha384_192 => hmac::HMAC_SHA384,
            Integrity::HmacSha512_256 => hmac::HMAC_SHA512,
        }
    }
}

impl fmt::Display for Integrity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An encryption algorithm (IANA Transform Type 1) for the SK payload, and
/// for ESP when it sizes Child SA keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Encryption {
    /// ENCR_AES_CBC (12), Key Length 128.
    Aes128Cbc,
    /// ENCR_AES_CBC (12), Key Length 256.
    Aes256Cbc,
    /// ENCR_AES_GCM_16 (20), Key Length 128.
    Aes128Gcm16,
    /// ENCR_AES_GCM_16 (20), Key Length 256.
    Aes256Gcm16,
    /// ENCR_CHACHA20_POLY1305 (28), no Key Length attribute.
    ChaCha20Poly1305,
}

impl Encryption {
    pub const ALL: [Encryption; 5] = [
        Encryption::Aes128Cbc,
        Encryption::Aes256Cbc,
        Encryption::Aes128Gcm16,
        Encryption::Aes256Gcm16,
        Encryption::ChaCha20Poly1305,
    ];

    /// IANA Transform Type 1 ID.
    pub const fn iana_id(self) -> u16 {
        match self {
            Encryption::Aes128Cbc | Encryption::Aes256Cbc => 12,
            Encryption::Aes128Gcm16 | Encryption::Aes256Gcm16 => 20,
            Encryption::ChaCha20Poly1305 => 28,
        }
    }

    /// The Key Length transform attribute (bits), where the transform has one.
    pub const fn key_length_attribute(self) -> Option<u16> {
        match self {
            Encryption::Aes128Cbc | Encryption::Aes128Gcm16 => Some(128),
            Encryption::Aes256Cbc | Encryption::Aes256Gcm16 => Some(256),
            Encryption::ChaCha20Poly1305 => None,
        }
    }

    /// The transform with this ID and Key Length attribute, if supported.
    pub fn from_iana_id(id: u16, key_length_attribute: Option<u16>) -> Option<Encryption> {
        Encryption::ALL
            .into_iter()
            .find(|e| e.iana_id() == id && e.key_length_attribute() == key_length_attribute)
    }

    /// strongSwan's proposal keyword.
    pub const fn name(self) -> &'static str {
        match self {
            Encryption::Aes128Cbc => "aes128",
            Encryption::Aes256Cbc => "aes256",
            Encryption::Aes128Gcm16 => "aes128gcm16",
            Encryption::Aes256Gcm16 => "aes256gcm16",
            Encryption::ChaCha20Poly1305 => "chacha20poly1305",
        }
    }

    /// Combined-mode (AEAD): no separate integrity transform.
    pub const fn is_aead(self) -> bool {
        !matches!(self, Encryption::Aes128Cbc | Encryption::Aes256Cbc)
    }

    /// Keying material the transform takes (SK_ei / SK_er, or the ESP
    /// encryption key): for the AEADs the key followed by a 4-octet salt
    /// (RFC 5282 §7.1, RFC 4106 §8.1 for ESP, RFC 7634).
    pub const fn key_len(self) -> usize {
        match self {
            Encryption::Aes128Cbc => 16,
            Encryption::Aes256Cbc => 32,
            Encryption::Aes128Gcm16 => 16 + AEAD_SALT_LEN,
            Encryption::Aes256Gcm16 | Encryption::ChaCha20Poly1305 => 32 + AEAD_SALT_LEN,
        }
    }

    /// The IV carried in each SK payload: a CBC block, or the AEADs' 8-octet
    /// explicit nonce part.
    pub const fn iv_len(self) -> usize {
        if self.is_aead() {
            AEAD_IV_LEN
        } else {
            AES_BLOCK_LEN
        }
    }

    fn aead_algorithm(self) -> Option<&'static aead::Algorithm> {
        match self {
            Encryption::Aes128Gcm16 => Some(&aead::AES_128_GCM),
            Encryption::Aes256Gcm16 => Some(&aead::AES_256_GCM),
            Encryption::ChaCha20Poly1305 => Some(&aead::CHACHA20_POLY1305),
            Encryption::Aes128Cbc | Encryption::Aes256Cbc => None,
        }
    }
}

impl fmt::Display for Encryption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

const AES_BLOCK_LEN: usize = 16;
const AEAD_SALT_LEN: usize = 4;
const AEAD_IV_LEN: usize = 8;
const AEAD_TAG_LEN: usize = 16;
/// The generic payload header in front of the SK payload's IV.
const GENERIC_PAYLOAD_HEADER_LEN: usize = 4;

/// Checks that `encryption` and `integrity` go together: an AEAD takes no
/// integrity transform, a CBC cipher needs one (RFC 7296 §3.3.3).
fn check_combination(
    encryption: Encryption,
    integrity: Option<Integrity>,
) -> Result<(), CryptoError> {
    match (encryption.is_aead(), integrity) {
        (true, Some(_)) => Err(CryptoError::InvalidSuite(
            "a combined-mode (AEAD) cipher takes no integrity algorithm",
        )),
        (false, None) => Err(CryptoError::InvalidSuite(
            "a CBC cipher needs an integrity algorithm",
        )),
        _ => Ok(()),
    }
}

/// The negotiated IKE SA transforms (the DH group is [`super::dh`]'s affair).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IkeSuite {
    encryption: Encryption,
    integrity: Option<Integrity>,
    prf: Prf,
}

impl IkeSuite {
    /// A suite, refusing an AEAD with an integrity algorithm and a CBC cipher
    /// without one.
    pub fn new(
        encryption: Encryption,
        integrity: Option<Integrity>,
        prf: Prf,
    ) -> Result<IkeSuite, CryptoError> {
        check_combination(encryption, integrity)?;
        Ok(IkeSuite {
            encryption,
            integrity,
            prf,
        })
    }

    pub fn encryption(&self) -> Encryption {
        self.encryption
    }

    pub fn integrity(&self) -> Option<Integrity> {
        self.integrity
    }

    pub fn prf(&self) -> Prf {
        self.prf
    }
}

impl fmt::Display for IkeSuite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.encryption)?;
        if let Some(integrity) = self.integrity {
            write!(f, "-{integrity}")?;
        }
        write!(f, "-{}", self.prf)
    }
}

// ------------------------------------------------------------------ prf+

/// prf+ (RFC 7296 §2.13): T1 = prf(K, S | 0x01), Tn = prf(K, Tn-1 | S | n),
/// concatenated and cut to `len` octets. More than 255 blocks is an error,
/// since the counter is one octet.
pub fn prf_plus(prf: Prf, key: &[u8], seed: &[u8], len: usize) -> Result<SecretBytes, CryptoError> {
    prf_plus_parts(prf, key, &[seed], len)
}

fn prf_plus_parts(
    prf: Prf,
    key: &[u8],
    seed: &[&[u8]],
    len: usize,
) -> Result<SecretBytes, CryptoError> {
    let max = 255 * prf.output_len();
    if len > max {
        return Err(CryptoError::PrfPlusTooLong {
            requested: len,
            max,
        });
    }
    let hmac_key = hmac::Key::new(prf.algorithm(), key);
    let mut out = Zeroizing::new(Vec::with_capacity(len + prf.output_len()));
    let mut previous: Option<hmac::Tag> = None;
    let mut counter: u8 = 1;
    while out.len() < len {
        let mut context = hmac::Context::with_key(&hmac_key);
        if let Some(previous) = &previous {
            context.update(previous.as_ref());
        }
        for part in seed {
            context.update(part);
        }
        context.update(&[counter]);
        let block = context.sign();
        out.extend_from_slice(block.as_ref());
        previous = Some(block);
        // At most 255 blocks by the check above, so this never wraps early.
        counter = counter.wrapping_add(1);
    }
    out.truncate(len);
    Ok(SecretBytes(out))
}

/// Cuts `material` into consecutive keys of the given lengths. The caller
/// asked prf+ for exactly the sum, so the cuts always fit.
fn split_keys<const N: usize>(material: &SecretBytes, lengths: [usize; N]) -> [SecretBytes; N] {
    let mut at = 0;
    lengths.map(|len| {
        let end = at + len;
        let key = material
            .as_bytes()
            .get(at..end)
            .map(<[u8]>::to_vec)
            .unwrap_or_default();
        at = end;
        SecretBytes::new(key)
    })
}

// ------------------------------------------------------------------ SKEYSEED

/// SKEYSEED = prf(Ni | Nr, g^ir) (RFC 7296 §2.14). `ni` and `nr` are the
/// Nonce payloads' data, `shared_secret` is g^ir as [`super::dh`] returns it.
/// Nonce lengths are the parser's to check (§3.9: 16 to 256 octets, and at
/// least half the PRF key size); any length works here.
pub fn skeyseed(prf: Prf, ni: &[u8], nr: &[u8], shared_secret: &[u8]) -> SecretBytes {
    let mut nonces = Zeroizing::new(Vec::with_capacity(ni.len() + nr.len()));
    nonces.extend_from_slice(ni);
    nonces.extend_from_slice(nr);
    prf.compute(&nonces, shared_secret)
}

/// SKEYSEED for an IKE SA made by rekeying another (RFC 7296 §2.18):
/// prf(SK_d (old), g^ir (new) | Ni | Nr). `old_prf` is the PRF of the IKE SA
/// being rekeyed: the exchange belongs to it. Ni and Nr are the nonces of the
/// CREATE_CHILD_SA exchange, Ni from whichever side initiated it.
pub fn rekey_skeyseed(
    old_prf: Prf,
    old_sk_d: &[u8],
    new_shared_secret: &[u8],
    ni: &[u8],
    nr: &[u8],
) -> SecretBytes {
    old_prf.compute_parts(old_sk_d, &[new_shared_secret, ni, nr])
}

// ------------------------------------------------------------------ IKE SA keys

/// The keys of one IKE SA: SK_d, SK_pi, SK_pr, and the two SK payload
/// ciphers built from SK_ei/SK_ai and SK_er/SK_ar.
///
/// Each cipher exists once, here: an AEAD cipher numbers its IVs, and IV
/// uniqueness per key is only guaranteed within one cipher object (a second
/// object over the same key starts at another random point: distinct with
/// overwhelming probability, not by construction). Neither this type nor
/// [`SkCipher`] is `Clone` for that reason.
#[derive(Debug)]
pub struct IkeSaKeys {
    suite: IkeSuite,
    sk_d: SecretBytes,
    sk_pi: SecretBytes,
    sk_pr: SecretBytes,
    initiator: SkCipher,
    responder: SkCipher,
}

impl IkeSaKeys {
    /// The keys after IKE_SA_INIT: SKEYSEED from the nonces and g^ir, then
    /// [`derive`](IkeSaKeys::derive). `spi_i` / `spi_r` are the IKE header's
    /// SPIs in header order, whichever side we are.
    pub fn initial(
        suite: IkeSuite,
        shared_secret: &[u8],
        ni: &[u8],
        nr: &[u8],
        spi_i: &[u8; 8],
        spi_r: &[u8; 8],
    ) -> Result<IkeSaKeys, CryptoError> {
        let seed = skeyseed(suite.prf, ni, nr, shared_secret);
        IkeSaKeys::derive(suite, seed.as_bytes(), ni, nr, spi_i, spi_r)
    }

    /// The keys of the IKE SA that replaces this one (RFC 7296 §2.18):
    /// SKEYSEED from this SA's SK_d and PRF, then the new suite's schedule.
    /// `ni`, `nr` are the CREATE_CHILD_SA nonces and `spi_i`, `spi_r` the new
    /// SA's SPIs, "i" being whoever initiated the rekey exchange.
    pub fn rekeyed(
        &self,
        new_suite: IkeSuite,
        new_shared_secret: &[u8],
        ni: &[u8],
        nr: &[u8],
        spi_i: &[u8; 8],
        spi_r: &[u8; 8],
    ) -> Result<IkeSaKeys, CryptoError> {
        let seed = rekey_skeyseed(
            self.suite.prf,
            self.sk_d.as_bytes(),
            new_shared_secret,
            ni,
            nr,
        );
        IkeSaKeys::derive(new_suite, seed.as_bytes(), ni, nr, spi_i, spi_r)
    }

    /// {SK_d | SK_ai | SK_ar | SK_ei | SK_er | SK_pi | SK_pr} =
    /// prf+(SKEYSEED, Ni | Nr | SPIi | SPIr) (RFC 7296 §2.14). SK_d, SK_pi and
    /// SK_pr take the PRF's key length; SK_a* the integrity key length (none
    /// for an AEAD); SK_e* the cipher's, with the AEAD salt.
    pub fn derive(
        suite: IkeSuite,
        skeyseed: &[u8],
        ni: &[u8],
        nr: &[u8],
        spi_i: &[u8; 8],
        spi_r: &[u8; 8],
    ) -> Result<IkeSaKeys, CryptoError> {
        let prf_len = suite.prf.key_len();
        let integ_len = suite.integrity.map_or(0, Integrity::key_len);
        let encr_len = suite.encryption.key_len();
        let lengths = [
            prf_len, integ_len, integ_len, encr_len, encr_len, prf_len, prf_len,
        ];
        let material = prf_plus_parts(
            suite.prf,
            skeyseed,
            &[ni, nr, spi_i, spi_r],
            lengths.iter().sum(),
        )?;
        let [sk_d, sk_ai, sk_ar, sk_ei, sk_er, sk_pi, sk_pr] = split_keys(&material, lengths);
        let initiator = SkCipher::new(
            suite.encryption,
            suite.integrity,
            sk_ei.as_bytes(),
            sk_ai.as_bytes(),
        )?;
        let responder = SkCipher::new(
            suite.encryption,
            suite.integrity,
            sk_er.as_bytes(),
            sk_ar.as_bytes(),
        )?;
        Ok(IkeSaKeys {
            suite,
            sk_d,
            sk_pi,
            sk_pr,
            initiator,
            responder,
        })
    }

    pub fn suite(&self) -> IkeSuite {
        self.suite
    }

    /// SK_d: the key Child SA keys and the next IKE SA's keys derive from.
    pub fn sk_d(&self) -> &SecretBytes {
        &self.sk_d
    }

    /// SK_pi: MACs the initiator's ID into its AUTH.
    pub fn sk_pi(&self) -> &SecretBytes {
        &self.sk_pi
    }

    /// SK_pr: MACs the responder's ID into its AUTH.
    pub fn sk_pr(&self) -> &SecretBytes {
        &self.sk_pr
    }

    /// The SK cipher of messages the IKE SA's original initiator sends
    /// (SK_ei, SK_ai): the initiator seals with it, the responder opens.
    /// "Original initiator" is the IKE header's I flag, not who sent the
    /// current request.
    pub fn initiator_cipher(&self) -> &SkCipher {
        &self.initiator
    }

    /// The SK cipher of messages the original responder sends (SK_er, SK_ar).
    pub fn responder_cipher(&self) -> &SkCipher {
        &self.responder
    }

    /// The octets the initiator's AUTH covers (RFC 7296 §2.15): its
    /// IKE_SA_INIT request as sent, Nr, prf(SK_pi, IDi payload body).
    pub fn initiator_signed_octets(
        &self,
        ike_sa_init_request: &[u8],
        nr: &[u8],
        idi_body: &[u8],
    ) -> Vec<u8> {
        auth_signed_octets(
            self.suite.prf,
            ike_sa_init_request,
            nr,
            self.sk_pi.as_bytes(),
            idi_body,
        )
    }

    /// The octets the responder's AUTH covers: its IKE_SA_INIT response as
    /// sent, Ni, prf(SK_pr, IDr payload body).
    pub fn responder_signed_octets(
        &self,
        ike_sa_init_response: &[u8],
        ni: &[u8],
        idr_body: &[u8],
    ) -> Vec<u8> {
        auth_signed_octets(
            self.suite.prf,
            ike_sa_init_response,
            ni,
            self.sk_pr.as_bytes(),
            idr_body,
        )
    }

    /// KEYMAT for a Child SA negotiated under this IKE SA: see
    /// [`child_sa_keys`].
    pub fn child_sa_keys(
        &self,
        new_shared_secret: Option<&[u8]>,
        ni: &[u8],
        nr: &[u8],
        lengths: ChildSaKeyLengths,
    ) -> Result<ChildSaKeys, CryptoError> {
        child_sa_keys(
            self.suite.prf,
            self.sk_d.as_bytes(),
            new_shared_secret,
            ni,
            nr,
            lengths,
        )
    }
}

// ------------------------------------------------------------------ Child SA

/// How much keying material one direction of an ESP SA takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ChildSaKeyLengths {
    /// The encryption key, with the 4-octet salt for the AEADs.
    pub encryption: usize,
    /// The integrity key; 0 for the AEADs.
    pub integrity: usize,
}

impl ChildSaKeyLengths {
    /// The lengths ESP needs for these transforms (same IANA registries, same
    /// key sizes as the IKE SA's: RFC 4106 §8.1 and RFC 7634 for the salt).
    pub fn for_esp(
        encryption: Encryption,
        integrity: Option<Integrity>,
    ) -> Result<ChildSaKeyLengths, CryptoError> {
        check_combination(encryption, integrity)?;
        Ok(ChildSaKeyLengths {
            encryption: encryption.key_len(),
            integrity: integrity.map_or(0, Integrity::key_len),
        })
    }
}

/// The keys of one direction of an ESP SA.
#[derive(Debug)]
pub struct EspKeys {
    /// Encryption key, then the salt for the AEADs: the form the dataplane's
    /// SA key takes.
    pub encryption: SecretBytes,
    /// Integrity key; empty for the AEADs.
    pub integrity: SecretBytes,
}

/// Both directions' keys of a Child SA.
#[derive(Debug)]
pub struct ChildSaKeys {
    /// For packets from the exchange's initiator to its responder: the
    /// inbound SA of the responder, with the SPI the responder chose.
    pub initiator_to_responder: EspKeys,
    /// For packets from the exchange's responder to its initiator.
    pub responder_to_initiator: EspKeys,
}

/// Child SA KEYMAT (RFC 7296 §2.17): prf+(SK_d, Ni | Nr), or
/// prf+(SK_d, g^ir (new) | Ni | Nr) when the CREATE_CHILD_SA carried KE
/// payloads. Taken in the RFC's order: everything for initiator→responder
/// first, then responder→initiator; within each, the encryption key (with
/// salt) before the integrity key (the order RFC 4301 fixes, cited by §2.17).
///
/// "Initiator" and the nonces are those of the exchange that created the
/// Child SA: IKE_SA_INIT's for the first Child SA (created in IKE_AUTH), the
/// CREATE_CHILD_SA's for the others, whichever side started it.
pub fn child_sa_keys(
    prf: Prf,
    sk_d: &[u8],
    new_shared_secret: Option<&[u8]>,
    ni: &[u8],
    nr: &[u8],
    lengths: ChildSaKeyLengths,
) -> Result<ChildSaKeys, CryptoError> {
    let per_direction = lengths.encryption + lengths.integrity;
    let seed: [&[u8]; 3] = [new_shared_secret.unwrap_or(&[]), ni, nr];
    let material = prf_plus_parts(prf, sk_d, &seed, 2 * per_direction)?;
    let [encr_i, integ_i, encr_r, integ_r] = split_keys(
        &material,
        [
            lengths.encryption,
            lengths.integrity,
            lengths.encryption,
            lengths.integrity,
        ],
    );
    Ok(ChildSaKeys {
        initiator_to_responder: EspKeys {
            encryption: encr_i,
            integrity: integ_i,
        },
        responder_to_initiator: EspKeys {
            encryption: encr_r,
            integrity: integ_r,
        },
    })
}

// ------------------------------------------------------------------ SK payload

/// Where [`SkCipher::seal`] takes the IV from.
pub enum IvSource<'a> {
    /// The normal case: the cipher chooses. AES-CBC draws 16 random octets
    /// from the generator (a CBC IV must be unpredictable, RFC 7296 §3.14).
    /// The AEADs take the next value of a 64-bit counter kept per key,
    /// starting at a random point drawn on first use: unique per key as RFC
    /// 5282 requires, without the birthday bound of random 64-bit IVs.
    Generate(&'a mut dyn CryptoRngCore),
    /// Exactly these octets (known-answer tests). The caller then guarantees
    /// uniqueness per key (AEAD) or unpredictability (CBC).
    Explicit(&'a [u8]),
}

/// The AEAD IV counter of one key.
#[derive(Clone, Copy)]
struct IvCounter {
    next: u64,
    issued: u64,
}

/// One direction's SK payload protection: encryption plus integrity
/// (AES-CBC with HMAC-SHA2) or an AEAD (AES-GCM-16, ChaCha20-Poly1305).
///
/// Both [`seal`](SkCipher::seal) and [`open`](SkCipher::open) take the same
/// `aad`: **every octet of the message in front of the IV**, i.e. the IKE
/// header, any unencrypted payloads, and the SK payload's generic header
/// (for an SKF fragment, its 8-octet header), with all length fields already
/// holding their final values (use [`sk_payload_len`](SkCipher::sk_payload_len)
/// to know them before sealing). The cipher uses it as each RFC says:
///
/// - AES-CBC + HMAC (RFC 7296 §3.14): the ICV is the truncated HMAC over
///   `aad ‖ IV ‖ ciphertext`, i.e. the whole message up to the ICV;
/// - AEAD (RFC 5282, RFC 7634): `aad` is the associated data; the
///   nonce is salt ‖ IV, and the IV is not authenticated separately (it is
///   part of the nonce).
///
/// The SK payload body is `IV ‖ ciphertext ‖ ICV`, where the ciphertext
/// encrypts `inner payloads ‖ padding ‖ Pad Length`. Padding is zeros, to the
/// 16-octet block for CBC and none for the AEADs.
pub struct SkCipher {
    encryption: Encryption,
    integrity: Option<Integrity>,
    /// SK_e: the cipher key, then the salt for the AEADs.
    encryption_key: SecretBytes,
    /// SK_a; empty for the AEADs.
    integrity_key: SecretBytes,
    iv_counter: Mutex<Option<IvCounter>>,
}

impl fmt::Debug for SkCipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SkCipher")
            .field("encryption", &self.encryption)
            .field("integrity", &self.integrity)
            .field("keys", &"<redacted>")
            .finish()
    }
}

impl SkCipher {
    /// A cipher over SK_e (`encryption_key`, with the salt for an AEAD) and
    /// SK_a (`integrity_key`, empty for an AEAD). [`IkeSaKeys`] builds these;
    /// build one directly only for keys that no other `SkCipher` holds: the
    /// AEAD IV counter lives in the object (see [`IvSource::Generate`]).
    pub fn new(
        encryption: Encryption,
        integrity: Option<Integrity>,
        encryption_key: &[u8],
        integrity_key: &[u8],
    ) -> Result<SkCipher, CryptoError> {
        check_combination(encryption, integrity)?;
        if encryption_key.len() != encryption.key_len() {
            return Err(CryptoError::KeyLength {
                what: "SK_e",
                expected: encryption.key_len(),
                actual: encryption_key.len(),
            });
        }
        let integrity_len = integrity.map_or(0, Integrity::key_len);
        if integrity_key.len() != integrity_len {
            return Err(CryptoError::KeyLength {
                what: "SK_a",
                expected: integrity_len,
                actual: integrity_key.len(),
            });
        }
        Ok(SkCipher {
            encryption,
            integrity,
            encryption_key: SecretBytes::new(encryption_key.to_vec()),
            integrity_key: SecretBytes::new(integrity_key.to_vec()),
            iv_counter: Mutex::new(None),
        })
    }

    pub fn encryption(&self) -> Encryption {
        self.encryption
    }

    pub fn integrity(&self) -> Option<Integrity> {
        self.integrity
    }

    /// IV length in the SK payload body.
    pub fn iv_len(&self) -> usize {
        self.encryption.iv_len()
    }

    /// ICV length: the truncated HMAC, or the AEAD tag.
    pub fn icv_len(&self) -> usize {
        self.integrity.map_or(AEAD_TAG_LEN, Integrity::icv_len)
    }

    /// Length of `inner payloads ‖ padding ‖ Pad Length` for `plaintext_len`.
    fn padded_len(&self, plaintext_len: usize) -> Option<usize> {
        let with_pad_length = plaintext_len.checked_add(1)?;
        if self.encryption.is_aead() {
            Some(with_pad_length)
        } else {
            with_pad_length.checked_next_multiple_of(AES_BLOCK_LEN)
        }
    }

    /// The SK payload body (IV ‖ ciphertext ‖ ICV) that sealing
    /// `plaintext_len` octets of inner payloads produces.
    pub fn sk_body_len(&self, plaintext_len: usize) -> Result<usize, CryptoError> {
        self.padded_len(plaintext_len)
            .and_then(|padded| padded.checked_add(self.iv_len() + self.icv_len()))
            .ok_or(CryptoError::TooLong {
                actual: usize::MAX,
                max: usize::from(u16::MAX),
            })
    }

    /// The SK payload's Payload Length field (generic header + body) for
    /// `plaintext_len` octets of inner payloads: what the engine writes into
    /// the header before sealing. An error if it does not fit 16 bits.
    pub fn sk_payload_len(&self, plaintext_len: usize) -> Result<u16, CryptoError> {
        let total = self
            .sk_body_len(plaintext_len)?
            .saturating_add(GENERIC_PAYLOAD_HEADER_LEN);
        u16::try_from(total).map_err(|_| CryptoError::TooLong {
            actual: total,
            max: usize::from(u16::MAX),
        })
    }

    /// Encrypts and integrity-protects `plaintext_payloads` (the inner
    /// payloads, already encoded) and returns the SK payload body,
    /// IV ‖ ciphertext ‖ ICV, of exactly [`sk_body_len`](SkCipher::sk_body_len)
    /// octets. `aad`: see the type's documentation.
    pub fn seal(
        &self,
        aad: &[u8],
        plaintext_payloads: &[u8],
        iv: IvSource<'_>,
    ) -> Result<Vec<u8>, CryptoError> {
        let iv = self.choose_iv(iv)?;
        let padded_len = self
            .padded_len(plaintext_payloads.len())
            .ok_or(CryptoError::TooLong {
                actual: plaintext_payloads.len(),
                max: usize::from(u16::MAX),
            })?;
        let pad_len = padded_len - plaintext_payloads.len() - 1;
        let mut body = Vec::with_capacity(iv.len() + padded_len + self.icv_len());
        body.extend_from_slice(&iv);
        body.extend_from_slice(plaintext_payloads);
        body.resize(body.len() + pad_len, 0);
        // pad_len < 16 (CBC) or 0 (AEAD): it fits the octet.
        body.push(u8::try_from(pad_len).unwrap_or(u8::MAX));
        let (iv_part, data) = body.split_at_mut(iv.len());
        match self.integrity {
            Some(integrity) => {
                self.cbc_encrypt(iv_part, data)?;
                let icv = self.cbc_icv(integrity, aad, &body);
                body.extend_from_slice(&icv);
            }
            None => {
                let tag = self
                    .aead_key()?
                    .seal_in_place_separate_tag(
                        self.aead_nonce(iv_part)?,
                        aead::Aad::from(aad),
                        data,
                    )
                    .map_err(|_| CryptoError::TooLong {
                        actual: padded_len,
                        max: usize::from(u16::MAX),
                    })?;
                body.extend_from_slice(tag.as_ref());
            }
        }
        Ok(body)
    }

    /// Checks and decrypts an SK payload body (IV ‖ ciphertext ‖ ICV) and
    /// returns the inner payloads with the padding removed. Integrity is
    /// verified before anything is decrypted (CBC) or released (AEAD); a
    /// short, misaligned or altered body is an error, never a panic.
    pub fn open(&self, aad: &[u8], sk_body: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let iv_len = self.iv_len();
        let icv_len = self.icv_len();
        let min_data = if self.encryption.is_aead() {
            1
        } else {
            AES_BLOCK_LEN
        };
        let min = iv_len + min_data + icv_len;
        if sk_body.len() < min {
            return Err(CryptoError::Truncated {
                actual: sk_body.len(),
                min,
            });
        }
        let (iv, rest) = sk_body.split_at(iv_len);
        let data_len = rest.len() - icv_len;
        let mut plaintext = match self.integrity {
            Some(integrity) => {
                if !data_len.is_multiple_of(AES_BLOCK_LEN) {
                    return Err(CryptoError::Misaligned {
                        actual: data_len,
                        block: AES_BLOCK_LEN,
                    });
                }
                let (covered, received_icv) = sk_body.split_at(sk_body.len() - icv_len);
                let expected_icv = self.cbc_icv(integrity, aad, covered);
                if !bool::from(expected_icv.ct_eq(received_icv)) {
                    return Err(CryptoError::IntegrityCheckFailed);
                }
                let mut data = rest[..data_len].to_vec();
                self.cbc_decrypt(iv, &mut data)?;
                data
            }
            None => {
                let mut data = rest.to_vec();
                let opened_len = self
                    .aead_key()?
                    .open_in_place(self.aead_nonce(iv)?, aead::Aad::from(aad), &mut data)
                    .map_err(|_| CryptoError::IntegrityCheckFailed)?
                    .len();
                data.truncate(opened_len);
                data
            }
        };
        // Inner payloads ‖ padding ‖ Pad Length: any padding length that fits
        // is accepted (RFC 7296 §3.14), its content is not checked.
        let pad_len = usize::from(plaintext.last().copied().unwrap_or(0));
        let available = plaintext.len().saturating_sub(1);
        if pad_len > available {
            return Err(CryptoError::BadPadding { pad_len, available });
        }
        plaintext.truncate(available - pad_len);
        Ok(plaintext)
    }

    fn choose_iv(&self, source: IvSource<'_>) -> Result<Vec<u8>, CryptoError> {
        let iv_len = self.iv_len();
        match source {
            IvSource::Explicit(iv) if iv.len() == iv_len => Ok(iv.to_vec()),
            IvSource::Explicit(iv) => Err(CryptoError::IvLength {
                expected: iv_len,
                actual: iv.len(),
            }),
            IvSource::Generate(rng) if !self.encryption.is_aead() => {
                let mut iv = vec![0u8; iv_len];
                rng.try_fill_bytes(&mut iv)
                    .map_err(|_| CryptoError::RandomSource)?;
                Ok(iv)
            }
            IvSource::Generate(rng) => {
                // A poisoned lock only means another thread panicked while
                // holding it; the counter is a plain integer, still valid.
                let mut state = self
                    .iv_counter
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                let counter = match *state {
                    Some(counter) => counter,
                    None => {
                        let mut start = [0u8; 8];
                        rng.try_fill_bytes(&mut start)
                            .map_err(|_| CryptoError::RandomSource)?;
                        IvCounter {
                            next: u64::from_be_bytes(start),
                            issued: 0,
                        }
                    }
                };
                if counter.issued == u64::MAX {
                    return Err(CryptoError::IvSpaceExhausted);
                }
                *state = Some(IvCounter {
                    next: counter.next.wrapping_add(1),
                    issued: counter.issued + 1,
                });
                Ok(counter.next.to_be_bytes().to_vec())
            }
        }
    }

    /// Truncated HMAC over `aad ‖ covered` (covered = IV ‖ ciphertext).
    fn cbc_icv(&self, integrity: Integrity, aad: &[u8], covered: &[u8]) -> Vec<u8> {
        let key = hmac::Key::new(integrity.algorithm(), self.integrity_key.as_bytes());
        let mut context = hmac::Context::with_key(&key);
        context.update(aad);
        context.update(covered);
        let tag = context.sign();
        tag.as_ref()
            .get(..integrity.icv_len())
            .unwrap_or_default()
            .to_vec()
    }

    fn cbc_encrypt(&self, iv: &[u8], data: &mut [u8]) -> Result<(), CryptoError> {
        let key = self.encryption_key.as_bytes();
        let len = data.len();
        let result = match self.encryption {
            Encryption::Aes128Cbc => cbc::Encryptor::<aes::Aes128>::new_from_slices(key, iv)
                .map_err(|_| self.key_length_error())?
                .encrypt_padded_mut::<NoPadding>(data, len)
                .map(|_| ()),
            _ => cbc::Encryptor::<aes::Aes256>::new_from_slices(key, iv)
                .map_err(|_| self.key_length_error())?
                .encrypt_padded_mut::<NoPadding>(data, len)
                .map(|_| ()),
        };
        result.map_err(|_| CryptoError::Misaligned {
            actual: len,
            block: AES_BLOCK_LEN,
        })
    }

    fn cbc_decrypt(&self, iv: &[u8], data: &mut [u8]) -> Result<(), CryptoError> {
        let key = self.encryption_key.as_bytes();
        let len = data.len();
        let result = match self.encryption {
            Encryption::Aes128Cbc => cbc::Decryptor::<aes::Aes128>::new_from_slices(key, iv)
                .map_err(|_| self.key_length_error())?
                .decrypt_padded_mut::<NoPadding>(data)
                .map(|_| ()),
            _ => cbc::Decryptor::<aes::Aes256>::new_from_slices(key, iv)
                .map_err(|_| self.key_length_error())?
                .decrypt_padded_mut::<NoPadding>(data)
                .map(|_| ()),
        };
        result.map_err(|_| CryptoError::Misaligned {
            actual: len,
            block: AES_BLOCK_LEN,
        })
    }

    /// The ring AEAD key, built for this call from the zeroing copy (see the
    /// module docs on why it is not kept).
    fn aead_key(&self) -> Result<aead::LessSafeKey, CryptoError> {
        let algorithm = self
            .encryption
            .aead_algorithm()
            .ok_or(CryptoError::InvalidSuite("not an AEAD cipher"))?;
        let key = self.encryption_key.as_bytes();
        let cipher_key = key.get(..key.len().saturating_sub(AEAD_SALT_LEN));
        let unbound = aead::UnboundKey::new(algorithm, cipher_key.unwrap_or_default())
            .map_err(|_| self.key_length_error())?;
        Ok(aead::LessSafeKey::new(unbound))
    }

    /// salt ‖ IV (RFC 5282, RFC 7634).
    fn aead_nonce(&self, iv: &[u8]) -> Result<aead::Nonce, CryptoError> {
        let key = self.encryption_key.as_bytes();
        let salt = key.get(key.len().saturating_sub(AEAD_SALT_LEN)..);
        let mut nonce = [0u8; aead::NONCE_LEN];
        let (salt_part, iv_part) = nonce.split_at_mut(AEAD_SALT_LEN);
        match salt {
            Some(salt) if salt.len() == AEAD_SALT_LEN && iv.len() == AEAD_IV_LEN => {
                salt_part.copy_from_slice(salt);
                iv_part.copy_from_slice(iv);
                Ok(aead::Nonce::assume_unique_for_key(nonce))
            }
            _ => Err(CryptoError::IvLength {
                expected: AEAD_IV_LEN,
                actual: iv.len(),
            }),
        }
    }

    fn key_length_error(&self) -> CryptoError {
        CryptoError::KeyLength {
            what: "SK_e",
            expected: self.encryption.key_len(),
            actual: self.encryption_key.len(),
        }
    }
}

// ------------------------------------------------------------------ AUTH

/// The pad RFC 7296 §2.15 mixes into the pre-shared key (17 ASCII octets, no
/// terminator).
const PSK_KEY_PAD: &[u8] = b"Key Pad for IKEv2";

/// The octets an AUTH payload covers (RFC 7296 §2.15), for PSK and signature
/// methods alike: `message ‖ peer_nonce ‖ prf(SK_p, ID payload body)`.
///
/// - `message`: the signer's own IKE_SA_INIT message, exactly as sent
///   (initiator: the request; responder: the response);
/// - `peer_nonce`: the other side's Nonce data (initiator signs Nr,
///   responder signs Ni);
/// - `sk_p`: the signer's SK_pi / SK_pr;
/// - `id_payload_body`: the signer's ID payload after the generic header:
///   ID Type, the three reserved octets, the identification data.
///
/// For a signature (RSA, ECDSA, RFC 7427) the engine signs these octets
/// with the certificate's key.
pub fn auth_signed_octets(
    prf: Prf,
    message: &[u8],
    peer_nonce: &[u8],
    sk_p: &[u8],
    id_payload_body: &[u8],
) -> Vec<u8> {
    let maced_id = prf.compute(sk_p, id_payload_body);
    let mut octets = Vec::with_capacity(message.len() + peer_nonce.len() + maced_id.len());
    octets.extend_from_slice(message);
    octets.extend_from_slice(peer_nonce);
    octets.extend_from_slice(maced_id.as_bytes());
    octets
}

/// AUTH data for the Shared Key Message Integrity Code method (2):
/// prf(prf(PSK, "Key Pad for IKEv2"), signed octets).
pub fn auth_psk(prf: Prf, psk: &[u8], signed_octets: &[u8]) -> Vec<u8> {
    let padded_key = prf.compute(psk, PSK_KEY_PAD);
    prf.compute(padded_key.as_bytes(), signed_octets)
        .as_bytes()
        .to_vec()
}

/// Checks a peer's PSK AUTH data in constant time.
pub fn verify_auth_psk(
    prf: Prf,
    psk: &[u8],
    signed_octets: &[u8],
    received_auth: &[u8],
) -> Result<(), CryptoError> {
    let expected = auth_psk(prf, psk, signed_octets);
    if bool::from(expected.ct_eq(received_auth)) {
        Ok(())
    } else {
        Err(CryptoError::AuthenticationFailed)
    }
}

// ------------------------------------------------------------------ tests

/// The independent vectors of `testdata/ike_kat.txt` (made by
/// `testdata/ike_kat.py`), by name.
#[cfg(test)]
pub(crate) mod test_vectors {
    const KAT: &str = include_str!("testdata/ike_kat.txt");

    /// The vector `name`; panics (failing the test) if it is missing.
    pub(crate) fn kat(name: &str) -> Vec<u8> {
        KAT.lines()
            .filter_map(|line| line.split_once(" = "))
            .find(|(key, _)| *key == name)
            .map(|(_, value)| hex::decode(value.trim()).expect("hex in ike_kat.txt"))
            .unwrap_or_else(|| panic!("no vector {name} in ike_kat.txt"))
    }
}

#[cfg(test)]
mod tests {
    use super::test_vectors::kat;
    use super::*;

    fn spi(name: &str) -> [u8; 8] {
        kat(name).try_into().expect("an 8-octet SPI")
    }

    use crate::ike::test_rng::{CountingRng, FailingRng};

    // -------------------------------------------------------------- PRFs

    /// RFC 4231 §4.2–4.8 (test cases 1, 2, 3, 4, 6, 7), the RFC 4868 PRFs.
    #[test]
    fn hmac_sha2_rfc4231_vectors() {
        let large_key = vec![0xaa; 131];
        let cases: [(Vec<u8>, Vec<u8>, [&str; 3]); 6] = [
            (
                vec![0x0b; 20],
                b"Hi There".to_vec(),
                [
                    "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7",
                    "afd03944d84895626b0825f4ab46907f15f9dadbe4101ec682aa034c7cebc59cfaea9ea9076ede7f4af152e8b2fa9cb6",
                    "87aa7cdea5ef619d4ff0b4241a1d6cb02379f4e2ce4ec2787ad0b30545e17cdedaa833b7d6b8a702038b274eaea3f4e4be9d914eeb61f1702e696c203a126854",
                ],
            ),
            (
                b"Jefe".to_vec(),
                b"what do ya want for nothing?".to_vec(),
                [
                    "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843",
                    "af45d2e376484031617f78d2b58a6b1b9c7ef464f5a01b47e42ec3736322445e8e2240ca5e69e2c78b3239ecfab21649",
                    "164b7a7bfcf819e2e395fbe73b56e0a387bd64222e831fd610270cd7ea2505549758bf75c05a994a6d034f65f8f0e6fdcaeab1a34d4a6b4b636e070a38bce737",
                ],
            ),
            (
                vec![0xaa; 20],
                vec![0xdd; 50],
                [
                    "773ea91e36800e46854db8ebd09181a72959098b3ef8c122d9635514ced565fe",
                    "88062608d3e6ad8a0aa2ace014c8a86f0aa635d947ac9febe83ef4e55966144b2a5ab39dc13814b94e3ab6e101a34f27",
                    "fa73b0089d56a284efb0f0756c890be9b1b5dbdd8ee81a3655f83e33b2279d39bf3e848279a722c806b485a47e67c807b946a337bee8942674278859e13292fb",
                ],
            ),
            (
                (1..=25).collect(),
                vec![0xcd; 50],
                [
                    "82558a389a443c0ea4cc819899f2083a85f0faa3e578f8077a2e3ff46729665b",
                    "3e8a69b7783c25851933ab6290af6ca77a9981480850009cc5577c6e1f573b4e6801dd23c4a7d679ccf8a386c674cffb",
                    "b0ba465637458c6990e5a8c5f61d4af7e576d97ff94b872de76f8050361ee3dba91ca5c11aa25eb4d679275cc5788063a5f19741120c4f2de2adebeb10a298dd",
                ],
            ),
            (
                large_key.clone(),
                b"Test Using Larger Than Block-Size Key - Hash Key First".to_vec(),
                [
                    "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54",
                    "4ece084485813e9088d2c63a041bc5b44f9ef1012a2b588f3cd11f05033ac4c60c2ef6ab4030fe8296248df163f44952",
                    "80b24263c7c1a3ebb71493c1dd7be8b49b46d1f41b4aeec1121b013783f8f3526b56d037e05f2598bd0fd2215d6a1e5295e64f73f63f0aec8b915a985d786598",
                ],
            ),
            (
                large_key,
                b"This is a test using a larger than block-size key and a larger than block-size data. The key needs to be hashed before being used by the HMAC algorithm.".to_vec(),
                [
                    "9b09ffa71b942fcb27635fbcd5b0e944bfdc63644f0713938a7f51535c3a35e2",
                    "6617178e941f020d351e2f254e8fd32c602420feb0b8fb9adccebb82461e99c5a678cc31e799176d3860e6110c46523e",
                    "e37b6a775dc87dbaa4dfa9f96e5e3ffddebd71f8867289865df5a32d20cdc944b6022cac3c4982b10d5eeb55c3e4de15134676fb6de0446065c97440fa8c6a58",
                ],
            ),
        ];
        for (key, data, expected) in cases {
            for (prf, want) in Prf::ALL.into_iter().zip(expected) {
                let out = prf.compute(&key, &data);
                assert_eq!(hex::encode(out.as_bytes()), want, "{prf}");
                assert_eq!(out.len(), prf.output_len());
            }
        }
    }

    #[test]
    fn transform_numbers_and_names() {
        assert_eq!(
            Prf::ALL.map(Prf::iana_id),
            [5, 6, 7],
            "IANA Transform Type 2"
        );
        assert_eq!(Integrity::ALL.map(Integrity::iana_id), [12, 13, 14]);
        assert_eq!(Integrity::ALL.map(Integrity::icv_len), [16, 24, 32]);
        assert_eq!(
            Encryption::ALL.map(Encryption::key_len),
            [16, 32, 20, 36, 36]
        );
        for prf in Prf::ALL {
            assert_eq!(Prf::from_iana_id(prf.iana_id()), Some(prf));
        }
        for integrity in Integrity::ALL {
            assert_eq!(
                Integrity::from_iana_id(integrity.iana_id()),
                Some(integrity)
            );
        }
        for encryption in Encryption::ALL {
            assert_eq!(
                Encryption::from_iana_id(encryption.iana_id(), encryption.key_length_attribute()),
                Some(encryption)
            );
        }
        assert_eq!(Encryption::from_iana_id(12, Some(192)), None);
        assert_eq!(Encryption::from_iana_id(12, None), None);
        assert_eq!(Encryption::from_iana_id(28, Some(256)), None);
        let suite = IkeSuite::new(
            Encryption::Aes256Cbc,
            Some(Integrity::HmacSha256_128),
            Prf::HmacSha256,
        )
        .unwrap();
        assert_eq!(suite.to_string(), "aes256-sha256-prfsha256");
        assert!(IkeSuite::new(
            Encryption::Aes128Gcm16,
            Some(Integrity::HmacSha256_128),
            Prf::HmacSha256
        )
        .is_err());
        assert!(IkeSuite::new(Encryption::Aes128Cbc, None, Prf::HmacSha256).is_err());
    }

    // -------------------------------------------------------------- prf+

    #[test]
    fn prf_plus_matches_the_python_vector() {
        let out = prf_plus(
            Prf::HmacSha256,
            &kat("prfplus_key"),
            &kat("prfplus_seed"),
            1000,
        )
        .unwrap();
        assert_eq!(out.as_bytes(), kat("prfplus_out"));
        // Shorter outputs are prefixes.
        let short = prf_plus(
            Prf::HmacSha256,
            &kat("prfplus_key"),
            &kat("prfplus_seed"),
            33,
        )
        .unwrap();
        assert_eq!(short.as_bytes(), &kat("prfplus_out")[..33]);
    }

    #[test]
    fn prf_plus_stops_at_255_blocks() {
        for prf in Prf::ALL {
            let max = 255 * prf.output_len();
            assert_eq!(prf_plus(prf, b"k", b"s", max).unwrap().len(), max);
            assert_eq!(
                prf_plus(prf, b"k", b"s", max + 1).unwrap_err(),
                CryptoError::PrfPlusTooLong {
                    requested: max + 1,
                    max
                }
            );
        }
        assert!(prf_plus(Prf::HmacSha256, b"k", b"s", 0).unwrap().is_empty());
    }

    // -------------------------------------------------------------- key schedule

    /// One suite of `ike_kat.txt`: the whole schedule, child KEYMAT and the
    /// rekey SKEYSEED against the Python implementation.
    fn check_key_schedule(
        tag: &str,
        suite: IkeSuite,
        child: ChildSaKeyLengths,
        child_with_dh: bool,
    ) -> IkeSaKeys {
        let v = |name: &str| kat(&format!("{tag}_{name}"));
        let seed = skeyseed(suite.prf(), &v("ni"), &v("nr"), &v("g_ir"));
        assert_eq!(seed.as_bytes(), v("skeyseed"), "{tag}: SKEYSEED");
        let keys = IkeSaKeys::initial(
            suite,
            &v("g_ir"),
            &v("ni"),
            &v("nr"),
            &spi(&format!("{tag}_spi_i")),
            &spi(&format!("{tag}_spi_r")),
        )
        .unwrap();
        assert_eq!(keys.sk_d().as_bytes(), v("sk_d"), "{tag}: SK_d");
        assert_eq!(keys.sk_pi().as_bytes(), v("sk_pi"), "{tag}: SK_pi");
        assert_eq!(keys.sk_pr().as_bytes(), v("sk_pr"), "{tag}: SK_pr");
        assert_eq!(
            keys.initiator.encryption_key.as_bytes(),
            v("sk_ei"),
            "{tag}: SK_ei"
        );
        assert_eq!(
            keys.responder.encryption_key.as_bytes(),
            v("sk_er"),
            "{tag}: SK_er"
        );
        assert_eq!(
            keys.initiator.integrity_key.as_bytes(),
            v("sk_ai"),
            "{tag}: SK_ai"
        );
        assert_eq!(
            keys.responder.integrity_key.as_bytes(),
            v("sk_ar"),
            "{tag}: SK_ar"
        );

        let new_dh = v("rekey_g_ir");
        let child_keys = keys
            .child_sa_keys(
                child_with_dh.then_some(new_dh.as_slice()),
                &v("child_ni"),
                &v("child_nr"),
                child,
            )
            .unwrap();
        let i2r = &child_keys.initiator_to_responder;
        let r2i = &child_keys.responder_to_initiator;
        assert_eq!(
            i2r.encryption.as_bytes(),
            v("child_encr_i"),
            "{tag}: KEYMAT"
        );
        assert_eq!(
            i2r.integrity.as_bytes(),
            v("child_integ_i"),
            "{tag}: KEYMAT"
        );
        assert_eq!(
            r2i.encryption.as_bytes(),
            v("child_encr_r"),
            "{tag}: KEYMAT"
        );
        assert_eq!(
            r2i.integrity.as_bytes(),
            v("child_integ_r"),
            "{tag}: KEYMAT"
        );

        let rekey = rekey_skeyseed(
            suite.prf(),
            keys.sk_d().as_bytes(),
            &new_dh,
            &v("child_ni"),
            &v("child_nr"),
        );
        assert_eq!(
            rekey.as_bytes(),
            v("rekey_skeyseed"),
            "{tag}: rekey SKEYSEED"
        );
        // The method form derives the new SA's schedule from the same SKEYSEED.
        let new_spi_i = [1u8; 8];
        let new_spi_r = [2u8; 8];
        let rekeyed = keys
            .rekeyed(
                suite,
                &new_dh,
                &v("child_ni"),
                &v("child_nr"),
                &new_spi_i,
                &new_spi_r,
            )
            .unwrap();
        let expected = IkeSaKeys::derive(
            suite,
            rekey.as_bytes(),
            &v("child_ni"),
            &v("child_nr"),
            &new_spi_i,
            &new_spi_r,
        )
        .unwrap();
        assert_eq!(rekeyed.sk_d().as_bytes(), expected.sk_d().as_bytes());
        keys
    }

    #[test]
    fn key_schedule_aes_cbc_256_sha256() {
        check_key_schedule(
            "a",
            IkeSuite::new(
                Encryption::Aes256Cbc,
                Some(Integrity::HmacSha256_128),
                Prf::HmacSha256,
            )
            .unwrap(),
            ChildSaKeyLengths::for_esp(Encryption::Aes128Cbc, Some(Integrity::HmacSha256_128))
                .unwrap(),
            true,
        );
    }

    #[test]
    fn key_schedule_aes_gcm_256_prf_sha384() {
        check_key_schedule(
            "b",
            IkeSuite::new(Encryption::Aes256Gcm16, None, Prf::HmacSha384).unwrap(),
            ChildSaKeyLengths::for_esp(Encryption::Aes128Gcm16, None).unwrap(),
            false,
        );
    }

    #[test]
    fn key_schedule_chacha20_prf_sha512_with_long_nonces() {
        // Ni | Nr is 144 octets, longer than SHA-512's block: HMAC hashes it.
        check_key_schedule(
            "c",
            IkeSuite::new(Encryption::ChaCha20Poly1305, None, Prf::HmacSha512).unwrap(),
            ChildSaKeyLengths::for_esp(Encryption::Aes256Cbc, Some(Integrity::HmacSha512_256))
                .unwrap(),
            false,
        );
    }

    #[test]
    fn key_schedule_aes_cbc_128_sha384() {
        check_key_schedule(
            "d",
            IkeSuite::new(
                Encryption::Aes128Cbc,
                Some(Integrity::HmacSha384_192),
                Prf::HmacSha384,
            )
            .unwrap(),
            ChildSaKeyLengths::for_esp(Encryption::ChaCha20Poly1305, None).unwrap(),
            true,
        );
    }

    #[test]
    fn key_schedule_aes_cbc_256_sha512() {
        check_key_schedule(
            "e",
            IkeSuite::new(
                Encryption::Aes256Cbc,
                Some(Integrity::HmacSha512_256),
                Prf::HmacSha512,
            )
            .unwrap(),
            ChildSaKeyLengths::for_esp(Encryption::Aes128Gcm16, None).unwrap(),
            false,
        );
    }

    #[test]
    fn key_schedule_aes_gcm_128_sha256() {
        check_key_schedule(
            "f",
            IkeSuite::new(Encryption::Aes128Gcm16, None, Prf::HmacSha256).unwrap(),
            ChildSaKeyLengths::for_esp(Encryption::Aes128Gcm16, None).unwrap(),
            false,
        );
    }

    /// The DH module's RFC 5903 shared secret, fed straight into the
    /// schedule, gives the Python-derived keys: the two modules agree on the
    /// form of g^ir.
    #[test]
    fn dh_output_feeds_the_key_schedule() {
        use crate::ike::dh::{DhGroup, KeyPair};
        let i = hex::decode("C88F01F510D9AC3F70A292DAA2316DE544E9AAB8AFE84049C62A9C57862D1433")
            .unwrap();
        let gr = hex::decode(concat!(
            "D12DFB5289C8D4F81208B70270398C342296970A0BCCB74C736FC7554494BF63",
            "56FBF3CA366CC23E8157854C13C58D6AAC23F046ADA30F8353E74F33039872AB"
        ))
        .unwrap();
        let shared = KeyPair::from_private_bytes(DhGroup::Ecp256, &i)
            .unwrap()
            .agree(&gr)
            .unwrap();
        let suite = IkeSuite::new(
            Encryption::Aes256Cbc,
            Some(Integrity::HmacSha256_128),
            Prf::HmacSha256,
        )
        .unwrap();
        let keys = IkeSaKeys::initial(
            suite,
            shared.as_bytes(),
            &kat("a_ni"),
            &kat("a_nr"),
            &spi("a_spi_i"),
            &spi("a_spi_r"),
        )
        .unwrap();
        assert_eq!(keys.sk_d().as_bytes(), kat("a_sk_d"));
    }

    #[test]
    fn child_keys_without_dh_differ_from_keys_with_dh() {
        let keys = check_key_schedule(
            "a",
            IkeSuite::new(
                Encryption::Aes256Cbc,
                Some(Integrity::HmacSha256_128),
                Prf::HmacSha256,
            )
            .unwrap(),
            ChildSaKeyLengths::for_esp(Encryption::Aes128Cbc, Some(Integrity::HmacSha256_128))
                .unwrap(),
            true,
        );
        let lengths = ChildSaKeyLengths::for_esp(Encryption::Aes256Gcm16, None).unwrap();
        let plain = keys
            .child_sa_keys(
                None,
                b"ni-ni-ni-ni-ni-ni-",
                b"nr-nr-nr-nr-nr-nr-nr",
                lengths,
            )
            .unwrap();
        let with_dh = keys
            .child_sa_keys(
                Some(b"g^ir"),
                b"ni-ni-ni-ni-ni-ni-",
                b"nr-nr-nr-nr-nr-nr-nr",
                lengths,
            )
            .unwrap();
        assert_ne!(
            plain.initiator_to_responder.encryption.as_bytes(),
            with_dh.initiator_to_responder.encryption.as_bytes()
        );
        assert_eq!(plain.initiator_to_responder.encryption.len(), 36);
        assert!(plain.initiator_to_responder.integrity.is_empty());
        // KEYMAT = prf+(SK_d, Ni | Nr): i->r key first, then r->i.
        let keymat = prf_plus(
            Prf::HmacSha256,
            keys.sk_d().as_bytes(),
            b"ni-ni-ni-ni-ni-ni-nr-nr-nr-nr-nr-nr-nr",
            72,
        )
        .unwrap();
        let (i2r, r2i) = keymat.as_bytes().split_at(36);
        assert_eq!(plain.initiator_to_responder.encryption.as_bytes(), i2r);
        assert_eq!(plain.responder_to_initiator.encryption.as_bytes(), r2i);
    }

    #[test]
    fn cipher_keys_of_the_wrong_length_are_refused() {
        assert_eq!(
            SkCipher::new(Encryption::Aes128Gcm16, None, &[0; 16], &[]).unwrap_err(),
            CryptoError::KeyLength {
                what: "SK_e",
                expected: 20,
                actual: 16
            }
        );
        assert!(matches!(
            SkCipher::new(
                Encryption::Aes128Cbc,
                Some(Integrity::HmacSha256_128),
                &[0; 16],
                &[0; 16]
            ),
            Err(CryptoError::KeyLength { what: "SK_a", .. })
        ));
        assert!(matches!(
            SkCipher::new(Encryption::Aes128Cbc, None, &[0; 16], &[]),
            Err(CryptoError::InvalidSuite(_))
        ));
        assert!(ChildSaKeyLengths::for_esp(
            Encryption::Aes128Gcm16,
            Some(Integrity::HmacSha256_128)
        )
        .is_err());
    }

    // -------------------------------------------------------------- SK payload

    /// The first known-answer ciphers: the Python suites' initiator keys.
    fn kat_cipher(tag: &str, encryption: Encryption, integrity: Option<Integrity>) -> SkCipher {
        let sk_a = if integrity.is_some() {
            kat(&format!("{tag}_sk_ai"))
        } else {
            Vec::new()
        };
        SkCipher::new(encryption, integrity, &kat(&format!("{tag}_sk_ei")), &sk_a).unwrap()
    }

    fn all_kat_ciphers() -> Vec<(&'static str, SkCipher)> {
        vec![
            (
                "a",
                kat_cipher("a", Encryption::Aes256Cbc, Some(Integrity::HmacSha256_128)),
            ),
            ("b", kat_cipher("b", Encryption::Aes256Gcm16, None)),
            ("c", kat_cipher("c", Encryption::ChaCha20Poly1305, None)),
            (
                "d",
                kat_cipher("d", Encryption::Aes128Cbc, Some(Integrity::HmacSha384_192)),
            ),
            (
                "e",
                kat_cipher("e", Encryption::Aes256Cbc, Some(Integrity::HmacSha512_256)),
            ),
            ("f", kat_cipher("f", Encryption::Aes128Gcm16, None)),
        ]
    }

    /// Every transform's seal against Python's `cryptography` + `hmac`, and
    /// open of the Python output.
    #[test]
    fn sk_payload_matches_python_for_every_transform() {
        for (tag, cipher) in all_kat_ciphers() {
            let v = |name: &str| kat(&format!("{tag}_{name}"));
            let (aad, plaintext, body) = (v("sk_aad"), v("sk_plaintext"), v("sk_body"));
            let sealed = cipher
                .seal(&aad, &plaintext, IvSource::Explicit(&v("sk_iv")))
                .unwrap();
            assert_eq!(hex::encode(&sealed), hex::encode(&body), "{tag}: seal");
            assert_eq!(cipher.open(&aad, &body).unwrap(), plaintext, "{tag}: open");
            assert_eq!(cipher.sk_body_len(plaintext.len()).unwrap(), body.len());
            // The AAD's last two octets are the SK payload length the helper gives.
            let payload_len = u16::from_be_bytes([aad[aad.len() - 2], aad[aad.len() - 1]]);
            assert_eq!(cipher.sk_payload_len(plaintext.len()).unwrap(), payload_len);
        }
    }

    /// The brief's independent oracle: RustCrypto's `aes-gcm` seals the same
    /// octets as ring through `SkCipher`, and opens them.
    #[test]
    fn aes_gcm_seal_agrees_with_the_aes_gcm_crate() {
        use aes_gcm::aead::{Aead, KeyInit, Payload};
        for (tag, encryption) in [
            ("b", Encryption::Aes256Gcm16),
            ("f", Encryption::Aes128Gcm16),
        ] {
            let cipher = kat_cipher(tag, encryption, None);
            let sk_e = kat(&format!("{tag}_sk_ei"));
            let (key, salt) = sk_e.split_at(sk_e.len() - 4);
            let aad = b"IKE header and SK generic header stand-in".to_vec();
            for plaintext_len in [0usize, 1, 15, 16, 17, 300] {
                let plaintext: Vec<u8> = (0..plaintext_len).map(|n| n as u8).collect();
                let iv = (plaintext_len as u64 * 7919).to_be_bytes();
                let sealed = cipher
                    .seal(&aad, &plaintext, IvSource::Explicit(&iv))
                    .unwrap();
                let nonce = [salt, &iv].concat();
                let padded = [plaintext.as_slice(), &[0]].concat();
                let payload = Payload {
                    msg: &padded,
                    aad: &aad,
                };
                let oracle = match encryption {
                    Encryption::Aes128Gcm16 => aes_gcm::Aes128Gcm::new_from_slice(key)
                        .unwrap()
                        .encrypt(aes_gcm::Nonce::from_slice(&nonce), payload),
                    _ => aes_gcm::Aes256Gcm::new_from_slice(key)
                        .unwrap()
                        .encrypt(aes_gcm::Nonce::from_slice(&nonce), payload),
                }
                .unwrap();
                assert_eq!(
                    sealed,
                    [iv.as_slice(), &oracle].concat(),
                    "{tag} {plaintext_len}"
                );
                assert_eq!(cipher.open(&aad, &sealed).unwrap(), plaintext);
            }
        }
    }

    #[test]
    fn round_trip_every_transform_and_length() {
        let mut rng = CountingRng(1);
        for (tag, cipher) in all_kat_ciphers() {
            for plaintext_len in [0usize, 1, 14, 15, 16, 17, 31, 32, 33, 255, 1000] {
                let plaintext: Vec<u8> = (0..plaintext_len).map(|n| (n * 3) as u8).collect();
                let aad = format!("aad {tag} {plaintext_len}").into_bytes();
                let body = cipher
                    .seal(&aad, &plaintext, IvSource::Generate(&mut rng))
                    .unwrap();
                assert_eq!(body.len(), cipher.sk_body_len(plaintext_len).unwrap());
                if !cipher.encryption().is_aead() {
                    assert_eq!((body.len() - 16 - cipher.icv_len()) % 16, 0);
                }
                assert_eq!(
                    cipher.open(&aad, &body).unwrap(),
                    plaintext,
                    "{tag} {plaintext_len}"
                );
            }
        }
    }

    #[test]
    fn any_altered_octet_is_rejected() {
        let mut rng = CountingRng(2);
        for (tag, cipher) in all_kat_ciphers() {
            let aad = b"header-and-generic-payload-header".to_vec();
            let body = cipher
                .seal(&aad, b"inner payloads", IvSource::Generate(&mut rng))
                .unwrap();
            // Every octet of the body: IV, ciphertext, ICV.
            for at in 0..body.len() {
                let mut altered = body.clone();
                altered[at] ^= 0x01;
                assert_eq!(
                    cipher.open(&aad, &altered).unwrap_err(),
                    CryptoError::IntegrityCheckFailed,
                    "{tag}: body octet {at}"
                );
            }
            // Every octet of the AAD (the IKE header, the SK header).
            for at in 0..aad.len() {
                let mut altered = aad.clone();
                altered[at] ^= 0x80;
                assert_eq!(
                    cipher.open(&altered, &body).unwrap_err(),
                    CryptoError::IntegrityCheckFailed,
                    "{tag}: aad octet {at}"
                );
            }
            assert!(cipher.open(&aad[1..], &body).is_err());
            // The other direction's key does not open it.
            let other = SkCipher::new(
                cipher.encryption(),
                cipher.integrity(),
                &vec![0x42; cipher.encryption().key_len()],
                &vec![0x42; cipher.integrity().map_or(0, Integrity::key_len)],
            )
            .unwrap();
            assert_eq!(
                other.open(&aad, &body).unwrap_err(),
                CryptoError::IntegrityCheckFailed
            );
        }
    }

    #[test]
    fn short_and_misaligned_bodies_are_errors_not_panics() {
        let mut rng = CountingRng(3);
        for (tag, cipher) in all_kat_ciphers() {
            let body = cipher
                .seal(
                    b"aad",
                    b"0123456789abcdef0123",
                    IvSource::Generate(&mut rng),
                )
                .unwrap();
            for len in 0..body.len() {
                let result = cipher.open(b"aad", &body[..len]);
                assert!(
                    matches!(
                        result,
                        Err(CryptoError::Truncated { .. }
                            | CryptoError::Misaligned { .. }
                            | CryptoError::IntegrityCheckFailed)
                    ),
                    "{tag}: {len} octets gave {result:?}"
                );
            }
            let min = cipher.iv_len()
                + cipher.icv_len()
                + if cipher.encryption().is_aead() { 1 } else { 16 };
            assert_eq!(
                cipher.open(b"aad", &body[..min - 1]).unwrap_err(),
                CryptoError::Truncated {
                    actual: min - 1,
                    min
                }
            );
        }
        // Misalignment is found before the ICV is checked.
        let cbc = kat_cipher("a", Encryption::Aes256Cbc, Some(Integrity::HmacSha256_128));
        assert_eq!(
            cbc.open(b"", &[0u8; 16 + 17 + 16]).unwrap_err(),
            CryptoError::Misaligned {
                actual: 17,
                block: 16
            }
        );
    }

    /// A Pad Length larger than the decrypted data, under a valid ICV (so
    /// only a peer with the keys could send it), is refused, not sliced.
    #[test]
    fn bad_pad_length_under_a_valid_icv_is_refused() {
        let cbc = kat_cipher("a", Encryption::Aes256Cbc, Some(Integrity::HmacSha256_128));
        let iv = [7u8; 16];
        let mut data = [0u8; 16];
        data[15] = 200;
        cbc.cbc_encrypt(&iv, &mut data).unwrap();
        let mut body = [iv.as_slice(), &data].concat();
        let icv = cbc.cbc_icv(Integrity::HmacSha256_128, b"aad", &body);
        body.extend_from_slice(&icv);
        assert_eq!(
            cbc.open(b"aad", &body).unwrap_err(),
            CryptoError::BadPadding {
                pad_len: 200,
                available: 15
            }
        );

        let gcm = kat_cipher("f", Encryption::Aes128Gcm16, None);
        let iv = [9u8; 8];
        let mut data = vec![1u8, 2, 3, 9];
        let tag = gcm
            .aead_key()
            .unwrap()
            .seal_in_place_separate_tag(
                gcm.aead_nonce(&iv).unwrap(),
                aead::Aad::from(b"aad"),
                &mut data,
            )
            .unwrap();
        let body = [iv.as_slice(), &data, tag.as_ref()].concat();
        assert_eq!(
            gcm.open(b"aad", &body).unwrap_err(),
            CryptoError::BadPadding {
                pad_len: 9,
                available: 3
            }
        );
    }

    #[test]
    fn padding_from_other_implementations_is_accepted() {
        // Any pad length that fits and any pad content (RFC 7296 §3.14): here
        // 16 extra octets of 0xEE padding on CBC, 5 on GCM.
        let cbc = kat_cipher("a", Encryption::Aes256Cbc, Some(Integrity::HmacSha256_128));
        let iv = [3u8; 16];
        let mut data = b"payload!".to_vec();
        data.extend_from_slice(&[0xEE; 23]);
        data.push(23);
        cbc.cbc_encrypt(&iv, &mut data).unwrap();
        let mut body = [iv.as_slice(), &data].concat();
        let icv = cbc.cbc_icv(Integrity::HmacSha256_128, b"hdr", &body);
        body.extend_from_slice(&icv);
        assert_eq!(cbc.open(b"hdr", &body).unwrap(), b"payload!");

        let gcm = kat_cipher("b", Encryption::Aes256Gcm16, None);
        let iv = [4u8; 8];
        let mut data = b"payload!\xEE\xEE\xEE\xEE\xEE\x05".to_vec();
        let tag = gcm
            .aead_key()
            .unwrap()
            .seal_in_place_separate_tag(
                gcm.aead_nonce(&iv).unwrap(),
                aead::Aad::from(b"hdr"),
                &mut data,
            )
            .unwrap();
        let body = [iv.as_slice(), &data, tag.as_ref()].concat();
        assert_eq!(gcm.open(b"hdr", &body).unwrap(), b"payload!");
    }

    #[test]
    fn generated_ivs_never_repeat_and_cbc_ivs_are_random() {
        let mut rng = CountingRng(4);
        let gcm = kat_cipher("f", Encryption::Aes128Gcm16, None);
        let first = gcm.seal(b"", b"x", IvSource::Generate(&mut rng)).unwrap();
        let second = gcm.seal(b"", b"x", IvSource::Generate(&mut rng)).unwrap();
        let counter = |body: &[u8]| u64::from_be_bytes(body[..8].try_into().unwrap());
        // The AEAD IV is a counter from a random start.
        assert_eq!(counter(&second), counter(&first).wrapping_add(1));
        assert_ne!(first, second);
        // Two ciphers over different keys start at different points.
        let other = kat_cipher("b", Encryption::Aes256Gcm16, None);
        let third = other.seal(b"", b"x", IvSource::Generate(&mut rng)).unwrap();
        assert_ne!(counter(&third), counter(&second).wrapping_add(1));

        let cbc = kat_cipher("a", Encryption::Aes256Cbc, Some(Integrity::HmacSha256_128));
        let a = cbc.seal(b"", b"x", IvSource::Generate(&mut rng)).unwrap();
        let b = cbc.seal(b"", b"x", IvSource::Generate(&mut rng)).unwrap();
        assert_ne!(a[..16], b[..16]);
    }

    #[test]
    fn iv_errors() {
        let gcm = kat_cipher("f", Encryption::Aes128Gcm16, None);
        assert_eq!(
            gcm.seal(b"", b"x", IvSource::Explicit(&[0; 12]))
                .unwrap_err(),
            CryptoError::IvLength {
                expected: 8,
                actual: 12
            }
        );
        assert_eq!(
            gcm.seal(b"", b"x", IvSource::Generate(&mut FailingRng))
                .unwrap_err(),
            CryptoError::RandomSource
        );
        let cbc = kat_cipher("a", Encryption::Aes256Cbc, Some(Integrity::HmacSha256_128));
        assert_eq!(
            cbc.seal(b"", b"x", IvSource::Generate(&mut FailingRng))
                .unwrap_err(),
            CryptoError::RandomSource
        );
        // An exhausted counter stops sealing rather than repeating an IV.
        *gcm.iv_counter.lock().unwrap() = Some(IvCounter {
            next: 5,
            issued: u64::MAX,
        });
        assert_eq!(
            gcm.seal(b"", b"x", IvSource::Generate(&mut CountingRng(0)))
                .unwrap_err(),
            CryptoError::IvSpaceExhausted
        );
    }

    #[test]
    fn sk_lengths_for_the_engine() {
        let cbc = kat_cipher("a", Encryption::Aes256Cbc, Some(Integrity::HmacSha256_128));
        // 16 IV + 16 (0 octets + pad length, padded) + 16 ICV, + 4 header.
        assert_eq!(cbc.sk_body_len(0).unwrap(), 48);
        assert_eq!(cbc.sk_payload_len(0).unwrap(), 52);
        assert_eq!(cbc.sk_body_len(15).unwrap(), 48);
        assert_eq!(cbc.sk_body_len(16).unwrap(), 64);
        let gcm = kat_cipher("b", Encryption::Aes256Gcm16, None);
        assert_eq!(gcm.sk_body_len(0).unwrap(), 8 + 1 + 16);
        assert_eq!(gcm.sk_body_len(100).unwrap(), 8 + 101 + 16);
        // The payload length field is 16 bits.
        assert_eq!(gcm.sk_payload_len(65535 - 4 - 25).unwrap(), 65535);
        assert!(matches!(
            gcm.sk_payload_len(65535 - 4 - 24),
            Err(CryptoError::TooLong { .. })
        ));
        assert!(cbc.sk_body_len(usize::MAX).is_err());
    }

    // -------------------------------------------------------------- AUTH

    #[test]
    fn psk_auth_matches_python() {
        let keys = check_key_schedule(
            "a",
            IkeSuite::new(
                Encryption::Aes256Cbc,
                Some(Integrity::HmacSha256_128),
                Prf::HmacSha256,
            )
            .unwrap(),
            ChildSaKeyLengths::for_esp(Encryption::Aes128Cbc, Some(Integrity::HmacSha256_128))
                .unwrap(),
            true,
        );
        let signed = keys.initiator_signed_octets(
            &kat("a_auth_message"),
            &kat("a_nr"),
            &kat("a_auth_id_body"),
        );
        assert_eq!(signed, kat("a_auth_signed_octets"));
        let auth = auth_psk(Prf::HmacSha256, &kat("a_auth_psk"), &signed);
        assert_eq!(auth, kat("a_auth_value"));
        assert_eq!(
            verify_auth_psk(Prf::HmacSha256, &kat("a_auth_psk"), &signed, &auth),
            Ok(())
        );
        // A different PSK, signed octets or truncated AUTH fails.
        assert_eq!(
            verify_auth_psk(Prf::HmacSha256, b"wrong", &signed, &auth),
            Err(CryptoError::AuthenticationFailed)
        );
        assert_eq!(
            verify_auth_psk(Prf::HmacSha256, &kat("a_auth_psk"), &signed[1..], &auth),
            Err(CryptoError::AuthenticationFailed)
        );
        assert_eq!(
            verify_auth_psk(Prf::HmacSha256, &kat("a_auth_psk"), &signed, &auth[..31]),
            Err(CryptoError::AuthenticationFailed)
        );
        // The responder's octets use SK_pr and the other nonce.
        let responder = keys.responder_signed_octets(
            &kat("a_auth_message"),
            &kat("a_ni"),
            &kat("a_auth_id_body"),
        );
        assert_ne!(responder, signed);
        assert_eq!(
            responder,
            auth_signed_octets(
                Prf::HmacSha256,
                &kat("a_auth_message"),
                &kat("a_ni"),
                keys.sk_pr().as_bytes(),
                &kat("a_auth_id_body"),
            )
        );
    }

    // -------------------------------------------------------------- secrecy

    #[test]
    fn debug_output_never_shows_keys() {
        let keys = check_key_schedule(
            "b",
            IkeSuite::new(Encryption::Aes256Gcm16, None, Prf::HmacSha384).unwrap(),
            ChildSaKeyLengths::for_esp(Encryption::Aes128Gcm16, None).unwrap(),
            false,
        );
        let child = keys
            .child_sa_keys(
                None,
                &kat("b_child_ni"),
                &kat("b_child_nr"),
                ChildSaKeyLengths::for_esp(Encryption::Aes128Gcm16, None).unwrap(),
            )
            .unwrap();
        let printed = format!("{keys:?} {child:?}");
        for secret in [
            "b_sk_d",
            "b_sk_ei",
            "b_sk_er",
            "b_sk_pi",
            "b_sk_pr",
            "b_child_encr_i",
            "b_child_encr_r",
        ] {
            let needle = hex::encode(&kat(secret)[..6]);
            assert!(!printed.contains(&needle), "{secret} printed");
            let bytes_needle = format!("{:?}", &kat(secret)[..4]);
            assert!(
                !printed.contains(bytes_needle.trim_end_matches(']')),
                "{secret} printed"
            );
        }
        assert!(printed.contains("redacted"));
        // Errors carry lengths and names only.
        let err = SkCipher::new(Encryption::Aes128Gcm16, None, &[0xAB; 3], &[]).unwrap_err();
        assert_eq!(err.to_string(), "SK_e must be 20 octets, got 3");
    }
}
