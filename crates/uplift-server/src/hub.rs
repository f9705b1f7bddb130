//! The live device sessions: who is connected, and how to tell them their
//! target changed (each session's push channel). In memory only, and only
//! what must be: a device that is not connected simply gets its target when
//! it next connects. Download authorization is not here: download tokens
//! are signed ([`crate::download_token`]), so any replica checks them.
//! Replicas learn of each other's sessions from the database: the hub
//! keeps which sessions began and ended since [`crate::presence`] last
//! wrote them there.
//!
//! A removal and a connecting session of the same device meet here: the
//! session's key is checked against the database before it registers, so a
//! removal stored in between would find no session to close, and the
//! session would live on with a revoked key. The hub counts the removals it
//! closed sessions for ([`RemovalEpoch`]); a session registers with the
//! count it saw before its key check and learns whether any removal came
//! since, and only then checks the database again (see
//! `crate::channel::admit`). Both take the same lock, so either the removal
//! finds the session or the session finds the removal.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{watch, Notify};
use uplift_proto::DeviceId;

/// Devices looked up per hold of the hub's lock by the calls that take a
/// whole fleet ([`Hub::split_online`], [`Hub::notify_targets_changed`]):
/// one hold for 100 000 devices would keep sessions from registering for
/// milliseconds, one per device takes the lock 100 000 times.
const DEVICES_PER_LOCK: usize = 1024;

/// The value a session's push channel is left at when its device was
/// removed (never reached by counting changes).
const REMOVED: u64 = u64::MAX;

/// Whether a session's push channel says its device was removed.
pub fn removed(target_changed: &watch::Receiver<u64>) -> bool {
    *target_changed.borrow() == REMOVED
}

#[derive(Debug, Default)]
pub struct Hub {
    inner: Mutex<Inner>,
    /// The sessions told of a change that have not yet sent what it
    /// means: while any are, offers are still going out from here.
    owed: Arc<Owed>,
}

/// The sessions of one hub that owe their device a frame.
#[derive(Debug, Clone)]
pub struct OffersOwed(Arc<Owed>);

impl OffersOwed {
    /// [`Hub::offers_sent`].
    pub async fn sent(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let settled = self.0.settled.notified();
            tokio::pin!(settled);
            // Registered before the count is read, so a last payment in
            // between still wakes this.
            settled.as_mut().enable();
            if self.0.sessions.load(Ordering::Acquire) == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, settled).await.is_err() {
                return false;
            }
        }
    }
}

/// How many sessions owe their device a frame, and a wake-up for those
/// waiting until none does ([`Hub::offers_sent`]).
#[derive(Debug, Default)]
struct Owed {
    sessions: AtomicUsize,
    settled: Notify,
}

impl Owed {
    /// A session told of a change owes it, unless it owed one already (or
    /// ended). Counted before the session is marked: it pays only once
    /// marked, so the count never drops below what is owed.
    fn owe(&self, due: &AtomicU8) {
        self.sessions.fetch_add(1, Ordering::AcqRel);
        if due
            .compare_exchange(SETTLED, DUE, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            self.paid();
        }
    }

    fn paid(&self) {
        if self.sessions.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.settled.notify_waiters();
        }
    }
}

/// What one session owes its device: told its target changed, it has not
/// yet sent the offer. [`OfferDue::paid`] once sent; dropped with the
/// session, whatever it owed is forgiven (a closed session sends nothing).
#[derive(Debug)]
pub struct OfferDue {
    state: Arc<AtomicU8>,
    owed: Arc<Owed>,
}

/// A session's [`OfferDue`] states: nothing owed, a change to send, gone.
const SETTLED: u8 = 0;
const DUE: u8 = 1;
const CLOSED: u8 = 2;

impl OfferDue {
    /// The session sent its device what the last change means.
    pub fn paid(&self) {
        if self
            .state
            .compare_exchange(DUE, SETTLED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.owed.paid();
        }
    }
}

