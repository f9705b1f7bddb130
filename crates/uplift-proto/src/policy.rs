//! How a rollout proceeds, as the operator states it when starting one:
//! its phases, when a phase may start, and when it stops by itself. Shared
//! by the server (which enforces it), the CLI and the web page (which send
//! it), so all three parse and check it the same way.

use serde::{Deserialize, Serialize};
use std::num::NonZeroU32;

/// The most phases a rollout may have (besides the final one for the rest).
pub const MAX_PHASES: usize = 16;

/// How far a phase reaches into the rollout's target, counted from its
/// first device: cumulative, so `1 %, 10 %, 50 %` is a canary of 1 %, then
/// up to a tenth, then up to half; the final phase takes the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum PhaseReach {
    /// This share of the target, rounded up: 1 % of 50 devices is one.
    Percent(u8),
    /// This many devices of the target.
    #[cfg_attr(feature = "openapi", schema(value_type = u32))]
    Count(NonZeroU32),
}

impl PhaseReach {
    /// How many of `total` devices this phase reaches (at least one when
    /// there is any).
    pub fn devices_of(self, total: u64) -> u64 {
        match self {
            PhaseReach::Percent(p) => (total * u64::from(p)).div_ceil(100),
            PhaseReach::Count(n) => u64::from(n.get()).min(total),
        }
    }
}

/// When failures stop a rollout: once at least `min_finished` devices of
/// the phase have finished (succeeded or failed), more than `percent` of
/// the finished ones failed, rolled back or timed out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorThreshold {
    #[cfg_attr(feature = "openapi", schema(maximum = 100))]
    pub percent: u8,
    pub min_finished: u32,
}

impl Default for ErrorThreshold {
    /// The careful default: the first failure pauses the rollout.
    fn default() -> Self {
        Self {
            percent: 0,
            min_finished: 1,
        }
    }
}

/// AWS IoT Jobs' exponential ramp: offers start at `base_per_minute` and
/// the rate is multiplied by `factor_percent / 100` each time another
/// `step_successes` devices have succeeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Ramp {
    #[cfg_attr(feature = "openapi", schema(value_type = u32, minimum = 1))]
    pub base_per_minute: NonZeroU32,
    /// 100 to 500 (1× to 5×).
    #[cfg_attr(feature = "openapi", schema(minimum = 100, maximum = 500))]
    pub factor_percent: u32,
    #[cfg_attr(feature = "openapi", schema(value_type = u32, minimum = 1))]
    pub step_successes: NonZeroU32,
}

/// Everything about how a rollout proceeds. The default is one phase for
/// every device, pausing at the first failure.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RolloutPolicy {
    /// Ordered phases before the final one, which takes every device left.
    #[serde(default)]
    pub phases: Vec<PhaseReach>,
    /// The share of a phase's devices that must run the new release before
    /// the next phase may start; 100 when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 100))]
    pub success_percent: Option<u8>,
    /// Seconds a phase must have held its success level before the next
    /// one starts.
    #[serde(default)]
    pub soak_seconds: u64,
    /// Each phase after the first starts only when an operator approves it.
    #[serde(default)]
    pub approval: bool,
    #[serde(default)]
    pub error_threshold: ErrorThreshold,
    /// A device offered the release that has not finished within this many
    /// seconds counts as failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_timeout_seconds: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ramp: Option<Ramp>,
    /// When devices may start downloading, or only reboot into the
    /// release ([`WindowSpec::applies_to`]); any time when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<WindowSpec>,
    /// Devices of the release's type that enroll while the rollout runs
    /// join it, in its current phase (only for rollouts of a whole device
    /// type, not of a list).
    #[serde(default)]
    pub dynamic: bool,
}

/// A maintenance window as written: it opens at each time the cron
/// schedule names, read in `time_zone` (an IANA name such as
/// `Europe/Berlin`, so daylight saving time is followed), and stays open
/// for `duration_minutes`. The server parses and checks it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WindowSpec {
    /// Five fields: minute, hour, day of month, month, day of week.
    pub cron: String,
    pub duration_minutes: u32,
    #[serde(default = "utc")]
    pub time_zone: String,
    /// What the window governs: when downloads may start (the default), or
    /// only when devices may reboot into the release they have already
    /// downloaded and verified.
    #[serde(default, skip_serializing_if = "WindowScope::is_downloads")]
    pub applies_to: WindowScope,
}

/// What a maintenance window governs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum WindowScope {
    /// Outside the window no new download starts; installs in progress
    /// finish, and a device reboots into the release as soon as it is
    /// written.
    #[default]
    Downloads,
    /// Devices are offered the release at once (as phases and limits
    /// allow), download, write and verify it, and then wait: they reboot
    /// into it only while the window is open.
    Reboot,
}

impl WindowScope {
    pub fn is_downloads(&self) -> bool {
        *self == WindowScope::Downloads
    }

    pub fn as_str(self) -> &'static str {
        match self {
            WindowScope::Downloads => "downloads",
            WindowScope::Reboot => "reboot",
        }
    }
}

impl std::str::FromStr for WindowScope {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "downloads" => Ok(WindowScope::Downloads),
            "reboot" => Ok(WindowScope::Reboot),
            other => Err(format!(
                "{other:?}: a window applies to \"downloads\" (new downloads start only in it) \
                 or \"reboot\" (devices download at once and reboot only in it)"
            )),
        }
    }
}

fn utc() -> String {
    "UTC".to_owned()
}

/// Why a policy is refused; the message says what to change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("rollout policy refused: {0}")]
pub struct PolicyError(String);

impl RolloutPolicy {
    pub fn success_percent(&self) -> u8 {
        self.success_percent.unwrap_or(100)
    }

