//! Two `uplift-server` replicas on one PostgreSQL database, their chunks in
//! one S3 bucket, behind HAProxy (TCP, TLS passed through): the set-up of
//! "Running at scale". Real processes throughout. Devices connect through
//! the balancer and land on either replica; a rollout started on one
//! replica reaches the devices connected to the other at once (PostgreSQL
//! NOTIFY), each replica shows every device online and its event stream
//! shows every device's events; then the replica that holds the scheduler's lease is killed
//! with SIGKILL mid-rollout, its devices reconnect through the balancer to
//! the survivor and finish: every device upgraded exactly once, the
//! rollout finished, nothing lost.

use crate::common;

use common::*;
use std::num::NonZeroU64;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use uplift_client::AdminClient;
use uplift_fleet::ServerLaunch;
use uplift_proto::api::{DeviceView, DownloadLimits};
use uplift_proto::channel::AgentState;
use uplift_proto::events::{EventAbout, EventStreamQuery, FleetEvent};
use uplift_proto::DeviceId;
use uplift_proto::SlotName;
use uplift_s3_test_server::S3Server;
use uplift_sim::postgres::TestPostgres;

const DEVICES: usize = 6;

/// HAProxy in TCP mode in front of the replicas' device listeners.
struct Balancer {
    child: Child,
    addr: String,
}

