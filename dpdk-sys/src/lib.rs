//! Raw bindings to the system DPDK, generated at build time by bindgen.
//!
//! Nothing here is safe to call on its own: the `dataplane` crate wraps what it
//! uses in one module (`dataplane::dpdk`) that states the invariants. Functions
//! DPDK defines `static inline` (rx/tx burst, mbuf accessors, `rte_errno`) are
//! reached through the `bitw_*` C shim compiled from `shim.c`.
#![allow(non_upper_case_globals, non_camel_case_types, non_snake_case)]
#![allow(clippy::all)]
#![allow(missing_docs, unsafe_op_in_unsafe_fn, improper_ctypes)]

include!(concat!(env!("OUT_DIR"), "/bindings.rs"));

/// intel-ipsec-mb (`libIPSec_MB`): its multi-buffer manager and the structs of
/// its direct AES-GCM API. Wrapped, like DPDK, in `dataplane::dpdk`.
pub mod ipsec_mb {
    include!(concat!(env!("OUT_DIR"), "/ipsec_mb.rs"));
}
