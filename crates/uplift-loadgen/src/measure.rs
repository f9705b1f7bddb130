//! What the generator reads about the server process (/proc) and how it
//! sums up latencies and rates.

use serde::Serialize;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::time::Instant;

/// Clock ticks per second of /proc/<pid>/stat's times (USER_HZ, 100 on Linux).
const TICKS_PER_SEC: f64 = 100.0;

#[derive(Debug, Clone, Copy)]
pub struct ProcSample {
    pub rss_kib: u64,
    /// User plus system CPU time.
    pub cpu_secs: f64,
}

impl ProcSample {
    pub fn take(pid: u32) -> Option<Self> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        Some(Self {
            rss_kib: vm_rss_kib(&status)?,
            cpu_secs: cpu_ticks(&stat)? as f64 / TICKS_PER_SEC,
        })
    }
}

fn vm_rss_kib(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// utime + stime: fields 14 and 15, counted after the command name (which
/// is in parentheses and may hold spaces).
fn cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state).
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// The one running process named `uplift-server`, if exactly one is.
pub fn find_server_pid() -> Option<u32> {
    let mut found = None;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.trim_end() == "uplift-server" {
            if found.is_some() {
                return None;
            }
            found = Some(pid);
        }
    }
    found
}

/// Instants as wall-clock time (UNIX milliseconds): comparable across the
/// processes of one host (several generators, the script that killed a
/// replica), which monotonic instants are not.
#[derive(Debug, Clone, Copy)]
pub struct WallClock {
    at: Instant,
    unix_ms: f64,
}

impl WallClock {
    pub fn now() -> Self {
        let unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64()
            * 1e3;
        Self {
            at: Instant::now(),
            unix_ms,
        }
    }

    /// `t` on the wall clock, read once when this was made (so a clock step
    /// during the run does not move the figures).
    pub fn unix_ms(&self, t: Instant) -> f64 {
        if t >= self.at {
            self.unix_ms + (t - self.at).as_secs_f64() * 1e3
        } else {
            self.unix_ms - (self.at - t).as_secs_f64() * 1e3
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Latencies {
    pub count: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Latencies {
    pub fn of(mut samples: Vec<Duration>) -> Option<Self> {
        if samples.is_empty() {
            return None;
        }
        samples.sort();
        let ms = |d: Duration| (d.as_secs_f64() * 1e4).round() / 10.0;
        Some(Self {
            count: samples.len(),
            p50_ms: ms(nearest_rank(&samples, 50.0)),
            p99_ms: ms(nearest_rank(&samples, 99.0)),
            max_ms: ms(*samples.last().expect("not empty")),
        })
    }
}

/// The nearest-rank percentile of sorted samples.
fn nearest_rank(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Most events within any window of `window` starting at an event, scaled
/// to events per second.
pub fn peak_rate(sorted: &[Instant], window: Duration) -> usize {
    let mut best = 0;
    let mut start = 0;
    for end in 0..sorted.len() {
        while sorted[end] - sorted[start] >= window {
            start += 1;
        }
        best = best.max(end - start + 1);
    }
    (best as f64 / window.as_secs_f64()).round() as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let samples: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        let l = Latencies::of(samples).unwrap();
        assert_eq!((l.p50_ms, l.p99_ms, l.max_ms), (50.0, 99.0, 100.0));
        let one = Latencies::of(vec![Duration::from_millis(7)]).unwrap();
        assert_eq!((one.p50_ms, one.p99_ms, one.max_ms), (7.0, 7.0, 7.0));
        assert!(Latencies::of(vec![]).is_none());
    }

    #[test]
    fn the_peak_rate_is_the_busiest_window() {
        let t = Instant::now();
        let at = |ms: u64| t + Duration::from_millis(ms);
        let events = [
            at(0),
            at(100),
            at(900),
            at(950),
            at(1000),
            at(1500),
            at(3000),
        ];
        assert_eq!(peak_rate(&events, Duration::from_secs(1)), 4);
        assert_eq!(peak_rate(&events, Duration::from_millis(100)), 20);
        assert_eq!(peak_rate(&[], Duration::from_secs(1)), 0);
    }

    #[test]
    fn the_wall_clock_places_instants_before_and_after_its_reading() {
        let clock = WallClock::now();
        let later = clock.at + Duration::from_millis(1500);
        assert_eq!(clock.unix_ms(later) - clock.unix_ms, 1500.0);
        if let Some(earlier) = clock.at.checked_sub(Duration::from_millis(250)) {
            assert_eq!(clock.unix_ms - clock.unix_ms(earlier), 250.0);
        }
        let wall = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
        assert!((wall.as_secs_f64() * 1e3 - clock.unix_ms).abs() < 5_000.0);
    }

    #[test]
    fn proc_files_are_read() {
        let status = "Name:\tuplift-server\nVmRSS:\t   12345 kB\n";
        assert_eq!(vm_rss_kib(status), Some(12345));
        let stat = "42 (uplift server) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0";
        assert_eq!(cpu_ticks(stat), Some(300));
        let me = ProcSample::take(std::process::id()).unwrap();
        assert!(me.rss_kib > 0);
    }
}
