//! `delete <key> [0] [noreply]`. Replies `DELETED` or `NOT_FOUND`.
//! The legacy hold time must be `0` if present.

use super::tokens::Tokens;
use super::{Request, reply};
use crate::limits::KEY_BYTES_MAX;

/// A parsed `delete`.
#[derive(Debug)]
pub struct Delete<'a> {
    /// The key: at most 250 bytes.
    pub key: &'a [u8],
    /// Send no reply.
    pub noreply: bool,
}

/// Parses `delete` from its line's tokens.
pub fn parse<'a>(tokens: &Tokens<'a>) -> Request<'a> {
    let n = tokens.ntokens();
    if !(3..=5).contains(&n) {
        return Request::error(reply::ERROR);
    }
    let mut noreply = false;
    if n > 3 {
        let hold_is_zero = tokens.get(2) == b"0";
        noreply = tokens.noreply();
        let valid = (n == 4 && (hold_is_zero || noreply)) || (n == 5 && hold_is_zero && noreply);
        if !valid {
            return Request::error_noreply(reply::DELETE_USAGE, noreply);
        }
    }
    let key = tokens.get(1);
    if key.len() > KEY_BYTES_MAX {
        return Request::error_noreply(reply::BAD_FORMAT, noreply);
    }
    Request::Delete(Delete { key, noreply })
}

/// The request a client sends: `delete <key>[ noreply]\r\n`.
pub fn compose_request(out: &mut Vec<u8>, key: &[u8], noreply: bool) {
    out.extend_from_slice(b"delete ");
    out.extend_from_slice(key);
    super::put_request_end(out, noreply);
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::*;

    #[test]
    fn hold_time_rules() {
        assert!(matches!(
            one(b"delete a 0\r\n").0,
            Request::Delete(Delete { noreply: false, .. })
        ));
        assert!(matches!(
            one(b"delete a 0 noreply\r\n").0,
            Request::Delete(Delete { noreply: true, .. })
        ));
        assert_eq!(error_of(b"delete a 1\r\n"), reply::DELETE_USAGE);
        assert_eq!(error_of(b"delete a 1 2 3\r\n"), reply::ERROR);
        assert_eq!(error_of(b"delete\r\n"), reply::ERROR);
    }
}
