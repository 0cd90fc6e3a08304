//! One pipelined TCP connection to a server: the only socket code of the
//! client.
//!
//! ```text
//!  call() ──▶ pending[opaque] ──outbox (bounded)──▶ writer task ──▶ socket
//!    ▲                                  │ written (FIFO of opaques)
//!    └──── oneshot ◀── deliver ◀── reader task ◀── Decoder ◀── socket
//! ```
//!
//! Many requests are in flight at once. Each meta request carries a unique
//! `O<n>` opaque, and the reader hands each reply to the caller whose opaque
//! it echoes. The server answers in request order, so the writer also keeps
//! the opaques in the order it wrote them (`written`): a reply without an
//! opaque (`ERROR`, `CLIENT_ERROR`, `SERVER_ERROR`, which never carry one)
//! belongs to the oldest written request without a reply, and a reply that
//! skips older entries proves those will never be answered. A caller that
//! gave up leaves its entry in `written`, so a late reply is still matched
//! (and dropped) instead of shifting every later one.
//!
//! `version`, `stats` and `lk` replies carry no opaque and span several
//! lines; their framing depends on what was asked. The pool sends them on a
//! separate connection, one at a time ([`super::pool`]), so the reader frames
//! each reply by the kind of the oldest written request.
//!
//! Failure handling is deliberately simple: a caller whose request was
//! written but got no reply within its timeout closes the connection (the
//! server is stalled or the stream is lost; replies come in order, so
//! nothing behind it is being answered either), every other pending caller
//! gets an error saying whether its request was written, and the pool dials
//! a new one. Every queue is bounded by `in_flight_max`: a full connection
//! answers [`ClientError::Busy`] instead of queueing.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tracing::debug;

use super::command::{Command, Hints};
use super::config::{READ_CHUNK_BYTES, REPLY_LINE_BYTES_MAX, WRITE_BATCH_MAX};
use super::error::ClientError;
use super::faults::FaultPlan;
use super::reply::{Decoder, Expect, Reply};

/// Bytes one write call gathers before it goes out (more requests wait for
/// the next write).
const WRITE_BATCH_BYTES_MAX: usize = 1024 * 1024;

/// How an attempt on a connection failed, by what it means for the request.
#[derive(Debug, Clone)]
pub enum AttemptError {
    /// The request was never written: nothing ran.
    NotSent(ClientError),
    /// The request was (or may have been) written and its reply never came.
    Unknown(ClientError),
}

impl AttemptError {
    pub fn error(&self) -> &ClientError {
        match self {
            AttemptError::NotSent(e) | AttemptError::Unknown(e) => e,
        }
    }
}

/// Limits of one connection.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Requests in flight before [`ClientError::Busy`].
    pub in_flight_max: usize,
    /// Largest reply.
    pub reply_bytes_max: usize,
}

/// A caller waiting for its reply.
struct Pending {
    reply: oneshot::Sender<Result<Reply, AttemptError>>,
    /// Fault injection: throw the reply away when it comes.
    drop_reply: bool,
}

/// A written request awaiting its reply, in write order.
#[derive(Debug, Clone, Copy)]
struct Written {
    opaque: u64,
    expect: Expect,
}

/// A request on its way to the writer.
struct Outgoing {
    opaque: u64,
    expect: Expect,
    bytes: Vec<u8>,
    /// Fault injection: never write it.
    drop: bool,
}

/// What the caller, the writer and the reader share. The lock is held for a
/// few map operations at a time, never across I/O or `.await`.
struct State {
    /// Callers waiting, by opaque. At most `in_flight_max`.
    pending: HashMap<u64, Pending>,
    /// Opaques written and not yet answered, oldest first. Entries of
    /// callers that gave up stay until their reply arrives or the
    /// connection closes (which a give-up on a written request forces), so
    /// this is bounded by `in_flight_max` too.
    written: VecDeque<Written>,
    /// Why the connection closed, once it has.
    closed: Option<ClientError>,
    /// The reader and writer tasks, aborted on close.
    tasks: Vec<AbortHandle>,
}

