//! HTTP handlers for roots of trust: the admin API publishes and lists
//! them ([`ROOTS_PATH`]); devices download the chain after the root they
//! hold ([`uplift_proto::trust::device_roots_path`]). What is checked is
//! in [`crate::service::roots`].

use super::{device_of, parse_query};
use crate::auth::{Administer, Allowed, Read};
use crate::error::ApiError;
use crate::service;
use crate::state::AppState;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use std::sync::Arc;
use uplift_proto::trust::{RootView, RootsAfter};
#[allow(unused_imports)] // named by the OpenAPI attributes
use uplift_proto::{trust::ROOTS_PATH, WireError};

/// Device route of the root chain.
pub const DEVICE_ROOTS_ROUTE: &str = "/v1/device/roots";

#[utoipa::path(
    get, path = "/api/v1/roots", tag = "access",
    responses((status = 200, description = "Every published root of trust, oldest first", body = Vec<RootView>)),
    security(("bearer" = ["read"]))
)]
pub(super) async fn list_roots(
    State(state): State<Arc<AppState>>,
    _: Allowed<Read>,
) -> Result<Json<Vec<RootView>>, ApiError> {
    Ok(Json(service::roots::list(&state).await?))
}

#[utoipa::path(
    post, path = "/api/v1/roots", tag = "access",
    request_body(content = serde_json::Value, description = "A signed root (`uplift root init`/`next`, signed with `uplift root sign`)"),
    responses(
        (status = 201, description = "Published", body = RootView),
        (status = 409, description = "This version is already published", body = WireError),
        (status = 422, description = "Not signed by the threshold of root keys it needs", body = WireError),
    ),
    security(("bearer" = ["administer"]))
)]
pub(super) async fn publish_root(
    State(state): State<Arc<AppState>>,
    caller: Allowed<Administer>,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<RootView>), ApiError> {
    let view = service::roots::publish(&state, caller.principal(), &body?).await?;
    Ok((StatusCode::CREATED, Json(view)))
}

/// The roots published after `after`, for an authenticated device.
pub(super) async fn device_roots(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    query: Result<Query<RootsAfter>, QueryRejection>,
) -> Result<Response, ApiError> {
    device_of(&state, &headers).await?;
    let RootsAfter { after } = parse_query(query, "give after=<version of the held root>")?;
    let body = service::roots::chain_after(&state, after).await?;
    state.stats.add_sent(body.len() as u64);
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response())
}
