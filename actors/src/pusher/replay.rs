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

/// Versions read, turned into frames and written per page of a resume.
pub const RESUME_PAGE: i64 = 500;

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

/// One channel's resume, read a page at a time ([`ChannelResume::page`]) so that a socket
/// holds about one page of frames however much it missed. [`ChannelResume::start`] checks the
/// whole range before anything is sent.
pub struct ChannelResume {
    name: String,
    /// `None`: nothing was ever published on the channel.
    channel: Option<Channel>,
    expected: Option<String>,
    /// The last serial read.
    read_through: i64,
    /// The channel's committed seq when the resume began: the replay ends there.
    tail: i64,
    mode: AppendMode,
    /// Full append mode: each message's text so far, so that an append carries it whole
    /// across pages.
    texts: HashMap<String, String>,
}

impl ChannelResume {
    /// Checks `pos` against channel `name`: the stream it belongs to, the replay budget, and
    /// that retention left every version after it. `Err(failure)` when it cannot be resumed.
    pub fn start(
        conn: &mut Conn,
        workspace_id: &str,
        name: &str,
        pos: &Position,
        max_replay: i64,
        mode: AppendMode,
    ) -> ApiResult<Result<Self, Value>> {
        let channel = match queries::channel_id_by_name(conn, workspace_id, name)? {
            Some(id) => queries::channel(conn, &id)?,
            None => None,
        };
        let expected = pos.stream_id.as_deref();
        let refuse =
            |code: &str, channel: Option<&Channel>| Ok(Err(failure(name, code, expected, channel)));
        let Some(channel) = channel else {
            // Nothing was ever published here: position 0 is complete, anything else is not ours.
            if pos.serial != 0 || expected.is_some() {
                return refuse("stream_reset", None);
            }
            return Ok(Ok(Self::new(name, None, pos, 0, mode)));
        };
        if expected.is_some_and(|s| s != channel.id) {
            return refuse("stream_reset", Some(&channel));
        }
        let tail = channel.last_seq;
        if pos.serial > tail {
            return refuse("continuity_unverifiable", Some(&channel));
        }
        if tail - pos.serial > max_replay {
            return refuse("position_expired", Some(&channel));
        }
        // Retention may have purged part of the range: a gap means the position expired.
        if queries::count_versions(conn, &channel.id, pos.serial, tail)? != tail - pos.serial {
            return refuse("position_expired", Some(&channel));
        }
        Ok(Ok(Self::new(name, Some(channel), pos, tail, mode)))
    }

    fn new(
        name: &str,
        channel: Option<Channel>,
        pos: &Position,
        tail: i64,
        mode: AppendMode,
    ) -> Self {
        Self {
            name: name.to_string(),
            channel,
            expected: pos.stream_id.clone(),
            read_through: pos.serial,
            tail,
            mode,
            texts: HashMap::new(),
        }
    }

    pub fn channel_name(&self) -> &str {
        &self.name
    }

    /// Whether every version up to the tail was read.
    pub fn is_done(&self) -> bool {
        self.read_through >= self.tail
    }

