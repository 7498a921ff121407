//! Tests of proposal parsing, display, conversion to SA payloads and
//! negotiation.

use super::*;
use crate::ike::message::{Message, Payload, PayloadsExt};

fn ike(text: &str) -> Proposal {
    Proposal::parse(Protocol::Ike, text).unwrap_or_else(|e| panic!("{text}: {e}"))
}

fn esp(text: &str) -> Proposal {
    Proposal::parse(Protocol::Esp, text).unwrap_or_else(|e| panic!("{text}: {e}"))
}

/// A transform written as (type, id, key length).
type T = (TransformType, u16, Option<u16>);

const ENCR: TransformType = TransformType::ENCR;
const PRF: TransformType = TransformType::PRF;
const INTEG: TransformType = TransformType::INTEG;
const DH: TransformType = TransformType::DH;
const ESN: TransformType = TransformType::ESN;

fn transform((transform_type, id, key): T) -> Transform {
    match key {
        Some(bits) => Transform::with_key_length(transform_type, id, bits),
        None => Transform::new(transform_type, id),
    }
}

fn sa_proposal(
    number: u8,
    protocol: ProtocolId,
    spi: &[u8],
    transforms: &[T],
) -> message::Proposal {
    message::Proposal {
        number,
        protocol,
        spi: spi.to_vec(),
        transforms: transforms.iter().copied().map(transform).collect(),
    }
}

fn ike_sa(proposals: &[&[T]]) -> SaPayload {
    SaPayload {
        proposals: proposals
            .iter()
            .enumerate()
            .map(|(i, t)| sa_proposal(i as u8 + 1, ProtocolId::IKE, &[], t))
            .collect(),
    }
}

fn esp_sa(proposals: &[&[T]]) -> SaPayload {
    SaPayload {
        proposals: proposals
            .iter()
            .enumerate()
            .map(|(i, t)| sa_proposal(i as u8 + 1, ProtocolId::ESP, &[0xc0, 0, 0, 1], t))
            .collect(),
    }
}

const NEGOTIATE: DhMode = DhMode::Negotiate { ke_group: None };

#[test]
fn parses_the_ike_examples() {
    let p = ike("aes128gcm16-prfsha256-x25519");
    assert_eq!(p.protocol, Protocol::Ike);
    assert_eq!(p.encryption, [Encryption::Aes128Gcm16]);
    assert!(p.integrity.is_empty());
    assert_eq!(p.prf, [Prf::HmacSha256]);
    assert_eq!(p.dh, [DhGroup::Curve25519]);
    assert!(p.esn.is_empty());

    let p = ike("aes256-sha256-modp2048");
    assert_eq!(p.encryption, [Encryption::Aes256Cbc]);
    assert_eq!(p.integrity, [Integrity::HmacSha256_128]);
    assert_eq!(p.prf, [Prf::HmacSha256], "sha256 implies prfsha256");
    assert_eq!(p.dh, [DhGroup::Modp2048]);

    let p = ike("aes128-sha256-ecp256");
    assert_eq!(p.encryption, [Encryption::Aes128Cbc]);
    assert_eq!(p.integrity, [Integrity::HmacSha256_128]);
    assert_eq!(p.prf, [Prf::HmacSha256]);
    assert_eq!(p.dh, [DhGroup::Ecp256]);

    let p = ike("aes256gcm16-prfsha384-ecp384");
    assert_eq!(p.encryption, [Encryption::Aes256Gcm16]);
    assert_eq!(p.prf, [Prf::HmacSha384]);
    assert_eq!(p.dh, [DhGroup::Ecp384]);

    // An explicit PRF wins over the implied one.
    let p = ike("aes256-sha512-prfsha384-modp2048");
    assert_eq!(p.integrity, [Integrity::HmacSha512_256]);
    assert_eq!(p.prf, [Prf::HmacSha384]);

    // Several of each, in order; each integrity algorithm implies its PRF.
    let p = ike("aes128-aes256-sha256-sha384-modp2048-ecp256");
    assert_eq!(p.encryption, [Encryption::Aes128Cbc, Encryption::Aes256Cbc]);
    assert_eq!(p.prf, [Prf::HmacSha256, Prf::HmacSha384]);
    assert_eq!(p.dh, [DhGroup::Modp2048, DhGroup::Ecp256]);
}

#[test]
fn parses_the_esp_examples() {
    let p = esp("aes128gcm16");
    assert_eq!(p.protocol, Protocol::Esp);
    assert_eq!(p.encryption, [Encryption::Aes128Gcm16]);
    assert!(p.integrity.is_empty() && p.prf.is_empty() && p.dh.is_empty());
    assert_eq!(p.esn, [Esn::No], "noesn when none is named, as strongSwan");

    assert_eq!(esp("aes256gcm16-esn").esn, [Esn::Yes]);
    assert_eq!(esp("aes256gcm16-esn").encryption, [Encryption::Aes256Gcm16]);
    assert_eq!(
        esp("chacha20poly1305").encryption,
        [Encryption::ChaCha20Poly1305]
    );
    let pfs = esp("aes128gcm16-x25519");
    assert_eq!(pfs.dh, [DhGroup::Curve25519]);
    assert_eq!(esp("aes128gcm16-esn-noesn").esn, [Esn::Yes, Esn::No]);
}

