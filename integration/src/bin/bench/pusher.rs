//! The Pusher face of the generator (`--face pusher` of `idle` and `fanout`): sockets on
//! `/app/{key}` instead of `/api/realtime/ws`, so the same scenarios also measure any other
//! Pusher-compatible server (`--url` + `--app id:key:secret`).
//!
//! - Connect: `ws://host/app/{key}?protocol=2` (`--protocol 2`, Sockudo's V2: `sockudo:`
//!   events, `serial` on every message) or `?protocol=7` (`--protocol 1`, plain Pusher), no
//!   token; the server's first frame is `pusher:connection_established` (V2
//!   `sockudo:connection_established`) whose `data` is a JSON string with the `socket_id`.
//! - Subscribe: `{"event":"pusher:subscribe","data":{"channel":NAME}}` on a public channel,
//!   then wait for `pusher_internal:subscription_succeeded` (V2 `sockudo_internal:`; V2 adds
//!   the channel's `serial` at subscribe time when the channel exists).
//! - Keep-alive: the server sends `pusher:ping` (`sockudo:ping`) after its activity timeout;
//!   the socket answers `{"event":"pusher:pong","data":{}}` (or the server closes it, 4201).
//! - Publish: `POST /apps/{id}/events` signed as the Pusher HTTP API is (auth_key,
//!   auth_timestamp, auth_version=1.0, body_md5, auth_signature), body
//!   `{"name":"bench","channel":NAME,"data":"<n>:<send ns>"}`.
//! - Deliveries: V1 `{"event":"bench","channel":NAME,"data":"<n>:<ns>"}`; V2 adds `serial`
//!   (the channel's seq), `stream_id` and `message_id`.

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use clap::{Args, ValueEnum};
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

use crate::api::{self, snippet};
use crate::idle;
use crate::rawws::{self, RawWs, TextSocket};
use crate::server::AppCreds;
use crate::subscriber::Ws;

/// The event name every bench publish carries.
pub const EVENT: &str = "bench";
/// What a socket answers a `pusher:ping` (`sockudo:ping`) with.
pub const PONG: &str = r#"{"event":"pusher:pong","data":{}}"#;
/// The close code of a Pusher server whose outbound queue for the socket overflowed.
pub const OVERFLOW_CLOSE: u16 = 4100;

/// Which face of the server the sockets use.
#[derive(ValueEnum, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Face {
    /// `/api/realtime/ws`: one bearer token per entity, `message.created` frames.
    #[default]
    Chat,
    /// `/app/{key}`: the Pusher protocol, no token, public channels.
    Pusher,
}

impl Face {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Chat => "chat",
            Self::Pusher => "pusher",
        }
    }
}

/// `--face` and `--protocol`, shared by `idle`, `fanout` and `chat`.
#[derive(Args, Clone, Debug)]
pub struct FaceArgs {
    /// Which WebSocket to load: `chat` (/api/realtime/ws) or `pusher` (/app/{key}, the
    /// Pusher protocol; works against any Pusher-compatible server with --url and --app).
    #[arg(long, value_enum, default_value_t = Face::Chat)]
    pub face: Face,
    /// Pusher protocol version of `--face pusher`: 2 (Sockudo V2, `?protocol=2`, messages
    /// carry `serial`, checked for order and gaps) or 1 (plain Pusher, `?protocol=7`, no
    /// serial: loss and duplicates only).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..=2))]
    pub protocol: u8,
}

impl FaceArgs {
    /// The protocol version, for the Pusher face only.
    pub fn protocol(&self) -> Option<u8> {
        (self.face == Face::Pusher).then_some(self.protocol)
    }

    /// A short description for the report tables.
    pub fn label(&self) -> String {
        match self.face {
            Face::Chat => "chat (/api/realtime/ws)".into(),
            Face::Pusher => format!(
                "pusher V{} (/app/{{key}}?protocol={})",
                self.protocol,
                query_protocol(self.protocol)
            ),
        }
    }
}

