//! Persistent server state behind one trait, so that PostgreSQL can be added
//! beside SQLite without touching any caller.

mod sqlite;

pub use sqlite::SqliteStore;

use async_trait::async_trait;
pub use uplift_proto::api::DownloadLimits;
use uplift_proto::channel::{AgentState, Progress, Report};
use uplift_proto::{DeviceId, DeviceType, ErrorKind, HardwareId, SlotName, Version, WireError};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error while {action}: {source}; {}", hint(source))]
    Database {
        action: &'static str,
        #[source]
        source: sqlx::Error,
    },
    /// Contention, not damage: every connection was busy for too long.
    #[error("database busy while {action}: {source}; the server is overloaded, try again shortly")]
    Busy {
        action: &'static str,
        #[source]
        source: sqlx::Error,
    },
    #[error("stored {what} is corrupt: {detail}")]
    Corrupt { what: &'static str, detail: String },
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    NotFound(String),
}

impl StoreError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            StoreError::Database { .. } | StoreError::Corrupt { .. } => ErrorKind::Storage,
            StoreError::Busy { .. } => ErrorKind::ServerBusy,
            StoreError::Conflict(_) => ErrorKind::Conflict,
            StoreError::NotFound(_) => ErrorKind::NotFound,
        }
    }
}

/// What to check, from what SQLite said; most errors are not a full disk.
fn hint(source: &sqlx::Error) -> &'static str {
    let code = match source {
        sqlx::Error::Database(e) => e.code(),
        sqlx::Error::Io(_) => return "check the server's data directory (disk full? permissions?)",
        _ => None,
    };
    // SQLite's primary result codes (the low byte of extended ones).
    match code.and_then(|c| c.parse::<i64>().ok()).map(|c| c & 0xff) {
        Some(13) => "the disk holding the server's data directory is full; free space",
        Some(8 | 14 | 23) => "check the permissions of the server's data directory and uplift.db",
        Some(10) => "the disk under the server's data directory reported an I/O error; check it",
        Some(11 | 26) => "uplift.db is damaged; restore it from a backup",
        Some(5 | 6) => "the database is locked by another process; is a second server using this data directory?",
        _ => "see the server log",
    }
}

/// Sorts a sqlx error into contention (retry) or a real failure.
pub(crate) fn classify(action: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
    move |source| match source {
        sqlx::Error::PoolTimedOut => StoreError::Busy { action, source },
        source => StoreError::Database { action, source },
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// A device's live state as the database keeps it (see [`crate::live`]).
#[derive(Debug, Clone, PartialEq)]
pub struct ReportedState {
    pub id: DeviceId,
    /// `None` if the device has not reported since the server started.
    pub report: Option<Report>,
    pub last_seen: Option<String>,
}

#[derive(Debug, Clone)]
pub struct NewDevice {
    pub id: DeviceId,
    pub device_type: DeviceType,
    pub hardware_id: HardwareId,
    pub public_key: String,
    pub enrolled_at: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DeviceRecord {
    pub id: DeviceId,
    pub device_type: DeviceType,
    pub hardware_id: HardwareId,
    pub public_key: String,
    pub enrolled_at: String,
    pub last_seen: Option<String>,
    pub running_version: Option<Version>,
    pub state: Option<AgentState>,
    pub booted_slot: Option<SlotName>,
    pub reported_target: Option<Version>,
    pub progress: Option<Progress>,
    pub last_error: Option<WireError>,
    pub target_rollout: Option<i64>,
}

#[derive(Debug, Clone)]
pub struct ReleaseRecord {
    pub version: Version,
    pub device_type: DeviceType,
    pub manifest_json: Vec<u8>,
    pub image_size: u64,
    pub image_sha256: String,
    pub chunks: u64,
    pub stored_bytes: u64,
    pub created_at: String,
}

#[derive(Debug, Clone)]
pub struct RolloutRecord {
    pub id: i64,
    pub release: Version,
    pub device_type: DeviceType,
    pub allow_downgrade: bool,
    pub limits: DownloadLimits,
    pub created_at: String,
}

/// What a device should run, as decided by the newest rollout targeting it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceTarget {
    pub rollout_id: i64,
    pub version: Version,
    pub allow_downgrade: bool,
    pub limits: DownloadLimits,
}

#[async_trait]
pub trait Store: Send + Sync + std::fmt::Debug {
    async fn insert_device(&self, device: &NewDevice) -> StoreResult<()>;
    async fn device(&self, id: &DeviceId) -> StoreResult<Option<DeviceRecord>>;
    async fn device_by_public_key(&self, public_key: &str) -> StoreResult<Option<DeviceRecord>>;
    async fn list_devices(&self) -> StoreResult<Vec<DeviceRecord>>;
    async fn count_devices(&self) -> StoreResult<u64>;
    async fn devices_of_type(&self, device_type: &DeviceType) -> StoreResult<Vec<DeviceId>>;
    /// Writes many devices' live state in one transaction; returns the rows written.
    async fn record_reports(&self, states: &[ReportedState]) -> StoreResult<u64>;
    /// What every targeted device should run (read once at start).
    async fn device_targets(&self) -> StoreResult<Vec<(DeviceId, DeviceTarget)>>;

    /// Fails with `Conflict` if the version exists.
    async fn insert_release(&self, release: &ReleaseRecord) -> StoreResult<()>;
    async fn release(&self, version: &Version) -> StoreResult<Option<ReleaseRecord>>;
    async fn list_releases(&self) -> StoreResult<Vec<ReleaseRecord>>;

    /// Creates the rollout and points every listed device at it, atomically.
    async fn create_rollout(
        &self,
        release: &ReleaseRecord,
        devices: &[DeviceId],
        allow_downgrade: bool,
        limits: DownloadLimits,
        now: &str,
    ) -> StoreResult<RolloutRecord>;
    async fn rollout(&self, id: i64) -> StoreResult<Option<RolloutRecord>>;
    async fn list_rollouts(&self) -> StoreResult<Vec<RolloutRecord>>;
    /// Devices a rollout was started on, with their current records.
    async fn rollout_devices(&self, id: i64) -> StoreResult<Vec<DeviceRecord>>;
    /// [`Store::rollout_devices`] of every rollout at once, as (rollout id,
    /// device) by rollout id, then device id: one query for a list of
    /// rollouts instead of one per rollout.
    async fn all_rollout_devices(&self) -> StoreResult<Vec<(i64, DeviceRecord)>>;
}
