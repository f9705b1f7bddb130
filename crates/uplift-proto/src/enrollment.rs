//! Enrollment approval (`[enrollment] mode = "approval"` on the server): a
//! new device that presents a valid enrollment token waits, connected, in a
//! pending list until an operator accepts or rejects it. These are the
//! admin API's bodies for that list and its decisions.

use crate::{DeviceId, DeviceType, HardwareId};
use serde::{Deserialize, Serialize};

/// Where an enrollment request stands.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    Serialize,
    Deserialize,
    strum::IntoStaticStr,
    strum::EnumString,
)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum EnrollmentState {
    /// Waiting for an operator; the device waits connected.
    Pending,
    /// Accepted: the device has its ID and is enrolled.
    Accepted,
    /// Rejected: its key is refused at once until an operator accepts it.
    Rejected,
}

impl EnrollmentState {
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

/// One device's request to enroll, as an operator sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct EnrollmentRequestView {
    pub id: i64,
    pub device_type: DeviceType,
    pub hardware_id: HardwareId,
    /// `SHA256:<hex>` of the device's ed25519 public key; the agent logs
    /// the same when it waits, so an operator can tell the device is the
    /// one at hand.
    pub key_fingerprint: String,
    /// RFC 3339: when it first asked.
    pub requested_at: String,
    pub state: EnrollmentState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_at: Option<String>,
    /// Who decided, as the audit log names callers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_by: Option<String>,
    /// The operator's reason for a rejection, told to the device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The ID an accepted request was given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<DeviceId>,
}

/// `POST /api/v1/enrollments/{id}/reject`: why, for the device and the log.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct EnrollmentRejection {
    /// At most 200 characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Longest rejection reason, in characters.
pub const MAX_REASON_CHARS: usize = 200;

/// Where the admin API lists enrollment requests (`?state=` filters).
pub const ENROLLMENTS_PATH: &str = "/api/v1/enrollments";
