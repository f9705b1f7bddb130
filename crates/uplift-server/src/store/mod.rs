//! Persistent server state behind one trait, so that PostgreSQL can be added
//! beside SQLite without touching any caller.

pub mod control;
mod postgres;
pub mod roots;
mod sqlite;
pub(crate) mod stamp;

pub use stamp::Timestamp;

pub use control::ControlStore;
pub use roots::{RootRecord, RootStore};

pub use postgres::PgStore;
pub use sqlite::SqliteStore;

use crate::rollout::engine::{Outcome, RolloutState};
use async_trait::async_trait;
use time::OffsetDateTime;
use uplift_proto::api::{DeviceEvent, DeviceEventKind, TagSelector};
pub use uplift_proto::api::{DownloadLimits, PhaseTally};
use uplift_proto::channel::{AgentState, Progress, Report};
use uplift_proto::policy::RolloutPolicy;
use uplift_proto::{
    DeviceId, DeviceType, ErrorKind, HardwareId, SlotName, Tag, Version, WireError,
};

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
    /// The schema could not be brought up to date; nothing was served.
    #[error("migrating the {backend} database failed: {source}; the database is left as the last migration that succeeded made it: fix the cause and start the server again")]
    Migration {
        backend: &'static str,
        #[source]
        source: sqlx::migrate::MigrateError,
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
            StoreError::Database { .. }
            | StoreError::Corrupt { .. }
            | StoreError::Migration { .. } => ErrorKind::Storage,
            StoreError::Busy { .. } => ErrorKind::ServerBusy,
            StoreError::Conflict(_) => ErrorKind::Conflict,
            StoreError::NotFound(_) => ErrorKind::NotFound,
        }
    }
}

/// What to check, from what the database said; most errors are not a full disk.
fn hint(source: &sqlx::Error) -> &'static str {
    if let Some(hint) = postgres_hint(source) {
        return hint;
    }
    let code = match source {
        sqlx::Error::Database(e) => e.code(),
        sqlx::Error::Io(_) => {
            return "check the server's data directory (disk full? permissions?), or on PostgreSQL that it is reachable"
        }
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

/// What to check, from PostgreSQL's SQLSTATE class; `None` if the error is
/// not PostgreSQL's.
fn postgres_hint(source: &sqlx::Error) -> Option<&'static str> {
    let e = match source {
        sqlx::Error::Database(e) => e.try_downcast_ref::<sqlx::postgres::PgDatabaseError>()?,
        _ => return None,
    };
    Some(match &e.code()[..2] {
        "28" => "PostgreSQL refused the server's credentials; check [database] url",
        "3D" => "the database in [database] url does not exist; create it",
        "42" if e.code() == "42501" => {
            "the database user lacks a privilege; grant it on the database"
        }
        "53" => "PostgreSQL is out of a resource (disk, memory or connections); see its log",
        "57" | "08" => "PostgreSQL shut down or the connection broke; check it is running",
        _ => "see the server log and PostgreSQL's",
    })
}