#[test]
fn accepts_strongswan_aliases_and_any_case() {
    assert_eq!(
        ike("aes128gcm128-prfsha256-x25519"),
        ike("aes128gcm16-prfsha256-x25519")
    );
    assert_eq!(
        ike("AES128GCM16-PRFSHA256-Curve25519"),
        ike("aes128gcm16-prfsha256-x25519")
    );
    assert_eq!(
        ike("aes256-sha2_256-modp2048"),
        ike("aes256-sha256-modp2048")
    );
    assert_eq!(
        ike("x25519-prfsha256-aes128gcm16"),
        ike("aes128gcm16-prfsha256-x25519")
    );
    assert_eq!(esp("aes256gcm128"), esp("aes256gcm16"));
    assert_eq!(esp(" aes128gcm16 "), esp("aes128gcm16"));
    assert_eq!(ike("aes-sha256-modp2048"), ike("aes128-sha256-modp2048"));
    // Errors quote what was written.
    let err = parse_err(Protocol::Ike, "AES128GCM16-SHA256-X25519").to_string();
    assert!(
        err.starts_with("IKE proposal `AES128GCM16-SHA256-X25519`: `aes128gcm16` is an AEAD"),
        "{err}"
    );
}

#[test]
fn displays_in_strongswan_syntax() {
    for (protocol, text) in [
        (Protocol::Ike, "aes128gcm16-prfsha256-x25519"),
        (Protocol::Ike, "aes256-sha256-modp2048"),
        (Protocol::Ike, "aes128-sha256-ecp256"),
        (Protocol::Ike, "aes256gcm16-prfsha384-ecp384"),
        (Protocol::Ike, "aes256-sha512-prfsha384-modp2048"),
        (Protocol::Ike, "aes128-aes256-sha256-sha384-modp2048-ecp256"),
        (Protocol::Ike, "chacha20poly1305-prfsha512-x25519-ecp384"),
        (Protocol::Esp, "aes128gcm16"),
        (Protocol::Esp, "aes256gcm16-esn"),
        (Protocol::Esp, "chacha20poly1305"),
        (Protocol::Esp, "aes128gcm16-x25519"),
        (Protocol::Esp, "aes128gcm16-aes256gcm16-ecp256-esn-noesn"),
    ] {
        let p = Proposal::parse(protocol, text).unwrap();
        assert_eq!(p.to_string(), text);
        assert_eq!(Proposal::parse(protocol, &p.to_string()).unwrap(), p);
    }
    // Shortest form: implied PRF and default ESN left out.
    assert_eq!(
        ike("aes256-sha256-prfsha256-modp2048").to_string(),
        "aes256-sha256-modp2048"
    );
    assert_eq!(esp("aes128gcm16-noesn").to_string(), "aes128gcm16");
}

fn parse_err(protocol: Protocol, text: &str) -> ProposalError {
    Proposal::parse(protocol, text).expect_err(text)
}

#[test]
fn unknown_and_unsupported_names_are_named_with_what_is_accepted() {
    let err = parse_err(Protocol::Ike, "aes128gcm16-prfsha256-foo");
    assert_eq!(
        err,
        ProposalError::UnknownToken {
            protocol: Protocol::Ike,
            proposal: "aes128gcm16-prfsha256-foo".into(),
            token: "foo".into(),
        }
    );
    let text = err.to_string();
    assert!(text.starts_with(
        "IKE proposal `aes128gcm16-prfsha256-foo`: unknown algorithm `foo`; accepted: aes128, aes256"
    ));
    assert!(text.contains("x25519 (or curve25519)"), "{text}");

    for (protocol, text, token) in [
        (Protocol::Ike, "aes128-sha1-modp2048", "sha1"),
        (Protocol::Ike, "aes128-sha256-modp1024", "modp1024"),
        (Protocol::Ike, "aes192-sha256-modp2048", "aes192"),
        (Protocol::Esp, "aes128gcm8", "aes128gcm8"),
        (Protocol::Esp, "aes128gcm16-x448", "x448"),
    ] {
        let err = parse_err(protocol, text);
        assert!(
            matches!(&err, ProposalError::Unsupported { token: t, .. } if t == token),
            "{err}"
        );
        assert!(err.to_string().contains("does not implement it; accepted:"));
    }
    let esp_err = parse_err(Protocol::Esp, "aes128gcm16-blah").to_string();
    assert!(esp_err.contains("esn, noesn"), "{esp_err}");
    assert!(
        !esp_err.contains("prfsha256"),
        "ESP lists only ESP names: {esp_err}"
    );
}

