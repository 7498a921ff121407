//! What control wants the dataplane to hold, and how to get there.
//!
//! [`Desired`] is control's truth: config SAs and rules (origin config),
//! those added through bitwctl (origin admin), and those found in the
//! dataplane that control did not know (adopted after a control restart).
//! [`plan`] compares it with what the dataplane reports ([`DataplaneState`])
//! and yields one atomic [`Batch`] with only the differences: an SA whose
//! fingerprint matches is left alone (keeping its sequence number and
//! counters), unknown admin SAs and rules are adopted, config ones that
//! are no longer wanted and IKE ones control does not hold are removed.
//!
//! Everything here is pure: no I/O, no clocks, so it is tested with plain values.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;

use bitw_common::config::{Config, DefaultAction};
use bitw_common::proto::{
    Batch, DataplaneState, DefaultActionName, Origin, PolicySpec, RuleSpec, SaChange, SaInfo,
    SaSpec,
};
use bitw_common::rules::{Action, Direction};

/// An SA by name and direction: the dataplane's key for SAs.
pub type SaKey = (String, Direction);

#[derive(Debug, Clone)]
pub struct DesiredSa {
    pub name: String,
    pub direction: Direction,
    pub origin: Origin,
    /// The full parameters, key included; `None` for an SA adopted from the
    /// dataplane (control never saw its key, so it cannot re-install it).
    pub spec: Option<SaSpec>,
    /// What the dataplane reported when the SA was adopted (no key).
    pub adopted: Option<SaInfo>,
}

impl DesiredSa {
    pub fn from_spec(spec: SaSpec) -> DesiredSa {
        DesiredSa {
            name: spec.name.clone(),
            direction: spec.direction,
            origin: spec.origin,
            spec: Some(spec),
            adopted: None,
        }
    }

    pub fn key(&self) -> SaKey {
        (self.name.clone(), self.direction)
    }

    pub fn is(&self, name: &str, direction: Direction) -> bool {
        self.name == name && self.direction == direction
    }

    pub fn spi(&self) -> u32 {
        match (&self.spec, &self.adopted) {
            (Some(s), _) => s.spi,
            (None, Some(i)) => i.spi,
            (None, None) => 0,
        }
    }

    pub fn fingerprint(&self) -> Option<String> {
        match (&self.spec, &self.adopted) {
            (Some(s), _) => Some(s.fingerprint()),
            (None, Some(i)) => Some(i.fingerprint.clone()),
            (None, None) => None,
        }
    }

    pub fn is_adopted(&self) -> bool {
        self.spec.is_none()
    }

