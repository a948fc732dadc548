//! One client connection: optional shared-key handshake, then frames → Kafka → acks.
//!
//! Every decoded chunk takes its decoded size from a relay-wide byte budget before it is handed
//! to Kafka and gives it back when Kafka has answered. While the budget is spent this loop does
//! not read the socket, so overload becomes TCP backpressure instead of memory growth.

use crate::dead_letter::DeadLetter;
use crate::kafka::{Deliver, Kafka, Line, Turn};
use crate::peer_names::ReportHosts;
use crate::receive::{Closed, FrameReader, ReceivePool, Received};
use crate::route::Router;
use crate::slots::Slot;
use crate::watermarks::{Watermarks, WATERMARK_TAG};
use forward::handshake::{Helo, Pong};
use forward::{Frame, Limits, Records, ServerCodec};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, Notify, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tron_service::Shutdown;

/// What every connection shares. `K`: Kafka, or an in-memory stand-in in unit tests.
pub struct Context<K = Kafka> {
    pub kafka: K,
    pub watermarks: Watermarks,
    pub dead_letter: DeadLetter,
    pub router: Router,
    pub limits: Limits,
    pub budget: Arc<Semaphore>,
    /// Frames being received or waiting to be decoded (`receive.rs`).
    pub receive_pool: ReceivePool,
    /// Chunks being inflated and transcoded at once (see `serve`).
    pub decode_slots: Semaphore,
    pub max_inflight_bytes: usize,
    pub max_inflight_bytes_per_connection: usize,
    pub handshake_timeout: Duration,
    pub frame_timeout: Duration,
    pub idle_timeout: Duration,
    pub security: Option<Security>,
    /// `tls.reports_only_for_certificate_names`.
    pub reports_only_for_certificate_names: bool,
}

pub struct Security {
    pub hostname: String,
    pub shared_key: String,
    pub users: Vec<(String, String)>,
    /// `security.reports_only_for_usernames`.
    pub reports_only_for_usernames: bool,
}

