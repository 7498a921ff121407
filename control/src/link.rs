//! The dataplane link: control's end of the control channel.
//!
//! One thread owns the connection ([`Conn`] is not split: a TLS stream
//! cannot be). It connects, says hello, then alternates between reading
//! with a short timeout and sending what the engine queued, pings every
//! `ping_interval`, and gives the link up when a ping goes unanswered for
//! three intervals. Whatever happens it reconnects every
//! `reconnect_interval`. Each connection is a numbered session; requests
//! the engine addressed to an older session are failed, never sent to a
//! newer dataplane.
//!
//! Request ids are the link's: the engine tags requests with its own
//! `token` and gets replies back by token.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TryRecvError};

use bitw_common::channel::{self, ChannelError, Conn, Endpoint, TlsFiles};
use bitw_common::proto::{Event, FromDataplane, Hello, HelloReply, Reply, Request, ToDataplane};

use crate::metrics::Metrics;

/// How long the link thread waits for the dataplane before it looks at the
/// engine's queued requests again: a request waits at most this long (IKE
/// answers and SA installs are requests, so it is part of every handshake).
const POLL: Duration = Duration::from_millis(1);

#[derive(Debug, Clone)]
pub struct LinkConfig {
    pub endpoint: Endpoint,
    pub tls: Option<TlsFiles>,
    pub ping_interval: Duration,
    pub reconnect_interval: Duration,
    /// What control calls itself in the hello.
    pub software: String,
}

/// From the engine.
#[derive(Debug)]
pub enum LinkCmd {
    Request {
        session: u64,
        token: u64,
        request: Request,
    },
}

/// To the engine.
#[derive(Debug)]
pub enum LinkEvent {
    /// A connection attempt failed (sent on every attempt; the engine logs changes).
    ConnectFailed {
        reason: String,
    },
    /// The dataplane refused the hello.
    Refused {
        reason: String,
    },
    Up {
        session: u64,
        peer: String,
        version: u16,
        software: String,
        instance: String,
    },
    Down {
        session: u64,
        reason: String,
    },
    /// The answer to a request; `elapsed` is from writing it to reading the reply.
    Reply {
        token: u64,
        reply: Reply,
        elapsed: Duration,
    },
    /// A request that was not sent (link down, stale session) or was lost with the link.
    Failed {
        token: u64,
        reason: String,
    },
    Event(Box<Event>),
    Rtt(Duration),
    /// A frame that could not be understood (logged, skipped).
    Garbled(String),
}

struct Pending {
    id: u64,
    /// `None` for the link's own pings.
    token: Option<u64>,
    sent: Instant,
}

/// Runs the link until `stop` is set.
pub fn run(
    cfg: LinkConfig,
    cmds: Receiver<LinkCmd>,
    events: Sender<LinkEvent>,
    metrics: Arc<Metrics>,
    stop: Arc<AtomicBool>,
) {
    let mut session = 0u64;
    while !stop.load(Ordering::Relaxed) {
        match connect(&cfg) {
            Ok(Ok((conn, version, software, instance))) => {
                session += 1;
                metrics.connects.inc();
                metrics.dataplane_up.set(1);
                let _ = events.send(LinkEvent::Up {
                    session,
                    peer: conn.peer().to_string(),
                    version,
                    software,
                    instance,
                });
                let reason = serve(&cfg, conn, session, &cmds, &events, &metrics, &stop);
                metrics.disconnects.inc();
                metrics.dataplane_up.set(0);
                let _ = events.send(LinkEvent::Down { session, reason });
            }
            Ok(Err(reason)) => {
                let _ = events.send(LinkEvent::Refused { reason });
            }
            Err(reason) => {
                let _ = events.send(LinkEvent::ConnectFailed { reason });
            }
        }
        // Wait before the next attempt, failing whatever the engine sends meanwhile.
        let until = Instant::now() + cfg.reconnect_interval;
        while Instant::now() < until && !stop.load(Ordering::Relaxed) {
            let left = until.saturating_duration_since(Instant::now());
            match cmds.recv_timeout(left.min(Duration::from_millis(50))) {
                Ok(LinkCmd::Request { token, .. }) => {
                    let _ = events.send(LinkEvent::Failed {
                        token,
                        reason: "the dataplane link is down".into(),
                    });
                }
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return,
            }
        }
    }
}

type Welcome = (Conn, u16, String, String);

/// Connects and says hello: `Err` when nobody answers, `Ok(Err)` when refused.
fn connect(cfg: &LinkConfig) -> Result<Result<Welcome, String>, String> {
    let mut conn = channel::connect(&cfg.endpoint, cfg.tls.as_ref())
        .map_err(|e| format!("cannot connect: {e}"))?;
    conn.send(&Hello::new(&cfg.software))
        .map_err(|e| format!("{}: sending hello: {e}", cfg.endpoint))?;
    let wait = (cfg.ping_interval * 3).max(Duration::from_secs(1));
    match conn.recv_within::<HelloReply>(wait) {
        Ok(HelloReply::Welcome {
            version,
            software,
            instance,
        }) => Ok(Ok((conn, version, software, instance))),
        Ok(HelloReply::Refused { reason }) => Ok(Err(reason)),
        Err(e) => Err(format!("{}: no welcome: {e}", cfg.endpoint)),
    }
}

