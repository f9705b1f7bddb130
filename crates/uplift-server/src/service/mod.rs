//! The server's operations on releases, rollouts and devices, between the
//! HTTP handlers and storage: the admin API, the web page's endpoints, the
//! scheduler and tests call these same functions with parsed, typed inputs,
//! and get typed answers or a [`ServiceError`].

pub mod audit;
pub mod devices;
pub mod enrollment;
pub mod fleet;
pub mod metrics;
pub mod releases;
pub mod rollouts;
pub mod roots;
pub mod stats;
pub mod tokens;
pub mod webhooks;

use crate::chunks::{ChunkError, LoadError, StoredKind};
use crate::store::StoreError;
use uplift_proto::{ChunkHash, DeviceId, DeviceType, ErrorKind, Version};

/// Why an operation failed. The text is what the client is told; the
/// source, where there is one, stays for the server's log.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Chunk(#[from] ChunkError),
    #[error(transparent)]
    Manifest(#[from] LoadError),
    #[error(
        "release {version} references {missing} chunks or patches the server does not have; upload them first \
         (`uplift release upload` does both)"
    )]
    ReleaseIncomplete { version: Version, missing: usize },
    #[error("release {version} is not on the server; upload it with `uplift release upload`")]
    ReleaseNotFound { version: Version },
    /// A downgrade the release key did not allow: devices would refuse it
    /// (they check the signed manifest themselves), so it is refused here
    /// first, where the operator sees why.
    #[error(
        "release {version} is not signed as allowed to replace newer versions ({}), so devices \
         would refuse this downgrade; make it with `uplift release create --may-replace-up-to \
         <newest version it may replace>`, signed with a release key, and upload it, or roll out \
         a newer release",
        match may_replace_up_to {
            Some(up_to) => format!("it may replace versions up to {up_to} only"),
            None => "it allows no downgrade".to_owned(),
        }
    )]
    DowngradeNotSigned {
        version: Version,
        may_replace_up_to: Option<Version>,
    },
    /// An uploaded chunk that is not the chunk its name says.
    #[error("{source}")]
    ChunkRefused {
        hash: ChunkHash,
        #[source]
        source: uplift_release::ReleaseError,
    },
    /// An uploaded patch or index that is not what its name says.
    #[error("{} {hash} is refused: {why}; rebuild the release and upload it again", .kind.noun())]
    ObjectRefused {
        kind: StoredKind,
        hash: ChunkHash,
        why: String,
    },
    #[error("{} check panicked: {source}", .kind.noun())]
    CheckPanicked {
        kind: StoredKind,
        hash: ChunkHash,
        #[source]
        source: tokio::task::JoinError,
    },
    #[error("no devices to roll out to: none of type {device_type} is enrolled")]
    NoDevices { device_type: DeviceType },
    /// A rollout's tags or versions left no device; `target` says what was asked.
    #[error("no devices to roll out to: no device {target}; check `uplift devices list`")]
    NoMatch { target: String },
    #[error(
        "a rollout targets a device list or devices with tags, not both; leave out one of them"
    )]
    ListAndTags,
    #[error("the tag selector names no tag; give at least one tag, or leave the selector out")]
    NoTagsGiven,
    #[error(
        "a dynamic rollout admits devices as they enroll, before they have said what they run; \
         leave out the dynamic option or the versions to upgrade from"
    )]
    DynamicVersions,
    #[error("device {id} is not enrolled on this server; see `uplift devices list`")]
    DeviceNotFound { id: DeviceId },
    #[error("device {id} was already removed at {at}; a replaced board enrolls as a new device")]
    AlreadyRemoved { id: DeviceId, at: String },
    #[error(
        "device {id} would have {count} tags, more than the {} allowed; remove some first",
        devices::MAX_TAGS_PER_DEVICE
    )]
    TooManyTags { id: DeviceId, count: usize },
    /// A request's query parameter that parsed but makes no sense.
    #[error("query parameter {field} refused: {why}")]
    BadQuery { field: &'static str, why: String },
    #[error("rollout {id} does not exist; see `uplift rollout list`")]
    RolloutNotFound { id: i64 },
    #[error(
        "rollout {id} was made before phased rollouts and takes no commands; start a new rollout"
    )]
    NotPhased { id: i64 },
    #[error("a dynamic rollout targets every device of the release's type, or those with its tags; leave out the device list, or the dynamic option")]
    DynamicList,
    #[error("rollout {id}: no device failed or timed out in it, so there is nothing to retry")]
    NothingToRetry { id: i64 },
    #[error("rollout {id}: {source}")]
    Refused {
        id: i64,
        #[source]
        source: crate::rollout::engine::TransitionError,
    },
    #[error("encoding the metrics failed: {0}")]
    Metrics(String),
    #[error(transparent)]
    Policy(#[from] uplift_proto::policy::PolicyError),
    #[error(transparent)]
    Window(#[from] crate::rollout::window::WindowError),
    #[error("API token {id} does not exist; see `uplift token list`")]
    TokenNotFound { id: i64 },
    #[error("webhook {id} does not exist; see `uplift webhook list`")]
    WebhookNotFound { id: i64 },
    #[error("webhook URL {url:?} {why}")]
    BadWebhookUrl { url: String, why: String },
    #[error(
        "a token may live at most {} days; {secs} seconds is longer, so give a shorter --expires-in",
        tokens::MAX_EXPIRES_IN_SECS / 86_400
    )]
    ExpiryTooFar { secs: u64 },
    #[error(
        "a token may enroll at most {} devices; {max_uses} is more, so give a smaller --max-uses \
         (or none, for no limit)",
        tokens::MAX_TOKEN_USES
    )]
    TooManyUses { max_uses: u32 },
    #[error(
        "{caller} has role {role} and may not {}; use a token with role {} or admin",
        .permission.describe(),
        uplift_proto::auth::Role::least_with(*.permission)
    )]
    Denied {
        caller: String,
        role: uplift_proto::auth::Role,
        permission: uplift_proto::auth::Permission,
    },
    #[error("a page holds 1 to {max} entries; {limit} is outside that, so give another limit")]
    PageSize { limit: u32, max: u32 },
    #[error(
        "enrollment of this device was rejected by an operator{}{}; it is not retried. If that \
         was a mistake, an operator accepts it with `uplift devices accept {id}`",
        if at.is_empty() { String::new() } else { format!(" at {at}") },
        reason.as_ref().map(|r| format!(": {r}")).unwrap_or_default()
    )]
    EnrollmentRejected {
        id: i64,
        at: String,
        reason: Option<String>,
    },
    #[error("enrollment request {id} does not exist; see `uplift devices pending`")]
    EnrollmentNotFound { id: i64 },
    #[error("enrollment request {id} is already {}; see `uplift devices pending --all`", .state.as_str())]
    EnrollmentDecided {
        id: i64,
        state: uplift_proto::enrollment::EnrollmentState,
    },
    #[error(
        "a rejection reason is at most {} characters on one line; this one has {chars}",
        uplift_proto::enrollment::MAX_REASON_CHARS
    )]
    BadReason { chars: usize },
    #[error(
        "enrollment token {id} ({name}) is used up ({max_uses} of {max_uses} uses: each new \
         device enrolled with it is one); set enrollment_token in the agent config to another one, or make one with \
         `uplift token create --role enrollment --max-uses N`"
    )]
    TokenUsedUp {
        id: i64,
        name: String,
        max_uses: u32,
    },
    /// A root of trust refused at publication: malformed, not the next
    /// version, or not signed by the keys it needs.
    #[error("root refused: {source}")]
    RootRefused {
        #[source]
        source: uplift_release::ReleaseError,
    },
}

