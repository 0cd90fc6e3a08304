//! `ms <key> <datalen> <flag>*\r\n<data>\r\n`: meta set.
//!
//! Replies `HD` (hidden by `q`), `NS`, `EX`, `NF`, with ` k…`, ` O…` and
//! ` c<cas>` echoed in request order. Modes: `MS` set (default), `ME` add,
//! `MA` append, `MP` prepend, `MR` replace.
//!
//! Which errors discard the data block follows memcached exactly: problems
//! with the key, the flag count or the datalen are answered without reading
//! the data (it is then parsed as a command); problems with flag values, the
//! mode, the opaque or the item size discard `datalen + 2` bytes.

use std::borrow::Cow;

use super::super::number::parse_i32_truncating;
use super::super::tokens::Tokens;
use super::super::{ParseLimits, Parsed, Refused, Request, reply};
use super::{Flags, META_NTOKENS_MAX, MetaRequest, errors, opaque_ok, parse_flags};
use crate::limits::KEY_BYTES_MAX;
use crate::store::Mode;

/// A parsed `ms` with its data block.
#[derive(Debug)]
pub struct MetaSet<'a> {
    /// The key, base64-decoded when the `b` flag is given.
    pub key: Cow<'a, [u8]>,
    /// The flags, in request order.
    pub flags: Flags<'a>,
    /// The write mode, from `M` (default set).
    pub mode: Mode,
    /// The value; empty when `refused`.
    pub data: &'a [u8],
    /// Refused before its data was read (too large, or no memory to buffer
    /// it): answer the refusal, drop the old item, discard its bytes.
    pub refused: Option<Refused>,
}

/// Parses `ms` from its line's tokens; the line ends at `line_end` and
/// `rest` is the buffer after it.
pub fn parse<'a>(
    tokens: &Tokens<'a>,
    rest: &'a [u8],
    line_end: usize,
    limits: &ParseLimits,
) -> Parsed<'a> {
    let done = |request| Parsed::Complete {
        request,
        consumed: line_end,
    };
    let raw_key = tokens.get(1);
    if raw_key.len() > KEY_BYTES_MAX || tokens.len() < 3 {
        return done(Request::error(reply::BAD_FORMAT));
    }
    if tokens.ntokens() > META_NTOKENS_MAX {
        return done(Request::error(errors::TOO_MANY_FLAGS));
    }
    let Some(vlen) = parse_i32_truncating(tokens.get(2)) else {
        return done(Request::error(reply::BAD_FORMAT));
    };
    if !(0..=i32::MAX - 2).contains(&vlen) {
        return done(Request::error(reply::BAD_FORMAT));
    }
    let vlen = vlen as usize;
    let swallow = |e: &'static str| Parsed::Complete {
        request: Request::Error {
            reply: e,
            noreply: false,
            swallow: vlen + 2,
        },
        consumed: line_end,
    };
    let (flags, key, error) = parse_flags(&tokens.as_slice()[3..], raw_key);
    if let Some(e) = error {
        return swallow(e);
    }
    if flags.opaque.is_some_and(|o| !opaque_ok(o)) {
        return swallow(errors::OPAQUE_TOO_LONG);
    }
    let mode = match flags.mode {
        None | Some(b'S') => Mode::Set,
        Some(b'E') => Mode::Add,
        Some(b'A') => Mode::Append,
        Some(b'P') => Mode::Prepend,
        Some(b'R') => Mode::Replace,
        Some(_) => return swallow(errors::MS_BAD_MODE),
    };
    if let Some(refused) = Refused::check(key.len(), flags.client_flags.unwrap_or(0), vlen, limits)
    {
        return done(Request::Meta(MetaRequest::Set(MetaSet {
            key,
            flags,
            mode,
            data: &[],
            refused: Some(refused),
        })));
    }
    if rest.len() < vlen + 2 {
        return Parsed::Incomplete;
    }
    let consumed = line_end + vlen + 2;
    if &rest[vlen..vlen + 2] != b"\r\n" {
        return Parsed::Complete {
            request: Request::error(reply::BAD_DATA_CHUNK),
            consumed,
        };
    }
    Parsed::Complete {
        request: Request::Meta(MetaRequest::Set(MetaSet {
            key,
            flags,
            mode,
            data: &rest[..vlen],
            refused: None,
        })),
        consumed,
    }
}

/// Composes `ms <key> <datalen> <flag>*\r\n<data>\r\n`. `key` goes as
/// given (base64-encode a binary key and pass `b` among the flags).
pub fn compose_request(out: &mut Vec<u8>, key: &[u8], data: &[u8], flags: &[&str]) {
    out.extend_from_slice(b"ms ");
    out.extend_from_slice(key);
    out.push(b' ');
    super::super::put_u64(out, data.len() as u64);
    for f in flags {
        out.push(b' ');
        out.extend_from_slice(f.as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::super::super::test_util::*;
    use super::super::super::{Parsed, parse as parse_any};
    use super::*;

    fn swallowed(buf: &[u8]) -> (&'static str, usize) {
        match one(buf).0 {
            Request::Error { reply, swallow, .. } => (reply, swallow),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn parses_with_mode_and_data() {
        let mut req = Vec::new();
        compose_request(&mut req, b"foo", b"bar", &["MA", "T10", "F5", "c"]);
        match one(&req) {
            (Request::Meta(MetaRequest::Set(s)), n) => {
                assert_eq!(
                    (s.mode, s.data, s.flags.ttl, s.flags.client_flags, n),
                    (Mode::Append, &b"bar"[..], Some(10), Some(5), req.len())
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn which_errors_swallow_the_data_block() {
        assert_eq!(swallowed(b"ms foo bar\r\n"), (reply::BAD_FORMAT, 0));
        assert_eq!(swallowed(b"ms foo\r\n"), (reply::BAD_FORMAT, 0));
        assert_eq!(swallowed(b"ms foo -1\r\n"), (reply::BAD_FORMAT, 0));
        assert_eq!(swallowed(b"ms foo 3 x\r\n"), (errors::INVALID_FLAG, 5));
        assert_eq!(swallowed(b"ms foo 3 MX\r\n"), (errors::MS_BAD_MODE, 5));
        assert_eq!(swallowed(b"ms foo 3 b\r\n"), (errors::BAD_KEY_ENCODING, 5));
        let long_opaque = format!("ms foo 3 O{}\r\n", "1".repeat(32));
        assert_eq!(
            swallowed(long_opaque.as_bytes()),
            (errors::OPAQUE_TOO_LONG, 5)
        );
        assert_eq!(
            swallowed(b"ms foo 3 s t f c k h l O1 P L u v T0 N0 R0 F1 C0\r\n"),
            (errors::TOO_MANY_FLAGS, 0)
        );
        assert!(matches!(
            parse_any(b"ms foo 3\r\nab", &LIMITS),
            Parsed::Incomplete
        ));
        assert_eq!(
            swallowed(b"ms foo 3\r\nabcd\r\n"),
            (reply::BAD_DATA_CHUNK, 0)
        );
    }

    #[test]
    fn too_large() {
        match one(b"ms big 2000000 q\r\n").0 {
            Request::Meta(MetaRequest::Set(s)) => {
                assert_eq!(s.refused, Some(Refused::TooLarge { swallow: 2_000_002 }))
            }
            other => panic!("{other:?}"),
        }
    }
}
