//! The client's map of the cluster, built from a node's answers to
//! `version` and `stats cluster`, and which node each request goes to.
//! Pure: the discovery I/O lives in `mod.rs`.
//!
//! Placement is the server's own: [`Ring::new`] over the member ids with the
//! partition count and N the node reports, so the client computes the same
//! preference list as every node. A request goes to the first node of its
//! key's list that is usable, then to the rest of the list, then to any
//! other member: every node accepts every request and forwards it, so a
//! "wrong" node is correct, only a hop slower.
//!
//! A server whose `stats` has no `webvac_version` is plain memcached, and a
//! webvac node that answers `stats cluster` with `ERROR` runs alone; either
//! way the map is one node at the address that answered.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use super::config::MEMBERS_MAX;
use crate::cluster::ring::{NodeId, PARTITIONS_MAX, Ring};

/// What the servers are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerKind {
    /// webvac: request ids, quorums and key listing are available.
    Webvac,
    /// Anything else that speaks memcached: none of the above.
    Memcached,
}

/// What a server is, from its `VERSION` text and its `stats`, and how to
/// name it: webvac reports `webvac_version` in `stats` (its `VERSION` is
/// the memcached version it speaks, which clients parse).
pub fn kind_of_server(version: String, stats: &[(String, String)]) -> (ServerKind, String) {
    match stats.iter().find(|(name, _)| name == "webvac_version") {
        Some((_, ours)) => (ServerKind::Webvac, webvac_version(ours, &version)),
        None => (ServerKind::Memcached, version),
    }
}

/// How a webvac node is named: its version and the memcached one it speaks.
pub fn webvac_version(ours: &str, memcached: &str) -> String {
    format!("webvac {ours} (memcached {memcached})")
}

/// One member as the map knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemberInfo {
    /// Its node id (0 for a lone server, which reports none).
    pub id: NodeId,
    /// Where it speaks the memcached protocol.
    pub addr: SocketAddr,
    /// Whether the node that described the cluster saw it up (`self`, `up`,
    /// `connecting`) rather than `down`.
    pub up: bool,
}

/// The cluster as last discovered.
#[derive(Debug, Clone)]
pub struct Topology {
    /// What the servers are.
    pub kind: ServerKind,
    /// The `VERSION` text of the node that answered.
    pub version: String,
    /// Members, by ascending id.
    pub members: Vec<MemberInfo>,
    /// Placement; `None` for a lone server.
    ring: Option<Ring>,
}

impl Topology {
    /// An embedded member's own map ([`crate::node`]): its cluster's
    /// members and placement, or no placement for a lone node.
    pub fn of_member(version: String, members: Vec<MemberInfo>, ring: Option<Ring>) -> Topology {
        Topology {
            kind: ServerKind::Webvac,
            version,
            members,
            ring,
        }
    }

    /// A lone server at `addr`.
    pub fn single(addr: SocketAddr, kind: ServerKind, version: String) -> Topology {
        Topology {
            kind,
            version,
            members: vec![MemberInfo {
                id: 0,
                addr,
                up: true,
            }],
            ring: None,
        }
    }

