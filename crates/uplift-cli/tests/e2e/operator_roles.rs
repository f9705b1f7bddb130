//! Operators with roles, end to end: an admin makes tokens with the `uplift`
//! CLI, a release manager uploads, an operator steers a rollout, a viewer
//! is refused both, a revoked token stops working at once, and the audit
//! log then tells the whole story: who did what to what, and how it ended.

use crate::common;

use common::*;
use std::time::Duration;
use uplift_proto::api::RolloutView;
use uplift_proto::auth::{AuditAction, AuditEntry, AuditPage, Caller, Role, TokenCreated};
use uplift_proto::ErrorKind;
use uplift_release::build::{create_release, ReleaseOptions};

/// Runs `uplift ARGS --server ... --ca ... --token TOKEN` to its end.
fn uplift(fx: &Fixture, token: &str, args: &[&str]) -> std::process::Output {
    run_bounded(
        std::process::Command::new(env!("CARGO_BIN_EXE_uplift"))
            .args(args)
            .arg("--server")
            .arg(&fx.server.endpoint.url)
            .arg("--ca")
            .arg(&fx.server.endpoint.ca_file)
            .arg("--token")
            .arg(token),
        Duration::from_secs(60),
        fx.dir.path(),
    )
}

/// `uplift ARGS --json` that must succeed; its answer, parsed.
fn ok_json<T: serde::de::DeserializeOwned>(fx: &Fixture, token: &str, args: &[&str]) -> T {
    let mut with_json = args.to_vec();
    with_json.push("--json");
    let out = uplift(fx, token, &with_json);
    assert!(
        out.status.success(),
        "uplift {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON answer")
}

