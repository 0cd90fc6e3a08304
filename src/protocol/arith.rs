//! `incr <key> <delta> [noreply]`, `decr <key> <delta> [noreply]`.
//!
//! Replies: the new value, `NOT_FOUND`, `CLIENT_ERROR invalid numeric delta
//! argument`, or `CLIENT_ERROR cannot increment or decrement non-numeric value`.
//! incr wraps at 2^64; decr stops at 0.

use super::number::parse_u64;
use super::tokens::Tokens;
use super::{Request, key_and_noreply, put_request_end, put_u64, reply};

/// A parsed `incr` or `decr`.
#[derive(Debug)]
pub struct ArithCmd<'a> {
    /// `true` for `incr`, `false` for `decr`.
    pub incr: bool,
    /// The key: at most 250 bytes.
    pub key: &'a [u8],
    /// The amount to add or subtract.
    pub delta: u64,
    /// Send no reply.
    pub noreply: bool,
}

/// Parses `incr`/`decr` (`cmd` says which) from its line's tokens.
pub fn parse<'a>(cmd: &[u8], tokens: &Tokens<'a>) -> Request<'a> {
    let (key, noreply) = match key_and_noreply(tokens, &[4, 5]) {
        Ok(v) => v,
        Err(e) => return e,
    };
    let Some(delta) = parse_u64(tokens.get(2)) else {
        return Request::error_noreply(reply::BAD_DELTA, noreply);
    };
    Request::Arith(ArithCmd {
        incr: cmd == b"incr",
        key,
        delta,
        noreply,
    })
}

/// The request a client sends: `incr <key> <delta>[ noreply]\r\n`.
pub fn compose_request(out: &mut Vec<u8>, incr: bool, key: &[u8], delta: u64, noreply: bool) {
    out.extend_from_slice(if incr { b"incr " } else { b"decr " });
    out.extend_from_slice(key);
    out.push(b' ');
    put_u64(out, delta);
    put_request_end(out, noreply);
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::*;

    #[test]
    fn parses_and_rejects_like_memcached() {
        match one(b"decr k 18446744073709551615 noreply\r\n").0 {
            Request::Arith(a) => assert_eq!(
                (a.incr, a.key, a.delta, a.noreply),
                (false, &b"k"[..], u64::MAX, true)
            ),
            other => panic!("{other:?}"),
        }
        assert_eq!(error_of(b"incr k\r\n"), reply::ERROR);
        assert_eq!(error_of(b"incr k 1 2 3\r\n"), reply::ERROR);
        assert_eq!(error_of(b"incr k -1\r\n"), reply::BAD_DELTA);
        assert_eq!(
            error_of(b"incr k 18446744073709551616\r\n"),
            reply::BAD_DELTA
        );
        let mut out = Vec::new();
        compose_request(&mut out, true, b"k", 5, false);
        assert_eq!(out, b"incr k 5\r\n");
    }
}
