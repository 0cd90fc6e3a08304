//! `get <key>*`, `gets <key>*`, `gat <exptime> <key>*`, `gats <exptime> <key>*`.
//!
//! Replies: `VALUE <key> <flags> <bytes>[ <cas>]\r\n<data>\r\n` per hit, then
//! `END\r\n`. A key longer than 250 bytes anywhere in the list turns the whole
//! reply into `CLIENT_ERROR bad command line format` (no VALUE lines).
//!
//! A line of any length is served. Up to [`GET_LINE_WHOLE_BYTES_MAX`] it is
//! parsed whole, as above. A longer one is served in pieces as it arrives
//! ([`LongGet`]), so what it costs is its reply, never its line: each piece
//! is the complete keys read so far, answered like a `get` of those keys,
//! and only the last piece ends the reply with `END`. memcached buffers
//! such a line whole instead (its memory grows with the line), which makes
//! two differences on lines past the threshold: a key over 250 bytes, or a
//! NUL byte, after the first piece ends the reply with `CLIENT_ERROR bad
//! command line format` after the values already sent (memcached sends the
//! error alone, or for a NUL, the values before it and `END`), and the rest
//! of the line is discarded.

use super::number::parse_i32_truncating;
use super::tokens::Tokens;
use super::{Parsed, Request, put_u64, reply};
use crate::limits::{GET_LINE_WHOLE_BYTES_MAX, GET_PIECE_BYTES_MIN, KEY_BYTES_MAX};

/// A parsed `get`, `gets`, `gat` or `gats`.
#[derive(Debug)]
pub struct Get<'a> {
    /// `gets` / `gats`: include the CAS.
    pub with_cas: bool,
    /// `gat` / `gats`: the new exptime.
    pub touch: Option<i64>,
    /// The key list, space separated, as it appeared on the line (up to a
    /// too-long key, if there is one).
    keys: &'a [u8],
    /// A key longer than 250 bytes follows `keys`. memcached has already
    /// fetched (and for `gat`, touched) the keys before it when it meets it,
    /// then answers `CLIENT_ERROR bad command line format` alone.
    pub fails_after_keys: bool,
    /// A piece of a long line whose later keys are still to come: its
    /// reply ends without `END` (the last piece's has it). A piece that
    /// fails still ends with the error.
    pub continues: bool,
}

impl<'a> Get<'a> {
    /// The keys, in order (duplicates included, as memcached answers them).
    pub fn keys(&self) -> impl Iterator<Item = &'a [u8]> + use<'a> {
        self.keys.split(|&b| b == b' ').filter(|k| !k.is_empty())
    }
}

/// Offset just past `token` within `line` (tokens are sub-slices of the line).
fn end_of(token: &[u8], line: &[u8]) -> usize {
    token.as_ptr() as usize - line.as_ptr() as usize + token.len()
}

/// Parses a retrieval command (`cmd` says which) from its line and the
/// line's tokens.
pub fn parse<'a>(cmd: &[u8], tokens: &Tokens<'a>, line: &'a [u8]) -> Request<'a> {
    if tokens.ntokens() < 3 {
        return Request::error(reply::ERROR);
    }
    let with_cas = cmd == b"gets" || cmd == b"gats";
    let touching = cmd == b"gat" || cmd == b"gats";
    let (touch, keys_from) = if touching {
        let Some(exptime) = parse_i32_truncating(tokens.get(1)) else {
            return Request::error(reply::BAD_EXPTIME);
        };
        (Some(i64::from(exptime)), end_of(tokens.get(1), line))
    } else {
        (None, end_of(tokens.get(0), line))
    };
    Request::Get(Get::of(with_cas, touch, &line[keys_from..], false))
}

