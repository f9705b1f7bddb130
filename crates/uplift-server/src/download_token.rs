//! Device download tokens that any replica can check on its own: the
//! device's ID and an expiry, MAC'd with HMAC-SHA256 under a server key.
//! Nothing is looked up in memory or in the database to check one, so a
//! device connected to one replica downloads from another (or through a
//! site cache that asks any replica, see `DEVICE_AUTHORIZE_PATH`).
//!
//! A token reads `ut1.<key id>.<device id>.<expiry, Unix seconds>.<MAC>`,
//! the MAC in unpadded base64url over a context string and the three
//! fields. Keys live in a small text file (`[download_tokens] keys_file`,
//! by default `<data_dir>/download-token-keys`, generated on first start),
//! one a line: `<id> <secret: 64 hex digits> [verify-only]`. The last key
//! not marked `verify-only` signs; every listed key is accepted, so a key
//! is rotated by listing a new one as `verify-only` on every replica,
//! then making it the signer, then (a token lifetime later) dropping the
//! old one. Replicas behind one balancer share the file, and each reads it
//! again when it changes ([`follow_key_file`]), so a rotation needs no
//! restart.
//!
//! Everything here but [`load_or_create`] and [`follow_key_file`] is pure:
//! time is passed in.

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use uplift_proto::{DeviceId, ErrorKind};

/// Marks the token format; another format takes another prefix.
const PREFIX: &str = "ut1";
/// Domain separation: a MAC made for anything else never verifies here.
const CONTEXT: &[u8] = b"uplift download token v1\0";
/// Shortest secret accepted.
const MIN_SECRET_BYTES: usize = 32;
/// Longest key ID (it travels in every token).
const MAX_KEY_ID: usize = 32;

type HmacSha256 = Hmac<Sha256>;

/// One key: its ID (in the tokens it signs) and its secret.
#[derive(Clone)]
struct Key {
    id: String,
    secret: Vec<u8>,
    verify_only: bool,
}

impl fmt::Debug for Key {
    fn fmt(&self, out: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the secret, not even in a debug log.
        out.debug_struct("Key")
            .field("id", &self.id)
            .field("verify_only", &self.verify_only)
            .finish_non_exhaustive()
    }
}

/// The keys a server signs and checks download tokens with.
#[derive(Debug, Clone)]
pub struct Keyring {
    keys: Vec<Key>,
    /// Index of the key that signs: the last one not marked verify-only.
    signer: usize,
}

/// A token as issued: its text and when it stops being accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    pub text: String,
    /// Unix seconds.
    pub expires_at: u64,
}

/// What a valid token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    pub device: DeviceId,
    /// Unix seconds.
    pub expires_at: u64,
}

/// Why a presented token is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the download token is not an Uplift download token ({0}); use the one from the device channel's welcome")]
    Malformed(&'static str),
    #[error(
        "the download token was signed with key {key_id:?}, which this server does not hold; \
         every replica must list the same keys (see [download_tokens] keys_file)"
    )]
    UnknownKey { key_id: String },
    #[error("the download token's signature does not match: it was altered or forged")]
    BadSignature,
    #[error(
        "the download token of device {device} expired {ago} s ago; the device channel \
         brings a fresh one (reconnect if it is down)"
    )]
    Expired { device: DeviceId, ago: u64 },
}

impl TokenError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            TokenError::Malformed(_) | TokenError::UnknownKey { .. } | TokenError::BadSignature => {
                ErrorKind::DownloadTokenInvalid
            }
            TokenError::Expired { .. } => ErrorKind::DownloadTokenExpired,
        }
    }
}

/// Why the key file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    #[error("download token keys {path}, line {line}: {detail}")]
    Line {
        path: PathBuf,
        line: usize,
        detail: String,
    },
    #[error(
        "download token keys {path} list no key that may sign (all are verify-only, or none); \
         add a line `<id> <64 hex digits>`"
    )]
    NoSigner { path: PathBuf },
    #[error("reading download token keys {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("creating download token keys {path}: {source}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn valid_key_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_KEY_ID
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

