//! `bitw-dataplane`: see `--help`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use bitw_dataplane::app::{self, exit, RunOptions};
use bitw_dataplane::config::Config;
use clap::Parser;

const AFTER_HELP: &str = "\
Examples:
  bitw-dataplane --config configs/demo.toml --run-for 5
  bitw-dataplane --config /etc/bitw/bitw.toml          # until SIGINT/SIGTERM
  bitw-dataplane --config /etc/bitw/bitw.toml --check  # validate and exit

On stop, a JSON summary of the counters goes to stdout; messages go to stderr.

Exit codes:
  0  stopped cleanly
  2  configuration error (the message names file, line and field)
  3  DPDK failure (EAL, mempool, port setup)
  4  a worker failed (panicked) while running";

/// bitw dataplane: a DPDK bump-in-the-wire between ports `inside` and `outside`.
#[derive(Parser)]
#[command(version, about, after_help = AFTER_HELP)]
struct Cli {
    /// Configuration file (TOML; see configs/reference.toml).
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
    /// Stop after this many seconds (fractions allowed) and print the summary.
    #[arg(long, value_name = "SECONDS")]
    run_for: Option<f64>,
    /// Only validate the configuration, then exit.
    #[arg(long)]
    check: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.check {
        return match Config::load(&cli.config) {
            Ok(c) => {
                eprintln!(
                    "{}: ok ({} rules, {} workers)",
                    c.path.display(),
                    c.policies.len(),
                    c.dataplane.workers
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(exit::CONFIG as u8)
            }
        };
    }
    let run_for = match cli.run_for {
        Some(s) if !(s.is_finite() && s > 0.0) => {
            eprintln!("error: --run-for {s}: expected a positive number of seconds");
            return ExitCode::from(exit::CONFIG as u8);
        }
        s => s.map(Duration::from_secs_f64),
    };
    match app::run(RunOptions {
        config: cli.config,
        run_for,
    }) {
        Ok(summary) => {
            println!(
                "{}",
                serde_json::to_string_pretty(&summary).expect("summary serialises")
            );
            for w in &summary.workers {
                let l = &w.latency;
                let us = |ns: u64| ns as f64 / 1e3;
                eprintln!(
                    "bitw-dataplane: worker {} RX-to-TX latency: p50 {:.1} us, p99 {:.1} us, p99.9 {:.1} us, max {:.1} us ({} packets)",
                    w.worker,
                    us(l.p50_ns),
                    us(l.p99_ns),
                    us(l.p999_ns),
                    us(l.max_ns),
                    l.packets
                );
            }
            ExitCode::SUCCESS
        }
        Err(f) => {
            eprintln!("error: {}", f.message);
            ExitCode::from(f.code as u8)
        }
    }
}
