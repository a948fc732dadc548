//! Reads a connection's frames with the memory they hold charged to a relay-wide pool.
//!
//! A frame takes memory while it arrives (this reader's buffer) and, once complete, until it is
//! decoded (the frame's copy of its entries). Beyond a small allowance per connection both are
//! charged to `limits.max_receiving_bytes`, so a thousand connections each sending a 16 MiB frame
//! slowly wait for the pool instead of holding 16 GiB. A reader that cannot get its share within
//! `wait_limit` gives up and the connection is closed: readers that each hold part of the pool and
//! wait for more would otherwise wait on each other for ever. Frames within the allowance (most
//! agent and Fluent Bit chunks are larger, heartbeats and handshakes are not) never wait.
//!
//! A frame, once begun, must arrive whole within `frame_timeout`: otherwise a few peers that send
//! most of a large frame and then trickle (or stop) would hold the pool, and every other large
//! frame would wait, for as long as the idle time-out.

use forward::{DecodeError, Frame, ServerCodec};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::bytes::BytesMut;
use tokio_util::codec::Decoder;

/// Buffer bytes a connection holds without charge: with the default 1,024 connections, 16 MiB
/// in all (stated as fixed overhead in docs/deployment.md).
pub const ALLOWANCE: usize = 16 << 10;
/// The most one read asks for while the codec does not know a frame's size yet.
const READ_CHUNK: usize = 16 << 10;

/// The relay-wide pool of bytes for frames being received or waiting to be decoded.
#[derive(Clone)]
pub struct ReceivePool {
    permits: Arc<Semaphore>,
    size: usize,
}

impl ReceivePool {
    pub fn new(size: usize) -> Self {
        ReceivePool { permits: Arc::new(Semaphore::new(size)), size }
    }
}

/// Bytes of the pool one connection holds; given back (and the gauge lowered) when dropped.
#[derive(Default)]
pub struct Charge(Option<OwnedSemaphorePermit>);

impl Charge {
    pub fn bytes(&self) -> usize {
        self.0.as_ref().map_or(0, |p| p.num_permits())
    }

    /// Moves up to `bytes` of this charge into a new one.
    fn split(&mut self, bytes: usize) -> Charge {
        let bytes = bytes.min(self.bytes());
        match &mut self.0 {
            Some(held) if bytes > 0 => Charge(held.split(bytes)),
            _ => Charge(None),
        }
    }

    fn add(&mut self, more: OwnedSemaphorePermit) {
        metrics::gauge!("tron_relay_receiving_bytes").increment(more.num_permits() as f64);
        match &mut self.0 {
            Some(held) => held.merge(more),
            None => self.0 = Some(more),
        }
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        let bytes = self.bytes();
        if bytes > 0 {
            metrics::gauge!("tron_relay_receiving_bytes").decrement(bytes as f64);
        }
    }
}

/// A complete frame and the pool bytes that cover it until it has been decoded.
pub struct Received {
    pub frame: Frame,
    pub charge: Charge,
}

#[derive(Debug)]
pub enum Closed {
    Decode(DecodeError),
    /// The pool stayed too full for this connection's frame for `wait_limit`.
    Starved,
    /// A frame began and did not arrive whole within `frame_timeout`.
    SlowFrame,
}

impl From<DecodeError> for Closed {
    fn from(e: DecodeError) -> Self {
        Closed::Decode(e)
    }
}

impl From<std::io::Error> for Closed {
    fn from(e: std::io::Error) -> Self {
        Closed::Decode(DecodeError::Io(e))
    }
}

pub struct FrameReader<R> {
    io: R,
    buf: BytesMut,
    codec: ServerCodec,
    pool: ReceivePool,
    /// Covers `buf.capacity()` beyond [`ALLOWANCE`].
    charge: Charge,
    wait_limit: Duration,
    frame_timeout: Duration,
    /// When the first byte of the frame in `buf` arrived.
    frame_began: Option<tokio::time::Instant>,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(io: R, codec: ServerCodec, pool: ReceivePool, wait_limit: Duration, frame_timeout: Duration) -> Self {
        FrameReader {
            io,
            buf: BytesMut::with_capacity(ALLOWANCE),
            codec,
            pool,
            charge: Charge::default(),
            wait_limit,
            frame_timeout,
            frame_began: None,
        }
    }

    pub fn codec_mut(&mut self) -> &mut ServerCodec {
        &mut self.codec
    }

