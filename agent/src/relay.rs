//! The relay destination: CompressedPackedForward chunks over TLS, each waiting for its ack.
//!
//! The agent keeps a connection to every relay it is given (every address `addresses` lists, and
//! every address a name there resolves to), each owned by one task. A chunk goes to the connected
//! relay with the fewest chunks waiting for an ack, so a relay that acks faster gets more and a
//! fleet spreads over all relays whatever its size; a relay that stops acking stops getting new
//! chunks at once. A chunk whose ack does not come within `ack_timeout` drops that connection:
//! every chunk waiting on it fails and the shipper re-sends them, through the other relays, while
//! the dropped one reconnects with back-off (docs/deployment.md, "Several relays").

use crate::config::{BatchConfig, LinkCompression, RelayConfig};
use crate::destination::{BatchMeta, Destination, SendError};
use crate::parse::{Added, Form, Record};
use forward::handshake::Ping;
use forward::{ChunkBuilder, ClientCodec, ServerMessage};
use futures::{SinkExt, StreamExt};
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::Framed;
use tron_service::backoff::Backoff;
use tron_service::Health;

mod links;

trait Stream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Stream for T {}

struct Request {
    frame: Arc<Vec<u8>>,
    chunk: Vec<u8>,
    reply: oneshot::Sender<Result<(), SendError>>,
}

pub struct RelayForwarder {
    tls: Arc<std::sync::RwLock<TlsSettings>>,
    links: Arc<links::Links>,
    batch: BatchConfig,
    compression: Compression,
    /// Buffers of sent chunks' entries, reused for the next ones: a megabyte chunk built in
    /// fresh memory page-faulted its way in, 17-19 % of the agent's CPU with
    /// `compression = "none"`. With `none` they are the frames of acknowledged chunks; with
    /// `zstd` and gzip level 1 (igzip), what the entries were gathered in before the frame was
    /// compressed. At most `max_inflight` are kept (chunks of other gzip levels are built
    /// compressed and need none).
    spare_buffers: std::sync::Mutex<Vec<Vec<u8>>>,
    ack_timeout: Duration,
    /// This agent's host name, the first half of every chunk's `tron_source`.
    host: String,
    /// The tags this agent's sources send with, so the relay knows which topics a watermark
    /// report speaks for. Replaced on SIGHUP when sources change.
    tags: std::sync::RwLock<Vec<String>>,
    watermark_interval: Duration,
}

/// How chunks go on the link, with the level.
#[derive(Debug, Clone, Copy)]
enum Compression {
    /// Gzip level 1 (the default), by ISA-L's igzip: half zlib-rs's CPU, fewer bytes, the
    /// same format (`forward::igzip`).
    Igzip,
    /// The other gzip levels, by zlib-rs.
    Gzip(u32),
    Zstd(i32),
    None,
}

/// The reserved tag of watermark reports; the relay keeps them and writes nothing of them as
/// records.
pub const WATERMARK_TAG: &str = "tron.watermark";

pub struct SealedChunk {
    frame: Arc<Vec<u8>>,
    /// The chunk id as MessagePack, as the ack will carry it.
    chunk: Vec<u8>,
}

type TlsSettings = Option<(tokio_rustls::TlsConnector, Option<String>)>;

struct Connector {
    /// Replaced on SIGHUP; the next connection uses the new CA and client certificate.
    tls: Arc<std::sync::RwLock<TlsSettings>>,
    shared_key: Option<String>,
    user: Option<(String, String)>,
    hostname: String,
    ack_timeout: Duration,
}

impl RelayForwarder {
    pub fn new(cfg: &RelayConfig, hostname: &str, tags: Vec<String>, health: Health) -> anyhow::Result<Self> {
        let tls = Arc::new(std::sync::RwLock::new(tls_settings(cfg)?));
        let connector = Arc::new(Connector {
            tls: tls.clone(),
            shared_key: cfg.shared_key.clone(),
            user: cfg.username.clone().zip(cfg.password.clone()),
            hostname: hostname.to_string(),
            ack_timeout: cfg.ack_timeout,
        });
        let links = links::Links::start(&cfg.addresses, connector, cfg.batch.max_inflight.max(1) * 2, health);
        Ok(RelayForwarder {
            tls,
            links,
            batch: cfg.batch.clone(),
            compression: match cfg.compression {
                LinkCompression::Gzip if cfg.gzip_level == 1 => Compression::Igzip,
                LinkCompression::Gzip => Compression::Gzip(cfg.gzip_level),
                LinkCompression::Zstd => Compression::Zstd(cfg.zstd_level),
                LinkCompression::None => Compression::None,
            },
            spare_buffers: std::sync::Mutex::new(Vec::new()),
            ack_timeout: cfg.ack_timeout,
            host: hostname.to_string(),
            tags: std::sync::RwLock::new(tags),
            watermark_interval: cfg.watermark_interval,
        })
    }

