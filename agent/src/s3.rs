//! The S3 archive: one gzip NDJSON object per batch (one file, one event hour), named after the
//! data it holds so a retried upload overwrites instead of duplicating.

use crate::config::{BatchConfig, Checksums, S3Config, Sse};
use crate::destination::GZIP_ENCODER_BYTES;
use crate::destination::{BatchMeta, Destination, SendError};
use crate::parse::{Added, Form, Record};
use aws_sdk_s3::config::{RequestChecksumCalculation, ResponseChecksumValidation, SharedCredentialsProvider};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{ServerSideEncryption, StorageClass};
use forward::gzip::{GzipMembers, GzipVec};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

enum Store {
    S3 {
        client: aws_sdk_s3::Client,
        bucket: String,
        put: PutOptions,
    },
    /// `file://` stand-in: the same keys under a local directory.
    Dir(PathBuf),
}

/// What every object is written with (the multipart upload's create call carries the same).
struct PutOptions {
    sse: Option<ServerSideEncryption>,
    kms_key_id: Option<String>,
    storage_class: Option<StorageClass>,
}

impl From<&S3Config> for PutOptions {
    fn from(cfg: &S3Config) -> Self {
        PutOptions {
            sse: cfg.sse.map(|sse| match sse {
                Sse::Aes256 => ServerSideEncryption::Aes256,
                Sse::Kms => ServerSideEncryption::AwsKms,
            }),
            kms_key_id: cfg.sse_kms_key_id.clone(),
            storage_class: cfg.storage_class.as_deref().map(StorageClass::from),
        }
    }
}

/// The S3 client: the SDK's default credential chain (environment, web identity, ECS/EC2
/// metadata, ~/.aws), or a named profile, optionally assuming `role_arn` with those credentials.
async fn client(cfg: &S3Config) -> aws_sdk_s3::Client {
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
    if let Some(region) = &cfg.region {
        loader = loader.region(aws_config::Region::new(region.clone()));
    }
    if let Some(profile) = &cfg.profile {
        loader = loader.profile_name(profile);
    }
    let mut shared = loader.load().await;
    if let Some(role) = &cfg.role_arn {
        let provider = aws_config::sts::AssumeRoleProvider::builder(role)
            .session_name(&cfg.role_session_name)
            .configure(&shared)
            .build()
            .await;
        shared = shared.into_builder().credentials_provider(SharedCredentialsProvider::new(provider)).build();
    }
    let mut s3 = aws_sdk_s3::config::Builder::from(&shared);
    if let Some(endpoint) = &cfg.endpoint {
        s3 = s3.endpoint_url(endpoint).force_path_style(true);
    }
    if cfg.checksums == Checksums::WhenRequired {
        s3 = s3
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
    }
    aws_sdk_s3::Client::from_conf(s3.build())
}

/// An object's compressor, by `gzip_level`. From level 2, members compressed whole by libdeflate:
/// at the default level 6 the agent took 27 % less CPU on realistic lines and stored 5 % less
/// than with zlib-rs (bench/RESULTS.md). At level 1, zlib-rs's one stream, still the cheapest in
/// CPU (libdeflate's level 1 took 11–26 % more, for 31 % fewer bytes): whoever picks level 1 picks
/// it for the CPU.
pub enum ObjectGzip {
    Stream(GzipVec),
    Members(GzipMembers),
}

impl ObjectGzip {
    /// Up to this level, zlib-rs's one stream; above it, libdeflate's members.
    const STREAM_UP_TO: u32 = 1;

    pub fn new(level: u32) -> Self {
        if level <= Self::STREAM_UP_TO {
            ObjectGzip::Stream(GzipVec::new(level))
        } else {
            ObjectGzip::Members(GzipMembers::new(level))
        }
    }

    /// What an open object holds before its first line: the zlib-rs state, or the input
    /// gathered for a member (libdeflate's compressors are shared by every open object).
    fn open_bytes(level: u32) -> usize {
        if level <= Self::STREAM_UP_TO {
            GZIP_ENCODER_BYTES
        } else {
            forward::gzip::MEMBER
        }
    }

    fn write_line(&mut self, line: &[u8]) {
        match self {
            ObjectGzip::Stream(gz) => gz.write_all(line),
            ObjectGzip::Members(gz) => gz.write_all(line),
        }
        .expect("writing to a Vec cannot fail")
    }

