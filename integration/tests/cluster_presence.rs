//! Cluster mode (issue 6): presence, occupancy and client events of the Pusher face across
//! three real nodes sharing one SQLite file and one real Redis of their own. Members on other
//! nodes appear in `subscription_succeeded`; `member_added` / `member_removed` and the
//! occupancy webhooks happen once for the cluster; the HTTP API answers cluster-wide on every
//! node; a node killed with SIGKILL has its members removed within the documented bound; and
//! after Redis restarts empty, the nodes rebuild the state from their own sockets.

use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};
use switchboard_integration::cluster::SharedFileNodes;
use switchboard_integration::harness::{uniq, Frame, SignOpts, TestServer};
use switchboard_integration::pusher_client::{fence, PusherClient};
use switchboard_integration::redis_server::RedisServer;
use switchboard_integration::webhook_receiver::Receiver;
use tokio::time::Instant;

/// `cluster_presence::DEAD_NODE_BOUND` is 10 s; the issue asks for at most 15.
const DEAD_NODE_LIMIT: Duration = Duration::from_secs(15);
const WAIT: Duration = Duration::from_secs(15);

/// Three nodes on one database file and one Redis.
struct Cluster(SharedFileNodes);

impl std::ops::Deref for Cluster {
    type Target = SharedFileNodes;
    fn deref(&self) -> &SharedFileNodes {
        &self.0
    }
}

impl std::ops::DerefMut for Cluster {
    fn deref_mut(&mut self) -> &mut SharedFileNodes {
        &mut self.0
    }
}

impl Cluster {
    fn a(&self) -> &TestServer {
        &self.0.nodes[0]
    }
    fn b(&self) -> &TestServer {
        &self.0.nodes[1]
    }
    fn c(&self) -> &TestServer {
        &self.0.nodes[2]
    }
}

async fn cluster(redis: &RedisServer, settings: Option<Value>) -> Cluster {
    Cluster(SharedFileNodes::start(redis, 3, settings.as_ref()).await)
}

async fn connect(node: &TestServer) -> PusherClient {
    node.pusher("?protocol=7").await
}

/// `{ids (sorted), count}` of a presence object.
fn members(presence: &Value) -> (Vec<String>, u64) {
    let p = &presence["presence"];
    let mut ids: Vec<String> = p["ids"]
        .as_array()
        .unwrap_or_else(|| panic!("ids: {presence}"))
        .iter()
        .map(|v| v.as_str().expect("id").to_string())
        .collect();
    ids.sort();
    for id in &ids {
        assert!(p["hash"].get(id).is_some(), "hash has {id}: {presence}");
    }
    (ids, p["count"].as_u64().expect("count"))
}

fn data_of(frame: &Value) -> Value {
    match &frame["data"] {
        Value::String(s) => serde_json::from_str(s).unwrap_or(Value::String(s.clone())),
        other => other.clone(),
    }
}

/// The presence events (`member_added` / `member_removed`, `user_id`) among `frames`.
fn presence_events(frames: &[Value]) -> Vec<(String, String)> {
    frames
        .iter()
        .filter_map(|f| {
            let e = f["event"].as_str()?;
            let kind = e.strip_prefix("pusher_internal:member_")?;
            Some((
                kind.to_string(),
                data_of(f)["user_id"].as_str()?.to_string(),
            ))
        })
        .collect()
}

async fn signed_get(node: &TestServer, path: &str, query: &[(&str, &str)]) -> Value {
    let (status, body) = node
        .signed_with(
            &node.app,
            Method::GET,
            &format!("/apps/{}{path}", node.app.id),
            None,
            SignOpts {
                extra_query: query
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                ..SignOpts::default()
            },
        )
        .await;
    assert_eq!(status, 200, "GET {path}: {body}");
    body
}

