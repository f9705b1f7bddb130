//! The server's live view of the fleet: for every device, the newest report
//! from its newest session, its last sign of life and what it should run.
//! It lives in memory, so device sessions never wait on the database; a
//! writer task ([`crate::writer`]) persists state changes in batches.
//!
//! Why sessions are ordered: a device that reconnects (a reboot, a dropped
//! link) gets a new session while the old one may still be reading a
//! backlog of older reports from its socket. Every session gets a serial
//! from the hub, increasing within a server process; the view remembers the
//! newest serial that spoke for each device (or was registered for it) and
//! refuses anything from an older one. After a server restart the view
//! starts empty, so any new session outranks what the database holds.

use crate::events::EventBus;
use crate::history::{self, Pending};
use crate::hub::SessionSerial;
use crate::store::{
    DeviceRecord, DeviceStanding, DeviceTarget, NewEvent, ReportedState, Timestamp,
};
use std::borrow::Borrow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;
use uplift_proto::api::DeviceEventKind;
use uplift_proto::channel::Report;
use uplift_proto::events::EventAbout;
use uplift_proto::DeviceId;

#[derive(Debug, Default)]
pub struct LiveView {
    devices: Mutex<HashMap<DeviceId, LiveDevice>>,
    /// History events for the writer. Taken only ever inside `devices`'
    /// lock (never the other way round), so a device's events queue in the
    /// order its state changed.
    history: Mutex<Pending>,
    /// Where each history event is also published as it happens (the
    /// event stream and webhooks).
    events: Arc<EventBus>,
    /// State changes made so far (a device became [`Dirty::State`]).
    changes: AtomicU64,
    /// The count of `changes` up to which the database holds everything.
    stored: AtomicU64,
    /// Wakes [`LiveView::stored_now`]'s waiters after each write.
    written: Notify,
    /// Asks the writer for a batch now rather than at its next tick.
    wanted: Notify,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct LiveDevice {
    /// The newest session registered or heard from for this device.
    pub session: Option<SessionSerial>,
    /// Its newest report, if it sent one since the server started. Boxed:
    /// every replica keeps an entry for every device a rollout reached,
    /// most of them without a report, and an entry of the table takes 152
    /// bytes instead of 264.
    pub report: Option<Box<Report>>,
    /// RFC 3339; when a session of the device last spoke or ended.
    pub last_seen: Option<Timestamp>,
    /// What the device should run (its newest rollout), if any.
    pub target: Option<DeviceTarget>,
    /// `IP:port` its newest session's connection came from, if known.
    pub address: Option<String>,
    /// Something the database does not hold yet.
    dirty: Dirty,
    /// A session of this process holds the device now. Once it ended and
    /// the database has everything, the database is as new as this view,
    /// and newer when the device went on to another replica.
    here: bool,
}

impl LiveDevice {
    /// Whether this view's report may be laid over the database's.
    fn newer_than_stored(&self) -> bool {
        self.here || self.dirty != Dirty::Clean
    }
}

/// What the database still lacks for a device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
enum Dirty {
    #[default]
    Clean,
    /// Only progress or last-seen moved: worth writing at shutdown, not on
    /// every tick (live progress is served from memory).
    Progress,
    /// State, version, slot, target, error or address changed: written in
    /// the next batch.
    State,
}

/// What became of a report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The view holds it now.
    Applied,
    /// A newer session of the device already spoke: ignored.
    Stale,
}

/// The pure rule: may a report from `session` replace what the view holds?
fn admits(current: Option<SessionSerial>, session: SessionSerial) -> bool {
    current.is_none_or(|newest| session >= newest)
}

/// Grows `live` at most once for an offer to `devices`. Growing step by
/// step (doubling three times for a fleet of 100 000 on a replica that
/// held 14 000) copied every entry into fresh memory each time, under the
/// lock, while the offers went out: in a profile of 100 000 devices on 7
/// replicas, 71 % of the replicas' page faults during the offers.
fn make_room<D: Borrow<DeviceId>>(live: &mut HashMap<DeviceId, LiveDevice>, devices: &[D]) {
    if devices.len() <= live.capacity() - live.len() {
        return;
    }
    let missing = devices
        .iter()
        .filter(|d| !live.contains_key((*d).borrow()))
        .count();
    live.reserve(missing);
}

