//! `bitw-control`: the control process of bitw, and `bitwctl`, its CLI.
//!
//! Threads, not async: one engine thread owns all state ([`daemon`]); the
//! dataplane link ([`link`]), the admin socket ([`admin`]), the exporter
//! ([`metrics`]) and the signal handler talk to it over crossbeam channels.
//!
//! - [`desired`][]: what control wants the dataplane to hold, and the diff
//!   (reconcile) against what it reports.
//! - [`link`][]: the control-channel client: handshake, pings, reconnects.
//! - [`admin`][]: the admin socket (newline-delimited JSON) and its messages.
//! - [`metrics`][]: the Prometheus exporter.
//! - [`ctl`][]: `bitwctl`.
//! - [`keyfile`][]: reading key files (permissions checked).
//! - [`ike`][]: IKEv2 without I/O: wire format, proposals, key schedule, DH,
//!   the IKE SA state machine.
//! - [`proxy`][]: the key exchange proxy: IKE as the terminals, on punted
//!   datagrams and acquires, Child SAs into the dataplane.

#![forbid(unsafe_code)]

pub mod admin;
pub mod ctl;
pub mod daemon;
pub mod desired;
pub mod ike;
pub mod keyfile;
pub mod link;
pub mod log;
pub mod metrics;
pub mod proxy;

#[cfg(test)]
mod fake_dataplane;
#[cfg(test)]
mod tests;

/// Loads the configuration and checks what only control can check (IKE
/// proposals, identities, credentials), with file, line and field.
pub fn load_config(
    path: &std::path::Path,
) -> Result<bitw_common::config::Config, bitw_common::config::ConfigError> {
    let config = bitw_common::config::Config::load(path)?;
    proxy::check(&config)?;
    Ok(config)
}

/// "bitw-control 0.1.0": what control calls itself in the hello.
pub fn software() -> String {
    format!("bitw-control {}", env!("CARGO_PKG_VERSION"))
}

/// Seconds since the Unix epoch, for timestamps shown to people and Prometheus.
pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}
