//! IKEv2 messages on the wire (RFC 7296 §3).
//!
//! Two layers, as smoltcp's `wire` does it:
//!
//! - [`MessageView`]: a checked view over a received datagram. Construction
//!   validates the header and walks the payload chain once (every generic
//!   payload length, the payload count, the Encrypted payload's position, and
//!   unknown payloads marked critical); afterwards the raw payloads and the
//!   SK payload's pieces ([`EncryptedView`]: the associated data RFC 5282 needs
//!   and the IV‖ciphertext‖ICV body) are plain slices of the datagram.
//! - [`Message`] and [`Payload`]: owned, typed values for everything the
//!   engine reads or builds, decoded from and encoded to bytes. For canonical
//!   input (reserved fields zero, critical bit clear on known payloads) the
//!   round trip is byte-exact in both directions.
//!
//! No input makes decoding panic, and what it allocates is bounded by the
//! datagram's size and by the caps below ([`MAX_PAYLOADS`], [`MAX_PROPOSALS`],
//! [`MAX_TRANSFORMS`], [`MAX_ATTRIBUTES`]): a peer cannot make us build large
//! structures from a small datagram. Every rejection is a [`DecodeError`] that
//! says what was wrong and where, with a stable [`DecodeError::reason`] for
//! counting.
//!
//! Encryption and integrity are not done here: the SK payload's body is kept
//! as bytes, and the crypto layer (which knows the transform and hence the IV
//! and ICV sizes) seals and opens it. [`Message::encode_encrypted`] and
//! [`decode_payload_chain`] are the two ends it plugs into.
//!
//! IKE fragmentation (RFC 7383) is not supported: an SKF payload decodes as
//! an unknown payload.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Bytes of the IKE header (RFC 7296 §3.1).
pub const HEADER_LEN: usize = 28;
/// Bytes of the generic payload header (RFC 7296 §3.2).
pub const GENERIC_HEADER_LEN: usize = 4;
/// Most payloads accepted in one chain (the message's, or the SK payload's
/// inner chain). Real messages carry a dozen or so; a cap keeps a hostile
/// datagram from making us allocate thousands of entries.
pub const MAX_PAYLOADS: usize = 64;
/// Most proposals accepted in one SA payload.
pub const MAX_PROPOSALS: usize = 64;
/// Most transforms accepted in one proposal.
pub const MAX_TRANSFORMS: usize = 64;
/// Most attributes accepted in one transform (only Key Length is defined).
pub const MAX_ATTRIBUTES: usize = 16;
/// The four zero bytes that precede an IKE message on UDP port 4500
/// (RFC 3948 §2.2). Datagrams handed to [`MessageView::new_checked`] and
/// [`Message::decode`] must not include it; messages from
/// [`Message::encode`] do not carry it.
pub const NON_ESP_MARKER: [u8; 4] = [0; 4];

/// The IKE message in a UDP payload received on port 4500 (RFC 3948 §2.2):
/// what follows the non-ESP marker; `None` for anything else (ESP, whose
/// first four bytes are a non-zero SPI, or a one-byte NAT-keepalive).
pub fn strip_non_esp_marker(udp_payload: &[u8]) -> Option<&[u8]> {
    udp_payload.strip_prefix(&NON_ESP_MARKER[..])
}

/// The IKE major version this implementation speaks.
const MAJOR_VERSION: u8 = 2;
/// Attribute type of Key Length (RFC 7296 §3.3.5), always in TV format.
pub const ATTRIBUTE_KEY_LENGTH: u16 = 14;
/// The attribute-format bit: set for TV (2-byte value), clear for TLV.
const ATTRIBUTE_FORMAT_TV: u16 = 0x8000;
/// Proposal and transform "last substructure" markers (RFC 7296 §3.3.1,
/// §3.3.2): 0 for the last one, 2 (proposal) or 3 (transform) when more
/// follow. IKEv1 relics, but a wrong one means the structure is not what the
/// sender meant.
const LAST: u8 = 0;

struct Markers {
    more: u8,
    last_unmarked: &'static str,
    more_unmarked: &'static str,
}

const PROPOSAL_MARKERS: Markers = Markers {
    more: 2,
    last_unmarked: "the last proposal is not marked last (0)",
    more_unmarked: "a proposal followed by another is not marked 2",
};

const TRANSFORM_MARKERS: Markers = Markers {
    more: 3,
    last_unmarked: "the last transform is not marked last (0)",
    more_unmarked: "a transform followed by another is not marked 3",
};
/// Bytes of a proposal substructure before its SPI.
const PROPOSAL_FIXED_LEN: usize = 8;
/// Bytes of a transform substructure before its attributes.
const TRANSFORM_FIXED_LEN: usize = 8;
/// Selector lengths of the two address-range selector types (RFC 7296 §3.13.1).
const TS_IPV4_LEN: usize = 16;
const TS_IPV6_LEN: usize = 40;

