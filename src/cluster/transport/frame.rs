//! The frame codec between nodes: sans-IO, bytes in, messages out.
//!
//! ```text
//! +----------------------+----------------------+---------------------+
//! | payload length (u32) | crc32 of payload     | payload (postcard)  |
//! |  big-endian          |  (u32, big-endian)   |  `length` bytes     |
//! +----------------------+----------------------+---------------------+
//! ```
//!
//! [`decode`] takes whatever has arrived so far and returns one message and how
//! many bytes it used, or [`Decoded::Incomplete`], which is a normal outcome:
//! read more and call again. A length above the limit is rejected from the
//! header alone, so a peer cannot make us buffer a payload we would refuse.
//! The checksum guards against a bug or a middlebox mangling bytes, not
//! against an attacker: the cluster network is trusted.

use serde::Serialize;
use serde::de::DeserializeOwned;
use thiserror::Error;

/// Length field plus checksum field.
pub const FRAME_HEADER_BYTES: usize = 8;

/// The length field is a `u32`, so no limit can go beyond it.
pub const FRAME_PAYLOAD_BYTES_LIMIT: usize = u32::MAX as usize;

/// The outcome of [`decode`] on a buffer without errors.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded<T> {
    /// One message, taken from the first `consumed` bytes of the buffer.
    Frame {
        /// The decoded message.
        msg: T,
        /// Bytes of the buffer the frame took, header included.
        consumed: usize,
    },
    /// The buffer holds less than one whole frame: read more.
    Incomplete,
}

/// Why a frame could not be encoded or decoded. Every decode error leaves
/// the stream at an unknown position, so the connection must be dropped.
#[derive(Error, Debug)]
pub enum FrameError {
    /// The payload is longer than `max` bytes (the `frame_bytes_max` limit).
    #[error("frame payload of {len} bytes exceeds the limit of {max} bytes")]
    Oversized {
        /// The payload's length in bytes.
        len: usize,
        /// The limit it exceeds, in bytes.
        max: usize,
    },
    /// The payload does not match its crc32.
    #[error("frame checksum mismatch")]
    Checksum,
    /// The payload passed its checksum but is not a valid message.
    #[error("cannot decode frame payload: {0}")]
    Decode(String),
    /// The message cannot be serialised.
    #[error("cannot encode frame payload: {0}")]
    Encode(String),
}

/// Appends one frame holding `msg` to `out`. On error `out` is left as it was.
///
/// `frame_bytes_max` bounds the payload (the header's length field).
///
/// # Errors
/// [`FrameError::Encode`] if serde refuses the message, [`FrameError::Oversized`]
/// if its payload is longer than `frame_bytes_max`.
pub fn encode<T: Serialize>(
    msg: &T,
    out: &mut Vec<u8>,
    frame_bytes_max: usize,
) -> Result<(), FrameError> {
    let start = out.len();
    out.extend_from_slice(&[0; FRAME_HEADER_BYTES]);
    if let Err(e) = postcard::to_io(msg, &mut *out) {
        out.truncate(start);
        return Err(FrameError::Encode(e.to_string()));
    }
    let payload_start = start + FRAME_HEADER_BYTES;
    let len = out.len() - payload_start;
    let max = frame_bytes_max.min(FRAME_PAYLOAD_BYTES_LIMIT);
    if len > max {
        out.truncate(start);
        return Err(FrameError::Oversized { len, max });
    }
    let crc = crc32fast::hash(&out[payload_start..]);
    let len = u32::try_from(len).expect("payload length was checked against u32::MAX");
    out[start..start + 4].copy_from_slice(&len.to_be_bytes());
    out[start + 4..payload_start].copy_from_slice(&crc.to_be_bytes());
    Ok(())
}

/// Decodes the first frame in `buf`, if it has arrived whole.
///
/// # Errors
/// [`FrameError::Oversized`] as soon as the header announces a payload longer
/// than `frame_bytes_max`; [`FrameError::Checksum`] and [`FrameError::Decode`]
/// once the whole payload is there and is corrupt. A payload with bytes left
/// over after the message is corrupt too.
pub fn decode<T: DeserializeOwned>(
    buf: &[u8],
    frame_bytes_max: usize,
) -> Result<Decoded<T>, FrameError> {
    // The length is checked as soon as it is there, before the rest of
    // the header: nothing may act on an announced length past the bound.
    let Some(len) = announced_payload_bytes(buf) else {
        return Ok(Decoded::Incomplete);
    };
    if len > frame_bytes_max {
        return Err(FrameError::Oversized {
            len,
            max: frame_bytes_max,
        });
    }
    let Some(header) = buf.get(..FRAME_HEADER_BYTES) else {
        return Ok(Decoded::Incomplete);
    };
    let crc = u32::from_be_bytes(header[4..].try_into().expect("4 bytes"));
    let consumed = FRAME_HEADER_BYTES + len;
    let Some(payload) = buf.get(FRAME_HEADER_BYTES..consumed) else {
        return Ok(Decoded::Incomplete);
    };
    if crc32fast::hash(payload) != crc {
        return Err(FrameError::Checksum);
    }
    match postcard::take_from_bytes::<T>(payload) {
        Ok((msg, [])) => Ok(Decoded::Frame { msg, consumed }),
        Ok((_, rest)) => Err(FrameError::Decode(format!(
            "{} bytes left over after the message",
            rest.len()
        ))),
        Err(e) => Err(FrameError::Decode(e.to_string())),
    }
}

