//! Certificate authentication: the engine against itself with the fixtures
//! of testdata/certs (gen.sh makes them), loading errors, and signatures
//! against openssl's.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use super::*;
use crate::ike::auth::{LoadError, PubkeyAuth, HASH_SHA2_256, HASH_SHA2_384, OUR_SIGNATURE_HASHES};
use crate::ike::message::{AuthMethod, CertEncoding, CertPayload, ExchangeType, IdPayload};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/src/ike/testdata/certs"
    ))
    .join(name)
}

/// `name`.pem with `name`.key.pem, trusting the CAs `cas`.
fn load(name: &str, cas: &[&str]) -> PubkeyAuth {
    let cas: Vec<PathBuf> = cas.iter().map(|c| fixture(&format!("{c}.pem"))).collect();
    PubkeyAuth::load(
        &fixture(&format!("{name}.pem")),
        &fixture(&format!("{name}.key.pem")),
        &cas,
    )
    .unwrap_or_else(|e| panic!("loading {name}: {e}"))
}

fn pubkey(name: &str, cas: &[&str]) -> Auth {
    Auth::Pubkey(Arc::new(load(name, cas)))
}

/// The FQDN in a fixture's dNSName SAN.
fn fqdn(name: &str) -> Identity {
    Identity::Fqdn(format!("{name}.bitw.test"))
}

/// Configurations of an initiator `i` and a responder `r` that use
/// certificates and the identities `i_id` / `r_id`.
fn cert_configs(i: Auth, i_id: Identity, r: Auth, r_id: Identity) -> (Config, Config) {
    let mut ic = initiator_config();
    let mut rc = responder_config();
    ic.auth = i;
    rc.auth = r;
    ic.local_id = i_id.clone();
    rc.remote_id = i_id;
    ic.remote_id = r_id.clone();
    rc.local_id = r_id;
    (ic, rc)
}

fn assert_established(p: &Pair) {
    assert_eq!(failed(&p.i_events), None, "initiator: {:?}", p.i_events);
    assert_eq!(failed(&p.r_events), None, "responder: {:?}", p.r_events);
    assert!(p.initiator.is_established() && p.responder.is_established());
    assert_keys_crossed(child(&p.i_events), child(&p.r_events));
}

fn run(i: Auth, i_id: Identity, r: Auth, r_id: Identity) -> Pair {
    let (ic, rc) = cert_configs(i, i_id, r, r_id);
    let mut p = Pair::new(ic, rc);
    p.pump();
    p
}

#[test]
fn rsa_to_rsa_establishes_and_ike_sa_init_carries_certreq_and_hashes() {
    let (ic, rc) = cert_configs(
        pubkey("left-rsa", &["ca-rsa"]),
        fqdn("left-rsa"),
        pubkey("right-rsa", &["ca-rsa"]),
        fqdn("right-rsa"),
    );
    let mut p = Pair::new(ic, rc);
    let seen: Arc<Mutex<Vec<(bool, Message)>>> = Arc::default();
    let log = seen.clone();
    p.wire = Box::new(move |to_responder, d| {
        let m = Message::decode(&d.payload).unwrap();
        if m.header.exchange == ExchangeType::IKE_SA_INIT {
            log.lock().unwrap().push((to_responder, m));
        }
        Some(d)
    });
    p.pump();
    assert_established(&p);

    let seen = seen.lock().unwrap();
    let [(true, request), (false, response)] = seen.as_slice() else {
        panic!("one IKE_SA_INIT each way: {seen:?}");
    };
    let hashes: Vec<u8> = OUR_SIGNATURE_HASHES
        .iter()
        .flat_map(|h| h.to_be_bytes())
        .collect();
    for m in [request, response] {
        let n = m
            .payloads
            .notify(NotifyType::SIGNATURE_HASH_ALGORITHMS)
            .expect("SIGNATURE_HASH_ALGORITHMS");
        assert_eq!(n.data, hashes);
    }
    // the responder asks for a certificate from our CA: SHA-1 of its SPKI
    let certreq = response
        .payloads
        .iter()
        .find_map(|p| match p {
            Payload::CertReq(c) => Some(c),
            _ => None,
        })
        .expect("CERTREQ in the IKE_SA_INIT response");
    assert_eq!(certreq.encoding, CertEncoding::X509_SIGNATURE);
    assert_eq!(certreq.data, ca_spki_sha1("ca-rsa"));
    assert!(!request
        .payloads
        .iter()
        .any(|p| matches!(p, Payload::CertReq(_))));
}

