//! Drives the load: one OS thread per `--threads`, each a single-threaded
//! tokio runtime running its share of the connections.
//!
//! Closed loop: each connection keeps `depth` requests outstanding and sends
//! a new one as each reply arrives. Open loop: each connection sends on a
//! fixed schedule (`rate / connections` per second) whatever the replies do,
//! and latency is measured from when a request was due, not when it went
//! out, so a stalled server cannot hide its stall (no coordinated omission).

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Barrier, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::{Buf, BytesMut};
use hdrhistogram::Histogram;
use rand::SeedableRng;
use rand::rngs::SmallRng;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::reply;
use crate::report::{Counts, Outcome};
use crate::workload::{Chooser, Kind, Workload};

/// How the load is applied.
#[derive(Clone, Debug)]
pub struct Plan {
    pub servers: Vec<SocketAddr>,
    pub connections: usize,
    pub depth: usize,
    pub threads: usize,
    /// Measure for this long, or until `ops` requests were sent.
    pub duration: Duration,
    pub ops: Option<u64>,
    /// Open loop at this many requests per second, over all connections.
    pub rate: Option<f64>,
    /// Load before measuring, not recorded.
    pub warmup: Duration,
    /// A connection with requests outstanding and no reply for this long fails.
    pub stall: Duration,
    pub seed: u64,
    pub progress: bool,
    /// TLS and authentication on every connection.
    pub security: Security,
}

/// What a connection does before its first request: a TLS handshake, and
/// memcached's ASCII authentication (`-Y`).
#[derive(Clone, Default)]
pub struct Security {
    /// The TLS client, and the name the server's certificate must carry.
    pub tls: Option<(
        tokio_rustls::TlsConnector,
        rustls::pki_types::ServerName<'static>,
    )>,
    /// The `set` that authenticates (`webvac::client::auth_request`).
    pub auth: Option<Vec<u8>>,
}

impl std::fmt::Debug for Security {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Security")
            .field("tls", &self.tls.as_ref().map(|(_, name)| name))
            .field("auth", &self.auth.is_some())
            .finish()
    }
}

/// A connection ready for load.
enum Conn {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// Connects to `addr`, then completes the TLS handshake and authenticates
/// as `security` says.
async fn open(addr: SocketAddr, security: &Security) -> anyhow::Result<Conn> {
    let tcp = TcpStream::connect(addr).await?;
    let _ = tcp.set_nodelay(true);
    let mut conn = match &security.tls {
        Some((connector, name)) => Conn::Tls(Box::new(
            connector
                .connect(name.clone(), tcp)
                .await
                .map_err(|e| anyhow::anyhow!("TLS handshake with {addr}: {e}"))?,
        )),
        None => Conn::Plain(tcp),
    };
    if let Some(request) = &security.auth {
        let mut reply = [0u8; 8];
        match &mut conn {
            Conn::Plain(s) => authenticate(s, request, &mut reply).await?,
            Conn::Tls(s) => authenticate(s, request, &mut reply).await?,
        }
    }
    Ok(conn)
}

/// Sends the authentication and expects `STORED`.
async fn authenticate<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    request: &[u8],
    reply: &mut [u8; 8],
) -> anyhow::Result<()> {
    s.write_all(request).await?;
    s.flush().await?;
    s.read_exact(reply).await?;
    if reply != b"STORED\r\n" {
        anyhow::bail!(
            "authentication refused: {}",
            String::from_utf8_lossy(reply).trim_end()
        );
    }
    Ok(())
}

/// Open loop: at most this many requests outstanding per connection; past
/// it the connection falls behind its schedule (and latency shows it).
const OPEN_LOOP_OUTSTANDING_MAX: usize = 4096;
/// A connection folds its counts into the shared totals this often.
const FLUSH_EVERY: u32 = 512;

/// Latencies in nanoseconds, 3 significant digits, up to a minute.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("static bounds")
}

/// Counts and latencies of one stretch of time.
pub struct Tally {
    pub counts: Counts,
    pub latency: Histogram<u64>,
}

impl Tally {
    fn new() -> Tally {
        Tally {
            counts: Counts::default(),
            latency: new_histogram(),
        }
    }