/// Whether `new` changes anything the database keeps beyond progress.
fn changes_state(old: Option<&Report>, new: &Report) -> bool {
    old.is_none_or(|old| {
        old.state != new.state
            || old.running_version != new.running_version
            || old.booted_slot != new.booted_slot
            || old.target_version != new.target_version
            || old.error != new.error
    })
}

impl LiveView {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<DeviceId, LiveDevice>> {
        // Plain data behind the lock; still consistent after a panic elsewhere.
        self.devices
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A view whose device events also go to `events`.
    pub fn with_events(events: Arc<EventBus>) -> Self {
        Self {
            events,
            ..Self::default()
        }
    }

    /// Queues `event` for the device's history and publishes it.
    fn record(&self, history: &mut Pending, event: NewEvent) {
        self.events.publish(
            EventAbout::Device {
                device_id: event.device.clone(),
                event: event.event.clone(),
            },
            event.at,
        );
        history.push(event);
    }

    fn history(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.history
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Loads what the database says each device should run (once, at start).
    pub fn load_targets(&self, targets: Vec<(DeviceId, DeviceTarget)>) {
        let mut devices = self.lock();
        devices.reserve(targets.len());
        for (id, target) in targets {
            devices.entry(id).or_default().target = Some(target);
        }
    }

    /// A new session of `device` exists: from now on older sessions are not heard.
    pub fn claim(&self, device: &DeviceId, session: SessionSerial, now: Timestamp) {
        self.claim_from(device, session, now, None);
    }

    /// [`LiveView::claim`] by a session whose connection came from
    /// `address` (`IP:port`), which the device keeps as its last known
    /// address (while offline too) until a newer session says another.
    pub fn claim_from(
        &self,
        device: &DeviceId,
        session: SessionSerial,
        now: Timestamp,
        address: Option<String>,
    ) {
        let mut devices = self.lock();
        let entry = devices.entry(device.clone()).or_default();
        if admits(entry.session, session) {
            entry.session = Some(session);
            entry.here = true;
            entry.last_seen = Some(now);
            // A new address is worth writing soon: the device may go
            // offline (or the server stop) before it changes anything else.
            let moved = address.is_some() && address != entry.address;
            if moved {
                entry.address = address;
            }
            let dirty = if moved { Dirty::State } else { Dirty::Progress };
            entry.dirty = entry.dirty.max(dirty);
            if moved {
                self.changes.fetch_add(1, Ordering::SeqCst);
            }
        }
    }

    /// Applies a report if no newer session of the device has spoken.
    pub fn apply(
        &self,
        device: &DeviceId,
        session: SessionSerial,
        report: &Report,
        now: Timestamp,
    ) -> Applied {
        let mut devices = self.lock();
        let entry = devices.entry(device.clone()).or_default();
        if !admits(entry.session, session) {
            return Applied::Stale;
        }
        let dirty = if changes_state(entry.report.as_deref(), report) {
            self.changes.fetch_add(1, Ordering::SeqCst);
            Dirty::State
        } else {
            Dirty::Progress
        };
        if let Some(old) = &entry.report {
            let events = history::events_between(old, report);
            if !events.is_empty() {
                let mut history = self.history();
                for event in events {
                    self.record(
                        &mut history,
                        NewEvent {
                            device: device.clone(),
                            at: now,
                            event,
                        },
                    );
                }
            }
        }
        entry.session = Some(session);
        match &mut entry.report {
            Some(held) => report.clone_into(held),
            None => entry.report = Some(Box::new(report.clone())),
        }
        entry.last_seen = Some(now);
        entry.dirty = entry.dirty.max(dirty);
        Applied::Applied
    }

    /// The session ended; its last-seen time is kept if it was the newest,
    /// which is returned (the device is offline now).
    pub fn ended(&self, device: &DeviceId, session: SessionSerial, now: Timestamp) -> bool {
        let mut devices = self.lock();
        match devices.get_mut(device) {
            Some(entry) if entry.session == Some(session) => {
                entry.here = false;
                entry.last_seen = Some(now);
                // Going offline is worth recording soon, not only at shutdown.
                entry.dirty = Dirty::State.max(entry.dirty);
                self.changes.fetch_add(1, Ordering::SeqCst);
                true
            }
            _ => false,
        }
    }

    /// Offers a rollout's release to devices (their history says so at
    /// `now`), unless a newer rollout already targets them (rollout IDs
    /// grow, and a device's newest rollout decides).
    pub fn set_targets<D: Borrow<DeviceId>>(
        &self,
        devices: &[D],
        target: &DeviceTarget,
        now: Timestamp,
    ) {
        self.offer_targets(devices, target, Some(now));
    }

    /// [`LiveView::set_targets`] as another replica made it: its history
    /// is that replica's to record.
    pub fn follow_targets(&self, devices: &[DeviceId], target: &DeviceTarget) {
        self.offer_targets(devices, target, None);
    }

    /// Offers `target` where no newer rollout's offer stands, recording
    /// each offer in history at `history_at` if given.
    fn offer_targets<D: Borrow<DeviceId>>(
        &self,
        devices: &[D],
        target: &DeviceTarget,
        history_at: Option<Timestamp>,
    ) {
        let mut live = self.lock();
        make_room(&mut live, devices);
        let mut history = history_at.map(|at| (at, self.history()));
        if let Some((_, history)) = history.as_mut() {
            history.reserve(devices.len());
        }
        for id in devices {
            let id = id.borrow();
            // Looked up first: once a rollout has reached them, every
            // replica knows every device, and an insert takes an owned ID
            // (an allocation per device per offer).
            let entry = match live.get_mut(id) {
                Some(entry) => entry,
                None => live.entry(id.clone()).or_default(),
            };
            if entry
                .target
                .as_ref()
                .is_none_or(|t| t.rollout_id <= target.rollout_id)
            {
                entry.target = Some(target.clone());
                if let Some((at, history)) = history.as_mut() {
                    self.record(
                        history,
                        NewEvent {
                            device: id.clone(),
                            at: *at,
                            event: DeviceEventKind::Offer {
                                rollout_id: target.rollout_id,
                                version: target.version.clone(),
                            },
                        },
                    );
                }
            }
        }
    }

    /// [`LiveView::withdraw_targets`] as another replica made it.
    pub fn follow_withdrawal(&self, devices: &[DeviceId], rollout_id: i64) {
        self.take_back_targets(devices, rollout_id, None);
    }

    /// Every device's target as the database has it now (`targets`; a
    /// device not listed has none); returns the devices whose target
    /// changed. A reboot gate already decided here is kept for an
    /// unchanged offer.
    pub fn replace_targets(&self, targets: Vec<(DeviceId, DeviceTarget)>) -> Vec<DeviceId> {
        let mut live = self.lock();
        let mut targets: HashMap<DeviceId, DeviceTarget> = targets.into_iter().collect();
        let mut changed = Vec::new();
        for (id, entry) in live.iter_mut() {
            let new = targets.remove(id);
            let same = match (&entry.target, &new) {
                (Some(old), Some(new)) => {
                    DeviceTarget {
                        hold_reboot: old.hold_reboot,
                        ..new.clone()
                    } == *old
                }
                (None, None) => true,
                _ => false,
            };
            if !same {
                entry.target = new;
                changed.push(id.clone());
            }
        }
        live.reserve(targets.len());
        for (id, target) in targets {
            live.entry(id.clone()).or_default().target = Some(target);
            changed.push(id);
        }
        changed
    }

    /// Makes room for `fleet` devices ahead of need, so an offer to the
    /// whole fleet writes into the table rather than growing it while the
    /// offers go out (see [`make_room`]). Never shrinks.
    pub fn reserve_for_fleet(&self, fleet: usize) {
        let mut live = self.lock();
        if fleet > live.capacity() {
            let more = fleet - live.len();
            live.reserve(more);
        }
    }

    /// How many devices the table holds room for.
    #[cfg(test)]
    fn capacity(&self) -> usize {
        self.lock().capacity()
    }

    /// Withdraws rollout `rollout_id`'s offer from `devices` (an abort);
    /// a device a newer rollout targets keeps that target.
    pub fn withdraw_targets(&self, devices: &[DeviceId], rollout_id: i64, now: Timestamp) {
        self.take_back_targets(devices, rollout_id, Some(now));
    }

    /// Clears rollout `rollout_id`'s offer from `devices`, recording each
    /// withdrawal in history at `history_at` if given.
    fn take_back_targets(
        &self,
        devices: &[DeviceId],
        rollout_id: i64,
        history_at: Option<Timestamp>,
    ) {
        let mut live = self.lock();
        let mut history = history_at.map(|at| (at, self.history()));
        for id in devices {
            let Some(entry) = live.get_mut(id) else {
                continue;
            };
            if entry
                .target
                .as_ref()
                .is_some_and(|t| t.rollout_id == rollout_id)
            {
                entry.target = None;
                if let Some((at, history)) = history.as_mut() {
                    self.record(
                        history,
                        NewEvent {
                            device: id.clone(),
                            at: *at,
                            event: DeviceEventKind::Withdrawn { rollout_id },
                        },
                    );
                }
            }
        }
    }

    /// Up to `max` history events for the writer, oldest first, and how
    /// many were dropped unwritten since the last call.
    pub fn take_events(&self, max: usize) -> (Vec<NewEvent>, u64) {
        self.history().take(max)
    }

    /// Events that could not be written: first in line again.
    pub fn requeue_events(&self, batch: Vec<NewEvent>) {
        self.history().requeue(batch);
    }

    /// History events waiting to be written.
    pub fn pending_events(&self) -> usize {
        self.history().len()
    }

    /// Sets whether rollout `rollout_id`'s offer holds the reboot (its
    /// reboot window's gate) on every device it targets; returns the
    /// devices whose offer changed, for their sessions to send it again.
    pub fn hold_reboots(&self, rollout_id: i64, hold: bool) -> Vec<DeviceId> {
        let mut live = self.lock();
        let mut changed = Vec::new();
        for (id, entry) in live.iter_mut() {
            if let Some(target) = entry
                .target
                .as_mut()
                .filter(|t| t.rollout_id == rollout_id && t.hold_reboot != hold)
            {
                target.hold_reboot = hold;
                changed.push(id.clone());
            }
        }
        changed
    }

    /// Forgets a removed device: nothing of it is laid over what the
    /// database says, written back, or offered. `by` (an operator's name)
    /// goes into its history when given (the replica that removed it
    /// records it; the others only forget).
    pub fn forget(&self, device: &DeviceId, by: Option<&str>, now: Timestamp) {
        let mut devices = self.lock();
        devices.remove(device);
        if let Some(by) = by {
            let mut history = self.history();
            self.record(
                &mut history,
                NewEvent {
                    device: device.clone(),
                    at: now,
                    event: DeviceEventKind::Removed { by: by.to_owned() },
                },
            );
        }
    }

    pub fn target(&self, device: &DeviceId) -> Option<DeviceTarget> {
        self.lock().get(device).and_then(|d| d.target.clone())
    }

    pub fn get(&self, device: &DeviceId) -> Option<LiveDevice> {
        self.lock().get(device).cloned()
    }

    /// Lays the live state over a record read from the database.
    pub fn overlay(&self, records: &mut [DeviceRecord]) {
        let devices = self.lock();
        for record in records {
            let Some(live) = devices.get(&record.id).filter(|d| d.newer_than_stored()) else {
                continue;
            };
            if let Some(report) = &live.report {
                record.running_version = Some(report.running_version.clone());
                record.state = Some(report.state);
                record.booted_slot = Some(report.booted_slot);
                record.reported_target = report.target_version.clone();
                record.progress = report.progress;
                record.last_error = report.error.clone();
            }
            if live.last_seen.is_some() {
                record.last_seen = live.last_seen;
            }
            if live.address.is_some() {
                record.address = live.address.clone();
            }
        }
    }

    /// [`LiveView::overlay`] of what decides where devices stand in a rollout.
    pub fn overlay_standings(&self, standings: &mut [DeviceStanding]) {
        let devices = self.lock();
        for standing in standings {
            let Some(report) = devices
                .get(&standing.id)
                .filter(|d| d.newer_than_stored())
                .and_then(|d| d.report.as_deref())
            else {
                continue;
            };
            standing.running_version = Some(report.running_version.clone());
            standing.state = Some(report.state);
            standing.reported_target = report.target_version.clone();
            standing.last_error = report.error.clone();
        }
    }

    /// Takes what the database lacks: state changes, and with `all` also
    /// progress and last-seen moves. Marks them written; a failed write
    /// hands them back with [`LiveView::requeue`].
    pub fn take_dirty(&self, all: bool) -> Vec<ReportedState> {
        let threshold = if all { Dirty::Progress } else { Dirty::State };
        let mut devices = self.lock();
        let mut out = Vec::new();
        for (id, live) in devices.iter_mut() {
            if live.dirty >= threshold {
                live.dirty = Dirty::Clean;
                out.push(ReportedState {
                    id: id.clone(),
                    report: live.report.as_deref().cloned(),
                    last_seen: live.last_seen,
                    address: live.address.clone(),
                });
            }
        }
        out
    }

    /// A batch that could not be written: it is written again later (the
    /// view holds the newest values, so nothing older is written back).
    pub fn requeue(&self, batch: &[ReportedState]) {
        let mut devices = self.lock();
        for row in batch {
            if let Some(live) = devices.get_mut(&row.id) {
                live.dirty = Dirty::State;
            }
        }
    }

    /// A mark of the state changes made so far, for
    /// [`LiveView::stored_up_to`]; taken before the changes are.
    pub fn change_mark(&self) -> u64 {
        self.changes.load(Ordering::SeqCst)
    }

    /// The writer stored every state change up to `mark`.
    pub fn stored_up_to(&self, mark: u64) {
        self.stored.fetch_max(mark, Ordering::SeqCst);
        self.written.notify_waiters();
    }

    /// Waits, at most `within`, until the database holds every state
    /// change made before the call: a count from the database then agrees
    /// with the device views, which read this view (read your writes).
    pub async fn stored_now(&self, within: std::time::Duration) {
        let wanted = self.change_mark();
        if self.stored.load(Ordering::SeqCst) >= wanted {
            return;
        }
        // The writer's next tick may be 250 ms away: a reader waits only
        // for one write.
        self.wanted.notify_one();
        let _ = tokio::time::timeout(within, async {
            loop {
                let written = self.written.notified();
                tokio::pin!(written);
                written.as_mut().enable();
                if self.stored.load(Ordering::SeqCst) >= wanted {
                    return;
                }
                written.await;
            }
        })
        .await;
    }

    /// Resolves when a reader asks for a batch now ([`LiveView::stored_now`]).
    pub async fn write_wanted(&self) {
        self.wanted.notified().await;
    }

    /// Device rows waiting to be written with the next batch.
    pub fn pending_writes(&self) -> usize {
        self.lock()
            .values()
            .filter(|d| d.dirty == Dirty::State)
            .count()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Rollout `rollout_id`'s offer of `version`, reboots free.
    fn target(rollout_id: i64, version: &str) -> DeviceTarget {
        DeviceTarget {
            rollout_id,
            version: version.parse().unwrap(),
            allow_downgrade: false,
            limits: Default::default(),
            hold_reboot: false,
        }
    }

    /// The `n`th second of a test's clock.
    fn t(n: u64) -> Timestamp {
        Timestamp::from(std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000 + n))
    }
    use uplift_proto::channel::{AgentState, Progress};

    /// A report of `state` on `version` (slot a for 1.0, else b), `done` bytes in.
    pub(crate) fn report(state: AgentState, version: &str, done: u64) -> Report {
        Report {
            state,
            running_version: version.parse().unwrap(),
            booted_slot: if version == "1.0" {
                uplift_proto::SlotName::A
            } else {
                uplift_proto::SlotName::B
            },
            target_version: Some("1.1".parse().unwrap()),
            progress: (state == AgentState::Downloading).then_some(Progress {
                done_bytes: done,
                total_bytes: 100,
                fetched_bytes: done,
            }),
            error: None,
        }
    }

    fn serial(n: u64) -> SessionSerial {
        SessionSerial::from_raw(n)
    }

    /// The race seen at 200 devices: a rebooted device's new session says
    /// `idle`, then the replaced session's backlog of `downloading` reports
    /// arrives. None of it may change what the server holds.
    #[test]
    fn a_replaced_sessions_backlog_never_overwrites_the_new_session() {
        let live = LiveView::default();
        let dev: DeviceId = "dev-1".parse().unwrap();
        let old = serial(1);
        let new = serial(2);
        live.claim(&dev, old, t(0));
        assert_eq!(
            live.apply(&dev, old, &report(AgentState::Downloading, "1.0", 10), t(1)),
            Applied::Applied
        );
        live.claim(&dev, new, t(2));
        let idle = report(AgentState::Idle, "1.1", 0);
        assert_eq!(live.apply(&dev, new, &idle, t(3)), Applied::Applied);
        for i in 0..20 {
            assert_eq!(
                live.apply(
                    &dev,
                    old,
                    &report(AgentState::Downloading, "1.0", 20 + i),
                    t(4)
                ),
                Applied::Stale
            );
        }
        let held = live.get(&dev).unwrap();
        assert_eq!(held.report.as_deref(), Some(&idle));
        assert_eq!(held.session, Some(new));
        assert_eq!(held.last_seen, Some(t(3)));
    }

    /// With replicas, a device that left this one reports to another,
    /// whose writer stores it: once this view has written all it had, it
    /// no longer speaks over the database.
    #[test]
    fn a_device_gone_to_another_replica_is_shown_as_stored_once_written() {
        let live = LiveView::default();
        let dev: DeviceId = "dev-1".parse().unwrap();
        live.claim(&dev, serial(1), t(0));
        live.apply(
            &dev,
            serial(1),
            &report(AgentState::Downloading, "1.0", 5),
            t(1),
        );
        let stored = DeviceStanding {
            id: dev.clone(),
            running_version: Some("1.1".parse().unwrap()),
            state: Some(AgentState::Idle),
            reported_target: None,
            last_error: None,
            target_rollout: Some(1),
        };
        let overlaid = |live: &LiveView| {
            let mut standings = [stored.clone()];
            live.overlay_standings(&mut standings);
            standings[0].state
        };
        assert_eq!(
            overlaid(&live),
            Some(AgentState::Downloading),
            "connected here"
        );
        assert!(live.ended(&dev, serial(1), t(2)));
        assert_eq!(
            overlaid(&live),
            Some(AgentState::Downloading),
            "gone, but not written yet: this view is newer"
        );
        assert_eq!(live.take_dirty(true).len(), 1);
        assert_eq!(
            overlaid(&live),
            Some(AgentState::Idle),
            "written: the database is as new or newer"
        );
    }

    #[test]
    fn once_a_new_session_is_registered_the_old_one_is_not_heard() {
        let live = LiveView::default();
        let dev: DeviceId = "dev-1".parse().unwrap();
        live.claim(&dev, serial(1), t(0));
        live.claim(&dev, serial(2), t(1));
        // The new session has not reported yet; the old one still may not.
        assert_eq!(
            live.apply(
                &dev,
                serial(1),
                &report(AgentState::Downloading, "1.0", 5),
                t(2)
            ),
            Applied::Stale
        );
        assert_eq!(live.get(&dev).unwrap().report, None);
        // A late claim by the old session changes nothing either.
        live.claim(&dev, serial(1), t(3));
        assert_eq!(live.get(&dev).unwrap().session, Some(serial(2)));
    }

    #[test]
    fn a_sessions_address_is_kept_written_soon_and_replaced_only_by_a_newer_session() {
        let live = LiveView::default();
        let dev: DeviceId = "dev-1".parse().unwrap();
        live.claim_from(&dev, serial(1), t(0), Some("10.0.0.1:4000".into()));
        let batch = live.take_dirty(false);
        assert_eq!(
            batch.len(),
            1,
            "a new address is written with the next batch"
        );
        assert_eq!(batch[0].address.as_deref(), Some("10.0.0.1:4000"));
        // Offline, the address stays the last known one.
        live.ended(&dev, serial(1), t(1));
        assert_eq!(
            live.get(&dev).unwrap().address.as_deref(),
            Some("10.0.0.1:4000")
        );
        live.take_dirty(true);
        // The same address again is no news; a session that says none
        // (no connection info) keeps it.
        live.claim_from(&dev, serial(2), t(2), Some("10.0.0.1:4000".into()));
        assert!(live.take_dirty(false).is_empty());
        live.claim(&dev, serial(3), t(3));
        assert_eq!(
            live.get(&dev).unwrap().address.as_deref(),
            Some("10.0.0.1:4000")
        );
        // An older session's late claim does not move it.
        live.claim_from(&dev, serial(1), t(4), Some("10.0.0.9:1".into()));
        assert_eq!(
            live.get(&dev).unwrap().address.as_deref(),
            Some("10.0.0.1:4000")
        );
        let mut records = [crate::service::rollouts::tests::device(
            None, None, "1.0", None,
        )];
        records[0].id = dev.clone();
        live.overlay(&mut records);
        assert_eq!(records[0].address.as_deref(), Some("10.0.0.1:4000"));
    }

    #[test]
    fn a_stale_sessions_end_does_not_touch_the_device() {
        let live = LiveView::default();
        let dev: DeviceId = "dev-1".parse().unwrap();
        live.claim(&dev, serial(1), t(0));
        live.claim(&dev, serial(2), t(1));
        live.take_dirty(true);
        live.ended(&dev, serial(1), t(9));
        assert_eq!(live.get(&dev).unwrap().last_seen, Some(t(1)));
        assert!(live.take_dirty(true).is_empty());
    }

    #[test]
    fn state_changes_are_batched_and_progress_waits_for_a_full_flush() {
        let live = LiveView::default();
        let dev: DeviceId = "dev-1".parse().unwrap();
        live.claim(&dev, serial(1), t(0));
        live.apply(
            &dev,
            serial(1),
            &report(AgentState::Downloading, "1.0", 1),
            t(1),
        );
        let batch = live.take_dirty(false);
        assert_eq!(batch.len(), 1, "the first report is a state change");
        assert_eq!(live.pending_writes(), 0);
        // Progress alone is not written on every batch...
        live.apply(
            &dev,
            serial(1),
            &report(AgentState::Downloading, "1.0", 50),
            t(2),
        );
        assert!(live.take_dirty(false).is_empty());
        // ...but it is at shutdown, with its newest value.
        let rest = live.take_dirty(true);
        assert_eq!(rest.len(), 1);
        assert_eq!(
            rest[0]
                .report
                .as_ref()
                .unwrap()
                .progress
                .unwrap()
                .done_bytes,
            50
        );
        // Many changes between two batches become one row with the newest.
        live.apply(
            &dev,
            serial(1),
            &report(AgentState::Verifying, "1.0", 0),
            t(3),
        );
        live.apply(
            &dev,
            serial(1),
            &report(AgentState::RebootPending, "1.0", 0),
            t(4),
        );
        let batch = live.take_dirty(false);
        assert_eq!(batch.len(), 1);
        assert_eq!(
            batch[0].report.as_ref().unwrap().state,
            AgentState::RebootPending
        );
        // A failed write comes back in the next batch.
        live.requeue(&batch);
        assert_eq!(live.take_dirty(false).len(), 1);
    }

    #[test]
    fn the_newest_rollout_decides_a_devices_target() {
        let live = LiveView::default();
        let dev: DeviceId = "dev-1".parse().unwrap();
        live.set_targets(std::slice::from_ref(&dev), &target(2, "1.2"), t(1));
        // A slower, older rollout finishing its write later changes nothing.
        live.set_targets(std::slice::from_ref(&dev), &target(1, "1.1"), t(2));
        assert_eq!(live.target(&dev), Some(target(2, "1.2")));
        live.set_targets(std::slice::from_ref(&dev), &target(3, "1.3"), t(3));
        assert_eq!(live.target(&dev), Some(target(3, "1.3")));
        // The history holds the offers that took effect, in order.
        let (events, _) = live.take_events(10);
        let offered: Vec<(Timestamp, &DeviceEventKind)> =
            events.iter().map(|e| (e.at, &e.event)).collect();
        assert_eq!(
            offered,
            [
                (
                    t(1),
                    &DeviceEventKind::Offer {
                        rollout_id: 2,
                        version: "1.2".parse().unwrap()
                    }
                ),
                (
                    t(3),
                    &DeviceEventKind::Offer {
                        rollout_id: 3,
                        version: "1.3".parse().unwrap()
                    }
                ),
            ]
        );
    }

    #[test]
    fn a_reboot_gate_changes_only_its_rollouts_offers_and_names_them_once() {
        let live = LiveView::default();
        let ids: Vec<DeviceId> = (1..=3)
            .map(|i| format!("dev-{i}").parse().unwrap())
            .collect();
        let target = |rollout_id: i64| DeviceTarget {
            hold_reboot: true,
            ..target(rollout_id, "1.1")
        };
        live.set_targets(&ids[..2], &target(1), t(0));
        live.set_targets(&ids[2..], &target(2), t(0));
        let mut go = live.hold_reboots(1, false);
        go.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        assert_eq!(go, ids[..2].to_vec());
        assert!(!live.target(&ids[0]).unwrap().hold_reboot);
        assert!(
            live.target(&ids[2]).unwrap().hold_reboot,
            "another rollout's gate"
        );
        assert!(
            live.hold_reboots(1, false).is_empty(),
            "nothing to tell twice"
        );
        assert_eq!(live.hold_reboots(1, true).len(), 2, "held again");
    }

    fn fleet(n: usize) -> Vec<DeviceId> {
        (0..n)
            .map(|i| format!("dev-{i}").parse().unwrap())
            .collect()
    }

    #[test]
    fn an_offer_to_a_fleet_the_view_was_sized_for_does_not_grow_its_table() {
        let live = LiveView::default();
        let devices = fleet(5_000);
        live.reserve_for_fleet(devices.len());
        let sized = live.capacity();
        assert!(sized >= 5_000);
        live.follow_targets(&devices, &target(1, "1.1"));
        assert_eq!(live.capacity(), sized, "the table grew during the offers");
        // Sizing again for the same fleet, or a smaller one, changes nothing.
        live.reserve_for_fleet(5_000);
        live.reserve_for_fleet(10);
        assert_eq!(live.capacity(), sized);
    }

    #[test]
    fn a_second_rollout_to_known_devices_does_not_grow_the_table() {
        let live = LiveView::default();
        let devices = fleet(3_000);
        live.follow_targets(&devices, &target(1, "1.1"));
        let after_first = live.capacity();
        assert!(after_first >= 3_000);
        live.follow_targets(&devices, &target(2, "1.1"));
        assert_eq!(live.capacity(), after_first);
        assert_eq!(live.target(&devices[2_999]), Some(target(2, "1.1")));
    }
}
