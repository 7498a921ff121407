//! bitw dataplane: a DPDK bump-in-the-wire between port `inside` (terminals)
//! and port `outside` (the Internet).
//!
//! Layout:
//! - [`config`]: the TOML file, validated with file/line/field messages.
//! - [`dpdk`]: the only module with `unsafe`: EAL, ports, mbuf bursts, rte_acl, lcores.
//! - [`wire`]: frame parsing into classification keys (never panics).
//! - [`filter`]: the filter table (SPD): ordered rules compiled into rte_acl tries.
//! - [`worker`]: the poll loop over bursts.
//! - [`counters`]: single-writer per-worker counters.
//! - [`sa`]: security associations: parameters, keys (ring AEAD), replay window, lifetimes.
//! - [`sadb`]: the SA database (lock-free snapshots for the workers).
//! - [`snapshot`]: values the control thread replaces and workers re-read cheaply (filter, punt set).
//! - [`esp`]: ESP encapsulation and decapsulation in place (RFC 4303, 3948, 4106, 7634).
//! - [`ctl`]: the dataplane end of the control channel (a thread; queues to and from the workers).
//! - [`app`]: wiring it together for the `bitw-dataplane` binary.
#![deny(unsafe_op_in_unsafe_fn)]

pub mod app;
pub use bitw_common::config;
pub mod counters;
pub mod ctl;
pub mod dpdk;
pub mod esp;
pub mod filter;
pub mod latency;
pub mod sa;
pub mod sadb;
pub mod snapshot;
pub mod wire;
pub mod worker;
