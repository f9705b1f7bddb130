//! Crash-safe file replacement, the one way every Uplift component writes a
//! file that must never be seen half-written: agent state, boot
//! environments, stored chunks, release files, TLS keys and tokens, the
//! server's ready file.
//!
//! A reader, or the next boot after a power cut, sees the old content or
//! the complete new one: the bytes go to a temporary file in the same
//! directory (created by `tempfile`, with its final mode from the first
//! byte), which is synced, renamed over the target, and the directory
//! synced so the rename itself survives. Temporary files carry the
//! writer's process ID, so [`remove_stale_temps`] can later clear what a
//! killed writer left without ever touching a live writer's file.

use std::ffi::OsString;
use std::fs::{self, File, Permissions};
use std::io::Write;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

use tempfile::NamedTempFile;

/// Who may read the file once it is in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// `0644`: configuration, state, chunks, certificates.
    Public,
    /// `0600`: private keys and tokens. The temporary file is created with
    /// this mode, so the secret is never readable by others, not even for
    /// a moment.
    OwnerOnly,
}

impl Access {
    fn mode(self) -> u32 {
        match self {
            Access::Public => 0o644,
            Access::OwnerOnly => 0o600,
        }
    }
}

/// Replaces (or creates) `path` with `bytes`; see the module docs. The
/// error is the file system's, without the path: callers add which file
/// and why.
pub fn replace_file(path: &Path, bytes: &[u8], access: Access) -> std::io::Result<()> {
    replace(path, bytes, access, Durability::Synced)
}

/// Puts `bytes` at `path` by rename, so a reader never sees a partial file,
/// but without syncing: a crash may lose the file, never show it torn.
/// Only for files that every reader checks by their digest and that their
/// writer rebuilds when missing or damaged (a release's chunks and
/// patches, thousands per release, where a sync each would cost seconds).
pub fn replace_file_unsynced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    replace(path, bytes, Access::Public, Durability::Unsynced)
}

/// Creates `path` with `bytes`, complete or not at all, and only if it does
/// not exist yet: an existing file (which may hold state nobody should
/// reset, or a key in use) is left alone and the error's kind is
/// [`std::io::ErrorKind::AlreadyExists`]. Synced like [`replace_file`].
pub fn create_file(path: &Path, bytes: &[u8], access: Access) -> std::io::Result<()> {
    let file = synced_temp(path, bytes, access)?;
    // No-clobber rename (or link where the kernel lacks it): atomic
    // "create if absent" for a whole file, which `create_new` on the
    // target itself is not — a crash there leaves a torn file.
    file.persist_noclobber(path).map_err(|e| e.error)?;
    sync_dir(path)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Durability {
    Synced,
    Unsynced,
}

fn replace(
    path: &Path,
    bytes: &[u8],
    access: Access,
    durability: Durability,
) -> std::io::Result<()> {
    let file = match durability {
        Durability::Synced => synced_temp(path, bytes, access)?,
        Durability::Unsynced => written_temp(path, bytes, access)?,
    };
    file.persist(path).map_err(|e| e.error)?;
    if durability == Durability::Synced {
        sync_dir(path)?;
    }
    Ok(())
}

/// A temporary sibling of `path` holding `bytes`, with its final mode; it
/// is removed again when dropped before being persisted.
fn written_temp(path: &Path, bytes: &[u8], access: Access) -> std::io::Result<NamedTempFile> {
    let mode = Permissions::from_mode(access.mode());
    let mut file = tempfile::Builder::new()
        .prefix(&temp_prefix(path, std::process::id())?)
        .permissions(mode.clone())
        .tempfile_in(parent_dir(path))?;
    // The mode asked for, whatever the umask.
    file.as_file().set_permissions(mode)?;
    file.write_all(bytes)?;
    Ok(file)
}

fn synced_temp(path: &Path, bytes: &[u8], access: Access) -> std::io::Result<NamedTempFile> {
    let file = written_temp(path, bytes, access)?;
    file.as_file().sync_all()?;
    Ok(file)
}

fn sync_dir(path: &Path) -> std::io::Result<()> {
    File::open(parent_dir(path))?.sync_all()
}

/// `.NAME.tmp-PID-`: hidden from casual listings, unique per writer (the
/// random suffix `tempfile` adds makes it unique per call), and telling
/// [`remove_stale_temps`] whose it is.
fn temp_prefix(path: &Path, pid: u32) -> std::io::Result<OsString> {
    let name = path.file_name().ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the path has no file name",
        )
    })?;
    let mut prefix = OsString::from(".");
    prefix.push(name);
    prefix.push(format!(".tmp-{pid}-"));
    Ok(prefix)
}

