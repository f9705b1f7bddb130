//! The trial guard: a deadline on a trial boot that does not depend on the
//! agent. A new OS in which the agent crash-loops, hangs or never starts
//! would otherwise stay on its trial slot for ever, neither committed nor
//! rolled back, because a hardware watchdog fed by systemd only catches a
//! hung kernel. Started early by its own unit (`deploy/uplift-trial-guard.service`),
//! it reboots the device if the booted slot is still on trial when the
//! deadline passes; that boot has spent its try, and once the tries are
//! spent the bootloader falls back to the committed slot.

use crate::config::AgentConfig;
use crate::run::{read_booted_slot, Exit};
use anyhow::Context;
use std::time::Duration;
use uplift_bootenv::state::BootState;
use uplift_proto::SlotName;

/// What the guard does on one look at the boot environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The booted slot is not (or no longer) on trial: nothing to guard.
    Done,
    /// Still on trial, time left.
    Wait,
    /// Still on trial and the deadline has passed.
    Reboot,
}

/// Pure decision, from the booted slot, the boot state and the time spent.
pub fn judge(
    booted: SlotName,
    state: &BootState,
    elapsed: Duration,
    deadline: Duration,
) -> Verdict {
    let on_trial = state.trial.as_ref().is_some_and(|t| t.slot == booted);
    match (on_trial, elapsed >= deadline) {
        (false, _) => Verdict::Done,
        (true, false) => Verdict::Wait,
        (true, true) => Verdict::Reboot,
    }
}

const LOOK_EVERY: Duration = Duration::from_secs(1);

/// Watches the boot environment until the booted slot is committed or
/// abandoned (returns [`Exit::Stopped`]) or the deadline passes (reboots as
/// `[reboot]` says).
pub async fn run(config: &AgentConfig) -> anyhow::Result<Exit> {
    let booted = read_booted_slot(&config.boot.cmdline)?;
    let bootenv = config.boot.env.clone();
    let deadline = Duration::from_secs(config.trial_deadline_secs);
    if matches!(config.reboot, crate::config::Reboot::Exit) {
        tracing::warn!(
            "[reboot] mode = \"exit\": at the deadline the guard exits with code {} and a supervisor must reboot",
            uplift_bootenv::REBOOT_REQUEST_EXIT_CODE
        );
    }
    let started = tokio::time::Instant::now();
    loop {
        // A boot environment that cannot be read is no reason to reboot a
        // device that may be fine: say so, and look again.
        let state = {
            let bootenv = bootenv.clone();
            tokio::task::spawn_blocking(move || bootenv.load_state())
                .await
                .context("reading the boot environment")?
        };
        match state {
            Ok((_, state)) => match judge(booted, &state, started.elapsed(), deadline) {
                Verdict::Done => {
                    tracing::info!(slot = %booted, "slot {booted} is not on trial; nothing to guard");
                    return Ok(Exit::Stopped);
                }
                Verdict::Wait => {}
                Verdict::Reboot => {
                    tracing::error!(
                        slot = %booted,
                        "slot {booted} is still on trial {} s after the trial guard started: the new OS did not become healthy \
                         (is uplift-agent running?); rebooting so the bootloader spends a try and falls back \
                         when they run out",
                        deadline.as_secs()
                    );
                    return crate::run::reboot(config).await;
                }
            },
            Err(e) => tracing::warn!("cannot read the boot environment: {e}; trying again"),
        }
        tokio::time::sleep(LOOK_EVERY).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use SlotName::{A, B};

    const DEADLINE: Duration = Duration::from_secs(600);

    #[test]
    fn a_committed_boot_needs_no_guard() {
        assert_eq!(
            judge(A, &BootState::new(A), DEADLINE * 2, DEADLINE),
            Verdict::Done
        );
    }

    #[test]
    fn a_trial_boot_is_watched_until_its_deadline_then_rebooted() {
        let trial = BootState::new(A).start_trial(B, 3).unwrap();
        assert_eq!(
            judge(B, &trial, Duration::from_secs(599), DEADLINE),
            Verdict::Wait
        );
        assert_eq!(judge(B, &trial, DEADLINE, DEADLINE), Verdict::Reboot);
    }

    #[test]
    fn a_commit_or_an_abandoned_trial_ends_the_watch() {
        let trial = BootState::new(A).start_trial(B, 3).unwrap();
        let committed = trial.commit(B).unwrap();
        assert_eq!(judge(B, &committed, DEADLINE, DEADLINE), Verdict::Done);
        let abandoned = trial.abandon_trial();
        assert_eq!(judge(B, &abandoned, DEADLINE, DEADLINE), Verdict::Done);
    }

    #[test]
    fn the_committed_slot_is_not_guarded_while_another_is_on_trial() {
        // Booted a after the trial of b was set but before the reboot.
        let trial = BootState::new(A).start_trial(B, 3).unwrap();
        assert_eq!(judge(A, &trial, DEADLINE, DEADLINE), Verdict::Done);
    }
}
