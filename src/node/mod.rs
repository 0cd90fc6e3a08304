//! Embedded mode: a webvac node inside a tier-1 Rust service.
//!
//! A service that keeps its hottest data in its own process saves a network
//! hop on every hit. [`Node::builder`] starts a node in the caller's tokio
//! runtime, configured in code or from the same TOML as the `webvac`
//! server, and [`NodeBuilder::start`] returns a [`Node`]: a handle with the
//! typed, async operations of [`Client`] (`get`, `get_many`, `set`, `add`,
//! `replace`, `append`, `prepend`, `cas`, `incr`, `decr`, `touch`,
//! `delete`, key listing), each with per-call [`Options`] (TTL, flags, R,
//! W, request id).
//!
//! There are two kinds of handle, with the same operations:
//!
//! | | full member ([`NodeBuilder::start`]) | client only ([`NodeBuilder::client_only`]) |
//! |---|---|---|
//! | holds data | yes: the partitions the ring gives its member id | no |
//! | a call for a key it holds | runs in this process, no socket | one round trip to the key's primary |
//! | a call for another key | forwarded over the cluster transport | one round trip to the key's primary |
//! | counts toward N, R, W | yes | no |
//! | needs | a member entry (`[cluster]`), or nothing for a lone node | the address of any member |
//! | memcached port | optional ([`NodeBuilder::serve_memcached`]) | none |
//! | when it stops | the cluster sees a member down: hinted handoff and anti-entropy cover for it, as for a `webvac` process | nothing changes |
//!
//! A full member runs exactly the server's request path: a call is
//! composed as the meta command a network client would send, executed by
//! the node's coordinator (which serves keys it holds from its own store
//! and sends the rest to their replicas), and its reply decoded, so every
//! rule of the protocol (TTLs, CAS, request ids, quorums) holds the same
//! in-process. A read at `R = 1` of a key the member holds touches no
//! socket at all. A write at `W = 1` of a key the member is the primary for
//! answers without waiting on one; its copies to the other replicas still
//! leave in the background, as every replicated write's do.
//!
//! Like the network client, the handle retries what is safe to retry, and
//! puts a request id on every non-idempotent call, so a retried `incr` or
//! `add` applies once (see [`crate::client`]). Its [`ClientConfig`] sets
//! the attempt timeout, deadline and retry budget.
//!
//! ```
//! use webvac::client::Options;
//! use webvac::config::Config;
//! use webvac::Node;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // A lone node with 64 MiB of item memory and no network port at all.
//! let node = Node::builder()
//!     .config(Config { memory_limit_mb: 64, ..Config::default() })
//!     .start()
//!     .await?;
//! node.set("user:1", "alice", &Options { ttl: Some(300), ..Options::default() }).await?;
//! assert_eq!(node.get("user:1").await?.map(|v| v.data), Some("alice".into()));
//! // A counter whose increments are safe to retry: the id makes a repeat
//! // answer with the first result.
//! node.set("hits", "0", &Options::default()).await?;
//! let once = Options { request_id: Some("req-42".into()), ..Options::default() };
//! assert_eq!(node.incr("hits", 1, &once).await?, Some(1));
//! assert_eq!(node.incr("hits", 1, &once).await?, Some(1)); // a retry: not counted again
//! node.shutdown().await?;
//! # Ok(())
//! # }
//! ```

use std::future::Future;
use std::net::SocketAddr;
use std::ops::Deref;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use thiserror::Error;
use tokio::sync::{Notify, oneshot};
use tokio::task::JoinHandle;
use tracing::warn;

use crate::client::{
    self, Client, ClientConfig, ClientError, InProcess, MemberInfo, webvac_version,
};
use crate::cluster::ring::{NodeId, Ring};
use crate::config::Config;
use crate::error::ServerError;
use crate::limits::SHUTDOWN_GRACE_MS;
use crate::server::{Server, Shared, VERSION, WEBVAC_VERSION};
use crate::store::{Clock, SystemClock};

#[doc(no_inline)]
pub use crate::client::{CasOutcome, Options, Value};

/// Why a node could not start or stop cleanly.
#[derive(Debug, Error)]
pub enum NodeError {
    /// The node's configuration is invalid, or a port could not be bound.
    #[error(transparent)]
    Server(#[from] ServerError),
    /// The handle's [`ClientConfig`] is invalid, or (client only) no seed
    /// answered.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The node's server task ended abnormally.
    #[error("the node's server task failed: {0}")]
    Task(String),
}

/// Which kind of handle a [`Node`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A full member: it holds partitions and serves them in-process.
    Member,
    /// A client-only handle: it holds no data and routes every call to the
    /// cluster over the network.
    ClientOnly,
}

