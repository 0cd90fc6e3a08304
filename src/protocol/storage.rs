//! `set|add|replace|append|prepend <key> <flags> <exptime> <bytes> [noreply]`
//! and `cas <key> <flags> <exptime> <bytes> <cas unique> [noreply]`, each
//! followed by a `<bytes>`-long data block and CRLF.
//!
//! Replies: `STORED`, `NOT_STORED`, `EXISTS`, `NOT_FOUND`. A data block
//! whose last two bytes are not CRLF gets `CLIENT_ERROR bad data chunk`; a
//! value over the item size limit gets `SERVER_ERROR object too large for
//! cache` and its data block is discarded unread.

use super::number::{parse_i32_truncating, parse_u32_truncating, parse_u64};
use super::tokens::Tokens;
use super::{ParseLimits, Parsed, Refused, Request, put_i64, put_u64, reply};
use crate::limits::KEY_BYTES_MAX;
use crate::store::Mode;

/// A parsed storage command with its data block.
#[derive(Debug)]
pub struct Storage<'a> {
    /// The command: `set` and `cas` are [`Mode::Set`].
    pub mode: Mode,
    /// The key: at most 250 bytes.
    pub key: &'a [u8],
    /// The client's opaque flags.
    pub flags: u32,
    /// Client exptime, memcached rules ([`crate::store::exptime`]).
    pub exptime: i64,
    /// `cas` command only.
    pub cas: Option<u64>,
    /// The value; empty when `refused`.
    pub data: &'a [u8],
    /// Send no reply.
    pub noreply: bool,
    /// The value was refused before it was read (too large, or no memory to
    /// buffer it): answer the refusal, discard its bytes, and (for `set`)
    /// drop the old value.
    pub refused: Option<Refused>,
}

fn mode_of(cmd: &[u8]) -> Mode {
    match cmd {
        b"add" => Mode::Add,
        b"replace" => Mode::Replace,
        b"append" => Mode::Append,
        b"prepend" => Mode::Prepend,
        _ => Mode::Set,
    }
}

/// `rest` is the buffer after the command line, which ends at `line_end`.
pub fn parse<'a>(
    cmd: &[u8],
    tokens: &Tokens<'a>,
    rest: &'a [u8],
    line_end: usize,
    limits: &ParseLimits,
) -> Parsed<'a> {
    let is_cas = cmd == b"cas";
    let n = tokens.ntokens();
    let done = |request| Parsed::Complete {
        request,
        consumed: line_end,
    };
    let allowed = if is_cas { [7, 8] } else { [6, 7] };
    if !allowed.contains(&n) {
        return done(Request::error(reply::ERROR));
    }
    let noreply = tokens.noreply();
    let bad = || Parsed::Complete {
        request: Request::error_noreply(reply::BAD_FORMAT, noreply),
        consumed: line_end,
    };
    let key = tokens.get(1);
    if key.len() > KEY_BYTES_MAX {
        return bad();
    }
    let (Some(flags), Some(exptime), Some(vlen)) = (
        parse_u32_truncating(tokens.get(2)),
        parse_i32_truncating(tokens.get(3)),
        parse_i32_truncating(tokens.get(4)),
    ) else {
        return bad();
    };
    let cas = if is_cas {
        match parse_u64(tokens.get(5)) {
            Some(c) => Some(c),
            None => return bad(),
        }
    } else {
        None
    };
    if !(0..=i32::MAX - 2).contains(&vlen) {
        return bad();
    }
    let vlen = vlen as usize;
    let mode = mode_of(cmd);
    if let Some(refused) = Refused::check(key.len(), flags, vlen, limits) {
        return done(Request::Storage(Storage {
            mode,
            key,
            flags,
            exptime: i64::from(exptime),
            cas,
            data: &[],
            noreply,
            refused: Some(refused),
        }));
    }
    if rest.len() < vlen + 2 {
        return Parsed::Incomplete;
    }
    let consumed = line_end + vlen + 2;
    if &rest[vlen..vlen + 2] != b"\r\n" {
        return Parsed::Complete {
            request: Request::error_noreply(reply::BAD_DATA_CHUNK, noreply),
            consumed,
        };
    }
    Parsed::Complete {
        request: Request::Storage(Storage {
            mode,
            key,
            flags,
            exptime: i64::from(exptime),
            cas,
            data: &rest[..vlen],
            noreply,
            refused: None,
        }),
        consumed,
    }
}

