//! The agent's decisions as an explicit state machine with no I/O: it takes
//! the facts read at boot and the events that happen after, and answers with
//! the actions the runtime must perform. Every transition is unit-tested here
//! (the approach of coreos/zincati).
//!
//! The data of one step of the work lives in that step's [`Phase`] variant
//! (the offer deferred during a trial, a download's progress, the offer a
//! scheduled retry installs again), so it ends with the step and no state
//! that cannot exist can be written down. [`Machine`] keeps beside the phase
//! only what every phase reads: facts of this boot and verdicts on past
//! offers.

use crate::local::{Failure, Journal, PendingInstall, SlotTable};
use std::collections::BTreeSet;
use uplift_bootenv::state::BootState;
use uplift_proto::channel::{AgentState, Offer, Progress, Report};
use uplift_proto::{ErrorKind, SlotName, Version, WireError};

/// Everything the agent reads from disk when it starts.
#[derive(Debug, Clone)]
pub struct BootFacts {
    pub booted: SlotName,
    /// The boot environment as the bootloader left it for this boot.
    pub boot: BootState,
    pub slots: SlotTable,
    pub journal: Journal,
    pub factory_version: Version,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Phase {
    Idle,
    /// Booted a slot on trial; waiting for the health check.
    Testing {
        /// The newest offer that arrived during the trial: a trial is
        /// committed (or rolled back) before anything else, so it is
        /// considered once the commit is written, and dropped otherwise.
        deferred: Option<Offer>,
    },
    Installing {
        offer: Offer,
        /// Written; the image is being checked.
        verifying: bool,
        /// How far this attempt got; a new attempt starts from nothing.
        progress: Option<Progress>,
    },
    RebootPending {
        version: Version,
    },
    /// Written and verified in the other slot, which the boot environment
    /// does not point at; waiting for the server's go (an offer of the
    /// version without `hold_reboot`) before switching and rebooting.
    AwaitingReboot {
        version: Version,
        rollout_id: i64,
    },
    Failed {
        target: Version,
        error: WireError,
        /// The offer to install again when [`Event::RetryDue`] arrives;
        /// `None` when no retry is scheduled. Anything that moves the
        /// machine on replaces the phase, and the retry with it.
        retry: Option<Offer>,
    },
    RolledBack {
        version: Version,
        error: WireError,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    HealthCheck(Result<(), String>),
    /// The trial slot is now the default (after [`Action::CommitTrial`]).
    Committed,
    CommitFailed(WireError),
    Offer(Offer),
    NoUpdate,
    // Install events name their attempt ([`Machine::install_id`]): one from
    // an attempt that was cancelled or superseded is ignored.
    Progress {
        install: u64,
        progress: Progress,
    },
    Verifying {
        install: u64,
    },
    /// The release is written and verified in the other slot and
    /// recorded as awaiting its reboot; the boot environment is untouched.
    InstallDone {
        install: u64,
    },
    InstallFailed {
        install: u64,
        error: WireError,
    },
    /// The wait scheduled by [`Action::ScheduleRetry`] is over.
    RetryDue,
    /// The boot environment now tries the verified slot at the next boot
    /// (after [`Action::StartTrial`]).
    TrialStarted,
    /// [`Action::StartTrial`] failed; the boot environment is unchanged.
    TrialFailed(WireError),
}

/// Install attempts per rollout and version before the agent gives up.
pub const MAX_INSTALL_ATTEMPTS: u32 = 3;

/// Failures a new attempt can cure: the network, a chunk damaged in
/// transit or storage (on the server's disk too, once the operator uploads
/// the release again), a write error. A bad signature, another device type
/// or a downgrade fail the same way every time and are not retried.
fn retryable(kind: ErrorKind) -> bool {
    matches!(
        kind,
        ErrorKind::DownloadFailed
            | ErrorKind::ServerUnreachable
            | ErrorKind::ChunkHashMismatch
            | ErrorKind::StoredChunkDamaged
            | ErrorKind::ImageHashMismatch
            | ErrorKind::SlotIo
    )
}

/// An older release refused. A downgrade needs two words: the rollout's
/// (the offer asks for it) and the release key's (the signed manifest may
/// replace the running version, see [`Manifest::may_replace_up_to`]); the
/// server alone can never downgrade a device. One rule and one message for
/// both places that apply it: the decision on an offer ([`Machine`], before
/// the manifest is fetched) and the check of the signed manifest
/// ([`crate::install::check_manifest`]).
///
/// [`Manifest::may_replace_up_to`]: uplift_release::Manifest::may_replace_up_to
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DowngradeRefused {
    #[error("refusing to downgrade from {running} to {target}; start the rollout with --allow-downgrade if intended")]
    NotRequested { running: Version, target: Version },
    #[error(
        "refusing to downgrade from {running} to {target}: the release key did not sign {target} as \
         allowed to replace {running} ({}); only a release made with `uplift release create \
         --may-replace-up-to {running}` (or newer) may downgrade this device, whatever the server offers",
        signed_word(up_to.as_ref())
    )]
    NotSigned {
        running: Version,
        target: Version,
        /// What the manifest says it may replace.
        up_to: Option<Version>,
    },
}

fn signed_word(up_to: Option<&Version>) -> String {
    match up_to {
        Some(up_to) => format!("it may replace versions up to {up_to}"),
        None => "it allows no downgrade".to_owned(),
    }
}

impl DowngradeRefused {
    pub fn to_wire(&self) -> WireError {
        WireError::new(ErrorKind::DowngradeRefused, self.to_string())
    }
}

/// What the release key has said about a downgrade when the rule is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignedPermit<'a> {
    /// Nothing yet: the offer's manifest has not been fetched and verified,
    /// so only the rollout's word is checked (and the install checks again).
    NotYetKnown,
    /// The verified manifest's `may_replace_up_to`.
    MayReplaceUpTo(Option<&'a Version>),
}

