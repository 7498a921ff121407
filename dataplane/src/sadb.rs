//! The SA database: outbound SAs by slot (protect rules carry the slot),
//! inbound SAs by SPI.
//!
//! Workers read an immutable snapshot ([`SaTable`]) through `arc-swap`: one
//! atomic load per burst, no lock, no reference-count traffic on the packet
//! path (the guard is a hazard pointer). Changes (install, replace, remove,
//! whole batches) build a new snapshot and publish it; SAs that did not change
//! are shared between the snapshots (`Arc`), so their sequence numbers, replay
//! windows and counters carry on untouched. A snapshot that workers may still
//! read is freed when its last reader lets go.
//!
//! Slots: each SA name gets a slot the first time a rule or an SA mentions it,
//! and keeps it for the life of the database, so the filter table (which maps
//! protect rules to slots) and the SAs can change independently. A slot without
//! an installed SA means "no SA yet": the packet is held or dropped, never sent
//! in plaintext.
//!
//! Inbound, rules name SAs by policy name (`SaParams::policy_name`: the SA's
//! name unless it has a `policy`), and several SAs may share one. A policy
//! name takes an inbound slot like an SA name (the namespaces are one, so an
//! SA without `policy` answers to its own name's slot); every inbound SA
//! carries the slot of its policy name (`Sa::policy`), and a decrypted packet
//! passes an inbound protect verdict that carries the same id.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use crate::filter::Direction;
use crate::sa::{Encap, Sa, SaParams};

/// A multiplicative hasher for SPIs: SPIs are random 32-bit numbers already,
/// and SipHash costs more than the rest of the lookup.
#[derive(Default)]
pub struct SpiHasher(u64);

impl Hasher for SpiHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8 | b as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u32(&mut self, v: u32) {
        let h = (v as u64 ^ 0x5bd1_e995).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        self.0 = h ^ (h >> 32);
    }
}

type SpiMap<V> = HashMap<u32, V, BuildHasherDefault<SpiHasher>>;

/// One immutable generation of the SA database, as the workers see it.
#[derive(Default)]
pub struct SaTable {
    /// Outbound SAs by slot.
    pub outbound: Vec<Option<Arc<Sa>>>,
    /// Inbound SAs by slot.
    pub inbound: Vec<Option<Arc<Sa>>>,
    /// Inbound SPI -> slot.
    spis: SpiMap<u32>,
    /// UDP ports inbound ESP-in-UDP arrives on (RFC 3948), for spotting it.
    pub udp_ports: Vec<u16>,
}

impl SaTable {
    /// The inbound SA with this SPI and its slot.
    #[inline]
    pub fn inbound_by_spi(&self, spi: u32) -> Option<(u32, &Arc<Sa>)> {
        let slot = *self.spis.get(&spi)?;
        self.inbound[slot as usize].as_ref().map(|sa| (slot, sa))
    }

    #[inline]
    pub fn outbound(&self, slot: u32) -> Option<&Arc<Sa>> {
        self.outbound.get(slot as usize)?.as_ref()
    }

    #[inline]
    pub fn inbound(&self, slot: u32) -> Option<&Arc<Sa>> {
        self.inbound.get(slot as usize)?.as_ref()
    }

