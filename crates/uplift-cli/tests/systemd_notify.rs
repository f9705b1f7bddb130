//! The agent under a service manager, which the test plays: it binds the
//! notification socket, starts the real `uplift-agent` with `NOTIFY_SOCKET`
//! and `WATCHDOG_USEC` set, as systemd starts `Type=notify` units with
//! `WatchdogSec=`, against a real server, and reads what arrives: `READY=1`,
//! `STATUS=` lines an operator sees in `systemctl status`, and `WATCHDOG=1`
//! at half the timeout, through an idle spell and a whole install.

mod common;

use common::*;
use std::num::NonZeroU64;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use uplift_cli::fleet::Device;
use uplift_proto::api::DownloadLimits;

/// systemd's WatchdogSec for this run: the agent must feed every second.
const WATCHDOG: Duration = Duration::from_secs(2);

/// The rollout's download cap, bytes/s: the changed chunks of 1.1 take a
/// few seconds.
const RATE: u64 = 128 * 1024;

/// The agent process, killed when the test ends however it ends.
struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The service manager's end of `NOTIFY_SOCKET`: every line received,
/// with when it arrived.
struct Manager {
    socket: tokio::net::UnixDatagram,
    start: Instant,
    lines: Vec<(Duration, String)>,
}

impl Manager {
    /// Reads until a line satisfies `done` or `limit` passes; true if one did.
    async fn until(&mut self, limit: Duration, done: impl Fn(&str) -> bool) -> bool {
        if self.lines.iter().any(|(_, l)| done(l)) {
            return true;
        }
        let deadline = tokio::time::Instant::now() + limit;
        let mut buf = vec![0u8; 4096];
        loop {
            let n = match tokio::time::timeout_at(deadline, self.socket.recv(&mut buf)).await {
                Ok(n) => n.expect("receive a notification"),
                Err(_) => return false,
            };
            let at = self.start.elapsed();
            let mut found = false;
            for line in String::from_utf8_lossy(&buf[..n]).lines() {
                found |= done(line);
                self.lines.push((at, line.to_owned()));
            }
            if found {
                return true;
            }
        }
    }

    fn times_of(&self, line: &str, from: Duration) -> Vec<Duration> {
        self.lines
            .iter()
            .filter(|(at, l)| l == line && *at >= from)
            .map(|(at, _)| *at)
            .collect()
    }

    fn statuses(&self) -> Vec<&str> {
        self.lines
            .iter()
            .filter_map(|(_, l)| l.strip_prefix("STATUS="))
            .collect()
    }

