//! Transforms and proposals: what the administrator writes (strongSwan's
//! proposal syntax, `aes128gcm16-prfsha256-x25519`), what goes into SA
//! payloads, and the negotiation between the two (RFC 7296 §2.7, §3.3).
//!
//! strongSwan's syntax is used because it is what people who run IKE already
//! write, and because strongSwan is the peer the system tests run against:
//! a proposal string can be copied between the two configurations.
//!
//! Only what bitw implements can be written: AES-CBC and AES-GCM-16 with
//! 128/256-bit keys and ChaCha20-Poly1305; HMAC-SHA2 PRFs and integrity;
//! DH groups 14, 19, 20, 31. ESP proposals are AEAD only, because the
//! dataplane does AEAD only ([`bitw_common::sa_params::AeadAlg`]). Parsing
//! rejects combinations that cannot work, with a message that names the
//! token and lists what is accepted.
//!
//! Negotiation:
//! - as responder, [`select`] picks the first of the peer's proposals that
//!   one of ours accepts, one transform of each type (the peer's order
//!   decides among alternatives, so that its KE payload's group, normally
//!   its first, is picked), and gives the reply to send ([`Agreed::reply`]);
//! - as initiator, [`offer`] builds our SA payload and [`accept_reply`]
//!   checks the responder's choice against what we offered.

use std::fmt;

use bitw_common::sa_params::AeadAlg;

use crate::ike::message::{
    self, Attribute, AttributeValue, ProtocolId, SaPayload, Transform, TransformType,
    ATTRIBUTE_KEY_LENGTH, MAX_PROPOSALS,
};

/// The protocol a proposal is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// The IKE SA itself.
    Ike,
    /// A Child SA.
    Esp,
}

impl Protocol {
    pub fn protocol_id(self) -> ProtocolId {
        match self {
            Protocol::Ike => ProtocolId::IKE,
            Protocol::Esp => ProtocolId::ESP,
        }
    }

    fn from_id(id: ProtocolId) -> Option<Protocol> {
        match id {
            ProtocolId::IKE => Some(Protocol::Ike),
            ProtocolId::ESP => Some(Protocol::Esp),
            _ => None,
        }
    }

    /// Names accepted in a proposal of this protocol, for error messages.
    fn accepted(self) -> &'static str {
        match self {
            Protocol::Ike => {
                "aes128, aes256, aes128gcm16 (or aes128gcm128), aes256gcm16 (or aes256gcm128), \
                 chacha20poly1305, sha256 (or sha2_256), sha384 (or sha2_384), sha512 \
                 (or sha2_512), prfsha256, prfsha384, prfsha512, modp2048, ecp256, ecp384, \
                 x25519 (or curve25519)"
            }
            Protocol::Esp => {
                "aes128gcm16 (or aes128gcm128), aes256gcm16 (or aes256gcm128), \
                 chacha20poly1305, modp2048, ecp256, ecp384, x25519 (or curve25519), esn, noesn"
            }
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Ike => "IKE",
            Protocol::Esp => "ESP",
        })
    }
}

// The transforms are crypto's and dh's types (one enum per transform
// type); what proposals need of them is added here.
pub use crate::ike::crypto::{Encryption, Integrity, Prf};
pub use crate::ike::dh::DhGroup;

impl Encryption {
    /// Bytes of key, without the salt.
    pub fn key_bytes(self) -> usize {
        self.key_len() - self.salt_bytes()
    }

    /// Bytes of salt taken from the key material after the key: 4 for the
    /// AEADs (RFC 5282 §7.1 and RFC 4106 §8.1 for GCM, RFC 7634 §2 and
    /// RFC 7634 §3 for ChaCha20-Poly1305), none for CBC.
    pub fn salt_bytes(self) -> usize {
        if self.is_aead() {
            4
        } else {
            0
        }
    }

    /// The dataplane's name for it, if the dataplane can run it for ESP.
    pub fn aead_alg(self) -> Option<AeadAlg> {
        match self {
            Encryption::Aes128Gcm16 => Some(AeadAlg::Aes128Gcm16),
            Encryption::Aes256Gcm16 => Some(AeadAlg::Aes256Gcm16),
            Encryption::ChaCha20Poly1305 => Some(AeadAlg::ChaCha20Poly1305),
            Encryption::Aes128Cbc | Encryption::Aes256Cbc => None,
        }
    }

    pub fn to_transform(self) -> Transform {
        match self.key_length_attribute() {
            Some(bits) => Transform::with_key_length(TransformType::ENCR, self.iana_id(), bits),
            None => Transform::new(TransformType::ENCR, self.iana_id()),
        }
    }

    /// The transform, if it is one of ours with exactly the attributes it
    /// must have. A transform with an attribute we do not know, or without
    /// the key length AES needs, is not acceptable (RFC 7296 §3.3.6).
    pub fn from_transform(t: &Transform) -> Option<Encryption> {
        if t.transform_type != TransformType::ENCR {
            return None;
        }
        let key_length = match t.attributes.as_slice() {
            [] => None,
            [Attribute {
                attribute_type: ATTRIBUTE_KEY_LENGTH,
                value: AttributeValue::Tv(bits),
            }] => Some(*bits),
            _ => return None,
        };
        Encryption::from_iana_id(t.id, key_length)
    }
}