impl<'a> Get<'a> {
    /// A get of the space-separated `keys`, up to the first one over 250
    /// bytes (which fails it).
    fn of(with_cas: bool, touch: Option<i64>, keys: &'a [u8], continues: bool) -> Self {
        let mut get = Get {
            with_cas,
            touch,
            keys,
            fails_after_keys: false,
            continues,
        };
        if let Some(long) = get.keys().find(|k| k.len() > KEY_BYTES_MAX) {
            let end = long.as_ptr() as usize - keys.as_ptr() as usize;
            get.keys = &keys[..end];
            get.fails_after_keys = true;
        }
        get
    }
}

/// A get-family line longer than [`GET_LINE_WHOLE_BYTES_MAX`], served in
/// pieces as it arrives (see the module's notes). The connection keeps one
/// from the line's first piece until its newline has been read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LongGet {
    with_cas: bool,
    touch: Option<i64>,
    state: LongState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LongState {
    /// More keys to serve.
    Keys,
    /// The reply has ended (an error): discard the rest of the line.
    Skip,
    /// The newline has been read.
    Done,
}

/// What a [`LongGet`] found at the front of the buffer.
#[derive(Debug)]
pub enum Step<'a> {
    /// Read more.
    Incomplete,
    /// The next piece: serve it as any get, and take `consumed` bytes.
    Piece {
        /// Its keys; `continues` unless the line has ended.
        get: Get<'a>,
        /// Bytes of the buffer it used.
        consumed: usize,
    },
    /// Discard this many bytes of a line whose reply has ended.
    Skip(usize),
}

impl LongGet {
    /// The rest of the line whose first piece is `first` (one with
    /// `continues` set).
    pub fn after(first: &Get<'_>) -> Self {
        Self {
            with_cas: first.with_cas,
            touch: first.touch,
            state: if first.fails_after_keys {
                LongState::Skip
            } else {
                LongState::Keys
            },
        }
    }

    /// Whether the line's newline has been read.
    pub fn done(&self) -> bool {
        self.state == LongState::Done
    }

    /// The reply has ended with an error: the rest of the line is only
    /// discarded.
    pub fn skip_rest(&mut self) {
        if self.state == LongState::Keys {
            self.state = LongState::Skip;
        }
    }

    /// The next step, from `buf`, which starts where the last one stopped.
    pub fn next<'a>(&mut self, buf: &'a [u8]) -> Step<'a> {
        let newline = memchr::memchr(b'\n', buf);
        if self.state != LongState::Keys {
            return match newline {
                Some(nl) => {
                    self.state = LongState::Done;
                    Step::Skip(nl + 1)
                }
                None if buf.is_empty() => Step::Incomplete,
                None => Step::Skip(buf.len()),
            };
        }
        if let Some(nl) = newline {
            // The last piece: the line as the whole-line parse takes it (a
            // CR before the newline dropped, a NUL ending it).
            let mut keys = &buf[..nl];
            if keys.last() == Some(&b'\r') {
                keys = &keys[..keys.len() - 1];
            }
            if let Some(nul) = memchr::memchr(0, keys) {
                keys = &keys[..nul];
            }
            self.state = LongState::Done;
            let get = Get::of(self.with_cas, self.touch, keys, false);
            return Step::Piece {
                get,
                consumed: nl + 1,
            };
        }
        // Complete keys end at the last space; what follows may be the
        // start of a key still arriving.
        let split = memchr::memrchr(b' ', buf).map_or(0, |i| i + 1);
        let nul = memchr::memchr(0, buf);
        if buf.len() - split > KEY_BYTES_MAX || nul.is_some() {
            // A key too long (or a NUL) and the line not over: the reply
            // ends with the error, the rest of the line is discarded.
            let end = nul.unwrap_or(split).min(split);
            let mut get = Get::of(self.with_cas, self.touch, &buf[..end], true);
            get.fails_after_keys = true;
            self.state = LongState::Skip;
            return Step::Piece {
                get,
                consumed: buf.len(),
            };
        }
        if buf.len() < GET_PIECE_BYTES_MIN {
            return Step::Incomplete;
        }
        let get = Get::of(self.with_cas, self.touch, &buf[..split], true);
        if get.fails_after_keys {
            self.state = LongState::Skip;
            return Step::Piece {
                get,
                consumed: buf.len(),
            };
        }
        Step::Piece {
            get,
            consumed: split,
        }
    }
}

