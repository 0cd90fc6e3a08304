//! The operator's commands on the `webvac` binary, in the spirit of
//! riak-admin and nodetool: `webvac stats` and `webvac cluster
//! status|partitions|repair`. Each asks nodes over their memcached port
//! with plain `stats` commands (`stats`, `stats cluster`, `stats
//! partitions`), so it needs nothing a monitoring tool does not have, and
//! works against any member. Human-readable tables by default, `--json`
//! for scripts.

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use serde_json::{Value, json};

/// How long one node may take to connect and answer.
const NODE_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest `stats` reply read (`stats partitions` of 65,536
/// partitions is about 3 MiB).
const REPLY_BYTES_MAX: usize = 16 * 1024 * 1024;

#[derive(Parser, Debug)]
#[command(name = "webvac", about = "webvac's operator commands")]
struct Admin {
    #[command(subcommand)]
    command: Top,
}

#[derive(Subcommand, Debug)]
enum Top {
    /// A node's memcached-style stats as a table.
    Stats {
        #[command(flatten)]
        node: NodeArgs,
        /// A stats group (`settings`, `cluster`, `conns`, …); none: the
        /// general stats.
        group: Option<String>,
    },
    /// The cluster as one member sees it.
    Cluster {
        #[command(subcommand)]
        command: ClusterCmd,
    },
}

#[derive(Subcommand, Debug)]
enum ClusterCmd {
    /// Members, their state, the share of partitions each holds, and
    /// whether replicas agree.
    Status(NodeArgs),
    /// Per partition, whether its replicas agree (`stats partitions` of
    /// every member): those that do not, or all with `--all`.
    Partitions {
        #[command(flatten)]
        node: NodeArgs,
        /// List every partition, not only those whose replicas differ or
        /// could not all be asked.
        #[arg(long)]
        all: bool,
    },
    /// Anti-entropy on every member: rounds, partitions compared and
    /// found differing, keys moved, and each pair's last comparison.
    Repair(NodeArgs),
    /// Set the cluster's default read and write quorums (each within
    /// 1..=N): a new layout epoch, decided by the members; every member
    /// follows it.
    Quorums {
        /// The new default R.
        read: u8,
        /// The new default W.
        write: u8,
        #[command(flatten)]
        node: NodeArgs,
    },
    /// Remove member ID from the cluster: its partitions move to the
    /// other members while the cluster serves, then a layout without it
    /// is decided and the member stops (exit status 0). A standby member
    /// leaves at once. Answers once the move has started.
    Leave {
        /// The member that leaves.
        id: u16,
        #[command(flatten)]
        node: NodeArgs,
    },
    /// Standby member ID (started with --join --standby) takes its share
    /// of the partitions: they move to it while the cluster serves.
    Join {
        /// The standby member.
        id: u16,
        #[command(flatten)]
        node: NodeArgs,
    },
    /// Standby member NEW takes the place of member OLD: OLD's partitions
    /// move to it, then OLD leaves and stops.
    Replace {
        /// The member that leaves.
        old: u16,
        /// The standby member that takes its place.
        new: u16,
        #[command(flatten)]
        node: NodeArgs,
    },
    /// Cancel the partition move under way: the layout before it comes
    /// back; writes made during the move were also written to the old
    /// owners, so none is lost.
    Cancel(NodeArgs),
}

#[derive(Args, Debug)]
struct NodeArgs {
    /// A node's memcached port.
    #[arg(long, default_value = "127.0.0.1:11211", value_name = "HOST:PORT")]
    node: String,
    /// JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Speak TLS to every node (started with -Z); needs --tls-ca.
    #[arg(long, requires = "tls_ca")]
    tls: bool,
    /// The CA the nodes' certificates chain to (PEM).
    #[arg(long, value_name = "FILE")]
    tls_ca: Option<std::path::PathBuf>,
    /// The name every node's certificate must carry; default: the host
    /// each node is reached at (its IP address, or its name).
    #[arg(long, value_name = "NAME")]
    tls_name: Option<String>,
    /// Authenticate to nodes started with -Y.
    #[arg(long, value_name = "USER:PASSWORD")]
    auth: Option<String>,
}

/// How every connection of one command is opened.
struct Security {
    tls: Option<(std::sync::Arc<rustls::ClientConfig>, Option<String>)>,
    /// The `set` that authenticates, whole.
    auth: Option<Vec<u8>>,
}

/// Set once, from the command's flags, before any node is asked.
static SECURITY: std::sync::OnceLock<Security> = std::sync::OnceLock::new();

impl NodeArgs {
    fn security(&self) -> anyhow::Result<Security> {
        let tls = match (&self.tls_ca, self.tls) {
            (Some(ca), true) => {
                let options = webvac::client::tls::TlsOptions {
                    ca_cert: Some(ca.clone()),
                    client_cert: None,
                };
                let config = webvac::client::tls::client_config(&options)
                    .map_err(|e| anyhow::anyhow!("--tls: {e}"))?;
                Some((config, self.tls_name.clone()))
            }
            (Some(_), false) => bail!("--tls-ca needs --tls"),
            _ => None,
        };
        let auth = match &self.auth {
            Some(a) => {
                let Some((user, password)) = a.split_once(':') else {
                    bail!("--auth: expected USER:PASSWORD");
                };
                Some(webvac::client::auth_request(user, password))
            }
            None => None,
        };
        Ok(Security { tls, auth })
    }
}

/// A connection's byte stream: TCP, or TLS over it.
trait Stream: Read + Write {}
impl<T: Read + Write> Stream for T {}

/// Runs `webvac stats …` or `webvac cluster …`.
pub fn main(argv: &[String]) -> anyhow::Result<()> {
    // As any Unix filter: output cut short by the reader (`| head`) ends
    // the process quietly instead of a panic on the failed print.
    // SAFETY: restoring a signal's default disposition, before any thread.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let admin = Admin::parse_from(argv);
    let node = match &admin.command {
        Top::Stats { node, .. } => node,
        Top::Cluster { command } => match command {
            ClusterCmd::Status(node) | ClusterCmd::Repair(node) | ClusterCmd::Cancel(node) => node,
            ClusterCmd::Partitions { node, .. }
            | ClusterCmd::Quorums { node, .. }
            | ClusterCmd::Leave { node, .. }
            | ClusterCmd::Join { node, .. }
            | ClusterCmd::Replace { node, .. } => node,
        },
    };
    let _ = SECURITY.set(node.security()?);
    match admin.command {
        Top::Stats { node, group } => stats(&node, group.as_deref()),
        Top::Cluster { command } => match command {
            ClusterCmd::Status(node) => status(&node),
            ClusterCmd::Partitions { node, all } => partitions(&node, all),
            ClusterCmd::Repair(node) => repair(&node),
            ClusterCmd::Quorums { read, write, node } => quorums(&node, read, write),
            ClusterCmd::Leave { id, node } => leave(&node, id),
            ClusterCmd::Join { id, node } => change(
                &node,
                &format!("cluster join {id}"),
                &format!("node {id} takes its share of the partitions; they move to it"),
            ),
            ClusterCmd::Replace { old, new, node } => change(
                &node,
                &format!("cluster replace {old} {new}"),
                &format!(
                    "node {new} takes the place of node {old}, which stops once its partitions have moved"
                ),
            ),
            ClusterCmd::Cancel(node) => change(
                &node,
                "cluster cancel",
                "the move is cancelled; the layout before it is back",
            ),
        },
    }
}

/// How long `webvac cluster quorums` waits for the decree's answer: each
/// try takes at most two hops, and a node makes a few.
const DECREE_TIMEOUT: Duration = Duration::from_secs(60);

/// Sends one `cluster …` change to the node and returns the epoch that
/// decided it, or fails with the node's answer.
fn decree(node: &NodeArgs, command: &str) -> anyhow::Result<u64> {
    let answer = NodeConn::open(&node.node)?.line(&format!("{command}\r\n"), DECREE_TIMEOUT)?;
    let answer = answer.trim_end();
    match answer.strip_prefix("OK epoch ") {
        Some(epoch) => Ok(epoch.parse()?),
        None => bail!("{}: {answer}", node.node),
    }
}

/// `webvac cluster quorums R W`.
fn quorums(node: &NodeArgs, read: u8, write: u8) -> anyhow::Result<()> {
    let epoch = decree(node, &format!("cluster quorums {read} {write}"))?;
    if node.json {
        println!(
            "{}",
            json!({"epoch": epoch, "read_quorum": read, "write_quorum": write})
        );
    } else {
        println!("layout epoch {epoch}: R={read} W={write}; every member follows it");
    }
    Ok(())
}

/// `webvac cluster leave ID`.
fn leave(node: &NodeArgs, id: u16) -> anyhow::Result<()> {
    let epoch = decree(node, &format!("cluster leave {id}"))?;
    if node.json {
        println!("{}", json!({"epoch": epoch, "leaves": id}));
    } else {
        println!(
            "layout epoch {epoch}: node {id} leaves (its partitions, if it holds any, move to the others first) and stops once it is no longer a member; see webvac cluster status"
        );
    }
    Ok(())
}

/// `webvac cluster join|replace|cancel`: one decree, then what it does.
fn change(node: &NodeArgs, command: &str, what: &str) -> anyhow::Result<()> {
    let epoch = decree(node, command)?;
    if node.json {
        println!("{}", json!({"epoch": epoch, "change": command}));
    } else {
        println!("layout epoch {epoch}: {what}; see webvac cluster status");
    }
    Ok(())
}

/// The `stats` groups `webvac stats` asks for: those that only read
/// (`stats reset` and `stats detail on` change the node).
const READ_ONLY_GROUPS: [&str; 7] = [
    "settings",
    "items",
    "slabs",
    "sizes",
    "conns",
    "cluster",
    "partitions",
];

/// A connection to a node's memcached port.
struct NodeConn {
    addr: String,
    stream: Box<dyn Stream>,
}

impl NodeConn {
    fn open(addr: &str) -> anyhow::Result<NodeConn> {
        let target = addr
            .to_socket_addrs()
            .with_context(|| format!("{addr}: not a HOST:PORT"))?
            .next()
            .with_context(|| format!("{addr}: no address"))?;
        let tcp = TcpStream::connect_timeout(&target, NODE_TIMEOUT)
            .with_context(|| format!("cannot connect to {addr}"))?;
        tcp.set_read_timeout(Some(NODE_TIMEOUT))?;
        tcp.set_write_timeout(Some(NODE_TIMEOUT))?;
        let security = SECURITY.get();
        let mut stream: Box<dyn Stream> = match security.and_then(|s| s.tls.as_ref()) {
            Some((config, name)) => {
                let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
                let name = name
                    .clone()
                    .unwrap_or_else(|| host.trim_matches(['[', ']']).to_string());
                let server_name = rustls::pki_types::ServerName::try_from(name.clone())
                    .with_context(|| format!("{name}: not a TLS server name"))?;
                let tls = rustls::ClientConnection::new(config.clone(), server_name)
                    .with_context(|| format!("{addr}: TLS"))?;
                let mut stream = rustls::StreamOwned::new(tls, tcp);
                // Complete the handshake now, so a bad certificate is
                // reported as such rather than as a failed read.
                while stream.conn.is_handshaking() {
                    stream
                        .conn
                        .complete_io(&mut stream.sock)
                        .with_context(|| format!("TLS handshake with {addr}"))?;
                }
                Box::new(stream)
            }
            None => Box::new(tcp),
        };
        if let Some(request) = security.and_then(|s| s.auth.as_ref()) {
            stream
                .write_all(request)
                .with_context(|| format!("{addr}: cannot send"))?;
            let mut reply = Vec::new();
            let mut byte = [0u8; 1];
            while !reply.ends_with(b"\r\n") && reply.len() < 256 {
                if stream
                    .read(&mut byte)
                    .with_context(|| format!("{addr}: no answer to the authentication"))?
                    == 0
                {
                    break;
                }
                reply.push(byte[0]);
            }
            if reply != b"STORED\r\n" {
                bail!(
                    "{addr}: authentication refused: {}",
                    String::from_utf8_lossy(&reply).trim_end()
                );
            }
        }
        Ok(NodeConn {
            addr: addr.to_string(),
            stream,
        })
    }

    /// Sends `command` and returns the one line it is answered with,
    /// waiting up to `within` in all.
    fn line(&mut self, command: &str, within: Duration) -> anyhow::Result<String> {
        let addr = self.addr.clone();
        self.stream
            .write_all(command.as_bytes())
            .with_context(|| format!("{addr}: cannot send"))?;
        let deadline = std::time::Instant::now() + within;
        let mut reply = Vec::new();
        let mut buf = [0u8; 1024];
        while !reply.ends_with(b"\r\n") {
            match self.stream.read(&mut buf) {
                Ok(0) => bail!("{addr} closed the connection mid-reply"),
                Ok(n) => reply.extend_from_slice(&buf[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    if std::time::Instant::now() >= deadline {
                        bail!(
                            "{addr}: no answer within {within:?}; the change may or may not be decided: see `webvac cluster status`"
                        )
                    }
                }
                Err(e) => bail!("{addr}: no complete reply: {e}"),
            }
            if reply.len() > REPLY_BYTES_MAX {
                bail!("{addr}: reply past {REPLY_BYTES_MAX} bytes");
            }
        }
        Ok(String::from_utf8_lossy(&reply).into_owned())
    }

    /// Sends `stats [group]` and returns its `STAT` lines in order; any
    /// other answer (`ERROR`, `CLIENT_ERROR …`) is an error naming it.
    fn stats(&mut self, group: Option<&str>) -> anyhow::Result<Vec<(String, String)>> {
        let addr = self.addr.clone();
        let line = match group {
            Some(g) => format!("stats {g}\r\n"),
            None => "stats\r\n".to_string(),
        };
        self.stream
            .write_all(line.as_bytes())
            .with_context(|| format!("{addr}: cannot send"))?;
        let mut reply = Vec::with_capacity(8192);
        let mut buf = [0u8; 16 * 1024];
        // A `STAT` list ends with `END`; anything else is one line.
        let complete = |r: &[u8]| {
            if r.starts_with(b"STAT ") {
                r.ends_with(b"\r\nEND\r\n")
            } else {
                r == b"END\r\n" || (!b"STAT ".starts_with(r) && r.ends_with(b"\r\n"))
            }
        };
        while !complete(&reply) {
            let n = match self.stream.read(&mut buf) {
                Ok(n) => n,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    bail!("{addr}: no complete reply within {NODE_TIMEOUT:?}")
                }
                Err(e) => bail!("{addr}: no complete reply: {e}"),
            };
            if n == 0 {
                bail!("{addr} closed the connection mid-reply");
            }
            reply.extend_from_slice(&buf[..n]);
            if reply.len() > REPLY_BYTES_MAX {
                bail!("{addr}: reply past {REPLY_BYTES_MAX} bytes");
            }
        }
        let text = String::from_utf8_lossy(&reply);
        if !text.ends_with("END\r\n") {
            bail!(
                "{addr} answered `{}` to `{}`",
                text.trim_end(),
                line.trim_end()
            );
        }
        Ok(text
            .lines()
            .filter_map(|l| l.strip_prefix("STAT "))
            .filter_map(|l| l.split_once(' '))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect())
    }
}

/// `stats [group]` of the node at `addr`.
fn ask(addr: &str, group: Option<&str>) -> anyhow::Result<Vec<(String, String)>> {
    NodeConn::open(addr)?.stats(group)
}

/// `STAT` lines, in order.
type StatLines = Vec<(String, String)>;

/// `stats group` of member `m`, on a connection that first checks, with
/// `stats cluster`, that the node answering is that member (a wrong or
/// shared address would otherwise report one node's figures as another's).
/// Returns the member's `stats cluster` too.
fn ask_member(
    m: &Member,
    via: &str,
    group: Option<&str>,
) -> anyhow::Result<(StatLines, StatLines)> {
    let addr = reach(m, via);
    let mut conn = NodeConn::open(&addr)?;
    let cluster = conn.stats(Some("cluster"))?;
    let id = cluster
        .iter()
        .find(|(k, _)| k == "node_id")
        .map(|(_, v)| v.as_str());
    if id != Some(m.id.to_string().as_str()) {
        bail!(
            "{addr} answers as node {}, not as member {}",
            id.unwrap_or("(none)"),
            m.id
        );
    }
    let lines = match group {
        Some("cluster") => cluster.clone(),
        g => conn.stats(g)?,
    };
    Ok((cluster, lines))
}

fn stats(node: &NodeArgs, group: Option<&str>) -> anyhow::Result<()> {
    if let Some(g) = group.filter(|g| !READ_ONLY_GROUPS.contains(g)) {
        bail!(
            "webvac stats {g}: only the groups that read ({}) are asked for",
            READ_ONLY_GROUPS.join(", ")
        );
    }
    let lines = ask(&node.node, group)?;
    if node.json {
        let map: serde_json::Map<String, Value> = lines
            .into_iter()
            .map(|(k, v)| {
                let value = match (v.parse::<u64>(), v.parse::<f64>()) {
                    (Ok(n), _) => Value::from(n),
                    (_, Ok(x)) if x.is_finite() && v.contains('.') => Value::from(x),
                    _ => Value::String(v),
                };
                (k, value)
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&map)?);
        return Ok(());
    }
    let width = lines.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (k, v) in lines {
        println!("{k:<width$}  {v}");
    }
    Ok(())
}

/// A member as `stats cluster` describes it.
#[derive(Debug, Clone)]
struct Member {
    id: u32,
    state: String,
    client: String,
    peer: String,
    primary: u64,
    replica: u64,
    fields: BTreeMap<String, String>,
}

impl Member {
    /// Whether it holds no partitions yet (it joined with `--join`).
    fn standby(&self) -> bool {
        self.fields.get("standby").is_some_and(|v| v == "1")
    }

    /// Its part in the move under way: "joining" (partitions move to it),
    /// "leaving" (they move away from it), or "".
    fn moving(&self) -> &'static str {
        let flag = |f: &str| self.fields.get(f).is_some_and(|v| v == "1");
        if flag("joining") {
            "joining"
        } else if flag("leaving") {
            "leaving"
        } else {
            ""
        }
    }
}

