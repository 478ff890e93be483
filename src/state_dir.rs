//! The state directory holds the database (card ids, revocations with their revokers, the audit
//! trail) and the generated API token, so it is the service user's alone, whatever the umask
//! of whoever started cardbridge: the directory 0700, its files 0600, and nothing in it written
//! through a file or a symlink someone else left there.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum StateDirError {
    #[error("cannot create the state directory {path}: {source}")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the state directory {path} belongs to uid {owner}, not to this user (uid {uid}); chown it to the service user")]
    Owner { path: PathBuf, owner: u32, uid: u32 },
    #[error("cannot make {path} private (mode {mode:04o}): {source}")]
    Mode {
        path: PathBuf,
        mode: u32,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Creates the directory (mode 0700) or checks the existing one: it must belong to this user
/// (root may use any), and is made 0700 when it is more open.
pub fn prepare(dir: &Path) -> Result<(), StateDirError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| StateDirError::Create {
            path: dir.to_path_buf(),
            source,
        })?;
    let meta = std::fs::metadata(dir).map_err(|source| StateDirError::Create {
        path: dir.to_path_buf(),
        source,
    })?;
    let uid = nix::unistd::geteuid().as_raw();
    if meta.uid() != uid && uid != 0 {
        return Err(StateDirError::Owner {
            path: dir.to_path_buf(),
            owner: meta.uid(),
            uid,
        });
    }
    if meta.uid() == uid && meta.mode() & 0o077 != 0 {
        restrict(dir, meta.mode(), 0o700)?;
    }
    Ok(())
}

/// Makes an existing file of this user 0600 (the database and its WAL files).
pub fn make_private(path: &Path) -> Result<(), StateDirError> {
    match std::fs::symlink_metadata(path) {
        Ok(meta)
            if meta.is_file()
                && meta.uid() == nix::unistd::geteuid().as_raw()
                && meta.mode() & 0o077 != 0 =>
        {
            restrict(path, meta.mode(), 0o600)
        }
        _ => Ok(()),
    }
}

fn restrict(path: &Path, mode: u32, wanted: u32) -> Result<(), StateDirError> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(wanted)).map_err(|source| {
        StateDirError::Mode {
            path: path.to_path_buf(),
            mode: mode & 0o7777,
            source,
        }
    })
}

/// Replaces `dir/name` with `contents` in a new file of mode 0600: written to a fresh temporary
/// name (`O_EXCL | O_NOFOLLOW`, so nothing planted there is reused or followed), synced, then
/// renamed over the old one, which replaces a symlink rather than writing through it.
pub fn write_private(dir: &Path, name: &str, contents: &[u8]) -> Result<PathBuf, StateDirError> {
    let path = dir.join(name);
    let suffix = crate::random::random_hex::<8>().map_err(|e| StateDirError::Write {
        path: path.clone(),
        source: std::io::Error::other(e.to_string()),
    })?;
    let temporary = dir.join(format!(".{name}.{suffix}"));
    let write = |source| StateDirError::Write {
        path: path.clone(),
        source,
    };
    let result = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(&temporary)?;
        file.write_all(contents)?;
        file.sync_all()?;
        std::fs::rename(&temporary, &path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temporary);
    }
    result.map_err(write)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("cardbridge-state-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn an_open_directory_is_made_private() {
        let dir = temp("open");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        prepare(&dir).unwrap();
        assert_eq!(std::fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
        let fresh = dir.join("a/b");
        prepare(&fresh).unwrap();
        assert_eq!(std::fs::metadata(&fresh).unwrap().mode() & 0o777, 0o700);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_secret_replaces_an_open_file_and_a_symlink_without_writing_through() {
        let dir = temp("token");
        std::fs::create_dir_all(&dir).unwrap();
        let token = dir.join("api-token");
        std::fs::write(&token, "old").unwrap();
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_private(&dir, "api-token", b"new").unwrap();
        let meta = std::fs::metadata(&token).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600);
        assert_eq!(std::fs::read(&token).unwrap(), b"new");

        let victim = dir.join("victim");
        std::fs::write(&victim, "precious").unwrap();
        std::fs::remove_file(&token).unwrap();
        std::os::unix::fs::symlink(&victim, &token).unwrap();
        write_private(&dir, "api-token", b"newer").unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert!(!std::fs::symlink_metadata(&token)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(std::fs::read(&token).unwrap(), b"newer");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
