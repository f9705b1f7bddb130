//! The one error type of this crate, with a stable [`ErrorKind`] for each
//! variant so agents and the server can report it over the wire.

use std::path::PathBuf;
use uplift_proto::{ChunkHash, ErrorKind, WireError};

#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    #[error("cannot {action} {path}: {source}")]
    Io {
        /// What was being done, e.g. "read the image".
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("key file {path} already exists; refusing to overwrite a signing key: move it away or choose another path")]
    KeyFileExists { path: PathBuf },

    #[error("invalid {what}: {reason}")]
    InvalidKey {
        /// Which key and where it came from, e.g. "signing key in /etc/x.pem".
        what: String,
        reason: String,
    },

    #[error("manifest is {size} bytes, over the limit of {limit} bytes; refusing to parse it")]
    ManifestTooLarge { size: u64, limit: usize },

    #[error("signed manifest file is not valid JSON of the expected shape: {reason}")]
    ManifestFile { reason: String },

    #[error("manifest has no signature by a trusted key (signed by key ids [{}], trusted are [{}]); add the release public key to the agent's `trusted_release_keys`", .seen.join(", "), .trusted.join(", "))]
    UntrustedManifest {
        seen: Vec<String>,
        trusted: Vec<String>,
    },

    #[error("manifest is signed by {valid} of the {threshold} release keys the device's root requires; have more release key holders sign it (`uplift release sign`)")]
    ManifestThreshold { valid: usize, threshold: usize },

    #[error("the root of trust file is not valid JSON of the expected shape: {reason}")]
    RootFile { reason: String },

    #[error("root of trust version {version} is invalid: {reason}; fix it and sign it again")]
    RootInvalid { version: u64, reason: String },

    #[error("root of trust version {offered} cannot follow the trusted version {trusted}: roots are applied one version at a time; send the chain from version {} on", .trusted + 1)]
    RootVersion { trusted: u64, offered: u64 },

    #[error("root of trust version {version} is signed by {valid} of the {threshold} {role} keys required; it was altered, or not enough key holders signed it")]
    RootThreshold {
        version: u64,
        role: crate::root::RoleName,
        valid: usize,
        threshold: u32,
    },

    #[error("root of trust version {version} expired at {expires_at}; the device needs a newer root (`uplift root` on the offline key holders' machines, then upload it to the server)")]
    RootExpired { version: u64, expires_at: String },

    #[error("the offer carries no signed freshness, and the device's root requires it; the server needs its online key ([trust] freshness_key, named in the root's freshness role)")]
    FreshnessMissing,

    #[error("the offer's freshness is invalid: {reason}")]
    FreshnessInvalid { reason: String },

    #[error("the offer's freshness is signed by {valid} of the {threshold} freshness keys the device's root requires (signed by key ids [{}]); the server's online key is not the one the root names, or the record was altered", .seen.join(", "))]
    FreshnessSignature {
        valid: usize,
        threshold: u32,
        seen: Vec<String>,
    },

    #[error("the offer's freshness is for {what} {said}, not {wanted}; refusing an offer meant for something else")]
    FreshnessMismatch {
        what: &'static str,
        said: String,
        wanted: String,
    },

    #[error("the offer's freshness expired at {expires_at} (now {now}): a stale or replayed offer; the server sends a fresh one when the device reconnects (check the device clock)")]
    FreshnessExpired { expires_at: String, now: String },

    #[error("the offer's freshness was issued at {issued_at}, before the newest one this device accepted ({newest}): an old offer replayed; refused")]
    FreshnessReplayed { issued_at: String, newest: String },

    #[error("manifest signature by trusted key {key_id} does not verify: the manifest was altered or corrupted after signing; fetch it again or re-sign the release")]
    BadManifestSignature { key_id: String },

    #[error("manifest text does not parse: {reason}")]
    ManifestParse { reason: String },

    #[error("manifest of version {version} is invalid: {reason}; rebuild the release")]
    ManifestInvalid { version: String, reason: String },

    #[error("manifest of version {version} expired at {expires_at} (now {now}); publish a freshly signed release or check the device clock")]
    ManifestExpired {
        version: String,
        expires_at: String,
        now: String,
    },

    #[error("chunk {hash} decodes to data with sha256 {actual}; the chunk is corrupt or was substituted: discard it and fetch it again")]
    ChunkHashMismatch { hash: ChunkHash, actual: ChunkHash },

    #[error("chunk {hash} is {actual} bytes stored, the manifest says {declared}; discard it and fetch it again")]
    ChunkStoredSize {
        hash: ChunkHash,
        declared: u64,
        actual: u64,
    },

    #[error("chunk {hash} decompresses to {actual} bytes, the manifest says {declared}; discard it and fetch it again")]
    ChunkSize {
        hash: ChunkHash,
        declared: u32,
        actual: u64,
    },

    #[error("chunk {hash} is {size} bytes stored, more than any valid chunk of at most {limit} bytes; refusing it")]
    StoredChunkTooLarge {
        hash: ChunkHash,
        size: u64,
        limit: u32,
    },

    #[error("chunk {hash} decompresses to more than its limit of {limit} bytes; refusing it (possible decompression bomb)")]
    ChunkTooLarge { hash: ChunkHash, limit: u32 },

    #[error("chunk {hash} is not a valid zstd stream within its limits: {reason}; discard it and fetch it again")]
    ChunkCorrupt { hash: ChunkHash, reason: String },

    #[error("the patch for chunk {chunk} does not apply: {reason}; fetch the whole chunk instead")]
    PatchDoesNotApply { chunk: ChunkHash, reason: String },

    #[error("cannot compress a chunk: {reason}")]
    Compress { reason: String },

    #[error("image {path} is empty; a release needs a non-empty image")]
    EmptyImage { path: PathBuf },

    #[error("release directory {path} is not usable: {reason}")]
    ReleaseDir { path: PathBuf, reason: String },

    #[error("release options are invalid: {reason}")]
    Options { reason: String },
}