impl Drop for OfferDue {
    fn drop(&mut self) {
        if self.state.swap(CLOSED, Ordering::AcqRel) == DUE {
            self.owed.paid();
        }
    }
}

/// A session as registered: its serial, what it owes its device, and
/// whether any device was removed since its key was checked.
#[derive(Debug)]
pub struct Registered {
    pub serial: SessionSerial,
    pub offer_due: OfferDue,
    pub removed_since: bool,
}

#[derive(Debug, Default)]
struct Inner {
    next_serial: u64,
    sessions: HashMap<DeviceId, Session>,
    /// Per device, the newest session change the database has not heard of.
    presence: HashMap<DeviceId, PresenceChange>,
    /// How many removals this hub was told of ([`Hub::close_removed`]).
    removals: u64,
}

/// How many removals a hub had been told of at some moment: taken before a
/// device's key is checked, handed back when its session registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemovalEpoch(u64);

/// A session change as the other replicas learn it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PresenceChange {
    /// Connected here at this time (the replica's clock): a later
    /// connection elsewhere wins over it, an earlier one does not.
    Connected(time::OffsetDateTime),
    Disconnected,
}

#[derive(Debug)]
struct Session {
    serial: u64,
    /// Bumped when the device's target changes; dropped to end the session.
    target_changed: watch::Sender<u64>,
    /// The session's [`OfferDue`] state, set when it is told of a change.
    due: Arc<AtomicU8>,
}

/// Identifies one session so a stale session's cleanup cannot remove its
/// replacement (a device that reconnects before the old socket times out).
/// Serials grow with every session the server process registers, so a
/// larger one is always the newer session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SessionSerial(u64);

impl SessionSerial {
    #[cfg(test)]
    pub(crate) fn from_raw(n: u64) -> Self {
        Self(n)
    }
}

impl Hub {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding this lock leaves plain maps behind; still usable.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The removals told so far: take it before checking a device's key.
    pub fn removal_epoch(&self) -> RemovalEpoch {
        RemovalEpoch(self.lock().removals)
    }

    /// Registers a session of a device no removal is in question for (tests).
    #[cfg(test)]
    pub fn register(&self, device: DeviceId, target_changed: watch::Sender<u64>) -> SessionSerial {
        let seen = self.removal_epoch();
        self.register_since(device, target_changed, seen).serial
    }

    /// Registers a session, replacing (and thereby closing) any older one of
    /// the same device, and says whether any device was removed since
    /// `seen` (then the caller checks again that its own was not). A
    /// removal told after this returns finds the session and closes it.
    pub fn register_since(
        &self,
        device: DeviceId,
        target_changed: watch::Sender<u64>,
        seen: RemovalEpoch,
    ) -> Registered {
        let due = Arc::new(AtomicU8::new(SETTLED));
        let mut inner = self.lock();
        let removed_since = inner.removals != seen.0;
        inner.next_serial += 1;
        let serial = inner.next_serial;
        inner.presence.insert(
            device.clone(),
            PresenceChange::Connected(time::OffsetDateTime::now_utc()),
        );
        // The old session's sender is dropped here: its loop sees that and ends.
        inner.sessions.insert(
            device,
            Session {
                serial,
                target_changed,
                due: due.clone(),
            },
        );
        Registered {
            serial: SessionSerial(serial),
            offer_due: OfferDue {
                state: due,
                owed: self.owed.clone(),
            },
            removed_since,
        }
    }

    /// Waits until every session told of a change has sent it (at most
    /// `limit`: a device that does not read holds its session's frame
    /// back); whether they all had. A rollout's start writes its members
    /// after this, so the bulk write does not hold up the offers.
    pub async fn offers_sent(&self, limit: Duration) -> bool {
        self.offers_owed().sent(limit).await
    }

    /// What [`Hub::offers_sent`] waits on, for a task that outlives the
    /// request that started it.
    pub fn offers_owed(&self) -> OffersOwed {
        OffersOwed(self.owed.clone())
    }

