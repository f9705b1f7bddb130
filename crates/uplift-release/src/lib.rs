//! The Uplift release format: an OS image cut into content-defined chunks,
//! each zstd-compressed and named by the sha256 of its content, described by
//! a manifest signed with an ed25519 release key.
//!
//! Release builders use [`create_release`]; the server checks uploads with
//! [`SignedManifest::parse_unverified`] and [`decode_named_chunk`] (it never
//! holds release keys); agents trust nothing until [`SignedManifest::verify`]
//! and [`decode_chunk`] have checked it, chunk by chunk, as it streams in.

pub mod build;
pub mod chunk;
pub mod delta;
pub mod error;
pub mod freshness;
pub mod index;
pub mod keys;
pub mod manifest;
pub mod root;
pub mod seed;
pub mod sparse;

pub use build::{create_release, ReleaseDir, ReleaseOptions, ReleaseSummary};
pub use chunk::{decode_chunk, decode_named_chunk, encode_chunk, sha256, ImageHasher};
pub use error::ReleaseError;
pub use keys::{read_public_key_file, write_public_key_file, ReleasePublicKey, ReleaseSigningKey};
pub use manifest::{
    sign_manifest, ChunkEntry, Compression, ImageInfo, Manifest, ManifestSignature, PatchEntry,
    SignedManifest, MANIFEST_FORMAT, MAX_CHUNK_SIZE, MAX_MANIFEST_BYTES,
};
pub use root::{Role, Root, SignedRoot, TrustedRoot};