    /// The map described by a webvac node's `stats cluster` lines; `seed` is
    /// where that node was reached (a member listening on an unspecified
    /// address such as `0.0.0.0` is taken to be on the seed's host).
    ///
    /// # Errors
    /// A text saying what is missing or malformed.
    pub fn from_cluster_stats(
        seed: SocketAddr,
        version: String,
        stats: &[(String, String)],
    ) -> Result<Topology, String> {
        let number = |name: &str| -> Result<u64, String> {
            let (_, v) = stats
                .iter()
                .find(|(k, _)| k == name)
                .ok_or_else(|| format!("stats cluster has no {name}"))?;
            v.trim()
                .parse()
                .map_err(|_| format!("stats cluster {name} = {v:?}"))
        };
        let partitions = u32::try_from(number("partitions")?)
            .ok()
            .filter(|p| (1..=PARTITIONS_MAX).contains(p))
            .ok_or("stats cluster partitions out of range")?;
        let replicas = usize::try_from(number("replicas")?)
            .ok()
            .filter(|&n| n >= 1)
            .ok_or("stats cluster replicas out of range")?;
        let mut members = BTreeMap::new();
        // Members that hold no partitions (joined as standbys): they take
        // requests, but the ring, as the server's, leaves them out.
        let mut standby = Vec::new();
        for (name, value) in stats {
            let Some(id) = name.strip_prefix("member:") else {
                continue;
            };
            let id: NodeId = id.parse().map_err(|_| format!("bad member id {name:?}"))?;
            let member = parse_member(id, value, seed)?;
            if value.split_whitespace().any(|w| w == "standby=1") {
                standby.push(id);
            }
            if members.insert(id, member).is_some() {
                return Err(format!("member {id} listed twice"));
            }
            if members.len() > MEMBERS_MAX {
                return Err(format!("more than {MEMBERS_MAX} members"));
            }
        }
        if members.is_empty() {
            return Err("stats cluster lists no members".into());
        }
        let ids: Vec<NodeId> = members
            .keys()
            .copied()
            .filter(|id| !standby.contains(id))
            .collect();
        if ids.len() < replicas {
            return Err(format!(
                "stats cluster lists {} members that hold partitions, fewer than N={replicas}",
                ids.len()
            ));
        }
        Ok(Topology {
            kind: ServerKind::Webvac,
            version,
            members: members.into_values().collect(),
            ring: Some(Ring::new(&ids, partitions, replicas)),
        })
    }

    /// The nodes to try for a request, best first: the key's preference
    /// list (primary first), then every other member by id. Without a key
    /// (listing), every member by id.
    pub fn candidates(&self, key: Option<&[u8]>) -> Vec<MemberInfo> {
        let mut out = Vec::with_capacity(self.members.len());
        if let (Some(ring), Some(key)) = (&self.ring, key) {
            for &id in ring.preference_list_for_key(key) {
                if let Some(m) = self.member(id) {
                    out.push(*m);
                }
            }
        }
        for m in &self.members {
            if !out.iter().any(|o| o.id == m.id) {
                out.push(*m);
            }
        }
        out
    }

    fn member(&self, id: NodeId) -> Option<&MemberInfo> {
        self.members
            .binary_search_by_key(&id, |m| m.id)
            .ok()
            .map(|i| &self.members[i])
    }
}

