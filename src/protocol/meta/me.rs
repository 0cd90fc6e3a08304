//! `me <key> [b]`: meta debug. Replies
//! `ME <key> exp=<E> la=<LA> cas=<CAS> fetch=<yes|no> cls=<C> size=<S>` or `EN`.

use std::borrow::Cow;

use super::super::tokens::Tokens;
use super::super::{Request, reply};
use super::{MetaRequest, base64};
use crate::limits::KEY_BYTES_MAX;

/// A parsed `me`.
#[derive(Debug)]
pub struct MetaDebug<'a> {
    /// The key, base64-decoded when followed by `b`.
    pub key: Cow<'a, [u8]>,
}

/// Parses `me` from its line's tokens.
pub fn parse<'a>(tokens: &Tokens<'a>) -> Request<'a> {
    if tokens.len() < 2 || tokens.get(1).len() > KEY_BYTES_MAX {
        return Request::error(reply::BAD_FORMAT);
    }
    let raw = tokens.get(1);
    let key = if tokens.get(2) == b"b" {
        match base64::decode(raw) {
            Some(k) => Cow::Owned(k),
            None => return Request::error(reply::BAD_FORMAT),
        }
    } else {
        Cow::Borrowed(raw)
    };
    Request::Meta(MetaRequest::Debug(MetaDebug { key }))
}

/// memcached's default slab class chunk sizes (growth factor 1.25): `me`
/// reports the class an item of a given total size would occupy.
const SLAB_CLASSES: [u32; 39] = [
    96, 120, 152, 192, 240, 304, 384, 480, 600, 752, 944, 1184, 1480, 1856, 2320, 2904, 3632, 4544,
    5680, 7104, 8880, 11104, 13880, 17352, 21696, 27120, 33904, 42384, 52984, 66232, 82792, 103496,
    129376, 161720, 202152, 252696, 315872, 394840, 524288,
];

/// memcached's `ITEM_ntotal` for an item: what `me` calls `size`.
pub fn memcached_item_size(key_len: usize, value_len: usize, flags: u32) -> usize {
    48 + 8 + key_len + 1 + value_len + 2 + if flags == 0 { 0 } else { 4 }
}

/// The slab class memcached would use for an item of `size` bytes.
pub fn memcached_class(size: usize) -> usize {
    SLAB_CLASSES
        .iter()
        .position(|&c| size <= c as usize)
        .map_or(SLAB_CLASSES.len(), |i| i + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_match_memcached() {
        assert_eq!(memcached_item_size(3, 3, 0), 65);
        assert_eq!(memcached_item_size(250, 1, 0), 310);
        assert_eq!(memcached_class(65), 1);
        assert_eq!(memcached_class(97), 2);
        assert_eq!(memcached_class(1_000_000), 39);
    }
}
