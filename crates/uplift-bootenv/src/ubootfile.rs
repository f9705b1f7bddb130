//! Storage of the U-Boot environment on a file or a block device, at the
//! offsets `fw_env.config` names, written so that a power cut at any byte
//! leaves an environment U-Boot can use.
//!
//! With two copies (the redundant layout) a write never touches the copy
//! U-Boot currently uses: the new environment goes to the *other* copy with
//! the next flag value, and is flushed (`fsync`, which on a block device
//! also flushes the drive's cache). Until the last byte is down, that copy's
//! CRC does not match and U-Boot and `fw_printenv` keep reading the old
//! copy; once it is down, its larger flag makes it the current one. A cut
//! at any byte therefore leaves either the old or the new environment,
//! never a mix: `tests/uboot_tools.rs` cuts writes at random offsets and
//! checks both this reader and `fw_printenv`.
//!
//! A single copy is rewritten in place, as `fw_setenv` and U-Boot's
//! `saveenv` do: a cut there leaves a copy whose CRC fails, and U-Boot
//! then boots with its built-in default environment (without Uplift's
//! keys, so it boots its default `bootcmd`). Use the redundant layout on
//! devices that can lose power during an update.
//!
//! Every read and write holds the lock `fw_printenv` and `fw_setenv` take
//! ([`FW_ENV_LOCK`]), so the agent and an operator's `fw_setenv` never
//! interleave their read-modify-write cycles.
//!
//! Raw NOR/NAND flash (`/dev/mtd*`) and UBI volumes need erase-block
//! handling and are refused; an environment on eMMC, SD, a disk partition
//! or in a file is what this supports.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::BootEnvError;
use crate::state::BootState;
use crate::ubootenv::{current_copy, decode_copy, encode_copy, DecodedCopy, Layout, UBootEnv};

/// The lock file libubootenv's tools hold (`flock`, exclusive) while they
/// read or write the environment.
pub const FW_ENV_LOCK: &str = "/var/lock/fw_printenv.lock";

/// Takes the tools' lock, released when the file is dropped. Like
/// libubootenv, goes on without it when the lock file cannot be opened
/// (a read-only `/var/lock`): the lock only orders cooperating writers.
fn lock_like_fw_setenv() -> Option<File> {
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(FW_ENV_LOCK)
        .ok()?;
    file.lock().ok()?;
    Some(file)
}

/// Where one copy of the environment lives: a line of `fw_env.config`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UBootCopy {
    /// A file or a block device (e.g. `/dev/mmcblk0`, `/dev/mmcblk0boot1`).
    pub device: PathBuf,
    /// Byte offset of the copy in `device` (U-Boot's `CONFIG_ENV_OFFSET`,
    /// or `CONFIG_ENV_OFFSET_REDUND` for the second copy).
    pub offset: u64,
}

/// Where and how large the environment is: one or two copies of `size`
/// bytes each (U-Boot's `CONFIG_ENV_SIZE`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UBootLayout {
    copies: Vec<UBootCopy>,
    size: usize,
}

impl UBootLayout {
    /// Checks a layout: one or two copies, a size with room for data, no
    /// MTD or UBI device, and two copies that do not overlap.
    pub fn new(copies: Vec<UBootCopy>, size: usize) -> Result<Self, BootEnvError> {
        let bad = |reason: String| Err(BootEnvError::UBootConfig { reason });
        if copies.is_empty() || copies.len() > 2 {
            return bad(format!(
                "{} copies configured; give one (single layout) or two (redundant layout)",
                copies.len()
            ));
        }
        let layout = if copies.len() == 2 {
            Layout::Redundant
        } else {
            Layout::Single
        };
        // The data needs at least the closing empty entry and one variable.
        if size < layout.header_len() + 2 {
            return bad(format!(
                "an environment size of {size} bytes is too small; use U-Boot's CONFIG_ENV_SIZE"
            ));
        }
        for c in &copies {
            let name = c.device.to_string_lossy();
            if name.starts_with("/dev/mtd") || name.starts_with("/dev/ubi") {
                return bad(format!(
                    "{name}: raw flash (MTD) and UBI volumes need erase handling, which Uplift does not do; keep the environment on a block device or in a file"
                ));
            }
        }
        if let [a, b] = &copies[..] {
            let (lo, hi) = if a.offset <= b.offset { (a, b) } else { (b, a) };
            if a.device == b.device && lo.offset.saturating_add(size as u64) > hi.offset {
                return bad(format!(
                    "the two copies in {} at offsets {:#x} and {:#x} overlap (each is {size:#x} bytes)",
                    a.device.display(),
                    a.offset,
                    b.offset
                ));
            }
        }
        Ok(Self { copies, size })
    }

