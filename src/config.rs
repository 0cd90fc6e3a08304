//! Server configuration: TOML file, defaults as named constants, and the
//! checks that refuse a configuration memcached would refuse.
//!
//! `config/webvac.toml` documents every key. Command-line flags override the
//! file (see `bin/webvac.rs`).

use serde::{Deserialize, Deserializer};

use crate::cluster::ring::{PARTITIONS_DEFAULT, PARTITIONS_MAX};

/// Largest item a cluster accepts (`-I`): one item and its key must fit one
/// node-to-node frame (4 MiB) with room to spare.
pub const CLUSTER_ITEM_BYTES_MAX: usize = 2 * 1024 * 1024;
use crate::error::ConfigError;
use crate::limits::{
    ANTI_ENTROPY_BYTES_PER_SEC_DEFAULT, ANTI_ENTROPY_INTERVAL_MS_DEFAULT,
    ANTI_ENTROPY_KEYS_PER_ROUND_DEFAULT, ANTI_ENTROPY_PARTITIONS_PER_ROUND_DEFAULT,
    CLOCK_DRIFT_MAX_MS_DEFAULT, CLOCK_DRIFT_MAX_MS_LIMIT, CONNECTIONS_MAX_DEFAULT,
    DATA_TIMEOUT_SECS_DEFAULT, DEDUP_WINDOW_SECS_DEFAULT, HINT_WINDOW_SECS_DEFAULT,
    HINTS_MEMORY_MB_MIN, HINTS_MEMORY_SHARE_OF_ITEMS, HINTS_PER_TARGET_MAX_DEFAULT,
    ITEM_BYTES_MAX_DEFAULT, ITEM_BYTES_MAX_MAX, ITEM_BYTES_MAX_MIN, LISTEN_BACKLOG_DEFAULT,
    MEMORY_LIMIT_MB_DEFAULT, PORT_DEFAULT, REPLICAS_DEFAULT, REQUEST_ID_RECORDS_PER_KEY_DEFAULT,
    REQUEST_ID_RECORDS_PER_KEY_LIMIT, REQUEST_TIMEOUT_MS_DEFAULT, REQUESTS_PER_BATCH_MAX,
    SSL_MIN_VERSION_DEFAULT, SSL_WBUF_KIB_DEFAULT, SSL_WBUF_KIB_MAX, THREADS_DEFAULT,
    TOMBSTONE_GRACE_SECS, UNIX_MASK_DEFAULT,
};

/// A node's whole configuration (`webvac.toml`): every key optional with a
/// default, unknown keys refused. The server binary applies its command-line
/// flags over it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Interfaces to listen on, as memcached's `-l`: one or more hosts or
    /// `host:port`s separated by commas or spaces. Never all interfaces by
    /// default.
    pub listen: String,
    /// TCP port for clients; 0 picks a free one (logged at startup).
    pub port: u16,
    /// Serve clients on this unix socket instead of TCP (memcached's `-s`,
    /// which also disables network listening). A socket file already
    /// there is replaced; the file is removed at shutdown.
    pub unix_socket: Option<std::path::PathBuf>,
    /// Access mask of the unix socket file, in octal (memcached's `-a`,
    /// default `0700`).
    #[serde(deserialize_with = "de_octal")]
    pub unix_mask: u32,
    /// Item memory limit in MiB (`-m`).
    pub memory_limit_mb: usize,
    /// Evict items to make room at the limit (memcached's default);
    /// `false` is memcached's `-M`: writes that do not fit are refused.
    pub evictions: bool,
    /// Worker threads (`-t`).
    pub threads: usize,
    /// Simultaneous client connections (`-c`); more are refused with
    /// `ERROR Too many open connections`.
    pub max_connections: usize,
    /// Largest item in bytes (`-I`); accepts `1m`, `512k` or a number.
    #[serde(deserialize_with = "de_size")]
    pub max_item_size: usize,
    /// Log verbosity: 0 info, 1 debug, 2 trace (`-v`, `-vv`).
    pub verbosity: u8,
    /// How long a request id makes a retry safe, in seconds: a mutation
    /// retried with the same id within this window is not applied again.
    pub dedup_window_secs: u32,
    /// Request-id records one key keeps (1..=64); older ones go first.
    pub request_id_records_per_key: usize,
    /// Close a client connection that has not sent a complete command for
    /// this many seconds while waiting for one (memcached's
    /// `-o idle_timeout`); 0, the default: never.
    pub idle_timeout_secs: u32,
    /// Accept `flush_all` (memcached's default); `false` is memcached's
    /// `-F`: it gets `CLIENT_ERROR flush_all not allowed`.
    pub flush_enabled: bool,
    /// Accept the `shutdown` command, which stops the node as SIGTERM does
    /// (memcached's `-A`); off by default.
    pub shutdown_command: bool,
    /// Connections the kernel queues before they are accepted (memcached's
    /// `-b`).
    pub listen_backlog: u32,
    /// Requests one connection runs before the others get a turn
    /// (memcached's `-R`, whose default is 20; webvac's 1,024 batches a
    /// pipelining client's requests, and a multi-get also yields every 256
    /// keys).
    pub requests_per_event: usize,
    /// Close a client connection that sends nothing for this many seconds
    /// in the middle of a data block that holds in-flight memory (one over
    /// 16 KiB), so a sender that stops cannot keep the budget; 0: never.
    pub data_timeout_secs: u32,
    /// Key for the keyed hash that authenticates `lk` listing tokens; every
    /// node of a cluster must have the same. Absent: derived from the
    /// cluster layout (tokens then resist corruption and other clusters'
    /// tokens, but not a client that knows the layout and forges one).
    pub listing_secret: Option<String>,
    /// memcached's `-Y`: a file of `user:password` lines; a connection
    /// must authenticate (a `set` whose value is `user password`) before
    /// any other command. Reloaded on SIGHUP.
    pub auth_file: Option<std::path::PathBuf>,
    /// `HOST:PORT` of the Prometheus endpoint (`GET /metrics`, plain HTTP);
    /// absent, the default: no endpoint. Port 0 picks a free port (the log
    /// line `serving metrics metrics_addr=…` names it).
    pub metrics_listen: Option<String>,
    /// How the server writes its logs (stderr): `text`, the default, or
    /// `json`, one object per line, for log shippers.
    pub log_format: LogFormat,
    /// memcached's `-Z`: clients speak TLS on every TCP listener but those
    /// `listen` marks `notls:`.
    pub ssl_enabled: bool,
    /// The server's certificate chain, PEM (leaf first).
    pub ssl_chain_cert: Option<std::path::PathBuf>,
    /// Its private key, PEM; absent: read from `ssl_chain_cert`.
    pub ssl_key: Option<std::path::PathBuf>,
    /// The CAs client certificates must chain to (PEM).
    pub ssl_ca_cert: Option<std::path::PathBuf>,
    /// Client certificates: 0 none, 1 checked if sent, 2 required, 3
    /// required (once: the same as 2, as there is no renegotiation).
    pub ssl_verify_mode: u8,
    /// Oldest protocol accepted: 0 TLS 1.0, 1 TLS 1.1, 2 TLS 1.2, 3 TLS 1.3.
    /// TLS 1.0 and 1.1 are never offered, so 0 and 1 mean 1.2.
    pub ssl_min_version: u8,
    /// Keep sessions so that returning clients resume without a full
    /// handshake (memcached's `ssl_session_cache`).
    pub ssl_session_cache: bool,
    /// Per-connection TLS output buffer, KiB (memcached's `ssl_wbuf_size`).
    pub ssl_wbuf_size: u32,
    /// Cluster membership; absent: a single memcached-like node.
    pub cluster: Option<ClusterConfig>,
    /// Fault injection, for testing only: off unless set.
    pub faults: FaultsConfig,
}

