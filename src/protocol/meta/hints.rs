//! webvac's extensions to the meta protocol, carried in the `P` token.
//!
//! memcached ignores `P` and `L` tokens ("hints or path specifications to a
//! proxy"), so a command with our hints still runs on a plain memcached.
//! Meta flags may not repeat, so one `P` token carries every hint, comma
//! separated: `P` followed by items such as `r2` (read quorum 2) and `w3`
//! (write quorum 3). `mg foo v Pr1` reads from one replica; `ms foo 2 Pw3`
//! waits for three. Items we do not know are ignored, as memcached ignores
//! the whole token; a known item with a bad value is a client error.
//!
//! `i<id>` is a request id (1 to 32 printable ASCII bytes, no comma): a
//! mutation (`ms`, `md`, `ma`) that carries one is applied at most once
//! within the dedup window, and a retry with the same id answers what the
//! first attempt answered. `ma cnt v Pi7f3a2c,w2` is a retry-safe incr.

/// Per-request consistency (R and W) and the request id, where given.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Hints<'a> {
    /// `r<n>`: replicas a read must hear from (`None`: the cluster's R).
    pub read_quorum: Option<u8>,
    /// `w<n>`: replicas a write must reach (`None`: the cluster's W).
    pub write_quorum: Option<u8>,
    /// `i<id>`: the mutation's request id, 1 to 32 printable bytes.
    pub request_id: Option<&'a [u8]>,
}

/// An `r` or `w` item that is not a number from 1 to 255.
pub const BAD_QUORUM: &str = "CLIENT_ERROR bad quorum in P token";
/// An `i` item that is not a valid request id.
pub const BAD_REQUEST_ID: &str = "CLIENT_ERROR bad request id in P token";

/// The hints in a meta command's flag tokens.
///
/// # Errors
/// [`BAD_QUORUM`] for an `r` or `w` item that is not a number from 1 to
/// 255; [`BAD_REQUEST_ID`] for an `i` item that is not a valid id.
pub fn parse<'a>(tokens: &[&'a [u8]]) -> Result<Hints<'a>, &'static str> {
    let mut hints = Hints::default();
    let Some(p) = tokens.iter().find(|t| t[0] == b'P') else {
        return Ok(hints);
    };
    for item in p[1..].split(|&b| b == b',').filter(|i| !i.is_empty()) {
        if item[0] == b'i' {
            let id = &item[1..];
            if !crate::store::dedup::valid_id(id) {
                return Err(BAD_REQUEST_ID);
            }
            hints.request_id = Some(id);
            continue;
        }
        let slot = match item[0] {
            b'r' => &mut hints.read_quorum,
            b'w' => &mut hints.write_quorum,
            _ => continue,
        };
        let n = std::str::from_utf8(&item[1..])
            .ok()
            .and_then(|s| s.parse::<u8>().ok())
            .filter(|&n| n > 0)
            .ok_or(BAD_QUORUM)?;
        *slot = Some(n);
    }
    Ok(hints)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_r_and_w_and_ignores_the_rest() {
        let h = parse(&[b"v", b"Pr2,w3,xyz", b"T10"]).unwrap();
        assert_eq!((h.read_quorum, h.write_quorum), (Some(2), Some(3)));
        assert_eq!(parse(&[b"Pfoo/bar"]).unwrap(), Hints::default());
        assert_eq!(parse(&[b"v"]).unwrap(), Hints::default());
    }

    #[test]
    fn reads_the_request_id() {
        let h = parse(&[b"v", b"Pw2,iabc-123"]).unwrap();
        assert_eq!(h.request_id, Some(&b"abc-123"[..]));
        assert_eq!(h.write_quorum, Some(2));
        let longest = [b"Pi".as_slice(), &[b'x'; 32]].concat();
        assert_eq!(
            parse(&[&longest]).unwrap().request_id,
            Some(&[b'x'; 32][..])
        );
        let too_long = [b"Pi".as_slice(), &[b'x'; 33]].concat();
        for bad in [&b"Pi"[..], &too_long, b"Pi\xff"] {
            assert_eq!(parse(&[bad]), Err(BAD_REQUEST_ID));
        }
    }

    #[test]
    fn bad_numbers_are_client_errors() {
        for bad in [&b"Pr0"[..], b"Pw", b"Pr-1", b"Pw256", b"Pr2x"] {
            assert_eq!(
                parse(&[bad]),
                Err(BAD_QUORUM),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