/// Sorts a sqlx error into contention (retry) or a real failure.
pub(crate) fn classify(action: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
    move |source| match source {
        sqlx::Error::PoolTimedOut => StoreError::Busy { action, source },
        // PostgreSQL's serialization failure and deadlock: the transaction
        // was rolled back and may be tried again.
        sqlx::Error::Database(ref e)
            if matches!(e.code().as_deref(), Some("40001" | "40P01"))
                && e.try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
                    .is_some() =>
        {
            StoreError::Busy { action, source }
        }
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
    pub last_seen: Option<Timestamp>,
    /// `IP:port` its newest channel came from; `None` keeps the stored one.
    pub address: Option<String>,
}

#[derive(Debug, Clone)]
pub struct NewDevice {
    pub id: DeviceId,
    pub device_type: DeviceType,
    pub hardware_id: HardwareId,
    pub public_key: String,
    pub enrolled_at: Timestamp,
}

/// How long a replica may go without writing its presence before the
/// others take it for dead and its devices for offline. Replicas write
/// every [`crate::presence::HEARTBEAT`].
pub const REPLICA_GONE_AFTER: std::time::Duration = std::time::Duration::from_secs(10);

#[derive(Debug, Clone, PartialEq)]
pub struct DeviceRecord {
    pub id: DeviceId,
    pub device_type: DeviceType,
    pub hardware_id: HardwareId,
    pub public_key: String,
    pub enrolled_at: Timestamp,
    pub last_seen: Option<Timestamp>,
    pub running_version: Option<Version>,
    pub state: Option<AgentState>,
    pub booted_slot: Option<SlotName>,
    pub reported_target: Option<Version>,
    pub progress: Option<Progress>,
    pub last_error: Option<WireError>,
    pub target_rollout: Option<i64>,
    /// `IP:port` its newest channel came from, if it connected since the
    /// server recorded addresses.
    pub address: Option<String>,
    /// When an operator removed the device (see [`Store::remove_device`]).
    /// `None` for an enrolled device.
    pub removed_at: Option<Timestamp>,
    /// Its private addresses in CIDR form (see [`crate::addresses`]), IPv4
    /// first.
    pub private_addresses: Vec<String>,
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
    pub created_at: Timestamp,
    /// The key IDs the manifest's signatures name (not checked here);
    /// empty for releases stored before they were kept.
    pub key_ids: Vec<String>,
    /// The manifest's `expires_at`; `None` for releases stored before it
    /// was kept.
    pub expires_at: Option<Timestamp>,
}

#[derive(Debug, Clone)]
pub struct RolloutRecord {
    pub id: i64,
    pub release: Version,
    pub device_type: DeviceType,
    pub allow_downgrade: bool,
    pub limits: DownloadLimits,
    pub created_at: Timestamp,
    /// The tags it was started on (a dynamic rollout admits devices that
    /// come to have them).
    pub tags: Option<TagSelector>,
    /// The versions its devices had to run, if it was limited to some.
    pub from_versions: Vec<Version>,
}

/// Which devices a list holds: every filter given must hold.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeviceFilter {
    pub device_type: Option<DeviceType>,
    /// Running one of these versions; any when empty.
    pub versions: Vec<Version>,
    pub state: Option<AgentState>,
    pub tags: Option<TagSelector>,
    /// Text within the device ID or the hardware ID (ASCII letters
    /// compare case-insensitively; `%` and `_` are plain characters).
    pub text: Option<String>,
    /// Connected now (true) or not (false), by [`DeviceFilter::connected`].
    pub online: Option<bool>,
    /// Last seen before this time, or never.
    pub seen_before: Option<Timestamp>,
    /// Last seen after this time.
    pub seen_after: Option<Timestamp>,
    /// The devices connected to this replica now, which the database does
    /// not know (yet): for `online`, and for the seen filters, where a
    /// connected device counts as seen now (its stored last-seen time is
    /// written lazily). Needed only when one of those is set. Devices
    /// present on other replicas count too (see [`Store::record_presence`]).
    pub connected: Vec<DeviceId>,
}

/// What became of a change to a device's tags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TagUpdate {
    /// The device's tags now, in order.
    Updated(Vec<Tag>),
    /// The change would leave the device with `count` tags, more than
    /// allowed; nothing was changed.
    TooMany {
        count: usize,
    },
    UnknownDevice,
}

/// What became of a [`Store::remove_device`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Removal {
    /// Removed now; its unfinished parts in these rollouts ended (as
    /// superseded: no longer the rollout's, counted neither for nor
    /// against it).
    Removed {
        rollouts: Vec<i64>,
    },
    /// Removed before, at this time; nothing changed.
    AlreadyRemoved {
        at: Timestamp,
    },
    UnknownDevice,
}

/// What became of a [`Store::claim_address`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddressClaim {
    /// The address is the device's now.
    Claimed,
    /// Another device holds it: pick another.
    Taken,
    /// The device holds an address of this pool already (another replica
    /// gave it one meanwhile), in CIDR form.
    Held(String),
    /// The device is not enrolled (removed meanwhile).
    NoDevice,
}

/// Private addresses of a device record, as stored (`cidr` forms separated
/// by spaces), IPv4 first.
pub(crate) fn private_addresses(text: Option<String>) -> Vec<String> {
    let mut list: Vec<String> = text
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    list.sort_by_key(|cidr| cidr.contains(':'));
    list
}

/// The record of a rollout [`Store::create_rollout`] has just stored.
pub(crate) fn started_rollout(
    id: i64,
    release: &ReleaseRecord,
    allow_downgrade: bool,
    limits: DownloadLimits,
    plan: &NewPlan<'_>,
    created_at: Timestamp,
) -> RolloutRecord {
    RolloutRecord {
        id,
        release: release.version.clone(),
        device_type: release.device_type.clone(),
        allow_downgrade,
        limits,
        created_at,
        tags: plan.tags.cloned(),
        from_versions: plan.from_versions.to_vec(),
    }
}

