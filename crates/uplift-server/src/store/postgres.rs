//! PostgreSQL implementation of [`Store`], for several server replicas on
//! one database. The same semantics as [`super::SqliteStore`], held by the
//! store conformance suite (`tests/store_conformance.rs`); where SQLite
//! serializes every write transaction (`BEGIN IMMEDIATE`), PostgreSQL runs
//! them side by side under READ COMMITTED, so each write says what it must
//! not race with:
//!
//! - a rollout's revision check is one `UPDATE ... WHERE revision = $n`: a
//!   second writer waits for the first's row lock, then sees the new
//!   revision and changes nothing, whichever replica it runs on;
//! - changes to rollout memberships (starting a rollout, adding a device to
//!   one) take one transaction-scoped advisory lock, since they read other
//!   rollouts' members to decide which to supersede;
//! - a device's tag change locks the device's row.
//!
//! Lists of IDs are bound as arrays (`unnest($1::text[])`) where SQLite
//! binds JSON (`json_each`). Times are `timestamptz` ([`super::stamp`]).

mod control;
mod roots;

use super::*;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgRow};
use sqlx::{PgPool, Postgres, QueryBuilder, Row};
use std::str::FromStr;
use std::time::Duration;

/// The store on a PostgreSQL database; cheap to clone (one pool).
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
}

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// The advisory lock key that serializes changes to rollout memberships
/// across every connection and replica ("uplift" in ASCII, then 1).
const MEMBERSHIP_LOCK: i64 = 0x7570_6c69_6674_0001;

fn db(action: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
    super::classify(action)
}

fn corrupt(what: &'static str) -> impl FnOnce(String) -> StoreError {
    move |detail| StoreError::Corrupt { what, detail }
}

impl PgStore {
    /// Connects to `url` (`postgres://user:password@host:port/database`,
    /// with libpq's parameters such as `sslmode`) and brings the schema up
    /// to date; several servers may do so at once (the migrator holds an
    /// advisory lock).
    pub async fn connect(url: &str, max_connections: u32) -> StoreResult<Self> {
        let options = PgConnectOptions::from_str(url).map_err(db("reading the database URL"))?;
        Self::connect_with(options, max_connections).await
    }

    pub async fn connect_with(
        options: PgConnectOptions,
        max_connections: u32,
    ) -> StoreResult<Self> {
        // No JIT compilation: the store's statements are short, but those
        // that bind a list of devices as an array are estimated as costly
        // as a report over the whole table, so PostgreSQL's default
        // (jit_above_cost) compiled them with LLVM on every execution. In a
        // 20 000-device rollout, history pruning took 36 ms a batch, 8 ms
        // of it compiling, 6 ms without; and loading LLVM into each new
        // connection was 4 % of the machine's CPU (perf).
        let options = options.options([("jit", "off")]);
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await
            .map_err(db("connecting to PostgreSQL"))?;
        MIGRATOR
            .run(&pool)
            .await
            .map_err(|source| StoreError::Migration {
                backend: "PostgreSQL",
                source,
            })?;
        Ok(Self { pool })
    }

    /// The connection pool, for what lives beside the store on the same
    /// database (notifications between replicas, for one).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Enrolls many devices in one transaction, as
    /// [`super::SqliteStore::insert_devices`] does.
    pub async fn insert_devices(&self, devices: &[NewDevice]) -> StoreResult<()> {
        let action = "enrolling devices";
        let mut tx = self.pool.begin().await.map_err(db(action))?;
        for d in devices {
            let result = insert_device_query(d).execute(&mut *tx).await;
            enrolled(d, result, action)?;
        }
        tx.commit().await.map_err(db(action))
    }
}

fn insert_device_query(
    d: &NewDevice,
) -> sqlx::query::Query<'_, Postgres, sqlx::postgres::PgArguments> {
    sqlx::query(
        "INSERT INTO devices (id, device_type, hardware_id, public_key, enrolled_at) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(d.id.as_str())
    .bind(d.device_type.as_str())
    .bind(d.hardware_id.as_str())
    .bind(&d.public_key)
    .bind(d.enrolled_at.instant())
}

fn enrolled(
    d: &NewDevice,
    result: Result<sqlx::postgres::PgQueryResult, sqlx::Error>,
    action: &'static str,
) -> StoreResult<()> {
    match result {
        Ok(_) => Ok(()),
        Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
            Err(StoreError::Conflict(format!(
                "a device with this public key or ID ({}) is already enrolled",
                d.id
            )))
        }
        Err(e) => Err(db(action)(e)),
    }
}

/// What a removed device leaves behind nothing of: its tags (a removed
/// device is no longer selected by them), its private addresses (back to
/// the pool) and its target.
const REMOVED_WITH_DEVICE: &[&str] = &["device_tags", "device_addresses", "device_targets"];

const DEVICE_COLUMNS: &str = "d.id, d.device_type, d.hardware_id, d.public_key, d.enrolled_at, d.last_seen, \
     d.running_version, d.state, d.booted_slot, d.reported_target, d.progress_done, d.progress_total, \
     d.progress_fetched, d.error_kind, d.error_message, \
     (SELECT t.rollout_id FROM device_targets t WHERE t.device_id = d.id), d.address, d.removed_at, \
     (SELECT string_agg(a.cidr,' ') FROM device_addresses a WHERE a.device_id = d.id)";

/// The rollout a member of `rd` counts for (see the SQLite store's).
const MEMBER_TARGET: &str = "CASE WHEN rd.outcome = 'superseded' THEN NULL \
     WHEN r.state IS NOT NULL AND rd.offered_at IS NULL AND rd.outcome IS NULL THEN rd.rollout_id \
     ELSE t.rollout_id END";

/// [`DeviceStanding`]'s columns, in the order [`standing_from_row`] reads them.
const STANDING_COLUMNS: &str =
    "d.id, d.running_version, d.state, d.reported_target, d.error_kind, d.error_message, t.rollout_id";

/// A rollout's members (`rd`) with their devices (`d`) and the devices'
/// targets (`t`), as [`MEMBER_TARGET`] and [`STANDING_COLUMNS`] read them:
/// joined, so that reading every member of a large rollout hashes the
/// targets once instead of looking each one up.
const MEMBERS_WITH_DEVICES: &str = "rollout_devices rd JOIN devices d ON d.id = rd.device_id \
     LEFT JOIN device_targets t ON t.device_id = d.id";

/// Makes rollout `$1` the target of the devices `$2` (its members) where
/// no newer rollout's target stands, as in the live view: an upsert into
/// their own narrow table (see migration 0008). Joined to the memberships,
/// so a target is always one (migration 0010: no foreign key says so).
const SET_TARGETS: &str = "INSERT INTO device_targets (device_id, rollout_id) \
     SELECT DISTINCT u.id, $1::bigint FROM unnest($2::text[]) AS u(id) \
     JOIN rollout_devices rd ON rd.rollout_id = $1::bigint AND rd.device_id = u.id \
     ON CONFLICT (device_id) DO UPDATE SET rollout_id = excluded.rollout_id \
     WHERE device_targets.rollout_id < excluded.rollout_id";

/// The members of rollouts whose members are still pending (`r`, each
/// member `m`: `[device, phase, offered]`), as [`Store::store_rollout_members`]
/// would write them: devices removed meanwhile left out. The tallies count
/// them from here until they are rows, so a rollout counts its devices
/// from its start on; the condition goes on with `AND`.
const PENDING_MEMBERS: &str =
    "rollouts r CROSS JOIN LATERAL json_array_elements(r.pending_members::json) m \
     JOIN devices d ON d.id = m.value->>0 AND d.removed_at IS NULL \
     WHERE r.pending_members IS NOT NULL";

const MEMBER_COLUMNS: &str = "rd.phase, rd.offered_at, rd.outcome, rd.error, rd.failure_accepted";

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

fn json_text<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_else(|e| unreachable!("plain data serializes: {e}"))
}

fn enum_text<T: serde::Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(s)) => s,
        other => unreachable!("unit enums serialize as strings, got {other:?}"),
    }
}

/// Reports as columns, for one set-based `UPDATE ... FROM unnest(...)`.
#[derive(Default)]
struct ReportColumns {
    id: Vec<String>,
    last_seen: Vec<Option<OffsetDateTime>>,
    address: Vec<Option<String>>,
    running_version: Vec<String>,
    state: Vec<String>,
    booted_slot: Vec<String>,
    reported_target: Vec<Option<String>>,
    done: Vec<Option<i64>>,
    total: Vec<Option<i64>>,
    fetched: Vec<Option<i64>>,
    error_kind: Vec<Option<String>>,
    error_message: Vec<Option<String>>,
}

