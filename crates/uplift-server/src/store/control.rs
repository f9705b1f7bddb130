//! What the control plane keeps beside the fleet: operators' API tokens
//! (as digests), the append-only audit log, webhooks and their delivery
//! log, and the leases that let one server replica at a time drive
//! rollouts and send deliveries. A trait of its own so that the
//! fleet's [`super::Store`] stays about devices, releases and rollouts.

use super::{StoreResult, Timestamp};
use async_trait::async_trait;
use uplift_proto::auth::{AuditAction, AuditEntry, AuditQuery, Role, TokenView};
use uplift_proto::enrollment::{EnrollmentRequestView, EnrollmentState};
use uplift_proto::events::{DeliveryView, EventFilter, WebhookView};
use uplift_proto::{DeviceId, DeviceType, HardwareId, TokenName, WireError};

#[derive(Debug, Clone, Copy)]
pub struct NewApiToken<'a> {
    pub name: &'a TokenName,
    pub role: Role,
    /// Hex SHA-256 of the secret; the secret itself is never stored.
    pub secret_sha256: &'a str,
    pub created_at: Timestamp,
    pub created_by: &'a str,
    pub expires_at: Option<Timestamp>,
    /// The most new devices an enrollment token may enroll.
    pub max_uses: Option<u32>,
}

#[derive(Debug, Clone, Copy)]
pub struct NewAuditEntry<'a> {
    pub at: Timestamp,
    pub actor: &'a str,
    pub token_id: Option<i64>,
    pub role: Role,
    pub action: AuditAction,
    pub target: &'a str,
    pub error: Option<&'a WireError>,
}

#[derive(Debug, Clone, Copy)]
pub struct NewWebhook<'a> {
    pub url: &'a str,
    /// The HMAC key deliveries are signed with; kept as it is, since the
    /// server must sign with it (only admins can list webhooks, and the
    /// list never shows it).
    pub secret: &'a str,
    pub filter: &'a EventFilter,
    pub created_at: Timestamp,
    pub created_by: &'a str,
}

/// A webhook with what the deliverer needs and the list does not show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookRecord {
    pub view: WebhookView,
    pub secret: String,
}

/// One event to deliver to one webhook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewDelivery {
    pub webhook_id: i64,
    /// `device.committed`, ...
    pub event: String,
    /// The JSON body to POST.
    pub payload: String,
    pub created_at: Timestamp,
    /// Milliseconds since the epoch; due at once when made.
    pub due_ms: i64,
}

/// A delivery that is due, with where and how to send it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DueDelivery {
    pub id: i64,
    pub webhook_id: i64,
    pub url: String,
    pub secret: String,
    pub event: String,
    pub payload: String,
    pub attempts: u32,
}

/// What one attempt came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt<'a> {
    pub at: Timestamp,
    pub status: Option<u16>,
    pub error: Option<&'a WireError>,
    /// `Some` (ms since the epoch) to try again then; `None` when this
    /// attempt delivered it (no error) or was the last (an error).
    pub retry_at_ms: Option<i64>,
}

/// A device's first request to enroll, in approval mode.
#[derive(Debug, Clone, Copy)]
pub struct NewEnrollmentRequest<'a> {
    /// The device's ed25519 public key, base64, as it enrolls with it.
    pub public_key: &'a str,
    pub key_fingerprint: &'a str,
    pub device_type: &'a DeviceType,
    pub hardware_id: &'a HardwareId,
    pub requested_at: Timestamp,
}

/// An enrollment request with the key it is for (the view shows only the
/// key's fingerprint).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnrollmentRecord {
    pub view: EnrollmentRequestView,
    pub public_key: String,
}

/// An operator's decision on an enrollment request.
#[derive(Debug, Clone, Copy)]
pub enum EnrollmentDecision<'a> {
    /// Accepts a pending or rejected request: the device was stored with
    /// this ID.
    Accept { device_id: &'a DeviceId },
    /// Rejects a pending request.
    Reject { reason: Option<&'a str> },
}

impl EnrollmentDecision<'_> {
    /// The states a request may be in for this decision to apply.
    pub fn applies_to(&self) -> &'static [EnrollmentState] {
        match self {
            EnrollmentDecision::Accept { .. } => {
                &[EnrollmentState::Pending, EnrollmentState::Rejected]
            }
            EnrollmentDecision::Reject { .. } => &[EnrollmentState::Pending],
        }
    }
}

