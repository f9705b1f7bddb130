//! What the control plane keeps beside the fleet: operators' API tokens
//! (as digests), the append-only audit log, and the lease that lets one
//! server replica at a time drive rollouts. A trait of its own so that the
//! fleet's [`super::Store`] stays about devices, releases and rollouts.

use super::StoreResult;
use async_trait::async_trait;
use uplift_proto::auth::{AuditAction, AuditEntry, AuditQuery, Role, TokenView};
use uplift_proto::{TokenName, WireError};

#[derive(Debug, Clone, Copy)]
pub struct NewApiToken<'a> {
    pub name: &'a TokenName,
    pub role: Role,
    /// Hex SHA-256 of the secret; the secret itself is never stored.
    pub secret_sha256: &'a str,
    pub created_at: &'a str,
    pub created_by: &'a str,
    pub expires_at: Option<&'a str>,
}

#[derive(Debug, Clone, Copy)]
pub struct NewAuditEntry<'a> {
    pub at: &'a str,
    pub actor: &'a str,
    pub token_id: Option<i64>,
    pub role: Role,
    pub action: AuditAction,
    pub target: &'a str,
    pub error: Option<&'a WireError>,
}

#[async_trait]
pub trait ControlStore: Send + Sync {
    async fn insert_api_token(&self, token: &NewApiToken<'_>) -> StoreResult<TokenView>;
    /// The token whose secret has this digest, revoked and expired ones too.
    async fn api_token_by_digest(&self, secret_sha256: &str) -> StoreResult<Option<TokenView>>;
    async fn list_api_tokens(&self) -> StoreResult<Vec<TokenView>>;
    /// Marks the token revoked at `now` unless it already is; the token as
    /// it now stands, `None` if there is no such token.
    async fn revoke_api_token(&self, id: i64, now: &str) -> StoreResult<Option<TokenView>>;

    /// Appends one entry; the log cannot be changed or shortened through
    /// the store (the table refuses updates and deletes).
    async fn append_audit(&self, entry: &NewAuditEntry<'_>) -> StoreResult<i64>;
    /// Entries matching `query`, newest first, at most `limit`.
    async fn audit_entries(&self, query: &AuditQuery, limit: u32) -> StoreResult<Vec<AuditEntry>>;

    /// Takes or renews the lease `name` for `holder` until `now_ms + ttl_ms`
    /// (milliseconds since the epoch) if it is free, expired or already
    /// `holder`'s; whether `holder` holds it now.
    async fn try_lease(
        &self,
        name: &str,
        holder: &str,
        now_ms: i64,
        ttl_ms: i64,
    ) -> StoreResult<bool>;
    /// Gives the lease up if `holder` holds it, so another replica need not
    /// wait for it to expire.
    async fn release_lease(&self, name: &str, holder: &str) -> StoreResult<()>;
}
