//! The network server: a listener that admits connections up to the limit,
//! one task per connection, a background expiry sweep, graceful shutdown.

pub mod ascii_auth;
pub mod cluster;
pub mod connection;
pub mod conns;
pub mod execute;
pub mod fault_clock;
pub mod fault_control;
pub mod faults;
pub mod latency;
pub mod meta;
pub mod metrics;
pub mod metrics_http;
pub mod peer_tls;
pub mod rlimit;
pub mod stats;
pub mod tls;

use crate::cluster::listing::TokenKey;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use crate::budget::{self, InflightBudget};
use crate::cluster::coordinator::{Cluster, Local};
use crate::cluster::transport::Identity;
use crate::config::Config;
use crate::error::ServerError;
use crate::limits::{CLOCK_DRIFT_MAX_MS_DEFAULT, TOMBSTONE_GRACE_SECS};
use crate::limits::{SHUTDOWN_GRACE_MS, SWEEP_INTERVAL_MS, SWEEP_SLOTS_PER_PASS};
use crate::protocol::{ParseLimits, Parsed, put_line, reply};
use crate::store::{Clock, Store, StoreConfig, SystemClock};
use stats::{Facts, ServerStats};

/// The version `version` and `stats` report: the memcached release whose
/// protocol we match, then ours.
/// The memcached version webvac answers `version` with, and reports as
/// `version` in `stats`: the protocol it speaks, in the form clients parse
/// (several take the last three numbers of the answer as the server's
/// version, so nothing may follow them).
pub const VERSION: &str = "1.6.18";

/// webvac's own version, reported as `webvac_version` in `stats`, where
/// clients do not parse it; the client library tells webvac from memcached
/// by it.
pub const WEBVAC_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Names the `lk` token key derived from the cluster secret.
const LISTING_KEY_CONTEXT: &str = "webvac 2026-12 lk token key from the cluster secret";

/// How long a node that joined keeps asking for its share of the
/// partitions while other changes or recovering members stand in the way.
const TAKE_PARTITIONS_WAIT: std::time::Duration = std::time::Duration::from_secs(120);

/// State every connection shares.
pub struct Shared {
    /// The node's items.
    pub store: Store,
    /// Memory beside the items: requests whose data is still arriving,
    /// unsent replies, gathered replica answers, peer frames.
    pub inflight: Arc<InflightBudget>,
    /// Connection and command counters for `stats`.
    pub stats: ServerStats,
    /// What `stats` reports about the process (pid, version, settings).
    pub facts: Facts,
    /// Key, line and value bounds the parser enforces.
    pub limits: ParseLimits,
    /// Present when this node is a cluster member: every request that is
    /// not purely local goes through it.
    pub cluster: Option<Arc<Cluster>>,
    /// Fault injection for tests (`[faults]`); `None` when off.
    pub faults: Option<faults::Faults>,
    /// The clock and partition faults, and the `fault` command that
    /// changes them (`[faults]`); inert unless configured.
    pub fault_control: fault_control::FaultControl,
    /// Authenticates `lk` listing tokens: from `listing_secret`, else the
    /// cluster secret, else the cluster layout (the same on every member),
    /// else this process alone.
    pub listing_key: TokenKey,
    /// Woken by the `shutdown` command (`-A`): the node stops as on SIGTERM.
    pub shutdown_requested: tokio::sync::Notify,
    /// The listener and client connections, for `stats conns`.
    pub conns: conns::Conns,
    /// `-Y`: the users a connection must authenticate as before anything
    /// else; replaced whole by a reload (SIGHUP).
    pub ascii_auth: Option<parking_lot::RwLock<ascii_auth::AuthFile>>,
    /// `-Z`: TLS on the client port's TCP listeners (but `notls:` ones).
    pub tls: Option<tls::Tls>,
    /// Peer TLS (`cluster.tls_*`), for the peer listener and reloads.
    pub peer_tls: Option<Arc<peer_tls::PeerTls>>,
    /// Service time per command, for `/metrics`.
    pub latency: latency::CommandLatency,
}

