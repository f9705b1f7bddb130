//! The rollout engine's decisions, pure: given a rollout's stored state,
//! its devices (their phase, whether and when they were offered, what they
//! report) and the time, what happens next — which devices to offer the
//! release, which have finished and how, whether a phase starts, waits for
//! approval, or the rollout pauses by itself. Operator commands (pause,
//! resume, approve, abort) are transitions of the same state. No I/O and
//! no clock: the scheduler passes `now` in and persists what comes out.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uplift_proto::policy::{RolloutPolicy, WindowScope};
use uplift_proto::DeviceId;

/// Where a rollout stands. Stored as it is (JSON) beside the rollout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum RolloutState {
    /// Offering phase `phase` (and finishing the earlier ones).
    Running {
        phase: u32,
        #[serde(with = "time::serde::rfc3339")]
        phase_started_at: OffsetDateTime,
        /// When the phase first held its success level: its soak began.
        #[serde(with = "time::serde::rfc3339::option", default)]
        level_reached_at: Option<OffsetDateTime>,
    },
    /// Phase `phase` is ready to start once an operator approves it.
    AwaitingApproval { phase: u32 },
    /// Nothing new is offered; devices already working finish.
    Paused { phase: u32, reason: PauseReason },
    Aborted {
        #[serde(with = "time::serde::rfc3339")]
        at: OffsetDateTime,
        by: String,
    },
    Finished {
        #[serde(with = "time::serde::rfc3339")]
        at: OffsetDateTime,
    },
}

impl RolloutState {
    /// The state a rollout starts in.
    pub fn start(now: OffsetDateTime) -> Self {
        Self::Running {
            phase: 0,
            phase_started_at: now,
            level_reached_at: None,
        }
    }

    pub fn is_terminal(&self) -> bool {
        matches!(self, Self::Aborted { .. } | Self::Finished { .. })
    }

    /// The stable name the API and the CLI show.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Running { .. } => "running",
            Self::AwaitingApproval { .. } => "awaiting_approval",
            Self::Paused { .. } => "paused",
            Self::Aborted { .. } => "aborted",
            Self::Finished { .. } => "finished",
        }
    }
}

/// Why a rollout paused; shown to the operator as it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cause", rename_all = "snake_case")]
pub enum PauseReason {
    Operator {
        by: String,
        /// It was waiting for approval of `phase`: a resume waits again,
        /// it does not approve.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        awaiting_approval: bool,
    },
    /// Too many of a phase's finished devices failed.
    ErrorThreshold {
        phase: u32,
        failed: u32,
        finished: u32,
        /// The failures that count, with what each reported.
        devices: Vec<FailedDevice>,
    },
    /// Every device of the phase finished, and too few succeeded for the
    /// next phase ever to start; resuming accepts the phase as it is.
    BelowSuccessLevel {
        phase: u32,
        succeeded: u32,
        needed: u32,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailedDevice {
    pub device: DeviceId,
    pub outcome: Outcome,
    pub error: Option<String>,
}

/// How one device's part in a rollout ended. Stored per device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Succeeded,
    /// Failed or rolled back, as the device reported.
    Failed,
    /// Offered, and not finished within the rollout's device timeout.
    TimedOut,
    /// A newer rollout of this device took over.
    Superseded,
    /// The rollout was aborted before the device finished.
    Withdrawn,
}

impl Outcome {
    fn is_failure(self) -> bool {
        matches!(self, Outcome::Failed | Outcome::TimedOut)
    }
}

/// What a device reports about this rollout's release, as the live view
/// knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Live {
    /// Not working on the release (not offered yet, offline, or idle on
    /// another version).
    Idle,
    /// Downloading or verifying it.
    Working,
    /// Wrote and verified it: waiting for the go to reboot into it
    /// (a reboot window), rebooting, or testing it.
    Installed,
    /// Runs the release, committed.
    OnRelease,
    /// Failed or rolled back while on the release.
    Failed { error: Option<String> },
}

/// One device of a rollout, as the scheduler loads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub device: DeviceId,
    pub phase: u32,
    pub offered_at: Option<OffsetDateTime>,
    pub outcome: Option<Outcome>,
    /// An operator resumed past this failure: it no longer counts toward
    /// the error threshold.
    pub failure_accepted: bool,
    pub live: Live,
}

impl Member {
    fn counts_as_failed(&self) -> bool {
        self.outcome.is_some_and(Outcome::is_failure) && !self.failure_accepted
    }
}

/// A rollout as the engine sees it.
#[derive(Debug, Clone, Copy)]
pub struct Rollout<'a> {
    pub policy: &'a RolloutPolicy,
    pub state: &'a RolloutState,
    /// Its maintenance window now. A download window that is closed
    /// offers nothing new and takes back offers not started (work in
    /// progress finishes); a reboot window that is closed holds reboots.
    pub window: WindowNow,
}

/// A rollout's maintenance window at the time the scheduler passed in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowNow {
    /// The rollout has none.
    NoWindow,
    /// Open, since the opening at `since`.
    Open {
        since: OffsetDateTime,
    },
    Closed,
}

impl Rollout<'_> {
    /// Whether new downloads may start: not outside a download window.
    fn downloads_open(&self) -> bool {
        !(self.policy.window_scope() == Some(WindowScope::Downloads)
            && self.window == WindowNow::Closed)
    }
}

/// Whether the devices of a rollout that hold its release written and
/// verified may reboot into it now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reboots {
    /// No reboot window: a device reboots as soon as its slot is written;
    /// offers never hold the reboot.
    Free,
    /// A reboot window that is closed, or a rollout that is not running
    /// (paused: no device boots into the release until it resumes, but
    /// none loses its verified slot either).
    Held,
    /// The reboot window is open, since `since`, and the rollout running.
    Go { since: OffsetDateTime },
}

