//! `mg <key> <flag>*`: meta get.
//!
//! Replies `VA <len> <flags>*\r\n<data>\r\n` (with `v`), `HD <flags>*`, or on
//! a miss `EN` (hidden by `q`). Returned flags follow request order; `T`, `N`
//! and `R` take effect at their position; `Z`, `X`, `W` come last.

use std::borrow::Cow;

use super::Flags;

/// A parsed `mg`.
#[derive(Debug)]
pub struct MetaGet<'a> {
    /// The key, base64-decoded when the `b` flag is given.
    pub key: Cow<'a, [u8]>,
    /// The flags, in request order.
    pub flags: Flags<'a>,
}

/// Composes `mg <key> <flag>*\r\n`. `key` goes as given (base64-encode a
/// binary key and pass `b` among the flags).
pub fn compose_request(out: &mut Vec<u8>, key: &[u8], flags: &[&str]) {
    out.extend_from_slice(b"mg ");
    out.extend_from_slice(key);
    for f in flags {
        out.push(b' ');
        out.extend_from_slice(f.as_bytes());
    }
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::super::super::Request;
    use super::super::super::test_util::*;
    use super::super::MetaRequest;
    use super::*;

    #[test]
    fn parses_flags_in_order() {
        let mut req = Vec::new();
        compose_request(&mut req, b"foo", &["v", "t", "O123", "k"]);
        match one(&req).0 {
            Request::Meta(MetaRequest::Get(g)) => {
                assert_eq!(&*g.key, b"foo");
                assert_eq!(g.flags.tokens, vec![&b"v"[..], b"t", b"O123", b"k"]);
                assert_eq!(g.flags.opaque, Some(&b"123"[..]));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn base64_key_is_decoded() {
        match one(b"mg Zm9v b v\r\n").0 {
            Request::Meta(MetaRequest::Get(g)) => assert_eq!(&*g.key, b"foo"),
            other => panic!("{other:?}"),
        }
    }
}
