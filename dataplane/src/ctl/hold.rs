//! The hold store: outbound packets whose protect rule names an SA that is
//! not installed yet wait here (RFC 4301 §5.2: "the packet may be held while
//! an SA is negotiated") until control installs the SA, reports that it
//! failed, or they time out.
//!
//! One arrival-ordered queue over all SAs, bounded by `control.hold_packets`
//! (full: the oldest packet goes, so a stuck negotiation cannot starve new
//! ones); packets of one SA leave in the order they came. Acquires are rate
//! limited per flow (SA, rule, addresses, protocol, ports): at most one per
//! `control.acquire_interval`.
//!
//! Generic over the packet (`P`) so the rules are tested without DPDK; the
//! control thread stores mbufs. Time is passed in, never read here.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use bitw_common::proto::Acquire;

/// What identifies a flow for the acquire rate limit.
type FlowId = (
    String,
    String,
    std::net::IpAddr,
    std::net::IpAddr,
    u8,
    u16,
    u16,
);

fn flow_id(a: &Acquire) -> FlowId {
    (
        a.sa.clone(),
        a.rule.clone(),
        a.src,
        a.dst,
        a.proto,
        a.sport,
        a.dport,
    )
}

/// One held packet.
#[derive(Debug)]
pub struct Held<P> {
    /// The id (`sadb`: slot index and generation) of the outbound SA it
    /// waits for; the control thread drops it when that name is unbound.
    pub slot: u32,
    /// Offset of its IP header (what the encapsulation needs).
    pub l3: u16,
    pub since: Instant,
    /// The flow, as an acquire names it.
    pub flow: Acquire,
    pub pkt: P,
}

/// What [`HoldStore::push`] did besides storing the packet.
#[derive(Debug)]
pub struct Pushed<P> {
    /// The oldest packet, dropped to make room.
    pub evicted: Option<Held<P>>,
    /// Whether an acquire is due for this packet's flow (and was counted as sent).
    pub acquire: bool,
}

pub struct HoldStore<P> {
    cap: usize,
    timeout: Duration,
    interval: Duration,
    queue: VecDeque<Held<P>>,
    /// When each flow last had an acquire sent.
    acquired: HashMap<FlowId, Instant>,
    /// Bound on `acquired`: beyond it, further acquires wait for old ones to age.
    acquired_cap: usize,
}

impl<P> HoldStore<P> {
    pub fn new(cap: usize, timeout: Duration, interval: Duration) -> HoldStore<P> {
        HoldStore {
            cap,
            timeout,
            interval,
            queue: VecDeque::with_capacity(cap.min(4096)),
            acquired: HashMap::new(),
            acquired_cap: 4 * cap + 1024,
        }
    }

