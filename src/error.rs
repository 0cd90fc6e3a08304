//! Typed errors of the library, and how each reaches a client.

use std::io;
use thiserror::Error;

/// Errors starting or running a server.
#[derive(Debug, Error)]
pub enum ServerError {
    /// A listening socket (client or peer port) could not be opened.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The `host:port` asked for.
        addr: String,
        /// Why the bind failed (e.g. address in use).
        source: io::Error,
    },
    /// The configuration cannot be run: the message names the setting
    /// (also the file-descriptor limit being too low for it).
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Any other I/O failure while starting or running.
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Errors loading configuration.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file's path.
        path: String,
        /// Why it could not be read.
        source: io::Error,
    },
    /// The text is not valid TOML or has unknown keys or wrong types.
    #[error("cannot parse {path}: {source}")]
    Parse {
        /// The file's path, or `(text)` for a string.
        path: String,
        /// The parser's error, with its position.
        source: toml::de::Error,
    },
    /// The values are out of range or inconsistent; the message names the
    /// setting.
    #[error("{0}")]
    Invalid(String),
}
