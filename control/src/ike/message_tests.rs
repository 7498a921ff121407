//! Tests of the IKEv2 wire format: hand-assembled and captured messages,
//! round trips of every payload kind, a malformed-message corpus, and
//! property tests that no input panics the decoder.

use super::*;
use proptest::prelude::*;

fn unhex(parts: &[&str]) -> Vec<u8> {
    hex::decode(parts.concat()).expect("test vector hex")
}

/// IKE_SA_INIT request assembled by hand from the layouts of RFC 7296 §3:
/// AES-GCM-16 with a 128-bit key, PRF_HMAC_SHA2_256, group 31 (Curve25519),
/// KE, Nonce and the two NAT detection notifies. The KE data is Alice's
/// public key of RFC 7748 §6.1; the NAT-D hashes were computed separately
/// (Python's hashlib) for 192.0.2.1:500 → 198.51.100.2:500.
fn hand_sa_init() -> Vec<u8> {
    unhex(&[
        // IKE header: SPIi, SPIr = 0
        "5f31a2b90c4d7e18",
        "0000000000000000",
        // next payload SA (33), version 2.0, IKE_SA_INIT (34), flags I
        "21202208",
        // message ID 0, length 200
        "00000000",
        "000000c8",
        // SA: next KE (34), not critical, length 40
        "22000028",
        // proposal: last, length 36, #1, IKE (1), SPI size 0, 3 transforms
        "00000024",
        "01010003",
        // ENCR (1) AES-GCM-16 (20), Key Length (14, TV) 128
        "0300000c",
        "01000014",
        "800e0080",
        // PRF (2) HMAC_SHA2_256 (5)
        "03000008",
        "02000005",
        // DH (4) Curve25519 (31), last transform
        "00000008",
        "0400001f",
        // KE: next Nonce (40), length 40, group 31, reserved
        "28000028",
        "001f0000",
        "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a",
        // Nonce: next Notify (41), length 36
        "29000024",
        "a0a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3b4b5b6b7b8b9babbbcbdbebf",
        // Notify: next Notify, length 28, protocol 0, SPI size 0, NAT_DETECTION_SOURCE_IP
        "2900001c",
        "00004004",
        "e6896926d152fcab115fde5529357823f56c09e2",
        // Notify: last payload, length 28, NAT_DETECTION_DESTINATION_IP
        "0000001c",
        "00004005",
        "a92988512baf9efc64054f6fb638a2427e246f9a",
    ])
}

/// A captured IKE_SA_INIT request from strongSwan: the Wireshark sample
/// capture "Dissection of encrypted (and UDP-encapsulated) IKEv2 and ESP
/// messages" (wiki.wireshark.org/SampleCaptures), as quoted in the test
/// suite of CybercentreCanada/sawp (sawp-ike/tests/ikev2_parse.rs).
/// AES-GCM-16-256 / PRF_HMAC_SHA2_256 / ECP-256, three vendor IDs, and the
/// FRAGMENTATION_SUPPORTED, REDIRECT_SUPPORTED and SIGNATURE_HASH_ALGORITHMS
/// notifies.
fn wireshark_sa_init() -> Vec<u8> {
    unhex(&[
        "89922c915f35570e000000000000000021202208000000000000012c22000028",
        "00000024010100030300000c01000014800e0100030000080200000500000008",
        "040000132800004800130000db253178440ce776a794133cb8b69e5eb0747335",
        "36570c64d7b630549c899c0712d828b37168500885e051024578afc75c101f73",
        "b8943cad62d74a30f2be1fca2b00002c09cb538b2c3dbd4d0bb0eec8d318cb80",
        "1a9b4715b207828d9b5ff1f4ec64ed58863707bcf14ccf052b000014eb4c1b78",
        "8afd4a9cb7730a68d56c53212b000014c61baca1f1a60cc10800000000000000",
        "2b0000184048b7d56ebce88525e7de7f00d6c2d3c0000000290000144048b7d5",
        "6ebce88525e7de7f00d6c2d3290000080000402e290000080000401600000010",
        "0000402f0001000200030004",
    ])
}

/// A captured IKE_SA_INIT request on port 4500 (with the non-ESP marker),
/// from the test suite of rusticata/ipsec-parser (tests/ikev2.rs): four
/// proposals (AES-GCM-16-128 and AES-CTR-128 + HMAC-SHA2-256-128, each with
/// DH 28 and 19), a group-28 KE and a 32-byte nonce.
fn rusticata_sa_init_with_marker() -> Vec<u8> {
    unhex(&[
        "00000000bca1937a7c2ff5b9000000000000000021202208000000000000012c",
        "220000a402000024010100030300000c01000014800e00800300000802000005",
        "000000080400001c02000024020100030300000c01000014800e008003000008",
        "0200000500000008040000130200002c030100040300000c0100000d800e0080",
        "030000080300000c0300000802000005000000080400001c0000002c04010004",
        "0300000c0100000d800e0080030000080300000c030000080200000500000008",
        "0400001328000048001c00004d23b8f22c03ae3ab40af9fa76c23c7ba6c56981",
        "e13c32fbc36954c87a96cbfa34637c6f31b650ce5d8717005ce793c2eeaff1c5",
        "66280811d942d1b8e80268bb0000002499e2a373cc44ad10fb78dda25206a4a9",
        "b7558e0d8269799c6800362c46a0bf7b",
    ])
}

fn rusticata_sa_init() -> Vec<u8> {
    strip_non_esp_marker(&rusticata_sa_init_with_marker())
        .expect("the non-ESP marker")
        .to_vec()
}

#[test]
fn non_esp_marker() {
    let with_marker = rusticata_sa_init_with_marker();
    assert_eq!(strip_non_esp_marker(&with_marker), Some(&with_marker[4..]));
    // ESP (a non-zero SPI) and NAT-keepalives are not IKE.
    assert_eq!(strip_non_esp_marker(&[0, 0, 1, 0, 0, 0, 0, 1]), None);
    assert_eq!(strip_non_esp_marker(&[0xff]), None);
}

/// Every valid vector of this file.
fn valid_vectors() -> Vec<Vec<u8>> {
    vec![
        hand_sa_init(),
        wireshark_sa_init(),
        rusticata_sa_init(),
        every_payload_message().encode().unwrap(),
        sk_message().0,
    ]
}

fn assert_byte_exact(bytes: &[u8]) -> Message {
    let message = Message::decode(bytes).expect("decodes");
    assert_eq!(
        message.encode().expect("encodes"),
        bytes,
        "encode(decode(b)) == b"
    );
    message
}

#[test]
fn hand_assembled_sa_init_decodes_field_by_field() {
    let bytes = hand_sa_init();
    assert_eq!(bytes.len(), 200);
    let m = assert_byte_exact(&bytes);

    assert_eq!(m.header.spi_i, 0x5f31_a2b9_0c4d_7e18);
    assert_eq!(m.header.spi_r, 0);
    assert_eq!(m.header.exchange, ExchangeType::IKE_SA_INIT);
    assert_eq!(m.header.flags, Flags::INITIATOR);
    assert!(m.header.flags.is_initiator() && !m.header.flags.is_response());
    assert_eq!(m.header.message_id, 0);
    assert_eq!(m.header.minor_version, 0);
    assert_eq!(m.payloads.len(), 5);

    let sa = m.payloads.sa().expect("SA");
    assert_eq!(sa.proposals.len(), 1);
    let p = &sa.proposals[0];
    assert_eq!(p.number, 1);
    assert_eq!(p.protocol, ProtocolId::IKE);
    assert!(p.spi.is_empty());
    assert_eq!(
        p.transforms,
        vec![
            Transform::with_key_length(TransformType::ENCR, 20, 128),
            Transform::new(TransformType::PRF, 5),
            Transform::new(TransformType::DH, 31),
        ]
    );
    assert_eq!(p.transforms[0].key_length(), Some(128));
    assert_eq!(p.transforms[1].key_length(), None);

    let ke = m.payloads.ke().expect("KE");
    assert_eq!(ke.group, 31);
    assert_eq!(
        hex::encode(&ke.data),
        "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
    );
    let nonce = m.payloads.nonce().expect("Nonce");
    assert_eq!(nonce.len(), 32);
    assert_eq!(nonce[0], 0xa0);

    let src: SocketAddr = "192.0.2.1:500".parse().unwrap();
    let dst: SocketAddr = "198.51.100.2:500".parse().unwrap();
    let nat_s = m
        .payloads
        .notify(NotifyType::NAT_DETECTION_SOURCE_IP)
        .expect("NAT-D source");
    assert_eq!(nat_s.protocol, ProtocolId::NONE);
    assert!(nat_s.spi.is_empty());
    assert_eq!(nat_s.data, nat_detection_hash(m.header.spi_i, 0, src));
    let nat_d = m
        .payloads
        .notify(NotifyType::NAT_DETECTION_DESTINATION_IP)
        .expect("NAT-D destination");
    assert_eq!(nat_d.data, nat_detection_hash(m.header.spi_i, 0, dst));
    assert_eq!(m.payloads.notifies().count(), 2);
}

