//! `flush_all [delay] [noreply]`. Replies `OK`.

use super::number::parse_i32_truncating;
use super::tokens::Tokens;
use super::{Request, reply};

/// A parsed `flush_all`.
#[derive(Debug)]
pub struct FlushAll {
    /// Seconds until the flush takes effect; 0 or less means now.
    pub delay: i64,
    /// Send no reply.
    pub noreply: bool,
}

/// Parses `flush_all` from its line's tokens.
pub fn parse<'a>(tokens: &Tokens<'a>) -> Request<'a> {
    let n = tokens.ntokens();
    if !(2..=4).contains(&n) {
        return Request::error(reply::ERROR);
    }
    let noreply = tokens.noreply();
    let mut delay = 0;
    if n != if noreply { 3 } else { 2 } {
        match parse_i32_truncating(tokens.get(1)) {
            Some(d) => delay = i64::from(d),
            None => return Request::error_noreply(reply::BAD_EXPTIME, noreply),
        }
    }
    Request::FlushAll(FlushAll { delay, noreply })
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::*;

    #[test]
    fn parses() {
        assert!(matches!(
            one(b"flush_all\r\n").0,
            Request::FlushAll(FlushAll {
                delay: 0,
                noreply: false
            })
        ));
        assert!(matches!(
            one(b"flush_all 10 noreply\r\n").0,
            Request::FlushAll(FlushAll {
                delay: 10,
                noreply: true
            })
        ));
        assert!(matches!(
            one(b"flush_all noreply\r\n").0,
            Request::FlushAll(FlushAll {
                delay: 0,
                noreply: true
            })
        ));
        assert_eq!(error_of(b"flush_all abc\r\n"), reply::BAD_EXPTIME);
        assert_eq!(error_of(b"flush_all 1 2 3\r\n"), reply::ERROR);
    }
}