impl Shared {
    /// Reads `-Y`'s file again, as memcached does on SIGHUP: connections
    /// already authenticated stay so, new attempts check the new users. A
    /// file that cannot be read or parsed leaves the old users in place.
    ///
    /// # Errors
    /// Why the file was not taken.
    pub fn reload_auth_file(&self) -> Result<(), String> {
        let Some(current) = &self.ascii_auth else {
            return Ok(());
        };
        let path = current.read().path.clone();
        let file = ascii_auth::AuthFile::load(&path)?;
        *current.write() = file;
        Ok(())
    }

    /// Reads the TLS certificate, key and CA files again (`refresh_certs`,
    /// SIGHUP), the client port's and the peers': new connections get
    /// them, open ones keep theirs.
    ///
    /// # Errors
    /// memcached's message (`Error TLS not enabled`, or the file that
    /// could not be read); the certificates in use stay.
    pub fn refresh_certs(&self) -> Result<(), String> {
        if let Some(peer) = &self.peer_tls {
            peer.refresh()
                .map_err(|e| format!("Error loading the peer TLS files: {e}"))?;
        }
        match (&self.tls, &self.peer_tls) {
            (Some(tls), _) => tls.refresh(self.store.clock().now_secs()),
            (None, Some(_)) => Ok(()),
            (None, None) => Err("Error TLS not enabled".into()),
        }
    }

    /// A node's shared state: its store (sized by `config`) and, for a
    /// cluster member, its cluster. `port` is what `stats` reports.
    pub fn new(
        config: &Config,
        clock: Arc<dyn Clock>,
        port: u16,
        cluster: Option<Arc<Cluster>>,
    ) -> Self {
        // A clock fault (or `control`) puts a skewed clock between the
        // store and `clock`.
        let (fault_control, clock) =
            fault_control::FaultControl::new(&config.faults, config.cluster.as_ref(), clock);
        if let Some(c) = &cluster {
            // `cluster::start` set it before the first dial already; a
            // cluster wired by hand (the simulation) gets it here.
            c.transport.blocked.set(&config.faults.drop_peers);
        }
        let store = Store::new(
            &StoreConfig {
                memory_limit_bytes: config.memory_limit_bytes(),
                item_bytes_max: config.max_item_size,
                node_id: config.cluster.as_ref().map_or(0, |c| c.node_id),
                tree_partitions: config
                    .cluster
                    .as_ref()
                    .filter(|c| c.anti_entropy)
                    .map(|c| c.partitions),
                tombstone_grace_secs: config.cluster.as_ref().map_or(TOMBSTONE_GRACE_SECS, |c| {
                    u32::try_from(c.tombstone_grace_secs).unwrap_or(u32::MAX)
                }),
                dedup: crate::store::dedup::Policy {
                    // A node whose clock runs ahead by up to the drift bound
                    // still keeps a record for the whole window.
                    window_ms: u64::from(config.dedup_window_secs) * 1000
                        + config.cluster.as_ref().map_or(0, |c| c.clock_drift_max_ms),
                    records_max: config.request_id_records_per_key,
                },
                clock_drift_max_ms: config
                    .cluster
                    .as_ref()
                    .map_or(CLOCK_DRIFT_MAX_MS_DEFAULT, |c| c.clock_drift_max_ms),
                keep_versions: config.cluster.is_some(),
                evict_live: config.evictions,
            },
            clock.clone(),
        );
        let facts = Facts {
            pid: std::process::id(),
            started_unix_secs: clock.now_secs(),
            version: VERSION,
            max_connections: config.max_connections,
            evictions: config.evictions,
            threads: config.threads,
            port,
            listen: config.listen.clone(),
            item_bytes_max: config.max_item_size,
            shards: store.shard_count(),
            idle_timeout_secs: config.idle_timeout_secs,
            flush_enabled: config.flush_enabled,
            shutdown_command: config.shutdown_command,
            requests_per_event: config.requests_per_event,
            unix_socket: config.unix_socket.as_ref().map(|p| p.display().to_string()),
            unix_mask: config.unix_mask,
            listen_backlog: config.listen_backlog,
            data_timeout_secs: config.data_timeout_secs,
            auth_file: config.auth_file.as_ref().map(|p| p.display().to_string()),
            ssl: stats::SslFacts::from_config(config),
        };
        Self {
            inflight: Arc::new(InflightBudget::new(budget::limit_for(
                config.memory_limit_bytes(),
            ))),
            store,
            stats: ServerStats {
                // `stats settings` reports the -v count, as memcached's does,
                // until a `verbosity` command changes it.
                verbosity: u64::from(config.verbosity).into(),
                ..ServerStats::default()
            },
            facts,
            limits: ParseLimits::new(config.max_item_size),
            cluster,
            faults: faults::Faults::new(&config.faults),
            fault_control,
            shutdown_requested: tokio::sync::Notify::new(),
            conns: conns::Conns::default(),
            ascii_auth: None,
            tls: None,
            peer_tls: None,
            latency: latency::CommandLatency::default(),
            listing_key: match (&config.listing_secret, &config.cluster) {
                (Some(secret), _) => TokenKey::from_secret(secret.as_bytes()),
                (None, Some(c)) => TokenKey::from_secret(c.layout_text().as_bytes()),
                (None, None) => TokenKey::random(),
            },
        }
    }
}