impl Keyring {
    /// Reads a key file's text; `path` only names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, KeysError> {
        let mut keys: Vec<Key> = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let bad = |detail: String| KeysError::Line {
                path: path.to_owned(),
                line: n + 1,
                detail,
            };
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let words: Vec<&str> = line.split_whitespace().collect();
            let (id, secret, verify_only) = match words.as_slice() {
                [id, secret] => (*id, *secret, false),
                [id, secret, "verify-only"] => (*id, *secret, true),
                _ => {
                    return Err(bad(
                        "expected `<id> <secret: 64 hex digits> [verify-only]`".to_owned()
                    ))
                }
            };
            if !valid_key_id(id) {
                return Err(bad(format!(
                    "key id {id:?} must be 1 to {MAX_KEY_ID} ASCII letters, digits, '-' or '_'"
                )));
            }
            if keys.iter().any(|k| k.id == id) {
                return Err(bad(format!("key id {id:?} is listed twice")));
            }
            let secret = hex::decode(secret)
                .map_err(|e| bad(format!("the secret of key {id:?} is not hex: {e}")))?;
            if secret.len() < MIN_SECRET_BYTES {
                return Err(bad(format!(
                    "the secret of key {id:?} has {} bytes; use at least {MIN_SECRET_BYTES} \
                     ({} hex digits) of randomness",
                    secret.len(),
                    2 * MIN_SECRET_BYTES
                )));
            }
            keys.push(Key {
                id: id.to_owned(),
                secret,
                verify_only,
            });
        }
        let signer =
            keys.iter()
                .rposition(|k| !k.verify_only)
                .ok_or_else(|| KeysError::NoSigner {
                    path: path.to_owned(),
                })?;
        Ok(Self { keys, signer })
    }

    /// The ID of the key that signs new tokens.
    pub fn signing_key_id(&self) -> &str {
        &self.keys[self.signer].id
    }

    /// A token for `device`, valid from `now` for `lifetime_secs`.
    pub fn sign(&self, device: &DeviceId, now: u64, lifetime_secs: u64) -> Token {
        let key = &self.keys[self.signer];
        let expires_at = now.saturating_add(lifetime_secs);
        let mac = mac_of(key, device.as_str(), expires_at)
            .finalize()
            .into_bytes();
        Token {
            text: format!(
                "{PREFIX}.{}.{device}.{expires_at}.{}",
                key.id,
                B64URL.encode(mac)
            ),
            expires_at,
        }
    }

    /// Checks a presented token at time `now`: well-formed, signed by a key
    /// listed here, unaltered, not expired. Whether its device is still
    /// enrolled is the caller's question.
    pub fn verify(&self, text: &str, now: u64) -> Result<Claims, TokenError> {
        let rest = text
            .strip_prefix(PREFIX)
            .and_then(|r| r.strip_prefix('.'))
            .ok_or(TokenError::Malformed("it does not start with `ut1.`"))?;
        let (key_id, rest) = rest
            .split_once('.')
            .ok_or(TokenError::Malformed("it has too few fields"))?;
        // The device ID may hold dots; the expiry and MAC hold none.
        let (rest, mac) = rest
            .rsplit_once('.')
            .ok_or(TokenError::Malformed("it has too few fields"))?;
        let (device, expires_at) = rest
            .rsplit_once('.')
            .ok_or(TokenError::Malformed("it has too few fields"))?;
        let expires_at: u64 = expires_at
            .parse()
            .map_err(|_| TokenError::Malformed("its expiry is not a number"))?;
        let device: DeviceId = device
            .parse()
            .map_err(|_| TokenError::Malformed("its device ID is not valid"))?;
        let mac = B64URL
            .decode(mac)
            .map_err(|_| TokenError::Malformed("its signature is not base64url"))?;
        let key =
            self.keys
                .iter()
                .find(|k| k.id == key_id)
                .ok_or_else(|| TokenError::UnknownKey {
                    key_id: key_id.chars().take(MAX_KEY_ID).collect(),
                })?;
        // Constant-time comparison.
        mac_of(key, device.as_str(), expires_at)
            .verify_slice(&mac)
            .map_err(|_| TokenError::BadSignature)?;
        // Checked after the MAC: an unsigned claim says nothing, not even
        // that it expired.
        if now >= expires_at {
            return Err(TokenError::Expired {
                device,
                ago: now - expires_at,
            });
        }
        Ok(Claims { device, expires_at })
    }

    /// A fresh key file's text: one random key that signs.
    pub fn generate_file_text() -> String {
        let id = format!("key-{}", hex::encode(rand::random::<[u8; 4]>()));
        let secret = hex::encode(rand::random::<[u8; 32]>());
        format!(
            "# Uplift download token keys: `<id> <secret: 64 hex digits> [verify-only]`, one a line.\n\
             # The last key not marked verify-only signs; every listed key is accepted.\n\
             # Replicas behind one balancer must list the same keys (README: Running at scale).\n\
             {id} {secret}\n"
        )
    }
}

