//! Crash-safe storage of the env file.
//!
//! The agent rewrites the file at the moments that matter most (starting a
//! trial, committing), which are exactly when a power cut is likely to hurt.
//! So a write never modifies the file in place: the new block goes to a
//! temporary file in the same directory, is flushed to disk, and is renamed
//! over the old one; rename is atomic within a directory, so after a crash
//! the path holds either the old or the new complete block.
//!
//! The guarantee is that of the file system: it holds on ext4 (journaled
//! metadata, and the data is flushed before the rename), which is where
//! grubenv must live. The FAT EFI system partition has no journal, so a cut
//! during a rename there can lose the file: keep grubenv in `/boot/grub` on
//! ext4, not on the ESP.
//!
//! # Why one GRUB block and not two
//!
//! U-Boot keeps two copies of its environment because it has a CRC to tell
//! a torn copy from a good one (see [`crate::ubootfile`]). GRUB has neither:
//! `load_env` cannot tell a torn block from a good one, and `save_env`
//! rewrites the file's 1024 bytes in place through the disk (it finds the
//! sectors by reading the file, checks them, then writes them with
//! `grub_disk_write`; no file-system metadata changes). A second block
//! would need GRUB script logic to choose between them that GRUB cannot
//! check, so it would add failure modes rather than remove them. The one
//! block is safe as it is, for these reasons:
//!
//! - The agent never writes in place: its writes are the atomic renames
//!   above, so an agent write cut by a power loss leaves the old or the new
//!   block.
//! - GRUB writes only when a trial is running, and only Uplift's keys
//!   change. Spending an attempt turns `uplift_trial_tries` 3 into 2, 2 into
//!   1 or 1 into 0: a value of the same length, so exactly one byte of the
//!   block changes (`grub_envblk_set` only moves the rest of the block when
//!   a value's length changes). Storage writes a 512-byte sector whole or
//!   not at all (SATA and NVMe drives guarantee it; eMMC and SD cards do so
//!   in practice through their flash translation layer, which writes a new
//!   page rather than rewriting the old one), so a cut leaves the old count
//!   or the new one. The old count costs nothing: the cut came before the
//!   kernel was loaded, so that boot never happened either.
//! - Ending a trial (0 attempts left) removes `uplift_trial` and
//!   `uplift_trial_tries` and adds `uplift_fallback`, which moves bytes. All
//!   Uplift's keys together take under 120 bytes after the 25-byte header, so
//!   as long as the whole variable list stays within the first 512-byte
//!   sector (check with `grub-editenv FILE list | wc -c`; other tools'
//!   variables count too), the second sector is `#` padding before and after
//!   and again only one sector changes. The test
//!   `uplift_keys_fit_in_the_first_sector` keeps that margin.
//!
//! What is not covered: media that do tear a single sector (some cheap SD
//! cards and USB sticks, which guarantee nothing), file systems where `save_env` refuses to write
//! (btrfs, ZFS, LVM, RAID, encrypted volumes) and a grubenv on FAT.

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use uplift_proto::names::SlotName;

use crate::error::BootEnvError;
use crate::grubenv::{GrubEnv, GRUBENV_SIZE};
use crate::state::BootState;

/// The boot environment file of one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootEnvFile {
    path: PathBuf,
}

