//! The client's typed errors, and what each tells the caller about whether
//! the operation ran.
//!
//! The distinction that matters most is between "not applied" and "maybe
//! applied". A request that was never written to a socket ([`Busy`], a
//! refused connection) did nothing; a request that was written and then
//! lost its reply ([`Timeout`], a connection that broke mid-request) may or
//! may not have run. The client retries the second kind only when doing so
//! is safe (see [`super::retry`]); when it is not, the caller gets
//! [`MaybeApplied`] and must decide.
//!
//! [`Busy`]: ClientError::Busy
//! [`Timeout`]: ClientError::Timeout
//! [`MaybeApplied`]: ClientError::MaybeApplied

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use thiserror::Error;

/// What went wrong with a client call.
///
/// Cloneable so the retry loop can keep the last attempt's error while it
/// tries again (which is also why I/O errors are kept as kind and text).
#[derive(Debug, Clone, Error)]
pub enum ClientError {
    /// One attempt got no reply within [`ClientConfig::attempt_timeout`]
    /// and the call gave up without another attempt (out of attempts).
    /// The request may have run.
    ///
    /// [`ClientConfig::attempt_timeout`]: super::ClientConfig::attempt_timeout
    #[error("no reply within {0:?}")]
    Timeout(Duration),

    /// The call's overall deadline ([`ClientConfig::deadline`]) passed
    /// before any attempt succeeded. `last` is the last attempt's error.
    ///
    /// [`ClientConfig::deadline`]: super::ClientConfig::deadline
    #[error("deadline of {deadline:?} passed after {attempts} attempts; last error: {last}")]
    DeadlineExceeded {
        /// The deadline that passed, measured from the start of the call.
        deadline: Duration,
        /// Attempts made before giving up.
        attempts: u32,
        /// The last attempt's error.
        last: Box<ClientError>,
    },

    /// A retry was allowed by the policy but refused by the retry budget:
    /// too many of this client's recent requests were retries, so the
    /// cluster is probably in trouble and retrying would only add load.
    /// `last` is the error of the attempt that would have been retried.
    #[error("retry budget exhausted; last error: {last}")]
    RetryBudgetExhausted {
        /// The error of the attempt that would have been retried.
        last: Box<ClientError>,
    },

    /// The connection to `addr` already has its maximum number of requests
    /// in flight ([`ClientConfig::in_flight_max`]). The request was not
    /// sent; back off or spread load.
    ///
    /// [`ClientConfig::in_flight_max`]: super::ClientConfig::in_flight_max
    #[error("connection to {addr} is busy: {in_flight} requests in flight")]
    Busy {
        /// The server whose connection is full.
        addr: SocketAddr,
        /// Requests in flight on it when this one was refused.
        in_flight: usize,
    },

    /// A socket operation failed (connect refused, reset, closed), or a node
    /// was skipped because recent connects to it failed.
    #[error("i/o error with {addr}: {message}")]
    Io {
        /// The server the socket was for.
        addr: SocketAddr,
        /// The I/O error's kind (what a retry policy looks at).
        kind: io::ErrorKind,
        /// The I/O error's text.
        message: String,
    },

    /// The server answered `SERVER_ERROR <why>` (the text after the code).
    #[error("server error: {0}")]
    Server(String),

    /// The server answered `CLIENT_ERROR <why>`: the request was malformed
    /// or out of bounds. Never retried.
    #[error("client error: {0}")]
    Client(String),

    /// The server's reply could not be parsed, or did not fit the request.
    /// The connection it came on is closed.
    #[error("protocol error: {0}")]
    Protocol(String),

    /// The server does not offer this (it answered `ERROR`), or a plain
    /// memcached server cannot (key listing).
    #[error("not supported: {0}")]
    NotSupported(String),

    /// A non-idempotent operation without a request id (plain memcached)
    /// lost its reply, so it may or may not have been applied; it was not
    /// retried because applying it twice would be wrong.
    #[error("{op} may or may not have been applied: {last}")]
    MaybeApplied {
        /// The operation's command name, e.g. `incr`.
        op: &'static str,
        /// The error that lost the reply.
        last: Box<ClientError>,
    },

    /// A key the protocol cannot carry: empty, or over 250 bytes (binary
    /// keys travel in base64, which must fit in 250 bytes).
    #[error("invalid key: {0}")]
    InvalidKey(String),

    /// Another argument is out of range (a request id, a listing count, a
    /// configuration value).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// No seed answered during [`Client::connect`], or the cluster map was
    /// unusable.
    ///
    /// [`Client::connect`]: super::Client::connect
    #[error("no server reachable: {0}")]
    NoServer(String),
}

impl ClientError {
    pub(crate) fn io(addr: SocketAddr, e: &io::Error) -> ClientError {
        ClientError::Io {
            addr,
            kind: e.kind(),
            message: e.to_string(),
        }
    }

    pub(crate) fn io_msg(
        addr: SocketAddr,
        kind: io::ErrorKind,
        message: impl Into<String>,
    ) -> Self {
        ClientError::Io {
            addr,
            kind,
            message: message.into(),
        }
    }
}

/// Result of a client call.
pub type Result<T, E = ClientError> = std::result::Result<T, E>;
