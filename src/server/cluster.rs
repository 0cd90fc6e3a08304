//! The cluster's sockets: the peer listener, the peer connections, and the
//! startup check that every reachable member agrees on the layout.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tracing::{info, warn};

use super::Shared;
use crate::cluster::coordinator::{Cluster, PeerHandle};
use crate::cluster::transport::{
    self, CallError, Identity, Peer, TcpConnector, TransportConfig, TransportStats,
};
use crate::config::ClusterConfig;
use crate::error::ServerError;

/// The transport settings a node derives from its cluster configuration.
pub fn transport_config(c: &ClusterConfig) -> TransportConfig {
    TransportConfig {
        call_timeout: Duration::from_millis(c.request_timeout_ms),
        ..TransportConfig::default()
    }
}

/// Binds the peer port, checks the layout against every member that is up,
/// and starts a connection to each other member.
///
/// # Errors
/// If the peer port cannot be bound, or a member that answers has a
/// different layout (the message names both).
pub async fn start(
    c: &ClusterConfig,
) -> Result<(Arc<Cluster>, TcpListener, Identity), ServerError> {
    let me = c.me().expect("validated: node_id is a member");
    let listener = TcpListener::bind(&me.peer)
        .await
        .map_err(|source| ServerError::Bind {
            addr: me.peer.clone(),
            source,
        })?;
    let identity = Identity {
        node_id: c.node_id,
        layout: c.layout_hash(),
        layout_text: c.layout_text(),
    };
    let config = transport_config(c);
    let connector = Arc::new(TcpConnector);
    for m in c.members.iter().filter(|m| m.id != c.node_id) {
        match transport::probe(&*connector, &identity, &m.peer, config.connect_timeout).await {
            Ok(()) => info!(node = m.id, addr = %m.peer, "peer agrees on the layout"),
            Err(CallError::Refused(reason)) => {
                return Err(ServerError::Config(format!(
                    "node {} at {} disagrees on the cluster layout: {reason}",
                    m.id, m.peer
                )));
            }
            Err(e) => info!(node = m.id, addr = %m.peer, error = %e, "peer not reachable yet"),
        }
    }
    let stats = Arc::new(TransportStats::default());
    let peers: BTreeMap<_, PeerHandle> = c
        .members
        .iter()
        .filter(|m| m.id != c.node_id)
        .map(|m| {
            let peer = Peer::spawn(
                identity.clone(),
                m.id,
                m.peer.clone(),
                connector.clone(),
                config.clone(),
                stats.clone(),
            );
            (m.id, peer)
        })
        .collect();
    let cluster = Arc::new(Cluster::new(c, peers, stats));
    info!(
        node = c.node_id,
        peer_addr = %me.peer,
        layout = %identity.layout_text,
        "cluster member"
    );
    Ok((cluster, listener, identity))
}

/// Accepts peer connections and serves their requests until aborted.
pub async fn serve_peers(listener: TcpListener, identity: Identity, shared: Arc<Shared>) {
    let cluster = shared
        .cluster
        .clone()
        .expect("a cluster member has a cluster");
    // Owns every peer connection: aborting this task (shutdown) drops the
    // set, which stops them all, so a stopped node answers no peer.
    let mut connections = tokio::task::JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        match listener.accept().await {
            Ok((stream, addr)) => {
                let _ = stream.set_nodelay(true);
                let shared = shared.clone();
                let handler = move |caller, req| {
                    let shared = shared.clone();
                    async move {
                        let cluster = shared.cluster.as_ref().expect("member").clone();
                        cluster.serve(&*shared, caller, req).await
                    }
                };
                tracing::debug!(peer = %addr, "peer connected");
                connections.spawn(transport::serve_connection(
                    stream,
                    identity.clone(),
                    handler,
                    TransportConfig::default(),
                    cluster.transport.clone(),
                ));
            }
            Err(e) => {
                warn!(error = %e, "peer accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}
