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
