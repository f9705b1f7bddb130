//! A slot as the agent writes it: a block device (a partition, a loop
//! device) or a regular file (the tests' and the simulator's slots). The
//! two differ where it matters:
//! - size: a block device's capacity is where a seek to its end lands
//!   (what the BLKGETSIZE64 ioctl returns, without `unsafe`); its metadata
//!   length is 0. An image larger than the device is refused with
//!   [`SlotError::TooSmall`] before a byte is written. A file slot grows to
//!   the image's size and is set to exactly that size (no stale tail).
//! - a block device is never truncated or resized, and never created: a
//!   missing `/dev/...` path is an error, not a regular file made in
//!   devtmpfs that would swallow the image in RAM.
//! - a block device is opened with `O_EXCL`, which Linux gives a meaning
//!   for block devices: the open fails with `EBUSY` while the device is
//!   mounted or claimed (a misconfigured `[slots]` naming a mounted file
//!   system is refused rather than overwritten under it). A busy device is
//!   tried again for a few seconds first: the journal thread of an install
//!   attempt just cancelled may hold it for its last sync.
//!
//! Durability: writes go through the page cache and the writer syncs
//! (`fdatasync`, which on a block device writes its dirty pages and flushes
//! the disk's volatile cache) before the resume journal records a chunk,
//! and once more (`fsync`) before the slot is recorded as verified. Not
//! `O_DIRECT`: chunks are variable-sized (content-defined) at any byte
//! offset, so direct I/O would need a read-modify-write of every partial
//! logical block through aligned bounce buffers, for no gain in what is
//! durable at the points the journal relies on; and the page cache lets
//! the writer run ahead of the disk between checkpoints.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use uplift_proto::{ErrorKind, SlotName};

/// What a slot's path is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotKind {
    BlockDevice,
    File,
}

#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    #[error(
        "slot {slot} ({path}) holds {capacity} bytes ({:.1} MiB) but the image needs {needed} bytes ({:.1} MiB); \
         nothing was written. Repartition the device or roll out a smaller image",
        mib(*capacity),
        mib(*needed)
    )]
    TooSmall {
        slot: SlotName,
        path: PathBuf,
        capacity: u64,
        needed: u64,
    },
    #[error("slot {slot} ({path}) does not exist: the block device is missing; check the partition table and [slots] in agent.toml")]
    MissingDevice { slot: SlotName, path: PathBuf },
    #[error("slot {slot} ({path}) is {what}, not a block device or a regular file; fix [slots] in agent.toml")]
    NotASlot {
        slot: SlotName,
        path: PathBuf,
        what: &'static str,
    },
    #[error("slot {slot} ({path}) is in use (mounted, or claimed by another program); unmount it: the agent writes only a slot nothing uses")]
    Busy {
        slot: SlotName,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("slot {slot} ({path}): {action} failed: {source}")]
    Io {
        slot: SlotName,
        path: PathBuf,
        action: &'static str,
        #[source]
        source: std::io::Error,
    },
}