#[test]
fn nonsensical_combinations_are_rejected() {
    let invalid = |protocol, text: &str, needle: &str| {
        let err = parse_err(protocol, text);
        assert!(
            matches!(err, ProposalError::Invalid { .. }),
            "{text}: {err}"
        );
        assert!(err.to_string().contains(needle), "{text}: {err}");
    };
    invalid(
        Protocol::Ike,
        "aes128gcm16-sha256-x25519",
        "AEAD cipher and protects integrity",
    );
    invalid(
        Protocol::Ike,
        "aes128-prfsha256-modp2048",
        "does not protect integrity",
    );
    invalid(Protocol::Ike, "aes128gcm16-prfsha256", "no DH group");
    invalid(Protocol::Ike, "aes128gcm16-x25519", "no PRF");
    invalid(
        Protocol::Ike,
        "aes128-aes128gcm16-sha256-modp2048",
        "mixes AEAD and non-AEAD",
    );
    invalid(Protocol::Ike, "sha256-modp2048", "no encryption");
    invalid(Protocol::Esp, "x25519", "no encryption");
    invalid(Protocol::Ike, "aes128gcm16--x25519", "empty algorithm name");

    let wrong = |protocol, text: &str, token: &str| {
        let err = parse_err(protocol, text);
        assert!(
            matches!(&err, ProposalError::WrongProtocol { token: t, .. } if t == token),
            "{text}: {err}"
        );
    };
    wrong(Protocol::Esp, "aes128gcm16-prfsha256", "prfsha256");
    wrong(Protocol::Esp, "aes128gcm16-sha256", "sha256");
    wrong(Protocol::Esp, "aes128-sha256", "aes128");
    wrong(Protocol::Ike, "aes128gcm16-prfsha256-x25519-esn", "esn");

    assert!(matches!(
        parse_err(Protocol::Ike, "aes128gcm16-aes128gcm128-prfsha256-x25519"),
        ProposalError::Duplicate { token, .. } if token == "aes128gcm128"
    ));
    assert_eq!(
        parse_err(Protocol::Esp, "  "),
        ProposalError::Empty {
            protocol: Protocol::Esp
        }
    );
    assert_eq!(
        parse_err(Protocol::Ike, "aes128gcm16-prfsha256").to_string(),
        "IKE proposal `aes128gcm16-prfsha256`: names no DH group, which IKE needs (e.g. `x25519`)"
    );
}

#[test]
fn parses_lists() {
    let list = parse_proposals(
        Protocol::Ike,
        "aes128gcm16-prfsha256-x25519, aes256-sha256-modp2048,",
    )
    .unwrap();
    assert_eq!(
        list,
        [
            ike("aes128gcm16-prfsha256-x25519"),
            ike("aes256-sha256-modp2048")
        ]
    );
    assert_eq!(
        parse_proposals(Protocol::Esp, " , ").unwrap_err(),
        ProposalError::Empty {
            protocol: Protocol::Esp
        }
    );
    assert!(parse_proposals(Protocol::Esp, "aes128gcm16, sha1").is_err());
    let many = vec!["aes128gcm16"; MAX_PROPOSALS + 1].join(",");
    assert!(matches!(
        parse_proposals(Protocol::Esp, &many),
        Err(ProposalError::TooMany { .. })
    ));
}

#[test]
fn transform_ids_are_iana_values() {
    let t = |e: Encryption| (e.iana_id(), e.key_length_attribute());
    assert_eq!(t(Encryption::Aes128Cbc), (12, Some(128)));
    assert_eq!(t(Encryption::Aes256Cbc), (12, Some(256)));
    assert_eq!(t(Encryption::Aes128Gcm16), (20, Some(128)));
    assert_eq!(t(Encryption::Aes256Gcm16), (20, Some(256)));
    assert_eq!(t(Encryption::ChaCha20Poly1305), (28, None));
    assert_eq!(Prf::ALL.map(Prf::iana_id), [5, 6, 7]);
    assert_eq!(Integrity::ALL.map(Integrity::iana_id), [12, 13, 14]);
    assert_eq!(DhGroup::ALL.map(DhGroup::iana_id), [14, 19, 20, 31]);
    assert_eq!([Esn::No, Esn::Yes].map(Esn::transform_id), [0, 1]);
    for g in DhGroup::ALL {
        assert_eq!(DhGroup::from_iana_id(g.iana_id()), Some(g));
    }
    assert_eq!(DhGroup::from_iana_id(28), None);
    assert_eq!(
        Encryption::Aes256Gcm16.aead_alg(),
        Some(AeadAlg::Aes256Gcm16)
    );
    assert_eq!(Encryption::Aes128Cbc.aead_alg(), None);
    assert_eq!(Encryption::ChaCha20Poly1305.key_bytes(), 32);
    assert_eq!(Encryption::Aes128Gcm16.salt_bytes(), 4);
    assert_eq!(Encryption::Aes256Cbc.salt_bytes(), 0);
    // A transform is ours only with exactly the attributes it must have.
    assert_eq!(
        Encryption::from_transform(&transform((ENCR, 20, Some(192)))),
        None
    );
    assert_eq!(
        Encryption::from_transform(&transform((ENCR, 20, None))),
        None
    );
    assert_eq!(
        Encryption::from_transform(&transform((ENCR, 28, Some(256)))),
        None
    );
    assert_eq!(
        Encryption::from_transform(&transform((ENCR, 28, None))),
        Some(Encryption::ChaCha20Poly1305)
    );
}