/// Defines a newtype over an IANA registry value with named constants: the
/// registries are open (a peer may send values we do not know, and they must
/// survive a round trip), so a closed enum would not do.
macro_rules! registry {
    (
        $(#[$meta:meta])*
        $name:ident($repr:ty) {
            $( $(#[$cmeta:meta])* $konst:ident = $value:expr ),* $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub $repr);

        impl $name {
            $( $(#[$cmeta])* pub const $konst: $name = $name($value); )*

            /// The IANA name, if this implementation knows the value.
            pub fn name(self) -> Option<&'static str> {
                match self {
                    $( $name::$konst => Some(stringify!($konst)), )*
                    _ => None,
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                match self.name() {
                    Some(name) => f.write_str(name),
                    None => write!(f, "{}", self.0),
                }
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                match self.name() {
                    Some(name) => write!(f, "{}::{}", stringify!($name), name),
                    None => write!(f, "{}({})", stringify!($name), self.0),
                }
            }
        }
    };
}

registry! {
    /// Exchange types (RFC 7296 §3.1 and IANA "IKEv2 Exchange Types").
    ExchangeType(u8) {
        IKE_SA_INIT = 34,
        IKE_AUTH = 35,
        CREATE_CHILD_SA = 36,
        INFORMATIONAL = 37,
        IKE_SESSION_RESUME = 38,
        IKE_INTERMEDIATE = 43,
    }
}

registry! {
    /// Payload types (RFC 7296 §3.2 and IANA "IKEv2 Payload Types").
    PayloadType(u8) {
        /// "No Next Payload": ends a chain.
        NONE = 0,
        SA = 33,
        KE = 34,
        IDI = 35,
        IDR = 36,
        CERT = 37,
        CERTREQ = 38,
        AUTH = 39,
        NONCE = 40,
        NOTIFY = 41,
        DELETE = 42,
        VENDOR_ID = 43,
        TSI = 44,
        TSR = 45,
        /// Encrypted and Authenticated ("SK").
        SK = 46,
        /// Configuration ("CP").
        CP = 47,
        EAP = 48,
        /// Generic Secure Password Methods (RFC 6467): not understood here.
        GSPM = 49,
        /// Encrypted and Authenticated Fragment (RFC 7383): not understood here.
        SKF = 53,
    }
}

impl PayloadType {
    /// Whether this implementation decodes the payload (types 33 to 48, those
    /// of RFC 7296). Others are kept raw, or, when marked critical, reject the
    /// message (RFC 7296 §2.5).
    pub fn is_understood(self) -> bool {
        (33..=48).contains(&self.0)
    }
}

registry! {
    /// Security protocol identifiers (RFC 7296 §3.3.1), as used in proposals,
    /// Notify and Delete payloads.
    ProtocolId(u8) {
        /// Notify payloads that concern no SA carry 0.
        NONE = 0,
        IKE = 1,
        AH = 2,
        ESP = 3,
    }
}

registry! {
    /// Transform types (RFC 7296 §3.3.2).
    TransformType(u8) {
        ENCR = 1,
        PRF = 2,
        INTEG = 3,
        /// Diffie-Hellman group ("Key Exchange Method" since RFC 9370).
        DH = 4,
        ESN = 5,
    }
}

registry! {
    /// Identification types (RFC 7296 §3.5).
    IdType(u8) {
        IPV4_ADDR = 1,
        FQDN = 2,
        RFC822_ADDR = 3,
        IPV6_ADDR = 5,
        DER_ASN1_DN = 9,
        DER_ASN1_GN = 10,
        KEY_ID = 11,
        FC_NAME = 12,
        /// RFC 7619.
        NULL = 13,
    }
}

registry! {
    /// Certificate encodings (RFC 7296 §3.6), for CERT and CERTREQ.
    CertEncoding(u8) {
        PKCS7_WRAPPED_X509 = 1,
        PGP = 2,
        DNS_SIGNED_KEY = 3,
        X509_SIGNATURE = 4,
        KERBEROS_TOKEN = 6,
        CRL = 7,
        ARL = 8,
        SPKI = 9,
        X509_ATTRIBUTE = 10,
        RAW_RSA_KEY = 11,
        HASH_URL_X509_CERT = 12,
        HASH_URL_X509_BUNDLE = 13,
        /// RFC 4806.
        OCSP_CONTENT = 14,
        /// RFC 7670.
        RAW_PUBLIC_KEY = 15,
    }
}

registry! {
    /// Authentication methods (RFC 7296 §3.8 and IANA).
    AuthMethod(u8) {
        RSA_DIGITAL_SIGNATURE = 1,
        SHARED_KEY_MESSAGE_INTEGRITY_CODE = 2,
        DSS_DIGITAL_SIGNATURE = 3,
        /// RFC 4754.
        ECDSA_SHA256_P256 = 9,
        ECDSA_SHA384_P384 = 10,
        ECDSA_SHA512_P521 = 11,
        /// RFC 6467.
        GENERIC_SECURE_PASSWORD = 12,
        /// RFC 7619.
        NULL_AUTHENTICATION = 13,
        /// RFC 7427.
        DIGITAL_SIGNATURE = 14,
    }
}

registry! {
    /// Notify message types (RFC 7296 §3.10.1 and IANA). Values below 16384
    /// are errors, the rest status.
    NotifyType(u16) {
        UNSUPPORTED_CRITICAL_PAYLOAD = 1,
        INVALID_IKE_SPI = 4,
        INVALID_MAJOR_VERSION = 5,
        INVALID_SYNTAX = 7,
        INVALID_MESSAGE_ID = 9,
        INVALID_SPI = 11,
        NO_PROPOSAL_CHOSEN = 14,
        INVALID_KE_PAYLOAD = 17,
        AUTHENTICATION_FAILED = 24,
        SINGLE_PAIR_REQUIRED = 34,
        NO_ADDITIONAL_SAS = 35,
        INTERNAL_ADDRESS_FAILURE = 36,
        FAILED_CP_REQUIRED = 37,
        TS_UNACCEPTABLE = 38,
        INVALID_SELECTORS = 39,
        /// RFC 4555.
        UNACCEPTABLE_ADDRESSES = 40,
        /// RFC 4555.
        UNEXPECTED_NAT_DETECTED = 41,
        TEMPORARY_FAILURE = 43,
        CHILD_SA_NOT_FOUND = 44,
        INITIAL_CONTACT = 16384,
        SET_WINDOW_SIZE = 16385,
        ADDITIONAL_TS_POSSIBLE = 16386,
        IPCOMP_SUPPORTED = 16387,
        NAT_DETECTION_SOURCE_IP = 16388,
        NAT_DETECTION_DESTINATION_IP = 16389,
        COOKIE = 16390,
        USE_TRANSPORT_MODE = 16391,
        HTTP_CERT_LOOKUP_SUPPORTED = 16392,
        REKEY_SA = 16393,
        ESP_TFC_PADDING_NOT_SUPPORTED = 16394,
        NON_FIRST_FRAGMENTS_ALSO = 16395,
        /// RFC 4555.
        MOBIKE_SUPPORTED = 16396,
        /// RFC 4555.
        ADDITIONAL_IP4_ADDRESS = 16397,
        /// RFC 4555.
        ADDITIONAL_IP6_ADDRESS = 16398,
        /// RFC 4555.
        NO_ADDITIONAL_ADDRESSES = 16399,
        /// RFC 4555.
        UPDATE_SA_ADDRESSES = 16400,
        /// RFC 4478.
        AUTH_LIFETIME = 16403,
        /// RFC 4739.
        MULTIPLE_AUTH_SUPPORTED = 16404,
        /// RFC 4739.
        ANOTHER_AUTH_FOLLOWS = 16405,
        /// RFC 5685.
        REDIRECT_SUPPORTED = 16406,
        /// RFC 5998.
        EAP_ONLY_AUTHENTICATION = 16417,
        /// RFC 6023.
        CHILDLESS_IKEV2_SUPPORTED = 16418,
        /// RFC 6311.
        IKEV2_MESSAGE_ID_SYNC_SUPPORTED = 16420,
        /// RFC 7383.
        IKEV2_FRAGMENTATION_SUPPORTED = 16430,
        /// RFC 7427.
        SIGNATURE_HASH_ALGORITHMS = 16431,
        /// RFC 8784.
        USE_PPK = 16435,
        /// RFC 9242.
        INTERMEDIATE_EXCHANGE_SUPPORTED = 16438,
    }
}

impl NotifyType {
    /// Error types (below 16384): RFC 7296 §3.10.1 says an unrecognised
    /// error in a response means the request failed.
    pub fn is_error(self) -> bool {
        self.0 < 16384
    }
}

registry! {
    /// Traffic selector types (RFC 7296 §3.13.1 and IANA).
    TsType(u8) {
        TS_IPV4_ADDR_RANGE = 7,
        TS_IPV6_ADDR_RANGE = 8,
        /// RFC 4595.
        TS_FC_ADDR_RANGE = 9,
        /// RFC 9478.
        TS_SECLABEL = 10,
    }
}

/// Header flags (RFC 7296 §3.1). The other bits must be sent as zero and
/// ignored on receipt; they are kept so that decoding and encoding round-trip.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Flags(pub u8);

impl Flags {
    /// "I": set by the original initiator of the IKE SA.
    pub const INITIATOR: Flags = Flags(0x08);
    /// "V": the sender can speak a higher major version.
    pub const VERSION: Flags = Flags(0x10);
    /// "R": this message is a response.
    pub const RESPONSE: Flags = Flags(0x20);

    pub fn contains(self, other: Flags) -> bool {
        self.0 & other.0 == other.0
    }

    /// The sender is the IKE SA's original initiator.
    pub fn is_initiator(self) -> bool {
        self.contains(Flags::INITIATOR)
    }

    pub fn is_response(self) -> bool {
        self.contains(Flags::RESPONSE)
    }
}

impl std::ops::BitOr for Flags {
    type Output = Flags;
    fn bitor(self, rhs: Flags) -> Flags {
        Flags(self.0 | rhs.0)
    }
}

impl fmt::Debug for Flags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut names = Vec::new();
        for (flag, name) in [
            (Flags::INITIATOR, "I"),
            (Flags::VERSION, "V"),
            (Flags::RESPONSE, "R"),
        ] {
            if self.contains(flag) {
                names.push(name);
            }
        }
        let other = self.0 & !(Flags::INITIATOR.0 | Flags::VERSION.0 | Flags::RESPONSE.0);
        if other != 0 {
            return write!(f, "Flags({}|{other:#04x})", names.join("|"));
        }
        write!(f, "Flags({})", names.join("|"))
    }
}

/// Where in the decoded buffer something went wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    /// Index and type of the payload in its chain; `None` for the IKE header.
    pub payload: Option<(usize, PayloadType)>,
    /// Byte offset from the start of the buffer decoded: the datagram, or for
    /// [`decode_payload_chain`] the decrypted inner chain.
    pub offset: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.payload {
            Some((index, payload_type)) => write!(
                f,
                "payload #{index} ({payload_type}), offset {}",
                self.offset
            ),
            None => write!(f, "header, offset {}", self.offset),
        }
    }
}

/// Why a message (or an inner payload chain) was rejected. Each variant says
/// what and where; [`DecodeError::reason`] gives a short stable label for
/// counters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The buffer ends before a structure does.
    #[error("{what} is cut off at {at}: needs {needed} bytes, {available} left")]
    Truncated {
        what: &'static str,
        at: Location,
        needed: usize,
        available: usize,
    },
    /// A length field holds a value impossible for its structure.
    #[error("{what} has the impossible length {length} at {at}")]
    BadLength {
        what: &'static str,
        length: usize,
        at: Location,
    },
    /// The datagram is longer than the header's Length field says.
    #[error("the header says {header_length} bytes but the datagram has {datagram_length}")]
    TrailingBytes {
        header_length: u32,
        datagram_length: usize,
    },
    /// Not IKE version 2 (major). RFC 7296 §2.5: answer INVALID_MAJOR_VERSION
    /// when `major` is higher, drop silently otherwise.
    #[error("IKE version {major}.{minor} is not 2.x")]
    BadVersion { major: u8, minor: u8 },
    /// A payload this implementation does not understand has its critical bit
    /// set: the whole message must be rejected with an
    /// UNSUPPORTED_CRITICAL_PAYLOAD notify that names the type (RFC 7296 §2.5).
    #[error("unsupported payload type {payload_type} is marked critical at {at}")]
    UnsupportedCritical {
        payload_type: PayloadType,
        at: Location,
    },
    /// More substructures than this implementation accepts.
    #[error("more than {limit} {what} at {at}")]
    TooMany {
        what: &'static str,
        limit: usize,
        at: Location,
    },
    /// A count field disagrees with what follows it.
    #[error("{what}: the count field says {declared} but {found} follow, at {at}")]
    CountMismatch {
        what: &'static str,
        declared: usize,
        found: usize,
        at: Location,
    },
    /// Structurally wrong in another way (described by `what`).
    #[error("{what} at {at}")]
    Malformed { what: &'static str, at: Location },
}

impl DecodeError {
    /// A short, stable label for logs and the `reason` label of counters.
    pub fn reason(&self) -> &'static str {
        match self {
            DecodeError::Truncated { .. } => "truncated",
            DecodeError::BadLength { .. } => "bad_length",
            DecodeError::TrailingBytes { .. } => "trailing_bytes",
            DecodeError::BadVersion { .. } => "bad_version",
            DecodeError::UnsupportedCritical { .. } => "unsupported_critical",
            DecodeError::TooMany { .. } => "too_many",
            DecodeError::CountMismatch { .. } => "bad_count",
            DecodeError::Malformed { .. } => "malformed",
        }
    }

    /// Where the error was found, if it concerns one place.
    pub fn location(&self) -> Option<Location> {
        match self {
            DecodeError::Truncated { at, .. }
            | DecodeError::BadLength { at, .. }
            | DecodeError::UnsupportedCritical { at, .. }
            | DecodeError::TooMany { at, .. }
            | DecodeError::CountMismatch { at, .. }
            | DecodeError::Malformed { at, .. } => Some(*at),
            DecodeError::TrailingBytes { .. } | DecodeError::BadVersion { .. } => None,
        }
    }
}

/// Why a message could not be encoded: values that do not fit their wire
/// fields, or structures this implementation would itself refuse to decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("{what} is {length} bytes, more than the {max} its length field allows")]
    TooLong {
        what: &'static str,
        length: usize,
        max: usize,
    },
    #[error("{count} {what}, more than the {max} allowed")]
    TooMany {
        what: &'static str,
        count: usize,
        max: usize,
    },
    #[error("cannot encode: {0}")]
    Invalid(&'static str),
}

/// Failure of [`Message::encode_encrypted`].
#[derive(Debug, thiserror::Error)]
pub enum SealError<E> {
    #[error(transparent)]
    Encode(#[from] EncodeError),
    /// The sealing closure failed.
    #[error("sealing the SK payload failed: {0}")]
    Seal(E),
    /// The sealing closure appended a body of another length than it
    /// announced, so the header's and SK payload's lengths would be wrong.
    #[error("the SK body is {written} bytes, {announced} were announced")]
    BodyLength { announced: usize, written: usize },
}

/// The IKE header (RFC 7296 §3.1) without its derived fields: Next Payload
/// and Length are computed when encoding and checked when decoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Header {
    /// IKE SA Initiator's SPI.
    pub spi_i: u64,
    /// IKE SA Responder's SPI (zero in the first IKE_SA_INIT request).
    pub spi_r: u64,
    pub exchange: ExchangeType,
    pub flags: Flags,
    pub message_id: u32,
    /// Sent as 0 and ignored on receipt (RFC 7296 §3.1); kept so that a
    /// received header encodes back to the same bytes.
    pub minor_version: u8,
}

impl Header {
    /// A request header. `original_initiator`: we initiated this IKE SA
    /// (sets the I flag).
    pub fn request(
        exchange: ExchangeType,
        spi_i: u64,
        spi_r: u64,
        message_id: u32,
        original_initiator: bool,
    ) -> Header {
        Header {
            spi_i,
            spi_r,
            exchange,
            flags: if original_initiator {
                Flags::INITIATOR
            } else {
                Flags::default()
            },
            message_id,
            minor_version: 0,
        }
    }

    /// The header of the response to this request: same SPIs, exchange and
    /// message ID, R set, and I set exactly when the requester was not the
    /// original initiator (the responder is then the other party). An
    /// IKE_SA_INIT responder then fills in its new `spi_r`.
    pub fn response(&self) -> Header {
        Header {
            spi_i: self.spi_i,
            spi_r: self.spi_r,
            exchange: self.exchange,
            flags: if self.flags.is_initiator() {
                Flags::RESPONSE
            } else {
                Flags::RESPONSE | Flags::INITIATOR
            },
            message_id: self.message_id,
            minor_version: 0,
        }
    }

    /// Reads the 28-byte header at the start of `datagram` and checks the
    /// major version, nothing else: enough to answer a message whose payloads
    /// are rejected (e.g. with UNSUPPORTED_CRITICAL_PAYLOAD or
    /// INVALID_SYNTAX).
    pub fn decode(datagram: &[u8]) -> Result<Header, DecodeError> {
        decode_header(datagram).map(|(header, _, _)| header)
    }

    /// Reads the 28-byte header whatever its major version, which comes
    /// back beside it: what answering a higher version with
    /// INVALID_MAJOR_VERSION needs (RFC 7296 §2.5).
    pub fn decode_any_version(datagram: &[u8]) -> Result<(Header, u8), DecodeError> {
        let (header, _, _, major) = decode_header_fields(datagram)?;
        Ok((header, major))
    }

    /// The 28 header bytes, with the given first payload type and total length.
    pub fn encode(&self, next_payload: PayloadType, length: u32) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[0..8].copy_from_slice(&self.spi_i.to_be_bytes());
        out[8..16].copy_from_slice(&self.spi_r.to_be_bytes());
        out[16] = next_payload.0;
        out[17] = (MAJOR_VERSION << 4) | (self.minor_version & 0x0f);
        out[18] = self.exchange.0;
        out[19] = self.flags.0;
        out[20..24].copy_from_slice(&self.message_id.to_be_bytes());
        out[24..28].copy_from_slice(&length.to_be_bytes());
        out
    }
}

