//! `webvac-bench`: a load generator for the memcached text and meta
//! protocols, for webvac and memcached alike.
//!
//! `webvac-bench run` measures one server; `webvac-bench compare` runs the
//! same workload against two servers alternately and prints B/A ratios;
//! `webvac-bench respond` is the trivial responder, the ceiling to measure
//! against. See the README's "Performance" section.

#[path = "webvac-bench/reliability.rs"]
mod reliability;
#[path = "webvac-bench/reply.rs"]
mod reply;
#[path = "webvac-bench/report.rs"]
mod report;
#[path = "webvac-bench/respond.rs"]
mod respond;
#[path = "webvac-bench/run.rs"]
mod run;
#[path = "webvac-bench/workload.rs"]
mod workload;

use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};

use report::Outcome;
use run::Plan;
use workload::{KeyDist, Protocol, SizeRange, Workload};

#[derive(Parser)]
#[command(
    name = "webvac-bench",
    version,
    about = "Load generator for memcached-protocol servers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Measure one server (or spread connections over several).
    Run {
        /// Server address; repeat to spread connections round-robin.
        #[arg(short, long = "server", default_value = "127.0.0.1:11211")]
        servers: Vec<String>,
        #[command(flatten)]
        load: Load,
    },
    /// Run the same workload against A and B alternately (A B A B …) and
    /// print every metric with its B/A ratio.
    Compare {
        /// Server A (the baseline).
        #[arg(short = 'a', long)]
        a: String,
        /// Server B (measured against A).
        #[arg(short = 'b', long)]
        b: String,
        /// Names for A and B in the table.
        #[arg(long, default_value = "A,B", value_delimiter = ',')]
        names: Vec<String>,
        /// A B rounds (at least 3).
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(3..))]
        rounds: u32,
        #[command(flatten)]
        load: Load,
    },
    /// What retries buy under message loss, measured against the model:
    /// listing N keys through `lk` with K attempts per call, or (`--op
    /// incr`) counting with and without request ids. Flushes the server:
    /// give it one of its own.
    Reliability {
        #[arg(short, long, default_value = "127.0.0.1:11211")]
        server: String,
        /// `list` or `incr`.
        #[arg(long, default_value = "list")]
        op: String,
        /// Fraction of replies lost (dropped by the client transport).
        #[arg(long, default_value_t = 0.01)]
        loss: f64,
        /// Keys to list (N); comma-separated for several rows.
        #[arg(long, default_value = "1000", value_delimiter = ',')]
        keys: Vec<usize>,
        /// Attempts per call (K); comma-separated for several rows.
        #[arg(long, default_value = "2", value_delimiter = ',')]
        retries: Vec<u32>,
        /// Listings per row (T).
        #[arg(long, default_value_t = 200)]
        trials: usize,
        /// Keys per `lk` call.
        #[arg(long, default_value_t = 10)]
        page: u32,
        /// How long an attempt waits for its reply.
        #[arg(long, default_value_t = 20)]
        attempt_timeout_ms: u64,
        /// Increments for `--op incr` (M).
        #[arg(long, default_value_t = 1000)]
        ops: u64,
        /// Seed of the loss pattern.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Serve a fixed reply to every request: the trivial responder.
    Respond {
        #[arg(short, long, default_value = "127.0.0.1:11299")]
        listen: SocketAddr,
        /// Worker threads, as `webvac -t`.
        #[arg(short, long, default_value_t = 1)]
        threads: usize,
    },
}

