//! Persistent server state behind one trait, so that PostgreSQL can be added
//! beside SQLite without touching any caller.

mod sqlite;

pub use sqlite::SqliteStore;

use async_trait::async_trait;
use uplift_proto::channel::{AgentState, Progress, Report};
use uplift_proto::{DeviceId, DeviceType, ErrorKind, HardwareId, SlotName, Version, WireError};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error while {action}: {source}; check the server's data directory (disk full? permissions?)")]
    Database {
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
            StoreError::Conflict(_) => ErrorKind::Conflict,
            StoreError::NotFound(_) => ErrorKind::NotFound,
        }
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

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
    pub created_at: String,
}

/// What a device should run, as decided by the newest rollout targeting it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceTarget {
    pub rollout_id: i64,
    pub version: Version,
    pub allow_downgrade: bool,
}

#[async_trait]
pub trait Store: Send + Sync + std::fmt::Debug {
    async fn insert_device(&self, device: &NewDevice) -> StoreResult<()>;
    async fn device(&self, id: &DeviceId) -> StoreResult<Option<DeviceRecord>>;
    async fn device_by_public_key(&self, public_key: &str) -> StoreResult<Option<DeviceRecord>>;
    async fn list_devices(&self) -> StoreResult<Vec<DeviceRecord>>;
    async fn devices_of_type(&self, device_type: &DeviceType) -> StoreResult<Vec<DeviceId>>;
    async fn record_report(&self, id: &DeviceId, report: &Report, now: &str) -> StoreResult<()>;
    async fn touch_device(&self, id: &DeviceId, now: &str) -> StoreResult<()>;
    async fn device_target(&self, id: &DeviceId) -> StoreResult<Option<DeviceTarget>>;

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
        now: &str,
    ) -> StoreResult<RolloutRecord>;
    async fn rollout(&self, id: i64) -> StoreResult<Option<RolloutRecord>>;
    async fn list_rollouts(&self) -> StoreResult<Vec<RolloutRecord>>;
    /// Devices a rollout was started on, with their current records.
    async fn rollout_devices(&self, id: i64) -> StoreResult<Vec<DeviceRecord>>;
}
