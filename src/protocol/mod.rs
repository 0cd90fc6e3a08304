//! memcached text and meta protocols: bytes in, requests out; replies composed
//! into a buffer. No I/O.
//!
//! [`parse`] looks at the front of a connection's read buffer and returns
//! either a complete [`Request`] with the number of bytes it used, or
//! [`Parsed::Incomplete`] when more bytes are needed (a normal outcome).
//! Malformed input is a request too ([`Request::Error`]): memcached answers it
//! and carries on, and so do we. The request borrows keys and values from the
//! buffer, so parsing copies nothing.

pub mod arith;
pub mod cluster_admin;
pub mod delete;
pub mod fault;
pub mod flush_all;
pub mod get;
pub mod list_keys;
pub mod meta;
pub mod misc;
pub mod number;
pub mod stats;
pub mod storage;
pub mod tokens;
pub mod touch;

use crate::limits::{GET_LINE_WHOLE_BYTES_MAX, LINE_BYTES_MAX};
use tokens::Tokens;

/// memcached's error replies, verbatim.
pub mod reply {
    /// Unknown command, or a command with the wrong number of tokens.
    pub const ERROR: &str = "ERROR";
    /// A malformed argument: a key over 250 bytes, a bad number.
    pub const BAD_FORMAT: &str = "CLIENT_ERROR bad command line format";
    /// A data block that does not end in CRLF where its length says.
    pub const BAD_DATA_CHUNK: &str = "CLIENT_ERROR bad data chunk";
    /// An incr/decr delta that is not a decimal number within 64 bits.
    pub const BAD_DELTA: &str = "CLIENT_ERROR invalid numeric delta argument";
    /// An exptime that is not a decimal number (`touch`, `gat`).
    pub const BAD_EXPTIME: &str = "CLIENT_ERROR invalid exptime argument";
    /// incr/decr of a value that is not a decimal number within 64 bits.
    pub const NON_NUMERIC: &str = "CLIENT_ERROR cannot increment or decrement non-numeric value";
    /// `delete` with an argument other than `0` or `noreply`.
    pub const DELETE_USAGE: &str =
        "CLIENT_ERROR bad command line format.  Usage: delete <key> [noreply]";
    /// An item over the item size limit (`-I`).
    pub const TOO_LARGE: &str = "SERVER_ERROR object too large for cache";
    /// A write that could not be stored (or buffered) within the memory
    /// limit.
    pub const NO_MEMORY_STORING: &str = "SERVER_ERROR out of memory storing object";
    /// A long request line the in-flight budget cannot hold; the
    /// connection is closed after it.
    pub const NO_MEMORY_READING: &str = "SERVER_ERROR out of memory reading request";
    /// An incr/decr whose result could not be stored within the memory
    /// limit.
    pub const NO_MEMORY: &str = "SERVER_ERROR out of memory";
    /// `shutdown` on a node started without `-A`.
    pub const SHUTDOWN_DISABLED: &str = "ERROR: shutdown not enabled";
    /// `shutdown` with a mode other than `graceful`.
    pub const SHUTDOWN_BAD_MODE: &str = "CLIENT_ERROR invalid shutdown mode";
    /// `flush_all` on a node started with `-F`.
    pub const FLUSH_DISABLED: &str = "CLIENT_ERROR flush_all not allowed";
    /// Sent to a connection refused at the connection limit, before it is
    /// closed.
    pub const TOO_MANY_CONNECTIONS: &str = "ERROR Too many open connections";
}

