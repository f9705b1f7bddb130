//! Finding a release's chunks in data a device already has. Running the
//! release's own content-defined chunker over an existing image (the running
//! slot) yields the same chunks wherever the content is unchanged, so an
//! agent can copy those locally and download only what really changed (the
//! way casync uses seeds). Callers re-check each chunk's hash when copying.

use crate::build::{CDC_AVG_SIZE, CDC_MAX_SIZE, CDC_MIN_SIZE};
use crate::chunk::sha256;
use fastcdc::v2020::StreamCDC;
use std::collections::HashMap;
use std::io::Read;
use uplift_proto::ChunkHash;

/// Where a chunk lies in the indexed data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeedChunk {
    pub offset: u64,
    pub size: u32,
}

/// Indexes at most `limit` bytes of `data` by chunk hash.
pub fn index_chunks(data: impl Read, limit: u64) -> std::io::Result<HashMap<ChunkHash, SeedChunk>> {
    let mut index = HashMap::new();
    for item in StreamCDC::new(data.take(limit), CDC_MIN_SIZE, CDC_AVG_SIZE, CDC_MAX_SIZE) {
        let chunk = item.map_err(std::io::Error::other)?;
        let size = u32::try_from(chunk.data.len()).expect("chunks are at most CDC_MAX_SIZE");
        index.entry(sha256(&chunk.data)).or_insert(SeedChunk {
            offset: chunk.offset,
            size,
        });
    }
    Ok(index)
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
            let at = index[&chunk.hash];
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
        assert!(index
            .values()
            .all(|c| c.offset + u64::from(c.size) <= 100_000));
    }
}
