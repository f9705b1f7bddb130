//! Stored chunks are trusted only after checking. A chunk is served, or
//! counted as present for an upload, only once its stored bytes have been
//! decompressed and hashed against its name; the check is remembered for
//! that exact file (size, modification time, inode), so a file changed on
//! disk since is checked again, and the cost is paid once per chunk, not per
//! download. A chunk found damaged is moved to `chunks/damaged/`, reported
//! with the releases that hold it, and answered `stored_chunk_damaged` until
//! `uplift release upload` stores a good copy. `uplift-server check` scrubs
//! every stored release on demand, for damage nobody has downloaded yet.

use crate::artifacts::{ArtifactError, ArtifactStore, Fingerprint};
use crate::store::{ReleaseRecord, Store, StoreError};
use bytes::Bytes;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use uplift_proto::{ChunkHash, ErrorKind, Version};
use uplift_release::manifest::{SignedManifest, MAX_CHUNK_SIZE};

/// Largest stored (compressed) chunk: incompressible data grows a little.
pub const MAX_STORED_CHUNK: usize = MAX_CHUNK_SIZE as usize + MAX_CHUNK_SIZE as usize / 8 + 1024;

#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    #[error(
        "chunk {hash} is damaged on the server's disk ({detail}); the server set it aside in chunks/damaged/ \
         and serves it to no device; repair it with `uplift release upload` of a release that holds it"
    )]
    Damaged { hash: ChunkHash, detail: String },
    #[error(transparent)]
    Artifact(#[from] ArtifactError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("checking chunk {hash} failed: {detail}")]
    Check { hash: ChunkHash, detail: String },
}

impl ChunkError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            ChunkError::Damaged { .. } => ErrorKind::StoredChunkDamaged,
            ChunkError::Artifact(e) => e.kind(),
            ChunkError::Store(e) => e.kind(),
            ChunkError::Check { .. } => ErrorKind::Internal,
        }
    }
}

/// What a store holds: chunks are named by the digest of what they
/// decompress to, patches by the digest of their stored bytes (the server
/// cannot apply them: it need not hold their bases).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoredKind {
    Chunk,
    Patch,
    /// A release's binary chunk list, named by its digest.
    Index,
}

impl StoredKind {
    /// Whether `stored` really is the object named `hash`: the pure check, no I/O.
    pub fn check(self, hash: &ChunkHash, stored: &[u8]) -> Result<(), String> {
        match self {
            StoredKind::Chunk => check_stored(hash, stored),
            StoredKind::Patch => check_patch(hash, stored),
            StoredKind::Index => check_digest(hash, stored),
        }
    }

    /// The largest file of this kind read whole.
    pub fn limit(self) -> u64 {
        match self {
            StoredKind::Chunk | StoredKind::Patch => MAX_STORED_CHUNK as u64,
            StoredKind::Index => {
                uplift_release::index::MAX_CHUNKS * uplift_release::index::RECORD_BYTES as u64
            }
        }
    }

    pub fn noun(self) -> &'static str {
        match self {
            StoredKind::Chunk => "chunk",
            StoredKind::Patch => "patch",
            StoredKind::Index => "chunk index",
        }
    }

    /// Its names in a release.
    fn of(self, manifest: &uplift_release::Manifest) -> Vec<ChunkHash> {
        match self {
            StoredKind::Chunk => manifest.chunks.iter().map(|c| c.hash).collect(),
            StoredKind::Patch => manifest.patches.iter().map(|p| p.hash).collect(),
            StoredKind::Index => manifest.chunk_index.iter().map(|i| i.sha256).collect(),
        }
    }
}

/// Whether `stored` really is chunk `hash`: the pure check, no I/O.
pub fn check_stored(hash: &ChunkHash, stored: &[u8]) -> Result<(), String> {
    uplift_release::chunk::decode_named_chunk(hash, stored, MAX_CHUNK_SIZE)
        .map(drop)
        .map_err(|e| e.to_string())
}