impl BootEnvFile {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn read(&self) -> Result<GrubEnv, BootEnvError> {
        let io_err = |source| BootEnvError::Io {
            action: "read the boot environment file",
            path: self.path.clone(),
            source,
        };
        let mut file = File::open(&self.path).map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                BootEnvError::NotFound {
                    path: self.path.clone(),
                }
            } else {
                io_err(e)
            }
        })?;
        // Read one byte more than a block, so a huge file (or a device node
        // pointed at by mistake) is detected without being read whole.
        let mut bytes = Vec::with_capacity(GRUBENV_SIZE + 1);
        (&mut file)
            .take(GRUBENV_SIZE as u64 + 1)
            .read_to_end(&mut bytes)
            .map_err(io_err)?;
        if bytes.len() > GRUBENV_SIZE {
            let len = file.metadata().map(|m| m.len()).unwrap_or(0);
            let len = len.max(bytes.len() as u64);
            return Err(self.in_file(BootEnvError::WrongSize { len }));
        }
        GrubEnv::parse(&bytes).map_err(|e| self.in_file(e))
    }

    /// Replaces the file with `env`, atomically and durably.
    pub fn write(&self, env: &GrubEnv) -> Result<(), BootEnvError> {
        let bytes = env.to_bytes().map_err(|e| self.in_file(e))?;
        write_file_atomically(&self.path, &bytes)
    }

    /// Reads the file and the Uplift state in it. The [`GrubEnv`] is
    /// returned too, so that [`store_state`](Self::store_state) can write it
    /// back with the keys of others untouched.
    pub fn load_state(&self) -> Result<(GrubEnv, BootState), BootEnvError> {
        let env = self.read()?;
        let state = BootState::from_env(&env).map_err(|e| self.in_file(e))?;
        Ok((env, state))
    }

    /// Reads the boot state, computes the next one in memory with `change`
    /// (one of `BootState`'s transitions), and commits it with one atomic
    /// write. Nothing is written if `change` refuses.
    pub fn update(
        &self,
        change: impl FnOnce(&BootState) -> Result<BootState, BootEnvError>,
    ) -> Result<BootState, BootEnvError> {
        let (env, state) = self.load_state()?;
        let next = change(&state)?;
        self.store_state(env, &next)?;
        Ok(next)
    }

    /// Applies `state` to `env` and stores the result in one atomic write.
    pub fn store_state(&self, mut env: GrubEnv, state: &BootState) -> Result<(), BootEnvError> {
        state.apply_to(&mut env);
        self.write(&env)
    }

    /// Creates the env file of a new device, with `default_slot` committed.
    ///
    /// Refuses to overwrite an existing file: that one may record a trial in
    /// progress, and resetting it could leave the device booting an
    /// unproven slot as if it were committed.
    pub fn provision(path: impl Into<PathBuf>, default_slot: SlotName) -> Result<(), BootEnvError> {
        let path = path.into();
        let mut env = GrubEnv::new();
        BootState::new(default_slot).apply_to(&mut env);
        let bytes = env.to_bytes()?;

        uplift_files::create_file(&path, &bytes, uplift_files::Access::Public).map_err(|source| {
            if source.kind() == io::ErrorKind::AlreadyExists {
                BootEnvError::AlreadyExists { path: path.clone() }
            } else {
                BootEnvError::Io {
                    action: "create the boot environment file",
                    path: path.clone(),
                    source,
                }
            }
        })
    }

    fn in_file(&self, source: BootEnvError) -> BootEnvError {
        BootEnvError::InFile {
            path: self.path.clone(),
            source: Box::new(source),
        }
    }
}

