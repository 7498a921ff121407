//! The one module of the dataplane that calls DPDK: every `unsafe` lives here.
//!
//! Invariants the safe API relies on:
//! - EAL is initialised once per process ([`Eal::init`] or [`init_eal_for_tests`]);
//!   nothing else here may be called before (ports, pools and ACL contexts are
//!   only obtainable after it).
//! - A [`Burst`] owns the mbufs it holds: each pointer in `mbufs[..len]` came
//!   from an RX burst, is referenced nowhere else, and is either handed to a TX
//!   queue or freed exactly once. A burst never leaves the thread that filled it
//!   (raw pointers make it `!Send`).
//! - Each (port, queue) pair is polled by exactly one worker ([`PortQueue`] is
//!   handed out per worker by the caller; DPDK's RX/TX queues are not
//!   thread-safe).
//! - Frames are read through their first segment only; `frame()` never
//!   exposes more than `data_len` bytes of it.
//! - ACL contexts are immutable after `build`; `rte_acl_classify` on them is
//!   safe from any number of threads at once.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::marker::PhantomData;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Once;

use dpdk_sys as sys;

use crate::config::MAX_BURST;

#[derive(Debug, thiserror::Error)]
pub enum DpdkError {
    #[error("EAL initialisation failed: {0} (arguments: {1})")]
    EalInit(String, String),
    #[error("port {name}: device `{device}` was not found after EAL start: {hint}")]
    PortNotFound {
        name: String,
        device: String,
        hint: String,
    },
    #[error("port {name}: {what} failed: {reason}")]
    Port {
        name: String,
        what: String,
        reason: String,
    },
    #[error("mbuf pool of {n} buffers could not be created: {0}", n = .1)]
    Mempool(String, u32),
    #[error("ACL {what} failed: {reason}")]
    Acl { what: String, reason: String },
    #[error("{0}")]
    Lcore(String),
}

fn errno_text(code: c_int) -> String {
    let code = code.abs();
    // SAFETY: rte_strerror returns a pointer to a static or thread-local string.
    let s = unsafe { CStr::from_ptr(sys::rte_strerror(code)) };
    format!("{} (errno {code})", s.to_string_lossy())
}

fn rte_errno_text() -> String {
    // SAFETY: reads the calling thread's rte_errno through the shim.
    errno_text(unsafe { sys::bitw_rte_errno() })
}

/// Proof that EAL is up in this process.
pub struct Eal {
    _private: (),
}

impl Eal {
    /// Starts EAL with `args` (without the program name). Only once per process.
    pub fn init(args: &[String]) -> Result<Eal, DpdkError> {
        let mut owned: Vec<CString> = Vec::with_capacity(args.len() + 1);
        owned.push(CString::new("bitw-dataplane").unwrap());
        for a in args {
            owned.push(CString::new(a.as_str()).map_err(|_| {
                DpdkError::EalInit(
                    format!("argument {a:?} contains a NUL byte"),
                    args.join(" "),
                )
            })?);
        }
        // EAL may permute argv; give it pointers it can shuffle, backed by `owned`.
        let mut argv: Vec<*mut c_char> = owned.iter().map(|c| c.as_ptr() as *mut c_char).collect();
        argv.push(ptr::null_mut());
        // SAFETY: argv is NUL-terminated, its strings outlive the call (EAL copies what it keeps).
        let rc = unsafe { sys::rte_eal_init((argv.len() - 1) as c_int, argv.as_mut_ptr()) };
        if rc < 0 {
            return Err(DpdkError::EalInit(rte_errno_text(), args.join(" ")));
        }
        std::mem::forget(owned); // EAL may keep pointers into argv (e.g. for --vdev devargs).
        Ok(Eal { _private: () })
    }

    /// Number of lcores EAL runs (main included).
    pub fn lcore_count(&self) -> usize {
        // SAFETY: EAL is initialised.
        unsafe { sys::rte_lcore_count() as usize }
    }

    /// The CPUs EAL's lcores run on (main lcore included).
    pub fn lcore_cpus(&self) -> Vec<usize> {
        let mut cpus = Vec::new();
        let mut lcore = u32::MAX;
        for _ in 0..self.lcore_count() {
            // SAFETY: iterates EAL's enabled lcores (main included) without wrapping.
            lcore = unsafe { sys::rte_get_next_lcore(lcore, 0, 0) };
            // SAFETY: plain query; -1 for an lcore without a single CPU.
            let cpu = unsafe { sys::rte_lcore_to_cpu_id(lcore as c_int) };
            if let Ok(cpu) = usize::try_from(cpu) {
                cpus.push(cpu);
            }
        }
        cpus
    }

    /// Releases EAL resources; call once, after every port is closed.
    pub fn cleanup(self) {
        // SAFETY: no DPDK object is used after this (self is consumed).
        unsafe { sys::rte_eal_cleanup() };
    }
}

/// Starts EAL once for a unit-test binary (no hugepages, no devices).
pub fn init_eal_for_tests() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let args: Vec<String> = [
            "--no-huge",
            "-m",
            "256",
            "--no-pci",
            "--no-shconf",
            "--no-telemetry",
            "-l",
            "0",
            "--log-level",
            "lib.eal:error",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([
            "--file-prefix".to_string(),
            format!("bitw-unit-{}", std::process::id()),
        ])
        .collect();
        if let Err(e) = Eal::init(&args) {
            panic!("unit tests need EAL: {e}");
        }
    });
}

/// The TSC frequency (cycles per second).
pub fn tsc_hz() -> u64 {
    // SAFETY: reads a value EAL computed at init.
    unsafe { sys::bitw_rte_get_tsc_hz() }
}

/// The time-stamp counter (what rte_rdtsc reads; inline on x86-64, where
/// the workers read it once per loop iteration).
#[inline]
pub fn tsc() -> u64 {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: rdtsc has no preconditions.
    unsafe {
        std::arch::x86_64::_rdtsc()
    }
    #[cfg(not(target_arch = "x86_64"))]
    // SAFETY: rdtsc has no preconditions.
    unsafe {
        sys::bitw_rte_rdtsc()
    }
}

/// The calling thread's lcore id (`u32::MAX` on a thread that is not an EAL lcore).
pub fn lcore_id() -> u32 {
    // SAFETY: plain query of a thread-local value.
    unsafe { sys::bitw_rte_lcore_id() }
}

/// A pool of packet buffers shared by all ports and workers.
pub struct Mempool {
    ptr: NonNull<sys::rte_mempool>,
}

// SAFETY: rte_mempool is multi-producer/multi-consumer safe.
unsafe impl Send for Mempool {}
unsafe impl Sync for Mempool {}

impl Mempool {
    pub fn new(_eal: &Eal, name: &str, n: u32) -> Result<Mempool, DpdkError> {
        let cname = CString::new(name).unwrap();
        let cache = 256u32.min(n / 8);
        // SAFETY: EAL is up (witnessed by `_eal`); name is NUL-terminated.
        let p = unsafe {
            sys::rte_pktmbuf_pool_create(
                cname.as_ptr(),
                n,
                cache,
                0,
                sys::RTE_MBUF_DEFAULT_BUF_SIZE as u16,
                sys::rte_socket_id() as c_int,
            )
        };
        NonNull::new(p)
            .map(|ptr| Mempool { ptr })
            .ok_or_else(|| DpdkError::Mempool(rte_errno_text(), n))
    }

