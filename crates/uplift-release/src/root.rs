//! The root of trust: which keys may sign releases, and which may name the
//! next such set, as TUF's root role does (awslabs/tough, the TUF spec's
//! "update the root role"). A device ships with a first root; each later
//! root is signed by a threshold of the keys of the root before it *and* of
//! its own, so release keys are rotated and revoked over the air, and a
//! device that was offline through several rotations walks the chain one
//! version at a time until it holds the newest.
//!
//! Like manifests, a root's signatures cover its JSON text exactly as
//! stored ([`SignedRoot::signed`]), under a context of its own so a root
//! signature is never mistaken for a manifest signature by the same key.
//! Intermediate roots may have expired (a device that was away for a year
//! must still catch up); only the root a device ends on must be current.
//! Everything here is pure: time is passed in.

use crate::error::ReleaseError;
use crate::keys::{ReleasePublicKey, ReleaseSigningKey};
use crate::manifest::{
    envelope_json, in_context, put_signature, signature_in, Manifest, ManifestSignature,
    SignedManifest, MAX_SIGNATURES,
};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use ed25519_dalek::Signature;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

pub const ROOT_FORMAT: u32 = 1;
/// A root is a few keys; anything larger is not one.
pub const MAX_ROOT_BYTES: usize = 64 * 1024;
/// Keys one role may list.
pub const MAX_ROLE_KEYS: usize = 32;

const ROOT_SIGNATURE_CONTEXT: &[u8] = b"uplift root v1\0";

/// What a root says.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Root {
    pub format: u32,
    /// 1 for the first root; each rotation adds one.
    pub version: u64,
    /// RFC 3339; a device whose newest root has expired refuses releases
    /// until it is given a newer root.
    pub expires_at: String,
    /// Who signs the next root.
    pub root: Role,
    /// Who signs releases.
    pub release: Role,
    /// The server's online key(s) that sign each offer's freshness (TUF's
    /// timestamp role, Uptane's director). Absent: offers need none (and
    /// roots made before this role still parse and verify, as the field is
    /// left out of their signed text).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub freshness: Option<Role>,
}

/// Keys and how many of them must sign.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Role {
    pub keys: Vec<ReleasePublicKey>,
    pub threshold: u32,
}

impl Role {
    /// One key, which alone suffices.
    pub fn one(key: ReleasePublicKey) -> Self {
        Self {
            keys: vec![key],
            threshold: 1,
        }
    }
}

/// A root and its signatures.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SignedRoot {
    /// The root's JSON text: exactly the bytes that were signed.
    pub signed: String,
    pub signatures: Vec<ManifestSignature>,
}

/// Which role a signature check was for, in errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoleName {
    Root,
    Release,
    Freshness,
}

impl std::fmt::Display for RoleName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RoleName::Root => "root",
            RoleName::Release => "release",
            RoleName::Freshness => "freshness",
        })
    }
}

fn message(signed: &str) -> Vec<u8> {
    in_context(ROOT_SIGNATURE_CONTEXT, signed)
}

impl Root {
    fn validate(&self) -> Result<(), ReleaseError> {
        let invalid = |reason: String| ReleaseError::RootInvalid {
            version: self.version,
            reason,
        };
        if self.format != ROOT_FORMAT {
            return Err(invalid(format!(
                "format {} is not {ROOT_FORMAT}; this agent is older than the root",
                self.format
            )));
        }
        if self.version == 0 {
            return Err(invalid("versions start at 1".to_owned()));
        }
        parse_time(&self.expires_at)
            .map_err(|e| invalid(format!("expires_at is not RFC 3339: {e}")))?;
        let roles = [
            (RoleName::Root, Some(&self.root)),
            (RoleName::Release, Some(&self.release)),
            (RoleName::Freshness, self.freshness.as_ref()),
        ];
        for (name, role) in roles
            .into_iter()
            .filter_map(|(name, role)| Some((name, role?)))
        {
            let distinct: BTreeSet<String> =
                role.keys.iter().map(ReleasePublicKey::key_id).collect();
            if role.keys.len() > MAX_ROLE_KEYS {
                return Err(invalid(format!(
                    "the {name} role lists {} keys, at most {MAX_ROLE_KEYS}",
                    role.keys.len()
                )));
            }
            if distinct.len() != role.keys.len() {
                return Err(invalid(format!("the {name} role lists a key twice")));
            }
            if role.threshold == 0 || role.threshold as usize > role.keys.len() {
                return Err(invalid(format!(
                    "the {name} role's threshold {} must be between 1 and its {} keys",
                    role.threshold,
                    role.keys.len()
                )));
            }
        }
        Ok(())
    }