impl ServiceError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            ServiceError::Store(e) => e.kind(),
            ServiceError::Chunk(e) => e.kind(),
            ServiceError::Manifest(e) => e.kind(),
            ServiceError::ReleaseIncomplete { .. } | ServiceError::AlreadyRemoved { .. } => {
                ErrorKind::Conflict
            }
            ServiceError::ReleaseNotFound { .. }
            | ServiceError::RolloutNotFound { .. }
            | ServiceError::TokenNotFound { .. }
            | ServiceError::DeviceNotFound { .. }
            | ServiceError::WebhookNotFound { .. } => ErrorKind::NotFound,
            ServiceError::Denied { .. } => ErrorKind::Forbidden,
            ServiceError::DowngradeNotSigned { .. } => ErrorKind::DowngradeNotSigned,
            ServiceError::EnrollmentRejected { .. } => ErrorKind::EnrollmentRejected,
            ServiceError::EnrollmentNotFound { .. } => ErrorKind::NotFound,
            ServiceError::EnrollmentDecided { .. } => ErrorKind::Conflict,
            ServiceError::BadReason { .. } => ErrorKind::BadRequest,
            ServiceError::TokenUsedUp { .. } => ErrorKind::EnrollmentRefused,
            ServiceError::ChunkRefused { source, .. } => source.kind(),
            ServiceError::RootRefused { source } => source.kind(),
            ServiceError::ObjectRefused { .. } => ErrorKind::ChunkHashMismatch,
            ServiceError::CheckPanicked { .. } | ServiceError::Metrics(_) => ErrorKind::Internal,
            ServiceError::NotPhased { .. }
            | ServiceError::Refused { .. }
            | ServiceError::NothingToRetry { .. } => ErrorKind::Conflict,
            ServiceError::NoDevices { .. }
            | ServiceError::NoMatch { .. }
            | ServiceError::ListAndTags
            | ServiceError::NoTagsGiven
            | ServiceError::DynamicVersions
            | ServiceError::TooManyTags { .. }
            | ServiceError::BadQuery { .. }
            | ServiceError::DynamicList
            | ServiceError::Policy(_)
            | ServiceError::Window(_)
            | ServiceError::ExpiryTooFar { .. }
            | ServiceError::TooManyUses { .. }
            | ServiceError::BadWebhookUrl { .. }
            | ServiceError::PageSize { .. } => ErrorKind::BadRequest,
        }
    }
}

