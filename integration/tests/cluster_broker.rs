//! Cluster mode, first slice (issue 6): two real nodes share one SQLite file and fan out
//! through a real Redis (`--broker redis://…`). A message committed on node A reaches sockets
//! on node B; when Redis loses notifications, B repairs the gap from the database, so its
//! sockets still see every event once, in cursor order.

use std::collections::HashSet;
use std::time::Duration;

use serde_json::{json, Value};
use switchboard_integration::cluster::SharedFileNodes;
use switchboard_integration::harness::{
    cursor_num, cursor_str, uniq, ApiClient, Frame, TestServer, WsClient,
};
use switchboard_integration::pusher_client::{trigger, PusherClient};
use switchboard_integration::redis_server::RedisServer;

const WAIT: Duration = Duration::from_secs(15);

/// Two nodes on one database file and one Redis.
struct Cluster {
    a: TestServer,
    b: TestServer,
    _files: SharedFileNodes,
}

async fn cluster(redis: &RedisServer) -> Cluster {
    let mut files = SharedFileNodes::start(redis, 2, None).await;
    let b = files.nodes.pop().expect("node b");
    let a = files.nodes.pop().expect("node a");
    Cluster {
        a,
        b,
        _files: files,
    }
}

/// Alice (poster, on A) and Bob in a group channel; answers alice's client and the channel id.
async fn group(c: &Cluster) -> (ApiClient, String) {
    let alice = c.a.user("alice", "human", "member").await;
    c.a.create_entity("bob", "Bob", "human", "member").await;
    let ch = alice.create_group(&uniq("team"), &["bob"], json!({})).await;
    let id = ch["id"].as_str().expect("channel id").to_owned();
    (alice, id)
}

/// Reads `n` `message.created` events (other event types are skipped).
async fn messages(ws: &mut WsClient, n: usize) -> Vec<Value> {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while got.len() < n {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match ws.next_frame(left).await {
            Frame::Json(v) if v["type"] == json!("message.created") => got.push(v),
            Frame::Json(_) => {}
            other => panic!("after {} of {n} messages: {other:?}", got.len()),
        }
    }
    got
}

/// Every frame's cursor follows the previous one by exactly 1, starting after `after`; ids
/// are unique.
fn assert_contiguous(frames: &[Value], after: &str) {
    let mut prev = cursor_num(after).expect("numeric cursor");
    let mut ids = HashSet::new();
    for f in frames {
        let c = cursor_num(&cursor_str(&f["cursor"])).expect("numeric cursor");
        assert_eq!(c, prev + 1, "cursor gap or repeat at {f}");
        assert!(ids.insert(f["id"].to_string()), "duplicate event {f}");
        prev = c;
    }
}

/// Nothing more arrives (no duplicate after the expected frames).
async fn assert_quiet(ws: &mut WsClient) {
    match ws.next_frame(Duration::from_millis(500)).await {
        Frame::Timeout => {}
        other => panic!("unexpected frame: {other:?}"),
    }
}

#[tokio::test]
async fn a_chat_message_posted_on_a_reaches_a_socket_on_b() {
    let redis = RedisServer::start().await;
    let c = cluster(&redis).await;
    let (alice, ch) = group(&c).await;
    let mut on_b = c.b.ws(&c.b.token_for("bob"), None).await;
    let ready = on_b.ready_cursor.clone().expect("ready cursor");

    let mut sent = Vec::new();
    for i in 0..20 {
        sent.push(alice.say(&ch, &format!("hello {i}")).await);
    }
    let got = messages(&mut on_b, 20).await;
    assert_contiguous(&got, &ready);
    for (g, s) in got.iter().zip(&sent) {
        assert_eq!(g["id"], s["event"]["id"], "{g}");
        assert_eq!(g["payload"]["data"], s["message"]["data"], "{g}");
    }
    assert_quiet(&mut on_b).await;

    // And back: B's own writes reach a socket on A.
    let bob = c.b.client("bob", &c.b.token_for("bob"));
    let mut on_a = c.a.ws(&alice.token, None).await;
    let reply = bob.say(&ch, "hi from b").await;
    let got = messages(&mut on_a, 1).await;
    assert_eq!(got[0]["id"], reply["event"]["id"]);
}

