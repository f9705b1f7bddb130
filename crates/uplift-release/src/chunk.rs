//! Chunk encoding and decoding. Chunks arrive from the network and from
//! disk, so decoding bounds every size before trusting it and checks the
//! digest of everything it returns.

use crate::error::ReleaseError;
use crate::manifest::{ChunkEntry, PatchEntry, MAX_CHUNK_SIZE};
use sha2::{Digest, Sha256};
use uplift_proto::ChunkHash;

/// zstd level for chunks: fast to build, and decompression speed on devices
/// hardly depends on it.
pub const COMPRESSION_LEVEL: i32 = 3;

pub fn sha256(data: &[u8]) -> ChunkHash {
    ChunkHash::from_bytes(Sha256::digest(data).into())
}

/// Incremental sha256 of a whole image, fed chunk by chunk.
#[derive(Debug, Clone, Default)]
pub struct ImageHasher {
    hasher: Sha256,
    len: u64,
}

impl ImageHasher {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn update(&mut self, data: &[u8]) {
        self.hasher.update(data);
        self.len += data.len() as u64;
    }

    /// Bytes hashed so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn finish(self) -> ChunkHash {
        ChunkHash::from_bytes(self.hasher.finalize().into())
    }
}

/// Largest stored (compressed) size a valid chunk of `size` bytes can have.
pub fn max_stored_size(size: u32) -> u64 {
    zstd::zstd_safe::compress_bound(size as usize) as u64
}

pub fn encode_chunk(data: &[u8]) -> Result<Vec<u8>, ReleaseError> {
    // The bulk API knows the input size, so the frame records its content
    // size and uses a window no larger than the chunk: decoders can then
    // run with a window limit derived from the chunk's declared size.
    zstd::bulk::compress(data, COMPRESSION_LEVEL).map_err(|e| ReleaseError::Compress {
        reason: format!("zstd failed on {} bytes: {e}", data.len()),
    })
}

/// Decodes a chunk described by a (verified) manifest entry.
pub fn decode_chunk(entry: &ChunkEntry, stored: &[u8]) -> Result<Vec<u8>, ReleaseError> {
    ChunkDecoder::new().decode(entry, stored)
}

/// Decodes many chunks with one zstd context: creating one per chunk cost
/// the agent 3 % of a fleet download's CPU (perf).
pub struct ChunkDecoder {
    dctx: zstd::zstd_safe::DCtx<'static>,
}

impl std::fmt::Debug for ChunkDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkDecoder").finish_non_exhaustive()
    }
}

impl Default for ChunkDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl ChunkDecoder {
    pub fn new() -> Self {
        Self {
            dctx: zstd::zstd_safe::DCtx::create(),
        }
    }

    /// [`decode_chunk`] with this decoder's context.
    pub fn decode(&mut self, entry: &ChunkEntry, stored: &[u8]) -> Result<Vec<u8>, ReleaseError> {
        if stored.len() as u64 != u64::from(entry.stored_size) {
            return Err(ReleaseError::ChunkStoredSize {
                hash: entry.hash,
                declared: u64::from(entry.stored_size),
                actual: stored.len() as u64,
            });
        }
        if entry.size > MAX_CHUNK_SIZE {
            return Err(ReleaseError::ChunkTooLarge {
                hash: entry.hash,
                limit: MAX_CHUNK_SIZE,
            });
        }
        let window = window_log_for(entry.size);
        let data = decompress_limited(&mut self.dctx, &entry.hash, stored, entry.size, window)?;
        if data.len() as u64 != u64::from(entry.size) {
            return Err(ReleaseError::ChunkSize {
                hash: entry.hash,
                declared: entry.size,
                actual: data.len() as u64,
            });
        }
        check_hash(&entry.hash, data)
    }
}

