//! What a version leaves of its message's row, and how the writer folds a batch's versions of
//! one message into one save.
//!
//! An update or delete carries the whole new state. An append carries only what it changed
//! (its fragment and the stream's counters): copying a streamed text into every append's
//! write cost a copy, an allocation and a JSON encoding of the whole text per token. The
//! writer appends the batch's fragments to the stored text in one statement.
//!
//! A long stream's appends do not touch its row at all: SQLite reads and re-encodes the whole
//! record to update any column, and a text past a page sits in overflow pages that each
//! append wrote again (a 20 KB text cost ~26 KB of WAL per append). Past [`INLINE_TEXT_MAX`]
//! the row keeps the state of its last whole write, marked once with that version
//! (`text_seq`); the appends after it are in the versions the same commits wrote, and readers
//! fold them in (`queries::complete_text`). The whole state is written again at checkpoints
//! ([`passes_checkpoint`]) and when the stream closes.

use serde_json::Value;

use super::queries;
use super::Conn;
use crate::domain::message::{Message, StreamStatus};
use diesel::QueryResult;

/// A stream's text up to this many bytes is written by every append: it fits on the
/// message row's own page.
pub const INLINE_TEXT_MAX: usize = 2048;

/// Whether a long text growing from `before` to `after` bytes passes a checkpoint, where the
/// whole text is written again: every 8 KiB, or every eighth of the text past 64 KiB. Over a
/// stream's life the text is then written a bounded number of times its length, and a reader
/// adds at most a checkpoint's span of fragments from the versions.
pub fn passes_checkpoint(before: usize, after: usize) -> bool {
    let step = (after.next_power_of_two() / 8).max(8 * 1024);
    before / step != after / step
}

/// The state of a message after one version.
pub enum StateWrite {
    /// The whole state (update, delete).
    Full(Box<Message>),
    /// An append: the fragment and the fields an append sets.
    Append(AppendDelta),
}

impl StateWrite {
    /// What the append of `fragment` that left its message as `next` writes: a delta, with
    /// or without its text, or the whole state at a checkpoint or a long stream's close.
    pub fn of_append(next: &Message, fragment: &str, extras: Option<&Value>) -> Self {
        let after = next.data.as_str().map_or(0, str::len);
        let before = after.saturating_sub(fragment.len());
        if after <= INLINE_TEXT_MAX {
            return Self::Append(AppendDelta::of(next, fragment, extras, true));
        }
        // Readers fold the appends after a row's version as ones that keep the stream open:
        // its first append (which opens it) and its closing one write the row.
        let changes_status = next.append_count <= 1 || next.stream_status != StreamStatus::Open;
        if changes_status || passes_checkpoint(before, after) {
            return Self::Full(Box::new(next.clone()));
        }
        Self::Append(AppendDelta::of(next, fragment, extras, false))
    }

    pub fn key(&self) -> (&str, &str) {
        match self {
            Self::Full(m) => (&m.channel_id, &m.message_serial),
            Self::Append(d) => (&d.channel_id, &d.message_serial),
        }
    }
}

/// What one append changed, or (folded) several appends in a row.
#[derive(Debug, Clone, PartialEq)]
pub struct AppendDelta {
    pub channel_id: String,
    pub message_serial: String,
    /// The fragments, in order.
    pub fragment: String,
    pub version_serial: String,
    pub updated_at: String,
    /// The message's append count after it (absolute, not an increment).
    pub append_count: i64,
    pub stream_status: StreamStatus,
    /// The extras the append set, if it set any (they replace the message's).
    pub extras: Option<Value>,
    /// Whether the fragments go onto the stored text (see [`INLINE_TEXT_MAX`]).
    pub writes_text: bool,
}

impl AppendDelta {
    /// The delta `message` (its state after an append of `fragment`) differs by.
    pub fn of(
        message: &Message,
        fragment: &str,
        extras: Option<&Value>,
        writes_text: bool,
    ) -> Self {
        Self {
            channel_id: message.channel_id.clone(),
            message_serial: message.message_serial.clone(),
            fragment: fragment.to_string(),
            version_serial: message.version_serial.clone(),
            updated_at: message.updated_at.clone(),
            append_count: message.append_count,
            stream_status: message.stream_status,
            extras: extras.cloned(),
            writes_text,
        }
    }