/// What the server needs to issue and check download tokens: its keys,
/// the tokens' lifetime, and the devices it knows are enrolled.
#[derive(Debug)]
pub struct DownloadAuth {
    /// The keys as last read, with the text they were read from.
    keys: RwLock<(Arc<Keyring>, Option<String>)>,
    pub lifetime_secs: u64,
    /// Devices known to be enrolled: each one this server authenticated
    /// on a channel or found in the database, so the hot path checks a
    /// token without a query. Devices are never removed from a fleet
    /// today; whatever removes one must forget it here too.
    enrolled: RwLock<HashSet<DeviceId>>,
}

impl DownloadAuth {
    pub fn new(keys: Keyring, lifetime_secs: u64) -> Self {
        Self {
            keys: RwLock::new((Arc::new(keys), None)),
            lifetime_secs,
            enrolled: RwLock::default(),
        }
    }

    /// The keys in use now.
    pub fn keys(&self) -> Arc<Keyring> {
        self.keys
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .0
            .clone()
    }

    /// Takes the key file's `text` (read from `path`) if it changed since
    /// it was last taken: whether the keys changed. Text that does not
    /// parse is refused and the keys in use stay.
    pub fn take_key_file(&self, text: &str, path: &Path) -> Result<bool, KeysError> {
        let unchanged = |held: &Option<String>| held.as_deref() == Some(text);
        if unchanged(
            &self
                .keys
                .read()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .1,
        ) {
            return Ok(false);
        }
        let keys = Arc::new(Keyring::parse(text, path)?);
        let mut held = self
            .keys
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        // The first reading only records the text the keys came from.
        let changed = held.1.is_some() || held.0.signing_key_id() != keys.signing_key_id();
        *held = (keys, Some(text.to_owned()));
        Ok(changed)
    }

    /// A token for a device that just proved who it is on its channel.
    pub fn issue(&self, device: &DeviceId, now: u64) -> Token {
        self.remember(device);
        self.keys().sign(device, now, self.lifetime_secs)
    }

    /// Checks a token under the keys in use now.
    pub fn verify(&self, text: &str, now: u64) -> Result<Claims, TokenError> {
        self.keys().verify(text, now)
    }

    /// Whether a token expiring at `expires_at` is due for renewal at
    /// `now`: when half of its life is left, so a renewal missed or
    /// delayed by a tick or two still lands long before it expires.
    pub fn renewal_due(&self, expires_at: u64, now: u64) -> bool {
        now.saturating_add(self.lifetime_secs / 2) >= expires_at
    }

    /// Whether `device` is known to be enrolled (without asking the database).
    pub fn knows(&self, device: &DeviceId) -> bool {
        self.enrolled
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .contains(device)
    }

    /// Forgets that `device` is enrolled: it was removed, and its tokens,
    /// signed and unexpired, are refused from now on (the database says
    /// why).
    pub fn forget(&self, device: &DeviceId) {
        self.enrolled
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(device);
    }

