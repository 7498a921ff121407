//! The `bitw-dataplane` process: config → control-channel socket → EAL →
//! ports → workers (and the control thread) → summary.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use bitw_common::channel::Listener;

use crate::config::{device_name, is_pci_address, Config};
use crate::counters::{DropReason, WorkerCounters, WorkerSnapshot};
use crate::ctl::{self, ControlTotals, Ctl, CtlSetup, Shared};
use crate::dpdk::{self, Eal, Mempool, Port, PortSetup, PortStats};
use crate::filter::{Direction, FilterTable};
use crate::sa::{self, Backend};
use crate::sadb::{SaChange, Sadb};
use crate::snapshot::Published;
use crate::worker::{Handoff, Worker};

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

/// One SA's state at the end (keys never appear).
#[derive(Serialize)]
pub struct SaSummary {
    pub name: String,
    pub direction: &'static str,
    pub spi: String,
    pub packets: u64,
    pub bytes: u64,
    /// Outbound: the last sequence number used; inbound: the highest received.
    pub sequence: u64,
    pub expired: bool,
    pub owner_worker: usize,
}

/// SA events seen while running.
#[derive(Serialize, Default)]
pub struct EventTotals {
    pub soft_lifetime: u64,
    pub hard_lifetime: u64,
    pub sequence_exhausted: u64,
    pub lost: u64,
}

/// At most this many SAs are listed one by one in the summary.
const SA_SUMMARY_CAP: usize = 1000;

/// The JSON printed on stdout when the dataplane stops.
#[derive(Serialize)]
pub struct Summary {
    pub version: &'static str,
    pub dpdk: String,
    /// The AES-GCM library of the packet path (`dataplane.crypto`).
    pub crypto: String,
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
    pub esp_encrypted: u64,
    pub esp_decrypted: u64,
    pub handed_off: u64,
    /// IKE frames taken out of the traffic for control (totals over workers).
    pub punted: u64,
    /// Packets handed to the control thread to wait for their SA.
    pub held: u64,
    pub sa_events: EventTotals,
    /// The SAs (the first 1000), with their counters.
    pub sas: Vec<SaSummary>,
    pub sa_count: usize,
    /// The control channel: sessions, events, and the drops it counted
    /// (those are in `drops` too).
    pub control: ControlTotals,
    /// Memory a PMD let go of on EAL's interrupt thread (net_memif: a peer
    /// went away) after waiting for every worker to leave its burst (dpdk.rs,
    /// "Peers that go away"); and the waits cut short after 1 s.
    pub pmd_unmap_waits: u64,
    pub pmd_unmap_wait_timeouts: u64,
}

