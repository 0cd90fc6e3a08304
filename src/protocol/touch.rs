//! `touch <key> <exptime> [noreply]`. Replies `TOUCHED` or `NOT_FOUND`.

use super::number::parse_i32_truncating;
use super::tokens::Tokens;
use super::{Request, key_and_noreply, reply};

/// A parsed `touch`.
#[derive(Debug)]
pub struct Touch<'a> {
    /// The key: at most 250 bytes.
    pub key: &'a [u8],
    /// The new exptime, memcached rules ([`crate::store::exptime`]).
    pub exptime: i64,
    /// Send no reply.
    pub noreply: bool,
}

/// Parses `touch` from its line's tokens.
pub fn parse<'a>(tokens: &Tokens<'a>) -> Request<'a> {
    let (key, noreply) = match key_and_noreply(tokens, &[4, 5]) {
        Ok(v) => v,
        Err(e) => return e,
    };
    let Some(exptime) = parse_i32_truncating(tokens.get(2)) else {
        return Request::error_noreply(reply::BAD_EXPTIME, noreply);
    };
    Request::Touch(Touch {
        key,
        exptime: i64::from(exptime),
        noreply,
    })
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::*;

    #[test]
    fn parses() {
        assert!(matches!(
            one(b"touch k 10 noreply\r\n").0,
            Request::Touch(Touch {
                exptime: 10,
                noreply: true,
                ..
            })
        ));
        assert_eq!(error_of(b"touch k\r\n"), reply::ERROR);
        assert_eq!(error_of(b"touch k abc\r\n"), reply::BAD_EXPTIME);
    }
}
