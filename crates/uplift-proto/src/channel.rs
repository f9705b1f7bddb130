//! The device channel: one long-lived WebSocket (over TLS) per device,
//! carrying JSON text frames that hold only that device's traffic.
//!
//! Every frame is an object with the protocol version `v` and a `type`.
//! Frames larger than [`MAX_FRAME_BYTES`] are refused before parsing.
//!
//! ```text
//! server -> agent  challenge {nonce}
//! agent  -> server enroll {device_type, hardware_id, token, public_key, signature}
//!                | authenticate {device_id, signature}
//! server -> agent  welcome {device_id, session_token}  | error {kind, message}
//! agent  -> server report {...}          (at once, then on every change)
//! server -> agent  offer {...} | no_update (at once, then whenever the target changes)
//! server -> agent  download_token {token, expires_in_secs} (before the last one expires;
//!                  only to agents that list `token_renewal`)
//! ```
//!
//! The version `v` stays 1 while the protocol grows compatibly: a new field
//! is optional with a default an older peer's meaning, and a behaviour an
//! older peer would misread (an offer that holds the reboot) is used only
//! when the peer announced it understands it: each side lists its
//! [`Feature`]s in its first frame (`enroll`/`authenticate`, `welcome`).
//! A peer that lists none is an older build and is spoken to as one.

use crate::error::{ErrorKind, WireError};
use crate::names::{DeviceId, DeviceType, HardwareId, SlotName, Version};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// The one protocol version this build speaks.
pub const PROTOCOL_VERSION: u32 = 1;
/// Upper bound for one frame in either direction.
pub const MAX_FRAME_BYTES: usize = 64 * 1024;
/// HTTP path of the device channel (WebSocket upgrade).
pub const CHANNEL_PATH: &str = "/v1/device/channel";
/// Domain separator for the device's proof of key possession.
const AUTH_CONTEXT: &[u8] = b"uplift device auth v1\0";