/// The reboot decision for a rollout in `state` (after its step) with its
/// window as it is now. Pure, so it is tested across daylight saving time
/// with the window's own tests (see `scheduler::window_now`).
pub fn reboots(policy: &RolloutPolicy, state: &RolloutState, window: WindowNow) -> Reboots {
    if policy.window_scope() != Some(WindowScope::Reboot) {
        return Reboots::Free;
    }
    match (state, window) {
        (
            RolloutState::Running { .. } | RolloutState::AwaitingApproval { .. },
            WindowNow::Open { since },
        ) => Reboots::Go { since },
        _ => Reboots::Held,
    }
}

/// What the scheduler must persist and do after one [`step`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Step {
    /// The new state, if it changed.
    pub state: Option<RolloutState>,
    /// Devices to point at the release now.
    pub offer: Vec<DeviceId>,
    /// Devices whose part ended, with how, and the error they reported.
    pub settle: Vec<(DeviceId, Outcome, Option<String>)>,
    /// Offers taken back because the rollout paused or its download
    /// window closed: see [`held`].
    pub hold: Vec<DeviceId>,
    /// What happened, for the audit log and the event stream.
    pub events: Vec<Event>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    PhaseStarted { phase: u32 },
    AwaitingApproval { phase: u32 },
    Paused { reason: PauseReason },
    Finished,
}

/// One scheduler pass over a rollout.
pub fn step(rollout: Rollout<'_>, members: &[Member], now: OffsetDateTime) -> Step {
    let mut out = Step::default();
    if rollout.state.is_terminal() {
        return out;
    }
    let reboots = reboots(rollout.policy, rollout.state, rollout.window);
    let settled = settle(rollout.policy, members, now, reboots);
    // The members as they will be once `settled` is stored. Looked up by
    // device: a search of the settled list for every member was quadratic,
    // billions of comparisons when a 100 000-device phase settles at once.
    let outcomes: std::collections::HashMap<&DeviceId, Outcome> =
        settled.iter().map(|(d, o, _)| (d, *o)).collect();
    let members: Vec<Member> = members
        .iter()
        .map(|m| match outcomes.get(&m.device) {
            Some(outcome) => Member {
                outcome: Some(*outcome),
                ..m.clone()
            },
            None => m.clone(),
        })
        .collect();
    out.settle = settled;
    if !rollout.downloads_open() {
        // Outside a download window no download starts: devices offered
        // that have not started (waiting in line for a download turn,
        // offline) would otherwise start one when their turn comes.
        out.hold = held(&members);
    }

    let RolloutState::Running {
        phase,
        phase_started_at,
        level_reached_at,
    } = *rollout.state
    else {
        return out;
    };
    if let Some(reason) = over_threshold(rollout.policy, &members, phase) {
        out.events.push(Event::Paused {
            reason: reason.clone(),
        });
        out.state = Some(RolloutState::Paused { phase, reason });
        out.hold = held(&members);
        return out;
    }
    let advanced = advance(
        rollout.policy,
        &members,
        phase,
        phase_started_at,
        level_reached_at,
        now,
    );
    // Offers follow the phase as it now stands: a phase that starts in this
    // pass has its first devices offered in it.
    let offering = match &advanced {
        Some(RolloutState::Running { phase, .. }) => Some(*phase),
        Some(RolloutState::AwaitingApproval { .. }) | None => Some(phase),
        Some(_) => None,
    };
    if let (Some(offering), true) = (offering, rollout.downloads_open()) {
        out.offer = offers(rollout.policy, &members, offering, now);
    }
    if let Some(next) = advanced {
        out.events.push(match &next {
            RolloutState::Running { phase: p, .. } if *p != phase => {
                Event::PhaseStarted { phase: *p }
            }
            RolloutState::Running { .. } => {
                // Only the soak's start was recorded.
                out.state = Some(next);
                return out;
            }
            RolloutState::AwaitingApproval { phase } => Event::AwaitingApproval { phase: *phase },
            RolloutState::Paused { reason, .. } => {
                out.hold = held(&members);
                Event::Paused {
                    reason: reason.clone(),
                }
            }
            RolloutState::Aborted { .. } | RolloutState::Finished { .. } => Event::Finished,
        });
        out.state = Some(next);
    }
    out
}

/// Whether the running phase is done: the next phase starts (or waits for
/// approval), the rollout finishes, or it pauses because the phase can no
/// longer reach its success level. `None` when nothing changes.
fn advance(
    policy: &RolloutPolicy,
    members: &[Member],
    phase: u32,
    phase_started_at: OffsetDateTime,
    level_reached_at: Option<OffsetDateTime>,
    now: OffsetDateTime,
) -> Option<RolloutState> {
    let tally = Tally::of(members, phase);
    if phase == policy.phases.len() as u32 {
        // The final phase: done once every device's part has ended.
        return members
            .iter()
            .all(|m| m.outcome.is_some())
            .then_some(RolloutState::Finished { at: now });
    }
    let needed = tally.needed(policy.success_percent());
    if tally.succeeded < needed {
        return (tally.finished() == tally.total).then_some(RolloutState::Paused {
            phase,
            reason: PauseReason::BelowSuccessLevel {
                phase,
                succeeded: tally.succeeded,
                needed,
            },
        });
    }
    let soak = time::Duration::seconds(policy.soak_seconds as i64);
    // An empty phase has nothing to soak.
    if tally.total > 0 && soak > time::Duration::ZERO {
        match level_reached_at {
            None => {
                return Some(RolloutState::Running {
                    phase,
                    phase_started_at,
                    level_reached_at: Some(now),
                })
            }
            Some(reached) if now - reached < soak => return None,
            Some(_) => {}
        }
    }
    let next = phase + 1;
    Some(if policy.approval {
        RolloutState::AwaitingApproval { phase: next }
    } else {
        RolloutState::Running {
            phase: next,
            phase_started_at: now,
            level_reached_at: None,
        }
    })
}

/// Offered devices that have not started on the release (waiting for a
/// download turn, offline, or not yet told): when the rollout pauses, or
/// its download window closes, their offer is taken back, so the release
/// stops spreading, not only new offers; they are offered again when it
/// resumes or the window opens. Devices already working on it finish.
fn held(members: &[Member]) -> Vec<DeviceId> {
    members
        .iter()
        .filter(|m| m.offered_at.is_some() && m.outcome.is_none() && m.live == Live::Idle)
        .map(|m| m.device.clone())
        .collect()
}