pub async fn serve<S, K>(
    stream: S,
    peer: SocketAddr,
    ctx: Arc<Context<K>>,
    slot: &Slot,
    shutdown: Shutdown,
    report_hosts: ReportHosts,
) where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    K: Deliver,
{
    let codec = match ctx.security {
        Some(_) => ServerCodec::awaiting_ping(ctx.limits),
        None => ServerCodec::new(ctx.limits),
    };
    let (read_half, mut write_half) = tokio::io::split(stream);
    let mut frames =
        FrameReader::new(read_half, codec, ctx.receive_pool.clone(), ctx.handshake_timeout, ctx.frame_timeout);
    let mut report_hosts = report_hosts;
    if let Some(security) = &ctx.security {
        let outcome = tokio::select! {
            outcome = handshake(&mut frames, &mut write_half, security, ctx.handshake_timeout) => outcome,
            _ = slot.evicted.cancelled() => Err(("evicted_silent", "closed for a newer connection before its handshake".into())),
        };
        let username = match outcome {
            Ok(username) => username,
            Err((label, reason)) => {
                if label != "evicted_silent" {
                    // (an eviction is counted where it is decided, in `tron_relay_connections_closed_total`)
                    tracing::warn!(%peer, %reason, "handshake refused");
                    metrics::counter!("tron_relay_connections_refused_total", "reason" => label).increment(1);
                }
                return;
            }
        };
        if security.reports_only_for_usernames {
            report_hosts = report_hosts.only(&username);
        }
        frames.codec_mut().authenticated();
        slot.prove();
    }
    // Bounded: a client that never reads its acks fills this, then the deliveries waiting to queue
    // theirs keep their budget, and the connection stops being read at its per-connection cap.
    let (ack_tx, mut ack_rx) = mpsc::channel::<Vec<u8>>(ACKS_QUEUED);
    let writer = tokio::spawn(async move {
        while let Some(ack) = ack_rx.recv().await {
            if write_half.write_all(&ack).await.is_err() {
                break;
            }
        }
        let _ = write_half.shutdown().await;
    });
    // A failed delivery closes the connection: the client then re-sends its unacked chunks
    // instead of waiting for an ack time-out.
    let failed = CancellationToken::new();
    // Cancelled once this connection reads no more: deliveries still waiting to queue an ack
    // (the queue full because the client does not read) stop waiting.
    let closing = CancellationToken::new();
    let mut deliveries = JoinSet::new();
    let mut line = Line::default();
    let mine = Arc::new(Unacked::default());
    loop {
        // Until a connection has sent a complete frame its slot may go to a newcomer, and it has
        // only `handshake_timeout` to send one.
        let quiet_limit = if slot.is_proven() { ctx.idle_timeout } else { ctx.handshake_timeout };
        let next = tokio::select! {
            biased;
            _ = shutdown.wait() => break,
            _ = failed.cancelled() => break,
            _ = slot.evicted.cancelled() => {
                tracing::debug!(%peer, "no frame yet and every slot taken: closed for a newer connection");
                break;
            }
            Some(_) = deliveries.join_next(), if !deliveries.is_empty() => continue,
            next = tokio::time::timeout(quiet_limit, frames.next()) => next,
        };
        let Received { frame, charge: receiving } = match next {
            Err(_) if !slot.is_proven() => {
                tracing::debug!(%peer, "no frame within handshake_timeout; closing");
                metrics::counter!("tron_relay_connections_closed_total", "reason" => "no_first_frame").increment(1);
                break;
            }
            Err(_) => {
                tracing::debug!(%peer, "idle time-out; closing");
                break;
            }
            Ok(Ok(None)) => break,
            Ok(Err(Closed::Decode(e))) => {
                tracing::warn!(%peer, error = %e, "malformed frame; closing connection");
                metrics::counter!("tron_relay_frames_rejected_total", "reason" => e.reason()).increment(1);
                break;
            }
            Ok(Err(Closed::Starved)) => {
                tracing::warn!(%peer, "limits.max_receiving_bytes stayed spent for handshake_timeout while this connection's frame arrived; closing it (the client re-sends)");
                metrics::counter!("tron_relay_connections_closed_total", "reason" => "receive_budget").increment(1);
                break;
            }
            Ok(Err(Closed::SlowFrame)) => {
                tracing::warn!(%peer, "a frame did not arrive whole within limits.frame_timeout; closing connection");
                metrics::counter!("tron_relay_connections_closed_total", "reason" => "slow_frame").increment(1);
                break;
            }
            Ok(Ok(Some(received))) => {
                slot.prove();
                received
            }
        };
        let batch = match frame {
            Frame::Heartbeat => continue,
            Frame::Ping(_) => {
                tracing::warn!(%peer, "PING outside a handshake; closing connection");
                metrics::counter!("tron_relay_frames_rejected_total", "reason" => "unexpected_ping").increment(1);
                break;
            }
            Frame::Events(batch) => batch,
        };
        metrics::counter!("tron_relay_chunks_received_total").increment(1);
        // One connection may not hold more than its share of the budget unacked: past it, this
        // connection is not read (nor decoded) until Kafka answers some of its chunks.
        tokio::select! {
            _ = shutdown.wait() => break,
            _ = mine.below(ctx.max_inflight_bytes_per_connection) => {}
        }
        // At most `DECODE_SLOTS` chunks are inflated and transcoded at once, so what decoding holds
        // for a moment (inflated bytes, the JSON being built) is bounded whatever the number of
        // connections; the records it makes are charged to the budget before they go on.
        let decoding = tokio::select! {
            _ = shutdown.wait() => break,
            slot = ctx.decode_slots.acquire() => slot.expect("decode slots are never closed"),
        };
        let records = match batch.decode(&ctx.limits) {
            Ok(mut records) => {
                records.json.shrink_to_fit(); // held until Kafka answers: no growth slack
                records
            }
            Err(e) => {
                tracing::warn!(%peer, error = %e, "malformed chunk; closing connection");
                metrics::counter!("tron_relay_frames_rejected_total", "reason" => e.reason()).increment(1);
                break;
            }
        };
        // The frame's bytes go (and their charge with them) before this chunk waits for the budget.
        let (tag, ack) = (batch.tag.clone(), batch.ack());
        drop(batch);
        drop(receiving);
        if tag == WATERMARK_TAG {
            // An agent's low watermark: kept, written to Kafka by the watermark task, acked now.
            // Charged to the budget like any chunk while it is read into the table, so many
            // reports at once wait for room instead of adding to what the budget bounds.
            let cost = chunk_cost(&records).clamp(1, ctx.max_inflight_bytes) as u32;
            let _permit = tokio::select! {
                _ = shutdown.wait() => break,
                permit = ctx.budget.clone().acquire_many_owned(cost) => permit.expect("budget semaphore is never closed"),
            };
            drop(decoding);
            if let Err(e) = ctx.watermarks.report(&records, &ctx.router, &report_hosts) {
                tracing::warn!(%peer, error = %e, "bad watermark report; closing connection");
                metrics::counter!("tron_relay_frames_rejected_total", "reason" => "bad_watermark").increment(1);
                break;
            }
            if let Some(ack) = ack {
                tokio::select! {
                    biased;
                    _ = ack_tx.send(ack) => {}
                    _ = shutdown.wait() => break,
                }
            }
            continue;
        }
        metrics::counter!("tron_relay_records_received_total").increment(records.records.len() as u64);
        let cost = chunk_cost(&records).clamp(1, ctx.max_inflight_bytes) as u32;
        let permit = tokio::select! {
            _ = shutdown.wait() => break,
            permit = ctx.budget.clone().acquire_many_owned(cost) => permit.expect("budget semaphore is never closed"),
        };
        drop(decoding);
        mine.charge(cost as usize);
        metrics::gauge!("tron_relay_inflight_bytes").increment(cost as f64);
        let chunk = Chunk { tag, ack, records };
        let ctx = ctx.clone();
        let ack_tx = ack_tx.clone();
        let failed = failed.clone();
        let closing = closing.clone();
        let mine = mine.clone();
        let turn = line.next_turn();
        deliveries.spawn(async move {
            deliver(&ctx, &chunk, turn, peer, &ack_tx, &failed, &closing).await;
            mine.release(cost as usize);
            metrics::gauge!("tron_relay_inflight_bytes").decrement(cost as f64);
            drop(permit);
        });
    }
    // Finish what was accepted: every chunk already read is delivered and, if it succeeds, acked;
    // acks that cannot be queued any more (a client that does not read them) are dropped then.
    closing.cancel();
    while deliveries.join_next().await.is_some() {}
    drop(ack_tx);
    // A client that does not read keeps the writer blocked; it gets a moment, not for ever.
    let writer_abort = writer.abort_handle();
    if tokio::time::timeout(ACK_WRITE_GRACE, writer).await.is_err() {
        writer_abort.abort();
    }
}