    /// A new single-segment mbuf holding `parts` one after the other (e.g. an
    /// Ethernet header and an IP datagram), or `None` when the pool is empty or
    /// the bytes do not fit one buffer. Safe from any thread: a thread that is
    /// not an lcore allocates without the per-lcore cache.
    pub fn alloc_frame(&self, parts: &[&[u8]]) -> Option<Mbuf> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        if len == 0 || len > u16::MAX as usize {
            return None;
        }
        // SAFETY: the pool lives as long as self; a null result is handled.
        let m = unsafe { sys::bitw_rte_pktmbuf_alloc(self.ptr.as_ptr()) };
        if m.is_null() {
            return None;
        }
        let mbuf = Mbuf(m); // freed on every early return below
                            // SAFETY: a fresh single-segment mbuf; the shim checks the tailroom and
                            // returns null (changing nothing) without room.
        let p = unsafe { sys::bitw_rte_pktmbuf_append(m, len as u16) } as *mut u8;
        if p.is_null() {
            return None;
        }
        let mut at = 0;
        for part in parts {
            // SAFETY: append made `len` bytes from p writable; at + part.len() <= len.
            unsafe { ptr::copy_nonoverlapping(part.as_ptr(), p.add(at), part.len()) };
            at += part.len();
        }
        Some(mbuf)
    }

    /// Buffers currently free in the pool (all caches included).
    pub fn available(&self) -> u32 {
        // SAFETY: the pool lives as long as self.
        unsafe { sys::bitw_rte_mempool_avail_count(self.ptr.as_ptr()) }
    }
}

impl Drop for Mempool {
    fn drop(&mut self) {
        // SAFETY: ports using the pool are closed first (they borrow it at open and
        // callers drop them before the pool); no mbuf of it is referenced any more.
        unsafe { sys::rte_mempool_free(self.ptr.as_ptr()) };
    }
}

/// Hardware counters of a port, as the PMD reports them.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct PortStats {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub rx_missed: u64,
    pub rx_errors: u64,
    pub tx_errors: u64,
    pub rx_nombuf: u64,
}

/// Ports whose counters are kept: the highest reading of each counter (the
/// counters of an open port never go down; a PMD that hides them makes the
/// reading drop, not the count). Indexed by port id.
const KEPT_PORTS: usize = 64;
const PORT_COUNTERS: usize = 8;

struct KeptPort {
    open: AtomicBool,
    high: [AtomicU64; PORT_COUNTERS],
}

#[allow(clippy::declare_interior_mutable_const)]
const KEPT_PORT: KeptPort = KeptPort {
    open: AtomicBool::new(false),
    high: [const { AtomicU64::new(0) }; PORT_COUNTERS],
};
static KEPT: [KeptPort; KEPT_PORTS] = [KEPT_PORT; KEPT_PORTS];

impl PortStats {
    fn to_array(self) -> [u64; PORT_COUNTERS] {
        [
            self.rx_packets,
            self.rx_bytes,
            self.tx_packets,
            self.tx_bytes,
            self.rx_missed,
            self.rx_errors,
            self.tx_errors,
            self.rx_nombuf,
        ]
    }

    fn from_array(a: [u64; PORT_COUNTERS]) -> PortStats {
        PortStats {
            rx_packets: a[0],
            rx_bytes: a[1],
            tx_packets: a[2],
            tx_bytes: a[3],
            rx_missed: a[4],
            rx_errors: a[5],
            tx_errors: a[6],
            rx_nombuf: a[7],
        }
    }
}

/// The device counters of port `id` as the PMD reports them now (`None` for
/// an unknown port).
fn read_port_stats(id: u16) -> Option<PortStats> {
    let mut s: sys::rte_eth_stats = Default::default();
    // SAFETY: rte_eth_stats_get checks the port id; s is a valid out pointer.
    if unsafe { sys::rte_eth_stats_get(id, &mut s) } != 0 {
        return None;
    }
    Some(PortStats {
        rx_packets: s.ipackets,
        rx_bytes: s.ibytes,
        tx_packets: s.opackets,
        tx_bytes: s.obytes,
        rx_missed: s.imissed,
        rx_errors: s.ierrors,
        tx_errors: s.oerrors,
        rx_nombuf: s.rx_nombuf,
    })
}

/// The device counters of port `id` (all zero for an unknown port). Safe from
/// any thread while the port is open: the PMD only reads its counters.
///
/// For a port bitw opened, each counter is the highest value read since it
/// was opened: net_memif counts per queue but reports the queues of the
/// current connection only, so its counters read zero as soon as the peer
/// is gone (and again the old totals plus the new traffic once a peer is
/// back). bitw reads them just before the PMD lets go of a departed peer
/// (see "Peers that go away" below), so nothing counted is lost.
pub fn port_stats(id: u16) -> PortStats {
    let now = read_port_stats(id);
    let Some(kept) = KEPT
        .get(id as usize)
        .filter(|k| k.open.load(Ordering::Acquire))
    else {
        return now.unwrap_or_default();
    };
    let now = now.map(PortStats::to_array).unwrap_or_default();
    let mut out = [0u64; PORT_COUNTERS];
    for ((o, h), v) in out.iter_mut().zip(&kept.high).zip(now) {
        *o = h.fetch_max(v, Ordering::AcqRel).max(v);
    }
    PortStats::from_array(out)
}

// ---------------------------------------------------------------------------
// Peers that go away.
//
// net_memif (DPDK 22.11) runs its control channel on EAL's interrupt thread.
// When the peer leaves (quits or dies), that thread clears the port's
// "connected" flag and right away unmaps the peer's shared memory and frees
// its region descriptors (memif_disconnect → memif_free_regions), with no
// synchronisation with the data path: a worker that passed the flag check at
// the top of rx/tx burst a moment before goes on copying from or into the
// unmapped memory, and the process dies on SIGSEGV (seen in perf/memif.py
// runs whose testpmds quit under traffic before bitw stopped).
//
// bitw supplies the synchronisation, as a quiescent-state scheme (QSBR):
// - Each worker publishes, once per poll-loop iteration and only between
//   bursts, the epoch it has read ([`Quiescence::quiescent`]); a worker that
//   is not polling is offline.
// - The C shim's munmap() (exported by the executable, so net_memif's calls
//   bind to it) calls [`before_intr_munmap`] when it runs on the interrupt
//   thread: it advances the epoch and waits until every online worker has
//   published the new one. The epoch's read-modify-write comes after the
//   PMD's flag store on that thread (release); a worker that read the new
//   epoch (acquire) sees the flag cleared, so its later bursts on the port
//   return at once, and the bursts it made before have ended (its slot is
//   stored with release). Only then is the memory unmapped.
// - While the workers are out of the way the port counters are read (the
//   PMD hides them right after), see [`port_stats`].
// The wait is one poll-loop iteration of each worker (microseconds), paid
// only by munmap calls on the interrupt thread (peer departures).

/// Workers the quiescence scheme tracks (the configuration allows 64).
pub const QUIESCENCE_SLOTS: usize = 64;
const OFFLINE: u64 = u64::MAX;

#[repr(align(64))]
struct Slot(AtomicU64);

