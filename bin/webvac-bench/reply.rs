//! Reads one reply off the front of the input buffer.

use crate::workload::{Kind, Protocol};

/// One whole reply.
#[derive(Debug, PartialEq, Eq)]
pub struct Reply {
    /// Values returned (hits), for gets.
    pub hits: u32,
    /// The server answered ERROR, CLIENT_ERROR or SERVER_ERROR.
    pub error: bool,
    /// Bytes of input it took.
    pub consumed: usize,
}

/// `Ok(None)`: the reply is not all here yet. `Err`: the server said
/// something this request cannot be answered with; the stream is lost.
pub fn parse(buf: &[u8], kind: Kind, protocol: Protocol) -> Result<Option<Reply>, String> {
    let mut pos = 0;
    let mut hits = 0;
    let mut error = false;
    loop {
        let Some(nl) = memchr::memchr(b'\n', &buf[pos..]) else {
            return Ok(None);
        };
        let line = buf[pos..pos + nl]
            .strip_suffix(b"\r")
            .unwrap_or(&buf[pos..pos + nl]);
        let next = pos + nl + 1;
        let done = |hits, error| {
            Ok(Some(Reply {
                hits,
                error,
                consumed: next,
            }))
        };
        if is_error(line) {
            // A text get ends at its error; a meta multi-get still ends at MN.
            if matches!((protocol, kind), (Protocol::Meta, Kind::Get { keys }) if keys > 1) {
                error = true;
                pos = next;
                continue;
            }
            return done(hits, true);
        }
        match (protocol, kind) {
            (_, Kind::Set) => {
                let known: &[&[u8]] = match protocol {
                    Protocol::Text => &[b"STORED", b"NOT_STORED", b"EXISTS", b"NOT_FOUND"],
                    Protocol::Meta => &[b"HD", b"NS", b"EX", b"NF"],
                };
                if known.contains(&line) {
                    return done(0, false);
                }
            }
            (Protocol::Text, Kind::Get { .. }) => {
                if line == b"END" {
                    return done(hits, error);
                }
                if let Some(rest) = line.strip_prefix(b"VALUE ") {
                    let bytes = rest.split(|&b| b == b' ').nth(2);
                    let Some(len) = bytes.and_then(number) else {
                        return Err(unexpected(line));
                    };
                    let end = next + len + 2;
                    if buf.len() < end {
                        return Ok(None);
                    }
                    hits += 1;
                    pos = end;
                    continue;
                }
            }
            (Protocol::Meta, Kind::Get { keys }) => {
                if let Some(rest) = line.strip_prefix(b"VA ") {
                    let Some(len) = rest.split(|&b| b == b' ').next().and_then(number) else {
                        return Err(unexpected(line));
                    };
                    let end = next + len + 2;
                    if buf.len() < end {
                        return Ok(None);
                    }
                    hits += 1;
                    if keys == 1 {
                        return Ok(Some(Reply {
                            hits,
                            error,
                            consumed: end,
                        }));
                    }
                    pos = end;
                    continue;
                }
                if keys == 1 && line == b"EN" || keys > 1 && line == b"MN" {
                    return done(hits, error);
                }
            }
        }
        return Err(unexpected(line));
    }
}

fn is_error(line: &[u8]) -> bool {
    line == b"ERROR" || line.starts_with(b"CLIENT_ERROR") || line.starts_with(b"SERVER_ERROR")
}

fn number(t: &[u8]) -> Option<usize> {
    std::str::from_utf8(t).ok()?.parse().ok()
}

fn unexpected(line: &[u8]) -> String {
    let shown = &line[..line.len().min(80)];
    format!("unexpected reply line {:?}", String::from_utf8_lossy(shown))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(buf: &[u8], kind: Kind, p: Protocol) -> Option<Reply> {
        parse(buf, kind, p).unwrap()
    }

    #[test]
    fn text_replies() {
        let get = Kind::Get { keys: 2 };
        let buf = b"VALUE k1 0 3\r\nabc\r\nVALUE k2 5 1 77\r\nz\r\nEND\r\nSTORED\r\n";
        let r = one(buf, get, Protocol::Text).unwrap();
        assert_eq!((r.hits, r.error, r.consumed), (2, false, buf.len() - 8));
        let r = one(&buf[r.consumed..], Kind::Set, Protocol::Text).unwrap();
        assert_eq!((r.hits, r.error, r.consumed), (0, false, 8));
        for cut in 0..buf.len() - 8 {
            assert_eq!(one(&buf[..cut], get, Protocol::Text), None, "cut at {cut}");
        }
        let r = one(b"SERVER_ERROR out of memory\r\n", Kind::Set, Protocol::Text).unwrap();
        assert!(r.error);
        assert!(parse(b"HD\r\n", Kind::Set, Protocol::Text).is_err());
    }

    #[test]
    fn meta_replies() {
        let r = one(b"VA 2\r\nab\r\n", Kind::Get { keys: 1 }, Protocol::Meta).unwrap();
        assert_eq!((r.hits, r.consumed), (1, 10));
        let r = one(b"EN\r\n", Kind::Get { keys: 1 }, Protocol::Meta).unwrap();
        assert_eq!(r.hits, 0);
        let multi = b"VA 1\r\na\r\nCLIENT_ERROR bad\r\nVA 1\r\nb\r\nMN\r\n";
        let r = one(multi, Kind::Get { keys: 3 }, Protocol::Meta).unwrap();
        assert_eq!((r.hits, r.error, r.consumed), (2, true, multi.len()));
        assert_eq!(
            one(
                &multi[..multi.len() - 1],
                Kind::Get { keys: 3 },
                Protocol::Meta
            ),
            None
        );
        assert!(one(b"NS\r\n", Kind::Set, Protocol::Meta).is_some());
    }
}
