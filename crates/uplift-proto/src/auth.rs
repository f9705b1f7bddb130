//! Who may do what on the admin API: the roles an API token carries, what
//! each role allows, and the bodies of the token and audit-log endpoints.
//! The server enforces [`Role::allows`]; the CLI and the web page read the
//! same table to say what a caller may do.

use crate::error::WireError;
use crate::names::TokenName;
use serde::{Deserialize, Serialize};
use std::num::NonZeroU64;

pub const TOKENS_PATH: &str = "/api/v1/tokens";
pub const AUDIT_PATH: &str = "/api/v1/audit";
pub const WHOAMI_PATH: &str = "/api/v1/whoami";

/// What a token may do. Every token has exactly one role.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    Serialize,
    Deserialize,
    strum::EnumString,
    strum::IntoStaticStr,
    strum::EnumIter,
)]
#[serde(rename_all = "kebab-case")]
#[strum(serialize_all = "kebab-case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum Role {
    /// Reads everything: devices, releases, rollouts, stats, metrics.
    Viewer,
    /// A viewer who also starts and steers rollouts and tags devices.
    Operator,
    /// A viewer who also uploads releases (a build pipeline's token).
    ReleaseManager,
    /// Everything, including API tokens and the audit log.
    Admin,
    /// Enrolls devices (an agent's `enrollment_token`): nothing on the
    /// admin API. Made per factory line or batch, with an expiry, and
    /// revoked when the batch is done.
    Enrollment,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        self.into()
    }

    pub fn allows(self, permission: Permission) -> bool {
        match self {
            Role::Admin => true,
            Role::Viewer => matches!(permission, Permission::Read),
            Role::Operator => matches!(permission, Permission::Read | Permission::Operate),
            Role::ReleaseManager => matches!(permission, Permission::Read | Permission::Release),
            Role::Enrollment => false,
        }
    }

    /// The least role that has `permission`, for a refusal's advice.
    pub fn least_with(permission: Permission) -> Role {
        match permission {
            Permission::Read => Role::Viewer,
            Permission::Operate => Role::Operator,
            Permission::Release => Role::ReleaseManager,
            Permission::Administer => Role::Admin,
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What an endpoint needs of its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, strum::EnumIter)]
pub enum Permission {
    Read,
    /// Start, pause, resume, approve, abort and retry rollouts; tag devices.
    Operate,
    /// Upload releases, their chunks, patches and indexes.
    Release,
    /// Create, list and revoke API tokens and webhooks; read the audit log.
    Administer,
}

impl Permission {
    /// What the permission lets one do, completing "may not ...".
    pub fn describe(self) -> &'static str {
        match self {
            Permission::Read => "read the fleet's state",
            Permission::Operate => "start or steer rollouts, or tag devices",
            Permission::Release => "upload releases",
            Permission::Administer => "manage API tokens or webhooks, or read the audit log",
        }
    }
}

/// `POST /api/v1/tokens`: a new token. Its secret is in the answer, once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TokenCreate {
    pub name: TokenName,
    pub role: Role,
    /// The token stops working this many seconds after it is made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// At most ten years (316224000 s).
    #[cfg_attr(
        feature = "openapi",
        schema(value_type = Option<u64>, minimum = 1, maximum = 316_224_000)
    )]
    pub expires_in_secs: Option<NonZeroU64>,
    /// An enrollment token enrolls at most this many new devices (at most
    /// a billion).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(
        feature = "openapi",
        schema(value_type = Option<u32>, minimum = 1, maximum = 1_000_000_000)
    )]
    pub max_uses: Option<std::num::NonZeroU32>,
}

/// A token as listed: everything but its secret, which is never stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TokenView {
    pub id: i64,
    pub name: TokenName,
    pub role: Role,
    /// RFC 3339.
    pub created_at: String,
    /// Who made it, as the audit log names callers.
    pub created_by: String,
    pub expires_at: Option<String>,
    pub revoked_at: Option<String>,
    /// The most new devices it may enroll (`None`: no limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_uses: Option<u32>,
    /// New devices it has enrolled (or put in the pending list).
    #[serde(default)]
    pub uses: u32,
}

/// The answer to [`TokenCreate`]: the only time the secret is shown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TokenCreated {
    pub token: TokenView,
    pub secret: String,
}

/// `GET /api/v1/whoami`: the caller as the server sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Caller {
    /// `token <id> (<name>)`, or `bootstrap-admin` for the token made at
    /// first start.
    pub name: String,
    pub role: Role,
    pub token_id: Option<i64>,
}