/// The first piece of a get-family line longer than
/// [`GET_LINE_WHOLE_BYTES_MAX`] whose newline has not arrived (`buf` starts
/// with the line, after at most 100 spaces); `None` if it is not a
/// get-family line. A `gat`/`gats` whose exptime is not a number closes
/// the connection, as memcached closes any long line but a `get`/`gets`.
pub(super) fn parse_long_start(buf: &[u8]) -> Option<Parsed<'_>> {
    debug_assert!(buf.len() > GET_LINE_WHOLE_BYTES_MAX);
    let token_at = |from: usize| {
        let start = from + buf[from..].iter().take_while(|&&b| b == b' ').count();
        let len = buf[start..].iter().position(|&b| b == b' ')?;
        Some((start, start + len))
    };
    let (cmd_at, cmd_end) = token_at(0)?;
    let (with_cas, touching) = match &buf[cmd_at..cmd_end] {
        b"get" => (false, false),
        b"gets" => (true, false),
        b"gat" => (false, true),
        b"gats" => (true, true),
        _ => return None,
    };
    let mut keys_from = cmd_end;
    let mut touch = None;
    if touching {
        let close = || {
            Some(Parsed::Complete {
                request: Request::Close,
                consumed: buf.len(),
            })
        };
        let Some((at, end)) = token_at(cmd_end) else {
            return close();
        };
        let Some(exptime) = parse_i32_truncating(&buf[at..end]) else {
            return close();
        };
        touch = Some(i64::from(exptime));
        keys_from = end;
    }
    let mut long = LongGet {
        with_cas,
        touch,
        state: LongState::Keys,
    };
    match long.next(&buf[keys_from..]) {
        Step::Piece { get, consumed } => Some(Parsed::Complete {
            request: Request::Get(get),
            consumed: keys_from + consumed,
        }),
        // Fewer than a piece's bytes after the head: a head of tens of
        // kilobytes, which no client sends.
        Step::Incomplete | Step::Skip(_) => Some(Parsed::Complete {
            request: Request::Close,
            consumed: buf.len(),
        }),
    }
}