    /// The name protect rules of its direction give this SA: inbound, its
    /// `policy` if it has one; else its name.
    pub fn policy_name(&self) -> &str {
        let policy = match (&self.spec, &self.adopted) {
            (Some(s), _) => s.policy.as_deref(),
            (None, Some(i)) => i.policy.as_deref(),
            (None, None) => None,
        };
        policy.unwrap_or(&self.name)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredRule {
    /// Normalised (see [`normalize_rule`]); `origin` says who asked for it.
    pub spec: RuleSpec,
    /// Found in the dataplane, not added through this control process.
    pub adopted: bool,
}

/// The whole desired state.
#[derive(Debug, Clone)]
pub struct Desired {
    /// Config SAs in file order, then the others in the order they came.
    pub sas: Vec<DesiredSa>,
    /// The filter table in order (both directions).
    pub rules: Vec<DesiredRule>,
    pub default_action: DefaultActionName,
    /// Sorted, without duplicates.
    pub punt_addrs: Vec<IpAddr>,
}

/// SAs and rules an administrator removed in the change being planned: the
/// dataplane still has them and, being of origin admin, they would otherwise
/// be adopted back.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Removals {
    pub sas: Vec<SaKey>,
    pub rules: Vec<String>,
}

/// The same rule written the same way, so a rule compares equal to what the
/// dataplane echoes back (`6` and `tcp`, `10.0.0.0/24` and its canonical form).
pub fn normalize_rule(r: &RuleSpec) -> RuleSpec {
    r.to_rule()
        .map(|rule| RuleSpec::from_rule(&rule, r.origin))
        .unwrap_or_else(|_| r.clone())
}

fn default_action_name(a: DefaultAction) -> DefaultActionName {
    match a {
        DefaultAction::Bypass => DefaultActionName::Bypass,
        DefaultAction::Discard => DefaultActionName::Discard,
    }
}

fn sorted_addrs(mut v: Vec<IpAddr>) -> Vec<IpAddr> {
    v.sort();
    v.dedup();
    v
}

/// Puts the rules of `old` that `extra` selects into `base`, each right
/// after the rule it followed in `old` (the nearest earlier rule that is in
/// `base`; those before any go first). Rules of `base` keep their order.
fn merge_rules(
    base: Vec<DesiredRule>,
    old: &[DesiredRule],
    extra: impl Fn(&DesiredRule) -> bool,
) -> Vec<DesiredRule> {
    let base_names: HashSet<String> = base.iter().map(|r| r.spec.name.clone()).collect();
    let mut head = Vec::new();
    let mut after: HashMap<String, Vec<DesiredRule>> = HashMap::new();
    let mut anchor: Option<&str> = None;
    for r in old {
        if base_names.contains(&r.spec.name) {
            anchor = Some(&r.spec.name);
        } else if extra(r) {
            match anchor {
                None => head.push(r.clone()),
                Some(a) => after.entry(a.to_string()).or_default().push(r.clone()),
            }
        }
    }
    let mut out = head;
    for b in base {
        let name = b.spec.name.clone();
        out.push(b);
        if let Some(v) = after.remove(&name) {
            out.extend(v);
        }
    }
    out
}

/// The protect rules of the connections' Child SAs, as strongSwan installs
/// policies from traffic selectors: outbound `local_ts -> remote_ts` with the
/// child's outbound SA (`connection/child`), inbound the reverse. They exist
/// before any SA does, so a terminal's first packet is held and triggers
/// IKE instead of leaving in clear. They come first in the table: what a
/// child covers is protected whatever the static rules say.
pub fn connection_rules(config: &Config) -> Vec<RuleSpec> {
    let mut out = Vec::new();
    // IPv6 neighbour discovery (router/neighbour solicitations and
    // advertisements, redirects: ICMPv6 types 133-137) stays on the link in
    // clear, or a /128 selector would swallow the terminal's own NDP with its
    // counterpart and neither could reach the other (IPv4's ARP is not IP).
    let v6 = config.connections.iter().any(|c| {
        c.children
            .iter()
            .any(|ch| ch.local_ts.iter().any(|p| p.addr.is_ipv6()))
    });
    if v6 {
        for dir in [Direction::Out, Direction::In] {
            out.push(RuleSpec {
                name: format!("ipv6-nd/{}", dir.as_str()),
                direction: dir,
                src: "::/0".into(),
                dst: "::/0".into(),
                proto: "icmpv6".into(),
                sport: "133-137".into(),
                dport: "any".into(),
                action: "bypass".into(),
                sa: None,
                origin: Origin::Config,
            });
        }
    }
    for c in &config.connections {
        for child in &c.children {
            let sa = c.child_sa_name(&child.name);
            let mut n = 0;
            for l in &child.local_ts {
                for r in child
                    .remote_ts
                    .iter()
                    .filter(|r| r.addr.is_ipv4() == l.addr.is_ipv4())
                {
                    n += 1;
                    for (dir, src, dst) in [(Direction::Out, l, r), (Direction::In, r, l)] {
                        out.push(RuleSpec {
                            name: format!("{sa}/{}{n}", dir.as_str()),
                            direction: dir,
                            src: src.to_string(),
                            dst: dst.to_string(),
                            proto: "any".into(),
                            sport: "any".into(),
                            dport: "any".into(),
                            action: "protect".into(),
                            sa: Some(sa.clone()),
                            origin: Origin::Config,
                        });
                    }
                }
            }
        }
    }
    out
}

impl Desired {
    /// The desired state of a configuration alone.
    pub fn from_config(config: &Config) -> Desired {
        Desired {
            sas: config
                .sas
                .iter()
                .map(|p| DesiredSa::from_spec(SaSpec::from_params(p, Origin::Config)))
                .collect(),
            rules: connection_rules(config)
                .into_iter()
                .chain(
                    config
                        .policies
                        .iter()
                        .map(|r| RuleSpec::from_rule(r, Origin::Config)),
                )
                .map(|spec| DesiredRule {
                    spec,
                    adopted: false,
                })
                .collect(),
            default_action: default_action_name(config.dataplane.default_action),
            punt_addrs: sorted_addrs(config.terminals.iter().map(|t| t.address).collect()),
        }
    }

    /// This state with its config part replaced by `config`'s (a reload).
    /// Admin and adopted SAs and rules stay; an admin rule stays right after
    /// the config rule it followed. Returns warnings for what had to give way.
    pub fn with_config(&self, config: &Config) -> (Desired, Vec<String>) {
        let fresh = Desired::from_config(config);
        let mut warnings = Vec::new();
        let mut sas = fresh.sas;
        for s in self.sas.iter().filter(|s| s.origin != Origin::Config) {
            if let Some(c) = sas.iter().find(|c| c.is(&s.name, s.direction)) {
                warnings.push(format!(
                    "{} SA `{}` ({}) is now in the config file: the config's parameters replace it",
                    s.origin.as_str(),
                    c.name,
                    c.direction.as_str()
                ));
                continue;
            }
            if let Some(c) = sas.iter().find(|c| {
                c.direction == s.direction && c.spi() == s.spi() && c.origin == Origin::Config
            }) {
                warnings.push(format!(
                    "{} SA `{}` ({}) is removed: config SA `{}` now uses its SPI {:#010x}",
                    s.origin.as_str(),
                    s.name,
                    s.direction.as_str(),
                    c.name,
                    s.spi()
                ));
                continue;
            }
            sas.push(s.clone());
        }
        let config_names: HashSet<&str> =
            fresh.rules.iter().map(|r| r.spec.name.as_str()).collect();
        for r in self
            .rules
            .iter()
            .filter(|r| r.spec.origin != Origin::Config)
        {
            if config_names.contains(r.spec.name.as_str()) {
                warnings.push(format!(
                    "{} rule `{}` is now in the config file: the config's rule replaces it",
                    r.spec.origin.as_str(),
                    r.spec.name
                ));
            }
        }
        let rules = merge_rules(fresh.rules, &self.rules, |r| {
            r.spec.origin != Origin::Config
        });
        (
            Desired {
                sas,
                rules,
                default_action: fresh.default_action,
                punt_addrs: fresh.punt_addrs,
            },
            warnings,
        )
    }