#[allow(clippy::declare_interior_mutable_const)]
const SLOT: Slot = Slot(AtomicU64::new(OFFLINE));
static SLOTS: [Slot; QUIESCENCE_SLOTS] = [SLOT; QUIESCENCE_SLOTS];
static EPOCH: AtomicU64 = AtomicU64::new(1);
/// Grace periods that ended on the timeout rather than with every worker.
static GRACE_TIMEOUTS: AtomicU64 = AtomicU64::new(0);
/// Grace periods completed (munmap calls on the interrupt thread while the
/// hook was installed).
static GRACE_PERIODS: AtomicU64 = AtomicU64::new(0);
static HOOK: Once = Once::new();

/// A worker's place in the quiescence scheme; offline again when dropped.
pub struct Quiescence {
    slot: &'static Slot,
}

impl Quiescence {
    /// Worker `id` (below [`QUIESCENCE_SLOTS`], one holder at a time) starts
    /// polling. Installs the munmap hook on first use.
    pub fn online(id: usize) -> Quiescence {
        HOOK.call_once(|| {
            // SAFETY: before_intr_munmap never unwinds, allocates or unmaps
            // (no reentry into munmap), and lives as long as the process.
            unsafe {
                sys::bitw_set_intr_munmap_hook(Some(before_intr_munmap as unsafe extern "C" fn()))
            }
        });
        let slot = &SLOTS[id];
        slot.0
            .store(EPOCH.load(Ordering::Acquire), Ordering::Release);
        Quiescence { slot }
    }

    /// Between bursts: this worker holds nothing of a port's memory.
    #[inline]
    pub fn quiescent(&self) {
        self.slot
            .0
            .store(EPOCH.load(Ordering::Acquire), Ordering::Release);
    }
}

impl Drop for Quiescence {
    fn drop(&mut self) {
        self.slot.0.store(OFFLINE, Ordering::Release);
    }
}

/// (completed grace periods, those that ended on the timeout).
pub fn grace_periods() -> (u64, u64) {
    (
        GRACE_PERIODS.load(Ordering::Relaxed),
        GRACE_TIMEOUTS.load(Ordering::Relaxed),
    )
}

/// Waits for every online worker to pass a quiescent point, then reads the
/// counters of the open ports. On EAL's interrupt thread, before munmap.
extern "C" fn before_intr_munmap() {
    // Never unwinds into C: nothing below panics (no indexing out of range,
    // no allocation; Instant and yield are system calls).
    let epoch = EPOCH.fetch_add(1, Ordering::SeqCst) + 1;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
    let mut timed_out = false;
    for slot in &SLOTS {
        loop {
            let seen = slot.0.load(Ordering::Acquire);
            if seen == OFFLINE || seen >= epoch {
                break;
            }
            if std::time::Instant::now() > deadline {
                // A worker stuck for a second: do not hang the interrupt thread.
                timed_out = true;
                break;
            }
            std::thread::yield_now();
        }
    }
    if timed_out {
        GRACE_TIMEOUTS.fetch_add(1, Ordering::Relaxed);
    }
    GRACE_PERIODS.fetch_add(1, Ordering::Relaxed);
    for (id, k) in KEPT.iter().enumerate() {
        if k.open.load(Ordering::Acquire) {
            port_stats(id as u16);
        }
    }
}

/// A configured ethdev port.
pub struct Port {
    pub id: u16,
    pub name: String,
    queues: u16,
    started: bool,
}

/// What a port was asked for.
pub struct PortSetup<'a> {
    /// "inside" or "outside": used in messages.
    pub name: &'a str,
    /// The ethdev name (`net_pcap0`, `0000:01:00.0`).
    pub device_name: &'a str,
    pub queues: u16,
    pub rx_descriptors: u16,
    pub tx_descriptors: u16,
}

impl Port {
    /// Finds the device EAL probed, configures `queues` RX and TX queues, starts
    /// it and turns promiscuous mode on (a bump in the wire receives every frame).
    pub fn open(_eal: &Eal, pool: &Mempool, s: &PortSetup) -> Result<Port, DpdkError> {
        let err = |what: &str, reason: String| DpdkError::Port {
            name: s.name.to_string(),
            what: what.to_string(),
            reason,
        };
        let cname = CString::new(s.device_name).unwrap();
        let mut id = 0u16;
        // SAFETY: EAL is up; cname is NUL-terminated; id is a valid out pointer.
        let rc = unsafe { sys::rte_eth_dev_get_port_by_name(cname.as_ptr(), &mut id) };
        if rc != 0 {
            return Err(DpdkError::PortNotFound {
                name: s.name.to_string(),
                device: s.device_name.to_string(),
                hint: "check the device arguments (EAL's messages above say why a vdev failed), \
                       that a PCI device is bound to vfio-pci/uio and not excluded by --no-pci"
                    .into(),
            });
        }
        let mut info: sys::rte_eth_dev_info = Default::default();
        // SAFETY: id is a valid port; info is a valid out pointer.
        let rc = unsafe { sys::rte_eth_dev_info_get(id, &mut info) };
        if rc != 0 {
            return Err(err("reading device info", errno_text(rc)));
        }
        if s.queues > info.max_rx_queues || s.queues > info.max_tx_queues {
            return Err(err(
                "queue setup",
                format!(
                    "{} workers need {} RX and TX queues, the device offers {} RX / {} TX; \
                     lower dataplane.workers or give the device more queues",
                    s.queues, s.queues, info.max_rx_queues, info.max_tx_queues
                ),
            ));
        }
        let mut conf: sys::rte_eth_conf = Default::default();
        if s.queues > 1 && info.flow_type_rss_offloads != 0 {
            // RSS spreads flows over the workers' queues.
            conf.rxmode.mq_mode = sys::rte_eth_rx_mq_mode_RTE_ETH_MQ_RX_RSS;
            // SAFETY: plain function returning a constant.
            conf.rx_adv_conf.rss_conf.rss_hf =
                unsafe { sys::bitw_rss_hf_default() } & info.flow_type_rss_offloads;
        }
        // SAFETY: id valid; conf fully initialised.
        let rc = unsafe { sys::rte_eth_dev_configure(id, s.queues, s.queues, &conf) };
        if rc != 0 {
            return Err(err("configure", errno_text(rc)));
        }
        let (mut nb_rx, mut nb_tx) = (s.rx_descriptors, s.tx_descriptors);
        // SAFETY: id valid; out pointers valid.
        let rc = unsafe { sys::rte_eth_dev_adjust_nb_rx_tx_desc(id, &mut nb_rx, &mut nb_tx) };
        if rc != 0 {
            return Err(err("descriptor adjustment", errno_text(rc)));
        }
        // SAFETY: id valid.
        let socket = unsafe { sys::rte_eth_dev_socket_id(id) };
        for q in 0..s.queues {
            // SAFETY: id valid, queue index < configured count, pool outlives the port
            // (the caller keeps it until after close).
            let rc = unsafe {
                sys::rte_eth_rx_queue_setup(
                    id,
                    q,
                    nb_rx,
                    socket as u32,
                    ptr::null(),
                    pool.ptr.as_ptr(),
                )
            };
            if rc != 0 {
                return Err(err(&format!("RX queue {q} setup"), errno_text(rc)));
            }
            // SAFETY: as above.
            let rc =
                unsafe { sys::rte_eth_tx_queue_setup(id, q, nb_tx, socket as u32, ptr::null()) };
            if rc != 0 {
                return Err(err(&format!("TX queue {q} setup"), errno_text(rc)));
            }
        }
        // SAFETY: id valid and configured.
        let rc = unsafe { sys::rte_eth_dev_start(id) };
        if rc != 0 {
            return Err(err("start", errno_text(rc)));
        }
        // Not every PMD has promiscuous mode (vdevs often don't need it): ignore ENOTSUP.
        // SAFETY: id valid and started.
        unsafe { sys::rte_eth_promiscuous_enable(id) };
        if let Some(k) = KEPT.get(id as usize) {
            for h in &k.high {
                h.store(0, Ordering::Relaxed);
            }
            k.open.store(true, Ordering::Release);
        }
        Ok(Port {
            id,
            name: s.name.to_string(),
            queues: s.queues,
            started: true,
        })
    }

