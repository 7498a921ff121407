//! Distinguished names compared by meaning, not by bytes (ID_DER_ASN1_DN
//! identities against the configured one and against a certificate's
//! subject), and written from strongSwan's text form ([`from_text`]).
//!
//! A DER `Name` is read as its RDN sequence: each RDN a set of (attribute
//! type OID, value). Two DNs match when (RFC 5280 §7.1):
//!
//! - they have the same number of RDNs, matching in the same order;
//! - matching RDNs have the same number of attributes, and each attribute of
//!   one has a matching attribute in the other (any order: a multi-valued
//!   RDN is a SET, and its DER order depends on the string types);
//! - matching attributes have the same type (OID) and values that match:
//!   - values of the string types (PrintableString, UTF8String, IA5String,
//!     TeletexString read as Latin-1, BMPString, UniversalString) are
//!     compared as text whatever their type, *case-insensitively* and with
//!     insignificant spaces ignored (leading and trailing spaces dropped,
//!     inner runs of spaces read as one): RFC 5280 §7.1's caseIgnoreMatch
//!     after the RFC 4518 preparation, less its Unicode normalisation and
//!     prohibited-character steps (characters are lowercased one by one);
//!   - any other value must be the same DER element, tag and octets.
//!
//! strongSwan ignores the string type too, but compares only
//! PrintableString values and e-mail addresses without case, and everything
//! else byte for byte; its own text DNs (`C=CH, O=bitw, CN=meter`) are
//! PrintableString wherever the text allows, so caseIgnoreMatch everywhere
//! differs from it only for non-ASCII UTF8String values and spacing.
//!
//! Malformed DER (bad lengths, trailing octets, a string that does not
//! decode) matches nothing, itself included; nothing panics.

/// One attribute's value, ready for comparison.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Value {
    /// A string type's value, prepared (lowercased, spaces normalised).
    Text(String),
    /// Any other type: its tag and content octets.
    Other(u8, Vec<u8>),
}

type Rdn = Vec<(Vec<u8>, Value)>;

const TAG_SEQUENCE: u8 = 0x30;
const TAG_SET: u8 = 0x31;
const TAG_OID: u8 = 0x06;
const TAG_UTF8: u8 = 0x0c;
const TAG_PRINTABLE: u8 = 0x13;
const TAG_T61: u8 = 0x14;
const TAG_IA5: u8 = 0x16;
const TAG_UNIVERSAL: u8 = 0x1c;
const TAG_BMP: u8 = 0x1e;

/// Attribute names strongSwan and openssl write, with their OIDs (DER body).
const ATTRIBUTES: &[(&str, &[u8])] = &[
    ("C", &[0x55, 0x04, 0x06]),
    ("ST", &[0x55, 0x04, 0x08]),
    ("L", &[0x55, 0x04, 0x07]),
    ("O", &[0x55, 0x04, 0x0a]),
    ("OU", &[0x55, 0x04, 0x0b]),
    ("CN", &[0x55, 0x04, 0x03]),
    ("SN", &[0x55, 0x04, 0x04]),
    ("serialNumber", &[0x55, 0x04, 0x05]),
    ("title", &[0x55, 0x04, 0x0c]),
    ("GN", &[0x55, 0x04, 0x2a]),
    ("E", &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x09, 0x01]),
    (
        "emailAddress",
        &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x09, 0x01],
    ),
    (
        "DC",
        &[0x09, 0x92, 0x26, 0x89, 0x93, 0xf2, 0x2c, 0x64, 0x01, 0x19],
    ),
];

fn der(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![tag];
    let n = body.len();
    if n < 0x80 {
        v.push(n as u8);
    } else {
        let bytes: Vec<u8> = n
            .to_be_bytes()
            .into_iter()
            .skip_while(|b| *b == 0)
            .collect();
        v.push(0x80 | bytes.len() as u8);
        v.extend_from_slice(&bytes);
    }
    v.extend_from_slice(body);
    v
}

