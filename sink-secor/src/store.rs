//! Where finished objects go: GCS (JSON API) or a local directory standing in for it.

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
}

pub enum Store {
    Gcs { client: Box<Client>, bucket: String },
    Dir(PathBuf),
}

impl Store {
    /// `gs://bucket` or `file:///dir`. `endpoint` points the GCS client at an emulator (no auth).
    pub async fn open(url: &str, endpoint: Option<&str>) -> anyhow::Result<Self> {
        if let Some(dir) = url.strip_prefix("file://") {
            std::fs::create_dir_all(dir).map_err(|e| anyhow::anyhow!("{dir}: cannot create: {e}"))?;
            return Ok(Store::Dir(dir.into()));
        }
        let bucket =
            url.strip_prefix("gs://").ok_or_else(|| anyhow::anyhow!("{url}: expected gs://bucket or file:///dir"))?;
        let config = match endpoint {
            Some(ep) => ClientConfig { storage_endpoint: ep.trim_end_matches('/').to_string(), ..Default::default() }
                .anonymous(),
            None => ClientConfig::default().with_auth().await.map_err(|e| {
                anyhow::anyhow!("GCS credentials (GOOGLE_APPLICATION_CREDENTIALS or metadata server): {e}")
            })?,
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
                let req = UploadObjectRequest { bucket: bucket.clone(), ..Default::default() };
                client
                    .upload_object(&req, body, &UploadType::Multipart(Box::new(object)))
                    .await
                    .map_err(|e| anyhow::anyhow!("upload {}: {e}", self.describe(key)))?;
                Ok(())
            }
            Store::Dir(dir) => {
                let dir = dir.clone();
                let key = key.to_string();
                tokio::task::spawn_blocking(move || {
                    write_atomically(&dir.join(&key), &body)?;
                    let meta = serde_json::to_vec(&metadata)?;
                    write_atomically(&dir.join(".meta").join(format!("{key}.json")), &meta)
                })
                .await?
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
                let size = entry.metadata().map(|m| m.len()).unwrap_or(0);
                out.push(Listed { name, size, metadata });
            }
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

fn write_atomically(path: &Path, body: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let tmp = PathBuf::from(format!("{}.tmp", path.display()));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(body)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}
