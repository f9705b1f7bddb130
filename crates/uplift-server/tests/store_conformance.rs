//! The store conformance suite: one set of tests, written once against
//! `dyn Store`, run against SQLite and against a real PostgreSQL that the
//! test starts itself ([`uplift_sim::postgres::TestPostgres`]). Each case
//! gets a database of its own. A backend passes when every case does; a
//! failing case names itself before it panics.

use futures_util::future::BoxFuture;
use std::sync::Arc;
use uplift_proto::api::{DeviceEventKind, DownloadLimits, MemberOutcome, TagSelector};
use uplift_proto::auth::{AuditAction, AuditQuery, Role};
use uplift_proto::channel::{AgentState, Report};
use uplift_proto::policy::RolloutPolicy;
use uplift_proto::{DeviceId, ErrorKind, SlotName, Tag, TokenName, Version, WireError};
use uplift_server::rollout::engine::{Outcome, RolloutState};
use uplift_server::store::control::{Attempt, NewApiToken, NewAuditEntry, NewDelivery, NewWebhook};
use uplift_server::store::{
    AddressClaim, DeviceFilter, MemberPage, NewDevice, NewEvent, NewPlan, PgStore, ReleaseRecord,
    Removal, ReportedState, RolloutChange, RolloutTally, SqliteStore, Store, StoreError, TagUpdate,
    Timestamp,
};

/// Where a case's database is; it may open several stores on it (as
/// several server replicas would).
enum Db {
    Sqlite(std::path::PathBuf),
    Postgres(String),
}

impl Db {
    async fn open(&self) -> Arc<dyn Store> {
        match self {
            Db::Sqlite(path) => Arc::new(SqliteStore::open(path).await.unwrap()),
            Db::Postgres(url) => Arc::new(PgStore::connect(url, 8).await.unwrap()),
        }
    }
}

type Case = for<'a> fn(&'a Db) -> BoxFuture<'a, ()>;

macro_rules! suite {
    ($($name:ident),* $(,)?) => {
        fn cases() -> Vec<(&'static str, Case)> {
            vec![$((stringify!($name), {
                fn case(db: &Db) -> BoxFuture<'_, ()> {
                    Box::pin($name(db))
                }
                case as Case
            })),*]
        }
    };
}

suite!(
    devices_enroll_once_and_are_found_by_id_and_key,
    device_lists_filter_by_every_field_and_page_by_id,
    times_within_one_second_keep_their_order,
    tags_change_in_one_step_and_refuse_too_many,
    history_keeps_the_newest_per_device_and_prunes_by_age,
    rollouts_store_phases_supersede_older_parts_and_refuse_unknown_devices,
    rollout_steps_check_the_revision_and_move_offers,
    a_stale_revision_loses_to_a_concurrent_writer_on_another_store,
    rollout_members_page_by_phase_and_device,
    the_fleet_census_and_devices_in_rollouts_count_in_the_database,
    dynamic_rollouts_add_members_unless_a_newer_rollout_has_them,
    tokens_audit_and_webhooks_keep_what_they_are_given,
    a_lease_has_one_holder_until_it_expires_or_is_released,
    a_read_of_changes_returns_the_members_changed_since_a_mark_and_no_other,
    a_new_rollout_stores_its_first_offers_with_it,
    a_new_rollouts_members_are_pending_until_written_once_and_never_take_a_newer_ones_devices,
    presence_one_replica_writes_is_online_on_another_and_its_newest_connection_wins,
    a_removed_device_is_kept_with_its_history_but_left_out_of_everything_else,
    a_private_address_is_one_devices_across_stores_until_it_is_removed,
    an_enrollment_request_is_one_per_key_and_decided_once,
    roots_are_kept_in_version_order_and_each_version_is_published_once,
);

#[tokio::test]
async fn sqlite_passes_the_store_conformance_suite() {
    for (name, case) in cases() {
        let dir = tempfile::tempdir().unwrap();
        eprintln!("sqlite: {name}");
        case(&Db::Sqlite(dir.path().join("uplift.db"))).await;
    }
}

#[tokio::test]
async fn postgres_passes_the_store_conformance_suite() {
    let Some(pg) = uplift_sim::postgres::TestPostgres::start() else {
        return;
    };
    let started = std::time::Instant::now();
    for (i, (name, case)) in cases().into_iter().enumerate() {
        let url = pg.create_database(&format!("case_{i}")).unwrap();
        eprintln!("postgres: {name}");
        case(&Db::Postgres(url)).await;
    }
    eprintln!("postgres: every case in {:?}", started.elapsed());
}

async fn an_enrollment_request_is_one_per_key_and_decided_once(db: &Db) {
    use uplift_proto::enrollment::EnrollmentState;
    use uplift_server::store::control::{EnrollmentDecision, NewEnrollmentRequest};
    let (store, replica) = (db.open().await, db.open().await);
    let (gw, hw) = ("gw".parse().unwrap(), "hw-1".parse().unwrap());
    let request = |key: &'static str, at: &'static str| NewEnrollmentRequest {
        public_key: key,
        key_fingerprint: "SHA256:00",
        device_type: &gw,
        hardware_id: &hw,
        requested_at: ts(at),
    };
    let first = store
        .request_enrollment(&request("key-a", "2026-12-06T00:00:00Z"))
        .await
        .unwrap();
    assert_eq!(first.view.state, EnrollmentState::Pending);
    assert_eq!(first.public_key, "key-a");
    assert_eq!(first.view.hardware_id.as_str(), "hw-1");
    assert_eq!(first.view.requested_at, "2026-12-06T00:00:00Z");
    // Asked again (from another replica, later): the same request.
    let again = replica
        .request_enrollment(&request("key-a", "2026-12-06T00:05:00Z"))
        .await
        .unwrap();
    assert_eq!(again, first);
    let second = store
        .request_enrollment(&request("key-b", "2026-12-06T00:01:00Z"))
        .await
        .unwrap();
    assert!(second.view.id > first.view.id);
    let pending = store
        .enrollment_requests(Some(EnrollmentState::Pending))
        .await
        .unwrap();
    assert_eq!(
        pending.iter().map(|r| r.view.id).collect::<Vec<_>>(),
        vec![first.view.id, second.view.id],
        "oldest first"
    );

    let device = id("dev-a");
    let accept = EnrollmentDecision::Accept { device_id: &device };
    let reject = EnrollmentDecision::Reject {
        reason: Some("not ours"),
    };
    let (accepted, changed) = store
        .decide_enrollment(first.view.id, &accept, "alice", ts("2026-12-06T00:02:00Z"))
        .await
        .unwrap()
        .unwrap();
    assert!(changed);
    assert_eq!(accepted.view.state, EnrollmentState::Accepted);
    assert_eq!(accepted.view.device_id, Some(device.clone()));
    assert_eq!(accepted.view.decided_by.as_deref(), Some("alice"));
    assert_eq!(
        accepted.view.decided_at.as_deref(),
        Some("2026-12-06T00:02:00Z")
    );
    // Decided once: a second operator on another replica loses.
    let (still, changed) = replica
        .decide_enrollment(first.view.id, &reject, "bob", ts("2026-12-06T00:03:00Z"))
        .await
        .unwrap()
        .unwrap();
    assert!(!changed);
    assert_eq!(still, accepted);

    let (rejected, changed) = replica
        .decide_enrollment(second.view.id, &reject, "bob", ts("2026-12-06T00:03:00Z"))
        .await
        .unwrap()
        .unwrap();
    assert!(changed);
    assert_eq!(rejected.view.reason.as_deref(), Some("not ours"));
    assert_eq!(
        store.enrollment_request_by_key("key-b").await.unwrap(),
        Some(rejected.clone())
    );
    // A rejected request may still be accepted (an operator's undo).
    let other = id("dev-b");
    let (undone, changed) = store
        .decide_enrollment(
            second.view.id,
            &EnrollmentDecision::Accept { device_id: &other },
            "alice",
            ts("2026-12-06T00:04:00Z"),
        )
        .await
        .unwrap()
        .unwrap();
    assert!(changed);
    assert_eq!(undone.view.state, EnrollmentState::Accepted);
    assert!(store
        .enrollment_requests(Some(EnrollmentState::Pending))
        .await
        .unwrap()
        .is_empty());
    assert_eq!(store.enrollment_requests(None).await.unwrap().len(), 2);
    assert!(store
        .decide_enrollment(999, &reject, "bob", ts(NOW))
        .await
        .unwrap()
        .is_none());
    assert!(store.enrollment_request(999).await.unwrap().is_none());
}

// ---- fixtures ----

fn id(s: &str) -> DeviceId {
    s.parse().unwrap()
}

fn version(s: &str) -> Version {
    s.parse().unwrap()
}

fn tags(list: &[&str]) -> Vec<Tag> {
    list.iter().map(|t| t.parse().unwrap()).collect()
}

fn ids(devices: &[uplift_server::store::DeviceRecord]) -> Vec<&str> {
    devices.iter().map(|d| d.id.as_str()).collect()
}

fn device(name: &str, device_type: &str, hardware_id: &str) -> NewDevice {
    NewDevice {
        id: id(name),
        device_type: device_type.parse().unwrap(),
        hardware_id: hardware_id.parse().unwrap(),
        public_key: format!("key-{name}"),
        enrolled_at: ts("2026-01-01T00:00:00Z"),
    }
}

async fn enroll(store: &dyn Store, devices: &[(&str, &str, &str)]) {
    for (name, device_type, hardware_id) in devices {
        store
            .insert_device(&device(name, device_type, hardware_id))
            .await
            .unwrap();
    }
}

fn release(v: &str, created_at: &str) -> ReleaseRecord {
    ReleaseRecord {
        version: version(v),
        device_type: "gw".parse().unwrap(),
        manifest_json: b"{}".to_vec(),
        image_size: 1,
        image_sha256: "00".repeat(32),
        chunks: 1,
        stored_bytes: 1,
        created_at: ts(created_at),
        key_ids: vec!["key-a".into()],
        expires_at: Some(ts("2027-01-01T00:00:00.25Z")),
    }
}

fn seen(name: &str, state: AgentState, running: &str, at: &str) -> ReportedState {
    ReportedState {
        id: id(name),
        report: Some(Report {
            state,
            running_version: version(running),
            booted_slot: SlotName::A,
            target_version: None,
            progress: None,
            error: None,
        }),
        last_seen: Some(ts(at)),
        address: None,
    }
}

fn time(text: &str) -> time::OffsetDateTime {
    time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).unwrap()
}

fn ts(text: &str) -> Timestamp {
    Timestamp::parse_rfc3339(text).unwrap()
}

const NOW: &str = "2026-03-01T12:00:00.123456Z";

/// Starts a phased rollout of release 2.0 (stored if need be).
async fn start(store: &dyn Store, members: &[(&str, u32)]) -> Result<i64, StoreError> {
    let members: Vec<(DeviceId, u32)> = members.iter().map(|(d, p)| (id(d), *p)).collect();
    start_offering(store, &members, &[]).await
}