#[test]
fn hand_assembled_sa_init_is_what_the_builder_produces() {
    let spi_i = 0x5f31_a2b9_0c4d_7e18;
    let message = Message::new(
        Header::request(ExchangeType::IKE_SA_INIT, spi_i, 0, 0, true),
        vec![
            Payload::Sa(SaPayload {
                proposals: vec![Proposal {
                    number: 1,
                    protocol: ProtocolId::IKE,
                    spi: vec![],
                    transforms: vec![
                        Transform::with_key_length(TransformType::ENCR, 20, 128),
                        Transform::new(TransformType::PRF, 5),
                        Transform::new(TransformType::DH, 31),
                    ],
                }],
            }),
            Payload::Ke(KePayload {
                group: 31,
                data: hex::decode(
                    "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a",
                )
                .unwrap(),
            }),
            Payload::Nonce((0xa0..=0xbf).collect()),
            Payload::Notify(NotifyPayload::nat_detection_source(
                spi_i,
                0,
                "192.0.2.1:500".parse().unwrap(),
            )),
            Payload::Notify(NotifyPayload::nat_detection_destination(
                spi_i,
                0,
                "198.51.100.2:500".parse().unwrap(),
            )),
        ],
    );
    assert_eq!(message.encode().unwrap(), hand_sa_init());
}

#[test]
fn wireshark_strongswan_sa_init_decodes_and_round_trips() {
    let bytes = wireshark_sa_init();
    let m = assert_byte_exact(&bytes);
    assert_eq!(m.header.spi_i, 0x8992_2c91_5f35_570e);
    assert_eq!(m.header.exchange, ExchangeType::IKE_SA_INIT);
    assert_eq!(m.header.flags, Flags::INITIATOR);
    let types: Vec<PayloadType> = m.payloads.iter().map(Payload::payload_type).collect();
    assert_eq!(
        types,
        [
            PayloadType::SA,
            PayloadType::KE,
            PayloadType::NONCE,
            PayloadType::VENDOR_ID,
            PayloadType::VENDOR_ID,
            PayloadType::VENDOR_ID,
            PayloadType::VENDOR_ID,
            PayloadType::NOTIFY,
            PayloadType::NOTIFY,
            PayloadType::NOTIFY,
        ]
    );
    let p = &m.payloads.sa().unwrap().proposals[0];
    assert_eq!(p.transforms[0].id, 20);
    assert_eq!(p.transforms[0].key_length(), Some(256));
    assert_eq!(m.payloads.ke().unwrap().group, 19);
    assert_eq!(m.payloads.ke().unwrap().data.len(), 64);
    assert_eq!(m.payloads.nonce().unwrap().len(), 40);
    assert!(m
        .payloads
        .notify(NotifyType::IKEV2_FRAGMENTATION_SUPPORTED)
        .is_some());
    assert!(m.payloads.notify(NotifyType::REDIRECT_SUPPORTED).is_some());
    let sha = m
        .payloads
        .notify(NotifyType::SIGNATURE_HASH_ALGORITHMS)
        .unwrap();
    assert_eq!(
        *sha,
        NotifyPayload::signature_hash_algorithms(&[1, 2, 3, 4])
    );
}

#[test]
fn rusticata_sa_init_decodes_and_round_trips() {
    let bytes = rusticata_sa_init();
    let m = assert_byte_exact(&bytes);
    assert_eq!(m.header.spi_i, 0xbca1_937a_7c2f_f5b9);
    let sa = m.payloads.sa().unwrap();
    let numbers: Vec<u8> = sa.proposals.iter().map(|p| p.number).collect();
    assert_eq!(numbers, [1, 2, 3, 4]);
    let dh: Vec<u16> = sa
        .proposals
        .iter()
        .map(|p| {
            p.transforms
                .iter()
                .find(|t| t.transform_type == TransformType::DH)
                .unwrap()
                .id
        })
        .collect();
    assert_eq!(dh, [28, 19, 28, 19]);
    assert_eq!(sa.proposals[2].transforms.len(), 4);
    assert_eq!(
        sa.proposals[2].transforms[1],
        Transform::new(TransformType::INTEG, 12)
    );
    assert_eq!(m.payloads.ke().unwrap().group, 28);
    // With the non-ESP marker left on, it is not an IKE header.
    assert!(Message::decode(&rusticata_sa_init_with_marker()).is_err());
}

#[test]
fn message_view_exposes_raw_payloads() {
    let bytes = hand_sa_init();
    let view = MessageView::new_checked(&bytes).unwrap();
    assert_eq!(view.first_payload(), PayloadType::SA);
    assert_eq!(view.datagram(), &bytes[..]);
    let offsets: Vec<(usize, PayloadType, usize)> = view
        .payloads()
        .iter()
        .map(|p| (p.offset, p.payload_type, p.body.len()))
        .collect();
    assert_eq!(
        offsets,
        [
            (28, PayloadType::SA, 36),
            (68, PayloadType::KE, 36),
            (108, PayloadType::NONCE, 32),
            (144, PayloadType::NOTIFY, 24),
            (172, PayloadType::NOTIFY, 24),
        ]
    );
    assert!(view.encrypted().is_none());
    assert_eq!(
        view.decode_payloads().unwrap(),
        Message::decode(&bytes).unwrap().payloads
    );
}