impl Prf {
    pub fn to_transform(self) -> Transform {
        Transform::new(TransformType::PRF, self.iana_id())
    }

    pub fn from_transform(t: &Transform) -> Option<Prf> {
        if t.transform_type != TransformType::PRF || !t.attributes.is_empty() {
            return None;
        }
        Prf::from_iana_id(t.id)
    }
}

/// Transform ID of INTEG NONE, and of DH NONE.
const TRANSFORM_NONE: u16 = 0;

impl Integrity {
    /// The PRF strongSwan adds to an IKE proposal that names this integrity
    /// algorithm and no PRF.
    pub fn implied_prf(self) -> Prf {
        match self {
            Integrity::HmacSha256_128 => Prf::HmacSha256,
            Integrity::HmacSha384_192 => Prf::HmacSha384,
            Integrity::HmacSha512_256 => Prf::HmacSha512,
        }
    }

    pub fn to_transform(self) -> Transform {
        Transform::new(TransformType::INTEG, self.iana_id())
    }

    pub fn from_transform(t: &Transform) -> Option<Integrity> {
        if t.transform_type != TransformType::INTEG || !t.attributes.is_empty() {
            return None;
        }
        Integrity::from_iana_id(t.id)
    }
}

impl DhGroup {
    pub fn to_transform(self) -> Transform {
        Transform::new(TransformType::DH, self.iana_id())
    }

    pub fn from_transform(t: &Transform) -> Option<DhGroup> {
        if t.transform_type != TransformType::DH || !t.attributes.is_empty() {
            return None;
        }
        DhGroup::from_iana_id(t.id)
    }
}

/// Extended Sequence Numbers (IANA "Transform Type 5"), ESP only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Esn {
    /// 32-bit sequence numbers (0).
    No,
    /// 64-bit extended sequence numbers (1).
    Yes,
}

impl Esn {
    pub fn name(self) -> &'static str {
        match self {
            Esn::No => "noesn",
            Esn::Yes => "esn",
        }
    }

    pub fn transform_id(self) -> u16 {
        match self {
            Esn::No => 0,
            Esn::Yes => 1,
        }
    }

    pub fn to_transform(self) -> Transform {
        Transform::new(TransformType::ESN, self.transform_id())
    }

    pub fn from_transform(t: &Transform) -> Option<Esn> {
        if t.transform_type != TransformType::ESN || !t.attributes.is_empty() {
            return None;
        }
        match t.id {
            0 => Some(Esn::No),
            1 => Some(Esn::Yes),
            _ => None,
        }
    }
}

/// Why a proposal string (or an SA proposal converted to one) is not
/// acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProposalError {
    #[error(
        "{protocol} proposal `{proposal}`: unknown algorithm `{token}`; accepted: {}",
        .protocol.accepted()
    )]
    UnknownToken {
        protocol: Protocol,
        proposal: String,
        token: String,
    },
    #[error(
        "{protocol} proposal `{proposal}`: strongSwan knows `{token}` but bitw does not \
         implement it; accepted: {}", .protocol.accepted()
    )]
    Unsupported {
        protocol: Protocol,
        proposal: String,
        token: String,
    },
    #[error("{protocol} proposal `{proposal}`: `{token}` {why}")]
    WrongProtocol {
        protocol: Protocol,
        proposal: String,
        token: String,
        why: &'static str,
    },
    #[error("{protocol} proposal `{proposal}`: `{token}` appears twice")]
    Duplicate {
        protocol: Protocol,
        proposal: String,
        token: String,
    },
    #[error("{protocol} proposal `{proposal}`: {problem}")]
    Invalid {
        protocol: Protocol,
        proposal: String,
        problem: String,
    },
    #[error("no {protocol} proposal given (write e.g. `{}`)", example(*.protocol))]
    Empty { protocol: Protocol },
    #[error("{count} {protocol} proposals; at most {max} fit in an SA payload here")]
    TooMany {
        protocol: Protocol,
        count: usize,
        max: usize,
    },
    /// An SA payload's proposal that has no equivalent proposal string.
    #[error("SA proposal #{number} ({description}): {problem}")]
    NotRepresentable {
        number: u8,
        description: String,
        problem: &'static str,
    },
}

fn example(protocol: Protocol) -> &'static str {
    match protocol {
        Protocol::Ike => "aes128gcm16-prfsha256-x25519",
        Protocol::Esp => "aes128gcm16",
    }
}

