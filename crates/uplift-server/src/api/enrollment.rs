//! The admin API of enrollment approval: the requests (`?state=pending` for
//! those waiting) and an operator's accept or reject. The decisions are
//! [`service::enrollment`]'s, and audited there.

use super::*;
use uplift_proto::enrollment::{EnrollmentRejection, EnrollmentRequestView, EnrollmentState};

/// `?state=`: only requests in this state.
#[derive(Debug, Default, serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct EnrollmentQuery {
    /// `pending`, `accepted` or `rejected`; every request if left out.
    #[param(value_type = Option<String>)]
    pub state: Option<EnrollmentState>,
}

#[utoipa::path(
    get, path = "/api/v1/enrollments", tag = "devices",
    params(EnrollmentQuery),
    responses((status = 200, description = "Enrollment requests, oldest first", body = Vec<EnrollmentRequestView>)),
    security(("bearer" = ["read"]))
)]
pub(super) async fn list_enrollments(
    State(state): State<Arc<AppState>>,
    _: Allowed<Read>,
    query: Result<Query<EnrollmentQuery>, QueryRejection>,
) -> Result<Json<Vec<EnrollmentRequestView>>, ApiError> {
    let query = parse_query(query, "state is pending, accepted or rejected")?;
    Ok(Json(service::enrollment::list(&state, query.state).await?))
}

#[utoipa::path(
    post, path = "/api/v1/enrollments/{id}/accept", tag = "devices",
    params(("id" = i64, Path, description = "The request's ID")),
    responses(
        (status = 200, description = "Accepted: the device is enrolled with the ID shown", body = EnrollmentRequestView),
        (status = 404, description = "No such request", body = WireError),
        (status = 409, description = "Already accepted", body = WireError),
    ),
    security(("bearer" = ["operate"]))
)]
pub(super) async fn accept_enrollment(
    State(state): State<Arc<AppState>>,
    caller: Allowed<Operate>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<EnrollmentRequestView>, ApiError> {
    let id = numeric_id("enrollment request", id)?;
    Ok(Json(
        service::enrollment::accept(&state, caller.principal(), id).await?,
    ))
}

#[utoipa::path(
    post, path = "/api/v1/enrollments/{id}/reject", tag = "devices",
    params(("id" = i64, Path, description = "The request's ID")),
    request_body = EnrollmentRejection,
    responses(
        (status = 200, description = "Rejected: the device is told why and refused from now on", body = EnrollmentRequestView),
        (status = 404, description = "No such request", body = WireError),
        (status = 409, description = "Already decided", body = WireError),
    ),
    security(("bearer" = ["operate"]))
)]
pub(super) async fn reject_enrollment(
    State(state): State<Arc<AppState>>,
    caller: Allowed<Operate>,
    id: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<EnrollmentRequestView>, ApiError> {
    let id = numeric_id("enrollment request", id)?;
    let body = body?;
    let rejection: EnrollmentRejection = if body.is_empty() {
        EnrollmentRejection::default()
    } else {
        parse_json(&body)?
    };
    Ok(Json(
        service::enrollment::reject(&state, caller.principal(), id, rejection.reason).await?,
    ))
}