/// One payload of every kind, SK last.
fn every_payload_message() -> Message {
    let header = Header {
        spi_i: 0x0102_0304_0506_0708,
        spi_r: 0x1112_1314_1516_1718,
        exchange: ExchangeType::IKE_AUTH,
        flags: Flags::INITIATOR,
        message_id: 1,
        minor_version: 0,
    };
    Message::new(
        header,
        vec![
            Payload::Sa(SaPayload {
                proposals: vec![
                    Proposal {
                        number: 1,
                        protocol: ProtocolId::ESP,
                        spi: vec![0xc0, 0xff, 0xee, 0x01],
                        transforms: vec![
                            Transform::with_key_length(TransformType::ENCR, 20, 256),
                            Transform::new(TransformType::ESN, 0),
                        ],
                    },
                    Proposal {
                        number: 2,
                        protocol: ProtocolId::ESP,
                        spi: vec![0xc0, 0xff, 0xee, 0x02],
                        transforms: vec![
                            Transform {
                                transform_type: TransformType::ENCR,
                                id: 1234,
                                attributes: vec![
                                    Attribute {
                                        attribute_type: 0x7fff,
                                        value: AttributeValue::Tlv(vec![1, 2, 3]),
                                    },
                                    Attribute {
                                        attribute_type: 1,
                                        value: AttributeValue::Tlv(vec![]),
                                    },
                                ],
                            },
                            Transform::new(TransformType::ESN, 1),
                            Transform::new(TransformType(6), 9),
                        ],
                    },
                ],
            }),
            Payload::Ke(KePayload {
                group: 14,
                data: vec![0x55; 256],
            }),
            Payload::IdI(IdPayload {
                id_type: IdType::FQDN,
                data: b"terminal.example".to_vec(),
            }),
            Payload::IdR(IdPayload::from_ip("2001:db8::7".parse().unwrap())),
            Payload::Cert(CertPayload {
                encoding: CertEncoding::X509_SIGNATURE,
                data: vec![0x30, 0x82, 0x01, 0x00],
            }),
            Payload::CertReq(CertPayload {
                encoding: CertEncoding::X509_SIGNATURE,
                data: vec![0xaa; 20],
            }),
            Payload::Auth(AuthPayload {
                method: AuthMethod::SHARED_KEY_MESSAGE_INTEGRITY_CODE,
                data: vec![0x42; 32],
            }),
            Payload::Nonce(vec![7; 16]),
            Payload::Notify(NotifyPayload::rekey_esp(0xc0ff_ee01)),
            Payload::Notify(NotifyPayload::new(NotifyType::USE_TRANSPORT_MODE, vec![])),
            Payload::Notify(NotifyPayload::new(NotifyType(40000), vec![9, 9])),
            Payload::Delete(DeletePayload::esp(&[1, 0xffff_ffff])),
            Payload::Delete(DeletePayload::ike()),
            Payload::VendorId(b"bitw".to_vec()),
            Payload::TsI(TsPayload {
                selectors: vec![
                    TrafficSelector::Range(TsRange {
                        ip_protocol: 17,
                        start_port: 500,
                        end_port: 4500,
                        addresses: AddressRange::V4 {
                            start: "10.0.0.0".parse().unwrap(),
                            end: "10.0.0.255".parse().unwrap(),
                        },
                    }),
                    TrafficSelector::Range(TsRange::host("2001:db8::1".parse().unwrap())),
                ],
            }),
            Payload::TsR(TsPayload {
                selectors: vec![TrafficSelector::Unknown {
                    ts_type: TsType::TS_SECLABEL,
                    byte1: 0,
                    data: b"system_u:object_r:ipsec_spd_t:s0".to_vec(),
                }],
            }),
            Payload::Config(vec![1, 0, 0, 0, 0, 1, 0, 0]),
            Payload::Eap(vec![1, 2, 0, 5, 1]),
            Payload::Unknown(UnknownPayload {
                payload_type: PayloadType(200),
                critical: false,
                body: vec![1, 2, 3],
            }),
            Payload::Encrypted(EncryptedPayload {
                first_inner: PayloadType::IDI,
                body: vec![0xee; 40],
            }),
        ],
    )
}

#[test]
fn every_payload_kind_round_trips() {
    let message = every_payload_message();
    let bytes = message.encode().unwrap();
    assert_eq!(Message::decode(&bytes).unwrap(), message);
    assert_byte_exact(&bytes);
    // Each alone (SK aside, which may only end a message) and inside an
    // inner chain as well.
    for payload in &message.payloads {
        let single = Message::new(message.header, vec![payload.clone()]);
        let bytes = single.encode().unwrap();
        assert_eq!(Message::decode(&bytes).unwrap(), single, "{payload:?}");
        if !matches!(payload, Payload::Encrypted(_)) {
            let (first, chain) = encode_payload_chain(std::slice::from_ref(payload)).unwrap();
            assert_eq!(first, payload.payload_type());
            assert_eq!(
                decode_payload_chain(first, &chain).unwrap(),
                std::slice::from_ref(payload)
            );
        }
    }
}

#[test]
fn payload_bodies_have_the_rfc_layout() {
    fn body(payload: Payload) -> String {
        let (_, chain) = encode_payload_chain(&[payload]).unwrap();
        hex::encode(&chain[GENERIC_HEADER_LEN..])
    }
    assert_eq!(
        body(Payload::Ke(KePayload {
            group: 19,
            data: vec![1, 2]
        })),
        "001300000102"
    );
    assert_eq!(
        body(Payload::IdI(IdPayload {
            id_type: IdType::FQDN,
            data: b"ab".to_vec()
        })),
        "020000006162"
    );
    assert_eq!(
        body(Payload::Auth(AuthPayload {
            method: AuthMethod::DIGITAL_SIGNATURE,
            data: vec![0xff]
        })),
        "0e000000ff"
    );
    assert_eq!(
        body(Payload::CertReq(CertPayload {
            encoding: CertEncoding::X509_SIGNATURE,
            data: vec![0xab]
        })),
        "04ab"
    );
    // Protocol ESP, SPI size 4, REKEY_SA, SPI.
    assert_eq!(
        body(Payload::Notify(NotifyPayload::rekey_esp(0x0102_0304))),
        "0304400901020304"
    );
    assert_eq!(
        body(Payload::Notify(NotifyPayload::invalid_ke(31))),
        "00000011001f"
    );
    assert_eq!(
        body(Payload::Notify(NotifyPayload::unsupported_critical(
            PayloadType(200)
        ))),
        "00000001c8"
    );
    assert_eq!(
        body(Payload::Delete(DeletePayload::esp(&[0x0a0b_0c0d, 1]))),
        "030400020a0b0c0d00000001"
    );
    assert_eq!(body(Payload::Delete(DeletePayload::ike())), "01000000");
    // One selector: TCP, ports 80-80, 192.0.2.0-192.0.2.255.
    assert_eq!(
        body(Payload::TsI(TsPayload {
            selectors: vec![TrafficSelector::Range(TsRange {
                ip_protocol: 6,
                start_port: 80,
                end_port: 80,
                addresses: AddressRange::V4 {
                    start: "192.0.2.0".parse().unwrap(),
                    end: "192.0.2.255".parse().unwrap(),
                },
            })]
        })),
        "0100000007060010 00500050 c0000200 c00002ff".replace(' ', "")
    );
    let v6 = body(Payload::TsR(TsPayload {
        selectors: vec![TrafficSelector::Range(TsRange::host(
            "2001:db8::1".parse().unwrap(),
        ))],
    }));
    assert_eq!(
        v6,
        "0100000008000028 0000ffff 20010db8000000000000000000000001 20010db8000000000000000000000001"
            .replace(' ', "")
    );
    // TLV attribute: type, length, value; TV: format bit set.
    assert_eq!(
        body(Payload::Sa(SaPayload {
            proposals: vec![Proposal {
                number: 1,
                protocol: ProtocolId::ESP,
                spi: vec![1, 2, 3, 4],
                transforms: vec![Transform {
                    transform_type: TransformType::ENCR,
                    id: 12,
                    attributes: vec![
                        Attribute {
                            attribute_type: 14,
                            value: AttributeValue::Tv(256)
                        },
                        Attribute {
                            attribute_type: 5,
                            value: AttributeValue::Tlv(vec![0xaa, 0xbb])
                        },
                    ],
                }],
            }],
        })),
        "0000001e 01030401 01020304 00000012 0100000c 800e0100 00050002 aabb".replace(' ', "")
    );
}

#[test]
fn unknown_non_critical_payloads_are_kept_and_critical_ones_rejected() {
    let mut message = Message::decode(&hand_sa_init()).unwrap();
    message.payloads.insert(
        1,
        Payload::Unknown(UnknownPayload {
            payload_type: PayloadType(99),
            critical: false,
            body: vec![1, 2, 3, 4, 5],
        }),
    );
    let bytes = message.encode().unwrap();
    assert_eq!(Message::decode(&bytes).unwrap(), message);

    if let Payload::Unknown(u) = &mut message.payloads[1] {
        u.critical = true;
    }
    let bytes = message.encode().unwrap();
    let err = Message::decode(&bytes).unwrap_err();
    assert_eq!(
        err,
        DecodeError::UnsupportedCritical {
            payload_type: PayloadType(99),
            at: Location {
                payload: Some((1, PayloadType(99))),
                offset: 68,
            },
        }
    );
    assert_eq!(err.reason(), "unsupported_critical");
    // The header still decodes, to answer with UNSUPPORTED_CRITICAL_PAYLOAD.
    assert_eq!(Header::decode(&bytes).unwrap(), message.header);

    // A known payload with the critical bit set is understood.
    let mut bytes = hand_sa_init();
    bytes[28 + 1] = 0x80;
    let m = Message::decode(&bytes).unwrap();
    assert_eq!(m, Message::decode(&hand_sa_init()).unwrap());
}

