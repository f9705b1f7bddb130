//! The fleet as the admin API shows it: each enrolled device with its
//! newest live state and the version it is meant to run.

use super::ServiceResult;
use crate::hub::Hub;
use crate::state::AppState;
use crate::store::DeviceRecord;
use std::collections::HashMap;
use uplift_proto::api::DeviceView;
use uplift_proto::Version;

/// Every enrolled device, in enrollment order.
pub async fn list(state: &AppState) -> ServiceResult<Vec<DeviceView>> {
    let mut devices = state.store.list_devices().await?;
    state.live.overlay(&mut devices);
    let releases: HashMap<i64, Version> = state
        .store
        .list_rollouts()
        .await?
        .into_iter()
        .map(|r| (r.id, r.release))
        .collect();
    Ok(devices
        .into_iter()
        .map(|d| view(&state.hub, &releases, d))
        .collect())
}

/// One device's record (live state laid over) as shown, its target version
/// looked up in `rollout_releases` by rollout id.
pub fn view(hub: &Hub, rollout_releases: &HashMap<i64, Version>, d: DeviceRecord) -> DeviceView {
    DeviceView {
        online: hub.is_online(&d.id),
        target_version: d
            .target_rollout
            .and_then(|r| rollout_releases.get(&r).cloned()),
        rollout_id: d.target_rollout,
        id: d.id,
        device_type: d.device_type,
        hardware_id: d.hardware_id,
        running_version: d.running_version,
        state: d.state,
        progress: d.progress,
        last_error: d.last_error,
        enrolled_at: d.enrolled_at,
        last_seen: d.last_seen,
    }
}