/// A new rollout's members as its row holds them until they are written
/// (see [`Store::create_rollout`]): `[[device, phase, offered], ...]`, each
/// offered if its first step offers it.
pub(crate) fn pending_members_text(members: &[(DeviceId, u32)], offer: &[DeviceId]) -> String {
    let offer: std::collections::HashSet<&DeviceId> = offer.iter().collect();
    let list: Vec<(&DeviceId, u32, bool)> = members
        .iter()
        .map(|(device, phase)| (device, *phase, offer.contains(device)))
        .collect();
    serde_json::to_string(&list).unwrap_or_else(|e| unreachable!("device ids serialize: {e}"))
}

/// [`pending_members_text`] read back: each device ID checked again, as
/// everything read from the database is.
pub(crate) fn pending_members(text: &str) -> StoreResult<Vec<(DeviceId, u32, bool)>> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt {
        what: "a rollout's pending members",
        detail: e.to_string(),
    })
}

/// Those of `pending`'s devices that are in `targeted` (IDs as a store
/// returned them), in the list's order.
pub(crate) fn targeted_in_order(
    pending: Vec<(DeviceId, u32, bool)>,
    targeted: Vec<String>,
) -> Vec<DeviceId> {
    let targeted: std::collections::HashSet<String> = targeted.into_iter().collect();
    pending
        .into_iter()
        .filter_map(|(d, _, _)| targeted.contains(d.as_str()).then_some(d))
        .collect()
}

/// One history event to store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvent {
    pub device: DeviceId,
    pub at: Timestamp,
    pub event: DeviceEventKind,
}

/// One group of [`Store::device_census`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceCensus {
    pub state: Option<String>,
    pub version: Option<String>,
    pub error_kind: Option<String>,
    pub devices: u64,
}

/// One group of [`Store::fleet_census`]: the devices of a type that run a
/// version in a state, as stored (`None` where a device has not said).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetGroup {
    pub device_type: DeviceType,
    pub version: Option<Version>,
    pub state: Option<AgentState>,
    pub devices: u64,
    /// Of them, those among the connected devices the query was given.
    pub online: u64,
}

/// A new rollout's engine policy and state after its first step, how its
/// devices were chosen, and the members its first step offers (stored
/// offered, and pointed at the rollout, in the same transaction).
#[derive(Debug, Clone, Copy)]
pub struct NewPlan<'a> {
    pub policy: &'a RolloutPolicy,
    pub state: &'a RolloutState,
    pub tags: Option<&'a TagSelector>,
    pub from_versions: &'a [Version],
    pub offer: &'a [DeviceId],
}

/// A phased rollout's policy and state, and the revision every change
/// checks so that two actors never both apply a step.
#[derive(Debug, Clone, PartialEq)]
pub struct RolloutPlan {
    pub policy: RolloutPolicy,
    pub state: RolloutState,
    pub revision: i64,
    /// Its members are not written yet ([`Store::create_rollout`]): no
    /// step may be decided on them.
    pub members_pending: bool,
}

/// How far before a [`Store::change_mark`] the next read of changes
/// starts. A change is stamped when its statement runs and seen once its
/// transaction commits: a batch that commits within this long of its stamp
/// is never missed, and reading a change twice does no harm.
pub const CHANGE_OVERLAP: std::time::Duration = std::time::Duration::from_secs(10);

/// One device's part in a rollout, as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct MemberRecord {
    pub phase: u32,
    pub offered_at: Option<Timestamp>,
    pub outcome: Option<Outcome>,
    pub error: Option<String>,
    pub failure_accepted: bool,
}

/// What a device last said that decides where it stands in a rollout: a
/// narrow [`DeviceRecord`].
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceStanding {
    pub id: DeviceId,
    pub running_version: Option<Version>,
    pub state: Option<AgentState>,
    pub reported_target: Option<Version>,
    pub last_error: Option<WireError>,
    pub target_rollout: Option<i64>,
}

