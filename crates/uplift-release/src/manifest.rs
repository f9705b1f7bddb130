//! The release manifest (what an image is made of) and its signed envelope.
//!
//! The signature covers the manifest's JSON text exactly as stored in
//! [`SignedManifest::signed`], so verifiers never re-serialize and there is
//! no canonical-JSON ambiguity.

use crate::chunk::max_stored_size;
use crate::error::ReleaseError;
use crate::keys::{ReleasePublicKey, ReleaseSigningKey};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use ed25519_dalek::{Signature, Signer as _};
use serde::{Deserialize, Serialize};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use uplift_proto::{ChunkHash, DeviceType, Version};

pub const MANIFEST_FORMAT: u32 = 1;
pub const MAX_MANIFEST_BYTES: usize = 8 * 1024 * 1024;
/// Largest uncompressed chunk, the bound every decoder allocates against.
pub const MAX_CHUNK_SIZE: u32 = 1024 * 1024;
/// More signatures than any key rotation needs; the bound keeps a hostile
/// manifest from making a device run thousands of verifications.
pub const MAX_SIGNATURES: usize = 16;
/// Most chunks a patch may use as its base: with [`MAX_CHUNK_SIZE`], the
/// bound on what a device reads and holds to apply one patch.
pub const MAX_PATCH_BASES: usize = 8;

/// Domain separation: a manifest signature can never be mistaken for a
/// signature over anything else made with the same key.
const SIGNATURE_CONTEXT: &[u8] = b"uplift manifest v1\0";

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: u32,
    pub version: Version,
    pub device_type: DeviceType,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339; devices refuse the manifest from then on.
    pub expires_at: String,
    pub image: ImageInfo,
    pub compression: Compression,
    /// In image order. Empty in the signed text when the list is in the
    /// binary [`chunk_index`](Self::chunk_index) instead; filled from it by
    /// [`attach_index`](Self::attach_index).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chunks: Vec<ChunkEntry>,
    /// The chunk list as a compact binary file (see [`crate::index`]),
    /// bound to the signed text by its digest and length: the manifest
    /// stays small whatever the image's size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunk_index: Option<ChunkIndexRef>,
    /// Smaller ways to send some chunks to a device that holds their bases
    /// (`release create --delta-from`), in the order of the chunks they
    /// make; a device without the bases fetches the whole chunk instead.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub patches: Vec<PatchEntry>,
    /// The release key's permission to downgrade: this release may be
    /// installed over any version up to and including this one, newer
    /// versions included (`release create --may-replace-up-to`). Absent,
    /// as in every manifest made before it existed, it may replace only
    /// older versions (or its own), so a rollout can never downgrade to it,
    /// whatever the server says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub may_replace_up_to: Option<Version>,
}

/// Where a manifest's chunk list is, when it is not inline.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ChunkIndexRef {
    /// sha256 of the index file.
    pub sha256: ChunkHash,
    /// Chunk entries in it.
    pub chunks: u64,
}

impl ChunkIndexRef {
    /// The index file's exact length.
    pub fn bytes(&self) -> u64 {
        self.chunks
            .saturating_mul(crate::index::RECORD_BYTES as u64)
    }
}

/// A chunk as a zstd frame compressed against other chunks (its bases,
/// concatenated in order, as the frame's prefix): typically the most
/// similar chunks of the release it was built against. Applied, it must
/// hash to `chunk`, as every chunk does.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PatchEntry {
    /// The chunk it makes.
    pub chunk: ChunkHash,
    /// The chunks whose bytes, back to back, are the prefix.
    pub base: Vec<ChunkHash>,
    /// sha256 of the patch as stored and sent; also its storage name.
    pub hash: ChunkHash,
    pub stored_size: u32,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ImageInfo {
    pub size: u64,
    pub sha256: ChunkHash,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    Zstd,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(deny_unknown_fields)]
