//! A tier-1 HTTP service with webvac embedded as its cache.
//!
//! Several instances of this service, and any `webvac` servers, form one
//! cluster: a product loaded through one instance is a hit through every
//! other, and memcached clients see the same data. What it shows:
//!
//! - **Cache-aside reads**, `GET /products/{id}`: look in the cache; on a
//!   miss load the product from the origin (a simulated slow database),
//!   fill the cache with a TTL and answer. The `x-cache` header says `hit`
//!   or `miss`.
//! - **Write-through and invalidation**, `PUT` and `DELETE /products/{id}`.
//! - **A counter that is safe to retry**, `POST /products/{id}/views`: the
//!   client's `Idempotency-Key` becomes the request id of the `incr`, so a
//!   POST retried with the same key counts once, even when the retry reaches
//!   another instance (see [`add_view`]).
//! - **Both kinds of handle, with the same calls.** With `--config` the
//!   process is a full member: it holds its share of the partitions, answers
//!   reads of them from its own memory and serves the memcached port. With
//!   `--client-only` it holds nothing and sends every call to the cluster.
//!   With neither it is a lone node, a cache private to this process.
//!
//! ```text
//!  curl ─HTTP─▶ cache_aside ◀──peer──▶ cache_aside ◀──peer──▶ webvac ◀── memcached
//!               (member 1)             (member 2)             (member 3)   clients
//! ```
//!
//! A three-member cluster on one machine (`GET /stats` shows the counters):
//!
//! ```text
//! cargo build --release --examples --bin webvac
//! target/release/examples/cache_aside --config config/cluster-3/node1.toml --http 127.0.0.1:8081
//! target/release/examples/cache_aside --config config/cluster-3/node2.toml --http 127.0.0.1:8082
//! target/release/webvac --config config/cluster-3/node3.toml
//! curl -i 127.0.0.1:8081/products/7    # x-cache: miss, then hit, also on :8082
//! ```

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use clap::Parser;
use serde::{Deserialize, Serialize};
use tracing::warn;
use tracing_subscriber::EnvFilter;
use webvac::Node;
use webvac::client::{ClientError, Options, REQUEST_ID_BYTES_MAX};
use webvac::config::Config;
use webvac::node::Role;

/// How long a cached product lives, in seconds: the bound on how stale a
/// hit can be when the origin changes without telling the cache.
const PRODUCT_TTL_SECS: u32 = 60;
/// Largest product document `PUT` takes (webvac's item limit is 1 MiB).
const PRODUCT_BYTES_MAX: usize = 64 * 1024;
/// Longest `Idempotency-Key` accepted.
const IDEMPOTENCY_KEY_BYTES_MAX: usize = 255;
/// Hex digits of the Idempotency-Key's hash in a request id (108 bits).
const KEY_DIGEST_HEX: usize = 27;
/// Rounds of "incr missed, create the counter" one view may take. A second
/// round only happens when the counter vanished (evicted, deleted) between
/// the create and the incr.
const VIEW_ROUNDS_MAX: usize = 3;

// A request id is a 5-byte prefix and the digest.
const _: () = assert!("view-".len() + KEY_DIGEST_HEX <= REQUEST_ID_BYTES_MAX);

#[derive(Debug, Parser)]
#[command(about = "A cache-aside HTTP service with an embedded webvac node")]
struct Args {
    /// webvac TOML, as the `webvac` server takes; a `[cluster]` section
    /// makes this process a member. Without it (and without
    /// --client-only): a lone in-process cache with no port.
    #[arg(long, value_name = "FILE")]
    config: Option<String>,
    /// Where the HTTP API listens.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8080")]
    http: SocketAddr,
    /// Hold no data: reach the cluster through any of these memcached
    /// addresses (comma-separated).
    #[arg(
        long,
        value_name = "SEEDS",
        value_delimiter = ',',
        conflicts_with = "config"
    )]
    client_only: Option<Vec<String>>,
    /// How long one load from the simulated origin takes.
    #[arg(long, value_name = "N", default_value_t = 50)]
    origin_delay_ms: u64,
}

/// What every request handler shares.
struct App {
    /// The cache: an embedded member or a client-only handle.
    cache: Node,
    /// How long one origin load takes.
    origin_delay: Duration,
    /// Loads from the origin (misses that reached the "database").
    origin_loads: AtomicU64,
    /// Product reads answered from the cache.
    hits: AtomicU64,
    /// Product reads the cache could not answer.
    misses: AtomicU64,
}

type AppState = State<Arc<App>>;