impl ReportColumns {
    fn push(&mut self, s: &ReportedState) -> StoreResult<()> {
        let Some(report) = &s.report else {
            return Ok(());
        };
        self.id.push(s.id.as_str().to_owned());
        self.last_seen.push(s.last_seen.map(Timestamp::instant));
        self.address.push(s.address.clone());
        self.running_version
            .push(report.running_version.as_str().to_owned());
        self.state.push(enum_text(&report.state));
        self.booted_slot
            .push(report.booted_slot.as_str().to_owned());
        self.reported_target.push(
            report
                .target_version
                .as_ref()
                .map(|v| v.as_str().to_owned()),
        );
        let progress = report.progress;
        self.done.push(progress.map(|p| p.done_bytes as i64));
        self.total.push(progress.map(|p| p.total_bytes as i64));
        self.fetched.push(progress.map(|p| p.fetched_bytes as i64));
        self.error_kind
            .push(report.error.as_ref().map(|e| enum_text(&e.kind)));
        self.error_message
            .push(report.error.as_ref().map(|e| e.message.clone()));
        Ok(())
    }
}

fn ids(devices: &[DeviceId]) -> Vec<String> {
    devices.iter().map(|d| d.as_str().to_owned()).collect()
}

fn device_from_row(row: &PgRow) -> StoreResult<DeviceRecord> {
    let r = db("reading a device");
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
    let text = |i: usize| row.try_get::<String, _>(i).map_err(db("reading a device"));
    let opt_text = |i: usize| {
        row.try_get::<Option<String>, _>(i)
            .map_err(db("reading a device"))
    };
    let last_error = match (
        parse_json::<ErrorKind>("error kind", opt_text(13)?)?,
        opt_text(14)?,
    ) {
        (Some(kind), Some(message)) => Some(WireError { kind, message }),
        _ => None,
    };
    let enrolled_at: OffsetDateTime = row.try_get(4).map_err(r)?;
    let last_seen: Option<OffsetDateTime> = row.try_get(5).map_err(db("reading a device"))?;
    Ok(DeviceRecord {
        id: parse("device id", text(0)?)?,
        device_type: parse("device type", text(1)?)?,
        hardware_id: parse("hardware id", text(2)?)?,
        public_key: text(3)?,
        enrolled_at: Timestamp::from(enrolled_at),
        last_seen: last_seen.map(Timestamp::from),
        running_version: parse_opt("version", opt_text(6)?)?,
        state: parse_json("agent state", opt_text(7)?)?,
        booted_slot: parse_opt("slot", opt_text(8)?)?,
        reported_target: parse_opt("version", opt_text(9)?)?,
        progress,
        last_error,
        target_rollout: get_opt_i64(15)?,
        address: opt_text(16)?,
        removed_at: row
            .try_get::<Option<OffsetDateTime>, _>(17)
            .map_err(db("reading a device"))?
            .map(Timestamp::from),
        private_addresses: super::private_addresses(opt_text(18)?),
    })
}

fn member_from_row(row: PgRow) -> StoreResult<(MemberRecord, DeviceRecord)> {
    let first = DEVICE_COLUMNS.matches(", ").count() + 1;
    Ok((member_at(&row, first)?, device_from_row(&row)?))
}

fn standing_from_row(row: &PgRow) -> StoreResult<DeviceStanding> {
    let r = |e| StoreError::Database {
        action: "reading a rollout's devices",
        source: e,
    };
    let opt_text = |i: usize| row.try_get::<Option<String>, _>(i).map_err(r);
    let last_error = match (
        parse_json::<ErrorKind>("error kind", opt_text(4)?)?,
        opt_text(5)?,
    ) {
        (Some(kind), Some(message)) => Some(WireError { kind, message }),
        _ => None,
    };
    Ok(DeviceStanding {
        id: parse("device id", row.try_get::<String, _>(0).map_err(r)?)?,
        running_version: parse_opt("version", opt_text(1)?)?,
        state: parse_json("agent state", opt_text(2)?)?,
        reported_target: parse_opt("version", opt_text(3)?)?,
        last_error,
        target_rollout: row.try_get(6).map_err(r)?,
    })
}

/// The [`MEMBER_COLUMNS`] of a row, from column `first` on.
fn member_at(row: &PgRow, first: usize) -> StoreResult<MemberRecord> {
    let r = |e| StoreError::Database {
        action: "reading a rollout's devices",
        source: e,
    };
    let outcome: Option<String> = row.try_get(first + 2).map_err(r)?;
    let offered_at: Option<OffsetDateTime> = row.try_get(first + 1).map_err(r)?;
    Ok(MemberRecord {
        phase: u32::try_from(row.try_get::<i64, _>(first).map_err(r)?)
            .map_err(|e| corrupt("rollout phase")(e.to_string()))?,
        offered_at: offered_at.map(Timestamp::from),
        outcome: parse_json("rollout outcome", outcome)?,
        error: row.try_get(first + 3).map_err(r)?,
        failure_accepted: row.try_get::<bool, _>(first + 4).map_err(r)?,
    })
}

fn release_from_row(row: PgRow) -> StoreResult<ReleaseRecord> {
    let r = |e| StoreError::Database {
        action: "reading a release",
        source: e,
    };
    let created_at: OffsetDateTime = row.try_get(7).map_err(r)?;
    let expires_at: Option<OffsetDateTime> = row.try_get(9).map_err(r)?;
    Ok(ReleaseRecord {
        version: parse("version", row.try_get(0).map_err(r)?)?,
        device_type: parse("device type", row.try_get(1).map_err(r)?)?,
        manifest_json: row.try_get(2).map_err(r)?,
        image_size: row.try_get::<i64, _>(3).map_err(r)? as u64,
        image_sha256: row.try_get(4).map_err(r)?,
        chunks: row.try_get::<i64, _>(5).map_err(r)? as u64,
        stored_bytes: row.try_get::<i64, _>(6).map_err(r)? as u64,
        created_at: Timestamp::from(created_at),
        key_ids: row
            .try_get::<Option<String>, _>(8)
            .map_err(r)?
            .map(|ids| serde_json::from_str(&ids))
            .transpose()
            .map_err(|e| corrupt("release key ids")(e.to_string()))?
            .unwrap_or_default(),
        expires_at: expires_at.map(Timestamp::from),
    })
}

fn rollout_from_row(row: PgRow) -> StoreResult<RolloutRecord> {
    let r = |e| StoreError::Database {
        action: "reading a rollout",
        source: e,
    };
    let tags: Option<String> = row.try_get(7).map_err(r)?;
    let from_versions: Option<String> = row.try_get(8).map_err(r)?;
    let created_at: OffsetDateTime = row.try_get(3).map_err(r)?;
    Ok(RolloutRecord {
        id: row.try_get(0).map_err(r)?,
        release: parse("version", row.try_get(1).map_err(r)?)?,
        allow_downgrade: row.try_get(2).map_err(r)?,
        created_at: Timestamp::from(created_at),
        device_type: parse("device type", row.try_get(4).map_err(r)?)?,
        limits: limits_from(row.try_get(5).map_err(r)?, row.try_get(6).map_err(r)?),
        tags: tags
            .map(|t| serde_json::from_str(&t))
            .transpose()
            .map_err(|e| corrupt("rollout tags")(e.to_string()))?,
        from_versions: from_versions
            .map(|v| serde_json::from_str(&v))
            .transpose()
            .map_err(|e| corrupt("rollout versions")(e.to_string()))?
            .unwrap_or_default(),
    })
}

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

const RELEASE_COLUMNS: &str = "version, device_type, manifest, image_size, image_sha256, chunks, \
     stored_bytes, created_at, key_ids, expires_at";
const ROLLOUT_SELECT: &str =
    "SELECT r.id, r.release, r.allow_downgrade, r.created_at, rel.device_type, \
     r.max_bytes_per_sec, r.max_downloading, r.tags, r.from_versions \
     FROM rollouts r JOIN releases rel ON rel.version = r.release";

fn plan_from_row(
    (id, policy, state, revision, members_pending): (
        i64,
        Option<String>,
        Option<String>,
        i64,
        bool,
    ),
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
                members_pending,
            },
        ))
    })())
}

fn holds_reboots(policy: Option<String>) -> StoreResult<bool> {
    let Some(text) = policy else {
        return Ok(false);
    };
    let policy: RolloutPolicy =
        serde_json::from_str(&text).map_err(|e| corrupt("rollout policy")(e.to_string()))?;
    Ok(policy.window_scope() == Some(uplift_proto::policy::WindowScope::Reboot))
}

/// `text` as a LIKE pattern that finds it anywhere (see the SQLite store).
fn contains_pattern(text: &str) -> String {
    let mut pattern = String::with_capacity(text.len() + 2);
    pattern.push('%');
    for c in text.chars() {
        if matches!(c, '%' | '_' | '\\') {
            pattern.push('\\');
        }
        pattern.push(c);
    }
    pattern.push('%');
    pattern
}