/// What an operator did, as the audit log names it.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    Serialize,
    Deserialize,
    strum::EnumString,
    strum::IntoStaticStr,
    strum::EnumIter,
)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum AuditAction {
    #[serde(rename = "release.upload")]
    #[strum(serialize = "release.upload")]
    ReleaseUpload,
    #[serde(rename = "rollout.start")]
    #[strum(serialize = "rollout.start")]
    RolloutStart,
    #[serde(rename = "rollout.pause")]
    #[strum(serialize = "rollout.pause")]
    RolloutPause,
    #[serde(rename = "rollout.resume")]
    #[strum(serialize = "rollout.resume")]
    RolloutResume,
    #[serde(rename = "rollout.approve")]
    #[strum(serialize = "rollout.approve")]
    RolloutApprove,
    #[serde(rename = "rollout.abort")]
    #[strum(serialize = "rollout.abort")]
    RolloutAbort,
    #[serde(rename = "rollout.retry")]
    #[strum(serialize = "rollout.retry")]
    RolloutRetry,
    #[serde(rename = "device.tags")]
    #[strum(serialize = "device.tags")]
    DeviceTags,
    #[serde(rename = "device.remove")]
    #[strum(serialize = "device.remove")]
    DeviceRemove,
    #[serde(rename = "enrollment.accept")]
    #[strum(serialize = "enrollment.accept")]
    EnrollmentAccept,
    #[serde(rename = "enrollment.reject")]
    #[strum(serialize = "enrollment.reject")]
    EnrollmentReject,
    #[serde(rename = "token.create")]
    #[strum(serialize = "token.create")]
    TokenCreate,
    #[serde(rename = "token.revoke")]
    #[strum(serialize = "token.revoke")]
    TokenRevoke,
    #[serde(rename = "webhook.create")]
    #[strum(serialize = "webhook.create")]
    WebhookCreate,
    #[serde(rename = "webhook.remove")]
    #[strum(serialize = "webhook.remove")]
    WebhookRemove,
    /// A root of trust published (`uplift root publish`); the target is
    /// `root <version>`.
    #[serde(rename = "root.publish")]
    #[strum(serialize = "root.publish")]
    RootPublish,
    /// A known caller asked for what its role does not allow; the target
    /// is the request (`POST /api/v1/rollouts`).
    #[serde(rename = "access.denied")]
    #[strum(serialize = "access.denied")]
    AccessDenied,
}

impl AuditAction {
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

impl std::fmt::Display for AuditAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One line of the audit log: who did what to what, when, and how it ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AuditEntry {
    pub id: i64,
    /// RFC 3339.
    pub at: String,
    pub actor: String,
    pub token_id: Option<i64>,
    pub role: Role,
    pub action: AuditAction,
    /// What it was done to: `rollout 3`, `release 1.1`, `token 4`, ...
    pub target: String,
    /// Absent when the action succeeded; the refusal or failure otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<WireError>,
}

/// Most audit entries one page holds.
pub const MAX_AUDIT_PAGE: u32 = 1000;

/// `GET /api/v1/audit?...`: newest first, filtered.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(
    feature = "openapi",
    derive(utoipa::IntoParams),
    into_params(parameter_in = Query)
)]
pub struct AuditQuery {
    /// Exactly this actor, as entries name it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<AuditAction>,
    /// Exactly this target, e.g. `rollout 3`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Only entries older than this entry id (the previous page's `next`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before: Option<i64>,
    /// At most this many entries (default 100, at most [`MAX_AUDIT_PAGE`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", param(minimum = 1, maximum = 1000))]
    pub limit: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AuditPage {
    pub entries: Vec<AuditEntry>,
    /// Pass as `before` for the next (older) page; absent on the last one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<i64>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use strum::IntoEnumIterator;

    #[test]
    fn each_role_has_exactly_its_permissions() {
        use Permission::*;
        let allowed = |role: Role| -> Vec<Permission> {
            Permission::iter().filter(|p| role.allows(*p)).collect()
        };
        assert_eq!(allowed(Role::Viewer), vec![Read]);
        assert_eq!(allowed(Role::Operator), vec![Read, Operate]);
        assert_eq!(allowed(Role::ReleaseManager), vec![Read, Release]);
        assert_eq!(
            allowed(Role::Admin),
            vec![Read, Operate, Release, Administer]
        );
        for p in Permission::iter() {
            assert!(Role::least_with(p).allows(p));
        }
    }

    #[test]
    fn wire_names_are_the_same_for_serde_and_strum() {
        for role in Role::iter() {
            let json = serde_json::to_value(role).unwrap();
            assert_eq!(json, serde_json::Value::String(role.as_str().into()));
            assert_eq!(role.as_str().parse::<Role>().unwrap(), role);
        }
        assert_eq!(Role::ReleaseManager.as_str(), "release-manager");
        for action in AuditAction::iter() {
            let json = serde_json::to_value(action).unwrap();
            assert_eq!(json, serde_json::Value::String(action.as_str().into()));
            assert_eq!(action.as_str().parse::<AuditAction>().unwrap(), action);
        }
    }

    #[test]
    fn a_token_request_with_an_unknown_role_or_field_is_refused() {
        let bad_role = r#"{"name": "ci", "role": "root"}"#;
        assert!(serde_json::from_str::<TokenCreate>(bad_role).is_err());
        let extra = r#"{"name": "ci", "role": "viewer", "admin": true}"#;
        assert!(serde_json::from_str::<TokenCreate>(extra).is_err());
        let bad_name = r#"{"name": "no spaces", "role": "viewer"}"#;
        assert!(serde_json::from_str::<TokenCreate>(bad_name).is_err());
    }
}
