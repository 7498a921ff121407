//! The filter table (the seeds' table of source, destination, protocol, ports
//! and processing instruction; an SPD in RFC 4301 terms).
//!
//! Rules are ordered per direction and the first match wins. Lookups go
//! through DPDK's ACL library (`rte_acl`): it compiles the rules into a
//! multi-bit trie walked four input bytes at a time with SIMD, the structure
//! DPDK's own ipsec-secgw and l3fwd-acl use. Per-packet cost depends on the
//! key length and the number of tries (a handful), not on the number of rules,
//! so thousands of rules do not mean thousands of comparisons; a burst is
//! classified in one call. A hand-written decision tree or tuple-space search
//! would be more code to get right and, measured by others, no faster.
//!
//! Each direction has one trie per address family, plus one for non-initial
//! fragments (which carry no ports): in that trie every rule's port ranges are
//! widened to "any", so a fragment takes the first rule its addresses and
//! protocol could belong to. That errs toward protect/discard rules, never
//! toward sending covered traffic in plaintext (fail closed).
//!
//! [`Rule::matches`] is a plain linear matcher with the same semantics; tests
//! check the tries against it.

use std::net::IpAddr;

use crate::config::DefaultAction;
use crate::dpdk::{Acl, AclField, AclKey, AclRule, DpdkError, KeyV4, KeyV6};
pub use bitw_common::rules::*;

/// The outcome of classifying one packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Bypass,
    /// A discard rule (index into the direction's rules) matched.
    Discard {
        rule: u32,
    },
    /// No rule matched and the default action is discard.
    DefaultDiscard,
    /// A protect rule matched; `rule` indexes the direction's rules. `sa` is,
    /// outbound, the id of its SA's name in the SA database (slot index and
    /// generation, see `sadb`); inbound, the id of the policy name the rule
    /// gives, which every inbound SA answering to the name carries
    /// (`Sa::policy`).
    Protect {
        rule: u32,
        sa: u32,
    },
}

impl Verdict {
    fn of(rule: u32, action: &Action, sa_slot: &dyn Fn(&str) -> u32) -> Verdict {
        match action {
            Action::Bypass => Verdict::Bypass,
            Action::Discard => Verdict::Discard { rule },
            Action::Protect { sa } => Verdict::Protect {
                rule,
                sa: sa_slot(sa),
            },
        }
    }
}

fn v4_word(a: IpAddr) -> u32 {
    match a {
        IpAddr::V4(a) => u32::from(a),
        IpAddr::V6(_) => 0,
    }
}

fn v6_words(a: IpAddr) -> [u32; 4] {
    match a {
        IpAddr::V6(a) => {
            let o = a.octets();
            std::array::from_fn(|i| {
                u32::from_be_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
            })
        }
        IpAddr::V4(_) => [0; 4],
    }
}

fn proto_field(p: Protocol) -> AclField {
    match p.number() {
        Some(n) => AclField::Bitmask8 {
            value: n,
            mask: 0xff,
        },
        None => AclField::Bitmask8 { value: 0, mask: 0 },
    }
}

fn ports_fields(r: &Rule, fragment: bool) -> [AclField; 2] {
    let (s, d) = if fragment {
        (PortRange::ANY, PortRange::ANY)
    } else {
        (r.sport, r.dport)
    };
    [
        AclField::Range16 { lo: s.lo, hi: s.hi },
        AclField::Range16 { lo: d.lo, hi: d.hi },
    ]
}

fn acl_rule_v4(r: &Rule, priority: i32, userdata: u32, fragment: bool) -> AclRule {
    let prefix = |p: Option<Prefix>| match p {
        Some(p) => AclField::Mask32 {
            value: v4_word(p.addr),
            len: p.len as u32,
        },
        None => AclField::Mask32 { value: 0, len: 0 },
    };
    let mut fields = vec![proto_field(r.proto), prefix(r.src), prefix(r.dst)];
    fields.extend(ports_fields(r, fragment));
    AclRule {
        priority,
        userdata,
        fields,
    }
}