    /// The next `limit` versions as `(serial, frame)`, in serial order. `Err(failure)` when
    /// retention purged one of them since [`ChannelResume::start`].
    pub fn page(
        &mut self,
        conn: &mut Conn,
        limit: i64,
    ) -> ApiResult<Result<Vec<(i64, String)>, Value>> {
        let Some(channel) = self.channel.as_ref() else {
            return Ok(Ok(Vec::new()));
        };
        if self.is_done() {
            return Ok(Ok(Vec::new()));
        }
        let rows = queries::versions_after(conn, &channel.id, self.read_through, self.tail, limit)?;
        let first = self.read_through + 1;
        let whole = rows.len() as i64 == limit.min(self.tail - self.read_through)
            && rows
                .iter()
                .enumerate()
                .all(|(i, r)| r.seq == first + i as i64);
        if !whole {
            self.read_through = self.tail;
            return Ok(Err(failure(
                &self.name,
                "position_expired",
                self.expected.as_deref(),
                Some(channel),
            )));
        }
        let mut frames = Vec::with_capacity(rows.len());
        for row in &rows {
            let Some(action) = Action::parse(&row.action) else {
                continue;
            };
            let body: Value = serde_json::from_str(&row.body).unwrap_or(Value::Null);
            let mut data = body.get("data").cloned().unwrap_or(Value::Null);
            if self.mode == AppendMode::Full {
                match (action, &data) {
                    (Action::Append, Value::String(fragment)) => {
                        let text = match self.texts.remove(&row.message_serial) {
                            Some(mut t) => {
                                t.push_str(fragment);
                                t
                            }
                            None => {
                                queries::text_at(conn, &channel.id, &row.message_serial, row.seq)?
                                    .unwrap_or_else(|| fragment.clone())
                            }
                        };
                        data = Value::String(text.clone());
                        self.texts.insert(row.message_serial.clone(), text);
                    }
                    (_, Value::String(s)) => {
                        self.texts.insert(row.message_serial.clone(), s.clone());
                    }
                    _ => {
                        self.texts.remove(&row.message_serial);
                    }
                }
            }
            let version_serial = crate::ids::version_serial(row.seq);
            let frame = MessageFrame {
                action,
                channel: &self.name,
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
        if let Some(last) = rows.last() {
            self.read_through = last.seq;
        }
        Ok(Ok(frames))
    }

    /// The channel's `recovered` entry once every page was sent: `sent` frames (live
    /// deliveries the socket already had are not sent again).
    pub fn summary(&self, sent: usize) -> Value {
        let position = match &self.channel {
            Some(c) => json!({"serial": self.tail, "stream_id": c.id}),
            None => json!({"serial": 0}),
        };
        json!({"channel": self.name, "source": "cold", "replayed": sent, "position": position})
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::rows::VersionRow;
    use crate::store::DbPool;
    use diesel::connection::SimpleConnection;

    /// A channel whose log holds a create at seq 1 (`"a"`) and appends of `"b"` up to `tail`.
    fn channel_with_stream(tail: i64) -> (tempfile::TempDir, DbPool, Channel) {
        let (dir, pool) = crate::store::test_pool(2);
        let mut conn = pool.get().expect("conn");
        let channel = crate::store::seed_direct_channel(&mut conn);
        let rows: Vec<VersionRow> = (1..=tail)
            .map(|seq| VersionRow {
                channel_id: "c1".into(),
                seq,
                message_serial: "m1".into(),
                action: if seq == 1 { "create" } else { "append" }.into(),
                actor: None,
                op_id: None,
                body: json!({"data": if seq == 1 { "a" } else { "b" }}).to_string(),
                created_at: "t".into(),
                fingerprint: None,
            })
            .collect();
        queries::insert_versions(&mut conn, &rows.iter().collect::<Vec<_>>()).expect("versions");
        queries::set_channel_last_seq(&mut conn, "c1", tail).expect("tail");
        (dir, pool, channel)
    }

    fn from(serial: i64) -> Position {
        Position {
            serial,
            stream_id: Some("c1".into()),
        }
    }

    fn data(frame: &str) -> String {
        let v: Value = serde_json::from_str(frame).expect("frame");
        v["data"].as_str().expect("string data").to_string()
    }

    #[test]
    fn a_resume_is_read_a_page_at_a_time_and_full_texts_carry_across_pages() {
        let (_dir, pool, channel) = channel_with_stream(1_200);
        let mut conn = pool.get().expect("conn");
        let mut resume = ChannelResume::start(
            &mut conn,
            "1",
            &channel.name,
            &from(0),
            5_000,
            AppendMode::Full,
        )
        .expect("read")
        .expect("resumable");
        let mut serials = Vec::new();
        let mut sizes = Vec::new();
        let mut last = String::new();
        while !resume.is_done() {
            let page = resume
                .page(&mut conn, RESUME_PAGE)
                .expect("read")
                .expect("whole");
            sizes.push(page.len());
            for (serial, frame) in page {
                serials.push(serial);
                last = data(&frame);
                assert_eq!(last.len() as i64, serial, "the text so far at {serial}");
            }
        }
        assert_eq!(sizes, vec![500, 500, 200]);
        assert_eq!(serials, (1..=1_200).collect::<Vec<_>>());
        assert_eq!(last, format!("a{}", "b".repeat(1_199)));
        assert_eq!(
            resume.summary(7)["position"],
            json!({"serial": 1_200, "stream_id": "c1"})
        );
        assert_eq!(resume.summary(7)["replayed"], json!(7));
    }

    #[test]
    fn a_purged_version_fails_the_resume_before_or_during_its_pages() {
        let (_dir, pool, channel) = channel_with_stream(1_200);
        let mut conn = pool.get().expect("conn");
        let start = |conn: &mut Conn, serial| {
            ChannelResume::start(
                conn,
                "1",
                &channel.name,
                &from(serial),
                5_000,
                AppendMode::Delta,
            )
            .expect("read")
        };
        let mut resume = start(&mut conn, 100).expect("whole");
        let first = resume
            .page(&mut conn, RESUME_PAGE)
            .expect("read")
            .expect("whole");
        assert_eq!(first.first().map(|f| f.0), Some(101));
        assert_eq!(first.last().map(|f| f.0), Some(600));

        // Retention purges 700 while the socket takes the first page.
        conn.batch_execute("DELETE FROM message_versions WHERE seq = 700")
            .expect("purge");
        let failed = resume.page(&mut conn, RESUME_PAGE).expect("read");
        let failed = failed.expect_err("a gap");
        assert_eq!(failed["code"], json!("position_expired"), "{failed}");
        assert!(resume.is_done(), "nothing more is read after a gap");

        // Checked before any page: a gap anywhere in the range fails at once.
        let refused = start(&mut conn, 100).err().expect("refused");
        assert_eq!(refused["code"], json!("position_expired"), "{refused}");
        // After the gap the log is whole again.
        let after = start(&mut conn, 700).expect("resumable after the gap");
        assert!(!after.is_done());
        // Past the replay budget, and ahead of the log.
        let far = ChannelResume::start(
            &mut conn,
            "1",
            &channel.name,
            &from(100),
            1_000,
            AppendMode::Delta,
        )
        .expect("read");
        assert_eq!(
            far.err().expect("too far")["code"],
            json!("position_expired")
        );
        assert_eq!(
            start(&mut conn, 1_201).err().expect("ahead")["code"],
            json!("continuity_unverifiable")
        );
    }

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