#[test]
fn header_round_trips_and_answers() {
    let request = Header::request(ExchangeType::CREATE_CHILD_SA, 1, 2, 7, false);
    assert_eq!(request.flags, Flags::default());
    let response = request.response();
    assert_eq!(response.flags, Flags::RESPONSE | Flags::INITIATOR);
    assert_eq!(response.message_id, 7);
    assert_eq!(
        Header::request(ExchangeType::IKE_AUTH, 1, 2, 1, true)
            .response()
            .flags,
        Flags::RESPONSE
    );
    let bytes = response.encode(PayloadType::NONE, 28);
    assert_eq!(
        hex::encode(bytes),
        [
            "0000000000000001",
            "0000000000000002",
            "00202428",
            "00000007",
            "0000001c"
        ]
        .concat()
    );
    let message = Message::new(response, vec![]);
    assert_eq!(message.encode().unwrap(), bytes);
    assert_eq!(Message::decode(&bytes).unwrap(), message);

    // Minor version and unknown flags survive the round trip.
    let mut odd = bytes;
    odd[17] = 0x2f;
    odd[19] |= 0x81;
    let m = Message::decode(&odd).unwrap();
    assert_eq!(m.header.minor_version, 15);
    assert!(m.header.flags.is_response());
    assert_eq!(m.encode().unwrap(), odd);
    assert_eq!(format!("{:?}", m.header.flags), "Flags(I|R|0x81)");
}

/// An IKE_AUTH request with an SK payload sealed by a stand-in cipher
/// (XOR, a fixed 8-byte IV and a 16-byte tag that is a checksum of the
/// associated data), and its inner payloads.
fn sk_message() -> (Vec<u8>, Vec<Payload>) {
    let header = Header::request(ExchangeType::IKE_AUTH, 0xa1, 0xb2, 1, true);
    let inner = vec![
        Payload::IdI(IdPayload {
            id_type: IdType::IPV4_ADDR,
            data: vec![192, 0, 2, 1],
        }),
        Payload::Auth(AuthPayload {
            method: AuthMethod::SHARED_KEY_MESSAGE_INTEGRITY_CODE,
            data: vec![0x11; 32],
        }),
        Payload::Notify(NotifyPayload::new(NotifyType::INITIAL_CONTACT, vec![])),
    ];
    let bytes = Message::encode_encrypted(
        &header,
        &inner,
        |plaintext_len| 8 + plaintext_len + 16,
        |out, plaintext| {
            let tag = toy_tag(out);
            out.extend_from_slice(&[0x1f; 8]);
            out.extend(plaintext.iter().map(|b| b ^ 0x5a));
            out.extend_from_slice(&tag);
            Ok::<(), std::convert::Infallible>(())
        },
    )
    .unwrap();
    (bytes, inner)
}

fn toy_tag(aad: &[u8]) -> [u8; 16] {
    let mut tag = [0u8; 16];
    for (i, b) in aad.iter().enumerate() {
        tag[i % 16] = tag[i % 16].wrapping_add(*b);
    }
    tag
}

#[test]
fn sk_payload_gives_the_crypto_layer_its_pieces() {
    let (bytes, inner) = sk_message();
    let view = MessageView::new_checked(&bytes).unwrap();
    assert_eq!(view.first_payload(), PayloadType::SK);
    let sk = view.encrypted().expect("SK payload");
    assert_eq!(sk.first_inner(), PayloadType::IDI);
    assert_eq!(sk.datagram(), &bytes[..]);
    assert_eq!(sk.body_offset(), HEADER_LEN + GENERIC_HEADER_LEN);

    // Associated data: the header (whose length is the final one) and the SK
    // generic header (whose length covers the whole body).
    let aad = sk.associated_data();
    assert_eq!(aad, &bytes[..32]);
    assert_eq!(
        u32::from_be_bytes(aad[24..28].try_into().unwrap()) as usize,
        bytes.len()
    );
    assert_eq!(aad[16], PayloadType::SK.0);
    assert_eq!(aad[28], PayloadType::IDI.0);
    assert_eq!(
        usize::from(u16::from_be_bytes([aad[30], aad[31]])),
        GENERIC_HEADER_LEN + sk.body().len()
    );
    assert_eq!(aad.len() + sk.body().len(), bytes.len());

    // "Open" with the stand-in cipher and decode the inner chain.
    let body = sk.body();
    assert_eq!(body[body.len() - 16..], toy_tag(aad));
    let plaintext: Vec<u8> = body[8..body.len() - 16].iter().map(|b| b ^ 0x5a).collect();
    assert_eq!(
        decode_payload_chain(sk.first_inner(), &plaintext).unwrap(),
        inner
    );

    // The owned decoding keeps SK sealed, and round-trips.
    let m = assert_byte_exact(&bytes);
    assert_eq!(
        m.payloads,
        [Payload::Encrypted(EncryptedPayload {
            first_inner: PayloadType::IDI,
            body: body.to_vec(),
        })]
    );

    // The prefix alone is the same associated data.
    assert_eq!(
        encode_sk_prefix(&m.header, PayloadType::IDI, body.len()).unwrap(),
        aad
    );
}

#[test]
fn sealing_errors_are_reported() {
    let header = Header::request(ExchangeType::INFORMATIONAL, 1, 2, 3, true);
    let short = Message::encode_encrypted(
        &header,
        &[],
        |_| 10,
        |out, _| {
            out.extend_from_slice(&[0; 5]);
            Ok::<(), ()>(())
        },
    );
    assert!(matches!(
        short,
        Err(SealError::BodyLength {
            announced: 10,
            written: 5
        })
    ));
    let failed = Message::encode_encrypted(&header, &[], |n| n, |_, _| Err("no key"));
    assert!(matches!(failed, Err(SealError::Seal("no key"))));
    let too_long = Message::encode_encrypted(&header, &[], |_| 70_000, |_, _| Ok::<(), ()>(()));
    assert!(matches!(
        too_long,
        Err(SealError::Encode(EncodeError::TooLong { .. }))
    ));

    // An empty INFORMATIONAL (a liveness check) has SK with no inner payload.
    let empty = Message::encode_encrypted(
        &header,
        &[],
        |n| 8 + n + 16,
        |out, plaintext| {
            out.extend_from_slice(&[0; 24]);
            assert!(plaintext.is_empty());
            Ok::<(), ()>(())
        },
    )
    .unwrap();
    let view = MessageView::new_checked(&empty).unwrap();
    assert_eq!(view.encrypted().unwrap().first_inner(), PayloadType::NONE);
    assert_eq!(decode_payload_chain(PayloadType::NONE, &[]).unwrap(), []);
}

#[test]
fn nat_detection_input_layout_and_hash() {
    let spi_i = 0x5f31_a2b9_0c4d_7e18;
    let addr: SocketAddr = "192.0.2.1:500".parse().unwrap();
    assert_eq!(
        hex::encode(nat_detection_data(spi_i, 0, addr)),
        "5f31a2b90c4d7e18 0000000000000000 c0000201 01f4".replace(' ', "")
    );
    assert_eq!(
        hex::encode(nat_detection_hash(spi_i, 0, addr)),
        "e6896926d152fcab115fde5529357823f56c09e2"
    );
    let v6: SocketAddr = "[2001:db8::1]:4500".parse().unwrap();
    assert_eq!(
        nat_detection_data(spi_i, 0x0102_0304_0506_0708, v6).len(),
        34
    );
    assert_eq!(
        hex::encode(nat_detection_hash(spi_i, 0x0102_0304_0506_0708, v6)),
        "688fed849804719a403d505d5b7a4870fefc9905"
    );
}

#[test]
fn id_payload_body_is_what_auth_signs() {
    let id = IdPayload {
        id_type: IdType::FQDN,
        data: b"bitw".to_vec(),
    };
    assert_eq!(hex::encode(id.body_bytes()), "0200000062697477");
    // The same bytes as the payload's body on the wire.
    let (_, chain) = encode_payload_chain(&[Payload::IdI(id.clone())]).unwrap();
    assert_eq!(chain[GENERIC_HEADER_LEN..], id.body_bytes());

    let v4 = IdPayload::from_ip("192.0.2.9".parse().unwrap());
    assert_eq!(v4.id_type, IdType::IPV4_ADDR);
    assert_eq!(v4.ip_addr(), Some("192.0.2.9".parse().unwrap()));
    let v6 = IdPayload::from_ip("2001:db8::9".parse().unwrap());
    assert_eq!(v6.ip_addr(), Some("2001:db8::9".parse().unwrap()));
    assert_eq!(id.ip_addr(), None);
    let bad = IdPayload {
        id_type: IdType::IPV4_ADDR,
        data: vec![1, 2, 3],
    };
    assert_eq!(bad.ip_addr(), None);
}

