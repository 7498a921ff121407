//! Per-packet latency through a worker: from the RX burst that brought a
//! packet to the TX burst that sent it, in an HdrHistogram per worker.
//!
//! Every packet of a burst is received by one `rx_burst` call and leaves by
//! one `tx_burst` call, so each has the same latency: the burst's processing
//! time, recorded once with the burst's count (two TSC reads and one
//! histogram update per burst, nothing per packet). Time a packet spent in
//! the NIC's ring before the RX burst is not seen (software vdevs and most
//! NICs have no RX timestamp); handed-off packets (another worker's RX) are
//! not recorded.
//!
//! The worker is the histograms' only user. About once a second it folds the
//! recent histogram into the run's and publishes both as numbers in
//! [`LatencyCounters`] (single-writer atomics), which the summary and the
//! control channel read from other threads.

use hdrhistogram::Histogram;

use crate::counters::Counter;

pub use bitw_common::proto::{LatencyStats as LatencySnapshot, LATENCY_BUCKETS_NS as BUCKETS_NS};

/// Latencies above this (ns) are recorded as this (a stalled worker, not a packet path).
const HIGHEST_NS: u64 = 1_000_000_000;

/// The quantiles published (p50, p99, p99.9).
pub const QUANTILES: [f64; 3] = [0.5, 0.99, 0.999];

/// What a worker publishes; every field in nanoseconds or packets.
#[derive(Default, Debug)]
pub struct LatencyCounters {
    /// Since start: packets recorded, sum of their latencies, and the
    /// packets at or under each bound of `BUCKETS_NS` (cumulative, as
    /// Prometheus buckets are).
    pub count: Counter,
    pub sum_ns: Counter,
    pub buckets: [Counter; BUCKETS_NS.len()],
    /// Since start: p50, p99, p99.9 and the maximum.
    pub total_quantiles_ns: [Counter; QUANTILES.len()],
    pub total_max_ns: Counter,
    /// The last publishing interval (about a second): p50, p99, p99.9, max.
    pub recent_quantiles_ns: [Counter; QUANTILES.len()],
    pub recent_max_ns: Counter,
}

impl LatencyCounters {
    pub fn snapshot(&self) -> LatencySnapshot {
        let t = &self.total_quantiles_ns;
        let r = &self.recent_quantiles_ns;
        LatencySnapshot {
            packets: self.count.get(),
            sum_ns: self.sum_ns.get(),
            p50_ns: t[0].get(),
            p99_ns: t[1].get(),
            p999_ns: t[2].get(),
            max_ns: self.total_max_ns.get(),
            recent_p50_ns: r[0].get(),
            recent_p99_ns: r[1].get(),
            recent_p999_ns: r[2].get(),
            recent_max_ns: self.recent_max_ns.get(),
            buckets: self.buckets.iter().map(Counter::get).collect(),
        }
    }
}

/// The worker's side: the histograms and the TSC conversion.
pub struct LatencyRecorder {
    /// Since the last publish, and since start (without the last interval).
    recent: Histogram<u64>,
    total: Histogram<u64>,
    /// ns = cycles * ns_per_cycle_q32 >> 32 (no division per burst).
    ns_per_cycle_q32: u64,
    /// Publish when the TSC passes this.
    next_publish: u64,
    publish_every: u64,
}

impl LatencyRecorder {
    /// `tsc_hz`: the TSC's rate; `now`: the TSC now.
    pub fn new(tsc_hz: u64, now: u64) -> LatencyRecorder {
        // Two significant digits (1 % resolution) keep a histogram at a few
        // thousand counts, so folding and reading it once a second costs
        // microseconds.
        let h = || Histogram::new_with_bounds(1, HIGHEST_NS, 2).expect("valid histogram bounds");
        let hz = tsc_hz.max(1);
        LatencyRecorder {
            recent: h(),
            total: h(),
            ns_per_cycle_q32: ((1_000_000_000u128 << 32) / hz as u128) as u64,
            next_publish: now.wrapping_add(hz),
            publish_every: hz,
        }
    }

    /// Records `packets` packets that took `cycles` TSC cycles each.
    #[inline]
    pub fn record(&mut self, cycles: u64, packets: u64) {
        if packets == 0 {
            return;
        }
        let ns = ((cycles as u128 * self.ns_per_cycle_q32 as u128) >> 32) as u64;
        // Within bounds by construction; an error would only lose a sample.
        let _ = self.recent.record_n(ns.clamp(1, HIGHEST_NS), packets);
    }

