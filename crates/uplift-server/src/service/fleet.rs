//! The fleet at a glance (`GET /api/v1/fleet`): how many devices run which
//! version, are in which state and of which type, how many are connected,
//! failing, rolled back or still being worked on by a rollout.
//!
//! Counted by two aggregate queries, run side by side and answered from
//! indexes, never by loading devices: at 100 000 devices it costs tens of
//! milliseconds where loading them took seconds (see the store's test at
//! that size).
//! The counts are the database's: device reports reach it through the
//! batching writer ([`crate::writer::FLUSH_EVERY`], a quarter of a second,
//! longer only while the database falls behind, which `GET /api/v1/stats`
//! shows as `device_rows_pending`). That lag is fine for an overview; laying
//! the live view over every device would mean reading them all. Online
//! means connected to this replica (the hub's sessions now) or to another
//! (its presence in the database, [`crate::presence`]), as for the device
//! list's `online` filter.

use super::ServiceResult;
use crate::state::AppState;
use crate::store::FleetGroup;
use std::collections::HashMap;
use std::hash::Hash;
use uplift_proto::api::{DeviceTypeCount, FleetSummary, StateCount, VersionCount};
use uplift_proto::channel::AgentState;
use uplift_proto::Version;

pub async fn summary(state: &AppState) -> ServiceResult<FleetSummary> {
    let connected = state.hub.online_ids();
    // Two readers side by side (the database is in WAL mode).
    let (groups, in_rollout) = tokio::try_join!(
        state.store.fleet_census(&connected),
        state.store.devices_in_rollouts()
    )?;
    Ok(summarize(&groups, in_rollout))
}

/// The summary of a census's groups.
fn summarize(groups: &[FleetGroup], in_rollout: u64) -> FleetSummary {
    let in_state = |wanted: AgentState| {
        groups
            .iter()
            .filter(|g| g.state == Some(wanted))
            .map(|g| g.devices)
            .sum()
    };
    FleetSummary {
        devices_total: groups.iter().map(|g| g.devices).sum(),
        online: groups.iter().map(|g| g.online).sum(),
        failing: in_state(AgentState::Failed),
        rolled_back: in_state(AgentState::RolledBack),
        in_rollout,
        by_version: tally(
            groups,
            |g| g.version.clone(),
            |v| v.as_ref().map(Version::as_str),
        )
        .map(|(version, (devices, online))| VersionCount {
            version,
            devices,
            online,
        })
        .collect(),
        by_state: tally(groups, |g| g.state, |s| s.map(AgentState::as_str))
            .map(|(state, (devices, _))| StateCount { state, devices })
            .collect(),
        by_device_type: tally(groups, |g| g.device_type.clone(), |t| Some(t.as_str()))
            .map(|(device_type, (devices, online))| DeviceTypeCount {
                device_type,
                devices,
                online,
            })
            .collect(),
    }
}