#[test]
fn notify_and_delete_helpers() {
    let n = NotifyPayload::invalid_ke(19);
    assert_eq!(n.invalid_ke_group(), Some(19));
    assert_eq!(NotifyPayload::cookie(vec![1]).invalid_ke_group(), None);
    assert!(NotifyType::INVALID_KE_PAYLOAD.is_error());
    assert!(!NotifyType::COOKIE.is_error());
    assert_eq!(NotifyPayload::rekey_esp(77).spi_u32(), Some(77));
    assert_eq!(DeletePayload::esp(&[5, 6]).spis_u32(), Some(vec![5, 6]));
    assert_eq!(DeletePayload::ike().spis_u32(), Some(vec![]));
    assert_eq!(
        NotifyType::NO_PROPOSAL_CHOSEN.to_string(),
        "NO_PROPOSAL_CHOSEN"
    );
    assert_eq!(NotifyType(40000).to_string(), "40000");
    assert_eq!(format!("{:?}", PayloadType::SK), "PayloadType::SK");
    assert_eq!(format!("{:?}", PayloadType(99)), "PayloadType(99)");
}

// ---------------------------------------------------------------------------
// Malformed messages.

/// Sets the header's Length field to the buffer's length.
fn fix_length(bytes: &mut [u8]) {
    let length = bytes.len() as u32;
    bytes[24..28].copy_from_slice(&length.to_be_bytes());
}

fn put16(bytes: &mut [u8], at: usize, value: u16) {
    bytes[at..at + 2].copy_from_slice(&value.to_be_bytes());
}

/// Decodes, expecting an error with the given reason; returns the error.
fn reject(bytes: &[u8], reason: &str) -> DecodeError {
    let err = Message::decode(bytes).expect_err("must be rejected");
    assert_eq!(err.reason(), reason, "{err}");
    err
}

#[test]
fn truncation_at_every_offset_is_an_error() {
    for vector in valid_vectors() {
        for n in 0..vector.len() {
            let cut = &vector[..n];
            assert!(Message::decode(cut).is_err(), "cut at {n}");
            // Also with the header's length made to agree, so that the
            // inner structures are what is cut.
            if n >= HEADER_LEN {
                let mut cut = cut.to_vec();
                fix_length(&mut cut);
                assert!(Message::decode(&cut).is_err(), "cut at {n}, length fixed");
            }
        }
        assert!(Message::decode(&vector).is_ok());
    }
    assert_eq!(
        reject(&[], "truncated"),
        DecodeError::Truncated {
            what: "IKE header",
            at: Location {
                payload: None,
                offset: 0
            },
            needed: 8,
            available: 0,
        }
    );
}

#[test]
fn header_errors() {
    let good = hand_sa_init();

    let mut b = good.clone();
    put16(&mut b, 26, 27);
    reject(&b, "bad_length");

    let mut b = good.clone();
    put16(&mut b, 26, 201);
    reject(&b, "truncated");

    let mut b = good.clone();
    b.push(0);
    assert_eq!(
        reject(&b, "trailing_bytes"),
        DecodeError::TrailingBytes {
            header_length: 200,
            datagram_length: 201
        }
    );

    let mut b = good.clone();
    b[17] = 0x10;
    assert_eq!(
        reject(&b, "bad_version"),
        DecodeError::BadVersion { major: 1, minor: 0 }
    );
    b[17] = 0x30;
    assert_eq!(
        reject(&b, "bad_version"),
        DecodeError::BadVersion { major: 3, minor: 0 }
    );
    assert!(Header::decode(&b).is_err());
    // Enough to answer INVALID_MAJOR_VERSION.
    let (header, major) = Header::decode_any_version(&b).unwrap();
    assert_eq!(major, 3);
    assert_eq!(header, Message::decode(&good).unwrap().header);

    // Bytes after the last payload (inside the declared length).
    let mut b = good;
    b.extend_from_slice(&[0; 4]);
    fix_length(&mut b);
    reject(&b, "malformed");
}

#[test]
fn generic_payload_length_errors() {
    let good = hand_sa_init();
    for (length, reason) in [(0, "bad_length"), (3, "bad_length"), (0xffff, "truncated")] {
        let mut b = good.clone();
        put16(&mut b, 30, length);
        let err = reject(&b, reason);
        assert_eq!(
            err.location(),
            Some(Location {
                payload: Some((0, PayloadType::SA)),
                offset: 28
            })
        );
    }
    // A zero-length payload at the end of the chain.
    let mut b = good.clone();
    put16(&mut b, 174, 0);
    let err = reject(&b, "bad_length");
    assert_eq!(
        err.location().unwrap().payload,
        Some((4, PayloadType::NOTIFY))
    );
    // Every length in the chain, every value: an error or a decoding that
    // re-encodes consistently; never a panic.
    for at in [30usize, 70, 110, 146, 174] {
        for length in 0..=255u16 {
            let mut b = good.clone();
            put16(&mut b, at, length);
            if let Ok(m) = Message::decode(&b) {
                assert_eq!(Message::decode(&m.encode().unwrap()).unwrap(), m);
            }
        }
    }
}

#[test]
fn proposal_and_transform_errors() {
    let good = hand_sa_init();
    let mutate = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut b = good.clone();
        f(&mut b);
        b
    };
    // Proposal length below its fixed part, beyond the SA payload.
    reject(&mutate(&|b| put16(b, 34, 7)), "bad_length");
    reject(&mutate(&|b| put16(b, 34, 37)), "bad_length");
    // Shorter than its transforms: a byte is left after the "last" proposal.
    reject(&mutate(&|b| put16(b, 34, 35)), "malformed");
    // Transform length below its fixed part, beyond the proposal.
    reject(&mutate(&|b| put16(b, 42, 7)), "bad_length");
    reject(&mutate(&|b| put16(b, 42, 200)), "bad_length");
    // Key Length turned into a TLV attribute whose length runs past the transform.
    reject(&mutate(&|b| b[48] = 0x00), "bad_length");
    // Transform count disagreeing with the transforms.
    reject(&mutate(&|b| b[39] = 2), "bad_count");
    reject(&mutate(&|b| b[39] = 4), "bad_count");
    // SPI size running past the proposal.
    reject(&mutate(&|b| b[38] = 40), "bad_length");
    // "Last" markers.
    reject(&mutate(&|b| b[32] = 2), "malformed");
    reject(&mutate(&|b| b[40] = 0), "malformed");
    reject(&mutate(&|b| b[60] = 3), "malformed");
    let err = reject(&mutate(&|b| put16(b, 34, 7)), "bad_length");
    assert_eq!(
        err.to_string(),
        "proposal has the impossible length 7 at payload #0 (SA), offset 32"
    );
}

/// An SA payload of `proposals` proposals of `transforms` transforms each,
/// written byte by byte (the encoder refuses more than the caps).
fn raw_sa_message(proposals: usize, transforms: usize) -> Vec<u8> {
    let mut sa = Vec::new();
    for p in 0..proposals {
        let length = 8 + 8 * transforms;
        sa.push(if p + 1 == proposals { 0 } else { 2 });
        sa.push(0);
        sa.extend_from_slice(&(length as u16).to_be_bytes());
        sa.extend_from_slice(&[(p + 1) as u8, 1, 0, transforms as u8]);
        for t in 0..transforms {
            sa.extend_from_slice(&[
                if t + 1 == transforms { 0 } else { 3 },
                0,
                0,
                8,
                1,
                0,
                0,
                20,
            ]);
        }
    }
    let mut b = Header::request(ExchangeType::IKE_SA_INIT, 1, 0, 0, true)
        .encode(PayloadType::SA, 0)
        .to_vec();
    b.extend_from_slice(&[0, 0]);
    b.extend_from_slice(&((4 + sa.len()) as u16).to_be_bytes());
    b.extend_from_slice(&sa);
    fix_length(&mut b);
    b
}

