//! One AI stream: an agent that posts an empty message and appends a fragment on every tick
//! of a fixed schedule, with at most `max_in_flight` appends unanswered.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt as _;
use hdrhistogram::Histogram;
use serde_json::Value;
use tokio::time::{Instant, MissedTickBehavior};

use super::Progress;
use crate::api::{signed_query, snippet};
use crate::http1::Http1;
use crate::now_ns;
use crate::poster::{reason, retry_wait};
use crate::pusher;
use crate::server::AppCreds;

/// Attempts to create a message or close one on 429/503 or a transport error.
const MAX_ATTEMPTS: u32 = 5;
/// The closing append: an empty fragment with `extras.status` = `complete`.
const CLOSE_BODY: &str = r#"{"data":"","extras":{"status":"complete"}}"#;

/// Where a stream's messages are made and appended to, by face.
pub enum Route {
    /// The chat API: `/api/channels/{id}/messages` (created 201), the agent's bearer token on
    /// every request.
    Chat { messages_path: String },
    /// The signed server API on a public channel: `POST /apps/{id}/events` with `info` for
    /// the new message's serial (200), then `/apps/{id}/channels/{c}/messages/{serial}/append`.
    Pusher { creds: AppCreds, channel: String },
}

impl Route {
    /// The create request: path (signed when the face needs it), body, the status of success.
    fn create(&self) -> (String, String, u16) {
        match self {
            Self::Chat { messages_path } => (messages_path.clone(), r#"{"data":""}"#.into(), 201),
            Self::Pusher { creds, channel } => {
                let body = serde_json::json!({
                    "name": pusher::EVENT, "channel": channel, "data": "", "info": "",
                })
                .to_string();
                (
                    self.signed(&format!("/apps/{}/events", creds.id), &body),
                    body,
                    200,
                )
            }
        }
    }

    /// The path appends to message `serial` go to (unsigned).
    fn append_path(&self, serial: &str) -> String {
        match self {
            Self::Chat { messages_path } => format!("{messages_path}/{serial}/append"),
            Self::Pusher { creds, channel } => {
                format!(
                    "/apps/{}/channels/{channel}/messages/{serial}/append",
                    creds.id
                )
            }
        }
    }

    /// `path` as sent with `body`: the Pusher face signs every request.
    fn signed(&self, path: &str, body: &str) -> String {
        match self {
            Self::Chat { .. } => path.to_string(),
            Self::Pusher { creds, .. } => {
                format!(
                    "{path}?{}",
                    signed_query(creds, "POST", path, body.as_bytes())
                )
            }
        }
    }

    /// The new message's serial in a create's answer.
    fn serial_pointer(&self) -> String {
        match self {
            Self::Chat { .. } => "/message/message_serial".into(),
            Self::Pusher { channel, .. } => format!("/channels/{channel}/message_serial"),
        }
    }
}

/// When a stream appends: `ticks` ticks `period` apart from `start`, none after `stop_at`.
pub struct Schedule {
    pub start: Instant,
    pub period: Duration,
    pub ticks: usize,
    pub stop_at: Instant,
}

/// The fragment of append `ordinal` sent at `sent_us` (run clock): self-delimiting, ASCII.
pub fn fragment(ordinal: usize, sent_us: u64) -> String {
    format!("{ordinal}@{sent_us};")
}

/// `(ordinal, sent_us)` of a fragment made by [`fragment`].
pub fn parse_fragment(text: &str) -> Option<(usize, u64)> {
    let (ordinal, sent) = text.strip_suffix(';')?.split_once('@')?;
    Some((ordinal.parse().ok()?, sent.parse().ok()?))
}

/// What one stream did.
pub struct StreamerTally {
    /// Acknowledged (200) by fragment ordinal.
    pub acked: Vec<bool>,
    pub sent: u64,
    pub acked_fragments: u64,
    pub closes_acked: u64,
    pub messages_opened: u64,
    /// Appends (fragments and closes) answered with something other than 200, by status.
    pub refused: BTreeMap<u16, u64>,
    pub transport_errors: u64,
    /// Appends still unanswered when the run's deadline passed.
    pub unanswered: u64,
    /// Append round trip of acknowledged fragments, µs.
    pub rtt: Histogram<u64>,
    /// How late a fragment left after its tick, µs.
    pub send_lag: Histogram<u64>,
    pub first_error: Option<String>,
    /// Why the stream stopped early (a message could not be created).
    pub fatal: Option<String>,
    pub last_ack_ns: u64,
}

impl StreamerTally {
    pub fn new(ticks: usize) -> Result<Self, String> {
        let histogram =
            || Histogram::new_with_bounds(1, 600_000_000, 3).map_err(|e| format!("histogram: {e}"));
        Ok(Self {
            acked: vec![false; ticks],
            sent: 0,
            acked_fragments: 0,
            closes_acked: 0,
            messages_opened: 0,
            refused: BTreeMap::new(),
            transport_errors: 0,
            unanswered: 0,
            rtt: histogram()?,
            send_lag: histogram()?,
            first_error: None,
            fatal: None,
            last_ack_ns: 0,
        })
    }

