//! What the server tells integrators as it happens, so they need not poll:
//! device and rollout events on a server-sent event stream
//! (`GET /api/v1/events`) and in webhook deliveries (HMAC-signed POSTs),
//! and the bodies of the webhook endpoints.

use crate::api::DeviceEventKind;
use crate::error::WireError;
use crate::names::{DeviceId, Version};
use serde::{Deserialize, Serialize};

pub const EVENTS_PATH: &str = "/api/v1/events";
pub const WEBHOOKS_PATH: &str = "/api/v1/webhooks";

/// Headers of a webhook delivery.
pub const SIGNATURE_HEADER: &str = "x-uplift-signature";
pub const TIMESTAMP_HEADER: &str = "x-uplift-timestamp";
pub const DELIVERY_HEADER: &str = "x-uplift-delivery";
pub const EVENT_HEADER: &str = "x-uplift-event";

/// The bytes a delivery's signature covers: the timestamp header, a dot,
/// and the body, so a captured delivery cannot be replayed with a new
/// timestamp. The signature header is `sha256=` and the hex HMAC-SHA256 of
/// these bytes under the webhook's secret.
pub fn signed_payload(timestamp: &str, body: &[u8]) -> Vec<u8> {
    let mut payload = Vec::with_capacity(timestamp.len() + 1 + body.len());
    payload.extend_from_slice(timestamp.as_bytes());
    payload.push(b'.');
    payload.extend_from_slice(body);
    payload
}

/// One thing that happened in the fleet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct FleetEvent {
    /// Increasing within one server process (the stream's event id).
    pub seq: u64,
    /// RFC 3339.
    pub at: String,
    #[serde(flatten)]
    pub about: EventAbout,
}

/// Whom an event is about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "subject", rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum EventAbout {
    /// What the device's history records (offers, downloads, installs,
    /// reboots, commits, rollbacks, errors).
    Device {
        device_id: DeviceId,
        event: DeviceEventKind,
    },
    Rollout {
        rollout_id: i64,
        event: RolloutEvent,
    },
}

impl EventAbout {
    pub fn subject(&self) -> Subject {
        match self {
            EventAbout::Device { .. } => Subject::Device,
            EventAbout::Rollout { .. } => Subject::Rollout,
        }
    }

    /// `device.committed`, `rollout.paused`: the event header of a delivery.
    pub fn name(&self) -> String {
        match self {
            EventAbout::Device { event, .. } => format!("device.{}", event.name()),
            EventAbout::Rollout { event, .. } => format!("rollout.{}", event.name()),
        }
    }
}

#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    Serialize,
    Deserialize,
    strum::EnumString,
    strum::IntoStaticStr,
)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum Subject {
    Device,
    Rollout,
}

/// A rollout's state changes. Phases count from 0, as in the rollout view.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum RolloutEvent {
    Started {
        release: Version,
        devices: u64,
        by: String,
    },
    PhaseStarted {
        phase: u32,
    },
    AwaitingApproval {
        phase: u32,
    },
    /// By an operator or by itself; `reason` says which and why.
    Paused {
        reason: String,
    },
    Resumed {
        by: String,
    },
    Approved {
        by: String,
    },
    Aborted {
        by: String,
    },
    Finished,
}

impl RolloutEvent {
    pub fn name(&self) -> &'static str {
        match self {
            RolloutEvent::Started { .. } => "started",
            RolloutEvent::PhaseStarted { .. } => "phase_started",
            RolloutEvent::AwaitingApproval { .. } => "awaiting_approval",
            RolloutEvent::Paused { .. } => "paused",
            RolloutEvent::Resumed { .. } => "resumed",
            RolloutEvent::Approved { .. } => "approved",
            RolloutEvent::Aborted { .. } => "aborted",
            RolloutEvent::Finished => "finished",
        }
    }
}

/// Which events a stream or a webhook takes; every filter given must match.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(
    feature = "openapi",
    derive(utoipa::IntoParams),
    into_params(parameter_in = Query)
)]
pub struct EventFilter {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<Subject>,
    /// Only events about this device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<DeviceId>,
    /// Only events about this rollout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<i64>,
}

impl EventFilter {
    pub fn matches(&self, about: &EventAbout) -> bool {
        let subject_ok = self.subject.is_none_or(|s| s == about.subject());
        let device_ok = self.device.as_ref().is_none_or(
            |want| matches!(about, EventAbout::Device { device_id, .. } if device_id == want),
        );
        let rollout_ok = self.rollout.is_none_or(
            |want| matches!(about, EventAbout::Rollout { rollout_id, .. } if *rollout_id == want),
        );
        subject_ok && device_ok && rollout_ok
    }
}

