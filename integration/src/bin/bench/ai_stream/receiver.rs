//! One subscriber of one stream: reads its `/api/realtime/ws` socket, follows the text of
//! each message of the stream's channel by the `length` of every `message.appended`, counts
//! each fragment by its ordinal, and records append-to-receive latency.
//!
//! On the Pusher face the socket is a Protocol V2 `/app/{key}` socket subscribed to the
//! stream's public channel: a create comes as the `bench` event, each append as
//! `sockudo:message.append` with the fragment as `data`, and every one of them takes the
//! channel's next `serial`, so a serial out of line is a loss or a reordering (V2 frames
//! carry no text length). Server pings are answered.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;
use hdrhistogram::Histogram;
use serde::Deserialize;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use super::streamer::parse_fragment;
use super::{Progress, StreamEnd};
use crate::now_ns;
use crate::pusher::{self, Face, PusherFrame};
use crate::subscriber::{self, cursor_gt, Ws};
use futures_util::SinkExt as _;

/// How many times a subscriber reconnects (with its cursor) after a 1013 overflow close.
const MAX_RECONNECTS: u32 = 5;
/// How long one read waits before the stop conditions are checked again.
const READ_TICK: Duration = Duration::from_millis(250);

#[derive(Deserialize)]
struct Frame<'a> {
    #[serde(rename = "type")]
    ty: &'a str,
    #[serde(default)]
    cursor: Option<&'a str>,
    #[serde(default)]
    channel_id: Option<&'a str>,
    #[serde(default)]
    seq: Option<i64>,
    #[serde(default, borrow)]
    payload: Option<Payload<'a>>,
}

/// The fields of `message.created` and `message.appended` payloads this check reads.
#[derive(Deserialize)]
struct Payload<'a> {
    #[serde(default, borrow)]
    message_id: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    fragment: Option<Cow<'a, str>>,
    #[serde(default)]
    length: Option<u64>,
    /// The whole text: of a created message, or of a compacted replay.
    #[serde(default)]
    data: Option<serde_json::Value>,
    #[serde(default)]
    compacted: bool,
    #[serde(default)]
    from_seq: Option<i64>,
    #[serde(default)]
    to_seq: Option<i64>,
}

/// What one subscriber saw.
pub struct ReceiverTally {
    pub stream: usize,
    pub subscriber: usize,
    /// Append-to-receive latency of each fragment's first delivery, µs.
    pub latency: Histogram<u64>,
    /// Deliveries by fragment ordinal, saturating at 255.
    pub received: Vec<u8>,
    /// `message.appended` frames of the stream's channel (duplicates included).
    pub appended_frames: u64,
    /// Empty-fragment appends: the closes.
    pub closes: u64,
    pub created_frames: u64,
    /// `message.appended` whose `length` is not the text so far plus its fragment.
    pub length_breaks: u64,
    /// A seq not above the last one of the channel.
    pub out_of_order: u64,
    /// A seq more than one above the last one (a missed delivery serial).
    pub seq_gaps: u64,
    pub cursor_regressions: u64,
    /// Fragments that are not this bench's, and events of other channels.
    pub foreign: u64,
    pub other_frames: u64,
    pub unparsable: u64,
    /// Compacted replays (after a reconnect) and the fragments only they delivered.
    pub compacted_frames: u64,
    pub recovered_by_replay: u64,
    pub overflow_closes: u32,
    pub reconnects: u32,
    pub error: Option<String>,
    pub last_delivery_ns: u64,
}

impl ReceiverTally {
    pub fn new(stream: usize, subscriber: usize, ordinals: usize) -> Result<Self, String> {
        Ok(Self {
            stream,
            subscriber,
            latency: Histogram::new_with_bounds(1, 600_000_000, 3)
                .map_err(|e| format!("histogram: {e}"))?,
            received: vec![0; ordinals],
            appended_frames: 0,
            closes: 0,
            created_frames: 0,
            length_breaks: 0,
            out_of_order: 0,
            seq_gaps: 0,
            cursor_regressions: 0,
            foreign: 0,
            other_frames: 0,
            unparsable: 0,
            compacted_frames: 0,
            recovered_by_replay: 0,
            overflow_closes: 0,
            reconnects: 0,
            error: None,
            last_delivery_ns: 0,
        })
    }
}

