//! The Prometheus exporter (`[control] metrics_listen`, `GET /metrics`).
//!
//! Control's own series (link, pings, SA installs, reloads) are ordinary
//! `prometheus` metrics that the threads update as things happen. The
//! dataplane's counters are exported by [`DataplaneCollector`], which asks
//! for the latest [`Stats`] on each scrape (at most once a second) and
//! writes them as counters with their absolute values: the dataplane is
//! the counter, control only reports it, so a dataplane restart shows as a
//! counter reset, which `rate()` handles. While the dataplane is down its
//! series are absent and `bitw_dataplane_up` is 0.
//!
//! Quantile gauges come from HDR histograms over a sliding window of 5 to
//! 10 minutes; the `_seconds` histograms are cumulative as usual.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus::core::{Collector, Desc};
use prometheus::proto::{self, MetricFamily, MetricType};
use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

use bitw_common::proto::{Stats, LATENCY_BUCKETS_NS, PROTOCOL_VERSION};

/// Histogram buckets for round trips: 50 µs to 1 s.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];

/// Histogram buckets for IKE SA set-up times: 1 ms to 10 s (a handshake
/// with retransmissions takes seconds; the first retransmission is at 1 s).
pub const HANDSHAKE_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The quantiles exported as gauges.
pub const QUANTILES: &[f64] = &[0.5, 0.99, 0.999];

/// Every expense-free fact control knows without asking the dataplane.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub link_up: bool,
    /// Installed SAs by direction, as the dataplane last reported them.
    pub sas_in: usize,
    pub sas_out: usize,
    pub terminals: usize,
    pub neighbors_inside: usize,
    pub neighbors_outside: usize,
    pub ike: IkeSnapshot,
}

/// The IKE proxy's state and counters as the engine last published them
/// (counters are the proxy's own running totals, exported as they are).
#[derive(Debug, Clone, Default)]
pub struct IkeSnapshot {
    /// Configured `[[connection]]`s.
    pub connections: usize,
    pub connecting: usize,
    pub established: usize,
    /// Handshakes by result: `ok` or the failure reason.
    pub handshakes: BTreeMap<String, u64>,
    /// Datagrams rejected, by reason.
    pub rejected: BTreeMap<String, u64>,
    pub retransmits: u64,
    pub cookies_sent: u64,
    /// Child SAs by result: `established`, `failed_<reason>`.
    pub child_sas: BTreeMap<String, u64>,
}

/// Handshake results exported from the start (at 0), so `rate()` and
/// dashboards have series before the first negotiation. Other failure
/// reasons appear when they first happen.
pub const IKE_HANDSHAKE_RESULTS: &[&str] = &["ok", "timeout", "no_proposal_chosen", "auth_failed"];

/// The proxy's rejection reasons, exported from the start (at 0).
pub const IKE_REJECT_REASONS: &[&str] = &[
    "from_inside",
    "malformed",
    "unknown_spi",
    "no_connection",
    "half_open_full",
];

/// Child SA results exported from the start (at 0).
pub const IKE_CHILD_RESULTS: &[&str] = &["established"];

/// Latencies over the last 5 to 10 minutes: two HDR histograms, rotated.
pub struct Window {
    cur: hdrhistogram::Histogram<u64>,
    prev: hdrhistogram::Histogram<u64>,
    rotated: Instant,
    span: Duration,
}

impl Window {
    pub fn new(span: Duration) -> Window {
        // Nanoseconds, 1 ns to 60 s, 3 significant digits.
        let h = || {
            hdrhistogram::Histogram::new_with_bounds(1, 60_000_000_000, 3)
                .expect("constant bounds are valid")
        };
        Window {
            cur: h(),
            prev: h(),
            rotated: Instant::now(),
            span,
        }
    }

    pub fn record(&mut self, d: Duration) {
        if self.rotated.elapsed() >= self.span {
            std::mem::swap(&mut self.cur, &mut self.prev);
            self.cur.reset();
            self.rotated = Instant::now();
        }
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX).max(1);
        self.cur.saturating_record(ns);
    }

    /// The quantiles in seconds; `None` with no samples.
    pub fn quantiles(&self, qs: &[f64]) -> Option<Vec<f64>> {
        let mut all = self.prev.clone();
        all.add(&self.cur).ok()?;
        if all.is_empty() {
            return None;
        }
        Some(
            qs.iter()
                .map(|q| all.value_at_quantile(*q) as f64 / 1e9)
                .collect(),
        )
    }
}

