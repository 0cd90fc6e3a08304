//! `webvac-bench reliability`: what retries buy, measured against the model.
//!
//! **Listing.** With a fraction p of replies lost (the client transport
//! drops them; the client notices by its per-attempt timeout), list N keys
//! through `lk`, K attempts per call, T times. A call fails only if all K
//! attempts lose their reply, so a listing of C calls succeeds with
//! probability (1 - p^K)^C. C is counted by a loss-free listing first. The
//! table prints the measured rate with its 95% Wilson interval next to the
//! model, and whether the model lies inside it.
//!
//! **Counting** (`--op incr`). M increments of one counter under the same
//! loss, each retried until it gets an answer: once with request ids (the
//! client's own), once without (a blind retry, as memcached clients do).
//! With ids the counter ends at exactly M; without, every retry whose lost
//! reply was for an applied increment counts twice.
//!
//! Both flush the server first: run them against a server of their own.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use webvac::client::{Client, ClientConfig, ClientError, ClientFaults, Options};

/// What one run of the experiment is told.
#[derive(Debug, Clone)]
pub struct Settings {
    pub server: String,
    pub loss: f64,
    pub keys: Vec<usize>,
    pub retries: Vec<u32>,
    pub trials: usize,
    pub page: u32,
    pub attempt_timeout: Duration,
    pub seed: u64,
    pub ops: u64,
}

/// A client whose only retry limits are `attempts` and the deadline: the
/// retry budget is opened wide, since the experiment measures attempts.
fn client_config(s: &Settings, attempts: u32, loss: f64, seed: u64, ids: bool) -> ClientConfig {
    ClientConfig {
        pool_size: 1,
        attempt_timeout: s.attempt_timeout,
        deadline: Duration::from_secs(3600),
        max_attempts: attempts,
        backoff_base: Duration::from_micros(100),
        backoff_cap: Duration::from_millis(1),
        retry_ratio: 1.0,
        min_retries_per_sec: 1e9,
        retry_tokens_max: 1e9,
        request_ids: ids,
        faults: ClientFaults {
            drop_reply: loss,
            seed,
            ..ClientFaults::default()
        },
        ..ClientConfig::default()
    }
}

/// The 95% Wilson score interval of `successes` out of `n`.
pub fn wilson(successes: usize, n: usize) -> (f64, f64) {
    const Z: f64 = 1.959_964;
    let n = n as f64;
    let p = successes as f64 / n;
    let denom = 1.0 + Z * Z / n;
    let centre = (p + Z * Z / (2.0 * n)) / denom;
    let half = Z * ((p * (1.0 - p) / n) + Z * Z / (4.0 * n * n)).sqrt() / denom;
    // At 0 or n successes the bound is exactly 0 or 1; say so rather than
    // leave it to rounding.
    let lo = if successes == 0 {
        0.0
    } else {
        (centre - half).max(0.0)
    };
    let hi = if successes as f64 == n {
        1.0
    } else {
        (centre + half).min(1.0)
    };
    (lo, hi)
}

/// One listing: Ok(keys listed, calls) or the error that ended it.
async fn list_all(client: &Client, page: u32) -> Result<(usize, usize), ClientError> {
    let mut token: Option<String> = None;
    let (mut keys, mut calls) = (0usize, 0usize);
    loop {
        let p = client.list_page(token.as_deref(), page).await?;
        calls += 1;
        keys += p.keys.len();
        match p.next {
            Some(t) => token = Some(t),
            None => return Ok((keys, calls)),
        }
    }
}

async fn connect(s: &Settings, config: ClientConfig) -> anyhow::Result<Client> {
    Client::connect(&[s.server.as_str()], config)
        .await
        .with_context(|| format!("cannot reach {}", s.server))
}

/// Flushes the server and stores `n` keys.
async fn fill(s: &Settings, n: usize) -> anyhow::Result<()> {
    flush(&s.server).await?;
    let c = connect(s, client_config(s, 3, 0.0, 0, true)).await?;
    let opts = Options::default();
    for i in 0..n {
        c.set(format!("rel:{i}"), b"v", &opts).await?;
    }
    Ok(())
}

/// `flush_all` on one node (a cluster relays it to every member).
async fn flush(server: &str) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut c = tokio::net::TcpStream::connect(server).await?;
    c.write_all(b"flush_all\r\n").await?;
    let mut reply = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(10), c.read(&mut reply)).await??;
    if &reply[..n] != b"OK\r\n" {
        bail!(
            "flush_all answered {:?}",
            String::from_utf8_lossy(&reply[..n])
        );
    }
    Ok(())
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