struct Shared {
    addr: SocketAddr,
    limits: ConnectionLimits,
    state: Mutex<State>,
}

impl Shared {
    /// Closes the connection: fails every pending caller (saying whether its
    /// request was written), stops both tasks. Idempotent.
    fn close(&self, why: ClientError) {
        let (pending, written, tasks) = {
            let mut st = self.state.lock();
            if st.closed.is_some() {
                return;
            }
            debug!(addr = %self.addr, reason = %why, "client connection closed");
            st.closed = Some(why.clone());
            (
                std::mem::take(&mut st.pending),
                std::mem::take(&mut st.written),
                std::mem::take(&mut st.tasks),
            )
        };
        for (opaque, p) in pending {
            let err = if written.iter().any(|w| w.opaque == opaque) {
                AttemptError::Unknown(why.clone())
            } else {
                AttemptError::NotSent(why.clone())
            };
            let _ = p.reply.send(Err(err));
        }
        for t in tasks {
            t.abort();
        }
    }

    fn closed_error(&self) -> Option<ClientError> {
        self.state.lock().closed.clone()
    }

    /// Hands a decoded reply to its caller (see the module doc for the
    /// matching rule).
    ///
    /// # Errors
    /// A reply that matches no written request.
    fn deliver(&self, reply: Reply) -> Result<(), ClientError> {
        let mut skipped = Vec::new();
        let target = {
            let mut st = self.state.lock();
            let target = match reply.opaque() {
                None => st.written.pop_front().map(|w| w.opaque),
                Some(opaque) => loop {
                    match st.written.pop_front() {
                        Some(w) if w.opaque == opaque => break Some(opaque),
                        Some(w) => {
                            if let Some(p) = st.pending.remove(&w.opaque) {
                                skipped.push(p);
                            }
                        }
                        None => break None,
                    }
                },
            };
            // A fault-dropped reply leaves its caller pending: it must time
            // out as if the reply never came (a dropped sender would wake it).
            target.map(|t| match st.pending.get(&t) {
                Some(p) if p.drop_reply => (t, None),
                _ => (t, st.pending.remove(&t)),
            })
        };
        for p in skipped {
            let _ = p
                .reply
                .send(Err(AttemptError::Unknown(ClientError::Protocol(
                    "the server answered a later request first".into(),
                ))));
        }
        match target {
            None => Err(ClientError::Protocol(format!(
                "reply {:?} matches no request in flight",
                reply.opaque()
            ))),
            // The caller gave up (timed out or was cancelled), or the reply
            // is dropped on purpose.
            Some((_, None)) => Ok(()),
            Some((_, Some(p))) => {
                let _ = p.reply.send(Ok(reply));
                Ok(())
            }
        }
    }
}

/// One pipelined connection. Dropping it closes the socket and fails every
/// request still pending on it.
pub struct Connection {
    shared: Arc<Shared>,
    outbox: mpsc::Sender<Outgoing>,
    next_opaque: AtomicU64,
    /// Set once a stall has been reported ([`Connection::take_stall`]).
    stall_reported: AtomicBool,
}

/// What a connection does before its first request: a TLS handshake
/// ([`super::ClientConfig::tls`]) and memcached's ASCII authentication
/// ([`super::ClientConfig::auth`]).
#[derive(Debug, Clone, Default)]
pub struct Security {
    tls: Option<super::tls::ClientTls>,
    /// The `set` that authenticates, whole.
    auth: Option<Vec<u8>>,
}

impl Security {
    /// What `config` asks for.
    pub fn of(config: &super::ClientConfig) -> Security {
        Security {
            tls: config.tls.clone(),
            auth: config
                .auth
                .as_ref()
                .map(|(user, password)| auth_request(user, password)),
        }
    }
}

/// memcached's ASCII authentication (`-Y`): a `set` whose value is
/// `user password`, whole.
pub fn auth_request(user: &str, password: &str) -> Vec<u8> {
    let value = format!("{user} {password}");
    format!("set auth 0 0 {}\r\n{value}\r\n", value.len()).into_bytes()
}