/// `stats cluster` of one node, read.
#[derive(Debug, Clone)]
struct ClusterView {
    node_id: u32,
    partitions: u64,
    replicas: u64,
    epoch: u64,
    read_quorum: u64,
    write_quorum: u64,
    members: Vec<Member>,
    counters: BTreeMap<String, String>,
}

fn cluster_view(addr: &str) -> anyhow::Result<ClusterView> {
    let lines = ask(addr, Some("cluster"))
        .with_context(|| format!("{addr}: `stats cluster` (is it a cluster member?)"))?;
    read_view(addr, lines)
}

fn read_view(addr: &str, lines: Vec<(String, String)>) -> anyhow::Result<ClusterView> {
    let mut counters = BTreeMap::new();
    let mut members = Vec::new();
    for (k, v) in lines {
        if let Some(id) = k.strip_prefix("member:") {
            let mut words = v.split(' ');
            let state = words.next().unwrap_or("").to_string();
            let fields: BTreeMap<String, String> = words
                .filter_map(|w| w.split_once('='))
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect();
            let num = |f: &str| fields.get(f).and_then(|v| v.parse().ok()).unwrap_or(0);
            members.push(Member {
                id: id.parse().with_context(|| format!("member id {id}"))?,
                state,
                client: fields.get("client").cloned().unwrap_or_default(),
                peer: fields.get("peer").cloned().unwrap_or_default(),
                primary: num("primary_partitions"),
                replica: num("replica_partitions"),
                fields,
            });
        } else {
            counters.insert(k, v);
        }
    }
    members.sort_by_key(|m| m.id);
    let num = |f: &str| -> anyhow::Result<u64> {
        counters
            .get(f)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("{addr}: `stats cluster` has no {f}"))
    };
    Ok(ClusterView {
        node_id: u32::try_from(num("node_id")?)?,
        partitions: num("partitions")?,
        replicas: num("replicas")?,
        epoch: num("epoch")?,
        read_quorum: num("read_quorum")?,
        write_quorum: num("write_quorum")?,
        members,
        counters,
    })
}