/// The WHERE clause of a device list: `filter`, after `after`.
fn push_device_filter(
    q: &mut QueryBuilder<'_, Postgres>,
    filter: &DeviceFilter,
    after: Option<&DeviceId>,
) {
    q.push(" WHERE d.removed_at IS NULL");
    if let Some(device_type) = &filter.device_type {
        q.push(" AND d.device_type = ")
            .push_bind(device_type.as_str().to_owned());
    }
    if !filter.versions.is_empty() {
        let versions: Vec<String> = filter
            .versions
            .iter()
            .map(|v| v.as_str().to_owned())
            .collect();
        q.push(" AND d.running_version = ANY(")
            .push_bind(versions)
            .push("::text[])");
    }
    if let Some(state) = &filter.state {
        q.push(" AND d.state = ").push_bind(enum_text(state));
    }
    if let Some(selector) = &filter.tags {
        let mut tags: Vec<String> = selector
            .tags()
            .iter()
            .map(|t| t.as_str().to_owned())
            .collect();
        tags.sort_unstable();
        tags.dedup();
        let n = tags.len();
        match (selector, n) {
            (TagSelector::Any(_), 0) => {
                q.push(" AND FALSE");
            }
            (TagSelector::All(_), 0) => {}
            (selector, n) => {
                q.push(" AND d.id IN (SELECT device_id FROM device_tags WHERE tag = ANY(")
                    .push_bind(tags)
                    .push("::text[])");
                if let Some(after) = after {
                    q.push(" AND device_id > ")
                        .push_bind(after.as_str().to_owned());
                }
                if matches!(selector, TagSelector::All(_)) && n > 1 {
                    q.push(" GROUP BY device_id HAVING COUNT(*) = ")
                        .push_bind(n as i64);
                }
                q.push(")");
            }
        }
    }
    if let Some(text) = &filter.text {
        // ILIKE on `COLLATE "C"` columns folds ASCII letters only, as
        // SQLite's LIKE does.
        let pattern = contains_pattern(text);
        q.push(" AND (d.id ILIKE ")
            .push_bind(pattern.clone())
            .push(" ESCAPE '\\' OR d.hardware_id ILIKE ")
            .push_bind(pattern)
            .push(" ESCAPE '\\')");
    }
    // A subquery, which PostgreSQL hashes once, not `= ANY(array)`, which
    // it would search for every row.
    // Online: connected to this replica (the filter's list) or present on
    // another (device_presence). Every replica writes its own presence
    // too, a batch late; the list covers that lag.
    let connected = |q: &mut QueryBuilder<'_, Postgres>, joiner: &str, not: &str| {
        q.push(format!(" {joiner} d.id {not}IN (SELECT unnest("))
            .push_bind(ids(&filter.connected))
            .push("::text[]) UNION SELECT device_id FROM device_presence)");
    };
    match filter.online {
        Some(true) => connected(q, "AND", ""),
        Some(false) => connected(q, "AND", "NOT "),
        None => {}
    }
    if let Some(after) = filter.seen_after {
        q.push(" AND (d.last_seen >= ").push_bind(after.instant());
        connected(q, "OR", "");
        q.push(")");
    }
    if let Some(before) = filter.seen_before {
        q.push(" AND (d.last_seen IS NULL OR d.last_seen <= ")
            .push_bind(before.instant())
            .push(")");
        connected(q, "AND", "NOT ");
    }
    if let Some(after) = after {
        q.push(" AND d.id > ").push_bind(after.as_str().to_owned());
    }
}

#[async_trait]
impl Store for PgStore {
    async fn insert_device(&self, d: &NewDevice) -> StoreResult<()> {
        let result = insert_device_query(d).execute(&self.pool).await;
        enrolled(d, result, "enrolling a device")
    }

    async fn device(&self, id: &DeviceId) -> StoreResult<Option<DeviceRecord>> {
        sqlx::query(&format!(
            "SELECT {DEVICE_COLUMNS} FROM devices d WHERE d.id = $1"
        ))
        .bind(id.as_str())
        .fetch_optional(&self.pool)
        .await
        .map_err(db("looking up a device"))?
        .map(|row| device_from_row(&row))
        .transpose()
    }

    async fn device_by_public_key(&self, public_key: &str) -> StoreResult<Option<DeviceRecord>> {
        sqlx::query(&format!(
            "SELECT {DEVICE_COLUMNS} FROM devices d WHERE d.public_key = $1"
        ))
        .bind(public_key)
        .fetch_optional(&self.pool)
        .await
        .map_err(db("looking up a device by key"))?
        .map(|row| device_from_row(&row))
        .transpose()
    }

    async fn remove_device(&self, id: &DeviceId, now: Timestamp) -> StoreResult<Removal> {
        let action = "removing a device";
        let now = now.instant();
        let mut tx = self.pool.begin().await.map_err(db(action))?;
        // The row lock orders a removal after a concurrent change of the
        // device's tags or rollouts, and two removals one after the other.
        let found: Option<Option<OffsetDateTime>> =
            sqlx::query_scalar("SELECT removed_at FROM devices WHERE id = $1 FOR UPDATE")
                .bind(id.as_str())
                .fetch_optional(&mut *tx)
                .await
                .map_err(db(action))?;
        match found {
            None => return Ok(Removal::UnknownDevice),
            Some(Some(at)) => {
                return Ok(Removal::AlreadyRemoved {
                    at: Timestamp::from(at),
                })
            }
            Some(None) => {}
        }
        sqlx::query(
            "UPDATE devices SET removed_at = $1, standing_changed_at = clock_timestamp() WHERE id = $2",
        )
        .bind(now)
        .bind(id.as_str())
        .execute(&mut *tx)
        .await
        .map_err(db(action))?;
        let mut rollouts: Vec<i64> = sqlx::query_scalar(
            "UPDATE rollout_devices SET outcome = 'superseded', changed_at = clock_timestamp() \
             WHERE device_id = $1 AND outcome IS NULL RETURNING rollout_id",
        )
        .bind(id.as_str())
        .fetch_all(&mut *tx)
        .await
        .map_err(db(action))?;
        for table in REMOVED_WITH_DEVICE {
            sqlx::query(&format!("DELETE FROM {table} WHERE device_id = $1"))
                .bind(id.as_str())
                .execute(&mut *tx)
                .await
                .map_err(db(action))?;
        }
        tx.commit().await.map_err(db(action))?;
        rollouts.sort_unstable();
        Ok(Removal::Removed { rollouts })
    }

    async fn claim_address(
        &self,
        device: &DeviceId,
        pool: &str,
        address: &str,
        cidr: &str,
    ) -> StoreResult<AddressClaim> {
        let action = "assigning a private address";
        let mut tx = self.pool.begin().await.map_err(db(action))?;
        // Only for an enrolled device; a taken address (UNIQUE: a replica
        // inserting the same one waits for this commit, then inserts
        // nothing) or a pool the device has an address of inserts nothing.
        let inserted = sqlx::query(
            "INSERT INTO device_addresses (device_id, pool, address, cidr, assigned_at) \
             SELECT $1, $2, $3, $4, now() \
             WHERE EXISTS (SELECT 1 FROM devices WHERE id = $1 AND removed_at IS NULL) \
             ON CONFLICT DO NOTHING",
        )
        .bind(device.as_str())
        .bind(pool)
        .bind(address)
        .bind(cidr)
        .execute(&mut *tx)
        .await
        .map_err(db(action))?
        .rows_affected();
        let claim = if inserted == 1 {
            AddressClaim::Claimed
        } else {
            let held: Option<String> = sqlx::query_scalar(
                "SELECT cidr FROM device_addresses WHERE device_id = $1 AND pool = $2",
            )
            .bind(device.as_str())
            .bind(pool)
            .fetch_optional(&mut *tx)
            .await
            .map_err(db(action))?;
            let enrolled: Option<i32> =
                sqlx::query_scalar("SELECT 1 FROM devices WHERE id = $1 AND removed_at IS NULL")
                    .bind(device.as_str())
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(db(action))?;
            match (held, enrolled) {
                (Some(cidr), _) => AddressClaim::Held(cidr),
                (None, Some(_)) => AddressClaim::Taken,
                (None, None) => AddressClaim::NoDevice,
            }
        };
        tx.commit().await.map_err(db(action))?;
        Ok(claim)
    }

    async fn release_addresses(&self, device: &DeviceId, keep: &[String]) -> StoreResult<()> {
        sqlx::query(
            "DELETE FROM device_addresses WHERE device_id = $1 AND pool <> ALL($2::text[])",
        )
        .bind(device.as_str())
        .bind(keep)
        .execute(&self.pool)
        .await
        .map_err(db("releasing private addresses"))?;
        Ok(())
    }

    async fn pool_addresses(&self, pool: &str) -> StoreResult<Vec<String>> {
        sqlx::query_scalar("SELECT address FROM device_addresses WHERE pool = $1")
            .bind(pool)
            .fetch_all(&self.pool)
            .await
            .map_err(db("reading a pool's private addresses"))
    }

    async fn list_devices(&self) -> StoreResult<Vec<DeviceRecord>> {
        sqlx::query(&format!(
            "SELECT {DEVICE_COLUMNS} FROM devices d WHERE d.removed_at IS NULL ORDER BY d.enrolled_at, d.id"
        ))
        .fetch_all(&self.pool)
        .await
        .map_err(db("listing devices"))?
        .iter()
        .map(device_from_row)
        .collect()
    }

    async fn device_page(
        &self,
        filter: &DeviceFilter,
        after: Option<&DeviceId>,
        limit: u32,
    ) -> StoreResult<Vec<DeviceRecord>> {
        let mut q = QueryBuilder::new(format!("SELECT {DEVICE_COLUMNS} FROM devices d"));
        push_device_filter(&mut q, filter, after);
        q.push(" ORDER BY d.id LIMIT ").push_bind(i64::from(limit));
        q.build()
            .fetch_all(&self.pool)
            .await
            .map_err(db("listing devices"))?
            .iter()
            .map(device_from_row)
            .collect()
    }