    /// The IKE proxy's change: SAs installed (replacing any of the same name
    /// and direction) and removed.
    pub fn ike_change(&self, install: &[SaSpec], remove: &[SaKey]) -> Desired {
        let mut d = self.clone();
        d.sas
            .retain(|s| !remove.iter().any(|(n, dir)| s.is(n, *dir)));
        for spec in install {
            match d.sas.iter_mut().find(|s| s.is(&spec.name, spec.direction)) {
                Some(s) => *s = DesiredSa::from_spec(spec.clone()),
                None => d.sas.push(DesiredSa::from_spec(spec.clone())),
            }
        }
        d
    }

    pub fn find_sa(&self, name: &str, direction: Direction) -> Option<&DesiredSa> {
        self.sas.iter().find(|s| s.is(name, direction))
    }

    /// The filter table to send.
    pub fn policy(&self) -> PolicySpec {
        PolicySpec {
            rules: self.rules.iter().map(|r| r.spec.clone()).collect(),
            default_action: self.default_action,
        }
    }

    /// The SAs of a direction that protect rules naming `name` use (inbound:
    /// those whose policy name it is; outbound: the SA of that name).
    pub fn sas_answering(&self, name: &str, direction: Direction) -> Vec<&DesiredSa> {
        self.sas
            .iter()
            .filter(|s| s.direction == direction && s.policy_name() == name)
            .collect()
    }

    /// Names of the protect rules of a direction that name `name` (an SA's
    /// name, or inbound, its policy name).
    pub fn rules_using(&self, name: &str, direction: Direction) -> Vec<String> {
        self.rules
            .iter()
            .filter(|r| {
                r.spec.direction == direction
                    && r.spec.action == "protect"
                    && r.spec.sa.as_deref() == Some(name)
            })
            .map(|r| r.spec.name.clone())
            .collect()
    }

    /// `bitwctl sa add`: a new admin SA. Returns the new state and notes.
    pub fn add_sa(&self, mut spec: SaSpec) -> Result<(Desired, Vec<String>), String> {
        spec.origin = Origin::Admin;
        spec.to_params()?;
        if let Some(s) = self.find_sa(&spec.name, spec.direction) {
            return Err(format!(
                "an SA `{}` ({}) already exists (origin {}); delete it first with `bitwctl sa del {} --direction {}`",
                s.name,
                s.direction.as_str(),
                s.origin.as_str(),
                s.name,
                s.direction.as_str()
            ));
        }
        if let Some(s) = self
            .sas
            .iter()
            .find(|s| s.direction == spec.direction && s.spi() == spec.spi)
        {
            return Err(format!(
                "SPI {:#010x} is already used by {} SA `{}` of the same direction",
                spec.spi,
                s.origin.as_str(),
                s.name
            ));
        }
        let mut notes = Vec::new();
        let pname = spec.policy.as_deref().unwrap_or(&spec.name);
        let users = self.rules_using(pname, spec.direction);
        if users.is_empty() && pname != spec.name {
            notes.push(format!(
                "no inbound protect rule names policy `{pname}` of SA `{}` yet (add one with `bitwctl policy add … --direction in --action protect --sa {pname}`)",
                spec.name
            ));
        } else if users.is_empty() {
            notes.push(format!(
                "no protect rule uses SA `{}` yet (add one with `bitwctl policy add … --action protect --sa {}`)",
                spec.name, spec.name
            ));
        }
        let mut d = self.clone();
        d.sas.push(DesiredSa::from_spec(spec));
        Ok((d, notes))
    }