impl Balancer {
    fn start(dir: &Path, backends: &[&str]) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let servers: String = backends
            .iter()
            .enumerate()
            .map(|(i, b)| format!("  server r{i} {b} check inter 300ms fall 2 rise 2\n"))
            .collect();
        // Round robin spreads the devices; a refused connection (a killed
        // replica not yet marked down) is retried on another one.
        let config = format!(
            "global\n  maxconn 2000\n\
             defaults\n  mode tcp\n  timeout connect 2s\n  timeout client 1h\n  timeout server 1h\n  retries 3\n  option redispatch\n\
             frontend devices\n  bind {addr}\n  default_backend replicas\n\
             backend replicas\n  balance roundrobin\n{servers}"
        );
        let path = dir.join("haproxy.cfg");
        std::fs::write(&path, config).unwrap();
        let log = std::fs::File::create(dir.join("haproxy.log")).unwrap();
        let child = Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("haproxy starts (apt-get install haproxy)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(&addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "haproxy did not listen on {addr}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Self { child, addr }
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The devices a replica holds a channel with now (its own sessions: the
/// server's stats are per process).
async fn sessions_on(client: &AdminClient) -> usize {
    client
        .stats()
        .await
        .map(|stats| stats.devices_online as usize)
        .unwrap_or(0)
}

/// The devices a replica shows online: those of every replica.
async fn online_on(client: &AdminClient) -> usize {
    client
        .devices()
        .await
        .map(|views| views.iter().filter(|d| d.online).count())
        .unwrap_or(0)
}

/// Opens a replica's event stream and follows it in the background: the
/// devices each kind of device event (`download_started`, ...) was seen
/// for. Returns once the server has opened the stream, so the events that
/// follow are relayed to it.
async fn follow_device_events(
    client: &AdminClient,
) -> std::sync::Arc<std::sync::Mutex<Vec<(String, DeviceId)>>> {
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let into = seen.clone();
    let mut response = client
        .event_stream(&EventStreamQuery::default(), None)
        .await
        .expect("the event stream opens");
    tokio::spawn(async move {
        let mut text = String::new();
        while let Ok(Some(bytes)) = response.chunk().await {
            text.push_str(&String::from_utf8_lossy(&bytes));
            while let Some(end) = text.find('\n') {
                let line: String = text.drain(..=end).collect();
                let Some(data) = line.trim_end().strip_prefix("data:") else {
                    continue;
                };
                if let Ok(FleetEvent {
                    about: EventAbout::Device { device_id, event },
                    ..
                }) = serde_json::from_str(data.trim())
                {
                    into.lock()
                        .unwrap()
                        .push((event.name().to_owned(), device_id));
                }
            }
        }
    });
    seen
}

async fn wait_views(
    client: &AdminClient,
    what: &str,
    done: impl Fn(&[DeviceView]) -> bool,
) -> Vec<DeviceView> {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Ok(views) = client.devices().await {
            if done(&views) {
                return views;
            }
            assert!(Instant::now() < deadline, "{what}: {views:#?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_behind_a_balancer_share_a_rollout_and_survive_one_killed() {
    if which("haproxy").is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "haproxy is missing (apt-get install haproxy)"
        );
        eprintln!("skipped: haproxy is not installed");
        return;
    }
    let Some(pg) = TestPostgres::start() else {
        return;
    };
    let db = pg.create_database("uplift").unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let s3 = S3Server::start(&tmp.path().join("s3")).unwrap();
    let config = format!(
        "[database]\nurl = \"{db}\"\nmax_connections = 8\n{}",
        s3.artifacts_toml(false)
    );
    let launch = ServerLaunch {
        config_toml: Some(config.clone()),
        ..ServerLaunch::on("127.0.0.1:0")
    };
    let mut fx = Fixture::start_async(launch).await;
    let second = fx.start_replica("replica-2", &config).await;
    let first_addr = fx.server.listen_addr().to_owned();
    let second_addr = second.listen_addr().to_owned();
    let lb = {
        let dir = tmp.path().to_owned();
        tokio::task::spawn_blocking(move || Balancer::start(&dir, &[&first_addr, &second_addr]))
            .await
            .unwrap()
    };
    let lb_url = format!("https://{}", lb.addr);
    let second_client = second.client().unwrap();

    let specs = (0..DEVICES)
        .map(|i| (format!("d{i}"), fx.spec(&format!("hw-{i}"))))
        .collect();
    let devices = fx.power_on(specs, &lb_url).await;
    wait_views(&fx.client, "every device enrolled on 1.0", |views| {
        views.len() == DEVICES && views.iter().all(|d| d.running_version == Some(v("1.0")))
    })
    .await;
    // Both replicas hold channels, and each shows the whole fleet online:
    // its own sessions and the other's.
    let deadline = Instant::now() + WAIT;
    let (on_first, on_second) = loop {
        let counts = (
            sessions_on(&fx.client).await,
            sessions_on(&second_client).await,
        );
        let shown = (online_on(&fx.client).await, online_on(&second_client).await);
        if counts.0 + counts.1 == DEVICES && shown == (DEVICES, DEVICES) {
            break counts;
        }
        assert!(
            Instant::now() < deadline,
            "sessions per replica {counts:?}, shown online per replica {shown:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        on_first > 0 && on_second > 0,
        "spread: {on_first} + {on_second}"
    );
    for client in [&fx.client, &second_client] {
        let fleet = client.fleet().await.unwrap();
        assert_eq!(
            (fleet.devices_total, fleet.online),
            (DEVICES as u64, DEVICES as u64),
            "the fleet overview counts every replica's sessions: {fleet:#?}"
        );
    }

    fx.release("1.1", DEVICE_TYPE, &fx.image_v1_1, &fx.key)
        .await;
    // An operator follows the fleet's events on the second replica.
    let events_on_second = follow_device_events(&second_client).await;
    // Started on the second replica; the first replica's devices are told too.
    fx.client = second_client.clone();
    let started = Instant::now();
    // Slow downloads (about 4 s a device), so the kill below lands while
    // every device is at work.
    let limits = DownloadLimits {
        max_bytes_per_sec: NonZeroU64::new(256 * 1024),
        ..Default::default()
    };
    let rollout = fx.rollout_limited("1.1", None, limits).await;
    fx.client = fx.server.client().unwrap();
    wait_views(&second_client, "every device working on 1.1", |views| {
        views.iter().all(|d| {
            d.target_version == Some(v("1.1")) && d.state.is_some_and(|s| s != AgentState::Idle)
                || d.running_version == Some(v("1.1"))
        })
    })
    .await;
    let reached = started.elapsed();
    eprintln!(
        "{on_first} devices on replica 1, {on_second} on replica 2; every device working on \
         the release {reached:?} after the rollout started on replica 2"
    );

    // Every device's download start is in the second replica's stream,
    // those of the first replica's devices relayed from it.
    let deadline = Instant::now() + WAIT;
    loop {
        let started: std::collections::HashSet<DeviceId> = events_on_second
            .lock()
            .unwrap()
            .iter()
            .filter(|(kind, _)| kind == "download_started")
            .map(|(_, device)| device.clone())
            .collect();
        if started.len() == DEVICES {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "download starts in the second replica's event stream: {started:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The first replica dies mid-rollout.
    let working = second_client.devices().await.unwrap();
    assert!(
        working.iter().any(|d| d.running_version == Some(v("1.0"))),
        "the kill must land mid-rollout: {working:#?}"
    );
    fx.server.kill();
    let killed = Instant::now();
    wait_views(&second_client, "every device on 1.1, idle", |views| {
        views.len() == DEVICES
            && views
                .iter()
                .all(|d| d.running_version == Some(v("1.1")) && d.state == Some(AgentState::Idle))
    })
    .await;
    eprintln!("every device on 1.1 {:?} after the kill", killed.elapsed());
    let deadline = Instant::now() + WAIT;
    while sessions_on(&second_client).await < DEVICES {
        assert!(
            Instant::now() < deadline,
            "every device back through the balancer"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The killed replica's presence is dropped once it has gone quiet
    // (10 s): what is online is what the survivor holds.
    let fleet = second_client.fleet().await.unwrap();
    assert_eq!(fleet.online, DEVICES as u64, "{fleet:#?}");
    let status = second_client.rollout(rollout).await.unwrap();
    assert_eq!(
        (
            status.counts.succeeded,
            status.counts.failed,
            status.status.as_str()
        ),
        (DEVICES as u64, 0, "finished"),
        "{status:#?}"
    );
    // Each device went through its upgrade once and boots the new slot.
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
    drop(devices);
    drop(lb);
    drop(second);
    drop(fx);
    drop(s3);
    drop(pg);
}

fn which(program: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(program))
            .find(|p| p.is_file())
    })
}
