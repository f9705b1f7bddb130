//! Maintenance windows: when a rollout may start new downloads, or (a
//! window that applies to the reboot) when its devices may reboot into the
//! release they hold verified. A window
//! opens at each time its cron schedule names, in its own time zone, and
//! stays open for a fixed duration of real time; daylight saving time is
//! the time zone database's business (`chrono-tz`), the schedule
//! `croner`'s. Pure: the scheduler asks with the time it read.

use chrono::{TimeZone as _, Utc};
use chrono_tz::Tz;
use std::str::FromStr as _;
use time::OffsetDateTime;
use uplift_proto::policy::WindowSpec;

/// The longest window: a week; longer is no window at all.
const MAX_DURATION_MINUTES: u32 = 7 * 24 * 60;

#[derive(Debug, Clone)]
pub struct Window {
    schedule: croner::Cron,
    time_zone: Tz,
    duration: chrono::Duration,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WindowError {
    #[error("maintenance window schedule {cron:?} is not a cron expression ({reason}); give five fields: minute hour day-of-month month day-of-week, e.g. \"0 2 * * *\"")]
    Schedule { cron: String, reason: String },
    #[error("maintenance window time zone {0:?} is unknown; give an IANA name such as \"Europe/Berlin\" or \"UTC\"")]
    TimeZone(String),
    #[error("maintenance window of {0} minutes; give 1 to {MAX_DURATION_MINUTES}")]
    Duration(u32),
}

impl Window {
    pub fn parse(spec: &WindowSpec) -> Result<Self, WindowError> {
        let schedule = croner::Cron::from_str(&spec.cron).map_err(|e| WindowError::Schedule {
            cron: spec.cron.clone(),
            reason: e.to_string(),
        })?;
        let time_zone: Tz = spec
            .time_zone
            .parse()
            .map_err(|_| WindowError::TimeZone(spec.time_zone.clone()))?;
        if spec.duration_minutes == 0 || spec.duration_minutes > MAX_DURATION_MINUTES {
            return Err(WindowError::Duration(spec.duration_minutes));
        }
        Ok(Self {
            schedule,
            time_zone,
            duration: chrono::Duration::minutes(i64::from(spec.duration_minutes)),
        })
    }

    /// True if a window opened less than its duration before `now`.
    pub fn is_open(&self, now: OffsetDateTime) -> bool {
        self.opened_at(now).is_some()
    }

    /// When the window open at `now` opened; `None` when it is closed.
    pub fn opened_at(&self, now: OffsetDateTime) -> Option<OffsetDateTime> {
        let now = self.local(now);
        // The first opening after `now - duration`; open if it is not
        // after `now`.
        let since = now - self.duration;
        let opened = self
            .schedule
            .find_next_occurrence(&since, false)
            .ok()
            .filter(|opened| *opened <= now)?;
        OffsetDateTime::from_unix_timestamp(opened.timestamp()).ok()
    }

    /// When the window next opens after `now` (for the operator to see),
    /// or `None` if the schedule never fires again.
    pub fn next_opening(&self, now: OffsetDateTime) -> Option<OffsetDateTime> {
        let next = self
            .schedule
            .find_next_occurrence(&self.local(now), false)
            .ok()?;
        OffsetDateTime::from_unix_timestamp(next.timestamp()).ok()
    }