/// Starts a rollout of release 2.0 (stored if need be) to `members`,
/// offered to `offer` at once, as a start stores its first step: the
/// rollout, then its members.
async fn start_offering(
    store: &dyn Store,
    members: &[(DeviceId, u32)],
    offer: &[DeviceId],
) -> Result<i64, StoreError> {
    let id = create_offering(store, members, offer).await?;
    let mut offered = store.store_rollout_members(id).await?.unwrap();
    offered.sort_by_key(|d| d.to_string());
    let mut expected = offer.to_vec();
    expected.sort_by_key(|d| d.to_string());
    assert_eq!(offered, expected, "the first offers, as stored");
    Ok(id)
}

/// The first half of [`start_offering`]: the rollout stored, its members
/// pending.
async fn create_offering(
    store: &dyn Store,
    members: &[(DeviceId, u32)],
    offer: &[DeviceId],
) -> Result<i64, StoreError> {
    let rel = release("2.0", "2026-02-01T00:00:00Z");
    if store.release(&rel.version).await.unwrap().is_none() {
        store.insert_release(&rel).await.unwrap();
    }
    let policy = RolloutPolicy::default();
    let state = RolloutState::start(time(NOW));
    let plan = NewPlan {
        policy: &policy,
        state: &state,
        tags: None,
        from_versions: &[],
        offer,
    };
    store
        .create_rollout(
            &rel,
            members,
            false,
            DownloadLimits::default(),
            &plan,
            ts(NOW),
        )
        .await
        .map(|r| r.id)
}

/// Each member of `rollout`: its device, phase and outcome, and the
/// device's target.
async fn parts(
    store: &dyn Store,
    rollout: i64,
) -> Vec<(String, u32, Option<Outcome>, Option<i64>)> {
    store
        .rollout_members(rollout)
        .await
        .unwrap()
        .into_iter()
        .map(|(m, d)| (d.id.to_string(), m.phase, m.outcome, d.target_rollout))
        .collect()
}

/// What a replica loading its targets reads: (device, rollout), by device.
async fn targets_loaded(store: &dyn Store) -> Vec<(String, i64)> {
    let mut loaded: Vec<_> = store
        .device_targets()
        .await
        .unwrap()
        .into_iter()
        .map(|(d, t)| (d.to_string(), t.rollout_id))
        .collect();
    loaded.sort();
    loaded
}

fn change(now: &str) -> RolloutChange<'static> {
    RolloutChange {
        state: None,
        offer: &[],
        settle: &[],
        accept_failures: &[],
        withdraw: &[],
        hold: &[],
        now: ts(now),
    }
}

/// A mark strictly after every change made so far: SQLite's clock counts
/// milliseconds, and a change in the mark's millisecond is read as changed
/// at it (never missed; here, though, it would be read again).
async fn mark_after_changes(store: &dyn Store) -> Timestamp {
    tokio::time::sleep(std::time::Duration::from_millis(3)).await;
    store.change_mark().await.unwrap()
}

// ---- cases ----

async fn devices_enroll_once_and_are_found_by_id_and_key(db: &Db) {
    let store = db.open().await;
    enroll(
        &*store,
        &[("dev-b", "gw", "hw-2"), ("dev-a", "cam", "hw-1")],
    )
    .await;
    let again = store.insert_device(&device("dev-a", "gw", "hw-9")).await;
    assert!(matches!(again, Err(StoreError::Conflict(_))), "{again:?}");
    let mut taken_key = device("dev-c", "gw", "hw-3");
    taken_key.public_key = "key-dev-b".into();
    let again = store.insert_device(&taken_key).await;
    assert!(matches!(again, Err(StoreError::Conflict(_))), "{again:?}");

    let a = store.device(&id("dev-a")).await.unwrap().unwrap();
    assert_eq!(a.device_type.as_str(), "cam");
    assert_eq!(a.enrolled_at.to_string(), "2026-01-01T00:00:00Z");
    assert_eq!((a.last_seen, a.state, a.target_rollout), (None, None, None));
    let by_key = store.device_by_public_key("key-dev-b").await.unwrap();
    assert_eq!(by_key.map(|d| d.id), Some(id("dev-b")));
    assert!(store.device(&id("dev-x")).await.unwrap().is_none());
    assert_eq!(
        ids(&store.list_devices().await.unwrap()),
        ["dev-a", "dev-b"]
    );
    assert_eq!(store.count_devices().await.unwrap(), 2);
    assert_eq!(
        store.devices_of_type(&"gw".parse().unwrap()).await.unwrap(),
        [id("dev-b")]
    );
    assert_eq!(
        store
            .unknown_devices(&[id("dev-z"), id("dev-a"), id("dev-y")])
            .await
            .unwrap(),
        [id("dev-z"), id("dev-y")]
    );

    // Reports: a report writes the state; a write without one (a device
    // seen, nothing said) and without an address keeps what is known.
    let mut report = seen("dev-a", AgentState::Failed, "1.0", "2026-01-02T00:00:00Z");
    report.address = Some("192.0.2.7:50123".into());
    if let Some(r) = report.report.as_mut() {
        r.error = Some(WireError::new(ErrorKind::DownloadFailed, "no route"));
        r.target_version = Some(version("2.0"));
        r.progress = Some(uplift_proto::channel::Progress {
            done_bytes: 5,
            total_bytes: 10,
            fetched_bytes: 4,
        });
    }
    let later = ReportedState {
        id: id("dev-a"),
        report: None,
        last_seen: Some(ts("2026-01-03T00:00:00Z")),
        address: None,
    };
    assert_eq!(store.record_reports(&[report]).await.unwrap(), 1);
    assert_eq!(store.record_reports(&[later]).await.unwrap(), 1);
    let a = store.device(&id("dev-a")).await.unwrap().unwrap();
    assert_eq!(a.last_seen, Some(ts("2026-01-03T00:00:00Z")));
    assert_eq!(a.address.as_deref(), Some("192.0.2.7:50123"));
    assert_eq!(a.state, Some(AgentState::Failed));
    assert_eq!(a.reported_target, Some(version("2.0")));
    assert_eq!(a.progress.map(|p| p.fetched_bytes), Some(4));
    assert_eq!(
        a.last_error.map(|e| e.kind),
        Some(ErrorKind::DownloadFailed)
    );
    let census = store.device_census().await.unwrap();
    assert_eq!(census.iter().map(|c| c.devices).sum::<u64>(), 2);
    assert!(census.iter().any(|c| c.state.as_deref() == Some("failed")
        && c.error_kind.as_deref() == Some("download_failed")
        && c.devices == 1));
}

async fn device_lists_filter_by_every_field_and_page_by_id(db: &Db) {
    let store = db.open().await;
    enroll(
        &*store,
        &[
            ("dev-a", "gw", "hw_1"),
            ("dev-b", "gw", "hw.2"),
            ("dev-c", "cam", "serial-3"),
            ("dev-d", "gw", "HWX1"),
            ("dev-e", "gw", "aa:bb"),
        ],
    )
    .await;
    store
        .record_reports(&[
            seen("dev-a", AgentState::Idle, "1.0", "2026-02-01T10:00:00Z"),
            seen(
                "dev-b",
                AgentState::Downloading,
                "1.0",
                "2026-02-01T10:00:00.5Z",
            ),
            seen(
                "dev-c",
                AgentState::Idle,
                "2.0",
                "2026-02-03T00:00:00+02:00",
            ),
            seen("dev-d", AgentState::Failed, "1.1", "2026-02-05T00:00:00Z"),
        ])
        .await
        .unwrap();
    for (name, t) in [
        ("dev-a", &["canary", "berlin"][..]),
        ("dev-b", &["berlin"]),
        ("dev-d", &["canary"]),
    ] {
        let update = store
            .change_tags(&id(name), None, &[], &tags(t), 32)
            .await
            .unwrap();
        assert!(matches!(update, TagUpdate::Updated(_)), "{update:?}");
    }
    assert_eq!(
        store.tags_of(&[id("dev-b"), id("dev-a")]).await.unwrap(),
        [
            (id("dev-a"), "berlin".parse().unwrap()),
            (id("dev-a"), "canary".parse().unwrap()),
            (id("dev-b"), "berlin".parse().unwrap()),
        ]
    );
    let by = |f: &dyn Fn(&mut DeviceFilter)| {
        let mut filter = DeviceFilter::default();
        f(&mut filter);
        filter
    };
    let text = |t: &str| by(&|f| f.text = Some(t.into()));
    let cases: Vec<(DeviceFilter, Vec<&str>)> = vec![
        (
            DeviceFilter::default(),
            vec!["dev-a", "dev-b", "dev-c", "dev-d", "dev-e"],
        ),
        (
            by(&|f| f.device_type = Some("cam".parse().unwrap())),
            vec!["dev-c"],
        ),
        (
            by(&|f| f.versions = vec![version("1.0")]),
            vec!["dev-a", "dev-b"],
        ),
        (
            by(&|f| f.versions = vec![version("1.1"), version("2.0")]),
            vec!["dev-c", "dev-d"],
        ),
        (by(&|f| f.state = Some(AgentState::Failed)), vec!["dev-d"]),
        (
            by(&|f| f.tags = Some(TagSelector::All(tags(&["canary", "berlin"])))),
            vec!["dev-a"],
        ),
        (
            by(&|f| f.tags = Some(TagSelector::Any(tags(&["canary", "berlin"])))),
            vec!["dev-a", "dev-b", "dev-d"],
        ),
        (by(&|f| f.tags = Some(TagSelector::Any(vec![]))), vec![]),
        (
            by(&|f| f.tags = Some(TagSelector::All(vec![]))),
            vec!["dev-a", "dev-b", "dev-c", "dev-d", "dev-e"],
        ),
        (text("hw_"), vec!["dev-a"]),
        (text("%"), vec![]),
        (text("W."), vec!["dev-b"]),
        (text("hwx"), vec!["dev-d"]),
        (text("A:B"), vec!["dev-e"]),
        (
            by(&|f| f.seen_after = Some(ts("2026-02-01T10:00:00.1Z"))),
            vec!["dev-b", "dev-c", "dev-d"],
        ),
        (
            by(&|f| f.seen_after = Some(ts("2026-02-02T21:59:00Z"))),
            vec!["dev-c", "dev-d"],
        ),
        (
            by(&|f| f.seen_before = Some(ts("2026-02-02T22:01:00Z"))),
            vec!["dev-a", "dev-b", "dev-c", "dev-e"],
        ),
        (
            by(&|f| {
                f.online = Some(true);
                f.connected = vec![id("dev-e"), id("dev-b")];
            }),
            vec!["dev-b", "dev-e"],
        ),
        (
            by(&|f| {
                f.online = Some(false);
                f.connected = vec![id("dev-e"), id("dev-b")];
            }),
            vec!["dev-a", "dev-c", "dev-d"],
        ),
        (by(&|f| f.online = Some(true)), vec![]),
        // A connected device counts as seen now.
        (
            by(&|f| {
                f.seen_after = Some(ts("2026-02-04T00:00:00Z"));
                f.connected = vec![id("dev-a")];
            }),
            vec!["dev-a", "dev-d"],
        ),
        (
            by(&|f| {
                f.device_type = Some("gw".parse().unwrap());
                f.tags = Some(TagSelector::Any(tags(&["canary"])));
                f.state = Some(AgentState::Idle);
            }),
            vec!["dev-a"],
        ),
    ];
    for (filter, expected) in cases {
        let page = store.device_page(&filter, None, 100).await.unwrap();
        assert_eq!(ids(&page), expected, "{filter:?}");
    }
    // Keyset pages: two at a time, each after the last one seen.
    let mut seen_ids = Vec::new();
    let mut after: Option<DeviceId> = None;
    loop {
        let page = store
            .device_page(&DeviceFilter::default(), after.as_ref(), 2)
            .await
            .unwrap();
        if page.is_empty() {
            break;
        }
        seen_ids.extend(page.iter().map(|d| d.id.to_string()));
        after = page.last().map(|d| d.id.clone());
    }
    assert_eq!(seen_ids, ["dev-a", "dev-b", "dev-c", "dev-d", "dev-e"]);
    let tagged = store
        .device_page(
            &by(&|f| f.tags = Some(TagSelector::Any(tags(&["canary", "berlin"])))),
            Some(&id("dev-a")),
            1,
        )
        .await
        .unwrap();
    assert_eq!(ids(&tagged), ["dev-b"]);
}