pub struct ReceiverTask {
    pub face: Face,
    pub ws: Ws,
    pub cursor: String,
    /// The channel's seq (serial) before this socket's first frame; 0: take the first as
    /// it comes.
    pub last_serial: i64,
    pub ws_url: String,
    pub token: String,
    /// Chat: the channel's id; Pusher: its name.
    pub channel: String,
    pub end: Arc<StreamEnd>,
    pub progress: Arc<Progress>,
    pub deadline: Instant,
    /// After the stream ends, stop once no frame came for this long.
    pub drain_idle: Duration,
    pub tally: ReceiverTally,
}

/// The next thing the socket gave.
enum Read {
    Text(String),
    Nothing,
    Stop,
}

impl ReceiverTask {
    pub async fn run(self) -> ReceiverTally {
        let ReceiverTask {
            face,
            mut ws,
            cursor,
            last_serial,
            ws_url,
            token,
            channel,
            end,
            progress,
            deadline,
            drain_idle,
            tally,
        } = self;
        let mut checker = Checker::new(face, channel, cursor, progress, tally);
        checker.last_seq = last_serial;
        let mut last_frame = Instant::now();
        loop {
            let expected = end.acknowledged.load(Ordering::Relaxed);
            let stream_ended = expected != u64::MAX;
            if Instant::now() >= deadline
                || (stream_ended
                    && (checker.distinct >= expected || last_frame.elapsed() >= drain_idle))
            {
                break;
            }
            match read(&mut ws, &ws_url, &token, &mut checker).await {
                Read::Text(text)
                    if face == Face::Pusher && text.contains("ping") && pusher::is_ping(&text) =>
                {
                    if let Err(e) = ws.send(Message::text(pusher::PONG)).await {
                        checker.tally.error = Some(format!("pong: {e}"));
                        break;
                    }
                }
                Read::Text(text) => {
                    last_frame = Instant::now();
                    checker.on_text(&text);
                }
                Read::Nothing => {}
                Read::Stop => break,
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
        checker.tally
    }
}

/// One frame, waiting at most [`READ_TICK`]; reconnects with the cursor after a 1013.
async fn read(ws: &mut Ws, ws_url: &str, token: &str, checker: &mut Checker) -> Read {
    let tally = &mut checker.tally;
    let next = match tokio::time::timeout(READ_TICK, ws.next()).await {
        Err(_) => return Read::Nothing,
        Ok(next) => next,
    };
    match next {
        Some(Ok(Message::Text(t))) => Read::Text(t.as_str().to_owned()),
        Some(Ok(Message::Close(frame))) => {
            let code = frame.as_ref().map(|f| u16::from(f.code));
            // (Only the chat face resumes with a cursor; the Pusher face's 4100 ends the socket.)
            if code == Some(1013) && checker.face == Face::Chat {
                tally.overflow_closes += 1;
                if tally.reconnects < MAX_RECONNECTS {
                    return reconnect(ws, ws_url, token, checker).await;
                }
            }
            tally.error = Some(format!("server closed the socket: {frame:?}"));
            Read::Stop
        }
        Some(Ok(_)) => Read::Nothing,
        Some(Err(e)) => {
            tally.error = Some(format!("ws read: {e}"));
            Read::Stop
        }
        None => {
            tally.error = Some("ws ended".into());
            Read::Stop
        }
    }
}

async fn reconnect(ws: &mut Ws, ws_url: &str, token: &str, checker: &mut Checker) -> Read {
    match subscriber::connect(ws_url, token, Some(&checker.cursor)).await {
        Ok((new_ws, _)) => {
            checker.tally.reconnects += 1;
            *ws = new_ws;
            Read::Nothing
        }
        Err(e) => {
            checker.tally.error = Some(format!("reconnect after 1013 failed: {e}"));
            Read::Stop
        }
    }
}

/// The checks of one subscriber, apart from its socket: the text length of each message of
/// the stream's channel, the channel's last seq, the cursor.
struct Checker {
    face: Face,
    /// Chat: the channel's id; Pusher: its name.
    channel: String,
    cursor: String,
    length_of: HashMap<String, u64>,
    last_seq: i64,
    /// Distinct appends received (fragments by ordinal, and closes).
    distinct: u64,
    progress: Arc<Progress>,
    tally: ReceiverTally,
}

impl Checker {
    fn new(
        face: Face,
        channel: String,
        cursor: String,
        progress: Arc<Progress>,
        tally: ReceiverTally,
    ) -> Self {
        Self {
            face,
            channel,
            cursor,
            length_of: HashMap::new(),
            last_seq: 0,
            distinct: 0,
            progress,
            tally,
        }
    }

    fn on_text(&mut self, text: &str) {
        match self.face {
            Face::Chat => self.on_chat_text(text),
            Face::Pusher => self.on_pusher_text(text),
        }
    }

    fn on_pusher_text(&mut self, text: &str) {
        let recv_ns = now_ns();
        let Ok(frame) = serde_json::from_str::<PusherFrame>(text) else {
            self.tally.unparsable += 1;
            return;
        };
        if frame.channel.as_deref() != Some(self.channel.as_str()) {
            // A message of another channel carries a serial; protocol events do not.
            if frame.serial.is_some() {
                self.tally.foreign += 1;
            } else {
                self.tally.other_frames += 1;
            }
            return;
        }
        let append = pusher::protocol_event(&frame.event) == Some("message.append");
        if !append && frame.event != pusher::EVENT {
            self.tally.other_frames += 1;
            return;
        }
        // Every create and append of the channel takes its next serial.
        let Some(serial) = frame.serial else {
            self.tally.unparsable += 1;
            return;
        };
        self.follow_seq(Some(serial), Some(serial));
        if !append {
            self.tally.created_frames += 1;
            return;
        }
        self.tally.appended_frames += 1;
        let Some(fragment) = frame.data.0 else {
            self.tally.unparsable += 1;
            return;
        };
        self.count_fragment(&fragment, recv_ns);
    }

    fn on_chat_text(&mut self, text: &str) {
        let recv_ns = now_ns();
        let Ok(frame) = serde_json::from_str::<Frame>(text) else {
            self.tally.unparsable += 1;
            return;
        };
        self.follow_cursor(frame.cursor);
        let is_message = frame.ty.starts_with("message.");
        if frame.channel_id != Some(self.channel.as_str()) {
            if is_message {
                self.tally.foreign += 1;
            } else {
                self.tally.other_frames += 1;
            }
            return;
        }
        let Some(payload) = frame.payload.filter(|_| is_message) else {
            self.tally.other_frames += 1;
            return;
        };
        match frame.ty {
            "message.created" => {
                self.follow_seq(frame.seq, frame.seq);
                self.on_created(payload);
            }
            "message.appended" if payload.compacted => {
                self.follow_seq(payload.from_seq, payload.to_seq.or(frame.seq));
                self.on_compacted(payload);
            }
            "message.appended" => {
                self.follow_seq(frame.seq, frame.seq);
                self.on_fragment(payload, recv_ns);
            }
            _ => self.tally.other_frames += 1,
        }
    }

    fn follow_cursor(&mut self, cursor: Option<&str>) {
        if let Some(c) = cursor {
            if !cursor_gt(c, &self.cursor) {
                self.tally.cursor_regressions += 1;
            }
            self.cursor.clear();
            self.cursor.push_str(c);
        }
    }

    /// Checks the channel's seqs `first..=last` follow the last one seen.
    fn follow_seq(&mut self, first: Option<i64>, last: Option<i64>) {
        let (Some(first), Some(last)) = (first, last) else {
            return;
        };
        if first <= self.last_seq {
            self.tally.out_of_order += 1;
            return;
        }
        // The first seq this socket sees may be anything: it connected after setup.
        if self.last_seq != 0 && first != self.last_seq + 1 {
            self.tally.seq_gaps += 1;
        }
        self.last_seq = last.max(first);
    }

    fn on_created(&mut self, payload: Payload<'_>) {
        self.tally.created_frames += 1;
        let Some(id) = payload.message_id else {
            self.tally.unparsable += 1;
            return;
        };
        let length = payload
            .data
            .as_ref()
            .and_then(serde_json::Value::as_str)
            .map_or(0, |d| d.len() as u64);
        self.length_of.insert(id.into_owned(), length);
    }

    fn on_fragment(&mut self, payload: Payload<'_>, recv_ns: u64) {
        self.tally.appended_frames += 1;
        let (Some(id), Some(fragment), Some(length)) =
            (payload.message_id, payload.fragment, payload.length)
        else {
            self.tally.unparsable += 1;
            return;
        };
        // An append of a message whose create this socket missed starts from nothing.
        let text_length = self.length_of.entry(id.into_owned()).or_insert(0);
        if length != *text_length + fragment.len() as u64 {
            self.tally.length_breaks += 1;
        }
        *text_length = length.max(*text_length);
        self.count_fragment(&fragment, recv_ns);
    }

    /// One delivered fragment (empty: a close): counted by its ordinal, timed the first time.
    fn count_fragment(&mut self, fragment: &str, recv_ns: u64) {
        self.tally.last_delivery_ns = recv_ns;
        self.progress.deliveries.fetch_add(1, Ordering::Relaxed);
        if fragment.is_empty() {
            self.tally.closes += 1;
            self.distinct += 1;
            return;
        }
        let Some((ordinal, sent_us)) = parse_fragment(fragment) else {
            self.tally.foreign += 1;
            return;
        };
        let Some(count) = self.tally.received.get_mut(ordinal) else {
            self.tally.foreign += 1;
            return;
        };
        if *count == 0 {
            self.distinct += 1;
            let latency_us = (recv_ns / 1_000).saturating_sub(sent_us);
            self.tally.latency.saturating_record(latency_us.max(1));
            self.progress.timeline.record(recv_ns, latency_us.max(1));
        }
        *count = count.saturating_add(1);
    }

    /// A replayed run of appends as one text: marks the fragments this socket had not seen.
    fn on_compacted(&mut self, payload: Payload<'_>) {
        self.tally.compacted_frames += 1;
        let (Some(id), Some(length)) = (payload.message_id, payload.length) else {
            self.tally.unparsable += 1;
            return;
        };
        let data = payload
            .data
            .as_ref()
            .and_then(serde_json::Value::as_str)
            .unwrap_or("");
        if data.len() as u64 != length {
            self.tally.length_breaks += 1;
        }
        self.length_of.insert(id.into_owned(), length);
        for piece in data.split_inclusive(';') {
            let slot = parse_fragment(piece).and_then(|(n, _)| self.tally.received.get_mut(n));
            match slot {
                Some(count) if *count == 0 => {
                    *count = 1;
                    self.distinct += 1;
                    self.tally.recovered_by_replay += 1;
                }
                Some(_) => {}
                None => self.tally.foreign += 1,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ai_stream::streamer::fragment;

    fn event(cursor: u64, ty: &str, channel: &str, seq: i64, payload: serde_json::Value) -> String {
        serde_json::json!({
            "id": "evt_x", "cursor": cursor.to_string(), "type": ty,
            "workspace_id": "1", "channel_id": channel, "seq": seq,
            "created_at": "2026-01-01T00:00:00.000Z", "payload": payload,
        })
        .to_string()
    }

    fn created(cursor: u64, seq: i64, message: &str) -> String {
        let payload = serde_json::json!({"message_id": message, "author_id": "a", "data": ""});
        event(cursor, "message.created", "chn_a", seq, payload)
    }

    fn appended(cursor: u64, seq: i64, message: &str, fragment: &str, length: usize) -> String {
        let payload = serde_json::json!({
            "message_id": message, "author_id": "a", "fragment": fragment,
            "length": length, "version_serial": format!("v{seq:012}"),
        });
        event(cursor, "message.appended", "chn_a", seq, payload)
    }

    fn checker() -> Checker {
        let tally = ReceiverTally::new(0, 0, 8).expect("histogram");
        Checker::new(
            Face::Chat,
            "chn_a".into(),
            "0".into(),
            Arc::default(),
            tally,
        )
    }

    #[test]
    fn an_in_order_stream_passes_every_check() {
        let mut c = checker();
        let (f0, f1) = (fragment(0, 1), fragment(1, 2));
        c.on_text(&created(1, 1, "m1"));
        c.on_text(&appended(2, 2, "m1", &f0, f0.len()));
        c.on_text(&appended(3, 3, "m1", &f1, f0.len() + f1.len()));
        c.on_text(&appended(4, 4, "m1", "", f0.len() + f1.len()));
        let t = &c.tally;
        assert_eq!((t.created_frames, t.appended_frames, t.closes), (1, 3, 1));
        assert_eq!((t.length_breaks, t.out_of_order, t.seq_gaps), (0, 0, 0));
        assert_eq!((t.foreign, t.unparsable, t.cursor_regressions), (0, 0, 0));
        assert_eq!(&t.received[..3], &[1, 1, 0]);
        assert_eq!(c.distinct, 3);
        assert_eq!(t.latency.len(), 2);
    }

    #[test]
    fn loss_duplicates_and_reordering_are_counted() {
        let mut c = checker();
        let f: Vec<String> = (0..4).map(|n| fragment(n, 1)).collect();
        let len = |n: usize| f[..n].iter().map(String::len).sum::<usize>();
        c.on_text(&created(1, 1, "m1"));
        c.on_text(&appended(2, 2, "m1", &f[0], len(1)));
        // Seq 3 (fragment 1) never arrives: a seq gap and a length break.
        c.on_text(&appended(4, 4, "m1", &f[2], len(3)));
        // Fragment 2 again, late: out of order, a length break, a duplicate.
        c.on_text(&appended(5, 4, "m1", &f[2], len(3)));
        // Another channel's event, and a cursor that went back.
        c.on_text(&event(
            3,
            "message.created",
            "chn_b",
            9,
            serde_json::json!({}),
        ));
        c.on_text(&appended(6, 5, "m1", &f[3], len(4)));
        c.on_text("not json");
        let t = &c.tally;
        assert_eq!(t.seq_gaps, 1);
        assert_eq!(t.out_of_order, 1);
        assert_eq!(t.length_breaks, 2);
        assert_eq!(&t.received[..4], &[1, 0, 2, 1]);
        assert_eq!((t.foreign, t.unparsable, t.cursor_regressions), (1, 1, 1));
        assert_eq!(c.distinct, 3);
    }

    fn pusher_checker(last_serial: i64) -> Checker {
        let tally = ReceiverTally::new(0, 0, 8).expect("histogram");
        let mut c = Checker::new(
            Face::Pusher,
            "bench-t-ai0".into(),
            String::new(),
            Arc::default(),
            tally,
        );
        c.last_seq = last_serial;
        c
    }

    fn v2(event: &str, channel: &str, serial: i64, data: &str) -> String {
        serde_json::json!({
            "event": event, "channel": channel, "data": data, "message_id": "m000000000001",
            "stream_id": "chn_1", "serial": serial, "extras": {"headers": {}},
        })
        .to_string()
    }

    #[test]
    fn a_pusher_stream_is_checked_by_serial_and_ordinal() {
        let mut c = pusher_checker(0);
        let (f0, f1, f2) = (fragment(0, 1), fragment(1, 2), fragment(2, 3));
        let ch = "bench-t-ai0";
        c.on_text(&v2("bench", ch, 1, ""));
        c.on_text(&v2("sockudo:message.append", ch, 2, &f0));
        c.on_text(&v2("sockudo:message.append", ch, 3, &f1));
        c.on_text(&v2("sockudo:message.append", ch, 4, ""));
        // Not this stream's: another channel's append, a protocol event.
        c.on_text(&v2("sockudo:message.append", "bench-t-ai1", 9, &f2));
        c.on_text(r#"{"event":"sockudo_internal:subscription_count","channel":"bench-t-ai0","data":"{}"}"#);
        let t = &c.tally;
        assert_eq!((t.created_frames, t.appended_frames, t.closes), (1, 3, 1));
        assert_eq!((t.out_of_order, t.seq_gaps, t.unparsable), (0, 0, 0));
        assert_eq!((t.foreign, t.other_frames), (1, 1));
        assert_eq!(&t.received[..3], &[1, 1, 0]);
        assert_eq!(c.distinct, 3);
        assert_eq!(t.latency.len(), 2);
    }

    #[test]
    fn a_pusher_serial_gap_or_repeat_is_counted_from_the_subscription() {
        // subscription_succeeded said 5: the first message must be 6.
        let mut c = pusher_checker(5);
        let ch = "bench-t-ai0";
        c.on_text(&v2("sockudo:message.append", ch, 7, &fragment(0, 1)));
        c.on_text(&v2("sockudo:message.append", ch, 7, &fragment(0, 1)));
        c.on_text(&v2("sockudo:message.append", ch, 8, &fragment(1, 1)));
        // A V2 message without a serial cannot be checked.
        c.on_text(r#"{"event":"sockudo:message.append","channel":"bench-t-ai0","data":"2@1;"}"#);
        let t = &c.tally;
        assert_eq!((t.seq_gaps, t.out_of_order, t.unparsable), (1, 1, 1));
        // The repeat is a duplicate delivery of fragment 0.
        assert_eq!(&t.received[..3], &[2, 1, 0]);
    }

    #[test]
    fn a_compacted_replay_fills_in_what_was_missed() {
        let mut c = checker();
        let f: Vec<String> = (0..3).map(|n| fragment(n, 1)).collect();
        c.on_text(&created(1, 1, "m1"));
        c.on_text(&appended(2, 2, "m1", &f[0], f[0].len()));
        let text = f.concat();
        let payload = serde_json::json!({
            "message_id": "m1", "author_id": "a", "data": text, "length": text.len(),
            "compacted": true, "from_seq": 3, "to_seq": 4,
        });
        c.on_text(&event(5, "message.appended", "chn_a", 4, payload));
        let t = &c.tally;
        assert_eq!((t.compacted_frames, t.recovered_by_replay), (1, 2));
        assert_eq!(&t.received[..3], &[1, 1, 1]);
        assert_eq!((t.length_breaks, t.seq_gaps, t.out_of_order), (0, 0, 0));
        assert_eq!(c.distinct, 3);
    }
}