    fn local(&self, now: OffsetDateTime) -> chrono::DateTime<Tz> {
        Utc.timestamp_opt(now.unix_timestamp(), now.nanosecond())
            .single()
            .unwrap_or_default()
            .with_timezone(&self.time_zone)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn window(cron: &str, minutes: u32, time_zone: &str) -> Window {
        Window::parse(&WindowSpec {
            cron: cron.to_owned(),
            duration_minutes: minutes,
            time_zone: time_zone.to_owned(),
            applies_to: Default::default(),
        })
        .unwrap()
    }

    #[test]
    fn a_nightly_window_is_open_from_its_start_for_its_duration_only() {
        let w = window("0 2 * * *", 120, "UTC");
        assert!(!w.is_open(datetime!(2026-12-04 01:59:59 UTC)));
        assert!(w.is_open(datetime!(2026-12-04 02:00 UTC)));
        assert!(w.is_open(datetime!(2026-12-04 03:59:59 UTC)));
        assert!(!w.is_open(datetime!(2026-12-04 04:00 UTC)));
        assert_eq!(
            w.opened_at(datetime!(2026-12-04 03:10 UTC)),
            Some(datetime!(2026-12-04 02:00 UTC))
        );
        assert_eq!(
            w.next_opening(datetime!(2026-12-04 04:00 UTC)),
            Some(datetime!(2026-12-05 02:00 UTC))
        );
    }

    #[test]
    fn the_window_follows_its_time_zone_across_daylight_saving_time() {
        // 01:00 in Berlin is 00:00 UTC in winter and 23:00 UTC the day
        // before in summer (CEST from 2026-03-29).
        let w = window("0 1 * * *", 60, "Europe/Berlin");
        assert!(
            w.is_open(datetime!(2026-03-28 00:30 UTC)),
            "winter: 01:30 CET"
        );
        assert!(
            !w.is_open(datetime!(2026-03-28 23:30 UTC)),
            "00:30 CET on the 29th"
        );
        assert!(
            w.is_open(datetime!(2026-03-29 23:30 UTC)),
            "summer: 01:30 CEST on the 30th"
        );
        assert!(
            !w.is_open(datetime!(2026-03-30 00:30 UTC)),
            "02:30 CEST is past it"
        );
    }

    #[test]
    fn a_window_in_the_hour_skipped_by_spring_forward_still_opens_that_day() {
        // 02:30 does not exist in Berlin on 2026-03-29 (02:00 -> 03:00).
        let w = window("30 2 * * *", 60, "Europe/Berlin");
        let opening = w.next_opening(datetime!(2026-03-28 23:00 UTC)).unwrap();
        assert_eq!(
            opening.date(),
            time::macros::date!(2026 - 03 - 29),
            "{opening}"
        );
        assert!(w.is_open(opening));
    }

    #[test]
    fn a_window_in_the_hour_repeated_by_fall_back_opens_and_closes_in_real_time() {
        // On 2026-10-25 Berlin's 02:00-03:00 happens twice (CEST, then CET).
        let w = window("0 2 * * *", 30, "Europe/Berlin");
        assert!(w.is_open(datetime!(2026-10-25 00:15 UTC)), "02:15 CEST");
        assert!(
            !w.is_open(datetime!(2026-10-25 00:45 UTC)),
            "02:45 CEST is past 30 minutes"
        );
        assert!(!w.is_open(datetime!(2026-10-25 02:15 UTC)), "03:15 CET");
    }

    #[test]
    fn weekday_windows_skip_the_weekend() {
        let w = window("0 22 * * MON-FRI", 180, "UTC");
        assert!(w.is_open(datetime!(2026-12-04 23:00 UTC)), "Friday night");
        assert!(
            !w.is_open(datetime!(2026-12-05 23:00 UTC)),
            "Saturday night"
        );
        assert!(
            w.is_open(datetime!(2026-12-05 00:30 UTC)),
            "Friday's window runs past midnight"
        );
    }

    #[test]
    fn bad_schedules_zones_and_durations_are_refused_with_what_to_write() {
        let spec = |cron: &str, minutes, tz: &str| WindowSpec {
            cron: cron.to_owned(),
            duration_minutes: minutes,
            time_zone: tz.to_owned(),
            applies_to: Default::default(),
        };
        let err = Window::parse(&spec("every night", 60, "UTC")).unwrap_err();
        assert!(err.to_string().contains("give five fields"), "{err}");
        let err = Window::parse(&spec("0 2 * * *", 60, "Mars/Olympus")).unwrap_err();
        assert_eq!(err, WindowError::TimeZone("Mars/Olympus".into()));
        assert_eq!(
            Window::parse(&spec("0 2 * * *", 0, "UTC")).unwrap_err(),
            WindowError::Duration(0)
        );
    }
}
