//! Patches for `release create --delta-from`: a chunk the older release
//! does not have is also stored as a zstd frame compressed against the
//! older release's most similar chunks, which a device running that release
//! already holds.
//!
//! Why similarity and not position: in a filesystem image the changed data
//! seldom sits where the old version of it was (ext4 allocates new blocks
//! for a rewritten file; package lists grow and move). Measured on the
//! benchmark's Debian pair (v2 = v1 + `apt-get update` + two packages): the
//! chunks v1 lacks are 17.8 MB compressed alone at zstd -19, 17.1 MB
//! against the v1 chunks at the same offsets, and 8.5 MB against the four
//! v1 chunks that share the most content-defined samples with each.
//!
//! The samples: a gear rolling hash over the chunk, taken wherever its top
//! [`SAMPLE_BITS`] bits are zero (about one per KiB, wherever the content is
//! in the chunk), as in similarity-based delta compression (Finesse,
//! N-transform). Samples that occur in many old chunks (zero runs, common
//! headers) say nothing about similarity and are ignored.

use crate::build::{CDC_AVG_SIZE, CDC_MAX_SIZE, CDC_MIN_SIZE};
use crate::chunk::{decode_chunk, encode_patch, sha256};
use crate::error::ReleaseError;
use crate::manifest::{ChunkEntry, MAX_PATCH_BASES};
use crate::sparse::SparseReader;
use crate::ReleaseDir;
use fastcdc::v2020::StreamCDC;
use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use uplift_proto::ChunkHash;

/// About one sample per 2^SAMPLE_BITS bytes.
pub const SAMPLE_BITS: u32 = 10;
/// Old chunks a patch is made against (more found no smaller patches on
/// the Debian pair).
pub const PATCH_BASES: usize = 4;
/// A sample seen in more old chunks than this is too common to tell
/// similar chunks apart.
const COMMON_SAMPLE: usize = 8;
/// zstd level for patches: they are built once and are few, so the
/// slowest, tightest level pays.
pub const PATCH_LEVEL: i32 = 19;
/// A patch is kept only if it is smaller than this share of the whole
/// chunk as stored: otherwise a device without the bases loses nothing,
/// and one with them gains too little to be worth the reads.
const PATCH_WORTH: f64 = 0.9;

const _: () = assert!(PATCH_BASES <= MAX_PATCH_BASES);

fn gear_table() -> [u64; 256] {
    let mut table = [0u64; 256];
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for v in table.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *v = x;
    }
    table
}