/// Where to reach a member's memcached port: its `client=` address; a
/// wildcard host there (`0.0.0.0`, `[::]`) is replaced by the host of its
/// `peer=` address, or failing that by the host of `--node`. (Whoever
/// answers is checked: see [`ask_member`].)
fn reach(member: &Member, via: &str) -> String {
    let wildcard = |h: &str| matches!(h, "0.0.0.0" | "[::]" | "::" | "");
    let host_of = |a: &str| a.rsplit_once(':').map(|(h, _)| h.to_string());
    match member.client.rsplit_once(':') {
        Some((host, port)) if wildcard(host) => {
            let host = host_of(&member.peer)
                .filter(|h| !wildcard(h))
                .or_else(|| host_of(via))
                .unwrap_or_else(|| "127.0.0.1".into());
            format!("{host}:{port}")
        }
        _ => member.client.clone(),
    }
}

/// One replica's `stats partitions` line: its entry count and digest.
#[derive(Debug, Clone, PartialEq)]
struct Replica {
    member: u32,
    keys: u64,
    digest: String,
}

/// Every reachable member's `stats partitions`, by partition; and the
/// members that could not be asked, with why.
type Digests = (BTreeMap<u64, Vec<Replica>>, Vec<(u32, String)>);

fn digests(view: &ClusterView, via: &str) -> Digests {
    let mut by_partition: BTreeMap<u64, Vec<Replica>> = BTreeMap::new();
    let mut missing = Vec::new();
    for m in &view.members {
        match ask_member(m, via, Some("partitions")) {
            Ok((_, lines)) => {
                for (k, v) in lines {
                    let Some(p) = k.strip_prefix("partition:").and_then(|p| p.parse().ok()) else {
                        continue;
                    };
                    let mut keys = 0;
                    let mut digest = String::new();
                    for w in v.split(' ') {
                        match w.split_once('=') {
                            Some(("keys", n)) => keys = n.parse().unwrap_or(0),
                            Some(("digest", d)) => digest = d.to_string(),
                            _ => {}
                        }
                    }
                    by_partition.entry(p).or_default().push(Replica {
                        member: m.id,
                        keys,
                        digest,
                    });
                }
            }
            Err(e) => missing.push((m.id, format!("{e:#}"))),
        }
    }
    (by_partition, missing)
}

