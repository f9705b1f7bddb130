//! Releases and the objects they are made of: what is stored, what an
//! uploader still has to send, and taking in a release once it is whole.

use super::{audit, ServiceError, ServiceResult, Stored};
use crate::auth::Principal;
use crate::chunks::{Chunks, LoadError, StoredKind};
use crate::state::AppState;
use crate::store::{ReleaseRecord, StoreError, Timestamp};
use bytes::Bytes;
use uplift_proto::api::{MissingChunksRequest, MissingChunksResponse, ReleaseView};
use uplift_proto::auth::AuditAction;
use uplift_proto::ChunkHash;
use uplift_release::manifest::{SignedManifest, MAX_CHUNK_SIZE};

pub async fn view(state: &AppState, r: &ReleaseRecord) -> ReleaseView {
    ReleaseView {
        version: r.version.clone(),
        device_type: r.device_type.clone(),
        image_size: r.image_size,
        image_sha256: r.image_sha256.clone(),
        chunks: r.chunks,
        stored_bytes: r.stored_bytes,
        created_at: r.created_at.to_string(),
        damaged_chunks: state.chunks.damaged_in(r).await,
        key_ids: r.key_ids.clone(),
        expires_at: r.expires_at.map(|t| t.to_string()),
    }
}

/// Every stored release, oldest first.
pub async fn list(state: &AppState) -> ServiceResult<Vec<ReleaseView>> {
    let mut views = Vec::new();
    for release in state.store.list_releases().await? {
        views.push(view(state, &release).await);
    }
    Ok(views)
}

/// Which of the named chunks and patches the server lacks.
pub async fn missing(
    state: &AppState,
    request: MissingChunksRequest,
) -> ServiceResult<MissingChunksResponse> {
    let mut missing = Vec::new();
    // Checked, not just found: a damaged copy is missing, so the uploader
    // sends it again (and that repairs the release).
    for hash in request.chunks {
        if state.chunks.checked_len(&hash).await?.is_none() {
            missing.push(hash);
        }
    }
    let mut missing_patches = Vec::new();
    for hash in request.patches {
        if state.patches.checked_len(&hash).await?.is_none() {
            missing_patches.push(hash);
        }
    }
    Ok(MissingChunksResponse {
        missing,
        missing_patches,
    })
}

pub fn store_of(state: &AppState, kind: StoredKind) -> &Chunks {
    match kind {
        StoredKind::Chunk => &state.chunks,
        StoredKind::Patch => &state.patches,
        StoredKind::Index => &state.indexes,
    }
}

/// Stores an uploaded chunk, patch or index named by its digest. One that
/// does not match its name is refused: otherwise one bad upload would make
/// every device fail verification, and the store would hold bytes the
/// signed manifest does not vouch for.
pub async fn store_object(
    state: &AppState,
    kind: StoredKind,
    hash: ChunkHash,
    body: Bytes,
) -> ServiceResult<Stored> {
    let store = store_of(state, kind);
    // Already stored and checked: nothing to do. A damaged copy (any size)
    // does not count, and is replaced below.
    if store.checked_len(&hash).await?.is_some() {
        return Ok(Stored::AlreadyPresent);
    }
    let check = body.clone();
    let checked = tokio::task::spawn_blocking(move || match kind {
        // A chunk's own decoder says precisely what is wrong with it.
        StoredKind::Chunk => {
            uplift_release::chunk::decode_named_chunk(&hash, &check, MAX_CHUNK_SIZE)
                .map(drop)
                .map_err(|source| ServiceError::ChunkRefused { hash, source })
        }
        StoredKind::Patch | StoredKind::Index => kind
            .check(&hash, &check)
            .map_err(|why| ServiceError::ObjectRefused { kind, hash, why }),
    })
    .await
    .map_err(|source| ServiceError::CheckPanicked { kind, hash, source })?;
    checked?;
    store.store(&hash, body).await?;
    Ok(Stored::Created)
}

/// Takes in a release by its signed manifest, once every chunk and patch
/// it lists is stored. The server holds no release keys (agents verify
/// signatures): it checks the manifest is well-formed and complete (its
/// index too) so it never offers a broken one.
///
/// Recorded in the audit log as `actor`'s.
pub async fn upload(
    state: &AppState,
    actor: &Principal,
    manifest_json: &[u8],
) -> ServiceResult<(Stored, ReleaseView)> {
    let result = take_in(state, manifest_json).await;
    let target = match &result {
        Ok((_, view)) => format!("release {}", view.version),
        Err(ServiceError::ReleaseIncomplete { version, .. }) => format!("release {version}"),
        // A manifest that does not load names no version to trust.
        Err(_) => "release (unreadable manifest)".to_owned(),
    };
    audit::record(state, actor, AuditAction::ReleaseUpload, &target, &result).await;
    result
}

