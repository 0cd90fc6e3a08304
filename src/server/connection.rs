//! One client connection: the only code here that touches a client socket.
//!
//! Read, parse every complete request in the buffer, execute them in order,
//! and write all their replies with as few writes as possible. Bounds:
//! the input buffer never holds more than one maximum-size request plus one
//! read; replies are flushed whenever [`WRITE_FLUSH_BYTES`] are pending (also
//! inside a long multi-get), so a client that sends without reading stalls
//! only itself, through TCP backpressure. Two optional timeouts close a
//! connection: `idle_timeout_secs` while it waits for a command (memcached's
//! `-o idle_timeout`), and `data_timeout_secs` while it holds in-flight
//! memory for a data block and sends nothing, so a sender that stops cannot
//! keep the shared budget.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::WriteHalf;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{debug, trace, warn};

use super::Shared;
use super::execute::{self, Action};
use super::faults::{Fault, Faults};
use crate::budget::{INFLIGHT_FREE_BYTES, Reservation};
use crate::limits::{
    MULTIGET_LINE_BYTES_MAX, PREFETCH_KEYS, READ_CHUNK_BYTES, REQUESTS_PER_BATCH_MAX,
    WRITE_FLUSH_BYTES,
};
use crate::protocol::{ParseLimits, Parsed, Request, incomplete_bytes_max, parse};

/// Buffers larger than this are given back once empty.
const IDLE_BUFFER_BYTES: usize = 64 * 1024;

/// What a connection holds of the in-flight budget: for the request whose
/// data is arriving, and for the replies not yet written.
struct Held {
    request: Reservation,
    reply: Reservation,
}

/// Decrements the connection count however the task ends.
struct Registered {
    shared: Arc<Shared>,
    _done: mpsc::Sender<()>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.shared.stats.curr_connections.fetch_sub(1, Relaxed);
    }
}

/// Serves one client connection until the client leaves, the protocol says
/// close, or `stop` turns true (then it finishes the requests it has read
/// and returns). The caller has counted the connection in
/// `curr_connections`; this uncounts it and drops `done` when it ends, so
/// shutdown can wait for every connection.
pub async fn serve(
    mut stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
    done: mpsc::Sender<()>,
) {
    let _registered = Registered {
        shared: shared.clone(),
        _done: done,
    };
    let _ = stream.set_nodelay(true);
    debug!(peer = %peer, "connection opened");
    match run(&mut stream, &shared, &mut stop).await {
        Ok(()) => debug!(peer = %peer, "connection closed"),
        Err(e) => debug!(peer = %peer, error = %e, "connection ended with an error"),
    }
}

async fn run(
    stream: &mut TcpStream,
    shared: &Shared,
    stop: &mut watch::Receiver<bool>,
) -> std::io::Result<()> {
    let (mut rd, mut wr) = stream.split();
    let mut inbuf = BytesMut::with_capacity(READ_CHUNK_BYTES);
    let mut out: Vec<u8> = Vec::new();
    let mut swallow = 0usize;
    let mut budget = Held {
        request: Reservation::new(&shared.inflight),
        reply: Reservation::new(&shared.inflight),
    };
    let input_max = incomplete_bytes_max(&shared.limits);
    // One registration with the stop signal for the connection's life:
    // building a fresh `changed()` future on every read took the signal's
    // lock twice per request.
    let mut watcher = stop.clone();
    let mut stopped = std::pin::pin!(watcher.changed());
    let secs = |s: u32| (s > 0).then(|| Duration::from_secs(u64::from(s)));
    let idle = secs(shared.facts.idle_timeout_secs);
    let data = secs(shared.facts.data_timeout_secs);
    // When the last complete command arrived; kept only with an idle timeout.
    let mut last_command = idle.map(|_| Instant::now());
    loop {
        let close = process(
            shared,
            &mut inbuf,
            &mut out,
            &mut swallow,
            &mut budget,
            &mut wr,
            last_command.as_mut(),
        )
        .await?;
        flush(shared, &mut wr, &mut out, &mut budget.reply).await?;
        if close || *stop.borrow() {
            return Ok(());
        }
        if inbuf.len() >= input_max {
            // The parser's bounds make this unreachable; if a bug ever makes
            // it reachable, drop this client rather than grow.
            warn!(
                buffered = inbuf.len(),
                limit = input_max,
                "input buffer over its bound; closing connection"
            );
            debug_assert!(false, "parser left {} bytes unconsumed", inbuf.len());
            return Ok(());
        }
        if inbuf.is_empty() && inbuf.capacity() > IDLE_BUFFER_BYTES {
            inbuf = BytesMut::with_capacity(READ_CHUNK_BYTES);
        }
        if out.capacity() > IDLE_BUFFER_BYTES {
            out = Vec::new();
        }
        // Grow only when little room is left: a request part-way in keeps
        // the buffer it arrived in.
        if inbuf.capacity() - inbuf.len() < READ_CHUNK_BYTES / 4 {
            inbuf.reserve(READ_CHUNK_BYTES);
        }
        // Mid-way through a data block holding in-flight memory: the data
        // timeout, from now (any byte resets it). Otherwise the idle
        // timeout, from the last command.
        let (deadline, kicks) = if budget.request.bytes() > 0 {
            (
                data.map(|d| Instant::now() + d),
                &shared.stats.data_timeouts,
            )
        } else {
            (
                idle.zip(last_command).map(|(i, last)| last + i),
                &shared.stats.idle_kicks,
            )
        };
        let n = tokio::select! {
            // Reading first means a ready socket never touches the signal.
            biased;
            read = rd.read_buf(&mut inbuf) => read?,
            _ = &mut stopped => return Ok(()),
            () = async { tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)).await },
                if deadline.is_some() =>
            {
                kicks.fetch_add(1, Relaxed);
                debug!(buffered = inbuf.len(), "connection timed out; closing it");
                return Ok(());
            }
        };
        if n == 0 {
            // EOF, possibly a half-close: everything complete was answered.
            return Ok(());
        }
        shared.stats.bytes_read.fetch_add(n as u64, Relaxed);
    }
}