/// The content-defined samples of `data`, sorted, without repeats.
pub fn samples(data: &[u8]) -> Vec<u64> {
    let gear = gear_table();
    let mut hash = 0u64;
    let mut out = Vec::with_capacity(data.len() >> SAMPLE_BITS);
    for (i, &byte) in data.iter().enumerate() {
        // The shift ages each byte out after 64 steps: the hash depends on
        // the last 64 bytes only, so equal content gives equal samples. Its
        // top bits depend on all 64 (the low ones on the last few only).
        hash = (hash << 1).wrapping_add(gear[usize::from(byte)]);
        if i >= 63 && hash >> (64 - SAMPLE_BITS) == 0 {
            out.push(hash);
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// Which old chunks share samples with a chunk: pure, for the planner and
/// its tests.
#[derive(Debug, Default)]
pub struct SimilarityIndex {
    by_sample: HashMap<u64, Vec<u32>>,
}

impl SimilarityIndex {
    pub fn add(&mut self, chunk: u32, samples: &[u64]) {
        for &sample in samples {
            let holders = self.by_sample.entry(sample).or_default();
            // One past the limit marks it common; more are not kept.
            if holders.len() <= COMMON_SAMPLE && holders.last() != Some(&chunk) {
                holders.push(chunk);
            }
        }
    }

    /// The `most` old chunks sharing the most samples with `samples`, in
    /// old-chunk order (ties go to the earlier chunk).
    pub fn most_similar(&self, samples: &[u64], most: usize) -> Vec<u32> {
        let mut votes: HashMap<u32, u32> = HashMap::new();
        for sample in samples {
            if let Some(holders) = self.by_sample.get(sample) {
                if holders.len() <= COMMON_SAMPLE {
                    for &chunk in holders {
                        *votes.entry(chunk).or_default() += 1;
                    }
                }
            }
        }
        let mut ranked: Vec<(u32, u32)> = votes.into_iter().collect();
        ranked.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        let mut chosen: Vec<u32> = ranked.into_iter().take(most).map(|(c, _)| c).collect();
        chosen.sort_unstable();
        chosen
    }
}

/// Where the older release's chunk bytes are read from.
#[derive(Debug)]
enum OldBytes {
    Image(std::fs::File),
    Release(ReleaseDir),
}

#[derive(Debug, Clone, Copy)]
struct OldChunk {
    hash: ChunkHash,
    size: u32,
    stored_size: u32,
    offset: u64,
}

/// The older release a new one is patched against: its chunks, indexed by
/// hash and by similarity.
#[derive(Debug)]
pub struct DeltaBase {
    path: PathBuf,
    bytes: OldBytes,
    chunks: Vec<OldChunk>,
    by_hash: HashMap<ChunkHash, u32>,
    similar: SimilarityIndex,
}

/// A patch made for one chunk.
#[derive(Debug, Clone)]
pub struct BuiltPatch {
    pub base: Vec<ChunkHash>,
    pub stored: Vec<u8>,
}

impl DeltaBase {
    /// `path` is an older release's directory (its manifest and chunks) or
    /// its image file (chunked here the way releases are).
    pub fn open(path: &Path) -> Result<Self, ReleaseError> {
        let meta = std::fs::metadata(path)
            .map_err(|e| ReleaseError::io("open the release to patch against", path, e))?;
        let mut base = if meta.is_dir() {
            Self::from_release(path)?
        } else {
            Self::from_image(path)?
        };
        base.by_hash = base
            .chunks
            .iter()
            .enumerate()
            .map(|(i, c)| (c.hash, i as u32))
            .collect();
        Ok(base)
    }

    fn from_image(path: &Path) -> Result<Self, ReleaseError> {
        let io = |e| ReleaseError::io("read the image to patch against", path, e);
        let file = std::fs::File::open(path).map_err(io)?;
        let mut chunks = Vec::new();
        let mut similar = SimilarityIndex::default();
        let mut seen = std::collections::HashSet::new();
        let reader = SparseReader::new(&file).map_err(io)?;
        for item in StreamCDC::new(reader, CDC_MIN_SIZE, CDC_AVG_SIZE, CDC_MAX_SIZE) {
            let chunk = item.map_err(|e| io(e.into()))?;
            let hash = sha256(&chunk.data);
            if !seen.insert(hash) {
                continue;
            }
            similar.add(chunks.len() as u32, &samples(&chunk.data));
            chunks.push(OldChunk {
                hash,
                size: chunk.data.len() as u32,
                stored_size: 0,
                offset: chunk.offset,
            });
        }
        Ok(Self {
            path: path.to_owned(),
            bytes: OldBytes::Image(file),
            chunks,
            by_hash: HashMap::new(),
            similar,
        })
    }

    fn from_release(path: &Path) -> Result<Self, ReleaseError> {
        let dir = ReleaseDir::open(path)?;
        // Our own build output: its chunks are checked as they are decoded.
        let (_, manifest) = dir.read_release()?;
        let mut chunks = Vec::new();
        let mut similar = SimilarityIndex::default();
        let mut seen = std::collections::HashSet::new();
        for (offset, entry) in manifest.chunk_offsets() {
            if !seen.insert(entry.hash) {
                continue;
            }
            let data = decode_chunk(entry, &dir.read_chunk(&entry.hash)?)?;
            similar.add(chunks.len() as u32, &samples(&data));
            chunks.push(OldChunk {
                hash: entry.hash,
                size: entry.size,
                stored_size: entry.stored_size,
                offset,
            });
        }
        Ok(Self {
            path: path.to_owned(),
            bytes: OldBytes::Release(dir),
            chunks,
            by_hash: HashMap::new(),
            similar,
        })
    }

    /// True if the older release has this chunk (a device running it copies
    /// it, so it needs no patch).
    pub fn holds(&self, hash: &ChunkHash) -> bool {
        self.by_hash.contains_key(hash)
    }

    fn read(&self, chunk: &OldChunk) -> Result<Vec<u8>, ReleaseError> {
        match &self.bytes {
            OldBytes::Image(file) => {
                let mut data = vec![0u8; chunk.size as usize];
                file.read_exact_at(&mut data, chunk.offset).map_err(|e| {
                    ReleaseError::io("read the image to patch against", &self.path, e)
                })?;
                Ok(data)
            }
            OldBytes::Release(dir) => {
                let entry = ChunkEntry {
                    hash: chunk.hash,
                    size: chunk.size,
                    stored_size: chunk.stored_size,
                };
                decode_chunk(&entry, &dir.read_chunk(&chunk.hash)?)
            }
        }
    }

    /// A patch for `data` against its most similar old chunks, if one is
    /// worth sending instead of the chunk as stored (`stored_size` bytes).
    pub fn patch_for(
        &self,
        data: &[u8],
        stored_size: u32,
    ) -> Result<Option<BuiltPatch>, ReleaseError> {
        let chosen = self.similar.most_similar(&samples(data), PATCH_BASES);
        if chosen.is_empty() {
            return Ok(None);
        }
        let mut prefix = Vec::new();
        let mut base = Vec::with_capacity(chosen.len());
        for index in chosen {
            let chunk = &self.chunks[index as usize];
            prefix.extend_from_slice(&self.read(chunk)?);
            base.push(chunk.hash);
        }
        let stored = encode_patch(data, &prefix, PATCH_LEVEL)?;
        let worth = (stored.len() as f64) < f64::from(stored_size) * PATCH_WORTH;
        Ok(worth.then_some(BuiltPatch { base, stored }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Package-list-like text: the same lines for the same numbers.
    fn text(lines: std::ops::Range<u32>, salt: &str) -> Vec<u8> {
        lines
            .map(|i| {
                let h = u64::from(i).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                format!(
                    "Package: pkg-{h:x}-{salt}\nVersion: {}.{}\nDepends: lib{:x} (>= {})\nSize: {}\n\n",
                    h % 7,
                    h % 101,
                    h >> 40,
                    h % 13,
                    h % 99_991
                )
            })
            .collect::<String>()
            .into_bytes()
    }

    #[test]
    fn equal_content_gives_equal_samples_wherever_it_sits() {
        let body = text(0..2000, "a");
        let mut shifted = b"some other header that moves everything".to_vec();
        shifted.extend_from_slice(&body);
        let a = samples(&body);
        let b = samples(&shifted);
        let shared = a.iter().filter(|s| b.binary_search(s).is_ok()).count();
        assert!(a.len() > 20, "{} samples", a.len());
        assert!(shared * 10 >= a.len() * 9, "{shared} of {} shared", a.len());
    }

    #[test]
    fn the_most_similar_old_chunks_are_chosen_and_common_samples_ignored() {
        let mut index = SimilarityIndex::default();
        index.add(0, &[1, 2, 3]);
        index.add(1, &[2, 3, 4, 5]);
        index.add(2, &[9]);
        // Sample 100 is in every chunk of a large image: no signal.
        for chunk in 3..20 {
            index.add(chunk, &[100]);
        }
        assert_eq!(index.most_similar(&[2, 3, 4, 5, 100], 1), vec![1]);
        assert_eq!(index.most_similar(&[1, 2, 3, 4, 5], 2), vec![0, 1]);
        assert_eq!(index.most_similar(&[100], 4), Vec::<u32>::new());
        assert_eq!(index.most_similar(&[42], 4), Vec::<u32>::new());
    }

    #[test]
    fn a_chunk_like_an_old_one_is_patched_in_a_fraction_of_its_size() {
        let dir = tempfile::tempdir().unwrap();
        let old = text(0..6000, "old");
        let old_path = dir.path().join("old.img");
        std::fs::write(&old_path, &old).unwrap();
        let base = DeltaBase::open(&old_path).unwrap();

        // The same lines with a few changed, somewhere else in the image.
        let mut new = text(2000..2600, "old");
        new.extend_from_slice(b"Package: brand-new\n\n");
        let whole = crate::chunk::encode_chunk(&new).unwrap();
        let patch = base
            .patch_for(&new, whole.len() as u32)
            .unwrap()
            .expect("worth a patch");
        assert!(
            patch.stored.len() * 4 < whole.len(),
            "patch {} bytes, whole {}",
            patch.stored.len(),
            whole.len()
        );
        let prefix: Vec<u8> = patch
            .base
            .iter()
            .flat_map(|h| base.read(&base.chunks[base.by_hash[h] as usize]).unwrap())
            .collect();
        let entry = ChunkEntry {
            hash: sha256(&new),
            size: new.len() as u32,
            stored_size: whole.len() as u32,
        };
        let listed = crate::manifest::PatchEntry {
            chunk: entry.hash,
            base: patch.base.clone(),
            hash: sha256(&patch.stored),
            stored_size: patch.stored.len() as u32,
        };
        let made = crate::chunk::apply_patch(&listed, &entry, &patch.stored, &prefix).unwrap();
        assert_eq!(made, new);

        // Against the wrong base it fails with a clear error, never wrong bytes.
        let err =
            crate::chunk::apply_patch(&listed, &entry, &patch.stored, &old[..1000]).unwrap_err();
        assert!(
            matches!(err, ReleaseError::PatchDoesNotApply { .. }),
            "{err}"
        );
    }

    #[test]
    fn unrelated_data_gets_no_patch() {
        let dir = tempfile::tempdir().unwrap();
        let old_path = dir.path().join("old.img");
        std::fs::write(&old_path, text(0..3000, "x")).unwrap();
        let base = DeltaBase::open(&old_path).unwrap();
        let mut x = 7u64;
        let noise: Vec<u8> = (0..100_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let whole = crate::chunk::encode_chunk(&noise).unwrap();
        assert!(base
            .patch_for(&noise, whole.len() as u32)
            .unwrap()
            .is_none());
    }
}