#[async_trait]
pub trait ControlStore: Send + Sync {
    async fn insert_api_token(&self, token: &NewApiToken<'_>) -> StoreResult<TokenView>;
    /// The token whose secret has this digest, revoked and expired ones too.
    async fn api_token_by_digest(&self, secret_sha256: &str) -> StoreResult<Option<TokenView>>;
    async fn list_api_tokens(&self) -> StoreResult<Vec<TokenView>>;
    /// Marks the token revoked at `now` unless it already is; the token as
    /// it now stands, `None` if there is no such token.
    async fn revoke_api_token(&self, id: i64, now: Timestamp) -> StoreResult<Option<TokenView>>;

    /// Appends one entry; the log cannot be changed or shortened through
    /// the store (the table refuses updates and deletes).
    async fn append_audit(&self, entry: &NewAuditEntry<'_>) -> StoreResult<i64>;
    /// Entries matching `query`, newest first, at most `limit`.
    async fn audit_entries(&self, query: &AuditQuery, limit: u32) -> StoreResult<Vec<AuditEntry>>;

    async fn insert_webhook(&self, webhook: &NewWebhook<'_>) -> StoreResult<WebhookView>;
    /// Every webhook, removed ones too, by id.
    async fn webhooks(&self) -> StoreResult<Vec<WebhookRecord>>;
    /// Marks it removed at `now` (nothing more is delivered to it); the
    /// webhook as it now stands, `None` if there is no such webhook.
    async fn remove_webhook(&self, id: i64, now: Timestamp) -> StoreResult<Option<WebhookView>>;
    async fn insert_deliveries(&self, deliveries: &[NewDelivery]) -> StoreResult<()>;
    /// Pending deliveries due at `now_ms` to webhooks not removed, oldest
    /// first, at most `limit`.
    async fn due_deliveries(&self, now_ms: i64, limit: u32) -> StoreResult<Vec<DueDelivery>>;
    async fn record_attempt(&self, id: i64, attempt: &Attempt<'_>) -> StoreResult<()>;
    /// Forgets each webhook's finished (delivered or failed) deliveries
    /// beyond its newest `keep` finished ones; pending ones are never
    /// forgotten. How many were.
    async fn prune_deliveries(&self, keep: u32) -> StoreResult<u64>;
    /// A webhook's deliveries, newest first, older than delivery `before`.
    async fn deliveries(
        &self,
        webhook_id: i64,
        before: Option<i64>,
        limit: u32,
    ) -> StoreResult<Vec<DeliveryView>>;

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

    /// Counts one use of token `id` unless it has reached its `max_uses`;
    /// whether it was counted (false: used up, or no such token).
    async fn use_api_token(&self, id: i64) -> StoreResult<bool>;
    /// Stores `request` as pending unless its key already has a request;
    /// the key's request as it now stands (new, or the one it had).
    async fn request_enrollment(
        &self,
        request: &NewEnrollmentRequest<'_>,
    ) -> StoreResult<EnrollmentRecord>;
    async fn enrollment_request(&self, id: i64) -> StoreResult<Option<EnrollmentRecord>>;
    async fn enrollment_request_by_key(
        &self,
        public_key: &str,
    ) -> StoreResult<Option<EnrollmentRecord>>;
    /// Requests in `state` (every one if `None`), oldest first.
    async fn enrollment_requests(
        &self,
        state: Option<EnrollmentState>,
    ) -> StoreResult<Vec<EnrollmentRecord>>;
    /// Applies `decision` to request `id` if it is in a state the decision
    /// applies to ([`EnrollmentDecision::applies_to`]), in one statement, so
    /// two operators deciding at once cannot both win. The request as it
    /// now stands, and whether this decision changed it; `None` if there is
    /// no such request.
    async fn decide_enrollment(
        &self,
        id: i64,
        decision: &EnrollmentDecision<'_>,
        by: &str,
        now: Timestamp,
    ) -> StoreResult<Option<(EnrollmentRecord, bool)>>;
}
