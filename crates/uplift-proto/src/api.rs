//! Bodies and paths of the admin REST API (`/api/v1/...`) and the device
//! download endpoints. The CLI, the demo and the tests all speak this.

use crate::channel::{AgentState, Progress};
use crate::error::WireError;
use crate::names::{ChunkHash, DeviceId, DeviceType, HardwareId, SlotName, Tag, Version};
use serde::{Deserialize, Serialize};
use std::num::{NonZeroU32, NonZeroU64};

pub const DEVICES_PATH: &str = "/api/v1/devices";
pub const RELEASES_PATH: &str = "/api/v1/releases";
pub const ROLLOUTS_PATH: &str = "/api/v1/rollouts";
pub const STATS_PATH: &str = "/api/v1/stats";
/// The fleet at a glance ([`FleetSummary`]).
pub const FLEET_PATH: &str = "/api/v1/fleet";
/// What starting a rollout would do, without starting it ([`RolloutPreview`]).
pub const ROLLOUT_PREVIEW_PATH: &str = "/api/v1/rollouts/preview";
/// Prometheus metrics (OpenMetrics text), behind the admin token.
pub const METRICS_PATH: &str = "/metrics";
pub const MISSING_CHUNKS_PATH: &str = "/api/v1/chunks/missing";
pub const HEALTH_PATH: &str = "/healthz";
/// Checks a device download token and answers 204 (valid) or 401, with no
/// body: what a site cache asks (nginx `auth_request`) before it serves a
/// cached chunk to a device.
pub const DEVICE_AUTHORIZE_PATH: &str = "/v1/device/authorize";
/// The admin API's OpenAPI document, served without a token.
pub const OPENAPI_PATH: &str = "/api/v1/openapi.json";

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

/// One device (`GET`).
pub fn device_path(id: &DeviceId) -> String {
    format!("{DEVICES_PATH}/{id}")
}

/// A device's tags (`PUT` a [`TagChange`]).
pub fn device_tags_path(id: &DeviceId) -> String {
    format!("{DEVICES_PATH}/{id}/tags")
}

/// A device's history (`GET`, newest first; `?limit=&before=`).
pub fn device_history_path(id: &DeviceId) -> String {
    format!("{DEVICES_PATH}/{id}/history")
}

/// Devices or events on one page when the request does not say.
pub const DEFAULT_PAGE_LIMIT: u32 = 100;
/// Most devices or events one page may hold.
pub const MAX_PAGE_LIMIT: u32 = 1000;

/// `GET /api/v1/devices` query: every filter given must hold. Pages are
/// in device ID order; pass a page's `next` as `after` for the next one.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(
    feature = "openapi",
    derive(utoipa::IntoParams),
    into_params(parameter_in = Query)
)]
pub struct DeviceQuery {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_type: Option<DeviceType>,
    /// The version the device runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<Version>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<AgentState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<Tag>,
    /// Connected now (true) or not (false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub online: Option<bool>,
    /// Text found anywhere in the device ID or the hardware ID (ASCII
    /// letters compare case-insensitively).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(
        feature = "openapi",
        param(max_length = 128, pattern = r"^[^\u0000-\u001f\u007f-\u009f]*$")
    )]
    pub q: Option<String>,
    /// RFC 3339. Last seen before this time, or never; a connected device
    /// counts as seen now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", param(format = DateTime))]
    pub seen_before: Option<String>,
    /// RFC 3339. Last seen after this time (a connected device counts as
    /// seen now).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", param(format = DateTime))]
    pub seen_after: Option<String>,
    /// The `next` of the previous page (a device ID).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", param(value_type = Option<DeviceId>))]
    pub after: Option<String>,
    /// 1 to [`MAX_PAGE_LIMIT`], default [`DEFAULT_PAGE_LIMIT`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", param(minimum = 1, maximum = 1000))]
    pub limit: Option<u32>,
}

/// One page of devices.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DevicePage {
    pub devices: Vec<DeviceView>,
    /// Where the next page starts (`after`); `None` on the last page. A
    /// page may hold fewer devices than asked for and still have a next.
    pub next: Option<String>,
}

/// `PUT /api/v1/devices/{id}/tags`: the device's tags become `set` (or
/// stay as they are without it), less `remove`, plus `add`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TagChange {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub set: Option<Vec<Tag>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<Tag>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub add: Vec<Tag>,
}