/// Serves one session; returns why it ended.
fn serve(
    cfg: &LinkConfig,
    mut conn: Conn,
    session: u64,
    cmds: &Receiver<LinkCmd>,
    events: &Sender<LinkEvent>,
    metrics: &Metrics,
    stop: &AtomicBool,
) -> String {
    let mut pending: VecDeque<Pending> = VecDeque::new();
    let mut next_id = 1u64;
    let mut next_ping = Instant::now();
    let dead_after = cfg.ping_interval * 3;
    let fail_all = |pending: &mut VecDeque<Pending>, why: &str| {
        for p in pending.drain(..) {
            if let Some(token) = p.token {
                let _ = events.send(LinkEvent::Failed {
                    token,
                    reason: why.to_string(),
                });
            }
        }
    };
    let reason = loop {
        if stop.load(Ordering::Relaxed) {
            break "control is stopping".to_string();
        }
        // Queued requests.
        let mut failed = None;
        loop {
            match cmds.try_recv() {
                Ok(LinkCmd::Request {
                    session: s,
                    token,
                    request,
                }) => {
                    if s != session {
                        let _ = events.send(LinkEvent::Failed {
                            token,
                            reason: "the dataplane link was re-established meanwhile".into(),
                        });
                        continue;
                    }
                    let id = next_id;
                    next_id += 1;
                    pending.push_back(Pending {
                        id,
                        token: Some(token),
                        sent: Instant::now(),
                    });
                    if let Err(e) = conn.send(&ToDataplane { id, request }) {
                        failed = Some(format!("sending a request: {e}"));
                        break;
                    }
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    failed = Some("control is stopping".into());
                    break;
                }
            }
        }
        if let Some(f) = failed {
            break f;
        }
        // Liveness.
        let now = Instant::now();
        if let Some(p) = pending.iter().find(|p| p.token.is_none()) {
            if now.duration_since(p.sent) >= dead_after {
                break format!(
                    "no answer to a ping within {:?} (3 ping intervals)",
                    dead_after
                );
            }
        } else if now >= next_ping {
            let id = next_id;
            next_id += 1;
            pending.push_back(Pending {
                id,
                token: None,
                sent: now,
            });
            next_ping = now + cfg.ping_interval;
            if let Err(e) = conn.send(&ToDataplane {
                id,
                request: Request::Ping,
            }) {
                break format!("sending a ping: {e}");
            }
        }
        // Whatever the dataplane says.
        match conn.recv::<serde_json::Value>(Some(POLL)) {
            Ok(None) => {}
            Ok(Some(v)) => match serde_json::from_value::<FromDataplane>(v.clone()) {
                Ok(FromDataplane::Event { event }) => {
                    let _ = events.send(LinkEvent::Event(Box::new(event)));
                }
                Ok(FromDataplane::Reply { id, reply }) => {
                    deliver(&mut pending, id, reply, events, metrics)
                }
                Err(e) => {
                    // A reply we cannot read still answers its request, so
                    // the ones after it stay matched.
                    let id = (v.get("kind").and_then(|k| k.as_str()) == Some("reply"))
                        .then(|| v.get("id").and_then(|i| i.as_u64()))
                        .flatten();
                    let what = format!("undecodable message from the dataplane: {e}");
                    if let Some(id) = id {
                        deliver(
                            &mut pending,
                            id,
                            Reply::Error {
                                message: what.clone(),
                            },
                            events,
                            metrics,
                        );
                    }
                    let _ = events.send(LinkEvent::Garbled(what));
                }
            },
            Err(ChannelError::Closed) => break "the dataplane closed the connection".into(),
            Err(e) => break format!("{e}"),
        }
    };
    fail_all(
        &mut pending,
        &format!("the dataplane link went down: {reason}"),
    );
    reason
}

fn deliver(
    pending: &mut VecDeque<Pending>,
    id: u64,
    reply: Reply,
    events: &Sender<LinkEvent>,
    metrics: &Metrics,
) {
    // Replies come in order: anything before `id` went unanswered.
    while pending.front().is_some_and(|p| p.id < id) {
        if let Some(Pending {
            token: Some(token), ..
        }) = pending.pop_front()
        {
            let _ = events.send(LinkEvent::Failed {
                token,
                reason: "the dataplane skipped this request".into(),
            });
        }
    }
    let Some(p) = pending.front().filter(|p| p.id == id) else {
        let _ = events.send(LinkEvent::Garbled(format!(
            "a reply to request {id}, which is not waiting"
        )));
        return;
    };
    let elapsed = p.sent.elapsed();
    let token = p.token;
    pending.pop_front();
    match token {
        None => {
            metrics.observe_rtt(elapsed);
            let _ = events.send(LinkEvent::Rtt(elapsed));
        }
        Some(token) => {
            let _ = events.send(LinkEvent::Reply {
                token,
                reply,
                elapsed,
            });
        }
    }
}
