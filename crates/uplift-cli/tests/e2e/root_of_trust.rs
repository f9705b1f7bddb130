//! Devices that trust a root of trust (`trusted_root`) instead of a flat
//! list of release keys: the key ceremony run with the `uplift root`
//! commands as key holders run it, roots published to a real server, and
//! real agents that walk the chain and check releases against its newest
//! root. With a root that names a freshness role, every offer must carry
//! the server's current signed freshness. Each attack is refused with an
//! error kind the operator sees, and the device stays on its good slot.

use crate::common;

use common::tampering::TamperingRelay;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use uplift_fleet::{Device, DeviceSpec};
use uplift_proto::channel::{AgentState, Offer, ServerMsg};
use uplift_proto::trust::RootView;
use uplift_proto::{ErrorKind, SlotName};
use uplift_release::keys::{write_public_key_file, ReleaseSigningKey};
use uplift_release::root::{Role, Root, SignedRoot, ROOT_FORMAT};

/// A key held by someone: its private file (as `uplift keygen` writes it)
/// and its public file beside it.
struct Holder {
    key: ReleaseSigningKey,
    private: PathBuf,
    public: PathBuf,
}

fn holder(fx: &Fixture, name: &str, seed: u8) -> Holder {
    let dir = fx.path("keys");
    std::fs::create_dir_all(&dir).unwrap();
    let key = ReleaseSigningKey::from_seed([seed; 32]);
    let private = dir.join(format!("{name}.key"));
    let public = dir.join(format!("{name}.pub"));
    if !private.exists() {
        key.write_to_file(&private).unwrap();
        write_public_key_file(&public, &key.public_key()).unwrap();
    }
    Holder {
        key,
        private,
        public,
    }
}