/// The DER of a DN written `C=CH, O=Example, CN=meter` (`,` or `/`
/// separated; one attribute per RDN, in the order written).
pub fn from_text(text: &str) -> Result<Vec<u8>, String> {
    let text = text.trim().trim_start_matches('/');
    let sep = if text.contains(',') { ',' } else { '/' };
    let mut rdns = Vec::new();
    for part in text.split(sep).map(str::trim).filter(|p| !p.is_empty()) {
        let (key, value) = part
            .split_once('=')
            .ok_or_else(|| format!("`{part}` in the DN is not attribute=value"))?;
        let (key, value) = (key.trim(), value.trim());
        let oid = ATTRIBUTES
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, o)| *o)
            .ok_or_else(|| {
                format!(
                    "unknown DN attribute `{key}` (known: {})",
                    ATTRIBUTES
                        .iter()
                        .map(|(k, _)| *k)
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })?;
        let tag = match key.to_ascii_uppercase().as_str() {
            "C" => TAG_PRINTABLE,
            "E" | "EMAILADDRESS" | "DC" => TAG_IA5,
            _ => TAG_UTF8,
        };
        let mut atv = der(TAG_OID, oid);
        atv.extend(der(tag, value.as_bytes()));
        rdns.extend(der(TAG_SET, &der(TAG_SEQUENCE, &atv)));
    }
    if rdns.is_empty() {
        return Err("empty distinguished name".into());
    }
    Ok(der(TAG_SEQUENCE, &rdns))
}

/// Whether two DER-encoded Names are the same name (see the module
/// documentation). Malformed input matches nothing.
pub fn equal(a: &[u8], b: &[u8]) -> bool {
    match (parse(a), parse(b)) {
        (Some(a), Some(b)) => a.len() == b.len() && a.iter().zip(&b).all(|(x, y)| rdn_equal(x, y)),
        _ => false,
    }
}

fn rdn_equal(a: &Rdn, b: &Rdn) -> bool {
    if a.len() != b.len() {
        return false;
    }
    // Each attribute of `a` takes a distinct equal one of `b`.
    let mut used = vec![false; b.len()];
    a.iter().all(|attr| {
        let found = b
            .iter()
            .enumerate()
            .position(|(i, other)| !used[i] && other == attr);
        match found {
            Some(i) => {
                used[i] = true;
                true
            }
            None => false,
        }
    })
}

/// A DER Name's RDN sequence, `None` if malformed.
fn parse(der: &[u8]) -> Option<Vec<Rdn>> {
    let (tag, body, rest) = tlv(der)?;
    if tag != TAG_SEQUENCE || !rest.is_empty() {
        return None;
    }
    let mut rdns = Vec::new();
    let mut input = body;
    while !input.is_empty() {
        let (tag, set, rest) = tlv(input)?;
        if tag != TAG_SET {
            return None;
        }
        input = rest;
        let mut rdn = Vec::new();
        let mut attrs = set;
        while !attrs.is_empty() {
            let (tag, atv, rest) = tlv(attrs)?;
            if tag != TAG_SEQUENCE {
                return None;
            }
            attrs = rest;
            let (tag, oid, value) = tlv(atv)?;
            if tag != TAG_OID || oid.is_empty() {
                return None;
            }
            let (vtag, content, rest) = tlv(value)?;
            if !rest.is_empty() {
                return None;
            }
            rdn.push((oid.to_vec(), prepared(vtag, content)?));
        }
        // An RDN has at least one attribute (X.501).
        if rdn.is_empty() {
            return None;
        }
        rdns.push(rdn);
    }
    Some(rdns)
}

/// One DER element: tag, content, what follows. Single-octet tags,
/// definite lengths only.
fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    if tag & 0x1f == 0x1f {
        return None;
    }
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > std::mem::size_of::<usize>() || rest.len() < n {
            return None;
        }
        let (bytes, after) = rest.split_at(n);
        rest = after;
        bytes
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b))
    };
    if rest.len() < len {
        return None;
    }
    let (content, after) = rest.split_at(len);
    Some((tag, content, after))
}

/// A value as compared: string types as prepared text, `None` for a string
/// that does not decode.
fn prepared(tag: u8, content: &[u8]) -> Option<Value> {
    let text: String = match tag {
        TAG_UTF8 => std::str::from_utf8(content).ok()?.to_string(),
        TAG_PRINTABLE | TAG_IA5 => {
            if !content.is_ascii() {
                return None;
            }
            content.iter().map(|&b| char::from(b)).collect()
        }
        TAG_T61 => content.iter().map(|&b| char::from(b)).collect(),
        TAG_BMP => {
            if !content.len().is_multiple_of(2) {
                return None;
            }
            let units = content
                .chunks_exact(2)
                .map(|c| u16::from_be_bytes([c[0], c[1]]));
            char::decode_utf16(units)
                .collect::<Result<String, _>>()
                .ok()?
        }
        TAG_UNIVERSAL => {
            if !content.len().is_multiple_of(4) {
                return None;
            }
            content
                .chunks_exact(4)
                .map(|c| char::from_u32(u32::from_be_bytes([c[0], c[1], c[2], c[3]])))
                .collect::<Option<String>>()?
        }
        _ => return Some(Value::Other(tag, content.to_vec())),
    };
    Some(Value::Text(prepare(&text)))
}