/// Devices a rollout targets by their tags: `{"any": [..]}` (at least one
/// of them) or `{"all": [..]}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum TagSelector {
    Any(Vec<Tag>),
    All(Vec<Tag>),
}

impl TagSelector {
    pub fn tags(&self) -> &[Tag] {
        match self {
            TagSelector::Any(tags) | TagSelector::All(tags) => tags,
        }
    }

    /// Whether a device with `tags` is selected.
    pub fn matches(&self, tags: &[Tag]) -> bool {
        match self {
            TagSelector::Any(wanted) => wanted.iter().any(|t| tags.contains(t)),
            TagSelector::All(wanted) => wanted.iter().all(|t| tags.contains(t)),
        }
    }
}

impl std::fmt::Display for TagSelector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (mode, tags) = match self {
            TagSelector::Any(tags) => ("any of", tags),
            TagSelector::All(tags) => ("all of", tags),
        };
        let names: Vec<&str> = tags.iter().map(Tag::as_str).collect();
        write!(f, "{mode} the tags {}", names.join(", "))
    }
}

/// One entry of a device's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DeviceEvent {
    /// Grows with every event the server records; `before` pages by it.
    pub id: i64,
    /// RFC 3339, when the server learned of it.
    pub at: String,
    #[serde(flatten)]
    pub event: DeviceEventKind,
}

/// What happened, as the server saw it: offers are the server's own
/// decisions, the rest is read from the device's reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum DeviceEventKind {
    /// A rollout offered the device a release.
    Offer { rollout_id: i64, version: Version },
    /// The rollout took its offer back (an abort).
    Withdrawn { rollout_id: i64 },
    DownloadStarted {
        version: Version,
        /// The image's size, if the device said it yet.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        total_bytes: Option<u64>,
    },
    /// Every chunk is in the inactive slot. `fetched_bytes` came from the
    /// server (compressed, in this attempt); `reused_bytes` is the rest of
    /// the image, taken from the running slot, a journal of an earlier
    /// attempt or made from patches (image bytes less those fetched, so an
    /// estimate where fetched chunks were compressed).
    DownloadFinished {
        version: Version,
        total_bytes: u64,
        fetched_bytes: u64,
        reused_bytes: u64,
    },
    /// The release is written to `slot` and verified; it is tried at the
    /// next boot.
    Installed { version: Version, slot: SlotName },
    /// The device came back from a reboot (into a trial, or back to its
    /// old slot after one).
    Reboot {
        from_slot: SlotName,
        to_slot: SlotName,
        running_version: Version,
    },
    /// The trial boot passed its health check; the device stays on it.
    Committed { version: Version, slot: SlotName },
    /// The trial of `version` failed and the device is back on `running_version`.
    RolledBack {
        version: Option<Version>,
        running_version: Version,
        error: Option<WireError>,
    },
    /// An attempt at `version` failed.
    Error {
        version: Option<Version>,
        error: WireError,
    },
    /// An operator removed (decommissioned) the device; `by` names them.
    Removed { by: String },
}

impl DeviceEventKind {
    pub fn name(&self) -> &'static str {
        match self {
            DeviceEventKind::Offer { .. } => "offer",
            DeviceEventKind::Withdrawn { .. } => "withdrawn",
            DeviceEventKind::DownloadStarted { .. } => "download_started",
            DeviceEventKind::DownloadFinished { .. } => "download_finished",
            DeviceEventKind::Installed { .. } => "installed",
            DeviceEventKind::Reboot { .. } => "reboot",
            DeviceEventKind::Committed { .. } => "committed",
            DeviceEventKind::RolledBack { .. } => "rolled_back",
            DeviceEventKind::Error { .. } => "error",
            DeviceEventKind::Removed { .. } => "removed",
        }
    }
}

/// `GET /api/v1/devices/{id}/history` query.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(
    feature = "openapi",
    derive(utoipa::IntoParams),
    into_params(parameter_in = Query)
)]
pub struct HistoryQuery {
    /// 1 to [`MAX_PAGE_LIMIT`], default [`DEFAULT_PAGE_LIMIT`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", param(minimum = 1, maximum = 1000))]
    pub limit: Option<u32>,
    /// Only events older than this event id (the previous page's `next`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", param(minimum = 1))]
    pub before: Option<i64>,
}

