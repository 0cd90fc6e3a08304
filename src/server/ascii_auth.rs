//! memcached's ASCII authentication (`-Y authfile`): a connection's first
//! command must be a `set` whose value is `user password`, matching a line
//! `user:password` of the file; until then every other command gets
//! `CLIENT_ERROR unauthenticated`. Replies are memcached 1.6.18's, byte for
//! byte, but for one input 1.6.18 handles with undefined behaviour (a
//! `set` announcing 2 GB): there webvac answers as later memcached does,
//! `CLIENT_ERROR auth token too long`.

use std::path::{Path, PathBuf};

use crate::protocol::number::parse_u32_truncating;

/// The most `user:password` entries a file holds (memcached's
/// `MAX_ENTRIES`; memcached ignores the rest, webvac refuses the file).
pub const ENTRIES_MAX: usize = 8;
/// An entry line, newline included, must be shorter than this (memcached
/// reads entries with `fgets` into `MAX_ENTRY_LEN` bytes, its NUL included).
pub const ENTRY_BYTES_MAX: usize = 256;
/// The longest `user password` value taken (later memcached's
/// `MAX_AUTH_REQ_LEN`).
pub const TOKEN_BYTES_MAX: usize = 16 * 1024;
/// Bytes of the first line a connection may send without a newline before
/// it is closed (memcached's 2048).
pub const LINE_BYTES_MAX: usize = 2048;

/// The users of an auth file.
#[derive(Clone, PartialEq, Eq)]
pub struct AuthFile {
    /// Where it was read from (`stats settings` `auth_enabled_ascii`).
    pub path: PathBuf,
    entries: Vec<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for AuthFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthFile")
            .field("path", &self.path)
            .field("entries", &self.entries.len())
            .finish()
    }
}

impl AuthFile {
    /// Reads `path`: one `user:password` a line (the password ends at the
    /// line's end; a `\r` before it is not part of it).
    ///
    /// # Errors
    /// memcached's messages: the file cannot be opened, or a line has no
    /// `:`; and webvac's own for more than [`ENTRIES_MAX`] entries or an
    /// entry past [`ENTRY_BYTES_MAX`], which memcached would silently cut.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read(path).map_err(|e| {
            format!(
                "Could not open authfile [{}] for reading, error {e}",
                path.display()
            )
        })?;
        Self::parse(path, &text)
    }

    fn parse(path: &Path, text: &[u8]) -> Result<Self, String> {
        let malformed = || {
            format!(
                "Authfile [{}] has a malformed entry. Should be 'user:password'",
                path.display()
            )
        };
        // What memcached 1.6.18's fgets loop would read otherwise than a
        // reader of lines does is refused rather than guessed at: a NUL,
        // a carriage return not ending its line, a line it would split.
        if text.contains(&0) {
            return Err(malformed());
        }
        let mut entries = Vec::new();
        for line in text.split_inclusive(|&b| b == b'\n') {
            if line.len() >= ENTRY_BYTES_MAX {
                return Err(format!(
                    "Authfile [{}] has an entry of {ENTRY_BYTES_MAX} bytes or more",
                    path.display()
                ));
            }
            let content = line.strip_suffix(b"\n").unwrap_or(line);
            let content = content.strip_suffix(b"\r").unwrap_or(content);
            if content.contains(&b'\r') {
                return Err(malformed());
            }
            let Some(colon) = line.iter().position(|&b| b == b':') else {
                return Err(malformed());
            };
            let pass = &line[colon + 1..];
            let end = pass
                .iter()
                .position(|&b| b == b'\r' || b == b'\n' || b == 0)
                .unwrap_or(pass.len());
            entries.push((line[..colon].to_vec(), pass[..end].to_vec()));
        }
        if entries.len() > ENTRIES_MAX {
            return Err(format!(
                "Authfile [{}] has {} entries; memcached reads only the first {ENTRIES_MAX}",
                path.display(),
                entries.len()
            ));
        }
        Ok(Self {
            path: path.to_path_buf(),
            entries,
        })
    }

    /// Whether `user` and `pass` are an entry's (compared in time that
    /// does not depend on where they differ).
    pub fn check(&self, user: &[u8], pass: &[u8]) -> bool {
        self.entries.iter().fold(false, |found, (u, p)| {
            found | (same(u, user) & same(p, pass))
        })
    }
}