impl Shared {
    /// Runs one complete command as a connection would, through the
    /// cluster when it needs more than this node, and appends its reply.
    /// This is the in-process path of an embedded node ([`crate::node`]).
    pub async fn serve_one(&self, command: &[u8], out: &mut Vec<u8>) {
        let Parsed::Complete { request, .. } = crate::protocol::parse(command, &self.limits) else {
            return put_line(out, b"SERVER_ERROR incomplete command");
        };
        match &self.cluster {
            Some(cluster) if !cluster.is_local(&request) => {
                cluster.coordinate(self, &request, command, out).await;
            }
            _ => {
                execute::execute(self, request, out);
            }
        }
    }
}

impl Local for Shared {
    fn store(&self) -> &Store {
        &self.store
    }

    fn limits(&self) -> &ParseLimits {
        &self.limits
    }

    fn listing_key(&self) -> &TokenKey {
        &self.listing_key
    }

    fn budget(&self) -> &Arc<InflightBudget> {
        &self.inflight
    }

    fn execute(&self, command: &[u8], out: &mut Vec<u8>) {
        match crate::protocol::parse(command, &self.limits) {
            crate::protocol::Parsed::Complete { request, .. } => {
                execute::execute(self, request, out);
            }
            crate::protocol::Parsed::Incomplete => {
                put_line(out, b"SERVER_ERROR incomplete command");
            }
        }
    }
}

/// Where clients connect.
enum ClientListener {
    /// TCP ports: one per address of `-l` (at least one), each with
    /// whether it speaks TLS.
    Tcp(Vec<(TcpListener, bool)>),
    /// A unix socket (memcached's `-s`); its file is removed at shutdown.
    Unix {
        listener: tokio::net::UnixListener,
        path: std::path::PathBuf,
    },
}

/// A TCP address as memcached's `stats conns` writes it.
fn tcp_name(addr: SocketAddr) -> String {
    match addr {
        SocketAddr::V4(a) => format!("tcp:{a}"),
        SocketAddr::V6(a) => format!("tcp6:{a}"),
    }
}

/// A client connection just accepted, and who it is from (for logs).
enum Accepted {
    /// With whether the port speaks TLS.
    Tcp(tokio::net::TcpStream, bool),
    Unix(tokio::net::UnixStream),
}

impl ClientListener {
    async fn accept(&self) -> std::io::Result<(Accepted, String)> {
        match self {
            ClientListener::Tcp(listeners) => {
                let accepts = listeners.iter().map(|(l, tls)| {
                    Box::pin(async move { l.accept().await.map(|(s, peer)| (s, peer, *tls)) })
                });
                let (accepted, _, _) = futures_util::future::select_all(accepts).await;
                let (s, peer, tls) = accepted?;
                Ok((Accepted::Tcp(s, tls), tcp_name(peer)))
            }
            ClientListener::Unix { listener, path } => {
                let (s, _) = listener.accept().await?;
                Ok((Accepted::Unix(s), format!("unix:{}", path.display())))
            }
        }
    }

    /// Its descriptor and its address as `stats conns` shows them.
    fn conns_entry(&self) -> (i32, String) {
        use std::os::fd::AsRawFd;
        match self {
            ClientListener::Tcp(listeners) => (
                listeners[0].0.as_raw_fd(),
                listeners[0]
                    .0
                    .local_addr()
                    .map_or_else(|e| e.to_string(), tcp_name),
            ),
            ClientListener::Unix { listener, path } => {
                (listener.as_raw_fd(), format!("unix:{}", path.display()))
            }
        }
    }