async fn users(node: &TestServer, channel: &str) -> Vec<String> {
    let body = signed_get(node, &format!("/channels/{channel}/users"), &[]).await;
    let mut ids: Vec<String> = body["users"]
        .as_array()
        .unwrap_or_else(|| panic!("users: {body}"))
        .iter()
        .map(|u| u["id"].as_str().expect("id").to_string())
        .collect();
    ids.sort();
    ids
}

/// Polls `check(i)` for every node `i` until it holds on all (the state converges).
async fn eventually<F, Fut>(nodes: usize, what: &str, check: F)
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + WAIT;
    loop {
        let mut all = true;
        for i in 0..nodes {
            if !check(i).await {
                all = false;
                break;
            }
        }
        if all {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "never true on every node: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn sorted(v: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = v.iter().map(|s| s.to_string()).collect();
    v.sort();
    v
}

// ------------------------------------------------------------------------- tests

#[tokio::test]
async fn presence_members_are_cluster_wide_and_announced_once_per_user() {
    let redis = RedisServer::start().await;
    let c = cluster(&redis, None).await;
    let app = c.a().app.clone();
    let ch = uniq("presence-room");

    let mut u1_a = connect(c.a()).await;
    let p = u1_a
        .join_presence(&app, &ch, "u1", json!({"name": "one"}))
        .await;
    assert_eq!(members(&p), (sorted(&["u1"]), 1));

    // A member on A is in the list of a subscriber on B.
    let mut u2_b = connect(c.b()).await;
    let p = u2_b
        .join_presence(&app, &ch, "u2", json!({"name": "two"}))
        .await;
    assert_eq!(members(&p), (sorted(&["u1", "u2"]), 2), "{p}");
    assert_eq!(p["presence"]["hash"]["u1"], json!({"name": "one"}), "{p}");
    let added = u1_a.expect("pusher_internal:member_added", Some(&ch)).await;
    assert_eq!(data_of(&added)["user_id"], json!("u2"), "{added}");
    assert_eq!(
        data_of(&added)["user_info"],
        json!({"name": "two"}),
        "{added}"
    );

    // u1's second socket, on C: one member, announced to nobody.
    let mut u1_c = connect(c.c()).await;
    let p = u1_c
        .join_presence(&app, &ch, "u1", json!({"name": "one"}))
        .await;
    assert_eq!(members(&p), (sorted(&["u1", "u2"]), 2), "{p}");
    for node in &c.nodes {
        assert_eq!(users(node, &ch).await, sorted(&["u1", "u2"]));
        let info = signed_get(
            node,
            &format!("/channels/{ch}"),
            &[("info", "user_count,subscription_count")],
        )
        .await;
        assert_eq!(info["user_count"], json!(2), "{info}");
        assert_eq!(info["subscription_count"], json!(3), "{info}");
        assert_eq!(info["occupied"], json!(true), "{info}");
    }

    // u1 leaves C: still present on A, nothing announced. Then u1 leaves A: removed, once.
    u1_c.ws.close().await;
    eventually(3, "three subscriptions become two", |i| {
        let (n, ch) = (&c.nodes[i], ch.clone());
        async move {
            signed_get(
                n,
                &format!("/channels/{ch}"),
                &[("info", "subscription_count")],
            )
            .await["subscription_count"]
                == json!(2)
        }
    })
    .await;
    fence(c.a(), &ch).await;
    let before = u2_b.frames_before(&ch, "fence").await;
    assert!(presence_events(&before).is_empty(), "{before:?}");
    let before = u1_a.frames_before(&ch, "fence").await;
    assert!(presence_events(&before).is_empty(), "{before:?}");

    u1_a.ws.close().await;
    let removed = u2_b
        .expect("pusher_internal:member_removed", Some(&ch))
        .await;
    assert_eq!(data_of(&removed)["user_id"], json!("u1"), "{removed}");
    // Once: nothing else before a later fence (triggered on C this time).
    tokio::time::sleep(Duration::from_millis(300)).await;
    fence(c.c(), &ch).await;
    let before = u2_b.frames_before(&ch, "fence").await;
    assert!(presence_events(&before).is_empty(), "{before:?}");
    for node in &c.nodes {
        assert_eq!(users(node, &ch).await, sorted(&["u2"]));
    }

    // A newcomer on C sees exactly u2.
    let mut u3_c = connect(c.c()).await;
    let p = u3_c.join_presence(&app, &ch, "u3", json!({})).await;
    assert_eq!(members(&p), (sorted(&["u2", "u3"]), 2), "{p}");
    let added = u2_b.expect("pusher_internal:member_added", Some(&ch)).await;
    assert_eq!(data_of(&added)["user_id"], json!("u3"), "{added}");
}

#[tokio::test]
async fn client_events_cross_nodes_but_never_return_to_the_sender() {
    let redis = RedisServer::start().await;
    let c = cluster(&redis, Some(json!({"enable_client_messages": true}))).await;
    let app = c.a().app.clone();
    let private = uniq("private-chat");
    let mut on_a = connect(c.a()).await;
    let mut on_b = c.b().pusher("?protocol=2").await;
    let mut on_c = connect(c.c()).await;
    for s in [&mut on_a, &mut on_b, &mut on_c] {
        s.subscribe_private(&app, &private).await;
    }
    on_a.client_event(&private, "client-typing", json!({"who": "a"}))
        .await;
    for s in [&mut on_b, &mut on_c] {
        let ev = s.expect("client-typing", Some(&private)).await;
        assert_eq!(ev["data"], json!({"who": "a"}), "{ev}");
    }
    fence(c.b(), &private).await;
    let before = on_a.frames_before(&private, "fence").await;
    assert!(
        !before.iter().any(|f| f["event"] == json!("client-typing")),
        "not echoed to the sender: {before:?}"
    );
    for s in [&mut on_b, &mut on_c] {
        let before = s.frames_before(&private, "fence").await;
        assert!(
            !before.iter().any(|f| f["event"] == json!("client-typing")),
            "once: {before:?}"
        );
    }

    // On a presence channel the relayed event names the sender's user.
    let presence = uniq("presence-chat");
    let mut p_a = connect(c.a()).await;
    let mut p_c = connect(c.c()).await;
    p_a.join_presence(&app, &presence, "ann", json!({})).await;
    p_c.join_presence(&app, &presence, "cid", json!({})).await;
    p_c.client_event(&presence, "client-hello", json!({"x": 1}))
        .await;
    let ev = p_a.expect("client-hello", Some(&presence)).await;
    assert_eq!(ev["user_id"], json!("cid"), "{ev}");
    assert_eq!(ev["data"], json!({"x": 1}), "{ev}");
}

#[tokio::test]
async fn the_http_api_answers_cluster_wide_on_every_node() {
    let redis = RedisServer::start().await;
    let c = cluster(&redis, None).await;
    let app = c.a().app.clone();
    let news = uniq("news");
    let sports = uniq("sports");
    let room = uniq("presence-hall");

    let mut on_a = connect(c.a()).await;
    on_a.subscribe(&news, None, None).await;
    let mut on_b = connect(c.b()).await;
    on_b.subscribe(&news, None, None).await;
    on_b.subscribe(&sports, None, None).await;
    let mut on_c = connect(c.c()).await;
    on_c.join_presence(&app, &room, "carol", json!({})).await;
    // dave is signed in (terminate_connections acts on signed-in users) on C and A.
    let mut on_c2 = connect(c.c()).await;
    on_c2.signin(&app, r#"{"id":"dave"}"#).await;
    on_c2.join_presence(&app, &room, "dave", json!({})).await;
    let mut on_a2 = connect(c.a()).await;
    on_a2.signin(&app, r#"{"id":"dave"}"#).await;
    on_a2.join_presence(&app, &room, "dave", json!({})).await;

    for node in &c.nodes {
        let all = signed_get(node, "/channels", &[("info", "subscription_count")]).await;
        let chans = all["channels"].as_object().expect("channels");
        assert_eq!(chans[&news], json!({"subscription_count": 2}), "{all}");
        assert_eq!(chans[&sports], json!({"subscription_count": 1}), "{all}");
        assert_eq!(chans[&room], json!({"subscription_count": 3}), "{all}");

        let only = signed_get(
            node,
            "/channels",
            &[("filter_by_prefix", "presence-"), ("info", "user_count")],
        )
        .await;
        assert_eq!(only["channels"][&room], json!({"user_count": 2}), "{only}");
        assert!(only["channels"].get(&news).is_none(), "{only}");

        let one = signed_get(
            node,
            &format!("/channels/{news}"),
            &[("info", "subscription_count")],
        )
        .await;
        assert_eq!(
            one,
            json!({"occupied": true, "subscription_count": 2}),
            "{one}"
        );
        assert_eq!(users(node, &room).await, sorted(&["carol", "dave"]));
    }

    // The last subscriber of news leaves from B: vacated everywhere.
    on_a.send("pusher:unsubscribe", json!({"channel": news}))
        .await;
    on_b.send("pusher:unsubscribe", json!({"channel": news}))
        .await;
    eventually(3, "news is vacated", |i| {
        let (n, news) = (&c.nodes[i], news.clone());
        async move {
            signed_get(n, &format!("/channels/{news}"), &[]).await == json!({"occupied": false})
        }
    })
    .await;
    for node in &c.nodes {
        let all = signed_get(node, "/channels", &[]).await;
        assert!(all["channels"].get(&news).is_none(), "{all}");
        assert!(all["channels"].get(&sports).is_some(), "{all}");
    }

    // terminate_connections on A closes dave's sockets on A and C.
    let (status, body) = c
        .a()
        .signed(
            Method::POST,
            &format!("/apps/{}/users/dave/terminate_connections", app.id),
            Some(&json!({})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    for s in [&mut on_c2, &mut on_a2] {
        let (_, code) = s.ws.read_until_close(WAIT).await;
        assert_eq!(code, Some(4009), "dave's socket closed");
    }
    let removed = on_c
        .expect("pusher_internal:member_removed", Some(&room))
        .await;
    assert_eq!(data_of(&removed)["user_id"], json!("dave"), "{removed}");
    eventually(3, "dave is gone", |i| {
        let (n, room) = (&c.nodes[i], room.clone());
        async move { users(n, &room).await == sorted(&["carol"]) }
    })
    .await;
}

#[tokio::test]
async fn webhooks_fire_once_for_the_cluster() {
    let redis = RedisServer::start().await;
    let rx = Receiver::start(&[]).await;
    let c = cluster(
        &redis,
        Some(json!({"enable_client_messages": true, "webhooks": [{"url": rx.url("/hook")}]})),
    )
    .await;
    let app = c.a().app.clone();
    let room = uniq("presence-w");
    let public = uniq("feed");

    let mut u1_a = connect(c.a()).await;
    u1_a.join_presence(&app, &room, "u1", json!({})).await;
    let mut u1_b = connect(c.b()).await;
    u1_b.join_presence(&app, &room, "u1", json!({})).await;
    let mut u2_c = connect(c.c()).await;
    u2_c.join_presence(&app, &room, "u2", json!({})).await;
    let mut f = Vec::new();
    for n in &c.nodes {
        let mut s = connect(n).await;
        s.subscribe(&public, None, None).await;
        f.push(s);
    }
    u2_c.client_event(&room, "client-ping", json!({})).await;
    u1_a.expect("client-ping", Some(&room)).await;

    for s in f {
        s.ws.close().await;
    }
    u1_a.ws.close().await;
    u2_c.ws.close().await;
    u1_b.ws.close().await;
    let events = rx
        .wait_events("/hook", |e| {
            has(e, "channel_vacated", &room) && has(e, "channel_vacated", &public)
        })
        .await;
    // Let a duplicate from another node show up.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let events = {
        let after = rx.events("/hook");
        assert!(after.len() >= events.len());
        after
    };
    let count = |name: &str, channel: &str, user: Option<&str>| {
        events
            .iter()
            .filter(|e| {
                e["name"] == json!(name)
                    && e["channel"] == json!(channel)
                    && user.is_none_or(|u| e["user_id"] == json!(u))
            })
            .count()
    };
    for ch in [&room, &public] {
        assert_eq!(count("channel_occupied", ch, None), 1, "{events:#?}");
        assert_eq!(count("channel_vacated", ch, None), 1, "{events:#?}");
    }
    for u in ["u1", "u2"] {
        assert_eq!(count("member_added", &room, Some(u)), 1, "{events:#?}");
        assert_eq!(count("member_removed", &room, Some(u)), 1, "{events:#?}");
    }
    assert_eq!(count("client_event", &room, Some("u2")), 1, "{events:#?}");
    assert_eq!(events.len(), 9, "{events:#?}");
    // (Order across nodes is not kept: each node's dispatcher sends its own batches, and
    // receivers order by `time_ms`, as with Pusher.)
}

#[tokio::test]
async fn a_killed_node_has_its_members_removed_within_the_bound() {
    let redis = RedisServer::start().await;
    let rx = Receiver::start(&[]).await;
    let mut c = cluster(
        &redis,
        Some(json!({"webhooks": [{"url": rx.url("/hook")}]})),
    )
    .await;
    let app = c.a().app.clone();
    let room = uniq("presence-k");
    let only_c = uniq("lonely");

    let mut u1_a = connect(c.a()).await;
    u1_a.join_presence(&app, &room, "u1", json!({})).await;
    let mut u2_b = connect(c.b()).await;
    u2_b.join_presence(&app, &room, "u2", json!({})).await;
    let mut u3_c = connect(c.c()).await;
    u3_c.join_presence(&app, &room, "u3", json!({})).await;
    u3_c.subscribe(&only_c, None, None).await;
    for s in [&mut u1_a, &mut u2_b] {
        let added = s.expect("pusher_internal:member_added", Some(&room)).await;
        if data_of(&added)["user_id"] == json!("u2") {
            s.expect("pusher_internal:member_added", Some(&room)).await;
        }
    }
    assert_eq!(users(c.a(), &room).await, sorted(&["u1", "u2", "u3"]));

    let killed_at = Instant::now();
    c.nodes[2].kill_hard();
    let mut took = Vec::new();
    for s in [&mut u1_a, &mut u2_b] {
        let frames =
            s.ws.collect_until(DEAD_NODE_LIMIT, |v| {
                v["event"] == json!("pusher_internal:member_removed")
            })
            .await;
        let removed = frames.last().expect("member_removed");
        assert_eq!(data_of(removed)["user_id"], json!("u3"), "{removed}");
        took.push(killed_at.elapsed());
    }
    let worst = took.iter().max().copied().unwrap_or_default();
    eprintln!("dead node cleanup: member_removed after {worst:?}");
    assert!(worst <= DEAD_NODE_LIMIT, "took {worst:?}");
    c.nodes.truncate(2);
    for node in &c.nodes {
        assert_eq!(users(node, &room).await, sorted(&["u1", "u2"]));
        let info = signed_get(
            node,
            &format!("/channels/{room}"),
            &[("info", "subscription_count")],
        )
        .await;
        assert_eq!(info["subscription_count"], json!(2), "{info}");
        let lonely = signed_get(node, &format!("/channels/{only_c}"), &[]).await;
        assert_eq!(lonely, json!({"occupied": false}), "{lonely}");
    }
    // The reaper's events, once.
    rx.wait_events_within(WAIT, "/hook", |e| has(e, "channel_vacated", &only_c))
        .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let events = rx.events("/hook");
    let removed_u3 = events
        .iter()
        .filter(|e| e["name"] == json!("member_removed") && e["user_id"] == json!("u3"))
        .count();
    assert_eq!(removed_u3, 1, "{events:#?}");
    let vacated = events
        .iter()
        .filter(|e| e["name"] == json!("channel_vacated") && e["channel"] == json!(only_c))
        .count();
    assert_eq!(vacated, 1, "{events:#?}");
    // No second member_removed frame on the survivors.
    fence(c.a(), &room).await;
    for s in [&mut u1_a, &mut u2_b] {
        let before = s.frames_before(&room, "fence").await;
        assert!(presence_events(&before).is_empty(), "{before:?}");
    }
}

#[tokio::test]
async fn a_graceful_shutdown_removes_the_nodes_members_at_once() {
    let redis = RedisServer::start().await;
    let mut c = cluster(&redis, None).await;
    let app = c.a().app.clone();
    let room = uniq("presence-g");
    let mut u1_a = connect(c.a()).await;
    u1_a.join_presence(&app, &room, "u1", json!({})).await;
    let mut u3_c = connect(c.c()).await;
    u3_c.join_presence(&app, &room, "u3", json!({})).await;
    u1_a.expect("pusher_internal:member_added", Some(&room))
        .await;

    let stopped_at = Instant::now();
    let status = c.nodes[2].terminate(Duration::from_secs(15)).await;
    assert!(status.is_some(), "node C stopped");
    let frames = u1_a
        .ws
        .collect_until(WAIT, |v| {
            v["event"] == json!("pusher_internal:member_removed")
        })
        .await;
    let removed = frames.last().expect("member_removed");
    assert_eq!(data_of(removed)["user_id"], json!("u3"), "{removed}");
    let took = stopped_at.elapsed();
    eprintln!("graceful shutdown: member_removed after {took:?}");
    assert!(
        took < Duration::from_secs(5),
        "announced at shutdown, not by the reaper: {took:?}"
    );
    assert_eq!(users(c.a(), &room).await, sorted(&["u1"]));
}

#[tokio::test]
async fn presence_is_rebuilt_after_redis_restarts() {
    let mut redis = RedisServer::start().await;
    let c = cluster(&redis, Some(json!({"enable_client_messages": true}))).await;
    let app = c.a().app.clone();
    let room = uniq("presence-r");
    let mut u1_a = connect(c.a()).await;
    u1_a.join_presence(&app, &room, "u1", json!({"n": 1})).await;
    let mut u2_b = connect(c.b()).await;
    u2_b.join_presence(&app, &room, "u2", json!({"n": 2})).await;
    u1_a.expect("pusher_internal:member_added", Some(&room))
        .await;

    redis.kill();
    // Local delivery keeps working meanwhile: a member joining on A is announced on A.
    let mut u4_a = connect(c.a()).await;
    let p = u4_a.join_presence(&app, &room, "u4", json!({})).await;
    assert!(members(&p).0.contains(&"u4".to_string()), "{p}");
    let added = u1_a
        .expect("pusher_internal:member_added", Some(&room))
        .await;
    assert_eq!(data_of(&added)["user_id"], json!("u4"), "{added}");
    u4_a.client_event(&room, "client-local", json!({})).await;
    u1_a.expect("client-local", Some(&room)).await;

    redis.restart().await;
    let rebuilt_from = Instant::now();
    eventually(3, "members rebuilt after the restart", |i| {
        let (n, room) = (&c.nodes[i], room.clone());
        async move { users(n, &room).await == sorted(&["u1", "u2", "u4"]) }
    })
    .await;
    eprintln!(
        "presence rebuilt {:?} after Redis came back",
        rebuilt_from.elapsed()
    );
    for node in &c.nodes {
        let info = signed_get(
            node,
            &format!("/channels/{room}"),
            &[("info", "subscription_count,user_count")],
        )
        .await;
        assert_eq!(
            info,
            json!({"occupied": true, "subscription_count": 3, "user_count": 3}),
            "{info}"
        );
    }
    // And live again: a newcomer on C sees everyone and is announced on A and B.
    let mut u3_c = connect(c.c()).await;
    let p = u3_c.join_presence(&app, &room, "u3", json!({})).await;
    assert_eq!(members(&p), (sorted(&["u1", "u2", "u3", "u4"]), 4), "{p}");
    assert_eq!(p["presence"]["hash"]["u2"], json!({"n": 2}), "{p}");
    for s in [&mut u1_a, &mut u2_b] {
        let frames = s
            .until(|v| {
                v["event"] == json!("pusher_internal:member_added")
                    && data_of(v)["user_id"] == json!("u3")
            })
            .await;
        assert!(!frames.is_empty());
    }
    u2_b.ws.close().await;
    let frames = u3_c
        .until(|v| v["event"] == json!("pusher_internal:member_removed"))
        .await;
    assert_eq!(
        data_of(frames.last().expect("frame"))["user_id"],
        json!("u2")
    );
}

/// Every frame `s` receives until `pred` holds on all of them so far, or `deadline`.
async fn frames_until(
    s: &mut PusherClient,
    deadline: Instant,
    pred: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let mut out = Vec::new();
    while !pred(&out) {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        match s.next(left).await {
            Frame::Json(v) => out.push(v),
            Frame::Timeout => break,
            Frame::Closed(code) => panic!("socket closed ({code:?}) after {out:?}"),
        }
    }
    out
}

fn count(events: &[(String, String)], kind: &str, user: &str) -> usize {
    events
        .iter()
        .filter(|(k, u)| k == kind && u == user)
        .count()
}

/// Redis down (every subscription gone), then back empty: a member who left and one who
/// joined on C meanwhile (told to C's sockets only) are announced to the sockets of A and B
/// once each, by the resync that follows the resubscription / re-registration.
const RESYNC_LIMIT: Duration = Duration::from_secs(20);

#[tokio::test]
async fn member_changes_missed_while_redis_was_down_are_resynced_once() {
    let mut redis = RedisServer::start().await;
    let c = cluster(&redis, None).await;
    let app = c.a().app.clone();
    let room = uniq("presence-m");

    let mut ua = connect(c.a()).await;
    ua.join_presence(&app, &room, "ua", json!({"n": "a"})).await;
    let mut ub = connect(c.b()).await;
    ub.join_presence(&app, &room, "ub", json!({"n": "b"})).await;
    let mut uc = connect(c.c()).await;
    uc.join_presence(&app, &room, "uc", json!({"n": "c"})).await;
    let mut gone = connect(c.c()).await;
    gone.join_presence(&app, &room, "gone", json!({"n": "gone"}))
        .await;
    for s in [&mut ua, &mut ub, &mut uc] {
        s.until(|v| {
            v["event"] == json!("pusher_internal:member_added")
                && data_of(v)["user_id"] == json!("gone")
        })
        .await;
    }
    assert_eq!(
        users(c.a(), &room).await,
        sorted(&["ua", "ub", "uc", "gone"])
    );

    redis.stop();
    // While it is down: one leaves on C, another joins on C; C's sockets are told.
    gone.ws.close().await;
    let mut fresh = connect(c.c()).await;
    let p = fresh
        .join_presence(&app, &room, "fresh", json!({"n": "fresh"}))
        .await;
    assert!(members(&p).0.contains(&"fresh".to_string()), "{p}");
    let frames = uc
        .until(|v| {
            v["event"] == json!("pusher_internal:member_added")
                && data_of(v)["user_id"] == json!("fresh")
        })
        .await;
    assert_eq!(
        count(&presence_events(&frames), "removed", "gone"),
        1,
        "{frames:?}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;

    redis.restart().await;
    let back = Instant::now();
    let told = |f: &[Value]| {
        let ev = presence_events(f);
        count(&ev, "removed", "gone") > 0 && count(&ev, "added", "fresh") > 0
    };
    let mut seen_a = frames_until(&mut ua, back + RESYNC_LIMIT, told).await;
    let took = back.elapsed();
    eprintln!("node A's socket resynced {took:?} after Redis came back");
    assert!(told(&seen_a), "A was not resynced: {seen_a:?}");
    let added = seen_a
        .iter()
        .find(|v| {
            v["event"] == json!("pusher_internal:member_added")
                && data_of(v)["user_id"] == json!("fresh")
        })
        .expect("member_added");
    assert_eq!(
        data_of(added)["user_info"],
        json!({"n": "fresh"}),
        "{added}"
    );
    let mut seen_b = frames_until(&mut ub, back + RESYNC_LIMIT, told).await;
    assert!(told(&seen_b), "B was not resynced: {seen_b:?}");

    eventually(3, "every node lists the same members", |i| {
        let (n, room) = (&c.nodes[i], room.clone());
        async move { users(n, &room).await == sorted(&["ua", "ub", "uc", "fresh"]) }
    })
    .await;

    // Exactly once: nothing more comes (later resyncs find nothing to tell).
    let quiet = Instant::now() + Duration::from_secs(4);
    seen_a.extend(frames_until(&mut ua, quiet, |_| false).await);
    seen_b.extend(frames_until(&mut ub, quiet, |_| false).await);
    let seen_c = frames_until(&mut uc, quiet, |_| false).await;
    for (who, seen) in [("A", &seen_a), ("B", &seen_b)] {
        let ev = presence_events(seen);
        assert_eq!(count(&ev, "removed", "gone"), 1, "{who}: {ev:?}");
        assert_eq!(count(&ev, "added", "fresh"), 1, "{who}: {ev:?}");
        assert_eq!(ev.len(), 2, "{who}: {ev:?}");
    }
    // C's sockets were told during the outage.
    assert_eq!(presence_events(&seen_c), vec![], "{seen_c:?}");

    // Live again afterwards.
    fresh.ws.close().await;
    for s in [&mut ua, &mut ub, &mut uc] {
        let frames = s
            .until(|v| v["event"] == json!("pusher_internal:member_removed"))
            .await;
        assert_eq!(
            presence_events(&frames),
            vec![("removed".to_string(), "fresh".to_string())]
        );
    }
}

#[tokio::test]
async fn the_member_limit_is_cluster_wide() {
    let redis = RedisServer::start().await;
    let c = cluster(&redis, None).await;
    let app = c.a().app.clone();
    let room = uniq("presence-full");
    // 100 members over three nodes (Pusher's limit), then a 101st is refused on any node.
    let mut sockets = Vec::new();
    for i in 0..100 {
        let node = &c.nodes[i % 3];
        let mut s = connect(node).await;
        s.join_presence(&app, &room, &format!("m{i}"), json!({}))
            .await;
        sockets.push(s);
    }
    for node in &c.nodes {
        let info = signed_get(
            node,
            &format!("/channels/{room}"),
            &[("info", "user_count")],
        )
        .await;
        assert_eq!(info["user_count"], json!(100), "{info}");
    }
    let mut extra = connect(c.b()).await;
    let data = json!({"user_id": "m100", "user_info": {}}).to_string();
    let auth = switchboard_integration::pusher_client::channel_auth(
        &app,
        &extra.socket_id,
        &room,
        Some(&data),
    );
    let refused = extra.subscribe_with(&room, Some(auth), Some(data)).await;
    assert_eq!(refused["event"], json!("pusher:error"), "{refused}");
    assert_eq!(refused["data"]["code"], json!(4100), "{refused}");
    // An existing member's second socket is welcome.
    let mut again = connect(c.c()).await;
    let p = again.join_presence(&app, &room, "m0", json!({})).await;
    assert_eq!(members(&p).1, 100);
    assert_eq!(users(c.a(), &room).await.len(), 100);
    extra.assert_alive().await;
}

fn has(events: &[Value], name: &str, channel: &str) -> bool {
    events
        .iter()
        .any(|e| e["name"] == json!(name) && e["channel"] == json!(channel))
}