/// Control's metrics and the registry they live in.
pub struct Metrics {
    pub registry: Registry,
    pub dataplane_up: IntGauge,
    pub connects: IntCounter,
    pub disconnects: IntCounter,
    rtt: Histogram,
    rtt_window: Arc<Mutex<Window>>,
    install: Histogram,
    install_window: Arc<Mutex<Window>>,
    ike_handshake: Histogram,
    pub sa_installs: IntCounter,
    pub sa_removals: IntCounter,
    pub reloads: IntCounterVec,
    pub last_reload_success: Gauge,
    /// Events received from the dataplane, by type.
    pub events: IntCounterVec,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic elsewhere must not take the exporter down with it.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let registry = Registry::new();
        let reg = |c: Box<dyn Collector>| {
            registry
                .register(c)
                .expect("metric names are unique constants")
        };
        let build = IntGaugeVec::new(
            Opts::new(
                "bitw_build_info",
                "bitw-control's version and control-channel protocol version",
            ),
            &["version", "protocol_version"],
        )
        .expect("valid");
        build
            .with_label_values(&[env!("CARGO_PKG_VERSION"), &PROTOCOL_VERSION.to_string()])
            .set(1);
        reg(Box::new(build));
        let int_gauge = |n: &str, h: &str| IntGauge::new(n, h).expect("valid");
        let counter = |n: &str, h: &str| IntCounter::new(n, h).expect("valid");
        let hist = |n: &str, h: &str| {
            Histogram::with_opts(HistogramOpts::new(n, h).buckets(LATENCY_BUCKETS.to_vec()))
                .expect("valid")
        };
        let m = Metrics {
            dataplane_up: int_gauge("bitw_dataplane_up", "1 while the control channel to the dataplane is up"),
            connects: counter("bitw_control_channel_connects_total", "Control-channel sessions established"),
            disconnects: counter("bitw_control_channel_disconnects_total", "Control-channel sessions lost or closed"),
            rtt: hist("bitw_control_channel_rtt_seconds", "Round trip of control-channel pings"),
            rtt_window: Arc::new(Mutex::new(Window::new(Duration::from_secs(300)))),
            install: hist("bitw_sa_install_seconds", "Round trip of an Apply batch (SA installs and table changes) as control measures it"),
            install_window: Arc::new(Mutex::new(Window::new(Duration::from_secs(300)))),
            ike_handshake: Histogram::with_opts(
                HistogramOpts::new(
                    "bitw_ike_handshake_duration_seconds",
                    "Time from the first IKE_SA_INIT to the IKE SA established (successful handshakes)",
                )
                .buckets(HANDSHAKE_BUCKETS.to_vec()),
            )
            .expect("valid"),
            sa_installs: counter("bitw_sa_installs_total", "SAs installed or replaced in the dataplane"),
            sa_removals: counter("bitw_sa_removals_total", "SAs removed from the dataplane"),
            reloads: IntCounterVec::new(
                Opts::new("bitw_config_reloads_total", "Configuration reloads by result"),
                &["result"],
            )
            .expect("valid"),
            last_reload_success: Gauge::new(
                "bitw_config_last_reload_success_timestamp_seconds",
                "When the configuration was last loaded successfully (Unix time)",
            )
            .expect("valid"),
            events: IntCounterVec::new(
                Opts::new("bitw_control_events_total", "Events control received from the dataplane, by type"),
                &["type"],
            )
            .expect("valid"),
            registry: registry.clone(),
        };
        for r in ["ok", "error"] {
            m.reloads.with_label_values(&[r]);
        }
        for t in ["punt", "acquire", "expire", "learned", "hold_dropped"] {
            m.events.with_label_values(&[t]);
        }
        reg(Box::new(m.dataplane_up.clone()));
        reg(Box::new(m.connects.clone()));
        reg(Box::new(m.disconnects.clone()));
        reg(Box::new(m.rtt.clone()));
        reg(Box::new(m.install.clone()));
        reg(Box::new(m.ike_handshake.clone()));
        reg(Box::new(m.sa_installs.clone()));
        reg(Box::new(m.sa_removals.clone()));
        reg(Box::new(m.reloads.clone()));
        reg(Box::new(m.last_reload_success.clone()));
        reg(Box::new(m.events.clone()));
        Arc::new(m)
    }

    pub fn observe_rtt(&self, d: Duration) {
        self.rtt.observe(d.as_secs_f64());
        lock(&self.rtt_window).record(d);
    }

    /// A successful IKE handshake's set-up time.
    pub fn observe_ike_handshake(&self, seconds: f64) {
        self.ike_handshake.observe(seconds);
    }

    pub fn observe_install(&self, d: Duration) {
        self.install.observe(d.as_secs_f64());
        lock(&self.install_window).record(d);
    }

    /// Adds the dataplane collector: `stats` fetches the latest counters
    /// (or `None` when the dataplane is down or silent).
    pub fn add_dataplane_collector(
        &self,
        stats: Box<dyn Fn() -> Option<Arc<Stats>> + Send + Sync>,
        snapshot: Arc<Mutex<Snapshot>>,
    ) -> Result<(), prometheus::Error> {
        self.registry.register(Box::new(DataplaneCollector::new(
            stats,
            snapshot,
            self.rtt_window.clone(),
            self.install_window.clone(),
            self.rtt.clone(),
            self.install.clone(),
        )))
    }

    /// The text exposition format (0.0.4).
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            crate::info!("metrics: encoding failed: {e}");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

// ---- the dataplane's counters ----