/// The payload length a buffer's header announces, once the header is there.
/// Lets a reader reserve room for the whole frame in one go.
pub fn announced_payload_bytes(buf: &[u8]) -> Option<usize> {
    let header = buf.get(..4)?;
    Some(u32::from_be_bytes(header.try_into().expect("4 bytes")) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde::Deserialize;

    const MAX: usize = 64 * 1024;

    #[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
    enum Msg {
        Put {
            id: u64,
            key: Vec<u8>,
            value: Vec<u8>,
        },
        Note(String),
        Nothing,
    }

    fn msg_strategy() -> impl Strategy<Value = Msg> {
        prop_oneof![
            (
                any::<u64>(),
                proptest::collection::vec(any::<u8>(), 0..64),
                proptest::collection::vec(any::<u8>(), 0..512),
            )
                .prop_map(|(id, key, value)| Msg::Put { id, key, value }),
            ".{0,40}".prop_map(Msg::Note),
            Just(Msg::Nothing),
        ]
    }

    fn framed(msg: &Msg) -> Vec<u8> {
        let mut out = Vec::new();
        encode(msg, &mut out, MAX).unwrap();
        out
    }

    #[test]
    fn round_trip_and_back_to_back_frames() {
        let a = Msg::Put {
            id: 7,
            key: b"user:1".to_vec(),
            value: b"alice".to_vec(),
        };
        let b = Msg::Note("hello".into());
        let mut buf = framed(&a);
        encode(&b, &mut buf, MAX).unwrap();

        let Decoded::Frame { msg, consumed } = decode::<Msg>(&buf, MAX).unwrap() else {
            panic!("first frame incomplete");
        };
        assert_eq!(msg, a);
        let rest = &buf[consumed..];
        assert_eq!(
            decode::<Msg>(rest, MAX).unwrap(),
            Decoded::Frame {
                msg: b,
                consumed: rest.len()
            }
        );
    }

    #[test]
    fn one_flipped_payload_bit_is_a_checksum_error() {
        let mut buf = framed(&Msg::Note("checksummed".into()));
        let last = buf.len() - 1;
        buf[last] ^= 0x10;
        assert!(matches!(
            decode::<Msg>(&buf, MAX),
            Err(FrameError::Checksum)
        ));
    }

    #[test]
    fn oversized_header_is_rejected_before_the_payload_arrives() {
        let mut header = Vec::new();
        header.extend_from_slice(&((MAX + 1) as u32).to_be_bytes());
        header.extend_from_slice(&0u32.to_be_bytes());
        assert!(matches!(
            decode::<Msg>(&header, MAX),
            Err(FrameError::Oversized { len, max: MAX }) if len == MAX + 1
        ));
    }

    #[test]
    fn encode_refuses_a_payload_over_the_limit_and_leaves_out_untouched() {
        let big = Msg::Put {
            id: 1,
            key: vec![],
            value: vec![0; 100],
        };
        let mut out = vec![1, 2, 3];
        assert!(matches!(
            encode(&big, &mut out, 50),
            Err(FrameError::Oversized { max: 50, .. })
        ));
        assert_eq!(out, [1, 2, 3]);
    }

    #[test]
    fn trailing_bytes_in_a_payload_are_corrupt() {
        // A valid `Nothing` payload followed by one stray byte, with a
        // correct checksum over both.
        let mut payload = postcard::to_stdvec(&Msg::Nothing).unwrap();
        payload.push(0);
        let mut buf = Vec::new();
        buf.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        buf.extend_from_slice(&crc32fast::hash(&payload).to_be_bytes());
        buf.extend_from_slice(&payload);
        assert!(matches!(
            decode::<Msg>(&buf, MAX),
            Err(FrameError::Decode(_))
        ));
    }

    proptest! {
        #[test]
        fn every_message_round_trips(msg in msg_strategy()) {
            let buf = framed(&msg);
            prop_assert_eq!(
                decode::<Msg>(&buf, MAX).unwrap(),
                Decoded::Frame { msg, consumed: buf.len() }
            );
        }

        #[test]
        fn every_strict_prefix_is_incomplete(msg in msg_strategy()) {
            let buf = framed(&msg);
            for end in 0..buf.len() {
                prop_assert_eq!(decode::<Msg>(&buf[..end], MAX).unwrap(), Decoded::Incomplete);
            }
        }

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = decode::<Msg>(&bytes, MAX);
        }

        #[test]
        fn random_payloads_with_a_valid_checksum_never_panic(
            payload in proptest::collection::vec(any::<u8>(), 0..512)
        ) {
            // Past the checksum, so the message decoder itself meets the garbage.
            let mut buf = Vec::new();
            buf.extend_from_slice(&(payload.len() as u32).to_be_bytes());
            buf.extend_from_slice(&crc32fast::hash(&payload).to_be_bytes());
            buf.extend_from_slice(&payload);
            if let Ok(Decoded::Frame { consumed, .. }) = decode::<Msg>(&buf, MAX) {
                prop_assert_eq!(consumed, buf.len());
            }
        }
    }
}
