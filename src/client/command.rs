//! The requests the client sends, composed into bytes. No I/O.
//!
//! Every data operation is a meta command (`mg`, `ms`, `ma`, `md`) so that
//! it can carry an `O<n>` opaque, which the connection uses to match the
//! reply. The meta compose functions of [`crate::protocol::meta`] write the
//! bytes; this module picks the flags. webvac's extensions travel in the
//! `P` token (`Pi<id>,r<n>,w<n>`), which plain memcached ignores; the client
//! only sends it to webvac servers anyway.

use std::fmt::Write as _;

use bytes::Bytes;

use super::config::validate_request_id;
use super::error::{ClientError, Result};
use super::reply::Expect;
use crate::limits::KEY_BYTES_MAX;
use crate::protocol::meta::{base64, ma, md, mg, ms};

/// A key as it travels: as is when every byte is printable ASCII, else
/// base64 with the `b` flag. Placement uses the raw bytes either way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireKey {
    /// The raw key (what the server stores and placement hashes).
    pub raw: Vec<u8>,
    /// Its base64 form, when it needs one.
    encoded: Option<String>,
}

impl WireKey {
    /// Checks and encodes a key.
    ///
    /// # Errors
    /// [`ClientError::InvalidKey`] for an empty key, a key over 250 bytes,
    /// or a binary key whose base64 form is over 250 bytes (memcached checks
    /// the length of the key token as sent).
    pub fn new(key: &[u8]) -> Result<WireKey> {
        if key.is_empty() {
            return Err(ClientError::InvalidKey("empty key".into()));
        }
        if key.len() > KEY_BYTES_MAX {
            return Err(ClientError::InvalidKey(format!(
                "{} bytes, over {KEY_BYTES_MAX}",
                key.len()
            )));
        }
        let printable = key.iter().all(|&b| (0x21..=0x7e).contains(&b));
        let encoded = (!printable).then(|| base64::encode(key));
        if let Some(e) = &encoded {
            if e.len() > KEY_BYTES_MAX {
                return Err(ClientError::InvalidKey(format!(
                    "binary key of {} bytes is {} bytes in base64, over {KEY_BYTES_MAX}",
                    key.len(),
                    e.len()
                )));
            }
        }
        Ok(WireKey {
            raw: key.to_vec(),
            encoded,
        })
    }

    /// The key token and whether it is base64.
    fn token(&self) -> (&[u8], bool) {
        match &self.encoded {
            Some(e) => (e.as_bytes(), true),
            None => (&self.raw, false),
        }
    }
}

/// `ms` modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreMode {
    Set,
    Add,
    Replace,
    Append,
    Prepend,
}

impl StoreMode {
    fn flag(self) -> Option<&'static str> {
        match self {
            StoreMode::Set => None,
            StoreMode::Add => Some("ME"),
            StoreMode::Replace => Some("MR"),
            StoreMode::Append => Some("MA"),
            StoreMode::Prepend => Some("MP"),
        }
    }
}

/// What a request asks for.
#[derive(Debug, Clone)]
pub enum Command {
    /// `mg`: with `value`, the value, flags and CAS; with `touch`, a new TTL
    /// (and no value: `touch`).
    Get {
        key: WireKey,
        value: bool,
        touch: Option<u32>,
    },
    /// `ms` in a mode, optionally compare-and-swap (`C`); asks for the new
    /// CAS (`c`).
    Store {
        key: WireKey,
        data: Bytes,
        mode: StoreMode,
        ttl: Option<u32>,
        flags: u32,
        compare_cas: Option<u64>,
    },
    /// `ma`, returning the new value (`v`).
    Arith {
        key: WireKey,
        incr: bool,
        delta: u64,
        ttl: Option<u32>,
    },
    /// `md`.
    Delete { key: WireKey },
    /// `lk <token> <count>`: one page of the key listing.
    List { token: String, count: u32 },
    /// `version`.
    Version,
    /// `stats`.
    Stats,
    /// `stats cluster`.
    StatsCluster,
}

/// webvac's `P` token items.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Hints {
    /// `i<id>`: apply at most once.
    pub request_id: Option<String>,
    /// `r<n>`.
    pub read_quorum: Option<u8>,
    /// `w<n>`.
    pub write_quorum: Option<u8>,
}