/// The `protocol` query value of a version: 2 for V2, Pusher's 7 for V1.
pub fn query_protocol(version: u8) -> u8 {
    if version == 2 {
        2
    } else {
        7
    }
}

/// `ws://host:port/app/{key}?protocol=…` of a server at `base` (`http://host:port`).
pub fn app_url(base: &str, key: &str, version: u8) -> String {
    format!(
        "{}/app/{key}?protocol={}",
        base.trim_end_matches('/').replacen("http://", "ws://", 1),
        query_protocol(version)
    )
}

/// A protocol event's name without its `pusher:` / `sockudo:` (or `*_internal:`) prefix;
/// `None` for other events (a server may use either prefix).
pub fn protocol_event(event: &str) -> Option<&str> {
    [
        "pusher:",
        "sockudo:",
        "pusher_internal:",
        "sockudo_internal:",
    ]
    .iter()
    .find_map(|p| event.strip_prefix(p))
}

/// A string field that may also be an object, a number or null (Pusher's `data`): the
/// string (borrowed when it has no escapes), else `None`.
#[derive(Default, Debug)]
pub struct LooseStr<'a>(pub Option<Cow<'a, str>>);

impl<'de: 'a, 'a> Deserialize<'de> for LooseStr<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = LooseStr<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(LooseStr(Some(Cow::Borrowed(v))))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(LooseStr(Some(Cow::Owned(v.to_owned()))))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(LooseStr(Some(Cow::Owned(v))))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Self::Value, A::Error> {
                while m.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(LooseStr(None))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut s: A) -> Result<Self::Value, A::Error> {
                while s.next_element::<IgnoredAny>()?.is_some() {}
                Ok(LooseStr(None))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
                Ok(LooseStr(None))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
                Ok(LooseStr(None))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
                Ok(LooseStr(None))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
                Ok(LooseStr(None))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(LooseStr(None))
            }
        }
        d.deserialize_any(V(PhantomData))
    }
}

/// The fields of a Pusher frame the bench reads.
#[derive(Deserialize, Debug)]
pub struct PusherFrame<'a> {
    #[serde(borrow)]
    pub event: Cow<'a, str>,
    #[serde(default, borrow)]
    pub channel: Option<Cow<'a, str>>,
    /// V2: the channel's seq of a message (absent on V1 and on client events).
    #[serde(default)]
    pub serial: Option<i64>,
    #[serde(default, borrow)]
    pub data: LooseStr<'a>,
}

impl PusherFrame<'_> {
    pub fn is_ping(&self) -> bool {
        protocol_event(&self.event) == Some("ping")
    }
}

/// Whether a text frame is the server's `pusher:ping` / `sockudo:ping`.
pub fn is_ping(text: &str) -> bool {
    serde_json::from_str::<PusherFrame>(text).is_ok_and(|f| f.is_ping())
}

/// What the handshake learned.
#[derive(Debug, Default, Clone)]
pub struct Hello {
    /// V2: the channel's serial when the subscription succeeded (absent for a channel no
    /// message was published to yet, and on V1).
    pub serial: Option<i64>,
}

/// The next text frame (pings of the Pusher protocol are answered on the way).
async fn next_text<S: TextSocket>(ws: &mut S, waiting_for: &str) -> Result<Value, String> {
    loop {
        let t = ws.next_text(waiting_for).await?;
        let v: Value = serde_json::from_str(&t).map_err(|_| {
            format!(
                "not a JSON frame while waiting for {waiting_for}: {}",
                snippet(t.as_bytes())
            )
        })?;
        let event = v.get("event").and_then(Value::as_str).unwrap_or("");
        match protocol_event(event) {
            Some("ping") => ws.send_text(PONG).await?,
            Some("error") => {
                return Err(format!(
                    "{event} while waiting for {waiting_for}: {}",
                    v.get("data").map(Value::to_string).unwrap_or_default()
                ))
            }
            _ => return Ok(v),
        }
    }
}