/// One parsed client request.
///
/// Meta requests carry their parsed flags inline, which makes this enum a
/// couple of hundred bytes; it lives on the stack for one command, and boxing
/// would cost an allocation per meta command instead.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
pub enum Request<'a> {
    /// `get`, `gets`, `gat`, `gats`.
    Get(get::Get<'a>),
    /// `set`, `add`, `replace`, `append`, `prepend`, `cas`, with the data block.
    Storage(storage::Storage<'a>),
    /// `incr`, `decr`.
    Arith(arith::ArithCmd<'a>),
    /// `delete`.
    Delete(delete::Delete<'a>),
    /// `touch`.
    Touch(touch::Touch<'a>),
    /// `flush_all`.
    FlushAll(flush_all::FlushAll),
    /// `stats` and its groups.
    Stats(stats::StatsCmd<'a>),
    /// `version`.
    Version,
    /// `verbosity`.
    Verbosity(misc::Verbosity),
    /// `quit`: close the connection without a reply.
    Quit,
    /// `refresh_certs [noreply]`: read the TLS certificates again.
    RefreshCerts {
        /// No reply on success (an error is always sent, as memcached does).
        noreply: bool,
    },
    /// `shutdown [graceful]`: stop the node, if it was started with `-A`.
    Shutdown {
        /// No mode, or `graceful`.
        mode_valid: bool,
    },
    /// A meta command: `mg`, `ms`, `md`, `ma`, `mn`, `me`.
    Meta(meta::MetaRequest<'a>),
    /// webvac's key listing (`lk`).
    ListKeys(list_keys::ListKeys<'a>),
    /// webvac's runtime fault injection (`fault`), for tests; `None` when
    /// the line is malformed (see [`fault`] for why that is not an error).
    Fault(Option<fault::FaultCmd>),
    /// webvac's cluster administration (`cluster`); `None` when the line
    /// is malformed.
    Cluster(Option<cluster_admin::ClusterCmd>),
    /// Answer with this line (unless `noreply`) and carry on. `swallow` bytes
    /// that follow belong to a rejected data block and must be discarded.
    Error {
        /// The error line, without CRLF (one of [`reply`] or a meta error).
        reply: &'static str,
        /// The command asked for no reply: send nothing.
        noreply: bool,
        /// Bytes after the command line to discard.
        swallow: usize,
    },
    /// memcached drops the connection without a reply.
    Close,
}

impl Request<'_> {
    /// A store refused before its data block was read (too large, or no
    /// memory to buffer it): the bytes after the line must be discarded.
    pub fn refused(&self) -> Option<Refused> {
        match self {
            Request::Storage(s) => s.refused,
            Request::Meta(meta::MetaRequest::Set(s)) => s.refused,
            _ => None,
        }
    }

    pub(crate) fn error(reply: &'static str) -> Self {
        Request::Error {
            reply,
            noreply: false,
            swallow: 0,
        }
    }

    pub(crate) fn error_noreply(reply: &'static str, noreply: bool) -> Self {
        Request::Error {
            reply,
            noreply,
            swallow: 0,
        }
    }
}

/// What [`parse`] found at the front of the buffer.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // see `Request`
pub enum Parsed<'a> {
    /// One request, borrowing from the buffer.
    Complete {
        /// The request.
        request: Request<'a>,
        /// Bytes of the buffer it took: its line and its data block. A
        /// refused data block is not included; the request says how many
        /// bytes to discard after these ([`Refused::swallow`], and `swallow`
        /// in [`Request::Error`]).
        consumed: usize,
    },
    /// The buffer does not hold a whole request yet: read more.
    Incomplete,
}

/// Limits the parser enforces.
#[derive(Debug, Clone, Copy)]
pub struct ParseLimits {
    /// `-I`: largest item, memcached's arithmetic (see [`crate::store::item_fits`]).
    pub item_bytes_max: usize,
    /// Largest data block (value + CRLF) the connection can buffer now; a
    /// bigger one is refused with `SERVER_ERROR out of memory storing
    /// object` and discarded, as memcached does when it cannot allocate.
    pub data_bytes_max: usize,
}

impl ParseLimits {
    /// Limits for an item size limit of `item_bytes_max`, with no bound on
    /// buffering.
    pub fn new(item_bytes_max: usize) -> Self {
        Self {
            item_bytes_max,
            data_bytes_max: usize::MAX,
        }
    }
}

/// Why a storage command's data block is discarded unread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Over the item size limit: `SERVER_ERROR object too large for cache`.
    TooLarge {
        /// Bytes to discard: the data block and its CRLF.
        swallow: usize,
    },
    /// No memory to buffer it: `SERVER_ERROR out of memory storing object`.
    NoMemory {
        /// Bytes to discard: the data block and its CRLF.
        swallow: usize,
    },
}

impl Refused {
    /// Bytes after the command line that belong to the refused data block.
    pub fn swallow(self) -> usize {
        match self {
            Refused::TooLarge { swallow } | Refused::NoMemory { swallow } => swallow,
        }
    }

    /// The error line to answer with, without CRLF.
    pub fn reply(self) -> &'static str {
        match self {
            Refused::TooLarge { .. } => reply::TOO_LARGE,
            Refused::NoMemory { .. } => reply::NO_MEMORY_STORING,
        }
    }

    /// The refusal for a data block of `vlen` bytes, if any.
    pub(crate) fn check(
        key_len: usize,
        flags: u32,
        vlen: usize,
        limits: &ParseLimits,
    ) -> Option<Refused> {
        if !crate::store::item_fits(key_len, flags, vlen, limits.item_bytes_max) {
            Some(Refused::TooLarge { swallow: vlen + 2 })
        } else if vlen + 2 > limits.data_bytes_max {
            Some(Refused::NoMemory { swallow: vlen + 2 })
        } else {
            None
        }
    }
}

impl Request<'_> {
    /// For a storage request refused before its data was read: the whole
    /// frame's size (its line, `line_bytes`, plus the data block).
    pub fn refused_frame_bytes(&self, line_bytes: usize) -> Option<usize> {
        let refused = match self {
            Request::Storage(s) => s.refused,
            Request::Meta(meta::MetaRequest::Set(s)) => s.refused,
            _ => None,
        };
        refused.map(|r| line_bytes + r.swallow())
    }
}

/// The most bytes a buffer can hold while [`parse`] (or a
/// [`get::LongGet`]) still answers `Incomplete`: a line is at most
/// [`GET_LINE_WHOLE_BYTES_MAX`] (past it a get-family line is served in
/// pieces, and any other closes the connection) and a storage command then
/// waits for at most its data block, which fits the item size limit.
/// Connections size their input bound from this.
pub fn incomplete_bytes_max(limits: &ParseLimits) -> usize {
    GET_LINE_WHOLE_BYTES_MAX + 1 + limits.item_bytes_max + 2
}

/// Parses one request from the front of `buf`.
pub fn parse<'a>(buf: &'a [u8], limits: &ParseLimits) -> Parsed<'a> {
    let Some(nl) = memchr::memchr(b'\n', buf) else {
        return incomplete_line(buf);
    };
    let consumed = nl + 1;
    if nl > GET_LINE_WHOLE_BYTES_MAX && !is_get_family(buf) {
        // Only reachable when a long line and its newline arrive in one read
        // (otherwise `incomplete_line` closed the connection already). No
        // command but a multi-get needs a line this long; a multi-get this
        // long that arrived whole is parsed whole (the buffer bounds it).
        return Parsed::Complete {
            request: Request::Close,
            consumed,
        };
    }
    let mut line = &buf[..nl];
    if line.len() > 1 && line[line.len() - 1] == b'\r' {
        line = &line[..line.len() - 1];
    }
    // memcached handles the line as a C string: a NUL ends it.
    if let Some(nul) = memchr::memchr(0, line) {
        line = &line[..nul];
    }
    let tokens = Tokens::new(line);
    if tokens.is_empty() || tokens.get(0).len() < 2 {
        return Parsed::Complete {
            request: Request::error(reply::ERROR),
            consumed,
        };
    }
    let cmd = tokens.get(0);
    let request = match cmd {
        b"get" | b"gets" | b"gat" | b"gats" => get::parse(cmd, &tokens, line),
        b"set" | b"add" | b"replace" | b"append" | b"prepend" | b"cas" => {
            return storage::parse(cmd, &tokens, &buf[consumed..], consumed, limits);
        }
        b"incr" | b"decr" => arith::parse(cmd, &tokens),
        b"delete" => delete::parse(&tokens),
        b"touch" => touch::parse(&tokens),
        b"flush_all" => flush_all::parse(&tokens),
        b"stats" => stats::parse(&tokens),
        b"version" => Request::Version,
        b"verbosity" => misc::parse_verbosity(&tokens),
        b"quit" => Request::Quit,
        b"refresh_certs" => Request::RefreshCerts {
            noreply: tokens.noreply(),
        },
        b"lk" => list_keys::parse(&tokens),
        b"fault" => fault::parse(&tokens),
        b"cluster" => cluster_admin::parse(&tokens),
        b"shutdown" => Request::Shutdown {
            // memcached: `shutdown` or `shutdown graceful`.
            mode_valid: tokens.ntokens() == 2
                || (tokens.ntokens() == 3 && tokens.get(1) == b"graceful"),
        },
        [b'm', _] => return meta::parse(&tokens, &buf[consumed..], consumed, limits),
        _ if tokens.len() >= 2 && tokens.get(tokens.len() - 1).starts_with(b"HTTP/") => {
            Request::Close
        }
        _ => Request::error(reply::ERROR),
    };
    Parsed::Complete { request, consumed }
}