impl DeviceRecord {
    pub fn standing(&self) -> DeviceStanding {
        DeviceStanding {
            id: self.id.clone(),
            running_version: self.running_version.clone(),
            state: self.state,
            reported_target: self.reported_target.clone(),
            last_error: self.last_error.clone(),
            target_rollout: self.target_rollout,
        }
    }
}

/// Which of a rollout's devices one page holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberPage {
    pub phase: Option<u32>,
    pub outcome: Option<uplift_proto::api::MemberOutcome>,
    /// The (phase, device) the previous page ended with.
    pub after: Option<(u32, DeviceId)>,
    pub limit: u32,
}

/// A rollout's devices counted by where each stands in it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RolloutTally {
    pub counts: uplift_proto::api::RolloutCounts,
    /// Taken over by a newer rollout.
    pub superseded: u64,
    pub total: u64,
}

/// What to write after an engine step or an operator command.
#[derive(Debug, Clone, Copy)]
pub struct RolloutChange<'a> {
    pub state: Option<&'a RolloutState>,
    pub offer: &'a [DeviceId],
    pub settle: &'a [(DeviceId, Outcome, Option<String>)],
    pub accept_failures: &'a [DeviceId],
    /// Offers taken back (an abort): the device's part ends as withdrawn
    /// and it is no longer pointed at the rollout.
    pub withdraw: &'a [DeviceId],
    /// Offers taken back until the rollout resumes (a pause): the device is
    /// no longer pointed at the rollout, and counts as not offered yet.
    pub hold: &'a [DeviceId],
    pub now: Timestamp,
}

/// What a device should run, as decided by the newest rollout targeting it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeviceTarget {
    pub rollout_id: i64,
    pub version: Version,
    pub allow_downgrade: bool,
    pub limits: DownloadLimits,
    /// The offer holds the reboot: the rollout's reboot window is closed
    /// (or the rollout paused). Not stored: a target read from the database
    /// holds it whenever the rollout has a reboot window, until the
    /// scheduler's next tick decides.
    pub hold_reboot: bool,
}