/// strongSwan keywords that bitw does not implement, so that the error says
/// "not supported" rather than "unknown".
const STRONGSWAN_UNSUPPORTED: &[&str] = &[
    "default",
    "null",
    "3des",
    "cast128",
    "blowfish128",
    "blowfish192",
    "blowfish256",
    "aes192",
    "aes128ctr",
    "aes192ctr",
    "aes256ctr",
    "aes128ccm8",
    "aes128ccm12",
    "aes128ccm16",
    "aes192ccm16",
    "aes256ccm8",
    "aes256ccm12",
    "aes256ccm16",
    "aes128gcm8",
    "aes128gcm12",
    "aes128gcm64",
    "aes128gcm96",
    "aes192gcm16",
    "aes192gcm128",
    "aes256gcm8",
    "aes256gcm12",
    "aes256gcm64",
    "aes256gcm96",
    "aes128gmac",
    "aes256gmac",
    "camellia128",
    "camellia192",
    "camellia256",
    "serpent128",
    "twofish128",
    "md5",
    "md5_128",
    "sha1",
    "sha",
    "sha1_160",
    "aesxcbc",
    "aescmac",
    "sha256_96",
    "sha2_256_96",
    "prfmd5",
    "prfsha1",
    "prfaesxcbc",
    "prfaescmac",
    "modp768",
    "modp1024",
    "modp1536",
    "modp3072",
    "modp4096",
    "modp6144",
    "modp8192",
    "modp1024s160",
    "modp2048s224",
    "modp2048s256",
    "ecp192",
    "ecp224",
    "ecp521",
    "ecp224bp",
    "ecp256bp",
    "ecp384bp",
    "ecp512bp",
    "x448",
    "curve448",
    "ntru112",
    "ntru128",
    "ntru192",
    "ntru256",
    "newhope128",
];

/// One algorithm named in a proposal string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Token {
    Encryption(Encryption),
    Integrity(Integrity),
    Prf(Prf),
    Dh(DhGroup),
    Esn(Esn),
}

fn keyword(token: &str) -> Option<Token> {
    Some(match token {
        "aes128" | "aes" => Token::Encryption(Encryption::Aes128Cbc),
        "aes256" => Token::Encryption(Encryption::Aes256Cbc),
        "aes128gcm16" | "aes128gcm128" | "aes128gcm" => Token::Encryption(Encryption::Aes128Gcm16),
        "aes256gcm16" | "aes256gcm128" | "aes256gcm" => Token::Encryption(Encryption::Aes256Gcm16),
        "chacha20poly1305" => Token::Encryption(Encryption::ChaCha20Poly1305),
        "sha256" | "sha2_256" => Token::Integrity(Integrity::HmacSha256_128),
        "sha384" | "sha2_384" => Token::Integrity(Integrity::HmacSha384_192),
        "sha512" | "sha2_512" => Token::Integrity(Integrity::HmacSha512_256),
        "prfsha256" => Token::Prf(Prf::HmacSha256),
        "prfsha384" => Token::Prf(Prf::HmacSha384),
        "prfsha512" => Token::Prf(Prf::HmacSha512),
        "modp2048" => Token::Dh(DhGroup::Modp2048),
        "ecp256" => Token::Dh(DhGroup::Ecp256),
        "ecp384" => Token::Dh(DhGroup::Ecp384),
        "x25519" | "curve25519" => Token::Dh(DhGroup::Curve25519),
        "esn" => Token::Esn(Esn::Yes),
        "noesn" => Token::Esn(Esn::No),
        _ => return None,
    })
}

/// A configured proposal: for each transform type, the algorithms we accept
/// (and offer), in order of preference.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Proposal {
    pub protocol: Protocol,
    pub encryption: Vec<Encryption>,
    /// Empty with AEAD ciphers.
    pub integrity: Vec<Integrity>,
    /// IKE only.
    pub prf: Vec<Prf>,
    /// IKE: at least one. ESP: the PFS groups; empty = no PFS.
    pub dh: Vec<DhGroup>,
    /// ESP only; parsing puts `noesn` there when none is named, as strongSwan
    /// does.
    pub esn: Vec<Esn>,
}

impl Proposal {
    /// Parses one proposal in strongSwan's syntax: algorithm names joined by
    /// `-`, in any order, case-insensitive. For IKE, an integrity algorithm
    /// implies the PRF of the same hash when no PRF is named. Errors quote
    /// `text` and name the offending token.
    pub fn parse(protocol: Protocol, text: &str) -> Result<Proposal, ProposalError> {
        let text = text.trim();
        if text.is_empty() {
            return Err(ProposalError::Empty { protocol });
        }
        let mut p = Proposal::empty(protocol);
        for raw in text.split('-') {
            let token = raw.trim().to_ascii_lowercase();
            let proposal = text.to_string();
            if token.is_empty() {
                return Err(ProposalError::Invalid {
                    protocol,
                    proposal,
                    problem: "an empty algorithm name (two `-` in a row, or one at an end)"
                        .to_string(),
                });
            }
            let Some(parsed) = keyword(&token) else {
                return Err(if STRONGSWAN_UNSUPPORTED.contains(&token.as_str()) {
                    ProposalError::Unsupported {
                        protocol,
                        proposal,
                        token,
                    }
                } else {
                    ProposalError::UnknownToken {
                        protocol,
                        proposal,
                        token,
                    }
                });
            };
            if let Some(why) = wrong_protocol(protocol, parsed) {
                return Err(ProposalError::WrongProtocol {
                    protocol,
                    proposal,
                    token,
                    why,
                });
            }
            let duplicate = match parsed {
                Token::Encryption(e) => push_new(&mut p.encryption, e),
                Token::Integrity(i) => push_new(&mut p.integrity, i),
                Token::Prf(f) => push_new(&mut p.prf, f),
                Token::Dh(g) => push_new(&mut p.dh, g),
                Token::Esn(e) => push_new(&mut p.esn, e),
            };
            if duplicate {
                return Err(ProposalError::Duplicate {
                    protocol,
                    proposal,
                    token,
                });
            }
        }
        if protocol == Protocol::Ike && p.prf.is_empty() {
            for i in &p.integrity {
                push_new(&mut p.prf, i.implied_prf());
            }
        }
        if protocol == Protocol::Esp && p.esn.is_empty() {
            p.esn.push(Esn::No);
        }
        match p.problem() {
            Some(problem) => Err(ProposalError::Invalid {
                protocol,
                proposal: text.to_string(),
                problem,
            }),
            None => Ok(p),
        }
    }

