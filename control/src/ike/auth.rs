//! How the peers of an IKE SA prove who they are (RFC 7296 §2.15): a
//! pre-shared key ([`Psk`]) or X.509 certificates and signatures
//! ([`PubkeyAuth`]).
//!
//! With certificates the engine ([`super::sa`]):
//!
//! - announces the hashes it accepts in SIGNATURE_HASH_ALGORITHMS in
//!   IKE_SA_INIT (both roles; RFC 7427 §4): SHA-256, SHA-384, SHA-512;
//! - asks for the peer's certificate: CERTREQ (X.509 signature encoding, the
//!   SHA-1 hashes of our CAs' SubjectPublicKeyInfo, RFC 7296 §3.7) in the
//!   IKE_SA_INIT response (responder) and in IKE_AUTH (initiator);
//! - sends its certificate and the intermediates after it (CERT payloads)
//!   in IKE_AUTH, whether asked or not;
//! - signs the AUTH octets: with RFC 7427's Digital Signature (method 14)
//!   when the peer announced a hash that fits our key (RSA PKCS#1 v1.5 with
//!   SHA-256, -384 or -512; ECDSA P-256/SHA-256 or P-384/SHA-384, a DER
//!   signature), otherwise with the classic method of the key: ECDSA
//!   methods 9 and 10 (RFC 4754, r‖s). RSA's classic method 1 (PKCS#1 v1.5
//!   with SHA-1) is verified but never produced: ring signs no SHA-1, so an
//!   RSA key needs a peer that supports RFC 7427 (every strongSwan since 5.2
//!   does);
//! - checks the peer: its first CERT (with the others as intermediates)
//!   chains to one of our CAs at the current time, the certificate names the
//!   peer's ID payload (an address in an iPAddress SAN, an FQDN in a dNSName
//!   SAN, an e-mail address in an rfc822Name SAN, a DN that is the subject
//!   by meaning: [`super::dn`]), and the AUTH signature verifies with the
//!   certificate's key. Extended key usages are not enforced (as strongSwan
//!   does not).
//!
//! The chain is checked against `SystemTime::now()` unless
//! [`PubkeyAuth::at_time`] pins the time: a date is the one input the engine
//! does not get from its caller, because its clock (`Instant`) knows none.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use pki_types::pem::PemObject;
use pki_types::{
    alg_id, AlgorithmIdentifier, CertificateDer, PrivateKeyDer, TrustAnchor, UnixTime,
};
use ring::rand::SystemRandom;
use ring::signature::{self as sig, EcdsaKeyPair, KeyPair, RsaKeyPair, UnparsedPublicKey};
use webpki::EndEntityCert;
use x509_cert::der::asn1::ObjectIdentifier;
use x509_cert::der::{Decode, Encode};
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::ext::pkix::SubjectAltName;
use x509_cert::Certificate;
use zeroize::Zeroizing;

use crate::ike::message::{AuthMethod, AuthPayload, CertEncoding, CertPayload, IdPayload, IdType};

/// Hash algorithm IDs of RFC 7427 §7 (IANA "IKEv2 Hash Algorithms").
pub const HASH_SHA1: u16 = 1;
pub const HASH_SHA2_256: u16 = 2;
pub const HASH_SHA2_384: u16 = 3;
pub const HASH_SHA2_512: u16 = 4;
/// What we announce in SIGNATURE_HASH_ALGORITHMS and accept in method 14.
pub const OUR_SIGNATURE_HASHES: [u16; 3] = [HASH_SHA2_256, HASH_SHA2_384, HASH_SHA2_512];

const OID_RSA_ENCRYPTION: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");
const OID_EC_PUBLIC_KEY: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
const OID_P256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.3.1.7");
const OID_P384: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.132.0.34");
const OID_SUBJECT_ALT_NAME: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.17");

/// The algorithms a certificate chain may be signed with.
static CHAIN_ALGS: &[&dyn pki_types::SignatureVerificationAlgorithm] = &[
    webpki::ring::ECDSA_P256_SHA256,
    webpki::ring::ECDSA_P256_SHA384,
    webpki::ring::ECDSA_P384_SHA256,
    webpki::ring::ECDSA_P384_SHA384,
    webpki::ring::RSA_PKCS1_2048_8192_SHA256,
    webpki::ring::RSA_PKCS1_2048_8192_SHA384,
    webpki::ring::RSA_PKCS1_2048_8192_SHA512,
    webpki::ring::RSA_PSS_2048_8192_SHA256_LEGACY_KEY,
    webpki::ring::RSA_PSS_2048_8192_SHA384_LEGACY_KEY,
    webpki::ring::RSA_PSS_2048_8192_SHA512_LEGACY_KEY,
    webpki::ring::ED25519,
];

