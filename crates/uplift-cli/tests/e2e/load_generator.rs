//! The load generator against a real server: 300 device sessions from one
//! process (real TLS, channel, enrollment, reports), checked the way an
//! operator would: every one enrolled and online in the device list and in
//! the server's stats, and every one offered the rollout the generator
//! started. Needs the binaries (`cargo build --bins`).

use crate::common;

use common::{Fixture, WAIT};
use std::time::{Duration, Instant};
use uplift_proto::api::DeviceQuery;
use uplift_proto::channel::AgentState;

const SESSIONS: u64 = 300;
/// Long enough for the checks below to see every session online.
const HOLD_SECS: u64 = 30;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hundred_generated_sessions_enroll_stay_online_and_get_their_offer() {
    let fx = Fixture::start();
    fx.release("1.1", "loadgen", &fx.image_v1_1, &fx.key).await;
    let loadgen = fx.bins.server.with_file_name("uplift-loadgen");
    assert!(
        loadgen.is_file(),
        "{} not built; run `cargo build --bins` first",
        loadgen.display()
    );
    let ready = fx.server.dir.join("ready.json");
    let generator = tokio::process::Command::new(&loadgen)
        .arg("--ready-file")
        .arg(&ready)
        .args(["--sessions", &SESSIONS.to_string()])
        .args(["--release", "1.1", "--settle", "0"])
        .args(["--hold", &HOLD_SECS.to_string()])
        .args(["--duration", "120", "--json"])
        .args(["--server-pid", &fx.server.pid().to_string()])
        .env("UPLIFT_TOKEN", &fx.server.admin_token)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("starting uplift-loadgen");

    // While it holds its sessions: the operator's views.
    let online = DeviceQuery {
        online: Some(true),
        ..Default::default()
    };
    let start = Instant::now();
    let (listed, stats) = loop {
        let listed = fx.client.devices_where(&online).await.unwrap();
        let stats = fx.client.stats().await.unwrap();
        if listed.len() as u64 == SESSIONS && stats.devices_online == SESSIONS {
            break (listed, stats);
        }
        assert!(
            start.elapsed() < WAIT,
            "{} devices listed online, stats say {} of {} enrolled; want {SESSIONS}\nserver log:\n{}",
            listed.len(),
            stats.devices_online,
            stats.devices_total,
            fx.server.log_tail(20)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(stats.devices_total, SESSIONS, "each session is one device");
    assert!(
        listed
            .iter()
            .all(|d| d.device_type.as_str() == "loadgen" && d.online),
        "every generated device is online as a loadgen device"
    );

    let output = tokio::time::timeout(
        Duration::from_secs(HOLD_SECS + 90),
        generator.wait_with_output(),
    )
    .await
    .expect("the generator ends by itself")
    .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "generator failed: {stderr}");
    let results: serde_json::Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("generator output is JSON ({e}): {stderr}"));
    assert_eq!(results["connected"], SESSIONS, "{results:#}");
    assert_eq!(results["enrolled"], SESSIONS, "{results:#}");
    assert_eq!(results["server_devices_online"], SESSIONS, "{results:#}");
    let rollout = &results["rollout"];
    assert_eq!(
        rollout["offers"], SESSIONS,
        "every session got its offer: {results:#}"
    );
    let p99 = rollout["latency"]["p99_ms"].as_f64().unwrap();
    assert!(
        p99 < 10_000.0,
        "offers reach the fleet within seconds: {results:#}"
    );
    assert!(results["kib_per_session"].as_f64().is_some(), "{results:#}");

    // And the server says the same: every device of the rollout was offered
    // it and answered (the generator reports downloading on an offer); the
    // database hears it a write interval later.
    let id = rollout["rollout_id"].as_i64().unwrap();
    let view = fx.client.rollout(id).await.unwrap();
    assert_eq!(view.devices_total, SESSIONS);
    let start = Instant::now();
    loop {
        let members = fx.client.rollout_members(id).await.unwrap();
        let answered = members
            .iter()
            .filter(|m| m.offered_at.is_some() && m.state == Some(AgentState::Downloading))
            .count() as u64;
        if members.len() as u64 == SESSIONS && answered == SESSIONS {
            break;
        }
        assert!(
            start.elapsed() < WAIT,
            "{answered} of {} rollout members offered and downloading",
            members.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
