//! Server replies: bytes in, typed replies out. No I/O.
//!
//! Meta replies frame themselves (`VA <len>` says how long its data block
//! is), so they parse the same whatever was asked. The replies of `version`,
//! `stats` and `lk` have no opaque and span a known set of lines, so the
//! caller says which of those it expects ([`Expect`]): the connection knows,
//! because it sends such commands only one at a time (see
//! `connection.rs`).
//!
//! A [`Decoder`] takes complete replies off the front of a read buffer and
//! leaves partial ones for the next read; incomplete is a normal outcome
//! (`Ok(None)`), not an error. For multi-line replies it remembers how far
//! it has looked, so a 10,000-key listing arriving in many reads is scanned
//! once, not once per read.

use bytes::{Buf, Bytes, BytesMut};

use crate::protocol::meta::base64;

/// The reply shape a request expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// A meta reply: `HD`/`VA`/`EN`/`NF`/`NS`/`EX`/`MN`, self-framed.
    Meta,
    /// `VERSION <text>`.
    Version,
    /// `STAT <name> <value>` lines up to `END`.
    Stats,
    /// `KY <key>[ b]` lines, then `NT <token>` or `EN`.
    Listing,
}

/// A meta reply's status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// `HD`: success without a value.
    Hd,
    /// `EN`: miss.
    En,
    /// `NF`: not found.
    Nf,
    /// `NS`: not stored.
    Ns,
    /// `EX`: CAS mismatch.
    Ex,
    /// `MN`: end of a `mn` no-op.
    Mn,
}

/// The return flags of a meta reply the client reads; others are skipped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReturnFlags {
    /// `O<n>`: the opaque the request carried.
    pub opaque: Option<u64>,
    /// `c<cas>`.
    pub cas: Option<u64>,
    /// `f<flags>`.
    pub client_flags: Option<u32>,
}

/// One decoded reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// A meta status line.
    Status(Status, ReturnFlags),
    /// `VA <len> <flags>*` and its data block.
    Value(Bytes, ReturnFlags),
    /// `VERSION <text>`: the text.
    Version(String),
    /// `STAT` lines up to `END`, as (name, rest of the line).
    Stats(Vec<(String, String)>),
    /// One `lk` page: keys, and the token of the next page (`NT`), or
    /// `None` when the listing is finished (`EN`).
    Listing {
        keys: Vec<Vec<u8>>,
        next: Option<String>,
    },
    /// `ERROR`, `CLIENT_ERROR`, `SERVER_ERROR`: these carry no opaque.
    Error(ErrorReply),
}

/// An error reply, with the text after its code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ErrorReply {
    /// `ERROR[ text]`: unknown command (memcached and webvac use it for
    /// refusals such as `ERROR Too many open connections` too).
    Error(String),
    /// `CLIENT_ERROR <text>`.
    Client(String),
    /// `SERVER_ERROR <text>`.
    Server(String),
}

impl Reply {
    /// The opaque the reply carries, if any.
    pub fn opaque(&self) -> Option<u64> {
        match self {
            Reply::Status(_, f) | Reply::Value(_, f) => f.opaque,
            _ => None,
        }
    }
}

/// Takes replies off the front of a buffer (see the module doc).
#[derive(Debug)]
pub struct Decoder {
    /// Largest reply, data block included.
    reply_bytes_max: usize,
    /// Longest line.
    line_bytes_max: usize,
    /// For a multi-line reply being received: where the first line not yet
    /// looked at starts.
    scanned: usize,
}

/// Why bytes could not be decoded. The connection they came on is useless
/// after this: it is closed.
pub type DecodeError = String;

impl Decoder {
    pub fn new(reply_bytes_max: usize, line_bytes_max: usize) -> Decoder {
        assert!(line_bytes_max < reply_bytes_max);
        Decoder {
            reply_bytes_max,
            line_bytes_max,
            scanned: 0,
        }
    }

    /// Removes one complete reply from the front of `buf` and returns it;
    /// `Ok(None)` when `buf` holds only part of one (leave it and read more).
    ///
    /// # Errors
    /// Bytes that are no reply of the expected kind, or a reply or line over
    /// its bound.
    pub fn decode(
        &mut self,
        buf: &mut BytesMut,
        expect: Expect,
    ) -> Result<Option<Reply>, DecodeError> {
        let result = match expect {
            Expect::Meta => self.decode_meta(buf),
            Expect::Version => self.decode_version(buf),
            Expect::Stats | Expect::Listing => self.decode_block(buf, expect),
        };
        match &result {
            Ok(Some(_)) | Err(_) => self.scanned = 0,
            Ok(None) if buf.len() > self.reply_bytes_max => {
                self.scanned = 0;
                return Err(format!(
                    "reply over {} bytes and still incomplete",
                    self.reply_bytes_max
                ));
            }
            Ok(None) => {}
        }
        result
    }

