//! The meta protocol: `mg`, `ms`, `md`, `ma`, `mn`, `me`, as memcached 1.6.18
//! implements them.
//!
//! Shared rules (see each command's file for the rest):
//! - after the key (and `ms`'s datalen) come flags; only a token's first byte
//!   names the flag, the rest is its argument (ignored for flags without one);
//! - a repeated flag or a first byte >= 127 stops parsing with `duplicate
//!   flag`, an unknown letter with `invalid flag`; a bad argument records an
//!   error and parsing goes on, the last error winning;
//! - replies echo requested flags in request order; `q` hides a command's
//!   nominal success (or `EN`) but never an error.

pub mod base64;
pub mod hints;
pub mod ma;
pub mod md;
pub mod me;
pub mod mg;
pub mod ms;

use std::borrow::Cow;

use super::number::{parse_i32_truncating, parse_u32_truncating, parse_u64};
use super::tokens::Tokens;
use super::{ParseLimits, Parsed, Request, reply};
use crate::limits::{KEY_BYTES_MAX, OPAQUE_BYTES_MAX};

/// Meta-protocol error replies, verbatim.
pub mod errors {
    /// A flag letter given twice, or a flag token starting with a byte >= 127.
    pub const DUPLICATE_FLAG: &str = "CLIENT_ERROR duplicate flag";
    /// A flag letter the command does not know.
    pub const INVALID_FLAG: &str = "CLIENT_ERROR invalid flag";
    /// A `T`, `N`, `R` or `C` argument that is not a number.
    pub const BAD_TOKEN: &str = "CLIENT_ERROR bad token in command line format";
    /// An `M` (mode) argument that is not exactly one byte.
    pub const BAD_M_LENGTH: &str = "CLIENT_ERROR incorrect length for M token";
    /// A `J` (initial value) argument that is not a 64-bit number.
    pub const BAD_INITIAL: &str = "CLIENT_ERROR invalid numeric initial value";
    /// A `D` (delta) argument that is not a 64-bit number.
    pub const BAD_DELTA: &str = "CLIENT_ERROR invalid numeric delta value";
    /// A `b` key that is not valid base64.
    pub const BAD_KEY_ENCODING: &str = "CLIENT_ERROR error decoding key";
    /// Any flag error in `md` or `ma` (memcached reports them all alike).
    pub const INVALID_OR_DUPLICATE: &str = "CLIENT_ERROR invalid or duplicate flag";
    /// `mg` with more than [`META_NTOKENS_MAX`] tokens.
    ///
    /// [`META_NTOKENS_MAX`]: super::META_NTOKENS_MAX
    pub const MG_TOO_MANY_FLAGS: &str = "CLIENT_ERROR options flags are too long";
    /// `ms`, `md` or `ma` with more than [`META_NTOKENS_MAX`] tokens.
    ///
    /// [`META_NTOKENS_MAX`]: super::META_NTOKENS_MAX
    pub const TOO_MANY_FLAGS: &str = "CLIENT_ERROR options flags too long";
    /// An `O` (opaque) value, after the letter, of [`OPAQUE_BYTES_MAX`] bytes
    /// or more.
    ///
    /// [`OPAQUE_BYTES_MAX`]: crate::limits::OPAQUE_BYTES_MAX
    pub const OPAQUE_TOO_LONG: &str = "CLIENT_ERROR opaque token too long";
    /// An `ms` mode letter other than `E`, `A`, `P`, `R`, `S`.
    pub const MS_BAD_MODE: &str = "CLIENT_ERROR invalid mode for ms M token";
    /// An `ma` mode letter other than `I`, `+`, `D`, `-`.
    pub const MA_BAD_MODE: &str = "CLIENT_ERROR invalid mode for ma M token";
}

/// Most tokens a meta command may have (memcached: `ntokens > 20` is refused;
/// ntokens counts the terminal token).
pub const META_NTOKENS_MAX: usize = 20;