#[test]
fn converts_to_sa_proposals_and_back() {
    let p = ike("aes128gcm16-prfsha256-x25519");
    // The SA payload of the hand-assembled IKE_SA_INIT of the message tests.
    assert_eq!(
        offer(std::slice::from_ref(&p), &[], NEGOTIATE),
        ike_sa(&[&[(ENCR, 20, Some(128)), (PRF, 5, None), (DH, 31, None)]])
    );
    let cbc = ike("aes256-sha256-modp2048");
    assert_eq!(
        cbc.to_sa_proposal(3, vec![1; 8], NEGOTIATE),
        sa_proposal(
            3,
            ProtocolId::IKE,
            &[1; 8],
            &[
                (ENCR, 12, Some(256)),
                (INTEG, 12, None),
                (PRF, 5, None),
                (DH, 14, None)
            ]
        )
    );
    let child = esp("aes256gcm16-x25519-esn");
    assert_eq!(
        child.to_sa_proposal(1, vec![0, 0, 0, 7], NEGOTIATE),
        sa_proposal(
            1,
            ProtocolId::ESP,
            &[0, 0, 0, 7],
            &[(ENCR, 20, Some(256)), (DH, 31, None), (ESN, 1, None)]
        )
    );
    // In IKE_AUTH the DH transforms are left out.
    assert_eq!(
        child.to_sa_proposal(1, vec![0, 0, 0, 7], DhMode::Skip),
        sa_proposal(
            1,
            ProtocolId::ESP,
            &[0, 0, 0, 7],
            &[(ENCR, 20, Some(256)), (ESN, 1, None)]
        )
    );

    for p in [
        ike("aes128gcm16-prfsha256-x25519"),
        ike("aes256-sha256-modp2048"),
        ike("aes128-sha256-ecp256"),
        ike("aes256gcm16-prfsha384-ecp384"),
        ike("aes128-aes256-sha256-sha384-prfsha512-modp2048-ecp256"),
        esp("aes128gcm16"),
        esp("aes256gcm16-esn"),
        esp("chacha20poly1305"),
        esp("aes128gcm16-x25519"),
        esp("aes128gcm16-chacha20poly1305-esn-noesn"),
    ] {
        let spi = if p.protocol == Protocol::Esp {
            vec![0, 0, 0, 1]
        } else {
            vec![]
        };
        let sa = p.to_sa_proposal(1, spi, NEGOTIATE);
        assert_eq!(Proposal::from_sa_proposal(&sa).unwrap(), p, "{p}");
        // And through the wire format.
        let bytes = Message::new(
            message::Header::request(message::ExchangeType::IKE_SA_INIT, 1, 0, 0, true),
            vec![Payload::Sa(SaPayload {
                proposals: vec![sa],
            })],
        )
        .encode()
        .unwrap();
        let decoded = Message::decode(&bytes).unwrap();
        let back = &decoded.payloads.sa().unwrap().proposals[0];
        assert_eq!(Proposal::from_sa_proposal(back).unwrap(), p);
    }

    // strongSwan's proposal of the Wireshark sample capture.
    let captured = ike_sa(&[&[(ENCR, 20, Some(256)), (PRF, 5, None), (DH, 19, None)]]);
    assert_eq!(
        Proposal::from_sa_proposal(&captured.proposals[0])
            .unwrap()
            .to_string(),
        "aes256gcm16-prfsha256-ecp256"
    );
    // Transforms bitw does not implement have no proposal string.
    let ctr = sa_proposal(
        3,
        ProtocolId::IKE,
        &[],
        &[
            (ENCR, 13, Some(128)),
            (INTEG, 12, None),
            (PRF, 5, None),
            (DH, 28, None),
        ],
    );
    let err = Proposal::from_sa_proposal(&ctr).unwrap_err();
    assert_eq!(
        err.to_string(),
        "SA proposal #3 (IKE:encr13_128-sha256-prfsha256-dh28): a transform bitw does not implement"
    );
}

/// The SA payload of the captured IKE_SA_INIT of rusticata/ipsec-parser
/// (see the message tests): AES-GCM-16-128 with DH 28 and with DH 19, then
/// AES-CTR with the same.
fn rusticata_sa() -> SaPayload {
    let gcm = |dh| [(ENCR, 20, Some(128)), (PRF, 5, None), (DH, dh, None)];
    let ctr = |dh| {
        [
            (ENCR, 13, Some(128)),
            (INTEG, 12, None),
            (PRF, 5, None),
            (DH, dh, None),
        ]
    };
    ike_sa(&[&gcm(28), &gcm(19), &ctr(28), &ctr(19)])
}

#[test]
fn picks_the_peers_second_proposal_when_the_first_does_not_fit() {
    let ours = [ike("aes128gcm16-prfsha256-ecp256")];
    let agreed = select(&ours, &rusticata_sa(), NEGOTIATE).unwrap();
    assert_eq!(agreed.number, 2);
    assert!(agreed.peer_spi.is_empty());
    assert_eq!(
        agreed.suite,
        Suite::Ike(IkeSuite {
            encryption: Encryption::Aes128Gcm16,
            integrity: None,
            prf: Prf::HmacSha256,
            dh: DhGroup::Ecp256,
        })
    );
    assert_eq!(agreed.suite.to_string(), "aes128gcm16-prfsha256-ecp256");
    assert_eq!(
        agreed.reply(vec![]),
        SaPayload {
            proposals: vec![sa_proposal(
                2,
                ProtocolId::IKE,
                &[],
                &[(ENCR, 20, Some(128)), (PRF, 5, None), (DH, 19, None)]
            )]
        }
    );
    assert_eq!(agreed.ike().unwrap().dh, DhGroup::Ecp256);
    assert!(agreed.esp().is_none());
}

#[test]
fn dh_group_mismatch_is_no_proposal_chosen() {
    let ours = [ike("aes128gcm16-prfsha256-x25519")];
    let err = select(&ours, &rusticata_sa(), NEGOTIATE).unwrap_err();
    assert_eq!(
        err.offered,
        "IKE:aes128gcm16-prfsha256-dh28, IKE:aes128gcm16-prfsha256-ecp256, \
         IKE:encr13_128-sha256-prfsha256-dh28, IKE:encr13_128-sha256-prfsha256-ecp256"
    );
    assert_eq!(err.accepted, "IKE:aes128gcm16-prfsha256-x25519");
    assert!(err
        .to_string()
        .starts_with("no proposal chosen: the peer offered IKE:"));
}