/// RFC 4518's insignificant space handling and case folding (per character).
fn prepare(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for word in text.split(' ').filter(|w| !w.is_empty()) {
        if !out.is_empty() {
            out.push(' ');
        }
        out.extend(word.chars().flat_map(char::to_lowercase));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dn_matches_openssls_encoding() {
        // openssl req -subj "/C=CH/O=bitw/CN=meter" writes exactly this subject.
        let der = from_text("C=CH, O=bitw, CN=meter").unwrap();
        assert_eq!(
            hex::encode(&der),
            "302c310b3009060355040613024348310d300b060355040a0c0462697477\
             310e300c06035504030c056d65746572"
        );
        assert_eq!(from_text("/C=CH/O=bitw/CN=meter").unwrap(), der);
        assert!(from_text("C=CH, XX=1")
            .unwrap_err()
            .contains("unknown DN attribute"));
        assert!(from_text("garbage").is_err());
    }

    fn der(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        if body.len() < 0x80 {
            v.push(body.len() as u8);
        } else {
            v.extend([0x82, (body.len() >> 8) as u8, body.len() as u8]);
        }
        v.extend_from_slice(body);
        v
    }

    const C: &[u8] = &[0x55, 0x04, 0x06];
    const O: &[u8] = &[0x55, 0x04, 0x0a];
    const CN: &[u8] = &[0x55, 0x04, 0x03];

    fn atv(oid: &[u8], tag: u8, value: &[u8]) -> Vec<u8> {
        der(TAG_SEQUENCE, &[der(TAG_OID, oid), der(tag, value)].concat())
    }

    /// A Name of single-attribute RDNs.
    fn name(attrs: &[(&[u8], u8, &str)]) -> Vec<u8> {
        let rdns: Vec<u8> = attrs
            .iter()
            .flat_map(|(oid, tag, v)| der(TAG_SET, &atv(oid, *tag, v.as_bytes())))
            .collect();
        der(TAG_SEQUENCE, &rdns)
    }

    fn printable(cn: &str) -> Vec<u8> {
        name(&[
            (C, TAG_PRINTABLE, "CH"),
            (O, TAG_PRINTABLE, "bitw"),
            (CN, TAG_PRINTABLE, cn),
        ])
    }

    fn utf8(cn: &str) -> Vec<u8> {
        name(&[
            (C, TAG_PRINTABLE, "CH"),
            (O, TAG_UTF8, "bitw"),
            (CN, TAG_UTF8, cn),
        ])
    }

    #[test]
    fn the_same_dn_in_printable_and_utf8_strings_matches() {
        assert_ne!(printable("meter"), utf8("meter"));
        assert!(equal(&printable("meter"), &utf8("meter")));
        assert!(equal(&utf8("meter"), &printable("meter")));
        assert!(equal(&utf8("meter"), &utf8("meter")));
        // IA5String, T61String, BMPString: text too.
        let ia5 = name(&[
            (C, TAG_IA5, "CH"),
            (O, TAG_T61, "bitw"),
            (CN, TAG_IA5, "meter"),
        ]);
        assert!(equal(&ia5, &printable("meter")));
        let bmp: Vec<u8> = "meter".encode_utf16().flat_map(u16::to_be_bytes).collect();
        let bmp = der(
            TAG_SEQUENCE,
            &[
                der(TAG_SET, &atv(C, TAG_PRINTABLE, b"CH")),
                der(TAG_SET, &atv(O, TAG_UTF8, b"bitw")),
                der(TAG_SET, &atv(CN, TAG_BMP, &bmp)),
            ]
            .concat(),
        );
        assert!(equal(&bmp, &utf8("meter")));
    }

    #[test]
    fn case_and_insignificant_spaces_do_not_matter() {
        assert!(equal(&printable("Meter One"), &utf8("meter one")));
        assert!(equal(&printable(" meter  one "), &utf8("meter one")));
        assert!(equal(&utf8("ZÜRICH"), &utf8("zürich")));
        assert!(!equal(&utf8("meterone"), &utf8("meter one")));
    }

    #[test]
    fn different_order_value_or_rdns_do_not_match() {
        let reordered = name(&[
            (O, TAG_PRINTABLE, "bitw"),
            (C, TAG_PRINTABLE, "CH"),
            (CN, TAG_PRINTABLE, "meter"),
        ]);
        assert!(!equal(&reordered, &printable("meter")));
        assert!(!equal(&printable("meter2"), &utf8("meter")));
        let extra = name(&[
            (C, TAG_PRINTABLE, "CH"),
            (O, TAG_PRINTABLE, "bitw"),
            (CN, TAG_PRINTABLE, "meter"),
            (CN, TAG_PRINTABLE, "meter"),
        ]);
        assert!(!equal(&extra, &printable("meter")));
        assert!(!equal(&printable("meter"), &extra));
        // Another attribute type with the same value.
        let other_type = name(&[
            (C, TAG_PRINTABLE, "CH"),
            (CN, TAG_PRINTABLE, "bitw"),
            (CN, TAG_PRINTABLE, "meter"),
        ]);
        assert!(!equal(&other_type, &printable("meter")));
        // A non-string value is compared by tag and octets.
        let octets = name(&[
            (C, TAG_PRINTABLE, "CH"),
            (O, 0x04, "bitw"),
            (CN, TAG_UTF8, "meter"),
        ]);
        assert!(!equal(&octets, &utf8("meter")));
        assert!(equal(&octets, &octets.clone()));
    }

    #[test]
    fn multi_valued_rdns_match_in_any_order() {
        let rdn = |first: &[u8], second: &[u8]| {
            der(TAG_SEQUENCE, &der(TAG_SET, &[first, second].concat()))
        };
        let a = atv(O, TAG_UTF8, b"bitw");
        let b = atv(CN, TAG_PRINTABLE, b"meter");
        assert!(equal(&rdn(&a, &b), &rdn(&b, &a)));
        assert!(!equal(&rdn(&a, &a), &rdn(&a, &b)));
        // Split into two RDNs is another name.
        let split = der(TAG_SEQUENCE, &[der(TAG_SET, &a), der(TAG_SET, &b)].concat());
        assert!(!equal(&split, &rdn(&a, &b)));
    }

    #[test]
    fn garbage_matches_nothing_and_never_panics() {
        let good = printable("meter");
        assert!(equal(&good, &good));
        assert!(equal(&[0x30, 0], &[0x30, 0]), "the empty name");
        assert!(!equal(&[0x30, 0], &good));
        for cut in 0..good.len() {
            assert!(!equal(&good[..cut], &good), "truncated at {cut}");
            assert!(!equal(&good[..cut], &good[..cut]));
        }
        let mut trailing = good.clone();
        trailing.push(0);
        assert!(!equal(&trailing, &good));
        assert!(!equal(b"CN=meter", b"CN=meter"));
        // Bad strings: invalid UTF-8, non-ASCII PrintableString, odd BMP.
        for (tag, value) in [
            (TAG_UTF8, &[0xff, 0xfe][..]),
            (TAG_PRINTABLE, &[0xe9][..]),
            (TAG_BMP, &[0x00][..]),
            (TAG_UNIVERSAL, &[0, 0x11, 0, 0][..]),
        ] {
            let bad = der(TAG_SEQUENCE, &der(TAG_SET, &atv(CN, tag, value)));
            assert!(!equal(&bad, &bad), "{tag:#x}");
        }
        // Huge, indefinite and multi-octet-tag lengths.
        for bad in [
            &[0x30, 0x89, 1, 2, 3, 4, 5, 6, 7, 8, 9][..],
            &[0x30, 0x80, 0, 0],
            &[0x30, 0x84, 0xff, 0xff, 0xff, 0xff],
            &[0x3f, 0x01, 0x00],
            &[0x30, 0x02, 0x31, 0x00],
        ] {
            assert!(!equal(bad, bad));
        }
        // Every byte string up to a few octets, and mutations of a good DN.
        for len in 0..4usize {
            for n in 0..(1u32 << (8 * len)).min(70_000) {
                let bytes = &n.to_be_bytes()[4 - len..];
                equal(bytes, &good);
            }
        }
        for i in 0..good.len() {
            for v in [0u8, 0x7f, 0x80, 0xff] {
                let mut m = good.clone();
                m[i] = v;
                equal(&m, &good);
            }
        }
    }
}
