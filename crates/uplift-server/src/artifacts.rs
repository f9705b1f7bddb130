//! Chunk storage behind a small trait: a local content-addressed directory by
//! default, or S3-compatible object storage ([`crate::s3`]). Chunks are
//! immutable and named by the SHA-256 of their uncompressed bytes, so a name
//! always means the same bytes.

use async_trait::async_trait;
use bytes::Bytes;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use uplift_proto::{ChunkHash, ErrorKind, Version};

#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("chunk store I/O failed on {path}: {source}; check free space and permissions of the data directory")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "object store request {op} {key} failed: {source}; check that the object store is up and \
         reachable from the server and that [artifacts] names the right endpoint, bucket and credentials"
    )]
    Object {
        op: &'static str,
        key: String,
        #[source]
        source: object_store::Error,
    },
}

impl ArtifactError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            ArtifactError::Io { .. } => ErrorKind::Storage,
            ArtifactError::Object { .. } => ErrorKind::ObjectStoreUnavailable,
        }
    }
}

/// Identifies one stored version of a chunk's file: if any part changes, the
/// bytes may have, and a check made before no longer holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fingerprint {
    pub len: u64,
    pub modified_ns: i128,
    /// The file's inode, or a digest of the object's ETag.
    pub identity: u64,
}

#[async_trait]
pub trait ArtifactStore: Send + Sync + std::fmt::Debug {
    /// Stores a chunk whose content the caller has already verified against its name.
    async fn put(&self, hash: &ChunkHash, stored: Bytes) -> Result<(), ArtifactError>;
    /// The whole stored chunk and the fingerprint of what was read; `None`
    /// if absent. At most `limit` bytes are read: a longer file is damaged.
    async fn read_all(
        &self,
        hash: &ChunkHash,
        limit: u64,
    ) -> Result<Option<(Bytes, Fingerprint)>, ArtifactError>;
    /// [`read_all`](Self::read_all) of several chunks at once, in order:
    /// one trip to the blocking pool instead of one per chunk.
    async fn read_many(
        &self,
        hashes: &[ChunkHash],
        limit: u64,
    ) -> Vec<Result<Option<(Bytes, Fingerprint)>, ArtifactError>>;
    /// Moves a damaged chunk out of the way (kept for a post-mortem), so it
    /// counts as absent and the next upload stores a good copy; only if the
    /// file is still the one `read` describes (a repair that landed since
    /// stays). Returns whether it moved it.
    async fn quarantine(&self, hash: &ChunkHash, read: &Fingerprint)
        -> Result<bool, ArtifactError>;
    /// The fingerprint of what is stored now, without reading it; `None`
    /// if absent.
    async fn current(&self, hash: &ChunkHash) -> Result<Option<Fingerprint>, ArtifactError>;
    /// A short-lived URL devices may GET the stored object from, without
    /// the server, when the store offers one and direct downloads are on.
    async fn direct_url(&self, _hash: &ChunkHash) -> Result<Option<url::Url>, ArtifactError> {
        Ok(None)
    }
    /// Keeps a taken-in release's signed manifest (and chunk index) where
    /// a fleet's tooling can fetch them by version. The database holds the
    /// manifest in any case; a local directory needs no second copy.
    async fn publish_release(
        &self,
        _version: &Version,
        _manifest_json: Bytes,
        _index: Option<Bytes>,
    ) -> Result<(), ArtifactError> {
        Ok(())
    }
}

/// The stores of each kind of stored object, as `[artifacts]` configures them.
#[derive(Debug, Clone)]
pub struct Stores {
    pub chunks: Arc<dyn ArtifactStore>,
    pub patches: Arc<dyn ArtifactStore>,
    pub indexes: Arc<dyn ArtifactStore>,
}

impl Stores {
    /// The local directories under `data_dir` by default; the configured
    /// bucket with `backend = "s3"`.
    pub fn open(
        config: &crate::config::ArtifactsConfig,
        data_dir: &Path,
    ) -> Result<Self, ArtifactError> {
        Ok(match config.backend {
            crate::config::Backend::Local => Self {
                chunks: Arc::new(LocalArtifacts::new(data_dir.join("chunks"))),
                patches: Arc::new(LocalArtifacts::new(data_dir.join("patches"))),
                indexes: Arc::new(LocalArtifacts::new(data_dir.join("indexes"))),
            },
            crate::config::Backend::S3 => {
                let bucket = crate::s3::Bucket::open(config)?;
                Self {
                    chunks: Arc::new(bucket.store("chunks")),
                    patches: Arc::new(bucket.store("patches")),
                    indexes: Arc::new(bucket.store("indexes")),
                }
            }
        })
    }
}

#[derive(Debug, Clone)]
pub struct LocalArtifacts {
    root: PathBuf,
}

impl LocalArtifacts {
    pub fn new(root: PathBuf) -> Self {
        Self { root }
    }

    fn quarantine_dir(&self) -> PathBuf {
        self.root.join("damaged")
    }

    fn path_of(&self, hash: &ChunkHash) -> PathBuf {
        // ChunkHash is 64 hex digits by construction, so this cannot escape root.
        let hex = hash.to_hex();
        self.root.join(&hex[..2]).join(format!("{hex}.zst"))
    }
}

