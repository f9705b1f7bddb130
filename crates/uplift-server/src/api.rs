//! HTTP routes: the admin REST API (bearer API token; each handler names
//! the permission it needs with an [`Allowed`] argument), the device
//! download endpoints (bearer session token from the device channel), and
//! health. Admin handlers parse the request and answer it; what they do is
//! in [`crate::service`]. Device downloads are served here directly: they are
//! the hot path, and only read the release cache and the chunk stores.

use crate::auth::{self, Administer, Allowed, Operate, Read, Release};
use crate::budget;
use crate::channel;
use crate::chunks::StoredKind;
use crate::chunks::MAX_STORED_CHUNK;
use crate::error::ApiError;
use crate::service::{self, releases::store_of, Stored};
use crate::state::{AppState, Listed, ServedRelease};
use axum::body::{Body, Bytes};
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use futures_util::{StreamExt, TryStreamExt};
use std::num::NonZeroUsize;
use std::sync::Arc;
use uplift_proto::api::*;
use uplift_proto::auth::{
    AuditPage, AuditQuery, Caller, TokenCreate, TokenCreated, TokenView, AUDIT_PATH, TOKENS_PATH,
    WHOAMI_PATH,
};
use uplift_proto::channel::CHANNEL_PATH;
use uplift_proto::events::{
    DeliveryView, EventStreamQuery, WebhookCreate, WebhookCreated, WebhookView, EVENTS_PATH,
    WEBHOOKS_PATH,
};
use uplift_proto::{ChunkHash, DeviceId, Version, WireError};
use uplift_release::manifest::MAX_MANIFEST_BYTES;

mod direct;
mod enrollment;
pub mod openapi;
mod roots;

/// A chunk goes out in pieces of this size, each counted as it is sent.
const SEND_PIECE: usize = 64 * 1024;

/// Everything on one listener: devices and the admin API.
pub fn router(state: Arc<AppState>) -> Router {
    finish(admin_routes(&state).merge(device_routes(&state)), state)
}

/// Device traffic only (the channel and downloads), for a server whose
/// admin API has a listener of its own.
pub fn device_router(state: Arc<AppState>) -> Router {
    finish(device_routes(&state), state)
}

/// The admin API only.
pub fn admin_router(state: Arc<AppState>) -> Router {
    finish(admin_routes(&state), state)
}

fn admin_routes(state: &Arc<AppState>) -> Router<Arc<AppState>> {
    Router::new()
        // Devices: list (filters, pages), one device, its tags, its history.
        .route(DEVICES_PATH, get(list_devices))
        .route(
            "/api/v1/devices/{id}",
            get(show_device).delete(remove_device),
        )
        .route("/api/v1/devices/{id}/tags", put(tag_device))
        .route("/api/v1/devices/{id}/history", get(device_history))
        // Enrollment approval: the requests, and an operator's decisions.
        .route(
            uplift_proto::enrollment::ENROLLMENTS_PATH,
            get(enrollment::list_enrollments),
        )
        .route(
            "/api/v1/enrollments/{id}/accept",
            post(enrollment::accept_enrollment),
        )
        .route(
            "/api/v1/enrollments/{id}/reject",
            post(enrollment::reject_enrollment),
        )
        .route(RELEASES_PATH, get(list_releases).post(upload_release))
        .route(MISSING_CHUNKS_PATH, post(missing_chunks))
        .route("/api/v1/chunks/{hash}", put(upload_chunk))
        .route("/api/v1/patches/{hash}", put(upload_patch))
        .route(FLEET_PATH, get(fleet_summary))
        .route(ROLLOUTS_PATH, get(list_rollouts).post(start_rollout))
        // A static segment: the router prefers it to `{id}` (and it has
        // fewer segments than `{id}/{command}`), so no rollout is shadowed;
        // the route-order test below checks both.
        .route(ROLLOUT_PREVIEW_PATH, post(preview_rollout))
        .route("/api/v1/rollouts/{id}", get(show_rollout))
        .route("/api/v1/rollouts/{id}/devices", get(rollout_members))
        .route("/api/v1/rollouts/{id}/{command}", post(command_rollout))
        .route(STATS_PATH, get(stats))
        .route(METRICS_PATH, get(metrics))
        .route(TOKENS_PATH, get(list_tokens).post(create_token))
        .route("/api/v1/tokens/{id}", axum::routing::delete(revoke_token))
        .route(AUDIT_PATH, get(audit_log))
        .route(WHOAMI_PATH, get(whoami))
        .route(
            uplift_proto::trust::ROOTS_PATH,
            get(roots::list_roots).post(roots::publish_root),
        )
        // Events: the live stream, and webhooks with their delivery log.
        .route(EVENTS_PATH, get(event_stream))
        .route(WEBHOOKS_PATH, get(list_webhooks).post(create_webhook))
        .route(
            "/api/v1/webhooks/{id}",
            axum::routing::delete(remove_webhook),
        )
        .route("/api/v1/webhooks/{id}/deliveries", get(webhook_deliveries))
        .layer(DefaultBodyLimit::max(
            MAX_MANIFEST_BYTES.max(MAX_STORED_CHUNK),
        ))
        .route(
            "/api/v1/indexes/{hash}",
            put(upload_index).layer(DefaultBodyLimit::max(MAX_INDEX_UPLOAD)),
        )
        // Budget outside authentication: a flood of bad tokens is admin load too.
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::authenticate,
        ))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            budget::limit_admin,
        ))
        // After the layers: the API's shape is public, like /healthz, and
        // so is the web console (it holds no data; the API decides).
        .route(OPENAPI_PATH, get(openapi::serve))
        .merge(crate::web::routes(state))
}

fn device_routes(state: &Arc<AppState>) -> Router<Arc<AppState>> {
    Router::new()
        .route(
            "/v1/device/releases/{version}/manifest",
            get(device_manifest),
        )
        .route(roots::DEVICE_ROOTS_ROUTE, get(roots::device_roots))
        .route("/v1/device/chunks/{hash}", get(device_chunk))
        .route("/v1/device/releases/{version}/chunks", get(device_span))
        .route("/v1/device/releases/{version}/index", get(device_index))
        .route(
            "/v1/device/releases/{version}/patches",
            get(device_patch_span),
        )
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            budget::limit_downloads,
        ))
        // Outside the download budget: no body, no disk, one MAC; a site
        // cache asks it before every chunk it serves, hit or miss.
        .route(DEVICE_AUTHORIZE_PATH, get(device_authorize))
        .route(CHANNEL_PATH, get(channel::upgrade))
}

fn finish(routes: Router<Arc<AppState>>, state: Arc<AppState>) -> Router {
    routes
        .route(HEALTH_PATH, get(|| async { "ok" }))
        .method_not_allowed_fallback(|| async {
            // HTTP requires 405 here; the body is our usual JSON error.
            let mut response = ApiError::bad_request(
                "this endpoint does not take this HTTP method; see ARCHITECTURE.md for the API",
            )
            .into_response();
            *response.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
            response
        })
        .fallback(|| async {
            ApiError::not_found(
                "no such endpoint on this address (the admin API may have a listener of its own, \
                 admin_listen); see ARCHITECTURE.md for the API",
            )
        })
        .with_state(state)
}

/// The device a download request's signed token names, if the token is
/// valid now and its device enrolled; else a 401 whose kind says why.
async fn device_of(state: &AppState, headers: &HeaderMap) -> Result<DeviceId, ApiError> {
    Ok(authorized(state, headers).await?.device)
}

