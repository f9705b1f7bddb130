//! What the agent keeps on the device between runs, each in its own small
//! file in the state directory, always replaced atomically:
//! - `device.key`: the device's ed25519 key, generated on first start;
//! - `device-id`: the ID the server assigned;
//! - `slots.json`: which version each slot holds (none while being written);
//! - `journal.json`: the install waiting for its trial boot, or for the
//!   server's go to switch to it, and the last release that failed here
//!   (never retried automatically);
//! - `install-progress.json`: which chunks of the release being written are
//!   durably in the inactive slot (ranges of chunk indices, since parallel
//!   downloads finish out of order), so a restart fetches none of them again;
//! - `releases/<image sha256>.chunks`: the chunk list of each release a
//!   slot holds, the index of chunks the next install can copy locally
//!   instead of re-chunking the running slot.

use anyhow::Context;
use ed25519_dalek::SigningKey;
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::path::{Path, PathBuf};
use uplift_files::{replace_file, Access};
use uplift_proto::{ChunkHash, DeviceId, SlotName, Version, WireError};

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
    /// Written and verified in `slot`, which the boot environment does not
    /// point at: waiting for the server's go (a reboot window) before the
    /// switch. Kept across restarts, so a device that restarts while
    /// waiting neither downloads again nor switches without the go.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub awaiting_reboot: Option<PendingInstall>,
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
    /// Bytes of the image written, verified and fsynced into the slot. In
    /// journals from before `done` existed, a leading prefix.
    pub verified_bytes: u64,
    /// Half-open ranges of chunk indices written, verified and fsynced.
    #[serde(default)]
    pub done: Vec<[u64; 2]>,
}

impl InstallProgress {
    /// The finished chunk indices, given the chunk sizes of the release;
    /// an old journal's prefix is converted.
    pub fn done_chunks(&self, sizes: impl Iterator<Item = u64>) -> Vec<[u64; 2]> {
        if !self.done.is_empty() || self.verified_bytes == 0 {
            return self.done.clone();
        }
        let mut end = 0u64;
        let mut count = 0u64;
        for size in sizes {
            end += size;
            if end > self.verified_bytes {
                break;
            }
            count += 1;
        }
        if count == 0 {
            Vec::new()
        } else {
            vec![[0, count]]
        }
    }
}

/// What the server said about this device's enrollment while it had no
/// ID yet, for `uplift-agent status`: cleared once it gets its ID.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum Enrollment {
    /// The server holds the request until an operator accepts it.
    Pending { message: String },
    /// An operator rejected it, or the server refused its token.
    Refused { message: String },
}

/// Where [`Enrollment`] is kept in the state directory.
const ENROLLMENT: &str = "enrollment.json";