    /// The line starting at `from`, without its line end, and where the next
    /// line starts; `Ok(None)` without a newline yet.
    fn line_at<'b>(
        &self,
        buf: &'b [u8],
        from: usize,
    ) -> Result<Option<(&'b [u8], usize)>, DecodeError> {
        let rest = &buf[from..];
        match memchr::memchr(b'\n', rest) {
            Some(nl) => {
                let line = &rest[..nl];
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                if line.len() > self.line_bytes_max {
                    return Err(format!("reply line of {} bytes", line.len()));
                }
                Ok(Some((line, from + nl + 1)))
            }
            None if rest.len() > self.line_bytes_max => {
                Err(format!("reply line over {} bytes", self.line_bytes_max))
            }
            None => Ok(None),
        }
    }

    fn decode_meta(&mut self, buf: &mut BytesMut) -> Result<Option<Reply>, DecodeError> {
        let Some((line, line_end)) = self.line_at(buf, 0)? else {
            return Ok(None);
        };
        if let Some(e) = error_line(line) {
            buf.advance(line_end);
            return Ok(Some(Reply::Error(e)));
        }
        let mut tokens = line.split(|&b| b == b' ').filter(|t| !t.is_empty());
        let code = tokens.next().unwrap_or_default();
        let status = match code {
            b"HD" => Status::Hd,
            b"EN" => Status::En,
            b"NF" => Status::Nf,
            b"NS" => Status::Ns,
            b"EX" => Status::Ex,
            b"MN" => Status::Mn,
            b"VA" => {
                let len = tokens
                    .next()
                    .and_then(|t| std::str::from_utf8(t).ok())
                    .and_then(|t| t.parse::<usize>().ok())
                    .ok_or_else(|| format!("bad VA line {:?}", escape(line)))?;
                if len > self.reply_bytes_max {
                    return Err(format!("value of {len} bytes over the reply limit"));
                }
                let flags = return_flags(tokens)?;
                let end = line_end + len + 2;
                if buf.len() < end {
                    return Ok(None);
                }
                if &buf[end - 2..end] != b"\r\n" {
                    return Err("value block does not end with CRLF".into());
                }
                let mut block = buf.split_to(end).freeze();
                block.advance(line_end);
                block.truncate(len);
                return Ok(Some(Reply::Value(block, flags)));
            }
            _ => return Err(format!("unexpected reply {:?}", escape(line))),
        };
        let flags = return_flags(tokens)?;
        buf.advance(line_end);
        Ok(Some(Reply::Status(status, flags)))
    }

    fn decode_version(&mut self, buf: &mut BytesMut) -> Result<Option<Reply>, DecodeError> {
        let Some((line, line_end)) = self.line_at(buf, 0)? else {
            return Ok(None);
        };
        let reply = if let Some(e) = error_line(line) {
            Reply::Error(e)
        } else if let Some(v) = line.strip_prefix(b"VERSION ") {
            Reply::Version(String::from_utf8_lossy(v).into_owned())
        } else {
            return Err(format!("unexpected version reply {:?}", escape(line)));
        };
        buf.advance(line_end);
        Ok(Some(reply))
    }

    /// `stats` and `lk`: find the terminal line (resuming where the last
    /// call stopped), then parse the whole block.
    fn decode_block(
        &mut self,
        buf: &mut BytesMut,
        expect: Expect,
    ) -> Result<Option<Reply>, DecodeError> {
        let mut at = self.scanned;
        let end = loop {
            let Some((line, next)) = self.line_at(buf, at)? else {
                self.scanned = at;
                return Ok(None);
            };
            let terminal = error_line(line).is_some()
                || match expect {
                    Expect::Stats => line == b"END",
                    _ => line == b"EN" || line.starts_with(b"NT "),
                };
            at = next;
            if terminal {
                break at;
            }
        };
        let block = buf.split_to(end);
        let mut lines = block[..]
            .split(|&b| b == b'\n')
            .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
        let reply = match expect {
            Expect::Stats => parse_stats(&mut lines)?,
            _ => parse_listing(&mut lines)?,
        };
        Ok(Some(reply))
    }
}

fn parse_stats<'a>(lines: &mut impl Iterator<Item = &'a [u8]>) -> Result<Reply, DecodeError> {
    let mut stats = Vec::new();
    for line in lines {
        if let Some(e) = error_line(line) {
            return Ok(Reply::Error(e));
        }
        if line == b"END" {
            return Ok(Reply::Stats(stats));
        }
        let text = String::from_utf8_lossy(line);
        let Some((name, value)) = text
            .strip_prefix("STAT ")
            .map(|rest| rest.split_once(' ').unwrap_or((rest, "")))
        else {
            return Err(format!("unexpected stats line {text:?}"));
        };
        stats.push((name.to_string(), value.to_string()));
    }
    unreachable!("a stats block ends with its terminal line")
}