pub struct ChunkEntry {
    /// sha256 of the uncompressed bytes; also the chunk's storage name.
    pub hash: ChunkHash,
    /// Uncompressed size.
    pub size: u32,
    /// Compressed size, as stored and downloaded.
    pub stored_size: u32,
}

impl Manifest {
    /// Whether the release key allows this release to replace `running`:
    /// always for an older (or the same) version, and for a newer one only
    /// up to [`may_replace_up_to`](Self::may_replace_up_to).
    pub fn may_replace(&self, running: &Version) -> bool {
        *running <= self.version
            || self
                .may_replace_up_to
                .as_ref()
                .is_some_and(|up_to| running <= up_to)
    }

    /// Whether the release key allows this release to replace any newer
    /// version at all: what a rollout that may downgrade needs.
    pub fn allows_downgrades(&self) -> bool {
        self.may_replace_up_to
            .as_ref()
            .is_some_and(|up_to| *up_to > self.version)
    }

    pub fn validate(&self) -> Result<(), ReleaseError> {
        let invalid = |reason: String| ReleaseError::ManifestInvalid {
            version: self.version.to_string(),
            reason,
        };
        if self.format != MANIFEST_FORMAT {
            return Err(invalid(format!(
                "it has format {}, this build reads format {MANIFEST_FORMAT}; upgrade this software to install it",
                self.format
            )));
        }
        if let Some(up_to) = &self.may_replace_up_to {
            // Refused rather than ignored: whoever set it meant to allow a
            // downgrade, and a release that silently allows none would
            // surprise them only when a device refuses it.
            if *up_to <= self.version {
                return Err(invalid(format!(
                    "may_replace_up_to {up_to} is not newer than the release itself, so it allows no \
                     downgrade; leave it out or name the newest version this release may replace"
                )));
            }
        }
        if let Some(index) = &self.chunk_index {
            if index.chunks == 0 || index.chunks > crate::index::MAX_CHUNKS {
                return Err(invalid(format!(
                    "its chunk index has {} entries, must be 1..={}; rebuild the release",
                    index.chunks,
                    crate::index::MAX_CHUNKS
                )));
            }
            if self.chunks.is_empty() {
                // The rest is checked once the index is attached.
                return self.validate_times(&invalid);
            }
            if self.chunks.len() as u64 != index.chunks {
                return Err(invalid(format!(
                    "its chunk index has {} entries but {} chunks are listed",
                    index.chunks,
                    self.chunks.len()
                )));
            }
        }
        if self.chunks.is_empty() {
            return Err(invalid(
                "it lists no chunks; rebuild the release from a non-empty image".to_owned(),
            ));
        }
        let mut total: u64 = 0;
        for (i, chunk) in self.chunks.iter().enumerate() {
            if chunk.size == 0 || chunk.size > MAX_CHUNK_SIZE {
                return Err(invalid(format!(
                    "chunk {i} ({}) has size {}, must be 1..={MAX_CHUNK_SIZE}; rebuild the release",
                    chunk.hash, chunk.size
                )));
            }
            let bound = max_stored_size(chunk.size);
            if chunk.stored_size == 0 || u64::from(chunk.stored_size) > bound {
                return Err(invalid(format!(
                    "chunk {i} ({}) has stored size {}, must be 1..={bound} for {} bytes; rebuild the release",
                    chunk.hash, chunk.stored_size, chunk.size
                )));
            }
            total += u64::from(chunk.size);
        }
        self.validate_patches(&invalid)?;
        if total != self.image.size {
            return Err(invalid(format!(
                "its chunk sizes add up to {total} bytes but the image is {} bytes; rebuild the release",
                self.image.size
            )));
        }
        self.validate_times(&invalid)
    }

    fn validate_times(
        &self,
        invalid: &impl Fn(String) -> ReleaseError,
    ) -> Result<(), ReleaseError> {
        let created = parse_time(&self.created_at).map_err(|e| {
            invalid(format!(
                "created_at {:?} is not RFC 3339: {e}",
                self.created_at
            ))
        })?;
        let expires = parse_time(&self.expires_at).map_err(|e| {
            invalid(format!(
                "expires_at {:?} is not RFC 3339: {e}",
                self.expires_at
            ))
        })?;
        if expires <= created {
            return Err(invalid(format!(
                "it expires ({}) before it was created ({}); rebuild it with a positive validity",
                self.expires_at, self.created_at
            )));
        }
        Ok(())
    }

