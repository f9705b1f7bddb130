//! Bodies and paths of the admin REST API (`/api/v1/...`) and the device
//! download endpoints. The CLI, the demo and the tests all speak this.

use crate::channel::{AgentState, Progress};
use crate::error::WireError;
use crate::names::{ChunkHash, DeviceId, DeviceType, HardwareId, Version};
use serde::{Deserialize, Serialize};
use std::num::{NonZeroU32, NonZeroU64};

pub const DEVICES_PATH: &str = "/api/v1/devices";
pub const RELEASES_PATH: &str = "/api/v1/releases";
pub const ROLLOUTS_PATH: &str = "/api/v1/rollouts";
pub const STATS_PATH: &str = "/api/v1/stats";
/// Prometheus metrics (OpenMetrics text), behind the admin token.
pub const METRICS_PATH: &str = "/metrics";
pub const MISSING_CHUNKS_PATH: &str = "/api/v1/chunks/missing";
pub const HEALTH_PATH: &str = "/healthz";

/// Admin upload of one compressed chunk.
pub fn admin_chunk_path(hash: &ChunkHash) -> String {
    format!("/api/v1/chunks/{hash}")
}

/// Admin upload of one patch (`release create --delta-from`), named by its digest.
pub fn admin_patch_path(hash: &ChunkHash) -> String {
    format!("/api/v1/patches/{hash}")
}

/// Device download of patches `first..first + count` of a release's patch
/// list, their stored bytes back to back (like [`device_span_path`]).
pub fn device_patch_span_path(version: &Version, first: u64, count: u64) -> String {
    format!("/v1/device/releases/{version}/patches?first={first}&count={count}")
}

/// Admin upload of a release's binary chunk index, named by its digest.
pub fn admin_index_path(hash: &ChunkHash) -> String {
    format!("/api/v1/indexes/{hash}")
}

/// Device download of a release's binary chunk index.
pub fn device_index_path(version: &Version) -> String {
    format!("/v1/device/releases/{version}/index")
}

/// Device download of one compressed chunk (range-capable GET).
pub fn device_chunk_path(hash: &ChunkHash) -> String {
    format!("/v1/device/chunks/{hash}")
}

/// Device download of a release's signed manifest.
pub fn device_manifest_path(version: &Version) -> String {
    format!("/v1/device/releases/{version}/manifest")
}

/// Device download of a run of a release's chunks in one request: the
/// stored bytes of chunk entries `first..first + count` (manifest order),
/// back to back, so the agent splits them by the manifest's stored sizes.
pub fn device_span_path(version: &Version, first: u64, count: u64) -> String {
    format!("/v1/device/releases/{version}/chunks?first={first}&count={count}")
}

/// Most chunk entries one span request may ask for.
pub const MAX_SPAN_CHUNKS: u64 = 256;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceView {
    pub id: DeviceId,
    pub device_type: DeviceType,
    pub hardware_id: HardwareId,
    pub online: bool,
    pub running_version: Option<Version>,
    pub state: Option<AgentState>,
    pub target_version: Option<Version>,
    pub rollout_id: Option<i64>,
    pub progress: Option<Progress>,
    pub last_error: Option<WireError>,
    /// RFC 3339.
    pub enrolled_at: String,
    pub last_seen: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseView {
    pub version: Version,
    pub device_type: DeviceType,
    pub image_size: u64,
    pub image_sha256: String,
    pub chunks: u64,
    /// Sum of the compressed chunk sizes a device downloads at most.
    pub stored_bytes: u64,
    pub created_at: String,
    /// Chunks of this release the server found damaged or missing on its
    /// own disk since it started (repair: `uplift release upload` again).
    #[serde(default)]
    pub damaged_chunks: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MissingChunksRequest {
    pub chunks: Vec<ChunkHash>,
    /// Patches of the release, by digest.
    #[serde(default)]
    pub patches: Vec<ChunkHash>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MissingChunksResponse {
    pub missing: Vec<ChunkHash>,
    #[serde(default)]
    pub missing_patches: Vec<ChunkHash>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutCreate {
    pub release: Version,
    /// Devices to target; `None` means every device of the release's type.
    pub devices: Option<Vec<DeviceId>>,
    #[serde(default)]
    pub allow_downgrade: bool,
    #[serde(default)]
    pub limits: DownloadLimits,
    /// Phases, thresholds and windows; every device at once when absent.
    #[serde(default)]
    pub policy: crate::policy::RolloutPolicy,
}

/// Limits a rollout puts on its devices' downloads. Zero is refused when
/// parsed: a rollout that may not download at all is an abort, not a limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct DownloadLimits {
    /// Each device's download rate cap (bytes/s), sent in the offer; the
    /// agent keeps to the lower of this and its own cap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bytes_per_sec: Option<NonZeroU64>,
    /// At most this many of the rollout's devices download at once; the
    /// others are told to wait and are offered the release in turn.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_downloading: Option<NonZeroU32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RolloutCounts {
    /// Offered, not started (or offline).
    pub pending: u64,
    pub in_progress: u64,
    pub succeeded: u64,
    pub failed: u64,
    /// Of those in progress: written and verified, waiting for the
    /// rollout's reboot window to reboot into the release.
    #[serde(default)]
    pub awaiting_reboot: u64,
}

/// Where a rollout stands, derived from its devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutStatus {
    /// Some device is pending or in progress.
    Running,
    /// Every device still targeted by it succeeded or failed.
    Finished,
    /// Every device it targeted was moved to a newer rollout.
    Superseded,
}

impl RolloutStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RolloutStatus::Running => "running",
            RolloutStatus::Finished => "finished",
            RolloutStatus::Superseded => "superseded",
        }
    }
}