/// No newline yet. memcached drops a connection whose first 2 KiB hold no
/// newline unless it is a multi-get (`get`/`gets`; we take `gat`/`gats`
/// too). Past [`GET_LINE_WHOLE_BYTES_MAX`] a multi-get is served in pieces
/// as it arrives ([`get::LongGet`]), starting with this one.
fn incomplete_line(buf: &[u8]) -> Parsed<'_> {
    if buf.len() <= LINE_BYTES_MAX {
        return Parsed::Incomplete;
    }
    let close = Parsed::Complete {
        request: Request::Close,
        consumed: buf.len(),
    };
    if !is_get_family(buf) {
        return close;
    }
    if buf.len() <= GET_LINE_WHOLE_BYTES_MAX {
        return Parsed::Incomplete;
    }
    get::parse_long_start(buf).unwrap_or(close)
}

/// Whether `buf` starts with a get-family command (after at most 100
/// spaces, as memcached allows before a long multi-get).
fn is_get_family(buf: &[u8]) -> bool {
    let spaces = buf.iter().take(101).take_while(|&&b| b == b' ').count();
    let rest = &buf[spaces..];
    spaces <= 100
        && [&b"get "[..], b"gets ", b"gat ", b"gats "]
            .iter()
            .any(|cmd| rest.starts_with(cmd))
}