/// `<state> client=<addr> peer=<addr> ...` of member `id`.
fn parse_member(id: NodeId, value: &str, seed: SocketAddr) -> Result<MemberInfo, String> {
    let mut words = value.split_whitespace();
    let state = words
        .next()
        .ok_or_else(|| format!("member {id}: no state"))?;
    let client = words
        .find_map(|w| w.strip_prefix("client="))
        .ok_or_else(|| format!("member {id}: no client address"))?;
    let mut addr: SocketAddr = client
        .parse()
        .map_err(|_| format!("member {id}: bad client address {client:?}"))?;
    if addr.ip().is_unspecified() {
        addr.set_ip(seed.ip());
    }
    Ok(MemberInfo {
        id,
        addr,
        up: !state.starts_with("down"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(lines: &[(&str, &str)]) -> Vec<(String, String)> {
        lines
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn three() -> Vec<(String, String)> {
        stats(&[
            ("node_id", "2"),
            ("partitions", "1024"),
            ("replicas", "3"),
            ("read_quorum", "2"),
            ("write_quorum", "2"),
            (
                "member:1",
                "up client=127.0.0.1:11211 peer=127.0.0.1:12211 primary_partitions=322 replica_partitions=702",
            ),
            (
                "member:2",
                "self client=0.0.0.0:11212 peer=127.0.0.1:12212 primary_partitions=366 replica_partitions=658",
            ),
            (
                "member:3",
                "down(peer_down:_Connection_refused_(os_error_111)) client=127.0.0.1:11213 peer=127.0.0.1:12213",
            ),
            ("forwarded", "0"),
        ])
    }

    #[test]
    fn a_cluster_map_from_stats_cluster() {
        let seed: SocketAddr = "10.0.0.2:11212".parse().unwrap();
        let t =
            Topology::from_cluster_stats(seed, "webvac 0.1.0 (memcached 1.6.18)".into(), &three())
                .unwrap();
        assert_eq!(t.kind, ServerKind::Webvac);
        let addrs: Vec<String> = t.members.iter().map(|m| m.addr.to_string()).collect();
        assert_eq!(
            addrs,
            ["127.0.0.1:11211", "10.0.0.2:11212", "127.0.0.1:11213"]
        );
        assert_eq!(
            t.members.iter().map(|m| m.up).collect::<Vec<_>>(),
            [true, true, false]
        );
        // Placement is the server's: the pinned vectors of ring.rs.
        let ids = |key: &[u8]| {
            t.candidates(Some(key))
                .iter()
                .map(|m| m.id)
                .collect::<Vec<_>>()
        };
        assert_eq!(ids(b"user:1"), [1, 2, 3]);
        assert_eq!(ids(b"foo"), [2, 3, 1]);
        assert_eq!(ids(b"session:8f3a2c1b"), [3, 2, 1]);
        // A standby member is a candidate, after the replicas, but never
        // on a preference list: placement stays the server's.
        let mut with_standby = three();
        with_standby.push((
            "member:4".into(),
            "up client=127.0.0.1:11214 peer=127.0.0.1:12214 primary_partitions=0 replica_partitions=0 standby=1".into(),
        ));
        let s = Topology::from_cluster_stats(seed, "webvac".into(), &with_standby).unwrap();
        let ids = |key: &[u8]| {
            s.candidates(Some(key))
                .iter()
                .map(|m| m.id)
                .collect::<Vec<_>>()
        };
        assert_eq!(ids(b"user:1"), [1, 2, 3, 4]);
        assert_eq!(ids(b"foo"), [2, 3, 1, 4]);
        assert_eq!(ids(b"session:8f3a2c1b"), [3, 2, 1, 4]);
        assert_eq!(
            t.candidates(Some(b"a"))[0].addr,
            "10.0.0.2:11212".parse().unwrap()
        );
        assert_eq!(
            t.candidates(None).iter().map(|m| m.id).collect::<Vec<_>>(),
            [1, 2, 3]
        );
    }

    #[test]
    fn members_beyond_n_follow_the_preference_list() {
        let mut s = three();
        s.retain(|(k, _)| k != "replicas");
        s.push(("replicas".into(), "1".into()));
        let t = Topology::from_cluster_stats("127.0.0.1:1".parse().unwrap(), String::new(), &s)
            .unwrap();
        let c = t.candidates(Some(b"foo"));
        assert_eq!(c.len(), 3);
        assert_eq!(c[0].id, 2, "the primary first");
        assert_eq!(c[1..].iter().map(|m| m.id).collect::<Vec<_>>(), [1, 3]);
    }

    #[test]
    fn bad_cluster_stats_are_refused() {
        let seed: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let without = |name: &str| {
            let mut s = three();
            s.retain(|(k, _)| k != name);
            s
        };
        for s in [without("partitions"), without("replicas")] {
            assert!(Topology::from_cluster_stats(seed, String::new(), &s).is_err());
        }
        let only_counters = stats(&[("partitions", "8"), ("replicas", "1")]);
        assert!(Topology::from_cluster_stats(seed, String::new(), &only_counters).is_err());
        let mut bad_addr = three();
        bad_addr.push(("member:9".into(), "up client=nowhere".into()));
        assert!(Topology::from_cluster_stats(seed, String::new(), &bad_addr).is_err());
        let mut zero = three();
        zero.retain(|(k, _)| k != "partitions");
        zero.push(("partitions".into(), "0".into()));
        assert!(Topology::from_cluster_stats(seed, String::new(), &zero).is_err());
    }

    #[test]
    fn a_lone_server_takes_every_key() {
        let addr: SocketAddr = "127.0.0.1:11211".parse().unwrap();
        let t = Topology::single(addr, ServerKind::Memcached, "1.6.18".into());
        assert_eq!(t.candidates(Some(b"anything"))[0].addr, addr);
        assert_eq!(t.candidates(None).len(), 1);
        let stats = |ours: Option<&str>| -> Vec<(String, String)> {
            [("pid", "7"), ("version", "1.6.18")]
                .into_iter()
                .chain(ours.map(|v| ("webvac_version", v)))
                .map(|(k, v)| (k.into(), v.into()))
                .collect()
        };
        assert_eq!(
            kind_of_server("1.6.18".into(), &stats(None)),
            (ServerKind::Memcached, "1.6.18".into())
        );
        assert_eq!(
            kind_of_server("1.6.18".into(), &stats(Some("0.1.0"))),
            (ServerKind::Webvac, "webvac 0.1.0 (memcached 1.6.18)".into())
        );
    }
}