impl std::fmt::Display for RolloutStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutView {
    pub id: i64,
    pub release: Version,
    pub device_type: DeviceType,
    pub allow_downgrade: bool,
    pub created_at: String,
    pub devices_total: u64,
    pub counts: RolloutCounts,
    pub status: RolloutStatus,
    /// Targeted devices the server redirected to a newer rollout.
    pub superseded: u64,
    #[serde(default)]
    pub limits: DownloadLimits,
    /// Devices told to wait for a download turn (`limits.max_downloading`).
    #[serde(default)]
    pub waiting_for_turn: u64,
    /// Where the rollout's phases stand; absent for rollouts made before
    /// phased rollouts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<RolloutProgress>,
    /// Newer rollouts that took devices over from this one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub superseded_by: Vec<RolloutShare>,
    /// Older rollouts this one took devices over from.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub supersedes: Vec<RolloutShare>,
}

/// Devices that moved between two rollouts: another rollout, and how many.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutShare {
    pub rollout_id: i64,
    pub devices: u64,
}

/// A phased rollout's engine state, as the operator sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutProgress {
    /// `running`, `awaiting_approval`, `paused`, `aborted` or `finished`.
    pub state: String,
    /// The phase running, waiting for approval or paused (0-based); the
    /// final phase (for the rest) is `phases - 1`.
    pub phase: Option<u32>,
    pub phases: u32,
    /// Devices in each phase, in order.
    pub phase_sizes: Vec<u64>,
    /// Why it paused, in a sentence naming the devices and their errors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused_because: Option<String>,
    /// The whole engine state and policy, as stored.
    pub detail: serde_json::Value,
    pub policy: crate::policy::RolloutPolicy,
}

/// An operator's command to a rollout: `POST /api/v1/rollouts/{id}/{command}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutCommandName {
    Pause,
    Resume,
    Approve,
    Abort,
    /// Starts a new rollout, with the same release and policy, of the
    /// devices that failed or timed out in this one (201, the new rollout).
    Retry,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ServerStats {
    pub devices_total: u64,
    pub devices_online: u64,
    /// Chunk and manifest bytes sent to devices since the server started.
    pub bytes_sent: u64,
    pub chunks_sent: u64,
    /// Device reports applied to the server's live view since it started.
    #[serde(default)]
    pub reports_applied: u64,
    /// Reports refused because a newer session of the same device had
    /// already spoken (a replaced channel's backlog).
    #[serde(default)]
    pub reports_stale: u64,
    /// Device rows written to the database, and in how many transactions.
    #[serde(default)]
    pub device_rows_written: u64,
    #[serde(default)]
    pub write_batches: u64,
    /// Device rows changed in memory and not yet written: a number that
    /// keeps growing means the database cannot keep up.
    #[serde(default)]
    pub device_rows_pending: u64,
    /// Manifest and chunk downloads being served right now.
    #[serde(default)]
    pub downloads_in_flight: u64,
}

/// What a started server tells its operator, written by
/// `uplift-server --ready-file` once it listens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerEndpoint {
    /// Where devices connect (and the admin API too, unless `admin_url`).
    pub url: String,
    /// Where the admin API is served when it has a listener of its own.
    #[serde(default)]
    pub admin_url: Option<String>,
    pub ca_file: std::path::PathBuf,
    /// SHA-256 of the CA certificate, colon-separated hex.
    pub ca_fingerprint: String,
    /// Set when the token was generated into the data directory.
    pub admin_token_file: Option<std::path::PathBuf>,
    pub enrollment_token_file: Option<std::path::PathBuf>,
}
