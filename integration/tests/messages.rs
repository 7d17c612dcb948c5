//! Messages: create shape and contiguous seqs, nonce idempotency, threads, attachments,
//! reactions and read pointers.

use std::time::Duration;

use serde_json::{json, Value};
use switchboard_integration::harness::{
    assert_error, cursor_num, cursor_str, of_type, urlencode, TestServer,
};

const MESSAGE_FIELDS: &[&str] = &[
    "message_serial",
    "history_serial",
    "version_serial",
    "channel_id",
    "sender",
    "name",
    "data",
    "extras",
    "thread_id",
    "content_ref",
    "attachments",
    "tags",
    "metadata",
    "nonce",
    "deleted",
    "created_at",
    "updated_at",
];

const EVENT_FIELDS: &[&str] = &[
    "id",
    "cursor",
    "type",
    "workspace_id",
    "channel_id",
    "seq",
    "created_at",
    "payload",
];

fn serial(v: &Value) -> String {
    v["message_serial"]
        .as_str()
        .unwrap_or_else(|| panic!("message_serial is a string: {v}"))
        .to_owned()
}

#[tokio::test]
async fn post_shape_and_contiguous_seqs() {
    let s = TestServer::start().await;
    let alice = s.user("alice", "human", "member").await;
    s.create_entity("bob", "Bob", "human", "member").await;
    let ch = alice.create_group("room", &["bob"], json!({})).await;
    let cid = ch["id"].as_str().expect("id").to_owned();

    let first = alice
        .post_message(
            &cid,
            &json!({"data": "hello", "extras": {"x": 1}, "tags": ["t1"],
                    "metadata": {"m": "v"}, "content_ref": "doc-1",
                    "attachments": ["doc-2"], "nonce": "n-first"}),
        )
        .await;
    let m = &first["message"];
    for f in MESSAGE_FIELDS {
        assert!(
            m.as_object().is_some_and(|o| o.contains_key(*f)),
            "message has {f}: {m}"
        );
    }
    assert_eq!(m["history_serial"], json!(1), "{m}");
    assert_eq!(m["channel_id"], json!(cid), "{m}");
    assert_eq!(m["sender"], json!("alice"), "{m}");
    assert_eq!(m["data"], json!("hello"), "{m}");
    assert_eq!(m["extras"], json!({"x": 1}), "{m}");
    assert_eq!(m["tags"], json!(["t1"]), "{m}");
    assert_eq!(m["metadata"], json!({"m": "v"}), "{m}");
    assert_eq!(m["content_ref"], json!("doc-1"), "{m}");
    assert_eq!(m["attachments"], json!(["doc-2"]), "{m}");
    assert_eq!(m["nonce"], json!("n-first"), "{m}");
    assert_eq!(m["deleted"], json!(false), "{m}");
    assert!(m["thread_id"].is_null(), "{m}");
    let ser = serial(m);
    assert!(!ser.is_empty() && ser.len() <= 128 && !ser.contains(char::is_whitespace));

    let ev = &first["event"];
    for f in EVENT_FIELDS {
        assert!(
            ev.as_object().is_some_and(|o| o.contains_key(*f)),
            "event has {f}: {ev}"
        );
    }
    assert_eq!(ev["type"], json!("message.created"), "{ev}");
    assert_eq!(ev["workspace_id"], json!(s.app.id), "{ev}");
    assert_eq!(ev["channel_id"], json!(cid), "{ev}");
    assert_eq!(ev["seq"], json!(1), "{ev}");
    assert_eq!(ev["payload"]["message_id"], json!(ser), "{ev}");
    assert_eq!(ev["payload"]["author_id"], json!("alice"), "{ev}");
    assert_eq!(ev["payload"]["nonce"], json!("n-first"), "{ev}");
    assert_eq!(ev["payload"]["data"], json!("hello"), "{ev}");

    // Contiguous seqs, increasing cursors.
    let mut cursors = vec![cursor_str(&ev["cursor"])];
    for i in 2..=6 {
        let r = alice.say(&cid, &format!("m{i}")).await;
        assert_eq!(r["message"]["history_serial"], json!(i));
        assert_eq!(r["event"]["seq"], json!(i));
        cursors.push(cursor_str(&r["event"]["cursor"]));
    }
    let pulled: Vec<String> = alice
        .pull_all(None)
        .await
        .iter()
        .filter(|e| e["type"] == json!("message.created"))
        .map(|e| cursor_str(&e["cursor"]))
        .collect();
    assert_eq!(
        pulled, cursors,
        "pull replay lists the creates in post order"
    );
    if let Some(nums) = cursors
        .iter()
        .map(|c| cursor_num(c))
        .collect::<Option<Vec<_>>>()
    {
        assert!(nums.windows(2).all(|w| w[0] < w[1]), "{cursors:?}");
    }

    // GET one message; GET the list (oldest first).
    let (st, one) = alice
        .get(&format!("/api/channels/{cid}/messages/{ser}"))
        .await;
    assert_eq!(st, 200, "{one}");
    assert_eq!(one["message"]["data"], json!("hello"));
    let list = alice.messages(&cid).await;
    let seqs: Vec<i64> = list
        .iter()
        .filter_map(|m| m["history_serial"].as_i64())
        .collect();
    assert_eq!(seqs, (1..=6).collect::<Vec<_>>());
    assert_error(
        &alice
            .get(&format!("/api/channels/{cid}/messages/no-such-serial"))
            .await,
        404,
        "not_found",
    );
    // The channel's last_seq follows.
    assert_eq!(alice.channel(&cid).await["last_seq"], json!(6));

    // JSON data is accepted as is.
    let r = alice
        .post_message(&cid, &json!({"data": {"k": [1, 2]}, "name": "custom"}))
        .await;
    assert_eq!(r["message"]["data"], json!({"k": [1, 2]}));
    assert_eq!(r["message"]["name"], json!("custom"));
}