    pub fn layout(&self) -> Layout {
        if self.copies.len() == 2 {
            Layout::Redundant
        } else {
            Layout::Single
        }
    }

    pub fn copies(&self) -> &[UBootCopy] {
        &self.copies
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// The `fw_env.config` with which `fw_printenv` and `fw_setenv` read
    /// and write this same environment.
    pub fn fw_env_config(&self) -> String {
        self.copies
            .iter()
            .map(|c| format!("{} {:#x} {:#x}\n", c.device.display(), c.offset, self.size))
            .collect()
    }
}

impl fmt::Display for UBootLayout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "U-Boot environment (")?;
        for (i, c) in self.copies.iter().enumerate() {
            if i > 0 {
                write!(f, ", ")?;
            }
            write!(f, "{} at {:#x}", c.device.display(), c.offset)?;
        }
        write!(f, ", {:#x} bytes each)", self.size)
    }
}

/// A write the store is about to do: `image` goes to `offset` in `device`.
/// Tests apply a prefix of it to simulate a power cut.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedWrite {
    /// The copy written, 1 or 2 (the line of `fw_env.config`).
    pub copy: u8,
    pub device: PathBuf,
    pub offset: u64,
    pub image: Vec<u8>,
}

impl PlannedWrite {
    /// Writes the image and flushes it to the device.
    pub fn apply(&self) -> Result<(), BootEnvError> {
        let io_err = |action, source| BootEnvError::Io {
            action,
            path: self.device.clone(),
            source,
        };
        // Never create or truncate: the device (or image file) holds other
        // data around the environment.
        let file = OpenOptions::new()
            .write(true)
            .open(&self.device)
            .map_err(|e| {
                not_found_or(e, &self.device, "open the U-Boot environment for writing")
            })?;
        file.write_all_at(&self.image, self.offset)
            .map_err(|e| io_err("write the U-Boot environment to", e))?;
        file.sync_all()
            .map_err(|e| io_err("flush the U-Boot environment to", e))
    }
}

/// The U-Boot environment of one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UBootEnvStore {
    layout: UBootLayout,
}

/// What was read: every copy's outcome and which one is current.
struct ReadCopies {
    /// The flag byte of each copy as stored, valid or not (libubootenv
    /// counts on from it even when the copy is torn).
    raw_flags: Vec<u8>,
    decoded: Vec<Result<DecodedCopy, BootEnvError>>,
    current: Option<usize>,
}

impl UBootEnvStore {
    pub fn new(layout: UBootLayout) -> Self {
        Self { layout }
    }

    pub fn layout(&self) -> &UBootLayout {
        &self.layout
    }

    /// The current environment: the only copy, or the newest valid one.
    pub fn read(&self) -> Result<UBootEnv, BootEnvError> {
        let _lock = lock_like_fw_setenv();
        self.read_locked()
    }

    fn read_locked(&self) -> Result<UBootEnv, BootEnvError> {
        let mut read = self.read_copies()?;
        match read.current {
            Some(i) => Ok(read
                .decoded
                .swap_remove(i)
                .expect("current copy is valid")
                .env),
            None => {
                let mut errors = read
                    .decoded
                    .into_iter()
                    .map(|r| r.expect_err("no valid copy"));
                let first = errors.next().expect("at least one copy");
                match errors.next() {
                    None => Err(first),
                    Some(second) => Err(BootEnvError::UBootNoValidCopy {
                        first: Box::new(first),
                        second: Box::new(second),
                    }),
                }
            }
        }
    }

    /// Works out where `env` goes and with which flag, without writing:
    /// the copy U-Boot does not currently use, with the next flag value.
    /// With no valid copy at all it writes as libubootenv does (the second
    /// copy, counting on from the first copy's flag byte).
    pub fn plan_write(&self, env: &UBootEnv) -> Result<PlannedWrite, BootEnvError> {
        let _lock = lock_like_fw_setenv();
        self.plan_write_locked(env)
    }