/// Sends the authentication and expects `STORED`.
async fn authenticate<S: AsyncRead + AsyncWrite + Unpin>(
    addr: SocketAddr,
    stream: &mut S,
    request: &[u8],
) -> Result<(), ClientError> {
    let io = |e: io::Error| ClientError::io(addr, &e);
    stream.write_all(request).await.map_err(io)?;
    stream.flush().await.map_err(io)?;
    let mut line = Vec::with_capacity(64);
    let mut byte = [0u8; 1];
    while !line.ends_with(b"\r\n") && line.len() < 256 {
        if stream.read(&mut byte).await.map_err(io)? == 0 {
            break;
        }
        line.push(byte[0]);
    }
    if line == b"STORED\r\n" {
        return Ok(());
    }
    Err(ClientError::io_msg(
        addr,
        io::ErrorKind::PermissionDenied,
        format!(
            "authentication refused: {}",
            String::from_utf8_lossy(&line).trim_end()
        ),
    ))
}

impl Connection {
    /// Connects (within `connect_timeout`, the TLS handshake and
    /// authentication included) and starts the reader and writer.
    ///
    /// # Errors
    /// [`ClientError::Io`] when the connect, the handshake or the
    /// authentication fails or times out.
    pub async fn connect(
        addr: SocketAddr,
        connect_timeout: Duration,
        limits: ConnectionLimits,
        security: &Security,
    ) -> Result<Connection, ClientError> {
        let opened = async {
            let stream = TcpStream::connect(addr)
                .await
                .map_err(|e| ClientError::io(addr, &e))?;
            // Requests are small and latency-bound; the writer batches already.
            stream
                .set_nodelay(true)
                .map_err(|e| ClientError::io(addr, &e))?;
            match &security.tls {
                None => {
                    let mut stream = stream;
                    if let Some(auth) = &security.auth {
                        authenticate(addr, &mut stream, auth).await?;
                    }
                    let (rd, wr) = stream.into_split();
                    Ok(Self::start(addr, limits, rd, wr))
                }
                Some(tls) => {
                    let mut stream = tls
                        .connect(addr, stream)
                        .await
                        .map_err(|e| ClientError::io(addr, &e))?;
                    if let Some(auth) = &security.auth {
                        authenticate(addr, &mut stream, auth).await?;
                    }
                    let (rd, wr) = tokio::io::split(stream);
                    Ok(Self::start(addr, limits, rd, wr))
                }
            }
        };
        match tokio::time::timeout(connect_timeout, opened).await {
            Ok(result) => result,
            Err(_) => Err(ClientError::io_msg(
                addr,
                io::ErrorKind::TimedOut,
                format!("connect timed out after {connect_timeout:?}"),
            )),
        }
    }

