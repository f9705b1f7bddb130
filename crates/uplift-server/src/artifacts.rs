//! Chunk storage behind a small trait: a local content-addressed directory by
//! default, object storage later. Chunks are immutable and named by the
//! SHA-256 of their uncompressed bytes, so a name always means the same bytes.

use async_trait::async_trait;
use bytes::Bytes;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncSeekExt};
use uplift_proto::{ChunkHash, ErrorKind};

#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("chunk store I/O failed on {path}: {source}; check free space and permissions of the data directory")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl ArtifactError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            ArtifactError::Io { .. } => ErrorKind::Storage,
        }
    }
}

pub type ChunkRead = Pin<Box<dyn AsyncRead + Send>>;

#[async_trait]
pub trait ArtifactStore: Send + Sync + std::fmt::Debug {
    /// Stored (compressed) size of a chunk, or `None` if absent.
    async fn stored_len(&self, hash: &ChunkHash) -> Result<Option<u64>, ArtifactError>;
    /// Stores a chunk whose content the caller has already verified against its name.
    async fn put(&self, hash: &ChunkHash, stored: Bytes) -> Result<(), ArtifactError>;
    /// Reads `len` stored bytes from `offset`; `None` if the chunk is absent.
    async fn read(
        &self,
        hash: &ChunkHash,
        offset: u64,
        len: u64,
    ) -> Result<Option<ChunkRead>, ArtifactError>;
}

#[derive(Debug, Clone)]
pub struct LocalArtifacts {
    root: PathBuf,
}

impl LocalArtifacts {
    pub fn new(root: PathBuf) -> Self {
        Self { root }
    }

    fn path_of(&self, hash: &ChunkHash) -> PathBuf {
        // ChunkHash is 64 hex digits by construction, so this cannot escape root.
        let hex = hash.to_hex();
        self.root.join(&hex[..2]).join(format!("{hex}.zst"))
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ArtifactError + '_ {
    move |source| ArtifactError::Io {
        path: path.to_owned(),
        source,
    }
}

#[async_trait]
impl ArtifactStore for LocalArtifacts {
    async fn stored_len(&self, hash: &ChunkHash) -> Result<Option<u64>, ArtifactError> {
        let path = self.path_of(hash);
        match tokio::fs::metadata(&path).await {
            Ok(meta) => Ok(Some(meta.len())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(&path)(e)),
        }
    }

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

    async fn read(
        &self,
        hash: &ChunkHash,
        offset: u64,
        len: u64,
    ) -> Result<Option<ChunkRead>, ArtifactError> {
        let path = self.path_of(hash);
        let mut f = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(&path)(e)),
        };
        f.seek(std::io::SeekFrom::Start(offset))
            .await
            .map_err(io(&path))?;
        Ok(Some(Box::pin(f.take(len))))
    }
}

/// Temp file, full write, fsync, rename: a reader sees the whole chunk or none.
fn write_chunk_atomically(path: &Path, stored: &[u8]) -> Result<(), ArtifactError> {
    use std::io::Write;
    let dir = path.parent().expect("chunk paths have a parent");
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    // Unique temp name: two concurrent uploads of one chunk must not interleave.
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", rand::random::<u64>()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(stored).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        std::fs::rename(&tmp, path).map_err(io(path))?;
        // The release row that will reference this chunk is durable in the
        // database; the chunk's name must be too.
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io(dir))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stored_chunks_read_back_by_range() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalArtifacts::new(dir.path().to_owned());
        let hash: ChunkHash = "ab".repeat(32).parse().unwrap();
        assert_eq!(store.stored_len(&hash).await.unwrap(), None);
        store
            .put(&hash, Bytes::from_static(b"0123456789"))
            .await
            .unwrap();
        assert_eq!(store.stored_len(&hash).await.unwrap(), Some(10));
        let mut out = Vec::new();
        store
            .read(&hash, 3, 4)
            .await
            .unwrap()
            .unwrap()
            .read_to_end(&mut out)
            .await
            .unwrap();
        assert_eq!(out, b"3456");
    }
}