/// `uplift ARGS` (no server): what it printed; it must succeed.
fn offline(fx: &Fixture, args: &[&str]) -> String {
    let out = run_bounded(
        Command::new(env!("CARGO_BIN_EXE_uplift")).args(args),
        WAIT,
        fx.dir.path(),
    );
    assert!(
        out.status.success(),
        "uplift {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// A device whose image ships `root` as its root of trust.
fn spec_with_root(fx: &Fixture, name: &str, root: &Path) -> DeviceSpec {
    let mut spec = fx.spec(&format!("hw-{name}"));
    spec.trusted_keys = Vec::new();
    spec.extra_config = format!("trusted_root = {:?}\n", p(root));
    spec
}

/// Writes a root signed by `signers` directly (for roots the CLI would not
/// make: an expired one).
fn write_root(path: &Path, root: &Root, signers: &[&ReleaseSigningKey]) {
    std::fs::write(path, root.sign(signers).unwrap().to_json()).unwrap();
}

fn role(keys: &[&Holder], threshold: u32) -> Role {
    Role {
        keys: keys.iter().map(|h| h.key.public_key()).collect(),
        threshold,
    }
}

/// Waits for the device to fail with `kind`, still on slot a and 1.0.
async fn assert_refused(
    fx: &Fixture,
    device: &Device,
    env_before: &[u8],
    kind: ErrorKind,
) -> String {
    let view = fx
        .wait_device(device, "the device to report the refusal", |d| {
            d.state == Some(AgentState::Failed)
        })
        .await;
    let error = view.last_error.expect("the failure carries an error");
    assert_eq!(error.kind, kind, "{error}");
    assert_eq!(
        view.running_version,
        Some(v("1.0")),
        "still on the old version"
    );
    assert_eq!(
        std::fs::read(device.bootenv_path()).unwrap(),
        env_before,
        "boot environment untouched"
    );
    let boot = device.boot_state().unwrap();
    assert_eq!((boot.default_slot, boot.trial), (SlotName::A, None));
    // The operator sees it in the device's history too (written in batches).
    let id = id_of(device).to_string();
    let mut history = String::new();
    for _ in 0..50 {
        history = uplift(fx, &["devices", "history", &id]);
        if history.contains(kind.as_str()) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert!(history.contains(kind.as_str()), "{history}");
    error.message
}

async fn installed(fx: &Fixture, device: &Device, version: &str) {
    fx.wait_device(device, &format!("the device to run {version}"), |d| {
        d.running_version == Some(v(version)) && d.state == Some(AgentState::Idle) && d.online
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_offline_through_three_root_rotations_catches_up_and_installs() {
    let fx = Fixture::start();
    // Root keys a, b, c (2 of 3); release key r1. Each rotation replaces one
    // root key and the release key.
    let a = holder(&fx, "root-a", 1);
    let b = holder(&fx, "root-b", 2);
    let c = holder(&fx, "root-c", 3);
    let d = holder(&fx, "root-d", 4);
    let e = holder(&fx, "root-e", 5);
    let f = holder(&fx, "root-f", 6);
    let releases: Vec<Holder> = (0..4)
        .map(|i| holder(&fx, &format!("release-{i}"), 20 + i))
        .collect();
    let root_file = |n: u32| fx.path(&format!("root-{n}.json"));

    offline(
        &fx,
        &[
            "root",
            "init",
            "--root-key",
            p(&a.public),
            "--root-key",
            p(&b.public),
            "--root-key",
            p(&c.public),
            "--root-threshold",
            "2",
            "--release-key",
            p(&releases[0].public),
            "--out",
            p(&root_file(1)),
        ],
    );
    for signer in [&a, &b] {
        offline(
            &fx,
            &[
                "root",
                "sign",
                "--key",
                p(&signer.private),
                p(&root_file(1)),
            ],
        );
    }
    let shown = offline(&fx, &["root", "show", p(&root_file(1))]);
    assert!(
        shown.contains("signed by 2 of its 3 root keys, 2 needed"),
        "{shown}"
    );
    uplift(&fx, &["root", "publish", p(&root_file(1))]);

    let mut device = fx.device("traveller", spec_with_root(&fx, "traveller", &root_file(1)));
    fx.wait_enrolled(&device).await;
    device.stop();

    // Three rotations while the device is off: v2 drops a for d, v3 drops b
    // for e, v4 drops c for f; each is signed by two old and two new keys.
    let rotations = [
        (2, [&b, &c, &d], [&b, &c, &d]),
        (3, [&c, &d, &e], [&c, &d, &e]),
        (4, [&d, &e, &f], [&d, &e, &f]),
    ];
    for (n, keys, signers) in rotations {
        let mut args = vec!["root", "next", "--from"];
        let from = root_file(n - 1);
        let out = root_file(n);
        args.push(p(&from));
        for k in keys {
            args.extend(["--root-key", p(&k.public)]);
        }
        args.extend([
            "--release-key",
            p(&releases[n as usize - 1].public),
            "--out",
            p(&out),
        ]);
        offline(&fx, &args);
        let mut last = String::new();
        for signer in signers {
            last = offline(
                &fx,
                &[
                    "root",
                    "sign",
                    "--key",
                    p(&signer.private),
                    "--previous",
                    p(&from),
                    p(&out),
                ],
            );
        }
        assert!(
            last.contains("signed by 3 of its 3 root keys")
                && last.contains(&format!("by 2 of version {}'s 3 root keys", n - 1)),
            "{last}"
        );
        uplift(&fx, &["root", "publish", p(&out)]);
    }
    let listed: Vec<RootView> = uplift_json(&fx, &["root", "list"]);
    assert_eq!(
        listed.iter().map(|r| r.version).collect::<Vec<_>>(),
        [1, 2, 3, 4]
    );
    assert_eq!(
        listed[3].release_keys,
        [releases[3].key.public_key().key_id()]
    );

    // A release signed only by the newest release key: the device, which
    // shipped with root 1, can trust it only through the whole chain.
    fx.release("1.1", DEVICE_TYPE, &fx.image_v1_1, &releases[3].key)
        .await;
    device.start(&fx.bins).unwrap();
    fx.wait_enrolled(&device).await;
    fx.rollout("1.1", Some(vec![id_of(&device)])).await;
    installed(&fx, &device, "1.1").await;
    let stored =
        SignedRoot::from_json(&std::fs::read(device.dir.join("state/root.json")).unwrap()).unwrap();
    assert_eq!(
        stored.parse_unverified().unwrap().version,
        4,
        "the device keeps the newest root"
    );
    let audit = uplift(&fx, &["audit", "--action", "root.publish"]);
    assert_eq!(audit.matches("root.publish").count(), 4, "{audit}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_signed_by_a_revoked_release_key_is_refused() {
    let fx = Fixture::start();
    let a = holder(&fx, "root-a", 1);
    let leaked = holder(&fx, "release-leaked", 20);
    let fresh = holder(&fx, "release-fresh", 21);
    let v1 = fx.path("root-1.json");
    write_root(
        &v1,
        &Root {
            format: ROOT_FORMAT,
            version: 1,
            expires_at: "2099-01-01T00:00:00Z".into(),
            root: role(&[&a], 1),
            release: role(&[&leaked], 1),
            freshness: None,
        },
        &[&a.key],
    );
    uplift(&fx, &["root", "publish", p(&v1)]);
    let device = fx.device("revoked", spec_with_root(&fx, "revoked", &v1));
    fx.wait_enrolled(&device).await;
    let env = std::fs::read(device.bootenv_path()).unwrap();

    // The release key leaked: root 2 names a fresh one in its place.
    let v2 = fx.path("root-2.json");
    offline(
        &fx,
        &[
            "root",
            "next",
            "--from",
            p(&v1),
            "--release-key",
            p(&fresh.public),
            "--out",
            p(&v2),
        ],
    );
    offline(&fx, &["root", "sign", "--key", p(&a.private), p(&v2)]);
    uplift(&fx, &["root", "publish", p(&v2)]);

    // The thief signs a release with the leaked key; the server stores it
    // (it never checks release signatures), the device refuses it.
    fx.release("1.1", DEVICE_TYPE, &fx.image_v1_1, &leaked.key)
        .await;
    fx.rollout("1.1", Some(vec![id_of(&device)])).await;
    let message = assert_refused(&fx, &device, &env, ErrorKind::ManifestSignature).await;
    assert!(
        message.contains(&leaked.key.public_key().key_id()),
        "names the revoked key: {message}"
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
async fn one_of_two_signatures_under_a_two_of_three_threshold_is_refused() {
    let fx = Fixture::start();
    let a = holder(&fx, "root-a", 1);
    let k: Vec<Holder> = (0..3)
        .map(|i| holder(&fx, &format!("release-{i}"), 30 + i))
        .collect();
    let attacker = holder(&fx, "attacker", 66);
    let v1 = fx.path("root-1.json");
    offline(
        &fx,
        &[
            "root",
            "init",
            "--root-key",
            p(&a.public),
            "--release-key",
            p(&k[0].public),
            "--release-key",
            p(&k[1].public),
            "--release-key",
            p(&k[2].public),
            "--release-threshold",
            "2",
            "--out",
            p(&v1),
        ],
    );
    offline(&fx, &["root", "sign", "--key", p(&a.private), p(&v1)]);
    uplift(&fx, &["root", "publish", p(&v1)]);
    let device = fx.device("threshold", spec_with_root(&fx, "threshold", &v1));
    fx.wait_enrolled(&device).await;
    let env = std::fs::read(device.bootenv_path()).unwrap();

    // Two signatures: one release key that leaked, and the thief's own.
    let dir = fx.path("releases/1.1-two-signatures");
    let options =
        uplift_release::build::ReleaseOptions::new(v("1.1"), DEVICE_TYPE.parse().unwrap());
    uplift_release::build::create_release(&fx.image_v1_1, &dir, &options, &k[0].key).unwrap();
    offline(
        &fx,
        &["release", "sign", p(&dir), "--key", p(&attacker.private)],
    );
    fx.client.upload_release(&dir, |_| {}).await.unwrap();
    fx.rollout("1.1", Some(vec![id_of(&device)])).await;
    let message = assert_refused(&fx, &device, &env, ErrorKind::ManifestSignature).await;
    assert!(
        message.contains("signed by 1 of the 2 release keys"),
        "{message}"
    );

    // Signed by two of the three release keys, the same image installs.
    let dir = fx.path("releases/1.2-two-keys");
    let options =
        uplift_release::build::ReleaseOptions::new(v("1.2"), DEVICE_TYPE.parse().unwrap());
    uplift_release::build::create_release(&fx.image_v1_1, &dir, &options, &k[1].key).unwrap();
    offline(
        &fx,
        &["release", "sign", p(&dir), "--key", p(&k[2].private)],
    );
    fx.client.upload_release(&dir, |_| {}).await.unwrap();
    fx.rollout("1.2", Some(vec![id_of(&device)])).await;
    installed(&fx, &device, "1.2").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_whose_root_expired_refuses_releases_with_a_clear_error() {
    let fx = Fixture::start();
    let a = holder(&fx, "root-a", 1);
    let v1 = fx.path("root-1.json");
    write_root(
        &v1,
        &Root {
            format: ROOT_FORMAT,
            version: 1,
            expires_at: "2021-01-01T00:00:00Z".into(),
            root: role(&[&a], 1),
            release: role(&[&holder(&fx, "release", 20)], 1),
            freshness: None,
        },
        &[&a.key],
    );
    let device = fx.device("stale", spec_with_root(&fx, "stale", &v1));
    fx.wait_enrolled(&device).await;
    let env = std::fs::read(device.bootenv_path()).unwrap();
    fx.release("1.1", DEVICE_TYPE, &fx.image_v1_1, &fx.key)
        .await;
    fx.rollout("1.1", Some(vec![id_of(&device)])).await;
    let message = assert_refused(&fx, &device, &env, ErrorKind::RootExpired).await;
    assert!(
        message.contains("root of trust version 1 expired") && message.contains("newer root"),
        "{message}"
    );
}

/// A fixture whose server signs offers' freshness with `key` (unless
/// `None`), valid `ttl_secs`; and root 1 naming that key's public half in
/// its freshness role, with the fixture's release key.
fn freshness_fixture(key: Option<&Path>, ttl_secs: u64) -> (Fixture, PathBuf) {
    let config = match key {
        Some(key) => format!(
            "[trust]\nfreshness_key = {:?}\nfreshness_ttl_secs = {ttl_secs}\n",
            p(key)
        ),
        None => String::new(),
    };
    let fx = Fixture::start_with(uplift_fleet::ServerLaunch {
        config_toml: Some(config),
        ..uplift_fleet::ServerLaunch::on("127.0.0.1:0")
    });
    let a = holder(&fx, "root-a", 1);
    let online = ReleaseSigningKey::from_seed([50; 32]);
    let v1 = fx.path("root-1.json");
    write_root(
        &v1,
        &Root {
            format: ROOT_FORMAT,
            version: 1,
            expires_at: "2099-01-01T00:00:00Z".into(),
            root: role(&[&a], 1),
            release: Role::one(fx.key.public_key()),
            freshness: Some(Role::one(online.public_key())),
        },
        &[&a.key],
    );
    (fx, v1)
}

/// The server's online key, outside the fixture's directory (the server
/// must find it at start).
fn online_key(dir: &tempfile::TempDir) -> PathBuf {
    let path = dir.path().join("freshness.key");
    ReleaseSigningKey::from_seed([50; 32])
        .write_to_file(&path)
        .unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offer_with_current_freshness_installs_and_the_device_keeps_the_newest() {
    let keys = tempfile::tempdir().unwrap();
    let (fx, v1) = freshness_fixture(Some(&online_key(&keys)), 3600);
    let device = fx.device("fresh", spec_with_root(&fx, "fresh", &v1));
    fx.wait_enrolled(&device).await;
    fx.release("1.1", DEVICE_TYPE, &fx.image_v1_1, &fx.key)
        .await;
    fx.rollout("1.1", Some(vec![id_of(&device)])).await;
    installed(&fx, &device, "1.1").await;
    let accepted: serde_json::Value =
        serde_json::from_slice(&std::fs::read(device.dir.join("state/freshness.json")).unwrap())
            .unwrap();
    let record: serde_json::Value =
        serde_json::from_str(accepted["record"]["signed"].as_str().unwrap()).unwrap();
    assert_eq!(record["device_id"], id_of(&device).to_string());
    assert_eq!(record["version"], "1.1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offer_without_freshness_is_refused_when_the_root_requires_it() {
    // A server without the online key (an old one, or an impostor that
    // has the TLS key but not the freshness key).
    let (fx, v1) = freshness_fixture(None, 3600);
    let device = fx.device("unfresh", spec_with_root(&fx, "unfresh", &v1));
    fx.wait_enrolled(&device).await;
    let env = std::fs::read(device.bootenv_path()).unwrap();
    fx.release("1.1", DEVICE_TYPE, &fx.image_v1_1, &fx.key)
        .await;
    fx.rollout("1.1", Some(vec![id_of(&device)])).await;
    let message = assert_refused(&fx, &device, &env, ErrorKind::FreshnessInvalid).await;
    assert!(message.contains("carries no signed freshness"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offer_with_expired_freshness_is_refused() {
    // Freshness valid one second, and a network that holds the device's
    // traffic back for several: the offer is stale by the time the device
    // has fetched what it needs to check it.
    let keys = tempfile::tempdir().unwrap();
    let (fx, v1) = freshness_fixture(Some(&online_key(&keys)), 1);
    let upstream = fx
        .server
        .endpoint
        .url
        .trim_start_matches("https://")
        .parse()
        .unwrap();
    let proxy = uplift_fleet::Proxy::start(upstream).await.unwrap();
    let device = fx.device_via("delayed", spec_with_root(&fx, "delayed", &v1), &proxy.url());
    fx.wait_enrolled(&device).await;
    let env = std::fs::read(device.bootenv_path()).unwrap();
    fx.release("1.1", DEVICE_TYPE, &fx.image_v1_1, &fx.key)
        .await;
    proxy.set_rate(1000);
    fx.rollout("1.1", Some(vec![id_of(&device)])).await;
    let message = assert_refused(&fx, &device, &env, ErrorKind::FreshnessExpired).await;
    assert!(message.contains("freshness expired at"), "{message}");
}

/// An attacker between the devices and the server who holds the server's
/// TLS key (not its online freshness key).
async fn tampering_relay(fx: &Fixture) -> TamperingRelay {
    let upstream = fx.server.listen_addr().parse().unwrap();
    TamperingRelay::start(upstream, &fx.server.dir.join("tls"))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freshness_for_another_device_is_refused() {
    // The operator offers 1.1 to a canary only. The attacker keeps the
    // canary's offer and puts it on another device's channel, to install
    // 1.1 there though no rollout targets it: the release is validly
    // signed, the device may download it, only the freshness names the
    // canary.
    let keys = tempfile::tempdir().unwrap();
    let (fx, v1) = freshness_fixture(Some(&online_key(&keys)), 3600);
    let relay = tampering_relay(&fx).await;
    let canary = fx.device_via("canary", spec_with_root(&fx, "canary", &v1), &relay.url());
    let other = fx.device_via("other", spec_with_root(&fx, "other", &v1), &relay.url());
    fx.wait_enrolled(&canary).await;
    fx.wait_enrolled(&other).await;
    let env = std::fs::read(other.bootenv_path()).unwrap();
    fx.release("1.1", DEVICE_TYPE, &fx.image_v1_1, &fx.key)
        .await;
    fx.rollout("1.1", Some(vec![id_of(&canary)])).await;
    let kept = relay.wait_offer(&id_of(&canary), "1.1").await;
    installed(&fx, &canary, "1.1").await;

    relay.inject(&id_of(&other), ServerMsg::Offer(kept));
    let message = assert_refused(&fx, &other, &env, ErrorKind::FreshnessInvalid).await;
    assert!(
        message.contains(&format!(
            "freshness is for device {}, not {}",
            id_of(&canary),
            id_of(&other)
        )),
        "{message}"
    );
    assert!(
        relay.offers_to(&id_of(&other)).is_empty(),
        "the server itself offered the other device nothing"
    );
}

/// `uplift rollout start` of `version` to `device`, its reboots held for a
/// window that opens in twelve hours: the device downloads and verifies
/// the release (accepting the offer's freshness) and waits, booting
/// nothing.
fn held_rollout(fx: &Fixture, version: &str, device: &Device) -> i64 {
    let opens = time::OffsetDateTime::now_utc() + time::Duration::hours(12);
    let view: uplift_proto::api::RolloutView = uplift_json(
        fx,
        &[
            "rollout",
            "start",
            "--release",
            version,
            "--devices",
            id_of(device).as_str(),
            "--window",
            &format!("{} {} * * *", opens.minute(), opens.hour()),
            "--window-minutes",
            "60",
            "--window-applies-to",
            "reboot",
        ],
    );
    view.id
}

async fn awaiting_reboot_into(fx: &Fixture, device: &Device, version: &str) {
    fx.wait_device(
        device,
        &format!("the device to hold {version} verified"),
        |d| d.state == Some(AgentState::AwaitingReboot) && d.target_version == Some(v(version)),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_old_offer_after_a_newer_release_is_refused() {
    // Freeze: the attacker keeps the offer of 1.1 and, once the operator
    // has moved the device on to 1.2, replays it (as the go to reboot) to
    // hold the device on the older release. Its freshness is still within
    // its hour, for this device and 1.1's manifest: only its age gives it
    // away, against the newer one the device accepted with 1.2.
    let keys = tempfile::tempdir().unwrap();
    let (fx, v1) = freshness_fixture(Some(&online_key(&keys)), 3600);
    let relay = tampering_relay(&fx).await;
    let device = fx.device_via("frozen", spec_with_root(&fx, "frozen", &v1), &relay.url());
    fx.wait_enrolled(&device).await;
    let env = std::fs::read(device.bootenv_path()).unwrap();
    let image_v1_2 = fx.path("images/os-1.2.img");
    uplift_fleet::write_changed_image(&fx.image_v1_0, &image_v1_2, 8, 12).unwrap();
    fx.release("1.1", DEVICE_TYPE, &fx.image_v1_1, &fx.key)
        .await;
    fx.release("1.2", DEVICE_TYPE, &image_v1_2, &fx.key).await;

    let first = held_rollout(&fx, "1.1", &device);
    let old = relay.wait_offer(&id_of(&device), "1.1").await;
    awaiting_reboot_into(&fx, &device, "1.1").await;
    operator(&fx, "abort", first);
    held_rollout(&fx, "1.2", &device);
    awaiting_reboot_into(&fx, &device, "1.2").await;

    relay.inject(
        &id_of(&device),
        ServerMsg::Offer(Offer {
            hold_reboot: false,
            ..old
        }),
    );
    let message = assert_refused(&fx, &device, &env, ErrorKind::FreshnessReplayed).await;
    assert!(
        message.contains("before the newest one this device accepted"),
        "{message}"
    );
    // Like an unsigned `no_update`, the replay did make the device drop the
    // 1.2 it held verified: the freeze lasts only until the device hears
    // the server again. Its next connection brings the current offer, with
    // fresh freshness, and the device holds 1.2 again.
    relay.cut_all();
    awaiting_reboot_into(&fx, &device, "1.2").await;
}
