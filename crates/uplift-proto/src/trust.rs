//! The root of trust and offer freshness on the wire: the admin API's
//! root endpoints, the device's download of the root chain, and the signed
//! freshness record an offer carries. The signed texts are opaque here
//! (their meaning and checks are in `uplift-release`): this crate holds no
//! crypto.

use serde::{Deserialize, Serialize};

/// `GET` lists the published roots ([`RootView`]); `POST` publishes the
/// next one (a signed root's JSON, as `uplift root` writes it).
pub const ROOTS_PATH: &str = "/api/v1/roots";

/// Roots a device may be sent in one answer; it asks again from the last
/// one it got until an answer is shorter.
pub const MAX_ROOTS_PER_ANSWER: usize = 16;

/// Device download of the published roots after version `after`, oldest
/// first, as a JSON array of signed roots (at most
/// [`MAX_ROOTS_PER_ANSWER`]).
pub fn device_roots_path(after: u64) -> String {
    format!("/v1/device/roots?after={after}")
}

/// The query of [`device_roots_path`].
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RootsAfter {
    pub after: u64,
}

/// A published root as the admin API lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RootView {
    pub version: u64,
    /// RFC 3339.
    pub expires_at: String,
    /// Key ids of the root role, and how many of them sign the next root.
    pub root_keys: Vec<String>,
    pub root_threshold: u32,
    /// Key ids of the release role, and how many of them sign a release.
    pub release_keys: Vec<String>,
    pub release_threshold: u32,
    /// Key ids of the freshness role (the server's online key), if the
    /// root requires signed freshness on offers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub freshness_keys: Vec<String>,
    /// Key ids that signed it.
    pub signed_by: Vec<String>,
    /// RFC 3339; who published it, as the audit log names callers.
    pub published_at: String,
    pub published_by: String,
}

/// The server's signed word that an offer is current (TUF's timestamp
/// role, Uptane's director): `signed` is the JSON text of the record
/// (device, version, manifest digest, issue and expiry times), exactly as
/// signed by the server's online freshness key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedFreshness {
    pub signed: String,
    pub signatures: Vec<FreshnessSignature>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FreshnessSignature {
    /// Key id of the signer (as release keys are named).
    pub key_id: String,
    /// ed25519 signature, standard base64.
    pub signature: String,
}
