//! Validated names. Everything that arrives from the network or a file and is
//! later used as a path component, a database key or a comparison operand is
//! parsed into one of these first, so the rest of the code never handles an
//! unchecked string (the approach of awslabs/tough).

use serde::{Deserialize, Serialize};
use std::cmp::Ordering;
use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} {value:?}: {reason}")]
pub struct NameError {
    pub what: &'static str,
    pub value: String,
    pub reason: &'static str,
}

fn check(
    what: &'static str,
    value: &str,
    max_len: usize,
    allowed: impl Fn(char) -> bool,
    allowed_text: &'static str,
) -> Result<(), NameError> {
    let err = |reason| NameError {
        what,
        value: value.chars().take(80).collect(),
        reason,
    };
    if value.is_empty() {
        return Err(err("must not be empty"));
    }
    if value.len() > max_len {
        return Err(err("is too long"));
    }
    if !value.chars().all(allowed) {
        return Err(err(allowed_text));
    }
    if value.starts_with('.') || value.starts_with('-') {
        return Err(err("must not start with '.' or '-'"));
    }
    Ok(())
}

/// The OpenAPI schema of a name: a string of `min` to `max` ASCII
/// characters matching `pattern`, which states the rule the parser checks
/// (keep the two alike), so clients and fuzzers learn the limits from the
/// document instead of from refusals.
#[cfg(feature = "openapi")]
macro_rules! name_schema {
    ($name:ident, $min:expr, $max:expr, $pattern:expr, $describe:literal) => {
        impl utoipa::PartialSchema for $name {
            fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
                utoipa::openapi::ObjectBuilder::new()
                    .schema_type(utoipa::openapi::schema::Type::String)
                    .min_length(Some($min))
                    .max_length(Some($max))
                    .pattern(Some($pattern))
                    .description(Some($describe))
                    .into()
            }
        }

        impl utoipa::ToSchema for $name {
            fn name() -> std::borrow::Cow<'static, str> {
                std::borrow::Cow::Borrowed(stringify!($name))
            }
        }
    };
}

#[cfg(not(feature = "openapi"))]
macro_rules! name_schema {
    ($($any:tt)*) => {};
}

/// The pattern of [`is_name_char`] names: no leading '.' or '-'.
// Only the OpenAPI schemas use it, so a build without the feature (the
// agent's) would warn.
#[cfg_attr(not(feature = "openapi"), allow(unused_macros))]
macro_rules! name_pattern {
    () => {
        "^[A-Za-z0-9_][A-Za-z0-9_.-]*$"
    };
}

