//! Signs every offer's freshness with the server's online key
//! (`[trust] freshness_key`): the device, the release version, the digest
//! of its manifest and a short validity, so a device whose root names this
//! key refuses offers replayed from the past, meant for another device or
//! for another manifest (see `uplift_release::freshness`). The key is
//! separate from the release keys (which the server never holds): a leak
//! lets a thief re-offer releases the release keys signed, nothing more.

use crate::state::AppState;
use crate::store::StoreError;
use std::collections::HashMap;
use std::path::Path;
use std::sync::RwLock;
use std::time::Duration;
use time::OffsetDateTime;
use uplift_proto::channel::ServerMsg;
use uplift_proto::{DeviceId, Version};
use uplift_release::freshness::{format_time, manifest_digest, Freshness, FRESHNESS_FORMAT};
use uplift_release::keys::ReleaseSigningKey;
use uplift_release::manifest::SignedManifest;
use uplift_release::root::{Root, SignedRoot};

/// The online key, how long a record is valid, and the digests of the
/// manifests offered so far (releases are immutable: computed once).
#[derive(Debug)]
pub struct FreshnessSigner {
    key: ReleaseSigningKey,
    ttl: Duration,
    digests: RwLock<HashMap<Version, String>>,
}

/// What an operator must hear when the server's online key (`key_id`,
/// `None` without one) and the newest published root disagree: devices
/// that hold that root would refuse every offer. `None` when they agree,
/// or when no root names a freshness role. Pure.
pub fn disagreement_with_root(key_id: Option<&str>, newest: Option<&Root>) -> Option<String> {
    let root = newest?;
    let role = root.freshness.as_ref()?;
    match key_id {
        // The server signs with one key.
        Some(_) if role.threshold > 1 => Some(format!(
            "the freshness role of root version {} needs {} signatures, and this server signs offers with one key: devices that hold that root refuse every offer (freshness_invalid); publish a root whose freshness role has threshold 1",
            root.version, role.threshold
        )),
        Some(id) if role.keys.iter().any(|k| k.key_id() == id) => None,
        Some(id) => Some(format!(
            "the online freshness key {id} ([trust] freshness_key) is not in the freshness role of root version {}: devices that hold that root refuse every offer (freshness_invalid); publish a root naming this key, or configure a key the root names",
            root.version
        )),
        None => Some(format!(
            "root version {} names a freshness role, but this server has no [trust] freshness_key: devices that hold that root refuse every offer (freshness_invalid); configure the key the root names",
            root.version
        )),
    }
}

/// Says in the log whether the server's online key and the newest
/// published root agree (at start, and after each root is published).
pub async fn check_against_newest_root(state: &AppState) {
    let newest = match state.store.latest_root().await {
        Ok(newest) => newest,
        Err(e) => {
            tracing::warn!(
                "cannot read the newest root of trust to check the freshness key against: {e}"
            );
            return;
        }
    };
    let root = newest
        .as_ref()
        .and_then(|record| SignedRoot::from_json(record.signed_json.as_bytes()).ok())
        .and_then(|signed| signed.parse_unverified().ok());
    let key_id = state.freshness.as_ref().map(|signer| signer.key_id());
    if let Some(warning) = disagreement_with_root(key_id.as_deref(), root.as_ref()) {
        tracing::warn!("{warning}");
    }
}

impl FreshnessSigner {
    pub fn open(path: &Path, ttl_secs: u64) -> anyhow::Result<Self> {
        let key = ReleaseSigningKey::read_from_file(path).map_err(|e| {
            anyhow::anyhow!("[trust] freshness_key: {e}; make one with `uplift keygen` and name its public key in the root's freshness role")
        })?;
        anyhow::ensure!(
            ttl_secs > 0,
            "[trust] freshness_ttl_secs must be at least 1"
        );
        Ok(Self {
            key,
            ttl: Duration::from_secs(ttl_secs),
            digests: RwLock::default(),
        })
    }

    pub fn key_id(&self) -> String {
        self.key.public_key().key_id()
    }

    /// The record for `device` and release `version` whose manifest has
    /// `digest`, issued at `now`. Pure but for the signature.
    pub fn record(
        &self,
        device: &DeviceId,
        version: &Version,
        digest: String,
        now: OffsetDateTime,
    ) -> Freshness {
        Freshness {
            format: FRESHNESS_FORMAT,
            device_id: device.to_string(),
            version: version.to_string(),
            manifest_sha256: digest,
            issued_at: format_time(now),
            expires_at: format_time(now + self.ttl),
        }
    }

