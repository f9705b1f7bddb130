//! SQLite implementation of [`ControlStore`]: API tokens, the audit log
//! and leases.

use super::{db, parse, SqliteStore};
use crate::store::control::{ControlStore, NewApiToken, NewAuditEntry};
use crate::store::StoreResult;
use async_trait::async_trait;
use sqlx::sqlite::SqliteRow;
use sqlx::Row;
use uplift_proto::auth::{AuditEntry, AuditQuery, TokenView};
use uplift_proto::{ErrorKind, WireError};

pub(super) const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS api_tokens (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    name          TEXT NOT NULL,
    role          TEXT NOT NULL,
    secret_sha256 TEXT NOT NULL UNIQUE,
    created_at    TEXT NOT NULL,
    created_by    TEXT NOT NULL,
    expires_at    TEXT,
    revoked_at    TEXT
);
CREATE TABLE IF NOT EXISTS audit_log (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    at            TEXT NOT NULL,
    actor         TEXT NOT NULL,
    token_id      INTEGER,
    role          TEXT NOT NULL,
    action        TEXT NOT NULL,
    target        TEXT NOT NULL,
    error_kind    TEXT,
    error_message TEXT
);
CREATE INDEX IF NOT EXISTS audit_log_by_action ON audit_log (action, id);
CREATE INDEX IF NOT EXISTS audit_log_by_actor ON audit_log (actor, id);
CREATE INDEX IF NOT EXISTS audit_log_by_target ON audit_log (target, id);
CREATE TRIGGER IF NOT EXISTS audit_log_append_only_update BEFORE UPDATE ON audit_log
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_log_append_only_delete BEFORE DELETE ON audit_log
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TABLE IF NOT EXISTS leases (
    name       TEXT PRIMARY KEY,
    holder     TEXT NOT NULL,
    expires_ms INTEGER NOT NULL
);
"#;

const TOKEN_COLUMNS: &str = "id, name, role, created_at, created_by, expires_at, revoked_at";

fn token_from_row(row: SqliteRow) -> StoreResult<TokenView> {
    let text = |i: usize| {
        row.try_get::<String, _>(i)
            .map_err(db("reading an API token"))
    };
    let opt_text = |i: usize| {
        row.try_get::<Option<String>, _>(i)
            .map_err(db("reading an API token"))
    };
    Ok(TokenView {
        id: row.try_get(0).map_err(db("reading an API token"))?,
        name: parse("token name", text(1)?)?,
        role: parse("token role", text(2)?)?,
        created_at: text(3)?,
        created_by: text(4)?,
        expires_at: opt_text(5)?,
        revoked_at: opt_text(6)?,
    })
}

const AUDIT_COLUMNS: &str =
    "id, at, actor, token_id, role, action, target, error_kind, error_message";

fn audit_from_row(row: SqliteRow) -> StoreResult<AuditEntry> {
    let get = |i: usize| {
        row.try_get::<Option<String>, _>(i)
            .map_err(db("reading the audit log"))
    };
    let text = |i: usize| {
        row.try_get::<String, _>(i)
            .map_err(db("reading the audit log"))
    };
    let error = match (get(7)?, get(8)?) {
        (Some(kind), message) => Some(WireError {
            kind: serde_json::from_value::<ErrorKind>(serde_json::Value::String(kind))
                .unwrap_or(ErrorKind::Unknown),
            message: message.unwrap_or_default(),
        }),
        (None, _) => None,
    };
    Ok(AuditEntry {
        id: row.try_get(0).map_err(db("reading the audit log"))?,
        at: text(1)?,
        actor: text(2)?,
        token_id: row.try_get(3).map_err(db("reading the audit log"))?,
        role: parse("audit role", text(4)?)?,
        action: parse("audit action", text(5)?)?,
        target: text(6)?,
        error,
    })
}

#[async_trait]
impl ControlStore for SqliteStore {
    async fn insert_api_token(&self, t: &NewApiToken<'_>) -> StoreResult<TokenView> {
        let row = sqlx::query(&format!(
            "INSERT INTO api_tokens (name, role, secret_sha256, created_at, created_by, expires_at) \
             VALUES (?, ?, ?, ?, ?, ?) RETURNING {TOKEN_COLUMNS}"
        ))
        .bind(t.name.as_str())
        .bind(t.role.as_str())
        .bind(t.secret_sha256)
        .bind(t.created_at)
        .bind(t.created_by)
        .bind(t.expires_at)
        .fetch_one(&self.pool)
        .await
        .map_err(db("storing an API token"))?;
        token_from_row(row)
    }