// ------------------------------------------------------------------ Auth

/// How we authenticate, and how the peer must: both the same way.
#[derive(Clone)]
pub enum Auth {
    Psk(Psk),
    /// Certificates; shared by every SA of a connection (loading parses
    /// files and keys once).
    Pubkey(Arc<PubkeyAuth>),
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Auth::Psk(p) => write!(f, "Psk({p:?})"),
            Auth::Pubkey(p) => write!(f, "Pubkey({p:?})"),
        }
    }
}

/// A pre-shared key: zeroed on drop, never printed.
#[derive(Clone)]
pub struct Psk(Zeroizing<Vec<u8>>);

impl Psk {
    pub fn new(bytes: Vec<u8>) -> Psk {
        Psk(Zeroizing::new(bytes))
    }

    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Psk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<{} octets redacted>", self.0.len())
    }
}

// ------------------------------------------------------------------ keys

/// The kinds of key bitw signs and verifies with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyType {
    Rsa,
    EcdsaP256,
    EcdsaP384,
}

impl fmt::Display for KeyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KeyType::Rsa => "RSA",
            KeyType::EcdsaP256 => "ECDSA P-256",
            KeyType::EcdsaP384 => "ECDSA P-384",
        })
    }
}

/// A certificate's key: its type and the subjectPublicKey bits (an
/// RSAPublicKey, or an uncompressed EC point), what ring verifies with.
struct PublicKey {
    key_type: KeyType,
    bits: Vec<u8>,
}

fn public_key(cert: &Certificate) -> Result<PublicKey, String> {
    let spki = &cert.tbs_certificate.subject_public_key_info;
    let bits = spki
        .subject_public_key
        .as_bytes()
        .ok_or("the public key is not a whole number of octets")?
        .to_vec();
    let key_type = if spki.algorithm.oid == OID_RSA_ENCRYPTION {
        KeyType::Rsa
    } else if spki.algorithm.oid == OID_EC_PUBLIC_KEY {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.decode_as::<ObjectIdentifier>().ok());
        match curve {
            Some(c) if c == OID_P256 => KeyType::EcdsaP256,
            Some(c) if c == OID_P384 => KeyType::EcdsaP384,
            _ => return Err("an EC key on a curve other than P-256 or P-384".into()),
        }
    } else {
        return Err(format!(
            "a key of type {} (bitw knows RSA and ECDSA P-256/P-384)",
            spki.algorithm.oid
        ));
    };
    Ok(PublicKey { key_type, bits })
}

/// Our private key, ready for each signature format its type allows.
enum SigningKey {
    Rsa(Box<RsaKeyPair>),
    Ecdsa {
        key_type: KeyType,
        /// DER signatures (method 14).
        der: Box<EcdsaKeyPair>,
        /// r‖s signatures (methods 9 and 10).
        fixed: Box<EcdsaKeyPair>,
    },
}

