//! WebSocket subscribers of `/api/realtime/ws`: each reads every frame, parses only the
//! fields it needs, checks exactly-once and per-channel seq order, and records latency.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;
use hdrhistogram::Histogram;
use serde::Deserialize;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::plot::Recorder;
use crate::{now_ns, Plan};

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How many times a subscriber reconnects (with its cursor) after a 1013 overflow close.
const MAX_RECONNECTS: u32 = 5;

/// State shared by the subscribers and the orchestrator.
pub struct SubShared {
    /// `message.created` frames received by all subscribers (progress line).
    pub delivered: AtomicU64,
    /// `u64::MAX` while posting; then the number of acknowledged posts.
    pub acked_final: AtomicU64,
    /// Stop now (deadline or failure).
    pub abort: AtomicBool,
}

/// The data every poster stamps into a message: send time, poster, counter.
#[derive(Deserialize)]
pub struct Stamp {
    pub t: u64,
    pub p: usize,
    pub n: usize,
}

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
    #[serde(default)]
    payload: Option<Payload>,
}

#[derive(Deserialize)]
struct Payload {
    // Posted data is a string; anything else here is not this bench's message.
    #[serde(default)]
    data: Option<serde_json::Value>,
}

pub struct SubResult {
    pub hist: Histogram<u64>,
    /// Times each message (by plan index) arrived, saturating at 255.
    pub received: Vec<u8>,
    pub frames: u64,
    pub message_frames: u64,
    /// Frames of other types (none expected once posting starts).
    pub other_frames: u64,
    /// A channel's seq not above the last one seen on that channel.
    pub out_of_order: u64,
    /// A channel's seq jumping by more than one (a missed delivery serial).
    pub seq_gaps: u64,
    pub cursor_regressions: u64,
    /// message.created frames that do not carry this run's stamp.
    pub foreign: u64,
    pub wrong_channel: u64,
    pub unparsable: u64,
    pub overflow_closes: u32,
    pub reconnects: u32,
    pub error: Option<String>,
    pub first_delivery_ns: u64,
    pub last_delivery_ns: u64,
    /// Where each latency also goes, by second of receipt (`--plot`).
    pub timeline: Recorder,
}

impl SubResult {
    pub fn new(total_slots: usize) -> Result<Self, String> {
        Ok(Self {
            // Microseconds, 1 µs .. 10 min, 3 significant digits.
            hist: Histogram::new_with_bounds(1, 600_000_000, 3)
                .map_err(|e| format!("histogram: {e}"))?,
            received: vec![0; total_slots],
            frames: 0,
            message_frames: 0,
            other_frames: 0,
            out_of_order: 0,
            seq_gaps: 0,
            cursor_regressions: 0,
            foreign: 0,
            wrong_channel: 0,
            unparsable: 0,
            overflow_closes: 0,
            reconnects: 0,
            error: None,
            first_delivery_ns: 0,
            last_delivery_ns: 0,
            timeline: Recorder::default(),
        })
    }
}

/// Connects and reads the `realtime.ready` frame; returns the socket and its cursor.
pub async fn connect(
    ws_url: &str,
    token: &str,
    after_cursor: Option<&str>,
) -> Result<(Ws, String), String> {
    let url = match after_cursor {
        Some(c) => format!("{ws_url}/api/realtime/ws?after_cursor={c}"),
        None => format!("{ws_url}/api/realtime/ws"),
    };
    let mut req = url
        .as_str()
        .into_client_request()
        .map_err(|e| format!("ws request: {e}"))?;
    req.headers_mut().insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|e| format!("ws auth header: {e}"))?,
    );
    // A 4 KiB read buffer, as every other scenario's sockets: tungstenite zero-fills up to
    // `read_buffer_size` (128 KiB by default) before each read, which was a fifth of this
    // generator's CPU in ai-stream (`perf`: memset).
    let (mut ws, _) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::connect_async_with_config(req, Some(crate::chat::ws_config(4096)), true),
    )
    .await
    .map_err(|_| "ws connect timed out after 10s".to_string())?
    .map_err(|e| format!("ws connect: {e}"))?;
    let first = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .map_err(|_| "no realtime.ready within 10s".to_string())?;
    match first {
        Some(Ok(Message::Text(t))) => {
            let v: serde_json::Value =
                serde_json::from_str(t.as_str()).map_err(|e| format!("ready frame: {e}"))?;
            if v.get("type").and_then(|t| t.as_str()) != Some("realtime.ready") {
                return Err(format!("first frame is not realtime.ready: {t}"));
            }
            let cursor = v
                .get("cursor")
                .and_then(|c| c.as_str())
                .ok_or_else(|| format!("realtime.ready without a cursor: {t}"))?
                .to_string();
            Ok((ws, cursor))
        }
        Some(Ok(Message::Close(c))) => Err(format!("closed before ready: {c:?}")),
        Some(Ok(other)) => Err(format!("unexpected first frame: {other:?}")),
        Some(Err(e)) => Err(format!("ws read: {e}")),
        None => Err("ws ended before ready".into()),
    }
}