#[tokio::test]
async fn nonce_replay_is_idempotent() {
    let s = TestServer::start().await;
    let alice = s.user("alice", "human", "member").await;
    let bob = s.user("bob", "human", "member").await;
    let ch = alice.create_group("nonce", &["bob"], json!({})).await;
    let cid = ch["id"].as_str().expect("id").to_owned();

    let body = json!({"data": "once", "nonce": "abc-123"});
    let first = alice.post_message(&cid, &body).await;
    let ser = serial(&first["message"]);
    let events_before = alice.pull_all(None).await.len();

    let (st, again) = alice
        .post(&format!("/api/channels/{cid}/messages"), &body)
        .await;
    assert_eq!(st, 200, "nonce replay answers 200: {again}");
    assert_eq!(serial(&again["message"]), ser);
    assert_eq!(again["message"]["history_serial"], json!(1));
    assert_eq!(
        alice.pull_all(None).await.len(),
        events_before,
        "a nonce replay emits no event"
    );
    assert_eq!(alice.messages(&cid).await.len(), 1);

    // Same nonce from another sender is another message.
    let other = bob.post_message(&cid, &body).await;
    assert_ne!(serial(&other["message"]), ser);
    assert_eq!(other["message"]["history_serial"], json!(2));
    // The next fresh post continues the seq with no hole.
    let next = alice.say(&cid, "next").await;
    assert_eq!(next["message"]["history_serial"], json!(3));

    // A nonce longer than 128 bytes is invalid.
    assert_error(
        &alice
            .post(
                &format!("/api/channels/{cid}/messages"),
                &json!({"data": "x", "nonce": "n".repeat(129)}),
            )
            .await,
        400,
        "invalid_input",
    );
}