#[test]
fn counts_are_capped() {
    assert!(Message::decode(&raw_sa_message(MAX_PROPOSALS, 1)).is_ok());
    reject(&raw_sa_message(MAX_PROPOSALS + 1, 1), "too_many");
    assert!(Message::decode(&raw_sa_message(1, MAX_TRANSFORMS)).is_ok());
    reject(&raw_sa_message(1, MAX_TRANSFORMS + 1), "too_many");

    let header = Header::request(ExchangeType::INFORMATIONAL, 1, 2, 0, true);
    let vendor_ids = |n: usize| Message::new(header, vec![Payload::VendorId(vec![1]); n]);
    let ok = vendor_ids(MAX_PAYLOADS).encode().unwrap();
    assert_eq!(Message::decode(&ok).unwrap().payloads.len(), MAX_PAYLOADS);
    // One more, appended by hand.
    let mut b = ok;
    let last = b.len() - 5;
    b[last] = PayloadType::VENDOR_ID.0;
    b.extend_from_slice(&[0, 0, 0, 5, 1]);
    fix_length(&mut b);
    let err = reject(&b, "too_many");
    assert_eq!(
        err.location().unwrap().payload,
        Some((MAX_PAYLOADS, PayloadType::VENDOR_ID))
    );
    assert!(matches!(
        vendor_ids(MAX_PAYLOADS + 1).encode(),
        Err(EncodeError::TooMany { .. })
    ));
}

#[test]
fn payload_content_errors() {
    let header = Header::request(ExchangeType::IKE_AUTH, 1, 2, 1, true);
    // A payload body shorter than its fixed fields, made by encoding a raw
    // body under a known type.
    let raw = |payload_type: PayloadType, body: Vec<u8>| {
        Message::new(
            header,
            vec![Payload::Unknown(UnknownPayload {
                payload_type,
                critical: false,
                body,
            })],
        )
        .encode()
        .unwrap()
    };
    for t in [
        PayloadType::KE,
        PayloadType::IDI,
        PayloadType::IDR,
        PayloadType::AUTH,
        PayloadType::NOTIFY,
        PayloadType::DELETE,
        PayloadType::TSI,
        PayloadType::TSR,
        PayloadType::SA,
    ] {
        let err = Message::decode(&raw(t, vec![3])).expect_err("one byte is too short");
        assert!(
            matches!(err.reason(), "truncated" | "bad_length"),
            "{t}: {err}"
        );
        assert_eq!(err.location().unwrap().payload, Some((0, t)));
    }
    // Empty bodies are fine where the payload is only data.
    // A CERT payload needs only its encoding byte.
    assert!(Message::decode(&raw(PayloadType::CERT, vec![4])).is_ok());
    reject(&raw(PayloadType::CERT, vec![]), "truncated");
    for t in [
        PayloadType::NONCE,
        PayloadType::VENDOR_ID,
        PayloadType::CP,
        PayloadType::EAP,
    ] {
        assert!(Message::decode(&raw(t, vec![])).is_ok(), "{t}");
    }
    // Delete: SPI size 0 with SPIs; a count that does not match.
    reject(&raw(PayloadType::DELETE, vec![1, 0, 0, 1]), "malformed");
    reject(
        &raw(
            PayloadType::DELETE,
            vec![3, 4, 0, 3, 0, 0, 0, 1, 0, 0, 0, 2],
        ),
        "bad_count",
    );
    // A huge declared count does not allocate: it is compared first.
    reject(
        &raw(PayloadType::DELETE, vec![3, 1, 0xff, 0xff, 7]),
        "bad_count",
    );
    // Notify SPI size beyond the payload.
    reject(
        &raw(PayloadType::NOTIFY, vec![3, 9, 0x40, 0x09, 1, 2, 3, 4]),
        "bad_length",
    );
    // TS: wrong selector length for the type, wrong count.
    let ts_v4 = |count: u8, length: u8| {
        let mut body = vec![count, 0, 0, 0, 7, 0, 0, length];
        body.extend_from_slice(&[0, 0, 0xff, 0xff, 10, 0, 0, 0, 10, 0, 0, 255]);
        body
    };
    assert!(Message::decode(&raw(PayloadType::TSI, ts_v4(1, 16))).is_ok());
    reject(&raw(PayloadType::TSI, ts_v4(1, 15)), "bad_length");
    reject(&raw(PayloadType::TSI, ts_v4(1, 40)), "bad_length");
    reject(&raw(PayloadType::TSI, ts_v4(2, 16)), "bad_count");
    reject(&raw(PayloadType::TSI, ts_v4(0, 16)), "bad_count");
    // Attributes beyond the cap.
    let mut transform = vec![0, 0, 0, 0, 1, 0, 0, 20];
    for _ in 0..=MAX_ATTRIBUTES {
        transform.extend_from_slice(&[0x80, 0x0e, 0, 128]);
    }
    let t_len = transform.len() as u16;
    transform[2..4].copy_from_slice(&t_len.to_be_bytes());
    let mut sa = vec![0, 0, 0, 0, 1, 1, 0, 1];
    sa.extend_from_slice(&transform);
    let p_len = sa.len() as u16;
    sa[2..4].copy_from_slice(&p_len.to_be_bytes());
    reject(&raw(PayloadType::SA, sa), "too_many");
}

#[test]
fn encrypted_payload_placement() {
    let header = Header::request(ExchangeType::IKE_AUTH, 1, 2, 1, true);
    // An SK payload followed by another payload (written as raw SK).
    let b = Message::new(
        header,
        vec![
            Payload::Unknown(UnknownPayload {
                payload_type: PayloadType::SK,
                critical: false,
                body: vec![0; 24],
            }),
            Payload::Nonce(vec![1; 16]),
        ],
    )
    .encode()
    .unwrap();
    let err = reject(&b, "malformed");
    assert_eq!(err.location().unwrap().payload, Some((0, PayloadType::SK)));
    // The encoder refuses to put it anywhere but last.
    let wrong = Message::new(
        header,
        vec![
            Payload::Encrypted(EncryptedPayload {
                first_inner: PayloadType::NONE,
                body: vec![],
            }),
            Payload::Nonce(vec![1; 16]),
        ],
    );
    assert!(matches!(wrong.encode(), Err(EncodeError::Invalid(_))));
    // No SK inside SK.
    let (first, chain) = encode_payload_chain(&[Payload::Encrypted(EncryptedPayload {
        first_inner: PayloadType::NONE,
        body: vec![1, 2, 3],
    })])
    .unwrap();
    assert_eq!(first, PayloadType::SK);
    let err = decode_payload_chain(first, &chain).unwrap_err();
    assert_eq!(err.reason(), "malformed");
    // An inner chain with an unknown critical payload is rejected too.
    let (first, chain) = encode_payload_chain(&[Payload::Unknown(UnknownPayload {
        payload_type: PayloadType(150),
        critical: true,
        body: vec![],
    })])
    .unwrap();
    assert_eq!(
        decode_payload_chain(first, &chain).unwrap_err().reason(),
        "unsupported_critical"
    );
}