#[test]
fn key_length_must_match() {
    let ours = [ike("aes256gcm16-prfsha256-x25519")];
    for key in [Some(128), Some(192), None] {
        let peer = ike_sa(&[&[(ENCR, 20, key), (PRF, 5, None), (DH, 31, None)]]);
        assert!(select(&ours, &peer, NEGOTIATE).is_err(), "{key:?}");
    }
    let peer = ike_sa(&[&[
        (ENCR, 20, Some(128)),
        (ENCR, 20, Some(256)),
        (PRF, 5, None),
        (DH, 31, None),
    ]]);
    let agreed = select(&ours, &peer, NEGOTIATE).unwrap();
    assert_eq!(agreed.ike().unwrap().encryption, Encryption::Aes256Gcm16);
    assert_eq!(agreed.transforms[0], transform((ENCR, 20, Some(256))));
}

#[test]
fn esn_required_or_not() {
    let with = |esn: &[u16]| {
        let mut t: Vec<T> = vec![(ENCR, 20, Some(128))];
        t.extend(esn.iter().map(|id| (ESN, *id, None)));
        esp_sa(&[&t])
    };
    let esn_only = [esp("aes128gcm16-esn")];
    let default = [esp("aes128gcm16")];
    let either = [esp("aes128gcm16-esn-noesn")];

    assert!(select(&esn_only, &with(&[0]), DhMode::Skip).is_err());
    assert_eq!(
        select(&esn_only, &with(&[1, 0]), DhMode::Skip)
            .unwrap()
            .esp()
            .unwrap()
            .esn,
        Esn::Yes
    );
    assert!(select(&default, &with(&[1]), DhMode::Skip).is_err());
    let agreed = select(&default, &with(&[1, 0]), DhMode::Skip).unwrap();
    assert_eq!(agreed.esp().unwrap().esn, Esn::No);
    assert_eq!(agreed.transforms.last(), Some(&transform((ESN, 0, None))));
    // The peer's preference among what we accept.
    assert_eq!(
        select(&either, &with(&[0, 1]), DhMode::Skip)
            .unwrap()
            .esp()
            .unwrap()
            .esn,
        Esn::No
    );
    // No ESN transform at all: no ESN, and none echoed.
    let agreed = select(&default, &with(&[]), DhMode::Skip).unwrap();
    assert_eq!(agreed.esp().unwrap().esn, Esn::No);
    assert_eq!(agreed.transforms, [transform((ENCR, 20, Some(128)))]);
    assert!(select(&esn_only, &with(&[]), DhMode::Skip).is_err());
}

#[test]
fn the_peers_order_decides_among_alternatives() {
    // Encryption: the peer prefers AES-256.
    let ours = [ike("aes128gcm16-aes256gcm16-prfsha256-prfsha384-x25519")];
    let peer = ike_sa(&[&[
        (ENCR, 20, Some(256)),
        (ENCR, 20, Some(128)),
        (PRF, 6, None),
        (PRF, 5, None),
        (DH, 31, None),
    ]]);
    let s = *select(&ours, &peer, NEGOTIATE).unwrap().ike().unwrap();
    assert_eq!(
        (s.encryption, s.prf),
        (Encryption::Aes256Gcm16, Prf::HmacSha384)
    );

    // Proposals: the peer's first proposal wins even if it is our second.
    let ours = [
        ike("aes128gcm16-prfsha256-x25519"),
        ike("aes256gcm16-prfsha256-x25519"),
    ];
    let peer = ike_sa(&[
        &[(ENCR, 20, Some(256)), (PRF, 5, None), (DH, 31, None)],
        &[(ENCR, 20, Some(128)), (PRF, 5, None), (DH, 31, None)],
    ]);
    let agreed = select(&ours, &peer, NEGOTIATE).unwrap();
    assert_eq!(agreed.number, 1);
    assert_eq!(agreed.ike().unwrap().encryption, Encryption::Aes256Gcm16);
}

#[test]
fn the_ke_payloads_group_is_preferred() {
    let ours = [ike("aes128gcm16-prfsha256-ecp256-x25519")];
    let peer = ike_sa(&[&[
        (ENCR, 20, Some(128)),
        (PRF, 5, None),
        (DH, 19, None),
        (DH, 31, None),
    ]]);
    let dh = |mode| select(&ours, &peer, mode).unwrap().ike().unwrap().dh;
    assert_eq!(dh(NEGOTIATE), DhGroup::Ecp256);
    assert_eq!(
        dh(DhMode::Negotiate { ke_group: Some(31) }),
        DhGroup::Curve25519
    );
    // A KE group the proposal does not allow changes nothing: the engine
    // then answers INVALID_KE_PAYLOAD with the chosen group.
    assert_eq!(
        dh(DhMode::Negotiate { ke_group: Some(14) }),
        DhGroup::Ecp256
    );
}

