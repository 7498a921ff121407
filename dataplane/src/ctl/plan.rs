//! Checking what control sends before anything changes: an `Apply` batch
//! against the SAs installed now (all of it, every error naming the SA or
//! rule and the field), and a datagram to inject. Pure, apart from building
//! the filter table with rte_acl, which needs EAL.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;

use bitw_common::config::DefaultAction;
use bitw_common::proto::{
    self, Applied, Batch, DefaultActionName, Origin, PolicySpec, SaChange as WireSaChange,
};

use crate::filter::{Direction, FilterTable, Rule};
use crate::sa::SaParams;
use crate::sadb::{FastMap, FastSet, SaChange};
use crate::wire;

/// The largest datagram `Inject` takes: an mbuf's data room less the Ethernet header.
pub const INJECT_MAX: usize = 2048 - 14;

/// An IP datagram control wants sent: its addresses and ethertype, or why not.
pub fn check_datagram(p: &[u8]) -> Result<(IpAddr, IpAddr, u16), String> {
    if p.len() > INJECT_MAX {
        return Err(format!(
            "packet of {} bytes: at most {INJECT_MAX} fit one buffer",
            p.len()
        ));
    }
    match p.first().map(|b| b >> 4) {
        None => Err("empty packet".into()),
        Some(4) => {
            if p.len() < 20 {
                return Err(format!(
                    "IPv4 packet of {} bytes: shorter than its header",
                    p.len()
                ));
            }
            let ihl = (p[0] & 0x0f) as usize * 4;
            let total = u16::from_be_bytes([p[2], p[3]]) as usize;
            if ihl < 20 || ihl > p.len() {
                return Err(format!("IPv4 header length {ihl} does not fit the packet"));
            }
            if total != p.len() {
                return Err(format!(
                    "IPv4 total length {total} but the packet has {} bytes",
                    p.len()
                ));
            }
            let a = |o: usize| IpAddr::from([p[o], p[o + 1], p[o + 2], p[o + 3]]);
            Ok((a(12), a(16), wire::ETHERTYPE_IPV4))
        }
        Some(6) => {
            if p.len() < 40 {
                return Err(format!(
                    "IPv6 packet of {} bytes: shorter than its header",
                    p.len()
                ));
            }
            let payload = u16::from_be_bytes([p[4], p[5]]) as usize;
            if 40 + payload != p.len() {
                return Err(format!(
                    "IPv6 payload length {payload} but the packet has {} bytes after the header",
                    p.len() - 40
                ));
            }
            let a = |o: usize| IpAddr::from(<[u8; 16]>::try_from(&p[o..o + 16]).unwrap());
            Ok((a(8), a(24), wire::ETHERTYPE_IPV6))
        }
        Some(v) => Err(format!("IP version {v}: expected 4 or 6")),
    }
}

/// A batch checked against the current tables: what publishing it will do.
pub struct Plan {
    /// Removals that must go with the installs (their SPI moves to a new SA).
    pub early_removes: Vec<SaChange>,
    pub installs: Vec<SaChange>,
    pub late_removes: Vec<SaChange>,
    pub table: Option<(FilterTable, PolicySpec)>,
    pub punt: Option<Vec<IpAddr>>,
    /// Origins and fingerprints of the SAs the batch installs (unchanged ones included).
    pub meta: Vec<((String, Direction), SaMeta)>,
    pub applied: Applied,
}

/// What the dataplane keeps about an SA besides the SA itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaMeta {
    pub origin: Origin,
    pub fingerprint: String,
}

fn dir_name(d: Direction) -> &'static str {
    d.as_str()
}

/// The SAs installed now, as planning asks about them: by name, and by
/// SPI. Lookups only, so that planning a batch costs the batch, not the table.
pub trait Installed {
    /// The parameters of the SA of this name and direction.
    fn params(&self, name: &str, direction: Direction) -> Option<SaParams>;
    /// The name of the SA of this direction that has this SPI.
    fn spi_owner(&self, direction: Direction, spi: u32) -> Option<String>;
}

