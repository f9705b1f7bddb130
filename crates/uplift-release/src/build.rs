//! Building a release from an image file, and the on-disk layout of a
//! release directory:
//!
//! ```text
//! <root>/manifest.json          signed manifest
//! <root>/chunks.idx             the chunk list, binary (see crate::index)
//! <root>/chunks/<sha256>.zst    one zstd frame per unique chunk
//! <root>/patches/<sha256>.zst   with --delta-from: patches, named by their own digest
//! ```

use crate::chunk::{decode_chunk, encode_chunk, max_stored_size, sha256, ImageHasher};
use crate::error::ReleaseError;
use crate::keys::ReleaseSigningKey;
use crate::manifest::{
    sign_manifest, ChunkEntry, Compression, ImageInfo, Manifest, PatchEntry, SignedManifest,
    MANIFEST_FORMAT, MAX_CHUNK_SIZE, MAX_MANIFEST_BYTES,
};
use crate::sparse::SparseReader;
use fastcdc::v2020::StreamCDC;
use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use time::format_description::well_known::Rfc3339;
use time::{Duration, OffsetDateTime, UtcOffset};
use uplift_proto::{ChunkHash, DeviceType, Version};

/// Content-defined chunking bounds. Boundaries follow the content, so an
/// edit only changes the chunks around it and devices fetch just those.
pub const CDC_MIN_SIZE: u32 = 16 * 1024;
pub const CDC_AVG_SIZE: u32 = 64 * 1024;
pub const CDC_MAX_SIZE: u32 = 256 * 1024;

pub const MANIFEST_FILE: &str = "manifest.json";
pub const INDEX_FILE: &str = "chunks.idx";
pub const CHUNKS_DIR: &str = "chunks";
pub const PATCHES_DIR: &str = "patches";
pub const DEFAULT_VALID_FOR: Duration = Duration::days(365);

#[derive(Debug, Clone)]
pub struct ReleaseOptions {
    pub version: Version,
    pub device_type: DeviceType,
    /// How long devices accept the manifest after `now`.
    pub valid_for: Duration,
    /// Creation time written to the manifest.
    pub now: OffsetDateTime,
    /// An older release (its directory or its image) to make patches
    /// against, for the chunks it lacks (see [`crate::delta`]).
    pub delta_from: Option<PathBuf>,
    /// The newest version the release may replace, when it may downgrade
    /// devices on newer versions (see [`Manifest::may_replace_up_to`]).
    pub may_replace_up_to: Option<Version>,
}

