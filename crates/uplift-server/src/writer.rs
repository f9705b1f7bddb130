//! Persists the live view ([`crate::live`]) in batches, off the device
//! sessions: state changes and history events every [`FLUSH_EVERY`], at
//! most [`BATCH_ROWS`] rows per transaction, and everything (progress too)
//! at shutdown. A slow or failing database delays only this task; sessions
//! keep reading frames and answering pings, and what could not be written
//! is tried again. It also keeps the device history within its limits:
//! per device as events are written, by age every [`PRUNE_EVERY`].

use crate::live::LiveView;
use crate::state::Stats;
use crate::store::{Store, Timestamp};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// How stale the database's copy of device state may get.
pub const FLUSH_EVERY: Duration = Duration::from_millis(250);
/// Rows per transaction: short transactions keep readers and enrollments moving.
const BATCH_ROWS: usize = 500;
/// After a failed write, wait this long before trying again.
const RETRY_AFTER: Duration = Duration::from_secs(1);
/// How often history events past their age limit are dropped.
pub const PRUNE_EVERY: Duration = Duration::from_secs(600);
/// How often the live view is sized for the fleet the database holds
/// ([`LiveView::reserve_for_fleet`]): devices enroll on any replica.
pub const SIZE_EVERY: Duration = Duration::from_secs(10);

#[derive(Debug)]
pub struct Writer {
    pub live: Arc<LiveView>,
    pub store: Arc<dyn Store>,
    pub stats: Arc<Stats>,
    pub retention: Retention,
}

/// How much device history is kept (`[limits]` of the server config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub per_device: u32,
    pub max_age: Option<Duration>,
}

impl From<&crate::config::Limits> for Retention {
    fn from(limits: &crate::config::Limits) -> Self {
        Self {
            per_device: limits.device_history_per_device,
            max_age: limits.device_history_age(),
        }
    }
}

impl Writer {
    /// Keeps the live view's table sized for every enrolled device, so a
    /// rollout to the whole fleet finds room in it (the table grows here,
    /// between rollouts, not while offers go out). A failed count waits
    /// for the next tick: the table then grows as it fills, as before.
    async fn size_for_fleet(&self) {
        match self.store.count_devices().await {
            Ok(fleet) => self.live.reserve_for_fleet(fleet as usize),
            Err(e) => tracing::debug!("cannot count the fleet to size the live view: {e}"),
        }
    }

