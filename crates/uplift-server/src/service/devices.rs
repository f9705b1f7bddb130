//! The fleet as the admin API shows it: each enrolled device with its
//! newest live state, its tags and the version it is meant to run, listed
//! by filters in pages; an operator's tags; a device's history.
//!
//! Lists page by device ID (keyset): a page ends at a device, and the next
//! starts after it, so paging stays correct while devices enroll and change
//! and each page costs one indexed range scan however deep it is. Filters
//! run in the database, and those on what changes live (state, version,
//! last seen) are checked again against the live view, so a listed device
//! always shows the values it was listed for. Being connected is known only
//! in memory: the connected devices are handed to the query, so `online`
//! holds on every page, not only on the ones where connected devices happen
//! to fall.

use super::{audit, ServiceError, ServiceResult};
use crate::auth::Principal;
use crate::state::AppState;
use crate::store::{DeviceFilter, DeviceRecord, Removal, TagUpdate, Timestamp};
use std::collections::{HashMap, HashSet};
use time::OffsetDateTime;
use uplift_proto::api::{
    DeviceHistory, DevicePage, DeviceQuery, DeviceView, HistoryQuery, TagChange, TagSelector,
    DEFAULT_PAGE_LIMIT, MAX_PAGE_LIMIT,
};
use uplift_proto::auth::AuditAction;
use uplift_proto::{DeviceId, Tag, Version};

/// Tags one device may have: enough for sites, rings and roles, few enough
/// that a page of devices stays small.
pub const MAX_TAGS_PER_DEVICE: usize = 32;
/// Longest text search, in characters.
const MAX_SEARCH_CHARS: usize = 128;

/// A device list request, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Listing {
    pub filter: DeviceFilter,
    pub after: Option<DeviceId>,
    pub limit: u32,
}

/// A page size from a request: the default, or 1 to [`MAX_PAGE_LIMIT`].
pub(super) fn page_limit(limit: Option<u32>) -> ServiceResult<u32> {
    match limit {
        None => Ok(DEFAULT_PAGE_LIMIT),
        Some(n @ 1..=MAX_PAGE_LIMIT) => Ok(n),
        Some(limit) => Err(ServiceError::PageSize {
            limit,
            max: MAX_PAGE_LIMIT,
        }),
    }
}

fn time_of(field: &'static str, text: Option<String>) -> ServiceResult<Option<Timestamp>> {
    text.map(|text| {
        Timestamp::parse_rfc3339(&text).map_err(|_| ServiceError::BadQuery {
            field,
            why: format!(
                "{:?} is not an RFC 3339 time; write it like 2026-05-01T12:00:00Z",
                text.chars().take(80).collect::<String>()
            ),
        })
    })
    .transpose()
}

impl Listing {
    /// Checks what a client asked for. Names (type, version, state, tag)
    /// were checked when the query was parsed; the rest is checked here.
    pub fn parse(query: DeviceQuery) -> ServiceResult<Self> {
        let after = query
            .after
            .map(|cursor| {
                cursor.parse::<DeviceId>().map_err(|_| ServiceError::BadQuery {
                    field: "after",
                    why: format!(
                        "{:?} is not a cursor this server gave out; pass the `next` of the previous page",
                        cursor.chars().take(80).collect::<String>()
                    ),
                })
            })
            .transpose()?;
        let text = query.q.filter(|q| !q.is_empty());
        if let Some(text) = &text {
            if text.chars().count() > MAX_SEARCH_CHARS || text.chars().any(char::is_control) {
                return Err(ServiceError::BadQuery {
                    field: "q",
                    why: format!(
                        "search for at most {MAX_SEARCH_CHARS} characters of a device or hardware ID, \
                         without control characters"
                    ),
                });
            }
        }
        Ok(Self {
            filter: DeviceFilter {
                device_type: query.device_type,
                versions: query.version.into_iter().collect(),
                state: query.state,
                tags: query.tag.map(|tag| TagSelector::All(vec![tag])),
                text,
                online: query.online,
                seen_before: time_of("seen_before", query.seen_before)?,
                seen_after: time_of("seen_after", query.seen_after)?,
                connected: Vec::new(),
            },
            after,
            limit: page_limit(query.limit)?,
        })
    }
}

