//! `ma <key> <flag>*`: meta arithmetic. `MI`/`M+` increments (default),
//! `MD`/`M-` decrements, by `D` (default 1). `N<ttl>` creates a missing item
//! with value `J` (default 0) without applying the delta. Replies `HD` or
//! `VA <len>` + number, `NF`, `EX`, `NS`.

use std::borrow::Cow;

use super::super::Request;
use super::{Flags, MetaRequest, errors};

/// A parsed `ma`, with the defaults filled in.
#[derive(Debug)]
pub struct MetaArith<'a> {
    /// The key, base64-decoded when the `b` flag is given.
    pub key: Cow<'a, [u8]>,
    /// The flags, in request order.
    pub flags: Flags<'a>,
    /// `true` to increment (mode `I`/`+`, the default), `false` to
    /// decrement (`D`/`-`).
    pub incr: bool,
    /// The amount to add or subtract (`D`; default 1).
    pub delta: u64,
    /// The value an `N` creates a missing item with (`J`; default 0).
    pub initial: u64,
}

/// Checks the mode (after flag parsing, as memcached does) and fills defaults.
pub fn build<'a>(key: Cow<'a, [u8]>, flags: Flags<'a>) -> Request<'a> {
    let incr = match flags.mode {
        None | Some(b'I' | b'+') => true,
        Some(b'D' | b'-') => false,
        _ => return Request::error(errors::MA_BAD_MODE),
    };
    let delta = flags.delta.unwrap_or(1);
    let initial = flags.initial.unwrap_or(0);
    Request::Meta(MetaRequest::Arith(MetaArith {
        key,
        flags,
        incr,
        delta,
        initial,
    }))
}

/// Composes `ma <key> <flag>*\r\n`. `key` goes as given (base64-encode a
/// binary key and pass `b` among the flags).
pub fn compose_request(out: &mut Vec<u8>, key: &[u8], flags: &[&str]) {
    out.extend_from_slice(b"ma ");
    out.extend_from_slice(key);
    for f in flags {
        out.push(b' ');
        out.extend_from_slice(f.as_bytes());
    }
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::super::super::test_util::*;
    use super::*;

    #[test]
    fn modes() {
        match one(b"ma k MD D5 N0 J9\r\n").0 {
            Request::Meta(MetaRequest::Arith(a)) => {
                assert_eq!((a.incr, a.delta, a.initial), (false, 5, 9))
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(error_of(b"ma k Mi\r\n"), errors::MA_BAD_MODE);
        assert_eq!(error_of(b"ma k MX q\r\n"), errors::MA_BAD_MODE);
        assert_eq!(error_of(b"ma k x MX\r\n"), errors::INVALID_OR_DUPLICATE);
        assert_eq!(error_of(b"ma k M\r\n"), errors::INVALID_OR_DUPLICATE);
    }

    #[test]
    fn composed_requests_parse_back() {
        let mut req = Vec::new();
        compose_request(&mut req, b"cnt", &["v", "MD", "D5", "O3", "Pi9f2c"]);
        assert_eq!(req, b"ma cnt v MD D5 O3 Pi9f2c\r\n");
        match one(&req).0 {
            Request::Meta(MetaRequest::Arith(a)) => {
                assert_eq!((&*a.key, a.incr, a.delta), (&b"cnt"[..], false, 5));
                assert_eq!(a.flags.opaque, Some(&b"3"[..]));
            }
            other => panic!("{other:?}"),
        }
    }
}