#[async_trait]
pub trait Store: ControlStore + RootStore + Send + Sync + std::fmt::Debug {
    async fn insert_device(&self, device: &NewDevice) -> StoreResult<()>;
    async fn device(&self, id: &DeviceId) -> StoreResult<Option<DeviceRecord>>;
    /// The device holding this key, removed ones included (a removed
    /// device's key stays on record, revoked).
    async fn device_by_public_key(&self, public_key: &str) -> StoreResult<Option<DeviceRecord>>;
    /// Decommissions a device in one transaction: marked removed at `now`
    /// (its row, history and key stay: the key revoked, never enrolled
    /// again), no longer pointed at a rollout, its unfinished rollout
    /// parts ended as superseded, its tags and private addresses dropped.
    /// Every list and count leaves a removed device out.
    async fn remove_device(&self, id: &DeviceId, now: Timestamp) -> StoreResult<Removal>;
    /// Gives `device` `address` (`cidr` with the pool's prefix) of `pool`,
    /// unless another device holds it (UNIQUE), the device holds one of
    /// the pool already, or it is not enrolled.
    async fn claim_address(
        &self,
        device: &DeviceId,
        pool: &str,
        address: &str,
        cidr: &str,
    ) -> StoreResult<AddressClaim>;
    /// Drops the device's addresses of pools other than `keep`.
    async fn release_addresses(&self, device: &DeviceId, keep: &[String]) -> StoreResult<()>;
    /// Every address of `pool` that some device holds.
    async fn pool_addresses(&self, pool: &str) -> StoreResult<Vec<String>>;
    async fn list_devices(&self) -> StoreResult<Vec<DeviceRecord>>;
    /// Up to `limit` devices that pass `filter`, by ID, after `after`:
    /// keyset paging, each page one indexed range scan.
    async fn device_page(
        &self,
        filter: &DeviceFilter,
        after: Option<&DeviceId>,
        limit: u32,
    ) -> StoreResult<Vec<DeviceRecord>>;
    /// The tags of these devices, by device then tag.
    async fn tags_of(&self, devices: &[DeviceId]) -> StoreResult<Vec<(DeviceId, Tag)>>;
    /// Changes a device's tags in one transaction: they become `set` (or
    /// stay), less `remove`, plus `add`; refused if more than `max` would remain.
    async fn change_tags(
        &self,
        device: &DeviceId,
        set: Option<&[Tag]>,
        remove: &[Tag],
        add: &[Tag],
        max: usize,
    ) -> StoreResult<TagUpdate>;
    /// Stores history events in one transaction, then drops the oldest
    /// events of their devices beyond `keep_per_device`.
    async fn record_events(&self, events: &[NewEvent], keep_per_device: u32) -> StoreResult<u64>;
    /// Drops events recorded before `before`; returns how many.
    async fn prune_events(&self, before: Timestamp) -> StoreResult<u64>;
    /// A device's events older than event `before`, newest first, at most `limit`.
    async fn device_history(
        &self,
        device: &DeviceId,
        before: Option<i64>,
        limit: u32,
    ) -> StoreResult<Vec<DeviceEvent>>;
    async fn count_devices(&self) -> StoreResult<u64>;
    /// Devices by (state, running version, last error kind) as stored:
    /// text as in the database, `None` where a device has not said.
    async fn device_census(&self) -> StoreResult<Vec<DeviceCensus>>;
    /// Devices by (type, running version, state) as stored, each group with
    /// how many of its devices are online (among `connected`, this
    /// replica's sessions, or present on another replica): one aggregate
    /// query, whatever the fleet's size.
    async fn fleet_census(&self, connected: &[DeviceId]) -> StoreResult<Vec<FleetGroup>>;
    /// Writes which sessions `replica` began and ended, and that it is
    /// alive; with `afresh`, its earlier presence is dropped first (the
    /// changes are then all its sessions). Returns true if the database
    /// did not know the replica (first call, or it was taken for dead):
    /// the caller then writes all its sessions afresh. Replicas not heard
    /// from for [`REPLICA_GONE_AFTER`] are dropped with their presence.
    /// A single server on SQLite keeps its sessions in memory only: there,
    /// nothing is written and this returns false.
    async fn record_presence(
        &self,
        replica: &str,
        changes: &[(DeviceId, crate::hub::PresenceChange)],
        afresh: bool,
    ) -> StoreResult<bool>;
    /// Which of `devices` hold a session on some replica, by the presence
    /// replicas wrote (empty on SQLite: see [`Store::record_presence`]).
    async fn present_devices(&self, devices: &[DeviceId]) -> StoreResult<Vec<DeviceId>>;
    /// Drops a replica that is shutting down and its presence.
    async fn retire_replica(&self, replica: &str) -> StoreResult<()>;
    /// Devices some rollout counts as pending or in progress, as stored:
    /// [`crate::service::rollouts::classify`] in SQL, each device once.
    async fn devices_in_rollouts(&self) -> StoreResult<u64>;
    /// Those of `devices` that are not enrolled, in the order given.
    async fn unknown_devices(&self, devices: &[DeviceId]) -> StoreResult<Vec<DeviceId>>;
    async fn devices_of_type(&self, device_type: &DeviceType) -> StoreResult<Vec<DeviceId>>;
    /// Writes many devices' live state in one transaction; returns the rows written.
    async fn record_reports(&self, states: &[ReportedState]) -> StoreResult<u64>;
    /// What every targeted device should run (read once at start), by
    /// rollout: a device listed twice (the first offer of a newer rollout
    /// whose members are pending) runs the later.
    async fn device_targets(&self) -> StoreResult<Vec<(DeviceId, DeviceTarget)>>;

    /// Fails with `Conflict` if the version exists.
    async fn insert_release(&self, release: &ReleaseRecord) -> StoreResult<()>;
    async fn release(&self, version: &Version) -> StoreResult<Option<ReleaseRecord>>;
    async fn list_releases(&self) -> StoreResult<Vec<ReleaseRecord>>;

