//! Reboot windows end to end: real server, real agents under the boot
//! simulator, the operator's `uplift` commands. With a window that applies
//! to the reboot, devices download, write and verify the release at once
//! and then hold it, the boot environment untouched, until the window
//! opens; an abort while they hold withdraws the verified slot and every
//! device stays on the OS it runs.

use crate::common;

use common::*;
use std::time::Duration;
use time::OffsetDateTime;
use uplift_fleet::Device;
use uplift_proto::api::{DevicePage, DeviceView, RolloutView};
use uplift_proto::channel::AgentState;
use uplift_proto::SlotName;

async fn enrolled_fleet(fx: &Fixture, names: &[&str]) -> Vec<Device> {
    let devices: Vec<Device> = names
        .iter()
        .map(|n| fx.device(n, fx.spec(&format!("hw-{n}"))))
        .collect();
    for device in &devices {
        fx.wait_enrolled(device).await;
    }
    devices
}

/// `uplift rollout start` of 1.1 with a reboot window opening daily at
/// `at` (UTC) for `minutes`.
fn start_with_reboot_window(fx: &Fixture, at: OffsetDateTime, minutes: u32) -> RolloutView {
    let cron = format!("{} {} * * *", at.minute(), at.hour());
    uplift_json(
        fx,
        &[
            "rollout",
            "start",
            "--release",
            "1.1",
            "--window",
            &cron,
            "--window-minutes",
            &minutes.to_string(),
            "--time-zone",
            "UTC",
            "--window-applies-to",
            "reboot",
        ],
    )
}

fn awaiting_reboot(views: &[DeviceView]) -> usize {
    views
        .iter()
        .filter(|d| {
            d.state == Some(AgentState::AwaitingReboot)
                && d.running_version == Some(v("1.0"))
                && d.target_version == Some(v("1.1"))
        })
        .count()
}

/// The device runs slot a, the boot environment neither boots nor tries
/// slot b, and no boot so far was of slot b.
fn assert_never_switched(device: &Device, what: &str) {
    let boot = device.boot_state().unwrap();
    assert_eq!(
        (boot.default_slot, boot.trial, boot.fallback_from),
        (SlotName::A, None, None),
        "{what}: the boot environment does not point at slot b ({})",
        device.dir.display()
    );
    let cmdline = std::fs::read_to_string(device.cmdline_path()).unwrap();
    assert!(cmdline.contains("uplift.slot=a"), "{what}: {cmdline}");
    let log = device.log();
    assert!(
        !log.lines()
            .any(|l| l.contains("boot-sim: boot #") && l.contains("slot b")),
        "{what}: never booted slot b:\n{log}"
    );
}