/// Configures and starts a [`Node`]; from [`Node::builder`].
#[derive(Clone)]
pub struct NodeBuilder {
    config: Config,
    client: ClientConfig,
    serve_memcached: bool,
    seeds: Option<Vec<String>>,
    clock: Option<Arc<dyn Clock>>,
}

impl std::fmt::Debug for NodeBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeBuilder")
            .field("config", &self.config)
            .field("client", &self.client)
            .field("serve_memcached", &self.serve_memcached)
            .field("seeds", &self.seeds)
            .finish_non_exhaustive()
    }
}

impl NodeBuilder {
    /// The node's settings: the server's [`Config`], built in code or read
    /// with [`Config::from_file`] / [`Config::from_toml_str`] from the same
    /// TOML the `webvac` binary takes. A `[cluster]` section makes the node
    /// a cluster member with the id `cluster.node_id`. Default:
    /// [`Config::default`], a lone node. `threads` does not apply (the node
    /// runs on the caller's runtime), nor do `listen` and `port` unless
    /// [`NodeBuilder::serve_memcached`] is set.
    ///
    /// A one-member cluster from TOML text (the same as a file's):
    ///
    /// ```
    /// use webvac::config::Config;
    /// use webvac::node::{Node, Options, Role};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let config = Config::from_toml_str(
    ///     r#"
    ///     memory_limit_mb = 32
    ///     [cluster]
    ///     node_id = 1
    ///     members = [{ id = 1, client = "127.0.0.1:0", peer = "127.0.0.1:0" }]
    ///     "#,
    /// )?;
    /// let member = Node::builder().config(config).start().await?;
    /// assert_eq!((member.role(), member.node_id()), (Role::Member, Some(1)));
    /// member.set("greeting", "hello", &Options::default()).await?;
    /// assert!(member.holds("greeting"));
    /// member.shutdown().await?;
    /// # Ok(())
    /// # }
    /// ```
    #[must_use]
    pub fn config(mut self, config: Config) -> Self {
        self.config = config;
        self
    }

    /// Whether the node also serves the memcached protocol on a TCP port
    /// (for memcached clients, `webvac::client`s and the other members'
    /// clients): a member serves its member entry's `client` address, a
    /// lone node `listen:port`. Default `false`: a lone node then opens no
    /// port at all, and a member only its peer port.
    ///
    /// A member that does not serve it is still listed with its `client`
    /// address by `stats cluster`; network clients that pick it fail over
    /// to the next replica, which is correct but costs them a connect.
    #[must_use]
    pub fn serve_memcached(mut self, serve: bool) -> Self {
        self.serve_memcached = serve;
        self
    }

    /// How the handle's calls time out and retry (attempt timeout,
    /// deadline, attempts, backoff, retry budget, automatic request ids);
    /// the connection settings apply only to a client-only handle. Default:
    /// [`ClientConfig::default`].
    #[must_use]
    pub fn client_config(mut self, config: ClientConfig) -> Self {
        self.client = config;
        self
    }

    /// Makes the handle client-only: it holds no data, discovers the
    /// cluster from the first of `seeds` (`host:port` of any member's
    /// memcached port) that answers, and sends each call to its key's
    /// primary. [`NodeBuilder::config`] and
    /// [`NodeBuilder::serve_memcached`] do not apply.
    ///
    /// ```
    /// use webvac::config::Config;
    /// use webvac::node::{Node, Options, Role};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// // A node serving the memcached port on a free port...
    /// let config = Config { port: 0, ..Config::default() };
    /// let member = Node::builder().config(config).serve_memcached(true).start().await?;
    /// member.set("greeting", "hello", &Options::default()).await?;
    /// // ...and a handle that holds nothing and asks it over TCP.
    /// let addr = member.memcached_addr().expect("served");
    /// let client = Node::builder().client_only(&[addr]).start().await?;
    /// assert_eq!(client.role(), Role::ClientOnly);
    /// assert_eq!(client.get("greeting").await?.expect("stored").data, "hello");
    /// member.shutdown().await?;
    /// # Ok(())
    /// # }
    /// ```
    #[must_use]
    pub fn client_only<S: std::fmt::Display>(mut self, seeds: &[S]) -> Self {
        self.seeds = Some(seeds.iter().map(ToString::to_string).collect());
        self
    }