    /// Appends the server acknowledged, fragments and closes: what each subscriber must get.
    pub fn acknowledged(&self) -> u64 {
        self.acked_fragments + self.closes_acked
    }

    fn note_error(&mut self, error: impl FnOnce() -> String) {
        if self.first_error.is_none() {
            self.first_error = Some(error());
        }
    }
}

/// The message a stream appends to.
pub(super) struct OpenMessage {
    append_path: String,
    fragments: usize,
    /// The server refused an append with 413 (a limit): continue in a new message.
    refused: bool,
}

/// How the server answered one append.
enum Answer {
    Durable,
    Refused { status: u16, error: String },
    Transport(String),
}

/// An append's answer, with what it was.
struct Answered {
    /// The fragment's ordinal; `None` for a closing append.
    ordinal: Option<usize>,
    answer: Answer,
    rtt_us: u64,
}

type InFlight = FuturesUnordered<Pin<Box<dyn Future<Output = Answered> + Send>>>;

pub struct StreamerTask {
    /// The stream's connections, sending its agent's token.
    pub http: Http1,
    pub route: Route,
    pub schedule: Schedule,
    pub max_in_flight: usize,
    /// Fragments per message; the append after them closes it.
    pub fragments_per_message: usize,
    /// Appends send `Prefer: return=minimal` and get `{event, status}` back.
    pub minimal_answers: bool,
    pub deadline: Instant,
    pub progress: Arc<Progress>,
    pub tally: StreamerTally,
    /// The message the first tick appends to, opened before the schedule starts.
    pub(super) first_message: Option<OpenMessage>,
}

impl StreamerTask {
    /// Opens the first message, so that the run starts appending at its rate instead of with
    /// the creates and the ticks missed meanwhile (fired at once).
    pub async fn open_first_message(mut self) -> Self {
        match self.open_message().await {
            Ok(m) => self.first_message = Some(m),
            Err(e) => self.tally.fatal = Some(e),
        }
        self
    }

    pub async fn run(mut self) -> StreamerTally {
        if self.tally.fatal.is_some() {
            return self.tally;
        }
        if let Err(e) = self.stream().await {
            self.tally.fatal = Some(e);
        }
        self.tally
    }

    async fn stream(&mut self) -> Result<(), String> {
        let mut message = match self.first_message.take() {
            Some(m) => m,
            None => self.open_message().await?,
        };
        let mut in_flight = InFlight::new();
        let mut ticker = tokio::time::interval_at(self.schedule.start, self.schedule.period);
        // Ticks missed while rotating fire at once; those finding no free slot are skipped.
        ticker.set_missed_tick_behavior(MissedTickBehavior::Burst);
        let stop = tokio::time::sleep_until(self.schedule.stop_at);
        tokio::pin!(stop);
        let mut ordinal = 0;
        let mut ticks = 0;
        while ticks < self.schedule.ticks {
            tokio::select! {
                Some(answered) = in_flight.next(), if !in_flight.is_empty() => {
                    message.refused |= self.settle(answered);
                }
                _ = ticker.tick() => {
                    let due = self.schedule.start + self.schedule.period * ticks as u32;
                    ticks += 1;
                    if message.fragments >= self.fragments_per_message || message.refused {
                        self.drain(&mut in_flight, &mut message).await;
                        self.close(&message).await;
                        message = self.open_message().await?;
                    }
                    if in_flight.len() < self.max_in_flight {
                        in_flight.push(self.send_fragment(&mut message, ordinal, due));
                        ordinal += 1;
                    }
                }
                _ = &mut stop => break,
            }
        }
        self.drain(&mut in_flight, &mut message).await;
        self.close(&message).await;
        Ok(())
    }

