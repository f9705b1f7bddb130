//! Chunks in S3-compatible object storage, end to end with real processes:
//! `uplift-server` configured with `[artifacts] backend = "s3"` against a
//! real S3 server (`uplift-s3-test-server`, s3s-fs) on loopback, real
//! agents upgrading. Once with chunks served through the server, once with
//! direct downloads (presigned URLs), and once with the store killed
//! mid-rollout. Asserted is what an operator sees: devices upgraded, the
//! server's metrics (no chunk bytes from the server with direct downloads),
//! the objects in the bucket, and the server's words while the store is down.

use crate::common;

use common::*;
use std::num::NonZeroU64;
use std::path::Path;
use uplift_fleet::{Device, ServerLaunch, ServerProcess};
use uplift_proto::api::{DownloadLimits, RolloutCreate};
use uplift_proto::channel::AgentState;
use uplift_proto::policy::{ErrorThreshold, RolloutPolicy};
use uplift_release::manifest::SignedManifest;
use uplift_s3_test_server::S3Server;

/// The fixture's server replaced by one keeping its chunks in `s3`.
async fn with_s3_server(fx: &mut Fixture, s3: &S3Server, direct: bool) {
    let dir = fx.path("server-s3");
    let config = s3.artifacts_toml(direct);
    let server = tokio::task::spawn_blocking({
        let bins = fx.bins.clone();
        move || {
            ServerProcess::launch(
                &bins,
                Path::new(&dir),
                &ServerLaunch {
                    config_toml: Some(config),
                    ..ServerLaunch::on("127.0.0.1:0")
                },
            )
        }
    })
    .await
    .unwrap()
    .expect("server with S3 storage starts");
    fx.client = server.client().unwrap();
    fx.server = server;
}

/// Devices that accept the test store's plain-HTTP presigned URLs.
fn devices(fx: &Fixture, names: &[&str]) -> Vec<Device> {
    names
        .iter()
        .map(|name| {
            let mut spec = fx.spec(&format!("hw-{name}"));
            spec.extra_config = "[download]\ndirect_allow_http = true\n".into();
            fx.device(name, spec)
        })
        .collect()
}