#[test]
fn encoding_refuses_what_does_not_fit() {
    let header = Header::request(ExchangeType::IKE_AUTH, 1, 2, 1, true);
    let encode = |p: Payload| Message::new(header, vec![p]).encode();
    assert!(matches!(
        encode(Payload::Nonce(vec![0; 70_000])),
        Err(EncodeError::TooLong { .. })
    ));
    assert!(matches!(
        encode(Payload::Notify(NotifyPayload {
            protocol: ProtocolId::ESP,
            spi: vec![0; 256],
            notify_type: NotifyType::REKEY_SA,
            data: vec![],
        })),
        Err(EncodeError::TooLong { .. })
    ));
    assert!(matches!(
        encode(Payload::Delete(DeletePayload {
            protocol: ProtocolId::ESP,
            spi_size: 4,
            spis: vec![vec![1, 2, 3]],
        })),
        Err(EncodeError::Invalid(_))
    ));
    assert!(matches!(
        encode(Payload::TsI(TsPayload {
            selectors: vec![TrafficSelector::Range(TsRange::host([10, 0, 0, 1].into())); 256],
        })),
        Err(EncodeError::TooMany { .. })
    ));
    let mut t = Transform::new(TransformType::ENCR, 20);
    t.attributes.push(Attribute {
        attribute_type: 0x8000,
        value: AttributeValue::Tv(1),
    });
    let sa = |transforms: Vec<Transform>| {
        Payload::Sa(SaPayload {
            proposals: vec![Proposal {
                number: 1,
                protocol: ProtocolId::IKE,
                spi: vec![],
                transforms,
            }],
        })
    };
    assert!(matches!(encode(sa(vec![t])), Err(EncodeError::Invalid(_))));
    assert!(matches!(
        encode(sa(vec![
            Transform::new(TransformType::DH, 31);
            MAX_TRANSFORMS + 1
        ])),
        Err(EncodeError::TooMany { .. })
    ));
}

// ---------------------------------------------------------------------------
// Property tests.

fn arb_bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..max)
}

fn arb_transform() -> impl Strategy<Value = Transform> {
    (1u8..=6, any::<u16>(), proptest::option::of(any::<u16>())).prop_map(|(t, id, key)| match key {
        Some(bits) => Transform::with_key_length(TransformType(t), id, bits),
        None => Transform::new(TransformType(t), id),
    })
}

fn arb_proposal() -> impl Strategy<Value = Proposal> {
    (
        any::<u8>(),
        0u8..4,
        prop_oneof![Just(0usize), Just(4), Just(8)],
        proptest::collection::vec(arb_transform(), 0..6),
    )
        .prop_map(|(number, protocol, spi_len, transforms)| Proposal {
            number,
            protocol: ProtocolId(protocol),
            spi: vec![0xab; spi_len],
            transforms,
        })
}

fn arb_selector() -> impl Strategy<Value = TrafficSelector> {
    prop_oneof![
        (
            any::<u8>(),
            any::<u16>(),
            any::<u16>(),
            any::<[u8; 4]>(),
            any::<[u8; 4]>()
        )
            .prop_map(
                |(ip_protocol, start_port, end_port, a, b)| TrafficSelector::Range(TsRange {
                    ip_protocol,
                    start_port,
                    end_port,
                    addresses: AddressRange::V4 {
                        start: a.into(),
                        end: b.into()
                    },
                })
            ),
        (any::<u8>(), any::<[u8; 16]>()).prop_map(|(ip_protocol, a)| {
            TrafficSelector::Range(TsRange {
                ip_protocol,
                start_port: 0,
                end_port: 65535,
                addresses: AddressRange::V6 {
                    start: a.into(),
                    end: a.into(),
                },
            })
        }),
        (9u8..=255, any::<u8>(), arb_bytes(20)).prop_map(|(t, byte1, data)| {
            TrafficSelector::Unknown {
                ts_type: TsType(t),
                byte1,
                data,
            }
        }),
    ]
}

fn arb_payload() -> impl Strategy<Value = Payload> {
    prop_oneof![
        proptest::collection::vec(arb_proposal(), 0..4)
            .prop_map(|proposals| Payload::Sa(SaPayload { proposals })),
        (any::<u16>(), arb_bytes(64))
            .prop_map(|(group, data)| Payload::Ke(KePayload { group, data })),
        (any::<u8>(), arb_bytes(32)).prop_map(|(t, data)| Payload::IdI(IdPayload {
            id_type: IdType(t),
            data
        })),
        (any::<u8>(), arb_bytes(32)).prop_map(|(t, data)| Payload::IdR(IdPayload {
            id_type: IdType(t),
            data
        })),
        (any::<u8>(), arb_bytes(32)).prop_map(|(e, data)| Payload::Cert(CertPayload {
            encoding: CertEncoding(e),
            data
        })),
        (any::<u8>(), arb_bytes(32)).prop_map(|(e, data)| Payload::CertReq(CertPayload {
            encoding: CertEncoding(e),
            data
        })),
        (any::<u8>(), arb_bytes(32)).prop_map(|(m, data)| Payload::Auth(AuthPayload {
            method: AuthMethod(m),
            data
        })),
        arb_bytes(64).prop_map(Payload::Nonce),
        (any::<u8>(), arb_bytes(9), any::<u16>(), arb_bytes(24)).prop_map(|(p, spi, t, data)| {
            Payload::Notify(NotifyPayload {
                protocol: ProtocolId(p),
                spi,
                notify_type: NotifyType(t),
                data,
            })
        }),
        proptest::collection::vec(any::<u32>(), 0..5)
            .prop_map(|s| Payload::Delete(DeletePayload::esp(&s))),
        Just(Payload::Delete(DeletePayload::ike())),
        arb_bytes(20).prop_map(Payload::VendorId),
        proptest::collection::vec(arb_selector(), 0..4)
            .prop_map(|selectors| Payload::TsI(TsPayload { selectors })),
        proptest::collection::vec(arb_selector(), 0..4)
            .prop_map(|selectors| Payload::TsR(TsPayload { selectors })),
        arb_bytes(20).prop_map(Payload::Config),
        arb_bytes(20).prop_map(Payload::Eap),
        (49u8..=255, arb_bytes(20)).prop_map(|(t, body)| Payload::Unknown(UnknownPayload {
            payload_type: PayloadType(t),
            critical: false,
            body
        })),
    ]
}

fn arb_message() -> impl Strategy<Value = Message> {
    (
        any::<u64>(),
        any::<u64>(),
        any::<u8>(),
        any::<u8>(),
        any::<u32>(),
        proptest::collection::vec(arb_payload(), 0..8),
        proptest::option::of((any::<u8>(), arb_bytes(40))),
    )
        .prop_map(
            |(spi_i, spi_r, exchange, flags, message_id, mut payloads, sk)| {
                if let Some((first, body)) = sk {
                    payloads.push(Payload::Encrypted(EncryptedPayload {
                        first_inner: PayloadType(first),
                        body,
                    }));
                }
                Message::new(
                    Header {
                        spi_i,
                        spi_r,
                        exchange: ExchangeType(exchange),
                        flags: Flags(flags),
                        message_id,
                        minor_version: 0,
                    },
                    payloads,
                )
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(10_000))]

    #[test]
    fn random_bytes_never_panic(bytes in arb_bytes(600), first in any::<u8>()) {
        let _ = Message::decode(&bytes);
        let _ = Header::decode(&bytes);
        let _ = decode_payload_chain(PayloadType(first), &bytes);
    }

    #[test]
    fn random_bytes_after_a_valid_header_never_panic(body in arb_bytes(400), first in 0u8..60) {
        let mut b = Header::request(ExchangeType::IKE_AUTH, 1, 2, 1, true)
            .encode(PayloadType(first), 0)
            .to_vec();
        b.extend_from_slice(&body);
        fix_length(&mut b);
        if let Ok(m) = Message::decode(&b) {
            prop_assert_eq!(Message::decode(&m.encode().unwrap()).unwrap(), m);
        }
    }

    #[test]
    fn mutations_of_valid_messages_never_panic(
        which in 0usize..5,
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
        keep_length in any::<bool>(),
    ) {
        let mut b = valid_vectors().swap_remove(which);
        for (at, value) in edits {
            let at = at % b.len();
            b[at] = value;
        }
        if keep_length {
            fix_length(&mut b);
        }
        if let Ok(m) = Message::decode(&b) {
            // Whatever decodes encodes, and decodes again to the same value.
            let again = m.encode().expect("a decoded message encodes");
            prop_assert_eq!(Message::decode(&again).unwrap(), m);
        }
        if let Ok(view) = MessageView::new_checked(&b) {
            if let Some(sk) = view.encrypted() {
                prop_assert_eq!(sk.associated_data().len() + sk.body().len(), b.len());
            }
        }
    }

    #[test]
    fn messages_round_trip(m in arb_message()) {
        let bytes = m.encode().unwrap();
        prop_assert_eq!(bytes.len(), u32::from_be_bytes(bytes[24..28].try_into().unwrap()) as usize);
        let decoded = Message::decode(&bytes).unwrap();
        prop_assert_eq!(&decoded, &m);
        prop_assert_eq!(decoded.encode().unwrap(), bytes);
    }
}