/// Whether a partition's replicas agree: all N answered, one digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Agreement {
    Agree,
    Differ,
    /// Fewer than N replicas could be asked.
    Unchecked,
}

impl Agreement {
    fn of(replicas: &[Replica], n: u64) -> Agreement {
        let same = replicas.windows(2).all(|w| w[0].digest == w[1].digest);
        if !same {
            Agreement::Differ
        } else if (replicas.len() as u64) < n {
            Agreement::Unchecked
        } else {
            Agreement::Agree
        }
    }

    fn label(self) -> &'static str {
        match self {
            Agreement::Agree => "agree",
            Agreement::Differ => "differ",
            Agreement::Unchecked => "unchecked",
        }
    }
}

fn tally(view: &ClusterView, by_partition: &BTreeMap<u64, Vec<Replica>>) -> [u64; 3] {
    let mut t = [0u64; 3];
    for p in 0..view.partitions {
        let replicas = by_partition.get(&p).map_or(&[][..], Vec::as_slice);
        t[Agreement::of(replicas, view.replicas) as usize] += 1;
    }
    t
}

fn share(n: u64, of: u64) -> f64 {
    if of == 0 {
        0.0
    } else {
        100.0 * n as f64 / of as f64
    }
}

/// The transfers of a move as each member reports them: (member, keys
/// and bytes it has been handed in this move); `None` for one that did
/// not answer.
fn transfers(view: &ClusterView, via: &str) -> Vec<(u32, Option<(u64, u64)>)> {
    view.members
        .iter()
        .map(|m| {
            let counters = ask_member(m, via, Some("cluster")).ok().map(|(lines, _)| {
                let get = |name: &str| {
                    lines
                        .iter()
                        .find(|(k, _)| k == name)
                        .and_then(|(_, v)| v.parse::<u64>().ok())
                        .unwrap_or(0)
                };
                (get("handoff_keys"), get("handoff_bytes"))
            });
            (m.id, counters)
        })
        .collect()
}