    fn empty(protocol: Protocol) -> Proposal {
        Proposal {
            protocol,
            encryption: Vec::new(),
            integrity: Vec::new(),
            prf: Vec::new(),
            dh: Vec::new(),
            esn: Vec::new(),
        }
    }

    /// Checks the combination rules: an encryption algorithm; AEAD and
    /// non-AEAD not mixed (RFC 7296 §3.3: they need separate proposals); no
    /// integrity with AEAD (RFC 5282 §8); integrity with every non-AEAD
    /// cipher; for IKE a PRF and a DH group; for ESP an ESN choice and an
    /// AEAD cipher (the dataplane's). [`Proposal::parse`] always checks.
    pub fn validate(&self) -> Result<(), ProposalError> {
        match self.problem() {
            Some(problem) => Err(ProposalError::Invalid {
                protocol: self.protocol,
                proposal: self.to_string(),
                problem,
            }),
            None => Ok(()),
        }
    }

    /// What breaks the combination rules, if anything.
    fn problem(&self) -> Option<String> {
        let Some(first) = self.encryption.first() else {
            return Some("names no encryption algorithm".to_string());
        };
        if let Some(other) = self
            .encryption
            .iter()
            .find(|e| e.is_aead() != first.is_aead())
        {
            return Some(format!(
                "mixes AEAD and non-AEAD encryption (`{}` and `{}`); write them as two \
                 proposals separated by a comma",
                first.name(),
                other.name()
            ));
        }
        if first.is_aead() {
            if let Some(integrity) = self.integrity.first() {
                return Some(format!(
                    "`{}` is an AEAD cipher and protects integrity itself: remove `{}`{}",
                    first.name(),
                    integrity.name(),
                    if self.protocol == Protocol::Ike {
                        " (name the PRF with `prf…`, e.g. `prfsha256`)"
                    } else {
                        ""
                    }
                ));
            }
        } else if self.integrity.is_empty() {
            return Some(format!(
                "`{}` does not protect integrity: add an integrity algorithm (e.g. `sha256`)",
                first.name()
            ));
        }
        let problem = match self.protocol {
            Protocol::Ike if self.prf.is_empty() => "names no PRF: add one (e.g. `prfsha256`)",
            Protocol::Ike if self.dh.is_empty() => {
                "names no DH group, which IKE needs (e.g. `x25519`)"
            }
            Protocol::Ike if !self.esn.is_empty() => "ESN applies to ESP only",
            Protocol::Esp if !self.prf.is_empty() => "ESP has no PRF",
            Protocol::Esp if self.esn.is_empty() => "names no ESN choice (`esn` or `noesn`)",
            Protocol::Esp if self.encryption.iter().any(|e| e.aead_alg().is_none()) => {
                "AES-CBC cannot be used for ESP: the dataplane runs AEAD ciphers only"
            }
            _ => return None,
        };
        Some(problem.to_string())
    }

    /// The proposal substructure offering all of it, with the given number
    /// and SPI (empty in IKE_SA_INIT, 4 bytes for ESP, 8 when rekeying the
    /// IKE SA). Transforms go in strongSwan's order: encryption, integrity,
    /// PRF, DH, ESN. With [`DhMode::Skip`] the DH transforms are left out.
    pub fn to_sa_proposal(&self, number: u8, spi: Vec<u8>, dh: DhMode) -> message::Proposal {
        let mut transforms: Vec<Transform> = Vec::new();
        transforms.extend(self.encryption.iter().map(|e| e.to_transform()));
        transforms.extend(self.integrity.iter().map(|i| i.to_transform()));
        transforms.extend(self.prf.iter().map(|p| p.to_transform()));
        if dh != DhMode::Skip {
            transforms.extend(self.dh.iter().map(|g| g.to_transform()));
        }
        transforms.extend(self.esn.iter().map(|e| e.to_transform()));
        message::Proposal {
            number,
            protocol: self.protocol.protocol_id(),
            spi,
            transforms,
        }
    }

