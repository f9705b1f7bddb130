//! Release signing keys (ed25519): the secret half stays with whoever builds
//! releases, the public half is configured on agents as a trusted key.

use crate::error::ReleaseError;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use ed25519_dalek::{SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fmt;
use std::io::Read;
use std::path::Path;
use std::str::FromStr;

/// Prefix of the public key's text form, so a key of another algorithm can
/// be added later without ambiguity.
const PUBLIC_KEY_PREFIX: &str = "ed25519:";
/// Key files are tiny; the bound keeps a wrong path (a disk image, /dev/zero)
/// from being read into memory.
const MAX_KEY_FILE_BYTES: u64 = 64 * 1024;

/// The secret key that signs release manifests.
pub struct ReleaseSigningKey(SigningKey);

impl ReleaseSigningKey {
    pub fn generate() -> Self {
        Self(SigningKey::generate(&mut rand::rngs::OsRng))
    }

    /// Deterministic key, for tests and reproducible fixtures only.
    pub fn from_seed(bytes: [u8; 32]) -> Self {
        Self(SigningKey::from_bytes(&bytes))
    }

    pub fn to_pkcs8_pem(&self) -> String {
        self.0
            .to_pkcs8_pem(LineEnding::LF)
            .expect("an ed25519 key always encodes as PKCS#8")
            .to_string()
    }

    pub fn from_pkcs8_pem(pem: &str) -> Result<Self, ReleaseError> {
        SigningKey::from_pkcs8_pem(pem)
            .map(Self)
            .map_err(|e| ReleaseError::InvalidKey {
                what: "release signing key (PKCS#8 PEM)".to_owned(),
                reason: format!("{e}; expected a PEM 'PRIVATE KEY' block holding an ed25519 key"),
            })
    }

    /// Writes the key as PKCS#8 PEM, readable only by the owner. An existing
    /// file is never replaced: losing a release key strands every device
    /// that trusts it.
    pub fn write_to_file(&self, path: &Path) -> Result<(), ReleaseError> {
        uplift_files::create_file(
            path,
            self.to_pkcs8_pem().as_bytes(),
            uplift_files::Access::OwnerOnly,
        )
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                ReleaseError::KeyFileExists {
                    path: path.to_owned(),
                }
            } else {
                ReleaseError::io("write the key file", path, e)
            }
        })
    }

    pub fn read_from_file(path: &Path) -> Result<Self, ReleaseError> {
        let text = read_small_text(path, "read the signing key file")?;
        Self::from_pkcs8_pem(&text).map_err(|e| match e {
            ReleaseError::InvalidKey { reason, .. } => ReleaseError::InvalidKey {
                what: format!("release signing key in {}", path.display()),
                reason,
            },
            other => other,
        })
    }

    pub fn public_key(&self) -> ReleasePublicKey {
        ReleasePublicKey(self.0.verifying_key())
    }

    pub(crate) fn signing_key(&self) -> &SigningKey {
        &self.0
    }
}

impl fmt::Debug for ReleaseSigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReleaseSigningKey")
            .field("key_id", &self.public_key().key_id())
            .finish_non_exhaustive()
    }
}

/// A trusted release key. Text form: `ed25519:<base64 of the 32 bytes>`.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct ReleasePublicKey(VerifyingKey);

impl ReleasePublicKey {
    /// Short identifier carried in signatures so a verifier can pick the
    /// right key without trying them all.
    pub fn key_id(&self) -> String {
        let digest = Sha256::digest(self.0.as_bytes());
        hex::encode(&digest[..8])
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        self.0.as_bytes()
    }

    pub(crate) fn verifying_key(&self) -> &VerifyingKey {
        &self.0
    }
}

impl fmt::Display for ReleasePublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PUBLIC_KEY_PREFIX}{}", B64.encode(self.0.as_bytes()))
    }
}

impl FromStr for ReleasePublicKey {
    type Err = ReleaseError;

    fn from_str(s: &str) -> Result<Self, ReleaseError> {
        let invalid = |reason: String| ReleaseError::InvalidKey {
            what: format!(
                "release public key {:?}",
                s.chars().take(80).collect::<String>()
            ),
            reason,
        };
        let b64 = s.strip_prefix(PUBLIC_KEY_PREFIX).ok_or_else(|| {
            invalid(format!(
                "must start with {PUBLIC_KEY_PREFIX:?} followed by base64"
            ))
        })?;
        let bytes = B64
            .decode(b64)
            .map_err(|e| invalid(format!("not standard base64: {e}")))?;
        let bytes: [u8; 32] = bytes
            .try_into()
            .map_err(|b: Vec<u8>| invalid(format!("is {} bytes, must be 32", b.len())))?;
        let key = VerifyingKey::from_bytes(&bytes)
            .map_err(|_| invalid("is not a valid ed25519 point".to_owned()))?;
        // A small-order key would accept forged signatures under lax
        // verification; there is no legitimate reason to trust one.
        if key.is_weak() {
            return Err(invalid("is a weak (small-order) ed25519 key".to_owned()));
        }
        Ok(Self(key))
    }
}

impl Serialize for ReleasePublicKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ReleasePublicKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Writes the public key's text form as one line.
pub fn write_public_key_file(path: &Path, key: &ReleasePublicKey) -> Result<(), ReleaseError> {
    std::fs::write(path, format!("{key}\n"))
        .map_err(|e| ReleaseError::io("write the public key file", path, e))
}

