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
//! Slots and ids: each SA name gets an id the first time a rule or an SA
//! mentions it, so the filter table (which maps protect rules to ids) and the
//! SAs can change independently. An id without an installed SA means "no SA
//! yet": the packet is held or dropped, never sent in plaintext.
//!
//! An id is a slot index (low [`INDEX_BITS`] bits: the position in
//! `SaTable::outbound/inbound`) and a generation (the high bits). Every `Sa`
//! stores its id, and a lookup returns the SA only if the id matches, so an id
//! from before its name was unbound (in a worker's inbox, a held packet, an SA
//! event) reads as "no SA" once the slot serves another name. After every
//! `Apply` the control thread unbinds the names nothing uses any more
//! ([`Sadb::unbind_unused`]); their slots come back into use, with the next
//! generation, first in first out, and only once every table retired before
//! they were freed is gone ([`Sadb::reclaim`]).
//!
//! Inbound, rules name SAs by policy name (`SaParams::policy_name`: the SA's
//! name unless it has a `policy`), and several SAs may share one. A policy
//! name takes an inbound slot like an SA name (the namespaces are one, so an
//! SA without `policy` answers to its own name's slot); every inbound SA
//! carries the slot of its policy name (`Sa::policy`), and a decrypted packet
//! passes an inbound protect verdict that carries the same id.

use std::any::Any;
use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Arc, Mutex, Weak};

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

/// SPI -> SA id, in copy-on-write shards: a new table generation shares
/// every shard its batch did not touch, so an Apply of a few SAs copies a
/// few kilobytes, not the whole index (at 1 000 000 SAs a whole copy was
/// about 10 MB, a millisecond per Apply, which capped rekeys at ~1000 Applies/s).
/// One shard while small (one more pointer hop than a plain map); more, of
/// about [`SPI_SHARD_TARGET`] entries each, as it grows.
#[derive(Clone)]
pub struct SpiIndex {
    shards: Vec<Arc<SpiMap<u32>>>,
    /// 32 - log2(shards.len()): a shard is the top bits of the SPI's hash.
    shift: u32,
    len: usize,
}

/// Entries per shard the index aims at (it re-shards 4x when above twice this).
const SPI_SHARD_TARGET: usize = 2048;
/// At most 2^10 shards.
const SPI_MAX_SHARD_BITS: u32 = 10;

impl Default for SpiIndex {
    fn default() -> SpiIndex {
        SpiIndex {
            shards: vec![Arc::default()],
            shift: 32,
            len: 0,
        }
    }
}

impl SpiIndex {
    #[inline]
    fn shard(&self, spi: u32) -> usize {
        // Fibonacci hashing: sequential SPIs spread over every shard, and the
        // bits chosen are independent of the ones SpiHasher gives the map.
        ((spi.wrapping_mul(0x9E37_79B1) as u64) >> self.shift) as usize
    }

    #[inline]
    pub fn get(&self, spi: &u32) -> Option<&u32> {
        self.shards[self.shard(*spi)].get(spi)
    }

    pub fn insert(&mut self, spi: u32, id: u32) -> Option<u32> {
        let i = self.shard(spi);
        let old = Arc::make_mut(&mut self.shards[i]).insert(spi, id);
        if old.is_none() {
            self.len += 1;
            if self.len > 2 * SPI_SHARD_TARGET * self.shards.len()
                && 32 - self.shift < SPI_MAX_SHARD_BITS
            {
                self.reshard((32 - self.shift + 2).min(SPI_MAX_SHARD_BITS));
            }
        }
        old
    }

