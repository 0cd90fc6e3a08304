//! TLS on the client port (memcached's `-Z` and `-o ssl_*`): the server's
//! rustls configuration, reloaded whole by `refresh_certs` or SIGHUP, the
//! handshake, and the socket a connection then reads and writes.
//!
//! rustls with the ring provider: TLS 1.2 and 1.3 only, rustls's own cipher
//! suites. A reload builds a new configuration and swaps it in; a failed
//! reload keeps the old one, and connections already open keep theirs.

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll};

use rustls::SupportedProtocolVersion;
use rustls::server::{NoServerSessionStorage, ServerSessionMemoryCache, StoresServerSessions};
use rustls::server::{ServerConfig, WebPkiClientVerifier};
use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::pem::PemObject;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tracing::debug;

use super::connection::{ClientSocket, ClientWrite};
use crate::client::tls::{pem_error, read_certs, read_roots};
use crate::config::Config;
use crate::limits::TLS_HANDSHAKE_TIMEOUT;

/// How long a closing TLS connection waits to send its `close_notify`.
const CLOSE_NOTIFY_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Sessions a node remembers for resumption (`ssl_session_cache`).
const SESSION_CACHE_ENTRIES: usize = 4096;

/// The TLS settings, as memcached names them.
#[derive(Debug, Clone)]
pub struct TlsSettings {
    /// `ssl_chain_cert`.
    pub chain_cert: PathBuf,
    /// `ssl_key`; `None`: the key is in `chain_cert`.
    pub key: Option<PathBuf>,
    /// `ssl_ca_cert`.
    pub ca_cert: Option<PathBuf>,
    /// `ssl_verify_mode`, 0–3.
    pub verify_mode: u8,
    /// `ssl_min_version`, 0–3.
    pub min_version: u8,
    /// `ssl_session_cache`.
    pub session_cache: bool,
    /// `ssl_wbuf_size`, in bytes.
    pub wbuf_bytes: usize,
}

impl TlsSettings {
    /// The settings of a node started with TLS; `None` without `-Z`.
    pub fn from_config(config: &Config) -> Option<Self> {
        let chain_cert = config.ssl_chain_cert.clone()?;
        config.ssl_enabled.then(|| Self {
            chain_cert,
            key: config.ssl_key.clone(),
            ca_cert: config.ssl_ca_cert.clone(),
            verify_mode: config.ssl_verify_mode,
            min_version: config.ssl_min_version,
            session_cache: config.ssl_session_cache,
            wbuf_bytes: config.ssl_wbuf_size as usize * 1024,
        })
    }
}

/// `ssl_verify_mode` as memcached reports it: OpenSSL's flags.
pub fn verify_flags(mode: u8) -> u8 {
    match mode {
        0 => 0,
        1 => 1,
        2 => 3,
        _ => 7,
    }
}

/// The oldest protocol accepted (`ssl_min_version`), as memcached names
/// it. TLS 1.0 and 1.1 are never offered, so asking for them gives 1.2.
pub fn min_version_name(min_version: u8) -> &'static str {
    if min_version >= 3 {
        "tlsv1.3"
    } else {
        "tlsv1.2"
    }
}

/// A node's TLS: its current configuration and counters.
pub struct Tls {
    /// As started.
    pub settings: TlsSettings,
    current: parking_lot::RwLock<Arc<ServerConfig>>,
    /// When the certificates were last loaded (the store clock's seconds).
    refreshed_at: AtomicU32,
    /// Full handshakes that created a session (`ssl_new_sessions`).
    pub new_sessions: Arc<AtomicU64>,
    /// Handshakes that failed or timed out (`ssl_handshake_errors`).
    pub handshake_errors: AtomicU64,
}

impl Tls {
    /// Loads the certificates and key.
    ///
    /// # Errors
    /// memcached's message for the file that could not be read.
    pub fn new(settings: TlsSettings, now: u32) -> Result<Self, String> {
        let new_sessions = Arc::new(AtomicU64::new(0));
        let config = build(&settings, &new_sessions)?;
        Ok(Self {
            settings,
            current: parking_lot::RwLock::new(Arc::new(config)),
            refreshed_at: AtomicU32::new(now),
            new_sessions,
            handshake_errors: AtomicU64::new(0),
        })
    }