/// Offered devices that finished, or ran out of time, since the last pass.
/// A device that holds the release verified waits for its reboot on the
/// rollout's window, not on itself: it does not time out while reboots are
/// held, and once they go its time counts from the window's opening.
fn settle(
    policy: &RolloutPolicy,
    members: &[Member],
    now: OffsetDateTime,
    reboots: Reboots,
) -> Vec<(DeviceId, Outcome, Option<String>)> {
    let timeout = policy
        .device_timeout_seconds
        .map(|s| time::Duration::seconds(s as i64));
    members
        .iter()
        .filter(|m| m.outcome.is_none())
        .filter_map(|m| {
            let offered_at = m.offered_at?;
            match &m.live {
                Live::OnRelease => Some((m.device.clone(), Outcome::Succeeded, None)),
                Live::Failed { error } => Some((m.device.clone(), Outcome::Failed, error.clone())),
                Live::Installed if reboots == Reboots::Held => None,
                Live::Idle | Live::Working | Live::Installed => {
                    let limit = timeout?;
                    let (from, what) = match (&m.live, reboots) {
                        (Live::Installed, Reboots::Go { since }) if since > offered_at => {
                            (since, "of the reboot window's opening")
                        }
                        _ => (offered_at, "of its offer"),
                    };
                    (now - from >= limit).then(|| {
                        (
                            m.device.clone(),
                            Outcome::TimedOut,
                            Some(format!(
                                "did not finish within {} s {what}",
                                limit.whole_seconds()
                            )),
                        )
                    })
                }
            }
        })
        .collect()
}

/// The first started phase whose failures are over the threshold.
fn over_threshold(policy: &RolloutPolicy, members: &[Member], current: u32) -> Option<PauseReason> {
    let threshold = policy.error_threshold;
    (0..=current).find_map(|phase| {
        let in_phase = || members.iter().filter(move |m| m.phase == phase);
        let failed = in_phase().filter(|m| m.counts_as_failed()).count() as u32;
        let finished = in_phase()
            .filter(|m| matches!(m.outcome, Some(Outcome::Succeeded)) || m.counts_as_failed())
            .count() as u32;
        let over = finished >= threshold.min_finished.max(1)
            && u64::from(failed) * 100 > u64::from(threshold.percent) * u64::from(finished);
        over.then(|| PauseReason::ErrorThreshold {
            phase,
            failed,
            finished,
            devices: in_phase()
                .filter(|m| m.counts_as_failed())
                .map(|m| FailedDevice {
                    device: m.device.clone(),
                    outcome: m.outcome.unwrap_or(Outcome::Failed),
                    error: match &m.live {
                        Live::Failed { error } => error.clone(),
                        _ => None,
                    },
                })
                .collect(),
        })
    })
}

/// Devices of started phases not yet offered, within the ramp's rate.
fn offers(
    policy: &RolloutPolicy,
    members: &[Member],
    phase: u32,
    now: OffsetDateTime,
) -> Vec<DeviceId> {
    let waiting = members
        .iter()
        .filter(|m| m.phase <= phase && m.offered_at.is_none() && m.outcome.is_none());
    let Some(ramp) = policy.ramp else {
        return waiting.map(|m| m.device.clone()).collect();
    };
    let minute_ago = now - time::Duration::minutes(1);
    let offered_last_minute = members
        .iter()
        .filter(|m| m.offered_at.is_some_and(|t| t > minute_ago))
        .count() as u64;
    let succeeded = members
        .iter()
        .filter(|m| m.outcome == Some(Outcome::Succeeded))
        .count() as u64;
    let steps = succeeded / u64::from(ramp.step_successes.get());
    let mut rate = u64::from(ramp.base_per_minute.get());
    for _ in 0..steps {
        rate = (rate * u64::from(ramp.factor_percent) / 100).max(rate);
        if rate >= members.len() as u64 {
            break;
        }
    }
    let allowed = rate.saturating_sub(offered_last_minute) as usize;
    waiting.take(allowed).map(|m| m.device.clone()).collect()
}

/// A phase's devices by how their part stands. Superseded devices are no
/// longer this rollout's, so they count nowhere.
#[derive(Debug, Default)]
struct Tally {
    total: u32,
    succeeded: u32,
    /// Failed, timed out or withdrawn.
    ended_otherwise: u32,
}

impl Tally {
    fn of(members: &[Member], phase: u32) -> Self {
        let mut tally = Tally::default();
        for m in members.iter().filter(|m| m.phase == phase) {
            match m.outcome {
                Some(Outcome::Superseded) => continue,
                Some(Outcome::Succeeded) => tally.succeeded += 1,
                Some(Outcome::Failed | Outcome::TimedOut | Outcome::Withdrawn) => {
                    tally.ended_otherwise += 1
                }
                None => {}
            }
            tally.total += 1;
        }
        tally
    }

    fn finished(&self) -> u32 {
        self.succeeded + self.ended_otherwise
    }

    /// Successes the phase needs before the next may start.
    fn needed(&self, success_percent: u8) -> u32 {
        (u64::from(self.total) * u64::from(success_percent)).div_ceil(100) as u32
    }
}

/// What an operator asks of a rollout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Pause,
    Resume,
    Approve,
    Abort,
}

impl Command {
    pub fn name(&self) -> &'static str {
        match self {
            Command::Pause => "pause",
            Command::Resume => "resume",
            Command::Approve => "approve",
            Command::Abort => "abort",
        }
    }
}

/// The result of an operator command the state allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub state: RolloutState,
    /// Failures the operator resumed past, no longer counted.
    pub accept_failures: Vec<DeviceId>,
    /// Devices whose offer is withdrawn (abort): not finished, so told to
    /// stop and stay on the OS they run.
    pub withdraw: Vec<DeviceId>,
    /// Offers taken back until a resume (pause): see [`held`].
    pub hold: Vec<DeviceId>,
}

/// Refused: the command does not apply in this state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot {command} a rollout that is {state}{hint}")]
pub struct TransitionError {
    pub command: &'static str,
    pub state: &'static str,
    pub hint: &'static str,
}