macro_rules! validated_name {
    ($(#[$meta:meta])* $name:ident, $what:literal, $max:expr, $allowed:expr, $allowed_text:literal, $pattern:expr) => {
        name_schema!($name, 1, $max, $pattern, $what);

        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl FromStr for $name {
            type Err = NameError;
            fn from_str(s: &str) -> Result<Self, NameError> {
                check($what, s, $max, $allowed, $allowed_text)?;
                Ok(Self(s.to_owned()))
            }
        }

        impl TryFrom<String> for $name {
            type Error = NameError;
            fn try_from(s: String) -> Result<Self, NameError> {
                check($what, &s, $max, $allowed, $allowed_text)?;
                Ok(Self(s))
            }
        }

        impl From<$name> for String {
            fn from(v: $name) -> String {
                v.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')
}

validated_name!(
    /// A device ID, assigned by the server at enrollment (`dev-` + 16 hex digits).
    DeviceId, "device id", 64, is_name_char, "may hold only ASCII letters, digits, '-', '_' and '.'",
    name_pattern!()
);
validated_name!(
    /// A kind of hardware (e.g. `gateway-x86`); a release is for exactly one.
    DeviceType, "device type", 64, is_name_char, "may hold only ASCII letters, digits, '-', '_' and '.'",
    name_pattern!()
);
validated_name!(
    /// An operator's label for an API token (e.g. `ci-release-bot`), shown
    /// in the token list and as the actor in the audit log.
    TokenName, "token name", 64, is_name_char, "may hold only ASCII letters, digits, '-', '_' and '.'",
    name_pattern!()
);
validated_name!(
    /// A stable identity of the physical device (serial number, MAC, machine-id).
    HardwareId, "hardware id", 128, |c: char| is_name_char(c) || c == ':', "may hold only ASCII letters, digits, '-', '_', '.' and ':'",
    "^[A-Za-z0-9_:][A-Za-z0-9_.:-]*$"
);

validated_name!(
    /// An operator's label on a device (`site-berlin`, `canary`, `floor:3`):
    /// devices are listed and rollouts targeted by them. ASCII letters,
    /// digits, '-', '_', '.', ':' and '=', at most 64, case-sensitive. No
    /// space or comma, so a list of tags can be written with either.
    Tag, "tag", 64, |c: char| is_name_char(c) || matches!(c, ':' | '='), "may hold only ASCII letters, digits, '-', '_', '.', ':' and '='",
    "^[A-Za-z0-9_:=][A-Za-z0-9_.:=-]*$"
);

name_schema!(
    Version,
    1,
    64,
    "^[A-Za-z0-9_+~][A-Za-z0-9_.+~-]*$",
    "version"
);

/// An OS version such as `1.0`, `1.10.2` or `2024.05-rc1`.
///
/// Ordering compares dot-separated parts: numeric parts numerically, others
/// as text, a missing part sorts first (so `1.0 < 1.0.1 < 1.1 < 1.10`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Version(String);

fn is_version_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '+' | '~')
}

impl Version {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Version {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        check(
            "version",
            s,
            64,
            is_version_char,
            "may hold only ASCII letters, digits and '.-_+~'",
        )?;
        Ok(Self(s.to_owned()))
    }
}

impl TryFrom<String> for Version {
    type Error = NameError;
    fn try_from(s: String) -> Result<Self, NameError> {
        s.parse()
    }
}

impl From<Version> for String {
    fn from(v: Version) -> String {
        v.0
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Ord for Version {
    fn cmp(&self, other: &Self) -> Ordering {
        let (a_release, a_pre) = split_version(&self.0);
        let (b_release, b_pre) = split_version(&other.0);
        compare_dotted(a_release, b_release)
            .then_with(|| match (a_pre, b_pre) {
                // A pre-release comes before its release: 1.0-rc1 < 1.0.
                (None, None) => Ordering::Equal,
                (None, Some(_)) => Ordering::Greater,
                (Some(_), None) => Ordering::Less,
                (Some(a), Some(b)) => compare_dotted(a, b),
            })
            // Only build metadata differs: any fixed order, consistent with Eq.
            .then_with(|| self.0.cmp(&other.0))
    }
}

/// Splits `1.2-rc1+b7` into the release `1.2` and the pre-release `rc1`
/// (`~` works like `-`, as in Debian); `+` build metadata is ignored.
fn split_version(v: &str) -> (&str, Option<&str>) {
    let v = v.split('+').next().unwrap_or(v);
    match v.find(['-', '~']) {
        Some(at) => (&v[..at], Some(&v[at + 1..])),
        None => (v, None),
    }
}

/// Dot-separated parts left to right; a missing part sorts first.
fn compare_dotted(a: &str, b: &str) -> Ordering {
    let mut a = a.split('.');
    let mut b = b.split('.');
    loop {
        match (a.next(), b.next()) {
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(x), Some(y)) => {
                let ord = compare_part(x, y);
                if ord != Ordering::Equal {
                    return ord;
                }
            }
        }
    }
}

/// Natural order within a part: runs of digits compare as numbers, other
/// runs as text, a number before text (so `rc2 < rc10` and `2a < 10`).
fn compare_part(a: &str, b: &str) -> Ordering {
    let (mut x, mut y) = (runs(a), runs(b));
    loop {
        match (x.next(), y.next()) {
            (None, None) => return a.cmp(b),
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(p), Some(q)) => {
                let p_num = p.starts_with(|c: char| c.is_ascii_digit());
                let q_num = q.starts_with(|c: char| c.is_ascii_digit());
                let ord = match (p_num, q_num) {
                    (true, true) => {
                        let (p, q) = (p.trim_start_matches('0'), q.trim_start_matches('0'));
                        p.len().cmp(&q.len()).then_with(|| p.cmp(q))
                    }
                    (true, false) => Ordering::Less,
                    (false, true) => Ordering::Greater,
                    (false, false) => p.cmp(q),
                };
                if ord != Ordering::Equal {
                    return ord;
                }
            }
        }
    }
}

/// Splits `rc10b` into `rc`, `10`, `b`.
fn runs(s: &str) -> impl Iterator<Item = &str> {
    let mut rest = s;
    std::iter::from_fn(move || {
        let first = rest.chars().next()?;
        let digit = first.is_ascii_digit();
        let end = rest
            .find(|c: char| c.is_ascii_digit() != digit)
            .unwrap_or(rest.len());
        let (run, tail) = rest.split_at(end);
        rest = tail;
        Some(run)
    })
}

impl PartialOrd for Version {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

name_schema!(
    ChunkHash,
    64,
    64,
    "^[0-9a-f]{64}$",
    "sha256 digest (64 lowercase hex digits)"
);

/// SHA-256 of a chunk's uncompressed bytes, as 64 lowercase hex digits.
/// Chunks are stored and fetched under this name, so it is a path component
/// on both server and device and must never be anything else.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkHash([u8; 32]);

impl ChunkHash {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
    pub fn to_hex(&self) -> String {
        let mut s = String::with_capacity(64);
        for b in self.0 {
            s.push_str(&format!("{b:02x}"));
        }
        s
    }
}

impl FromStr for ChunkHash {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        let err = |reason| NameError {
            what: "sha256 digest",
            value: s.chars().take(80).collect(),
            reason,
        };
        if s.len() != 64 {
            return Err(err("must be exactly 64 hex digits"));
        }
        let mut out = [0u8; 32];
        for (i, pair) in s.as_bytes().chunks(2).enumerate() {
            let digit = |c: u8| match c {
                b'0'..=b'9' => Some(c - b'0'),
                b'a'..=b'f' => Some(c - b'a' + 10),
                _ => None,
            };
            match (digit(pair[0]), digit(pair[1])) {
                (Some(h), Some(l)) => out[i] = h << 4 | l,
                _ => return Err(err("must be lowercase hex digits")),
            }
        }
        Ok(Self(out))
    }
}

impl fmt::Display for ChunkHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl Serialize for ChunkHash {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for ChunkHash {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// One of the two A/B slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum SlotName {
    A,
    B,
}

impl SlotName {
    pub fn other(self) -> SlotName {
        match self {
            SlotName::A => SlotName::B,
            SlotName::B => SlotName::A,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            SlotName::A => "a",
            SlotName::B => "b",
        }
    }
}

impl FromStr for SlotName {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        match s {
            "a" | "A" => Ok(SlotName::A),
            "b" | "B" => Ok(SlotName::B),
            _ => Err(NameError {
                what: "slot",
                value: s.chars().take(80).collect(),
                reason: "must be 'a' or 'b'",
            }),
        }
    }
}

impl fmt::Display for SlotName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Version {
        s.parse().unwrap()
    }

    #[test]
    fn versions_order_numerically_part_by_part() {
        assert!(v("1.0") < v("1.1"));
        assert!(v("1.9") < v("1.10"));
        assert!(v("1.0") < v("1.0.1"));
        assert!(v("2") > v("1.99.99"));
        assert_eq!(v("1.1").cmp(&v("1.1")), Ordering::Equal);
    }

    #[test]
    fn pre_releases_sort_before_their_release_and_suffixes_do_not_break_numbers() {
        assert!(v("1.0-rc1") < v("1.0"), "rc -> final is an upgrade");
        assert!(v("1.0-rc1") < v("1.0-rc2"));
        assert!(v("1.0-rc2") < v("1.0-rc10"));
        assert!(
            v("1.9") < v("1.10-hotfix"),
            "1.10-anything is newer than 1.9"
        );
        assert!(v("2024.05~beta") < v("2024.05"));
        assert!(v("1.0") > v("0.99.1-rc1"));
        assert!(v("1.2a") < v("1.10"), "leading digits compare as numbers");
        assert_ne!(
            v("1.0+b1").cmp(&v("1.0+b2")),
            Ordering::Equal,
            "consistent with Eq"
        );
        assert!(v("1.0+b1") > v("1.0-rc1"));
        assert!(
            v("1.00") != v("1.0") && v("1.00") > v("1.0"),
            "equal numbers fall back to text"
        );
    }

    #[test]
    fn path_traversal_in_names_is_rejected() {
        assert!("../../etc/passwd".parse::<DeviceId>().is_err());
        assert!("a/b".parse::<DeviceType>().is_err());
        assert!("..".parse::<Version>().is_err());
        assert!("".parse::<Version>().is_err());
        assert!("1.0/../x".parse::<Version>().is_err());
    }

    #[test]
    fn tags_refuse_what_a_list_or_a_path_could_misread() {
        for good in ["canary", "site-berlin", "floor:3", "ring=1", "A.b_c"] {
            assert_eq!(good.parse::<Tag>().unwrap().as_str(), good);
        }
        for (bad, why) in [
            ("", "must not be empty"),
            ("a b", "may hold only"),
            ("a,b", "may hold only"),
            ("a/b", "may hold only"),
            ("%", "may hold only"),
            ("caf\u{e9}", "may hold only"),
            ("-x", "must not start"),
            (".hidden", "must not start"),
        ] {
            let err = bad.parse::<Tag>().unwrap_err();
            assert!(err.to_string().contains(why), "{bad:?}: {err}");
            assert_eq!(err.what, "tag");
        }
        assert!("t".repeat(64).parse::<Tag>().is_ok());
        let err = "t".repeat(65).parse::<Tag>().unwrap_err();
        assert_eq!(err.reason, "is too long");
        let err = serde_json::from_str::<Tag>("\"a b\"").unwrap_err();
        assert!(err.to_string().contains("invalid tag"), "{err}");
    }

    #[test]
    fn names_are_checked_when_deserialized() {
        assert!(serde_json::from_str::<DeviceId>("\"dev-0123\"").is_ok());
        let err = serde_json::from_str::<DeviceId>("\"dev/0123\"").unwrap_err();
        assert!(err.to_string().contains("device id"), "{err}");
    }

    #[test]
    fn chunk_hash_accepts_only_64_lowercase_hex() {
        let good = "ab".repeat(32);
        let h: ChunkHash = good.parse().unwrap();
        assert_eq!(h.to_hex(), good);
        assert!("AB".repeat(32).parse::<ChunkHash>().is_err());
        assert!("ab".repeat(31).parse::<ChunkHash>().is_err());
        assert!(format!("{}/x", "a".repeat(62))
            .parse::<ChunkHash>()
            .is_err());
    }
}