    /// Reads the certificate, key and CA files again (`refresh_certs`,
    /// SIGHUP). New connections get them; open ones keep theirs.
    ///
    /// # Errors
    /// memcached's message for the file that could not be read; the
    /// configuration in use stays.
    pub fn refresh(&self, now: u32) -> Result<(), String> {
        let config = build(&self.settings, &self.new_sessions)?;
        *self.current.write() = Arc::new(config);
        self.refreshed_at.store(now, Relaxed);
        Ok(())
    }

    /// Seconds since the certificates were last loaded.
    pub fn since_refresh(&self, now: u32) -> u32 {
        now.saturating_sub(self.refreshed_at.load(Relaxed))
    }

    /// Completes the server side of a handshake on `tcp`, within
    /// [`TLS_HANDSHAKE_TIMEOUT`] or the idle timeout (`idle_secs`, 0 for
    /// none) if shorter; `None` (counted) if it fails.
    pub async fn accept(&self, tcp: TcpStream, idle_secs: u32) -> Option<TlsSocket> {
        let limit = match idle_secs {
            0 => TLS_HANDSHAKE_TIMEOUT,
            secs => TLS_HANDSHAKE_TIMEOUT.min(std::time::Duration::from_secs(u64::from(secs))),
        };
        let fd = std::os::fd::AsRawFd::as_raw_fd(&tcp);
        let _ = tcp.set_nodelay(true);
        let config = self.current.read().clone();
        let accept = tokio_rustls::TlsAcceptor::from(config).accept(tcp);
        let failed = match tokio::time::timeout(limit, accept).await {
            Ok(Ok(mut stream)) => {
                stream
                    .get_mut()
                    .1
                    .set_buffer_limit(Some(self.settings.wbuf_bytes));
                return Some(TlsSocket {
                    stream: parking_lot::Mutex::new(stream),
                    fd,
                });
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => "timed out".to_string(),
        };
        self.handshake_errors.fetch_add(1, Relaxed);
        debug!(error = %failed, "TLS handshake failed");
        None
    }
}

/// A rustls server configuration from `settings`.
fn build(settings: &TlsSettings, new_sessions: &Arc<AtomicU64>) -> Result<ServerConfig, String> {
    let chain_path = &settings.chain_cert;
    let chain = read_certs(chain_path).map_err(|e| {
        format!(
            "Error loading the certificate chain: {} : {e}",
            chain_path.display()
        )
    })?;
    let key_path = settings.key.as_deref().unwrap_or(chain_path);
    let key_error =
        |e: &dyn std::fmt::Display| format!("Error loading the key: {} : {e}", key_path.display());
    let key = PrivateKeyDer::from_pem_file(key_path).map_err(|e| key_error(&pem_error(e)))?;
    let roots =
        match &settings.ca_cert {
            Some(path) => Some(read_roots(path).map_err(|e| {
                format!("Error loading the CA certificate: {} : {e}", path.display())
            })?),
            None => None,
        };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let versions: &[&SupportedProtocolVersion] = if settings.min_version >= 3 {
        &[&rustls::version::TLS13]
    } else {
        &[&rustls::version::TLS13, &rustls::version::TLS12]
    };
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .map_err(|e| format!("Error setting the protocol versions: {e}"))?;
    let builder = match (settings.verify_mode, roots) {
        (0, _) | (_, None) => builder.with_no_client_auth(),
        (mode, Some(roots)) => {
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = if mode == 1 {
                verifier.allow_unauthenticated()
            } else {
                verifier
            };
            let verifier = verifier
                .build()
                .map_err(|e| format!("Error loading the CA certificate: {e}"))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(chain, key).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => key_error(&"key values mismatch"),
        e => format!("Error validating the certificate: {e}"),
    })?;
    if settings.session_cache {
        config.session_storage = Arc::new(CountedSessions {
            inner: ServerSessionMemoryCache::new(SESSION_CACHE_ENTRIES),
            new_sessions: new_sessions.clone(),
        });
    } else {
        config.session_storage = Arc::new(NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
    }
    Ok(config)
}

/// The session cache, counting the sessions it is given
/// (`ssl_new_sessions`; a resumed session is not given again).
#[derive(Debug)]
struct CountedSessions {
    inner: Arc<ServerSessionMemoryCache>,
    new_sessions: Arc<AtomicU64>,
}

impl StoresServerSessions for CountedSessions {
    fn put(&self, key: Vec<u8>, value: Vec<u8>) -> bool {
        self.new_sessions.fetch_add(1, Relaxed);
        self.inner.put(key, value)
    }
    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.inner.get(key)
    }
    fn take(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.inner.take(key)
    }
    fn can_cache(&self) -> bool {
        self.inner.can_cache()
    }
}

/// A client connection after its TLS handshake. Its two halves share the
/// stream behind a lock that only one task (the connection's) ever takes.
pub struct TlsSocket {
    stream: parking_lot::Mutex<TlsStream<TcpStream>>,
    fd: i32,
}

/// Either half of a [`TlsSocket`].
pub struct TlsHalf<'a>(&'a parking_lot::Mutex<TlsStream<TcpStream>>);