async fn authorized(
    state: &AppState,
    headers: &HeaderMap,
) -> Result<crate::download_token::Claims, ApiError> {
    let token = auth::bearer(headers).ok_or_else(|| {
        ApiError::unauthorized(
            "no download token: send `Authorization: Bearer <token>` with the token the device \
             channel gave (welcome, then download_token frames)",
        )
    })?;
    let claims = state
        .downloads
        .verify(token, crate::download_token::unix_now())?;
    if state.downloads.knows(&claims.device) {
        return Ok(claims);
    }
    // Signed by a replica for a device this one has not met yet: once per
    // device, the database says whether it is enrolled.
    match state.store.device(&claims.device).await? {
        Some(d) if d.removed_at.is_some() => Err(ApiError::new(
            uplift_proto::ErrorKind::DeviceRemoved,
            format!(
                "device {} was removed from the fleet at {}; its download token is refused",
                claims.device,
                d.removed_at.map(|at| at.to_string()).unwrap_or_default()
            ),
        )),
        Some(_) => {
            state.downloads.remember(&claims.device);
            Ok(claims)
        }
        None => Err(ApiError::new(
            uplift_proto::ErrorKind::DownloadTokenInvalid,
            format!(
                "device {} is not enrolled on this server; its download token is refused",
                claims.device
            ),
        )),
    }
}

/// The kind of an authorize refusal, as a header (see `device_authorize`).
const AUTHORIZE_KIND_HEADER: &str = "x-uplift-error-kind";

/// Longest a cache may reuse a "yes" for one token (never past the
/// token's expiry): how long a device removed from the fleet could still
/// be served from a site cache.
const AUTHORIZE_CACHE_SECS: u64 = 60;

/// `GET /v1/device/authorize`: 204 if the bearer token is a valid download
/// token of an enrolled device, else 401 with the usual JSON error; what a
/// site cache (nginx `auth_request`) asks before it serves a chunk. The
/// "yes" is cacheable per token (`Vary: Authorization`) for at most a
/// minute and never past the token's expiry; a refusal is never cached.
async fn device_authorize(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    match authorized(&state, &headers).await {
        Ok(claims) => {
            let left = claims
                .expires_at
                .saturating_sub(crate::download_token::unix_now());
            let max_age = left.min(AUTHORIZE_CACHE_SECS);
            let mut response = StatusCode::NO_CONTENT.into_response();
            let h = response.headers_mut();
            h.insert(
                header::CACHE_CONTROL,
                HeaderValue::from_str(&format!("public, max-age={max_age}"))
                    .expect("digits are a valid header"),
            );
            h.insert(header::VARY, HeaderValue::from_static("authorization"));
            response
        }
        Err(refused) => {
            let kind = refused.kind;
            let mut response = refused.into_response();
            let h = response.headers_mut();
            h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            // A cache's auth_request drops the body; the kind in a header
            // lets it tell the device why in its own answer.
            h.insert(
                AUTHORIZE_KIND_HEADER,
                HeaderValue::from_static(kind.as_str()),
            );
            response
        }
    }
}

fn parse_name<T: std::str::FromStr<Err = uplift_proto::NameError>>(s: &str) -> Result<T, ApiError> {
    s.parse()
        .map_err(|e: uplift_proto::NameError| ApiError::bad_request(e.to_string()))
}

fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("request body is not valid: {e}")))
}

// ----- devices

/// A query string as `T`, or a 400 that says which parameter is wrong.
fn parse_query<T>(query: Result<Query<T>, QueryRejection>, expected: &str) -> Result<T, ApiError> {
    query.map(|Query(q)| q).map_err(|e| {
        ApiError::bad_request(format!("query refused: {}; {expected}", e.body_text()))
            .with_source(e)
    })
}

fn device_id(id: Result<Path<String>, PathRejection>) -> Result<DeviceId, ApiError> {
    let Path(id) = id?;
    parse_name(&id)
}

#[utoipa::path(
    get, path = "/api/v1/devices", tag = "devices",
    params(DeviceQuery),
    responses((status = 200, description = "One page of devices, by ID", body = DevicePage)),
    security(("bearer" = ["read"]))
)]
async fn list_devices(
    State(state): State<Arc<AppState>>,
    _: Allowed<Read>,
    query: Result<Query<DeviceQuery>, QueryRejection>,
) -> Result<Json<DevicePage>, ApiError> {
    let query = parse_query(
        query,
        "filters are device_type, version, state, tag, online, q, seen_before, seen_after; \
         pages take after and limit",
    )?;
    let listing = service::devices::Listing::parse(query)?;
    Ok(Json(service::devices::list(&state, listing).await?))
}

#[utoipa::path(
    get, path = "/api/v1/devices/{id}", tag = "devices",
    params(("id" = DeviceId, Path, description = "The device's ID")),
    responses(
        (status = 200, description = "The device", body = DeviceView),
        (status = 404, description = "No device has this ID", body = WireError),
    ),
    security(("bearer" = ["read"]))
)]
async fn show_device(
    State(state): State<Arc<AppState>>,
    _: Allowed<Read>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<DeviceView>, ApiError> {
    let id = device_id(id)?;
    Ok(Json(service::devices::get(&state, &id).await?))
}

#[utoipa::path(
    delete, path = "/api/v1/devices/{id}", tag = "devices",
    params(("id" = DeviceId, Path, description = "The device's ID")),
    responses(
        (status = 200, description = "The device, removed (decommissioned): its key is revoked, its channel \
         closed on every replica, its unfinished rollout parts ended, its private addresses freed; its \
         history is kept. A replaced board enrolls afresh as a new device", body = DeviceView),
        (status = 404, description = "No device has this ID", body = WireError),
        (status = 409, description = "The device was removed already", body = WireError),
    ),
    security(("bearer" = ["operate"]))
)]
async fn remove_device(
    State(state): State<Arc<AppState>>,
    caller: Allowed<Operate>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<DeviceView>, ApiError> {
    let id = device_id(id)?;
    Ok(Json(
        service::devices::remove(&state, caller.principal(), &id).await?,
    ))
}

#[utoipa::path(
    put, path = "/api/v1/devices/{id}/tags", tag = "devices",
    params(("id" = DeviceId, Path, description = "The device's ID")),
    request_body = TagChange,
    responses(
        (status = 200, description = "The device with its new tags", body = DeviceView),
        (status = 404, description = "No device has this ID", body = WireError),
    ),
    security(("bearer" = ["operate"]))
)]
async fn tag_device(
    State(state): State<Arc<AppState>>,
    caller: Allowed<Operate>,
    id: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<DeviceView>, ApiError> {
    let id = device_id(id)?;
    let change: TagChange = parse_json(&body?)?;
    let view = service::devices::change_tags(&state, caller.principal(), &id, change).await?;
    Ok(Json(view))
}

#[utoipa::path(
    get, path = "/api/v1/devices/{id}/history", tag = "devices",
    params(("id" = DeviceId, Path, description = "The device's ID"), HistoryQuery),
    responses(
        (status = 200, description = "One page of the device's history, newest first", body = DeviceHistory),
        (status = 404, description = "No device has this ID", body = WireError),
    ),
    security(("bearer" = ["read"]))
)]
async fn device_history(
    State(state): State<Arc<AppState>>,
    _: Allowed<Read>,
    id: Result<Path<String>, PathRejection>,
    query: Result<Query<HistoryQuery>, QueryRejection>,
) -> Result<Json<DeviceHistory>, ApiError> {
    let id = device_id(id)?;
    let query = parse_query(query, "a history takes limit and before")?;
    Ok(Json(service::devices::history(&state, &id, query).await?))
}