    /// The next frame; `Ok(None)` when the peer closed between frames. Cancel-safe: every await
    /// either completes its step or leaves the state as it was.
    pub async fn next(&mut self) -> Result<Option<Received>, Closed> {
        loop {
            if let Some(frame) = self.codec.decode(&mut self.buf)? {
                return Ok(Some(self.hand_over(frame)));
            }
            // Read what the codec says the frame needs, and a quarter of what is held (the codec
            // rescans a frame from its start, so growth must be geometric); at least what fills
            // the allowance (no charge), or a chunk once past it. A read may go past the frame's
            // end by that much; `hand_over` keeps it charged.
            let held = self.buf.len();
            let at_least = if held < ALLOWANCE { ALLOWANCE - held } else { READ_CHUNK };
            let want = self.codec.need().saturating_sub(held).max(at_least).max(held / 4);
            if self.buf.capacity() - held < want {
                self.grow(held + want).await?;
            }
            let mut limited = (&mut self.io).take(want as u64);
            let read = limited.read_buf(&mut self.buf);
            let n = match self.frame_began {
                Some(began) => {
                    tokio::time::timeout_at(began + self.frame_timeout, read).await.map_err(|_| Closed::SlowFrame)??
                }
                None => read.await?,
            };
            if n > 0 && self.frame_began.is_none() {
                self.frame_began = Some(tokio::time::Instant::now());
            }
            if n == 0 {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                return Err(
                    std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "closed in the middle of a frame").into()
                );
            }
        }
    }

    /// Makes the buffer hold at least `needed` bytes, charging the pool first.
    async fn grow(&mut self, needed: usize) -> Result<(), Closed> {
        // Within the allowance a fresh buffer of the allowance: taking frames off the front
        // (`split_to`) shrinks the capacity left, and growing that by half would charge a small
        // frame to the pool, where it could wait behind large frames until its connection is
        // closed as starved.
        let capacity =
            if needed <= ALLOWANCE { ALLOWANCE } else { needed.max(self.buf.capacity() + self.buf.capacity() / 2) };
        let owed = charged_part(capacity).min(self.pool.size).saturating_sub(self.charge.bytes());
        if owed > 0 {
            let more = self.pool.permits.clone().acquire_many_owned(owed as u32);
            let more = tokio::time::timeout(self.wait_limit, more).await.map_err(|_| Closed::Starved)?;
            self.charge.add(more.expect("the receive pool is never closed"));
        }
        let mut bigger = BytesMut::with_capacity(capacity);
        bigger.extend_from_slice(&self.buf);
        self.buf = bigger;
        Ok(())
    }

    /// The frame leaves with the buffer's charge (its entries were copied out of the buffer and
    /// are held until decoded), less what the bytes read past its end still need; the buffer
    /// shrinks back to the allowance, or to those bytes.
    fn hand_over(&mut self, frame: Frame) -> Received {
        let mut charge = std::mem::take(&mut self.charge);
        if self.buf.capacity() > ALLOWANCE.max(self.buf.len()) {
            let mut small = BytesMut::with_capacity(ALLOWANCE.max(self.buf.len()));
            small.extend_from_slice(&self.buf);
            self.buf = small;
        }
        self.charge = charge.split(charged_part(self.buf.capacity()));
        self.frame_began = (!self.buf.is_empty()).then(tokio::time::Instant::now);
        Received { frame, charge }
    }
}