/// Acks a connection may have waiting to be written; each is a few dozen bytes.
const ACKS_QUEUED: usize = 1024;
/// How long the acks of a closing connection may take to be written.
const ACK_WRITE_GRACE: Duration = Duration::from_secs(5);

/// A connection's chunks charged to the budget and not answered by Kafka yet.
#[derive(Default)]
struct Unacked {
    bytes: AtomicUsize,
    released: Notify,
}

impl Unacked {
    /// Returns once fewer than `cap` bytes are unacked (so a connection overshoots its cap by
    /// one chunk at most: its cost is known only once decoded).
    async fn below(&self, cap: usize) {
        loop {
            let released = self.released.notified();
            if self.bytes.load(Ordering::Acquire) < cap {
                return;
            }
            released.await;
        }
    }

    fn charge(&self, n: usize) {
        self.bytes.fetch_add(n, Ordering::AcqRel);
    }

    fn release(&self, n: usize) {
        self.bytes.fetch_sub(n, Ordering::AcqRel);
        self.released.notify_waiters();
    }
}

/// What a record costs beside its JSON: librdkafka's message and its header, allocator
/// rounding. Measured, not estimated: the Kafka-outage test at default limits (400-record chunks
/// of ~200-byte records) showed about 1 KiB per record above 2 x the JSON with a delivery future
/// per record; with per-chunk delivery reports the same test peaks lower (210 MiB for 256 MiB).
const PER_RECORD_OVERHEAD: usize = 1024;

/// What a decoded chunk holds until Kafka has answered: its JSON (ours, then librdkafka's copy)
/// and the per-record overhead.
fn chunk_cost(records: &Records) -> usize {
    records.json.len() * 2 + records.records.len() * PER_RECORD_OVERHEAD
}

/// A decoded chunk on its way to Kafka.
struct Chunk {
    tag: String,
    ack: Option<Vec<u8>>,
    records: Records,
}

