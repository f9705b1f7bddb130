//! What the agent keeps on the device between runs, each in its own small
//! file in the state directory, always replaced atomically:
//! - `device.key`: the device's ed25519 key, generated on first start;
//! - `device-id`: the ID the server assigned;
//! - `slots.json`: which version each slot holds (none while being written);
//! - `journal.json`: the install waiting for its trial boot, and the last
//!   release that failed here (never retried automatically);
//! - `install-progress.json`: how many leading chunks of the release being
//!   written are durably in the inactive slot, so a restart resumes there.

use anyhow::Context;
use ed25519_dalek::SigningKey;
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use uplift_proto::{DeviceId, SlotName, Version, WireError};

#[derive(Debug, Clone)]
pub struct LocalState {
    dir: PathBuf,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SlotTable {
    pub a: Option<SlotContent>,
    pub b: Option<SlotContent>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SlotContent {
    pub version: Version,
    pub image_sha256: String,
}

impl SlotTable {
    pub fn get(&self, slot: SlotName) -> Option<&SlotContent> {
        match slot {
            SlotName::A => self.a.as_ref(),
            SlotName::B => self.b.as_ref(),
        }
    }
    pub fn set(&mut self, slot: SlotName, content: Option<SlotContent>) {
        match slot {
            SlotName::A => self.a = content,
            SlotName::B => self.b = content,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Journal {
    /// Installed into `slot` and switched to trial; waiting for the reboot.
    pub pending: Option<PendingInstall>,
    /// The last release that failed on this device and why.
    pub last_failure: Option<Failure>,
    /// Every release rolled back on this device: none is installed again
    /// automatically.
    #[serde(default)]
    pub rolled_back: Vec<Version>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PendingInstall {
    pub slot: SlotName,
    pub version: Version,
    pub rollout_id: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Failure {
    pub version: Version,
    pub error: WireError,
    /// True when the release was installed and then rolled back: it is not
    /// installed again unless the operator starts a rollout of another version.
    pub rolled_back: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstallProgress {
    pub slot: SlotName,
    /// Identifies the release being written (its whole-image digest).
    pub image_sha256: String,
    /// Leading bytes of the image written, verified and fsynced into the slot.
    pub verified_bytes: u64,
}

/// Replaces `path` with `bytes` so that a crash leaves the old or the new
/// file, never a mix: temp file, fsync, rename, fsync the directory.
pub fn write_atomic(path: &Path, bytes: &[u8], private: bool) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    ));
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(if private { 0o600 } else { 0o644 })
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

impl LocalState {
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating state directory {}", dir.display()))?;
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    fn read_json<T: DeserializeOwned + Default>(&self, name: &str) -> anyhow::Result<T> {
        let path = self.dir.join(name);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .with_context(|| format!("{} is corrupt; restore or delete it", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(T::default()),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    fn write_json<T: Serialize>(&self, name: &str, value: &T) -> anyhow::Result<()> {
        let path = self.dir.join(name);
        let bytes = serde_json::to_vec_pretty(value).expect("state serializes");
        write_atomic(&path, &bytes, false).with_context(|| format!("writing {}", path.display()))
    }

    /// The device key, created on first use.
    pub fn device_key(&self) -> anyhow::Result<SigningKey> {
        let path = self.dir.join("device.key");
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let seed: [u8; 32] = hex::decode(text.trim())
                    .ok()
                    .and_then(|b| b.try_into().ok())
                    .with_context(|| format!("{} is not a 32-byte hex key", path.display()))?;
                Ok(SigningKey::from_bytes(&seed))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = SigningKey::generate(&mut rand::rngs::OsRng);
                write_atomic(&path, hex::encode(key.to_bytes()).as_bytes(), true)
                    .with_context(|| format!("writing {}", path.display()))?;
                Ok(key)
            }
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    pub fn device_id(&self) -> anyhow::Result<Option<DeviceId>> {
        let path = self.dir.join("device-id");
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                Ok(Some(text.trim().parse().with_context(|| {
                    format!("{} is corrupt", path.display())
                })?))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    pub fn save_device_id(&self, id: &DeviceId) -> anyhow::Result<()> {
        let path = self.dir.join("device-id");
        write_atomic(&path, format!("{id}\n").as_bytes(), false)
            .with_context(|| format!("writing {}", path.display()))
    }

    pub fn slots(&self) -> anyhow::Result<SlotTable> {
        self.read_json("slots.json")
    }
    pub fn save_slots(&self, slots: &SlotTable) -> anyhow::Result<()> {
        self.write_json("slots.json", slots)
    }
    pub fn install_progress(&self) -> anyhow::Result<Option<InstallProgress>> {
        self.read_json("install-progress.json")
    }
    pub fn save_install_progress(&self, progress: Option<&InstallProgress>) -> anyhow::Result<()> {
        self.write_json("install-progress.json", &progress)
    }
    pub fn journal(&self) -> anyhow::Result<Journal> {
        self.read_json("journal.json")
    }
    pub fn save_journal(&self, journal: &Journal) -> anyhow::Result<()> {
        self.write_json("journal.json", journal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_device_key_is_created_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let state = LocalState::open(dir.path()).unwrap();
        let first = state.device_key().unwrap();
        let again = state.device_key().unwrap();
        assert_eq!(first.to_bytes(), again.to_bytes());
        let mode = std::fs::metadata(dir.path().join("device.key"))
            .unwrap()
            .permissions();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(mode.mode() & 0o777, 0o600, "the device key is private");
    }

    #[test]
    fn journal_and_slots_round_trip_and_default_when_absent() {
        let dir = tempfile::tempdir().unwrap();
        let state = LocalState::open(dir.path()).unwrap();
        assert_eq!(state.journal().unwrap(), Journal::default());
        let mut slots = SlotTable::default();
        slots.set(
            SlotName::B,
            Some(SlotContent {
                version: "1.1".parse().unwrap(),
                image_sha256: "00".into(),
            }),
        );
        state.save_slots(&slots).unwrap();
        assert_eq!(state.slots().unwrap(), slots);
    }

    #[test]
    fn a_corrupt_state_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("journal.json"), b"{not json").unwrap();
        let err = LocalState::open(dir.path()).unwrap().journal().unwrap_err();
        assert!(format!("{err:#}").contains("journal.json"), "{err:#}");
    }
}
