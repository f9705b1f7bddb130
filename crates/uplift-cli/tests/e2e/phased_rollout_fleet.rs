//! A phased rollout of a 100-device fleet, end to end with real processes:
//! four phases (5, 20, 35 and 40 devices) decided by the server, and a
//! release whose health check fails on exactly the devices the server put
//! in the second phase. Through `uplift … --json` the operator sees the
//! first phase commit the release, the rollout pause by itself during the
//! second naming the failed devices, the devices of that phase still
//! waiting for a download turn held back while it is paused, the last two
//! phases never offered anything, and after `uplift rollout abort` every
//! device at rest on a good slot: the first phase on 1.1 in slot b, every
//! other device on 1.0 in slot a, the failed ones rolled back to it.

use crate::common;

use common::*;
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};
use uplift_fleet::{stop_all, Device};
use uplift_proto::api::{DevicePage, DeviceView, RolloutView};
use uplift_proto::channel::AgentState;
use uplift_proto::{DeviceId, ErrorKind, SlotName};
use uplift_server::rollout::phases;

const DEVICES: usize = 100;
/// Cumulative reach of the phases before the final one: phases of 5, 20,
/// 35 and 40 devices.
const REACH: [&str; 3] = ["5%", "25%", "60%"];
const PHASE_SIZES: [u64; 4] = [5, 20, 35, 40];
/// The rollout pauses once this many of a phase's devices have finished
/// and more than `ERROR_PERCENT` of them failed.
const MIN_FINISHED: usize = 5;
const ERROR_PERCENT: &str = "10";
/// Devices of the rollout downloading at once, and each one's rate: phase
/// 2 goes in waves of a few seconds each, so the pause finds some of it at
/// work and some still waiting for a turn, as it would in a real fleet.
const MAX_DOWNLOADING: &str = "5";
const MAX_BYTES_PER_SEC: &str = "200000";
/// Bound for the fleet to enroll and for each stage of the rollout; a
/// healthy run on two busy cores needs a fraction of it.
const FLEET_WAIT: Duration = Duration::from_secs(150);
/// The file that breaks a device's service on the new OS (slot b).
const BREAKS_ON_NEW_OS: &str = "service-breaks-on-new-os";

/// One device of the fleet with the phase the server put it in (0-based).
struct Member {
    device: Device,
    id: DeviceId,
    phase: u32,
}

impl Member {
    /// `device 042 (<id>, phase 2)`, as messages name it.
    fn name(&self) -> String {
        let dir = self.device.dir.file_name().unwrap_or_default();
        format!(
            "device {} ({}, phase {})",
            dir.to_string_lossy(),
            self.id,
            self.phase + 1
        )
    }

    /// The server's view of this device in `views`.
    fn in_<'a>(&self, views: &'a [DeviceView]) -> &'a DeviceView {
        views
            .iter()
            .find(|d| d.id == self.id)
            .unwrap_or_else(|| panic!("{} is missing from the device list", self.name()))
    }
}

/// A device on its way somewhere: downloading, rebooting, testing.
fn busy(d: &DeviceView) -> bool {
    matches!(
        d.state,
        Some(
            AgentState::Downloading
                | AgentState::Verifying
                | AgentState::RebootPending
                | AgentState::Testing
        )
    )
}

fn idle_on(d: &DeviceView, version: &str) -> bool {
    d.state == Some(AgentState::Idle) && d.running_version == Some(v(version))
}

/// How many devices are in each state, for messages.
fn states(views: &[DeviceView]) -> BTreeMap<String, usize> {
    let mut by_state = BTreeMap::new();
    for d in views {
        let version = d.running_version.as_ref().map(ToString::to_string);
        let key = format!(
            "{} on {}",
            d.state.map_or("none", |s| s.as_str()),
            version.as_deref().unwrap_or("?")
        );
        *by_state.entry(key).or_insert(0) += 1;
    }
    by_state
}