impl SigningKey {
    /// The key in `der` (PKCS#8, PKCS#1 RSAPrivateKey or SEC1
    /// ECPrivateKey) for a certificate with key type `key_type`.
    fn parse(key_type: KeyType, der: &[u8]) -> Result<SigningKey, String> {
        let rng = SystemRandom::new();
        match key_type {
            KeyType::Rsa => RsaKeyPair::from_pkcs8(der)
                .or_else(|e| RsaKeyPair::from_der(der).map_err(|_| e))
                .map(|k| SigningKey::Rsa(Box::new(k)))
                .map_err(|e| format!("not an RSA private key ({e})")),
            KeyType::EcdsaP256 | KeyType::EcdsaP384 => {
                let (der_alg, fixed_alg) = if key_type == KeyType::EcdsaP256 {
                    (
                        &sig::ECDSA_P256_SHA256_ASN1_SIGNING,
                        &sig::ECDSA_P256_SHA256_FIXED_SIGNING,
                    )
                } else {
                    (
                        &sig::ECDSA_P384_SHA384_ASN1_SIGNING,
                        &sig::ECDSA_P384_SHA384_FIXED_SIGNING,
                    )
                };
                let pair = |alg| match EcdsaKeyPair::from_pkcs8(alg, der, &rng) {
                    Ok(k) => Ok(k),
                    Err(pkcs8_err) => {
                        // not PKCS#8: a traditional "EC PRIVATE KEY" (SEC1)
                        let sec1 = sec1::EcPrivateKey::from_der(der)
                            .map_err(|_| format!("not an {key_type} private key ({pkcs8_err})"))?;
                        let public = sec1.public_key.ok_or_else(|| {
                            "the EC private key does not carry its public key".to_string()
                        })?;
                        EcdsaKeyPair::from_private_key_and_public_key(
                            alg,
                            sec1.private_key,
                            public,
                            &rng,
                        )
                        .map_err(|e| format!("not an {key_type} private key ({e})"))
                    }
                };
                Ok(SigningKey::Ecdsa {
                    key_type,
                    der: Box::new(pair(der_alg)?),
                    fixed: Box::new(pair(fixed_alg)?),
                })
            }
        }
    }

    fn public_bits(&self) -> &[u8] {
        match self {
            SigningKey::Rsa(k) => k.public_key().as_ref(),
            SigningKey::Ecdsa { der, .. } => der.public_key().as_ref(),
        }
    }
}

// ------------------------------------------------------------------ PubkeyAuth

/// Our certificate (and chain), our private key and the CAs we trust.
pub struct PubkeyAuth {
    /// Our certificate first, then the intermediates to send with it.
    chain: Vec<Vec<u8>>,
    key_type: KeyType,
    key: SigningKey,
    /// Our certificate's subject (a DER Name, for an ID_DER_ASN1_DN).
    subject: Vec<u8>,
    anchors: Vec<TrustAnchor<'static>>,
    /// SHA-1 of each CA's SubjectPublicKeyInfo, concatenated (CERTREQ).
    ca_key_hashes: Vec<u8>,
    time: Option<SystemTime>,
}

impl fmt::Debug for PubkeyAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PubkeyAuth")
            .field("key_type", &self.key_type)
            .field("subject", &hex::encode(&self.subject))
            .field("chain_len", &self.chain.len())
            .field("cas", &self.anchors.len())
            .finish_non_exhaustive()
    }
}

/// Every certificate of a PEM file, in order.
fn pem_certs(path: &Path) -> Result<Vec<Vec<u8>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| {
            it.map(|c| c.map(|c| c.to_vec()))
                .collect::<Result<Vec<_>, _>>()
        })
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no CERTIFICATE in the file", path.display()));
    }
    Ok(certs)
}