/// Name, help, type and label names of every family the collector writes.
const FAMILIES: &[(&str, &str, MetricType, &[&str])] = {
    use MetricType::{COUNTER as C, GAUGE as G, HISTOGRAM as H, SUMMARY as S};
    &[
        (
            "bitw_worker_latency_seconds",
            "Per-packet latency through a worker, from the RX burst that received it to the TX burst that sent it",
            H,
            &["worker"],
        ),
        (
            "bitw_worker_latency_quantile_seconds",
            "RX-to-TX latency quantiles of a worker over the last second (HDR histogram in the worker)",
            S,
            &["worker"],
        ),
        // Summaries, not gauges: promtool refuses a `quantile` label on
        // anything else. Same series names; `_sum`/`_count` come with them.
        (
            "bitw_control_channel_rtt_quantile_seconds",
            "Ping round-trip quantiles over the last 5-10 minutes (HDR histogram)",
            S,
            &[],
        ),
        (
            "bitw_sa_install_quantile_seconds",
            "Apply round-trip quantiles over the last 5-10 minutes (HDR histogram)",
            S,
            &[],
        ),
        ("bitw_terminals", "Configured terminals", G, &[]),
        (
            "bitw_neighbors",
            "Neighbours the dataplane learned, by port",
            G,
            &["port"],
        ),
        (
            "bitw_sas",
            "SAs installed in the dataplane, by direction",
            G,
            &["direction"],
        ),
        (
            "bitw_dataplane_uptime_seconds",
            "Time since the dataplane started",
            G,
            &[],
        ),
        (
            "bitw_port_packets_total",
            "Packets received and sent per port (the workers' view)",
            C,
            &["port", "direction"],
        ),
        (
            "bitw_port_bytes_total",
            "Bytes received and sent per port (the workers' view)",
            C,
            &["port", "direction"],
        ),
        (
            "bitw_port_rx_missed_total",
            "Frames the device dropped because the workers did not keep up",
            C,
            &["port"],
        ),
        (
            "bitw_port_errors_total",
            "Device receive and transmit errors",
            C,
            &["port", "direction"],
        ),
        (
            "bitw_drops_total",
            "Packets dropped, by reason (all workers and the control side)",
            C,
            &["reason"],
        ),
        (
            "bitw_worker_busy_cycles_total",
            "TSC cycles spent in polls that found packets",
            C,
            &["worker"],
        ),
        (
            "bitw_worker_cycles_total",
            "TSC cycles spent polling",
            C,
            &["worker"],
        ),
        (
            "bitw_worker_rx_bursts_total",
            "Non-empty receive bursts",
            C,
            &["worker"],
        ),
        (
            "bitw_worker_rx_burst_packets_total",
            "Packets brought by non-empty receive bursts",
            C,
            &["worker"],
        ),
        (
            "bitw_worker_burst_size",
            "The configured burst size (packets per receive call)",
            G,
            &[],
        ),
        (
            "bitw_worker_packets_total",
            "Packets per worker, port and direction",
            C,
            &["worker", "port", "direction"],
        ),
        (
            "bitw_worker_bytes_total",
            "Bytes per worker, port and direction",
            C,
            &["worker", "port", "direction"],
        ),
        (
            "bitw_worker_handed_off_total",
            "Packets handed to the worker that owns their SA",
            C,
            &["worker"],
        ),
        (
            "bitw_flow_cache_lookups_total",
            "Flow-cache lookups by result",
            C,
            &["result"],
        ),
        (
            "bitw_bypassed_packets_total",
            "IP packets passed by a bypass rule or the default action",
            C,
            &[],
        ),
        (
            "bitw_non_ip_frames_total",
            "Frames passed unchanged as non-IP",
            C,
            &[],
        ),
        (
            "bitw_events_lost_total",
            "Events the dataplane could not queue for control",
            C,
            &[],
        ),
        (
            "bitw_esp_packets_total",
            "ESP packets processed",
            C,
            &["operation"],
        ),
        (
            "bitw_sa_packets_total",
            "Packets per SA (at most metrics_sa_limit SAs)",
            C,
            &["sa", "direction", "spi"],
        ),
        (
            "bitw_sa_bytes_total",
            "Bytes per SA (at most metrics_sa_limit SAs)",
            C,
            &["sa", "direction", "spi"],
        ),
        (
            "bitw_sa_series_limited",
            "1 when per-SA series were left out (more SAs than metrics_sa_limit)",
            G,
            &[],
        ),
        (
            "bitw_held_packets",
            "Packets held for SAs not installed yet",
            G,
            &[],
        ),
        (
            "bitw_sa_slots",
            "The dataplane's SA slots: names bound, slots free or waiting for reuse, table length",
            G,
            &["state"],
        ),
        (
            "bitw_acquires_total",
            "Acquires raised by the dataplane (a protect rule without its SA)",
            C,
            &[],
        ),
        (
            "bitw_expires_total",
            "SA expiries by reason",
            C,
            &["reason"],
        ),
        (
            "bitw_punted_packets_total",
            "IKE packets punted to control",
            C,
            &[],
        ),
        (
            "bitw_injected_packets_total",
            "Packets control injected",
            C,
            &[],
        ),
        (
            "bitw_inject_failed_total",
            "Packets control asked to inject that could not be sent",
            C,
            &[],
        ),
        // The IKE proxy (control's own: present while the dataplane is down).
        (
            "bitw_ike_connections",
            "Configured IKE connections ([[connection]])",
            G,
            &[],
        ),
        (
            "bitw_ike_sas",
            "IKE SAs by state (connecting: IKE_SA_INIT/IKE_AUTH under way)",
            G,
            &["state"],
        ),
        (
            "bitw_ike_handshakes_total",
            "IKE SA set-ups by result (ok, or the failure reason)",
            C,
            &["result"],
        ),
        (
            "bitw_ike_retransmits_total",
            "IKE requests retransmitted",
            C,
            &[],
        ),
        (
            "bitw_ike_cookies_sent_total",
            "IKE_SA_INIT requests answered with a COOKIE",
            C,
            &[],
        ),
        (
            "bitw_ike_rejected_total",
            "IKE datagrams rejected, by reason",
            C,
            &["reason"],
        ),
        (
            "bitw_ike_child_sas_total",
            "Child SA negotiations by result (established, failed_<reason>)",
            C,
            &["result"],
        ),
    ]
};

/// The expiry reasons, always exported.
pub const EXPIRE_REASONS: &[&str] = &["soft_lifetime", "hard_lifetime", "sequence_exhausted"];

/// Collects families one sample at a time.
#[derive(Default)]
struct Out {
    families: BTreeMap<&'static str, MetricFamily>,
}

impl Out {
    /// The family `name` (help from FAMILIES), created with type `ty` on first use.
    fn family(&mut self, name: &'static str, ty: MetricType) -> &mut MetricFamily {
        let help = FAMILIES.iter().find(|f| f.0 == name).map_or("", |f| f.1);
        debug_assert!(
            FAMILIES.iter().any(|f| f.0 == name),
            "unlisted family {name}"
        );
        self.families.entry(name).or_insert_with(|| {
            let mut mf = MetricFamily::default();
            mf.set_name(name.to_string());
            mf.set_help(help.to_string());
            mf.set_field_type(ty);
            mf
        })
    }

    /// A metric with these labels, sorted by name as the prometheus crate's
    /// own vectors write them.
    fn metric(labels: &[(&str, &str)]) -> proto::Metric {
        let mut m = proto::Metric::default();
        let mut labels = labels.to_vec();
        labels.sort_by_key(|l| l.0);
        m.set_label(
            labels
                .iter()
                .map(|(k, v)| {
                    let mut l = proto::LabelPair::default();
                    l.set_name(k.to_string());
                    l.set_value(v.to_string());
                    l
                })
                .collect(),
        );
        m
    }

