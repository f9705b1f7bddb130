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

/// Like [`index_chunks`], over the first `limit` bytes of a file or block
/// device, in `parts` pieces cut in parallel (the device is otherwise idle
/// while it plans), hashing only chunks of a size `wanted` accepts (see
/// `index_chunks_sized`). Each piece reads on past its end by a largest chunk and
/// keeps the chunks that start in it, so a chunk across a border is found
/// by the piece before; the first chunks of a piece may be cut where a
/// whole-file pass would not (the cutter resynchronises within a chunk or
/// two), which only costs a chance of reuse, never a wrong one.
pub fn index_file_sized(
    file: &std::fs::File,
    limit: u64,
    parts: usize,
    wanted: impl Fn(u32) -> bool + Sync,
) -> std::io::Result<SeedIndex> {
    use std::io::{Seek, SeekFrom};
    // Works for block devices too, whose metadata length is 0.
    let len = (&*file).seek(SeekFrom::End(0))?.min(limit);
    let parts = parts.clamp(1, 16) as u64;
    // Small inputs are not worth the threads.
    let parts = if len < parts * 64 * u64::from(CDC_MAX_SIZE) {
        1
    } else {
        parts
    };
    let piece = len.div_ceil(parts);
    let results: Vec<std::io::Result<Vec<(ChunkHash, SeedChunk)>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..parts)
            .map(|i| {
                let wanted = &wanted;
                scope.spawn(move || {
                    let start = i * piece;
                    let end = (start + piece).min(len);
                    let reader = RangeReader {
                        file,
                        at: start,
                        end: (end + u64::from(CDC_MAX_SIZE)).min(len),
                    };
                    let mut found = Vec::new();
                    cut(reader, wanted, |hash, offset, size| {
                        let offset = start + offset;
                        if offset < end {
                            found.push((hash, SeedChunk { offset, size }));
                        }
                        offset < end
                    })?;
                    Ok(found)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(std::io::Error::other("a seed thread panicked")))
            })
            .collect()
    });
    let mut all = Vec::new();
    for part in results {
        all.extend(part?);
    }
    Ok(SeedIndex::from_chunks(all))
}

/// Reads `at..end` of a file by position, so threads share one descriptor.
struct RangeReader<'a> {
    file: &'a std::fs::File,
    at: u64,
    end: u64,
}

impl Read for RangeReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use std::os::unix::fs::FileExt;
        let room = (self.end.saturating_sub(self.at)).min(buf.len() as u64) as usize;
        if room == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..room], self.at)?;
        self.at += n as u64;
        Ok(n)
    }
}

/// Cuts `data` into chunks and hashes those of a wanted size, handing each
/// to `found` (hash, offset in `data`, size) until it says stop.
fn cut(
    data: impl Read,
    wanted: impl Fn(u32) -> bool,
    mut found: impl FnMut(ChunkHash, u64, u32) -> bool,
) -> std::io::Result<()> {
    for item in StreamCDC::new(data, CDC_MIN_SIZE, CDC_AVG_SIZE, CDC_MAX_SIZE) {
        let chunk = item.map_err(std::io::Error::other)?;
        let size = u32::try_from(chunk.data.len()).expect("chunks are at most CDC_MAX_SIZE");
        if wanted(size) && !found(sha256(&chunk.data), chunk.offset, size) {
            break;
        }
    }
    Ok(())
}

/// Indexes at most `limit` bytes of `data` by chunk hash.
pub fn index_chunks(data: impl Read, limit: u64) -> std::io::Result<SeedIndex> {
    index_chunks_sized(data, limit, |_| true)
}

/// [`index_chunks`], hashing only chunks of a size `wanted` accepts. A
/// chunk can only be reused where a chunk of the same size is wanted, and
/// cutting is far cheaper than hashing: for an image that shares nothing
/// with the release, most chunks are cut and passed over unhashed.
fn index_chunks_sized(
    data: impl Read,
    limit: u64,
    wanted: impl Fn(u32) -> bool,
) -> std::io::Result<SeedIndex> {
    let mut chunks = Vec::new();
    cut(data.take(limit), wanted, |hash, offset, size| {
        chunks.push((hash, SeedChunk { offset, size }));
        true
    })?;
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
    fn chunks_of_unwanted_sizes_are_left_out_and_the_rest_found_as_before() {
        let data = pseudo_random(1 << 20, 9);
        let all = index_chunks(data.as_slice(), u64::MAX).unwrap();
        let some_size = all.places().next().unwrap().size;
        let sized = index_chunks_sized(data.as_slice(), u64::MAX, |s| s == some_size).unwrap();
        assert!(!sized.is_empty() && sized.len() < all.len());
        assert!(sized.places().all(|c| c.size == some_size));
        assert!(all
            .sorted
            .iter()
            .filter(|(_, c)| c.size == some_size)
            .all(|(hash, c)| sized.get(hash) == Some(c)));
    }

    #[test]
    fn a_file_cut_in_parallel_pieces_finds_what_one_pass_finds() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("slot");
        let data = pseudo_random(48 << 20, 11);
        std::fs::write(&path, &data).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        let one = index_chunks(data.as_slice(), u64::MAX).unwrap();
        let four = index_file_sized(&file, u64::MAX, 4, |_| true).unwrap();
        // Every place found is right, and the pieces miss at most a few
        // chunks where they start.
        for (hash, at) in &four.sorted {
            let bytes = &data[at.offset as usize..(at.offset + u64::from(at.size)) as usize];
            assert_eq!(sha256(bytes), *hash);
        }
        let missed = one
            .sorted
            .iter()
            .filter(|(h, _)| !four.contains_key(h))
            .count();
        assert!(missed <= 3 * 3, "{missed} of {} chunks missed", one.len());
        // A limit bounds what is read.
        let limited = index_file_sized(&file, 20 << 20, 4, |_| true).unwrap();
        assert!(limited
            .places()
            .all(|c| c.offset + u64::from(c.size) <= 20 << 20));
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