    /// The handle worker `q` uses for this port.
    pub fn queue(&self, q: u16) -> PortQueue {
        assert!(
            q < self.queues,
            "queue {q} of port {} not configured",
            self.name
        );
        PortQueue {
            port: self.id,
            queue: q,
        }
    }

    pub fn stats(&self) -> PortStats {
        port_stats(self.id)
    }

    /// Stops and closes the port (flushes net_pcap's output file).
    pub fn close(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if self.started {
            if let Some(k) = KEPT.get(self.id as usize) {
                k.open.store(false, Ordering::Release);
            }
            // SAFETY: id valid; no worker polls it any more (callers close after join).
            unsafe {
                sys::rte_eth_dev_stop(self.id);
                sys::rte_eth_dev_close(self.id);
            }
            self.started = false;
        }
    }
}

impl Drop for Port {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// One RX/TX queue pair of a port, polled by exactly one worker.
#[derive(Debug, Clone, Copy)]
pub struct PortQueue {
    port: u16,
    queue: u16,
}

/// What a transmit did.
#[derive(Debug, Clone, Copy, Default)]
pub struct TxOutcome {
    pub sent: u32,
    pub sent_bytes: u64,
    /// Kept by the caller but refused by the TX queue (full): freed.
    pub refused: u32,
    /// Not kept by the caller: freed.
    pub dropped: u32,
}

/// Up to [`MAX_BURST`] received frames, owned until forwarded or freed.
pub struct Burst {
    mbufs: [*mut sys::rte_mbuf; MAX_BURST],
    len: usize,
    /// How many of mbufs[..len] were taken out (null).
    taken: usize,
    /// Scratch for `forward`: the frames to free (kept here so it is not
    /// re-initialised every burst).
    unsent: [*mut sys::rte_mbuf; MAX_BURST],
}

impl Default for Burst {
    fn default() -> Self {
        Burst {
            mbufs: [ptr::null_mut(); MAX_BURST],
            len: 0,
            taken: 0,
            unsent: [ptr::null_mut(); MAX_BURST],
        }
    }
}

impl Burst {
    /// Receives up to `max` frames from `q` into an empty burst.
    #[inline]
    pub fn rx(&mut self, q: PortQueue, max: usize) -> usize {
        debug_assert_eq!(self.len, 0, "rx into a burst that still holds frames");
        let max = max.min(MAX_BURST) as u16;
        // SAFETY: the array has room for `max` pointers; (port, queue) is polled only by this worker.
        let n =
            unsafe { sys::bitw_rte_eth_rx_burst(q.port, q.queue, self.mbufs.as_mut_ptr(), max) };
        self.len = n as usize;
        self.taken = 0;
        self.len
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The first segment of frame `i` (all of it unless the PMD chained segments).
    #[inline]
    pub fn frame(&self, i: usize) -> &[u8] {
        assert!(i < self.len && !self.mbufs[i].is_null());
        // SAFETY: m is an owned, valid mbuf; the bytes from buf_addr + data_off for
        // data_len are its initialised packet data (what rte_pktmbuf_mtod points at).
        // Read directly rather than through the shim: this runs once per packet.
        unsafe {
            let m = &*self.mbufs[i];
            let p = (m.buf_addr as *const u8).add(m.data_off as usize);
            std::slice::from_raw_parts(p, m.data_len as usize)
        }
    }

    /// Takes frame `i` out of the burst (to hand it to another worker); its
    /// place stays empty and `forward` skips it.
    pub fn take(&mut self, i: usize) -> Mbuf {
        assert!(
            i < self.len && !self.mbufs[i].is_null(),
            "frame {i} is not in the burst"
        );
        let m = std::mem::replace(&mut self.mbufs[i], ptr::null_mut());
        self.taken += 1;
        Mbuf(m)
    }

    /// Appends a frame to the burst; gives it back when the burst is full.
    pub fn push(&mut self, m: Mbuf) -> Result<(), Mbuf> {
        if self.len == MAX_BURST {
            return Err(m);
        }
        self.mbufs[self.len] = m.0;
        self.len += 1;
        std::mem::forget(m); // ownership moved into the burst
        Ok(())
    }

    /// Frame `i` as a growable buffer for in-place ESP, or `None` when it is
    /// chained over several segments (jumbo frames; not transformed in place).
    #[inline]
    pub fn packet_buf(&mut self, i: usize) -> Option<MbufBuf<'_>> {
        assert!(i < self.len && !self.mbufs[i].is_null());
        let m = self.mbufs[i];
        // SAFETY: owned, valid mbuf.
        if unsafe { (*m).nb_segs } != 1 {
            return None;
        }
        Some(MbufBuf {
            m,
            _burst: PhantomData,
        })
    }

    /// Total length of frame `i` over all segments.
    #[inline]
    pub fn pkt_len(&self, i: usize) -> u32 {
        assert!(i < self.len && !self.mbufs[i].is_null());
        // SAFETY: owned, valid mbuf.
        unsafe { (*self.mbufs[i]).pkt_len }
    }

    /// Sends the frames with `keep[i]` set through `q`, in order; frees the
    /// others and any the queue refuses. Leaves the burst empty.
    #[inline]
    pub fn forward(&mut self, keep: &[bool], q: PortQueue) -> TxOutcome {
        assert!(keep.len() >= self.len, "a verdict for every frame");
        let n = self.len;
        // Compact the kept frames to the front (order preserved), the others aside.
        let (mut nt, mut nd) = (0usize, 0usize);
        let mut bytes = 0u64;
        for (i, &k) in keep[..n].iter().enumerate() {
            let m = self.mbufs[i];
            if m.is_null() {
                continue; // taken out of the burst (handed to another worker)
            }
            if k {
                bytes += self.pkt_len(i) as u64;
                self.mbufs[nt] = m;
                nt += 1;
            } else {
                self.unsent[nd] = m;
                nd += 1;
            }
        }
        self.len = 0;
        self.taken = 0;
        let mut out = TxOutcome {
            dropped: nd as u32,
            ..Default::default()
        };
        // SAFETY: every pointer is an owned mbuf, now either in mbufs[..nt] or
        // unsent[..nd]. The dropped are freed once; after tx_burst the first `sent`
        // belong to the PMD and the refused ones are read and freed here, once.
        unsafe {
            if nd > 0 {
                sys::bitw_rte_pktmbuf_free_bulk(self.unsent.as_mut_ptr(), nd as u32);
            }
            if nt > 0 {
                let sent =
                    sys::bitw_rte_eth_tx_burst(q.port, q.queue, self.mbufs.as_mut_ptr(), nt as u16)
                        as usize;
                for &m in &self.mbufs[sent..nt] {
                    bytes -= (*m).pkt_len as u64;
                }
                if sent < nt {
                    sys::bitw_rte_pktmbuf_free_bulk(
                        self.mbufs.as_mut_ptr().add(sent),
                        (nt - sent) as u32,
                    );
                }
                out.sent = sent as u32;
                out.sent_bytes = bytes;
                out.refused = (nt - sent) as u32;
            }
        }
        out
    }

