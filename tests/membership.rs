//! Versioned layouts and membership (issue 19, under way): every member
//! follows the newest layout epoch, a member cut off while the layout
//! changed catches up when it is reachable again and is never refused for
//! being behind, and requests keep working across the change; changes are
//! decided by the members; a node joins as a standby (`--join`) and a
//! standby leaves. Real processes; some layouts come from the test-only
//! `fault layout_quorums R,W` hook.

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
    // (A founder that recovered its vote after the others may have asked
    // for an empty decree: wait for it, so the fault's epoch is the next.)
    let e0 = cluster.all_voting();
    let before = stats_of(&cluster);
    for s in before.values() {
        assert_eq!(field(s, "members"), 3, "{s:?}");
    }
    cluster.fault(ids[0], &FaultCmd::LayoutQuorums(2, 3));
    wait_for("every member at the next epoch", || {
        stats_of(&cluster)
            .values()
            .all(|s| field(s, "epoch") == e0 + 1)
    });
    for (id, s) in stats_of(&cluster) {
        assert_eq!(field(&s, "read_quorum"), 2, "node {id}: {s:?}");
        assert_eq!(field(&s, "write_quorum"), 3, "node {id}: {s:?}");
        let fetched = u64::from(id != ids[0]);
        assert_eq!(
            field(&s, "layouts_installed") - field(&before[&id], "layouts_installed"),
            fetched,
            "node {id}: {s:?}"
        );
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
    let e0 = cluster.all_voting();
    let installed = field(
        &cluster_stats(&mut cluster.connect(cut)),
        "layouts_installed",
    );
    cluster.isolate(cut);
    cluster.fault(a, &FaultCmd::LayoutQuorums(2, 2));
    cluster.fault(a, &FaultCmd::LayoutQuorums(1, 1));
    wait_for("the connected members two epochs on", || {
        let s = stats_of(&cluster);
        field(&s[&a], "epoch") == e0 + 2 && field(&s[&b], "epoch") == e0 + 2
    });
    let behind = cluster_stats(&mut cluster.connect(cut));
    assert_eq!(field(&behind, "epoch"), e0, "{behind:?}");
    cluster.heal(cut);
    wait_for("the cut-off member two epochs on", || {
        field(&cluster_stats(&mut cluster.connect(cut)), "epoch") == e0 + 2
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
    assert_eq!(
        field(&caught_up, "layouts_installed"),
        installed + 1,
        "{caught_up:?}"
    );
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
    let e0 = cluster.all_voting();
    assert_eq!(
        change_quorums(&cluster, ids[1], 1, 3),
        format!("OK epoch {}\r\n", e0 + 1)
    );
    wait_for("every member at the next epoch with R=1 W=3", || {
        stats_of(&cluster).values().all(|s| {
            field(s, "epoch") == e0 + 1
                && field(s, "read_quorum") == 1
                && field(s, "write_quorum") == 3
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
        c.ask(b"cluster leave x\r\n"),
        "CLIENT_ERROR bad command line format\r\n"
    );
    assert_eq!(
        c.ask(b"cluster leave 2\r\n"),
        "SERVER_ERROR node 2 leaving would leave 2 members holding partitions, fewer than N=3\r\n"
    );
    assert_eq!(field(&cluster_stats(&mut c), "epoch"), e0 + 1);
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
    cluster.all_voting();
    assert!(change_quorums(&cluster, ids[0], 2, 2).starts_with("OK epoch "));
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

/// A restarted member may have voted on the next decree before it died and
/// cannot know, so it abstains from that one (the Paxos unit tests show
/// the refusal), and asks the others for an empty decree, which passes
/// that slot and changes nothing. It votes on the next: with a member cut
/// off, it and the other make the next change.
#[test]
fn a_restarted_member_abstains_from_the_next_decree_until_an_empty_one_passes_it() {
    let _serial = common::cluster::exclusive();
    let mut cluster = Cluster::start(Layout::new(3).quorums(2, 2).fault_control());
    let ids = cluster.ids();
    let e0 = cluster.all_voting();
    let ok = |e: u64| format!("OK epoch {e}\r\n");
    assert_eq!(change_quorums(&cluster, ids[0], 1, 2), ok(e0 + 1));
    cluster.kill(ids[2]);
    let e2 = e0 + 2;
    assert_eq!(change_quorums(&cluster, ids[0], 2, 2), ok(e2));
    cluster.restart(ids[2]);
    // It recovered abstaining from the next epoch, then the empty decree
    // made that epoch with R and W as they were.
    assert_eq!(cluster.all_voting(), e2 + 1);
    for (id, s) in stats_of(&cluster) {
        assert_eq!(field(&s, "read_quorum"), 2, "node {id}: {s:?}");
        assert_eq!(field(&s, "write_quorum"), 2, "node {id}: {s:?}");
    }
    let said = cluster.stderr_text(ids[2]);
    assert!(
        said.contains(&format!("this node votes on epochs above {}", e2 + 1))
            && said.contains("this node votes again"),
        "{said}"
    );
    // The next epoch with member 1 cut off: member 3 votes now.
    cluster.isolate(ids[0]);
    assert_eq!(change_quorums(&cluster, ids[1], 1, 1), ok(e2 + 2));
    cluster.heal(ids[0]);
    wait_for("every member at the change's epoch", || {
        stats_of(&cluster)
            .values()
            .all(|s| field(s, "epoch") == e2 + 2)
    });
}

/// A rolling restart: every member killed and restarted in turn, each
/// waited for until it votes again. Every member abstained from the next
/// decree after its restart; without the empty decree each asks for, the
/// three would all sit out epoch 1 and no change could ever be made. With
/// member 1 cut off, members 2 and 3 make the next change.
#[test]
fn after_a_rolling_restart_of_every_member_the_cluster_still_changes() {
    let _serial = common::cluster::exclusive();
    let mut cluster = Cluster::start(Layout::new(3).quorums(2, 2).fault_control());
    let ids = cluster.ids();
    let e0 = cluster.all_voting();
    let mut epoch = e0;
    for &id in &ids {
        cluster.kill(id);
        cluster.restart(id);
        wait_for(
            &format!("node {id} to vote again after its restart"),
            || cluster.stderr_text(id).contains("this node votes again"),
        );
        let now = field(&cluster_stats(&mut cluster.connect(id)), "epoch");
        assert!(now > epoch, "node {id}: epoch {now} after {epoch}");
        epoch = now;
    }
    assert_eq!(epoch, e0 + 3, "one empty decree per restarted member");
    assert_eq!(cluster.all_voting(), e0 + 3);
    cluster.isolate(ids[0]);
    assert_eq!(
        change_quorums(&cluster, ids[1], 1, 1),
        format!("OK epoch {}\r\n", e0 + 4)
    );
    cluster.heal(ids[0]);
    wait_for("every member at the change's epoch with R=1 W=1", || {
        stats_of(&cluster).values().all(|s| {
            field(s, "epoch") == e0 + 4
                && field(s, "read_quorum") == 1
                && field(s, "write_quorum") == 1
        })
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

/// Runs `webvac` with `args` (a node that should refuse to start) and
/// returns its stderr once it exits, which must be within 30 s and not 0.
fn refused_start(args: &[String]) -> String {
    let mut child = Cluster::command(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn webvac");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("webvac {args:?} still runs after 30 s");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("piped"), &mut stderr)
        .expect("read stderr");
    assert!(!status.success(), "{args:?} started: {stderr}");
    stderr
}

/// Two free loopback addresses, as `--member ID=CLIENT,PEER` wants them.
fn fresh_member(id: u16) -> String {
    let a = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let b = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    format!(
        "{id}={},{}",
        a.local_addr().expect("addr"),
        b.local_addr().expect("addr")
    )
}

/// Every running member's epoch and member count, once all agree on them.
fn settled_on(cluster: &Cluster, epoch: u64, members: u64) {
    wait_for(
        &format!("every member at epoch {epoch} with {members} members"),
        || {
            stats_of(cluster)
                .values()
                .all(|s| field(s, "epoch") == epoch && field(s, "members") == members)
        },
    );
}

fn curr_items(cluster: &Cluster, id: u16) -> u64 {
    let stats = common::cluster::parse_stats(&cluster.connect(id).ask(b"stats\r\n"));
    stats["curr_items"].parse().expect("curr_items")
}

#[test]
fn a_node_joins_as_a_standby_serves_clients_survives_restarts_and_leaves() {
    let _serial = common::cluster::exclusive();
    // N = 3 of 3: every founding member holds every key.
    let mut cluster = Cluster::start(Layout::new(3).no_anti_entropy());
    let founders = cluster.ids();
    const KEYS: usize = 60;
    for i in 0..KEYS {
        let through = founders[i % 3];
        let set = format!("set before{i} 0 0 4\r\nb{i:03}\r\n");
        assert_eq!(cluster.connect(through).ask(set.as_bytes()), "STORED\r\n");
    }

    // Node 4 joins through node 1's peer address, naming only itself, as
    // a standby (it takes no partitions).
    let joiner: u16 = 4;
    cluster.set_node_args(joiner, vec!["--standby".into()]);
    let e0 = cluster.all_voting();
    cluster.join(joiner, founders[0]);
    settled_on(&cluster, e0 + 1, 4);
    for (id, s) in stats_of(&cluster) {
        let line = &s[&format!("member:{joiner}")];
        assert!(line.contains(" standby=1"), "node {id}: {line}");
        assert!(
            line.contains("primary_partitions=0 replica_partitions=0"),
            "node {id}: {line}"
        );
        for f in &founders {
            assert!(
                !s[&format!("member:{f}")].contains("standby"),
                "node {id}: {s:?}"
            );
        }
    }
    let joined = cluster_stats(&mut cluster.connect(joiner));
    assert_eq!(field(&joined, "partitions"), 1024, "{joined:?}");
    assert_eq!(field(&joined, "replicas"), 3, "{joined:?}");

    // The standby coordinates: writes through it land on the founders,
    // reads through it see every key; it holds nothing itself.
    for i in 0..KEYS {
        let set = format!("set after{i} 0 0 4\r\na{i:03}\r\n");
        assert_eq!(cluster.connect(joiner).ask(set.as_bytes()), "STORED\r\n");
    }
    let read_all = |cluster: &Cluster, through: u16| {
        let mut c = cluster.connect(through);
        for i in 0..KEYS {
            for (prefix, v) in [
                ("before", format!("b{i:03}")),
                ("after", format!("a{i:03}")),
            ] {
                let got = c.ask(format!("get {prefix}{i}\r\n").as_bytes());
                assert_eq!(
                    got,
                    format!("VALUE {prefix}{i} 0 4\r\n{v}\r\nEND\r\n"),
                    "{prefix}{i} through node {through}"
                );
            }
        }
    };
    for &id in &cluster.ids() {
        read_all(&cluster, id);
    }
    assert_eq!(curr_items(&cluster, joiner), 0);
    let held: u64 = founders.iter().map(|&f| curr_items(&cluster, f)).sum();
    assert_eq!(held, 3 * 2 * KEYS as u64, "N copies of every key");

    // Bad joins are refused with a reason and change nothing.
    let seed = cluster.member(founders[0]).peer.to_string();
    let base = |id: u16, member: String| -> Vec<String> {
        [
            "--node-id",
            &id.to_string(),
            "--member",
            &member,
            "--join",
            &seed,
        ]
        .iter()
        .map(ToString::to_string)
        .collect()
    };
    let taken = refused_start(&base(founders[1], fresh_member(founders[1])));
    assert!(
        taken.contains(&format!("node id {} is taken", founders[1])),
        "{taken}"
    );
    let mut other_p = base(7, fresh_member(7));
    other_p.extend(["--partitions".into(), "64".into()]);
    let p = refused_start(&other_p);
    assert!(p.contains("this cluster has 1024 partitions"), "{p}");
    let dir = common::fresh_temp_dir("webvac-join");
    let secret = dir.join("secret");
    std::fs::write(&secret, "another cluster's secret, long enough\n").expect("write");
    std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("chmod");
    let mut stranger = base(8, fresh_member(8));
    stranger.extend(["--cluster-secret-file".into(), secret.display().to_string()]);
    let s = refused_start(&stranger);
    assert!(s.contains("cluster.secret_file differs"), "{s}");
    let mut c = cluster.connect(founders[2]);
    let not_member = c.ask(b"cluster leave 9\r\n");
    assert!(
        not_member.starts_with("SERVER_ERROR node 9 is not a member"),
        "{not_member}"
    );
    let too_few = c.ask(format!("cluster leave {}\r\n", founders[1]).as_bytes());
    assert!(
        too_few.starts_with(&format!(
            "SERVER_ERROR node {} leaving would leave 2 members holding partitions, fewer than N=3",
            founders[1]
        )),
        "{too_few}"
    );
    settled_on(&cluster, e0 + 1, 4);

    // A founder restarted from its flags (the founding member list) learns
    // the layout with the standby from its peers, and admits the standby.
    // Clients keep writing through the standby meanwhile: its requests
    // reach the restarted founder first with the newer epoch, from a node
    // the founder has no connection to yet.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (stop, addr) = (stop.clone(), cluster.member(joiner).client);
        std::thread::spawn(move || {
            let mut c = common::Client::connect_tcp(addr).expect("connect to the standby");
            let mut i = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && i < 100_000 {
                let _ = c.call(
                    format!("set during{} 0 0 1\r\nd\r\n", i % 50).as_bytes(),
                    std::time::Duration::from_secs(5),
                );
                i += 1;
            }
        })
    };
    cluster.kill(founders[1]);
    cluster.restart(founders[1]);
    // Restarted, it asks for an empty decree so that it votes again.
    let e1 = cluster.all_voting();
    assert_eq!(e1, e0 + 2, "one empty decree for the restarted founder");
    settled_on(&cluster, e1, 4);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.join().expect("the writer");
    let seen = member_states(&cluster_stats(&mut cluster.connect(founders[1])));
    assert_eq!(seen[&joiner], "up", "{seen:?}");
    read_all(&cluster, joiner);
    let own = cluster
        .connect(joiner)
        .ask(format!("cluster leave {joiner}\r\n").as_bytes());
    assert!(
        own.starts_with("SERVER_ERROR node 4 cannot decide its own leave"),
        "{own}"
    );

    // The standby leaves (asked through a founder): a new epoch without it,
    // and it stops by itself, exit status 0.
    // (The restarted members may still be recovering their votes: a
    // refusal that says to retry is retried, as an operator would.)
    let said = admin(&cluster, founders[2], &["leave", &joiner.to_string()]);
    assert!(
        said.contains(&format!("layout epoch {}: node 4 leaves", e1 + 1)),
        "{said}"
    );
    let status = cluster.wait_exit(joiner, std::time::Duration::from_secs(20));
    assert!(status.success(), "the node that left exited with {status}");
    assert!(
        cluster
            .stderr_text(joiner)
            .contains("left the cluster, stopping"),
        "{}",
        cluster.stderr_text(joiner)
    );
    settled_on(&cluster, e1 + 1, 3);
    for &id in &founders {
        read_all(&cluster, id);
    }

    // Started again with the same flags, it joins anew (an epoch with it);
    // killed and started once more, it is a member already: no change,
    // only the empty decree a restarted member asks for.
    cluster.restart(joiner);
    settled_on(&cluster, e1 + 2, 4);
    assert_eq!(cluster.all_voting(), e1 + 2);
    cluster.kill(joiner);
    cluster.restart(joiner);
    assert_eq!(cluster.all_voting(), e1 + 3);
    settled_on(&cluster, e1 + 3, 4);
    read_all(&cluster, joiner);
}

/// What a writer knows of one key: the values it may hold now (more than
/// one when a write's outcome is unknown), `None` standing for absent.
type Expected = BTreeMap<String, Vec<Option<String>>>;

/// Writes and deletes through every address in `targets` in turn until
/// `stop`, recording what each key may hold; pauses while `paused`.
struct Writer {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    paused: std::sync::Arc<std::sync::atomic::AtomicBool>,
    idle: std::sync::Arc<std::sync::atomic::AtomicBool>,
    targets: std::sync::Arc<std::sync::Mutex<Vec<std::net::SocketAddr>>>,
    expected: std::sync::Arc<std::sync::Mutex<Expected>>,
    acked: std::sync::Arc<std::sync::atomic::AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

const WRITER_KEYS: usize = 150;

impl Writer {
    fn start(targets: Vec<std::net::SocketAddr>) -> Writer {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
        use std::sync::{Arc, Mutex};
        let stop = Arc::new(AtomicBool::new(false));
        let paused = Arc::new(AtomicBool::new(false));
        let idle = Arc::new(AtomicBool::new(false));
        let targets = Arc::new(Mutex::new(targets));
        let expected = Arc::new(Mutex::new(Expected::new()));
        let acked = Arc::new(AtomicU64::new(0));
        let thread = {
            let (stop, paused, idle, targets, expected, acked) = (
                stop.clone(),
                paused.clone(),
                idle.clone(),
                targets.clone(),
                expected.clone(),
                acked.clone(),
            );
            std::thread::spawn(move || {
                let mut i = 0u64;
                while !stop.load(Relaxed) {
                    if paused.load(Relaxed) {
                        idle.store(true, Relaxed);
                        std::thread::sleep(std::time::Duration::from_millis(10));
                        continue;
                    }
                    idle.store(false, Relaxed);
                    let addrs = targets.lock().expect("targets").clone();
                    let addr = addrs[i as usize % addrs.len()];
                    let key = format!("w{}", (i * 7) % WRITER_KEYS as u64);
                    let value = format!("v{i}");
                    let delete = i % 5 == 4;
                    let request = if delete {
                        format!("delete {key}\r\n")
                    } else {
                        format!("set {key} 0 0 {}\r\n{value}\r\n", value.len())
                    };
                    let reply = common::Client::connect_tcp(addr).ok().and_then(|mut c| {
                        c.call(request.as_bytes(), std::time::Duration::from_secs(5))
                            .ok()
                    });
                    let reply = reply.map(|r| String::from_utf8_lossy(&r).to_string());
                    let now = if delete { None } else { Some(value) };
                    let mut e = expected.lock().expect("expected");
                    let may = e.entry(key).or_insert_with(|| vec![None]);
                    match reply.as_deref() {
                        Some("STORED\r\n" | "DELETED\r\n" | "NOT_FOUND\r\n") => {
                            *may = vec![now];
                            acked.fetch_add(1, Relaxed);
                        }
                        // Unknown outcome: either.
                        _ => may.push(now),
                    }
                    i += 1;
                }
            })
        };
        Writer {
            stop,
            paused,
            idle,
            targets,
            expected,
            acked,
            thread: Some(thread),
        }
    }

    fn set_targets(&self, targets: Vec<std::net::SocketAddr>) {
        *self.targets.lock().expect("targets") = targets;
    }

    /// Stops writing (after the write in flight) and returns what every
    /// key may hold.
    fn pause(&self) -> Expected {
        use std::sync::atomic::Ordering::Relaxed;
        self.idle.store(false, Relaxed);
        self.paused.store(true, Relaxed);
        wait_for("the writer to pause", || self.idle.load(Relaxed));
        self.expected.lock().expect("expected").clone()
    }

    fn resume(&self) {
        self.paused
            .store(false, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Waits until every running member has `members` members at one epoch
/// above `after`, nothing moving and no transfer pending; returns the epoch.
fn moves_settled(cluster: &Cluster, after: u64, members: u64) -> u64 {
    let mut epoch = 0;
    wait_for(
        &format!("a settled layout past epoch {after} with {members} members, no transfer pending"),
        || {
            let all = stats_of(cluster);
            let epochs: std::collections::BTreeSet<u64> =
                all.values().map(|s| field(s, "epoch")).collect();
            epoch = *epochs.iter().next().unwrap_or(&0);
            epochs.len() == 1
                && epoch > after
                && all
                    .values()
                    .all(|s| field(s, "members") == members && field(s, "transfers_pending") == 0)
        },
    );
    epoch
}

/// Every key reads back through every running member as the writer left
/// it (a value it may hold; never a deleted or replaced one), and the
/// members hold exactly N copies of each live key between them.
fn check_after_move(cluster: &Cluster, expected: &Expected, n: u64, step: &str) {
    // Copies first: reads repair what they find missing.
    let live = expected
        .values()
        .filter(|may| may.iter().all(Option::is_some))
        .count() as u64;
    let unsure = expected
        .values()
        .filter(|may| may.iter().any(Option::is_some) && may.iter().any(Option::is_none))
        .count() as u64;
    let deadline = std::time::Instant::now() + common::hostile::WAIT_MAX;
    loop {
        let held: BTreeMap<u16, u64> = cluster
            .running_ids()
            .iter()
            .map(|&id| (id, curr_items(cluster, id)))
            .collect();
        let total = held.values().sum::<u64>();
        // A key whose last write's outcome is unknown may be live or not.
        if (n * live..=n * (live + unsure)).contains(&total) && total % n == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{step}: not N={n} copies of each of {live} (+{unsure}) live keys: {held:?}\n{}",
            cluster.describe_nodes()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    for id in cluster.running_ids() {
        let mut c = cluster.connect(id);
        for (key, may) in expected {
            let got = c.ask(format!("get {key}\r\n").as_bytes());
            let value = match got.as_str() {
                "END\r\n" => None,
                v => {
                    let value = v
                        .split("\r\n")
                        .nth(1)
                        .unwrap_or_else(|| panic!("{step}: {key} through node {id}: {v}"));
                    Some(value.to_string())
                }
            };
            assert!(
                may.contains(&value),
                "{step}: {key} through node {id} is {value:?}, the writer allows {may:?}\n{}",
                cluster.describe_nodes()
            );
        }
    }
}

/// Addresses of the running members, for the writer.
fn client_addrs(cluster: &Cluster) -> Vec<std::net::SocketAddr> {
    cluster
        .running_ids()
        .into_iter()
        .map(|id| cluster.member(id).client)
        .collect()
}

/// `webvac cluster <args…> --node <node through>`, retried while the
/// answer says to retry (members recovering their votes), as an operator
/// would; returns stdout.
fn admin(cluster: &Cluster, through: u16, args: &[&str]) -> String {
    let deadline = std::time::Instant::now() + common::hostile::WAIT_MAX;
    loop {
        let mut all: Vec<String> = vec!["cluster".into()];
        all.extend(args.iter().map(ToString::to_string));
        all.extend(["--node".into(), cluster.member(through).client.to_string()]);
        let out = Cluster::command(&all).output().expect("run webvac cluster");
        let said = String::from_utf8_lossy(&out.stdout).to_string();
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        if out.status.success() {
            return said;
        }
        assert!(
            err.contains("retry") && std::time::Instant::now() < deadline,
            "webvac {all:?}: {said} {err}\n{}",
            cluster.describe_nodes()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

#[test]
fn partitions_move_while_writers_run_through_joins_a_leave_a_replace_and_a_crash() {
    let _serial = common::cluster::exclusive();
    // Anti-entropy keeps its hash trees (a move checks what it was handed
    // against them) but runs no round after the first: copies a move
    // failed to hand over would be mended by it, and the checks could not
    // see the failure.
    let mut cluster = Cluster::start(
        Layout::new(3)
            .anti_entropy_interval_ms(3_600_000)
            .tombstone_grace_secs(30_000),
    );
    let n = 3;
    // Keys written once before any move and never again: only the
    // handoff can give them to their new owners.
    let mut still = Expected::new();
    let mut c1 = cluster.connect(1);
    for i in 0..300 {
        let (key, value) = (format!("s{i}"), format!("still{i}"));
        let set = format!("set {key} 0 0 {}\r\n{value}\r\n", value.len());
        assert_eq!(c1.ask(set.as_bytes()), "STORED\r\n");
        still.insert(key, vec![Some(value)]);
    }
    let with_still = |mut e: Expected| {
        e.extend(still.clone());
        e
    };
    let writer = Writer::start(client_addrs(&cluster));
    wait_for("the writer to get going", || {
        writer.acked.load(std::sync::atomic::Ordering::Relaxed) > 200
    });
    let mut epoch = 0;

    // Node 4 joins and takes its share: a move, settled by the members.
    cluster.all_voting();
    cluster.join(4, 1);
    writer.set_targets(client_addrs(&cluster));
    epoch = moves_settled(&cluster, epoch, 4);
    let expected = with_still(writer.pause());
    check_after_move(&cluster, &expected, n, "node 4 joined");
    let s = cluster_stats(&mut cluster.connect(4));
    assert!(
        field(&s, "handoff_keys") > 0,
        "node 4 was handed keys: {s:?}"
    );
    writer.resume();

    // Node 2 leaves: its partitions move to the others, then it stops by
    // itself, exit status 0.
    let said = admin(&cluster, 1, &["leave", "2"]);
    assert!(said.contains("epoch"), "{said}");
    let status = cluster.wait_exit(2, std::time::Duration::from_secs(60));
    assert!(status.success(), "node 2 exited with {status}");
    writer.set_targets(client_addrs(&cluster));
    epoch = moves_settled(&cluster, epoch, 3);
    let expected = with_still(writer.pause());
    check_after_move(&cluster, &expected, n, "node 2 left");
    writer.resume();

    // A leave that would leave fewer than N members holding partitions,
    // and a second change while one is pending, are refused, changing
    // nothing.
    let mut c = cluster.connect(1);
    let too_few = c.ask(b"cluster leave 3\r\n");
    assert!(too_few.contains("fewer than N=3"), "{too_few}");

    // Node 5 joins slowly (a low handoff rate); a second change meanwhile
    // is refused naming it; node 5 is killed mid-transfer and restarted
    // (at the normal rate): the move completes.
    cluster.set_node_args(5, vec!["--handoff-bytes-per-sec".into(), "200".into()]);
    cluster.join(5, 3);
    writer.set_targets(client_addrs(&cluster));
    wait_for("node 5's move to start", || {
        stats_of(&cluster).values().all(|s| {
            field(s, "transfers_pending") > 0
                && s.get("member:5").is_some_and(|l| l.contains(" joining=1"))
        })
    });
    let status = admin(&cluster, 1, &["status"]);
    assert!(
        status.contains("standby joining")
            && status.contains("transfers: 1 pending")
            && status.contains("member 5: handed"),
        "{status}"
    );
    let second = c.ask(b"cluster leave 4\r\n");
    assert!(
        second.starts_with("SERVER_ERROR a change is pending: node [5] takes partitions"),
        "{second}"
    );
    cluster.kill(5);
    cluster.set_node_args(5, Vec::new());
    cluster.restart(5);
    writer.set_targets(client_addrs(&cluster));
    epoch = moves_settled(&cluster, epoch, 4);
    let expected = with_still(writer.pause());
    check_after_move(&cluster, &expected, n, "node 5 joined, killed mid-transfer");
    writer.resume();

    // Node 6 joins as a standby; its move to take partitions (slow) is
    // cancelled: the layout before it is back, and what it was handed is
    // dropped again. A replace naming a member that does not exist is
    // refused.
    cluster.set_node_args(
        6,
        vec![
            "--standby".into(),
            "--handoff-bytes-per-sec".into(),
            "200".into(),
        ],
    );
    cluster.join(6, 1);
    writer.set_targets(client_addrs(&cluster));
    epoch = moves_settled(&cluster, epoch, 5);
    let not_member = c.ask(b"cluster replace 3 9\r\n");
    assert!(
        not_member.starts_with("SERVER_ERROR node 9 is not a member"),
        "{not_member}"
    );
    admin(&cluster, 1, &["join", "6"]);
    wait_for("node 6's move to start", || {
        stats_of(&cluster)
            .values()
            .all(|s| s.get("member:6").is_some_and(|l| l.contains(" joining=1")))
    });
    admin(&cluster, 4, &["cancel"]);
    epoch = moves_settled(&cluster, epoch, 5);
    for (id, s) in stats_of(&cluster) {
        let line = &s["member:6"];
        assert!(line.contains(" standby=1"), "node {id}: {line}");
    }
    let expected = with_still(writer.pause());
    check_after_move(&cluster, &expected, n, "node 6's move cancelled");
    assert_eq!(
        curr_items(&cluster, 6),
        0,
        "node 6 dropped what it was handed"
    );
    writer.resume();
    cluster.kill(6);
    cluster.set_node_args(
        6,
        vec![
            "--standby".into(),
            "--handoff-bytes-per-sec".into(),
            "1000".into(),
        ],
    );
    cluster.restart(6);

    // Node 6 replaces node 3, which leaves; in the middle of that move,
    // node 4 is killed with SIGKILL and restarted empty (it refills, and
    // is no source until it has).
    let said = admin(&cluster, 1, &["replace", "3", "6"]);
    assert!(said.contains("epoch"), "{said}");
    wait_for("the replace to be moving", || {
        stats_of(&cluster).values().all(|s| {
            s.get("member:3").is_some_and(|l| l.contains(" leaving=1"))
                && field(s, "transfers_pending") > 0
        })
    });
    cluster.kill(4);
    cluster.restart(4);
    writer.set_targets(client_addrs(&cluster));
    let status = cluster.wait_exit(3, std::time::Duration::from_secs(60));
    assert!(status.success(), "node 3 exited with {status}");
    writer.set_targets(client_addrs(&cluster));
    moves_settled(&cluster, epoch, 4);
    let expected = with_still(writer.pause());
    check_after_move(&cluster, &expected, n, "node 6 replaced node 3");
    let status = admin(&cluster, 6, &["status"]);
    assert!(status.contains("transfers: none pending"), "{status}");
    assert!(
        writer.acked.load(std::sync::atomic::Ordering::Relaxed) > 1000,
        "the writer kept writing"
    );
}