/// Numeric order of cursors (decimal strings here; longer is larger), opaque otherwise.
pub fn cursor_gt(a: &str, b: &str) -> bool {
    (a.len(), a) > (b.len(), b)
}

pub struct SubTask {
    pub ws: Ws,
    pub cursor: String,
    pub ws_url: String,
    pub token: String,
    pub plan: Arc<Plan>,
    pub channel_index: Arc<HashMap<String, usize>>,
    pub shared: Arc<SubShared>,
    pub deadline: Instant,
    /// After posting ends, stop once no frame came for this long.
    pub drain_idle: Duration,
    /// Where the figures go (built by the caller, which can report a failure).
    pub result: SubResult,
}

enum Step {
    Continue,
    Stop,
}

impl SubTask {
    pub async fn run(self) -> SubResult {
        let SubTask {
            mut ws,
            mut cursor,
            ws_url,
            token,
            plan,
            channel_index,
            shared,
            deadline,
            drain_idle,
            result: mut r,
        } = self;
        let mut last_seq = vec![0i64; channel_index.len()];
        let mut unique: u64 = 0;
        let mut last_frame = Instant::now();
        let tick = Duration::from_millis(250);
        loop {
            if shared.abort.load(Ordering::Relaxed) || Instant::now() >= deadline {
                break;
            }
            let acked = shared.acked_final.load(Ordering::Relaxed);
            if acked != u64::MAX && (unique >= acked || last_frame.elapsed() >= drain_idle) {
                break;
            }
            let next = match tokio::time::timeout(tick, ws.next()).await {
                Err(_) => continue,
                Ok(n) => n,
            };
            last_frame = Instant::now();
            let step = match next {
                Some(Ok(Message::Text(t))) => {
                    r.frames += 1;
                    handle_text(
                        t.as_str(),
                        &plan,
                        &channel_index,
                        &shared,
                        &mut r,
                        &mut last_seq,
                        &mut cursor,
                        &mut unique,
                    );
                    Step::Continue
                }
                Some(Ok(Message::Close(frame))) => {
                    let code = frame.as_ref().map(|f| u16::from(f.code));
                    if code == Some(1013) && r.reconnects < MAX_RECONNECTS {
                        r.overflow_closes += 1;
                        match connect(&ws_url, &token, Some(&cursor)).await {
                            Ok((new_ws, _)) => {
                                r.reconnects += 1;
                                ws = new_ws;
                                Step::Continue
                            }
                            Err(e) => {
                                r.error = Some(format!("reconnect after 1013 failed: {e}"));
                                Step::Stop
                            }
                        }
                    } else {
                        if code == Some(1013) {
                            r.overflow_closes += 1;
                        }
                        r.error = Some(format!("server closed the socket: {frame:?}"));
                        Step::Stop
                    }
                }
                Some(Ok(_)) => Step::Continue,
                Some(Err(e)) => {
                    r.error = Some(format!("ws read: {e}"));
                    Step::Stop
                }
                None => {
                    r.error = Some("ws ended".into());
                    Step::Stop
                }
            };
            if let Step::Stop = step {
                break;
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
        r
    }
}

#[allow(clippy::too_many_arguments)]
fn handle_text(
    text: &str,
    plan: &Plan,
    channel_index: &HashMap<String, usize>,
    shared: &SubShared,
    r: &mut SubResult,
    last_seq: &mut [i64],
    cursor: &mut String,
    unique: &mut u64,
) {
    let recv_ns = now_ns();
    let Ok(f) = serde_json::from_str::<Frame>(text) else {
        r.unparsable += 1;
        return;
    };
    if let Some(c) = f.cursor {
        if !cursor_gt(c, cursor) {
            r.cursor_regressions += 1;
        }
        cursor.clear();
        cursor.push_str(c);
    }
    if f.ty != "message.created" {
        r.other_frames += 1;
        return;
    }
    r.message_frames += 1;
    shared.delivered.fetch_add(1, Ordering::Relaxed);
    if r.first_delivery_ns == 0 {
        r.first_delivery_ns = recv_ns;
    }
    r.last_delivery_ns = recv_ns;
    let Some(ci) = f.channel_id.and_then(|c| channel_index.get(c)).copied() else {
        r.foreign += 1;
        return;
    };
    if let Some(seq) = f.seq {
        let last = last_seq[ci];
        if seq <= last {
            r.out_of_order += 1;
        } else {
            if seq != last + 1 {
                r.seq_gaps += 1;
            }
            last_seq[ci] = seq;
        }
    }
    let stamp = f.payload.and_then(|p| p.data).and_then(|d| {
        d.as_str()
            .and_then(|s| serde_json::from_str::<Stamp>(s).ok())
    });
    let Some(stamp) = stamp else {
        r.foreign += 1;
        return;
    };
    let Some(slot) = plan.slot(stamp.p, stamp.n) else {
        r.foreign += 1;
        return;
    };
    if plan.channel_of(stamp.p, stamp.n) != ci {
        r.wrong_channel += 1;
    }
    let count = &mut r.received[slot];
    if *count == 0 {
        *unique += 1;
    }
    *count = count.saturating_add(1);
    let latency_us = (recv_ns.saturating_sub(stamp.t) / 1_000).max(1);
    r.hist.saturating_record(latency_us);
    r.timeline.record(recv_ns, latency_us);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(cursor: u64, channel: &str, seq: i64, p: usize, n: usize) -> String {
        let data = format!(r#"{{"t":{},"p":{p},"n":{n}}}"#, now_ns());
        serde_json::json!({
            "id": "evt_x", "cursor": cursor.to_string(), "type": "message.created",
            "workspace_id": "1", "channel_id": channel, "seq": seq,
            "created_at": "2026-01-01T00:00:00.000Z",
            "payload": {"message_id": "m1", "author_id": "a", "data": data, "extras": {}},
        })
        .to_string()
    }

    #[test]
    fn counts_order_gaps_duplicates_and_foreign_frames() {
        // 2 posters × 2 messages over 2 channels: poster p's n-th goes to (p + n) % 2.
        let plan = Plan::new(4, 2, 2);
        let index: HashMap<String, usize> = [("a".to_string(), 0), ("b".to_string(), 1)]
            .into_iter()
            .collect();
        let shared = SubShared {
            delivered: AtomicU64::new(0),
            acked_final: AtomicU64::new(u64::MAX),
            abort: AtomicBool::new(false),
        };
        let mut r = SubResult::new(plan.slots).expect("histogram");
        let mut last_seq = vec![0; 2];
        let mut cursor = "10".to_string();
        let mut unique = 0;
        let mut feed = |text: &str, r: &mut SubResult| {
            handle_text(
                text,
                &plan,
                &index,
                &shared,
                r,
                &mut last_seq,
                &mut cursor,
                &mut unique,
            )
        };
        feed(&frame(11, "a", 1, 0, 0), &mut r); // in order
        feed(&frame(12, "a", 3, 1, 1), &mut r); // gap: seq 2 skipped
        feed(&frame(13, "a", 2, 1, 1), &mut r); // out of order, and a duplicate message
        feed(&frame(12, "b", 1, 1, 0), &mut r); // cursor went backwards
        feed(&frame(14, "a", 4, 0, 1), &mut r); // (0 + 1) % 2 = channel b: wrong channel
        feed(&frame(15, "zzz", 1, 0, 0), &mut r); // not one of the bench's channels
        feed(r#"{"type":"channel.updated","cursor":"16"}"#, &mut r);
        feed("not json", &mut r);
        assert_eq!(r.message_frames, 6);
        assert_eq!(r.seq_gaps, 1);
        assert_eq!(r.out_of_order, 1);
        assert_eq!(r.cursor_regressions, 1);
        assert_eq!(r.wrong_channel, 1);
        assert_eq!(r.foreign, 1);
        assert_eq!(r.other_frames, 1);
        assert_eq!(r.unparsable, 1);
        assert_eq!(unique, 4);
        let slot = plan.slot(1, 1).expect("slot");
        assert_eq!(r.received[slot], 2);
        assert_eq!(r.hist.len(), 5);
    }
}
