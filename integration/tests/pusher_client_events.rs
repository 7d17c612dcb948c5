//! `client-*` events on the Pusher face (SPEC §4, §5): off by default, relayed to the other
//! subscribers of a private or presence channel when the workspace enables them, never to
//! the sender, and rate limited per socket.

use serde_json::{json, Value};
use switchboard_integration::harness::{uniq, TestServer};
use switchboard_integration::pusher_client::{error_code, fence, patch_settings, PusherClient};

fn assert_client_event_refused(frame: &Value) {
    assert!(
        frame["event"]
            .as_str()
            .is_some_and(|e| e.ends_with(":error")),
        "expected an error: {frame}"
    );
    assert_eq!(error_code(frame), Some(4301), "{frame}");
}

/// Two sockets on a private channel.
async fn pair(server: &TestServer, channel: &str) -> (PusherClient, PusherClient) {
    let mut a = server.pusher("?protocol=7").await;
    let mut b = server.pusher("?protocol=2").await;
    a.subscribe_private(&server.app, channel).await;
    b.subscribe_private(&server.app, channel).await;
    (a, b)
}

#[tokio::test]
async fn client_events_are_refused_while_the_workspace_disables_them() {
    let server = TestServer::start().await;
    let ch = uniq("private-chat");
    let (mut a, mut b) = pair(&server, &ch).await;
    a.client_event(&ch, "client-typing", json!({"t": 1})).await;
    assert_client_event_refused(&a.expect_error().await);
    a.assert_alive().await;
    fence(&server, &ch).await;
    let before = b.frames_before(&ch, "fence").await;
    assert!(before.is_empty(), "nothing relayed: {before:?}");

    // Enabling takes effect for connections made afterwards.
    let s = patch_settings(&server, &json!({"enable_client_messages": true})).await;
    assert_eq!(s["enable_client_messages"], json!(true), "{s}");
    let (mut c, mut d) = pair(&server, &ch).await;
    c.client_event(&ch, "client-typing", json!({"t": 2})).await;
    let ev = d.expect("client-typing", Some(&ch)).await;
    assert_eq!(ev["data"], json!({"t": 2}), "{ev}");
}

#[tokio::test]
async fn enabled_client_events_reach_the_others_but_not_the_sender() {
    let server = TestServer::start().await;
    patch_settings(&server, &json!({"enable_client_messages": true})).await;
    let ch = uniq("private-chat");
    let (mut a, mut b) = pair(&server, &ch).await;
    let mut c = server.pusher("?protocol=7").await;
    c.subscribe_private(&server.app, &ch).await;

    a.client_event(&ch, "client-typing", json!("{\"who\":\"a\"}"))
        .await;
    for r in [&mut b, &mut c] {
        let ev = r.expect("client-typing", Some(&ch)).await;
        // Data as sent; never stored: no serial, no extras, no user on a private channel.
        assert_eq!(
            ev,
            json!({"event": "client-typing", "channel": ch, "data": "{\"who\":\"a\"}"}),
            "{ev}"
        );
    }
    fence(&server, &ch).await;
    for r in [&mut a, &mut b, &mut c] {
        let before = r.frames_before(&ch, "fence").await;
        assert!(
            before.is_empty(),
            "the sender got its own event: {before:?}"
        );
    }

    // Not a `client-` event on the channel of another kind: public and encrypted refuse.
    let public = uniq("open");
    a.subscribe(&public, None, None).await;
    a.client_event(&public, "client-x", json!({})).await;
    assert_client_event_refused(&a.expect_error().await);
    let enc = uniq("private-encrypted-box");
    a.subscribe_private(&server.app, &enc).await;
    a.client_event(&enc, "client-x", json!({})).await;
    assert_client_event_refused(&a.expect_error().await);

    // Not subscribed.
    let elsewhere = uniq("private-elsewhere");
    b.client_event(&elsewhere, "client-x", json!({})).await;
    assert_client_event_refused(&b.expect_error().await);
    // No channel at all.
    a.send_raw(r#"{"event":"client-x","data":{}}"#).await;
    assert_client_event_refused(&a.expect_error().await);

    // Every socket is still usable, and nothing of the refused reached the others.
    a.client_event(&ch, "client-last", json!({})).await;
    let frames = c.until(|v| v["event"] == json!("client-last")).await;
    assert_eq!(frames.len(), 1, "{frames:?}");
    b.expect("client-last", Some(&ch)).await;
}

#[tokio::test]
async fn presence_client_events_carry_the_senders_user_id() {
    let server = TestServer::start().await;
    patch_settings(&server, &json!({"enable_client_messages": true})).await;
    let room = uniq("presence-room");
    let mut a = server.pusher("?protocol=7").await;
    let mut b = server.pusher("?protocol=2").await;
    a.join_presence(&server.app, &room, "u-a", json!({})).await;
    b.join_presence(&server.app, &room, "u-b", json!({})).await;
    a.client_event(&room, "client-wave", json!({"hi": true}))
        .await;
    let ev = b.expect("client-wave", Some(&room)).await;
    assert_eq!(ev["user_id"], json!("u-a"), "{ev}");
    assert_eq!(ev["data"], json!({"hi": true}), "{ev}");
    b.client_event(&room, "client-wave", json!({})).await;
    let ev = a.expect("client-wave", Some(&room)).await;
    assert_eq!(ev["user_id"], json!("u-b"), "{ev}");
}

#[tokio::test]
async fn the_client_event_rate_limit_refuses_beyond_the_burst() {
    let server = TestServer::start().await;
    patch_settings(
        &server,
        &json!({"enable_client_messages": true,
                "rate_limits": {"client_events": {"per_second": 1, "burst": 2}}}),
    )
    .await;
    let ch = uniq("private-fast");
    let (mut a, mut b) = pair(&server, &ch).await;
    for i in 0..3 {
        a.client_event(&ch, "client-n", json!({"i": i})).await;
    }
    // The first two pass, the third is refused.
    let err = a.expect_error().await;
    assert_client_event_refused(&err);
    for i in 0..2 {
        let ev = b.expect("client-n", Some(&ch)).await;
        assert_eq!(ev["data"], json!({"i": i}), "{ev}");
    }
    fence(&server, &ch).await;
    let before = b.frames_before(&ch, "fence").await;
    assert!(before.is_empty(), "the third was relayed: {before:?}");
    // The limit is per socket: b may still send.
    b.client_event(&ch, "client-n", json!({"from": "b"})).await;
    assert_eq!(
        a.expect("client-n", Some(&ch)).await["data"],
        json!({"from": "b"})
    );
}
