//! Runs the rollout engine against the database: every tick, each active
//! rollout's state and devices are loaded, [`engine::step`] decides, and
//! the decision is stored in one transaction that checks the rollout's
//! revision, so two actors (a tick and a rollout being started, or two
//! server replicas sharing the database) never both apply a step: the
//! second finds the revision moved, reloads and decides again. Only after
//! the store has the offers are they pushed to the devices' sessions.

use crate::rollout::engine::{self, Live, Member, Rollout};
use crate::rollout::window::Window;
use crate::service::rollouts::{classify, Outcome as Standing};
use crate::state::AppState;
use crate::store::{DeviceRecord, DeviceTarget, RolloutChange, StoreError};
use std::sync::Arc;
use std::time::Duration;
use time::OffsetDateTime;
use tokio::sync::watch;
use uplift_proto::DeviceId;

/// How often the scheduler looks at every active rollout.
pub const TICK: Duration = Duration::from_secs(1);

/// Tries before giving up a step that keeps losing to another actor.
const ATTEMPTS: usize = 4;

/// Takes rollout `id` one engine step forward at `now`, if anything is due.
pub async fn advance(state: &AppState, id: i64, now: OffsetDateTime) -> Result<(), StoreError> {
    for _ in 0..ATTEMPTS {
        let Some(plan) = state.store.rollout_plan(id).await? else {
            return Ok(());
        };
        if plan.state.is_terminal() {
            return Ok(());
        }
        let Some(rollout) = state.store.rollout(id).await? else {
            return Ok(());
        };
        let members = members(state, id, &rollout.release).await?;
        let window_open = match &plan.policy.window {
            None => true,
            Some(spec) => match Window::parse(spec) {
                Ok(window) => window.is_open(now),
                Err(e) => {
                    // Checked when the rollout was made; a stored one that no
                    // longer parses (a time zone dropped from the database)
                    // must not open the fleet to downloads at any hour.
                    tracing::warn!(rollout = id, "{e}; treating the window as closed");
                    false
                }
            },
        };
        let step = engine::step(
            Rollout {
                policy: &plan.policy,
                state: &plan.state,
                window_open,
            },
            &members,
            now,
        );
        if step == engine::Step::default() {
            return Ok(());
        }
        let now_text = format_time(now);
        let change = RolloutChange {
            state: step.state.as_ref(),
            offer: &step.offer,
            settle: &step.settle,
            accept_failures: &[],
            withdraw: &[],
            hold: &step.hold,
            now: &now_text,
        };
        if !state
            .store
            .apply_rollout_change(id, plan.revision, &change)
            .await?
        {
            continue;
        }
        for event in &step.events {
            tracing::info!(rollout = id, event = ?event, "rollout");
            state.events.publish(
                uplift_proto::events::EventAbout::Rollout {
                    rollout_id: id,
                    event: published(event),
                },
                &now_text,
            );
        }
        if !step.hold.is_empty() {
            tracing::info!(
                rollout = id,
                held = step.hold.len(),
                "offers not started taken back until the rollout resumes"
            );
            take_back(state, &step.hold, id, &now_text);
        }
        if !step.offer.is_empty() {
            // Stored first: a server killed here finds the targets in the
            // database at its next start and offers them then.
            state.live.set_targets(
                &step.offer,
                &DeviceTarget {
                    rollout_id: id,
                    version: rollout.release.clone(),
                    allow_downgrade: rollout.allow_downgrade,
                    limits: rollout.limits,
                },
                &now_text,
            );
            let pushed = step
                .offer
                .iter()
                .filter(|d| state.hub.notify_target_changed(d))
                .count();
            tracing::info!(
                rollout = id,
                offered = step.offer.len(),
                pushed,
                "rollout offers"
            );
        }
        return Ok(());
    }
    tracing::warn!(
        rollout = id,
        "another actor kept changing the rollout; trying again next tick"
    );
    Ok(())
}

/// An engine event as integrators read it.
fn published(event: &engine::Event) -> uplift_proto::events::RolloutEvent {
    use uplift_proto::events::RolloutEvent;
    match event {
        engine::Event::PhaseStarted { phase } => RolloutEvent::PhaseStarted { phase: *phase },
        engine::Event::AwaitingApproval { phase } => {
            RolloutEvent::AwaitingApproval { phase: *phase }
        }
        engine::Event::Paused { reason } => RolloutEvent::Paused {
            reason: crate::service::rollouts::pause_sentence(reason),
        },
        engine::Event::Finished => RolloutEvent::Finished,
    }
}

/// The lease a scheduler holds while it drives rollouts: with several
/// server replicas on one database, one acts at a time.
pub const LEASE: &str = "rollout-scheduler";

/// Renewed every tick; a replica that stops renewing (killed, cut off from
/// the database) loses the lease this long after its last renewal.
pub const LEASE_TTL: Duration = Duration::from_secs(10);