// ----- releases and chunks

/// Largest chunk index accepted in one upload: 6.7 million chunks, about
/// 400 GiB of image at the average chunk size.
const MAX_INDEX_UPLOAD: usize = 256 << 20;

#[utoipa::path(
    get, path = "/api/v1/releases", tag = "releases",
    responses((status = 200, description = "Every release", body = Vec<ReleaseView>)),
    security(("bearer" = ["read"]))
)]
async fn list_releases(
    State(state): State<Arc<AppState>>,
    _: Allowed<Read>,
) -> Result<Json<Vec<ReleaseView>>, ApiError> {
    Ok(Json(service::releases::list(&state).await?))
}

#[utoipa::path(
    post, path = "/api/v1/chunks/missing", tag = "releases",
    request_body = MissingChunksRequest,
    responses((status = 200, description = "Those the server does not have, or has only damaged", body = MissingChunksResponse)),
    security(("bearer" = ["release"]))
)]
async fn missing_chunks(
    State(state): State<Arc<AppState>>,
    _: Allowed<Release>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<MissingChunksResponse>, ApiError> {
    let request: MissingChunksRequest = parse_json(&body?)?;
    Ok(Json(service::releases::missing(&state, request).await?))
}

#[utoipa::path(
    put, path = "/api/v1/chunks/{hash}", tag = "releases",
    params(("hash" = ChunkHash, Path, description = "SHA-256 of the chunk's uncompressed bytes")),
    request_body(content = openapi::Binary, content_type = "application/octet-stream", description = "One zstd-compressed chunk, at most 1 MiB decompressed"),
    responses(
        (status = 201, description = "Stored"),
        (status = 200, description = "Already stored (and checked)"),
        (status = 422, description = "Not zstd, or its digest is not `hash`", body = WireError),
    ),
    security(("bearer" = ["release"]))
)]
async fn upload_chunk(
    State(state): State<Arc<AppState>>,
    _: Allowed<Release>,
    hash: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<StatusCode, ApiError> {
    upload_object(&state, StoredKind::Chunk, hash, body).await
}

#[utoipa::path(
    put, path = "/api/v1/patches/{hash}", tag = "releases",
    params(("hash" = ChunkHash, Path, description = "SHA-256 of the patch")),
    request_body(content = openapi::Binary, content_type = "application/octet-stream", description = "One patch, at most a chunk's stored bound"),
    responses(
        (status = 201, description = "Stored"),
        (status = 200, description = "Already stored (and checked)"),
        (status = 422, description = "Its digest is not `hash`", body = WireError),
    ),
    security(("bearer" = ["release"]))
)]
async fn upload_patch(
    State(state): State<Arc<AppState>>,
    _: Allowed<Release>,
    hash: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<StatusCode, ApiError> {
    upload_object(&state, StoredKind::Patch, hash, body).await
}

#[utoipa::path(
    put, path = "/api/v1/indexes/{hash}", tag = "releases",
    params(("hash" = ChunkHash, Path, description = "SHA-256 of the index")),
    request_body(content = openapi::Binary, content_type = "application/octet-stream", description = "A release's binary chunk index, up to 256 MiB"),
    responses(
        (status = 201, description = "Stored"),
        (status = 200, description = "Already stored (and checked)"),
        (status = 422, description = "Its digest is not `hash`", body = WireError),
    ),
    security(("bearer" = ["release"]))
)]
async fn upload_index(
    State(state): State<Arc<AppState>>,
    _: Allowed<Release>,
    hash: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<StatusCode, ApiError> {
    upload_object(&state, StoredKind::Index, hash, body).await
}

async fn upload_object(
    state: &AppState,
    kind: StoredKind,
    hash: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<StatusCode, ApiError> {
    let Path(hash) = hash?;
    let hash: ChunkHash = parse_name(&hash)?;
    let body = body?;
    let stored = service::releases::store_object(state, kind, hash, body).await?;
    Ok(status_of(stored))
}

fn status_of(stored: Stored) -> StatusCode {
    match stored {
        Stored::Created => StatusCode::CREATED,
        Stored::AlreadyPresent => StatusCode::OK,
    }
}

#[utoipa::path(
    post, path = "/api/v1/releases", tag = "releases",
    request_body(content = serde_json::Value, description = "A signed manifest (`manifest.json` of `uplift release create`); checked well-formed, not its signature"),
    responses(
        (status = 201, description = "Stored", body = ReleaseView),
        (status = 200, description = "The same manifest was stored already (a repair)", body = ReleaseView),
        (status = 409, description = "A chunk, patch or index it names is not stored, or another manifest has this version", body = WireError),
        (status = 422, description = "A stored object does not match its digest", body = WireError),
    ),
    security(("bearer" = ["release"]))
)]
async fn upload_release(
    State(state): State<Arc<AppState>>,
    caller: Allowed<Release>,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<ReleaseView>), ApiError> {
    let (stored, view) = service::releases::upload(&state, caller.principal(), &body?).await?;
    Ok((status_of(stored), Json(view)))
}

// ----- rollouts

#[utoipa::path(
    post, path = "/api/v1/rollouts", tag = "rollouts",
    request_body = RolloutCreate,
    responses(
        (status = 201, description = "Started, its first offers told: the rollout as planned, every device counted pending (later views count what each reports)", body = RolloutView),
        (status = 404, description = "No such release", body = WireError),
        (status = 409, description = "The state of the fleet does not allow it", body = WireError),
    ),
    security(("bearer" = ["operate"]))
)]
async fn start_rollout(
    State(state): State<Arc<AppState>>,
    caller: Allowed<Operate>,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<RolloutView>), ApiError> {
    let request: RolloutCreate = parse_json(&body?)?;
    let view = service::rollouts::start(&state, caller.principal(), request).await?;
    Ok((StatusCode::CREATED, Json(view)))
}

#[utoipa::path(
    post, path = "/api/v1/rollouts/preview", tag = "rollouts",
    request_body = RolloutCreate,
    responses(
        (status = 200, description = "What `POST /api/v1/rollouts` with this body would start now: its devices, \
         its phase sizes and warnings; nothing is stored, offered or audited", body = RolloutPreview),
        (status = 404, description = "No such release, or a listed device is not enrolled", body = WireError),
        (status = 409, description = "The state of the fleet does not allow it", body = WireError),
    ),
    security(("bearer" = ["operate"]))
)]
async fn preview_rollout(
    State(state): State<Arc<AppState>>,
    _: Allowed<Operate>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<RolloutPreview>, ApiError> {
    let request: RolloutCreate = parse_json(&body?)?;
    Ok(Json(service::rollouts::preview(&state, request).await?))
}

#[utoipa::path(
    get, path = "/api/v1/rollouts", tag = "rollouts",
    responses((status = 200, description = "Every rollout", body = Vec<RolloutView>)),
    security(("bearer" = ["read"]))
)]
async fn list_rollouts(
    State(state): State<Arc<AppState>>,
    _: Allowed<Read>,
) -> Result<Json<Vec<RolloutView>>, ApiError> {
    Ok(Json(service::rollouts::list(&state).await?))
}

