//! The cluster's sockets: the peer listener, the peer connections, and the
//! startup check that every reachable member agrees on the layout.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tracing::info;

use super::Shared;
use super::peer_tls::{PeerTls, TlsPeerConnector};
use crate::cluster::coordinator::{Cluster, PeerHandle};
use crate::cluster::layout::Layout;
use crate::cluster::message::{PeerRequest, PeerResponse};
use crate::cluster::ring::NodeId;
use crate::cluster::transport::{
    self, CallError, Connector, EpochCell, Identity, Peer, PeerConnections, PeerKey, Slot,
    TcpConnector, TransportConfig, TransportStats,
};
use crate::config::{ClusterConfig, MemberConfig};
use crate::error::ServerError;
use crate::limits::{PEER_CONNECTIONS_PER_MEMBER_MAX, PEER_HANDSHAKES_MAX, TLS_HANDSHAKE_TIMEOUT};

/// The transport settings a node derives from its cluster configuration.
pub fn transport_config(c: &ClusterConfig) -> TransportConfig {
    TransportConfig {
        call_timeout: Duration::from_millis(c.request_timeout_ms),
        ..TransportConfig::default()
    }
}

/// Binds the peer port, checks the layout against every member that is up,
/// and starts a connection to each other member. `drop_peers` are cut off
/// from the start (`[faults]`): neither probed nor reached.
///
/// # Errors
/// If the peer port cannot be bound, or a member that answers has a
/// different layout (the message names both).
pub async fn start(
    c: &ClusterConfig,
    drop_peers: &[NodeId],
) -> Result<(Arc<Cluster>, TcpListener, Identity, Option<Arc<PeerTls>>), ServerError> {
    let me = c.me().expect("validated: node_id is a member");
    let listener = TcpListener::bind(&me.peer)
        .await
        .map_err(|source| ServerError::Bind {
            addr: me.peer.clone(),
            source,
        })?;
    let mut identity = identity(c, peer_key(c)?);
    let tls = PeerTls::of(c).map_err(|e| ServerError::Config(format!("peer TLS: {e}")))?;
    let cluster = match &tls {
        Some(tls) => {
            let connector = Arc::new(TlsPeerConnector(tls.clone()));
            assemble(c, drop_peers, &mut identity, connector).await?
        }
        None => assemble(c, drop_peers, &mut identity, Arc::new(TcpConnector)).await?,
    };
    info!(
        node = c.node_id,
        peer_addr = %me.peer,
        layout = %identity.layout_text,
        peer_tls = tls.is_some(),
        "cluster member"
    );
    Ok((cluster, listener, identity, tls))
}

/// Joins the cluster first if the node was started with `--join`, then
/// probes and connects to every member through `connector`.
async fn assemble<C: Connector>(
    c: &ClusterConfig,
    drop_peers: &[NodeId],
    identity: &mut Identity,
    connector: Arc<C>,
) -> Result<Arc<Cluster>, ServerError> {
    let (c, layout, fresh) = joined(c, identity, &*connector).await?;
    let epoch = layout.epoch;
    let cluster = join(&c, layout, drop_peers, identity, connector).await?;
    if fresh {
        cluster.joined_fresh(epoch);
    }
    Ok(cluster)
}

/// How long a node started with `--join` keeps trying to reach the member
/// it names, and waits for the answer (a decision of the members).
const JOIN_TIMEOUT: Duration = Duration::from_secs(15);