/// `GET /api/v1/events` query: the filter, and how much of the recent past
/// to send first. A client that reconnects with `Last-Event-ID` is sent
/// what it missed instead (as far as the server still holds it).
/// The filter's fields are repeated rather than an [`EventFilter`] under
/// `#[serde(flatten)]`: flattening makes serde read query-string numbers
/// as strings (so `rollout=3` would be refused) and cannot be combined
/// with `deny_unknown_fields`; [`EventStreamQuery::filter`] gives the filter.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(
    feature = "openapi",
    derive(utoipa::IntoParams),
    into_params(parameter_in = Query)
)]
pub struct EventStreamQuery {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<Subject>,
    /// Only events about this device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<DeviceId>,
    /// Only events about this rollout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<i64>,
    /// First send up to this many of the newest past events the filter
    /// takes (at most [`RECENT_EVENTS`]), oldest first; none by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", param(minimum = 0, maximum = 1000))]
    pub recent: Option<u32>,
}

/// Past events the server holds for `recent` and `Last-Event-ID`.
pub const RECENT_EVENTS: usize = 1000;

impl EventStreamQuery {
    pub fn filter(&self) -> EventFilter {
        EventFilter {
            subject: self.subject,
            device: self.device.clone(),
            rollout: self.rollout,
        }
    }
}

/// `POST /api/v1/webhooks`: where to deliver which events.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WebhookCreate {
    /// `http://` or `https://`, with a host and without a user name or
    /// password; events are POSTed here as JSON.
    #[cfg_attr(
        feature = "openapi",
        schema(pattern = "^[hH][tT][tT][pP][sS]?://", max_length = 2048)
    )]
    pub url: String,
    #[serde(default)]
    pub filter: EventFilter,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WebhookView {
    pub id: i64,
    pub url: String,
    pub filter: EventFilter,
    pub created_at: String,
    pub created_by: String,
    /// Removed webhooks receive nothing more; their deliveries stay listed.
    pub removed_at: Option<String>,
}

/// The answer to [`WebhookCreate`]: the signing secret, shown only here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WebhookCreated {
    pub webhook: WebhookView,
    pub secret: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum DeliveryStatus {
    /// Not delivered yet; tried again at `next_attempt_at`.
    Pending,
    Delivered,
    /// Every attempt failed; not tried again.
    Failed,
}

/// One event's delivery to one webhook, as the delivery log keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DeliveryView {
    pub id: i64,
    pub webhook_id: i64,
    /// `device.committed`, `rollout.paused`, ...
    pub event: String,
    pub status: DeliveryStatus,
    pub attempts: u32,
    pub created_at: String,
    pub next_attempt_at: Option<String>,
    pub delivered_at: Option<String>,
    /// The receiver's status code at the last attempt, if it answered.
    pub last_status: Option<u16>,
    /// Why the last attempt failed.
    pub last_error: Option<WireError>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn committed(device: &str) -> EventAbout {
        EventAbout::Device {
            device_id: device.parse().unwrap(),
            event: DeviceEventKind::Committed {
                version: "1.1".parse().unwrap(),
                slot: "b".parse().unwrap(),
            },
        }
    }

    #[test]
    fn an_event_reads_as_integrators_expect() {
        let event = FleetEvent {
            seq: 7,
            at: "2026-12-05T10:00:00Z".into(),
            about: committed("dev-1"),
        };
        assert_eq!(
            serde_json::to_value(&event).unwrap(),
            serde_json::json!({
                "seq": 7, "at": "2026-12-05T10:00:00Z", "subject": "device", "device_id": "dev-1",
                "event": {"kind": "committed", "version": "1.1", "slot": "b"}
            })
        );
        assert_eq!(event.about.name(), "device.committed");
        let paused = EventAbout::Rollout {
            rollout_id: 3,
            event: RolloutEvent::Paused {
                reason: "paused by bob".into(),
            },
        };
        assert_eq!(paused.name(), "rollout.paused");
    }

    #[test]
    fn a_filter_takes_only_what_matches_every_condition() {
        let rollout = EventAbout::Rollout {
            rollout_id: 3,
            event: RolloutEvent::Finished,
        };
        let all = EventFilter::default();
        assert!(all.matches(&committed("dev-1")) && all.matches(&rollout));
        let devices = EventFilter {
            subject: Some(Subject::Device),
            ..EventFilter::default()
        };
        assert!(devices.matches(&committed("dev-1")) && !devices.matches(&rollout));
        let one = EventFilter {
            device: Some("dev-2".parse().unwrap()),
            ..EventFilter::default()
        };
        assert!(!one.matches(&committed("dev-1")) && one.matches(&committed("dev-2")));
        assert!(
            !one.matches(&rollout),
            "a device filter takes no rollout event"
        );
        let three = EventFilter {
            rollout: Some(3),
            ..EventFilter::default()
        };
        assert!(three.matches(&rollout) && !three.matches(&committed("dev-1")));
    }
}
