//! What the dataplane knows about the hosts on each port, to give injected
//! datagrams an Ethernet header (the box has no address, so it never ARPs):
//!
//! - neighbours: (port, IP) → MAC, from ARP and NDP (sender / target link-layer
//!   addresses) and from the source of punted and held frames;
//! - gateways: (port, IP) → the MAC that traffic for that IP uses on that port
//!   toward the far side (the source MAC of frames arriving on the port
//!   addressed *to* the IP; the destination MAC the host itself used when
//!   sending from the other port);
//! - addressed: (port, IP) → the destination MAC frames arriving on the port
//!   use for the IP (how the far side reaches it).
//!
//! Each table is bounded; when full, the entry updated longest ago goes.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;
use std::net::IpAddr;

use bitw_common::proto::{Mac, Neighbor, PortName};

/// Entries per table.
pub const NEIGHBOR_CAP: usize = 65_536;

/// A map with a size bound that evicts the least recently updated entry.
pub struct BoundedMap<K, V> {
    cap: usize,
    map: HashMap<K, (V, u64)>,
    order: BTreeMap<u64, K>,
    next: u64,
}

impl<K: Hash + Eq + Clone, V: PartialEq + Copy> BoundedMap<K, V> {
    pub fn new(cap: usize) -> Self {
        BoundedMap {
            cap: cap.max(1),
            map: HashMap::new(),
            order: BTreeMap::new(),
            next: 0,
        }
    }

    /// Inserts or updates; true when the key is new or its value changed.
    /// An unchanged value is not refreshed in the eviction order: a host that
    /// keeps announcing itself must not push out the rest.
    pub fn insert(&mut self, k: K, v: V) -> bool {
        if let Some((old, seq)) = self.map.get_mut(&k) {
            if *old == v {
                return false;
            }
            self.order.remove(seq);
            *old = v;
            *seq = self.next;
            self.order.insert(self.next, k);
            self.next += 1;
            return true;
        }
        if self.map.len() >= self.cap {
            if let Some((_, oldest)) = self.order.pop_first() {
                self.map.remove(&oldest);
            }
        }
        self.map.insert(k.clone(), (v, self.next));
        self.order.insert(self.next, k);
        self.next += 1;
        true
    }

    pub fn get(&self, k: &K) -> Option<V> {
        self.map.get(k).map(|(v, _)| *v)
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.map.iter().map(|(k, (v, _))| (k, v))
    }
}

fn other(p: PortName) -> PortName {
    match p {
        PortName::Inside => PortName::Outside,
        PortName::Outside => PortName::Inside,
    }
}

fn unicast(m: &Mac) -> bool {
    m.0[0] & 1 == 0 && m.0 != [0; 6]
}

fn host(ip: &IpAddr) -> bool {
    !ip.is_unspecified() && !ip.is_multicast() && ip != &IpAddr::from([255, 255, 255, 255])
}

type Key = (PortName, IpAddr);

pub struct Neighbors {
    neighbors: BoundedMap<Key, Mac>,
    gateways: BoundedMap<Key, Mac>,
    addressed: BoundedMap<Key, Mac>,
}

impl Neighbors {
    pub fn new(cap: usize) -> Neighbors {
        Neighbors {
            neighbors: BoundedMap::new(cap),
            gateways: BoundedMap::new(cap),
            addressed: BoundedMap::new(cap),
        }
    }

    /// A neighbour seen (ARP, NDP, the source of a frame); returns it when new or moved.
    pub fn learn(&mut self, port: PortName, ip: IpAddr, mac: Mac) -> Option<Neighbor> {
        (host(&ip) && unicast(&mac) && self.neighbors.insert((port, ip), mac)).then_some(Neighbor {
            port,
            ip,
            mac,
        })
    }

    /// Everything an IP frame arriving on `port` shows: its source host, and
    /// the gateway and addressed MACs of its addresses. Returns a neighbour
    /// that is new or moved.
    pub fn learn_frame(
        &mut self,
        port: PortName,
        src: IpAddr,
        dst: IpAddr,
        src_mac: Mac,
        dst_mac: Mac,
    ) -> Option<Neighbor> {
        if host(&dst) && unicast(&src_mac) {
            self.gateways.insert((port, dst), src_mac);
        }
        if host(&dst) && unicast(&dst_mac) {
            self.addressed.insert((port, dst), dst_mac);
        }
        if host(&src) && unicast(&dst_mac) {
            self.gateways.insert((other(port), src), dst_mac);
        }
        self.learn(port, src, src_mac)
    }

    /// The (source, destination) MACs for a datagram from `src` to `dst` sent
    /// out of `port`, or what is missing.
    pub fn macs_for(&self, port: PortName, src: IpAddr, dst: IpAddr) -> Result<(Mac, Mac), String> {
        let dst_mac = self
            .neighbors
            .get(&(port, dst))
            .or_else(|| self.gateways.get(&(port, src)))
            .ok_or_else(|| {
                format!(
                    "no MAC known for {dst} on port {}: neither a neighbour (ARP/NDP) nor a \
                     gateway seen carrying {src}'s traffic there",
                    port.as_str()
                )
            })?;
        let src_mac = self
            .neighbors
            .get(&(other(port), src))
            .or_else(|| self.addressed.get(&(port, src)))
            .ok_or_else(|| {
                format!(
                    "no MAC known for source {src}: not seen on port {} nor addressed on port {}",
                    other(port).as_str(),
                    port.as_str()
                )
            })?;
        Ok((src_mac, dst_mac))
    }

