//! The Prometheus exposition of a node: what `GET /metrics` answers.
//!
//! Nothing here counts anything. A scrape takes the node's own `stats`,
//! `stats settings` and `stats cluster` replies (the very bytes a client
//! gets) and the command-latency histograms, and renders them as
//! memcached_exporter would render the same `stats`, plus webvac's own
//! metrics. So the two views agree by construction, and the request path
//! pays nothing for the endpoint but its latency histograms.
//!
//! ```text
//!  stats / stats settings / stats cluster ──▶ Scrape ──▶ Prometheus text 0.0.4
//!  latency histograms ─────────────────────▶        └─▶ OpenMetrics 1.0
//! ```
//!
//! Names: every memcached_exporter metric that means something here keeps
//! its exact name and labels (`memcached_commands_total{command,status}`,
//! …), so dashboards and alerts written for memcached work unchanged;
//! webvac's own start with `webvac_`, carry their unit and end counters in
//! `_total`. The encoding (escaping, both text formats) is the
//! `prometheus-client` crate's.

use std::collections::HashMap;
use std::fmt;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use super::latency::{self, Command};

/// The two text formats a scraper may ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `text/plain; version=0.0.4`: the default.
    Prometheus,
    /// `application/openmetrics-text; version=1.0.0`, when the request's
    /// `Accept` names it.
    OpenMetrics,
}

impl Format {
    /// The format an `Accept` header asks for: OpenMetrics if it names it
    /// (Prometheus itself lists it first), else the classic text format.
    pub fn from_accept(accept: Option<&str>) -> Format {
        let wants_openmetrics = accept.is_some_and(|a| {
            a.split(',').any(|range| {
                let mut parts = range.split(';').map(str::trim);
                let media = parts.next().unwrap_or("");
                // `q=0` means "not this one" (RFC 9110, 12.4.2).
                let refused = parts.any(|p| {
                    p.split_once('=').is_some_and(|(k, v)| {
                        k.trim().eq_ignore_ascii_case("q")
                            && v.trim().parse::<f64>().is_ok_and(|q| q <= 0.0)
                    })
                });
                media.eq_ignore_ascii_case("application/openmetrics-text") && !refused
            })
        });
        if wants_openmetrics {
            Format::OpenMetrics
        } else {
            Format::Prometheus
        }
    }

    /// The reply's `Content-Type`.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Prometheus => prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

/// `STAT name value` lines, by name.
#[derive(Debug, Clone, Default)]
pub struct StatLines(HashMap<String, String>);

impl StatLines {
    /// Reads a `stats` reply; other lines (`END`) are skipped.
    pub fn parse(reply: &[u8]) -> StatLines {
        let text = String::from_utf8_lossy(reply);
        StatLines(
            text.lines()
                .filter_map(|line| line.strip_prefix("STAT "))
                .filter_map(|rest| rest.split_once(' '))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    fn u64(&self, name: &str) -> Option<u64> {
        self.get(name)?.parse().ok()
    }

    /// `rusage_user`'s `seconds.micros`.
    fn f64(&self, name: &str) -> Option<f64> {
        self.get(name)?.parse().ok()
    }
}

/// Everything one scrape reports.
#[derive(Debug, Clone, Default)]
pub struct Scrape {
    /// `stats`.
    pub general: StatLines,
    /// `stats settings`.
    pub settings: StatLines,
    /// `stats cluster`, on a member.
    pub cluster: Option<StatLines>,
    /// Service time per command, commands never seen left out.
    pub latency: Vec<(Command, latency::Snapshot)>,
}

impl Scrape {
    /// The exposition in `format`.
    pub fn render(&self, format: Format) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(self.clone()));
        let mut out = String::with_capacity(16 * 1024);
        let encoded = match format {
            Format::Prometheus => {
                prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)
            }
            Format::OpenMetrics => prometheus_client::encoding::text::encode(&mut out, &registry),
        };
        // Writing into a String cannot fail; names and labels are ours.
        encoded.expect("encoding into a String");
        out
    }
}

