//! `bitwctl`: administer a running bitw-control. See `bitwctl --help`.

fn main() {
    std::process::exit(bitw_control::ctl::main());
}