/// `data` as an object, whether sent as one or as a JSON string (Pusher sends strings).
fn data_object(v: &Value) -> Value {
    match v.get("data") {
        Some(Value::String(s)) => serde_json::from_str(s).unwrap_or(Value::Null),
        Some(other) => other.clone(),
        None => Value::Null,
    }
}

/// TCP connect (from `route`'s source address when given), upgrade to `url` (see
/// [`app_url`]), `connection_established`, and when `channel` is given the subscription,
/// all within `within`.
pub async fn connect(
    url: &str,
    route: Option<(SocketAddr, Ipv4Addr)>,
    within: Duration,
    channel: Option<&str>,
) -> Result<(Ws, Hello), String> {
    let attempt = async {
        let req = url
            .into_client_request()
            .map_err(|e| format!("ws request: {e}"))?;
        let mut ws = idle::open_ws(req, route).await?;
        let hello = greet(&mut ws, channel).await?;
        Ok((ws, hello))
    };
    tokio::time::timeout(within, attempt)
        .await
        .map_err(|_| timed_out(within))?
}

/// [`connect`] through the lean client (`rawws.rs`), for a reader outside tokio.
pub async fn connect_raw(
    url: &str,
    route: Option<(SocketAddr, Ipv4Addr)>,
    within: Duration,
    channel: Option<&str>,
) -> Result<(RawWs, Hello), String> {
    let attempt = async {
        let mut ws = rawws::upgrade(url, &[], route).await?;
        let hello = greet(&mut ws, channel).await?;
        Ok((ws, hello))
    };
    tokio::time::timeout(within, attempt)
        .await
        .map_err(|_| timed_out(within))?
}

fn timed_out(within: Duration) -> String {
    format!("no connection_established / subscription_succeeded within {within:?}")
}

/// `connection_established`, then, when `channel` is given, the subscription.
async fn greet<S: TextSocket>(ws: &mut S, channel: Option<&str>) -> Result<Hello, String> {
    let first = next_text(ws, "connection_established").await?;
    let event = first.get("event").and_then(Value::as_str).unwrap_or("");
    if protocol_event(event) != Some("connection_established") {
        return Err(format!(
            "first frame is not connection_established: {}",
            snippet(first.to_string().as_bytes())
        ));
    }
    // Every Pusher server names the socket; one without an id is not speaking the protocol.
    data_object(&first)
        .get("socket_id")
        .and_then(Value::as_str)
        .ok_or_else(|| {
            format!(
                "connection_established without a socket_id: {}",
                snippet(first.to_string().as_bytes())
            )
        })?;
    let mut hello = Hello { serial: None };
    let Some(channel) = channel else {
        return Ok(hello);
    };
    let subscribe = json!({"event": "pusher:subscribe", "data": {"channel": channel}});
    ws.send_text(&subscribe.to_string()).await?;
    loop {
        let v = next_text(ws, "subscription_succeeded").await?;
        let event = v.get("event").and_then(Value::as_str).unwrap_or("");
        if protocol_event(event) == Some("subscription_succeeded")
            && v.get("channel").and_then(Value::as_str) == Some(channel)
        {
            hello.serial = v.get("serial").and_then(Value::as_i64);
            return Ok(hello);
        }
    }
}

/// A signed `POST /apps/{id}/events` publishing `data` as event `name` on `channel`: the URL
/// (with its signed query) and the body. Sign again for every attempt (the timestamp).
pub fn trigger(
    base: &str,
    creds: &AppCreds,
    channel: &str,
    name: &str,
    data: &str,
) -> (String, String) {
    let path = format!("/apps/{}/events", creds.id);
    let body = json!({"name": name, "channel": channel, "data": data}).to_string();
    let query = api::signed_query(creds, "POST", &path, body.as_bytes());
    (
        format!("{}{path}?{query}", base.trim_end_matches('/')),
        body,
    )
}

