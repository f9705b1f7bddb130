//! The Prometheus exposition of the fleet and the server: devices by state
//! and version, devices whose last error is of a kind, rollouts by state,
//! connected sessions, bytes and chunks served. Built at each scrape from
//! the database's aggregates and the server's counters, with the
//! `prometheus-client` crate's text encoder.

use super::{ServiceError, ServiceResult};
use crate::budget;
use crate::state::AppState;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::atomic::Ordering::Relaxed;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeviceLabels {
    state: String,
    version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RolloutLabels {
    rollout: String,
    /// `targeted`, `offered`, `succeeded` or `failed`.
    devices: String,
}

/// The text exposition format (`text/plain; version=0.0.4`).
pub async fn render(state: &AppState) -> ServiceResult<String> {
    let mut registry = Registry::with_prefix("uplift");

    let devices = Family::<DeviceLabels, Gauge>::default();
    let errors = Family::<KindLabels, Gauge>::default();
    for group in state.store.device_census().await? {
        let n = group.devices as i64;
        devices
            .get_or_create(&DeviceLabels {
                state: group.state.unwrap_or_else(|| "unknown".into()),
                version: group.version.unwrap_or_else(|| "unknown".into()),
            })
            .inc_by(n);
        if let Some(kind) = group.error_kind {
            errors.get_or_create(&KindLabels { kind }).inc_by(n);
        }
    }
    registry.register(
        "devices",
        "Enrolled devices by last reported state and running version",
        devices,
    );
    registry.register(
        "device_errors",
        "Devices whose last reported error is of this kind",
        errors,
    );

    let rollouts = Family::<StateLabels, Gauge>::default();
    for (_, plan) in state.store.rollout_plans().await? {
        rollouts
            .get_or_create(&StateLabels {
                state: plan.state.name().to_owned(),
            })
            .inc();
    }
    registry.register("rollouts", "Phased rollouts by state", rollouts);

    // Progress of the rollouts still running (finished ones would only
    // grow the label set).
    let progress = Family::<RolloutLabels, Gauge>::default();
    let active: std::collections::HashSet<i64> =
        state.store.active_rollouts().await?.into_iter().collect();
    for (id, _, tally) in state.store.phase_tallies(None).await? {
        if !active.contains(&id) {
            continue;
        }
        for (devices, n) in [
            ("targeted", tally.devices),
            ("offered", tally.offered),
            ("succeeded", tally.succeeded),
            ("failed", tally.failed),
        ] {
            progress
                .get_or_create(&RolloutLabels {
                    rollout: id.to_string(),
                    devices: devices.into(),
                })
                .inc_by(n as i64);
        }
    }
    registry.register(
        "rollout_devices",
        "Devices of each running rollout: targeted, offered, succeeded, failed",
        progress,
    );

    let online = Gauge::<i64>::default();
    online.set(state.hub.online_count() as i64);
    registry.register("sessions_connected", "Devices with an open channel", online);
    let downloads = Gauge::<i64>::default();
    downloads.set(state.budgets.in_use(budget::Kind::Download) as i64);
    registry.register(
        "downloads_in_flight",
        "Device download requests being served",
        downloads,
    );
    let counter = |value: u64| {
        let c = Counter::<u64>::default();
        c.inc_by(value);
        c
    };
    registry.register(
        "sent_bytes",
        "Chunk and manifest bytes sent to devices since the server started",
        counter(state.stats.bytes_sent.load(Relaxed)),
    );
    registry.register(
        "sent_chunks",
        "Chunks sent to devices since the server started",
        counter(state.stats.chunks_sent.load(Relaxed)),
    );
    registry.register(
        "direct_download_redirects",
        "Chunk requests answered with a redirect to the object store (direct downloads) since the server started",
        counter(state.stats.redirects.load(Relaxed)),
    );
    registry.register(
        "reports_applied",
        "Device reports applied since the server started",
        counter(state.stats.reports_applied.load(Relaxed)),
    );

    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry)
        .map_err(|e| ServiceError::Metrics(e.to_string()))?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::testing;

    #[tokio::test]
    async fn the_exposition_counts_devices_by_state_and_version_and_parses_as_prometheus_text() {
        let dir = tempfile::tempdir().unwrap();
        let state = testing::state(dir.path()).await;
        testing::device(&state, "dev-a", "gw").await;
        testing::device(&state, "dev-b", "gw").await;
        let text = render(&state).await.unwrap();
        assert!(
            text.contains(r#"uplift_devices{state="unknown",version="unknown"} 2"#),
            "{text}"
        );
        assert!(text.contains("uplift_sessions_connected 0"), "{text}");
        assert!(text.contains("uplift_sent_bytes_total 0"), "{text}");
        assert!(
            !text.contains("uplift_rollout_devices{"),
            "no rollout runs: {text}"
        );
        // A running rollout's progress, by how far its devices got.
        testing::release(&state, "2", "gw").await;
        let id = testing::start_rollout(
            &state,
            testing::rollout_request("2", None, Default::default()),
        )
        .await;
        let text = render(&state).await.unwrap();
        for (devices, n) in [
            ("targeted", 2),
            ("offered", 2),
            ("succeeded", 0),
            ("failed", 0),
        ] {
            let line =
                format!(r#"uplift_rollout_devices{{rollout="{id}",devices="{devices}"}} {n}"#);
            assert!(text.contains(&line), "{line} in {text}");
        }
        assert!(text.trim_end().ends_with("# EOF"), "{text}");
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (_, value) = line.rsplit_once(' ').unwrap();
            value.parse::<f64>().unwrap_or_else(|_| panic!("{line}"));
        }
    }
}