    fn plan_write_locked(&self, env: &UBootEnv) -> Result<PlannedWrite, BootEnvError> {
        let layout = self.layout.layout();
        let (target, flag) = match layout {
            Layout::Single => (0, 0),
            Layout::Redundant => {
                let read = self.read_copies()?;
                let current = read.current.unwrap_or(0);
                (1 - current, read.raw_flags[current].wrapping_add(1))
            }
        };
        let image = encode_copy(env, layout, self.layout.size, flag)?;
        let copy = &self.layout.copies[target];
        Ok(PlannedWrite {
            copy: target as u8 + 1,
            device: copy.device.clone(),
            offset: copy.offset,
            image,
        })
    }

    /// Stores `env` (see [`plan_write`](Self::plan_write)) and flushes it.
    pub fn write(&self, env: &UBootEnv) -> Result<(), BootEnvError> {
        let _lock = lock_like_fw_setenv();
        self.plan_write_locked(env)?.apply()
    }

    /// Reads the environment and the Uplift state in it. The environment
    /// is returned too, so that [`store_state`](Self::store_state) keeps
    /// every other variable (U-Boot's `bootcmd` and the like).
    pub fn load_state(&self) -> Result<(UBootEnv, BootState), BootEnvError> {
        let _lock = lock_like_fw_setenv();
        self.load_state_locked()
    }

    fn load_state_locked(&self) -> Result<(UBootEnv, BootState), BootEnvError> {
        let env = self.read_locked()?;
        let state = BootState::from_env(&env)?;
        Ok((env, state))
    }

    /// Reads the state, computes the next one with `change`, and stores
    /// it, under one hold of the tools' lock. Nothing is written if
    /// `change` refuses.
    pub fn update(
        &self,
        change: impl FnOnce(&BootState) -> Result<BootState, BootEnvError>,
    ) -> Result<BootState, BootEnvError> {
        let _lock = lock_like_fw_setenv();
        let (mut env, state) = self.load_state_locked()?;
        let next = change(&state)?;
        next.apply_to(&mut env);
        self.plan_write_locked(&env)?.apply()?;
        Ok(next)
    }

    /// Applies `state` to `env` and stores the result.
    pub fn store_state(&self, mut env: UBootEnv, state: &BootState) -> Result<(), BootEnvError> {
        state.apply_to(&mut env);
        self.write(&env)
    }

    fn read_copies(&self) -> Result<ReadCopies, BootEnvError> {
        let layout = self.layout.layout();
        let mut raw_flags = Vec::new();
        let mut decoded = Vec::new();
        for (i, copy) in self.layout.copies.iter().enumerate() {
            let n = i as u8 + 1;
            let bytes = read_copy(copy, self.layout.size, n)?;
            raw_flags.push(if layout == Layout::Redundant {
                bytes[4]
            } else {
                0
            });
            decoded.push(decode_copy(&bytes, layout, n, copy.offset).map_err(|e| {
                BootEnvError::InFile {
                    path: copy.device.clone(),
                    source: Box::new(e),
                }
            }));
        }
        let current = match layout {
            Layout::Single => decoded[0].is_ok().then_some(0),
            Layout::Redundant => current_copy([
                decoded[0].as_ref().ok().map(|c| c.flag),
                decoded[1].as_ref().ok().map(|c| c.flag),
            ]),
        };
        Ok(ReadCopies {
            raw_flags,
            decoded,
            current,
        })
    }
}

fn read_copy(copy: &UBootCopy, size: usize, n: u8) -> Result<Vec<u8>, BootEnvError> {
    let io_err = |source| BootEnvError::Io {
        action: "read the U-Boot environment from",
        path: copy.device.clone(),
        source,
    };
    let mut file = File::open(&copy.device)
        .map_err(|e| not_found_or(e, &copy.device, "open the U-Boot environment"))?;
    let mut bytes = vec![0; size];
    match file.read_exact_at(&mut bytes, copy.offset) {
        Ok(()) => Ok(bytes),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            // Seeking to the end gives the size of block devices too, whose
            // metadata says 0.
            let len = file.seek(SeekFrom::End(0)).map_err(io_err)?;
            Err(BootEnvError::UBootShortDevice {
                copy: n,
                path: copy.device.clone(),
                len,
                end: copy.offset + size as u64,
            })
        }
        Err(e) => Err(io_err(e)),
    }
}