    /// Starts the reader and writer on a connected stream's halves.
    fn start<R, W>(addr: SocketAddr, limits: ConnectionLimits, rd: R, wr: W) -> Connection
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let shared = Arc::new(Shared {
            addr,
            limits,
            state: Mutex::new(State {
                pending: HashMap::new(),
                written: VecDeque::new(),
                closed: None,
                tasks: Vec::new(),
            }),
        });
        let (outbox, inbox) = mpsc::channel(limits.in_flight_max);
        let reader = tokio::spawn(read_loop(shared.clone(), rd));
        let writer = tokio::spawn(write_loop(shared.clone(), wr, inbox));
        shared.state.lock().tasks = vec![reader.abort_handle(), writer.abort_handle()];
        Connection {
            shared,
            outbox,
            next_opaque: AtomicU64::new(1),
            stall_reported: AtomicBool::new(false),
        }
    }

    /// Whether the connection has closed (it never reopens).
    pub fn is_closed(&self) -> bool {
        self.shared.state.lock().closed.is_some()
    }

    /// Sends one request and waits up to `timeout` for its reply; `faults`
    /// says what to do to it on purpose (tests).
    ///
    /// Cancel-safe: dropping the future withdraws the request (if it is
    /// written already, its reply is discarded when it comes).
    ///
    /// # Errors
    /// [`AttemptError::NotSent`] with [`ClientError::Busy`] when
    /// `in_flight_max` requests are pending, or with [`ClientError::Io`]
    /// when the connection is closed; [`AttemptError::Unknown`] with
    /// [`ClientError::Timeout`], or with the reason the connection closed
    /// while the request was written.
    pub async fn call(
        &self,
        command: &Command,
        hints: Option<&Hints>,
        timeout: Duration,
        faults: FaultPlan,
    ) -> Result<Reply, AttemptError> {
        let deadline = Instant::now() + timeout;
        let opaque = self.next_opaque.fetch_add(1, Ordering::Relaxed);
        let expect = command.expect();
        let mut bytes = Vec::new();
        command.encode(opaque, hints, &mut bytes);
        let (tx, rx) = oneshot::channel();
        {
            let mut st = self.shared.state.lock();
            if let Some(why) = &st.closed {
                return Err(AttemptError::NotSent(why.clone()));
            }
            if st.pending.len() >= self.shared.limits.in_flight_max {
                return Err(AttemptError::NotSent(ClientError::Busy {
                    addr: self.shared.addr,
                    in_flight: st.pending.len(),
                }));
            }
            let fresh = st.pending.insert(
                opaque,
                Pending {
                    reply: tx,
                    drop_reply: faults.drop_reply,
                },
            );
            assert!(fresh.is_none(), "opaque {opaque} reused");
        }
        // From here on every way out (return, timeout, cancellation) must
        // withdraw the pending entry: the guard does it (a no-op when the
        // reader or `close` took it already).
        let _guard = PendingGuard {
            shared: &self.shared,
            opaque,
        };
        let send_and_wait = async {
            if let Some(delay) = faults.delay {
                tokio::time::sleep(delay).await;
            }
            let outgoing = Outgoing {
                opaque,
                expect,
                bytes,
                drop: faults.drop_request,
            };
            match self.outbox.try_send(outgoing) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    return Err(AttemptError::NotSent(ClientError::Busy {
                        addr: self.shared.addr,
                        in_flight: self.shared.limits.in_flight_max,
                    }));
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    return Err(AttemptError::NotSent(self.closed_error()));
                }
            }
            match rx.await {
                Ok(result) => result,
                // `close` answers every pending caller before dropping its
                // sender; a bare drop means the state went away with it.
                Err(_) => Err(AttemptError::Unknown(self.closed_error())),
            }
        };
        match tokio::time::timeout_at(deadline, send_and_wait).await {
            Ok(result) => result,
            Err(_) => {
                let stalled = {
                    let mut st = self.shared.state.lock();
                    st.pending.remove(&opaque);
                    st.written.iter().any(|w| w.opaque == opaque)
                };
                if stalled {
                    self.shared.close(ClientError::Timeout(timeout));
                }
                Err(AttemptError::Unknown(ClientError::Timeout(timeout)))
            }
        }
    }

    /// Whether a timeout on this connection closed it for being stalled
    /// (as opposed to a fault-dropped request, which leaves it open).
    pub fn closed_by_timeout(&self) -> bool {
        matches!(self.shared.closed_error(), Some(ClientError::Timeout(_)))
    }

    /// `true` exactly once, for the first caller that asks after the
    /// connection closed by timeout: every request pending on it fails
    /// together, but the node's health should count one stall, not one per
    /// request.
    pub fn take_stall(&self) -> bool {
        self.closed_by_timeout() && !self.stall_reported.swap(true, Ordering::Relaxed)
    }

    fn closed_error(&self) -> ClientError {
        self.shared.closed_error().unwrap_or_else(|| {
            ClientError::io_msg(
                self.shared.addr,
                io::ErrorKind::NotConnected,
                "connection closed",
            )
        })
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.shared.close(ClientError::io_msg(
            self.shared.addr,
            io::ErrorKind::NotConnected,
            "connection dropped by the client",
        ));
    }
}