/// One parsed meta command.
#[derive(Debug)]
pub enum MetaRequest<'a> {
    /// `mg`: get.
    Get(mg::MetaGet<'a>),
    /// `ms`: set, with the data block.
    Set(ms::MetaSet<'a>),
    /// `md`: delete.
    Delete(md::MetaDelete<'a>),
    /// `ma`: arithmetic (incr/decr).
    Arith(ma::MetaArith<'a>),
    /// `me`: debug dump of an item's metadata.
    Debug(me::MetaDebug<'a>),
    /// `mn`: no-op, answered `MN` (marks the end of a pipelined batch).
    Noop,
}

/// A meta command's parsed flags, in request order.
#[derive(Debug, Default)]
pub struct Flags<'a> {
    /// The flag tokens as sent, in order (for request-order replies).
    pub tokens: Vec<&'a [u8]>,
    /// Bit `c - b'A'` for each flag letter seen.
    seen: u64,
    /// `T`: a new TTL, as a client exptime.
    pub ttl: Option<i32>,
    /// `N`: on a miss, create the item with this TTL (vivify).
    pub vivify: Option<i32>,
    /// `R`: win a recache if the TTL left is below this many seconds.
    pub recache: Option<i32>,
    /// `C`: compare this CAS before changing the item.
    pub cas: Option<u64>,
    /// `F`: the client flags to store.
    pub client_flags: Option<u32>,
    /// `M`: the mode letter (`ms`, `ma`).
    pub mode: Option<u8>,
    /// `J`: the initial value an `ma` creates on a miss.
    pub initial: Option<u64>,
    /// `D`: the `ma` delta.
    pub delta: Option<u64>,
    /// `O`: the opaque token to echo, without its letter.
    pub opaque: Option<&'a [u8]>,
}

impl Flags<'_> {
    /// Whether the flag `letter` was given.
    pub fn has(&self, letter: u8) -> bool {
        letter.is_ascii_alphabetic() && self.seen & (1 << (letter - b'A')) != 0
    }
}

/// What went wrong parsing flags: the message to send.
pub type FlagError = &'static str;

/// Parses flag tokens with memcached's `_meta_flag_preparse` rules. On
/// success, also decodes a base64 key when `b` is present.
pub fn parse_flags<'a>(
    tokens: &[&'a [u8]],
    key: &'a [u8],
) -> (Flags<'a>, Cow<'a, [u8]>, Option<FlagError>) {
    let mut f = Flags {
        tokens: Vec::with_capacity(tokens.len()),
        ..Flags::default()
    };
    let mut error: Option<FlagError> = None;
    let mut key_out: Cow<'a, [u8]> = Cow::Borrowed(key);
    for &tok in tokens {
        let letter = tok[0];
        let arg = &tok[1..];
        if letter >= 127 || (letter.is_ascii_alphabetic() && f.has(letter)) {
            return (f, key_out, Some(errors::DUPLICATE_FLAG));
        }
        match letter {
            b'b' => match base64::decode(key) {
                Some(decoded) => key_out = Cow::Owned(decoded),
                None => error = Some(errors::BAD_KEY_ENCODING),
            },
            b'N' | b'T' | b'R' => match parse_i32_truncating(arg) {
                Some(v) => {
                    *match letter {
                        b'N' => &mut f.vivify,
                        b'T' => &mut f.ttl,
                        _ => &mut f.recache,
                    } = Some(v)
                }
                None => error = Some(errors::BAD_TOKEN),
            },
            b'C' => match parse_u64(arg) {
                Some(v) => f.cas = Some(v),
                None => error = Some(errors::BAD_TOKEN),
            },
            b'F' => match parse_u32_truncating(arg) {
                Some(v) => f.client_flags = Some(v),
                // memcached flags the failure without a message of its own,
                // so an earlier message stands.
                None => _ = error.get_or_insert(reply::BAD_FORMAT),
            },
            b'M' => {
                if arg.len() == 1 {
                    f.mode = Some(arg[0]);
                } else {
                    error = Some(errors::BAD_M_LENGTH);
                }
            }
            b'J' => match parse_u64(arg) {
                Some(v) => f.initial = Some(v),
                None => error = Some(errors::BAD_INITIAL),
            },
            b'D' => match parse_u64(arg) {
                Some(v) => f.delta = Some(v),
                None => error = Some(errors::BAD_DELTA),
            },
            b'O' => f.opaque = Some(arg),
            b'P' | b'L' | b'k' | b's' | b't' | b'c' | b'f' | b'v' | b'h' | b'l' | b'u' | b'q'
            | b'I' => {}
            _ => return (f, key_out, Some(errors::INVALID_FLAG)),
        }
        f.seen |= 1 << (letter - b'A');
        f.tokens.push(tok);
    }
    (f, key_out, error)
}

/// Whether an `O` token (with its letter) is within memcached's limit.
pub fn opaque_ok(opaque: &[u8]) -> bool {
    opaque.len() < OPAQUE_BYTES_MAX
}

/// Appends ` k<key>`, base64-encoding binary keys and marking them ` b`.
pub fn put_key(out: &mut Vec<u8>, key: &[u8], binary: bool) {
    out.extend_from_slice(b" k");
    if binary {
        out.extend_from_slice(base64::encode(key).as_bytes());
        out.extend_from_slice(b" b");
    } else {
        out.extend_from_slice(key);
    }
}

/// Common front matter of mg/md/ma: token count, key length.
fn key_and_flags<'a>(tokens: &Tokens<'a>) -> Result<(&'a [u8], Vec<&'a [u8]>), &'static str> {
    let key = tokens.get(1);
    if key.len() > KEY_BYTES_MAX {
        return Err(reply::BAD_FORMAT);
    }
    Ok((key, tokens.as_slice()[2..].to_vec()))
}