async fn deliver<K: Deliver>(
    ctx: &Context<K>,
    batch: &Chunk,
    turn: Turn,
    peer: SocketAddr,
    acks: &mpsc::Sender<Vec<u8>>,
    failed: &CancellationToken,
    closing: &CancellationToken,
) {
    let topic = ctx.router.topic(&batch.tag);
    let outcome = match ctx.kafka.deliver(topic, &batch.tag, &batch.records, turn).await {
        Ok(refused) if refused.is_empty() => Ok(0),
        Ok(refused) => dead_letter(ctx, batch, peer, topic, refused),
        Err(e) => Err((e.reason(), e.to_string())),
    };
    match outcome {
        Ok(dead) => {
            let delivered = batch.records.records.len() - dead;
            metrics::counter!("tron_relay_records_delivered_total").increment(delivered as u64);
            let now = tron_service::clock::now_ns();
            let latency = metrics::histogram!("tron_relay_event_to_kafka_seconds");
            for e in &batch.records.records {
                latency.record((now - e.time.unix_nanos()).max(0) as f64 / 1e9);
            }
            if let Some(ack) = &batch.ack {
                metrics::counter!("tron_relay_chunks_acked_total").increment(1);
                tokio::select! {
                    biased;
                    _ = acks.send(ack.clone()) => {}
                    _ = closing.cancelled() => {}
                }
            }
        }
        Err((reason, error)) => {
            tracing::warn!(%peer, tag = %batch.tag, records = batch.records.records.len(), %error, "chunk not delivered; not acked");
            metrics::counter!("tron_relay_delivery_failures_total", "reason" => reason).increment(1);
            failed.cancel();
        }
    }
}

/// Records Kafka refused as too large go to the dead-letter file; once they are on disk the chunk
/// counts as answered. Returns how many were dead-lettered.
fn dead_letter<K>(
    ctx: &Context<K>,
    batch: &Chunk,
    peer: SocketAddr,
    topic: &str,
    refused: Vec<crate::kafka::Refused>,
) -> Result<usize, (&'static str, String)> {
    tokio::task::block_in_place(|| ctx.dead_letter.write(peer, &batch.tag, topic, &refused))
        .map_err(|e| ("dead_letter_failed", e))?;
    for r in &refused {
        metrics::counter!("tron_relay_records_dead_lettered_total", "reason" => r.error.reason()).increment(1);
    }
    tracing::warn!(
        %peer, tag = %batch.tag, records = refused.len(), file = %ctx.dead_letter.path().display(),
        first_error = %refused[0].error, "records Kafka can never accept written to the dead-letter file; chunk acked"
    );
    Ok(refused.len())
}

/// Ok: the client's user name (empty when no users are configured). Err: a metrics label and
/// the reason to log.
async fn handshake<R, W>(
    frames: &mut FrameReader<R>,
    writer: &mut W,
    security: &Security,
    timeout: Duration,
) -> Result<String, (&'static str, String)>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let helo = Helo {
        nonce: hex_nonce(),
        auth_salt: if security.users.is_empty() { Vec::new() } else { hex_nonce() },
        keepalive: true,
    };
    let io = |what: &str, e: std::io::Error| ("handshake", format!("{what}: {e}"));
    writer.write_all(&helo.encode()).await.map_err(|e| io("sending HELO", e))?;
    let deadline = tokio::time::Instant::now() + timeout;
    let ping = loop {
        match tokio::time::timeout_at(deadline, frames.next()).await {
            Err(_) => return Err(("handshake", format!("no PING within {timeout:?}"))),
            Ok(Ok(None)) => return Err(("handshake", "closed during handshake".into())),
            // Refused from the frame's first bytes: nothing was decompressed or decoded.
            Ok(Err(Closed::Decode(e @ forward::DecodeError::BeforeHandshake))) => {
                return Err(("before_handshake", e.to_string()))
            }
            Ok(Err(Closed::Decode(e))) => return Err(("handshake", format!("bad PING: {e}"))),
            Ok(Err(Closed::Starved | Closed::SlowFrame)) => return Err(("handshake", "PING too slow".into())),
            Ok(Ok(Some(Received { frame: Frame::Ping(ping), .. }))) => break ping,
            Ok(Ok(Some(Received { frame: Frame::Heartbeat, .. }))) => continue,
            Ok(Ok(Some(Received { frame: Frame::Events(_), .. }))) => {
                return Err(("before_handshake", "sent events before completing the handshake".into()))
            }
        }
    };
    match ping.verify(&helo, &security.shared_key, &security.users) {
        Ok(()) => {
            let pong = Pong::accept(&ping, &helo, &security.hostname, &security.shared_key);
            writer.write_all(&pong.encode()).await.map_err(|e| io("sending PONG", e))?;
            Ok(ping.username)
        }
        Err(reason) => {
            let _ = writer.write_all(&Pong::reject(&reason).encode()).await;
            Err(("handshake", format!("{reason} (client hostname {:?})", ping.hostname)))
        }
    }
}

