//! A real IKEv2 session between two strongSwan 5.9.8 charons, captured by
//! `control/tests/ike_vectors/capture_strongswan.py` (IKE_SA_INIT,
//! IKE_AUTH, a Child SA rekey with PFS, deletes): parsed, with the SK
//! payloads opened and sealed again with the IKE SA's logged keys
//! (AES-128-GCM, RFC 5282, through ring). Shared by the message and proposal
//! tests.

use std::net::{IpAddr, SocketAddr};

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM};

use super::*;

const VECTORS: &str = include_str!("../../tests/ike_vectors/strongswan-5.9.8-psk.txt");

/// Bytes of the explicit IV and of the ICV of AES-GCM-16 in IKE (RFC 5282).
const IV_LEN: usize = 8;
const ICV_LEN: usize = 16;

pub(crate) struct Session {
    pub initiator: IpAddr,
    pub responder: IpAddr,
    /// SK_ei and SK_er: 16 bytes of AES key, then 4 bytes of salt.
    pub sk_ei: Vec<u8>,
    pub sk_er: Vec<u8>,
    pub messages: Vec<Captured>,
}

pub(crate) struct Captured {
    pub exchange: ExchangeType,
    pub response: bool,
    pub message_id: u32,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub bytes: Vec<u8>,
}

/// What an SK payload held.
pub(crate) struct Opened {
    pub first_inner: PayloadType,
    /// The inner payload chain, padding removed.
    pub chain: Vec<u8>,
    pub iv: Vec<u8>,
    /// The padding bytes (without the pad length byte).
    pub padding: Vec<u8>,
}

pub(crate) fn session() -> Session {
    let mut initiator = None;
    let mut responder = None;
    let mut sk_ei = None;
    let mut sk_er = None;
    let mut messages = Vec::new();
    for line in VECTORS
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.as_slice() {
            ["initiator", a] => initiator = Some(a.parse().unwrap()),
            ["responder", a] => responder = Some(a.parse().unwrap()),
            ["sk_ei", k] => sk_ei = Some(hex::decode(k).unwrap()),
            ["sk_er", k] => sk_er = Some(hex::decode(k).unwrap()),
            ["msg", exchange, kind, id, src, dst, bytes] => messages.push(Captured {
                exchange: match *exchange {
                    "IKE_SA_INIT" => ExchangeType::IKE_SA_INIT,
                    "IKE_AUTH" => ExchangeType::IKE_AUTH,
                    "CREATE_CHILD_SA" => ExchangeType::CREATE_CHILD_SA,
                    "INFORMATIONAL" => ExchangeType::INFORMATIONAL,
                    other => panic!("exchange {other}"),
                },
                response: *kind == "response",
                message_id: id.parse().unwrap(),
                src: src.parse().unwrap(),
                dst: dst.parse().unwrap(),
                bytes: hex::decode(bytes).unwrap(),
            }),
            other => panic!("unexpected vector line {other:?}"),
        }
    }
    Session {
        initiator: initiator.unwrap(),
        responder: responder.unwrap(),
        sk_ei: sk_ei.unwrap(),
        sk_er: sk_er.unwrap(),
        messages,
    }
}

impl Session {
    pub fn find(&self, exchange: ExchangeType, response: bool) -> &Captured {
        self.messages
            .iter()
            .find(|m| m.exchange == exchange && m.response == response)
            .unwrap()
    }

    /// The sender's key: SK_ei if the sender is the original initiator.
    fn key(&self, header: &Header) -> LessSafeKey {
        let sk = if header.flags.is_initiator() {
            &self.sk_ei
        } else {
            &self.sk_er
        };
        LessSafeKey::new(UnboundKey::new(&AES_128_GCM, &sk[..16]).unwrap())
    }

    fn nonce(&self, header: &Header, iv: &[u8]) -> Nonce {
        let sk = if header.flags.is_initiator() {
            &self.sk_ei
        } else {
            &self.sk_er
        };
        let mut nonce = [0u8; 12];
        nonce[..4].copy_from_slice(&sk[16..20]);
        nonce[4..].copy_from_slice(iv);
        Nonce::assume_unique_for_key(nonce)
    }

    /// Opens the message's SK payload, using only what [`MessageView`] and
    /// [`EncryptedView`] give.
    pub fn open(&self, bytes: &[u8]) -> Opened {
        let view = MessageView::new_checked(bytes).unwrap();
        let sk = view.encrypted().expect("an SK payload");
        let body = sk.body();
        let iv = body[..IV_LEN].to_vec();
        let mut sealed = body[IV_LEN..].to_vec();
        let plaintext = self
            .key(&view.header())
            .open_in_place(
                self.nonce(&view.header(), &iv),
                Aad::from(sk.associated_data()),
                &mut sealed,
            )
            .expect("AES-GCM opens with the associated data EncryptedView gives");
        let pad_len = usize::from(*plaintext.last().unwrap());
        let chain_len = plaintext.len() - 1 - pad_len;
        Opened {
            first_inner: sk.first_inner(),
            chain: plaintext[..chain_len].to_vec(),
            iv,
            padding: plaintext[chain_len..plaintext.len() - 1].to_vec(),
        }
    }

    /// The decoded inner payloads of a message.
    pub fn inner(&self, bytes: &[u8]) -> Vec<Payload> {
        let opened = self.open(bytes);
        decode_payload_chain(opened.first_inner, &opened.chain).unwrap()
    }

    /// Seals `inner` into a message with `header` the way the sender did
    /// (same IV and padding), through [`Message::encode_encrypted`].
    pub fn seal(&self, header: &Header, inner: &[Payload], iv: &[u8], padding: &[u8]) -> Vec<u8> {
        Message::encode_encrypted(
            header,
            inner,
            |n| IV_LEN + n + padding.len() + 1 + ICV_LEN,
            |out, plaintext| {
                let aad = out.clone();
                let mut buf = plaintext.to_vec();
                buf.extend_from_slice(padding);
                buf.push(padding.len() as u8);
                let tag = self
                    .key(header)
                    .seal_in_place_separate_tag(self.nonce(header, iv), Aad::from(&aad), &mut buf)
                    .map_err(|_| "seal")?;
                out.extend_from_slice(iv);
                out.extend_from_slice(&buf);
                out.extend_from_slice(tag.as_ref());
                Ok::<(), &str>(())
            },
        )
        .unwrap()
    }
}
