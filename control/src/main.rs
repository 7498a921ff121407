//! `bitw-control`: the control process.
//!
//! This is a skeleton. The control channel, IKEv2 proxy, bitwctl and the
//! Prometheus exporter land with their own issues; until then the binary only
//! answers `--help` and `--version` and says plainly that it does nothing yet.

use clap::Parser;

/// bitw control process (IKEv2 proxy, SA life cycle, metrics). Not functional yet.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Configuration file (the same TOML the dataplane reads).
    #[arg(long)]
    config: Option<std::path::PathBuf>,
}

fn main() {
    let _cli = Cli::parse();
    eprintln!("bitw-control: not implemented yet; the dataplane runs with its static config alone");
    std::process::exit(2);
}
