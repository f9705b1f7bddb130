//! Faults injected for real: SIGKILL of the agent mid-download and at random
//! moments, dropped TCP connections, SIGKILL of the server mid-rollout, and a
//! release whose kernel never boots. After each, every device boots a good
//! slot, finishes on the expected version, and fetched no chunk twice.

use crate::common;

use common::*;
use rand::{Rng, SeedableRng};
use std::time::{Duration, Instant};
use uplift_fleet::{write_image, write_unbootable_image, Device, Proxy, ServerProcess};
use uplift_proto::channel::AgentState;
use uplift_proto::{ErrorKind, SlotName};

/// Bytes per second a throttled link carries, so a 2 MiB download takes
/// long enough to be interrupted in the middle.
const SLOW_LINK: u64 = 768 * 1024;

/// The agent's default number of requests in flight.
const PARALLEL_REQUESTS: u64 = 4;

/// A release that shares nothing with the factory image: every chunk must
/// cross the network, so progress is visible and interruptible.
async fn fresh_release(fx: &Fixture, version: &str) -> usize {
    fresh_release_sizes(fx, version).await.chunks.len()
}

async fn fresh_release_sizes(fx: &Fixture, version: &str) -> uplift_release::Manifest {
    let image = fx.path(&format!("images/fresh-{version}.img"));
    write_image(&image, IMAGE_SIZE, 1000 + version.len() as u64).unwrap();
    let dir = fx.release(version, DEVICE_TYPE, &image, &fx.key).await;
    uplift_release::build::ReleaseDir::open(&dir)
        .unwrap()
        .read_release()
        .unwrap()
        .1
}

/// Most bytes a device may receive for `manifest` when `cuts` times every
/// connection broke: the release once, plus per cut the chunk each request
/// had half received, plus a little for TLS and HTTP framing.
fn allowed_delivery(manifest: &uplift_release::Manifest, cuts: u64) -> u64 {
    let largest = manifest
        .chunks
        .iter()
        .map(|c| u64::from(c.stored_size))
        .max()
        .unwrap();
    manifest.stored_bytes() * 21 / 20 + cuts * PARALLEL_REQUESTS * largest + 256 * 1024
}

/// How many chunks the agent's resume journal records as durably written.
fn journaled_chunks(device: &Device) -> u64 {
    let text = std::fs::read_to_string(device.dir.join("state/install-progress.json")).unwrap();
    let progress: serde_json::Value = serde_json::from_str(&text).unwrap();
    progress["done"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r[1].as_u64().unwrap() - r[0].as_u64().unwrap())
        .sum()
}

async fn proxy_to(server: &ServerProcess) -> Proxy {
    let addr = server
        .endpoint
        .url
        .trim_start_matches("https://")
        .parse()
        .unwrap();
    Proxy::start(addr).await.unwrap()
}

