//! Protocol V2 on the Pusher face (SPEC §4, §5): versioned message mutations as
//! `sockudo:message.*` in delta and full append modes, `sockudo:resume` after a disconnect,
//! and `sockudo:channel_history`.

use reqwest::Method;
use serde_json::{json, Value};
use switchboard_integration::harness::{uniq, TestServer};
use switchboard_integration::pusher_client::{
    error_code, fence, string_data, trigger, trigger_body, PusherClient,
};

/// Publishes `data` on `channel` as event `name`; answers the message serial.
async fn create(server: &TestServer, channel: &str, name: &str, data: &str) -> String {
    let (status, body) = trigger_body(
        server,
        &json!({"name": name, "channel": channel, "data": data, "info": "subscription_count"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body["channels"][channel]["message_serial"]
        .as_str()
        .unwrap_or_else(|| panic!("message_serial: {body}"))
        .to_string()
}

async fn mutate(server: &TestServer, channel: &str, serial: &str, action: &str, body: Value) {
    let path = format!(
        "/apps/{}/channels/{channel}/messages/{serial}/{action}",
        server.app.id
    );
    let (status, resp) = server.signed(Method::POST, &path, Some(&body)).await;
    assert_eq!(status, 200, "{action}: {resp}");
}

fn serial_of(frame: &Value) -> i64 {
    frame["serial"]
        .as_i64()
        .unwrap_or_else(|| panic!("serial: {frame}"))
}

// ------------------------------------------------------------------------- mutations

#[tokio::test]
async fn mutations_reach_v2_in_its_append_mode_and_v1_sees_creates_only() {
    let server = TestServer::start().await;
    let ch = uniq("ai-reply");
    let mut delta = server.pusher("?protocol=2").await;
    let mut full = server.pusher("?protocol=2&append_mode=full").await;
    let mut v1 = server.pusher("?protocol=7").await;
    for c in [&mut delta, &mut full, &mut v1] {
        c.subscribe(&ch, None, None).await;
    }

    let serial = create(&server, &ch, "reply", "Hel").await;
    let c1 = delta.expect("reply", Some(&ch)).await;
    assert_eq!(c1["data"], json!("Hel"), "{c1}");
    assert_eq!(c1["message_id"], json!(serial), "{c1}");
    assert_eq!(full.expect("reply", Some(&ch)).await["data"], json!("Hel"));
    assert_eq!(
        v1.expect("reply", Some(&ch)).await,
        json!({"event": "reply", "channel": ch, "data": "Hel"})
    );

    // A socket that joins mid-stream in full mode still gets whole texts.
    let mut late_full = server.pusher("?protocol=2&append_mode=full").await;
    late_full.subscribe(&ch, None, None).await;

    mutate(&server, &ch, &serial, "append", json!({"data": "lo"})).await;
    let a = delta.expect("sockudo:message.append", Some(&ch)).await;
    assert_eq!(a["data"], json!("lo"), "delta mode: the fragment: {a}");
    assert_eq!(a["message_id"], json!(serial), "{a}");
    assert_eq!(
        a["extras"]["headers"]["sockudo_action"],
        json!("message.append"),
        "{a}"
    );
    assert_eq!(serial_of(&a), serial_of(&c1) + 1, "{a}");
    assert_eq!(
        full.expect("sockudo:message.append", Some(&ch)).await["data"],
        json!("Hello")
    );
    assert_eq!(
        late_full.expect("sockudo:message.append", Some(&ch)).await["data"],
        json!("Hello")
    );

    mutate(&server, &ch, &serial, "append", json!({"data": ", world"})).await;
    assert_eq!(
        delta.expect("sockudo:message.append", Some(&ch)).await["data"],
        json!(", world")
    );
    for c in [&mut full, &mut late_full] {
        let a = c.expect("sockudo:message.append", Some(&ch)).await;
        assert_eq!(a["data"], json!("Hello, world"), "{a}");
    }

    mutate(&server, &ch, &serial, "update", json!({"data": "Hi"})).await;
    let u = delta.expect("sockudo:message.update", Some(&ch)).await;
    assert_eq!(u["data"], json!("Hi"), "{u}");
    assert_eq!(u["message_id"], json!(serial), "{u}");
    assert_eq!(serial_of(&u), serial_of(&c1) + 3, "{u}");
    assert_eq!(
        u["extras"]["headers"]["sockudo_action"],
        json!("message.update"),
        "{u}"
    );
    full.expect("sockudo:message.update", Some(&ch)).await;

    mutate(&server, &ch, &serial, "delete", json!({})).await;
    let d = delta.expect("sockudo:message.delete", Some(&ch)).await;
    assert_eq!(serial_of(&d), serial_of(&c1) + 4, "{d}");

    // V1 received nothing of the four mutations.
    fence(&server, &ch).await;
    let before = v1.frames_before(&ch, "fence").await;
    assert!(before.is_empty(), "V1 got mutations: {before:?}");
}

// ------------------------------------------------------------------------- resume

#[tokio::test]
async fn resume_replays_exactly_what_was_missed_then_succeeds() {
    let server = TestServer::start().await;
    let ch = uniq("feed");
    let mut first = server.pusher("?protocol=2").await;
    first.subscribe(&ch, None, None).await;
    for i in 0..2 {
        trigger(&server, &ch, "item", &format!("i{i}"), None).await;
    }
    let _ = first.expect("item", Some(&ch)).await;
    let seen = first.expect("item", Some(&ch)).await;
    let (n, stream_id) = (serial_of(&seen), seen["stream_id"].clone());
    assert_eq!(n, 2);
    first.ws.close().await;

    // Missed: three creates and an append to the second one.
    let mut missed = Vec::new();
    for i in 2..5 {
        missed.push(create(&server, &ch, "item", &format!("i{i}")).await);
    }
    mutate(&server, &ch, &missed[0], "append", json!({"data": "+"})).await;

    let mut again = server.pusher("?protocol=2").await;
    again.subscribe(&ch, None, None).await;
    again
        .send(
            "sockudo:resume",
            json!({"channel_positions": {ch.clone(): {"serial": n, "stream_id": stream_id}}}),
        )
        .await;
    let frames = again
        .until(|v| v["event"] == json!("sockudo:resume_success"))
        .await;
    let (replayed, done) = frames.split_at(frames.len() - 1);
    let serials: Vec<i64> = replayed.iter().map(serial_of).collect();
    assert_eq!(serials, vec![3, 4, 5, 6], "{replayed:?}");
    let events: Vec<&Value> = replayed.iter().map(|f| &f["event"]).collect();
    assert_eq!(
        events,
        vec![
            &json!("item"),
            &json!("item"),
            &json!("item"),
            &json!("sockudo:message.append")
        ]
    );
    assert_eq!(replayed[0]["data"], json!("i2"));
    assert_eq!(
        replayed[3]["data"],
        json!("+"),
        "delta mode replays the fragment"
    );
    assert!(
        replayed.iter().all(|f| f["channel"] == json!(ch)),
        "{replayed:?}"
    );
    let result = string_data(&done[0]);
    let recovered = result["recovered"]
        .as_array()
        .unwrap_or_else(|| panic!("recovered: {result}"));
    assert_eq!(recovered.len(), 1, "{result}");
    assert_eq!(recovered[0]["channel"], json!(ch), "{result}");
    assert_eq!(result["failed"], json!([]), "{result}");

    // Live delivery continues after the replay, without a repeat.
    trigger(&server, &ch, "item", "i5", None).await;
    let live = again.expect("item", Some(&ch)).await;
    assert_eq!(serial_of(&live), 7, "{live}");
}

#[tokio::test]
async fn resume_after_live_deliveries_sends_each_serial_once() {
    let server = TestServer::start().await;
    let ch = uniq("feed");
    for i in 0..3 {
        trigger(&server, &ch, "item", &format!("i{i}"), None).await;
    }
    let mut c = server.pusher("?protocol=2").await;
    let ok = c.subscribe(&ch, None, None).await;
    assert_eq!(ok["serial"], json!(3), "{ok}");
    // Serial 4 arrives live before the client asks to resume from 1.
    trigger(&server, &ch, "item", "live", None).await;
    assert_eq!(serial_of(&c.expect("item", Some(&ch)).await), 4);
    c.send(
        "sockudo:resume",
        json!({"channel_positions": {ch.clone(): {"serial": 1}}}),
    )
    .await;
    let frames = c
        .until(|v| v["event"] == json!("sockudo:resume_success"))
        .await;
    let (replayed, done) = frames.split_at(frames.len() - 1);
    let serials: Vec<i64> = replayed.iter().map(serial_of).collect();
    assert_eq!(serials, vec![2, 3], "{replayed:?}");
    let summary = string_data(&done[0]);
    assert_eq!(summary["recovered"][0]["replayed"], json!(2), "{summary}");
    trigger(&server, &ch, "item", "next", None).await;
    assert_eq!(serial_of(&c.expect("item", Some(&ch)).await), 5);
}

/// `n` appends of `"b"` to `serial`, four at a time.
async fn append_many(server: &TestServer, channel: &str, serial: &str, n: usize) {
    let one = || mutate(server, channel, serial, "append", json!({"data": "b"}));
    for _ in 0..n / 4 {
        futures_util::future::join_all((0..4).map(|_| one())).await;
    }
}

#[tokio::test]
async fn a_resume_of_several_pages_on_two_channels_arrives_whole_and_in_order() {
    let server = TestServer::start().await;
    let (stream, feed) = (uniq("ai-reply"), uniq("feed"));
    let mut first = server.pusher("?protocol=2&append_mode=full").await;
    first.subscribe(&stream, None, None).await;
    first.subscribe(&feed, None, None).await;
    let serial = create(&server, &stream, "reply", "a").await;
    let created = first.expect("reply", Some(&stream)).await;
    let stream_id = created["stream_id"].clone();
    first.ws.close().await;

    // Missed: 1,100 appends to the reply (three pages of 500) and 600 posts on the feed.
    let posts = async {
        for i in 0..600 {
            trigger(&server, &feed, "item", &format!("i{i}"), None).await;
        }
    };
    tokio::join!(append_many(&server, &stream, &serial, 1_100), posts);

    let mut again = server.pusher("?protocol=2&append_mode=full").await;
    again.subscribe(&stream, None, None).await;
    again.subscribe(&feed, None, None).await;
    again
        .send(
            "sockudo:resume",
            json!({"channel_positions": {
                stream.clone(): {"serial": 1, "stream_id": stream_id},
                feed.clone(): {"serial": 0},
            }}),
        )
        .await;
    let frames = again
        .until(|v| v["event"] == json!("sockudo:resume_success"))
        .await;
    let (replayed, done) = frames.split_at(frames.len() - 1);
    let of = |ch: &str| -> Vec<&Value> {
        replayed
            .iter()
            .filter(|f| f["channel"] == json!(ch))
            .collect()
    };
    let (appends, items) = (of(&stream), of(&feed));
    assert_eq!(
        appends.len() + items.len(),
        replayed.len(),
        "only the two channels"
    );

    let serials: Vec<i64> = appends.iter().map(|f| serial_of(f)).collect();
    assert_eq!(serials, (2..=1_101).collect::<Vec<_>>());
    for f in &appends {
        assert_eq!(f["event"], json!("sockudo:message.append"), "{f}");
        // Full mode: each append carries the whole text so far, across page ends too.
        let text = f["data"].as_str().unwrap_or_else(|| panic!("text: {f}"));
        assert_eq!(text.len() as i64, serial_of(f), "{f}");
    }
    assert_eq!(
        appends.last().map(|f| f["data"].clone()),
        Some(json!(format!("a{}", "b".repeat(1_100))))
    );
    let serials: Vec<i64> = items.iter().map(|f| serial_of(f)).collect();
    assert_eq!(serials, (1..=600).collect::<Vec<_>>());
    assert_eq!(items[599]["data"], json!("i599"));

    let summary = string_data(&done[0]);
    assert_eq!(summary["failed"], json!([]), "{summary}");
    let recovered = summary["recovered"]
        .as_array()
        .unwrap_or_else(|| panic!("recovered: {summary}"));
    let replayed_of = |ch: &str| {
        recovered
            .iter()
            .find(|r| r["channel"] == json!(ch))
            .map(|r| (r["replayed"].clone(), r["position"]["serial"].clone()))
    };
    assert_eq!(
        replayed_of(&stream),
        Some((json!(1_100), json!(1_101))),
        "{summary}"
    );
    assert_eq!(
        replayed_of(&feed),
        Some((json!(600), json!(600))),
        "{summary}"
    );

    // Live delivery follows, without a repeat.
    trigger(&server, &feed, "item", "next", None).await;
    assert_eq!(serial_of(&again.expect("item", Some(&feed)).await), 601);
}

#[tokio::test]
async fn resume_refuses_a_foreign_stream_missing_positions_and_v1() {
    let server = TestServer::start().await;
    let ch = uniq("feed");
    trigger(&server, &ch, "item", "x", None).await;
    let mut c = server.pusher("?protocol=2").await;
    c.subscribe(&ch, None, None).await;

    c.send(
        "sockudo:resume",
        json!({"channel_positions": {ch.clone(): {"serial": 0, "stream_id": "chn_not_this_one"}}}),
    )
    .await;
    let frames = c
        .until(|v| v["event"] == json!("sockudo:resume_success"))
        .await;
    let failed = frames
        .iter()
        .find(|f| f["event"] == json!("sockudo:resume_failed"))
        .unwrap_or_else(|| panic!("resume_failed: {frames:?}"));
    assert_eq!(failed["channel"], json!(ch), "{failed}");
    assert_eq!(
        string_data(failed)["code"],
        json!("stream_reset"),
        "{failed}"
    );
    assert!(
        frames.iter().all(|f| f["event"] != json!("item")),
        "nothing replayed from a foreign stream: {frames:?}"
    );
    let summary = string_data(frames.last().unwrap_or_else(|| panic!("summary")));
    assert_eq!(summary["recovered"], json!([]), "{summary}");

    // No positions: 4302, and the socket stays.
    c.send("sockudo:resume", json!({})).await;
    let err = c.expect_error().await;
    assert_eq!(err["event"], json!("sockudo:error"), "{err}");
    assert_eq!(error_code(&err), Some(4302), "{err}");
    c.assert_alive().await;

    // A channel this socket did not subscribe to is not resumed.
    let other = uniq("other");
    c.send(
        "sockudo:resume",
        json!({"channel_positions": {other.clone(): {"serial": 0}}}),
    )
    .await;
    let done = c.expect("sockudo:resume_success", None).await;
    let summary = string_data(&done);
    assert_eq!(summary["recovered"], json!([]), "{summary}");
    assert_eq!(summary["failed"][0]["channel"], json!(other), "{summary}");

    // V1 has no resume.
    let mut v1 = server.pusher("?protocol=7").await;
    v1.subscribe(&ch, None, None).await;
    v1.send(
        "pusher:resume",
        json!({"channel_positions": {ch.clone(): {"serial": 0}}}),
    )
    .await;
    let err = v1.expect_error().await;
    assert!(error_code(&err).is_some(), "{err}");
    v1.assert_alive().await;
}

#[tokio::test]
async fn channel_history_answers_the_channels_items() {
    let server = TestServer::start().await;
    let ch = uniq("log");
    for i in 0..3 {
        trigger(&server, &ch, "entry", &format!("e{i}"), None).await;
    }
    let mut c: PusherClient = server.pusher("?protocol=2").await;
    c.subscribe(&ch, None, None).await;
    c.send("sockudo:channel_history", json!({"channel": ch}))
        .await;
    let h = c.expect("sockudo:channel_history", Some(&ch)).await;
    let data_of = |h: &Value| -> Vec<Value> {
        h["data"]["items"]
            .as_array()
            .unwrap_or_else(|| panic!("items: {h}"))
            .iter()
            .map(|i| i["data"].clone())
            .collect()
    };
    // Newest first by default, as Sockudo.
    assert_eq!(
        data_of(&h),
        vec![json!("e2"), json!("e1"), json!("e0")],
        "{h}"
    );
    assert_eq!(h["data"]["has_more"], json!(false), "{h}");

    c.send(
        "sockudo:channel_history",
        json!({"channel": ch, "direction": "oldest_first", "limit": 2}),
    )
    .await;
    let h = c.expect("sockudo:channel_history", Some(&ch)).await;
    assert_eq!(data_of(&h), vec![json!("e0"), json!("e1")], "{h}");
    assert_eq!(h["data"]["has_more"], json!(true), "{h}");

    // Not subscribed and no history grant: refused, socket kept.
    let mut stranger = server.pusher("?protocol=2").await;
    stranger
        .send("sockudo:channel_history", json!({"channel": ch}))
        .await;
    let err = stranger.expect_error().await;
    assert!(error_code(&err).is_some(), "{err}");
    stranger.assert_alive().await;
}