/// Largest clock offset `[faults]` accepts, either way: a year. Far past any
/// skew worth testing, and small enough that no arithmetic on a skewed
/// reading can overflow.
pub const FAULT_CLOCK_OFFSET_MS_LIMIT: i64 = 365 * 24 * 3600 * 1000;
/// Slowest clock rate `[faults]` accepts (half speed).
pub const FAULT_CLOCK_RATE_MIN: f64 = 0.5;
/// Fastest clock rate `[faults]` accepts (double speed).
pub const FAULT_CLOCK_RATE_MAX: f64 = 2.0;

/// `[faults]`: faults injected on purpose, for testing only; every one is
/// off by default.
///
/// - On the client port: drop or delay a fraction of requests or replies,
///   to test how clients cope with a lossy network.
/// - On the node's clock: an offset and a rate (drift), as a badly synced
///   machine would have.
/// - Between nodes: a partition that drops every peer message to and from
///   chosen members.
/// - `control`: the `fault` command changes the clock and partition faults
///   while the node runs.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FaultsConfig {
    /// Fraction of requests read and then ignored: not executed, no reply.
    pub drop_request: f64,
    /// Fraction of requests executed whose reply is not sent.
    pub drop_reply: f64,
    /// Fraction of requests held `delay_ms` before they are executed.
    pub delay: f64,
    /// How long a delayed request waits.
    pub delay_ms: u64,
    /// Seed of the fault choices, so a run can be repeated.
    pub seed: u64,
    /// How far ahead of the real time the node's clock reads, in ms
    /// (negative: behind).
    pub clock_offset_ms: i64,
    /// How fast the node's clock runs against real time, from the moment
    /// the node starts (1.0: in step; 1.01 gains 10 ms a second).
    pub clock_rate: f64,
    /// Members cut off from this node: every peer message to or from them
    /// is dropped silently, both ways, so each side sees timeouts as on a
    /// real partition.
    pub drop_peers: Vec<u16>,
    /// Accept the `fault` command on the client port, which changes the
    /// clock and partition faults at run time. Any client can then skew
    /// the node's clock or cut it off: never in production.
    pub control: bool,
}

impl Default for FaultsConfig {
    fn default() -> Self {
        Self {
            drop_request: 0.0,
            drop_reply: 0.0,
            delay: 0.0,
            delay_ms: 0,
            seed: 0,
            clock_offset_ms: 0,
            clock_rate: 1.0,
            drop_peers: Vec::new(),
            control: false,
        }
    }
}

impl FaultsConfig {
    /// Whether any fault is on, or can be turned on (`control`).
    pub fn any(&self) -> bool {
        self.client_port_any() || self.clock_any() || !self.drop_peers.is_empty() || self.control
    }

    /// Whether a client-port fault (drop or delay) is on.
    pub fn client_port_any(&self) -> bool {
        self.drop_request > 0.0 || self.drop_reply > 0.0 || self.delay > 0.0
    }

    /// Whether the node's clock must be wrapped: a clock fault is set, or
    /// `control` may set one later.
    #[allow(clippy::float_cmp)] // exactly 1.0 is the setting "in step"
    pub fn clock_any(&self) -> bool {
        self.clock_offset_ms != 0 || self.clock_rate != 1.0 || self.control
    }

    /// Checks a clock offset, from the file or the `fault` command.
    ///
    /// # Errors
    /// Past [`FAULT_CLOCK_OFFSET_MS_LIMIT`] either way.
    pub fn check_clock_offset_ms(ms: i64) -> Result<(), String> {
        if ms.unsigned_abs() > FAULT_CLOCK_OFFSET_MS_LIMIT.unsigned_abs() {
            return Err(format!(
                "faults.clock_offset_ms must be within ±{FAULT_CLOCK_OFFSET_MS_LIMIT}, got {ms}"
            ));
        }
        Ok(())
    }