    /// The member's clock (tests drive TTLs with a manual one). Default:
    /// the system clock.
    #[must_use]
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = Some(clock);
        self
    }

    /// Starts the node on the current tokio runtime: binds its ports,
    /// checks the layout with every member that is up, starts the
    /// background work (replication, hinted handoff, anti-entropy, refill,
    /// expiry sweep) and returns its handle. Several nodes may run in one
    /// process.
    ///
    /// # Errors
    /// [`NodeError::Server`] for an invalid configuration, a port that
    /// cannot be bound or a member that disagrees on the layout;
    /// [`NodeError::Client`] for an invalid [`ClientConfig`], or, client
    /// only, when no seed answers.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub async fn start(self) -> Result<Node, NodeError> {
        if let Some(seeds) = &self.seeds {
            let client = Client::connect(seeds, self.client).await?;
            return Ok(Node {
                client,
                member: None,
            });
        }
        self.client.validate()?;
        let clock = self.clock.unwrap_or_else(|| Arc::new(SystemClock));
        let server = Server::bind_parts(&self.config, clock, self.serve_memcached).await?;
        let shared = server.shared().clone();
        let memcached_addr = server.client_addr();
        let peer_addr = server.peer_addr();
        let topology = member_topology(&self.config, memcached_addr).await;
        let gate = Arc::new(Gate::new(shared.clone()));
        let client = Client::in_process(gate.clone(), topology, self.client)?;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async {
            let _ = stopped.await;
        }));
        Ok(Node {
            client,
            member: Some(Arc::new(Member {
                node_id: self.config.cluster.as_ref().map(|c| c.node_id),
                memcached_addr,
                peer_addr,
                gate,
                running: tokio::sync::Mutex::new(Some(Running { stop, task })),
            })),
        })
    }
}

/// A running embedded node, or a client-only handle on a cluster; from
/// [`Node::builder`].
///
/// Every [`Client`] operation is available on it (it dereferences to its
/// [`Client`]): see the [module documentation](self) for what runs where.
/// Clones share the node. Call [`Node::shutdown`] to stop a member
/// gracefully; dropping the last clone stops it too, in the background.
#[derive(Clone)]
pub struct Node {
    client: Client,
    member: Option<Arc<Member>>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("role", &self.role())
            .field("node_id", &self.node_id())
            .field("memcached_addr", &self.memcached_addr())
            .field("peer_addr", &self.peer_addr())
            .finish_non_exhaustive()
    }
}

impl Deref for Node {
    type Target = Client;

    fn deref(&self) -> &Client {
        &self.client
    }
}

impl Node {
    /// A builder with the defaults: a lone full member with
    /// [`Config::default`] settings and no network port.
    pub fn builder() -> NodeBuilder {
        NodeBuilder {
            config: Config::default(),
            client: ClientConfig::default(),
            serve_memcached: false,
            seeds: None,
            clock: None,
        }
    }

    /// The handle's [`Client`]: every operation, the same as on the node.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Whether this is a full member or a client-only handle.
    pub fn role(&self) -> Role {
        if self.member.is_some() {
            Role::Member
        } else {
            Role::ClientOnly
        }
    }

    /// The member id, for a cluster member.
    pub fn node_id(&self) -> Option<u16> {
        self.member.as_ref().and_then(|m| m.node_id)
    }

    /// Where the member serves the memcached protocol, if it does.
    pub fn memcached_addr(&self) -> Option<SocketAddr> {
        self.member.as_ref().and_then(|m| m.memcached_addr)
    }

    /// Where the other members reach this one, for a cluster member.
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        self.member.as_ref().and_then(|m| m.peer_addr)
    }

    /// Whether this member holds a copy of `key` (it is on the key's
    /// preference list): a read of it at `R = 1` is then answered from this
    /// process's memory. Always true for a lone node, never for a
    /// client-only handle.
    pub fn holds(&self, key: impl AsRef<[u8]>) -> bool {
        self.member.as_ref().is_some_and(|m| {
            m.gate
                .shared
                .cluster
                .as_ref()
                .is_none_or(|c| c.holds(key.as_ref()))
        })
    }

    /// Stops the node gracefully: new calls on any clone of this handle
    /// fail with [`ClientError::NoServer`]; calls already running finish
    /// (up to a grace period); the memcached port stops accepting and its
    /// connections finish the requests they have read; then the peer port,
    /// the peer connections and the background work stop. To the rest of
    /// the cluster the member is then down, as a stopped `webvac` process
    /// is. Returns at once on a client-only handle or a node already
    /// stopped.
    ///
    /// # Errors
    /// [`NodeError::Task`] if the server task panicked;
    /// [`NodeError::Server`] if it failed.
    pub async fn shutdown(&self) -> Result<(), NodeError> {
        let Some(member) = &self.member else {
            return Ok(());
        };
        let Some(running) = member.running.lock().await.take() else {
            return Ok(());
        };
        member.gate.close().await;
        let _ = running.stop.send(());
        match running.task.await {
            Ok(result) => result.map_err(NodeError::from),
            Err(e) => Err(NodeError::Task(e.to_string())),
        }
    }
}