/// One page of a device's history, newest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DeviceHistory {
    pub device: DeviceId,
    pub events: Vec<DeviceEvent>,
    /// `before` for the next (older) page; `None` when there is none.
    pub next: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
    /// The operator's tags, in order.
    #[serde(default)]
    pub tags: Vec<Tag>,
    /// The slot it booted, as it last reported; `None` before its first report.
    #[serde(default)]
    pub slot: Option<SlotName>,
    /// `IP:port` of the TCP connection its newest channel came over (an
    /// IPv6 address in brackets), kept while it is offline; `None` if it
    /// has not connected since the server recorded addresses. Behind a
    /// proxy or NAT this is the proxy's or the NAT's address.
    #[serde(default)]
    pub address: Option<String>,
    /// RFC 3339; when an operator removed (decommissioned) the device. A
    /// removed device is kept, with its history, but is no longer listed,
    /// and its key is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub removed_at: Option<String>,
    /// Its private-network addresses, one per pool the server assigns from
    /// (`[addresses] pool`), in CIDR form (`10.77.0.5/16`), IPv4 first;
    /// empty if the server has no pools or the device has not connected
    /// since they were configured. Not where it connects from (`address`).
    #[serde(default)]
    pub private_addresses: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
    /// The key IDs its manifest's signatures name, in the manifest's order.
    /// The server holds no release keys and does not check the signatures
    /// (agents do); empty for releases uploaded before servers kept them.
    #[serde(default)]
    pub key_ids: Vec<String>,
    /// RFC 3339, from the manifest: devices refuse the release from then
    /// on. `None` for releases uploaded before servers kept it.
    #[serde(default)]
    pub expires_at: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MissingChunksRequest {
    pub chunks: Vec<ChunkHash>,
    /// Patches of the release, by digest.
    #[serde(default)]
    pub patches: Vec<ChunkHash>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MissingChunksResponse {
    pub missing: Vec<ChunkHash>,
    #[serde(default)]
    pub missing_patches: Vec<ChunkHash>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RolloutCreate {
    pub release: Version,
    /// Devices to target; `None` means every device of the release's type
    /// (or, with `tags`, those of them with the tags).
    pub devices: Option<Vec<DeviceId>>,
    /// Only devices of the release's type with these tags; not with `devices`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<TagSelector>,
    /// Only devices running one of these versions (any when empty).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from_versions: Vec<Version>,
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
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DownloadLimits {
    /// Each device's download rate cap (bytes/s), sent in the offer; the
    /// agent keeps to the lower of this and its own cap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<u64>, minimum = 1))]
    pub max_bytes_per_sec: Option<NonZeroU64>,
    /// At most this many of the rollout's devices download at once; the
    /// others are told to wait and are offered the release in turn.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<u32>, minimum = 1))]
    pub max_downloading: Option<NonZeroU32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
    /// The tags it was started on, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<TagSelector>,
    /// The versions its devices had to run, if it was limited to some.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from_versions: Vec<Version>,
}

/// Devices that moved between two rollouts: another rollout, and how many.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RolloutShare {
    pub rollout_id: i64,
    pub devices: u64,
}

/// A phased rollout's engine state, as the operator sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RolloutProgress {
    /// `running`, `awaiting_approval`, `paused`, `aborted` or `finished`.
    pub state: String,
    /// The phase running, waiting for approval or paused (0-based); the
    /// final phase (for the rest) is `phases - 1`.
    pub phase: Option<u32>,
    pub phases: u32,
    /// Devices in each phase, in order.
    pub phase_sizes: Vec<u64>,
    /// Where each phase's devices stand, in order (the progress bars of
    /// `uplift rollout status --watch`).
    #[serde(default)]
    pub phase_tallies: Vec<PhaseTally>,
    /// Why it paused, in a sentence naming the devices and their errors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused_because: Option<String>,
    /// The whole engine state and policy, as stored.
    pub detail: serde_json::Value,
    pub policy: crate::policy::RolloutPolicy,
}

/// One device's part in a rollout: `GET /api/v1/rollouts/{id}/devices`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RolloutMember {
    pub device_id: DeviceId,
    pub hardware_id: HardwareId,
    /// Its phase, decided when the rollout started (0-based; the last is
    /// the final phase).
    pub phase: u32,
    /// When the rollout offered it the release, if it has.
    pub offered_at: Option<String>,
    /// How its part ended: `succeeded`, `failed`, `timed_out`,
    /// `superseded` or `withdrawn`; absent while it has not.
    pub outcome: Option<String>,
    /// What the device reported when it failed.
    pub error: Option<String>,
    pub running_version: Option<Version>,
    pub state: Option<AgentState>,
}