/// `uplift ARGS` that must be refused; what it said.
fn refused(fx: &Fixture, token: &str, args: &[&str]) -> String {
    let out = uplift(fx, token, args);
    assert!(!out.status.success(), "uplift {args:?} should be refused");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_role_does_what_it_may_and_the_audit_log_tells_who_did_what() {
    let fx = Fixture::start();
    let admin = fx.server.admin_token.clone();
    // Two devices: a canary, and one held back for approval, so the
    // rollout is still open to commands while the operator steers it.
    let devices = [
        fx.device("d1", fx.spec("hw-d1")),
        fx.device("d2", fx.spec("hw-d2")),
    ];
    for device in &devices {
        fx.wait_enrolled(device).await;
    }

    let make = |name: &str, role: Role| -> TokenCreated {
        ok_json(
            &fx,
            &admin,
            &["token", "create", "--name", name, "--role", role.as_str()],
        )
    };
    let builder = make("release-bot", Role::ReleaseManager);
    let ops = make("night-shift", Role::Operator);
    let dashboard = make("dashboard", Role::Viewer);
    let caller: Caller = ok_json(&fx, &dashboard.secret, &["whoami"]);
    assert_eq!(caller.role, Role::Viewer);
    assert_eq!(
        caller.name,
        format!("token {} (dashboard)", dashboard.token.id)
    );
    let listed: Vec<uplift_proto::auth::TokenView> = ok_json(&fx, &admin, &["token", "list"]);
    assert_eq!(listed.len(), 3);
    let list_text =
        String::from_utf8_lossy(&uplift(&fx, &admin, &["token", "list"]).stdout).into_owned();
    for made in [&builder, &ops, &dashboard] {
        assert!(
            !list_text.contains(&made.secret),
            "the list never shows a secret"
        );
    }

    // The release manager uploads; the viewer and the operator may not.
    let release_dir = fx.path("release-1.1");
    let options = ReleaseOptions::new(v("1.1"), DEVICE_TYPE.parse().unwrap());
    create_release(&fx.image_v1_1, &release_dir, &options, &fx.key).unwrap();
    let dir = release_dir.to_str().unwrap();
    let said = refused(&fx, &dashboard.secret, &["release", "upload", dir]);
    assert!(said.contains("has role viewer"), "{said}");
    let said = refused(&fx, &ops.secret, &["release", "upload", dir]);
    assert!(said.contains("may not upload releases"), "{said}");
    let out = uplift(&fx, &builder.secret, &["release", "upload", dir]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The operator starts and steers the rollout; the others may not.
    let start = [
        "rollout",
        "start",
        "--release",
        "1.1",
        "--phase",
        "1",
        "--approval",
    ];
    let said = refused(&fx, &builder.secret, &start);
    assert!(said.contains("may not start or steer rollouts"), "{said}");
    let rollout: RolloutView = ok_json(&fx, &ops.secret, &start);
    let id = rollout.id.to_string();
    let paused: RolloutView = ok_json(&fx, &ops.secret, &["rollout", "pause", &id]);
    assert_eq!(paused.progress.unwrap().state, "paused");
    let said = refused(&fx, &dashboard.secret, &["rollout", "resume", &id]);
    assert!(said.contains("has role viewer"), "{said}");
    let resumed: RolloutView = ok_json(&fx, &ops.secret, &["rollout", "resume", &id]);
    assert_ne!(resumed.progress.unwrap().state, "paused");
    // Nobody but an admin manages tokens or reads the log.
    refused(&fx, &ops.secret, &["token", "list"]);
    refused(&fx, &ops.secret, &["audit"]);

    // Revoked: the very next request is refused.
    let _: uplift_proto::auth::TokenView = ok_json(
        &fx,
        &admin,
        &["token", "revoke", &dashboard.token.id.to_string()],
    );
    let said = refused(&fx, &dashboard.secret, &["devices", "list"]);
    assert!(said.contains("wrong, expired or revoked"), "{said}");

    // The audit log, oldest first here: every change and every refusal of
    // a known caller, under the caller's name.
    let page: AuditPage = ok_json(&fx, &admin, &["audit", "--limit", "100"]);
    let story: Vec<(String, AuditAction, String, Option<ErrorKind>)> = page
        .entries
        .iter()
        .rev()
        .map(|e: &AuditEntry| {
            (
                e.actor.clone(),
                e.action,
                e.target.clone(),
                e.error.as_ref().map(|e| e.kind),
            )
        })
        .collect();
    let admin_name = "bootstrap-admin".to_owned();
    let name = |t: &TokenCreated| format!("token {} ({})", t.token.id, t.token.name);
    let denied = Some(ErrorKind::Forbidden);
    let expected = vec![
        (
            admin_name.clone(),
            AuditAction::TokenCreate,
            name(&builder),
            None,
        ),
        (
            admin_name.clone(),
            AuditAction::TokenCreate,
            name(&ops),
            None,
        ),
        (
            admin_name.clone(),
            AuditAction::TokenCreate,
            name(&dashboard),
            None,
        ),
        (
            name(&dashboard),
            AuditAction::AccessDenied,
            "POST /api/v1/chunks/missing".into(),
            denied,
        ),
        (
            name(&ops),
            AuditAction::AccessDenied,
            "POST /api/v1/chunks/missing".into(),
            denied,
        ),
        (
            name(&builder),
            AuditAction::ReleaseUpload,
            "release 1.1".into(),
            None,
        ),
        (
            name(&builder),
            AuditAction::AccessDenied,
            "POST /api/v1/rollouts".into(),
            denied,
        ),
        (
            name(&ops),
            AuditAction::RolloutStart,
            format!("rollout {id}"),
            None,
        ),
        (
            name(&ops),
            AuditAction::RolloutPause,
            format!("rollout {id}"),
            None,
        ),
        (
            name(&dashboard),
            AuditAction::AccessDenied,
            format!("POST /api/v1/rollouts/{id}/resume"),
            denied,
        ),
        (
            name(&ops),
            AuditAction::RolloutResume,
            format!("rollout {id}"),
            None,
        ),
        (
            name(&ops),
            AuditAction::AccessDenied,
            "GET /api/v1/tokens".into(),
            denied,
        ),
        (
            name(&ops),
            AuditAction::AccessDenied,
            "GET /api/v1/audit".into(),
            denied,
        ),
        (
            admin_name.clone(),
            AuditAction::TokenRevoke,
            name(&dashboard),
            None,
        ),
    ];
    assert_eq!(story, expected);

    // Filtered as an operator would ask.
    let starts: AuditPage = ok_json(&fx, &admin, &["audit", "--action", "rollout.start"]);
    assert_eq!(starts.entries.len(), 1);
    assert_eq!(starts.entries[0].actor, name(&ops));
    let by_ops: AuditPage = ok_json(
        &fx,
        &admin,
        &["audit", "--actor", &name(&ops), "--limit", "2"],
    );
    assert_eq!(by_ops.entries.len(), 2);
    let older: AuditPage = ok_json(
        &fx,
        &admin,
        &[
            "audit",
            "--actor",
            &name(&ops),
            "--before",
            &by_ops.next.expect("more than one page").to_string(),
        ],
    );
    assert_eq!(older.entries.len(), 4, "{:?}", older.entries);
}