    pub fn unregister(&self, device: &DeviceId, serial: SessionSerial) {
        let mut inner = self.lock();
        if inner
            .sessions
            .get(device)
            .is_some_and(|s| s.serial == serial.0)
        {
            inner.sessions.remove(device);
            inner
                .presence
                .insert(device.clone(), PresenceChange::Disconnected);
        }
    }

    /// The session changes since the last call, each device's newest.
    pub fn take_presence(&self) -> Vec<(DeviceId, PresenceChange)> {
        self.lock().presence.drain().collect()
    }

    /// Every session held now, as connected, and forgets the changes
    /// pending: for a replica writing all its sessions afresh.
    pub fn presence_snapshot(&self) -> Vec<(DeviceId, PresenceChange)> {
        let mut inner = self.lock();
        inner.presence.clear();
        let now = time::OffsetDateTime::now_utc();
        inner
            .sessions
            .keys()
            .map(|id| (id.clone(), PresenceChange::Connected(now)))
            .collect()
    }

    /// Changes a failed write took, handed back unless newer ones came.
    pub fn requeue_presence(&self, changes: Vec<(DeviceId, PresenceChange)>) {
        let mut inner = self.lock();
        for (device, change) in changes {
            inner.presence.entry(device).or_insert(change);
        }
    }

    pub fn is_online(&self, device: &DeviceId) -> bool {
        self.lock().sessions.contains_key(device)
    }