async fn take_in(state: &AppState, manifest_json: &[u8]) -> ServiceResult<(Stored, ReleaseView)> {
    let manifest = crate::chunks::load_manifest(&state.indexes, manifest_json).await?;
    let mut missing = 0usize;
    // Stored, checked, and of the size the manifest declares (devices
    // refuse a chunk longer than declared).
    for entry in &manifest.chunks {
        if state.chunks.checked_len(&entry.hash).await? != Some(u64::from(entry.stored_size)) {
            missing += 1;
        }
    }
    for patch in &manifest.patches {
        if state.patches.checked_len(&patch.hash).await? != Some(u64::from(patch.stored_size)) {
            missing += 1;
        }
    }
    if missing > 0 {
        return Err(ServiceError::ReleaseIncomplete {
            version: manifest.version,
            missing,
        });
    }
    // Who signed it, as the manifest says: shown to operators, never
    // trusted here (agents check the signatures against their own keys).
    // The manifest loaded above, so its envelope parses again.
    let key_ids = SignedManifest::from_json(manifest_json)
        .map_err(|source| LoadError::Manifest {
            version: manifest.version.to_string(),
            source,
        })?
        .signatures
        .into_iter()
        .map(|s| s.key_id)
        .collect();
    let record = ReleaseRecord {
        version: manifest.version.clone(),
        device_type: manifest.device_type.clone(),
        manifest_json: manifest_json.to_vec(),
        image_size: manifest.image.size,
        image_sha256: manifest.image.sha256.to_hex(),
        chunks: manifest.chunks.len() as u64,
        stored_bytes: manifest.stored_bytes(),
        created_at: Timestamp::now(),
        key_ids,
        // Validated (RFC 3339) when the manifest was verified.
        expires_at: Timestamp::parse_rfc3339(&manifest.expires_at).ok(),
    };
    publish(state, &manifest, manifest_json).await?;
    match state.store.insert_release(&record).await {
        Ok(()) => {
            tracing::info!(version = %record.version, device_type = %record.device_type, "release uploaded");
            Ok((Stored::Created, view(state, &record).await))
        }
        // The same release again, every chunk now present and checked: a
        // repair after damage, and a success. Another manifest under the
        // same version stays refused: releases are immutable.
        Err(conflict @ StoreError::Conflict(_)) => {
            match state.store.release(&record.version).await? {
                Some(stored) if stored.manifest_json == record.manifest_json => {
                    tracing::info!(version = %stored.version, "release uploaded again: every chunk present and checked");
                    Ok((Stored::AlreadyPresent, view(state, &stored).await))
                }
                _ => Err(conflict.into()),
            }
        }
        Err(e) => Err(e.into()),
    }
}

/// The signed manifest (and chunk index) where the chunk store keeps
/// releases by version (object storage), before the release is recorded:
/// once it is listed, a fleet finds it there too.
async fn publish(
    state: &AppState,
    manifest: &uplift_release::Manifest,
    manifest_json: &[u8],
) -> ServiceResult<()> {
    let index = match manifest.chunk_index {
        Some(reference) => state.indexes.read_verified(&reference.sha256).await?,
        None => None,
    };
    state
        .artifacts
        .publish_release(
            &manifest.version,
            bytes::Bytes::copy_from_slice(manifest_json),
            index,
        )
        .await
        .map_err(crate::chunks::ChunkError::from)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::testing;
    use uplift_proto::ErrorKind;

    #[tokio::test]
    async fn an_object_is_stored_once_and_only_under_its_own_name() {
        let dir = tempfile::tempdir().unwrap();
        let state = testing::state(dir.path()).await;
        let patch = Bytes::from_static(b"a patch's bytes");
        let name = uplift_release::sha256(&patch);

        let store = |hash, body| store_object(&state, StoredKind::Patch, hash, body);
        assert_eq!(store(name, patch.clone()).await.unwrap(), Stored::Created);
        assert_eq!(
            store(name, patch.clone()).await.unwrap(),
            Stored::AlreadyPresent
        );

        let other = uplift_release::sha256(b"something else");
        let err = store(other, patch.clone()).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ChunkHashMismatch);
        assert!(
            err.to_string().starts_with(&format!(
                "patch {other} is refused: its bytes have sha256 {name}"
            )),
            "{err}"
        );
        let missing = missing(
            &state,
            MissingChunksRequest {
                chunks: vec![name],
                patches: vec![name, other],
            },
        )
        .await
        .unwrap();
        // A chunk and a patch of the same name are different objects.
        assert_eq!(missing.missing, vec![name]);
        assert_eq!(missing.missing_patches, vec![other]);
    }

    #[tokio::test]
    async fn a_chunk_that_does_not_decode_to_its_name_is_refused_with_the_decoders_reason() {
        let dir = tempfile::tempdir().unwrap();
        let state = testing::state(dir.path()).await;
        let name = uplift_release::sha256(b"the chunk");
        let err = store_object(
            &state,
            StoredKind::Chunk,
            name,
            Bytes::from_static(b"not zstd"),
        )
        .await
        .unwrap_err();
        let ServiceError::ChunkRefused { hash, source } = &err else {
            panic!("{err:?}");
        };
        assert_eq!(*hash, name);
        assert_eq!(err.kind(), source.kind());
        assert_eq!(err.to_string(), source.to_string());
        assert!(state.chunks.checked_len(&name).await.unwrap().is_none());
    }
}