/// Decompresses into a buffer of `limit` + 1 bytes, so a frame that
/// expands further is caught when it fills it, whatever it declares; the
/// window is capped near `limit`, so neither costs more memory than the
/// chunk may have.
fn decompress_limited(
    dctx: &mut zstd::zstd_safe::DCtx<'_>,
    hash: &ChunkHash,
    stored: &[u8],
    limit: u32,
    window_log: u32,
) -> Result<Vec<u8>, ReleaseError> {
    use zstd::zstd_safe::{get_error_name, DParameter, InBuffer, OutBuffer, ResetDirective};
    let corrupt = |reason: &str| ReleaseError::ChunkCorrupt {
        hash: *hash,
        reason: reason.to_owned(),
    };
    // Fail fast, and with the right error, when the frame admits its size.
    if let Ok(Some(declared)) = zstd::zstd_safe::get_frame_content_size(stored) {
        if declared > u64::from(limit) {
            return Err(ReleaseError::ChunkTooLarge { hash: *hash, limit });
        }
    }
    let zstd_err = |code| corrupt(get_error_name(code));
    dctx.reset(ResetDirective::SessionOnly).map_err(zstd_err)?;
    dctx.set_parameter(DParameter::WindowLogMax(window_log))
        .map_err(zstd_err)?;
    let mut out: Vec<u8> = Vec::with_capacity(limit as usize + 1);
    let mut input = InBuffer::around(stored);
    loop {
        let (read_before, written_before) = (input.pos(), out.len());
        let hint = {
            let mut output = OutBuffer::around_pos(&mut out, written_before);
            dctx.decompress_stream(&mut output, &mut input)
                .map_err(zstd_err)?
        };
        if out.len() > limit as usize {
            return Err(ReleaseError::ChunkTooLarge { hash: *hash, limit });
        }
        if hint == 0 && input.pos() == stored.len() {
            return Ok(out);
        }
        if input.pos() == read_before && out.len() == written_before {
            return Err(corrupt("the zstd frame ends before its data does"));
        }
    }
}

/// Compresses `data` as a patch against `base`: one zstd frame whose prefix
/// is the base, so whatever the chunk shares with it costs a few bytes.
pub fn encode_patch(data: &[u8], base: &[u8], level: i32) -> Result<Vec<u8>, ReleaseError> {
    use zstd::zstd_safe::{get_error_name, CCtx, CParameter};
    let failed = |code| ReleaseError::Compress {
        reason: format!(
            "zstd failed on a patch of {} bytes against {} bytes: {}",
            data.len(),
            base.len(),
            get_error_name(code)
        ),
    };
    let mut cctx = CCtx::create();
    cctx.set_parameter(CParameter::CompressionLevel(level))
        .map_err(failed)?;
    // The window must reach from the chunk's end back to the base's start.
    let window = window_log_for(u32::try_from(base.len() + data.len()).unwrap_or(u32::MAX));
    cctx.set_parameter(CParameter::WindowLog(window))
        .map_err(failed)?;
    cctx.ref_prefix(base).map_err(failed)?;
    let mut out = vec![0u8; zstd::zstd_safe::compress_bound(data.len())];
    let len = cctx.compress2(&mut out[..], data).map_err(failed)?;
    out.truncate(len);
    Ok(out)
}

/// The bytes of `chunk` from its patch and its base (the base chunks'
/// bytes back to back, each already checked by the caller). The patch must
/// be the one the manifest lists (size and digest), and what it makes must
/// hash to the chunk: nothing unverified ever leaves this function.
pub fn apply_patch(
    patch: &PatchEntry,
    chunk: &ChunkEntry,
    stored: &[u8],
    base: &[u8],
) -> Result<Vec<u8>, ReleaseError> {
    let fail = |reason: String| ReleaseError::PatchDoesNotApply {
        chunk: chunk.hash,
        reason,
    };
    if stored.len() as u64 != u64::from(patch.stored_size) {
        return Err(fail(format!(
            "it is {} bytes, the manifest says {}",
            stored.len(),
            patch.stored_size
        )));
    }
    let actual = sha256(stored);
    if actual != patch.hash {
        return Err(fail(format!(
            "it has sha256 {actual}, the manifest says {}",
            patch.hash
        )));
    }
    if chunk.size > MAX_CHUNK_SIZE {
        return Err(ReleaseError::ChunkTooLarge {
            hash: chunk.hash,
            limit: MAX_CHUNK_SIZE,
        });
    }
    let mut dctx = zstd::zstd_safe::DCtx::create();
    dctx.ref_prefix(base)
        .map_err(|code| fail(zstd::zstd_safe::get_error_name(code).to_owned()))?;
    let window = window_log_for(
        u32::try_from(base.len())
            .unwrap_or(u32::MAX)
            .saturating_add(chunk.size),
    );
    let data = decompress_limited(&mut dctx, &chunk.hash, stored, chunk.size, window)
        .map_err(|e| fail(e.to_string()))?;
    if data.len() as u64 != u64::from(chunk.size) {
        return Err(fail(format!(
            "it makes {} bytes, the chunk has {}",
            data.len(),
            chunk.size
        )));
    }
    check_hash(&chunk.hash, data).map_err(|e| fail(e.to_string()))
}

