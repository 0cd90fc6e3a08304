//! What nodes say to each other. Carried by the transport in postcard frames.
//!
//! Client commands travel as their raw protocol bytes: the node that executes
//! one parses it with the same parser and runs it with the same code as a
//! single node, so every memcached rule (meta flags, noreply, CAS, TTLs)
//! holds unchanged in a cluster. What replicas exchange is state, never
//! operations: applying a [`KeyState`] twice, late or out of order is
//! harmless because the highest version wins.

use serde::{Deserialize, Serialize};

use crate::cluster::layout::LayoutDesc;
use crate::cluster::paxos::{Ballot, Vote};
use crate::cluster::ring::NodeId;
use crate::store::merkle::TreeNode;
use crate::store::{KeyState, KeyVersion, ListedKey};

/// A request one node sends another; answered by one [`PeerResponse`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum PeerRequest {
    /// Execute one client command as the key's primary and replicate its
    /// result to `write_quorum` replicas (this one included) before
    /// answering.
    Execute {
        /// The client command, raw protocol bytes with its data block.
        #[serde(with = "serde_bytes")]
        command: Vec<u8>,
        /// Replicas that must hold the result before the reply; clamped
        /// to 1..=replication factor.
        write_quorum: u8,
    },
    /// Read these keys locally (get/gets): per key, its version and the
    /// `VALUE` block a client would get.
    ReadKeys {
        /// The keys to read.
        keys: Vec<Vec<u8>>,
        /// Include the CAS in each `VALUE` line (`gets`).
        with_cas: bool,
    },
    /// Run a meta get that changes nothing, locally: the reply and the
    /// version it saw.
    ReadMeta {
        /// The `mg` command, raw protocol bytes.
        #[serde(with = "serde_bytes")]
        command: Vec<u8>,
        /// The key it reads, whose version is reported.
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
    },
    /// The key's state, for a primary that must catch up before a
    /// read-modify-write.
    Fetch {
        /// The key whose state is wanted.
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
    },
    /// Apply replicated state, highest version wins.
    Apply {
        /// The key the state belongs to.
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        /// The item or its absence, with its version.
        state: KeyState,
    },
    /// Hold `state` for `target`, a replica that could not be reached, and
    /// hand it over when it is back (hinted handoff).
    Hint {
        /// Node id of the replica the state is meant for.
        target: u16,
        /// The key the state belongs to.
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        /// The item or its absence, with its version.
        state: KeyState,
    },
    /// One page of the states this node holds for keys that `for_node`
    /// replicates, from `cursor` (0 to begin): how a node that restarted
    /// empty refills itself.
    Scan {
        /// Node id of the node refilling itself.
        for_node: u16,
        /// Where to continue: 0 to begin, then the previous page's `next`.
        cursor: u64,
        /// Only the keys `for_node` gains in the move under way (a
        /// handoff); otherwise every key it replicates now or will.
        moving: bool,
        /// With `moving`: only these partitions (ascending; empty: every
        /// partition it gains).
        only: Vec<u32>,
    },
    /// Whether this node has been given every key it gains in the move of
    /// layout epoch `epoch` (answered by [`PeerResponse::Transfer`]).
    TransferStatus {
        /// The transition epoch asked about.
        epoch: u64,
    },
    /// `flush_all`, relayed to every member. `version` is the coordinator's
    /// stamp for it: replicated states older than an immediate flush are
    /// dropped afterwards.
    FlushAll {
        /// `flush_all`'s delay, read as a client exptime; 0 or less: now.
        delay_secs: i64,
        /// The coordinator's version stamp for the flush.
        version: u64,
    },
    /// Anti-entropy: the hashes of these tree nodes.
    TreeHashes {
        /// The tree nodes whose hashes are wanted.
        nodes: Vec<TreeNode>,
    },
    /// Anti-entropy: the (key, version) entries of these leaves, one list
    /// per leaf, whole leaves only, as many as fit `max_entries` (at least
    /// one leaf).
    LeafEntries {
        /// The leaves wanted, as (partition, leaf index).
        leaves: Vec<(u32, u16)>,
        /// The most entries to answer, summed over leaves.
        max_entries: u32,
    },
    /// Anti-entropy: the states of these keys, tombstones included; the
    /// answer may stop early to stay within a frame.
    FetchStates {
        /// The keys whose states are wanted.
        keys: Vec<Vec<u8>>,
    },
    /// Anti-entropy: apply these states, highest version wins, into free
    /// memory only (repair never evicts).
    Repair {
        /// (key, state) pairs to apply.
        states: Vec<(Vec<u8>, KeyState)>,
    },
    /// Apply the result of a read-modify-write, computed on the key's state
    /// at version `base`: only if this node holds nothing past `base` (or
    /// holds one of `replaces`, the same command's abandoned attempts);
    /// otherwise it answers [`PeerResponse::Newer`] with what it holds.
    ApplyIf {
        /// The key the state belongs to.
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        /// The item or its absence, with its version.
        state: KeyState,
        /// The version the primary computed the state on (0: absent).
        base: u64,
        /// Versions of the command's earlier attempts, which the primary
        /// abandoned (at most a few).
        replaces: Vec<u64>,
    },
    /// `lk`: up to `max` live keys with hashes in `from..=to` (one
    /// partition's range or part of it), in hash order.
    ListKeys {
        /// The lowest key hash wanted.
        from: u64,
        /// The highest key hash wanted (inclusive).
        to: u64,
        /// The most keys to answer.
        max: u32,
    },
    /// The layout this node has installed, for a caller that is behind.
    /// Never refused for the caller's epoch.
    LayoutGet,
    /// Paxos phase 1 for the layout of epoch `slot` (see [`super::paxos`]).
    LayoutPrepare {
        /// The epoch being decided.
        slot: u64,
        /// The proposer's ballot.
        ballot: Ballot,
    },
    /// Paxos phase 2: accept `layout` for epoch `slot`.
    LayoutAccept {
        /// The epoch being decided.
        slot: u64,
        /// The proposer's ballot.
        ballot: Ballot,
        /// The proposed layout (its epoch is `slot`).
        layout: LayoutDesc,
    },
    /// What this node knows of layout decrees, for a node recovering from
    /// a restart.
    LayoutReport,
    /// From a node started with `--join` (its connection dialled as a
    /// joiner): make it a standby member. Answered with the layout that
    /// has it ([`PeerResponse::Layout`]) or why not
    /// ([`PeerResponse::Refused`]).
    Join {
        /// The joiner's id (the id its handshake named).
        id: NodeId,
        /// Where memcached clients reach it.
        client: String,
        /// Where the members reach it.
        peer: String,
        /// The partition count it was started with, if it named one: it
        /// must be the cluster's.
        partitions: Option<u32>,
    },
}