/// A node started with `--join` asks the member at that address to make
/// it a standby member, and returns the configuration and layout the
/// cluster gave it (members, N, R, W, P), with `identity` showing the
/// cluster's layout hash; any other node returns its own configuration
/// and the layout of its member list. Also whether it was added just now
/// (a restarted member that joins again is a member already).
///
/// # Errors
/// If the member refused (the message says why: an id or address taken,
/// another partition count, another secret or wire version) or could not
/// be reached within [`JOIN_TIMEOUT`].
async fn joined<C: Connector>(
    c: &ClusterConfig,
    identity: &mut Identity,
    connector: &C,
) -> Result<(ClusterConfig, Layout, bool), ServerError> {
    let Some(seed) = &c.join else {
        return Ok((c.clone(), Layout::of(c), false));
    };
    let me = c.me().expect("validated: node_id is a member");
    let request = PeerRequest::Join {
        id: c.node_id,
        client: me.client.clone(),
        peer: me.peer.clone(),
        partitions: (c.partitions != crate::cluster::ring::PARTITIONS_DEFAULT)
            .then_some(c.partitions),
    };
    let refused = |why: String| {
        ServerError::Config(format!(
            "cannot join the cluster of the member at {seed}: {why}"
        ))
    };
    let deadline = tokio::time::Instant::now() + JOIN_TIMEOUT;
    let answer = loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match transport::call_joining::<_, _, PeerResponse>(
            connector,
            identity,
            seed,
            request.clone(),
            left,
        )
        .await
        {
            Ok(answer) => break answer,
            Err(CallError::Refused(why)) => return Err(refused(why)),
            Err(e) if left.is_zero() || tokio::time::Instant::now() >= deadline => {
                return Err(refused(e.to_string()));
            }
            Err(e) => {
                info!(seed = %seed, error = %e, "the member to join is not reachable yet");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    let (desc, fresh) = match answer.answer {
        PeerResponse::Joined { layout, fresh } => (layout, fresh),
        PeerResponse::Refused(why) => return Err(refused(why)),
        other => return Err(refused(format!("unexpected answer {other:?}"))),
    };
    let layout = Layout::from_desc(&desc, desc.partitions).map_err(refused)?;
    if !layout.members.iter().any(|m| m == me) {
        return Err(refused(format!(
            "its layout (epoch {}) does not have node {} at {}",
            desc.epoch, me.id, me.peer
        )));
    }
    let (layout_hash, layout_text) = answer.cluster;
    identity.layout = layout_hash;
    identity.layout_text = layout_text;
    // Shown in the probes and first dials, so that members still at an
    // older epoch take this node for a newcomer and learn the layout.
    identity.epoch.set(desc.epoch);
    let mut joined = c.clone();
    joined.members = layout.members.clone();
    joined.partitions = desc.partitions;
    joined.replicas = usize::from(desc.replicas);
    joined.read_quorum = Some(usize::from(desc.read_quorum));
    joined.write_quorum = Some(usize::from(desc.write_quorum));
    info!(
        node = c.node_id,
        seed = %seed,
        epoch = desc.epoch,
        members = ?layout.member_ids(),
        fresh,
        "joined the cluster as a standby member"
    );
    Ok((joined, layout, fresh))
}

/// Probes every other member through `connector` (a refusal stops the
/// node), then connects to them all, starting from `layout`.
async fn join<C: Connector>(
    c: &ClusterConfig,
    layout: Layout,
    drop_peers: &[NodeId],
    identity: &Identity,
    connector: Arc<C>,
) -> Result<Arc<Cluster>, ServerError> {
    let config = transport_config(c);
    // Probe every member at once: an unreachable one costs one connect
    // timeout in all, not one each.
    let others: Vec<_> = c
        .members
        .iter()
        .filter(|m| m.id != c.node_id && !drop_peers.contains(&m.id))
        .collect();
    let probes = others
        .iter()
        .map(|m| transport::probe(&*connector, identity, &m.peer, config.connect_timeout));
    for (m, probe) in others.iter().zip(join_all(probes).await) {
        match probe {
            Ok(()) => info!(node = m.id, addr = %m.peer, "peer agrees on the layout"),
            Err(CallError::Refused(reason)) => {
                return Err(ServerError::Config(format!(
                    "cannot form a cluster with node {} at {}: {reason}",
                    m.id, m.peer
                )));
            }
            Err(e) => info!(node = m.id, addr = %m.peer, error = %e, "peer not reachable yet"),
        }
    }
    let stats = Arc::new(TransportStats::default());
    stats.blocked.set(drop_peers);
    Ok(Arc::new(connect_peers_with(
        c,
        layout,
        identity,
        connector,
        move |_| config.clone(),
        stats,
    )))
}

/// This node's identity in peer handshakes, proving it holds `key`.
pub fn identity(c: &ClusterConfig, key: PeerKey) -> Identity {
    Identity {
        node_id: c.node_id,
        layout: c.layout_hash(),
        layout_text: c.layout_text(),
        epoch: EpochCell::default(),
        key,
    }
}

/// The key in `cluster.secret_file`, or the open key if there is none.
///
/// # Errors
/// If the file cannot be read, others may read it, or its secret is too
/// short or too long (the message names the file and what to do).
pub fn peer_key(c: &ClusterConfig) -> Result<PeerKey, ServerError> {
    match &c.secret_file {
        Some(path) => PeerKey::load(path).map_err(|e| ServerError::Config(e.to_string())),
        None => Ok(PeerKey::open()),
    }
}

/// The cluster with a connection (dialled in the background) to every
/// other member; `config_for` gives each peer's transport settings.
pub fn connect_peers<C: Connector>(
    c: &ClusterConfig,
    identity: &Identity,
    connector: Arc<C>,
    config_for: impl Fn(NodeId) -> TransportConfig + Send + Sync + 'static,
) -> Cluster {
    connect_peers_with(
        c,
        Layout::of(c),
        identity,
        connector,
        config_for,
        Arc::new(TransportStats::default()),
    )
}

/// [`connect_peers`] from `layout`, with the node's transport counters and
/// injected partition made beforehand, so a partition holds from the first
/// dial.
pub fn connect_peers_with<C: Connector>(
    c: &ClusterConfig,
    layout: Layout,
    identity: &Identity,
    connector: Arc<C>,
    config_for: impl Fn(NodeId) -> TransportConfig + Send + Sync + 'static,
    stats: Arc<TransportStats>,
) -> Cluster {
    let epoch = identity.epoch.clone();
    let (identity, peer_stats) = (identity.clone(), stats.clone());
    let spawn_peer = move |m: &MemberConfig| -> PeerHandle {
        Peer::spawn(
            identity.clone(),
            m.id,
            m.peer.clone(),
            connector.clone(),
            config_for(m.id),
            peer_stats.clone(),
        )
    };
    Cluster::with_layout(c, layout, Box::new(spawn_peer), stats, epoch)
}

/// Serves one accepted peer connection with this node's cluster, under no
/// connection cap (a harness that accepts its own connections); peer frames
/// and answers are held to the node's in-flight budget all the same.
pub fn serve_peer_connection<S>(
    stream: S,
    identity: Identity,
    shared: Arc<Shared>,
) -> impl Future<Output = ()> + Send + 'static
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let slot = PeerConnections::unbounded()
        .try_open(&TransportStats::default())
        .expect("no cap");
    serve_admitted_peer_connection(stream, identity, shared, slot)
}

/// Serves one accepted peer connection that holds `slot` under the
/// node's peer connection caps.
fn serve_admitted_peer_connection<S>(
    stream: S,
    identity: Identity,
    shared: Arc<Shared>,
    slot: Slot,
) -> impl Future<Output = ()> + Send + 'static
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let cluster = shared
        .cluster
        .clone()
        .expect("a cluster member has a cluster");
    let stats = cluster.transport.clone();
    let budget = shared.inflight.clone();
    // The node's own call timeout: how long a large frame may wait for
    // room, and the periods of the idle and write timeouts.
    let config = TransportConfig {
        call_timeout: cluster.call_timeout(),
        ..TransportConfig::default()
    };
    let handler = move |caller, epoch, req| {
        let (shared, cluster) = (shared.clone(), cluster.clone());
        async move { cluster.serve(&*shared, caller, epoch, req).await }
    };
    transport::serve_connection(stream, identity, handler, config, stats, budget, slot)
}