    /// A summary: windowed quantiles with the cumulative count and sum.
    fn summary(
        &mut self,
        name: &'static str,
        labels: &[(&str, &str)],
        quantiles: &[(f64, f64)],
        count: u64,
        sum: f64,
    ) {
        let mut sm = proto::Summary::default();
        sm.set_sample_count(count);
        sm.set_sample_sum(sum);
        sm.set_quantile(
            quantiles
                .iter()
                .map(|(q, v)| {
                    let mut x = proto::Quantile::default();
                    x.set_quantile(*q);
                    x.set_value(*v);
                    x
                })
                .collect(),
        );
        let mut m = Self::metric(labels);
        m.set_summary(sm);
        self.family(name, MetricType::SUMMARY).mut_metric().push(m);
    }

    /// A histogram from cumulative bucket counts (upper bound, count).
    fn histogram(
        &mut self,
        name: &'static str,
        labels: &[(&str, &str)],
        buckets: &[(f64, u64)],
        count: u64,
        sum: f64,
    ) {
        let mut h = proto::Histogram::default();
        h.set_sample_count(count);
        h.set_sample_sum(sum);
        h.set_bucket(
            buckets
                .iter()
                .map(|(le, n)| {
                    let mut b = proto::Bucket::default();
                    b.set_upper_bound(*le);
                    b.set_cumulative_count(*n);
                    b
                })
                .collect(),
        );
        let mut m = Self::metric(labels);
        m.set_histogram(h);
        self.family(name, MetricType::HISTOGRAM)
            .mut_metric()
            .push(m);
    }

    fn add(&mut self, name: &'static str, labels: &[(&str, &str)], value: f64) {
        let Some(&(_, _, ty, _)) = FAMILIES.iter().find(|f| f.0 == name) else {
            debug_assert!(false, "unlisted family {name}");
            return;
        };
        let mut m = Self::metric(labels);
        if ty == MetricType::COUNTER {
            let mut c = proto::Counter::default();
            c.set_value(value);
            m.set_counter(c);
        } else {
            let mut g = proto::Gauge::default();
            g.set_value(value);
            m.set_gauge(g);
        }
        self.family(name, ty).mut_metric().push(m);
    }
}

/// Writes the dataplane's counters (`stats`) and control's snapshot.
fn collect_into(out: &mut Out, stats: Option<&Stats>, snap: &Snapshot) {
    out.add("bitw_terminals", &[], snap.terminals as f64);
    out.add(
        "bitw_neighbors",
        &[("port", "inside")],
        snap.neighbors_inside as f64,
    );
    out.add(
        "bitw_neighbors",
        &[("port", "outside")],
        snap.neighbors_outside as f64,
    );
    collect_ike(out, &snap.ike);
    let Some(s) = stats else { return };
    if snap.link_up {
        out.add("bitw_sas", &[("direction", "in")], snap.sas_in as f64);
        out.add("bitw_sas", &[("direction", "out")], snap.sas_out as f64);
    }
    out.add("bitw_dataplane_uptime_seconds", &[], s.uptime_seconds);
    for p in &s.ports {
        let port = p.name.as_str();
        for (dir, t) in [("rx", &p.rx), ("tx", &p.tx)] {
            out.add(
                "bitw_port_packets_total",
                &[("port", port), ("direction", dir)],
                t.packets as f64,
            );
            out.add(
                "bitw_port_bytes_total",
                &[("port", port), ("direction", dir)],
                t.bytes as f64,
            );
        }
        out.add(
            "bitw_port_rx_missed_total",
            &[("port", port)],
            p.rx_missed as f64,
        );
        out.add(
            "bitw_port_errors_total",
            &[("port", port), ("direction", "rx")],
            p.rx_errors as f64,
        );
        out.add(
            "bitw_port_errors_total",
            &[("port", port), ("direction", "tx")],
            p.tx_errors as f64,
        );
    }
    for (reason, n) in s.drops_total() {
        out.add("bitw_drops_total", &[("reason", &reason)], n as f64);
    }
    out.add("bitw_worker_burst_size", &[], s.burst_size as f64);
    let (mut enc, mut dec, mut hits, mut misses, mut bypassed, mut non_ip, mut lost) =
        (0u64, 0u64, 0u64, 0u64, 0u64, 0u64, 0u64);
    for w in &s.workers {
        let id = w.worker.to_string();
        let worker = id.as_str();
        let l = &w.latency;
        let ns = |v: u64| v as f64 / 1e9;
        let buckets: Vec<(f64, u64)> = LATENCY_BUCKETS_NS
            .iter()
            .zip(&l.buckets)
            .map(|(&le, &n)| (ns(le), n))
            .collect();
        out.histogram(
            "bitw_worker_latency_seconds",
            &[("worker", worker)],
            &buckets,
            l.packets,
            ns(l.sum_ns),
        );
        out.summary(
            "bitw_worker_latency_quantile_seconds",
            &[("worker", worker)],
            &[
                (0.5, ns(l.recent_p50_ns)),
                (0.99, ns(l.recent_p99_ns)),
                (0.999, ns(l.recent_p999_ns)),
            ],
            l.packets,
            ns(l.sum_ns),
        );
        out.add(
            "bitw_worker_busy_cycles_total",
            &[("worker", worker)],
            w.busy_cycles as f64,
        );
        out.add(
            "bitw_worker_cycles_total",
            &[("worker", worker)],
            w.total_cycles as f64,
        );
        out.add(
            "bitw_worker_rx_bursts_total",
            &[("worker", worker)],
            w.rx_bursts as f64,
        );
        out.add(
            "bitw_worker_rx_burst_packets_total",
            &[("worker", worker)],
            w.rx_burst_packets as f64,
        );
        out.add(
            "bitw_worker_handed_off_total",
            &[("worker", worker)],
            w.handed_off as f64,
        );
        for (port, dir, t) in [
            ("inside", "rx", &w.rx_inside),
            ("outside", "rx", &w.rx_outside),
            ("inside", "tx", &w.tx_inside),
            ("outside", "tx", &w.tx_outside),
        ] {
            let l = [("worker", worker), ("port", port), ("direction", dir)];
            out.add("bitw_worker_packets_total", &l, t.packets as f64);
            out.add("bitw_worker_bytes_total", &l, t.bytes as f64);
        }
        enc = enc.saturating_add(w.esp_encrypted);
        dec = dec.saturating_add(w.esp_decrypted);
        hits = hits.saturating_add(w.flow_cache_hits);
        misses = misses.saturating_add(w.flow_cache_misses);
        bypassed = bypassed.saturating_add(w.bypassed);
        non_ip = non_ip.saturating_add(w.non_ip);
        lost = lost.saturating_add(w.events_lost);
    }
    out.add(
        "bitw_esp_packets_total",
        &[("operation", "encrypt")],
        enc as f64,
    );
    out.add(
        "bitw_esp_packets_total",
        &[("operation", "decrypt")],
        dec as f64,
    );
    out.add(
        "bitw_flow_cache_lookups_total",
        &[("result", "hit")],
        hits as f64,
    );
    out.add(
        "bitw_flow_cache_lookups_total",
        &[("result", "miss")],
        misses as f64,
    );
    out.add("bitw_bypassed_packets_total", &[], bypassed as f64);
    out.add("bitw_non_ip_frames_total", &[], non_ip as f64);
    out.add("bitw_events_lost_total", &[], lost as f64);
    for sa in &s.sas {
        let spi = format!("{:#010x}", sa.spi);
        let l = [
            ("sa", sa.name.as_str()),
            ("direction", sa.direction.as_str()),
            ("spi", spi.as_str()),
        ];
        out.add("bitw_sa_packets_total", &l, sa.packets as f64);
        out.add("bitw_sa_bytes_total", &l, sa.bytes as f64);
    }
    let limited = s.sa_count > s.sas.len();
    out.add(
        "bitw_sa_series_limited",
        &[],
        if limited { 1.0 } else { 0.0 },
    );
    out.add("bitw_held_packets", &[], s.held_packets as f64);
    for (state, n) in [
        ("bound", s.sa_slots.bound),
        ("free", s.sa_slots.free),
        ("waiting", s.sa_slots.waiting),
        ("table", s.sa_slots.table),
    ] {
        out.add("bitw_sa_slots", &[("state", state)], n as f64);
    }
    out.add("bitw_acquires_total", &[], s.acquires as f64);
    for reason in EXPIRE_REASONS {
        let n = s.expires.get(*reason).copied().unwrap_or(0);
        out.add("bitw_expires_total", &[("reason", reason)], n as f64);
    }
    out.add("bitw_punted_packets_total", &[], s.punted as f64);
    out.add("bitw_injected_packets_total", &[], s.injected as f64);
    out.add("bitw_inject_failed_total", &[], s.inject_failed as f64);
}

