//! `touch <key> <exptime> [noreply]`. Replies `TOUCHED` or `NOT_FOUND`.

use super::number::parse_i32_truncating;
use super::tokens::Tokens;
use super::{Request, reply};
use crate::limits::KEY_BYTES_MAX;

#[derive(Debug)]
pub struct Touch<'a> {
    pub key: &'a [u8],
    pub exptime: i64,
    pub noreply: bool,
}

pub fn parse<'a>(tokens: &Tokens<'a>) -> Request<'a> {
    let n = tokens.ntokens();
    if n != 4 && n != 5 {
        return Request::error(reply::ERROR);
    }
    let noreply = tokens.noreply();
    let key = tokens.get(1);
    if key.len() > KEY_BYTES_MAX {
        return Request::error_noreply(reply::BAD_FORMAT, noreply);
    }
    let Some(exptime) = parse_i32_truncating(tokens.get(2)) else {
        return Request::error_noreply(reply::BAD_EXPTIME, noreply);
    };
    Request::Touch(Touch { key, exptime: i64::from(exptime), noreply })
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::*;

    #[test]
    fn parses() {
        assert!(matches!(one(b"touch k 10 noreply\r\n").0, Request::Touch(Touch { exptime: 10, noreply: true, .. })));
        assert_eq!(error_of(b"touch k\r\n"), reply::ERROR);
        assert_eq!(error_of(b"touch k abc\r\n"), reply::BAD_EXPTIME);
    }
}
