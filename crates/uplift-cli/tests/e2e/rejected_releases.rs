//! Releases an agent must refuse. Each is rejected with a clear error kind
//! the operator sees in `uplift devices list`, the new slot is never marked
//! bootable, and the boot environment is left exactly as it was.

use crate::common;

use common::*;
use std::process::Command;
use uplift_fleet::{Device, ServerProcess};
use uplift_proto::channel::AgentState;
use uplift_proto::{ErrorKind, SlotName};
use uplift_release::keys::ReleaseSigningKey;

/// Waits for the device to fail, then checks nothing bootable changed.
async fn assert_rejected(
    fx: &Fixture,
    device: &Device,
    env_before: &[u8],
    kind: ErrorKind,
) -> String {
    let view = fx
        .wait_device(device, "the device to report the failure", |d| {
            d.state == Some(AgentState::Failed)
        })
        .await;
    let error = view.last_error.expect("the failure carries an error");
    assert_eq!(error.kind, kind, "{error}");
    assert_eq!(
        view.running_version,
        Some(v("1.0")),
        "still running the old version"
    );
    assert_eq!(
        std::fs::read(device.bootenv_path()).unwrap(),
        env_before,
        "boot environment untouched"
    );
    let boot = device.boot_state().unwrap();
    assert_eq!((boot.default_slot, boot.trial), (SlotName::A, None));
    error.message
}

