//! Runs the rollout engine against the database: every tick, each active
//! rollout's state and devices are loaded, [`engine::step`] decides, and
//! the decision is stored in one transaction that checks the rollout's
//! revision, so two actors (a tick and a rollout being started, or two
//! server replicas sharing the database) never both apply a step: the
//! second finds the revision moved, reloads and decides again. Only after
//! the store has the offers are they pushed to the devices' sessions.
//!
//! A rollout whose window applies to the reboot also gets its reboot gate
//! here, every tick: [`engine::reboots`] says whether its devices holding
//! the release verified may reboot now, and the devices whose offer must
//! change (hold to go, or back) are sent it. The gate is not stored: it
//! follows from the policy, the state and the time, and a restarted server
//! holds every reboot until its first tick decides.
//!
//! A tick does not read every member of every rollout: the replica that
//! drives rollouts keeps them in a [`MemberCache`] and reads only the
//! members whose row or whose device's standing changed since its last
//! read (each change is stamped by the database's clock). Any change to the
//! rollout by another actor (an operator's command on any replica) moves
//! its revision, and the members are read whole again; so they are every
//! [`FULL_READ_EVERY`], in case a clock stepped back.

use crate::rollout::engine::{self, Live, Member, Reboots, Rollout, WindowNow};
use crate::rollout::window::{Window, WindowError};
use crate::service::rollouts::{classify, Outcome as Standing};
use crate::signals::Signal;
use crate::state::AppState;
use crate::store::{
    DeviceStanding, DeviceTarget, MemberRecord, RolloutChange, RolloutPlan, RolloutRecord,
    StoreError, Timestamp, CHANGE_OVERLAP,
};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use time::OffsetDateTime;
use tokio::sync::watch;
use uplift_proto::channel::AgentState;
use uplift_proto::policy::WindowSpec;
use uplift_proto::DeviceId;

/// How often the scheduler looks at every active rollout.
pub const TICK: Duration = Duration::from_secs(1);

/// Tries before giving up a step that keeps losing to another actor.
const ATTEMPTS: usize = 4;

/// Takes rollout `id` one engine step forward at `now`, if anything is due.
pub async fn advance(state: &AppState, id: i64, now: OffsetDateTime) -> Result<(), StoreError> {
    // A cache of its own: nothing held, so the members are read whole.
    MemberCache::default().advance(state, id, now).await
}

/// The first step of a rollout about to be created with `planned`
/// (device, phase) members, decided before it is stored so that the store
/// holds the rollout, its members and its first offers after one short
/// transaction: none is offered or settled yet, so what the devices
/// report does not count. Pure.
pub fn first_step(
    policy: &uplift_proto::policy::RolloutPolicy,
    start: &engine::RolloutState,
    planned: &[(DeviceId, u32)],
    now: OffsetDateTime,
) -> engine::Step {
    let members: Vec<Member> = planned
        .iter()
        .map(|(device, phase)| Member {
            device: device.clone(),
            phase: *phase,
            offered_at: None,
            outcome: None,
            failure_accepted: false,
            live: Live::Idle,
        })
        .collect();
    let step = engine::step(
        Rollout {
            policy,
            state: start,
            window: window_of(policy, now, 0),
        },
        &members,
        now,
    );
    debug_assert!(
        step.settle.is_empty() && step.hold.is_empty(),
        "nothing offered yet: nothing settles and no offer is taken back"
    );
    step
}

/// What a new rollout's first step (stored with it) does: its events, and
/// its offers told to the sessions here and to the other replicas.
pub async fn announce_first(
    state: &AppState,
    rollout: &RolloutRecord,
    policy: &uplift_proto::policy::RolloutPolicy,
    step: &engine::Step,
    now: OffsetDateTime,
) {
    let reboots = engine::reboots(
        policy,
        step.state
            .as_ref()
            .unwrap_or(&engine::RolloutState::start(now)),
        window_of(policy, now, rollout.id),
    );
    publish_events(state, rollout.id, &step.events, Timestamp::from(now));
    announce(state, rollout, step, reboots, now).await;
}

/// `policy`'s window at `now`; a stored window that no longer parses (a
/// time zone dropped from the database) must not open the fleet to
/// downloads, or reboots, at any hour: closed.
fn window_of(
    policy: &uplift_proto::policy::RolloutPolicy,
    now: OffsetDateTime,
    id: i64,
) -> WindowNow {
    window_now(policy.window.as_ref(), now).unwrap_or_else(|e| {
        tracing::warn!(rollout = id, "{e}; treating the window as closed");
        WindowNow::Closed
    })
}

