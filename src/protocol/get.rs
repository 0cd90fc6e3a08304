//! `get <key>*`, `gets <key>*`, `gat <exptime> <key>*`, `gats <exptime> <key>*`.
//!
//! Replies: `VALUE <key> <flags> <bytes>[ <cas>]\r\n<data>\r\n` per hit, then
//! `END\r\n`. A key longer than 250 bytes anywhere in the list turns the whole
//! reply into `CLIENT_ERROR bad command line format` (no VALUE lines).

use super::number::parse_i32_truncating;
use super::tokens::Tokens;
use super::{Request, put_u64, reply};
use crate::limits::KEY_BYTES_MAX;

/// A parsed `get`, `gets`, `gat` or `gats`.
#[derive(Debug)]
pub struct Get<'a> {
    /// `gets` / `gats`: include the CAS.
    pub with_cas: bool,
    /// `gat` / `gats`: the new exptime.
    pub touch: Option<i64>,
    /// The key list, space separated, as it appeared on the line (up to a
    /// too-long key, if there is one).
    keys: &'a [u8],
    /// A key longer than 250 bytes follows `keys`. memcached has already
    /// fetched (and for `gat`, touched) the keys before it when it meets it,
    /// then answers `CLIENT_ERROR bad command line format` alone.
    pub fails_after_keys: bool,
}

impl<'a> Get<'a> {
    /// The keys, in order (duplicates included, as memcached answers them).
    pub fn keys(&self) -> impl Iterator<Item = &'a [u8]> + use<'a> {
        self.keys.split(|&b| b == b' ').filter(|k| !k.is_empty())
    }
}

/// Offset just past `token` within `line` (tokens are sub-slices of the line).
fn end_of(token: &[u8], line: &[u8]) -> usize {
    token.as_ptr() as usize - line.as_ptr() as usize + token.len()
}

/// Parses a retrieval command (`cmd` says which) from its line and the
/// line's tokens.
pub fn parse<'a>(cmd: &[u8], tokens: &Tokens<'a>, line: &'a [u8]) -> Request<'a> {
    if tokens.ntokens() < 3 {
        return Request::error(reply::ERROR);
    }
    let with_cas = cmd == b"gets" || cmd == b"gats";
    let touching = cmd == b"gat" || cmd == b"gats";
    let (touch, keys_from) = if touching {
        let Some(exptime) = parse_i32_truncating(tokens.get(1)) else {
            return Request::error(reply::BAD_EXPTIME);
        };
        (Some(i64::from(exptime)), end_of(tokens.get(1), line))
    } else {
        (None, end_of(tokens.get(0), line))
    };
    let mut get = Get {
        with_cas,
        touch,
        keys: &line[keys_from..],
        fails_after_keys: false,
    };
    if let Some(long) = get.keys().find(|k| k.len() > KEY_BYTES_MAX) {
        let end = long.as_ptr() as usize - line.as_ptr() as usize;
        get.keys = &line[keys_from..end];
        get.fails_after_keys = true;
    }
    Request::Get(get)
}

/// `VALUE <key> <flags> <bytes>[ <cas>]\r\n<data>\r\n`
#[inline]
pub fn compose_value(out: &mut Vec<u8>, key: &[u8], flags: u32, data: &[u8], cas: Option<u64>) {
    out.reserve(key.len() + data.len() + 48);
    out.extend_from_slice(b"VALUE ");
    out.extend_from_slice(key);
    out.push(b' ');
    put_u64(out, u64::from(flags));
    out.push(b' ');
    put_u64(out, data.len() as u64);
    if let Some(cas) = cas {
        out.push(b' ');
        put_u64(out, cas);
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

/// Appends `END\r\n`, which ends every retrieval reply.
pub fn compose_end(out: &mut Vec<u8>) {
    out.extend_from_slice(b"END\r\n");
}

/// The request a client sends: `get k1 k2\r\n` etc.
pub fn compose_request(out: &mut Vec<u8>, with_cas: bool, touch: Option<i64>, keys: &[&[u8]]) {
    out.extend_from_slice(match (with_cas, touch.is_some()) {
        (false, false) => b"get".as_slice(),
        (true, false) => b"gets",
        (false, true) => b"gat",
        (true, true) => b"gats",
    });
    if let Some(t) = touch {
        out.push(b' ');
        super::put_i64(out, t);
    }
    for k in keys {
        out.push(b' ');
        out.extend_from_slice(k);
    }
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::*;

    fn get(buf: &[u8]) -> Get<'_> {
        match one(buf).0 {
            Request::Get(g) => g,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn parses_multi_key_get_beyond_the_token_limit() {
        let line: String = std::iter::once("get".to_string())
            .chain((0..40).map(|i| format!("k{i}")))
            .collect::<Vec<_>>()
            .join(" ")
            + "\r\n";
        let g = get(line.as_bytes());
        assert_eq!(g.keys().count(), 40);
        assert!(!g.with_cas && g.touch.is_none());
    }

    #[test]
    fn gat_takes_exptime_first() {
        let g = get(b"gats 100 a b\r\n");
        assert!(g.with_cas);
        assert_eq!(g.touch, Some(100));
        assert_eq!(g.keys().collect::<Vec<_>>(), vec![&b"a"[..], b"b"]);
        assert_eq!(get(b"gat 10\r\n").keys().count(), 0);
        assert_eq!(error_of(b"gat abc k\r\n"), reply::BAD_EXPTIME);
    }

    #[test]
    fn rejects_no_keys_and_long_keys() {
        assert_eq!(error_of(b"get\r\n"), reply::ERROR);
        assert_eq!(error_of(b"gets   \r\n"), reply::ERROR);
        let long = format!("get a {} b\r\n", "k".repeat(251));
        let g = get(long.as_bytes());
        assert!(g.fails_after_keys);
        assert_eq!(g.keys().collect::<Vec<_>>(), vec![&b"a"[..]]);
        let ok = format!("get {}\r\n", "k".repeat(250));
        assert_eq!(get(ok.as_bytes()).keys().next().unwrap().len(), 250);
    }

    #[test]
    fn composes_values() {
        let mut out = Vec::new();
        compose_value(&mut out, b"k", 5, b"hello", Some(9));
        compose_value(&mut out, b"k", 0, b"", None);
        compose_end(&mut out);
        assert_eq!(out, b"VALUE k 5 5 9\r\nhello\r\nVALUE k 0 0\r\n\r\nEND\r\n");
        let mut req = Vec::new();
        compose_request(&mut req, true, Some(5), &[b"a", b"b"]);
        assert_eq!(req, b"gats 5 a b\r\n");
    }
}