    /// Checks a clock rate, from the file or the `fault` command.
    ///
    /// # Errors
    /// Outside [`FAULT_CLOCK_RATE_MIN`]..=[`FAULT_CLOCK_RATE_MAX`] (NaN
    /// included).
    pub fn check_clock_rate(rate: f64) -> Result<(), String> {
        if !(FAULT_CLOCK_RATE_MIN..=FAULT_CLOCK_RATE_MAX).contains(&rate) {
            return Err(format!(
                "faults.clock_rate must be from {FAULT_CLOCK_RATE_MIN} to {FAULT_CLOCK_RATE_MAX}, got {rate}"
            ));
        }
        Ok(())
    }

    /// Checks a partition's member list against the cluster (`None`: a
    /// single node, which has no peers to cut off).
    ///
    /// # Errors
    /// For an id that is not another member.
    pub fn check_drop_peers(ids: &[u16], cluster: Option<&ClusterConfig>) -> Result<(), String> {
        let Some(c) = cluster else {
            if ids.is_empty() {
                return Ok(());
            }
            return Err("faults.drop_peers needs a [cluster]: a single node has no peers".into());
        };
        match ids
            .iter()
            .find(|&&id| id == c.node_id || !c.members.iter().any(|m| m.id == id))
        {
            Some(id) => Err(format!(
                "faults.drop_peers: {id} is not another member of the cluster"
            )),
            None => Ok(()),
        }
    }
}

/// `[cluster]`: this node's place in a cluster. Every node must agree on
/// everything here but `node_id`; nodes check at startup and refuse peers
/// that disagree.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// This node's id: one of the members'.
    pub node_id: u16,
    /// Every member, this node included.
    pub members: Vec<MemberConfig>,
    /// Copies of each partition (N), capped at the member count.
    #[serde(default = "replicas_default")]
    pub replicas: usize,
    /// Replicas a read waits for (R); default a majority of N.
    #[serde(default)]
    pub read_quorum: Option<usize>,
    /// Replicas that must hold a write before it is acknowledged (W);
    /// default a majority of N.
    #[serde(default)]
    pub write_quorum: Option<usize>,
    /// Fixed number of partitions; never change it on a running cluster.
    #[serde(default = "partitions_default")]
    pub partitions: u32,
    /// How long one hop (coordinator to primary, primary to replica) may
    /// take before the peer is passed over.
    #[serde(default = "request_timeout_ms_default")]
    pub request_timeout_ms: u64,
    /// Whether a hint held for an unreachable replica counts toward W
    /// (sloppy quorum: more writes succeed while replicas are down, but an
    /// acknowledged write may then live on fewer than W of its own
    /// replicas until the hint is handed over).
    #[serde(default)]
    pub sloppy_quorum: bool,
    /// How long a hint waits for its replica before it is dropped.
    #[serde(default = "hint_window_secs_default")]
    pub hint_window_secs: u64,
    /// Hints held per unreachable replica; past it the oldest go.
    #[serde(default = "hints_per_target_max_default")]
    pub hints_per_target_max: usize,
    /// Memory for hints on this node, in MiB, on top of the item memory;
    /// unset: a sixteenth of the item memory, at least 8 MiB (see
    /// [`ClusterConfig::with_hints_memory_for`]).
    #[serde(default)]
    pub hints_memory_mb: Option<usize>,
    /// Whether a starting node pulls the keys it replicates from its peers
    /// (how a node restarted empty gets its data back).
    #[serde(default = "refill_on_start_default")]
    pub refill_on_start: bool,
    /// Whether replicas compare hash trees in the background and exchange
    /// the keys they differ on (anti-entropy).
    #[serde(default = "anti_entropy_default")]
    pub anti_entropy: bool,
    /// Anti-entropy: milliseconds between rounds.
    #[serde(default = "anti_entropy_interval_ms_default")]
    pub anti_entropy_interval_ms: u64,
    /// Anti-entropy: partitions a round compares with each peer.
    #[serde(default = "anti_entropy_partitions_per_round_default")]
    pub anti_entropy_partitions_per_round: usize,
    /// Anti-entropy: keys a round lists, pulls or pushes with each peer.
    #[serde(default = "anti_entropy_keys_per_round_default")]
    pub anti_entropy_keys_per_round: usize,
    /// Anti-entropy: bytes per second sent to and asked of each peer.
    #[serde(default = "anti_entropy_bytes_per_sec_default")]
    pub anti_entropy_bytes_per_sec: u64,
    /// How long a delete's tombstone lives, from the delete. Must exceed
    /// the hint window plus one anti-entropy cycle, so no copy of a
    /// deleted item can outlive it and come back.
    #[serde(default = "tombstone_grace_secs_default")]
    pub tombstone_grace_secs: u64,
    /// How far ahead of this node's clock a version from a peer may be
    /// before it is refused and counted; tombstones and request-id records
    /// are kept this much longer. The clock requirement of the cluster: see
    /// the README's consistency section.
    #[serde(default = "clock_drift_max_ms_default")]
    pub clock_drift_max_ms: u64,
    /// A file holding the cluster secret, the same on every member: each
    /// side of a peer connection proves it holds it before any message is
    /// read. Must be readable by its owner only. Unset: allowed only when
    /// every member's peer address is loopback (README, Security).
    #[serde(default)]
    pub secret_file: Option<std::path::PathBuf>,
    /// Join the running cluster that this member's peer address belongs
    /// to (`--join`): the node starts as a standby member, holding no
    /// partitions, and takes N, R, W and P from the cluster; `members`
    /// need name only this node.
    #[serde(default)]
    pub join: Option<String>,
    /// With `join`: stay a standby member (holding no partitions) instead
    /// of taking a share of the partitions once admitted.
    #[serde(default)]
    pub standby: bool,
    /// Partition handoff: bytes per second a node gaining partitions pulls
    /// from each current owner.
    #[serde(default = "handoff_bytes_per_sec_default")]
    pub handoff_bytes_per_sec: u64,
    /// Partition handoff: seconds a move may take before the member
    /// driving it cancels it (every write also reached the old owners, so
    /// a cancel loses nothing).
    #[serde(default = "handoff_timeout_secs_default")]
    pub handoff_timeout_secs: u64,
    /// Peer TLS: this node's certificate chain (PEM), presented both when
    /// it dials and when it is dialled; with `tls_key` and `tls_ca`, every
    /// peer connection is TLS, both ends checked against `tls_ca`.
    #[serde(default)]
    pub tls_cert: Option<std::path::PathBuf>,
    /// Peer TLS: the key of `tls_cert` (PEM).
    #[serde(default)]
    pub tls_key: Option<std::path::PathBuf>,
    /// Peer TLS: the cluster's CA (PEM), which every member's certificate
    /// must chain to, for the address members dial it at.
    #[serde(default)]
    pub tls_ca: Option<std::path::PathBuf>,
}