impl App {
    /// The system of record: slow, and the same document for an id every
    /// time.
    async fn load_from_origin(&self, id: u64) -> String {
        self.origin_loads.fetch_add(1, Relaxed);
        tokio::time::sleep(self.origin_delay).await;
        let price_cents = 100 + id.wrapping_mul(7919) % 10_000;
        format!(r#"{{"id":{id},"name":"product {id}","price_cents":{price_cents}}}"#)
    }
}

/// `GET /products/{id}`: cache-aside.
async fn get_product(State(app): AppState, Path(id): Path<u64>) -> Response {
    let key = product_key(id);
    // The cache speeds reads up but is not needed to answer one: when it
    // fails, the origin still does.
    match app.cache.get(&key).await {
        Ok(Some(hit)) => {
            app.hits.fetch_add(1, Relaxed);
            return json_document(hit.data, "hit");
        }
        Ok(None) => {}
        Err(e) => warn!(key, error = %e, "cache read failed; reading the origin"),
    }
    app.misses.fetch_add(1, Relaxed);
    let product = app.load_from_origin(id).await;
    // `add`, not `set`: it stores only if the key is still absent, so a fill
    // that raced with a PUT never replaces the newer document with the one
    // it loaded before. Two instances that miss together both load; one
    // fill stores, the other is a no-op.
    if let Err(e) = app
        .cache
        .add(&key, &product, &Options::ttl(PRODUCT_TTL_SECS))
        .await
    {
        warn!(key, error = %e, "cache fill failed");
    }
    json_document(product.into(), "miss")
}

/// What `PUT` checks of a product document: that it is JSON and that it is
/// about the product of its path. The rest is stored as sent.
#[derive(Deserialize)]
struct ProductBody {
    id: u64,
}

/// `PUT /products/{id}`: write-through. A real service writes its database
/// first, then replaces the cached copy, so readers see the new document at
/// once instead of after the TTL. The origin here is read-only, so only the
/// cache changes (until the TTL or a DELETE brings the origin's back).
async fn put_product(
    State(app): AppState,
    Path(id): Path<u64>,
    body: Bytes,
) -> Result<StatusCode, AppError> {
    // Checked before it is cached: every instance trusts what it finds there.
    let Json(product) = Json::<ProductBody>::from_bytes(&body)
        .map_err(|e| AppError(StatusCode::BAD_REQUEST, e.body_text()))?;
    if product.id != id {
        let why = format!("the document is about product {}", product.id);
        return Err(AppError(StatusCode::BAD_REQUEST, why));
    }
    let ttl = Options::ttl(PRODUCT_TTL_SECS);
    app.cache.set(product_key(id), &body, &ttl).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `DELETE /products/{id}`: invalidation. The next read loads the origin.
async fn delete_product(State(app): AppState, Path(id): Path<u64>) -> Result<StatusCode, AppError> {
    // Whether it was cached does not matter: either way it is not now.
    app.cache
        .delete(product_key(id), &Options::default())
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Serialize)]
struct Views {
    id: u64,
    views: u64,
}

/// `POST /products/{id}/views`: counts a view, once per `Idempotency-Key`.
///
/// Why a retried POST counts once, wherever it lands:
/// - The `incr` carries a request id derived from the Idempotency-Key.
///   webvac records the id and its result in the counter's item, which is
///   replicated with it; an `incr` repeated with that id, through any
///   instance, answers the recorded result and adds nothing.
/// - A miss records nothing (there is no item to hold it), so after
///   creating the counter the same id can still increment it.
/// - The counter is created with `add "0"`: `add` stores only if the key is
///   absent, so two requests that both miss cannot reset each other's counts
///   (one add stores, the other answers "not stored", and both then incr).
///   The view is counted only by the incr that carries the id; creating the
///   counter at 1 instead would count it in the `add`, and a retry's incr
///   would find no record of its id and count it a second time.
/// - The `add` carries an id derived from the same key, so a retried add
///   answers as the first did; its answer is not used anyway.
async fn add_view(
    State(app): AppState,
    Path(id): Path<u64>,
    headers: HeaderMap,
) -> Result<Json<Views>, AppError> {
    let idempotency_key = match headers.get("idempotency-key") {
        Some(v) if (1..=IDEMPOTENCY_KEY_BYTES_MAX).contains(&v.len()) => v.as_bytes().to_vec(),
        Some(_) => {
            let why = format!("Idempotency-Key must be 1 to {IDEMPOTENCY_KEY_BYTES_MAX} bytes");
            return Err(AppError(StatusCode::BAD_REQUEST, why));
        }
        // Without a key a retry cannot be told from a new view: a fresh one
        // still makes this request's own attempts count once.
        None => rand::random::<u128>().to_le_bytes().to_vec(),
    };
    let (view_id, init_id) = request_ids(&idempotency_key);
    let key = format!("views:{id}");
    let view = Options {
        request_id: Some(view_id),
        ..Options::default()
    };
    let init = Options {
        request_id: Some(init_id),
        ..Options::default()
    };
    for _ in 0..VIEW_ROUNDS_MAX {
        if let Some(views) = app.cache.incr(&key, 1, &view).await? {
            return Ok(Json(Views { id, views }));
        }
        app.cache.add(&key, "0", &init).await?;
    }
    let why = format!("counter {key} vanished {VIEW_ROUNDS_MAX} times in a row");
    Err(AppError(StatusCode::SERVICE_UNAVAILABLE, why))
}

/// The request ids of one view: for its `incr` and for the `add` that may
/// create the counter. A request id is at most 32 printable bytes and an
/// Idempotency-Key may be longer (a UUID has 36), so the key is hashed.
fn request_ids(idempotency_key: &[u8]) -> (String, String) {
    let hash = blake3::hash(idempotency_key).to_hex();
    let digest = &hash[..KEY_DIGEST_HEX];
    (format!("view-{digest}"), format!("init-{digest}"))
}

#[derive(Serialize)]
struct Stats {
    role: &'static str,
    node_id: Option<u16>,
    memcached: Option<SocketAddr>,
    origin_loads: u64,
    hits: u64,
    misses: u64,
}

/// `GET /stats`.
async fn stats(State(app): AppState) -> Json<Stats> {
    Json(Stats {
        role: role_name(app.cache.role()),
        node_id: app.cache.node_id(),
        memcached: app.cache.memcached_addr(),
        origin_loads: app.origin_loads.load(Relaxed),
        hits: app.hits.load(Relaxed),
        misses: app.misses.load(Relaxed),
    })
}

fn product_key(id: u64) -> String {
    format!("product:{id}")
}

/// A product document as the answer, saying where it came from.
fn json_document(body: Bytes, cache: &'static str) -> Response {
    let headers = [
        (
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        ),
        (
            header::HeaderName::from_static("x-cache"),
            HeaderValue::from_static(cache),
        ),
    ];
    (headers, body).into_response()
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::Member => "member",
        Role::ClientOnly => "client-only",
    }
}