/// Replaces `path` with `bytes` so that a crash leaves either the old or the
/// new content, never a mix, and the rename survives a power cut: the
/// project's one crash-safe writer ([`uplift_files::replace_file`]).
/// Each write also sweeps the temporary files killed writers left (the
/// boot partition is small).
pub fn write_file_atomically(path: &Path, bytes: &[u8]) -> Result<(), BootEnvError> {
    uplift_files::replace_file(path, bytes, uplift_files::Access::Public).map_err(|source| {
        BootEnvError::Io {
            action: "replace",
            path: path.to_owned(),
            source,
        }
    })?;
    uplift_files::remove_stale_temps(path);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use SlotName::{A, B};

    #[test]
    fn update_commits_a_transition_and_a_refused_one_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("grubenv");
        BootEnvFile::provision(&path, A).unwrap();
        let file = BootEnvFile::new(&path);
        let next = file.update(|s| s.start_trial(B, 2)).unwrap();
        assert_eq!(file.load_state().unwrap().1, next);
        let before = std::fs::read(&path).unwrap();
        assert!(
            file.update(|s| s.start_trial(A, 1)).is_err(),
            "trial of the default slot is refused"
        );
        assert_eq!(std::fs::read(&path).unwrap(), before, "nothing written");
    }

    #[test]
    fn write_then_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let file = BootEnvFile::new(dir.path().join("grubenv"));
        let mut env = GrubEnv::new();
        env.set("saved_entry", "x\\y\nz").unwrap();
        env.set("uplift_default", "b").unwrap();
        file.write(&env).unwrap();
        assert_eq!(
            fs::metadata(file.path()).unwrap().len(),
            GRUBENV_SIZE as u64
        );
        assert_eq!(file.read().unwrap(), env);

        env.remove("saved_entry");
        file.write(&env).unwrap();
        assert_eq!(file.read().unwrap(), env);
        // No temporary files are left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn garbage_and_wrong_size_name_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("grubenv");
        let file = BootEnvFile::new(&path);

        for (content, want) in [
            (b"hello".to_vec(), "is 5 bytes"),
            (vec![b'x'; 5000], "is 5000 bytes"),
            (vec![b'x'; GRUBENV_SIZE], "not a grubenv file"),
        ] {
            fs::write(&path, &content).unwrap();
            let err = file.read().unwrap_err();
            let msg = err.to_string();
            assert!(msg.contains(&path.display().to_string()), "{msg}");
            assert!(msg.contains(want), "{msg}");
            assert!(matches!(err, BootEnvError::InFile { .. }));
        }
    }

    #[test]
    fn missing_file_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("grubenv");
        let err = BootEnvFile::new(&path).read().unwrap_err();
        assert!(matches!(&err, BootEnvError::NotFound { .. }), "{err}");
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
    }

    #[test]
    fn provision_then_store_and_load_state() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("grubenv");
        BootEnvFile::provision(&path, A).unwrap();
        let file = BootEnvFile::new(&path);
        let (mut env, state) = file.load_state().unwrap();
        assert_eq!(state, BootState::new(A));

        env.set("operator_note", "keep me").unwrap();
        let trial = state.start_trial(B, 3).unwrap();
        file.store_state(env, &trial).unwrap();
        let (env, state) = file.load_state().unwrap();
        assert_eq!(state, trial);
        assert_eq!(env.get("operator_note"), Some("keep me"));
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn provision_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("grubenv");
        BootEnvFile::provision(&path, A).unwrap();
        let before = fs::read(&path).unwrap();
        let err = BootEnvFile::provision(&path, B).unwrap_err();
        assert!(matches!(err, BootEnvError::AlreadyExists { .. }), "{err}");
        assert_eq!(fs::read(&path).unwrap(), before);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn unprovisioned_file_error_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let file = BootEnvFile::new(dir.path().join("grubenv"));
        file.write(&GrubEnv::new()).unwrap();
        let err = file.load_state().unwrap_err();
        assert!(matches!(err.root(), BootEnvError::NotProvisioned));
        let msg = err.to_string();
        assert!(
            msg.contains("grubenv") && msg.contains("never provisioned"),
            "{msg}"
        );
    }

    #[test]
    fn write_into_missing_directory_fails_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let file = BootEnvFile::new(dir.path().join("nope/grubenv"));
        let err = file.write(&GrubEnv::new()).unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
    }

    /// GRUB's in-place `save_env` stays within one sector (see the module
    /// documentation) while the variables fit in the first 512 bytes; the
    /// most Uplift ever stores must leave room for others' variables.
    #[test]
    fn uplift_keys_fit_in_the_first_sector() {
        let mut env = GrubEnv::new();
        let most = BootState {
            default_slot: A,
            trial: Some(crate::state::Trial {
                slot: B,
                tries_left: crate::state::MAX_TRIAL_TRIES,
            }),
            fallback_from: Some(B),
        };
        most.apply_to(&mut env);
        assert!(env.encoded_len() <= 128, "{}", env.encoded_len());
        // The decrement GRUB does is a change of one byte.
        let before = env.to_bytes().unwrap();
        most.boot().1.apply_to(&mut env);
        let after = env.to_bytes().unwrap();
        let changed: Vec<_> = (0..GRUBENV_SIZE)
            .filter(|&i| before[i] != after[i])
            .collect();
        assert_eq!(changed.len(), 1, "{changed:?}");
    }
}