    /// Signs this root with `keys` (whoever the roles say must sign).
    pub fn sign(&self, keys: &[&ReleaseSigningKey]) -> Result<SignedRoot, ReleaseError> {
        self.validate()?;
        let signed = serde_json::to_string(self).map_err(|e| ReleaseError::RootFile {
            reason: format!("cannot serialize the root: {e}"),
        })?;
        let mut root = SignedRoot {
            signed,
            signatures: Vec::new(),
        };
        for key in keys {
            root.add_signature(key);
        }
        Ok(root)
    }
}

impl SignedRoot {
    pub fn from_json(bytes: &[u8]) -> Result<Self, ReleaseError> {
        if bytes.len() > MAX_ROOT_BYTES {
            return Err(ReleaseError::RootFile {
                reason: format!("it is {} bytes, at most {MAX_ROOT_BYTES}", bytes.len()),
            });
        }
        serde_json::from_slice(bytes).map_err(|e| ReleaseError::RootFile {
            reason: e.to_string(),
        })
    }

    pub fn to_json(&self) -> Vec<u8> {
        envelope_json(self)
    }

    /// Adds (or replaces) `key`'s signature: each holder of a root key
    /// signs on their own machine, one after the other.
    pub fn add_signature(&mut self, key: &ReleaseSigningKey) {
        put_signature(
            &mut self.signatures,
            signature_in(ROOT_SIGNATURE_CONTEXT, key, &self.signed),
        );
    }

    /// The root it says, unchecked.
    pub fn parse_unverified(&self) -> Result<Root, ReleaseError> {
        if self.signed.len() > MAX_ROOT_BYTES {
            return Err(ReleaseError::RootFile {
                reason: format!(
                    "its text is {} bytes, at most {MAX_ROOT_BYTES}",
                    self.signed.len()
                ),
            });
        }
        let root: Root =
            serde_json::from_str(&self.signed).map_err(|e| ReleaseError::RootFile {
                reason: e.to_string(),
            })?;
        root.validate()?;
        Ok(root)
    }

    /// How many distinct keys of `role` have validly signed (for a key
    /// ceremony's progress: `uplift root sign` says how many are still
    /// needed).
    pub fn valid_signatures(&self, role: &Role) -> usize {
        let signatures = &self.signatures[..self.signatures.len().min(MAX_SIGNATURES)];
        valid_signers(signatures, &role.keys, &message(&self.signed)).len()
    }

    /// Requires `role`'s threshold of distinct keys to have signed.
    fn check_threshold(
        &self,
        role: &Role,
        name: RoleName,
        version: u64,
    ) -> Result<(), ReleaseError> {
        if self.signatures.len() > MAX_SIGNATURES {
            return Err(ReleaseError::RootFile {
                reason: format!(
                    "it carries {} signatures, at most {MAX_SIGNATURES} are accepted",
                    self.signatures.len()
                ),
            });
        }
        let valid = valid_signers(&self.signatures, &role.keys, &message(&self.signed));
        if valid.len() < role.threshold as usize {
            return Err(ReleaseError::RootThreshold {
                version,
                role: name,
                valid: valid.len(),
                threshold: role.threshold,
            });
        }
        Ok(())
    }
}

