//! Decommissioning: an operator removes a device while it is connected; its
//! channel closes at once with a typed error the agent logs, it is no longer
//! listed, its key is refused from then on, its history is kept and says
//! who removed it; and the replacement board (same hardware ID, a fresh key)
//! enrolls with the fleet token as a new device.

use crate::common;

use common::*;
use std::time::{Duration, Instant};
use uplift_fleet::ServerLaunch;
use uplift_proto::auth::{AuditAction, AuditQuery};
use uplift_proto::channel::AgentState;

const AUTH_ERROR_EXIT: i32 = 2;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_device_is_cut_off_at_once_and_its_replacement_enrolls_as_a_new_device() {
    let fx = Fixture::start();
    let mut old = fx.device("board", fx.spec("hw-board-7"));
    let enrolled = fx
        .wait_device(&old, "enrollment", |d| {
            d.online && d.state == Some(AgentState::Idle)
        })
        .await;
    let id = enrolled.id.to_string();

    // Removed while connected, with the CLI.
    let started = Instant::now();
    let said = uplift(&fx, &["devices", "remove", &id]);
    assert!(said.contains(&format!("{id} removed at")), "{said}");
    // The channel closes now (not at the next reconnect or ping), and the
    // agent gives up with the typed error in its log.
    let status = old
        .wait_exit(Duration::from_secs(10))
        .expect("the removed device's agent is told and gives up");
    let cut_off = started.elapsed();
    assert_eq!(status.code(), Some(AUTH_ERROR_EXIT), "{}", old.log());
    assert!(old.log().contains("device_removed"), "{}", old.log());
    assert!(
        cut_off < Duration::from_secs(5),
        "cut off in {cut_off:?}, not at the next ping (20 s)"
    );
    eprintln!("removed device cut off {cut_off:?} after `uplift devices remove`");

    // No longer listed; kept, marked removed, its history saying so.
    assert!(fx.client.devices().await.unwrap().is_empty());
    let listed = uplift(&fx, &["devices", "list"]);
    assert!(!listed.contains(&id), "{listed}");
    let shown = uplift(&fx, &["devices", "show", &id]);
    assert!(shown.contains("removed:"), "{shown}");
    assert!(shown.contains("key revoked"), "{shown}");
    let history = uplift(&fx, &["devices", "history", &id]);
    assert!(
        history.contains("removed from the fleet by bootstrap-admin"),
        "{history}"
    );
    let audit = fx
        .client
        .audit(&AuditQuery {
            action: Some(AuditAction::DeviceRemove),
            ..AuditQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(audit.entries.len(), 1);
    assert_eq!(audit.entries[0].target, format!("device {id}"));
    let again = fx
        .client
        .remove_device(&enrolled.id)
        .await
        .expect_err("removed once only");
    assert!(
        format!("{again:#}").contains("already removed"),
        "{again:#}"
    );

    // The old key is refused from now on: the old board, started again as
    // it was, is told why and gives up.
    let before = old.log().matches("device_removed").count();
    old.start(&fx.bins).unwrap();
    let status = old.wait_exit(WAIT).expect("the old key is refused");
    assert_eq!(status.code(), Some(AUTH_ERROR_EXIT), "{}", old.log());
    assert!(
        old.log().matches("device_removed").count() > before,
        "{}",
        old.log()
    );
    assert!(old.log().contains("its key is revoked"), "{}", old.log());

    // The replacement: the same hardware ID, a fresh state (a new key),
    // the fleet token. A new key is a new identity: a new device ID, and
    // the old device's history stays the old board's.
    let new = fx.device("board-replaced", fx.spec("hw-board-7"));
    let replaced = fx
        .wait_device(&new, "the replacement's enrollment", |d| {
            d.online && d.state == Some(AgentState::Idle)
        })
        .await;
    assert_ne!(replaced.id, enrolled.id);
    assert_eq!(replaced.hardware_id.as_str(), "hw-board-7");
    let devices = fx.client.devices().await.unwrap();
    assert_eq!(devices.len(), 1);
    assert_eq!(devices[0].id, replaced.id);
    assert_eq!(devices[0].removed_at, None);
    let old_view = fx.client.device(&enrolled.id).await.unwrap();
    assert!(old_view.removed_at.is_some() && !old_view.online);
}

/// Two replicas on one PostgreSQL: a device connected to the first is
/// removed through the second, and the first closes its channel at once
/// (the removal travels as a NOTIFY); the device is refused by either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_removed_on_one_replica_is_cut_off_by_the_replica_holding_its_channel() {
    let Some(pg) = uplift_sim::postgres::TestPostgres::start() else {
        return;
    };
    let db = pg.create_database("uplift").unwrap();
    let config = format!("[database]\nurl = \"{db}\"\nmax_connections = 4\n");
    let launch = ServerLaunch {
        config_toml: Some(config.clone()),
        ..ServerLaunch::on("127.0.0.1:0")
    };
    let fx = Fixture::start_async(launch).await;
    let second = fx.start_replica("replica-2", &config).await;
    let second_client = second.client().unwrap();

    // Connected to the first replica only.
    let mut device = fx.device("board", fx.spec("hw-board-9"));
    let enrolled = fx
        .wait_device(&device, "enrollment", |d| {
            d.online && d.state == Some(AgentState::Idle)
        })
        .await;
    let started = Instant::now();
    second_client.remove_device(&enrolled.id).await.unwrap();
    let status = device
        .wait_exit(Duration::from_secs(10))
        .expect("the first replica closes the channel the second removed");
    let cut_off = started.elapsed();
    assert_eq!(status.code(), Some(AUTH_ERROR_EXIT), "{}", device.log());
    assert!(device.log().contains("device_removed"), "{}", device.log());
    eprintln!("removed on replica 2, cut off by replica 1 in {cut_off:?}");
    assert!(cut_off < Duration::from_secs(5), "{cut_off:?}");
    // Neither replica lists it; the second refuses its key too.
    assert!(fx.client.devices().await.unwrap().is_empty());
    assert!(second_client.devices().await.unwrap().is_empty());
    let second_url = second.endpoint.url.clone();
    let mut again = uplift_fleet::Device::provision(
        &fx.path("devices/board-again"),
        &fx.spec("hw-board-9"),
        &uplift_proto::api::ServerEndpoint {
            url: second_url,
            ..fx.server.endpoint.clone()
        },
        &fx.image_v1_0,
    )
    .unwrap();
    // The old board's state (key and device ID), pointed at the second replica.
    for file in ["device.key", "device-id"] {
        std::fs::copy(
            device.dir.join("state").join(file),
            again.dir.join("state").join(file),
        )
        .unwrap();
    }
    again.start(&fx.bins).unwrap();
    let status = again
        .wait_exit(WAIT)
        .expect("the second replica refuses it");
    assert_eq!(status.code(), Some(AUTH_ERROR_EXIT), "{}", again.log());
    assert!(again.log().contains("device_removed"), "{}", again.log());
    drop(second);
    drop(fx);
    drop(pg);
}