    /// What the log says it listens on.
    fn describe(&self) -> String {
        match self {
            ClientListener::Tcp(listeners) => listeners
                .iter()
                .map(|(l, _)| {
                    l.local_addr()
                        .map_or_else(|e| e.to_string(), |a| a.to_string())
                })
                .collect::<Vec<_>>()
                .join(","),
            ClientListener::Unix { path, .. } => format!("unix:{}", path.display()),
        }
    }
}

impl Accepted {
    fn try_write(&self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Accepted::Tcp(s, _) => s.try_write(buf),
            Accepted::Unix(s) => s.try_write(buf),
        }
    }
}

/// Binds memcached's `-s` socket at `path` with access `mask`: a socket
/// file left there (by a node that did not shut down) is replaced, any
/// other file is an error, and the file is created with the mask's
/// permissions from the start (the process umask is narrowed around the
/// bind, as memcached does).
fn bind_unix(path: &std::path::Path, mask: u32) -> Result<tokio::net::UnixListener, ServerError> {
    use std::os::unix::fs::FileTypeExt;
    let failed = |source| ServerError::Bind {
        addr: format!("unix:{}", path.display()),
        source,
    };
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() {
            std::fs::remove_file(path).map_err(failed)?;
        }
    }
    // SAFETY: umask only swaps the process's file-creation mask; nothing
    // else creates files while a server binds.
    let old = unsafe { libc::umask(!(mask as libc::mode_t) & 0o777) };
    let bound = tokio::net::UnixListener::bind(path);
    // SAFETY: as above, restoring it.
    unsafe { libc::umask(old) };
    bound.map_err(failed)
}

/// The `host:port` addresses of memcached's `-l`: one or more items
/// separated by commas or spaces, each a host (`127.0.0.1`, `::1`,
/// `localhost`) listening on `port`, or a `host:port` / `[v6]:port`; each
/// with whether it was marked `notls:` (plain TCP on a TLS node).
fn listen_addresses(listen: &str, port: u16) -> Vec<(String, bool)> {
    listen
        .split([',', ' '])
        .filter(|item| !item.is_empty())
        .map(|item| {
            let (item, notls) = match item.strip_prefix("notls:") {
                Some(rest) => (rest, true),
                None => (item, false),
            };
            let has_port = if item.starts_with('[') {
                item.contains("]:")
            } else {
                item.matches(':').count() == 1
            };
            let addr = match (has_port, item.contains(':') && !item.starts_with('[')) {
                (true, _) => item.to_string(),
                // A bare IPv6 address.
                (false, true) => format!("[{item}]:{port}"),
                (false, false) => format!("{item}:{port}"),
            };
            (addr, notls)
        })
        .collect()
}

/// Binds the client port at `addr` (`host:port`, the first address it
/// resolves to) with a listen queue of `backlog` (memcached's `-b`).
async fn bind_tcp(addr: &str, backlog: u32) -> std::io::Result<TcpListener> {
    let resolved = tokio::net::lookup_host(addr).await?.next().ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "the address resolves to nothing",
        )
    })?;
    let socket = match resolved {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    // As std and tokio bind: a restarted node may take its port at once.
    socket.set_reuseaddr(true)?;
    socket.bind(resolved)?;
    socket.listen(backlog)
}

/// A bound, not yet running, server.
pub struct Server {
    /// The memcached port; `None` for an embedded member that does not
    /// serve it.
    listener: Option<ClientListener>,
    /// The port other cluster members call; only in a cluster.
    peer_listener: Option<TcpListener>,
    identity: Option<Identity>,
    /// Pull this node's keys from its peers once running (cluster only).
    refill_on_start: bool,
    /// Started with `--join` and without `--standby`: take a share of the
    /// partitions once serving.
    take_partitions: bool,
    shared: Arc<Shared>,
    max_connections: usize,
    /// The Prometheus endpoint (`metrics_listen`), if configured.
    metrics_listener: Option<TcpListener>,
}

impl Server {
    /// Binds the client port and builds the store.
    ///
    /// # Errors
    /// If the configuration is invalid or the address cannot be bound.
    pub async fn bind(config: &Config) -> Result<Self, ServerError> {
        Self::bind_with_clock(config, Arc::new(SystemClock)).await
    }