fn refill_on_start_default() -> bool {
    true
}
fn anti_entropy_default() -> bool {
    true
}
fn anti_entropy_interval_ms_default() -> u64 {
    ANTI_ENTROPY_INTERVAL_MS_DEFAULT
}
fn anti_entropy_partitions_per_round_default() -> usize {
    ANTI_ENTROPY_PARTITIONS_PER_ROUND_DEFAULT
}
fn anti_entropy_keys_per_round_default() -> usize {
    ANTI_ENTROPY_KEYS_PER_ROUND_DEFAULT
}
fn anti_entropy_bytes_per_sec_default() -> u64 {
    ANTI_ENTROPY_BYTES_PER_SEC_DEFAULT
}
fn tombstone_grace_secs_default() -> u64 {
    u64::from(TOMBSTONE_GRACE_SECS)
}
fn clock_drift_max_ms_default() -> u64 {
    CLOCK_DRIFT_MAX_MS_DEFAULT
}

/// Whether `addr` (`host:port`) is on loopback: a loopback IP address, or
/// `localhost`. Any other name may resolve anywhere, so it is not.
pub fn is_loopback(addr: &str) -> bool {
    let host = addr.rsplit_once(':').map_or(addr, |(host, _)| host);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// One member of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberConfig {
    /// 1..=4095: the id is part of every version stamp the node issues.
    pub id: u16,
    /// `host:port` where memcached clients reach it.
    pub client: String,
    /// `host:port` where the other nodes reach it.
    pub peer: String,
}

fn replicas_default() -> usize {
    REPLICAS_DEFAULT
}
fn partitions_default() -> u32 {
    PARTITIONS_DEFAULT
}
fn request_timeout_ms_default() -> u64 {
    REQUEST_TIMEOUT_MS_DEFAULT
}
fn handoff_bytes_per_sec_default() -> u64 {
    4 * 1024 * 1024
}

fn handoff_timeout_secs_default() -> u64 {
    600
}

fn hint_window_secs_default() -> u64 {
    HINT_WINDOW_SECS_DEFAULT
}
fn hints_per_target_max_default() -> usize {
    HINTS_PER_TARGET_MAX_DEFAULT
}

impl ClusterConfig {
    /// This configuration with `hints_memory_mb` set, if it was not, for a
    /// node whose item memory limit is `memory_limit_mb`.
    pub fn with_hints_memory_for(&self, memory_limit_mb: usize) -> Self {
        let auto = (memory_limit_mb / HINTS_MEMORY_SHARE_OF_ITEMS).max(HINTS_MEMORY_MB_MIN);
        Self {
            hints_memory_mb: Some(self.hints_memory_mb.unwrap_or(auto)),
            ..self.clone()
        }
    }

    /// A cluster of `members` seen from member `node_id`, every other
    /// setting at its default (as an empty `[cluster]` section would give).
    pub fn new(node_id: u16, members: Vec<MemberConfig>) -> Self {
        Self {
            node_id,
            members,
            replicas: replicas_default(),
            read_quorum: None,
            write_quorum: None,
            partitions: partitions_default(),
            request_timeout_ms: request_timeout_ms_default(),
            sloppy_quorum: false,
            hint_window_secs: hint_window_secs_default(),
            hints_per_target_max: hints_per_target_max_default(),
            hints_memory_mb: None,
            refill_on_start: refill_on_start_default(),
            anti_entropy: anti_entropy_default(),
            anti_entropy_interval_ms: anti_entropy_interval_ms_default(),
            anti_entropy_partitions_per_round: anti_entropy_partitions_per_round_default(),
            anti_entropy_keys_per_round: anti_entropy_keys_per_round_default(),
            anti_entropy_bytes_per_sec: anti_entropy_bytes_per_sec_default(),
            tombstone_grace_secs: tombstone_grace_secs_default(),
            clock_drift_max_ms: clock_drift_max_ms_default(),
            secret_file: None,
            join: None,
            standby: false,
            handoff_bytes_per_sec: handoff_bytes_per_sec_default(),
            handoff_timeout_secs: handoff_timeout_secs_default(),
            tls_cert: None,
            tls_key: None,
            tls_ca: None,
        }
    }

    /// N after capping at the member count.
    pub fn replicas_effective(&self) -> usize {
        self.replicas.min(self.members.len()).max(1)
    }

    /// R, defaulting to a majority of N.
    pub fn read_quorum_effective(&self) -> usize {
        self.read_quorum
            .unwrap_or(self.replicas_effective() / 2 + 1)
    }

    /// W, defaulting to a majority of N.
    pub fn write_quorum_effective(&self) -> usize {
        self.write_quorum
            .unwrap_or(self.replicas_effective() / 2 + 1)
    }

    /// This node's own member entry.
    pub fn me(&self) -> Option<&MemberConfig> {
        self.members.iter().find(|m| m.id == self.node_id)
    }

    /// Everything the nodes must agree on, in one canonical line: members
    /// sorted by id, then N, R, W and the partition count. Its xxh3 is the
    /// layout hash exchanged in every handshake.
    pub fn layout_text(&self) -> String {
        let mut members: Vec<&MemberConfig> = self.members.iter().collect();
        members.sort_by_key(|m| m.id);
        let list: Vec<String> = members
            .iter()
            .map(|m| format!("{}={},{}", m.id, m.client, m.peer))
            .collect();
        format!(
            "members=[{}] replicas={} read_quorum={} write_quorum={} partitions={} sloppy_quorum={}",
            list.join(" "),
            self.replicas_effective(),
            self.read_quorum_effective(),
            self.write_quorum_effective(),
            self.partitions,
            self.sloppy_quorum
        )
    }