/// Header, first payload type and the Length field; the major version must
/// be 2.
fn decode_header(datagram: &[u8]) -> Result<(Header, PayloadType, u32), DecodeError> {
    let (header, next, length, major) = decode_header_fields(datagram)?;
    if major != MAJOR_VERSION {
        return Err(DecodeError::BadVersion {
            major,
            minor: header.minor_version,
        });
    }
    Ok((header, next, length))
}

/// Header, first payload type, Length field and major version.
fn decode_header_fields(datagram: &[u8]) -> Result<(Header, PayloadType, u32, u8), DecodeError> {
    let mut r = Reader::new(datagram, 0, None);
    let spi_i = r.u64("IKE header")?;
    let spi_r = r.u64("IKE header")?;
    let next = PayloadType(r.u8("IKE header")?);
    let version = r.u8("IKE header")?;
    let exchange = ExchangeType(r.u8("IKE header")?);
    let flags = Flags(r.u8("IKE header")?);
    let message_id = r.u32("IKE header")?;
    let length = r.u32("IKE header")?;
    let (major, minor) = (version >> 4, version & 0x0f);
    let header = Header {
        spi_i,
        spi_r,
        exchange,
        flags,
        message_id,
        minor_version: minor,
    };
    Ok((header, next, length, major))
}

/// One payload of a checked chain, still raw: a slice of the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawPayload<'a> {
    /// Position in its chain (0 = first).
    pub index: usize,
    /// Offset of its generic payload header in the buffer decoded.
    pub offset: usize,
    pub payload_type: PayloadType,
    /// The Next Payload field; for an SK payload, the type of the first
    /// payload inside it.
    pub next_payload: PayloadType,
    pub critical: bool,
    /// The payload without its generic header.
    pub body: &'a [u8],
}

impl RawPayload<'_> {
    fn location(&self) -> Location {
        Location {
            payload: Some((self.index, self.payload_type)),
            offset: self.offset,
        }
    }
}

/// Walks a payload chain starting with `first` over all of `buf`, checking
/// every generic header. `base`: offset of `buf` in what the caller reports.
/// `outer`: the message's own chain, where an SK payload may end the chain;
/// inside SK there is no second SK.
fn walk_chain(
    first: PayloadType,
    buf: &[u8],
    base: usize,
    outer: bool,
) -> Result<Vec<RawPayload<'_>>, DecodeError> {
    let mut payloads = Vec::new();
    let mut next = first;
    let mut pos = 0usize;
    while next != PayloadType::NONE {
        let index = payloads.len();
        let at = Location {
            payload: Some((index, next)),
            offset: base + pos,
        };
        if index == MAX_PAYLOADS {
            return Err(DecodeError::TooMany {
                what: "payloads",
                limit: MAX_PAYLOADS,
                at,
            });
        }
        let available = buf.len().saturating_sub(pos);
        let generic = buf
            .get(pos..pos + GENERIC_HEADER_LEN)
            .ok_or(DecodeError::Truncated {
                what: "generic payload header",
                at,
                needed: GENERIC_HEADER_LEN,
                available,
            })?;
        let following = PayloadType(generic[0]);
        let critical = generic[1] & 0x80 != 0;
        let length = usize::from(u16::from_be_bytes([generic[2], generic[3]]));
        if length < GENERIC_HEADER_LEN {
            return Err(DecodeError::BadLength {
                what: "payload",
                length,
                at,
            });
        }
        let body =
            buf.get(pos + GENERIC_HEADER_LEN..pos + length)
                .ok_or(DecodeError::Truncated {
                    what: "payload",
                    at,
                    needed: length,
                    available,
                })?;
        if critical && !next.is_understood() {
            return Err(DecodeError::UnsupportedCritical {
                payload_type: next,
                at,
            });
        }
        payloads.push(RawPayload {
            index,
            offset: base + pos,
            payload_type: next,
            next_payload: following,
            critical,
            body,
        });
        pos += length;
        if next == PayloadType::SK {
            if !outer {
                return Err(DecodeError::Malformed {
                    what: "an Encrypted payload inside an Encrypted payload",
                    at,
                });
            }
            // RFC 7296 §3.14: the SK payload is the last one; its Next
            // Payload field names the first payload inside it.
            if pos != buf.len() {
                return Err(DecodeError::Malformed {
                    what: "the Encrypted payload is not the last payload",
                    at,
                });
            }
            return Ok(payloads);
        }
        next = following;
    }
    if pos != buf.len() {
        return Err(DecodeError::Malformed {
            what: "bytes follow the last payload",
            at: Location {
                payload: None,
                offset: base + pos,
            },
        });
    }
    Ok(payloads)
}

/// A received IKE message, checked: the header is valid, its length is the
/// datagram's, and the payload chain is well formed (see the module doc).
/// Payload bodies are not yet decoded.
#[derive(Debug, Clone)]
pub struct MessageView<'a> {
    datagram: &'a [u8],
    header: Header,
    first_payload: PayloadType,
    payloads: Vec<RawPayload<'a>>,
}

impl<'a> MessageView<'a> {
    /// Checks `datagram` (without the non-ESP marker) as one IKE message.
    pub fn new_checked(datagram: &'a [u8]) -> Result<MessageView<'a>, DecodeError> {
        let (header, first_payload, length) = decode_header(datagram)?;
        let header_at = Location {
            payload: None,
            offset: 24,
        };
        let declared = usize::try_from(length).unwrap_or(usize::MAX);
        if declared < HEADER_LEN {
            return Err(DecodeError::BadLength {
                what: "IKE message",
                length: declared,
                at: header_at,
            });
        }
        if declared > datagram.len() {
            return Err(DecodeError::Truncated {
                what: "IKE message",
                at: header_at,
                needed: declared,
                available: datagram.len(),
            });
        }
        if declared < datagram.len() {
            return Err(DecodeError::TrailingBytes {
                header_length: length,
                datagram_length: datagram.len(),
            });
        }
        let chain = datagram.get(HEADER_LEN..).unwrap_or_default();
        let payloads = walk_chain(first_payload, chain, HEADER_LEN, true)?;
        Ok(MessageView {
            datagram,
            header,
            first_payload,
            payloads,
        })
    }

    pub fn header(&self) -> Header {
        self.header
    }

    /// The whole message, as received (what RFC 7296 §2.15 signs for the
    /// first messages, and what a retransmission check compares).
    pub fn datagram(&self) -> &'a [u8] {
        self.datagram
    }