    /// The proposal an SA payload's proposal substructure stands for, if it
    /// is one bitw could have been configured with (INTEG NONE and DH NONE
    /// are read as absence).
    pub fn from_sa_proposal(sa: &message::Proposal) -> Result<Proposal, ProposalError> {
        let not_representable = |problem| ProposalError::NotRepresentable {
            number: sa.number,
            description: describe_proposal(sa),
            problem,
        };
        let protocol = Protocol::from_id(sa.protocol)
            .ok_or_else(|| not_representable("the protocol is neither IKE nor ESP"))?;
        let mut p = Proposal::empty(protocol);
        for t in &sa.transforms {
            let known = match t.transform_type {
                TransformType::ENCR => {
                    Encryption::from_transform(t).map(|e| push_new(&mut p.encryption, e))
                }
                TransformType::INTEG if t.id == TRANSFORM_NONE && t.attributes.is_empty() => {
                    Some(false)
                }
                TransformType::INTEG => {
                    Integrity::from_transform(t).map(|i| push_new(&mut p.integrity, i))
                }
                TransformType::PRF => Prf::from_transform(t).map(|f| push_new(&mut p.prf, f)),
                TransformType::DH if t.id == TRANSFORM_NONE && t.attributes.is_empty() => {
                    Some(false)
                }
                TransformType::DH => DhGroup::from_transform(t).map(|g| push_new(&mut p.dh, g)),
                TransformType::ESN => Esn::from_transform(t).map(|e| push_new(&mut p.esn, e)),
                _ => None,
            };
            match known {
                None => return Err(not_representable("a transform bitw does not implement")),
                Some(true) => return Err(not_representable("a transform appears twice")),
                Some(false) => {}
            }
        }
        if p.problem().is_some() {
            return Err(not_representable("not a valid combination"));
        }
        Ok(p)
    }
}

/// Appends `value` unless present; returns whether it was present.
fn push_new<T: PartialEq>(list: &mut Vec<T>, value: T) -> bool {
    if list.contains(&value) {
        return true;
    }
    list.push(value);
    false
}

fn wrong_protocol(protocol: Protocol, token: Token) -> Option<&'static str> {
    match (protocol, token) {
        (Protocol::Ike, Token::Esn(_)) => Some("(extended sequence numbers) applies to ESP only"),
        (Protocol::Esp, Token::Prf(_)) => Some("is a PRF, which ESP proposals do not have"),
        (Protocol::Esp, Token::Integrity(_)) => Some(
            "is an integrity algorithm: ESP here uses AEAD ciphers \
             (aes128gcm16, aes256gcm16, chacha20poly1305), which need none",
        ),
        (Protocol::Esp, Token::Encryption(e)) if e.aead_alg().is_none() => Some(
            "is not available for ESP: the dataplane runs AEAD ciphers only \
             (aes128gcm16, aes256gcm16, chacha20poly1305)",
        ),
        _ => None,
    }
}

impl fmt::Display for Proposal {
    /// strongSwan's syntax, shortest form: the PRF is left out when it is
    /// the one the integrity algorithms imply, `noesn` when it is the only
    /// ESN choice. Parsing the result gives the same proposal back.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut names: Vec<&str> = Vec::new();
        names.extend(self.encryption.iter().map(|e| e.name()));
        names.extend(self.integrity.iter().map(|i| i.name()));
        let mut implied = Vec::new();
        for i in &self.integrity {
            push_new(&mut implied, i.implied_prf());
        }
        if self.prf != implied || self.protocol == Protocol::Esp {
            names.extend(self.prf.iter().map(|p| p.name()));
        }
        names.extend(self.dh.iter().map(|g| g.name()));
        if self.esn != [Esn::No] || self.protocol == Protocol::Ike {
            names.extend(self.esn.iter().map(|e| e.name()));
        }
        f.write_str(&names.join("-"))
    }
}

/// Parses a comma-separated list of proposals (strongSwan's `proposals =`
/// and `esp_proposals =`), in order of preference.
pub fn parse_proposals(protocol: Protocol, text: &str) -> Result<Vec<Proposal>, ProposalError> {
    let proposals = text
        .split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|p| Proposal::parse(protocol, p))
        .collect::<Result<Vec<_>, _>>()?;
    if proposals.is_empty() {
        return Err(ProposalError::Empty { protocol });
    }
    if proposals.len() > MAX_PROPOSALS {
        return Err(ProposalError::TooMany {
            protocol,
            count: proposals.len(),
            max: MAX_PROPOSALS,
        });
    }
    Ok(proposals)
}

/// How DH transforms take part in a negotiation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DhMode {
    /// The exchange has no KE payload: the Child SA set up by IKE_AUTH
    /// (RFC 7296 §1.2). DH transforms are left out of offers and ignored in
    /// the peer's proposals, and the suite has no PFS group. Not for IKE.
    Skip,
    /// DH is negotiated (IKE_SA_INIT; CREATE_CHILD_SA). `ke_group`: the
    /// group of the peer's KE payload, preferred when a proposal allows it so
    /// that no INVALID_KE_PAYLOAD round trip is needed; when checking a
    /// reply, the group of our KE payload, which the reply must have chosen.
    Negotiate { ke_group: Option<u16> },
}

/// What an IKE SA negotiation settled on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IkeSuite {
    pub encryption: Encryption,
    /// `None` with an AEAD cipher.
    pub integrity: Option<Integrity>,
    pub prf: Prf,
    pub dh: DhGroup,
}

/// What a Child SA negotiation settled on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EspSuite {
    pub encryption: Encryption,
    /// `None` with an AEAD cipher (always, with the dataplane's ciphers).
    pub integrity: Option<Integrity>,
    /// The PFS group, if any.
    pub dh: Option<DhGroup>,
    pub esn: Esn,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Suite {
    Ike(IkeSuite),
    Esp(EspSuite),
}

