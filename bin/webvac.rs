//! The webvac server binary. Flags match memcached's where they overlap.

use anyhow::Context;
use clap::Parser;
use tracing_subscriber::EnvFilter;
use webvac::config::{Config, parse_size};
use webvac::server::Server;

#[derive(Parser, Debug)]
#[command(
    name = "webvac",
    version,
    about = "A memcached-compatible in-memory cache"
)]
struct Args {
    /// TCP port to listen on (default 11211; 0 picks a free port).
    #[arg(short = 'p', long = "port")]
    port: Option<u16>,
    /// Interface to listen on (default 127.0.0.1).
    #[arg(short = 'l', long = "listen")]
    listen: Option<String>,
    /// Item memory in MiB (default 64).
    #[arg(short = 'm', long = "memory-limit")]
    memory_limit: Option<usize>,
    /// Worker threads (default 4).
    #[arg(short = 't', long = "threads")]
    threads: Option<usize>,
    /// Maximum simultaneous connections (default 1024).
    #[arg(short = 'c', long = "max-connections")]
    max_connections: Option<usize>,
    /// Maximum item size, e.g. 1m, 512k (default 1m).
    #[arg(short = 'I', long = "max-item-size", value_parser = parse_size)]
    max_item_size: Option<usize>,
    /// Verbose logging; repeat for more (-vv).
    #[arg(short = 'v', action = clap::ArgAction::Count)]
    verbose: u8,
    /// Read settings from this TOML file; flags override it.
    #[arg(long = "config")]
    config: Option<String>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut config = match &args.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    if let Some(p) = args.port {
        config.port = p;
    }
    if let Some(l) = args.listen {
        config.listen = l;
    }
    if let Some(m) = args.memory_limit {
        config.memory_limit_mb = m;
    }
    if let Some(t) = args.threads {
        config.threads = t;
    }
    if let Some(c) = args.max_connections {
        config.max_connections = c;
    }
    if let Some(i) = args.max_item_size {
        config.max_item_size = i;
    }
    if args.verbose > 0 {
        config.verbosity = args.verbose;
    }
    config.validate()?;

    let level = match config.verbosity {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level)),
        )
        .init();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.threads)
        .thread_name("webvac-worker")
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    runtime.block_on(async {
        let server = Server::bind(&config).await?;
        server.run(shutdown_signal()).await?;
        anyhow::Ok(())
    })?;
    Ok(())
}

/// Completes on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!(signal = "SIGTERM", "signal received"),
        _ = int.recv() => tracing::info!(signal = "SIGINT", "signal received"),
    }
}
