//! The fleet at scale, with the server killed under it: 200 devices (or
//! `UPLIFT_SCALE_DEVICES`) take a rollout; while their downloads are in
//! flight the server is SIGKILLed and restarted on the same address and
//! data. Afterwards the rollout must finish, every device must have
//! installed and committed the release exactly once, and the server's
//! device list must agree with each device's own boot environment.

use crate::common;

use common::*;
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};
use uplift_fleet::{stop_all, write_image, Device, Proxy, ServerProcess};
use uplift_proto::api::{DevicePage, DeviceView, RolloutStatus, RolloutView};
use uplift_proto::channel::AgentState;
use uplift_proto::SlotName;
use uplift_release::build::ReleaseDir;

const DEFAULT_DEVICES: usize = 200;
/// The new release's image: small, so 200 downloads stay within seconds.
const RELEASE_SIZE: u64 = 1024 * 1024;
/// Per connection, towards the device, until the server is killed: a 1 MiB
/// download then takes at least 8 s, so many are in flight at the kill.
const THROTTLE: u64 = 128 * 1024;
/// Bound for the fleet to come up, and for the rollout to finish after the
/// restart (a healthy run on two cores needs a fraction of it).
const FLEET_WAIT: Duration = Duration::from_secs(240);
/// Once every device has committed the release itself, the server's view
/// must catch up within this; a view still behind after it stays behind.
const VIEW_LAG: Duration = Duration::from_secs(30);
/// One admin poll may fail or be slow under load; it counts as failed then.
const POLL_TIMEOUT: Duration = Duration::from_secs(10);