impl ReleaseOptions {
    /// Options valid for [`DEFAULT_VALID_FOR`] from the current time.
    pub fn new(version: Version, device_type: DeviceType) -> Self {
        Self {
            version,
            device_type,
            valid_for: DEFAULT_VALID_FOR,
            now: OffsetDateTime::now_utc(),
            delta_from: None,
            may_replace_up_to: None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ReleaseSummary {
    pub manifest: Manifest,
    pub manifest_path: PathBuf,
    /// Chunks in the image, repeats included.
    pub chunk_count: usize,
    /// Distinct chunks, i.e. chunk files the release needs.
    pub unique_chunks: usize,
    pub image_size: u64,
    /// Sum of stored sizes over all chunk entries (what a device with no
    /// chunks at all would download, if it fetched repeats again).
    pub stored_bytes: u64,
}

/// Chunks, compresses and signs `image` into `out_dir`. The image is read
/// as a stream, so its size is bounded by disk, not memory.
pub fn create_release(
    image: &Path,
    out_dir: &Path,
    opts: &ReleaseOptions,
    key: &ReleaseSigningKey,
) -> Result<ReleaseSummary, ReleaseError> {
    let (created_at, expires_at) = validity(opts)?;
    let file =
        std::fs::File::open(image).map_err(|e| ReleaseError::io("open the image", image, e))?;
    let dir = ReleaseDir::create(out_dir)?;
    let delta = opts
        .delta_from
        .as_deref()
        .map(crate::delta::DeltaBase::open)
        .transpose()?;
    let mut patches = Vec::new();

    let mut image_hasher = ImageHasher::new();
    // Stored size per chunk already written in this run: a repeated chunk
    // is neither compressed nor written twice.
    let mut stored: HashMap<ChunkHash, u32> = HashMap::new();
    let mut chunks = Vec::new();
    let reader =
        SparseReader::new(&file).map_err(|e| ReleaseError::io("read the image", image, e))?;
    for item in StreamCDC::new(reader, CDC_MIN_SIZE, CDC_AVG_SIZE, CDC_MAX_SIZE) {
        let chunk = item.map_err(|e| ReleaseError::io("read the image", image, e.into()))?;
        image_hasher.update(&chunk.data);
        let hash = sha256(&chunk.data);
        let size = u32::try_from(chunk.data.len())
            .ok()
            .filter(|s| *s <= MAX_CHUNK_SIZE)
            .expect("the chunker never exceeds CDC_MAX_SIZE");
        let stored_size = match stored.get(&hash) {
            Some(s) => *s,
            None => {
                let s = dir.store_chunk(&hash, &chunk.data)?;
                stored.insert(hash, s);
                if let Some(delta) = delta.as_ref().filter(|d| !d.holds(&hash)) {
                    if let Some(patch) = delta.patch_for(&chunk.data, s)? {
                        patches.push(dir.store_patch(hash, patch)?);
                    }
                }
                s
            }
        };
        chunks.push(ChunkEntry {
            hash,
            size,
            stored_size,
        });
    }
    if chunks.is_empty() {
        return Err(ReleaseError::EmptyImage {
            path: image.to_owned(),
        });
    }

    let (index, index_ref) = crate::index::encode(&chunks);
    let mut manifest = Manifest {
        format: MANIFEST_FORMAT,
        version: opts.version.clone(),
        device_type: opts.device_type.clone(),
        created_at,
        expires_at,
        image: ImageInfo {
            size: image_hasher.len(),
            sha256: image_hasher.finish(),
        },
        compression: Compression::Zstd,
        chunks: Vec::new(),
        chunk_index: Some(index_ref),
        patches,
        may_replace_up_to: opts.may_replace_up_to.clone(),
    };
    // Signed without the list: the index's digest stands for it.
    let signed = sign_manifest(&manifest, key)?;
    manifest.attach_index(&index)?;
    let index_path = dir.index_path();
    uplift_files::replace_file(&index_path, &index, uplift_files::Access::Public)
        .map_err(|e| ReleaseError::io("write the chunk index", &index_path, e))?;
    let manifest_path = dir.manifest_path();
    uplift_files::replace_file(
        &manifest_path,
        &signed.to_json(),
        uplift_files::Access::Public,
    )
    .map_err(|e| ReleaseError::io("write the manifest", &manifest_path, e))?;

    Ok(ReleaseSummary {
        chunk_count: manifest.chunks.len(),
        unique_chunks: stored.len(),
        image_size: manifest.image.size,
        stored_bytes: manifest.stored_bytes(),
        manifest,
        manifest_path,
    })
}

fn validity(opts: &ReleaseOptions) -> Result<(String, String), ReleaseError> {
    let bad = |reason: String| ReleaseError::Options { reason };
    if opts.valid_for <= Duration::ZERO {
        return Err(bad(format!(
            "validity {} is not positive; give the release a lifetime such as 365 days",
            opts.valid_for
        )));
    }
    let created = opts
        .now
        .to_offset(UtcOffset::UTC)
        .replace_nanosecond(0)
        .expect("0 is a valid nanosecond");
    let expires = created
        .checked_add(opts.valid_for)
        .ok_or_else(|| bad(format!("validity {} is out of range", opts.valid_for)))?;
    let format = |t: OffsetDateTime| {
        t.format(&Rfc3339)
            .map_err(|e| bad(format!("time {t} cannot be written as RFC 3339: {e}")))
    };
    Ok((format(created)?, format(expires)?))
}

/// A release directory on disk (see the module docs for the layout).
#[derive(Debug, Clone)]
pub struct ReleaseDir {
    root: PathBuf,
}

impl ReleaseDir {
    /// Opens an existing release directory.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, ReleaseError> {
        let root = root.into();
        match std::fs::metadata(&root) {
            Ok(meta) if meta.is_dir() => Ok(Self { root }),
            Ok(_) => Err(ReleaseError::ReleaseDir {
                path: root,
                reason: "not a directory; pass the directory `create_release` wrote".to_owned(),
            }),
            Err(e) => Err(ReleaseError::io("open the release directory", root, e)),
        }
    }

    fn create(root: &Path) -> Result<Self, ReleaseError> {
        let dir = Self {
            root: root.to_owned(),
        };
        std::fs::create_dir_all(dir.chunks_dir())
            .map_err(|e| ReleaseError::io("create the release directory", dir.chunks_dir(), e))?;
        Ok(dir)
    }

    pub fn patches_dir(&self) -> PathBuf {
        self.root.join(PATCHES_DIR)
    }

    pub fn patch_path(&self, hash: &ChunkHash) -> PathBuf {
        self.patches_dir().join(format!("{hash}.zst"))
    }

    /// The stored bytes of a patch, unverified (they must hash to the name).
    pub fn read_patch(&self, hash: &ChunkHash) -> Result<Vec<u8>, ReleaseError> {
        let path = self.patch_path(hash);
        read_bounded(&path, max_stored_size(MAX_CHUNK_SIZE), "read the patch")
    }

    /// Stores a patch under its digest and returns its manifest entry.
    fn store_patch(
        &self,
        chunk: ChunkHash,
        patch: crate::delta::BuiltPatch,
    ) -> Result<PatchEntry, ReleaseError> {
        let hash = sha256(&patch.stored);
        let path = self.patch_path(&hash);
        std::fs::create_dir_all(self.patches_dir())
            .map_err(|e| ReleaseError::io("create the patches directory", self.patches_dir(), e))?;
        uplift_files::replace_file_unsynced(&path, &patch.stored)
            .map_err(|e| ReleaseError::io("write the patch", &path, e))?;
        Ok(PatchEntry {
            chunk,
            base: patch.base,
            hash,
            stored_size: patch.stored.len() as u32,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn manifest_path(&self) -> PathBuf {
        self.root.join(MANIFEST_FILE)
    }

    pub fn chunks_dir(&self) -> PathBuf {
        self.root.join(CHUNKS_DIR)
    }

    pub fn chunk_path(&self, hash: &ChunkHash) -> PathBuf {
        // ChunkHash prints only as 64 hex digits, so this stays inside the
        // chunks directory whatever the manifest says.
        self.chunks_dir().join(format!("{hash}.zst"))
    }

    pub fn read_manifest(&self) -> Result<SignedManifest, ReleaseError> {
        let path = self.manifest_path();
        let bytes = read_bounded(&path, MAX_MANIFEST_BYTES as u64, "read the manifest")?;
        SignedManifest::from_json(&bytes)
    }

    pub fn index_path(&self) -> PathBuf {
        self.root.join(INDEX_FILE)
    }

    /// The chunk index file as stored, unverified (the manifest's digest
    /// checks it on [`Manifest::attach_index`]).
    pub fn read_index(
        &self,
        reference: &crate::manifest::ChunkIndexRef,
    ) -> Result<Vec<u8>, ReleaseError> {
        let path = self.index_path();
        read_bounded(&path, reference.bytes(), "read the chunk index")
    }

    /// The signed manifest and its content with the chunk list attached,
    /// signatures not checked: for tools working on their own build output.
    pub fn read_release(&self) -> Result<(SignedManifest, Manifest), ReleaseError> {
        let signed = self.read_manifest()?;
        let mut manifest = signed.parse_unverified()?;
        if let Some(reference) = manifest.chunk_index.filter(|_| manifest.needs_index()) {
            manifest.attach_index(&self.read_index(&reference)?)?;
        }
        Ok((signed, manifest))
    }

    /// The stored (compressed) bytes of a chunk, unverified: decode them
    /// with [`decode_chunk`] before use.
    pub fn read_chunk(&self, hash: &ChunkHash) -> Result<Vec<u8>, ReleaseError> {
        let path = self.chunk_path(hash);
        let limit = max_stored_size(MAX_CHUNK_SIZE);
        read_bounded(&path, limit, "read the chunk")
    }

    /// Stores a chunk unless an intact copy is already there; returns its
    /// stored size. Existing files are checked rather than trusted: chunk
    /// writes are not fsynced (that would dominate build time), so a crash
    /// may leave a damaged file behind, and an older build may have
    /// compressed differently.
    fn store_chunk(&self, hash: &ChunkHash, data: &[u8]) -> Result<u32, ReleaseError> {
        let path = self.chunk_path(hash);
        let size = u32::try_from(data.len()).expect("chunks are below MAX_CHUNK_SIZE");
        match read_bounded(&path, max_stored_size(size), "read the existing chunk") {
            Ok(existing) => {
                let entry = ChunkEntry {
                    hash: *hash,
                    size,
                    stored_size: existing.len() as u32,
                };
                if !existing.is_empty() && decode_chunk(&entry, &existing).is_ok() {
                    return Ok(entry.stored_size);
                }
            }
            Err(ReleaseError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound => {}
            // Too large or unreadable: overwrite it below.
            Err(_) => {}
        }
        let encoded = encode_chunk(data)?;
        uplift_files::replace_file_unsynced(&path, &encoded)
            .map_err(|e| ReleaseError::io("write the chunk", &path, e))?;
        Ok(encoded.len() as u32)
    }
}

fn read_bounded(path: &Path, limit: u64, action: &'static str) -> Result<Vec<u8>, ReleaseError> {
    let file = std::fs::File::open(path).map_err(|e| ReleaseError::io(action, path, e))?;
    let mut bytes = Vec::new();
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| ReleaseError::io(action, path, e))?;
    if bytes.len() as u64 > limit {
        return Err(ReleaseError::ReleaseDir {
            path: path.to_owned(),
            reason: format!(
                "file is larger than the limit of {limit} bytes; it is not part of a valid release"
            ),
        });
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::tests::release_key;
    use std::collections::HashSet;
    use time::macros::datetime;
    use uplift_proto::ErrorKind;

    fn pseudo_random(len: usize, mut seed: u64) -> Vec<u8> {
        (0..len)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect()
    }

    /// ~3.5 MiB: random data with a 512 KiB block repeated three times and a
    /// run of zeros, as in a real filesystem image.
    fn image_with_repeated_regions() -> Vec<u8> {
        let block = pseudo_random(512 * 1024, 1);
        let mut image = pseudo_random(700 * 1024, 2);
        image.extend_from_slice(&block);
        image.extend(pseudo_random(300 * 1024, 3));
        image.extend_from_slice(&block);
        image.extend(vec![0u8; 600 * 1024]);
        image.extend_from_slice(&block);
        image.extend(pseudo_random(123_457, 4));
        image
    }

    fn options() -> ReleaseOptions {
        ReleaseOptions {
            version: "2.0.1".parse().unwrap(),
            device_type: "gateway-x86".parse().unwrap(),
            valid_for: DEFAULT_VALID_FOR,
            now: datetime!(2025-03-01 12:00:00.123 UTC),
            delta_from: None,
            may_replace_up_to: None,
        }
    }

    fn build(image: &[u8], dir: &Path) -> ReleaseSummary {
        std::fs::create_dir_all(dir).unwrap();
        let image_path = dir.join("image.img");
        std::fs::write(&image_path, image).unwrap();
        create_release(&image_path, &dir.join("out"), &options(), &release_key()).unwrap()
    }

    #[test]
    fn created_release_verifies_and_reassembles_the_image() {
        let tmp = tempfile::tempdir().unwrap();
        let image = image_with_repeated_regions();
        let summary = build(&image, tmp.path());

        assert_eq!(summary.image_size, image.len() as u64);
        assert_eq!(summary.chunk_count, summary.manifest.chunks.len());
        assert!(
            summary.unique_chunks < summary.chunk_count,
            "repeated regions were not deduplicated: {summary:?}"
        );
        assert!(
            summary.stored_bytes < summary.image_size,
            "zeros did not compress"
        );

        let dir = ReleaseDir::open(tmp.path().join("out")).unwrap();
        assert_eq!(dir.manifest_path(), summary.manifest_path);
        let files = std::fs::read_dir(dir.chunks_dir()).unwrap().count();
        assert_eq!(files, summary.unique_chunks, "stray or missing chunk files");

        let mut manifest = dir
            .read_manifest()
            .unwrap()
            .verify(
                &[release_key().public_key()],
                datetime!(2025-06-01 00:00 UTC),
            )
            .unwrap();
        // The signed text carries the index's digest, not the list.
        assert!(manifest.needs_index() && manifest.chunks.is_empty());
        let reference = manifest.chunk_index.unwrap();
        assert_eq!(reference.chunks, summary.chunk_count as u64);
        manifest
            .attach_index(&dir.read_index(&reference).unwrap())
            .unwrap();
        assert_eq!(manifest, summary.manifest);
        assert_eq!(manifest.created_at, "2025-03-01T12:00:00Z");
        assert_eq!(manifest.expires_at, "2026-03-01T12:00:00Z");
        assert_eq!(manifest.image.sha256, sha256(&image));

        let mut rebuilt = Vec::with_capacity(image.len());
        for (offset, entry) in manifest.chunk_offsets() {
            assert_eq!(offset, rebuilt.len() as u64);
            assert!(entry.size >= 1 && entry.size <= CDC_MAX_SIZE);
            let stored = dir.read_chunk(&entry.hash).unwrap();
            rebuilt.extend(decode_chunk(entry, &stored).unwrap());
        }
        assert!(rebuilt == image, "reassembled image differs");
    }

    #[test]
    fn empty_image_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let image_path = tmp.path().join("empty.img");
        std::fs::write(&image_path, b"").unwrap();
        let err = create_release(
            &image_path,
            &tmp.path().join("out"),
            &options(),
            &release_key(),
        )
        .unwrap_err();
        assert!(matches!(err, ReleaseError::EmptyImage { .. }), "{err:?}");
        assert_eq!(err.kind(), ErrorKind::BadRequest);
        assert!(err.to_string().contains("empty.img"), "{err}");
    }

    #[test]
    fn missing_image_error_names_the_path() {
        let tmp = tempfile::tempdir().unwrap();
        let image_path = tmp.path().join("no-such.img");
        let err = create_release(
            &image_path,
            &tmp.path().join("out"),
            &options(),
            &release_key(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("no-such.img"), "{err}");
    }

    #[test]
    fn non_positive_validity_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let image_path = tmp.path().join("image.img");
        std::fs::write(&image_path, b"data").unwrap();
        let mut opts = options();
        opts.valid_for = Duration::ZERO;
        let err = create_release(&image_path, &tmp.path().join("out"), &opts, &release_key())
            .unwrap_err();
        assert!(matches!(err, ReleaseError::Options { .. }), "{err:?}");
    }

    #[test]
    fn chunk_damaged_by_a_crash_is_rewritten_on_the_next_build() {
        let tmp = tempfile::tempdir().unwrap();
        let image = pseudo_random(300 * 1024, 11);
        let first = build(&image, tmp.path());
        let dir = ReleaseDir::open(tmp.path().join("out")).unwrap();
        let victim = dir.chunk_path(&first.manifest.chunks[0].hash);
        let full = std::fs::read(&victim).unwrap();
        std::fs::write(&victim, &full[..full.len() / 2]).unwrap();

        let second = build(&image, tmp.path());
        assert_eq!(second.manifest.chunks, first.manifest.chunks);
        assert_eq!(std::fs::read(&victim).unwrap(), full);
    }

    #[test]
    fn oversized_chunk_file_is_refused_on_read() {
        let tmp = tempfile::tempdir().unwrap();
        let summary = build(&pseudo_random(20_000, 12), tmp.path());
        let dir = ReleaseDir::open(tmp.path().join("out")).unwrap();
        let hash = summary.manifest.chunks[0].hash;
        std::fs::write(
            dir.chunk_path(&hash),
            vec![0u8; 2 * MAX_CHUNK_SIZE as usize],
        )
        .unwrap();
        assert!(dir.read_chunk(&hash).is_err());
    }

    #[test]
    fn opening_a_missing_release_dir_fails() {
        let tmp = tempfile::tempdir().unwrap();
        assert!(ReleaseDir::open(tmp.path().join("nope")).is_err());
    }

    /// Chunk hashes of `edited` that `original` does not have, after
    /// building both as releases.
    fn new_chunks(original: &[u8], edited: &[u8], dir: &Path) -> (Vec<ChunkEntry>, usize) {
        let a = build(original, &dir.join("a"));
        let b = build(edited, &dir.join("b"));
        let old: HashSet<ChunkHash> = a.manifest.chunks.iter().map(|c| c.hash).collect();
        let new = b
            .manifest
            .chunks
            .iter()
            .filter(|c| !old.contains(&c.hash))
            .copied()
            .collect();
        (new, b.manifest.chunks.len())
    }

    /// What delta updates rely on: a small edit changes only the chunks
    /// around it, so devices refetch a few chunks, not the image.
    #[test]
    fn small_edit_in_the_middle_changes_only_a_few_chunks() {
        let tmp = tempfile::tempdir().unwrap();
        let original = pseudo_random(4 * 1024 * 1024, 21);
        let middle = original.len() / 2;

        let mut overwritten = original.clone();
        for b in &mut overwritten[middle..middle + 100] {
            *b ^= 0x5a;
        }
        // An insertion shifts everything after it: fixed-size chunking
        // would change every later chunk, content-defined chunking must not.
        let mut inserted = original.clone();
        inserted.splice(middle..middle, pseudo_random(100, 22));

        for (name, edited) in [("overwrite", overwritten), ("insert", inserted)] {
            let (new, total) = new_chunks(&original, &edited, &tmp.path().join(name));
            assert!(total >= 30, "{name}: only {total} chunks");
            assert!(
                !new.is_empty() && new.len() <= 3,
                "{name}: {} of {total} chunks changed for a 100-byte edit",
                new.len()
            );
            let changed_bytes: u64 = new.iter().map(|c| u64::from(c.size)).sum();
            assert!(
                changed_bytes <= 3 * u64::from(CDC_MAX_SIZE),
                "{changed_bytes}"
            );
        }
    }
}
