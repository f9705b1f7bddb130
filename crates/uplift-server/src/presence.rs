//! Tells the other replicas which devices this one holds, so each shows the
//! whole fleet's `online` (device lists, the fleet overview, the seen
//! filters), not only its own sessions. The hub records sessions beginning
//! and ending; this task writes them to the database every
//! [`FLUSH_EVERY`], and at least every [`HEARTBEAT`] says the replica is
//! alive. A replica not heard from for [`crate::store::REPLICA_GONE_AFTER`]
//! is dropped by the others with its presence: after a SIGKILL its devices
//! show offline until they reconnect elsewhere. On SQLite (one process)
//! the store writes nothing and the hub alone answers.

use crate::hub::PresenceChange;
use crate::state::AppState;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;
use uplift_proto::DeviceId;

/// How often session changes are written.
pub const FLUSH_EVERY: Duration = Duration::from_millis(250);
/// How often a replica with nothing to write still says it is alive.
pub const HEARTBEAT: Duration = Duration::from_secs(1);

/// What to write next: the changes since the last write, or, when the
/// database has no (or no longer any) record of this replica, every
/// session it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    Changes,
    Afresh,
}

/// What the write after one that returned `outcome` must be. A replica the
/// database did not know has lost its presence (dropped as dead while it
/// stalled), unless this very write put it all back; a failed write of
/// everything is tried again as everything.
fn after_write(wrote: Next, outcome: Result<bool, ()>) -> Next {
    match (wrote, outcome) {
        (Next::Afresh, Ok(_)) => Next::Changes,
        (Next::Changes, Ok(true)) => Next::Afresh,
        (Next::Changes, Ok(false)) => Next::Changes,
        (Next::Afresh, Err(())) => Next::Afresh,
        (Next::Changes, Err(())) => Next::Changes,
    }
}

/// Writes this replica's presence until `stop` flips to true, then drops
/// it, so a replica that shuts down leaves nobody shown online.
pub async fn run(state: Arc<AppState>, mut stop: watch::Receiver<bool>) {
    let replica = state.signals.replica().to_owned();
    let mut tick = tokio::time::interval(FLUSH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut next = Next::Afresh;
    let mut last_write: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => break,
        }
        let changes: Vec<(DeviceId, PresenceChange)> = match next {
            Next::Afresh => state.hub.presence_snapshot(),
            Next::Changes => state.hub.take_presence(),
        };
        let due = last_write.is_none_or(|at| at.elapsed() >= HEARTBEAT);
        if changes.is_empty() && next == Next::Changes && !due {
            continue;
        }
        let written = state
            .store
            .record_presence(&replica, &changes, next == Next::Afresh)
            .await;
        match &written {
            Ok(_) => last_write = Some(Instant::now()),
            Err(e) => {
                tracing::warn!(
                    changes = changes.len(),
                    "cannot tell the other replicas which devices this one holds: {e}; trying again"
                );
                if next == Next::Changes {
                    state.hub.requeue_presence(changes);
                }
            }
        }
        next = after_write(next, written.map_err(|_| ()));
    }
    if let Err(e) = state.store.retire_replica(&replica).await {
        tracing::warn!(
            "cannot drop this replica's presence at shutdown: {e}; the others drop it within {} s",
            crate::store::REPLICA_GONE_AFTER.as_secs()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replica_the_database_forgot_writes_everything_once_then_changes_again() {
        assert_eq!(after_write(Next::Afresh, Ok(true)), Next::Changes);
        assert_eq!(after_write(Next::Changes, Ok(false)), Next::Changes);
        assert_eq!(
            after_write(Next::Changes, Ok(true)),
            Next::Afresh,
            "dropped as dead while it stalled: its presence is gone, write it all"
        );
        assert_eq!(after_write(Next::Afresh, Err(())), Next::Afresh);
        assert_eq!(after_write(Next::Changes, Err(())), Next::Changes);
    }
}