impl PubkeyAuth {
    /// Loads PEM files as openssl writes them: `cert_pem` our certificate,
    /// optionally followed by the intermediates to send with it; `key_pem`
    /// its private key (PKCS#8 "PRIVATE KEY", "RSA PRIVATE KEY" or "EC
    /// PRIVATE KEY", unencrypted); `ca_pems` the CAs we trust for the peer
    /// (one or more certificates per file). Errors name the file and what is
    /// wrong with it; a key that is not the certificate's is one.
    pub fn load(
        cert_pem: &Path,
        key_pem: &Path,
        ca_pems: &[PathBuf],
    ) -> Result<PubkeyAuth, String> {
        let chain = pem_certs(cert_pem)?;
        let key = PrivateKeyDer::from_pem_file(key_pem).map_err(|e| match e {
            pki_types::pem::Error::NoItemsFound => format!(
                "{}: no unencrypted PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY",
                key_pem.display()
            ),
            e => format!("{}: {e}", key_pem.display()),
        })?;
        let key = Zeroizing::new(key.secret_der().to_vec());
        let mut cas = Vec::new();
        if ca_pems.is_empty() {
            return Err("no CA certificate given".into());
        }
        for path in ca_pems {
            cas.extend(pem_certs(path)?);
        }
        PubkeyAuth::from_der(&chain, &key, &cas).map_err(|e| match e {
            LoadError::Cert(e) => format!("{}: {e}", cert_pem.display()),
            LoadError::Key(e) => format!("{}: {e}", key_pem.display()),
            LoadError::Ca(e) => format!(
                "{}: {e}",
                ca_pems
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        })
    }

    /// The same from DER: `chain` our certificate then intermediates, `key`
    /// its private key (PKCS#8, PKCS#1 or SEC1), `cas` the trusted CAs.
    pub fn from_der(
        chain: &[Vec<u8>],
        key: &[u8],
        cas: &[Vec<u8>],
    ) -> Result<PubkeyAuth, LoadError> {
        let Some(ours) = chain.first() else {
            return Err(LoadError::Cert("no certificate".into()));
        };
        let cert = Certificate::from_der(ours)
            .map_err(|e| LoadError::Cert(format!("not an X.509 certificate: {e}")))?;
        for (i, c) in chain.iter().enumerate().skip(1) {
            Certificate::from_der(c)
                .map_err(|e| LoadError::Cert(format!("certificate {} is not X.509: {e}", i + 1)))?;
        }
        let public = public_key(&cert).map_err(LoadError::Cert)?;
        let signing = SigningKey::parse(public.key_type, key).map_err(LoadError::Key)?;
        if signing.public_bits() != public.bits.as_slice() {
            return Err(LoadError::Key(
                "the private key does not belong to the certificate".into(),
            ));
        }
        let subject = cert
            .tbs_certificate
            .subject
            .to_der()
            .map_err(|e| LoadError::Cert(e.to_string()))?;
        if cas.is_empty() {
            return Err(LoadError::Ca("no CA certificate".into()));
        }
        let mut anchors = Vec::new();
        let mut ca_key_hashes = Vec::new();
        for (i, ca) in cas.iter().enumerate() {
            let bad = |e: String| LoadError::Ca(format!("CA certificate {}: {e}", i + 1));
            let parsed = Certificate::from_der(ca).map_err(|e| bad(e.to_string()))?;
            let spki = parsed
                .tbs_certificate
                .subject_public_key_info
                .to_der()
                .map_err(|e| bad(e.to_string()))?;
            ca_key_hashes.extend_from_slice(
                ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, &spki).as_ref(),
            );
            let der = CertificateDer::from(ca.as_slice());
            let anchor =
                webpki::anchor_from_trusted_cert(&der).map_err(|e| bad(format!("{e:?}")))?;
            anchors.push(anchor.to_owned());
        }
        Ok(PubkeyAuth {
            chain: chain.to_vec(),
            key_type: public.key_type,
            key: signing,
            subject,
            anchors,
            ca_key_hashes,
            time: None,
        })
    }

    /// Checks peers' certificates at `time` instead of the system clock's
    /// current time (tests, replays).
    pub fn at_time(mut self, time: SystemTime) -> PubkeyAuth {
        self.time = Some(time);
        self
    }

    pub fn key_type(&self) -> KeyType {
        self.key_type
    }

    /// Our certificate (DER).
    pub fn certificate(&self) -> &[u8] {
        &self.chain[0]
    }

    /// Our certificate's subject as DER: the data of an ID_DER_ASN1_DN
    /// identity naming us.
    pub fn subject_der(&self) -> &[u8] {
        &self.subject
    }

    // -------------------------------------------------------------- engine