    /// Publishes if a second has passed since the last time.
    #[inline]
    pub fn maybe_publish(&mut self, now: u64, out: &LatencyCounters) {
        if now.wrapping_sub(self.next_publish) as i64 >= 0 {
            self.next_publish = now.wrapping_add(self.publish_every);
            self.publish(out);
        }
    }

    /// Folds the recent histogram into the run's and publishes both.
    pub fn publish(&mut self, out: &LatencyCounters) {
        let r = &self.recent;
        for (c, q) in out.recent_quantiles_ns.iter().zip(QUANTILES) {
            c.set(if r.is_empty() {
                0
            } else {
                r.value_at_quantile(q)
            });
        }
        out.recent_max_ns.set(r.max());
        if !r.is_empty() {
            // Same bounds and precision: cannot fail.
            let _ = self.total.add(r);
            self.recent.reset();
        }
        let t = &self.total;
        for (c, q) in out.total_quantiles_ns.iter().zip(QUANTILES) {
            c.set(if t.is_empty() {
                0
            } else {
                t.value_at_quantile(q)
            });
        }
        out.total_max_ns.set(t.max());
        out.count.set(t.len());
        // The mean is exact to the histogram's resolution; the sum follows from it.
        out.sum_ns.set((t.mean() * t.len() as f64) as u64);
        for (c, &le) in out.buckets.iter().zip(&BUCKETS_NS) {
            c.set(t.count_between(0, le));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_bursts_and_publishes_quantiles_and_buckets() {
        // A 1 GHz TSC: one cycle is one nanosecond.
        let mut rec = LatencyRecorder::new(1_000_000_000, 0);
        let out = LatencyCounters::default();
        // 990 packets at 3 us, 9 at 15 us, 1 at 400 us.
        rec.record(3_000, 990);
        rec.record(15_000, 9);
        rec.record(400_000, 1);
        rec.record(7, 0); // an empty burst records nothing
        rec.maybe_publish(999_999_999, &out);
        assert_eq!(out.count.get(), 0, "not yet a second");
        rec.maybe_publish(1_000_000_000, &out);
        let s = out.snapshot();
        assert_eq!(s.packets, 1000);
        let near = |v: u64, want: u64| v.abs_diff(want) * 100 <= want; // 1 %
        assert!(near(s.p50_ns, 3_000), "{s:?}");
        assert!(near(s.p99_ns, 3_000), "{s:?}");
        assert!(near(s.p999_ns, 15_000), "{s:?}");
        assert!(near(s.max_ns, 400_000), "{s:?}");
        assert_eq!(
            (s.recent_p50_ns, s.recent_max_ns),
            (s.p50_ns, s.max_ns),
            "the first interval is the whole run"
        );
        // le 1us: 0; 2us: 0; 5us: 990; 10us: 990; 20us: 999; ... 500us: 1000.
        assert_eq!(&s.buckets[..6], &[0, 0, 990, 990, 999, 999]);
        assert_eq!(s.buckets[8], 1000);
        assert!(near(s.sum_ns, 990 * 3_000 + 9 * 15_000 + 400_000));

        // The next interval: only 1 us packets; the run's figures keep the past.
        rec.record(1_000, 1000);
        rec.publish(&out);
        let s = out.snapshot();
        assert_eq!(s.packets, 2000);
        assert!(
            near(s.recent_p999_ns, 1_000) && near(s.recent_max_ns, 1_000),
            "{s:?}"
        );
        assert!(near(s.max_ns, 400_000), "{s:?}");
        assert_eq!(s.buckets[0], 1000);
    }

    #[test]
    fn converts_tsc_cycles_and_clamps() {
        // 2.5 GHz: 2500 cycles are 1 us.
        let mut rec = LatencyRecorder::new(2_500_000_000, 0);
        let out = LatencyCounters::default();
        rec.record(2_500, 1);
        rec.record(u64::MAX / 4, 1); // a stall far beyond the bound: clamped, not lost
        rec.publish(&out);
        let s = out.snapshot();
        assert_eq!(s.packets, 2);
        assert!(s.p50_ns.abs_diff(1_000) <= 10, "{s:?}");
        assert!(
            s.max_ns >= HIGHEST_NS && s.max_ns <= HIGHEST_NS * 101 / 100,
            "{s:?}"
        );
    }
}
