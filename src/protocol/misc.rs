//! `verbosity <level> [noreply]` (replies `OK`); `version` and `quit` need no
//! parsing beyond their name.

use super::number::parse_u32_truncating;
use super::tokens::Tokens;
use super::{Request, reply};

/// A parsed `verbosity`.
#[derive(Debug)]
pub struct Verbosity {
    /// The level asked for; recorded and reported, it changes no logging.
    pub level: u32,
    /// Send no reply.
    pub noreply: bool,
}

/// Parses `verbosity` from its line's tokens.
pub fn parse_verbosity<'a>(tokens: &Tokens<'a>) -> Request<'a> {
    let n = tokens.ntokens();
    if n != 3 && n != 4 {
        return Request::error(reply::ERROR);
    }
    let noreply = tokens.noreply();
    match parse_u32_truncating(tokens.get(1)) {
        Some(level) => Request::Verbosity(Verbosity { level, noreply }),
        None => Request::error_noreply(reply::BAD_FORMAT, noreply),
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::*;

    #[test]
    fn verbosity() {
        assert!(matches!(
            one(b"verbosity 1\r\n").0,
            Request::Verbosity(Verbosity {
                level: 1,
                noreply: false
            })
        ));
        assert_eq!(error_of(b"verbosity\r\n"), reply::ERROR);
        assert_eq!(error_of(b"verbosity abc\r\n"), reply::BAD_FORMAT);
        assert!(matches!(
            one(b"verbosity noreply\r\n").0,
            Request::Error { noreply: true, .. }
        ));
        assert!(matches!(one(b"version\r\n").0, Request::Version));
        assert!(matches!(one(b"quit\r\n").0, Request::Quit));
    }
}