/// Withdraws a pending request unless disarmed.
struct PendingGuard<'a> {
    shared: &'a Shared,
    opaque: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.shared.state.lock().pending.remove(&self.opaque);
    }
}

async fn write_loop(
    shared: Arc<Shared>,
    mut wr: impl AsyncWrite + Unpin,
    mut inbox: mpsc::Receiver<Outgoing>,
) {
    let mut buf = Vec::new();
    while let Some(first) = inbox.recv().await {
        buf.clear();
        {
            // Registering in `written` before the bytes go out means the
            // reader can never see a reply it cannot place.
            let mut st = shared.state.lock();
            let mut next = Some(first);
            let mut count = 0;
            while let Some(m) = next.take() {
                // A caller that already gave up is not worth the bytes.
                if st.pending.contains_key(&m.opaque) && !m.drop {
                    st.written.push_back(Written {
                        opaque: m.opaque,
                        expect: m.expect,
                    });
                    buf.extend_from_slice(&m.bytes);
                }
                count += 1;
                if count < WRITE_BATCH_MAX && buf.len() < WRITE_BATCH_BYTES_MAX {
                    next = inbox.try_recv().ok();
                }
            }
        }
        if buf.is_empty() {
            continue;
        }
        // TLS: the records written go out now (a no-op on TCP).
        if let Err(e) = async {
            wr.write_all(&buf).await?;
            wr.flush().await
        }
        .await
        {
            shared.close(ClientError::io(shared.addr, &e));
            return;
        }
    }
}

