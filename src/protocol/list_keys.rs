//! `lk <token> <count>`: webvac's key listing, one page per call.
//!
//! The reply is up to `count` lines `KY <key>` (`KY <base64> b` for a key
//! stored with a binary key), in key-hash order, then either `NT <token>`,
//! the token to continue from, or `EN` when the listing is complete. The
//! first call passes `-`. Sending the same token again lists from the same
//! position, so a retried call neither skips nor repeats keys. A page may
//! hold fewer keys than asked, even none, and still end in `NT`.
//!
//! Errors: `CLIENT_ERROR bad listing token` (a token we did not issue, or a
//! corrupt one), `CLIENT_ERROR bad count` (not 1..=10000), `ERROR` for the
//! wrong number of arguments, as memcached answers.

use super::tokens::Tokens;
use super::{Request, reply};
use crate::limits::{LIST_KEYS_PER_CALL_MAX, LIST_TOKEN_BYTES_MAX};

/// A token webvac did not issue, a corrupt one, or one over
/// [`LIST_TOKEN_BYTES_MAX`] bytes.
pub const BAD_TOKEN: &str = "CLIENT_ERROR bad listing token";
/// A count that is not a decimal number in `1..=`[`LIST_KEYS_PER_CALL_MAX`].
pub const BAD_COUNT: &str = "CLIENT_ERROR bad count";

/// The token of a listing's first call.
pub const START: &[u8] = b"-";

/// A parsed `lk`.
#[derive(Debug)]
pub struct ListKeys<'a> {
    /// As sent; authenticated by whoever executes it.
    pub token: &'a [u8],
    /// The most keys to answer: `1..=`[`LIST_KEYS_PER_CALL_MAX`].
    pub count: usize,
}

/// Parses `lk` from its line's tokens.
pub fn parse<'a>(tokens: &Tokens<'a>) -> Request<'a> {
    if tokens.len() != 3 {
        return Request::error(reply::ERROR);
    }
    let token = tokens.get(1);
    if token.len() > LIST_TOKEN_BYTES_MAX {
        return Request::error(BAD_TOKEN);
    }
    let count = std::str::from_utf8(tokens.get(2))
        .ok()
        .filter(|s| s.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|s| s.parse::<usize>().ok())
        .filter(|n| (1..=LIST_KEYS_PER_CALL_MAX).contains(n));
    match count {
        Some(count) => Request::ListKeys(ListKeys { token, count }),
        None => Request::error(BAD_COUNT),
    }
}

/// The request line, for clients.
pub fn compose(out: &mut Vec<u8>, token: &[u8], count: usize) {
    out.extend_from_slice(b"lk ");
    out.extend_from_slice(token);
    out.push(b' ');
    super::put_u64(out, count as u64);
    out.extend_from_slice(b"\r\n");
}

/// One `KY` line.
pub fn put_key(out: &mut Vec<u8>, key: &[u8], binary: bool) {
    out.extend_from_slice(b"KY ");
    if binary {
        out.extend_from_slice(super::meta::base64::encode(key).as_bytes());
        out.extend_from_slice(b" b");
    } else {
        out.extend_from_slice(key);
    }
    out.extend_from_slice(b"\r\n");
}

/// The line that ends a page: `NT <token>` or `EN`.
pub fn put_end(out: &mut Vec<u8>, next: Option<&[u8]>) {
    match next {
        Some(token) => {
            out.extend_from_slice(b"NT ");
            out.extend_from_slice(token);
            out.extend_from_slice(b"\r\n");
        }
        None => out.extend_from_slice(b"EN\r\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::*;

    #[test]
    fn parses_and_composes() {
        let mut line = Vec::new();
        compose(&mut line, START, 100);
        assert_eq!(line, b"lk - 100\r\n");
        match one(&line).0 {
            Request::ListKeys(l) => assert_eq!((l.token, l.count), (START, 100)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_arguments_get_memcached_style_errors() {
        assert_eq!(error_of(b"lk -\r\n"), reply::ERROR);
        assert_eq!(error_of(b"lk - 1 2\r\n"), reply::ERROR);
        for bad in ["0", "10001", "-1", "x", "+5", "99999999999999999999999"] {
            assert_eq!(
                error_of(format!("lk - {bad}\r\n").as_bytes()),
                BAD_COUNT,
                "{bad}"
            );
        }
        let long = format!("lk {} 1\r\n", "a".repeat(65));
        assert_eq!(error_of(long.as_bytes()), BAD_TOKEN);
    }

    #[test]
    fn reply_lines() {
        let mut out = Vec::new();
        put_key(&mut out, b"plain", false);
        put_key(&mut out, b"\x00\xff", true);
        put_end(&mut out, Some(b"abc"));
        put_end(&mut out, None);
        assert_eq!(out, b"KY plain\r\nKY AP8= b\r\nNT abc\r\nEN\r\n");
    }
}
