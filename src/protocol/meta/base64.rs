//! Base64 keys (`b` flag), decoded as memcached does: bytes outside the
//! alphabet are skipped, the remaining count must be a non-zero multiple of
//! four, and decoding stops at the first group with padding (one or two `=`;
//! three or more is an error). Encoding is standard base64 with padding.
//!
//! The `base64` crate's decoders are strict by design; memcached's leniency is
//! part of the protocol, so decoding is written out here.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

fn sextet(b: u8) -> Option<u8> {
    match b {
        b'A'..=b'Z' => Some(b - b'A'),
        b'a'..=b'z' => Some(b - b'a' + 26),
        b'0'..=b'9' => Some(b - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    }
}

/// Decodes a key; `None` when memcached's decoder would fail.
pub fn decode(input: &[u8]) -> Option<Vec<u8>> {
    let valid: Vec<u8> = input
        .iter()
        .copied()
        .filter(|&b| b == b'=' || sextet(b).is_some())
        .collect();
    if valid.is_empty() || valid.len() % 4 != 0 {
        return None;
    }
    let mut out = Vec::with_capacity(valid.len() / 4 * 3);
    for group in valid.chunks_exact(4) {
        let pads = group.iter().filter(|&&b| b == b'=').count();
        let mut acc: u32 = 0;
        for &b in group {
            acc = (acc << 6) | u32::from(sextet(b).unwrap_or(0));
        }
        let bytes = [(acc >> 16) as u8, (acc >> 8) as u8, acc as u8];
        match pads {
            0 => out.extend_from_slice(&bytes),
            1 => {
                out.extend_from_slice(&bytes[..2]);
                break;
            }
            2 => {
                out.push(bytes[0]);
                break;
            }
            _ => return None,
        }
    }
    if out.is_empty() { None } else { Some(out) }
}

/// Standard base64 with padding, as `b` keys are echoed.
pub fn encode(key: &[u8]) -> String {
    STANDARD.encode(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memcached_leniency() {
        assert_eq!(decode(b"Zm9v").as_deref(), Some(&b"foo"[..]));
        assert_eq!(decode(b"Zm9v-_").as_deref(), Some(&b"foo"[..]));
        assert_eq!(decode(b"Zm9vYg==").as_deref(), Some(&b"foob"[..]));
        assert_eq!(decode(b"AA==").as_deref(), Some(&[0u8][..]));
        assert_eq!(
            decode(b"Zm9v+/==").map(|k| encode(&k)),
            Some("Zm9v+w==".to_string())
        );
        for bad in [
            &b"Zm9vYg"[..],
            b"Zm9vYg=",
            b"A===",
            b"====",
            b"Zm9!YmE=",
            b"foo",
            b"",
        ] {
            assert_eq!(decode(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }
}
