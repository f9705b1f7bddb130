//! PostgreSQL implementation of [`ControlStore`]: API tokens, the audit
//! log, webhooks and leases, as the SQLite store keeps them.

use super::{db, parse, PgStore};
use crate::store::control::{
    Attempt, ControlStore, DueDelivery, EnrollmentDecision, EnrollmentRecord, NewApiToken,
    NewAuditEntry, NewDelivery, NewEnrollmentRequest, NewWebhook, WebhookRecord,
};
use crate::store::{stamp, StoreResult, Timestamp};
use async_trait::async_trait;
use sqlx::postgres::PgRow;
use sqlx::Row;
use time::OffsetDateTime;
use uplift_proto::auth::{AuditEntry, AuditQuery, TokenView};
use uplift_proto::enrollment::{EnrollmentRequestView, EnrollmentState};
use uplift_proto::events::{DeliveryStatus, DeliveryView, WebhookView};
use uplift_proto::{ErrorKind, WireError};

const TOKEN_COLUMNS: &str =
    "id, name, role, created_at, created_by, expires_at, revoked_at, max_uses, uses";

fn time_at(row: &PgRow, i: usize, action: &'static str) -> StoreResult<String> {
    let t: OffsetDateTime = row.try_get(i).map_err(db(action))?;
    Ok(stamp::shown(t))
}

fn time_opt(row: &PgRow, i: usize, action: &'static str) -> StoreResult<Option<String>> {
    let t: Option<OffsetDateTime> = row.try_get(i).map_err(db(action))?;
    Ok(t.map(stamp::shown))
}

fn token_from_row(row: PgRow) -> StoreResult<TokenView> {
    let action = "reading an API token";
    let text = |i: usize| row.try_get::<String, _>(i).map_err(db(action));
    Ok(TokenView {
        id: row.try_get(0).map_err(db(action))?,
        name: parse("token name", text(1)?)?,
        role: parse("token role", text(2)?)?,
        created_at: time_at(&row, 3, action)?,
        created_by: text(4)?,
        expires_at: time_opt(&row, 5, action)?,
        revoked_at: time_opt(&row, 6, action)?,
        max_uses: row
            .try_get::<Option<i64>, _>(7)
            .map_err(db(action))?
            .map(|n| n.clamp(0, u32::MAX.into()) as u32),
        uses: row
            .try_get::<i64, _>(8)
            .map_err(db(action))?
            .clamp(0, u32::MAX.into()) as u32,
    })
}

const ENROLLMENT_COLUMNS: &str = "id, public_key, key_fingerprint, device_type, hardware_id, \
     requested_at, state, decided_at, decided_by, reason, device_id";

fn enrollment_from_row(row: PgRow) -> StoreResult<EnrollmentRecord> {
    let action = "reading an enrollment request";
    let text = |i: usize| row.try_get::<String, _>(i).map_err(db(action));
    let opt_text = |i: usize| row.try_get::<Option<String>, _>(i).map_err(db(action));
    Ok(EnrollmentRecord {
        view: EnrollmentRequestView {
            id: row.try_get(0).map_err(db(action))?,
            key_fingerprint: text(2)?,
            device_type: parse("device type", text(3)?)?,
            hardware_id: parse("hardware id", text(4)?)?,
            requested_at: time_at(&row, 5, action)?,
            state: parse("enrollment state", text(6)?)?,
            decided_at: time_opt(&row, 7, action)?,
            decided_by: opt_text(8)?,
            reason: opt_text(9)?,
            device_id: opt_text(10)?.map(|id| parse("device id", id)).transpose()?,
        },
        public_key: text(1)?,
    })
}

const AUDIT_COLUMNS: &str =
    "id, at, actor, token_id, role, action, target, error_kind, error_message";

fn audit_from_row(row: PgRow) -> StoreResult<AuditEntry> {
    let action = "reading the audit log";
    let get = |i: usize| row.try_get::<Option<String>, _>(i).map_err(db(action));
    let text = |i: usize| row.try_get::<String, _>(i).map_err(db(action));
    let error = match (get(7)?, get(8)?) {
        (Some(kind), message) => Some(WireError {
            kind: serde_json::from_value::<ErrorKind>(serde_json::Value::String(kind))
                .unwrap_or(ErrorKind::Unknown),
            message: message.unwrap_or_default(),
        }),
        (None, _) => None,
    };
    Ok(AuditEntry {
        id: row.try_get(0).map_err(db(action))?,
        at: time_at(&row, 1, action)?,
        actor: text(2)?,
        token_id: row.try_get(3).map_err(db(action))?,
        role: parse("audit role", text(4)?)?,
        action: parse("audit action", text(5)?)?,
        target: text(6)?,
        error,
    })
}