/// `stats` fields memcached_exporter turns into gauges: (field, metric,
/// help).
const GENERAL_GAUGES: &[(&str, &str, &str)] = &[
    (
        "uptime",
        "memcached_uptime_seconds",
        "Number of seconds since the server started.",
    ),
    (
        "time",
        "memcached_time_seconds",
        "current UNIX time according to the server.",
    ),
    (
        "curr_connections",
        "memcached_current_connections",
        "Current number of open connections.",
    ),
    (
        "bytes",
        "memcached_current_bytes",
        "Current number of bytes used to store items.",
    ),
    (
        "limit_maxbytes",
        "memcached_limit_bytes",
        "Number of bytes this server is allowed to use for storage.",
    ),
    (
        "curr_items",
        "memcached_current_items",
        "Current number of items stored by this instance.",
    ),
    (
        "accepting_conns",
        "memcached_accepting_connections",
        "The Memcached server is currently accepting new connections.",
    ),
    // webvac's own.
    (
        "inflight_bytes",
        "webvac_inflight_bytes",
        "Bytes reserved now in the in-flight budget (requests arriving, replies unsent, replica answers, peer frames).",
    ),
    (
        "inflight_limit",
        "webvac_inflight_limit_bytes",
        "Size of the in-flight budget.",
    ),
];

/// `stats` counters: (field, metric without `_total`, help).
const GENERAL_COUNTERS: &[(&str, &str, &str)] = &[
    (
        "bytes_read",
        "memcached_read_bytes",
        "Total number of bytes read by this server from network.",
    ),
    (
        "bytes_written",
        "memcached_written_bytes",
        "Total number of bytes sent by this server to network.",
    ),
    (
        "total_connections",
        "memcached_connections",
        "Total number of connections opened since the server started running.",
    ),
    (
        "rejected_connections",
        "memcached_connections_rejected",
        "Total number of connections rejected at the -c limit.",
    ),
    (
        "conn_yields",
        "memcached_connections_yielded",
        "Total number of connections yielded running due to hitting the -R limit.",
    ),
    (
        "listen_disabled_num",
        "memcached_connections_listener_disabled",
        "Number of times the listener was disabled at the connection limit (never, in webvac).",
    ),
    (
        "total_items",
        "memcached_items",
        "Total number of items stored during the life of this instance.",
    ),
    (
        "evictions",
        "memcached_items_evicted",
        "Total number of valid items removed from cache to free memory for new items.",
    ),
    (
        "reclaimed",
        "memcached_items_reclaimed",
        "Total number of times an entry was stored using memory from an expired entry.",
    ),
    (
        "store_too_large",
        "memcached_item_too_large",
        "The number of times an item exceeded the max-item-size when being stored.",
    ),
    (
        "store_no_memory",
        "memcached_item_no_memory",
        "The number of times an item could not be stored due to no more memory.",
    ),
    // webvac's own.
    (
        "get_expired",
        "webvac_get_expired",
        "Gets that found their item expired (counted in get misses too).",
    ),
    (
        "get_flushed",
        "webvac_get_flushed",
        "Gets that found their item flushed (counted in get misses too).",
    ),
    (
        "expired_unfetched",
        "webvac_items_expired_unfetched",
        "Items that expired without ever being read.",
    ),
    (
        "evicted_unfetched",
        "webvac_items_evicted_unfetched",
        "Items evicted without ever being read.",
    ),
    (
        "cmd_meta",
        "webvac_meta_commands",
        "Meta commands (but mn).",
    ),
    (
        "auth_cmds",
        "webvac_auth_commands",
        "Authentication attempts (-Y).",
    ),
    (
        "auth_errors",
        "webvac_auth_errors",
        "Failed authentication attempts (-Y).",
    ),
    (
        "idle_kicks",
        "webvac_idle_kicks",
        "Connections closed for idling past idle_timeout.",
    ),
    (
        "data_timeouts",
        "webvac_data_timeouts",
        "Connections closed for stalling inside a data block that held in-flight memory.",
    ),
    (
        "ssl_handshake_errors",
        "webvac_tls_handshake_errors",
        "Client TLS handshakes that failed or timed out.",
    ),
    (
        "request_id_replays",
        "webvac_request_id_replays",
        "Mutations answered from a request-id record instead of applied again.",
    ),
    (
        "request_id_records_dropped",
        "webvac_request_id_records_dropped",
        "Live request-id records dropped for the per-key bound.",
    ),
];

