//! Generates bindings to the system DPDK and compiles the C shim.
//!
//! DPDK comes from Debian (`libdpdk-dev`, 22.11). Both bindgen and cc get the
//! exact cflags pkg-config reports (including its `-march`), so struct layouts
//! and inline code agree with the installed libraries.

use std::env;
use std::path::PathBuf;

const MIN_DPDK: &str = "22.11";

fn main() {
    println!("cargo:rerun-if-changed=wrapper.h");
    println!("cargo:rerun-if-changed=shim.h");
    println!("cargo:rerun-if-changed=shim.c");

    let lib = match pkg_config::Config::new()
        .atleast_version(MIN_DPDK)
        .probe("libdpdk")
    {
        Ok(lib) => lib,
        Err(e) => {
            panic!(
                "\n\nDPDK >= {MIN_DPDK} was not found through pkg-config ({e}).\n\
                 On Debian 12 install it with:\n\
                 \x20   apt-get install -y dpdk dpdk-dev libdpdk-dev clang libclang-dev pkg-config\n\
                 (or run scripts/setup-debian.sh, which installs everything bitw needs).\n"
            );
        }
    };

    // pkg-config's full cflags, e.g. `-include rte_config.h -march=corei7`.
    let cflags = pkg_config::get_variable("libdpdk", "cflags").ok();
    let cflags: Vec<String> = std::process::Command::new("pkg-config")
        .args(["--cflags", "libdpdk"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .or(cflags)
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_owned)
        .collect();

    let mut build = cc::Build::new();
    build
        .file("shim.c")
        .flag("-O3")
        .define("ALLOW_EXPERIMENTAL_API", None);
    for path in &lib.include_paths {
        build.include(path);
    }
    for flag in &cflags {
        build.flag(flag);
    }
    build.warnings(false).compile("bitw_dpdk_shim");

    let mut builder = bindgen::Builder::default()
        .header("wrapper.h")
        .clang_arg("-DALLOW_EXPERIMENTAL_API")
        .clang_args(cflags.iter())
        .clang_args(
            lib.include_paths
                .iter()
                .map(|p| format!("-I{}", p.display())),
        )
        .default_enum_style(bindgen::EnumVariation::Consts)
        .derive_default(true)
        .layout_tests(true)
        .generate_comments(false)
        .blocklist_type("__tile1024i.*|max_align_t")
        .blocklist_function("__tile.*")
        .parse_callbacks(Box::new(bindgen::CargoCallbacks::new()));
    for pattern in [
        "rte_eal_.*",
        "rte_eth_.*",
        "rte_pktmbuf_.*",
        "rte_mbuf_.*",
        "rte_mempool_.*",
        "rte_ring_.*",
        "rte_lcore_.*",
        "rte_acl_.*",
        "rte_socket_id",
        "rte_strerror",
        "rte_exit",
        "rte_version",
        "rte_get_main_lcore",
        "rte_get_next_lcore",
        "rte_thread_register",
        "rte_thread_unregister",
        "rte_zmalloc",
        "rte_free",
        "bitw_.*",
    ] {
        builder = builder.allowlist_function(pattern);
    }
    for pattern in [
        "rte_eth_.*",
        "rte_mbuf",
        "rte_mempool",
        "rte_ring",
        "rte_acl_.*",
        "rte_ether_.*",
        "rte_lcore_state_t",
        "rte_rmt_call_main_t",
        "RTE_.*",
    ] {
        builder = builder.allowlist_type(pattern);
    }
    builder = builder.allowlist_var("RTE_.*");

    let bindings = builder
        .generate()
        .expect("bindgen could not generate DPDK bindings (is libclang-dev installed?)");
    let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join("bindings.rs");
    bindings
        .write_to_file(&out)
        .expect("could not write DPDK bindings");

    ipsec_mb_bindings();
}

/// intel-ipsec-mb (Debian `libipsec-mb-dev`), the AES-GCM library DPDK's
/// `crypto_aesni_gcm` PMD wraps: bitw calls its direct GCM API on the packet
/// path. Only the manager, the GCM key/context structs and the few functions
/// that set them up are bound; the GCM functions themselves are reached through
/// the manager's function pointers (the `IMB_AES128_GCM_*` macros do the same).
fn ipsec_mb_bindings() {
    const HEADER: &str = "/usr/include/intel-ipsec-mb.h";
    println!("cargo:rerun-if-changed={HEADER}");
    if !std::path::Path::new(HEADER).exists() {
        panic!(
            "\n\n{HEADER} is missing. On Debian 12 install it with:\n\
             \x20   apt-get install -y libipsec-mb-dev\n\
             (or run scripts/setup-debian.sh).\n"
        );
    }
    println!("cargo:rustc-link-lib=IPSec_MB");
    let bindings = bindgen::Builder::default()
        .header(HEADER)
        .default_enum_style(bindgen::EnumVariation::Consts)
        .prepend_enum_name(false)
        .derive_default(true)
        .layout_tests(true)
        .generate_comments(false)
        .allowlist_function("alloc_mb_mgr|free_mb_mgr|init_mb_mgr_auto|imb_get_errno|imb_get_strerror|imb_get_version_str")
        .allowlist_type("IMB_MGR|IMB_ARCH|gcm_key_data|gcm_context_data")
        .allowlist_var("IMB_FEATURE_.*|IMB_VERSION_STR|IMB_ARCH_.*")
        .parse_callbacks(Box::new(bindgen::CargoCallbacks::new()))
        .generate()
        .expect("bindgen could not generate intel-ipsec-mb bindings");
    let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join("ipsec_mb.rs");
    bindings
        .write_to_file(&out)
        .expect("could not write intel-ipsec-mb bindings");
}