/// Decides one step of `rollout` on `members` and applies it: the step, or
/// `None` if another actor changed the rollout first (nothing applied).
async fn step_once(
    state: &AppState,
    rollout: &RolloutRecord,
    plan: &RolloutPlan,
    members: &[Member],
    now: OffsetDateTime,
) -> Result<Option<engine::Step>, StoreError> {
    let id = rollout.id;
    let window = window_of(&plan.policy, now, id);
    let step = engine::step(
        Rollout {
            policy: &plan.policy,
            state: &plan.state,
            window,
        },
        members,
        now,
    );
    let reboots = engine::reboots(
        &plan.policy,
        step.state.as_ref().unwrap_or(&plan.state),
        window,
    );
    if step != engine::Step::default() && !apply(state, id, plan.revision, &step, now).await? {
        return Ok(None);
    }
    announce(state, rollout, &step, reboots, now).await;
    Ok(Some(step))
}

/// After the store holds `step`: its offers told to the sessions here and
/// to the other replicas, and the reboot gate.
async fn announce(
    state: &AppState,
    rollout: &RolloutRecord,
    step: &engine::Step,
    reboots: Reboots,
    now: OffsetDateTime,
) {
    let id = rollout.id;
    if !step.offer.is_empty() {
        // Stored first: a server killed here finds the targets in the
        // database at its next start and offers them then.
        let target = DeviceTarget {
            rollout_id: id,
            version: rollout.release.clone(),
            allow_downgrade: rollout.allow_downgrade,
            limits: rollout.limits,
            hold_reboot: reboots == Reboots::Held,
        };
        // The other replicas first: one statement, while telling the
        // sessions here takes longer at scale (0.65 s for 100 000 devices
        // on a loaded machine), and most of a fleet is elsewhere.
        state
            .signals
            .send(Signal::Offered {
                target: target.clone(),
                devices: step.offer.clone(),
            })
            .await;
        // Those with a session here first, told at once: the rest of the
        // fleet's targets and their history take seconds at 100 000
        // devices on a busy machine, and these sessions' offers need not
        // wait for them. The rest are told too, in case they connected
        // meanwhile.
        let (here, elsewhere) = state.hub.split_online(&step.offer);
        let at = Timestamp::from(now);
        state.live.set_targets(&here, &target, at);
        let mut pushed = state.hub.notify_targets_changed(&here);
        state.live.set_targets(&elsewhere, &target, at);
        pushed += state.hub.notify_targets_changed(&elsewhere);
        tracing::info!(
            rollout = id,
            offered = step.offer.len(),
            pushed,
            "rollout offers"
        );
    }
    if reboots != Reboots::Free {
        let hold = reboots == Reboots::Held;
        // Every tick, not only when it changes here: a replica that
        // (re)loaded its targets from the database holds every reboot of
        // the rollout until it hears.
        state
            .signals
            .send(Signal::RebootGate {
                rollout_id: id,
                hold,
            })
            .await;
        let changed = state.live.hold_reboots(id, hold);
        if !changed.is_empty() {
            tracing::info!(
                rollout = id,
                devices = changed.len(),
                "reboots {}",
                if hold { "held" } else { "go" }
            );
        }
        state.hub.notify_targets_changed(&changed);
    }
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

/// Stores one step of rollout `id` if it is still at `revision` (false if
/// another actor moved it first) and takes back the offers it holds.
async fn apply(
    state: &AppState,
    id: i64,
    revision: i64,
    step: &engine::Step,
    now: OffsetDateTime,
) -> Result<bool, StoreError> {
    let change = RolloutChange {
        state: step.state.as_ref(),
        offer: &step.offer,
        settle: &step.settle,
        accept_failures: &[],
        withdraw: &[],
        hold: &step.hold,
        now: Timestamp::from(now),
    };
    if !state
        .store
        .apply_rollout_change(id, revision, &change)
        .await?
    {
        return Ok(false);
    }
    publish_events(state, id, &step.events, Timestamp::from(now));
    if !step.hold.is_empty() {
        tracing::info!(
            rollout = id,
            held = step.hold.len(),
            "offers not started taken back until the rollout resumes or its window opens"
        );
        take_back(state, &step.hold, id, Timestamp::from(now)).await;
    }
    Ok(true)
}

fn publish_events(state: &AppState, id: i64, events: &[engine::Event], now: Timestamp) {
    for event in events {
        tracing::info!(rollout = id, event = ?event, "rollout");
        state.events.publish(
            uplift_proto::events::EventAbout::Rollout {
                rollout_id: id,
                event: published(event),
            },
            now,
        );
    }
}

/// A rollout's window at `now`; pure, the window's own parse and clock-free
/// test of openness.
pub fn window_now(
    spec: Option<&WindowSpec>,
    now: OffsetDateTime,
) -> Result<WindowNow, WindowError> {
    let Some(spec) = spec else {
        return Ok(WindowNow::NoWindow);
    };
    Ok(match Window::parse(spec)?.opened_at(now) {
        Some(since) => WindowNow::Open { since },
        None => WindowNow::Closed,
    })
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
pub async fn tick(
    state: &AppState,
    holder: &str,
    cache: &mut MemberCache,
    now: OffsetDateTime,
) -> Result<bool, StoreError> {
    let ttl = LEASE_TTL.as_millis() as i64;
    if !state
        .store
        .try_lease(LEASE, holder, unix_ms(now), ttl)
        .await?
    {
        // Another replica drives rollouts: what this one read goes stale.
        cache.rollouts.clear();
        return Ok(false);
    }
    let stale = Timestamp::from(now - PENDING_GRACE);
    for id in state.store.rollouts_with_pending_members(stale).await? {
        let written = match state.store.rollout(id).await? {
            Some(rollout) => store_pending_members(state, &rollout, now).await,
            None => Ok(()),
        };
        if let Err(e) = written {
            tracing::warn!(rollout = id, "rollout scheduler: {e}");
        }
    }
    let active = state.store.active_rollouts().await?;
    cache.rollouts.retain(|id, _| active.contains(id));
    for id in active {
        if let Err(e) = cache.advance(state, id, now).await {
            cache.rollouts.remove(&id);
            tracing::warn!(rollout = id, "rollout scheduler: {e}");
        }
    }
    Ok(true)
}

/// How long a new rollout's members may stay pending before the driving
/// replica writes them itself: its starter writes them once its first
/// offers are sent (seconds at 100 000 devices), unless it was killed
/// between.
pub const PENDING_GRACE: Duration = Duration::from_secs(30);

/// Writes `rollout`'s members if they are still pending
/// [`PENDING_GRACE`] after its start (its starter did not, killed after
/// storing it) and pushes the first offers they hold,
/// which the starter may not have pushed: to a device it did tell, the
/// same offer again, which changes nothing.
pub async fn store_pending_members(
    state: &AppState,
    rollout: &RolloutRecord,
    now: OffsetDateTime,
) -> Result<(), StoreError> {
    let Some(offer) = state.store.store_rollout_members(rollout.id).await? else {
        return Ok(());
    };
    tracing::warn!(
        rollout = rollout.id,
        offered = offer.len(),
        "a rollout's members were still pending (its start was cut short): written, first offers pushed"
    );
    let Some(plan) = state.store.rollout_plan(rollout.id).await? else {
        return Ok(());
    };
    let step = engine::Step {
        offer,
        ..engine::Step::default()
    };
    let reboots = engine::reboots(
        &plan.policy,
        &plan.state,
        window_of(&plan.policy, now, rollout.id),
    );
    announce(state, rollout, &step, reboots, now).await;
    Ok(())
}

/// Advances every active rollout each [`TICK`] until shutdown, while this
/// replica holds the scheduler lease; gives the lease up on the way out.
pub async fn run(state: Arc<AppState>, mut shutdown: watch::Receiver<bool>) {
    let holder = format!("pid{}-{:016x}", std::process::id(), rand::random::<u64>());
    let mut ticks = tokio::time::interval(TICK);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut leading = None;
    let mut cache = MemberCache::default();
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = shutdown.changed() => break,
        }
        if *shutdown.borrow() {
            break;
        }
        match tick(&state, &holder, &mut cache, OffsetDateTime::now_utc()).await {
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
    let (records, mut devices): (Vec<_>, Vec<DeviceStanding>) = rows.into_iter().unzip();
    state.live.overlay_standings(&mut devices);
    Ok(records
        .iter()
        .zip(&devices)
        .map(|(record, device)| member_of(release, id, record, device))
        .collect())
}

/// A member as the engine sees it: its part in rollout `id` and what its
/// device reports.
fn member_of(
    release: &uplift_proto::Version,
    id: i64,
    record: &MemberRecord,
    device: &DeviceStanding,
) -> Member {
    Member {
        device: device.id.clone(),
        phase: record.phase,
        offered_at: record.offered_at.map(Timestamp::instant),
        outcome: record.outcome,
        failure_accepted: record.failure_accepted,
        live: live_of(release, id, device),
    }
}

/// Members are read whole at least this often, even when nothing says
/// they changed: a stepped clock cannot hide a change for longer.
pub const FULL_READ_EVERY: Duration = Duration::from_secs(120);

/// The members of the active rollouts as the replica that drives them last
/// read them, kept from tick to tick so that a tick reads only what
/// changed: at 100 000 members a whole read took about 1.2 s, every second.
#[derive(Debug)]
pub struct MemberCache {
    rollouts: HashMap<i64, Cached>,
    /// How far before the last read's mark the next read starts.
    overlap: Duration,
}

impl Default for MemberCache {
    fn default() -> Self {
        Self::with_overlap(CHANGE_OVERLAP)
    }
}

#[derive(Debug)]
struct Cached {
    rollout: RolloutRecord,
    /// The rollout's revision the members are as of.
    revision: i64,
    members: Vec<Member>,
    standings: Vec<DeviceStanding>,
    index: HashMap<DeviceId, usize>,
    /// The store's clock before the last read: the next read of changes
    /// starts here, less [`CHANGE_OVERLAP`].
    read_from: Timestamp,
    read_whole_at: OffsetDateTime,
    /// Rows the last read brought: every member, or only those changed.
    rows_read: usize,
}

impl MemberCache {
    /// A cache whose reads of changes start `overlap` before the last
    /// read's mark ([`CHANGE_OVERLAP`] but in tests).
    pub fn with_overlap(overlap: Duration) -> Self {
        Self {
            rollouts: HashMap::new(),
            overlap,
        }
    }

    /// [`advance`], on the members this cache holds brought up to date.
    async fn advance(
        &mut self,
        state: &AppState,
        id: i64,
        now: OffsetDateTime,
    ) -> Result<(), StoreError> {
        for _ in 0..ATTEMPTS {
            let Some(plan) = state.store.rollout_plan(id).await? else {
                self.rollouts.remove(&id);
                return Ok(());
            };
            if plan.state.is_terminal() {
                self.rollouts.remove(&id);
                return Ok(());
            }
            if plan.members_pending {
                // Nothing to decide on yet: its starter is writing them.
                return Ok(());
            }
            let Some(cached) = self.refresh(state, id, &plan, now).await? else {
                return Ok(());
            };
            match step_once(state, &cached.rollout, &plan, &cached.members, now).await? {
                Some(step) => {
                    cached.mirror(&step, plan.revision, now);
                    return Ok(());
                }
                // Another actor moved the rollout: read it whole again.
                None => {
                    self.rollouts.remove(&id);
                }
            }
        }
        tracing::warn!(
            rollout = id,
            "another actor kept changing the rollout; trying again next tick"
        );
        Ok(())
    }

    /// Rollout `id`'s members brought up to `plan`: the changes since the
    /// last read, or all of them when the rollout moved under another
    /// actor, is new here, or was last read whole [`FULL_READ_EVERY`] ago.
    async fn refresh(
        &mut self,
        state: &AppState,
        id: i64,
        plan: &RolloutPlan,
        now: OffsetDateTime,
    ) -> Result<Option<&mut Cached>, StoreError> {
        let mark = state.store.change_mark().await?;
        let current = self.rollouts.get(&id).is_some_and(|c| {
            c.revision == plan.revision && now - c.read_whole_at < FULL_READ_EVERY
        });
        if !current {
            let Some(rollout) = state.store.rollout(id).await? else {
                self.rollouts.remove(&id);
                return Ok(None);
            };
            let rows = state.store.rollout_members(id).await?;
            let mut cached = Cached {
                rollout,
                revision: plan.revision,
                members: Vec::with_capacity(rows.len()),
                standings: Vec::with_capacity(rows.len()),
                index: HashMap::with_capacity(rows.len()),
                read_from: mark,
                read_whole_at: now,
                rows_read: rows.len(),
            };
            cached.merge(state, rows);
            self.rollouts.insert(id, cached);
            return Ok(self.rollouts.get_mut(&id));
        }
        let Some(cached) = self.rollouts.get_mut(&id) else {
            return Ok(None);
        };
        let since = cached.read_from - self.overlap;
        let rows = state.store.rollout_member_changes(id, since).await?;
        cached.rows_read = rows.len();
        cached.merge(state, rows);
        cached.read_from = mark;
        Ok(Some(cached))
    }
}

impl Cached {
    /// Lays `rows` (read from the store) over the members held, adding
    /// those not held yet (a dynamic rollout's newcomers).
    fn merge(&mut self, state: &AppState, rows: Vec<(MemberRecord, DeviceStanding)>) {
        let (records, mut standings): (Vec<_>, Vec<_>) = rows.into_iter().unzip();
        state.live.overlay_standings(&mut standings);
        let (release, id) = (&self.rollout.release, self.rollout.id);
        for (record, standing) in records.iter().zip(standings) {
            let member = member_of(release, id, record, &standing);
            match self.index.get(&standing.id) {
                Some(&at) => {
                    self.members[at] = member;
                    self.standings[at] = standing;
                }
                None => {
                    self.index.insert(standing.id.clone(), self.members.len());
                    self.members.push(member);
                    self.standings.push(standing);
                }
            }
        }
    }

    /// What storing `step` (applied on revision `revision`) did to the
    /// members, as the store does it, so the next tick need not read it.
    fn mirror(&mut self, step: &engine::Step, revision: i64, now: OffsetDateTime) {
        self.revision = if *step == engine::Step::default() {
            revision
        } else {
            revision + 1
        };
        let id = self.rollout.id;
        for device in &step.offer {
            self.change(device, |member, standing| {
                member.offered_at.get_or_insert(now);
                standing.target_rollout = Some(id);
            });
        }
        for (device, outcome, _) in &step.settle {
            self.change(device, |member, _| {
                member.outcome.get_or_insert(*outcome);
            });
        }
        for device in &step.hold {
            self.change(device, |member, standing| {
                if member.outcome.is_none() {
                    member.offered_at = None;
                }
                if standing.target_rollout == Some(id) {
                    standing.target_rollout = None;
                }
            });
        }
    }

    fn change(&mut self, device: &DeviceId, what: impl FnOnce(&mut Member, &mut DeviceStanding)) {
        let Some(&at) = self.index.get(device) else {
            return;
        };
        let (member, standing) = (&mut self.members[at], &mut self.standings[at]);
        what(member, standing);
        member.live = live_of(&self.rollout.release, self.rollout.id, standing);
    }
}

/// Takes rollout `id`'s offer back from `devices` (stored already): their
/// sessions send `no_update`, so an agent downloading stops and one waiting
/// for a download turn leaves the line, and each stays on the OS it runs;
/// their histories record the withdrawal at `now`.
pub(crate) async fn take_back(state: &AppState, devices: &[DeviceId], id: i64, now: Timestamp) {
    state.live.withdraw_targets(devices, id, now);
    state.hub.notify_targets_changed(devices);
    state
        .signals
        .send(Signal::TakenBack {
            rollout_id: id,
            devices: devices.to_vec(),
        })
        .await;
}

/// What a device reports about rollout `id`'s release.
fn live_of(release: &uplift_proto::Version, id: i64, device: &DeviceStanding) -> Live {
    match classify(release, id, device) {
        None | Some(Standing::Pending) => Live::Idle,
        // Past the download: its reboot may wait for a reboot window.
        Some(Standing::InProgress)
            if matches!(
                device.state,
                Some(AgentState::AwaitingReboot | AgentState::RebootPending | AgentState::Testing)
            ) =>
        {
            Live::Installed
        }
        Some(Standing::InProgress) => Live::Working,
        Some(Standing::Succeeded) => Live::OnRelease,
        Some(Standing::Failed) => Live::Failed {
            error: device.last_error.as_ref().map(|e| e.to_string()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::engine::{Outcome, RolloutState};
    use crate::service::testing;
    use time::macros::datetime;
    use uplift_proto::policy::{RolloutPolicy, WindowScope};

    fn reboot_window(cron: &str, minutes: u32, time_zone: &str) -> RolloutPolicy {
        RolloutPolicy {
            window: Some(WindowSpec {
                cron: cron.into(),
                duration_minutes: minutes,
                time_zone: time_zone.into(),
                applies_to: WindowScope::Reboot,
            }),
            ..RolloutPolicy::default()
        }
    }

    /// The go the scheduler gives a running rollout at `now`.
    fn go_at(policy: &RolloutPolicy, now: OffsetDateTime) -> Reboots {
        let window = window_now(policy.window.as_ref(), now).unwrap();
        engine::reboots(policy, &RolloutState::start(now), window)
    }

    #[test]
    fn reboots_go_only_inside_a_reboot_window_in_its_time_zone_across_daylight_saving_time() {
        // 02:00-03:00 in Berlin: 01:00 UTC in winter, 00:00 UTC in summer.
        let policy = reboot_window("0 2 * * *", 60, "Europe/Berlin");
        let go = |since| Reboots::Go { since };
        for (now, expected, why) in [
            (
                datetime!(2026-03-28 01:30 UTC),
                go(datetime!(2026-03-28 01:00 UTC)),
                "winter: 02:30 CET",
            ),
            (datetime!(2026-03-28 02:30 UTC), Reboots::Held, "03:30 CET"),
            (
                datetime!(2026-03-30 00:30 UTC),
                go(datetime!(2026-03-30 00:00 UTC)),
                "summer: 02:30 CEST",
            ),
            (
                datetime!(2026-03-30 01:30 UTC),
                Reboots::Held,
                "03:30 CEST, where winter's window was",
            ),
            // Fall back on 2026-10-25 repeats 02:00-03:00; the window lasts
            // 60 minutes of real time from its first 02:00 (CEST).
            (
                datetime!(2026-10-25 00:30 UTC),
                go(datetime!(2026-10-25 00:00 UTC)),
                "02:30 CEST",
            ),
            (
                datetime!(2026-10-25 01:30 UTC),
                Reboots::Held,
                "02:30 CET, the hour again: the window has had its hour",
            ),
        ] {
            assert_eq!(go_at(&policy, now), expected, "{why}");
        }
        // Spring forward on the 29th skips 02:00-03:00: the opening moves
        // to the first instant after the gap, and the window still opens.
        let Reboots::Go { since } = go_at(&policy, datetime!(2026-03-29 01:10 UTC)) else {
            panic!("the window opens on the day whose 02:00 does not exist")
        };
        assert_eq!(since.date(), time::macros::date!(2026 - 03 - 29));
        // A window that governs downloads never holds a reboot.
        let mut downloads = policy.clone();
        downloads.window.as_mut().unwrap().applies_to = WindowScope::Downloads;
        assert_eq!(
            go_at(&downloads, datetime!(2026-03-28 02:30 UTC)),
            Reboots::Free
        );
    }

    #[tokio::test]
    async fn a_download_window_that_closes_takes_back_offers_not_started_and_offers_them_again() {
        let dir = tempfile::tempdir().unwrap();
        let state = testing::state(dir.path()).await;
        testing::release(&state, "2", "gw").await;
        let device = testing::device(&state, "dev-1", "gw").await;
        let mut policy = reboot_window("0 2 * * *", 60, "UTC");
        policy.window.as_mut().unwrap().applies_to = WindowScope::Downloads;
        let id = testing::start_rollout(&state, testing::rollout_request("2", None, policy)).await;
        let targeted = |state: &AppState| state.live.target(&device).map(|t| t.rollout_id);
        advance(&state, id, datetime!(2026-12-04 02:10 UTC))
            .await
            .unwrap();
        assert_eq!(targeted(&state), Some(id), "offered inside the window");
        // The device never started (say, it waits for a download turn).
        advance(&state, id, datetime!(2026-12-04 03:10 UTC))
            .await
            .unwrap();
        assert_eq!(targeted(&state), None, "taken back when the window closed");
        let stored = state.store.device(&device).await.unwrap().unwrap();
        assert_eq!(stored.target_rollout, None, "in the database too");
        advance(&state, id, datetime!(2026-12-05 02:00 UTC))
            .await
            .unwrap();
        assert_eq!(targeted(&state), Some(id), "offered again when it opens");
    }

    #[tokio::test]
    async fn a_reboot_window_rollout_offers_at_once_holds_reboots_and_says_go_when_it_opens() {
        let dir = tempfile::tempdir().unwrap();
        let id = {
            let state = testing::state(dir.path()).await;
            testing::release(&state, "2", "gw").await;
            let devices = [
                testing::device(&state, "dev-1", "gw").await,
                testing::device(&state, "dev-2", "gw").await,
            ];
            let request =
                testing::rollout_request("2", None, reboot_window("0 2 * * *", 60, "UTC"));
            let id = testing::start_rollout(&state, request).await;
            let hold = |state: &AppState| {
                devices
                    .iter()
                    .map(|d| state.live.target(d).map(|t| t.hold_reboot))
                    .collect::<Vec<_>>()
            };
            advance(&state, id, datetime!(2026-12-04 12:00 UTC))
                .await
                .unwrap();
            assert_eq!(
                hold(&state),
                vec![Some(true); 2],
                "offered at once, the reboot held while the window is closed"
            );
            advance(&state, id, datetime!(2026-12-05 02:10 UTC))
                .await
                .unwrap();
            assert_eq!(hold(&state), vec![Some(false); 2], "the window is open: go");
            id
        };
        // A restarted server holds every reboot of the rollout until its
        // first tick decides.
        let state = testing::state(dir.path()).await;
        let targets = state.store.device_targets().await.unwrap();
        assert_eq!(targets.len(), 2);
        assert!(targets
            .iter()
            .all(|(_, t)| t.rollout_id == id && t.hold_reboot));
    }

    /// What a device reports through another replica's writer: this
    /// replica's live view never sees it, only the database.
    async fn reported_elsewhere(state: &AppState, device: &DeviceId, running: &str) {
        use uplift_proto::channel::Report;
        let report = crate::store::ReportedState {
            id: device.clone(),
            report: Some(Report {
                state: AgentState::Idle,
                running_version: running.parse().unwrap(),
                booted_slot: uplift_proto::SlotName::B,
                target_version: Some(running.parse().unwrap()),
                progress: None,
                error: None,
            }),
            last_seen: None,
            address: None,
        };
        state.store.record_reports(&[report]).await.unwrap();
    }

    #[tokio::test]
    async fn a_driving_replica_reads_only_what_changed_and_decides_as_on_a_whole_read() {
        use uplift_proto::policy::Ramp;
        let dir = tempfile::tempdir().unwrap();
        let state = testing::state(dir.path()).await;
        testing::release(&state, "2", "gw").await;
        testing::release(&state, "3", "gw").await;
        let mut devices = Vec::new();
        for name in ["dev-1", "dev-2", "dev-3"] {
            devices.push(testing::device(&state, name, "gw").await);
        }
        // One offer a minute: dev-1 now, the others wait their turn.
        let policy = RolloutPolicy {
            ramp: Some(Ramp {
                base_per_minute: 1.try_into().unwrap(),
                factor_percent: 100,
                step_successes: 1000.try_into().unwrap(),
            }),
            ..RolloutPolicy::default()
        };
        let older =
            testing::start_rollout(&state, testing::rollout_request("2", None, policy)).await;
        let started = OffsetDateTime::now_utc();
        let rollout_of =
            |state: &AppState, d: &DeviceId| state.live.target(d).map(|t| t.rollout_id);
        // The first in the ramp's order is offered, the others wait.
        let (offered, waiting): (Vec<DeviceId>, Vec<DeviceId>) = devices
            .iter()
            .cloned()
            .partition(|d| rollout_of(&state, d) == Some(older));
        let ([first], [taken_over, next]) = (&offered[..], &waiting[..]) else {
            panic!("one device offered at the start, not {offered:?}");
        };
        // Without the overlap a production cache re-reads (changes of the
        // last 10 s), what it reads is exactly what changed.
        let mut cache = MemberCache::with_overlap(Duration::ZERO);
        // SQLite's clock counts milliseconds and a read takes what changed
        // at or after its mark: a mark in the very millisecond the rollout
        // was stored would read its members again.
        tokio::time::sleep(Duration::from_millis(3)).await;
        cache.advance(&state, older, started).await.unwrap();
        assert_eq!(
            cache.rollouts[&older].rows_read, 3,
            "the first read is whole"
        );

        // The first finishes (on another replica); a newer rollout takes
        // one of the others over before its turn came.
        reported_elsewhere(&state, first, "2").await;
        let newer = testing::start_rollout(
            &state,
            testing::rollout_request(
                "3",
                Some(vec![taken_over.clone()]),
                RolloutPolicy::default(),
            ),
        )
        .await;
        assert_eq!(rollout_of(&state, taken_over), Some(newer));
        let minute_later = started + time::Duration::seconds(61);
        cache.advance(&state, older, minute_later).await.unwrap();
        let cached = &cache.rollouts[&older];
        assert_eq!(
            cached.rows_read, 2,
            "only the finished and the taken-over changed"
        );
        let stored = state.store.rollout_members(older).await.unwrap();
        let outcome = |d: &DeviceId| {
            stored
                .iter()
                .find(|(_, s)| &s.id == d)
                .map(|(m, _)| m.outcome)
                .unwrap()
        };
        assert_eq!(outcome(first), Some(Outcome::Succeeded));
        assert_eq!(outcome(taken_over), Some(Outcome::Superseded));
        assert_eq!(outcome(next), None);
        assert_eq!(
            rollout_of(&state, taken_over),
            Some(newer),
            "the older rollout does not take a device back from the newer one"
        );
        assert_eq!(rollout_of(&state, next), Some(older), "the next one's turn");
        // What the cache holds is what a whole read finds.
        let whole = members(&state, older, &"2".parse().unwrap()).await.unwrap();
        let mut held = cached.members.clone();
        held.sort_by(|a, b| a.device.as_str().cmp(b.device.as_str()));
        let settle = |m: &Member| {
            (
                m.device.clone(),
                m.outcome,
                m.offered_at.is_some(),
                m.live.clone(),
            )
        };
        assert_eq!(
            held.iter().map(settle).collect::<Vec<_>>(),
            whole.iter().map(settle).collect::<Vec<_>>()
        );
        assert_eq!(
            cached.revision,
            state
                .store
                .rollout_plan(older)
                .await
                .unwrap()
                .unwrap()
                .revision
        );

        // An operator's command (on any replica) moves the revision: the
        // next tick reads the rollout whole.
        crate::service::rollouts::command(
            &state,
            older,
            uplift_proto::api::RolloutCommandName::Pause,
            &crate::auth::Principal::bootstrap_admin(),
        )
        .await
        .unwrap();
        cache.advance(&state, older, minute_later).await.unwrap();
        assert_eq!(cache.rollouts[&older].rows_read, 3);
    }

    #[tokio::test]
    async fn a_start_cut_short_before_its_members_were_written_is_finished_by_the_driving_replica()
    {
        let dir = tempfile::tempdir().unwrap();
        let state = testing::state(dir.path()).await;
        testing::release(&state, "2", "gw").await;
        let device = testing::device(&state, "dev-1", "gw").await;
        let release = state
            .store
            .release(&"2".parse().unwrap())
            .await
            .unwrap()
            .unwrap();
        // What a starter killed after its first transaction leaves: the
        // rollout stored, its members pending, no offer pushed.
        let created = OffsetDateTime::now_utc();
        let policy = RolloutPolicy::default();
        let start = RolloutState::start(created);
        let members = [(device.clone(), 0)];
        let step = first_step(&policy, &start, &members, created);
        assert_eq!(step.offer, std::slice::from_ref(&device));
        let plan = crate::store::NewPlan {
            policy: &policy,
            state: step.state.as_ref().unwrap_or(&start),
            tags: None,
            from_versions: &[],
            offer: &step.offer,
        };
        let rollout = state
            .store
            .create_rollout(
                &release,
                &members,
                false,
                uplift_proto::api::DownloadLimits::default(),
                &plan,
                Timestamp::from(created),
            )
            .await
            .unwrap();
        let offered = |state: &AppState| state.live.target(&device).map(|t| t.rollout_id);
        let mut cache = MemberCache::default();
        // Within the grace its starter may still be at it: left alone.
        assert!(
            tick(&state, "one", &mut cache, created + Duration::from_secs(1))
                .await
                .unwrap()
        );
        assert_eq!(offered(&state), None);
        assert!(state
            .store
            .rollout_members(rollout.id)
            .await
            .unwrap()
            .is_empty());
        // Past it, the driving replica writes them and pushes the offer.
        let later = created + PENDING_GRACE + Duration::from_secs(1);
        assert!(tick(&state, "one", &mut cache, later).await.unwrap());
        assert_eq!(offered(&state), Some(rollout.id));
        let stored = state.store.rollout_members(rollout.id).await.unwrap();
        assert_eq!(stored.len(), 1);
        assert!(stored[0].0.offered_at.is_some());
        assert_eq!(stored[0].1.target_rollout, Some(rollout.id));
        assert_eq!(
            state.store.active_rollouts().await.unwrap(),
            [rollout.id],
            "stepped from now on"
        );
    }

    #[tokio::test]
    async fn two_replicas_on_one_database_take_turns_only_through_the_lease() {
        let dir = tempfile::tempdir().unwrap();
        let one = testing::state(dir.path()).await;
        let two = testing::state(dir.path()).await;
        let start = OffsetDateTime::now_utc();
        assert!(tick(&one, "one", &mut MemberCache::default(), start)
            .await
            .unwrap());
        assert!(!tick(&two, "two", &mut MemberCache::default(), start)
            .await
            .unwrap());
        // One keeps renewing: two stays idle however long it asks.
        let later = start + LEASE_TTL;
        assert!(tick(&one, "one", &mut MemberCache::default(), later)
            .await
            .unwrap());
        assert!(!tick(&two, "two", &mut MemberCache::default(), later)
            .await
            .unwrap());
        // One is killed (stops renewing): two takes over once it expires.
        let after_expiry = later + LEASE_TTL;
        assert!(tick(&two, "two", &mut MemberCache::default(), after_expiry)
            .await
            .unwrap());
        assert!(
            !tick(&one, "one", &mut MemberCache::default(), after_expiry)
                .await
                .unwrap()
        );
    }
}