    /// The tags the next watermark reports speak for (a reload added or removed a source).
    pub fn set_tags(&self, tags: Vec<String>) {
        *self.tags.write().expect("tags lock") = tags;
    }

    /// Re-reads the CA, client certificate and key; on error the old material stays in use.
    pub fn reload_tls(&self, cfg: &RelayConfig) -> anyhow::Result<()> {
        let fresh = tls_settings(cfg)?;
        *self.tls.write().expect("tls lock") = fresh;
        Ok(())
    }

    fn keep_spare(&self, buffer: Vec<u8>) {
        let mut spare = self.spare_buffers.lock().expect("spare buffers lock");
        // Oversized buffers (a chunk of huge lines) are not kept: they would hold their memory.
        if spare.len() < self.batch.max_inflight && buffer.capacity() <= 2 * self.batch.max_bytes {
            spare.push(buffer);
        }
    }
}

fn tls_settings(cfg: &RelayConfig) -> anyhow::Result<TlsSettings> {
    Ok(match &cfg.tls_ca {
        Some(ca) if !cfg.plaintext => {
            let client_cert = cfg.client_cert.as_deref().zip(cfg.client_key.as_deref());
            let config = tron_service::tls::client_config(ca, client_cert)?;
            Some((tokio_rustls::TlsConnector::from(Arc::new(config)), cfg.tls_server_name.clone()))
        }
        _ => None,
    })
}

impl Destination for RelayForwarder {
    type Builder = ChunkBuilder;
    type Sealed = SealedChunk;

    fn name(&self) -> &'static str {
        "relay"
    }

    fn batch_config(&self) -> &BatchConfig {
        &self.batch
    }

    fn split_by_hour(&self) -> bool {
        false
    }

    fn record_form(&self) -> Form {
        Form::MessagePack
    }

    fn builder(&self) -> ChunkBuilder {
        let spare = || self.spare_buffers.lock().expect("spare buffers lock").pop().unwrap_or_default();
        match self.compression {
            Compression::Igzip => ChunkBuilder::igzip(spare()),
            Compression::Gzip(level) => ChunkBuilder::new(level),
            Compression::Zstd(level) => ChunkBuilder::zstd(level, spare()),
            Compression::None => ChunkBuilder::uncompressed_in(spare()),
        }
    }

    /// A chunk of gzip level 2-9 (or 0) holds a deflate state from its first record; the others
    /// hold their entries, which the batch counts as it grows.
    fn open_batch_bytes(&self) -> usize {
        match self.compression {
            Compression::Gzip(_) => crate::destination::GZIP_ENCODER_BYTES,
            Compression::Igzip | Compression::Zstd(_) | Compression::None => 0,
        }
    }

    fn push(&self, builder: &mut ChunkBuilder, record: &Record, bytes: &[u8], added: &Added, position: u64) {
        builder.push_encoded_at(position, record.time, |out| record.write_msgpack(bytes, added, out));
    }

    fn seal(&self, builder: ChunkBuilder, meta: &BatchMeta) -> SealedChunk {
        // Deterministic: a re-sent chunk carries the same id.
        let id = format!("{:016x}-{:020}", meta.file_id, meta.first_offset);
        let mut chunk = Vec::new();
        rmp::encode::write_str(&mut chunk, &id).expect("vec");
        // The source positions let the sink drop a record it already wrote when this chunk is
        // re-sent (after a crash or an ack time-out), whatever chunk boundaries it had before.
        let source = format!("{}/{:016x}", self.host, meta.file_id);
        let (frame, entries) = builder.finish_from_keeping(&meta.tag, &id, &source, meta.end_offset);
        if let Some(entries) = entries {
            self.keep_spare(entries);
        }
        SealedChunk { frame: Arc::new(frame), chunk }
    }

    fn recycle(&self, sealed: SealedChunk) {
        if !matches!(self.compression, Compression::None) {
            return;
        }
        if let Ok(frame) = Arc::try_unwrap(sealed.frame) {
            self.keep_spare(frame);
        }
    }

    fn watermark_interval(&self) -> Option<Duration> {
        (!self.watermark_interval.is_zero()).then_some(self.watermark_interval)
    }

    /// A one-record chunk on [`WATERMARK_TAG`]. It goes down the same connection as the chunks,
    /// after the acks it was computed from. A lost report is replaced by the next one.
    async fn send_watermark(self: Arc<Self>, watermark_ms: i64, drained: bool) {
        let mut record = serde_json::Map::new();
        record.insert("host".into(), self.host.clone().into());
        record.insert("watermark_ms".into(), watermark_ms.into());
        if drained {
            record.insert("drained".into(), true.into());
        }
        record.insert("tags".into(), self.tags.read().expect("tags lock").clone().into());
        // Gzip level 1 by igzip, as the link's chunks are by default: a report every few seconds
        // does not keep a zlib-rs state (404 KiB) alive for itself.
        let mut builder = ChunkBuilder::igzip(Vec::new());
        builder.push(forward::EventTime::from_unix_nanos(tron_service::clock::now_ns()), &record);
        let id = format!("wm-{}-{watermark_ms}{}", self.host, if drained { "-drained" } else { "" });
        let mut chunk = Vec::new();
        rmp::encode::write_str(&mut chunk, &id).expect("vec");
        let sealed = Arc::new(SealedChunk { frame: Arc::new(builder.finish(WATERMARK_TAG, &id)), chunk });
        match self.send_frame(&sealed).await {
            Ok(()) if drained => {
                tracing::info!(watermark_ms, "told the relay this agent stopped drained");
                metrics::counter!("tron_agent_watermarks_sent_total").increment(1)
            }
            Ok(()) => metrics::counter!("tron_agent_watermarks_sent_total").increment(1),
            Err(e) => tracing::debug!(error = %e, "watermark report not acknowledged; the next one replaces it"),
        }
    }

    async fn send(self: Arc<Self>, sealed: Arc<SealedChunk>, _meta: Arc<BatchMeta>) -> Result<(), SendError> {
        self.send_frame(&sealed).await
    }
}