    /// The header's Next Payload field.
    pub fn first_payload(&self) -> PayloadType {
        self.first_payload
    }

    /// The payloads of the message's own chain, in order (an SK payload is
    /// one of them, the last).
    pub fn payloads(&self) -> &[RawPayload<'a>] {
        &self.payloads
    }

    /// The SK payload, if the message ends in one.
    pub fn encrypted(&self) -> Option<EncryptedView<'a>> {
        let sk = self.payloads.last()?;
        if sk.payload_type != PayloadType::SK {
            return None;
        }
        Some(EncryptedView {
            datagram: self.datagram,
            body_offset: sk.offset + GENERIC_HEADER_LEN,
            first_inner: sk.next_payload,
        })
    }

    /// Decodes every payload of the message's chain into typed values.
    pub fn decode_payloads(&self) -> Result<Vec<Payload>, DecodeError> {
        self.payloads.iter().map(decode_payload).collect()
    }
}

/// A received SK payload (RFC 7296 §3.14) located in its datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EncryptedView<'a> {
    datagram: &'a [u8],
    body_offset: usize,
    first_inner: PayloadType,
}

impl<'a> EncryptedView<'a> {
    /// The type of the first payload inside (the SK payload's Next Payload).
    pub fn first_inner(&self) -> PayloadType {
        self.first_inner
    }

    /// From the first byte of the IKE header to the last byte of the SK
    /// payload's generic header: the associated data of an AEAD transform
    /// (RFC 5282 §5.1).
    pub fn associated_data(&self) -> &'a [u8] {
        self.datagram.get(..self.body_offset).unwrap_or_default()
    }

    /// IV, ciphertext (with padding and pad length) and ICV, as one slice:
    /// the crypto layer splits it, knowing the transform.
    pub fn body(&self) -> &'a [u8] {
        self.datagram.get(self.body_offset..).unwrap_or_default()
    }

    /// The whole datagram: with a separate integrity transform the checksum
    /// covers everything up to the ICV (RFC 7296 §3.14).
    pub fn datagram(&self) -> &'a [u8] {
        self.datagram
    }

    /// Offset of the body (the IV) in the datagram.
    pub fn body_offset(&self) -> usize {
        self.body_offset
    }
}

/// An IKE message as typed values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub header: Header,
    /// In wire order. An [`Payload::Encrypted`] payload, if any, is last.
    pub payloads: Vec<Payload>,
}

impl Message {
    pub fn new(header: Header, payloads: Vec<Payload>) -> Message {
        Message { header, payloads }
    }

    /// Decodes one datagram (without the non-ESP marker). An SK payload is
    /// kept encrypted; use [`MessageView::encrypted`] to open it.
    pub fn decode(datagram: &[u8]) -> Result<Message, DecodeError> {
        let view = MessageView::new_checked(datagram)?;
        Ok(Message {
            header: view.header(),
            payloads: view.decode_payloads()?,
        })
    }

    /// Encodes the message with Next Payload and every length computed.
    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(&[0u8; HEADER_LEN]);
        let first = encode_chain_into(&self.payloads, &mut out)?;
        let length = u32::try_from(out.len()).map_err(|_| EncodeError::TooLong {
            what: "IKE message",
            length: out.len(),
            max: u32::MAX as usize,
        })?;
        out[..HEADER_LEN].copy_from_slice(&self.header.encode(first, length));
        Ok(out)
    }

    /// Builds a message whose payloads all travel inside an SK payload.
    ///
    /// `inner` is encoded as a chain (the plaintext). `body_len` is told the
    /// plaintext's length and returns how long the SK body will be (IV,
    /// padded ciphertext, ICV) so that the lengths in the header and the SK
    /// generic header, which are part of the authenticated data, are right
    /// before sealing. `seal` then receives the message so far (header and
    /// SK generic header: the AEAD associated data of RFC 5282 §5.1) and the
    /// plaintext, and must append exactly that many bytes; with a separate
    /// integrity transform it appends IV and ciphertext, computes the ICV
    /// over the buffer and appends it.
    pub fn encode_encrypted<E>(
        header: &Header,
        inner: &[Payload],
        body_len: impl FnOnce(usize) -> usize,
        seal: impl FnOnce(&mut Vec<u8>, &[u8]) -> Result<(), E>,
    ) -> Result<Vec<u8>, SealError<E>> {
        let (first_inner, plaintext) = encode_payload_chain(inner)?;
        let announced = body_len(plaintext.len());
        let mut out = encode_sk_prefix(header, first_inner, announced)?;
        let prefix_len = out.len();
        seal(&mut out, &plaintext).map_err(SealError::Seal)?;
        let written = out.len() - prefix_len;
        if written != announced {
            return Err(SealError::BodyLength { announced, written });
        }
        Ok(out)
    }
}

/// The IKE header and the SK payload's generic header of a message whose
/// only payload is an SK payload with a body of `sk_body_len` bytes and
/// `first_inner` as its first inner payload type: the AEAD associated data
/// (RFC 5282 §5.1). Append the body to complete the message.
pub fn encode_sk_prefix(
    header: &Header,
    first_inner: PayloadType,
    sk_body_len: usize,
) -> Result<Vec<u8>, EncodeError> {
    let payload_len = GENERIC_HEADER_LEN + sk_body_len;
    let payload_len16 = u16::try_from(payload_len).map_err(|_| EncodeError::TooLong {
        what: "Encrypted payload",
        length: payload_len,
        max: usize::from(u16::MAX),
    })?;
    // Cannot overflow: payload_len fits in 16 bits.
    let total = (HEADER_LEN + payload_len) as u32;
    let mut out = Vec::with_capacity(HEADER_LEN + payload_len);
    out.extend_from_slice(&header.encode(PayloadType::SK, total));
    out.push(first_inner.0);
    out.push(0);
    out.extend_from_slice(&payload_len16.to_be_bytes());
    Ok(out)
}

/// Decodes a payload chain that is not in a message of its own: the
/// decrypted content of an SK payload (padding already removed), whose first
/// type is [`EncryptedView::first_inner`]. Offsets in errors are relative to
/// `plaintext`.
pub fn decode_payload_chain(
    first: PayloadType,
    plaintext: &[u8],
) -> Result<Vec<Payload>, DecodeError> {
    walk_chain(first, plaintext, 0, false)?
        .iter()
        .map(decode_payload)
        .collect()
}

/// Encodes payloads as a chain: the first payload's type (the SK payload's
/// Next Payload field) and the bytes (the plaintext to encrypt).
pub fn encode_payload_chain(payloads: &[Payload]) -> Result<(PayloadType, Vec<u8>), EncodeError> {
    let mut out = Vec::with_capacity(256);
    let first = encode_chain_into(payloads, &mut out)?;
    Ok((first, out))
}

fn encode_chain_into(payloads: &[Payload], out: &mut Vec<u8>) -> Result<PayloadType, EncodeError> {
    if payloads.len() > MAX_PAYLOADS {
        return Err(EncodeError::TooMany {
            what: "payloads",
            count: payloads.len(),
            max: MAX_PAYLOADS,
        });
    }
    for (i, payload) in payloads.iter().enumerate() {
        let next = match payload {
            Payload::Encrypted(sk) => {
                if i + 1 != payloads.len() {
                    return Err(EncodeError::Invalid(
                        "the Encrypted payload must be the last payload",
                    ));
                }
                sk.first_inner
            }
            _ => payloads
                .get(i + 1)
                .map_or(PayloadType::NONE, Payload::payload_type),
        };
        let start = out.len();
        out.push(next.0);
        out.push(match payload {
            Payload::Unknown(u) if u.critical => 0x80,
            _ => 0,
        });
        out.extend_from_slice(&[0, 0]);
        payload.encode_body(out)?;
        patch_len16(out, start, 2, "payload")?;
    }
    Ok(payloads
        .first()
        .map_or(PayloadType::NONE, Payload::payload_type))
}

/// Writes the length of the structure that starts at `start` (up to the end
/// of `out`) into its 16-bit length field at `start + field`.
fn patch_len16(
    out: &mut [u8],
    start: usize,
    field: usize,
    what: &'static str,
) -> Result<(), EncodeError> {
    let length = out.len() - start;
    let value = u16::try_from(length).map_err(|_| EncodeError::TooLong {
        what,
        length,
        max: usize::from(u16::MAX),
    })?;
    if let Some(slot) = out.get_mut(start + field..start + field + 2) {
        slot.copy_from_slice(&value.to_be_bytes());
    }
    Ok(())
}

fn u8_len(length: usize, what: &'static str) -> Result<u8, EncodeError> {
    u8::try_from(length).map_err(|_| EncodeError::TooLong {
        what,
        length,
        max: usize::from(u8::MAX),
    })
}

/// A payload, typed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    Sa(SaPayload),
    Ke(KePayload),
    IdI(IdPayload),
    IdR(IdPayload),
    Cert(CertPayload),
    CertReq(CertPayload),
    Auth(AuthPayload),
    /// Nonce data (16 to 256 bytes by RFC 7296 §3.9; the engine checks).
    Nonce(Vec<u8>),
    Notify(NotifyPayload),
    Delete(DeletePayload),
    VendorId(Vec<u8>),
    TsI(TsPayload),
    TsR(TsPayload),
    Encrypted(EncryptedPayload),
    /// Configuration payload body, not interpreted.
    Config(Vec<u8>),
    /// EAP message, not interpreted.
    Eap(Vec<u8>),
    Unknown(UnknownPayload),
}

