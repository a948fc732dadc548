//! Where finished objects go: GCS (JSON API) or a local directory standing in for it.
//!
//! Besides plain reads and writes the store offers one compare-and-swap: a write that lands only
//! if the object is still at the generation the writer last saw (GCS `ifGenerationMatch`; a file
//! lock and a generation file in the directory store). The partition state uses it to fence an
//! instance that lost its partitions: its next state write fails with [`Fenced`] instead of
//! landing over the new owner's.

use crate::config::OutputConfig;
use gcloud_storage::client::google_cloud_auth::credentials::CredentialsFile;
use gcloud_storage::client::{Client, ClientConfig};
use gcloud_storage::http::objects::download::Range;
use gcloud_storage::http::objects::get::GetObjectRequest;
use gcloud_storage::http::objects::list::ListObjectsRequest;
use gcloud_storage::http::objects::upload::{UploadObjectRequest, UploadType};
use gcloud_storage::http::objects::Object;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub struct Listed {
    pub name: String,
    pub size: u64,
    pub metadata: HashMap<String, String>,
    /// When the object was written (ms since the epoch), as the store reports it.
    pub created_ms: Option<i64>,
}

/// A conditional write found the object changed since the writer read it: another instance owns
/// it now.
#[derive(Debug, thiserror::Error)]
#[error("{0}: changed by another instance (precondition failed): this instance is fenced")]
pub struct Fenced(pub String);

/// The object generation a conditional write expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// The object must not exist.
    Absent,
    /// The object must be at exactly this generation.
    Generation(i64),
}

/// Errors that retrying cannot fix (authentication, permission, a missing bucket): they are
/// logged with their reason and turn `/health` 503 at once.
pub fn is_permanent(e: &anyhow::Error) -> bool {
    e.chain()
        .filter_map(|c| c.downcast_ref::<gcloud_storage::http::Error>())
        .any(|g| matches!(status_of(g), Some(400 | 401 | 403 | 404)))
}

fn status_of(e: &gcloud_storage::http::Error) -> Option<u16> {
    match e {
        gcloud_storage::http::Error::Response(r) => Some(r.code),
        gcloud_storage::http::Error::HttpClient(h) => h.status().map(|s| s.as_u16()),
        _ => None,
    }
}

pub enum Store {
    Gcs { client: Box<Client>, bucket: String },
    Dir(PathBuf),
}

impl Store {
    /// `gs://bucket` or `file:///dir`, authenticated as `output` says.
    pub async fn open(url: &str, output: &OutputConfig) -> anyhow::Result<Self> {
        if let Some(dir) = url.strip_prefix("file://") {
            std::fs::create_dir_all(dir).map_err(|e| anyhow::anyhow!("{dir}: cannot create: {e}"))?;
            return Ok(Store::Dir(dir.into()));
        }
        let bucket =
            url.strip_prefix("gs://").ok_or_else(|| anyhow::anyhow!("{url}: expected gs://bucket or file:///dir"))?;
        let mut config = ClientConfig::default();
        if let Some(ep) = &output.endpoint {
            config.storage_endpoint = ep.trim_end_matches('/').to_string();
        }
        let config = if output.anonymous {
            config.anonymous()
        } else if let Some(file) = &output.credentials_file {
            let path = file.display().to_string();
            let credentials = CredentialsFile::new_from_file(path.clone())
                .await
                .map_err(|e| anyhow::anyhow!("output.credentials_file = {path}: {e}"))?;
            config
                .with_credentials(credentials)
                .await
                .map_err(|e| anyhow::anyhow!("output.credentials_file = {path}: {e}"))?
        } else {
            config.with_auth().await.map_err(|e| {
                anyhow::anyhow!(
                    "GCS Application Default Credentials (GOOGLE_APPLICATION_CREDENTIALS, gcloud's ADC file, or the metadata server): {e}; set output.credentials_file, or output.anonymous = true for an emulator"
                )
            })?
        };
        Ok(Store::Gcs { client: Box::new(Client::new(config)), bucket: bucket.trim_end_matches('/').to_string() })
    }

    pub fn describe(&self, key: &str) -> String {
        match self {
            Store::Gcs { bucket, .. } => format!("gs://{bucket}/{key}"),
            Store::Dir(dir) => dir.join(key).display().to_string(),
        }
    }

    /// Uploads with a CRC32C the server verifies, so a corrupted upload fails instead of landing.
    pub async fn put(
        &self,
        key: &str,
        body: Vec<u8>,
        content_type: &str,
        metadata: HashMap<String, String>,
    ) -> anyhow::Result<()> {
        self.put_inner(key, body, content_type, metadata, None).await.map(|_| ())
    }