impl Hints {
    /// Appends the `P` token to `flags`, when there is anything to say.
    ///
    /// # Panics
    /// On an invalid request id (checked when the request is built).
    fn put_token(&self, flags: &mut Flags) {
        if self.request_id.is_none() && self.read_quorum.is_none() && self.write_quorum.is_none() {
            return;
        }
        flags.push("P");
        // Items follow the `P` with commas between them.
        let mut sep = "";
        let mut item = |flags: &mut Flags, args: std::fmt::Arguments<'_>| {
            let _ = write!(flags.text, "{sep}{args}");
            sep = ",";
        };
        if let Some(id) = &self.request_id {
            assert!(validate_request_id(id).is_ok(), "request id {id:?}");
            item(flags, format_args!("i{id}"));
        }
        if let Some(r) = self.read_quorum {
            item(flags, format_args!("r{r}"));
        }
        if let Some(w) = self.write_quorum {
            item(flags, format_args!("w{w}"));
        }
    }
}

/// A meta command's flags as one space-separated text, built without a
/// string per flag (the in-process path encodes every call).
struct Flags {
    text: String,
}

impl Flags {
    fn new() -> Flags {
        Flags {
            text: String::with_capacity(64),
        }
    }

    /// Starts a new flag.
    fn start(&mut self) {
        if !self.text.is_empty() {
            self.text.push(' ');
        }
    }

    fn push(&mut self, flag: &str) {
        self.start();
        self.text.push_str(flag);
    }

    fn push_fmt(&mut self, args: std::fmt::Arguments<'_>) {
        self.start();
        let _ = self.text.write_fmt(args);
    }

    /// As the composers take them: one text (they join with spaces).
    fn as_slice(&self) -> [&str; 1] {
        [self.text.as_str()]
    }
}

impl Command {
    /// The key the request is about, for placement.
    pub fn key(&self) -> Option<&[u8]> {
        match self {
            Command::Get { key, .. }
            | Command::Store { key, .. }
            | Command::Arith { key, .. }
            | Command::Delete { key } => Some(&key.raw),
            _ => None,
        }
    }

    /// The reply shape it gets.
    /// Bytes of the data block it carries (0 for commands without one).
    pub fn data_len(&self) -> usize {
        match self {
            Command::Store { data, .. } => data.len(),
            _ => 0,
        }
    }

    pub fn expect(&self) -> Expect {
        match self {
            Command::List { .. } => Expect::Listing,
            Command::Version => Expect::Version,
            Command::Stats | Command::StatsCluster => Expect::Stats,
            _ => Expect::Meta,
        }
    }

    /// Whether it goes on a connection by itself (its reply has no
    /// opaque and spans several lines).
    pub fn exclusive(&self) -> bool {
        self.expect() != Expect::Meta
    }