#[derive(Args, Clone)]
struct Load {
    /// Connections in all.
    #[arg(short, long, default_value_t = 64)]
    connections: usize,
    /// Requests outstanding per connection (closed loop).
    #[arg(short, long, default_value_t = 1)]
    depth: usize,
    /// Seconds to measure for (after warm-up).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Measure this many requests instead of a duration.
    #[arg(long)]
    ops: Option<u64>,
    /// Open loop: send this many requests per second in all, on a fixed
    /// schedule, whatever the replies do.
    #[arg(long)]
    rate: Option<f64>,
    /// Seconds of load before measuring.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// Set every key once before the run (not measured).
    #[arg(long)]
    prefill: bool,
    /// Protocol to speak.
    #[arg(long, value_enum, default_value_t = Protocol::Text)]
    protocol: Protocol,
    /// Fraction of requests that are gets; the rest are sets.
    #[arg(long, default_value_t = 0.9)]
    get_ratio: f64,
    /// Keys in the key space.
    #[arg(long, default_value_t = 100_000)]
    keys: u64,
    /// Bytes per key.
    #[arg(long, default_value_t = 20)]
    key_size: usize,
    /// Key popularity: `uniform` or `zipf:S`.
    #[arg(long, default_value = "uniform")]
    dist: KeyDist,
    /// Value bytes: `100` or a range `10-1000`.
    #[arg(long, default_value = "100")]
    value_size: SizeRange,
    /// Keys per get.
    #[arg(long, default_value_t = 1)]
    multiget: usize,
    /// After a get misses, set that key (cache-aside).
    #[arg(long)]
    set_on_miss: bool,
    /// Load threads, each a single-threaded runtime.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Seconds without a reply before a connection counts as stalled.
    #[arg(long, default_value_t = 10.0)]
    stall: f64,
    /// Seed for keys, sizes and the mix.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// No progress lines.
    #[arg(short, long)]
    quiet: bool,
    /// Print results as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// Speak TLS (to a server started with `-Z`); needs `--tls-ca`.
    #[arg(long)]
    tls: bool,
    /// PEM file of the CA the server's certificate chains to.
    #[arg(long, value_name = "FILE")]
    tls_ca: Option<std::path::PathBuf>,
    /// The name the server's certificate must carry.
    #[arg(long, value_name = "NAME", default_value = "localhost")]
    tls_name: String,
    /// A client certificate to present (`ssl_verify_mode` 1–3), PEM.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,
    /// The client certificate's key, PEM.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
    /// Authenticate each connection first (a server started with `-Y`).
    #[arg(long, value_name = "USER:PASSWORD")]
    auth: Option<String>,
}

fn secs(s: f64, what: &str) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(s).with_context(|| format!("bad {what} {s}"))
}

fn resolve(s: &str) -> anyhow::Result<SocketAddr> {
    s.to_socket_addrs()
        .with_context(|| format!("cannot resolve {s}"))?
        .next()
        .with_context(|| format!("no address for {s}"))
}

impl Load {
    /// `--tls…` and `--auth`.
    fn security(&self) -> anyhow::Result<run::Security> {
        let tls = if self.tls {
            let options = webvac::client::tls::TlsOptions {
                ca_cert: self.tls_ca.clone(),
                client_cert: self.tls_cert.clone().zip(self.tls_key.clone()),
            };
            let config = webvac::client::tls::client_config(&options)
                .map_err(|e| anyhow::anyhow!("--tls: {e}"))?;
            let name = rustls::pki_types::ServerName::try_from(self.tls_name.clone())
                .with_context(|| format!("--tls-name {}", self.tls_name))?;
            Some((tokio_rustls::TlsConnector::from(config), name))
        } else {
            if self.tls_ca.is_some() || self.tls_cert.is_some() {
                bail!("--tls-ca and --tls-cert need --tls");
            }
            None
        };
        let auth = match &self.auth {
            Some(a) => {
                let (user, password) = a.split_once(':').context("--auth takes USER:PASSWORD")?;
                Some(webvac::client::auth_request(user, password))
            }
            None => None,
        };
        Ok(run::Security { tls, auth })
    }