/// A peer connection whose TLS handshake failed: counted with the failed
/// authentications (`peer_auth_failures`).
fn refused_tls(shared: &Shared, addr: &std::net::SocketAddr, why: &str) {
    if let Some(cluster) = &shared.cluster {
        cluster
            .transport
            .auth_failures
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    tracing::debug!(peer = %addr, error = why, "peer TLS handshake failed");
}

/// Accepts peer connections and serves their requests until aborted, at
/// most [`PEER_HANDSHAKES_MAX`] at once in the handshake and
/// [`PEER_CONNECTIONS_PER_MEMBER_MAX`] per member, members only (see
/// [`PeerConnections`]): past the handshake cap a new connection is closed
/// at once.
pub async fn serve_peers(listener: TcpListener, identity: Identity, shared: Arc<Shared>) {
    let cluster = shared
        .cluster
        .as_ref()
        .expect("a cluster member has a cluster");
    let stats = cluster.transport.clone();
    let members = cluster.clone();
    let caps = PeerConnections::for_cluster(
        Box::new(move |id| members.is_member(id)),
        PEER_CONNECTIONS_PER_MEMBER_MAX,
        PEER_HANDSHAKES_MAX,
    );
    // Owns every peer connection: aborting this task (shutdown) drops the
    // set, which stops them all, so a stopped node answers no peer.
    let mut connections = tokio::task::JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        match listener.accept().await {
            Ok((stream, addr)) => {
                let Some(slot) = caps.try_open(&stats) else {
                    tracing::debug!(peer = %addr, cap = PEER_HANDSHAKES_MAX, "too many peer handshakes, closing a new connection");
                    continue;
                };
                let _ = stream.set_nodelay(true);
                tracing::debug!(peer = %addr, "peer connected");
                let (identity, shared) = (identity.clone(), shared.clone());
                match shared.peer_tls.clone() {
                    None => {
                        connections.spawn(serve_admitted_peer_connection(
                            stream, identity, shared, slot,
                        ));
                    }
                    // TLS first, holding the handshake slot: a peer without
                    // a certificate of the cluster's CA never reaches the
                    // challenge on the secret.
                    Some(tls) => {
                        connections.spawn(async move {
                            let accepted =
                                tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, tls.accept(stream))
                                    .await;
                            match accepted {
                                Ok(Ok(stream)) => {
                                    serve_admitted_peer_connection(stream, identity, shared, slot)
                                        .await;
                                }
                                Ok(Err(e)) => refused_tls(&shared, &addr, &e.to_string()),
                                Err(_) => refused_tls(&shared, &addr, "timed out"),
                            }
                        });
                    }
                }
            }
            Err(e) => {
                crate::warn_limited!(error = %e, "peer accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}