#[tokio::test]
async fn threads_are_one_level() {
    let s = TestServer::start().await;
    let alice = s.user("alice", "human", "member").await;
    let bob = s.user("bob", "human", "member").await;
    let ch = alice.create_group("threads", &["bob"], json!({})).await;
    let cid = ch["id"].as_str().expect("id").to_owned();

    let root = alice.say(&cid, "root").await;
    let root_ser = serial(&root["message"]);
    let other_root = alice.say(&cid, "other root").await;
    let reply = bob
        .post_message(&cid, &json!({"data": "reply", "thread_id": root_ser}))
        .await;
    let reply_msg = &reply["message"];
    assert_eq!(reply_msg["thread_id"], json!(root_ser), "{reply_msg}");
    assert_eq!(reply_msg["history_serial"], json!(3));
    let reply_ser = serial(reply_msg);

    // Nested reply.
    assert_error(
        &alice
            .post(
                &format!("/api/channels/{cid}/messages"),
                &json!({"data": "nested", "thread_id": reply_ser}),
            )
            .await,
        400,
        "invalid_input",
    );

    // Roots only in the channel list.
    let roots: Vec<String> = alice.messages(&cid).await.iter().map(serial).collect();
    assert_eq!(
        roots,
        vec![root_ser.clone(), serial(&other_root["message"])]
    );

    // The thread lists the reply.
    let (st, thread) = alice
        .get(&format!("/api/channels/{cid}/messages/{root_ser}/thread"))
        .await;
    assert_eq!(st, 200, "{thread}");
    assert_eq!(serial(&thread["root"]), root_ser, "{thread}");
    assert_eq!(thread["root"]["reply_count"], json!(1), "{thread}");
    let in_thread: Vec<String> = thread["replies"]
        .as_array()
        .unwrap_or_else(|| panic!("thread has replies: {thread}"))
        .iter()
        .map(serial)
        .collect();
    assert_eq!(in_thread, vec![reply_ser.clone()], "{thread}");

    // The reply emitted thread events carrying the root's history_serial.
    let events = alice.pull_all(None).await;
    let rc = of_type(&events, "thread.reply_created");
    assert_eq!(rc.len(), 1, "{events:?}");
    assert_eq!(rc[0]["seq"], json!(1), "{:?}", rc[0]);
    assert_eq!(rc[0]["channel_id"], json!(cid));
    assert_eq!(
        of_type(&events, "thread.state_updated").len(),
        1,
        "{events:?}"
    );
    // The rejected nested reply left no event and no seq behind.
    assert_eq!(of_type(&events, "message.created").len(), 3);
    assert_eq!(alice.say(&cid, "after").await["event"]["seq"], json!(4));
}

#[tokio::test]
async fn attachments_cap_is_100() {
    let s = TestServer::start().await;
    let alice = s.user("alice", "human", "member").await;
    s.create_entity("bob", "Bob", "human", "member").await;
    let ch = alice.create_group("files", &["bob"], json!({})).await;
    let cid = ch["id"].as_str().expect("id").to_owned();

    let hundred: Vec<String> = (0..100).map(|i| format!("doc-{i}")).collect();
    let ok = alice
        .post_message(&cid, &json!({"data": "files", "attachments": hundred}))
        .await;
    assert_eq!(
        ok["message"]["attachments"].as_array().map(Vec::len),
        Some(100)
    );

    let too_many: Vec<String> = (0..101).map(|i| format!("doc-{i}")).collect();
    assert_error(
        &alice
            .post(
                &format!("/api/channels/{cid}/messages"),
                &json!({"data": "files", "attachments": too_many}),
            )
            .await,
        400,
        "limit_exceeded",
    );
    assert_eq!(alice.messages(&cid).await.len(), 1);
}