    /// [`Server::bind`] with an injected clock (tests).
    ///
    /// # Errors
    /// As [`Server::bind`].
    pub async fn bind_with_clock(
        config: &Config,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, ServerError> {
        Self::bind_parts(config, clock, true).await
    }

    /// [`Server::bind`] for an embedded node ([`crate::node`]): the
    /// memcached port is bound only when `serve_client` is set; a cluster
    /// member always binds its peer port.
    ///
    /// # Errors
    /// As [`Server::bind`].
    pub async fn bind_parts(
        config: &Config,
        clock: Arc<dyn Clock>,
        serve_client: bool,
    ) -> Result<Self, ServerError> {
        config
            .validate()
            .map_err(|e| ServerError::Config(e.to_string()))?;
        let open_files = rlimit::ensure_open_files(config.max_connections)?;
        debug!(open_files, "open-file limit");
        // A cluster member listens where its member entry says.
        let me = config.cluster.as_ref().and_then(|c| c.me());
        let addrs = me.map_or_else(
            || listen_addresses(&config.listen, config.port),
            |m| vec![(m.client.clone(), false)],
        );
        let listener = match (&config.unix_socket, serve_client) {
            (_, false) => None,
            (Some(path), true) => Some(ClientListener::Unix {
                // -Z with -s: the unix socket is served without TLS, as
                // memcached serves it.
                listener: bind_unix(path, config.unix_mask)?,
                path: path.clone(),
            }),
            (None, true) => {
                let mut bound = Vec::with_capacity(addrs.len());
                for (addr, notls) in &addrs {
                    let l = bind_tcp(addr, config.listen_backlog)
                        .await
                        .map_err(|source| ServerError::Bind {
                            addr: addr.clone(),
                            source,
                        })?;
                    bound.push((l, config.ssl_enabled && !notls));
                }
                Some(ClientListener::Tcp(bound))
            }
        };
        let port = match &listener {
            Some(ClientListener::Tcp(l)) => l[0].0.local_addr()?.port(),
            _ => 0,
        };
        let (cluster, peer_listener, identity, peer_tls) = match &config.cluster {
            Some(c) => {
                let c = c.with_hints_memory_for(config.memory_limit_mb);
                let (cluster, listener, identity, peer_tls) =
                    cluster::start(&c, &config.faults.drop_peers).await?;
                (Some(cluster), Some(listener), Some(identity), peer_tls)
            }
            None => (None, None, None, None),
        };
        let mut shared = Shared::new(config, clock, port, cluster);
        shared.peer_tls = peer_tls;
        // Without a listing_secret, a cluster with a secret keys its `lk`
        // tokens from it: the layout alone is public.
        if let (None, Some(key)) = (
            &config.listing_secret,
            identity
                .as_ref()
                .and_then(|i| i.key.derive(LISTING_KEY_CONTEXT)),
        ) {
            shared.listing_key = TokenKey::from_secret(&key);
        }
        if let Some(path) = &config.auth_file {
            let file = ascii_auth::AuthFile::load(path).map_err(ServerError::Config)?;
            shared.ascii_auth = Some(parking_lot::RwLock::new(file));
        }
        if let Some(settings) = tls::TlsSettings::from_config(config) {
            let now = shared.store.clock().now_secs();
            shared.tls = Some(tls::Tls::new(settings, now).map_err(ServerError::Config)?);
        }
        let shared = Arc::new(shared);
        let metrics_listener =
            match &config.metrics_listen {
                Some(addr) => Some(bind_tcp(addr, config.listen_backlog).await.map_err(
                    |source| ServerError::Bind {
                        addr: addr.clone(),
                        source,
                    },
                )?),
                None => None,
            };
        Ok(Self {
            listener,
            peer_listener,
            identity,
            refill_on_start: config.cluster.as_ref().is_some_and(|c| c.refill_on_start),
            take_partitions: config
                .cluster
                .as_ref()
                .is_some_and(|c| c.join.is_some() && !c.standby),
            shared,
            max_connections: config.max_connections,
            metrics_listener,
        })
    }

    /// The memcached port's address.
    ///
    /// # Panics
    /// On a server bound without it ([`Server::bind_parts`]); see
    /// [`Server::client_addr`].
    pub fn local_addr(&self) -> SocketAddr {
        self.client_addr()
            .expect("the memcached port is bound (Server::bind)")
    }

    /// The memcached port's address (the first of `-l`'s), if it is
    /// served over TCP.
    pub fn client_addr(&self) -> Option<SocketAddr> {
        match &self.listener {
            Some(ClientListener::Tcp(l)) => l[0].0.local_addr().ok(),
            _ => None,
        }
    }

    /// The peer port's address (cluster members only).
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        self.peer_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
    }

