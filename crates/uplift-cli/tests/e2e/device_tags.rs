//! Tags and history end to end: real server, real agents, the operator's
//! `uplift` commands. An operator tags two devices of four, starts a
//! rollout of the tag, and only those two upgrade; the history of one of
//! them then tells the upgrade step by step, with the bytes it fetched.

use crate::common;

use common::*;
use std::time::Instant;
use uplift_proto::api::{DeviceEventKind, DeviceHistory, DevicePage, RolloutView};
use uplift_proto::channel::AgentState;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_of_a_tag_upgrades_only_the_tagged_devices_and_their_history_tells_how() {
    let fx = Fixture::start();
    let devices: Vec<_> = (0..4)
        .map(|i| fx.device(&format!("d{i}"), fx.spec(&format!("hw-tags-{i}"))))
        .collect();
    for device in &devices {
        fx.wait_enrolled(device).await;
    }
    let ids: Vec<String> = devices.iter().map(|d| id_of(d).to_string()).collect();
    let (tagged, untagged) = ids.split_at(2);

    for id in tagged {
        let out = uplift(&fx, &["devices", "tag", id, "--add", "canary,site:berlin"]);
        assert_eq!(out.trim(), format!("{id}: canary, site:berlin"));
    }
    let listed: DevicePage = uplift_json(&fx, &["devices", "list", "--tag", "canary", "--online"]);
    let mut listed: Vec<String> = listed.devices.iter().map(|d| d.id.to_string()).collect();
    listed.sort();
    let mut want = tagged.to_vec();
    want.sort();
    assert_eq!(listed, want);

    fx.release("1.1", DEVICE_TYPE, &fx.image_v1_1, &fx.key)
        .await;
    let started: RolloutView = uplift_json(
        &fx,
        &[
            "rollout",
            "start",
            "--release",
            "1.1",
            "--tag",
            "canary",
            "--from-version",
            "1.0",
        ],
    );
    assert_eq!(started.devices_total, 2, "{started:?}");

    let all: Vec<_> = devices.iter().collect();
    let views = fx
        .wait_for("the tagged devices on 1.1", &all, |views| {
            views
                .iter()
                .filter(|d| tagged.contains(&d.id.to_string()))
                .all(|d| d.running_version == Some(v("1.1")) && d.state == Some(AgentState::Idle))
        })
        .await;
    for d in views
        .iter()
        .filter(|d| untagged.contains(&d.id.to_string()))
    {
        assert_eq!(d.running_version, Some(v("1.0")), "{d:?}");
        assert_eq!(
            (d.target_version.as_ref(), d.rollout_id),
            (None, None),
            "never offered: {d:?}"
        );
    }
    let status = fx.client.rollout(started.id).await.unwrap();
    assert_eq!(
        (status.counts.succeeded, status.status.as_str()),
        (2, "finished")
    );

    // The history of an upgraded device, oldest first, as the operator reads it.
    let id = &tagged[0];
    let deadline = Instant::now() + WAIT;
    let text = loop {
        let text = uplift(&fx, &["devices", "history", id]);
        if text.contains("committed") {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "no commit in the history:\n{text}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    let order = [
        "offer",
        "download_started",
        "download_finished",
        "installed",
        "reboot",
        "committed",
    ];
    let kinds: Vec<&str> = text
        .lines()
        .skip(1)
        .filter_map(|line| line.split_whitespace().nth(1))
        .collect();
    assert_eq!(kinds, order, "{text}");
    let finished = text
        .lines()
        .find(|l| l.contains("download_finished"))
        .unwrap();
    assert!(
        finished.contains("fetched") && finished.contains("reused"),
        "{finished}"
    );

    // The same as JSON: the bytes, and the slots.
    let history: DeviceHistory = uplift_json(&fx, &["devices", "history", id]);
    let events: Vec<&DeviceEventKind> = history.events.iter().rev().map(|e| &e.event).collect();
    match events[..] {
        [DeviceEventKind::Offer {
            rollout_id,
            version: offered,
        }, DeviceEventKind::DownloadStarted { .. }, DeviceEventKind::DownloadFinished {
            total_bytes,
            fetched_bytes,
            reused_bytes,
            ..
        }, DeviceEventKind::Installed { slot, .. }, DeviceEventKind::Reboot {
            from_slot, to_slot, ..
        }, DeviceEventKind::Committed { version, .. }] => {
            assert_eq!((*rollout_id, offered), (started.id, &v("1.1")));
            assert_eq!(*total_bytes, IMAGE_SIZE);
            // The new image shares most chunks with the running one.
            assert!(
                *fetched_bytes > 0 && *reused_bytes > 0,
                "{fetched_bytes} fetched, {reused_bytes} reused"
            );
            assert_eq!(
                (*from_slot, *to_slot),
                (slot.other(), *slot),
                "booted what was written"
            );
            assert_eq!(version, &v("1.1"));
        }
        _ => panic!("unexpected history: {events:#?}"),
    }
    assert!(history.next.is_none());
    // An untagged device has nothing to tell.
    let quiet: DeviceHistory = uplift_json(&fx, &["devices", "history", &untagged[0]]);
    assert!(quiet.events.is_empty(), "{quiet:?}");
}
