//! Phased rollouts end to end: real server, real agents, the operator's
//! `uplift` commands. A phase waits for the one before it (and for approval
//! when asked), and failures in a phase pause the rollout by itself before
//! the rest of the fleet is offered anything.

use crate::common;

use common::*;
use std::num::NonZeroU32;
use std::time::Duration;
use uplift_fleet::Device;
use uplift_proto::api::{DeviceView, PhaseTally, RolloutCreate, RolloutMember};
use uplift_proto::channel::AgentState;
use uplift_proto::policy::{PhaseReach, RolloutPolicy};
use uplift_proto::SlotName;

fn on(views: &[DeviceView], version: &str) -> usize {
    views
        .iter()
        .filter(|d| d.running_version == Some(v(version)) && d.state == Some(AgentState::Idle))
        .count()
}

async fn enrolled_fleet(
    fx: &Fixture,
    names: &[&str],
    spec: impl Fn(&str) -> uplift_fleet::DeviceSpec,
) -> Vec<Device> {
    let devices: Vec<Device> = names.iter().map(|n| fx.device(n, spec(n))).collect();
    for device in &devices {
        fx.wait_enrolled(device).await;
    }
    devices
}

fn phased(phases: Vec<PhaseReach>, approval: bool) -> RolloutCreate {
    RolloutCreate {
        release: v("1.1"),
        devices: None,
        tags: None,
        from_versions: Vec::new(),
        allow_downgrade: false,
        limits: Default::default(),
        policy: RolloutPolicy {
            phases,
            approval,
            ..RolloutPolicy::default()
        },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_next_phase_starts_only_after_the_canary_succeeds_and_an_operator_approves() {
    let fx = Fixture::start();
    let devices = enrolled_fleet(&fx, &["p1", "p2", "p3", "p4"], |n| {
        fx.spec(&format!("hw-{n}"))
    })
    .await;
    fx.release("1.1", DEVICE_TYPE, &fx.image_v1_1, &fx.key)
        .await;
    let canary = PhaseReach::Count(NonZeroU32::new(1).unwrap());
    let id = fx.rollout_with(phased(vec![canary], true)).await;
    let view = fx.client.rollout(id).await.unwrap();
    let progress = view.progress.expect("a phased rollout shows its phases");
    assert_eq!(
        progress.phase_sizes,
        vec![1, 3],
        "one canary, three after it"
    );

    let refs: Vec<&Device> = devices.iter().collect();
    let views = fx
        .wait_for("the canary on 1.1", &refs, |views| on(views, "1.1") == 1)
        .await;
    assert_eq!(on(&views, "1.0"), 3);
    // The scheduler ticks every second; give it a few to notice the canary.
    let waiting = rollout_reaching(&fx, id, "awaiting_approval").await;
    assert_eq!(waiting.progress.unwrap().state, "awaiting_approval");
    // Long enough for offers and downloads to start, were any made.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let views = fx.client.devices().await.unwrap();
    assert_eq!(
        on(&views, "1.0"),
        3,
        "no device past the canary moves before approval"
    );
    assert!(
        views
            .iter()
            .filter(|d| d.running_version == Some(v("1.0")))
            .all(|d| d.target_version.is_none()),
        "nor is offered anything: {views:#?}"
    );

    // Per phase, as `rollout status --watch` draws it: the canary offered
    // and succeeded, the rest not offered.
    let held = fx.client.rollout(id).await.unwrap().progress.unwrap();
    let tally = |devices, offered, succeeded| PhaseTally {
        devices,
        offered,
        succeeded,
        failed: 0,
    };
    assert_eq!(held.phase_tallies, vec![tally(1, 1, 1), tally(3, 0, 0)]);
    // Device by device, as `uplift rollout devices` lists them.
    let members: Vec<RolloutMember> = uplift_json(&fx, &["rollout", "devices", &id.to_string()]);
    let phases: Vec<(u32, bool, Option<&str>)> = members
        .iter()
        .map(|m| (m.phase, m.offered_at.is_some(), m.outcome.as_deref()))
        .collect();
    assert_eq!(
        phases,
        [
            (0, true, Some("succeeded")),
            (1, false, None),
            (1, false, None),
            (1, false, None)
        ]
    );
    assert_eq!(members[0].running_version, Some(v("1.1")));

    let approved = operator(&fx, "approve", id);
    assert_eq!(approved.progress.unwrap().state, "running");
    fx.wait_for("every device on 1.1", &refs, |views| on(views, "1.1") == 4)
        .await;
    let done = rollout_reaching(&fx, id, "finished").await;
    let progress = done.progress.clone().unwrap();
    assert_eq!(progress.state, "finished");
    assert_eq!(progress.phase_tallies, vec![tally(1, 1, 1), tally(3, 3, 3)]);
    assert_eq!(done.counts.succeeded, 4);

    // What Prometheus scrapes says the same (device rows reach the
    // database in batches, so allow it a few seconds).
    let mut metrics = String::new();
    for _ in 0..10 {
        metrics = fx.client.metrics().await.unwrap();
        if metrics.contains(r#"uplift_devices{state="idle",version="1.1"} 4"#) {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert!(
        metrics.contains(r#"uplift_devices{state="idle",version="1.1"} 4"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"uplift_rollouts{state="finished"} 1"#),
        "{metrics}"
    );
    assert!(metrics.contains("uplift_sessions_connected 4"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_in_the_first_phase_pause_the_rollout_before_the_rest_is_offered() {
    let fx = Fixture::start();
    // Every device's service fails on the new OS (slot b).
    let devices = enrolled_fleet(&fx, &["f1", "f2", "f3", "f4", "f5"], |n| {
        fx.spec_failing_on_slot_b(n)
    })
    .await;
    fx.release("1.1", DEVICE_TYPE, &fx.image_v1_1, &fx.key)
        .await;
    let id = fx
        .rollout_with(phased(vec![PhaseReach::Percent(40)], false))
        .await;

    let refs: Vec<&Device> = devices.iter().collect();
    let rolled_back = |views: &[DeviceView]| {
        views
            .iter()
            .filter(|d| d.state == Some(AgentState::RolledBack))
            .count()
    };
    fx.wait_for("a canary to roll back", &refs, |views| {
        rolled_back(views) >= 1
    })
    .await;
    let progress = rollout_reaching(&fx, id, "paused").await.progress.unwrap();
    assert_eq!(progress.state, "paused", "{progress:#?}");
    let why = progress.paused_because.unwrap();
    assert!(
        why.contains("over the error threshold") && why.contains("service fails on the new OS"),
        "the operator sees which devices failed and why: {why}"
    );

    // Let both canaries finish (and the scheduler see it); the three of the
    // final phase were never offered.
    fx.wait_for("both canaries to roll back", &refs, |views| {
        rolled_back(views) == 2
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let views = fx.client.devices().await.unwrap();
    let untouched = views
        .iter()
        .filter(|d| {
            d.running_version == Some(v("1.0"))
                && d.state == Some(AgentState::Idle)
                && d.target_version.is_none()
        })
        .count();
    assert_eq!(untouched, 3, "{views:#?}");

    let aborted = operator(&fx, "abort", id);
    assert_eq!(aborted.progress.unwrap().state, "aborted");
    // Retry is a new rollout of exactly the devices that failed.
    let retried = operator(&fx, "retry", id);
    assert_ne!(retried.id, id);
    assert_eq!(retried.devices_total, 2, "{retried:#?}");
    let views = fx
        .wait_for("the canaries back on 1.0", &refs, |views| {
            views.iter().all(|d| {
                d.running_version == Some(v("1.0")) && d.state != Some(AgentState::Testing)
            })
        })
        .await;
    assert_eq!(views.len(), 5);
    for device in &devices {
        let boot = device.boot_state().unwrap();
        assert_eq!(
            (boot.default_slot, boot.trial),
            (SlotName::A, None),
            "every device boots its good slot"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_stops_a_download_in_progress_and_the_device_stays_on_its_os() {
    let fx = Fixture::start();
    let addr = fx
        .server
        .endpoint
        .url
        .trim_start_matches("https://")
        .parse()
        .unwrap();
    let proxy = uplift_fleet::Proxy::start(addr).await.unwrap();
    let device = fx.device_via("slow", fx.spec("hw-slow"), &proxy.url());
    fx.wait_enrolled(&device).await;
    // A release sharing nothing with the factory image, over a slow link:
    // the download takes seconds, time enough to abort it midway.
    let image = fx.path("images/fresh-2.0.img");
    uplift_fleet::write_image(&image, IMAGE_SIZE, 2000).unwrap();
    fx.release("2.0", DEVICE_TYPE, &image, &fx.key).await;
    proxy.set_rate(256 * 1024);
    let mut request = phased(vec![], false);
    request.release = v("2.0");
    let id = fx.rollout_with(request).await;
    fx.wait_device(&device, "the download to start", |d| {
        d.state == Some(AgentState::Downloading) && d.progress.is_some_and(|p| p.done_bytes > 0)
    })
    .await;

    let aborted = operator(&fx, "abort", id);
    assert_eq!(aborted.progress.unwrap().state, "aborted");
    let view = fx
        .wait_device(&device, "the device to stop and go idle", |d| {
            d.state == Some(AgentState::Idle) && d.target_version.is_none()
        })
        .await;
    assert_eq!(view.running_version, Some(v("1.0")));
    let boot = device.boot_state().unwrap();
    assert_eq!((boot.default_slot, boot.trial), (SlotName::A, None));
    // Nothing more arrives: the download stopped, it did not run to its end.
    let sent = fx.client.stats().await.unwrap().bytes_sent;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let later = fx.client.stats().await.unwrap().bytes_sent;
    assert!(
        later - sent < 64 * 1024,
        "{} bytes after the abort",
        later - sent
    );
    assert!(
        fx.client.devices().await.unwrap()[0].state == Some(AgentState::Idle),
        "still idle on 1.0"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_enrolling_during_a_dynamic_rollout_joins_it_and_upgrades() {
    let fx = Fixture::start();
    let first = fx.device("early", fx.spec("hw-early"));
    let offline = fx.device("offline", fx.spec("hw-offline"));
    fx.wait_enrolled(&first).await;
    fx.wait_enrolled(&offline).await;
    // One device stays offline, so the rollout is still running when the
    // newcomer enrolls.
    let mut offline = offline;
    offline.stop();
    fx.release("1.1", DEVICE_TYPE, &fx.image_v1_1, &fx.key)
        .await;
    let mut request = phased(vec![], false);
    request.policy.dynamic = true;
    let id = fx.rollout_with(request).await;
    fx.wait_device(&first, "the first device on 1.1", |d| {
        d.running_version == Some(v("1.1")) && d.state == Some(AgentState::Idle)
    })
    .await;

    let late = fx.device("late", fx.spec("hw-late"));
    fx.wait_device(&late, "the newcomer on 1.1", |d| {
        d.running_version == Some(v("1.1")) && d.state == Some(AgentState::Idle)
    })
    .await;
    let view = fx.client.rollout(id).await.unwrap();
    assert_eq!(
        view.devices_total, 3,
        "the newcomer is one of the rollout's devices"
    );
    assert_eq!(view.counts.succeeded, 2);

    // A dynamic rollout targets a type, never a list.
    let mut listed = phased(vec![], false);
    listed.policy.dynamic = true;
    listed.devices = Some(vec![id_of(&first)]);
    let err = fx.client.start_rollout(&listed).await.unwrap_err();
    assert!(
        format!("{err:#}").contains("a dynamic rollout targets every device"),
        "{err:#}"
    );
}
