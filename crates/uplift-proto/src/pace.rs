//! Pacing shared by the agent and the server, pure so it is tested without
//! clocks: a token bucket for bandwidth caps (time is passed in) and the one
//! exponential backoff with jitter used for every retry (the random draw is
//! passed in).

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A bandwidth cap: `rate` bytes per second on average, bursts of at most
/// `burst` bytes. Callers take what they sent and wait as long as told, so
/// the average over any window longer than `burst / rate` stays at `rate`.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    /// Seconds since the caller's epoch at the last update.
    at: f64,
}

impl TokenBucket {
    /// A full bucket at time `now` (seconds since any fixed epoch). A burst
    /// of a tenth of a second keeps the cap tight over short windows while
    /// letting whole chunks through without sleeping for each piece.
    pub fn new(rate_bytes_per_sec: u64, now: f64) -> Self {
        let rate = rate_bytes_per_sec.max(1) as f64;
        let burst = (rate / 10.0).max(64.0 * 1024.0);
        Self {
            rate,
            burst,
            tokens: burst,
            at: now,
        }
    }

    pub fn rate(&self) -> u64 {
        self.rate as u64
    }

    /// Takes `bytes` at time `now` and says how long to wait before sending
    /// more; the debt is paid by waiting, so callers may take more than the
    /// burst at once.
    pub fn take(&mut self, bytes: u64, now: f64) -> Duration {
        let elapsed = (now - self.at).max(0.0);
        self.at = self.at.max(now);
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst) - bytes as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

/// A [`TokenBucket`] on the monotonic clock, shared by every task that
/// draws on one cap (all downloads of a server, all requests of one
/// install). It only says how long to wait, so it suits any runtime.
#[derive(Debug)]
pub struct Pacer {
    bucket: Mutex<TokenBucket>,
    epoch: Instant,
}

impl Pacer {
    pub fn new(rate_bytes_per_sec: u64) -> Self {
        Self {
            bucket: Mutex::new(TokenBucket::new(rate_bytes_per_sec, 0.0)),
            epoch: Instant::now(),
        }
    }

    pub fn rate(&self) -> u64 {
        self.bucket
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .rate()
    }

    /// Counts `bytes` moved and says how long to hold back before moving more.
    pub fn take(&self, bytes: u64) -> Duration {
        let now = self.epoch.elapsed().as_secs_f64();
        self.bucket
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take(bytes, now)
    }
}

/// The wait before retry number `attempt` (0 for the first retry): doubles
/// from `min` up to `max`, then takes 50–100 % of it by `draw` (uniform in
/// 0..=1), so a fleet that lost the server together does not come back
/// together.
pub fn backoff(attempt: u32, min: Duration, max: Duration, draw: f64) -> Duration {
    let base = min.saturating_mul(1u32 << attempt.min(16)).min(max);
    base.mul_f64(0.5 + 0.5 * draw.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sends `total` bytes in `piece`-sized writes through the bucket and
    /// returns the seconds it took on the simulated clock.
    fn send_through(bucket: &mut TokenBucket, total: u64, piece: u64) -> f64 {
        let mut now = 0.0;
        let mut sent = 0;
        while sent < total {
            let wait = bucket.take(piece, now);
            now += wait.as_secs_f64();
            sent += piece;
        }
        now
    }

    #[test]
    fn the_average_rate_stays_within_ten_percent_of_the_cap() {
        for rate in [100_000u64, 1 << 20, 50 << 20] {
            let mut bucket = TokenBucket::new(rate, 0.0);
            let total = rate * 10;
            let seconds = send_through(&mut bucket, total, 64 * 1024);
            let measured = total as f64 / seconds;
            assert!(
                (measured - rate as f64).abs() <= rate as f64 * 0.1,
                "rate {rate}: measured {measured:.0} B/s over {seconds:.2} s"
            );
        }
    }

    #[test]
    fn idle_time_earns_at_most_one_burst() {
        let mut bucket = TokenBucket::new(1_000_000, 0.0);
        // An hour idle must not let the next hundred megabytes through free.
        assert_eq!(bucket.take(0, 3600.0), Duration::ZERO);
        let wait = bucket.take(10_000_000, 3600.0);
        assert!(wait >= Duration::from_secs_f64(9.8), "{wait:?}");
    }

    #[test]
    fn a_clock_going_backwards_earns_nothing() {
        let mut bucket = TokenBucket::new(1_000_000, 10.0);
        bucket.take(100_000, 10.0);
        let wait = bucket.take(1_000_000, 5.0);
        assert!(wait >= Duration::from_secs_f64(0.99), "{wait:?}");
    }

    #[test]
    fn backoff_doubles_to_its_cap_with_jitter() {
        let (min, max) = (Duration::from_millis(500), Duration::from_secs(60));
        assert_eq!(backoff(0, min, max, 1.0), min);
        assert_eq!(backoff(0, min, max, 0.0), min / 2);
        assert_eq!(backoff(3, min, max, 1.0), Duration::from_secs(4));
        assert_eq!(backoff(30, min, max, 1.0), max);
        assert_eq!(backoff(30, min, max, 0.0), max / 2);
        assert_eq!(
            backoff(2, min, max, 7.0),
            Duration::from_secs(2),
            "draw is clamped"
        );
    }
}