impl Payload {
    pub fn payload_type(&self) -> PayloadType {
        match self {
            Payload::Sa(_) => PayloadType::SA,
            Payload::Ke(_) => PayloadType::KE,
            Payload::IdI(_) => PayloadType::IDI,
            Payload::IdR(_) => PayloadType::IDR,
            Payload::Cert(_) => PayloadType::CERT,
            Payload::CertReq(_) => PayloadType::CERTREQ,
            Payload::Auth(_) => PayloadType::AUTH,
            Payload::Nonce(_) => PayloadType::NONCE,
            Payload::Notify(_) => PayloadType::NOTIFY,
            Payload::Delete(_) => PayloadType::DELETE,
            Payload::VendorId(_) => PayloadType::VENDOR_ID,
            Payload::TsI(_) => PayloadType::TSI,
            Payload::TsR(_) => PayloadType::TSR,
            Payload::Encrypted(_) => PayloadType::SK,
            Payload::Config(_) => PayloadType::CP,
            Payload::Eap(_) => PayloadType::EAP,
            Payload::Unknown(u) => u.payload_type,
        }
    }

    /// Appends the payload without its generic header.
    fn encode_body(&self, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        match self {
            Payload::Sa(sa) => sa.encode_body(out)?,
            Payload::Ke(ke) => {
                out.extend_from_slice(&ke.group.to_be_bytes());
                out.extend_from_slice(&[0, 0]);
                out.extend_from_slice(&ke.data);
            }
            Payload::IdI(id) | Payload::IdR(id) => id.encode_body(out),
            Payload::Cert(cert) | Payload::CertReq(cert) => {
                out.push(cert.encoding.0);
                out.extend_from_slice(&cert.data);
            }
            Payload::Auth(auth) => {
                out.push(auth.method.0);
                out.extend_from_slice(&[0, 0, 0]);
                out.extend_from_slice(&auth.data);
            }
            Payload::Nonce(data)
            | Payload::VendorId(data)
            | Payload::Config(data)
            | Payload::Eap(data) => out.extend_from_slice(data),
            Payload::Notify(n) => n.encode_body(out)?,
            Payload::Delete(d) => d.encode_body(out)?,
            Payload::TsI(ts) | Payload::TsR(ts) => ts.encode_body(out)?,
            Payload::Encrypted(sk) => out.extend_from_slice(&sk.body),
            Payload::Unknown(u) => out.extend_from_slice(&u.body),
        }
        Ok(())
    }
}

fn decode_payload(raw: &RawPayload<'_>) -> Result<Payload, DecodeError> {
    let at = raw.location();
    let mut r = Reader::new(
        raw.body,
        raw.offset + GENERIC_HEADER_LEN,
        Some((raw.index, raw.payload_type)),
    );
    let payload = match raw.payload_type {
        PayloadType::SA => Payload::Sa(SaPayload::decode(&mut r)?),
        PayloadType::KE => {
            let group = r.u16("KE payload")?;
            r.u16("KE payload")?;
            Payload::Ke(KePayload {
                group,
                data: r.rest().to_vec(),
            })
        }
        PayloadType::IDI => Payload::IdI(IdPayload::decode(&mut r)?),
        PayloadType::IDR => Payload::IdR(IdPayload::decode(&mut r)?),
        PayloadType::CERT => Payload::Cert(CertPayload::decode(&mut r)?),
        PayloadType::CERTREQ => Payload::CertReq(CertPayload::decode(&mut r)?),
        PayloadType::AUTH => {
            let method = AuthMethod(r.u8("AUTH payload")?);
            r.take(3, "AUTH payload")?;
            Payload::Auth(AuthPayload {
                method,
                data: r.rest().to_vec(),
            })
        }
        PayloadType::NONCE => Payload::Nonce(r.rest().to_vec()),
        PayloadType::NOTIFY => Payload::Notify(NotifyPayload::decode(&mut r)?),
        PayloadType::DELETE => Payload::Delete(DeletePayload::decode(&mut r)?),
        PayloadType::VENDOR_ID => Payload::VendorId(r.rest().to_vec()),
        PayloadType::TSI => Payload::TsI(TsPayload::decode(&mut r)?),
        PayloadType::TSR => Payload::TsR(TsPayload::decode(&mut r)?),
        PayloadType::SK => Payload::Encrypted(EncryptedPayload {
            first_inner: raw.next_payload,
            body: r.rest().to_vec(),
        }),
        PayloadType::CP => Payload::Config(r.rest().to_vec()),
        PayloadType::EAP => Payload::Eap(r.rest().to_vec()),
        other => Payload::Unknown(UnknownPayload {
            payload_type: other,
            critical: raw.critical,
            body: r.rest().to_vec(),
        }),
    };
    if r.remaining() != 0 {
        return Err(DecodeError::Malformed {
            what: "bytes follow the payload's content",
            at,
        });
    }
    Ok(payload)
}

/// Security Association payload (RFC 7296 §3.3).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SaPayload {
    pub proposals: Vec<Proposal>,
}

/// One proposal substructure: a protocol, its SPI, and transforms. Several
/// transforms of one type are alternatives; the responder picks one of each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proposal {
    /// 1 for the first proposal, one more for each next (RFC 7296 §3.3.1);
    /// a responder echoes the number of the proposal it accepts.
    pub number: u8,
    pub protocol: ProtocolId,
    /// The sender's SPI: empty in IKE_SA_INIT, 8 bytes when rekeying the
    /// IKE SA, 4 bytes for ESP and AH.
    pub spi: Vec<u8>,
    pub transforms: Vec<Transform>,
}

/// One transform substructure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transform {
    pub transform_type: TransformType,
    /// Transform ID in the registry of its type.
    pub id: u16,
    pub attributes: Vec<Attribute>,
}

impl Transform {
    /// A transform without attributes.
    pub fn new(transform_type: TransformType, id: u16) -> Transform {
        Transform {
            transform_type,
            id,
            attributes: Vec::new(),
        }
    }

    /// A transform with a Key Length attribute (bits), as AES needs.
    pub fn with_key_length(transform_type: TransformType, id: u16, bits: u16) -> Transform {
        Transform {
            transform_type,
            id,
            attributes: vec![Attribute {
                attribute_type: ATTRIBUTE_KEY_LENGTH,
                value: AttributeValue::Tv(bits),
            }],
        }
    }

    /// The Key Length attribute in bits, if the transform has one (in TV
    /// format, the only one RFC 7296 §3.3.5 allows).
    pub fn key_length(&self) -> Option<u16> {
        self.attributes.iter().find_map(|a| match a.value {
            AttributeValue::Tv(bits) if a.attribute_type == ATTRIBUTE_KEY_LENGTH => Some(bits),
            _ => None,
        })
    }
}

/// A transform attribute (RFC 7296 §3.3.5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attribute {
    /// 15 bits.
    pub attribute_type: u16,
    pub value: AttributeValue,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttributeValue {
    /// Type/Value format: a 2-byte value in place of the length.
    Tv(u16),
    /// Type/Length/Value format.
    Tlv(Vec<u8>),
}

impl SaPayload {
    fn decode(r: &mut Reader<'_>) -> Result<SaPayload, DecodeError> {
        let mut proposals = Vec::new();
        while r.remaining() > 0 {
            if proposals.len() == MAX_PROPOSALS {
                return Err(DecodeError::TooMany {
                    what: "proposals",
                    limit: MAX_PROPOSALS,
                    at: r.at(),
                });
            }
            let at = r.at();
            let last = r.u8("proposal")?;
            r.u8("proposal")?;
            let length = usize::from(r.u16("proposal")?);
            if length < PROPOSAL_FIXED_LEN {
                return Err(DecodeError::BadLength {
                    what: "proposal",
                    length,
                    at,
                });
            }
            let mut p = r.sub(length - 4, "proposal")?;
            expect_marker(last, r.remaining() == 0, &PROPOSAL_MARKERS, at)?;
            proposals.push(Proposal::decode(&mut p, at)?);
        }
        Ok(SaPayload { proposals })
    }

    fn encode_body(&self, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        if self.proposals.len() > MAX_PROPOSALS {
            return Err(EncodeError::TooMany {
                what: "proposals",
                count: self.proposals.len(),
                max: MAX_PROPOSALS,
            });
        }
        for (i, p) in self.proposals.iter().enumerate() {
            let more = i + 1 < self.proposals.len();
            p.encode(out, more)?;
        }
        Ok(())
    }
}

/// Checks a "last substructure" marker: 0 on the last one, `more` otherwise.
fn expect_marker(
    marker: u8,
    is_last: bool,
    markers: &Markers,
    at: Location,
) -> Result<(), DecodeError> {
    match (is_last, marker) {
        (true, LAST) => Ok(()),
        (false, m) if m == markers.more => Ok(()),
        (true, _) => Err(DecodeError::Malformed {
            what: markers.last_unmarked,
            at,
        }),
        (false, _) => Err(DecodeError::Malformed {
            what: markers.more_unmarked,
            at,
        }),
    }
}