async fn enrolled_device(fx: &Fixture, name: &str) -> (Device, Vec<u8>) {
    let device = fx.device(name, fx.spec(&format!("hw-{name}")));
    fx.wait_enrolled(&device).await;
    let env = std::fs::read(device.bootenv_path()).unwrap();
    (device, env)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifest_signed_by_an_unknown_key_is_rejected() {
    let fx = Fixture::start();
    let (device, env) = enrolled_device(&fx, "untrusted").await;
    let attacker = ReleaseSigningKey::from_seed([66; 32]);
    fx.release("1.1", DEVICE_TYPE, &fx.image_v1_1, &attacker)
        .await;
    fx.rollout("1.1", Some(vec![id_of(&device)])).await;
    let message = assert_rejected(&fx, &device, &env, ErrorKind::ManifestSignature).await;
    assert!(
        message.contains(&attacker.public_key().key_id()),
        "names the unknown key: {message}"
    );
    assert_eq!(
        std::fs::metadata(device.slot_path(SlotName::B))
            .unwrap()
            .len(),
        0,
        "no chunk written"
    );

    // The operator sees it in the CLI's device list.
    let (ok, table, err) = uplift(&fx, &["devices", "list"]);
    assert!(ok, "{table}{err}");
    assert!(
        table.contains("failed") && table.contains("manifest_signature"),
        "{table}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_for_another_device_type_is_rejected() {
    let fx = Fixture::start();
    let (device, env) = enrolled_device(&fx, "wrongtype").await;
    fx.release("1.1", "other-hardware", &fx.image_v1_1, &fx.key)
        .await;
    fx.rollout("1.1", Some(vec![id_of(&device)])).await;
    let message = assert_rejected(&fx, &device, &env, ErrorKind::WrongDeviceType).await;
    assert!(
        message.contains("other-hardware") && message.contains(DEVICE_TYPE),
        "{message}"
    );
    assert_eq!(
        std::fs::metadata(device.slot_path(SlotName::B))
            .unwrap()
            .len(),
        0,
        "no chunk written"
    );
}

/// `uplift <args> --server .. --token .. --ca ..` against the fixture's server.
fn uplift(fx: &Fixture, args: &[&str]) -> (bool, String, String) {
    let out = run_bounded(
        Command::new(env!("CARGO_BIN_EXE_uplift"))
            .args(args)
            .args([
                "--server",
                &fx.server.endpoint.url,
                "--token",
                &fx.server.admin_token,
                "--ca",
            ])
            .arg(&fx.server.endpoint.ca_file),
        WAIT,
        fx.dir.path(),
    );
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_damaged_on_the_server_disk_is_refused_reported_and_repaired_by_upload() {
    let fx = Fixture::start();
    let (device, env) = enrolled_device(&fx, "corrupt").await;
    let release = fx
        .release("1.1", DEVICE_TYPE, &fx.image_v1_1, &fx.key)
        .await;
    // Flip bytes in the middle of one stored chunk, keeping its length: a
    // size check cannot see it.
    let manifest = uplift_release::build::ReleaseDir::open(&release)
        .unwrap()
        .read_release()
        .unwrap()
        .1;
    let chunk = manifest.chunks[3].hash.to_hex();
    let stored = fx
        .server
        .dir
        .join("chunks")
        .join(&chunk[..2])
        .join(format!("{chunk}.zst"));
    let mut bytes = std::fs::read(&stored).unwrap();
    let mid = bytes.len() / 2;
    for b in &mut bytes[mid..mid + 8] {
        *b ^= 0xff;
    }
    std::fs::write(&stored, bytes).unwrap();
    let (code, said) = server_check(&fx);
    assert_eq!(
        code,
        Some(1),
        "the scrub finds it before any device does: {said}"
    );
    assert!(
        said.contains(&chunk) && said.contains("release 1.1"),
        "{said}"
    );

    // The server never serves the bad bytes: it says what is wrong instead.
    fx.rollout("1.1", None).await;
    let message = assert_rejected(&fx, &device, &env, ErrorKind::StoredChunkDamaged).await;
    assert!(
        message.contains(&chunk) && message.contains("uplift release upload"),
        "the device reports the server's reason: {message}"
    );
    assert!(
        !device.log().contains("chunk_hash_mismatch"),
        "the device never received the damaged bytes:\n{}",
        device.log()
    );
    assert!(
        fx.server.log_tail(200).contains(&chunk),
        "the server log names the chunk"
    );
    let listed = fx.client.releases().await.unwrap();
    assert_eq!(listed[0].damaged_chunks, 1, "{listed:?}");
    let (ok, table, warning) = uplift(&fx, &["release", "list"]);
    assert!(ok, "{table}{warning}");
    assert!(table.contains("1 chunks damaged"), "{table}");
    assert!(warning.contains("release upload"), "{warning}");

    // Repair: the same release directory uploaded again.
    let (ok, out, err) = uplift(&fx, &["release", "upload", release.to_str().unwrap()]);
    assert!(
        ok,
        "uploading the same release again repairs it: {out}{err}"
    );
    assert!(
        out.contains("(1 new)"),
        "only the damaged chunk is sent: {out}"
    );
    let (code, said) = server_check(&fx);
    assert_eq!(code, Some(0), "{said}");
    assert_eq!(fx.client.releases().await.unwrap()[0].damaged_chunks, 0);

    // The next rollout succeeds, nothing deleted by hand.
    fx.rollout("1.1", None).await;
    fx.wait_device(&device, "the upgrade after the repair", |d| {
        d.state == Some(AgentState::Idle) && d.running_version == Some(v("1.1"))
    })
    .await;
    let boot = device.boot_state().unwrap();
    assert_eq!((boot.default_slot, boot.trial), (SlotName::B, None));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_manifest_under_an_existing_version_is_still_refused() {
    let fx = Fixture::start();
    fx.release("1.1", DEVICE_TYPE, &fx.image_v1_1, &fx.key)
        .await;
    let other = fx.path("releases/other-1.1");
    let options =
        uplift_release::build::ReleaseOptions::new(v("1.1"), DEVICE_TYPE.parse().unwrap());
    uplift_release::build::create_release(&fx.image_v1_0, &other, &options, &fx.key).unwrap();
    let (ok, out, err) = uplift(&fx, &["release", "upload", other.to_str().unwrap()]);
    assert!(!ok, "{out}");
    assert!(err.contains("409") && err.contains("immutable"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_version_offered_downloads_and_writes_nothing() {
    let fx = Fixture::start();
    let (device, env) = enrolled_device(&fx, "same").await;
    fx.release("1.0", DEVICE_TYPE, &fx.image_v1_0, &fx.key)
        .await;
    let rollout = fx.rollout("1.0", None).await;
    let deadline = std::time::Instant::now() + WAIT;
    while !device.log().contains("already running 1.0") {
        assert!(
            std::time::Instant::now() < deadline,
            "agent never considered the offer:\n{}",
            device.log()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let status = fx.client.rollout(rollout).await.unwrap();
    assert_eq!(status.counts.succeeded, 1, "{status:?}");
    let stats = fx.client.stats().await.unwrap();
    assert_eq!(
        (stats.bytes_sent, stats.chunks_sent),
        (0, 0),
        "nothing downloaded, not even the manifest"
    );
    assert_eq!(
        std::fs::metadata(device.slot_path(SlotName::B))
            .unwrap()
            .len(),
        0,
        "inactive slot not written"
    );
    assert_eq!(
        std::fs::read(device.bootenv_path()).unwrap(),
        env,
        "boot environment untouched"
    );
}

/// Makes release 0.9 of the 1.1 image with `uplift release create`, its
/// key's permission to replace versions up to `up_to` given by the flag,
/// and uploads it.
async fn downgrade_release(fx: &Fixture, up_to: &str) {
    let key_file = fx.path("release.key");
    fx.key.write_to_file(&key_file).unwrap();
    let dir = fx.path("releases/0.9-downgrade");
    let out = run_bounded(
        Command::new(env!("CARGO_BIN_EXE_uplift"))
            .args(["release", "create", "--image"])
            .arg(&fx.image_v1_1)
            .args(["--version", "0.9", "--device-type", DEVICE_TYPE, "--key"])
            .arg(&key_file)
            .arg("--out")
            .arg(&dir)
            .args(["--may-replace-up-to", up_to]),
        WAIT,
        fx.dir.path(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    fx.client.upload_release(&dir, |_| {}).await.unwrap();
}

fn downgrade_to(version: &str) -> uplift_proto::api::RolloutCreate {
    uplift_proto::api::RolloutCreate {
        release: v(version),
        devices: None,
        tags: None,
        from_versions: Vec::new(),
        allow_downgrade: true,
        limits: Default::default(),
        policy: Default::default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_downgrade_is_refused_unless_the_rollout_explicitly_allows_it() {
    let fx = Fixture::start();
    let (device, env) = enrolled_device(&fx, "downgrade").await;
    // The release key allows 0.9 to replace 1.0; the rollout does not ask.
    downgrade_release(&fx, "1.0").await;
    fx.rollout("0.9", None).await;
    let message = assert_rejected(&fx, &device, &env, ErrorKind::DowngradeRefused).await;
    assert!(
        message.contains("--allow-downgrade"),
        "says what to do: {message}"
    );
    assert_eq!(
        fx.client.stats().await.unwrap().bytes_sent,
        0,
        "nothing downloaded"
    );

    // Both words: the rollout asks, and the release key allowed it.
    fx.client.start_rollout(&downgrade_to("0.9")).await.unwrap();
    fx.wait_device(&device, "the allowed downgrade", |d| {
        d.running_version == Some(v("0.9")) && d.state == Some(AgentState::Idle)
    })
    .await;
    assert_eq!(device.boot_state().unwrap().default_slot, SlotName::B);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_downgrade_allowed_by_the_server_but_not_by_the_release_key_is_refused() {
    let mut fx = Fixture::start();
    let (mut device, env) = enrolled_device(&fx, "forced-downgrade").await;
    // A validly signed older release whose key never allowed a downgrade.
    fx.release("0.9", DEVICE_TYPE, &fx.image_v1_1, &fx.key)
        .await;

    // An honest server refuses the downgrade up front, and says why.
    let err = fx
        .client
        .start_rollout(&downgrade_to("0.9"))
        .await
        .unwrap_err();
    let wire = err
        .downcast_ref::<uplift_proto::WireError>()
        .unwrap_or_else(|| panic!("a typed refusal: {err:#}"));
    assert_eq!(wire.kind, ErrorKind::DowngradeNotSigned, "{wire}");
    assert!(
        wire.message.contains("--may-replace-up-to"),
        "says what to do: {wire}"
    );
    assert!(format!("{err:#}").contains("409"), "{err:#}");

    // A compromised server skips its check: whoever holds its database
    // makes a rollout that allows the downgrade, and the server sends
    // that word to the device as its own.
    device.stop();
    let rollout = fx.rollout("0.9", None).await;
    fx.server.stop();
    let db = fx.server.dir.join("uplift.db");
    {
        use sqlx::ConnectOptions as _;
        let mut conn = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(&db)
            .connect()
            .await
            .unwrap();
        let changed = sqlx::query("UPDATE rollouts SET allow_downgrade = 1 WHERE id = ?")
            .bind(rollout)
            .execute(&mut conn)
            .await
            .unwrap()
            .rows_affected();
        assert_eq!(changed, 1);
    }
    let listen = fx.server.listen_addr().to_owned();
    fx.server = ServerProcess::start_on(&fx.bins, &fx.server.dir.clone(), &listen).unwrap();
    fx.client = fx.server.client().unwrap();
    device.start(&fx.bins).unwrap();

    let message = assert_rejected(&fx, &device, &env, ErrorKind::DowngradeRefused).await;
    assert!(
        message.contains("the release key did not sign 0.9 as allowed to replace 1.0"),
        "says whose word was missing: {message}"
    );
    assert_eq!(
        std::fs::metadata(device.slot_path(SlotName::B))
            .unwrap()
            .len(),
        0,
        "no chunk written"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_manifest_is_rejected() {
    let fx = Fixture::start();
    let (device, env) = enrolled_device(&fx, "frozen").await;
    // Signed two years ago, valid for a month: a replayed, stale release.
    let mut options =
        uplift_release::build::ReleaseOptions::new(v("1.1"), DEVICE_TYPE.parse().unwrap());
    options.now -= time::Duration::days(730);
    options.valid_for = time::Duration::days(30);
    let dir = fx.path("releases/expired");
    uplift_release::build::create_release(&fx.image_v1_1, &dir, &options, &fx.key).unwrap();
    fx.client.upload_release(&dir, |_| {}).await.unwrap();
    fx.rollout("1.1", None).await;
    let message = assert_rejected(&fx, &device, &env, ErrorKind::ManifestExpired).await;
    assert!(message.contains("expired"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_chunk_grown_past_any_valid_size_is_never_served() {
    let fx = Fixture::start();
    let (device, env) = enrolled_device(&fx, "endless").await;
    let release = fx
        .release("1.1", DEVICE_TYPE, &fx.image_v1_1, &fx.key)
        .await;
    // The server's copy of one chunk grows far past its declared size.
    let manifest = uplift_release::build::ReleaseDir::open(&release)
        .unwrap()
        .read_release()
        .unwrap()
        .1;
    let entry = manifest.chunks[2];
    let hex = entry.hash.to_hex();
    let stored = fx
        .server
        .dir
        .join("chunks")
        .join(&hex[..2])
        .join(format!("{hex}.zst"));
    let mut bytes = std::fs::read(&stored).unwrap();
    bytes.extend(std::iter::repeat_n(0x5a, 4 << 20));
    std::fs::write(&stored, bytes).unwrap();

    fx.rollout("1.1", None).await;
    // The server checks what it serves and refuses the chunk; the agent's
    // own limit on a body (for a hostile server that does send endless
    // data) is tested in uplift-agent's install tests.
    let message = assert_rejected(&fx, &device, &env, ErrorKind::StoredChunkDamaged).await;
    assert!(message.contains(&hex), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_release_key_is_accepted_once_the_agent_trusts_it() {
    let fx = Fixture::start();
    let new_key = ReleaseSigningKey::from_seed([21; 32]);
    // The device trusts only the new key; the release carries both signatures.
    let mut spec = fx.spec("hw-rotated");
    spec.trusted_keys = vec![new_key.public_key().to_string()];
    let device = fx.device("rotated", spec);
    fx.wait_enrolled(&device).await;
    let dir = fx.path("releases/rotated");
    let options =
        uplift_release::build::ReleaseOptions::new(v("1.1"), DEVICE_TYPE.parse().unwrap());
    uplift_release::build::create_release(&fx.image_v1_1, &dir, &options, &fx.key).unwrap();
    let release = uplift_release::build::ReleaseDir::open(&dir).unwrap();
    let mut signed = release.read_manifest().unwrap();
    signed.add_signature(&new_key);
    std::fs::write(release.manifest_path(), signed.to_json()).unwrap();
    fx.client.upload_release(&dir, |_| {}).await.unwrap();
    fx.rollout("1.1", None).await;
    fx.wait_device(&device, "the upgrade", |d| {
        d.running_version == Some(v("1.1")) && d.state == Some(AgentState::Idle)
    })
    .await;
}
