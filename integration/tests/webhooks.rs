//! Webhooks end to end (SPEC §5 settings, Sockudo §4.5): a local HTTP receiver records what
//! the real server POSTs while real Pusher sockets subscribe, join presence channels, send
//! client events and leave. Checks the events and their order, the signature headers,
//! `event_types` filtering, the retry of a batch answered 500, and refused settings.

use std::time::Duration;

use hmac::{Hmac, Mac};
use reqwest::Method;
use serde_json::{json, Value};
use sha2::Sha256;
use switchboard_integration::harness::{assert_error, uniq, TestServer, FRAME_TIMEOUT};
use switchboard_integration::pusher_client::{patch_settings, PusherClient};
use switchboard_integration::webhook_receiver::{Hooked, Receiver};

fn names(events: &[Value]) -> Vec<&str> {
    events
        .iter()
        .map(|e| e["name"].as_str().unwrap_or("?"))
        .collect()
}

fn has(events: &[Value], name: &str, channel: &str) -> bool {
    events
        .iter()
        .any(|e| e["name"] == json!(name) && e["channel"] == json!(channel))
}

/// `X-Pusher-Key` is the app key, `X-Pusher-Signature` hex HMAC-SHA256(secret, body), the
/// body `{time_ms, events}`.
fn assert_signed(server: &TestServer, r: &Hooked) {
    assert_eq!(
        r.header("x-pusher-key"),
        Some(server.app.key.as_str()),
        "{r:?}"
    );
    let mut mac = Hmac::<Sha256>::new_from_slice(server.app.secret.as_bytes()).expect("hmac");
    mac.update(r.body.as_bytes());
    let want = hex::encode(mac.finalize().into_bytes());
    assert_eq!(r.header("x-pusher-signature"), Some(want.as_str()), "{r:?}");
    assert!(
        r.header("content-type")
            .is_some_and(|c| c.starts_with("application/json")),
        "{r:?}"
    );
    let body = r.json();
    let obj = body.as_object().expect("body is an object");
    let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["events", "time_ms"], "{body}");
    let now = chrono::Utc::now().timestamp_millis();
    let t = body["time_ms"].as_i64().expect("time_ms is an integer");
    assert!(t > now - 60_000 && t <= now, "time_ms {t} near {now}");
    assert!(!r.events().is_empty(), "no empty batch: {body}");
}

async fn connect(server: &TestServer) -> PusherClient {
    server.pusher("?protocol=7").await
}