    /// Sends every frame through `q`, in order, freeing any the queue refuses.
    /// Leaves the burst empty. Returns the outcome and the bytes received.
    #[inline]
    pub fn forward_all(&mut self, q: PortQueue) -> (TxOutcome, u64) {
        if self.taken > 0 {
            let keep = [true; MAX_BURST];
            let bytes = (0..self.len)
                .filter(|&i| !self.mbufs[i].is_null())
                .map(|i| self.pkt_len(i) as u64)
                .sum();
            return (self.forward(&keep, q), bytes);
        }
        let n = self.len;
        let rx_bytes: u64 = (0..n).map(|i| self.pkt_len(i) as u64).sum();
        self.len = 0;
        let mut out = TxOutcome::default();
        if n == 0 {
            return (out, 0);
        }
        // SAFETY: mbufs[..n] are owned; after tx_burst the first `sent` belong to the
        // PMD, the refused ones are read and freed here, once.
        unsafe {
            let sent =
                sys::bitw_rte_eth_tx_burst(q.port, q.queue, self.mbufs.as_mut_ptr(), n as u16)
                    as usize;
            let mut refused_bytes = 0u64;
            for &m in &self.mbufs[sent..n] {
                refused_bytes += (*m).pkt_len as u64;
            }
            if sent < n {
                sys::bitw_rte_pktmbuf_free_bulk(
                    self.mbufs.as_mut_ptr().add(sent),
                    (n - sent) as u32,
                );
            }
            out.sent = sent as u32;
            out.sent_bytes = rx_bytes - refused_bytes;
            out.refused = (n - sent) as u32;
        }
        (out, rx_bytes)
    }

    /// Asks the CPU to fetch frame `i`'s first bytes (its headers) ahead of use.
    #[inline]
    pub fn prefetch_frame(&self, i: usize) {
        if i < self.len && !self.mbufs[i].is_null() {
            // SAFETY: reads two fields of an owned mbuf; prefetch never faults.
            unsafe {
                let m = &*self.mbufs[i];
                let p = (m.buf_addr as *const u8).add(m.data_off as usize);
                #[cfg(target_arch = "x86_64")]
                std::arch::x86_64::_mm_prefetch(p as *const i8, std::arch::x86_64::_MM_HINT_T0);
                #[cfg(not(target_arch = "x86_64"))]
                let _ = p;
            }
        }
    }
}

/// An mbuf owned outside any burst, e.g. on its way to another worker. Freed
/// when dropped.
pub struct Mbuf(*mut sys::rte_mbuf);

// SAFETY: an Mbuf is the only reference to its mbuf; mbufs may be freed or sent
// from any lcore (the mempool is multi-producer/multi-consumer).
unsafe impl Send for Mbuf {}

impl Mbuf {
    /// The first segment's bytes (the headers, and all of a frame that fits
    /// one buffer).
    pub fn data(&self) -> &[u8] {
        // SAFETY: an owned, valid mbuf; data_len bytes from buf_addr + data_off
        // are its initialised data, borrowed as long as self.
        unsafe {
            let m = &*self.0;
            std::slice::from_raw_parts(
                (m.buf_addr as *const u8).add(m.data_off as usize),
                m.data_len as usize,
            )
        }
    }

    /// Total length over all segments.
    pub fn pkt_len(&self) -> u32 {
        // SAFETY: owned, valid mbuf.
        unsafe { (*self.0).pkt_len }
    }

    /// A copy of the whole frame, every segment (slow path only: allocates).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.pkt_len() as usize);
        let mut m = self.0 as *const sys::rte_mbuf;
        // A chain is never longer than nb_segs; the bound guards a corrupt one.
        // SAFETY: owned, valid mbuf.
        let mut left = unsafe { (*m).nb_segs };
        while !m.is_null() && left > 0 {
            // SAFETY: m is a segment of our chain; data_len bytes from
            // buf_addr + data_off are its data.
            unsafe {
                let seg = &*m;
                out.extend_from_slice(std::slice::from_raw_parts(
                    (seg.buf_addr as *const u8).add(seg.data_off as usize),
                    seg.data_len as usize,
                ));
                m = seg.next;
            }
            left -= 1;
        }
        out
    }
}

impl Drop for Mbuf {
    fn drop(&mut self) {
        // SAFETY: owned, valid mbuf, freed once.
        unsafe { sys::bitw_rte_pktmbuf_free(self.0) };
    }
}

/// One single-segment mbuf of a burst, borrowed for in-place changes.
pub struct MbufBuf<'a> {
    m: *mut sys::rte_mbuf,
    _burst: PhantomData<&'a mut Burst>,
}

impl crate::esp::PacketBuf for MbufBuf<'_> {
    #[inline]
    fn headroom(&self) -> usize {
        // SAFETY: valid mbuf.
        unsafe { sys::bitw_rte_pktmbuf_headroom(self.m) as usize }
    }

    #[inline]
    fn tailroom(&self) -> usize {
        // SAFETY: valid single-segment mbuf.
        unsafe { sys::bitw_rte_pktmbuf_tailroom(self.m) as usize }
    }

    #[inline]
    fn data(&self) -> &[u8] {
        // SAFETY: a valid single-segment mbuf owned by the borrowed burst; data_len
        // bytes from buf_addr + data_off are its data.
        unsafe {
            let m = &*self.m;
            std::slice::from_raw_parts(
                (m.buf_addr as *const u8).add(m.data_off as usize),
                m.data_len as usize,
            )
        }
    }

    #[inline]
    fn data_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `data`, and the burst is borrowed mutably, so this is the only view.
        unsafe {
            let m = &*self.m;
            std::slice::from_raw_parts_mut(
                (m.buf_addr as *mut u8).add(m.data_off as usize),
                m.data_len as usize,
            )
        }
    }

    #[inline]
    fn prepend(&mut self, n: usize) -> bool {
        // SAFETY: valid mbuf; the shim checks the headroom and changes nothing without it.
        n <= u16::MAX as usize
            && unsafe { !sys::bitw_rte_pktmbuf_prepend(self.m, n as u16).is_null() }
    }

    #[inline]
    fn append(&mut self, n: usize) -> bool {
        // SAFETY: valid single-segment mbuf; the shim checks the tailroom.
        n <= u16::MAX as usize
            && unsafe { !sys::bitw_rte_pktmbuf_append(self.m, n as u16).is_null() }
    }

    #[inline]
    fn adj(&mut self, n: usize) -> bool {
        // SAFETY: valid mbuf; the shim checks the length.
        n <= u16::MAX as usize && unsafe { !sys::bitw_rte_pktmbuf_adj(self.m, n as u16).is_null() }
    }

    #[inline]
    fn trim(&mut self, n: usize) -> bool {
        // SAFETY: valid mbuf; the shim checks the length.
        n <= u16::MAX as usize && unsafe { sys::bitw_rte_pktmbuf_trim(self.m, n as u16) == 0 }
    }
}

impl Drop for Burst {
    fn drop(&mut self) {
        for &m in &self.mbufs[..self.len] {
            if !m.is_null() {
                // SAFETY: owned mbuf, freed once here.
                unsafe { sys::bitw_rte_pktmbuf_free(m) };
            }
        }
        self.len = 0;
    }
}