    /// Our CERT payloads: our certificate, then the intermediates.
    pub(crate) fn cert_payloads(&self) -> impl Iterator<Item = CertPayload> + '_ {
        self.chain.iter().map(|c| CertPayload {
            encoding: CertEncoding::X509_SIGNATURE,
            data: c.clone(),
        })
    }

    /// The CERTREQ naming the CAs we trust.
    pub(crate) fn certreq(&self) -> CertPayload {
        CertPayload {
            encoding: CertEncoding::X509_SIGNATURE,
            data: self.ca_key_hashes.clone(),
        }
    }

    /// Our AUTH over `octets`; `peer_hashes` is what the peer's
    /// SIGNATURE_HASH_ALGORITHMS announced (`None`: it sent none).
    pub(crate) fn sign(
        &self,
        octets: &[u8],
        peer_hashes: Option<&[u16]>,
    ) -> Result<AuthPayload, String> {
        let rng = SystemRandom::new();
        let offered = |h| peer_hashes.is_some_and(|p| p.contains(&h));
        match &self.key {
            SigningKey::Rsa(key) => {
                let choice = [
                    (
                        HASH_SHA2_256,
                        &sig::RSA_PKCS1_SHA256,
                        alg_id::RSA_PKCS1_SHA256,
                    ),
                    (
                        HASH_SHA2_384,
                        &sig::RSA_PKCS1_SHA384,
                        alg_id::RSA_PKCS1_SHA384,
                    ),
                    (
                        HASH_SHA2_512,
                        &sig::RSA_PKCS1_SHA512,
                        alg_id::RSA_PKCS1_SHA512,
                    ),
                ]
                .into_iter()
                .find(|(h, _, _)| offered(*h));
                let Some((_, padding, alg)) = choice else {
                    return Err("the peer takes no RFC 7427 signature with SHA-2, and \
                                RSA with SHA-1 (auth method 1) is not implemented"
                        .into());
                };
                let mut signature = vec![0u8; key.public().modulus_len()];
                key.sign(padding, &rng, octets, &mut signature)
                    .map_err(|_| "RSA signing failed".to_string())?;
                Ok(digital_signature(alg, &signature))
            }
            SigningKey::Ecdsa {
                key_type,
                der,
                fixed,
            } => {
                let (hash, alg, classic) = if *key_type == KeyType::EcdsaP256 {
                    (
                        HASH_SHA2_256,
                        alg_id::ECDSA_SHA256,
                        AuthMethod::ECDSA_SHA256_P256,
                    )
                } else {
                    (
                        HASH_SHA2_384,
                        alg_id::ECDSA_SHA384,
                        AuthMethod::ECDSA_SHA384_P384,
                    )
                };
                if offered(hash) {
                    let s = der
                        .sign(&rng, octets)
                        .map_err(|_| "ECDSA signing failed".to_string())?;
                    Ok(digital_signature(alg, s.as_ref()))
                } else {
                    let s = fixed
                        .sign(&rng, octets)
                        .map_err(|_| "ECDSA signing failed".to_string())?;
                    Ok(AuthPayload {
                        method: classic,
                        data: s.as_ref().to_vec(),
                    })
                }
            }
        }
    }

    /// Checks the peer: its certificates (`certs`: the CERT payloads in
    /// order), that they name `peer_id`, and its AUTH over `octets`.
    pub(crate) fn verify(
        &self,
        certs: &[&CertPayload],
        peer_id: &IdPayload,
        auth: &AuthPayload,
        octets: &[u8],
    ) -> Result<(), AuthError> {
        if !matches!(
            auth.method,
            AuthMethod::RSA_DIGITAL_SIGNATURE
                | AuthMethod::ECDSA_SHA256_P256
                | AuthMethod::ECDSA_SHA384_P384
                | AuthMethod::DIGITAL_SIGNATURE
        ) {
            return Err(AuthError::new(
                "auth_method",
                format!(
                    "the peer authenticates with {}, we use certificates",
                    auth.method
                ),
            ));
        }
        let x509: Vec<&[u8]> = certs
            .iter()
            .filter(|c| c.encoding == CertEncoding::X509_SIGNATURE)
            .map(|c| c.data.as_slice())
            .collect();
        let Some(ee_der) = x509.first().copied() else {
            return Err(AuthError::new(
                "cert_missing",
                "the peer sent no X.509 certificate",
            ));
        };
        let ee_der = CertificateDer::from(ee_der);
        let ee = EndEntityCert::try_from(&ee_der)
            .map_err(|e| AuthError::new("cert_invalid", format!("{e:?}")))?;
        let intermediates: Vec<CertificateDer<'_>> =
            x509[1..].iter().map(|c| CertificateDer::from(*c)).collect();
        let now = self.time.unwrap_or_else(SystemTime::now);
        let since_epoch = now.duration_since(UNIX_EPOCH).unwrap_or_default();
        ee.verify_for_usage(
            CHAIN_ALGS,
            &self.anchors,
            &intermediates,
            UnixTime::since_unix_epoch(since_epoch),
            AnyUsage,
            None,
            None,
        )
        .map_err(|e| match e {
            webpki::Error::CertExpired { .. } => AuthError::new("cert_expired", format!("{e:?}")),
            webpki::Error::CertNotValidYet { .. } => {
                AuthError::new("cert_not_yet_valid", format!("{e:?}"))
            }
            e => AuthError::new("cert_untrusted", format!("no chain to a trusted CA: {e:?}")),
        })?;
        let cert = Certificate::from_der(&ee_der)
            .map_err(|e| AuthError::new("cert_invalid", e.to_string()))?;
        if !names(&cert, peer_id) {
            return Err(AuthError::new(
                "id_mismatch",
                format!(
                    "the peer's certificate does not name its ID ({} {})",
                    peer_id.id_type,
                    printable(&peer_id.data)
                ),
            ));
        }
        let key = public_key(&cert).map_err(|e| AuthError::new("auth_failed", e))?;
        verify_signature(&key, auth, octets)
    }
}