#[tokio::test]
async fn a_pusher_event_on_a_reaches_a_v2_socket_on_b_with_contiguous_serials() {
    let redis = RedisServer::start().await;
    let c = cluster(&redis).await;
    let channel = uniq("orders");
    let mut on_b: PusherClient = c.b.pusher("?protocol=2").await;
    on_b.subscribe(&channel, None, None).await;

    for i in 0..10 {
        trigger(&c.a, &channel, "order", &format!("{{\"n\":{i}}}"), None).await;
    }
    let mut serials = Vec::new();
    for _ in 0..10 {
        let f = on_b.expect("order", Some(&channel)).await;
        serials.push(
            f["serial"]
                .as_i64()
                .unwrap_or_else(|| panic!("serial: {f}")),
        );
    }
    let first = serials[0];
    assert_eq!(
        serials,
        (first..first + 10).collect::<Vec<_>>(),
        "contiguous serials, no duplicate"
    );
}

#[tokio::test]
async fn after_a_redis_outage_b_repairs_the_gap_and_a_is_unaffected() {
    let mut redis = RedisServer::start().await;
    let c = cluster(&redis).await;
    let (alice, ch) = group(&c).await;
    let mut on_a = c.a.ws(&alice.token, None).await;
    let mut on_b = c.b.ws(&c.b.token_for("bob"), None).await;
    let feed = uniq("feed");
    let mut pusher_b = c.b.pusher("?protocol=2").await;
    pusher_b.subscribe(&feed, None, None).await;

    let mut sent = Vec::new();
    for i in 0..3 {
        sent.push(alice.say(&ch, &format!("before {i}")).await);
    }
    assert_eq!(
        ids(&messages_in(&mut on_b, &ch, 3).await),
        sent_ids(&sent[..3])
    );

    redis.kill();
    for i in 0..15 {
        sent.push(alice.say(&ch, &format!("during {i}")).await);
    }
    trigger(&c.a, &feed, "tick", "1", None).await;
    // The local node's sockets do not depend on Redis.
    let local = messages_in(&mut on_a, &ch, 18).await;
    assert_eq!(ids(&local), sent_ids(&sent));

    redis.restart().await;
    // Nothing else is posted: B learns of the outage's events by itself (its catch-up after
    // subscribing again, or A's kept notification), not from a later message.
    let repaired = messages_in(&mut on_b, &ch, 15).await;
    assert_eq!(
        ids(&repaired),
        sent_ids(&sent[3..]),
        "every message, in order, once"
    );
    let t = pusher_b.expect("tick", Some(&feed)).await;
    assert_eq!(t["serial"], json!(1), "{t}");

    // Live again through Redis, after what was repaired.
    for i in 0..3 {
        sent.push(alice.say(&ch, &format!("after {i}")).await);
    }
    let live = messages_in(&mut on_b, &ch, 3).await;
    assert_eq!(ids(&live), sent_ids(&sent[18..]));
    let last_repaired = cursor_num(&cursor_str(&repaired[14]["cursor"])).expect("cursor");
    let first_live = cursor_num(&cursor_str(&live[0]["cursor"])).expect("cursor");
    assert!(first_live > last_repaired, "cursor order kept");
    assert_quiet(&mut on_b).await;
}

/// Reads `n` `message.created` events of one channel (other frames are skipped).
async fn messages_in(ws: &mut WsClient, channel: &str, n: usize) -> Vec<Value> {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while got.len() < n {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match ws.next_frame(left).await {
            Frame::Json(v)
                if v["type"] == json!("message.created") && v["channel_id"] == json!(channel) =>
            {
                got.push(v)
            }
            Frame::Json(_) => {}
            other => panic!("after {} of {n} messages: {other:?}", got.len()),
        }
    }
    got
}

fn ids(frames: &[Value]) -> Vec<Value> {
    frames.iter().map(|f| f["id"].clone()).collect()
}

fn sent_ids(sent: &[Value]) -> Vec<Value> {
    sent.iter().map(|s| s["event"]["id"].clone()).collect()
}