    pub fn len(&self) -> usize {
        self.outbound.iter().flatten().count() + self.inbound.iter().flatten().count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Rebuilds the SPI index; refuses a table in which two inbound SAs share an SPI.
    fn rebuild_index(&mut self) -> Result<(), SadbError> {
        self.spis.clear();
        let mut ports = Vec::new();
        for (slot, sa) in self.inbound.iter().enumerate() {
            if let Some(sa) = sa {
                if let Some(other) = self.spis.insert(sa.params.spi, slot as u32) {
                    let other = self.inbound[other as usize]
                        .as_ref()
                        .map(|s| s.params.name.clone())
                        .unwrap_or_default();
                    return Err(SadbError::SpiInUse {
                        name: sa.params.name.clone(),
                        spi: sa.params.spi,
                        other,
                    });
                }
                if let Encap::Udp { dport, .. } = sa.params.encap {
                    ports.push(dport);
                }
            }
        }
        ports.sort_unstable();
        ports.dedup();
        self.udp_ports = ports;
        Ok(())
    }

    /// Every installed SA with its direction and slot, outbound first.
    pub fn iter(&self) -> impl Iterator<Item = (Direction, u32, &Arc<Sa>)> {
        fn list(
            d: Direction,
            v: &[Option<Arc<Sa>>],
        ) -> impl Iterator<Item = (Direction, u32, &Arc<Sa>)> {
            v.iter()
                .enumerate()
                .filter_map(move |(i, s)| s.as_ref().map(|s| (d, i as u32, s)))
        }
        list(Direction::Out, &self.outbound).chain(list(Direction::In, &self.inbound))
    }
}

/// A change to apply atomically with others.
#[derive(Debug, Clone)]
pub enum SaChange {
    /// Install, or replace the SA of the same name.
    Install(SaParams),
    /// Remove the SA of this name and direction.
    Remove { name: String, direction: Direction },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SadbError {
    #[error("SPI {spi:#010x} of `{name}` is already used by inbound SA `{other}`")]
    SpiInUse {
        name: String,
        spi: u32,
        other: String,
    },
    #[error("no {direction} SA is named `{name}`")]
    NoSuchSa {
        name: String,
        direction: &'static str,
    },
    #[error("SA `{name}`: {reason}")]
    Invalid { name: String, reason: String },
}

#[derive(Default)]
struct Slots {
    out: HashMap<String, u32>,
    inb: HashMap<String, u32>,
}

/// The SA database shared by the workers and whoever installs SAs.
pub struct Sadb {
    table: ArcSwap<SaTable>,
    /// Whether any inbound SA is installed (lets a rule-less inbound direction
    /// stay a plain wire only when no ESP can be for us).
    has_inbound: std::sync::atomic::AtomicBool,
    /// Serialises writers (the control path); readers never take it.
    slots: Mutex<Slots>,
    workers: usize,
    /// Replaced snapshots, kept so that the writer's thread frees them (see
    /// [`Sadb::reclaim`]) rather than a worker dropping the last reference.
    retired: Mutex<Vec<Arc<SaTable>>>,
}

impl Sadb {
    pub fn new(workers: usize) -> Sadb {
        Sadb {
            table: ArcSwap::from_pointee(SaTable::default()),
            has_inbound: std::sync::atomic::AtomicBool::new(false),
            slots: Mutex::new(Slots::default()),
            workers: workers.max(1),
            retired: Mutex::new(Vec::new()),
        }
    }

    /// Frees replaced snapshots no worker reads any more. `ArcSwap::store`
    /// turns every outstanding reader guard of the old snapshot into a counted
    /// reference before it returns, so a count of one means only this list
    /// holds it. Called by the writer's thread (control) now and then: freeing
    /// a table (and the SAs only it held, keys zeroed) never lands on a worker.
    pub fn reclaim(&self) -> usize {
        let mut r = self.retired.lock().unwrap_or_else(|e| e.into_inner());
        r.retain(|t| Arc::strong_count(t) > 1);
        r.len()
    }

    /// The slot of an SA name in a direction, if it has one (never assigns).
    pub fn find_slot(&self, name: &str, direction: Direction) -> Option<u32> {
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        match direction {
            Direction::Out => slots.out.get(name).copied(),
            Direction::In => slots.inb.get(name).copied(),
        }
    }

    /// The name a slot was given.
    pub fn slot_name(&self, slot: u32, direction: Direction) -> Option<String> {
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let map = match direction {
            Direction::Out => &slots.out,
            Direction::In => &slots.inb,
        };
        map.iter().find(|(_, &s)| s == slot).map(|(n, _)| n.clone())
    }

    #[cfg(test)]
    fn load_full_for_tests(&self) -> Arc<SaTable> {
        self.table.load_full()
    }

    /// The current snapshot (for workers: once per burst).
    #[inline]
    pub fn load(&self) -> arc_swap::Guard<Arc<SaTable>> {
        self.table.load()
    }