fn parse_listing<'a>(lines: &mut impl Iterator<Item = &'a [u8]>) -> Result<Reply, DecodeError> {
    let mut keys = Vec::new();
    for line in lines {
        if let Some(e) = error_line(line) {
            return Ok(Reply::Error(e));
        }
        if line == b"EN" {
            return Ok(Reply::Listing { keys, next: None });
        }
        if let Some(token) = line.strip_prefix(b"NT ") {
            let token = std::str::from_utf8(token)
                .ok()
                .filter(|t| !t.is_empty() && t.bytes().all(|b| (0x21..=0x7e).contains(&b)))
                .ok_or_else(|| format!("bad listing token {:?}", escape(token)))?;
            return Ok(Reply::Listing {
                keys,
                next: Some(token.to_string()),
            });
        }
        let Some(rest) = line.strip_prefix(b"KY ") else {
            return Err(format!("unexpected listing line {:?}", escape(line)));
        };
        let key = match rest.strip_suffix(b" b") {
            Some(encoded) => base64::decode(encoded)
                .ok_or_else(|| format!("bad base64 key {:?}", escape(encoded)))?,
            None => rest.to_vec(),
        };
        if key.is_empty() {
            return Err("empty key in listing".into());
        }
        keys.push(key);
    }
    unreachable!("a listing block ends with its terminal line")
}

/// An error line, if `line` is one.
fn error_line(line: &[u8]) -> Option<ErrorReply> {
    let text = || String::from_utf8_lossy(line).into_owned();
    if line == b"ERROR" || line.starts_with(b"ERROR ") || line.starts_with(b"ERROR:") {
        Some(ErrorReply::Error(text()))
    } else if let Some(rest) = line.strip_prefix(b"CLIENT_ERROR") {
        Some(ErrorReply::Client(trimmed(rest)))
    } else {
        line.strip_prefix(b"SERVER_ERROR")
            .map(|rest| ErrorReply::Server(trimmed(rest)))
    }
}

fn trimmed(rest: &[u8]) -> String {
    String::from_utf8_lossy(rest).trim_start().to_string()
}

fn return_flags<'a>(tokens: impl Iterator<Item = &'a [u8]>) -> Result<ReturnFlags, DecodeError> {
    let mut flags = ReturnFlags::default();
    for t in tokens {
        let number = || std::str::from_utf8(&t[1..]).ok();
        let bad = || format!("bad return flag {:?}", escape(t));
        match t[0] {
            b'O' => flags.opaque = Some(number().and_then(|n| n.parse().ok()).ok_or_else(bad)?),
            b'c' => flags.cas = Some(number().and_then(|n| n.parse().ok()).ok_or_else(bad)?),
            b'f' => {
                flags.client_flags = Some(number().and_then(|n| n.parse().ok()).ok_or_else(bad)?)
            }
            _ => {}
        }
    }
    Ok(flags)
}