    fn add(&mut self, other: &Tally) {
        self.counts.add(&other.counts);
        self.latency.add(&other.latency).expect("same bounds");
    }
}

/// What every connection shares.
struct Shared {
    plan: Plan,
    workload: Workload,
    /// Set once every connection is up; all times count from it.
    t0: OnceLock<Instant>,
    /// Requests sent after warm-up, for `--ops`.
    issued: AtomicU64,
    /// Prefill: the next key to set.
    next_key: AtomicU64,
    prefill: bool,
    total: Mutex<Tally>,
    /// Since the last progress line.
    interval: Mutex<Tally>,
    first_error: Mutex<Option<String>>,
}

impl Shared {
    fn t0(&self) -> Instant {
        *self.t0.get().expect("set before load starts")
    }

    fn measure_start(&self) -> Instant {
        self.t0() + self.plan.warmup
    }

    /// May a request be sent now? Counts it against `--ops`.
    fn admit(&self, now: Instant) -> bool {
        if self.prefill {
            return true; // bounded by the key count instead
        }
        let start = self.measure_start();
        if now < start {
            return true;
        }
        match self.plan.ops {
            Some(n) => self.issued.fetch_add(1, Relaxed) < n,
            None => now < start + self.plan.duration,
        }
    }

    fn fail(&self, e: String) {
        let mut first = self.first_error.lock().unwrap();
        if first.is_none() {
            *first = Some(e);
        }
    }
}

/// One request in flight.
#[derive(Clone, Copy)]
struct Pending {
    kind: Kind,
    key: u64,
    /// When it was sent (closed loop) or due (open loop).
    at: Instant,
}

/// A connection's counts not yet folded into the shared totals.
struct Local {
    tally: Tally,
    unflushed: u32,
}

impl Local {
    fn new() -> Local {
        Local {
            tally: Tally::new(),
            unflushed: 0,
        }
    }

    fn record(&mut self, shared: &Shared, p: &Pending, r: &reply::Reply, now: Instant) {
        if p.at < shared.measure_start() || shared.prefill {
            return;
        }
        let c = &mut self.tally.counts;
        c.ops += 1;
        match p.kind {
            Kind::Get { keys } => {
                c.gets += 1;
                c.get_keys += u64::from(keys);
                c.hits += u64::from(r.hits);
            }
            Kind::Set => c.sets += 1,
        }
        c.errors += u64::from(r.error);
        c.last_done = c
            .last_done
            .max(now.duration_since(shared.t0()).as_nanos() as u64);
        let ns = now.saturating_duration_since(p.at).as_nanos() as u64;
        let _ = self.tally.latency.record(ns.clamp(1, 60_000_000_000));
        self.unflushed += 1;
        if self.unflushed >= FLUSH_EVERY {
            self.flush(shared);
        }
    }

    fn flush(&mut self, shared: &Shared) {
        if self.unflushed == 0 {
            return;
        }
        shared.total.lock().unwrap().add(&self.tally);
        shared.interval.lock().unwrap().add(&self.tally);
        self.tally.counts = Counts::default();
        self.tally.latency.reset();
        self.unflushed = 0;
    }
}

/// Sets every key once, `depth` deep on each connection; not measured.
pub fn prefill(plan: &Plan, workload: &Workload) -> anyhow::Result<()> {
    let plan = Plan {
        ops: None,
        rate: None,
        warmup: Duration::ZERO,
        progress: false,
        ..plan.clone()
    };
    drive(plan, workload.clone(), true).map(|_| ())
}

/// Runs the load and returns what was measured.
pub fn run(plan: &Plan, workload: &Workload) -> anyhow::Result<Outcome> {
    drive(plan.clone(), workload.clone(), false)
}