#[utoipa::path(
    get, path = "/api/v1/rollouts/{id}", tag = "rollouts",
    params(("id" = i64, Path, description = "The rollout's ID")),
    responses(
        (status = 200, description = "The rollout with its counts", body = RolloutView),
        (status = 404, description = "No such rollout", body = WireError),
    ),
    security(("bearer" = ["read"]))
)]
async fn show_rollout(
    State(state): State<Arc<AppState>>,
    _: Allowed<Read>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<RolloutView>, ApiError> {
    let Path(id) = id?;
    let id: i64 = id
        .parse()
        .map_err(|_| ApiError::bad_request(format!("rollout id {id:?} is not a number")))?;
    Ok(Json(service::rollouts::get(&state, id).await?))
}

#[utoipa::path(
    get, path = "/api/v1/rollouts/{id}/devices", tag = "rollouts",
    params(("id" = i64, Path, description = "The rollout's ID"), RolloutMemberQuery),
    responses(
        (status = 200, description = "One page of the rollout's devices, in phase order: each one's phase, offer, outcome and error", body = RolloutMemberPage),
        (status = 404, description = "No such rollout", body = WireError),
    ),
    security(("bearer" = ["read"]))
)]
async fn rollout_members(
    State(state): State<Arc<AppState>>,
    _: Allowed<Read>,
    id: Result<Path<String>, PathRejection>,
    query: Result<Query<RolloutMemberQuery>, QueryRejection>,
) -> Result<Json<RolloutMemberPage>, ApiError> {
    let id = numeric_id("rollout", id)?;
    let query = parse_query(
        query,
        "phase (0-based), outcome, after (the previous page's next) and limit (1 to 1000)",
    )?;
    Ok(Json(service::rollouts::members(&state, id, query).await?))
}

#[utoipa::path(
    post, path = "/api/v1/rollouts/{id}/{command}", tag = "rollouts",
    params(
        ("id" = i64, Path, description = "The rollout's ID"),
        ("command" = RolloutCommandName, Path, description = "What to do"),
    ),
    responses(
        (status = 200, description = "The rollout after `pause`, `resume`, `approve` or `abort`", body = RolloutView),
        (status = 201, description = "`retry`: the new rollout of the failed devices", body = RolloutView),
        (status = 404, description = "No such rollout", body = WireError),
        (status = 409, description = "The rollout's state does not allow it; the message says why", body = WireError),
    ),
    security(("bearer" = ["operate"]))
)]
async fn command_rollout(
    State(state): State<Arc<AppState>>,
    caller: Allowed<Operate>,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<(StatusCode, Json<RolloutView>), ApiError> {
    let Path((id, command)) = path?;
    let id: i64 = id
        .parse()
        .map_err(|_| ApiError::bad_request(format!("rollout id {id:?} is not a number")))?;
    let command: RolloutCommandName =
        serde_json::from_value(serde_json::Value::String(command.clone())).map_err(|_| {
            ApiError::bad_request(format!(
                "{command:?} is not a rollout command; use pause, resume, approve, abort or retry"
            ))
        })?;
    let view = service::rollouts::command(&state, id, command, caller.principal()).await?;
    let status = match command {
        RolloutCommandName::Retry => StatusCode::CREATED,
        RolloutCommandName::Pause
        | RolloutCommandName::Resume
        | RolloutCommandName::Approve
        | RolloutCommandName::Abort => StatusCode::OK,
    };
    Ok((status, Json(view)))
}

#[utoipa::path(
    get, path = "/metrics", tag = "monitoring",
    responses((status = 200, description = "Prometheus metrics", content_type = "application/openmetrics-text", body = String)),
    security(("bearer" = ["read"]))
)]
async fn metrics(
    State(state): State<Arc<AppState>>,
    _: Allowed<Read>,
) -> Result<Response, ApiError> {
    let text = service::metrics::render(&state).await?;
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

#[utoipa::path(
    get, path = "/api/v1/fleet", tag = "devices",
    responses((status = 200, description = "The fleet at a glance: devices by version, state and type, \
     connected, failing, rolled back and in a rollout; counted by the database (a write interval behind \
     the devices' reports), connected devices as of now", body = FleetSummary)),
    security(("bearer" = ["read"]))
)]
async fn fleet_summary(
    State(state): State<Arc<AppState>>,
    _: Allowed<Read>,
) -> Result<Json<FleetSummary>, ApiError> {
    Ok(Json(service::fleet::summary(&state).await?))
}

#[utoipa::path(
    get, path = "/api/v1/stats", tag = "monitoring",
    responses((status = 200, description = "The server's counters", body = ServerStats)),
    security(("bearer" = ["read"]))
)]
async fn stats(
    State(state): State<Arc<AppState>>,
    _: Allowed<Read>,
) -> Result<Json<ServerStats>, ApiError> {
    Ok(Json(service::stats::get(&state).await?))
}

// ----- tokens, audit log, caller

#[utoipa::path(
    get, path = "/api/v1/whoami", tag = "access",
    responses((status = 200, description = "The caller", body = Caller)),
    security(("bearer" = ["read"]))
)]
async fn whoami(caller: Allowed<Read>) -> Json<Caller> {
    Json(caller.principal().caller())
}

// ----- events and webhooks

#[utoipa::path(
    get, path = "/api/v1/events", tag = "events",
    params(EventStreamQuery, ("Last-Event-ID" = Option<u64>, Header, description = "The `id` of the last event this client got: what it missed since is sent first")),
    responses((status = 200, description = "Server-sent events until the server shuts down: `event:` the name, `id:` a sequence number, `data:` a `FleetEvent` as JSON (or `{\"missed\": N}` for `lagged`)", content_type = "text/event-stream", body = String)),
    security(("bearer" = ["read"]))
)]
/// `GET /api/v1/events`: server-sent events, one per fleet event that the
/// query's filter takes (`event:` its name, `id:` its sequence number,
/// `data:` its JSON); `lagged` with `{"missed": N}` when this client fell
/// too far behind. The `recent` past events, or those after a
/// `Last-Event-ID`, come first. Ends when the server shuts down.
async fn event_stream(
    State(state): State<Arc<AppState>>,
    _: Allowed<Read>,
    headers: HeaderMap,
    query: Result<Query<EventStreamQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    use crate::events::Replay;
    use axum::response::sse::{Event, KeepAlive, Sse};
    use tokio::sync::broadcast::error::RecvError;
    let query = parse_query(
        query,
        "filter with subject (device or rollout), device and rollout; recent: 0 to 1000",
    )?;
    let last_seen = match headers.get("last-event-id") {
        None => None,
        Some(value) => Some(
            value
                .to_str()
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .ok_or_else(|| {
                    ApiError::bad_request(
                        "Last-Event-ID must be the id of an event this stream sent (a number)",
                    )
                })?,
        ),
    };
    let recent = query.recent.map(|n| n as usize);
    if recent.is_some_and(|n| n > uplift_proto::events::RECENT_EVENTS) {
        return Err(ApiError::bad_request(format!(
            "recent may be at most {}: the server holds no more past events",
            uplift_proto::events::RECENT_EVENTS
        )));
    }
    let replay = match (last_seen, recent) {
        (Some(last), _) => Some(Replay::After(last)),
        (None, Some(n)) if n > 0 => Some(Replay::Newest(n)),
        (None, _) => None,
    };
    let filter = query.filter();
    let (slot, backlog) = state
        .events
        .open_stream_with(replay, &filter)
        .ok_or_else(|| {
            ApiError::new(
                uplift_proto::ErrorKind::ServerBusy,
                format!(
                    "{} event streams are open, the most the server keeps; close one, or use a webhook",
                    crate::events::MAX_STREAMS
                ),
            )
        })?;
    let as_sse = |event: &uplift_proto::events::FleetEvent| {
        Event::default()
            .id(event.seq.to_string())
            .event(event.about.name())
            .json_data(event)
    };
    let lagged = |missed: u64| {
        Event::default()
            .event("lagged")
            .json_data(serde_json::json!({ "missed": missed }))
    };
    let first: Vec<_> = (backlog.missed > 0)
        .then(|| lagged(backlog.missed))
        .into_iter()
        .chain(backlog.events.iter().map(|e| as_sse(e)))
        .collect();
    let live = futures_util::stream::unfold((slot, filter), move |(mut slot, filter)| async move {
        loop {
            let event = match slot.receiver.recv().await {
                Ok(event) if filter.matches(&event.about) => as_sse(&event),
                Ok(_) => continue,
                Err(RecvError::Lagged(missed)) => lagged(missed),
                Err(RecvError::Closed) => return None,
            };
            return Some((event, (slot, filter)));
        }
    });
    let events = futures_util::stream::iter(first).chain(live).map(|event| {
        Ok::<_, std::convert::Infallible>(
            event.unwrap_or_else(|e| Event::default().event("error").data(e.to_string())),
        )
    });
    let mut shutdown = state.shutdown.clone();
    let events = events.take_until(async move {
        let _ = shutdown.wait_for(|stop| *stop).await;
    });
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response())
}