fn assert_boots_a_complete_image(device: &Device, images: &[String]) {
    let boot = device
        .boot_state()
        .expect("the boot environment is always readable");
    let default = sha256_file(&device.slot_path(boot.default_slot));
    assert!(
        images.contains(&default),
        "default slot {} holds an image we shipped",
        boot.default_slot
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_resumes_after_the_agent_is_killed_and_fetches_no_chunk_twice() {
    let fx = Fixture::start();
    let proxy = proxy_to(&fx.server).await;
    let mut device = fx.device_via("killed", fx.spec("hw-killed"), &proxy.url());
    fx.wait_enrolled(&device).await;
    let chunks = fresh_release(&fx, "2.0").await;
    proxy.set_rate(SLOW_LINK);
    fx.rollout("2.0", None).await;

    fx.wait_device(&device, "a third of the download", |d| {
        d.progress.is_some_and(|p| p.done_bytes * 3 > p.total_bytes)
    })
    .await;
    assert!(device.kill_agent(), "the agent was running");
    let journaled = journaled_chunks(&device) as usize;
    assert!(
        journaled > 0 && journaled < chunks,
        "killed mid-download: {journaled} of {chunks} chunks journaled"
    );
    assert_eq!(device.boot_state().unwrap().default_slot, SlotName::A);

    let status = agent_status(&device);
    assert!(
        status.contains("interrupted:      download into slot b resumes after"),
        "{status}"
    );

    proxy.set_rate(0);
    device.start(&fx.bins).unwrap();
    fx.wait_device(&device, "the upgrade to finish", |d| {
        d.running_version == Some(v("2.0")) && d.state == Some(AgentState::Idle)
    })
    .await;
    // The restarted agent took the journaled chunks on trust rather than
    // finding them by re-reading slot b (which would also work while the
    // page cache holds them, but not after a power cut lost unsynced
    // writes), and fetched only the rest. Counted by the agent: the
    // server's count of chunks sent also holds chunks whose delivery a
    // loaded machine cut short and the agent fetched again unverified.
    let log = device.log();
    let field = |name: &str| {
        log.lines()
            .find(|l| l.contains("all chunks in slot b"))
            .and_then(|l| l.split(&format!(" {name}=")).nth(1))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse::<usize>().ok())
            .unwrap_or_else(|| panic!("no {name} in the log:\n{log}"))
    };
    let (resumed, fetched) = (field("trusted_from_journal"), field("fetched"));
    assert!(
        resumed >= journaled && fetched + resumed == chunks,
        "{journaled} of {chunks} chunks were journaled at the kill; the restarted agent trusted \
         {resumed} and fetched {fetched}: a verified chunk was fetched again\n{log}"
    );
    assert!(resumed > 0, "the journal was used on resume:\n{log}");
    assert_eq!(device.boot_state().unwrap().default_slot, SlotName::B);
    let status = agent_status(&device);
    assert!(
        status.contains("running version:  2.0") && !status.contains("interrupted"),
        "{status}"
    );
}

/// Waits until the device is back online on 1.0 after the bootloader fell
/// back from a trial of slot b, reported as `rolled_back`.
async fn assert_fell_back_to_1_0(fx: &Fixture, device: &Device, what: &str) {
    let view = fx
        .wait_device(device, what, |d| {
            d.state == Some(AgentState::RolledBack) && d.online
        })
        .await;
    assert_eq!(view.running_version, Some(v("1.0")));
    let error = view.last_error.unwrap();
    assert_eq!(error.kind, ErrorKind::RolledBack);
    assert!(error.message.contains("fell back to slot a"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_connections_mid_download_resume_without_refetching() {
    let fx = Fixture::start();
    let proxy = proxy_to(&fx.server).await;
    let device = fx.device_via("flaky", fx.spec("hw-flaky"), &proxy.url());
    fx.wait_enrolled(&device).await;
    let manifest = fresh_release_sizes(&fx, "2.0").await;
    proxy.set_rate(SLOW_LINK);
    fx.rollout("2.0", None).await;

    let mut cuts = 0;
    for third in 1..=2u64 {
        fx.wait_device(&device, "download progress", |d| {
            d.progress
                .is_some_and(|p| p.done_bytes * 3 > p.total_bytes * third)
        })
        .await;
        proxy.cut_all();
        cuts += 1;
    }
    fx.wait_device(&device, "the upgrade to finish", |d| {
        d.running_version == Some(v("2.0")) && d.state == Some(AgentState::Idle)
    })
    .await;
    let delivered = proxy.delivered();
    let allowed = allowed_delivery(&manifest, cuts);
    assert!(
        delivered <= allowed,
        "{delivered} bytes reached the device for a release of {} stored bytes after {cuts} cuts \
         (allowed {allowed}): finished chunks were fetched again",
        manifest.stored_bytes()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_killed_mid_rollout_restarts_and_every_device_finishes_once() {
    const DEVICES: usize = 8;
    let mut fx = Fixture::start();
    let proxy = proxy_to(&fx.server).await;
    let devices: Vec<Device> = (0..DEVICES)
        .map(|i| fx.device_via(&format!("d{i}"), fx.spec(&format!("hw-{i}")), &proxy.url()))
        .collect();
    let all: Vec<&Device> = devices.iter().collect();
    fx.wait_for("enrollment", &all, |views| {
        views.len() == DEVICES && views.iter().all(|d| d.online)
    })
    .await;
    let chunks = fresh_release(&fx, "2.0").await;
    proxy.set_rate(SLOW_LINK / 2);
    let rollout = fx.rollout("2.0", None).await;
    fx.wait_for("devices a quarter into their download", &all, |views| {
        views
            .iter()
            .filter(|d| {
                d.state == Some(AgentState::Downloading)
                    && d.progress.is_some_and(|p| p.done_bytes * 4 > p.total_bytes)
            })
            .count()
            >= DEVICES / 2
    })
    .await;

    // Chunks finished after this read are missed by it, which only makes
    // the count of repeated downloads below look worse, never better.
    let sent_before_kill = fx.client.stats().await.unwrap().chunks_sent as usize;
    // SIGKILL, not a clean stop: no chance to flush anything.
    let listen = fx
        .server
        .endpoint
        .url
        .trim_start_matches("https://")
        .to_owned();
    fx.server.kill();
    fx.server = ServerProcess::start_on(&fx.bins, &fx.path("server"), &listen)
        .expect("restart on the same address");
    fx.client = fx.server.client().unwrap();
    proxy.set_rate(0);

    let views = fx
        .wait_for("every device on 2.0", &all, |views| {
            views
                .iter()
                .all(|d| d.running_version == Some(v("2.0")) && d.state == Some(AgentState::Idle))
        })
        .await;
    assert_eq!(views.len(), DEVICES, "no device forgotten or duplicated");
    let sent_after_restart = fx.client.stats().await.unwrap().chunks_sent as usize;
    assert!(
        sent_before_kill > 0 && sent_after_restart < DEVICES * chunks,
        "the restart came mid-download: {sent_before_kill} chunks before, {sent_after_restart} after"
    );
    // Each of a device's parallel requests may lose the chunk it was on.
    let in_flight = PARALLEL_REQUESTS as usize;
    assert!(
        sent_before_kill + sent_after_restart <= DEVICES * (chunks + in_flight),
        "resumed, not restarted: {sent_before_kill} + {sent_after_restart} chunk downloads \
         for {DEVICES} devices x {chunks} chunks (at most the {in_flight} in flight are repeated)"
    );
    let status = fx.client.rollout(rollout).await.unwrap();
    assert_eq!(
        (status.counts.succeeded, status.status.as_str()),
        (DEVICES as u64, "finished")
    );
    for device in &devices {
        let boot = device.boot_state().unwrap();
        assert_eq!((boot.default_slot, boot.trial), (SlotName::B, None));
        assert_eq!(
            device.log().matches("committed slot=").count(),
            1,
            "upgraded exactly once:\n{}",
            device.log()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_whose_kernel_never_boots_falls_back_after_its_tries() {
    let fx = Fixture::start();
    let mut spec = fx.spec("hw-bricked");
    spec.trial_boot_attempts = 2;
    let device = fx.device("bricked", spec);
    fx.wait_enrolled(&device).await;
    let image = fx.path("images/unbootable.img");
    write_unbootable_image(&image, IMAGE_SIZE, 77).unwrap();
    fx.release("2.0", DEVICE_TYPE, &image, &fx.key).await;
    fx.rollout("2.0", None).await;

    assert_fell_back_to_1_0(&fx, &device, "the rollback").await;
    let log = device.log();
    for line in [
        "slot b (trial, 1 try left)",
        "slot b (trial, 0 tries left)",
        "slot a (fallback from b)",
    ] {
        assert!(log.contains(line), "missing {line:?} in:\n{log}");
    }
    assert_eq!(log.matches("kernel panic").count(), 2, "each try was spent");
    let boot = device.boot_state().unwrap();
    assert_eq!(
        (boot.default_slot, boot.trial, boot.fallback_from),
        (SlotName::A, None, None)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_killed_at_random_moments_never_leaves_an_unbootable_device() {
    let fx = Fixture::start();
    let proxy = proxy_to(&fx.server).await;
    let mut device = fx.device_via("chaos", fx.spec("hw-chaos"), &proxy.url());
    fx.wait_enrolled(&device).await;
    let new_image = fx.path("images/fresh-2.0.img");
    write_image(&new_image, IMAGE_SIZE, 4242).unwrap();
    fx.release("2.0", DEVICE_TYPE, &new_image, &fx.key).await;
    let shipped = [sha256_file(&fx.image_v1_0), sha256_file(&new_image)];
    proxy.set_rate(SLOW_LINK * 2);
    fx.rollout("2.0", None).await;

    let mut rng = rand::rngs::StdRng::seed_from_u64(2026);
    let mut kills = 0;
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(50..600))).await;
        if device.kill_agent() {
            kills += 1;
        }
        assert_boots_a_complete_image(&device, &shipped);
        device.start(&fx.bins).unwrap();
    }
    assert!(kills >= 4, "the agent was killed {kills} times");
    proxy.set_rate(0);
    let deadline = Instant::now() + WAIT;
    loop {
        let views = fx.client.devices().await.unwrap();
        if views[0].running_version == Some(v("2.0")) && views[0].state == Some(AgentState::Idle) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never finished after {kills} kills:\n{}",
            device.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_boots_a_complete_image(&device, &shipped);
    assert_eq!(device.boot_state().unwrap().default_slot, SlotName::B);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_missing_on_the_server_fails_visibly_after_a_bounded_number_of_attempts() {
    let fx = Fixture::start();
    let device = fx.device("starved", fx.spec("hw-starved"));
    fx.wait_enrolled(&device).await;
    let image = fx.path("images/fresh-2.0.img");
    write_image(&image, IMAGE_SIZE, 515).unwrap();
    let dir = fx.release("2.0", DEVICE_TYPE, &image, &fx.key).await;
    let manifest = uplift_release::build::ReleaseDir::open(&dir)
        .unwrap()
        .read_release()
        .unwrap()
        .1;
    let lost = manifest.chunks[5].hash.to_hex();
    std::fs::remove_file(
        fx.server
            .dir
            .join("chunks")
            .join(&lost[..2])
            .join(format!("{lost}.zst")),
    )
    .unwrap();
    let env_before = std::fs::read(device.bootenv_path()).unwrap();
    fx.rollout("2.0", None).await;

    let view = fx
        .wait_device(&device, "the agent to give up", |d| {
            d.last_error
                .as_ref()
                .is_some_and(|e| e.message.contains("gave up"))
        })
        .await;
    let error = view.last_error.unwrap();
    assert_eq!(
        (view.state, error.kind),
        (Some(AgentState::Failed), ErrorKind::DownloadFailed)
    );
    assert!(
        error.message.contains(&lost) && error.message.contains("404"),
        "{error}"
    );
    assert_eq!(
        device.log().matches("retrying the install").count(),
        2,
        "{}",
        device.log()
    );
    assert_eq!(
        std::fs::read(device.bootenv_path()).unwrap(),
        env_before,
        "boot choice untouched"
    );
    // bytes_sent counts the manifest too, which every new attempt fetches
    // first, so it shows a retry even when every chunk is already in slot b.
    let sent = fx.client.stats().await.unwrap().bytes_sent;
    let attempts = device.log().matches("installing").count();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        (
            fx.client.stats().await.unwrap().bytes_sent,
            device.log().matches("installing").count()
        ),
        (sent, attempts),
        "no more downloads or attempts once it gave up"
    );
    let status = agent_status(&device);
    assert!(
        status.contains("last failure:     2.0 (download_failed): gave up on 2.0")
            && status.contains(&lost),
        "the device itself says why, without the server:\n{status}"
    );
}

/// A tmpfs of a fixed size, unmounted on drop.
struct TinyFs(std::path::PathBuf);

impl TinyFs {
    fn mount(at: &std::path::Path, size: &str) -> Option<TinyFs> {
        std::fs::create_dir_all(at).unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status();
        match status {
            Ok(s) if s.success() => Some(TinyFs(at.to_owned())),
            // CI runs as root and installs what it needs: a skip there
            // would hide a missing fault test, so it is a failure.
            _ if std::env::var_os("CI").is_some() => {
                panic!(
                    "CI is set but a tmpfs cannot be mounted at {}",
                    at.display()
                )
            }
            _ => None,
        }
    }
}

impl Drop for TinyFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_on_the_device_fails_the_install_cleanly() {
    let fx = Fixture::start();
    let Some(_tiny) = TinyFs::mount(&fx.path("tiny"), "512k") else {
        println!("NOTICE: cannot mount a tmpfs here (needs root); full-disk test skipped");
        return;
    };
    let spec = fx.spec("hw-full");
    let mut device = uplift_fleet::Device::provision(
        &fx.path("devices/full"),
        &spec,
        &fx.server.endpoint,
        &fx.image_v1_0,
    )
    .unwrap();
    // Slot B lives on a filesystem far smaller than the image.
    let slot_b = device.slot_path(SlotName::B);
    std::fs::remove_file(&slot_b).unwrap();
    std::os::unix::fs::symlink(fx.path("tiny/slot-b.img"), &slot_b).unwrap();
    device.start(&fx.bins).unwrap();
    fx.wait_enrolled(&device).await;
    let env_before = std::fs::read(device.bootenv_path()).unwrap();
    let image = fx.path("images/fresh-2.0.img");
    write_image(&image, IMAGE_SIZE, 616).unwrap();
    fx.release("2.0", DEVICE_TYPE, &image, &fx.key).await;
    fx.rollout("2.0", None).await;

    let view = fx
        .wait_device(&device, "the failure", |d| {
            d.state == Some(AgentState::Failed)
        })
        .await;
    let error = view.last_error.unwrap();
    assert_eq!(error.kind, ErrorKind::SlotIo);
    assert!(
        error.message.contains("No space left on device") && error.message.contains("slot b"),
        "{error}"
    );
    assert_eq!(view.running_version, Some(v("1.0")));
    assert!(view.online, "the agent keeps running and reporting");
    assert_eq!(
        std::fs::read(device.bootenv_path()).unwrap(),
        env_before,
        "boot choice untouched"
    );
    assert_eq!(
        sha256_file(&device.slot_path(SlotName::A)),
        sha256_file(&fx.image_v1_0),
        "running slot intact"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_on_the_server_refuses_the_upload_clearly_and_keeps_serving() {
    let fx = Fixture::start();
    let device = fx.device("bystander", fx.spec("hw-bystander"));
    fx.wait_enrolled(&device).await;
    let Some(tiny) = TinyFs::mount(&fx.server.dir.join("chunks"), "256k") else {
        println!("NOTICE: cannot mount a tmpfs here (needs root); server full-disk test skipped");
        return;
    };
    let image = fx.path("images/big.img");
    write_image(&image, IMAGE_SIZE, 717).unwrap();
    let dir = fx.path("releases/big");
    let options =
        uplift_release::build::ReleaseOptions::new(v("2.0"), DEVICE_TYPE.parse().unwrap());
    uplift_release::build::create_release(&image, &dir, &options, &fx.key).unwrap();
    let err = match fx.client.upload_release(&dir, |_| {}).await {
        Ok(_) => panic!("upload succeeded on a full disk"),
        Err(e) => e,
    };
    let text = format!("{err:#}");
    assert!(text.contains("No space left on device"), "{text}");
    assert!(
        fx.client.releases().await.unwrap().is_empty(),
        "no half-uploaded release is offered"
    );
    let views = fx.client.devices().await.unwrap();
    assert!(views[0].online, "devices stay connected");
    assert!(
        fx.server.log_tail(50).contains("No space left"),
        "the operator sees why in the log"
    );

    // Space freed: the same upload now succeeds; nothing damaged was left behind.
    drop(tiny);
    fx.client
        .upload_release(&dir, |_| {})
        .await
        .expect("upload after freeing space");
    assert_eq!(fx.client.releases().await.unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_network_outage_mid_download_the_agent_carries_on_by_itself() {
    let fx = Fixture::start();
    let proxy = proxy_to(&fx.server).await;
    let mut spec = fx.spec("hw-outage");
    // Downloads wait 1 s (not 120) for the channel, so this outage outlasts
    // the whole retry budget.
    spec.extra_config = "[download]\noffline_wait_secs = 1\n".into();
    let device = fx.device_via("outage", spec, &proxy.url());
    fx.wait_enrolled(&device).await;
    let manifest = fresh_release_sizes(&fx, "2.0").await;
    proxy.set_rate(SLOW_LINK);
    fx.rollout("2.0", None).await;
    fx.wait_device(&device, "a third of the download", |d| {
        d.progress.is_some_and(|p| p.done_bytes * 3 > p.total_bytes)
    })
    .await;

    proxy.set_down(true);
    fx.wait_device(&device, "the server to see the device go", |d| !d.online)
        .await;
    // Offline, the device itself says it gave up for want of a connection.
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let status = agent_status(&device);
        if status.contains("(server_unreachable): gave up on 2.0 after 3 failed attempts") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the budget was never spent during the outage:\n{status}\n{}",
            device.log()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    proxy.set_rate(0);
    proxy.set_down(false);

    fx.wait_device(&device, "the upgrade to finish", |d| {
        d.running_version == Some(v("2.0")) && d.state == Some(AgentState::Idle) && d.online
    })
    .await;
    let delivered = proxy.delivered();
    let allowed = allowed_delivery(&manifest, 1);
    assert!(
        delivered <= allowed,
        "{delivered} bytes reached the device for a release of {} stored bytes after one outage \
         (allowed {allowed}): finished chunks were fetched again",
        manifest.stored_bytes()
    );
    assert_eq!(
        device.log().matches("agent started").count(),
        2,
        "no restart but the upgrade's reboot:\n{}",
        device.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_cache_that_is_down_is_passed_by_and_the_device_downloads_from_the_server() {
    let fx = Fixture::start();
    // The site's cache: configured, but nothing listens there.
    let cache_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut spec = fx.spec("hw-cache-down");
    spec.extra_config = format!("[download]\nurl = \"https://127.0.0.1:{cache_port}\"\n");
    let device = fx.device("cache-down", spec);
    fx.wait_enrolled(&device).await;
    fresh_release(&fx, "2.0").await;
    fx.rollout("2.0", None).await;
    fx.wait_device(&device, "the upgrade to finish from the server", |d| {
        d.running_version == Some(v("2.0")) && d.state == Some(AgentState::Idle)
    })
    .await;
    let log = device.log();
    assert!(
        log.contains("the site cache failed") && log.contains("downloading from the server"),
        "the agent says why it went around the cache:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_os_that_hangs_before_committing_is_reset_by_the_watchdog_and_falls_back() {
    let fx = Fixture::start();
    let mut spec = fx.spec("hw-hangs");
    spec.trial_boot_attempts = 2;
    // The new OS comes up but never becomes healthy: its health check
    // hangs far past the watchdog (and within its own 120 s timeout).
    spec.health_check = vec!["sleep".into(), "600".into()];
    spec.watchdog = Some(Duration::from_secs(2));
    let device = fx.device("hangs", spec);
    fx.wait_enrolled(&device).await;
    fx.release("1.1", DEVICE_TYPE, &fx.image_v1_1, &fx.key)
        .await;
    fx.rollout("1.1", None).await;

    assert_fell_back_to_1_0(&fx, &device, "the watchdog's fallback").await;
    let log = device.log();
    assert_eq!(
        log.matches("watchdog: slot b did not commit within 2.0 s")
            .count(),
        2,
        "each trial boot was reset by the watchdog:\n{log}"
    );
    assert!(log.contains("slot a (fallback from b)"), "{log}");
    let boot = device.boot_state().unwrap();
    assert_eq!(
        (boot.default_slot, boot.trial, boot.fallback_from),
        (SlotName::A, None, None)
    );
    assert_eq!(
        sha256_file(&device.slot_path(SlotName::A)),
        sha256_file(&fx.image_v1_0),
        "the old OS is intact"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_trickles_data_is_given_up_on_and_the_install_recovers() {
    let fx = Fixture::start();
    let proxy = proxy_to(&fx.server).await;
    let mut spec = fx.spec("hw-trickle");
    // Tight bounds so the test is quick: a 64 KiB chunk must arrive within
    // about 2.25 s.
    spec.extra_config = "[download]\nstall_timeout_secs = 2\nmin_bytes_per_sec = 262144\n".into();
    let device = fx.device_via("trickle", spec, &proxy.url());
    fx.wait_enrolled(&device).await;
    fresh_release(&fx, "2.0").await;
    let env_before = std::fs::read(device.bootenv_path()).unwrap();
    // Slow retrieval: bytes keep coming, never fast enough to finish.
    proxy.set_rate(8 * 1024);
    fx.rollout("2.0", None).await;

    let view = fx
        .wait_device(&device, "the slow download to be refused", |d| {
            d.state == Some(AgentState::Failed)
        })
        .await;
    let error = view.last_error.unwrap();
    assert_eq!(error.kind, ErrorKind::DownloadFailed);
    assert!(
        error.message.contains("slower than the 262144 bytes/s")
            && error.message.contains("retrying"),
        "{error}"
    );
    assert_eq!(
        std::fs::read(device.bootenv_path()).unwrap(),
        env_before,
        "boot choice untouched"
    );

    // The link recovers: the retry finishes the install.
    proxy.set_rate(0);
    fx.wait_device(&device, "the upgrade", |d| {
        d.running_version == Some(v("2.0")) && d.state == Some(AgentState::Idle)
    })
    .await;
    assert_eq!(device.boot_state().unwrap().default_slot, SlotName::B);
}
