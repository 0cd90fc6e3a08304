//! The cluster layer: placement (ring), coordinator, replication, repair and
//! transport. Distributed logic here is sans-IO: state machines that take
//! messages and `now` and return messages; tokio tasks only move them.

pub mod anti_entropy;
pub mod coordinator;
pub mod hints;
pub mod layout;
pub mod listing;
pub mod message;
pub mod paxos;
pub mod quorum;
pub mod ring;
pub mod transport;