/// Printable form of protocol bytes for error messages, cut at 100 bytes.
fn escape(bytes: &[u8]) -> String {
    let cut = &bytes[..bytes.len().min(100)];
    let mut s = cut.escape_ascii().to_string();
    if cut.len() < bytes.len() {
        s.push('…');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decoder() -> Decoder {
        Decoder::new(1024, 100)
    }

    /// Decodes every reply in `bytes`, all of `expect`, and checks that
    /// feeding it one byte at a time gives the same replies.
    fn all(bytes: &[u8], expect: Expect) -> Vec<Reply> {
        let mut d = decoder();
        let mut buf = BytesMut::from(bytes);
        let mut whole = Vec::new();
        while let Some(r) = d.decode(&mut buf, expect).unwrap() {
            whole.push(r);
        }
        assert!(buf.is_empty(), "left over: {buf:?}");
        let mut buf = BytesMut::new();
        let mut trickled = Vec::new();
        for &b in bytes {
            buf.extend_from_slice(&[b]);
            while let Some(r) = d.decode(&mut buf, expect).unwrap() {
                trickled.push(r);
            }
        }
        assert_eq!(whole, trickled);
        whole
    }

    fn one(bytes: &[u8], expect: Expect) -> Reply {
        let mut replies = all(bytes, expect);
        assert_eq!(replies.len(), 1, "{replies:?}");
        replies.remove(0)
    }

    #[test]
    fn meta_statuses_and_flags() {
        let flags = |opaque, cas, client_flags| ReturnFlags {
            opaque,
            cas,
            client_flags,
        };
        assert_eq!(
            all(
                b"HD O7 c99\r\nEN O8\r\nNF\r\nNS O1 k/x\r\nEX t-1\r\nMN\r\n",
                Expect::Meta
            ),
            vec![
                Reply::Status(Status::Hd, flags(Some(7), Some(99), None)),
                Reply::Status(Status::En, flags(Some(8), None, None)),
                Reply::Status(Status::Nf, flags(None, None, None)),
                Reply::Status(Status::Ns, flags(Some(1), None, None)),
                Reply::Status(Status::Ex, flags(None, None, None)),
                Reply::Status(Status::Mn, flags(None, None, None)),
            ]
        );
        assert_eq!(
            one(b"VA 5 f3 c4 O5\r\nab\r\nc\r\n", Expect::Meta),
            Reply::Value(
                Bytes::from_static(b"ab\r\nc"),
                flags(Some(5), Some(4), Some(3))
            )
        );
        assert_eq!(
            one(b"VA 0\r\n\r\n", Expect::Meta),
            Reply::Value(Bytes::new(), ReturnFlags::default())
        );
    }

    #[test]
    fn error_lines_in_every_mode() {
        for expect in [
            Expect::Meta,
            Expect::Version,
            Expect::Stats,
            Expect::Listing,
        ] {
            assert_eq!(
                one(b"ERROR\r\n", expect),
                Reply::Error(ErrorReply::Error("ERROR".into()))
            );
            assert_eq!(
                one(b"CLIENT_ERROR bad count\r\n", expect),
                Reply::Error(ErrorReply::Client("bad count".into()))
            );
            assert_eq!(
                one(b"SERVER_ERROR out of memory\r\n", expect),
                Reply::Error(ErrorReply::Server("out of memory".into()))
            );
        }
    }

    #[test]
    fn version_and_stats() {
        assert_eq!(
            one(b"VERSION 1.6.18\r\n", Expect::Version),
            Reply::Version("1.6.18".into())
        );
        assert_eq!(
            one(
                b"STAT node_id 2\r\nSTAT member:1 up client=1.2.3.4:5 x=y\r\nSTAT empty\r\nEND\r\n",
                Expect::Stats
            ),
            Reply::Stats(vec![
                ("node_id".into(), "2".into()),
                ("member:1".into(), "up client=1.2.3.4:5 x=y".into()),
                ("empty".into(), "".into()),
            ])
        );
    }

    #[test]
    fn listings() {
        assert_eq!(
            one(b"KY a\r\nKY AAE= b\r\nNT p3:abc\r\n", Expect::Listing),
            Reply::Listing {
                keys: vec![b"a".to_vec(), vec![0, 1]],
                next: Some("p3:abc".into())
            }
        );
        assert_eq!(
            one(b"EN\r\n", Expect::Listing),
            Reply::Listing {
                keys: vec![],
                next: None
            }
        );
        assert_eq!(
            one(b"NT x\r\n", Expect::Listing),
            Reply::Listing {
                keys: vec![],
                next: Some("x".into())
            }
        );
        // A key that only looks like a terminal is a key.
        assert_eq!(
            one(b"KY EN\r\nKY NT\r\nEN\r\n", Expect::Listing),
            Reply::Listing {
                keys: vec![b"EN".to_vec(), b"NT".to_vec()],
                next: None
            }
        );
    }

    #[test]
    fn garbage_is_an_error() {
        let mut d = decoder();
        for (bytes, expect) in [
            (&b"STORED\r\n"[..], Expect::Meta),
            (b"VA x\r\n", Expect::Meta),
            (b"VA 2\r\nabcd\r\n", Expect::Meta),
            (b"HD Oabc\r\n", Expect::Meta),
            (b"hello\r\n", Expect::Version),
            (b"STAT a 1\r\nbogus\r\nEND\r\n", Expect::Stats),
            (b"KY a\r\nxx\r\nEN\r\n", Expect::Listing),
            (b"KY !!!! b\r\nEN\r\n", Expect::Listing),
            (b"NT \r\n", Expect::Listing),
        ] {
            let mut buf = BytesMut::from(bytes);
            assert!(
                d.decode(&mut buf, expect).is_err(),
                "{:?}",
                String::from_utf8_lossy(bytes)
            );
        }
    }

    #[test]
    fn bounds() {
        let mut d = decoder();
        // A line without a newline past the line limit.
        let mut buf = BytesMut::from(&[b'H'; 101][..]);
        assert!(d.decode(&mut buf, Expect::Meta).is_err());
        // A value over the reply limit is refused from its header.
        let mut buf = BytesMut::from(&b"VA 2000\r\n"[..]);
        assert!(d.decode(&mut buf, Expect::Meta).is_err());
        // A listing that never ends.
        let mut buf = BytesMut::new();
        let mut failed = false;
        for _ in 0..200 {
            buf.extend_from_slice(b"KY abcdefgh\r\n");
            match d.decode(&mut buf, Expect::Listing) {
                Ok(None) => {}
                Ok(Some(r)) => panic!("{r:?}"),
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }
        assert!(failed);
    }
}
