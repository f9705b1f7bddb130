//! Signed freshness on offers (TUF's timestamp role, Uptane's director):
//! for every offer it sends, the server signs with its online key a small
//! record binding the device, the release version, the digest of the
//! manifest, and a short validity (an hour by default). A device whose
//! root names a `freshness` role refuses an offer whose record is missing,
//! not signed by that role's threshold, expired, for another device or
//! another manifest, or issued before the newest record it has already
//! accepted. So a network or a server without the online key cannot replay
//! an old offer to hold a device on an old release (freeze); a server whose
//! online key leaks can at worst offer again what the release keys signed.
//!
//! Everything here is pure: time is passed in.

use crate::error::ReleaseError;
use crate::keys::ReleaseSigningKey;
use crate::manifest::{put_signature, signature_in, ManifestSignature, SignedManifest};
use crate::root::{valid_signers, Role};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use uplift_proto::trust::{FreshnessSignature, SignedFreshness};

pub const FRESHNESS_FORMAT: u32 = 1;
const FRESHNESS_CONTEXT: &[u8] = b"uplift freshness v1\0";
/// A record is a few short fields; anything larger is not one.
pub const MAX_FRESHNESS_BYTES: usize = 4096;
/// Signatures one record may carry.
const MAX_FRESHNESS_SIGNATURES: usize = 8;

/// What the server vouches for, for one offer.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Freshness {
    pub format: u32,
    pub device_id: String,
    pub version: String,
    /// [`manifest_digest`] of the offered release's manifest.
    pub manifest_sha256: String,
    /// RFC 3339, with sub-second precision so two offers in one second are
    /// ordered.
    pub issued_at: String,
    pub expires_at: String,
}

/// The digest a freshness record names: SHA-256 (hex) of the manifest's
/// signed text, so it does not change when a signature is added.
pub fn manifest_digest(manifest: &SignedManifest) -> String {
    hex::encode(Sha256::digest(manifest.signed.as_bytes()))
}

/// What the device expects a record to say.
#[derive(Debug, Clone, Copy)]
pub struct Expected<'a> {
    pub device_id: &'a str,
    pub version: &'a str,
    pub manifest_sha256: &'a str,
}

fn to_wire(signature: ManifestSignature) -> FreshnessSignature {
    FreshnessSignature {
        key_id: signature.key_id,
        signature: signature.signature,
    }
}

fn from_wire(signature: &FreshnessSignature) -> ManifestSignature {
    ManifestSignature {
        key_id: signature.key_id.clone(),
        signature: signature.signature.clone(),
    }
}

fn message(signed: &str) -> Vec<u8> {
    crate::manifest::in_context(FRESHNESS_CONTEXT, signed)
}

pub fn format_time(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_else(|_| t.to_string())
}

fn parse_time(what: &str, text: &str) -> Result<OffsetDateTime, ReleaseError> {
    OffsetDateTime::parse(text, &Rfc3339).map_err(|e| ReleaseError::FreshnessInvalid {
        reason: format!("its {what} {text:?} is not RFC 3339: {e}"),
    })
}

impl Freshness {
    /// Signs the record with the server's online key.
    pub fn sign(&self, key: &ReleaseSigningKey) -> SignedFreshness {
        let signed = serde_json::to_string(self).expect("strings always serialize");
        let mut signatures = Vec::new();
        put_signature(
            &mut signatures,
            signature_in(FRESHNESS_CONTEXT, key, &signed),
        );
        SignedFreshness {
            signed,
            signatures: signatures.into_iter().map(to_wire).collect(),
        }
    }
}