    fn dump(&self) -> String {
        self.lines
            .iter()
            .map(|(at, l)| format!("{:7.3} s  {l}", at.as_secs_f64()))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// The longest wait between two feeds in `[from, to]`, counting from `from`
/// and up to `to`: what systemd's timer would have seen.
fn longest_gap(feeds: &[Duration], from: Duration, to: Duration) -> Duration {
    let mut marks = vec![from];
    marks.extend(feeds.iter().copied().filter(|t| *t >= from && *t <= to));
    marks.push(to);
    marks
        .windows(2)
        .map(|w| w[1].saturating_sub(w[0]))
        .max()
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_says_when_it_is_ready_and_what_it_does_and_feeds_the_watchdog() {
    let fx = Fixture::start();
    let dir = fx.path("devices/notified");
    let device = Device::provision(
        &dir,
        &fx.spec("hw-notified"),
        &fx.server.endpoint,
        &fx.image_v1_0,
    )
    .expect("provision the device");
    // What GRUB puts on the kernel command line; no boot simulator here:
    // systemd starts the agent itself.
    std::fs::write(device.cmdline_path(), "quiet uplift.slot=a\n").unwrap();
    let socket_path = dir.join("notify.sock");
    let mut manager = Manager {
        socket: tokio::net::UnixDatagram::bind(&socket_path).expect("bind NOTIFY_SOCKET"),
        start: Instant::now(),
        lines: Vec::new(),
    };
    let log = std::fs::File::create(device.log_path()).unwrap();
    let mut agent = Agent(
        Command::new(&fx.bins.agent)
            .arg("--config")
            .arg(device.config_path())
            .env("NOTIFY_SOCKET", &socket_path)
            .env("WATCHDOG_USEC", WATCHDOG.as_micros().to_string())
            .env_remove("WATCHDOG_PID")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start uplift-agent"),
    );

    // Ready once configured, before (and whether or not) it reaches the server.
    assert!(
        manager
            .until(Duration::from_secs(30), |l| l == "READY=1")
            .await,
        "no READY=1 within 30 s:\n{}\nagent log:\n{}",
        manager.dump(),
        device.log()
    );
    let ready_at = manager.times_of("READY=1", Duration::ZERO)[0];
    assert!(
        manager.times_of("WATCHDOG=1", Duration::ZERO).is_empty(),
        "the watchdog is fed by the loop that runs after READY=1:\n{}",
        manager.dump()
    );
    assert!(
        manager.statuses()[0].contains("running 1.0 from slot a"),
        "{}",
        manager.dump()
    );
    assert!(
        manager
            .until(Duration::from_secs(30), |l| l
                .starts_with("STATUS=connected; running 1.0 from slot a"))
            .await,
        "no 'connected' status:\n{}\nagent log:\n{}",
        manager.dump(),
        device.log()
    );
    fx.wait_enrolled(&device).await;

    // Idle: fed every second (half of WATCHDOG_USEC), never late.
    let idle_from = manager.start.elapsed();
    let _ = manager.until(Duration::from_secs(6), |_| false).await;
    let idle_to = manager.start.elapsed();
    let feeds = manager.times_of("WATCHDOG=1", idle_from);
    let gap = longest_gap(&feeds, idle_from, idle_to);
    assert!(
        (4..=8).contains(&feeds.len()) && gap < WATCHDOG,
        "{} feeds in {:.1} s idle, longest wait {gap:?} (WatchdogSec {WATCHDOG:?}):\n{}",
        feeds.len(),
        (idle_to - idle_from).as_secs_f64(),
        manager.dump()
    );

    // An install, slowed down by the rollout's rate cap so it spans several
    // feeds: statuses follow it, and the watchdog keeps being fed while the
    // slot is written and verified.
    fx.release("1.1", DEVICE_TYPE, &fx.image_v1_1, &fx.key)
        .await;
    let install_from = manager.start.elapsed();
    let limits = DownloadLimits {
        max_bytes_per_sec: NonZeroU64::new(RATE),
        max_downloading: None,
    };
    fx.rollout_limited("1.1", None, limits).await;
    assert!(
        manager
            .until(Duration::from_secs(90), |l| l.starts_with("STATUS=")
                && l.contains("1.1 installed in slot b; rebooting to try it"))
            .await,
        "no 'rebooting' status:\n{}\nagent log:\n{}",
        manager.dump(),
        device.log()
    );
    let install_to = manager.start.elapsed();
    let statuses = manager.statuses();
    assert!(
        statuses.iter().any(
            |s| s.starts_with("connected; downloading 1.1 into slot b: ") && s.contains("% (")
        ),
        "{statuses:#?}"
    );
    assert!(
        statuses
            .iter()
            .any(|s| s.starts_with("connected; installing 1.1 into slot b")),
        "{statuses:#?}"
    );
    // `reboot.mode = "exit"` (the boot simulator's): the agent exits 194.
    let exited = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Some(status) = agent.0.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    })
    .await
    .unwrap();
    assert_eq!(exited.and_then(|s| s.code()), Some(194), "{}", device.log());
    let feeds = manager.times_of("WATCHDOG=1", install_from);
    let gap = longest_gap(&feeds, install_from, install_to);
    assert!(
        gap < WATCHDOG,
        "longest wait for WATCHDOG=1 during the install {gap:?} (WatchdogSec {WATCHDOG:?}):\n{}",
        manager.dump()
    );
    eprintln!(
        "READY=1 {:.3} s after start; {} feeds during the {:.1} s install; statuses:\n{}",
        ready_at.as_secs_f64(),
        feeds.len(),
        (install_to - install_from).as_secs_f64(),
        statuses.join("\n")
    );
}