fn hex_nonce() -> Vec<u8> {
    let bytes: [u8; 16] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect::<String>().into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kafka::{DeliveryError, Refused};
    use crate::receive::ReceivePool;
    use crate::slots::Slots;
    use forward::{ChunkBuilder, EventTime};
    use rdkafka::error::{KafkaError, RDKafkaErrorCode};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Kafka that answers a chunk only when the test lets it, with success or a time-out. It
    /// notes the records in the order they are queued; the first chunk's task can be made to
    /// start late, as a loaded scheduler may do.
    struct Gated {
        answers: Semaphore,
        fail: bool,
        delivered: AtomicUsize,
        first_starts_late: Option<Duration>,
        calls: AtomicUsize,
        queued: std::sync::Mutex<Vec<Vec<u8>>>,
    }

    impl Deliver for Gated {
        async fn deliver(
            &self,
            topic: &str,
            _tag: &str,
            records: &Records,
            mut turn: Turn,
        ) -> Result<Vec<Refused>, DeliveryError> {
            if let (0, Some(late)) = (self.calls.fetch_add(1, Ordering::SeqCst), self.first_starts_late) {
                tokio::time::sleep(late).await;
            }
            turn.wait().await;
            self.queued
                .lock()
                .expect("queued lock")
                .extend((0..records.records.len()).map(|i| records.get(i).to_vec()));
            drop(turn);
            self.answers.acquire().await.expect("open").forget();
            if self.fail {
                let error = KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut);
                return Err(DeliveryError::Kafka { topic: topic.to_string(), error });
            }
            self.delivered.fetch_add(records.records.len(), Ordering::SeqCst);
            Ok(Vec::new())
        }
    }

    /// (Nothing here is too large for Kafka: the dead-letter file is never written.)
    fn context(fail: bool, dir: &std::path::Path) -> Context<Gated> {
        Context {
            kafka: Gated {
                answers: Semaphore::new(0),
                fail,
                delivered: AtomicUsize::new(0),
                first_starts_late: None,
                calls: AtomicUsize::new(0),
                queued: Default::default(),
            },
            watermarks: Default::default(),
            dead_letter: DeadLetter::new(dir.join("dead-letter.ndjson"), 1 << 20),
            router: Router::new(Vec::new(), "logs".into()),
            limits: Limits::default(),
            budget: Arc::new(Semaphore::new(64 << 20)),
            receive_pool: ReceivePool::new(16 << 20),
            decode_slots: Semaphore::new(2),
            max_inflight_bytes: 64 << 20,
            max_inflight_bytes_per_connection: 16 << 20,
            handshake_timeout: Duration::from_secs(10),
            frame_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(60),
            security: None,
            reports_only_for_certificate_names: false,
        }
    }

    /// Starts a connection on an in-memory stream; returns the client's end.
    fn connect(ctx: &Arc<Context<Gated>>) -> (tokio::io::DuplexStream, tokio::task::JoinHandle<()>) {
        connect_buffered(ctx, 1 << 20)
    }

    fn connect_buffered(
        ctx: &Arc<Context<Gated>>,
        buffer: usize,
    ) -> (tokio::io::DuplexStream, tokio::task::JoinHandle<()>) {
        let (client, server) = tokio::io::duplex(buffer);
        let (slot, _) = Slots::new(4, 4).admit("127.0.0.1".parse().unwrap()).expect("a free slot");
        let ctx = ctx.clone();
        let task = tokio::spawn(async move {
            serve(server, "127.0.0.1:24224".parse().unwrap(), ctx, &slot, Shutdown::new(), ReportHosts::Any).await;
        });
        (client, task)
    }

    fn chunk(id: &str) -> Vec<u8> {
        numbered_chunk(id, 0)
    }

    /// Three records numbered from `first`.
    fn numbered_chunk(id: &str, first: u64) -> Vec<u8> {
        let mut chunk = ChunkBuilder::uncompressed();
        for seq in first..first + 3 {
            let record = serde_json::json!({ "seq": seq });
            chunk.push(EventTime::new(1_795_300_000, 0), record.as_object().unwrap());
        }
        chunk.finish("app", id)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_chunk_is_acked_only_once_kafka_has_every_record() {
        let ctx = Arc::new(context(false, &std::env::temp_dir()));
        let (mut client, task) = connect(&ctx);
        client.write_all(&chunk("c1")).await.unwrap();
        let mut reply = [0u8; 64];
        let early = tokio::time::timeout(Duration::from_millis(300), client.read(&mut reply)).await;
        assert!(early.is_err(), "acked before Kafka answered");
        ctx.kafka.answers.add_permits(1);
        let n = tokio::time::timeout(Duration::from_secs(5), client.read(&mut reply)).await.unwrap().unwrap();
        let ack = rmpv::decode::read_value(&mut &reply[..n]).unwrap();
        assert_eq!(ack, rmpv::Value::Map(vec![("ack".into(), "c1".into())]));
        assert_eq!(ctx.kafka.delivered.load(Ordering::SeqCst), 3);
        drop(client);
        task.await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_connections_records_are_queued_in_the_order_sent_when_its_first_task_starts_late() {
        let mut ctx = context(false, &std::env::temp_dir());
        ctx.kafka.first_starts_late = Some(Duration::from_millis(300));
        let ctx = Arc::new(ctx);
        ctx.kafka.answers.add_permits(1 << 20);
        let (mut client, task) = connect(&ctx);
        for c in 0..4u64 {
            client.write_all(&numbered_chunk(&format!("c{c}"), c * 3)).await.unwrap();
        }
        let mut acks = 0;
        let mut reply = [0u8; 256];
        while acks < 4 {
            let n = tokio::time::timeout(Duration::from_secs(5), client.read(&mut reply)).await.unwrap().unwrap();
            acks += reply[..n].windows(3).filter(|w| w == b"ack").count();
        }
        let queued: Vec<u64> = ctx
            .kafka
            .queued
            .lock()
            .unwrap()
            .iter()
            .map(|json| serde_json::from_slice::<serde_json::Value>(json).unwrap()["seq"].as_u64().unwrap())
            .collect();
        assert_eq!(queued, (0..12).collect::<Vec<u64>>(), "records queued out of the order they were sent");
        drop(client);
        task.await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_delivery_is_never_acked_and_closes_the_connection() {
        let ctx = Arc::new(context(true, &std::env::temp_dir()));
        let (mut client, task) = connect(&ctx);
        client.write_all(&chunk("c1")).await.unwrap();
        ctx.kafka.answers.add_permits(1);
        let mut reply = Vec::new();
        // The client re-sends on the close instead of waiting for its ack time-out.
        tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut reply)).await.unwrap().unwrap();
        assert!(reply.is_empty(), "a failed chunk was acked: {reply:?}");
        task.await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_that_never_reads_its_acks_stops_being_read() {
        let ctx = Arc::new(context(false, &std::env::temp_dir()));
        ctx.kafka.answers.add_permits(1 << 20);
        let (client, task) = connect_buffered(&ctx, 4 << 10);
        let (_unread_acks, mut write) = tokio::io::split(client);
        const CHUNKS: usize = 20_000;
        let writer = tokio::spawn(async move {
            for i in 0..CHUNKS {
                write.write_all(&chunk(&format!("c{i}"))).await.unwrap();
            }
            write
        });
        tokio::time::sleep(Duration::from_secs(3)).await;
        // Unbounded, the relay would read all 20,000 chunks and queue 20,000 acks. Bounded: 1,024
        // acks wait to be written, then deliveries keep their charge and the connection's cap
        // (16 MiB here, ~3.3 KiB per chunk) stops the reading.
        let delivered = ctx.kafka.delivered.load(Ordering::SeqCst) / 3;
        assert!(!writer.is_finished(), "the relay read every chunk although no ack was read");
        assert!(delivered < CHUNKS / 2, "{delivered} chunks delivered while their acks could not be written");
        // And the connection still ends when the client goes (no hang on the unwritable acks).
        writer.abort();
        drop(_unread_acks);
        tokio::time::timeout(Duration::from_secs(30), task).await.expect("connection ended").unwrap();
    }
}