impl ClientSocket for TlsSocket {
    type Read<'a> = TlsHalf<'a>;
    type Write<'a> = TlsHalf<'a>;
    fn split(&mut self) -> (Self::Read<'_>, Self::Write<'_>) {
        (TlsHalf(&self.stream), TlsHalf(&self.stream))
    }
    fn no_delay(&self) {}
    fn fd(&self) -> i32 {
        self.fd
    }
    /// Sends `close_notify`, as memcached does, so a client can tell the
    /// end of the session from a cut connection; bounded by
    /// [`CLOSE_NOTIFY_WAIT`] for a client that does not read.
    async fn close(&mut self) {
        let stream = &self.stream;
        let shutdown =
            std::future::poll_fn(move |cx| Pin::new(&mut *stream.lock()).poll_shutdown(cx));
        let _ = tokio::time::timeout(CLOSE_NOTIFY_WAIT, shutdown).await;
    }
}

impl AsyncRead for TlsHalf<'_> {
    /// Reads, then writes out what reading made rustls send (an alert
    /// refusing a renegotiation, a key update): nothing else would until
    /// the next reply, and a client waiting for it would wait forever.
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let mut stream = self.0.lock();
        let read = Pin::new(&mut *stream).poll_read(cx, buf);
        if stream.get_ref().1.wants_write() {
            // Pending leaves the socket's write readiness registered with
            // this task, which then reads (and flushes) again.
            if let Poll::Ready(Err(e)) = Pin::new(&mut *stream).poll_flush(cx) {
                return Poll::Ready(Err(e));
            }
        }
        read
    }
}

impl AsyncWrite for TlsHalf<'_> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut *self.0.lock()).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.0.lock()).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.0.lock()).poll_shutdown(cx)
    }
}

impl ClientWrite for TlsHalf<'_> {
    /// Encrypts what the output buffer (`ssl_wbuf_size`) takes and writes
    /// what the socket takes of it, without waiting.
    fn try_write(&self, buf: &[u8]) -> std::io::Result<usize> {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match Pin::new(&mut *self.0.lock()).poll_write(&mut cx, buf) {
            Poll::Ready(result) => result,
            Poll::Pending => Err(std::io::ErrorKind::WouldBlock.into()),
        }
    }

    /// Until the encrypted output is all written.
    fn writable(&self) -> impl Future<Output = std::io::Result<()>> + Send {
        std::future::poll_fn(move |cx| Pin::new(&mut *self.0.lock()).poll_flush(cx))
    }

    fn holds_output(&self) -> bool {
        self.0.lock().get_ref().1.wants_write()
    }
}
