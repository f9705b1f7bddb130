//! Times as the stores keep them. Callers hand the store RFC 3339 text
//! (views and wire formats stay RFC 3339); the store keeps instants, in
//! UTC, to the microsecond (PostgreSQL's `timestamptz` precision, so both
//! backends hold and return exactly the same time):
//!
//! - PostgreSQL: `timestamptz` columns, bound as [`OffsetDateTime`];
//! - SQLite: fixed-width UTC text, `2026-02-01T10:00:00.500000Z`, whose
//!   text order is its time order. RFC 3339 text with as many fraction
//!   digits as needed does not sort: as text `10:00:00Z` comes after
//!   `10:00:00.5Z` (`Z` is after `.`), and `+02:00` is not UTC at all.
//!
//! Read back, both become RFC 3339 in UTC with as many fraction digits as
//! the instant needs.

use super::{StoreError, StoreResult};
use time::format_description::well_known::Rfc3339;
use time::{OffsetDateTime, UtcOffset};

/// An RFC 3339 time from a caller, as an instant in UTC truncated to the
/// microsecond. Not a time at all is the caller's bug: refused, naming it.
pub(crate) fn parse(what: &'static str, text: &str) -> StoreResult<OffsetDateTime> {
    OffsetDateTime::parse(text, &Rfc3339)
        .map(truncate)
        .map_err(|e| StoreError::BadTime {
            what,
            text: text.to_owned(),
            detail: e.to_string(),
        })
}

pub(crate) fn parse_opt(
    what: &'static str,
    text: Option<&str>,
) -> StoreResult<Option<OffsetDateTime>> {
    text.map(|t| parse(what, t)).transpose()
}

/// In UTC, to the microsecond.
pub(crate) fn truncate(t: OffsetDateTime) -> OffsetDateTime {
    let t = t.to_offset(UtcOffset::UTC);
    t.replace_nanosecond(t.nanosecond() / 1_000 * 1_000)
        .unwrap_or_else(|e| unreachable!("fewer nanoseconds stay in range: {e}"))
}

/// RFC 3339 in UTC, as views show it.
pub(crate) fn shown(t: OffsetDateTime) -> String {
    t.to_offset(UtcOffset::UTC)
        .format(&Rfc3339)
        .unwrap_or_else(|e| unreachable!("a UTC time formats as RFC 3339: {e}"))
}

/// SQLite's form: fixed-width UTC text that sorts as its time.
pub(crate) fn sortable(t: OffsetDateTime) -> String {
    let t = truncate(t);
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

/// A caller's RFC 3339 text in SQLite's stored form.
pub(crate) fn stored(what: &'static str, text: &str) -> StoreResult<String> {
    parse(what, text).map(sortable)
}

pub(crate) fn stored_opt(what: &'static str, text: Option<&str>) -> StoreResult<Option<String>> {
    text.map(|t| stored(what, t)).transpose()
}

/// Stored SQLite text as views show it. Text that is not a time (written
/// by hand, or by a test fixture) is shown as it is rather than refused.
pub(crate) fn shown_text(text: String) -> String {
    match OffsetDateTime::parse(&text, &Rfc3339) {
        Ok(t) => shown(t),
        Err(_) => text,
    }
}

pub(crate) fn shown_text_opt(text: Option<String>) -> Option<String> {
    text.map(shown_text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_text_sorts_as_time_whatever_the_digits_given() {
        let given = [
            "2026-02-01T10:00:00.25Z",
            "2026-02-01T10:00:00Z",
            "2026-02-01T12:00:00.1+02:00",
            "2026-02-01T10:00:00.5Z",
            "2026-02-01T10:00:00.123456789Z",
        ];
        let mut stored: Vec<String> = given.iter().map(|t| stored("t", t).unwrap()).collect();
        assert!(stored.iter().all(|s| s.len() == 27), "{stored:?}");
        stored.sort();
        let shown: Vec<String> = stored.into_iter().map(shown_text).collect();
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
    fn text_that_is_no_time_is_refused_naming_it() {
        let refused = stored("a device's last-seen time", "yesterday").unwrap_err();
        let message = refused.to_string();
        assert!(
            message.contains("last-seen") && message.contains("yesterday"),
            "{message}"
        );
    }
}
