//! Download turns: a rollout with `max_downloading = K` lets at most K of
//! its devices download at once. A device asks for a turn when it is to be
//! offered the release; without a free turn it waits in line (first come,
//! first served) and is told there is nothing to do yet. A turn ends when
//! the device reports it finished the download (written to its slot, or
//! failed), or when its session ends; the turn then passes to the first
//! device in line, which the caller notifies so its session sends the offer.
//!
//! Pure bookkeeping behind one lock, no I/O: the channel code decides when
//! to ask and when a turn ends ([`needs_turn`], [`ends_turn`]). It lives in
//! memory, so after a server restart devices take turns again in the order
//! they reconnect.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;
use uplift_proto::channel::{AgentState, Report};
use uplift_proto::{DeviceId, Version};

/// Whether a device may download now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Turn {
    Go,
    Wait,
}

#[derive(Debug, Default)]
pub struct Turns {
    inner: Mutex<Lines>,
}

#[derive(Debug, Default)]
struct Lines {
    rollouts: HashMap<i64, Line>,
    /// Which rollout each device holds a turn in or waits for.
    member: HashMap<DeviceId, i64>,
}

/// One rollout's turns and its line of waiting devices.
#[derive(Debug, Default)]
struct Line {
    holding: HashSet<DeviceId>,
    waiting: VecDeque<DeviceId>,
}

/// Whether a device still has to download `version`, judged from its newest
/// report: not if it runs it, or wrote it and is waiting to reboot into
/// it, rebooting into it or testing it.
pub fn needs_turn(report: Option<&Report>, version: &Version) -> bool {
    let Some(report) = report else {
        return true;
    };
    let on_it = report.target_version.as_ref() == Some(version);
    !(report.running_version == *version
        || on_it
            && matches!(
                report.state,
                AgentState::AwaitingReboot | AgentState::RebootPending | AgentState::Testing
            ))
}

/// Whether a report from a device holding a turn for `version` ends it.
/// An idle report for another version does not: it may have been sent
/// before the offer arrived.
pub fn ends_turn(report: &Report, version: &Version) -> bool {
    match report.state {
        AgentState::Downloading | AgentState::Verifying => {
            report.target_version.as_ref() != Some(version)
        }
        AgentState::Idle => report.running_version == *version,
        AgentState::AwaitingReboot
        | AgentState::RebootPending
        | AgentState::Testing
        | AgentState::Failed
        | AgentState::RolledBack => true,
    }
}

impl Turns {
    fn lock(&self) -> std::sync::MutexGuard<'_, Lines> {
        // Plain data; still consistent after a panic elsewhere.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Asks for a turn in `rollout`, which allows `limit` at once. A device
    /// already holding one keeps it; one in line keeps its place. Asking in
    /// a newer rollout gives up whatever it had in another; turns passed on
    /// by that are returned, for the caller to notify.
    pub fn ask(&self, device: &DeviceId, rollout: i64, limit: usize) -> (Turn, Vec<DeviceId>) {
        let mut lines = self.lock();
        let mut passed = Vec::new();
        if lines.member.get(device).is_some_and(|r| *r != rollout) {
            passed.extend(lines.leave(device));
        }
        let line = lines.rollouts.entry(rollout).or_default();
        let turn = if line.holding.contains(device) {
            Turn::Go
        } else if line.holding.len() < limit.max(1) {
            line.waiting.retain(|d| d != device);
            line.holding.insert(device.clone());
            Turn::Go
        } else {
            if !line.waiting.contains(device) {
                line.waiting.push_back(device.clone());
            }
            Turn::Wait
        };
        lines.member.insert(device.clone(), rollout);
        (turn, passed)
    }

    /// The device is done with its turn or its place in line (finished,
    /// gone offline, or moved to another rollout). Returns the device the
    /// freed turn passed to, if any.
    pub fn leave(&self, device: &DeviceId) -> Option<DeviceId> {
        self.lock().leave(device)
    }

    /// Whether the device holds a turn in `rollout`.
    pub fn holds(&self, device: &DeviceId, rollout: i64) -> bool {
        self.lock()
            .rollouts
            .get(&rollout)
            .is_some_and(|line| line.holding.contains(device))
    }

    /// Devices holding a turn and devices in line, for a rollout.
    pub fn counts(&self, rollout: i64) -> (usize, usize) {
        self.lock()
            .rollouts
            .get(&rollout)
            .map_or((0, 0), |line| (line.holding.len(), line.waiting.len()))
    }
}