const WEBHOOK_COLUMNS: &str = "id, url, filter, created_at, created_by, removed_at, secret";

fn webhook_from_row(row: PgRow) -> StoreResult<WebhookRecord> {
    let action = "reading a webhook";
    let text = |i: usize| row.try_get::<String, _>(i).map_err(db(action));
    let filter =
        serde_json::from_str(&text(2)?).map_err(|e| crate::store::StoreError::Corrupt {
            what: "webhook filter",
            detail: e.to_string(),
        })?;
    Ok(WebhookRecord {
        view: WebhookView {
            id: row.try_get(0).map_err(db(action))?,
            url: text(1)?,
            filter,
            created_at: time_at(&row, 3, action)?,
            created_by: text(4)?,
            removed_at: time_opt(&row, 5, action)?,
        },
        secret: text(6)?,
    })
}

/// Milliseconds since the epoch as RFC 3339, for a delivery's view.
fn ms_text(ms: i64) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .map(stamp::shown)
        .unwrap_or_default()
}

fn delivery_from_row(row: PgRow) -> StoreResult<DeliveryView> {
    let action = "reading a delivery";
    let get = |i: usize| row.try_get::<Option<String>, _>(i).map_err(db(action));
    let number = |i: usize| row.try_get::<Option<i64>, _>(i).map_err(db(action));
    let status = match get(3)?.as_deref() {
        Some("delivered") => DeliveryStatus::Delivered,
        Some("failed") => DeliveryStatus::Failed,
        _ => DeliveryStatus::Pending,
    };
    let last_error = get(9)?.map(|kind| WireError {
        kind: serde_json::from_value(serde_json::Value::String(kind)).unwrap_or(ErrorKind::Unknown),
        message: String::new(),
    });
    let last_error = match (last_error, get(10)?) {
        (Some(mut e), message) => {
            e.message = message.unwrap_or_default();
            Some(e)
        }
        (None, _) => None,
    };
    Ok(DeliveryView {
        id: row.try_get(0).map_err(db(action))?,
        webhook_id: row.try_get(1).map_err(db(action))?,
        event: get(2)?.unwrap_or_default(),
        status,
        attempts: number(4)?.unwrap_or(0).max(0) as u32,
        created_at: time_at(&row, 5, action)?,
        next_attempt_at: match status {
            DeliveryStatus::Pending => number(6)?.map(ms_text),
            DeliveryStatus::Delivered | DeliveryStatus::Failed => None,
        },
        delivered_at: time_opt(&row, 7, action)?,
        last_status: number(8)?.and_then(|n| u16::try_from(n).ok()),
        last_error,
    })
}

