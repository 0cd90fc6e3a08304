//! `lk` across the cluster: walk the partitions in key-hash order from the
//! token's position, asking one reachable replica of each for its keys in
//! the range, until the page is full or [`LIST_PARTITIONS_PER_CALL_MAX`]
//! partitions were walked; answer the keys and the token of where the walk
//! stopped. A call with the same token walks the same way, so a client may
//! retry it anywhere.

use std::sync::atomic::Ordering::Relaxed;

use tracing::debug;

use super::{Cluster, Local};
use crate::cluster::layout::Topology;
use crate::cluster::message::{PeerRequest, PeerResponse};
use crate::cluster::ring::{partition_of_hash, partition_range};
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
        view: &Topology,
        local: &dyn Local,
        token: &[u8],
        count: usize,
        out: &mut Vec<u8>,
    ) {
        let tokens = local.listing_key();
        let Some(mut from) = tokens.decode(token) else {
            return put_line(out, list_keys::BAD_TOKEN.as_bytes());
        };
        let partitions = view.layout.ring.partitions();
        let mut keys = Vec::new();
        let mut next = Some(from);
        for _ in 0..LIST_PARTITIONS_PER_CALL_MAX {
            let p = partition_of_hash(from, partitions);
            let (_, to) = partition_range(p, partitions);
            let page = match self
                .list_partition(view, local.store(), p, from, to, count - keys.len())
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

    /// One range of partition `p`, from R of its replicas merged (this
    /// node first if it is one, then the others in preference order): a
    /// key acknowledged at W is on at least one of any R when R + W > N, so
    /// a replica that is behind (restarted empty, refilling) hides nothing.
    async fn list_partition(
        &self,
        view: &Topology,
        store: &Store,
        p: u32,
        from: u64,
        to: u64,
        max: usize,
    ) -> Result<KeyPage, String> {
        let pref = view.layout.ring.preference_list(p);
        let wanted = view.layout.read_quorum.min(pref.len());
        let mut pages = Vec::with_capacity(wanted);
        if pref.contains(&self.me) {
            pages.push(store.list_keys(from, to, max));
        }
        let mut why = Vec::new();
        let others = pref.iter().filter(|&&n| n != self.me);
        for node in others {
            if pages.len() >= wanted {
                break;
            }
            let req = PeerRequest::ListKeys {
                from,
                to,
                max: u32::try_from(max).expect("count is bounded"),
            };
            match view.handle(*node).call_timeout(req, self.hop_timeout).await {
                Ok(PeerResponse::Keys { keys, next }) => pages.push(KeyPage { keys, next }),
                Ok(other) => why.push(format!("node {node}: answered {other:?}")),
                Err(e) => {
                    if matches!(e, CallError::Timeout) {
                        self.stats.timeouts.fetch_add(1, Relaxed);
                    }
                    why.push(format!("node {node}: {e}"));
                }
            }
        }
        if pages.len() < wanted {
            debug!(partition = p, errors = ?why, "too few replicas answered a key listing");
            return Err(format!(
                "{} of {wanted} replicas answered ({})",
                pages.len(),
                why.join("; ")
            ));
        }
        Ok(merge(pages, max))
    }
}

/// The union of replicas' pages of one range. Each page is complete up to
/// its `next`, so the union is complete up to the smallest of them: keys
/// at or past it wait for the next page. At most `max` keys (a page
/// boundary never splits a hash).
fn merge(pages: Vec<KeyPage>, max: usize) -> KeyPage {
    let mut next = pages.iter().filter_map(|p| p.next).min();
    let mut keys: Vec<_> = pages.into_iter().flat_map(|p| p.keys).collect();
    keys.sort_unstable_by(|a, b| (a.hash, &a.key).cmp(&(b.hash, &b.key)));
    keys.dedup_by(|a, b| a.hash == b.hash && a.key == b.key);
    if let Some(n) = next {
        keys.retain(|k| k.hash < n);
    }
    if keys.len() > max {
        // Cut after the max-th key, or before its hash when the key past
        // the cut shares it.
        let mut cut = max;
        if keys[cut].hash == keys[cut - 1].hash {
            let h = keys[cut - 1].hash;
            cut = keys.partition_point(|k| k.hash < h);
        }
        if cut == 0 {
            cut = max;
        }
        next = Some(keys[cut].hash);
        keys.truncate(cut);
    }
    KeyPage { keys, next }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ListedKey;

    fn k(hash: u64) -> ListedKey {
        ListedKey {
            hash,
            key: format!("k{hash}").into_bytes(),
            binary: false,
        }
    }

    fn hashes(p: &KeyPage) -> Vec<u64> {
        p.keys.iter().map(|k| k.hash).collect()
    }

    #[test]
    fn a_lagging_replica_hides_nothing() {
        let full = KeyPage {
            keys: vec![k(1), k(2), k(3)],
            next: Some(9),
        };
        let empty = KeyPage {
            keys: vec![],
            next: None,
        };
        let m = merge(vec![empty, full], 3);
        assert_eq!((hashes(&m), m.next), (vec![1, 2, 3], Some(9)));
    }

    #[test]
    fn the_union_stops_where_the_first_page_stops() {
        let a = KeyPage {
            keys: vec![k(1), k(5)],
            next: Some(6),
        };
        let b = KeyPage {
            keys: vec![k(2), k(5), k(7)],
            next: Some(8),
        };
        let m = merge(vec![a, b], 3);
        // 7 is past a's page: a has not said whether it holds 6 or 7 yet.
        assert_eq!((hashes(&m), m.next), (vec![1, 2, 5], Some(6)));
        let m = merge(
            vec![
                KeyPage {
                    keys: vec![k(1), k(2)],
                    next: None,
                },
                KeyPage {
                    keys: vec![k(3), k(4)],
                    next: None,
                },
            ],
            3,
        );
        assert_eq!((hashes(&m), m.next), (vec![1, 2, 3], Some(4)));
    }
}