    /// Runs until `stop` flips to true, then writes everything left.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(FLUSH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut prune = tokio::time::interval(PRUNE_EVERY);
        prune.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut size = tokio::time::interval(SIZE_EVERY);
        size.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if !self.flush(false).await {
                        tokio::time::sleep(RETRY_AFTER).await;
                    }
                }
                _ = self.live.write_wanted() => {
                    if !self.flush(false).await {
                        tokio::time::sleep(RETRY_AFTER).await;
                    }
                }
                _ = prune.tick() => self.prune(time::OffsetDateTime::now_utc()).await,
                _ = size.tick() => self.size_for_fleet().await,
                _ = stop.changed() => break,
            }
        }
        // One more try for the final state; a database that is down now
        // loses only what devices report again when they reconnect.
        if !self.flush(true).await {
            tracing::error!(
                "could not write the last device states at shutdown; devices report them again on reconnect"
            );
        }
    }

    /// Drops history events older than the age limit, as of `now`.
    pub async fn prune(&self, now: time::OffsetDateTime) {
        let Some(age) = self.retention.max_age else {
            return;
        };
        let cutoff = Timestamp::from(now - age);
        match self.store.prune_events(cutoff).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(events = n, before = %cutoff, "pruned device history"),
            Err(e) => tracing::warn!("cannot prune device history: {e}; trying again later"),
        }
    }

    /// Writes what the database lacks; false if a write failed.
    pub async fn flush(&self, all: bool) -> bool {
        let states = self.flush_states(all).await;
        // Events after the states they tell of, so a history never runs
        // ahead of the device row; and not while the database fails.
        states && self.flush_events().await
    }

    /// Writes the history events waiting; false if a write failed.
    async fn flush_events(&self) -> bool {
        loop {
            let (batch, dropped) = self.live.take_events(BATCH_ROWS);
            if dropped > 0 {
                tracing::warn!(
                    events = dropped,
                    "dropped device history events the database could not take in time"
                );
            }
            if batch.is_empty() {
                return true;
            }
            let last = batch.len() < BATCH_ROWS;
            if let Err(e) = self
                .store
                .record_events(&batch, self.retention.per_device)
                .await
            {
                tracing::error!(
                    events = batch.len(),
                    "cannot write device history: {e}; it stays in memory and is written again"
                );
                self.live.requeue_events(batch);
                return false;
            }
            if last {
                return true;
            }
        }
    }

    async fn flush_states(&self, all: bool) -> bool {
        let mark = self.live.change_mark();
        let pending = self.live.take_dirty(all);
        let mut ok = true;
        for batch in pending.chunks(BATCH_ROWS) {
            if !ok {
                self.live.requeue(batch);
                continue;
            }
            match self.store.record_reports(batch).await {
                Ok(rows) => {
                    self.stats
                        .device_rows_written
                        .fetch_add(rows, Ordering::Relaxed);
                    self.stats.write_batches.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    tracing::error!(
                        rows = batch.len(),
                        "cannot write device states: {e}; they stay in memory and are written again"
                    );
                    self.live.requeue(batch);
                    ok = false;
                }
            }
        }
        if ok {
            self.live.stored_up_to(mark);
        }
        ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::SessionSerial;
    use crate::live::tests::report;
    use crate::store::stamp::ts;
    use crate::store::{NewDevice, SqliteStore};
    use uplift_proto::channel::AgentState;
    use uplift_proto::DeviceId;

    async fn enroll(store: &SqliteStore, id: &DeviceId, n: usize) {
        store
            .insert_device(&NewDevice {
                id: id.clone(),
                device_type: "gw".parse().unwrap(),
                hardware_id: format!("hw-{n}").parse().unwrap(),
                public_key: format!("key-{n}"),
                enrolled_at: ts("2026-12-02T00:00:00Z"),
            })
            .await
            .unwrap();
    }

    fn writer(live: &Arc<LiveView>, store: &Arc<SqliteStore>, retention: Retention) -> Writer {
        Writer {
            live: live.clone(),
            store: store.clone(),
            stats: Arc::new(Stats::default()),
            retention,
        }
    }

    #[tokio::test]
    async fn batches_reach_the_database_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("uplift.db");
        let store = Arc::new(SqliteStore::open(&path).await.unwrap());
        let ids: Vec<DeviceId> = (0..1200)
            .map(|i| format!("dev-{i:04}").parse().unwrap())
            .collect();
        for (i, id) in ids.iter().enumerate() {
            enroll(&store, id, i).await;
        }
        let live = Arc::new(LiveView::default());
        let writer = writer(
            &live,
            &store,
            Retention::from(&crate::config::Limits::default()),
        );
        let session = SessionSerial::from_raw(1);
        for id in &ids {
            live.apply(
                id,
                session,
                &report(AgentState::Downloading, "1.0", 1),
                ts("2026-12-02T10:00:01Z"),
            );
            live.apply(
                id,
                session,
                &report(AgentState::Downloading, "1.0", 60),
                ts("2026-12-02T10:00:02Z"),
            );
        }
        assert!(writer.flush(false).await);
        // One row per device however often it reported, in batches of 500.
        assert_eq!(
            writer.stats.device_rows_written.load(Ordering::Relaxed),
            1200
        );
        assert_eq!(writer.stats.write_batches.load(Ordering::Relaxed), 3);
        assert_eq!(live.pending_writes(), 0);
        // Progress alone waits for the final flush.
        live.apply(
            &ids[0],
            session,
            &report(AgentState::Downloading, "1.0", 90),
            ts("2026-12-02T10:00:03.5Z"),
        );
        assert!(writer.flush(false).await);
        assert_eq!(
            writer.stats.device_rows_written.load(Ordering::Relaxed),
            1200
        );
        assert!(writer.flush(true).await);
        drop(writer);
        drop(store);

        let reopened = SqliteStore::open(&path).await.unwrap();
        let devices = reopened.list_devices().await.unwrap();
        assert_eq!(devices.len(), 1200);
        assert!(devices
            .iter()
            .all(|d| d.state == Some(AgentState::Downloading)));
        let first = devices.iter().find(|d| d.id == ids[0]).unwrap();
        assert_eq!(first.progress.unwrap().done_bytes, 90);
        assert_eq!(first.last_seen, Some(ts("2026-12-02T10:00:03.5Z")));
    }

    #[tokio::test]
    async fn history_is_written_with_the_batches_and_kept_within_its_limits() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(
            SqliteStore::open(&dir.path().join("uplift.db"))
                .await
                .unwrap(),
        );
        let dev: DeviceId = "dev-1".parse().unwrap();
        enroll(&store, &dev, 1).await;
        let live = Arc::new(LiveView::default());
        let writer = writer(
            &live,
            &store,
            Retention {
                per_device: 3,
                max_age: Some(Duration::from_secs(86_400)),
            },
        );
        let session = SessionSerial::from_raw(1);
        live.set_targets(
            std::slice::from_ref(&dev),
            &crate::store::DeviceTarget {
                rollout_id: 1,
                version: "1.1".parse().unwrap(),
                allow_downgrade: false,
                limits: Default::default(),
                hold_reboot: false,
            },
            ts("2026-12-01T00:00:00Z"),
        );
        for (state, at) in [
            (AgentState::Idle, "2026-12-01T00:00:01Z"),
            (AgentState::Downloading, "2026-12-01T00:00:02Z"),
            (AgentState::Verifying, "2026-12-02T00:00:03Z"),
            (AgentState::RebootPending, "2026-12-02T00:00:04Z"),
        ] {
            live.apply(&dev, session, &report(state, "1.0", 100), ts(at));
        }
        assert_eq!(live.pending_events(), 4);
        assert!(writer.flush(false).await);
        assert_eq!(live.pending_events(), 0);
        let kinds = |events: Vec<uplift_proto::api::DeviceEvent>| -> Vec<&'static str> {
            events.iter().map(|e| e.event.name()).collect()
        };
        // Four happened; the oldest (the offer) is past the three kept.
        assert_eq!(
            kinds(store.device_history(&dev, None, 10).await.unwrap()),
            ["installed", "download_finished", "download_started"]
        );
        let now = crate::store::stamp::ts("2026-12-03T00:00:02.9Z").instant();
        writer.prune(now).await;
        assert_eq!(
            kinds(store.device_history(&dev, None, 10).await.unwrap()),
            ["installed", "download_finished"],
            "a day is kept (02.9 and 03 compare as times, not as text)"
        );
        // 0.5 s more than a day old: dropped, to the microsecond.
        let now = crate::store::stamp::ts("2026-12-03T00:00:03.5Z").instant();
        writer.prune(now).await;
        assert_eq!(
            kinds(store.device_history(&dev, None, 10).await.unwrap()),
            ["installed"]
        );
    }
}
