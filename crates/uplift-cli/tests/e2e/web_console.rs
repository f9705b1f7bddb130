//! The web console in a real browser: Debian's headless chromium, driven
//! over WebDriver (chromium-driver), against a real server and eight real
//! agents, used as an operator would. A wrong token is refused and a right
//! one shows the fleet; devices are tagged from a selection and filtered
//! by tag; a release directory is uploaded from the browser; a phased
//! rollout is started from the form after its preview; its phase progress
//! changes on the page with no reload; pause and resume; the rollout
//! pauses by itself when the next phase's devices fail, and says why;
//! abort; an admin makes a viewer token, and the viewer sees no action and
//! is refused when it forces a request; the page says when its event
//! stream is cut. Screenshots of every view go to
//! `target/web-console-screenshots/` (CI keeps them as artifacts).
//!
//! Needs `chromium` and `chromium-driver` (`.ci/run` installs them).

use crate::browser;
use crate::common;

use browser::{Browser, DESKTOP, PHONE};
use common::*;
use std::time::{Duration, Instant};
use thirtyfour::prelude::*;
use uplift_release::build::{create_release, ReleaseOptions};

const DEVICES: usize = 8;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_runs_a_phased_rollout_from_the_web_console() {
    let mut fx = Fixture::start_with(uplift_fleet::ServerLaunch {
        config_toml: Some("[addresses]\npool = [\"10.77.0.0/16\", \"fd77::/64\"]\n".into()),
        ..uplift_fleet::ServerLaunch::on("127.0.0.1:0")
    });
    let breaks = fx.path("service-breaks-on-new-os");
    let names: Vec<String> = (0..DEVICES).map(|i| format!("dev{i}")).collect();
    let specs = names
        .iter()
        .map(|n| (n.clone(), fx.spec_failing_on_slot_b_when(n, &breaks)))
        .collect();
    let devices = fx.power_on(specs, &fx.server.endpoint.url.clone()).await;
    for device in &devices {
        fx.wait_enrolled(device).await;
    }
    let base = fx
        .server
        .endpoint
        .admin_url
        .clone()
        .unwrap_or(fx.server.endpoint.url.clone());
    let browser = Browser::start(&base).await;

    // A wrong token is refused, and says so.
    browser.open("").await;
    browser.login("uplift_not-a-token-anyone-made").await;
    browser
        .wait_text("#login-error", "a wrong token is refused", |t| {
            t.contains("refused this token")
        })
        .await;
    browser.shot("01-login-refused").await;

    // The right one shows the fleet: every device, online, on 1.0.
    browser.login(&fx.server.admin_token).await;
    browser
        .wait_text("#whoami", "the admin is logged in", |t| t.contains("admin"))
        .await;
    browser
        .wait_text("#stream-status", "the event stream is live", |t| {
            t.contains("Live")
        })
        .await;
    let total = DEVICES.to_string();
    browser
        .wait_text("#count-total", "the fleet's size", |t| {
            t.starts_with(&total)
        })
        .await;
    browser
        .wait_text("#count-online", "every device online", |t| {
            t.starts_with(&total)
        })
        .await;
    browser
        .wait_text(".chart", "devices per version", |t| {
            t.contains("1.0") && t.contains(&total)
        })
        .await;
    browser.shot("02-overview").await;

    // Tag three devices from a selection, then filter by the tag.
    browser.go("#/devices").await;
    browser
        .wait_count("#device-table tbody tr", "the device list", |n| {
            n == DEVICES
        })
        .await;
    browser.shot("03-devices").await;
    for row in 1..=3 {
        browser
            .click(&format!(
                "#device-table tbody tr:nth-child({row}) td.pick input"
            ))
            .await;
    }
    browser.fill("#bulk-tag-input", "lab").await;
    browser.click("#bulk-tag-add").await;
    browser
        .wait_text("#bulk-tags", "tags added to the selection", |t| {
            t.contains("Added lab on 3 devices")
        })
        .await;
    browser.go("#/devices?tag=lab").await;
    browser
        .wait_count("#device-table tbody tr", "only the tagged devices", |n| {
            n == 3
        })
        .await;
    browser
        .wait_text("#device-table tbody", "the tag shows", |t| {
            t.matches("lab").count() == 3
        })
        .await;
    browser
        .wait_text(
            "#device-table tbody",
            "each device's private address",
            |t| t.matches("10.77.").count() == 3,
        )
        .await;
    browser.shot("04-devices-tagged-lab").await;

    // A device's page: its identity, private address, slot and history.
    browser
        .click("#device-table tbody tr:first-child td a")
        .await;
    let facts = browser
        .wait_text("#device-facts", "the device page", |t| {
            t.contains("127.0.0.1:") && t.contains("Slot")
        })
        .await;
    assert!(facts.contains("test-gateway"), "{facts}");
    let private = browser
        .wait_text(
            "#device-private-address",
            "the device's private addresses",
            |t| t.contains("10.77.") && t.contains("fd77::"),
        )
        .await;
    assert!(
        private.contains("/16") && private.contains("/64"),
        "{private}"
    );
    browser.shot("05-device").await;

    // A release uploaded from the browser: the directory `uplift release
    // create` wrote, picked in the file dialog.
    let release_dir = fx.path("releases/1.1-browser");
    create_release(
        &fx.image_v1_1,
        &release_dir,
        &ReleaseOptions::new(v("1.1"), DEVICE_TYPE.parse().unwrap()),
        &fx.key,
    )
    .unwrap();
    browser.go("#/releases").await;
    let picker = browser.driver.find(By::Css("#release-dir")).await.unwrap();
    picker
        .send_keys(release_dir.to_str().unwrap())
        .await
        .unwrap();
    browser.click("#release-upload button[type=submit]").await;
    browser
        .wait_text("#upload-done", "the release is stored", |t| {
            t.contains("Release 1.1")
        })
        .await;
    browser
        .wait_text("#release-table", "the release is listed", |t| {
            t.contains("1.1") && t.contains(&fx.key.public_key().key_id())
        })
        .await;
    browser.shot("06-releases").await;

    // The rollout form: two devices first, then the rest after approval;
    // the first failure pauses it. The preview says so before it starts.
    browser.go("#/rollouts/new").await;
    browser
        .click("#rollout-form select[name=release] option[value='1.1']")
        .await;
    browser.fill("#rollout-form input[name=phases]", "2").await;
    browser.click("#rollout-form input[name=approval]").await;
    let preview = browser
        .wait_text("#rollout-preview", "the preview of the phases", |t| {
            t.contains("Phase 1: 2 devices") && t.contains("Final phase: 6 devices")
        })
        .await;
    assert!(preview.contains(&format!("{DEVICES} devices")), "{preview}");
    browser.scroll_to("#rollout-preview").await;
    browser.shot("07-rollout-form").await;
    browser.click("#start-rollout").await;
    let deadline = Instant::now() + WAIT;
    let rollout: i64 = loop {
        let hash: String = browser
            .driver
            .execute("return location.hash", vec![])
            .await
            .unwrap()
            .convert()
            .unwrap();
        if let Some(id) = hash
            .strip_prefix("#/rollouts/")
            .and_then(|id| id.parse().ok())
        {
            break id;
        }
        assert!(
            Instant::now() < deadline,
            "the form did not open the new rollout: {hash}"
        );
        tokio::time::sleep(Duration::from_millis(150)).await;
    };

    // The rollout page: the first phase's bar fills as its devices report,
    // with no reload (the marker set on this document survives).
    browser
        .wait_count("#rollout-phases li", "the rollout's phases", |n| n == 2)
        .await;
    browser
        .driver
        .execute("window.sameDocument = true", vec![])
        .await
        .unwrap();
    let first_phase = "#rollout-phases li[data-phase='0'] .phase-count";
    browser
        .wait_text(first_phase, "phase 1 progresses live", |t| t == "2 / 2")
        .await;
    browser
        .wait_text("h1", "phase 2 waits for approval", |t| {
            t.contains("awaiting approval")
        })
        .await;
    let same: bool = browser
        .driver
        .execute("return window.sameDocument === true", vec![])
        .await
        .unwrap()
        .convert()
        .unwrap();
    assert!(same, "the page was reloaded to show progress");
    browser.shot("08-rollout-phase-1-done").await;

    // Pause and resume.
    browser.click("#cmd-pause").await;
    browser
        .wait_text("h1", "the rollout pauses", |t| t.contains("paused"))
        .await;
    browser.click("#cmd-resume").await;
    browser
        .wait_text("h1", "the rollout resumes, still at the gate", |t| {
            t.contains("awaiting approval")
        })
        .await;

    // The next phase's devices fail on the new OS: approved, the rollout
    // pauses by itself and says why.
    std::fs::write(&breaks, b"").unwrap();
    browser.click("#cmd-approve").await;
    let why = browser
        .wait_text(
            "#paused-because",
            "the automatic pause and its reason",
            |t| t.contains("over the error threshold"),
        )
        .await;
    assert!(why.contains("service fails on the new OS"), "{why}");
    browser.shot("09-rollout-paused-by-failures").await;

    browser.click_confirmed("#cmd-abort").await;
    browser
        .wait_text("h1", "the rollout is aborted", |t| t.contains("aborted"))
        .await;
    browser.shot("10-rollout-aborted").await;

    // The overview tells of it all; at a phone's width too.
    browser.go("#/").await;
    browser
        .wait_text("#latest-events", "the latest events", |t| {
            t.contains("aborted by")
        })
        .await;
    browser.resize(PHONE).await;
    browser.shot("11-overview-phone").await;
    browser.resize(DESKTOP).await;

    // The audit log has the operator's actions.
    browser.go("#/audit").await;
    browser
        .wait_text("#audit-table", "the audit log", |t| {
            t.contains("rollout.start") && t.contains("rollout.abort")
        })
        .await;
    browser.shot("12-audit").await;

    // An admin makes a viewer token ...
    browser.go("#/tokens").await;
    browser
        .fill("#token-form input[name=name]", "watcher")
        .await;
    browser
        .click("#token-form select[name=role] option[value=viewer]")
        .await;
    browser.click("#token-form button[type=submit]").await;
    let secret = browser
        .wait_text("#token-secret code", "the new token's secret", |t| {
            t.starts_with("uplift_")
        })
        .await;
    browser
        .wait_text("#token-table", "the token is listed", |t| {
            t.contains("watcher")
        })
        .await;
    browser.shot("13-tokens").await;

    // ... and the viewer sees everything but may do nothing.
    browser.click("#logout").await;
    browser.login(secret.trim()).await;
    browser
        .wait_text("#whoami", "the viewer is logged in", |t| {
            t.contains("viewer")
        })
        .await;
    let nav = browser.wait_text("nav.views", "the views", |_| true).await;
    assert!(!nav.contains("Audit") && !nav.contains("Tokens"), "{nav}");
    browser.go(&format!("#/rollouts/{rollout}")).await;
    browser
        .wait_text("h1", "the rollout, for the viewer", |t| {
            t.contains(&format!("Rollout {rollout}"))
        })
        .await;
    assert_eq!(browser.count("#rollout-commands button").await, 0);
    browser.go("#/rollouts").await;
    browser
        .wait_count("#rollout-table tbody tr", "the rollouts", |n| n >= 1)
        .await;
    assert_eq!(browser.count("#new-rollout").await, 0);
    browser.go("#/devices").await;
    browser
        .wait_count(
            "#device-table tbody tr",
            "the devices, for the viewer",
            |n| n == DEVICES,
        )
        .await;
    assert_eq!(browser.count("#device-table input[type=checkbox]").await, 0);
    assert_eq!(browser.count("#release-upload").await, 0);
    browser.shot("14-viewer-devices").await;
    let forced: i64 = browser
        .driver
        .execute_async(
            &format!(
                "const done = arguments[arguments.length - 1];
                 fetch('/api/v1/rollouts/{rollout}/resume', {{method: 'POST', headers: {{
                   Authorization: 'Bearer ' + sessionStorage.getItem('uplift.token')}}}})
                   .then(r => done(r.status), () => done(0));"
            ),
            vec![],
        )
        .await
        .unwrap()
        .convert()
        .unwrap();
    assert_eq!(forced, 403, "a viewer's forced command is refused");

    // The server goes away: the page says its stream is cut.
    fx.server.kill();
    browser
        .wait_text("#stream-status", "the cut stream shows", |t| {
            t.contains("Disconnected")
        })
        .await;
    browser.shot("15-stream-disconnected").await;
    browser.quit().await;
    drop(devices);
}