pub async fn listing(s: &Settings) -> anyhow::Result<()> {
    println!(
        "listing: reply loss p = {}, page {} keys, {} trials per row, attempt timeout {} ms",
        s.loss,
        s.page,
        s.trials,
        s.attempt_timeout.as_millis()
    );
    println!(
        "{:>6} {:>2} {:>6} {:>9} {:>9} {:>19} {:>6} {:>10} {:>10}",
        "N", "K", "calls", "model", "measured", "95% CI", "agree", "mean", "p99"
    );
    for &n in &s.keys {
        fill(s, n).await?;
        let clean = connect(s, client_config(s, 1, 0.0, 0, true)).await?;
        let (listed, calls) = list_all(&clean, s.page).await?;
        if listed != n {
            bail!("a loss-free listing found {listed} keys, not {n}: is the server shared?");
        }
        for &k in &s.retries {
            let model = (1.0 - s.loss.powi(k as i32)).powi(calls as i32);
            let mut ok = 0usize;
            let mut times = Vec::with_capacity(s.trials);
            for t in 0..s.trials {
                let seed = s.seed ^ ((n as u64) << 32) ^ (u64::from(k) << 24) ^ t as u64;
                let c = connect(s, client_config(s, k, s.loss, seed, true)).await?;
                let start = Instant::now();
                let r = list_all(&c, s.page).await;
                times.push(start.elapsed());
                match r {
                    Ok((got, _)) if got == n => ok += 1,
                    Ok((got, _)) => bail!("a listing returned {got} keys, not {n}"),
                    Err(_) => {}
                }
            }
            times.sort_unstable();
            let mean = times.iter().sum::<Duration>() / times.len().max(1) as u32;
            let (lo, hi) = wilson(ok, s.trials);
            let agree = (lo..=hi).contains(&model);
            println!(
                "{n:>6} {k:>2} {calls:>6} {model:>9.4} {:>9.4} {:>19} {:>6} {:>8.1}ms {:>8.1}ms",
                ok as f64 / s.trials as f64,
                format!("[{lo:.4}, {hi:.4}]"),
                if agree { "yes" } else { "NO" },
                mean.as_secs_f64() * 1e3,
                percentile(&times, 0.99).as_secs_f64() * 1e3,
            );
        }
    }
    Ok(())
}

/// One increment, retried until it gets an answer (bounded): with `ids`,
/// the client's own retries carry one request id; without, every attempt
/// is a fresh blind `incr`.
async fn increment(c: &Client, key: &str, ids: bool, id: String) -> anyhow::Result<u32> {
    const TRIES_MAX: u32 = 1000;
    let opts = Options {
        request_id: ids.then_some(id),
        ..Options::default()
    };
    for tries in 1..=TRIES_MAX {
        match c.incr(key, 1, &opts).await {
            Ok(Some(_)) => return Ok(tries),
            Ok(None) => bail!("the counter {key} is gone"),
            Err(_) => continue,
        }
    }
    bail!("{TRIES_MAX} attempts of one increment all failed")
}

pub async fn counting(s: &Settings) -> anyhow::Result<()> {
    let k = s.retries.first().copied().unwrap_or(3);
    println!(
        "counting: {} increments, reply loss p = {}, {k} attempts per call",
        s.ops, s.loss
    );
    println!(
        "{:>12} {:>8} {:>10} {:>8} {:>12}",
        "request ids", "M", "counter", "resent", "counter - M"
    );
    fill(s, 0).await?;
    for ids in [true, false] {
        let key = if ids {
            "rel:count:ids"
        } else {
            "rel:count:blind"
        };
        let setup = connect(s, client_config(s, 3, 0.0, 0, true)).await?;
        setup.set(key, b"0", &Options::default()).await?;
        // Without ids the client refuses to retry an incr itself (it may
        // have run), so this loop is the blind retrier; with ids it may.
        let attempts = if ids { k } else { 1 };
        let c = connect(s, client_config(s, attempts, s.loss, s.seed, ids)).await?;
        let mut resent = 0u64;
        for i in 0..s.ops {
            let tries = increment(&c, key, ids, format!("rel-{}-{i}", s.seed)).await?;
            resent += u64::from(tries - 1);
        }
        resent += c.stats().retries;
        let v = setup.get(key).await?.context("the counter is gone")?;
        let counter: u64 = std::str::from_utf8(&v.data)?.trim().parse()?;
        println!(
            "{:>12} {:>8} {counter:>10} {resent:>8} {:>12}",
            if ids { "yes" } else { "no" },
            s.ops,
            counter as i64 - s.ops as i64
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wilson_brackets_the_rate() {
        let (lo, hi) = wilson(90, 100);
        assert!(lo < 0.9 && 0.9 < hi && lo > 0.8 && hi < 0.96, "{lo} {hi}");
        assert_eq!(wilson(0, 200).0, 0.0);
        assert_eq!(wilson(200, 200).1, 1.0);
    }
}