/// Whether `stored` really is patch `hash`.
pub fn check_patch(hash: &ChunkHash, stored: &[u8]) -> Result<(), String> {
    if stored.len() > MAX_STORED_CHUNK {
        return Err(format!(
            "the patch is {} bytes, more than any patch of a chunk of at most {MAX_CHUNK_SIZE} bytes",
            stored.len()
        ));
    }
    check_digest(hash, stored)
}

fn check_digest(hash: &ChunkHash, stored: &[u8]) -> Result<(), String> {
    let actual = uplift_release::sha256(stored);
    if actual != *hash {
        return Err(format!("its bytes have sha256 {actual}"));
    }
    Ok(())
}

/// Why a stored release's manifest cannot be read whole.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("the manifest of {version} is unreadable: {source}; upload the release again")]
    Manifest {
        version: String,
        #[source]
        source: uplift_release::ReleaseError,
    },
    #[error("the chunk index {hash} of {version} is not on the server; upload the release again")]
    IndexMissing { version: String, hash: ChunkHash },
    #[error(transparent)]
    Chunk(#[from] ChunkError),
}

impl LoadError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            LoadError::Manifest { source, .. } => source.kind(),
            LoadError::IndexMissing { .. } => ErrorKind::Conflict,
            LoadError::Chunk(e) => e.kind(),
        }
    }
}

/// A signed manifest's content with its chunk list, from the index store
/// when the list is in a separate index; signatures are the devices' job.
pub async fn load_manifest(
    indexes: &Chunks,
    json: &[u8],
) -> Result<uplift_release::Manifest, LoadError> {
    let parsed = SignedManifest::from_json(json).and_then(|signed| signed.parse_unverified());
    let mut manifest = parsed.map_err(|source| LoadError::Manifest {
        version: "a release".to_owned(),
        source,
    })?;
    if let Some(reference) = manifest.chunk_index.filter(|_| manifest.needs_index()) {
        let version = manifest.version.to_string();
        let index = indexes
            .read_verified(&reference.sha256)
            .await?
            .ok_or_else(|| LoadError::IndexMissing {
                version: version.clone(),
                hash: reference.sha256,
            })?;
        manifest
            .attach_index(&index)
            .map_err(|source| LoadError::Manifest { version, source })?;
    }
    Ok(manifest)
}

/// The chunks (patches, index) of a stored release, from its manifest and
/// (for chunks) its index in `indexes`.
async fn stored_of(
    kind: StoredKind,
    indexes: Option<&Chunks>,
    release: &ReleaseRecord,
) -> Result<Vec<ChunkHash>, String> {
    let unreadable = |e: &dyn std::fmt::Display| {
        format!("stored manifest of {} is unreadable: {e}", release.version)
    };
    let manifest = match (kind, indexes) {
        (StoredKind::Chunk, Some(indexes)) => load_manifest(indexes, &release.manifest_json)
            .await
            .map_err(|e| unreadable(&e))?,
        _ => SignedManifest::from_json(&release.manifest_json)
            .and_then(|signed| signed.parse_unverified())
            .map_err(|e| unreadable(&e))?,
    };
    Ok(kind.of(&manifest))
}