async fn read_loop(shared: Arc<Shared>, mut rd: impl AsyncRead + Unpin) {
    let mut buf = BytesMut::with_capacity(READ_CHUNK_BYTES);
    let mut decoder = Decoder::new(shared.limits.reply_bytes_max, REPLY_LINE_BYTES_MAX);
    loop {
        // Take every complete reply off the buffer.
        while !buf.is_empty() {
            // (Bound first: a guard in the match scrutinee would live
            // through the arms, and `close` takes the lock.)
            let front = shared.state.lock().written.front().map(|w| w.expect);
            let expect = match front {
                Some(expect) => expect,
                None => {
                    shared.close(ClientError::Protocol(format!(
                        "{} bytes from the server with no request in flight",
                        buf.len()
                    )));
                    return;
                }
            };
            match decoder.decode(&mut buf, expect) {
                Ok(Some(reply)) => {
                    if let Err(e) = shared.deliver(reply) {
                        shared.close(e);
                        return;
                    }
                }
                Ok(None) => break,
                Err(why) => {
                    shared.close(ClientError::Protocol(why));
                    return;
                }
            }
        }
        buf.reserve(READ_CHUNK_BYTES);
        match rd.read_buf(&mut buf).await {
            Ok(0) => {
                shared.close(ClientError::io_msg(
                    shared.addr,
                    io::ErrorKind::UnexpectedEof,
                    "connection closed by the server",
                ));
                return;
            }
            Ok(_) => {}
            Err(e) => {
                shared.close(ClientError::io(shared.addr, &e));
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! The connection against a scripted fake server on loopback, to pin
    //! reply matching and failure reporting byte for byte.

    use super::*;
    use crate::client::command::WireKey;
    use tokio::io::AsyncBufReadExt;
    use tokio::net::TcpListener;

    const LIMITS: ConnectionLimits = ConnectionLimits {
        in_flight_max: 4,
        reply_bytes_max: 1 << 20,
    };
    const SECOND: Duration = Duration::from_secs(1);

    fn get(key: &str) -> Command {
        Command::Get {
            key: WireKey::new(key.as_bytes()).unwrap(),
            value: true,
            touch: None,
        }
    }

    /// A server that reads `lines` request lines, then lets `answer` write
    /// whatever it likes given them.
    async fn fake_server(
        lines: usize,
        answer: impl FnOnce(Vec<String>) -> Vec<u8> + Send + 'static,
    ) -> (SocketAddr, tokio::task::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let (rd, mut wr) = stream.into_split();
            let mut rd = tokio::io::BufReader::new(rd);
            let mut got = Vec::new();
            for _ in 0..lines {
                let mut line = String::new();
                rd.read_line(&mut line).await.unwrap();
                got.push(line.trim_end().to_string());
            }
            wr.write_all(&answer(got)).await.unwrap();
            // Keep the socket open until the test is done with it.
            let mut rest = Vec::new();
            let _ = rd.read_to_end(&mut rest).await;
        });
        (addr, task)
    }

    /// Gets of `a`, `b` and `c` on one connection, sent 20 ms apart so
    /// they are written in that order.
    async fn gets_a_b_c(
        conn: &Connection,
    ) -> (
        Result<Reply, AttemptError>,
        Result<Reply, AttemptError>,
        Result<Reply, AttemptError>,
    ) {
        let staggered = |key: &'static str, after_ms: u64| async move {
            tokio::time::sleep(Duration::from_millis(after_ms)).await;
            conn.call(&get(key), None, SECOND, FaultPlan::default())
                .await
        };
        tokio::join!(staggered("a", 0), staggered("b", 20), staggered("c", 40))
    }

    fn opaque_of(line: &str) -> &str {
        line.split(' ').find_map(|t| t.strip_prefix('O')).unwrap()
    }

    #[tokio::test]
    async fn replies_out_of_order_and_errors_reach_their_callers() {
        // Three gets; the server answers the third first (by opaque), then
        // an error for the first (no opaque: the oldest), then the second.
        let (addr, _server) = fake_server(3, |got| {
            let (b, c) = (opaque_of(&got[1]), opaque_of(&got[2]));
            format!("VA 1 O{c} f0 c1\r\nc\r\nSERVER_ERROR busy\r\nEN O{b}\r\n").into_bytes()
        })
        .await;
        let conn = Connection::connect(addr, SECOND, LIMITS, &Security::default())
            .await
            .unwrap();
        let (ra, rb, rc) = gets_a_b_c(&conn).await;
        // `c`'s reply skipped `a` and `b` in the FIFO: they can no longer be
        // answered in order, so they fail as protocol errors; `b`'s late EN
        // then matches nothing... which is itself a protocol error that
        // closes the connection.
        assert!(
            matches!(rc, Ok(Reply::Value(ref v, _)) if &v[..] == b"c"),
            "{rc:?}"
        );
        assert!(
            matches!(ra, Err(AttemptError::Unknown(ClientError::Protocol(_)))),
            "{ra:?}"
        );
        assert!(
            matches!(rb, Err(AttemptError::Unknown(ClientError::Protocol(_)))),
            "{rb:?}"
        );
    }

    #[tokio::test]
    async fn in_order_replies_with_and_without_opaques() {
        let (addr, _server) = fake_server(3, |got| {
            let (b, c) = (opaque_of(&got[1]), opaque_of(&got[2]));
            format!("CLIENT_ERROR bad key\r\nEN O{b}\r\nVA 2 O{c}\r\nhi\r\n").into_bytes()
        })
        .await;
        let conn = Connection::connect(addr, SECOND, LIMITS, &Security::default())
            .await
            .unwrap();
        let (ra, rb, rc) = gets_a_b_c(&conn).await;
        assert!(matches!(ra, Ok(Reply::Error(_))), "{ra:?}");
        assert!(
            matches!(rb, Ok(Reply::Status(crate::client::reply::Status::En, _))),
            "{rb:?}"
        );
        assert!(matches!(rc, Ok(Reply::Value(..))), "{rc:?}");
        assert!(!conn.is_closed());
    }

    #[tokio::test]
    async fn a_dropped_reply_times_out_without_disturbing_the_next() {
        let (addr, _server) = fake_server(2, |got| {
            let (a, b) = (opaque_of(&got[0]), opaque_of(&got[1]));
            format!("EN O{a}\r\nEN O{b}\r\n").into_bytes()
        })
        .await;
        let conn = Connection::connect(addr, SECOND, LIMITS, &Security::default())
            .await
            .unwrap();
        let drop_reply = FaultPlan {
            drop_reply: true,
            ..FaultPlan::default()
        };
        let short = Duration::from_millis(300);
        let (ra, rb) = tokio::join!(
            async { conn.call(&get("a"), None, short, drop_reply).await },
            async {
                tokio::time::sleep(Duration::from_millis(20)).await;
                conn.call(&get("b"), None, SECOND, FaultPlan::default())
                    .await
            }
        );
        assert!(
            matches!(ra, Err(AttemptError::Unknown(ClientError::Timeout(_)))),
            "{ra:?}"
        );
        assert!(matches!(rb, Ok(Reply::Status(..))), "{rb:?}");
        // The dropped reply was read, so nothing is stalled: still open.
        assert!(!conn.is_closed());
    }

    #[tokio::test]
    async fn a_stalled_request_closes_the_connection_and_reports_unknown() {
        // The server reads one request and never answers.
        let (addr, _server) = fake_server(1, |_| Vec::new()).await;
        let conn = Connection::connect(addr, SECOND, LIMITS, &Security::default())
            .await
            .unwrap();
        let r = conn
            .call(
                &get("a"),
                None,
                Duration::from_millis(200),
                FaultPlan::default(),
            )
            .await;
        assert!(
            matches!(r, Err(AttemptError::Unknown(ClientError::Timeout(_)))),
            "{r:?}"
        );
        assert!(conn.is_closed() && conn.closed_by_timeout());
        assert!(conn.take_stall() && !conn.take_stall(), "reported once");
        let r = conn
            .call(&get("b"), None, SECOND, FaultPlan::default())
            .await;
        assert!(matches!(r, Err(AttemptError::NotSent(_))), "{r:?}");
    }

    #[tokio::test]
    async fn a_dropped_request_times_out_and_keeps_the_connection() {
        let (addr, _server) = fake_server(1, |got| {
            format!("HD O{}\r\n", opaque_of(&got[0])).into_bytes()
        })
        .await;
        let conn = Connection::connect(addr, SECOND, LIMITS, &Security::default())
            .await
            .unwrap();
        let dropped = FaultPlan {
            drop_request: true,
            ..FaultPlan::default()
        };
        let r = conn
            .call(&get("a"), None, Duration::from_millis(200), dropped)
            .await;
        assert!(
            matches!(r, Err(AttemptError::Unknown(ClientError::Timeout(_)))),
            "{r:?}"
        );
        assert!(!conn.is_closed());
        let r = conn
            .call(&get("b"), None, SECOND, FaultPlan::default())
            .await;
        assert!(matches!(r, Ok(Reply::Status(..))), "{r:?}");
    }

    #[tokio::test]
    async fn a_full_connection_is_busy_and_a_reset_is_reported_by_write_state() {
        let (addr, server) = fake_server(LIMITS.in_flight_max, |_| Vec::new()).await;
        let conn = Arc::new(
            Connection::connect(addr, SECOND, LIMITS, &Security::default())
                .await
                .unwrap(),
        );
        let mut waiting = Vec::new();
        for i in 0..LIMITS.in_flight_max {
            let conn = conn.clone();
            waiting.push(tokio::spawn(async move {
                conn.call(
                    &get(&format!("k{i}")),
                    None,
                    10 * SECOND,
                    FaultPlan::default(),
                )
                .await
            }));
        }
        // Wait (bounded) until all are written, then one more is refused.
        let deadline = Instant::now() + 5 * SECOND;
        while conn.shared.state.lock().written.len() < LIMITS.in_flight_max {
            assert!(Instant::now() < deadline, "requests not written");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let r = conn
            .call(&get("x"), None, SECOND, FaultPlan::default())
            .await;
        assert!(
            matches!(r, Err(AttemptError::NotSent(ClientError::Busy { .. }))),
            "{r:?}"
        );
        // The server goes away: every written request is "unknown".
        server.abort();
        for w in waiting {
            let r = w.await.unwrap();
            assert!(
                matches!(r, Err(AttemptError::Unknown(ClientError::Io { .. }))),
                "{r:?}"
            );
        }
    }
}