/// One signed publish, its status checked (200): creates the channel on servers that keep
/// a log, so later subscribers learn its serial, and fails fast on bad credentials.
pub async fn publish_once(
    client: &reqwest::Client,
    base: &str,
    creds: &AppCreds,
    channel: &str,
    name: &str,
    data: &str,
) -> Result<(), String> {
    let (url, body) = trigger(base, creds, channel, name, data);
    let r = client
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body)
        .send()
        .await
        .map_err(|e| format!("POST /apps/{}/events: {e}", creds.id))?;
    let status = r.status().as_u16();
    let bytes = r.bytes().await.unwrap_or_default();
    if status != 200 {
        return Err(format!(
            "POST /apps/{}/events: expected 200, got {status}: {}",
            creds.id,
            snippet(&bytes)
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds() -> AppCreds {
        AppCreds {
            id: "123".into(),
            key: "k".into(),
            secret: "s".into(),
        }
    }

    #[test]
    fn urls_name_the_protocol() {
        assert_eq!(
            app_url("http://127.0.0.1:6001/", "abc", 2),
            "ws://127.0.0.1:6001/app/abc?protocol=2"
        );
        assert_eq!(
            app_url("http://127.0.0.1:6001", "abc", 1),
            "ws://127.0.0.1:6001/app/abc?protocol=7"
        );
    }

    #[test]
    fn either_prefix_names_a_protocol_event() {
        assert_eq!(protocol_event("pusher:ping"), Some("ping"));
        assert_eq!(protocol_event("sockudo:ping"), Some("ping"));
        assert_eq!(
            protocol_event("sockudo_internal:subscription_succeeded"),
            Some("subscription_succeeded")
        );
        assert_eq!(protocol_event("bench"), None);
        assert!(is_ping(r#"{"data":"{}","event":"sockudo:ping"}"#));
        assert!(is_ping(r#"{"event":"pusher:ping"}"#));
        assert!(!is_ping(r#"{"event":"bench","channel":"c","data":"1:2"}"#));
        assert!(!is_ping("not json"));
    }

    #[test]
    fn frames_parse_in_both_shapes() {
        let v1: PusherFrame =
            serde_json::from_str(r#"{"event":"bench","channel":"c","data":"3:44"}"#).expect("v1");
        assert_eq!((v1.event.as_ref(), v1.serial), ("bench", None));
        assert_eq!(v1.data.0.as_deref(), Some("3:44"));
        let v2: PusherFrame = serde_json::from_str(
            r#"{"channel":"c","data":"3:44","event":"bench","extras":{"headers":{"a":1}},
                "message_id":"m000000000007","serial":7,"stream_id":"chn_1"}"#,
        )
        .expect("v2");
        assert_eq!((v2.channel.as_deref(), v2.serial), (Some("c"), Some(7)));
        assert_eq!(v2.data.0.as_deref(), Some("3:44"));
        // Objects, escaped strings and nulls as data.
        let e: PusherFrame =
            serde_json::from_str(r#"{"event":"pusher:error","data":{"code":4001,"message":"x"}}"#)
                .expect("error");
        assert!(e.data.0.is_none());
        let s: PusherFrame = serde_json::from_str(
            r#"{"event":"pusher:connection_established","data":"{\"socket_id\":\"1.2\"}"}"#,
        )
        .expect("established");
        assert_eq!(s.data.0.as_deref(), Some(r#"{"socket_id":"1.2"}"#));
        let n: PusherFrame =
            serde_json::from_str(r#"{"event":"x","data":null,"channel":null}"#).expect("null");
        assert!(n.data.0.is_none() && n.channel.is_none());
    }

    #[test]
    fn triggers_are_signed_over_the_body() {
        let (url, body) = trigger("http://127.0.0.1:1/", &creds(), "ch", "bench", "1:2");
        let v: Value = serde_json::from_str(&body).expect("json");
        assert_eq!(v, json!({"name": "bench", "channel": "ch", "data": "1:2"}));
        assert!(url.starts_with("http://127.0.0.1:1/apps/123/events?auth_key=k&auth_timestamp="));
        let md5 = hex::encode(<md5::Md5 as md5::Digest>::digest(body.as_bytes()));
        assert!(url.contains(&format!("&auth_version=1.0&body_md5={md5}&auth_signature=")));
    }
}