/// The distinct keys among `keys` whose signature over `message` verifies;
/// a signature by a key not listed, or one that does not verify, counts
/// for nothing (and a key that signs twice counts once).
/// Callers bound the number of signatures first ([`MAX_SIGNATURES`]).
pub(crate) fn valid_signers(
    signatures: &[ManifestSignature],
    keys: &[ReleasePublicKey],
    message: &[u8],
) -> BTreeSet<String> {
    let mut valid = BTreeSet::new();
    for sig in signatures {
        let Some(key) = keys.iter().find(|k| k.key_id() == sig.key_id) else {
            continue;
        };
        let verified = B64
            .decode(&sig.signature)
            .ok()
            .and_then(|bytes| Signature::from_slice(&bytes).ok())
            .is_some_and(|signature| {
                key.verifying_key()
                    .verify_strict(message, &signature)
                    .is_ok()
            });
        if verified {
            valid.insert(sig.key_id.clone());
        }
    }
    valid
}

fn parse_time(text: &str) -> Result<OffsetDateTime, time::error::Parse> {
    OffsetDateTime::parse(text, &Rfc3339)
}

/// The root a device trusts now.
#[derive(Debug, Clone, PartialEq)]
pub struct TrustedRoot {
    root: Root,
    signed: SignedRoot,
}

impl TrustedRoot {
    /// The root a device ships with: trusted because it was put there, but
    /// still required to be well formed and signed by its own root keys (a
    /// typo in the image's root is found before the device leaves the
    /// factory).
    pub fn initial(signed: &SignedRoot) -> Result<Self, ReleaseError> {
        let root = signed.parse_unverified()?;
        signed.check_threshold(&root.root, RoleName::Root, root.version)?;
        Ok(Self {
            root,
            signed: signed.clone(),
        })
    }

    pub fn root(&self) -> &Root {
        &self.root
    }

    /// The signed text, to store as the device's current root.
    pub fn signed(&self) -> &SignedRoot {
        &self.signed
    }

    /// The root after this one, trusted if it is the next version and a
    /// threshold of both this root's root keys and its own signed it.
    /// Expiry is not checked here: a device walks through expired roots to
    /// reach the current one (see [`TrustedRoot::check_current`]).
    pub fn update(&self, next: &SignedRoot) -> Result<Self, ReleaseError> {
        let root = next.parse_unverified()?;
        if root.version != self.root.version + 1 {
            return Err(ReleaseError::RootVersion {
                trusted: self.root.version,
                offered: root.version,
            });
        }
        next.check_threshold(&self.root.root, RoleName::Root, root.version)?;
        next.check_threshold(&root.root, RoleName::Root, root.version)?;
        Ok(Self {
            root,
            signed: next.clone(),
        })
    }

    /// Walks `chain` (the roots after this one, oldest first) and returns
    /// the newest, which must not have expired at `now`. A root the device
    /// already holds is skipped, so the whole chain can always be sent.
    pub fn update_chain(
        &self,
        chain: &[SignedRoot],
        now: OffsetDateTime,
    ) -> Result<Self, ReleaseError> {
        let mut trusted = self.clone();
        for next in chain {
            let version = next.parse_unverified()?.version;
            if version <= trusted.root.version {
                continue;
            }
            trusted = trusted.update(next)?;
        }
        trusted.check_current(now)?;
        Ok(trusted)
    }

    /// Refuses a root that has expired at `now`: a server that can only
    /// offer an old root set cannot keep a device on revoked keys forever.
    pub fn check_current(&self, now: OffsetDateTime) -> Result<(), ReleaseError> {
        let expires = parse_time(&self.root.expires_at).map_err(|e| ReleaseError::RootInvalid {
            version: self.root.version,
            reason: format!("expires_at is not RFC 3339: {e}"),
        })?;
        if now >= expires {
            return Err(ReleaseError::RootExpired {
                version: self.root.version,
                expires_at: self.root.expires_at.clone(),
            });
        }
        Ok(())
    }