/// What of a buffer's capacity the pool is charged for.
fn charged_part(capacity: usize) -> usize {
    capacity.saturating_sub(ALLOWANCE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use forward::{ChunkBuilder, EventTime, Limits};
    use tokio::io::AsyncWriteExt;

    /// An uncompressed PackedForward frame of about `bytes` bytes.
    fn frame_of(bytes: usize, id: &str) -> Vec<u8> {
        let mut chunk = ChunkBuilder::uncompressed();
        let record = serde_json::json!({ "pad": "p".repeat(1000) });
        for i in 0..bytes / 1000 {
            chunk.push_at(i as u64, EventTime::new(1_795_300_000, 0), record.as_object().unwrap());
        }
        chunk.finish("t", id)
    }

    fn reader(io: tokio::io::DuplexStream, pool: &ReceivePool) -> FrameReader<tokio::io::DuplexStream> {
        FrameReader::new(
            io,
            ServerCodec::new(Limits::default()),
            pool.clone(),
            Duration::from_secs(1),
            Duration::from_secs(60),
        )
    }

    fn free(pool: &ReceivePool) -> usize {
        pool.permits.available_permits()
    }

    #[tokio::test]
    async fn a_large_frame_is_charged_while_it_arrives_and_until_it_is_dropped() {
        let pool = ReceivePool::new(8 << 20);
        let (mut client, server) = tokio::io::duplex(64 << 10);
        let mut frames = reader(server, &pool);
        let frame = frame_of(2 << 20, "big");
        let writer = tokio::spawn(async move {
            client.write_all(&frame).await.unwrap();
            client.write_all(&frame_of(100, "small")).await.unwrap();
            client
        });
        let big = frames.next().await.unwrap().unwrap();
        assert!(matches!(big.frame, Frame::Events(_)));
        let charged = big.charge.bytes();
        assert!(charged >= (2 << 20) - ALLOWANCE, "charged {charged}");
        assert_eq!(free(&pool) + charged + frames.charge.bytes(), 8 << 20);
        drop(big);
        let small = frames.next().await.unwrap().unwrap();
        assert_eq!(small.charge.bytes(), 0, "a frame within the allowance is not charged");
        drop(small);
        assert_eq!(free(&pool), 8 << 20, "everything given back");
        assert!(frames.buf.capacity() <= ALLOWANCE, "the buffer shrinks back: {}", frames.buf.capacity());
        drop(writer.await.unwrap());
        assert!(frames.next().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn small_frames_one_after_another_never_wait_for_the_pool() {
        // A pool held whole by others (slow senders of large frames): any charge would wait
        // `wait_limit` and close the connection, as it once did for a well-behaved client.
        let pool = ReceivePool::new(8 << 20);
        let _held_by_others = pool.permits.clone().acquire_many_owned(8 << 20).await.unwrap();
        let (mut client, server) = tokio::io::duplex(64 << 10);
        let mut frames = reader(server, &pool);
        let writer = tokio::spawn(async move {
            for n in 0..500 {
                client.write_all(&frame_of(100 + n % 7 * 300, &format!("c{n}"))).await.unwrap();
                // one frame at a time, as a client waiting for each ack sends them
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            client
        });
        for n in 0..500 {
            let small = frames.next().await.unwrap_or_else(|e| panic!("frame {n}: {e:?}")).unwrap();
            assert_eq!(small.charge.bytes(), 0);
        }
        drop(writer.await.unwrap());
        assert!(frames.next().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn readers_that_cannot_get_room_give_up_instead_of_waiting_for_each_other() {
        let pool = ReceivePool::new(3 << 20);
        let frame = frame_of(2 << 20, "x");
        let mut clients = Vec::new();
        let mut readers = Vec::new();
        for _ in 0..2 {
            let (mut client, server) = tokio::io::duplex(64 << 10);
            let head = frame[..frame.len() - 10].to_vec();
            clients.push(tokio::spawn(async move {
                let _ = client.write_all(&head).await;
                tokio::time::sleep(Duration::from_secs(60)).await;
            }));
            readers.push(reader(server, &pool));
        }
        let mut outcomes = Vec::new();
        let (a, b) = readers.split_at_mut(1);
        let (ra, rb) = tokio::join!(
            tokio::time::timeout(Duration::from_secs(3), a[0].next()),
            tokio::time::timeout(Duration::from_secs(3), b[0].next())
        );
        outcomes.push(ra);
        outcomes.push(rb);
        let starved = outcomes.iter().filter(|o| matches!(o, Ok(Err(Closed::Starved)))).count();
        assert!(starved >= 1, "one reader must give up within wait_limit");
        let held: usize = readers.iter().map(|r| r.charge.bytes()).sum();
        assert!(held + free(&pool) == 3 << 20 && held <= 3 << 20);
        for c in clients {
            c.abort();
        }
    }

    #[tokio::test]
    async fn a_frame_that_trickles_past_frame_timeout_closes_the_connection() {
        let pool = ReceivePool::new(8 << 20);
        let (mut client, server) = tokio::io::duplex(64 << 10);
        let limits = Limits::default();
        let mut frames =
            FrameReader::new(server, ServerCodec::new(limits), pool, Duration::from_secs(1), Duration::from_secs(1));
        let frame = frame_of(100_000, "slow");
        let trickle = tokio::spawn(async move {
            for byte in frame.chunks(1000) {
                if client.write_all(byte).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        let outcome = tokio::time::timeout(Duration::from_secs(5), frames.next()).await.expect("closed in time");
        assert!(matches!(outcome, Err(Closed::SlowFrame)));
        trickle.abort();
    }
}