fn device_count() -> usize {
    std::env::var("UPLIFT_SCALE_DEVICES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_DEVICES)
}

/// One poll of the server; `None` (and the error kept) if it failed or
/// took too long, which a server under this load may do now and then.
async fn poll<T>(
    last_error: &mut String,
    request: impl std::future::Future<Output = anyhow::Result<T>>,
) -> Option<T> {
    match tokio::time::timeout(POLL_TIMEOUT, request).await {
        Ok(Ok(answer)) => Some(answer),
        Ok(Err(e)) => {
            *last_error = format!("{e:#}");
            None
        }
        Err(_) => {
            *last_error = format!("no answer within {POLL_TIMEOUT:?}");
            None
        }
    }
}

/// How many devices the server sees in each state, e.g. `{"idle": 130, "downloading": 70}`.
fn states(views: &[DeviceView]) -> BTreeMap<String, usize> {
    let mut by_state = BTreeMap::new();
    for v in views {
        let state = v.state.map_or("none", |s| s.as_str());
        let key = format!("{state}{}", if v.online { "" } else { " (offline)" });
        *by_state.entry(key).or_insert(0) += 1;
    }
    by_state
}

/// What a device itself says, from its own files: committed on slot b, and
/// how often its log shows the install of 1.1, a trial boot of slot b and
/// the commit.
#[derive(Debug)]
struct Local {
    id: String,
    committed_b: bool,
    installs: usize,
    trial_boots: usize,
    commits: usize,
}

fn local_truth(devices: &[Device]) -> Vec<Local> {
    devices
        .iter()
        .map(|d| {
            let log = d.log();
            let boot = d.boot_state().ok();
            Local {
                id: d.device_id().unwrap_or_default(),
                committed_b: boot
                    .is_some_and(|b| b.default_slot == SlotName::B && b.trial.is_none()),
                installs: log
                    .lines()
                    .filter(|l| l.contains("all chunks in slot b,") && l.contains(" version=1.1 "))
                    .count(),
                trial_boots: log
                    .lines()
                    .filter(|l| l.contains("boot-sim: boot #") && l.contains(": slot b (trial"))
                    .count(),
                commits: log.matches("committed slot=b version=1.1").count(),
            }
        })
        .collect()
}

/// Reads every device's own files on a blocking thread (200 logs and boot
/// environments), handing the devices back.
async fn read_local(devices: Vec<Device>) -> (Vec<Device>, Vec<Local>) {
    tokio::task::spawn_blocking(move || {
        let local = local_truth(&devices);
        (devices, local)
    })
    .await
    .unwrap()
}

/// `uplift devices list --all --json`, the operator's view, run as the operator runs it.
async fn devices_list_json(server: &ServerProcess) -> Vec<DeviceView> {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_uplift"))
        .args([
            "devices",
            "list",
            "--all",
            "--json",
            "--server",
            &server.endpoint.url,
        ])
        .arg("--ca")
        .arg(&server.endpoint.ca_file)
        .arg("--token-file")
        .arg(server.dir.join("admin-token"))
        .output()
        .await
        .expect("run uplift devices list");
    assert!(
        output.status.success(),
        "uplift devices list failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let page: DevicePage =
        serde_json::from_slice(&output.stdout).expect("devices list --json is a page of devices");
    assert_eq!(page.next, None, "--all is every page");
    page.devices
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_fleet_survives_a_server_kill_mid_download_and_the_view_stays_true() {
    let count = device_count();
    let mut fx = tokio::task::spawn_blocking(Fixture::start).await.unwrap();
    let listen = fx.server.listen_addr().to_owned();
    let proxy = Proxy::start(listen.parse().unwrap()).await.unwrap();
    let specs = (0..count)
        .map(|i| (format!("{i:04}"), fx.spec(&format!("hw-{i:04}"))))
        .collect();
    let mut devices = fx.power_on(specs, &proxy.url()).await;

    let mut last_error = String::new();
    let deadline = Instant::now() + FLEET_WAIT;
    loop {
        if let Some(views) = poll(&mut last_error, fx.client.devices()).await {
            let ready = views
                .iter()
                .filter(|d| d.online && d.state == Some(AgentState::Idle))
                .count();
            if views.len() == count && ready == count {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "only {ready} of {count} devices enrolled and idle within {FLEET_WAIT:?}: {:?}\nserver log:\n{}",
                states(&views),
                fx.server.log_tail(30)
            );
        } else {
            assert!(
                Instant::now() < deadline,
                "the server stopped answering: {last_error}"
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // A release that shares nothing with the factory image: every device
    // downloads all of it, so the kill finds downloads under way.
    let image = fx.path("images/os-1.1-fresh.img");
    let release_image = image.clone();
    tokio::task::spawn_blocking(move || write_image(&release_image, RELEASE_SIZE, 4242))
        .await
        .unwrap()
        .unwrap();
    let release = fx.release("1.1", DEVICE_TYPE, &image, &fx.key).await;
    let chunks = ReleaseDir::open(&release)
        .unwrap()
        .read_release()
        .unwrap()
        .1
        .chunks
        .len();
    let release_sha = sha256_file(&image);

    proxy.set_rate(THROTTLE);
    let rollout = fx.rollout("1.1", None).await;
    let deadline = Instant::now() + FLEET_WAIT;
    loop {
        if let Some(views) = poll(&mut last_error, fx.client.devices()).await {
            let downloading = views
                .iter()
                .filter(|d| {
                    d.state == Some(AgentState::Downloading)
                        && d.progress.is_some_and(|p| p.done_bytes > 0)
                })
                .count();
            if downloading >= count / 4 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "downloads never got under way: {:?}",
                states(&views)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Chunks sent after this read are missed by it, which only makes the
    // check below that the kill came mid-download harder to pass.
    let sent_before_kill = fx.client.stats().await.unwrap().chunks_sent as usize;
    // SIGKILL, not a clean stop: no chance to flush anything.
    fx.server.kill();
    fx.server = ServerProcess::start_on_async(&fx.bins, &fx.path("server"), &listen)
        .await
        .expect("restart on the same address and data");
    fx.client = fx.server.client().unwrap();
    proxy.set_rate(0);
    let killed_at = Instant::now();
    assert!(
        sent_before_kill > 0 && sent_before_kill < count * chunks,
        "the kill came mid-download: {sent_before_kill} of {} chunk downloads done",
        count * chunks
    );

    // The rollout must finish, and once every device has committed by its
    // own account, the server must say so too within VIEW_LAG.
    let deadline = Instant::now() + FLEET_WAIT;
    let mut all_committed_since: Option<Instant> = None;
    let mut last_view: Option<RolloutView> = None;
    let mut server_views: Vec<DeviceView> = Vec::new();
    let status = loop {
        if let Some(view) = poll(&mut last_error, fx.client.rollout(rollout)).await {
            let finished = view.status != RolloutStatus::Running;
            last_view = Some(view.clone());
            if finished {
                break view;
            }
        }
        if let Some(views) = poll(&mut last_error, fx.client.devices()).await {
            server_views = views;
        }
        let (back, local) = read_local(devices).await;
        devices = back;
        if local.iter().all(|l| l.committed_b) {
            all_committed_since.get_or_insert_with(Instant::now);
        }
        let stale_for = all_committed_since.map(|t| t.elapsed());
        if stale_for.is_some_and(|t| t > VIEW_LAG) || Instant::now() > deadline {
            let committed = local.iter().filter(|l| l.committed_b).count();
            let mut wrong: Vec<String> = Vec::new();
            let by_id: HashMap<&str, &DeviceView> =
                server_views.iter().map(|v| (v.id.as_str(), v)).collect();
            for l in local.iter().filter(|l| l.committed_b) {
                let v = by_id.get(l.id.as_str());
                if !v.is_some_and(|v| {
                    v.state == Some(AgentState::Idle)
                        && v.running_version.as_ref() == Some(&v_1_1())
                }) {
                    wrong.push(format!(
                        "{}: server says {:?} on {:?}",
                        l.id,
                        v.and_then(|v| v.state).map(|s| s.as_str()),
                        v.and_then(|v| v.running_version.as_ref())
                            .map(ToString::to_string)
                    ));
                }
            }
            let mut once: BTreeMap<(usize, usize, usize), usize> = BTreeMap::new();
            for l in &local {
                *once
                    .entry((l.installs, l.trial_boots, l.commits))
                    .or_insert(0) += 1;
            }
            panic!(
                "rollout {rollout} did not finish {:.0} s after the server restart: {:?}\n\
                 {committed} of {count} devices committed 1.1 on slot b by their own boot environment \
                 (all of them for {:?}), but the server's view disagrees for {} of them; server states: {:?}\n\
                 devices by (installs, trial boots of b, commits) in their logs: {once:?}\n\
                 first disagreements:\n  {}\nlast poll error: {last_error}\nserver log:\n{}",
                killed_at.elapsed().as_secs_f64(),
                last_view.as_ref().map(|v| (v.status, v.counts)),
                stale_for,
                wrong.len(),
                states(&server_views),
                wrong.iter().take(10).cloned().collect::<Vec<_>>().join("\n  "),
                fx.server.log_tail(20)
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(
        (status.status, status.counts.succeeded, status.counts.failed),
        (RolloutStatus::Finished, count as u64, 0),
        "{status:?}"
    );
    let took = killed_at.elapsed();

    // Each device, by its own files: slot b committed, holding exactly the
    // release, installed once, trial-booted once, committed once.
    let (back, local) = read_local(devices).await;
    devices = back;
    let slot_b_sums = {
        let paths: Vec<_> = devices.iter().map(|d| d.slot_path(SlotName::B)).collect();
        tokio::task::spawn_blocking(move || {
            paths.iter().map(|p| sha256_file(p)).collect::<Vec<_>>()
        })
        .await
        .unwrap()
    };
    for ((device, l), sum) in devices.iter().zip(&local).zip(&slot_b_sums) {
        assert!(
            l.committed_b && *sum == release_sha,
            "{} committed slot b with the release: {l:?}\n{}",
            device.dir.display(),
            device.log()
        );
        assert_eq!(
            (l.installs, l.trial_boots, l.commits),
            (1, 1, 1),
            "{} upgraded exactly once (installs, trial boots of b, commits):\n{}",
            device.dir.display(),
            device.log()
        );
    }

    // The operator's view agrees with every device.
    let views = devices_list_json(&fx.server).await;
    assert_eq!(views.len(), count, "no device forgotten or duplicated");
    let by_id: HashMap<&str, &DeviceView> = views.iter().map(|v| (v.id.as_str(), v)).collect();
    for l in &local {
        let view = by_id
            .get(l.id.as_str())
            .unwrap_or_else(|| panic!("device {} is missing from devices list", l.id));
        assert!(
            view.online
                && view.state == Some(AgentState::Idle)
                && view.running_version.as_ref() == Some(&v_1_1())
                && view.last_error.is_none(),
            "the server's view of {} matches the device (slot b committed with 1.1): {view:?}",
            l.id
        );
    }
    println!(
        "{count} devices: rollout finished {:.1} s after the server restart",
        took.as_secs_f64()
    );

    let started = Instant::now();
    tokio::task::spawn_blocking(move || stop_all(&mut devices, Duration::from_secs(10)))
        .await
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{count} devices stopped together, not one by one: {:?}",
        started.elapsed()
    );
}

fn v_1_1() -> uplift_proto::Version {
    v("1.1")
}