impl Proposal {
    /// `r` holds the proposal after its length field.
    fn decode(r: &mut Reader<'_>, at: Location) -> Result<Proposal, DecodeError> {
        let number = r.u8("proposal")?;
        let protocol = ProtocolId(r.u8("proposal")?);
        let spi_size = usize::from(r.u8("proposal")?);
        let declared = usize::from(r.u8("proposal")?);
        if declared > MAX_TRANSFORMS {
            return Err(DecodeError::TooMany {
                what: "transforms in a proposal",
                limit: MAX_TRANSFORMS,
                at,
            });
        }
        let spi = r.declared(spi_size, "proposal SPI")?.to_vec();
        let mut transforms = Vec::with_capacity(declared);
        while r.remaining() > 0 {
            let t_at = r.at();
            if transforms.len() == declared {
                return Err(DecodeError::CountMismatch {
                    what: "transforms in a proposal",
                    declared,
                    found: transforms.len() + 1,
                    at: t_at,
                });
            }
            let last = r.u8("transform")?;
            r.u8("transform")?;
            let length = usize::from(r.u16("transform")?);
            if length < TRANSFORM_FIXED_LEN {
                return Err(DecodeError::BadLength {
                    what: "transform",
                    length,
                    at: t_at,
                });
            }
            let mut t = r.sub(length - 4, "transform")?;
            expect_marker(last, r.remaining() == 0, &TRANSFORM_MARKERS, t_at)?;
            transforms.push(Transform::decode(&mut t)?);
        }
        if transforms.len() != declared {
            return Err(DecodeError::CountMismatch {
                what: "transforms in a proposal",
                declared,
                found: transforms.len(),
                at,
            });
        }
        Ok(Proposal {
            number,
            protocol,
            spi,
            transforms,
        })
    }

    fn encode(&self, out: &mut Vec<u8>, more: bool) -> Result<(), EncodeError> {
        if self.transforms.len() > MAX_TRANSFORMS {
            return Err(EncodeError::TooMany {
                what: "transforms in a proposal",
                count: self.transforms.len(),
                max: MAX_TRANSFORMS,
            });
        }
        let start = out.len();
        out.push(if more { PROPOSAL_MARKERS.more } else { LAST });
        out.extend_from_slice(&[0, 0, 0]);
        out.push(self.number);
        out.push(self.protocol.0);
        out.push(u8_len(self.spi.len(), "proposal SPI")?);
        // Cannot fail: at most MAX_TRANSFORMS.
        out.push(self.transforms.len() as u8);
        out.extend_from_slice(&self.spi);
        for (i, t) in self.transforms.iter().enumerate() {
            t.encode(out, i + 1 < self.transforms.len())?;
        }
        patch_len16(out, start, 2, "proposal")
    }
}

impl Transform {
    /// `r` holds the transform after its length field.
    fn decode(r: &mut Reader<'_>) -> Result<Transform, DecodeError> {
        let transform_type = TransformType(r.u8("transform")?);
        r.u8("transform")?;
        let id = r.u16("transform")?;
        let mut attributes = Vec::new();
        while r.remaining() > 0 {
            let at = r.at();
            if attributes.len() == MAX_ATTRIBUTES {
                return Err(DecodeError::TooMany {
                    what: "attributes in a transform",
                    limit: MAX_ATTRIBUTES,
                    at,
                });
            }
            let word = r.u16("transform attribute")?;
            let attribute_type = word & !ATTRIBUTE_FORMAT_TV;
            let value = if word & ATTRIBUTE_FORMAT_TV != 0 {
                AttributeValue::Tv(r.u16("transform attribute")?)
            } else {
                let length = usize::from(r.u16("transform attribute")?);
                AttributeValue::Tlv(r.declared(length, "transform attribute value")?.to_vec())
            };
            attributes.push(Attribute {
                attribute_type,
                value,
            });
        }
        Ok(Transform {
            transform_type,
            id,
            attributes,
        })
    }

    fn encode(&self, out: &mut Vec<u8>, more: bool) -> Result<(), EncodeError> {
        if self.attributes.len() > MAX_ATTRIBUTES {
            return Err(EncodeError::TooMany {
                what: "attributes in a transform",
                count: self.attributes.len(),
                max: MAX_ATTRIBUTES,
            });
        }
        let start = out.len();
        out.push(if more { TRANSFORM_MARKERS.more } else { LAST });
        out.extend_from_slice(&[0, 0, 0]);
        out.push(self.transform_type.0);
        out.push(0);
        out.extend_from_slice(&self.id.to_be_bytes());
        for a in &self.attributes {
            if a.attribute_type & ATTRIBUTE_FORMAT_TV != 0 {
                return Err(EncodeError::Invalid(
                    "a transform attribute type does not fit in 15 bits",
                ));
            }
            match &a.value {
                AttributeValue::Tv(value) => {
                    out.extend_from_slice(&(a.attribute_type | ATTRIBUTE_FORMAT_TV).to_be_bytes());
                    out.extend_from_slice(&value.to_be_bytes());
                }
                AttributeValue::Tlv(value) => {
                    let length = u16::try_from(value.len()).map_err(|_| EncodeError::TooLong {
                        what: "transform attribute",
                        length: value.len(),
                        max: usize::from(u16::MAX),
                    })?;
                    out.extend_from_slice(&a.attribute_type.to_be_bytes());
                    out.extend_from_slice(&length.to_be_bytes());
                    out.extend_from_slice(value);
                }
            }
        }
        patch_len16(out, start, 2, "transform")
    }
}

/// Key Exchange payload (RFC 7296 §3.4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KePayload {
    /// Diffie-Hellman group number (the DH transform ID).
    pub group: u16,
    pub data: Vec<u8>,
}

/// Identification payload, IDi or IDr (RFC 7296 §3.5). The data is kept as
/// sent; [`IdPayload::ip_addr`] reads the address types.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdPayload {
    pub id_type: IdType,
    pub data: Vec<u8>,
}

impl IdPayload {
    fn decode(r: &mut Reader<'_>) -> Result<IdPayload, DecodeError> {
        let id_type = IdType(r.u8("ID payload")?);
        r.take(3, "ID payload")?;
        Ok(IdPayload {
            id_type,
            data: r.rest().to_vec(),
        })
    }

    fn encode_body(&self, out: &mut Vec<u8>) {
        out.push(self.id_type.0);
        out.extend_from_slice(&[0, 0, 0]);
        out.extend_from_slice(&self.data);
    }

    /// The payload without its generic header (ID type, the three reserved
    /// bytes, the data): what RFC 7296 §2.15 feeds to the PRF as
    /// `RestOfInitIDPayload` / `RestOfRespIDPayload` when computing AUTH.
    /// Reserved bytes are zero, as the sender must send them.
    pub fn body_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(4 + self.data.len());
        self.encode_body(&mut out);
        out
    }

    /// The address of an ID_IPV4_ADDR or ID_IPV6_ADDR identity.
    pub fn ip_addr(&self) -> Option<IpAddr> {
        match self.id_type {
            IdType::IPV4_ADDR => <[u8; 4]>::try_from(self.data.as_slice())
                .ok()
                .map(|b| IpAddr::V4(Ipv4Addr::from(b))),
            IdType::IPV6_ADDR => <[u8; 16]>::try_from(self.data.as_slice())
                .ok()
                .map(|b| IpAddr::V6(Ipv6Addr::from(b))),
            _ => None,
        }
    }

    /// An ID_IPV4_ADDR or ID_IPV6_ADDR identity.
    pub fn from_ip(addr: IpAddr) -> IdPayload {
        match addr {
            IpAddr::V4(a) => IdPayload {
                id_type: IdType::IPV4_ADDR,
                data: a.octets().to_vec(),
            },
            IpAddr::V6(a) => IdPayload {
                id_type: IdType::IPV6_ADDR,
                data: a.octets().to_vec(),
            },
        }
    }
}

/// Certificate or Certificate Request payload (RFC 7296 §3.6, §3.7): the
/// encoding and its data (a certificate, or concatenated CA key hashes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertPayload {
    pub encoding: CertEncoding,
    pub data: Vec<u8>,
}

impl CertPayload {
    fn decode(r: &mut Reader<'_>) -> Result<CertPayload, DecodeError> {
        let encoding = CertEncoding(r.u8("certificate payload")?);
        Ok(CertPayload {
            encoding,
            data: r.rest().to_vec(),
        })
    }
}

/// Authentication payload (RFC 7296 §3.8).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthPayload {
    pub method: AuthMethod,
    pub data: Vec<u8>,
}

/// Notify payload (RFC 7296 §3.10).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotifyPayload {
    /// The SA's protocol when `spi` names one, else [`ProtocolId::NONE`].
    pub protocol: ProtocolId,
    pub spi: Vec<u8>,
    pub notify_type: NotifyType,
    pub data: Vec<u8>,
}

impl NotifyPayload {
    /// A notify about no particular SA.
    pub fn new(notify_type: NotifyType, data: Vec<u8>) -> NotifyPayload {
        NotifyPayload {
            protocol: ProtocolId::NONE,
            spi: Vec::new(),
            notify_type,
            data,
        }
    }

    /// INVALID_KE_PAYLOAD: the DH group the responder wants (RFC 7296 §1.3).
    pub fn invalid_ke(group: u16) -> NotifyPayload {
        NotifyPayload::new(NotifyType::INVALID_KE_PAYLOAD, group.to_be_bytes().to_vec())
    }

    /// The group of an INVALID_KE_PAYLOAD notify.
    pub fn invalid_ke_group(&self) -> Option<u16> {
        if self.notify_type != NotifyType::INVALID_KE_PAYLOAD {
            return None;
        }
        <[u8; 2]>::try_from(self.data.as_slice())
            .ok()
            .map(u16::from_be_bytes)
    }

    /// UNSUPPORTED_CRITICAL_PAYLOAD naming the payload type (RFC 7296 §2.5).
    pub fn unsupported_critical(payload_type: PayloadType) -> NotifyPayload {
        NotifyPayload::new(
            NotifyType::UNSUPPORTED_CRITICAL_PAYLOAD,
            vec![payload_type.0],
        )
    }