    async fn digest(&self, state: &AppState, version: &Version) -> Result<String, String> {
        if let Some(digest) = self
            .digests
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(version)
        {
            return Ok(digest.clone());
        }
        let record = state
            .store
            .release(version)
            .await
            .map_err(|e: StoreError| e.to_string())?
            .ok_or_else(|| format!("release {version} is not stored"))?;
        let signed = SignedManifest::from_json(&record.manifest_json).map_err(|e| e.to_string())?;
        let digest = manifest_digest(&signed);
        self.digests
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(version.clone(), digest.clone());
        Ok(digest)
    }
}

/// `msg` with the offer's freshness signed, when the server has a key.
/// Without one, or if the manifest cannot be read now, the offer goes out
/// without: a device whose root requires freshness refuses it, saying so,
/// and takes the next one.
pub async fn seal(state: &AppState, device: &DeviceId, msg: ServerMsg) -> ServerMsg {
    let Some(signer) = state.freshness.as_ref() else {
        return msg;
    };
    let ServerMsg::Offer(mut offer) = msg else {
        return msg;
    };
    match signer.digest(state, &offer.version).await {
        Ok(digest) => {
            let record = signer.record(device, &offer.version, digest, OffsetDateTime::now_utc());
            offer.freshness = Some(record.sign(&signer.key));
        }
        Err(e) => tracing::error!(
            %device,
            version = %offer.version,
            "offer sent without freshness: its manifest cannot be read: {e}"
        ),
    }
    ServerMsg::Offer(offer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_online_key_the_newest_root_does_not_name_is_called_out() {
        use uplift_release::root::{Role, ROOT_FORMAT};
        let online = ReleaseSigningKey::from_seed([50; 32]);
        let other = ReleaseSigningKey::from_seed([51; 32]);
        let root = |freshness: Option<&ReleaseSigningKey>| Root {
            format: ROOT_FORMAT,
            version: 3,
            expires_at: "2099-01-01T00:00:00Z".into(),
            root: Role::one(other.public_key()),
            release: Role::one(other.public_key()),
            freshness: freshness.map(|key| Role::one(key.public_key())),
        };
        let id = online.public_key().key_id();
        assert_eq!(
            disagreement_with_root(Some(&id), Some(&root(Some(&online)))),
            None
        );
        assert_eq!(disagreement_with_root(Some(&id), None), None);
        assert_eq!(disagreement_with_root(Some(&id), Some(&root(None))), None);
        let wrong = disagreement_with_root(Some(&id), Some(&root(Some(&other)))).unwrap();
        assert!(
            wrong.contains(&id) && wrong.contains("root version 3"),
            "{wrong}"
        );
        let mut two_needed = root(Some(&online));
        if let Some(role) = two_needed.freshness.as_mut() {
            role.keys.push(other.public_key());
            role.threshold = 2;
        }
        let unreachable = disagreement_with_root(Some(&id), Some(&two_needed)).unwrap();
        assert!(unreachable.contains("needs 2 signatures"), "{unreachable}");
        let missing = disagreement_with_root(None, Some(&root(Some(&online)))).unwrap();
        assert!(missing.contains("no [trust] freshness_key"), "{missing}");
    }
    use uplift_release::freshness::{check, Expected};
    use uplift_release::root::Role;

    #[test]
    fn a_record_the_server_signs_is_accepted_by_the_devices_check_until_its_ttl() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("freshness.key");
        let key = ReleaseSigningKey::from_seed([9; 32]);
        key.write_to_file(&path).unwrap();
        let signer = FreshnessSigner::open(&path, 600).unwrap();
        let device: DeviceId = "dev-1".parse().unwrap();
        let version: Version = "1.1".parse().unwrap();
        let now = OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
        let signed = signer
            .record(&device, &version, "ab".repeat(32), now)
            .sign(&signer.key);
        let role = Role::one(key.public_key());
        let expected = Expected {
            device_id: "dev-1",
            version: "1.1",
            manifest_sha256: &"ab".repeat(32),
        };
        assert!(check(Some(&signed), &role, expected, None, now).is_ok());
        let later = now + Duration::from_secs(600);
        assert!(check(Some(&signed), &role, expected, None, later).is_err());
        assert!(FreshnessSigner::open(&path, 0).is_err());
    }
}