    /// Records that `device` is enrolled.
    pub fn remember(&self, device: &DeviceId) {
        if !self.knows(device) {
            self.enrolled
                .write()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .insert(device.clone());
        }
    }
}

/// Seconds since the Unix epoch, now.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn mac_of(key: &Key, device: &str, expires_at: u64) -> HmacSha256 {
    let mut mac = HmacSha256::new_from_slice(&key.secret).expect("HMAC takes a key of any length");
    mac.update(CONTEXT);
    mac.update(key.id.as_bytes());
    mac.update(b"\0");
    mac.update(device.as_bytes());
    mac.update(b"\0");
    mac.update(expires_at.to_string().as_bytes());
    mac
}

/// How often a replica looks at its key file for a rotation.
pub const KEY_FILE_CHECK: Duration = Duration::from_secs(10);

/// Reads the key file at `path` every [`KEY_FILE_CHECK`] until `stop`, and
/// takes its keys when it changed: a key added, made the signer or dropped
/// on every replica's file takes effect within seconds, without restarts.
/// A file that cannot be read or parsed leaves the keys in use, loudly.
pub async fn follow_key_file(
    state: Arc<crate::state::AppState>,
    path: PathBuf,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut checks = tokio::time::interval(KEY_FILE_CHECK);
    checks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = checks.tick() => {}
            _ = stop.changed() => return,
        }
        let taken = match tokio::fs::read_to_string(&path).await {
            Ok(text) => state.downloads.take_key_file(&text, &path),
            Err(source) => Err(KeysError::Read {
                path: path.clone(),
                source,
            }),
        };
        match taken {
            Ok(changed) => {
                if changed {
                    tracing::info!(
                        path = %path.display(),
                        signer = state.downloads.keys().signing_key_id(),
                        "download token keys changed; new tokens are signed by the signer named"
                    );
                }
                failing = false;
            }
            Err(e) if !failing => {
                tracing::error!("{e}; the download token keys in use stay until the file is fixed");
                failing = true;
            }
            Err(_) => {}
        }
    }
}

