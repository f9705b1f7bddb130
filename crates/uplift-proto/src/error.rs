//! Stable error kinds: the machine-readable half of every error that crosses
//! a process boundary (device channel, REST API, agent reports).
//!
//! Kinds are part of the wire protocol: add new ones, never rename.

use serde::{Deserialize, Serialize};
use std::fmt;

/// What went wrong, as a stable snake_case string on the wire.
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
    strum::EnumIter,
)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum ErrorKind {
    // --- requests and frames
    BadRequest,
    MalformedFrame,
    FrameTooLarge,
    UnsupportedProtocol,
    UnexpectedMessage,
    PayloadTooLarge,
    NotFound,
    Conflict,
    // --- authentication
    Unauthorized,
    EnrollmentRefused,
    /// An operator rejected this device's enrollment request (approval
    /// mode); its key is refused until an operator accepts it.
    EnrollmentRejected,
    UnknownDevice,
    BadDeviceSignature,
    /// The device was removed (decommissioned) by an operator: its key is
    /// revoked. A replaced board enrolls afresh with a new key.
    DeviceRemoved,
    /// The caller is known, but its role does not allow this.
    Forbidden,
    /// A device download token that is not one the server signed: malformed,
    /// signed with a key the server does not hold, altered, or of a device
    /// that is not enrolled.
    DownloadTokenInvalid,
    /// A device download token past its expiry; the channel brings a fresh one.
    DownloadTokenExpired,
    // --- releases and downloads (reported by agents)
    ManifestSignature,
    ManifestInvalid,
    ManifestExpired,
    /// A root of trust that does not parse, makes no sense, or is not the
    /// next version.
    RootInvalid,
    /// A root of trust not signed by the threshold of keys it needs.
    RootSignature,
    /// The device's newest root of trust has expired.
    RootExpired,
    /// An offer whose signed freshness is missing (the device's root
    /// requires it), badly signed, or for another device or manifest.
    FreshnessInvalid,
    /// An offer whose signed freshness has expired.
    FreshnessExpired,
    /// An offer whose freshness is older than one the device already
    /// accepted: a replay.
    FreshnessReplayed,
    WrongDeviceType,
    VersionMismatch,
    DowngradeRefused,
    /// A rollout asked to downgrade to a release whose signed manifest does
    /// not allow it to replace newer versions (`may_replace_up_to`).
    DowngradeNotSigned,
    ChunkHashMismatch,
    ImageHashMismatch,
    DownloadFailed,
    /// The device could not reach the server at all (no connection).
    ServerUnreachable,
    SlotTooSmall,
    SlotIo,
    BootEnv,
    HealthCheckFailed,
    RolledBack,
    /// A pre- or post-install hook on the device failed.
    HookFailed,
    // --- server side
    Storage,
    /// The object store holding chunks (`[artifacts] backend = "s3"`) did
    /// not answer or refused; passing, so devices retry.
    ObjectStoreUnavailable,
    /// A chunk stored on the server does not match its hash (damaged on the
    /// server's disk); the operator repairs it with `uplift release upload`.
    StoredChunkDamaged,
    /// The server is at its budget for this kind of request; try again later.
    ServerBusy,
    Internal,
    /// A webhook's receiver did not take a delivery (no answer, or not 2xx).
    WebhookFailed,
    /// A kind this build does not know (sent by a newer peer).
    #[serde(other)]
    Unknown,
}

impl ErrorKind {
    /// The wire name, as serde writes it (strum derives it from the same
    /// `snake_case` rule; a test checks every kind against serde).
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error as it travels: a stable kind plus a sentence for a person that
/// says what failed, on what, and what to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WireError {
    pub kind: ErrorKind,
    pub message: String,
}

impl WireError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)
    }
}

impl std::error::Error for WireError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_round_trips_as_its_wire_name() {
        use strum::IntoEnumIterator as _;
        assert_eq!(ErrorKind::ChunkHashMismatch.as_str(), "chunk_hash_mismatch");
        assert_eq!(ErrorKind::BootEnv.as_str(), "boot_env");
        for kind in ErrorKind::iter().filter(|k| *k != ErrorKind::Unknown) {
            let json = serde_json::to_string(&kind).unwrap();
            assert_eq!(json, format!("\"{}\"", kind.as_str()));
            assert_eq!(serde_json::from_str::<ErrorKind>(&json).unwrap(), kind);
        }
    }

    #[test]
    fn a_kind_from_a_newer_peer_decodes_as_unknown() {
        let kind: ErrorKind = serde_json::from_str("\"quantum_flux\"").unwrap();
        assert_eq!(kind, ErrorKind::Unknown);
    }
}
