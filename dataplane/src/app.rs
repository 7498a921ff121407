//! The `bitw-dataplane` process: config → EAL → ports → workers → summary.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::config::{device_name, is_pci_address, Config};
use crate::counters::{DropReason, WorkerCounters, WorkerSnapshot};
use crate::dpdk::{self, Eal, Mempool, Port, PortSetup, PortStats};
use crate::filter::FilterTable;
use crate::worker::Worker;

/// Exit codes (documented in `--help`).
pub mod exit {
    pub const OK: i32 = 0;
    pub const CONFIG: i32 = 2;
    pub const DPDK: i32 = 3;
    pub const WORKER: i32 = 4;
}

/// Options of one run.
pub struct RunOptions {
    pub config: PathBuf,
    pub run_for: Option<Duration>,
}

/// An error with the exit code it maps to.
pub struct Failure {
    pub code: i32,
    pub message: String,
}

#[derive(Serialize)]
pub struct PortSummary {
    pub device: String,
    pub port_id: u16,
    #[serde(flatten)]
    pub stats: PortStats,
}

/// The JSON printed on stdout when the dataplane stops.
#[derive(Serialize)]
pub struct Summary {
    pub version: &'static str,
    pub dpdk: String,
    pub config: String,
    pub duration_seconds: f64,
    pub workers: Vec<WorkerSnapshot>,
    pub ports: BTreeMap<String, PortSummary>,
    /// Totals over workers.
    pub rx_packets: u64,
    pub tx_packets: u64,
    pub non_ip: u64,
    pub bypassed: u64,
    /// Frames of directions without rules (default bypass), forwarded unparsed.
    pub uninspected: u64,
    pub drops: BTreeMap<String, u64>,
}

/// EAL arguments: the config's, plus lcores, devices and a file prefix if absent.
pub fn eal_args(cfg: &Config) -> Result<Vec<String>, Failure> {
    let given = cfg.eal.args.clone();
    let has = |flags: &[&str]| {
        given.iter().any(|a| {
            flags
                .iter()
                .any(|f| a == f || a.starts_with(&format!("{f}=")))
        })
    };
    let mut args = given.clone();
    if !has(&["-l", "-c", "--lcores", "-L"]) {
        let cores = match &cfg.dataplane.cores {
            Some(c) => c.clone(),
            None => {
                let mut ids: Vec<usize> = core_affinity::get_core_ids()
                    .unwrap_or_default()
                    .into_iter()
                    .map(|c| c.id)
                    .collect();
                ids.sort_unstable();
                let w = cfg.dataplane.workers;
                if ids.len() < w {
                    return Err(Failure {
                        code: exit::CONFIG,
                        message: format!(
                            "{}: dataplane.workers = {w} but this process may use only {} CPUs ({:?}); \
                             lower workers or list dataplane.cores",
                            cfg.path.display(),
                            ids.len(),
                            ids
                        ),
                    });
                }
                // The last CPUs: CPU 0 usually carries the OS and the control process.
                ids[ids.len() - w..].to_vec()
            }
        };
        args.push("-l".into());
        args.push(
            cores
                .iter()
                .map(|c| c.to_string())
                .collect::<Vec<_>>()
                .join(","),
        );
    }
    if !has(&["--file-prefix"]) {
        args.push(format!("--file-prefix=bitw-{}", std::process::id()));
    }
    for (name, port) in [("inside", &cfg.inside), ("outside", &cfg.outside)] {
        if is_pci_address(&port.device) {
            if has(&["--no-pci"]) {
                return Err(Failure {
                    code: exit::CONFIG,
                    message: format!(
                        "{}: ports.{name}.device `{}` is a PCI address but [eal].args has --no-pci",
                        cfg.path.display(),
                        port.device
                    ),
                });
            }
            args.push("-a".into());
            args.push(port.device.clone());
        } else {
            args.push(format!("--vdev={}", port.device));
        }
    }
    Ok(args)
}

/// The ethdev name EAL gives a configured device.
fn ethdev_name(device: &str) -> String {
    let name = device_name(device);
    if is_pci_address(device) && name.matches(':').count() == 1 {
        format!("0000:{name}")
    } else {
        name.to_string()
    }
}

fn dpdk_failure(e: impl std::fmt::Display) -> Failure {
    Failure {
        code: exit::DPDK,
        message: e.to_string(),
    }
}

