//! The binary chunk index: a release's chunk list outside its manifest, so
//! the signed manifest stays a few hundred bytes whatever the image's size
//! (JSON costs about 117 bytes per chunk, and the manifest's 8 MiB bound
//! once capped images near 4 GiB).
//!
//! The file is [`RECORD_BYTES`]-byte records in image order: the chunk's
//! SHA-256 (32 bytes), its size and its stored size (u32, little-endian).
//! No header: the signed manifest names the file's digest and entry count,
//! so a device knows the exact length before it downloads a byte, and
//! trusts the content only once its digest matches.

use crate::chunk::sha256;
use crate::manifest::{ChunkEntry, ChunkIndexRef};
use uplift_proto::ChunkHash;

pub const RECORD_BYTES: usize = 40;
/// 2^26 chunks: 4 TiB at the 64 KiB average chunk; a device holds the
/// list in memory to plan, so the bound is there, just far away.
pub const MAX_CHUNKS: u64 = 1 << 26;

/// The index file of `chunks` and the reference the manifest signs.
pub fn encode(chunks: &[ChunkEntry]) -> (Vec<u8>, ChunkIndexRef) {
    let mut out = Vec::with_capacity(chunks.len() * RECORD_BYTES);
    for chunk in chunks {
        out.extend_from_slice(chunk.hash.as_bytes());
        out.extend_from_slice(&chunk.size.to_le_bytes());
        out.extend_from_slice(&chunk.stored_size.to_le_bytes());
    }
    let reference = ChunkIndexRef {
        sha256: sha256(&out),
        chunks: chunks.len() as u64,
    };
    (out, reference)
}

/// The chunk list, if `bytes` is exactly the index `reference` names.
pub fn decode(bytes: &[u8], reference: &ChunkIndexRef) -> Result<Vec<ChunkEntry>, String> {
    if bytes.len() as u64 != reference.bytes() {
        return Err(format!(
            "is {} bytes, the manifest says {} entries ({} bytes)",
            bytes.len(),
            reference.chunks,
            reference.bytes()
        ));
    }
    let actual = sha256(bytes);
    if actual != reference.sha256 {
        return Err(format!(
            "has sha256 {actual}, the manifest says {}",
            reference.sha256
        ));
    }
    Ok(bytes
        .chunks_exact(RECORD_BYTES)
        .map(|record| {
            let field =
                |at: usize| u32::from_le_bytes(record[at..at + 4].try_into().expect("4 bytes"));
            ChunkEntry {
                hash: ChunkHash::from_bytes(record[..32].try_into().expect("32 bytes")),
                size: field(32),
                stored_size: field(36),
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(n: u8) -> Vec<ChunkEntry> {
        (0..n)
            .map(|i| ChunkEntry {
                hash: ChunkHash::from_bytes([i; 32]),
                size: 65_536 + u32::from(i),
                stored_size: 1000 * u32::from(i) + 1,
            })
            .collect()
    }

    #[test]
    fn an_index_round_trips_and_is_forty_bytes_a_chunk() {
        let chunks = entries(5);
        let (bytes, reference) = encode(&chunks);
        assert_eq!(bytes.len(), 5 * RECORD_BYTES);
        assert_eq!(reference.chunks, 5);
        assert_eq!(decode(&bytes, &reference).unwrap(), chunks);
    }

    #[test]
    fn a_truncated_padded_or_altered_index_is_refused() {
        let (bytes, reference) = encode(&entries(3));
        let short = decode(&bytes[..bytes.len() - 1], &reference).unwrap_err();
        assert!(short.contains("bytes"), "{short}");
        let mut long = bytes.clone();
        long.push(0);
        assert!(decode(&long, &reference).is_err());
        let mut altered = bytes.clone();
        altered[33] ^= 1;
        let err = decode(&altered, &reference).unwrap_err();
        assert!(err.contains("sha256"), "{err}");
    }
}