/// A counter of the server's Prometheus metrics.
async fn metric(fx: &Fixture, name: &str) -> u64 {
    let text = fx.client.metrics().await.expect("metrics");
    text.lines()
        .find_map(|line| line.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no metric {name} in:\n{text}")) as u64
}

/// Every chunk release `version` lists is an object in the bucket, and so
/// is its signed manifest; the server's data directory holds no chunk.
fn assert_the_bucket_holds(fx: &Fixture, s3: &S3Server, version: &str) -> usize {
    let manifest =
        std::fs::read(s3.object_path(&format!("fleet/releases/{version}/manifest.json")))
            .expect("the signed manifest is in the bucket under its version");
    let mut manifest = SignedManifest::from_json(&manifest)
        .and_then(|m| m.parse_unverified())
        .expect("the stored manifest parses");
    assert_eq!(manifest.version, v(version));
    if manifest.needs_index() {
        // The chunk list is in the release's index, published beside it.
        let index = std::fs::read(s3.object_path(&format!("fleet/releases/{version}/chunk-index")))
            .expect("the chunk index is in the bucket under the release's version");
        manifest
            .attach_index(&index)
            .expect("the published index is the manifest's");
    }
    assert!(!manifest.chunks.is_empty());
    for chunk in &manifest.chunks {
        let hex = chunk.hash.to_hex();
        let object = s3.object_path(&format!("fleet/chunks/{}/{hex}.zst", &hex[..2]));
        assert_eq!(
            std::fs::metadata(&object).map(|m| m.len()).ok(),
            Some(u64::from(chunk.stored_size)),
            "chunk {hex} in the bucket"
        );
    }
    assert!(
        !fx.server.dir.join("chunks").exists(),
        "no chunk in the server's data directory"
    );
    manifest.chunks.len()
}

async fn upgrade(direct: bool) {
    let mut fx = Fixture::start();
    let s3 = S3Server::start(&fx.path("s3")).expect("test S3 server starts");
    with_s3_server(&mut fx, &s3, direct).await;
    let fleet = devices(&fx, &["s3-a", "s3-b"]);
    for device in &fleet {
        fx.wait_enrolled(device).await;
    }
    fx.release("1.1", DEVICE_TYPE, &fx.image_v1_1, &fx.key)
        .await;
    let chunks = assert_the_bucket_holds(&fx, &s3, "1.1");
    fx.rollout("1.1", None).await;
    let refs: Vec<&Device> = fleet.iter().collect();
    fx.wait_for("every device on 1.1", &refs, |views| {
        views.iter().all(|d| d.running_version == Some(v("1.1")))
    })
    .await;
    let sent_chunks = metric(&fx, "uplift_sent_chunks_total").await;
    let redirects = metric(&fx, "uplift_direct_download_redirects_total").await;
    let sent_bytes = metric(&fx, "uplift_sent_bytes_total").await;
    eprintln!(
        "direct_downloads={direct}: {chunks} chunks in the release; server sent {sent_chunks} chunks, \
         {sent_bytes} bytes; {redirects} redirects"
    );
    if direct {
        assert_eq!(
            sent_chunks, 0,
            "with direct downloads the server sends no chunk"
        );
        assert!(
            redirects >= 2,
            "each device was redirected to the store ({redirects} redirects, {chunks} chunks)"
        );
        // Only the two manifests went out through the server.
        assert!(sent_bytes < 2 * 64 * 1024, "{sent_bytes} bytes sent");
    } else {
        assert!(sent_chunks >= 2, "{sent_chunks} chunks sent");
        assert_eq!(redirects, 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_upgrades_with_chunks_in_s3_served_through_the_server() {
    upgrade(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_upgrades_downloading_straight_from_s3_with_presigned_urls() {
    upgrade(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_object_store_down_mid_rollout_is_said_and_devices_finish_once_it_is_back() {
    let mut fx = Fixture::start();
    let mut s3 = S3Server::start(&fx.path("s3")).expect("test S3 server starts");
    with_s3_server(&mut fx, &s3, false).await;
    let fleet = devices(&fx, &["down-a", "down-b"]);
    for device in &fleet {
        fx.wait_enrolled(device).await;
    }
    fx.release("1.1", DEVICE_TYPE, &fx.image_v1_1, &fx.key)
        .await;
    // Slow enough that the store goes down while devices download; a
    // failed attempt does not pause it (the devices retry on their own).
    fx.rollout_with(RolloutCreate {
        release: v("1.1"),
        devices: None,
        tags: None,
        from_versions: Vec::new(),
        allow_downgrade: false,
        limits: DownloadLimits {
            max_bytes_per_sec: NonZeroU64::new(48 * 1024),
            ..Default::default()
        },
        policy: RolloutPolicy {
            error_threshold: ErrorThreshold {
                percent: 100,
                min_finished: 1,
            },
            ..Default::default()
        },
    })
    .await;
    let refs: Vec<&Device> = fleet.iter().collect();
    fx.wait_for("a device downloading", &refs, |views| {
        views
            .iter()
            .any(|d| d.state == Some(AgentState::Downloading))
    })
    .await;
    tokio::task::block_in_place(|| s3.kill());
    // The server stays up, and says why downloads fail.
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let log = std::fs::read_to_string(&fx.server.log).unwrap_or_default();
        if log.contains("kind=object_store_unavailable") && log.contains("object store request") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the server never said the store is down:\n{}",
            fx.server.log_tail(30)
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(fx.client.devices().await.is_ok(), "the admin API answers");
    let upgraded = fx.client.devices().await.unwrap();
    assert!(
        upgraded.iter().any(|d| d.running_version != Some(v("1.1"))),
        "the store went down before the rollout finished: {upgraded:#?}"
    );
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    tokio::task::block_in_place(|| s3.restart()).expect("the test S3 server starts again");
    fx.wait_for(
        "every device on 1.1 once the store is back",
        &refs,
        |views| views.iter().all(|d| d.running_version == Some(v("1.1"))),
    )
    .await;
    // What devices heard while it was down: the server's own words.
    let heard = fleet
        .iter()
        .filter(|d| d.log().contains("object_store_unavailable"))
        .count();
    assert!(
        heard >= 1,
        "no device logged the server's reason:\n{}",
        fleet[0].log()
    );
    drop(s3);
}