/// One record of a saved chunk list: sha256 and uncompressed size.
const CHUNK_RECORD: usize = 36;

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
        replace_file(&path, &bytes, Access::Public)
            .with_context(|| format!("writing {}", path.display()))
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
                replace_file(
                    &path,
                    hex::encode(key.to_bytes()).as_bytes(),
                    Access::OwnerOnly,
                )
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

    /// The private addresses the address hook last applied, as
    /// [`crate::address::Applied`] writes them; `None` if never.
    pub fn applied_addresses(&self) -> anyhow::Result<Option<crate::address::Applied>> {
        self.read_json("private-addresses.json")
    }
    pub fn save_applied_addresses(&self, applied: &crate::address::Applied) -> anyhow::Result<()> {
        self.write_json("private-addresses.json", &Some(applied))
    }

    pub fn enrollment(&self) -> anyhow::Result<Option<Enrollment>> {
        self.read_json(ENROLLMENT)
    }

    /// Records what the server said about the enrollment (`None`: nothing
    /// left to say, the device has its ID).
    pub fn save_enrollment(&self, enrollment: Option<&Enrollment>) -> anyhow::Result<()> {
        match enrollment {
            Some(enrollment) => self.write_json(ENROLLMENT, enrollment),
            None => {
                let path = self.dir.join(ENROLLMENT);
                match std::fs::remove_file(&path) {
                    Ok(()) => Ok(()),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                    Err(e) => Err(e).with_context(|| format!("removing {}", path.display())),
                }
            }
        }
    }

    pub fn save_device_id(&self, id: &DeviceId) -> anyhow::Result<()> {
        let path = self.dir.join("device-id");
        replace_file(&path, format!("{id}\n").as_bytes(), Access::Public)
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
    fn chunk_list_path(&self, image_sha256: &str) -> PathBuf {
        self.dir
            .join("releases")
            .join(format!("{image_sha256}.chunks"))
    }

    /// Keeps the chunk list of the release whose image has `image_sha256`,
    /// and drops the lists of images in neither slot any more.
    pub fn save_chunk_list(
        &self,
        image_sha256: &str,
        chunks: &[(ChunkHash, u32)],
        keep: &[&str],
    ) -> anyhow::Result<()> {
        let dir = self.dir.join("releases");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut bytes = Vec::with_capacity(chunks.len() * CHUNK_RECORD);
        for (hash, size) in chunks {
            bytes.extend_from_slice(hash.as_bytes());
            bytes.extend_from_slice(&size.to_le_bytes());
        }
        let path = self.chunk_list_path(image_sha256);
        replace_file(&path, &bytes, Access::Public)
            .with_context(|| format!("writing {}", path.display()))?;
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))?
        {
            let Ok(entry) = entry else { continue };
            let name = entry.file_name().to_string_lossy().into_owned();
            let stale = name
                .strip_suffix(".chunks")
                .is_some_and(|id| id != image_sha256 && !keep.contains(&id));
            if stale {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(())
    }

    /// The saved chunk list of the image `image_sha256`, if there is one.
    /// A damaged list is no list: the caller falls back to re-chunking.
    pub fn chunk_list(&self, image_sha256: &str) -> Option<Vec<(ChunkHash, u32)>> {
        let bytes = std::fs::read(self.chunk_list_path(image_sha256)).ok()?;
        if bytes.is_empty() || bytes.len() % CHUNK_RECORD != 0 {
            return None;
        }
        Some(
            bytes
                .chunks_exact(CHUNK_RECORD)
                .map(|r| {
                    let hash: [u8; 32] = r[..32].try_into().expect("32 bytes");
                    let size = u32::from_le_bytes(r[32..].try_into().expect("4 bytes"));
                    (ChunkHash::from_bytes(hash), size)
                })
                .collect(),
        )
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
    fn a_chunk_list_is_kept_for_the_slots_and_stale_ones_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let state = LocalState::open(dir.path()).unwrap();
        let list = vec![
            (ChunkHash::from_bytes([7; 32]), 4096),
            (ChunkHash::from_bytes([8; 32]), 17),
        ];
        state.save_chunk_list("aa", &list, &[]).unwrap();
        state.save_chunk_list("bb", &list[..1], &["aa"]).unwrap();
        assert_eq!(state.chunk_list("aa").unwrap(), list);
        state.save_chunk_list("cc", &list, &["bb"]).unwrap();
        assert!(state.chunk_list("aa").is_none(), "in neither slot any more");
        assert_eq!(state.chunk_list("bb").unwrap().len(), 1);
        std::fs::write(dir.path().join("releases/cc.chunks"), b"short").unwrap();
        assert!(
            state.chunk_list("cc").is_none(),
            "a damaged list is no list"
        );
    }

    #[test]
    fn an_old_prefix_journal_becomes_a_range_of_finished_chunks() {
        let old: InstallProgress =
            serde_json::from_str(r#"{"slot":"b","image_sha256":"ab","verified_bytes":2500}"#)
                .unwrap();
        assert_eq!(
            old.done_chunks([1000u64, 1000, 1000].into_iter()),
            vec![[0, 2]]
        );
        let new = InstallProgress {
            done: vec![[3, 5]],
            ..old.clone()
        };
        assert_eq!(new.done_chunks([1000u64; 6].into_iter()), vec![[3, 5]]);
    }

    #[test]
    fn a_corrupt_state_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("journal.json"), b"{not json").unwrap();
        let err = LocalState::open(dir.path()).unwrap().journal().unwrap_err();
        assert!(format!("{err:#}").contains("journal.json"), "{err:#}");
    }
}