    /// True while the chunk list is still in a separate index file.
    pub fn needs_index(&self) -> bool {
        self.chunk_index.is_some() && self.chunks.is_empty()
    }

    /// Fills the chunk list from the index file the signed text names
    /// (exact length and digest), then validates the whole manifest.
    pub fn attach_index(&mut self, index: &[u8]) -> Result<(), ReleaseError> {
        let Some(reference) = self.chunk_index else {
            return Ok(());
        };
        self.chunks = crate::index::decode(index, &reference).map_err(|reason| {
            ReleaseError::ManifestInvalid {
                version: self.version.to_string(),
                reason: format!("its chunk index {reason}; fetch it again or rebuild the release"),
            }
        })?;
        self.validate()
    }

    /// Patches must make chunks of this release, in chunk order, one per
    /// chunk, no larger than the chunk's own bound, on a bounded base.
    fn validate_patches(
        &self,
        invalid: &impl Fn(String) -> ReleaseError,
    ) -> Result<(), ReleaseError> {
        if self.patches.is_empty() {
            return Ok(());
        }
        let mut first_at: std::collections::HashMap<ChunkHash, (usize, u32)> =
            std::collections::HashMap::with_capacity(self.chunks.len());
        for (i, chunk) in self.chunks.iter().enumerate() {
            first_at.entry(chunk.hash).or_insert((i, chunk.size));
        }
        let mut previous: Option<usize> = None;
        for (i, patch) in self.patches.iter().enumerate() {
            let Some(&(at, size)) = first_at.get(&patch.chunk) else {
                return Err(invalid(format!(
                    "patch {i} makes chunk {}, which the release does not list; rebuild the release",
                    patch.chunk
                )));
            };
            if previous.is_some_and(|p| p >= at) {
                return Err(invalid(format!(
                    "patch {i} (for chunk {}) is out of chunk order or repeats a chunk; rebuild the release",
                    patch.chunk
                )));
            }
            previous = Some(at);
            if patch.base.is_empty() || patch.base.len() > MAX_PATCH_BASES {
                return Err(invalid(format!(
                    "patch {i} (for chunk {}) has {} base chunks, must be 1..={MAX_PATCH_BASES}; rebuild the release",
                    patch.chunk,
                    patch.base.len()
                )));
            }
            let bound = max_stored_size(size);
            if patch.stored_size == 0 || u64::from(patch.stored_size) > bound {
                return Err(invalid(format!(
                    "patch {i} (for chunk {}) has stored size {}, must be 1..={bound}; rebuild the release",
                    patch.chunk, patch.stored_size
                )));
            }
        }
        Ok(())
    }

    /// Bytes of all patches: what a device holding every base downloads
    /// for the patched chunks.
    pub fn patch_bytes(&self) -> u64 {
        self.patches.iter().map(|p| u64::from(p.stored_size)).sum()
    }

    /// Each chunk with its byte offset in the image.
    pub fn chunk_offsets(&self) -> impl Iterator<Item = (u64, &ChunkEntry)> + '_ {
        self.chunks.iter().scan(0u64, |offset, chunk| {
            let at = *offset;
            *offset += u64::from(chunk.size);
            Some((at, chunk))
        })
    }

    /// Bytes a device downloads if it has none of the chunks.
    pub fn stored_bytes(&self) -> u64 {
        self.chunks.iter().map(|c| u64::from(c.stored_size)).sum()
    }
}

fn parse_time(text: &str) -> Result<OffsetDateTime, time::error::Parse> {
    OffsetDateTime::parse(text, &Rfc3339)
}