/// Equal, comparing every byte whatever the first difference.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

/// What one step of an unauthenticated connection's input gives.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Not a whole command yet: read more.
    Incomplete,
    /// No newline within [`LINE_BYTES_MAX`]: close without a word.
    Close,
    /// One command, answered.
    Reply {
        /// Bytes of input the command took.
        consumed: usize,
        /// The answer, unless it is an attempt that fails.
        reply: &'static str,
        /// An attempt: where the user and the password are in the input,
        /// as (user start, user length, password start, password length).
        attempt: Option<(usize, usize, usize, usize)>,
    },
}

/// memcached's tokenizer: words split on single spaces, empty ones skipped.
fn words(line: &[u8]) -> impl Iterator<Item = &[u8]> {
    line.split(|&b| b == b' ').filter(|w| !w.is_empty())
}

/// What C string functions see of `bytes`: everything before the first NUL.
fn c_string(bytes: &[u8]) -> &[u8] {
    &bytes[..memchr::memchr(0, bytes).unwrap_or(bytes.len())]
}

/// Looks at the start of `input` as memcached does before a connection has
/// authenticated: a `set` line whose data block is `user password`.
pub fn step(input: &[u8]) -> Step {
    // memcached waits for two bytes before it looks: a lone "\n" (left
    // over after a data block one byte too long) is not yet a line.
    if input.len() < 2 {
        return Step::Incomplete;
    }
    let Some(newline) = memchr::memchr(b'\n', input) else {
        return if input.len() > LINE_BYTES_MAX {
            Step::Close
        } else {
            Step::Incomplete
        };
    };
    // memcached tokenizes the line as a C string: a NUL ends it.
    let line = c_string(&input[..newline]);
    let line_bytes = newline + 1;
    let reply = |consumed, reply| Step::Reply {
        consumed,
        reply,
        attempt: None,
    };
    let tokens: Vec<&[u8]> = words(line).take(24).collect();
    let size = match tokens.as_slice() {
        // memcached's safe_strtoul: a sign and C whitespace are taken, and
        // the number is cut to 32 bits (2^32 + 7 is 7).
        [b"set", _, _, _, size, ..] => parse_u32_truncating(size),
        _ => None,
    };
    let Some(size) = size else {
        return reply(line_bytes, "CLIENT_ERROR unauthenticated");
    };
    let size = size as usize;
    if size > TOKEN_BYTES_MAX {
        return reply(line_bytes, "CLIENT_ERROR auth token too long");
    }
    let end = line_bytes + size + 2;
    if input.len() < end {
        return Step::Incomplete;
    }
    let data = &input[line_bytes..end];
    if !data.ends_with(b"\r\n") {
        return reply(end, "CLIENT_ERROR bad command line termination");
    }
    // The value, too, is read as a C string.
    let value = c_string(&data[..size]);
    let mut at = 0;
    let mut spans = Vec::with_capacity(2);
    for word in value.split(|&b| b == b' ') {
        if !word.is_empty() && spans.len() < 2 {
            spans.push((line_bytes + at, word.len()));
        }
        at += word.len() + 1;
    }
    let [(user_at, user_len), (pass_at, pass_len)] = spans[..] else {
        return reply(end, "CLIENT_ERROR bad authentication token format");
    };
    Step::Reply {
        consumed: end,
        reply: "STORED",
        attempt: Some((user_at, user_len, pass_at, pass_len)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> AuthFile {
        AuthFile::parse(Path::new("authfile"), text.as_bytes()).expect("parses")
    }

    #[test]
    fn entries_are_user_colon_password_lines() {
        let f = file("foo:bar\nbaaaz:quux\r\nempty:\n");
        assert!(f.check(b"foo", b"bar"));
        assert!(f.check(b"baaaz", b"quux"), "a \\r ends the password");
        assert!(f.check(b"empty", b""));
        assert!(!f.check(b"foo", b"ba"));
        assert!(!f.check(b"foo", b"barr"));
        assert!(!f.check(b"baaaz", b"bar"));
        let err = AuthFile::parse(Path::new("f"), b"foo:bar\nnocolon\n").expect_err("malformed");
        assert_eq!(
            err,
            "Authfile [f] has a malformed entry. Should be 'user:password'"
        );
        let nine: String = (0..9).map(|i| format!("u{i}:p\n")).collect();
        assert!(AuthFile::parse(Path::new("f"), nine.as_bytes()).is_err());
        // What memcached 1.6.18 would read its own odd way is refused.
        let long = format!("u:{}\nfoo:bar\n", "p".repeat(253));
        for odd in [&b"foo:bar\rbaz:qux\n"[..], b"f\0o:bar\n", long.as_bytes()] {
            assert!(AuthFile::parse(Path::new("f"), odd).is_err(), "{odd:?}");
        }
        let longest = format!("u:{}\n", "p".repeat(252));
        assert_eq!(longest.len(), ENTRY_BYTES_MAX - 1);
        assert!(file(&longest).check(b"u", "p".repeat(252).as_bytes()));
        // No newline at the end: the last password is read whole, as
        // memcached does since its t/ascii-auth2.t (1.6.18 lost a byte).
        assert!(file("foo:bar").check(b"foo", b"bar"));
    }

    fn replied(input: &[u8]) -> (usize, &'static str, bool) {
        match step(input) {
            Step::Reply {
                consumed,
                reply,
                attempt,
            } => (consumed, reply, attempt.is_some()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn each_answer_before_authentication_is_memcacheds() {
        assert_eq!(
            replied(b"get foo\r\n"),
            (9, "CLIENT_ERROR unauthenticated", false)
        );
        assert_eq!(
            replied(b"set foo 0 0\r\n"),
            (13, "CLIENT_ERROR unauthenticated", false)
        );
        assert_eq!(
            replied(b"set foo 0 0 -1\r\n"),
            (16, "CLIENT_ERROR unauthenticated", false)
        );
        assert_eq!(
            replied(b"set foo 0 0 2\r\nhi\r\n"),
            (19, "CLIENT_ERROR bad authentication token format", false)
        );
        assert_eq!(
            replied(b"set foo 0 0 2\r\nhiX\r\n"),
            (19, "CLIENT_ERROR bad command line termination", false)
        );
        assert_eq!(
            replied(b"set foo 0 0 2147483646\r\n"),
            (24, "CLIENT_ERROR auth token too long", false)
        );
        assert_eq!(
            replied(b"set foo 0 0 7\r\nfoo bar\r\n"),
            (24, "STORED", true)
        );
        // memcached's safe_strtoul and C strings.
        for size in ["+7", "\t7", "7\x0b", "4294967303", "7\0junk"] {
            let input = format!("set foo 0 0 {size}\r\nfoo bar\r\n");
            let (consumed, reply, attempt) = replied(input.as_bytes());
            assert_eq!(
                (consumed, reply, attempt),
                (input.len(), "STORED", true),
                "{size:?}"
            );
        }
        assert_eq!(
            replied(b"set foo 0 0 -0\r\n\r\n"),
            (18, "CLIENT_ERROR bad authentication token format", false)
        );
        assert_eq!(
            replied(b"set foo 0 0 8\r\n\0foo bar\r\n"),
            (25, "CLIENT_ERROR bad authentication token format", false)
        );
        assert_eq!(step(b"set foo 0 0 7\r\nfoo b"), Step::Incomplete);
        assert_eq!(step(b"set foo"), Step::Incomplete);
        assert_eq!(step(b"\n"), Step::Incomplete);
        assert_eq!(replied(b"\r\n"), (2, "CLIENT_ERROR unauthenticated", false));
        assert_eq!(step(&[b'x'; 2049]), Step::Close);
        let Step::Reply {
            attempt: Some((u, ul, p, pl)),
            ..
        } = step(b"set k 0 0 9\r\n foo  bar\r\n")
        else {
            panic!("an attempt");
        };
        let input = b"set k 0 0 9\r\n foo  bar\r\n";
        assert_eq!(&input[u..u + ul], b"foo");
        assert_eq!(&input[p..p + pl], b"bar");
    }
}
