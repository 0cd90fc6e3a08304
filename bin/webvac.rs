//! The webvac server binary. Flags match memcached's where they overlap.

use anyhow::Context;
use clap::Parser;
use tracing_subscriber::EnvFilter;
use webvac::config::{ClusterConfig, Config, MemberConfig, parse_octal_mask, parse_size};
use webvac::server::Server;

#[path = "webvac/admin.rs"]
mod admin;

#[derive(Parser, Debug)]
#[command(
    name = "webvac",
    version,
    // As getopt: a flag given twice takes its last value.
    args_override_self = true,
    about = "A memcached-compatible in-memory cache"
)]
struct Args {
    /// TCP port to listen on (default 11211; 0 picks a free port).
    #[arg(short = 'p', long = "port")]
    port: Option<u16>,
    /// Interface to listen on (default 127.0.0.1).
    #[arg(short = 'l', long = "listen")]
    listen: Option<String>,
    /// Serve clients on this unix socket instead of TCP (memcached's -s:
    /// network listening is off).
    #[arg(short = 's', long = "unix-socket")]
    unix_socket: Option<std::path::PathBuf>,
    /// The unix socket's access mask, in octal (default 0700).
    #[arg(short = 'a', long = "unix-mask", value_parser = parse_octal_mask)]
    unix_mask: Option<u32>,
    /// UDP port: only 0 (off) is accepted; webvac does not serve UDP.
    #[arg(short = 'U', long = "udp-port")]
    udp_port: Option<u16>,
    /// When started as root, run as this user (memcached's -u); the
    /// switch happens before any socket is opened.
    #[arg(short = 'u', long = "user")]
    user: Option<String>,
    /// Write the process id to this file; it is removed at exit.
    #[arg(short = 'P', long = "pidfile")]
    pidfile: Option<std::path::PathBuf>,
    /// Item memory in MiB (default 64); `64m` and `1g` too, as memcached
    /// takes them.
    #[arg(short = 'm', long = "memory-limit", value_parser = parse_memory_mb)]
    memory_limit: Option<usize>,
    /// Worker threads (default 4).
    #[arg(short = 't', long = "threads")]
    threads: Option<usize>,
    /// Return errors when memory is exhausted instead of evicting items
    /// (memcached's -M): expired items still make room.
    #[arg(short = 'M', long = "disable-evictions")]
    disable_evictions: bool,
    /// Maximum simultaneous connections (default 1024).
    #[arg(short = 'c', long = "max-connections", visible_alias = "conn-limit")]
    max_connections: Option<usize>,
    /// Maximum item size, e.g. 1m, 512k (default 1m).
    #[arg(short = 'I', long = "max-item-size", value_parser = parse_size)]
    max_item_size: Option<usize>,
    /// Log format: text (default) or json, one object per line.
    #[arg(long = "log-format", value_name = "text|json", value_parser = parse_log_format)]
    log_format: Option<webvac::config::LogFormat>,
    /// Serve Prometheus metrics (`GET /metrics`, plain HTTP) on this
    /// HOST:PORT; off by default.
    #[arg(long = "metrics-listen", value_name = "HOST:PORT")]
    metrics_listen: Option<String>,
    /// Close connections idle this many seconds, waiting for a command
    /// (memcached's -o idle_timeout; default 0: never).
    #[arg(long = "idle-timeout")]
    idle_timeout: Option<u32>,
    /// Close a connection that stalls this many seconds mid-way through a
    /// data block holding in-flight memory (default 30; 0: never).
    #[arg(long = "data-timeout")]
    data_timeout: Option<u32>,
    /// Verbose logging; repeat for more (-vv).
    #[arg(short = 'v', long = "verbose", action = clap::ArgAction::Count)]
    verbose: u8,
    /// Run as a daemon (memcached's -d): detach from the terminal, with
    /// stdin, stdout and stderr on /dev/null (so logs go nowhere; -P
    /// records the pid).
    #[arg(short = 'd', long = "daemon")]
    daemon: bool,
    /// Raise the core file size limit to its maximum (memcached's -r).
    #[arg(short = 'r', long = "enable-coredumps")]
    enable_coredumps: bool,
    /// Lock all memory into RAM (memcached's -k); a warning, not an
    /// error, if the system refuses.
    #[arg(short = 'k', long = "lock-memory")]
    lock_memory: bool,
    /// Print the license and exit (memcached's -i).
    #[arg(short = 'i', long = "license")]
    license: bool,
    /// Accept the `shutdown` command, which stops the node as SIGTERM does
    /// (memcached's -A).
    #[arg(short = 'A', long = "enable-shutdown")]
    enable_shutdown: bool,
    /// Refuse `flush_all` (memcached's -F).
    #[arg(short = 'F', long = "disable-flush-all")]
    disable_flush_all: bool,
    /// Connections the kernel queues before they are accepted (memcached's
    /// -b; default 1024).
    #[arg(short = 'b', long = "listen-backlog")]
    listen_backlog: Option<u32>,
    /// Requests one connection runs before others get a turn (memcached's
    /// -R; default 1024).
    #[arg(short = 'R', long = "max-reqs-per-event")]
    max_reqs_per_event: Option<usize>,
    /// Protocol (memcached's -B): ascii or auto; webvac speaks the text and
    /// meta protocols, and refuses binary.
    #[arg(short = 'B', long = "protocol")]
    protocol: Option<String>,
    /// memcached's -X (no cachedump or metadump): webvac has neither, so
    /// this is accepted and changes nothing.
    #[arg(short = 'X', long = "disable-dumping")]
    disable_dumping: bool,
    /// memcached's -W (no watch command): webvac has none, so this is
    /// accepted and changes nothing.
    #[arg(short = 'W', long = "disable-watch")]
    disable_watch: bool,
    /// memcached's extended options, comma separated (-o modern,idle_timeout=60);
    /// the README lists which are taken and which refused.
    #[arg(short = 'o', long = "extended")]
    extended: Vec<String>,
    /// Read settings from this TOML file; flags override it.
    #[arg(long = "config")]
    config: Option<String>,
    /// Cluster: this node's member id. With --member, makes a cluster
    /// without a config file.
    #[arg(long = "node-id")]
    node_id: Option<u16>,
    /// Cluster: a member as ID=CLIENT_ADDR,PEER_ADDR, e.g.
    /// 1=127.0.0.1:11211,127.0.0.1:12211. Repeat for every member,
    /// this node included. Replaces the file's member list.
    #[arg(long = "member", value_parser = parse_member)]
    members: Vec<MemberConfig>,
    /// Cluster: join the running cluster that SEED_PEER_ADDR (any member's
    /// peer address) belongs to, as a standby member that holds no
    /// partitions yet; --member need name only this node, and N, R, W and
    /// P come from the cluster.
    #[arg(long = "join", value_name = "SEED_PEER_ADDR")]
    join: Option<String>,
    /// Cluster: with --join, stay a standby member holding no partitions
    /// (by default a joining node takes its share of the partitions, which
    /// are handed to it while the cluster serves).
    #[arg(long = "standby")]
    standby: bool,
    /// Cluster: bytes per second a node gaining partitions pulls from each
    /// current owner (default 32 MiB).
    #[arg(long = "handoff-bytes-per-sec")]
    handoff_bytes_per_sec: Option<u64>,
    /// Cluster: seconds a partition move may take before it is cancelled
    /// (default 600).
    #[arg(long = "handoff-timeout-secs")]
    handoff_timeout_secs: Option<u64>,
    /// Cluster: copies of each partition (N, default 3).
    #[arg(long = "replicas")]
    replicas: Option<usize>,
    /// Cluster: replicas a read waits for (R, default a majority of N).
    #[arg(long = "read-quorum")]
    read_quorum: Option<usize>,
    /// Cluster: replicas a write must reach (W, default a majority of N).
    #[arg(long = "write-quorum")]
    write_quorum: Option<usize>,
    /// Cluster: number of partitions (default 1024; fixed for the cluster's life).
    #[arg(long = "partitions")]
    partitions: Option<u32>,
    /// Cluster: how long one hop may take, in ms (default 1000).
    #[arg(long = "request-timeout-ms")]
    request_timeout_ms: Option<u64>,
    /// Cluster: count hints for unreachable replicas toward W.
    #[arg(long = "sloppy-quorum")]
    sloppy_quorum: bool,
    /// Cluster: do not pull this node's keys from its peers at start.
    #[arg(long = "no-refill")]
    no_refill: bool,
    /// Cluster: do not compare hash trees with the other replicas.
    #[arg(long = "no-anti-entropy")]
    no_anti_entropy: bool,
    /// Cluster: ms between anti-entropy rounds (default 1000).
    #[arg(long = "anti-entropy-interval-ms")]
    anti_entropy_interval_ms: Option<u64>,
    /// Cluster: partitions one anti-entropy round compares (default 256).
    #[arg(long = "anti-entropy-partitions-per-round")]
    anti_entropy_partitions_per_round: Option<usize>,
    /// Cluster: entries one anti-entropy round lists per peer (default 10000).
    #[arg(long = "anti-entropy-keys-per-round")]
    anti_entropy_keys_per_round: Option<usize>,
    /// Cluster: anti-entropy bytes per second per peer (default 8 MiB).
    #[arg(long = "anti-entropy-bytes-per-sec")]
    anti_entropy_bytes_per_sec: Option<u64>,
    /// Cluster: how long a hint waits for its replica, in seconds (default 10800).
    #[arg(long = "hint-window-secs")]
    hint_window_secs: Option<u64>,
    /// Cluster: hints held per unreachable replica; 0 turns hinted handoff off.
    #[arg(long = "hints-per-target-max")]
    hints_per_target_max: Option<usize>,
    /// Cluster: how long a tombstone lives, in seconds (default 11400).
    #[arg(long = "tombstone-grace-secs")]
    tombstone_grace_secs: Option<u64>,
    /// Cluster: how far ahead of this node's clock a peer's version may be,
    /// in ms, before it is refused (default 10000).
    #[arg(long = "clock-drift-max-ms")]
    clock_drift_max_ms: Option<u64>,
    /// Cluster: a file holding the cluster secret (owner-only, the same on
    /// every member); peers prove they hold it before any message is read.
    /// Required unless every member's peer address is loopback.
    #[arg(long = "cluster-secret-file")]
    cluster_secret_file: Option<std::path::PathBuf>,
    /// Cluster: peer TLS, this node's certificate chain (PEM); with
    /// --cluster-tls-key and --cluster-tls-ca every peer connection is TLS
    /// with certificates on both ends.
    #[arg(long = "cluster-tls-cert")]
    cluster_tls_cert: Option<std::path::PathBuf>,
    /// Cluster: peer TLS, the key of --cluster-tls-cert (PEM).
    #[arg(long = "cluster-tls-key")]
    cluster_tls_key: Option<std::path::PathBuf>,
    /// Cluster: peer TLS, the CA every member's certificate chains to (PEM).
    #[arg(long = "cluster-tls-ca")]
    cluster_tls_ca: Option<std::path::PathBuf>,
    /// How long a request id makes a retry safe, in seconds (default 600).
    #[arg(long = "dedup-window-secs")]
    dedup_window_secs: Option<u32>,
    /// Request-id records kept per key (default 16, at most 64).
    #[arg(long = "request-id-records-per-key")]
    request_id_records_per_key: Option<usize>,
    /// memcached's ASCII authentication: a file of user:password lines;
    /// a connection's first command must be `set <any> 0 0 <n>` with the
    /// value "user password". Reloaded on SIGHUP.
    #[arg(short = 'Y', long = "auth-file")]
    auth_file: Option<std::path::PathBuf>,
    /// memcached's TLS: clients speak TLS on every TCP listener but those
    /// `-l` marks `notls:`; the certificate and key are given with
    /// `-o ssl_chain_cert=FILE,ssl_key=FILE`.
    #[arg(short = 'Z', long = "enable-ssl")]
    enable_ssl: bool,
    /// Key that authenticates `lk` listing tokens (same on every node).
    #[arg(long = "listing-secret")]
    listing_secret: Option<String>,
    /// Testing only: fraction of requests to ignore (no execution, no reply).
    #[arg(long = "fault-drop-request")]
    fault_drop_request: Option<f64>,
    /// Testing only: fraction of replies to drop (the request is executed).
    #[arg(long = "fault-drop-reply")]
    fault_drop_reply: Option<f64>,
    /// Testing only: fraction of requests to delay by --fault-delay-ms.
    #[arg(long = "fault-delay")]
    fault_delay: Option<f64>,
    /// Testing only: how long a delayed request waits, in ms.
    #[arg(long = "fault-delay-ms")]
    fault_delay_ms: Option<u64>,
    /// Testing only: seed of the fault choices.
    #[arg(long = "fault-seed")]
    fault_seed: Option<u64>,
    /// Testing only: the node's clock reads this many ms ahead (negative: behind).
    #[arg(long = "fault-clock-offset-ms", allow_negative_numbers = true)]
    fault_clock_offset_ms: Option<i64>,
    /// Testing only: the node's clock runs at this rate from its start (0.5 to 2.0).
    #[arg(long = "fault-clock-rate")]
    fault_clock_rate: Option<f64>,
    /// Testing only: drop every peer message to and from these members,
    /// e.g. 2,3 (`-`: none).
    #[arg(long = "fault-drop-peers", value_parser = parse_ids)]
    fault_drop_peers: Option<PeerIds>,
    /// Testing only: accept the `fault` command, which skews the clock or
    /// cuts the node off at run time. Never in production.
    #[arg(long = "fault-control")]
    fault_control: bool,
}

