//! Versioned layouts (issue 19, groundwork): every member follows the
//! newest layout epoch, a member cut off while the layout changed catches
//! up when it is reachable again and is never refused for being behind,
//! and requests keep working across the change. Real processes; the new
//! layouts come from the test-only `fault layout_quorums R,W` hook until
//! membership changes are built.

mod common;

use std::collections::BTreeMap;

use common::cluster::{Cluster, Layout, cluster_stats, member_states};
use common::hostile::wait_for;
use webvac::protocol::fault::FaultCmd;

/// `stats cluster` of every running member, by id.
fn stats_of(cluster: &Cluster) -> BTreeMap<u16, BTreeMap<String, String>> {
    cluster
        .running_ids()
        .into_iter()
        .map(|id| (id, cluster_stats(&mut cluster.connect(id))))
        .collect()
}

fn field(stats: &BTreeMap<String, String>, name: &str) -> u64 {
    stats[name]
        .parse()
        .unwrap_or_else(|_| panic!("{name}: {stats:?}"))
}

#[test]
fn every_member_follows_a_newer_layout() {
    let _serial = common::cluster::exclusive();
    // No anti-entropy and no writes until every member has the new layout:
    // nothing but the heartbeats' pongs tells the others of it.
    let cluster = Cluster::start(
        Layout::new(3)
            .quorums(1, 2)
            .fault_control()
            .no_anti_entropy()
            .no_hints(),
    );
    let ids = cluster.ids();
    for s in stats_of(&cluster).values() {
        assert_eq!(field(s, "epoch"), 0, "{s:?}");
        assert_eq!(field(s, "members"), 3, "{s:?}");
    }
    cluster.fault(ids[0], &FaultCmd::LayoutQuorums(2, 3));
    wait_for("every member at epoch 1", || {
        stats_of(&cluster).values().all(|s| field(s, "epoch") == 1)
    });
    for (id, s) in stats_of(&cluster) {
        assert_eq!(field(&s, "read_quorum"), 2, "node {id}: {s:?}");
        assert_eq!(field(&s, "write_quorum"), 3, "node {id}: {s:?}");
        let fetched = u64::from(id != ids[0]);
        assert_eq!(field(&s, "layouts_installed"), fetched, "node {id}: {s:?}");
    }
    // The new default W = 3 is in force at a member that followed it: with
    // a member cut off, a write that W = 2 would take is refused.
    cluster.isolate(ids[2]);
    let refused = cluster.connect(ids[1]).ask(b"set cut 0 0 1\r\nv\r\n");
    assert!(refused.starts_with("SERVER_ERROR"), "{refused}");
    cluster.heal(ids[2]);
    wait_for("every member sees every other up again", || {
        stats_of(&cluster).values().all(|s| {
            member_states(s)
                .values()
                .all(|st| st == "up" || st == "self")
        })
    });
    for &id in &ids {
        let mut c = cluster.connect(id);
        assert_eq!(
            c.ask(format!("set k{id} 0 0 1\r\nv\r\n").as_bytes()),
            "STORED\r\n"
        );
    }
    for &id in &ids {
        let mut c = cluster.connect(id);
        for &k in &ids {
            assert_eq!(
                c.ask(format!("get k{k}\r\n").as_bytes()),
                "VALUE k".to_string() + &k.to_string() + " 0 1\r\nv\r\nEND\r\n"
            );
        }
    }
    // A quorum above N is refused as it was before the change.
    let refused = cluster.try_fault(ids[1], &FaultCmd::LayoutQuorums(1, 4));
    assert!(refused.is_err(), "{refused:?}");
}

#[test]
fn a_member_cut_off_across_changes_catches_up_and_is_never_refused() {
    let _serial = common::cluster::exclusive();
    let cluster = Cluster::start(Layout::new(3).quorums(1, 2).fault_control());
    let ids = cluster.ids();
    let (a, b, cut) = (ids[0], ids[1], ids[2]);
    cluster.isolate(cut);
    cluster.fault(a, &FaultCmd::LayoutQuorums(2, 2));
    cluster.fault(a, &FaultCmd::LayoutQuorums(1, 1));
    wait_for("the connected members at epoch 2", || {
        let s = stats_of(&cluster);
        field(&s[&a], "epoch") == 2 && field(&s[&b], "epoch") == 2
    });
    let behind = cluster_stats(&mut cluster.connect(cut));
    assert_eq!(field(&behind, "epoch"), 0, "{behind:?}");
    cluster.heal(cut);
    wait_for("the cut-off member at epoch 2", || {
        field(&cluster_stats(&mut cluster.connect(cut)), "epoch") == 2
    });
    wait_for("every member sees every other up", || {
        stats_of(&cluster).values().all(|s| {
            member_states(s)
                .values()
                .all(|st| st == "up" || st == "self")
        })
    });
    let caught_up = cluster_stats(&mut cluster.connect(cut));
    assert_eq!(field(&caught_up, "write_quorum"), 1, "{caught_up:?}");
    assert_eq!(field(&caught_up, "layouts_installed"), 1, "{caught_up:?}");
    // Writes through the member that was behind reach the others.
    let mut c = cluster.connect(cut);
    assert_eq!(c.ask(b"set after 0 0 2\r\nok\r\n"), "STORED\r\n");
    wait_for("the write read back through every member", || {
        ids.iter().all(|&id| {
            cluster
                .connect(id)
                .ask(b"mg after v Pr3\r\n")
                .starts_with("VA 2")
        })
    });
}