    /// Creates the rollout with its state after `plan`'s first step, and
    /// its devices in their phases (`plan.offer` offered) held as one
    /// pending list in its row: one short transaction whatever the
    /// rollout's size, so the first offers can go out before the members
    /// are written ([`Store::store_rollout_members`]). `NotFound` if a
    /// device is not enrolled.
    async fn create_rollout(
        &self,
        release: &ReleaseRecord,
        members: &[(DeviceId, u32)],
        allow_downgrade: bool,
        limits: DownloadLimits,
        plan: &NewPlan<'_>,
        now: Timestamp,
    ) -> StoreResult<RolloutRecord>;
    /// Writes rollout `id`'s pending members as its rows, in one
    /// transaction: their parts in older unfinished rollouts end as
    /// superseded (a member a newer rollout already holds is stored as
    /// superseded itself, a device removed meanwhile is left out), and
    /// the first offers become the devices' targets where no newer
    /// rollout's stand. The devices whose target it became, or `None` if
    /// nothing was pending (written already, here or by another replica:
    /// only one writes them).
    async fn store_rollout_members(&self, id: i64) -> StoreResult<Option<Vec<DeviceId>>>;
    /// Rollouts created before `before` whose members are still pending:
    /// those a server killed between a start's two transactions left.
    async fn rollouts_with_pending_members(&self, before: Timestamp) -> StoreResult<Vec<i64>>;
    /// The engine's policy and state of a rollout; `None` for a rollout
    /// made before phased rollouts (or one that does not exist).
    async fn rollout_plan(&self, id: i64) -> StoreResult<Option<RolloutPlan>>;
    /// Adds a device to a running rollout in `phase` (a dynamic rollout's
    /// newcomer), ending its unfinished parts in older rollouts as
    /// superseded; false if it is already a member, a member of a newer
    /// rollout (which decides for it), removed, or not enrolled.
    async fn add_rollout_member(&self, id: i64, device: &DeviceId, phase: u32)
        -> StoreResult<bool>;
    /// Every phased rollout's plan, by rollout.
    async fn rollout_plans(&self) -> StoreResult<Vec<(i64, RolloutPlan)>>;
    /// Where each phase of each rollout stands: (rollout, phase, tally);
    /// of rollout `only` alone if given. A rollout whose members are still
    /// pending counts them from its pending list (offered as its first
    /// step decided, none finished).
    async fn phase_tallies(&self, only: Option<i64>) -> StoreResult<Vec<(i64, u32, PhaseTally)>>;
    /// Devices each rollout handed to the next newer rollout of them:
    /// (older, newer, devices); only pairs with rollout `only`, if given.
    async fn supersessions(&self, only: Option<i64>) -> StoreResult<Vec<(i64, i64, u64)>>;
    /// Rollouts the scheduler must look at: phased, neither finished nor
    /// aborted, their members written.
    async fn active_rollouts(&self) -> StoreResult<Vec<i64>>;
    /// A rollout's devices with their part in it and what each last said,
    /// by phase then device: what the scheduler decides on every tick, so
    /// only the columns it needs.
    async fn rollout_members(&self, id: i64) -> StoreResult<Vec<(MemberRecord, DeviceStanding)>>;
    /// The store's clock now: read before a read of members,
    /// it is where the next [`Store::rollout_member_changes`] starts (less
    /// [`CHANGE_OVERLAP`]). PostgreSQL's clock, so replicas agree.
    async fn change_mark(&self) -> StoreResult<Timestamp>;
    /// Rollout `id`'s members whose row, or whose device's standing (what
    /// decides where it stands: version, state, target, error), changed at
    /// or after `since` (a [`Store::change_mark`]): what the scheduler
    /// reads each tick instead of every member.
    async fn rollout_member_changes(
        &self,
        id: i64,
        since: Timestamp,
    ) -> StoreResult<Vec<(MemberRecord, DeviceStanding)>>;
    /// One page of a rollout's devices, in phase order, then by device ID.
    async fn rollout_members_page(
        &self,
        id: i64,
        page: &MemberPage,
    ) -> StoreResult<Vec<(MemberRecord, DeviceRecord)>>;
    /// Stores what one engine step or operator command decided, in one
    /// transaction, if the rollout is still at `revision`; false if another
    /// actor changed it first (then nothing is written and the caller
    /// reloads). Offered devices are pointed at the rollout.
    async fn apply_rollout_change(
        &self,
        id: i64,
        revision: i64,
        change: &RolloutChange<'_>,
    ) -> StoreResult<bool>;
    async fn rollout(&self, id: i64) -> StoreResult<Option<RolloutRecord>>;
    async fn list_rollouts(&self) -> StoreResult<Vec<RolloutRecord>>;
    /// Each rollout's devices counted by where they stand, as stored:
    /// [`crate::service::rollouts::Tally::of`] over the devices it was
    /// started on, in one aggregate query; of rollout
    /// `only` alone if given. By rollout id. A rollout whose members are
    /// still pending counts them from its pending list, every one pending
    /// (no answer is stored against a member yet).
    async fn rollout_tallies(&self, only: Option<i64>) -> StoreResult<Vec<(i64, RolloutTally)>>;
}