    /// COOKIE (RFC 7296 §2.6).
    pub fn cookie(data: Vec<u8>) -> NotifyPayload {
        NotifyPayload::new(NotifyType::COOKIE, data)
    }

    /// REKEY_SA naming the ESP SA being rekeyed by its inbound SPI (RFC 7296
    /// §1.3.3).
    pub fn rekey_esp(spi: u32) -> NotifyPayload {
        NotifyPayload {
            protocol: ProtocolId::ESP,
            spi: spi.to_be_bytes().to_vec(),
            notify_type: NotifyType::REKEY_SA,
            data: Vec::new(),
        }
    }

    /// SIGNATURE_HASH_ALGORITHMS listing hash algorithm IDs (RFC 7427 §4).
    pub fn signature_hash_algorithms(ids: &[u16]) -> NotifyPayload {
        let data = ids.iter().flat_map(|id| id.to_be_bytes()).collect();
        NotifyPayload::new(NotifyType::SIGNATURE_HASH_ALGORITHMS, data)
    }

    /// NAT_DETECTION_SOURCE_IP for the address and port we send from
    /// (RFC 7296 §2.23).
    pub fn nat_detection_source(spi_i: u64, spi_r: u64, addr: SocketAddr) -> NotifyPayload {
        NotifyPayload::new(
            NotifyType::NAT_DETECTION_SOURCE_IP,
            nat_detection_hash(spi_i, spi_r, addr).to_vec(),
        )
    }

    /// NAT_DETECTION_DESTINATION_IP for the address and port we send to.
    pub fn nat_detection_destination(spi_i: u64, spi_r: u64, addr: SocketAddr) -> NotifyPayload {
        NotifyPayload::new(
            NotifyType::NAT_DETECTION_DESTINATION_IP,
            nat_detection_hash(spi_i, spi_r, addr).to_vec(),
        )
    }

    /// The SPI as an ESP/AH SPI, when it is 4 bytes.
    pub fn spi_u32(&self) -> Option<u32> {
        <[u8; 4]>::try_from(self.spi.as_slice())
            .ok()
            .map(u32::from_be_bytes)
    }

    fn decode(r: &mut Reader<'_>) -> Result<NotifyPayload, DecodeError> {
        let protocol = ProtocolId(r.u8("Notify payload")?);
        let spi_size = usize::from(r.u8("Notify payload")?);
        let notify_type = NotifyType(r.u16("Notify payload")?);
        let spi = r.declared(spi_size, "Notify SPI")?.to_vec();
        Ok(NotifyPayload {
            protocol,
            spi,
            notify_type,
            data: r.rest().to_vec(),
        })
    }

    fn encode_body(&self, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        out.push(self.protocol.0);
        out.push(u8_len(self.spi.len(), "Notify SPI")?);
        out.extend_from_slice(&self.notify_type.0.to_be_bytes());
        out.extend_from_slice(&self.spi);
        out.extend_from_slice(&self.data);
        Ok(())
    }
}

/// The NAT detection hash input of RFC 7296 §2.23:
/// `SPIi | SPIr | IP address | port` (the SPIs as in the header, SPIr zero
/// in the first IKE_SA_INIT request; the address 4 or 16 bytes as it is on
/// the wire, so pass IPv4 as `V4`, not as an IPv4-mapped IPv6 address).
pub fn nat_detection_data(spi_i: u64, spi_r: u64, addr: SocketAddr) -> Vec<u8> {
    let mut data = Vec::with_capacity(8 + 8 + 16 + 2);
    data.extend_from_slice(&spi_i.to_be_bytes());
    data.extend_from_slice(&spi_r.to_be_bytes());
    match addr.ip() {
        IpAddr::V4(a) => data.extend_from_slice(&a.octets()),
        IpAddr::V6(a) => data.extend_from_slice(&a.octets()),
    }
    data.extend_from_slice(&addr.port().to_be_bytes());
    data
}

/// SHA-1 of [`nat_detection_data`]: the data of the NAT_DETECTION_*_IP
/// notifies. SHA-1 is what the RFC fixes here; it is not used for security.
pub fn nat_detection_hash(spi_i: u64, spi_r: u64, addr: SocketAddr) -> [u8; 20] {
    let digest = ring::digest::digest(
        &ring::digest::SHA1_FOR_LEGACY_USE_ONLY,
        &nat_detection_data(spi_i, spi_r, addr),
    );
    let mut out = [0u8; 20];
    out.copy_from_slice(digest.as_ref());
    out
}

/// Delete payload (RFC 7296 §3.11).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeletePayload {
    pub protocol: ProtocolId,
    /// Bytes per SPI: 0 for IKE (the SA of the message itself), 4 for ESP.
    /// Kept apart from `spis` because the field is on the wire even when no
    /// SPI follows.
    pub spi_size: u8,
    /// Each exactly `spi_size` bytes.
    pub spis: Vec<Vec<u8>>,
}

impl DeletePayload {
    /// Deletes the IKE SA the message belongs to (and its Child SAs).
    pub fn ike() -> DeletePayload {
        DeletePayload {
            protocol: ProtocolId::IKE,
            spi_size: 0,
            spis: Vec::new(),
        }
    }

    /// Deletes ESP SAs named by the sender's inbound SPIs.
    pub fn esp(spis: &[u32]) -> DeletePayload {
        DeletePayload {
            protocol: ProtocolId::ESP,
            spi_size: 4,
            spis: spis.iter().map(|s| s.to_be_bytes().to_vec()).collect(),
        }
    }

    /// The SPIs as 32-bit values, when they are 4 bytes each.
    pub fn spis_u32(&self) -> Option<Vec<u32>> {
        self.spis
            .iter()
            .map(|s| {
                <[u8; 4]>::try_from(s.as_slice())
                    .ok()
                    .map(u32::from_be_bytes)
            })
            .collect()
    }

    fn decode(r: &mut Reader<'_>) -> Result<DeletePayload, DecodeError> {
        let at = r.at();
        let protocol = ProtocolId(r.u8("Delete payload")?);
        let spi_size = r.u8("Delete payload")?;
        let declared = usize::from(r.u16("Delete payload")?);
        let size = usize::from(spi_size);
        // The count times the size must be what is left: checked before
        // allocating, so a 4-byte payload cannot ask for 65535 SPIs.
        if size == 0 {
            if declared != 0 || r.remaining() != 0 {
                return Err(DecodeError::Malformed {
                    what: "a Delete payload with SPI size 0 lists SPIs",
                    at,
                });
            }
        } else if declared.checked_mul(size) != Some(r.remaining()) {
            return Err(DecodeError::CountMismatch {
                what: "SPIs in a Delete payload",
                declared,
                found: r.remaining() / size,
                at,
            });
        }
        let mut spis = Vec::with_capacity(declared);
        for _ in 0..declared {
            spis.push(r.take(size, "Delete SPI")?.to_vec());
        }
        Ok(DeletePayload {
            protocol,
            spi_size,
            spis,
        })
    }

    fn encode_body(&self, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        if self
            .spis
            .iter()
            .any(|s| s.len() != usize::from(self.spi_size))
        {
            return Err(EncodeError::Invalid(
                "a Delete payload's SPI differs from its SPI size",
            ));
        }
        let count = u16::try_from(self.spis.len()).map_err(|_| EncodeError::TooMany {
            what: "SPIs in a Delete payload",
            count: self.spis.len(),
            max: usize::from(u16::MAX),
        })?;
        out.push(self.protocol.0);
        out.push(self.spi_size);
        out.extend_from_slice(&count.to_be_bytes());
        for spi in &self.spis {
            out.extend_from_slice(spi);
        }
        Ok(())
    }
}

/// Traffic Selector payload, TSi or TSr (RFC 7296 §3.13).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TsPayload {
    /// At most 255 (the count field is one byte).
    pub selectors: Vec<TrafficSelector>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrafficSelector {
    /// TS_IPV4_ADDR_RANGE or TS_IPV6_ADDR_RANGE, by the address family.
    Range(TsRange),
    /// Another selector type, kept raw.
    Unknown {
        ts_type: TsType,
        /// The byte after the type (the IP protocol in the range types).
        byte1: u8,
        /// The selector after its 4-byte type/byte/length header.
        data: Vec<u8>,
    },
}

/// An address-range selector: IP protocol (0 = any), inclusive port range
/// (0–65535 = any; ICMP type and code in the two bytes of each port for
/// ICMP, RFC 4301 §4.4.1.1), inclusive address range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TsRange {
    pub ip_protocol: u8,
    pub start_port: u16,
    pub end_port: u16,
    pub addresses: AddressRange,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AddressRange {
    V4 { start: Ipv4Addr, end: Ipv4Addr },
    V6 { start: Ipv6Addr, end: Ipv6Addr },
}

impl AddressRange {
    pub fn start(&self) -> IpAddr {
        match *self {
            AddressRange::V4 { start, .. } => IpAddr::V4(start),
            AddressRange::V6 { start, .. } => IpAddr::V6(start),
        }
    }

    pub fn end(&self) -> IpAddr {
        match *self {
            AddressRange::V4 { end, .. } => IpAddr::V4(end),
            AddressRange::V6 { end, .. } => IpAddr::V6(end),
        }
    }
}

impl TsRange {
    /// Every protocol and port of one host.
    pub fn host(addr: IpAddr) -> TsRange {
        TsRange {
            ip_protocol: 0,
            start_port: 0,
            end_port: u16::MAX,
            addresses: match addr {
                IpAddr::V4(a) => AddressRange::V4 { start: a, end: a },
                IpAddr::V6(a) => AddressRange::V6 { start: a, end: a },
            },
        }
    }

    pub fn ts_type(&self) -> TsType {
        match self.addresses {
            AddressRange::V4 { .. } => TsType::TS_IPV4_ADDR_RANGE,
            AddressRange::V6 { .. } => TsType::TS_IPV6_ADDR_RANGE,
        }
    }
}