    pub fn remove(&mut self, spi: &u32) -> Option<u32> {
        let i = self.shard(*spi);
        if !self.shards[i].contains_key(spi) {
            return None; // the shard stays shared
        }
        let old = Arc::make_mut(&mut self.shards[i]).remove(spi);
        self.len -= old.is_some() as usize;
        old
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Spreads the entries over 2^bits shards (a whole copy, rare: the
    /// index grows 4x between two).
    fn reshard(&mut self, bits: u32) {
        let mut next = SpiIndex {
            shards: Vec::new(),
            shift: 32 - bits,
            len: self.len,
        };
        let mut maps: Vec<SpiMap<u32>> = (0..1usize << bits)
            .map(|_| SpiMap::with_capacity_and_hasher(self.len >> bits, Default::default()))
            .collect();
        for shard in &self.shards {
            for (&spi, &id) in shard.iter() {
                maps[next.shard(spi)].insert(spi, id);
            }
        }
        next.shards = maps.into_iter().map(Arc::new).collect();
        *self = next;
    }
}

/// The control thread's maps of names and ids: the keys come from the
/// control process (trusted), so a fast hash; SipHash was a tenth of an
/// install's time.
pub type FastMap<K, V> = HashMap<K, V, rustc_hash::FxBuildHasher>;
pub type FastSet<K> = HashSet<K, rustc_hash::FxBuildHasher>;

/// Bits of an SA id that give the slot index; the rest is the generation.
pub const INDEX_BITS: u32 = 20;
/// The index part of an id.
pub const INDEX_MASK: u32 = (1 << INDEX_BITS) - 1;
/// An id no SA ever has (its index, `INDEX_MASK`, is never handed out): a
/// rule naming an SA when every slot is taken resolves to it and finds none.
pub const NO_ID: u32 = u32::MAX;

/// The slot index of an id.
#[inline]
pub fn index_of(id: u32) -> usize {
    (id & INDEX_MASK) as usize
}

/// The same slot, next generation (wrapping within the generation bits).
fn next_generation(id: u32) -> u32 {
    let generation = (id >> INDEX_BITS).wrapping_add(1) & (u32::MAX >> INDEX_BITS);
    generation << INDEX_BITS | (id & INDEX_MASK)
}

/// Slots per chunk of a [`SlotList`] (log2).
const CHUNK_BITS: u32 = 10;
const CHUNK: usize = 1 << CHUNK_BITS;

/// SA slots in chunks of 1024 shared between snapshots: a new snapshot
/// copies the chunk pointers, and a batch copies only the chunks it changes
/// (copy on write), so publishing costs the batch, not the table.
#[derive(Clone, Default)]
pub struct SlotList {
    chunks: Vec<Arc<Vec<Option<Arc<Sa>>>>>,
    len: usize,
}

impl SlotList {
    /// The slot `i`, if the list is that long.
    #[inline]
    pub fn get(&self, i: usize) -> Option<&Option<Arc<Sa>>> {
        if i >= self.len {
            return None;
        }
        self.chunks
            .get(i >> CHUNK_BITS)
            .map(|c| &c[i & (CHUNK - 1)])
    }

    /// Slots, installed or not.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Every slot in order.
    pub fn iter(&self) -> impl Iterator<Item = &Option<Arc<Sa>>> {
        self.chunks.iter().flat_map(|c| c.iter()).take(self.len)
    }

    /// Grows the list to at least `n` slots.
    fn grow(&mut self, n: usize) {
        while self.chunks.len() * CHUNK < n {
            self.chunks.push(Arc::new(vec![None; CHUNK]));
        }
        self.len = self.len.max(n);
    }

    /// Slot `i` (below `len`) for writing: its chunk is copied first if
    /// another snapshot shares it.
    fn slot_mut(&mut self, i: usize) -> &mut Option<Arc<Sa>> {
        &mut Arc::make_mut(&mut self.chunks[i >> CHUNK_BITS])[i & (CHUNK - 1)]
    }
}

/// One immutable generation of the SA database, as the workers see it.
#[derive(Default)]
pub struct SaTable {
    /// Outbound SAs by slot.
    pub outbound: SlotList,
    /// Inbound SAs by slot.
    pub inbound: SlotList,
    /// Inbound SPI -> id.
    spis: SpiIndex,
    /// Outbound SPI -> id (SPIs are unique per direction).
    out_spis: SpiIndex,
    /// The UDP ports of inbound ESP-in-UDP SAs and how many SAs use each.
    udp_refs: Vec<(u16, u32)>,
    /// UDP ports inbound ESP-in-UDP arrives on (RFC 3948), for spotting it.
    pub udp_ports: Vec<u16>,
}

impl SaTable {
    /// The inbound SA with this SPI and its id. (The index is built from
    /// this table's SAs and their ids: no generation check needed.)
    #[inline]
    pub fn inbound_by_spi(&self, spi: u32) -> Option<(u32, &Arc<Sa>)> {
        let id = *self.spis.get(&spi)?;
        self.inbound.get(index_of(id))?.as_ref().map(|sa| (id, sa))
    }

    /// The outbound SA with this id: none when the slot is empty or holds an
    /// SA of another generation (the id is stale).
    #[inline]
    pub fn outbound(&self, id: u32) -> Option<&Arc<Sa>> {
        self.outbound
            .get(index_of(id))?
            .as_ref()
            .filter(|sa| sa.id == id)
    }

    /// The inbound SA with this id (as [`SaTable::outbound`]).
    #[inline]
    pub fn inbound(&self, id: u32) -> Option<&Arc<Sa>> {
        self.inbound
            .get(index_of(id))?
            .as_ref()
            .filter(|sa| sa.id == id)
    }

    /// Slots per direction (outbound, inbound): the length of the tables,
    /// installed or not.
    pub fn slots(&self) -> (usize, usize) {
        (self.outbound.len(), self.inbound.len())
    }

    pub fn len(&self) -> usize {
        self.outbound.iter().flatten().count() + self.inbound.iter().flatten().count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The SA of a direction with this SPI.
    pub fn by_spi(&self, direction: Direction, spi: u32) -> Option<&Arc<Sa>> {
        match direction {
            Direction::In => self.inbound_by_spi(spi).map(|(_, sa)| sa),
            Direction::Out => {
                let id = *self.out_spis.get(&spi)?;
                self.outbound(id)
            }
        }
    }

    /// The SA of a direction with this id (as [`SaTable::outbound`]).
    pub fn get(&self, direction: Direction, id: u32) -> Option<&Arc<Sa>> {
        match direction {
            Direction::Out => self.outbound(id),
            Direction::In => self.inbound(id),
        }
    }

    fn list_mut(&mut self, direction: Direction) -> &mut SlotList {
        match direction {
            Direction::Out => &mut self.outbound,
            Direction::In => &mut self.inbound,
        }
    }

    fn spi_map(&self, direction: Direction) -> &SpiIndex {
        match direction {
            Direction::Out => &self.out_spis,
            Direction::In => &self.spis,
        }
    }

    /// Takes an SA (leaving its slot) out of the indexes.
    fn unindex(&mut self, sa: &Sa) {
        let map = match sa.params.direction {
            Direction::Out => &mut self.out_spis,
            Direction::In => &mut self.spis,
        };
        if map.get(&sa.params.spi) == Some(&sa.id) {
            map.remove(&sa.params.spi);
        }
        if let (Direction::In, Encap::Udp { dport, .. }) = (sa.params.direction, sa.params.encap) {
            if let Some(i) = self.udp_refs.iter().position(|(p, _)| *p == dport) {
                self.udp_refs[i].1 -= 1;
                if self.udp_refs[i].1 == 0 {
                    self.udp_refs.swap_remove(i);
                }
            }
        }
    }

    /// Puts an SA (entering its slot) into the indexes; returns the id of
    /// another SA the SPI pointed to, if any (a conflict unless that SA goes
    /// or changes its SPI in the same batch).
    fn index(&mut self, sa: &Sa) -> Option<u32> {
        let map = match sa.params.direction {
            Direction::Out => &mut self.out_spis,
            Direction::In => &mut self.spis,
        };
        let displaced = map.insert(sa.params.spi, sa.id).filter(|&o| o != sa.id);
        if let (Direction::In, Encap::Udp { dport, .. }) = (sa.params.direction, sa.params.encap) {
            match self.udp_refs.iter_mut().find(|(p, _)| *p == dport) {
                Some(r) => r.1 += 1,
                None => self.udp_refs.push((dport, 1)),
            }
        }
        displaced
    }

    /// Every installed SA with its direction and id, outbound first.
    pub fn iter(&self) -> impl Iterator<Item = (Direction, u32, &Arc<Sa>)> {
        fn list(d: Direction, v: &SlotList) -> impl Iterator<Item = (Direction, u32, &Arc<Sa>)> {
            v.iter()
                .filter_map(move |s| s.as_ref().map(|s| (d, s.id, s)))
        }
        list(Direction::Out, &self.outbound).chain(list(Direction::In, &self.inbound))
    }
}

/// The SA names the protect rules of the filter table give.
pub trait NamedByRules {
    fn named(&self, name: &str, direction: Direction) -> bool;
}

impl NamedByRules for HashSet<(&str, Direction)> {
    fn named(&self, name: &str, direction: Direction) -> bool {
        self.contains(&(name, direction))
    }
}

/// Outbound names, inbound names.
impl NamedByRules for [HashSet<String>; 2] {
    fn named(&self, name: &str, direction: Direction) -> bool {
        self[(direction == Direction::In) as usize].contains(name)
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

/// The names of one direction and their ids.
#[derive(Default)]
struct Names {
    map: FastMap<String, u32>,
    /// The first index never handed out.
    next: u32,
    /// Ids (next generation of a freed slot) ready for use, oldest first.
    free: VecDeque<u32>,
    /// Names that may have fallen out of use since the last
    /// [`Sadb::unbind_unused`] (bound since, or named by an SA that was
    /// removed or replaced since, or kept then by a rule only): what it
    /// looks at, so that it costs the changes, not the table.
    candidates: Vec<String>,
}

impl Names {
    /// The id of `name`, bound now if it has none; None when every slot is taken.
    fn bind(&mut self, name: &str) -> Option<u32> {
        if let Some(&id) = self.map.get(name) {
            return Some(id);
        }
        let id = match self.free.pop_front() {
            Some(id) => id,
            None if self.next < INDEX_MASK => {
                self.next += 1;
                self.next - 1
            }
            None => return None,
        };
        self.map.insert(name.to_string(), id);
        self.candidates.push(name.to_string());
        Some(id)
    }
}

/// Slots freed by one [`Sadb::unbind_unused`], waiting until the tables that
/// were retired when they were freed are gone.
struct Quarantine {
    /// (direction, the id the slot gets next).
    ids: Vec<(Direction, u32)>,
    tables: Vec<Weak<SaTable>>,
    others: Vec<Weak<dyn Any + Send + Sync>>,
}

impl Quarantine {
    fn over(&self) -> bool {
        self.tables.iter().all(|w| w.strong_count() == 0)
            && self.others.iter().all(|w| w.strong_count() == 0)
    }
}

#[derive(Default)]
struct Slots {
    out: Names,
    inb: Names,
    waiting: VecDeque<Quarantine>,
    /// Inbound policy id -> how many installed inbound SAs carry it.
    policy_refs: FastMap<u32, u32>,
}

/// How the slots are used, for statistics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SlotUse {
    /// Names with an id (outbound + inbound).
    pub bound: usize,
    /// Slots ready for reuse.
    pub free: usize,
    /// Slots freed but waiting for old tables to go.
    pub waiting: usize,
    /// Length of the SA tables (outbound + inbound).
    pub table_slots: usize,
}

/// A name that [`Sadb::unbind_unused`] unbound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unbound {
    pub name: String,
    pub direction: Direction,
    /// The id it had.
    pub id: u32,
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
    ///
    /// Then freed slots whose quarantine is over (every table retired before
    /// they were freed is gone: SA snapshots here, and the other tables the
    /// caller named, filter tables, which the caller frees before calling
    /// this) become free for reuse, oldest first.
    pub fn reclaim(&self) -> usize {
        let mut r = self.retired.lock().unwrap_or_else(|e| e.into_inner());
        r.retain(|t| Arc::strong_count(t) > 1);
        let left = r.len();
        drop(r);
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        while slots.waiting.front().is_some_and(|q| q.over()) {
            let q = slots.waiting.pop_front().expect("front checked");
            for (d, id) in q.ids {
                match d {
                    Direction::Out => slots.out.free.push_back(id),
                    Direction::In => slots.inb.free.push_back(id),
                }
            }
        }
        left
    }

    /// Unbinds the names nothing uses any more: no installed SA has them as
    /// its name or (inbound) policy name, and `rule_names` (the SA names the
    /// protect rules of the current filter table give, with their direction)
    /// does not list them. Only names that may have fallen out of use since
    /// the last call are looked at (bound since, named by an SA removed or
    /// replaced since, or kept last time by `rule_names` alone), so the cost
    /// follows the changes, not the number of SAs. Their slots are free for reuse, with the next
    /// generation, once the SA snapshots retired so far and `retired` (the
    /// caller's retired tables that may still mention the old ids, filter
    /// tables) are all gone. Returns what it unbound.
    pub fn unbind_unused(
        &self,
        rule_names: &(impl NamedByRules + ?Sized),
        retired: &[Weak<dyn Any + Send + Sync>],
    ) -> Vec<Unbound> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let table = self.table.load();
        let slots = &mut *slots;
        let mut gone = Vec::new();
        for d in [Direction::Out, Direction::In] {
            let names = match d {
                Direction::Out => &mut slots.out,
                Direction::In => &mut slots.inb,
            };
            let mut kept_by_rules = Vec::new();
            for name in std::mem::take(&mut names.candidates) {
                let Some(&id) = names.map.get(&name) else {
                    continue; // unbound already (listed twice)
                };
                let by_sa = table.get(d, id).is_some()
                    || (d == Direction::In && slots.policy_refs.get(&id).is_some_and(|&n| n > 0));
                if by_sa {
                    continue; // its SA's removal lists it again
                }
                if rule_names.named(&name, d) {
                    kept_by_rules.push(name); // the rules may change: look again next time
                    continue;
                }
                names.map.remove(&name);
                gone.push(Unbound {
                    name,
                    direction: d,
                    id,
                });
            }
            names.candidates = kept_by_rules;
        }
        drop(table);
        if !gone.is_empty() {
            let tables = self
                .retired
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .map(Arc::downgrade)
                .collect();
            slots.waiting.push_back(Quarantine {
                ids: gone
                    .iter()
                    .map(|u| (u.direction, next_generation(u.id)))
                    .collect(),
                tables,
                others: retired.to_vec(),
            });
        }
        gone
    }

    /// How the slots are used.
    pub fn slot_use(&self) -> SlotUse {
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let (o, i) = self.table.load().slots();
        SlotUse {
            bound: slots.out.map.len() + slots.inb.map.len(),
            free: slots.out.free.len() + slots.inb.free.len(),
            waiting: slots.waiting.iter().map(|q| q.ids.len()).sum(),
            table_slots: o + i,
        }
    }

    /// The id of an SA name in a direction, if it has one (never assigns).
    pub fn find_slot(&self, name: &str, direction: Direction) -> Option<u32> {
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        match direction {
            Direction::Out => slots.out.map.get(name).copied(),
            Direction::In => slots.inb.map.get(name).copied(),
        }
    }

    /// The name an id was given, while it is bound.
    pub fn slot_name(&self, id: u32, direction: Direction) -> Option<String> {
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let names = match direction {
            Direction::Out => &slots.out,
            Direction::In => &slots.inb,
        };
        names
            .map
            .iter()
            .find(|(_, &s)| s == id)
            .map(|(n, _)| n.clone())
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

    /// The id of an SA name in a direction, bound on first use; [`NO_ID`]
    /// (no SA, ever) when every slot is taken.
    pub fn slot(&self, name: &str, direction: Direction) -> u32 {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        Self::slot_in(&mut slots, name, direction).unwrap_or(NO_ID)
    }

    fn slot_in(slots: &mut Slots, name: &str, direction: Direction) -> Option<u32> {
        match direction {
            Direction::Out => slots.out.bind(name),
            Direction::In => slots.inb.bind(name),
        }
    }

    fn slot_or_err(slots: &mut Slots, name: &str, direction: Direction) -> Result<u32, SadbError> {
        Self::slot_in(slots, name, direction).ok_or_else(|| SadbError::Invalid {
            name: name.to_string(),
            reason: format!(
                "no SA slot is free ({INDEX_MASK} {} names in use)",
                direction.as_str()
            ),
        })
    }

    /// Applies `changes` as one step: workers see all of them or none.
    /// Unchanged SAs keep their state; a replaced SA starts afresh.
    ///
    /// Costs the batch, not the table: the snapshot's slot lists are copied
    /// (pointers), its SPI indexes are copied and updated change by change,
    /// never rebuilt.
    pub fn apply(&self, changes: Vec<SaChange>) -> Result<(), SadbError> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let cur = self.table.load_full();
        let mut next = SaTable {
            outbound: cur.outbound.clone(),
            inbound: cur.inbound.clone(),
            spis: cur.spis.clone(),
            out_spis: cur.out_spis.clone(),
            udp_refs: cur.udp_refs.clone(),
            udp_ports: Vec::new(),
        };
        // SPIs an installed SA took from another SA: checked on the result.
        let mut displaced: Vec<(Direction, u32, u32)> = Vec::new();
        // Changes to `policy_refs`, kept only if the batch is accepted.
        let mut refs: FastMap<u32, i64> = FastMap::default();
        let gone = |slots: &mut Slots, old: &Sa, refs: &mut FastMap<u32, i64>| {
            let d = old.params.direction;
            let names = match d {
                Direction::Out => &mut slots.out,
                Direction::In => &mut slots.inb,
            };
            names.candidates.push(old.params.name.clone());
            if d == Direction::In {
                *refs.entry(old.policy).or_default() -= 1;
                if old.params.policy.is_some() {
                    names.candidates.push(old.params.policy_name().to_string());
                }
            }
        };
        for change in changes {
            match change {
                SaChange::Install(params) => {
                    let d = params.direction;
                    let id = Self::slot_or_err(&mut slots, &params.name, d)?;
                    let slot = index_of(id);
                    let list = next.list_mut(d);
                    list.grow(slot + 1);
                    if list
                        .get(slot)
                        .and_then(|x| x.as_ref())
                        .is_some_and(|old| old.id == id && old.params == params)
                    {
                        continue; // the same SA: keep it and its state
                    }
                    let name = params.name.clone();
                    // Inbound rules name the SA by its policy name: the SA
                    // carries that name's inbound id, which rules resolve to.
                    let policy = match d {
                        Direction::In => {
                            Self::slot_or_err(&mut slots, params.policy_name(), Direction::In)?
                        }
                        Direction::Out => id,
                    };
                    let mut sa = Sa::new(params, slot % self.workers)
                        .map_err(|reason| SadbError::Invalid { name, reason })?;
                    sa.id = id;
                    sa.policy = policy;
                    if let Some(old) = next.list_mut(d).slot_mut(slot).take() {
                        next.unindex(&old);
                        gone(&mut slots, &old, &mut refs);
                    }
                    if let Some(other) = next.index(&sa) {
                        displaced.push((d, sa.params.spi, other));
                    }
                    if d == Direction::In {
                        *refs.entry(policy).or_default() += 1;
                    }
                    *next.list_mut(d).slot_mut(slot) = Some(Arc::new(sa));
                }
                SaChange::Remove { name, direction } => {
                    let map = match direction {
                        Direction::Out => &slots.out.map,
                        Direction::In => &slots.inb.map,
                    };
                    let old = map.get(&name).map(|&id| index_of(id)).and_then(|s| {
                        let list = next.list_mut(direction);
                        list.get(s)?.as_ref()?;
                        list.slot_mut(s).take()
                    });
                    match old {
                        Some(old) => {
                            next.unindex(&old);
                            gone(&mut slots, &old, &mut refs);
                        }
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
        // SA to another (remove, or replace, and install together): an SA
        // that lost its SPI's index entry and still has that SPI shares it.
        for (d, spi, other) in displaced {
            let Some(o) = next.get(d, other) else {
                continue;
            };
            let holder = next.spi_map(d).get(&spi).copied();
            if o.params.spi == spi && holder != Some(other) {
                let name = holder
                    .and_then(|h| next.get(d, h))
                    .map(|s| s.params.name.clone())
                    .unwrap_or_default();
                return Err(SadbError::SpiInUse {
                    name,
                    spi,
                    other: o.params.name.clone(),
                });
            }
        }
        let mut ports: Vec<u16> = next.udp_refs.iter().map(|(p, _)| *p).collect();
        ports.sort_unstable();
        next.udp_ports = ports;
        for (policy, delta) in refs {
            let n = slots.policy_refs.entry(policy).or_default();
            *n = (*n as i64 + delta).max(0) as u32;
            if *n == 0 {
                slots.policy_refs.remove(&policy);
            }
        }
        let inbound = !next.spis.is_empty();
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

    /// The sharded index against a plain map, through growth (re-sharding)
    /// and removals; a copy shares the shards a change did not touch.
    #[test]
    fn spi_index_matches_a_map_and_copies_only_what_changes() {
        let mut index = SpiIndex::default();
        let mut model: HashMap<u32, u32> = HashMap::new();
        // A small deterministic generator: SPIs random-ish, some repeated.
        let mut x = 0x1234_5678u32;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x
        };
        for round in 0..200_000u32 {
            let spi = next() % 150_000 + 256;
            if round % 5 == 4 {
                assert_eq!(index.remove(&spi), model.remove(&spi), "remove {spi}");
            } else {
                assert_eq!(
                    index.insert(spi, round),
                    model.insert(spi, round),
                    "insert {spi}"
                );
            }
            assert_eq!(index.len(), model.len());
        }
        assert!(
            index.shards.len() > 1,
            "grown into shards: {}",
            index.shards.len()
        );
        for (spi, id) in &model {
            assert_eq!(index.get(spi), Some(id));
        }
        let total: usize = index.shards.iter().map(|s| s.len()).sum();
        assert_eq!(total, model.len());
        assert_eq!(index.get(&7), None);

        let before = index.clone();
        let spi = *model.keys().next().unwrap();
        index.insert(spi, 1);
        index.remove(&7); // absent: nothing copied
        let copied = (index.shards.iter())
            .zip(&before.shards)
            .filter(|(a, b)| !Arc::ptr_eq(a, b))
            .count();
        assert_eq!(copied, 1, "one change, one shard copied");
        assert_eq!(
            before.get(&spi),
            model.get(&spi),
            "the old generation is unchanged"
        );
    }

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

    fn no_rules() -> HashSet<(&'static str, Direction)> {
        HashSet::new()
    }

    fn remove(name: &str, direction: Direction) -> SaChange {
        SaChange::Remove {
            name: name.into(),
            direction,
        }
    }

    #[test]
    fn a_removed_name_is_unbound_and_its_slot_reused_with_the_next_generation() {
        let db = Sadb::new(2);
        db.apply(vec![
            SaChange::Install(params("keep", Direction::Out, 0x10)),
            SaChange::Install(params("old", Direction::Out, 0x11)),
        ])
        .unwrap();
        let old = db.find_slot("old", Direction::Out).unwrap();
        assert_eq!(old >> INDEX_BITS, 0, "first generation");
        // A rule names `ruled` (no SA): it keeps its id.
        let ruled = db.slot("ruled", Direction::Out);
        db.apply(vec![remove("old", Direction::Out)]).unwrap();
        let rules: HashSet<(&str, Direction)> = [("ruled", Direction::Out)].into();
        let gone = db.unbind_unused(&rules, &[]);
        assert_eq!(
            gone,
            vec![Unbound {
                name: "old".into(),
                direction: Direction::Out,
                id: old
            }]
        );
        assert_eq!(db.find_slot("old", Direction::Out), None);
        assert_eq!(db.find_slot("ruled", Direction::Out), Some(ruled));
        assert!(db.find_slot("keep", Direction::Out).is_some());
        assert_eq!(db.slot_use().waiting, 1);
        // Nobody reads the retired tables: the slot is free at the next reclaim.
        db.reclaim();
        assert_eq!(db.slot_use().free, 1);
        db.apply(vec![SaChange::Install(params("new", Direction::Out, 0x12))])
            .unwrap();
        let new = db.find_slot("new", Direction::Out).unwrap();
        assert_eq!(index_of(new), index_of(old), "the index is reused");
        assert_eq!(new >> INDEX_BITS, 1, "with the next generation");
        let t = db.load();
        // An id from before (a job in an inbox, a held packet, an SA event)
        // finds no SA, though the slot holds one again.
        assert!(t.outbound(old).is_none());
        assert_eq!(t.outbound(new).unwrap().params.name, "new");
        assert_eq!(t.outbound(new).unwrap().id, new);
        assert_eq!(t.slots().0, 2, "the table did not grow");
        // Same slot, same owner worker.
        assert_eq!(t.outbound(new).unwrap().owner, index_of(old) % 2);
    }

    #[test]
    fn inbound_policy_names_stay_bound_while_an_sa_or_a_rule_uses_them() {
        let db = Sadb::new(1);
        let mut a = params("c/1", Direction::In, 0x100);
        a.policy = Some("p".into());
        db.apply(vec![SaChange::Install(a)]).unwrap();
        let p = db.find_slot("p", Direction::In).unwrap();
        let first = db.find_slot("c/1", Direction::In).unwrap();
        // Rekeys: a new SA of the same policy, the old one removed, the names unbound.
        for i in 2..50u32 {
            let mut b = params(&format!("c/{i}"), Direction::In, 0x100 + i);
            b.policy = Some("p".into());
            db.apply(vec![SaChange::Install(b)]).unwrap();
            db.apply(vec![remove(&format!("c/{}", i - 1), Direction::In)])
                .unwrap();
            let gone = db.unbind_unused(&no_rules(), &[]);
            assert_eq!(gone.len(), 1);
            assert_eq!(gone[0].name, format!("c/{}", i - 1));
            db.reclaim();
            // The policy name keeps its id, so every SA passes the same rules.
            assert_eq!(db.find_slot("p", Direction::In), Some(p));
            let (id, sa) = db
                .load()
                .inbound_by_spi(0x100 + i)
                .map(|(id, sa)| (id, sa.policy))
                .unwrap();
            assert_eq!(sa, p);
            assert_eq!(db.load().inbound(id).unwrap().params.spi, 0x100 + i);
        }
        // The first SA's index serves a later name now: a handed-off packet
        // or an SA event still carrying the first id finds no SA.
        let t = db.load();
        let reused = t.iter().find(|(_, id, _)| index_of(*id) == index_of(first));
        assert!(reused.is_some_and(|(_, id, _)| id != first));
        assert!(t.inbound(first).is_none());
        drop(t);
        let u = db.slot_use();
        assert!(u.table_slots <= 3, "{u:?}");
        assert_eq!(u.bound, 2);
        // The last SA gone: the policy name is kept only by a rule.
        db.apply(vec![remove("c/49", Direction::In)]).unwrap();
        let rules: HashSet<(&str, Direction)> = [("p", Direction::In)].into();
        assert_eq!(db.unbind_unused(&rules, &[]).len(), 1);
        assert_eq!(db.find_slot("p", Direction::In), Some(p));
        assert_eq!(db.unbind_unused(&no_rules(), &[]).len(), 1);
        assert_eq!(db.find_slot("p", Direction::In), None);
    }

    #[test]
    fn no_reuse_while_a_table_of_the_time_is_held() {
        let db = Sadb::new(1);
        db.apply(vec![SaChange::Install(params("old", Direction::In, 0x7))])
            .unwrap();
        let old = db.find_slot("old", Direction::In).unwrap();
        // A worker still reads the SA table with `old`, and a filter table
        // (stand-in: any Arc) whose rules gave `old`'s id is still held.
        let reader = db.load_full_for_tests();
        let filter: Arc<dyn Any + Send + Sync> = Arc::new(old);
        db.apply(vec![remove("old", Direction::In)]).unwrap();
        let weak: Weak<dyn Any + Send + Sync> = Arc::downgrade(&filter);
        db.unbind_unused(&no_rules(), &[weak]);
        db.reclaim();
        assert_eq!(db.slot_use().waiting, 1);
        let a = db.slot("a", Direction::In);
        assert_ne!(
            index_of(a),
            index_of(old),
            "not reused while the SA table is held"
        );
        drop(reader);
        db.reclaim();
        assert_eq!(db.slot_use().waiting, 1, "the filter table is still held");
        let b = db.slot("b", Direction::In);
        assert_ne!(index_of(b), index_of(old));
        drop(filter);
        db.reclaim();
        assert_eq!(
            db.slot_use(),
            SlotUse {
                bound: 2,
                free: 1,
                waiting: 0,
                table_slots: 1
            }
        );
        let c = db.slot("c", Direction::In);
        assert_eq!(index_of(c), index_of(old));
        assert_ne!(c, old);
        // Freed slots come back first in, first out.
        let bc: HashSet<(&str, Direction)> = [("b", Direction::In), ("c", Direction::In)].into();
        db.unbind_unused(&bc, &[]);
        let c: HashSet<(&str, Direction)> = [("c", Direction::In)].into();
        db.unbind_unused(&c, &[]);
        db.reclaim();
        assert_eq!(index_of(db.slot("x", Direction::In)), index_of(a));
        assert_eq!(index_of(db.slot("y", Direction::In)), index_of(b));
        assert_eq!(
            db.slot_use().table_slots,
            1,
            "never installed: the table stays short"
        );
    }

    #[test]
    fn generations_wrap_within_their_bits_and_no_id_matches_nothing() {
        let last = (u32::MAX >> INDEX_BITS) << INDEX_BITS | 5;
        assert_eq!(next_generation(last), 5);
        assert_eq!(next_generation(5), 1 << INDEX_BITS | 5);
        let db = Sadb::new(1);
        db.apply(vec![SaChange::Install(params("a", Direction::Out, 0x1))])
            .unwrap();
        assert!(db.load().outbound(NO_ID).is_none());
        assert!(db.load().inbound(NO_ID).is_none());
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

    /// A small deterministic generator for the randomised test below.
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self, n: u64) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 33) % n
        }
    }

    /// What a full rebuild would find, against what the batches maintained
    /// change by change: the SPI indexes, the ESP-in-UDP ports, the inbound
    /// flag, and which names stay bound.
    fn check_against_rebuild(db: &Sadb, rules: &HashSet<(&str, Direction)>) {
        let t = db.load();
        let mut ports = Vec::new();
        let mut n = [0usize; 2];
        for (d, id, sa) in t.iter() {
            assert!(
                Arc::ptr_eq(t.by_spi(d, sa.params.spi).unwrap(), sa),
                "{} ({d:?}) not found by its SPI",
                sa.params.name
            );
            assert_eq!(t.get(d, id).map(|s| s.id), Some(id));
            n[(d == Direction::In) as usize] += 1;
            if let (Direction::In, Encap::Udp { dport, .. }) = (d, sa.params.encap) {
                ports.push(dport);
            }
        }
        assert_eq!(
            (t.out_spis.len(), t.spis.len()),
            (n[0], n[1]),
            "stale index entries"
        );
        ports.sort_unstable();
        ports.dedup();
        assert_eq!(t.udp_ports, ports);
        assert_eq!(db.has_inbound(), n[1] > 0);
        // After unbind_unused, a name is bound exactly when something uses it.
        drop(t);
        db.unbind_unused(rules, &[]);
        let t = db.load();
        let mut used: HashSet<(String, Direction)> =
            rules.iter().map(|(n, d)| (n.to_string(), *d)).collect();
        for (d, _, sa) in t.iter() {
            used.insert((sa.params.name.clone(), d));
            if d == Direction::In {
                used.insert((sa.params.policy_name().to_string(), d));
            }
        }
        let slots = db.slots.lock().unwrap();
        let bound: HashSet<(String, Direction)> = slots
            .out
            .map
            .keys()
            .map(|k| (k.clone(), Direction::Out))
            .chain(slots.inb.map.keys().map(|k| (k.clone(), Direction::In)))
            .collect();
        assert_eq!(bound, used);
    }

    #[test]
    fn batches_keep_the_indexes_and_bindings_a_rebuild_would_give() {
        let mut rng = Lcg(7);
        let db = Sadb::new(2);
        let rules: HashSet<(&str, Direction)> =
            [("o3", Direction::Out), ("pol1", Direction::In)].into();
        // The filter table binds the names its rules give.
        for (n, d) in &rules {
            db.slot(n, *d);
        }
        for round in 0..400 {
            let mut batch = Vec::new();
            for _ in 0..1 + rng.next(6) {
                let d = if rng.next(2) == 0 {
                    Direction::In
                } else {
                    Direction::Out
                };
                let name = format!(
                    "{}{}",
                    if d == Direction::In { "i" } else { "o" },
                    rng.next(12)
                );
                if rng.next(4) == 0 {
                    batch.push(remove(&name, d));
                } else {
                    // Few SPIs: conflicts and SPI moves happen often.
                    let mut p = params(&name, d, 0x100 + rng.next(16) as u32);
                    if d == Direction::In {
                        if rng.next(3) == 0 {
                            p.policy = Some(format!("pol{}", rng.next(3)));
                        }
                        if rng.next(3) == 0 {
                            p.encap = Encap::Udp {
                                sport: 4500,
                                dport: 4500 + rng.next(3) as u16,
                            };
                        }
                    }
                    batch.push(SaChange::Install(p));
                }
            }
            let before = db.load_full_for_tests();
            if db.apply(batch).is_err() {
                // Refused: nothing changed.
                assert!(
                    Arc::ptr_eq(&before, &db.load_full_for_tests()),
                    "round {round}"
                );
            }
            drop(before);
            check_against_rebuild(&db, &rules);
            db.reclaim();
        }
        assert!(!db.load().is_empty());
    }

    #[test]
    fn a_batch_copies_only_the_slot_chunks_it_changes() {
        let db = Sadb::new(1);
        let n = 3 * CHUNK as u32;
        db.apply(
            (0..n)
                .map(|i| SaChange::Install(params(&format!("s{i}"), Direction::In, 0x1000 + i)))
                .collect(),
        )
        .unwrap();
        let before = db.load_full_for_tests();
        // One SA replaced, in the second chunk.
        let k = CHUNK as u32 + 5;
        db.apply(vec![SaChange::Install(params(
            &format!("s{k}"),
            Direction::In,
            0x9_0000,
        ))])
        .unwrap();
        let after = db.load_full_for_tests();
        let shared: Vec<bool> = (0..3)
            .map(|c| Arc::ptr_eq(&before.inbound.chunks[c], &after.inbound.chunks[c]))
            .collect();
        assert_eq!(shared, vec![true, false, true]);
        assert_eq!(after.inbound.len(), n as usize);
        assert_eq!(
            after.inbound_by_spi(0x9_0000).unwrap().1.params.name,
            format!("s{k}")
        );
        assert!(after.inbound_by_spi(0x1000 + k).is_none());
        assert!(
            before.inbound_by_spi(0x1000 + k).is_some(),
            "the old snapshot is untouched"
        );
        assert_eq!(after.iter().count(), n as usize);
    }
}