impl Suite {
    /// As a single-algorithm proposal (for display).
    pub fn to_proposal(&self) -> Proposal {
        match *self {
            Suite::Ike(s) => Proposal {
                protocol: Protocol::Ike,
                encryption: vec![s.encryption],
                integrity: s.integrity.into_iter().collect(),
                prf: vec![s.prf],
                dh: vec![s.dh],
                esn: vec![],
            },
            Suite::Esp(s) => Proposal {
                protocol: Protocol::Esp,
                encryption: vec![s.encryption],
                integrity: s.integrity.into_iter().collect(),
                prf: vec![],
                dh: s.dh.into_iter().collect(),
                esn: vec![s.esn],
            },
        }
    }
}

impl fmt::Display for Suite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.to_proposal().fmt(f)
    }
}

/// The outcome of a negotiation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Agreed {
    /// The number of the accepted proposal (the peer's numbering when
    /// responding; ours when checking a reply).
    pub number: u8,
    /// The SPI the peer put in its proposal: empty in IKE_SA_INIT; for ESP,
    /// the peer's inbound SPI, which is the SPI of our outbound SA.
    pub peer_spi: Vec<u8>,
    pub suite: Suite,
    /// One transform of each type the peer's proposal had, as the reply
    /// must carry them (including INTEG NONE or DH NONE when offered).
    pub transforms: Vec<Transform>,
}

impl Agreed {
    /// The reply's SA payload: the accepted proposal, its number, exactly one
    /// transform of each type, and *our* SPI (the SPI field carries the
    /// sender's SPI, RFC 7296 §3.3.1: empty in IKE_SA_INIT, our inbound ESP
    /// SPI for a Child SA, our new IKE SPI when rekeying the IKE SA).
    pub fn reply(&self, our_spi: Vec<u8>) -> SaPayload {
        SaPayload {
            proposals: vec![message::Proposal {
                number: self.number,
                protocol: match self.suite {
                    Suite::Ike(_) => ProtocolId::IKE,
                    Suite::Esp(_) => ProtocolId::ESP,
                },
                spi: our_spi,
                transforms: self.transforms.clone(),
            }],
        }
    }

    pub fn ike(&self) -> Option<&IkeSuite> {
        match &self.suite {
            Suite::Ike(s) => Some(s),
            Suite::Esp(_) => None,
        }
    }

    pub fn esp(&self) -> Option<&EspSuite> {
        match &self.suite {
            Suite::Esp(s) => Some(s),
            Suite::Ike(_) => None,
        }
    }
}

/// None of the peer's proposals is acceptable: answer NO_PROPOSAL_CHOSEN.
/// The fields say what was offered and what we accept, for the log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no proposal chosen: the peer offered {offered}; we accept {accepted}")]
pub struct NoProposalChosen {
    pub offered: String,
    pub accepted: String,
}

/// Why a responder's SA payload is not an acceptable answer to our offer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    #[error("the reply's SA payload has {0} proposals; exactly one is required")]
    ProposalCount(usize),
    #[error("the reply accepts proposal #{0}, which we did not offer")]
    UnknownNumber(u8),
    #[error("the reply has more than one {0} transform")]
    NotSingle(TransformType),
    #[error("the reply's {reply} is not a choice from our proposal #{number}: {offered}")]
    NotOffered {
        number: u8,
        reply: String,
        offered: String,
    },
    #[error("the reply chose DH group {chosen}, not {ke_group} of our KE payload")]
    DhGroupMismatch { ke_group: u16, chosen: u16 },
}

/// Our SA payload: every proposal, numbered from 1, with the same SPI.
/// Callers pass the proposals of one protocol; at most [`MAX_PROPOSALS`]
/// are used ([`parse_proposals`] accepts no more).
pub fn offer(ours: &[Proposal], spi: &[u8], dh: DhMode) -> SaPayload {
    SaPayload {
        proposals: ours
            .iter()
            .take(MAX_PROPOSALS)
            .enumerate()
            .map(|(i, p)| p.to_sa_proposal((i + 1) as u8, spi.to_vec(), dh))
            .collect(),
    }
}

/// The DH group of the KE payload to send with an offer: the first group of
/// the first proposal, which a responder following the peer's preference
/// (as [`select`] does) picks.
pub fn preferred_dh_group(ours: &[Proposal]) -> Option<DhGroup> {
    ours.iter().find_map(|p| p.dh.first().copied())
}

/// As responder: the first of the peer's proposals (in its order) that one
/// of ours (in our order) accepts, with one transform of each type.
pub fn select(ours: &[Proposal], peer: &SaPayload, dh: DhMode) -> Result<Agreed, NoProposalChosen> {
    for theirs in &peer.proposals {
        for mine in ours {
            if let Some((suite, transforms)) = match_proposal(mine, theirs, dh) {
                return Ok(Agreed {
                    number: theirs.number,
                    peer_spi: theirs.spi.clone(),
                    suite,
                    transforms,
                });
            }
        }
    }
    Err(NoProposalChosen {
        offered: describe_sa(peer),
        accepted: ours
            .iter()
            .map(|p| format!("{}:{p}", p.protocol))
            .collect::<Vec<_>>()
            .join(", "),
    })
}