/// `stats cluster` gauges: (field, metric, help).
const CLUSTER_GAUGES: &[(&str, &str, &str)] = &[
    (
        "epoch",
        "webvac_cluster_epoch",
        "Epoch of the layout this node has installed.",
    ),
    (
        "members",
        "webvac_cluster_members",
        "Members in the layout this node has installed.",
    ),
    (
        "partitions",
        "webvac_cluster_partitions",
        "Partitions in the cluster (P).",
    ),
    (
        "replicas",
        "webvac_cluster_replicas",
        "Replicas of each partition (N).",
    ),
    (
        "read_quorum",
        "webvac_cluster_read_quorum",
        "Default read quorum (R).",
    ),
    (
        "write_quorum",
        "webvac_cluster_write_quorum",
        "Default write quorum (W).",
    ),
    (
        "hints_pending",
        "webvac_hints_pending",
        "Hints held now for unreachable replicas.",
    ),
    (
        "hints_bytes",
        "webvac_hints_bytes",
        "Memory the hints held now take.",
    ),
    (
        "tombstones",
        "webvac_tombstones",
        "Tombstones (deletes and expiries kept so that old values do not come back) held now.",
    ),
];

/// `stats cluster` fields that are settings or states, not counters, and
/// are reported some other way (or not at all).
const CLUSTER_NOT_COUNTERS: &[&str] = &["node_id", "sloppy_quorum", "anti_entropy"];

/// `stats cluster` counters whose metric is not `webvac_<field>_total`.
const CLUSTER_COUNTER_NAMES: &[(&str, &str)] = &[
    ("forwarded", "webvac_requests_forwarded"),
    ("timeouts", "webvac_replica_timeouts"),
];

/// Help for `stats cluster` counters; a field not listed is described by
/// its name (README "Operations" lists them all).
const CLUSTER_COUNTER_HELP: &[(&str, &str)] = &[
    (
        "stale_epoch_refused",
        "Requests from a peer behind this node's layout epoch, refused so that it fetches the newer layout.",
    ),
    (
        "layouts_installed",
        "Newer layouts fetched from a peer and installed.",
    ),
    (
        "forwarded",
        "Requests this node coordinated for keys it does not hold.",
    ),
    (
        "primary_writes",
        "Writes this node executed as a key's primary.",
    ),
    (
        "replica_writes_sent",
        "Item states shipped to other replicas.",
    ),
    (
        "replica_writes_applied",
        "Item states applied here for a primary (replication acks given).",
    ),
    (
        "replica_writes_stale",
        "Item states refused here as older than the one held.",
    ),
    (
        "write_quorum_failures",
        "Writes answered with an error for lack of W acks.",
    ),
    (
        "read_quorum_failures",
        "Reads answered with an error for lack of R answers.",
    ),
    ("timeouts", "Calls to replicas that timed out."),
    (
        "read_repairs",
        "Stale replicas repaired after a quorum read.",
    ),
    ("hints_stored", "Hints stored for unreachable replicas."),
    ("hints_delivered", "Hints handed back to their replica."),
    (
        "hints_dropped",
        "Hints dropped for lack of room or the per-node bound.",
    ),
    ("hints_expired", "Hints dropped after the hint window."),
    ("anti_entropy_rounds", "Anti-entropy rounds run."),
    (
        "anti_entropy_partitions_compared",
        "Partitions compared with a peer by anti-entropy.",
    ),
    (
        "anti_entropy_partitions_differing",
        "Compared partitions found to differ.",
    ),
    (
        "anti_entropy_keys_pulled",
        "Keys anti-entropy fetched from peers.",
    ),
    (
        "anti_entropy_keys_pushed",
        "Keys anti-entropy sent to peers.",
    ),
    (
        "versions_refused",
        "Item versions refused for being too far ahead of this node's clock.",
    ),
];

fn help_of<'a>(table: &[(&str, &'a str)], field: &str) -> Option<&'a str> {
    table.iter().find(|(f, _)| *f == field).map(|(_, h)| *h)
}

