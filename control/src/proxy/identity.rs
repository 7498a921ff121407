//! Identities as operators write them (strongSwan's syntax) → IKE identities.
//!
//! - `10.99.0.1`, `fd00::1`: ID_IPV4_ADDR / ID_IPV6_ADDR;
//! - `user@example.net`: ID_RFC822_ADDR;
//! - `C=CH, O=Example, CN=meter`: ID_DER_ASN1_DN, encoded as openssl encodes
//!   a certificate's subject (countryName as PrintableString, the rest as
//!   UTF8String); the engine compares DNs by meaning ([`crate::ike::dn`]),
//!   so a peer's or a certificate's other string types match too;
//! - `asn1dn:#30...`: a DN given as hex DER;
//! - anything else: ID_FQDN.

use std::net::IpAddr;

use crate::ike::sa::Identity;

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

const TAG_SEQUENCE: u8 = 0x30;
const TAG_SET: u8 = 0x31;
const TAG_OID: u8 = 0x06;
const TAG_UTF8: u8 = 0x0c;
const TAG_PRINTABLE: u8 = 0x13;
const TAG_IA5: u8 = 0x16;

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
pub fn dn_to_der(text: &str) -> Result<Vec<u8>, String> {
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

/// An identity as strongSwan writes it (see the module documentation).
pub fn parse_identity(s: &str) -> Result<Identity, String> {
    let s = s.trim();
    if let Ok(a) = s.parse::<IpAddr>() {
        return Ok(match a {
            IpAddr::V4(a) => Identity::Ipv4(a),
            IpAddr::V6(a) => Identity::Ipv6(a),
        });
    }
    if let Some(hex) = s.strip_prefix("asn1dn:#") {
        return hex::decode(hex)
            .map(Identity::DerDn)
            .map_err(|e| format!("`{s}`: not hex DER: {e}"));
    }
    if s.contains('=') {
        return dn_to_der(s).map(Identity::DerDn);
    }
    if s.is_empty() || s.chars().any(char::is_whitespace) {
        return Err(format!(
            "`{s}` is not an identity: write an address, a domain name, user@domain or a DN (C=.., O=.., CN=..)"
        ));
    }
    if s.contains('@') {
        return Ok(Identity::Rfc822(s.to_string()));
    }
    Ok(Identity::Fqdn(s.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dn_matches_openssls_encoding() {
        // openssl req -subj "/C=CH/O=bitw/CN=meter" writes exactly this subject.
        let der = dn_to_der("C=CH, O=bitw, CN=meter").unwrap();
        assert_eq!(
            hex::encode(&der),
            "302c310b3009060355040613024348310d300b060355040a0c0462697477\
             310e300c06035504030c056d65746572"
        );
        assert_eq!(dn_to_der("/C=CH/O=bitw/CN=meter").unwrap(), der);
        assert!(dn_to_der("C=CH, XX=1")
            .unwrap_err()
            .contains("unknown DN attribute"));
        assert!(dn_to_der("garbage").is_err());
    }

    #[test]
    fn identity_kinds() {
        assert_eq!(
            parse_identity("10.0.0.1").unwrap(),
            Identity::Ipv4("10.0.0.1".parse().unwrap())
        );
        assert_eq!(
            parse_identity("fd00::1").unwrap(),
            Identity::Ipv6("fd00::1".parse().unwrap())
        );
        assert_eq!(
            parse_identity("meter@example.net").unwrap(),
            Identity::Rfc822("meter@example.net".into())
        );
        assert_eq!(
            parse_identity("meter.example.net").unwrap(),
            Identity::Fqdn("meter.example.net".into())
        );
        assert_eq!(
            parse_identity("asn1dn:#3000").unwrap(),
            Identity::DerDn(vec![0x30, 0])
        );
        assert!(matches!(
            parse_identity("CN=x").unwrap(),
            Identity::DerDn(_)
        ));
        assert!(parse_identity("two words").is_err());
    }
}
