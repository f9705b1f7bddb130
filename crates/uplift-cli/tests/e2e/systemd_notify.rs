//! The agent under a service manager, which the test plays: it binds the
//! notification socket, starts the real `uplift-agent` with `NOTIFY_SOCKET`
//! and `WATCHDOG_USEC` set, as systemd starts `Type=notify` units with
//! `WatchdogSec=`, against a real server, and reads what arrives: `READY=1`,
//! `STATUS=` lines an operator sees in `systemctl status`, and `WATCHDOG=1`
//! at half the timeout, through an idle spell and a whole install.

use crate::common;

use common::*;
use std::num::NonZeroU64;
use std::os::unix::fs::FileTypeExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use uplift_fleet::Device;
use uplift_proto::api::DownloadLimits;
use uplift_proto::channel::AgentState;
use uplift_proto::SlotName;

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
async fn the_agent_says_when_it_is_ready_and_what_it_does_and_its_main_loop_feeds_the_watchdog() {
    let fx = Fixture::start();
    let dir = fx.path("devices/notified");
    let mut spec = fx.spec("hw-notified");
    // On the trial boot of slot b, the health check passes after turning
    // the boot environment into a FIFO: the commit that follows, in the
    // agent's main loop, then waits forever to open it, a main loop hung
    // in an action (as on a disk that stopped answering). It waits for the
    // test's word first: the agent connects beside the check, and a check
    // done before the channel is up would hang the loop before it could
    // say "connected".
    let (cmdline, bootenv) = (dir.join("cmdline"), dir.join("grubenv"));
    let checked_once_connected = dir.join("check-now");
    spec.health_check = vec![
        "sh".into(),
        "-c".into(),
        format!(
            "if grep -q uplift.slot=b {c}; then \
               while [ ! -e {g} ]; do sleep 0.05; done; rm -f {e} && mkfifo {e}; fi",
            c = cmdline.display(),
            g = checked_once_connected.display(),
            e = bootenv.display()
        ),
    ];
    let device = Device::provision(&dir, &spec, &fx.server.endpoint, &fx.image_v1_0)
        .expect("provision the device");
    assert_eq!(
        (device.cmdline_path(), device.bootenv_path()),
        (cmdline, bootenv.clone())
    );
    // What GRUB puts on the kernel command line; no boot simulator here:
    // systemd starts the agent itself.
    std::fs::write(device.cmdline_path(), "quiet uplift.slot=a\n").unwrap();
    let socket_path = dir.join("notify.sock");
    let mut manager = Manager {
        socket: tokio::net::UnixDatagram::bind(&socket_path).expect("bind NOTIFY_SOCKET"),
        start: Instant::now(),
        lines: Vec::new(),
    };
    let start_agent = || {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(device.log_path())
            .unwrap();
        Agent(
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
        )
    };
    let mut agent = start_agent();

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

    // The reboot, as GRUB does it (slot b on trial), and systemd starts the
    // agent again.
    let boot = uplift_sim::power_on(&device.bootenv_path(), &device.cmdline_path()).unwrap();
    assert_eq!(boot.slot, SlotName::B);
    manager.lines.clear();
    let _agent = start_agent();
    assert!(
        manager
            .until(Duration::from_secs(30), |l| l == "READY=1")
            .await,
        "no READY=1 on the trial boot:\n{}",
        manager.dump()
    );
    assert!(
        manager
            .until(Duration::from_secs(30), |l| {
                l == "STATUS=connected; testing 1.1 on slot b: running the health check"
            })
            .await,
        "{}",
        manager.dump()
    );
    std::fs::write(&checked_once_connected, b"").unwrap();
    // The health check has made the FIFO: the commit hangs from here on.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::symlink_metadata(&bootenv).is_ok_and(|m| m.file_type().is_fifo()) {
        assert!(Instant::now() < deadline, "the health check never ran");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let hung_at = manager.start.elapsed();
    let _ = manager.until(3 * WATCHDOG, |_| false).await;
    let watched_to = manager.start.elapsed();
    // A tick may still come between the health check's end and the commit
    // (the loop is free until then); after that, silence: at least twice
    // WatchdogSec at the end of the window, where a loop that runs feeds
    // every half of it.
    let last = manager
        .times_of("WATCHDOG=1", Duration::ZERO)
        .last()
        .copied();
    assert!(
        last.is_some_and(|t| watched_to - t >= 2 * WATCHDOG),
        "the hung main loop still fed the watchdog (hung at {hung_at:?}, watched until {watched_to:?}):\n{}",
        manager.dump()
    );
    // Alive and connected all the while: only the main loop is stuck, and
    // systemd (WatchdogSec) would now kill and restart the agent.
    let view = fx
        .wait_device(&device, "the device online, testing 1.1", |d| {
            d.online && d.state == Some(AgentState::Testing)
        })
        .await;
    assert_eq!(view.running_version, Some(v("1.1")));
}