    pub fn len(&self) -> usize {
        self.queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Stores a packet (dropping the oldest when full) and says whether its
    /// flow is due an acquire. With a capacity of 0 nothing is stored: the
    /// packet comes back as `evicted`.
    pub fn push(&mut self, h: Held<P>, now: Instant) -> Pushed<P> {
        let acquire = self.acquire_due(&h.flow, now);
        if self.cap == 0 {
            return Pushed {
                evicted: Some(h),
                acquire,
            };
        }
        let evicted = if self.queue.len() >= self.cap {
            self.queue.pop_front()
        } else {
            None
        };
        self.queue.push_back(h);
        Pushed { evicted, acquire }
    }

    /// Whether an acquire for `flow` may go now; if so, records it as sent.
    pub fn acquire_due(&mut self, flow: &Acquire, now: Instant) -> bool {
        let id = flow_id(flow);
        if let Some(&last) = self.acquired.get(&id) {
            if now.saturating_duration_since(last) < self.interval {
                return false;
            }
        } else if self.acquired.len() >= self.acquired_cap {
            self.forget_old_acquires(now);
            if self.acquired.len() >= self.acquired_cap {
                return false; // a flood of new flows: control hears of them later
            }
        }
        self.acquired.insert(id, now);
        true
    }

    fn forget_old_acquires(&mut self, now: Instant) {
        let interval = self.interval;
        self.acquired
            .retain(|_, t| now.saturating_duration_since(*t) < interval);
    }

    /// Removes and returns the packets held longer than the timeout (oldest first).
    pub fn expire(&mut self, now: Instant) -> Vec<Held<P>> {
        let mut out = Vec::new();
        while self
            .queue
            .front()
            .is_some_and(|h| now.saturating_duration_since(h.since) >= self.timeout)
        {
            out.extend(self.queue.pop_front());
        }
        if self.acquired.len() > self.cap + 64 {
            self.forget_old_acquires(now);
        }
        out
    }

    /// Removes and returns the packets held for `slot`, in arrival order.
    pub fn take_slot(&mut self, slot: u32) -> Vec<Held<P>> {
        if !self.queue.iter().any(|h| h.slot == slot) {
            return Vec::new();
        }
        let (mine, rest): (VecDeque<_>, VecDeque<_>) =
            self.queue.drain(..).partition(|h| h.slot == slot);
        self.queue = rest;
        mine.into()
    }

    /// The slots that have packets waiting.
    pub fn slots(&self) -> Vec<u32> {
        let mut s: Vec<u32> = self.queue.iter().map(|h| h.slot).collect();
        s.sort_unstable();
        s.dedup();
        s
    }

    /// One acquire per distinct flow held (a new control session hears of
    /// every negotiation still wanted), marking each as sent now.
    pub fn reacquire_all(&mut self, now: Instant) -> Vec<Acquire> {
        let mut seen = std::collections::HashSet::new();
        let flows: Vec<Acquire> = self
            .queue
            .iter()
            .filter(|h| seen.insert(flow_id(&h.flow)))
            .map(|h| h.flow.clone())
            .collect();
        for f in &flows {
            self.acquired.insert(flow_id(f), now);
        }
        flows
    }

    /// Everything still held (at shutdown).
    pub fn drain(&mut self) -> Vec<Held<P>> {
        self.queue.drain(..).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bitw_common::rules::Direction;

    fn flow(sa: &str, sport: u16) -> Acquire {
        Acquire {
            sa: sa.into(),
            rule: "r".into(),
            direction: Direction::Out,
            src: "10.0.0.1".parse().unwrap(),
            dst: "10.1.0.1".parse().unwrap(),
            proto: 17,
            sport,
            dport: 53,
        }
    }

    fn held(slot: u32, sa: &str, sport: u16, n: u32, since: Instant) -> Held<u32> {
        Held {
            slot,
            l3: 14,
            since,
            flow: flow(sa, sport),
            pkt: n,
        }
    }

    #[test]
    fn bounded_and_the_oldest_goes_first() {
        let t0 = Instant::now();
        let mut h = HoldStore::new(3, Duration::from_secs(5), Duration::from_secs(1));
        for n in 0..3 {
            assert!(h.push(held(0, "a", 1, n, t0), t0).evicted.is_none());
        }
        let p = h.push(held(1, "b", 2, 3, t0), t0);
        assert_eq!(p.evicted.map(|e| e.pkt), Some(0));
        assert_eq!(h.len(), 3);
        let p = h.push(held(1, "b", 2, 4, t0), t0);
        assert_eq!(p.evicted.map(|e| e.pkt), Some(1));
        assert_eq!(h.slots(), vec![0, 1]);
        // Zero capacity: nothing is kept.
        let mut z = HoldStore::new(0, Duration::from_secs(5), Duration::from_secs(1));
        assert_eq!(
            z.push(held(0, "a", 1, 9, t0), t0).evicted.map(|e| e.pkt),
            Some(9)
        );
        assert!(z.is_empty());
    }

    #[test]
    fn release_keeps_arrival_order_per_sa() {
        let t0 = Instant::now();
        let mut h = HoldStore::new(100, Duration::from_secs(5), Duration::from_secs(1));
        for n in 0..10u32 {
            h.push(
                held(n % 2, if n % 2 == 0 { "a" } else { "b" }, 1, n, t0),
                t0,
            );
        }
        let a: Vec<u32> = h.take_slot(0).into_iter().map(|x| x.pkt).collect();
        assert_eq!(a, vec![0, 2, 4, 6, 8]);
        assert!(h.take_slot(0).is_empty());
        let b: Vec<u32> = h.take_slot(1).into_iter().map(|x| x.pkt).collect();
        assert_eq!(b, vec![1, 3, 5, 7, 9]);
        assert!(h.is_empty());
    }

    #[test]
    fn packets_time_out_oldest_first() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut h = HoldStore::new(100, ms(300), Duration::from_secs(1));
        h.push(held(0, "a", 1, 0, t0), t0);
        h.push(held(0, "a", 1, 1, t0 + ms(100)), t0 + ms(100));
        h.push(held(0, "a", 1, 2, t0 + ms(200)), t0 + ms(200));
        assert!(h.expire(t0 + ms(299)).is_empty());
        let gone: Vec<u32> = h.expire(t0 + ms(400)).into_iter().map(|x| x.pkt).collect();
        assert_eq!(gone, vec![0, 1]);
        assert_eq!(h.len(), 1);
        assert_eq!(h.expire(t0 + ms(500)).len(), 1);
        assert!(h.is_empty());
    }

    #[test]
    fn one_acquire_per_flow_per_interval() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut h = HoldStore::new(100, s(10), s(1));
        let due = |h: &mut HoldStore<u32>, sa, sport, n, at| {
            h.push(held(0, sa, sport, n, at), at).acquire
        };
        assert!(due(&mut h, "a", 1, 0, t0));
        assert!(!due(&mut h, "a", 1, 1, t0 + Duration::from_millis(500)));
        // Another flow of the same SA, another SA: each has its own.
        assert!(due(&mut h, "a", 2, 2, t0));
        assert!(due(&mut h, "b", 1, 3, t0));
        // After the interval the first flow is due again.
        assert!(due(&mut h, "a", 1, 4, t0 + s(1)));
        assert!(!due(&mut h, "a", 1, 5, t0 + s(1)));
        // A new session is told of every held flow once.
        let all = h.reacquire_all(t0 + s(3));
        assert_eq!(all.len(), 3);
        assert!(!due(&mut h, "b", 1, 6, t0 + s(3)));
    }
}