fn ca_spki_sha1(ca: &str) -> Vec<u8> {
    std::fs::read(fixture(&format!("{ca}.spki-sha1"))).unwrap()
}

#[test]
fn ecdsa_p256_to_p384_establishes() {
    let p = run(
        pubkey("left-p256", &["ca-p384"]),
        fqdn("left-p256"),
        pubkey("right-p384", &["ca-p256"]),
        fqdn("right-p384"),
    );
    assert_established(&p);
}

#[test]
fn rsa_and_ecdsa_mixed_establish_both_ways() {
    let p = run(
        pubkey("left-rsa", &["ca-p256"]),
        fqdn("left-rsa"),
        pubkey("right-p256", &["ca-rsa"]),
        fqdn("right-p256"),
    );
    assert_established(&p);
    let p = run(
        pubkey("left-p256", &["ca-rsa"]),
        fqdn("left-p256"),
        pubkey("right-rsa", &["ca-p256", "ca-p384"]),
        fqdn("right-rsa"),
    );
    assert_established(&p);
}

#[test]
fn every_identity_type_is_found_in_the_certificate() {
    let left = load("left-p256", &["ca-p384"]);
    let right = load("right-p384", &["ca-p256"]);
    // the subject DER as it is in the certificate
    for pk in [&left, &right] {
        let dn = pk.subject_der();
        assert!(pk.certificate().windows(dn.len()).any(|w| w == dn));
    }
    let (left_dn, right_dn) = (left.subject_der().to_vec(), right.subject_der().to_vec());
    let (left, right) = (Arc::new(left), Arc::new(right));
    let cases = [
        (
            Identity::Ipv4(Ipv4Addr::new(10, 0, 0, 1)),
            Identity::Ipv4(Ipv4Addr::new(10, 0, 0, 2)),
        ),
        (
            Identity::Ipv6("fd00::1".parse::<Ipv6Addr>().unwrap()),
            Identity::Ipv6("fd00::2".parse::<Ipv6Addr>().unwrap()),
        ),
        (fqdn("left-p256"), fqdn("right-p384")),
        (
            Identity::Rfc822("left-p256@bitw.test".into()),
            Identity::Rfc822("right-p384@bitw.test".into()),
        ),
        (Identity::DerDn(left_dn), Identity::DerDn(right_dn)),
    ];
    for (i_id, r_id) in cases {
        let p = run(
            Auth::Pubkey(left.clone()),
            i_id.clone(),
            Auth::Pubkey(right.clone()),
            r_id.clone(),
        );
        assert_established(&p);
        let remote_ids: Vec<&Identity> = p
            .r_events
            .iter()
            .filter_map(|e| match e {
                IkeEvent::IkeSaEstablished { remote_id, .. } => Some(remote_id),
                _ => None,
            })
            .collect();
        assert_eq!(remote_ids, [&i_id], "{i_id} / {r_id}");
    }
}

/// A Name as charon writes a text DN: every UTF8String value as a
/// PrintableString (single-attribute RDNs, short lengths).
fn printable_strings(der: &[u8]) -> Vec<u8> {
    let mut out = der.to_vec();
    assert!(out[0] == 0x30 && out[1] < 0x80);
    let mut rdn = 2;
    while rdn < out.len() {
        // SET { SEQUENCE { OID, value } }
        let oid = rdn + 4;
        let value = oid + 2 + usize::from(out[oid + 1]);
        if out[value] == 0x0c {
            out[value] = 0x13;
        }
        rdn += 2 + usize::from(out[rdn + 1]);
    }
    out
}

