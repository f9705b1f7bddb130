//! A device's history: what happened to it, read from its reports and the
//! server's own offers. Events are derived where the live view applies a
//! report ([`events_between`], a pure function of the report before and the
//! report now), queued in memory ([`Pending`]) and written by the writer
//! task ([`crate::writer`]) with its batches, so a device session never
//! waits on the database for them. The writer also enforces the retention
//! limits of `[limits]`.

use crate::store::NewEvent;
use std::collections::VecDeque;
use uplift_proto::api::DeviceEventKind;
use uplift_proto::channel::{AgentState, Report};

/// What happened between two reports of one device. `old` is the report
/// the server held before (from any session of the device): a device that
/// has not reported since the server started has none, and its first report
/// only sets where it stands, as nothing is known of how it got there.
pub fn events_between(old: &Report, new: &Report) -> Vec<DeviceEventKind> {
    use AgentState::*;
    let installing = |s| matches!(s, Downloading | Verifying | AwaitingReboot | RebootPending);
    let downloaded = |s| matches!(s, Verifying | AwaitingReboot | RebootPending);
    // The slot is written and verified: held for a reboot window, or set
    // to be tried at the next boot.
    let installed = |s| matches!(s, AwaitingReboot | RebootPending);
    // Still the attempt the old report was about. Reports can be missed (a
    // quick step between two, a server restart), so every event below asks
    // "is this new since then", not "was the step before the expected one".
    let same_attempt = installing(old.state) && old.target_version == new.target_version;
    let target = new.target_version.clone();
    let mut events = Vec::new();
    if let Some(version) = target
        .clone()
        .filter(|_| installing(new.state) && !same_attempt)
    {
        events.push(DeviceEventKind::DownloadStarted {
            version,
            total_bytes: new.progress.map(|p| p.total_bytes),
        });
    }
    if downloaded(new.state) && !(same_attempt && downloaded(old.state)) {
        // The report that ends the download carries its final count, else
        // the last one sent while downloading does.
        let progress = new.progress.or(old.progress.filter(|_| same_attempt));
        if let (Some(version), Some(p)) = (target.clone(), progress) {
            events.push(DeviceEventKind::DownloadFinished {
                version,
                total_bytes: p.total_bytes,
                fetched_bytes: p.fetched_bytes,
                reused_bytes: p.done_bytes.saturating_sub(p.fetched_bytes),
            });
        }
    }
    if let Some(version) = target
        .clone()
        .filter(|_| installed(new.state) && !(same_attempt && installed(old.state)))
    {
        events.push(DeviceEventKind::Installed {
            version,
            slot: new.booted_slot.other(),
        });
    }
    // A reboot shows as a new booted slot, or as a pending trial that fell
    // back to the slot it left.
    let rebooted = old.booted_slot != new.booted_slot
        || (old.state == RebootPending && new.state == RolledBack);
    if rebooted {
        events.push(DeviceEventKind::Reboot {
            from_slot: old.booted_slot,
            to_slot: new.booted_slot,
            running_version: new.running_version.clone(),
        });
    }
    if new.state == Idle
        && old.state != Idle
        && (old.state == Testing || (rebooted && new.running_version != old.running_version))
    {
        events.push(DeviceEventKind::Committed {
            version: new.running_version.clone(),
            slot: new.booted_slot,
        });
    }
    // An agent whose health check failed says so from the failed release,
    // before it reboots back: the rollback is told once it is back on the
    // release it left (the failure, at once, as an error).
    let still_on_failed = target.as_ref() == Some(&new.running_version);
    if new.state == RolledBack
        && !still_on_failed
        && (old.state != RolledBack || old.running_version != new.running_version)
    {
        events.push(DeviceEventKind::RolledBack {
            version: target.clone(),
            running_version: new.running_version.clone(),
            error: new.error.clone(),
        });
    }
    if new.state == RolledBack && still_on_failed && old.state != RolledBack {
        if let Some(error) = new.error.clone() {
            events.push(DeviceEventKind::Error {
                version: target.clone(),
                error,
            });
        }
    }
    if new.state == Failed && (old.state != Failed || old.error != new.error) {
        if let Some(error) = new.error.clone() {
            events.push(DeviceEventKind::Error {
                version: target,
                error,
            });
        }
    }
    events
}

/// Events not yet written, oldest first. Bounded: while the database is
/// down a fleet keeps reporting, and memory must not grow without end; the
/// oldest events go first, and how many is logged.
#[derive(Debug, Default)]
pub struct Pending {
    events: VecDeque<NewEvent>,
    dropped: u64,
}

/// Events held for the writer at most.
pub const MAX_PENDING: usize = 200_000;

impl Pending {
    pub fn push(&mut self, event: NewEvent) {
        if self.events.len() >= MAX_PENDING {
            self.events.pop_front();
            self.dropped += 1;
        }
        self.events.push_back(event);
    }

