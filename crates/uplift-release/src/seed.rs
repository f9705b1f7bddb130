//! Finding a release's chunks in data a device already has. Running the
//! release's own content-defined chunker over an existing image (the running
//! slot) yields the same chunks wherever the content is unchanged, so an
//! agent can copy those locally and download only what really changed (the
//! way casync uses seeds). Callers re-check each chunk's hash when copying.

use crate::build::{CDC_AVG_SIZE, CDC_MAX_SIZE, CDC_MIN_SIZE};
use crate::chunk::sha256;
use fastcdc::v2020::StreamCDC;
use std::io::Read;
use uplift_proto::ChunkHash;

/// Where a chunk lies in the indexed data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeedChunk {
    pub offset: u64,
    pub size: u32,
}

/// Chunks by hash, each at its first place in the indexed data. A sorted
/// list rather than a hash map: it lives through a whole install on the
/// device, and at 48 bytes a chunk it is about half a map's size.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SeedIndex {
    sorted: Vec<(ChunkHash, SeedChunk)>,
}

impl SeedIndex {
    /// From chunks in data order; of a hash seen twice the first place is kept.
    pub fn from_chunks(chunks: impl IntoIterator<Item = (ChunkHash, SeedChunk)>) -> Self {
        let mut sorted: Vec<_> = chunks.into_iter().collect();
        // Stable: equal hashes stay in data order, so dedup keeps the first.
        sorted.sort_by_key(|(hash, _)| *hash);
        sorted.dedup_by_key(|(hash, _)| *hash);
        sorted.shrink_to_fit();
        Self { sorted }
    }

    /// From a saved chunk list: (hash, size) in image order.
    pub fn from_list(list: impl IntoIterator<Item = (ChunkHash, u32)>) -> Self {
        let mut offset = 0u64;
        Self::from_chunks(list.into_iter().map(|(hash, size)| {
            let at = SeedChunk { offset, size };
            offset += u64::from(size);
            (hash, at)
        }))
    }

    pub fn get(&self, hash: &ChunkHash) -> Option<&SeedChunk> {
        self.sorted
            .binary_search_by_key(hash, |(h, _)| *h)
            .ok()
            .map(|at| &self.sorted[at].1)
    }

    pub fn contains_key(&self, hash: &ChunkHash) -> bool {
        self.get(hash).is_some()
    }

    pub fn len(&self) -> usize {
        self.sorted.len()
    }

    /// Every chunk's place, in hash order.
    pub fn places(&self) -> impl Iterator<Item = &SeedChunk> {
        self.sorted.iter().map(|(_, at)| at)
    }

    pub fn is_empty(&self) -> bool {
        self.sorted.is_empty()
    }
}

/// Indexes at most `limit` bytes of `data` by chunk hash.
pub fn index_chunks(data: impl Read, limit: u64) -> std::io::Result<SeedIndex> {
    let mut chunks = Vec::new();
    for item in StreamCDC::new(data.take(limit), CDC_MIN_SIZE, CDC_AVG_SIZE, CDC_MAX_SIZE) {
        let chunk = item.map_err(std::io::Error::other)?;
        let size = u32::try_from(chunk.data.len()).expect("chunks are at most CDC_MAX_SIZE");
        chunks.push((
            sha256(&chunk.data),
            SeedChunk {
                offset: chunk.offset,
                size,
            },
        ));
    }
    Ok(SeedIndex::from_chunks(chunks))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::{create_release, ReleaseOptions};
    use crate::keys::ReleaseSigningKey;

    fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn an_edited_image_finds_most_of_its_chunks_in_the_old_one() {
        let dir = tempfile::tempdir().unwrap();
        let old = pseudo_random(4 << 20, 3);
        let mut new = old.clone();
        new[2_000_000..2_000_100].fill(0xAA);
        let image = dir.path().join("new.img");
        std::fs::write(&image, &new).unwrap();
        let options = ReleaseOptions::new("2.0".parse().unwrap(), "t".parse().unwrap());
        let summary = create_release(
            &image,
            &dir.path().join("rel"),
            &options,
            &ReleaseSigningKey::from_seed([1; 32]),
        )
        .unwrap();

        let index = index_chunks(old.as_slice(), u64::MAX).unwrap();
        let found: Vec<_> = summary
            .manifest
            .chunks
            .iter()
            .filter(|c| index.contains_key(&c.hash))
            .collect();
        let missing = summary.manifest.chunks.len() - found.len();
        assert!(
            (1..=3).contains(&missing),
            "{missing} of {} chunks changed",
            summary.manifest.chunks.len()
        );
        for chunk in found {
            let at = index.get(&chunk.hash).unwrap();
            let bytes = &old[at.offset as usize..at.offset as usize + at.size as usize];
            assert_eq!(
                sha256(bytes),
                chunk.hash,
                "the index points at the chunk's bytes"
            );
        }
    }

    #[test]
    fn the_limit_bounds_what_is_read() {
        let data = pseudo_random(1 << 20, 5);
        let index = index_chunks(data.as_slice(), 100_000).unwrap();
        assert!(!index.is_empty());
        assert!(index
            .places()
            .all(|c| c.offset + u64::from(c.size) <= 100_000));
    }

    #[test]
    fn a_hash_seen_twice_keeps_its_first_place() {
        let (a, b) = (sha256(b"a"), sha256(b"b"));
        let index = SeedIndex::from_list([(a, 10), (b, 20), (a, 10)]);
        assert_eq!(index.len(), 2);
        assert_eq!(
            index.get(&a),
            Some(&SeedChunk {
                offset: 0,
                size: 10
            })
        );
        assert_eq!(
            index.get(&b),
            Some(&SeedChunk {
                offset: 10,
                size: 20
            })
        );
        assert!(!index.contains_key(&sha256(b"c")));
    }
}