/// `VALUE <key> <flags> <bytes>[ <cas>]\r\n<data>\r\n`
#[inline]
pub fn compose_value(out: &mut Vec<u8>, key: &[u8], flags: u32, data: &[u8], cas: Option<u64>) {
    out.reserve(key.len() + data.len() + 48);
    out.extend_from_slice(b"VALUE ");
    out.extend_from_slice(key);
    out.push(b' ');
    put_u64(out, u64::from(flags));
    out.push(b' ');
    put_u64(out, data.len() as u64);
    if let Some(cas) = cas {
        out.push(b' ');
        put_u64(out, cas);
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

/// Appends `END\r\n`, which ends every retrieval reply.
pub fn compose_end(out: &mut Vec<u8>) {
    out.extend_from_slice(b"END\r\n");
}

/// The request a client sends: `get k1 k2\r\n` etc.
pub fn compose_request(out: &mut Vec<u8>, with_cas: bool, touch: Option<i64>, keys: &[&[u8]]) {
    out.extend_from_slice(match (with_cas, touch.is_some()) {
        (false, false) => b"get".as_slice(),
        (true, false) => b"gets",
        (false, true) => b"gat",
        (true, true) => b"gats",
    });
    if let Some(t) = touch {
        out.push(b' ');
        super::put_i64(out, t);
    }
    for k in keys {
        out.push(b' ');
        out.extend_from_slice(k);
    }
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::*;

    fn get(buf: &[u8]) -> Get<'_> {
        match one(buf).0 {
            Request::Get(g) => g,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn parses_multi_key_get_beyond_the_token_limit() {
        let line: String = std::iter::once("get".to_string())
            .chain((0..40).map(|i| format!("k{i}")))
            .collect::<Vec<_>>()
            .join(" ")
            + "\r\n";
        let g = get(line.as_bytes());
        assert_eq!(g.keys().count(), 40);
        assert!(!g.with_cas && g.touch.is_none());
    }

    #[test]
    fn gat_takes_exptime_first() {
        let g = get(b"gats 100 a b\r\n");
        assert!(g.with_cas);
        assert_eq!(g.touch, Some(100));
        assert_eq!(g.keys().collect::<Vec<_>>(), vec![&b"a"[..], b"b"]);
        assert_eq!(get(b"gat 10\r\n").keys().count(), 0);
        assert_eq!(error_of(b"gat abc k\r\n"), reply::BAD_EXPTIME);
    }

    #[test]
    fn rejects_no_keys_and_long_keys() {
        assert_eq!(error_of(b"get\r\n"), reply::ERROR);
        assert_eq!(error_of(b"gets   \r\n"), reply::ERROR);
        let long = format!("get a {} b\r\n", "k".repeat(251));
        let g = get(long.as_bytes());
        assert!(g.fails_after_keys);
        assert_eq!(g.keys().collect::<Vec<_>>(), vec![&b"a"[..]]);
        let ok = format!("get {}\r\n", "k".repeat(250));
        assert_eq!(get(ok.as_bytes()).keys().next().unwrap().len(), 250);
    }

    #[test]
    fn composes_values() {
        let mut out = Vec::new();
        compose_value(&mut out, b"k", 5, b"hello", Some(9));
        compose_value(&mut out, b"k", 0, b"", None);
        compose_end(&mut out);
        assert_eq!(out, b"VALUE k 5 5 9\r\nhello\r\nVALUE k 0 0\r\n\r\nEND\r\n");
        let mut req = Vec::new();
        compose_request(&mut req, true, Some(5), &[b"a", b"b"]);
        assert_eq!(req, b"gats 5 a b\r\n");
    }

    /// Serves `line` as a connection would, `chunk` bytes arriving at a
    /// time: (keys of each piece, whether it continues, whether it failed)
    /// and what was left unconsumed.
    fn stream(line: &[u8], chunk: usize) -> (Vec<(Vec<String>, bool, bool)>, usize) {
        let mut pieces = Vec::new();
        let mut buf: Vec<u8> = Vec::new();
        let mut long: Option<LongGet> = None;
        let mut fed = 0;
        loop {
            let step = match &mut long {
                None => match crate::protocol::parse(&buf, &LIMITS) {
                    Parsed::Incomplete => None,
                    Parsed::Complete { request, consumed } => {
                        let Request::Get(g) = request else {
                            panic!("{request:?}")
                        };
                        if g.continues {
                            long = Some(LongGet::after(&g));
                        }
                        Some((Some(g), consumed))
                    }
                },
                Some(l) => match l.next(&buf) {
                    Step::Incomplete => None,
                    Step::Skip(n) => Some((None, n)),
                    Step::Piece { get, consumed } => Some((Some(get), consumed)),
                },
            };
            match step {
                Some((get, consumed)) => {
                    if let Some(g) = get {
                        let keys = g
                            .keys()
                            .map(|k| String::from_utf8_lossy(k).into_owned())
                            .collect();
                        pieces.push((keys, g.continues, g.fails_after_keys));
                    }
                    buf.drain(..consumed);
                    if long.is_some_and(|l| l.done()) {
                        long = None;
                    }
                    if long.is_none() && !pieces.is_empty() && fed == line.len() && buf.is_empty() {
                        return (pieces, 0);
                    }
                }
                None if fed == line.len() => return (pieces, buf.len()),
                None => {
                    let n = chunk.min(line.len() - fed);
                    buf.extend_from_slice(&line[fed..fed + n]);
                    fed += n;
                }
            }
        }
    }

    fn keys_line(cmd: &str, n: usize) -> (Vec<u8>, Vec<String>) {
        let keys: Vec<String> = (0..n).map(|i| format!("key:{i:06}")).collect();
        (format!("{cmd} {}\r\n", keys.join(" ")).into_bytes(), keys)
    }

    #[test]
    fn a_long_line_is_served_in_pieces_with_every_key_once_in_order() {
        let (line, keys) = keys_line("gets", 20_000);
        assert!(line.len() > 3 * GET_LINE_WHOLE_BYTES_MAX);
        for chunk in [1000, 16 * 1024, 100_000] {
            let (pieces, left) = stream(&line, chunk);
            assert_eq!(left, 0);
            assert!(pieces.len() > 2, "served in pieces");
            let (last, rest) = pieces.split_last().unwrap();
            assert!(!last.1, "only the last piece ends the reply");
            assert!(rest.iter().all(|p| p.1 && !p.2));
            let served: Vec<String> = pieces.iter().flat_map(|p| p.0.clone()).collect();
            assert_eq!(served, keys, "chunk {chunk}");
        }
    }

    #[test]
    fn a_long_gat_keeps_its_exptime_in_every_piece() {
        let (mut line, keys) = keys_line("gat 100", 10_000);
        line.splice(..0, b"   ".iter().copied()); // leading spaces, as memcached allows
        let mut buf = line.clone();
        buf.truncate(GET_LINE_WHOLE_BYTES_MAX + 10);
        let Parsed::Complete {
            request: Request::Get(first),
            consumed,
        } = crate::protocol::parse(&buf, &LIMITS)
        else {
            panic!("a first piece");
        };
        assert!(first.continues && first.touch == Some(100) && !first.with_cas);
        assert!(consumed <= buf.len());
        let (pieces, _) = stream(&line, 4096);
        let served: Vec<String> = pieces.iter().flat_map(|p| p.0.clone()).collect();
        assert_eq!(served, keys);
    }

    #[test]
    fn a_long_key_or_a_nul_after_the_first_piece_fails_the_rest_of_the_line() {
        let (good, _) = keys_line("get", 10_000);
        let good = &good[..good.len() - 2];
        for bad in [
            format!(" {} after", "x".repeat(251)),
            " ab\0cd more".to_string(),
        ] {
            let mut line = good.to_vec();
            line.extend_from_slice(bad.as_bytes());
            line.extend_from_slice(&vec![b' '; 20_000]);
            line.extend_from_slice(b"k1 k2\r\n");
            let (pieces, left) = stream(&line, 8192);
            assert_eq!(left, 0, "the whole line is consumed");
            let (last, rest) = pieces.split_last().unwrap();
            assert!(last.2, "the piece that meets it fails");
            assert!(rest.iter().all(|p| !p.2));
            assert!(
                pieces
                    .iter()
                    .all(|p| !p.0.iter().any(|k| k == "k1" || k == "after")),
                "nothing after it is served"
            );
        }
        // A key too long as the line's end arrives: the whole-line rules.
        let mut line = good.to_vec();
        line.extend_from_slice(format!(" {}\r\n", "y".repeat(300)).as_bytes());
        let (pieces, left) = stream(&line, 8192);
        assert_eq!(left, 0);
        let last = pieces.last().unwrap();
        assert!(last.2 && !last.1);
    }

    #[test]
    fn a_long_line_of_anything_else_closes() {
        for start in [&b"set "[..], b"gat soon "] {
            let mut line = start.to_vec();
            line.resize(GET_LINE_WHOLE_BYTES_MAX + 10, b'k');
            let parsed = crate::protocol::parse(&line, &LIMITS);
            assert!(
                matches!(
                    parsed,
                    Parsed::Complete {
                        request: Request::Close,
                        ..
                    }
                ),
                "{parsed:?}"
            );
        }
    }
}