pub type ServiceResult<T> = Result<T, ServiceError>;

/// What an upload did. Uploads are idempotent: sending what the server
/// already holds (checked) succeeds and changes nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    Created,
    AlreadyPresent,
}

#[cfg(test)]
pub(crate) mod testing {
    //! A server's state on a temporary directory, without HTTP or sessions.

    use crate::artifacts::{ArtifactStore, LocalArtifacts};
    use crate::chunks::Chunks;
    use crate::state::{AppState, Secrets, Stats};
    use crate::store::stamp::ts;
    use crate::store::{NewDevice, ReleaseRecord, SqliteStore, Store};
    use std::path::Path;
    use std::sync::Arc;

    pub async fn state(dir: &Path) -> AppState {
        let store: Arc<dyn Store> =
            Arc::new(SqliteStore::open(&dir.join("uplift.db")).await.unwrap());
        let artifacts: Arc<dyn ArtifactStore> = Arc::new(LocalArtifacts::new(dir.join("chunks")));
        let indexes = Arc::new(Chunks::indexes(
            Arc::new(LocalArtifacts::new(dir.join("indexes"))),
            store.clone(),
        ));
        let limits = crate::config::Limits::default();
        let events = Arc::new(crate::events::EventBus::default());
        AppState {
            chunks: Chunks::new(artifacts.clone(), store.clone(), indexes.clone()),
            indexes,
            patches: Chunks::patches(
                Arc::new(LocalArtifacts::new(dir.join("patches"))),
                store.clone(),
            ),
            store,
            artifacts,
            hub: Default::default(),
            live: Arc::new(crate::live::LiveView::with_events(events.clone())),
            events,
            turns: Default::default(),
            budgets: crate::budget::Budgets::new(&limits),
            signals: Default::default(),
            releases: Default::default(),
            egress: None,
            stats: Arc::new(Stats::default()),
            secrets: Secrets::new("admin", &[]),
            downloads: crate::download_token::DownloadAuth::new(
                crate::download_token::Keyring::parse(
                    &crate::download_token::Keyring::generate_file_text(),
                    Path::new("test keys"),
                )
                .expect("generated keys parse"),
                600,
            ),
            limits,
            enrollment: crate::service::enrollment::Enrollment::new(Default::default()),
            addresses: Default::default(),
            freshness: None,
            shutdown: tokio::sync::watch::channel(false).1,
        }
    }

