//! PostgreSQL as the store (issue 6): a real server on `--database postgres://…` through the
//! chat API, versioned messages, replay-then-live and the Pusher face; then two nodes on one
//! PostgreSQL database (and their own Redis) posting to one channel at once: every post
//! succeeds, seqs stay contiguous, and a replay from the start sees every event once, in
//! strictly increasing cursor order.
//!
//! Needs `SWITCHBOARD_TEST_POSTGRES` (make test sets it); each test makes its own database.

use std::collections::HashSet;
use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};
use switchboard_integration::harness::{
    cursor_num, cursor_str, random_string, uniq, AppCreds, Frame, TestServer, WsClient,
};
use switchboard_integration::pg_server::PgDatabase;
use switchboard_integration::pusher_client::trigger;
use switchboard_integration::redis_server::RedisServer;

const WAIT: Duration = Duration::from_secs(20);

async fn pg_server(db: &PgDatabase) -> TestServer {
    TestServer::builder()
        .database_url(&db.url())
        .env("RUST_LOG", "info")
        .start()
        .await
}

fn serial(v: &Value) -> String {
    v["message_serial"]
        .as_str()
        .unwrap_or_else(|| panic!("message_serial: {v}"))
        .to_owned()
}

/// Reads frames until `n` of type `ty` arrived (others skipped).
async fn frames_of(ws: &mut WsClient, ty: &str, n: usize) -> Vec<Value> {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while got.len() < n {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match ws.next_frame(left).await {
            Frame::Json(v) if v["type"] == json!(ty) => got.push(v),
            Frame::Json(_) => {}
            other => panic!("after {} of {n} {ty}: {other:?}", got.len()),
        }
    }
    got
}

#[tokio::test]
async fn chat_versioned_replay_and_pusher_flows_run_on_postgres() {
    let db = PgDatabase::fresh();
    let s = pg_server(&db).await;
    let (st, ready) = s.get_text("/readyz").await;
    assert_eq!(st, 200, "{ready}");
    assert!(
        ready.contains("postgres"),
        "readyz names the engine: {ready}"
    );

    // Chat: a group, messages, a thread reply, a reaction, a read pointer.
    let alice = s.user("alice", "human", "member").await;
    let bob = s.user("bob", "human", "member").await;
    let ch = alice.create_group(&uniq("team"), &["bob"], json!({})).await;
    let cid = ch["id"].as_str().expect("channel id").to_owned();
    let first = alice.say(&cid, "first").await;
    let root = alice.say(&cid, "root").await;
    let root_ser = serial(&root["message"]);
    let reply = bob
        .post_message(&cid, &json!({"data": "reply", "thread_id": root_ser}))
        .await;
    assert_eq!(reply["message"]["thread_id"], json!(root_ser), "{reply}");
    let (st, thread) = alice
        .get(&format!("/api/channels/{cid}/messages/{root_ser}/thread"))
        .await;
    assert_eq!(st, 200, "{thread}");
    assert_eq!(thread["root"]["reply_count"], json!(1), "{thread}");
    assert_eq!(
        thread["replies"].as_array().map(Vec::len),
        Some(1),
        "{thread}"
    );
    let (st, r) = bob
        .post(
            &format!("/api/channels/{cid}/messages/{root_ser}/reactions"),
            &json!({"emoji": "👍"}),
        )
        .await;
    assert!(st == 200 || st == 201, "reaction: {st} {r}");
    let (st, r) = bob
        .post(&format!("/api/channels/{cid}/read"), &json!({"seq": 2}))
        .await;
    assert_eq!(st, 200, "read: {r}");
    assert_eq!(bob.channel(&cid).await["last_read_seq"], json!(2));
    // Bob's unread count comes from raw SQL with PostgreSQL placeholders.
    let listed = bob.channels().await;
    let mine = listed
        .iter()
        .find(|c| c["id"] == json!(cid))
        .unwrap_or_else(|| panic!("channel listed: {listed:?}"));
    assert_eq!(mine["unread_count"], json!(1), "{mine}");
    let msgs = alice.messages(&cid).await;
    assert!(msgs.len() >= 2, "{msgs:?}");
    assert_eq!(msgs[0]["data"], json!("first"), "{msgs:?}");

    // Replay then live with a cursor: what followed `first`, then a new message.
    let after = cursor_str(&first["event"]["cursor"]);
    let mut ws = s.ws(&alice.token, Some(&after)).await;
    let replayed = frames_of(&mut ws, "message.created", 2).await;
    assert_eq!(replayed[0]["id"], root["event"]["id"], "{replayed:?}");
    assert_eq!(replayed[1]["id"], reply["event"]["id"], "{replayed:?}");
    let live = alice.say(&cid, "live").await;
    let got = frames_of(&mut ws, "message.created", 1).await;
    assert_eq!(got[0]["id"], live["event"]["id"]);
    assert!(
        cursor_num(&cursor_str(&got[0]["cursor"]))
            > cursor_num(&cursor_str(&replayed[1]["cursor"]))
    );

    // Versioned messages on an implicit channel: create, update, append, delete.
    let stream = format!("ai-{}", random_string(8));
    let (st, body) = s
        .signed(
            Method::POST,
            &format!("/apps/{}/events", s.app.id),
            Some(&json!({"name": "chunk", "data": "v1", "channel": stream})),
        )
        .await;
    assert_eq!(st, 200, "{body}");
    let ser = "m000000000001";
    let path = |action: &str| {
        format!(
            "/apps/{}/channels/{stream}/messages/{ser}/{action}",
            s.app.id
        )
    };
    let mut seq = 1;
    for (action, body) in [
        ("update", json!({"data": "v2"})),
        ("append", json!({"data": "+a"})),
        ("append", json!({"data": "+b", "op_id": "op-1"})),
        ("append", json!({"data": "+b", "op_id": "op-1"})),
    ] {
        let (st, r) = s.signed(Method::POST, &path(action), Some(&body)).await;
        assert_eq!(st, 200, "{action}: {r}");
        if r["status"] != json!("duplicate") {
            seq += 1;
        }
        assert_eq!(r["delivery_serial"], json!(seq), "{action}: {r}");
    }
    let (st, hist) = s
        .signed(
            Method::GET,
            &format!("/apps/{}/channels/{stream}/history", s.app.id),
            None,
        )
        .await;
    assert_eq!(st, 200, "{hist}");
    assert_eq!(hist["items"][0]["data"], json!("v2+a+b"), "{hist}");
    let (st, r) = s
        .signed(Method::POST, &path("delete"), Some(&json!({})))
        .await;
    assert_eq!(st, 200, "delete: {r}");
    assert_eq!(r["delivery_serial"], json!(5), "{r}");

    // The Pusher face: a trigger reaches a protocol-2 socket with its serial.
    let feed = uniq("orders");
    let mut sub = s.pusher("?protocol=2").await;
    sub.subscribe(&feed, None, None).await;
    trigger(&s, &feed, "order", "{\"n\":1}", None).await;
    let f = sub.expect("order", Some(&feed)).await;
    assert_eq!(f["serial"], json!(1), "{f}");

    // It is all in PostgreSQL.
    assert_eq!(
        db.query(&format!(
            "SELECT count(*) FROM messages WHERE channel_id = '{cid}'"
        ))
        .trim(),
        "4"
    );
    assert_eq!(
        db.query(&format!(
            "SELECT stream_status || ':' || deleted::text FROM messages m JOIN channels c \
             ON c.id = m.channel_id WHERE c.name = '{stream}'"
        ))
        .trim(),
        "closed:true"
    );
}