    /// The neighbour table, sorted (port, address).
    pub fn list(&self) -> Vec<Neighbor> {
        let mut v: Vec<Neighbor> = self
            .neighbors
            .iter()
            .map(|(&(port, ip), &mac)| Neighbor { port, ip, mac })
            .collect();
        v.sort_by_key(|n| (n.port == PortName::Outside, n.ip));
        v
    }

    pub fn len(&self) -> usize {
        self.neighbors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.neighbors.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mac(last: u8) -> Mac {
        Mac([2, 0, 0, 0, 0, last])
    }
    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn bounded_map_reports_changes_and_evicts_the_stalest() {
        let mut m = BoundedMap::new(2);
        assert!(m.insert(1, 'a'));
        assert!(!m.insert(1, 'a'), "same value: no change");
        assert!(m.insert(2, 'b'));
        assert!(m.insert(1, 'c'), "changed value");
        // 2 is now the least recently updated.
        assert!(m.insert(3, 'd'));
        assert_eq!(m.get(&2), None);
        assert_eq!((m.get(&1), m.get(&3)), (Some('c'), Some('d')));
        assert_eq!(m.len(), 2);
    }

    #[test]
    fn learning_ignores_what_is_not_a_host() {
        let mut n = Neighbors::new(16);
        assert!(n.learn(PortName::Inside, ip("10.0.0.1"), mac(1)).is_some());
        assert!(n.learn(PortName::Inside, ip("10.0.0.1"), mac(1)).is_none());
        assert!(
            n.learn(PortName::Inside, ip("10.0.0.1"), mac(2)).is_some(),
            "moved"
        );
        assert!(n.learn(PortName::Inside, ip("0.0.0.0"), mac(3)).is_none());
        assert!(n.learn(PortName::Inside, ip("224.0.0.1"), mac(3)).is_none());
        assert!(n
            .learn(PortName::Inside, ip("10.0.0.3"), Mac([0xff; 6]))
            .is_none());
        assert!(n
            .learn(PortName::Inside, ip("10.0.0.3"), Mac([1, 0, 0x5e, 0, 0, 1]))
            .is_none());
        assert_eq!(n.len(), 1);
    }

    /// The terminal T (10.0.0.1, inside) talks to a peer P (192.0.2.9)
    /// behind router R (outside). Control injects T's IKE reply to P out of
    /// port outside.
    #[test]
    fn inject_macs_from_neighbours_and_gateways() {
        let (t, p, r) = (ip("10.0.0.1"), ip("192.0.2.9"), mac(0xfe));
        let tm = mac(1);
        let mut n = Neighbors::new(16);
        assert!(n
            .macs_for(PortName::Outside, t, p)
            .unwrap_err()
            .contains("no MAC known for 192.0.2.9"));
        // A frame from P arrives on outside for T: R's MAC is T's gateway
        // there, T is addressed as tm, and P is "at" R.
        n.learn_frame(PortName::Outside, p, t, r, tm);
        assert_eq!(n.macs_for(PortName::Outside, t, p), Ok((tm, r)));
        // Knowing T on inside (ARP) takes precedence for the source.
        let tm2 = mac(2);
        n.learn(PortName::Inside, t, tm2);
        assert_eq!(n.macs_for(PortName::Outside, t, p), Ok((tm2, r)));

        // The other way: only T's own frames on inside, sent to router R.
        let mut n = Neighbors::new(16);
        n.learn_frame(PortName::Inside, t, p, tm, r);
        // Source: T as seen on inside; destination: the gateway T used.
        assert_eq!(n.macs_for(PortName::Outside, t, p), Ok((tm, r)));
        // A neighbour entry for the destination wins over the gateway.
        let pm = mac(9);
        n.learn(PortName::Outside, p, pm);
        assert_eq!(n.macs_for(PortName::Outside, t, p), Ok((tm, pm)));
        // Toward inside, P's datagram carries the MAC P's frames carry on
        // outside (the box is transparent at layer 2)...
        assert_eq!(n.macs_for(PortName::Inside, p, t), Ok((pm, tm)));
        // ...and, before P itself was seen, the MAC T addressed P's traffic to.
        let mut n = Neighbors::new(16);
        n.learn_frame(PortName::Inside, t, p, tm, r);
        assert_eq!(n.macs_for(PortName::Inside, p, t), Ok((r, tm)));
        // An address seen nowhere has no MACs.
        assert!(n
            .macs_for(PortName::Inside, ip("192.0.2.77"), ip("10.0.0.77"))
            .is_err());
    }

    #[test]
    fn list_is_sorted_and_bounded() {
        let mut n = Neighbors::new(3);
        for i in (1..=5u8).rev() {
            n.learn(PortName::Outside, ip(&format!("10.0.0.{i}")), mac(i));
        }
        n.learn(PortName::Inside, ip("10.0.0.9"), mac(9));
        let l = n.list();
        assert_eq!(l.len(), 3);
        assert_eq!(l[0].port, PortName::Inside);
        assert!(l[1].ip < l[2].ip);
    }
}
