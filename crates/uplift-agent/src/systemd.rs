//! The agent under systemd (`Type=notify`, `WatchdogSec=` in
//! deploy/uplift-agent.service): `READY=1` once it is configured and its
//! loop runs, `STATUS=` lines saying what it is doing (`systemctl status
//! uplift-agent` shows the newest), and `WATCHDOG=1` every half of
//! `WATCHDOG_USEC`. Messages go through the `sd-notify` crate; outside
//! systemd (no `NOTIFY_SOCKET`) everything here does nothing.
//!
//! Which loop feeds the watchdog matters: a timer task of its own would go
//! on feeding while the agent is wedged. The agent's main loop (in
//! [`crate::run`]) feeds it from its own `select!`, so a main loop stuck in
//! an action (a boot-environment write on a hung disk, say) starves it; and
//! it feeds only while the channel task has shown a sign of life within
//! [`CHANNEL_STALL`], so a wedged channel starves it too. systemd then
//! kills and restarts the agent (`Restart=always`).

use std::time::Duration;
use tokio::time::Instant;
use uplift_proto::channel::{AgentState, Report};

/// How long the channel task may go without a sign of life before the
/// watchdog is starved. Its longest legitimate waits are the reconnect
/// backoff (at most 60 s), a handshake (three 10 s connect steps and three
/// 15 s message waits) and a silent server (75 s): twice the longest.
pub const CHANNEL_STALL: Duration = Duration::from_secs(180);

/// Longest `STATUS=` text sent: systemd shows one line, and a datagram
/// must stay small.
const STATUS_MAX: usize = 400;

/// Talks to the service manager, if there is one.
#[derive(Debug)]
pub struct Notifier {
    /// `NOTIFY_SOCKET` is set: there is someone to tell.
    enabled: bool,
    /// `WATCHDOG_USEC`, when the watchdog is on for this process.
    watchdog: Option<Duration>,
    /// The last `STATUS=` sent, so only changes are sent.
    status: String,
    /// The channel was stalled at the last feed time (logged once per stall).
    starved: bool,
    /// A send failed (logged once, not at every feed).
    send_failed: bool,
}

impl Notifier {
    /// What systemd set in the environment: `NOTIFY_SOCKET`, and
    /// `WATCHDOG_USEC` (ignored when `WATCHDOG_PID` names another process,
    /// as sd_watchdog_enabled(3) does).
    pub fn from_env() -> Self {
        Self {
            enabled: std::env::var_os("NOTIFY_SOCKET").is_some(),
            watchdog: sd_notify::watchdog_enabled().filter(|d| !d.is_zero()),
            status: String::new(),
            starved: false,
            send_failed: false,
        }
    }

    /// How often to send `WATCHDOG=1`: half of `WATCHDOG_USEC`, as
    /// sd_watchdog_enabled(3) advises; `None` when the watchdog is off.
    pub fn feed_every(&self) -> Option<Duration> {
        self.watchdog.map(feed_interval)
    }

    /// `READY=1` with the first status: the agent is configured and its
    /// loop runs (whether or not the server is reachable yet).
    pub fn ready(&mut self, status: String) {
        let status = one_line(status);
        self.send(&[
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status(&status),
        ]);
        self.status = status;
    }

    /// `STATUS=…` when it differs from the last one sent.
    pub fn status(&mut self, status: String) {
        let status = one_line(status);
        if status != self.status {
            self.send(&[sd_notify::NotifyState::Status(&status)]);
            self.status = status;
        }
    }

    /// The main loop's watchdog tick: `WATCHDOG=1` if the channel task beat
    /// at `channel_beat` recently enough, otherwise nothing (and a log line
    /// once), so that systemd restarts the agent.
    pub fn tick(&mut self, channel_beat: Instant, now: Instant) {
        if channel_alive(channel_beat, now, CHANNEL_STALL) {
            self.starved = false;
            self.send(&[sd_notify::NotifyState::Watchdog]);
        } else if !self.starved {
            self.starved = true;
            tracing::error!(
                "the device channel task has shown no sign of life for {} s; no longer feeding the \
                 service watchdog, so that systemd restarts the agent",
                now.saturating_duration_since(channel_beat).as_secs()
            );
        }
    }

    /// `STOPPING=1`: the agent is shutting down.
    pub fn stopping(&mut self) {
        self.send(&[sd_notify::NotifyState::Stopping]);
    }

    fn send(&mut self, states: &[sd_notify::NotifyState]) {
        if !self.enabled {
            return;
        }
        match sd_notify::notify(states) {
            Ok(()) => self.send_failed = false,
            Err(e) if !self.send_failed => {
                self.send_failed = true;
                tracing::warn!("cannot notify systemd (NOTIFY_SOCKET): {e}");
            }
            Err(_) => {}
        }
    }
}

/// Half the watchdog timeout: one late tick still lands in time.
pub fn feed_interval(timeout: Duration) -> Duration {
    (timeout / 2).max(Duration::from_millis(1))
}

/// Whether the channel task, last seen at `beat`, still counts as alive at `now`.
pub fn channel_alive(beat: Instant, now: Instant, stall: Duration) -> bool {
    now.saturating_duration_since(beat) < stall
}