impl ReleaseError {
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        ReleaseError::Io {
            action,
            path: path.into(),
            source,
        }
    }

    pub fn kind(&self) -> ErrorKind {
        match self {
            ReleaseError::Io { .. } => ErrorKind::Storage,
            ReleaseError::KeyFileExists { .. } => ErrorKind::Conflict,
            ReleaseError::InvalidKey { .. } => ErrorKind::BadRequest,
            ReleaseError::ManifestTooLarge { .. } => ErrorKind::PayloadTooLarge,
            ReleaseError::ManifestFile { .. } => ErrorKind::ManifestInvalid,
            ReleaseError::UntrustedManifest { .. } => ErrorKind::ManifestSignature,
            ReleaseError::BadManifestSignature { .. } => ErrorKind::ManifestSignature,
            ReleaseError::ManifestThreshold { .. } => ErrorKind::ManifestSignature,
            ReleaseError::RootFile { .. } => ErrorKind::RootInvalid,
            ReleaseError::RootInvalid { .. } => ErrorKind::RootInvalid,
            ReleaseError::RootVersion { .. } => ErrorKind::RootInvalid,
            ReleaseError::RootThreshold { .. } => ErrorKind::RootSignature,
            ReleaseError::RootExpired { .. } => ErrorKind::RootExpired,
            ReleaseError::FreshnessMissing
            | ReleaseError::FreshnessInvalid { .. }
            | ReleaseError::FreshnessSignature { .. }
            | ReleaseError::FreshnessMismatch { .. } => ErrorKind::FreshnessInvalid,
            ReleaseError::FreshnessExpired { .. } => ErrorKind::FreshnessExpired,
            ReleaseError::FreshnessReplayed { .. } => ErrorKind::FreshnessReplayed,
            ReleaseError::ManifestParse { .. } => ErrorKind::ManifestInvalid,
            ReleaseError::ManifestInvalid { .. } => ErrorKind::ManifestInvalid,
            ReleaseError::ManifestExpired { .. } => ErrorKind::ManifestExpired,
            ReleaseError::ChunkHashMismatch { .. } => ErrorKind::ChunkHashMismatch,
            // A chunk whose stored bytes do not match the manifest is handled
            // like a hash mismatch: discarded and fetched again.
            ReleaseError::ChunkStoredSize { .. } => ErrorKind::ChunkHashMismatch,
            ReleaseError::ChunkSize { .. } => ErrorKind::ChunkHashMismatch,
            ReleaseError::ChunkTooLarge { .. } => ErrorKind::PayloadTooLarge,
            ReleaseError::StoredChunkTooLarge { .. } => ErrorKind::PayloadTooLarge,
            ReleaseError::ChunkCorrupt { .. } => ErrorKind::ChunkHashMismatch,
            ReleaseError::PatchDoesNotApply { .. } => ErrorKind::ChunkHashMismatch,
            ReleaseError::Compress { .. } => ErrorKind::Internal,
            ReleaseError::EmptyImage { .. } => ErrorKind::BadRequest,
            ReleaseError::ReleaseDir { .. } => ErrorKind::NotFound,
            ReleaseError::Options { .. } => ErrorKind::BadRequest,
        }
    }

    pub fn to_wire(&self) -> WireError {
        WireError::new(self.kind(), self.to_string())
    }
}