/// Fails the test if a device of phase 3 or 4 is offered the release, or
/// one of phase 2 while phase 1 has not all committed it.
fn check_order(members: &[Member], views: &[DeviceView]) {
    let offered = |m: &Member| {
        let d = m.in_(views);
        d.target_version.is_some() || busy(d)
    };
    for m in members.iter().filter(|m| m.phase >= 2) {
        assert!(
            !offered(m),
            "{} was offered the release: {:?}",
            m.name(),
            m.in_(views)
        );
    }
    if members.iter().any(|m| m.phase == 1 && offered(m)) {
        assert!(
            members
                .iter()
                .filter(|m| m.phase == 0)
                .all(|m| idle_on(m.in_(views), "1.1")),
            "phase 2 was offered before phase 1 finished: {:?}",
            states(views)
        );
    }
}

/// Polls the server (the admin API `uplift` uses) until `done`, checking
/// the phase order at every poll.
async fn wait_rollout(
    fx: &Fixture,
    members: &[Member],
    id: i64,
    what: &str,
    done: impl Fn(&RolloutView, &[DeviceView]) -> bool,
) -> Vec<DeviceView> {
    let deadline = Instant::now() + FLEET_WAIT;
    loop {
        let views = fx.client.devices().await.expect("list devices");
        check_order(members, &views);
        let rollout = fx.client.rollout(id).await.expect("rollout status");
        if done(&rollout, &views) {
            return views;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: rollout {:?}, devices {:?}\nserver log:\n{}",
            rollout.progress,
            states(&views),
            fx.server.log_tail(30)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// `uplift rollout status ID --json`: its exit code and the rollout.
fn status(fx: &Fixture, id: i64) -> (i32, RolloutView) {
    uplift_json_exit(fx, &["rollout", "status", &id.to_string()])
}

/// `uplift devices list --all --json`, checked for the phase order.
fn devices_list(fx: &Fixture, members: &[Member]) -> Vec<DeviceView> {
    let page: DevicePage = uplift_json(fx, &["devices", "list", "--all"]);
    check_order(members, &page.devices);
    page.devices
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_failing_in_phase_two_of_four_pauses_itself_and_abort_leaves_every_device_on_a_good_slot(
) {
    let started = Instant::now();
    let fx = tokio::task::spawn_blocking(Fixture::start).await.unwrap();
    // Every device fails the new OS's health check once its trigger file
    // exists; the test writes it for the devices of phase 2 only, once the
    // server has decided the phases.
    let specs = (0..DEVICES)
        .map(|i| {
            let name = format!("{i:03}");
            let trigger = fx.path(&format!("devices/{name}/{BREAKS_ON_NEW_OS}"));
            let spec = fx.spec_failing_on_slot_b_when(&name, &trigger);
            (name, spec)
        })
        .collect();
    let devices = fx.power_on(specs, &fx.server.endpoint.url).await;
    fx.wait_for_within("the fleet to enroll", FLEET_WAIT, &[], |views| {
        views.len() == DEVICES && views.iter().all(|d| d.online && idle_on(d, "1.0"))
    })
    .await;
    let enrolled_in = started.elapsed();
    fx.release("1.1", DEVICE_TYPE, &fx.image_v1_1, &fx.key)
        .await;

    let mut start = vec!["rollout", "start", "--release", "1.1"];
    for reach in REACH {
        start.extend(["--phase", reach]);
    }
    let min_finished = MIN_FINISHED.to_string();
    start.extend([
        "--error-threshold",
        ERROR_PERCENT,
        "--min-finished",
        &min_finished,
    ]);
    start.extend(["--max-downloading", MAX_DOWNLOADING]);
    start.extend(["--max-bytes-per-sec", MAX_BYTES_PER_SEC]);
    let view: RolloutView = uplift_json(&fx, &start);
    let id = view.id;
    let progress = view.progress.expect("a phased rollout shows its phases");
    assert_eq!(progress.phase_sizes, PHASE_SIZES, "{progress:#?}");

    // Which device is in which phase: the server's own function, from the
    // rollout's seed as its view shows it. Were this not what the server
    // did, other devices than these would take phase 1 and fail below.
    let ids: Vec<DeviceId> = devices.iter().map(id_of).collect();
    let seed = phases::seed(&view.release, &view.created_at);
    let phase_of: HashMap<DeviceId, u32> = phases::assign(&ids, &progress.policy.phases, &seed)
        .into_iter()
        .collect();
    let members: Vec<Member> = devices
        .into_iter()
        .zip(ids)
        .map(|(device, id)| Member {
            phase: phase_of[&id],
            device,
            id,
        })
        .collect();
    let in_phase = |p: u32| members.iter().filter(move |m| m.phase == p);
    for (p, size) in PHASE_SIZES.iter().enumerate() {
        assert_eq!(in_phase(p as u32).count() as u64, *size, "phase {}", p + 1);
    }
    // Phase 2 is offered only once all of phase 1 has committed (checked at
    // every poll), so its devices are broken before any of them can try.
    for m in in_phase(1) {
        std::fs::write(m.device.dir.join(BREAKS_ON_NEW_OS), "").unwrap();
    }

    let views = wait_rollout(&fx, &members, id, "phase 1 on 1.1", |_, views| {
        in_phase(0).all(|m| idle_on(m.in_(views), "1.1"))
    })
    .await;
    assert_eq!(
        views.iter().filter(|d| idle_on(d, "1.1")).count(),
        PHASE_SIZES[0] as usize,
        "only phase 1 runs 1.1: {:?}",
        states(&views)
    );
    for m in in_phase(0) {
        let boot = m.device.boot_state().unwrap();
        assert_eq!(
            (boot.default_slot, boot.trial),
            (SlotName::B, None),
            "{} committed 1.1 in slot b",
            m.name()
        );
    }
    wait_rollout(&fx, &members, id, "the rollout to pause", |r, _| {
        r.progress.as_ref().is_some_and(|p| p.state != "running")
    })
    .await;

    // What the operator sees of the pause; `status` exits 1 for it.
    let (code, paused) = status(&fx, id);
    assert_eq!(code, 1, "uplift rollout status fails for a paused rollout");
    let progress = paused.progress.expect("progress");
    assert_eq!(
        (progress.state.as_str(), progress.phase),
        ("paused", Some(1)),
        "paused by itself in phase 2: {progress:#?}"
    );
    let why = progress.paused_because.clone().expect("why it paused");
    assert!(
        why.contains("finished devices of phase 2 failed, over the error threshold")
            && why.contains("service fails on the new OS"),
        "{why}"
    );
    let named: Vec<&Member> = members
        .iter()
        .filter(|m| why.contains(m.id.as_str()))
        .collect();
    assert!(
        named.len() >= MIN_FINISHED && named.iter().all(|m| m.phase == 1),
        "the pause names at least {MIN_FINISHED} failed devices, all of phase 2: {why}"
    );
    let failed: Vec<&str> = progress.detail["reason"]["devices"]
        .as_array()
        .unwrap_or_else(|| panic!("the pause lists its failed devices: {:#?}", progress.detail))
        .iter()
        .map(|d| d["device"].as_str().unwrap())
        .collect();
    assert!(
        failed.len() >= MIN_FINISHED
            && failed
                .iter()
                .all(|f| in_phase(1).any(|m| m.id.as_str() == *f)),
        "every device the pause counts is of phase 2: {failed:?}"
    );

    // While it is paused, the devices of phase 2 at work on the release
    // finish, and those that had not started (waiting for a download turn)
    // do not start: the pause took their offers back.
    let at_pause = devices_list(&fx, &members);
    let working: Vec<&Member> = in_phase(1).filter(|m| busy(m.in_(&at_pause))).collect();
    let waiting: Vec<&Member> = in_phase(1)
        .filter(|m| m.in_(&at_pause).state == Some(AgentState::Idle))
        .collect();
    fx.wait_for_within(
        "phase 2's devices at work to finish",
        FLEET_WAIT,
        &[],
        |views| working.iter().all(|m| !busy(m.in_(views))),
    )
    .await;
    // Long enough for a turn to pass and a download to start, were one
    // allowed.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let held = devices_list(&fx, &members);
    for m in &waiting {
        let d = m.in_(&held);
        assert!(
            idle_on(d, "1.0") && d.target_version.is_none(),
            "{} waited for its turn when the rollout paused and must not start while it is paused: {d:?}",
            m.name()
        );
    }
    let (_, still) = status(&fx, id);
    assert_eq!(
        (
            still.progress.as_ref().unwrap().state.as_str(),
            still.waiting_for_turn
        ),
        ("paused", 0),
        "nobody waits for a turn while paused: {still:#?}"
    );

    let aborted = operator(&fx, "abort", id);
    assert_eq!(aborted.progress.as_ref().unwrap().state, "aborted");
    let at_rest = fx
        .wait_for_within(
            "every device at rest after the abort",
            FLEET_WAIT,
            &[],
            |views| views.len() == DEVICES && views.iter().all(|d| d.online && !busy(d)),
        )
        .await;
    check_order(&members, &at_rest);
    // Long enough for an offer to go out and be taken up, were one made
    // after the abort.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let last = devices_list(&fx, &members);
    let (mut rolled_back, mut never_tried) = (0, 0);
    for m in &members {
        let d = m.in_(&last);
        let boot = m.device.boot_state().unwrap();
        let booted = std::fs::read_to_string(m.device.cmdline_path()).unwrap_or_default();
        let log = m.device.log();
        let context = || format!("{}: {d:?}\n{log}", m.name());
        assert!(!busy(d) && d.online, "{}", context());
        assert_eq!(
            (boot.trial, boot.fallback_from),
            (None, None),
            "no trial left pending: {}",
            context()
        );
        let (slot, version) = if m.phase == 0 {
            (SlotName::B, "1.1")
        } else {
            (SlotName::A, "1.0")
        };
        assert_eq!(boot.default_slot, slot, "{}", context());
        assert!(
            booted.contains(&format!("uplift.slot={slot}")),
            "booted slot {slot}: {}",
            context()
        );
        assert_eq!(d.running_version, Some(v(version)), "{}", context());
        match m.phase {
            0 => assert!(idle_on(d, "1.1") && d.last_error.is_none(), "{}", context()),
            1 if d.state == Some(AgentState::RolledBack) => {
                rolled_back += 1;
                let error = d.last_error.as_ref().expect("why it rolled back");
                assert_eq!(error.kind, ErrorKind::HealthCheckFailed, "{}", context());
                assert!(
                    error.message.contains("service fails on the new OS"),
                    "{}",
                    context()
                );
                assert!(
                    log.contains(": slot b (trial"),
                    "tried slot b: {}",
                    context()
                );
            }
            1 => {
                never_tried += 1;
                assert!(idle_on(d, "1.0"), "{}", context());
                assert!(
                    !failed.contains(&m.id.as_str()),
                    "a device counted as failed rolled back: {}",
                    context()
                );
            }
            _ => {
                assert!(
                    idle_on(d, "1.0") && d.target_version.is_none() && d.last_error.is_none(),
                    "{}",
                    context()
                );
                // Never offered: nothing installed, slot b as provisioned.
                assert!(!log.contains("version=1.1"), "{}", context());
                let slot_b = std::fs::metadata(m.device.slot_path(SlotName::B)).unwrap();
                assert_eq!(slot_b.len(), 0, "slot b untouched: {}", context());
            }
        }
    }
    assert!(
        rolled_back >= failed.len(),
        "{rolled_back} of phase 2 rolled back"
    );
    let (_, end) = status(&fx, id);
    assert_eq!(
        (
            end.progress.as_ref().unwrap().state.as_str(),
            end.counts.succeeded
        ),
        ("aborted", PHASE_SIZES[0]),
        "{end:#?}"
    );
    println!(
        "{DEVICES} devices enrolled in {:.1} s; of phase 2, {rolled_back} rolled back and \
         {never_tried} were held by the pause and never tried; whole test {:.1} s",
        enrolled_in.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );

    let mut devices: Vec<Device> = members.into_iter().map(|m| m.device).collect();
    tokio::task::spawn_blocking(move || stop_all(&mut devices, Duration::from_secs(10)))
        .await
        .unwrap();
}