fn unix_ms(t: OffsetDateTime) -> i64 {
    (t.unix_timestamp_nanos() / 1_000_000) as i64
}

/// One tick as replica `holder`: if it holds (or takes) the lease, every
/// active rollout is advanced. Whether this replica acted.
pub async fn tick(state: &AppState, holder: &str, now: OffsetDateTime) -> Result<bool, StoreError> {
    let ttl = LEASE_TTL.as_millis() as i64;
    if !state
        .store
        .try_lease(LEASE, holder, unix_ms(now), ttl)
        .await?
    {
        return Ok(false);
    }
    for id in state.store.active_rollouts().await? {
        if let Err(e) = advance(state, id, now).await {
            tracing::warn!(rollout = id, "rollout scheduler: {e}");
        }
    }
    Ok(true)
}

/// Advances every active rollout each [`TICK`] until shutdown, while this
/// replica holds the scheduler lease; gives the lease up on the way out.
pub async fn run(state: Arc<AppState>, mut shutdown: watch::Receiver<bool>) {
    let holder = format!("pid{}-{:016x}", std::process::id(), rand::random::<u64>());
    let mut ticks = tokio::time::interval(TICK);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut leading = None;
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = shutdown.changed() => break,
        }
        if *shutdown.borrow() {
            break;
        }
        match tick(&state, &holder, OffsetDateTime::now_utc()).await {
            Ok(acted) if leading != Some(acted) => {
                if acted {
                    tracing::info!(
                        holder,
                        "rollout scheduler: this replica holds the lease and drives rollouts"
                    );
                } else {
                    tracing::info!(
                        holder,
                        "rollout scheduler: another replica holds the lease; standing by"
                    );
                }
                leading = Some(acted);
            }
            Ok(_) => {}
            Err(e) => tracing::warn!("rollout scheduler: {e}"),
        }
    }
    if let Err(e) = state.store.release_lease(LEASE, &holder).await {
        tracing::warn!("rollout scheduler: {e}; another replica takes over when the lease expires");
    }
}

/// Rollout `id`'s devices with their phase, offer and outcome, and what
/// each reports now (the live view laid over the database).
pub(crate) async fn members(
    state: &AppState,
    id: i64,
    release: &uplift_proto::Version,
) -> Result<Vec<Member>, StoreError> {
    let rows = state.store.rollout_members(id).await?;
    let (records, mut devices): (Vec<_>, Vec<DeviceRecord>) = rows.into_iter().unzip();
    state.live.overlay(&mut devices);
    Ok(records
        .into_iter()
        .zip(&devices)
        .map(|(record, device)| Member {
            device: device.id.clone(),
            phase: record.phase,
            offered_at: record.offered_at.as_deref().and_then(parse_time),
            outcome: record.outcome,
            failure_accepted: record.failure_accepted,
            live: live_of(release, id, device),
        })
        .collect())
}

/// Takes rollout `id`'s offer back from `devices` (stored already): their
/// sessions send `no_update`, so an agent downloading stops and one waiting
/// for a download turn leaves the line, and each stays on the OS it runs;
/// their histories record the withdrawal at `now`.
pub(crate) fn take_back(state: &AppState, devices: &[DeviceId], id: i64, now: &str) {
    state.live.withdraw_targets(devices, id, now);
    for device in devices {
        state.hub.notify_target_changed(device);
    }
}

/// What a device reports about rollout `id`'s release.
fn live_of(release: &uplift_proto::Version, id: i64, device: &DeviceRecord) -> Live {
    match classify(release, id, device) {
        None | Some(Standing::Pending) => Live::Idle,
        Some(Standing::InProgress) => Live::Working,
        Some(Standing::Succeeded) => Live::OnRelease,
        Some(Standing::Failed) => Live::Failed {
            error: device.last_error.as_ref().map(|e| e.to_string()),
        },
    }
}

pub(crate) fn format_time(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

pub(crate) fn parse_time(text: &str) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::testing;

    #[tokio::test]
    async fn two_replicas_on_one_database_take_turns_only_through_the_lease() {
        let dir = tempfile::tempdir().unwrap();
        let one = testing::state(dir.path()).await;
        let two = testing::state(dir.path()).await;
        let start = OffsetDateTime::now_utc();
        assert!(tick(&one, "one", start).await.unwrap());
        assert!(!tick(&two, "two", start).await.unwrap());
        // One keeps renewing: two stays idle however long it asks.
        let later = start + LEASE_TTL;
        assert!(tick(&one, "one", later).await.unwrap());
        assert!(!tick(&two, "two", later).await.unwrap());
        // One is killed (stops renewing): two takes over once it expires.
        let after_expiry = later + LEASE_TTL;
        assert!(tick(&two, "two", after_expiry).await.unwrap());
        assert!(!tick(&one, "one", after_expiry).await.unwrap());
    }
}