    async fn tags_of(&self, devices: &[DeviceId]) -> StoreResult<Vec<(DeviceId, Tag)>> {
        if devices.is_empty() {
            return Ok(Vec::new());
        }
        let rows: Vec<(String, String)> = sqlx::query_as(
            "SELECT device_id, tag FROM device_tags \
             WHERE device_id = ANY($1::text[]) ORDER BY device_id, tag",
        )
        .bind(ids(devices))
        .fetch_all(&self.pool)
        .await
        .map_err(db("reading device tags"))?;
        rows.into_iter()
            .map(|(id, tag)| Ok((parse("device id", id)?, parse("tag", tag)?)))
            .collect()
    }

    async fn change_tags(
        &self,
        device: &DeviceId,
        set: Option<&[Tag]>,
        remove: &[Tag],
        add: &[Tag],
        max: usize,
    ) -> StoreResult<TagUpdate> {
        let action = "changing a device's tags";
        let mut tx = self.pool.begin().await.map_err(db(action))?;
        // The device's row lock orders concurrent changes of its tags.
        let known: Option<String> = sqlx::query_scalar(
            "SELECT id FROM devices WHERE id = $1 AND removed_at IS NULL FOR UPDATE",
        )
        .bind(device.as_str())
        .fetch_optional(&mut *tx)
        .await
        .map_err(db(action))?;
        if known.is_none() {
            return Ok(TagUpdate::UnknownDevice);
        }
        let names =
            |tags: &[Tag]| -> Vec<String> { tags.iter().map(|t| t.as_str().to_owned()).collect() };
        if let Some(set) = set {
            sqlx::query("DELETE FROM device_tags WHERE device_id = $1")
                .bind(device.as_str())
                .execute(&mut *tx)
                .await
                .map_err(db(action))?;
            insert_tags(&mut tx, device, names(set), action).await?;
        }
        sqlx::query("DELETE FROM device_tags WHERE device_id = $1 AND tag = ANY($2::text[])")
            .bind(device.as_str())
            .bind(names(remove))
            .execute(&mut *tx)
            .await
            .map_err(db(action))?;
        insert_tags(&mut tx, device, names(add), action).await?;
        let tags: Vec<String> =
            sqlx::query_scalar("SELECT tag FROM device_tags WHERE device_id = $1 ORDER BY tag")
                .bind(device.as_str())
                .fetch_all(&mut *tx)
                .await
                .map_err(db(action))?;
        if tags.len() > max {
            return Ok(TagUpdate::TooMany { count: tags.len() });
        }
        tx.commit().await.map_err(db(action))?;
        Ok(TagUpdate::Updated(
            tags.into_iter()
                .map(|t| parse("tag", t))
                .collect::<StoreResult<_>>()?,
        ))
    }

    async fn record_events(&self, events: &[NewEvent], keep_per_device: u32) -> StoreResult<u64> {
        let action = "recording device history";
        let mut devices = Vec::with_capacity(events.len());
        let mut ats = Vec::with_capacity(events.len());
        let mut kinds = Vec::with_capacity(events.len());
        let mut details = Vec::with_capacity(events.len());
        for e in events {
            devices.push(e.device.as_str().to_owned());
            ats.push(e.at.instant());
            kinds.push(e.event.name().to_owned());
            details.push(json_text(&e.event));
        }
        let mut tx = self.pool.begin().await.map_err(db(action))?;
        // WITH ORDINALITY: ids in the order given, as one insert per event.
        sqlx::query(
            "INSERT INTO device_events (device_id, at, kind, detail) \
             SELECT device_id, at, kind, detail \
             FROM unnest($1::text[], $2::timestamptz[], $3::text[], $4::text[]) \
                  WITH ORDINALITY AS e(device_id, at, kind, detail, n) ORDER BY n",
        )
        .bind(&devices)
        .bind(&ats)
        .bind(&kinds)
        .bind(&details)
        .execute(&mut *tx)
        .await
        .map_err(db(action))?;
        devices.sort_unstable();
        devices.dedup();
        // Each device's cutoff (its newest event beyond the limit) is found
        // once, and only devices that have one are joined to their events;
        // a cutoff correlated with each event row was found again per row.
        sqlx::query(
            "WITH cutoffs AS MATERIALIZED ( \
               SELECT k.device_id, (SELECT x.id FROM device_events x WHERE x.device_id = k.device_id \
                                    ORDER BY x.id DESC LIMIT 1 OFFSET $2) AS cutoff \
               FROM unnest($1::text[]) AS k(device_id)) \
             DELETE FROM device_events e USING cutoffs c \
             WHERE c.cutoff IS NOT NULL AND e.device_id = c.device_id AND e.id <= c.cutoff",
        )
        .bind(&devices)
        .bind(i64::from(keep_per_device))
        .execute(&mut *tx)
        .await
        .map_err(db(action))?;
        tx.commit().await.map_err(db(action))?;
        Ok(events.len() as u64)
    }

    async fn prune_events(&self, before: Timestamp) -> StoreResult<u64> {
        const AT_ONCE: i64 = 5_000;
        let before = before.instant();
        let mut pruned = 0;
        loop {
            let n = sqlx::query(
                "DELETE FROM device_events WHERE id IN \
                 (SELECT id FROM device_events WHERE at < $1 LIMIT $2)",
            )
            .bind(before)
            .bind(AT_ONCE)
            .execute(&self.pool)
            .await
            .map_err(db("pruning device history"))?
            .rows_affected();
            pruned += n;
            if n < AT_ONCE as u64 {
                return Ok(pruned);
            }
        }
    }

    async fn device_history(
        &self,
        device: &DeviceId,
        before: Option<i64>,
        limit: u32,
    ) -> StoreResult<Vec<DeviceEvent>> {
        let rows: Vec<(i64, OffsetDateTime, String)> = sqlx::query_as(
            "SELECT id, at, detail FROM device_events WHERE device_id = $1 AND id < $2 \
             ORDER BY id DESC LIMIT $3",
        )
        .bind(device.as_str())
        .bind(before.unwrap_or(i64::MAX))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(db("reading a device's history"))?;
        rows.into_iter()
            .map(|(id, at, detail)| {
                Ok(DeviceEvent {
                    id,
                    at: Timestamp::from(at).to_string(),
                    event: serde_json::from_str(&detail)
                        .map_err(|e| corrupt("device event")(e.to_string()))?,
                })
            })
            .collect()
    }

