//! Link settings of the `bitw-dataplane` binary.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    // The C shim defines munmap() (dpdk-sys/shim.c): exported from the
    // executable, it is also the one the DPDK drivers' calls bind to, so
    // net_memif's unmapping of a departed peer's memory waits for the
    // workers (see dpdk.rs, "Peers that go away").
    println!("cargo:rustc-link-arg-bins=-Wl,--export-dynamic-symbol=munmap");
}
