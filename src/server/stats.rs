//! Server-wide counters (connections, bytes, commands outside the store) and
//! the `stats` replies.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::protocol::stats::put_stat;
use crate::store::StoreStats;

/// Counters shared by every connection. Relaxed atomics: each is independent
/// and only read for reporting.
#[derive(Debug, Default)]
pub struct ServerStats {
    /// Client connections open now (not reset by `stats reset`).
    pub curr_connections: AtomicU64,
    /// Client connections accepted since start.
    pub total_connections: AtomicU64,
    /// Connections refused at the connection limit.
    pub rejected_connections: AtomicU64,
    /// The most client connections open at once: memcached's
    /// `connection_structures` counts the connection structures it has
    /// allocated, one per descriptor it has served, never freed.
    pub connection_structures: AtomicU64,
    /// Times a connection let others run after `-R` requests in a row
    /// (memcached's `conn_yields`).
    pub conn_yields: AtomicU64,
    /// Bytes read from client connections.
    pub bytes_read: AtomicU64,
    /// Bytes written to client connections.
    pub bytes_written: AtomicU64,
    /// `flush_all` commands.
    pub cmd_flush: AtomicU64,
    /// Meta commands other than `mn`.
    pub cmd_meta: AtomicU64,
    /// Level last set by `verbosity`.
    pub verbosity: AtomicU64,
    /// Connections closed for idling past `idle_timeout_secs`.
    pub idle_kicks: AtomicU64,
    /// Attempts to authenticate (`-Y`).
    pub auth_cmds: AtomicU64,
    /// Of them, those that failed.
    pub auth_errors: AtomicU64,
    /// Connections closed for stalling mid-way through a data block that
    /// held in-flight memory (`data_timeout_secs`).
    pub data_timeouts: AtomicU64,
}

impl ServerStats {
    /// Zeroes the counters for `stats reset`; `curr_connections` and
    /// `verbosity` are states, not counters, and stay.
    pub fn reset(&self) {
        for c in [
            &self.total_connections,
            &self.rejected_connections,
            &self.bytes_read,
            &self.bytes_written,
            &self.cmd_flush,
            &self.cmd_meta,
            &self.idle_kicks,
            &self.data_timeouts,
            &self.conn_yields,
        ] {
            c.store(0, Relaxed);
        }
    }
}

/// Fixed facts reported by `stats`.
#[derive(Debug, Clone)]
pub struct Facts {
    /// The process id.
    pub pid: u32,
    /// Unix second the server started (for `uptime`).
    pub started_unix_secs: u32,
    /// The memcached version answered ([`super::VERSION`]).
    pub version: &'static str,
    /// The client connection limit (`-c`).
    pub max_connections: usize,
    /// Whether live items are evicted at the limit (off: `-M`).
    pub evictions: bool,
    /// Worker threads (`-t`).
    pub threads: usize,
    /// The client port as bound (a configured 0 reports the port picked);
    /// 0 when the server serves no client port.
    pub port: u16,
    /// The interface listened on.
    pub listen: String,
    /// The item size limit in bytes (`-I`).
    pub item_bytes_max: usize,
    /// Lock shards of the store.
    pub shards: usize,
    /// `idle_timeout_secs`: 0 never.
    pub idle_timeout_secs: u32,
    /// `flush_all` accepted (off: `-F`).
    pub flush_enabled: bool,
    /// The `shutdown` command accepted (`-A`).
    pub shutdown_command: bool,
    /// Requests a connection runs before others get a turn (`-R`).
    pub requests_per_event: usize,
    /// The unix socket served instead of TCP (`-s`), if any.
    pub unix_socket: Option<String>,
    /// Its access mask (`-a`).
    pub unix_mask: u32,
    /// The TCP listen queue (`-b`).
    pub listen_backlog: u32,
    /// `data_timeout_secs`: 0 never.
    pub data_timeout_secs: u32,
    /// `-Y`'s file, if connections must authenticate.
    pub auth_file: Option<String>,
    /// The `ssl_*` settings as `stats settings` shows them.
    pub ssl: SslFacts,
}

/// The TLS settings `stats settings` reports, as memcached writes them
/// (whether or not `-Z` turned TLS on).
#[derive(Debug, Clone)]
pub struct SslFacts {
    /// `-Z`.
    pub enabled: bool,
    /// `ssl_chain_cert`; memcached prints an unset one as `(null)`.
    pub chain_cert: Option<String>,
    /// `ssl_key`.
    pub key: Option<String>,
    /// `ssl_verify_mode` as OpenSSL's flags (0, 1, 3 or 7).
    pub verify_flags: u8,
    /// `ssl_ca_cert`; unset prints as `NULL`.
    pub ca_cert: Option<String>,
    /// `ssl_wbuf_size` in bytes.
    pub wbuf_bytes: usize,
    /// `ssl_session_cache`.
    pub session_cache: bool,
    /// `ssl_min_version`'s name.
    pub min_version: &'static str,
}