/// A member list given as one flag value (clap would take a bare `Vec` as
/// a repeated flag).
#[derive(Clone, Debug)]
struct PeerIds(Vec<u16>);

/// `2,3` or `-` (none), as the `fault drop_peers` command takes them.
fn parse_ids(s: &str) -> Result<PeerIds, String> {
    webvac::protocol::fault::parse_ids(s)
        .map(PeerIds)
        .ok_or_else(|| format!("invalid member list {s:?}: expected ids like 2,3 or -"))
}

/// `ID=CLIENT_ADDR,PEER_ADDR`.
fn parse_member(s: &str) -> Result<MemberConfig, String> {
    let err = || format!("invalid member {s:?}: expected ID=CLIENT_ADDR,PEER_ADDR");
    let (id, addrs) = s.split_once('=').ok_or_else(err)?;
    let (client, peer) = addrs.split_once(',').ok_or_else(err)?;
    Ok(MemberConfig {
        id: id.trim().parse().map_err(|_| err())?,
        client: client.trim().to_string(),
        peer: peer.trim().to_string(),
    })
}

/// Applies the cluster flags on top of the file's `[cluster]`, if any.
fn cluster_flags(
    args: &Args,
    file: Option<ClusterConfig>,
) -> anyhow::Result<Option<ClusterConfig>> {
    let any_flag = args.node_id.is_some()
        || !args.members.is_empty()
        || args.join.is_some()
        || args.standby
        || args.handoff_bytes_per_sec.is_some()
        || args.handoff_timeout_secs.is_some()
        || args.replicas.is_some()
        || args.read_quorum.is_some()
        || args.write_quorum.is_some()
        || args.partitions.is_some()
        || args.request_timeout_ms.is_some()
        || args.sloppy_quorum
        || args.no_refill
        || args.no_anti_entropy
        || args.anti_entropy_interval_ms.is_some()
        || args.anti_entropy_partitions_per_round.is_some()
        || args.anti_entropy_keys_per_round.is_some()
        || args.anti_entropy_bytes_per_sec.is_some()
        || args.hint_window_secs.is_some()
        || args.hints_per_target_max.is_some()
        || args.tombstone_grace_secs.is_some()
        || args.clock_drift_max_ms.is_some()
        || args.cluster_secret_file.is_some()
        || args.cluster_tls_cert.is_some()
        || args.cluster_tls_key.is_some()
        || args.cluster_tls_ca.is_some();
    if !any_flag {
        return Ok(file);
    }
    let mut c = match file {
        Some(c) => c,
        None => {
            let node_id = args
                .node_id
                .context("cluster flags need --node-id (or a [cluster] section in --config)")?;
            ClusterConfig::new(node_id, Vec::new())
        }
    };
    if let Some(id) = args.node_id {
        c.node_id = id;
    }
    if !args.members.is_empty() {
        c.members = args.members.clone();
    }
    if let Some(seed) = &args.join {
        c.join = Some(seed.clone());
    }
    c.standby |= args.standby;
    if let Some(v) = args.handoff_bytes_per_sec {
        c.handoff_bytes_per_sec = v;
    }
    if let Some(v) = args.handoff_timeout_secs {
        c.handoff_timeout_secs = v;
    }
    if let Some(n) = args.replicas {
        c.replicas = n;
    }
    if let Some(r) = args.read_quorum {
        c.read_quorum = Some(r);
    }
    if let Some(w) = args.write_quorum {
        c.write_quorum = Some(w);
    }
    if let Some(p) = args.partitions {
        c.partitions = p;
    }
    if let Some(t) = args.request_timeout_ms {
        c.request_timeout_ms = t;
    }
    if args.sloppy_quorum {
        c.sloppy_quorum = true;
    }
    if let Some(path) = &args.cluster_secret_file {
        c.secret_file = Some(path.clone());
    }
    if let Some(path) = &args.cluster_tls_cert {
        c.tls_cert = Some(path.clone());
    }
    if let Some(path) = &args.cluster_tls_key {
        c.tls_key = Some(path.clone());
    }
    if let Some(path) = &args.cluster_tls_ca {
        c.tls_ca = Some(path.clone());
    }
    if args.no_refill {
        c.refill_on_start = false;
    }
    if args.no_anti_entropy {
        c.anti_entropy = false;
    }
    if let Some(v) = args.anti_entropy_interval_ms {
        c.anti_entropy_interval_ms = v;
    }
    if let Some(v) = args.anti_entropy_partitions_per_round {
        c.anti_entropy_partitions_per_round = v;
    }
    if let Some(v) = args.anti_entropy_keys_per_round {
        c.anti_entropy_keys_per_round = v;
    }
    if let Some(v) = args.anti_entropy_bytes_per_sec {
        c.anti_entropy_bytes_per_sec = v;
    }
    if let Some(v) = args.hint_window_secs {
        c.hint_window_secs = v;
    }
    if let Some(v) = args.hints_per_target_max {
        c.hints_per_target_max = v;
    }
    if let Some(v) = args.tombstone_grace_secs {
        c.tombstone_grace_secs = v;
    }
    if let Some(v) = args.clock_drift_max_ms {
        c.clock_drift_max_ms = v;
    }
    Ok(Some(c))
}

