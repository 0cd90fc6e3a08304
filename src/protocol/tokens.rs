//! memcached's command tokenizer: split on single spaces (only spaces; tabs
//! belong to tokens), skip empty tokens, stop after [`TOKENS_MAX`]` - 1`.

use crate::limits::TOKENS_MAX;

/// The tokens of one command line.
pub struct Tokens<'a> {
    tokens: [&'a [u8]; TOKENS_MAX],
    len: usize,
    /// Bytes after the last token when the line had more tokens than fit.
    pub rest: Option<&'a [u8]>,
}

impl<'a> Tokens<'a> {
    /// Splits `line` (without its CRLF).
    pub fn new(line: &'a [u8]) -> Self {
        let mut tokens: [&'a [u8]; TOKENS_MAX] = [&[]; TOKENS_MAX];
        let mut len = 0;
        let mut rest = None;
        let mut start = 0;
        for (i, &b) in line.iter().enumerate() {
            if b == b' ' {
                if start != i {
                    tokens[len] = &line[start..i];
                    len += 1;
                    if len == TOKENS_MAX - 1 {
                        let tail = &line[i + 1..];
                        rest = (!tail.is_empty()).then_some(tail);
                        return Self { tokens, len, rest };
                    }
                }
                start = i + 1;
            }
        }
        if start < line.len() {
            tokens[len] = &line[start..];
            len += 1;
        }
        Self { tokens, len, rest }
    }

    /// memcached's `ntokens`: the tokens plus the terminal empty token.
    pub fn ntokens(&self) -> usize {
        self.len + 1
    }

    /// Number of tokens (without the terminal one).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the line held no token.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Token `i`, or an empty slice past the last one.
    pub fn get(&self, i: usize) -> &'a [u8] {
        if i < self.len { self.tokens[i] } else { &[] }
    }

    /// All tokens, in order.
    pub fn as_slice(&self) -> &[&'a [u8]] {
        &self.tokens[..self.len]
    }

    /// memcached's `set_noreply_maybe`: the last token is exactly "noreply".
    pub fn noreply(&self) -> bool {
        self.len > 0 && self.tokens[self.len - 1] == b"noreply"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_on_spaces_only() {
        let t = Tokens::new(b"  set  a\tb 0 ");
        assert_eq!(t.as_slice(), &[&b"set"[..], b"a\tb", b"0"]);
        assert_eq!(t.ntokens(), 4);
        assert!(t.rest.is_none());
    }

    #[test]
    fn caps_token_count_and_keeps_the_rest() {
        let line: Vec<u8> = (0..30)
            .map(|i| format!("k{i} "))
            .collect::<String>()
            .into_bytes();
        let t = Tokens::new(&line);
        assert_eq!(t.len(), TOKENS_MAX - 1);
        assert!(t.rest.unwrap().starts_with(b"k23"));
    }
}
