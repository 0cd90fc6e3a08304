//! The Prometheus endpoint's listener: `GET /metrics` over plain HTTP/1.1
//! (`metrics_listen`, `--metrics-listen`), served by hyper.
//!
//! It is an operator's port, not a client's, and it is bounded like every
//! other: at most [`METRICS_CONNECTIONS_MAX`] connections at once (more are
//! closed at once), a header must arrive within
//! [`METRICS_HEADER_TIMEOUT_MS`], a connection lives at most
//! [`METRICS_CONNECTION_LIFETIME_MS`], hyper's read buffer is held to
//! [`METRICS_READ_BUFFER_BYTES`], and scrapes are rendered at most
//! [`METRICS_SCRAPES_PER_SEC`] a second (`429` past that). Nothing it
//! receives reaches the store.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{ACCEPT, ALLOW, CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use hyper::{Method, Request as HttpRequest, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::debug;

use super::Shared;
use super::latency::Command;
use super::metrics::{Format, Scrape, StatLines};
use crate::limits::{
    METRICS_CONNECTION_LIFETIME_MS, METRICS_CONNECTIONS_MAX, METRICS_HEADER_TIMEOUT_MS,
    METRICS_READ_BUFFER_BYTES, METRICS_SCRAPES_BURST, METRICS_SCRAPES_PER_SEC,
};
use crate::protocol::Request;
use crate::protocol::stats::StatsCmd;

/// Takes what one scrape reports: the node's `stats`, `stats settings` and
/// (on a member) `stats cluster` replies, as a client would get them, and
/// the latency histograms.
pub async fn scrape(shared: &Shared) -> Scrape {
    let mut out = Vec::with_capacity(4096);
    super::execute::execute(shared, Request::Stats(StatsCmd::General), &mut out);
    let general = StatLines::parse(&out);
    out.clear();
    super::execute::execute(shared, Request::Stats(StatsCmd::Settings), &mut out);
    let settings = StatLines::parse(&out);
    let cluster = match &shared.cluster {
        Some(c) => {
            out.clear();
            let request = Request::Stats(StatsCmd::Group(b"cluster"));
            c.coordinate(shared, &request, b"stats cluster\r\n", &mut out)
                .await;
            Some(StatLines::parse(&out))
        }
        None => None,
    };
    let latency = Command::ALL
        .iter()
        .map(|&c| (c, shared.latency.snapshot(c)))
        .filter(|(_, s)| s.count > 0)
        .collect();
    Scrape {
        general,
        settings,
        cluster,
        latency,
    }
}

/// A token bucket over scrapes: [`METRICS_SCRAPES_PER_SEC`], bursts of
/// [`METRICS_SCRAPES_BURST`].
#[derive(Debug)]
struct ScrapeBudget {
    /// Tokens left, and when they were counted.
    state: parking_lot::Mutex<(f64, std::time::Instant)>,
}

impl ScrapeBudget {
    fn new() -> ScrapeBudget {
        ScrapeBudget {
            state: parking_lot::Mutex::new((
                f64::from(METRICS_SCRAPES_BURST),
                std::time::Instant::now(),
            )),
        }
    }

    /// Takes a token if there is one.
    fn take(&self) -> bool {
        let mut state = self.state.lock();
        let now = std::time::Instant::now();
        let refill = now.duration_since(state.1).as_secs_f64() * f64::from(METRICS_SCRAPES_PER_SEC);
        state.0 = (state.0 + refill).min(f64::from(METRICS_SCRAPES_BURST));
        state.1 = now;
        if state.0 >= 1.0 {
            state.0 -= 1.0;
            true
        } else {
            false
        }
    }
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

async fn answer(
    shared: Arc<Shared>,
    budget: Arc<ScrapeBudget>,
    request: HttpRequest<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    const TEXT: &str = "text/plain; charset=utf-8";
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut r = reply(
            StatusCode::METHOD_NOT_ALLOWED,
            TEXT,
            "only GET and HEAD\n".into(),
        );
        r.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return Ok(r);
    }
    Ok(match request.uri().path() {
        "/metrics" if !budget.take() => {
            let mut r = reply(
                StatusCode::TOO_MANY_REQUESTS,
                TEXT,
                format!("at most {METRICS_SCRAPES_PER_SEC} scrapes a second\n"),
            );
            r.headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from_static("1"));
            r
        }
        "/metrics" => {
            let accept = request.headers().get(ACCEPT).and_then(|v| v.to_str().ok());
            let format = Format::from_accept(accept);
            let body = scrape(&shared).await.render(format);
            reply(StatusCode::OK, format.content_type(), body)
        }
        "/" => reply(StatusCode::OK, TEXT, "webvac: metrics at /metrics\n".into()),
        _ => reply(StatusCode::NOT_FOUND, TEXT, "not found\n".into()),
    })
}

/// Serves the endpoint until the task is dropped.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let slots = Arc::new(Semaphore::new(METRICS_CONNECTIONS_MAX));
    let budget = Arc::new(ScrapeBudget::new());
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                debug!(error = %e, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            debug!(peer = %peer, "metrics connection refused: too many open");
            continue; // dropped: closed at once
        };
        let (shared, budget) = (shared.clone(), budget.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let service =
                hyper::service::service_fn(move |r| answer(shared.clone(), budget.clone(), r));
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_millis(METRICS_HEADER_TIMEOUT_MS))
                .max_buf_size(METRICS_READ_BUFFER_BYTES);
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            let lifetime = Duration::from_millis(METRICS_CONNECTION_LIFETIME_MS);
            match tokio::time::timeout(lifetime, conn).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => debug!(peer = %peer, error = %e, "metrics connection failed"),
                Err(_) => debug!(peer = %peer, "metrics connection closed at its lifetime"),
            }
        });
    }
}