/// A [`PubkeyAuth`] that could not be built: which input is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoadError {
    Cert(String),
    Key(String),
    Ca(String),
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LoadError::Cert(e) => write!(f, "certificate: {e}"),
            LoadError::Key(e) => write!(f, "private key: {e}"),
            LoadError::Ca(e) => write!(f, "CA: {e}"),
        }
    }
}

impl std::error::Error for LoadError {}

/// Why the peer is not who it says: a stable reason and, for the log, what.
#[derive(Debug)]
pub(crate) struct AuthError {
    pub reason: &'static str,
    pub detail: String,
}

impl AuthError {
    fn new(reason: &'static str, detail: impl Into<String>) -> AuthError {
        AuthError {
            reason,
            detail: detail.into(),
        }
    }
}

/// Accepts whatever extended key usages a certificate lists: IKE
/// implementations do not agree on one (RFC 4945 §5.1.3.12 vs. serverAuth
/// in practice), and strongSwan enforces none.
struct AnyUsage;

impl webpki::ExtendedKeyUsageValidator for AnyUsage {
    fn validate(&self, iter: webpki::KeyPurposeIdIter<'_, '_>) -> Result<(), webpki::Error> {
        // still refuse a malformed extension
        for id in iter {
            id?;
        }
        Ok(())
    }
}

/// AUTH method 14 (RFC 7427 §3): the AlgorithmIdentifier's length, the
/// AlgorithmIdentifier (a DER SEQUENCE), the signature.
fn digital_signature(alg: AlgorithmIdentifier, signature: &[u8]) -> AuthPayload {
    let content: &[u8] = alg.as_ref();
    // every AlgorithmIdentifier here is shorter than 128 octets: short form
    let mut data = vec![(content.len() + 2) as u8, 0x30, content.len() as u8];
    data.extend_from_slice(content);
    data.extend_from_slice(signature);
    AuthPayload {
        method: AuthMethod::DIGITAL_SIGNATURE,
        data,
    }
}

/// Whether the certificate names the ID (see the module documentation).
fn names(cert: &Certificate, id: &IdPayload) -> bool {
    if id.id_type == IdType::DER_ASN1_DN {
        return cert
            .tbs_certificate
            .subject
            .to_der()
            .is_ok_and(|subject| crate::ike::dn::equal(&subject, &id.data));
    }
    let sans = cert
        .tbs_certificate
        .extensions
        .iter()
        .flatten()
        .filter(|e| e.extn_id == OID_SUBJECT_ALT_NAME)
        .filter_map(|e| SubjectAltName::from_der(e.extn_value.as_bytes()).ok())
        .flat_map(|san| san.0);
    let mut sans = sans;
    match id.id_type {
        IdType::IPV4_ADDR | IdType::IPV6_ADDR => sans.any(|n| {
            matches!(n, GeneralName::IpAddress(a) if a.as_bytes() == id.data.as_slice())
        }),
        IdType::FQDN => sans.any(|n| {
            matches!(n, GeneralName::DnsName(d) if d.as_bytes().eq_ignore_ascii_case(&id.data))
        }),
        IdType::RFC822_ADDR => sans.any(|n| {
            matches!(n, GeneralName::Rfc822Name(m) if m.as_bytes().eq_ignore_ascii_case(&id.data))
        }),
        _ => false,
    }
}

fn printable(data: &[u8]) -> String {
    match std::str::from_utf8(data) {
        Ok(s) if s.chars().all(|c| !c.is_control()) => s.to_string(),
        _ => hex::encode(data),
    }
}