/// Runs `tasks[0]` on the main lcore and `tasks[i]` on the i-th worker lcore,
/// and waits for all of them. A panicking task is caught at this FFI edge and
/// reported as an error naming the lcore (the others run on until they stop).
pub fn run_on_lcores(eal: &Eal, tasks: Vec<Box<dyn FnOnce() + Send>>) -> Result<(), DpdkError> {
    if tasks.len() > eal.lcore_count() {
        return Err(DpdkError::Lcore(format!(
            "{} workers but EAL runs only {} lcores",
            tasks.len(),
            eal.lcore_count()
        )));
    }
    extern "C" fn trampoline(arg: *mut c_void) -> c_int {
        // SAFETY: arg is the Box<Box<dyn FnOnce>> leaked below, consumed exactly once here.
        let task = unsafe { Box::from_raw(arg as *mut Box<dyn FnOnce() + Send>) };
        match catch_unwind(AssertUnwindSafe(task)) {
            Ok(()) => 0,
            Err(_) => -1,
        }
    }
    let mut tasks = tasks.into_iter();
    let main_task = tasks.next();
    let mut launched: Vec<u32> = Vec::new();
    let mut lcore = u32::MAX;
    let mut launch_error = None;
    for task in tasks {
        // SAFETY: iterates EAL's enabled lcores, skipping main, without wrapping.
        lcore = unsafe { sys::rte_get_next_lcore(lcore, 1, 0) };
        let arg = Box::into_raw(Box::new(task)) as *mut c_void;
        // SAFETY: the lcore is an idle worker lcore; arg stays valid until the trampoline takes it.
        let rc = unsafe { sys::rte_eal_remote_launch(Some(trampoline), arg, lcore) };
        if rc != 0 {
            // SAFETY: not launched, so still ours to free.
            drop(unsafe { Box::from_raw(arg as *mut Box<dyn FnOnce() + Send>) });
            launch_error = Some(DpdkError::Lcore(format!(
                "launch on lcore {lcore}: {}",
                errno_text(rc)
            )));
            break;
        }
        launched.push(lcore);
    }
    let mut failed: Vec<String> = Vec::new();
    if launch_error.is_none() {
        if let Some(task) = main_task {
            if catch_unwind(AssertUnwindSafe(task)).is_err() {
                // SAFETY: plain query on the calling EAL thread.
                failed.push(format!("main lcore {}", unsafe {
                    sys::bitw_rte_lcore_id()
                }));
            }
        }
    }
    for l in launched {
        // SAFETY: waits for a lcore we launched.
        if unsafe { sys::rte_eal_wait_lcore(l) } != 0 {
            failed.push(format!("lcore {l}"));
        }
    }
    if let Some(e) = launch_error {
        return Err(e);
    }
    if !failed.is_empty() {
        return Err(DpdkError::Lcore(format!(
            "worker panicked on {}",
            failed.join(", ")
        )));
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// ACL (rte_acl): the filter table's lookup structure.

/// A key type laid out for an ACL context.
///
/// # Safety
/// `field_defs` must describe fields that lie inside `Self` (offset + size <=
/// size_of::<Self>()), follow rte_acl's layout rules, and number `NUM_FIELDS`.
pub unsafe trait AclKey: Copy {
    const NUM_FIELDS: usize;
    fn field_defs() -> Vec<sys::rte_acl_field_def>;
}

/// IPv4 classification key: protocol, addresses and ports in network byte order.
#[repr(C, align(8))]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeyV4 {
    pub proto: u8,
    _pad: [u8; 3],
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub sport: [u8; 2],
    pub dport: [u8; 2],
}

impl KeyV4 {
    pub fn new(proto: u8, src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Self {
        KeyV4 {
            proto,
            _pad: [0; 3],
            src,
            dst,
            sport: sport.to_be_bytes(),
            dport: dport.to_be_bytes(),
        }
    }
}

/// IPv6 classification key: protocol, addresses and ports in network byte order.
#[repr(C, align(8))]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeyV6 {
    pub proto: u8,
    _pad: [u8; 3],
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: [u8; 2],
    pub dport: [u8; 2],
}

impl KeyV6 {
    pub fn new(proto: u8, src: [u8; 16], dst: [u8; 16], sport: u16, dport: u16) -> Self {
        KeyV6 {
            proto,
            _pad: [0; 3],
            src,
            dst,
            sport: sport.to_be_bytes(),
            dport: dport.to_be_bytes(),
        }
    }
}

fn def(
    type_: u32,
    size: u8,
    field_index: u8,
    input_index: u8,
    offset: usize,
) -> sys::rte_acl_field_def {
    sys::rte_acl_field_def {
        type_: type_ as u8,
        size,
        field_index,
        input_index,
        offset: offset as u32,
    }
}

// SAFETY: fields: proto (1 byte, first, as rte_acl requires), then 4-byte groups
// src, dst, and sport+dport sharing one group; all inside the 16-byte struct.
unsafe impl AclKey for KeyV4 {
    const NUM_FIELDS: usize = 5;
    fn field_defs() -> Vec<sys::rte_acl_field_def> {
        vec![
            def(sys::RTE_ACL_FIELD_TYPE_BITMASK, 1, 0, 0, 0),
            def(sys::RTE_ACL_FIELD_TYPE_MASK, 4, 1, 1, 4),
            def(sys::RTE_ACL_FIELD_TYPE_MASK, 4, 2, 2, 8),
            def(sys::RTE_ACL_FIELD_TYPE_RANGE, 2, 3, 3, 12),
            def(sys::RTE_ACL_FIELD_TYPE_RANGE, 2, 4, 3, 14),
        ]
    }
}

// SAFETY: proto first, then four 4-byte words each of src and dst, then the
// ports group; all inside the 40-byte struct.
unsafe impl AclKey for KeyV6 {
    const NUM_FIELDS: usize = 11;
    fn field_defs() -> Vec<sys::rte_acl_field_def> {
        let mut v = vec![def(sys::RTE_ACL_FIELD_TYPE_BITMASK, 1, 0, 0, 0)];
        for i in 0..8u8 {
            v.push(def(
                sys::RTE_ACL_FIELD_TYPE_MASK,
                4,
                1 + i,
                1 + i,
                4 + 4 * i as usize,
            ));
        }
        v.push(def(sys::RTE_ACL_FIELD_TYPE_RANGE, 2, 9, 9, 36));
        v.push(def(sys::RTE_ACL_FIELD_TYPE_RANGE, 2, 10, 9, 38));
        v
    }
}

/// One field of an ACL rule, values in host byte order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AclField {
    Bitmask8 { value: u8, mask: u8 },
    Mask32 { value: u32, len: u32 },
    Range16 { lo: u16, hi: u16 },
}

/// An ACL rule: higher `priority` wins; `userdata` (non-zero) is what a match returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AclRule {
    pub priority: i32,
    pub userdata: u32,
    pub fields: Vec<AclField>,
}

/// A built, immutable ACL context for keys of type `K`.
pub struct Acl<K: AclKey> {
    ctx: NonNull<sys::rte_acl_ctx>,
    _key: PhantomData<K>,
}

// SAFETY: the context is never modified after build; rte_acl_classify only reads it.
unsafe impl<K: AclKey> Send for Acl<K> {}
unsafe impl<K: AclKey> Sync for Acl<K> {}