fn acl_rule_v6(r: &Rule, priority: i32, userdata: u32, fragment: bool) -> AclRule {
    let words = |p: Option<Prefix>| -> [AclField; 4] {
        let (w, len) = match p {
            Some(p) => (v6_words(p.addr), p.len as u32),
            None => ([0; 4], 0),
        };
        std::array::from_fn(|i| AclField::Mask32 {
            value: w[i],
            len: len.saturating_sub(32 * i as u32).min(32),
        })
    };
    let mut fields = vec![proto_field(r.proto)];
    fields.extend(words(r.src));
    fields.extend(words(r.dst));
    fields.extend(ports_fields(r, fragment));
    AclRule {
        priority,
        userdata,
        fields,
    }
}

/// The compiled rules of one direction.
struct DirectionTable {
    rules: Vec<Rule>,
    /// What an ACL result means: index 0 = no match (the default action),
    /// i + 1 = rule i. A flat table keeps the rules themselves off the packet path.
    verdicts: Vec<Verdict>,
    v4: AclSet<KeyV4>,
    v4_fragments: AclSet<KeyV4>,
    v6: AclSet<KeyV6>,
    v6_fragments: AclSet<KeyV6>,
}

/// The rules of one (direction, family) as one or more rte_acl contexts.
///
/// rte_acl splits a rule set into at most 8 tries and refuses sets that need
/// more (deeply nested prefixes with port ranges do, at a few thousand rules).
/// Rather than refusing such a configuration, the set is cut in halves until
/// each part builds; a lookup then asks every part and keeps the earliest rule.
struct AclSet<K: AclKey> {
    parts: Vec<Acl<K>>,
}

impl<K: AclKey> AclSet<K> {
    fn build(rules: &[AclRule]) -> Result<Self, DpdkError> {
        let mut parts = Vec::new();
        Self::build_into(rules, &mut parts)?;
        Ok(AclSet { parts })
    }