// ---------------------------------------------------------------------------
// A real strongSwan session (control/tests/ike_vectors/).

use super::strongswan_vectors::session;

#[test]
fn strongswan_session_decodes_round_trips_opens_and_seals_byte_exactly() {
    let s = session();
    assert_eq!(s.messages.len(), 10);
    for m in &s.messages {
        let what = format!(
            "{:?} response={} id={}",
            m.exchange, m.response, m.message_id
        );
        let decoded = assert_byte_exact(&m.bytes);
        let h = decoded.header;
        assert_eq!(h.exchange, m.exchange, "{what}");
        assert_eq!(h.message_id, m.message_id, "{what}");
        assert_eq!(h.flags.is_response(), m.response, "{what}");
        assert_eq!(h.flags.is_initiator(), m.src.ip() == s.initiator, "{what}");
        if m.exchange == ExchangeType::IKE_SA_INIT {
            assert!(MessageView::new_checked(&m.bytes)
                .unwrap()
                .encrypted()
                .is_none());
            continue;
        }
        // Everything else is one SK payload: open it, decode the inner
        // chain, encode it back, and seal it again to the very same bytes.
        assert_eq!(decoded.payloads.len(), 1, "{what}");
        let opened = s.open(&m.bytes);
        let inner = decode_payload_chain(opened.first_inner, &opened.chain).unwrap();
        let (first, chain) = encode_payload_chain(&inner).unwrap();
        assert_eq!(
            (first, &chain),
            (opened.first_inner, &opened.chain),
            "{what}"
        );
        assert_eq!(
            s.seal(&h, &inner, &opened.iv, &opened.padding),
            m.bytes,
            "{what}"
        );
    }
}

#[test]
fn strongswan_ike_sa_init() {
    let s = session();
    let request = s.find(ExchangeType::IKE_SA_INIT, false);
    let m = Message::decode(&request.bytes).unwrap();
    assert_eq!(m.header.spi_r, 0);
    assert_eq!(
        m.payloads.sa().unwrap().proposals,
        [Proposal {
            number: 1,
            protocol: ProtocolId::IKE,
            spi: vec![],
            transforms: vec![
                Transform::with_key_length(TransformType::ENCR, 20, 128),
                Transform::new(TransformType::PRF, 5),
                Transform::new(TransformType::DH, 31),
            ],
        }]
    );
    assert_eq!(m.payloads.ke().unwrap().group, 31);
    assert_eq!(m.payloads.ke().unwrap().data.len(), 32);
    assert_eq!(m.payloads.nonce().unwrap().len(), 32);
    // NAT detection as RFC 7296 §2.23 lays it out: the destination hash is
    // of the address and port the request went to.
    let spi_i = m.header.spi_i;
    assert_eq!(
        m.payloads
            .notify(NotifyType::NAT_DETECTION_DESTINATION_IP)
            .unwrap()
            .data,
        nat_detection_hash(spi_i, 0, request.dst)
    );
    // The source hash is not of its address: with kernel-libipsec charon
    // fakes a NAT to force UDP encapsulation of ESP (DESIGN.md), so a peer
    // of strongSwan sees "the initiator is behind a NAT".
    assert_ne!(
        m.payloads
            .notify(NotifyType::NAT_DETECTION_SOURCE_IP)
            .unwrap()
            .data,
        nat_detection_hash(spi_i, 0, request.src)
    );
    for t in [
        NotifyType::IKEV2_FRAGMENTATION_SUPPORTED,
        NotifyType::SIGNATURE_HASH_ALGORITHMS,
        NotifyType::REDIRECT_SUPPORTED,
    ] {
        assert!(m.payloads.notify(t).is_some(), "{t}");
    }

    let response = s.find(ExchangeType::IKE_SA_INIT, true);
    let r = Message::decode(&response.bytes).unwrap();
    assert_eq!(r.header.spi_i, spi_i);
    assert_ne!(r.header.spi_r, 0);
    assert_eq!(
        r.header,
        Header {
            spi_r: r.header.spi_r,
            ..m.header.response()
        }
    );
    assert_eq!(
        r.payloads
            .notify(NotifyType::NAT_DETECTION_DESTINATION_IP)
            .unwrap()
            .data,
        nat_detection_hash(spi_i, r.header.spi_r, response.dst)
    );
    assert!(r
        .payloads
        .notify(NotifyType::MULTIPLE_AUTH_SUPPORTED)
        .is_some());
}

#[test]
fn strongswan_ike_auth_create_child_sa_and_informational() {
    let s = session();
    let auth = s.inner(&s.find(ExchangeType::IKE_AUTH, false).bytes);
    let id = auth.id_i().unwrap();
    assert_eq!(id.id_type, IdType::IPV4_ADDR);
    assert_eq!(id.ip_addr(), Some(s.initiator));
    let a = auth.auth().unwrap();
    assert_eq!(a.method, AuthMethod::SHARED_KEY_MESSAGE_INTEGRITY_CODE);
    assert_eq!(a.data.len(), 32, "prf(HMAC-SHA2-256) output");
    let sa = auth.sa().unwrap();
    assert_eq!(sa.proposals[0].protocol, ProtocolId::ESP);
    assert_eq!(sa.proposals[0].spi.len(), 4);
    assert!(
        sa.proposals[0]
            .transforms
            .iter()
            .all(|t| t.transform_type != TransformType::DH),
        "strongSwan leaves DH out of IKE_AUTH"
    );
    let host = |addr| TsPayload {
        selectors: vec![TrafficSelector::Range(TsRange::host(addr))],
    };
    assert_eq!(auth.ts_i().unwrap(), &host(s.initiator));
    assert_eq!(auth.ts_r().unwrap(), &host(s.responder));
    let notifies: Vec<NotifyType> = auth.notifies().map(|n| n.notify_type).collect();
    assert_eq!(
        notifies,
        [
            NotifyType::MOBIKE_SUPPORTED,
            NotifyType::ADDITIONAL_IP6_ADDRESS,
            NotifyType::MULTIPLE_AUTH_SUPPORTED,
            NotifyType::EAP_ONLY_AUTHENTICATION,
            NotifyType::IKEV2_MESSAGE_ID_SYNC_SUPPORTED,
        ]
    );

    let auth_r = s.inner(&s.find(ExchangeType::IKE_AUTH, true).bytes);
    assert_eq!(auth_r.id_r().unwrap().ip_addr(), Some(s.responder));

    let rekey = s.inner(&s.find(ExchangeType::CREATE_CHILD_SA, false).bytes);
    assert_eq!(rekey[0].payload_type(), PayloadType::NOTIFY);
    let n = rekey.notify(NotifyType::REKEY_SA).unwrap();
    assert_eq!(n.protocol, ProtocolId::ESP);
    assert_eq!(
        n.spi_u32(),
        Some(u32::from_be_bytes(
            sa.proposals[0].spi[..].try_into().unwrap()
        ))
    );
    assert_eq!(rekey.ke().unwrap().group, 31);
    assert!(rekey.sa().unwrap().proposals[0]
        .transforms
        .contains(&Transform::new(TransformType::DH, 31)));

    let deletes: Vec<Vec<DeletePayload>> = s
        .messages
        .iter()
        .filter(|m| m.exchange == ExchangeType::INFORMATIONAL)
        .map(|m| s.inner(&m.bytes).deletes().cloned().collect())
        .collect();
    assert_eq!(deletes.len(), 4);
    assert_eq!(deletes[0][0].protocol, ProtocolId::ESP);
    assert_eq!(deletes[0][0].spis.len(), 1);
    assert_eq!(deletes[1][0].protocol, ProtocolId::ESP);
    assert_eq!(deletes[2], [DeletePayload::ike()]);
    assert!(deletes[3].is_empty());
    // The last response has an empty inner chain.
    let last = s.messages.last().unwrap();
    assert_eq!(s.open(&last.bytes).first_inner, PayloadType::NONE);
}