#[test]
fn a_dn_matches_the_subject_and_the_config_whatever_its_string_types() {
    let (left, right) = (
        load("left-p256", &["ca-p256"]),
        load("right-p256", &["ca-p256"]),
    );
    let (left_dn, right_dn) = (left.subject_der().to_vec(), right.subject_der().to_vec());
    let (left_text, right_text) = (printable_strings(&left_dn), printable_strings(&right_dn));
    assert_ne!(left_dn, left_text);
    // Each side sends its DN with PrintableStrings (as charon does for a
    // text DN): the certificate's UTF8String subject names it, and the
    // other side's configured remote_id (the subject as it is) matches it.
    let (mut ic, mut rc) = cert_configs(
        Auth::Pubkey(Arc::new(left)),
        Identity::DerDn(left_text.clone()),
        Auth::Pubkey(Arc::new(right)),
        Identity::DerDn(right_text.clone()),
    );
    rc.remote_id = Identity::DerDn(left_dn.clone());
    ic.remote_id = Identity::DerDn(right_dn.clone());
    let mut p = Pair::new(ic, rc);
    p.pump();
    assert_established(&p);
    // The peer's identity is reported as it sent it.
    assert!(p.r_events.iter().any(|e| matches!(
        e,
        IkeEvent::IkeSaEstablished { remote_id: Identity::DerDn(d), .. } if *d == left_text
    )));
    // Another DN in text form still does not match.
    let p = run(
        pubkey("left-p256", &["ca-p256"]),
        Identity::DerDn(right_text),
        pubkey("right-p256", &["ca-p256"]),
        Identity::DerDn(right_dn),
    );
    assert_eq!(failed(&p.r_events), Some("id_mismatch"));
}

#[test]
fn intermediate_sent_with_the_certificate_is_used() {
    let p = run(
        pubkey("left-p256", &["ca-p256"]),
        fqdn("left-p256"),
        pubkey("chain-p256", &["ca-p256"]),
        fqdn("chain-p256"),
    );
    assert_established(&p);
    assert_eq!(load("chain-p256", &["ca-p256"]).cert_payloads().count(), 2);
}

#[test]
fn certificate_from_another_ca_is_refused_both_ways() {
    // the responder's certificate: the initiator refuses and says so
    let p = run(
        pubkey("left-p256", &["ca-p256", "ca-rsa"]),
        fqdn("left-p256"),
        pubkey("other-p256", &["ca-p256"]),
        fqdn("other-p256"),
    );
    assert_eq!(failed(&p.i_events), Some("cert_untrusted"));
    assert_eq!(p.initiator.stats().errors_sent.get("auth_failed"), Some(&1));
    assert_eq!(failed(&p.r_events), Some("auth_failed"));
    assert!(p.initiator.is_closed() && p.responder.is_closed());
    // the initiator's certificate: the responder refuses
    let p = run(
        pubkey("other-p256", &["ca-p256"]),
        fqdn("other-p256"),
        pubkey("right-p256", &["ca-p256"]),
        fqdn("right-p256"),
    );
    assert_eq!(failed(&p.r_events), Some("cert_untrusted"));
    assert_eq!(failed(&p.i_events), Some("auth_failed"));
    assert!(!established(&p.r_events) && !established(&p.i_events));
}