/// One page of devices passing the listing's filters.
pub async fn list(state: &AppState, listing: Listing) -> ServiceResult<DevicePage> {
    let (records, next) = page(state, listing.filter, listing.after, listing.limit).await?;
    Ok(DevicePage {
        devices: views(state, records).await?,
        next: next.map(String::from),
    })
}

/// Every device passing `filter`, by ID, live state laid over (the
/// devices a rollout targets).
pub async fn select(state: &AppState, filter: DeviceFilter) -> ServiceResult<Vec<DeviceRecord>> {
    let (records, _) = page(state, filter, None, u32::MAX - 1).await?;
    Ok(records)
}

/// Up to `limit` devices passing `filter` after `after`, live state laid
/// over, and the device the next page starts after, if there may be more.
async fn page(
    state: &AppState,
    mut filter: DeviceFilter,
    after: Option<DeviceId>,
    limit: u32,
) -> ServiceResult<(Vec<DeviceRecord>, Option<DeviceId>)> {
    // A connected device counts as seen now, so the seen filters are
    // answered as of now: nobody was seen after a time still to come, and
    // everybody before it.
    let now = OffsetDateTime::now_utc();
    if filter.seen_after.is_some_and(|t| t.instant() >= now) {
        return Ok((Vec::new(), None));
    }
    if filter.seen_before.is_some_and(|t| t.instant() > now) {
        filter.seen_before = None;
    }
    if filter.online.is_some() || filter.seen_after.is_some() || filter.seen_before.is_some() {
        filter.connected = state.hub.online_ids();
    }
    let mut found = Vec::new();
    let mut cursor = after;
    loop {
        let want = limit - found.len() as u32;
        let mut rows = state
            .store
            .device_page(&filter, cursor.as_ref(), want + 1)
            .await?;
        let more = rows.len() > want as usize;
        rows.truncate(want as usize);
        if let Some(last) = rows.last() {
            cursor = Some(last.id.clone());
        }
        state.live.overlay(&mut rows);
        let online = if filter.seen_after.is_some() || filter.seen_before.is_some() {
            let ids: Vec<DeviceId> = rows.iter().map(|d| d.id.clone()).collect();
            online_among(state, &ids).await?
        } else {
            HashSet::new()
        };
        found.extend(rows.into_iter().filter(|d| holds_live(&filter, &online, d)));
        if !more {
            return Ok((found, None));
        }
        if found.len() == limit as usize {
            return Ok((found, cursor));
        }
    }
}

/// Whether a device the database listed by its stored state still passes
/// the filters on what changes live, by its newest state. (Its stored
/// state lags the live one by a write batch; the other filters are on what
/// only the database holds.)
fn holds_live(filter: &DeviceFilter, online: &HashSet<DeviceId>, d: &DeviceRecord) -> bool {
    let version = filter.versions.is_empty()
        || d.running_version
            .as_ref()
            .is_some_and(|v| filter.versions.contains(v));
    let state = filter.state.is_none_or(|s| d.state == Some(s));
    let online = || online.contains(&d.id);
    let last_seen = || d.last_seen;
    let seen_after = filter
        .seen_after
        .is_none_or(|t| online() || last_seen().is_some_and(|seen| seen > t));
    let seen_before = filter
        .seen_before
        .is_none_or(|t| !online() && last_seen().is_none_or(|seen| seen < t));
    version && state && seen_after && seen_before
}

/// A device's record with its live state laid over.
pub async fn record(state: &AppState, id: &DeviceId) -> ServiceResult<DeviceRecord> {
    let record = state
        .store
        .device(id)
        .await?
        .ok_or_else(|| ServiceError::DeviceNotFound { id: id.clone() })?;
    let mut records = [record];
    state.live.overlay(&mut records);
    let [record] = records;
    Ok(record)
}

/// One device as shown.
pub async fn get(state: &AppState, id: &DeviceId) -> ServiceResult<DeviceView> {
    let record = record(state, id).await?;
    Ok(views(state, vec![record])
        .await?
        .pop()
        .expect("one view of one device"))
}