fn drive(plan: Plan, workload: Workload, prefill: bool) -> anyhow::Result<Outcome> {
    let threads = plan.threads.clamp(1, plan.connections.max(1));
    let shared = Arc::new(Shared {
        plan: plan.clone(),
        workload,
        t0: OnceLock::new(),
        issued: AtomicU64::new(0),
        next_key: AtomicU64::new(0),
        prefill,
        total: Mutex::new(Tally::new()),
        interval: Mutex::new(Tally::new()),
        first_error: Mutex::new(None),
    });
    let barrier = Arc::new(Barrier::new(threads + 1));
    let mut handles = Vec::new();
    for t in 0..threads {
        let shared = shared.clone();
        let barrier = barrier.clone();
        let conns: Vec<usize> = (t..plan.connections).step_by(threads).collect();
        handles.push(
            std::thread::Builder::new()
                .name(format!("bench-{t}"))
                .spawn(move || thread_main(shared, barrier, conns))
                .context("cannot start a load thread")?,
        );
    }
    barrier.wait(); // every connection is up (or failed)
    let t0 = *shared.t0.get_or_init(Instant::now);
    // Bound first: a guard in the `if let` would be held while joining the
    // threads, which take the same lock after the barrier.
    let failed = shared.first_error.lock().unwrap().clone();
    if let Some(e) = failed {
        for h in handles {
            let _ = h.join();
        }
        bail!(e);
    }
    let mut next_line = t0 + Duration::from_secs(1);
    while handles.iter().any(|h| !h.is_finished()) {
        std::thread::sleep(Duration::from_millis(20));
        let now = Instant::now();
        if plan.progress && now >= next_line {
            let mut iv = shared.interval.lock().unwrap();
            let secs = now
                .duration_since(next_line - Duration::from_secs(1))
                .as_secs_f64();
            let phase = if now < t0 + plan.warmup {
                " (warm-up)"
            } else {
                ""
            };
            eprintln!(
                "[{:>4.0}s] {:>10.0} ops/s  p50 {:>8.1}µs  p99 {:>8.1}µs  errors {}{}",
                now.duration_since(t0).as_secs_f64(),
                iv.counts.ops as f64 / secs,
                iv.latency.value_at_quantile(0.50) as f64 / 1e3,
                iv.latency.value_at_quantile(0.99) as f64 / 1e3,
                iv.counts.errors,
                phase,
            );
            *iv = Tally::new();
            next_line = now + Duration::from_secs(1);
        }
    }
    for h in handles {
        if h.join().is_err() {
            bail!("a load thread panicked");
        }
    }
    let failed = shared.first_error.lock().unwrap().clone();
    if let Some(e) = failed {
        bail!(e);
    }
    let total = std::mem::replace(&mut *shared.total.lock().unwrap(), Tally::new());
    let span = Duration::from_nanos(total.counts.last_done)
        .saturating_sub(plan.warmup)
        .max(Duration::from_micros(1));
    let label = plan
        .servers
        .iter()
        .map(|s| s.to_string())
        .collect::<Vec<_>>()
        .join(",");
    Ok(Outcome::new(label, span, &total))
}