    fn finish(self) -> Vec<u8> {
        match self {
            ObjectGzip::Stream(gz) => gz.finish(),
            ObjectGzip::Members(gz) => gz.finish(),
        }
    }
}

pub struct S3Archive {
    store: Store,
    prefix: String,
    host: String,
    batch: BatchConfig,
    gzip_level: u32,
    multipart_threshold: usize,
    part_size: usize,
}

impl S3Archive {
    pub async fn new(cfg: &S3Config, host: &str) -> anyhow::Result<Self> {
        let (store, prefix) = if let Some(rest) = cfg.url.strip_prefix("file://") {
            let (dir, prefix) = (PathBuf::from(rest), String::new());
            std::fs::create_dir_all(&dir).map_err(|e| anyhow::anyhow!("{}: cannot create: {e}", dir.display()))?;
            (Store::Dir(dir), prefix)
        } else {
            let rest = cfg.url.strip_prefix("s3://").expect("validated");
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            let client = client(cfg).await;
            let put = PutOptions::from(cfg);
            (Store::S3 { client, bucket: bucket.to_string(), put }, prefix.trim_matches('/').to_string())
        };
        Ok(S3Archive {
            store,
            prefix,
            host: host.to_string(),
            batch: cfg.batch.clone(),
            gzip_level: cfg.gzip_level,
            multipart_threshold: cfg.multipart_threshold_bytes,
            part_size: cfg.multipart_part_bytes,
        })
    }

    /// `{prefix}/{tag}/dt=YYYY-MM-DD/hr=HH/{host}-{file_id}-{first_offset:020}.ndjson.gz`
    pub fn key(&self, meta: &BatchMeta) -> String {
        let hour = chrono::DateTime::from_timestamp(meta.hour * 3600, 0).unwrap_or_default();
        let name = format!(
            "{}/dt={}/hr={}/{}-{:016x}-{:020}.ndjson.gz",
            meta.tag,
            hour.format("%Y-%m-%d"),
            hour.format("%H"),
            self.host,
            meta.file_id,
            meta.first_offset
        );
        if self.prefix.is_empty() {
            name
        } else {
            format!("{}/{name}", self.prefix)
        }
    }
}

pub struct SealedObject {
    key: String,
    body: bytes::Bytes,
}

impl Destination for S3Archive {
    type Builder = ObjectGzip;
    type Sealed = SealedObject;

    fn name(&self) -> &'static str {
        "s3"
    }

    fn batch_config(&self) -> &BatchConfig {
        &self.batch
    }

    fn split_by_hour(&self) -> bool {
        true
    }

    fn record_form(&self) -> Form {
        Form::JsonText
    }

    fn builder(&self) -> Self::Builder {
        ObjectGzip::new(self.gzip_level)
    }

    fn open_batch_bytes(&self) -> usize {
        ObjectGzip::open_bytes(self.gzip_level)
    }

    fn push(&self, gz: &mut Self::Builder, record: &Record, bytes: &[u8], added: &Added, _position: u64) {
        // One scratch line per thread: the encoder takes a line in one write, and the line's
        // buffer is not allocated for every record.
        thread_local!(static LINE: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) });
        LINE.with_borrow_mut(|line| {
            line.clear();
            record.write_json_line(bytes, added, line);
            gz.write_line(line);
            if line.capacity() > 64 << 10 {
                *line = Vec::new(); // one huge line does not stay allocated
            }
        });
    }

    fn seal(&self, gz: Self::Builder, meta: &BatchMeta) -> SealedObject {
        SealedObject { key: self.key(meta), body: gz.finish().into() }
    }

    async fn send(self: Arc<Self>, sealed: Arc<SealedObject>, _meta: Arc<BatchMeta>) -> Result<(), SendError> {
        self.put(&sealed).await.map_err(SendError::Store)
    }
}