/// The answer to one [`PeerRequest`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum PeerResponse {
    /// Answer to [`PeerRequest::Execute`].
    Executed {
        /// The reply a client would get, raw protocol bytes.
        #[serde(with = "serde_bytes")]
        reply: Vec<u8>,
    },
    /// Per key asked, in order: `(version, VALUE block)` or `None` for a
    /// miss. May cover only a prefix of the keys, to fit a frame; the
    /// caller asks again for the rest.
    Values(#[serde(with = "answers")] Vec<Option<(u64, Vec<u8>)>>),
    /// Answer to [`PeerRequest::ReadMeta`].
    MetaRead {
        /// The version the read saw; 0: the key was absent.
        version: u64,
        /// The meta reply a client would get, raw protocol bytes.
        #[serde(with = "serde_bytes")]
        reply: Vec<u8>,
    },
    /// Answer to [`PeerRequest::Fetch`]: the key's item or tombstone;
    /// `None` when this node holds neither.
    State(Option<KeyState>),
    /// A page of a [`PeerRequest::Scan`] and where to continue (`None`: done).
    Page {
        /// (key, state) pairs, tombstones included.
        states: Vec<(Vec<u8>, KeyState)>,
        /// The cursor for the next page; `None`: the scan is done.
        next: Option<u64>,
    },
    /// The [`PeerRequest::Apply`] state was applied (or this node already
    /// held that very version), or the [`PeerRequest::Hint`] is held.
    Applied,
    /// The [`PeerRequest::Apply`] state was older than what this node holds,
    /// or the [`PeerRequest::ApplyIf`] state was computed without it: this
    /// node holds this state. Not a success for the state sent: a primary
    /// takes this state and runs its command again before the write counts
    /// toward W.
    Newer(KeyState),
    /// The [`PeerRequest::FlushAll`] was carried out (or scheduled).
    Flushed,
    /// Per tree node asked, its hash.
    Hashes(Vec<u64>),
    /// Per leaf answered (a prefix of those asked), its entries.
    Entries(Vec<Vec<KeyVersion>>),
    /// The states of the first `answered` keys asked (keys held by
    /// neither an item nor a tombstone are left out).
    States {
        /// (key, state) pairs for the answered keys this node holds.
        states: Vec<(Vec<u8>, KeyState)>,
        /// How many of the keys asked, from the first, were looked up.
        answered: u32,
    },
    /// Which of the states sent (by index) found no free memory.
    Repaired {
        /// Indexes into the states sent of those not applied for lack of
        /// free memory.
        no_room: Vec<u32>,
    },
    /// A page of [`PeerRequest::ListKeys`]: the keys, and the hash the
    /// range goes on from (`None`: done).
    Keys {
        /// Live keys in hash order.
        keys: Vec<ListedKey>,
        /// The hash to continue from; `None`: the range is done.
        next: Option<u64>,
    },
    /// The request was malformed; nothing was done.
    Refused(String),
    /// Answer to [`PeerRequest::LayoutGet`].
    Layout(LayoutDesc),
    /// Answer to [`PeerRequest::Join`]: the layout that has the joiner;
    /// `fresh`: it was added by this layout (it has never voted as a
    /// member), rather than found a member already (it restarted).
    Joined {
        /// The layout installed on the member that answered.
        layout: LayoutDesc,
        /// Whether the joiner is new in this layout.
        fresh: bool,
    },
    /// Answer to [`PeerRequest::LayoutPrepare`] and
    /// [`PeerRequest::LayoutAccept`].
    LayoutVote(Vote<LayoutDesc>),
    /// Answer to [`PeerRequest::LayoutReport`].
    LayoutReport {
        /// The epoch installed.
        installed: u64,
        /// The highest slot known ([`super::paxos::Acceptor::report`]);
        /// `None`: recovering itself.
        known: Option<u64>,
    },
    /// Answer to [`PeerRequest::TransferStatus`].
    Transfer {
        /// Whether every key this node gains in that move has been handed
        /// to it (true also when it gains none).
        done: bool,
        /// Keys and bytes handed to it so far in that move.
        keys: u64,
        /// Bytes (keys and values) handed to it so far.
        bytes: u64,
        /// The epoch this node has installed.
        epoch: u64,
        /// Whether its store holds what it replicates (not refilling after
        /// a start): a move may check what it was handed against it.
        warm: bool,
    },
    /// The request was planned under an older layout than this node's
    /// (`epoch`); nothing was done. The caller fetches the newer layout.
    StaleEpoch {
        /// This node's epoch.
        epoch: u64,
    },
}