/// memcached's `-m`: MiB, or a number with an `m` or `g` suffix.
fn parse_memory_mb(s: &str) -> Result<usize, String> {
    let (digits, scale) = match s.as_bytes().last() {
        Some(b'm' | b'M') => (&s[..s.len() - 1], 1),
        Some(b'g' | b'G') => (&s[..s.len() - 1], 1024),
        _ => (s, 1),
    };
    digits
        .parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .ok_or_else(|| format!("invalid memory limit {s:?}: MiB, or a number with m or g"))
}

/// memcached flags that cannot mean anything for webvac: refused by name,
/// with why (flag, long flag, reason).
const REFUSED: &[(&str, &str, &str)] = &[
    (
        "-C",
        "--disable-cas",
        "CAS values are webvac's version stamps, which replication depends on; they cannot be turned off",
    ),
    (
        "-f",
        "--slab-growth-factor",
        "webvac has no slab classes (each item is allocated to its size); there is nothing to tune",
    ),
    (
        "-n",
        "--slab-min-size",
        "webvac has no slab classes (each item is allocated to its size); there is nothing to tune",
    ),
    (
        "-L",
        "--enable-largepages",
        "webvac does not preallocate item memory in pages of its own",
    ),
    (
        "-D",
        "",
        "per-prefix statistics (`stats detail`) are not supported",
    ),
    (
        "-S",
        "--enable-sasl",
        "SASL belongs to the binary protocol, which webvac does not speak",
    ),
    (
        "-e",
        "--memory-file",
        "a restartable memory file is not supported (a restarted cluster member refills from its replicas)",
    ),
    (
        "-N",
        "--napi_ids",
        "NAPI-ID thread steering is not supported",
    ),
    (
        "-N",
        "--napi-ids",
        "NAPI-ID thread steering is not supported",
    ),
];

