//! SQLite implementation of [`Store`]: embedded, zero set-up, WAL mode.

mod control;

use super::*;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{Row, SqlitePool};
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
}

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS releases (
    version       TEXT PRIMARY KEY,
    device_type   TEXT NOT NULL,
    manifest      BLOB NOT NULL,
    image_size    INTEGER NOT NULL,
    image_sha256  TEXT NOT NULL,
    chunks        INTEGER NOT NULL,
    stored_bytes  INTEGER NOT NULL,
    created_at    TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS rollouts (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    release         TEXT NOT NULL REFERENCES releases(version),
    allow_downgrade INTEGER NOT NULL,
    created_at      TEXT NOT NULL,
    max_bytes_per_sec INTEGER,
    max_downloading   INTEGER,
    policy          TEXT,
    state           TEXT,
    state_name      TEXT,
    revision        INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS devices (
    id               TEXT PRIMARY KEY,
    device_type      TEXT NOT NULL,
    hardware_id      TEXT NOT NULL,
    public_key       TEXT NOT NULL UNIQUE,
    enrolled_at      TEXT NOT NULL,
    last_seen        TEXT,
    running_version  TEXT,
    state            TEXT,
    booted_slot      TEXT,
    reported_target  TEXT,
    progress_done    INTEGER,
    progress_total   INTEGER,
    progress_fetched INTEGER,
    error_kind       TEXT,
    error_message    TEXT,
    target_rollout   INTEGER REFERENCES rollouts(id)
);
CREATE TABLE IF NOT EXISTS rollout_devices (
    rollout_id INTEGER NOT NULL REFERENCES rollouts(id),
    device_id  TEXT NOT NULL REFERENCES devices(id),
    phase      INTEGER NOT NULL DEFAULT 0,
    offered_at TEXT,
    outcome    TEXT,
    error      TEXT,
    failure_accepted INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (rollout_id, device_id)
);
CREATE INDEX IF NOT EXISTS rollout_devices_by_device ON rollout_devices (device_id, rollout_id);
"#;

/// Columns added after the first release of the schema, added in place to
/// databases made before them (`CREATE TABLE IF NOT EXISTS` keeps old tables).
const ADDED_COLUMNS: &[(&str, &str, &str)] = &[
    ("rollouts", "max_bytes_per_sec", "INTEGER"),
    ("rollouts", "max_downloading", "INTEGER"),
    // Phased rollouts: the engine's policy and state (JSON), NULL for
    // rollouts made before them (every device offered at once).
    ("rollouts", "policy", "TEXT"),
    ("rollouts", "state", "TEXT"),
    ("rollouts", "state_name", "TEXT"),
    ("rollouts", "revision", "INTEGER NOT NULL DEFAULT 0"),
    ("rollout_devices", "phase", "INTEGER NOT NULL DEFAULT 0"),
    ("rollout_devices", "offered_at", "TEXT"),
    ("rollout_devices", "outcome", "TEXT"),
    ("rollout_devices", "error", "TEXT"),
    (
        "rollout_devices",
        "failure_accepted",
        "INTEGER NOT NULL DEFAULT 0",
    ),
];

fn db(action: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
    super::classify(action)
}

fn corrupt(what: &'static str) -> impl FnOnce(String) -> StoreError {
    move |detail| StoreError::Corrupt { what, detail }
}

impl SqliteStore {
    pub async fn open(path: &Path) -> StoreResult<Self> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // NORMAL in WAL mode is durable across process crashes; only an OS
            // crash can lose the last transactions, never corrupt the file.
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        // Readers (the API, authentication) run beside the one writer in WAL
        // mode; device reports reach the database in batches (crate::writer).
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .connect_with(options)
            .await
            .map_err(db("opening the database"))?;
        sqlx::raw_sql(SCHEMA)
            .execute(&pool)
            .await
            .map_err(db("creating the schema"))?;
        sqlx::raw_sql(control::SCHEMA)
            .execute(&pool)
            .await
            .map_err(db("creating the schema"))?;
        for (table, column, kind) in ADDED_COLUMNS {
            let present: i64 = sqlx::query_scalar(&format!(
                "SELECT COUNT(*) FROM pragma_table_info('{table}') WHERE name = ?"
            ))
            .bind(column)
            .fetch_one(&pool)
            .await
            .map_err(db("upgrading the schema"))?;
            if present == 0 {
                sqlx::raw_sql(&format!("ALTER TABLE {table} ADD COLUMN {column} {kind}"))
                    .execute(&pool)
                    .await
                    .map_err(db("upgrading the schema"))?;
            }
        }
        Ok(Self { pool })
    }
}

const DEVICE_COLUMNS: &str = "d.id, d.device_type, d.hardware_id, d.public_key, d.enrolled_at, d.last_seen, \
     d.running_version, d.state, d.booted_slot, d.reported_target, d.progress_done, d.progress_total, \
     d.progress_fetched, d.error_kind, d.error_message, d.target_rollout";

/// A rollout's devices as its view counts them, where the device's target
/// rollout says whose it is: a device still waiting for its phase is this
/// rollout's (though not yet pointed at it), and one a newer rollout took
/// over is no longer, even before the newer one offers it anything.
const MEMBER_DEVICE_COLUMNS: &str = "d.id, d.device_type, d.hardware_id, d.public_key, d.enrolled_at, d.last_seen, \
     d.running_version, d.state, d.booted_slot, d.reported_target, d.progress_done, d.progress_total, \
     d.progress_fetched, d.error_kind, d.error_message, \
     CASE WHEN rd.outcome = 'superseded' THEN NULL \
          WHEN r.state IS NOT NULL AND rd.offered_at IS NULL AND rd.outcome IS NULL THEN rd.rollout_id \
          ELSE d.target_rollout END";

fn parse<T: FromStr>(what: &'static str, s: String) -> StoreResult<T>
where
    T::Err: std::fmt::Display,
{
    s.parse::<T>().map_err(|e| StoreError::Corrupt {
        what,
        detail: e.to_string(),
    })
}

fn parse_opt<T: FromStr>(what: &'static str, s: Option<String>) -> StoreResult<Option<T>>
where
    T::Err: std::fmt::Display,
{
    s.map(|s| parse(what, s)).transpose()
}

fn parse_json<T: serde::de::DeserializeOwned>(
    what: &'static str,
    s: Option<String>,
) -> StoreResult<Option<T>> {
    s.map(|s| {
        serde_json::from_value(serde_json::Value::String(s))
            .map_err(|e| corrupt(what)(e.to_string()))
    })
    .transpose()
}

fn device_from_row(row: SqliteRow) -> StoreResult<DeviceRecord> {
    let get_opt_i64 = |i: usize| {
        row.try_get::<Option<i64>, _>(i)
            .map_err(db("reading a device"))
    };
    let progress = match (get_opt_i64(10)?, get_opt_i64(11)?, get_opt_i64(12)?) {
        (Some(done), Some(total), Some(fetched)) => Some(Progress {
            done_bytes: done as u64,
            total_bytes: total as u64,
            fetched_bytes: fetched as u64,
        }),
        _ => None,
    };
    let error_kind: Option<String> = row.try_get(13).map_err(db("reading a device"))?;
    let error_message: Option<String> = row.try_get(14).map_err(db("reading a device"))?;
    let last_error = match (
        parse_json::<ErrorKind>("error kind", error_kind)?,
        error_message,
    ) {
        (Some(kind), Some(message)) => Some(WireError { kind, message }),
        _ => None,
    };
    let text = |i: usize| row.try_get::<String, _>(i).map_err(db("reading a device"));
    let opt_text = |i: usize| {
        row.try_get::<Option<String>, _>(i)
            .map_err(db("reading a device"))
    };
    Ok(DeviceRecord {
        id: parse("device id", text(0)?)?,
        device_type: parse("device type", text(1)?)?,
        hardware_id: parse("hardware id", text(2)?)?,
        public_key: text(3)?,
        enrolled_at: text(4)?,
        last_seen: opt_text(5)?,
        running_version: parse_opt("version", opt_text(6)?)?,
        state: parse_json("agent state", opt_text(7)?)?,
        booted_slot: parse_opt("slot", opt_text(8)?)?,
        reported_target: parse_opt("version", opt_text(9)?)?,
        progress,
        last_error,
        target_rollout: get_opt_i64(15)?,
    })
}

fn release_from_row(row: SqliteRow) -> StoreResult<ReleaseRecord> {
    let r = |e| StoreError::Database {
        action: "reading a release",
        source: e,
    };
    Ok(ReleaseRecord {
        version: parse("version", row.try_get(0).map_err(r)?)?,
        device_type: parse("device type", row.try_get(1).map_err(r)?)?,
        manifest_json: row.try_get(2).map_err(r)?,
        image_size: row.try_get::<i64, _>(3).map_err(r)? as u64,
        image_sha256: row.try_get(4).map_err(r)?,
        chunks: row.try_get::<i64, _>(5).map_err(r)? as u64,
        stored_bytes: row.try_get::<i64, _>(6).map_err(r)? as u64,
        created_at: row.try_get(7).map_err(r)?,
    })
}

fn rollout_from_row(row: SqliteRow) -> StoreResult<RolloutRecord> {
    let r = |e| StoreError::Database {
        action: "reading a rollout",
        source: e,
    };
    Ok(RolloutRecord {
        id: row.try_get(0).map_err(r)?,
        release: parse("version", row.try_get(1).map_err(r)?)?,
        allow_downgrade: row.try_get::<i64, _>(2).map_err(r)? != 0,
        created_at: row.try_get(3).map_err(r)?,
        device_type: parse("device type", row.try_get(4).map_err(r)?)?,
        limits: limits_from(row.try_get(5).map_err(r)?, row.try_get(6).map_err(r)?),
    })
}

/// Limits as stored; a zero or negative value (written by hand) means none.
fn limits_from(max_bytes_per_sec: Option<i64>, max_downloading: Option<i64>) -> DownloadLimits {
    DownloadLimits {
        max_bytes_per_sec: max_bytes_per_sec
            .and_then(|n| u64::try_from(n).ok())
            .and_then(std::num::NonZeroU64::new),
        max_downloading: max_downloading
            .and_then(|n| u32::try_from(n).ok())
            .and_then(std::num::NonZeroU32::new),
    }
}

fn limits_columns(limits: &DownloadLimits) -> (Option<i64>, Option<i64>) {
    (
        limits
            .max_bytes_per_sec
            .map(|n| n.get().min(i64::MAX as u64) as i64),
        limits.max_downloading.map(|n| i64::from(n.get())),
    )
}

const RELEASE_COLUMNS: &str =
    "version, device_type, manifest, image_size, image_sha256, chunks, stored_bytes, created_at";
const ROLLOUT_SELECT: &str =
    "SELECT r.id, r.release, r.allow_downgrade, r.created_at, rel.device_type, \
     r.max_bytes_per_sec, r.max_downloading FROM rollouts r JOIN releases rel ON rel.version = r.release";

/// A rollout's plan from its row; `None` for a rollout without one.
fn plan_from_row(
    (id, policy, state, revision): (i64, Option<String>, Option<String>, i64),
) -> Option<StoreResult<(i64, RolloutPlan)>> {
    let (policy, state) = (policy?, state?);
    Some((|| {
        Ok((
            id,
            RolloutPlan {
                policy: serde_json::from_str(&policy)
                    .map_err(|e| corrupt("rollout policy")(e.to_string()))?,
                state: serde_json::from_str(&state)
                    .map_err(|e| corrupt("rollout state")(e.to_string()))?,
                revision,
            },
        ))
    })())
}

/// Whether a rollout with this stored policy (NULL before phased
/// rollouts) has a window that applies to the reboot.
fn holds_reboots(policy: Option<String>) -> StoreResult<bool> {
    let Some(text) = policy else {
        return Ok(false);
    };
    let policy: RolloutPolicy =
        serde_json::from_str(&text).map_err(|e| corrupt("rollout policy")(e.to_string()))?;
    Ok(policy.window_scope() == Some(uplift_proto::policy::WindowScope::Reboot))
}

/// A policy or state as stored: JSON, which cannot fail for these types.
fn json_text<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_else(|e| unreachable!("plain data serializes: {e}"))
}

fn enum_text<T: serde::Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(s)) => s,
        other => unreachable!("unit enums serialize as strings, got {other:?}"),
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn insert_device(&self, d: &NewDevice) -> StoreResult<()> {
        let result = sqlx::query(
            "INSERT INTO devices (id, device_type, hardware_id, public_key, enrolled_at) VALUES (?, ?, ?, ?, ?)",
        )
        .bind(d.id.as_str())
        .bind(d.device_type.as_str())
        .bind(d.hardware_id.as_str())
        .bind(&d.public_key)
        .bind(&d.enrolled_at)
        .execute(&self.pool)
        .await;
        match result {
            Ok(_) => Ok(()),
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                Err(StoreError::Conflict(format!(
                    "a device with this public key or ID ({}) is already enrolled",
                    d.id
                )))
            }
            Err(e) => Err(db("enrolling a device")(e)),
        }
    }

    async fn device(&self, id: &DeviceId) -> StoreResult<Option<DeviceRecord>> {
        sqlx::query(&format!(
            "SELECT {DEVICE_COLUMNS} FROM devices d WHERE d.id = ?"
        ))
        .bind(id.as_str())
        .fetch_optional(&self.pool)
        .await
        .map_err(db("looking up a device"))?
        .map(device_from_row)
        .transpose()
    }

    async fn device_by_public_key(&self, public_key: &str) -> StoreResult<Option<DeviceRecord>> {
        sqlx::query(&format!(
            "SELECT {DEVICE_COLUMNS} FROM devices d WHERE d.public_key = ?"
        ))
        .bind(public_key)
        .fetch_optional(&self.pool)
        .await
        .map_err(db("looking up a device by key"))?
        .map(device_from_row)
        .transpose()
    }

    async fn list_devices(&self) -> StoreResult<Vec<DeviceRecord>> {
        sqlx::query(&format!(
            "SELECT {DEVICE_COLUMNS} FROM devices d ORDER BY d.enrolled_at, d.id"
        ))
        .fetch_all(&self.pool)
        .await
        .map_err(db("listing devices"))?
        .into_iter()
        .map(device_from_row)
        .collect()
    }

    async fn devices_of_type(&self, device_type: &DeviceType) -> StoreResult<Vec<DeviceId>> {
        let rows: Vec<String> =
            sqlx::query_scalar("SELECT id FROM devices WHERE device_type = ? ORDER BY id")
                .bind(device_type.as_str())
                .fetch_all(&self.pool)
                .await
                .map_err(db("listing devices of a type"))?;
        rows.into_iter().map(|s| parse("device id", s)).collect()
    }

    async fn count_devices(&self) -> StoreResult<u64> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM devices")
            .fetch_one(&self.pool)
            .await
            .map_err(db("counting devices"))?;
        Ok(n as u64)
    }

    async fn device_census(&self) -> StoreResult<Vec<DeviceCensus>> {
        let rows: Vec<(Option<String>, Option<String>, Option<String>, i64)> = sqlx::query_as(
            "SELECT state, running_version, error_kind, COUNT(*) FROM devices \
             GROUP BY state, running_version, error_kind",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(db("counting devices by state"))?;
        Ok(rows
            .into_iter()
            .map(|(state, version, error_kind, n)| DeviceCensus {
                state,
                version,
                error_kind,
                devices: n.max(0) as u64,
            })
            .collect())
    }

    async fn record_reports(&self, states: &[ReportedState]) -> StoreResult<u64> {
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(db("recording device reports"))?;
        let mut written = 0;
        for s in states {
            let result = match &s.report {
                Some(report) => {
                    let (done, total, fetched) = match report.progress {
                        Some(p) => (
                            Some(p.done_bytes as i64),
                            Some(p.total_bytes as i64),
                            Some(p.fetched_bytes as i64),
                        ),
                        None => (None, None, None),
                    };
                    sqlx::query(
                        "UPDATE devices SET last_seen = COALESCE(?, last_seen), running_version = ?, state = ?, \
                         booted_slot = ?, reported_target = ?, progress_done = ?, progress_total = ?, \
                         progress_fetched = ?, error_kind = ?, error_message = ? WHERE id = ?",
                    )
                    .bind(s.last_seen.as_deref())
                    .bind(report.running_version.as_str())
                    .bind(enum_text(&report.state))
                    .bind(report.booted_slot.as_str())
                    .bind(report.target_version.as_ref().map(|v| v.as_str()))
                    .bind(done)
                    .bind(total)
                    .bind(fetched)
                    .bind(report.error.as_ref().map(|e| enum_text(&e.kind)))
                    .bind(report.error.as_ref().map(|e| e.message.as_str()))
                    .bind(s.id.as_str())
                    .execute(&mut *tx)
                    .await
                }
                None => {
                    sqlx::query(
                        "UPDATE devices SET last_seen = COALESCE(?, last_seen) WHERE id = ?",
                    )
                    .bind(s.last_seen.as_deref())
                    .bind(s.id.as_str())
                    .execute(&mut *tx)
                    .await
                }
            };
            written += result
                .map_err(db("recording device reports"))?
                .rows_affected();
        }
        tx.commit().await.map_err(db("recording device reports"))?;
        Ok(written)
    }

    async fn device_targets(&self) -> StoreResult<Vec<(DeviceId, DeviceTarget)>> {
        let rows = sqlx::query(
            "SELECT d.id, r.id, r.release, r.allow_downgrade, r.max_bytes_per_sec, r.max_downloading, \
             r.policy FROM devices d JOIN rollouts r ON r.id = d.target_rollout",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(db("reading device targets"))?;
        let r = |e| StoreError::Database {
            action: "reading device targets",
            source: e,
        };
        rows.into_iter()
            .map(|row| {
                Ok((
                    parse("device id", row.try_get(0).map_err(r)?)?,
                    DeviceTarget {
                        rollout_id: row.try_get(1).map_err(r)?,
                        version: parse("version", row.try_get(2).map_err(r)?)?,
                        allow_downgrade: row.try_get::<i64, _>(3).map_err(r)? != 0,
                        limits: limits_from(row.try_get(4).map_err(r)?, row.try_get(5).map_err(r)?),
                        // Held until the scheduler's first tick says go:
                        // a restart must not let devices reboot outside
                        // their window.
                        hold_reboot: holds_reboots(row.try_get(6).map_err(r)?)?,
                    },
                ))
            })
            .collect()
    }

    async fn insert_release(&self, rel: &ReleaseRecord) -> StoreResult<()> {
        let result = sqlx::query(&format!(
            "INSERT INTO releases ({RELEASE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
        ))
        .bind(rel.version.as_str())
        .bind(rel.device_type.as_str())
        .bind(&rel.manifest_json)
        .bind(rel.image_size as i64)
        .bind(&rel.image_sha256)
        .bind(rel.chunks as i64)
        .bind(rel.stored_bytes as i64)
        .bind(&rel.created_at)
        .execute(&self.pool)
        .await;
        match result {
            Ok(_) => Ok(()),
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                Err(StoreError::Conflict(format!(
                "release {} already exists; releases are immutable, publish a new version instead",
                rel.version
            )))
            }
            Err(e) => Err(db("storing a release")(e)),
        }
    }

    async fn release(&self, version: &Version) -> StoreResult<Option<ReleaseRecord>> {
        sqlx::query(&format!(
            "SELECT {RELEASE_COLUMNS} FROM releases WHERE version = ?"
        ))
        .bind(version.as_str())
        .fetch_optional(&self.pool)
        .await
        .map_err(db("looking up a release"))?
        .map(release_from_row)
        .transpose()
    }

    async fn list_releases(&self) -> StoreResult<Vec<ReleaseRecord>> {
        sqlx::query(&format!(
            "SELECT {RELEASE_COLUMNS} FROM releases ORDER BY created_at, version"
        ))
        .fetch_all(&self.pool)
        .await
        .map_err(db("listing releases"))?
        .into_iter()
        .map(release_from_row)
        .collect()
    }

    async fn create_rollout(
        &self,
        release: &ReleaseRecord,
        members: &[(DeviceId, u32)],
        allow_downgrade: bool,
        limits: DownloadLimits,
        plan: &NewPlan<'_>,
        now: &str,
    ) -> StoreResult<RolloutRecord> {
        let mut tx = self.pool.begin().await.map_err(db("starting a rollout"))?;
        let (max_bytes_per_sec, max_downloading) = limits_columns(&limits);
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO rollouts (release, allow_downgrade, created_at, max_bytes_per_sec, max_downloading, \
             policy, state, state_name, revision) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0) RETURNING id",
        )
        .bind(release.version.as_str())
        .bind(allow_downgrade as i64)
        .bind(now)
        .bind(max_bytes_per_sec)
        .bind(max_downloading)
        .bind(json_text(plan.policy))
        .bind(json_text(plan.state))
        .bind(plan.state.name())
        .fetch_one(&mut *tx)
        .await
        .map_err(db("starting a rollout"))?;
        for (device, phase) in members {
            let enrolled: Option<String> =
                sqlx::query_scalar("SELECT id FROM devices WHERE id = ?")
                    .bind(device.as_str())
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(db("targeting a device"))?;
            if enrolled.is_none() {
                return Err(StoreError::NotFound(format!(
                    "device {device} is not enrolled; check `uplift devices list`"
                )));
            }
            // A newer rollout of this device takes over from older ones.
            sqlx::query(
                "UPDATE rollout_devices SET outcome = 'superseded' \
                 WHERE device_id = ? AND rollout_id <> ? AND outcome IS NULL",
            )
            .bind(device.as_str())
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(db("superseding older rollouts"))?;
            sqlx::query(
                "INSERT INTO rollout_devices (rollout_id, device_id, phase) VALUES (?, ?, ?)",
            )
            .bind(id)
            .bind(device.as_str())
            .bind(i64::from(*phase))
            .execute(&mut *tx)
            .await
            .map_err(db("targeting a device"))?;
        }
        tx.commit().await.map_err(db("committing a rollout"))?;
        Ok(RolloutRecord {
            id,
            release: release.version.clone(),
            device_type: release.device_type.clone(),
            allow_downgrade,
            limits,
            created_at: now.to_owned(),
        })
    }

    async fn rollout_plan(&self, id: i64) -> StoreResult<Option<RolloutPlan>> {
        let row: Option<(i64, Option<String>, Option<String>, i64)> =
            sqlx::query_as("SELECT id, policy, state, revision FROM rollouts WHERE id = ?")
                .bind(id)
                .fetch_optional(&self.pool)
                .await
                .map_err(db("reading a rollout's state"))?;
        Ok(row
            .and_then(plan_from_row)
            .transpose()?
            .map(|(_, plan)| plan))
    }

    async fn add_rollout_member(
        &self,
        id: i64,
        device: &DeviceId,
        phase: u32,
    ) -> StoreResult<bool> {
        let action = "adding a device to a rollout";
        let mut tx = self.pool.begin().await.map_err(db(action))?;
        let added = sqlx::query(
            "INSERT OR IGNORE INTO rollout_devices (rollout_id, device_id, phase) VALUES (?, ?, ?)",
        )
        .bind(id)
        .bind(device.as_str())
        .bind(i64::from(phase))
        .execute(&mut *tx)
        .await
        .map_err(db(action))?
        .rows_affected()
            > 0;
        if added {
            sqlx::query(
                "UPDATE rollout_devices SET outcome = 'superseded' \
                 WHERE device_id = ? AND rollout_id < ? AND outcome IS NULL",
            )
            .bind(device.as_str())
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(db(action))?;
        }
        tx.commit().await.map_err(db(action))?;
        Ok(added)
    }

    async fn rollout_plans(&self) -> StoreResult<Vec<(i64, RolloutPlan)>> {
        let rows: Vec<(i64, Option<String>, Option<String>, i64)> = sqlx::query_as(
            "SELECT id, policy, state, revision FROM rollouts WHERE state IS NOT NULL ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(db("reading rollout states"))?;
        rows.into_iter().filter_map(plan_from_row).collect()
    }

    async fn phase_sizes(&self, only: Option<i64>) -> StoreResult<Vec<(i64, u32, u64)>> {
        let rows: Vec<(i64, i64, i64)> = sqlx::query_as(
            "SELECT rollout_id, phase, COUNT(*) FROM rollout_devices WHERE ?1 IS NULL OR rollout_id = ?1 \
             GROUP BY rollout_id, phase ORDER BY rollout_id, phase",
        )
        .bind(only)
        .fetch_all(&self.pool)
        .await
        .map_err(db("counting rollout phases"))?;
        Ok(rows
            .into_iter()
            .map(|(id, phase, n)| (id, phase.max(0) as u32, n.max(0) as u64))
            .collect())
    }

    async fn supersessions(&self, only: Option<i64>) -> StoreResult<Vec<(i64, i64, u64)>> {
        // A superseded part was ended by the device's next newer rollout.
        let rows: Vec<(i64, i64, i64)> = sqlx::query_as(
            "SELECT older, newer, COUNT(*) FROM ( \
               SELECT o.rollout_id AS older, \
                      (SELECT MIN(n.rollout_id) FROM rollout_devices n \
                        WHERE n.device_id = o.device_id AND n.rollout_id > o.rollout_id) AS newer \
               FROM rollout_devices o WHERE o.outcome = 'superseded') \
             WHERE newer IS NOT NULL AND (?1 IS NULL OR older = ?1 OR newer = ?1) \
             GROUP BY older, newer ORDER BY older, newer",
        )
        .bind(only)
        .fetch_all(&self.pool)
        .await
        .map_err(db("finding superseded rollouts"))?;
        Ok(rows
            .into_iter()
            .map(|(older, newer, n)| (older, newer, n.max(0) as u64))
            .collect())
    }

    async fn active_rollouts(&self) -> StoreResult<Vec<i64>> {
        sqlx::query_scalar(
            "SELECT id FROM rollouts WHERE state IS NOT NULL \
             AND state_name NOT IN ('finished', 'aborted') ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(db("listing active rollouts"))
    }

    async fn rollout_members(&self, id: i64) -> StoreResult<Vec<(MemberRecord, DeviceRecord)>> {
        let first = DEVICE_COLUMNS.matches(", ").count() + 1;
        let r = |e| StoreError::Database {
            action: "reading a rollout's devices",
            source: e,
        };
        sqlx::query(&format!(
            "SELECT {DEVICE_COLUMNS}, rd.phase, rd.offered_at, rd.outcome, rd.error, rd.failure_accepted \
             FROM rollout_devices rd JOIN devices d ON d.id = rd.device_id \
             WHERE rd.rollout_id = ? ORDER BY rd.phase, d.id"
        ))
        .bind(id)
        .fetch_all(&self.pool)
        .await
        .map_err(db("reading a rollout's devices"))?
        .into_iter()
        .map(|row| {
            let outcome: Option<String> = row.try_get(first + 2).map_err(r)?;
            let member = MemberRecord {
                phase: u32::try_from(row.try_get::<i64, _>(first).map_err(r)?)
                    .map_err(|e| corrupt("rollout phase")(e.to_string()))?,
                offered_at: row.try_get(first + 1).map_err(r)?,
                outcome: outcome
                    .map(|o| {
                        serde_json::from_value(serde_json::Value::String(o))
                            .map_err(|e| corrupt("rollout outcome")(e.to_string()))
                    })
                    .transpose()?,
                error: row.try_get(first + 3).map_err(r)?,
                failure_accepted: row.try_get::<i64, _>(first + 4).map_err(r)? != 0,
            };
            Ok((member, device_from_row(row)?))
        })
        .collect()
    }

    async fn apply_rollout_change(
        &self,
        id: i64,
        revision: i64,
        change: &RolloutChange<'_>,
    ) -> StoreResult<bool> {
        let action = "storing a rollout step";
        let mut tx = self.pool.begin().await.map_err(db(action))?;
        let moved = match change.state {
            Some(state) => sqlx::query(
                "UPDATE rollouts SET state = ?, state_name = ?, revision = revision + 1 \
                 WHERE id = ? AND revision = ?",
            )
            .bind(json_text(state))
            .bind(state.name())
            .bind(id)
            .bind(revision),
            None => sqlx::query(
                "UPDATE rollouts SET revision = revision + 1 WHERE id = ? AND revision = ?",
            )
            .bind(id)
            .bind(revision),
        }
        .execute(&mut *tx)
        .await
        .map_err(db(action))?;
        if moved.rows_affected() == 0 {
            return Ok(false);
        }
        for device in change.offer {
            sqlx::query(
                "UPDATE rollout_devices SET offered_at = ? WHERE rollout_id = ? AND device_id = ? AND offered_at IS NULL",
            )
            .bind(change.now)
            .bind(id)
            .bind(device.as_str())
            .execute(&mut *tx)
            .await
            .map_err(db(action))?;
            sqlx::query("UPDATE devices SET target_rollout = ? WHERE id = ?")
                .bind(id)
                .bind(device.as_str())
                .execute(&mut *tx)
                .await
                .map_err(db(action))?;
        }
        for (device, outcome, error) in change.settle {
            sqlx::query(
                "UPDATE rollout_devices SET outcome = ?, error = ? WHERE rollout_id = ? AND device_id = ? AND outcome IS NULL",
            )
            .bind(enum_text(outcome))
            .bind(error.as_deref())
            .bind(id)
            .bind(device.as_str())
            .execute(&mut *tx)
            .await
            .map_err(db(action))?;
        }
        // A withdrawn offer ends the device's part (an abort); a held one
        // waits to be offered again (a pause). Either way the device no
        // longer points at the rollout.
        let taken_back = (change.withdraw.iter().map(|d| (d, "outcome = 'withdrawn'")))
            .chain(change.hold.iter().map(|d| (d, "offered_at = NULL")));
        for (device, member_change) in taken_back {
            let sql = format!(
                "UPDATE rollout_devices SET {member_change} WHERE rollout_id = ? AND device_id = ? AND outcome IS NULL"
            );
            sqlx::query(&sql)
                .bind(id)
                .bind(device.as_str())
                .execute(&mut *tx)
                .await
                .map_err(db(action))?;
            sqlx::query(
                "UPDATE devices SET target_rollout = NULL WHERE id = ? AND target_rollout = ?",
            )
            .bind(device.as_str())
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(db(action))?;
        }
        for device in change.accept_failures {
            sqlx::query("UPDATE rollout_devices SET failure_accepted = 1 WHERE rollout_id = ? AND device_id = ?")
                .bind(id)
                .bind(device.as_str())
                .execute(&mut *tx)
                .await
                .map_err(db(action))?;
        }
        tx.commit().await.map_err(db(action))?;
        Ok(true)
    }

    async fn rollout(&self, id: i64) -> StoreResult<Option<RolloutRecord>> {
        sqlx::query(&format!("{ROLLOUT_SELECT} WHERE r.id = ?"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(db("looking up a rollout"))?
            .map(rollout_from_row)
            .transpose()
    }

    async fn list_rollouts(&self) -> StoreResult<Vec<RolloutRecord>> {
        sqlx::query(&format!("{ROLLOUT_SELECT} ORDER BY r.id"))
            .fetch_all(&self.pool)
            .await
            .map_err(db("listing rollouts"))?
            .into_iter()
            .map(rollout_from_row)
            .collect()
    }

    async fn rollout_devices(&self, id: i64) -> StoreResult<Vec<DeviceRecord>> {
        sqlx::query(&format!(
            "SELECT {MEMBER_DEVICE_COLUMNS} FROM rollout_devices rd JOIN devices d ON d.id = rd.device_id \
             JOIN rollouts r ON r.id = rd.rollout_id WHERE rd.rollout_id = ? ORDER BY d.id"
        ))
        .bind(id)
        .fetch_all(&self.pool)
        .await
        .map_err(db("listing a rollout's devices"))?
        .into_iter()
        .map(device_from_row)
        .collect()
    }

    async fn all_rollout_devices(&self) -> StoreResult<Vec<(i64, DeviceRecord)>> {
        // The rollout id after the device's columns, which device_from_row reads by position.
        let rollout_column = DEVICE_COLUMNS.matches(", ").count() + 1;
        sqlx::query(&format!(
            "SELECT {MEMBER_DEVICE_COLUMNS}, rd.rollout_id FROM rollout_devices rd JOIN devices d ON d.id = rd.device_id \
             JOIN rollouts r ON r.id = rd.rollout_id ORDER BY rd.rollout_id, d.id"
        ))
        .fetch_all(&self.pool)
        .await
        .map_err(db("listing the devices of every rollout"))?
        .into_iter()
        .map(|row| {
            let rollout: i64 = row
                .try_get(rollout_column)
                .map_err(db("listing the devices of every rollout"))?;
            Ok((rollout, device_from_row(row)?))
        })
        .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::num::{NonZeroU32, NonZeroU64};

    /// The rollouts table as servers before download limits created it.
    const ROLLOUTS_BEFORE_LIMITS: &str = "CREATE TABLE rollouts (
        id              INTEGER PRIMARY KEY AUTOINCREMENT,
        release         TEXT NOT NULL REFERENCES releases(version),
        allow_downgrade INTEGER NOT NULL,
        created_at      TEXT NOT NULL
    );";

    const MEMBERS_BEFORE_PHASES: &str = "CREATE TABLE rollout_devices (
        rollout_id INTEGER NOT NULL REFERENCES rollouts(id),
        device_id  TEXT NOT NULL REFERENCES devices(id),
        PRIMARY KEY (rollout_id, device_id)
    );";

    fn release() -> ReleaseRecord {
        ReleaseRecord {
            version: "2.0".parse().unwrap(),
            device_type: "gw".parse().unwrap(),
            manifest_json: b"{}".to_vec(),
            image_size: 1,
            image_sha256: "00".repeat(32),
            chunks: 1,
            stored_bytes: 1,
            created_at: "2026-01-01T00:00:00Z".into(),
        }
    }

    #[tokio::test]
    async fn a_database_from_before_download_limits_gains_them_and_keeps_its_rollouts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("uplift.db");
        {
            let old = SqlitePool::connect_with(
                SqliteConnectOptions::new()
                    .filename(&path)
                    .create_if_missing(true),
            )
            .await
            .unwrap();
            let rollouts = SCHEMA
                .find("CREATE TABLE IF NOT EXISTS rollouts (")
                .unwrap();
            let devices = SCHEMA.find("CREATE TABLE IF NOT EXISTS devices (").unwrap();
            let members = SCHEMA
                .find("CREATE TABLE IF NOT EXISTS rollout_devices (")
                .unwrap();
            let old_schema = format!(
                "{}{ROLLOUTS_BEFORE_LIMITS}\n{}{MEMBERS_BEFORE_PHASES}",
                &SCHEMA[..rollouts],
                &SCHEMA[devices..members],
            );
            sqlx::raw_sql(&old_schema).execute(&old).await.unwrap();
            let columns: i64 =
                sqlx::query_scalar("SELECT COUNT(*) FROM pragma_table_info('rollouts')")
                    .fetch_one(&old)
                    .await
                    .unwrap();
            assert_eq!(columns, 4, "the fixture is the old table");
            sqlx::query("INSERT INTO releases VALUES ('2.0', 'gw', x'7b7d', 1, '', 1, 1, 'then')")
                .execute(&old)
                .await
                .unwrap();
            sqlx::query("INSERT INTO rollouts (release, allow_downgrade, created_at) VALUES ('2.0', 0, 'then')")
                .execute(&old)
                .await
                .unwrap();
            old.close().await;
        }

        let store = SqliteStore::open(&path).await.unwrap();
        let old = store.rollout(1).await.unwrap().expect("old rollout kept");
        assert_eq!(old.limits, DownloadLimits::default());
        let limits = DownloadLimits {
            max_bytes_per_sec: NonZeroU64::new(1 << 20),
            max_downloading: NonZeroU32::new(5),
        };
        let policy = RolloutPolicy::default();
        let state = RolloutState::start(time::OffsetDateTime::UNIX_EPOCH);
        let plan = NewPlan {
            policy: &policy,
            state: &state,
        };
        let new = store
            .create_rollout(&release(), &[], false, limits, &plan, "now")
            .await
            .unwrap();
        assert_eq!(
            store.rollout_plan(new.id).await.unwrap().map(|p| p.state),
            Some(state)
        );
        assert_eq!(
            store.rollout_plan(1).await.unwrap(),
            None,
            "the old rollout has no plan"
        );
        assert_eq!(store.rollout(new.id).await.unwrap().unwrap().limits, limits);
        // Opening again finds nothing left to add.
        drop(store);
        let store = SqliteStore::open(&path).await.unwrap();
        assert_eq!(store.list_rollouts().await.unwrap().len(), 2);
    }
}