/// What the device's journal says about a verified slot awaiting its reboot.
fn journal_awaiting(device: &Device) -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(device.dir.join("state/journal.json")).unwrap();
    let journal: serde_json::Value = serde_json::from_str(&text).unwrap();
    journal.get("awaiting_reboot").cloned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_reboot_window_holds_verified_slots_and_an_abort_withdraws_them() {
    let fx = Fixture::start();
    let mut devices = enrolled_fleet(&fx, &["w1", "w2", "w3"]).await;
    fx.release("1.1", DEVICE_TYPE, &fx.image_v1_1, &fx.key)
        .await;
    // Opens twelve hours from now: closed for the whole test.
    let started = start_with_reboot_window(
        &fx,
        OffsetDateTime::now_utc() + time::Duration::hours(12),
        60,
    );
    let id = started.id;
    let window = started.progress.unwrap().policy.window.unwrap();
    assert_eq!(window.applies_to.as_str(), "reboot");

    let refs: Vec<&Device> = devices.iter().collect();
    let views = fx
        .wait_for("every device to hold 1.1 verified", &refs, |views| {
            awaiting_reboot(views) == 3
        })
        .await;
    let listed: Vec<DeviceView> = uplift_json::<DevicePage>(&fx, &["devices", "list"]).devices;
    assert!(
        listed
            .iter()
            .all(|d| d.state == Some(AgentState::AwaitingReboot)),
        "`uplift devices list` shows it: {listed:#?}"
    );
    assert!(views.iter().all(|d| d.online));
    let status = operator(&fx, "status", id);
    assert_eq!(
        (
            status.counts.awaiting_reboot,
            status.counts.in_progress,
            status.counts.succeeded
        ),
        (3, 3, 0),
        "{status:#?}"
    );
    for device in &devices {
        assert_never_switched(device, "awaiting the window");
        assert!(
            journal_awaiting(device).is_some(),
            "the device remembers it"
        );
    }
    // Time enough for a reboot, were any allowed.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let views = fx.client.devices().await.unwrap();
    assert_eq!(awaiting_reboot(&views), 3, "still holding: {views:#?}");

    // Power-cycled while holding: it comes back holding, from its own
    // records, without downloading anything again or switching.
    let sent = fx.client.stats().await.unwrap().bytes_sent;
    assert!(devices[0].kill_agent(), "the agent was running");
    devices[0].start(&fx.bins).unwrap();
    let refs: Vec<&Device> = devices.iter().collect();
    fx.wait_for("the restarted device to hold again", &refs, |views| {
        awaiting_reboot(views) == 3 && views.iter().all(|d| d.online)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        fx.client.stats().await.unwrap().bytes_sent,
        sent,
        "nothing fetched again"
    );
    assert_never_switched(&devices[0], "after a restart while holding");

    let aborted = operator(&fx, "abort", id);
    assert_eq!(aborted.progress.unwrap().state, "aborted");
    let views = fx
        .wait_for("every device idle on 1.0", &refs, |views| {
            views.iter().all(|d| {
                d.state == Some(AgentState::Idle)
                    && d.running_version == Some(v("1.0"))
                    && d.target_version.is_none()
            })
        })
        .await;
    assert!(views.iter().all(|d| d.online));
    // Time enough for a reboot, were the withdrawal to trigger one.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for device in &devices {
        assert_never_switched(device, "after the abort");
        assert_eq!(
            journal_awaiting(device),
            None,
            "the verified slot is withdrawn"
        );
    }
    let views = fx.client.devices().await.unwrap();
    assert!(
        views
            .iter()
            .all(|d| d.state == Some(AgentState::Idle) && d.running_version == Some(v("1.0"))),
        "{views:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_holding_a_verified_slot_reboot_into_it_when_the_reboot_window_opens() {
    let fx = Fixture::start();
    let devices = enrolled_fleet(&fx, &["o1", "o2"]).await;
    fx.release("1.1", DEVICE_TYPE, &fx.image_v1_1, &fx.key)
        .await;
    // The window opens at the first minute boundary at least 10 s away
    // (time for both devices to download and verify before it: 0.1 s on an
    // idle machine, and the assertion below says if it was not enough),
    // and stays open ten minutes.
    let now = OffsetDateTime::now_utc();
    let soon = now + time::Duration::seconds(10);
    let opens = soon
        .replace_second(0)
        .unwrap()
        .replace_nanosecond(0)
        .unwrap()
        + time::Duration::minutes(1);
    let id = start_with_reboot_window(&fx, opens, 10).id;

    let refs: Vec<&Device> = devices.iter().collect();
    fx.wait_for("both devices to hold 1.1 verified", &refs, |views| {
        awaiting_reboot(views) == 2
    })
    .await;
    assert!(
        OffsetDateTime::now_utc() < opens,
        "the devices took too long to verify to see them hold"
    );
    for device in &devices {
        assert_never_switched(device, "before the window opens");
    }

    let limit = (opens - OffsetDateTime::now_utc()).unsigned_abs() + WAIT;
    fx.wait_for_within("both devices on 1.1", limit, &refs, |views| {
        views
            .iter()
            .all(|d| d.state == Some(AgentState::Idle) && d.running_version == Some(v("1.1")))
    })
    .await;
    assert!(
        OffsetDateTime::now_utc() >= opens,
        "nobody rebooted before the window opened"
    );
    for device in &devices {
        let boot = device.boot_state().unwrap();
        assert_eq!(
            (boot.default_slot, boot.trial),
            (SlotName::B, None),
            "committed on slot b"
        );
        assert_eq!(journal_awaiting(device), None);
    }
    let view = rollout_reaching(&fx, id, "finished").await;
    assert_eq!(view.progress.unwrap().state, "finished");
    assert_eq!((view.counts.succeeded, view.counts.awaiting_reboot), (2, 0));
}