    /// Writes every device report the live view holds to the database, as
    /// the writer's next batch would; false if the store refused it.
    pub async fn flush_writes(state: &AppState) -> bool {
        crate::writer::Writer {
            live: state.live.clone(),
            store: state.store.clone(),
            stats: state.stats.clone(),
            retention: crate::writer::Retention::from(&state.limits),
        }
        .flush(true)
        .await
    }

    /// A rollout of `release` to `devices` (every device of its type when
    /// `None`) with `policy`, as an operator would ask for it.
    pub fn rollout_request(
        release: &str,
        devices: Option<Vec<uplift_proto::DeviceId>>,
        policy: uplift_proto::policy::RolloutPolicy,
    ) -> uplift_proto::api::RolloutCreate {
        uplift_proto::api::RolloutCreate {
            release: release.parse().unwrap(),
            devices,
            tags: None,
            from_versions: Vec::new(),
            allow_downgrade: false,
            limits: Default::default(),
            policy,
        }
    }

    /// Starts `request` as the bootstrap admin; the new rollout's id, once
    /// its members are written.
    pub async fn start_rollout(state: &AppState, request: uplift_proto::api::RolloutCreate) -> i64 {
        let id = crate::service::rollouts::start(
            state,
            &crate::auth::Principal::bootstrap_admin(),
            request,
        )
        .await
        .unwrap()
        .id;
        members_written(state, id).await;
        id
    }

    /// Returns once rollout `id`'s members are written as rows (its start
    /// writes them in a task once its offers are sent).
    pub async fn members_written(state: &AppState, id: i64) {
        let rollout = state.store.rollout(id).await.unwrap().unwrap();
        crate::service::rollouts::members_written(state, &rollout)
            .await
            .unwrap();
    }

    /// A release record as if uploaded; its manifest is never read here.
    pub async fn release(state: &AppState, version: &str, device_type: &str) -> ReleaseRecord {
        let record = ReleaseRecord {
            version: version.parse().unwrap(),
            device_type: device_type.parse().unwrap(),
            manifest_json: b"{}".to_vec(),
            image_size: 1,
            image_sha256: "00".repeat(32),
            chunks: 1,
            stored_bytes: 1,
            created_at: ts(&format!("2026-01-01T00:00:0{version}Z")),
            key_ids: vec!["key-1".into()],
            expires_at: Some(ts("2027-01-01T00:00:00Z")),
        };
        state.store.insert_release(&record).await.unwrap();
        record
    }

    pub async fn device(state: &AppState, id: &str, device_type: &str) -> uplift_proto::DeviceId {
        let id: uplift_proto::DeviceId = id.parse().unwrap();
        state
            .store
            .insert_device(&NewDevice {
                id: id.clone(),
                device_type: device_type.parse().unwrap(),
                hardware_id: format!("hw-{id}").parse().unwrap(),
                public_key: format!("key-{id}"),
                enrolled_at: ts("2026-01-01T00:00:00Z"),
            })
            .await
            .unwrap();
        id
    }
}