/// Polls `GET /channels/{c}?info=subscription_count` until it reports `n`.
async fn wait_subscriptions(server: &TestServer, channel: &str, n: u64) {
    let deadline = tokio::time::Instant::now() + FRAME_TIMEOUT;
    loop {
        let (status, body) = server
            .signed_with(
                &server.app,
                Method::GET,
                &format!("/apps/{}/channels/{channel}", server.app.id),
                None,
                switchboard_integration::harness::SignOpts {
                    extra_query: vec![("info".into(), "subscription_count".into())],
                    ..Default::default()
                },
            )
            .await;
        assert_eq!(status, 200, "{body}");
        if body["subscription_count"] == json!(n) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{channel} never had {n} subscriptions: {body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ------------------------------------------------------------------------- tests

#[tokio::test]
async fn presence_lifecycle_and_client_events_arrive_in_order_and_signed() {
    let server = TestServer::start().await;
    let rx = Receiver::start(&[]).await;
    patch_settings(
        &server,
        &json!({"enable_client_messages": true, "webhooks": [{"url": rx.url("/hook")}]}),
    )
    .await;
    let ch = uniq("presence-room");

    // u1 arrives: occupied, then member_added.
    let mut a = connect(&server).await;
    a.join_presence(&server.app, &ch, "u1", json!({"name": "one"}))
        .await;
    rx.wait_events("/hook", |e| e.len() >= 2).await;
    // u1's second socket raises nothing; u2 is added.
    let mut a2 = connect(&server).await;
    a2.join_presence(&server.app, &ch, "u1", json!({"name": "one"}))
        .await;
    let mut b = connect(&server).await;
    b.join_presence(&server.app, &ch, "u2", json!({"name": "two"}))
        .await;
    a.expect("pusher_internal:member_added", Some(&ch)).await;

    // A client event from u2: relayed, and the webhook has its data as a string.
    b.client_event(&ch, "client-typing", json!({"typing": true}))
        .await;
    let relayed = a.expect("client-typing", Some(&ch)).await;
    assert_eq!(relayed["user_id"], json!("u2"), "{relayed}");

    // u2 disconnects: member_removed; u1's second socket leaves: nothing; u1's last: removed
    // and vacated.
    let b_socket = b.socket_id.clone();
    b.ws.close().await;
    a.expect("pusher_internal:member_removed", Some(&ch)).await;
    a2.send("pusher:unsubscribe", json!({"channel": ch})).await;
    wait_subscriptions(&server, &ch, 1).await;
    a.send("pusher:unsubscribe", json!({"channel": ch})).await;

    let events = rx
        .wait_events("/hook", |e| has(e, "channel_vacated", &ch))
        .await;
    // Let a wrongly duplicated event show up.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let events_after = rx.events("/hook");
    assert_eq!(events, events_after, "nothing after channel_vacated");
    assert_eq!(
        events,
        vec![
            json!({"name": "channel_occupied", "channel": ch}),
            json!({"name": "member_added", "channel": ch, "user_id": "u1"}),
            json!({"name": "member_added", "channel": ch, "user_id": "u2"}),
            json!({"name": "client_event", "channel": ch, "event": "client-typing",
                   "data": "{\"typing\":true}", "socket_id": b_socket, "user_id": "u2"}),
            json!({"name": "member_removed", "channel": ch, "user_id": "u2"}),
            json!({"name": "member_removed", "channel": ch, "user_id": "u1"}),
            json!({"name": "channel_vacated", "channel": ch}),
        ],
        "events: {:?}",
        names(&events)
    );
    let requests = rx.to("/hook");
    assert!(
        requests.len() >= 2,
        "batched over several flushes: {requests:?}"
    );
    for r in &requests {
        assert_signed(&server, r);
    }
    // Batches go out in order.
    let times: Vec<i64> = requests
        .iter()
        .map(|r| r.json()["time_ms"].as_i64().expect("time_ms"))
        .collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");
}

#[tokio::test]
async fn event_types_choose_what_each_webhook_gets() {
    let server = TestServer::start().await;
    let rx = Receiver::start(&[]).await;
    patch_settings(
        &server,
        &json!({"enable_client_messages": true, "webhooks": [
            {"url": rx.url("/all")},
            {"url": rx.url("/occupancy"), "event_types": ["channel_occupied", "channel_vacated"]},
            {"url": rx.url("/client"), "event_types": ["client_event"]},
            {"url": rx.url("/members"), "event_types": ["member_added", "member_removed"]},
        ]}),
    )
    .await;
    let public = uniq("pub");
    let private = uniq("private-chat");

    let mut a = connect(&server).await;
    let mut b = connect(&server).await;
    a.subscribe(&public, None, None).await;
    a.subscribe_private(&server.app, &private).await;
    b.subscribe_private(&server.app, &private).await;
    // Data given as a string stays that string; private channels carry no user_id.
    a.client_event(&private, "client-note", json!("hello"))
        .await;
    let relayed = b.expect("client-note", Some(&private)).await;
    assert_eq!(relayed["data"], json!("hello"), "{relayed}");
    let a_socket = a.socket_id.clone();
    b.ws.close().await;
    a.ws.close().await;

    let all = rx
        .wait_events("/all", |e| {
            has(e, "channel_vacated", &public) && has(e, "channel_vacated", &private)
        })
        .await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(rx.events("/all"), all, "nothing more on /all");
    assert_eq!(all.len(), 5, "{all:#?}");
    let occupancy = rx.events("/occupancy");
    let mut got: Vec<(String, String)> = occupancy
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap_or("?").to_owned(),
                e["channel"].as_str().unwrap_or("?").to_owned(),
            )
        })
        .collect();
    got.sort();
    let mut want = vec![
        ("channel_occupied".to_owned(), public.clone()),
        ("channel_occupied".to_owned(), private.clone()),
        ("channel_vacated".to_owned(), public.clone()),
        ("channel_vacated".to_owned(), private.clone()),
    ];
    want.sort();
    assert_eq!(got, want, "{occupancy:#?}");
    assert_eq!(
        rx.events("/client"),
        vec![
            json!({"name": "client_event", "channel": private, "event": "client-note",
                    "data": "hello", "socket_id": a_socket})
        ]
    );
    // A webhook none of whose events happened gets no request at all.
    assert!(rx.to("/members").is_empty(), "{:?}", rx.to("/members"));
    for r in rx.requests() {
        assert_signed(&server, &r);
    }
}