fn thread_main(shared: Arc<Shared>, barrier: Arc<Barrier>, conns: Vec<usize>) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            shared.fail(format!("cannot start a runtime: {e}"));
            barrier.wait();
            return;
        }
    };
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let mut streams = Vec::new();
        for &c in &conns {
            let addr = shared.plan.servers[c % shared.plan.servers.len()];
            let opened = open(addr, &shared.plan.security);
            match tokio::time::timeout(Duration::from_secs(5), opened).await {
                Ok(Ok(s)) => streams.push((c, s)),
                Ok(Err(e)) => shared.fail(format!("cannot connect to {addr}: {e}")),
                Err(_) => shared.fail(format!("connecting to {addr} timed out")),
            }
        }
        // A current-thread runtime: blocking here holds up nothing else.
        barrier.wait();
        if shared.first_error.lock().unwrap().is_some() {
            return;
        }
        shared.t0.get_or_init(Instant::now);
        let mut tasks = Vec::new();
        for (c, stream) in streams {
            let shared = shared.clone();
            let rng = SmallRng::seed_from_u64(
                shared.plan.seed ^ (c as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
            );
            tasks.push(tokio::task::spawn_local(async move {
                let result = match stream {
                    Conn::Plain(s) => {
                        let (rd, wr) = s.into_split();
                        drive_connection(shared.clone(), rd, wr, c, rng).await
                    }
                    Conn::Tls(s) => {
                        let (rd, wr) = tokio::io::split(*s);
                        drive_connection(shared.clone(), rd, wr, c, rng).await
                    }
                };
                if let Err(e) = result {
                    shared.fail(e.to_string());
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
    });
}

/// Picks the next request and writes it.
fn next_request(
    shared: &Shared,
    chooser: &mut Chooser,
    out: &mut Vec<u8>,
    followup: &mut VecDeque<u64>,
    at: Instant,
) -> Option<Pending> {
    let w = &shared.workload;
    let set_key = if shared.prefill {
        let key = shared.next_key.fetch_add(1, Relaxed);
        if key >= w.keys {
            return None;
        }
        Some(key)
    } else {
        followup.pop_front()
    };
    if let Some(key) = set_key {
        let len = chooser.value_len(w);
        w.put_set(out, key, len);
        return Some(Pending {
            kind: Kind::Set,
            key,
            at,
        });
    }
    if chooser.is_get(w) {
        let mut keys = [0u64; 100];
        for k in keys.iter_mut().take(w.multiget) {
            *k = chooser.key(w);
        }
        w.put_get(out, &keys[..w.multiget]);
        Some(Pending {
            kind: Kind::Get {
                keys: w.multiget as u32,
            },
            key: keys[0],
            at,
        })
    } else {
        let key = chooser.key(w);
        let len = chooser.value_len(w);
        w.put_set(out, key, len);
        Some(Pending {
            kind: Kind::Set,
            key,
            at,
        })
    }
}

/// Parses every whole reply in `inbuf`, matching them to `pending` in order.
fn take_replies(
    shared: &Shared,
    inbuf: &mut BytesMut,
    pending: &mut VecDeque<Pending>,
    local: &mut Local,
    followup: &mut VecDeque<u64>,
) -> anyhow::Result<()> {
    let now = Instant::now();
    while let Some(p) = pending.front().copied() {
        let Some(r) =
            reply::parse(inbuf, p.kind, shared.workload.protocol).map_err(anyhow::Error::msg)?
        else {
            break;
        };
        inbuf.advance(r.consumed);
        pending.pop_front();
        local.record(shared, &p, &r, now);
        if shared.workload.set_on_miss && r.hits == 0 && !r.error && p.kind != Kind::Set {
            followup.push_back(p.key);
        }
    }
    if pending.is_empty() && !inbuf.is_empty() {
        bail!("{} bytes arrived that answer no request", inbuf.len());
    }
    Ok(())
}

/// One connection's load, open or closed loop.
async fn drive_connection<R, W>(
    shared: Arc<Shared>,
    rd: R,
    wr: W,
    conn: usize,
    rng: SmallRng,
) -> anyhow::Result<()>
where
    R: AsyncRead + Unpin + 'static,
    W: AsyncWrite + Unpin + 'static,
{
    if shared.plan.rate.is_some() && !shared.prefill {
        open_loop(shared, rd, wr, conn, rng).await
    } else {
        closed_loop(&shared, rd, wr, rng).await
    }
}

async fn read_some(
    shared: &Shared,
    rd: &mut (impl AsyncRead + Unpin),
    inbuf: &mut BytesMut,
) -> anyhow::Result<()> {
    inbuf.reserve(64 * 1024);
    match tokio::time::timeout(shared.plan.stall, rd.read_buf(inbuf)).await {
        Err(_) => bail!("no reply for {:?}", shared.plan.stall),
        Ok(Err(e)) => Err(e.into()),
        Ok(Ok(0)) => bail!("the server closed the connection"),
        Ok(Ok(_)) => Ok(()),
    }
}

async fn closed_loop(
    shared: &Shared,
    mut rd: impl AsyncRead + Unpin,
    mut wr: impl AsyncWrite + Unpin,
    rng: SmallRng,
) -> anyhow::Result<()> {
    let mut chooser = Chooser::new(&shared.workload, rng);
    let mut pending = VecDeque::with_capacity(shared.plan.depth);
    let mut followup = VecDeque::new();
    let mut out = Vec::with_capacity(64 * 1024);
    let mut inbuf = BytesMut::with_capacity(64 * 1024);
    let mut local = Local::new();
    let mut open = true;
    loop {
        let now = Instant::now();
        while open && pending.len() < shared.plan.depth {
            if !shared.admit(now) {
                open = false;
                break;
            }
            match next_request(shared, &mut chooser, &mut out, &mut followup, now) {
                Some(p) => pending.push_back(p),
                None => open = false,
            }
        }
        if !out.is_empty() {
            wr.write_all(&out).await?;
            // TLS: the records written so far go out (a no-op on TCP).
            wr.flush().await?;
            out.clear();
        }
        if pending.is_empty() {
            break;
        }
        read_some(shared, &mut rd, &mut inbuf).await?;
        take_replies(shared, &mut inbuf, &mut pending, &mut local, &mut followup)?;
    }
    local.flush(shared);
    Ok(())
}

async fn open_loop(
    shared: Arc<Shared>,
    mut rd: impl AsyncRead + Unpin,
    wr: impl AsyncWrite + Unpin + 'static,
    conn: usize,
    rng: SmallRng,
) -> anyhow::Result<()> {
    let rate = shared.plan.rate.expect("open loop has a rate");
    let gap = Duration::from_secs_f64(shared.plan.connections as f64 / rate);
    let line = Rc::new(Line::default());
    line.writing.set(true);
    // Stagger the connections' schedules across one gap.
    let first = shared.t0() + gap.mul_f64(conn as f64 / shared.plan.connections as f64);
    let writer = tokio::task::spawn_local({
        let (shared, line) = (shared.clone(), line.clone());
        async move {
            let r = send_on_schedule(&shared, wr, rng, first, gap, &line).await;
            line.writing.set(false);
            line.sent.notify_one();
            r
        }
    });
    let mut inbuf = BytesMut::with_capacity(64 * 1024);
    let mut local = Local::new();
    let mut followup = VecDeque::new();
    let result = async {
        loop {
            if line.pending.borrow().is_empty() {
                if !line.writing.get() {
                    return Ok(());
                }
                line.sent.notified().await;
                continue;
            }
            read_some(&shared, &mut rd, &mut inbuf).await?;
            let mut pending = line.pending.borrow_mut();
            take_replies(&shared, &mut inbuf, &mut pending, &mut local, &mut followup)?;
        }
    }
    .await;
    local.flush(&shared);
    if result.is_err() {
        writer.abort();
        return result;
    }
    writer
        .await
        .map_err(|e| anyhow::anyhow!("writer failed: {e}"))??;
    Ok(())
}

/// What an open-loop connection's writer and reader share.
#[derive(Default)]
struct Line {
    pending: RefCell<VecDeque<Pending>>,
    writing: Cell<bool>,
    sent: tokio::sync::Notify,
}

/// How far ahead of a due time the writer stops sleeping and starts polling:
/// tokio's timer has millisecond resolution.
const SPIN_AHEAD: Duration = Duration::from_millis(2);

async fn send_on_schedule(
    shared: &Shared,
    mut wr: impl AsyncWrite + Unpin,
    rng: SmallRng,
    first: Instant,
    gap: Duration,
    line: &Line,
) -> anyhow::Result<()> {
    let mut chooser = Chooser::new(&shared.workload, rng);
    let mut followup = VecDeque::new();
    let mut out = Vec::with_capacity(64 * 1024);
    let mut due = first;
    loop {
        let now = Instant::now();
        if due > now {
            if due - now > SPIN_AHEAD {
                tokio::time::sleep_until((due - SPIN_AHEAD / 2).into()).await;
            } else {
                tokio::task::yield_now().await;
            }
            continue;
        }
        {
            let mut pending = line.pending.borrow_mut();
            while due <= now && pending.len() < OPEN_LOOP_OUTSTANDING_MAX {
                if !shared.admit(due) {
                    break;
                }
                match next_request(shared, &mut chooser, &mut out, &mut followup, due) {
                    Some(p) => pending.push_back(p),
                    None => break,
                }
                due += gap;
            }
        }
        if out.is_empty() {
            if due <= now && line.pending.borrow().len() >= OPEN_LOOP_OUTSTANDING_MAX {
                tokio::task::yield_now().await; // behind: let replies drain
                continue;
            }
            return Ok(()); // the schedule is over
        }
        line.sent.notify_one();
        wr.write_all(&out).await?;
        wr.flush().await?;
        out.clear();
    }
}