fn sa_summaries(sadb: &Sadb) -> (Vec<SaSummary>, usize) {
    let table = sadb.load();
    let all: Vec<_> = table
        .outbound
        .iter()
        .chain(table.inbound.iter())
        .flatten()
        .collect();
    let list = all
        .iter()
        .take(SA_SUMMARY_CAP)
        .map(|sa| SaSummary {
            name: sa.params.name.clone(),
            direction: sa.params.direction.as_str(),
            spi: format!("{:#010x}", sa.params.spi),
            packets: sa.packets.load(Ordering::Relaxed),
            bytes: sa.bytes.load(Ordering::Relaxed),
            sequence: match sa.params.direction {
                Direction::Out => sa.seq.load(Ordering::Relaxed),
                Direction::In => sa.top_seen.load(Ordering::Relaxed),
            },
            expired: sa.is_expired(),
            owner_worker: sa.owner,
        })
        .collect();
    (list, all.len())
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

/// Sets the stop flag if the control thread unwinds, so the workers stop too.
struct StopOnPanic(Arc<AtomicBool>);

impl Drop for StopOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.store(true, Ordering::Relaxed);
        }
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
    // The control channel's socket first: a dataplane that cannot be reached
    // must not start (and another one may be listening there).
    let c = &cfg.control;
    let listener =
        Listener::bind(&c.socket, c.tls.as_ref(), c.socket_mode).map_err(|e| Failure {
            code: exit::DPDK,
            message: format!("control channel: cannot listen on {}: {e}", c.socket),
        })?;

    // Signals first: a SIGTERM during EAL start still stops us cleanly.
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone()).map_err(|e| Failure {
            code: exit::DPDK,
            message: format!("cannot install signal handler: {e}"),
        })?;
    }

    // The CPUs this process may use, before EAL pins the main thread to its lcore.
    let allowed_cpus = core_affinity::get_core_ids().unwrap_or_default();
    let eal = Eal::init(&args).map_err(dpdk_failure)?;
    // Threads inherit the main lcore's CPU from this thread: the control
    // thread and the timer go to a CPU no worker polls on (the first such),
    // if there is one, so they never take time from a worker.
    let lcore_cpus = eal.lcore_cpus();
    let spare_cpu = allowed_cpus
        .iter()
        .find(|c| !lcore_cpus.contains(&c.id))
        .or(allowed_cpus.first())
        .copied();
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
    // Held and queued packets keep their mbufs: the pool has room for them on top.
    let pool_size =
        cfg.dataplane.mbufs + (cfg.control.hold_packets + ctl::HOLD_QUEUE + ctl::PUNT_QUEUE) as u32;
    let pool = Mempool::new(&eal, "bitw-mbufs", pool_size).map_err(dpdk_failure)?;
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
    // The AES-GCM library every SA of this process uses, before the first SA.
    let crypto = Backend::resolve(cfg.dataplane.crypto).map_err(|e| Failure {
        code: exit::CONFIG,
        message: format!(
            "{}: dataplane.crypto = \"{}\": {e} (\"auto\" falls back to ring)",
            cfg.path.display(),
            cfg.dataplane.crypto.name()
        ),
    })?;
    sa::set_backend(crypto);
    let sadb = Arc::new(Sadb::new(w));
    sadb.apply(cfg.sas.iter().cloned().map(SaChange::Install).collect())
        .map_err(|e| Failure {
            code: exit::CONFIG,
            message: format!("{}: {e}", cfg.path.display()),
        })?;
    let filter = Arc::new(Published::new(
        FilterTable::build_with_sas(&cfg.policies, cfg.dataplane.default_action, &|name, dir| {
            sadb.slot(name, dir)
        })
        .map_err(dpdk_failure)?,
    ));
    let handoff = Arc::new(Handoff::new(w, cfg.dataplane.handoff_depth));
    let shared = Arc::new(Shared::new(cfg.control.hold_packets));

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
                sadb: sadb.clone(),
                handoff: handoff.clone(),
                ctl: shared.clone(),
                drop_unknown_spi: cfg.dataplane.drop_unknown_spi,
                counters: counters[i].clone(),
                stop: stop.clone(),
            };
            Box::new(move || worker.run()) as Box<dyn FnOnce() + Send>
        })
        .collect();

    let started = Instant::now();
    let workers_done = Arc::new(AtomicBool::new(false));
    // The timer runs on an ordinary thread: it never touches DPDK.
    if let Some(limit) = opts.run_for {
        let stop = stop.clone();
        std::thread::spawn(move || {
            if let Some(cpu) = spare_cpu {
                core_affinity::set_for_current(cpu);
            }
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
        "bitw-dataplane: control channel on {} (one session at a time)",
        cfg.control.socket
    );
    eprintln!(
        "bitw-dataplane: forwarding with {w} worker(s) between inside ({}) and outside ({}); {} rules; AES-GCM by {}",
        cfg.inside.device,
        cfg.outside.device,
        cfg.policies.len(),
        crypto.describe()
    );
    // The control thread is an ordinary thread (DPDK allows mbuf allocation
    // and ACL builds from it); scoped, so it ends before the pool and ports go.
    let setup = CtlSetup {
        config: &cfg,
        listener,
        pool: &pool,
        sadb: sadb.clone(),
        filter: filter.clone(),
        handoff: handoff.clone(),
        shared: shared.clone(),
        counters: counters.clone(),
        ports: [
            ("inside".into(), cfg.inside.device.clone(), inside.id),
            ("outside".into(), cfg.outside.device.clone(), outside.id),
        ],
        stop: stop.clone(),
        workers_done: workers_done.clone(),
        started,
    };
    let (ran, control) = std::thread::scope(|scope| {
        let ctl_thread = std::thread::Builder::new()
            .name("bitw-ctl".into())
            .spawn_scoped(scope, {
                let stop = stop.clone();
                move || {
                    if let Some(cpu) = spare_cpu {
                        core_affinity::set_for_current(cpu);
                    }
                    let stop_on_panic = StopOnPanic(stop);
                    let totals = Ctl::new(setup).run();
                    drop(stop_on_panic);
                    totals
                }
            });
        let ran = match &ctl_thread {
            Ok(_) => dpdk::run_on_lcores(&eal, tasks),
            Err(e) => Err(dpdk::DpdkError::Lcore(format!(
                "cannot start the control-channel thread: {e}"
            ))),
        };
        stop.store(true, Ordering::Relaxed);
        workers_done.store(true, Ordering::Release);
        let control = match ctl_thread.map(|t| t.join()) {
            Ok(Ok(totals)) => Ok(totals),
            Ok(Err(_)) => Err("the control-channel thread panicked".to_string()),
            Err(e) => Err(e.to_string()),
        };
        (ran, control)
    });
    let duration = started.elapsed();
    let (ran, control) = match (ran, control) {
        (Ok(()), Err(e)) => (Err(dpdk::DpdkError::Lcore(e)), ControlTotals::default()),
        (ran, control) => (ran, control.unwrap_or_default()),
    };

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
    let sas = sa_summaries(&sadb);
    let (graces, grace_timeouts) = dpdk::grace_periods();
    if grace_timeouts > 0 {
        eprintln!(
            "bitw-dataplane: warning: {grace_timeouts} of {graces} port teardowns by the PMD \
             (peer gone) did not wait for every worker (a worker was stuck for 1 s)"
        );
    }
    inside.close();
    outside.close();
    // Packets still queued for a worker or the control thread go back to the
    // pool before it is freed.
    drop(handoff);
    drop(shared);
    drop(filter);
    drop(pool);
    eal.cleanup();

    let mut drops: BTreeMap<String, u64> = DropReason::ALL
        .iter()
        .map(|r| (r.as_str().to_string(), 0))
        .collect();
    for (k, v) in workers
        .iter()
        .flat_map(|s| s.drops.iter())
        .chain(&control.drops)
    {
        *drops.entry(k.clone()).or_default() += v;
    }
    let summary = Summary {
        version: env!("CARGO_PKG_VERSION"),
        dpdk: dpdk::version(),
        crypto: crypto.describe(),
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
        esp_encrypted: workers.iter().map(|s| s.esp_encrypted).sum(),
        esp_decrypted: workers.iter().map(|s| s.esp_decrypted).sum(),
        handed_off: workers.iter().map(|s| s.handed_off).sum(),
        punted: workers.iter().map(|s| s.punted).sum(),
        held: workers.iter().map(|s| s.held).sum(),
        sa_events: EventTotals {
            soft_lifetime: control.soft_lifetime,
            hard_lifetime: control.hard_lifetime,
            sequence_exhausted: control.sequence_exhausted,
            lost: workers.iter().map(|s| s.events_lost).sum(),
        },
        sa_count: sas.1,
        sas: sas.0,
        workers,
        ports,
        drops,
        control,
        pmd_unmap_waits: graces,
        pmd_unmap_wait_timeouts: grace_timeouts,
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
