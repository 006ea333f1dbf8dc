//! Username/password authentication for the local endpoint, from a password file of
//! `username:$argon2id$...` lines (PHC strings, as `edgerelay hash-password` prints).
//!
//! Invariants: passwords are never logged; verification is CPU- and memory-heavy by
//! design (argon2), so it runs off the executor and at most `MAX_CONCURRENT_VERIFY` at a
//! time — a flood of bad CONNECTs cannot exhaust memory; an unknown user costs the same
//! as a wrong password, so user names cannot be probed by timing.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use argon2::Argon2;
use tokio::sync::Semaphore;

const MAX_CONCURRENT_VERIFY: usize = 2;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("cannot read password file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("password file {path} line {line}: {reason}")]
    Line {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("cannot hash password: {0}")]
    Hash(String),
}

#[derive(Debug)]
pub struct PasswordFile {
    users: HashMap<String, String>,
    /// Verified against when the user is unknown, so that path costs the same.
    decoy: String,
    limit: Arc<Semaphore>,
}

impl PasswordFile {
    pub fn load(path: &Path) -> Result<Self, AuthError> {
        let text = std::fs::read_to_string(path).map_err(|source| AuthError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Self, AuthError> {
        let mut users = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |reason: &str| AuthError::Line {
                path: path.to_path_buf(),
                line: i + 1,
                reason: reason.to_owned(),
            };
            let (user, hash) = line
                .split_once(':')
                .ok_or_else(|| bad("expected username:hash"))?;
            if user.is_empty() {
                return Err(bad("empty username"));
            }
            PasswordHash::new(hash).map_err(|e| {
                bad(&format!(
                    "not a PHC password hash ({e}); create one with `edgerelay hash-password`"
                ))
            })?;
            users.insert(user.to_owned(), hash.to_owned());
        }
        Ok(Self {
            users,
            decoy: hash_password("edgerelay-decoy")?,
            limit: Arc::new(Semaphore::new(MAX_CONCURRENT_VERIFY)),
        })
    }

    /// Check credentials off the executor; `false` for anything but a match.
    pub async fn verify(self: &Arc<Self>, user: Option<&str>, password: Option<&str>) -> bool {
        let Ok(_permit) = self.limit.clone().acquire_owned().await else {
            return false;
        };
        let known = user.and_then(|u| self.users.get(u)).cloned();
        let hash = known.clone().unwrap_or_else(|| self.decoy.clone());
        let password = password.unwrap_or_default().to_owned();
        let ok = tokio::task::spawn_blocking(move || {
            PasswordHash::new(&hash).is_ok_and(|h| {
                Argon2::default()
                    .verify_password(password.as_bytes(), &h)
                    .is_ok()
            })
        })
        .await
        .unwrap_or(false);
        ok && known.is_some()
    }
}

/// A PHC string (argon2id, random salt) for a password-file line.
pub fn hash_password(password: &str) -> Result<String, AuthError> {
    Argon2::default()
        .hash_password(password.as_bytes())
        .map(|h| h.to_string())
        .map_err(|e| AuthError::Hash(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn verifies_only_the_right_password() {
        let line = format!(
            "dev1:{}\n# comment\n\n",
            hash_password("s3cret").expect("hash")
        );
        let file = Arc::new(PasswordFile::parse(&line, Path::new("pw")).expect("parse"));
        assert!(file.verify(Some("dev1"), Some("s3cret")).await);
        assert!(!file.verify(Some("dev1"), Some("wrong")).await);
        assert!(!file.verify(Some("nobody"), Some("s3cret")).await);
        assert!(!file.verify(None, None).await);
    }

    #[test]
    fn bad_lines_name_the_line() {
        let err = PasswordFile::parse(
            "ok:$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA\nbroken\n",
            Path::new("/etc/pw"),
        )
        .expect_err("bad");
        assert!(err.to_string().contains("line 2"), "{err}");
        let err = PasswordFile::parse("u:plaintext\n", Path::new("/etc/pw")).expect_err("bad");
        assert!(err.to_string().contains("hash-password"), "{err}");
    }
}