/// An error answer: a status and a one-line reason.
struct AppError(StatusCode, String);

impl From<ClientError> for AppError {
    fn from(e: ClientError) -> AppError {
        AppError(StatusCode::SERVICE_UNAVAILABLE, format!("cache: {e}"))
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        (self.0, format!("{}\n", self.1)).into_response()
    }
}

/// Starts the cache this process uses, as the flags say.
async fn start_cache(args: &Args) -> anyhow::Result<Node> {
    let builder = match (&args.client_only, &args.config) {
        (Some(seeds), _) => Node::builder().client_only(seeds),
        // A member serves the memcached port too, so that `webvac`
        // processes, memcached clients and client-only instances can reach
        // the partitions it holds.
        (None, Some(path)) => Node::builder()
            .config(Config::from_file(path)?)
            .serve_memcached(true),
        (None, None) => Node::builder(),
    };
    Ok(builder.start().await?)
}

/// Completes on ctrl-c (SIGINT) or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Logs go to stderr; stdout has the one line that says where we listen.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let args = Args::parse();
    let cache = start_cache(&args).await?;
    let http = tokio::net::TcpListener::bind(args.http).await?;
    let memcached = cache
        .memcached_addr()
        .map_or_else(|| "-".to_string(), |a| a.to_string());
    println!(
        "cache_aside listening http={} memcached={memcached} role={} node_id={}",
        http.local_addr()?,
        role_name(cache.role()),
        cache
            .node_id()
            .map_or_else(|| "-".to_string(), |id| id.to_string()),
    );
    let app = Arc::new(App {
        cache,
        origin_delay: Duration::from_millis(args.origin_delay_ms),
        origin_loads: AtomicU64::new(0),
        hits: AtomicU64::new(0),
        misses: AtomicU64::new(0),
    });
    let routes = Router::new()
        .route(
            "/products/{id}",
            get(get_product).put(put_product).delete(delete_product),
        )
        .route("/products/{id}/views", post(add_view))
        .route("/stats", get(stats))
        .layer(DefaultBodyLimit::max(PRODUCT_BYTES_MAX))
        .with_state(app.clone());
    // First the HTTP server: it stops accepting and lets the requests in
    // flight finish. Then no handler uses the cache, and the node leaves.
    axum::serve(http, routes)
        .with_graceful_shutdown(shutdown_signal())
        .await?;
    app.cache.shutdown().await?;
    println!("cache_aside stopped");
    Ok(())
}