    /// Room for `more` events (within [`MAX_PENDING`]) in one growth: an
    /// offer to a whole fleet queues an event per device at once.
    pub fn reserve(&mut self, more: usize) {
        let room = MAX_PENDING.saturating_sub(self.events.len());
        self.events.reserve(more.min(room));
    }

    /// Up to `max` of the oldest events, and how many were dropped since
    /// the last call.
    pub fn take(&mut self, max: usize) -> (Vec<NewEvent>, u64) {
        let n = max.min(self.events.len());
        (
            self.events.drain(..n).collect(),
            std::mem::take(&mut self.dropped),
        )
    }

    /// A batch that could not be written goes back in front, in its order.
    pub fn requeue(&mut self, batch: Vec<NewEvent>) {
        for event in batch.into_iter().rev() {
            if self.events.len() >= MAX_PENDING {
                self.dropped += 1;
                continue;
            }
            self.events.push_front(event);
        }
    }

    pub fn len(&self) -> usize {
        self.events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Timestamp;
    use uplift_proto::channel::Progress;
    use uplift_proto::{ErrorKind, SlotName, Version, WireError};
    use AgentState::*;

    fn v(s: &str) -> Version {
        s.parse().unwrap()
    }

    fn report(state: AgentState, running: &str, slot: SlotName, target: Option<&str>) -> Report {
        Report {
            state,
            running_version: v(running),
            booted_slot: slot,
            target_version: target.map(v),
            progress: None,
            error: None,
        }
    }

    fn with_progress(mut r: Report, done: u64, fetched: u64) -> Report {
        r.progress = Some(Progress {
            done_bytes: done,
            total_bytes: 100,
            fetched_bytes: fetched,
        });
        r
    }

    fn with_error(mut r: Report, kind: ErrorKind) -> Report {
        r.error = Some(WireError::new(kind, "it broke"));
        r
    }

    /// The events of each step of a sequence of reports.
    fn walk(reports: &[Report]) -> Vec<Vec<DeviceEventKind>> {
        reports
            .windows(2)
            .map(|w| events_between(&w[0], &w[1]))
            .collect()
    }

    #[test]
    fn an_upgrade_reads_as_download_install_reboot_and_commit() {
        use SlotName::{A, B};
        let steps = walk(&[
            report(Idle, "1.0", A, None),
            with_progress(report(Downloading, "1.0", A, Some("1.1")), 0, 0),
            with_progress(report(Downloading, "1.0", A, Some("1.1")), 50, 20),
            with_progress(report(Verifying, "1.0", A, Some("1.1")), 100, 30),
            report(RebootPending, "1.0", A, Some("1.1")),
            report(Testing, "1.1", B, Some("1.1")),
            report(Idle, "1.1", B, None),
            report(Idle, "1.1", B, None),
        ]);
        assert_eq!(
            steps,
            vec![
                vec![DeviceEventKind::DownloadStarted {
                    version: v("1.1"),
                    total_bytes: Some(100)
                }],
                vec![],
                vec![DeviceEventKind::DownloadFinished {
                    version: v("1.1"),
                    total_bytes: 100,
                    fetched_bytes: 30,
                    reused_bytes: 70
                }],
                vec![DeviceEventKind::Installed {
                    version: v("1.1"),
                    slot: B
                }],
                vec![DeviceEventKind::Reboot {
                    from_slot: A,
                    to_slot: B,
                    running_version: v("1.1")
                }],
                vec![DeviceEventKind::Committed {
                    version: v("1.1"),
                    slot: B
                }],
                vec![],
            ]
        );
    }

    #[test]
    fn a_reboot_held_for_its_window_is_installed_once_then_reboots_on_the_go() {
        use SlotName::{A, B};
        let steps = walk(&[
            with_progress(report(Downloading, "1.0", A, Some("1.1")), 0, 0),
            with_progress(report(Verifying, "1.0", A, Some("1.1")), 100, 40),
            report(AwaitingReboot, "1.0", A, Some("1.1")),
            report(AwaitingReboot, "1.0", A, Some("1.1")),
            report(RebootPending, "1.0", A, Some("1.1")),
            report(Testing, "1.1", B, Some("1.1")),
        ]);
        let names: Vec<Vec<&str>> = steps
            .iter()
            .map(|events| events.iter().map(|e| e.name()).collect())
            .collect();
        assert_eq!(
            names,
            vec![
                vec!["download_finished"],
                vec!["installed"],
                vec![],
                vec![],
                vec!["reboot"],
            ]
        );
    }

    #[test]
    fn steps_missed_between_two_reports_are_still_told() {
        use SlotName::{A, B};
        // Idle straight to a verified slot: the download happened unseen.
        let events = events_between(
            &report(Idle, "1.0", A, None),
            &with_progress(report(Verifying, "1.0", A, Some("1.1")), 100, 0),
        );
        let names: Vec<&str> = events.iter().map(DeviceEventKind::name).collect();
        assert_eq!(names, ["download_started", "download_finished"]);
        // The download's end from the last report sent while downloading.
        let events = events_between(
            &with_progress(report(Downloading, "1.0", A, Some("1.1")), 90, 90),
            &report(RebootPending, "1.0", A, Some("1.1")),
        );
        let names: Vec<&str> = events.iter().map(DeviceEventKind::name).collect();
        assert_eq!(names, ["download_finished", "installed"]);
        // A trial that passed before its device reconnected.
        let events = events_between(
            &report(RebootPending, "1.0", A, Some("1.1")),
            &report(Idle, "1.1", B, None),
        );
        let names: Vec<&str> = events.iter().map(DeviceEventKind::name).collect();
        assert_eq!(names, ["reboot", "committed"]);
    }

    #[test]
    fn failures_and_rollbacks_carry_their_error_and_are_told_once() {
        use SlotName::{A, B};
        let downloading = with_progress(report(Downloading, "1.0", A, Some("1.1")), 10, 10);
        let failed = with_error(
            report(Failed, "1.0", A, Some("1.1")),
            ErrorKind::ChunkHashMismatch,
        );
        let events = events_between(&downloading, &failed);
        assert!(
            matches!(&events[..], [DeviceEventKind::Error { version: Some(v), error }]
                if v.as_str() == "1.1" && error.kind == ErrorKind::ChunkHashMismatch),
            "{events:?}"
        );
        assert!(events_between(&failed, &failed.clone()).is_empty());
        // A retry is a new download.
        let names: Vec<&str> = events_between(&failed, &downloading)
            .iter()
            .map(DeviceEventKind::name)
            .collect();
        assert_eq!(names, ["download_started"]);

        // The trial fell back: a reboot onto the slot it left.
        let rolled_back = with_error(
            report(RolledBack, "1.0", A, Some("1.1")),
            ErrorKind::HealthCheckFailed,
        );
        let events = events_between(&report(RebootPending, "1.0", A, Some("1.1")), &rolled_back);
        assert_eq!(
            events[0],
            DeviceEventKind::Reboot {
                from_slot: A,
                to_slot: A,
                running_version: v("1.0")
            }
        );
        assert!(
            matches!(&events[1], DeviceEventKind::RolledBack { version: Some(t), running_version, error: Some(e) }
                if t.as_str() == "1.1" && running_version.as_str() == "1.0" && e.kind == ErrorKind::HealthCheckFailed),
            "{events:?}"
        );
        // From the trial slot itself.
        let names: Vec<&str> =
            events_between(&report(Testing, "1.1", B, Some("1.1")), &rolled_back)
                .iter()
                .map(DeviceEventKind::name)
                .collect();
        assert_eq!(names, ["reboot", "rolled_back"]);
        // Reported in two steps: the failure from the trial slot, before
        // the reboot, then the rollback once back on the release it left
        // (not "rolled back to 1.1" while it still ran 1.1).
        let failing = with_error(
            report(RolledBack, "1.1", B, Some("1.1")),
            ErrorKind::HealthCheckFailed,
        );
        let events = events_between(&report(Testing, "1.1", B, Some("1.1")), &failing);
        assert!(
            matches!(&events[..], [DeviceEventKind::Error { version: Some(t), error }]
                if t.as_str() == "1.1" && error.kind == ErrorKind::HealthCheckFailed),
            "{events:?}"
        );
        let events = events_between(&failing, &rolled_back);
        assert!(
            matches!(&events[..], [DeviceEventKind::Reboot { .. }, DeviceEventKind::RolledBack { version: Some(t), running_version, .. }]
                if t.as_str() == "1.1" && running_version.as_str() == "1.0"),
            "{events:?}"
        );
        assert!(events_between(&rolled_back, &rolled_back.clone()).is_empty());
    }

    #[test]
    fn pending_events_are_bounded_and_a_failed_batch_keeps_its_place() {
        let event = |n: i64| NewEvent {
            device: "dev-1".parse().unwrap(),
            at: Timestamp::from(std::time::UNIX_EPOCH + std::time::Duration::from_secs(n as u64)),
            event: DeviceEventKind::Withdrawn { rollout_id: n },
        };
        let mut pending = Pending::default();
        for n in 0..MAX_PENDING as i64 + 5 {
            pending.push(event(n));
        }
        assert_eq!(pending.len(), MAX_PENDING);
        let (batch, dropped) = pending.take(3);
        assert_eq!(dropped, 5, "the oldest went first");
        assert_eq!(batch[0].event, DeviceEventKind::Withdrawn { rollout_id: 5 });
        pending.requeue(batch);
        let (batch, dropped) = pending.take(1);
        assert_eq!(
            (&batch[0].event, dropped),
            (&DeviceEventKind::Withdrawn { rollout_id: 5 }, 0)
        );
    }
}