/// Changes a device's tags (see [`TagChange`]) and shows the device. A
/// device that comes to have a running dynamic rollout's tags joins it.
/// Recorded in the audit log as `actor`'s.
pub async fn change_tags(
    state: &AppState,
    actor: &Principal,
    id: &DeviceId,
    change: TagChange,
) -> ServiceResult<DeviceView> {
    let result = retag(state, id, change).await;
    let target = format!("device {id}");
    audit::record(state, actor, AuditAction::DeviceTags, &target, &result).await;
    result
}

async fn retag(state: &AppState, id: &DeviceId, change: TagChange) -> ServiceResult<DeviceView> {
    let update = state
        .store
        .change_tags(
            id,
            change.set.as_deref(),
            &change.remove,
            &change.add,
            MAX_TAGS_PER_DEVICE,
        )
        .await?;
    let tags = match update {
        TagUpdate::Updated(tags) => tags,
        TagUpdate::TooMany { count } => {
            return Err(ServiceError::TooManyTags {
                id: id.clone(),
                count,
            })
        }
        TagUpdate::UnknownDevice => return Err(ServiceError::DeviceNotFound { id: id.clone() }),
    };
    let view = get(state, id).await?;
    tracing::info!(device = %id, tags = ?tags, "device tags changed");
    super::rollouts::join_dynamic(state, id, &view.device_type, &tags).await;
    Ok(view)
}

/// Removes (decommissions) a device, recorded in the audit log as
/// `actor`'s, and shows it as it is now.
///
/// What is kept and why: the device's row, its history and its part in
/// past rollouts stay, marked removed. The history is the record of what
/// ran on a board that may be returned, audited or investigated after it
/// left the fleet, and rollouts' counts and the audit log name it; deleting
/// it would leave them naming a device the server never knew. Its key
/// stays on record too, revoked: the row keeps the key unique, so the old
/// board (or a copy of its state) can never authenticate or enroll again.
///
/// What ends: the key's use (its next connection is refused with
/// `device_removed`), its open channel on every replica (closed now, with
/// that error), its download tokens, its unfinished rollout parts (ended
/// as superseded, so no rollout waits for it), its tags and its private
/// addresses (free for other devices).
///
/// A replaced board with the same hardware ID enrolls with a fleet token
/// as any new board does: a new key is a new identity, so it gets a new
/// device ID, and the old device's history stays the old board's.
pub async fn remove(
    state: &AppState,
    actor: &Principal,
    id: &DeviceId,
) -> ServiceResult<DeviceView> {
    let result = decommission(state, actor, id).await;
    let target = format!("device {id}");
    audit::record(state, actor, AuditAction::DeviceRemove, &target, &result).await;
    result
}

async fn decommission(
    state: &AppState,
    actor: &Principal,
    id: &DeviceId,
) -> ServiceResult<DeviceView> {
    let now = Timestamp::now();
    match state.store.remove_device(id, now).await? {
        Removal::UnknownDevice => return Err(ServiceError::DeviceNotFound { id: id.clone() }),
        Removal::AlreadyRemoved { at } => {
            return Err(ServiceError::AlreadyRemoved {
                id: id.clone(),
                at: at.to_string(),
            })
        }
        Removal::Removed { rollouts } => {
            state.stats.fleet_size.changed();
            tracing::info!(device = %id, ?rollouts, by = %actor.name, "device removed");
        }
    }
    crate::signals::forget_removed(state, id, Some(&actor.name), now);
    state
        .signals
        .send(crate::signals::Signal::Removed {
            devices: vec![id.clone()],
        })
        .await;
    get(state, id).await
}

/// A page of a device's history, newest first.
pub async fn history(
    state: &AppState,
    id: &DeviceId,
    query: HistoryQuery,
) -> ServiceResult<DeviceHistory> {
    let limit = page_limit(query.limit)?;
    if query.before.is_some_and(|b| b <= 0) {
        return Err(ServiceError::BadQuery {
            field: "before",
            why: "event ids start at 1; pass the `next` of the previous page".to_owned(),
        });
    }
    record(state, id).await?;
    let mut events = state
        .store
        .device_history(id, query.before, limit + 1)
        .await?;
    let more = events.len() > limit as usize;
    events.truncate(limit as usize);
    Ok(DeviceHistory {
        device: id.clone(),
        next: events.last().map(|e| e.id).filter(|_| more),
        events,
    })
}