impl SslFacts {
    /// The settings of `config`.
    pub fn from_config(config: &crate::config::Config) -> Self {
        let path = |p: &Option<std::path::PathBuf>| p.as_ref().map(|p| p.display().to_string());
        Self {
            enabled: config.ssl_enabled,
            chain_cert: path(&config.ssl_chain_cert),
            key: path(&config.ssl_key),
            verify_flags: super::tls::verify_flags(config.ssl_verify_mode),
            ca_cert: path(&config.ssl_ca_cert),
            wbuf_bytes: config.ssl_wbuf_size as usize * 1024,
            session_cache: config.ssl_session_cache,
            min_version: super::tls::min_version_name(config.ssl_min_version),
        }
    }
}

/// `stats`: memcached's field names, in memcached's order, then webvac's
/// own; the caller appends any more and `END`.
pub fn compose_general(
    out: &mut Vec<u8>,
    f: &Facts,
    s: &ServerStats,
    st: &StoreStats,
    now: u32,
    inflight: &crate::budget::InflightBudget,
    tls: Option<&super::tls::Tls>,
) {
    let c = &st.counters;
    let (user, system) = rusage();
    put_stat(out, "pid", f.pid);
    put_stat(out, "uptime", now.saturating_sub(f.started_unix_secs));
    put_stat(out, "time", now);
    put_stat(out, "version", f.version);
    put_stat(out, "pointer_size", usize::BITS);
    put_stat(
        out,
        "rusage_user",
        format_args!("{}.{:06}", user / 1_000_000, user % 1_000_000),
    );
    put_stat(
        out,
        "rusage_system",
        format_args!("{}.{:06}", system / 1_000_000, system % 1_000_000),
    );
    put_stat(out, "max_connections", f.max_connections);
    put_stat(out, "curr_connections", s.curr_connections.load(Relaxed));
    put_stat(out, "total_connections", s.total_connections.load(Relaxed));
    put_stat(
        out,
        "rejected_connections",
        s.rejected_connections.load(Relaxed),
    );
    put_stat(
        out,
        "connection_structures",
        s.connection_structures.load(Relaxed),
    );
    put_stat(out, "cmd_get", c.cmd_get);
    put_stat(out, "cmd_set", c.cmd_set);
    put_stat(out, "cmd_flush", s.cmd_flush.load(Relaxed));
    put_stat(out, "cmd_touch", c.cmd_touch);
    put_stat(out, "cmd_meta", s.cmd_meta.load(Relaxed));
    put_stat(out, "get_hits", c.get_hits);
    put_stat(out, "get_misses", c.get_misses);
    put_stat(out, "get_expired", c.get_expired);
    put_stat(out, "get_flushed", c.get_flushed);
    put_stat(out, "delete_misses", c.delete_misses);
    put_stat(out, "delete_hits", c.delete_hits);
    put_stat(out, "incr_misses", c.incr_misses);
    put_stat(out, "incr_hits", c.incr_hits);
    put_stat(out, "decr_misses", c.decr_misses);
    put_stat(out, "decr_hits", c.decr_hits);
    put_stat(out, "cas_misses", c.cas_misses);
    put_stat(out, "cas_hits", c.cas_hits);
    put_stat(out, "cas_badval", c.cas_badval);
    put_stat(out, "touch_hits", c.touch_hits);
    put_stat(out, "touch_misses", c.touch_misses);
    put_stat(out, "store_too_large", c.store_too_large);
    put_stat(out, "store_no_memory", c.store_no_memory);
    put_stat(out, "auth_cmds", s.auth_cmds.load(Relaxed));
    put_stat(out, "auth_errors", s.auth_errors.load(Relaxed));
    if f.idle_timeout_secs > 0 {
        // memcached lists it only with an idle timeout set.
        put_stat(out, "idle_kicks", s.idle_kicks.load(Relaxed));
    }
    put_stat(out, "bytes_read", s.bytes_read.load(Relaxed));
    put_stat(out, "bytes_written", s.bytes_written.load(Relaxed));
    put_stat(out, "limit_maxbytes", st.limit_maxbytes);
    // webvac never stops listening: past -c a connection is refused at
    // once (`rejected_connections`), as memcached's `maxconns_fast` does.
    put_stat(out, "accepting_conns", 1);
    put_stat(out, "listen_disabled_num", 0);
    put_stat(out, "time_in_listen_disabled_us", 0);
    put_stat(out, "threads", f.threads);
    put_stat(out, "conn_yields", s.conn_yields.load(Relaxed));
    // memcached's TLS lines come after its server-wide counters, before
    // the item counts.
    if let Some(tls) = tls {
        if tls.settings.session_cache {
            put_stat(out, "ssl_new_sessions", tls.new_sessions.load(Relaxed));
        }
        put_stat(
            out,
            "ssl_handshake_errors",
            tls.handshake_errors.load(Relaxed),
        );
        put_stat(
            out,
            "time_since_server_cert_refresh",
            tls.since_refresh(now),
        );
    }
    put_stat(out, "bytes", st.bytes);
    put_stat(out, "curr_items", st.curr_items);
    put_stat(out, "total_items", c.total_items);
    put_stat(out, "expired_unfetched", c.expired_unfetched);
    put_stat(out, "evicted_unfetched", c.evicted_unfetched);
    put_stat(out, "evictions", c.evictions);
    put_stat(out, "reclaimed", c.reclaimed);
    // webvac's own: its version (`version` is the memcached one it
    // speaks), bytes reserved in the in-flight budget and its size,
    // and connections closed for stalling while holding some.
    put_stat(out, "webvac_version", super::WEBVAC_VERSION);
    put_stat(out, "inflight_bytes", inflight.used());
    put_stat(out, "inflight_limit", inflight.limit());
    put_stat(out, "data_timeouts", s.data_timeouts.load(Relaxed));
    // Mutations answered from a request-id record, and live records
    // dropped for the per-key bound.
    put_stat(out, "request_id_replays", c.request_id_replays);
    put_stat(
        out,
        "request_id_records_dropped",
        c.request_id_records_dropped,
    );
}