/// A plain map (tests, and anything small).
impl Installed for HashMap<(String, Direction), SaParams> {
    fn params(&self, name: &str, direction: Direction) -> Option<SaParams> {
        self.get(&(name.to_string(), direction)).cloned()
    }
    fn spi_owner(&self, direction: Direction, spi: u32) -> Option<String> {
        self.iter()
            .find(|((_, d), p)| *d == direction && p.spi == spi)
            .map(|((n, _), _)| n.clone())
    }
}

/// Checks a batch against the SAs installed now (`current`) and builds its
/// filter table, changing nothing. Every error names the SA or rule and the
/// field.
pub fn plan_batch(
    batch: &Batch,
    current: &dyn Installed,
    slot: &dyn Fn(&str, Direction) -> u32,
) -> Result<Plan, String> {
    // The final state of every SA the batch touches, in first-touch order.
    let mut order: Vec<(String, Direction)> = Vec::new();
    let mut fin: FastMap<(String, Direction), Option<(SaParams, Origin)>> = FastMap::default();
    let mut installed_here: FastSet<(String, Direction)> = FastSet::default();
    for (i, change) in batch.sas.iter().enumerate() {
        match change {
            WireSaChange::Install(spec) => {
                let params = spec.to_params().map_err(|e| format!("sas[{i}]: {e}"))?;
                let key = (params.name.clone(), params.direction);
                if !installed_here.insert(key.clone()) {
                    return Err(format!(
                        "sas[{i}]: SA `{}` ({}): name: installed twice in one batch",
                        key.0,
                        dir_name(key.1)
                    ));
                }
                if !fin.contains_key(&key) {
                    order.push(key.clone());
                }
                fin.insert(key, Some((params, spec.origin)));
            }
            WireSaChange::Remove { name, direction } => {
                let key = (name.clone(), *direction);
                let exists = match fin.get(&key) {
                    Some(state) => state.is_some(),
                    None => current.params(name, *direction).is_some(),
                };
                if !exists {
                    return Err(format!(
                        "sas[{i}]: remove SA `{name}` ({}): name: no such SA is installed",
                        dir_name(*direction)
                    ));
                }
                if !fin.contains_key(&key) {
                    order.push(key.clone());
                }
                fin.insert(key, None);
            }
        }
    }
    // SPIs stay unique per direction over the result (inbound: ESP is found
    // by SPI; outbound: as the configuration file requires). An SA the batch
    // does not touch keeps its SPI, so the error names the batch's SA.
    let mut spis: FastMap<(Direction, u32), &str> = FastMap::default();
    for key in &order {
        if let Some(Some((p, _))) = fin.get(key) {
            let (name, d) = (key.0.as_str(), key.1);
            let other = match spis.insert((d, p.spi), name) {
                Some(earlier) => Some(earlier.to_string()),
                None => current
                    .spi_owner(d, p.spi)
                    .filter(|owner| !fin.contains_key(&(owner.clone(), d))),
            };
            if let Some(other) = other {
                let (spi, d) = (p.spi, dir_name(d));
                return Err(format!(
                    "SA `{name}` ({d}): spi: {spi:#010x} is already the SPI of {d} SA `{other}`"
                ));
            }
        }
    }

    // The filter table, built (and so checked by rte_acl) but not published.
    let table = match &batch.policy {
        None => None,
        Some(policy) => {
            let mut names = HashSet::new();
            let mut rules: Vec<Rule> = Vec::with_capacity(policy.rules.len());
            for (i, r) in policy.rules.iter().enumerate() {
                let rule = r.to_rule().map_err(|e| format!("policy.rules[{i}]: {e}"))?;
                if !names.insert(rule.name.clone()) {
                    return Err(format!(
                        "policy.rules[{i}]: rule `{}`: name: used by an earlier rule",
                        rule.name
                    ));
                }
                rules.push(rule);
            }
            let default = match policy.default_action {
                DefaultActionName::Bypass => DefaultAction::Bypass,
                DefaultActionName::Discard => DefaultAction::Discard,
            };
            let t = FilterTable::build_with_sas(&rules, default, slot)
                .map_err(|e| format!("policy: {e}"))?;
            Some((t, policy.clone()))
        }
    };

    let mut plan = Plan {
        early_removes: Vec::new(),
        installs: Vec::new(),
        late_removes: Vec::new(),
        table,
        punt: batch.punt_addrs.clone(),
        meta: Vec::new(),
        applied: Applied::default(),
    };
    // SPIs the installs take: an SA being removed that holds one goes early.
    let new_spis: FastSet<u32> = order
        .iter()
        .filter_map(|k| match fin.get(k) {
            Some(Some((p, _))) if k.1 == Direction::In => Some(p.spi),
            _ => None,
        })
        .collect();
    for key in &order {
        match fin.remove(key).flatten() {
            Some((params, origin)) => {
                plan.meta.push((
                    key.clone(),
                    SaMeta {
                        origin,
                        fingerprint: proto::params_fingerprint(&params),
                    },
                ));
                match current.params(&key.0, key.1) {
                    Some(old) if old == params => plan.applied.sas_unchanged += 1,
                    Some(_) => {
                        plan.applied.sas_replaced += 1;
                        plan.installs.push(SaChange::Install(params));
                    }
                    None => {
                        plan.applied.sas_installed += 1;
                        plan.installs.push(SaChange::Install(params));
                    }
                }
            }
            None => {
                if let Some(old) = current.params(&key.0, key.1) {
                    plan.applied.sas_removed += 1;
                    let rm = SaChange::Remove {
                        name: key.0.clone(),
                        direction: key.1,
                    };
                    if key.1 == Direction::In && new_spis.contains(&old.spi) {
                        plan.early_removes.push(rm);
                    } else {
                        plan.late_removes.push(rm);
                    }
                }
            }
        }
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bitw_common::proto::{LimitsSpec, RuleSpec, SaSpec};
    use zeroize::Zeroizing;

    fn spec(name: &str, direction: Direction, spi: u32) -> SaSpec {
        SaSpec {
            name: name.into(),
            direction,
            spi,
            mode: "tunnel".into(),
            tunnel_src: Some("172.16.0.1".parse().unwrap()),
            tunnel_dst: Some("172.16.0.2".parse().unwrap()),
            encap: "none".into(),
            udp_sport: 4500,
            udp_dport: 4500,
            aead: "aes128gcm16".into(),
            key: Zeroizing::new("00112233445566778899aabbccddeeff01020304".into()),
            esn: true,
            replay_window: 64,
            lifetime_packets: LimitsSpec::default(),
            lifetime_bytes: LimitsSpec::default(),
            origin: Origin::Admin,
            policy: None,
        }
    }

    fn rule(name: &str, dst: &str, action: &str, sa: Option<&str>) -> RuleSpec {
        RuleSpec {
            name: name.into(),
            direction: Direction::Out,
            src: "10.0.0.0/24".into(),
            dst: dst.into(),
            proto: "any".into(),
            sport: "any".into(),
            dport: "any".into(),
            action: action.into(),
            sa: sa.map(Into::into),
            origin: Origin::Admin,
        }
    }

    fn current(sas: &[SaSpec]) -> HashMap<(String, Direction), SaParams> {
        sas.iter()
            .map(|s| ((s.name.clone(), s.direction), s.to_params().unwrap()))
            .collect()
    }

    fn plan(batch: &Batch, cur: &HashMap<(String, Direction), SaParams>) -> Result<Plan, String> {
        crate::dpdk::init_eal_for_tests();
        plan_batch(batch, cur, &|_, _| 0)
    }

    fn install(s: SaSpec) -> WireSaChange {
        WireSaChange::Install(s)
    }

    #[test]
    fn apply_validation_names_the_sa_or_rule_and_field() {
        let cur = current(&[spec("a", Direction::In, 0x1000)]);
        let mut bad_key = spec("k", Direction::Out, 0x2000);
        bad_key.key = Zeroizing::new("0011".into());
        let cases: Vec<(Batch, &str)> = vec![
            (
                Batch {
                    sas: vec![install(bad_key)],
                    ..Default::default()
                },
                "sas[0]: SA `k`: key",
            ),
            (
                Batch {
                    sas: vec![
                        install(spec("x", Direction::Out, 0x3000)),
                        install(spec("x", Direction::Out, 0x3001)),
                    ],
                    ..Default::default()
                },
                "sas[1]: SA `x` (out): name: installed twice",
            ),
            (
                Batch {
                    sas: vec![install(spec("b", Direction::In, 0x1000))],
                    ..Default::default()
                },
                "SA `b` (in): spi: 0x00001000 is already the SPI of in SA `a`",
            ),
            (
                Batch {
                    sas: vec![
                        install(spec("o1", Direction::Out, 0x6000)),
                        install(spec("o2", Direction::Out, 0x6000)),
                        // The same SPI in the other direction is another SA's business.
                        install(spec("i1", Direction::In, 0x6000)),
                    ],
                    ..Default::default()
                },
                "SA `o2` (out): spi: 0x00006000 is already the SPI of out SA `o1`",
            ),
            (
                Batch {
                    sas: vec![WireSaChange::Remove {
                        name: "nope".into(),
                        direction: Direction::Out,
                    }],
                    ..Default::default()
                },
                "remove SA `nope` (out): name: no such SA",
            ),
            (
                Batch {
                    policy: Some(PolicySpec {
                        rules: vec![rule("r", "10.1.0.1/16", "bypass", None)],
                        default_action: DefaultActionName::Bypass,
                    }),
                    ..Default::default()
                },
                "policy.rules[0]: rule `r`: dst",
            ),
            (
                Batch {
                    policy: Some(PolicySpec {
                        rules: vec![
                            rule("r", "10.1.0.0/16", "bypass", None),
                            rule("r", "10.2.0.0/16", "discard", None),
                        ],
                        default_action: DefaultActionName::Bypass,
                    }),
                    ..Default::default()
                },
                "policy.rules[1]: rule `r`: name: used by an earlier rule",
            ),
            (
                Batch {
                    policy: Some(PolicySpec {
                        rules: vec![rule("p", "10.1.0.0/16", "protect", None)],
                        default_action: DefaultActionName::Bypass,
                    }),
                    ..Default::default()
                },
                "rule `p`: sa",
            ),
        ];
        for (batch, want) in cases {
            match plan(&batch, &cur) {
                Ok(_) => panic!("accepted a batch that should fail with `{want}`"),
                Err(e) => assert!(e.contains(want), "`{e}` does not contain `{want}`"),
            }
        }
    }

    #[test]
    fn apply_plan_counts_and_orders_changes() {
        let a = spec("a", Direction::In, 0x1000);
        let keep = spec("keep", Direction::Out, 0x1001);
        let cur = current(&[a.clone(), keep.clone(), spec("old", Direction::Out, 0x1002)]);
        // `a` gives its SPI to `b` (an early removal); `keep` is unchanged; `old`
        // is removed after the table swap; `new` is installed; a protect rule
        // may name an SA that is nowhere (acquire).
        let batch = Batch {
            sas: vec![
                WireSaChange::Remove {
                    name: "a".into(),
                    direction: Direction::In,
                },
                install(spec("b", Direction::In, 0x1000)),
                install(keep),
                install(spec("new", Direction::Out, 0x1003)),
                WireSaChange::Remove {
                    name: "old".into(),
                    direction: Direction::Out,
                },
            ],
            policy: Some(PolicySpec {
                rules: vec![rule("p", "10.1.0.0/16", "protect", Some("ghost"))],
                default_action: DefaultActionName::Discard,
            }),
            punt_addrs: Some(vec!["10.0.0.1".parse().unwrap()]),
        };
        let p = plan(&batch, &cur).unwrap();
        assert_eq!(
            (
                p.applied.sas_installed,
                p.applied.sas_replaced,
                p.applied.sas_unchanged,
                p.applied.sas_removed
            ),
            (2, 0, 1, 2)
        );
        assert!(matches!(&p.early_removes[..], [SaChange::Remove { name, .. }] if name == "a"));
        assert!(matches!(&p.late_removes[..], [SaChange::Remove { name, .. }] if name == "old"));
        assert_eq!(p.installs.len(), 2);
        assert_eq!(p.meta.len(), 3, "unchanged SAs get their (new) origin too");
        assert!(p.table.is_some() && p.punt.is_some());
        // Install then remove in one batch: nothing to install.
        let batch = Batch {
            sas: vec![
                install(spec("tmp", Direction::Out, 0x5000)),
                WireSaChange::Remove {
                    name: "tmp".into(),
                    direction: Direction::Out,
                },
            ],
            ..Default::default()
        };
        let p = plan(&batch, &cur).unwrap();
        assert!(p.installs.is_empty() && p.late_removes.is_empty());
    }

    fn with_policy(mut s: SaSpec, policy: &str) -> SaSpec {
        s.policy = Some(policy.into());
        s
    }

    fn rule_in(name: &str, src: &str, sa: &str) -> RuleSpec {
        RuleSpec {
            direction: Direction::In,
            src: src.into(),
            dst: "10.0.0.0/24".into(),
            ..rule(name, "any", "protect", Some(sa))
        }
    }

    #[test]
    fn inbound_sas_may_share_a_policy_name_outbound_ones_take_none() {
        let cur = current(&[spec("old", Direction::In, 0x1000)]);
        // The rekeyed SA joins the old one's policy name; the rule names it.
        let batch = Batch {
            sas: vec![
                install(with_policy(spec("old", Direction::In, 0x1000), "p")),
                install(with_policy(spec("new", Direction::In, 0x1001), "p")),
            ],
            policy: Some(PolicySpec {
                rules: vec![rule_in("r", "10.1.0.0/16", "p")],
                default_action: DefaultActionName::Bypass,
            }),
            ..Default::default()
        };
        let p = plan(&batch, &cur).unwrap();
        assert_eq!((p.applied.sas_replaced, p.applied.sas_installed), (1, 1));
        assert!(matches!(&p.installs[0], SaChange::Install(x) if x.policy_name() == "p"));
        assert_ne!(
            p.meta[0].1.fingerprint,
            proto::params_fingerprint(&cur[&("old".to_string(), Direction::In)]),
            "a new policy name makes another SA"
        );
        let batch = Batch {
            sas: vec![install(with_policy(spec("o", Direction::Out, 0x2000), "p"))],
            ..Default::default()
        };
        let e = plan(&batch, &cur).err().unwrap();
        assert!(
            e.contains("sas[0]: SA `o`: policy: only inbound SAs"),
            "{e}"
        );
    }

    /// The ids inbound rules resolve to and the ids inbound SAs carry agree:
    /// through the SA database, as the control thread plans and applies.
    #[test]
    fn inbound_rules_resolve_to_the_policy_id_their_sas_carry() {
        use crate::filter::{FlowKey, Verdict};
        use crate::sadb::Sadb;
        crate::dpdk::init_eal_for_tests();
        let db = Sadb::new(1);
        let now = |db: &Sadb| -> HashMap<(String, Direction), SaParams> {
            db.load()
                .iter()
                .map(|(d, _, sa)| ((sa.params.name.clone(), d), sa.params.clone()))
                .collect()
        };
        let batch = Batch {
            sas: vec![
                install(with_policy(spec("a", Direction::In, 0x1000), "p")),
                install(with_policy(spec("b", Direction::In, 0x1001), "p")),
                install(spec("c", Direction::In, 0x1002)),
            ],
            policy: Some(PolicySpec {
                rules: vec![
                    rule_in("rp", "10.1.0.0/16", "p"),
                    rule_in("rc", "10.2.0.0/16", "c"),
                    rule_in("ra", "10.3.0.0/16", "a"),
                    rule_in("ghost", "10.4.0.0/16", "nobody"),
                ],
                default_action: DefaultActionName::Bypass,
            }),
            ..Default::default()
        };
        let p = plan_batch(&batch, &now(&db), &|n, d| db.slot(n, d)).unwrap();
        db.apply(p.installs).unwrap();
        let (table, _) = p.table.unwrap();
        let verdict = |src: &str| {
            let k = FlowKey {
                src: src.parse().unwrap(),
                dst: "10.0.0.1".parse().unwrap(),
                proto: 17,
                sport: 1,
                dport: 2,
                fragment: false,
            };
            match table.classify_one(Direction::In, &k) {
                Verdict::Protect { sa, .. } => sa,
                v => panic!("{v:?}"),
            }
        };
        let policy_of = |db: &Sadb, spi: u32| db.load().inbound_by_spi(spi).unwrap().1.policy;
        let (rp, rc, ra, ghost) = (
            verdict("10.1.0.1"),
            verdict("10.2.0.1"),
            verdict("10.3.0.1"),
            verdict("10.4.0.1"),
        );
        assert_eq!(policy_of(&db, 0x1000), rp);
        assert_eq!(policy_of(&db, 0x1001), rp);
        assert_eq!(policy_of(&db, 0x1002), rc, "no policy: its own name");
        assert_ne!(rc, rp);
        // `a` answers to `p` only; a rule naming an absent policy matches no SA.
        for id in [ra, ghost] {
            assert!(![0x1000, 0x1001, 0x1002]
                .iter()
                .any(|&s| policy_of(&db, s) == id));
        }
        // The old SA goes; the rule (not re-sent) still accepts the new one.
        let batch = Batch {
            sas: vec![WireSaChange::Remove {
                name: "a".into(),
                direction: Direction::In,
            }],
            ..Default::default()
        };
        let p = plan_batch(&batch, &now(&db), &|n, d| db.slot(n, d)).unwrap();
        assert!(p.table.is_none());
        db.apply(p.late_removes).unwrap();
        assert!(db.load().inbound_by_spi(0x1000).is_none());
        assert_eq!(policy_of(&db, 0x1001), rp);
    }

    #[test]
    fn datagrams_to_inject_are_checked() {
        let mut v4 = vec![
            0x45, 0, 0, 28, 0, 0, 0, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
        ];
        v4.extend([0u8; 8]);
        assert_eq!(
            check_datagram(&v4),
            Ok((
                "10.0.0.1".parse().unwrap(),
                "10.0.0.2".parse().unwrap(),
                wire::ETHERTYPE_IPV4
            ))
        );
        let mut short = v4.clone();
        short.pop();
        assert!(check_datagram(&short)
            .unwrap_err()
            .contains("total length 28"));
        let mut ihl = v4.clone();
        ihl[0] = 0x4f;
        assert!(check_datagram(&ihl).unwrap_err().contains("header length"));
        assert!(check_datagram(&[]).unwrap_err().contains("empty"));
        assert!(check_datagram(&[0x50; 40])
            .unwrap_err()
            .contains("version 5"));
        let mut v6 = vec![0x60, 0, 0, 0, 0, 8, 17, 64];
        v6.extend([0u8; 32]);
        v6.extend([0u8; 8]);
        assert!(check_datagram(&v6).is_ok());
        v6.push(0);
        assert!(check_datagram(&v6)
            .unwrap_err()
            .contains("payload length 8"));
        assert!(check_datagram(&vec![0x45; 3000])
            .unwrap_err()
            .contains("at most"));
    }
}
