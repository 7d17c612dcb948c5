//! The Pusher HTTP API over real sockets (SPEC §5): `/events` (multi-channel, limits,
//! `socket_id`, `info`, signatures), `/batch_events`, `/channels`, `/channels/{c}`,
//! `/channels/{c}/users` and `terminate_connections`. Every failure answers SPEC §8's
//! envelope and changes nothing: no socket receives anything and no channel appears.

use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};
use switchboard_integration::harness::{
    assert_error, parse_body, sign_query, uniq, SignOpts, TestServer, FRAME_TIMEOUT,
};
use switchboard_integration::pusher_client::{fence, trigger, trigger_body, PusherClient};

// ------------------------------------------------------------------------- helpers

fn events_path(server: &TestServer) -> String {
    format!("/apps/{}/events", server.app.id)
}

async fn batch(server: &TestServer, body: &Value) -> (u16, Value) {
    server
        .signed(
            Method::POST,
            &format!("/apps/{}/batch_events", server.app.id),
            Some(body),
        )
        .await
}

/// A signed GET of `/apps/{id}{rest}` with extra (signed) query parameters.
async fn get_with(server: &TestServer, rest: &str, query: &[(&str, &str)]) -> (u16, Value) {
    server
        .signed_with(
            &server.app,
            Method::GET,
            &format!("/apps/{}{rest}", server.app.id),
            None,
            SignOpts {
                extra_query: query
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
                ..SignOpts::default()
            },
        )
        .await
}

/// `GET /channels/{c}` with `info` (empty: none).
async fn channel_info(server: &TestServer, channel: &str, info: &str) -> (u16, Value) {
    let query: Vec<(&str, &str)> = if info.is_empty() {
        Vec::new()
    } else {
        vec![("info", info)]
    };
    get_with(server, &format!("/channels/{channel}"), &query).await
}

/// The sorted names of `GET /channels` (with `query`); asserts 200.
async fn channel_names(server: &TestServer, query: &[(&str, &str)]) -> Vec<String> {
    let (status, body) = get_with(server, "/channels", query).await;
    assert_eq!(status, 200, "list channels {query:?}: {body}");
    let map = body["channels"]
        .as_object()
        .unwrap_or_else(|| panic!("channels is an object: {body}"));
    let mut names: Vec<String> = map.keys().cloned().collect();
    names.sort();
    names
}