impl SlotError {
    /// The wire kind: a slot too small stays too small (not retried); the
    /// rest is an I/O problem of the slot.
    pub fn kind(&self) -> ErrorKind {
        match self {
            SlotError::TooSmall { .. } => ErrorKind::SlotTooSmall,
            SlotError::MissingDevice { .. }
            | SlotError::NotASlot { .. }
            | SlotError::Busy { .. }
            | SlotError::Io { .. } => ErrorKind::SlotIo,
        }
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / 1048576.0
}

/// A slot opened for writing one image.
#[derive(Debug)]
pub struct OpenSlot {
    pub file: File,
    pub kind: SlotKind,
}

/// Whether an image of `needed` bytes fits a slot of `capacity`. Pure.
pub fn check_fits(
    slot: SlotName,
    path: &Path,
    kind: SlotKind,
    capacity: u64,
    needed: u64,
) -> Result<(), SlotError> {
    match kind {
        SlotKind::BlockDevice if capacity < needed => Err(SlotError::TooSmall {
            slot,
            path: path.to_owned(),
            capacity,
            needed,
        }),
        // A file slot grows to the image.
        SlotKind::BlockDevice | SlotKind::File => Ok(()),
    }
}

/// A path in `/dev` names a device, which the agent must never create.
fn is_device_path(path: &Path) -> bool {
    path.starts_with("/dev")
}

/// What `path` is; `None` if it does not exist.
fn kind_of(slot: SlotName, path: &Path) -> Result<Option<SlotKind>, SlotError> {
    let meta = match std::fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(SlotError::Io {
                slot,
                path: path.to_owned(),
                action: "stat",
                source,
            })
        }
    };
    let file_type = meta.file_type();
    let what = if file_type.is_block_device() {
        return Ok(Some(SlotKind::BlockDevice));
    } else if file_type.is_file() {
        return Ok(Some(SlotKind::File));
    } else if file_type.is_dir() {
        "a directory"
    } else if file_type.is_char_device() {
        "a character device"
    } else if file_type.is_fifo() {
        "a FIFO"
    } else if file_type.is_socket() {
        "a socket"
    } else {
        "not a file"
    };
    Err(SlotError::NotASlot {
        slot,
        path: path.to_owned(),
        what,
    })
}

/// The capacity of an open slot: a block device's size (a seek to its
/// end), a file's length.
pub fn capacity_of(file: &File) -> std::io::Result<u64> {
    let meta = file.metadata()?;
    if meta.file_type().is_block_device() {
        let mut file = file;
        let end = file.seek(SeekFrom::End(0))?;
        file.seek(SeekFrom::Start(0))?;
        Ok(end)
    } else {
        Ok(meta.len())
    }
}

/// Checks, before anything about the slot changes (before the pre-install
/// hook, before its record is cleared), that an image of `needed` bytes
/// fits the slot at `path`: reads only.
pub fn check_capacity(slot: SlotName, path: &Path, needed: u64) -> Result<(), SlotError> {
    let io = |action| {
        move |source| SlotError::Io {
            slot,
            path: path.to_owned(),
            action,
            source,
        }
    };
    match kind_of(slot, path)? {
        Some(SlotKind::BlockDevice) => {
            let file = File::open(path).map_err(io("open"))?;
            let capacity = capacity_of(&file).map_err(io("reading the size of"))?;
            check_fits(slot, path, SlotKind::BlockDevice, capacity, needed)
        }
        Some(SlotKind::File) => Ok(()),
        None if is_device_path(path) => Err(SlotError::MissingDevice {
            slot,
            path: path.to_owned(),
        }),
        None => Ok(()),
    }
}

/// [`check_capacity`] off the async threads.
pub async fn check_capacity_async(
    slot: SlotName,
    path: PathBuf,
    needed: u64,
) -> Result<(), SlotError> {
    let at = path.clone();
    tokio::task::spawn_blocking(move || check_capacity(slot, &path, needed))
        .await
        .unwrap_or_else(|e| {
            Err(SlotError::Io {
                slot,
                path: at,
                action: "checking the size of",
                source: std::io::Error::other(e.to_string()),
            })
        })
}

/// How long a block device found busy is tried again: the journal thread
/// of an install attempt just cancelled may still hold it for its last
/// sync, and it lets go within that.
const BUSY_WAIT: Duration = Duration::from_secs(5);

/// Opens the slot at `path` to write an image of `image_size` bytes: a
/// block device exclusively, at least that large, never resized; a file
/// (created if missing outside `/dev`) set to exactly that size. Blocking.
pub fn open_for_writing(
    slot: SlotName,
    path: &Path,
    image_size: u64,
) -> Result<OpenSlot, SlotError> {
    open_waiting(slot, path, image_size, BUSY_WAIT)
}