fn gauge(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: impl prometheus_client::encoding::EncodeGaugeValue + Clone + fmt::Debug + Send + Sync,
) -> fmt::Result {
    let metric = ConstGauge::new(value);
    metric.encode(encoder.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

fn counter(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: impl prometheus_client::encoding::EncodeCounterValue + Clone + fmt::Debug + Send + Sync,
) -> fmt::Result {
    let metric = ConstCounter::new(value);
    metric.encode(encoder.encode_descriptor(name, help, None, MetricType::Counter)?)
}

/// A labelled gauge: one sample per `(labels, value)`.
fn gauge_family<'a, V>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (Vec<(&'a str, &'a str)>, V)>,
) -> fmt::Result
where
    V: prometheus_client::encoding::EncodeGaugeValue + Clone + fmt::Debug + Send + Sync,
{
    let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, value) in samples {
        ConstGauge::new(value).encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

/// One member line of `stats cluster`:
/// `<state> client=… peer=… primary_partitions=N replica_partitions=N [rtt_us=N]`.
struct Member<'a> {
    id: &'a str,
    state: &'a str,
    fields: HashMap<&'a str, &'a str>,
}

fn members(cluster: &StatLines) -> Vec<Member<'_>> {
    let mut out: Vec<Member<'_>> = cluster
        .0
        .iter()
        .filter_map(|(k, v)| {
            let id = k.strip_prefix("member:")?;
            let mut words = v.split(' ');
            let state = words.next()?;
            let fields = words.filter_map(|w| w.split_once('=')).collect();
            Some(Member { id, state, fields })
        })
        .collect();
    out.sort_by_key(|m| m.id.parse::<u32>().unwrap_or(u32::MAX));
    out
}

impl Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> fmt::Result {
        let e = &mut encoder;
        let g = &self.general;
        gauge(
            e,
            "memcached_up",
            "Could the memcached server be reached.",
            1u64,
        )?;
        if let Some(version) = g.get("version") {
            gauge_family(
                e,
                "memcached_version",
                "The version of this memcached server.",
                [(vec![("version", version)], 1u64)],
            )?;
        }
        for (field, name, help) in GENERAL_GAUGES {
            if let Some(v) = g.u64(field) {
                gauge(e, name, help, v)?;
            }
        }
        if let Some(v) = self.settings.u64("maxconns") {
            gauge(
                e,
                "memcached_max_connections",
                "Maximum number of clients allowed.",
                v,
            )?;
        }
        for (field, name, help) in [
            (
                "rusage_user",
                "memcached_process_user_cpu_seconds",
                "Accumulated user time for this process.",
            ),
            (
                "rusage_system",
                "memcached_process_system_cpu_seconds",
                "Accumulated system time for this process.",
            ),
        ] {
            if let Some(v) = g.f64(field) {
                counter(e, name, help, v)?;
            }
        }
        for (field, name, help) in GENERAL_COUNTERS {
            if let Some(v) = g.u64(field) {
                counter(e, name, help, v)?;
            }
        }
        self.encode_commands(e)?;
        if let Some(version) = g.get("webvac_version") {
            gauge_family(
                e,
                "webvac_build_info",
                "The webvac version this node runs.",
                [(vec![("version", version)], 1u64)],
            )?;
        }
        self.encode_latency(e)?;
        if let Some(c) = &self.cluster {
            encode_cluster(e, c)?;
        }
        Ok(())
    }
}

impl Scrape {
    /// `memcached_commands_total{command,status}`, as memcached_exporter
    /// derives it: hits and misses per command, `cas` `badval`, `flush`,
    /// and `set` as `cmd_set` less the `cas` commands it includes.
    fn encode_commands(&self, e: &mut DescriptorEncoder<'_>) -> fmt::Result {
        let g = &self.general;
        let mut m = e.encode_descriptor(
            "memcached_commands",
            "Total number of all requests broken down by command (get, set, etc.) and status.",
            None,
            MetricType::Counter,
        )?;
        let mut one = |command: &str, status: &str, v: u64| -> fmt::Result {
            let labels = [("command", command), ("status", status)];
            ConstCounter::new(v).encode(m.encode_family(&labels)?)
        };
        for op in ["get", "delete", "incr", "decr", "cas", "touch"] {
            if let Some(v) = g.u64(&format!("{op}_hits")) {
                one(op, "hit", v)?;
            }
            if let Some(v) = g.u64(&format!("{op}_misses")) {
                one(op, "miss", v)?;
            }
        }
        if let Some(v) = g.u64("cas_badval") {
            one("cas", "badval", v)?;
        }
        if let Some(v) = g.u64("cmd_flush") {
            one("flush", "hit", v)?;
        }
        if let Some(set) = g.u64("cmd_set") {
            let cas: u64 = ["cas_misses", "cas_hits", "cas_badval"]
                .iter()
                .filter_map(|f| g.u64(f))
                .sum();
            one("set", "hit", set.saturating_sub(cas))?;
        }
        Ok(())
    }