/// The first memcached flag in `args` that webvac refuses, with why.
fn refused_flag(args: &[String]) -> Option<(String, &'static str)> {
    args.iter().skip(1).find_map(|arg| {
        REFUSED.iter().find_map(|&(short, long, why)| {
            let hit = arg == short
                // A value run on (`-f1.5`), as getopt takes it.
                || (arg.starts_with(short) && !arg.starts_with("--"))
                || (!long.is_empty()
                    && (arg == long || arg.starts_with(&format!("{long}="))));
            hit.then(|| (arg.clone(), why))
        })
    })
}

/// memcached's `-o` options that tune its slab allocator, LRU, hash table
/// or logging: nothing in webvac corresponds.
const EXTENDED_INTERNALS: &[&str] = &[
    "hashpower",
    "tail_repair_time",
    "hash_algorithm",
    "lru_crawler",
    "no_lru_crawler",
    "lru_crawler_sleep",
    "lru_crawler_tocrawl",
    "read_buf_mem_limit",
    "lru_maintainer",
    "no_lru_maintainer",
    "hot_lru_pct",
    "warm_lru_pct",
    "hot_max_factor",
    "warm_max_factor",
    "temporary_ttl",
    "slab_chunk_max",
    "watcher_logbuf_size",
    "worker_logbuf_size",
    "track_sizes",
    "no_hashexpand",
    "slab_reassign",
    "slab_automove",
    "slab_automove_freeratio",
    "slab_automove_ratio",
    "slab_automove_window",
    "slab_sizes",
    "no_slab_reassign",
    "no_slab_automove",
    "no_chunked_items",
    "sock_cookie_id",
];