impl RelayForwarder {
    async fn send_frame(&self, sealed: &SealedChunk) -> Result<(), SendError> {
        let link = self.links.pick(self.ack_timeout).await?;
        let _outstanding = link.state.outstanding();
        let (reply, wait) = oneshot::channel();
        let req = Request { frame: sealed.frame.clone(), chunk: sealed.chunk.clone(), reply };
        link.requests.send(req).await.map_err(|_| SendError::Unreachable("relay connection task stopped".into()))?;
        match tokio::time::timeout(self.ack_timeout, wait).await {
            Ok(Ok(result)) => {
                if result.is_ok() {
                    metrics::counter!("tron_agent_relay_chunks_acked_total", "relay" => link.address.clone())
                        .increment(1);
                }
                result
            }
            Ok(Err(_)) => Err(SendError::ConnectionLost("connection closed before the ack".into())),
            Err(_) => {
                // A relay that stops acking (stopped, stuck, its link black-holed) is left now:
                // its connection is dropped, so every chunk waiting on it is re-sent elsewhere.
                link.state.give_up(&link.address, self.ack_timeout);
                Err(SendError::AckTimeout(self.ack_timeout))
            }
        }
    }
}

/// One relay connection's life: connect, send what it is handed, match acks, and on any failure
/// (or an ack time-out reported by a sender) drop everything waiting and connect again.
async fn connection_task(
    connector: Arc<Connector>,
    address: String,
    name: String,
    mut requests: mpsc::Receiver<Request>,
    state: Arc<links::LinkState>,
    pool: Arc<links::Links>,
) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    loop {
        state.set(links::Status::Connecting, &pool);
        let mut framed = match connector.connect(&address, &name).await {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(relay = %address, error = %e, "cannot connect to relay");
                state.set(links::Status::Down(format!("{address}: {e}")), &pool);
                // Fail what is queued so those chunks go elsewhere instead of waiting for an ack.
                if fail_queued(&mut requests, || SendError::Unreachable(format!("relay {address}: {e}"))) {
                    return;
                }
                tokio::time::sleep(backoff.next_delay()).await;
                continue;
            }
        };
        tracing::info!(relay = %address, "connected to relay");
        state.set(links::Status::Connected, &pool);
        backoff.reset();
        let mut waiting: HashMap<Vec<u8>, oneshot::Sender<Result<(), SendError>>> = HashMap::new();
        let error = loop {
            tokio::select! {
                req = requests.recv() => {
                    let Some(req) = req else { return };
                    if let Err(e) = write_frame(&mut framed, &req.frame).await {
                        let _ = req.reply.send(Err(SendError::ConnectionLost(format!("write to {address}: {e}"))));
                        break format!("write failed: {e}");
                    }
                    waiting.insert(req.chunk, req.reply);
                }
                msg = framed.next() => match msg {
                    Some(Ok(ServerMessage::Ack(chunk))) => {
                        if let Some(reply) = waiting.remove(&chunk) {
                            let _ = reply.send(Ok(()));
                        }
                    }
                    Some(Ok(other)) => break format!("unexpected message from relay: {other:?}"),
                    Some(Err(e)) => break format!("bad reply from relay: {e}"),
                    None => break "relay closed the connection".to_string(),
                },
                why = state.given_up() => break why,
            }
        };
        tracing::warn!(relay = %address, error = %error, pending = waiting.len(), "relay connection lost; pending chunks will be re-sent");
        state.set(links::Status::Connecting, &pool);
        for (_, reply) in waiting.drain() {
            let _ = reply.send(Err(SendError::ConnectionLost(error.clone())));
        }
        // Chunks handed over while the connection broke would wait for an ack that cannot come.
        if fail_queued(&mut requests, || SendError::ConnectionLost(error.clone())) {
            return;
        }
        // Not straight back: a relay that accepts and then stalls would otherwise be re-tried in a
        // tight loop while its chunks go elsewhere.
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