/// Writes the pending replies and gives back what they held of the budget.
/// A reply that holds budget and that the client does not read for
/// `data_timeout_secs` ends the connection (an error), so a client that
/// never reads cannot keep the budget.
async fn flush(
    shared: &Shared,
    wr: &mut WriteHalf<'_>,
    out: &mut Vec<u8>,
    held: &mut Reservation,
) -> std::io::Result<()> {
    if out.is_empty() {
        return Ok(());
    }
    // The common case, without a timer: the socket takes it all now.
    let sent = match wr.try_write(out) {
        Ok(n) => n,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => 0,
        Err(e) => return Err(e),
    };
    if sent < out.len() {
        let rest = &out[sent..];
        let timeout = shared.facts.data_timeout_secs;
        if held.bytes() > 0 && timeout > 0 {
            let limit = Duration::from_secs(u64::from(timeout));
            if tokio::time::timeout(limit, wr.write_all(rest))
                .await
                .is_err()
            {
                shared.stats.data_timeouts.fetch_add(1, Relaxed);
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the client did not read a reply holding in-flight memory",
                ));
            }
        } else {
            wr.write_all(rest).await?;
        }
    }
    shared
        .stats
        .bytes_written
        .fetch_add(out.len() as u64, Relaxed);
    out.clear();
    held.clear();
    Ok(())
}

/// Holds the pending replies' bytes past [`INFLIGHT_FREE_BYTES`] in the
/// budget. If there is no room, the reply from `reply_at` on is replaced by
/// memcached's out-of-memory answer and false returned.
fn hold_reply(out: &mut Vec<u8>, reply_at: usize, held: &mut Reservation, get: bool) -> bool {
    if out.len() <= INFLIGHT_FREE_BYTES || held.hold(out.len() - INFLIGHT_FREE_BYTES) {
        return true;
    }
    out.truncate(reply_at);
    out.extend_from_slice(if get {
        b"SERVER_ERROR out of memory writing get response\r\n"
    } else {
        b"SERVER_ERROR out of memory writing response\r\n"
    });
    false
}