#[utoipa::path(
    get, path = "/api/v1/webhooks", tag = "events",
    responses((status = 200, description = "Every webhook, removed ones too, without secrets", body = Vec<WebhookView>)),
    security(("bearer" = ["administer"]))
)]
async fn list_webhooks(
    State(state): State<Arc<AppState>>,
    _: Allowed<Administer>,
) -> Result<Json<Vec<WebhookView>>, ApiError> {
    Ok(Json(service::webhooks::list(&state).await?))
}

#[utoipa::path(
    post, path = "/api/v1/webhooks", tag = "events",
    request_body = WebhookCreate,
    responses((status = 201, description = "The webhook and its signing secret, shown only here", body = WebhookCreated)),
    security(("bearer" = ["administer"]))
)]
async fn create_webhook(
    State(state): State<Arc<AppState>>,
    caller: Allowed<Administer>,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<WebhookCreated>), ApiError> {
    let request: WebhookCreate = parse_json(&body?)?;
    let made = service::webhooks::create(&state, caller.principal(), request).await?;
    Ok((StatusCode::CREATED, Json(made)))
}

fn numeric_id(what: &str, id: Result<Path<String>, PathRejection>) -> Result<i64, ApiError> {
    let Path(id) = id?;
    id.parse()
        .map_err(|_| ApiError::bad_request(format!("{what} id {id:?} is not a number")))
}

#[utoipa::path(
    delete, path = "/api/v1/webhooks/{id}", tag = "events",
    params(("id" = i64, Path, description = "The webhook's ID")),
    responses(
        (status = 200, description = "The webhook, removed", body = WebhookView),
        (status = 404, description = "No such webhook", body = WireError),
    ),
    security(("bearer" = ["administer"]))
)]
async fn remove_webhook(
    State(state): State<Arc<AppState>>,
    caller: Allowed<Administer>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<WebhookView>, ApiError> {
    let id = numeric_id("webhook", id)?;
    Ok(Json(
        service::webhooks::remove(&state, caller.principal(), id).await?,
    ))
}

#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct DeliveryQuery {
    /// Only deliveries older than this delivery id.
    before: Option<i64>,
    /// At most this many deliveries (default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u32>,
}

#[utoipa::path(
    get, path = "/api/v1/webhooks/{id}/deliveries", tag = "events",
    params(("id" = i64, Path, description = "The webhook's ID"), DeliveryQuery),
    responses(
        (status = 200, description = "Its delivery log, newest first", body = Vec<DeliveryView>),
        (status = 404, description = "No such webhook", body = WireError),
    ),
    security(("bearer" = ["administer"]))
)]
async fn webhook_deliveries(
    State(state): State<Arc<AppState>>,
    _: Allowed<Administer>,
    id: Result<Path<String>, PathRejection>,
    query: Result<Query<DeliveryQuery>, QueryRejection>,
) -> Result<Json<Vec<DeliveryView>>, ApiError> {
    let id = numeric_id("webhook", id)?;
    let query = parse_query(query, "page with before and limit")?;
    Ok(Json(
        service::webhooks::deliveries(&state, id, query.before, query.limit).await?,
    ))
}

#[utoipa::path(
    get, path = "/api/v1/tokens", tag = "access",
    responses((status = 200, description = "Every token, without secrets", body = Vec<TokenView>)),
    security(("bearer" = ["administer"]))
)]
async fn list_tokens(
    State(state): State<Arc<AppState>>,
    _: Allowed<Administer>,
) -> Result<Json<Vec<TokenView>>, ApiError> {
    Ok(Json(service::tokens::list(&state).await?))
}

#[utoipa::path(
    post, path = "/api/v1/tokens", tag = "access",
    request_body = TokenCreate,
    responses((status = 201, description = "The token and its secret, shown only here", body = TokenCreated)),
    security(("bearer" = ["administer"]))
)]
async fn create_token(
    State(state): State<Arc<AppState>>,
    caller: Allowed<Administer>,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<TokenCreated>), ApiError> {
    let request: TokenCreate = parse_json(&body?)?;
    let created = service::tokens::create(&state, caller.principal(), request).await?;
    Ok((StatusCode::CREATED, Json(created)))
}

#[utoipa::path(
    delete, path = "/api/v1/tokens/{id}", tag = "access",
    params(("id" = i64, Path, description = "The token's ID")),
    responses(
        (status = 200, description = "The token, revoked (again is a no-op)", body = TokenView),
        (status = 404, description = "No such token", body = WireError),
    ),
    security(("bearer" = ["administer"]))
)]
async fn revoke_token(
    State(state): State<Arc<AppState>>,
    caller: Allowed<Administer>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<TokenView>, ApiError> {
    let Path(id) = id?;
    let id: i64 = id
        .parse()
        .map_err(|_| ApiError::bad_request(format!("token id {id:?} is not a number")))?;
    Ok(Json(
        service::tokens::revoke(&state, caller.principal(), id).await?,
    ))
}

#[utoipa::path(
    get, path = "/api/v1/audit", tag = "access",
    params(AuditQuery),
    responses((status = 200, description = "Audit entries, newest first", body = AuditPage)),
    security(("bearer" = ["administer"]))
)]
async fn audit_log(
    State(state): State<Arc<AppState>>,
    _: Allowed<Administer>,
    query: Result<Query<AuditQuery>, QueryRejection>,
) -> Result<Json<AuditPage>, ApiError> {
    let query = parse_query(
        query,
        "filter with actor, action (e.g. rollout.start), target, before and limit",
    )?;
    Ok(Json(service::audit::list(&state, query).await?))
}

// ----- device downloads