#[test]
fn expired_certificate_is_refused() {
    let p = run(
        pubkey("expired-p256", &["ca-p256"]),
        fqdn("expired-p256"),
        pubkey("right-p256", &["ca-p256"]),
        fqdn("right-p256"),
    );
    assert_eq!(failed(&p.r_events), Some("cert_expired"));
    assert_eq!(failed(&p.i_events), Some("auth_failed"));
    // at a time it was valid, the chain holds (the CA was not valid then:
    // webpki does not look at the anchor's own dates)
    let verifier = load("right-p256", &["ca-p256"]).at_time(
        std::time::UNIX_EPOCH + Duration::from_secs(1_593_561_600), // 2020-07-01
    );
    let signer = load("expired-p256", &["ca-p256"]);
    let octets = b"octets";
    let auth = signer.sign(octets, Some(&OUR_SIGNATURE_HASHES)).unwrap();
    let certs: Vec<CertPayload> = signer.cert_payloads().collect();
    let certs: Vec<&CertPayload> = certs.iter().collect();
    let id = fqdn("expired-p256").to_payload();
    assert!(verifier.verify(&certs, &id, &auth, octets).is_ok());
}

#[test]
fn identity_not_in_the_certificate_is_refused() {
    // the initiator's ID
    let p = run(
        pubkey("left-p256", &["ca-p256"]),
        fqdn("elsewhere"),
        pubkey("right-p256", &["ca-p256"]),
        fqdn("right-p256"),
    );
    assert_eq!(failed(&p.r_events), Some("id_mismatch"));
    assert_eq!(failed(&p.i_events), Some("auth_failed"));
    // the responder's ID: a DN that is not its subject
    let other_dn = load("left-rsa", &["ca-rsa"]).subject_der().to_vec();
    let p = run(
        pubkey("left-p256", &["ca-p256"]),
        fqdn("left-p256"),
        pubkey("right-p256", &["ca-p256"]),
        Identity::DerDn(other_dn),
    );
    assert_eq!(failed(&p.i_events), Some("id_mismatch"));
    assert_eq!(failed(&p.r_events), Some("auth_failed"));
    // an address of the other side
    let p = run(
        pubkey("left-p256", &["ca-p256"]),
        Identity::Ipv4(Ipv4Addr::new(10, 0, 0, 2)),
        pubkey("right-p256", &["ca-p256"]),
        fqdn("right-p256"),
    );
    assert_eq!(failed(&p.r_events), Some("id_mismatch"));
}

#[test]
fn psk_against_certificates_is_refused() {
    let psk = || Auth::Psk(Psk::new(b"secret".to_vec()));
    let p = run(
        psk(),
        fqdn("left-p256"),
        pubkey("right-p256", &["ca-p256"]),
        fqdn("right-p256"),
    );
    assert_eq!(failed(&p.r_events), Some("auth_method"));
    assert_eq!(failed(&p.i_events), Some("auth_failed"));
    let p = run(
        pubkey("left-p256", &["ca-p256"]),
        fqdn("left-p256"),
        psk(),
        fqdn("right-p256"),
    );
    assert_eq!(failed(&p.r_events), Some("auth_method"));
    assert_eq!(failed(&p.i_events), Some("auth_failed"));
}

#[test]
fn loading_reports_the_file_and_the_problem() {
    let err = |cert: &str, key: &str, cas: &[&str]| {
        let cas: Vec<PathBuf> = cas.iter().map(|c| fixture(c)).collect();
        PubkeyAuth::load(&fixture(cert), &fixture(key), &cas).unwrap_err()
    };
    let e = err("left-p256.pem", "right-p256.key.pem", &["ca-p256.pem"]);
    assert!(
        e.contains("right-p256.key.pem") && e.contains("does not belong"),
        "{e}"
    );
    let e = err("left-rsa.pem", "left-p256.key.pem", &["ca-p256.pem"]);
    assert!(
        e.contains("left-p256.key.pem") && e.contains("not an RSA private key"),
        "{e}"
    );
    let e = err("left-p384.pem", "left-p256.key.pem", &["ca-p256.pem"]);
    assert!(
        e.contains("left-p384.pem") && e.contains("No such file"),
        "{e}"
    );
    let e = err("kat.bin", "left-p256.key.pem", &["ca-p256.pem"]);
    assert!(e.contains("kat.bin") && e.contains("no CERTIFICATE"), "{e}");
    let e = err("left-p256.pem", "left-p256.pem", &["ca-p256.pem"]);
    assert!(
        e.contains("left-p256.pem") && e.contains("PRIVATE KEY"),
        "{e}"
    );
    let e = err("left-p256.pem", "left-p256.key.pem", &["left-p256.key.pem"]);
    assert!(
        e.contains("left-p256.key.pem") && e.contains("no CERTIFICATE"),
        "{e}"
    );
    let e = err("left-p256.pem", "left-p256.key.pem", &[]);
    assert!(e.contains("no CA"), "{e}");
    // DER: which input is wrong
    assert!(matches!(
        PubkeyAuth::from_der(&[b"not a certificate".to_vec()], b"", &[]),
        Err(LoadError::Cert(_))
    ));
}