#[tokio::test]
async fn two_nodes_on_one_postgres_post_to_one_channel_at_once() {
    let db = PgDatabase::fresh();
    let redis = RedisServer::start().await;
    let app = AppCreds::random("1001");
    let node = || {
        TestServer::builder()
            .app(&app)
            .database_url(&db.url())
            .env("SWITCHBOARD_BROKER", &redis.url())
            .env("RUST_LOG", "info")
    };
    let a = node().start().await;
    let b = node().start().await;
    let alice = a.user("alice", "human", "member").await;
    b.create_entity("bob", "Bob", "human", "member").await;
    let bob = b.client("bob", &b.token_for("bob"));
    let ch = alice.create_group(&uniq("busy"), &["bob"], json!({})).await;
    let cid = ch["id"].as_str().expect("channel id").to_owned();

    // 2 × 60 posts, 8 in flight on each node.
    let per_node = 60usize;
    let post_all = |client: switchboard_integration::harness::ApiClient, tag: &'static str| {
        let cid = cid.clone();
        async move {
            let mut out = Vec::new();
            for chunk in (0..per_node).collect::<Vec<_>>().chunks(8) {
                let posts = chunk.iter().map(|i| {
                    let (client, cid) = (client.clone(), cid.clone());
                    async move {
                        let (st, r) = client
                            .post(
                                &format!("/api/channels/{cid}/messages"),
                                &json!({"data": format!("{tag}{i}")}),
                            )
                            .await;
                        assert_eq!(st, 201, "post {tag}{i}: {r}");
                        r
                    }
                });
                out.extend(futures_util::future::join_all(posts).await);
            }
            out
        }
    };
    let (from_a, from_b) =
        futures_util::future::join(post_all(alice.clone(), "a"), post_all(bob, "b")).await;
    let total = 2 * per_node;
    let mut seqs: Vec<i64> = from_a
        .iter()
        .chain(&from_b)
        .map(|r| {
            r["message"]["history_serial"]
                .as_i64()
                .unwrap_or_else(|| panic!("{r}"))
        })
        .collect();
    seqs.sort_unstable();
    assert_eq!(
        seqs,
        (1..=total as i64).collect::<Vec<_>>(),
        "contiguous seqs"
    );

    // In the database: seqs 1..N in cursor order.
    let stored = db.query(&format!(
        "SELECT string_agg(seq::text, ',' ORDER BY cursor) FROM events \
         WHERE channel_id = '{cid}' AND event_type = 'message.created'"
    ));
    let expected: Vec<String> = (1..=total).map(|s| s.to_string()).collect();
    assert_eq!(stored.trim(), expected.join(","));

    // A socket on either node replaying from the start sees every event once, in strictly
    // increasing cursor order.
    for node in [&a, &b] {
        let mut ws = node.ws(&alice.token, Some("0")).await;
        let got = frames_of(&mut ws, "message.created", total).await;
        let mut ids = HashSet::new();
        let mut prev = 0u128;
        for (i, f) in got.iter().enumerate() {
            let c = cursor_num(&cursor_str(&f["cursor"])).expect("cursor");
            assert!(c > prev, "cursor order at {f}");
            prev = c;
            assert!(ids.insert(f["id"].to_string()), "duplicate {f}");
            assert_eq!(f["seq"], json!(i as i64 + 1), "{f}");
        }
    }
}