impl Lines {
    fn leave(&mut self, device: &DeviceId) -> Option<DeviceId> {
        let rollout = self.member.remove(device)?;
        let line = self.rollouts.get_mut(&rollout)?;
        line.waiting.retain(|d| d != device);
        let next = if line.holding.remove(device) {
            line.waiting.pop_front().inspect(|next| {
                line.holding.insert(next.clone());
            })
        } else {
            None
        };
        if line.holding.is_empty() && line.waiting.is_empty() {
            self.rollouts.remove(&rollout);
        }
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uplift_proto::SlotName;

    fn dev(n: u32) -> DeviceId {
        format!("dev-{n:04}").parse().unwrap()
    }

    fn v(s: &str) -> Version {
        s.parse().unwrap()
    }

    fn report(state: AgentState, running: &str, target: Option<&str>) -> Report {
        Report {
            state,
            running_version: v(running),
            booted_slot: SlotName::A,
            target_version: target.map(v),
            progress: None,
            error: None,
        }
    }

    #[test]
    fn at_most_the_limit_hold_turns_and_the_rest_wait_in_order() {
        let turns = Turns::default();
        let asked: Vec<Turn> = (0..5).map(|n| turns.ask(&dev(n), 1, 2).0).collect();
        assert_eq!(
            asked,
            [Turn::Go, Turn::Go, Turn::Wait, Turn::Wait, Turn::Wait]
        );
        assert_eq!(turns.counts(1), (2, 3));
        // Asking again changes nothing: a holder keeps its turn, a waiter its place.
        assert_eq!(turns.ask(&dev(0), 1, 2).0, Turn::Go);
        assert_eq!(turns.ask(&dev(4), 1, 2).0, Turn::Wait);
        assert_eq!(
            turns.leave(&dev(1)),
            Some(dev(2)),
            "first in line gets the turn"
        );
        assert!(turns.holds(&dev(2), 1));
        assert_eq!(turns.ask(&dev(2), 1, 2).0, Turn::Go);
        assert_eq!(turns.leave(&dev(0)), Some(dev(3)));
        assert_eq!(turns.leave(&dev(2)), Some(dev(4)));
        assert_eq!(turns.leave(&dev(3)), None, "no one left in line");
        assert_eq!(turns.counts(1), (1, 0));
    }

    #[test]
    fn leaving_the_line_passes_no_turn_and_is_forgotten() {
        let turns = Turns::default();
        turns.ask(&dev(0), 1, 1);
        turns.ask(&dev(1), 1, 1);
        turns.ask(&dev(2), 1, 1);
        assert_eq!(turns.leave(&dev(1)), None);
        assert_eq!(turns.leave(&dev(0)), Some(dev(2)), "dev-0001 left the line");
        assert_eq!(turns.leave(&dev(9)), None, "a stranger holds nothing");
    }

    #[test]
    fn a_newer_rollout_takes_the_device_out_of_the_older_ones_line() {
        let turns = Turns::default();
        turns.ask(&dev(0), 1, 1);
        turns.ask(&dev(1), 1, 1);
        let (turn, passed) = turns.ask(&dev(0), 2, 1);
        assert_eq!(turn, Turn::Go);
        assert_eq!(passed, [dev(1)], "its old turn went to the next in line");
        assert!(turns.holds(&dev(1), 1));
        assert_eq!(turns.counts(2), (1, 0));
    }

    #[test]
    fn only_devices_that_still_have_to_download_need_a_turn() {
        let target = v("2.0");
        assert!(needs_turn(None, &target), "never heard from");
        assert!(needs_turn(
            Some(&report(AgentState::Idle, "1.0", None)),
            &target
        ));
        assert!(needs_turn(
            Some(&report(AgentState::Downloading, "1.0", Some("2.0"))),
            &target
        ));
        assert!(!needs_turn(
            Some(&report(AgentState::Idle, "2.0", None)),
            &target
        ));
        assert!(!needs_turn(
            Some(&report(AgentState::RebootPending, "1.0", Some("2.0"))),
            &target
        ));
        assert!(!needs_turn(
            Some(&report(AgentState::Testing, "1.0", Some("2.0"))),
            &target
        ));
        assert!(
            !needs_turn(
                Some(&report(AgentState::AwaitingReboot, "1.0", Some("2.0"))),
                &target
            ),
            "written and verified, waiting for its reboot window"
        );
        assert!(needs_turn(
            Some(&report(AgentState::RebootPending, "1.0", Some("3.0"))),
            &target
        ));
    }

    #[test]
    fn a_turn_ends_when_the_download_is_over_not_on_a_report_from_before_the_offer() {
        let target = v("2.0");
        assert!(!ends_turn(&report(AgentState::Idle, "1.0", None), &target));
        assert!(!ends_turn(
            &report(AgentState::Downloading, "1.0", Some("2.0")),
            &target
        ));
        assert!(!ends_turn(
            &report(AgentState::Verifying, "1.0", Some("2.0")),
            &target
        ));
        assert!(ends_turn(
            &report(AgentState::RebootPending, "1.0", Some("2.0")),
            &target
        ));
        assert!(ends_turn(
            &report(AgentState::AwaitingReboot, "1.0", Some("2.0")),
            &target
        ));
        assert!(ends_turn(
            &report(AgentState::Failed, "1.0", Some("2.0")),
            &target
        ));
        assert!(ends_turn(
            &report(AgentState::RolledBack, "1.0", Some("2.0")),
            &target
        ));
        assert!(ends_turn(&report(AgentState::Idle, "2.0", None), &target));
        assert!(ends_turn(
            &report(AgentState::Downloading, "1.0", Some("3.0")),
            &target
        ));
    }
}
