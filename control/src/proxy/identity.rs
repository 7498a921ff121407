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

use crate::ike::dn;
use crate::ike::sa::Identity;

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
        return dn::from_text(s).map(Identity::DerDn);
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