#[test]
fn integrity_with_and_without_aead() {
    // AEAD with INTEG NONE offered: NONE is echoed.
    let ours = [ike("aes128gcm16-prfsha256-x25519")];
    let peer = ike_sa(&[&[
        (ENCR, 20, Some(128)),
        (INTEG, 0, None),
        (PRF, 5, None),
        (DH, 31, None),
    ]]);
    let agreed = select(&ours, &peer, NEGOTIATE).unwrap();
    assert_eq!(agreed.transforms[1], transform((INTEG, 0, None)));
    assert_eq!(agreed.ike().unwrap().integrity, None);
    // AEAD with only real integrity algorithms: not a valid choice.
    let peer = ike_sa(&[&[
        (ENCR, 20, Some(128)),
        (INTEG, 12, None),
        (PRF, 5, None),
        (DH, 31, None),
    ]]);
    assert!(select(&ours, &peer, NEGOTIATE).is_err());

    // CBC: the first integrity algorithm and PRF of the peer that we accept.
    let ours = [ike("aes128-sha256-sha512-modp2048")];
    let peer = ike_sa(&[&[
        (ENCR, 12, Some(128)),
        (INTEG, 2, None),
        (INTEG, 14, None),
        (INTEG, 12, None),
        (PRF, 2, None),
        (PRF, 7, None),
        (PRF, 5, None),
        (DH, 14, None),
    ]]);
    let agreed = select(&ours, &peer, NEGOTIATE).unwrap();
    assert_eq!(agreed.suite.to_string(), "aes128-sha512-modp2048");
    assert_eq!(
        agreed.transforms,
        [
            (ENCR, 12, Some(128)),
            (INTEG, 14, None),
            (PRF, 7, None),
            (DH, 14, None)
        ]
        .map(transform)
    );
    // CBC without integrity, or with INTEG NONE only: refused.
    let peer = ike_sa(&[&[
        (ENCR, 12, Some(128)),
        (INTEG, 0, None),
        (PRF, 5, None),
        (DH, 14, None),
    ]]);
    assert!(select(&ours, &peer, NEGOTIATE).is_err());
}

#[test]
fn proposals_with_unknown_or_foreign_parts_are_skipped() {
    let ours = [ike("aes128gcm16-prfsha256-x25519")];
    let good: [T; 3] = [(ENCR, 20, Some(128)), (PRF, 5, None), (DH, 31, None)];
    // An unknown transform type (RFC 9370's additional key exchanges).
    let mut extra = good.to_vec();
    extra.push((TransformType(6), 36, None));
    assert!(select(&ours, &ike_sa(&[&extra]), NEGOTIATE).is_err());
    // An ESN transform in an IKE proposal.
    let mut extra = good.to_vec();
    extra.push((ESN, 0, None));
    assert!(select(&ours, &ike_sa(&[&extra]), NEGOTIATE).is_err());
    // An unknown attribute on the cipher.
    let mut peer = ike_sa(&[&good]);
    peer.proposals[0].transforms[0]
        .attributes
        .push(message::Attribute {
            attribute_type: 99,
            value: message::AttributeValue::Tv(1),
        });
    assert!(select(&ours, &peer, NEGOTIATE).is_err());
    // Missing PRF or DH.
    assert!(select(&ours, &ike_sa(&[&good[..2]]), NEGOTIATE).is_err());
    assert!(select(&ours, &ike_sa(&[&[good[0], good[2]]]), NEGOTIATE).is_err());
    // SPI sizes: IKE 0 (IKE_SA_INIT) or 8 (rekey); ESP 4.
    let mut peer = ike_sa(&[&good]);
    peer.proposals[0].spi = vec![1; 8];
    assert_eq!(
        select(&ours, &peer, NEGOTIATE).unwrap().peer_spi,
        vec![1; 8]
    );
    peer.proposals[0].spi = vec![1; 4];
    assert!(select(&ours, &peer, NEGOTIATE).is_err());
    let mut peer = esp_sa(&[&[(ENCR, 20, Some(128))]]);
    assert!(select(&[esp("aes128gcm16")], &peer, DhMode::Skip).is_ok());
    peer.proposals[0].spi = vec![];
    assert!(select(&[esp("aes128gcm16")], &peer, DhMode::Skip).is_err());
    // Protocol mismatch; IKE cannot skip DH.
    assert!(select(&[esp("aes128gcm16")], &ike_sa(&[&good]), NEGOTIATE).is_err());
    assert!(select(&ours, &ike_sa(&[&good]), DhMode::Skip).is_err());
    // Empty SA payload.
    let err = select(&ours, &SaPayload::default(), NEGOTIATE).unwrap_err();
    assert_eq!(err.offered, "nothing (an empty SA payload)");
}