/// The downgrade rule: a release older than the running one is installed
/// only when the rollout asks for it and its signed manifest may replace
/// the running version; the same or a newer one always passes.
pub fn check_downgrade(
    running: &Version,
    target: &Version,
    requested: bool,
    signed: SignedPermit<'_>,
) -> Result<(), DowngradeRefused> {
    if target >= running {
        return Ok(());
    }
    if !requested {
        return Err(DowngradeRefused::NotRequested {
            running: running.clone(),
            target: target.clone(),
        });
    }
    match signed {
        SignedPermit::NotYetKnown => Ok(()),
        SignedPermit::MayReplaceUpTo(Some(up_to)) if running <= up_to => Ok(()),
        SignedPermit::MayReplaceUpTo(up_to) => Err(DowngradeRefused::NotSigned {
            running: running.clone(),
            target: target.clone(),
            up_to: up_to.cloned(),
        }),
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    RunHealthCheck,
    /// Make the booted trial slot the default and record it as running.
    CommitTrial,
    /// Drop the trial (the old slot stays default) and remember the failure.
    AbandonTrial(Failure),
    /// Clear the bootloader's fallback mark and remember the failure.
    AcknowledgeFallback(Failure),
    StartInstall(Offer),
    /// The go: switch the boot environment to try the verified slot at the
    /// next boot (the install's commit point), then report
    /// [`Event::TrialStarted`] or [`Event::TrialFailed`].
    StartTrial(PendingInstall),
    /// Forget the verified slot awaiting its reboot: the boot environment
    /// never pointed at it, and now nothing will.
    WithdrawVerified,
    /// Keep an install failure in the journal, so `uplift-agent status`
    /// shows it even when the server cannot be reached.
    RecordFailure(Failure),
    CancelInstall,
    Reboot,
    Report,
    /// Deliver [`Event::RetryDue`] after a backoff for this attempt number.
    ScheduleRetry {
        attempt: u32,
    },
}

/// The failed install attempts at the offer that failed last, keyed by
/// rollout and version (a new rollout of the same version starts a fresh
/// budget). The count and the verdict are one value, so a spent budget
/// always has its reason.
#[derive(Debug, Clone, PartialEq)]
struct Failures {
    rollout_id: i64,
    version: Version,
    budget: Budget,
}

#[derive(Debug, Clone, PartialEq)]
enum Budget {
    /// This many attempts failed (fewer than [`MAX_INSTALL_ATTEMPTS`]).
    Left { failed: u32 },
    /// No attempts left: a repeated offer is answered with this error
    /// (the last one, or why the budget was spent at once), not a download.
    Spent(WireError),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Machine {
    // Beside the phase only what outlives every phase: this boot's facts
    // and verdicts on past offers.
    /// Changes only with a reboot, which ends this machine.
    running: Version,
    booted: SlotName,
    /// Releases installed here and rolled back: not retried.
    refused: BTreeSet<Version>,
    /// Outlives the phases between attempts: a device that waits for a
    /// download turn (the server answers its retry with "no update") is
    /// idle in between, and its count must carry on when the offer comes
    /// back, or a fleet kept waiting would never spend its budget.
    failures: Option<Failures>,
    /// Numbers install attempts, so late events of an old one are ignored;
    /// beside the phase because a number must never be given out twice.
    install_id: u64,
    phase: Phase,
}

impl Machine {
    /// Decides what this boot is: a trial to test, a fallback to report, an
    /// install still waiting for its reboot, or a normal start.
    pub fn start(facts: BootFacts) -> (Machine, Vec<Action>) {
        let BootFacts {
            booted,
            boot,
            slots,
            journal,
            factory_version,
        } = facts;
        let version_in = |slot: SlotName| {
            slots.get(slot).map(|c| c.version.clone()).or_else(|| {
                journal
                    .pending
                    .as_ref()
                    .filter(|p| p.slot == slot)
                    .map(|p| p.version.clone())
            })
        };
        let running = version_in(booted).unwrap_or_else(|| factory_version.clone());
        let mut refused: BTreeSet<Version> = journal.rolled_back.iter().cloned().collect();
        refused.extend(
            journal
                .last_failure
                .iter()
                .filter(|f| f.rolled_back)
                .map(|f| f.version.clone()),
        );
        let mut machine = Machine {
            running: running.clone(),
            booted,
            refused,
            failures: None,
            install_id: 0,
            phase: Phase::Idle,
        };

        if boot.trial.as_ref().is_some_and(|t| t.slot == booted) {
            machine.phase = Phase::Testing { deferred: None };
            return (machine, vec![Action::Report, Action::RunHealthCheck]);
        }
        if let Some(from) = boot.fallback_from {
            let version = version_in(from).unwrap_or(factory_version);
            let error = match &journal.last_failure {
                Some(f) if f.version == version && f.rolled_back => f.error.clone(),
                _ => WireError::new(
                    ErrorKind::RolledBack,
                    format!(
                        "version {version} in slot {from} never reached a healthy state before its boot attempts ran \
                         out; the bootloader fell back to slot {booted} (version {running})"
                    ),
                ),
            };
            let failure = Failure {
                version: version.clone(),
                error: error.clone(),
                rolled_back: true,
            };
            machine.refused.insert(version.clone());
            machine.phase = Phase::RolledBack { version, error };
            return (
                machine,
                vec![Action::AcknowledgeFallback(failure), Action::Report],
            );
        }
        if let Some(pending) = &journal.pending {
            if pending.slot != booted && boot.trial.as_ref().is_some_and(|t| t.slot == pending.slot)
            {
                // Installed and switched, but the reboot never happened.
                machine.phase = Phase::RebootPending {
                    version: pending.version.clone(),
                };
                return (machine, vec![Action::Report, Action::Reboot]);
            }
        }
        if let Some(waiting) = &journal.awaiting_reboot {
            // Only a slot that still holds what was verified, that is not
            // running and that the bootloader would not boot: anything else
            // is a stale record, and the device starts as it is.
            let holds_it = slots
                .get(waiting.slot)
                .is_some_and(|c| c.version == waiting.version);
            if holds_it
                && waiting.slot != booted
                && boot.default_slot != waiting.slot
                && boot.trial.is_none()
                && waiting.version != running
            {
                machine.phase = Phase::AwaitingReboot {
                    version: waiting.version.clone(),
                    rollout_id: waiting.rollout_id,
                };
                return (machine, vec![Action::Report]);
            }
        }
        if let Some(f) = journal
            .last_failure
            .filter(|f| f.rolled_back && f.version != running)
        {
            machine.phase = Phase::RolledBack {
                version: f.version,
                error: f.error,
            };
        }
        (machine, vec![Action::Report])
    }

    pub fn phase(&self) -> &Phase {
        &self.phase
    }

    pub fn running(&self) -> &Version {
        &self.running
    }

    /// The attempt number of the install in progress (or the last one).
    pub fn install_id(&self) -> u64 {
        self.install_id
    }

    pub fn handle(&mut self, event: Event) -> Vec<Action> {
        match (&mut self.phase, event) {
            // Healthy: commit first; anything else waits for the outcome.
            (Phase::Testing { .. }, Event::HealthCheck(Ok(()))) => vec![Action::CommitTrial],
            (Phase::Testing { deferred }, Event::Committed) => {
                let deferred = deferred.take();
                self.phase = Phase::Idle;
                match deferred {
                    Some(offer) => self.consider(offer),
                    None => vec![Action::Report],
                }
            }
            (_, Event::Committed) => vec![],
            (Phase::Testing { .. }, Event::HealthCheck(Err(reason))) => {
                let version = self.running.clone();
                let error = WireError::new(
                    ErrorKind::HealthCheckFailed,
                    format!("version {version} failed its health check after the trial boot: {reason}; rolling back"),
                );
                let failure = Failure {
                    version: version.clone(),
                    error: error.clone(),
                    rolled_back: true,
                };
                self.refused.insert(version.clone());
                self.phase = Phase::RolledBack { version, error };
                vec![
                    Action::AbandonTrial(failure),
                    Action::Report,
                    Action::Reboot,
                ]
            }
            // A trial is committed (or rolled back) before anything else.
            (Phase::Testing { deferred }, Event::Offer(offer)) => {
                *deferred = Some(offer);
                vec![]
            }
            (Phase::Testing { deferred }, Event::NoUpdate) => {
                *deferred = None;
                vec![]
            }
            // The reboot is imminent; the server repeats its offer on reconnect.
            (Phase::RebootPending { .. }, Event::Offer(_) | Event::NoUpdate) => vec![],
            (Phase::Installing { offer: current, .. }, Event::Offer(offer)) => {
                if current.same_release(&offer) {
                    // Only the reboot's hold changed: the install goes on,
                    // and its end follows the newest word.
                    *current = offer;
                    vec![]
                } else {
                    let mut actions = vec![Action::CancelInstall];
                    actions.extend(self.consider(offer));
                    actions
                }
            }
            (Phase::AwaitingReboot { version, .. }, Event::Offer(offer))
                if offer.version == *version =>
            {
                // The same release (from this rollout or a newer one): the
                // verified slot serves it, and the offer says hold or go.
                let version = version.clone();
                self.phase = Phase::AwaitingReboot {
                    version: version.clone(),
                    rollout_id: offer.rollout_id,
                };
                if offer.hold_reboot {
                    vec![]
                } else {
                    vec![self.switch_to(version, offer.rollout_id)]
                }
            }
            (Phase::AwaitingReboot { .. }, Event::Offer(offer)) => {
                // Another version: the verified slot is not it.
                let mut actions = vec![Action::WithdrawVerified];
                actions.extend(self.consider(offer));
                actions
            }
            (Phase::AwaitingReboot { .. }, Event::NoUpdate) => {
                // Withdrawn (an abort): stay on the running OS.
                self.phase = Phase::Idle;
                vec![Action::WithdrawVerified, Action::Report]
            }
            (phase, Event::Offer(offer)) => {
                // Offers arrive only over a live channel: the server is
                // reachable again, so an outage of any length does not keep
                // the device from carrying on.
                if matches!(phase, Phase::Failed { error, .. } if error.kind == ErrorKind::ServerUnreachable)
                {
                    self.failures = None;
                }
                self.consider(offer)
            }
            (Phase::Installing { .. }, Event::NoUpdate) => {
                self.phase = Phase::Idle;
                vec![Action::CancelInstall, Action::Report]
            }
            (Phase::Failed { .. }, Event::NoUpdate) => {
                self.phase = Phase::Idle;
                vec![Action::Report]
            }
            (_, Event::NoUpdate) => vec![],
            (
                Phase::Installing { progress, .. },
                Event::Progress {
                    install,
                    progress: now,
                },
            ) if install == self.install_id => {
                *progress = Some(now);
                vec![Action::Report]
            }
            (Phase::Installing { verifying, .. }, Event::Verifying { install })
                if install == self.install_id =>
            {
                *verifying = true;
                vec![Action::Report]
            }
            (Phase::Installing { offer, .. }, Event::InstallDone { install })
                if install == self.install_id =>
            {
                if offer.hold_reboot {
                    self.phase = Phase::AwaitingReboot {
                        version: offer.version.clone(),
                        rollout_id: offer.rollout_id,
                    };
                    vec![Action::Report]
                } else {
                    let (version, rollout_id) = (offer.version.clone(), offer.rollout_id);
                    vec![self.switch_to(version, rollout_id)]
                }
            }
            (
                Phase::Installing {
                    offer: Offer { version, .. },
                    ..
                }
                | Phase::AwaitingReboot { version, .. },
                Event::TrialStarted,
            ) => {
                self.phase = Phase::RebootPending {
                    version: version.clone(),
                };
                vec![Action::Report, Action::Reboot]
            }
            (Phase::Installing { .. }, Event::TrialFailed(error)) => {
                // The install's commit point failed: like any failed
                // install, and the verified slot is not kept waiting.
                let mut actions = vec![Action::WithdrawVerified];
                actions.extend(self.handle(Event::InstallFailed {
                    install: self.install_id,
                    error,
                }));
                actions
            }
            (
                Phase::AwaitingReboot {
                    version,
                    rollout_id,
                },
                Event::TrialFailed(error),
            ) => {
                // Not retried on a timer (the boot environment fails the same
                // way); a new rollout tries again.
                let version = version.clone();
                self.failures = Some(Failures {
                    rollout_id: *rollout_id,
                    version: version.clone(),
                    budget: Budget::Spent(error.clone()),
                });
                let record = Action::RecordFailure(Failure {
                    version: version.clone(),
                    error: error.clone(),
                    rolled_back: false,
                });
                self.phase = Phase::Failed {
                    target: version,
                    error,
                    retry: None,
                };
                vec![Action::WithdrawVerified, Action::Report, record]
            }
            (_, Event::TrialStarted | Event::TrialFailed(_)) => vec![],
            (Phase::Installing { offer, .. }, Event::InstallFailed { install, error })
                if install == self.install_id =>
            {
                let offer = offer.clone();
                self.install_failed(offer, error)
            }
            (Phase::Failed { retry, .. }, Event::RetryDue) => match retry.take() {
                Some(offer) => self.consider(offer),
                None => vec![],
            },
            (_, Event::RetryDue) => vec![],
            (_, Event::CommitFailed(error)) => {
                self.phase = Phase::Failed {
                    target: self.running.clone(),
                    error,
                    retry: None,
                };
                vec![Action::Report]
            }
            // Late events from a cancelled install, or a health result with no trial.
            (
                _,
                Event::Progress { .. }
                | Event::Verifying { .. }
                | Event::InstallFailed { .. }
                | Event::InstallDone { .. },
            ) => vec![],
            (_, Event::HealthCheck(_)) => vec![],
        }
    }

    /// Failed attempts at `offer`: none unless it is the offer that failed last.
    fn failed_attempts(&self, offer: &Offer) -> u32 {
        match &self.failures {
            Some(f) if f.rollout_id == offer.rollout_id && f.version == offer.version => {
                match f.budget {
                    Budget::Left { failed } => failed,
                    Budget::Spent(_) => MAX_INSTALL_ATTEMPTS,
                }
            }
            _ => 0,
        }
    }

    /// The install of `offer` failed: count it, and retry it after a
    /// backoff while the budget lasts and the failure can heal.
    fn install_failed(&mut self, offer: Offer, error: WireError) -> Vec<Action> {
        let healable = retryable(error.kind);
        // A failure that cannot heal spends the whole budget at once,
        // so a repeated offer neither refetches nor reruns hooks.
        let attempt = if healable {
            self.failed_attempts(&offer) + 1
        } else {
            MAX_INSTALL_ATTEMPTS
        };
        let retry = healable && attempt < MAX_INSTALL_ATTEMPTS;
        let error = if retry {
            WireError::new(
                error.kind,
                format!(
                    "{} (attempt {attempt} of {MAX_INSTALL_ATTEMPTS}; retrying)",
                    error.message
                ),
            )
        } else if healable {
            Self::gave_up(&offer, attempt, &error)
        } else {
            error
        };
        self.failures = Some(Failures {
            rollout_id: offer.rollout_id,
            version: offer.version.clone(),
            budget: if retry {
                Budget::Left { failed: attempt }
            } else {
                Budget::Spent(error.clone())
            },
        });
        let record = Action::RecordFailure(Failure {
            version: offer.version.clone(),
            error: error.clone(),
            rolled_back: false,
        });
        self.phase = Phase::Failed {
            target: offer.version.clone(),
            error,
            retry: retry.then_some(offer),
        };
        if retry {
            vec![Action::Report, record, Action::ScheduleRetry { attempt }]
        } else {
            vec![Action::Report, record]
        }
    }

    /// The go: try `version`, verified in the slot not running, at the
    /// next boot.
    fn switch_to(&self, version: Version, rollout_id: i64) -> Action {
        Action::StartTrial(PendingInstall {
            slot: self.booted.other(),
            version,
            rollout_id,
        })
    }

    fn gave_up(offer: &Offer, attempts: u32, last: &WireError) -> WireError {
        WireError::new(
            last.kind,
            format!(
                "gave up on {} after {attempts} failed attempts; last: {}. Fix the cause, then start a new rollout",
                offer.version,
                last.message
            ),
        )
    }

    /// The patent's comparison: same version, nothing to do; different,
    /// fetch it (unless refused, a downgrade, or out of attempts). Whatever
    /// is decided replaces the phase, and a scheduled retry with it.
    fn consider(&mut self, offer: Offer) -> Vec<Action> {
        if offer.version == self.running {
            self.phase = Phase::Idle;
            return vec![Action::Report];
        }
        let spent = match &self.failures {
            Some(Failures {
                rollout_id,
                version,
                budget: Budget::Spent(error),
            }) if *rollout_id == offer.rollout_id && *version == offer.version => {
                Some(error.clone())
            }
            _ => None,
        };
        if let Some(error) = spent {
            // A repeated offer (e.g. on every reconnect) must not restart a
            // download that already failed its whole budget.
            match &mut self.phase {
                Phase::Failed { target, retry, .. } if *target == offer.version => *retry = None,
                _ => {
                    self.phase = Phase::Failed {
                        target: offer.version,
                        error,
                        retry: None,
                    }
                }
            }
            return vec![Action::Report];
        }
        if self.refused.contains(&offer.version) {
            let error = match &self.phase {
                Phase::RolledBack { version, error } if *version == offer.version => error.clone(),
                _ => WireError::new(
                    ErrorKind::RolledBack,
                    format!(
                        "version {} was rolled back on this device before",
                        offer.version
                    ),
                ),
            };
            let error = WireError::new(
                error.kind,
                format!(
                    "{} (not installing it again automatically; roll out a newer release)",
                    error.message.trim_end_matches([';', ' '])
                ),
            );
            self.phase = Phase::RolledBack {
                version: offer.version,
                error,
            };
            return vec![Action::Report];
        }
        if let Err(refused) = check_downgrade(
            &self.running,
            &offer.version,
            offer.allow_downgrade,
            SignedPermit::NotYetKnown,
        ) {
            self.phase = Phase::Failed {
                target: offer.version,
                error: refused.to_wire(),
                retry: None,
            };
            return vec![Action::Report];
        }
        self.phase = Phase::Installing {
            offer: offer.clone(),
            verifying: false,
            progress: None,
        };
        self.install_id += 1;
        vec![Action::StartInstall(offer), Action::Report]
    }

    pub fn report(&self) -> Report {
        let (state, target_version, progress, error) = match &self.phase {
            Phase::Idle => (AgentState::Idle, None, None, None),
            Phase::Testing { .. } => (AgentState::Testing, Some(self.running.clone()), None, None),
            Phase::Installing {
                offer,
                verifying,
                progress,
            } => (
                if *verifying {
                    AgentState::Verifying
                } else {
                    AgentState::Downloading
                },
                Some(offer.version.clone()),
                *progress,
                None,
            ),
            Phase::RebootPending { version } => {
                (AgentState::RebootPending, Some(version.clone()), None, None)
            }
            Phase::AwaitingReboot { version, .. } => (
                AgentState::AwaitingReboot,
                Some(version.clone()),
                None,
                None,
            ),
            Phase::Failed { target, error, .. } => (
                AgentState::Failed,
                Some(target.clone()),
                None,
                Some(error.clone()),
            ),
            Phase::RolledBack { version, error } => (
                AgentState::RolledBack,
                Some(version.clone()),
                None,
                Some(error.clone()),
            ),
        };
        Report {
            state,
            running_version: self.running.clone(),
            booted_slot: self.booted,
            target_version,
            progress,
            error,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::local::{PendingInstall, SlotContent};
    use uplift_bootenv::state::Trial;

    fn v(s: &str) -> Version {
        s.parse().unwrap()
    }

    fn offer(version: &str) -> Offer {
        Offer {
            rollout_id: 1,
            version: v(version),
            manifest_path: format!("/m/{version}"),
            allow_downgrade: false,
            max_bytes_per_sec: None,
            hold_reboot: false,
            freshness: None,
        }
    }

    /// An offer of `version` that holds the reboot (a reboot window).
    fn held(version: &str) -> Offer {
        Offer {
            hold_reboot: true,
            ..offer(version)
        }
    }

    /// What the go for `version` in rollout `rollout_id` switches to.
    fn verified_in_b(version: &str, rollout_id: i64) -> PendingInstall {
        PendingInstall {
            slot: SlotName::B,
            version: v(version),
            rollout_id,
        }
    }

    /// A device on 1.0 that wrote and verified 1.1 into slot B under a held
    /// offer, waiting for the go.
    fn awaiting_reboot() -> Machine {
        let (mut m, _) = Machine::start(factory_facts());
        m.handle(Event::Offer(held("1.1")));
        assert_eq!(
            m.handle(Event::InstallDone {
                install: m.install_id()
            }),
            vec![Action::Report],
            "no switch and no reboot without the go"
        );
        m
    }

    fn content(version: &str) -> Option<SlotContent> {
        Some(SlotContent {
            version: v(version),
            image_sha256: "00".into(),
        })
    }

    /// A device on slot A running 1.0 from the factory, nothing pending.
    fn factory_facts() -> BootFacts {
        BootFacts {
            booted: SlotName::A,
            boot: BootState::new(SlotName::A),
            slots: SlotTable::default(),
            journal: Journal::default(),
            factory_version: v("1.0"),
        }
    }

    /// Booted slot B on trial holding 1.1, after installing it from 1.0 on A.
    fn trial_boot_facts() -> BootFacts {
        let mut boot = BootState::new(SlotName::A);
        boot.trial = Some(Trial {
            slot: SlotName::B,
            tries_left: 0,
        });
        BootFacts {
            booted: SlotName::B,
            boot,
            slots: SlotTable {
                a: content("1.0"),
                b: content("1.1"),
            },
            journal: Journal {
                pending: Some(PendingInstall {
                    slot: SlotName::B,
                    version: v("1.1"),
                    rollout_id: 1,
                }),
                ..Journal::default()
            },
            factory_version: v("1.0"),
        }
    }

    #[test]
    fn the_same_version_offered_does_nothing() {
        let (mut m, _) = Machine::start(factory_facts());
        assert_eq!(m.handle(Event::Offer(offer("1.0"))), vec![Action::Report]);
        assert_eq!(m.report().state, AgentState::Idle);
    }

    #[test]
    fn a_different_version_is_requested_and_installed_then_reboots() {
        let (mut m, actions) = Machine::start(factory_facts());
        assert_eq!(actions, vec![Action::Report]);
        assert_eq!(
            m.handle(Event::Offer(offer("1.1"))),
            vec![Action::StartInstall(offer("1.1")), Action::Report]
        );
        assert_eq!(m.report().state, AgentState::Downloading);
        assert_eq!(m.report().target_version, Some(v("1.1")));
        m.handle(Event::Progress {
            install: m.install_id(),
            progress: Progress {
                done_bytes: 5,
                total_bytes: 10,
                fetched_bytes: 5,
            },
        });
        assert_eq!(m.report().progress.unwrap().done_bytes, 5);
        m.handle(Event::Verifying {
            install: m.install_id(),
        });
        assert_eq!(m.report().state, AgentState::Verifying);
        assert_eq!(
            m.handle(Event::InstallDone {
                install: m.install_id()
            }),
            vec![Action::StartTrial(verified_in_b("1.1", 1))],
            "an offer that does not hold the reboot switches at once"
        );
        assert_eq!(
            m.handle(Event::TrialStarted),
            vec![Action::Report, Action::Reboot]
        );
        assert_eq!(m.report().state, AgentState::RebootPending);
        assert_eq!(
            m.running(),
            &v("1.0"),
            "still running the old version until the reboot"
        );
    }

    #[test]
    fn a_held_offer_is_installed_and_verified_then_waits_for_the_go() {
        let mut m = awaiting_reboot();
        let report = m.report();
        assert_eq!(
            (report.state, report.running_version, report.target_version),
            (AgentState::AwaitingReboot, v("1.0"), Some(v("1.1")))
        );
        assert_eq!(
            m.handle(Event::Offer(held("1.1"))),
            vec![],
            "the same hold again (a reconnect) changes nothing"
        );
        assert_eq!(m.handle(Event::RetryDue), vec![]);
        assert_eq!(
            m.handle(Event::Offer(offer("1.1"))),
            vec![Action::StartTrial(verified_in_b("1.1", 1))],
            "the go"
        );
        assert_eq!(
            m.handle(Event::TrialStarted),
            vec![Action::Report, Action::Reboot]
        );
        assert_eq!(m.report().state, AgentState::RebootPending);
    }

    #[test]
    fn a_go_or_a_hold_that_arrives_during_the_download_is_followed_at_its_end() {
        let (mut m, _) = Machine::start(factory_facts());
        m.handle(Event::Offer(held("1.1")));
        let install = m.install_id();
        assert_eq!(
            m.handle(Event::Offer(offer("1.1"))),
            vec![],
            "not a new offer: the download goes on"
        );
        assert_eq!(m.install_id(), install);
        assert_eq!(
            m.handle(Event::InstallDone { install }),
            vec![Action::StartTrial(verified_in_b("1.1", 1))]
        );

        let (mut m, _) = Machine::start(factory_facts());
        m.handle(Event::Offer(offer("1.1")));
        assert_eq!(m.handle(Event::Offer(held("1.1"))), vec![]);
        assert_eq!(
            m.handle(Event::InstallDone {
                install: m.install_id()
            }),
            vec![Action::Report]
        );
        assert_eq!(m.report().state, AgentState::AwaitingReboot);
    }

    #[test]
    fn withdrawn_while_awaiting_its_reboot_the_device_drops_the_slot_and_stays_on_its_os() {
        let mut m = awaiting_reboot();
        assert_eq!(
            m.handle(Event::NoUpdate),
            vec![Action::WithdrawVerified, Action::Report]
        );
        let report = m.report();
        assert_eq!(
            (report.state, report.running_version, report.target_version),
            (AgentState::Idle, v("1.0"), None)
        );
        assert_eq!(
            m.handle(Event::Offer(offer("1.1"))),
            vec![Action::StartInstall(offer("1.1")), Action::Report],
            "offered again later, it is installed (and checked) again, never switched to unseen"
        );
    }

    #[test]
    fn another_release_offered_while_awaiting_the_reboot_replaces_the_verified_slot() {
        let mut m = awaiting_reboot();
        let newer = Offer {
            rollout_id: 2,
            ..held("1.2")
        };
        assert_eq!(
            m.handle(Event::Offer(newer.clone())),
            vec![
                Action::WithdrawVerified,
                Action::StartInstall(newer),
                Action::Report
            ]
        );
        // A rollout back to the running version withdraws it and idles.
        let mut m = awaiting_reboot();
        assert_eq!(
            m.handle(Event::Offer(offer("1.0"))),
            vec![Action::WithdrawVerified, Action::Report]
        );
        assert_eq!(m.report().state, AgentState::Idle);
    }

    #[test]
    fn a_newer_rollout_of_the_same_release_keeps_the_verified_slot() {
        let mut m = awaiting_reboot();
        let newer = |hold_reboot| Offer {
            rollout_id: 2,
            hold_reboot,
            ..offer("1.1")
        };
        assert_eq!(m.handle(Event::Offer(newer(true))), vec![]);
        assert_eq!(m.report().state, AgentState::AwaitingReboot);
        assert_eq!(
            m.handle(Event::Offer(newer(false))),
            vec![Action::StartTrial(verified_in_b("1.1", 2))]
        );
    }

    #[test]
    fn a_restart_while_awaiting_the_reboot_keeps_waiting_and_never_switches_without_the_go() {
        let mut facts = factory_facts();
        facts.slots.b = content("1.1");
        facts.journal.awaiting_reboot = Some(verified_in_b("1.1", 1));
        let (mut m, actions) = Machine::start(facts.clone());
        assert_eq!(actions, vec![Action::Report], "no switch, no reboot");
        let report = m.report();
        assert_eq!(
            (report.state, report.running_version, report.booted_slot),
            (AgentState::AwaitingReboot, v("1.0"), SlotName::A)
        );
        assert_eq!(m.handle(Event::Offer(held("1.1"))), vec![]);
        assert_eq!(
            m.handle(Event::Offer(offer("1.1"))),
            vec![Action::StartTrial(verified_in_b("1.1", 1))]
        );

        // Killed after the journal named the pending install but before
        // the boot environment switched: still waiting, not rebooting.
        let mut crashed = facts.clone();
        crashed.journal.pending = Some(verified_in_b("1.1", 1));
        let (m, actions) = Machine::start(crashed);
        assert_eq!(
            (actions, m.report().state),
            (vec![Action::Report], AgentState::AwaitingReboot)
        );
        // Killed after the switch: the trial wins, the device reboots.
        let mut switched = facts.clone();
        switched.journal.pending = Some(verified_in_b("1.1", 1));
        switched.boot = switched.boot.start_trial(SlotName::B, 3).unwrap();
        let (_, actions) = Machine::start(switched);
        assert_eq!(actions, vec![Action::Report, Action::Reboot]);

        // A stale record (the slot was since marked as being rewritten) is
        // no reason to wait.
        let mut stale = facts;
        stale.slots.b = None;
        let (m, _) = Machine::start(stale);
        assert_eq!(m.report().state, AgentState::Idle);
    }

    #[test]
    fn a_switch_that_fails_drops_the_verified_slot_and_is_not_retried_by_itself() {
        let mut m = awaiting_reboot();
        m.handle(Event::Offer(offer("1.1")));
        let error = WireError::new(ErrorKind::BootEnv, "read-only /boot");
        let actions = m.handle(Event::TrialFailed(error.clone()));
        assert!(
            matches!(&actions[..], [Action::WithdrawVerified, Action::Report, Action::RecordFailure(f)]
                if f.error == error && !f.rolled_back),
            "{actions:?}"
        );
        assert_eq!(m.report().state, AgentState::Failed);
        assert_eq!(
            m.handle(Event::Offer(offer("1.1"))),
            vec![Action::Report],
            "a repeated offer does not loop on a broken boot environment"
        );
        // The same at the end of an install that was not held.
        let (mut m, _) = Machine::start(factory_facts());
        m.handle(Event::Offer(offer("1.1")));
        m.handle(Event::InstallDone {
            install: m.install_id(),
        });
        let actions = m.handle(Event::TrialFailed(error));
        assert!(
            matches!(
                &actions[..],
                [
                    Action::WithdrawVerified,
                    Action::Report,
                    Action::RecordFailure(_)
                ]
            ),
            "{actions:?}"
        );
        assert_eq!(m.report().state, AgentState::Failed);
    }

    #[test]
    fn a_failed_install_is_reported_with_its_error_and_keeps_the_running_version() {
        let (mut m, _) = Machine::start(factory_facts());
        m.handle(Event::Offer(offer("1.1")));
        let err = WireError::new(ErrorKind::ChunkHashMismatch, "chunk x");
        assert_eq!(
            m.handle(Event::InstallFailed {
                install: m.install_id(),
                error: err.clone()
            }),
            vec![
                Action::Report,
                Action::RecordFailure(Failure {
                    version: v("1.1"),
                    error: WireError::new(
                        ErrorKind::ChunkHashMismatch,
                        "chunk x (attempt 1 of 3; retrying)"
                    ),
                    rolled_back: false,
                }),
                Action::ScheduleRetry { attempt: 1 }
            ]
        );
        let report = m.report();
        assert_eq!(report.state, AgentState::Failed);
        let reported = report.error.unwrap();
        assert_eq!(reported.kind, ErrorKind::ChunkHashMismatch);
        assert!(
            reported.message.starts_with("chunk x"),
            "{}",
            reported.message
        );
        assert_eq!(report.running_version, v("1.0"));
    }

    #[test]
    fn a_download_failure_is_retried_with_backoff_then_given_up_after_the_budget() {
        let (mut m, _) = Machine::start(factory_facts());
        m.handle(Event::Offer(offer("1.1")));
        let failure = WireError::new(ErrorKind::DownloadFailed, "server unreachable");
        for attempt in 1..MAX_INSTALL_ATTEMPTS {
            let actions = m.handle(Event::InstallFailed {
                install: m.install_id(),
                error: failure.clone(),
            });
            assert_eq!(
                (actions[0].clone(), actions[2].clone(), actions.len()),
                (Action::Report, Action::ScheduleRetry { attempt }, 3)
            );
            assert!(matches!(&actions[1], Action::RecordFailure(f) if f.version == v("1.1")));
            assert!(m.report().error.unwrap().message.contains("retrying"));
            assert_eq!(
                m.handle(Event::RetryDue),
                vec![Action::StartInstall(offer("1.1")), Action::Report]
            );
        }
        let actions = m.handle(Event::InstallFailed {
            install: m.install_id(),
            error: failure,
        });
        assert!(
            matches!(&actions[..], [Action::Report, Action::RecordFailure(f)]
                if f.error.message.contains("gave up on 1.1") && !f.rolled_back),
            "budget spent: no more retries, and the device remembers why: {actions:?}"
        );
        let report = m.report();
        assert_eq!(report.state, AgentState::Failed);
        assert!(report
            .error
            .unwrap()
            .message
            .contains("gave up on 1.1 after 3 failed attempts"));
        assert_eq!(
            m.handle(Event::Offer(offer("1.1"))),
            vec![Action::Report],
            "a repeated offer does not restart it"
        );
        let next_rollout = Offer {
            rollout_id: 2,
            ..offer("1.1")
        };
        assert_eq!(
            m.handle(Event::Offer(next_rollout.clone())),
            vec![Action::StartInstall(next_rollout), Action::Report],
            "a new rollout gets a fresh budget"
        );
    }

    #[test]
    fn a_failure_that_cannot_heal_is_not_tried_again_on_a_repeated_offer() {
        let (mut m, _) = Machine::start(factory_facts());
        m.handle(Event::Offer(offer("1.1")));
        let bad = WireError::new(ErrorKind::ManifestSignature, "unknown key");
        m.handle(Event::InstallFailed {
            install: m.install_id(),
            error: bad.clone(),
        });
        m.handle(Event::NoUpdate);
        assert_eq!(m.report().state, AgentState::Idle);
        assert_eq!(
            m.handle(Event::Offer(offer("1.1"))),
            vec![Action::Report],
            "no refetch, no hooks rerun"
        );
        assert_eq!(
            m.report().error,
            Some(bad),
            "the real reason is reported again"
        );
    }

    #[test]
    fn after_an_outage_that_spent_the_budget_the_next_offer_carries_on() {
        let (mut m, _) = Machine::start(factory_facts());
        m.handle(Event::Offer(offer("1.1")));
        let outage = WireError::new(ErrorKind::ServerUnreachable, "no connection");
        for _ in 1..MAX_INSTALL_ATTEMPTS {
            m.handle(Event::InstallFailed {
                install: m.install_id(),
                error: outage.clone(),
            });
            m.handle(Event::RetryDue);
        }
        assert!(!m
            .handle(Event::InstallFailed {
                install: m.install_id(),
                error: outage
            })
            .iter()
            .any(|a| matches!(a, Action::ScheduleRetry { .. })));
        assert_eq!(
            m.handle(Event::RetryDue),
            vec![],
            "no retry loop while offline"
        );
        assert_eq!(
            m.handle(Event::Offer(offer("1.1"))),
            vec![Action::StartInstall(offer("1.1")), Action::Report],
            "the server is back: the upgrade carries on"
        );
    }

    #[test]
    fn a_server_that_answers_but_cannot_serve_does_not_renew_the_budget() {
        let (mut m, _) = Machine::start(factory_facts());
        m.handle(Event::Offer(offer("1.1")));
        let missing = WireError::new(ErrorKind::DownloadFailed, "404");
        for _ in 1..MAX_INSTALL_ATTEMPTS {
            m.handle(Event::InstallFailed {
                install: m.install_id(),
                error: missing.clone(),
            });
            m.handle(Event::RetryDue);
        }
        m.handle(Event::InstallFailed {
            install: m.install_id(),
            error: missing,
        });
        assert_eq!(
            m.handle(Event::Offer(offer("1.1"))),
            vec![Action::Report],
            "still given up"
        );
    }

    #[test]
    fn a_failure_that_cannot_heal_is_not_retried() {
        let (mut m, _) = Machine::start(factory_facts());
        m.handle(Event::Offer(offer("1.1")));
        let failure = WireError::new(ErrorKind::ManifestSignature, "unknown key");
        assert_eq!(
            m.handle(Event::InstallFailed {
                install: m.install_id(),
                error: failure.clone()
            }),
            vec![
                Action::Report,
                Action::RecordFailure(Failure {
                    version: v("1.1"),
                    error: failure.clone(),
                    rolled_back: false,
                })
            ]
        );
        assert_eq!(m.report().error, Some(failure));
    }

    #[test]
    fn a_downgrade_is_refused_unless_the_rollout_allows_it() {
        let (mut m, _) = Machine::start(factory_facts());
        assert_eq!(m.handle(Event::Offer(offer("0.9"))), vec![Action::Report]);
        assert_eq!(m.report().error.unwrap().kind, ErrorKind::DowngradeRefused);
        let allowed = Offer {
            allow_downgrade: true,
            ..offer("0.9")
        };
        assert_eq!(
            m.handle(Event::Offer(allowed.clone())),
            vec![Action::StartInstall(allowed), Action::Report]
        );
    }

    /// Fails the install under way with a failure that can heal.
    fn fail(m: &mut Machine) -> Vec<Action> {
        m.handle(Event::InstallFailed {
            install: m.install_id(),
            error: WireError::new(ErrorKind::DownloadFailed, "connection reset"),
        })
    }

    fn retries(actions: &[Action]) -> Option<u32> {
        actions.iter().find_map(|a| match a {
            Action::ScheduleRetry { attempt } => Some(*attempt),
            _ => None,
        })
    }

    #[test]
    fn an_attempt_count_does_not_carry_into_another_offer() {
        let (mut m, _) = Machine::start(factory_facts());
        m.handle(Event::Offer(offer("1.1")));
        assert_eq!(retries(&fail(&mut m)), Some(1));
        let next_rollout = Offer {
            rollout_id: 2,
            ..offer("1.1")
        };
        m.handle(Event::Offer(next_rollout));
        assert_eq!(
            retries(&fail(&mut m)),
            Some(1),
            "a new rollout of the same version counts from the start"
        );
        m.handle(Event::Offer(offer("1.2")));
        assert_eq!(retries(&fail(&mut m)), Some(1), "so does another version");
    }

    #[test]
    fn a_repeated_offer_during_the_backoff_installs_at_once_and_keeps_counting() {
        let (mut m, _) = Machine::start(factory_facts());
        m.handle(Event::Offer(offer("1.1")));
        fail(&mut m);
        assert_eq!(
            m.handle(Event::Offer(offer("1.1"))),
            vec![Action::StartInstall(offer("1.1")), Action::Report],
            "a reconnect repeats the offer: no need to wait for the timer"
        );
        assert_eq!(retries(&fail(&mut m)), Some(2));
    }

    #[test]
    fn a_scheduled_retry_ends_with_its_phase() {
        let (mut m, _) = Machine::start(factory_facts());
        m.handle(Event::Offer(offer("1.1")));
        fail(&mut m);
        assert!(matches!(m.phase(), Phase::Failed { retry: Some(o), .. } if *o == offer("1.1")));
        m.handle(Event::Offer(offer("1.2")));
        assert_eq!(
            m.handle(Event::RetryDue),
            vec![],
            "the timer of the replaced offer does not restart it"
        );
        assert_eq!(m.report().target_version, Some(v("1.2")));

        let (mut m, _) = Machine::start(factory_facts());
        m.handle(Event::Offer(offer("1.1")));
        fail(&mut m);
        m.handle(Event::NoUpdate);
        assert_eq!(m.handle(Event::RetryDue), vec![], "withdrawn: no retry");
        assert_eq!(m.report().state, AgentState::Idle);
    }

    #[test]
    fn a_device_kept_waiting_for_a_download_turn_carries_its_count_on() {
        // Under a download limit the server answers a retry that has no
        // turn with "no update", and offers again when one is free.
        let (mut m, _) = Machine::start(factory_facts());
        m.handle(Event::Offer(offer("1.1")));
        for attempt in 1..MAX_INSTALL_ATTEMPTS {
            assert_eq!(retries(&fail(&mut m)), Some(attempt));
            m.handle(Event::RetryDue);
            assert_eq!(
                m.handle(Event::NoUpdate),
                vec![Action::CancelInstall, Action::Report]
            );
            assert_eq!(
                m.handle(Event::Offer(offer("1.1"))),
                vec![Action::StartInstall(offer("1.1")), Action::Report]
            );
        }
        assert_eq!(retries(&fail(&mut m)), None, "the budget is spent");
        m.handle(Event::NoUpdate);
        assert_eq!(m.handle(Event::Offer(offer("1.1"))), vec![Action::Report]);
    }

    #[test]
    fn after_an_outage_a_partial_count_starts_again() {
        let (mut m, _) = Machine::start(factory_facts());
        m.handle(Event::Offer(offer("1.1")));
        m.handle(Event::InstallFailed {
            install: m.install_id(),
            error: WireError::new(ErrorKind::ServerUnreachable, "no connection"),
        });
        m.handle(Event::Offer(offer("1.1")));
        assert_eq!(retries(&fail(&mut m)), Some(1));
    }

    #[test]
    fn progress_belongs_to_one_attempt() {
        let (mut m, _) = Machine::start(factory_facts());
        m.handle(Event::Offer(offer("1.1")));
        m.handle(Event::Progress {
            install: m.install_id(),
            progress: Progress {
                done_bytes: 5,
                total_bytes: 10,
                fetched_bytes: 5,
            },
        });
        assert_eq!(
            m.handle(Event::Offer(held("1.1"))),
            vec![],
            "the same release: the attempt and its progress go on"
        );
        assert_eq!(m.report().progress.map(|p| p.done_bytes), Some(5));
        fail(&mut m);
        assert_eq!(m.report().progress, None, "not shown for a failed attempt");
        m.handle(Event::RetryDue);
        assert_eq!(m.report().state, AgentState::Downloading);
        assert_eq!(m.report().progress, None, "the next attempt starts afresh");
    }

    #[test]
    fn the_deferred_offer_lives_in_the_trial_and_goes_with_it() {
        let (mut m, _) = Machine::start(trial_boot_facts());
        m.handle(Event::Offer(offer("1.2")));
        assert_eq!(
            m.phase(),
            &Phase::Testing {
                deferred: Some(offer("1.2"))
            }
        );
        m.handle(Event::NoUpdate);
        assert_eq!(m.phase(), &Phase::Testing { deferred: None });
        m.handle(Event::HealthCheck(Ok(())));
        assert_eq!(
            m.handle(Event::Committed),
            vec![Action::Report],
            "withdrawn during the trial: nothing to install after the commit"
        );

        let (mut m, _) = Machine::start(trial_boot_facts());
        m.handle(Event::Offer(offer("1.2")));
        m.handle(Event::HealthCheck(Err("exit status 1".into())));
        assert!(matches!(m.phase(), Phase::RolledBack { .. }));
        assert_eq!(
            m.handle(Event::Committed),
            vec![],
            "a rolled-back trial never takes up its deferred offer"
        );
    }

    #[test]
    fn the_downgrade_rule_needs_the_rollouts_and_the_release_keys_word() {
        let signed = |up_to: Option<&str>| -> Option<Version> { up_to.map(v) };
        let check = |running: &str, target: &str, requested: bool, up_to: Option<&str>| {
            let up_to = signed(up_to);
            check_downgrade(
                &v(running),
                &v(target),
                requested,
                SignedPermit::MayReplaceUpTo(up_to.as_ref()),
            )
        };
        // The same or newer always passes, whatever anyone signed.
        assert_eq!(check("1.0", "1.0", false, None), Ok(()));
        assert_eq!(check("1.0", "1.1", false, None), Ok(()));
        // Both words: the rollout asks, the release may replace 1.0.
        assert_eq!(check("1.0", "0.9", true, Some("1.0")), Ok(()));
        assert_eq!(check("1.0", "0.9", true, Some("2.0")), Ok(()));
        // Before the manifest is known, the rollout's word is checked alone.
        assert_eq!(
            check_downgrade(&v("1.0"), &v("0.9"), true, SignedPermit::NotYetKnown),
            Ok(())
        );

        let refused = check("1.0", "0.9", false, Some("2.0")).unwrap_err();
        let wire = refused.to_wire();
        assert_eq!(wire.kind, ErrorKind::DowngradeRefused);
        assert_eq!(
            wire.message,
            "refusing to downgrade from 1.0 to 0.9; start the rollout with --allow-downgrade if intended"
        );
        // The server's word alone: the release key never allowed it.
        let refused = check("1.0", "0.9", true, None).unwrap_err();
        assert_eq!(refused.to_wire().kind, ErrorKind::DowngradeRefused);
        assert_eq!(
            refused.to_string(),
            "refusing to downgrade from 1.0 to 0.9: the release key did not sign 0.9 as allowed to \
             replace 1.0 (it allows no downgrade); only a release made with `uplift release create \
             --may-replace-up-to 1.0` (or newer) may downgrade this device, whatever the server offers"
        );
        // Signed for older versions than the device runs.
        let refused = check("1.5", "0.9", true, Some("1.2")).unwrap_err();
        assert!(
            refused
                .to_string()
                .contains("(it may replace versions up to 1.2)"),
            "{refused}"
        );
    }

    #[test]
    fn a_new_offer_during_an_install_cancels_it_and_a_repeat_is_ignored() {
        let (mut m, _) = Machine::start(factory_facts());
        m.handle(Event::Offer(offer("1.1")));
        assert_eq!(m.handle(Event::Offer(offer("1.1"))), vec![]);
        assert_eq!(
            m.handle(Event::Offer(offer("1.2"))),
            vec![
                Action::CancelInstall,
                Action::StartInstall(offer("1.2")),
                Action::Report
            ]
        );
        assert_eq!(
            m.handle(Event::NoUpdate),
            vec![Action::CancelInstall, Action::Report]
        );
        assert_eq!(m.report().state, AgentState::Idle);
    }

    #[test]
    fn booting_the_trial_slot_runs_the_health_check_and_commits_on_success() {
        let (mut m, actions) = Machine::start(trial_boot_facts());
        assert_eq!(actions, vec![Action::Report, Action::RunHealthCheck]);
        assert_eq!(m.report().state, AgentState::Testing);
        assert_eq!(m.running(), &v("1.1"));
        assert_eq!(
            m.handle(Event::Offer(offer("1.1"))),
            vec![],
            "no decisions while testing"
        );
        assert_eq!(
            m.handle(Event::HealthCheck(Ok(()))),
            vec![Action::CommitTrial]
        );
        assert_eq!(
            m.report().state,
            AgentState::Testing,
            "not idle before the commit is written"
        );
        assert_eq!(m.handle(Event::Committed), vec![Action::Report]);
        assert_eq!(m.report().state, AgentState::Idle);
        assert_eq!(m.report().running_version, v("1.1"));
    }

    #[test]
    fn an_offer_that_arrives_during_the_trial_is_acted_on_after_the_commit() {
        let (mut m, _) = Machine::start(trial_boot_facts());
        assert_eq!(m.handle(Event::Offer(offer("1.2"))), vec![]);
        assert_eq!(
            m.handle(Event::HealthCheck(Ok(()))),
            vec![Action::CommitTrial],
            "the commit comes first"
        );
        assert_eq!(
            m.handle(Event::Committed),
            vec![Action::StartInstall(offer("1.2")), Action::Report]
        );
    }

    #[test]
    fn a_failed_commit_does_not_start_the_deferred_install() {
        let (mut m, _) = Machine::start(trial_boot_facts());
        m.handle(Event::Offer(offer("1.2")));
        m.handle(Event::HealthCheck(Ok(())));
        let error = WireError::new(ErrorKind::BootEnv, "read-only /boot");
        assert_eq!(m.handle(Event::CommitFailed(error)), vec![Action::Report]);
        assert_eq!(m.report().state, AgentState::Failed);
    }

    #[test]
    fn late_events_of_a_cancelled_install_are_ignored() {
        let (mut m, _) = Machine::start(factory_facts());
        m.handle(Event::Offer(offer("1.1")));
        let old = m.install_id();
        m.handle(Event::Offer(offer("1.2")));
        assert_ne!(m.install_id(), old);
        assert_eq!(
            m.handle(Event::InstallDone { install: old }),
            vec![],
            "no reboot for a version not on disk"
        );
        let error = WireError::new(ErrorKind::DownloadFailed, "cancelled");
        assert_eq!(
            m.handle(Event::InstallFailed {
                install: old,
                error
            }),
            vec![],
            "no budget spent"
        );
        assert_eq!(m.report().state, AgentState::Downloading);
        assert_eq!(m.report().target_version, Some(v("1.2")));
    }

    #[test]
    fn every_rolled_back_release_is_remembered_not_just_the_last() {
        let mut facts = factory_facts();
        facts.journal.rolled_back = vec![v("1.1"), v("1.2")];
        let (mut m, _) = Machine::start(facts);
        for refused in ["1.1", "1.2"] {
            assert_eq!(m.handle(Event::Offer(offer(refused))), vec![Action::Report]);
            assert_eq!(m.report().state, AgentState::RolledBack);
        }
        assert_eq!(
            m.handle(Event::Offer(offer("1.3"))),
            vec![Action::StartInstall(offer("1.3")), Action::Report]
        );
    }

    #[test]
    fn a_failed_health_check_abandons_the_trial_and_reboots_into_the_old_slot() {
        let (mut m, _) = Machine::start(trial_boot_facts());
        let actions = m.handle(Event::HealthCheck(Err("exit status 3".into())));
        let [Action::AbandonTrial(failure), Action::Report, Action::Reboot] = actions.as_slice()
        else {
            panic!("unexpected actions {actions:?}")
        };
        assert_eq!(failure.version, v("1.1"));
        assert_eq!(failure.error.kind, ErrorKind::HealthCheckFailed);
        assert!(failure.error.message.contains("exit status 3"));
        assert_eq!(m.report().state, AgentState::RolledBack);
    }

    #[test]
    fn after_a_fallback_the_rollback_is_reported_and_the_release_is_not_retried() {
        let mut facts = trial_boot_facts();
        facts.booted = SlotName::A;
        facts.boot = BootState {
            default_slot: SlotName::A,
            trial: None,
            fallback_from: Some(SlotName::B),
        };
        let (mut m, actions) = Machine::start(facts);
        let [Action::AcknowledgeFallback(failure), Action::Report] = actions.as_slice() else {
            panic!("unexpected actions {actions:?}")
        };
        assert_eq!(failure.version, v("1.1"));
        assert!(
            failure.error.message.contains("fell back to slot a"),
            "{}",
            failure.error.message
        );
        let report = m.report();
        assert_eq!(
            (report.state, report.running_version.clone()),
            (AgentState::RolledBack, v("1.0"))
        );
        assert_eq!(
            m.handle(Event::Offer(offer("1.1"))),
            vec![Action::Report],
            "not installed again"
        );
        assert_eq!(m.report().state, AgentState::RolledBack);
        assert_eq!(
            m.handle(Event::Offer(offer("1.2"))),
            vec![Action::StartInstall(offer("1.2")), Action::Report]
        );
    }

    #[test]
    fn a_health_check_failure_reason_survives_the_reboot() {
        let mut facts = trial_boot_facts();
        facts.booted = SlotName::A;
        facts.boot = BootState {
            default_slot: SlotName::A,
            trial: None,
            fallback_from: Some(SlotName::B),
        };
        let reason = WireError::new(
            ErrorKind::HealthCheckFailed,
            "version 1.1 failed its health check: exit 3",
        );
        facts.journal.last_failure = Some(Failure {
            version: v("1.1"),
            error: reason.clone(),
            rolled_back: true,
        });
        let (m, _) = Machine::start(facts);
        assert_eq!(m.report().error, Some(reason));
    }

    #[test]
    fn an_install_switched_but_not_rebooted_reboots_again_after_a_restart() {
        let mut facts = trial_boot_facts();
        facts.booted = SlotName::A;
        facts.boot.trial = Some(Trial {
            slot: SlotName::B,
            tries_left: 1,
        });
        let (m, actions) = Machine::start(facts);
        assert_eq!(actions, vec![Action::Report, Action::Reboot]);
        assert_eq!(m.report().state, AgentState::RebootPending);
        assert_eq!(m.report().running_version, v("1.0"));
    }
}