impl PgStore {
    /// Sets `ended_column` of row `id` of `table` to `now` unless it is set
    /// already, then reads the row back as `columns`. Table and column
    /// names are this module's constants, never input.
    async fn end_row(
        &self,
        table: &str,
        ended_column: &str,
        columns: &str,
        id: i64,
        now: Timestamp,
        action: &'static str,
    ) -> StoreResult<Option<PgRow>> {
        sqlx::query(&format!(
            "UPDATE {table} SET {ended_column} = $1 WHERE id = $2 AND {ended_column} IS NULL"
        ))
        .bind(now.instant())
        .bind(id)
        .execute(&self.pool)
        .await
        .map_err(db(action))?;
        sqlx::query(&format!("SELECT {columns} FROM {table} WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(db(action))
    }
}

#[async_trait]
impl ControlStore for PgStore {
    async fn insert_api_token(&self, t: &NewApiToken<'_>) -> StoreResult<TokenView> {
        let row = sqlx::query(&format!(
            "INSERT INTO api_tokens (name, role, secret_sha256, created_at, created_by, expires_at, max_uses) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING {TOKEN_COLUMNS}"
        ))
        .bind(t.name.as_str())
        .bind(t.role.as_str())
        .bind(t.secret_sha256)
        .bind(t.created_at.instant())
        .bind(t.created_by)
        .bind(t.expires_at.map(Timestamp::instant))
        .bind(t.max_uses.map(i64::from))
        .fetch_one(&self.pool)
        .await
        .map_err(db("storing an API token"))?;
        token_from_row(row)
    }

    async fn api_token_by_digest(&self, secret_sha256: &str) -> StoreResult<Option<TokenView>> {
        sqlx::query(&format!(
            "SELECT {TOKEN_COLUMNS} FROM api_tokens WHERE secret_sha256 = $1"
        ))
        .bind(secret_sha256)
        .fetch_optional(&self.pool)
        .await
        .map_err(db("looking up an API token"))?
        .map(token_from_row)
        .transpose()
    }

    async fn list_api_tokens(&self) -> StoreResult<Vec<TokenView>> {
        sqlx::query(&format!(
            "SELECT {TOKEN_COLUMNS} FROM api_tokens ORDER BY id"
        ))
        .fetch_all(&self.pool)
        .await
        .map_err(db("listing API tokens"))?
        .into_iter()
        .map(token_from_row)
        .collect()
    }

    async fn revoke_api_token(&self, id: i64, now: Timestamp) -> StoreResult<Option<TokenView>> {
        self.end_row(
            "api_tokens",
            "revoked_at",
            TOKEN_COLUMNS,
            id,
            now,
            "revoking an API token",
        )
        .await?
        .map(token_from_row)
        .transpose()
    }

    async fn append_audit(&self, e: &NewAuditEntry<'_>) -> StoreResult<i64> {
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO audit_log (at, actor, token_id, role, action, target, error_kind, error_message) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING id",
        )
        .bind(e.at.instant())
        .bind(e.actor)
        .bind(e.token_id)
        .bind(e.role.as_str())
        .bind(e.action.as_str())
        .bind(e.target)
        .bind(e.error.map(|w| w.kind.as_str()))
        .bind(e.error.map(|w| w.message.as_str()))
        .fetch_one(&self.pool)
        .await
        .map_err(db("writing the audit log"))?;
        Ok(id)
    }

    async fn audit_entries(&self, query: &AuditQuery, limit: u32) -> StoreResult<Vec<AuditEntry>> {
        sqlx::query(&format!(
            "SELECT {AUDIT_COLUMNS} FROM audit_log \
             WHERE ($1::text IS NULL OR actor = $1) AND ($2::text IS NULL OR action = $2) \
               AND ($3::text IS NULL OR target = $3) AND ($4::bigint IS NULL OR id < $4) \
             ORDER BY id DESC LIMIT $5"
        ))
        .bind(query.actor.as_deref())
        .bind(query.action.map(|a| a.as_str()))
        .bind(query.target.as_deref())
        .bind(query.before)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(db("reading the audit log"))?
        .into_iter()
        .map(audit_from_row)
        .collect()
    }

    async fn insert_webhook(&self, w: &NewWebhook<'_>) -> StoreResult<WebhookView> {
        let filter = serde_json::to_string(w.filter)
            .unwrap_or_else(|e| unreachable!("a filter serializes: {e}"));
        let row = sqlx::query(&format!(
            "INSERT INTO webhooks (url, secret, filter, created_at, created_by) VALUES ($1, $2, $3, $4, $5) \
             RETURNING {WEBHOOK_COLUMNS}"
        ))
        .bind(w.url)
        .bind(w.secret)
        .bind(filter)
        .bind(w.created_at.instant())
        .bind(w.created_by)
        .fetch_one(&self.pool)
        .await
        .map_err(db("storing a webhook"))?;
        Ok(webhook_from_row(row)?.view)
    }

    async fn webhooks(&self) -> StoreResult<Vec<WebhookRecord>> {
        sqlx::query(&format!(
            "SELECT {WEBHOOK_COLUMNS} FROM webhooks ORDER BY id"
        ))
        .fetch_all(&self.pool)
        .await
        .map_err(db("listing webhooks"))?
        .into_iter()
        .map(webhook_from_row)
        .collect()
    }

    async fn remove_webhook(&self, id: i64, now: Timestamp) -> StoreResult<Option<WebhookView>> {
        self.end_row(
            "webhooks",
            "removed_at",
            WEBHOOK_COLUMNS,
            id,
            now,
            "removing a webhook",
        )
        .await?
        .map(|row| webhook_from_row(row).map(|w| w.view))
        .transpose()
    }

    async fn insert_deliveries(&self, deliveries: &[NewDelivery]) -> StoreResult<()> {
        if deliveries.is_empty() {
            return Ok(());
        }
        let action = "queueing deliveries";
        let mut tx = self.pool.begin().await.map_err(db(action))?;
        for d in deliveries {
            sqlx::query(
                "INSERT INTO webhook_deliveries (webhook_id, event, payload, created_at, due_ms) \
                 VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(d.webhook_id)
            .bind(&d.event)
            .bind(&d.payload)
            .bind(d.created_at.instant())
            .bind(d.due_ms)
            .execute(&mut *tx)
            .await
            .map_err(db(action))?;
        }
        tx.commit().await.map_err(db(action))
    }

    async fn due_deliveries(&self, now_ms: i64, limit: u32) -> StoreResult<Vec<DueDelivery>> {
        let rows: Vec<(i64, i64, String, String, String, String, i64)> = sqlx::query_as(
            "SELECT d.id, d.webhook_id, w.url, w.secret, d.event, d.payload, d.attempts \
             FROM webhook_deliveries d JOIN webhooks w ON w.id = d.webhook_id \
             WHERE d.status = 'pending' AND d.due_ms <= $1 AND w.removed_at IS NULL \
             ORDER BY d.due_ms, d.id LIMIT $2",
        )
        .bind(now_ms)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(db("finding due deliveries"))?;
        Ok(rows
            .into_iter()
            .map(
                |(id, webhook_id, url, secret, event, payload, attempts)| DueDelivery {
                    id,
                    webhook_id,
                    url,
                    secret,
                    event,
                    payload,
                    attempts: attempts.max(0) as u32,
                },
            )
            .collect())
    }

    async fn record_attempt(&self, id: i64, a: &Attempt<'_>) -> StoreResult<()> {
        let status = match (a.error, a.retry_at_ms) {
            (None, _) => "delivered",
            (Some(_), Some(_)) => "pending",
            (Some(_), None) => "failed",
        };
        sqlx::query(
            "UPDATE webhook_deliveries SET status = $1, attempts = attempts + 1, due_ms = $2, \
             delivered_at = CASE WHEN $1 = 'delivered' THEN $3 ELSE delivered_at END, \
             last_status = $4, last_error_kind = $5, last_error_message = $6 WHERE id = $7",
        )
        .bind(status)
        .bind(a.retry_at_ms)
        .bind(a.at.instant())
        .bind(a.status.map(i64::from))
        .bind(a.error.map(|e| e.kind.as_str()))
        .bind(a.error.map(|e| e.message.as_str()))
        .bind(id)
        .execute(&self.pool)
        .await
        .map_err(db("recording a delivery attempt"))?;
        Ok(())
    }

    async fn prune_deliveries(&self, keep: u32) -> StoreResult<u64> {
        let done = sqlx::query(
            "DELETE FROM webhook_deliveries d WHERE d.status <> 'pending' AND d.id NOT IN ( \
               SELECT newer.id FROM webhook_deliveries newer \
               WHERE newer.webhook_id = d.webhook_id AND newer.status <> 'pending' \
               ORDER BY newer.id DESC LIMIT $1)",
        )
        .bind(i64::from(keep))
        .execute(&self.pool)
        .await
        .map_err(db("pruning the delivery log"))?;
        Ok(done.rows_affected())
    }

    async fn deliveries(
        &self,
        webhook_id: i64,
        before: Option<i64>,
        limit: u32,
    ) -> StoreResult<Vec<DeliveryView>> {
        sqlx::query(
            "SELECT id, webhook_id, event, status, attempts, created_at, due_ms, delivered_at, \
                    last_status, last_error_kind, last_error_message \
             FROM webhook_deliveries WHERE webhook_id = $1 AND ($2::bigint IS NULL OR id < $2) \
             ORDER BY id DESC LIMIT $3",
        )
        .bind(webhook_id)
        .bind(before)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(db("listing deliveries"))?
        .into_iter()
        .map(delivery_from_row)
        .collect()
    }

    async fn try_lease(
        &self,
        name: &str,
        holder: &str,
        now_ms: i64,
        ttl_ms: i64,
    ) -> StoreResult<bool> {
        // One statement: two replicas racing for a free lease meet at the
        // row (the insert's conflict waits for the other's), and only one
        // of them inserts or updates it.
        let result = sqlx::query(
            "INSERT INTO leases (name, holder, expires_ms) VALUES ($1, $2, $3 + $4) \
             ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires_ms = excluded.expires_ms \
             WHERE leases.holder = excluded.holder OR leases.expires_ms <= $3",
        )
        .bind(name)
        .bind(holder)
        .bind(now_ms)
        .bind(ttl_ms)
        .execute(&self.pool)
        .await
        .map_err(db("taking the scheduler lease"))?;
        Ok(result.rows_affected() == 1)
    }

    async fn release_lease(&self, name: &str, holder: &str) -> StoreResult<()> {
        sqlx::query("DELETE FROM leases WHERE name = $1 AND holder = $2")
            .bind(name)
            .bind(holder)
            .execute(&self.pool)
            .await
            .map_err(db("giving up the scheduler lease"))?;
        Ok(())
    }

    async fn use_api_token(&self, id: i64) -> StoreResult<bool> {
        Ok(sqlx::query("UPDATE api_tokens SET uses = uses + 1 WHERE id = $1 AND (max_uses IS NULL OR uses < max_uses)")
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(db("counting a use of an enrollment token"))?
            .rows_affected()
            > 0)
    }

    async fn request_enrollment(
        &self,
        r: &NewEnrollmentRequest<'_>,
    ) -> StoreResult<EnrollmentRecord> {
        // One statement, so two connections of the same device (or two
        // replicas) cannot make two requests for one key.
        sqlx::query(
            "INSERT INTO enrollment_requests \
             (public_key, key_fingerprint, device_type, hardware_id, requested_at, state) \
             VALUES ($1, $2, $3, $4, $5, 'pending') ON CONFLICT (public_key) DO NOTHING",
        )
        .bind(r.public_key)
        .bind(r.key_fingerprint)
        .bind(r.device_type.as_str())
        .bind(r.hardware_id.as_str())
        .bind(r.requested_at.instant())
        .execute(&self.pool)
        .await
        .map_err(db("storing an enrollment request"))?;
        self.enrollment_request_by_key(r.public_key).await?.ok_or(
            crate::store::StoreError::Corrupt {
                what: "enrollment request",
                detail: "stored, then not found by its key".to_owned(),
            },
        )
    }

    async fn enrollment_request(&self, id: i64) -> StoreResult<Option<EnrollmentRecord>> {
        sqlx::query(&format!(
            "SELECT {ENROLLMENT_COLUMNS} FROM enrollment_requests WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(db("looking up an enrollment request"))?
        .map(enrollment_from_row)
        .transpose()
    }

    async fn enrollment_request_by_key(
        &self,
        public_key: &str,
    ) -> StoreResult<Option<EnrollmentRecord>> {
        sqlx::query(&format!(
            "SELECT {ENROLLMENT_COLUMNS} FROM enrollment_requests WHERE public_key = $1"
        ))
        .bind(public_key)
        .fetch_optional(&self.pool)
        .await
        .map_err(db("looking up an enrollment request"))?
        .map(enrollment_from_row)
        .transpose()
    }

    async fn enrollment_requests(
        &self,
        state: Option<EnrollmentState>,
    ) -> StoreResult<Vec<EnrollmentRecord>> {
        sqlx::query(&format!(
            "SELECT {ENROLLMENT_COLUMNS} FROM enrollment_requests \
             WHERE ($1::text IS NULL OR state = $1) ORDER BY id"
        ))
        .bind(state.map(EnrollmentState::as_str))
        .fetch_all(&self.pool)
        .await
        .map_err(db("listing enrollment requests"))?
        .into_iter()
        .map(enrollment_from_row)
        .collect()
    }

    async fn decide_enrollment(
        &self,
        id: i64,
        decision: &EnrollmentDecision<'_>,
        by: &str,
        now: Timestamp,
    ) -> StoreResult<Option<(EnrollmentRecord, bool)>> {
        let (state, reason, device_id) = match decision {
            EnrollmentDecision::Accept { device_id } => {
                (EnrollmentState::Accepted, None, Some(device_id.as_str()))
            }
            EnrollmentDecision::Reject { reason } => (EnrollmentState::Rejected, *reason, None),
        };
        // The states are the code's own names, not input.
        let from: Vec<String> = decision
            .applies_to()
            .iter()
            .map(|s| format!("'{}'", s.as_str()))
            .collect();
        let changed = sqlx::query(&format!(
            "UPDATE enrollment_requests SET state = $1, decided_at = $2, decided_by = $3, \
             reason = $4, device_id = $5 WHERE id = $6 AND state IN ({})",
            from.join(", ")
        ))
        .bind(state.as_str())
        .bind(now.instant())
        .bind(by)
        .bind(reason)
        .bind(device_id)
        .bind(id)
        .execute(&self.pool)
        .await
        .map_err(db("deciding an enrollment request"))?
        .rows_affected()
            > 0;
        Ok(self
            .enrollment_request(id)
            .await?
            .map(|record| (record, changed)))
    }
}
