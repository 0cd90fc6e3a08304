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
//!     &StoreConfig { memory_limit_bytes: 64 << 20, item_bytes_max: 1 << 20, node_id: 0 },
//!     Arc::new(SystemClock),
//! );
//! assert!(matches!(store.write(&Write::new(Mode::Set, b"k", b"v", 0, 0)), Stored::Stored(_)));
//! assert_eq!(store.get(b"k", None, |e| e.value().to_vec()), Some(b"v".to_vec()));
//! ```

pub mod config;
pub mod error;
pub mod limits;
pub mod protocol;
pub mod server;
pub mod store;