/// `signer`'s AUTH over `octets` as `verifier` sees it.
fn verify_as(
    verifier: &PubkeyAuth,
    signer: &PubkeyAuth,
    id: &IdPayload,
    auth: &AuthPayload,
    octets: &[u8],
) -> Result<(), &'static str> {
    let certs: Vec<CertPayload> = signer.cert_payloads().collect();
    let certs: Vec<&CertPayload> = certs.iter().collect();
    verifier
        .verify(&certs, id, auth, octets)
        .map_err(|e| e.reason)
}

#[test]
fn signature_method_follows_the_peers_hashes() {
    let octets = b"the signed octets";
    let rsa = load("left-rsa", &["ca-rsa"]);
    let p256 = load("left-p256", &["ca-p256"]);
    let p384 = load("right-p384", &["ca-p384"]);
    let verifier = load("right-rsa", &["ca-rsa", "ca-p256", "ca-p384"]);
    let all = OUR_SIGNATURE_HASHES;
    let cases: [(&PubkeyAuth, &str, Option<&[u16]>, AuthMethod); 6] = [
        (
            &p256,
            "left-p256",
            Some(&all),
            AuthMethod::DIGITAL_SIGNATURE,
        ),
        (&p256, "left-p256", None, AuthMethod::ECDSA_SHA256_P256),
        (
            &p256,
            "left-p256",
            Some(&[HASH_SHA2_384]),
            AuthMethod::ECDSA_SHA256_P256,
        ),
        (
            &p384,
            "right-p384",
            Some(&all),
            AuthMethod::DIGITAL_SIGNATURE,
        ),
        (
            &p384,
            "right-p384",
            Some(&[HASH_SHA2_256]),
            AuthMethod::ECDSA_SHA384_P384,
        ),
        (&rsa, "left-rsa", Some(&[4]), AuthMethod::DIGITAL_SIGNATURE),
    ];
    for (signer, name, hashes, method) in cases {
        let auth = signer.sign(octets, hashes).unwrap();
        assert_eq!(auth.method, method, "{name} {hashes:?}");
        let id = fqdn(name).to_payload();
        assert_eq!(verify_as(&verifier, signer, &id, &auth, octets), Ok(()));
        // another message, a changed signature
        assert_eq!(
            verify_as(&verifier, signer, &id, &auth, b"other octets"),
            Err("auth_failed")
        );
        let mut bad = auth.clone();
        *bad.data.last_mut().unwrap() ^= 1;
        assert!(verify_as(&verifier, signer, &id, &bad, octets).is_err());
    }
    // RSA without RFC 7427 would be SHA-1, which ring does not sign
    assert!(rsa.sign(octets, None).unwrap_err().contains("SHA-1"));
    // a classic method that does not fit the key
    let auth = p256.sign(octets, None).unwrap();
    let wrong = AuthPayload {
        method: AuthMethod::ECDSA_SHA384_P384,
        data: auth.data,
    };
    let id = fqdn("left-p256").to_payload();
    assert_eq!(
        verify_as(&verifier, &p256, &id, &wrong, octets),
        Err("auth_method")
    );
    // no CERT at all
    let auth = p256.sign(octets, Some(&all)).unwrap();
    assert_eq!(
        verifier
            .verify(&[], &id, &auth, octets)
            .map_err(|e| e.reason),
        Err("cert_missing")
    );
}