/// The `STATUS=` line for what the agent reports and whether its channel
/// to the server is up. Pure.
pub fn status_line(report: &Report, connected: bool) -> String {
    let link = if connected {
        "connected"
    } else {
        "not connected to the server"
    };
    let running = &report.running_version;
    let booted = report.booted_slot;
    let target = report
        .target_version
        .as_ref()
        .map_or_else(|| "an update".to_owned(), ToString::to_string);
    let other = booted.other();
    match report.state {
        AgentState::Idle => {
            format!("{link}; running {running} from slot {booted}; waiting for an update")
        }
        AgentState::Downloading => match report.progress {
            Some(p) if p.total_bytes > 0 => format!(
                "{link}; downloading {target} into slot {other}: {}% ({:.1} of {:.1} MiB)",
                p.done_bytes.saturating_mul(100) / p.total_bytes,
                p.done_bytes as f64 / 1048576.0,
                p.total_bytes as f64 / 1048576.0
            ),
            _ => format!("{link}; downloading {target} into slot {other}"),
        },
        AgentState::Verifying => {
            format!("{link}; installing {target} into slot {other}: verifying")
        }
        AgentState::RebootPending => {
            format!("{link}; {target} installed in slot {other}; rebooting to try it")
        }
        AgentState::AwaitingReboot => format!(
            "{link}; {target} installed in slot {other}; waiting for the server's go to reboot"
        ),
        AgentState::Testing => {
            format!("{link}; testing {running} on slot {booted}: running the health check")
        }
        AgentState::Failed => {
            let why = report
                .error
                .as_ref()
                .map_or_else(String::new, |e| format!(": {e}"));
            format!(
                "{link}; running {running} from slot {booted}; the install of {target} failed{why}"
            )
        }
        AgentState::RolledBack => {
            let why = report
                .error
                .as_ref()
                .map_or_else(String::new, |e| format!(": {e}"));
            format!("{link}; rolled back to {running} on slot {booted}{why}")
        }
    }
}

/// A status is one line (a newline would end it early) of bounded length.
fn one_line(status: String) -> String {
    let mut line: String = status
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if line.len() > STATUS_MAX {
        let mut cut = STATUS_MAX;
        while !line.is_char_boundary(cut) {
            cut -= 1;
        }
        line.truncate(cut);
        line.push('…');
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use uplift_proto::channel::Progress;
    use uplift_proto::{ErrorKind, SlotName, WireError};

    fn report(state: AgentState) -> Report {
        Report {
            state,
            running_version: "1.0".parse().unwrap(),
            booted_slot: SlotName::A,
            target_version: Some("1.1".parse().unwrap()),
            progress: None,
            error: None,
        }
    }

    #[test]
    fn the_watchdog_is_fed_at_half_its_timeout() {
        assert_eq!(
            feed_interval(Duration::from_secs(60)),
            Duration::from_secs(30)
        );
        assert_eq!(
            feed_interval(Duration::from_micros(1)),
            Duration::from_millis(1)
        );
    }

    #[test]
    fn a_channel_task_silent_past_the_stall_limit_starves_the_watchdog() {
        let beat = Instant::now();
        let stall = Duration::from_secs(180);
        assert!(channel_alive(beat, beat, stall));
        assert!(channel_alive(beat, beat + Duration::from_secs(179), stall));
        assert!(!channel_alive(beat, beat + stall, stall));
        // A beat newer than `now` (clock read in another order) is alive.
        assert!(channel_alive(beat + Duration::from_secs(1), beat, stall));
    }

    #[test]
    fn the_status_says_what_the_agent_does() {
        assert_eq!(
            status_line(
                &Report {
                    target_version: None,
                    ..report(AgentState::Idle)
                },
                true
            ),
            "connected; running 1.0 from slot a; waiting for an update"
        );
        let mut downloading = report(AgentState::Downloading);
        downloading.progress = Some(Progress {
            done_bytes: 1 << 20,
            total_bytes: 4 << 20,
            fetched_bytes: 1 << 20,
        });
        assert_eq!(
            status_line(&downloading, false),
            "not connected to the server; downloading 1.1 into slot b: 25% (1.0 of 4.0 MiB)"
        );
        assert!(status_line(&report(AgentState::Verifying), true).contains("installing 1.1"));
        assert!(status_line(&report(AgentState::RebootPending), true).contains("rebooting"));
        assert!(status_line(&report(AgentState::AwaitingReboot), true).contains("waiting"));
        assert!(status_line(&report(AgentState::Testing), true).contains("health check"));
        let mut failed = report(AgentState::Failed);
        failed.error = Some(WireError::new(
            ErrorKind::SlotTooSmall,
            "slot b (/dev/loop3) holds 1 byte\nbut the image needs 2",
        ));
        let line = status_line(&failed, true);
        assert!(line.contains("the install of 1.1 failed"), "{line}");
        assert!(line.contains("/dev/loop3"), "{line}");
    }

    #[test]
    fn a_status_is_one_line_of_bounded_length() {
        assert_eq!(one_line("a\nb\tc".to_owned()), "a b c");
        let long = one_line("é".repeat(1000));
        assert!(long.len() <= STATUS_MAX + '…'.len_utf8(), "{}", long.len());
        assert!(long.ends_with('…'));
    }
}
