//! Enrollment approval (`[enrollment] mode = "approval"`), end to end with a
//! real server and real agents: a new device waits, connected, in the
//! pending list until an operator accepts it (it gets its ID over the same
//! connection and installs what it is offered) or rejects it (it is told
//! why, stops, and never gets an ID); and the web console's pending list,
//! in Debian's headless chromium, where an operator accepts one.

use crate::browser;
use crate::common;

use common::*;
use std::time::{Duration, Instant};
use uplift_fleet::{Device, ServerLaunch};
use uplift_proto::channel::AgentState;
use uplift_proto::enrollment::{EnrollmentRequestView, EnrollmentState};

fn approval_server() -> Fixture {
    Fixture::start_with(ServerLaunch {
        config_toml: Some("[enrollment]\nmode = \"approval\"\n".into()),
        ..ServerLaunch::on("127.0.0.1:0")
    })
}

/// Waits until `hardware_id`'s request is in `uplift devices pending`, as
/// the operator lists it (JSON), and returns it.
async fn pending(fx: &Fixture, device: &Device, hardware_id: &str) -> EnrollmentRequestView {
    let deadline = Instant::now() + WAIT;
    loop {
        let requests: Vec<EnrollmentRequestView> = uplift_json(fx, &["devices", "pending"]);
        if let Some(r) = requests
            .into_iter()
            .find(|r| r.hardware_id.as_str() == hardware_id)
        {
            return r;
        }
        assert!(
            Instant::now() < deadline,
            "no pending request from {hardware_id}\nserver log:\n{}\ndevice log:\n{}",
            fx.server.log_tail(30),
            device.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enrollment_left_pending_then_rejected_never_gets_an_id() {
    let fx = approval_server();
    let mut device = fx.device("stranger", fx.spec("hw-stranger"));
    let request = pending(&fx, &device, "hw-stranger").await;
    assert_eq!(request.state, EnrollmentState::Pending);
    assert_eq!(request.device_type.as_str(), DEVICE_TYPE);
    assert!(
        request.key_fingerprint.starts_with("SHA256:"),
        "{request:?}"
    );
    assert!(!request.requested_at.is_empty());
    // The operator's table shows the same.
    let table = uplift(&fx, &["devices", "pending"]);
    assert!(
        table.contains("hw-stranger") && table.contains("pending"),
        "{table}"
    );

    // Left pending: the device waits, connected, with no ID, and says what
    // it waits for (its key's fingerprint, which the operator compares).
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        device.exited().is_none(),
        "still waiting:\n{}",
        device.log()
    );
    assert_eq!(device.device_id(), None);
    assert!(fx.client.devices().await.unwrap().is_empty());
    let log = device.log();
    assert!(
        log.contains("waits for an operator") && log.contains(&request.key_fingerprint),
        "{log}"
    );
    // So does `uplift-agent status` on the device.
    let status = agent_status(&device);
    assert!(
        status.contains("enrollment:       waiting for an operator")
            && status.contains(&request.key_fingerprint),
        "{status}"
    );

    let id = request.id.to_string();
    let out = uplift(
        &fx,
        &[
            "devices",
            "reject",
            &id,
            "--reason",
            "not one of our boards",
        ],
    );
    assert!(out.contains("rejected"), "{out}");

    // Told at once, over the connection it waited on: it stops.
    let status = tokio::task::spawn_blocking(move || {
        let status = device.wait_exit(Duration::from_secs(30));
        (device, status)
    })
    .await
    .unwrap();
    let (mut device, status) = status;
    assert!(status.is_some(), "the agent stops:\n{}", device.log());
    let log = device.log();
    assert!(
        log.contains("enrollment_rejected") && log.contains("not one of our boards"),
        "told why: {log}"
    );
    assert_eq!(device.device_id(), None, "never got an ID");
    let status = agent_status(&device);
    assert!(
        status.contains("enrollment:       REFUSED") && status.contains("not one of our boards"),
        "{status}"
    );

    // Started again, the same key is refused at once and does not come
    // back into the pending list.
    device.start(&fx.bins).unwrap();
    let status = tokio::task::spawn_blocking(move || {
        let status = device.wait_exit(Duration::from_secs(30));
        (device, status)
    })
    .await
    .unwrap();
    assert!(status.1.is_some(), "refused again:\n{}", status.0.log());
    let waiting: Vec<EnrollmentRequestView> = uplift_json(&fx, &["devices", "pending"]);
    assert!(waiting.is_empty(), "{waiting:?}");
    let all: Vec<EnrollmentRequestView> = uplift_json(&fx, &["devices", "pending", "--all"]);
    assert_eq!(all.len(), 1, "{all:?}");
    assert_eq!(all[0].state, EnrollmentState::Rejected);
    assert_eq!(all[0].reason.as_deref(), Some("not one of our boards"));
    assert!(fx.client.devices().await.unwrap().is_empty());
    assert_eq!(status.0.device_id(), None);

    // The decision is in the audit log, with who made it.
    let audit = fx
        .client
        .audit(&uplift_proto::auth::AuditQuery::default())
        .await
        .unwrap();
    assert!(
        audit
            .entries
            .iter()
            .any(|e| e.action.as_str() == "enrollment.reject"
                && e.target.contains("hw-stranger")
                && e.error.is_none()),
        "{audit:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_accepted_enrollment_gets_its_id_at_once_and_installs_an_offer() {
    let fx = approval_server();
    let device = fx.device("newcomer", fx.spec("hw-newcomer"));
    let request = pending(&fx, &device, "hw-newcomer").await;
    assert_eq!(device.device_id(), None);

    let accepted = Instant::now();
    let out = uplift(&fx, &["devices", "accept", &request.id.to_string()]);
    assert!(out.contains("accepted: device dev-"), "{out}");
    let view = fx.wait_enrolled(&device).await;
    // Over the connection it waited on: no reconnect, no backoff.
    assert!(
        accepted.elapsed() < Duration::from_secs(10),
        "{:?}",
        accepted.elapsed()
    );
    assert!(!device.log().contains("reconnecting"), "{}", device.log());
    let listed: Vec<EnrollmentRequestView> = uplift_json(&fx, &["devices", "pending", "--all"]);
    assert_eq!(listed[0].state, EnrollmentState::Accepted);
    assert_eq!(listed[0].device_id.as_ref(), Some(&view.id));

    // An enrolled device like any other: it installs what it is offered.
    fx.release("1.1", DEVICE_TYPE, &fx.image_v1_1, &fx.key)
        .await;
    fx.rollout("1.1", None).await;
    fx.wait_device(&device, "the upgrade", |d| {
        d.running_version == Some(v("1.1")) && d.state == Some(AgentState::Idle)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_accepts_a_waiting_device_from_the_web_console() {
    let fx = approval_server();
    let device = fx.device("console", fx.spec("hw-console"));
    let request = pending(&fx, &device, "hw-console").await;
    let base = fx
        .server
        .endpoint
        .admin_url
        .clone()
        .unwrap_or(fx.server.endpoint.url.clone());
    let browser = browser::Browser::start(&base).await;
    browser.open("#/devices").await;
    browser.login(&fx.server.admin_token).await;
    let shown = browser
        .wait_text("#pending-enrollments", "the waiting device", |t| {
            t.contains("hw-console")
        })
        .await;
    assert!(shown.contains(DEVICE_TYPE), "{shown}");
    assert!(
        shown.contains(&request.key_fingerprint[..23]),
        "the key's fingerprint: {shown}"
    );
    browser.shot("20-pending-enrollment").await;
    browser
        .click(&format!("[data-accept='{}']", request.id))
        .await;
    let view = fx.wait_enrolled(&device).await;
    // The list empties itself, and the device is in the table.
    browser
        .wait_count("#pending-enrollments", "the request leaves the list", |n| {
            n == 0
        })
        .await;
    browser
        .wait_text("#device-table tbody", "the accepted device", |t| {
            t.contains(view.id.as_str())
        })
        .await;
    browser.quit().await;
}