/// The groups added up by `key`: (key, (devices, online)), most devices
/// first, then by the key's `name` (`None` first), so that equal counts
/// always come in one order.
fn tally<K: Eq + Hash>(
    groups: &[FleetGroup],
    key: impl Fn(&FleetGroup) -> K,
    name: fn(&K) -> Option<&str>,
) -> impl Iterator<Item = (K, (u64, u64))> {
    let mut sums: HashMap<K, (u64, u64)> = HashMap::new();
    for group in groups {
        let sum = sums.entry(key(group)).or_default();
        sum.0 += group.devices;
        sum.1 += group.online;
    }
    let mut sums: Vec<(K, (u64, u64))> = sums.into_iter().collect();
    sums.sort_by(|a, b| {
        b.1 .0
            .cmp(&a.1 .0)
            .then_with(|| name(&a.0).cmp(&name(&b.0)))
    });
    sums.into_iter()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Principal;
    use crate::hub::SessionSerial;
    use crate::service::testing;
    use crate::store::stamp::ts;
    use uplift_proto::channel::Report;
    use uplift_proto::{DeviceId, SlotName};

    fn group(
        device_type: &str,
        version: Option<&str>,
        state: Option<AgentState>,
        devices: u64,
        online: u64,
    ) -> FleetGroup {
        FleetGroup {
            device_type: device_type.parse().unwrap(),
            version: version.map(|v| v.parse().unwrap()),
            state,
            devices,
            online,
        }
    }

    #[test]
    fn groups_add_up_by_version_state_and_type_most_devices_first() {
        let groups = [
            group("gw", Some("1.0"), Some(AgentState::Idle), 5, 4),
            group("gw", Some("1.1"), Some(AgentState::Idle), 7, 7),
            group("gw", Some("1.0"), Some(AgentState::Failed), 2, 1),
            group("cam", Some("1.0"), Some(AgentState::RolledBack), 1, 0),
            group("cam", None, None, 3, 0),
        ];
        let summary = summarize(&groups, 4);
        let json = serde_json::to_value(&summary).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "devices_total": 18, "online": 12, "failing": 2, "rolled_back": 1, "in_rollout": 4,
                "by_version": [
                    {"version": "1.0", "devices": 8, "online": 5},
                    {"version": "1.1", "devices": 7, "online": 7},
                    {"version": null, "devices": 3, "online": 0},
                ],
                "by_state": [
                    {"state": "idle", "devices": 12},
                    {"state": null, "devices": 3},
                    {"state": "failed", "devices": 2},
                    {"state": "rolled_back", "devices": 1},
                ],
                "by_device_type": [
                    {"device_type": "gw", "devices": 14, "online": 12},
                    {"device_type": "cam", "devices": 4, "online": 0},
                ],
            })
        );
        assert_eq!(
            serde_json::from_value::<FleetSummary>(json).unwrap(),
            summary
        );
        assert_eq!(summarize(&[], 0), FleetSummary::default());
    }

    /// `device` reports `status` on `version` about `target`, and the
    /// writer has put it in the database.
    async fn reports(
        state: &AppState,
        device: &DeviceId,
        status: AgentState,
        version: &str,
        target: Option<&str>,
    ) {
        let serial = SessionSerial::from_raw(1);
        state.live.claim(device, serial, ts("2026-01-01T00:00:00Z"));
        state.live.apply(
            device,
            serial,
            &Report {
                state: status,
                running_version: version.parse().unwrap(),
                booted_slot: SlotName::A,
                target_version: target.map(|t| t.parse().unwrap()),
                progress: None,
                error: None,
            },
            ts("2026-01-01T00:00:01Z"),
        );
        assert!(testing::flush_writes(state).await);
    }

    /// What the summary counts as in a rollout is what the rollouts count
    /// as pending and in progress, summed.
    #[tokio::test]
    async fn in_rollout_is_the_rollouts_pending_and_in_progress_and_online_is_the_hubs() {
        let dir = tempfile::tempdir().unwrap();
        let state = testing::state(dir.path()).await;
        testing::release(&state, "2", "gw").await;
        let mut ids = Vec::new();
        for i in 0..6 {
            ids.push(testing::device(&state, &format!("dev-{i}"), "gw").await);
        }
        testing::device(&state, "dev-cam", "cam").await;
        for id in &ids {
            reports(&state, id, AgentState::Idle, "1", None).await;
        }
        // dev-5 is left out of the rollout; the camera never reports.
        let rollout = testing::start_rollout(
            &state,
            testing::rollout_request("2", Some(ids[..5].to_vec()), Default::default()),
        )
        .await;
        // dev-0 made it, dev-1 failed on it, dev-2 is downloading it, dev-3
        // failed on something else before (pending here), dev-4 has not begun.
        reports(&state, &ids[0], AgentState::Idle, "2", None).await;
        reports(&state, &ids[1], AgentState::Failed, "1", Some("2")).await;
        reports(&state, &ids[2], AgentState::Downloading, "1", Some("2")).await;
        reports(&state, &ids[3], AgentState::RolledBack, "1", Some("0.9")).await;
        // Connected now: two gateways, in the hub only.
        let mut sessions = Vec::new();
        for id in [&ids[0], &ids[5]] {
            let (tx, rx) = tokio::sync::watch::channel(0);
            state.hub.register(id.clone(), tx);
            sessions.push(rx);
        }

        let view = crate::service::rollouts::get(&state, rollout)
            .await
            .unwrap();
        let summary = summary(&state).await.unwrap();
        assert_eq!(
            summary.in_rollout,
            view.counts.pending + view.counts.in_progress
        );
        assert_eq!(summary.in_rollout, 3, "{view:?}");
        assert_eq!(
            (
                summary.devices_total,
                summary.online,
                summary.failing,
                summary.rolled_back
            ),
            (7, 2, 1, 1)
        );
        let versions: Vec<(Option<&str>, u64, u64)> = summary
            .by_version
            .iter()
            .map(|v| (v.version.as_ref().map(|v| v.as_str()), v.devices, v.online))
            .collect();
        // One device each on 2 and on none: by name, none first.
        assert_eq!(
            versions,
            [(Some("1"), 5, 1), (None, 1, 0), (Some("2"), 1, 1)]
        );
        assert_eq!(
            summary.by_device_type,
            [
                DeviceTypeCount {
                    device_type: "gw".parse().unwrap(),
                    devices: 6,
                    online: 2
                },
                DeviceTypeCount {
                    device_type: "cam".parse().unwrap(),
                    devices: 1,
                    online: 0
                },
            ]
        );

        // A newer rollout takes dev-4 over: still one device in a rollout,
        // counted once; an abort of it leaves it in none.
        let newer = testing::start_rollout(
            &state,
            testing::rollout_request("2", Some(vec![ids[4].clone()]), Default::default()),
        )
        .await;
        assert_eq!(summary_in_rollout(&state).await, 3);
        crate::service::rollouts::command(
            &state,
            newer,
            uplift_proto::api::RolloutCommandName::Abort,
            &Principal::bootstrap_admin(),
        )
        .await
        .unwrap();
        assert_eq!(summary_in_rollout(&state).await, 2);
    }

    async fn summary_in_rollout(state: &AppState) -> u64 {
        summary(state).await.unwrap().in_rollout
    }
}