/// As initiator: checks the responder's SA payload against what we offered
/// with [`offer`] (same `ours`, same order): one proposal, naming one of
/// ours by number, with at most one transform of each type, all taken from
/// that proposal; with `DhMode::Negotiate { ke_group: Some(g) }`, the DH
/// group must be `g`.
pub fn accept_reply(
    ours: &[Proposal],
    reply: &SaPayload,
    dh: DhMode,
) -> Result<Agreed, ReplyError> {
    let [theirs] = reply.proposals.as_slice() else {
        return Err(ReplyError::ProposalCount(reply.proposals.len()));
    };
    let mine = usize::from(theirs.number)
        .checked_sub(1)
        .and_then(|i| ours.get(i))
        .filter(|_| usize::from(theirs.number) <= MAX_PROPOSALS)
        .ok_or(ReplyError::UnknownNumber(theirs.number))?;
    for (i, t) in theirs.transforms.iter().enumerate() {
        if theirs.transforms[..i]
            .iter()
            .any(|u| u.transform_type == t.transform_type)
        {
            return Err(ReplyError::NotSingle(t.transform_type));
        }
    }
    let not_offered = || ReplyError::NotOffered {
        number: theirs.number,
        reply: describe_proposal(theirs),
        offered: mine.to_string(),
    };
    // The group check comes below, with a more precise error.
    let match_mode = match dh {
        DhMode::Skip => DhMode::Skip,
        DhMode::Negotiate { .. } => DhMode::Negotiate { ke_group: None },
    };
    let (suite, transforms) = match_proposal(mine, theirs, match_mode).ok_or_else(not_offered)?;
    // Every transform of the reply must have been taken up: in Skip mode
    // the matcher ignores DH transforms, which a reply must then not have.
    if transforms.len() != theirs.transforms.len() {
        return Err(not_offered());
    }
    if let DhMode::Negotiate {
        ke_group: Some(ke_group),
    } = dh
    {
        let chosen = match suite {
            Suite::Ike(s) => Some(s.dh),
            Suite::Esp(s) => s.dh,
        };
        let chosen = chosen.map_or(TRANSFORM_NONE, DhGroup::iana_id);
        if chosen != ke_group {
            return Err(ReplyError::DhGroupMismatch { ke_group, chosen });
        }
    }
    Ok(Agreed {
        number: theirs.number,
        peer_spi: theirs.spi.clone(),
        suite,
        transforms,
    })
}