async fn device_manifest(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    version: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    device_of(&state, &headers).await?;
    let Path(version) = version?;
    let version: Version = parse_name(&version)?;
    let manifest = served_release(&state, &version)
        .await?
        .manifest_json
        .clone();
    state.stats.add_sent(manifest.len() as u64);
    // A version names one manifest for ever: as cacheable as a chunk.
    let etag = etag_of(&uplift_release::sha256(&manifest));
    Ok((
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static(IMMUTABLE)),
            (header::ETAG, etag),
        ],
        manifest,
    )
        .into_response())
}

/// The release as devices download it, from the cache or the store.
async fn served_release(
    state: &AppState,
    version: &Version,
) -> Result<Arc<ServedRelease>, ApiError> {
    let cached = state
        .releases
        .read()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .get(version)
        .cloned();
    if let Some(release) = cached {
        return Ok(release);
    }
    let record =
        state.store.release(version).await?.ok_or_else(|| {
            ApiError::not_found(format!("release {version} is not on the server"))
        })?;
    let manifest = crate::chunks::load_manifest(&state.indexes, &record.manifest_json)
        .await
        .map_err(|e| match e.kind() {
            // Passing: the index is in an object store that did not answer.
            uplift_proto::ErrorKind::ObjectStoreUnavailable => ApiError::new(
                e.kind(),
                format!("the chunk index of release {version} cannot be read now: {e}"),
            ),
            // What to do is in `e` (upload again, or repair a damaged chunk).
            _ => ApiError::internal(format!(
                "the stored manifest of release {version} is unreadable: {e}"
            )),
        })?;
    let release = Arc::new(ServedRelease {
        manifest_json: Bytes::from(record.manifest_json),
        chunks: manifest.chunks.iter().map(Listed::from).collect(),
        patches: manifest.patches.iter().map(Listed::from).collect(),
        index: manifest.chunk_index.map(|i| i.sha256),
    });
    state
        .releases
        .write()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .insert(version.clone(), release.clone());
    Ok(release)
}

/// A response body of stored chunks, sent in pieces: each piece counted as
/// it goes out (an interrupted download counts what was sent) and held back
/// by the server's egress cap, if any.
fn chunk_body(
    state: Arc<AppState>,
    chunks: impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static,
) -> Body {
    let pieces = chunks
        .map_ok(|chunk| {
            let count = chunk.len().div_ceil(SEND_PIECE).max(1);
            futures_util::stream::iter((0..count).map(move |n| {
                let piece = chunk.slice(
                    (n * SEND_PIECE).min(chunk.len())..((n + 1) * SEND_PIECE).min(chunk.len()),
                );
                Ok::<_, std::io::Error>((piece, n + 1 == count))
            }))
        })
        .try_flatten()
        .and_then(move |(piece, last_of_chunk)| {
            let state = state.clone();
            async move {
                if let Some(egress) = &state.egress {
                    let wait = egress.take(piece.len() as u64);
                    if !wait.is_zero() {
                        tokio::time::sleep(wait).await;
                    }
                }
                state.stats.add_sent(piece.len() as u64);
                if last_of_chunk {
                    state
                        .stats
                        .chunks_sent
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                Ok(piece)
            }
        });
    // Not ready at first, so hyper sends the headers on their own: on a slow
    // link the device then knows within a round trip that its download
    // started, and its stall timer tells a slow answer from none at all.
    let headers_first = futures_util::stream::once(tokio::task::yield_now())
        .filter_map(|()| std::future::ready(None));
    Body::from_stream(headers_first.chain(pieces))
}

/// How downloads named by content may be cached: they never change (a
/// chunk, patch or index is named by its digest; a manifest or span by its
/// release's version, which names one manifest for ever: another manifest
/// under the same version is refused), so a shared cache may keep them a
/// year. `public` lets a shared cache serve one device's copy to another,
/// which is safe only because a site cache must ask the server whether
/// each request's token is valid first (`DEVICE_AUTHORIZE_PATH`; the
/// README's nginx example does): see ARCHITECTURE.md, Site caches.
const IMMUTABLE: &str = "public, max-age=31536000, immutable";

fn immutable_chunk_headers(response: &mut Response, len: u64, etag: &ChunkHash) {
    let h = response.headers_mut();
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(IMMUTABLE));
    h.insert(header::ETAG, etag_of(etag));
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/zstd"),
    );
}

/// A strong validator: the digest naming the body (or its parts).
fn etag_of(hash: &ChunkHash) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{hash}\"")).expect("hex digits are a valid header")
}