/// Applies memcached's `-o` options to `config`; an option webvac cannot
/// honour is refused by name.
fn apply_extended(options: &[String], config: &mut Config) -> anyhow::Result<()> {
    for option in options.iter().flat_map(|o| o.split(',')) {
        let (name, value) = option.split_once('=').unwrap_or((option, ""));
        match name {
            "" => {}
            "idle_timeout" => {
                config.idle_timeout_secs = value
                    .parse()
                    .with_context(|| format!("-o idle_timeout={value}: expected seconds"))?;
            }
            // What `modern` turns on, webvac does already; `no_modern`
            // asks for 1.4's defaults, which change nothing here either.
            // webvac always refuses a connection past the limit at once.
            "modern" | "no_modern" | "maxconns_fast" => {}
            // memcached's seccomp sandbox (off by default): webvac has
            // none, so there is nothing to relax; and two options that are
            // no-ops in memcached itself.
            "relaxed_privileges"
            | "no_drop_privileges"
            | "inline_ascii_resp"
            | "no_inline_ascii_resp"
            | "resp_obj_mem_limit" => {}
            "drop_privileges" => {
                anyhow::bail!("-o drop_privileges: webvac has no seccomp sandbox to turn on")
            }
            "no_maxconns_fast" => anyhow::bail!(
                "-o no_maxconns_fast: webvac refuses a connection past -c at once, with memcached's error; it does not queue them"
            ),
            _ if name.starts_with("ssl_") => apply_ssl(name, value, config)?,
            _ if name.starts_with("proxy_") => anyhow::bail!(
                "-o {name}: webvac has no proxy mode (its cluster routes requests itself)"
            ),
            _ if name.starts_with("ext_") => anyhow::bail!(
                "-o {name}: external storage (extstore) is not supported; webvac keeps items in memory"
            ),
            _ if EXTENDED_INTERNALS.contains(&name) => anyhow::bail!(
                "-o {name}: it tunes memcached's slab allocator, LRU or hash table, which webvac does not have (it evicts with SIEVE from items allocated to size)"
            ),
            _ => {
                anyhow::bail!("-o {name}: not an extended option webvac or memcached 1.6.18 knows")
            }
        }
    }
    Ok(())
}