/// The preamble of `<cmd> <key> <arg> [noreply]` commands: memcached's
/// token-count check (`ERROR`), `noreply`, and the key length check.
#[allow(clippy::result_large_err)] // the error is the reply request itself
pub(crate) fn key_and_noreply<'a>(
    tokens: &Tokens<'a>,
    ntokens: &[usize],
) -> Result<(&'a [u8], bool), Request<'a>> {
    if !ntokens.contains(&tokens.ntokens()) {
        return Err(Request::error(reply::ERROR));
    }
    let noreply = tokens.noreply();
    let key = tokens.get(1);
    if key.len() > crate::limits::KEY_BYTES_MAX {
        return Err(Request::error_noreply(reply::BAD_FORMAT, noreply));
    }
    Ok((key, noreply))
}

/// Ends a client request line: ` noreply` if asked, then CRLF.
pub(crate) fn put_request_end(out: &mut Vec<u8>, noreply: bool) {
    if noreply {
        out.extend_from_slice(b" noreply");
    }
    out.extend_from_slice(b"\r\n");
}

/// Appends `line` and CRLF.
#[inline]
pub fn put_line(out: &mut Vec<u8>, line: &[u8]) {
    out.extend_from_slice(line);
    out.extend_from_slice(b"\r\n");
}

/// Appends a decimal number.
#[inline]
pub fn put_u64(out: &mut Vec<u8>, n: u64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    let mut n = n;
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&buf[i..]);
}

/// Appends a signed decimal number.
#[inline]
pub fn put_i64(out: &mut Vec<u8>, n: i64) {
    if n < 0 {
        out.push(b'-');
    }
    put_u64(out, n.unsigned_abs());
}

#[cfg(test)]
pub(crate) mod test_util {
    use super::*;

    pub const LIMITS: ParseLimits = ParseLimits {
        item_bytes_max: 1024 * 1024,
        data_bytes_max: usize::MAX,
    };

    /// Parses one complete request or panics.
    pub fn one(buf: &[u8]) -> (Request<'_>, usize) {
        match parse(buf, &LIMITS) {
            Parsed::Complete { request, consumed } => (request, consumed),
            Parsed::Incomplete => panic!("incomplete: {:?}", String::from_utf8_lossy(buf)),
        }
    }

