#![warn(missing_docs)]
//! webvac: a sharded, replicated, in-memory key-value cache that speaks the
//! memcached text and meta protocols.
//!
//! ```text
//! bin/webvac (server) · bin/webvac-bench (load) · examples/ (embedded)
//!         │
//! server/ (TCP, connections)      client/ (pool, routing, retries)
//!         │                               │
//! cluster/ (ring, coordinator, replication, repair, transport)
//!         │
//! store/ (lock-sharded map, memory accounting, eviction, expiry, versions)
//!         │
//! protocol/ (memcached text + meta: parse / compose, no I/O)
//! ```
//!
//! This release is the single-node foundation: [`protocol`], [`store`] and
//! [`server`]. A service can also embed the [`store::Store`] directly:
//!
//! ```
//! use std::sync::Arc;
//! use webvac::store::{Mode, Store, StoreConfig, Stored, SystemClock, Write};
//!
//! let store = Store::new(
//!     &StoreConfig { memory_limit_bytes: 64 << 20, item_bytes_max: 1 << 20, ..StoreConfig::default() },
//!     Arc::new(SystemClock),
//! );
//! // set with a 300-second TTL (memcached exptime rules)
//! assert!(matches!(store.write(&Write::new(Mode::Set, b"user:1", b"alice", 0, 300)), Stored::Stored(_)));
//! // read: the closure runs under the shard lock, so copy what you need
//! assert_eq!(store.get(b"user:1", None, |item| item.value().to_vec()), Some(b"alice".to_vec()));
//! // compare-and-swap with the CAS from a read
//! let cas = store.get(b"user:1", None, |item| item.cas()).unwrap();
//! let mut w = Write::new(Mode::Set, b"user:1", b"bob", 0, 300);
//! w.compare_cas = Some(cas);
//! assert!(matches!(store.write(&w), Stored::Stored(_)));
//! w.value = b"carol"; // the CAS is stale now
//! assert_eq!(store.write(&w), Stored::Exists);
//! ```

pub mod budget;
pub mod client;
pub mod cluster;
pub mod config;
pub mod error;
pub mod limits;
pub mod log_limit;
pub mod node;
pub mod protocol;
pub mod server;
pub mod store;

pub use node::{Node, NodeBuilder};
