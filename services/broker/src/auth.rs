//! Username/password checks against a Mosquitto password file.
//!
//! Labs already know `mosquitto_passwd`; reading its format means users are managed
//! with that tool and no clear-text password is stored. Supported hashes: `$7$`
//! (PBKDF2-HMAC-SHA512, Mosquitto 2.x default) and `$6$` (salted SHA-512, 1.x).

use std::collections::HashMap;
use std::path::Path;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use sha2::{Digest, Sha512};

/// One stored credential.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Hash {
    Pbkdf2Sha512 {
        iterations: u32,
        salt: Vec<u8>,
        hash: Vec<u8>,
    },
    Sha512 {
        salt: Vec<u8>,
        hash: Vec<u8>,
    },
}

/// The users of a password file.
#[derive(Debug, Clone, Default)]
pub struct PasswordFile {
    users: HashMap<String, Hash>,
}

/// A password file that cannot be used, with the line at fault.
#[derive(Debug, thiserror::Error)]
pub enum PasswordFileError {
    /// The file could not be read.
    #[error("cannot read password file {path}: {reason}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        reason: std::io::Error,
    },
    /// A line is not `user:$7$...` or `user:$6$...`.
    #[error("password file {path}, line {line}: {message}")]
    Line {
        /// The file.
        path: String,
        /// 1-based line.
        line: usize,
        /// What is wrong.
        message: String,
    },
}

impl PasswordFile {
    /// Reads and parses a password file.
    pub fn load(path: &Path) -> Result<Self, PasswordFileError> {
        let text = std::fs::read_to_string(path).map_err(|reason| PasswordFileError::Read {
            path: path.display().to_string(),
            reason,
        })?;
        Self::parse(&text).map_err(|(line, message)| PasswordFileError::Line {
            path: path.display().to_string(),
            line,
            message,
        })
    }

    /// Parses file text; errors are (line, message).
    pub fn parse(text: &str) -> Result<Self, (usize, String)> {
        let mut users = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim_end_matches('\r');
            if line.trim().is_empty() || line.starts_with('#') {
                continue;
            }
            let (user, hash) = line.split_once(':').ok_or((
                i + 1,
                "expected `user:hash` (create entries with mosquitto_passwd)".to_string(),
            ))?;
            if user.is_empty() {
                return Err((i + 1, "empty username".into()));
            }
            let hash = parse_hash(hash).map_err(|m| (i + 1, format!("user `{user}`: {m}")))?;
            users.insert(user.to_string(), hash);
        }
        Ok(PasswordFile { users })
    }

    /// Number of users.
    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// Whether the file has no users.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// Whether `user` is an account of the file.
    pub fn contains(&self, user: &str) -> bool {
        self.users.contains_key(user)
    }

    /// Whether `password` is right for `user`. Unknown users take as long as known ones.
    pub fn verify(&self, user: &str, password: &str) -> bool {
        match self.users.get(user) {
            Some(Hash::Pbkdf2Sha512 {
                iterations,
                salt,
                hash,
            }) => {
                let mut out = vec![0u8; hash.len()];
                pbkdf2::pbkdf2_hmac::<Sha512>(password.as_bytes(), salt, *iterations, &mut out);
                constant_time_eq(&out, hash)
            }
            Some(Hash::Sha512 { salt, hash }) => {
                let mut d = Sha512::new();
                d.update(password.as_bytes());
                d.update(salt);
                constant_time_eq(&d.finalize(), hash)
            }
            None => {
                let mut out = [0u8; 64];
                pbkdf2::pbkdf2_hmac::<Sha512>(password.as_bytes(), b"no-such-user", 101, &mut out);
                false
            }
        }
    }
}

fn parse_hash(s: &str) -> Result<Hash, String> {
    let b64 = |part: &str, what: &str| {
        STANDARD
            .decode(part)
            .map_err(|_| format!("{what} is not base64"))
    };
    let parts: Vec<&str> = s.split('$').collect();
    match parts.as_slice() {
        ["", "7", iterations, salt, hash] => {
            let iterations: u32 = iterations
                .parse()
                .ok()
                .filter(|n| *n > 0)
                .ok_or("iteration count is not a positive number")?;
            let hash = b64(hash, "hash")?;
            if hash.is_empty() {
                return Err("empty hash".into());
            }
            Ok(Hash::Pbkdf2Sha512 { iterations, salt: b64(salt, "salt")?, hash })
        }
        ["", "6", salt, hash] => {
            let hash = b64(hash, "hash")?;
            if hash.len() != 64 {
                return Err("a $6$ hash must be 64 bytes".into());
            }
            Ok(Hash::Sha512 { salt: b64(salt, "salt")?, hash })
        }
        _ => Err("unsupported hash: expected $7$ (mosquitto_passwd) or $6$; clear-text passwords are not accepted".into()),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Creates a `$7$` entry (`user:$7$101$salt$hash`) for `password`, as `mosquitto_passwd`
/// would; used by `dcs` to create the services' account on first start.
pub fn hash_entry(user: &str, password: &str) -> String {
    use rand::RngCore;
    let mut salt = [0u8; 12];
    rand::thread_rng().fill_bytes(&mut salt);
    let mut out = [0u8; 64];
    pbkdf2::pbkdf2_hmac::<Sha512>(password.as_bytes(), &salt, 101, &mut out);
    format!(
        "{user}:$7$101${}${}",
        STANDARD.encode(salt),
        STANDARD.encode(out)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    // Made with `mosquitto_passwd -b -c pw alice s3cret` (Mosquitto 2.0.11).
    const ALICE: &str = "alice:$7$101$A4ZHLsuMM+NzxPM2$AGuo0ReuABnaPoO9y9K7z8PCWur+winy5U32oLSDitRpKGw0TUf3cVpYENhZhcFK/fac4+kMhCTjJ3qYmHOwRA==";

    #[test]
    fn verifies_mosquitto_passwd_output() {
        let f = PasswordFile::parse(&format!("# users\n{ALICE}\n")).unwrap();
        assert_eq!(f.len(), 1);
        assert!(f.verify("alice", "s3cret"));
        assert!(!f.verify("alice", "s3cret "));
        assert!(!f.verify("bob", "s3cret"));
    }

    #[test]
    fn own_entries_round_trip() {
        let f = PasswordFile::parse(&hash_entry("dcs", "pw:with$odd")).unwrap();
        assert!(f.verify("dcs", "pw:with$odd"));
        assert!(!f.verify("dcs", "pw"));
    }

    #[test]
    fn salted_sha512() {
        let salt = b"saltsalt";
        let mut d = Sha512::new();
        d.update(b"pw");
        d.update(salt);
        let line = format!(
            "u:$6${}${}",
            STANDARD.encode(salt),
            STANDARD.encode(d.finalize())
        );
        assert!(PasswordFile::parse(&line).unwrap().verify("u", "pw"));
    }

    #[test]
    fn bad_lines_are_located() {
        let (line, msg) = PasswordFile::parse("# c\nalice:plaintext\n").unwrap_err();
        assert_eq!(line, 2);
        assert!(msg.contains("clear-text"), "{msg}");
        let (line, _) = PasswordFile::parse("nocolon\n").unwrap_err();
        assert_eq!(line, 1);
        let (_, msg) = PasswordFile::parse("a:$7$0$AAAA$AAAA\n").unwrap_err();
        assert!(msg.contains("iteration"), "{msg}");
        let (_, msg) = PasswordFile::parse("a:$7$101$!!$AAAA\n").unwrap_err();
        assert!(msg.contains("base64"), "{msg}");
    }
}