    async fn count_devices(&self) -> StoreResult<u64> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM devices WHERE removed_at IS NULL")
            .fetch_one(&self.pool)
            .await
            .map_err(db("counting devices"))?;
        Ok(n.max(0) as u64)
    }

    async fn device_census(&self) -> StoreResult<Vec<DeviceCensus>> {
        let rows: Vec<(Option<String>, Option<String>, Option<String>, i64)> = sqlx::query_as(
            "SELECT state, running_version, error_kind, COUNT(*) FROM devices WHERE removed_at IS NULL \
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

    async fn fleet_census(&self, connected: &[DeviceId]) -> StoreResult<Vec<FleetGroup>> {
        // One scan of the devices, grouped, joined to the online devices
        // (this replica's and those present on others) made a (hashed) set
        // once.
        let rows: Vec<(String, Option<String>, Option<String>, i64, i64)> = sqlx::query_as(
            "SELECT d.device_type, d.running_version, d.state, COUNT(*), COUNT(c.id) \
             FROM devices d LEFT JOIN (SELECT unnest($1::text[]) COLLATE \"C\" AS id \
                  UNION SELECT device_id FROM device_presence) c \
                  ON c.id = d.id \
             WHERE d.removed_at IS NULL \
             GROUP BY d.device_type, d.running_version, d.state",
        )
        .bind(ids(connected))
        .fetch_all(&self.pool)
        .await
        .map_err(db("counting the fleet"))?;
        rows.into_iter()
            .map(|(device_type, version, state, devices, online)| {
                Ok(FleetGroup {
                    device_type: parse("device type", device_type)?,
                    version: parse_opt("version", version)?,
                    state: parse_json("agent state", state)?,
                    devices: devices.max(0) as u64,
                    online: online.max(0) as u64,
                })
            })
            .collect()
    }

    async fn record_presence(
        &self,
        replica: &str,
        changes: &[(DeviceId, crate::hub::PresenceChange)],
        afresh: bool,
    ) -> StoreResult<bool> {
        use crate::hub::PresenceChange;
        let action = "recording which devices this replica holds";
        let gone_after = REPLICA_GONE_AFTER.as_secs_f64();
        // Replicas gone quiet are dropped first, on their own: a dead
        // replica's rows are deleted by whichever replica gets there, and
        // in a statement of its own that lock waits cannot entangle with
        // this replica's writes below.
        sqlx::query(
            "DELETE FROM replicas WHERE seen_at < clock_timestamp() - make_interval(secs => $1)",
        )
        .bind(gone_after)
        .execute(&self.pool)
        .await
        .map_err(db(action))?;
        let mut tx = self.pool.begin().await.map_err(db(action))?;
        let unknown: bool = sqlx::query_scalar(
            "INSERT INTO replicas (id, started_at, seen_at) VALUES ($1, clock_timestamp(), clock_timestamp()) \
             ON CONFLICT (id) DO UPDATE SET seen_at = clock_timestamp() \
             RETURNING (xmax = 0)",
        )
        .bind(replica)
        .fetch_one(&mut *tx)
        .await
        .map_err(db(action))?;
        if afresh {
            sqlx::query("DELETE FROM device_presence WHERE replica_id = $1")
                .bind(replica)
                .execute(&mut *tx)
                .await
                .map_err(db(action))?;
        }
        // In device order, as every replica writes them: two replicas
        // writing the same devices (some moved between them) wait for each
        // other rather than deadlock.
        let mut sorted: Vec<&(DeviceId, PresenceChange)> = changes.iter().collect();
        sorted.sort_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
        let mut connected = Vec::new();
        let mut connected_at = Vec::new();
        let mut disconnected = Vec::new();
        for (device, change) in sorted {
            match change {
                PresenceChange::Connected(at) => {
                    connected.push(device.as_str().to_owned());
                    connected_at.push(Timestamp::from(*at).instant());
                }
                PresenceChange::Disconnected => disconnected.push(device.as_str().to_owned()),
            }
        }
        if !disconnected.is_empty() {
            sqlx::query(
                "DELETE FROM device_presence WHERE replica_id = $1 AND device_id = ANY($2::text[])",
            )
            .bind(replica)
            .bind(&disconnected)
            .execute(&mut *tx)
            .await
            .map_err(db(action))?;
        }
        if !connected.is_empty() {
            // Devices removed meanwhile are skipped (the join), and a newer
            // connection on another replica is kept (the WHERE).
            sqlx::query(
                "INSERT INTO device_presence (device_id, replica_id, connected_at) \
                 SELECT c.id, $1, c.at FROM unnest($2::text[], $3::timestamptz[]) \
                     WITH ORDINALITY AS c(id, at, n) JOIN devices d ON d.id = c.id ORDER BY c.n \
                 ON CONFLICT (device_id) DO UPDATE \
                     SET replica_id = excluded.replica_id, connected_at = excluded.connected_at \
                     WHERE device_presence.connected_at <= excluded.connected_at",
            )
            .bind(replica)
            .bind(&connected)
            .bind(&connected_at)
            .execute(&mut *tx)
            .await
            .map_err(db(action))?;
        }
        tx.commit().await.map_err(db(action))?;
        Ok(unknown)
    }

    async fn present_devices(&self, devices: &[DeviceId]) -> StoreResult<Vec<DeviceId>> {
        if devices.is_empty() {
            return Ok(Vec::new());
        }
        let rows: Vec<String> = sqlx::query_scalar(
            "SELECT device_id FROM device_presence WHERE device_id = ANY($1::text[]) ORDER BY device_id",
        )
        .bind(ids(devices))
        .fetch_all(&self.pool)
        .await
        .map_err(db("reading which devices other replicas hold"))?;
        rows.into_iter().map(|s| parse("device id", s)).collect()
    }

    async fn retire_replica(&self, replica: &str) -> StoreResult<()> {
        sqlx::query("DELETE FROM replicas WHERE id = $1")
            .bind(replica)
            .execute(&self.pool)
            .await
            .map_err(db("dropping this replica's presence at shutdown"))?;
        Ok(())
    }

    async fn devices_in_rollouts(&self) -> StoreResult<u64> {
        // The SQLite store's query (see there), in PostgreSQL's words.
        let unsettled = "NOT (d.state IS NOT DISTINCT FROM 'idle' AND d.running_version IS NOT DISTINCT FROM r.release) \
             AND NOT (COALESCE(d.state IN ('failed', 'rolled_back'), FALSE) \
                      AND d.reported_target IS NOT DISTINCT FROM r.release)";
        // Two set-based halves, each device once (UNION): PostgreSQL hash
        // joins them, where `EXISTS ... OR EXISTS` ran a subplan per device
        // (300 to 600 ms at 100 000 devices; this, tens of ms).
        let n: i64 = sqlx::query_scalar(&format!(
            "SELECT COUNT(*) FROM ( \
               SELECT d.id FROM devices d JOIN device_targets t ON t.device_id = d.id \
               JOIN rollouts r ON r.id = t.rollout_id \
               WHERE {unsettled} AND NOT EXISTS (SELECT 1 FROM rollout_devices rd \
                   WHERE rd.rollout_id = r.id AND rd.device_id = d.id AND rd.outcome = 'superseded') \
               UNION \
               SELECT d.id FROM rollout_devices rd JOIN devices d ON d.id = rd.device_id \
               JOIN rollouts r ON r.id = rd.rollout_id \
               WHERE rd.offered_at IS NULL AND rd.outcome IS NULL AND r.state IS NOT NULL \
               AND {unsettled}) s"
        ))
        .fetch_one(&self.pool)
        .await
        .map_err(db("counting devices in rollouts"))?;
        Ok(n.max(0) as u64)
    }

    async fn unknown_devices(&self, devices: &[DeviceId]) -> StoreResult<Vec<DeviceId>> {
        if devices.is_empty() {
            return Ok(Vec::new());
        }
        let rows: Vec<String> = sqlx::query_scalar(
            "SELECT j.id FROM unnest($1::text[]) WITH ORDINALITY AS j(id, n) \
             WHERE NOT EXISTS (SELECT 1 FROM devices d WHERE d.id = j.id AND d.removed_at IS NULL) ORDER BY j.n",
        )
        .bind(ids(devices))
        .fetch_all(&self.pool)
        .await
        .map_err(db("looking up devices"))?;
        rows.into_iter().map(|s| parse("device id", s)).collect()
    }

    async fn devices_of_type(&self, device_type: &DeviceType) -> StoreResult<Vec<DeviceId>> {
        let rows: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM devices WHERE device_type = $1 AND removed_at IS NULL ORDER BY id",
        )
        .bind(device_type.as_str())
        .fetch_all(&self.pool)
        .await
        .map_err(db("listing devices of a type"))?;
        rows.into_iter().map(|s| parse("device id", s)).collect()
    }

    async fn record_reports(&self, states: &[ReportedState]) -> StoreResult<u64> {
        let action = "recording device reports";
        // One report per device, the newest (the last in the batch).
        let mut newest: std::collections::BTreeMap<&str, &ReportedState> = Default::default();
        for s in states {
            newest.insert(s.id.as_str(), s);
        }
        let (reported, seen_only): (Vec<&ReportedState>, Vec<&ReportedState>) =
            newest.into_values().partition(|s| s.report.is_some());
        let mut tx = self.pool.begin().await.map_err(db(action))?;
        // Rows locked in device order: two replicas' batches that share a
        // device (one that moved between them) wait for each other instead
        // of deadlocking, whatever order the set-based updates visit rows.
        // NO KEY UPDATE, the lock the updates themselves take: FOR UPDATE
        // also waits on foreign-key checks of rows that refer to a device
        // (KEY SHARE), and deadlocked with those of a rollout's members
        // being written, in list order, while their devices reported their
        // first offers (that key is gone since migration 0010; the
        // presence rows' remains).
        let locked: Vec<String> = states.iter().map(|s| s.id.as_str().to_owned()).collect();
        sqlx::query(
            "SELECT 1 FROM devices WHERE id = ANY($1::text[]) ORDER BY id FOR NO KEY UPDATE",
        )
        .bind(&locked)
        .execute(&mut *tx)
        .await
        .map_err(db(action))?;
        let mut written = 0;
        if !reported.is_empty() {
            let mut columns = ReportColumns::default();
            for s in &reported {
                columns.push(s)?;
            }
            // The standing's stamp moves only when what decides a rollout
            // changed, not with every progress report: the scheduler's
            // reads of what changed stay small during a download.
            written += sqlx::query(
                "UPDATE devices d SET last_seen = COALESCE(s.last_seen, d.last_seen), \
                 address = COALESCE(s.address, d.address), running_version = s.running_version, \
                 state = s.state, booted_slot = s.booted_slot, reported_target = s.reported_target, \
                 progress_done = s.done, progress_total = s.total, progress_fetched = s.fetched, \
                 error_kind = s.error_kind, error_message = s.error_message, \
                 standing_changed_at = CASE WHEN (d.running_version, d.state, d.reported_target, \
                     d.error_kind, d.error_message) IS DISTINCT FROM (s.running_version, s.state, \
                     s.reported_target, s.error_kind, s.error_message) \
                     THEN clock_timestamp() ELSE d.standing_changed_at END \
                 FROM unnest($1::text[], $2::timestamptz[], $3::text[], $4::text[], $5::text[], \
                     $6::text[], $7::text[], $8::bigint[], $9::bigint[], $10::bigint[], $11::text[], \
                     $12::text[]) AS s(id, last_seen, address, running_version, state, booted_slot, \
                     reported_target, done, total, fetched, error_kind, error_message) \
                 WHERE d.id = s.id",
            )
            .bind(&columns.id)
            .bind(&columns.last_seen)
            .bind(&columns.address)
            .bind(&columns.running_version)
            .bind(&columns.state)
            .bind(&columns.booted_slot)
            .bind(&columns.reported_target)
            .bind(&columns.done)
            .bind(&columns.total)
            .bind(&columns.fetched)
            .bind(&columns.error_kind)
            .bind(&columns.error_message)
            .execute(&mut *tx)
            .await
            .map_err(db(action))?
            .rows_affected();
        }
        if !seen_only.is_empty() {
            let mut id = Vec::with_capacity(seen_only.len());
            let mut last_seen = Vec::with_capacity(seen_only.len());
            let mut address = Vec::with_capacity(seen_only.len());
            for s in &seen_only {
                id.push(s.id.as_str().to_owned());
                last_seen.push(s.last_seen.map(Timestamp::instant));
                address.push(s.address.clone());
            }
            written += sqlx::query(
                "UPDATE devices d SET last_seen = COALESCE(s.last_seen, d.last_seen), \
                 address = COALESCE(s.address, d.address) \
                 FROM unnest($1::text[], $2::timestamptz[], $3::text[]) AS s(id, last_seen, address) \
                 WHERE d.id = s.id",
            )
            .bind(&id)
            .bind(&last_seen)
            .bind(&address)
            .execute(&mut *tx)
            .await
            .map_err(db(action))?
            .rows_affected();
        }
        tx.commit().await.map_err(db(action))?;
        Ok(written)
    }

    async fn device_targets(&self) -> StoreResult<Vec<(DeviceId, DeviceTarget)>> {
        // With the first offers of rollouts whose members are pending (not
        // targets yet), newest rollout last: it is the one that stands.
        let rows = sqlx::query(
            "SELECT t.device_id, r.id, r.release, r.allow_downgrade, r.max_bytes_per_sec, r.max_downloading, \
             r.policy FROM device_targets t JOIN rollouts r ON r.id = t.rollout_id \
             UNION ALL \
             SELECT m.value->>0, r.id, r.release, r.allow_downgrade, r.max_bytes_per_sec, r.max_downloading, \
             r.policy FROM rollouts r CROSS JOIN LATERAL json_array_elements(r.pending_members::json) m \
             JOIN devices d ON d.id = m.value->>0 AND d.removed_at IS NULL \
             WHERE r.pending_members IS NOT NULL AND (m.value->>2)::boolean \
             ORDER BY 2",
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
                        allow_downgrade: row.try_get(3).map_err(r)?,
                        limits: limits_from(row.try_get(4).map_err(r)?, row.try_get(5).map_err(r)?),
                        hold_reboot: holds_reboots(row.try_get(6).map_err(r)?)?,
                    },
                ))
            })
            .collect()
    }

    async fn insert_release(&self, rel: &ReleaseRecord) -> StoreResult<()> {
        let result = sqlx::query(&format!(
            "INSERT INTO releases ({RELEASE_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
        ))
        .bind(rel.version.as_str())
        .bind(rel.device_type.as_str())
        .bind(&rel.manifest_json)
        .bind(rel.image_size as i64)
        .bind(&rel.image_sha256)
        .bind(rel.chunks as i64)
        .bind(rel.stored_bytes as i64)
        .bind(rel.created_at.instant())
        .bind(json_text(&rel.key_ids))
        .bind(rel.expires_at.map(Timestamp::instant))
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
            "SELECT {RELEASE_COLUMNS} FROM releases WHERE version = $1"
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
            "SELECT {RELEASE_COLUMNS} FROM releases ORDER BY created_at, version COLLATE \"C\""
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
        now: Timestamp,
    ) -> StoreResult<RolloutRecord> {
        let action = "starting a rollout";
        let devices: Vec<String> = members.iter().map(|(d, _)| d.as_str().to_owned()).collect();
        let mut tx = self.pool.begin().await.map_err(db(action))?;
        let (max_bytes_per_sec, max_downloading) = limits_columns(&limits);
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO rollouts (release, allow_downgrade, created_at, max_bytes_per_sec, max_downloading, \
             policy, state, state_name, revision, tags, from_versions, pending_members) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 0, $9, $10, $11) RETURNING id",
        )
        .bind(release.version.as_str())
        .bind(allow_downgrade)
        .bind(now.instant())
        .bind(max_bytes_per_sec)
        .bind(max_downloading)
        .bind(json_text(plan.policy))
        .bind(json_text(plan.state))
        .bind(plan.state.name())
        .bind(plan.tags.map(json_text))
        .bind((!plan.from_versions.is_empty()).then(|| json_text(&plan.from_versions)))
        .bind(pending_members_text(members, plan.offer))
        .fetch_one(&mut *tx)
        .await
        .map_err(db(action))?;
        let unknown: Option<String> = sqlx::query_scalar(
            "SELECT m.id FROM unnest($1::text[]) WITH ORDINALITY AS m(id, n) \
             WHERE NOT EXISTS (SELECT 1 FROM devices d WHERE d.id = m.id AND d.removed_at IS NULL) ORDER BY m.n LIMIT 1",
        )
        .bind(&devices)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db("targeting a device"))?;
        if let Some(device) = unknown {
            return Err(StoreError::NotFound(format!(
                "device {device} is not enrolled; check `uplift devices list`"
            )));
        }
        tx.commit().await.map_err(db("committing a rollout"))?;
        Ok(started_rollout(
            id,
            release,
            allow_downgrade,
            limits,
            plan,
            now,
        ))
    }

    async fn store_rollout_members(&self, id: i64) -> StoreResult<Option<Vec<DeviceId>>> {
        let action = "writing a rollout's members";
        let mut tx = self.pool.begin().await.map_err(db(action))?;
        lock_memberships(&mut tx, action).await?;
        // Taken in the transaction that writes them, under the membership
        // lock: a second writer (another replica's scheduler) waits for it
        // and finds none.
        let taken: Option<(String, OffsetDateTime)> = sqlx::query_as(
            "SELECT pending_members, created_at FROM rollouts \
             WHERE id = $1 AND pending_members IS NOT NULL",
        )
        .bind(id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db(action))?;
        let Some((text, created_at)) = taken else {
            return Ok(None);
        };
        sqlx::query("UPDATE rollouts SET pending_members = NULL WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(db(action))?;
        let pending = pending_members(&text)?;
        let devices: Vec<&str> = pending.iter().map(|(d, _, _)| d.as_str()).collect();
        let phases: Vec<i64> = pending.iter().map(|(_, p, _)| i64::from(*p)).collect();
        let offered: Vec<bool> = pending.iter().map(|(_, _, o)| *o).collect();
        // Only older rollouts are superseded: a newer one may have been
        // started, and its members written, while these were pending.
        sqlx::query(
            "UPDATE rollout_devices SET outcome = 'superseded', changed_at = clock_timestamp() \
             WHERE rollout_id < $1 AND outcome IS NULL AND device_id = ANY($2::text[])",
        )
        .bind(id)
        .bind(&devices)
        .execute(&mut *tx)
        .await
        .map_err(db("superseding older rollouts"))?;
        // A device removed meanwhile is left out; a dynamic rollout's
        // newcomer may be a member already.
        sqlx::query(
            "INSERT INTO rollout_devices (rollout_id, device_id, phase, offered_at, changed_at) \
             SELECT $1, m.id, m.phase, CASE WHEN m.offered THEN $4 END, clock_timestamp() \
             FROM unnest($2::text[], $3::bigint[], $5::bool[]) AS m(id, phase, offered) \
             JOIN devices d ON d.id = m.id AND d.removed_at IS NULL \
             ON CONFLICT DO NOTHING",
        )
        .bind(id)
        .bind(&devices)
        .bind(&phases)
        .bind(created_at)
        .bind(&offered)
        .execute(&mut *tx)
        .await
        .map_err(db("targeting a device"))?;
        sqlx::query(
            "UPDATE rollout_devices SET outcome = 'superseded', changed_at = clock_timestamp() \
             WHERE rollout_id = $1 AND outcome IS NULL \
             AND device_id IN (SELECT device_id FROM rollout_devices WHERE rollout_id > $1)",
        )
        .bind(id)
        .execute(&mut *tx)
        .await
        .map_err(db("superseding by newer rollouts"))?;
        // The offered members as written: none removed, none a newer
        // rollout holds.
        let targeted: Vec<String> = sqlx::query_scalar(
            "INSERT INTO device_targets (device_id, rollout_id) \
             SELECT device_id, rollout_id FROM rollout_devices \
             WHERE rollout_id = $1 AND offered_at IS NOT NULL AND outcome IS NULL \
             ON CONFLICT (device_id) DO UPDATE SET rollout_id = excluded.rollout_id \
             WHERE device_targets.rollout_id < excluded.rollout_id \
             RETURNING device_id",
        )
        .bind(id)
        .fetch_all(&mut *tx)
        .await
        .map_err(db("offering a rollout's first devices"))?;
        tx.commit()
            .await
            .map_err(db("committing a rollout's members"))?;
        Ok(Some(targeted_in_order(pending, targeted)))
    }

    async fn rollouts_with_pending_members(&self, before: Timestamp) -> StoreResult<Vec<i64>> {
        sqlx::query_scalar(
            "SELECT id FROM rollouts WHERE pending_members IS NOT NULL AND created_at < $1 ORDER BY id",
        )
        .bind(before.instant())
        .fetch_all(&self.pool)
        .await
        .map_err(db("listing rollouts whose members are pending"))
    }

    async fn rollout_plan(&self, id: i64) -> StoreResult<Option<RolloutPlan>> {
        let row: Option<(i64, Option<String>, Option<String>, i64, bool)> = sqlx::query_as(
            "SELECT id, policy, state, revision, pending_members IS NOT NULL FROM rollouts \
                 WHERE id = $1",
        )
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
        lock_memberships(&mut tx, action).await?;
        let added = sqlx::query(
            "INSERT INTO rollout_devices (rollout_id, device_id, phase, changed_at) \
             SELECT $1, $2, $3, clock_timestamp() \
             WHERE NOT EXISTS (SELECT 1 FROM rollout_devices WHERE device_id = $2 AND rollout_id > $1) \
             AND EXISTS (SELECT 1 FROM devices WHERE id = $2 AND removed_at IS NULL) \
             ON CONFLICT DO NOTHING",
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
                "UPDATE rollout_devices SET outcome = 'superseded', changed_at = clock_timestamp() \
                 WHERE device_id = $1 AND rollout_id < $2 AND outcome IS NULL",
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
        let rows: Vec<(i64, Option<String>, Option<String>, i64, bool)> = sqlx::query_as(
            "SELECT id, policy, state, revision, pending_members IS NOT NULL FROM rollouts \
             WHERE state IS NOT NULL ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(db("reading rollout states"))?;
        rows.into_iter().filter_map(plan_from_row).collect()
    }

    async fn phase_tallies(&self, only: Option<i64>) -> StoreResult<Vec<(i64, u32, PhaseTally)>> {
        let rows: Vec<(i64, i64, i64, i64, i64, i64)> = sqlx::query_as(&format!(
            "SELECT rollout_id, phase, COUNT(*), COUNT(offered_at), \
                        COUNT(*) FILTER (WHERE outcome = 'succeeded'), \
                        COUNT(*) FILTER (WHERE outcome IN ('failed', 'timed_out')) \
                 FROM rollout_devices WHERE $1::bigint IS NULL OR rollout_id = $1 \
                 GROUP BY rollout_id, phase \
                 UNION ALL \
                 SELECT r.id, (m.value->>1)::bigint, COUNT(*), \
                        COUNT(*) FILTER (WHERE (m.value->>2)::boolean), 0, 0 \
                 FROM {PENDING_MEMBERS} AND ($1::bigint IS NULL OR r.id = $1) \
                 GROUP BY 1, 2 ORDER BY 1, 2"
        ))
        .bind(only)
        .fetch_all(&self.pool)
        .await
        .map_err(db("counting rollout phases"))?;
        let count = |n: i64| n.max(0) as u64;
        Ok(rows
            .into_iter()
            .map(|(id, phase, devices, offered, succeeded, failed)| {
                let tally = PhaseTally {
                    devices: count(devices),
                    offered: count(offered),
                    succeeded: count(succeeded),
                    failed: count(failed),
                };
                (id, phase.max(0) as u32, tally)
            })
            .collect())
    }

    async fn supersessions(&self, only: Option<i64>) -> StoreResult<Vec<(i64, i64, u64)>> {
        let rows: Vec<(i64, i64, i64)> = sqlx::query_as(
            "SELECT older, newer, COUNT(*) FROM ( \
               SELECT o.rollout_id AS older, \
                      (SELECT MIN(n.rollout_id) FROM rollout_devices n \
                        WHERE n.device_id = o.device_id AND n.rollout_id > o.rollout_id) AS newer \
               FROM rollout_devices o WHERE o.outcome = 'superseded') s \
             WHERE newer IS NOT NULL AND ($1::bigint IS NULL OR older = $1 OR newer = $1) \
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
             AND state_name NOT IN ('finished', 'aborted') AND pending_members IS NULL ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(db("listing active rollouts"))
    }

    async fn rollout_members(&self, id: i64) -> StoreResult<Vec<(MemberRecord, DeviceStanding)>> {
        let first = STANDING_COLUMNS.matches(", ").count() + 1;
        sqlx::query(&format!(
            "SELECT {STANDING_COLUMNS}, {MEMBER_COLUMNS} FROM {MEMBERS_WITH_DEVICES} \
             WHERE rd.rollout_id = $1 ORDER BY rd.phase, d.id"
        ))
        .bind(id)
        .fetch_all(&self.pool)
        .await
        .map_err(db("reading a rollout's devices"))?
        .iter()
        .map(|row| Ok((member_at(row, first)?, standing_from_row(row)?)))
        .collect()
    }

    async fn change_mark(&self) -> StoreResult<Timestamp> {
        let now: OffsetDateTime = sqlx::query_scalar("SELECT clock_timestamp()")
            .fetch_one(&self.pool)
            .await
            .map_err(db("reading the database's clock"))?;
        Ok(Timestamp::from(now))
    }

    async fn rollout_member_changes(
        &self,
        id: i64,
        since: Timestamp,
    ) -> StoreResult<Vec<(MemberRecord, DeviceStanding)>> {
        let since = since.instant();
        let first = STANDING_COLUMNS.matches(", ").count() + 1;
        sqlx::query(&format!(
            "SELECT {STANDING_COLUMNS}, {MEMBER_COLUMNS} FROM {MEMBERS_WITH_DEVICES} \
             WHERE rd.rollout_id = $1 AND rd.device_id IN ( \
                 SELECT id FROM devices WHERE standing_changed_at >= $2 \
                 UNION SELECT device_id FROM rollout_devices WHERE rollout_id = $1 AND changed_at >= $2)"
        ))
        .bind(id)
        .bind(since)
        .fetch_all(&self.pool)
        .await
        .map_err(db("reading a rollout's changed devices"))?
        .iter()
        .map(|row| Ok((member_at(row, first)?, standing_from_row(row)?)))
        .collect()
    }

    async fn rollout_members_page(
        &self,
        id: i64,
        page: &MemberPage,
    ) -> StoreResult<Vec<(MemberRecord, DeviceRecord)>> {
        let mut q = QueryBuilder::new(format!(
            "SELECT {DEVICE_COLUMNS}, {MEMBER_COLUMNS} \
             FROM rollout_devices rd JOIN devices d ON d.id = rd.device_id \
             WHERE rd.rollout_id = "
        ));
        q.push_bind(id);
        if let Some(phase) = page.phase {
            q.push(" AND rd.phase = ").push_bind(i64::from(phase));
        }
        if let Some((phase, device)) = &page.after {
            q.push(" AND (rd.phase, rd.device_id) > (")
                .push_bind(i64::from(*phase))
                .push(", ")
                .push_bind(device.as_str().to_owned())
                .push(")");
        }
        match page.outcome.map(|o| o.stored()) {
            None => {}
            Some(None) => {
                q.push(" AND rd.outcome IS NULL");
            }
            Some(Some(stored)) => {
                q.push(" AND rd.outcome = ").push_bind(stored);
            }
        }
        q.push(" ORDER BY rd.phase, rd.device_id LIMIT ")
            .push_bind(i64::from(page.limit));
        q.build()
            .fetch_all(&self.pool)
            .await
            .map_err(db("reading a page of a rollout's devices"))?
            .into_iter()
            .map(member_from_row)
            .collect()
    }

    async fn apply_rollout_change(
        &self,
        id: i64,
        revision: i64,
        change: &RolloutChange<'_>,
    ) -> StoreResult<bool> {
        let action = "storing a rollout step";
        let now = change.now.instant();
        let mut tx = self.pool.begin().await.map_err(db(action))?;
        // The compare-and-set: a concurrent writer of the same rollout (on
        // any replica) waits here for this row's lock, then finds the
        // revision moved on and changes nothing.
        let moved = sqlx::query(
            "UPDATE rollouts SET state = COALESCE($1, state), state_name = COALESCE($2, state_name), \
             revision = revision + 1 WHERE id = $3 AND revision = $4",
        )
        .bind(change.state.map(json_text))
        .bind(change.state.map(|s| s.name()))
        .bind(id)
        .bind(revision)
        .execute(&mut *tx)
        .await
        .map_err(db(action))?;
        if moved.rows_affected() == 0 {
            return Ok(false);
        }
        if !change.offer.is_empty() {
            let offered = ids(change.offer);
            sqlx::query(
                "UPDATE rollout_devices SET offered_at = $1, changed_at = clock_timestamp() \
                 WHERE rollout_id = $2 AND offered_at IS NULL \
                 AND device_id = ANY($3::text[])",
            )
            .bind(now)
            .bind(id)
            .bind(&offered)
            .execute(&mut *tx)
            .await
            .map_err(db(action))?;
            sqlx::query(SET_TARGETS)
                .bind(id)
                .bind(&offered)
                .execute(&mut *tx)
                .await
                .map_err(db(action))?;
        }
        if !change.settle.is_empty() {
            let devices: Vec<String> = change
                .settle
                .iter()
                .map(|(d, _, _)| d.as_str().to_owned())
                .collect();
            let outcomes: Vec<String> =
                change.settle.iter().map(|(_, o, _)| enum_text(o)).collect();
            let errors: Vec<Option<String>> =
                change.settle.iter().map(|(_, _, e)| e.clone()).collect();
            sqlx::query(
                "UPDATE rollout_devices rd SET outcome = s.outcome, error = s.error, \
                 changed_at = clock_timestamp() \
                 FROM unnest($1::text[], $2::text[], $3::text[]) AS s(device_id, outcome, error) \
                 WHERE rd.rollout_id = $4 AND rd.device_id = s.device_id AND rd.outcome IS NULL",
            )
            .bind(&devices)
            .bind(&outcomes)
            .bind(&errors)
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(db(action))?;
        }
        // A withdrawn offer ends the device's part (an abort); a held one
        // waits to be offered again (a pause). Either way the device no
        // longer points at the rollout.
        for (devices, member_change) in [
            (change.withdraw, "outcome = 'withdrawn'"),
            (change.hold, "offered_at = NULL"),
        ] {
            if devices.is_empty() {
                continue;
            }
            let devices = ids(devices);
            sqlx::query(&format!(
                "UPDATE rollout_devices SET {member_change}, changed_at = clock_timestamp() \
                 WHERE rollout_id = $1 AND device_id = ANY($2::text[]) AND outcome IS NULL"
            ))
            .bind(id)
            .bind(&devices)
            .execute(&mut *tx)
            .await
            .map_err(db(action))?;
            sqlx::query(
                "DELETE FROM device_targets WHERE device_id = ANY($1::text[]) AND rollout_id = $2",
            )
            .bind(&devices)
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(db(action))?;
        }
        if !change.accept_failures.is_empty() {
            sqlx::query(
                "UPDATE rollout_devices SET failure_accepted = TRUE, changed_at = clock_timestamp() \
                 WHERE rollout_id = $1 AND device_id = ANY($2::text[])",
            )
            .bind(id)
            .bind(ids(change.accept_failures))
            .execute(&mut *tx)
            .await
            .map_err(db(action))?;
        }
        tx.commit().await.map_err(db(action))?;
        Ok(true)
    }

    async fn rollout(&self, id: i64) -> StoreResult<Option<RolloutRecord>> {
        sqlx::query(&format!("{ROLLOUT_SELECT} WHERE r.id = $1"))
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

    async fn rollout_tallies(&self, only: Option<i64>) -> StoreResult<Vec<(i64, RolloutTally)>> {
        // The SQLite store's query (see there): classify() in SQL.
        let rows: Vec<(i64, i64, i64, i64, i64, i64, i64, i64)> = sqlx::query_as(&format!(
            "SELECT rollout_id, COUNT(*), \
                    COUNT(*) FILTER (WHERE standing = 'superseded'), \
                    COUNT(*) FILTER (WHERE standing = 'pending'), \
                    COUNT(*) FILTER (WHERE standing = 'in_progress'), \
                    COUNT(*) FILTER (WHERE standing = 'awaiting_reboot'), \
                    COUNT(*) FILTER (WHERE standing = 'succeeded'), \
                    COUNT(*) FILTER (WHERE standing = 'failed') \
             FROM (SELECT rd.rollout_id, CASE \
                     WHEN ({MEMBER_TARGET}) IS DISTINCT FROM rd.rollout_id THEN 'superseded' \
                     WHEN d.state IS NOT DISTINCT FROM 'idle' \
                          AND d.running_version IS NOT DISTINCT FROM r.release THEN 'succeeded' \
                     WHEN d.reported_target IS DISTINCT FROM r.release THEN 'pending' \
                     WHEN d.state IN ('failed', 'rolled_back') THEN 'failed' \
                     WHEN d.state = 'awaiting_reboot' THEN 'awaiting_reboot' \
                     WHEN d.state IN ('downloading', 'verifying', 'reboot_pending', 'testing') \
                          THEN 'in_progress' \
                     ELSE 'pending' END AS standing \
                   FROM {MEMBERS_WITH_DEVICES} \
                   JOIN rollouts r ON r.id = rd.rollout_id \
                   {only_one}) s \
             GROUP BY rollout_id \
             UNION ALL \
             SELECT r.id, COUNT(*), 0, COUNT(*), 0, 0, 0, 0 FROM {PENDING_MEMBERS} {only_pending} \
             GROUP BY r.id ORDER BY 1",
            only_one = if only.is_some() {
                "WHERE rd.rollout_id = $1"
            } else {
                ""
            },
            only_pending = if only.is_some() { "AND r.id = $1" } else { "" },
        ))
        .bind(only)
        .fetch_all(&self.pool)
        .await
        .map_err(db("counting the devices of rollouts"))?;
        let n = |v: i64| v.max(0) as u64;
        Ok(rows
            .into_iter()
            .map(
                |(id, total, superseded, pending, working, awaiting, succeeded, failed)| {
                    let counts = uplift_proto::api::RolloutCounts {
                        pending: n(pending),
                        in_progress: n(working) + n(awaiting),
                        succeeded: n(succeeded),
                        failed: n(failed),
                        awaiting_reboot: n(awaiting),
                    };
                    let tally = RolloutTally {
                        counts,
                        superseded: n(superseded),
                        total: n(total),
                    };
                    (id, tally)
                },
            )
            .collect())
    }
}

/// Serializes changes to rollout memberships until the transaction ends.
async fn lock_memberships(
    tx: &mut sqlx::Transaction<'static, Postgres>,
    action: &'static str,
) -> StoreResult<()> {
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(MEMBERSHIP_LOCK)
        .execute(&mut **tx)
        .await
        .map_err(db(action))?;
    Ok(())
}

async fn insert_tags(
    tx: &mut sqlx::Transaction<'static, Postgres>,
    device: &DeviceId,
    tags: Vec<String>,
    action: &'static str,
) -> StoreResult<()> {
    if tags.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO device_tags (device_id, tag) SELECT $1, unnest($2::text[]) \
         ON CONFLICT DO NOTHING",
    )
    .bind(device.as_str())
    .bind(tags)
    .execute(&mut **tx)
    .await
    .map_err(db(action))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;

    /// The store's connections compile no query with LLVM, whatever the
    /// server's default: its statements are short.
    #[tokio::test]
    async fn the_stores_connections_run_without_jit() {
        let Some(pg) = uplift_sim::postgres::TestPostgres::start() else {
            return;
        };
        let store = PgStore::connect(&pg.create_database("no_jit").unwrap(), 2)
            .await
            .unwrap();
        let jit: String = sqlx::query_scalar("SHOW jit")
            .fetch_one(store.pool())
            .await
            .unwrap();
        assert_eq!(jit, "off");
    }

    /// A database made before device targets had their own table keeps
    /// every device's target: migration 0008 carries the column over.
    #[tokio::test]
    async fn targets_stored_in_the_devices_table_survive_the_move_to_their_own() {
        let Some(pg) = uplift_sim::postgres::TestPostgres::start() else {
            return;
        };
        let url = pg.create_database("targets_move").unwrap();
        let pool = PgPoolOptions::new().connect(&url).await.unwrap();
        let mut before = sqlx::migrate::Migrator::new(std::path::Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/migrations/postgres"
        )))
        .await
        .unwrap();
        before.migrations = before
            .migrations
            .iter()
            .filter(|m| m.version < 8)
            .cloned()
            .collect::<Vec<_>>()
            .into();
        before.run(&pool).await.unwrap();
        sqlx::raw_sql(
            "INSERT INTO releases (version, device_type, manifest, image_size, image_sha256, chunks, \
                                   stored_bytes, created_at) VALUES ('1.1', 'gw', '\\x7b7d', 1, '', 1, 1, now()); \
             INSERT INTO rollouts (release, allow_downgrade, created_at, policy, state, state_name) \
             VALUES ('1.1', false, now(), '{}', '{}', 'running'); \
             INSERT INTO devices (id, device_type, hardware_id, public_key, enrolled_at, target_rollout) \
             VALUES ('dev-offered', 'gw', 'hw-1', 'key-1', now(), 1), \
                    ('dev-waiting', 'gw', 'hw-2', 'key-2', now(), NULL); \
             INSERT INTO rollout_devices (rollout_id, device_id, offered_at) \
             VALUES (1, 'dev-offered', now()), (1, 'dev-waiting', NULL);",
        )
        .execute(&pool)
        .await
        .unwrap();
        pool.close().await;

        let store = PgStore::connect(&url, 2).await.unwrap();
        let target = |id: &'static str| {
            let store = store.clone();
            async move {
                store
                    .device(&id.parse().unwrap())
                    .await
                    .unwrap()
                    .unwrap()
                    .target_rollout
            }
        };
        assert_eq!(target("dev-offered").await, Some(1));
        assert_eq!(target("dev-waiting").await, None);
        let targets = store.device_targets().await.unwrap();
        assert_eq!(targets.len(), 1);
        assert_eq!(targets[0].0.as_str(), "dev-offered");
        assert_eq!(targets[0].1.rollout_id, 1);
    }
}
