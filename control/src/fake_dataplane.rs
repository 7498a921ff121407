//! A small stand-in for bitw-dataplane's end of the control channel, on
//! `channel::Listener`, for unit tests: it keeps SAs (fingerprints,
//! counters), the filter table and punt addresses as the protocol
//! describes, applies batches atomically, and can refuse, go silent, drop
//! the connection, restart with a new instance, and send events.

use std::net::IpAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bitw_common::channel::{Endpoint, Listener};
use bitw_common::proto::{
    negotiate, Applied, Batch, DataplaneState, Event, FromDataplane, Hello, HelloReply, Neighbor,
    PolicySpec, Reply, Request, SaChange, SaInfo, SaStats, Stats, ToDataplane,
};

#[derive(Default)]
pub struct FakeState {
    pub instance: String,
    pub sas: Vec<SaInfo>,
    pub policy: Option<PolicySpec>,
    pub punt_addrs: Vec<IpAddr>,
    pub neighbors: Vec<Neighbor>,
    pub held_packets: usize,
    /// Every batch received, in order.
    pub batches: Vec<Batch>,
    pub acquire_failed: Vec<String>,
    /// Datagrams control asked to inject.
    pub injected: u64,
    pub pings: u64,
    pub sessions: u64,
    /// Refuse hellos with this reason.
    pub refuse: Option<String>,
    /// Refuse the next Apply with this message.
    pub reject_apply: Option<String>,
    /// Stop answering anything (a hung dataplane).
    pub silent: bool,
    /// Drop the current connection.
    pub drop_now: bool,
    pub events: Vec<Event>,
}