/// Checks an offer's freshness against the device's root's freshness
/// `role`, what the device expects, the issue time of the newest record it
/// has accepted, and `now`; returns the record, to be remembered as the
/// newest accepted. Pure.
pub fn check(
    offered: Option<&SignedFreshness>,
    role: &Role,
    expected: Expected<'_>,
    newest_accepted: Option<OffsetDateTime>,
    now: OffsetDateTime,
) -> Result<(Freshness, OffsetDateTime), ReleaseError> {
    let offered = offered.ok_or(ReleaseError::FreshnessMissing)?;
    if offered.signed.len() > MAX_FRESHNESS_BYTES
        || offered.signatures.len() > MAX_FRESHNESS_SIGNATURES
    {
        return Err(ReleaseError::FreshnessInvalid {
            reason: format!(
                "it is larger than a record may be ({} bytes, {} signatures)",
                offered.signed.len(),
                offered.signatures.len()
            ),
        });
    }
    let signatures: Vec<ManifestSignature> = offered.signatures.iter().map(from_wire).collect();
    let valid = valid_signers(&signatures, &role.keys, &message(&offered.signed)).len();
    if valid < role.threshold as usize {
        return Err(ReleaseError::FreshnessSignature {
            valid,
            threshold: role.threshold,
            seen: offered
                .signatures
                .iter()
                .map(|s| s.key_id.clone())
                .collect(),
        });
    }
    let record: Freshness =
        serde_json::from_str(&offered.signed).map_err(|e| ReleaseError::FreshnessInvalid {
            reason: e.to_string(),
        })?;
    if record.format != FRESHNESS_FORMAT {
        return Err(ReleaseError::FreshnessInvalid {
            reason: format!("format {} is not {FRESHNESS_FORMAT}", record.format),
        });
    }
    for (what, said, wanted) in [
        ("device", &record.device_id, expected.device_id),
        ("release version", &record.version, expected.version),
        (
            "manifest",
            &record.manifest_sha256,
            expected.manifest_sha256,
        ),
    ] {
        if said != wanted {
            return Err(ReleaseError::FreshnessMismatch {
                what,
                said: said.clone(),
                wanted: wanted.to_owned(),
            });
        }
    }
    let issued_at = parse_time("issued_at", &record.issued_at)?;
    let expires_at = parse_time("expires_at", &record.expires_at)?;
    if now >= expires_at {
        return Err(ReleaseError::FreshnessExpired {
            expires_at: record.expires_at.clone(),
            now: format_time(now),
        });
    }
    if let Some(newest) = newest_accepted.filter(|newest| issued_at < *newest) {
        return Err(ReleaseError::FreshnessReplayed {
            issued_at: record.issued_at.clone(),
            newest: format_time(newest),
        });
    }
    Ok((record, issued_at))
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::Duration;

    fn key(n: u8) -> ReleaseSigningKey {
        ReleaseSigningKey::from_seed([n; 32])
    }

    fn role() -> Role {
        Role::one(key(40).public_key())
    }

    fn at(minutes: i64) -> OffsetDateTime {
        OffsetDateTime::parse("2027-01-01T00:00:00Z", &Rfc3339).unwrap()
            + Duration::minutes(minutes)
    }

    fn record(device: &str, issued: i64) -> Freshness {
        Freshness {
            format: FRESHNESS_FORMAT,
            device_id: device.into(),
            version: "1.1".into(),
            manifest_sha256: "ab".repeat(32),
            issued_at: format_time(at(issued)),
            expires_at: format_time(at(issued + 60)),
        }
    }

    fn expected(device: &str) -> Expected<'_> {
        Expected {
            device_id: device,
            version: "1.1",
            manifest_sha256: "abababababababababababababababababababababababababababababababab",
        }
    }

    fn checked(
        offered: Option<&SignedFreshness>,
        newest: Option<i64>,
        now: i64,
    ) -> Result<(Freshness, OffsetDateTime), ReleaseError> {
        check(offered, &role(), expected("dev-a"), newest.map(at), at(now))
    }

    #[test]
    fn a_current_record_for_this_device_and_manifest_is_accepted() {
        let signed = record("dev-a", 0).sign(&key(40));
        let (accepted, issued) = checked(Some(&signed), None, 10).unwrap();
        assert_eq!((accepted.device_id.as_str(), issued), ("dev-a", at(0)));
        // The same record again (a reconnect) is not older than itself.
        assert!(checked(Some(&signed), Some(0), 10).is_ok());
    }

    #[test]
    fn an_offer_without_freshness_is_refused_when_the_root_requires_it() {
        let err = checked(None, None, 0).unwrap_err();
        assert!(matches!(err, ReleaseError::FreshnessMissing), "{err}");
    }

    #[test]
    fn an_offer_with_expired_freshness_is_refused() {
        let signed = record("dev-a", 0).sign(&key(40));
        let err = checked(Some(&signed), None, 60).unwrap_err();
        assert!(
            matches!(err, ReleaseError::FreshnessExpired { .. }),
            "{err}"
        );
    }

    #[test]
    fn an_offer_with_freshness_for_another_device_is_refused() {
        let signed = record("dev-b", 0).sign(&key(40));
        let err = checked(Some(&signed), None, 1).unwrap_err();
        assert!(err.to_string().contains("for device dev-b"), "{err}");
    }

    #[test]
    fn an_offer_with_freshness_for_another_manifest_is_refused() {
        let mut other = record("dev-a", 0);
        other.manifest_sha256 = "cd".repeat(32);
        let err = checked(Some(&other.sign(&key(40))), None, 1).unwrap_err();
        assert!(err.to_string().contains("for manifest cdcd"), "{err}");
    }

    #[test]
    fn a_replayed_old_offer_after_a_newer_one_is_refused() {
        let old = record("dev-a", 0).sign(&key(40));
        let err = checked(Some(&old), Some(5), 10).unwrap_err();
        assert!(
            matches!(err, ReleaseError::FreshnessReplayed { .. }),
            "{err}"
        );
    }

    #[test]
    fn freshness_signed_by_another_key_or_altered_is_refused() {
        let forged = record("dev-a", 0).sign(&key(41));
        let err = checked(Some(&forged), None, 1).unwrap_err();
        assert!(
            matches!(err, ReleaseError::FreshnessSignature { valid: 0, .. }),
            "{err}"
        );
        let mut altered = record("dev-a", 0).sign(&key(40));
        altered.signed = altered.signed.replace("dev-a", "dev-b");
        let err = check(Some(&altered), &role(), expected("dev-b"), None, at(1)).unwrap_err();
        assert!(
            matches!(err, ReleaseError::FreshnessSignature { .. }),
            "{err}"
        );
    }
}
