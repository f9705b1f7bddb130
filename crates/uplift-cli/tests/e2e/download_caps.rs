//! Download caps, end to end with real processes: a rollout's per-device
//! rate cap and its limit on devices downloading at once, a device's own
//! cap from its config, and the server's total egress cap. Each rate is
//! measured from what the agents log (bytes fetched, and the time from
//! "installing" to "all chunks in slot"), not from the server's own books.

use crate::common;

use common::*;
use std::num::{NonZeroU32, NonZeroU64};
use std::path::Path;
use std::time::{Duration, Instant};
use uplift_fleet::{write_image, Device, ServerLaunch, ServerProcess};
use uplift_proto::api::DownloadLimits;

const KIB: u64 = 1024;

/// One install as the agent's log tells it.
#[derive(Debug, Clone, Copy)]
struct Install {
    start: f64,
    end: f64,
    fetched_bytes: u64,
}

impl Install {
    fn rate(&self) -> f64 {
        self.fetched_bytes as f64 / (self.end - self.start)
    }
}

fn log_seconds(line: &str) -> f64 {
    let stamp = line.split_whitespace().next().expect("timestamped line");
    let at = time::OffsetDateTime::parse(stamp, &time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|e| panic!("log timestamp {stamp:?}: {e}"));
    at.unix_timestamp_nanos() as f64 / 1e9
}

fn install_of(device: &Device) -> Install {
    let log = device.log();
    let start = log
        .lines()
        .find(|l| l.contains(" installing"))
        .map(log_seconds)
        .unwrap_or_else(|| panic!("no install started:\n{log}"));
    let done = log
        .lines()
        .find(|l| l.contains("all chunks in slot"))
        .unwrap_or_else(|| panic!("no install finished:\n{log}"));
    let fetched_bytes = done
        .split_whitespace()
        .find_map(|field| field.strip_prefix("fetched_bytes="))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no fetched_bytes in {done:?}"));
    Install {
        start,
        end: log_seconds(done),
        fetched_bytes,
    }
}

/// A release of a new random image, so every device fetches all of it.
async fn unrelated_release(fx: &Fixture, version: &str, seed: u64) {
    let image = fx.path(&format!("images/unrelated-{version}.img"));
    write_image(&image, IMAGE_SIZE, seed).unwrap();
    fx.release(version, DEVICE_TYPE, &image, &fx.key).await;
}

fn within_ten_percent(what: &str, measured: f64, cap: u64) {
    let ratio = measured / cap as f64;
    eprintln!("{what}: {measured:.0} bytes/s, cap {cap} ({ratio:.3}x)");
    assert!(
        (0.9..=1.1).contains(&ratio),
        "{what}: {measured:.0} bytes/s against a cap of {cap} ({ratio:.3}x)"
    );
}

/// The most installs in progress at any moment.
fn most_at_once(installs: &[Install]) -> usize {
    installs
        .iter()
        .map(|a| {
            installs
                .iter()
                .filter(|b| b.start <= a.start && a.start < b.end)
                .count()
        })
        .max()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollouts_rate_cap_and_download_turns_hold_and_a_devices_own_lower_cap_wins() {
    let fx = Fixture::start();
    let rollout_cap = 512 * KIB;
    let own_cap = 256 * KIB;
    let mut devices: Vec<Device> = (0..3)
        .map(|n| fx.device(&format!("turn-{n}"), fx.spec(&format!("hw-turn-{n}"))))
        .collect();
    let mut slow = fx.spec("hw-own-cap");
    slow.extra_config = format!("[download]\nmax_bytes_per_sec = {own_cap}\n");
    devices.push(fx.device("own-cap", slow));
    for device in &devices {
        fx.wait_enrolled(device).await;
    }
    unrelated_release(&fx, "2.0", 2000).await;
    let limits = DownloadLimits {
        max_bytes_per_sec: NonZeroU64::new(rollout_cap),
        max_downloading: NonZeroU32::new(2),
    };
    let id = fx.rollout_limited("2.0", None, limits).await;

    // What an operator sees: two devices downloading, two waiting their turn.
    let deadline = Instant::now() + WAIT;
    loop {
        let view = fx.client.rollout(id).await.unwrap();
        assert_eq!(view.limits, limits);
        if view.waiting_for_turn == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "never two waiting: {view:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let refs: Vec<&Device> = devices.iter().collect();
    fx.wait_for("every device on 2.0", &refs, |views| {
        views.iter().all(|d| d.running_version == Some(v("2.0")))
    })
    .await;
    let view = fx.client.rollout(id).await.unwrap();
    assert_eq!(view.waiting_for_turn, 0);
    assert_eq!(view.counts.succeeded, 4, "{view:?}");

    let installs: Vec<Install> = devices.iter().map(install_of).collect();
    assert!(
        installs.iter().all(|i| i.fetched_bytes >= IMAGE_SIZE / 2),
        "each device fetched the image: {installs:?}"
    );
    assert_eq!(
        most_at_once(&installs),
        2,
        "at most two at once: {installs:?}"
    );
    for (n, install) in installs[..3].iter().enumerate() {
        within_ten_percent(
            &format!("device {n} under the rollout's cap"),
            install.rate(),
            rollout_cap,
        );
    }
    within_ten_percent(
        "the device with its own lower cap",
        installs[3].rate(),
        own_cap,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_servers_egress_cap_holds_for_all_devices_together() {
    let egress = 1024 * KIB;
    let mut fx = Fixture::start();
    let dir = fx.path("server-capped");
    let server = tokio::task::spawn_blocking({
        let bins = fx.bins.clone();
        move || {
            ServerProcess::launch(
                &bins,
                Path::new(&dir),
                &ServerLaunch {
                    config_toml: Some(format!("[limits]\nmax_egress_bytes_per_sec = {egress}\n")),
                    ..ServerLaunch::on("127.0.0.1:0")
                },
            )
        }
    })
    .await
    .unwrap()
    .expect("capped server starts");
    fx.client = server.client().unwrap();
    fx.server = server;
    let devices: Vec<Device> = (0..3)
        .map(|n| fx.device(&format!("egress-{n}"), fx.spec(&format!("hw-egress-{n}"))))
        .collect();
    for device in &devices {
        fx.wait_enrolled(device).await;
    }
    unrelated_release(&fx, "2.0", 3000).await;
    fx.rollout("2.0", None).await;
    let refs: Vec<&Device> = devices.iter().collect();
    fx.wait_for("every device on 2.0", &refs, |views| {
        views.iter().all(|d| d.running_version == Some(v("2.0")))
    })
    .await;
    let installs: Vec<Install> = devices.iter().map(install_of).collect();
    let start = installs.iter().map(|i| i.start).fold(f64::MAX, f64::min);
    let end = installs.iter().map(|i| i.end).fold(f64::MIN, f64::max);
    let fetched: u64 = installs.iter().map(|i| i.fetched_bytes).sum();
    assert!(fetched >= 3 * IMAGE_SIZE / 2, "{installs:?}");
    within_ten_percent(
        "all devices together",
        fetched as f64 / (end - start),
        egress,
    );
}
