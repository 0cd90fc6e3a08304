//! Executes parsed requests against the store and composes the replies.
//! No sockets here: a request and a buffer in, reply bytes and an action out.

use std::sync::atomic::Ordering::Relaxed;

use super::Shared;
use super::stats::{compose_general, compose_settings};
use crate::limits::{LIST_KEYS_PER_PIECE, VERBOSITY_MAX};
use crate::protocol::get::{Get, compose_end, compose_value};
use crate::protocol::list_keys;
use crate::protocol::stats::StatsCmd;
use crate::protocol::{Refused, Request, put_line, put_u64, reply};
use crate::store::{Arith, Delta, Mode, Stored, Write};

/// What the connection does after a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Read the next request.
    Continue,
    /// Discard this many bytes of input (a rejected data block), then continue.
    Swallow(usize),
    /// Close the connection (after flushing replies).
    Close,
}

/// One key of a get-family request. The connection calls this per key so it
/// can flush a long multi-get's replies as it goes.
#[inline]
pub fn get_key(shared: &Shared, get: &Get<'_>, key: &[u8], out: &mut Vec<u8>) {
    if get.fails_after_keys {
        // Fetched for its side effects only; the reply is the error.
        shared.store.get(key, get.touch, |_| ());
        return;
    }
    let with_cas = get.with_cas;
    shared.store.get(key, get.touch, |e| {
        compose_value(out, key, e.flags(), e.value(), with_cas.then_some(e.cas()));
    });
}

/// Ends a get-family reply after its keys: `END` (none yet for a piece of
/// a long line that continues), or the error line when a key in the list
/// was too long.
pub fn get_end(get: &Get<'_>, out: &mut Vec<u8>) {
    if get.fails_after_keys {
        put_line(out, reply::BAD_FORMAT.as_bytes());
    } else if !get.continues {
        compose_end(out);
    }
}

/// A request the node's settings refuse whatever it says: `flush_all`
/// under memcached's `-F`. Answers it (unless `noreply`) and returns true.
pub fn refused_by_settings(shared: &Shared, request: &Request<'_>, out: &mut Vec<u8>) -> bool {
    match request {
        Request::FlushAll(f) if !shared.facts.flush_enabled => {
            if !f.noreply {
                put_line(out, reply::FLUSH_DISABLED.as_bytes());
            }
            true
        }
        _ => false,
    }
}

/// Executes every request but the get family and meta commands.
pub fn execute(shared: &Shared, request: Request<'_>, out: &mut Vec<u8>) -> Action {
    match request {
        Request::ListKeys(l) => list_keys(shared, l.token, l.count, out),
        Request::Get(get) => {
            for key in get.keys() {
                get_key(shared, &get, key, out);
            }
            get_end(&get, out);
        }
        Request::Storage(s) => {
            if let Some(refused) = s.refused {
                let too_large = matches!(refused, Refused::TooLarge { .. });
                shared
                    .store
                    .reject_write(s.key, s.mode == Mode::Set && s.cas.is_none(), too_large);
                if !s.noreply {
                    put_line(out, refused.reply().as_bytes());
                }
                return Action::Swallow(refused.swallow());
            }
            let mut w = Write::new(s.mode, s.key, s.data, s.flags, s.exptime);
            w.compare_cas = s.cas;
            let result = shared.store.write(&w);
            if !s.noreply {
                put_line(out, stored_reply(result).as_bytes());
            }
        }
        Request::Arith(a) => {
            let result = shared.store.arith(&Arith {
                key: a.key,
                incr: a.incr,
                delta: a.delta,
                compare_cas: None,
            });
            if !a.noreply {
                match result {
                    Delta::Value(v, _, _) => {
                        put_u64(out, v);
                        out.extend_from_slice(b"\r\n");
                    }
                    Delta::NotFound => put_line(out, b"NOT_FOUND"),
                    Delta::NonNumeric => put_line(out, reply::NON_NUMERIC.as_bytes()),
                    Delta::NoMemory => put_line(out, reply::NO_MEMORY.as_bytes()),
                    Delta::Exists => put_line(out, b"EXISTS"),
                }
            }
        }
        Request::Delete(d) => {
            let found = shared.store.delete(d.key, None).is_ok();
            if !d.noreply {
                put_line(out, if found { b"DELETED" } else { b"NOT_FOUND" });
            }
        }
        Request::Touch(t) => {
            let found = shared.store.touch(t.key, t.exptime);
            if !t.noreply {
                put_line(out, if found { b"TOUCHED" } else { b"NOT_FOUND" });
            }
        }
        Request::FlushAll(f) => {
            shared.stats.cmd_flush.fetch_add(1, Relaxed);
            shared.store.flush_all(f.delay);
            if !f.noreply {
                put_line(out, b"OK");
            }
        }
        Request::Stats(cmd) => stats(shared, cmd, out),
        // Runs on a cluster member's coordinator; a single node does not
        // know the command.
        Request::Cluster(_) => put_line(out, reply::ERROR.as_bytes()),
        Request::Fault(cmd) => {
            shared
                .fault_control
                .execute(cmd, shared.cluster.as_deref(), out);
        }
        Request::Version => {
            out.extend_from_slice(b"VERSION ");
            put_line(out, shared.facts.version.as_bytes());
        }
        Request::Verbosity(v) => {
            shared
                .stats
                .verbosity
                .store(u64::from(v.level.min(VERBOSITY_MAX)), Relaxed);
            if !v.noreply {
                put_line(out, b"OK");
            }
        }
        Request::RefreshCerts { noreply } => match shared.refresh_certs() {
            Ok(()) => {
                if !noreply {
                    put_line(out, b"OK");
                }
            }
            // memcached writes the error whatever noreply says.
            Err(e) => put_line(out, e.as_bytes()),
        },
        Request::Quit | Request::Close => return Action::Close,
        Request::Shutdown { mode_valid } => {
            if !shared.facts.shutdown_command {
                put_line(out, reply::SHUTDOWN_DISABLED.as_bytes());
            } else if !mode_valid {
                put_line(out, reply::SHUTDOWN_BAD_MODE.as_bytes());
            } else {
                shared.shutdown_requested.notify_one();
                return Action::Close;
            }
        }
        Request::Meta(m) => return super::meta::execute(shared, m, out),
        Request::Error {
            reply,
            noreply,
            swallow,
        } => {
            if !noreply {
                put_line(out, reply.as_bytes());
            }
            if swallow > 0 {
                return Action::Swallow(swallow);
            }
        }
    }
    Action::Continue
}

