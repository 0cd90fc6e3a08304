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

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{debug, trace, warn};

use super::conns::{Conn, State};
use super::execute::{self, Action};
use super::faults::{Fault, Faults};
use super::{Shared, ascii_auth};
use crate::budget::{INFLIGHT_FREE_BYTES, Reservation};
use crate::limits::{
    GET_KEYS_PER_TURN, GET_LINE_WHOLE_BYTES_MAX, INFLIGHT_WAIT_MAX, PREFETCH_KEYS,
    READ_CHUNK_BYTES, WRITE_FLUSH_BYTES,
};
use crate::protocol::get::{LongGet, Step};
use crate::protocol::{ParseLimits, Parsed, Request, incomplete_bytes_max, parse, put_line, reply};

/// Buffers larger than this are given back once empty.
const IDLE_BUFFER_BYTES: usize = 64 * 1024;

/// What a connection holds of the in-flight budget: for the request whose
/// data is arriving, and for the replies not yet written.
struct Held {
    request: Reservation,
    reply: Reservation,
}

/// A client connection's socket: TCP, or a unix socket (memcached's `-s`).
pub trait ClientSocket: Send + 'static {
    /// Its reading half.
    type Read<'a>: AsyncRead + Unpin + Send
    where
        Self: 'a;
    /// Its writing half.
    type Write<'a>: ClientWrite + Send + Sync
    where
        Self: 'a;
    /// The two halves, borrowed.
    fn split(&mut self) -> (Self::Read<'_>, Self::Write<'_>);
    /// Sets `TCP_NODELAY` where there is such a thing.
    fn no_delay(&self);
    /// Its descriptor (`stats conns` names connections by it).
    fn fd(&self) -> i32;
    /// Ends the session before the socket closes (TLS: `close_notify`).
    fn close(&mut self) -> impl Future<Output = ()> + Send {
        std::future::ready(())
    }
}

/// The writing half of a [`ClientSocket`]: writes that never wait, and a
/// wait until one would not.
pub trait ClientWrite: AsyncWrite + Unpin {
    /// Writes what the socket takes now.
    fn try_write(&self, buf: &[u8]) -> std::io::Result<usize>;
    /// Until the socket takes more.
    fn writable(&self) -> impl Future<Output = std::io::Result<()>> + Send;
    /// Whether bytes it took are still waiting to reach the socket (TLS
    /// records encrypted and not yet written); [`Self::writable`] waits
    /// until they have.
    fn holds_output(&self) -> bool {
        false
    }
}

impl ClientSocket for TcpStream {
    type Read<'a> = tokio::net::tcp::ReadHalf<'a>;
    type Write<'a> = tokio::net::tcp::WriteHalf<'a>;
    fn split(&mut self) -> (Self::Read<'_>, Self::Write<'_>) {
        TcpStream::split(self)
    }
    fn no_delay(&self) {
        let _ = self.set_nodelay(true);
    }
    fn fd(&self) -> i32 {
        std::os::fd::AsRawFd::as_raw_fd(self)
    }
    fn close(&mut self) -> impl Future<Output = ()> + Send {
        linger(self)
    }
}

impl ClientWrite for tokio::net::tcp::WriteHalf<'_> {
    fn try_write(&self, buf: &[u8]) -> std::io::Result<usize> {
        tokio::net::tcp::WriteHalf::try_write(self, buf)
    }
    fn writable(&self) -> impl Future<Output = std::io::Result<()>> + Send {
        tokio::net::tcp::WriteHalf::writable(self)
    }
}

impl ClientSocket for UnixStream {
    type Read<'a> = tokio::net::unix::ReadHalf<'a>;
    type Write<'a> = tokio::net::unix::WriteHalf<'a>;
    fn split(&mut self) -> (Self::Read<'_>, Self::Write<'_>) {
        UnixStream::split(self)
    }
    fn no_delay(&self) {}
    fn fd(&self) -> i32 {
        std::os::fd::AsRawFd::as_raw_fd(self)
    }
    fn close(&mut self) -> impl Future<Output = ()> + Send {
        linger(self)
    }
}