/// The IKE proxy's series: always present, the usual results and reasons
/// at 0 before they first happen.
fn collect_ike(out: &mut Out, ike: &IkeSnapshot) {
    out.add("bitw_ike_connections", &[], ike.connections as f64);
    out.add(
        "bitw_ike_sas",
        &[("state", "connecting")],
        ike.connecting as f64,
    );
    out.add(
        "bitw_ike_sas",
        &[("state", "established")],
        ike.established as f64,
    );
    let with_defaults = |m: &BTreeMap<String, u64>, defaults: &[&str]| {
        let mut all = m.clone();
        for d in defaults {
            all.entry(d.to_string()).or_insert(0);
        }
        all
    };
    for (result, n) in with_defaults(&ike.handshakes, IKE_HANDSHAKE_RESULTS) {
        out.add(
            "bitw_ike_handshakes_total",
            &[("result", &result)],
            n as f64,
        );
    }
    for (reason, n) in with_defaults(&ike.rejected, IKE_REJECT_REASONS) {
        out.add("bitw_ike_rejected_total", &[("reason", &reason)], n as f64);
    }
    for (result, n) in with_defaults(&ike.child_sas, IKE_CHILD_RESULTS) {
        out.add("bitw_ike_child_sas_total", &[("result", &result)], n as f64);
    }
    out.add("bitw_ike_retransmits_total", &[], ike.retransmits as f64);
    out.add("bitw_ike_cookies_sent_total", &[], ike.cookies_sent as f64);
}

/// On each scrape: the dataplane's latest counters, control's snapshot and
/// the latency quantiles.
pub struct DataplaneCollector {
    stats: Box<dyn Fn() -> Option<Arc<Stats>> + Send + Sync>,
    snapshot: Arc<Mutex<Snapshot>>,
    rtt_window: Arc<Mutex<Window>>,
    install_window: Arc<Mutex<Window>>,
    /// The cumulative histograms, for the summaries' count and sum.
    rtt: Histogram,
    install: Histogram,
    descs: Vec<Desc>,
}

impl DataplaneCollector {
    fn new(
        stats: Box<dyn Fn() -> Option<Arc<Stats>> + Send + Sync>,
        snapshot: Arc<Mutex<Snapshot>>,
        rtt_window: Arc<Mutex<Window>>,
        install_window: Arc<Mutex<Window>>,
        rtt: Histogram,
        install: Histogram,
    ) -> DataplaneCollector {
        let descs = FAMILIES
            .iter()
            .map(|(name, help, _, labels)| {
                Desc::new(
                    name.to_string(),
                    help.to_string(),
                    labels.iter().map(|l| l.to_string()).collect(),
                    Default::default(),
                )
                .expect("valid constant names")
            })
            .collect();
        DataplaneCollector {
            stats,
            snapshot,
            rtt_window,
            install_window,
            rtt,
            install,
            descs,
        }
    }
}

impl Collector for DataplaneCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let snap = lock(&self.snapshot).clone();
        let stats = if snap.link_up { (self.stats)() } else { None };
        let mut out = Out::default();
        collect_into(&mut out, stats.as_deref(), &snap);
        for (name, window, hist) in [
            (
                "bitw_control_channel_rtt_quantile_seconds",
                &self.rtt_window,
                &self.rtt,
            ),
            (
                "bitw_sa_install_quantile_seconds",
                &self.install_window,
                &self.install,
            ),
        ] {
            // No samples in the window: NaN, as client libraries write empty
            // summaries, so the series exist from the first scrape.
            let values = lock(window)
                .quantiles(QUANTILES)
                .unwrap_or_else(|| vec![f64::NAN; QUANTILES.len()]);
            let qs: Vec<(f64, f64)> = QUANTILES.iter().copied().zip(values).collect();
            out.summary(
                name,
                &[],
                &qs,
                hist.get_sample_count(),
                hist.get_sample_sum(),
            );
        }
        out.families.into_values().collect()
    }
}

