//! The Pusher face over a real socket (SPEC §4): connecting on V1 and V2, ping/pong, public
//! channels and `/events` deliveries in both shapes, the activity timeout, bad input and
//! the Origin check.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use switchboard_integration::harness::{uniq, Frame, TestServer, WsConnectError, FRAME_TIMEOUT};
use switchboard_integration::pusher_client::{
    channel_auth, error_code, fence, patch_settings, string_data, trigger, trigger_body,
    PusherClient,
};
use tokio_tungstenite::tungstenite::Message;

fn is_socket_id(s: &str) -> bool {
    let parts: Vec<&str> = s.split('.').collect();
    parts.len() == 2
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
}

// ------------------------------------------------------------------------- connection

#[tokio::test]
async fn v1_and_v2_connect_with_a_socket_id_and_answer_pings() {
    let server = TestServer::start().await;

    // V1: `pusher:` names, data a JSON string (checked by `established`).
    let mut v1 = server.pusher("?protocol=7&client=js&version=8.4.0").await;
    assert!(is_socket_id(&v1.socket_id), "{}", v1.socket_id);
    assert_eq!(v1.activity_timeout, 120);
    v1.send("pusher:ping", json!({})).await;
    let pong = v1.ws.next_json(FRAME_TIMEOUT).await;
    assert_eq!(pong["event"], json!("pusher:pong"), "{pong}");

    // V2: the same under `sockudo:`; `pusher:` is accepted inbound too.
    let mut v2 = server.pusher("?protocol=2").await;
    assert!(is_socket_id(&v2.socket_id), "{}", v2.socket_id);
    assert_ne!(v1.socket_id, v2.socket_id);
    v2.send("sockudo:ping", json!({})).await;
    let pong = v2.ws.next_json(FRAME_TIMEOUT).await;
    assert_eq!(pong["event"], json!("sockudo:pong"), "{pong}");
    v2.send("pusher:ping", json!({})).await;
    let pong = v2.ws.next_json(FRAME_TIMEOUT).await;
    assert_eq!(pong["event"], json!("sockudo:pong"), "{pong}");

    // Unknown events are ignored: the socket answers the next ping and nothing else.
    v1.send("pusher:no_such_thing", json!({"x": 1})).await;
    v1.send_raw(r#"{"event":"whatever","data":"{}"}"#).await;
    v1.send("pusher:ping", json!({})).await;
    let next = v1.ws.next_json(FRAME_TIMEOUT).await;
    assert_eq!(
        next["event"],
        json!("pusher:pong"),
        "nothing before the pong: {next}"
    );
    v1.subscribe("still-works", None, None).await;
}

#[tokio::test]
async fn an_unknown_key_gets_error_4001_then_close_4001() {
    let server = TestServer::start().await;
    for query in ["?protocol=7", "?protocol=2"] {
        let mut ws = server
            .pusher_connect("no-such-key", query, None)
            .await
            .unwrap_or_else(|e| panic!("the upgrade is accepted, the refusal follows: {e:?}"));
        let (frames, code) = ws.read_until_close(FRAME_TIMEOUT).await;
        assert_eq!(frames.len(), 1, "{frames:?}");
        assert!(
            frames[0]["event"]
                .as_str()
                .is_some_and(|e| e.ends_with(":error")),
            "{frames:?}"
        );
        assert_eq!(error_code(&frames[0]), Some(4001), "{frames:?}");
        assert_eq!(code, Some(4001));
    }
}

// ------------------------------------------------------------------------- public channels

#[tokio::test]
async fn v1_receives_triggered_events_in_plain_pusher_shape() {
    let server = TestServer::start().await;
    let mut a = server.pusher("?protocol=7").await;
    let mut b = server.pusher("?protocol=7").await;
    let news = uniq("news");
    let sports = uniq("sports");
    let ok = a.subscribe(&news, None, None).await;
    assert_eq!(ok["data"], json!("{}"), "{ok}");
    assert_eq!(ok["channel"], json!(news), "{ok}");
    b.subscribe(&news, None, None).await;
    b.subscribe(&sports, None, None).await;

    trigger(&server, &news, "story", "{\"id\":1}", None).await;
    let ev = a.expect("story", Some(&news)).await;
    // Exactly Pusher's three keys: no serial, no extras on V1.
    assert_eq!(
        ev,
        json!({"event": "story", "channel": news, "data": "{\"id\":1}"})
    );
    assert_eq!(b.expect("story", Some(&news)).await, ev);

    // `channels`: one trigger, two channels, each frame names its channel.
    let (status, body) = trigger_body(
        &server,
        &json!({"name": "multi", "channels": [news, sports], "data": "both"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let got = b
        .until(|v| v["event"] == json!("multi") && v["channel"] == json!(sports))
        .await;
    assert!(
        got.iter()
            .any(|v| v["event"] == json!("multi") && v["channel"] == json!(news)),
        "the news copy came first: {got:?}"
    );
    let ev = a.expect("multi", Some(&news)).await;
    assert_eq!(ev["data"], json!("both"));

    // Object data reaches V1 as a JSON string.
    let (status, body) = trigger_body(
        &server,
        &json!({"name": "obj", "channel": news, "data": {"k": [1, 2]}}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let ev = a.expect("obj", Some(&news)).await;
    assert_eq!(string_data(&ev), json!({"k": [1, 2]}), "{ev}");

    // More than 100 channels is refused and reaches nobody.
    let many: Vec<String> = (0..101).map(|i| format!("{news}-{i}")).collect();
    let (status, body) = trigger_body(
        &server,
        &json!({"name": "x", "channels": many, "data": "x"}),
    )
    .await;
    assert_eq!(status, 400, "{body}");

    // Unsubscribed: nothing more on news for `a`, while `b` still gets it.
    a.send("pusher:unsubscribe", json!({"channel": news})).await;
    a.subscribe(&sports, None, None).await; // the unsubscribe was handled before this
    trigger(&server, &news, "late", "1", None).await;
    b.expect("late", Some(&news)).await;
    fence(&server, &sports).await;
    let before = a.frames_before(&sports, "fence").await;
    assert!(
        before.iter().all(|v| v["channel"] != json!(news)),
        "nothing on news after unsubscribe: {before:?}"
    );
}

#[tokio::test]
async fn v2_frames_carry_serial_stream_id_message_id_and_action() {
    let server = TestServer::start().await;
    let mut v2 = server.pusher("?protocol=2").await;
    let mut v1 = server.pusher("?protocol=7").await;
    let ch = uniq("ticks");
    let ok = v2.subscribe(&ch, None, None).await;
    assert_eq!(
        ok["event"],
        json!("sockudo_internal:subscription_succeeded")
    );
    assert_eq!(ok["data"], json!("{}"), "{ok}");
    v1.subscribe(&ch, None, None).await;

    let mut serials = Vec::new();
    let mut stream = None;
    for i in 0..3 {
        trigger(&server, &ch, "tick", &format!("t{i}"), None).await;
        let ev = v2.expect("tick", Some(&ch)).await;
        assert_eq!(ev["data"], json!(format!("t{i}")), "{ev}");
        assert!(
            ev["message_id"].as_str().is_some_and(|s| !s.is_empty()),
            "{ev}"
        );
        assert_eq!(
            ev["extras"]["headers"]["sockudo_action"],
            json!("message.create"),
            "{ev}"
        );
        let sid = ev["stream_id"]
            .as_str()
            .unwrap_or_else(|| panic!("stream_id: {ev}"));
        assert_eq!(
            *stream.get_or_insert(sid.to_string()),
            sid,
            "one stream: {ev}"
        );
        serials.push(
            ev["serial"]
                .as_i64()
                .unwrap_or_else(|| panic!("serial: {ev}")),
        );
        let plain = v1.expect("tick", Some(&ch)).await;
        assert_eq!(
            plain,
            json!({"event": "tick", "channel": ch, "data": format!("t{i}")})
        );
    }
    assert_eq!(serials, vec![serials[0], serials[0] + 1, serials[0] + 2]);
    assert_eq!(serials[0], 1, "a new channel starts at serial 1");

    // A second subscriber learns the channel's position on subscribe.
    let mut late = server.pusher("?protocol=2").await;
    let ok = late.subscribe(&ch, None, None).await;
    assert_eq!(ok["serial"], json!(3), "{ok}");
    assert_eq!(ok["stream_id"].as_str(), stream.as_deref(), "{ok}");
}

#[tokio::test]
async fn socket_id_in_a_trigger_leaves_out_that_socket_only() {
    let server = TestServer::start().await;
    let ch = uniq("chat");
    let mut me = server.pusher("?protocol=7").await;
    let mut other = server.pusher("?protocol=7").await;
    let mut other_v2 = server.pusher("?protocol=2").await;
    me.subscribe(&ch, None, None).await;
    other.subscribe(&ch, None, None).await;
    other_v2.subscribe(&ch, None, None).await;

    trigger(&server, &ch, "said", "hello", Some(&me.socket_id)).await;
    assert_eq!(
        other.expect("said", Some(&ch)).await["data"],
        json!("hello")
    );
    assert_eq!(
        other_v2.expect("said", Some(&ch)).await["data"],
        json!("hello")
    );
    fence(&server, &ch).await;
    let before = me.frames_before(&ch, "fence").await;
    assert!(before.is_empty(), "the excluded socket got: {before:?}");
}

// ------------------------------------------------------------------------- liveness

#[tokio::test]
async fn a_silent_client_is_pinged_then_closed_4201_an_answering_one_stays() {
    let server = TestServer::builder()
        .env("SWITCHBOARD_PUSHER_ACTIVITY_TIMEOUT_SECONDS", "1")
        .env("SWITCHBOARD_PUSHER_PONG_TIMEOUT_SECONDS", "1")
        .start()
        .await;
    let mut silent = server.pusher("?protocol=7").await;
    assert_eq!(silent.activity_timeout, 1);
    let mut polite = server.pusher("?protocol=7").await;
    let mut polite_v2 = server.pusher("?protocol=2").await;

    // The polite sockets answer every ping, for longer than the timeouts add up to, while
    // the silent one is left to time out.
    async fn answer_pings(c: &mut PusherClient, pong: &str) {
        let mut pings = 0;
        while pings < 3 {
            match c.ws.next_frame(Duration::from_secs(4)).await {
                Frame::Json(v) if v["event"].as_str().is_some_and(|e| e.ends_with(":ping")) => {
                    pings += 1;
                    c.send(pong, json!({})).await;
                }
                other => panic!("expected a ping, got {other:?}"),
            }
        }
        c.assert_alive().await;
    }
    let started = Instant::now();
    let (_, _, (frames, code)) = tokio::join!(
        answer_pings(&mut polite, "pusher:pong"),
        answer_pings(&mut polite_v2, "sockudo:pong"),
        silent.ws.read_until_close(Duration::from_secs(8)),
    );
    assert_eq!(
        frames
            .iter()
            .map(|f| f["event"].clone())
            .collect::<Vec<_>>(),
        vec![json!("pusher:ping")],
        "one ping, then the close: {frames:?}"
    );
    assert_eq!(code, Some(4201));
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );
}

// ------------------------------------------------------------------------- bad input

#[tokio::test]
async fn bad_input_gets_4000_or_4009_and_other_sockets_keep_receiving() {
    let server = TestServer::start().await;
    let ch = uniq("calm");
    let mut bystander = server.pusher("?protocol=7").await;
    bystander.subscribe(&ch, None, None).await;
    let mut bad = server.pusher("?protocol=7").await;

    // Not JSON, JSON that is not a frame: error 4000, the socket stays.
    for text in [
        "not json",
        "[1,2]",
        r#"{"data":{"channel":"x"}}"#,
        r#"{"event":7}"#,
    ] {
        bad.send_raw(text).await;
        let err = bad.expect_error().await;
        assert_eq!(error_code(&err), Some(4000), "{text}: {err}");
        assert!(err["data"]["message"].is_string(), "{err}");
        bad.assert_alive().await;
    }

    // A binary frame: error 4000, the socket stays.
    bad.ws
        .send_message(Message::Binary(vec![1u8, 2, 3].into()))
        .await;
    let err = bad.expect_error().await;
    assert_eq!(error_code(&err), Some(4000), "{err}");
    bad.assert_alive().await;

    // Another socket's signature: 4009, still usable.
    let private = uniq("private-room");
    let stolen = channel_auth(&server.app, &bystander.socket_id, &private, None);
    let err = bad.subscribe_with(&private, Some(stolen), None).await;
    assert_eq!(err["event"], json!("pusher:error"), "{err}");
    assert_eq!(error_code(&err), Some(4009), "{err}");
    bad.subscribe(&ch, None, None).await;

    trigger(&server, &ch, "one", "1", None).await;
    bystander.expect("one", Some(&ch)).await;
    bad.expect("one", Some(&ch)).await;

    // Over 64 KiB: closed with 1009; the bystander is untouched.
    let huge = format!(
        r#"{{"event":"pusher:ping","data":"{}"}}"#,
        "x".repeat(64 * 1024 + 10)
    );
    bad.send_raw(&huge).await;
    let (_, code) = bad.ws.read_until_close(FRAME_TIMEOUT).await;
    assert_eq!(code, Some(1009));
    trigger(&server, &ch, "two", "2", None).await;
    assert_eq!(bystander.expect("two", Some(&ch)).await["data"], json!("2"));
    bystander.assert_alive().await;
}

// ------------------------------------------------------------------------- origin

#[tokio::test]
async fn any_origin_by_default_then_only_the_allowed_ones() {
    let server = TestServer::start().await;
    let key = server.app.key.clone();
    let ws = server
        .pusher_connect(&key, "?protocol=7", Some("https://evil.example"))
        .await
        .unwrap_or_else(|e| panic!("{e:?}"));
    let mut c = PusherClient::established(ws, false).await;
    c.assert_alive().await;

    let settings =
        patch_settings(&server, &json!({"allowed_origins": ["https://ok.example"]})).await;
    assert_eq!(
        settings["allowed_origins"],
        json!(["https://ok.example"]),
        "{settings}"
    );

    for (query, err_event) in [
        ("?protocol=7", "pusher:error"),
        ("?protocol=2", "sockudo:error"),
    ] {
        let mut evil = server
            .pusher_connect(&key, query, Some("https://evil.example"))
            .await
            .unwrap_or_else(|e| panic!("refused after the upgrade, not before: {e:?}"));
        let (frames, code) = evil.read_until_close(FRAME_TIMEOUT).await;
        assert_eq!(frames.len(), 1, "{frames:?}");
        assert_eq!(frames[0]["event"], json!(err_event), "{frames:?}");
        assert_eq!(error_code(&frames[0]), Some(4009), "{frames:?}");
        assert_eq!(code, Some(4009));
    }

    let ws = server
        .pusher_connect(&key, "?protocol=7", Some("https://ok.example"))
        .await
        .unwrap_or_else(|e| panic!("{e:?}"));
    let mut ok = PusherClient::established(ws, false).await;
    ok.assert_alive().await;
    // No Origin at all (a server-side client) is still admitted.
    server.pusher("?protocol=7").await.assert_alive().await;
}

#[tokio::test]
async fn a_bogus_append_mode_is_refused_before_the_upgrade() {
    let server = TestServer::start().await;
    let key = server.app.key.clone();
    match server
        .pusher_connect(&key, "?protocol=2&append_mode=bogus", None)
        .await
    {
        Err(WsConnectError::Http(400, body)) => {
            let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
            assert_eq!(v["code"], json!("invalid_input"), "{v}");
        }
        Err(e) => panic!("expected HTTP 400, got {e:?}"),
        Ok(_) => panic!("expected HTTP 400, the upgrade was accepted"),
    }
    // The valid modes connect.
    for q in [
        "?protocol=2&append_mode=full",
        "?protocol=2&append_mode=delta",
    ] {
        server.pusher(q).await.assert_alive().await;
    }
}
