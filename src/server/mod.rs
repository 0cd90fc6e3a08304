//! The network server: a listener that admits connections up to the limit,
//! one task per connection, a background expiry sweep, graceful shutdown.

pub mod connection;
pub mod execute;
pub mod inflight;
pub mod meta;
pub mod rlimit;
pub mod stats;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use crate::config::Config;
use crate::error::ServerError;
use crate::limits::{SHUTDOWN_GRACE_MS, SWEEP_INTERVAL_MS, SWEEP_SLOTS_PER_PASS};
use crate::protocol::{ParseLimits, reply};
use crate::store::{Clock, Store, StoreConfig, SystemClock};
use stats::{Facts, ServerStats};

/// The version `version` and `stats` report: the memcached release whose
/// protocol we match, then ours.
pub const VERSION: &str = concat!("1.6.18-webvac-", env!("CARGO_PKG_VERSION"));

/// State every connection shares.
pub struct Shared {
    pub store: Store,
    /// Memory for requests whose data is still arriving; as large as the
    /// item memory limit.
    pub inflight: inflight::InflightBudget,
    pub stats: ServerStats,
    pub facts: Facts,
    pub limits: ParseLimits,
}

/// A bound, not yet running, server.
pub struct Server {
    listener: TcpListener,
    shared: Arc<Shared>,
    max_connections: usize,
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
        config
            .validate()
            .map_err(|e| ServerError::Config(e.to_string()))?;
        let open_files = rlimit::ensure_open_files(config.max_connections)?;
        debug!(open_files, "open-file limit");
        let addr = format!("{}:{}", config.listen, config.port);
        let listener = TcpListener::bind(&addr)
            .await
            .map_err(|source| ServerError::Bind {
                addr: addr.clone(),
                source,
            })?;
        let local = listener.local_addr()?;
        let store = Store::new(
            &StoreConfig {
                memory_limit_bytes: config.memory_limit_bytes(),
                item_bytes_max: config.max_item_size,
                node_id: 0,
            },
            clock.clone(),
        );
        let facts = Facts {
            pid: std::process::id(),
            started_unix_secs: clock.now_secs(),
            version: VERSION,
            max_connections: config.max_connections,
            threads: config.threads,
            port: local.port(),
            listen: config.listen.clone(),
            item_bytes_max: config.max_item_size,
            shards: store.shard_count(),
        };
        let shared = Arc::new(Shared {
            inflight: inflight::InflightBudget::new(config.memory_limit_bytes()),
            store,
            stats: ServerStats::default(),
            facts,
            limits: ParseLimits::new(config.max_item_size),
        });
        Ok(Self {
            listener,
            shared,
            max_connections: config.max_connections,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("bound listener has an address")
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
            shared,
            max_connections,
        } = self;
        info!(addr = %listener.local_addr()?, memory_limit_bytes = shared.store.limit_bytes(), shards = shared.store.shard_count(), "listening");
        let (stop_tx, stop_rx) = watch::channel(false);
        // Each connection holds a sender; when all are dropped, recv() ends.
        let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
        let sweeper = tokio::spawn(sweep_loop(shared.clone(), stop_rx.clone()));
        tokio::pin!(shutdown);
        // Accept failures (out of descriptors, say) are logged at most once a
        // second, with how many were not.
        let mut accept_errors_unlogged = 0u64;
        let mut last_accept_warning: Option<std::time::Instant> = None;
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
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
                        shared.stats.curr_connections.fetch_add(1, Relaxed);
                        shared.stats.total_connections.fetch_add(1, Relaxed);
                        tokio::spawn(connection::serve(stream, peer, shared.clone(), stop_rx.clone(), done_tx.clone()));
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
            }
        }
        info!("shutting down: no longer accepting, finishing in-flight requests");
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
        info!("stopped");
        Ok(())
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
