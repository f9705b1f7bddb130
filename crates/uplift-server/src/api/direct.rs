//! Direct downloads (`[artifacts] direct_downloads = true`): once a device's
//! chunk request is authorized and its object checked good, the server
//! answers `307 Temporary Redirect` to a short-lived presigned URL of the
//! object in the object store, and the device fetches the bytes from there.
//! A span request is redirected to its first object only (the store keeps
//! each object under its own name); the agent then asks again for the rest.
//!
//! Integrity does not depend on the store or the URL: devices check every
//! chunk's SHA-256 against the signed manifest. The URL is a capability to
//! read one immutable object for `presign_secs`; it carries no device
//! credential, and the device never sends its session token to the store.

use super::ApiError;
use crate::chunks::StoredKind;
use crate::service::releases::store_of;
use crate::state::AppState;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use std::sync::atomic::Ordering;
use uplift_proto::ChunkHash;

/// The redirect to `hash` in the object store, when direct downloads are on.
pub(super) async fn redirect(
    state: &AppState,
    kind: StoredKind,
    hash: &ChunkHash,
) -> Result<Option<Response>, ApiError> {
    let Some(url) = store_of(state, kind).direct_url(hash).await? else {
        return Ok(None);
    };
    let location = HeaderValue::from_str(url.as_str()).map_err(|e| {
        ApiError::internal(format!(
            "the object store's presigned URL for {} {hash} is not a valid header: {e}",
            kind.noun()
        ))
    })?;
    state.stats.redirects.fetch_add(1, Ordering::Relaxed);
    Ok(Some(
        (
            StatusCode::TEMPORARY_REDIRECT,
            [
                (header::LOCATION, location),
                // The URL expires: no cache may keep this answer.
                (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
            ],
        )
            .into_response(),
    ))
}
