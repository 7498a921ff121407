//! What `bitw-dataplane` and `bitw-control` share, free of DPDK:
//! - [`config`]: the one TOML file both read, validated with file/line/field messages.
//! - [`connection`]: `[[connection]]`, the IKE peerings run as the terminals.
//! - [`rules`]: filter rules (directions, prefixes, protocols, ports, actions).
//! - [`sa_params`]: what defines an SA (transform, mode, encapsulation, keys, lifetimes).
//! - [`proto`]: the versioned control channel between the two processes.
//! - [`channel`]: its transports (Unix socket; TCP with mutual TLS).

pub mod channel;
pub mod config;
pub mod connection;
pub mod proto;
pub mod rules;
pub mod sa_params;