/// Polls `GET /channels/{c}` until `pred` holds for its answer (unsubscribes are not
/// acknowledged on the socket, so their effect is observed here).
async fn wait_channel(
    server: &TestServer,
    channel: &str,
    info: &str,
    pred: impl Fn(&Value) -> bool,
) {
    let deadline = tokio::time::Instant::now() + FRAME_TIMEOUT;
    loop {
        let (status, body) = channel_info(server, channel, info).await;
        assert_eq!(status, 200, "channel {channel}: {body}");
        if pred(&body) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "channel {channel} never reached the expected state; last: {body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Signed POST whose `body_md5` is the digest of `md5_of` while `body` is sent.
async fn post_with_md5_of(
    server: &TestServer,
    path: &str,
    body: &Value,
    md5_of: &[u8],
) -> (u16, Value) {
    let query = sign_query(
        &server.app,
        "POST",
        path,
        md5_of,
        &[],
        chrono::Utc::now().timestamp(),
        true,
        false,
    );
    let client = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("reqwest client");
    let resp = client
        .post(format!("{}{}?{}", server.base_url(), path, query))
        .header("content-type", "application/json")
        .body(serde_json::to_vec(body).expect("serialize"))
        .send()
        .await
        .expect("POST with a chosen body_md5");
    let status = resp.status().as_u16();
    let bytes = resp.bytes().await.expect("body");
    (
        status,
        parse_body(status, &bytes, "POST with a chosen body_md5"),
    )
}

/// A channel that was never subscribed nor published to has no history (404): proves that a
/// refused request created nothing.
async fn assert_never_created(server: &TestServer, channel: &str) {
    let (status, body) = get_with(server, &format!("/channels/{channel}/history"), &[]).await;
    assert_eq!(status, 404, "channel {channel} must not exist: {body}");
}

async fn signed_in(server: &TestServer, user: &str) -> PusherClient {
    let mut c = server.pusher("?protocol=7").await;
    let ok = c
        .signin(&server.app, &json!({"id": user}).to_string())
        .await;
    assert_eq!(
        ok["event"],
        json!("pusher:signin_success"),
        "signin {user}: {ok}"
    );
    c
}

// ------------------------------------------------------------------------- /events

#[tokio::test]
async fn events_to_two_channels_reach_both_and_socket_id_leaves_one_out() {
    let server = TestServer::start().await;
    let (c1, c2) = (uniq("news"), uniq("sports"));
    let mut a = server.pusher("?protocol=7").await;
    let mut b = server.pusher("?protocol=7").await;
    a.subscribe(&c1, None, None).await;
    b.subscribe(&c2, None, None).await;

    let (status, body) = trigger_body(
        &server,
        &json!({"name": "both", "channels": [c1, c2], "data": "x"}),
    )
    .await;
    assert_eq!((status, &body), (200, &json!({})), "{body}");
    assert_eq!(
        a.expect("both", Some(&c1)).await,
        json!({"event": "both", "channel": c1, "data": "x"})
    );
    assert_eq!(
        b.expect("both", Some(&c2)).await,
        json!({"event": "both", "channel": c2, "data": "x"})
    );

    // socket_id: the sender's own socket is left out, the other subscriber gets it.
    b.subscribe(&c1, None, None).await;
    trigger(&server, &c1, "echo", "mine", Some(&a.socket_id)).await;
    assert_eq!(b.expect("echo", Some(&c1)).await["data"], json!("mine"));
    fence(&server, &c1).await;
    let before = a.frames_before(&c1, "fence").await;
    assert!(before.is_empty(), "the excluded socket got: {before:?}");
}

#[tokio::test]
async fn refused_events_answer_the_envelope_and_deliver_nothing() {
    let server = TestServer::start().await;
    let ch = uniq("watched");
    let mut a = server.pusher("?protocol=7").await;
    a.subscribe(&ch, None, None).await;
    let path = events_path(&server);

    // 101 channels: limit_exceeded; none of them is created.
    let ghosts: Vec<String> = (0..100).map(|i| format!("{ch}-g{i}")).collect();
    let mut many = vec![ch.clone()];
    many.extend(ghosts.iter().cloned());
    let r = trigger_body(
        &server,
        &json!({"name": "e", "channels": many, "data": "x"}),
    )
    .await;
    assert_error(&r, 400, "limit_exceeded");
    assert_never_created(&server, &ghosts[0]).await;

    // Data over 64 KiB: 413 payload_too_large (exactly 64 KiB is fine, below).
    let big = "x".repeat(64 * 1024 + 1);
    let r = trigger_body(&server, &json!({"name": "e", "channel": ch, "data": big})).await;
    assert_error(&r, 413, "payload_too_large");

    // No name: invalid_input; nor an empty one, nor neither channel nor channels.
    let r = trigger_body(&server, &json!({"channel": ch, "data": "x"})).await;
    assert_error(&r, 400, "invalid_input");
    let r = trigger_body(&server, &json!({"name": "", "channel": ch, "data": "x"})).await;
    assert_error(&r, 400, "invalid_input");
    let r = trigger_body(&server, &json!({"name": "e", "data": "x"})).await;
    assert_error(&r, 400, "invalid_input");

    // A bad signature: 401 auth_failed.
    let body = json!({"name": "e", "channel": ch, "data": "x"});
    let r = server
        .signed_with(
            &server.app,
            Method::POST,
            &path,
            Some(&body),
            SignOpts {
                tamper_signature: true,
                ..SignOpts::default()
            },
        )
        .await;
    assert_error(&r, 401, "auth_failed");

    // body_md5 of another body: 401, however well the rest is signed.
    let r = post_with_md5_of(&server, &path, &body, b"{\"name\":\"other\"}").await;
    assert_error(&r, 401, "auth_failed");
    // No body_md5 at all on a POST: 401 too.
    let r = server
        .signed_with(
            &server.app,
            Method::POST,
            &path,
            Some(&body),
            SignOpts {
                include_body_md5: Some(false),
                ..SignOpts::default()
            },
        )
        .await;
    assert_error(&r, 401, "auth_failed");

    // A socket_id that cannot be one: invalid_input (Pusher: "Invalid socket id").
    for bad in ["abc", "1.", ".2", "1.2.3", "1.2 ", ""] {
        let r = trigger_body(
            &server,
            &json!({"name": "e", "channel": ch, "data": "x", "socket_id": bad}),
        )
        .await;
        assert_error(&r, 400, "invalid_input");
    }

    // An HTTP body over 1 MiB: 413 in the envelope, not a framework page.
    let huge = "z".repeat(1024 * 1024 + 16);
    let r = trigger_body(&server, &json!({"name": "e", "channel": ch, "data": huge})).await;
    assert_error(&r, 413, "payload_too_large");

    // Nothing of the above reached the subscriber: the fence is the first thing it sees.
    fence(&server, &ch).await;
    let before = a.frames_before(&ch, "fence").await;
    assert!(before.is_empty(), "refused requests delivered: {before:?}");

    // 100 channels are allowed.
    let hundred: Vec<String> = (0..100).map(|i| format!("{ch}-h{i}")).collect();
    let mut hundred_and_ch = vec![ch.clone()];
    hundred_and_ch.extend(hundred.iter().take(99).cloned());
    let (status, resp) = trigger_body(
        &server,
        &json!({"name": "wide", "channels": hundred_and_ch, "data": "w"}),
    )
    .await;
    assert_eq!((status, &resp), (200, &json!({})), "{resp}");
    assert_eq!(a.expect("wide", Some(&ch)).await["data"], json!("w"));

    // The data limit itself is allowed.
    let exact = "y".repeat(64 * 1024);
    let (status, resp) = trigger_body(
        &server,
        &json!({"name": "big", "channel": ch, "data": exact}),
    )
    .await;
    assert_eq!(status, 200, "{resp}");
    let ev = a.expect("big", Some(&ch)).await;
    assert_eq!(ev["data"].as_str().map(str::len), Some(64 * 1024));
}

#[tokio::test]
async fn events_info_answers_serials_and_the_counts_asked() {
    let server = TestServer::start().await;
    let public = uniq("room");
    let presence = uniq("presence-room");
    let mut a = server.pusher("?protocol=7").await;
    let mut b = server.pusher("?protocol=7").await;
    let mut c = server.pusher("?protocol=7").await;
    a.subscribe(&public, None, None).await;
    b.subscribe(&public, None, None).await;
    // Presence: 3 sockets, 2 users (u1 twice).
    a.join_presence(&server.app, &presence, "u1", json!({}))
        .await;
    b.join_presence(&server.app, &presence, "u1", json!({}))
        .await;
    c.join_presence(&server.app, &presence, "u2", json!({}))
        .await;

    let (status, body) = trigger_body(
        &server,
        &json!({"name": "e", "channels": [public, presence], "data": "d",
                "info": "subscription_count,user_count"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let p = &body["channels"][&public];
    assert_eq!(p["subscription_count"], json!(2), "{body}");
    assert!(
        p.get("user_count").is_none(),
        "no user_count off presence: {body}"
    );
    let q = &body["channels"][&presence];
    assert_eq!(q["subscription_count"], json!(3), "{body}");
    assert_eq!(q["user_count"], json!(2), "{body}");
    for ch in [&public, &presence] {
        let ack = &body["channels"][ch];
        for k in ["message_serial", "history_serial", "delivery_serial"] {
            assert!(!ack[k].is_null(), "{ch} answers {k}: {body}");
        }
    }
    assert_eq!(
        body["channels"].as_object().map(|m| m.len()),
        Some(2),
        "{body}"
    );

    // Only what is asked.
    let (status, body) = trigger_body(
        &server,
        &json!({"name": "e", "channel": presence, "data": "d", "info": "user_count"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let q = &body["channels"][&presence];
    assert_eq!(q["user_count"], json!(2), "{body}");
    assert!(q.get("subscription_count").is_none(), "{body}");

    // Everyone got both deliveries.
    a.expect("e", Some(&public)).await;
    b.expect("e", Some(&public)).await;
    c.expect("e", Some(&presence)).await;
}

// ------------------------------------------------------------------------- /batch_events

#[tokio::test]
async fn batch_events_deliver_in_order_or_not_at_all() {
    let server = TestServer::start().await;
    let chans: Vec<String> = (0..3).map(|i| uniq(&format!("b{i}"))).collect();
    let mut a = server.pusher("?protocol=7").await;
    for c in &chans {
        a.subscribe(c, None, None).await;
    }

    let events: Vec<Value> = chans
        .iter()
        .enumerate()
        .map(|(i, c)| json!({"name": format!("ev{i}"), "channel": c, "data": format!("d{i}")}))
        .collect();
    let (status, body) = batch(&server, &json!({ "batch": events })).await;
    assert_eq!((status, &body), (200, &json!({})), "{body}");
    let frames = a
        .until(|v| v["event"] == json!("ev2") && v["channel"] == json!(chans[2]))
        .await;
    let got: Vec<(Value, Value, Value)> = frames
        .iter()
        .filter(|v| v["event"].as_str().is_some_and(|e| e.starts_with("ev")))
        .map(|v| (v["event"].clone(), v["channel"].clone(), v["data"].clone()))
        .collect();
    let want: Vec<(Value, Value, Value)> = (0..3)
        .map(|i| {
            (
                json!(format!("ev{i}")),
                json!(chans[i]),
                json!(format!("d{i}")),
            )
        })
        .collect();
    assert_eq!(got, want, "batch order: {frames:?}");

    // 11 events: limit_exceeded.
    let eleven: Vec<Value> = (0..11)
        .map(|i| json!({"name": "x", "channel": chans[i % 3], "data": "x"}))
        .collect();
    let r = batch(&server, &json!({ "batch": eleven })).await;
    assert_error(&r, 400, "limit_exceeded");

    // One bad event (an invalid channel name, last): 400 and none of the batch is published.
    let fresh = uniq("never");
    let r = batch(
        &server,
        &json!({"batch": [
            {"name": "bad0", "channel": chans[0], "data": "x"},
            {"name": "bad1", "channel": fresh, "data": "x"},
            {"name": "bad2", "channel": "no spaces allowed", "data": "x"},
        ]}),
    )
    .await;
    assert_error(&r, 400, "invalid_input");
    // A missing name inside a batch is refused too.
    let r = batch(
        &server,
        &json!({"batch": [{"name": "ok", "channel": chans[0], "data": "x"}, {"channel": chans[0], "data": "x"}]}),
    )
    .await;
    assert_error(&r, 400, "invalid_input");
    assert_never_created(&server, &fresh).await;
    fence(&server, &chans[0]).await;
    let before = a.frames_before(&chans[0], "fence").await;
    assert!(before.is_empty(), "a refused batch delivered: {before:?}");

    // With info: one answer per event, in order.
    let (status, body) = batch(
        &server,
        &json!({"batch": [
            {"name": "i0", "channel": chans[0], "data": "x", "info": "subscription_count"},
            {"name": "i1", "channel": chans[1], "data": "x", "info": "subscription_count"},
        ]}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let answers = body["batch"]
        .as_array()
        .unwrap_or_else(|| panic!("batch is an array: {body}"));
    assert_eq!(answers.len(), 2, "{body}");
    for ans in answers {
        assert_eq!(ans["subscription_count"], json!(1), "{body}");
        assert!(!ans["message_serial"].is_null(), "{body}");
    }
    a.expect("i1", Some(&chans[1])).await;
}

// ------------------------------------------------------------------------- /channels

#[tokio::test]
async fn channels_lists_the_occupied_ones_with_prefix_and_counts() {
    let server = TestServer::start().await;
    let tag = uniq("t");
    let (pub1, pub2, other) = (
        format!("pub-{tag}-1"),
        format!("pub-{tag}-2"),
        format!("other-{tag}"),
    );
    let presence = format!("presence-{tag}");
    let mut a = server.pusher("?protocol=7").await;
    let mut b = server.pusher("?protocol=7").await;
    a.subscribe(&pub1, None, None).await;
    b.subscribe(&pub1, None, None).await;
    a.subscribe(&pub2, None, None).await;
    b.subscribe(&other, None, None).await;
    a.join_presence(&server.app, &presence, "u1", json!({}))
        .await;
    b.join_presence(&server.app, &presence, "u2", json!({}))
        .await;
    // A channel with messages but no subscriber is not occupied.
    let ghost = format!("pub-{tag}-ghost");
    trigger(&server, &ghost, "e", "x", None).await;

    let mut all = vec![pub1.clone(), pub2.clone(), other.clone(), presence.clone()];
    all.sort();
    assert_eq!(channel_names(&server, &[]).await, all);
    assert_eq!(
        channel_names(&server, &[("filter_by_prefix", "pub-")]).await,
        vec![pub1.clone(), pub2.clone()]
    );

    // A GET may carry body_md5 of the empty body (the Python SDK does); another one is 401.
    let (status, body) = server
        .signed_with(
            &server.app,
            Method::GET,
            &format!("/apps/{}/channels", server.app.id),
            None,
            SignOpts {
                include_body_md5: Some(true),
                extra_query: vec![("filter_by_prefix".into(), "other-".into())],
                ..SignOpts::default()
            },
        )
        .await;
    assert_eq!(
        (status, &body),
        (200, &json!({"channels": {other.clone(): {}}}))
    );
    let r = get_with(
        &server,
        "/channels",
        &[("body_md5", "0123456789abcdef0123456789abcdef")],
    )
    .await;
    assert_error(&r, 401, "auth_failed");

    // Without info, each channel is an empty object (Pusher's shape).
    let (status, body) = get_with(&server, "/channels", &[("filter_by_prefix", "other-")]).await;
    assert_eq!(
        (status, &body),
        (200, &json!({"channels": {other.clone(): {}}}))
    );

    let (status, body) = get_with(
        &server,
        "/channels",
        &[("filter_by_prefix", "pub-"), ("info", "subscription_count")],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        json!({"channels": {
            pub1.clone(): {"subscription_count": 2},
            pub2.clone(): {"subscription_count": 1},
        }})
    );

    // user_count needs a presence- prefix.
    let r = get_with(&server, "/channels", &[("info", "user_count")]).await;
    assert_error(&r, 400, "invalid_input");
    let r = get_with(
        &server,
        "/channels",
        &[("filter_by_prefix", "pub-"), ("info", "user_count")],
    )
    .await;
    assert_error(&r, 400, "invalid_input");
    let (status, body) = get_with(
        &server,
        "/channels",
        &[("filter_by_prefix", "presence-"), ("info", "user_count")],
    )
    .await;
    assert_eq!(
        (status, &body),
        (
            200,
            &json!({"channels": {presence.clone(): {"user_count": 2}}})
        )
    );

    // The last subscriber leaving takes the channel off the list.
    a.send("pusher:unsubscribe", json!({"channel": pub2})).await;
    wait_channel(&server, &pub2, "", |v| v["occupied"] == json!(false)).await;
    assert_eq!(
        channel_names(&server, &[("filter_by_prefix", "pub-")]).await,
        vec![pub1.clone()]
    );
    // A disconnect does the same for every channel of the socket.
    b.ws.close().await;
    wait_channel(&server, &other, "", |v| v["occupied"] == json!(false)).await;
    let mut left = vec![pub1.clone(), presence.clone()];
    left.sort();
    assert_eq!(channel_names(&server, &[]).await, left);
    let (status, body) = get_with(
        &server,
        "/channels",
        &[
            ("filter_by_prefix", "presence-"),
            ("info", "user_count,subscription_count"),
        ],
    )
    .await;
    assert_eq!(
        (status, &body),
        (
            200,
            &json!({"channels": {presence.clone(): {"user_count": 1, "subscription_count": 1}}})
        )
    );
}

#[tokio::test]
async fn channel_info_and_presence_users() {
    let server = TestServer::start().await;
    let public = uniq("lobby");
    let presence = uniq("presence-lobby");
    let mut a = server.pusher("?protocol=7").await;
    let mut b = server.pusher("?protocol=7").await;
    let mut c = server.pusher("?protocol=7").await;

    let r = channel_info(&server, &public, "").await;
    assert_eq!(r, (200, json!({"occupied": false})));
    let r = channel_info(&server, &public, "subscription_count").await;
    assert_eq!(
        r,
        (200, json!({"occupied": false, "subscription_count": 0}))
    );

    a.subscribe(&public, None, None).await;
    b.subscribe(&public, None, None).await;
    assert_eq!(
        channel_info(&server, &public, "").await,
        (200, json!({"occupied": true}))
    );
    assert_eq!(
        channel_info(&server, &public, "subscription_count").await,
        (200, json!({"occupied": true, "subscription_count": 2}))
    );
    let r = channel_info(&server, &public, "user_count").await;
    assert_error(&r, 400, "invalid_input");

    // 3 sockets, 2 users.
    a.join_presence(&server.app, &presence, "u1", json!({"n": 1}))
        .await;
    b.join_presence(&server.app, &presence, "u1", json!({"n": 1}))
        .await;
    c.join_presence(&server.app, &presence, "u2", json!({"n": 2}))
        .await;
    assert_eq!(
        channel_info(&server, &presence, "user_count,subscription_count").await,
        (
            200,
            json!({"occupied": true, "user_count": 2, "subscription_count": 3})
        )
    );
    let (status, body) = get_with(&server, &format!("/channels/{presence}/users"), &[]).await;
    assert_eq!(status, 200, "{body}");
    let mut users: Vec<Value> = body["users"]
        .as_array()
        .unwrap_or_else(|| panic!("users is an array: {body}"))
        .clone();
    users.sort_by_key(|u| u["id"].as_str().map(str::to_owned));
    assert_eq!(
        users,
        vec![json!({"id": "u1"}), json!({"id": "u2"})],
        "{body}"
    );

    // Users of a channel that is not presence: 400; of an empty presence channel: none.
    let r = get_with(&server, &format!("/channels/{public}/users"), &[]).await;
    assert_error(&r, 400, "invalid_input");
    let empty = uniq("presence-empty");
    let r = get_with(&server, &format!("/channels/{empty}/users"), &[]).await;
    assert_eq!(r, (200, json!({"users": []})));

    // One of u1's two sockets leaving keeps u1; the other leaving removes it.
    a.send("pusher:unsubscribe", json!({"channel": presence}))
        .await;
    wait_channel(&server, &presence, "subscription_count", |v| {
        v["subscription_count"] == json!(2)
    })
    .await;
    assert_eq!(
        channel_info(&server, &presence, "user_count").await,
        (200, json!({"occupied": true, "user_count": 2}))
    );
    b.send("pusher:unsubscribe", json!({"channel": presence}))
        .await;
    wait_channel(&server, &presence, "user_count", |v| {
        v["user_count"] == json!(1)
    })
    .await;
    let r = get_with(&server, &format!("/channels/{presence}/users"), &[]).await;
    assert_eq!(r, (200, json!({"users": [{"id": "u2"}]})));
}

// ------------------------------------------------------------------------- terminate

#[tokio::test]
async fn terminate_connections_closes_that_users_sockets_only() {
    let server = TestServer::start().await;
    let presence = uniq("presence-ops");
    let mut u1a = signed_in(&server, "u1").await;
    let mut u1b = signed_in(&server, "u1").await;
    let mut u2 = signed_in(&server, "u2").await;
    let mut anon = server.pusher("?protocol=7").await;
    u1a.join_presence(&server.app, &presence, "u1", json!({}))
        .await;
    u2.join_presence(&server.app, &presence, "u2", json!({}))
        .await;
    u1a.expect("pusher_internal:member_added", Some(&presence))
        .await;

    let path = format!("/apps/{}/users/u1/terminate_connections", server.app.id);
    let r = server.signed(Method::POST, &path, None).await;
    assert_eq!(r, (200, json!({})));

    for s in [&mut u1a, &mut u1b] {
        let (_, code) = s.ws.read_until_close(FRAME_TIMEOUT).await;
        assert_eq!(code, Some(4009), "u1's socket {} closes 4009", s.socket_id);
    }
    // u2 sees u1 leave the presence channel and stays connected, as does an anonymous socket.
    let gone = u2
        .expect("pusher_internal:member_removed", Some(&presence))
        .await;
    assert!(gone["data"].to_string().contains("u1"), "{gone}");
    u2.assert_alive().await;
    anon.assert_alive().await;
    let r = get_with(&server, &format!("/channels/{presence}/users"), &[]).await;
    assert_eq!(r, (200, json!({"users": [{"id": "u2"}]})));

    // A user without sockets: still `{}`; a bad signature: 401.
    let path = format!("/apps/{}/users/nobody/terminate_connections", server.app.id);
    assert_eq!(
        server.signed(Method::POST, &path, None).await,
        (200, json!({}))
    );
    let r = server
        .signed_with(
            &server.app,
            Method::POST,
            &format!("/apps/{}/users/u2/terminate_connections", server.app.id),
            None,
            SignOpts {
                tamper_signature: true,
                ..SignOpts::default()
            },
        )
        .await;
    assert_error(&r, 401, "auth_failed");
    u2.assert_alive().await;
}
