//! What the agent trusts to sign releases: a flat list of release keys
//! (`trusted_release_keys`, simple, not rotatable), or a root of trust
//! (`trusted_root`, TUF-style, see `uplift_release::root`). With a root, the
//! device holds the newest root it has verified in its state directory
//! (`root.json`); before every manifest it asks the server for the roots
//! published after the one it holds, walks that chain (each root signed by
//! a threshold of the previous root's root keys and its own), and only then
//! checks the manifest against the release role of the newest root. The
//! server stores and serves roots but cannot make one: it never holds a
//! root key.

use crate::install::{InstallError, Installer};
use crate::local::LocalState;
use serde::{Deserialize, Serialize};
use std::path::Path;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use uplift_files::{replace_file, Access};
use uplift_proto::channel::Offer;
use uplift_proto::trust::SignedFreshness;
use uplift_proto::trust::{device_roots_path, MAX_ROOTS_PER_ANSWER};
use uplift_release::freshness::{self, manifest_digest, Expected};
use uplift_release::manifest::{Manifest, SignedManifest};
use uplift_release::root::{Role, SignedRoot, TrustedRoot, MAX_ROOT_BYTES};
use uplift_release::ReleaseError;

/// The newest verified root, in the state directory.
pub const STORED_ROOT: &str = "root.json";

/// Reads and checks the root shipped in the image (`trusted_root`): it must
/// parse and be signed by a threshold of its own root keys. Its expiry is
/// not checked here: a newer root may be stored or on the server.
pub fn read_root(path: &Path) -> Result<TrustedRoot, ReleaseError> {
    let bytes = std::fs::read(path).map_err(|e| ReleaseError::RootFile {
        reason: format!("cannot read {}: {e}", path.display()),
    })?;
    TrustedRoot::initial(&SignedRoot::from_json(&bytes)?)
}

/// The root the device trusts now, without asking the server: the newer of
/// the shipped root and the one stored in `state_dir`. A stored root that
/// cannot be read is ignored (said in the log): the shipped root, then the
/// server's chain, bring the device back to the newest one.
pub fn held_root(shipped: &Path, state_dir: &Path) -> Result<TrustedRoot, ReleaseError> {
    let shipped = read_root(shipped)?;
    let stored_path = state_dir.join(STORED_ROOT);
    if !stored_path.exists() {
        return Ok(shipped);
    }
    match read_root(&stored_path) {
        Ok(stored) if stored.root().version > shipped.root().version => Ok(stored),
        Ok(_) => Ok(shipped),
        Err(e) => {
            tracing::warn!(
                "the stored root {} is unusable ({e}); starting again from the shipped root",
                stored_path.display()
            );
            Ok(shipped)
        }
    }
}

/// The newest offer freshness accepted, in the state directory: one
/// issued earlier is a replay.
pub const ACCEPTED_FRESHNESS: &str = "freshness.json";

/// What [`ACCEPTED_FRESHNESS`] holds: the issue time, and the signed
/// record itself (for whoever investigates).
#[derive(Debug, Serialize, Deserialize)]
struct Accepted {
    issued_at: String,
    record: Option<SignedFreshness>,
}

fn read_accepted(path: &Path) -> Result<Option<OffsetDateTime>, InstallError> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(InstallError::StateFile {
                action: "read",
                path: path.to_owned(),
                source,
            })
        }
    };
    let corrupt =
        |source: Box<dyn std::error::Error + Send + Sync>| InstallError::CorruptStateFile {
            path: path.to_owned(),
            source,
        };
    let accepted: Accepted = serde_json::from_slice(&bytes).map_err(|e| corrupt(e.into()))?;
    OffsetDateTime::parse(&accepted.issued_at, &Rfc3339)
        .map(Some)
        .map_err(|e| corrupt(e.into()))
}

/// What an offer claims, for [`accept_freshness`].
struct Offered {
    role: Role,
    manifest_sha256: String,
    version: String,
    freshness: Option<SignedFreshness>,
}

/// One freshness check at a time: read, check and write must not
/// interleave (an install cancelled while its check runs on a blocking
/// thread, and the one replacing it), or an older record could be written
/// last and a replay between the two be taken.
static ACCEPTING: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Checks an offer's freshness against this device and the newest record
/// it accepted (kept at `path`), and keeps this one if it is newer.
fn accept_freshness(local: &LocalState, path: &Path, offered: Offered) -> Result<(), InstallError> {
    let _one_at_a_time = ACCEPTING
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let device_id = local
        .device_id()
        .map_err(InstallError::LocalState)?
        .ok_or(InstallError::NoDeviceId)?;
    let newest = read_accepted(path)?;
    let (record, issued_at) = freshness::check(
        offered.freshness.as_ref(),
        &offered.role,
        Expected {
            device_id: device_id.as_str(),
            version: &offered.version,
            manifest_sha256: &offered.manifest_sha256,
        },
        newest,
        OffsetDateTime::now_utc(),
    )?;
    if newest.is_none_or(|newest| issued_at > newest) {
        let accepted = Accepted {
            issued_at: record.issued_at.clone(),
            record: offered.freshness,
        };
        let bytes = serde_json::to_vec_pretty(&accepted).expect("strings serialize");
        replace_file(path, &bytes, Access::Public).map_err(|source| InstallError::StateFile {
            action: "store",
            path: path.to_owned(),
            source,
        })?;
    }
    Ok(())
}

/// Parses one answer of the device roots endpoint.
pub fn parse_chain(bytes: &[u8]) -> Result<Vec<SignedRoot>, ReleaseError> {
    let chain: Vec<SignedRoot> =
        serde_json::from_slice(bytes).map_err(|e| ReleaseError::RootFile {
            reason: format!("the server's root chain is not a list of signed roots: {e}"),
        })?;
    if chain.len() > MAX_ROOTS_PER_ANSWER {
        return Err(ReleaseError::RootFile {
            reason: format!(
                "the server sent {} roots in one answer, at most {MAX_ROOTS_PER_ANSWER} are accepted",
                chain.len()
            ),
        });
    }
    Ok(chain)
}