    fn build_into(rules: &[AclRule], parts: &mut Vec<Acl<K>>) -> Result<(), DpdkError> {
        if rules.is_empty() {
            return Ok(());
        }
        match Acl::<K>::build(rules) {
            Ok(acl) => {
                parts.push(acl);
                Ok(())
            }
            Err(e) if rules.len() == 1 => Err(e),
            Err(_) => {
                let (a, b) = rules.split_at(rules.len() / 2);
                Self::build_into(a, parts)?;
                Self::build_into(b, parts)
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.parts.is_empty()
    }

    /// Best match per key: the lowest non-zero userdata (rule index + 1) over all parts.
    fn classify(&self, keys: &[K], results: &mut [u32]) {
        let mut parts = self.parts.iter();
        let Some(first) = parts.next() else {
            results[..keys.len()].fill(0);
            return;
        };
        first.classify(keys, results);
        let mut more = [0u32; CLASSIFY_MAX];
        for p in parts {
            let more = &mut more[..keys.len()];
            p.classify(keys, more);
            for (r, &m) in results.iter_mut().zip(more.iter()) {
                if m != 0 && (*r == 0 || m < *r) {
                    *r = m;
                }
            }
        }
    }
}

impl DirectionTable {
    fn build(
        rules: Vec<Rule>,
        default_action: DefaultAction,
        sa_slot: &dyn Fn(&str) -> u32,
    ) -> Result<Self, DpdkError> {
        let default = match default_action {
            DefaultAction::Bypass => Verdict::Bypass,
            DefaultAction::Discard => Verdict::DefaultDiscard,
        };
        let verdicts = std::iter::once(default)
            .chain(
                rules
                    .iter()
                    .enumerate()
                    .map(|(i, r)| Verdict::of(i as u32, &r.action, sa_slot)),
            )
            .collect();
        let n = rules.len() as i32;
        let (mut v4, mut v4f, mut v6, mut v6f) = (vec![], vec![], vec![], vec![]);
        for (i, r) in rules.iter().enumerate() {
            // Earlier rules win: highest priority first. userdata 0 means "no match".
            let (prio, user) = (n - i as i32, i as u32 + 1);
            if r.covers_family(true) {
                v4.push(acl_rule_v4(r, prio, user, false));
                v4f.push(acl_rule_v4(r, prio, user, true));
            }
            if r.covers_family(false) {
                v6.push(acl_rule_v6(r, prio, user, false));
                v6f.push(acl_rule_v6(r, prio, user, true));
            }
        }
        Ok(DirectionTable {
            v4: AclSet::build(&v4)?,
            v4_fragments: AclSet::build(&v4f)?,
            v6: AclSet::build(&v6)?,
            v6_fragments: AclSet::build(&v6f)?,
            rules,
            verdicts,
        })
    }
}

/// A cheap hash of a classification key, for the flow cache.
pub trait FlowHash {
    fn flow_hash(&self) -> u32;
}

#[inline]
fn mix(x: u64) -> u32 {
    // xor-shift, multiply, xor-shift: every input bit reaches the low output bits
    // (the cache indexes with them).
    let h = (x ^ (x >> 31)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (h ^ (h >> 29) ^ (h >> 47)) as u32
}

impl FlowHash for KeyV4 {
    #[inline]
    fn flow_hash(&self) -> u32 {
        let a =
            u64::from(u32::from_ne_bytes(self.src)) << 32 | u64::from(u32::from_ne_bytes(self.dst));
        let b = u64::from(u16::from_ne_bytes(self.sport)) << 24
            | u64::from(u16::from_ne_bytes(self.dport)) << 8
            | u64::from(self.proto);
        mix(a ^ b.rotate_left(17))
    }
}

impl FlowHash for KeyV6 {
    #[inline]
    fn flow_hash(&self) -> u32 {
        let w = |b: &[u8; 16], i: usize| u64::from_ne_bytes(b[i..i + 8].try_into().unwrap());
        let ports = u64::from(u16::from_ne_bytes(self.sport)) << 24
            | u64::from(u16::from_ne_bytes(self.dport)) << 8
            | u64::from(self.proto);
        mix(w(&self.src, 0)
            ^ w(&self.src, 8).rotate_left(13)
            ^ w(&self.dst, 0).rotate_left(29)
            ^ w(&self.dst, 8).rotate_left(41)
            ^ ports)
    }
}

#[derive(Clone, Copy, Default)]
struct CacheSlot<K> {
    key: K,
    userdata: u32,
    /// The table the answer came from; 0 = empty.
    generation: u32,
}

/// A worker's cache of recent classification answers (one per direction and
/// family), 4-way set-associative by flow hash. Only its worker touches it, so it needs
/// no lock; entries of an older table are ignored (the table's generation is part
/// of the entry), so a new table needs no flush.
///
/// Traffic of few long flows (the common case) skips the tries almost always;
/// traffic of ever-new flows costs one hash probe more than the tries alone.
pub struct FlowCache<K> {
    slots: Vec<CacheSlot<K>>,
    mask: usize,
    miss_keys: Vec<K>,
    miss_at: Vec<u16>,
    pub hits: u64,
    pub misses: u64,
}

const CACHE_WAYS: usize = 4;

impl<K: Copy + Default + PartialEq + FlowHash> FlowCache<K> {
    /// A cache of `slots` entries (rounded up to a power of two, at least 4).
    pub fn new(slots: usize) -> Self {
        let n = slots.max(CACHE_WAYS).next_power_of_two();
        FlowCache {
            slots: vec![CacheSlot::default(); n],
            mask: n - 1,
            miss_keys: vec![K::default(); CLASSIFY_MAX],
            miss_at: vec![0; CLASSIFY_MAX],
            hits: 0,
            misses: 0,
        }
    }

    #[inline]
    fn bucket(&self, hash: u32) -> usize {
        hash as usize & self.mask & !(CACHE_WAYS - 1)
    }

    /// The cached answer for `k` under table `generation`, if any.
    #[inline]
    fn find(&self, k: &K, generation: u32) -> Option<u32> {
        let b = self.bucket(k.flow_hash());
        self.slots[b..b + CACHE_WAYS]
            .iter()
            .find(|s| s.generation == generation && s.key == *k)
            .map(|s| s.userdata)
    }

    /// Remembers an answer: in a free or stale way of the bucket, else in a way
    /// picked by the hash's upper bits (cheap, and no flow keeps losing).
    fn insert(&mut self, k: K, userdata: u32, generation: u32) {
        let h = k.flow_hash();
        let b = self.bucket(h);
        let ways = &mut self.slots[b..b + CACHE_WAYS];
        let way = ways
            .iter()
            .position(|s| s.generation != generation)
            .unwrap_or(((h >> 24) as usize + self.misses as usize) % CACHE_WAYS);
        ways[way] = CacheSlot {
            key: k,
            userdata,
            generation,
        };
    }
}

/// The filter table of both directions, ready for lookups from any worker.
pub struct FilterTable {
    out: DirectionTable,
    inb: DirectionTable,
    /// Unique per built table: flow-cache entries of another table never match.
    generation: u32,
}

/// A generation no table built before has had. 0 marks an empty flow-cache
/// slot and is never handed out; the counter would need 2^32 rebuilds to come
/// back to a value still cached, far beyond any run (one rebuild per control
/// `Apply` with a policy).
fn next_generation() -> u32 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static GENERATION: AtomicU32 = AtomicU32::new(1);
    loop {
        let g = GENERATION.fetch_add(1, Ordering::Relaxed);
        if g != 0 {
            return g;
        }
    }
}

/// Largest number of keys one classify call takes (a worker's burst).
pub const CLASSIFY_MAX: usize = crate::config::MAX_BURST;

impl FilterTable {
    /// Compiles `rules` (config order, both directions mixed) into lookup tries,
    /// without SAs: protect verdicts carry slot 0 (tests, tools).
    pub fn build(rules: &[Rule], default_action: DefaultAction) -> Result<Self, DpdkError> {
        Self::build_with_sas(rules, default_action, &|_, _| 0)
    }

    /// Compiles `rules`; `sa_slot(name, direction)` gives the SA database slot
    /// each protect rule's verdict carries.
    pub fn build_with_sas(
        rules: &[Rule],
        default_action: DefaultAction,
        sa_slot: &dyn Fn(&str, Direction) -> u32,
    ) -> Result<Self, DpdkError> {
        let of = |d: Direction| {
            rules
                .iter()
                .filter(|r| r.direction == d)
                .cloned()
                .collect::<Vec<_>>()
        };
        Ok(FilterTable {
            out: DirectionTable::build(of(Direction::Out), default_action, &|n| {
                sa_slot(n, Direction::Out)
            })?,
            inb: DirectionTable::build(of(Direction::In), default_action, &|n| {
                sa_slot(n, Direction::In)
            })?,
            generation: next_generation(),
        })
    }

    /// This table's generation: unique among the tables this process built
    /// (flow-cache entries carry it, control sees it in `Applied`).
    pub fn generation(&self) -> u32 {
        self.generation
    }

    /// Rules of both directions.
    pub fn rule_count(&self) -> usize {
        self.out.rules.len() + self.inb.rules.len()
    }

    fn table(&self, dir: Direction) -> &DirectionTable {
        match dir {
            Direction::Out => &self.out,
            Direction::In => &self.inb,
        }
    }

    /// True when a direction has no rules and bypasses by default: nothing can
    /// change what happens to a frame, so the worker forwards it uninspected.
    pub fn is_wire(&self, dir: Direction) -> bool {
        let t = self.table(dir);
        t.rules.is_empty() && t.verdicts[0] == Verdict::Bypass
    }

    /// The rules of a direction, in match order (indices of [`Verdict`]).
    pub fn rules(&self, dir: Direction) -> &[Rule] {
        &self.table(dir).rules
    }

    fn verdict(&self, dir: Direction, userdata: u32) -> Verdict {
        self.table(dir).verdicts[userdata as usize]
    }

    /// Classifies IPv4 keys; `fragments` selects the trie for non-initial fragments.
    pub fn classify_v4(
        &self,
        dir: Direction,
        fragments: bool,
        keys: &[KeyV4],
        out: &mut [Verdict],
    ) {
        let t = self.table(dir);
        let acl = if fragments { &t.v4_fragments } else { &t.v4 };
        Self::classify_with(&t.verdicts, acl, keys, out)
    }

    /// Classifies IPv6 keys; `fragments` selects the trie for non-initial fragments.
    pub fn classify_v6(
        &self,
        dir: Direction,
        fragments: bool,
        keys: &[KeyV6],
        out: &mut [Verdict],
    ) {
        let t = self.table(dir);
        let acl = if fragments { &t.v6_fragments } else { &t.v6 };
        Self::classify_with(&t.verdicts, acl, keys, out)
    }

    fn classify_with<K: AclKey>(
        verdicts: &[Verdict],
        acl: &AclSet<K>,
        keys: &[K],
        out: &mut [Verdict],
    ) {
        if acl.is_empty() {
            out[..keys.len()].fill(verdicts[0]);
            return;
        }
        let mut results = [0u32; CLASSIFY_MAX];
        for (chunk_keys, chunk_out) in keys.chunks(CLASSIFY_MAX).zip(out.chunks_mut(CLASSIFY_MAX)) {
            let res = &mut results[..chunk_keys.len()];
            acl.classify(chunk_keys, res);
            for (o, &r) in chunk_out.iter_mut().zip(res.iter()) {
                *o = verdicts[r as usize];
            }
        }
    }

    /// Classifies a burst of IPv4 keys through a worker's flow cache: keys seen
    /// before (under this table) are answered from the cache, the rest go to the
    /// tries in one call and are remembered.
    pub fn classify_v4_cached(
        &self,
        dir: Direction,
        cache: &mut FlowCache<KeyV4>,
        keys: &[KeyV4],
        out: &mut [Verdict],
    ) {
        let t = self.table(dir);
        self.classify_cached(&t.verdicts, &t.v4, cache, keys, out)
    }

    /// IPv6 counterpart of [`FilterTable::classify_v4_cached`].
    pub fn classify_v6_cached(
        &self,
        dir: Direction,
        cache: &mut FlowCache<KeyV6>,
        keys: &[KeyV6],
        out: &mut [Verdict],
    ) {
        let t = self.table(dir);
        self.classify_cached(&t.verdicts, &t.v6, cache, keys, out)
    }

    fn classify_cached<K: AclKey + FlowHash + PartialEq + Default>(
        &self,
        verdicts: &[Verdict],
        acl: &AclSet<K>,
        cache: &mut FlowCache<K>,
        keys: &[K],
        out: &mut [Verdict],
    ) {
        if acl.is_empty() {
            out[..keys.len()].fill(verdicts[0]);
            return;
        }
        assert!(keys.len() <= CLASSIFY_MAX, "one burst at a time");
        let gen = self.generation;
        let mut missed = 0usize;
        for (j, k) in keys.iter().enumerate() {
            match cache.find(k, gen) {
                Some(userdata) => out[j] = verdicts[userdata as usize],
                None => {
                    cache.miss_keys[missed] = *k;
                    cache.miss_at[missed] = j as u16;
                    missed += 1;
                }
            }
        }
        cache.hits += (keys.len() - missed) as u64;
        cache.misses += missed as u64;
        if missed == 0 {
            return;
        }
        let mut results = [0u32; CLASSIFY_MAX];
        acl.classify(&cache.miss_keys[..missed], &mut results[..missed]);
        for m in 0..missed {
            let k = cache.miss_keys[m];
            out[cache.miss_at[m] as usize] = verdicts[results[m] as usize];
            cache.insert(k, results[m], gen);
        }
    }

    /// Classifies one flow (slow path and tests): the same tries as the bursts.
    pub fn classify_one(&self, dir: Direction, k: &FlowKey) -> Verdict {
        let mut out = [Verdict::Bypass];
        match (k.src, k.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let key = KeyV4::new(k.proto, s.octets(), d.octets(), k.sport, k.dport);
                self.classify_v4(dir, k.fragment, &[key], &mut out);
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                let key = KeyV6::new(k.proto, s.octets(), d.octets(), k.sport, k.dport);
                self.classify_v6(dir, k.fragment, &[key], &mut out);
            }
            _ => return Verdict::DefaultDiscard,
        }
        out[0]
    }

    /// The reference answer: scan the rules in order.
    pub fn classify_linear(&self, dir: Direction, k: &FlowKey) -> Verdict {
        let rules = self.rules(dir);
        match rules.iter().position(|r| r.matches(k)) {
            Some(i) => self.verdict(dir, i as u32 + 1),
            None => self.verdict(dir, 0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn rule(
        dir: Direction,
        src: &str,
        dst: &str,
        proto: Protocol,
        sport: &str,
        dport: &str,
        action: Action,
    ) -> Rule {
        let p = |s: &str| (s != "any").then(|| s.parse::<Prefix>().unwrap());
        Rule {
            name: format!("r{src}{dst}{sport}{dport}"),
            direction: dir,
            src: p(src),
            dst: p(dst),
            proto,
            sport: sport.parse().unwrap(),
            dport: dport.parse().unwrap(),
            action,
        }
    }

    fn key(src: &str, dst: &str, proto: u8, sport: u16, dport: u16) -> FlowKey {
        FlowKey {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            proto,
            sport,
            dport,
            fragment: false,
        }
    }

    fn protect() -> Action {
        Action::Protect { sa: "sa".into() }
    }

    #[test]
    fn prefix_parsing() {
        assert_eq!("10.0.0.0/8".parse::<Prefix>().unwrap().len, 8);
        assert_eq!("10.1.2.3".parse::<Prefix>().unwrap().len, 32);
        assert!("10.0.0.1/8"
            .parse::<Prefix>()
            .unwrap_err()
            .contains("did you mean 10.0.0.0/8"));
        assert!("2001:db8::/129".parse::<Prefix>().is_err());
        assert!("::/0"
            .parse::<Prefix>()
            .unwrap()
            .contains("2001:db8::1".parse().unwrap()));
        assert!(!"0.0.0.0/0"
            .parse::<Prefix>()
            .unwrap()
            .contains("::1".parse().unwrap()));
    }

    #[test]
    fn first_match_wins_and_boundaries() {
        crate::dpdk::init_eal_for_tests();
        let rules = vec![
            rule(
                Direction::Out,
                "10.0.0.0/24",
                "any",
                Protocol::Tcp,
                "any",
                "443",
                protect(),
            ),
            rule(
                Direction::Out,
                "10.0.0.0/16",
                "any",
                Protocol::Any,
                "any",
                "any",
                Action::Discard,
            ),
            rule(
                Direction::Out,
                "any",
                "192.168.1.0/24",
                Protocol::Udp,
                "1000-2000",
                "any",
                Action::Bypass,
            ),
            rule(
                Direction::In,
                "2001:db8::/32",
                "any",
                Protocol::Tcp,
                "any",
                "22",
                Action::Discard,
            ),
        ];
        let t = FilterTable::build(&rules, DefaultAction::Discard).unwrap();
        let cases = [
            (
                Direction::Out,
                key("10.0.0.5", "1.2.3.4", 6, 1, 443),
                Verdict::Protect { rule: 0, sa: 0 },
            ),
            (
                Direction::Out,
                key("10.0.0.255", "1.2.3.4", 6, 1, 443),
                Verdict::Protect { rule: 0, sa: 0 },
            ),
            (
                Direction::Out,
                key("10.0.1.0", "1.2.3.4", 6, 1, 443),
                Verdict::Discard { rule: 1 },
            ),
            (
                Direction::Out,
                key("10.0.0.5", "1.2.3.4", 6, 1, 444),
                Verdict::Discard { rule: 1 },
            ),
            (
                Direction::Out,
                key("10.1.0.0", "192.168.1.9", 17, 1000, 9),
                Verdict::Bypass,
            ),
            (
                Direction::Out,
                key("10.1.0.0", "192.168.1.9", 17, 2000, 9),
                Verdict::Bypass,
            ),
            (
                Direction::Out,
                key("10.1.0.0", "192.168.1.9", 17, 2001, 9),
                Verdict::DefaultDiscard,
            ),
            (
                Direction::Out,
                key("10.1.0.0", "192.168.2.9", 17, 1500, 9),
                Verdict::DefaultDiscard,
            ),
            (
                Direction::In,
                key("10.0.0.5", "1.2.3.4", 6, 1, 443),
                Verdict::DefaultDiscard,
            ),
            (
                Direction::In,
                key("2001:db8:ffff::1", "::1", 6, 9, 22),
                Verdict::Discard { rule: 0 },
            ),
            (
                Direction::In,
                key("2001:db9::1", "::1", 6, 9, 22),
                Verdict::DefaultDiscard,
            ),
            (
                Direction::Out,
                key("2001:db8::1", "2001:db8::2", 17, 1500, 1),
                Verdict::DefaultDiscard,
            ),
        ];
        for (dir, k, want) in cases {
            assert_eq!(t.classify_one(dir, &k), want, "{dir:?} {k:?}");
            assert_eq!(t.classify_linear(dir, &k), want, "linear {dir:?} {k:?}");
        }
    }

    #[test]
    fn fragments_take_the_first_rule_their_addresses_allow() {
        crate::dpdk::init_eal_for_tests();
        let rules = vec![
            rule(
                Direction::Out,
                "10.0.0.0/24",
                "any",
                Protocol::Tcp,
                "any",
                "443",
                protect(),
            ),
            rule(
                Direction::Out,
                "any",
                "any",
                Protocol::Any,
                "any",
                "any",
                Action::Bypass,
            ),
        ];
        let t = FilterTable::build(&rules, DefaultAction::Bypass).unwrap();
        let mut k = key("10.0.0.1", "8.8.8.8", 6, 0, 0);
        k.fragment = true;
        assert_eq!(
            t.classify_one(Direction::Out, &k),
            Verdict::Protect { rule: 0, sa: 0 }
        );
        k.proto = 17;
        assert_eq!(t.classify_one(Direction::Out, &k), Verdict::Bypass);
    }

    #[test]
    fn any_rule_covers_both_families_and_empty_table_defaults() {
        crate::dpdk::init_eal_for_tests();
        let rules = vec![rule(
            Direction::In,
            "any",
            "any",
            Protocol::Icmpv6,
            "128",
            "0",
            Action::Discard,
        )];
        let t = FilterTable::build(&rules, DefaultAction::Bypass).unwrap();
        assert_eq!(
            t.classify_one(Direction::In, &key("::1", "::2", 58, 128, 0)),
            Verdict::Discard { rule: 0 }
        );
        assert_eq!(
            t.classify_one(Direction::In, &key("::1", "::2", 58, 129, 0)),
            Verdict::Bypass
        );
        assert_eq!(
            t.classify_one(Direction::Out, &key("::1", "::2", 58, 128, 0)),
            Verdict::Bypass
        );
        let empty = FilterTable::build(&[], DefaultAction::Discard).unwrap();
        assert_eq!(
            empty.classify_one(Direction::Out, &key("1.1.1.1", "2.2.2.2", 6, 1, 2)),
            Verdict::DefaultDiscard
        );
    }

    fn arb_rule(v6: bool) -> impl Strategy<Value = Rule> {
        let prefix = move || {
            prop_oneof![
                Just(None),
                (any::<u128>(), 0u8..=if v6 { 128 } else { 32 }).prop_map(move |(a, len)| {
                    let addr = if v6 {
                        let m = u128::MAX.checked_shl(128 - len as u32).unwrap_or(0);
                        IpAddr::V6(Ipv6Addr::from(a & m))
                    } else {
                        let m = u32::MAX.checked_shl(32 - len as u32).unwrap_or(0);
                        IpAddr::V4(Ipv4Addr::from(a as u32 & m))
                    };
                    Some(Prefix { addr, len })
                }),
            ]
        };
        let ports = || {
            prop_oneof![
                Just(PortRange::ANY),
                (0u16..100, 0u16..100).prop_map(|(a, b)| PortRange {
                    lo: a.min(b),
                    hi: a.max(b)
                })
            ]
        };
        (
            prefix(),
            prefix(),
            prop_oneof![
                Just(Protocol::Any),
                Just(Protocol::Tcp),
                Just(Protocol::Udp)
            ],
            ports(),
            ports(),
            0..3u8,
            any::<bool>(),
        )
            .prop_map(|(src, dst, proto, sport, dport, a, out)| {
                let (sport, dport) = if proto == Protocol::Any {
                    (PortRange::ANY, PortRange::ANY)
                } else {
                    (sport, dport)
                };
                Rule {
                    name: String::new(),
                    direction: if out { Direction::Out } else { Direction::In },
                    src,
                    dst,
                    proto,
                    sport,
                    dport,
                    action: match a {
                        0 => Action::Bypass,
                        1 => Action::Discard,
                        _ => Action::Protect { sa: "x".into() },
                    },
                }
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// The tries agree with the linear scan on random rules and packets, keys
        /// drawn near the rules' own addresses so that prefixes actually match.
        #[test]
        fn tries_agree_with_linear_scan(
            v6 in any::<bool>(),
            rules in (any::<bool>()).prop_flat_map(|v6| proptest::collection::vec(arb_rule(v6), 0..40)),
            probes in proptest::collection::vec((any::<u8>(), any::<u8>(), any::<u128>(), any::<u128>(), 0u16..100, 0u16..100, prop_oneof![Just(6u8), Just(17u8), Just(1u8)], any::<bool>(), any::<bool>()), 64),
        ) {
            crate::dpdk::init_eal_for_tests();
            let rules: Vec<Rule> = rules.into_iter().filter(|r| r.covers_family(!v6) || r.src.or(r.dst).is_none()).collect();
            let t = FilterTable::build(&rules, DefaultAction::Discard).unwrap();
            for (si, di, rs, rd, sp, dp, proto, frag, out) in probes {
                // Take addresses from rules' prefixes (perturbed by the random low bits) or random ones.
                let pick = |idx: u8, rnd: u128, src: bool| -> IpAddr {
                    let base = rules.get(idx as usize % (rules.len() + 1)).and_then(|r| if src { r.src } else { r.dst });
                    match (base, v6) {
                        (Some(p), true) => { let IpAddr::V6(a) = p.addr else { unreachable!() }; let host = rnd.checked_shr(p.len as u32).unwrap_or(0); IpAddr::V6(Ipv6Addr::from(u128::from(a) | host)) }
                        (Some(p), false) => { let IpAddr::V4(a) = p.addr else { unreachable!() }; let host = (rnd as u32).checked_shr(p.len as u32).unwrap_or(0); IpAddr::V4(Ipv4Addr::from(u32::from(a) | host)) }
                        (None, true) => IpAddr::V6(Ipv6Addr::from(rnd)),
                        (None, false) => IpAddr::V4(Ipv4Addr::from(rnd as u32)),
                    }
                };
                let k = FlowKey { src: pick(si, rs, true), dst: pick(di, rd, false), proto, sport: sp, dport: dp, fragment: frag };
                let dir = if out { Direction::Out } else { Direction::In };
                prop_assert_eq!(t.classify_one(dir, &k), t.classify_linear(dir, &k), "{:?}", k);
            }
        }
    }
}

#[cfg(test)]
mod cache_tests {
    use super::*;

    #[test]
    fn cache_answers_like_the_tries_and_forgets_old_tables() {
        crate::dpdk::init_eal_for_tests();
        let rule = |dst: &str, action: Action| Rule {
            name: dst.into(),
            direction: Direction::Out,
            src: None,
            dst: Some(dst.parse().unwrap()),
            proto: Protocol::Udp,
            sport: PortRange::ANY,
            dport: PortRange::ANY,
            action,
        };
        let t1 = FilterTable::build(
            &[rule("198.18.0.0/24", Action::Discard)],
            DefaultAction::Bypass,
        )
        .unwrap();
        let t2 = FilterTable::build(
            &[rule("198.18.0.0/24", Action::Bypass)],
            DefaultAction::Discard,
        )
        .unwrap();
        let keys: Vec<KeyV4> = (0..64u8)
            .map(|i| KeyV4::new(17, [10, 0, 0, i], [198, 18, i % 2, 1], 1000 + i as u16, 53))
            .collect();
        let mut cache = FlowCache::new(1024);
        let mut cached = vec![Verdict::Bypass; keys.len()];
        let mut plain = vec![Verdict::Bypass; keys.len()];
        for round in 0..3 {
            t1.classify_v4_cached(Direction::Out, &mut cache, &keys, &mut cached);
            t1.classify_v4(Direction::Out, false, &keys, &mut plain);
            assert_eq!(cached, plain, "round {round}");
        }
        assert_eq!(cache.misses, 64, "only the first round misses");
        assert_eq!(cache.hits, 128);
        // A new table: every cached answer of the old one is ignored.
        t2.classify_v4_cached(Direction::Out, &mut cache, &keys, &mut cached);
        t2.classify_v4(Direction::Out, false, &keys, &mut plain);
        assert_eq!(cached, plain);
        assert_eq!(cache.misses, 128);
    }
}