    /// Applies it to a whole state.
    fn apply_to(self, m: &mut Message) {
        match &mut m.data {
            Value::String(s) => s.push_str(&self.fragment),
            other => *other = Value::String(self.fragment),
        }
        if let Some(e) = self.extras {
            m.extras = e;
        }
        m.version_serial = self.version_serial;
        m.last_append_at = Some(self.updated_at.clone());
        m.updated_at = self.updated_at;
        m.last_action = "append";
        m.append_count = self.append_count;
        m.stream_status = self.stream_status;
    }

    /// Folds a later append of the same message into this one.
    fn then(&mut self, later: AppendDelta) {
        // Once one append leaves the text to the versions, the later ones must too.
        self.writes_text &= later.writes_text;
        if self.writes_text {
            self.fragment.push_str(&later.fragment);
        } else {
            self.fragment.clear();
        }
        if later.extras.is_some() {
            self.extras = later.extras;
        }
        self.version_serial = later.version_serial;
        self.updated_at = later.updated_at;
        self.append_count = later.append_count;
        self.stream_status = later.stream_status;
    }
}

/// A message's state still to save in this batch.
pub enum PendingState {
    Full(Box<Message>),
    Appended(AppendDelta),
}

impl PendingState {
    /// Becomes the state after `next`, a later version of the same message, in place.
    pub fn absorb(&mut self, next: StateWrite) {
        match (self, next) {
            (this, StateWrite::Full(m)) => *this = Self::Full(m),
            (Self::Full(m), StateWrite::Append(d)) => d.apply_to(m),
            (Self::Appended(a), StateWrite::Append(d)) => a.then(d),
        }
    }

    pub fn from(first: StateWrite) -> Self {
        match first {
            StateWrite::Full(m) => Self::Full(m),
            StateWrite::Append(d) if !d.writes_text => Self::Appended(d),
            StateWrite::Append(mut d) => {
                // The fragment was allocated by the thread that sent it: later fragments are
                // added to a copy of the writer's own (growing another thread's allocation
                // takes that thread's allocator lock).
                let mut own = String::with_capacity(d.fragment.len().max(16) * 16);
                own.push_str(&d.fragment);
                d.fragment = own;
                Self::Appended(d)
            }
        }
    }

