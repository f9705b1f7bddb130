//! PostgreSQL implementation of [`RootStore`], as the SQLite store keeps roots.

use super::{db, PgStore};
use crate::store::roots::{version_taken, RootRecord, RootStore};
use crate::store::{StoreResult, Timestamp};
use async_trait::async_trait;
use sqlx::postgres::PgRow;
use sqlx::Row;
use time::OffsetDateTime;

fn root_from_row(row: PgRow) -> StoreResult<RootRecord> {
    let version: i64 = row.try_get(0).map_err(db("reading a root"))?;
    let published_at: OffsetDateTime = row.try_get(2).map_err(db("reading a root"))?;
    Ok(RootRecord {
        version: version as u64,
        signed_json: row.try_get(1).map_err(db("reading a root"))?,
        published_at: Timestamp::from(published_at),
        published_by: row.try_get(3).map_err(db("reading a root"))?,
    })
}

#[async_trait]
impl RootStore for PgStore {
    async fn insert_root(&self, root: &RootRecord) -> StoreResult<()> {
        let result = sqlx::query(
            "INSERT INTO roots (version, signed_json, published_at, published_by) \
             VALUES ($1, $2, $3, $4)",
        )
        .bind(root.version as i64)
        .bind(&root.signed_json)
        .bind(root.published_at.instant())
        .bind(&root.published_by)
        .execute(&self.pool)
        .await;
        match result {
            Ok(_) => Ok(()),
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                Err(version_taken(root.version))
            }
            Err(e) => Err(db("storing a root")(e)),
        }
    }

    async fn roots_after(&self, after: u64, limit: u32) -> StoreResult<Vec<RootRecord>> {
        sqlx::query(
            "SELECT version, signed_json, published_at, published_by FROM roots \
             WHERE version > $1 ORDER BY version LIMIT $2",
        )
        .bind(after.min(i64::MAX as u64) as i64)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(db("listing roots"))?
        .into_iter()
        .map(root_from_row)
        .collect()
    }

    async fn latest_root(&self) -> StoreResult<Option<RootRecord>> {
        sqlx::query(
            "SELECT version, signed_json, published_at, published_by FROM roots \
             ORDER BY version DESC LIMIT 1",
        )
        .fetch_optional(&self.pool)
        .await
        .map_err(db("reading the newest root"))?
        .map(root_from_row)
        .transpose()
    }
}