    #[inline]
    pub fn has_inbound(&self) -> bool {
        self.has_inbound.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The slot of an SA name in a direction, assigned on first use.
    pub fn slot(&self, name: &str, direction: Direction) -> u32 {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        Self::slot_in(&mut slots, name, direction)
    }

    fn slot_in(slots: &mut Slots, name: &str, direction: Direction) -> u32 {
        let map = match direction {
            Direction::Out => &mut slots.out,
            Direction::In => &mut slots.inb,
        };
        let next = map.len() as u32;
        *map.entry(name.to_string()).or_insert(next)
    }

    /// Applies `changes` as one step: workers see all of them or none.
    /// Unchanged SAs keep their state; a replaced SA starts afresh.
    pub fn apply(&self, changes: Vec<SaChange>) -> Result<(), SadbError> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let cur = self.table.load_full();
        let mut next = SaTable {
            outbound: cur.outbound.clone(),
            inbound: cur.inbound.clone(),
            ..Default::default()
        };
        for change in changes {
            match change {
                SaChange::Install(params) => {
                    let slot = Self::slot_in(&mut slots, &params.name, params.direction) as usize;
                    let list = match params.direction {
                        Direction::Out => &mut next.outbound,
                        Direction::In => &mut next.inbound,
                    };
                    if list.len() <= slot {
                        list.resize(slot + 1, None);
                    }
                    if list[slot].as_ref().is_some_and(|old| old.params == params) {
                        continue; // the same SA: keep it and its state
                    }
                    let name = params.name.clone();
                    // Inbound rules name the SA by its policy name: the SA
                    // carries that name's inbound slot, which rules resolve to.
                    let policy = match params.direction {
                        Direction::In => {
                            Self::slot_in(&mut slots, params.policy_name(), Direction::In)
                        }
                        Direction::Out => slot as u32,
                    };
                    let mut sa = Sa::new(params, slot % self.workers)
                        .map_err(|reason| SadbError::Invalid { name, reason })?;
                    sa.policy = policy;
                    let list = match sa.params.direction {
                        Direction::Out => &mut next.outbound,
                        Direction::In => &mut next.inbound,
                    };
                    list[slot] = Some(Arc::new(sa));
                }
                SaChange::Remove { name, direction } => {
                    let (map, list) = match direction {
                        Direction::Out => (&slots.out, &mut next.outbound),
                        Direction::In => (&slots.inb, &mut next.inbound),
                    };
                    let slot = map
                        .get(&name)
                        .copied()
                        .filter(|&s| list.get(s as usize).is_some_and(|x| x.is_some()));
                    match slot {
                        Some(s) => list[s as usize] = None,
                        None => {
                            return Err(SadbError::NoSuchSa {
                                name,
                                direction: direction.as_str(),
                            })
                        }
                    }
                }
            }
        }
        // SPIs are checked on the result, so a batch may move an SPI from one
        // SA to another (remove, or replace, and install together).
        next.rebuild_index()?;
        let inbound = next.inbound.iter().any(|s| s.is_some());
        self.table.store(Arc::new(next));
        self.has_inbound
            .store(inbound, std::sync::atomic::Ordering::Relaxed);
        self.retired
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(cur);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sa::{AeadAlg, Limits, Mode};
    use zeroize::Zeroizing;

    fn params(name: &str, direction: Direction, spi: u32) -> SaParams {
        SaParams {
            name: name.into(),
            direction,
            spi,
            mode: Mode::Transport,
            encap: Encap::None,
            alg: AeadAlg::Aes128Gcm16,
            key_material: Zeroizing::new(vec![7; 20]),
            esn: true,
            replay_window: 64,
            lifetime_packets: Limits::default(),
            lifetime_bytes: Limits::default(),
            policy: None,
        }
    }

    #[test]
    fn install_replace_remove_keep_unrelated_state() {
        let db = Sadb::new(2);
        let slot_a = db.slot("a", Direction::Out);
        db.apply(vec![
            SaChange::Install(params("a", Direction::Out, 0x1000)),
            SaChange::Install(params("b", Direction::In, 0x2000)),
            SaChange::Install(params("c", Direction::In, 0x3000)),
        ])
        .unwrap();
        let t = db.load();
        let a = t.outbound(slot_a).unwrap().clone();
        assert_eq!(a.next_seq(), Some(1));
        let (slot_b, b) = t.inbound_by_spi(0x2000).unwrap();
        assert_eq!(b.params.name, "b");
        drop(t);

        // Re-installing identical parameters keeps the live SA (its sequence number).
        db.apply(vec![SaChange::Install(params("a", Direction::Out, 0x1000))])
            .unwrap();
        assert!(Arc::ptr_eq(db.load().outbound(slot_a).unwrap(), &a));
        // Replacing c does not touch b.
        let b_before = db.load().inbound(slot_b).unwrap().clone();
        db.apply(vec![SaChange::Install(params("c", Direction::In, 0x3001))])
            .unwrap();
        assert!(Arc::ptr_eq(db.load().inbound(slot_b).unwrap(), &b_before));
        assert!(db.load().inbound_by_spi(0x3000).is_none());
        assert!(db.load().inbound_by_spi(0x3001).is_some());
        // A duplicate inbound SPI is refused and nothing changes.
        let e = db
            .apply(vec![SaChange::Install(params("d", Direction::In, 0x2000))])
            .unwrap_err();
        assert!(matches!(e, SadbError::SpiInUse { .. }));
        assert!(db
            .load()
            .inbound_by_spi(0x2000)
            .is_some_and(|(_, s)| s.params.name == "b"));
        // Remove.
        db.apply(vec![SaChange::Remove {
            name: "a".into(),
            direction: Direction::Out,
        }])
        .unwrap();
        assert!(db.load().outbound(slot_a).is_none());
        assert_eq!(db.slot("a", Direction::Out), slot_a, "slots are stable");
        assert!(db
            .apply(vec![SaChange::Remove {
                name: "a".into(),
                direction: Direction::Out
            }])
            .is_err());
    }

    #[test]
    fn an_spi_may_move_between_sas_in_one_batch_and_old_tables_are_reclaimed() {
        let db = Sadb::new(1);
        db.apply(vec![SaChange::Install(params("a", Direction::In, 0x7000))])
            .unwrap();
        let reader = db.load_full_for_tests();
        db.apply(vec![
            SaChange::Remove {
                name: "a".into(),
                direction: Direction::In,
            },
            SaChange::Install(params("b", Direction::In, 0x7000)),
        ])
        .unwrap();
        assert_eq!(db.load().inbound_by_spi(0x7000).unwrap().1.params.name, "b");
        // Two SAs swapping SPIs: only the result is checked.
        db.apply(vec![SaChange::Install(params("c", Direction::In, 0x7001))])
            .unwrap();
        db.apply(vec![
            SaChange::Install(params("b", Direction::In, 0x7001)),
            SaChange::Install(params("c", Direction::In, 0x7000)),
        ])
        .unwrap();
        assert_eq!(db.load().inbound_by_spi(0x7000).unwrap().1.params.name, "c");
        // A reader still holds the first table: it stays until let go.
        assert_eq!(db.reclaim(), 1);
        drop(reader);
        assert_eq!(db.reclaim(), 0);
    }

    #[test]
    fn readers_never_block_while_writers_publish() {
        let db = Arc::new(Sadb::new(1));
        db.apply(vec![SaChange::Install(params(
            "keep",
            Direction::In,
            0x9000,
        ))])
        .unwrap();
        let reader = {
            let db = db.clone();
            std::thread::spawn(move || {
                let mut seen = 0u64;
                for _ in 0..200_000 {
                    let t = db.load();
                    // The unrelated SA is there in every snapshot.
                    assert!(t.inbound_by_spi(0x9000).is_some());
                    seen += t.len() as u64;
                }
                seen
            })
        };
        for i in 0..2000u32 {
            db.apply(vec![SaChange::Install(params(
                &format!("x{}", i % 50),
                Direction::In,
                0x10000 + i,
            ))])
            .unwrap();
        }
        assert!(reader.join().unwrap() > 0);
    }
}
