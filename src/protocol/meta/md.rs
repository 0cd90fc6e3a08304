//! `md <key> <flag>*`: meta delete. Replies `HD` (hidden by `q`), `NF`, `EX`,
//! with ` O…` and ` k…` echoed in request order. `I` marks the item stale
//! instead of deleting it (and `T` then sets its TTL).

use std::borrow::Cow;

use super::Flags;

#[derive(Debug)]
pub struct MetaDelete<'a> {
    pub key: Cow<'a, [u8]>,
    pub flags: Flags<'a>,
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
}