/// Whether `mine` accepts one of the choices `theirs` allows, and which:
/// the suite and the reply's transforms.
fn match_proposal(
    mine: &Proposal,
    theirs: &message::Proposal,
    dh: DhMode,
) -> Option<(Suite, Vec<Transform>)> {
    if theirs.protocol != mine.protocol.protocol_id() {
        return None;
    }
    let spi_ok = match mine.protocol {
        Protocol::Ike => theirs.spi.is_empty() || theirs.spi.len() == 8,
        Protocol::Esp => theirs.spi.len() == 4,
    };
    if !spi_ok {
        return None;
    }
    let of_type = |tt: TransformType| {
        theirs
            .transforms
            .iter()
            .filter(move |t| t.transform_type == tt)
    };
    // A transform type we do not understand, or one the protocol does not
    // have, makes the proposal unacceptable (RFC 7296 §3.3.6).
    let allowed: &[TransformType] = match mine.protocol {
        Protocol::Ike => &[
            TransformType::ENCR,
            TransformType::PRF,
            TransformType::INTEG,
            TransformType::DH,
        ],
        Protocol::Esp => &[
            TransformType::ENCR,
            TransformType::INTEG,
            TransformType::DH,
            TransformType::ESN,
        ],
    };
    if theirs
        .transforms
        .iter()
        .any(|t| !allowed.contains(&t.transform_type))
    {
        return None;
    }

    // PRF (IKE): the peer's first that we accept.
    let prf = match mine.protocol {
        Protocol::Ike => Some(
            of_type(TransformType::PRF)
                .filter_map(Prf::from_transform)
                .find(|p| mine.prf.contains(p))?,
        ),
        Protocol::Esp => None,
    };

    // DH: `Some(None)` = agreed on no group, echoing NONE if it was offered.
    let peer_groups: Vec<u16> = of_type(TransformType::DH)
        .filter(|t| t.attributes.is_empty())
        .map(|t| t.id)
        .collect();
    let peer_has_dh = of_type(TransformType::DH).next().is_some();
    let (group, dh_reply): (Option<DhGroup>, Option<Transform>) = match dh {
        DhMode::Skip => {
            if mine.protocol == Protocol::Ike {
                return None;
            }
            (None, None)
        }
        DhMode::Negotiate { ke_group } => {
            if mine.dh.is_empty() {
                // No PFS: acceptable if the peer does not insist on it.
                if !peer_has_dh {
                    (None, None)
                } else if peer_groups.contains(&TRANSFORM_NONE) {
                    (
                        None,
                        Some(Transform::new(TransformType::DH, TRANSFORM_NONE)),
                    )
                } else {
                    return None;
                }
            } else {
                let acceptable: Vec<DhGroup> = peer_groups
                    .iter()
                    .filter_map(|id| DhGroup::from_iana_id(*id))
                    .filter(|g| mine.dh.contains(g))
                    .collect();
                let chosen = ke_group
                    .and_then(|k| acceptable.iter().copied().find(|g| g.iana_id() == k))
                    .or_else(|| acceptable.first().copied())?;
                (Some(chosen), Some(chosen.to_transform()))
            }
        }
    };

    // ESN (ESP): the peer's first that we accept; if the peer names none,
    // no ESN, when we allow that.
    let esn = match mine.protocol {
        Protocol::Ike => None,
        Protocol::Esp => {
            if of_type(TransformType::ESN).next().is_none() {
                if !mine.esn.contains(&Esn::No) {
                    return None;
                }
                Some((Esn::No, false))
            } else {
                let e = of_type(TransformType::ESN)
                    .filter_map(Esn::from_transform)
                    .find(|e| mine.esn.contains(e))?;
                Some((e, true))
            }
        }
    };

    // Encryption and integrity together: the peer's first cipher we accept
    // for which an integrity choice works.
    let peer_integrity: Vec<&Transform> = of_type(TransformType::INTEG).collect();
    for encryption in of_type(TransformType::ENCR)
        .filter_map(Encryption::from_transform)
        .filter(|e| mine.encryption.contains(e))
    {
        let (integrity, integrity_reply) = if encryption.is_aead() {
            if peer_integrity.is_empty() {
                (None, None)
            } else if peer_integrity
                .iter()
                .any(|t| t.id == TRANSFORM_NONE && t.attributes.is_empty())
            {
                (
                    None,
                    Some(Transform::new(TransformType::INTEG, TRANSFORM_NONE)),
                )
            } else {
                continue;
            }
        } else {
            match peer_integrity
                .iter()
                .filter_map(|t| Integrity::from_transform(t))
                .find(|i| mine.integrity.contains(i))
            {
                Some(i) => (Some(i), Some(i.to_transform())),
                None => continue,
            }
        };
        let mut transforms = vec![encryption.to_transform()];
        transforms.extend(integrity_reply);
        transforms.extend(prf.map(Prf::to_transform));
        transforms.extend(dh_reply.clone());
        if let Some((e, true)) = esn {
            transforms.push(e.to_transform());
        }
        let suite = match mine.protocol {
            Protocol::Ike => Suite::Ike(IkeSuite {
                encryption,
                integrity,
                prf: prf?,
                dh: group?,
            }),
            Protocol::Esp => Suite::Esp(EspSuite {
                encryption,
                integrity,
                dh: group,
                esn: esn.map_or(Esn::No, |(e, _)| e),
            }),
        };
        return Some((suite, transforms));
    }
    None
}

/// A proposal substructure in strongSwan's syntax as far as possible, for
/// logs: `IKE:aes128gcm16-prfsha256-x25519`. Transforms bitw does not know
/// show as `encr13`, `encr12_192`, `dh28`; NONE as `integnone`, `dhnone`.
pub fn describe_proposal(p: &message::Proposal) -> String {
    let protocol = match Protocol::from_id(p.protocol) {
        Some(protocol) => protocol.to_string(),
        None => format!("protocol{}", p.protocol.0),
    };
    let names: Vec<String> = p.transforms.iter().map(describe_transform).collect();
    format!("{protocol}:{}", names.join("-"))
}

/// Every proposal of an SA payload, comma-separated.
pub fn describe_sa(sa: &SaPayload) -> String {
    if sa.proposals.is_empty() {
        return "nothing (an empty SA payload)".to_string();
    }
    sa.proposals
        .iter()
        .map(describe_proposal)
        .collect::<Vec<_>>()
        .join(", ")
}

fn describe_transform(t: &Transform) -> String {
    let known = match t.transform_type {
        TransformType::ENCR => Encryption::from_transform(t).map(Encryption::name),
        TransformType::INTEG => Integrity::from_transform(t).map(Integrity::name),
        TransformType::PRF => Prf::from_transform(t).map(Prf::name),
        TransformType::DH => DhGroup::from_transform(t).map(DhGroup::name),
        TransformType::ESN => Esn::from_transform(t).map(Esn::name),
        _ => None,
    };
    if let Some(name) = known {
        return name.to_string();
    }
    let kind = match t.transform_type {
        TransformType::ENCR => "encr".to_string(),
        TransformType::INTEG => "integ".to_string(),
        TransformType::PRF => "prf".to_string(),
        TransformType::DH => "dh".to_string(),
        TransformType::ESN => "esn".to_string(),
        other => format!("type{}_", other.0),
    };
    let id = if t.id == TRANSFORM_NONE
        && matches!(t.transform_type, TransformType::INTEG | TransformType::DH)
    {
        "none".to_string()
    } else {
        t.id.to_string()
    };
    match t.key_length() {
        Some(bits) => format!("{kind}{id}_{bits}"),
        None => format!("{kind}{id}"),
    }
}

#[cfg(test)]
#[path = "proposal_tests.rs"]
mod tests;
