//! What the web console reads, end to end: a real server, real agents and
//! the operator's `uplift` commands. The fleet summary counts a small fleet
//! before, during and after an upgrade; each device shows the slot it booted
//! and the address its channel came from; a release shows who signed it and
//! when it expires; a dry run previews a rollout without starting it.

use crate::common;

use common::*;
use std::time::{Duration, Instant};
use uplift_proto::api::{DeviceView, FleetSummary, ReleaseView, RolloutPreview, RolloutView};
use uplift_proto::channel::AgentState;
use uplift_proto::SlotName;

/// The summary once `done` holds (it is counted by the database, a write
/// interval behind the devices), or a failure showing the last one.
async fn fleet_reaching(
    fx: &Fixture,
    what: &str,
    done: impl Fn(&FleetSummary) -> bool,
) -> FleetSummary {
    let deadline = Instant::now() + WAIT;
    loop {
        let summary = fx.client.fleet().await.expect("fleet summary");
        if done(&summary) {
            return summary;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for a fleet summary with {what}: {summary:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The device's address is this machine's, on some port.
fn from_here(d: &DeviceView) -> bool {
    d.address
        .as_deref()
        .and_then(|a| a.strip_prefix("127.0.0.1:"))
        .and_then(|port| port.parse::<u16>().ok())
        .is_some_and(|port| port > 0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_sees_the_fleet_its_devices_addresses_releases_and_rollout_previews() {
    let fx = Fixture::start();
    let names = ["c1", "c2", "c3"];
    let devices: Vec<_> = names
        .iter()
        .map(|n| fx.device(n, fx.spec(&format!("hw-{n}"))))
        .collect();
    let all: Vec<_> = devices.iter().collect();
    fx.wait_for("three devices idle on 1.0", &all, |views| {
        views.len() == 3
            && views
                .iter()
                .all(|d| d.online && d.state == Some(AgentState::Idle))
    })
    .await;

    // Before any rollout: everyone on the factory version, idle, online.
    let summary = fleet_reaching(&fx, "three idle devices on 1.0", |f| {
        f.by_state.len() == 1
            && f.by_state[0].state == Some(AgentState::Idle)
            && f.by_state[0].devices == 3
    })
    .await;
    let json: FleetSummary = uplift_json(&fx, &["fleet"]);
    assert_eq!(json, summary, "`uplift fleet --json` prints the summary");
    assert_eq!(
        (
            summary.devices_total,
            summary.online,
            summary.failing,
            summary.rolled_back,
            summary.in_rollout
        ),
        (3, 3, 0, 0, 0)
    );
    assert_eq!(
        serde_json::to_value(&summary.by_version).unwrap(),
        serde_json::json!([{"version": "1.0", "devices": 3, "online": 3}])
    );
    assert_eq!(
        serde_json::to_value(&summary.by_device_type).unwrap(),
        serde_json::json!([{"device_type": DEVICE_TYPE, "devices": 3, "online": 3}])
    );
    let text = uplift(&fx, &["fleet"]);
    assert!(
        text.starts_with("3 devices, 3 online: 0 failing, 0 rolled back, 0 in a rollout"),
        "{text}"
    );

    // Each device: the slot it booted and where it connected from.
    let id = id_of(&devices[0]);
    let shown: DeviceView = uplift_json(&fx, &["devices", "show", id.as_str()]);
    assert_eq!(shown.slot, Some(SlotName::A));
    assert!(from_here(&shown), "{shown:?}");
    let text = uplift(&fx, &["devices", "show", id.as_str()]);
    let address = shown.address.clone().unwrap();
    assert!(
        text.contains(&format!("address:      {address}")) && text.contains("slot:         a"),
        "{text}"
    );
    assert!(uplift(&fx, &["devices", "list"]).contains(&address));

    // A release: who signed it, when it expires.
    fx.release("1.1", DEVICE_TYPE, &fx.image_v1_1, &fx.key)
        .await;
    let releases: Vec<ReleaseView> = uplift_json(&fx, &["release", "list"]);
    assert_eq!(releases[0].key_ids, [fx.key.public_key().key_id()]);
    let expires = releases[0].expires_at.as_deref().expect("an expiry");
    let expires =
        time::OffsetDateTime::parse(expires, &time::format_description::well_known::Rfc3339)
            .expect("RFC 3339");
    let days = (expires - time::OffsetDateTime::now_utc()).whole_days();
    assert!((363..=365).contains(&days), "expires in {days} days");
    assert!(uplift(&fx, &["release", "list"]).contains(&fx.key.public_key().key_id()));

    // A dry run: the phases the rollout would have, and nothing started.
    let start = ["rollout", "start", "--release", "1.1", "--phase", "1"];
    let dry_run = [&start[..], &["--dry-run"]].concat();
    let preview: RolloutPreview = uplift_json(&fx, &dry_run);
    assert_eq!(
        (preview.devices_total, preview.phase_sizes.clone()),
        (3, vec![1, 2])
    );
    assert!(preview.warnings.is_empty(), "{:?}", preview.warnings);
    assert!(uplift(&fx, &dry_run).contains("nothing was started"));
    assert!(fx.client.rollouts().await.unwrap().is_empty());
    let refused = fx
        .client
        .preview_rollout(&uplift_proto::api::RolloutCreate {
            release: v("9.9"),
            devices: None,
            tags: None,
            from_versions: Vec::new(),
            allow_downgrade: false,
            limits: Default::default(),
            policy: Default::default(),
        })
        .await
        .unwrap_err();
    assert!(
        format!("{refused:#}").contains("release 9.9 is not on the server"),
        "{refused:#}"
    );

    // Started for real: the phases the preview showed; every device is
    // now in a rollout (the canary offered, two waiting for their phase;
    // the two at least until the canary is done).
    let started: RolloutView = uplift_json(&fx, &start);
    assert_eq!(
        started.progress.expect("phased").phase_sizes,
        preview.phase_sizes
    );
    let during = fx.client.fleet().await.unwrap();
    assert!((2..=3).contains(&during.in_rollout), "{during:#?}");

    // Upgraded: everyone on 1.1, booted from slot b, connected again (a
    // new connection after the reboot, from this machine still).
    let views = fx
        .wait_for("every device on 1.1", &all, |views| {
            views.iter().all(|d| {
                d.online && d.running_version == Some(v("1.1")) && d.state == Some(AgentState::Idle)
            })
        })
        .await;
    for d in &views {
        assert_eq!(d.slot, Some(SlotName::B), "{d:?}");
        assert!(from_here(d), "{d:?}");
    }
    let after = fleet_reaching(&fx, "every device on 1.1, none in a rollout", |f| {
        f.in_rollout == 0 && f.by_version.len() == 1 && f.online == 3
    })
    .await;
    assert_eq!(
        serde_json::to_value(&after.by_version).unwrap(),
        serde_json::json!([{"version": "1.1", "devices": 3, "online": 3}])
    );
    assert_eq!(
        serde_json::to_value(&after.by_state).unwrap(),
        serde_json::json!([{"state": "idle", "devices": 3}])
    );
}
