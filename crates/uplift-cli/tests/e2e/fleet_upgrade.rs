//! The patent's method at fleet scale: one server upgrades many devices at
//! once, each over its own channel, each into its own inactive slot.

use crate::common;

use common::*;
use std::collections::HashSet;
use uplift_proto::channel::AgentState;
use uplift_proto::SlotName;

const DEVICES: usize = 50;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_devices_upgrade_concurrently_each_with_its_own_id_and_slots() {
    let fx = Fixture::start();
    let devices: Vec<_> = (0..DEVICES)
        .map(|i| fx.device(&format!("d{i:02}"), fx.spec(&format!("hw-{i:02}"))))
        .collect();
    let all: Vec<_> = devices.iter().collect();
    fx.wait_for("all devices enrolled on 1.0", &all, |views| {
        views.len() == DEVICES
            && views.iter().all(|d| {
                d.online && d.running_version == Some(v("1.0")) && d.state == Some(AgentState::Idle)
            })
    })
    .await;

    let ids: HashSet<String> = devices
        .iter()
        .map(|d| d.device_id().expect("enrolled"))
        .collect();
    assert_eq!(ids.len(), DEVICES, "every device got its own ID");

    fx.release("1.1", DEVICE_TYPE, &fx.image_v1_1, &fx.key)
        .await;
    let rollout = fx.rollout("1.1", None).await;
    let views = fx
        .wait_for("all devices on 1.1", &all, |views| {
            views
                .iter()
                .all(|d| d.running_version == Some(v("1.1")) && d.state == Some(AgentState::Idle))
        })
        .await;
    assert!(views.iter().all(|d| d.last_error.is_none()), "{views:#?}");

    let status = fx.client.rollout(rollout).await.unwrap();
    assert_eq!(
        (
            status.counts.succeeded,
            status.counts.failed,
            status.status.as_str()
        ),
        (DEVICES as u64, 0, "finished")
    );

    let new_image = sha256_file(&fx.image_v1_1);
    let old_image = sha256_file(&fx.image_v1_0);
    for device in &devices {
        let boot = device.boot_state().unwrap();
        assert_eq!(
            boot.default_slot,
            SlotName::B,
            "{} boots the new slot",
            device.dir.display()
        );
        assert!(
            boot.trial.is_none() && boot.fallback_from.is_none(),
            "{boot:?}"
        );
        assert_eq!(
            sha256_file(&device.slot_path(SlotName::B)),
            new_image,
            "slot B holds exactly release 1.1"
        );
        assert_eq!(
            sha256_file(&device.slot_path(SlotName::A)),
            old_image,
            "the running slot was never written"
        );
    }
}
