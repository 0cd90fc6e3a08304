//! Server configuration: TOML file, defaults as named constants, and the
//! checks that refuse a configuration memcached would refuse.
//!
//! `config/webvac.toml` documents every key. Command-line flags override the
//! file (see `bin/webvac.rs`).

use serde::{Deserialize, Deserializer};

use crate::error::ConfigError;
use crate::limits::{
    CONNECTIONS_MAX_DEFAULT, ITEM_BYTES_MAX_DEFAULT, ITEM_BYTES_MAX_MAX, ITEM_BYTES_MAX_MIN,
    MEMORY_LIMIT_MB_DEFAULT, PORT_DEFAULT, THREADS_DEFAULT,
};

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Interface to listen on. Never all interfaces by default.
    pub listen: String,
    /// TCP port for clients; 0 picks a free one (logged at startup).
    pub port: u16,
    /// Item memory limit in MiB (`-m`).
    pub memory_limit_mb: usize,
    /// Worker threads (`-t`).
    pub threads: usize,
    /// Simultaneous client connections (`-c`); more are refused with
    /// `ERROR Too many open connections`.
    pub max_connections: usize,
    /// Largest item in bytes (`-I`); accepts `1m`, `512k` or a number.
    #[serde(deserialize_with = "de_size")]
    pub max_item_size: usize,
    /// Log verbosity: 0 info, 1 debug, 2 trace (`-v`, `-vv`).
    pub verbosity: u8,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1".to_string(),
            port: PORT_DEFAULT,
            memory_limit_mb: MEMORY_LIMIT_MB_DEFAULT,
            threads: THREADS_DEFAULT,
            max_connections: CONNECTIONS_MAX_DEFAULT,
            max_item_size: ITEM_BYTES_MAX_DEFAULT,
            verbosity: 0,
        }
    }
}

impl Config {
    /// Reads a TOML file; missing keys take their defaults.
    ///
    /// # Errors
    /// If the file cannot be read or parsed, or has unknown keys.
    pub fn from_file(path: &str) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_string(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_string(),
            source,
        })
    }

    pub fn memory_limit_bytes(&self) -> usize {
        self.memory_limit_mb.saturating_mul(1024 * 1024)
    }

    /// Checks relations between settings.
    ///
    /// # Errors
    /// With a message naming the offending setting.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.memory_limit_mb == 0 {
            return bad("memory_limit_mb must be at least 1".into());
        }
        if self.threads == 0 || self.threads > 256 {
            return bad(format!(
                "threads must be between 1 and 256, got {}",
                self.threads
            ));
        }
        if self.max_connections == 0 {
            return bad("max_connections must be at least 1".into());
        }
        if self.max_item_size < ITEM_BYTES_MAX_MIN {
            return bad(format!(
                "max_item_size must be at least {ITEM_BYTES_MAX_MIN} bytes"
            ));
        }
        if self.max_item_size > ITEM_BYTES_MAX_MAX {
            return bad(format!(
                "max_item_size cannot be larger than {ITEM_BYTES_MAX_MAX} bytes"
            ));
        }
        if self.max_item_size > self.memory_limit_bytes() / 2 {
            return bad(format!(
                "max_item_size ({}) cannot be larger than half the memory limit ({} MiB)",
                self.max_item_size, self.memory_limit_mb
            ));
        }
        Ok(())
    }
}

/// Parses `1m`, `512k`, `2048` (memcached's `-I` syntax).
///
/// # Errors
/// On anything else.
pub fn parse_size(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let (digits, mult) = match s.chars().last() {
        Some('k' | 'K') => (&s[..s.len() - 1], 1024),
        Some('m' | 'M') => (&s[..s.len() - 1], 1024 * 1024),
        Some('g' | 'G') => (&s[..s.len() - 1], 1024 * 1024 * 1024),
        _ => (s, 1),
    };
    let n: usize = digits
        .parse()
        .map_err(|_| format!("invalid size {s:?}: expected a number with optional k/m/g suffix"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} is too large"))
}

fn de_size<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Number(usize),
        Text(String),
    }
    match Size::deserialize(d)? {
        Size::Number(n) => Ok(n),
        Size::Text(s) => parse_size(&s).map_err(serde::de::Error::custom),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1m"), Ok(1024 * 1024));
        assert_eq!(parse_size("512k"), Ok(512 * 1024));
        assert_eq!(parse_size("2048"), Ok(2048));
        assert!(parse_size("1x").is_err());
    }

    #[test]
    fn the_shipped_config_file_is_the_defaults() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/webvac.toml");
        let c = Config::from_file(path).unwrap();
        assert_eq!(c, Config::default());
        c.validate().unwrap();
    }

    #[test]
    fn unknown_keys_are_refused() {
        assert!(toml::from_str::<Config>("memroy_limit_mb = 5").is_err());
        let c: Config = toml::from_str("max_item_size = \"2m\"\nport = 1").unwrap();
        assert_eq!((c.max_item_size, c.port), (2 * 1024 * 1024, 1));
    }

    #[test]
    fn validation() {
        let c = Config {
            max_item_size: 100,
            ..Config::default()
        };
        assert!(c.validate().is_err());
        let c = Config {
            memory_limit_mb: 1,
            ..Config::default()
        };
        assert!(c.validate().is_err());
    }
}
