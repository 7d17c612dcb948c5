//! Identifiers and timestamps.

use chrono::{SecondsFormat, Utc};

pub fn new_channel_id() -> String {
    prefixed_ulid("chn_")
}

/// Called once per event by the single writer thread: one allocation, no formatting.
pub fn new_event_id() -> String {
    prefixed_ulid("evt_")
}

/// `prefix` and a new ULID in lower case.
fn prefixed_ulid(prefix: &str) -> String {
    let mut buf = [0u8; ulid::ULID_LEN];
    let encoded = ulid::Ulid::new().array_to_str(&mut buf);
    encoded.make_ascii_lowercase();
    let mut id = String::with_capacity(prefix.len() + ulid::ULID_LEN);
    id.push_str(prefix);
    id.push_str(encoded);
    id
}

/// RFC 3339 UTC with milliseconds: sorts as text, which the prune cut-off relies on.
pub fn now_rfc3339() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true)
}

pub fn to_rfc3339(t: chrono::DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

pub fn now_millis() -> i64 {
    Utc::now().timestamp_millis()
}

/// Unix milliseconds of a stored RFC 3339 time; 0 for an unreadable one (treated as old).
pub fn rfc3339_millis(t: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(t).map_or(0, |d| d.timestamp_millis())
}

/// The seq inside a version serial (`v` + digits).
pub fn parse_version_serial(s: &str) -> Option<i64> {
    let digits = s.strip_prefix('v')?;
    if digits.is_empty() || digits.len() > 18 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Message serials are the create's channel seq, zero-padded so they sort as text.
pub fn message_serial(history_seq: i64) -> String {
    format!("m{history_seq:012}")
}

/// Version serials are the version's channel seq (its delivery serial), zero-padded.
pub fn version_serial(seq: i64) -> String {
    format!("v{seq:012}")
}

/// Cursors are opaque to clients; here they are the dense per-workspace event number.
pub fn cursor_string(cursor: i64) -> String {
    cursor.to_string()
}

pub fn parse_cursor(raw: &str) -> Option<i64> {
    if raw.is_empty() || raw.len() > 19 || !raw.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    raw.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_sort_as_text_in_seq_order() {
        assert!(message_serial(9) < message_serial(10));
        assert!(version_serial(99) < version_serial(100));
    }

    #[test]
    fn event_and_channel_ids_are_a_prefix_and_a_lower_case_ulid() {
        let (a, b) = (new_event_id(), new_event_id());
        for id in [&a, &b] {
            let ulid = id.strip_prefix("evt_").expect("prefix");
            assert_eq!(ulid.len(), ulid::ULID_LEN);
            assert!(ulid
                .bytes()
                .all(|c| c.is_ascii_digit() || c.is_ascii_lowercase()));
            assert!(ulid::Ulid::from_string(&ulid.to_uppercase()).is_ok());
        }
        assert_ne!(a, b);
        assert!(new_channel_id().starts_with("chn_"));
    }

    #[test]
    fn cursor_parsing_refuses_junk() {
        assert_eq!(parse_cursor("42"), Some(42));
        assert_eq!(parse_cursor(""), None);
        assert_eq!(parse_cursor("-1"), None);
        assert_eq!(parse_cursor("1e3"), None);
        assert_eq!(parse_cursor("99999999999999999999"), None);
    }
}