    /// Seconds anti-entropy takes to compare every partition once
    /// (rounded up; 0 with anti-entropy off).
    pub fn anti_entropy_cycle_secs(&self) -> u64 {
        if !self.anti_entropy {
            return 0;
        }
        let rounds = u64::from(self.partitions)
            .div_ceil(self.anti_entropy_partitions_per_round.max(1) as u64);
        (rounds * self.anti_entropy_interval_ms).div_ceil(1000)
    }

    /// xxh3-64 of [`ClusterConfig::layout_text`]: two nodes may talk only
    /// if theirs are equal.
    pub fn layout_hash(&self) -> u64 {
        xxhash_rust::xxh3::xxh3_64(self.layout_text().as_bytes())
    }

    /// # Errors
    /// With a message naming the offending setting.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.members.is_empty() {
            return bad("cluster.members is empty".into());
        }
        if self.members.len() > crate::cluster::layout::LAYOUT_MEMBERS_MAX {
            return bad(format!(
                "cluster.members has {} members; at most {} (every member heartbeats every other)",
                self.members.len(),
                crate::cluster::layout::LAYOUT_MEMBERS_MAX
            ));
        }
        let mut ids: Vec<u16> = self.members.iter().map(|m| m.id).collect();
        ids.sort_unstable();
        if ids.windows(2).any(|w| w[0] == w[1]) {
            return bad("cluster.members has a duplicate id".into());
        }
        if let Some(m) = self
            .members
            .iter()
            .find(|m| m.id == 0 || m.id > crate::store::hlc::NODE_ID_MAX)
        {
            return bad(format!(
                "member id {} is out of range 1..={}",
                m.id,
                crate::store::hlc::NODE_ID_MAX
            ));
        }
        if self.me().is_none() {
            return bad(format!(
                "cluster.node_id {} is not one of the members ({ids:?})",
                self.node_id
            ));
        }
        let tls = [&self.tls_cert, &self.tls_key, &self.tls_ca];
        if tls.iter().any(|f| f.is_some()) && !tls.iter().all(|f| f.is_some()) {
            return bad(
                "cluster.tls_cert, cluster.tls_key and cluster.tls_ca (--cluster-tls-cert, --cluster-tls-key, --cluster-tls-ca) turn on peer TLS together: set all three or none".into(),
            );
        }
        if self.secret_file.is_none() {
            if let Some(m) = self.members.iter().find(|m| !is_loopback(&m.peer)) {
                return bad(format!(
                    "cluster.secret_file (--cluster-secret-file) is required: member {}'s peer address {} is not loopback, and without a secret anyone who can reach a peer port is taken for a member",
                    m.id, m.peer
                ));
            }
            if let Some(seed) = self.join.as_deref().filter(|s| !is_loopback(s)) {
                return bad(format!(
                    "cluster.secret_file (--cluster-secret-file) is required: the address to join, {seed}, is not loopback"
                ));
            }
        }
        if self.join.as_deref().is_some_and(str::is_empty) {
            return bad("cluster.join (--join) is empty: give a member's peer address".into());
        }
        if self.replicas == 0 {
            return bad("cluster.replicas must be at least 1".into());
        }
        // A joining node takes N, R and W from the cluster; its own list
        // names only itself, so its flags' N is no bound for them (one
        // config for every node, `--read-quorum 2 --join …`, must start).
        let n = if self.join.is_some() {
            self.replicas
        } else {
            self.replicas_effective()
        };
        for (name, q) in [
            ("read_quorum", self.read_quorum_effective()),
            ("write_quorum", self.write_quorum_effective()),
        ] {
            if q == 0 || q > n {
                return bad(format!(
                    "cluster.{name} must be between 1 and the replica count {n}, got {q}"
                ));
            }
        }
        if self.partitions == 0 || self.partitions > PARTITIONS_MAX {
            return bad(format!(
                "cluster.partitions must be between 1 and {PARTITIONS_MAX}, got {}",
                self.partitions
            ));
        }
        if self.request_timeout_ms == 0 {
            return bad("cluster.request_timeout_ms must be at least 1".into());
        }
        if self.handoff_bytes_per_sec == 0 || self.handoff_timeout_secs == 0 {
            return bad(
                "cluster.handoff_bytes_per_sec and cluster.handoff_timeout_secs must be at least 1"
                    .into(),
            );
        }
        if self.standby && self.join.is_none() {
            return bad("cluster.standby needs cluster.join (--standby with --join)".into());
        }
        if self.anti_entropy {
            for (name, v) in [
                ("anti_entropy_interval_ms", self.anti_entropy_interval_ms),
                (
                    "anti_entropy_partitions_per_round",
                    self.anti_entropy_partitions_per_round as u64,
                ),
                (
                    "anti_entropy_keys_per_round",
                    self.anti_entropy_keys_per_round as u64,
                ),
                (
                    "anti_entropy_bytes_per_sec",
                    self.anti_entropy_bytes_per_sec,
                ),
            ] {
                if v == 0 {
                    return bad(format!("cluster.{name} must be at least 1"));
                }
            }
        }
        let floor = self.hint_window_secs + self.anti_entropy_cycle_secs();
        if self.tombstone_grace_secs <= floor {
            return bad(format!(
                "cluster.tombstone_grace_secs ({}) must exceed hint_window_secs ({}) plus one anti-entropy cycle ({} s), or a deleted key could come back",
                self.tombstone_grace_secs,
                self.hint_window_secs,
                self.anti_entropy_cycle_secs()
            ));
        }
        if !(1..=CLOCK_DRIFT_MAX_MS_LIMIT).contains(&self.clock_drift_max_ms) {
            return bad(format!(
                "cluster.clock_drift_max_ms must be 1 to {CLOCK_DRIFT_MAX_MS_LIMIT}"
            ));
        }
        if self.tombstone_grace_secs > u64::from(u32::MAX / 2) {
            return bad("cluster.tombstone_grace_secs is too large".into());
        }
        Ok(())
    }
}

