//! Who is calling the admin API, and whether their role allows what they
//! ask. The middleware [`authenticate`] turns a bearer token into a
//! [`Principal`] (or answers 401); each handler names what it needs with an
//! [`Allowed`] argument, which answers 403 for too low a role. The handler
//! then passes the principal to the service layer, which records operator
//! changes in the audit log under its name.

use crate::error::ApiError;
use crate::service::{self, audit, ServiceError, ServiceResult};
use crate::state::AppState;
use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::marker::PhantomData;
use std::sync::Arc;
use uplift_proto::auth::{AuditAction, Caller, Permission, Role};

/// An authenticated caller of the admin API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// As the audit log names it: `token 3 (ci-bot)` or `bootstrap-admin`.
    pub name: String,
    pub role: Role,
    /// `None` for the bootstrap admin token (configured or generated at
    /// first start, not in the token table).
    pub token_id: Option<i64>,
}

impl Principal {
    pub const BOOTSTRAP_ADMIN: &'static str = "bootstrap-admin";

    pub fn bootstrap_admin() -> Self {
        Self {
            name: Self::BOOTSTRAP_ADMIN.to_owned(),
            role: Role::Admin,
            token_id: None,
        }
    }

    pub fn of_token(id: i64, name: &str, role: Role) -> Self {
        Self {
            name: format!("token {id} ({name})"),
            role,
            token_id: Some(id),
        }
    }

    pub fn caller(&self) -> Caller {
        Caller {
            name: self.name.clone(),
            role: self.role,
            token_id: self.token_id,
        }
    }
}

pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
}

/// Admin-route middleware: resolves the bearer token to a principal kept in
/// the request's extensions, or answers 401 before anything else is read.
pub async fn authenticate(
    State(state): State<Arc<AppState>>,
    mut request: Request,
    next: Next,
) -> Response {
    let Some(token) = bearer(request.headers()) else {
        return ApiError::unauthorized(
            "API token missing; pass --token or set UPLIFT_TOKEN (the server's admin token, or one made with \
             `uplift token create`)",
        )
        .into_response();
    };
    match service::tokens::authenticate(&state, token, time::OffsetDateTime::now_utc()).await {
        Ok(Some(principal)) => {
            request.extensions_mut().insert(principal);
            next.run(request).await
        }
        Ok(None) => ApiError::unauthorized(
            "API token wrong, expired or revoked; see `uplift token list`, or ask an admin for a new one",
        )
        .into_response(),
        Err(e) => ApiError::from(e).into_response(),
    }
}

/// What an endpoint needs, as a type, so a handler's signature says it.
pub trait Needs {
    const PERMISSION: Permission;
}

#[derive(Debug)]
pub struct Read;
impl Needs for Read {
    const PERMISSION: Permission = Permission::Read;
}

#[derive(Debug)]
pub struct Operate;
impl Needs for Operate {
    const PERMISSION: Permission = Permission::Operate;
}

#[derive(Debug)]
pub struct Release;
impl Needs for Release {
    const PERMISSION: Permission = Permission::Release;
}

#[derive(Debug)]
pub struct Administer;
impl Needs for Administer {
    const PERMISSION: Permission = Permission::Administer;
}

/// The caller, checked to hold `N`'s permission: a handler argument.
#[derive(Debug)]
pub struct Allowed<N>(pub Principal, PhantomData<N>);

impl<N> Allowed<N> {
    pub fn principal(&self) -> &Principal {
        &self.0
    }
}

/// Whether `principal` may do what `permission` covers, with the refusal
/// an operator can act on.
pub fn check(principal: &Principal, permission: Permission) -> ServiceResult<()> {
    if principal.role.allows(permission) {
        return Ok(());
    }
    Err(ServiceError::Denied {
        caller: principal.name.clone(),
        role: principal.role,
        permission,
    })
}

impl<N: Needs> FromRequestParts<Arc<AppState>> for Allowed<N> {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, ApiError> {
        // Present on every admin route (the middleware put it there); a
        // route without the middleware fails closed.
        let principal = parts
            .extensions
            .get::<Principal>()
            .cloned()
            .ok_or_else(|| {
                ApiError::internal("this endpoint has no authentication; report this as a bug")
            })?;
        let allowed = check(&principal, N::PERMISSION);
        if allowed.is_err() {
            // Only holders of a valid token get here, so this cannot be
            // used to flood the log anonymously.
            let request = format!("{} {}", parts.method, parts.uri.path());
            audit::record(
                state,
                &principal,
                AuditAction::AccessDenied,
                &request,
                &allowed,
            )
            .await;
        }
        allowed?;
        Ok(Self(principal, PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use strum::IntoEnumIterator;
    use uplift_proto::ErrorKind;

    #[test]
    fn a_refusal_names_the_caller_its_role_and_the_role_needed() {
        let viewer = Principal::of_token(7, "dashboard", Role::Viewer);
        let refusal = ApiError::from(check(&viewer, Permission::Operate).unwrap_err());
        assert_eq!(refusal.kind, ErrorKind::Forbidden);
        assert_eq!(
            refusal.message,
            "token 7 (dashboard) has role viewer and may not start or steer rollouts, or tag devices; \
             use a token with role operator or admin"
        );
        assert!(check(&viewer, Permission::Read).is_ok());
        for permission in Permission::iter() {
            assert!(check(&Principal::bootstrap_admin(), permission).is_ok());
        }
    }
}