#[tokio::test]
async fn a_batch_answered_500_is_sent_again() {
    let server = TestServer::start().await;
    let rx = Receiver::start(&[500]).await;
    patch_settings(&server, &json!({"webhooks": [{"url": rx.url("/hook")}]})).await;
    let ch = uniq("retried");
    let mut a = connect(&server).await;
    a.subscribe(&ch, None, None).await;

    let deadline = tokio::time::Instant::now() + FRAME_TIMEOUT;
    while rx.to("/hook").len() < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no retry: {:?}",
            rx.requests()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let got = rx.to("/hook");
    assert_eq!(got[0].body, got[1].body, "the same batch again");
    assert_eq!(
        got[0].header("x-pusher-signature"),
        got[1].header("x-pusher-signature")
    );
    assert_eq!(
        got[1].events(),
        vec![json!({"name": "channel_occupied", "channel": ch})]
    );
    assert_signed(&server, &got[1]);
    // Answered 200 the second time: not sent a third time.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(rx.to("/hook").len(), 2, "{:?}", rx.requests());
}

#[tokio::test]
async fn invalid_webhook_settings_are_refused_and_change_nothing() {
    let server = TestServer::start().await;
    let path = format!("/apps/{}/settings", server.app.id);
    let good = json!([{"url": "http://127.0.0.1:9/hook", "event_types": ["member_added"]}]);
    let before = patch_settings(&server, &json!({ "webhooks": good })).await;
    assert_eq!(before["webhooks"], good, "{before}");

    for bad in [
        json!({"webhooks": [{"url": "ftp://x"}]}),
        json!({"webhooks": [{"url": "not a url"}]}),
        json!({"webhooks": [{"url": "http://127.0.0.1/h", "secret": "x"}]}),
        json!({"webhooks": [{"url": "http://127.0.0.1/h", "event_types": ["message_created"]}]}),
        json!({"webhooks": [{"event_types": ["member_added"]}]}),
        json!({"webhooks": {"url": "http://127.0.0.1/h"}}),
        json!({"webhook": [{"url": "http://127.0.0.1/h"}]}),
        json!({"webhooks": [{"url": "http://127.0.0.1/ok"}], "no_such_setting": 1}),
    ] {
        let r = server.signed(Method::PATCH, &path, Some(&bad)).await;
        assert_error(&r, 400, "invalid_input");
    }
    let (status, now) = server.signed(Method::GET, &path, None).await;
    assert_eq!(status, 200, "{now}");
    assert_eq!(now, before, "refused patches changed nothing");

    // Clearing is allowed.
    let after = patch_settings(&server, &json!({"webhooks": []})).await;
    assert_eq!(after["webhooks"], json!([]), "{after}");
}

#[tokio::test]
async fn terminated_connections_raise_member_removed_and_vacated() {
    let server = TestServer::start().await;
    let rx = Receiver::start(&[]).await;
    patch_settings(&server, &json!({"webhooks": [{"url": rx.url("/hook")}]})).await;
    let ch = uniq("presence-t");
    let mut s = connect(&server).await;
    let ok = s
        .signin(&server.app, &json!({"id": "u9"}).to_string())
        .await;
    assert_eq!(ok["event"], json!("pusher:signin_success"), "{ok}");
    s.join_presence(&server.app, &ch, "u9", json!({})).await;
    let path = format!("/apps/{}/users/u9/terminate_connections", server.app.id);
    assert_eq!(
        server.signed(Method::POST, &path, None).await,
        (200, json!({}))
    );
    let (_, code) = s.ws.read_until_close(FRAME_TIMEOUT).await;
    assert_eq!(code, Some(4009));
    let events = rx
        .wait_events("/hook", |e| has(e, "channel_vacated", &ch))
        .await;
    assert_eq!(
        events,
        vec![
            json!({"name": "channel_occupied", "channel": ch}),
            json!({"name": "member_added", "channel": ch, "user_id": "u9"}),
            json!({"name": "member_removed", "channel": ch, "user_id": "u9"}),
            json!({"name": "channel_vacated", "channel": ch}),
        ]
    );
}

/// An app with live traffic and no webhook: the dispatcher caches "no webhook" for its
/// settings TTL (5 s) and drops events meanwhile. Once PATCH settings notifies it
/// (`WebhookSink::settings_changed`), the very next event must be delivered.
#[tokio::test]
async fn a_webhook_added_to_a_busy_app_gets_the_next_events() {
    let server = TestServer::start().await;
    let rx = Receiver::start(&[]).await;
    let mut s = connect(&server).await;
    let (before, after) = (uniq("before"), uniq("after"));
    s.subscribe(&before, None, None).await;
    // Past one flush: the dispatcher has read the settings and found no webhook.
    tokio::time::sleep(Duration::from_millis(600)).await;
    patch_settings(&server, &json!({"webhooks": [{"url": rx.url("/hook")}]})).await;
    s.subscribe(&after, None, None).await;
    let events = rx.wait_events("/hook", |e| !e.is_empty()).await;
    assert_eq!(
        events,
        vec![json!({"name": "channel_occupied", "channel": after})]
    );
}
