//! After the trial boot the agent runs its health check; a failure puts the
//! device back on its old slot and version, and the operator sees why.

use crate::common;

use common::*;
use uplift_proto::channel::AgentState;
use uplift_proto::{ErrorKind, SlotName};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_health_check_rolls_back_to_the_old_slot_and_is_not_retried() {
    let fx = Fixture::start();
    // Healthy on slot a only: the new OS "breaks" the device's service.
    let mut device = fx.device("fragile", fx.spec_failing_on_slot_b("fragile"));
    fx.wait_enrolled(&device).await;
    fx.release("1.1", DEVICE_TYPE, &fx.image_v1_1, &fx.key)
        .await;
    let rollout = fx.rollout("1.1", None).await;

    let view = fx
        .wait_device(&device, "the rollback to be reported", |d| {
            d.state == Some(AgentState::RolledBack)
                && d.running_version == Some(v("1.0"))
                && d.online
        })
        .await;
    let error = view.last_error.expect("reason reported");
    assert_eq!(error.kind, ErrorKind::HealthCheckFailed);
    assert!(
        error.message.contains("service fails on the new OS"),
        "{error}"
    );
    let boot = device.boot_state().unwrap();
    assert_eq!(
        (boot.default_slot, boot.trial, boot.fallback_from),
        (SlotName::A, None, None),
        "back on slot a"
    );
    assert!(device.log().contains("boot #3: slot a"), "{}", device.log());
    let status = fx.client.rollout(rollout).await.unwrap();
    assert_eq!((status.counts.failed, status.counts.succeeded), (1, 0));

    // Power-cycle: the rolled-back release is offered again but not reinstalled.
    // bytes_sent counts manifest fetches too: a reinstall fetches the
    // manifest even when slot b still holds every chunk.
    let sent = fx.client.stats().await.unwrap().bytes_sent;
    let env_before = std::fs::read(device.bootenv_path()).unwrap();
    device.stop();
    device.start(&fx.bins).unwrap();
    fx.wait_device(&device, "reconnect", |d| {
        d.online && d.state == Some(AgentState::RolledBack)
    })
    .await;
    // Long enough for the repeated offer, a manifest fetch and the first
    // chunks, were the release wrongly installed again.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    assert_eq!(
        fx.client.stats().await.unwrap().bytes_sent,
        sent,
        "not downloaded again"
    );
    assert_eq!(
        std::fs::read(device.bootenv_path()).unwrap(),
        env_before,
        "no new trial: the boot environment is as it was"
    );
}