impl ClientWrite for tokio::net::unix::WriteHalf<'_> {
    fn try_write(&self, buf: &[u8]) -> std::io::Result<usize> {
        tokio::net::unix::WriteHalf::try_write(self, buf)
    }
    fn writable(&self) -> impl Future<Output = std::io::Result<()>> + Send {
        tokio::net::unix::WriteHalf::writable(self)
    }
}

/// Longest a closing connection drains what its client still sends.
const LINGER_MAX: Duration = Duration::from_secs(1);
/// A closing connection stops draining after its client is quiet this long.
const LINGER_QUIET: Duration = Duration::from_millis(100);
/// Most a closing connection drains.
const LINGER_BYTES_MAX: usize = 1024 * 1024;

/// Closes the writing side (the last reply is followed by FIN), then reads
/// and drops what the client still sends, briefly: closing a socket with
/// unread input resets the connection, and a reset can destroy the last
/// reply (a refusal, say) before the client reads it.
async fn linger<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) {
    if s.shutdown().await.is_err() {
        return;
    }
    let deadline = Instant::now() + LINGER_MAX;
    let mut buf = [0u8; 4096];
    let mut drained = 0;
    while drained < LINGER_BYTES_MAX {
        let wait = deadline.min(Instant::now() + LINGER_QUIET);
        match tokio::time::timeout_at(wait, s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => drained += n,
            _ => return,
        }
    }
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
pub async fn serve<S: ClientSocket>(
    stream: S,
    peer: String,
    shared: Arc<Shared>,
    stop: watch::Receiver<bool>,
    done: mpsc::Sender<()>,
) {
    let registered = Registered {
        shared: shared.clone(),
        _done: done,
    };
    serve_registered(stream, peer, &shared, stop, registered).await;
}

/// [`serve`] for a TCP connection on a TLS port: first the handshake
/// (bounded by its timeout and by shutdown), then the connection.
pub async fn serve_tls(
    tcp: TcpStream,
    peer: String,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
    done: mpsc::Sender<()>,
) {
    let registered = Registered {
        shared: shared.clone(),
        _done: done,
    };
    let Some(tls) = &shared.tls else {
        return;
    };
    let stream = tokio::select! {
        stream = tls.accept(tcp, shared.facts.idle_timeout_secs) => stream,
        _ = stop.changed() => None,
    };
    if let Some(stream) = stream {
        serve_registered(stream, peer, &shared, stop, registered).await;
    }
}

async fn serve_registered<S: ClientSocket>(
    mut stream: S,
    peer: String,
    shared: &Shared,
    mut stop: watch::Receiver<bool>,
    _registered: Registered,
) {
    stream.no_delay();
    debug!(peer = %peer, "connection opened");
    let now = shared.store.clock().now_secs();
    let registration = shared.conns.register(stream.fd(), peer.clone(), now);
    match run(&mut stream, shared, &registration.conn, &mut stop).await {
        Ok(()) => debug!(peer = %peer, "connection closed"),
        Err(e) => debug!(peer = %peer, error = %e, "connection ended with an error"),
    }
    stream.close().await;
}

async fn run<S: ClientSocket>(
    stream: &mut S,
    shared: &Shared,
    conn: &Conn,
    stop: &mut watch::Receiver<bool>,
) -> std::io::Result<()> {
    let (mut rd, mut wr) = stream.split();
    let mut inbuf = BytesMut::with_capacity(READ_CHUNK_BYTES);
    let mut out = Output::default();
    let mut swallow = 0usize;
    // A get line too long to parse whole, being served as it arrives.
    let mut long: Option<LongGet> = None;
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
    // `-Y`: nothing but an authentication until one succeeds.
    let mut authenticated = shared.ascii_auth.is_none();
    loop {
        // Whether the input buffer's allocation is large (a long line or a
        // large value came through it): measured before `process` takes
        // bytes off its front, which hides them from `capacity`.
        let big_buffer = inbuf.capacity() > IDLE_BUFFER_BYTES;
        let close = process(
            shared,
            &mut inbuf,
            &mut out,
            &mut swallow,
            &mut long,
            &mut budget,
            &mut wr,
            last_command.as_mut(),
            &mut authenticated,
        )
        .await?;
        if long.is_some() {
            flush_now(shared, &mut wr, &mut out, &mut budget.reply)?;
        } else {
            if out.unsent() > 0 {
                conn.set_state(State::Writing);
            }
            flush(shared, &mut wr, &mut out, &mut budget.reply).await?;
        }
        conn.set_state(if inbuf.is_empty() {
            State::Waiting
        } else {
            State::Reading
        });
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
        // A large allocation with little left in it (the end of a long
        // line or a large value, the start of the next request) goes back:
        // a client that stops there must not keep it beside the budget.
        if big_buffer && inbuf.len() < READ_CHUNK_BYTES {
            let mut fresh = BytesMut::with_capacity(READ_CHUNK_BYTES);
            fresh.extend_from_slice(&inbuf);
            inbuf = fresh;
        }
        // A long line part-way holds what its buffer now is past a read,
        // not what the buffer of its last piece was.
        if long.is_some() {
            let need = inbuf.capacity().saturating_sub(READ_CHUNK_BYTES);
            if need < budget.request.bytes() {
                budget.request.hold_exactly(need);
            }
        }
        if out.buf.is_empty() && out.buf.capacity() > IDLE_BUFFER_BYTES {
            out.buf = Vec::new();
        }
        // Grow only when little room is left: a request part-way in keeps
        // the buffer it arrived in. A request that holds budget grows its
        // buffer once, to what it holds, and not again while the rest of it
        // fits; others by a read. Never by doubling: the allocation stays
        // within what the budget holds plus a read (the free allowance).
        let held = budget.request.bytes();
        let fits = held > inbuf.len() && inbuf.capacity() >= held;
        if inbuf.capacity() - inbuf.len() < READ_CHUNK_BYTES / 4 && !fits {
            let want = (inbuf.len() + READ_CHUNK_BYTES).max(held);
            let mut grown = BytesMut::with_capacity(want);
            grown.extend_from_slice(&inbuf);
            inbuf = grown;
        }
        // Replies of a long get line that hold in-flight memory and that
        // the client does not take: the data timeout, from when writing
        // last made progress (bytes it sends do not reset it). Mid-way
        // through a data block holding in-flight memory: the data timeout,
        // from now (any byte resets it). Otherwise the idle timeout, from
        // the last command.
        let (deadline, kicks) = if let Some(since) = out
            .stalled_since
            .filter(|_| long.is_some() && budget.reply.bytes() > 0)
        {
            (data.map(|d| since + d), &shared.stats.data_timeouts)
        } else if budget.request.bytes() > 0 {
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
        // While a long get line arrives, replies the client has not read
        // yet wait in the budget and the line goes on being read; they are
        // written as the socket takes them.
        let unsent = long.is_some() && (out.unsent() > 0 || wr.holds_output());
        let n = tokio::select! {
            // Reading first means a ready socket never touches the signal.
            biased;
            read = rd.read_buf(&mut inbuf) => read?,
            writable = wr.writable(), if unsent => {
                writable?;
                continue;
            }
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
        conn.read_at(shared.store.clock().now_secs());
        conn.set_state(State::Executing);
        shared.stats.bytes_read.fetch_add(n as u64, Relaxed);
    }
}

/// Replies composed and not yet written: `buf[sent..]`.
#[derive(Default)]
struct Output {
    buf: Vec<u8>,
    /// Bytes of `buf` already written (only while a long get line arrives;
    /// otherwise a flush writes everything).
    sent: usize,
    /// Since when replies have waited unwritten with no write making
    /// progress (kept by [`flush_now`]; `None` when nothing waits).
    stalled_since: Option<Instant>,
}

impl Output {
    fn unsent(&self) -> usize {
        self.buf.len() - self.sent
    }

    /// Everything written: empty the buffer, give back what it held.
    fn written(&mut self, shared: &Shared, bytes: usize, held: &mut Reservation) {
        shared.stats.bytes_written.fetch_add(bytes as u64, Relaxed);
        self.buf.clear();
        self.sent = 0;
        self.stalled_since = None;
        held.clear();
    }
}

/// Writes the pending replies and gives back what they held of the budget.
/// A reply that holds budget and that the client does not read for
/// `data_timeout_secs` ends the connection (an error), so a client that
/// never reads cannot keep the budget.
async fn flush(
    shared: &Shared,
    wr: &mut impl ClientWrite,
    out: &mut Output,
    held: &mut Reservation,
) -> std::io::Result<()> {
    let pending = out.unsent();
    if pending == 0 {
        if !out.buf.is_empty() {
            out.written(shared, 0, held);
        }
        if wr.holds_output() {
            wr.flush().await?;
        }
        return Ok(());
    }
    // The common case, without a timer: the socket takes it all now.
    let rest = &out.buf[out.sent..];
    let sent = match wr.try_write(rest) {
        Ok(n) => n,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => 0,
        Err(e) => return Err(e),
    };
    if sent < rest.len() || wr.holds_output() {
        let rest = &rest[sent..];
        let timeout = shared.facts.data_timeout_secs;
        if held.bytes() > 0 && timeout > 0 {
            let limit = Duration::from_secs(u64::from(timeout));
            let write = async {
                wr.write_all(rest).await?;
                wr.flush().await
            };
            let Ok(written) = tokio::time::timeout(limit, write).await else {
                shared.stats.data_timeouts.fetch_add(1, Relaxed);
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the client did not read a reply holding in-flight memory",
                ));
            };
            written?;
        } else {
            wr.write_all(rest).await?;
            wr.flush().await?;
        }
    }
    out.written(shared, pending, held);
    Ok(())
}

/// Writes what the socket takes now of the pending replies, without
/// waiting: used while a long get line arrives, whose client may read only
/// once it has sent the whole line, so the connection must go on reading
/// it. What is not written stays held in the budget (past it the get is
/// refused), so the wait costs no memory the budget does not see.
fn flush_now(
    shared: &Shared,
    wr: &mut impl ClientWrite,
    out: &mut Output,
    held: &mut Reservation,
) -> std::io::Result<()> {
    let start = out.sent;
    while out.sent < out.buf.len() {
        match wr.try_write(&out.buf[out.sent..]) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => out.sent += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(e),
        }
    }
    if out.sent == out.buf.len() {
        let bytes = out.sent - start;
        out.written(shared, bytes, held);
        return Ok(());
    }
    shared
        .stats
        .bytes_written
        .fetch_add((out.sent - start) as u64, Relaxed);
    if out.sent > start || out.stalled_since.is_none() {
        out.stalled_since = Some(Instant::now());
    }
    // Move the rest to the front only once it is at most half the buffer,
    // so each byte is moved a bounded number of times.
    if out.sent >= out.buf.len() / 2 {
        out.buf.drain(..out.sent);
        out.sent = 0;
    }
    Ok(())
}

