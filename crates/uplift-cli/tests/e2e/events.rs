//! Events without polling, end to end: `uplift events` follows one device
//! through its upgrade as it happens (and, afterwards, replays it: the
//! recent past, and a resume after a given event), and a webhook made with `uplift
//! webhook create` receives the rollout's events at a real HTTP receiver,
//! signed with its secret, retried after the receiver first fails, and
//! listed in the delivery log.

use crate::common;

use axum::http::{HeaderMap, StatusCode};
use common::*;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use uplift_proto::events::{
    signed_payload, DeliveryStatus, DeliveryView, EventAbout, FleetEvent, RolloutEvent,
    WebhookCreated, DELIVERY_HEADER, EVENT_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER,
};

/// What the receiver was sent: the headers that matter and the body.
#[derive(Debug, Clone)]
struct Received {
    signature: String,
    timestamp: String,
    delivery: String,
    event: String,
    body: Vec<u8>,
}

/// A webhook receiver on loopback that answers 503 to its first request
/// (a receiver that is down for a moment) and 204 after.
async fn receiver() -> (String, Arc<Mutex<Vec<Received>>>) {
    let got: Arc<Mutex<Vec<Received>>> = Arc::default();
    let calls = Arc::new(AtomicUsize::new(0));
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post({
            let got = got.clone();
            move |headers: HeaderMap, body: axum::body::Bytes| async move {
                let header = |name: &str| {
                    headers
                        .get(name)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_owned()
                };
                if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                    return StatusCode::SERVICE_UNAVAILABLE;
                }
                got.lock().unwrap().push(Received {
                    signature: header(SIGNATURE_HEADER),
                    timestamp: header(TIMESTAMP_HEADER),
                    delivery: header(DELIVERY_HEADER),
                    event: header(EVENT_HEADER),
                    body: body.to_vec(),
                });
                StatusCode::NO_CONTENT
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, got)
}

fn signature_of(secret: &str, timestamp: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(&signed_payload(timestamp, body));
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_stream_and_a_signed_retried_webhook_tell_an_upgrade_as_it_happens() {
    let fx = Fixture::start();
    let device = fx.device("e1", fx.spec("hw-e1"));
    fx.wait_enrolled(&device).await;
    let id = id_of(&device);

    let (url, received) = receiver().await;
    let hook: WebhookCreated = uplift_json(
        &fx,
        &["webhook", "create", "--url", &url, "--subject", "rollout"],
    );
    assert!(hook.secret.starts_with("whsec_"));

    // An operator follows the device: six events, from the offer to the commit.
    let endpoint = fx.server.endpoint.clone();
    let token = fx.server.admin_token.clone();
    let workdir = fx.dir.path().to_owned();
    let device_arg = id.to_string();
    let follower = std::thread::spawn(move || {
        run_bounded(
            std::process::Command::new(env!("CARGO_BIN_EXE_uplift"))
                .args(["events", "--device", &device_arg, "--count", "6"])
                .arg("--server")
                .arg(endpoint.admin_url.as_ref().unwrap_or(&endpoint.url))
                .arg("--ca")
                .arg(&endpoint.ca_file)
                .arg("--token")
                .arg(&token),
            Duration::from_secs(90),
            &workdir,
        )
    });
    // The stream is open before the rollout starts (it only sends what
    // happens after it opened).
    tokio::time::sleep(Duration::from_secs(1)).await;

    fx.release("1.1", DEVICE_TYPE, &fx.image_v1_1, &fx.key)
        .await;
    let rollout = fx.rollout("1.1", None).await;
    fx.wait_for("the device on 1.1", &[&device], |views| {
        views[0].running_version == Some(v("1.1"))
    })
    .await;

    let out = follower.join().unwrap();
    assert!(
        out.status.success(),
        "uplift events: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: Vec<FleetEvent> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).expect("one event per line"))
        .collect();
    let names: Vec<String> = seen.iter().map(|e| e.about.name()).collect();
    assert_eq!(
        names,
        [
            "device.offer",
            "device.download_started",
            "device.download_finished",
            "device.installed",
            "device.reboot",
            "device.committed"
        ]
    );
    assert!(seen.windows(2).all(|w| w[0].seq < w[1].seq));
    assert!(seen
        .iter()
        .all(|e| matches!(&e.about, EventAbout::Device { device_id, .. } if *device_id == id)));

    // A console opened afterwards is first told the recent past, and a
    // client that lost its stream after the third event resumes after it.
    let past = |extra: &[&str]| -> Vec<FleetEvent> {
        let mut args = vec!["events", "--device", id.as_str()];
        args.extend_from_slice(extra);
        uplift(&fx, &args)
            .lines()
            .map(|line| serde_json::from_str(line).expect("one event per line"))
            .collect()
    };
    assert_eq!(past(&["--recent", "6", "--count", "6"]), seen);
    let third = seen[2].seq.to_string();
    assert_eq!(
        past(&["--after-event", &third, "--count", "3"]),
        seen[3..],
        "resumed after event {third}"
    );

    // The webhook: every rollout event; the first (started) only after a
    // retry, so it may come after the others.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut deliveries = loop {
        let got = received.lock().unwrap().clone();
        let has = |name: &str| got.iter().any(|r| r.event == name);
        if has("rollout.started") && has("rollout.finished") {
            break got;
        }
        assert!(
            Instant::now() < deadline,
            "no rollout.started and rollout.finished deliveries: {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    deliveries.sort_by_key(|d| d.delivery.parse::<i64>().unwrap());
    let mut events = Vec::new();
    for delivery in &deliveries {
        assert_eq!(
            delivery.signature,
            signature_of(&hook.secret, &delivery.timestamp, &delivery.body),
            "delivery {} is signed with the webhook's secret",
            delivery.delivery
        );
        assert_ne!(
            delivery.signature,
            signature_of("whsec_wrong", &delivery.timestamp, &delivery.body)
        );
        let event: FleetEvent = serde_json::from_slice(&delivery.body).unwrap();
        assert_eq!(event.about.name(), delivery.event);
        match event.about {
            EventAbout::Rollout { rollout_id, event } => {
                assert_eq!(rollout_id, rollout);
                events.push(event);
            }
            EventAbout::Device { .. } => panic!("the filter takes rollout events only"),
        }
    }
    assert!(
        matches!(&events[0], RolloutEvent::Started { release, devices: 1, by }
            if *release == v("1.1") && by == "bootstrap-admin"),
        "{events:?}"
    );
    assert_eq!(events.last(), Some(&RolloutEvent::Finished));

    // The delivery log says the same, and that the first one took two tries.
    let log: Vec<DeliveryView> = uplift_json(
        &fx,
        &["webhook", "deliveries", &hook.webhook.id.to_string()],
    );
    assert_eq!(log.len(), deliveries.len(), "{log:?}");
    assert!(log.iter().all(|d| d.status == DeliveryStatus::Delivered));
    let first = log.iter().min_by_key(|d| d.id).unwrap();
    assert_eq!(first.attempts, 2, "{first:?}");
    assert_eq!(first.last_status, Some(204));
    assert!(log
        .iter()
        .filter(|d| d.id != first.id)
        .all(|d| d.attempts == 1));
}