/// `stats settings`: memcached 1.6.18's fields that mean something for
/// webvac, in its order, then webvac's own.
pub fn compose_settings(out: &mut Vec<u8>, f: &Facts, s: &ServerStats, limit_bytes: usize) {
    let yes_no = |on: bool| if on { "yes" } else { "no" };
    put_stat(out, "maxbytes", limit_bytes);
    put_stat(out, "maxconns", f.max_connections);
    put_stat(out, "tcpport", f.port);
    put_stat(out, "udpport", 0);
    put_stat(out, "inter", &f.listen);
    put_stat(out, "verbosity", s.verbosity.load(Relaxed));
    put_stat(out, "evictions", if f.evictions { "on" } else { "off" });
    put_stat(
        out,
        "domain_socket",
        f.unix_socket.as_deref().unwrap_or("NULL"),
    );
    put_stat(out, "umask", format_args!("{:o}", f.unix_mask));
    put_stat(out, "shutdown_command", yes_no(f.shutdown_command));
    put_stat(out, "num_threads", f.threads);
    put_stat(out, "reqs_per_event", f.requests_per_event);
    put_stat(out, "cas_enabled", "yes");
    put_stat(out, "tcp_backlog", f.listen_backlog);
    put_stat(out, "binding_protocol", "ascii");
    put_stat(out, "auth_enabled_sasl", "no");
    put_stat(
        out,
        "auth_enabled_ascii",
        f.auth_file.as_deref().unwrap_or("no"),
    );
    put_stat(out, "item_size_max", f.item_bytes_max);
    put_stat(out, "maxconns_fast", "yes");
    put_stat(out, "flush_enabled", yes_no(f.flush_enabled));
    put_stat(out, "dump_enabled", "no");
    put_stat(out, "idle_timeout", f.idle_timeout_secs);
    let ssl = &f.ssl;
    put_stat(out, "ssl_enabled", yes_no(ssl.enabled));
    put_stat(
        out,
        "ssl_chain_cert",
        ssl.chain_cert.as_deref().unwrap_or("(null)"),
    );
    put_stat(out, "ssl_key", ssl.key.as_deref().unwrap_or("(null)"));
    put_stat(out, "ssl_verify_mode", ssl.verify_flags);
    // PEM; webvac takes no cipher list (rustls's suites).
    put_stat(out, "ssl_keyformat", 1);
    put_stat(out, "ssl_ciphers", "NULL");
    put_stat(out, "ssl_ca_cert", ssl.ca_cert.as_deref().unwrap_or("NULL"));
    put_stat(out, "ssl_wbuf_size", ssl.wbuf_bytes);
    put_stat(out, "ssl_session_cache", yes_no(ssl.session_cache));
    put_stat(out, "ssl_kernel_tls", "no");
    put_stat(out, "ssl_min_version", ssl.min_version);
    put_stat(out, "eviction_policy", "sieve");
    put_stat(out, "store_shards", f.shards);
    put_stat(out, "data_timeout", f.data_timeout_secs);
    out.extend_from_slice(b"END\r\n");
}

/// User and system CPU time of this process, in microseconds.
fn rusage() -> (u64, u64) {
    // /proc/self/stat fields 14 and 15 are utime and stime in clock ticks.
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return (0, 0);
    };
    let Some(after) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
        return (0, 0);
    };
    let fields: Vec<&str> = after.split(' ').collect();
    let tick_us = 10_000; // USER_HZ is 100 on Linux
    let get = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
            * tick_us
    };
    (get(11), get(12))
}