/// The peer's AUTH with its certificate's key.
fn verify_signature(key: &PublicKey, auth: &AuthPayload, octets: &[u8]) -> Result<(), AuthError> {
    let mismatch = || {
        AuthError::new(
            "auth_method",
            format!(
                "auth method {} does not fit the certificate's {} key",
                auth.method, key.key_type
            ),
        )
    };
    let (alg, signature): (&dyn sig::VerificationAlgorithm, &[u8]) = match auth.method {
        AuthMethod::RSA_DIGITAL_SIGNATURE if key.key_type == KeyType::Rsa => (
            &sig::RSA_PKCS1_2048_8192_SHA1_FOR_LEGACY_USE_ONLY,
            &auth.data,
        ),
        AuthMethod::ECDSA_SHA256_P256 if key.key_type == KeyType::EcdsaP256 => {
            (&sig::ECDSA_P256_SHA256_FIXED, &auth.data)
        }
        AuthMethod::ECDSA_SHA384_P384 if key.key_type == KeyType::EcdsaP384 => {
            (&sig::ECDSA_P384_SHA384_FIXED, &auth.data)
        }
        AuthMethod::RSA_DIGITAL_SIGNATURE
        | AuthMethod::ECDSA_SHA256_P256
        | AuthMethod::ECDSA_SHA384_P384 => return Err(mismatch()),
        AuthMethod::DIGITAL_SIGNATURE => {
            let (alg_id, signature) = split_digital_signature(&auth.data)
                .ok_or_else(|| AuthError::new("auth_failed", "malformed RFC 7427 signature"))?;
            (
                rfc7427_algorithm(key.key_type, alg_id).ok_or_else(|| {
                    AuthError::new(
                        "auth_failed",
                        format!(
                            "signature algorithm {} unsupported with a {} key",
                            hex::encode(alg_id),
                            key.key_type
                        ),
                    )
                })?,
                signature,
            )
        }
        // refused by verify() before the certificate is looked at
        _ => return Err(mismatch()),
    };
    UnparsedPublicKey::new(alg, &key.bits)
        .verify(octets, signature)
        .map_err(|_| {
            AuthError::new(
                "auth_failed",
                format!(
                    "the {} signature (method {}) does not verify",
                    key.key_type, auth.method
                ),
            )
        })
}

/// Method 14's data: the AlgorithmIdentifier's content and the signature.
fn split_digital_signature(data: &[u8]) -> Option<(&[u8], &[u8])> {
    let (&len, rest) = data.split_first()?;
    let len = usize::from(len);
    if rest.len() < len || len < 2 {
        return None;
    }
    let (alg, signature) = rest.split_at(len);
    // a SEQUENCE with a short-form length that fills it
    if alg[0] != 0x30 || usize::from(alg[1]) != len - 2 {
        return None;
    }
    Some((&alg[2..], signature))
}

/// The verification algorithm an RFC 7427 AlgorithmIdentifier names for a
/// key; only the hashes we announce (SHA-2).
fn rfc7427_algorithm(
    key_type: KeyType,
    alg: &[u8],
) -> Option<&'static dyn sig::VerificationAlgorithm> {
    let is = |a: AlgorithmIdentifier| alg == a.as_ref();
    Some(match key_type {
        KeyType::Rsa if is(alg_id::RSA_PKCS1_SHA256) => &sig::RSA_PKCS1_2048_8192_SHA256,
        KeyType::Rsa if is(alg_id::RSA_PKCS1_SHA384) => &sig::RSA_PKCS1_2048_8192_SHA384,
        KeyType::Rsa if is(alg_id::RSA_PKCS1_SHA512) => &sig::RSA_PKCS1_2048_8192_SHA512,
        KeyType::Rsa if is(alg_id::RSA_PSS_SHA256) => &sig::RSA_PSS_2048_8192_SHA256,
        KeyType::Rsa if is(alg_id::RSA_PSS_SHA384) => &sig::RSA_PSS_2048_8192_SHA384,
        KeyType::Rsa if is(alg_id::RSA_PSS_SHA512) => &sig::RSA_PSS_2048_8192_SHA512,
        KeyType::EcdsaP256 if is(alg_id::ECDSA_SHA256) => &sig::ECDSA_P256_SHA256_ASN1,
        KeyType::EcdsaP256 if is(alg_id::ECDSA_SHA384) => &sig::ECDSA_P256_SHA384_ASN1,
        KeyType::EcdsaP384 if is(alg_id::ECDSA_SHA256) => &sig::ECDSA_P384_SHA256_ASN1,
        KeyType::EcdsaP384 if is(alg_id::ECDSA_SHA384) => &sig::ECDSA_P384_SHA384_ASN1,
        _ => return None,
    })
}