/// The ETag of a span: the digest of its objects' names, in order.
fn span_etag(entries: &[Listed]) -> ChunkHash {
    let mut names = Vec::with_capacity(entries.len() * 32);
    for entry in entries {
        names.extend_from_slice(entry.hash.as_bytes());
    }
    uplift_release::sha256(&names)
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SpanQuery {
    first: u64,
    count: u64,
}

/// A release's binary chunk index, checked against its digest.
async fn device_index(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    version: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    device_of(&state, &headers).await?;
    let Path(version) = version?;
    let version: Version = parse_name(&version)?;
    let release = served_release(&state, &version).await?;
    let Some(hash) = release.index else {
        return Err(ApiError::not_found(format!(
            "release {version} lists its chunks in its manifest; it has no index"
        )));
    };
    if let Some(redirect) = direct::redirect(&state, StoredKind::Index, &hash).await? {
        return Ok(redirect);
    }
    let index = state.indexes.read_verified(&hash).await?.ok_or_else(|| {
        ApiError::not_found(format!(
            "the chunk index of release {version} is not on the server; upload the release again"
        ))
    })?;
    let len = index.len() as u64;
    let body = futures_util::stream::once(std::future::ready(Ok(index)));
    let mut response = Response::new(chunk_body(state.clone(), body));
    immutable_chunk_headers(&mut response, len, &hash);
    Ok(response)
}

/// A run of a release's chunks, their stored bytes back to back: one
/// request instead of one per chunk.
async fn device_span(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    version: Result<Path<String>, PathRejection>,
    query: Result<Query<SpanQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    serve_span(state, headers, version, query, StoredKind::Chunk).await
}

/// A run of a release's patches, as [`device_span`] serves chunks.
async fn device_patch_span(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    version: Result<Path<String>, PathRejection>,
    query: Result<Query<SpanQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    serve_span(state, headers, version, query, StoredKind::Patch).await
}

/// The first object is read (and checked) before answering, so its failure
/// is a typed answer; a later one that fails cuts the body short, and the
/// device, resuming after the last whole object, then hears why.
async fn serve_span(
    state: Arc<AppState>,
    headers: HeaderMap,
    version: Result<Path<String>, PathRejection>,
    query: Result<Query<SpanQuery>, QueryRejection>,
    kind: StoredKind,
) -> Result<Response, ApiError> {
    device_of(&state, &headers).await?;
    let Path(version) = version?;
    let version: Version = parse_name(&version)?;
    let Query(span) = query.map_err(|e| {
        ApiError::bad_request(format!(
            "{}; ask for ?first=N&count=M with 1 <= M <= {MAX_SPAN_CHUNKS}",
            e.body_text()
        ))
    })?;
    let what = kind.noun();
    if span.count == 0 || span.count > MAX_SPAN_CHUNKS {
        return Err(ApiError::bad_request(format!(
            "a span has 1 to {MAX_SPAN_CHUNKS} {what}s, not {}",
            span.count
        )));
    }
    let release = served_release(&state, &version).await?;
    let list = match kind {
        StoredKind::Chunk => &release.chunks,
        StoredKind::Patch => &release.patches,
        StoredKind::Index => {
            return Err(ApiError::bad_request(format!(
                "the chunk index of {version} is one file: GET its index path"
            )))
        }
    };
    let total = list.len() as u64;
    let end = span.first.saturating_add(span.count);
    if end > total {
        return Err(ApiError::bad_request(format!(
            "{what}s {}..{end} are not all in release {version}, which has {total}",
            span.first
        )));
    }
    let entries: Vec<Listed> = list[span.first as usize..end as usize].to_vec();
    if let Some(redirect) = direct::redirect(&state, kind, &entries[0].hash).await? {
        return Ok(redirect);
    }
    let len: u64 = entries.iter().map(|c| u64::from(c.stored_size)).sum();
    let etag = span_etag(&entries);
    let first = read_stored(&state, kind, &version, &entries[0]).await?;
    // The rest in batches, one trip to the disk thread each, the next batch
    // read while this one is sent.
    let batches: Vec<Vec<Listed>> = entries[1..]
        .chunks(SPAN_READ_BATCH)
        .map(<[Listed]>::to_vec)
        .collect();
    let rest = {
        let state = state.clone();
        futures_util::stream::iter(batches)
            .map(move |batch| {
                let (state, version) = (state.clone(), version.clone());
                async move {
                    let read = read_stored_many(&state, kind, &version, &batch).await;
                    futures_util::stream::iter(read.into_iter().map(move |chunk| {
                        chunk.map_err(|e| {
                            tracing::warn!(release = %version, "span cut short: {}", e.message);
                            std::io::Error::other(e.message)
                        })
                    }))
                }
            })
            .buffered(2)
            .flatten()
    };
    let chunks = futures_util::stream::once(std::future::ready(Ok(first))).chain(rest);
    let mut response = Response::new(chunk_body(state.clone(), chunks));
    immutable_chunk_headers(&mut response, len, &etag);
    Ok(response)
}

/// Chunks of a span read from disk in one go.
const SPAN_READ_BATCH: usize = 8;

/// A stored object, checked, and exactly as long as the manifest says.
async fn read_stored(
    state: &AppState,
    kind: StoredKind,
    version: &Version,
    entry: &Listed,
) -> Result<Bytes, ApiError> {
    let read = store_of(state, kind).read_verified(&entry.hash).await;
    as_listed(kind, version, entry, read)
}

/// [`read_stored`] of several objects, read in one go.
async fn read_stored_many(
    state: &AppState,
    kind: StoredKind,
    version: &Version,
    entries: &[Listed],
) -> Vec<Result<Bytes, ApiError>> {
    let hashes: Vec<ChunkHash> = entries.iter().map(|e| e.hash).collect();
    let read = store_of(state, kind).read_verified_many(&hashes).await;
    entries
        .iter()
        .zip(read)
        .map(|(entry, read)| as_listed(kind, version, entry, read))
        .collect()
}

/// An object read from the store, as the release lists it, or why not.
fn as_listed(
    kind: StoredKind,
    version: &Version,
    entry: &Listed,
    read: Result<Option<Bytes>, crate::chunks::ChunkError>,
) -> Result<Bytes, ApiError> {
    let what = kind.noun();
    let stored = read?.ok_or_else(|| {
        ApiError::not_found(format!(
            "{what} {} of release {version} is not on the server; upload the release again",
            entry.hash
        ))
    })?;
    if stored.len() as u64 != u64::from(entry.stored_size) {
        return Err(ApiError::internal(format!(
            "{what} {} is stored with {} bytes but release {version} lists {}; upload the release again",
            entry.hash,
            stored.len(),
            entry.stored_size
        )));
    }
    Ok(stored)
}

/// The one byte range (inclusive) a `Range` header asks of `len` bytes, as
/// RFC 9110 reads it (`bytes=START-`, `bytes=START-END` clamped to the end,
/// `bytes=-SUFFIX`); `None`, answered 416, if it cannot be served: malformed,
/// past the end, or several ranges (agents ask for one at most, and
/// several would need a multipart body).
fn parse_range(value: &str, len: u64) -> Option<(u64, u64)> {
    let ranges = http_range_header::parse_range_header_with_max_ranges(value, NonZeroUsize::MIN)
        .ok()?
        .validate(len)
        .ok()?;
    match ranges.as_slice() {
        [range] => Some((*range.start(), *range.end())),
        _ => None,
    }
}

async fn device_chunk(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    hash: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    device_of(&state, &headers).await?;
    let Path(hash) = hash?;
    let hash: ChunkHash = parse_name(&hash)?;
    if let Some(redirect) = direct::redirect(&state, StoredKind::Chunk, &hash).await? {
        return Ok(redirect);
    }
    // Served from the bytes just checked: no window for the file to change
    // between the check and the send.
    let stored = state
        .chunks
        .read_verified(&hash)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("chunk {hash} is not on the server")))?;
    let len = stored.len() as u64;
    let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
    let (status, start, end) = match range {
        None => (StatusCode::OK, 0, len.saturating_sub(1)),
        Some(r) => match parse_range(r, len) {
            Some((s, e)) => (StatusCode::PARTIAL_CONTENT, s, e),
            None => {
                // HTTP requires 416 here; the body is our usual JSON error.
                let shown: String = r.chars().take(80).collect();
                let mut response = ApiError::bad_request(format!(
                    "range {shown:?} is not satisfiable for chunk {hash} of {len} stored bytes; \
                     ask for bytes=START-[END] with START <= END and START below {len}"
                ))
                .into_response();
                *response.status_mut() = StatusCode::RANGE_NOT_SATISFIABLE;
                response.headers_mut().insert(
                    header::CONTENT_RANGE,
                    HeaderValue::from_str(&format!("bytes */{len}"))
                        .expect("digits are a valid header"),
                );
                return Ok(response);
            }
        },
    };
    let count = if len == 0 { 0 } else { end - start + 1 };
    let range = stored.slice(start as usize..(start + count) as usize);
    let chunks = futures_util::stream::once(std::future::ready(Ok(range)));
    let mut response = Response::new(chunk_body(state.clone(), chunks));
    *response.status_mut() = status;
    immutable_chunk_headers(&mut response, count, &hash);
    let h = response.headers_mut();
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if status == StatusCode::PARTIAL_CONTENT {
        h.insert(
            header::CONTENT_RANGE,
            HeaderValue::from_str(&format!("bytes {start}-{end}/{len}"))
                .expect("digits are a valid header"),
        );
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::testing;
    use axum::http::{Method, Request};
    use tower::ServiceExt as _;

    /// `method path` with `body` as the bootstrap admin: status and body.
    async fn call(
        router: &Router,
        method: Method,
        path: &str,
        body: &str,
    ) -> (StatusCode, serde_json::Value) {
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header(header::AUTHORIZATION, "Bearer admin")
            .body(Body::from(body.to_owned()))
            .unwrap();
        let response = router.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, serde_json::from_slice(&bytes).unwrap_or_default())
    }

    /// A device request with `token` (if any): status, headers, body.
    async fn device_get(
        router: &Router,
        path: &str,
        token: Option<&str>,
    ) -> (StatusCode, HeaderMap, Bytes) {
        let mut request = Request::builder().uri(path);
        if let Some(token) = token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let response = router
            .clone()
            .oneshot(request.body(Body::empty()).unwrap())
            .await
            .unwrap();
        let (parts, body) = response.into_parts();
        let body = axum::body::to_bytes(body, 8 << 20).await.unwrap();
        (parts.status, parts.headers, body)
    }

    fn kind_of(body: &[u8]) -> uplift_proto::ErrorKind {
        serde_json::from_slice::<WireError>(body).unwrap().kind
    }

    /// What a site cache relies on: the authorize endpoint's 204/401 with
    /// no body and its cache policy, and chunks any cache may share.
    #[tokio::test]
    async fn a_cache_asks_whether_a_token_is_valid_and_may_share_chunks() {
        use crate::download_token::unix_now;
        use uplift_proto::ErrorKind;
        let dir = tempfile::tempdir().unwrap();
        let state = Arc::new(testing::state(dir.path()).await);
        let enrolled = testing::device(&state, "dev-1", "gw").await;
        let data = b"chunk bytes ".repeat(100);
        let hash = uplift_release::sha256(&data);
        state
            .chunks
            .store(&hash, uplift_release::encode_chunk(&data).unwrap().into())
            .await
            .unwrap();
        let keys = state.downloads.keys();
        let now = unix_now();
        // Signed by a replica that met the device: this one asks the database once.
        let valid = keys.sign(&enrolled, now, 600).text;
        let short = keys.sign(&enrolled, now, 20).text;
        let expired = keys.sign(&enrolled, now - 700, 600).text;
        let stranger = keys.sign(&"dev-gone".parse().unwrap(), now, 600).text;
        let router = device_router(state.clone());

        let (status, headers, body) =
            device_get(&router, DEVICE_AUTHORIZE_PATH, Some(&valid)).await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        assert!(body.is_empty());
        assert_eq!(headers[header::CACHE_CONTROL], "public, max-age=60");
        assert_eq!(headers[header::VARY], "authorization");
        assert!(state.downloads.knows(&enrolled));
        // Never cached past the token's expiry.
        let (_, headers, _) = device_get(&router, DEVICE_AUTHORIZE_PATH, Some(&short)).await;
        let max_age = headers[header::CACHE_CONTROL].to_str().unwrap().to_owned();
        assert!(
            ["public, max-age=20", "public, max-age=19"].contains(&max_age.as_str()),
            "{max_age}"
        );
        for (token, kind) in [
            (None, ErrorKind::Unauthorized),
            (Some(expired.as_str()), ErrorKind::DownloadTokenExpired),
            (Some(stranger.as_str()), ErrorKind::DownloadTokenInvalid),
            (Some("a1b2c3"), ErrorKind::DownloadTokenInvalid),
            (
                Some(&valid.replace("dev-1", "dev-2")),
                ErrorKind::DownloadTokenInvalid,
            ),
        ] {
            let (status, headers, body) = device_get(&router, DEVICE_AUTHORIZE_PATH, token).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{token:?}");
            assert_eq!(headers[header::CACHE_CONTROL], "no-store", "{token:?}");
            assert_eq!(kind_of(&body), kind, "{token:?}");
            assert_eq!(headers[AUTHORIZE_KIND_HEADER], kind.as_str());
            // The download itself says the same.
            let (status, _, body) = device_get(&router, &device_chunk_path(&hash), token).await;
            assert_eq!((status, kind_of(&body)), (StatusCode::UNAUTHORIZED, kind));
        }

        let (status, headers, body) =
            device_get(&router, &device_chunk_path(&hash), Some(&valid)).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            uplift_release::decode_named_chunk(&hash, &body, 1 << 20).unwrap(),
            data
        );
        assert_eq!(
            headers[header::CACHE_CONTROL],
            "public, max-age=31536000, immutable"
        );
        assert_eq!(headers[header::ETAG], format!("\"{hash}\"").as_str());
    }

    /// `/api/v1/rollouts/preview` beside `/api/v1/rollouts/{id}` and
    /// `/api/v1/rollouts/{id}/{command}`: the static segment is the
    /// preview's, and every rollout is still reached by its ID.
    #[tokio::test]
    async fn the_preview_route_shadows_no_rollout_and_no_rollout_route_takes_it() {
        let dir = tempfile::tempdir().unwrap();
        let state = Arc::new(testing::state(dir.path()).await);
        testing::release(&state, "2", "gw").await;
        for i in 0..10 {
            testing::device(&state, &format!("dev-{i}"), "gw").await;
        }
        let router = admin_router(state);
        let body = r#"{"release": "2", "devices": null, "policy": {"phases": [{"percent": 10}], "approval": true}}"#;

        let (status, preview) = call(&router, Method::POST, ROLLOUT_PREVIEW_PATH, body).await;
        assert_eq!(status, StatusCode::OK, "{preview}");
        let preview: RolloutPreview = serde_json::from_value(preview).unwrap();
        assert_eq!(preview.phase_sizes, [1, 9]);

        let (status, started) = call(&router, Method::POST, ROLLOUTS_PATH, body).await;
        assert_eq!(status, StatusCode::CREATED, "{started}");
        let started: RolloutView = serde_json::from_value(started).unwrap();
        assert_eq!(started.progress.unwrap().phase_sizes, preview.phase_sizes);
        let id = started.id;
        let (status, shown) =
            call(&router, Method::GET, &format!("{ROLLOUTS_PATH}/{id}"), "").await;
        assert_eq!((status, shown["id"].as_i64()), (StatusCode::OK, Some(id)));
        let (status, paused) = call(
            &router,
            Method::POST,
            &format!("{ROLLOUTS_PATH}/{id}/pause"),
            "",
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{paused}");
        assert_eq!(paused["progress"]["state"], "paused");

        // The preview path takes POST only: a GET is a 405, not a lookup
        // of a rollout named "preview"; with a command it is a rollout ID
        // that is not a number.
        let (status, _) = call(&router, Method::GET, ROLLOUT_PREVIEW_PATH, "").await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
        let (status, refused) = call(
            &router,
            Method::POST,
            &format!("{ROLLOUT_PREVIEW_PATH}/pause"),
            "",
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(
            refused["message"],
            r#"rollout id "preview" is not a number"#
        );
        // Only one rollout was started.
        let (_, listed) = call(&router, Method::GET, ROLLOUTS_PATH, "").await;
        assert_eq!(listed.as_array().map(Vec::len), Some(1));
    }

    #[test]
    fn ranges_are_parsed_and_clamped() {
        assert_eq!(parse_range("bytes=0-99", 1000), Some((0, 99)));
        assert_eq!(parse_range("bytes=500-", 1000), Some((500, 999)));
        assert_eq!(parse_range("bytes=900-5000", 1000), Some((900, 999)));
        assert_eq!(parse_range("bytes=1000-", 1000), None);
        assert_eq!(parse_range("bytes=5-2", 1000), None);
        assert_eq!(parse_range("items=0-1", 1000), None);
        assert_eq!(parse_range("bytes=-100", 1000), Some((900, 999)));
        assert_eq!(parse_range("bytes=-5000", 1000), Some((0, 999)));
        assert_eq!(parse_range("bytes=18446744073709551615-", 1000), None);
        assert_eq!(parse_range("bytes=0-0", 0), None, "nothing to serve");
        // One range only: several are refused, satisfiable or not.
        assert_eq!(parse_range("bytes=0-1,5-6", 1000), None);
        assert_eq!(parse_range("bytes=0-1, 2000-3000", 1000), None);
    }
}
