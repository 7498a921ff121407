//! `bitw-control`: the control process. See the library docs for its parts.

use std::path::PathBuf;

use clap::Parser;
use crossbeam_channel::select;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};

use bitw_control::daemon::Daemon;
use bitw_control::info;

const EXAMPLES: &str = "\
Examples:
  bitw-control --config /etc/bitw/bitw.toml
  bitw-control --config /etc/bitw/bitw.toml --verbose
  bitw-control --config /etc/bitw/bitw.toml --check     # validate and exit
  kill -HUP $(pidof bitw-control)                       # reload (or: bitwctl reload)

It connects to the dataplane at [control] socket (retrying while it is
away), makes the dataplane hold what the config and bitwctl ask for, serves
bitwctl on [control] admin_socket and Prometheus on [control] metrics_listen.
Logs go to stderr, one line per event, never keys.

Exit codes: 0 stopped cleanly (SIGTERM/SIGINT); 1 could not start (admin
socket in use, metrics address taken); 2 configuration error.";

/// bitw control process: dataplane link, SA and filter-table life cycle, bitwctl, metrics.
#[derive(Parser)]
#[command(version, after_help = EXAMPLES)]
struct Cli {
    /// Configuration file (the same TOML the dataplane reads)
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
    /// Stay in the foreground (the only mode: use systemd or similar to daemonise)
    #[arg(long)]
    foreground: bool,
    /// Validate the configuration and exit
    #[arg(long)]
    check: bool,
    /// Also log debug lines (punted packets, every learned neighbour)
    #[arg(long, short)]
    verbose: bool,
}

fn main() {
    let cli = Cli::parse();
    bitw_control::log::set_debug(cli.verbose);
    let _ = cli.foreground;
    let config = match bitw_control::load_config(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("bitw-control: {e}");
            std::process::exit(2);
        }
    };
    if cli.check {
        println!(
            "{}: ok ({} SAs, {} rules, {} terminals, {} connections)",
            cli.config.display(),
            config.sas.len(),
            config.policies.len(),
            config.terminals.len(),
            config.connections.len()
        );
        return;
    }
    // Signals first, so a SIGTERM right after start is not lost.
    let mut signals = match signal_hook::iterator::Signals::new([SIGHUP, SIGINT, SIGTERM]) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("bitw-control: cannot handle signals: {e}");
            std::process::exit(1);
        }
    };
    let daemon = match Daemon::start(config) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("bitw-control: {e:#}");
            std::process::exit(1);
        }
    };
    let (sig_tx, sig_rx) = crossbeam_channel::unbounded();
    let handle = signals.handle();
    let sig_thread = std::thread::spawn(move || {
        for s in signals.forever() {
            if sig_tx.send(s).is_err() {
                break;
            }
        }
    });
    let mut code = 0;
    loop {
        select! {
            recv(sig_rx) -> s => match s {
                Ok(SIGHUP) => {
                    info!("SIGHUP: re-reading the configuration file");
                    daemon.reload();
                }
                Ok(s) => {
                    info!("signal {s}: stopping");
                    break;
                }
                Err(_) => break,
            },
            recv(daemon.engine_done()) -> _ => {
                info!("the engine stopped unexpectedly");
                code = 1;
                break;
            }
        }
    }
    handle.close();
    daemon.stop();
    let _ = sig_thread.join();
    info!("stopped");
    std::process::exit(code);
}