/// memcached's `-o ssl_*` options.
fn apply_ssl(name: &str, value: &str, config: &mut Config) -> anyhow::Result<()> {
    let file = || {
        if value.is_empty() {
            anyhow::bail!("Missing {name} argument")
        }
        Ok(std::path::PathBuf::from(value))
    };
    let number = || {
        if value.is_empty() {
            anyhow::bail!("Missing {name} argument")
        }
        value
            .parse::<u8>()
            .with_context(|| format!("could not parse argument to {name}"))
    };
    match name {
        "ssl_chain_cert" => config.ssl_chain_cert = Some(file()?),
        "ssl_key" => config.ssl_key = Some(file()?),
        "ssl_ca_cert" => config.ssl_ca_cert = Some(file()?),
        "ssl_verify_mode" => config.ssl_verify_mode = number()?,
        "ssl_min_version" => config.ssl_min_version = number()?,
        "ssl_session_cache" => config.ssl_session_cache = true,
        "ssl_wbuf_size" => {
            config.ssl_wbuf_size = value
                .parse()
                .with_context(|| format!("could not parse argument to {name}"))?;
        }
        "ssl_keyformat" => {
            if number()? != 1 {
                anyhow::bail!(
                    "-o ssl_keyformat={value}: webvac reads PEM keys only (ssl_keyformat=1)"
                );
            }
        }
        "ssl_ciphers" => anyhow::bail!(
            "-o ssl_ciphers: webvac offers rustls's cipher suites (TLS 1.3, and TLS 1.2 with forward-secret AEAD suites) and takes no OpenSSL cipher list"
        ),
        "ssl_kernel_tls" => anyhow::bail!("-o ssl_kernel_tls: Kernel TLS offload is not available"),
        _ => anyhow::bail!("-o {name}: not an extended option webvac or memcached 1.6.18 knows"),
    }
    Ok(())
}