impl S3Archive {
    async fn put(&self, sealed: &Arc<SealedObject>) -> Result<(), String> {
        match &self.store {
            Store::S3 { client, bucket, put } if sealed.body.len() > self.multipart_threshold => {
                multipart_put(client, bucket, put, &sealed.key, &sealed.body, self.part_size).await
            }
            Store::S3 { client, bucket, put } => client
                .put_object()
                .bucket(bucket)
                .key(&sealed.key)
                .content_type("application/x-ndjson")
                .set_server_side_encryption(put.sse.clone())
                .set_ssekms_key_id(put.kms_key_id.clone())
                .set_storage_class(put.storage_class.clone())
                .body(ByteStream::from(sealed.body.clone()))
                .send()
                .await
                .map(|_| ())
                .map_err(|e| format!("s3://{bucket}/{}: {}", sealed.key, aws_sdk_s3::error::DisplayErrorContext(e))),
            Store::Dir(dir) => {
                let dir = dir.clone();
                let sealed = sealed.clone();
                tokio::task::spawn_blocking(move || {
                    tron_service::fs::write_atomically(&dir.join(&sealed.key), &sealed.body).map_err(|e| e.to_string())
                })
                .await
                .map_err(|e| e.to_string())?
            }
        }
    }
}

/// Uploads `body` in parts; on any failure the upload is aborted so no parts linger (and cost),
/// and the whole batch is retried by the shipper under the same key.
async fn multipart_put(
    client: &aws_sdk_s3::Client,
    bucket: &str,
    put: &PutOptions,
    key: &str,
    body: &bytes::Bytes,
    part_size: usize,
) -> Result<(), String> {
    use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
    let fail = |e: String| format!("s3://{bucket}/{key} (multipart): {e}");
    let created = client
        .create_multipart_upload()
        .bucket(bucket)
        .key(key)
        .content_type("application/x-ndjson")
        .set_server_side_encryption(put.sse.clone())
        .set_ssekms_key_id(put.kms_key_id.clone())
        .set_storage_class(put.storage_class.clone())
        .send()
        .await
        .map_err(|e| fail(aws_sdk_s3::error::DisplayErrorContext(e).to_string()))?;
    let upload_id = created.upload_id().ok_or_else(|| fail("no upload id in the answer".into()))?.to_string();
    let parts = async {
        let mut done = Vec::new();
        for (i, start) in (0..body.len()).step_by(part_size).enumerate() {
            let number = i as i32 + 1;
            let part = body.slice(start..(start + part_size).min(body.len()));
            let sent = client
                .upload_part()
                .bucket(bucket)
                .key(key)
                .upload_id(&upload_id)
                .part_number(number)
                .body(ByteStream::from(part))
                .send()
                .await
                .map_err(|e| format!("part {number}: {}", aws_sdk_s3::error::DisplayErrorContext(e)))?;
            done.push(CompletedPart::builder().part_number(number).set_e_tag(sent.e_tag().map(str::to_owned)).build());
        }
        client
            .complete_multipart_upload()
            .bucket(bucket)
            .key(key)
            .upload_id(&upload_id)
            .multipart_upload(CompletedMultipartUpload::builder().set_parts(Some(done)).build())
            .send()
            .await
            .map_err(|e| format!("complete: {}", aws_sdk_s3::error::DisplayErrorContext(e)))?;
        Ok::<(), String>(())
    }
    .await;
    if let Err(e) = parts {
        let _ = client.abort_multipart_upload().bucket(bucket).key(key).upload_id(&upload_id).send().await;
        return Err(fail(e));
    }
    metrics::counter!("tron_agent_multipart_uploads_total").increment(1);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::ObjectGzip;
    use std::io::Read;

    fn lines(n: usize) -> Vec<Vec<u8>> {
        (0..n)
            .map(|i| format!("{{\"_time\":\"2026-12-07T01:00:{:02}Z\",\"seq\":{i}}}\n", i % 60).into_bytes())
            .collect()
    }

    #[test]
    fn every_level_writes_an_object_that_reads_back_as_its_lines() {
        let written = lines(40_000); // about 1.3 MiB: several members from level 2
        let expected = written.concat();
        for level in 0..=9 {
            let mut gz = ObjectGzip::new(level);
            assert!(matches!(gz, ObjectGzip::Stream(_)) == (level <= 1), "level {level}");
            assert_eq!(ObjectGzip::open_bytes(level) < crate::destination::GZIP_ENCODER_BYTES, level > 1);
            for line in &written {
                gz.write_line(line);
            }
            let object = gz.finish();
            let mut text = Vec::new();
            flate2::read::MultiGzDecoder::new(&object[..]).read_to_end(&mut text).unwrap();
            assert!(text == expected, "level {level}");
            // Level 1 stays one member: a reader that stops after the first member reads it all.
            if level == 1 {
                let mut first = Vec::new();
                flate2::read::GzDecoder::new(&object[..]).read_to_end(&mut first).unwrap();
                assert!(first == expected);
            }
        }
    }
}