#[test]
fn esp_pfs() {
    let pfs = [esp("aes128gcm16-x25519")];
    let no_pfs = [esp("aes128gcm16")];
    let peer = |dh: &[u16]| {
        let mut t: Vec<T> = vec![(ENCR, 20, Some(128))];
        t.extend(dh.iter().map(|id| (DH, *id, None)));
        t.push((ESN, 0, None));
        esp_sa(&[&t])
    };
    // CREATE_CHILD_SA with a KE payload.
    let agreed = select(&pfs, &peer(&[31]), NEGOTIATE).unwrap();
    assert_eq!(agreed.esp().unwrap().dh, Some(DhGroup::Curve25519));
    assert_eq!(agreed.peer_spi, [0xc0, 0, 0, 1]);
    assert_eq!(agreed.suite.to_string(), "aes128gcm16-x25519");
    assert!(
        select(&pfs, &peer(&[]), NEGOTIATE).is_err(),
        "we require PFS"
    );
    assert!(
        select(&pfs, &peer(&[0]), NEGOTIATE).is_err(),
        "we require PFS"
    );
    assert!(select(&pfs, &peer(&[19]), NEGOTIATE).is_err());
    // Without PFS: acceptable unless the peer insists; NONE is echoed.
    assert!(select(&no_pfs, &peer(&[31]), NEGOTIATE).is_err());
    let agreed = select(&no_pfs, &peer(&[31, 0]), NEGOTIATE).unwrap();
    assert_eq!(agreed.esp().unwrap().dh, None);
    assert!(agreed.transforms.contains(&transform((DH, 0, None))));
    assert!(select(&no_pfs, &peer(&[]), NEGOTIATE).is_ok());
    // IKE_AUTH: DH ignored on both sides and not echoed.
    let agreed = select(&pfs, &peer(&[]), DhMode::Skip).unwrap();
    assert_eq!(agreed.esp().unwrap().dh, None);
    let agreed = select(&pfs, &peer(&[19]), DhMode::Skip).unwrap();
    assert_eq!(
        agreed.transforms,
        [(ENCR, 20, Some(128)), (ESN, 0, None)].map(transform)
    );
    // The reply carries our SPI, not the peer's.
    let reply = agreed.reply(vec![0xbe, 0xef, 0, 1]);
    assert_eq!(reply.proposals[0].spi, [0xbe, 0xef, 0, 1]);
    assert_eq!(reply.proposals[0].protocol, ProtocolId::ESP);
    assert_eq!(reply.proposals[0].number, 1);
}

#[test]
fn initiator_checks_the_reply() {
    let ours = [
        ike("aes256gcm16-prfsha384-ecp384"),
        ike("aes128gcm16-prfsha256-x25519-ecp256"),
    ];
    assert_eq!(preferred_dh_group(&ours), Some(DhGroup::Ecp384));
    let offered = offer(&ours, &[], NEGOTIATE);
    assert_eq!(offered.proposals.len(), 2);
    assert_eq!(offered.proposals[1].number, 2);

    // A responder that accepts only our second proposal, as select() would.
    let responder = [ike("aes128gcm16-prfsha256-x25519")];
    let chosen = select(
        &responder,
        &offered,
        DhMode::Negotiate { ke_group: Some(20) },
    )
    .unwrap();
    let reply = chosen.reply(vec![]);
    let ok = accept_reply(&ours, &reply, DhMode::Negotiate { ke_group: Some(31) }).unwrap();
    assert_eq!(ok.number, 2);
    assert_eq!(ok.suite, chosen.suite);
    // It chose x25519 while our KE was for ecp384: we must switch groups.
    assert_eq!(
        accept_reply(&ours, &reply, DhMode::Negotiate { ke_group: Some(20) }).unwrap_err(),
        ReplyError::DhGroupMismatch {
            ke_group: 20,
            chosen: 31
        }
    );

    let mut bad = reply.clone();
    bad.proposals.push(bad.proposals[0].clone());
    assert_eq!(
        accept_reply(&ours, &bad, NEGOTIATE).unwrap_err(),
        ReplyError::ProposalCount(2)
    );
    let mut bad = reply.clone();
    bad.proposals[0].number = 9;
    assert_eq!(
        accept_reply(&ours, &bad, NEGOTIATE).unwrap_err(),
        ReplyError::UnknownNumber(9)
    );
    let mut bad = reply.clone();
    bad.proposals[0].transforms.push(transform((DH, 19, None)));
    assert_eq!(
        accept_reply(&ours, &bad, NEGOTIATE).unwrap_err(),
        ReplyError::NotSingle(DH)
    );
    // A choice from the wrong proposal.
    let mut bad = reply.clone();
    bad.proposals[0].transforms[0] = transform((ENCR, 20, Some(256)));
    let err = accept_reply(&ours, &bad, NEGOTIATE).unwrap_err();
    assert_eq!(
        err.to_string(),
        "the reply's IKE:aes256gcm16-prfsha256-x25519 is not a choice from our proposal #2: \
         aes128gcm16-prfsha256-x25519-ecp256"
    );
    // A missing mandatory transform.
    let mut bad = reply.clone();
    bad.proposals[0].transforms.pop();
    assert!(matches!(
        accept_reply(&ours, &bad, NEGOTIATE),
        Err(ReplyError::NotOffered { .. })
    ));

    // ESP in IKE_AUTH: DH must not come back.
    let ours = [esp("aes128gcm16-x25519")];
    let offered = offer(&ours, &[0, 0, 0, 5], DhMode::Skip);
    assert!(offered.proposals[0]
        .transforms
        .iter()
        .all(|t| t.transform_type != DH));
    let chosen = select(&ours, &offered, DhMode::Skip).unwrap();
    let reply = chosen.reply(vec![0, 0, 0, 6]);
    let ok = accept_reply(&ours, &reply, DhMode::Skip).unwrap();
    assert_eq!(ok.peer_spi, [0, 0, 0, 6]);
    let mut bad = reply;
    bad.proposals[0].transforms.push(transform((DH, 31, None)));
    assert!(accept_reply(&ours, &bad, DhMode::Skip).is_err());
}