fn status(node: &NodeArgs) -> anyhow::Result<()> {
    let view = cluster_view(&node.node)?;
    let pending: u64 = view
        .counters
        .get("transfers_pending")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let moved = transfers(&view, &node.node);
    let (by_partition, missing) = digests(&view, &node.node);
    let [agree, differ, unchecked] = tally(&view, &by_partition);
    if node.json {
        let members: Vec<Value> = view
            .members
            .iter()
            .map(|m| {
                json!({
                    "id": m.id,
                    "state": m.state,
                    "standby": m.standby(),
                    "moving": m.moving(),
                    "handed_keys": moved.iter().find(|t| t.0 == m.id).and_then(|t| t.1).map(|t| t.0),
                    "handed_bytes": moved.iter().find(|t| t.0 == m.id).and_then(|t| t.1).map(|t| t.1),
                    "client": m.client,
                    "peer": m.peer,
                    "primary_partitions": m.primary,
                    "replica_partitions": m.replica,
                    "primary_share": share(m.primary, view.partitions) / 100.0,
                    "holds_share": share(m.primary + m.replica, view.partitions) / 100.0,
                    "rtt_us": m.fields.get("rtt_us").and_then(|v| v.parse::<u64>().ok()),
                })
            })
            .collect();
        let doc = json!({
            "asked": view.node_id,
            "epoch": view.epoch,
            "partitions": view.partitions,
            "replicas": view.replicas,
            "read_quorum": view.read_quorum,
            "write_quorum": view.write_quorum,
            "members": members,
            "transfers_pending": pending,
            "replicas_agree": {"agree": agree, "differ": differ, "unchecked": unchecked},
            "unreachable": unreachable_json(&missing),
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(());
    }
    println!(
        "cluster of {} members, layout epoch {}, {} partitions, N={} R={} W={} (as member {} sees it)",
        view.members.len(),
        view.epoch,
        view.partitions,
        view.replicas,
        view.read_quorum,
        view.write_quorum,
        view.node_id
    );
    let rows: Vec<[String; 8]> = view
        .members
        .iter()
        .map(|m| {
            [
                m.id.to_string(),
                [
                    m.state.as_str(),
                    if m.standby() { "standby" } else { "" },
                    m.moving(),
                ]
                .iter()
                .filter(|w| !w.is_empty())
                .copied()
                .collect::<Vec<_>>()
                .join(" "),
                m.client.clone(),
                m.peer.clone(),
                m.primary.to_string(),
                format!("{:.1}%", share(m.primary, view.partitions)),
                format!("{:.1}%", share(m.primary + m.replica, view.partitions)),
                m.fields
                    .get("rtt_us")
                    .map_or_else(|| "-".into(), |us| format!("{us}µs")),
            ]
        })
        .collect();
    table(
        &[
            "MEMBER", "STATE", "CLIENT", "PEER", "PRIMARY", "PRIMARY%", "HOLDS%", "RTT",
        ],
        &rows,
    );
    if pending == 0 {
        println!("transfers: none pending");
    } else {
        println!(
            "transfers: {pending} pending (members to be handed partitions, or copies to drop)"
        );
        for (id, counters) in &moved {
            match counters {
                Some((keys, bytes)) => {
                    println!("  member {id}: handed {keys} keys, {bytes} bytes (since it started)")
                }
                None => println!("  member {id}: did not answer"),
            }
        }
    }
    println!("replicas: {agree} partitions agree, {differ} differ, {unchecked} not fully checked");
    print_unreachable(&missing);
    Ok(())
}

fn partitions(node: &NodeArgs, all: bool) -> anyhow::Result<()> {
    let view = cluster_view(&node.node)?;
    let (by_partition, missing) = digests(&view, &node.node);
    let mut listed = Vec::new();
    for p in 0..view.partitions {
        let replicas = by_partition.get(&p).cloned().unwrap_or_default();
        let agreement = Agreement::of(&replicas, view.replicas);
        if all || agreement != Agreement::Agree {
            listed.push((p, agreement, replicas));
        }
    }
    let [agree, differ, unchecked] = tally(&view, &by_partition);
    if node.json {
        let rows: Vec<Value> = listed
            .iter()
            .map(|(p, a, replicas)| {
                json!({
                    "partition": p,
                    "replicas": a.label(),
                    "holders": replicas.iter().map(|r| json!({"member": r.member, "keys": r.keys, "digest": r.digest})).collect::<Vec<_>>(),
                })
            })
            .collect();
        let doc = json!({
            "partitions": rows,
            "agree": agree,
            "differ": differ,
            "unchecked": unchecked,
            "unreachable": unreachable_json(&missing),
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(());
    }
    let rows: Vec<[String; 3]> = listed
        .iter()
        .map(|(p, a, replicas)| {
            let holders = replicas
                .iter()
                .map(|r| format!("{}:{}keys/{}", r.member, r.keys, r.digest))
                .collect::<Vec<_>>()
                .join(" ");
            [p.to_string(), a.label().to_string(), holders]
        })
        .collect();
    table(&["PARTITION", "REPLICAS", "MEMBER:KEYS/DIGEST"], &rows);
    println!(
        "{agree} partitions agree, {differ} differ, {unchecked} not fully checked (of {})",
        view.partitions
    );
    print_unreachable(&missing);
    Ok(())
}

/// The anti-entropy counters `webvac cluster repair` shows per member.
const REPAIR_COUNTERS: [&str; 7] = [
    "anti_entropy_rounds",
    "anti_entropy_partitions_compared",
    "anti_entropy_partitions_differing",
    "anti_entropy_keys_pulled",
    "anti_entropy_keys_pushed",
    "anti_entropy_bytes",
    "anti_entropy_errors",
];

fn repair(node: &NodeArgs) -> anyhow::Result<()> {
    let view = cluster_view(&node.node)?;
    let mut members = Vec::new();
    let mut pairs = Vec::new();
    let mut missing = Vec::new();
    for m in &view.members {
        let v = if m.id == view.node_id {
            Ok(view.clone())
        } else {
            ask_member(m, &node.node, Some("cluster"))
                .and_then(|(lines, _)| read_view(&reach(m, &node.node), lines))
        };
        match v {
            Ok(v) => {
                let on = v.counters.get("anti_entropy").is_some_and(|x| x == "1");
                let counters: Vec<u64> = REPAIR_COUNTERS
                    .iter()
                    .map(|c| v.counters.get(*c).and_then(|x| x.parse().ok()).unwrap_or(0))
                    .collect();
                for other in v.members.iter().filter(|o| o.id > m.id) {
                    let f = |k: &str| other.fields.get(k).and_then(|x| x.parse::<u64>().ok());
                    if let Some(exchanges) = f("ae_exchanges") {
                        pairs.push((
                            m.id,
                            other.id,
                            exchanges,
                            f("ae_last_ms_ago"),
                            f("ae_keys_moved").unwrap_or(0),
                        ));
                    }
                }
                members.push((m.id, on, counters));
            }
            Err(e) => missing.push((m.id, format!("{e:#}"))),
        }
    }
    if node.json {
        let doc = json!({
            "members": members.iter().map(|(id, on, c)| {
                let mut o = serde_json::Map::new();
                o.insert("id".into(), json!(id));
                o.insert("anti_entropy".into(), json!(on));
                for (name, v) in REPAIR_COUNTERS.iter().zip(c) {
                    o.insert(name.trim_start_matches("anti_entropy_").into(), json!(v));
                }
                Value::Object(o)
            }).collect::<Vec<_>>(),
            "pairs": pairs.iter().map(|(a, b, n, ago, moved)| json!({
                "members": [a, b], "exchanges": n, "last_compared_ms_ago": ago, "keys_moved": moved,
            })).collect::<Vec<_>>(),
            "unreachable": unreachable_json(&missing),
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(());
    }
    let rows: Vec<[String; 9]> = members
        .iter()
        .map(|(id, on, c)| {
            let mut row: [String; 9] = Default::default();
            row[0] = id.to_string();
            row[1] = if *on { "on" } else { "off" }.into();
            for (cell, v) in row[2..].iter_mut().zip(c) {
                *cell = v.to_string();
            }
            row
        })
        .collect();
    table(
        &[
            "MEMBER",
            "ANTI-ENTROPY",
            "ROUNDS",
            "COMPARED",
            "DIFFERING",
            "PULLED",
            "PUSHED",
            "BYTES",
            "ERRORS",
        ],
        &rows,
    );
    println!();
    let rows: Vec<[String; 4]> = pairs
        .iter()
        .map(|(a, b, n, ago, moved)| {
            [
                format!("{a}-{b}"),
                n.to_string(),
                ago.map_or_else(
                    || "never".into(),
                    |ms| format!("{:.1}s ago", ms as f64 / 1000.0),
                ),
                moved.to_string(),
            ]
        })
        .collect();
    table(&["PAIR", "EXCHANGES", "LAST COMPARED", "KEYS MOVED"], &rows);
    print_unreachable(&missing);
    Ok(())
}

/// Members that could not be asked, for `--json`.
fn unreachable_json(missing: &[(u32, String)]) -> Vec<Value> {
    missing
        .iter()
        .map(|(id, why)| json!({"id": id, "error": why}))
        .collect()
}

/// Members that could not be asked, after a table.
fn print_unreachable(missing: &[(u32, String)]) {
    for (id, why) in missing {
        println!("member {id} could not be asked: {why}");
    }
}

/// Prints rows under a header, columns padded to their widest cell.
fn table<const K: usize>(header: &[&str; K], rows: &[[String; K]]) {
    let mut width = header.map(|h| h.chars().count());
    for row in rows {
        for (w, cell) in width.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&width)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}