/// memcached's reply for a store outcome.
pub fn stored_reply(result: Stored) -> &'static str {
    match result {
        Stored::Stored(_) => "STORED",
        Stored::NotStored => "NOT_STORED",
        Stored::Exists => "EXISTS",
        Stored::NotFound => "NOT_FOUND",
        Stored::TooLarge => reply::TOO_LARGE,
        Stored::NoMemory => reply::NO_MEMORY_STORING,
    }
}

fn stats(shared: &Shared, cmd: StatsCmd<'_>, out: &mut Vec<u8>) {
    let now = shared.store.clock().now_secs();
    match cmd {
        StatsCmd::General => {
            compose_general(
                out,
                &shared.facts,
                &shared.stats,
                &shared.store.stats(),
                now,
                &shared.inflight,
                shared.tls.as_ref(),
            );
            shared
                .fault_control
                .compose_stats(shared.cluster.as_deref(), out);
            put_line(out, b"END");
        }
        StatsCmd::Settings => compose_settings(
            out,
            &shared.facts,
            &shared.stats,
            shared.store.limit_bytes(),
        ),
        StatsCmd::Reset => {
            shared.store.reset_stats();
            shared.stats.reset();
            put_line(out, b"RESET");
        }
        // webvac has no slab classes; these report nothing, as an empty
        // memcached does, so tools that poll them keep working.
        StatsCmd::Conns => {
            shared.conns.compose(shared.store.clock().now_secs(), out);
            put_line(out, b"END");
        }
        StatsCmd::Items | StatsCmd::Sizes => put_line(out, b"END"),
        StatsCmd::Slabs => {
            // memcached's `total_malloced` is the memory its items occupy,
            // in the 1 MiB slab pages it takes: webvac's item memory, in
            // the same pages. (memcached's t/issue_14.t checks that
            // expired items' memory is reused: replaced by as many new
            // items, the figure must not grow. Counted in bytes, it grew
            // by the new keys' extra bytes.)
            let st = shared.store.stats();
            let page = crate::limits::MEMCACHED_SLAB_PAGE_BYTES;
            let malloced = st.bytes.div_ceil(page) * page;
            crate::protocol::stats::put_stat(out, "active_slabs", 0);
            crate::protocol::stats::put_stat(out, "total_malloced", malloced);
            put_line(out, b"END");
        }
        StatsCmd::Group(_) => put_line(out, reply::ERROR.as_bytes()),
    }
}

/// `lk` on a single node: walks of its own store from the token's
/// position, in pieces (a cluster member lists through its coordinator
/// instead).
fn list_keys(shared: &Shared, token: &[u8], count: usize, out: &mut Vec<u8>) {
    let mut at = list_keys_start(shared, token, count, out);
    while let Some(piece) = at {
        at = list_keys_piece(shared, piece, out);
    }
}

/// Where an `lk` page goes on: from a key hash, with keys still to list.
#[derive(Clone, Copy, Debug)]
pub struct Listing {
    from: u64,
    left: usize,
}

/// Starts an `lk` page of `count` keys from `token`'s position; `None`
/// once the reply is complete (a bad token).
pub fn list_keys_start(
    shared: &Shared,
    token: &[u8],
    count: usize,
    out: &mut Vec<u8>,
) -> Option<Listing> {
    let Some(from) = shared.listing_key.decode(token) else {
        put_line(out, list_keys::BAD_TOKEN.as_bytes());
        return None;
    };
    Some(Listing { from, left: count })
}

/// Lists the next piece of a page, at most [`LIST_KEYS_PER_PIECE`] keys,
/// so a connection can let others run between pieces; `None` once the
/// reply is complete. A piece the store ends early (a sparse table) ends
/// the page too, so one call walks at most one bucket budget past the
/// keys it returns.
pub fn list_keys_piece(shared: &Shared, at: Listing, out: &mut Vec<u8>) -> Option<Listing> {
    let asked = at.left.min(LIST_KEYS_PER_PIECE);
    let page = shared.store.list_keys(at.from, u64::MAX, asked);
    for k in &page.keys {
        list_keys::put_key(out, &k.key, k.binary);
    }
    let left = at.left - page.keys.len();
    match page.next {
        Some(from) if left > 0 && page.keys.len() == asked => Some(Listing { from, left }),
        next => {
            let next = next.map(|n| shared.listing_key.encode(n));
            list_keys::put_end(out, next.as_deref().map(str::as_bytes));
            None
        }
    }
}