pub struct FakeDp {
    state: Arc<Mutex<FakeState>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FakeDp {
    pub fn start(path: &Path) -> FakeDp {
        let state = Arc::new(Mutex::new(FakeState {
            instance: "fake-1".into(),
            ..Default::default()
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let listener = Listener::bind(&Endpoint::Unix(path.to_path_buf()), None, 0o600)
            .expect("fake dataplane binds");
        let (s, st) = (stop.clone(), state.clone());
        let thread = std::thread::spawn(move || serve(listener, st, s));
        FakeDp {
            state,
            stop,
            thread: Some(thread),
        }
    }

    pub fn state(&self) -> MutexGuard<'_, FakeState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A restarted dataplane: new instance, empty tables, connection dropped.
    pub fn restart(&self, instance: &str) {
        let mut s = self.state();
        s.instance = instance.into();
        s.sas.clear();
        s.policy = None;
        s.punt_addrs.clear();
        s.drop_now = true;
    }

    pub fn push_event(&self, e: Event) {
        self.state().events.push(e);
    }

    /// Waits until `f` holds (or panics after 10 s).
    pub fn wait_for(&self, what: &str, f: impl Fn(&FakeState) -> bool) {
        let until = Instant::now() + Duration::from_secs(10);
        while Instant::now() < until {
            if f(&self.state()) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("fake dataplane: timed out waiting for {what}");
    }
}

impl Drop for FakeDp {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(listener: Listener, state: Arc<Mutex<FakeState>>, stop: Arc<AtomicBool>) {
    let lock = || state.lock().unwrap_or_else(|e| e.into_inner());
    while !stop.load(Ordering::Relaxed) {
        let Ok(Some(mut conn)) = listener.accept() else {
            std::thread::sleep(Duration::from_millis(5));
            continue;
        };
        let Ok(hello) = conn.recv_within::<Hello>(Duration::from_secs(2)) else {
            continue;
        };
        let reply = {
            let mut s = lock();
            match (&s.refuse, negotiate(&hello)) {
                (Some(r), _) => HelloReply::Refused { reason: r.clone() },
                (None, Err(reason)) => HelloReply::Refused { reason },
                (None, Ok(version)) => {
                    s.sessions += 1;
                    s.drop_now = false;
                    HelloReply::Welcome {
                        version,
                        software: "fake-dataplane 0".into(),
                        instance: s.instance.clone(),
                    }
                }
            }
        };
        let welcome = matches!(reply, HelloReply::Welcome { .. });
        if conn.send(&reply).is_err() || !welcome {
            continue;
        }
        while !stop.load(Ordering::Relaxed) {
            let events: Vec<Event> = {
                let mut s = lock();
                if s.drop_now {
                    s.drop_now = false;
                    break;
                }
                std::mem::take(&mut s.events)
            };
            if events
                .into_iter()
                .any(|event| conn.send(&FromDataplane::Event { event }).is_err())
            {
                break;
            }
            let msg = match conn.recv::<ToDataplane>(Some(Duration::from_millis(5))) {
                Ok(Some(m)) => m,
                Ok(None) => continue,
                Err(_) => break,
            };
            let mut s = lock();
            if s.silent {
                continue;
            }
            let reply = handle(&mut s, msg.request);
            drop(s);
            if conn
                .send(&FromDataplane::Reply { id: msg.id, reply })
                .is_err()
            {
                break;
            }
        }
    }
}

fn handle(s: &mut FakeState, req: Request) -> Reply {
    match req {
        Request::Ping => {
            s.pings += 1;
            Reply::Pong
        }
        Request::GetState => Reply::State(DataplaneState {
            instance: s.instance.clone(),
            sas: s.sas.clone(),
            policy: s.policy.clone(),
            punt_addrs: s.punt_addrs.clone(),
            neighbors: s.neighbors.clone(),
            held_packets: s.held_packets,
        }),
        Request::GetStats { sa_limit } => Reply::Stats(Box::new(Stats {
            instance: s.instance.clone(),
            software: "fake-dataplane 0".into(),
            burst_size: 32,
            sa_count: s.sas.len(),
            sas: s
                .sas
                .iter()
                .take(sa_limit)
                .map(|i| SaStats {
                    name: i.name.clone(),
                    direction: i.direction,
                    spi: i.spi,
                    packets: i.packets,
                    bytes: i.bytes,
                    expired: i.expired,
                })
                .collect(),
            held_packets: s.held_packets,
            ..crate::metrics::tests::sample_stats()
        })),
        Request::AcquireFailed { sa } => {
            s.acquire_failed.push(sa);
            Reply::Done
        }
        Request::Inject { .. } => {
            s.injected += 1;
            Reply::Injected
        }
        Request::Apply(batch) => {
            s.batches.push(batch.clone());
            if let Some(message) = s.reject_apply.take() {
                return Reply::Error { message };
            }
            apply(s, batch)
        }
    }
}

/// All or nothing, as the protocol says.
fn apply(s: &mut FakeState, batch: Batch) -> Reply {
    let mut sas = s.sas.clone();
    let mut a = Applied::default();
    for c in &batch.sas {
        match c {
            SaChange::Remove { name, direction } => {
                let before = sas.len();
                sas.retain(|x| !(x.name == *name && x.direction == *direction));
                if sas.len() == before {
                    return Reply::Error {
                        message: format!("no SA `{name}` to remove"),
                    };
                }
                a.sas_removed += 1;
            }
            SaChange::Install(spec) => {
                if let Err(message) = spec.to_params() {
                    return Reply::Error { message };
                }
                let fp = spec.fingerprint();
                match sas
                    .iter_mut()
                    .find(|x| x.name == spec.name && x.direction == spec.direction)
                {
                    Some(x) if x.fingerprint == fp => a.sas_unchanged += 1,
                    Some(x) => {
                        *x = SaInfo::from_spec(spec);
                        a.sas_replaced += 1;
                    }
                    None => {
                        if sas
                            .iter()
                            .any(|x| x.direction == spec.direction && x.spi == spec.spi)
                        {
                            return Reply::Error {
                                message: format!("SPI {:#010x} is in use", spec.spi),
                            };
                        }
                        sas.push(SaInfo::from_spec(spec));
                        a.sas_installed += 1;
                    }
                }
            }
        }
    }
    if let Some(p) = &batch.policy {
        if let Some(e) = p.rules.iter().find_map(|r| r.to_rule().err()) {
            return Reply::Error { message: e };
        }
    }
    s.sas = sas;
    if let Some(p) = batch.policy {
        s.policy = Some(p);
    }
    if let Some(p) = batch.punt_addrs {
        s.punt_addrs = p;
    }
    a.rules = s.policy.as_ref().map_or(0, |p| p.rules.len());
    Reply::Applied(a)
}