pub fn read_public_key_file(path: &Path) -> Result<ReleasePublicKey, ReleaseError> {
    let text = read_small_text(path, "read the public key file")?;
    text.trim().parse().map_err(|e| match e {
        ReleaseError::InvalidKey { what, reason } => ReleaseError::InvalidKey {
            what: format!("{what} in {}", path.display()),
            reason,
        },
        other => other,
    })
}

fn read_small_text(path: &Path, action: &'static str) -> Result<String, ReleaseError> {
    let file = std::fs::File::open(path).map_err(|e| ReleaseError::io(action, path, e))?;
    let mut text = String::new();
    file.take(MAX_KEY_FILE_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| ReleaseError::io(action, path, e))?;
    if text.len() as u64 > MAX_KEY_FILE_BYTES {
        return Err(ReleaseError::InvalidKey {
            what: format!("key file {}", path.display()),
            reason: format!("is larger than {MAX_KEY_FILE_BYTES} bytes; is this the right file?"),
        });
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signing_key_round_trips_through_pem() {
        let key = ReleaseSigningKey::from_seed([7; 32]);
        let pem = key.to_pkcs8_pem();
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"), "{pem}");
        let back = ReleaseSigningKey::from_pkcs8_pem(&pem).unwrap();
        assert_eq!(back.public_key(), key.public_key());
    }

    #[test]
    fn garbage_pem_is_refused_as_bad_request() {
        let err =
            ReleaseSigningKey::from_pkcs8_pem("-----BEGIN PRIVATE KEY-----\nAAAA\n").unwrap_err();
        assert!(matches!(err, ReleaseError::InvalidKey { .. }), "{err}");
        assert_eq!(err.kind(), uplift_proto::ErrorKind::BadRequest);
    }

    #[test]
    fn public_key_round_trips_through_text_and_serde() {
        let public = ReleaseSigningKey::from_seed([1; 32]).public_key();
        let text = public.to_string();
        assert!(text.starts_with("ed25519:"), "{text}");
        assert_eq!(text.parse::<ReleasePublicKey>().unwrap(), public);
        let json = serde_json::to_string(&public).unwrap();
        assert_eq!(json, format!("\"{text}\""));
        assert_eq!(
            serde_json::from_str::<ReleasePublicKey>(&json).unwrap(),
            public
        );
    }

    #[test]
    fn key_id_is_16_hex_digits_of_the_public_key_digest() {
        let public = ReleaseSigningKey::from_seed([1; 32]).public_key();
        let id = public.key_id();
        assert_eq!(id.len(), 16);
        assert_eq!(id, hex::encode(&Sha256::digest(public.as_bytes())[..8]));
        assert_ne!(
            id,
            ReleaseSigningKey::from_seed([2; 32]).public_key().key_id()
        );
    }

    #[test]
    fn malformed_public_key_texts_are_refused() {
        let good = ReleaseSigningKey::from_seed([1; 32])
            .public_key()
            .to_string();
        let b64 = good.strip_prefix("ed25519:").unwrap();
        for bad in [
            b64.to_owned(),                               // missing algorithm prefix
            format!("rsa:{b64}"),                         // wrong algorithm
            format!("ed25519:{}", &b64[..20]),            // truncated
            "ed25519:!!!!".to_owned(),                    // not base64
            format!("ed25519:{}", B64.encode([0u8; 32])), // small-order point
        ] {
            assert!(bad.parse::<ReleasePublicKey>().is_err(), "accepted {bad}");
        }
    }

    #[test]
    fn debug_output_does_not_leak_the_secret() {
        let key = ReleaseSigningKey::from_seed([0xab; 32]);
        let debug = format!("{key:?}");
        // Neither the decimal nor the hex rendering of the secret bytes.
        assert!(!debug.contains("171, 171"), "{debug}");
        assert!(!debug.to_lowercase().contains("abababab"), "{debug}");
        assert!(debug.contains(&key.public_key().key_id()), "{debug}");
    }

    #[test]
    fn key_files_round_trip_with_owner_only_permissions() {
        let dir = tempfile::tempdir().unwrap();
        let key = ReleaseSigningKey::generate();
        let path = dir.path().join("release.key");
        key.write_to_file(&path).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let back = ReleaseSigningKey::read_from_file(&path).unwrap();
        assert_eq!(back.public_key(), key.public_key());

        let pub_path = dir.path().join("release.pub");
        write_public_key_file(&pub_path, &key.public_key()).unwrap();
        let text = std::fs::read_to_string(&pub_path).unwrap();
        assert_eq!(text.lines().count(), 1);
        assert_eq!(read_public_key_file(&pub_path).unwrap(), key.public_key());
    }

    #[test]
    fn writing_a_key_file_over_an_existing_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("release.key");
        let first = ReleaseSigningKey::from_seed([1; 32]);
        first.write_to_file(&path).unwrap();
        let err = ReleaseSigningKey::from_seed([2; 32])
            .write_to_file(&path)
            .unwrap_err();
        assert!(matches!(err, ReleaseError::KeyFileExists { .. }), "{err}");
        assert!(err.to_string().contains("refusing to overwrite"), "{err}");
        // The original key is untouched.
        let kept = ReleaseSigningKey::read_from_file(&path).unwrap();
        assert_eq!(kept.public_key(), first.public_key());
    }
}