    async fn api_token_by_digest(&self, secret_sha256: &str) -> StoreResult<Option<TokenView>> {
        sqlx::query(&format!(
            "SELECT {TOKEN_COLUMNS} FROM api_tokens WHERE secret_sha256 = ?"
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

    async fn revoke_api_token(&self, id: i64, now: &str) -> StoreResult<Option<TokenView>> {
        sqlx::query("UPDATE api_tokens SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL")
            .bind(now)
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(db("revoking an API token"))?;
        sqlx::query(&format!(
            "SELECT {TOKEN_COLUMNS} FROM api_tokens WHERE id = ?"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(db("reading an API token"))?
        .map(token_from_row)
        .transpose()
    }

    async fn append_audit(&self, e: &NewAuditEntry<'_>) -> StoreResult<i64> {
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO audit_log (at, actor, token_id, role, action, target, error_kind, error_message) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
        )
        .bind(e.at)
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
        // Each filter is either bound or a no-op; one statement, indexes used
        // by SQLite's OR-optimisation where a filter is given.
        sqlx::query(&format!(
            "SELECT {AUDIT_COLUMNS} FROM audit_log \
             WHERE (?1 IS NULL OR actor = ?1) AND (?2 IS NULL OR action = ?2) \
               AND (?3 IS NULL OR target = ?3) AND (?4 IS NULL OR id < ?4) \
             ORDER BY id DESC LIMIT ?5"
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

    async fn try_lease(
        &self,
        name: &str,
        holder: &str,
        now_ms: i64,
        ttl_ms: i64,
    ) -> StoreResult<bool> {
        // One statement, so two replicas racing for a free lease cannot both
        // win: the row's conflict clause decides under SQLite's write lock.
        let result = sqlx::query(
            "INSERT INTO leases (name, holder, expires_ms) VALUES (?1, ?2, ?3 + ?4) \
             ON CONFLICT(name) DO UPDATE SET holder = excluded.holder, expires_ms = excluded.expires_ms \
             WHERE leases.holder = excluded.holder OR leases.expires_ms <= ?3",
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
        sqlx::query("DELETE FROM leases WHERE name = ? AND holder = ?")
            .bind(name)
            .bind(holder)
            .execute(&self.pool)
            .await
            .map_err(db("giving up the scheduler lease"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uplift_proto::auth::{AuditAction, Role};

    async fn store(dir: &tempfile::TempDir) -> SqliteStore {
        SqliteStore::open(&dir.path().join("uplift.db"))
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn a_lease_has_one_holder_until_it_expires_or_is_released() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir).await;
        assert!(store.try_lease("scheduler", "a", 1_000, 500).await.unwrap());
        assert!(!store.try_lease("scheduler", "b", 1_200, 500).await.unwrap());
        // Renewing moves the expiry on: b still cannot take it at 1 600.
        assert!(store.try_lease("scheduler", "a", 1_400, 500).await.unwrap());
        assert!(!store.try_lease("scheduler", "b", 1_600, 500).await.unwrap());
        // a stopped renewing (a killed replica): b takes over at expiry.
        assert!(store.try_lease("scheduler", "b", 1_900, 500).await.unwrap());
        assert!(!store.try_lease("scheduler", "a", 2_000, 500).await.unwrap());
        store.release_lease("scheduler", "a").await.unwrap();
        assert!(!store.try_lease("scheduler", "a", 2_000, 500).await.unwrap());
        store.release_lease("scheduler", "b").await.unwrap();
        assert!(store.try_lease("scheduler", "a", 2_000, 500).await.unwrap());
    }

    #[tokio::test]
    async fn the_audit_log_refuses_changes_and_deletions() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir).await;
        let entry = NewAuditEntry {
            at: "2026-12-05T10:00:00Z",
            actor: "bootstrap-admin",
            token_id: None,
            role: Role::Admin,
            action: AuditAction::RolloutStart,
            target: "rollout 1",
            error: None,
        };
        store.append_audit(&entry).await.unwrap();
        for statement in [
            "UPDATE audit_log SET actor = 'someone else'",
            "DELETE FROM audit_log",
        ] {
            let refused = sqlx::query(statement).execute(&store.pool).await;
            let message = refused.unwrap_err().to_string();
            assert!(message.contains("append-only"), "{statement}: {message}");
        }
        let entries = store
            .audit_entries(&AuditQuery::default(), 10)
            .await
            .unwrap();
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].actor, "bootstrap-admin");
    }

    #[tokio::test]
    async fn audit_filters_and_pages_newest_first() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir).await;
        let refused = WireError::new(ErrorKind::Conflict, "no");
        for (i, action) in [
            AuditAction::RolloutStart,
            AuditAction::RolloutPause,
            AuditAction::RolloutStart,
            AuditAction::TokenCreate,
        ]
        .into_iter()
        .enumerate()
        {
            let target = format!("rollout {}", i % 2);
            store
                .append_audit(&NewAuditEntry {
                    at: "2026-12-05T10:00:00Z",
                    actor: if i == 3 {
                        "token 1 (ci)"
                    } else {
                        "bootstrap-admin"
                    },
                    token_id: None,
                    role: Role::Admin,
                    action,
                    target: &target,
                    error: (i == 2).then_some(&refused),
                })
                .await
                .unwrap();
        }
        let all = store
            .audit_entries(&AuditQuery::default(), 10)
            .await
            .unwrap();
        let ids: Vec<i64> = all.iter().map(|e| e.id).collect();
        assert_eq!(ids, vec![4, 3, 2, 1]);
        assert_eq!(
            all[1].error.as_ref().map(|e| e.kind),
            Some(ErrorKind::Conflict)
        );
        let starts = AuditQuery {
            action: Some(AuditAction::RolloutStart),
            ..AuditQuery::default()
        };
        let ids: Vec<i64> = store
            .audit_entries(&starts, 10)
            .await
            .unwrap()
            .iter()
            .map(|e| e.id)
            .collect();
        assert_eq!(ids, vec![3, 1]);
        let older = AuditQuery {
            before: Some(3),
            target: Some("rollout 1".into()),
            ..AuditQuery::default()
        };
        let ids: Vec<i64> = store
            .audit_entries(&older, 10)
            .await
            .unwrap()
            .iter()
            .map(|e| e.id)
            .collect();
        assert_eq!(ids, vec![2]);
        let by_actor = AuditQuery {
            actor: Some("token 1 (ci)".into()),
            ..AuditQuery::default()
        };
        assert_eq!(store.audit_entries(&by_actor, 10).await.unwrap().len(), 1);
        assert_eq!(
            store
                .audit_entries(&AuditQuery::default(), 2)
                .await
                .unwrap()
                .len(),
            2
        );
    }
}