#[test]
fn responds_to_a_decoded_message_and_the_reply_encodes() {
    // End to end through the wire format: the peer's SA payload from bytes,
    // our reply to bytes and back.
    let request = Message::new(
        message::Header::request(message::ExchangeType::IKE_SA_INIT, 7, 0, 0, true),
        vec![Payload::Sa(rusticata_sa())],
    );
    let received = Message::decode(&request.encode().unwrap()).unwrap();
    let ours = parse_proposals(
        Protocol::Ike,
        "aes256gcm16-prfsha384-ecp384, aes128gcm16-prfsha256-ecp256",
    )
    .unwrap();
    let agreed = select(&ours, received.payloads.sa().unwrap(), NEGOTIATE).unwrap();
    let response = Message::new(
        received.header.response(),
        vec![Payload::Sa(agreed.reply(vec![]))],
    );
    let back = Message::decode(&response.encode().unwrap()).unwrap();
    let reply_sa = back.payloads.sa().unwrap();
    assert_eq!(describe_sa(reply_sa), "IKE:aes128gcm16-prfsha256-ecp256");
    // The initiator (who offered rusticata_sa) would accept it.
    let initiator = [
        ike("aes128gcm16-prfsha256-modp2048"), // stands in for DH 28
        ike("aes128gcm16-prfsha256-ecp256"),
    ];
    assert_eq!(
        accept_reply(&initiator, reply_sa, NEGOTIATE).unwrap().suite,
        agreed.suite
    );
}

#[test]
fn describes_unknown_transforms() {
    let p = sa_proposal(
        1,
        ProtocolId(9),
        &[],
        &[
            (ENCR, 3, None),
            (INTEG, 0, None),
            (DH, 0, None),
            (TransformType(7), 2, None),
        ],
    );
    assert_eq!(
        describe_proposal(&p),
        "protocol9:encr3-integnone-dhnone-type7_2"
    );
}

// ---------------------------------------------------------------------------
// Against a real strongSwan session (control/tests/ike_vectors/): as
// responder, our selection is exactly strongSwan's reply; as initiator,
// strongSwan's replies are accepted.

use crate::ike::message::strongswan_vectors::session;
use crate::ike::message::ExchangeType;

#[test]
fn chooses_what_strongswan_chose_and_accepts_its_replies() {
    let s = session();
    let ike_config = [ike("aes128gcm16-prfsha256-x25519")];
    let esp_config = [esp("aes128gcm16-x25519")];

    // IKE_SA_INIT.
    let request = Message::decode(&s.find(ExchangeType::IKE_SA_INIT, false).bytes).unwrap();
    let response = Message::decode(&s.find(ExchangeType::IKE_SA_INIT, true).bytes).unwrap();
    let ke_group = Some(request.payloads.ke().unwrap().group);
    let agreed = select(
        &ike_config,
        request.payloads.sa().unwrap(),
        DhMode::Negotiate { ke_group },
    )
    .unwrap();
    assert_eq!(&agreed.reply(vec![]), response.payloads.sa().unwrap());
    assert_eq!(agreed.suite.to_string(), "aes128gcm16-prfsha256-x25519");
    assert_eq!(
        offer(&ike_config, &[], NEGOTIATE),
        *request.payloads.sa().unwrap()
    );
    let accepted = accept_reply(
        &ike_config,
        response.payloads.sa().unwrap(),
        DhMode::Negotiate { ke_group },
    )
    .unwrap();
    assert_eq!(accepted.suite, agreed.suite);

    // IKE_AUTH: the first Child SA, no KE payload, so no DH.
    let request = s.inner(&s.find(ExchangeType::IKE_AUTH, false).bytes);
    let response = s.inner(&s.find(ExchangeType::IKE_AUTH, true).bytes);
    let peer_sa = request.sa().unwrap();
    let reply_sa = response.sa().unwrap();
    let agreed = select(&esp_config, peer_sa, DhMode::Skip).unwrap();
    assert_eq!(agreed.peer_spi, peer_sa.proposals[0].spi);
    assert_eq!(agreed.reply(reply_sa.proposals[0].spi.clone()), *reply_sa);
    assert_eq!(
        agreed.esp().unwrap(),
        &EspSuite {
            encryption: Encryption::Aes128Gcm16,
            integrity: None,
            dh: None,
            esn: Esn::No,
        }
    );
    assert_eq!(
        offer(&esp_config, &peer_sa.proposals[0].spi, DhMode::Skip),
        *peer_sa
    );
    let accepted = accept_reply(&esp_config, reply_sa, DhMode::Skip).unwrap();
    assert_eq!(accepted.peer_spi, reply_sa.proposals[0].spi);

    // CREATE_CHILD_SA rekeying the Child SA with PFS.
    let request = s.inner(&s.find(ExchangeType::CREATE_CHILD_SA, false).bytes);
    let response = s.inner(&s.find(ExchangeType::CREATE_CHILD_SA, true).bytes);
    let ke_group = Some(request.ke().unwrap().group);
    let peer_sa = request.sa().unwrap();
    let reply_sa = response.sa().unwrap();
    let agreed = select(&esp_config, peer_sa, DhMode::Negotiate { ke_group }).unwrap();
    assert_eq!(agreed.reply(reply_sa.proposals[0].spi.clone()), *reply_sa);
    assert_eq!(agreed.suite.to_string(), "aes128gcm16-x25519");
    assert_eq!(
        offer(&esp_config, &peer_sa.proposals[0].spi, NEGOTIATE),
        *peer_sa
    );
    let ke_group = Some(response.ke().unwrap().group);
    assert!(accept_reply(&esp_config, reply_sa, DhMode::Negotiate { ke_group }).is_ok());
}