/// [`PeerResponse::Values`] with each `VALUE` block as one byte block.
mod answers {
    use serde::{Deserialize, Deserializer, Serializer};
    use serde_bytes::{ByteBuf, Bytes};

    type Answers = Vec<Option<(u64, Vec<u8>)>>;

    pub fn serialize<S: Serializer>(answers: &Answers, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(answers.iter().map(|a| {
            a.as_ref()
                .map(|(version, block)| (version, Bytes::new(block)))
        }))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Answers, D::Error> {
        let answers: Vec<Option<(u64, ByteBuf)>> = Deserialize::deserialize(d)?;
        Ok(answers
            .into_iter()
            .map(|a| a.map(|(version, block)| (version, block.into_vec())))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Serialize;

    /// The messages as they were before their byte vectors were sent as
    /// blocks: sequences of u8.
    #[derive(Serialize)]
    enum PlainState {
        Item {
            version: u64,
            flags: u32,
            exptime: u32,
            bits: u8,
            value: Vec<u8>,
            dedup: Vec<u8>,
        },
    }

    #[derive(Serialize)]
    enum PlainResponse {
        _Executed { reply: Vec<u8> },
        Values(Vec<Option<(u64, Vec<u8>)>>),
    }

    /// Byte blocks travel exactly as the sequences they replace did
    /// (postcard writes both as a length and the bytes), so nodes of either
    /// build understand each other and the wire version stays.
    #[test]
    fn byte_blocks_keep_the_wire_format() {
        let value: Vec<u8> = (0..=255).cycle().take(1000).collect();
        let state = KeyState::Item {
            version: 7,
            flags: 9,
            exptime: 11,
            bits: 1,
            value: value.clone(),
            dedup: b"records".to_vec(),
        };
        let plain = PlainState::Item {
            version: 7,
            flags: 9,
            exptime: 11,
            bits: 1,
            value: value.clone(),
            dedup: b"records".to_vec(),
        };
        let bytes = postcard::to_allocvec(&state).unwrap();
        assert_eq!(bytes, postcard::to_allocvec(&plain).unwrap());
        assert_eq!(postcard::from_bytes::<KeyState>(&bytes).unwrap(), state);
        let answers = vec![Some((3, value)), None];
        let values = PeerResponse::Values(answers.clone());
        let bytes = postcard::to_allocvec(&values).unwrap();
        assert_eq!(
            bytes,
            postcard::to_allocvec(&PlainResponse::Values(answers.clone())).unwrap()
        );
        match postcard::from_bytes::<PeerResponse>(&bytes).unwrap() {
            PeerResponse::Values(back) => assert_eq!(back, answers),
            other => panic!("{other:?}"),
        }
    }
}