/// Which of `devices` are online: connected here, or present on another
/// replica (asked of the database only for those not connected here).
async fn online_among(state: &AppState, devices: &[DeviceId]) -> ServiceResult<HashSet<DeviceId>> {
    let (here, elsewhere) = state.hub.split_online(devices);
    let mut online: HashSet<DeviceId> = here.into_iter().cloned().collect();
    let elsewhere: Vec<DeviceId> = elsewhere.into_iter().cloned().collect();
    online.extend(state.store.present_devices(&elsewhere).await?);
    Ok(online)
}

/// Devices as shown: their tags and target versions looked up for all of
/// them at once.
async fn views(state: &AppState, records: Vec<DeviceRecord>) -> ServiceResult<Vec<DeviceView>> {
    let ids: Vec<DeviceId> = records.iter().map(|d| d.id.clone()).collect();
    let online = online_among(state, &ids).await?;
    let mut tags: HashMap<DeviceId, Vec<Tag>> = HashMap::new();
    for (id, tag) in state.store.tags_of(&ids).await? {
        tags.entry(id).or_default().push(tag);
    }
    let releases: HashMap<i64, Version> = state
        .store
        .list_rollouts()
        .await?
        .into_iter()
        .map(|r| (r.id, r.release))
        .collect();
    Ok(records
        .into_iter()
        .map(|d| {
            let tags = tags.remove(&d.id).unwrap_or_default();
            let online = online.contains(&d.id);
            view(&releases, d, tags, online)
        })
        .collect())
}