    /// What the rollout's window governs, if it has one.
    pub fn window_scope(&self) -> Option<WindowScope> {
        self.window.as_ref().map(|w| w.applies_to)
    }

    /// Checks what serde cannot: ranges and the order of phases.
    pub fn check(&self) -> Result<(), PolicyError> {
        let refuse = |m: String| Err(PolicyError(m));
        if self.phases.len() > MAX_PHASES {
            return refuse(format!(
                "{} phases given, at most {MAX_PHASES} are allowed (the final phase for the rest is implicit)",
                self.phases.len()
            ));
        }
        let mut last_percent = 0;
        let mut last_count = 0;
        for (i, phase) in self.phases.iter().enumerate() {
            match *phase {
                PhaseReach::Percent(p) if p == 0 || p > 100 => {
                    return refuse(format!(
                        "phase {} reaches {p} % of the target; give 1 to 100",
                        i + 1
                    ))
                }
                PhaseReach::Percent(p) if p <= last_percent => {
                    return refuse(format!(
                        "phase {} reaches {p} %, not more than the phase before it ({last_percent} %); phases are cumulative",
                        i + 1
                    ))
                }
                PhaseReach::Percent(p) => last_percent = p,
                PhaseReach::Count(n) if n.get() <= last_count => {
                    return refuse(format!(
                        "phase {} reaches {n} devices, not more than the phase before it ({last_count}); phases are cumulative",
                        i + 1
                    ))
                }
                PhaseReach::Count(n) => last_count = n.get(),
            }
        }
        if let Some(p) = self.success_percent {
            if p == 0 || p > 100 {
                return refuse(format!("success level {p} %; give 1 to 100"));
            }
        }
        if self.error_threshold.percent > 100 {
            return refuse(format!(
                "error threshold {} %; give 0 to 100",
                self.error_threshold.percent
            ));
        }
        if self.device_timeout_seconds == Some(0) {
            return refuse(
                "a device timeout of 0 s fails every device; leave it out for none".into(),
            );
        }
        if let Some(ramp) = self.ramp {
            if !(100..=500).contains(&ramp.factor_percent) {
                return refuse(format!(
                    "ramp factor {} %; give 100 to 500",
                    ramp.factor_percent
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(n: u32) -> PhaseReach {
        PhaseReach::Count(NonZeroU32::new(n).unwrap())
    }

    #[test]
    fn a_percent_phase_rounds_up_and_a_count_is_capped_by_the_target() {
        assert_eq!(PhaseReach::Percent(1).devices_of(50), 1);
        assert_eq!(PhaseReach::Percent(10).devices_of(100), 10);
        assert_eq!(PhaseReach::Percent(10).devices_of(101), 11);
        assert_eq!(PhaseReach::Percent(100).devices_of(7), 7);
        assert_eq!(PhaseReach::Percent(50).devices_of(0), 0);
        assert_eq!(count(5).devices_of(3), 3);
    }

    #[test]
    fn the_json_an_operator_writes_is_read_with_defaults() {
        let policy: RolloutPolicy = serde_json::from_str(
            r#"{"phases":[{"percent":1},{"count":20},{"percent":50}],"approval":true}"#,
        )
        .unwrap();
        assert_eq!(
            policy.phases,
            vec![PhaseReach::Percent(1), count(20), PhaseReach::Percent(50)]
        );
        assert_eq!(policy.success_percent(), 100);
        assert_eq!(policy.error_threshold, ErrorThreshold::default());
        assert!(policy.check().is_ok());
        assert!(serde_json::from_str::<RolloutPolicy>(r#"{"phasse":[]}"#).is_err());
    }

    #[test]
    fn a_window_governs_downloads_unless_it_says_reboot() {
        let policy: RolloutPolicy =
            serde_json::from_str(r#"{"window":{"cron":"0 2 * * *","duration_minutes":60}}"#)
                .unwrap();
        assert_eq!(policy.window_scope(), Some(WindowScope::Downloads));
        assert!(
            !serde_json::to_string(&policy)
                .unwrap()
                .contains("applies_to"),
            "a download window is stored as before"
        );
        let policy: RolloutPolicy = serde_json::from_str(
            r#"{"window":{"cron":"0 2 * * *","duration_minutes":60,"applies_to":"reboot"}}"#,
        )
        .unwrap();
        assert_eq!(policy.window_scope(), Some(WindowScope::Reboot));
        assert_eq!(RolloutPolicy::default().window_scope(), None);
        assert_eq!("reboot".parse(), Ok(WindowScope::Reboot));
        let err = "reboots".parse::<WindowScope>().unwrap_err();
        assert!(err.contains("\"downloads\""), "{err}");
    }

    #[test]
    fn phases_that_do_not_grow_or_leave_the_range_are_refused_with_the_phase_named() {
        let with = |phases: Vec<PhaseReach>| RolloutPolicy {
            phases,
            ..RolloutPolicy::default()
        };
        let err = with(vec![PhaseReach::Percent(10), PhaseReach::Percent(10)])
            .check()
            .unwrap_err();
        assert!(err.to_string().contains("phase 2 reaches 10 %"), "{err}");
        let err = with(vec![PhaseReach::Percent(0)]).check().unwrap_err();
        assert!(err.to_string().contains("give 1 to 100"), "{err}");
        let err = with(vec![count(10), count(5)]).check().unwrap_err();
        assert!(
            err.to_string().contains("phase 2 reaches 5 devices"),
            "{err}"
        );
        let too_many = (1..=17).map(PhaseReach::Percent).collect();
        assert!(with(too_many).check().is_err());
        let zero_timeout = RolloutPolicy {
            device_timeout_seconds: Some(0),
            ..RolloutPolicy::default()
        };
        assert!(zero_timeout.check().is_err());
    }
}
