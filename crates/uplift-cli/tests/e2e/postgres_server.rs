//! The real `uplift-server` on PostgreSQL (`[database] url`): real agents
//! enroll and go through one upgrade, and the fleet's state is in the
//! database, not the data directory: a second server with an empty data
//! directory on the same database sees every device on the new release
//! and the rollout finished.

use crate::common;

use common::*;
use uplift_fleet::{ServerLaunch, ServerProcess};
use uplift_proto::channel::AgentState;
use uplift_sim::postgres::TestPostgres;

const DEVICES: usize = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_on_postgresql_upgrades_devices_and_keeps_the_fleet_in_the_database() {
    let Some(pg) = TestPostgres::start() else {
        return;
    };
    let url = pg.create_database("uplift").unwrap();
    let config = format!("[database]\nurl = \"{url}\"\nmax_connections = 8\n");
    let launch = ServerLaunch {
        config_toml: Some(config.clone()),
        ..ServerLaunch::on("127.0.0.1:0")
    };
    let mut fx = Fixture::start_async(launch).await;
    let devices: Vec<_> = (0..DEVICES)
        .map(|i| fx.device(&format!("d{i}"), fx.spec(&format!("hw-{i}"))))
        .collect();
    let all: Vec<_> = devices.iter().collect();
    fx.wait_for("all devices enrolled on 1.0", &all, |views| {
        views.len() == DEVICES
            && views.iter().all(|d| {
                d.online && d.running_version == Some(v("1.0")) && d.state == Some(AgentState::Idle)
            })
    })
    .await;
    fx.release("1.1", DEVICE_TYPE, &fx.image_v1_1, &fx.key)
        .await;
    let rollout = fx.rollout("1.1", None).await;
    fx.wait_for("all devices on 1.1", &all, |views| {
        views
            .iter()
            .all(|d| d.running_version == Some(v("1.1")) && d.state == Some(AgentState::Idle))
    })
    .await;
    // The rollout's counts are the database's: a write interval behind
    // the reports the device views show.
    let deadline = std::time::Instant::now() + WAIT;
    let status = loop {
        let status = fx.client.rollout(rollout).await.unwrap();
        if status.status.as_str() == "finished" || std::time::Instant::now() > deadline {
            break status;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert_eq!(
        (
            status.counts.succeeded,
            status.counts.failed,
            status.status.as_str()
        ),
        (DEVICES as u64, 0, "finished")
    );
    assert!(
        !fx.server.dir.join("uplift.db").exists(),
        "the server kept its state in PostgreSQL, not SQLite"
    );
    // A graceful stop writes the last reports (the writer batches them).
    fx.server.stop();

    // Another server, its data directory empty, on the same database.
    let other_dir = fx.dir.path().join("other-server");
    let bins = fx.bins.clone();
    let other = tokio::task::spawn_blocking(move || {
        ServerProcess::launch(
            &bins,
            &other_dir,
            &ServerLaunch {
                config_toml: Some(config),
                ..ServerLaunch::on("127.0.0.1:0")
            },
        )
    })
    .await
    .unwrap()
    .expect("a second server starts on the same database");
    let client = other.client().unwrap();
    let devices_seen = client.devices().await.unwrap();
    assert_eq!(devices_seen.len(), DEVICES, "{devices_seen:#?}");
    assert!(
        devices_seen
            .iter()
            .all(|d| d.running_version == Some(v("1.1"))
                && d.state == Some(AgentState::Idle)
                && !d.online),
        "{devices_seen:#?}"
    );
    let status = client.rollout(rollout).await.unwrap();
    assert_eq!(
        (status.counts.succeeded, status.status.as_str()),
        (DEVICES as u64, "finished")
    );
    let releases = client.releases().await.unwrap();
    assert!(releases.iter().any(|r| r.version == v("1.1")));
    drop(other);
    drop(fx);
    drop(pg);
}
