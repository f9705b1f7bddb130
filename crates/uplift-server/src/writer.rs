//! Persists the live view ([`crate::live`]) in batches, off the device
//! sessions: state changes every [`FLUSH_EVERY`], at most [`BATCH_ROWS`]
//! rows per transaction, and everything (progress too) at shutdown. A slow
//! or failing database delays only this task; sessions keep reading frames
//! and answering pings, and what could not be written is tried again.

use crate::live::LiveView;
use crate::state::Stats;
use crate::store::Store;
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

#[derive(Debug)]
pub struct Writer {
    pub live: Arc<LiveView>,
    pub store: Arc<dyn Store>,
    pub stats: Arc<Stats>,
}

impl Writer {
    /// Runs until `stop` flips to true, then writes everything left.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(FLUSH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if !self.flush(false).await {
                        tokio::time::sleep(RETRY_AFTER).await;
                    }
                }
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

    /// Writes what the database lacks; false if a write failed.
    pub async fn flush(&self, all: bool) -> bool {
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
        ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::SessionSerial;
    use crate::live::tests::report;
    use crate::store::{NewDevice, SqliteStore};
    use uplift_proto::channel::AgentState;
    use uplift_proto::DeviceId;

    #[tokio::test]
    async fn batches_reach_the_database_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("uplift.db");
        let store = Arc::new(SqliteStore::open(&path).await.unwrap());
        let ids: Vec<DeviceId> = (0..1200)
            .map(|i| format!("dev-{i:04}").parse().unwrap())
            .collect();
        for (i, id) in ids.iter().enumerate() {
            store
                .insert_device(&NewDevice {
                    id: id.clone(),
                    device_type: "gw".parse().unwrap(),
                    hardware_id: format!("hw-{i}").parse().unwrap(),
                    public_key: format!("key-{i}"),
                    enrolled_at: "2026-12-02T00:00:00Z".into(),
                })
                .await
                .unwrap();
        }
        let live = Arc::new(LiveView::default());
        let writer = Writer {
            live: live.clone(),
            store: store.clone(),
            stats: Arc::new(Stats::default()),
        };
        let session = SessionSerial::from_raw(1);
        for id in &ids {
            live.apply(
                id,
                session,
                &report(AgentState::Downloading, "1.0", 1),
                "t1",
            );
            live.apply(
                id,
                session,
                &report(AgentState::Downloading, "1.0", 60),
                "t2",
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
            "t3",
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
        assert_eq!(first.last_seen.as_deref(), Some("t3"));
    }
}