/// memcached's `-r` and `-k`, as it applies them.
fn apply_process_limits(enable_coredumps: bool, lock_memory: bool) {
    if enable_coredumps {
        let max = libc::rlimit {
            rlim_cur: libc::RLIM_INFINITY,
            rlim_max: libc::RLIM_INFINITY,
        };
        // SAFETY: setrlimit reads the struct it is given.
        if unsafe { libc::setrlimit(libc::RLIMIT_CORE, &max) } != 0 {
            let mut now = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: as above; getrlimit writes the struct it is given.
            unsafe {
                if libc::getrlimit(libc::RLIMIT_CORE, &mut now) == 0 {
                    now.rlim_cur = now.rlim_max;
                    libc::setrlimit(libc::RLIMIT_CORE, &now);
                }
            }
        }
    }
    if lock_memory {
        // SAFETY: mlockall takes flags only.
        if unsafe { libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE) } != 0 {
            eprintln!(
                "warning: -k invalid, mlockall() failed: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

fn parse_log_format(s: &str) -> Result<webvac::config::LogFormat, String> {
    match s {
        "text" => Ok(webvac::config::LogFormat::Text),
        "json" => Ok(webvac::config::LogFormat::Json),
        other => Err(format!("{other}: expected text or json")),
    }
}

fn main() -> anyhow::Result<()> {
    webvac::server::rlimit::limit_malloc_arenas();
    let argv: Vec<String> = std::env::args().collect();
    // The operator's commands; everything else is the server, whose flags
    // are memcached's.
    if matches!(argv.get(1).map(String::as_str), Some("stats" | "cluster")) {
        return admin::main(&argv);
    }
    if let Some((flag, why)) = refused_flag(&argv) {
        anyhow::bail!("{flag}: {why}");
    }
    let args = Args::parse();
    if args.license {
        println!(
            "webvac {}: licensed under the Apache License, Version 2.0 (https://www.apache.org/licenses/LICENSE-2.0)",
            env!("CARGO_PKG_VERSION")
        );
        return Ok(());
    }
    let mut config = match &args.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    config.cluster = cluster_flags(&args, config.cluster.take())?;
    if let Some(p) = args.port {
        config.port = p;
    }
    if let Some(l) = args.listen {
        config.listen = l;
    }
    if let Some(path) = args.unix_socket {
        config.unix_socket = Some(path);
    }
    if let Some(mask) = args.unix_mask {
        config.unix_mask = mask;
    }
    if args.udp_port.is_some_and(|p| p != 0) {
        anyhow::bail!(
            "-U {}: webvac does not serve UDP (memcached's UDP protocol is off by default since 1.5.6); -U 0 is accepted",
            args.udp_port.unwrap_or_default()
        );
    }
    if let Some(m) = args.memory_limit {
        config.memory_limit_mb = m;
    }
    if args.disable_evictions {
        config.evictions = false;
    }
    if args.enable_shutdown {
        config.shutdown_command = true;
    }
    if args.disable_flush_all {
        config.flush_enabled = false;
    }
    if let Some(b) = args.listen_backlog {
        config.listen_backlog = b;
    }
    if let Some(r) = args.max_reqs_per_event {
        config.requests_per_event = r;
    }
    match args.protocol.as_deref() {
        None | Some("ascii" | "auto") => {}
        Some("binary") => anyhow::bail!(
            "-B binary: webvac speaks memcached's text and meta protocols, not the binary protocol (deprecated by memcached)"
        ),
        Some(other) => anyhow::bail!("-B {other}: expected ascii, binary or auto"),
    }
    apply_extended(&args.extended, &mut config)?;
    if let Some(t) = args.threads {
        config.threads = t;
    }
    if let Some(c) = args.max_connections {
        config.max_connections = c;
    }
    if let Some(i) = args.max_item_size {
        config.max_item_size = i;
    }
    if args.verbose > 0 {
        config.verbosity = args.verbose;
    }
    if let Some(v) = args.idle_timeout {
        config.idle_timeout_secs = v;
    }
    if let Some(v) = args.data_timeout {
        config.data_timeout_secs = v;
    }
    if let Some(v) = args.dedup_window_secs {
        config.dedup_window_secs = v;
    }
    if let Some(v) = args.request_id_records_per_key {
        config.request_id_records_per_key = v;
    }
    if let Some(path) = args.auth_file.clone() {
        config.auth_file = Some(path);
    }
    if args.enable_ssl {
        config.ssl_enabled = true;
    }
    if let Some(v) = args.log_format {
        config.log_format = v;
    }
    if let Some(v) = args.metrics_listen {
        config.metrics_listen = Some(v);
    }
    if let Some(v) = args.listing_secret {
        config.listing_secret = Some(v);
    }
    let f = &mut config.faults;
    for (flag, field) in [
        (args.fault_drop_request, &mut f.drop_request),
        (args.fault_drop_reply, &mut f.drop_reply),
        (args.fault_delay, &mut f.delay),
    ] {
        if let Some(v) = flag {
            *field = v;
        }
    }
    if let Some(v) = args.fault_delay_ms {
        f.delay_ms = v;
    }
    if let Some(v) = args.fault_seed {
        f.seed = v;
    }
    if let Some(v) = args.fault_clock_offset_ms {
        f.clock_offset_ms = v;
    }
    if let Some(v) = args.fault_clock_rate {
        f.clock_rate = v;
    }
    if let Some(PeerIds(ids)) = args.fault_drop_peers {
        f.drop_peers = ids;
    }
    if args.fault_control {
        f.control = true;
    }
    config.validate()?;
    if config.faults.any() {
        eprintln!(
            "warning: fault injection is on ({:?}); for testing only",
            config.faults
        );
    }
    if config.faults.control {
        eprintln!(
            "warning: the `fault` command is on: any client can skew this node's clock or cut it off from its peers"
        );
    }

    let level = match config.verbosity {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    match config.log_format {
        webvac::config::LogFormat::Text => tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_env_filter(filter)
            .init(),
        webvac::config::LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_writer(std::io::stderr)
            .with_env_filter(filter)
            .init(),
    }

    apply_process_limits(args.enable_coredumps, args.lock_memory);
    if args.daemon {
        // SAFETY: daemon forks; no runtime thread exists yet (it is built
        // below), so the child is a whole copy of this process.
        if unsafe { libc::daemon(0, 0) } != 0 {
            anyhow::bail!(
                "-d: cannot run as a daemon: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    if let Some(user) = &args.user {
        assume_identity(user)?;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.threads)
        .thread_name("webvac-worker")
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    let pidfile = args.pidfile;
    runtime.block_on(async {
        let server = Server::bind(&config).await?;
        if let Some(path) = &pidfile {
            std::fs::write(path, format!("{}\n", std::process::id()))
                .with_context(|| format!("cannot write the pid file {}", path.display()))?;
        }
        // memcached reloads its auth file on SIGHUP; webvac its TLS
        // certificates too.
        let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .context("SIGHUP handler")?;
        let shared = server.shared().clone();
        let reloads = async {
            while hangup.recv().await.is_some() {
                if shared.ascii_auth.is_some() {
                    match shared.reload_auth_file() {
                        Ok(()) => tracing::info!(signal = "SIGHUP", "auth file reloaded"),
                        Err(e) => tracing::warn!(error = %e, "SIGHUP: auth file not reloaded"),
                    }
                }
                if shared.tls.is_some() || shared.peer_tls.is_some() {
                    match shared.refresh_certs() {
                        Ok(()) => tracing::info!(signal = "SIGHUP", "TLS certificates reloaded"),
                        Err(e) => {
                            tracing::warn!(error = %e, "SIGHUP: TLS certificates not reloaded")
                        }
                    }
                }
            }
        };
        tokio::select! {
            served = server.run(shutdown_signal()) => served?,
            () = reloads => {}
        }
        anyhow::Ok(())
    })?;
    if let Some(path) = &pidfile {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}

/// memcached's `-u`: a process started as root gives up root for `user`
/// (its groups, then its group, then its user id) before it opens any
/// socket; for anyone else the flag changes nothing, as in memcached.
fn assume_identity(user: &str) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(());
    }
    let name = std::ffi::CString::new(user).context("a user name without NUL bytes")?;
    // SAFETY: passwd is plain data; getpwnam_r fills it, pointing into
    // `buf`, which outlives every use below.
    let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call, `buf.len()` is its size.
    let rc = unsafe {
        libc::getpwnam_r(
            name.as_ptr(),
            &mut entry,
            buf.as_mut_ptr(),
            buf.len(),
            &mut found,
        )
    };
    if rc != 0 || found.is_null() {
        anyhow::bail!("can't find the user {user} to switch to (-u)");
    }
    // SAFETY: plain system calls on values read above.
    unsafe {
        if libc::setgroups(0, std::ptr::null()) != 0 {
            anyhow::bail!(
                "-u {user}: cannot drop supplementary groups: {}",
                std::io::Error::last_os_error()
            );
        }
        if libc::setgid(entry.pw_gid) != 0 || libc::setuid(entry.pw_uid) != 0 {
            anyhow::bail!(
                "-u {user}: failed to assume the identity: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(())
}

/// Completes on SIGTERM or SIGINT. The handlers are installed when this is
/// called, not when the future is first polled: the server's accept loop
/// may not poll it before a SIGTERM sent right after the first requests
/// arrives (the default action would then kill the process).
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    async move {
        tokio::select! {
            _ = term.recv() => tracing::info!(signal = "SIGTERM", "signal received"),
            _ = int.recv() => tracing::info!(signal = "SIGINT", "signal received"),
        }
    }
}