/// The bytes a device signs to prove it holds its key: a context string, the
/// server's fresh nonce, and what it claims to be (its public key when
/// enrolling, its device ID afterwards), so a signature cannot be replayed on
/// another connection or for another identity.
pub fn auth_message(nonce: &[u8], claimed_identity: &str) -> Vec<u8> {
    let mut msg = Vec::with_capacity(AUTH_CONTEXT.len() + nonce.len() + claimed_identity.len() + 1);
    msg.extend_from_slice(AUTH_CONTEXT);
    msg.extend_from_slice(nonce);
    msg.push(0);
    msg.extend_from_slice(claimed_identity.as_bytes());
    msg
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMsg {
    /// First frame on every connection: a fresh nonce (hex) to sign.
    Challenge { nonce: String },
    /// Authentication succeeded. `session_token` is a signed download token:
    /// it authorizes this device's HTTPS downloads on any replica until it
    /// expires (minutes); the server sends a fresh one ([`ServerMsg::DownloadToken`])
    /// before it does, and a new one on every connection.
    Welcome {
        device_id: DeviceId,
        session_token: String,
        enrolled: bool,
        /// What this server understands beyond protocol version 1's start.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        features: Vec<Feature>,
        /// The device's private-network addresses, one per pool the server
        /// assigns from (`[addresses] pool`), in CIDR form with the pool's
        /// prefix (`10.77.0.5/16`, `fd77::5/64`), IPv4 first: the device
        /// and server communicate over them once the agent's
        /// `address_hook` has set them up. Stable across reconnects and
        /// restarts. Absent from an older server or one without pools; an
        /// older agent ignores it.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        private_addresses: Vec<String>,
    },
    /// The version this device should run.
    Offer(Offer),
    /// No rollout targets this device (any earlier offer is withdrawn).
    NoUpdate,
    /// A fresh download token, replacing the one from `welcome` (or the
    /// last one of these), sent while that one is still valid. Sent only to
    /// agents that list [`Feature::TokenRenewal`]; an older agent's channel
    /// is instead closed before its token expires, and it reconnects.
    DownloadToken {
        token: String,
        /// Seconds the token is valid from now (informational: the server
        /// decides, and sends the next one before it runs out).
        expires_in_secs: u64,
    },
    /// The server refuses something; on authentication errors it then closes.
    Error(WireError),
    /// The enrollment waits for an operator (the server's approval mode):
    /// sent when the device's request enters or is found in the pending
    /// list, then every few seconds while it waits, until a `welcome` (it
    /// was accepted) or an `error` (`enrollment_rejected`). Sent only to
    /// agents that list [`Feature::EnrollmentApproval`]; an older agent
    /// waits for its welcome without it, and reconnects when it times out.
    EnrollmentPending {
        /// What the operator is asked to do, for the device's log.
        message: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Offer {
    pub rollout_id: i64,
    pub version: Version,
    /// Path on the server of the signed manifest. Informational: agents
    /// fetch [`crate::api::device_manifest_path`] of `version`, never a path
    /// from the wire, so a forged offer cannot send the device's session
    /// token elsewhere.
    pub manifest_path: String,
    /// The operator explicitly allowed installing an older version.
    pub allow_downgrade: bool,
    /// Download rate cap for this rollout, per device (bytes/s); the agent
    /// keeps to the lower of this and its own `[download] max_bytes_per_sec`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bytes_per_sec: Option<u64>,
    /// Write and verify the release, then keep it pending: do not switch
    /// the boot environment to it or reboot until an offer of the same
    /// version without this flag (the go) arrives; `no_update` or an offer
    /// of another version withdraws it. Sent only to agents that list
    /// [`Feature::HoldReboot`] (an older agent would reboot at once).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub hold_reboot: bool,
    /// The server's signed word that this offer is current, for this device
    /// and this manifest (see `uplift_release::freshness`). Sent by a
    /// server with an online freshness key; an older agent ignores it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub freshness: Option<crate::trust::SignedFreshness>,
}

impl Offer {
    /// Whether `other` offers the same thing, whatever it says about the
    /// reboot: a change of only `hold_reboot` is a go (or a hold), not a
    /// new offer; nor is a freshly signed freshness record for it.
    pub fn same_release(&self, other: &Offer) -> bool {
        Offer {
            hold_reboot: other.hold_reboot,
            freshness: other.freshness.clone(),
            ..self.clone()
        } == *other
    }
}

/// Something a peer understands beyond protocol version 1 as first
/// released. Unknown names (from a newer peer) are kept as
/// [`Feature::Unknown`] and mean nothing here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Feature {
    /// Offers with `hold_reboot`, and the `awaiting_reboot` state.
    HoldReboot,
    /// `download_token` frames renewing the download token on an open channel.
    TokenRenewal,
    /// `enrollment_pending` frames while an enrollment waits for an operator.
    EnrollmentApproval,
    #[serde(other)]
    Unknown,
}

/// What this build understands; both sides announce it.
pub const FEATURES: &[Feature] = &[
    Feature::HoldReboot,
    Feature::TokenRenewal,
    Feature::EnrollmentApproval,
];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AgentMsg {
    Enroll {
        device_type: DeviceType,
        hardware_id: HardwareId,
        token: String,
        /// ed25519 public key, base64.
        public_key: String,
        /// Signature (base64) over [`auth_message`]`(nonce, public_key)`.
        signature: String,
        /// What this agent understands beyond protocol version 1's start.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        features: Vec<Feature>,
    },
    Authenticate {
        device_id: DeviceId,
        /// Signature (base64) over [`auth_message`]`(nonce, device_id)`.
        signature: String,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        features: Vec<Feature>,
    },
    Report(Report),
}

/// What the agent is doing; the server keeps the latest one per device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum AgentState {
    /// Running its version, nothing to do.
    Idle,
    Downloading,
    Verifying,
    /// New version written to the inactive slot and set to be tried on the
    /// next boot.
    RebootPending,
    /// New version written to the inactive slot and verified; the boot
    /// environment does not point at it and the agent waits for the
    /// server's go (an offer without `hold_reboot`) to reboot into it.
    AwaitingReboot,
    /// Booted the trial slot; running the health check before committing.
    Testing,
    /// The last attempt failed; see `error`. The device runs `running_version`.
    Failed,
    /// The trial slot failed and the device is back on its previous slot.
    RolledBack,
}

impl AgentState {
    pub fn as_str(self) -> &'static str {
        match self {
            AgentState::Idle => "idle",
            AgentState::Downloading => "downloading",
            AgentState::Verifying => "verifying",
            AgentState::RebootPending => "reboot_pending",
            AgentState::AwaitingReboot => "awaiting_reboot",
            AgentState::Testing => "testing",
            AgentState::Failed => "failed",
            AgentState::RolledBack => "rolled_back",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub state: AgentState,
    pub running_version: Version,
    pub booted_slot: SlotName,
    /// The version the agent is working towards, if any.
    pub target_version: Option<Version>,
    pub progress: Option<Progress>,
    pub error: Option<WireError>,
}

impl Report {
    /// The report as a server that lists `features` can read it. A server
    /// without [`Feature::HoldReboot`] (one downgraded while this agent held
    /// a verified slot) does not know `awaiting_reboot` and would refuse the
    /// frame; to it the agent is still `verifying`, the nearest state it
    /// knows (written, not yet switched). Its next offer decides.
    pub fn for_server(mut self, features: &[Feature]) -> Report {
        if self.state == AgentState::AwaitingReboot && !features.contains(&Feature::HoldReboot) {
            self.state = AgentState::Verifying;
        }
        self
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Progress {
    pub done_bytes: u64,
    pub total_bytes: u64,
    /// Bytes actually fetched from the server in this attempt (the rest were
    /// already on the device).
    pub fetched_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {size} bytes exceeds the limit of {MAX_FRAME_BYTES} bytes")]
    TooLarge { size: usize },
    #[error("frame is not a JSON object with a protocol version 'v': {0}")]
    Malformed(String),
    #[error("frame speaks protocol version {got}, this build speaks {PROTOCOL_VERSION}; upgrade the older side")]
    UnsupportedVersion { got: u64 },
    #[error("frame's message is not understood: {0}")]
    UnknownMessage(String),
}

impl FrameError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            FrameError::TooLarge { .. } => ErrorKind::FrameTooLarge,
            FrameError::Malformed(_) => ErrorKind::MalformedFrame,
            FrameError::UnsupportedVersion { .. } => ErrorKind::UnsupportedProtocol,
            FrameError::UnknownMessage(_) => ErrorKind::MalformedFrame,
        }
    }

    pub fn to_wire(&self) -> WireError {
        WireError::new(self.kind(), self.to_string())
    }
}

/// Encodes a message as one text frame.
pub fn encode<T: Serialize>(msg: &T) -> String {
    let mut value = serde_json::to_value(msg).expect("channel messages always serialize");
    if let serde_json::Value::Object(map) = &mut value {
        map.insert("v".to_owned(), PROTOCOL_VERSION.into());
    }
    value.to_string()
}

/// Decodes one text frame, checking size and protocol version first.
pub fn decode<T: DeserializeOwned>(frame: &str) -> Result<T, FrameError> {
    if frame.len() > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge { size: frame.len() });
    }
    let mut value: serde_json::Value =
        serde_json::from_str(frame).map_err(|e| FrameError::Malformed(e.to_string()))?;
    let map = value
        .as_object_mut()
        .ok_or_else(|| FrameError::Malformed("not a JSON object".to_owned()))?;
    match map.remove("v").and_then(|v| v.as_u64()) {
        Some(v) if v == u64::from(PROTOCOL_VERSION) => {}
        Some(got) => return Err(FrameError::UnsupportedVersion { got }),
        None => {
            return Err(FrameError::Malformed(
                "missing protocol version 'v'".to_owned(),
            ))
        }
    }
    serde_json::from_value(value).map_err(|e| FrameError::UnknownMessage(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An offer of 1.1 in rollout 7, as an older server sends it.
    fn offer() -> Offer {
        Offer {
            rollout_id: 7,
            version: "1.1".parse().unwrap(),
            manifest_path: "/v1/device/releases/1.1/manifest".into(),
            allow_downgrade: false,
            max_bytes_per_sec: None,
            hold_reboot: false,
            freshness: None,
        }
    }

    #[test]
    fn freshness_is_ignored_by_an_older_agent_and_does_not_make_a_new_offer() {
        let fresh = Offer {
            freshness: Some(crate::trust::SignedFreshness {
                signed: "{}".into(),
                signatures: Vec::new(),
            }),
            ..offer()
        };
        let frame = encode(&ServerMsg::Offer(fresh.clone()));
        // An older agent's offer: the same fields but freshness.
        #[derive(Deserialize)]
        #[allow(dead_code)]
        struct OldOffer {
            rollout_id: i64,
            version: Version,
            manifest_path: String,
            allow_downgrade: bool,
        }
        #[derive(Deserialize)]
        #[serde(tag = "type", rename_all = "snake_case")]
        enum OldMsg {
            Offer(OldOffer),
        }
        let OldMsg::Offer(old) = serde_json::from_str(&frame).unwrap();
        assert_eq!(old.rollout_id, 7);
        assert!(fresh.same_release(&offer()) && offer().same_release(&fresh));
    }

    #[test]
    fn messages_round_trip_with_version() {
        let msg = ServerMsg::Offer(offer());
        let frame = encode(&msg);
        assert!(frame.contains("\"v\":1"), "{frame}");
        assert!(
            !frame.contains("hold_reboot"),
            "an older agent's offer: {frame}"
        );
        assert_eq!(decode::<ServerMsg>(&frame).unwrap(), msg);
    }

    #[test]
    fn features_are_optional_both_ways_and_unknown_ones_are_kept_as_unknown() {
        // An older agent's hello, without features, is read as having none.
        let old = r#"{"v":1,"type":"authenticate","device_id":"dev-1","signature":"c2ln"}"#;
        let AgentMsg::Authenticate { features, .. } = decode::<AgentMsg>(old).unwrap() else {
            panic!("an authenticate frame")
        };
        assert!(features.is_empty());
        // A newer agent's feature this build does not know is not an error.
        let newer = r#"{"v":1,"type":"authenticate","device_id":"dev-1","signature":"c2ln",
            "features":["hold_reboot","teleport"]}"#;
        let AgentMsg::Authenticate { features, .. } = decode::<AgentMsg>(newer).unwrap() else {
            panic!("an authenticate frame")
        };
        assert_eq!(features, vec![Feature::HoldReboot, Feature::Unknown]);
        // An older server's welcome says nothing about features.
        let welcome =
            r#"{"v":1,"type":"welcome","device_id":"dev-1","session_token":"t","enrolled":false}"#;
        assert!(matches!(
            decode::<ServerMsg>(welcome).unwrap(),
            ServerMsg::Welcome { features, private_addresses, .. }
                if features.is_empty() && private_addresses.is_empty()
        ));
    }

    #[test]
    fn private_addresses_travel_in_the_welcome_and_are_left_out_when_there_are_none() {
        let welcome = |private_addresses: Vec<String>| ServerMsg::Welcome {
            device_id: "dev-1".parse().unwrap(),
            session_token: "t".into(),
            enrolled: true,
            features: FEATURES.to_vec(),
            private_addresses,
        };
        let none = encode(&welcome(vec![]));
        assert!(!none.contains("private_addresses"), "{none}");
        let both = vec!["10.77.0.5/16".to_owned(), "fd77::5/64".to_owned()];
        let frame = encode(&welcome(both.clone()));
        assert_eq!(decode::<ServerMsg>(&frame).unwrap(), welcome(both));
        // An older agent's decoder (a struct without the field, like this
        // build's without it) ignores it: serde skips unknown fields here.
        #[derive(serde::Deserialize)]
        #[allow(dead_code)]
        struct OldWelcome {
            device_id: String,
            session_token: String,
            enrolled: bool,
        }
        let old: OldWelcome = serde_json::from_str(&frame).unwrap();
        assert!(old.enrolled);
    }

    #[test]
    fn a_held_offer_differs_from_the_go_only_in_its_flag() {
        let go = offer();
        let held = Offer {
            hold_reboot: true,
            ..go.clone()
        };
        let frame = encode(&ServerMsg::Offer(held.clone()));
        assert!(frame.contains("\"hold_reboot\":true"), "{frame}");
        assert!(held.same_release(&go) && go.same_release(&held));
        let other = Offer {
            rollout_id: 8,
            ..go.clone()
        };
        assert!(!held.same_release(&other));
    }

    #[test]
    fn a_server_without_the_feature_is_told_verifying_instead_of_awaiting_reboot() {
        let report = Report {
            state: AgentState::AwaitingReboot,
            running_version: "1.0".parse().unwrap(),
            booted_slot: SlotName::A,
            target_version: Some("1.1".parse().unwrap()),
            progress: None,
            error: None,
        };
        assert_eq!(report.clone().for_server(&[]).state, AgentState::Verifying);
        assert_eq!(
            report.for_server(FEATURES).state,
            AgentState::AwaitingReboot
        );
        assert!(encode(&AgentMsg::Report(Report {
            state: AgentState::AwaitingReboot,
            running_version: "1.0".parse().unwrap(),
            booted_slot: SlotName::A,
            target_version: None,
            progress: None,
            error: None,
        }))
        .contains("\"state\":\"awaiting_reboot\""));
    }

    #[test]
    fn a_frame_from_a_future_protocol_is_refused_with_its_version() {
        let err = decode::<AgentMsg>(r#"{"v":99,"type":"report"}"#).unwrap_err();
        assert_eq!(err, FrameError::UnsupportedVersion { got: 99 });
        assert_eq!(err.kind(), ErrorKind::UnsupportedProtocol);
    }

    #[test]
    fn oversized_truncated_and_unknown_frames_are_refused() {
        let big = format!(
            r#"{{"v":1,"type":"report","pad":"{}"}}"#,
            "x".repeat(MAX_FRAME_BYTES)
        );
        assert!(matches!(
            decode::<AgentMsg>(&big),
            Err(FrameError::TooLarge { .. })
        ));
        assert!(matches!(
            decode::<AgentMsg>(r#"{"v":1,"type":"rep"#),
            Err(FrameError::Malformed(_))
        ));
        assert!(matches!(
            decode::<AgentMsg>(r#"{"v":1,"type":"launch_missiles"}"#),
            Err(FrameError::UnknownMessage(_))
        ));
        assert!(matches!(
            decode::<AgentMsg>("[1,2]"),
            Err(FrameError::Malformed(_))
        ));
    }

    #[test]
    fn a_signature_is_bound_to_nonce_and_identity() {
        assert_ne!(auth_message(b"n1", "dev-1"), auth_message(b"n2", "dev-1"));
        assert_ne!(auth_message(b"n1", "dev-1"), auth_message(b"n1", "dev-2"));
    }
}