    /// Writes only if the object is as `expect` says; returns the new generation. A mismatch is a
    /// [`Fenced`] error.
    pub async fn put_if(&self, key: &str, body: Vec<u8>, content_type: &str, expect: Expect) -> anyhow::Result<i64> {
        self.put_inner(key, body, content_type, HashMap::new(), Some(expect)).await
    }

    async fn put_inner(
        &self,
        key: &str,
        body: Vec<u8>,
        content_type: &str,
        metadata: HashMap<String, String>,
        expect: Option<Expect>,
    ) -> anyhow::Result<i64> {
        match self {
            Store::Gcs { client, bucket } => {
                let crc = crc32c::crc32c(&body);
                use base64::Engine as _;
                let object = Object {
                    name: key.to_string(),
                    content_type: Some(content_type.to_string()),
                    crc32c: Some(base64::engine::general_purpose::STANDARD.encode(crc.to_be_bytes())),
                    metadata: Some(metadata),
                    ..Default::default()
                };
                let req = UploadObjectRequest {
                    bucket: bucket.clone(),
                    if_generation_match: expect.map(|e| match e {
                        Expect::Absent => 0,
                        Expect::Generation(g) => g,
                    }),
                    ..Default::default()
                };
                match client.upload_object(&req, body, &UploadType::Multipart(Box::new(object))).await {
                    Ok(o) => Ok(o.generation),
                    Err(e) if expect.is_some() && status_of(&e) == Some(412) => Err(Fenced(self.describe(key)).into()),
                    Err(e) => Err(anyhow::Error::new(e).context(format!("upload {}", self.describe(key)))),
                }
            }
            Store::Dir(dir) => {
                let dir = dir.clone();
                let key = key.to_string();
                let described = self.describe(&key);
                tokio::task::spawn_blocking(move || {
                    let meta_dir = dir.join(".meta");
                    let generation_path = meta_dir.join(format!("{key}.generation"));
                    // The lock makes read-compare-write one step for every process sharing the
                    // directory.
                    let lock = open_lock(&meta_dir.join(format!("{key}.lock")))?;
                    lock.lock()?;
                    let current = read_generation(&generation_path);
                    let allowed = match expect {
                        None => true,
                        Some(Expect::Absent) => current.is_none(),
                        Some(Expect::Generation(g)) => current == Some(g),
                    };
                    if !allowed {
                        return Err(Fenced(described).into());
                    }
                    let next = current.unwrap_or(0) + 1;
                    tron_service::fs::write_atomically(&dir.join(&key), &body)?;
                    let meta = serde_json::to_vec(&metadata)?;
                    tron_service::fs::write_atomically(&meta_dir.join(format!("{key}.json")), &meta)?;
                    tron_service::fs::write_atomically(&generation_path, next.to_string().as_bytes())?;
                    Ok(next)
                })
                .await?
            }
        }
    }

    /// The object and its generation (for a later [`Store::put_if`]).
    pub async fn get_versioned(&self, key: &str) -> anyhow::Result<Option<(Vec<u8>, i64)>> {
        match self {
            Store::Gcs { client, bucket } => {
                // Metadata first, then that exact generation: a write in between makes the download
                // miss, and the pair is read again.
                for _ in 0..5 {
                    let req =
                        GetObjectRequest { bucket: bucket.clone(), object: key.to_string(), ..Default::default() };
                    let generation = match client.get_object(&req).await {
                        Ok(o) => o.generation,
                        Err(e) if status_of(&e) == Some(404) => return Ok(None),
                        Err(e) => return Err(anyhow::Error::new(e).context(format!("stat {}", self.describe(key)))),
                    };
                    let req = GetObjectRequest { if_generation_match: Some(generation), ..req };
                    match client.download_object(&req, &Range::default()).await {
                        Ok(bytes) => return Ok(Some((bytes, generation))),
                        Err(e) if matches!(status_of(&e), Some(404 | 412)) => continue,
                        Err(e) => return Err(anyhow::Error::new(e).context(format!("download {}", self.describe(key)))),
                    }
                }
                anyhow::bail!("{}: changed five times while being read", self.describe(key))
            }
            Store::Dir(dir) => {
                let meta_dir = dir.join(".meta");
                let lock = open_lock(&meta_dir.join(format!("{key}.lock")))?;
                lock.lock_shared()?;
                let generation = read_generation(&meta_dir.join(format!("{key}.generation")));
                match (std::fs::read(dir.join(key)), generation) {
                    (Ok(b), Some(g)) => Ok(Some((b, g))),
                    (Ok(b), None) => Ok(Some((b, 0))),
                    (Err(e), _) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                    (Err(e), _) => Err(anyhow::anyhow!("{}: {e}", dir.join(key).display())),
                }
            }
        }
    }