/// The server's log format (`log_format`, `--log-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1".to_string(),
            port: PORT_DEFAULT,
            unix_socket: None,
            unix_mask: UNIX_MASK_DEFAULT,
            memory_limit_mb: MEMORY_LIMIT_MB_DEFAULT,
            evictions: true,
            threads: THREADS_DEFAULT,
            max_connections: CONNECTIONS_MAX_DEFAULT,
            max_item_size: ITEM_BYTES_MAX_DEFAULT,
            verbosity: 0,
            dedup_window_secs: DEDUP_WINDOW_SECS_DEFAULT,
            request_id_records_per_key: REQUEST_ID_RECORDS_PER_KEY_DEFAULT,
            idle_timeout_secs: 0,
            flush_enabled: true,
            shutdown_command: false,
            listen_backlog: LISTEN_BACKLOG_DEFAULT,
            requests_per_event: REQUESTS_PER_BATCH_MAX,
            data_timeout_secs: DATA_TIMEOUT_SECS_DEFAULT,
            listing_secret: None,
            metrics_listen: None,
            log_format: LogFormat::Text,
            auth_file: None,
            ssl_enabled: false,
            ssl_chain_cert: None,
            ssl_key: None,
            ssl_ca_cert: None,
            ssl_verify_mode: 0,
            ssl_min_version: SSL_MIN_VERSION_DEFAULT,
            ssl_session_cache: false,
            ssl_wbuf_size: SSL_WBUF_KIB_DEFAULT,
            cluster: None,
            faults: FaultsConfig::default(),
        }
    }
}

impl Config {
    /// Reads a TOML file; missing keys take their defaults.
    ///
    /// # Errors
    /// If the file cannot be read or parsed, or has unknown keys.
    pub fn from_file(path: &str) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_string(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses TOML text, the same as a file's; missing keys take their
    /// defaults.
    ///
    /// # Errors
    /// If the text does not parse or has unknown keys.
    pub fn from_toml_str(text: &str) -> Result<Self, ConfigError> {
        Self::parse(text, "(text)")
    }

    /// TOML text read from `origin` (named in errors).
    fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: origin.to_string(),
            source,
        })
    }

    /// Item memory in bytes.
    pub fn memory_limit_bytes(&self) -> usize {
        self.memory_limit_mb.saturating_mul(1024 * 1024)
    }

    /// The TLS settings' own checks (the files are read when the server
    /// binds).
    fn validate_tls(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        let notls = self
            .listen
            .split([',', ' '])
            .any(|item| item.starts_with("notls:"));
        if notls && !self.ssl_enabled {
            return bad("'notls' option is valid only when SSL is enabled".into());
        }
        if self.ssl_verify_mode > 3 {
            return bad(format!(
                "ssl_verify_mode must be 0 (none), 1 (request), 2 (require) or 3 (once), got {}",
                self.ssl_verify_mode
            ));
        }
        if self.ssl_min_version > 3 {
            return bad(format!(
                "ssl_min_version must be 0 (tlsv1.0), 1 (tlsv1.1), 2 (tlsv1.2) or 3 (tlsv1.3), got {}",
                self.ssl_min_version
            ));
        }
        if !self.ssl_enabled {
            return Ok(());
        }
        if self.ssl_chain_cert.is_none() {
            return bad("ssl_enabled (-Z) needs ssl_chain_cert (-o ssl_chain_cert=FILE)".into());
        }
        if self.ssl_verify_mode > 0 && self.ssl_ca_cert.is_none() {
            return bad(format!(
                "ssl_verify_mode={} checks client certificates: it needs ssl_ca_cert (-o ssl_ca_cert=FILE), the CAs they must chain to",
                self.ssl_verify_mode
            ));
        }
        if self.ssl_wbuf_size == 0 || self.ssl_wbuf_size > SSL_WBUF_KIB_MAX {
            return bad(format!(
                "ssl_wbuf_size must be between 1 and {SSL_WBUF_KIB_MAX} KiB, got {}",
                self.ssl_wbuf_size
            ));
        }
        Ok(())
    }

    /// Checks relations between settings.
    ///
    /// # Errors
    /// With a message naming the offending setting.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.unix_mask > 0o777 {
            return bad(format!(
                "unix_mask must be a permission mask of at most 0777, got {:o}",
                self.unix_mask
            ));
        }
        if self.listen.split([',', ' ']).all(str::is_empty) {
            return bad("listen names no address".into());
        }
        if let Some(cluster) = &self.cluster
            && self.auth_file.is_some()
            && cluster.secret_file.is_none()
        {
            return bad(
                "auth_file (-Y) on a cluster member needs cluster.secret_file (--cluster-secret-file): without a secret anyone on this host can join as a member and read every item without authenticating"
                    .into(),
            );
        }
        self.validate_tls()?;
        if self.unix_socket.is_some() && self.cluster.is_some() {
            return bad(
                "unix_socket serves a single node; a cluster member serves its member address"
                    .into(),
            );
        }
        if self.memory_limit_mb == 0 {
            return bad("memory_limit_mb must be at least 1".into());
        }
        if self.threads == 0 || self.threads > 256 {
            return bad(format!(
                "threads must be between 1 and 256, got {}",
                self.threads
            ));
        }
        if self.requests_per_event == 0 {
            return bad("requests_per_event must be at least 1".into());
        }
        if self.max_connections == 0 {
            return bad("max_connections must be at least 1".into());
        }
        if self.max_item_size < ITEM_BYTES_MAX_MIN {
            return bad(format!(
                "max_item_size must be at least {ITEM_BYTES_MAX_MIN} bytes"
            ));
        }
        if self.max_item_size > ITEM_BYTES_MAX_MAX {
            return bad(format!(
                "max_item_size cannot be larger than {ITEM_BYTES_MAX_MAX} bytes"
            ));
        }
        if self.dedup_window_secs == 0 {
            return bad("dedup_window_secs must be at least 1".into());
        }
        if !(1..=REQUEST_ID_RECORDS_PER_KEY_LIMIT).contains(&self.request_id_records_per_key) {
            return bad(format!(
                "request_id_records_per_key must be between 1 and {REQUEST_ID_RECORDS_PER_KEY_LIMIT}, got {}",
                self.request_id_records_per_key
            ));
        }
        let grace = self
            .cluster
            .as_ref()
            .map_or(u64::from(TOMBSTONE_GRACE_SECS), |c| c.tombstone_grace_secs);
        if u64::from(self.dedup_window_secs) > grace {
            return bad(format!(
                "dedup_window_secs ({}) cannot exceed tombstone_grace_secs ({grace}): a delete's request id lives in its tombstone",
                self.dedup_window_secs
            ));
        }
        let f = &self.faults;
        FaultsConfig::check_clock_offset_ms(f.clock_offset_ms).map_err(ConfigError::Invalid)?;
        FaultsConfig::check_clock_rate(f.clock_rate).map_err(ConfigError::Invalid)?;
        FaultsConfig::check_drop_peers(&f.drop_peers, self.cluster.as_ref())
            .map_err(ConfigError::Invalid)?;
        for (name, v) in [
            ("drop_request", f.drop_request),
            ("drop_reply", f.drop_reply),
            ("delay", f.delay),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return bad(format!(
                    "faults.{name} must be a fraction from 0 to 1, got {v}"
                ));
            }
        }
        if let Some(c) = &self.cluster {
            c.validate()?;
            if self.max_item_size > CLUSTER_ITEM_BYTES_MAX {
                return bad(format!(
                    "max_item_size cannot be larger than {CLUSTER_ITEM_BYTES_MAX} bytes in a cluster (an item travels between nodes in one frame)"
                ));
            }
        }
        if self.max_item_size > self.memory_limit_bytes() / 2 {
            return bad(format!(
                "max_item_size ({}) cannot be larger than half the memory limit ({} MiB)",
                self.max_item_size, self.memory_limit_mb
            ));
        }
        Ok(())
    }
}