    fn split(&self, servers: Vec<SocketAddr>) -> anyhow::Result<(Plan, Workload)> {
        let w = Workload {
            protocol: self.protocol,
            keys: self.keys,
            key_size: self.key_size,
            dist: self.dist,
            value_size: self.value_size,
            get_ratio: self.get_ratio,
            multiget: self.multiget,
            set_on_miss: self.set_on_miss,
        };
        w.check().map_err(anyhow::Error::msg)?;
        if self.connections == 0 || self.depth == 0 {
            bail!("--connections and --depth must be at least 1");
        }
        if let Some(r) = self.rate {
            if !(r > 0.0 && r.is_finite()) {
                bail!("--rate must be positive");
            }
            if self.set_on_miss {
                bail!("--set-on-miss is for the closed loop only");
            }
        }
        let plan = Plan {
            servers,
            connections: self.connections,
            depth: self.depth,
            threads: self.threads,
            duration: secs(self.duration, "--duration")?,
            ops: self.ops,
            rate: self.rate,
            warmup: secs(self.warmup, "--warmup")?,
            stall: secs(self.stall, "--stall")?,
            seed: self.seed,
            progress: !self.quiet,
            security: self.security()?,
        };
        Ok((plan, w))
    }
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Reliability {
            server,
            op,
            loss,
            keys,
            retries,
            trials,
            page,
            attempt_timeout_ms,
            ops,
            seed,
        } => {
            if !(0.0..1.0).contains(&loss) {
                bail!("--loss must be a fraction in [0, 1)");
            }
            if trials == 0 || page == 0 || retries.contains(&0) {
                bail!("--trials, --page and every --retries must be at least 1");
            }
            let s = reliability::Settings {
                server,
                loss,
                keys,
                retries,
                trials,
                page,
                attempt_timeout: Duration::from_millis(attempt_timeout_ms),
                seed,
                ops,
            };
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            match op.as_str() {
                "list" => rt.block_on(reliability::listing(&s))?,
                "incr" => rt.block_on(reliability::counting(&s))?,
                other => bail!("--op is list or incr, not {other:?}"),
            }
        }
        Command::Run { servers, load } => {
            let addrs = servers
                .iter()
                .map(|s| resolve(s))
                .collect::<anyhow::Result<_>>()?;
            let (plan, w) = load.split(addrs)?;
            if load.prefill {
                run::prefill(&plan, &w)?;
            }
            let o = run::run(&plan, &w)?;
            if load.json {
                println!("{}", serde_json::to_string_pretty(&o)?);
            } else {
                o.print();
            }
        }
        Command::Compare {
            a,
            b,
            names,
            rounds,
            load,
        } => {
            if names.len() != 2 {
                bail!("--names takes two names, A's and B's: --names memcached,webvac");
            }
            let (pa, w) = load.split(vec![resolve(&a)?])?;
            let (pb, _) = load.split(vec![resolve(&b)?])?;
            if load.prefill {
                run::prefill(&pa, &w)?;
                run::prefill(&pb, &w)?;
            }
            let (mut ra, mut rb): (Vec<Outcome>, Vec<Outcome>) = (Vec::new(), Vec::new());
            for round in 1..=rounds {
                for (plan, name, out) in [(&pa, &names[0], &mut ra), (&pb, &names[1], &mut rb)] {
                    if !load.quiet {
                        eprintln!("round {round}/{rounds}: {name} ({})", plan.servers[0]);
                    }
                    let o = run::run(plan, &w)?;
                    if !load.quiet {
                        eprintln!(
                            "  {:.0} ops/s, p99 {:.1}µs, hit ratio {:.4}",
                            o.ops_per_sec, o.latency_us.p99, o.hit_ratio
                        );
                    }
                    out.push(o);
                }
            }
            let rows = report::compare(&ra, &rb);
            if load.json {
                let doc = serde_json::json!({
                    "names": names, "workload": w, "a": ra, "b": rb, "metrics": rows,
                });
                println!("{}", serde_json::to_string_pretty(&doc)?);
            } else {
                println!(
                    "compare: A = {} {a}, B = {} {b}, {rounds} rounds; medians, B/A of medians, B/A range per round",
                    names[0], names[1]
                );
                report::print_compare((&names[0], &names[1]), &rows);
            }
        }
        Command::Respond { listen, threads } => respond::serve(listen, threads)?,
    }
    Ok(())
}