/// Decodes a chunk known only by its name (the server's upload check): at
/// most `max_size` bytes uncompressed, and its digest must be `hash`.
pub fn decode_named_chunk(
    hash: &ChunkHash,
    stored: &[u8],
    max_size: u32,
) -> Result<Vec<u8>, ReleaseError> {
    let max_size = max_size.min(MAX_CHUNK_SIZE);
    if stored.len() as u64 > max_stored_size(max_size) {
        return Err(ReleaseError::StoredChunkTooLarge {
            hash: *hash,
            size: stored.len() as u64,
            limit: max_size,
        });
    }
    let mut dctx = zstd::zstd_safe::DCtx::create();
    let data = decompress_limited(&mut dctx, hash, stored, max_size, window_log_for(max_size))?;
    check_hash(hash, data)
}

fn check_hash(hash: &ChunkHash, data: Vec<u8>) -> Result<Vec<u8>, ReleaseError> {
    let actual = sha256(&data);
    if actual != *hash {
        return Err(ReleaseError::ChunkHashMismatch {
            hash: *hash,
            actual,
        });
    }
    Ok(data)
}

/// Decompresses at most `limit` bytes. Output is cut off at `limit + 1`
/// bytes and the decoder's window is capped near `limit`, so neither a
/// frame that expands without bound nor one that demands a huge window can
/// make us allocate more than about twice the limit.
/// Smallest window log covering `limit` bytes, within zstd's range: a frame
/// for a chunk never needs a window larger than the chunk itself.
fn window_log_for(limit: u32) -> u32 {
    let log = u32::BITS - limit.saturating_sub(1).leading_zeros();
    log.clamp(10, 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use uplift_proto::ErrorKind;

    fn entry_for(data: &[u8], stored: &[u8]) -> ChunkEntry {
        ChunkEntry {
            hash: sha256(data),
            size: data.len() as u32,
            stored_size: stored.len() as u32,
        }
    }

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

    #[test]
    fn chunks_round_trip_at_many_sizes() {
        for len in [
            1,
            100,
            4096,
            65_536,
            100_000,
            256 * 1024,
            MAX_CHUNK_SIZE as usize,
        ] {
            let data = pseudo_random(len, len as u64 + 1);
            let stored = encode_chunk(&data).unwrap();
            assert!(stored.len() as u64 <= max_stored_size(len as u32));
            let entry = entry_for(&data, &stored);
            assert_eq!(decode_chunk(&entry, &stored).unwrap(), data, "len {len}");
            assert_eq!(
                decode_named_chunk(&entry.hash, &stored, MAX_CHUNK_SIZE).unwrap(),
                data
            );
        }
    }

    #[test]
    fn substituted_chunk_fails_with_hash_mismatch() {
        let wanted = pseudo_random(5000, 1);
        let substitute = pseudo_random(5000, 2);
        let stored = encode_chunk(&substitute).unwrap();
        let entry = ChunkEntry {
            hash: sha256(&wanted),
            size: 5000,
            stored_size: stored.len() as u32,
        };
        let err = decode_chunk(&entry, &stored).unwrap_err();
        match &err {
            ReleaseError::ChunkHashMismatch { hash, actual } => {
                assert_eq!(*hash, sha256(&wanted));
                assert_eq!(*actual, sha256(&substitute));
            }
            other => panic!("expected ChunkHashMismatch, got {other:?}"),
        }
        assert_eq!(err.kind(), ErrorKind::ChunkHashMismatch);
        assert!(
            decode_named_chunk(&sha256(&wanted), &stored, MAX_CHUNK_SIZE).is_err(),
            "upload check accepted a chunk under someone else's name"
        );
    }

    #[test]
    fn zstd_bomb_with_declared_size_is_refused_as_too_large() {
        let ten_mib = vec![0u8; 10 * 1024 * 1024];
        let bomb = zstd::bulk::compress(&ten_mib, 19).unwrap();
        assert!(bomb.len() < 2048, "bomb should be tiny, is {}", bomb.len());
        let entry = ChunkEntry {
            hash: sha256(&ten_mib),
            size: 1024,
            stored_size: bomb.len() as u32,
        };
        let err = decode_chunk(&entry, &bomb).unwrap_err();
        assert!(
            matches!(err, ReleaseError::ChunkTooLarge { limit: 1024, .. }),
            "{err:?}"
        );
        assert_eq!(err.kind(), ErrorKind::PayloadTooLarge);
    }

    /// 10 MiB of zeros, streamed with a 1 KiB window and no pledged size:
    /// the frame header does not reveal the size, so only the output cap
    /// stops it. Built and hashed 1 MiB at a time so that making the bomb
    /// does not itself use 10 MiB.
    fn bomb_without_declared_size() -> (Vec<u8>, ChunkHash) {
        let mut encoder = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
        encoder.window_log(10).unwrap();
        encoder.include_contentsize(false).unwrap();
        let block = vec![0u8; 1024 * 1024];
        let mut hasher = ImageHasher::new();
        for _ in 0..10 {
            encoder.write_all(&block).unwrap();
            hasher.update(&block);
        }
        let bomb = encoder.finish().unwrap();
        assert_eq!(
            zstd::zstd_safe::get_frame_content_size(&bomb)
                .ok()
                .flatten(),
            None
        );
        (bomb, hasher.finish())
    }

    #[test]
    fn zstd_bomb_without_declared_size_is_cut_off_at_the_limit() {
        let (bomb, hash) = bomb_without_declared_size();
        let entry = ChunkEntry {
            hash,
            size: 1024,
            stored_size: bomb.len() as u32,
        };
        let err = decode_chunk(&entry, &bomb).unwrap_err();
        assert!(
            matches!(err, ReleaseError::ChunkTooLarge { limit: 1024, .. }),
            "{err:?}"
        );
        let err = decode_named_chunk(&hash, &bomb, 64 * 1024).unwrap_err();
        assert!(
            matches!(err, ReleaseError::ChunkTooLarge { limit: 65_536, .. }),
            "{err:?}"
        );
    }

    /// Peak resident memory of this process, in KiB (Linux only).
    #[cfg(target_os = "linux")]
    fn peak_rss_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .expect("VmHWM in /proc/self/status");
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    /// Runs in a child process (see the test below) so that no other test
    /// moves the high-water mark while it measures.
    #[cfg(target_os = "linux")]
    #[test]
    #[ignore = "run in a child process by zstd_bomb_does_not_allocate_its_expanded_size"]
    fn zstd_bomb_memory_probe() {
        let (bomb, hash) = bomb_without_declared_size();
        let entry = ChunkEntry {
            hash,
            size: 1024,
            stored_size: bomb.len() as u32,
        };
        // Building the bomb raised the high-water mark (encoder tables);
        // reset it so only the decode is measured.
        std::fs::write("/proc/self/clear_refs", "5").unwrap();
        let before = peak_rss_kib();
        let result = decode_chunk(&entry, &bomb);
        let grown = peak_rss_kib().saturating_sub(before);
        assert!(result.is_err());
        assert!(
            grown < 4 * 1024,
            "decoding a 1 KiB chunk raised peak memory by {grown} KiB"
        );
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn zstd_bomb_does_not_allocate_its_expanded_size() {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "chunk::tests::zstd_bomb_memory_probe",
                "--ignored",
                "--test-threads=1",
            ])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("1 passed"),
            "memory probe failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn frame_demanding_a_huge_window_is_refused() {
        // A tiny payload whose header asks the decoder for a 128 MiB window:
        // honouring it would let a few bytes reserve a lot of memory.
        let mut encoder = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
        encoder.window_log(27).unwrap();
        encoder.include_contentsize(false).unwrap();
        let data = pseudo_random(4096, 9);
        encoder.write_all(&data).unwrap();
        let stored = encoder.finish().unwrap();
        let err = decode_chunk(&entry_for(&data, &stored), &stored).unwrap_err();
        assert!(matches!(err, ReleaseError::ChunkCorrupt { .. }), "{err:?}");
    }

    #[test]
    fn stored_bytes_longer_than_declared_are_refused() {
        let data = pseudo_random(3000, 3);
        let stored = encode_chunk(&data).unwrap();
        let entry = entry_for(&data, &stored);
        let mut padded = stored.clone();
        padded.extend_from_slice(&[0; 16]);
        let err = decode_chunk(&entry, &padded).unwrap_err();
        assert!(
            matches!(
                err,
                ReleaseError::ChunkStoredSize { declared, actual, .. }
                    if declared == stored.len() as u64 && actual == padded.len() as u64
            ),
            "{err:?}"
        );
        // A truncated download is caught the same way.
        let err = decode_chunk(&entry, &stored[..stored.len() - 1]).unwrap_err();
        assert!(
            matches!(err, ReleaseError::ChunkStoredSize { .. }),
            "{err:?}"
        );
    }

    #[test]
    fn chunk_shorter_than_declared_is_refused() {
        let data = pseudo_random(3000, 4);
        let stored = encode_chunk(&data).unwrap();
        let mut entry = entry_for(&data, &stored);
        entry.size = 3001;
        let err = decode_chunk(&entry, &stored).unwrap_err();
        assert!(
            matches!(
                err,
                ReleaseError::ChunkSize {
                    declared: 3001,
                    actual: 3000,
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn garbage_instead_of_zstd_is_refused_as_corrupt() {
        let garbage = pseudo_random(500, 5);
        let hash = sha256(b"whatever");
        let err = decode_named_chunk(&hash, &garbage, MAX_CHUNK_SIZE).unwrap_err();
        assert!(matches!(err, ReleaseError::ChunkCorrupt { .. }), "{err:?}");
        assert!(err.to_string().contains(&hash.to_hex()), "{err}");
    }

    #[test]
    fn upload_over_the_size_limit_is_refused() {
        // Incompressible: caught on the stored size alone.
        let noise = pseudo_random(70_000, 6);
        let stored = encode_chunk(&noise).unwrap();
        let err = decode_named_chunk(&sha256(&noise), &stored, 65_536).unwrap_err();
        assert!(
            matches!(err, ReleaseError::StoredChunkTooLarge { limit: 65_536, .. }),
            "{err:?}"
        );
        assert_eq!(err.kind(), ErrorKind::PayloadTooLarge);
        // Compressible: small when stored, caught on decompression.
        let zeros = vec![0u8; 70_000];
        let stored = encode_chunk(&zeros).unwrap();
        let err = decode_named_chunk(&sha256(&zeros), &stored, 65_536).unwrap_err();
        assert!(
            matches!(err, ReleaseError::ChunkTooLarge { limit: 65_536, .. }),
            "{err:?}"
        );
    }

    #[test]
    fn window_log_covers_the_limit() {
        assert_eq!(window_log_for(0), 10);
        assert_eq!(window_log_for(1024), 10);
        assert_eq!(window_log_for(1025), 11);
        assert_eq!(window_log_for(MAX_CHUNK_SIZE), 20);
        assert_eq!(window_log_for(u32::MAX), 31);
    }

    #[test]
    fn image_hasher_matches_one_shot_digest() {
        let data = pseudo_random(100_000, 7);
        let mut hasher = ImageHasher::new();
        for part in data.chunks(777) {
            hasher.update(part);
        }
        assert_eq!(hasher.len(), 100_000);
        assert_eq!(hasher.finish(), sha256(&data));
    }
}