impl TsPayload {
    fn decode(r: &mut Reader<'_>) -> Result<TsPayload, DecodeError> {
        let at = r.at();
        let declared = usize::from(r.u8("TS payload")?);
        r.take(3, "TS payload")?;
        let mut selectors = Vec::with_capacity(declared);
        while r.remaining() > 0 {
            let s_at = r.at();
            if selectors.len() == declared {
                return Err(DecodeError::CountMismatch {
                    what: "traffic selectors",
                    declared,
                    found: selectors.len() + 1,
                    at: s_at,
                });
            }
            let ts_type = TsType(r.u8("traffic selector")?);
            let byte1 = r.u8("traffic selector")?;
            let length = usize::from(r.u16("traffic selector")?);
            let expected = match ts_type {
                TsType::TS_IPV4_ADDR_RANGE => Some(TS_IPV4_LEN),
                TsType::TS_IPV6_ADDR_RANGE => Some(TS_IPV6_LEN),
                _ => None,
            };
            if length < 4 || expected.is_some_and(|e| e != length) {
                return Err(DecodeError::BadLength {
                    what: "traffic selector",
                    length,
                    at: s_at,
                });
            }
            let mut s = r.sub(length - 4, "traffic selector")?;
            let selector = match ts_type {
                TsType::TS_IPV4_ADDR_RANGE | TsType::TS_IPV6_ADDR_RANGE => {
                    let start_port = s.u16("traffic selector")?;
                    let end_port = s.u16("traffic selector")?;
                    let addresses = if ts_type == TsType::TS_IPV4_ADDR_RANGE {
                        AddressRange::V4 {
                            start: Ipv4Addr::from(s.array::<4>("traffic selector")?),
                            end: Ipv4Addr::from(s.array::<4>("traffic selector")?),
                        }
                    } else {
                        AddressRange::V6 {
                            start: Ipv6Addr::from(s.array::<16>("traffic selector")?),
                            end: Ipv6Addr::from(s.array::<16>("traffic selector")?),
                        }
                    };
                    TrafficSelector::Range(TsRange {
                        ip_protocol: byte1,
                        start_port,
                        end_port,
                        addresses,
                    })
                }
                _ => TrafficSelector::Unknown {
                    ts_type,
                    byte1,
                    data: s.rest().to_vec(),
                },
            };
            selectors.push(selector);
        }
        if selectors.len() != declared {
            return Err(DecodeError::CountMismatch {
                what: "traffic selectors",
                declared,
                found: selectors.len(),
                at,
            });
        }
        Ok(TsPayload { selectors })
    }

    fn encode_body(&self, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        let count = u8::try_from(self.selectors.len()).map_err(|_| EncodeError::TooMany {
            what: "traffic selectors",
            count: self.selectors.len(),
            max: usize::from(u8::MAX),
        })?;
        out.push(count);
        out.extend_from_slice(&[0, 0, 0]);
        for selector in &self.selectors {
            let start = out.len();
            match selector {
                TrafficSelector::Range(range) => {
                    out.push(range.ts_type().0);
                    out.push(range.ip_protocol);
                    out.extend_from_slice(&[0, 0]);
                    out.extend_from_slice(&range.start_port.to_be_bytes());
                    out.extend_from_slice(&range.end_port.to_be_bytes());
                    match range.addresses {
                        AddressRange::V4 { start, end } => {
                            out.extend_from_slice(&start.octets());
                            out.extend_from_slice(&end.octets());
                        }
                        AddressRange::V6 { start, end } => {
                            out.extend_from_slice(&start.octets());
                            out.extend_from_slice(&end.octets());
                        }
                    }
                }
                TrafficSelector::Unknown {
                    ts_type,
                    byte1,
                    data,
                } => {
                    out.push(ts_type.0);
                    out.push(*byte1);
                    out.extend_from_slice(&[0, 0]);
                    out.extend_from_slice(data);
                }
            }
            patch_len16(out, start, 2, "traffic selector")?;
        }
        Ok(())
    }
}

/// Encrypted and Authenticated payload (RFC 7296 §3.14), still sealed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncryptedPayload {
    /// Type of the first payload inside (its Next Payload field).
    pub first_inner: PayloadType,
    /// IV, ciphertext and ICV.
    pub body: Vec<u8>,
}

/// A payload this implementation does not interpret, kept raw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownPayload {
    pub payload_type: PayloadType,
    /// Received payloads never have it (the decoder rejects those), but a
    /// built one may.
    pub critical: bool,
    pub body: Vec<u8>,
}

/// Lookups over a payload list (a message's, or a decrypted inner chain).
pub trait PayloadsExt {
    /// The first SA payload.
    fn sa(&self) -> Option<&SaPayload>;
    fn ke(&self) -> Option<&KePayload>;
    fn nonce(&self) -> Option<&[u8]>;
    fn id_i(&self) -> Option<&IdPayload>;
    fn id_r(&self) -> Option<&IdPayload>;
    fn auth(&self) -> Option<&AuthPayload>;
    fn ts_i(&self) -> Option<&TsPayload>;
    fn ts_r(&self) -> Option<&TsPayload>;
    /// Every Notify payload, in order.
    fn notifies(&self) -> impl Iterator<Item = &NotifyPayload>;
    /// The first Notify payload of the type.
    fn notify(&self, notify_type: NotifyType) -> Option<&NotifyPayload>;
    /// Every Delete payload, in order.
    fn deletes(&self) -> impl Iterator<Item = &DeletePayload>;
}

impl PayloadsExt for [Payload] {
    fn sa(&self) -> Option<&SaPayload> {
        self.iter().find_map(|p| match p {
            Payload::Sa(x) => Some(x),
            _ => None,
        })
    }
    fn ke(&self) -> Option<&KePayload> {
        self.iter().find_map(|p| match p {
            Payload::Ke(x) => Some(x),
            _ => None,
        })
    }
    fn nonce(&self) -> Option<&[u8]> {
        self.iter().find_map(|p| match p {
            Payload::Nonce(x) => Some(x.as_slice()),
            _ => None,
        })
    }
    fn id_i(&self) -> Option<&IdPayload> {
        self.iter().find_map(|p| match p {
            Payload::IdI(x) => Some(x),
            _ => None,
        })
    }
    fn id_r(&self) -> Option<&IdPayload> {
        self.iter().find_map(|p| match p {
            Payload::IdR(x) => Some(x),
            _ => None,
        })
    }
    fn auth(&self) -> Option<&AuthPayload> {
        self.iter().find_map(|p| match p {
            Payload::Auth(x) => Some(x),
            _ => None,
        })
    }
    fn ts_i(&self) -> Option<&TsPayload> {
        self.iter().find_map(|p| match p {
            Payload::TsI(x) => Some(x),
            _ => None,
        })
    }
    fn ts_r(&self) -> Option<&TsPayload> {
        self.iter().find_map(|p| match p {
            Payload::TsR(x) => Some(x),
            _ => None,
        })
    }
    fn notifies(&self) -> impl Iterator<Item = &NotifyPayload> {
        self.iter().filter_map(|p| match p {
            Payload::Notify(x) => Some(x),
            _ => None,
        })
    }
    fn notify(&self, notify_type: NotifyType) -> Option<&NotifyPayload> {
        self.notifies().find(|n| n.notify_type == notify_type)
    }
    fn deletes(&self) -> impl Iterator<Item = &DeletePayload> {
        self.iter().filter_map(|p| match p {
            Payload::Delete(x) => Some(x),
            _ => None,
        })
    }
}

/// A bounds-checked cursor. Every read returns an error naming `what` and
/// the absolute offset instead of panicking on short input.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    /// Offset of `buf[0]` in the buffer being decoded, for error locations.
    base: usize,
    payload: Option<(usize, PayloadType)>,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8], base: usize, payload: Option<(usize, PayloadType)>) -> Reader<'a> {
        Reader {
            buf,
            pos: 0,
            base,
            payload,
        }
    }

    fn at(&self) -> Location {
        Location {
            payload: self.payload,
            offset: self.base + self.pos,
        }
    }

    fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        let bytes = self
            .pos
            .checked_add(n)
            .and_then(|end| self.buf.get(self.pos..end))
            .ok_or(DecodeError::Truncated {
                what,
                at: self.at(),
                needed: n,
                available: self.remaining(),
            })?;
        self.pos += n;
        Ok(bytes)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, DecodeError> {
        self.array(what).map(u16::from_be_bytes)
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        self.array(what).map(u32::from_be_bytes)
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        self.array(what).map(u64::from_be_bytes)
    }

    /// Everything left.
    fn rest(&mut self) -> &'a [u8] {
        let rest = self.buf.get(self.pos..).unwrap_or_default();
        self.pos = self.buf.len();
        rest
    }

    /// The next `n` bytes where `n` comes from a length or size field: if
    /// they run past the enclosing structure, the field is wrong (the
    /// datagram's own length was already checked), so this is a
    /// [`DecodeError::BadLength`] rather than a truncation.
    fn declared(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        if n > self.remaining() {
            return Err(DecodeError::BadLength {
                what,
                length: n,
                at: self.at(),
            });
        }
        self.take(n, what)
    }

    /// A reader over the next `n` bytes (a declared length), which this one
    /// skips.
    fn sub(&mut self, n: usize, what: &'static str) -> Result<Reader<'a>, DecodeError> {
        let base = self.base + self.pos;
        let buf = self.declared(n, what)?;
        Ok(Reader::new(buf, base, self.payload))
    }
}

#[cfg(test)]
#[path = "message_tests.rs"]
mod tests;

#[cfg(test)]
#[path = "strongswan_vectors.rs"]
pub(crate) mod strongswan_vectors;