/// openssl's signatures of kat.bin (gen.sh): RSA PKCS#1 v1.5 is
/// deterministic, so ours must be the same octets; ECDSA's are checked by
/// verifying openssl's.
#[test]
fn signatures_agree_with_openssl() {
    let octets = std::fs::read(fixture("kat.bin")).unwrap();
    let rsa = load("left-rsa", &["ca-rsa"]);
    let p256 = load("left-p256", &["ca-p256"]);
    let verifier = load("right-p256", &["ca-rsa", "ca-p256"]);

    let ours = rsa.sign(&octets, Some(&[HASH_SHA2_256])).unwrap();
    let openssl = std::fs::read(fixture("kat-rsa.sig")).unwrap();
    assert_eq!(ours.method, AuthMethod::DIGITAL_SIGNATURE);
    // length, then sha256WithRSAEncryption with NULL parameters (RFC 7427 A.1)
    let alg_id = hex::decode("0f300d06092a864886f70d01010b0500").unwrap();
    assert_eq!(ours.data[..alg_id.len()], alg_id[..]);
    assert_eq!(ours.data[alg_id.len()..], openssl[..]);

    let id = fqdn("left-p256").to_payload();
    let alg_id = hex::decode("0c300a06082a8648ce3d040302").unwrap(); // ecdsa-with-SHA256
    let openssl = std::fs::read(fixture("kat-p256.sig")).unwrap();
    let auth = AuthPayload {
        method: AuthMethod::DIGITAL_SIGNATURE,
        data: [alg_id.clone(), openssl].concat(),
    };
    assert_eq!(verify_as(&verifier, &p256, &id, &auth, &octets), Ok(()));
    let ours = p256.sign(&octets, Some(&OUR_SIGNATURE_HASHES)).unwrap();
    assert_eq!(ours.data[..alg_id.len()], alg_id[..]);

    // method 1: RSA PKCS#1 v1.5 with SHA-1, verified only
    let id = fqdn("left-rsa").to_payload();
    let auth = AuthPayload {
        method: AuthMethod::RSA_DIGITAL_SIGNATURE,
        data: std::fs::read(fixture("kat-rsa-sha1.sig")).unwrap(),
    };
    assert_eq!(verify_as(&verifier, &rsa, &id, &auth, &octets), Ok(()));
    // but not SHA-1 inside method 14: we did not announce it
    let sha1_alg = hex::decode("0f300d06092a864886f70d0101050500").unwrap();
    let auth = AuthPayload {
        method: AuthMethod::DIGITAL_SIGNATURE,
        data: [sha1_alg, auth.data].concat(),
    };
    assert_eq!(
        verify_as(&verifier, &rsa, &id, &auth, &octets),
        Err("auth_failed")
    );
}

#[test]
fn malformed_auth_data_is_refused_without_panic() {
    let p256 = load("left-p256", &["ca-p256"]);
    let verifier = load("right-p256", &["ca-p256"]);
    let id = fqdn("left-p256").to_payload();
    for data in [
        vec![],
        vec![0],
        vec![200, 0x30],
        vec![2, 0x30, 5],
        vec![3, 0x31, 1, 0],
        vec![0x0c, 0x30, 0x0a, 6, 8, 0x2a],
    ] {
        let auth = AuthPayload {
            method: AuthMethod::DIGITAL_SIGNATURE,
            data,
        };
        assert_eq!(
            verify_as(&verifier, &p256, &id, &auth, b"x"),
            Err("auth_failed")
        );
    }
    let garbage = CertPayload {
        encoding: CertEncoding::X509_SIGNATURE,
        data: vec![0x30, 0x03, 1, 2, 3],
    };
    let auth = p256.sign(b"x", None).unwrap();
    assert_eq!(
        verifier
            .verify(&[&garbage], &id, &auth, b"x")
            .map_err(|e| e.reason),
        Err("cert_invalid")
    );
}
