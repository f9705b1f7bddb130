//! Chunks are downloaded by agents and uploaded to the server: zstd frames
//! checked against a manifest entry (or, on upload, a name and a size cap).
//!
//! Input layout: 4 bytes little-endian declared size (kept at most a little
//! over `MAX_CHUNK_SIZE`), 1 flags byte, 32 bytes hash, then the stored
//! bytes. Checks: no panic, no allocation past the size bounds (a zstd bomb
//! must be refused, not inflated), and whatever decodes matches its entry.
#![no_main]

use libfuzzer_sys::fuzz_target;
use uplift_proto::ChunkHash;
use uplift_release::chunk::{decode_chunk, decode_named_chunk, sha256};
use uplift_release::manifest::{ChunkEntry, MAX_CHUNK_SIZE};

const HEADER: usize = 4 + 1 + 32;

fuzz_target!(|data: &[u8]| {
    if data.len() < HEADER {
        return;
    }
    let raw_size = u32::from_le_bytes(data[0..4].try_into().unwrap());
    // Up to MAX_CHUNK_SIZE + 16, so the over-limit refusal is reached too.
    let size = raw_size % (MAX_CHUNK_SIZE + 17);
    let flags = data[4];
    let stored = &data[HEADER..];
    let hash = if flags & 1 == 1 {
        // The digest of what the frame really holds (decoded here by zstd's
        // bulk API into a buffer capped at the declared size), so the
        // success path is reachable without the fuzzer solving sha256.
        sha256(&zstd::bulk::decompress(stored, size as usize).unwrap_or_default())
    } else {
        ChunkHash::from_bytes(data[5..HEADER].try_into().unwrap())
    };
    let stored_size = if flags & 2 == 2 {
        // A declared stored size that need not match the bytes.
        raw_size.rotate_left(16)
    } else {
        stored.len() as u32
    };
    let entry = ChunkEntry {
        hash,
        size,
        stored_size,
    };
    if let Ok(chunk) = decode_chunk(&entry, stored) {
        assert_eq!(chunk.len() as u64, u64::from(size));
        assert!(size <= MAX_CHUNK_SIZE);
        assert_eq!(sha256(&chunk), hash);
    }
    if let Ok(chunk) = decode_named_chunk(&hash, stored, size) {
        assert!(chunk.len() as u64 <= u64::from(size.min(MAX_CHUNK_SIZE)));
        assert_eq!(sha256(&chunk), hash);
    }
});