fn open_waiting(
    slot: SlotName,
    path: &Path,
    image_size: u64,
    busy_wait: Duration,
) -> Result<OpenSlot, SlotError> {
    let io = |action| {
        move |source| SlotError::Io {
            slot,
            path: path.to_owned(),
            action,
            source,
        }
    };
    let kind = match kind_of(slot, path)? {
        Some(kind) => kind,
        None if is_device_path(path) => {
            return Err(SlotError::MissingDevice {
                slot,
                path: path.to_owned(),
            })
        }
        None => SlotKind::File,
    };
    match kind {
        SlotKind::BlockDevice => {
            let since = Instant::now();
            let file = loop {
                let opened = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .custom_flags(libc::O_EXCL)
                    .open(path);
                match opened {
                    Ok(file) => break file,
                    Err(e)
                        if e.raw_os_error() == Some(libc::EBUSY) && since.elapsed() < busy_wait =>
                    {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    Err(source) if source.raw_os_error() == Some(libc::EBUSY) => {
                        return Err(SlotError::Busy {
                            slot,
                            path: path.to_owned(),
                            source,
                        })
                    }
                    Err(source) => return Err(io("open")(source)),
                }
            };
            // Replaced between the look and the open: judge what was opened.
            if !file
                .metadata()
                .map_err(io("stat"))?
                .file_type()
                .is_block_device()
            {
                return Err(SlotError::NotASlot {
                    slot,
                    path: path.to_owned(),
                    what: "no longer a block device",
                });
            }
            let capacity = capacity_of(&file).map_err(io("reading the size of"))?;
            check_fits(slot, path, kind, capacity, image_size)?;
            Ok(OpenSlot { file, kind })
        }
        SlotKind::File => {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)
                .map_err(io("open"))?;
            let meta = file.metadata().map_err(io("stat"))?;
            if !meta.file_type().is_file() {
                // A device node appeared in its place: never resize one.
                return Err(SlotError::NotASlot {
                    slot,
                    path: path.to_owned(),
                    what: "no longer a regular file",
                });
            }
            // A file slot holds exactly the image: no stale tail from an older one.
            file.set_len(image_size)
                .map_err(io("setting the size of"))?;
            Ok(OpenSlot { file, kind })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_image_larger_than_a_block_device_is_refused_with_both_sizes() {
        let path = Path::new("/dev/mmcblk0p3");
        let err =
            check_fits(SlotName::B, path, SlotKind::BlockDevice, 1 << 20, 2 << 20).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::SlotTooSmall);
        let message = err.to_string();
        for part in [
            "slot b",
            "/dev/mmcblk0p3",
            "1048576",
            "2097152",
            "nothing was written",
        ] {
            assert!(message.contains(part), "{part:?} missing in {message}");
        }
        assert!(check_fits(SlotName::B, path, SlotKind::BlockDevice, 2 << 20, 2 << 20).is_ok());
        assert!(
            check_fits(SlotName::B, path, SlotKind::File, 0, 2 << 20).is_ok(),
            "a file slot grows"
        );
    }

    #[test]
    fn a_file_slot_is_created_and_set_to_exactly_the_image_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("slot-b.img");
        let opened = open_for_writing(SlotName::B, &path, 4096).unwrap();
        assert_eq!(opened.kind, SlotKind::File);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 4096);
        // A longer file from an older image loses its tail.
        std::fs::write(&path, vec![7u8; 10_000]).unwrap();
        drop(open_for_writing(SlotName::B, &path, 4096).unwrap());
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 4096);
        assert!(check_capacity(SlotName::B, &path, 1 << 40).is_ok());
    }

    #[test]
    fn a_missing_device_is_an_error_and_no_file_is_made_in_dev() {
        let path = Path::new("/dev/uplift-test-no-such-slot");
        let err = open_for_writing(SlotName::B, path, 4096).unwrap_err();
        assert!(matches!(err, SlotError::MissingDevice { .. }), "{err}");
        assert!(
            err.to_string().contains("/dev/uplift-test-no-such-slot"),
            "{err}"
        );
        assert!(!path.exists(), "nothing created in /dev");
        assert!(matches!(
            check_capacity(SlotName::B, path, 4096),
            Err(SlotError::MissingDevice { .. })
        ));
    }

    #[test]
    fn a_directory_or_a_character_device_is_not_a_slot() {
        let dir = tempfile::tempdir().unwrap();
        let err = open_for_writing(SlotName::A, dir.path(), 4096).unwrap_err();
        assert!(err.to_string().contains("a directory"), "{err}");
        let err = open_for_writing(SlotName::A, Path::new("/dev/null"), 4096).unwrap_err();
        assert!(err.to_string().contains("a character device"), "{err}");
        assert_eq!(err.kind(), ErrorKind::SlotIo);
    }

    /// A loop device over a file of `size` bytes of `fill`, detached on drop.
    struct Loop {
        device: PathBuf,
        backing: PathBuf,
        _dir: tempfile::TempDir,
    }

    impl Loop {
        /// `None` (and a message) where loop devices cannot be had, outside CI.
        fn attach(size: usize, fill: u8) -> Option<Self> {
            let dir = tempfile::tempdir().unwrap();
            let backing = dir.path().join("backing.img");
            std::fs::write(&backing, vec![fill; size]).unwrap();
            let out = std::process::Command::new("losetup")
                .args(["--find", "--show"])
                .arg(&backing)
                .output();
            match out {
                Ok(out) if out.status.success() => Some(Self {
                    device: PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()),
                    backing,
                    _dir: dir,
                }),
                _ if std::env::var_os("CI").is_some() => {
                    panic!("loop devices are needed under CI (root, losetup): {out:?}")
                }
                _ => {
                    eprintln!("SKIPPED: no loop device (needs root and losetup): {out:?}");
                    None
                }
            }
        }
    }

    impl Drop for Loop {
        fn drop(&mut self) {
            let _ = std::process::Command::new("losetup")
                .arg("--detach")
                .arg(&self.device)
                .status();
        }
    }

    #[test]
    fn a_block_device_is_measured_by_its_end_opened_exclusively_and_never_resized() {
        let Some(slot) = Loop::attach(1 << 20, 0xa5) else {
            return;
        };
        let path = slot.device.as_path();
        assert_eq!(std::fs::metadata(path).unwrap().len(), 0, "metadata says 0");
        let err = open_for_writing(SlotName::B, path, 2 << 20).unwrap_err();
        assert!(
            matches!(
                err,
                SlotError::TooSmall {
                    capacity: 1048576,
                    needed: 2097152,
                    ..
                }
            ),
            "{err}"
        );
        assert!(matches!(
            check_capacity(SlotName::B, path, 2 << 20),
            Err(SlotError::TooSmall { .. })
        ));
        check_capacity(SlotName::B, path, 1 << 20).unwrap();

        let opened = open_for_writing(SlotName::B, path, 4096).unwrap();
        assert_eq!(opened.kind, SlotKind::BlockDevice);
        assert_eq!(capacity_of(&opened.file).unwrap(), 1 << 20);
        // Held exclusively: a second writer is refused while it is open.
        let waited = Instant::now();
        let busy = open_waiting(SlotName::B, path, 4096, Duration::from_millis(200)).unwrap_err();
        assert!(
            waited.elapsed() >= Duration::from_millis(200),
            "tried again a while"
        );
        assert!(matches!(busy, SlotError::Busy { .. }), "{busy}");
        assert!(busy.to_string().contains("in use"), "{busy}");
        drop(opened);
        drop(open_for_writing(SlotName::B, path, 4096).unwrap());
        // Neither the device nor its backing file shrank to the image size.
        let file = File::open(path).unwrap();
        assert_eq!(capacity_of(&file).unwrap(), 1 << 20);
        assert_eq!(std::fs::metadata(&slot.backing).unwrap().len(), 1 << 20);
    }

    #[test]
    fn the_capacity_of_a_file_is_its_length() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, [1u8; 1234]).unwrap();
        assert_eq!(capacity_of(&File::open(&path).unwrap()).unwrap(), 1234);
    }
}