/// Executes every complete request in `inbuf`. Returns true to close.
async fn process(
    shared: &Shared,
    inbuf: &mut BytesMut,
    out: &mut Vec<u8>,
    swallow: &mut usize,
    budget: &mut Held,
    wr: &mut WriteHalf<'_>,
    mut last_command: Option<&mut Instant>,
) -> std::io::Result<bool> {
    let Held {
        request: reservation,
        reply: held,
    } = budget;
    let mut executed = 0;
    loop {
        if *swallow > 0 {
            let n = (*swallow).min(inbuf.len());
            inbuf.advance(n);
            *swallow -= n;
            if *swallow > 0 {
                return Ok(false);
            }
        }
        if inbuf.is_empty() {
            return Ok(false);
        }
        let (action, consumed) = match parse(&inbuf[..], &shared.limits) {
            Parsed::Incomplete => {
                if inbuf.len() <= INFLIGHT_FREE_BYTES || reservation.bytes() > 0 {
                    return Ok(false);
                }
                // A large request is arriving: parsing it as if there were no
                // room tells us whether it is a data block and how big.
                let no_room = ParseLimits {
                    data_bytes_max: 0,
                    ..shared.limits
                };
                let Parsed::Complete { request, consumed } = parse(&inbuf[..], &no_room) else {
                    // A long line still arriving (a multi-get): bounded by
                    // the parser, and held to the budget like a data block,
                    // so connections that never finish one cannot hold
                    // memory the budget does not see (and the data timeout
                    // closes them).
                    if reservation.reserve(MULTIGET_LINE_BYTES_MAX + 1) {
                        return Ok(false);
                    }
                    debug!(
                        buffered = inbuf.len(),
                        inflight = shared.inflight.used(),
                        "no in-flight memory for a long request line; closing"
                    );
                    out.extend_from_slice(b"SERVER_ERROR out of memory reading request\r\n");
                    return Ok(true);
                };
                let Some(frame_bytes) = request.refused_frame_bytes(consumed) else {
                    return Ok(false);
                };
                if reservation.reserve(frame_bytes) {
                    return Ok(false); // room held: wait for the rest of the data
                }
                debug!(
                    frame_bytes,
                    inflight = shared.inflight.used(),
                    "no in-flight memory for a request; refusing it"
                );
                match &shared.cluster {
                    // A refused set drops the key's old value on every
                    // replica, through its primary.
                    Some(cluster) if !cluster.is_local(&request) => {
                        cluster
                            .coordinate(shared, &request, &inbuf[..consumed], out)
                            .await;
                        let swallow = request.refused().map_or(0, |r| r.swallow());
                        (Action::Swallow(swallow), consumed)
                    }
                    _ => (execute::execute(shared, request, out), consumed),
                }
            }
            Parsed::Complete { request, consumed } => {
                reservation.clear();
                if let Some(last) = last_command.as_deref_mut() {
                    *last = Instant::now();
                }
                trace!(?request, "request");
                let fault = shared.faults.as_ref().map_or(Fault::None, Faults::next);
                match fault {
                    Fault::DropRequest => {
                        inbuf.advance(consumed);
                        continue;
                    }
                    Fault::Delay(d) => {
                        flush(shared, wr, out, held).await?;
                        tokio::time::sleep(d).await;
                    }
                    Fault::None | Fault::DropReply => {}
                }
                // A dropped reply is cut from the output after it is
                // composed (one that outgrew a flush is cut short instead).
                let reply_at = out.len();
                let drop_reply = |out: &mut Vec<u8>| {
                    if fault == Fault::DropReply {
                        out.truncate(reply_at.min(out.len()));
                    }
                };
                if let Some(cluster) = &shared.cluster {
                    if !cluster.is_local(&request) {
                        cluster
                            .coordinate(shared, &request, &inbuf[..consumed], out)
                            .await;
                        drop_reply(out);
                        let get = matches!(request, Request::Get(_));
                        hold_reply(out, reply_at, held, get);
                        // A refused store's data block follows its line.
                        let refused = request.refused();
                        inbuf.advance(consumed);
                        if let Some(refused) = refused {
                            *swallow = refused.swallow();
                        }
                        if out.len() >= WRITE_FLUSH_BYTES {
                            flush(shared, wr, out, held).await?;
                        }
                        continue;
                    }
                }
                let action = match request {
                    Request::Get(get) => {
                        let mut ahead = get.keys();
                        let multi = get.keys().nth(1).is_some();
                        let mut refused = false;
                        for (i, key) in get.keys().enumerate() {
                            if multi && i % PREFETCH_KEYS == 0 {
                                let mut batch: [&[u8]; PREFETCH_KEYS] = [&[]; PREFETCH_KEYS];
                                let n = batch
                                    .iter_mut()
                                    .zip(ahead.by_ref())
                                    .map(|(b, k)| *b = k)
                                    .count();
                                shared.store.prefetch(&batch[..n]);
                            }
                            let key_at = out.len();
                            execute::get_key(shared, &get, key, out);
                            if !hold_reply(out, key_at, held, true) {
                                // memcached ends the reply with the error.
                                refused = true;
                                break;
                            }
                            if out.len() >= WRITE_FLUSH_BYTES {
                                flush(shared, wr, out, held).await?;
                            }
                        }
                        if !refused {
                            execute::get_end(&get, out);
                        }
                        Action::Continue
                    }
                    Request::ListKeys(l) => {
                        // In pieces, letting other connections run between
                        // them; each piece holds its reply bytes, and one
                        // refused ends the reply with the error.
                        let mut at = execute::list_keys_start(shared, l.token, l.count, out);
                        while let Some(piece) = at {
                            let piece_at = out.len();
                            at = execute::list_keys_piece(shared, piece, out);
                            if !hold_reply(out, piece_at, held, false) {
                                break;
                            }
                            if at.is_some() {
                                if out.len() >= WRITE_FLUSH_BYTES {
                                    flush(shared, wr, out, held).await?;
                                }
                                tokio::task::yield_now().await;
                            }
                        }
                        // A page costs as much as a batch of small requests.
                        executed = REQUESTS_PER_BATCH_MAX;
                        Action::Continue
                    }
                    other => {
                        let action = execute::execute(shared, other, out);
                        hold_reply(out, reply_at, held, false);
                        action
                    }
                };
                drop_reply(out);
                (action, consumed)
            }
        };
        debug_assert!(consumed > 0 && consumed <= inbuf.len());
        inbuf.advance(consumed);
        match action {
            Action::Continue => {}
            Action::Swallow(n) => *swallow = n,
            Action::Close => return Ok(true),
        }
        if out.len() >= WRITE_FLUSH_BYTES {
            flush(shared, wr, out, held).await?;
        }
        executed = executed.saturating_add(1);
        if executed >= REQUESTS_PER_BATCH_MAX {
            // Let other connections on this worker run.
            flush(shared, wr, out, held).await?;
            tokio::task::yield_now().await;
            executed = 0;
        }
    }
}
