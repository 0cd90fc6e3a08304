//! `lk` across the cluster: walk the partitions in key-hash order from the
//! token's position, asking one reachable replica of each for its keys in
//! the range, until the page is full or [`LIST_PARTITIONS_PER_CALL_MAX`]
//! partitions were walked; answer the keys and the token of where the walk
//! stopped. A call with the same token walks the same way, so a client may
//! retry it anywhere.

use std::sync::atomic::Ordering::Relaxed;

use tracing::debug;

use super::{Cluster, Local};
use crate::cluster::listing::partition_range;
use crate::cluster::message::{PeerRequest, PeerResponse};
use crate::cluster::ring::partition_of_hash;
use crate::cluster::transport::CallError;
use crate::limits::{LIST_KEYS_PER_CALL_MAX, LIST_PARTITIONS_PER_CALL_MAX};
use crate::protocol::{list_keys, put_line};
use crate::store::{KeyPage, Store};

/// A peer's answer to [`PeerRequest::ListKeys`].
pub(super) fn serve_list_keys(store: &Store, from: u64, to: u64, max: u32) -> PeerResponse {
    let max = max as usize;
    if from > to || !(1..=LIST_KEYS_PER_CALL_MAX).contains(&max) {
        return PeerResponse::Refused(format!("bad key listing range {from}..={to} max {max}"));
    }
    let page = store.list_keys(from, to, max);
    PeerResponse::Keys {
        keys: page.keys,
        next: page.next,
    }
}

impl Cluster {
    /// `lk <token> <count>`.
    pub(super) async fn list_keys(
        &self,
        local: &dyn Local,
        token: &[u8],
        count: usize,
        out: &mut Vec<u8>,
    ) {
        let tokens = local.listing_key();
        let Some(mut from) = tokens.decode(token) else {
            return put_line(out, list_keys::BAD_TOKEN.as_bytes());
        };
        let partitions = self.ring.partitions();
        let mut keys = Vec::new();
        let mut next = Some(from);
        for _ in 0..LIST_PARTITIONS_PER_CALL_MAX {
            let p = partition_of_hash(from, partitions);
            let (_, to) = partition_range(p, partitions);
            let page = match self
                .list_partition(local.store(), p, from, to, count - keys.len())
                .await
            {
                Ok(page) => page,
                Err(why) => {
                    return put_line(
                        out,
                        format!("SERVER_ERROR cannot list partition {p}: {why}").as_bytes(),
                    );
                }
            };
            keys.extend(page.keys);
            if let Some(n) = page.next {
                next = Some(n);
                break;
            }
            next = to.checked_add(1);
            match next {
                Some(n) if keys.len() < count => from = n,
                _ => break,
            }
        }
        for k in &keys {
            list_keys::put_key(out, &k.key, k.binary);
        }
        let next = next.map(|n| tokens.encode(n));
        list_keys::put_end(out, next.as_deref().map(str::as_bytes));
    }

    /// One range of partition `p` from the first replica that answers:
    /// this node if it is one, else the others in preference order.
    async fn list_partition(
        &self,
        store: &Store,
        p: u32,
        from: u64,
        to: u64,
        max: usize,
    ) -> Result<KeyPage, String> {
        let pref = self.ring.preference_list(p);
        if pref.contains(&self.me) {
            return Ok(store.list_keys(from, to, max));
        }
        let mut why = Vec::new();
        for node in pref {
            let req = PeerRequest::ListKeys {
                from,
                to,
                max: u32::try_from(max).expect("count is bounded"),
            };
            match self.peers[node].call_timeout(req, self.hop_timeout).await {
                Ok(PeerResponse::Keys { keys, next }) => return Ok(KeyPage { keys, next }),
                Ok(other) => why.push(format!("node {node}: answered {other:?}")),
                Err(e) => {
                    if matches!(e, CallError::Timeout) {
                        self.stats.timeouts.fetch_add(1, Relaxed);
                    }
                    why.push(format!("node {node}: {e}"));
                }
            }
        }
        debug!(partition = p, errors = ?why, "no replica answered a key listing");
        Err(why.join("; "))
    }
}