/// The request a client sends.
#[allow(clippy::too_many_arguments)]
pub fn compose_request(
    out: &mut Vec<u8>,
    mode: Mode,
    key: &[u8],
    flags: u32,
    exptime: i64,
    data: &[u8],
    cas: Option<u64>,
    noreply: bool,
) {
    out.extend_from_slice(match (cas.is_some(), mode) {
        (true, _) => b"cas ".as_slice(),
        (false, Mode::Set) => b"set ",
        (false, Mode::Add) => b"add ",
        (false, Mode::Replace) => b"replace ",
        (false, Mode::Append) => b"append ",
        (false, Mode::Prepend) => b"prepend ",
    });
    out.extend_from_slice(key);
    out.push(b' ');
    put_u64(out, u64::from(flags));
    out.push(b' ');
    put_i64(out, exptime);
    out.push(b' ');
    put_u64(out, data.len() as u64);
    if let Some(c) = cas {
        out.push(b' ');
        put_u64(out, c);
    }
    super::put_request_end(out, noreply);
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::super::parse as parse_any;
    use super::super::test_util::*;
    use super::*;

    fn storage(buf: &[u8]) -> (Storage<'_>, usize) {
        match one(buf) {
            (Request::Storage(s), n) => (s, n),
            (other, _) => panic!("{other:?}"),
        }
    }

    #[test]
    fn parses_set_and_cas_with_data() {
        let (s, n) = storage(b"set k 5 100 3\r\nabc\r\nget k\r\n");
        assert_eq!(
            (s.mode, s.key, s.flags, s.exptime, s.data, s.noreply),
            (Mode::Set, &b"k"[..], 5, 100, &b"abc"[..], false)
        );
        assert_eq!(n, 20);
        let (s, _) = storage(b"cas k 0 0 1 77 noreply\r\nx\r\n");
        assert_eq!((s.cas, s.noreply), (Some(77), true));
    }

    #[test]
    fn waits_for_the_whole_data_block() {
        assert!(matches!(
            parse_any(b"set k 0 0 3\r\nab", &LIMITS),
            Parsed::Incomplete
        ));
        assert!(matches!(
            parse_any(b"set k 0 0 3\r\nabc\r", &LIMITS),
            Parsed::Incomplete
        ));
    }

    #[test]
    fn memcached_error_replies() {
        assert_eq!(error_of(b"set k 0 0\r\n"), reply::ERROR);
        assert_eq!(error_of(b"set k 0 0 1 2 3\r\n"), reply::ERROR);
        assert_eq!(error_of(b"cas k 0 0 1\r\n"), reply::ERROR);
        assert_eq!(error_of(b"set k 0 0 -1\r\n"), reply::BAD_FORMAT);
        assert_eq!(error_of(b"set k abc 0 1\r\n"), reply::BAD_FORMAT);
        assert_eq!(error_of(b"set k -1 0 1\r\n"), reply::BAD_FORMAT);
        assert_eq!(error_of(b"set k 0 0 2147483647\r\n"), reply::BAD_FORMAT);
        assert_eq!(error_of(b"cas k 0 0 1 abc\r\n"), reply::BAD_FORMAT);
        let long = format!("set {} 0 0 1\r\nx\r\n", "k".repeat(251));
        assert_eq!(error_of(long.as_bytes()), reply::BAD_FORMAT);
        // A bad data chunk consumes exactly <bytes> + 2 after the line.
        let (r, n) = one(b"set k 0 0 1\r\nabc\r\n");
        assert!(matches!(
            r,
            Request::Error {
                reply: reply::BAD_DATA_CHUNK,
                ..
            }
        ));
        assert_eq!(n, 16);
    }

    #[test]
    fn memcached_narrows_flags_and_exptime_to_32_bits() {
        let (s, _) = storage(b"set k 4294967296 4294967296 1\r\nx\r\n");
        assert_eq!((s.flags, s.exptime), (0, 0));
    }

    #[test]
    fn too_large_items_are_swallowed_not_buffered() {
        let (s, n) = storage(b"set k 0 0 2000000\r\n");
        assert_eq!(s.refused, Some(Refused::TooLarge { swallow: 2_000_002 }));
        assert_eq!(n, 19);
        // The exact boundary: 48 + (1 + 1) + 1048516 + 2 + 8 == 1 MiB.
        let (s, _) = storage(b"set y 0 0 1048517\r\n");
        assert!(s.refused.is_some());
        assert!(matches!(
            parse_any(b"set y 0 0 1048516\r\n", &LIMITS),
            Parsed::Incomplete
        ));
    }

    #[test]
    fn data_over_the_buffer_allowance_is_refused_for_lack_of_memory() {
        let tight = ParseLimits {
            data_bytes_max: 100,
            ..LIMITS
        };
        match parse_any(b"set k 0 0 1000\r\n", &tight) {
            Parsed::Complete {
                request: Request::Storage(s),
                consumed,
            } => {
                assert_eq!(s.refused, Some(Refused::NoMemory { swallow: 1002 }));
                assert_eq!(consumed, 16);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse_any(b"set k 0 0 10\r\n", &tight),
            Parsed::Incomplete
        ));
    }

    #[test]
    fn compose_round_trips() {
        let mut out = Vec::new();
        compose_request(&mut out, Mode::Append, b"k", 1, -1, b"xy", None, true);
        assert_eq!(out, b"append k 1 -1 2 noreply\r\nxy\r\n");
        let (s, n) = storage(&out);
        assert_eq!(
            (s.mode, s.exptime, s.data, n),
            (Mode::Append, -1, &b"xy"[..], out.len())
        );
    }
}