/// Runs the dataplane until `--run-for` elapses or SIGINT/SIGTERM arrives.
pub fn run(opts: RunOptions) -> Result<Summary, Failure> {
    let cfg = Config::load(&opts.config).map_err(|e| Failure {
        code: exit::CONFIG,
        message: e.to_string(),
    })?;
    let args = eal_args(&cfg)?;

    // Signals first: a SIGTERM during EAL start still stops us cleanly.
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone()).map_err(|e| Failure {
            code: exit::DPDK,
            message: format!("cannot install signal handler: {e}"),
        })?;
    }

    let eal = Eal::init(&args).map_err(dpdk_failure)?;
    let w = cfg.dataplane.workers;
    if eal.lcore_count() < w {
        return Err(Failure {
            code: exit::CONFIG,
            message: format!(
                "{}: dataplane.workers = {w} but the EAL arguments give {} lcores",
                cfg.path.display(),
                eal.lcore_count()
            ),
        });
    }
    let pool = Mempool::new(&eal, "bitw-mbufs", cfg.dataplane.mbufs).map_err(dpdk_failure)?;
    let open = |name: &str, device: &str| {
        Port::open(
            &eal,
            &pool,
            &PortSetup {
                name,
                device_name: &ethdev_name(device),
                queues: w as u16,
                rx_descriptors: cfg.dataplane.rx_descriptors,
                tx_descriptors: cfg.dataplane.tx_descriptors,
            },
        )
        .map_err(dpdk_failure)
    };
    let inside = open("inside", &cfg.inside.device)?;
    let outside = open("outside", &cfg.outside.device)?;
    let filter = Arc::new(
        FilterTable::build(&cfg.policies, cfg.dataplane.default_action).map_err(dpdk_failure)?,
    );

    let counters: Vec<Arc<WorkerCounters>> = (0..w)
        .map(|_| Arc::new(WorkerCounters::default()))
        .collect();
    let tasks: Vec<Box<dyn FnOnce() + Send>> = (0..w)
        .map(|i| {
            let worker = Worker {
                id: i,
                inside: inside.queue(i as u16),
                outside: outside.queue(i as u16),
                burst: cfg.dataplane.burst,
                flow_cache: cfg.dataplane.flow_cache,
                filter: filter.clone(),
                counters: counters[i].clone(),
                stop: stop.clone(),
            };
            Box::new(move || worker.run()) as Box<dyn FnOnce() + Send>
        })
        .collect();

    let started = Instant::now();
    // The timer runs on an ordinary thread: it never touches DPDK.
    if let Some(limit) = opts.run_for {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let deadline = Instant::now() + limit;
            while !stop.load(Ordering::Relaxed) {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    stop.store(true, Ordering::Relaxed);
                    break;
                }
                std::thread::sleep(left.min(Duration::from_millis(50)));
            }
        });
    }
    eprintln!(
        "bitw-dataplane: forwarding with {w} worker(s) between inside ({}) and outside ({}); {} rules",
        cfg.inside.device,
        cfg.outside.device,
        cfg.policies.len()
    );
    let ran = dpdk::run_on_lcores(&eal, tasks);
    let duration = started.elapsed();

    let workers: Vec<WorkerSnapshot> = counters
        .iter()
        .enumerate()
        .map(|(i, c)| c.snapshot(i))
        .collect();
    let mut ports = BTreeMap::new();
    for (name, port, dev) in [
        ("inside", &inside, &cfg.inside.device),
        ("outside", &outside, &cfg.outside.device),
    ] {
        ports.insert(
            name.to_string(),
            PortSummary {
                device: dev.clone(),
                port_id: port.id,
                stats: port.stats(),
            },
        );
    }
    inside.close();
    outside.close();
    drop(filter);
    drop(pool);
    eal.cleanup();

    let mut drops: BTreeMap<String, u64> = DropReason::ALL
        .iter()
        .map(|r| (r.as_str().to_string(), 0))
        .collect();
    for s in &workers {
        for (k, v) in &s.drops {
            *drops.get_mut(k).expect("known reason") += v;
        }
    }
    let summary = Summary {
        version: env!("CARGO_PKG_VERSION"),
        dpdk: dpdk::version(),
        config: cfg.path.display().to_string(),
        duration_seconds: duration.as_secs_f64(),
        rx_packets: workers
            .iter()
            .map(|s| s.rx_inside.packets + s.rx_outside.packets)
            .sum(),
        tx_packets: workers
            .iter()
            .map(|s| s.tx_inside.packets + s.tx_outside.packets)
            .sum(),
        non_ip: workers.iter().map(|s| s.non_ip).sum(),
        bypassed: workers.iter().map(|s| s.bypassed).sum(),
        uninspected: workers.iter().map(|s| s.uninspected).sum(),
        workers,
        ports,
        drops,
    };
    if let Err(e) = ran {
        eprintln!("bitw-dataplane: {e}");
        println!(
            "{}",
            serde_json::to_string_pretty(&summary).unwrap_or_default()
        );
        return Err(Failure {
            code: exit::WORKER,
            message: e.to_string(),
        });
    }
    Ok(summary)
}