/// The full member behind a [`Node`].
struct Member {
    node_id: Option<NodeId>,
    memcached_addr: Option<SocketAddr>,
    peer_addr: Option<SocketAddr>,
    gate: Arc<Gate>,
    /// The server task and its stop signal, until shutdown.
    running: tokio::sync::Mutex<Option<Running>>,
}

struct Running {
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), ServerError>>,
}

impl Drop for Member {
    fn drop(&mut self) {
        // The last handle went without a shutdown: stop in the background.
        if let Some(running) = self.running.get_mut().take() {
            self.gate.open.store(false, Ordering::Release);
            let _ = running.stop.send(());
        }
    }
}

/// The in-process entrance to a member: the handle's calls pass it, and
/// shutdown closes it and waits for the calls inside.
struct Gate {
    shared: Arc<Shared>,
    open: AtomicBool,
    inside: AtomicUsize,
    left: Notify,
}

impl Gate {
    fn new(shared: Arc<Shared>) -> Gate {
        Gate {
            shared,
            open: AtomicBool::new(true),
            inside: AtomicUsize::new(0),
            left: Notify::new(),
        }
    }

    /// Refuses new calls, then waits (up to the shutdown grace) for the
    /// calls inside to finish.
    async fn close(&self) {
        self.open.store(false, Ordering::Release);
        let drained = async {
            loop {
                let notified = self.left.notified();
                if self.inside.load(Ordering::Acquire) == 0 {
                    return;
                }
                notified.await;
            }
        };
        if tokio::time::timeout(Duration::from_millis(SHUTDOWN_GRACE_MS), drained)
            .await
            .is_err()
        {
            warn!(
                calls = self.inside.load(Ordering::Acquire),
                "in-process calls still running after the grace period"
            );
        }
    }
}

/// Counts a call inside the gate for as long as it lives (a call whose
/// future is dropped mid-way leaves too).
struct Inside<'a>(&'a Gate);

impl Drop for Inside<'_> {
    fn drop(&mut self) {
        if self.0.inside.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.left.notify_waiters();
        }
    }
}

impl InProcess for Gate {
    fn call<'a>(
        &'a self,
        request: &'a [u8],
        reply: &'a mut Vec<u8>,
    ) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>> {
        Box::pin(async move {
            self.inside.fetch_add(1, Ordering::AcqRel);
            let _inside = Inside(self);
            if !self.open.load(Ordering::Acquire) {
                return Err("the embedded node has shut down".to_string());
            }
            self.shared.serve_one(request, reply).await;
            Ok(())
        })
    }
}

/// The map a member's handle reports ([`Client::members`],
/// [`Client::preference_list`]): the configured members at their memcached
/// addresses (a name that does not resolve is left out, with a warning).
async fn member_topology(config: &Config, memcached_addr: Option<SocketAddr>) -> client::Topology {
    let Some(c) = &config.cluster else {
        let members = memcached_addr
            .map(|addr| MemberInfo {
                id: 0,
                addr,
                up: true,
            })
            .into_iter()
            .collect();
        return client::Topology::of_member(webvac_version(WEBVAC_VERSION, VERSION), members, None);
    };
    let mut members = Vec::with_capacity(c.members.len());
    for m in &c.members {
        let addr = match (m.id == c.node_id, memcached_addr) {
            (true, Some(addr)) => Some(addr),
            _ => tokio::net::lookup_host(&m.client)
                .await
                .ok()
                .and_then(|mut a| a.next()),
        };
        match addr {
            Some(addr) => members.push(MemberInfo {
                id: m.id,
                addr,
                up: true,
            }),
            None => warn!(member = m.id, client = %m.client, "member address does not resolve"),
        }
    }
    members.sort_by_key(|m| m.id);
    let ids: Vec<NodeId> = c.members.iter().map(|m| m.id).collect();
    let ring = Ring::new(&ids, c.partitions, c.replicas_effective());
    client::Topology::of_member(webvac_version(WEBVAC_VERSION, VERSION), members, Some(ring))
}