/// Two events within one second, given with different numbers of fraction
/// digits (or none), keep their order wherever the store orders or
/// compares by time.
async fn times_within_one_second_keep_their_order(db: &Db) {
    let store = db.open().await;
    // As text, "10:00:00Z" sorts after "10:00:00.5Z": stored as times, not.
    store
        .insert_release(&release("1.1", "2026-01-01T10:00:00.5Z"))
        .await
        .unwrap();
    store
        .insert_release(&release("1.0", "2026-01-01T10:00:00Z"))
        .await
        .unwrap();
    store
        .insert_release(&release("1.2", "2026-01-01T12:00:00.75+02:00"))
        .await
        .unwrap();
    let releases = store.list_releases().await.unwrap();
    let order: Vec<(&str, String)> = releases
        .iter()
        .map(|r| (r.version.as_str(), r.created_at.to_string()))
        .collect();
    assert_eq!(
        order,
        [
            ("1.0", "2026-01-01T10:00:00Z".to_owned()),
            ("1.1", "2026-01-01T10:00:00.5Z".to_owned()),
            ("1.2", "2026-01-01T10:00:00.75Z".to_owned()),
        ]
    );
    assert_eq!(
        releases[0].expires_at.map(|t| t.to_string()).as_deref(),
        Some("2027-01-01T00:00:00.25Z")
    );
    // Devices enrolled within one second list in enrollment order.
    for (name, at) in [
        ("dev-1", "2026-01-01T10:00:00.9Z"),
        ("dev-2", "2026-01-01T10:00:00.10Z"),
        ("dev-3", "2026-01-01T10:00:00Z"),
        ("dev-4", "2026-01-01T10:00:00.000001Z"),
    ] {
        let mut d = device(name, "gw", "hw-1");
        d.enrolled_at = ts(at);
        store.insert_device(&d).await.unwrap();
    }
    assert_eq!(
        ids(&store.list_devices().await.unwrap()),
        ["dev-3", "dev-4", "dev-2", "dev-1"]
    );
    // The history's horizon cuts within the second.
    let event = |at: &str| NewEvent {
        device: id("dev-1"),
        at: ts(at),
        event: DeviceEventKind::Offer {
            rollout_id: 1,
            version: version("2.0"),
        },
    };
    store
        .record_events(
            &[
                event("2026-01-01T10:00:00Z"),
                event("2026-01-01T10:00:00.4Z"),
                event("2026-01-01T10:00:00.75Z"),
            ],
            10,
        )
        .await
        .unwrap();
    assert_eq!(
        store
            .prune_events(ts("2026-01-01T10:00:00.5Z"))
            .await
            .unwrap(),
        2
    );
    let left = store.device_history(&id("dev-1"), None, 10).await.unwrap();
    assert_eq!(
        left.iter().map(|e| e.at.as_str()).collect::<Vec<_>>(),
        ["2026-01-01T10:00:00.75Z"]
    );
}

async fn tags_change_in_one_step_and_refuse_too_many(db: &Db) {
    let store = db.open().await;
    enroll(&*store, &[("dev-a", "gw", "hw-1")]).await;
    let dev = id("dev-a");
    let change = |set: Option<&'static [&'static str]>,
                  remove: &'static [&'static str],
                  add: &'static [&'static str]| {
        let store = store.clone();
        let dev = dev.clone();
        async move {
            let set = set.map(tags);
            store
                .change_tags(&dev, set.as_deref(), &tags(remove), &tags(add), 3)
                .await
                .unwrap()
        }
    };
    let updated = |t: &[&str]| TagUpdate::Updated(tags(t));
    assert_eq!(
        change(None, &[], &["b", "a", "a"]).await,
        updated(&["a", "b"])
    );
    assert_eq!(
        change(None, &["a", "zz"], &["c"]).await,
        updated(&["b", "c"])
    );
    assert_eq!(
        change(None, &[], &["d", "e"]).await,
        TagUpdate::TooMany { count: 4 }
    );
    assert_eq!(change(None, &[], &[]).await, updated(&["b", "c"]));
    assert_eq!(
        change(Some(&["x"]), &[], &["y"]).await,
        updated(&["x", "y"])
    );
    assert_eq!(change(Some(&[]), &[], &[]).await, updated(&[]));
    let unknown = store
        .change_tags(&id("dev-nope"), None, &[], &tags(&["a"]), 3)
        .await
        .unwrap();
    assert_eq!(unknown, TagUpdate::UnknownDevice);
}

async fn history_keeps_the_newest_per_device_and_prunes_by_age(db: &Db) {
    let store = db.open().await;
    enroll(&*store, &[("dev-a", "gw", "hw-1"), ("dev-b", "gw", "hw-2")]).await;
    let event = |device: &str, n: i64, at: &str| NewEvent {
        device: id(device),
        at: ts(at),
        event: DeviceEventKind::Offer {
            rollout_id: n,
            version: version("2.0"),
        },
    };
    let rollouts = |events: &[uplift_proto::api::DeviceEvent]| -> Vec<i64> {
        events
            .iter()
            .map(|e| match e.event {
                DeviceEventKind::Offer { rollout_id, .. } => rollout_id,
                _ => unreachable!(),
            })
            .collect()
    };
    let (a, b) = (id("dev-a"), id("dev-b"));
    let batch: Vec<NewEvent> = (1..=5)
        .map(|n| event("dev-a", n, "2026-01-01T00:00:00Z"))
        .chain([event("dev-b", 1, "2026-01-01T00:00:00Z")])
        .collect();
    assert_eq!(store.record_events(&batch, 3).await.unwrap(), 6);
    assert_eq!(
        rollouts(&store.device_history(&a, None, 100).await.unwrap()),
        [5, 4, 3]
    );
    let page = store.device_history(&a, None, 2).await.unwrap();
    assert_eq!(rollouts(&page), [5, 4]);
    let older = store.device_history(&a, Some(page[1].id), 2).await.unwrap();
    assert_eq!(rollouts(&older), [3]);
    store
        .record_events(&[event("dev-a", 6, "2026-03-01T00:00:00Z")], 3)
        .await
        .unwrap();
    assert_eq!(
        store
            .prune_events(ts("2026-02-01T00:00:00Z"))
            .await
            .unwrap(),
        3
    );
    assert_eq!(
        rollouts(&store.device_history(&a, None, 100).await.unwrap()),
        [6]
    );
    assert!(store
        .device_history(&b, None, 100)
        .await
        .unwrap()
        .is_empty());
    // Ids are never given out again, so a cursor keeps its place.
    store
        .record_events(&[event("dev-b", 7, "2026-03-02T00:00:00Z")], 3)
        .await
        .unwrap();
    let newest = store.device_history(&b, None, 1).await.unwrap();
    assert!(newest[0].id > page[0].id);
}

async fn rollouts_store_phases_supersede_older_parts_and_refuse_unknown_devices(db: &Db) {
    let store = db.open().await;
    enroll(
        &*store,
        &[
            ("dev-1", "gw", "hw-1"),
            ("dev-2", "gw", "hw-2"),
            ("dev-3", "gw", "hw-3"),
        ],
    )
    .await;
    let first = start(&*store, &[("dev-1", 0), ("dev-2", 1)]).await.unwrap();
    let record = store.rollout(first).await.unwrap().unwrap();
    assert_eq!(record.created_at, ts(NOW));
    assert_eq!(record.release, version("2.0"));
    let plan = store.rollout_plan(first).await.unwrap().unwrap();
    assert_eq!((plan.state.name(), plan.revision), ("running", 0));
    // dev-2 finishes its part in the first rollout.
    let settle = [(id("dev-2"), Outcome::Succeeded, None)];
    assert!(store
        .apply_rollout_change(
            first,
            0,
            &RolloutChange {
                settle: &settle,
                ..change(NOW)
            }
        )
        .await
        .unwrap());

    let refused = start(&*store, &[("dev-1", 0), ("dev-9", 0), ("dev-8", 1)]).await;
    assert!(
        matches!(&refused, Err(StoreError::NotFound(m)) if m.contains("device dev-9 is not enrolled")),
        "{refused:?}"
    );
    assert_eq!(store.list_rollouts().await.unwrap().len(), 1);

    let second = start(&*store, &[("dev-3", 1), ("dev-1", 0), ("dev-2", 0)])
        .await
        .unwrap();
    assert!(second > first);
    let part = |d: &str, phase, outcome| (d.to_owned(), phase, outcome, None);
    assert_eq!(
        parts(&*store, first).await,
        [
            part("dev-1", 0, Some(Outcome::Superseded)),
            part("dev-2", 1, Some(Outcome::Succeeded)),
        ]
    );
    assert_eq!(
        parts(&*store, second).await,
        [
            part("dev-1", 0, None),
            part("dev-2", 0, None),
            part("dev-3", 1, None)
        ]
    );
    assert_eq!(
        store.supersessions(None).await.unwrap(),
        [(first, second, 1)]
    );
    assert_eq!(
        store.supersessions(Some(second)).await.unwrap(),
        [(first, second, 1)]
    );
    assert_eq!(store.active_rollouts().await.unwrap(), [first, second]);
    assert_eq!(
        store
            .rollout_plans()
            .await
            .unwrap()
            .iter()
            .map(|(id, _)| *id)
            .collect::<Vec<_>>(),
        [first, second]
    );
    let tallies = store.phase_tallies(None).await.unwrap();
    let tally = |r: i64, phase: u32| {
        tallies
            .iter()
            .find(|(id, p, _)| *id == r && *p == phase)
            .map(|(_, _, t)| (t.devices, t.offered, t.succeeded, t.failed))
    };
    assert_eq!(tally(first, 1), Some((1, 0, 1, 0)));
    assert_eq!(tally(second, 0), Some((2, 0, 0, 0)));
    assert_eq!(store.phase_tallies(Some(second)).await.unwrap().len(), 2);
    // Devices waiting for their phase count as the newer rollout's; the
    // older one's are all taken over (dev-2 finished there, but a newer
    // rollout has it now).
    let tallies = store.rollout_tallies(None).await.unwrap();
    let view = |t: &RolloutTally| (t.total, t.superseded, t.counts.pending, t.counts.succeeded);
    assert_eq!(
        tallies
            .iter()
            .map(|(id, t)| (*id, view(t)))
            .collect::<Vec<_>>(),
        [(first, (2, 2, 0, 0)), (second, (3, 0, 3, 0))]
    );
    assert_eq!(
        store.rollout_tallies(Some(second)).await.unwrap(),
        [tallies[1].clone()]
    );
}