/// Applies an operator command by `by` at `now`.
pub fn command(
    state: &RolloutState,
    members: &[Member],
    command: &Command,
    by: &str,
    now: OffsetDateTime,
) -> Result<Transition, TransitionError> {
    let refuse = |hint| {
        Err(TransitionError {
            command: command.name(),
            state: state.name(),
            hint,
        })
    };
    let to = |state| {
        Ok(Transition {
            state,
            accept_failures: Vec::new(),
            withdraw: Vec::new(),
            hold: Vec::new(),
        })
    };
    match (command, state) {
        (_, RolloutState::Aborted { .. } | RolloutState::Finished { .. }) => {
            refuse("; it is over (retry starts a new rollout of its failed devices)")
        }
        (Command::Abort, _) => Ok(Transition {
            state: RolloutState::Aborted {
                at: now,
                by: by.to_owned(),
            },
            accept_failures: Vec::new(),
            withdraw: members
                .iter()
                .filter(|m| m.outcome.is_none() && m.offered_at.is_some())
                .map(|m| m.device.clone())
                .collect(),
            hold: Vec::new(),
        }),
        (
            Command::Pause,
            RolloutState::Running { phase, .. } | RolloutState::AwaitingApproval { phase },
        ) => Ok(Transition {
            state: RolloutState::Paused {
                phase: *phase,
                reason: PauseReason::Operator {
                    by: by.to_owned(),
                    awaiting_approval: matches!(state, RolloutState::AwaitingApproval { .. }),
                },
            },
            accept_failures: Vec::new(),
            withdraw: Vec::new(),
            hold: held(members),
        }),
        (Command::Pause, RolloutState::Paused { .. }) => refuse(" already"),
        (
            Command::Resume,
            RolloutState::Paused {
                phase,
                reason:
                    PauseReason::Operator {
                        awaiting_approval: true,
                        ..
                    },
            },
        ) => to(RolloutState::AwaitingApproval { phase: *phase }),
        (Command::Resume, RolloutState::Paused { phase, reason }) => {
            let phase = match reason {
                // The phase is accepted as it ended: on to the next.
                PauseReason::BelowSuccessLevel { phase, .. } => phase + 1,
                PauseReason::Operator { .. } | PauseReason::ErrorThreshold { .. } => *phase,
            };
            Ok(Transition {
                state: RolloutState::Running {
                    phase,
                    phase_started_at: now,
                    level_reached_at: None,
                },
                // What failed so far has been seen; only new failures count.
                accept_failures: members
                    .iter()
                    .filter(|m| m.counts_as_failed())
                    .map(|m| m.device.clone())
                    .collect(),
                withdraw: Vec::new(),
                hold: Vec::new(),
            })
        }
        (Command::Resume, _) => refuse("; only a paused rollout resumes"),
        (Command::Approve, RolloutState::AwaitingApproval { phase }) => to(RolloutState::Running {
            phase: *phase,
            phase_started_at: now,
            level_reached_at: None,
        }),
        (Command::Approve, _) => {
            refuse("; only a rollout waiting for approval of its next phase can be approved")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::num::NonZeroU32;
    use time::macros::datetime;
    use uplift_proto::policy::{ErrorThreshold, PhaseReach, Ramp};

    const T0: OffsetDateTime = datetime!(2026-12-04 10:00 UTC);

    fn secs(s: i64) -> OffsetDateTime {
        T0 + time::Duration::seconds(s)
    }

    fn id(i: usize) -> DeviceId {
        format!("dev-{i:04}").parse().unwrap()
    }

    /// `sizes[p]` devices in phase p, none offered yet.
    fn members(sizes: &[usize]) -> Vec<Member> {
        let mut n = 0;
        let mut out = Vec::new();
        for (phase, &size) in sizes.iter().enumerate() {
            for _ in 0..size {
                out.push(Member {
                    device: id(n),
                    phase: phase as u32,
                    offered_at: None,
                    outcome: None,
                    failure_accepted: false,
                    live: Live::Idle,
                });
                n += 1;
            }
        }
        out
    }

    /// Stores what a step decided, as the scheduler would.
    fn apply(state: &mut RolloutState, members: &mut [Member], step: &Step, now: OffsetDateTime) {
        for m in members.iter_mut() {
            if step.offer.contains(&m.device) {
                m.offered_at = Some(now);
            }
            if step.hold.contains(&m.device) {
                m.offered_at = None;
            }
            if let Some((_, outcome, _)) = step.settle.iter().find(|(d, _, _)| *d == m.device) {
                m.outcome = Some(*outcome);
            }
        }
        if let Some(next) = &step.state {
            *state = next.clone();
        }
    }

    fn run(
        policy: &RolloutPolicy,
        state: &mut RolloutState,
        members: &mut [Member],
        now: OffsetDateTime,
    ) -> Step {
        run_in(policy, WindowNow::NoWindow, state, members, now)
    }

    fn report(members: &mut [Member], phase: u32, live: Live) {
        for m in members.iter_mut().filter(|m| m.phase == phase) {
            m.live = live.clone();
        }
    }

    fn phased(phases: Vec<PhaseReach>) -> RolloutPolicy {
        RolloutPolicy {
            phases,
            ..RolloutPolicy::default()
        }
    }

    /// Two phases of half the target each, pausing once `min_finished` of
    /// a phase have finished and more than `percent` of them failed.
    fn halves_pausing_over(percent: u8, min_finished: u32) -> RolloutPolicy {
        RolloutPolicy {
            error_threshold: ErrorThreshold {
                percent,
                min_finished,
            },
            ..phased(vec![PhaseReach::Percent(50)])
        }
    }

    fn phase_of(state: &RolloutState) -> Option<u32> {
        match state {
            RolloutState::Running { phase, .. }
            | RolloutState::AwaitingApproval { phase }
            | RolloutState::Paused { phase, .. } => Some(*phase),
            _ => None,
        }
    }

    #[test]
    fn phases_start_one_after_another_as_each_reaches_its_success_level() {
        let policy = phased(vec![PhaseReach::Percent(10), PhaseReach::Percent(50)]);
        let mut state = RolloutState::start(T0);
        let mut fleet = members(&[2, 8, 10]);
        let s = run(&policy, &mut state, &mut fleet, T0);
        assert_eq!(
            s.offer,
            vec![id(0), id(1)],
            "only the first phase is offered"
        );

        let s = run(&policy, &mut state, &mut fleet, secs(10));
        assert!(
            s.offer.is_empty() && s.state.is_none(),
            "nothing new while phase 0 works"
        );

        report(&mut fleet, 0, Live::OnRelease);
        let s = run(&policy, &mut state, &mut fleet, secs(20));
        assert_eq!(s.events, vec![Event::PhaseStarted { phase: 1 }]);
        assert_eq!(s.offer.len(), 8, "phase 1 is offered in the same pass");
        assert_eq!(phase_of(&state), Some(1));

        report(&mut fleet, 1, Live::OnRelease);
        run(&policy, &mut state, &mut fleet, secs(30));
        assert_eq!(phase_of(&state), Some(2));
        report(&mut fleet, 2, Live::OnRelease);
        let s = run(&policy, &mut state, &mut fleet, secs(40));
        assert!(
            s.settle.len() == 10 && s.events == vec![Event::Finished],
            "{s:?}"
        );
        assert_eq!(state, RolloutState::Finished { at: secs(40) });
        assert_eq!(
            run(&policy, &mut state, &mut fleet, secs(50)),
            Step::default()
        );
    }

    #[test]
    fn a_soak_time_holds_the_next_phase_after_the_success_level_is_reached() {
        let policy = RolloutPolicy {
            soak_seconds: 600,
            ..phased(vec![PhaseReach::Count(NonZeroU32::new(1).unwrap())])
        };
        let mut state = RolloutState::start(T0);
        let mut fleet = members(&[1, 3]);
        run(&policy, &mut state, &mut fleet, T0);
        report(&mut fleet, 0, Live::OnRelease);
        run(&policy, &mut state, &mut fleet, secs(100));
        assert!(
            matches!(state, RolloutState::Running { phase: 0, level_reached_at: Some(t), .. } if t == secs(100))
        );
        run(&policy, &mut state, &mut fleet, secs(699));
        assert_eq!(phase_of(&state), Some(0), "599 s of soak is not 600");
        let s = run(&policy, &mut state, &mut fleet, secs(700));
        assert_eq!(phase_of(&state), Some(1));
        assert_eq!(s.offer.len(), 3);
    }

    #[test]
    fn an_approval_gate_waits_for_the_operator_and_then_offers_the_next_phase() {
        let policy = RolloutPolicy {
            approval: true,
            ..phased(vec![PhaseReach::Percent(50)])
        };
        let mut state = RolloutState::start(T0);
        let mut fleet = members(&[2, 2]);
        run(&policy, &mut state, &mut fleet, T0);
        report(&mut fleet, 0, Live::OnRelease);
        let s = run(&policy, &mut state, &mut fleet, secs(5));
        assert_eq!(s.events, vec![Event::AwaitingApproval { phase: 1 }]);
        let s = run(&policy, &mut state, &mut fleet, secs(3600));
        assert!(
            s.offer.is_empty(),
            "no offers without approval, however long"
        );
        let t = command(&state, &fleet, &Command::Approve, "alice", secs(3601)).unwrap();
        state = t.state;
        let s = run(&policy, &mut state, &mut fleet, secs(3602));
        assert_eq!(s.offer, vec![id(2), id(3)]);
    }

    #[test]
    fn failures_over_the_threshold_pause_the_rollout_and_name_the_devices() {
        let policy = halves_pausing_over(20, 5);
        let mut state = RolloutState::start(T0);
        let mut fleet = members(&[10, 10]);
        run(&policy, &mut state, &mut fleet, T0);
        // Two failures of four finished: 50 %, but fewer than 5 finished.
        for (i, m) in fleet.iter_mut().take(4).enumerate() {
            m.live = if i < 2 {
                Live::Failed {
                    error: Some("health check failed".into()),
                }
            } else {
                Live::OnRelease
            };
        }
        run(&policy, &mut state, &mut fleet, secs(10));
        assert_eq!(state.name(), "running", "the minimum count is not reached");
        fleet[4].live = Live::OnRelease;
        fleet[5].live = Live::Working;
        let s = run(&policy, &mut state, &mut fleet, secs(20));
        let RolloutState::Paused {
            reason:
                PauseReason::ErrorThreshold {
                    phase,
                    failed,
                    finished,
                    devices,
                },
            ..
        } = &state
        else {
            panic!("expected a threshold pause, got {state:?}");
        };
        assert_eq!((*phase, *failed, *finished), (0, 2, 5));
        assert_eq!(
            devices.iter().map(|d| d.device.clone()).collect::<Vec<_>>(),
            vec![id(0), id(1)]
        );
        assert_eq!(devices[0].error.as_deref(), Some("health check failed"));
        assert!(matches!(s.events[..], [Event::Paused { .. }]));

        // Paused: a device at work still reports and settles, nothing is
        // offered.
        fleet[5].live = Live::OnRelease;
        let s = run(&policy, &mut state, &mut fleet, secs(30));
        assert!(s.offer.is_empty() && s.settle.len() == 1, "{s:?}");
        assert_eq!(state.name(), "paused");
    }

    #[test]
    fn a_pause_takes_back_offers_not_started_and_a_resume_offers_them_again() {
        // A phase of 10 offered at once, of which (say, under a download
        // limit) only 4 have started: 2 failed, 2 are downloading, 6 wait.
        let policy = halves_pausing_over(50, 2);
        let mut state = RolloutState::start(T0);
        let mut fleet = members(&[10, 10]);
        run(&policy, &mut state, &mut fleet, T0);
        fleet[0].live = Live::Failed { error: None };
        fleet[1].live = Live::Failed { error: None };
        fleet[2].live = Live::Working;
        fleet[3].live = Live::Working;
        let s = run(&policy, &mut state, &mut fleet, secs(10));
        assert_eq!(state.name(), "paused");
        assert_eq!(
            s.hold,
            (4..10).map(id).collect::<Vec<_>>(),
            "those waiting must not start the failing release while it is paused"
        );
        assert!(fleet[2].offered_at.is_some(), "a device at work finishes");
        let s = run(&policy, &mut state, &mut fleet, secs(20));
        assert!(s.offer.is_empty() && s.hold.is_empty(), "{s:?}");

        // An operator's pause takes back the same kind of offers.
        let t = command(&state, &fleet, &Command::Resume, "dave", secs(30)).unwrap();
        state = t.state;
        fleet[0].failure_accepted = true;
        fleet[1].failure_accepted = true;
        let s = run(&policy, &mut state, &mut fleet, secs(31));
        assert_eq!(
            s.offer,
            (4..10).map(id).collect::<Vec<_>>(),
            "offered again"
        );
        fleet[4].live = Live::Working;
        let t = command(&state, &fleet, &Command::Pause, "dave", secs(40)).unwrap();
        assert_eq!(t.hold, (5..10).map(id).collect::<Vec<_>>());
    }

    #[test]
    fn resuming_past_a_threshold_pause_counts_only_new_failures() {
        let policy = phased(vec![PhaseReach::Percent(50)]);
        let mut state = RolloutState::start(T0);
        let mut fleet = members(&[3, 3]);
        run(&policy, &mut state, &mut fleet, T0);
        fleet[0].live = Live::Failed { error: None };
        run(&policy, &mut state, &mut fleet, secs(1));
        assert_eq!(
            state.name(),
            "paused",
            "the default pauses at the first failure"
        );
        let t = command(&state, &fleet, &Command::Resume, "bob", secs(2)).unwrap();
        assert_eq!(t.accept_failures, vec![id(0)]);
        state = t.state;
        fleet[0].failure_accepted = true;
        fleet[1].live = Live::OnRelease;
        run(&policy, &mut state, &mut fleet, secs(3));
        assert_eq!(state.name(), "running");
        fleet[2].live = Live::Failed { error: None };
        run(&policy, &mut state, &mut fleet, secs(4));
        assert_eq!(state.name(), "paused", "a new failure pauses again");
    }

    #[test]
    fn a_phase_that_ends_below_its_success_level_pauses_and_resume_moves_on() {
        let policy = RolloutPolicy {
            success_percent: Some(100),
            ..halves_pausing_over(50, 1)
        };
        let mut state = RolloutState::start(T0);
        let mut fleet = members(&[4, 4]);
        run(&policy, &mut state, &mut fleet, T0);
        fleet[0].live = Live::Failed { error: None };
        for m in &mut fleet[1..4] {
            m.live = Live::OnRelease;
        }
        run(&policy, &mut state, &mut fleet, secs(1));
        assert!(matches!(
            state,
            RolloutState::Paused {
                reason: PauseReason::BelowSuccessLevel {
                    phase: 0,
                    succeeded: 3,
                    needed: 4
                },
                ..
            }
        ));
        state = command(&state, &fleet, &Command::Resume, "op", secs(2))
            .unwrap()
            .state;
        let s = run(&policy, &mut state, &mut fleet, secs(3));
        assert_eq!(phase_of(&state), Some(1));
        assert_eq!(s.offer.len(), 4);
    }

    #[test]
    fn a_device_that_does_not_finish_in_time_counts_as_failed() {
        let policy = RolloutPolicy {
            device_timeout_seconds: Some(300),
            ..RolloutPolicy::default()
        };
        let mut state = RolloutState::start(T0);
        let mut fleet = members(&[2]);
        run(&policy, &mut state, &mut fleet, T0);
        fleet[0].live = Live::Working;
        fleet[1].live = Live::OnRelease;
        let s = run(&policy, &mut state, &mut fleet, secs(299));
        assert_eq!(s.settle, vec![(id(1), Outcome::Succeeded, None)]);
        let s = run(&policy, &mut state, &mut fleet, secs(300));
        assert_eq!(s.settle[0].0, id(0));
        assert_eq!(s.settle[0].1, Outcome::TimedOut);
        assert!(s.settle[0].2.as_deref().unwrap().contains("300 s"));
        assert_eq!(
            state.name(),
            "paused",
            "a timeout is a failure for the threshold"
        );
    }

    #[test]
    fn a_ramp_offers_at_its_base_rate_and_grows_with_successes() {
        let policy = RolloutPolicy {
            ramp: Some(Ramp {
                base_per_minute: NonZeroU32::new(2).unwrap(),
                factor_percent: 200,
                step_successes: NonZeroU32::new(2).unwrap(),
            }),
            ..RolloutPolicy::default()
        };
        let mut state = RolloutState::start(T0);
        let mut fleet = members(&[20]);
        assert_eq!(run(&policy, &mut state, &mut fleet, T0).offer.len(), 2);
        assert!(
            run(&policy, &mut state, &mut fleet, secs(30))
                .offer
                .is_empty(),
            "2 per minute"
        );
        for m in fleet.iter_mut().take(2) {
            m.live = Live::OnRelease;
        }
        // Two successes: one step, 4 per minute; the first two offers have aged out.
        assert_eq!(
            run(&policy, &mut state, &mut fleet, secs(61)).offer.len(),
            4
        );
    }

    fn with_window(policy: RolloutPolicy, applies_to: WindowScope) -> RolloutPolicy {
        RolloutPolicy {
            window: Some(uplift_proto::policy::WindowSpec {
                cron: "0 2 * * *".into(),
                duration_minutes: 60,
                time_zone: "UTC".into(),
                applies_to,
            }),
            ..policy
        }
    }

    /// One step with the window as given, stored as the scheduler would.
    fn run_in(
        policy: &RolloutPolicy,
        window: WindowNow,
        state: &mut RolloutState,
        members: &mut [Member],
        now: OffsetDateTime,
    ) -> Step {
        let s = step(
            Rollout {
                policy,
                state,
                window,
            },
            members,
            now,
        );
        apply(state, members, &s, now);
        s
    }

    #[test]
    fn outside_its_window_a_rollout_offers_nothing_but_still_settles_and_advances() {
        let policy = with_window(
            phased(vec![PhaseReach::Percent(50)]),
            WindowScope::Downloads,
        );
        let open = WindowNow::Open { since: T0 };
        let mut state = RolloutState::start(T0);
        let mut fleet = members(&[1, 1]);
        let closed = |state: &RolloutState, fleet: &[Member], now| {
            step(
                Rollout {
                    policy: &policy,
                    state,
                    window: WindowNow::Closed,
                },
                fleet,
                now,
            )
        };
        assert!(closed(&state, &fleet, T0).offer.is_empty());
        run_in(&policy, open, &mut state, &mut fleet, secs(1));
        fleet[0].live = Live::OnRelease;
        let s = closed(&state, &fleet, secs(2));
        assert_eq!(s.settle.len(), 1, "the device that finished is counted");
        assert_eq!(s.events, vec![Event::PhaseStarted { phase: 1 }]);
        assert!(s.offer.is_empty(), "the next phase waits for the window");
    }

    #[test]
    fn when_a_download_window_closes_offers_not_started_are_taken_back_until_it_opens() {
        // Ten devices offered at once; under a download limit two started,
        // one finished, the rest wait in line for a turn.
        let policy = with_window(phased(vec![]), WindowScope::Downloads);
        let open = WindowNow::Open { since: T0 };
        let mut state = RolloutState::start(T0);
        let mut fleet = members(&[10]);
        assert_eq!(
            run_in(&policy, open, &mut state, &mut fleet, T0)
                .offer
                .len(),
            10
        );
        fleet[0].live = Live::OnRelease;
        fleet[1].live = Live::Working;
        fleet[2].live = Live::Installed;
        let s = run_in(&policy, WindowNow::Closed, &mut state, &mut fleet, secs(60));
        assert_eq!(
            s.hold,
            (3..10).map(id).collect::<Vec<_>>(),
            "no device in line starts a download outside the window"
        );
        assert_eq!(s.settle.len(), 1, "the finished device still counts");
        assert!(
            fleet[1].offered_at.is_some() && fleet[2].offered_at.is_some(),
            "installs in progress finish"
        );
        assert_eq!(state.name(), "running", "closing is not a pause");
        let s = run_in(&policy, WindowNow::Closed, &mut state, &mut fleet, secs(61));
        assert_eq!(s, Step::default(), "nothing more while it stays closed");

        let s = run_in(
            &policy,
            WindowNow::Open { since: secs(3600) },
            &mut state,
            &mut fleet,
            secs(3600),
        );
        assert_eq!(
            s.offer,
            (3..10).map(id).collect::<Vec<_>>(),
            "offered again when it opens"
        );
        assert!(s.hold.is_empty());
    }

    #[test]
    fn a_reboot_window_offers_at_once_and_holds_reboots_until_it_opens() {
        let policy = RolloutPolicy {
            device_timeout_seconds: Some(600),
            // A failure does not pause it here: this is about time only.
            error_threshold: ErrorThreshold {
                percent: 100,
                min_finished: 1,
            },
            ..with_window(phased(vec![]), WindowScope::Reboot)
        };
        let mut state = RolloutState::start(T0);
        let mut fleet = members(&[3]);
        let s = run_in(&policy, WindowNow::Closed, &mut state, &mut fleet, T0);
        assert_eq!(s.offer.len(), 3, "a reboot window does not hold downloads");
        assert_eq!(
            reboots(&policy, &state, WindowNow::Closed),
            Reboots::Held,
            "the window is closed: nobody reboots"
        );
        // Two wrote and verified the release; one is still downloading.
        fleet[0].live = Live::Installed;
        fleet[1].live = Live::Installed;
        fleet[2].live = Live::Working;
        let s = run_in(
            &policy,
            WindowNow::Closed,
            &mut state,
            &mut fleet,
            secs(3000),
        );
        assert_eq!(
            s.settle,
            vec![(
                id(2),
                Outcome::TimedOut,
                Some("did not finish within 600 s of its offer".into())
            )],
            "a device waiting for the window is not late; a slow download is"
        );
        assert!(
            s.hold.is_empty(),
            "a closed reboot window takes back nothing"
        );

        let opened = secs(7200);
        let window = WindowNow::Open { since: opened };
        assert_eq!(
            reboots(&policy, &state, window),
            Reboots::Go { since: opened }
        );
        let s = run_in(
            &policy,
            window,
            &mut state,
            &mut fleet,
            opened + time::Duration::seconds(599),
        );
        assert!(s.settle.is_empty(), "their time counts from the opening");
        fleet[0].live = Live::OnRelease;
        let s = run_in(
            &policy,
            window,
            &mut state,
            &mut fleet,
            opened + time::Duration::seconds(600),
        );
        assert_eq!(
            s.settle,
            vec![
                (id(0), Outcome::Succeeded, None),
                (
                    id(1),
                    Outcome::TimedOut,
                    Some("did not finish within 600 s of the reboot window's opening".into())
                )
            ]
        );
    }

    #[test]
    fn reboots_are_free_without_a_reboot_window_and_held_while_paused() {
        let running = RolloutState::start(T0);
        let open = WindowNow::Open { since: T0 };
        let downloads = with_window(phased(vec![]), WindowScope::Downloads);
        assert_eq!(
            reboots(&downloads, &running, WindowNow::Closed),
            Reboots::Free
        );
        assert_eq!(
            reboots(&phased(vec![]), &running, WindowNow::NoWindow),
            Reboots::Free
        );
        let reboot = with_window(phased(vec![PhaseReach::Percent(50)]), WindowScope::Reboot);
        let paused = command(&running, &[], &Command::Pause, "erin", secs(1))
            .unwrap()
            .state;
        assert_eq!(
            reboots(&reboot, &paused, open),
            Reboots::Held,
            "a paused rollout boots nobody into the release"
        );
        let resumed = command(&paused, &[], &Command::Resume, "erin", secs(2))
            .unwrap()
            .state;
        assert_eq!(reboots(&reboot, &resumed, open), Reboots::Go { since: T0 });
        let gate = RolloutState::AwaitingApproval { phase: 1 };
        assert_eq!(
            reboots(&reboot, &gate, open),
            Reboots::Go { since: T0 },
            "devices of an approved phase go while the next awaits approval"
        );
        // A device holding its verified slot is at work: a pause keeps it
        // (it neither reboots nor loses the slot), an abort withdraws it.
        let mut fleet = members(&[2, 2]);
        let mut state = RolloutState::start(T0);
        run_in(&reboot, WindowNow::Closed, &mut state, &mut fleet, T0);
        fleet[0].live = Live::Installed;
        let t = command(&state, &fleet, &Command::Pause, "erin", secs(3)).unwrap();
        assert_eq!(t.hold, vec![id(1)]);
        let t = command(&state, &fleet, &Command::Abort, "erin", secs(3)).unwrap();
        assert_eq!(t.withdraw, vec![id(0), id(1)]);
    }

    #[test]
    fn abort_withdraws_unfinished_offers_and_nothing_follows() {
        let policy = phased(vec![PhaseReach::Percent(50)]);
        let mut state = RolloutState::start(T0);
        let mut fleet = members(&[3, 3]);
        run(&policy, &mut state, &mut fleet, T0);
        fleet[0].live = Live::OnRelease;
        fleet[1].live = Live::Working;
        run(&policy, &mut state, &mut fleet, secs(1));
        let t = command(&state, &fleet, &Command::Abort, "carol", secs(2)).unwrap();
        assert_eq!(
            t.withdraw,
            vec![id(1), id(2)],
            "the committed device keeps its release"
        );
        state = t.state;
        assert_eq!(
            run(&policy, &mut state, &mut fleet, secs(3)),
            Step::default()
        );
        let err = command(&state, &fleet, &Command::Resume, "carol", secs(4)).unwrap_err();
        assert!(
            err.to_string()
                .contains("cannot resume a rollout that is aborted"),
            "{err}"
        );
    }

    #[test]
    fn a_pause_while_awaiting_approval_resumes_to_awaiting_approval_not_past_the_gate() {
        let fleet = members(&[1, 1]);
        let waiting = RolloutState::AwaitingApproval { phase: 1 };
        let paused = command(&waiting, &fleet, &Command::Pause, "ops", T0)
            .unwrap()
            .state;
        assert!(matches!(paused, RolloutState::Paused { phase: 1, .. }));
        assert!(command(&paused, &fleet, &Command::Approve, "ops", T0).is_err());
        let resumed = command(&paused, &fleet, &Command::Resume, "ops", T0)
            .unwrap()
            .state;
        assert_eq!(resumed, RolloutState::AwaitingApproval { phase: 1 });
        // A pause stored before this field existed resumes as it did.
        let old: RolloutState = serde_json::from_value(serde_json::json!({
            "state": "paused", "phase": 1, "reason": {"cause": "operator", "by": "ops"}
        }))
        .unwrap_or_else(|e| panic!("an older stored pause: {e}"));
        assert!(matches!(
            command(&old, &fleet, &Command::Resume, "ops", T0)
                .unwrap()
                .state,
            RolloutState::Running { phase: 1, .. }
        ));
    }

    #[test]
    fn commands_that_do_not_apply_are_refused_with_the_state_named() {
        let fleet = members(&[1]);
        let running = RolloutState::start(T0);
        let err = command(&running, &fleet, &Command::Approve, "x", T0).unwrap_err();
        assert_eq!(err.state, "running");
        assert!(command(&running, &fleet, &Command::Resume, "x", T0).is_err());
        let paused = command(&running, &fleet, &Command::Pause, "x", T0)
            .unwrap()
            .state;
        assert!(
            matches!(&paused, RolloutState::Paused { reason: PauseReason::Operator { by, .. }, .. } if by == "x")
        );
        assert!(command(&paused, &fleet, &Command::Pause, "x", T0).is_err());
        let finished = RolloutState::Finished { at: T0 };
        assert!(command(&finished, &fleet, &Command::Abort, "x", T0).is_err());
    }

    #[test]
    fn empty_phases_are_passed_at_once_and_an_empty_rollout_finishes() {
        let policy = phased(vec![PhaseReach::Percent(1), PhaseReach::Percent(2)]);
        let mut state = RolloutState::start(T0);
        // Phase 1 is empty (1 % and 2 % of 3 devices are both one device).
        let mut fleet = members(&[1, 0, 2]);
        run(&policy, &mut state, &mut fleet, T0);
        report(&mut fleet, 0, Live::OnRelease);
        run(&policy, &mut state, &mut fleet, secs(1));
        assert_eq!(phase_of(&state), Some(1));
        let s = run(&policy, &mut state, &mut fleet, secs(2));
        assert_eq!(phase_of(&state), Some(2));
        assert_eq!(s.offer.len(), 2);

        let mut empty_state = RolloutState::start(T0);
        run(&RolloutPolicy::default(), &mut empty_state, &mut [], T0);
        assert_eq!(empty_state.name(), "finished");
    }

    #[test]
    fn superseded_devices_end_their_part_and_the_state_round_trips_as_json() {
        let policy = RolloutPolicy::default();
        let mut state = RolloutState::start(T0);
        let mut fleet = members(&[2]);
        run(&policy, &mut state, &mut fleet, T0);
        fleet[0].outcome = Some(Outcome::Superseded);
        fleet[1].live = Live::OnRelease;
        run(&policy, &mut state, &mut fleet, secs(1));
        assert_eq!(state.name(), "finished");
        for s in [
            RolloutState::start(T0),
            RolloutState::Paused {
                phase: 2,
                reason: PauseReason::ErrorThreshold {
                    phase: 2,
                    failed: 1,
                    finished: 1,
                    devices: vec![FailedDevice {
                        device: id(1),
                        outcome: Outcome::TimedOut,
                        error: None,
                    }],
                },
            },
            RolloutState::Aborted {
                at: T0,
                by: "x".into(),
            },
        ] {
            let json = serde_json::to_string(&s).unwrap();
            assert_eq!(
                serde_json::from_str::<RolloutState>(&json).unwrap(),
                s,
                "{json}"
            );
        }
    }
}