/// Parses a meta command whose line is `tokens` and ends at `line_end`
/// bytes; `rest` is the buffer after the line (`ms`'s data block).
pub fn parse<'a>(
    tokens: &Tokens<'a>,
    rest: &'a [u8],
    line_end: usize,
    limits: &ParseLimits,
) -> Parsed<'a> {
    let cmd = tokens.get(0)[1];
    let done = |request| Parsed::Complete {
        request,
        consumed: line_end,
    };
    match cmd {
        b'n' => return done(Request::Meta(MetaRequest::Noop)),
        b'e' => return done(me::parse(tokens)),
        b'g' | b's' | b'd' | b'a' => {}
        _ => return done(Request::error(reply::ERROR)),
    }
    if tokens.ntokens() < 3 {
        return done(Request::error(reply::ERROR));
    }
    if cmd == b's' {
        return ms::parse(tokens, rest, line_end, limits);
    }
    let (key, flag_tokens) = match key_and_flags(tokens) {
        Ok(v) => v,
        Err(e) => return done(Request::error(e)),
    };
    if tokens.ntokens() > META_NTOKENS_MAX {
        return done(Request::error(if cmd == b'g' {
            errors::MG_TOO_MANY_FLAGS
        } else {
            errors::TOO_MANY_FLAGS
        }));
    }
    let (flags, key, error) = parse_flags(&flag_tokens, key);
    let request = match cmd {
        b'g' => match error {
            Some(e) => Request::error(e),
            None => Request::Meta(MetaRequest::Get(mg::MetaGet { key, flags })),
        },
        b'd' => match error {
            Some(_) => Request::error(errors::INVALID_OR_DUPLICATE),
            None => Request::Meta(MetaRequest::Delete(md::MetaDelete { key, flags })),
        },
        _ => match error {
            Some(_) => Request::error(errors::INVALID_OR_DUPLICATE),
            None => ma::build(key, flags),
        },
    };
    done(request)
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::*;

    fn flags_of(line: &[u8]) -> Result<Flags<'_>, &'static str> {
        let tokens: Vec<&[u8]> = line
            .split(|&b| b == b' ')
            .filter(|t| !t.is_empty())
            .collect();
        let (f, _, e) = parse_flags(&tokens, b"k");
        e.map_or(Ok(f), Err)
    }

    #[test]
    fn flag_rules() {
        let f = flags_of(b"v T5 Oabc vq").unwrap_err();
        assert_eq!(f, errors::DUPLICATE_FLAG);
        let f = flags_of(b"vv T+5 Oabc C7 F4294967297 MA J1 D2 N-1 R9").unwrap();
        assert!(f.has(b'v') && f.has(b'O'));
        assert_eq!(
            (f.ttl, f.opaque, f.cas, f.client_flags, f.mode),
            (Some(5), Some(&b"abc"[..]), Some(7), Some(1), Some(b'A'))
        );
        assert_eq!(
            (f.initial, f.delta, f.vivify, f.recache),
            (Some(1), Some(2), Some(-1), Some(9))
        );
        assert_eq!(flags_of(b"x").unwrap_err(), errors::INVALID_FLAG);
        assert_eq!(flags_of(b"E5").unwrap_err(), errors::INVALID_FLAG);
        assert_eq!(flags_of(b"\xff").unwrap_err(), errors::DUPLICATE_FLAG);
        // Bad arguments: the last one wins; F keeps the default message.
        assert_eq!(flags_of(b"Tx Dy").unwrap_err(), errors::BAD_DELTA);
        assert_eq!(flags_of(b"Dy Tx").unwrap_err(), errors::BAD_TOKEN);
        assert_eq!(flags_of(b"Dy F").unwrap_err(), errors::BAD_DELTA);
        assert_eq!(flags_of(b"F").unwrap_err(), reply::BAD_FORMAT);
        assert_eq!(flags_of(b"Tx x").unwrap_err(), errors::INVALID_FLAG);
        assert_eq!(flags_of(b"Mset").unwrap_err(), errors::BAD_M_LENGTH);
    }

    #[test]
    fn command_level_errors() {
        assert_eq!(error_of(b"mx foo\r\n"), reply::ERROR);
        assert_eq!(error_of(b"mg\r\n"), reply::ERROR);
        assert_eq!(error_of(b"md foo x\r\n"), errors::INVALID_OR_DUPLICATE);
        assert_eq!(error_of(b"ma foo Dabc\r\n"), errors::INVALID_OR_DUPLICATE);
        assert_eq!(error_of(b"mg foo b\r\n"), errors::BAD_KEY_ENCODING);
        let many = b"mg foo s t f c k h l O1 P L u v T0 N0 R0 F1 C0 J1\r\n";
        assert_eq!(error_of(many), errors::MG_TOO_MANY_FLAGS);
        assert!(matches!(
            one(b"mg foo s t f c k h l O1 P L u v T0 N0 R0 F1 C0\r\n").0,
            Request::Meta(MetaRequest::Get(_))
        ));
        let long = format!("mg {} v\r\n", "a".repeat(251));
        assert_eq!(error_of(long.as_bytes()), reply::BAD_FORMAT);
        assert!(matches!(
            one(b"mn foo bar\r\n").0,
            Request::Meta(MetaRequest::Noop)
        ));
    }
}