    /// Appends the request's bytes to `out`. Meta commands carry `O<opaque>`
    /// and, when given, the `P` token; the others ignore both.
    pub fn encode(&self, opaque: u64, hints: Option<&Hints>, out: &mut Vec<u8>) {
        let mut flags = Flags::new();
        /// The key's token, flagging a base64 one.
        fn key_token<'k>(key: &'k WireKey, flags: &mut Flags) -> &'k [u8] {
            let (token, binary) = key.token();
            if binary {
                flags.push("b");
            }
            token
        }
        let tail = |flags: &mut Flags| {
            flags.push_fmt(format_args!("O{opaque}"));
            if let Some(h) = hints {
                h.put_token(flags);
            }
        };
        match self {
            Command::Get { key, value, touch } => {
                let token = key_token(key, &mut flags);
                if *value {
                    flags.push("v f c");
                }
                if let Some(ttl) = touch {
                    flags.push_fmt(format_args!("T{ttl}"));
                }
                tail(&mut flags);
                mg::compose_request(out, token, &flags.as_slice());
            }
            Command::Store {
                key,
                data,
                mode,
                ttl,
                flags: client_flags,
                compare_cas,
            } => {
                let token = key_token(key, &mut flags);
                flags.push("c");
                if let Some(m) = mode.flag() {
                    flags.push(m);
                }
                if *client_flags != 0 {
                    flags.push_fmt(format_args!("F{client_flags}"));
                }
                if let Some(ttl) = ttl {
                    flags.push_fmt(format_args!("T{ttl}"));
                }
                if let Some(cas) = compare_cas {
                    flags.push_fmt(format_args!("C{cas}"));
                }
                tail(&mut flags);
                ms::compose_request(out, token, data, &flags.as_slice());
            }
            Command::Arith {
                key,
                incr,
                delta,
                ttl,
            } => {
                let token = key_token(key, &mut flags);
                flags.push("v");
                if !incr {
                    flags.push("MD");
                }
                if *delta != 1 {
                    flags.push_fmt(format_args!("D{delta}"));
                }
                if let Some(ttl) = ttl {
                    flags.push_fmt(format_args!("T{ttl}"));
                }
                tail(&mut flags);
                ma::compose_request(out, token, &flags.as_slice());
            }
            Command::Delete { key } => {
                let token = key_token(key, &mut flags);
                tail(&mut flags);
                md::compose_request(out, token, &flags.as_slice());
            }
            Command::List { token, count } => {
                crate::protocol::list_keys::compose(out, token.as_bytes(), *count as usize);
            }
            Command::Version => out.extend_from_slice(b"version\r\n"),
            Command::Stats => out.extend_from_slice(b"stats\r\n"),
            Command::StatsCluster => out.extend_from_slice(b"stats cluster\r\n"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::meta::MetaRequest;
    use crate::protocol::{ParseLimits, Parsed, Request, parse};
    use crate::store::Mode;

    fn bytes(cmd: &Command, opaque: u64, hints: Option<&Hints>) -> String {
        let mut out = Vec::new();
        cmd.encode(opaque, hints, &mut out);
        String::from_utf8(out).unwrap()
    }

    fn key(k: &[u8]) -> WireKey {
        WireKey::new(k).unwrap()
    }

    #[test]
    fn keys() {
        assert_eq!(key(b"user:1").token(), (&b"user:1"[..], false));
        assert_eq!(key(b"a b").token(), (&b"YSBi"[..], true));
        assert_eq!(key(&[0, 255]).token(), (&b"AP8="[..], true));
        assert_eq!(key(&[b'x'; 250]).raw.len(), 250);
        assert!(WireKey::new(b"").is_err());
        assert!(WireKey::new(&[b'x'; 251]).is_err());
        // 187 binary bytes encode to 252 characters: too long as sent.
        assert!(WireKey::new(&[0; 186]).is_ok());
        assert!(WireKey::new(&[0; 188]).is_err());
    }

    #[test]
    fn wire_forms() {
        let hints = Hints {
            request_id: Some("9f2c".into()),
            read_quorum: None,
            write_quorum: Some(2),
        };
        let get = Command::Get {
            key: key(b"k"),
            value: true,
            touch: None,
        };
        assert_eq!(bytes(&get, 7, None), "mg k v f c O7\r\n");
        let touch = Command::Get {
            key: key(b"k"),
            value: false,
            touch: Some(30),
        };
        assert_eq!(bytes(&touch, 1, None), "mg k T30 O1\r\n");
        let store = Command::Store {
            key: key(b"k"),
            data: Bytes::from_static(b"abc"),
            mode: StoreMode::Add,
            ttl: Some(60),
            flags: 5,
            compare_cas: Some(99),
        };
        assert_eq!(
            bytes(&store, 3, Some(&hints)),
            "ms k 3 c ME F5 T60 C99 O3 Pi9f2c,w2\r\nabc\r\n"
        );
        let decr = Command::Arith {
            key: key(b"\x01"),
            incr: false,
            delta: 5,
            ttl: None,
        };
        assert_eq!(
            bytes(&decr, 4, Some(&Hints::default())),
            "ma AQ== b v MD D5 O4\r\n"
        );
        let incr = Command::Arith {
            key: key(b"n"),
            incr: true,
            delta: 1,
            ttl: None,
        };
        assert_eq!(bytes(&incr, 0, None), "ma n v O0\r\n");
        assert_eq!(
            bytes(&Command::Delete { key: key(b"k") }, 9, Some(&hints)),
            "md k O9 Pi9f2c,w2\r\n"
        );
        let list = Command::List {
            token: "-".into(),
            count: 100,
        };
        assert_eq!(bytes(&list, 5, Some(&hints)), "lk - 100\r\n");
        assert_eq!(bytes(&Command::Version, 1, None), "version\r\n");
        assert_eq!(bytes(&Command::Stats, 1, None), "stats\r\n");
        assert_eq!(bytes(&Command::StatsCluster, 1, None), "stats cluster\r\n");
        assert!(list.exclusive() && !get.exclusive());
        assert_eq!(store.key(), Some(&b"k"[..]));
    }

    #[test]
    fn the_server_parser_reads_what_the_client_composes() {
        let limits = ParseLimits::new(1 << 20);
        let store = Command::Store {
            key: key(&[0, 1, 2]),
            data: Bytes::from_static(b"v\r\nx"),
            mode: StoreMode::Prepend,
            ttl: None,
            flags: 0,
            compare_cas: None,
        };
        let mut out = Vec::new();
        store.encode(42, Some(&Hints::default()), &mut out);
        match parse(&out, &limits) {
            Parsed::Complete {
                request: Request::Meta(MetaRequest::Set(s)),
                consumed,
            } => {
                assert_eq!(consumed, out.len());
                assert_eq!(
                    (&*s.key, s.data, s.mode),
                    (&[0u8, 1, 2][..], &b"v\r\nx"[..], Mode::Prepend)
                );
                assert_eq!(s.flags.opaque, Some(&b"42"[..]));
            }
            other => panic!("{other:?}"),
        }
    }
}
