//! Identity: a device enrolls only with the fleet token, gets an ID from the
//! server, and must prove on every connection that it holds the key it
//! enrolled with. Refusals store nothing and tell the device why.

use crate::common;

use common::*;
use std::time::Duration;
use uplift_proto::channel::AgentState;

const AUTH_ERROR_EXIT: i32 = 2;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_enrollment_token_is_refused_and_nothing_is_stored() {
    let fx = Fixture::start();
    let mut spec = fx.spec("hw-intruder");
    spec.enrollment_token = "not-the-fleet-token".into();
    let mut device = fx.device("intruder", spec);
    let status = device
        .wait_exit(WAIT)
        .expect("the agent gives up on a refused enrollment");
    assert_eq!(status.code(), Some(AUTH_ERROR_EXIT), "{}", device.log());
    assert!(
        device.log().contains("enrollment_refused"),
        "{}",
        device.log()
    );
    assert!(device.device_id().is_none(), "no ID was assigned");
    assert!(
        fx.client.devices().await.unwrap().is_empty(),
        "the server stored no device"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_known_id_with_the_wrong_key_is_refused() {
    let fx = Fixture::start();
    let mut device = fx.device("victim", fx.spec("hw-victim"));
    let before = fx
        .wait_device(&device, "enrollment", |d| {
            d.online && d.state == Some(AgentState::Idle)
        })
        .await;
    device.stop();
    // Same ID, different key: what a cloned or stolen identity looks like.
    std::fs::write(device.dir.join("state/device.key"), hex::encode([9u8; 32])).unwrap();
    device.start(&fx.bins).unwrap();
    let status = device.wait_exit(WAIT).expect("the agent gives up");
    assert_eq!(status.code(), Some(AUTH_ERROR_EXIT), "{}", device.log());
    assert!(
        device.log().contains("bad_device_signature"),
        "{}",
        device.log()
    );
    let devices = fx.client.devices().await.unwrap();
    assert_eq!(devices.len(), 1, "nothing new stored");
    assert_eq!(devices[0].id, before.id);
    assert!(!devices[0].online);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_claiming_another_devices_id_is_refused_and_the_other_is_unaffected() {
    let fx = Fixture::start();
    let honest = fx.device("honest", fx.spec("hw-honest"));
    fx.wait_device(&honest, "enrollment", |d| d.online).await;
    let honest_id = honest.device_id().unwrap();

    let spec = fx.spec("hw-impostor");
    let mut impostor = uplift_fleet::Device::provision(
        &fx.path("devices/impostor"),
        &spec,
        &fx.server.endpoint,
        &fx.image_v1_0,
    )
    .unwrap();
    std::fs::write(impostor.dir.join("state/device-id"), &honest_id).unwrap();
    impostor.start(&fx.bins).unwrap();
    let status = impostor.wait_exit(WAIT).expect("the impostor is refused");
    assert_eq!(status.code(), Some(AUTH_ERROR_EXIT), "{}", impostor.log());
    assert!(
        impostor.log().contains("bad_device_signature"),
        "{}",
        impostor.log()
    );

    tokio::time::sleep(Duration::from_millis(300)).await;
    let devices = fx.client.devices().await.unwrap();
    assert_eq!(devices.len(), 1);
    assert!(
        devices[0].online,
        "the honest device's channel was not displaced"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enrollment_token_made_by_an_admin_enrolls_until_it_is_revoked() {
    let fx = Fixture::start();
    let line: uplift_proto::auth::TokenCreated = uplift_json(
        &fx,
        &[
            "token",
            "create",
            "--name",
            "factory-line-2",
            "--role",
            "enrollment",
            "--expires-in",
            "7d",
        ],
    );
    let mut spec = fx.spec("hw-line2-a");
    spec.enrollment_token = line.secret.clone();
    let first = fx.device("line2-a", spec);
    fx.wait_enrolled(&first).await;

    uplift(&fx, &["token", "revoke", &line.token.id.to_string()]);
    let mut spec = fx.spec("hw-line2-b");
    spec.enrollment_token = line.secret.clone();
    let mut late = fx.device("line2-b", spec);
    let status = late
        .wait_exit(WAIT)
        .expect("a revoked token enrolls no more");
    assert_eq!(status.code(), Some(AUTH_ERROR_EXIT), "{}", late.log());
    assert!(late.log().contains("enrollment_refused"), "{}", late.log());
    assert!(
        late.log().contains(&format!(
            "enrollment token {} (factory-line-2) was revoked at",
            line.token.id
        )),
        "says which token and why: {}",
        late.log()
    );
    let devices = fx.client.devices().await.unwrap();
    assert_eq!(
        devices.len(),
        1,
        "only the device enrolled before the revocation"
    );
    assert_eq!(devices[0].hardware_id.as_str(), "hw-line2-a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_enrollment_token_is_refused_saying_it_expired() {
    let fx = Fixture::start();
    let batch: uplift_proto::auth::TokenCreated = uplift_json(
        &fx,
        &[
            "token",
            "create",
            "--name",
            "batch-7",
            "--role",
            "enrollment",
            "--expires-in",
            "1s",
        ],
    );
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let mut spec = fx.spec("hw-batch7");
    spec.enrollment_token = batch.secret.clone();
    let mut late = fx.device("batch7", spec);
    let status = late
        .wait_exit(WAIT)
        .expect("an expired token enrolls nobody");
    assert_eq!(status.code(), Some(AUTH_ERROR_EXIT), "{}", late.log());
    assert!(
        late.log().contains(&format!(
            "enrollment token {} (batch-7) expired at",
            batch.token.id
        )),
        "says it expired: {}",
        late.log()
    );
    assert!(fx.client.devices().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enrollment_token_limited_to_one_use_enrolls_one_device_then_says_it_is_used_up() {
    let fx = Fixture::start();
    let once: uplift_proto::auth::TokenCreated = uplift_json(
        &fx,
        &[
            "token",
            "create",
            "--name",
            "one-board",
            "--role",
            "enrollment",
            "--max-uses",
            "1",
        ],
    );
    assert_eq!((once.token.max_uses, once.token.uses), (Some(1), 0));
    let mut spec = fx.spec("hw-first");
    spec.enrollment_token = once.secret.clone();
    let first = fx.device("first", spec);
    fx.wait_enrolled(&first).await;

    let mut spec = fx.spec("hw-second");
    spec.enrollment_token = once.secret.clone();
    let mut second = fx.device("second", spec);
    let status = second
        .wait_exit(WAIT)
        .expect("a used-up token enrolls no more");
    assert_eq!(status.code(), Some(AUTH_ERROR_EXIT), "{}", second.log());
    assert!(
        second.log().contains(&format!(
            "enrollment token {} (one-board) is used up (1 of 1 uses",
            once.token.id
        )),
        "says it is used up: {}",
        second.log()
    );
    assert_eq!(fx.client.devices().await.unwrap().len(), 1);
    // The operator sees it in the token list.
    let list = uplift(&fx, &["token", "list"]);
    assert!(list.contains("used 1 of 1"), "{list}");
}