/// `GET /api/v1/rollouts/{id}/devices` query: one page of the rollout's
/// devices, in phase order and by device ID within a phase.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(
    feature = "openapi",
    derive(utoipa::IntoParams),
    into_params(parameter_in = Query)
)]
pub struct RolloutMemberQuery {
    /// Only this phase's devices (0-based; the final phase is the last).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<u32>,
    /// Only devices whose part ended so, or `unfinished`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<MemberOutcome>,
    /// The `next` of the previous page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<String>,
    /// 1 to [`MAX_PAGE_LIMIT`], default [`DEFAULT_PAGE_LIMIT`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", param(minimum = 1, maximum = 1000))]
    pub limit: Option<u32>,
}

/// How a device's part in a rollout ended, as a filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum MemberOutcome {
    Succeeded,
    Failed,
    TimedOut,
    Superseded,
    Withdrawn,
    /// Not ended yet: not offered, or offered and still working.
    Unfinished,
}

impl MemberOutcome {
    /// The stored outcome's name; `None` for [`MemberOutcome::Unfinished`].
    pub fn stored(self) -> Option<&'static str> {
        match self {
            MemberOutcome::Succeeded => Some("succeeded"),
            MemberOutcome::Failed => Some("failed"),
            MemberOutcome::TimedOut => Some("timed_out"),
            MemberOutcome::Superseded => Some("superseded"),
            MemberOutcome::Withdrawn => Some("withdrawn"),
            MemberOutcome::Unfinished => None,
        }
    }
}

/// One page of a rollout's devices.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RolloutMemberPage {
    pub devices: Vec<RolloutMember>,
    /// `after` for the next page; `None` on the last.
    pub next: Option<String>,
}

/// One phase's devices as the rollout's record of them says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PhaseTally {
    pub devices: u64,
    /// Offered the release so far (finished or not).
    pub offered: u64,
    pub succeeded: u64,
    /// Failed, rolled back or timed out.
    pub failed: u64,
}

/// An operator's command to a rollout: `POST /api/v1/rollouts/{id}/{command}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum RolloutCommandName {
    Pause,
    Resume,
    Approve,
    Abort,
    /// Starts a new rollout, with the same release and policy, of the
    /// devices that failed or timed out in this one (201, the new rollout).
    Retry,
}

/// What `POST /api/v1/rollouts` would start with the same body, from
/// `POST /api/v1/rollouts/preview`: nothing is stored, offered or audited.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RolloutPreview {
    pub release: Version,
    pub device_type: DeviceType,
    /// The devices it would target now.
    pub devices_total: u64,
    /// Devices in each phase, in order, the final phase last: what
    /// `progress.phase_sizes` of the started rollout would be. Which
    /// devices fall in which phase is decided by a seed that includes the
    /// moment a rollout starts, so a started rollout may put other devices
    /// in a phase than a preview would; the sizes are the same.
    pub phase_sizes: Vec<u64>,
    /// What the operator may want to know before starting it, in sentences
    /// (devices offline, phases left empty, ...); absent when nothing.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// The fleet at a glance: `GET /api/v1/fleet`. Counted by the database
/// (so it lags what devices report by the server's write interval, a
/// quarter of a second unless the database falls behind), connected
/// devices by the server's sessions now.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct FleetSummary {
    /// Enrolled devices.
    pub devices_total: u64,
    /// Of them, connected now.
    pub online: u64,
    /// Devices in state `failed`: their last attempt failed.
    pub failing: u64,
    /// Devices in state `rolled_back`: a trial boot failed and they are
    /// back on their previous slot.
    pub rolled_back: u64,
    /// Devices a rollout still counts as pending or in progress (the sum of
    /// `counts.pending + counts.in_progress` over every rollout): offered
    /// a release or waiting for their phase, not yet running it and not
    /// failed on it.
    pub in_rollout: u64,
    /// Devices by the version they run, most devices first.
    pub by_version: Vec<VersionCount>,
    /// Devices by state, most devices first.
    pub by_state: Vec<StateCount>,
    /// Devices by type, most devices first.
    pub by_device_type: Vec<DeviceTypeCount>,
}

/// Devices running one version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct VersionCount {
    /// `None`: enrolled, and never said what it runs.
    pub version: Option<Version>,
    pub devices: u64,
    /// Of them, connected now.
    pub online: u64,
}

/// Devices in one state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct StateCount {
    /// `None`: enrolled, and never reported.
    pub state: Option<AgentState>,
    pub devices: u64,
}

