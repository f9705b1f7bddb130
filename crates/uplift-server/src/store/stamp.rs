//! Times as the stores take and give them: [`Timestamp`], an instant in
//! UTC truncated to the microsecond (PostgreSQL's `timestamptz` precision,
//! so both backends hold and return exactly the same time). How each
//! backend keeps it:
//!
//! - PostgreSQL: `timestamptz` columns, bound as [`OffsetDateTime`];
//! - SQLite: fixed-width UTC text, `2026-02-01T10:00:00.500000Z`, whose
//!   text order is its time order. RFC 3339 text with as many fraction
//!   digits as needed does not sort: as text `10:00:00Z` comes after
//!   `10:00:00.5Z` (`Z` is after `.`), and `+02:00` is not UTC at all.
//!
//! Views and wire formats show it as RFC 3339 in UTC with as many fraction
//! digits as the instant needs ([`Timestamp`]'s `Display`).

use super::{StoreError, StoreResult};
use std::fmt;
use time::format_description::well_known::Rfc3339;
use time::{OffsetDateTime, UtcOffset};

/// An instant as the store keeps it: UTC, to the microsecond. Made from
/// any [`OffsetDateTime`] (which it truncates), so callers cannot hand the
/// store text that is not a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(OffsetDateTime);

impl Timestamp {
    pub fn now() -> Self {
        Self::from(OffsetDateTime::now_utc())
    }

    pub fn instant(self) -> OffsetDateTime {
        self.0
    }

    /// RFC 3339 text from outside (an operator's filter, a test), in any
    /// offset and with any number of fraction digits.
    pub fn parse_rfc3339(text: &str) -> Result<Self, time::error::Parse> {
        OffsetDateTime::parse(text, &Rfc3339).map(Self::from)
    }

    /// SQLite's form: fixed-width UTC text that sorts as its time.
    pub(crate) fn sortable(self) -> String {
        let t = self.0;
        format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second(),
            t.microsecond()
        )
    }

    /// Text read back from SQLite: the sortable form, or RFC 3339 written
    /// before it was. Anything else is a damaged row, named by `what`.
    pub(crate) fn from_stored(what: &'static str, text: &str) -> StoreResult<Self> {
        Self::parse_rfc3339(text).map_err(|e| StoreError::Corrupt {
            what,
            detail: format!("{text:?} is not an RFC 3339 time ({e})"),
        })
    }

    pub(crate) fn from_stored_opt(
        what: &'static str,
        text: Option<String>,
    ) -> StoreResult<Option<Self>> {
        text.map(|t| Self::from_stored(what, &t)).transpose()
    }
}

impl From<OffsetDateTime> for Timestamp {
    fn from(t: OffsetDateTime) -> Self {
        let t = t.to_offset(UtcOffset::UTC);
        Self(
            t.replace_nanosecond(t.nanosecond() / 1_000 * 1_000)
                .unwrap_or_else(|e| unreachable!("fewer nanoseconds stay in range: {e}")),
        )
    }
}

impl From<std::time::SystemTime> for Timestamp {
    fn from(t: std::time::SystemTime) -> Self {
        Self::from(OffsetDateTime::from(t))
    }
}

/// RFC 3339 in UTC, as views show it.
impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = self
            .0
            .format(&Rfc3339)
            .unwrap_or_else(|e| unreachable!("a UTC time formats as RFC 3339: {e}"));
        f.write_str(&text)
    }
}

impl std::ops::Sub<std::time::Duration> for Timestamp {
    type Output = Timestamp;
    fn sub(self, d: std::time::Duration) -> Timestamp {
        Timestamp::from(self.0 - d)
    }
}

/// A stored instant as wire views show it (RFC 3339 in UTC).
pub(crate) fn shown(t: OffsetDateTime) -> String {
    Timestamp::from(t).to_string()
}

/// Stored SQLite text as wire views show it. Text that is not a time
/// (written by hand) is shown as it is rather than failing the whole view.
pub(crate) fn shown_text(text: String) -> String {
    match Timestamp::parse_rfc3339(&text) {
        Ok(t) => t.to_string(),
        Err(_) => text,
    }
}

pub(crate) fn shown_text_opt(text: Option<String>) -> Option<String> {
    text.map(shown_text)
}

/// A time written in a test, as RFC 3339.
#[cfg(test)]
pub(crate) fn ts(text: &str) -> Timestamp {
    Timestamp::parse_rfc3339(text).unwrap_or_else(|e| panic!("{text:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> Timestamp {
        Timestamp::parse_rfc3339(text).unwrap()
    }

    #[test]
    fn stored_text_sorts_as_time_whatever_the_digits_given() {
        let given = [
            "2026-02-01T10:00:00.25Z",
            "2026-02-01T10:00:00Z",
            "2026-02-01T12:00:00.1+02:00",
            "2026-02-01T10:00:00.5Z",
            "2026-02-01T10:00:00.123456789Z",
        ];
        let mut stored: Vec<String> = given.iter().map(|t| at(t).sortable()).collect();
        assert!(stored.iter().all(|s| s.len() == 27), "{stored:?}");
        stored.sort();
        let shown: Vec<String> = stored
            .iter()
            .map(|s| Timestamp::from_stored("t", s).unwrap().to_string())
            .collect();
        assert_eq!(
            shown,
            [
                "2026-02-01T10:00:00Z",
                "2026-02-01T10:00:00.1Z",
                "2026-02-01T10:00:00.123456Z",
                "2026-02-01T10:00:00.25Z",
                "2026-02-01T10:00:00.5Z",
            ]
        );
    }

    #[test]
    fn a_stored_row_that_is_no_time_is_corrupt_naming_it() {
        let refused = Timestamp::from_stored("a device's last-seen time", "yesterday").unwrap_err();
        assert!(matches!(refused, StoreError::Corrupt { .. }), "{refused:?}");
        let message = refused.to_string();
        assert!(
            message.contains("last-seen") && message.contains("yesterday"),
            "{message}"
        );
    }

    #[test]
    fn an_instant_is_kept_to_the_microsecond_in_utc() {
        let t = at("2026-02-01T12:00:00.123456789+02:00");
        assert_eq!(t.to_string(), "2026-02-01T10:00:00.123456Z");
        assert_eq!(t, at("2026-02-01T10:00:00.123456Z"));
    }
}