impl Installer {
    /// The manifest, checked against what the device trusts: with a root,
    /// after bringing the root up to date from the server.
    /// With a root that names a freshness role, the offer must also carry
    /// the server's current signed word for this device and this manifest.
    pub(crate) async fn verify_manifest(
        &self,
        signed: &SignedManifest,
        offer: &Offer,
    ) -> Result<Manifest, InstallError> {
        match &self.config.trusted_root {
            None => {
                Ok(signed.verify(&self.config.trusted_release_keys, OffsetDateTime::now_utc())?)
            }
            Some(shipped) => {
                let root = self.current_root(shipped).await?;
                let manifest = root.verify_release(signed, OffsetDateTime::now_utc())?;
                if let Some(role) = &root.root().freshness {
                    self.check_freshness(role, signed, offer).await?;
                }
                Ok(manifest)
            }
        }
    }

    /// Checks the offer's freshness and remembers it as the newest accepted.
    async fn check_freshness(
        &self,
        role: &Role,
        signed: &SignedManifest,
        offer: &Offer,
    ) -> Result<(), InstallError> {
        let offered = Offered {
            role: role.clone(),
            manifest_sha256: manifest_digest(signed),
            version: offer.version.to_string(),
            freshness: offer.freshness.clone(),
        };
        let local = self.local.clone();
        let path = self.config.state_dir.join(ACCEPTED_FRESHNESS);
        // It reads the device's ID and, for a newer record, fsyncs a file:
        // off the runtime's threads.
        tokio::task::spawn_blocking(move || accept_freshness(&local, &path, offered))
            .await
            .map_err(|source| InstallError::StepStopped {
                step: "the freshness check",
                source,
            })?
    }

    /// The held root, brought up to date with the chain the server has
    /// published after it, and stored if it moved on. It must be current:
    /// a device whose newest root expired refuses every release until
    /// someone publishes a newer root (`root_expired`).
    pub(crate) async fn current_root(&self, shipped: &Path) -> Result<TrustedRoot, InstallError> {
        let state_dir = self.config.state_dir.clone();
        let held = held_root(shipped, &state_dir)?;
        let mut chain = Vec::new();
        let mut after = held.root().version;
        loop {
            let bytes = self
                .fetch(
                    &device_roots_path(after),
                    "root chain",
                    // Envelopes escape the signed text: twice its bound.
                    (2 * MAX_ROOT_BYTES * MAX_ROOTS_PER_ANSWER) as u64,
                )
                .await?;
            let answer = parse_chain(&bytes)?;
            let full = answer.len() == MAX_ROOTS_PER_ANSWER;
            let Some(last) = answer.last() else { break };
            let last = last.parse_unverified()?.version;
            if last <= after {
                // A server that answers with roots it was not asked for
                // would otherwise keep the device asking.
                break;
            }
            after = last;
            chain.extend(answer);
            if !full {
                break;
            }
        }
        let newest = held.update_chain(&chain, OffsetDateTime::now_utc())?;
        if newest.root().version > held.root().version {
            let path = state_dir.join(STORED_ROOT);
            replace_file(&path, &newest.signed().to_json(), Access::Public).map_err(|source| {
                InstallError::StateFile {
                    action: "store the new root in",
                    path: path.clone(),
                    source,
                }
            })?;
            tracing::info!(
                from = held.root().version,
                to = newest.root().version,
                "root of trust updated from the server's chain"
            );
        }
        Ok(newest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uplift_release::keys::ReleaseSigningKey;
    use uplift_release::root::{Root, ROOT_FORMAT};

    fn root(version: u64) -> SignedRoot {
        let key = ReleaseSigningKey::from_seed([version as u8; 32]);
        let root = Root {
            format: ROOT_FORMAT,
            version,
            expires_at: "2030-01-01T00:00:00Z".into(),
            root: Role::one(key.public_key()),
            release: Role::one(key.public_key()),
            freshness: None,
        };
        root.sign(&[&key]).unwrap()
    }

    #[test]
    fn the_newer_of_the_shipped_and_the_stored_root_is_held() {
        let dir = tempfile::tempdir().unwrap();
        let shipped = dir.path().join("shipped.json");
        std::fs::write(&shipped, root(1).to_json()).unwrap();
        assert_eq!(held_root(&shipped, dir.path()).unwrap().root().version, 1);
        std::fs::write(dir.path().join(STORED_ROOT), root(3).to_json()).unwrap();
        assert_eq!(held_root(&shipped, dir.path()).unwrap().root().version, 3);
        // A new image shipping a newer root than the stored one wins.
        std::fs::write(&shipped, root(4).to_json()).unwrap();
        assert_eq!(held_root(&shipped, dir.path()).unwrap().root().version, 4);
        // A damaged stored root falls back to the shipped one.
        std::fs::write(dir.path().join(STORED_ROOT), b"{").unwrap();
        assert_eq!(held_root(&shipped, dir.path()).unwrap().root().version, 4);
    }

    #[test]
    fn a_chain_longer_than_an_answer_may_be_is_refused() {
        let many: Vec<SignedRoot> = (1..=MAX_ROOTS_PER_ANSWER as u64 + 1).map(root).collect();
        let err = parse_chain(&serde_json::to_vec(&many).unwrap()).unwrap_err();
        assert!(err.to_string().contains("at most"), "{err}");
        assert_eq!(parse_chain(b"[]").unwrap(), vec![]);
    }
}