    /// The state the node's requests run on, for in-process callers.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Serves until `shutdown` completes, then stops accepting, lets every
    /// connection finish the requests it has read (up to
    /// [`SHUTDOWN_GRACE_MS`]) and returns.
    ///
    /// # Errors
    /// Only on listener failures that are not per-connection.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), ServerError> {
        let Server {
            listener,
            peer_listener,
            identity,
            refill_on_start,
            take_partitions,
            shared,
            max_connections,
            metrics_listener,
        } = self;
        let metrics = metrics_listener.map(|l| {
            let addr = l
                .local_addr()
                .map_or_else(|_| "-".to_string(), |a| a.to_string());
            info!(metrics_addr = addr, "serving metrics");
            tokio::spawn(metrics_http::serve(l, shared.clone()))
        });
        let refill = shared
            .cluster
            .clone()
            .filter(|c| refill_on_start && c.refilling())
            .map(|c| {
                let local: Arc<dyn Local> = shared.clone();
                tokio::spawn(c.refill(local))
            });
        let moves = shared.cluster.clone().map(|c| {
            let local: Arc<dyn Local> = shared.clone();
            tokio::spawn(c.run_moves(local))
        });
        // A node that joined to hold partitions asks for its share once it
        // serves (a restarted one finds it has them, or that it is moving).
        let take = shared
            .cluster
            .clone()
            .filter(|_| take_partitions)
            .map(|c| tokio::spawn(c.take_partitions(TAKE_PARTITIONS_WAIT)));
        let hint_delivery = shared
            .cluster
            .clone()
            .map(|c| tokio::spawn(c.deliver_hints(shared.store.clock_arc())));
        let layouts = shared
            .cluster
            .clone()
            .map(|c| tokio::spawn(c.follow_layouts()));
        let anti_entropy = shared.cluster.clone().map(|c| {
            let local: Arc<dyn Local> = shared.clone();
            tokio::spawn(c.anti_entropy(local))
        });
        let peers = match (peer_listener, identity) {
            (Some(l), Some(id)) => Some(tokio::spawn(cluster::serve_peers(l, id, shared.clone()))),
            _ => None,
        };
        let addr = listener
            .as_ref()
            .map_or_else(|| "-".to_string(), ClientListener::describe);
        if let Some(l) = &listener {
            let (fd, name) = l.conns_entry();
            shared
                .conns
                .listening(fd, name, shared.store.clock().now_secs());
        }
        info!(
            addr,
            memory_limit_bytes = shared.store.limit_bytes(),
            shards = shared.store.shard_count(),
            "listening"
        );
        let (stop_tx, stop_rx) = watch::channel(false);
        // Each connection holds a sender; when all are dropped, recv() ends.
        let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
        let sweeper = tokio::spawn(sweep_loop(shared.clone(), stop_rx.clone()));
        // A member removed from the layout (`cluster leave`) stops as if
        // told to: it holds nothing the cluster needs.
        let leaving = shared.cluster.clone();
        let shutdown = async move {
            match leaving {
                Some(c) => tokio::select! {
                    () = shutdown => {}
                    epoch = c.removed() => info!(epoch, "left the cluster, stopping"),
                },
                None => shutdown.await,
            }
        };
        tokio::pin!(shutdown);
        // Accept failures (out of descriptors, say) are logged at most once a
        // second, with how many were not.
        let mut accept_errors_unlogged = 0u64;
        let mut last_accept_warning: Option<std::time::Instant> = None;
        loop {
            tokio::select! {
                accepted = accept(listener.as_ref()) => match accepted {
                    Ok((stream, peer)) => {
                        let current = shared.stats.curr_connections.load(Relaxed);
                        if current >= max_connections as u64 {
                            shared.stats.rejected_connections.fetch_add(1, Relaxed);
                            // One non-blocking attempt, as memcached: a client
                            // that is not reading does not hold us up.
                            let _ = stream.try_write(format!("{}\r\n", reply::TOO_MANY_CONNECTIONS).as_bytes());
                            debug!(peer = %peer, "connection refused: too many open connections");
                            continue;
                        }
                        let open = shared.stats.curr_connections.fetch_add(1, Relaxed) + 1;
                        shared.stats.connection_structures.fetch_max(open, Relaxed);
                        shared.stats.total_connections.fetch_add(1, Relaxed);
                        let (shared, stop, done) = (shared.clone(), stop_rx.clone(), done_tx.clone());
                        match stream {
                            Accepted::Tcp(s, false) => tokio::spawn(connection::serve(s, peer, shared, stop, done)),
                            Accepted::Tcp(s, true) => tokio::spawn(connection::serve_tls(s, peer, shared, stop, done)),
                            Accepted::Unix(s) => tokio::spawn(connection::serve(s, peer, shared, stop, done)),
                        };
                    }
                    Err(e) => {
                        // Out of file descriptors and the like: back off
                        // instead of spinning, then keep serving.
                        if last_accept_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                            warn!(error = %e, suppressed = accept_errors_unlogged, "accept failed");
                            last_accept_warning = Some(std::time::Instant::now());
                            accept_errors_unlogged = 0;
                        } else {
                            accept_errors_unlogged += 1;
                        }
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                },
                () = &mut shutdown => break,
                () = shared.shutdown_requested.notified() => {
                    info!("shutdown requested by a client (-A)");
                    break;
                }
            }
        }
        info!("shutting down: no longer accepting, finishing in-flight requests");
        if let Some(ClientListener::Unix { path, .. }) = &listener {
            let _ = std::fs::remove_file(path);
        }
        drop(listener);
        let _ = stop_tx.send(true);
        drop(done_tx);
        if tokio::time::timeout(Duration::from_millis(SHUTDOWN_GRACE_MS), done_rx.recv())
            .await
            .is_err()
        {
            warn!(
                open = shared.stats.curr_connections.load(Relaxed),
                "connections still open after the grace period"
            );
        }
        sweeper.abort();
        if let Some(p) = peers {
            p.abort();
        }
        if let Some(h) = hint_delivery {
            h.abort();
        }
        if let Some(l) = layouts {
            l.abort();
        }
        if let Some(a) = anti_entropy {
            a.abort();
        }
        if let Some(r) = refill {
            r.abort();
        }
        for task in [moves, take].into_iter().flatten() {
            task.abort();
        }
        if let Some(m) = metrics {
            m.abort();
        }
        if let Some(c) = &shared.cluster {
            c.shutdown();
        }
        info!("stopped");
        Ok(())
    }
}

