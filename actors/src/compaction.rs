//! Replay compaction: a client reconnecting after a long token stream gets the message's text
//! once instead of thousands of `message.appended` events (SPEC §3).
//!
//! A run is two or more `message.appended` events of one message with no other event of
//! that message between them. It becomes one `message.appended` at the position of its last
//! event, carrying the whole text as of that version, `compacted: true`, `from_seq` and
//! `to_seq`. Events of other messages keep their places, so cursor order is unchanged.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::{json, Value};

use crate::domain::event::Event;

const APPENDED: &str = "message.appended";

fn message_key(e: &Event) -> Option<(String, String)> {
    if !e.event_type.starts_with("message.") {
        return None;
    }
    let serial = e.payload.get("message_id")?.as_str()?;
    Some((e.channel_id.clone()?, serial.to_string()))
}

/// Compacts runs of appends; `text_at(channel, serial, seq)` gives a message's text as of a
/// version, or `None` when it cannot (the run is then replayed as it is).
pub fn compact_appends(
    events: Vec<Arc<Event>>,
    mut text_at: impl FnMut(&str, &str, i64) -> Option<String>,
) -> Vec<Arc<Event>> {
    // Runs in progress per message, and the finished ones (index lists).
    let mut open: HashMap<(String, String), Vec<usize>> = HashMap::new();
    let mut runs: Vec<Vec<usize>> = Vec::new();
    for (i, e) in events.iter().enumerate() {
        let Some(key) = message_key(e) else { continue };
        if e.event_type == APPENDED && e.payload.get("compacted").is_none() {
            open.entry(key).or_default().push(i);
        } else if let Some(run) = open.remove(&key) {
            runs.push(run);
        }
    }
    runs.extend(open.into_values());
    runs.retain(|r| r.len() >= 2);
    if runs.is_empty() {
        return events;
    }
    let mut replace: HashMap<usize, Arc<Event>> = HashMap::new();
    let mut drop = vec![false; events.len()];
    for run in runs {
        let (first, last) = (&events[run[0]], &events[run[run.len() - 1]]);
        let (Some(channel), Some(serial), Some(from), Some(to)) = (
            last.channel_id.as_deref(),
            last.payload.get("message_id").and_then(Value::as_str),
            first.seq,
            last.seq,
        ) else {
            continue;
        };
        let Some(text) = text_at(channel, serial, to) else {
            continue;
        };
        let p = &last.payload;
        let mut payload = json!({
            "message_id": serial,
            "author_id": p.get("author_id"),
            "data": text,
            "length": p.get("length"),
            "version_serial": p.get("version_serial"),
            "compacted": true,
            "from_seq": from,
            "to_seq": to,
        });
        for key in ["direct_conversation_id", "stream_status"] {
            if let Some(v) = p.get(key) {
                payload[key] = v.clone();
            }
        }
        // An append replaces extras or keeps them: the run's last extras are those at to_seq.
        if let Some(extras) = run
            .iter()
            .rev()
            .find_map(|&i| events[i].payload.get("extras"))
        {
            payload["extras"] = extras.clone();
        }
        let compacted = Event::build(
            last.id.clone(),
            last.cursor,
            APPENDED.to_string(),
            last.workspace_id.clone(),
            last.channel_id.clone(),
            last.seq,
            last.created_at.clone(),
            payload,
            None,
        );
        for &i in &run[..run.len() - 1] {
            drop[i] = true;
        }
        replace.insert(run[run.len() - 1], compacted);
    }
    events
        .into_iter()
        .enumerate()
        .filter(|(i, _)| !drop[*i])
        .map(|(i, e)| replace.remove(&i).unwrap_or(e))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(cursor: i64, ty: &str, serial: &str, seq: i64, payload: Value) -> Arc<Event> {
        let mut p = payload;
        p["message_id"] = json!(serial);
        Event::build(
            format!("e{cursor}"),
            Some(cursor),
            ty.into(),
            "w".into(),
            Some("c".into()),
            Some(seq),
            "t".into(),
            p,
            None,
        )
    }

    fn append(cursor: i64, serial: &str, seq: i64, frag: &str) -> Arc<Event> {
        ev(cursor, APPENDED, serial, seq, json!({"fragment": frag}))
    }

    #[test]
    fn a_run_becomes_one_event_at_its_last_position() {
        let events = vec![
            append(1, "a", 2, "he"),
            append(2, "b", 3, "x"),
            append(3, "a", 4, "llo"),
            append(4, "a", 5, "!"),
        ];
        let out = compact_appends(events, |_, s, seq| {
            assert_eq!((s, seq), ("a", 5));
            Some("hello!".into())
        });
        let cursors: Vec<i64> = out.iter().filter_map(|e| e.cursor).collect();
        assert_eq!(cursors, vec![2, 4]);
        let c = &out[1].payload;
        assert_eq!(c["data"], "hello!");
        assert_eq!(c["compacted"], true);
        assert_eq!(
            (c["from_seq"].clone(), c["to_seq"].clone()),
            (json!(2), json!(5))
        );
    }

    #[test]
    fn another_event_of_the_message_splits_runs() {
        let events = vec![
            append(1, "a", 2, "1"),
            ev(2, "message.updated", "a", 3, json!({})),
            append(3, "a", 4, "2"),
        ];
        let out = compact_appends(events, |_, _, _| Some("never".into()));
        assert_eq!(out.len(), 3);
        assert!(out.iter().all(|e| e.payload.get("compacted").is_none()));
    }

    #[test]
    fn unknown_text_leaves_the_run_alone() {
        let events = vec![append(1, "a", 2, "1"), append(2, "a", 3, "2")];
        assert_eq!(compact_appends(events, |_, _, _| None).len(), 2);
    }
}