#[tokio::test]
async fn reactions_emit_events() {
    let s = TestServer::start().await;
    let alice = s.user("alice", "human", "member").await;
    let bob = s.user("bob", "human", "member").await;
    let ch = alice.create_group("reacts", &["bob"], json!({})).await;
    let cid = ch["id"].as_str().expect("id").to_owned();
    alice.say(&cid, "first").await;
    let msg = alice.say(&cid, "react to me").await;
    let ser = serial(&msg["message"]);

    let mut ws = s.ws(&alice.token, None).await;
    let emoji = "👍";
    let (st, body) = bob
        .post(
            &format!("/api/channels/{cid}/messages/{ser}/reactions"),
            &json!({"emoji": emoji}),
        )
        .await;
    assert!(st == 200 || st == 201, "add reaction: {st} {body}");
    let frames = ws
        .collect_until(Duration::from_secs(10), |f| {
            f["type"] == json!("reaction.added")
        })
        .await;
    let ev = frames.last().expect("reaction.added");
    assert_eq!(ev["channel_id"], json!(cid), "{ev}");
    assert_eq!(
        ev["seq"],
        json!(2),
        "reaction carries the message's history_serial: {ev}"
    );
    assert_eq!(ev["payload"]["message_id"], json!(ser), "{ev}");
    assert_eq!(ev["payload"]["emoji"], json!(emoji), "{ev}");
    assert_eq!(ev["payload"]["user_id"], json!("bob"), "{ev}");

    let (st, body) = bob
        .delete(&format!(
            "/api/channels/{cid}/messages/{ser}/reactions/{}",
            urlencode(emoji)
        ))
        .await;
    assert_eq!(st, 200, "remove reaction: {body}");
    let frames = ws
        .collect_until(Duration::from_secs(10), |f| {
            f["type"] == json!("reaction.removed")
        })
        .await;
    let ev = frames.last().expect("reaction.removed");
    assert_eq!(ev["payload"]["message_id"], json!(ser), "{ev}");
    assert_eq!(ev["payload"]["emoji"], json!(emoji), "{ev}");
    assert_eq!(ev["payload"]["user_id"], json!("bob"), "{ev}");

    // Reactions take no channel seq.
    assert_eq!(alice.say(&cid, "third").await["event"]["seq"], json!(3));
    // Both reaction events are durable.
    let events = alice.pull_all(None).await;
    assert_eq!(of_type(&events, "reaction.added").len(), 1);
    assert_eq!(of_type(&events, "reaction.removed").len(), 1);

    // Reacting to an unknown message.
    assert_error(
        &bob.post(
            &format!("/api/channels/{cid}/messages/nope/reactions"),
            &json!({"emoji": emoji}),
        )
        .await,
        404,
        "not_found",
    );
}

#[tokio::test]
async fn read_pointers_are_monotonic_and_capped() {
    let s = TestServer::start().await;
    let alice = s.user("alice", "human", "member").await;
    let bob = s.user("bob", "human", "member").await;
    let ch = alice.create_group("reading", &["bob"], json!({})).await;
    let cid = ch["id"].as_str().expect("id").to_owned();
    for i in 0..3 {
        alice.say(&cid, &format!("m{i}")).await;
    }
    let mut bob_ws = s.ws(&bob.token, None).await;
    let read = |seq: i64| {
        let bob = bob.clone();
        let cid = cid.clone();
        async move {
            let (st, body) = bob
                .post(&format!("/api/channels/{cid}/read"), &json!({"seq": seq}))
                .await;
            assert_eq!(st, 200, "read {seq}: {body}");
            bob.channel(&cid).await["last_read_seq"].clone()
        }
    };
    assert_eq!(read(2).await, json!(2));
    let frames = bob_ws
        .collect_until(Duration::from_secs(10), |f| {
            f["type"] == json!("channel.read")
        })
        .await;
    let ev = frames.last().expect("channel.read");
    assert_eq!(ev["seq"], json!(2), "{ev}");
    assert_eq!(ev["payload"]["user_id"], json!("bob"), "{ev}");
    assert_eq!(ev["payload"]["channel_id"], json!(cid), "{ev}");
    assert_eq!(ev["payload"]["last_read_seq"], json!(2), "{ev}");
    // Never backwards.
    assert_eq!(read(1).await, json!(2));
    // Capped at the channel's last seq.
    assert_eq!(read(999).await, json!(3));
    let frames = bob_ws
        .collect_until(Duration::from_secs(10), |f| {
            f["type"] == json!("channel.read") && f["payload"]["last_read_seq"] == json!(3)
        })
        .await;
    assert!(
        frames.iter().all(
            |f| f["type"] != json!("channel.read") || f["payload"]["last_read_seq"] != json!(1)
        ),
        "a backwards read emits nothing that moves the pointer back: {frames:?}"
    );
    // Bad seq values.
    assert_error(
        &bob.post(&format!("/api/channels/{cid}/read"), &json!({"seq": -1}))
            .await,
        400,
        "invalid_input",
    );
    assert_error(
        &bob.post(&format!("/api/channels/{cid}/read"), &json!({"seq": "two"}))
            .await,
        400,
        "invalid_input",
    );
    assert_eq!(bob.channel(&cid).await["last_read_seq"], json!(3));
}
