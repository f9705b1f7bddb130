//! The server's counters: fleet size, traffic sent, and the work queued in
//! memory.
//!
//! The fleet's size is a `COUNT(*)` over every device row, which costs the
//! database more the larger the fleet: 61 ms a count at 100 000 devices on
//! a loaded PostgreSQL, 1 to 2.3 s while a killed replica's sessions came
//! back, and a monitor polling ten times a second kept most of a core busy.
//! So a replica answers from its last count, counts again in the
//! background once that is a second old ([`FLEET_COUNT_FRESH`]), one count
//! at a time, and waits for a count only when it has none or enrolled or
//! removed a device since its last: on one server the size is always
//! exact, and another replica's enrollments show within a count.

use super::ServiceResult;
use crate::budget;
use crate::state::AppState;
use crate::store::{Store, StoreResult};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use uplift_proto::api::ServerStats;

/// How long a count of the fleet answers for, unless the fleet changed here.
pub const FLEET_COUNT_FRESH: Duration = Duration::from_secs(1);

pub async fn get(state: &AppState) -> ServiceResult<ServerStats> {
    Ok(ServerStats {
        devices_total: state.stats.fleet_size.get(&state.store).await?,
        devices_online: state.hub.online_count() as u64,
        bytes_sent: state.stats.bytes_sent.load(Relaxed),
        chunks_sent: state.stats.chunks_sent.load(Relaxed),
        reports_applied: state.stats.reports_applied.load(Relaxed),
        reports_stale: state.stats.reports_stale.load(Relaxed),
        device_rows_written: state.stats.device_rows_written.load(Relaxed),
        write_batches: state.stats.write_batches.load(Relaxed),
        device_rows_pending: state.live.pending_writes() as u64,
        downloads_in_flight: state.budgets.in_use(budget::Kind::Download) as u64,
    })
}

/// The fleet's size as last counted here.
#[derive(Debug, Default)]
pub struct FleetSize {
    /// Enrollments and removals made here: a count taken before the
    /// latest one is out of date.
    changes: AtomicU64,
    last: std::sync::Mutex<Option<Count>>,
    /// Held while counting: one count at a time.
    counting: tokio::sync::Mutex<()>,
    /// A background count is under way.
    refreshing: AtomicBool,
}

#[derive(Debug, Clone, Copy)]
struct Count {
    devices: u64,
    at: Instant,
    /// [`FleetSize::changes`] when it was taken.
    changes: u64,
}

/// How a call for the fleet's size is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    /// From the last count.
    Last(u64),
    /// From the last count, which is old enough to be taken again.
    LastAndRecount(u64),
    /// None holds (none taken, or a device enrolled or was removed here
    /// since): wait for a count.
    Count,
}

/// The rule, time passed in.
fn answer(last: Option<Count>, changes: u64, now: Instant) -> Answer {
    match last {
        Some(count) if count.changes == changes => {
            if now.saturating_duration_since(count.at) < FLEET_COUNT_FRESH {
                Answer::Last(count.devices)
            } else {
                Answer::LastAndRecount(count.devices)
            }
        }
        _ => Answer::Count,
    }
}

impl FleetSize {
    /// A device enrolled or was removed here.
    pub fn changed(&self) {
        self.changes.fetch_add(1, Ordering::AcqRel);
    }

    /// The fleet's size (see the module's doc).
    pub async fn get(self: &Arc<Self>, store: &Arc<dyn Store>) -> StoreResult<u64> {
        let changes = self.changes.load(Ordering::Acquire);
        let last = *self.last.lock().expect("never poisoned");
        match answer(last, changes, Instant::now()) {
            Answer::Last(devices) => Ok(devices),
            Answer::LastAndRecount(devices) => {
                if !self.refreshing.swap(true, Ordering::AcqRel) {
                    let (size, store) = (self.clone(), store.clone());
                    tokio::spawn(async move {
                        if let Err(e) = size.count(store.as_ref(), changes).await {
                            tracing::warn!("counting the fleet for the server's stats: {e}; the last count stands");
                        }
                        size.refreshing.store(false, Ordering::Release);
                    });
                }
                Ok(devices)
            }
            Answer::Count => self.count(store.as_ref(), changes).await,
        }
    }

    /// Counts, unless a count that holds was taken while this one waited
    /// for its turn. `changes` is read before: a change during the count
    /// leaves it out of date.
    async fn count(&self, store: &dyn Store, changes: u64) -> StoreResult<u64> {
        let _turn = self.counting.lock().await;
        let last = *self.last.lock().expect("never poisoned");
        if let Answer::Last(devices) = answer(last, changes, Instant::now()) {
            return Ok(devices);
        }
        let devices = store.count_devices().await?;
        let mut last = self.last.lock().expect("never poisoned");
        // A count of a later change here is not replaced by an earlier one.
        if last.is_none_or(|kept| kept.changes <= changes) {
            *last = Some(Count {
                devices,
                at: Instant::now(),
                changes,
            });
        }
        Ok(devices)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count_at(at: Instant, changes: u64) -> Option<Count> {
        Some(Count {
            devices: 7,
            at,
            changes,
        })
    }

    #[test]
    fn a_count_answers_at_once_and_is_taken_again_after_a_second_unless_the_fleet_changed_here() {
        let t0 = Instant::now();
        assert_eq!(answer(None, 0, t0), Answer::Count, "none taken yet");
        assert_eq!(answer(count_at(t0, 3), 3, t0), Answer::Last(7));
        let nearly = t0 + Duration::from_millis(999);
        assert_eq!(answer(count_at(t0, 3), 3, nearly), Answer::Last(7));
        assert_eq!(
            answer(count_at(t0, 3), 3, t0 + FLEET_COUNT_FRESH),
            Answer::LastAndRecount(7),
            "a second old: answered, and counted again behind the answer"
        );
        assert_eq!(
            answer(count_at(t0, 3), 4, t0),
            Answer::Count,
            "an enrollment or removal here since: waits for a count"
        );
    }

    #[tokio::test]
    async fn a_change_here_is_counted_at_once_and_one_made_elsewhere_shows_after_the_next_count() {
        let dir = tempfile::tempdir().unwrap();
        let state = crate::service::testing::state(dir.path()).await;
        let size = &state.stats.fleet_size;
        assert_eq!(size.get(&state.store).await.unwrap(), 0);
        crate::service::testing::device(&state, "dev-1", "gw").await;
        // Stored behind this replica's back, as another's enrollment: the
        // last count answers until it is counted again.
        assert_eq!(size.get(&state.store).await.unwrap(), 0);
        size.changed();
        assert_eq!(size.get(&state.store).await.unwrap(), 1);
        crate::service::testing::device(&state, "dev-2", "gw").await;
        // A second later: the old count answers, a new one is taken behind it.
        size.last.lock().unwrap().as_mut().unwrap().at -= FLEET_COUNT_FRESH;
        assert_eq!(size.get(&state.store).await.unwrap(), 1);
        let counted = async {
            while size.get(&state.store).await.unwrap() != 2 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), counted)
            .await
            .expect("the background count reaches the answers");
    }
}