    /// `bitwctl sa del`: removes the SA of that name (of either direction
    /// unless one is given).
    pub fn del_sa(
        &self,
        name: &str,
        direction: Option<Direction>,
    ) -> Result<(Desired, Removals, Vec<String>), String> {
        let hit = |s: &DesiredSa| s.name == name && direction.is_none_or(|d| d == s.direction);
        let gone: Vec<&DesiredSa> = self.sas.iter().filter(|s| hit(s)).collect();
        if gone.is_empty() {
            return Err(match direction {
                Some(d) => format!("no SA named `{name}` with direction {}", d.as_str()),
                None => format!("no SA named `{name}`"),
            });
        }
        let mut notes = Vec::new();
        let mut removals = Removals::default();
        for s in &gone {
            removals.sas.push(s.key());
            if s.origin == Origin::Config {
                notes.push(format!(
                    "warning: SA `{}` ({}) comes from the config file: it comes back on the next reload unless you remove it there",
                    s.name,
                    s.direction.as_str()
                ));
            }
            // Inbound, rules name a policy name; another SA may still answer to it.
            let pname = s.policy_name();
            let others = self
                .sas_answering(pname, s.direction)
                .iter()
                .any(|o| !hit(o));
            let users = self.rules_using(pname, s.direction);
            if !users.is_empty() && others {
                // The rules keep working with the SAs that remain.
            } else if !users.is_empty() && s.direction == Direction::In {
                notes.push(format!(
                    "inbound protect rule(s) {} still name `{pname}`: no SA answers to it any more, so what they match is dropped",
                    users.join(", "),
                ));
            } else if !users.is_empty() {
                notes.push(format!(
                    "protect rule(s) {} still name SA `{}`: their packets are now held and acquired",
                    users.join(", "),
                    s.name
                ));
            }
        }
        let mut d = self.clone();
        d.sas.retain(|s| !hit(s));
        Ok((d, removals, notes))
    }

    /// `bitwctl policy add`: a new admin rule, before `before`, at 1-based
    /// `position`, or appended.
    pub fn add_rule(
        &self,
        mut spec: RuleSpec,
        before: Option<&str>,
        position: Option<usize>,
    ) -> Result<(Desired, Vec<String>), String> {
        spec.origin = Origin::Admin;
        let rule = spec.to_rule()?;
        let spec = RuleSpec::from_rule(&rule, Origin::Admin);
        if let Some(r) = self.rules.iter().find(|r| r.spec.name == spec.name) {
            return Err(format!(
                "a rule `{}` already exists (origin {}); delete it first or pick another name",
                r.spec.name,
                r.spec.origin.as_str()
            ));
        }
        let mut notes = Vec::new();
        if let Action::Protect { sa } = &rule.action {
            let same = self.sas_answering(sa, rule.direction).first().copied();
            let other = self.sas.iter().find(|s| &s.name == sa);
            match (same, other) {
                (Some(_), _) => {}
                (None, Some(o)) if o.direction == rule.direction => {
                    return Err(format!(
                        "SA `{sa}` has policy `{}`: inbound rules name it by that",
                        o.policy_name()
                    ))
                }
                (None, Some(o)) => {
                    return Err(format!(
                        "SA `{sa}` is an {} SA but rule `{}` is for direction {}",
                        o.direction.as_str(),
                        spec.name,
                        rule.direction.as_str()
                    ))
                }
                (None, None) if rule.direction == Direction::In => notes.push(format!(
                    "no inbound SA is named `{sa}` or has policy `{sa}` yet: what this rule matches is dropped until one is"
                )),
                (None, None) => notes.push(format!(
                    "SA `{sa}` is not installed yet: packets this rule matches will be held and acquired until it is"
                )),
            }
        }
        let at = match (before, position) {
            (Some(_), Some(_)) => return Err("give --before or --position, not both".into()),
            (Some(b), None) => self
                .rules
                .iter()
                .position(|r| r.spec.name == b)
                .ok_or_else(|| format!("--before: no rule named `{b}`"))?,
            (None, Some(0)) => return Err("--position counts from 1".into()),
            (None, Some(p)) if p > self.rules.len() + 1 => {
                return Err(format!(
                    "--position {p}: the table has {} rules (positions 1 to {})",
                    self.rules.len(),
                    self.rules.len() + 1
                ))
            }
            (None, Some(p)) => p - 1,
            (None, None) => self.rules.len(),
        };
        let mut d = self.clone();
        d.rules.insert(
            at,
            DesiredRule {
                spec,
                adopted: false,
            },
        );
        Ok((d, notes))
    }

    /// `bitwctl policy del`.
    pub fn del_rule(&self, name: &str) -> Result<(Desired, Removals, Vec<String>), String> {
        let Some(r) = self.rules.iter().find(|r| r.spec.name == name) else {
            return Err(format!("no rule named `{name}`"));
        };
        let mut notes = Vec::new();
        if r.spec.origin == Origin::Config {
            notes.push(format!(
                "warning: rule `{name}` comes from the config file: it comes back on the next reload unless you remove it there"
            ));
        }
        let mut d = self.clone();
        d.rules.retain(|r| r.spec.name != name);
        Ok((
            d,
            Removals {
                sas: vec![],
                rules: vec![name.to_string()],
            },
            notes,
        ))
    }
}

/// The result of comparing a desired state with the dataplane's.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The changes to send (empty when nothing differs).
    pub batch: Batch,
    /// The desired state with adoptions added and lost SAs dropped.
    pub desired: Desired,
    pub installs: Vec<SaKey>,
    pub replaces: Vec<SaKey>,
    pub removes: Vec<SaKey>,
    pub unchanged: Vec<SaKey>,
    pub adopted_sas: Vec<SaInfo>,
    pub adopted_rules: Vec<String>,
    /// Adopted SAs the dataplane no longer has (it restarted): control has
    /// no key to put them back.
    pub lost: Vec<DesiredSa>,
    pub policy_changed: bool,
    pub punt_changed: bool,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.batch.sas.is_empty() && self.batch.policy.is_none() && self.batch.punt_addrs.is_none()
    }

    pub fn adopted(&self) -> usize {
        self.adopted_sas.len() + self.adopted_rules.len()
    }
}