/// Reads the key file at `path`, or creates it with one fresh key if there
/// is none (crash-safely and never over a file another replica created
/// meanwhile: then that one is read).
pub fn load_or_create(path: &Path) -> Result<Keyring, KeysError> {
    let read = |path: &Path| {
        std::fs::read_to_string(path).map_err(|source| KeysError::Read {
            path: path.to_owned(),
            source,
        })
    };
    match std::fs::read_to_string(path) {
        Ok(text) => Keyring::parse(&text, path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let text = Keyring::generate_file_text();
            match uplift_files::create_file(path, text.as_bytes(), uplift_files::Access::OwnerOnly)
            {
                Ok(()) => {
                    tracing::info!(path = %path.display(), "generated a download token key");
                    Keyring::parse(&text, path)
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    Keyring::parse(&read(path)?, path)
                }
                Err(source) => Err(KeysError::Create {
                    path: path.to_owned(),
                    source,
                }),
            }
        }
        Err(source) => Err(KeysError::Read {
            path: path.to_owned(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K1: &str = "k1 1111111111111111111111111111111111111111111111111111111111111111";
    const K2: &str = "k2 2222222222222222222222222222222222222222222222222222222222222222";

    fn ring(text: &str) -> Keyring {
        Keyring::parse(text, Path::new("keys")).unwrap()
    }

    fn dev(id: &str) -> DeviceId {
        id.parse().unwrap()
    }

    #[test]
    fn a_rotated_key_file_is_taken_without_a_restart_and_a_broken_one_is_not() {
        let path = Path::new("/etc/uplift/download-token-keys");
        let auth = DownloadAuth::new(ring(K1), 600);
        assert!(
            !auth.take_key_file(K1, path).unwrap(),
            "the file it started with"
        );
        let before = auth.issue(&dev("dev-1"), 1_000);
        // Step 1: k2 listed as verify-only everywhere; k1 still signs.
        let step1 = format!("{K1}\n{K2} verify-only\n");
        assert!(auth.take_key_file(&step1, path).unwrap());
        assert!(
            !auth.take_key_file(&step1, path).unwrap(),
            "read again: no change"
        );
        assert_eq!(auth.keys().signing_key_id(), "k1");
        // Step 2: k2 signs; tokens k1 signed still verify.
        let step2 = format!("{K1} verify-only\n{K2}\n");
        assert!(auth.take_key_file(&step2, path).unwrap());
        let after = auth.issue(&dev("dev-1"), 1_000);
        assert!(after.text.starts_with("ut1.k2."), "{}", after.text);
        assert!(auth.verify(&before.text, 1_001).is_ok());
        // A broken file is refused, naming it; the keys in use stay.
        let broken = auth.take_key_file("k3 not-hex\n", path).unwrap_err();
        assert!(
            broken
                .to_string()
                .contains("/etc/uplift/download-token-keys"),
            "{broken}"
        );
        assert!(auth.verify(&after.text, 1_001).is_ok());
        // Step 3: k1 dropped; what it signed no longer verifies.
        assert!(auth.take_key_file(K2, path).unwrap());
        assert!(auth.verify(&before.text, 1_001).is_err());
        assert!(auth.verify(&after.text, 1_001).is_ok());
    }

    #[test]
    fn a_token_is_valid_for_its_device_until_it_expires() {
        let keys = ring(K1);
        let token = keys.sign(&dev("dev-0123"), 1_000, 300);
        assert_eq!(token.expires_at, 1_300);
        assert!(
            token.text.starts_with("ut1.k1.dev-0123.1300."),
            "{}",
            token.text
        );
        let claims = keys.verify(&token.text, 1_000).unwrap();
        assert_eq!(claims.device, dev("dev-0123"));
        assert_eq!(keys.verify(&token.text, 1_299).unwrap().expires_at, 1_300);
        let expired = keys.verify(&token.text, 1_300).unwrap_err();
        assert_eq!(
            expired,
            TokenError::Expired {
                device: dev("dev-0123"),
                ago: 0
            }
        );
        assert_eq!(expired.kind(), ErrorKind::DownloadTokenExpired);
        // Device IDs may hold dots; the token still splits right.
        let dotted = keys.sign(&dev("dev.a.b"), 0, 60);
        assert_eq!(keys.verify(&dotted.text, 1).unwrap().device, dev("dev.a.b"));
    }

    #[test]
    fn a_tampered_forged_or_foreign_token_is_refused_as_invalid() {
        let keys = ring(K1);
        let token = keys.sign(&dev("dev-1"), 1_000, 300).text;
        // Another device, a later expiry: the MAC no longer matches.
        for altered in [
            token.replace("dev-1", "dev-2"),
            token.replace(".1300.", ".9999."),
        ] {
            assert_eq!(keys.verify(&altered, 1_000), Err(TokenError::BadSignature));
        }
        // A MAC under another secret with the same key ID (a forgery).
        let forger = ring("k1 3333333333333333333333333333333333333333333333333333333333333333");
        let forged = forger.sign(&dev("dev-1"), 1_000, 300).text;
        assert_eq!(keys.verify(&forged, 1_000), Err(TokenError::BadSignature));
        // A key this server does not hold.
        let other = ring(K2).sign(&dev("dev-1"), 1_000, 300).text;
        let err = keys.verify(&other, 1_000).unwrap_err();
        assert_eq!(
            err,
            TokenError::UnknownKey {
                key_id: "k2".into()
            }
        );
        assert_eq!(err.kind(), ErrorKind::DownloadTokenInvalid);
        // Not a token at all: the old random hex tokens, junk, empty.
        for junk in [
            "a1b2c3",
            "",
            "ut1.",
            "ut1.k1.dev-1.1300",
            "ut1.k1.dev-1.soon.AAAA",
            "ut1.k1.dev/1.1300.AAAA",
            "ut1.k1.dev-1.1300.***",
        ] {
            let err = keys.verify(junk, 1_000).unwrap_err();
            assert!(matches!(err, TokenError::Malformed(_)), "{junk:?}: {err:?}");
            assert_eq!(err.kind(), ErrorKind::DownloadTokenInvalid);
        }
        // An expired forgery is a forgery, not "expired".
        assert_eq!(keys.verify(&forged, 5_000), Err(TokenError::BadSignature));
    }

    #[test]
    fn rotation_signs_with_the_newest_key_and_accepts_every_listed_one() {
        let old = ring(K1);
        let old_token = old.sign(&dev("dev-1"), 0, 300).text;
        // Step 1: the new key is listed verify-only everywhere; k1 still signs.
        let step1 = ring(&format!("{K1}\n{K2} verify-only\n"));
        assert_eq!(step1.signing_key_id(), "k1");
        // Step 2: the new key signs; tokens of the old one still pass.
        let step2 = ring(&format!("# rotated\n{K1}\n\n{K2}\n"));
        assert_eq!(step2.signing_key_id(), "k2");
        let new_token = step2.sign(&dev("dev-1"), 0, 300).text;
        assert!(new_token.starts_with("ut1.k2."));
        // Step-1 replicas accept step-2 tokens, and everyone the old ones.
        for keys in [&step1, &step2] {
            assert!(keys.verify(&new_token, 1).is_ok());
            assert!(keys.verify(&old_token, 1).is_ok());
        }
        // Step 3: the old key is gone.
        let step3 = ring(K2);
        assert_eq!(
            step3.verify(&old_token, 1),
            Err(TokenError::UnknownKey {
                key_id: "k1".into()
            })
        );
    }

    #[test]
    fn a_token_is_renewed_when_half_its_life_is_left() {
        let auth = DownloadAuth::new(ring(K1), 600);
        let device = dev("dev-1");
        assert!(!auth.knows(&device));
        let token = auth.issue(&device, 10_000);
        assert!(
            auth.knows(&device),
            "a device given a token is known enrolled"
        );
        assert_eq!(token.expires_at, 10_600);
        assert!(!auth.renewal_due(token.expires_at, 10_000));
        assert!(!auth.renewal_due(token.expires_at, 10_299));
        assert!(auth.renewal_due(token.expires_at, 10_300));
        assert!(auth.renewal_due(token.expires_at, 20_000));
    }

    #[test]
    fn a_bad_key_file_says_which_line_and_what_is_wrong() {
        let err = |text: &str| {
            Keyring::parse(text, Path::new("/etc/keys"))
                .unwrap_err()
                .to_string()
        };
        assert!(err("k1 abcd\n").contains("line 1"), "{}", err("k1 abcd"));
        assert!(err("k1 abcd").contains("at least 32"));
        assert!(err(&format!("# c\n{K1}\nk.2 00")).contains("line 3"));
        assert!(err(&format!("{K1}\n{K1}")).contains("twice"));
        assert!(err("k1 zz11").contains("not hex"));
        assert!(err(&format!("{K1} sign-only")).contains("expected"));
        assert!(err("").contains("no key that may sign"));
        assert!(err(&format!("{K1} verify-only")).contains("no key that may sign"));
        // A generated file parses and signs.
        let fresh = ring(&Keyring::generate_file_text());
        assert!(fresh.signing_key_id().starts_with("key-"));
        // The debug form never shows a secret.
        assert!(!format!("{fresh:?}").contains("1111"), "{fresh:?}");
        assert!(!format!("{:?}", ring(K1)).contains("1111"));
    }

    #[test]
    fn the_key_file_is_created_once_and_then_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("download-token-keys");
        let first = load_or_create(&path).unwrap();
        let second = load_or_create(&path).unwrap();
        assert_eq!(first.signing_key_id(), second.signing_key_id());
        let token = first.sign(&dev("dev-1"), 0, 60).text;
        assert!(second.verify(&token, 1).is_ok(), "a restart keeps the key");
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "the key file is the owner's only");
    }
}
