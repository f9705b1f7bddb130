//! `uplift rollout status --watch`: a rollout live, with one progress bar
//! per phase for a phased rollout (one for the whole rollout otherwise),
//! until no device is pending or in progress, an operator must act, or all
//! that is left waits for a reboot window.

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use std::time::Duration;
use uplift_client::AdminClient;
use uplift_proto::api::{RolloutProgress, RolloutStatus, RolloutView};

/// A busy or restarting server may fail a poll now and then; only a
/// server unreachable for this many polls in a row ends the watch.
const GIVE_UP_AFTER: u32 = 60;
const POLL: Duration = Duration::from_millis(500);

/// A rollout that goes nowhere until an operator acts: watching it
/// further would wait forever.
pub fn waits_for_operator(r: &RolloutView) -> bool {
    r.progress
        .as_ref()
        .is_some_and(|p| matches!(p.state.as_str(), "paused" | "awaiting_approval" | "aborted"))
}

/// " (N awaiting their reboot window)", or nothing when none is.
pub fn awaiting_reboot(r: &RolloutView) -> String {
    match r.counts.awaiting_reboot {
        0 => String::new(),
        n => format!(" ({n} awaiting their reboot window)"),
    }
}

/// Every device still at work holds the release verified and waits for
/// the reboot window: nothing happens until it opens, which may be hours.
pub fn waits_for_reboot_window(r: &RolloutView) -> bool {
    r.counts.awaiting_reboot > 0
        && r.counts.pending == 0
        && r.counts.in_progress == r.counts.awaiting_reboot
}

fn still_moving(r: &RolloutView) -> bool {
    r.status == RolloutStatus::Running && !waits_for_operator(r) && !waits_for_reboot_window(r)
}

/// What phase `index`'s bar says beside its count of succeeded devices.
pub fn phase_message(progress: &RolloutProgress, index: usize) -> String {
    let tally = progress
        .phase_tallies
        .get(index)
        .copied()
        .unwrap_or_default();
    let mut text = format!(
        "succeeded, {} offered, {} failed",
        tally.offered, tally.failed
    );
    if progress.phase == Some(index as u32) {
        text += match progress.state.as_str() {
            "paused" => "  <- paused here",
            "awaiting_approval" => "  <- waiting for `uplift rollout approve`",
            _ => "  <- current",
        };
    }
    text
}

/// The label in front of phase `index`'s bar: `phase 2/4` or `final 4/4`.
pub fn phase_label(progress: &RolloutProgress, index: usize) -> String {
    let kind = if index + 1 == progress.phases as usize {
        "final"
    } else {
        "phase"
    };
    format!("{kind} {}/{}", index + 1, progress.phases)
}

struct Bars {
    _all: MultiProgress,
    head: ProgressBar,
    phases: Vec<ProgressBar>,
}

impl Bars {
    fn new(view: &RolloutView) -> Self {
        let all = MultiProgress::new();
        let head = all.add(ProgressBar::new(view.devices_total));
        head.set_style(
            ProgressStyle::with_template("{bar:40} {pos}/{len} succeeded {msg}").expect("valid"),
        );
        let style =
            ProgressStyle::with_template("{prefix:>11} {bar:30} {pos}/{len} {msg}").expect("valid");
        let phases = match &view.progress {
            Some(progress) => (0..progress.phases as usize)
                .map(|i| {
                    let tally = progress.phase_tallies.get(i).copied().unwrap_or_default();
                    let bar = all.add(ProgressBar::new(tally.devices));
                    bar.set_style(style.clone());
                    bar.set_prefix(phase_label(progress, i));
                    bar
                })
                .collect(),
            None => Vec::new(),
        };
        Self {
            _all: all,
            head,
            phases,
        }
    }

    fn show(&self, view: &RolloutView) {
        self.head.set_position(view.counts.succeeded);
        self.head.set_message(format!(
            "({} in progress{}, {} pending, {} failed)",
            view.counts.in_progress,
            awaiting_reboot(view),
            view.counts.pending,
            view.counts.failed
        ));
        if let Some(progress) = &view.progress {
            for (i, bar) in self.phases.iter().enumerate() {
                let tally = progress.phase_tallies.get(i).copied().unwrap_or_default();
                bar.set_length(tally.devices);
                bar.set_position(tally.succeeded);
                bar.set_message(phase_message(progress, i));
            }
        }
    }

    fn clear(&self) {
        for bar in self.phases.iter().chain([&self.head]) {
            bar.finish_and_clear();
        }
    }
}

/// Polls rollout `id` (first seen as `view`) with live bars until it stops
/// moving; the last view.
pub async fn watch(
    client: &AdminClient,
    id: i64,
    mut view: RolloutView,
) -> anyhow::Result<RolloutView> {
    let bars = Bars::new(&view);
    let mut failed_polls = 0;
    while still_moving(&view) {
        bars.show(&view);
        tokio::time::sleep(POLL).await;
        match client.rollout(id).await {
            Ok(next) => {
                view = next;
                failed_polls = 0;
            }
            Err(e) if failed_polls < GIVE_UP_AFTER => {
                failed_polls += 1;
                bars.head
                    .set_message(format!("(server not answering: {e:#})"));
            }
            Err(e) => {
                bars.clear();
                return Err(e.context(format!(
                    "watching rollout {id}: {GIVE_UP_AFTER} polls in a row failed"
                )));
            }
        }
    }
    bars.show(&view);
    bars.clear();
    Ok(view)
}

#[cfg(test)]
mod tests {
    use super::*;
    use uplift_proto::api::PhaseTally;
    use uplift_proto::policy::RolloutPolicy;

    fn progress(state: &str, phase: Option<u32>) -> RolloutProgress {
        RolloutProgress {
            state: state.into(),
            phase,
            phases: 3,
            phase_sizes: vec![1, 4, 5],
            phase_tallies: vec![
                PhaseTally {
                    devices: 1,
                    offered: 1,
                    succeeded: 1,
                    failed: 0,
                },
                PhaseTally {
                    devices: 4,
                    offered: 4,
                    succeeded: 1,
                    failed: 2,
                },
                PhaseTally {
                    devices: 5,
                    ..PhaseTally::default()
                },
            ],
            paused_because: None,
            detail: serde_json::Value::Null,
            policy: RolloutPolicy::default(),
        }
    }

    #[test]
    fn each_phase_says_where_it_stands_and_the_current_one_why_it_waits() {
        let paused = progress("paused", Some(1));
        assert_eq!(phase_label(&paused, 0), "phase 1/3");
        assert_eq!(phase_label(&paused, 2), "final 3/3");
        assert_eq!(phase_message(&paused, 0), "succeeded, 1 offered, 0 failed");
        assert_eq!(
            phase_message(&paused, 1),
            "succeeded, 4 offered, 2 failed  <- paused here"
        );
        assert_eq!(phase_message(&paused, 2), "succeeded, 0 offered, 0 failed");
        let gated = progress("awaiting_approval", Some(1));
        assert!(phase_message(&gated, 1).ends_with("waiting for `uplift rollout approve`"));
        let running = progress("running", Some(2));
        assert!(phase_message(&running, 2).ends_with("<- current"));
        // An older server sends no tallies: nothing to show, nothing breaks.
        let mut old = running;
        old.phase_tallies.clear();
        assert_eq!(phase_message(&old, 1), "succeeded, 0 offered, 0 failed");
    }
}