/// Removes the temporary files that writers of `path` killed mid-write left
/// beside it (a boot partition is small, and every crash would otherwise
/// leave one). Only files of processes that no longer exist are touched,
/// and only where `/proc` can tell: a live writer's file is never removed.
/// Best effort: what cannot be read or removed stays.
pub fn remove_stale_temps(path: &Path) {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return;
    };
    if !Path::new("/proc/self").exists() {
        return;
    }
    let prefix = format!(".{name}.tmp-");
    let Ok(entries) = fs::read_dir(parent_dir(path)) else {
        return;
    };
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(pid) = file_name
            .to_str()
            .and_then(|n| n.strip_prefix(&prefix))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = fs::remove_file(entry.path());
        }
    }
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode_of(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn a_file_is_created_then_replaced_whole_leaving_no_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        replace_file(&path, b"first", Access::Public).unwrap();
        replace_file(&path, b"second, longer", Access::Public).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second, longer");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("state.json")]);
    }

    #[test]
    fn a_secret_is_owner_only_even_over_a_world_readable_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin-token");
        std::fs::write(&path, "old").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        replace_file(&path, b"new secret", Access::OwnerOnly).unwrap();
        assert_eq!(mode_of(&path), 0o600);
        replace_file(&path, b"public now", Access::Public).unwrap();
        assert_eq!(mode_of(&path) & 0o044, 0o044, "the mode asked for wins");
    }

    #[test]
    fn an_unsynced_replacement_is_still_whole_and_public() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chunk");
        replace_file_unsynced(&path, b"old").unwrap();
        replace_file_unsynced(&path, b"new bytes").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new bytes");
        assert_eq!(mode_of(&path), 0o644);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_dead_writers_temp_file_is_swept_and_a_live_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("grubenv");
        replace_file(&path, b"env", Access::Public).unwrap();
        // A PID above the kernel's maximum (4194304) is never alive.
        let dead = temp_prefix(&path, 4_194_305).unwrap();
        let live = temp_prefix(&path, std::os::unix::process::parent_id()).unwrap();
        let mut dead_name = dead.clone();
        dead_name.push("abc123");
        let mut live_name = live.clone();
        live_name.push("def456");
        std::fs::write(dir.path().join(&dead_name), "torn").unwrap();
        std::fs::write(dir.path().join(&live_name), "in progress").unwrap();
        std::fs::write(dir.path().join(".other.tmp-4194305-x"), "not ours").unwrap();
        remove_stale_temps(&path);
        let mut names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        let mut expected = vec![
            OsString::from(".other.tmp-4194305-x"),
            live_name,
            OsString::from("grubenv"),
        ];
        expected.sort();
        assert_eq!(names, expected);
    }

    #[test]
    fn create_writes_a_new_file_but_never_overwrites_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("release.key");
        create_file(&path, b"key one", Access::OwnerOnly).unwrap();
        assert_eq!(mode_of(&path), 0o600);
        let err = create_file(&path, b"key two", Access::OwnerOnly).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&path).unwrap(), b"key one");
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "the refused attempt leaves no temporary file"
        );
    }

    #[test]
    fn a_missing_directory_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let err = replace_file(&dir.path().join("no/such/file"), b"x", Access::Public).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
    }
}