    /// A release manifest, checked against this root: signed by the
    /// release role's threshold, well formed, not expired, and this root
    /// still current.
    pub fn verify_release(
        &self,
        manifest: &SignedManifest,
        now: OffsetDateTime,
    ) -> Result<Manifest, ReleaseError> {
        self.check_current(now)?;
        let role = &self.root.release;
        manifest.verify_threshold(&role.keys, role.threshold as usize, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> ReleaseSigningKey {
        ReleaseSigningKey::from_seed([n; 32])
    }

    fn role(keys: &[u8], threshold: u32) -> Role {
        Role {
            keys: keys.iter().map(|n| key(*n).public_key()).collect(),
            threshold,
        }
    }

    fn root(version: u64, root_keys: &[u8], release_keys: &[u8], expires_at: &str) -> Root {
        Root {
            format: ROOT_FORMAT,
            version,
            expires_at: expires_at.to_owned(),
            root: role(root_keys, 2.min(root_keys.len() as u32)),
            release: role(release_keys, 1),
            freshness: None,
        }
    }

    fn signed_by(root: &Root, signers: &[u8]) -> SignedRoot {
        let keys: Vec<ReleaseSigningKey> = signers.iter().map(|n| key(*n)).collect();
        root.sign(&keys.iter().collect::<Vec<_>>()).unwrap()
    }

    fn now() -> OffsetDateTime {
        parse_time("2027-01-01T00:00:00Z").unwrap()
    }

    const LATER: &str = "2030-01-01T00:00:00Z";

    #[test]
    fn a_device_offline_through_three_rotations_catches_up_through_expired_roots() {
        // Root keys 1, 2, 3 (2 of 3); each rotation replaces a root key and
        // the release key, signed by 2 of the old and 2 of the new.
        let v1 = signed_by(&root(1, &[1, 2, 3], &[10], "2026-06-01T00:00:00Z"), &[1, 2]);
        let v2 = signed_by(
            &root(2, &[2, 3, 4], &[11], "2026-09-01T00:00:00Z"),
            &[2, 3, 4],
        );
        let v3 = signed_by(
            &root(3, &[3, 4, 5], &[12], "2026-12-01T00:00:00Z"),
            &[3, 4, 5],
        );
        let v4 = signed_by(&root(4, &[4, 5, 6], &[13], LATER), &[4, 5, 6]);
        let shipped = TrustedRoot::initial(&v1).unwrap();
        let chain = [v1.clone(), v2, v3, v4];
        let newest = shipped.update_chain(&chain, now()).unwrap();
        assert_eq!(newest.root().version, 4);
        assert_eq!(newest.root().release.keys, vec![key(13).public_key()]);
        // What it holds now is the fourth root, and the chain again is a
        // no-op.
        let again = newest.update_chain(&chain, now()).unwrap();
        assert_eq!(again, newest);
    }

    #[test]
    fn a_root_signed_below_the_old_roots_threshold_is_refused() {
        let v1 =
            TrustedRoot::initial(&signed_by(&root(1, &[1, 2, 3], &[10], LATER), &[1, 2])).unwrap();
        // 1 of the old 2-of-3, even with all of the new keys.
        let forged = signed_by(&root(2, &[1, 7, 8], &[66], LATER), &[1, 7, 8]);
        let refused = v1.update(&forged).unwrap_err();
        assert!(
            matches!(
                refused,
                ReleaseError::RootThreshold {
                    valid: 1,
                    threshold: 2,
                    role: RoleName::Root,
                    ..
                }
            ),
            "{refused}"
        );
        assert!(refused.to_string().contains("1 of the 2"), "{refused}");
    }

    #[test]
    fn a_root_its_own_new_keys_did_not_sign_is_refused() {
        let v1 =
            TrustedRoot::initial(&signed_by(&root(1, &[1, 2, 3], &[10], LATER), &[1, 2])).unwrap();
        // The old keys sign a root naming keys nobody proved they hold.
        let unproven = signed_by(&root(2, &[7, 8, 9], &[11], LATER), &[1, 2, 3]);
        assert!(matches!(
            v1.update(&unproven),
            Err(ReleaseError::RootThreshold { valid: 0, .. })
        ));
    }

    #[test]
    fn a_skipped_or_replayed_version_is_refused() {
        let v1 =
            TrustedRoot::initial(&signed_by(&root(1, &[1, 2, 3], &[10], LATER), &[1, 2])).unwrap();
        let v3 = signed_by(&root(3, &[1, 2, 3], &[10], LATER), &[1, 2, 3]);
        assert!(matches!(
            v1.update(&v3),
            Err(ReleaseError::RootVersion {
                trusted: 1,
                offered: 3
            })
        ));
        let v1_again = signed_by(&root(1, &[1, 2, 3], &[66], LATER), &[1, 2, 3]);
        assert!(matches!(
            v1.update(&v1_again),
            Err(ReleaseError::RootVersion { .. })
        ));
    }

    #[test]
    fn the_newest_root_must_be_current_and_an_altered_one_does_not_verify() {
        let v1 = signed_by(&root(1, &[1, 2, 3], &[10], "2026-06-01T00:00:00Z"), &[1, 2]);
        let shipped = TrustedRoot::initial(&v1).unwrap();
        assert!(matches!(
            shipped.update_chain(&[], now()),
            Err(ReleaseError::RootExpired { version: 1, .. })
        ));
        let mut altered = signed_by(&root(2, &[1, 2, 3], &[10], LATER), &[1, 2, 3]);
        altered.signed = altered.signed.replace(
            &key(10).public_key().to_string(),
            &key(66).public_key().to_string(),
        );
        assert!(matches!(
            shipped.update(&altered),
            Err(ReleaseError::RootThreshold { valid: 0, .. })
        ));
    }

    #[test]
    fn a_release_signed_by_one_of_two_required_release_keys_is_refused() {
        let mut two_of_three = root(1, &[1, 2, 3], &[10, 11, 12], LATER);
        two_of_three.release.threshold = 2;
        let trusted = TrustedRoot::initial(&signed_by(&two_of_three, &[1, 2])).unwrap();
        let mut manifest = crate::manifest::tests::two_chunk_manifest();
        manifest.expires_at = LATER.to_owned();
        let mut release = crate::manifest::sign_manifest(&manifest, &key(10)).unwrap();
        // A second signature by a key the root does not list adds nothing.
        release.add_signature(&key(66));
        let refused = trusted.verify_release(&release, now()).unwrap_err();
        assert!(
            matches!(
                refused,
                ReleaseError::ManifestThreshold {
                    valid: 1,
                    threshold: 2
                }
            ),
            "{refused}"
        );
        release.add_signature(&key(12));
        assert_eq!(trusted.verify_release(&release, now()).unwrap(), manifest);
        // A release key the next root drops is refused from then on.
        let rotated = trusted
            .update(&signed_by(&root(2, &[1, 2, 3], &[11], LATER), &[1, 2, 3]))
            .unwrap();
        assert!(matches!(
            rotated.verify_release(&release, now()),
            Err(ReleaseError::UntrustedManifest { .. })
        ));
    }

    #[test]
    fn duplicate_signatures_by_one_key_count_once() {
        let v1 =
            TrustedRoot::initial(&signed_by(&root(1, &[1, 2, 3], &[10], LATER), &[1, 2])).unwrap();
        let mut next = signed_by(&root(2, &[1, 2, 3], &[10], LATER), &[1]);
        let copy = next.signatures[0].clone();
        next.signatures.push(copy);
        assert!(matches!(
            v1.update(&next),
            Err(ReleaseError::RootThreshold { valid: 1, .. })
        ));
    }

    #[test]
    fn roots_that_make_no_sense_are_refused_before_any_signature_is_checked() {
        for (bad, why) in [
            (
                Root {
                    version: 0,
                    ..root(1, &[1], &[10], LATER)
                },
                "versions start at 1",
            ),
            (
                Root {
                    root: role(&[1, 2], 3),
                    ..root(1, &[1], &[10], LATER)
                },
                "threshold 3",
            ),
            (
                Root {
                    release: role(&[10, 10], 1),
                    ..root(1, &[1], &[10], LATER)
                },
                "twice",
            ),
            (
                Root {
                    freshness: Some(role(&[5], 0)),
                    ..root(1, &[1], &[10], LATER)
                },
                "the freshness role's threshold 0",
            ),
            (
                Root {
                    expires_at: "soon".into(),
                    ..root(1, &[1], &[10], LATER)
                },
                "RFC 3339",
            ),
        ] {
            let refused = bad.sign(&[&key(1)]).unwrap_err();
            assert!(refused.to_string().contains(why), "{refused}");
        }
    }
}