/// A whole file and the fingerprint of the handle read, within `limit` + 1
/// bytes (so a longer file shows as too long); `None` if absent.
fn read_file(path: &Path, limit: u64) -> Result<Option<(Bytes, Fingerprint)>, ArtifactError> {
    let f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(path)(e)),
    };
    // The fingerprint of the open file: a rename over it afterwards (a
    // repair) does not change what this handle reads.
    let meta = f.metadata().map_err(io(path))?;
    let mut bytes = Vec::with_capacity(meta.len().min(limit + 1) as usize);
    std::io::Read::read_to_end(&mut std::io::Read::take(f, limit + 1), &mut bytes)
        .map_err(io(path))?;
    Ok(Some((Bytes::from(bytes), fingerprint(&meta))))
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ArtifactError + '_ {
    move |source| ArtifactError::Io {
        path: path.to_owned(),
        source,
    }
}

#[async_trait]
impl ArtifactStore for LocalArtifacts {
    async fn put(&self, hash: &ChunkHash, stored: Bytes) -> Result<(), ArtifactError> {
        let path = self.path_of(hash);
        // Blocking std I/O on purpose: tokio's File hands writes to a
        // background task and `sync_all` does not report a failed write
        // (e.g. a full disk), which once let truncated chunks be renamed
        // into place under their content name.
        let target = path.clone();
        tokio::task::spawn_blocking(move || write_chunk_atomically(&target, &stored))
            .await
            .map_err(|e| ArtifactError::Io {
                path,
                source: std::io::Error::other(e),
            })?
    }

    async fn read_all(
        &self,
        hash: &ChunkHash,
        limit: u64,
    ) -> Result<Option<(Bytes, Fingerprint)>, ArtifactError> {
        let mut read = self.read_many(std::slice::from_ref(hash), limit).await;
        read.pop().expect("one result per chunk")
    }

    async fn read_many(
        &self,
        hashes: &[ChunkHash],
        limit: u64,
    ) -> Vec<Result<Option<(Bytes, Fingerprint)>, ArtifactError>> {
        let paths: Vec<PathBuf> = hashes.iter().map(|h| self.path_of(h)).collect();
        // One hop to the blocking pool for opening, stating and reading them
        // all: tokio::fs takes one per call, and on the download path those
        // hand-offs cost more than the reads (perf: a third of the server's
        // samples were context switches).
        let read = tokio::task::spawn_blocking(move || {
            paths
                .iter()
                .map(|path| read_file(path, limit))
                .collect::<Vec<_>>()
        })
        .await;
        match read {
            Ok(read) => read,
            Err(e) => hashes
                .iter()
                .map(|h| {
                    Err(ArtifactError::Io {
                        path: self.path_of(h),
                        source: std::io::Error::other(e.to_string()),
                    })
                })
                .collect(),
        }
    }

    async fn current(&self, hash: &ChunkHash) -> Result<Option<Fingerprint>, ArtifactError> {
        let path = self.path_of(hash);
        match tokio::fs::metadata(&path).await {
            Ok(meta) => Ok(Some(fingerprint(&meta))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(&path)(e)),
        }
    }

    async fn quarantine(
        &self,
        hash: &ChunkHash,
        read: &Fingerprint,
    ) -> Result<bool, ArtifactError> {
        let path = self.path_of(hash);
        match tokio::fs::metadata(&path).await {
            Ok(meta) if fingerprint(&meta) == *read => {}
            Ok(_) => return Ok(false),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(io(&path)(e)),
        }
        let dir = self.quarantine_dir();
        tokio::fs::create_dir_all(&dir).await.map_err(io(&dir))?;
        let stamp = time::OffsetDateTime::now_utc().unix_timestamp_nanos();
        let to = dir.join(format!("{}.zst.{stamp}", hash.to_hex()));
        match tokio::fs::rename(&path, &to).await {
            Ok(()) => Ok(true),
            // Someone else moved it first.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io(&path)(e)),
        }
    }
}

fn fingerprint(meta: &std::fs::Metadata) -> Fingerprint {
    use std::os::unix::fs::MetadataExt;
    Fingerprint {
        len: meta.len(),
        modified_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
        identity: meta.ino(),
    }
}

/// A reader sees the whole chunk or none, and once the release row that
/// references it is durable in the database, so is the chunk's name.
fn write_chunk_atomically(path: &Path, stored: &[u8]) -> Result<(), ArtifactError> {
    let dir = path.parent().expect("chunk paths have a parent");
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    uplift_files::replace_file(path, stored, uplift_files::Access::Public).map_err(io(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stored_chunks_read_back_with_a_fingerprint_of_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalArtifacts::new(dir.path().to_owned());
        let hash: ChunkHash = "ab".repeat(32).parse().unwrap();
        assert!(store.read_all(&hash, 100).await.unwrap().is_none());
        store
            .put(&hash, Bytes::from_static(b"0123456789"))
            .await
            .unwrap();
        // A file longer than the limit is read one byte past it, not whole.
        let (cut, _) = store.read_all(&hash, 4).await.unwrap().unwrap();
        assert_eq!(cut.as_ref(), b"01234");
        let (all, first) = store.read_all(&hash, 100).await.unwrap().unwrap();
        assert_eq!(all.as_ref(), b"0123456789");
        // Rewritten in place with the same length: another fingerprint.
        std::thread::sleep(std::time::Duration::from_millis(10));
        let path = store.path_of(&hash);
        std::fs::write(&path, b"01234x6789").unwrap();
        let (_, second) = store.read_all(&hash, 100).await.unwrap().unwrap();
        assert_ne!(first, second);
        assert!(
            !store.quarantine(&hash, &first).await.unwrap(),
            "a file changed since it was read (a repair) is not set aside"
        );
        assert!(store.quarantine(&hash, &second).await.unwrap());
        assert!(store.read_all(&hash, 100).await.unwrap().is_none());
        assert_eq!(
            std::fs::read_dir(dir.path().join("damaged"))
                .unwrap()
                .count(),
            1,
            "the damaged copy is kept aside"
        );
    }
}