/// Compares `desired` with the dataplane's `state` and returns the batch
/// that makes them equal, with only the differences in it.
pub fn plan(desired: &Desired, state: &DataplaneState, removals: &Removals) -> Plan {
    let mut out = Plan {
        batch: Batch::default(),
        desired: desired.clone(),
        installs: vec![],
        replaces: vec![],
        removes: vec![],
        unchanged: vec![],
        adopted_sas: vec![],
        adopted_rules: vec![],
        lost: vec![],
        policy_changed: false,
        punt_changed: false,
    };
    let held: HashMap<SaKey, &SaInfo> = state
        .sas
        .iter()
        .map(|s| ((s.name.clone(), s.direction), s))
        .collect();

    // SAs control wants.
    let mut installs = Vec::new();
    let mut kept = Vec::with_capacity(desired.sas.len());
    for d in &desired.sas {
        let key = d.key();
        match (&d.spec, held.get(&key)) {
            (Some(spec), Some(h)) if h.fingerprint == spec.fingerprint() => {
                out.unchanged.push(key);
                kept.push(d.clone());
            }
            (Some(spec), Some(_)) => {
                out.replaces.push(key);
                installs.push(SaChange::Install(spec.clone()));
                kept.push(d.clone());
            }
            (Some(spec), None) => {
                out.installs.push(key);
                installs.push(SaChange::Install(spec.clone()));
                kept.push(d.clone());
            }
            (None, Some(h)) => {
                out.unchanged.push(key);
                let mut d = d.clone();
                d.adopted = Some((*h).clone());
                kept.push(d);
            }
            (None, None) => out.lost.push(d.clone()),
        }
    }
    // SAs the dataplane has that control does not want, or does not know.
    let mut removes = Vec::new();
    for h in &state.sas {
        let key = (h.name.clone(), h.direction);
        if desired.find_sa(&h.name, h.direction).is_some() {
            continue;
        }
        // An IKE SA control does not hold belongs to an IKE SA that died
        // with the previous control process: nothing can rekey or delete it
        // with the peer, and while it stays the terminal's traffic would use
        // it without ever asking for a new one. It goes; the next packet
        // negotiates afresh (with INITIAL_CONTACT, so the peer drops its side).
        if h.origin == Origin::Config || h.origin == Origin::Ike || removals.sas.contains(&key) {
            out.removes.push(key);
            removes.push(SaChange::Remove {
                name: h.name.clone(),
                direction: h.direction,
            });
        } else {
            out.adopted_sas.push(h.clone());
            kept.push(DesiredSa {
                name: h.name.clone(),
                direction: h.direction,
                origin: h.origin,
                spec: None,
                adopted: Some(h.clone()),
            });
        }
    }
    out.desired.sas = kept;
    // Removals first, so an SPI freed by one can be taken by an install.
    out.batch.sas = removes;
    out.batch.sas.extend(installs);

    // Rules: adopt the dataplane's admin/IKE rules control does not know,
    // each after the rule it follows there.
    let theirs: Vec<DesiredRule> = state
        .policy
        .as_ref()
        .map(|p| {
            p.rules
                .iter()
                .map(|r| DesiredRule {
                    spec: normalize_rule(r),
                    adopted: true,
                })
                .collect()
        })
        .unwrap_or_default();
    let known: HashSet<&str> = desired.rules.iter().map(|r| r.spec.name.as_str()).collect();
    let is_new_extra = |r: &DesiredRule| {
        r.spec.origin != Origin::Config
            && !known.contains(r.spec.name.as_str())
            && !removals.rules.contains(&r.spec.name)
    };
    out.adopted_rules = theirs
        .iter()
        .filter(|r| is_new_extra(r))
        .map(|r| r.spec.name.clone())
        .collect();
    if !out.adopted_rules.is_empty() {
        out.desired.rules = merge_rules(desired.rules.clone(), &theirs, is_new_extra);
    }
    let want = out.desired.policy();
    let same = state.policy.as_ref().is_some_and(|p| {
        p.default_action == want.default_action
            && p.rules.len() == want.rules.len()
            && p.rules
                .iter()
                .zip(&want.rules)
                .all(|(a, b)| normalize_rule(a) == normalize_rule(b))
    });
    if !same {
        out.policy_changed = true;
        out.batch.policy = Some(want);
    }

    if sorted_addrs(state.punt_addrs.clone()) != desired.punt_addrs {
        out.punt_changed = true;
        out.batch.punt_addrs = Some(desired.punt_addrs.clone());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use bitw_common::proto::LimitsSpec;
    use zeroize::Zeroizing;

    pub(crate) fn sa(name: &str, dir: Direction, spi: u32, origin: Origin) -> SaSpec {
        SaSpec {
            name: name.into(),
            direction: dir,
            spi,
            mode: "transport".into(),
            tunnel_src: None,
            tunnel_dst: None,
            encap: "none".into(),
            udp_sport: 4500,
            udp_dport: 4500,
            aead: "aes128gcm16".into(),
            key: Zeroizing::new(format!("{spi:032x}01020304")),
            esn: true,
            replay_window: 0,
            lifetime_packets: LimitsSpec::default(),
            lifetime_bytes: LimitsSpec::default(),
            origin,
            policy: None,
        }
    }

    pub(crate) fn rule(
        name: &str,
        dir: Direction,
        action: &str,
        sa: Option<&str>,
        origin: Origin,
    ) -> RuleSpec {
        RuleSpec {
            name: name.into(),
            direction: dir,
            src: "10.0.0.0/24".into(),
            dst: "any".into(),
            proto: "any".into(),
            sport: "any".into(),
            dport: "any".into(),
            action: action.into(),
            sa: sa.map(Into::into),
            origin,
        }
    }

    /// What a dataplane reports for an installed SA.
    fn info(s: &SaSpec, packets: u64) -> SaInfo {
        SaInfo {
            name: s.name.clone(),
            direction: s.direction,
            spi: s.spi,
            mode: s.mode.clone(),
            tunnel_src: s.tunnel_src,
            tunnel_dst: s.tunnel_dst,
            encap: s.encap.clone(),
            aead: s.aead.clone(),
            esn: s.esn,
            replay_window: s.replay_window,
            origin: s.origin,
            fingerprint: s.fingerprint(),
            packets,
            bytes: packets * 100,
            sequence: packets,
            expired: false,
            owner_worker: 0,
            policy: s.policy.clone(),
        }
    }

    fn desired(sas: Vec<SaSpec>, rules: Vec<RuleSpec>) -> Desired {
        Desired {
            sas: sas.into_iter().map(DesiredSa::from_spec).collect(),
            rules: rules
                .into_iter()
                .map(|spec| DesiredRule {
                    spec,
                    adopted: false,
                })
                .collect(),
            default_action: DefaultActionName::Bypass,
            punt_addrs: vec![],
        }
    }

    fn state_of(d: &Desired, sas: Vec<SaInfo>) -> DataplaneState {
        DataplaneState {
            instance: "dp-1".into(),
            sas,
            policy: Some(d.policy()),
            punt_addrs: d.punt_addrs.clone(),
            neighbors: vec![],
            held_packets: 0,
        }
    }

    fn names(v: &[SaKey]) -> Vec<&str> {
        v.iter().map(|k| k.0.as_str()).collect()
    }

    #[test]
    fn identical_fingerprint_is_left_alone() {
        let a = sa("a", Direction::Out, 0x1001, Origin::Config);
        let d = desired(
            vec![a.clone()],
            vec![rule(
                "r",
                Direction::Out,
                "protect",
                Some("a"),
                Origin::Config,
            )],
        );
        let st = state_of(&d, vec![info(&a, 42)]);
        let p = plan(&d, &st, &Removals::default());
        assert!(p.is_empty(), "{:?}", p.batch);
        assert_eq!(names(&p.unchanged), ["a"]);
        // Origin alone does not make an SA different.
        let mut i = info(&a, 42);
        i.origin = Origin::Admin;
        assert!(plan(&d, &state_of(&d, vec![i]), &Removals::default()).is_empty());
    }

    #[test]
    fn inbound_sas_sharing_a_policy_name() {
        let pol = |mut s: SaSpec| {
            s.policy = Some("p".into());
            s
        };
        let a = pol(sa("a", Direction::In, 0x600, Origin::Admin));
        let r = rule("r", Direction::In, "protect", Some("p"), Origin::Admin);
        let d = desired(vec![a.clone()], vec![r]);
        assert_eq!(d.rules_using(d.sas[0].policy_name(), Direction::In), ["r"]);
        // The rekeyed SA joins the policy name: the rule already covers it.
        let (d, notes) = d
            .add_sa(pol(sa("b", Direction::In, 0x601, Origin::Admin)))
            .unwrap();
        assert!(notes.is_empty(), "{notes:?}");
        assert_eq!(d.sas_answering("p", Direction::In).len(), 2);
        // The old one goes: the rule keeps working for the new one, no note.
        let (d1, _, notes) = d.del_sa("a", Some(Direction::In)).unwrap();
        assert!(notes.is_empty(), "{notes:?}");
        let (_, _, notes) = d1.del_sa("b", Some(Direction::In)).unwrap();
        assert!(notes[0].contains("still name `p`"), "{notes:?}");
        // A rule naming an SA by its own name while it has a policy name is refused.
        let e = d
            .add_rule(
                rule("ra", Direction::In, "protect", Some("a"), Origin::Admin),
                None,
                None,
            )
            .unwrap_err();
        assert!(e.contains("has policy `p`"), "{e}");
        // A changed policy name makes another SA: replaced.
        let plain = sa("a", Direction::In, 0x600, Origin::Admin);
        let st = state_of(&d, vec![info(&plain, 1)]);
        let p = plan(&desired(vec![a], vec![]), &st, &Removals::default());
        assert_eq!(names(&p.replaces), ["a"]);
    }

    #[test]
    fn changed_parameters_replace_and_missing_install() {
        let a = sa("a", Direction::Out, 0x1001, Origin::Config);
        let b = sa("b", Direction::In, 0x2002, Origin::Config);
        let mut a2 = a.clone();
        a2.key = Zeroizing::new("ff".repeat(20));
        let d = desired(vec![a2, b], vec![]);
        let st = state_of(&d, vec![info(&a, 1)]);
        let p = plan(&d, &st, &Removals::default());
        assert_eq!(names(&p.replaces), ["a"]);
        assert_eq!(names(&p.installs), ["b"]);
        assert_eq!(p.batch.sas.len(), 2);
        assert!(p.batch.policy.is_none() && p.batch.punt_addrs.is_none());
        // The key travels only inside the batch, never in Debug output.
        assert!(!format!("{:?}", p.batch).contains("ffff"));
    }

    #[test]
    fn config_sa_gone_from_config_is_removed_admin_is_adopted_stale_ike_removed() {
        let a = sa("a", Direction::Out, 0x1001, Origin::Config);
        let old = sa("old", Direction::Out, 0x1002, Origin::Config);
        let adm = sa("adm", Direction::In, 0x3003, Origin::Admin);
        let ike = sa("ike", Direction::In, 0x3004, Origin::Ike);
        let d = desired(vec![a.clone()], vec![]);
        let st = state_of(
            &d,
            vec![info(&a, 5), info(&old, 5), info(&adm, 7), info(&ike, 1)],
        );
        let p = plan(&d, &st, &Removals::default());
        assert_eq!(names(&p.removes), ["old", "ike"]);
        assert!(
            matches!(&p.batch.sas[..], [SaChange::Remove { name, .. }, SaChange::Remove { name: n2, .. }] if name == "old" && n2 == "ike")
        );
        assert_eq!(p.adopted_sas.len(), 1);
        let adopted = p.desired.find_sa("adm", Direction::In).unwrap();
        assert!(adopted.is_adopted() && adopted.origin == Origin::Admin);
        assert_eq!(adopted.spi(), 0x3003);
        // Planning again against the same dataplane changes nothing more.
        let st2 = state_of(&p.desired, vec![info(&a, 5), info(&adm, 7)]);
        let p2 = plan(&p.desired, &st2, &Removals::default());
        assert!(p2.is_empty() && p2.adopted() == 0, "{:?}", p2.batch);
        // An explicit admin removal removes instead of adopting.
        let (d3, rm, _) = p.desired.del_sa("adm", None).unwrap();
        let p3 = plan(&d3, &st2, &rm);
        assert_eq!(names(&p3.removes), ["adm"]);
    }

    #[test]
    fn adopted_sa_lost_when_the_dataplane_restarts() {
        let adm = sa("adm", Direction::In, 0x3003, Origin::Admin);
        let d0 = desired(vec![], vec![]);
        let p = plan(
            &d0,
            &state_of(&d0, vec![info(&adm, 1)]),
            &Removals::default(),
        );
        let fresh = DataplaneState::default();
        let p2 = plan(&p.desired, &fresh, &Removals::default());
        assert_eq!(p2.lost.len(), 1);
        assert!(p2.desired.sas.is_empty());
        assert!(p2.batch.sas.is_empty(), "no key: nothing to install");
        // A restarted dataplane without policy gets the whole table.
        assert!(p2.batch.policy.is_some());
    }

    #[test]
    fn rules_adopted_in_place_and_policy_order_kept() {
        let c1 = rule("c1", Direction::Out, "bypass", None, Origin::Config);
        let c2 = rule("c2", Direction::Out, "discard", None, Origin::Config);
        let a1 = rule("a1", Direction::Out, "bypass", None, Origin::Admin);
        let a0 = rule("a0", Direction::In, "discard", None, Origin::Admin);
        let d = desired(vec![], vec![c1.clone(), c2.clone()]);
        let mut st = state_of(&d, vec![]);
        st.policy = Some(PolicySpec {
            rules: vec![a0.clone(), c1.clone(), a1.clone(), c2.clone()],
            default_action: DefaultActionName::Bypass,
        });
        let p = plan(&d, &st, &Removals::default());
        let order: Vec<&str> = p
            .desired
            .rules
            .iter()
            .map(|r| r.spec.name.as_str())
            .collect();
        assert_eq!(order, ["a0", "c1", "a1", "c2"]);
        assert_eq!(p.adopted_rules, ["a0", "a1"]);
        assert!(
            p.batch.policy.is_none(),
            "the table already is what we want"
        );
        assert!(p.desired.rules[0].adopted);
        // A config rule the dataplane has but the config lost: the table is replaced.
        let d2 = desired(vec![], vec![c2.clone()]);
        let p2 = plan(&d2, &st, &Removals::default());
        let sent: Vec<&str> = p2
            .batch
            .policy
            .as_ref()
            .unwrap()
            .rules
            .iter()
            .map(|r| r.name.as_str())
            .collect();
        assert_eq!(sent, ["a0", "a1", "c2"]);
    }

    #[test]
    fn policy_compares_normalised_and_punt_addrs_as_sets() {
        let mut c1 = rule("c1", Direction::Out, "bypass", None, Origin::Config);
        c1.proto = "tcp".into();
        c1.dport = "443".into();
        let mut d = desired(vec![], vec![c1.clone()]);
        d.punt_addrs = vec!["10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap()];
        let mut st = state_of(&d, vec![]);
        let mut echoed = c1.clone();
        echoed.proto = "6".into();
        echoed.dport = "443-443".into();
        st.policy.as_mut().unwrap().rules = vec![echoed];
        st.punt_addrs = vec!["10.0.0.2".parse().unwrap(), "10.0.0.1".parse().unwrap()];
        assert!(plan(&d, &st, &Removals::default()).is_empty());
        st.punt_addrs.pop();
        let p = plan(&d, &st, &Removals::default());
        assert!(p.punt_changed && p.batch.punt_addrs.as_ref().unwrap().len() == 2);
        st.policy.as_mut().unwrap().default_action = DefaultActionName::Discard;
        assert!(plan(&d, &st, &Removals::default()).policy_changed);
    }

    #[test]
    fn admin_changes_validate_and_place_rules() {
        let c1 = rule("c1", Direction::Out, "bypass", None, Origin::Config);
        let c2 = rule("c2", Direction::Out, "bypass", None, Origin::Config);
        let d = desired(
            vec![sa("x", Direction::In, 0x500, Origin::Config)],
            vec![c1, c2],
        );
        // Appended, before a rule, at a position.
        let (d, _) = d
            .add_rule(
                rule("end", Direction::Out, "discard", None, Origin::Config),
                None,
                None,
            )
            .unwrap();
        let (d, _) = d
            .add_rule(
                rule("b4", Direction::Out, "discard", None, Origin::Config),
                Some("c2"),
                None,
            )
            .unwrap();
        let (d, _) = d
            .add_rule(
                rule("first", Direction::In, "discard", None, Origin::Config),
                None,
                Some(1),
            )
            .unwrap();
        let order: Vec<&str> = d.rules.iter().map(|r| r.spec.name.as_str()).collect();
        assert_eq!(order, ["first", "c1", "b4", "c2", "end"]);
        assert!(d
            .rules
            .iter()
            .filter(|r| r.spec.name != "c1" && r.spec.name != "c2")
            .all(|r| r.spec.origin == Origin::Admin));
        assert!(d
            .add_rule(
                rule("c1", Direction::Out, "bypass", None, Origin::Admin),
                None,
                None
            )
            .unwrap_err()
            .contains("already exists"));
        assert!(d
            .add_rule(
                rule("z", Direction::Out, "bypass", None, Origin::Admin),
                Some("nope"),
                None
            )
            .is_err());
        assert!(d
            .add_rule(
                rule("z", Direction::Out, "bypass", None, Origin::Admin),
                None,
                Some(99)
            )
            .is_err());
        // A protect rule: SA missing → a note; SA of the other direction → refused.
        let (_, notes) = d
            .add_rule(
                rule("p", Direction::Out, "protect", Some("later"), Origin::Admin),
                None,
                None,
            )
            .unwrap();
        assert!(notes[0].contains("held and acquired"), "{notes:?}");
        assert!(d
            .add_rule(
                rule("p", Direction::Out, "protect", Some("x"), Origin::Admin),
                None,
                None
            )
            .unwrap_err()
            .contains("an in SA"));
        // SAs: duplicates, SPI clashes, bad parameters; deleting config SAs warns.
        let (d2, _) = d
            .add_sa(sa("y", Direction::In, 0x600, Origin::Config))
            .unwrap();
        assert_eq!(
            d2.find_sa("y", Direction::In).unwrap().origin,
            Origin::Admin
        );
        assert!(d2
            .add_sa(sa("y", Direction::In, 0x601, Origin::Admin))
            .unwrap_err()
            .contains("already exists"));
        assert!(d2
            .add_sa(sa("z", Direction::In, 0x600, Origin::Admin))
            .unwrap_err()
            .contains("SPI"));
        assert!(d2
            .add_sa(sa("z", Direction::In, 3, Origin::Admin))
            .unwrap_err()
            .contains("spi"));
        let (d3, rm, notes) = d2.del_sa("x", None).unwrap();
        assert_eq!(rm.sas, vec![("x".to_string(), Direction::In)]);
        assert!(
            notes[0].contains("comes back on the next reload"),
            "{notes:?}"
        );
        assert!(d3.find_sa("x", Direction::In).is_none());
        assert!(d3.del_sa("x", None).is_err());
        let (d4, rm, notes) = d3.del_rule("c1").unwrap();
        assert_eq!(rm.rules, ["c1"]);
        assert!(notes[0].contains("warning"));
        assert!(d4.del_rule("c1").is_err());
    }
}