/// Parses `1m`, `512k`, `2048` (memcached's `-I` syntax).
///
/// # Errors
/// On anything else.
pub fn parse_size(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let (digits, mult) = match s.chars().last() {
        Some('k' | 'K') => (&s[..s.len() - 1], 1024),
        Some('m' | 'M') => (&s[..s.len() - 1], 1024 * 1024),
        Some('g' | 'G') => (&s[..s.len() - 1], 1024 * 1024 * 1024),
        _ => (s, 1),
    };
    let n: usize = digits
        .parse()
        .map_err(|_| format!("invalid size {s:?}: expected a number with optional k/m/g suffix"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} is too large"))
}

/// Parses an octal permission mask as memcached's `-a` takes it (`0700`,
/// `770`).
pub fn parse_octal_mask(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s, 8)
        .map_err(|_| format!("invalid mask {s:?}: expected octal digits, such as 0700"))
}

/// An octal mask in TOML: a string of octal digits (`"0770"`), or a number
/// whose decimal digits are read as octal (`770`), as an operator writes it.
fn de_octal<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Mask {
        Number(u32),
        Text(String),
    }
    let text = match Mask::deserialize(d)? {
        Mask::Number(n) => n.to_string(),
        Mask::Text(s) => s,
    };
    parse_octal_mask(&text).map_err(serde::de::Error::custom)
}