    pub async fn get(&self, key: &str) -> anyhow::Result<Option<Vec<u8>>> {
        match self {
            Store::Gcs { client, bucket } => {
                let req = GetObjectRequest { bucket: bucket.clone(), object: key.to_string(), ..Default::default() };
                match client.download_object(&req, &Range::default()).await {
                    Ok(bytes) => Ok(Some(bytes)),
                    Err(gcloud_storage::http::Error::Response(e)) if e.code == 404 => Ok(None),
                    Err(gcloud_storage::http::Error::HttpClient(e)) if e.status().map(|s| s.as_u16()) == Some(404) => {
                        Ok(None)
                    }
                    Err(e) => Err(anyhow::anyhow!("download {}: {e}", self.describe(key))),
                }
            }
            Store::Dir(dir) => match std::fs::read(dir.join(key)) {
                Ok(b) => Ok(Some(b)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(anyhow::anyhow!("{}: {e}", dir.join(key).display())),
            },
        }
    }

    /// Every object under `prefix` with its size and custom metadata.
    pub async fn list(&self, prefix: &str) -> anyhow::Result<Vec<Listed>> {
        match self {
            Store::Gcs { client, bucket } => {
                let mut out = Vec::new();
                let mut page_token = None;
                loop {
                    let req = ListObjectsRequest {
                        bucket: bucket.clone(),
                        prefix: Some(prefix.to_string()),
                        page_token,
                        ..Default::default()
                    };
                    let resp = client
                        .list_objects(&req)
                        .await
                        .map_err(|e| anyhow::anyhow!("list {}: {e}", self.describe(prefix)))?;
                    for o in resp.items.unwrap_or_default() {
                        out.push(Listed {
                            name: o.name,
                            size: o.size.max(0) as u64,
                            metadata: o.metadata.unwrap_or_default(),
                            created_ms: o.time_created.map(|t| (t.unix_timestamp_nanos() / 1_000_000) as i64),
                        });
                    }
                    match resp.next_page_token {
                        Some(t) if !t.is_empty() => page_token = Some(t),
                        _ => break,
                    }
                }
                Ok(out)
            }
            Store::Dir(dir) => {
                let dir = dir.clone();
                let prefix = prefix.to_string();
                Ok(tokio::task::spawn_blocking(move || list_dir(&dir, &prefix)).await??)
            }
        }
    }
}

fn list_dir(root: &Path, prefix: &str) -> anyhow::Result<Vec<Listed>> {
    // Start from the deepest directory the prefix names, then filter by the full prefix.
    let start = match prefix.rfind('/') {
        Some(i) => root.join(&prefix[..i]),
        None => root.to_path_buf(),
    };
    let mut out = Vec::new();
    let mut stack = vec![start];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = path.strip_prefix(root).unwrap_or(&path).to_string_lossy().into_owned();
            if name.starts_with(".meta") {
                continue;
            }
            if path.is_dir() {
                stack.push(path);
            } else if name.starts_with(prefix) && !name.ends_with(".tmp") {
                let metadata = std::fs::read(root.join(".meta").join(format!("{name}.json")))
                    .ok()
                    .and_then(|b| serde_json::from_slice(&b).ok())
                    .unwrap_or_default();
                let stat = entry.metadata().ok();
                let size = stat.as_ref().map_or(0, |m| m.len());
                let created_ms = stat
                    .and_then(|m| m.modified().ok())
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map(|d| d.as_millis() as i64);
                out.push(Listed { name, size, metadata, created_ms });
            }
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

fn open_lock(path: &Path) -> anyhow::Result<std::fs::File> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

fn read_generation(path: &Path) -> Option<i64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_conditional_write_fails_once_someone_else_wrote() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::Dir(dir.path().to_path_buf());
        assert!(store.get_versioned("s/0.json").await.unwrap().is_none());
        let g1 = store.put_if("s/0.json", b"a".to_vec(), "application/json", Expect::Absent).await.unwrap();
        let err = store.put_if("s/0.json", b"b".to_vec(), "application/json", Expect::Absent).await.unwrap_err();
        assert!(err.downcast_ref::<Fenced>().is_some(), "{err:#}");
        let (body, g) = store.get_versioned("s/0.json").await.unwrap().unwrap();
        assert_eq!((body.as_slice(), g), (&b"a"[..], g1));
        // A new owner takes over; the old owner's write at its last generation is refused.
        let g2 = store.put_if("s/0.json", b"new".to_vec(), "application/json", Expect::Generation(g1)).await.unwrap();
        assert!(g2 > g1);
        let err = store.put_if("s/0.json", b"old".to_vec(), "application/json", Expect::Generation(g1)).await;
        assert!(err.unwrap_err().downcast_ref::<Fenced>().is_some());
        assert_eq!(store.get("s/0.json").await.unwrap().unwrap(), b"new");
        // Listing skips the bookkeeping files.
        let listed = store.list("s/").await.unwrap();
        assert_eq!(listed.iter().map(|l| l.name.as_str()).collect::<Vec<_>>(), ["s/0.json"]);
    }
}
