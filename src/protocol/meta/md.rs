//! `md <key> <flag>*`: meta delete. Replies `HD` (hidden by `q`), `NF`, `EX`,
//! with ` O…` and ` k…` echoed in request order. `I` marks the item stale
//! instead of deleting it (and `T` then sets its TTL).

use std::borrow::Cow;

use super::Flags;

/// A parsed `md`.
#[derive(Debug)]
pub struct MetaDelete<'a> {
    /// The key, base64-decoded when the `b` flag is given.
    pub key: Cow<'a, [u8]>,
    /// The flags, in request order.
    pub flags: Flags<'a>,
}

/// Composes `md <key> <flag>*\r\n`. `key` goes as given (base64-encode a
/// binary key and pass `b` among the flags).
pub fn compose_request(out: &mut Vec<u8>, key: &[u8], flags: &[&str]) {
    out.extend_from_slice(b"md ");
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

    #[test]
    fn parses() {
        match one(b"md k I T30 q\r\n").0 {
            Request::Meta(MetaRequest::Delete(d)) => {
                assert!(d.flags.has(b'I') && d.flags.has(b'q'));
                assert_eq!(d.flags.ttl, Some(30));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn composed_requests_parse_back() {
        let mut req = Vec::new();
        super::compose_request(&mut req, b"Zm9v", &["b", "O12", "Pi7f,w2"]);
        assert_eq!(req, b"md Zm9v b O12 Pi7f,w2\r\n");
        match one(&req).0 {
            Request::Meta(MetaRequest::Delete(d)) => {
                assert_eq!(&*d.key, b"foo");
                assert_eq!(d.flags.opaque, Some(&b"12"[..]));
            }
            other => panic!("{other:?}"),
        }
    }
}
