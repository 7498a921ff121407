//! IKEv2 (RFC 7296) as the terminals: written as state machines without I/O
//! (fed datagrams and time, asked for datagrams, timers and events), so the
//! whole protocol is tested with byte vectors and fake time.
//!
//! - [`message`]: the wire format: typed messages and payloads, decoded
//!   without panics on any input, encoded byte-exactly.
//! - [`proposal`]: transforms and proposals, written in strongSwan's syntax
//!   (`aes128gcm16-prfsha256-x25519`).
//! - [`auth`]: how peers authenticate: a pre-shared key, or X.509
//!   certificates (chains to trusted CAs, IDs in the certificate, RFC 7427
//!   signatures with RSA and ECDSA).
//! - [`crypto`]: PRFs, prf+, SKEYSEED and the key schedule, KEYMAT, the SK
//!   payload's encryption and integrity, AUTH for PSKs.
//! - [`dh`]: Diffie-Hellman groups 14, 19, 20 and 31.
//! - [`dn`]: distinguished names compared by meaning (RFC 5280 §7.1).
//! - [`auth`]: PSKs and X.509 certificates (RSA, ECDSA; RFC 7427 signatures).
//! - [`cookie`]: a responder's stateless cookies (RFC 7296 §2.6).
//! - [`sa`]: one IKE SA as a state machine: IKE_SA_INIT, IKE_AUTH (PSK or
//!   certificates) and the first Child SA, CREATE_CHILD_SA for more Child SAs
//!   and rekeys of Child SAs and of the IKE SA, INFORMATIONAL liveness checks
//!   and deletes, the rekey / DPD / keepalive timers.

pub mod auth;
pub mod cookie;
pub mod crypto;
pub mod dh;
pub mod dn;
pub mod message;
pub mod proposal;
pub mod sa;
#[cfg(test)]
mod test_rng;