fn not_found_or(e: io::Error, path: &Path, action: &'static str) -> BootEnvError {
    if e.kind() == io::ErrorKind::NotFound {
        BootEnvError::NotFound {
            path: path.to_owned(),
        }
    } else {
        BootEnvError::Io {
            action,
            path: path.to_owned(),
            source: e,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Trial;
    use std::fs;
    use uplift_proto::names::SlotName::{A, B};

    fn copy(device: &Path, offset: u64) -> UBootCopy {
        UBootCopy {
            device: device.to_owned(),
            offset,
        }
    }

    fn redundant(dir: &Path) -> UBootEnvStore {
        let dev = dir.join("env.img");
        fs::write(&dev, vec![0xa5; 0x3000]).unwrap();
        let layout = UBootLayout::new(vec![copy(&dev, 0x1000), copy(&dev, 0x2000)], 0x1000);
        UBootEnvStore::new(layout.unwrap())
    }

    fn provisioned(store: &UBootEnvStore) {
        let mut env = UBootEnv::new();
        env.set("bootcmd", "run uplift_boot").unwrap();
        BootState::new(A).apply_to(&mut env);
        store.write(&env).unwrap();
    }

    #[test]
    fn layouts_are_checked() {
        let d = Path::new("/dev/mmcblk0");
        let err = |copies, size| UBootLayout::new(copies, size).unwrap_err().to_string();
        assert!(err(vec![], 0x2000).contains("0 copies"));
        assert!(err(vec![copy(d, 0); 3], 0x2000).contains("3 copies"));
        assert!(err(vec![copy(d, 0)], 5).contains("too small"));
        assert!(err(vec![copy(Path::new("/dev/mtd1"), 0)], 0x2000).contains("MTD"));
        let msg = err(vec![copy(d, 0x4000), copy(d, 0x5000)], 0x2000);
        assert!(msg.contains("overlap") && msg.contains("0x4000"), "{msg}");
        // Back to back on one device, or the same offset on two devices.
        assert!(UBootLayout::new(vec![copy(d, 0x6000), copy(d, 0x4000)], 0x2000).is_ok());
        let e = Path::new("/dev/mmcblk0boot1");
        let layout = UBootLayout::new(vec![copy(d, 0), copy(e, 0)], 0x2000).unwrap();
        assert_eq!(layout.layout(), Layout::Redundant);
        assert_eq!(
            layout.fw_env_config(),
            "/dev/mmcblk0 0x0 0x2000\n/dev/mmcblk0boot1 0x0 0x2000\n"
        );
    }

    #[test]
    fn writes_alternate_between_copies_with_an_incrementing_flag() {
        let dir = tempfile::tempdir().unwrap();
        let store = redundant(dir.path());
        let dev = dir.path().join("env.img");
        // Neither copy valid: like libubootenv, the second copy gets the
        // first copy's flag byte plus one.
        let plan = store.plan_write(&UBootEnv::new()).unwrap();
        assert_eq!((plan.copy, plan.offset, plan.image[4]), (2, 0x2000, 0xa6));

        provisioned(&store);
        for (n, (copy, flag)) in [(1, 0xa7), (2, 0xa8), (1, 0xa9)].into_iter().enumerate() {
            let plan = store.plan_write(&store.load_state().unwrap().0).unwrap();
            assert_eq!((plan.copy, plan.image[4]), (copy, flag), "write {n}");
            store
                .update(|s| Ok(s.start_trial(B, 3 - n as u32).unwrap()))
                .unwrap();
        }
        let bytes = fs::read(&dev).unwrap();
        // The bytes outside the two copies are untouched.
        assert!(bytes[..0x1000].iter().all(|&b| b == 0xa5));
        assert_eq!(
            store.load_state().unwrap().1.trial,
            Some(Trial {
                slot: B,
                tries_left: 1
            })
        );
        assert_eq!(
            store.read().unwrap().get("bootcmd"),
            Some("run uplift_boot")
        );
    }

    #[test]
    fn a_torn_copy_falls_back_to_the_other_and_two_torn_copies_say_both() {
        let dir = tempfile::tempdir().unwrap();
        let store = redundant(dir.path());
        provisioned(&store);
        store.update(|s| s.start_trial(B, 2)).unwrap();
        let dev = dir.path().join("env.img");
        let mut bytes = fs::read(&dev).unwrap();
        // The newest copy is the first one (second write); tear it.
        bytes[0x1000 + 9] ^= 0xff;
        fs::write(&dev, &bytes).unwrap();
        assert_eq!(store.load_state().unwrap().1, BootState::new(A));

        bytes[0x2000 + 9] ^= 0xff;
        fs::write(&dev, &bytes).unwrap();
        let err = store.read().unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(err, BootEnvError::UBootNoValidCopy { .. }),
            "{msg}"
        );
        assert!(
            msg.contains("copy 1 (offset 0x1000)") && msg.contains("copy 2 (offset 0x2000)"),
            "{msg}"
        );
        assert!(msg.contains(&dev.display().to_string()), "{msg}");
    }

    #[test]
    fn single_copy_is_rewritten_in_place_and_a_torn_one_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let dev = dir.path().join("env.img");
        fs::write(&dev, vec![0; 0x800]).unwrap();
        let store = UBootEnvStore::new(UBootLayout::new(vec![copy(&dev, 0x400)], 0x400).unwrap());
        provisioned(&store);
        store.update(|s| s.start_trial(B, 1)).unwrap();
        assert_eq!(store.load_state().unwrap().1.trial.map(|t| t.slot), Some(B));
        let mut bytes = fs::read(&dev).unwrap();
        bytes[0x410] ^= 1;
        fs::write(&dev, &bytes).unwrap();
        let err = store.read().unwrap_err();
        assert!(
            matches!(
                err.root(),
                BootEnvError::UBootBadCrc {
                    copy: 1,
                    offset: 0x400,
                    redundant: false,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("fw_setenv"), "{err}");
    }

    #[test]
    fn a_device_too_short_for_the_layout_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let dev = dir.path().join("env.img");
        fs::write(&dev, vec![0; 0x1800]).unwrap();
        let store = UBootEnvStore::new(
            UBootLayout::new(vec![copy(&dev, 0), copy(&dev, 0x1000)], 0x1000).unwrap(),
        );
        let err = store.read().unwrap_err();
        assert!(
            matches!(
                err,
                BootEnvError::UBootShortDevice {
                    copy: 2,
                    len: 0x1800,
                    end: 0x2000,
                    ..
                }
            ),
            "{err}"
        );
        let missing = dir.path().join("nope");
        let store = UBootEnvStore::new(UBootLayout::new(vec![copy(&missing, 0)], 0x1000).unwrap());
        assert!(matches!(store.read(), Err(BootEnvError::NotFound { .. })));
        assert!(matches!(
            store.write(&UBootEnv::new()),
            Err(BootEnvError::NotFound { .. })
        ));
        assert!(!missing.exists(), "a missing device is never created");
    }

    #[test]
    fn a_refused_change_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = redundant(dir.path());
        provisioned(&store);
        let before = fs::read(dir.path().join("env.img")).unwrap();
        assert!(store.update(|s| s.start_trial(A, 1)).is_err());
        assert_eq!(fs::read(dir.path().join("env.img")).unwrap(), before);
    }

    /// A write waits while `fw_setenv` (here: this test) holds the tools'
    /// lock, so the two never interleave.
    #[test]
    fn writes_wait_for_the_fw_setenv_lock() {
        let Ok(held) = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(FW_ENV_LOCK)
        else {
            eprintln!("SKIPPED writes_wait_for_the_fw_setenv_lock: cannot open {FW_ENV_LOCK}");
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let store = redundant(dir.path());
        provisioned(&store);
        let before = fs::read(dir.path().join("env.img")).unwrap();
        held.lock().unwrap();
        let writer = {
            let store = store.clone();
            std::thread::spawn(move || store.update(|s| s.start_trial(B, 1)).unwrap())
        };
        std::thread::sleep(std::time::Duration::from_millis(300));
        assert_eq!(
            fs::read(dir.path().join("env.img")).unwrap(),
            before,
            "wrote while locked"
        );
        held.unlock().unwrap();
        writer.join().unwrap();
        assert_eq!(store.load_state().unwrap().1.trial.map(|t| t.slot), Some(B));
    }
}
