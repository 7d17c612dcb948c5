//! V2 `sockudo:resume`: what a socket missed on a channel, read from the channel's version
//! log (every create, update, delete and append holds one channel seq, so the log of a
//! channel is contiguous unless retention purged part of it).

use std::collections::HashMap;

use serde_json::{json, Value};

use super::delivery::MessageFrame;
use super::protocol::AppendMode;
use crate::domain::channel::Channel;
use crate::domain::versioned::Action;
use crate::error::ApiResult;
use crate::store::{queries, Conn};

/// A channel position a client holds: the last serial it saw, and the stream it was on.
#[derive(Debug, Clone)]
pub struct Position {
    pub serial: i64,
    pub stream_id: Option<String>,
}

/// Reads a `channel_positions` object: `{channel: {serial, stream_id?}}` (or a bare serial).
pub fn parse_positions(v: &Value) -> Option<Vec<(String, Position)>> {
    let map = v.get("channel_positions")?.as_object()?;
    let mut out = Vec::with_capacity(map.len());
    for (channel, p) in map {
        let serial = p.get("serial").unwrap_or(p);
        let serial = serial
            .as_i64()
            .or_else(|| serial.as_str().and_then(|s| s.parse().ok()))
            .filter(|s| *s >= 0)?;
        let stream_id = p
            .get("stream_id")
            .and_then(Value::as_str)
            .map(str::to_string);
        out.push((channel.clone(), Position { serial, stream_id }));
    }
    Some(out)
}

/// A resumed channel: the frames to send (in serial order) and its `recovered` entry.
pub struct Recovered {
    pub frames: Vec<(i64, String)>,
    pub summary: Value,
}

/// Why a channel cannot be resumed, in Sockudo's vocabulary.
pub fn failure(
    channel: &str,
    code: &str,
    expected: Option<&str>,
    current: Option<&Channel>,
) -> Value {
    json!({
        "channel": channel,
        "code": code,
        "reason": match code {
            "stream_reset" => "the channel's stream is not the one this position belongs to",
            "position_expired" => "the position is older than the retained log or the replay budget",
            "persistence_unavailable" => "the durable log cannot be read now; retry",
            _ => "the position cannot be verified against the log",
        },
        "expected_stream_id": expected,
        "current_stream_id": current.map(|c| c.id.as_str()),
        "newest_available_serial": current.map(|c| c.last_seq),
    })
}

/// Replays the versions after `pos` on `name` up to the channel's committed seq.
pub fn resume_channel(
    conn: &mut Conn,
    workspace_id: &str,
    name: &str,
    pos: &Position,
    max_replay: i64,
    mode: AppendMode,
) -> ApiResult<Result<Recovered, Value>> {
    let channel = match queries::channel_id_by_name(conn, workspace_id, name)? {
        Some(id) => queries::channel(conn, &id)?,
        None => None,
    };
    let Some(channel) = channel else {
        // Nothing was ever published here: position 0 is complete, anything else is not ours.
        return Ok(if pos.serial == 0 && pos.stream_id.is_none() {
            Ok(Recovered {
                frames: Vec::new(),
                summary: json!({"channel": name, "source": "cold", "replayed": 0, "position": {"serial": 0}}),
            })
        } else {
            Err(failure(
                name,
                "stream_reset",
                pos.stream_id.as_deref(),
                None,
            ))
        });
    };
    let expected = pos.stream_id.as_deref();
    if expected.is_some_and(|s| s != channel.id) {
        return Ok(Err(failure(name, "stream_reset", expected, Some(&channel))));
    }
    let tail = channel.last_seq;
    if pos.serial > tail {
        return Ok(Err(failure(
            name,
            "continuity_unverifiable",
            expected,
            Some(&channel),
        )));
    }
    if tail - pos.serial > max_replay {
        return Ok(Err(failure(
            name,
            "position_expired",
            expected,
            Some(&channel),
        )));
    }
    let rows = queries::versions_after(conn, &channel.id, pos.serial, tail, max_replay)?;
    // Retention may have purged part of the range: a gap means the position expired.
    let contiguous = rows
        .iter()
        .enumerate()
        .all(|(i, r)| r.seq == pos.serial + 1 + i as i64)
        && rows.len() as i64 == tail - pos.serial;
    if !contiguous {
        return Ok(Err(failure(
            name,
            "position_expired",
            expected,
            Some(&channel),
        )));
    }
    let mut texts: HashMap<String, String> = HashMap::new();
    let mut frames = Vec::with_capacity(rows.len());
    for row in &rows {
        let Some(action) = Action::parse(&row.action) else {
            continue;
        };
        let body: Value = serde_json::from_str(&row.body).unwrap_or(Value::Null);
        let mut data = body.get("data").cloned().unwrap_or(Value::Null);
        if mode == AppendMode::Full {
            match (action, &data) {
                (Action::Append, Value::String(fragment)) => {
                    let text = match texts.remove(&row.message_serial) {
                        Some(mut t) => {
                            t.push_str(fragment);
                            t
                        }
                        None => queries::text_at(conn, &channel.id, &row.message_serial, row.seq)?
                            .unwrap_or_else(|| fragment.clone()),
                    };
                    data = Value::String(text.clone());
                    texts.insert(row.message_serial.clone(), text);
                }
                (_, Value::String(s)) => {
                    texts.insert(row.message_serial.clone(), s.clone());
                }
                _ => {
                    texts.remove(&row.message_serial);
                }
            }
        }
        let version_serial = crate::ids::version_serial(row.seq);
        let frame = MessageFrame {
            action,
            channel: name,
            stream_id: &channel.id,
            serial: row.seq,
            message_serial: &row.message_serial,
            version_serial: Some(&version_serial),
            name: body.get("name").and_then(Value::as_str),
            data: &data,
            extras: body.get("extras"),
            user_id: row.actor.as_deref(),
        };
        frames.push((row.seq, frame.v2()));
    }
    let summary = json!({
        "channel": name, "source": "cold", "replayed": frames.len(),
        "position": {"serial": tail, "stream_id": channel.id},
    });
    Ok(Ok(Recovered { frames, summary }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_take_both_forms() {
        let v = json!({"channel_positions": {"a": {"serial": 4, "stream_id": "chn_1"}, "b": 7}});
        let mut p = parse_positions(&v).expect("valid");
        p.sort_by(|x, y| x.0.cmp(&y.0));
        assert_eq!(p[0].1.serial, 4);
        assert_eq!(p[0].1.stream_id.as_deref(), Some("chn_1"));
        assert_eq!(p[1].1.serial, 7);
        assert!(parse_positions(&json!({"channel_positions": {"a": -1}})).is_none());
        assert!(parse_positions(&json!({})).is_none());
    }
}