/// Writes a chunk's frame straight to the connection. Not through `Framed::send`, which copies
/// the whole frame into its write buffer first: that copy was 2-3 % of the agent's CPU. Framed's
/// write buffer is empty here (every earlier send flushed it), so nothing is reordered; its read
/// buffer, which may hold acks already received, is left as it is.
async fn write_frame(framed: &mut Framed<Pin<Box<dyn Stream>>, ClientCodec>, frame: &[u8]) -> std::io::Result<()> {
    debug_assert!(framed.write_buffer().is_empty());
    let stream = framed.get_mut();
    stream.write_all(frame).await?;
    stream.flush().await
}

/// Answers every request waiting in the queue with `error()`. True when the forwarder is gone
/// (the queue is closed): the connection task then ends.
fn fail_queued(requests: &mut mpsc::Receiver<Request>, error: impl Fn() -> SendError) -> bool {
    loop {
        match requests.try_recv() {
            Ok(r) => {
                let _ = r.reply.send(Err(error()));
            }
            Err(mpsc::error::TryRecvError::Empty) => return false,
            Err(mpsc::error::TryRecvError::Disconnected) => return true,
        }
    }
}

impl Connector {
    async fn connect(&self, address: &str, name: &str) -> Result<Framed<Pin<Box<dyn Stream>>, ClientCodec>, String> {
        let tcp = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(address))
            .await
            .map_err(|_| "connect timed out".to_string())?
            .map_err(|e| e.to_string())?;
        let _ = tcp.set_nodelay(true);
        // A relay that vanished without a reset fails the connection within about `ack_timeout`
        // (TCP_USER_TIMEOUT), not after TCP's ~15 minutes of retransmissions.
        if let Err(e) = tron_service::net::detect_dead_peers(&tcp, Duration::from_secs(15), self.ack_timeout) {
            tracing::debug!(relay = %address, error = %e, "cannot set keepalive / TCP_USER_TIMEOUT");
        }
        let tls = self.tls.read().expect("tls lock").clone();
        let stream: Pin<Box<dyn Stream>> = match &tls {
            Some((tls, server_name)) => {
                let host = server_name.clone().unwrap_or_else(|| name.to_string());
                let sni = rustls::pki_types::ServerName::try_from(host.clone())
                    .map_err(|e| format!("server name {host:?}: {e}"))?;
                let tls_stream = tokio::time::timeout(Duration::from_secs(10), tls.connect(sni, tcp))
                    .await
                    .map_err(|_| "TLS handshake timed out".to_string())?
                    .map_err(|e| format!("TLS: {e}"))?;
                Box::pin(tls_stream)
            }
            None => Box::pin(tcp),
        };
        let mut framed = Framed::new(stream, ClientCodec::new());
        if let Some(key) = &self.shared_key {
            self.handshake(&mut framed, key).await?;
        }
        Ok(framed)
    }

    async fn handshake(&self, framed: &mut Framed<Pin<Box<dyn Stream>>, ClientCodec>, key: &str) -> Result<(), String> {
        let helo = match tokio::time::timeout(Duration::from_secs(10), framed.next()).await {
            Ok(Some(Ok(ServerMessage::Helo(h)))) => h,
            Ok(other) => return Err(format!("expected HELO, got {other:?}")),
            Err(_) => return Err("no HELO from relay (is shared_key configured on both sides?)".into()),
        };
        let salt: [u8; 16] = rand::random();
        let salt = hex::encode(salt);
        let user = self.user.as_ref().map(|(u, p)| (u.as_str(), p.as_str()));
        let ping = Ping::answer(&helo, &self.hostname, salt.as_bytes(), key, user);
        framed.send(ping.encode()).await.map_err(|e| e.to_string())?;
        match tokio::time::timeout(Duration::from_secs(10), framed.next()).await {
            Ok(Some(Ok(ServerMessage::Pong(pong)))) => pong.verify(&ping, &helo, key),
            Ok(other) => Err(format!("expected PONG, got {other:?}")),
            Err(_) => Err("no PONG from relay".into()),
        }
    }
}