#[derive(Debug)]
pub struct Chunks {
    kind: StoredKind,
    /// Where the chunk lists of releases with a binary index are (chunk
    /// stores only: to say which releases a damaged chunk breaks).
    indexes: Option<Arc<Chunks>>,
    artifacts: Arc<dyn ArtifactStore>,
    store: Arc<dyn Store>,
    /// Files checked and found good, by what they were when checked.
    verified: Mutex<HashMap<ChunkHash, Fingerprint>>,
    /// Chunks found damaged since the server started, and what was wrong.
    damaged: Mutex<HashMap<ChunkHash, String>>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Plain maps: still consistent after a panic elsewhere.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Chunks {
    pub fn new(
        artifacts: Arc<dyn ArtifactStore>,
        store: Arc<dyn Store>,
        indexes: Arc<Chunks>,
    ) -> Self {
        Self::of_kind(StoredKind::Chunk, artifacts, store, Some(indexes))
    }

    /// A store of patches, checked by the digest of their bytes.
    pub fn patches(artifacts: Arc<dyn ArtifactStore>, store: Arc<dyn Store>) -> Self {
        Self::of_kind(StoredKind::Patch, artifacts, store, None)
    }

    /// A store of chunk indexes, checked by the digest of their bytes.
    pub fn indexes(artifacts: Arc<dyn ArtifactStore>, store: Arc<dyn Store>) -> Self {
        Self::of_kind(StoredKind::Index, artifacts, store, None)
    }

    fn of_kind(
        kind: StoredKind,
        artifacts: Arc<dyn ArtifactStore>,
        store: Arc<dyn Store>,
        indexes: Option<Arc<Chunks>>,
    ) -> Self {
        Self {
            kind,
            indexes,
            artifacts,
            store,
            verified: Mutex::default(),
            damaged: Mutex::default(),
        }
    }

    /// The stored chunk, checked; `None` if the server does not have it.
    pub async fn read_verified(&self, hash: &ChunkHash) -> Result<Option<Bytes>, ChunkError> {
        let stored = self.artifacts.read_all(hash, self.kind.limit()).await?;
        self.verified_read(hash, stored).await
    }

    /// A short-lived URL of the stored object for a device to download
    /// directly, when the store offers them (`direct_downloads`); `None`
    /// otherwise. Only an object checked good is handed out: what is
    /// stored now must be what was checked (asked of the store, without
    /// reading it), or it is read and checked first, and a damaged one is
    /// set aside as when served. The store may change between this check
    /// and the device's download; the device hashes every chunk it gets,
    /// and its next request, finding another fingerprint, checks again.
    pub async fn direct_url(&self, hash: &ChunkHash) -> Result<Option<url::Url>, ChunkError> {
        let Some(url) = self.artifacts.direct_url(hash).await? else {
            return Ok(None);
        };
        let current = self.artifacts.current(hash).await?;
        let checked = current.is_some_and(|now| lock(&self.verified).get(hash) == Some(&now));
        if !checked && self.read_verified(hash).await?.is_none() {
            return Ok(None);
        }
        Ok(Some(url))
    }

    /// [`read_verified`](Self::read_verified) of several chunks, read in
    /// one go, in order.
    pub async fn read_verified_many(
        &self,
        hashes: &[ChunkHash],
    ) -> Vec<Result<Option<Bytes>, ChunkError>> {
        let stored = self.artifacts.read_many(hashes, self.kind.limit()).await;
        let mut checked = Vec::with_capacity(hashes.len());
        for (hash, stored) in hashes.iter().zip(stored) {
            checked.push(match stored {
                Ok(stored) => self.verified_read(hash, stored).await,
                Err(e) => Err(e.into()),
            });
        }
        checked
    }

    /// What was read of a chunk, served only once checked against its name
    /// (again whenever its file changed).
    async fn verified_read(
        &self,
        hash: &ChunkHash,
        stored: Option<(Bytes, Fingerprint)>,
    ) -> Result<Option<Bytes>, ChunkError> {
        let Some((bytes, fingerprint)) = stored else {
            // Set aside and not repaired yet: devices keep hearing why.
            return match lock(&self.damaged).get(hash) {
                Some(detail) => Err(ChunkError::Damaged {
                    hash: *hash,
                    detail: detail.clone(),
                }),
                None => Ok(None),
            };
        };
        if lock(&self.verified).get(hash) == Some(&fingerprint) {
            return Ok(Some(bytes));
        }
        let (name, check, kind) = (*hash, bytes.clone(), self.kind);
        let verdict = tokio::task::spawn_blocking(move || kind.check(&name, &check))
            .await
            .map_err(|e| ChunkError::Check {
                hash: *hash,
                detail: e.to_string(),
            })?;
        match verdict {
            Ok(()) => {
                lock(&self.verified).insert(*hash, fingerprint);
                lock(&self.damaged).remove(hash);
                Ok(Some(bytes))
            }
            Err(detail) => Err(self.set_aside(hash, &fingerprint, detail).await),
        }
    }

    /// Quarantines a damaged chunk and tells the operator which releases it breaks.
    async fn set_aside(&self, hash: &ChunkHash, read: &Fingerprint, detail: String) -> ChunkError {
        lock(&self.verified).remove(hash);
        match self.artifacts.quarantine(hash, read).await {
            Ok(true) => {
                lock(&self.damaged).insert(*hash, detail.clone());
            }
            // A good copy was uploaded meanwhile: this request still saw
            // damage, the next one gets the repaired chunk.
            Ok(false) => {}
            Err(e) => {
                lock(&self.damaged).insert(*hash, detail.clone());
                tracing::error!(chunk = %hash, "cannot set the damaged chunk aside: {e}");
            }
        }
        let releases = match self.releases_holding(hash).await {
            Ok(releases) if releases.is_empty() => "no stored release".to_owned(),
            Ok(releases) => releases
                .iter()
                .map(Version::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            Err(e) => format!("unknown ({e})"),
        };
        tracing::error!(
            chunk = %hash,
            releases = %releases,
            "stored chunk is damaged ({detail}); set aside in chunks/damaged/; \
             run `uplift release upload` of release {releases} to repair it"
        );
        ChunkError::Damaged {
            hash: *hash,
            detail,
        }
    }

    /// Boxed: finding them may read an index, whose check may find damage
    /// and ask this again (for the index store, which reads no index).
    fn releases_holding<'a>(
        &'a self,
        hash: &'a ChunkHash,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Vec<Version>, StoreError>> + Send + 'a>,
    > {
        Box::pin(async move {
            let mut holding = Vec::new();
            for release in self.store.list_releases().await? {
                if stored_of(self.kind, self.indexes.as_deref(), &release)
                    .await
                    .is_ok_and(|held| held.contains(hash))
                {
                    holding.push(release.version.clone());
                }
            }
            Ok(holding)
        })
    }

    /// The stored size of a chunk that is stored and checked; `None` if it
    /// is absent or damaged (a damaged copy is set aside, so an upload
    /// replaces it).
    pub async fn checked_len(&self, hash: &ChunkHash) -> Result<Option<u64>, ChunkError> {
        match self.read_verified(hash).await {
            Ok(found) => Ok(found.map(|bytes| bytes.len() as u64)),
            Err(ChunkError::Damaged { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Stores an uploaded chunk the caller has checked against its name.
    pub async fn store(&self, hash: &ChunkHash, checked: Bytes) -> Result<(), ChunkError> {
        self.artifacts.put(hash, checked).await?;
        lock(&self.damaged).remove(hash);
        Ok(())
    }

    /// How many of `release`'s chunks were found damaged (and not yet repaired).
    pub async fn damaged_in(&self, release: &ReleaseRecord) -> u64 {
        if lock(&self.damaged).is_empty() {
            return 0;
        }
        let chunks: HashSet<ChunkHash> = stored_of(self.kind, self.indexes.as_deref(), release)
            .await
            .unwrap_or_default()
            .into_iter()
            .collect();
        let damaged = lock(&self.damaged);
        chunks.iter().filter(|c| damaged.contains_key(c)).count() as u64
    }
}

/// What is wrong with one stored chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    Missing,
    Damaged(String),
}

/// The result of [`scrub`]: every chunk of every stored release, checked.
#[derive(Debug, Default)]
pub struct ScrubReport {
    pub releases: usize,
    pub chunks_checked: usize,
    /// By chunk: what is wrong, and the releases that need it.
    pub problems: BTreeMap<ChunkHash, (Problem, Vec<Version>)>,
    /// Releases whose stored manifest could not be read.
    pub unreadable: Vec<String>,
}

impl ScrubReport {
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty() && self.unreadable.is_empty()
    }

    /// What `uplift-server check` prints: one line per problem, then a summary.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for (hash, (problem, releases)) in &self.problems {
            let releases = releases
                .iter()
                .map(Version::to_string)
                .collect::<Vec<_>>()
                .join(", ");
            let what = match problem {
                Problem::Missing => "missing".to_owned(),
                Problem::Damaged(detail) => format!("damaged: {detail}"),
            };
            out.push_str(&format!(
                "chunk {hash} ({what}); needed by release {releases}\n"
            ));
        }
        for unreadable in &self.unreadable {
            out.push_str(&format!("{unreadable}\n"));
        }
        let bad: BTreeSet<&Version> = self.problems.values().flat_map(|(_, r)| r).collect();
        if self.is_clean() {
            out.push_str(&format!(
                "ok: {} chunks of {} releases checked, none missing or damaged\n",
                self.chunks_checked, self.releases
            ));
        } else {
            out.push_str(&format!(
                "{} of {} chunks missing or damaged, in {} of {} releases; repair each with \
                 `uplift release upload DIR` of its release directory\n",
                self.problems.len(),
                self.chunks_checked,
                bad.len(),
                self.releases
            ));
        }
        out
    }
}

/// Reads and checks every chunk and patch every stored release needs;
/// changes nothing.
pub async fn scrub(
    store: &dyn Store,
    chunks: &dyn ArtifactStore,
    patches: &dyn ArtifactStore,
    indexes: &Chunks,
) -> Result<ScrubReport, ChunkError> {
    let releases = store.list_releases().await?;
    let mut report = ScrubReport {
        releases: releases.len(),
        ..ScrubReport::default()
    };
    for (kind, artifacts) in [
        (StoredKind::Index, indexes.artifacts.as_ref()),
        (StoredKind::Chunk, chunks),
        (StoredKind::Patch, patches),
    ] {
        let mut needed: BTreeMap<ChunkHash, Vec<Version>> = BTreeMap::new();
        for release in &releases {
            match stored_of(kind, Some(indexes), release).await {
                Ok(held) => {
                    for hash in held {
                        let holders = needed.entry(hash).or_default();
                        if holders.last() != Some(&release.version) {
                            holders.push(release.version.clone());
                        }
                    }
                }
                // Said once, for the chunks.
                Err(e) if kind == StoredKind::Chunk => report.unreadable.push(e),
                Err(_) => {}
            }
        }
        for (hash, holders) in needed {
            report.chunks_checked += 1;
            let problem = match artifacts.read_all(&hash, kind.limit()).await? {
                None => Some(Problem::Missing),
                Some((bytes, _)) => {
                    let name = hash;
                    tokio::task::spawn_blocking(move || kind.check(&name, &bytes))
                        .await
                        .map_err(|e| ChunkError::Check {
                            hash,
                            detail: e.to_string(),
                        })?
                        .err()
                        .map(Problem::Damaged)
                }
            };
            if let Some(problem) = problem {
                report.problems.insert(hash, (problem, holders));
            }
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use uplift_release::{encode_chunk, sha256};

    #[test]
    fn a_stored_chunk_passes_only_if_it_is_what_its_name_says() {
        let data = b"some chunk data, some chunk data, some chunk data".repeat(20);
        let hash = sha256(&data);
        let stored = encode_chunk(&data).unwrap();
        assert_eq!(check_stored(&hash, &stored), Ok(()));
        // Same length, bytes flipped: what a bad sector or a stray write does.
        let mut flipped = stored.clone();
        let mid = flipped.len() / 2;
        flipped[mid] ^= 0xff;
        assert!(check_stored(&hash, &flipped).is_err());
        // Cut short, as a full disk leaves it.
        assert!(check_stored(&hash, &stored[..stored.len() - 3]).is_err());
        // Good data under another name.
        let other = sha256(b"another chunk");
        let err = check_stored(&other, &stored).unwrap_err();
        assert!(err.contains(&other.to_hex()), "{err}");
    }
}