/// One device's record (live state laid over) as shown, its target version
/// looked up in `rollout_releases` by rollout id.
fn view(
    rollout_releases: &HashMap<i64, Version>,
    d: DeviceRecord,
    tags: Vec<Tag>,
    online: bool,
) -> DeviceView {
    DeviceView {
        online,
        target_version: d
            .target_rollout
            .and_then(|r| rollout_releases.get(&r).cloned()),
        rollout_id: d.target_rollout,
        id: d.id,
        device_type: d.device_type,
        hardware_id: d.hardware_id,
        running_version: d.running_version,
        state: d.state,
        progress: d.progress,
        last_error: d.last_error,
        enrolled_at: d.enrolled_at.to_string(),
        last_seen: d.last_seen.map(|t| t.to_string()),
        tags,
        slot: d.booted_slot,
        address: d.address,
        removed_at: d.removed_at.map(|t| t.to_string()),
        private_addresses: d.private_addresses,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::SessionSerial;
    use crate::service::testing;
    use crate::store::stamp::ts;
    use uplift_proto::channel::{AgentState, Report};
    use uplift_proto::{ErrorKind, SlotName};

    fn query(f: impl FnOnce(&mut DeviceQuery)) -> DeviceQuery {
        let mut q = DeviceQuery::default();
        f(&mut q);
        q
    }

    fn ids(page: &DevicePage) -> Vec<&str> {
        page.devices.iter().map(|d| d.id.as_str()).collect()
    }

    fn tags(list: &[&str]) -> Vec<Tag> {
        list.iter().map(|t| t.parse().unwrap()).collect()
    }

    /// `device` reports `state` on `version`, in memory only (the database
    /// has not caught up).
    fn reports(state: &AppState, device: &DeviceId, status: AgentState, version: &str) {
        state.live.claim(
            device,
            SessionSerial::from_raw(1),
            ts("2026-01-01T00:00:00Z"),
        );
        state.live.apply(
            device,
            SessionSerial::from_raw(1),
            &Report {
                state: status,
                running_version: version.parse().unwrap(),
                booted_slot: SlotName::A,
                target_version: None,
                progress: None,
                error: None,
            },
            ts("2026-01-01T00:00:01Z"),
        );
    }

    #[test]
    fn a_query_is_checked_and_says_which_parameter_is_wrong() {
        let listing = Listing::parse(query(|q| {
            q.tag = Some("canary".parse().unwrap());
            q.q = Some(String::new());
            q.seen_after = Some("2026-01-01T00:00:00+01:00".into());
        }))
        .unwrap();
        assert_eq!(listing.limit, DEFAULT_PAGE_LIMIT);
        assert_eq!(listing.filter.text, None, "an empty search is no search");
        assert_eq!(
            listing.filter.tags,
            Some(TagSelector::All(tags(&["canary"])))
        );
        for limit in [0, MAX_PAGE_LIMIT + 1] {
            let err = Listing::parse(query(|q| q.limit = Some(limit))).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::BadRequest);
            assert_eq!(
                err.to_string(),
                format!("a page holds 1 to 1000 entries; {limit} is outside that, so give another limit")
            );
        }
        for (bad, field) in [
            (query(|q| q.after = Some("not/a/cursor".into())), "after"),
            (
                query(|q| q.seen_before = Some("yesterday".into())),
                "seen_before",
            ),
            (
                query(|q| q.seen_after = Some("2026-13-01T00:00:00Z".into())),
                "seen_after",
            ),
            (query(|q| q.q = Some("x".repeat(MAX_SEARCH_CHARS + 1))), "q"),
            (query(|q| q.q = Some("a\nb".into())), "q"),
        ] {
            let err = Listing::parse(bad).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::BadRequest);
            assert!(
                err.to_string()
                    .starts_with(&format!("query parameter {field} refused")),
                "{err}"
            );
        }
    }

    #[tokio::test]
    async fn pages_follow_their_cursor_and_filters_hold_on_every_page() {
        let dir = tempfile::tempdir().unwrap();
        let state = testing::state(dir.path()).await;
        let mut all = Vec::new();
        for i in 0..25 {
            all.push(
                testing::device(
                    &state,
                    &format!("dev-{i:02}"),
                    if i % 5 == 0 { "cam" } else { "gw" },
                )
                .await,
            );
        }
        // Every third device connected; the sessions only, no database row.
        let mut sessions = Vec::new();
        for id in all.iter().step_by(3) {
            let (tx, rx) = tokio::sync::watch::channel(0);
            state.hub.register(id.clone(), tx);
            sessions.push(rx);
        }
        let mut seen = Vec::new();
        let mut after = None;
        loop {
            let page = list(
                &state,
                Listing::parse(query(|q| {
                    q.online = Some(true);
                    q.device_type = Some("gw".parse().unwrap());
                    q.limit = Some(2);
                    q.after = after.clone();
                }))
                .unwrap(),
            )
            .await
            .unwrap();
            assert!(page
                .devices
                .iter()
                .all(|d| d.online && d.device_type.as_str() == "gw"));
            seen.extend(ids(&page).into_iter().map(str::to_owned));
            match page.next {
                Some(next) => after = Some(next),
                None => break,
            }
        }
        let want: Vec<String> = all
            .iter()
            .enumerate()
            .filter(|(i, _)| i % 3 == 0 && i % 5 != 0)
            .map(|(_, id)| id.to_string())
            .collect();
        assert_eq!(seen, want, "every connected gateway once, in ID order");

        // Offline: the others, as many as there are.
        let page = list(
            &state,
            Listing::parse(query(|q| {
                q.online = Some(false);
                q.limit = Some(100);
            }))
            .unwrap(),
        )
        .await
        .unwrap();
        assert_eq!(page.devices.len(), 25 - sessions.len());
        assert_eq!(page.next, None);
    }

    #[tokio::test]
    async fn live_state_decides_what_a_device_is_listed_as() {
        let dir = tempfile::tempdir().unwrap();
        let state = testing::state(dir.path()).await;
        let a = testing::device(&state, "dev-a", "gw").await;
        let b = testing::device(&state, "dev-b", "gw").await;
        // Stored: both idle on 1.0. Live: a has moved on to downloading.
        for id in [&a, &b] {
            reports(&state, id, AgentState::Idle, "1.0");
        }
        assert!(testing::flush_writes(&state).await);
        reports(&state, &a, AgentState::Downloading, "1.0");
        let idle = list(
            &state,
            Listing::parse(query(|q| q.state = Some(AgentState::Idle))).unwrap(),
        )
        .await
        .unwrap();
        assert_eq!(
            ids(&idle),
            ["dev-b"],
            "a is no longer idle, whatever the database says"
        );
        let downloading =
            Listing::parse(query(|q| q.state = Some(AgentState::Downloading))).unwrap();
        // Not yet written: the database does not find it (for one batch).
        assert!(list(&state, downloading).await.unwrap().devices.is_empty());
    }

    #[tokio::test]
    async fn tags_change_on_a_device_and_show_on_it() {
        let dir = tempfile::tempdir().unwrap();
        let state = testing::state(dir.path()).await;
        let a = testing::device(&state, "dev-a", "gw").await;
        let view = change_tags(
            &state,
            &Principal::bootstrap_admin(),
            &a,
            TagChange {
                add: tags(&["canary", "berlin"]),
                ..TagChange::default()
            },
        )
        .await
        .unwrap();
        assert_eq!(view.tags, tags(&["berlin", "canary"]));
        assert_eq!(get(&state, &a).await.unwrap().tags, view.tags);
        let page = list(
            &state,
            Listing::parse(query(|q| q.tag = Some("canary".parse().unwrap()))).unwrap(),
        )
        .await
        .unwrap();
        assert_eq!(page.devices, [view]);

        let too_many = TagChange {
            add: (0..=MAX_TAGS_PER_DEVICE)
                .map(|i| format!("t{i}").parse().unwrap())
                .collect(),
            ..TagChange::default()
        };
        let err = change_tags(&state, &Principal::bootstrap_admin(), &a, too_many)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::BadRequest);
        assert!(err.to_string().contains("would have 35 tags"), "{err}");
        // Each change is in the audit log, a refused one with its error.
        let audit = crate::service::audit::list(
            &state,
            uplift_proto::auth::AuditQuery {
                action: Some(AuditAction::DeviceTags),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let logged: Vec<(&str, bool)> = audit
            .entries
            .iter()
            .map(|e| (e.target.as_str(), e.error.is_some()))
            .collect();
        assert_eq!(logged, [("device dev-a", true), ("device dev-a", false)]);
        let nobody: DeviceId = "dev-nobody".parse().unwrap();
        let err = change_tags(
            &state,
            &Principal::bootstrap_admin(),
            &nobody,
            TagChange::default(),
        )
        .await
        .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound);
        assert_eq!(
            err.to_string(),
            "device dev-nobody is not enrolled on this server; see `uplift devices list`"
        );
        assert_eq!(
            get(&state, &nobody).await.unwrap_err().kind(),
            ErrorKind::NotFound
        );
        let err = history(&state, &nobody, HistoryQuery::default())
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound);
    }

    #[tokio::test]
    async fn a_history_pages_back_from_the_newest_event() {
        let dir = tempfile::tempdir().unwrap();
        let state = testing::state(dir.path()).await;
        let a = testing::device(&state, "dev-a", "gw").await;
        let events: Vec<crate::store::NewEvent> = (1..=5)
            .map(|n| crate::store::NewEvent {
                device: a.clone(),
                at: ts(&format!("2026-01-01T00:00:0{n}Z")),
                event: uplift_proto::api::DeviceEventKind::Withdrawn { rollout_id: n },
            })
            .collect();
        state.store.record_events(&events, 200).await.unwrap();
        let page = |before| {
            history(
                &state,
                &a,
                HistoryQuery {
                    limit: Some(2),
                    before,
                },
            )
        };
        let first = page(None).await.unwrap();
        assert_eq!(first.events[0].at, "2026-01-01T00:00:05Z");
        let second = page(first.next).await.unwrap();
        let third = page(second.next).await.unwrap();
        assert_eq!(third.events.len(), 1);
        assert_eq!(third.events[0].at, "2026-01-01T00:00:01Z");
        assert_eq!(third.next, None);
        let err = page(Some(0)).await.unwrap_err();
        assert!(err.to_string().contains("query parameter before"), "{err}");
    }
}
