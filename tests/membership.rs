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

/// `cluster quorums R W` until it answers `OK`, as an operator retrying
/// while the members come up: the answer.
fn change_quorums(cluster: &Cluster, through: u16, r: u8, w: u8) -> String {
    let deadline = std::time::Instant::now() + common::hostile::WAIT_MAX;
    loop {
        let answer = cluster
            .connect(through)
            .ask(format!("cluster quorums {r} {w}\r\n").as_bytes());
        if answer.starts_with("OK") {
            return answer;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "cluster quorums {r} {w} through node {through}: {answer}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn a_quorum_change_is_decided_by_the_members_and_every_member_follows() {
    let _serial = common::cluster::exclusive();
    let cluster = Cluster::start(Layout::new(3).quorums(2, 2));
    let ids = cluster.ids();
    assert_eq!(change_quorums(&cluster, ids[1], 1, 3), "OK epoch 1\r\n");
    wait_for("every member at epoch 1 with R=1 W=3", || {
        stats_of(&cluster).values().all(|s| {
            field(s, "epoch") == 1 && field(s, "read_quorum") == 1 && field(s, "write_quorum") == 3
        })
    });
    let mut c = cluster.connect(ids[0]);
    // Bad input: a clear answer, nothing decided.
    assert_eq!(
        c.ask(b"cluster quorums 1 4\r\n"),
        "CLIENT_ERROR quorums must be within 1..=3 (N)\r\n"
    );
    assert_eq!(
        c.ask(b"cluster quorums 1\r\n"),
        "CLIENT_ERROR bad command line format\r\n"
    );
    assert_eq!(
        c.ask(b"cluster leave 2\r\n"),
        "CLIENT_ERROR bad command line format\r\n"
    );
    assert_eq!(field(&cluster_stats(&mut c), "epoch"), 1);
}

/// Two members asked for different changes at once: never two layouts for
/// one epoch, every member ends at the same one, and a change that did not
/// win is answered with an error naming the one that did.
#[test]
fn concurrent_changes_are_serialised() {
    let _serial = common::cluster::exclusive();
    let cluster = Cluster::start(Layout::new(3).quorums(2, 2));
    let ids = cluster.ids();
    // Wait until changes can be decided at all (the members recover).
    assert!(change_quorums(&cluster, ids[0], 2, 2).starts_with("OK epoch 1"));
    let mut outcomes = Vec::new();
    for round in 0..5u8 {
        let (r1, w1, r2, w2) = (1 + round % 3, 3, 3, 1 + round % 3);
        let answers: Vec<String> = std::thread::scope(|s| {
            let a = s.spawn(|| {
                cluster
                    .connect(ids[0])
                    .ask(format!("cluster quorums {r1} {w1}\r\n").as_bytes())
            });
            let b = s.spawn(|| {
                cluster
                    .connect(ids[2])
                    .ask(format!("cluster quorums {r2} {w2}\r\n").as_bytes())
            });
            vec![a.join().unwrap(), b.join().unwrap()]
        });
        let epochs: Vec<&str> = answers
            .iter()
            .filter_map(|a| a.strip_prefix("OK epoch "))
            .collect();
        assert!(
            epochs.len() < 2 || epochs[0] != epochs[1],
            "two changes decided for one epoch: {answers:?}"
        );
        for a in &answers {
            assert!(
                a.starts_with("OK epoch ")
                    || a.starts_with("SERVER_ERROR another change")
                    || a.starts_with("SERVER_ERROR other proposals kept"),
                "{a:?}"
            );
        }
        outcomes.push(answers);
    }
    // Every member ends at the same layout.
    let newest = stats_of(&cluster)
        .values()
        .map(|s| field(s, "epoch"))
        .max()
        .unwrap();
    wait_for("every member at the newest epoch with one layout", || {
        let all = stats_of(&cluster);
        let layouts: std::collections::BTreeSet<(u64, u64, u64)> = all
            .values()
            .map(|s| {
                (
                    field(s, "epoch"),
                    field(s, "read_quorum"),
                    field(s, "write_quorum"),
                )
            })
            .collect();
        layouts.len() == 1 && layouts.iter().next().unwrap().0 == newest
    });
    println!("concurrent change outcomes: {outcomes:?}");
}

/// A member restarted (empty, its flags' layout at epoch 0) catches up and
/// recovers its vote from the others. It may have voted on the next epoch
/// before it died and cannot know, so it abstains from that one: with
/// another member cut off, that decree cannot be made. It votes on the
/// one after.
#[test]
fn a_restarted_member_abstains_from_the_next_decree_then_votes() {
    let _serial = common::cluster::exclusive();
    let mut cluster = Cluster::start(Layout::new(3).quorums(2, 2).fault_control());
    let ids = cluster.ids();
    assert!(change_quorums(&cluster, ids[0], 1, 2).starts_with("OK epoch 1"));
    cluster.kill(ids[2]);
    assert!(change_quorums(&cluster, ids[0], 2, 2).starts_with("OK epoch 2"));
    cluster.restart(ids[2]);
    wait_for("the restarted member at epoch 2", || {
        field(&cluster_stats(&mut cluster.connect(ids[2])), "epoch") == 2
    });
    // Member 1 cut off: only members 2 and 3 can decide epoch 3, and 3
    // abstains from it.
    cluster.isolate(ids[0]);
    let refused = cluster.connect(ids[1]).ask(b"cluster quorums 1 1\r\n");
    assert!(
        refused.starts_with("SERVER_ERROR no majority answered for epoch 3"),
        "{refused}"
    );
    cluster.heal(ids[0]);
    assert_eq!(change_quorums(&cluster, ids[1], 1, 1), "OK epoch 3\r\n");
    // Epoch 4 with member 1 cut off again: member 3 votes now.
    cluster.isolate(ids[0]);
    assert_eq!(change_quorums(&cluster, ids[1], 2, 1), "OK epoch 4\r\n");
    cluster.heal(ids[0]);
    wait_for("every member at epoch 4", || {
        stats_of(&cluster).values().all(|s| field(s, "epoch") == 4)
    });
}

#[test]
fn a_single_node_does_not_know_the_cluster_command() {
    let server = common::Server::start(&[]);
    assert_eq!(
        server.connect().ask(b"cluster quorums 1 1\r\n"),
        "ERROR\r\n"
    );
}
