//! Secret files: bearer tokens, passwords, OAuth client secrets and keys, keytabs.
//!
//! A configured secret is either a path or a bare name. A bare name (no `/`) is a systemd
//! credential, resolved in `$CREDENTIALS_DIRECTORY` (the unit's `LoadCredential=`), so the secret
//! can live outside `/etc/cardbridge` and reach the service without being readable by anyone
//! else. A path must be a file that neither group nor others can read: a secret readable by
//! every local account is refused at startup with the fix, because on a kiosk "every local
//! account" includes the browser. Files in the credentials directory are exempt: systemd makes
//! them readable by the service alone.

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use thiserror::Error;

/// The most a secret file may hold; a keytab of a computer account is a few hundred bytes.
const MAX_SECRET: u64 = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SecretError {
    #[error("{key}: {name:?} is a credential name, but $CREDENTIALS_DIRECTORY is not set; give a path, or load it with LoadCredential={name}:<file> in the unit")]
    NoCredentialsDirectory { key: String, name: String },
    #[error("{key}: cannot read {path}: {detail}")]
    Unreadable {
        key: String,
        path: PathBuf,
        detail: String,
    },
    #[error("{key}: {path} can be read by group or others (mode {mode:04o}); run `chmod 600 {path}` (owned by the service user), or load it with LoadCredential=")]
    TooOpen {
        key: String,
        path: PathBuf,
        mode: u32,
    },
    #[error("{key}: {path} is {what}, not a file; set {key} to the file itself")]
    NotAFile {
        key: String,
        path: PathBuf,
        what: &'static str,
    },
    #[error("{key}: {path} is larger than 1 MiB, which no secret is")]
    TooLarge { key: String, path: PathBuf },
    #[error("{key}: {path} is empty")]
    Empty { key: String, path: PathBuf },
}

/// A secret's location, resolved once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretPath {
    /// The configuration key, for messages (`cm.keytab`).
    key: String,
    path: PathBuf,
    /// In `$CREDENTIALS_DIRECTORY`: systemd guards it, so its mode is not checked.
    credential: bool,
}

impl SecretPath {
    /// Resolves a configured value: a bare name in `$CREDENTIALS_DIRECTORY`, else the path.
    pub fn resolve(key: &str, configured: &Path) -> Result<SecretPath, SecretError> {
        let bare = configured.components().count() == 1
            && !configured.as_os_str().to_string_lossy().contains('/');
        if !bare {
            return Ok(SecretPath {
                key: key.to_string(),
                path: configured.to_path_buf(),
                credential: false,
            });
        }
        let dir = std::env::var_os("CREDENTIALS_DIRECTORY").ok_or_else(|| {
            SecretError::NoCredentialsDirectory {
                key: key.to_string(),
                name: configured.display().to_string(),
            }
        })?;
        Ok(SecretPath {
            key: key.to_string(),
            path: Path::new(&dir).join(configured),
            credential: true,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Refuses what is not a file (a directory's mode says nothing about a secret), and a file
    /// that group or others can read. A missing file passes: it may appear later (a keytab an
    /// administrator is about to copy), and reading it will say so.
    pub fn check_mode(&self) -> Result<(), SecretError> {
        let meta = std::fs::metadata(&self.path);
        if let Some(meta) = meta.as_ref().ok().filter(|m| !m.is_file()) {
            return Err(SecretError::NotAFile {
                key: self.key.clone(),
                path: self.path.clone(),
                what: if meta.is_dir() {
                    "a directory"
                } else {
                    "not a regular file"
                },
            });
        }
        if self.credential {
            return Ok(());
        }
        match meta {
            Ok(meta) if meta.mode() & 0o077 != 0 => Err(SecretError::TooOpen {
                key: self.key.clone(),
                path: self.path.clone(),
                mode: meta.mode() & 0o7777,
            }),
            _ => Ok(()),
        }
    }

    /// Reads the whole secret (bounded), after the mode check.
    pub fn read(&self) -> Result<Vec<u8>, SecretError> {
        self.check_mode()?;
        let unreadable = |e: std::io::Error| SecretError::Unreadable {
            key: self.key.clone(),
            path: self.path.clone(),
            detail: e.to_string(),
        };
        let file = std::fs::File::open(&self.path).map_err(unreadable)?;
        let mut bytes = Vec::new();
        file.take(MAX_SECRET + 1)
            .read_to_end(&mut bytes)
            .map_err(unreadable)?;
        if bytes.len() as u64 > MAX_SECRET {
            return Err(SecretError::TooLarge {
                key: self.key.clone(),
                path: self.path.clone(),
            });
        }
        Ok(bytes)
    }

    /// Reads a one-line text secret (a token, a password, a client secret), trimmed.
    pub fn read_text(&self) -> Result<String, SecretError> {
        let bytes = self.read()?;
        let text = String::from_utf8_lossy(&bytes).trim().to_string();
        if text.is_empty() {
            return Err(SecretError::Empty {
                key: self.key.clone(),
                path: self.path.clone(),
            });
        }
        Ok(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn temp(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("cardbridge-secret-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_secret_readable_by_others_is_refused_with_the_fix() {
        let dir = temp("open");
        let file = dir.join("secret");
        std::fs::write(&file, "hunter2\n").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let secret = SecretPath::resolve("scepman.client_secret_file", &file).unwrap();
        let e = secret.read_text().unwrap_err();
        let text = e.to_string();
        assert!(
            matches!(e, SecretError::TooOpen { mode: 0o644, .. }),
            "{e:?}"
        );
        assert!(
            text.contains("chmod 600") && text.contains(&file.display().to_string()),
            "{text}"
        );
        assert!(!text.contains("hunter2"));
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(secret.read_text().unwrap(), "hunter2");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn missing_empty_and_oversized_secrets_are_named() {
        let dir = temp("bad");
        let missing = SecretPath::resolve("cm.token_file", &dir.join("nope")).unwrap();
        assert!(
            missing.check_mode().is_ok(),
            "a missing file is reported when read"
        );
        assert!(matches!(
            missing.read(),
            Err(SecretError::Unreadable { .. })
        ));
        let empty = dir.join("empty");
        std::fs::write(&empty, "\n").unwrap();
        std::fs::set_permissions(&empty, std::fs::Permissions::from_mode(0o600)).unwrap();
        let e = SecretPath::resolve("cm.token_file", &empty)
            .unwrap()
            .read_text();
        assert!(matches!(e, Err(SecretError::Empty { .. })), "{e:?}");
        let big = dir.join("big");
        std::fs::write(&big, vec![b'x'; (MAX_SECRET + 1) as usize]).unwrap();
        std::fs::set_permissions(&big, std::fs::Permissions::from_mode(0o600)).unwrap();
        let e = SecretPath::resolve("cm.keytab", &big).unwrap().read();
        assert!(matches!(e, Err(SecretError::TooLarge { .. })), "{e:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_relative_path_with_a_directory_is_a_path_not_a_credential() {
        let p = SecretPath::resolve("cm.keytab", Path::new("conf/station.keytab")).unwrap();
        assert_eq!(p.path(), Path::new("conf/station.keytab"));
        assert!(!p.credential);
    }
}