const _: () = assert!(std::mem::size_of::<sys::rte_acl_field>() == 16);
const _: () = assert!(std::mem::size_of::<sys::rte_acl_rule_data>() <= 16);

impl<K: AclKey> Acl<K> {
    /// Compiles `rules` (at least one) into a context. Needs EAL.
    pub fn build(rules: &[AclRule]) -> Result<Self, DpdkError> {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let acl_err = |what: &str, reason: String| DpdkError::Acl {
            what: what.into(),
            reason,
        };
        let n = K::NUM_FIELDS;
        if rules.is_empty() {
            return Err(acl_err("build", "no rules".into()));
        }
        // rte_acl_create returns an existing context of the same name: keep names unique.
        let name =
            CString::new(format!("bitw-acl-{}", SEQ.fetch_add(1, Ordering::Relaxed))).unwrap();
        // Rules are laid out as rte_acl expects: the rule data padded to 16 bytes,
        // then `n` 16-byte fields (RTE_ACL_RULE_SZ(n)).
        let stride = n + 1;
        let param = sys::rte_acl_param {
            name: name.as_ptr(),
            // SAFETY: plain query.
            socket_id: unsafe { sys::rte_socket_id() } as c_int,
            rule_size: (16 * stride) as u32,
            max_rule_num: rules.len() as u32,
        };
        // SAFETY: param is valid for the call; name outlives it (rte_acl copies it).
        let ctx = NonNull::new(unsafe { sys::rte_acl_create(&param) })
            .ok_or_else(|| acl_err("context creation", rte_errno_text()))?;
        let acl = Acl::<K> {
            ctx,
            _key: PhantomData,
        };

        let mut buf: Vec<sys::rte_acl_field> = vec![Default::default(); rules.len() * stride];
        for (i, r) in rules.iter().enumerate() {
            assert_eq!(
                r.fields.len(),
                n,
                "ACL rule has {} fields, the key {n}",
                r.fields.len()
            );
            let data = sys::rte_acl_rule_data {
                category_mask: 1,
                priority: r.priority,
                userdata: r.userdata,
            };
            // SAFETY: slot i*stride is 16 bytes, 8-aligned: room for the 12-byte rule data.
            unsafe {
                ptr::write(
                    buf.as_mut_ptr().add(i * stride) as *mut sys::rte_acl_rule_data,
                    data,
                )
            };
            for (j, f) in r.fields.iter().enumerate() {
                let slot = &mut buf[i * stride + 1 + j];
                *slot = Default::default();
                match *f {
                    AclField::Bitmask8 { value, mask } => {
                        slot.value.u8_ = value;
                        slot.mask_range.u8_ = mask;
                    }
                    AclField::Mask32 { value, len } => {
                        slot.value.u32_ = value;
                        slot.mask_range.u32_ = len;
                    }
                    AclField::Range16 { lo, hi } => {
                        slot.value.u16_ = lo;
                        slot.mask_range.u16_ = hi;
                    }
                }
            }
        }
        // SAFETY: buf holds rules.len() rules of rule_size bytes each, as declared at create.
        let rc = unsafe {
            sys::rte_acl_add_rules(
                acl.ctx.as_ptr(),
                buf.as_ptr() as *const sys::rte_acl_rule,
                rules.len() as u32,
            )
        };
        if rc != 0 {
            return Err(acl_err("adding rules", errno_text(rc)));
        }
        let mut cfg = sys::rte_acl_config {
            num_categories: 1,
            num_fields: n as u32,
            ..Default::default()
        };
        for (i, d) in K::field_defs().into_iter().enumerate() {
            cfg.defs[i] = d;
        }
        // SAFETY: ctx valid; cfg describes K's layout (AclKey's contract).
        let rc = unsafe { sys::rte_acl_build(acl.ctx.as_ptr(), &cfg) };
        if rc != 0 {
            return Err(acl_err(
                &format!("build of {} rules", rules.len()),
                errno_text(rc),
            ));
        }
        Ok(acl)
    }

    /// Writes each key's best match (`userdata`, 0 = none) to `results`.
    #[inline]
    pub fn classify(&self, keys: &[K], results: &mut [u32]) {
        assert!(keys.len() <= MAX_BURST && results.len() >= keys.len());
        let mut ptrs = [std::mem::MaybeUninit::<*const u8>::uninit(); MAX_BURST];
        for (p, k) in ptrs.iter_mut().zip(keys) {
            p.write(k as *const K as *const u8);
        }
        // SAFETY: every pointer refers to a live K whose fields cover the context's
        // layout (AclKey); results has room for one category per key.
        unsafe {
            sys::rte_acl_classify(
                self.ctx.as_ptr(),
                // The first keys.len() pointers were written above; rte_acl reads no more.
                ptrs.as_mut_ptr() as *mut *const u8,
                results.as_mut_ptr(),
                keys.len() as u32,
                1,
            )
        };
    }
}

impl<K: AclKey> Drop for Acl<K> {
    fn drop(&mut self) {
        // SAFETY: ctx came from rte_acl_create and is freed once.
        unsafe { sys::rte_acl_free(self.ctx.as_ptr()) };
    }
}

/// The DPDK version string.
pub fn version() -> String {
    // SAFETY: rte_version returns a static string.
    unsafe { CStr::from_ptr(sys::rte_version()) }
        .to_string_lossy()
        .into_owned()
}