async fn rollout_steps_check_the_revision_and_move_offers(db: &Db) {
    let store = db.open().await;
    enroll(
        &*store,
        &[
            ("dev-1", "gw", "hw-1"),
            ("dev-2", "gw", "hw-2"),
            ("dev-3", "gw", "hw-3"),
        ],
    )
    .await;
    let r = start(&*store, &[("dev-1", 0), ("dev-2", 0), ("dev-3", 1)])
        .await
        .unwrap();
    let offer = [id("dev-1"), id("dev-2"), id("dev-3")];
    let later = "2026-03-01T12:00:01Z";
    assert!(store
        .apply_rollout_change(
            r,
            0,
            &RolloutChange {
                offer: &offer,
                ..change(later)
            }
        )
        .await
        .unwrap());
    // The same revision again: another actor moved it on; nothing written.
    let paused = RolloutState::Finished { at: time(later) };
    let stale = RolloutChange {
        state: Some(&paused),
        withdraw: &offer,
        ..change(later)
    };
    assert!(!store.apply_rollout_change(r, 0, &stale).await.unwrap());
    let plan = store.rollout_plan(r).await.unwrap().unwrap();
    assert_eq!((plan.state.name(), plan.revision), ("running", 1));
    let targets = store.device_targets().await.unwrap();
    assert_eq!(targets.len(), 3);
    assert!(targets
        .iter()
        .all(|(_, t)| t.rollout_id == r && t.version == version("2.0")));
    let members = store.rollout_members(r).await.unwrap();
    assert!(members
        .iter()
        .all(|(m, _)| m.offered_at == Some(ts("2026-03-01T12:00:01Z"))));

    // Settle one as failed and accept it, withdraw one, hold one.
    let settle = [(id("dev-1"), Outcome::Failed, Some("no space".to_owned()))];
    let accept = [id("dev-1")];
    let withdraw = [id("dev-2")];
    let hold = [id("dev-3")];
    let step = RolloutChange {
        state: Some(&paused),
        settle: &settle,
        accept_failures: &accept,
        withdraw: &withdraw,
        hold: &hold,
        ..change(later)
    };
    assert!(store.apply_rollout_change(r, 1, &step).await.unwrap());
    let members = store.rollout_members(r).await.unwrap();
    type Part<'a> = (&'a str, Option<Outcome>, bool, bool, Option<&'a str>);
    let view: Vec<Part> = members
        .iter()
        .map(|(m, d)| {
            (
                d.id.as_str(),
                m.outcome,
                m.offered_at.is_some(),
                m.failure_accepted,
                m.error.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        view,
        [
            ("dev-1", Some(Outcome::Failed), true, true, Some("no space")),
            ("dev-2", Some(Outcome::Withdrawn), true, false, None),
            ("dev-3", None, false, false, None),
        ]
    );
    let target = |d: &str| {
        let store = store.clone();
        let d = id(d);
        async move { store.device(&d).await.unwrap().unwrap().target_rollout }
    };
    assert_eq!(
        (
            target("dev-1").await,
            target("dev-2").await,
            target("dev-3").await
        ),
        (Some(r), None, None)
    );
    assert_eq!(store.active_rollouts().await.unwrap(), Vec::<i64>::new());
    let tallies = store.phase_tallies(Some(r)).await.unwrap();
    assert_eq!(
        tallies
            .iter()
            .map(|(_, p, t)| (*p, t.devices, t.offered, t.failed))
            .collect::<Vec<_>>(),
        [(0, 2, 2, 1), (1, 1, 0, 0)]
    );
}

/// The revision check holds across stores (server replicas) writing at
/// once: of many steps from the same revision, exactly one is applied.
async fn a_stale_revision_loses_to_a_concurrent_writer_on_another_store(db: &Db) {
    let stores = [db.open().await, db.open().await];
    enroll(&*stores[0], &[("dev-1", "gw", "hw-1")]).await;
    let r = start(&*stores[0], &[("dev-1", 0)]).await.unwrap();
    for revision in 0..5 {
        let mut tasks = Vec::new();
        for i in 0..8 {
            let store = stores[i % 2].clone();
            tasks.push(tokio::spawn(async move {
                let offer = [id("dev-1")];
                store
                    .apply_rollout_change(
                        r,
                        revision,
                        &RolloutChange {
                            offer: &offer,
                            ..change("2026-03-01T12:00:02Z")
                        },
                    )
                    .await
                    .unwrap()
            }));
        }
        let mut won = 0;
        for task in tasks {
            won += task.await.unwrap() as u32;
        }
        assert_eq!(won, 1, "at revision {revision}");
    }
    let plan = stores[1].rollout_plan(r).await.unwrap().unwrap();
    assert_eq!(plan.revision, 5);
}

async fn rollout_members_page_by_phase_and_device(db: &Db) {
    let store = db.open().await;
    let names: Vec<String> = (0..7).map(|i| format!("dev-{i}")).collect();
    for n in &names {
        store.insert_device(&device(n, "gw", "hw-1")).await.unwrap();
    }
    let members: Vec<(&str, u32)> = names
        .iter()
        .enumerate()
        .map(|(i, n)| (n.as_str(), (i % 3) as u32))
        .collect();
    let r = start(&*store, &members).await.unwrap();
    let settle = [(id("dev-3"), Outcome::Succeeded, None)];
    assert!(store
        .apply_rollout_change(
            r,
            0,
            &RolloutChange {
                settle: &settle,
                ..change(NOW)
            }
        )
        .await
        .unwrap());
    let mut all = Vec::new();
    let mut page = MemberPage {
        phase: None,
        outcome: None,
        after: None,
        limit: 3,
    };
    loop {
        let got = store.rollout_members_page(r, &page).await.unwrap();
        if got.is_empty() {
            break;
        }
        let last = got.last().unwrap();
        page.after = Some((last.0.phase, last.1.id.clone()));
        all.extend(got.iter().map(|(m, d)| format!("{}:{}", m.phase, d.id)));
    }
    assert_eq!(
        all,
        ["0:dev-0", "0:dev-3", "0:dev-6", "1:dev-1", "1:dev-4", "2:dev-2", "2:dev-5"]
    );
    let filtered = |phase, outcome| MemberPage {
        phase,
        outcome,
        after: None,
        limit: 10,
    };
    let names_of = |page: Vec<(
        uplift_server::store::MemberRecord,
        uplift_server::store::DeviceRecord,
    )>| {
        page.into_iter()
            .map(|(_, d)| d.id.to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        names_of(
            store
                .rollout_members_page(r, &filtered(Some(1), None))
                .await
                .unwrap()
        ),
        ["dev-1", "dev-4"]
    );
    assert_eq!(
        names_of(
            store
                .rollout_members_page(r, &filtered(None, Some(MemberOutcome::Succeeded)))
                .await
                .unwrap()
        ),
        ["dev-3"]
    );
    assert_eq!(
        names_of(
            store
                .rollout_members_page(r, &filtered(Some(0), Some(MemberOutcome::Unfinished)))
                .await
                .unwrap()
        ),
        ["dev-0", "dev-6"]
    );
}

/// The fleet summary's and the rollout views' aggregates, each one query.
async fn the_fleet_census_and_devices_in_rollouts_count_in_the_database(db: &Db) {
    let store = db.open().await;
    let names: Vec<String> = (0..12).map(|i| format!("dev-{i:02}")).collect();
    for (i, n) in names.iter().enumerate() {
        let t = if i % 4 == 0 { "cam" } else { "gw" };
        store.insert_device(&device(n, t, "hw-1")).await.unwrap();
    }
    let state = |i: usize| match i % 4 {
        0 => (AgentState::Idle, "2.0"),
        1 => (AgentState::Downloading, "1.0"),
        2 => (AgentState::Failed, "1.0"),
        _ => (AgentState::Idle, "1.0"),
    };
    let reports: Vec<ReportedState> = names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let (s, v) = state(i);
            let mut r = seen(n, s, v, "2026-03-01T00:00:00Z");
            if let Some(report) = r.report.as_mut() {
                report.target_version = (i % 4 == 1 || i % 4 == 2).then(|| version("2.0"));
            }
            r
        })
        .collect();
    store.record_reports(&reports).await.unwrap();
    // Rollout 1 takes the first eight (phase 0 offered, phase 1 waiting);
    // rollout 2 takes over dev-06 and dev-07.
    let first: Vec<(&str, u32)> = names[..8]
        .iter()
        .enumerate()
        .map(|(i, n)| (n.as_str(), (i / 4) as u32))
        .collect();
    let r1 = start(&*store, &first).await.unwrap();
    let offer: Vec<DeviceId> = names[..4].iter().map(|n| id(n)).collect();
    assert!(store
        .apply_rollout_change(
            r1,
            0,
            &RolloutChange {
                offer: &offer,
                ..change(NOW)
            }
        )
        .await
        .unwrap());
    let r2 = start(&*store, &[("dev-06", 0), ("dev-07", 0)])
        .await
        .unwrap();

    let connected = [
        id("dev-00"),
        id("dev-05"),
        id("dev-05"),
        id("dev-11"),
        id("dev-99"),
    ];
    let groups = store.fleet_census(&connected).await.unwrap();
    let sum = |f: &dyn Fn(&uplift_server::store::FleetGroup) -> bool| -> (u64, u64) {
        groups
            .iter()
            .filter(|g| f(g))
            .fold((0, 0), |(d, o), g| (d + g.devices, o + g.online))
    };
    assert_eq!(sum(&|_| true), (12, 3));
    assert_eq!(sum(&|g| g.device_type.as_str() == "cam"), (3, 1));
    assert_eq!(sum(&|g| g.state == Some(AgentState::Downloading)), (3, 1));
    assert_eq!(sum(&|g| g.version == Some(version("2.0"))), (3, 1));

    let tallies = store.rollout_tallies(None).await.unwrap();
    let view = |t: &RolloutTally| {
        let c = &t.counts;
        (
            t.total,
            t.superseded,
            c.pending,
            c.in_progress,
            c.succeeded,
            c.failed,
        )
    };
    assert_eq!(
        tallies
            .iter()
            .map(|(id, t)| (*id, view(t)))
            .collect::<Vec<_>>(),
        [(r1, (8, 2, 1, 2, 2, 1)), (r2, (2, 0, 1, 0, 0, 1))]
    );
    let counted: u64 = tallies
        .iter()
        .map(|(_, t)| t.counts.pending + t.counts.in_progress)
        .sum();
    let in_rollouts = store.devices_in_rollouts().await.unwrap();
    assert_eq!(in_rollouts, counted);
    // Pending or in progress: dev-01 (downloading 2.0), dev-03 (on 1.0),
    // dev-05 (waiting for phase 1, downloading 2.0) and dev-07 (r2's, on
    // 1.0); not dev-00 and dev-04 (done), dev-02 and dev-06 (failed on 2.0).
    assert_eq!(in_rollouts, 4, "r1 {r1}, r2 {r2}");
}

async fn dynamic_rollouts_add_members_unless_a_newer_rollout_has_them(db: &Db) {
    let store = db.open().await;
    enroll(&*store, &[("dev-1", "gw", "hw-1"), ("dev-2", "gw", "hw-2")]).await;
    let older = start(&*store, &[("dev-1", 0)]).await.unwrap();
    let newer = start(&*store, &[("dev-2", 0)]).await.unwrap();
    // The newer rollout takes dev-1 over from the older one.
    assert!(store
        .add_rollout_member(newer, &id("dev-1"), 2)
        .await
        .unwrap());
    assert!(!store
        .add_rollout_member(newer, &id("dev-1"), 2)
        .await
        .unwrap());
    // The older one cannot take dev-2 from the newer.
    assert!(!store
        .add_rollout_member(older, &id("dev-2"), 0)
        .await
        .unwrap());
    let members = store.rollout_members(newer).await.unwrap();
    assert_eq!(
        members
            .iter()
            .map(|(m, d)| (d.id.as_str(), m.phase))
            .collect::<Vec<_>>(),
        [("dev-2", 0), ("dev-1", 2)]
    );
    let old = store.rollout_members(older).await.unwrap();
    assert_eq!(old[0].0.outcome, Some(Outcome::Superseded));
    // A device that is not enrolled, or was removed, joins nothing (no
    // foreign key says so on PostgreSQL: the statement does).
    enroll(&*store, &[("dev-3", "gw", "hw-3")]).await;
    store
        .remove_device(&id("dev-3"), ts("2026-12-05T10:00:00Z"))
        .await
        .unwrap();
    for device in ["dev-3", "dev-unknown"] {
        assert!(
            !store
                .add_rollout_member(newer, &id(device), 1)
                .await
                .unwrap(),
            "{device}"
        );
    }
    assert_eq!(store.rollout_members(newer).await.unwrap().len(), 2);
}

async fn tokens_audit_and_webhooks_keep_what_they_are_given(db: &Db) {
    let store = db.open().await;
    let name: TokenName = "ci".parse().unwrap();
    let token = store
        .insert_api_token(&NewApiToken {
            name: &name,
            role: Role::Operator,
            secret_sha256: "abc",
            created_at: ts("2026-12-05T10:00:00.5Z"),
            created_by: "bootstrap-admin",
            expires_at: Some(ts("2027-01-01T00:00:00Z")),
            max_uses: Some(2),
        })
        .await
        .unwrap();
    assert_eq!(token.created_at, "2026-12-05T10:00:00.5Z");
    assert_eq!((token.max_uses, token.uses), (Some(2), 0));
    // Counted up to its limit, and no further, from any replica.
    let replica = db.open().await;
    assert!(store.use_api_token(token.id).await.unwrap());
    assert!(replica.use_api_token(token.id).await.unwrap());
    assert!(!store.use_api_token(token.id).await.unwrap(), "used up");
    assert!(!store.use_api_token(999).await.unwrap());
    let token = store.api_token_by_digest("abc").await.unwrap().unwrap();
    assert_eq!(token.uses, 2);
    let found = store.api_token_by_digest("abc").await.unwrap().unwrap();
    assert_eq!(found, token);
    assert!(store.api_token_by_digest("abd").await.unwrap().is_none());
    let revoked = store
        .revoke_api_token(token.id, ts("2026-12-06T00:00:00Z"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(revoked.revoked_at.as_deref(), Some("2026-12-06T00:00:00Z"));
    // Revoking again keeps the first time.
    let again = store
        .revoke_api_token(token.id, ts("2026-12-07T00:00:00Z"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(again.revoked_at, revoked.revoked_at);
    assert!(store
        .revoke_api_token(999, ts(NOW))
        .await
        .unwrap()
        .is_none());
    assert_eq!(store.list_api_tokens().await.unwrap().len(), 1);

    let refused = WireError::new(ErrorKind::Conflict, "no");
    for (i, action) in [
        AuditAction::RolloutStart,
        AuditAction::RolloutPause,
        AuditAction::RolloutStart,
    ]
    .into_iter()
    .enumerate()
    {
        store
            .append_audit(&NewAuditEntry {
                at: ts("2026-12-05T10:00:00Z"),
                actor: "bootstrap-admin",
                token_id: (i == 1).then_some(token.id),
                role: Role::Admin,
                action,
                target: &format!("rollout {}", i % 2),
                error: (i == 2).then_some(&refused),
            })
            .await
            .unwrap();
    }
    let all = store
        .audit_entries(&AuditQuery::default(), 10)
        .await
        .unwrap();
    assert_eq!(all.iter().map(|e| e.id).collect::<Vec<_>>(), [3, 2, 1]);
    assert_eq!(
        all[0].error.as_ref().map(|e| e.kind),
        Some(ErrorKind::Conflict)
    );
    assert_eq!(all[1].token_id, Some(token.id));
    let starts = AuditQuery {
        action: Some(AuditAction::RolloutStart),
        before: Some(3),
        ..AuditQuery::default()
    };
    assert_eq!(store.audit_entries(&starts, 10).await.unwrap().len(), 1);

    let hook = store
        .insert_webhook(&NewWebhook {
            url: "http://127.0.0.1:9/a",
            secret: "s",
            filter: &Default::default(),
            created_at: ts("2026-12-05T10:00:00Z"),
            created_by: "bootstrap-admin",
        })
        .await
        .unwrap();
    let delivery = NewDelivery {
        webhook_id: hook.id,
        event: "rollout.finished".into(),
        payload: "{}".into(),
        created_at: ts("2026-12-05T10:00:00Z"),
        due_ms: 1_000,
    };
    store
        .insert_deliveries(&[delivery.clone(), delivery.clone(), delivery])
        .await
        .unwrap();
    let due = store.due_deliveries(1_000, 10).await.unwrap();
    assert_eq!(due.len(), 3);
    assert!(store.due_deliveries(999, 10).await.unwrap().is_empty());
    let error = WireError::new(ErrorKind::ServerUnreachable, "refused");
    store
        .record_attempt(
            due[0].id,
            &Attempt {
                at: ts("2026-12-05T10:00:01Z"),
                status: Some(204),
                error: None,
                retry_at_ms: None,
            },
        )
        .await
        .unwrap();
    store
        .record_attempt(
            due[1].id,
            &Attempt {
                at: ts("2026-12-05T10:00:01Z"),
                status: None,
                error: Some(&error),
                retry_at_ms: Some(5_000),
            },
        )
        .await
        .unwrap();
    let log = store.deliveries(hook.id, None, 10).await.unwrap();
    assert_eq!(log.len(), 3);
    let first = log.iter().find(|d| d.id == due[0].id).unwrap();
    assert_eq!(first.delivered_at.as_deref(), Some("2026-12-05T10:00:01Z"));
    let retried = log.iter().find(|d| d.id == due[1].id).unwrap();
    assert_eq!(retried.attempts, 1);
    assert_eq!(
        retried.next_attempt_at.as_deref(),
        Some("1970-01-01T00:00:05Z")
    );
    assert_eq!(store.due_deliveries(1_000, 10).await.unwrap().len(), 1);
    assert_eq!(store.prune_deliveries(0).await.unwrap(), 1);
    let removed = store
        .remove_webhook(hook.id, ts("2026-12-06T00:00:00Z"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(removed.removed_at.as_deref(), Some("2026-12-06T00:00:00Z"));
    assert!(store.due_deliveries(10_000, 10).await.unwrap().is_empty());
    assert_eq!(store.webhooks().await.unwrap().len(), 1);
}

async fn a_read_of_changes_returns_the_members_changed_since_a_mark_and_no_other(db: &Db) {
    let store = db.open().await;
    enroll(
        &*store,
        &[
            ("dev-1", "gw", "hw-1"),
            ("dev-2", "gw", "hw-2"),
            ("dev-3", "gw", "hw-3"),
            ("dev-4", "gw", "hw-4"),
        ],
    )
    .await;
    let r = start(&*store, &[("dev-1", 0), ("dev-2", 0), ("dev-3", 1)])
        .await
        .unwrap();
    let changed = |rows: Vec<(
        uplift_server::store::MemberRecord,
        uplift_server::store::DeviceStanding,
    )>| {
        let mut ids: Vec<String> = rows.into_iter().map(|(_, d)| d.id.to_string()).collect();
        ids.sort();
        ids
    };
    let before_start = ts("2000-01-01T00:00:00Z");
    assert_eq!(
        changed(store.rollout_member_changes(r, before_start).await.unwrap()),
        ["dev-1", "dev-2", "dev-3"],
        "a new rollout's members are all new"
    );
    let mark = mark_after_changes(&*store).await;
    assert!(mark > before_start, "the mark is the store's clock: {mark}");
    assert!(store
        .rollout_member_changes(r, mark)
        .await
        .unwrap()
        .is_empty());

    // A progress report alone changes nothing a rollout decides on.
    let mut downloading = seen(
        "dev-1",
        AgentState::Downloading,
        "1.0",
        "2026-03-01T12:00:02Z",
    );
    downloading.report.as_mut().unwrap().target_version = Some(version("2.0"));
    store.record_reports(&[downloading.clone()]).await.unwrap();
    let mark = mark_after_changes(&*store).await;
    let mut further = downloading.clone();
    further.report.as_mut().unwrap().progress = Some(uplift_proto::channel::Progress {
        done_bytes: 10,
        total_bytes: 20,
        fetched_bytes: 10,
    });
    store.record_reports(&[further]).await.unwrap();
    assert!(
        store
            .rollout_member_changes(r, mark)
            .await
            .unwrap()
            .is_empty(),
        "progress is not a change of standing"
    );
    // A new state (dev-2, reported by any replica's writer), an offer (dev-3,
    // a step of the rollout): each is a change. dev-4 is no member.
    store
        .record_reports(&[
            seen("dev-2", AgentState::Idle, "2.0", "2026-03-01T12:00:03Z"),
            seen("dev-4", AgentState::Idle, "2.0", "2026-03-01T12:00:03Z"),
        ])
        .await
        .unwrap();
    let offer = [id("dev-3")];
    assert!(store
        .apply_rollout_change(
            r,
            0,
            &RolloutChange {
                offer: &offer,
                ..change("2026-03-01T12:00:04Z")
            }
        )
        .await
        .unwrap());
    let rows = store.rollout_member_changes(r, mark).await.unwrap();
    let offered = rows
        .iter()
        .find(|(_, d)| d.id == id("dev-3"))
        .map(|(m, d)| (m.offered_at, d.target_rollout));
    assert_eq!(changed(rows), ["dev-2", "dev-3"]);
    assert_eq!(
        offered,
        Some((Some(ts("2026-03-01T12:00:04Z")), Some(r))),
        "read with its new row"
    );

    // A newer rollout that takes dev-1 over changes the older one's row.
    let mark = mark_after_changes(&*store).await;
    let newer = start(&*store, &[("dev-1", 0)]).await.unwrap();
    let rows = store.rollout_member_changes(r, mark).await.unwrap();
    assert_eq!(
        rows.iter()
            .map(|(m, d)| (d.id.as_str(), m.outcome))
            .collect::<Vec<_>>(),
        [("dev-1", Some(Outcome::Superseded))]
    );
    assert_eq!(
        changed(store.rollout_member_changes(newer, mark).await.unwrap()),
        ["dev-1"]
    );
}

async fn a_new_rollout_stores_its_first_offers_with_it(db: &Db) {
    let store = db.open().await;
    enroll(
        &*store,
        &[
            ("dev-1", "gw", "hw-1"),
            ("dev-2", "gw", "hw-2"),
            ("dev-3", "gw", "hw-3"),
        ],
    )
    .await;
    let members = [(id("dev-1"), 0), (id("dev-2"), 0), (id("dev-3"), 1)];
    let offer = [id("dev-2"), id("dev-1")];
    let r = start_offering(&*store, &members, &offer).await.unwrap();
    let stored = store.rollout_members(r).await.unwrap();
    let view: Vec<_> = stored
        .iter()
        .map(|(m, d)| (d.id.as_str(), m.offered_at, d.target_rollout))
        .collect();
    assert_eq!(
        view,
        [
            ("dev-1", Some(ts(NOW)), Some(r)),
            ("dev-2", Some(ts(NOW)), Some(r)),
            ("dev-3", None, None),
        ]
    );
    let plan = store.rollout_plan(r).await.unwrap().unwrap();
    assert_eq!(plan.revision, 0, "one write, the rollout's first");
    assert_eq!(
        targets_loaded(&*store).await,
        [("dev-1".to_owned(), r), ("dev-2".to_owned(), r)]
    );
}

async fn a_new_rollouts_members_are_pending_until_written_once_and_never_take_a_newer_ones_devices(
    db: &Db,
) {
    let store = db.open().await;
    let other = db.open().await;
    enroll(
        &*store,
        &[
            ("dev-1", "gw", "hw-1"),
            ("dev-2", "gw", "hw-2"),
            ("dev-3", "gw", "hw-3"),
            ("dev-4", "gw", "hw-4"),
        ],
    )
    .await;
    // The older start is cut short after its first transaction.
    let older = create_offering(
        &*store,
        &[(id("dev-1"), 0), (id("dev-2"), 0), (id("dev-4"), 0)],
        &[id("dev-1"), id("dev-2"), id("dev-4")],
    )
    .await
    .unwrap();
    assert!(store.rollout_members(older).await.unwrap().is_empty());
    // A replica loading its targets now still offers them.
    assert_eq!(
        targets_loaded(&*store).await,
        [
            ("dev-1".to_owned(), older),
            ("dev-2".to_owned(), older),
            ("dev-4".to_owned(), older)
        ]
    );
    let plan = store.rollout_plan(older).await.unwrap().unwrap();
    assert!(plan.members_pending);
    // Counted meanwhile from its pending list, every member pending, so a
    // view of it shows its devices from its start on.
    assert_eq!(
        pending_tally(&*store, older).await,
        Some((3, 3)),
        "total and pending"
    );
    assert_eq!(
        store.phase_tallies(Some(older)).await.unwrap(),
        [(older, 0, offered_phase(3, 3))]
    );
    assert_eq!(store.active_rollouts().await.unwrap(), Vec::<i64>::new());
    assert_eq!(
        store
            .rollouts_with_pending_members(ts("2026-03-01T12:00:01Z"))
            .await
            .unwrap(),
        [older]
    );
    assert_eq!(
        store.rollouts_with_pending_members(ts(NOW)).await.unwrap(),
        Vec::<i64>::new(),
        "pending since NOW, not before"
    );
    // Meanwhile dev-4 is removed, and a newer rollout takes dev-2 and is
    // written whole.
    store
        .remove_device(&id("dev-4"), ts("2026-03-01T12:00:00.5Z"))
        .await
        .unwrap();
    let newer = start_offering(
        &*store,
        &[(id("dev-2"), 0), (id("dev-3"), 0)],
        &[id("dev-2")],
    )
    .await
    .unwrap();
    // Still pending, the older one counts neither the removed device nor
    // the newer one's rows, and the newer one is counted from its rows.
    assert_eq!(pending_tally(&*store, older).await, Some((2, 2)));
    let all = store.rollout_tallies(None).await.unwrap();
    assert_eq!(
        all.iter().map(|(r, t)| (*r, t.total)).collect::<Vec<_>>(),
        [(older, 2), (newer, 2)]
    );
    assert_eq!(
        store.phase_tallies(None).await.unwrap(),
        [
            (older, 0, offered_phase(2, 2)),
            (newer, 0, offered_phase(2, 1))
        ]
    );
    // The older one's members written late, from another store (a
    // replica's scheduler), once: the newer one keeps dev-2, and dev-4 is
    // no one's.
    let offered = other.store_rollout_members(older).await.unwrap();
    assert_eq!(offered, Some(vec![id("dev-1")]), "the targets it set");
    assert_eq!(
        targets_loaded(&*store).await,
        [("dev-1".to_owned(), older), ("dev-2".to_owned(), newer)]
    );
    assert_eq!(store.store_rollout_members(older).await.unwrap(), None);
    let part = |d: &str, outcome, target| (d.to_owned(), 0, outcome, target);
    assert_eq!(
        parts(&*store, older).await,
        [
            part("dev-1", None, Some(older)),
            part("dev-2", Some(Outcome::Superseded), Some(newer)),
        ]
    );
    assert_eq!(
        parts(&*store, newer).await,
        [part("dev-2", None, Some(newer)), part("dev-3", None, None)]
    );
    assert!(
        !store
            .rollout_plan(older)
            .await
            .unwrap()
            .unwrap()
            .members_pending
    );
    assert_eq!(store.active_rollouts().await.unwrap(), [older, newer]);
    assert_eq!(
        store
            .rollouts_with_pending_members(ts("2026-03-01T12:00:01Z"))
            .await
            .unwrap(),
        Vec::<i64>::new()
    );
}

/// Rollout `id`'s (total, pending) as the store counts them, if it counts it.
async fn pending_tally(store: &dyn Store, id: i64) -> Option<(u64, u64)> {
    let tallies = store.rollout_tallies(Some(id)).await.unwrap();
    assert!(tallies.len() <= 1, "{tallies:?}");
    tallies.first().map(|(rollout, tally)| {
        assert_eq!(*rollout, id);
        assert_eq!(tally.superseded, 0);
        (tally.total, tally.counts.pending)
    })
}

/// A phase of `devices`, `offered` of them offered, none finished.
fn offered_phase(devices: u64, offered: u64) -> uplift_proto::api::PhaseTally {
    uplift_proto::api::PhaseTally {
        devices,
        offered,
        ..Default::default()
    }
}

async fn a_removed_device_is_kept_with_its_history_but_left_out_of_everything_else(db: &Db) {
    let store = db.open().await;
    enroll(
        &*store,
        &[
            ("dev-1", "gw", "hw-1"),
            ("dev-2", "gw", "hw-2"),
            ("dev-3", "gw", "hw-3"),
        ],
    )
    .await;
    store
        .change_tags(&id("dev-1"), None, &[], &tags(&["site-a"]), 8)
        .await
        .unwrap();
    store
        .record_events(
            &[NewEvent {
                device: id("dev-1"),
                at: ts(NOW),
                event: DeviceEventKind::Withdrawn { rollout_id: 9 },
            }],
            100,
        )
        .await
        .unwrap();
    let r = start_offering(
        &*store,
        &[(id("dev-1"), 0), (id("dev-2"), 0), (id("dev-3"), 1)],
        &[id("dev-1"), id("dev-2")],
    )
    .await
    .unwrap();
    // dev-2 finished its part already: a removal leaves a settled part as it is.
    let settle = [(id("dev-2"), Outcome::Succeeded, None)];
    assert!(store
        .apply_rollout_change(
            r,
            0,
            &RolloutChange {
                settle: &settle,
                ..change(NOW)
            }
        )
        .await
        .unwrap());
    let mark = mark_after_changes(&*store).await;

    let removed_at = "2026-03-02T08:00:00.5Z";
    assert_eq!(
        store
            .remove_device(&id("dev-1"), ts(removed_at))
            .await
            .unwrap(),
        Removal::Removed { rollouts: vec![r] }
    );
    assert_eq!(
        store
            .remove_device(&id("dev-2"), ts(removed_at))
            .await
            .unwrap(),
        Removal::Removed { rollouts: vec![] },
        "its only part was settled"
    );
    assert_eq!(
        store.remove_device(&id("dev-1"), ts(NOW)).await.unwrap(),
        Removal::AlreadyRemoved { at: ts(removed_at) }
    );
    assert_eq!(
        store.remove_device(&id("dev-9"), ts(NOW)).await.unwrap(),
        Removal::UnknownDevice
    );

    // Kept, marked removed, its key on record, its history there.
    let kept = store.device(&id("dev-1")).await.unwrap().unwrap();
    assert_eq!(kept.removed_at, Some(ts(removed_at)));
    assert_eq!(
        kept.target_rollout, None,
        "no longer pointed at the rollout"
    );
    let by_key = store.device_by_public_key("key-dev-1").await.unwrap();
    assert_eq!(by_key.map(|d| d.removed_at.is_some()), Some(true));
    let history = store.device_history(&id("dev-1"), None, 10).await.unwrap();
    assert_eq!(history.len(), 1, "the history is kept");
    // Its unfinished part ended as superseded (counts nowhere), and the
    // scheduler's read of changes sees it.
    let members = store.rollout_members(r).await.unwrap();
    let outcomes: Vec<_> = members
        .iter()
        .map(|(m, d)| (d.id.as_str(), m.outcome))
        .collect();
    assert_eq!(
        outcomes,
        [
            ("dev-1", Some(Outcome::Superseded)),
            ("dev-2", Some(Outcome::Succeeded)),
            ("dev-3", None)
        ]
    );
    let changed = store.rollout_member_changes(r, mark).await.unwrap();
    assert!(changed.iter().any(|(_, d)| d.id.as_str() == "dev-1"));
    assert!(store
        .device_targets()
        .await
        .unwrap()
        .iter()
        .all(|(d, _)| d.as_str() != "dev-1"));

    // Left out of every list and count; its tags gone.
    let listed = store.list_devices().await.unwrap();
    assert_eq!(ids(&listed), ["dev-3"]);
    let page = store
        .device_page(&DeviceFilter::default(), None, 10)
        .await
        .unwrap();
    assert_eq!(ids(&page), ["dev-3"]);
    let tagged = DeviceFilter {
        tags: Some(TagSelector::All(tags(&["site-a"]))),
        ..DeviceFilter::default()
    };
    assert!(store
        .device_page(&tagged, None, 10)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(store.count_devices().await.unwrap(), 1);
    let census: u64 = store
        .fleet_census(&[id("dev-1")])
        .await
        .unwrap()
        .iter()
        .map(|g| g.devices + g.online)
        .sum();
    assert_eq!(census, 1, "one device, not online");
    let census: u64 = store
        .device_census()
        .await
        .unwrap()
        .iter()
        .map(|g| g.devices)
        .sum();
    assert_eq!(census, 1);
    assert_eq!(
        store.devices_of_type(&"gw".parse().unwrap()).await.unwrap(),
        [id("dev-3")]
    );
    assert_eq!(
        store
            .unknown_devices(&[id("dev-1"), id("dev-3")])
            .await
            .unwrap(),
        [id("dev-1")]
    );
    assert!(store.tags_of(&[id("dev-1")]).await.unwrap().is_empty());
    assert_eq!(
        store
            .change_tags(&id("dev-1"), None, &[], &tags(&["x"]), 8)
            .await
            .unwrap(),
        TagUpdate::UnknownDevice
    );
    assert!(matches!(
        start(&*store, &[("dev-1", 0)]).await,
        Err(StoreError::NotFound(_))
    ));

    // The revoked key never enrolls again; a replaced board (same
    // hardware ID, new key) enrolls as a new device.
    let again = NewDevice {
        id: id("dev-4"),
        ..device("dev-1", "gw", "hw-1")
    };
    assert!(matches!(
        store.insert_device(&again).await,
        Err(StoreError::Conflict(_))
    ));
    store
        .insert_device(&device("dev-5", "gw", "hw-1"))
        .await
        .unwrap();
    let listed = store.list_devices().await.unwrap();
    assert_eq!(ids(&listed), ["dev-3", "dev-5"]);
}

async fn a_private_address_is_one_devices_across_stores_until_it_is_removed(db: &Db) {
    // Two stores on one database: two replicas.
    let stores = [db.open().await, db.open().await];
    let (a, b) = (&stores[0], &stores[1]);
    enroll(
        &**a,
        &[
            ("dev-1", "gw", "hw-1"),
            ("dev-2", "gw", "hw-2"),
            ("dev-3", "gw", "hw-3"),
        ],
    )
    .await;
    let pool = "10.77.0.0/16";
    let claim = |store: &Arc<dyn Store>, device: &str, address: &str| {
        let store = store.clone();
        let (device, address) = (id(device), address.to_owned());
        async move {
            store
                .claim_address(&device, pool, &address, &format!("{address}/16"))
                .await
                .unwrap()
        }
    };
    assert_eq!(claim(a, "dev-1", "10.77.0.5").await, AddressClaim::Claimed);
    assert_eq!(
        claim(b, "dev-2", "10.77.0.5").await,
        AddressClaim::Taken,
        "another replica cannot hand out the same address"
    );
    assert_eq!(
        claim(b, "dev-1", "10.77.0.6").await,
        AddressClaim::Held("10.77.0.5/16".into()),
        "one address per pool per device"
    );
    assert_eq!(claim(b, "dev-9", "10.77.0.7").await, AddressClaim::NoDevice);
    // Both at once, on the two stores, for one address: one wins.
    let (x, y) = tokio::join!(
        claim(a, "dev-2", "10.77.0.8"),
        claim(b, "dev-3", "10.77.0.8")
    );
    let mut outcomes = [x, y];
    outcomes.sort_by_key(|c| c == &AddressClaim::Taken);
    assert_eq!(outcomes, [AddressClaim::Claimed, AddressClaim::Taken]);
    let loser = if store_holds(&**a, "dev-2").await.is_empty() {
        "dev-2"
    } else {
        "dev-3"
    };
    assert_eq!(claim(a, loser, "10.77.0.9").await, AddressClaim::Claimed);
    // An IPv6 one beside it; the record lists IPv4 first.
    a.claim_address(&id("dev-1"), "fd77::/64", "fd77::5", "fd77::5/64")
        .await
        .unwrap();
    assert_eq!(
        store_holds(&**b, "dev-1").await,
        ["10.77.0.5/16", "fd77::5/64"]
    );
    let mut taken = a.pool_addresses(pool).await.unwrap();
    taken.sort();
    assert_eq!(taken, ["10.77.0.5", "10.77.0.8", "10.77.0.9"]);
    // A pool no longer configured is released; the others stay.
    a.release_addresses(&id("dev-1"), &[pool.to_owned()])
        .await
        .unwrap();
    assert_eq!(store_holds(&**b, "dev-1").await, ["10.77.0.5/16"]);
    // Removed, the device's address goes back to the pool.
    b.remove_device(&id("dev-1"), ts(NOW)).await.unwrap();
    assert!(store_holds(&**a, "dev-1").await.is_empty());
    assert_eq!(
        claim(a, "dev-1", "10.77.0.10").await,
        AddressClaim::NoDevice
    );
    assert_eq!(
        claim(a, loser, "10.77.0.5").await,
        AddressClaim::Held("10.77.0.9/16".to_owned())
    );
    enroll(&**a, &[("dev-4", "gw", "hw-1")]).await;
    assert_eq!(claim(b, "dev-4", "10.77.0.5").await, AddressClaim::Claimed);
}

async fn store_holds(store: &dyn Store, device: &str) -> Vec<String> {
    store
        .device(&id(device))
        .await
        .unwrap()
        .unwrap()
        .private_addresses
}

async fn a_lease_has_one_holder_until_it_expires_or_is_released(db: &Db) {
    let stores = [db.open().await, db.open().await];
    let (a, b) = (&stores[0], &stores[1]);
    assert!(a.try_lease("scheduler", "a", 1_000, 500).await.unwrap());
    assert!(!b.try_lease("scheduler", "b", 1_200, 500).await.unwrap());
    assert!(a.try_lease("scheduler", "a", 1_400, 500).await.unwrap());
    assert!(!b.try_lease("scheduler", "b", 1_600, 500).await.unwrap());
    assert!(b.try_lease("scheduler", "b", 1_900, 500).await.unwrap());
    assert!(!a.try_lease("scheduler", "a", 2_000, 500).await.unwrap());
    a.release_lease("scheduler", "a").await.unwrap();
    assert!(!a.try_lease("scheduler", "a", 2_000, 500).await.unwrap());
    b.release_lease("scheduler", "b").await.unwrap();
    assert!(a.try_lease("scheduler", "a", 2_000, 500).await.unwrap());
    // Many racing for a free lease: one wins.
    let mut tasks = Vec::new();
    for i in 0..8 {
        let store = stores[i % 2].clone();
        tasks.push(tokio::spawn(async move {
            store
                .try_lease("deliveries", &format!("r{i}"), 10_000, 500)
                .await
                .unwrap()
        }));
    }
    let mut won = 0;
    for t in tasks {
        won += t.await.unwrap() as u32;
    }
    assert_eq!(won, 1);
}

/// PostgreSQL at 100 000 devices (a third in a rollout, half connected):
/// a deep device page is an index scan in ID order, and the aggregates the
/// fleet summary and rollout views run take tens of milliseconds. Printed
/// for the README; the counts are checked.
#[tokio::test]
async fn postgres_pages_and_counts_a_hundred_thousand_devices_in_the_database() {
    let Some(pg) = uplift_sim::postgres::TestPostgres::start() else {
        return;
    };
    let url = pg.create_database("scale").unwrap();
    let store = PgStore::connect(&url, 4).await.unwrap();
    sqlx::raw_sql(
        "INSERT INTO releases (version, device_type, manifest, image_size, image_sha256, chunks, stored_bytes, \
                               created_at) VALUES ('1.2', 'gw', '\\x7b7d', 1, '', 1, 1, now()); \
         INSERT INTO rollouts (release, allow_downgrade, created_at, policy, state, state_name) \
         VALUES ('1.2', false, now(), '{}', '{}', 'running'); \
         INSERT INTO devices (id, device_type, hardware_id, public_key, enrolled_at, running_version, state, \
                              reported_target) \
         SELECT format('dev-%s', lpad(i::text, 6, '0')), CASE WHEN i % 10 = 0 THEN 'cam' ELSE 'gw' END, \
                format('hw-%s', i), format('key-%s', i), now(), \
                CASE WHEN i % 3 = 0 THEN '1.0' ELSE '1.1' END, \
                CASE WHEN i % 100 = 0 THEN 'failed' WHEN i % 3 = 0 AND i % 2 = 0 THEN 'downloading' ELSE 'idle' END, \
                CASE WHEN i % 3 = 0 AND i % 2 = 0 THEN '1.2' END \
         FROM generate_series(0, 99999) AS i; \
         INSERT INTO rollout_devices (rollout_id, device_id, offered_at) \
         SELECT 1, id, CASE WHEN reported_target = '1.2' THEN now() END FROM devices WHERE running_version = '1.0'; \
         INSERT INTO device_targets (device_id, rollout_id) \
         SELECT id, 1 FROM devices WHERE reported_target = '1.2'; \
         INSERT INTO device_tags (device_id, tag) SELECT id, 'canary' FROM devices WHERE id LIKE '%7'; \
         ANALYZE;",
    )
    .execute(store.pool())
    .await
    .unwrap();
    let connected: Vec<DeviceId> = (0..100_000)
        .step_by(2)
        .map(|i| id(&format!("dev-{i:06}")))
        .collect();
    let timed = |what: &str, took: std::time::Duration| {
        eprintln!("postgres, 100 000 devices: {what}: {took:?}")
    };

    let filters = [
        DeviceFilter::default(),
        DeviceFilter {
            device_type: Some("cam".parse().unwrap()),
            ..Default::default()
        },
        DeviceFilter {
            tags: Some(TagSelector::All(tags(&["canary"]))),
            ..Default::default()
        },
        DeviceFilter {
            online: Some(false),
            connected: connected.clone(),
            ..Default::default()
        },
    ];
    for filter in &filters {
        let started = std::time::Instant::now();
        let page = store
            .device_page(filter, Some(&id("dev-050000")), 101)
            .await
            .unwrap();
        timed(
            &format!(
                "a page after dev-050000 (type {:?}, tags {:?}, online {:?})",
                filter.device_type, filter.tags, filter.online
            ),
            started.elapsed(),
        );
        assert_eq!(page.len(), 101);
        assert!(page[0].id.as_str() > "dev-050000");
        assert!(page.windows(2).all(|w| w[0].id.as_str() < w[1].id.as_str()));
    }
    for _ in 0..3 {
        let started = std::time::Instant::now();
        let groups = store.fleet_census(&connected).await.unwrap();
        timed("fleet census, 50 000 connected", started.elapsed());
        let (devices, online) = groups
            .iter()
            .fold((0, 0), |(d, o), g| (d + g.devices, o + g.online));
        assert_eq!((devices, online), (100_000, 50_000));
        let started = std::time::Instant::now();
        let in_rollouts = store.devices_in_rollouts().await.unwrap();
        timed("devices in rollouts", started.elapsed());
        // Those on 1.0 in rollout 1: offered and downloading (even), or
        // waiting (odd); but the failed ones on 1.2 (every 300th: 334).
        assert_eq!(in_rollouts, 33_334 - 334);
        let started = std::time::Instant::now();
        let tallies = store.rollout_tallies(None).await.unwrap();
        timed("rollout tallies", started.elapsed());
        assert_eq!(tallies[0].1.total, 33_334);
    }
    // What the scheduler reads each tick: every member, or only those
    // that changed (here 100 report success through a writer's batch).
    let started = std::time::Instant::now();
    let whole = store.rollout_members(1).await.unwrap();
    timed("a rollout's members, whole (33 334)", started.elapsed());
    assert_eq!(whole.len(), 33_334);
    let mark = store.change_mark().await.unwrap();
    let reports: Vec<ReportedState> = (0..300)
        .step_by(3)
        .map(|i| seen(&format!("dev-{i:06}"), AgentState::Idle, "1.2", NOW))
        .collect();
    let started = std::time::Instant::now();
    assert_eq!(store.record_reports(&reports).await.unwrap(), 100);
    timed("a writer's batch of 100 reports", started.elapsed());
    let started = std::time::Instant::now();
    let changed = store.rollout_member_changes(1, mark).await.unwrap();
    timed(
        "a rollout's members changed since a mark (100)",
        started.elapsed(),
    );
    assert_eq!(changed.len(), 100);
    assert!(changed
        .iter()
        .all(|(_, d)| d.running_version == Some(version("1.2"))));

    // A rollout to the whole type, every member offered at once: what a
    // start stores before its first offer may go out.
    let started = std::time::Instant::now();
    let gateways = store.devices_of_type(&"gw".parse().unwrap()).await.unwrap();
    timed("the devices of a type (90 000)", started.elapsed());
    assert_eq!(gateways.len(), 90_000);
    let members: Vec<(DeviceId, u32)> = gateways.iter().map(|d| (d.clone(), 0)).collect();
    let started = std::time::Instant::now();
    let second = create_offering(&store, &members, &gateways).await.unwrap();
    timed(
        "a rollout stored, its 90 000 members offered pending",
        started.elapsed(),
    );
    let started = std::time::Instant::now();
    let offered = store.store_rollout_members(second).await.unwrap().unwrap();
    timed("its members written", started.elapsed());
    assert_eq!(offered.len(), 90_000);
    let tallies = store.rollout_tallies(None).await.unwrap();
    let tally = &tallies.iter().find(|(id, _)| *id == second).unwrap().1;
    assert_eq!(tally.total, 90_000);
}

async fn presence_one_replica_writes_is_online_on_another_and_its_newest_connection_wins(db: &Db) {
    use uplift_server::hub::PresenceChange::{Connected, Disconnected};
    let here = db.open().await;
    let there = db.open().await;
    enroll(
        &*here,
        &[
            ("dev-a", "gw", "hw-a"),
            ("dev-b", "gw", "hw-b"),
            ("dev-c", "gw", "hw-c"),
        ],
    )
    .await;
    let all = [id("dev-a"), id("dev-b"), id("dev-c")];
    let at = |s: &str| {
        time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).unwrap()
    };
    let online = |store: Arc<dyn Store>, connected: Vec<DeviceId>, wanted: bool| async move {
        let page = store
            .device_page(
                &DeviceFilter {
                    online: Some(wanted),
                    connected,
                    ..Default::default()
                },
                None,
                10,
            )
            .await
            .unwrap();
        page.iter().map(|d| d.id.to_string()).collect::<Vec<_>>()
    };
    let first = here
        .record_presence(
            "replica-1",
            &[
                (id("dev-a"), Connected(at("2026-01-01T10:00:00Z"))),
                (id("dev-b"), Connected(at("2026-01-01T10:00:00Z"))),
            ],
            true,
        )
        .await
        .unwrap();
    if let Db::Sqlite(_) = db {
        // One process owns a SQLite database: its hub alone says who is
        // connected, and nothing is written for anybody else.
        assert!(!first);
        assert!(there.present_devices(&all).await.unwrap().is_empty());
        assert_eq!(
            online(there.clone(), vec![id("dev-c")], true).await,
            ["dev-c"]
        );
        return;
    }
    assert!(
        first,
        "a replica's first write is of one the database did not know"
    );
    assert_eq!(
        there.present_devices(&all).await.unwrap(),
        [id("dev-a"), id("dev-b")]
    );
    // Another replica lists them online, with its own sessions.
    assert_eq!(
        online(there.clone(), vec![], true).await,
        ["dev-a", "dev-b"]
    );
    assert_eq!(online(there.clone(), vec![], false).await, ["dev-c"]);
    assert_eq!(
        online(there.clone(), vec![id("dev-c")], true).await,
        ["dev-a", "dev-b", "dev-c"]
    );
    let census = there.fleet_census(&[id("dev-c")]).await.unwrap();
    assert_eq!(census.iter().map(|g| g.online).sum::<u64>(), 3);
    assert_eq!(census.iter().map(|g| g.devices).sum::<u64>(), 3);

    // dev-b moves to replica 2; replica 1's writes about it arrive late,
    // its connection from before the move among them.
    assert!(there
        .record_presence(
            "replica-2",
            &[(id("dev-b"), Connected(at("2026-01-01T10:00:05Z")))],
            true
        )
        .await
        .unwrap());
    assert!(!here
        .record_presence("replica-1", &[(id("dev-b"), Disconnected)], false)
        .await
        .unwrap());
    assert!(!here
        .record_presence(
            "replica-1",
            &[(id("dev-b"), Connected(at("2026-01-01T10:00:03Z")))],
            false
        )
        .await
        .unwrap());
    assert_eq!(
        here.present_devices(&all).await.unwrap(),
        [id("dev-a"), id("dev-b")]
    );
    // ... so when it leaves replica 2, it is offline, not left behind on 1.
    there
        .record_presence("replica-2", &[(id("dev-b"), Disconnected)], false)
        .await
        .unwrap();
    assert_eq!(here.present_devices(&all).await.unwrap(), [id("dev-a")]);

    // A replica that shuts down takes its devices with it; one that
    // writes afresh replaces what it wrote before.
    here.retire_replica("replica-1").await.unwrap();
    assert!(there.present_devices(&all).await.unwrap().is_empty());
    assert!(there
        .record_presence(
            "replica-2",
            &[(id("dev-c"), Connected(at("2026-01-01T10:00:06Z")))],
            false
        )
        .await
        .is_ok());
    there
        .record_presence(
            "replica-2",
            &[(id("dev-a"), Connected(at("2026-01-01T10:00:07Z")))],
            true,
        )
        .await
        .unwrap();
    assert_eq!(there.present_devices(&all).await.unwrap(), [id("dev-a")]);

    // A replica killed without a word: once it has been quiet for
    // REPLICA_GONE_AFTER, the next replica to write drops it, and its
    // devices show offline.
    here.record_presence(
        "replica-killed",
        &[(id("dev-c"), Connected(at("2026-01-01T10:00:08Z")))],
        true,
    )
    .await
    .unwrap();
    assert_eq!(
        there.present_devices(&all).await.unwrap(),
        [id("dev-a"), id("dev-c")]
    );
    tokio::time::sleep(uplift_server::store::REPLICA_GONE_AFTER / 2).await;
    there
        .record_presence("replica-2", &[], false)
        .await
        .unwrap();
    assert_eq!(
        there.present_devices(&all).await.unwrap(),
        [id("dev-a"), id("dev-c")],
        "not yet gone"
    );
    tokio::time::sleep(
        uplift_server::store::REPLICA_GONE_AFTER / 2 + std::time::Duration::from_secs(1),
    )
    .await;
    there
        .record_presence("replica-2", &[], false)
        .await
        .unwrap();
    assert_eq!(
        there.present_devices(&all).await.unwrap(),
        [id("dev-a")],
        "replica 2 kept writing and stays; the killed one is dropped"
    );
}

async fn roots_are_kept_in_version_order_and_each_version_is_published_once(db: &Db) {
    use uplift_server::store::RootRecord;
    let store = db.open().await;
    let other = db.open().await;
    assert_eq!(store.latest_root().await.unwrap(), None);
    let root = |version: u64| RootRecord {
        version,
        signed_json: format!("{{\"signed\":\"v{version}\",\"signatures\":[]}}"),
        published_at: ts("2026-01-01T00:00:00Z"),
        published_by: "token 1 (keys)".into(),
    };
    for version in [1, 2, 3] {
        store.insert_root(&root(version)).await.unwrap();
    }
    // Another replica publishing a version already there loses.
    let err = other.insert_root(&root(2)).await.unwrap_err();
    assert!(
        matches!(&err, StoreError::Conflict(m) if m.contains("already published")),
        "{err}"
    );
    assert_eq!(other.latest_root().await.unwrap(), Some(root(3)));
    let versions = |roots: Vec<RootRecord>| roots.iter().map(|r| r.version).collect::<Vec<_>>();
    assert_eq!(versions(other.roots_after(0, 16).await.unwrap()), [1, 2, 3]);
    assert_eq!(versions(other.roots_after(1, 16).await.unwrap()), [2, 3]);
    assert_eq!(versions(other.roots_after(0, 2).await.unwrap()), [1, 2]);
    assert_eq!(
        versions(other.roots_after(3, 16).await.unwrap()),
        Vec::<u64>::new()
    );
    assert_eq!(other.roots_after(1, 1).await.unwrap(), [root(2)]);
}