    /// Saves it to the message's row.
    pub fn save(&self, conn: &mut Conn) -> QueryResult<usize> {
        match self {
            Self::Full(m) => queries::save_message_state(conn, m),
            Self::Appended(d) => queries::save_appended_state(conn, d),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::message::NewMessage;
    use serde_json::json;

    fn message(data: Value) -> Message {
        NewMessage {
            data: Some(data),
            ..Default::default()
        }
        .into_message("chn_1", "agent", 1, "2026-12-06T00:00:00.000Z")
    }

    fn delta(m: &Message, fragment: &str, n: i64, extras: Option<Value>) -> AppendDelta {
        AppendDelta {
            channel_id: m.channel_id.clone(),
            message_serial: m.message_serial.clone(),
            fragment: fragment.into(),
            version_serial: format!("v{n}"),
            updated_at: format!("t{n}"),
            append_count: n,
            stream_status: StreamStatus::Open,
            extras,
            writes_text: true,
        }
    }

    #[test]
    fn appends_fold_in_order_and_the_last_counters_win() {
        let m = message(json!(""));
        let mut p = PendingState::from(StateWrite::Append(delta(&m, "ab", 1, None)));
        p.absorb(StateWrite::Append(delta(
            &m,
            "c",
            2,
            Some(json!({"status": "x"})),
        )));
        p.absorb(StateWrite::Append(delta(&m, "d", 3, None)));
        let PendingState::Appended(d) = p else {
            panic!("appends alone stay a delta");
        };
        assert_eq!(d.fragment, "abcd");
        assert_eq!(d.append_count, 3);
        assert_eq!(d.version_serial, "v3");
        assert_eq!(d.extras, Some(json!({"status": "x"})));
    }

    #[test]
    fn an_append_after_a_whole_state_applies_to_it() {
        let mut m = message(json!("hi "));
        m.data = json!("edited ");
        let mut p = PendingState::from(StateWrite::Full(Box::new(m.clone())));
        p.absorb(StateWrite::Append(delta(&m, "more", 4, None)));
        let PendingState::Full(s) = p else {
            panic!("a whole state stays whole");
        };
        assert_eq!(s.data, json!("edited more"));
        assert_eq!(s.append_count, 4);
        assert_eq!(s.last_action, "append");
        assert_eq!(s.last_append_at.as_deref(), Some("t4"));

        let mut empty = message(Value::Null);
        empty.data = Value::Null;
        let mut p = PendingState::from(StateWrite::Full(Box::new(empty.clone())));
        p.absorb(StateWrite::Append(delta(&empty, "x", 1, None)));
        let PendingState::Full(s) = p else {
            panic!("whole")
        };
        assert_eq!(s.data, json!("x"));
    }

    #[test]
    fn a_whole_state_replaces_what_came_before() {
        let m = message(json!("a"));
        let mut deleted = m.clone();
        deleted.deleted = true;
        let mut p = PendingState::from(StateWrite::Append(delta(&m, "b", 1, None)));
        p.absorb(StateWrite::Full(Box::new(deleted)));
        assert!(matches!(p, PendingState::Full(s) if s.deleted));
    }

    /// `current` with `fragment` appended, as `versioned::apply` leaves it.
    fn appended(current: &Message, fragment: &str, status: StreamStatus) -> Message {
        let mut next = current.clone();
        let text = format!("{}{fragment}", current.data.as_str().unwrap_or_default());
        next.data = Value::String(text);
        next.append_count += 1;
        next.stream_status = status;
        next
    }

    #[test]
    fn checkpoints_come_every_8_kib_then_every_eighth_of_the_text() {
        assert!(!passes_checkpoint(2_100, 8_191));
        assert!(passes_checkpoint(8_191, 8_192));
        assert!(!passes_checkpoint(8_192, 16_383));
        assert!(passes_checkpoint(60_000, 66_000), "64 KiB is one");
        // Past 64 KiB the step is 16 KiB: 72 KiB is not one, 80 KiB is.
        assert!(!passes_checkpoint(70_000, 75_000));
        assert!(passes_checkpoint(81_000, 82_000));
    }

    #[test]
    fn an_append_writes_its_text_while_short_and_the_whole_state_at_checkpoints_and_close() {
        let writes = |current: &Message, fragment: &str, status: StreamStatus| {
            let next = appended(current, fragment, status);
            match StateWrite::of_append(&next, fragment, None) {
                StateWrite::Full(m) => {
                    assert_eq!(m.data, next.data);
                    "whole"
                }
                StateWrite::Append(d) if d.writes_text => "text",
                StateWrite::Append(_) => "deferred",
            }
        };
        // A stream already open, `len` bytes long.
        let streaming = |len: usize| {
            let mut m = message(json!("x".repeat(len)));
            m.append_count = 5;
            m.stream_status = StreamStatus::Open;
            m
        };
        let short = streaming(100);
        assert_eq!(writes(&short, "abc", StreamStatus::Open), "text");
        assert_eq!(writes(&short, "", StreamStatus::Closed), "text");
        let at_limit = streaming(INLINE_TEXT_MAX);
        assert_eq!(writes(&at_limit, "a", StreamStatus::Open), "deferred");
        let long = streaming(8_000);
        assert_eq!(writes(&long, "abc", StreamStatus::Open), "deferred");
        assert_eq!(writes(&long, &"y".repeat(300), StreamStatus::Open), "whole");
        assert_eq!(writes(&long, "", StreamStatus::Closed), "whole");
        // The append that opens a stream on a long text writes the row (its status changes).
        let created_long = message(json!("x".repeat(8_000)));
        assert_eq!(writes(&created_long, "abc", StreamStatus::Open), "whole");
    }

    #[test]
    fn once_an_append_defers_its_text_the_folded_delta_does() {
        let m = message(json!(""));
        let mut p = PendingState::from(StateWrite::Append(delta(&m, "ab", 1, None)));
        let mut later = delta(&m, "c", 2, None);
        later.writes_text = false;
        p.absorb(StateWrite::Append(later));
        p.absorb(StateWrite::Append(delta(&m, "d", 3, None)));
        let PendingState::Appended(d) = p else {
            panic!("appends alone stay a delta");
        };
        assert!(!d.writes_text);
        assert_eq!(d.append_count, 3);
        assert_eq!(d.version_serial, "v3");
    }
}
