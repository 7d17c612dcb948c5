//! A small Pusher-protocol client for the black-box tests: frames are JSON, signatures are
//! computed as Pusher's documentation defines them, and nothing links against the server.

use std::time::Duration;

use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

use crate::harness::{
    AppCreds, Frame, TestServer, WsClient, WsConnectError, WsOpts, FRAME_TIMEOUT,
};

/// `key:hex(HMAC-SHA256(secret, "socket_id:channel[:channel_data]"))`.
pub fn channel_auth(
    app: &AppCreds,
    socket_id: &str,
    channel: &str,
    channel_data: Option<&str>,
) -> String {
    let message = match channel_data {
        Some(d) => format!("{socket_id}:{channel}:{d}"),
        None => format!("{socket_id}:{channel}"),
    };
    format!("{}:{}", app.key, hmac_hex(&app.secret, &message))
}

/// `key:hex(HMAC-SHA256(secret, "socket_id::user::user_data"))`.
pub fn signin_auth(app: &AppCreds, socket_id: &str, user_data: &str) -> String {
    format!(
        "{}:{}",
        app.key,
        hmac_hex(&app.secret, &format!("{socket_id}::user::{user_data}"))
    )
}

fn hmac_hex(secret: &str, message: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("hmac key");
    mac.update(message.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

pub struct PusherClient {
    pub ws: WsClient,
    pub socket_id: String,
    pub activity_timeout: u64,
    /// `pusher` (V1) or `sockudo` (V2): the prefix of protocol events.
    pub prefix: &'static str,
}

impl TestServer {
    /// Opens `/app/{key}` with `query` (e.g. `?protocol=7`) without reading anything.
    pub async fn pusher_connect(
        &self,
        key: &str,
        query: &str,
        origin: Option<&str>,
    ) -> Result<WsClient, WsConnectError> {
        self.ws_connect(WsOpts {
            path: Some(format!("/app/{key}{query}")),
            origin: origin.map(str::to_string),
            ..WsOpts::default()
        })
        .await
    }

    /// Connects to the bootstrap app and reads `connection_established`.
    pub async fn pusher(&self, query: &str) -> PusherClient {
        let ws = self
            .pusher_connect(&self.app.key, query, None)
            .await
            .unwrap_or_else(|e| panic!("pusher connect refused: {e:?}"));
        PusherClient::established(ws, query.contains("protocol=2")).await
    }
}

impl PusherClient {
    /// Reads the first frame, which must be `connection_established`.
    pub async fn established(mut ws: WsClient, v2: bool) -> Self {
        let prefix = if v2 { "sockudo" } else { "pusher" };
        let v = ws.next_json(FRAME_TIMEOUT).await;
        assert_eq!(
            v["event"],
            json!(format!("{prefix}:connection_established")),
            "{v}"
        );
        let data: Value =
            serde_json::from_str(v["data"].as_str().expect("data is a JSON string")).expect("json");
        PusherClient {
            ws,
            socket_id: data["socket_id"].as_str().expect("socket_id").to_string(),
            activity_timeout: data["activity_timeout"].as_u64().expect("activity_timeout"),
            prefix,
        }
    }

    pub async fn send(&mut self, event: &str, data: Value) {
        self.ws
            .send_text(&json!({"event": event, "data": data}).to_string())
            .await;
    }

    /// Next frame that is not a server ping.
    pub async fn next(&mut self, timeout: Duration) -> Frame {
        loop {
            let f = self.ws.next_frame(timeout).await;
            if let Frame::Json(v) = &f {
                if v["event"] == json!(format!("{}:ping", self.prefix)) {
                    continue;
                }
            }
            return f;
        }
    }

    /// Reads until a frame with this event name (and channel, if given) arrives.
    pub async fn expect(&mut self, event: &str, channel: Option<&str>) -> Value {
        let event = event.to_string();
        let channel = channel.map(str::to_string);
        let frames = self
            .ws
            .collect_until(FRAME_TIMEOUT, |v| {
                v["event"] == json!(event)
                    && channel.as_ref().is_none_or(|c| v["channel"] == json!(c))
            })
            .await;
        frames.last().cloned().expect("a frame")
    }

    /// Subscribes and returns the answer: `subscription_succeeded` or `error`.
    pub async fn subscribe_with(
        &mut self,
        channel: &str,
        auth: Option<String>,
        channel_data: Option<String>,
    ) -> Value {
        let mut data = json!({"channel": channel});
        if let Some(a) = auth {
            data["auth"] = json!(a);
        }
        if let Some(d) = channel_data {
            data["channel_data"] = json!(d);
        }
        let event = format!("{}:subscribe", self.prefix);
        self.send(&event, data).await;
        let ok = format!("{}_internal:subscription_succeeded", self.prefix);
        let err = format!("{}:error", self.prefix);
        let frames = self
            .ws
            .collect_until(FRAME_TIMEOUT, |v| {
                (v["event"] == json!(ok) && v["channel"] == json!(channel))
                    || v["event"] == json!(err)
            })
            .await;
        frames.last().cloned().expect("a frame")
    }

    /// Subscribes and asserts success.
    pub async fn subscribe(
        &mut self,
        channel: &str,
        auth: Option<String>,
        channel_data: Option<String>,
    ) -> Value {
        let v = self.subscribe_with(channel, auth, channel_data).await;
        assert_eq!(
            v["event"],
            json!(format!("{}_internal:subscription_succeeded", self.prefix)),
            "subscribe {channel}: {v}"
        );
        v
    }
}

impl PusherClient {
    /// Sends a raw text frame (bad-input tests).
    pub async fn send_raw(&mut self, text: &str) {
        self.ws.send_text(text).await;
    }

    /// `pusher:ping` answered by `pusher:pong` (or the V2 spelling): the socket is usable.
    pub async fn assert_alive(&mut self) {
        let ping = format!("{}:ping", self.prefix);
        self.send(&ping, json!({})).await;
        let pong = format!("{}:pong", self.prefix);
        let frames = self
            .ws
            .collect_until(FRAME_TIMEOUT, |v| v["event"] == json!(pong))
            .await;
        assert!(!frames.is_empty());
    }

    /// Reads until `pusher:error` (V2: `sockudo:error`) and returns its `data.code`.
    pub async fn expect_error(&mut self) -> Value {
        let err = format!("{}:error", self.prefix);
        self.expect(&err, None).await
    }

    /// Reads frames until one matches `pred`; returns every frame read (the match last).
    pub async fn until<F: FnMut(&Value) -> bool>(&mut self, pred: F) -> Vec<Value> {
        self.ws.collect_until(FRAME_TIMEOUT, pred).await
    }

    /// Signs in with `user_data` (a JSON string) and a correct signature; answers the frame.
    pub async fn signin(&mut self, app: &AppCreds, user_data: &str) -> Value {
        let auth = signin_auth(app, &self.socket_id, user_data);
        self.signin_with(user_data, &auth).await
    }

    /// Signs in with an explicit `auth`; answers `signin_success` or `error`.
    pub async fn signin_with(&mut self, user_data: &str, auth: &str) -> Value {
        let event = format!("{}:signin", self.prefix);
        self.send(&event, json!({"user_data": user_data, "auth": auth}))
            .await;
        let ok = format!("{}:signin_success", self.prefix);
        let err = format!("{}:error", self.prefix);
        let frames = self
            .ws
            .collect_until(FRAME_TIMEOUT, |v| {
                v["event"] == json!(ok) || v["event"] == json!(err)
            })
            .await;
        frames.last().cloned().expect("a frame")
    }

    /// Subscribes to a private channel with this socket's correct signature.
    pub async fn subscribe_private(&mut self, app: &AppCreds, channel: &str) -> Value {
        let auth = channel_auth(app, &self.socket_id, channel, None);
        self.subscribe(channel, Some(auth), None).await
    }

    /// Joins a presence channel as `user_id` with signed channel data; answers the
    /// presence object decoded from the success frame's string data.
    pub async fn join_presence(
        &mut self,
        app: &AppCreds,
        channel: &str,
        user_id: &str,
        user_info: Value,
    ) -> Value {
        let data = json!({"user_id": user_id, "user_info": user_info}).to_string();
        let auth = channel_auth(app, &self.socket_id, channel, Some(&data));
        let ok = self.subscribe(channel, Some(auth), Some(data)).await;
        let s = ok["data"]
            .as_str()
            .unwrap_or_else(|| panic!("string data: {ok}"));
        serde_json::from_str(s).unwrap_or_else(|e| panic!("presence data is JSON ({e}): {ok}"))
    }

    /// Sends a `client-*` event on `channel`.
    pub async fn client_event(&mut self, channel: &str, event: &str, data: Value) {
        self.ws
            .send_text(&json!({"event": event, "channel": channel, "data": data}).to_string())
            .await;
    }
}

/// Asserts a refusal as Sockudo sends it: `pusher:error` (or `sockudo:error`) whose `data`
/// is an object `{code, message}`, without a channel.
pub fn assert_refused(frame: &Value, code: u64) {
    assert!(
        frame["event"]
            .as_str()
            .is_some_and(|e| e.ends_with(":error")),
        "expected an error frame: {frame}"
    );
    assert!(
        frame["data"].is_object(),
        "error data is an object: {frame}"
    );
    assert_eq!(error_code(frame), Some(code), "{frame}");
    assert!(frame["data"]["message"].is_string(), "{frame}");
    assert!(
        frame.get("channel").is_none(),
        "no channel on the error: {frame}"
    );
}

/// The `data.code` of a `pusher:error` frame (data is an object there).
pub fn error_code(frame: &Value) -> Option<u64> {
    frame["data"]["code"].as_u64()
}

/// Decodes a frame's string `data` as JSON.
pub fn string_data(frame: &Value) -> Value {
    let s = frame["data"]
        .as_str()
        .unwrap_or_else(|| panic!("data is a JSON string: {frame}"));
    serde_json::from_str(s).unwrap_or_else(|e| panic!("data string is JSON ({e}): {frame}"))
}

/// `POST /apps/{id}/events` with any body; answers (status, body).
pub async fn trigger_body(server: &TestServer, body: &Value) -> (u16, Value) {
    server
        .signed(
            reqwest::Method::POST,
            &format!("/apps/{}/events", server.app.id),
            Some(body),
        )
        .await
}

/// Triggers `name` on `channel` with string `data` (optionally excluding a socket); asserts 200.
pub async fn trigger(
    server: &TestServer,
    channel: &str,
    name: &str,
    data: &str,
    socket_id: Option<&str>,
) {
    let mut body = json!({"name": name, "channel": channel, "data": data});
    if let Some(s) = socket_id {
        body["socket_id"] = json!(s);
    }
    let (status, resp) = trigger_body(server, &body).await;
    assert_eq!(status, 200, "trigger {name} on {channel}: {resp}");
}

/// `PATCH /apps/{id}/settings` with `patch`; asserts 200 and answers the settings.
pub async fn patch_settings(server: &TestServer, patch: &Value) -> Value {
    let (status, body) = server
        .signed(
            reqwest::Method::PATCH,
            &format!("/apps/{}/settings", server.app.id),
            Some(patch),
        )
        .await;
    assert_eq!(status, 200, "patch settings {patch}: {body}");
    body
}

impl PusherClient {
    /// Reads up to the event `marker` on `channel` and answers the frames before it: after a
    /// marker triggered later than something this socket must not receive, its absence here
    /// proves it was not sent (events of one channel arrive in order).
    pub async fn frames_before(&mut self, channel: &str, marker: &str) -> Vec<Value> {
        let mut frames = self
            .until(|v| v["event"] == json!(marker) && v["channel"] == json!(channel))
            .await;
        frames.pop();
        frames
    }
}

/// Triggers a `fence` event on `channel`: see [`PusherClient::frames_before`].
pub async fn fence(server: &TestServer, channel: &str) {
    trigger(server, channel, "fence", "{}", None).await;
}