/// [`flush`], or [`flush_now`] while a long get line arrives.
async fn flush_for(
    shared: &Shared,
    wr: &mut impl ClientWrite,
    out: &mut Output,
    held: &mut Reservation,
    long: &Option<LongGet>,
) -> std::io::Result<()> {
    if long.is_some() {
        flush_now(shared, wr, out, held)
    } else {
        flush(shared, wr, out, held).await
    }
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

/// After a request, or a piece of a long get line: an error ends a long
/// line's reply, so the rest of the line is only discarded; once its
/// newline is read the line is over. The request's bytes held in the
/// budget go back once no long line is left part-way.
fn after_piece(long: &mut Option<LongGet>, failed: bool, reservation: &mut Reservation) {
    if let Some(l) = long {
        if failed {
            l.skip_rest();
        }
        if l.done() {
            *long = None;
        }
    }
    if long.is_none() {
        reservation.clear();
    }
}

/// Holds exactly `bytes` of a get line's buffer in the budget. With no
/// room now, it first writes the replies pending (their bytes may be what
/// holds the budget), then waits up to [`INFLIGHT_WAIT_MAX`] for other
/// connections to give room back. False if none came.
async fn hold_line(
    shared: &Shared,
    wr: &mut impl ClientWrite,
    output: &mut Output,
    held: &mut Reservation,
    long: &Option<LongGet>,
    reservation: &mut Reservation,
    bytes: usize,
) -> std::io::Result<bool> {
    if reservation.hold_exactly(bytes) {
        return Ok(true);
    }
    flush_for(shared, wr, output, held, long).await?;
    let room = reservation.hold_within(bytes, INFLIGHT_WAIT_MAX).await;
    if !room {
        debug!(
            bytes,
            inflight = shared.inflight.used(),
            "no in-flight memory for a get line; closing"
        );
    }
    Ok(room)
}

/// What a connection that has not authenticated (`-Y`) does with its input.
enum Authenticating {
    /// Read more.
    Wait,
    /// Close without a word (junk, or no room to hold it).
    Close,
    /// A command took `consumed` bytes and was answered.
    Answered {
        consumed: usize,
        authenticated: bool,
    },
}

/// One step before authentication, as memcached takes it: the answer to
/// the command at the start of `input`, put in `out`. A command arriving
/// in pieces is held to the budget past the free allowance, like any
/// other.
fn authenticate(
    shared: &Shared,
    auth: &parking_lot::RwLock<ascii_auth::AuthFile>,
    input: &[u8],
    out: &mut Vec<u8>,
    reservation: &mut Reservation,
) -> Authenticating {
    match ascii_auth::step(input) {
        ascii_auth::Step::Incomplete => {
            if input.len() <= INFLIGHT_FREE_BYTES || reservation.hold(input.len()) {
                Authenticating::Wait
            } else {
                Authenticating::Close
            }
        }
        ascii_auth::Step::Close => Authenticating::Close,
        ascii_auth::Step::Reply {
            consumed,
            reply,
            attempt,
        } => {
            reservation.clear();
            let Some((user_at, user_len, pass_at, pass_len)) = attempt else {
                put_line(out, reply.as_bytes());
                return Authenticating::Answered {
                    consumed,
                    authenticated: false,
                };
            };
            shared.stats.auth_cmds.fetch_add(1, Relaxed);
            let ok = auth.read().check(
                &input[user_at..user_at + user_len],
                &input[pass_at..pass_at + pass_len],
            );
            if ok {
                put_line(out, reply.as_bytes());
            } else {
                shared.stats.auth_errors.fetch_add(1, Relaxed);
                put_line(out, b"CLIENT_ERROR authentication failure");
            }
            Authenticating::Answered {
                consumed,
                authenticated: ok,
            }
        }
    }
}

/// Whether a get's reply, from `reply_at` on, is an error line.
fn is_error_reply(out: &[u8], reply_at: usize) -> bool {
    out.get(reply_at..)
        .is_some_and(|r| r.starts_with(b"SERVER_ERROR") || r.starts_with(b"CLIENT_ERROR"))
}

/// Executes every complete request in `inbuf`. Returns true to close.
#[allow(clippy::too_many_arguments)] // the connection's state, one call site
async fn process(
    shared: &Shared,
    inbuf: &mut BytesMut,
    output: &mut Output,
    swallow: &mut usize,
    long: &mut Option<LongGet>,
    budget: &mut Held,
    wr: &mut impl ClientWrite,
    mut last_command: Option<&mut Instant>,
    authenticated: &mut bool,
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
        if let (false, Some(auth)) = (*authenticated, &shared.ascii_auth) {
            match authenticate(shared, auth, &inbuf[..], &mut output.buf, reservation) {
                Authenticating::Wait => return Ok(false),
                Authenticating::Close => return Ok(true),
                Authenticating::Answered {
                    consumed,
                    authenticated: now,
                } => {
                    inbuf.advance(consumed);
                    *authenticated = now;
                    if let Some(last) = last_command.as_deref_mut() {
                        *last = Instant::now();
                    }
                    continue;
                }
            }
        }
        let parsed = match long.as_mut() {
            None => parse(&inbuf[..], &shared.limits),
            Some(l) => match l.next(&inbuf[..]) {
                Step::Skip(n) => {
                    inbuf.advance(n);
                    after_piece(long, false, reservation);
                    continue;
                }
                Step::Incomplete => {
                    // The buffer holds less than a piece (and a read);
                    // past the free allowance it is held to the budget (and
                    // to the data timeout) like any long line.
                    if inbuf.len() <= INFLIGHT_FREE_BYTES
                        || reservation.hold(inbuf.len())
                        || hold_line(shared, wr, output, held, long, reservation, inbuf.len())
                            .await?
                    {
                        return Ok(false);
                    }
                    put_line(&mut output.buf, reply::NO_MEMORY_READING.as_bytes());
                    return Ok(true);
                }
                Step::Piece { get, consumed } => Parsed::Complete {
                    request: Request::Get(get),
                    consumed,
                },
            },
        };
        let out = &mut output.buf;
        let (action, consumed) = match parsed {
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
                    let line_bytes = GET_LINE_WHOLE_BYTES_MAX + 1;
                    if hold_line(shared, wr, output, held, long, reservation, line_bytes).await? {
                        return Ok(false);
                    }
                    put_line(&mut output.buf, reply::NO_MEMORY_READING.as_bytes());
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
                // The request stays in the input buffer while it is served,
                // and serving can wait (a get yields between batches of
                // keys, a cluster request waits for replicas): the buffer's
                // allocation past a read (the free allowance) is held in
                // the budget until the request is answered, so connections
                // part-way through large requests cannot together hold
                // memory the budget does not see. A line that arrived in
                // one read needs nothing; one that came in several holds
                // this already.
                let line_bytes = inbuf.capacity().saturating_sub(READ_CHUNK_BYTES);
                if !reservation.hold_exactly(line_bytes)
                    && matches!(request, Request::Get(_))
                    && !hold_line(shared, wr, output, held, long, reservation, line_bytes).await?
                {
                    put_line(&mut output.buf, reply::NO_MEMORY_READING.as_bytes());
                    return Ok(true);
                }
                if let Some(last) = last_command.as_deref_mut() {
                    *last = Instant::now();
                }
                trace!(?request, "request");
                // The first piece of a long get line: the rest of the line
                // is served as it arrives. A piece is a batch's worth of
                // work: other connections get a turn after it.
                if let Request::Get(g) = &request {
                    if g.continues && long.is_none() {
                        *long = Some(LongGet::after(g));
                    }
                    if long.is_some() {
                        executed = shared.facts.requests_per_event;
                    }
                }
                if execute::refused_by_settings(shared, &request, &mut output.buf) {
                    inbuf.advance(consumed);
                    after_piece(long, false, reservation);
                    continue;
                }
                let fault = shared.faults.as_ref().map_or(Fault::None, Faults::next);
                match fault {
                    Fault::DropRequest => {
                        inbuf.advance(consumed);
                        after_piece(long, false, reservation);
                        continue;
                    }
                    Fault::Delay(d) => {
                        flush_for(shared, wr, output, held, long).await?;
                        tokio::time::sleep(d).await;
                    }
                    Fault::None | Fault::DropReply => {}
                }
                let out = &mut output.buf;
                let timed = shared.latency.start(&request);
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
                        shared.latency.finish(timed);
                        let get = matches!(request, Request::Get(_));
                        let failed = get && is_error_reply(out, reply_at);
                        drop_reply(out);
                        let held_all = hold_reply(out, reply_at, held, get);
                        // A refused store's data block follows its line.
                        let refused = request.refused();
                        inbuf.advance(consumed);
                        after_piece(long, failed || !held_all, reservation);
                        if let Some(refused) = refused {
                            *swallow = refused.swallow();
                        }
                        if output.unsent() >= WRITE_FLUSH_BYTES {
                            flush_for(shared, wr, output, held, long).await?;
                        }
                        continue;
                    }
                }
                let mut failed = false;
                let action = match request {
                    Request::Get(get) => {
                        let mut ahead = get.keys();
                        let multi = get.keys().nth(1).is_some();
                        for (i, key) in get.keys().enumerate() {
                            if i > 0 && i % GET_KEYS_PER_TURN == 0 {
                                tokio::task::yield_now().await;
                            }
                            if multi && i % PREFETCH_KEYS == 0 {
                                let mut batch: [&[u8]; PREFETCH_KEYS] = [&[]; PREFETCH_KEYS];
                                let n = batch
                                    .iter_mut()
                                    .zip(ahead.by_ref())
                                    .map(|(b, k)| *b = k)
                                    .count();
                                shared.store.prefetch(&batch[..n]);
                            }
                            let out = &mut output.buf;
                            let key_at = out.len();
                            execute::get_key(shared, &get, key, out);
                            if !hold_reply(out, key_at, held, true) {
                                // memcached ends the reply with the error.
                                failed = true;
                                break;
                            }
                            // A piece of a long line is written after it is
                            // served (without waiting: see `flush_now`).
                            if long.is_none() && output.unsent() >= WRITE_FLUSH_BYTES {
                                flush(shared, wr, output, held).await?;
                            }
                        }
                        if !failed {
                            execute::get_end(&get, &mut output.buf);
                        }
                        Action::Continue
                    }
                    Request::ListKeys(l) => {
                        // In pieces, letting other connections run between
                        // them; each piece holds its reply bytes, and one
                        // refused ends the reply with the error.
                        let mut at = execute::list_keys_start(shared, l.token, l.count, out);
                        while let Some(piece) = at {
                            let out = &mut output.buf;
                            let piece_at = out.len();
                            at = execute::list_keys_piece(shared, piece, out);
                            if !hold_reply(out, piece_at, held, false) {
                                break;
                            }
                            if at.is_some() {
                                if output.unsent() >= WRITE_FLUSH_BYTES {
                                    flush(shared, wr, output, held).await?;
                                }
                                tokio::task::yield_now().await;
                            }
                        }
                        // A page costs as much as a batch of small requests.
                        executed = shared.facts.requests_per_event;
                        Action::Continue
                    }
                    other => {
                        let action = execute::execute(shared, other, out);
                        hold_reply(out, reply_at, held, false);
                        action
                    }
                };
                shared.latency.finish(timed);
                drop_reply(&mut output.buf);
                inbuf.advance(consumed);
                after_piece(long, failed, reservation);
                match action {
                    Action::Continue => {}
                    Action::Swallow(n) => *swallow = n,
                    Action::Close => return Ok(true),
                }
                (Action::Continue, 0)
            }
        };
        if consumed > 0 {
            debug_assert!(consumed <= inbuf.len());
            inbuf.advance(consumed);
        }
        match action {
            Action::Continue => {}
            Action::Swallow(n) => *swallow = n,
            Action::Close => return Ok(true),
        }
        if output.unsent() >= WRITE_FLUSH_BYTES {
            flush_for(shared, wr, output, held, long).await?;
        }
        executed = executed.saturating_add(1);
        if executed >= shared.facts.requests_per_event {
            shared.stats.conn_yields.fetch_add(1, Relaxed);
            // Let other connections on this worker run.
            flush_for(shared, wr, output, held, long).await?;
            tokio::task::yield_now().await;
            executed = 0;
        }
    }
}