    /// `webvac_command_duration_seconds{command}`.
    fn encode_latency(&self, e: &mut DescriptorEncoder<'_>) -> fmt::Result {
        if self.latency.is_empty() {
            return Ok(());
        }
        let mut m = e.encode_descriptor(
            "webvac_command_duration_seconds",
            "Time from a request's parse to its reply, waiting for replicas included.",
            None,
            MetricType::Histogram,
        )?;
        for (command, s) in &self.latency {
            let labels = [("command", command.label())];
            m.encode_family(&labels)?
                .encode_histogram::<NoLabelSet>(s.sum_secs, s.count, &s.buckets, None)?;
        }
        Ok(())
    }
}

/// `stats cluster`: the layout, each member's state and share, the peers'
/// round-trip times, and every counter.
fn encode_cluster(e: &mut DescriptorEncoder<'_>, c: &StatLines) -> fmt::Result {
    for (field, name, help) in CLUSTER_GAUGES {
        if let Some(v) = c.u64(field) {
            gauge(e, name, help, v)?;
        }
    }
    let members = members(c);
    let field = |m: &Member<'_>, f: &str| m.fields.get(f).and_then(|v| v.parse::<u64>().ok());
    gauge_family(
        e,
        "webvac_cluster_member_up",
        "1 if this node reaches the member (or is it), 0 if it is connecting or down.",
        members.iter().map(|m| {
            let up = u64::from(m.state == "up" || m.state == "self");
            (vec![("member", m.id)], up)
        }),
    )?;
    gauge_family(
        e,
        "webvac_cluster_member_partitions",
        "Partitions each member holds, as primary or as another replica.",
        members.iter().flat_map(|m| {
            [
                ("primary", "primary_partitions"),
                ("replica", "replica_partitions"),
            ]
            .into_iter()
            .filter_map(move |(role, f)| {
                Some((vec![("member", m.id), ("role", role)], field(m, f)?))
            })
        }),
    )?;
    gauge_family(
        e,
        "webvac_peer_rtt_seconds",
        "Last heartbeat round trip to each peer.",
        members
            .iter()
            .filter_map(|m| Some((vec![("peer", m.id)], field(m, "rtt_us")? as f64 / 1e6))),
    )?;
    for (field, name) in [
        ("sloppy_quorum", "webvac_cluster_sloppy_quorum"),
        ("anti_entropy", "webvac_cluster_anti_entropy_enabled"),
    ] {
        if let Some(v) = c.u64(field) {
            gauge(e, name, "1 if on, 0 if off (configuration).", v)?;
        }
    }
    let mut counters: Vec<(&str, u64)> =
        c.0.iter()
            .filter(|(k, _)| {
                !k.starts_with("member:")
                    && !CLUSTER_NOT_COUNTERS.contains(&k.as_str())
                    && !CLUSTER_GAUGES.iter().any(|(f, _, _)| f == k)
            })
            .filter_map(|(k, v)| Some((k.as_str(), v.parse::<u64>().ok()?)))
            .collect();
    counters.sort_unstable();
    for (field, v) in counters {
        let name = help_of(CLUSTER_COUNTER_NAMES, field)
            .map_or_else(|| format!("webvac_{field}"), str::to_string);
        let fallback = format!("stats cluster: {field}.");
        let help = help_of(CLUSTER_COUNTER_HELP, field).unwrap_or(&fallback);
        counter(e, &name, help, v)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scrape() -> Scrape {
        let general = StatLines::parse(
            b"STAT pid 7\r\nSTAT uptime 12\r\nSTAT version 1.6.18\r\n\
              STAT rusage_user 0.250000\r\nSTAT cmd_set 10\r\nSTAT cas_hits 2\r\n\
              STAT cas_misses 1\r\nSTAT cas_badval 1\r\nSTAT get_hits 5\r\n\
              STAT get_misses 3\r\nSTAT curr_items 4\r\nSTAT bytes_read 100\r\n\
              STAT webvac_version 0.1.0\r\nEND\r\n",
        );
        let settings = StatLines::parse(b"STAT maxconns 1024\r\nEND\r\n");
        let cluster = StatLines::parse(
            b"STAT node_id 1\r\nSTAT replicas 3\r\n\
              STAT member:1 self client=a peer=b primary_partitions=300 replica_partitions=700\r\n\
              STAT member:2 down(connection_refused) client=c peer=d primary_partitions=324 replica_partitions=700\r\n\
              STAT member:3 up client=e peer=f primary_partitions=400 replica_partitions=624 rtt_us=150\r\n\
              STAT forwarded 9\r\nSTAT read_repairs 2\r\nSTAT peer_calls 40\r\nSTAT hints_pending 1\r\nEND\r\n",
        );
        let latency = crate::server::latency::CommandLatency::default();
        latency.record(Command::Get, std::time::Duration::from_micros(30));
        Scrape {
            general,
            settings,
            cluster: Some(cluster),
            latency: vec![(Command::Get, latency.snapshot(Command::Get))],
        }
    }

    #[test]
    fn memcached_exporter_names_and_derivations() {
        let text = scrape().render(Format::Prometheus);
        for line in [
            "memcached_up 1",
            "memcached_uptime_seconds 12",
            "memcached_version{version=\"1.6.18\"} 1",
            "memcached_process_user_cpu_seconds_total 0.25",
            "memcached_commands_total{command=\"get\",status=\"hit\"} 5",
            "memcached_commands_total{command=\"get\",status=\"miss\"} 3",
            "memcached_commands_total{command=\"cas\",status=\"badval\"} 1",
            // cmd_set counts the 4 cas commands too.
            "memcached_commands_total{command=\"set\",status=\"hit\"} 6",
            "memcached_current_items 4",
            "memcached_read_bytes_total 100",
            "memcached_max_connections 1024",
            "# TYPE memcached_commands_total counter",
        ] {
            assert!(text.lines().any(|l| l == line), "no `{line}` in\n{text}");
        }
    }

    #[test]
    fn cluster_members_peers_and_counters() {
        let text = scrape().render(Format::Prometheus);
        for line in [
            "webvac_cluster_replicas 3",
            "webvac_cluster_member_up{member=\"1\"} 1",
            "webvac_cluster_member_up{member=\"2\"} 0",
            "webvac_cluster_member_up{member=\"3\"} 1",
            "webvac_cluster_member_partitions{member=\"3\",role=\"primary\"} 400",
            "webvac_peer_rtt_seconds{peer=\"3\"} 0.00015",
            "webvac_requests_forwarded_total 9",
            "webvac_read_repairs_total 2",
            "webvac_peer_calls_total 40",
            "webvac_hints_pending 1",
            "webvac_command_duration_seconds_bucket{command=\"get\",le=\"5e-05\"} 1",
            "webvac_command_duration_seconds_count{command=\"get\"} 1",
            "webvac_command_duration_seconds_bucket{command=\"get\",le=\"+Inf\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "no `{line}` in\n{text}");
        }
        assert!(!text.contains("webvac_node_id"), "{text}");
    }

    #[test]
    fn openmetrics_when_asked_for() {
        assert_eq!(Format::from_accept(None), Format::Prometheus);
        assert_eq!(Format::from_accept(Some("text/plain")), Format::Prometheus);
        let prometheus_default = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(
            Format::from_accept(Some(prometheus_default)),
            Format::OpenMetrics
        );
        assert_eq!(
            Format::from_accept(Some("Application/OpenMetrics-Text; version=1.0.0")),
            Format::OpenMetrics
        );
        assert_eq!(
            Format::from_accept(Some("application/openmetrics-text;q=0, text/plain")),
            Format::Prometheus,
            "q=0 refuses it"
        );
        let text = scrape().render(Format::OpenMetrics);
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert!(text.contains("# TYPE memcached_commands counter"), "{text}");
        assert!(text.contains("memcached_commands_total{command=\"get\",status=\"hit\"} 5"));
    }
}