    pub fn error_of(buf: &[u8]) -> &'static str {
        match one(buf).0 {
            Request::Error { reply, .. } => reply,
            other => panic!("expected an error, got {other:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_util::*;
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn empty_and_short_lines_are_errors() {
        assert_eq!(error_of(b"\r\n"), reply::ERROR);
        assert_eq!(error_of(b"x\r\n"), reply::ERROR);
        assert_eq!(error_of(b"GET a\r\n"), reply::ERROR);
        assert_eq!(error_of(b"bogus a b c\r\n"), reply::ERROR);
    }

    #[test]
    fn incomplete_until_newline() {
        assert!(matches!(parse(b"get a", &LIMITS), Parsed::Incomplete));
        assert!(matches!(parse(b"", &LIMITS), Parsed::Incomplete));
    }

    #[test]
    fn long_line_without_newline_closes_unless_multiget() {
        let junk = vec![b'x'; LINE_BYTES_MAX + 1];
        assert!(matches!(one(&junk).0, Request::Close));
        let mut get = b"get ".to_vec();
        get.resize(LINE_BYTES_MAX + 10, b'k');
        assert!(matches!(parse(&get, &LIMITS), Parsed::Incomplete));
    }

    #[test]
    fn a_long_line_then_a_maximum_value_stays_within_the_incomplete_bound() {
        // Regression: a storage line padded far past 2 KiB (its newline came in
        // a later read) followed by almost all of the largest value.
        let mut buf = b"set k 0 0 1048516".to_vec();
        buf.resize(25_000, b' ');
        buf.extend_from_slice(b"\r\n");
        buf.extend_from_slice(&vec![b'v'; 1_048_516]);
        buf.push(b'\r');
        assert!(matches!(parse(&buf, &LIMITS), Parsed::Incomplete));
        assert!(buf.len() < incomplete_bytes_max(&LIMITS));
        buf.push(b'\n');
        assert!(matches!(one(&buf).0, Request::Storage(_)));
    }

    #[test]
    fn a_complete_line_past_the_whole_line_bound_closes_unless_multiget() {
        let mut line = b"set k 0 0 1".to_vec();
        line.resize(GET_LINE_WHOLE_BYTES_MAX + 10, b' ');
        line.extend_from_slice(b"\r\n");
        assert!(matches!(one(&line).0, Request::Close));
        let mut get = b"get".to_vec();
        while get.len() <= GET_LINE_WHOLE_BYTES_MAX {
            get.extend_from_slice(b" key");
        }
        get.extend_from_slice(b"\r\n");
        match one(&get).0 {
            Request::Get(g) => assert!(!g.continues && g.keys().all(|k| k == b"key")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn http_request_closes() {
        assert!(matches!(one(b"GET / HTTP/1.1\r\n").0, Request::Close));
    }

    #[test]
    fn numbers_compose() {
        let mut out = Vec::new();
        put_u64(&mut out, 0);
        out.push(b' ');
        put_u64(&mut out, u64::MAX);
        out.push(b' ');
        put_i64(&mut out, -42);
        assert_eq!(out, b"0 18446744073709551615 -42");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        /// No byte string makes the parser panic, and a complete parse never
        /// claims more bytes than it was given.
        #[test]
        fn parser_never_panics(buf in proptest::collection::vec(any::<u8>(), 0..600)) {
            if let Parsed::Complete { consumed, .. } = parse(&buf, &LIMITS) {
                prop_assert!(consumed <= buf.len());
                prop_assert!(consumed > 0);
            }
        }

        /// Command-shaped garbage: same property, far likelier to reach deep branches.
        #[test]
        fn parser_never_panics_on_commandish_input(
            cmd in prop::sample::select(vec!["get", "gets", "gat", "gats", "set", "add", "cas", "append",
                "incr", "decr", "delete", "touch", "flush_all", "verbosity", "stats", "mg", "ms", "md", "ma", "mn", "me"]),
            args in proptest::collection::vec("[ -~]{0,12}", 0..8),
            tail in proptest::collection::vec(any::<u8>(), 0..40),
        ) {
            let mut buf = cmd.as_bytes().to_vec();
            for a in &args { buf.push(b' '); buf.extend_from_slice(a.as_bytes()); }
            buf.extend_from_slice(b"\r\n");
            buf.extend_from_slice(&tail);
            if let Parsed::Complete { consumed, .. } = parse(&buf, &LIMITS) {
                prop_assert!(consumed <= buf.len());
            }
        }
    }
}