/// Devices of one type.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DeviceTypeCount {
    pub device_type: DeviceType,
    pub devices: u64,
    /// Of them, connected now.
    pub online: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ServerStats {
    /// Enrolled devices not removed: counted at most once a second by each
    /// server process, and at once after an enrollment or removal on it
    /// (with replicas, another's shows within a second).
    pub devices_total: u64,
    /// Devices with a channel open to this server process. With replicas,
    /// each holds its share; the fleet overview counts them all.
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

#[cfg(test)]
mod tests {
    use super::*;

    fn tags(list: &[&str]) -> Vec<Tag> {
        list.iter().map(|t| t.parse().unwrap()).collect()
    }

    #[test]
    fn a_tag_selector_is_one_word_for_its_mode_and_matches_by_it() {
        let any: TagSelector = serde_json::from_str(r#"{"any": ["canary", "berlin"]}"#).unwrap();
        assert_eq!(any, TagSelector::Any(tags(&["canary", "berlin"])));
        assert!(any.matches(&tags(&["berlin"])));
        let all = TagSelector::All(tags(&["canary", "berlin"]));
        assert!(!all.matches(&tags(&["berlin"])));
        assert!(all.matches(&tags(&["berlin", "x", "canary"])));
        assert_eq!(
            serde_json::to_value(&all).unwrap(),
            serde_json::json!({"all": ["canary", "berlin"]})
        );
        assert_eq!(all.to_string(), "all of the tags canary, berlin");
        assert!(serde_json::from_str::<TagSelector>(r#"{"some": ["a"]}"#).is_err());
        assert!(serde_json::from_str::<TagSelector>(r#"{"any": ["a b"]}"#).is_err());
    }

    #[test]
    fn a_device_event_is_flat_json_named_by_its_kind() {
        let event = DeviceEvent {
            id: 7,
            at: "2026-01-01T00:00:00Z".into(),
            event: DeviceEventKind::DownloadFinished {
                version: "1.1".parse().unwrap(),
                total_bytes: 100,
                fetched_bytes: 30,
                reused_bytes: 70,
            },
        };
        let json = serde_json::to_value(&event).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "id": 7, "at": "2026-01-01T00:00:00Z", "kind": "download_finished",
                "version": "1.1", "total_bytes": 100, "fetched_bytes": 30, "reused_bytes": 70
            })
        );
        assert_eq!(json["kind"], event.event.name());
        assert_eq!(serde_json::from_value::<DeviceEvent>(json).unwrap(), event);
    }

    #[test]
    fn a_preview_without_warnings_leaves_them_out() {
        let mut preview = RolloutPreview {
            release: "1.1".parse().unwrap(),
            device_type: "gw".parse().unwrap(),
            devices_total: 3,
            phase_sizes: vec![1, 2],
            warnings: Vec::new(),
        };
        let quiet = serde_json::json!({
            "release": "1.1", "device_type": "gw", "devices_total": 3, "phase_sizes": [1, 2]
        });
        assert_eq!(serde_json::to_value(&preview).unwrap(), quiet);
        assert_eq!(
            serde_json::from_value::<RolloutPreview>(quiet).unwrap(),
            preview
        );
        preview
            .warnings
            .push("2 of the 3 devices are offline now".into());
        assert_eq!(
            serde_json::to_value(&preview).unwrap()["warnings"],
            serde_json::json!(["2 of the 3 devices are offline now"])
        );
    }

    #[test]
    fn older_answers_without_the_new_fields_still_parse() {
        let device = serde_json::json!({
            "id": "dev-1", "device_type": "gw", "hardware_id": "hw", "online": false,
            "running_version": null, "state": null, "target_version": null, "rollout_id": null,
            "progress": null, "last_error": null, "enrolled_at": "then", "last_seen": null
        });
        let view: DeviceView = serde_json::from_value(device).unwrap();
        assert!(view.tags.is_empty());
        assert_eq!((view.slot, view.address), (None, None));
        let release = serde_json::json!({
            "version": "1.1", "device_type": "gw", "image_size": 1, "image_sha256": "00",
            "chunks": 1, "stored_bytes": 1, "created_at": "then"
        });
        let view: ReleaseView = serde_json::from_value(release).unwrap();
        assert_eq!((view.key_ids, view.expires_at), (vec![], None));
        let create: RolloutCreate =
            serde_json::from_str(r#"{"release": "1.1", "devices": null}"#).unwrap();
        assert_eq!((create.tags, create.from_versions), (None, vec![]));
    }
}