    /// `devices` split into those with a session here and the rest, each
    /// in the order given.
    pub fn split_online<'a, D: Borrow<DeviceId>>(
        &self,
        devices: &'a [D],
    ) -> (Vec<&'a D>, Vec<&'a D>) {
        let (mut here, mut elsewhere) = (Vec::new(), Vec::new());
        for chunk in devices.chunks(DEVICES_PER_LOCK) {
            let inner = self.lock();
            for device in chunk {
                if inner.sessions.contains_key(device.borrow()) {
                    here.push(device);
                } else {
                    elsewhere.push(device);
                }
            }
        }
        (here, elsewhere)
    }

    /// The devices connected now, in no particular order.
    pub fn online_ids(&self) -> Vec<DeviceId> {
        self.lock().sessions.keys().cloned().collect()
    }

    pub fn online_count(&self) -> usize {
        self.lock().sessions.len()
    }

    /// Ends a device's session here, if it has one, telling it why: the
    /// device was removed. Returns whether it was connected here. Call it
    /// for every removal, connected here or not: a session whose key was
    /// checked before the removal and that registers after it learns of it
    /// by the count this keeps.
    pub fn close_removed(&self, device: &DeviceId) -> bool {
        let mut inner = self.lock();
        inner.removals += 1;
        match inner.sessions.remove(device) {
            Some(session) => {
                // Offline for the other replicas too (its session's own
                // unregister finds the session gone and records nothing).
                inner
                    .presence
                    .insert(device.clone(), PresenceChange::Disconnected);
                // The session reads this value once its sender is gone (see
                // `removed`); dropped here, the sender ends its loop.
                session.target_changed.send_replace(REMOVED);
                true
            }
            None => false,
        }
    }

    /// Tells a connected device's session that its target changed; the
    /// session then sends the current target. Never blocks and never loses a
    /// change. Returns false if the device is offline (it gets its target
    /// when it connects).
    pub fn notify_target_changed(&self, device: &DeviceId) -> bool {
        self.tell(&self.lock(), device)
    }

    /// [`Hub::notify_target_changed`] for each of `devices`; returns how
    /// many had a session here.
    pub fn notify_targets_changed<D: Borrow<DeviceId>>(&self, devices: &[D]) -> usize {
        devices
            .chunks(DEVICES_PER_LOCK)
            .map(|chunk| {
                let inner = self.lock();
                chunk
                    .iter()
                    .filter(|device| self.tell(&inner, (*device).borrow()))
                    .count()
            })
            .sum()
    }

    fn tell(&self, inner: &Inner, device: &DeviceId) -> bool {
        match inner.sessions.get(device) {
            Some(session) => {
                self.owed.owe(&session.due);
                session.target_changed.send_modify(|n| *n += 1);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stale_session_cannot_unregister_its_replacement() {
        let hub = Hub::default();
        let dev: DeviceId = "dev-1".parse().unwrap();
        let (tx1, rx1) = watch::channel(0);
        let (tx2, mut rx2) = watch::channel(0);
        let old = hub.register(dev.clone(), tx1);
        let _new = hub.register(dev.clone(), tx2);
        assert!(
            rx1.has_changed().is_err(),
            "the replaced session learns it was replaced"
        );
        hub.unregister(&dev, old);
        assert!(hub.is_online(&dev));
        assert!(hub.notify_target_changed(&dev));
        assert!(rx2.has_changed().unwrap());
        rx2.mark_unchanged();
        assert!(!removed(&rx2));
        assert!(hub.close_removed(&dev));
        assert!(!hub.is_online(&dev));
        assert!(rx2.has_changed().is_err(), "the session ends");
        assert!(removed(&rx2), "and learns why");
        assert!(!hub.close_removed(&dev));
    }

    #[test]
    fn a_session_learns_of_removals_told_since_its_key_was_checked() {
        let hub = Hub::default();
        let dev: DeviceId = "dev-1".parse().unwrap();
        let seen = hub.removal_epoch();
        let (tx, _rx) = watch::channel(0);
        assert!(!hub.register_since(dev.clone(), tx, seen).removed_since);
        // A removal of a device with no session here still counts.
        assert!(!hub.close_removed(&"dev-2".parse().unwrap()));
        let (tx, _rx) = watch::channel(0);
        assert!(hub.register_since(dev.clone(), tx, seen).removed_since);
        let (tx, _rx) = watch::channel(0);
        assert!(
            !hub.register_since(dev, tx, hub.removal_epoch())
                .removed_since
        );
    }

    #[test]
    fn presence_keeps_each_devices_newest_change_and_a_failed_write_loses_none() {
        let hub = Hub::default();
        let a: DeviceId = "dev-a".parse().unwrap();
        let b: DeviceId = "dev-b".parse().unwrap();
        let (tx, _rx) = watch::channel(0);
        let first = hub.register(a.clone(), tx);
        hub.unregister(&a, first);
        let (tx, _rx) = watch::channel(0);
        hub.register(a.clone(), tx);
        let (tx, _rx) = watch::channel(0);
        let b_session = hub.register(b.clone(), tx);
        let mut taken = hub.take_presence();
        taken.sort_by(|x, y| x.0.as_str().cmp(y.0.as_str()));
        assert_eq!(taken.len(), 2, "{taken:?}");
        assert!(matches!(taken[0], (ref d, PresenceChange::Connected(_)) if *d == a));
        assert!(hub.take_presence().is_empty(), "taken once");

        hub.unregister(&b, b_session);
        // The write failed; meanwhile b came back: the newer change stays.
        let (tx, _rx) = watch::channel(0);
        hub.register(b.clone(), tx);
        hub.requeue_presence(vec![(b.clone(), PresenceChange::Disconnected)]);
        hub.requeue_presence(taken);
        let mut again = hub.take_presence();
        again.sort_by(|x, y| x.0.as_str().cmp(y.0.as_str()));
        assert_eq!(again.len(), 2);
        assert!(again
            .iter()
            .all(|(_, c)| matches!(c, PresenceChange::Connected(_))));
        assert_eq!(hub.presence_snapshot().len(), 2);
    }

    #[test]
    fn target_changes_coalesce_and_none_is_lost() {
        let hub = Hub::default();
        let dev: DeviceId = "dev-1".parse().unwrap();
        let (tx, mut rx) = watch::channel(0);
        hub.register(dev.clone(), tx);
        for _ in 0..1000 {
            assert!(hub.notify_target_changed(&dev));
        }
        assert!(rx.has_changed().unwrap());
        assert_eq!(*rx.borrow_and_update(), 1000);
        assert!(!hub.notify_target_changed(&"dev-offline".parse().unwrap()));
    }

    /// Two sessions registered on `hub`, as the channel registers them.
    fn two_sessions(hub: &Hub) -> [(DeviceId, Registered, watch::Receiver<u64>); 2] {
        ["dev-a", "dev-b"].map(|name| {
            let device: DeviceId = name.parse().unwrap();
            let (tx, rx) = watch::channel(0);
            let registered = hub.register_since(device.clone(), tx, hub.removal_epoch());
            (device, registered, rx)
        })
    }

    #[tokio::test]
    async fn offers_are_sent_once_every_told_session_sent_its_frame_or_ended() {
        let hub = Hub::default();
        let [(a, a_session, _a_rx), (b, b_session, _b_rx)] = two_sessions(&hub);
        let briefly = Duration::from_millis(10);
        assert!(
            hub.offers_sent(Duration::ZERO).await,
            "nothing told, nothing owed"
        );
        // Told twice before it sends: the session owes one frame, the newest.
        assert!(hub.notify_target_changed(&a));
        assert!(hub.notify_target_changed(&a));
        assert!(hub.notify_target_changed(&b));
        assert!(!hub.offers_sent(briefly).await);
        a_session.offer_due.paid();
        // The second wake-up's frame owes nothing more.
        a_session.offer_due.paid();
        assert!(!hub.offers_sent(briefly).await, "b has not sent");
        // A session that ends owing is let off; once ended it owes nothing.
        drop(b_session);
        assert!(hub.offers_sent(Duration::ZERO).await);
        assert!(hub.notify_target_changed(&b));
        assert!(hub.offers_sent(Duration::ZERO).await);
        // A session that sent is owed a frame again by the next change.
        assert!(hub.notify_target_changed(&a));
        assert!(!hub.offers_sent(briefly).await);
        drop(a_session);
        assert!(hub.offers_sent(Duration::ZERO).await);
    }

    #[tokio::test]
    async fn a_wait_for_the_offers_ends_when_the_last_is_sent_not_at_its_limit() {
        let hub = Arc::new(Hub::default());
        let [(a, a_session, _a_rx), (b, b_session, _b_rx)] = two_sessions(&hub);
        assert!(hub.notify_target_changed(&a));
        assert!(hub.notify_target_changed(&b));
        let started = std::time::Instant::now();
        let waiting = tokio::spawn({
            let hub = hub.clone();
            async move { hub.offers_sent(Duration::from_secs(60)).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        a_session.offer_due.paid();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished(), "b has not sent yet");
        b_session.offer_due.paid();
        assert!(waiting.await.unwrap());
        assert!(started.elapsed() < Duration::from_secs(30));
    }

    #[tokio::test]
    async fn a_fleet_larger_than_one_lock_hold_is_split_and_told_in_order() {
        let hub = Hub::default();
        let [(a, _a_session, mut a_rx), (b, _b_session, mut b_rx)] = two_sessions(&hub);
        // a first, b past the first hold of the lock, offline devices around.
        let mut fleet: Vec<DeviceId> = (0..2 * DEVICES_PER_LOCK + 10)
            .map(|n| format!("offline-{n}").parse().unwrap())
            .collect();
        fleet[3] = a.clone();
        fleet[DEVICES_PER_LOCK + 5] = b.clone();
        let (here, elsewhere) = hub.split_online(&fleet);
        assert_eq!(here, [&a, &b]);
        let offline: Vec<&DeviceId> = fleet.iter().filter(|d| **d != a && **d != b).collect();
        assert_eq!(elsewhere, offline);
        assert_eq!(hub.notify_targets_changed(&fleet), 2);
        assert!(a_rx.has_changed().unwrap() && b_rx.has_changed().unwrap());
        assert_eq!(*a_rx.borrow_and_update(), 1);
        assert_eq!(*b_rx.borrow_and_update(), 1);
        assert!(
            !hub.offers_sent(Duration::ZERO).await,
            "both told sessions owe their offer"
        );
    }
}