fn de_size<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Number(usize),
        Text(String),
    }
    match Size::deserialize(d)? {
        Size::Number(n) => Ok(n),
        Size::Text(s) => parse_size(&s).map_err(serde::de::Error::custom),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_config_new_is_an_empty_section() {
        let member = MemberConfig {
            id: 1,
            client: "127.0.0.1:11211".into(),
            peer: "127.0.0.1:12211".into(),
        };
        let parsed = Config::from_toml_str(
            "[cluster]\nnode_id = 1\nmembers = [{ id = 1, client = \"127.0.0.1:11211\", peer = \"127.0.0.1:12211\" }]\n",
        )
        .expect("parses");
        assert_eq!(parsed.cluster, Some(ClusterConfig::new(1, vec![member])));
        assert!(Config::from_toml_str("no_such_key = 1").is_err());
    }

    /// A joining node lists only itself, and takes N, R and W from the
    /// cluster: quorums set for the cluster (one config on every node)
    /// do not stop it; a quorum above its N, or 0, still does.
    #[test]
    fn a_joining_node_is_not_bound_by_its_own_member_count() {
        let me = MemberConfig {
            id: 4,
            client: "127.0.0.1:11211".into(),
            peer: "127.0.0.1:12211".into(),
        };
        let mut c = ClusterConfig::new(4, vec![me]);
        c.read_quorum = Some(2);
        c.write_quorum = Some(2);
        assert!(c.validate().is_err(), "a one-member cluster with R=2");
        c.join = Some("127.0.0.1:12212".into());
        assert!(c.validate().is_ok());
        c.read_quorum = Some(4);
        assert!(c.validate().is_err(), "R above N=3");
        c.read_quorum = Some(0);
        assert!(c.validate().is_err());
    }

    #[test]
    fn a_cluster_of_more_than_64_members_is_refused() {
        let members = |n: u16| -> Vec<MemberConfig> {
            (1..=n)
                .map(|id| MemberConfig {
                    id,
                    client: format!("127.0.0.1:{}", 20000 + id),
                    peer: format!("127.0.0.1:{}", 30000 + id),
                })
                .collect()
        };
        assert!(ClusterConfig::new(1, members(64)).validate().is_ok());
        let e = ClusterConfig::new(1, members(65)).validate().unwrap_err();
        assert!(e.to_string().contains("65 members; at most 64"), "{e}");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1m"), Ok(1024 * 1024));
        assert_eq!(parse_size("512k"), Ok(512 * 1024));
        assert_eq!(parse_size("2048"), Ok(2048));
        assert!(parse_size("1x").is_err());
    }

    #[test]
    fn retry_and_fault_settings_are_checked() {
        let refused = |edit: &dyn Fn(&mut Config), words: &str| {
            let mut c = Config::default();
            edit(&mut c);
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(words), "{e}");
        };
        refused(&|c| c.dedup_window_secs = 0, "dedup_window_secs");
        refused(
            &|c| c.dedup_window_secs = TOMBSTONE_GRACE_SECS + 1,
            "tombstone_grace_secs",
        );
        refused(
            &|c| c.request_id_records_per_key = 0,
            "request_id_records_per_key",
        );
        refused(
            &|c| c.request_id_records_per_key = 65,
            "request_id_records_per_key",
        );
        refused(&|c| c.faults.drop_reply = 1.5, "faults.drop_reply");
        refused(&|c| c.faults.delay = -0.1, "faults.delay");
        let mut c = Config::default();
        c.faults.drop_request = 1.0;
        c.validate().unwrap();
        assert!(c.faults.any());
    }

    #[test]
    fn the_unix_mask_is_octal_as_memcached_takes_it() {
        for text in ["unix_mask = 770", "unix_mask = \"0770\""] {
            assert_eq!(
                Config::from_toml_str(text).unwrap().unix_mask,
                0o770,
                "{text}"
            );
        }
        assert!(Config::from_toml_str("unix_mask = \"0789\"").is_err());
        let c = Config {
            unix_mask: 0o1777,
            ..Config::default()
        };
        assert!(c.validate().unwrap_err().to_string().contains("unix_mask"));
    }

    #[test]
    fn the_shipped_config_file_is_the_defaults() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/webvac.toml");
        let c = Config::from_file(path).unwrap();
        assert_eq!(c, Config::default());
        c.validate().unwrap();
    }

    #[test]
    fn clock_and_partition_faults_are_checked() {
        let refused = |edit: &dyn Fn(&mut Config), words: &str| {
            let mut c = Config::from_file(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/config/cluster-3/node1.toml"
            ))
            .unwrap();
            edit(&mut c);
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(words), "{e}");
        };
        refused(&|c| c.faults.clock_rate = 0.0, "faults.clock_rate");
        refused(&|c| c.faults.clock_rate = 2.5, "faults.clock_rate");
        refused(&|c| c.faults.clock_rate = f64::NAN, "faults.clock_rate");
        refused(
            &|c| c.faults.clock_offset_ms = FAULT_CLOCK_OFFSET_MS_LIMIT + 1,
            "faults.clock_offset_ms",
        );
        refused(
            &|c| c.faults.clock_offset_ms = i64::MIN,
            "faults.clock_offset_ms",
        );
        // Node 1 cannot cut itself off, nor a member that does not exist.
        refused(&|c| c.faults.drop_peers = vec![2, 1], "drop_peers: 1");
        refused(&|c| c.faults.drop_peers = vec![4], "drop_peers: 4");
        let mut single = Config::default();
        single.faults.drop_peers = vec![2];
        let e = single.validate().unwrap_err().to_string();
        assert!(e.contains("[cluster]"), "{e}");

        let c = Config::from_toml_str(
            "[faults]\nclock_offset_ms = -1500\nclock_rate = 1.01\ncontrol = true\n",
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.faults.clock_offset_ms, -1500);
        assert!(c.faults.any() && c.faults.clock_any() && !c.faults.client_port_any());
        let mut c = Config::from_file(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/config/cluster-3/node1.toml"
        ))
        .unwrap();
        c.faults.drop_peers = vec![2, 3];
        c.validate().unwrap();
        assert!(c.faults.any() && !c.faults.clock_any());
        assert!(!FaultsConfig::default().any());
    }

    #[test]
    fn the_shipped_cluster_files_agree_on_one_layout() {
        let layouts: Vec<u64> = (1..=3)
            .map(|i| {
                let path = format!(
                    "{}/config/cluster-3/node{i}.toml",
                    env!("CARGO_MANIFEST_DIR")
                );
                let c = Config::from_file(&path).unwrap();
                c.validate().unwrap();
                let cluster = c.cluster.expect("a [cluster] section");
                assert_eq!(cluster.node_id, i);
                assert_eq!(cluster.me().unwrap().client, format!("127.0.0.1:1121{i}"));
                cluster.layout_hash()
            })
            .collect();
        assert!(layouts.windows(2).all(|w| w[0] == w[1]));
    }

    #[test]
    fn a_tombstone_grace_shorter_than_hints_plus_a_cycle_is_refused() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/cluster-3/node1.toml");
        let mut c = Config::from_file(path).unwrap().cluster.unwrap();
        c.validate().unwrap();
        // 1024 partitions at 256 a round and 1 s a round: a 4 s cycle.
        assert_eq!(c.anti_entropy_cycle_secs(), 4);
        c.tombstone_grace_secs = c.hint_window_secs + 4;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("tombstone_grace_secs"), "{e}");
        c.tombstone_grace_secs += 1;
        c.validate().unwrap();
        c.anti_entropy_partitions_per_round = 0;
        assert!(c.validate().is_err());
        // Off, anti-entropy adds nothing to the floor.
        c.anti_entropy = false;
        c.tombstone_grace_secs = c.hint_window_secs + 1;
        c.validate().unwrap();
    }

    #[test]
    fn unknown_keys_are_refused() {
        assert!(toml::from_str::<Config>("memroy_limit_mb = 5").is_err());
        let c: Config = toml::from_str("max_item_size = \"2m\"\nport = 1").unwrap();
        assert_eq!((c.max_item_size, c.port), (2 * 1024 * 1024, 1));
    }

    #[test]
    fn validation() {
        let c = Config {
            max_item_size: 100,
            ..Config::default()
        };
        assert!(c.validate().is_err());
        let c = Config {
            memory_limit_mb: 1,
            ..Config::default()
        };
        assert!(c.validate().is_err());
    }
}
