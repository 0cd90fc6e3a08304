//! Reading frames off one connection, with every large frame's bytes held
//! in the node's in-flight budget from its header on.
//!
//! A frame whose header announces at most [`INFLIGHT_FREE_BYTES`] is read
//! as before, into a buffer of a read chunk or two. A larger one first
//! reserves its whole length from the budget; only then is a buffer of
//! exactly that size made and its body read. So a half-received frame
//! never holds memory the budget does not see, and a peer that starts many
//! large frames holds no more than the budget.
//!
//! When the budget has no room the reader stops reading (the peer's writes
//! back up in its socket) and tries again every [`PEER_BUDGET_RETRY_MS`]
//! for up to the wait it was given, then gives up with
//! [`LinkError::OverBudget`] and the connection is dropped. Refusing just
//! the one frame is not possible: its request id is inside the body we
//! cannot take. Dropping is what the caller would see anyway: the wait is
//! its call timeout, and its heartbeat (whose ping is behind the frame)
//! ends the connection after the same time.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::time::Instant;

use super::frame::{self, Decoded, FRAME_HEADER_BYTES};
use super::{LinkError, READ_CHUNK_BYTES, TransportStats};
use crate::budget::{INFLIGHT_FREE_BYTES, InflightBudget, Reservation};
use crate::limits::PEER_BUDGET_RETRY_MS;

/// Where a reader's large frames reserve their bytes, and how long one
/// waits for room.
pub(super) struct FrameBudget {
    /// The node's in-flight budget.
    pub(super) budget: Arc<InflightBudget>,
    /// How long a large frame waits for room before the connection is dropped.
    pub(super) wait: Duration,
}

/// Reads whole frames from `rd`, holding large ones in the budget.
pub(super) struct FrameReader<R> {
    rd: R,
    /// Bytes read and not yet taken as frames; the frame being read
    /// starts at its front.
    buf: BytesMut,
    /// Largest payload accepted (small while the handshake is read).
    pub(super) max: usize,
    /// `None`: frames are bounded by `max` alone (the dialling side, which
    /// reads only answers to its own calls from configured members).
    budget: Option<FrameBudget>,
    /// The frame being read, once its header announced more than
    /// [`INFLIGHT_FREE_BYTES`]: its whole length, reserved.
    held: Option<Reservation>,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// A reader of `rd` whose first bytes (read with the handshake, say)
    /// are already in `buf`.
    pub(super) fn new(rd: R, buf: BytesMut, max: usize, budget: Option<FrameBudget>) -> Self {
        Self {
            rd,
            buf,
            max,
            budget,
            held: None,
        }
    }

    /// Reads until one whole frame is in, takes it out and returns it with
    /// the reservation that held its bytes (`None` for a small frame) and
    /// its size. The caller keeps the reservation while the message's bytes
    /// live on (a request, until its handler is done).
    ///
    /// Cancel-safe: dropped half-way, the next call goes on where it stopped.
    pub(super) async fn next<T: DeserializeOwned>(
        &mut self,
        stats: &TransportStats,
    ) -> Result<(T, Option<Reservation>, usize), LinkError> {
        loop {
            if let Decoded::Frame { msg, consumed } = frame::decode::<T>(&self.buf, self.max)? {
                self.buf.advance(consumed);
                let held = self.held.take();
                if held.is_some() {
                    // Give the frame-sized buffer back with the reservation.
                    let mut small = BytesMut::with_capacity(READ_CHUNK_BYTES.max(self.buf.len()));
                    small.extend_from_slice(&self.buf);
                    self.buf = small;
                }
                return Ok((msg, held, consumed));
            }
            let announced = frame::announced_payload_bytes(&self.buf);
            match (announced, &self.budget) {
                (Some(len), Some(budget)) if len > INFLIGHT_FREE_BYTES => {
                    if self.held.is_none() {
                        let bytes = FRAME_HEADER_BYTES + len;
                        self.held = Some(reserve(budget, bytes, stats).await?);
                        // Exactly the frame: reading it never grows the
                        // buffer past what is held.
                        let mut exact = BytesMut::with_capacity(bytes);
                        exact.extend_from_slice(&self.buf);
                        self.buf = exact;
                    }
                }
                _ => super::reserve_for_frame(&mut self.buf),
            }
            if self.rd.read_buf(&mut self.buf).await? == 0 {
                return Err(LinkError::Closed);
            }
        }
    }
}

/// Reserves `bytes`, waiting up to `budget.wait` for room.
async fn reserve(
    budget: &FrameBudget,
    bytes: usize,
    stats: &TransportStats,
) -> Result<Reservation, LinkError> {
    match wait_for_room(budget.wait, || Reservation::of(&budget.budget, bytes)).await {
        Some(held) => Ok(held),
        None => {
            stats.frames_over_budget.fetch_add(1, Relaxed);
            Err(LinkError::OverBudget {
                bytes,
                waited: budget.wait,
            })
        }
    }
}

/// Tries `take` every [`PEER_BUDGET_RETRY_MS`] until it gives room or
/// `wait` has passed (`None` then).
pub(super) async fn wait_for_room<T>(
    wait: Duration,
    mut take: impl FnMut() -> Option<T>,
) -> Option<T> {
    let deadline = Instant::now() + wait;
    loop {
        if let Some(room) = take() {
            return Some(room);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(PEER_BUDGET_RETRY_MS)).await;
    }
}