    /// Starts the append of fragment `ordinal`, due at `due`.
    fn send_fragment(
        &mut self,
        message: &mut OpenMessage,
        ordinal: usize,
        due: Instant,
    ) -> Pin<Box<dyn Future<Output = Answered> + Send>> {
        let lag_us = Instant::now().saturating_duration_since(due).as_micros() as u64;
        self.tally.send_lag.saturating_record(lag_us.max(1));
        self.tally.sent += 1;
        message.fragments += 1;
        let body = format!(r#"{{"data":"{}"}}"#, fragment(ordinal, now_ns() / 1_000));
        let request = self.append_request(&message.append_path, body);
        Box::pin(async move {
            let (answer, rtt_us) = request.answer().await;
            Answered {
                ordinal: Some(ordinal),
                answer,
                rtt_us,
            }
        })
    }

    fn append_request(&self, path: &str, body: String) -> Request {
        Request {
            http: self.http.clone(),
            path: self.route.signed(path, &body),
            extra: if self.minimal_answers {
                "Prefer: return=minimal\r\n"
            } else {
                ""
            },
            body,
        }
    }

    /// Books one answer; `true` when the server refused it for a message limit (413).
    fn settle(&mut self, answered: Answered) -> bool {
        match answered.answer {
            Answer::Durable => {
                match answered.ordinal {
                    Some(n) => {
                        if let Some(slot) = self.tally.acked.get_mut(n) {
                            *slot = true;
                        }
                        self.tally.acked_fragments += 1;
                        self.tally.rtt.saturating_record(answered.rtt_us.max(1));
                    }
                    None => self.tally.closes_acked += 1,
                }
                self.tally.last_ack_ns = now_ns();
                self.progress.acked.fetch_add(1, Ordering::Relaxed);
                false
            }
            Answer::Refused { status, error } => {
                *self.tally.refused.entry(status).or_insert(0) += 1;
                self.tally.note_error(|| error);
                self.progress.failed.fetch_add(1, Ordering::Relaxed);
                status == 413
            }
            Answer::Transport(e) => {
                self.tally.transport_errors += 1;
                self.tally.note_error(|| format!("transport: {e}"));
                self.progress.failed.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// Waits for every unanswered append (until the deadline; then they count as unanswered).
    async fn drain(&mut self, in_flight: &mut InFlight, message: &mut OpenMessage) {
        while !in_flight.is_empty() {
            match tokio::time::timeout_at(self.deadline, in_flight.next()).await {
                Ok(Some(answered)) => message.refused |= self.settle(answered),
                Ok(None) => break,
                Err(_) => {
                    self.tally.unanswered += in_flight.len() as u64;
                    self.progress
                        .failed
                        .fetch_add(in_flight.len() as u64, Ordering::Relaxed);
                    in_flight.clear();
                }
            }
        }
    }

    /// The closing append (retried on 429/503 and transport errors).
    async fn close(&mut self, message: &OpenMessage) {
        for attempt in 1..=MAX_ATTEMPTS {
            let request = self.append_request(&message.append_path, CLOSE_BODY.into());
            let Ok((answer, rtt_us)) =
                tokio::time::timeout_at(self.deadline, request.answer()).await
            else {
                self.tally.unanswered += 1;
                return;
            };
            let retry = match &answer {
                Answer::Refused { status, .. } => matches!(status, 429 | 503),
                Answer::Transport(_) => true,
                Answer::Durable => false,
            };
            if retry && attempt < MAX_ATTEMPTS {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            self.settle(Answered {
                ordinal: None,
                answer,
                rtt_us,
            });
            return;
        }
    }

    /// Posts an empty message (`{"data": ""}`) and returns where its appends go.
    async fn open_message(&mut self) -> Result<OpenMessage, String> {
        let mut last_error = String::from("no attempt");
        for _ in 0..MAX_ATTEMPTS {
            let (path, body, created) = self.route.create();
            let request = self.http.post(&path, "", body.as_bytes());
            let response = tokio::time::timeout_at(self.deadline, request)
                .await
                .map_err(|_| "the deadline passed while creating a message".to_string())?;
            let response = match response {
                Ok(r) => r,
                Err(e) => {
                    last_error = format!("transport: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let (status, body) = (response.status, response.body);
            let wait = retry_wait(response.retry_after);
            match status {
                _ if status == created => {
                    let serial = message_serial(&body, &self.route.serial_pointer())?;
                    self.tally.messages_opened += 1;
                    return Ok(OpenMessage {
                        append_path: self.route.append_path(&serial),
                        fragments: 0,
                        refused: false,
                    });
                }
                429 | 503 => {
                    last_error = reason(status, &body);
                    tokio::time::sleep(wait).await;
                }
                _ => return Err(format!("create message: {}", reason(status, &body))),
            }
        }
        Err(format!(
            "create message: gave up after {MAX_ATTEMPTS} attempts: {last_error}"
        ))
    }
}

/// The message serial at `pointer` of a create answer, checked to be safe in a URL path.
fn message_serial(body: &[u8], pointer: &str) -> Result<String, String> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| format!("create message: bad JSON ({e}): {}", snippet(body)))?;
    let serial = v
        .pointer(pointer)
        .and_then(Value::as_str)
        .ok_or_else(|| format!("create message: no {pointer} in {}", snippet(body)))?;
    let url_safe = |b: u8| b.is_ascii_alphanumeric() || b"-_.~".contains(&b);
    if serial.is_empty() || !serial.bytes().all(url_safe) {
        return Err(format!("create message: unexpected serial {serial:?}"));
    }
    Ok(serial.to_string())
}

/// One append, ready to send.
struct Request {
    http: Http1,
    path: String,
    /// Header lines of this request only.
    extra: &'static str,
    body: String,
}

impl Request {
    /// Sends the append; its answer and round trip (µs).
    async fn answer(self) -> (Answer, u64) {
        let sent = Instant::now();
        let answer = match self
            .http
            .post(&self.path, self.extra, self.body.as_bytes())
            .await
        {
            Err(e) => Answer::Transport(e),
            Ok(a) if a.status == 200 => Answer::Durable,
            Ok(a) => Answer::Refused {
                status: a.status,
                error: reason(a.status, &a.body),
            },
        };
        (answer, sent.elapsed().as_micros() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fragments_round_trip_and_reject_others() {
        assert_eq!(
            parse_fragment(&fragment(42, 1_234_567)),
            Some((42, 1_234_567))
        );
        assert_eq!(parse_fragment("42@1"), None);
        assert_eq!(parse_fragment("x@1;"), None);
        assert_eq!(parse_fragment(""), None);
    }

    #[test]
    fn serial_must_be_present_and_url_safe() {
        let chat = "/message/message_serial";
        let ok = br#"{"message":{"message_serial":"m000000000001"}}"#;
        assert_eq!(message_serial(ok, chat).as_deref(), Ok("m000000000001"));
        assert!(message_serial(br#"{"message":{"message_serial":"a/b"}}"#, chat).is_err());
        assert!(message_serial(br#"{"message":{}}"#, chat).is_err());
        assert!(message_serial(b"nope", chat).is_err());
    }

    fn pusher_route() -> Route {
        Route::Pusher {
            creds: AppCreds {
                id: "42".into(),
                key: "k".into(),
                secret: "s".into(),
            },
            channel: "bench-x-ai3".into(),
        }
    }

    #[test]
    fn the_pusher_face_creates_through_events_and_appends_by_channel_name() {
        let route = pusher_route();
        let (path, body, created) = route.create();
        assert_eq!(created, 200);
        assert!(path.starts_with("/apps/42/events?auth_key=k&"), "{path}");
        assert!(path.contains("&auth_signature="), "{path}");
        let body: Value = serde_json::from_str(&body).expect("json");
        assert_eq!(body["channel"], "bench-x-ai3");
        assert_eq!(body["name"], pusher::EVENT);
        // `info` asks for the serials of the create.
        assert_eq!(body["info"], "");
        let answer = br#"{"channels":{"bench-x-ai3":{"message_serial":"m000000000007"}}}"#;
        let serial = message_serial(answer, &route.serial_pointer()).expect("serial");
        assert_eq!(
            route.append_path(&serial),
            "/apps/42/channels/bench-x-ai3/messages/m000000000007/append"
        );
    }

    #[test]
    fn each_pusher_append_is_signed_over_its_own_body() {
        let route = pusher_route();
        let path = "/apps/42/channels/bench-x-ai3/messages/m1/append";
        let (a, b) = (
            route.signed(path, r#"{"data":"0@1;"}"#),
            route.signed(path, r#"{"data":"1@2;"}"#),
        );
        let md5 = |p: &str| p.split("body_md5=").nth(1).map(|r| r[..32].to_string());
        assert_ne!(md5(&a), md5(&b));
        assert!(a.starts_with(path) && a.contains("auth_signature="), "{a}");
        let chat = Route::Chat {
            messages_path: "/api/channels/c/messages".into(),
        };
        assert_eq!(chat.signed("/x", "{}"), "/x");
    }
}