/// Asks the CPU to fetch the first `bytes` of `value` (whole cache lines) into
/// its caches ahead of use. Only a hint: never faults, never changes memory.
#[inline]
pub fn prefetch<T: ?Sized>(value: &T, bytes: usize) {
    let p = value as *const T as *const u8;
    let bytes = bytes.min(std::mem::size_of_val(value));
    let mut off = 0;
    while off < bytes {
        // SAFETY: the address lies inside `value`, a live reference; a
        // prefetch neither reads into the program nor faults.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            std::arch::x86_64::_mm_prefetch(p.add(off) as *const i8, std::arch::x86_64::_MM_HINT_T0)
        };
        off += 64;
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

// ---------------------------------------------------------------------------
// intel-ipsec-mb: AES-GCM for the packet path.
//
// Invariants:
// - The multi-buffer manager is only used once, to let the library pick the
//   code for this CPU (`init_mb_mgr_auto`) and to read the GCM function
//   pointers out of it; it is freed at once. The direct GCM functions take
//   the key and a caller-provided context only, never the manager, so the
//   pointers stay valid for the life of the process (the library stays loaded:
//   it is linked, not dlopened).
// - A [`GcmKey`] is immutable after `new` (the expanded key and GHASH powers);
//   any number of threads may seal/open with it at once, each with its own
//   `gcm_context_data` on its stack.
// - Every call passes lengths of the slices it passes, an IV of exactly 12
//   bytes (the library adds the 32-bit counter itself) and a 16-byte tag.

use dpdk_sys::ipsec_mb as imb;

type GcmFn = unsafe extern "C" fn(
    *const imb::gcm_key_data,
    *mut imb::gcm_context_data,
    *mut u8,
    *const u8,
    u64,
    *const u8,
    *const u8,
    u64,
    *mut u8,
    u64,
);
type GcmPreFn = unsafe extern "C" fn(*const c_void, *mut imb::gcm_key_data);

/// The GCM entry points intel-ipsec-mb chose for this CPU.
#[derive(Debug, Clone, Copy)]
pub struct IpsecMb {
    enc: [GcmFn; 2],
    dec: [GcmFn; 2],
    pre: [GcmPreFn; 2],
    /// The code path the library picked (`sse`, `avx`, `avx2`, `avx512`), and
    /// whether it has the vector AES/CLMUL instructions (its fastest GCM).
    pub arch: &'static str,
    pub vaes: bool,
    pub aesni: bool,
    pub version: &'static str,
}

static IPSEC_MB: std::sync::OnceLock<Result<IpsecMb, String>> = std::sync::OnceLock::new();

impl IpsecMb {
    /// The library, set up once per process; `Err` says why it cannot be used.
    pub fn get() -> Result<&'static IpsecMb, String> {
        IPSEC_MB
            .get_or_init(Self::init)
            .as_ref()
            .map_err(Clone::clone)
    }

    fn init() -> Result<IpsecMb, String> {
        // SAFETY: alloc/init/free of a manager as the library documents; the
        // function pointers are copied out before the manager is freed (see
        // the invariants above); the version string is static in the library.
        unsafe {
            let mgr = imb::alloc_mb_mgr(0);
            if mgr.is_null() {
                return Err("intel-ipsec-mb: alloc_mb_mgr failed".into());
            }
            let mut arch: imb::IMB_ARCH = imb::IMB_ARCH_NONE;
            imb::init_mb_mgr_auto(mgr, &mut arch);
            let errno = imb::imb_get_errno(mgr);
            let m = &*mgr;
            let fns = (
                m.gcm128_enc,
                m.gcm256_enc,
                m.gcm128_dec,
                m.gcm256_dec,
                m.gcm128_pre,
                m.gcm256_pre,
            );
            let features = m.features;
            imb::free_mb_mgr(mgr);
            if errno != 0 {
                let msg = CStr::from_ptr(imb::imb_get_strerror(errno));
                return Err(format!("intel-ipsec-mb: {}", msg.to_string_lossy()));
            }
            let (Some(e128), Some(e256), Some(d128), Some(d256), Some(p128), Some(p256)) = fns
            else {
                return Err("intel-ipsec-mb: no AES-GCM functions for this CPU".into());
            };
            let arch = match arch {
                imb::IMB_ARCH_NOAESNI => "noaesni",
                imb::IMB_ARCH_SSE => "sse",
                imb::IMB_ARCH_AVX => "avx",
                imb::IMB_ARCH_AVX2 => "avx2",
                imb::IMB_ARCH_AVX512 => "avx512",
                _ => "unknown",
            };
            let version = CStr::from_ptr(imb::imb_get_version_str())
                .to_str()
                .unwrap_or("?");
            let has = |f: u32| features & f as u64 != 0;
            Ok(IpsecMb {
                enc: [e128, e256],
                dec: [d128, d256],
                pre: [p128, p256],
                arch,
                vaes: has(imb::IMB_FEATURE_VAES) && has(imb::IMB_FEATURE_VPCLMULQDQ),
                aesni: has(imb::IMB_FEATURE_AESNI) && arch != "noaesni",
                version,
            })
        }
    }
}

/// An AES-GCM key (128 or 256 bits) expanded for intel-ipsec-mb: round keys
/// and GHASH powers, about 1 KiB, on its own cache lines. Zeroed on drop.
#[repr(C, align(64))]
pub struct GcmKey {
    data: imb::gcm_key_data,
    enc: GcmFn,
    dec: GcmFn,
}

impl GcmKey {
    /// `None` when the key is neither 16 nor 32 bytes.
    pub fn new(lib: &IpsecMb, key: &[u8]) -> Option<GcmKey> {
        let which = match key.len() {
            16 => 0,
            32 => 1,
            _ => return None,
        };
        let mut k = GcmKey {
            data: imb::gcm_key_data::default(),
            enc: lib.enc[which],
            dec: lib.dec[which],
        };
        // SAFETY: `pre` reads key.len() bytes (the length picks 128 or 256)
        // and writes the whole gcm_key_data we own.
        unsafe { (lib.pre[which])(key.as_ptr().cast(), &mut k.data) };
        Some(k)
    }

    /// Encrypts `data` in place and returns the tag.
    #[inline]
    pub fn seal(&self, iv: &[u8; 12], aad: &[u8], data: &mut [u8]) -> [u8; 16] {
        self.run(self.enc, iv, aad, data)
    }

    /// Decrypts `data` in place and checks `tag`; on a mismatch the buffer is
    /// zeroed (no unauthenticated plaintext is left) and `false` returned.
    #[inline]
    pub fn open(&self, iv: &[u8; 12], aad: &[u8], data: &mut [u8], tag: &[u8; 16]) -> bool {
        let computed = self.run(self.dec, iv, aad, data);
        // Constant time: every byte is compared whatever the first difference.
        let diff = computed.iter().zip(tag).fold(0u8, |d, (a, b)| d | (a ^ b));
        if std::hint::black_box(diff) != 0 {
            data.fill(0);
            return false;
        }
        true
    }

    /// One GCM pass of `f` (encrypt or decrypt) over `data` in place; returns
    /// the tag it computed.
    #[inline]
    fn run(&self, f: GcmFn, iv: &[u8; 12], aad: &[u8], data: &mut [u8]) -> [u8; 16] {
        let mut tag = [0u8; 16];
        let mut ctx = imb::gcm_context_data::default();
        // SAFETY: in place (out == in) is supported; every pointer comes with
        // its slice's length; the IV is 12 bytes and the tag 16 (invariants).
        unsafe {
            f(
                &self.data,
                &mut ctx,
                data.as_mut_ptr(),
                data.as_ptr(),
                data.len() as u64,
                iv.as_ptr(),
                aad.as_ptr(),
                aad.len() as u64,
                tag.as_mut_ptr(),
                16,
            )
        };
        tag
    }
}

impl Drop for GcmKey {
    fn drop(&mut self) {
        // SAFETY: a volatile write of a plain-data value into our own field,
        // so the key schedule does not outlive the SA in memory.
        unsafe { ptr::write_volatile(&mut self.data, imb::gcm_key_data::default()) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The inline mbuf accessors read the same bytes as DPDK's own inline functions.
    #[test]
    fn inline_mbuf_accessors_match_dpdk() {
        init_eal_for_tests();
        let eal = Eal { _private: () };
        let pool = Mempool::new(&eal, "bitw-test-accessors", 1023).unwrap();
        // SAFETY: test-only: an mbuf from our pool, filled and wrapped in a Burst that frees it.
        unsafe {
            let m = sys::bitw_rte_pktmbuf_alloc(pool.ptr.as_ptr());
            assert!(!m.is_null());
            let p = sys::bitw_rte_pktmbuf_append(m, 60) as *mut u8;
            for i in 0..60 {
                *p.add(i) = i as u8;
            }
            sys::bitw_rte_pktmbuf_adj(m, 2);
            let mut b = Burst::default();
            b.mbufs[0] = m;
            b.len = 1;
            assert_eq!(
                b.frame(0).as_ptr(),
                sys::bitw_rte_pktmbuf_mtod(m) as *const u8
            );
            assert_eq!(b.frame(0).len(), sys::bitw_rte_pktmbuf_data_len(m) as usize);
            assert_eq!(b.pkt_len(0), sys::bitw_rte_pktmbuf_pkt_len(m));
            assert_eq!(b.frame(0)[0], 2);
            assert_eq!(b.frame(0).len(), 58);
        }
    }
}