// ---- HTTP ----

/// Binds the exporter's address (port 0 picks one: see the returned address).
pub fn bind(addr: SocketAddr) -> Result<(tiny_http::Server, SocketAddr), String> {
    let server =
        tiny_http::Server::http(addr).map_err(|e| format!("metrics_listen {addr}: {e}"))?;
    let local = server
        .server_addr()
        .to_ip()
        .ok_or_else(|| format!("metrics_listen {addr}: not an IP socket"))?;
    Ok((server, local))
}

/// Serves `GET /metrics` (and a small index at `/`) until `stop` is set.
/// One request at a time: scrapes are rare and each is cheap.
pub fn serve(server: tiny_http::Server, metrics: Arc<Metrics>, stop: Arc<AtomicBool>) {
    use tiny_http::{Header, Method, Response};
    let header = |k: &str, v: &str| Header::from_bytes(k.as_bytes(), v.as_bytes()).ok();
    while !stop.load(Ordering::Relaxed) {
        let req = match server.recv_timeout(Duration::from_millis(200)) {
            Ok(Some(r)) => r,
            Ok(None) => continue,
            Err(e) => {
                crate::info!("metrics: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let path = req.url().split('?').next().unwrap_or("").to_string();
        let get = matches!(req.method(), Method::Get | Method::Head);
        let resp = match (get, path.as_str()) {
            (true, "/metrics") => {
                let mut r = Response::from_string(metrics.render());
                if let Some(h) = header("Content-Type", prometheus::TEXT_FORMAT) {
                    r.add_header(h);
                }
                r
            }
            (true, "/") => {
                let mut r = Response::from_string(
                    "<html><head><title>bitw-control</title></head><body><h1>bitw-control</h1>\
                     <p><a href=\"/metrics\">Metrics</a></p></body></html>\n",
                );
                if let Some(h) = header("Content-Type", "text/html; charset=utf-8") {
                    r.add_header(h);
                }
                r
            }
            _ => Response::from_string("not found\n").with_status_code(404),
        };
        let _ = req.respond(resp);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use bitw_common::proto::{PortStats, SaStats, TrafficCount, WorkerStats};
    use bitw_common::rules::Direction;

    pub(crate) fn sample_stats() -> Stats {
        let drops = |extra: u64| -> BTreeMap<String, u64> {
            ["malformed", "policy_discard", "replay", "icv"]
                .iter()
                .enumerate()
                .map(|(i, r)| (r.to_string(), if i == 0 { extra } else { 0 }))
                .collect()
        };
        let worker = |i: usize| WorkerStats {
            worker: i,
            lcore: i as u32 + 1,
            rx_inside: TrafficCount {
                packets: 100,
                bytes: 6400,
            },
            rx_outside: TrafficCount {
                packets: 50,
                bytes: 7000,
            },
            tx_inside: TrafficCount {
                packets: 50,
                bytes: 6000,
            },
            tx_outside: TrafficCount {
                packets: 98,
                bytes: 9000,
            },
            drops: drops(2),
            esp_encrypted: 90,
            esp_decrypted: 50,
            busy_cycles: 1000,
            total_cycles: 4000,
            rx_bursts: 10,
            rx_burst_packets: 150,
            latency: bitw_common::proto::LatencyStats {
                packets: 150,
                sum_ns: 450_000,
                recent_p50_ns: 2_500,
                recent_p99_ns: 7_000,
                recent_p999_ns: 40_000,
                buckets: vec![0, 100, 140, 149, 149, 150, 150, 150, 150, 150, 150, 150],
                ..Default::default()
            },
            ..Default::default()
        };
        Stats {
            instance: "dp-1".into(),
            software: "bitw-dataplane 0.1.0".into(),
            uptime_seconds: 12.5,
            burst_size: 32,
            tsc_hz: 2_000_000_000,
            ports: ["inside", "outside"]
                .iter()
                .map(|n| PortStats {
                    name: n.to_string(),
                    device: "net_null0".into(),
                    rx: TrafficCount {
                        packets: 200,
                        bytes: 12800,
                    },
                    tx: TrafficCount {
                        packets: 196,
                        bytes: 18000,
                    },
                    rx_missed: 3,
                    rx_errors: 0,
                    tx_errors: 1,
                })
                .collect(),
            workers: vec![worker(0), worker(1)],
            control_drops: [("hold_overflow".to_string(), 5u64)].into_iter().collect(),
            sa_count: 3,
            sas: vec![
                SaStats {
                    name: "to-hq".into(),
                    direction: Direction::Out,
                    spi: 0x1001,
                    packets: 180,
                    bytes: 20000,
                    expired: false,
                },
                SaStats {
                    name: "from-hq".into(),
                    direction: Direction::In,
                    spi: 0x2002,
                    packets: 100,
                    bytes: 12000,
                    expired: false,
                },
            ],
            held_packets: 4,
            acquires: 7,
            expires: [("soft_lifetime".to_string(), 1u64)].into_iter().collect(),
            punted: 9,
            injected: 2,
            inject_failed: 0,
            control_sessions: 1,
            sa_slots: bitw_common::proto::SaSlots {
                bound: 3,
                free: 1,
                waiting: 0,
                table: 4,
            },
        }
    }

    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    fn rendered(up: bool, stats: Option<Stats>) -> (Arc<Metrics>, String) {
        rendered_with(up, stats, IkeSnapshot::default(), &[])
    }

    fn rendered_with(
        up: bool,
        stats: Option<Stats>,
        ike: IkeSnapshot,
        handshakes: &[f64],
    ) -> (Arc<Metrics>, String) {
        let m = Metrics::new();
        let stats = stats.map(Arc::new);
        let snap = Arc::new(Mutex::new(Snapshot {
            link_up: up,
            sas_in: 1,
            sas_out: 2,
            terminals: 1,
            neighbors_inside: 3,
            neighbors_outside: 0,
            ike,
        }));
        for h in handshakes {
            m.observe_ike_handshake(*h);
        }
        m.add_dataplane_collector(Box::new(move || stats.clone()), snap)
            .unwrap();
        m.dataplane_up.set(up as i64);
        m.observe_rtt(Duration::from_micros(120));
        m.observe_rtt(Duration::from_micros(300));
        let text = m.render();
        (m, text)
    }

    #[test]
    fn stats_render_with_names_labels_and_absolute_values() {
        let (_m, text) = rendered(true, Some(sample_stats()));
        for (series, want) in [
            ("bitw_dataplane_up", 1.0),
            (
                r#"bitw_port_packets_total{direction="rx",port="inside"}"#,
                200.0,
            ),
            (
                r#"bitw_port_bytes_total{direction="tx",port="outside"}"#,
                18000.0,
            ),
            (r#"bitw_port_rx_missed_total{port="inside"}"#, 3.0),
            (
                r#"bitw_port_errors_total{direction="tx",port="outside"}"#,
                1.0,
            ),
            (r#"bitw_drops_total{reason="malformed"}"#, 4.0),
            (r#"bitw_drops_total{reason="icv"}"#, 0.0),
            (r#"bitw_drops_total{reason="hold_overflow"}"#, 5.0),
            (r#"bitw_worker_busy_cycles_total{worker="1"}"#, 1000.0),
            (r#"bitw_worker_cycles_total{worker="0"}"#, 4000.0),
            (r#"bitw_worker_rx_bursts_total{worker="0"}"#, 10.0),
            (r#"bitw_worker_rx_burst_packets_total{worker="0"}"#, 150.0),
            (
                r#"bitw_worker_latency_seconds_bucket{worker="0",le="0.000002"}"#,
                100.0,
            ),
            (
                r#"bitw_worker_latency_seconds_bucket{worker="0",le="0.00001"}"#,
                149.0,
            ),
            (
                r#"bitw_worker_latency_seconds_bucket{worker="0",le="+Inf"}"#,
                150.0,
            ),
            (r#"bitw_worker_latency_seconds_count{worker="0"}"#, 150.0),
            (r#"bitw_worker_latency_seconds_sum{worker="0"}"#, 0.00045),
            (
                r#"bitw_worker_latency_quantile_seconds{worker="0",quantile="0.99"}"#,
                0.000007,
            ),
            (
                r#"bitw_worker_latency_quantile_seconds{worker="0",quantile="0.999"}"#,
                0.00004,
            ),
            ("bitw_worker_burst_size", 32.0),
            (
                r#"bitw_worker_packets_total{direction="tx",port="outside",worker="1"}"#,
                98.0,
            ),
            (r#"bitw_esp_packets_total{operation="encrypt"}"#, 180.0),
            (r#"bitw_esp_packets_total{operation="decrypt"}"#, 100.0),
            (r#"bitw_sas{direction="out"}"#, 2.0),
            (
                r#"bitw_sa_packets_total{direction="out",sa="to-hq",spi="0x00001001"}"#,
                180.0,
            ),
            (
                r#"bitw_sa_bytes_total{direction="in",sa="from-hq",spi="0x00002002"}"#,
                12000.0,
            ),
            ("bitw_sa_series_limited", 1.0),
            ("bitw_held_packets", 4.0),
            (r#"bitw_sa_slots{state="bound"}"#, 3.0),
            (r#"bitw_sa_slots{state="table"}"#, 4.0),
            ("bitw_acquires_total", 7.0),
            (r#"bitw_expires_total{reason="soft_lifetime"}"#, 1.0),
            (r#"bitw_expires_total{reason="sequence_exhausted"}"#, 0.0),
            ("bitw_punted_packets_total", 9.0),
            ("bitw_injected_packets_total", 2.0),
            ("bitw_terminals", 1.0),
            (r#"bitw_neighbors{port="inside"}"#, 3.0),
            (
                r#"bitw_build_info{protocol_version="1",version="0.1.0"}"#,
                1.0,
            ),
            ("bitw_control_channel_rtt_seconds_count", 2.0),
            (
                r#"bitw_control_channel_rtt_seconds_bucket{le="0.00025"}"#,
                1.0,
            ),
            (r#"bitw_config_reloads_total{result="error"}"#, 0.0),
        ] {
            assert_eq!(value(&text, series), Some(want), "{series} in:\n{text}");
        }
        assert!(text.contains("# TYPE bitw_drops_total counter"));
        assert!(text.contains("# TYPE bitw_held_packets gauge"));
        assert!(text.contains("# TYPE bitw_control_channel_rtt_seconds histogram"));
        let q = value(
            &text,
            r#"bitw_control_channel_rtt_quantile_seconds{quantile="0.5"}"#,
        )
        .unwrap();
        assert!((0.00011..0.00013).contains(&q), "{q}");
        assert!(
            value(
                &text,
                r#"bitw_control_channel_rtt_quantile_seconds{quantile="0.999"}"#
            )
            .unwrap()
                > 0.00029
        );
        assert!(
            text.contains("bitw_sa_install_quantile_seconds{quantile=\"0.99\"} NaN"),
            "no samples yet: NaN quantiles, so the series exist"
        );
        assert!(
            !text.to_lowercase().contains("key"),
            "nothing key-like in the exposition"
        );
        assert_eq!(
            value(&text, "bitw_control_channel_rtt_quantile_seconds_count"),
            Some(2.0)
        );
        assert!(text.contains("# TYPE bitw_control_channel_rtt_quantile_seconds summary"));
        check_with_promtool(&text);
    }

    #[test]
    fn dataplane_down_leaves_its_series_out() {
        let (_m, text) = rendered(false, Some(sample_stats()));
        assert_eq!(value(&text, "bitw_dataplane_up"), Some(0.0));
        assert_eq!(value(&text, "bitw_terminals"), Some(1.0));
        for absent in [
            "bitw_port_packets_total",
            "bitw_drops_total",
            "bitw_sas{",
            "bitw_held_packets",
            "bitw_sa_slots",
        ] {
            assert!(!text.contains(absent), "{absent} while down:\n{text}");
        }
        // Up but the dataplane does not answer: the same.
        let (_m, text) = rendered(true, None);
        assert!(!text.contains("bitw_port_packets_total"));
        check_with_promtool(&text);
    }

    #[test]
    fn ike_series_exist_from_the_start_with_their_types() {
        // No connection, no negotiation: every family is there, at 0.
        let (_m, text) = rendered(false, None);
        for (series, want) in [
            ("bitw_ike_connections", 0.0),
            (r#"bitw_ike_sas{state="connecting"}"#, 0.0),
            (r#"bitw_ike_sas{state="established"}"#, 0.0),
            (r#"bitw_ike_handshakes_total{result="ok"}"#, 0.0),
            (r#"bitw_ike_handshakes_total{result="timeout"}"#, 0.0),
            (
                r#"bitw_ike_handshakes_total{result="no_proposal_chosen"}"#,
                0.0,
            ),
            (r#"bitw_ike_handshakes_total{result="auth_failed"}"#, 0.0),
            (r#"bitw_ike_rejected_total{reason="unknown_spi"}"#, 0.0),
            (r#"bitw_ike_child_sas_total{result="established"}"#, 0.0),
            ("bitw_ike_retransmits_total", 0.0),
            ("bitw_ike_cookies_sent_total", 0.0),
            ("bitw_ike_handshake_duration_seconds_count", 0.0),
            (
                r#"bitw_ike_handshake_duration_seconds_bucket{le="+Inf"}"#,
                0.0,
            ),
        ] {
            assert_eq!(value(&text, series), Some(want), "{series} in:\n{text}");
        }
        for (family, ty) in [
            ("bitw_ike_connections", "gauge"),
            ("bitw_ike_sas", "gauge"),
            ("bitw_ike_handshakes_total", "counter"),
            ("bitw_ike_rejected_total", "counter"),
            ("bitw_ike_child_sas_total", "counter"),
            ("bitw_ike_retransmits_total", "counter"),
            ("bitw_ike_cookies_sent_total", "counter"),
            ("bitw_ike_handshake_duration_seconds", "histogram"),
        ] {
            assert!(
                text.contains(&format!("# TYPE {family} {ty}\n")),
                "{family} is not a {ty}:\n{text}"
            );
        }
        check_with_promtool(&text);

        // With traffic: the proxy's totals as they are, new reasons added.
        let ike = IkeSnapshot {
            connections: 2,
            connecting: 1,
            established: 3,
            handshakes: [("ok".to_string(), 5u64), ("ts_unacceptable".to_string(), 1)]
                .into_iter()
                .collect(),
            rejected: [
                ("malformed".to_string(), 4u64),
                ("invalid_spi".to_string(), 2),
            ]
            .into_iter()
            .collect(),
            retransmits: 7,
            cookies_sent: 9,
            child_sas: [
                ("established".to_string(), 6u64),
                ("failed_no_proposal_chosen".to_string(), 1),
            ]
            .into_iter()
            .collect(),
        };
        let (_m, text) = rendered_with(true, Some(sample_stats()), ike, &[0.004, 0.03, 1.5]);
        for (series, want) in [
            ("bitw_ike_connections", 2.0),
            (r#"bitw_ike_sas{state="connecting"}"#, 1.0),
            (r#"bitw_ike_sas{state="established"}"#, 3.0),
            (r#"bitw_ike_handshakes_total{result="ok"}"#, 5.0),
            (r#"bitw_ike_handshakes_total{result="timeout"}"#, 0.0),
            (
                r#"bitw_ike_handshakes_total{result="ts_unacceptable"}"#,
                1.0,
            ),
            (r#"bitw_ike_rejected_total{reason="malformed"}"#, 4.0),
            (r#"bitw_ike_rejected_total{reason="invalid_spi"}"#, 2.0),
            (r#"bitw_ike_rejected_total{reason="no_connection"}"#, 0.0),
            (r#"bitw_ike_child_sas_total{result="established"}"#, 6.0),
            (
                r#"bitw_ike_child_sas_total{result="failed_no_proposal_chosen"}"#,
                1.0,
            ),
            ("bitw_ike_retransmits_total", 7.0),
            ("bitw_ike_cookies_sent_total", 9.0),
            ("bitw_ike_handshake_duration_seconds_count", 3.0),
            (
                r#"bitw_ike_handshake_duration_seconds_bucket{le="0.001"}"#,
                0.0,
            ),
            (
                r#"bitw_ike_handshake_duration_seconds_bucket{le="0.005"}"#,
                1.0,
            ),
            (
                r#"bitw_ike_handshake_duration_seconds_bucket{le="0.05"}"#,
                2.0,
            ),
            (
                r#"bitw_ike_handshake_duration_seconds_bucket{le="10"}"#,
                3.0,
            ),
        ] {
            assert_eq!(value(&text, series), Some(want), "{series} in:\n{text}");
        }
        check_with_promtool(&text);
    }

    /// `promtool check metrics` (Debian package `prometheus`) when it is installed.
    pub(crate) fn check_with_promtool(text: &str) {
        use std::io::Write;
        let promtool = std::path::Path::new("/usr/bin/promtool");
        if !promtool.exists() {
            eprintln!("NOTE: /usr/bin/promtool is not installed (apt-get install prometheus); the exposition format was not checked by it");
            return;
        }
        let mut child = std::process::Command::new(promtool)
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success(),
            "promtool check metrics failed:\n{said}\n{text}"
        );
        assert!(said.trim().is_empty(), "promtool complains:\n{said}");
    }
}