fn format_time(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_else(|_| t.to_string())
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SignedManifest {
    /// The manifest's JSON text: exactly the bytes that were signed.
    pub signed: String,
    pub signatures: Vec<ManifestSignature>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ManifestSignature {
    /// [`ReleasePublicKey::key_id`] of the signer.
    pub key_id: String,
    /// ed25519 signature, standard base64.
    pub signature: String,
}

fn signing_message(signed: &str) -> Vec<u8> {
    in_context(SIGNATURE_CONTEXT, signed)
}

/// What is signed: a context (domain separation), then the text as stored.
pub(crate) fn in_context(context: &[u8], signed: &str) -> Vec<u8> {
    [context, signed.as_bytes()].concat()
}

/// `key`'s signature over `signed` in `context`.
pub(crate) fn signature_in(
    context: &[u8],
    key: &ReleaseSigningKey,
    signed: &str,
) -> ManifestSignature {
    let signature = key.signing_key().sign(&in_context(context, signed));
    ManifestSignature {
        key_id: key.public_key().key_id(),
        signature: B64.encode(signature.to_bytes()),
    }
}

/// Adds `signature`, replacing one by the same key.
pub(crate) fn put_signature(signatures: &mut Vec<ManifestSignature>, signature: ManifestSignature) {
    signatures.retain(|s| s.key_id != signature.key_id);
    signatures.push(signature);
}

/// A signed envelope as written to a file: pretty JSON and a newline.
pub(crate) fn envelope_json(envelope: &impl Serialize) -> Vec<u8> {
    let mut out = serde_json::to_vec_pretty(envelope).expect("strings and lists always serialize");
    out.push(b'\n');
    out
}

fn signature_by(key: &ReleaseSigningKey, signed: &str) -> ManifestSignature {
    signature_in(SIGNATURE_CONTEXT, key, signed)
}

/// Signs a manifest; refuses one that devices would reject anyway.
pub fn sign_manifest(
    manifest: &Manifest,
    key: &ReleaseSigningKey,
) -> Result<SignedManifest, ReleaseError> {
    manifest.validate()?;
    let signed = serde_json::to_string(manifest).map_err(|e| ReleaseError::ManifestParse {
        reason: format!("cannot serialize manifest: {e}"),
    })?;
    let signatures = vec![signature_by(key, &signed)];
    Ok(SignedManifest { signed, signatures })
}

impl SignedManifest {
    pub fn from_json(bytes: &[u8]) -> Result<SignedManifest, ReleaseError> {
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(ReleaseError::ManifestTooLarge {
                size: bytes.len() as u64,
                limit: MAX_MANIFEST_BYTES,
            });
        }
        serde_json::from_slice(bytes).map_err(|e| ReleaseError::ManifestFile {
            reason: e.to_string(),
        })
    }

    pub fn to_json(&self) -> Vec<u8> {
        envelope_json(self)
    }

    /// Adds another signature over the same text, e.g. while rotating keys
    /// so devices trusting either key accept the release.
    pub fn add_signature(&mut self, key: &ReleaseSigningKey) {
        put_signature(&mut self.signatures, signature_by(key, &self.signed));
    }

    /// Everything a device checks before using a manifest: a trusted
    /// signature, a well-formed manifest, and not expired at `now`.
    pub fn verify(
        &self,
        trusted: &[ReleasePublicKey],
        now: OffsetDateTime,
    ) -> Result<Manifest, ReleaseError> {
        self.verify_signature(trusted)?;
        let manifest = self.parse_unverified()?;
        let expires =
            parse_time(&manifest.expires_at).map_err(|e| ReleaseError::ManifestInvalid {
                version: manifest.version.to_string(),
                reason: format!("expires_at is not RFC 3339: {e}"),
            })?;
        if now >= expires {
            return Err(ReleaseError::ManifestExpired {
                version: manifest.version.to_string(),
                expires_at: manifest.expires_at.clone(),
                now: format_time(now),
            });
        }
        Ok(manifest)
    }

    /// Like [`verify`](Self::verify), requiring `threshold` distinct keys
    /// among `keys` to have signed (the release role of a
    /// [`crate::root::TrustedRoot`]).
    pub fn verify_threshold(
        &self,
        keys: &[ReleasePublicKey],
        threshold: usize,
        now: OffsetDateTime,
    ) -> Result<Manifest, ReleaseError> {
        if self.signatures.len() > MAX_SIGNATURES {
            return Err(ReleaseError::ManifestFile {
                reason: format!(
                    "it carries {} signatures, at most {MAX_SIGNATURES} are accepted",
                    self.signatures.len()
                ),
            });
        }
        let valid =
            crate::root::valid_signers(&self.signatures, keys, &signing_message(&self.signed));
        if valid.is_empty() {
            // Says whether no trusted key signed or a signature is bad.
            self.verify_signature(keys)?;
        }
        if valid.len() < threshold.max(1) {
            return Err(ReleaseError::ManifestThreshold {
                valid: valid.len(),
                threshold,
            });
        }
        self.verify(keys, now)
    }

    /// Parses and validates without checking signatures or expiry: for the
    /// server, which stores and serves releases but never holds their keys.
    pub fn parse_unverified(&self) -> Result<Manifest, ReleaseError> {
        if self.signed.len() > MAX_MANIFEST_BYTES {
            return Err(ReleaseError::ManifestTooLarge {
                size: self.signed.len() as u64,
                limit: MAX_MANIFEST_BYTES,
            });
        }
        let manifest: Manifest =
            serde_json::from_str(&self.signed).map_err(|e| ReleaseError::ManifestParse {
                reason: e.to_string(),
            })?;
        manifest.validate()?;
        Ok(manifest)
    }

    fn verify_signature(&self, trusted: &[ReleasePublicKey]) -> Result<(), ReleaseError> {
        if self.signed.len() > MAX_MANIFEST_BYTES {
            return Err(ReleaseError::ManifestTooLarge {
                size: self.signed.len() as u64,
                limit: MAX_MANIFEST_BYTES,
            });
        }
        if self.signatures.len() > MAX_SIGNATURES {
            return Err(ReleaseError::ManifestFile {
                reason: format!(
                    "it carries {} signatures, at most {MAX_SIGNATURES} are accepted",
                    self.signatures.len()
                ),
            });
        }
        let trusted_ids: Vec<String> = trusted.iter().map(ReleasePublicKey::key_id).collect();
        let message = signing_message(&self.signed);
        let mut failed_key = None;
        for sig in &self.signatures {
            for (key, _) in trusted
                .iter()
                .zip(&trusted_ids)
                .filter(|(_, id)| **id == sig.key_id)
            {
                let verified = B64
                    .decode(&sig.signature)
                    .ok()
                    .and_then(|bytes| Signature::from_slice(&bytes).ok())
                    .is_some_and(|signature| {
                        key.verifying_key()
                            .verify_strict(&message, &signature)
                            .is_ok()
                    });
                if verified {
                    return Ok(());
                }
                failed_key = Some(sig.key_id.clone());
            }
        }
        match failed_key {
            Some(key_id) => Err(ReleaseError::BadManifestSignature { key_id }),
            None => Err(ReleaseError::UntrustedManifest {
                // Key ids come from the (untrusted) file: keep them short so
                // they cannot flood logs and reports.
                seen: self
                    .signatures
                    .iter()
                    .map(|s| s.key_id.chars().take(64).collect())
                    .collect(),
                trusted: trusted_ids,
            }),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::chunk::{encode_chunk, sha256};
    use time::macros::datetime;
    use uplift_proto::ErrorKind;

    pub(crate) fn release_key() -> ReleaseSigningKey {
        ReleaseSigningKey::from_seed([42; 32])
    }

    /// A small valid manifest of two chunks, valid during 2025.
    pub(crate) fn two_chunk_manifest() -> Manifest {
        let a = vec![1u8; 1000];
        let b = vec![2u8; 500];
        let entry = |data: &[u8]| ChunkEntry {
            hash: sha256(data),
            size: data.len() as u32,
            stored_size: encode_chunk(data).unwrap().len() as u32,
        };
        let image: Vec<u8> = a.iter().chain(&b).copied().collect();
        Manifest {
            format: MANIFEST_FORMAT,
            version: "1.2.3".parse().unwrap(),
            device_type: "gateway-x86".parse().unwrap(),
            created_at: "2025-01-01T00:00:00Z".to_owned(),
            expires_at: "2026-01-01T00:00:00Z".to_owned(),
            image: ImageInfo {
                size: image.len() as u64,
                sha256: sha256(&image),
            },
            compression: Compression::Zstd,
            chunks: vec![entry(&a), entry(&b)],
            chunk_index: None,
            patches: Vec::new(),
            may_replace_up_to: None,
        }
    }

    #[test]
    fn patches_must_make_listed_chunks_in_order_on_a_bounded_base() {
        let mut m = two_chunk_manifest();
        let patch = |chunk: ChunkHash| PatchEntry {
            chunk,
            base: vec![sha256(b"old")],
            hash: sha256(b"patch"),
            stored_size: 10,
        };
        let (a, b) = (m.chunks[0].hash, m.chunks[1].hash);
        m.patches = vec![patch(a), patch(b)];
        m.validate().expect("two patches in chunk order");
        let reject = |m: &Manifest, what: &str| {
            let err = m.validate().unwrap_err().to_string();
            assert!(err.contains(what), "{err}");
        };
        m.patches = vec![patch(b), patch(a)];
        reject(&m, "out of chunk order");
        m.patches = vec![patch(sha256(b"not in the release"))];
        reject(&m, "does not list");
        m.patches = vec![PatchEntry {
            base: vec![a; MAX_PATCH_BASES + 1],
            ..patch(a)
        }];
        reject(&m, "base chunks");
        m.patches = vec![PatchEntry {
            stored_size: 0,
            ..patch(a)
        }];
        reject(&m, "stored size");
        // A manifest without patches keeps the format older agents read.
        m.patches.clear();
        assert!(!serde_json::to_string(&m).unwrap().contains("patches"));
    }

    #[test]
    fn a_release_replaces_newer_versions_only_up_to_what_its_key_signed() {
        let v = |s: &str| s.parse::<Version>().unwrap();
        let mut m = two_chunk_manifest(); // 1.2.3
        assert!(m.may_replace(&v("1.0")) && m.may_replace(&v("1.2.3")));
        assert!(!m.may_replace(&v("1.3")), "no downgrade without its word");
        assert!(!m.allows_downgrades());
        // Older manifests keep their signed text: the field is left out.
        assert!(!serde_json::to_string(&m).unwrap().contains("may_replace"));

        m.may_replace_up_to = Some(v("1.4"));
        m.validate().expect("a newer ceiling");
        assert!(m.allows_downgrades());
        assert!(m.may_replace(&v("1.3")) && m.may_replace(&v("1.4")));
        assert!(!m.may_replace(&v("1.4.1")) && !m.may_replace(&v("2.0")));

        m.may_replace_up_to = Some(v("1.2.3"));
        let err = m.validate().unwrap_err().to_string();
        assert!(err.contains("allows no downgrade"), "{err}");
    }

    const MID_2025: OffsetDateTime = datetime!(2025-06-01 00:00 UTC);

    #[test]
    fn signed_manifest_round_trips_through_json_and_verifies() {
        let key = release_key();
        let manifest = two_chunk_manifest();
        let signed = sign_manifest(&manifest, &key).unwrap();
        let back = SignedManifest::from_json(&signed.to_json()).unwrap();
        assert_eq!(back, signed);
        assert_eq!(
            back.verify(&[key.public_key()], MID_2025).unwrap(),
            manifest
        );
        assert_eq!(back.parse_unverified().unwrap(), manifest);
    }

    #[test]
    fn manifest_signed_by_unknown_key_is_rejected_naming_its_key_id() {
        let attacker = ReleaseSigningKey::from_seed([66; 32]);
        let signed = sign_manifest(&two_chunk_manifest(), &attacker).unwrap();
        let err = signed
            .verify(&[release_key().public_key()], MID_2025)
            .unwrap_err();
        assert!(
            matches!(err, ReleaseError::UntrustedManifest { .. }),
            "{err:?}"
        );
        assert_eq!(err.kind(), ErrorKind::ManifestSignature);
        let msg = err.to_string();
        assert!(msg.contains(&attacker.public_key().key_id()), "{msg}");
        assert!(msg.contains(&release_key().public_key().key_id()), "{msg}");
        assert!(msg.contains("trusted_release_keys"), "{msg}");
    }

    #[test]
    fn manifest_with_forged_key_id_of_a_trusted_key_is_rejected() {
        let attacker = ReleaseSigningKey::from_seed([66; 32]);
        let mut signed = sign_manifest(&two_chunk_manifest(), &attacker).unwrap();
        signed.signatures[0].key_id = release_key().public_key().key_id();
        let err = signed
            .verify(&[release_key().public_key()], MID_2025)
            .unwrap_err();
        assert!(
            matches!(err, ReleaseError::BadManifestSignature { .. }),
            "{err:?}"
        );
    }

    #[test]
    fn tampered_version_in_signed_text_is_rejected() {
        let key = release_key();
        let mut signed = sign_manifest(&two_chunk_manifest(), &key).unwrap();
        assert!(signed.signed.contains("\"1.2.3\""));
        signed.signed = signed.signed.replace("\"1.2.3\"", "\"9.9.9\"");
        // Still a perfectly valid manifest, only the signature betrays it.
        assert_eq!(signed.parse_unverified().unwrap().version.as_str(), "9.9.9");
        let err = signed.verify(&[key.public_key()], MID_2025).unwrap_err();
        assert!(
            matches!(err, ReleaseError::BadManifestSignature { .. }),
            "{err:?}"
        );
        assert_eq!(err.kind(), ErrorKind::ManifestSignature);
    }

    #[test]
    fn signature_without_the_manifest_context_is_rejected() {
        // A signature made by the right key over the bare text (as some
        // other tool using the same key might produce) must not count.
        let key = release_key();
        let mut signed = sign_manifest(&two_chunk_manifest(), &key).unwrap();
        let bare = key.signing_key().sign(signed.signed.as_bytes());
        signed.signatures[0].signature = B64.encode(bare.to_bytes());
        let err = signed.verify(&[key.public_key()], MID_2025).unwrap_err();
        assert!(
            matches!(err, ReleaseError::BadManifestSignature { .. }),
            "{err:?}"
        );
    }

    #[test]
    fn manifest_with_no_signatures_is_rejected() {
        let mut signed = sign_manifest(&two_chunk_manifest(), &release_key()).unwrap();
        signed.signatures.clear();
        let err = signed
            .verify(&[release_key().public_key()], MID_2025)
            .unwrap_err();
        assert!(
            matches!(err, ReleaseError::UntrustedManifest { .. }),
            "{err:?}"
        );
    }

    #[test]
    fn any_one_trusted_signature_suffices() {
        let old = ReleaseSigningKey::from_seed([1; 32]);
        let new = release_key();
        let mut signed = sign_manifest(&two_chunk_manifest(), &old).unwrap();
        signed.add_signature(&new);
        assert_eq!(signed.signatures.len(), 2);
        signed.verify(&[new.public_key()], MID_2025).unwrap();
        signed.verify(&[old.public_key()], MID_2025).unwrap();
    }

    #[test]
    fn expired_manifest_is_rejected() {
        let key = release_key();
        let signed = sign_manifest(&two_chunk_manifest(), &key).unwrap();
        for now in [
            datetime!(2026-01-01 00:00 UTC),
            datetime!(2030-01-01 00:00 UTC),
        ] {
            let err = signed.verify(&[key.public_key()], now).unwrap_err();
            assert!(
                matches!(err, ReleaseError::ManifestExpired { .. }),
                "{err:?}"
            );
            assert_eq!(err.kind(), ErrorKind::ManifestExpired);
            assert!(err.to_string().contains("2026-01-01T00:00:00Z"), "{err}");
        }
        signed
            .verify(&[key.public_key()], datetime!(2025-12-31 23:59:59 UTC))
            .unwrap();
    }

    #[test]
    fn chunks_not_adding_up_to_the_image_size_fail_validation() {
        let mut manifest = two_chunk_manifest();
        manifest.image.size += 1;
        let err = manifest.validate().unwrap_err();
        assert!(
            matches!(err, ReleaseError::ManifestInvalid { .. }),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(msg.contains("1500") && msg.contains("1501"), "{msg}");
        // And such a manifest cannot be signed either.
        assert!(sign_manifest(&manifest, &release_key()).is_err());
    }

    #[test]
    fn malformed_manifests_fail_validation() {
        type Fault = fn(&mut Manifest);
        let faults: [(&str, Fault); 8] = [
            ("future format", |m| m.format = 2),
            ("no chunks", |m| {
                m.chunks.clear();
                m.image.size = 0;
            }),
            ("empty chunk", |m| {
                m.image.size -= u64::from(m.chunks[1].size);
                m.chunks[1].size = 0;
            }),
            ("oversized chunk", |m| {
                m.image.size += u64::from(MAX_CHUNK_SIZE);
                m.chunks[1].size += MAX_CHUNK_SIZE;
            }),
            ("zero stored size", |m| m.chunks[0].stored_size = 0),
            ("stored size over the zstd bound", |m| {
                m.chunks[0].stored_size = 1_000_000
            }),
            ("expires before created", |m| {
                m.expires_at = "2024-01-01T00:00:00Z".to_owned()
            }),
            ("unparsable time", |m| m.created_at = "yesterday".to_owned()),
        ];
        for (name, fault) in faults {
            let mut manifest = two_chunk_manifest();
            manifest.validate().unwrap();
            fault(&mut manifest);
            let err = manifest.validate().expect_err(name);
            assert_eq!(err.kind(), ErrorKind::ManifestInvalid, "{name}: {err}");
        }
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let signed = sign_manifest(&two_chunk_manifest(), &release_key()).unwrap();
        let mut value: serde_json::Value = serde_json::from_slice(&signed.to_json()).unwrap();
        value["note"] = "hi".into();
        assert!(SignedManifest::from_json(value.to_string().as_bytes()).is_err());

        let mut inner: serde_json::Value = serde_json::from_str(&signed.signed).unwrap();
        inner["install_script"] = "rm -rf /".into();
        let smuggled = SignedManifest {
            signed: inner.to_string(),
            signatures: vec![],
        };
        let err = smuggled.parse_unverified().unwrap_err();
        assert!(matches!(err, ReleaseError::ManifestParse { .. }), "{err:?}");
    }

    #[test]
    fn oversized_manifest_file_is_refused_before_parsing() {
        let huge = vec![b' '; MAX_MANIFEST_BYTES + 1];
        let err = SignedManifest::from_json(&huge).unwrap_err();
        assert!(
            matches!(err, ReleaseError::ManifestTooLarge { .. }),
            "{err:?}"
        );
        assert_eq!(err.kind(), ErrorKind::PayloadTooLarge);
    }

    #[test]
    fn chunk_offsets_and_stored_bytes_follow_the_chunk_list() {
        let manifest = two_chunk_manifest();
        let offsets: Vec<u64> = manifest.chunk_offsets().map(|(o, _)| o).collect();
        assert_eq!(offsets, vec![0, 1000]);
        assert_eq!(
            manifest.stored_bytes(),
            u64::from(manifest.chunks[0].stored_size) + u64::from(manifest.chunks[1].stored_size)
        );
    }
}