/// The next connection on the memcached port; never, when it is not served.
async fn accept(listener: Option<&ClientListener>) -> std::io::Result<(Accepted, String)> {
    match listener {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    }
}

/// Reclaims expired items nobody reads, a bounded slice at a time.
async fn sweep_loop(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_millis(SWEEP_INTERVAL_MS));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let reclaimed = shared.store.sweep(SWEEP_SLOTS_PER_PASS);
                if reclaimed > 0 {
                    debug!(reclaimed, "expiry sweep");
                }
            }
            _ = stop.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::listen_addresses;

    fn addrs(listen: &str, port: u16) -> Vec<String> {
        listen_addresses(listen, port)
            .into_iter()
            .map(|(addr, notls)| if notls { format!("notls {addr}") } else { addr })
            .collect()
    }

    #[test]
    fn listen_takes_memcached_lists_of_hosts_and_ports() {
        assert_eq!(addrs("127.0.0.1", 11211), ["127.0.0.1:11211"]);
        assert_eq!(
            addrs("127.0.0.1,::1", 11211),
            ["127.0.0.1:11211", "[::1]:11211"]
        );
        assert_eq!(
            addrs("localhost:7 [::1]:8 [fe80::1]", 9),
            ["localhost:7", "[::1]:8", "[fe80::1]:9"]
        );
        assert_eq!(
            addrs("notls:127.0.0.1:7,127.0.0.1:8 notls:[::1]", 9),
            ["notls 127.0.0.1:7", "127.0.0.1:8", "notls [::1]:9"]
        );
    }
}
