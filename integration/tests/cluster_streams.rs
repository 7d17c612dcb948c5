//! Cluster mode: AI token streams (versioned messages, docs/versioned-messages.md) written from
//! several nodes. A stream appended on A, then B, then A again builds one text in order that
//! every node reads; a stream closed on A refuses appends on B as one node does; concurrent
//! appenders on two nodes either succeed or, only when the ChannelActor's retry budget is
//! spent, get 503 `backpressure` with Retry-After — and the text is exactly the acknowledged
//! fragments in seq order (docs/postgres.md, "Seq conflicts: the ChannelActor retries"); a
//! long stream appended from two nodes, whose appends leave the row to the versions between
//! checkpoints, reads whole on every node.
//!
//! Real processes only: nodes on one fresh PostgreSQL database and a Redis of their own.

use std::collections::BTreeMap;
use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};
use switchboard_integration::cluster::{conflicts_seen, Cluster, Tap};
use switchboard_integration::harness::{assert_error, i64_of, str_of, uniq, ApiClient, TestServer};
use switchboard_integration::pg_server::PgDatabase;

/// Replaces the workspace's `ai_transport` limits (through node `s`; the others hear of it
/// through the control notification).
async fn set_ai_transport(s: &TestServer, bytes: u64, appends: u64, open: u64, idle: u64) {
    let ai = json!({
        "max_accumulated_message_bytes": bytes,
        "max_appends_per_message": appends,
        "max_open_streaming_messages_per_channel": open,
        "stream_idle_timeout_seconds": idle,
    });
    let path = format!("/apps/{}/settings", s.app.id);
    let (st, body) = s
        .signed(Method::PATCH, &path, Some(&json!({"ai_transport": ai})))
        .await;
    assert_eq!(st, 200, "PATCH settings: {body}");
    assert_eq!(body["ai_transport"], ai, "{body}");
}

async fn act(c: &ApiClient, cid: &str, serial: &str, action: &str, body: &Value) -> (u16, Value) {
    c.post(
        &format!("/api/channels/{cid}/messages/{serial}/{action}"),
        body,
    )
    .await
}

/// An append through the chat API that must apply; answers the response.
async fn append_ok(c: &ApiClient, cid: &str, serial: &str, data: &str) -> Value {
    let r = act(c, cid, serial, "append", &json!({"data": data})).await;
    assert_eq!(r.0, 200, "{} appends {data:?}: {}", c.id, r.1);
    assert_eq!(r.1["status"], json!("applied"), "{}", r.1);
    assert_eq!(r.1["event"]["type"], json!("message.appended"), "{}", r.1);
    assert_eq!(r.1["event"]["payload"]["fragment"], json!(data), "{}", r.1);
    r.1
}

async fn get_message(c: &ApiClient, cid: &str, serial: &str) -> Value {
    let (st, r) = c
        .get(&format!("/api/channels/{cid}/messages/{serial}"))
        .await;
    assert_eq!(st, 200, "GET {serial} as {}: {r}", c.id);
    r["message"].clone()
}

/// Every version of a message, oldest first (one page is enough for these tests).
async fn versions(c: &ApiClient, cid: &str, serial: &str) -> Vec<Value> {
    let (st, r) = c
        .get(&format!(
            "/api/channels/{cid}/messages/{serial}/versions?direction=oldest_first&limit=100"
        ))
        .await;
    assert_eq!(st, 200, "versions of {serial}: {r}");
    let mut out = r["versions"].as_array().expect("versions").clone();
    let mut cursor = r["next_cursor"].clone();
    let mut more = r["has_more"] == json!(true);
    while more {
        let (st, r) = c
            .get(&format!(
                "/api/channels/{cid}/messages/{serial}/versions?direction=oldest_first&limit=100&cursor={}",
                str_of(&cursor, "next_cursor")
            ))
            .await;
        assert_eq!(st, 200, "versions page of {serial}: {r}");
        out.extend(r["versions"].as_array().expect("versions").iter().cloned());
        cursor = r["next_cursor"].clone();
        more = r["has_more"] == json!(true);
    }
    out
}

/// Message events of `mid` in a socket's frames.
fn message_events<'a>(frames: &'a [Value], mid: &str) -> Vec<&'a Value> {
    frames
        .iter()
        .filter(|f| {
            f["type"]
                .as_str()
                .is_some_and(|t| t.starts_with("message."))
                && f["payload"]["message_id"] == json!(mid)
        })
        .collect()
}

// ------------------------------------------------------------------------- (a)

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_appended_on_a_then_b_then_a_reads_in_order_everywhere() {
    let db = PgDatabase::fresh();
    let c = Cluster::start(&db.url(), 3).await;
    let (a, b, n3) = (c.node(0), c.node(1), c.node(2));
    set_ai_transport(a, 1_048_576, 3, 1024, 600).await;
    let alice_a = a.user("alice", "human", "member").await;
    a.create_entity("bob", "Bob", "human", "member").await;
    let alice_b = b.client("alice", &b.token_for("alice"));
    let alice_c = n3.client("alice", &n3.token_for("alice"));
    let ch = alice_a
        .create_group(&uniq("stream"), &["bob"], json!({}))
        .await;
    let cid = str_of(&ch["id"], "channel id");
    let tap = Tap::start(n3.ws(&alice_c.token, None).await);

    let created = alice_a.say(&cid, "x").await;
    let mid = str_of(&created["message"]["message_serial"], "message_serial");
    // Each answered before the next: A, B, A.
    let r1 = append_ok(&alice_a, &cid, &mid, "1").await;
    let r2 = append_ok(&alice_b, &cid, &mid, "2").await;
    let r3 = append_ok(&alice_a, &cid, &mid, "3").await;
    let seqs: Vec<i64> = [&r1, &r2, &r3]
        .iter()
        .map(|r| i64_of(&r["event"]["seq"], "event seq"))
        .collect();
    assert_eq!(seqs, vec![2, 3, 4], "append seqs follow the create");
    assert_eq!(r3["message"]["data"], json!("x123"), "A's answer: {r3}");
    for (k, (r, len)) in [(&r1, 2), (&r2, 3), (&r3, 4)].into_iter().enumerate() {
        assert_eq!(
            r["event"]["payload"]["length"],
            json!(len),
            "append {k}: {r}"
        );
    }

    // The latest state, read on every node.
    for who in [&alice_a, &alice_b, &alice_c] {
        let m = get_message(who, &cid, &mid).await;
        assert_eq!(m["data"], json!("x123"), "read through {}: {m}", who.id);
        assert_eq!(m["version_serial"], json!("v000000000004"), "{m}");
        assert_eq!(m["deleted"], json!(false), "{m}");
    }
    // The append count is shared: the limit (3) holds on both nodes.
    for who in [&alice_b, &alice_a] {
        let r = act(who, &cid, &mid, "append", &json!({"data": "4"})).await;
        assert_error(&r, 413, "payload_too_large");
    }
    let list = versions(&alice_b, &cid, &mid).await;
    let got: Vec<(String, i64, Value)> = list
        .iter()
        .map(|v| {
            (
                str_of(&v["action"], "action"),
                i64_of(&v["delivery_serial"], "delivery_serial"),
                v["data"].clone(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            ("create".to_owned(), 1, json!("x")),
            ("append".to_owned(), 2, json!("1")),
            ("append".to_owned(), 3, json!("2")),
            ("append".to_owned(), 4, json!("3")),
        ],
        "versions listed on B"
    );
    // Another message has its own count, on either node.
    let other = str_of(
        &alice_b.say(&cid, "y").await["message"]["message_serial"],
        "serial",
    );
    append_ok(&alice_a, &cid, &other, "1").await;
    append_ok(&alice_b, &cid, &other, "2").await;

    // The third node's socket: every version once, seqs contiguous, in order.
    let frames = tap
        .wait_for(Duration::from_secs(10), "every version on node 3", |f| {
            message_events(f, &mid).len() >= 4
        })
        .await;
    // Settle a little: a duplicate would arrive late.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let frames = {
        let later = tap.frames();
        assert!(later.len() >= frames.len());
        later
    };
    let evs = message_events(&frames, &mid);
    let shape: Vec<(String, i64, Value)> = evs
        .iter()
        .map(|f| {
            let p = &f["payload"];
            let text = if f["type"] == json!("message.appended") {
                p["fragment"].clone()
            } else {
                p["data"].clone()
            };
            (str_of(&f["type"], "type"), i64_of(&f["seq"], "seq"), text)
        })
        .collect();
    assert_eq!(
        shape,
        vec![
            ("message.created".to_owned(), 1, json!("x")),
            ("message.appended".to_owned(), 2, json!("1")),
            ("message.appended".to_owned(), 3, json!("2")),
            ("message.appended".to_owned(), 4, json!("3")),
        ],
        "node 3's socket"
    );
    let all_seqs: Vec<i64> = frames
        .iter()
        .filter(|f| f["channel_id"] == json!(cid) && f["seq"].is_i64())
        .map(|f| i64_of(&f["seq"], "seq"))
        .collect();
    assert_eq!(
        all_seqs,
        (1..=all_seqs.len() as i64).collect::<Vec<_>>(),
        "the channel's seqs on node 3 are contiguous, each once"
    );
    assert_eq!(all_seqs.len(), 7, "x, 1, 2, 3, y, y1, y2");
}

// ------------------------------------------------------------------------- (b)

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_deleted_or_closed_on_a_refuses_appends_on_b() {
    let db = PgDatabase::fresh();
    let c = Cluster::start(&db.url(), 2).await;
    let (a, b) = (c.node(0), c.node(1));
    let alice_a = a.user("alice", "human", "member").await;
    a.create_entity("bob", "Bob", "human", "member").await;
    let alice_b = b.client("alice", &b.token_for("alice"));
    let ch = alice_a
        .create_group(&uniq("closing"), &["bob"], json!({}))
        .await;
    let cid = str_of(&ch["id"], "channel id");

    // Deleted on A.
    let del = str_of(
        &alice_a.say(&cid, "partial").await["message"]["message_serial"],
        "serial",
    );
    // Closed on A by a closing append.
    let closed = str_of(
        &alice_a.say(&cid, "answer").await["message"]["message_serial"],
        "serial",
    );
    // B's actor runs and holds both streams in its view.
    append_ok(&alice_b, &cid, &del, " reply").await;
    append_ok(&alice_b, &cid, &closed, " is").await;

    let (st, r) = act(&alice_a, &cid, &del, "delete", &json!({})).await;
    assert_eq!(st, 200, "delete on A: {r}");
    let (st, r) = act(
        &alice_a,
        &cid,
        &closed,
        "append",
        &json!({"data": " 42", "extras": {"status": "complete"}}),
    )
    .await;
    assert_eq!(st, 200, "closing append on A: {r}");

    let before_del = versions(&alice_a, &cid, &del).await.len();
    let before_closed = versions(&alice_a, &cid, &closed).await.len();
    // Refused on B with the code one node gives (400 invalid_input), changing nothing.
    let r = act(&alice_b, &cid, &del, "append", &json!({"data": " more"})).await;
    assert_error(&r, 400, "invalid_input");
    let r = act(&alice_b, &cid, &closed, "append", &json!({"data": " more"})).await;
    assert_error(&r, 400, "invalid_input");
    // And on A (the single-node answer, for comparison).
    let r = act(&alice_a, &cid, &del, "append", &json!({"data": " more"})).await;
    assert_error(&r, 400, "invalid_input");
    let r = act(&alice_a, &cid, &closed, "append", &json!({"data": " more"})).await;
    assert_error(&r, 400, "invalid_input");

    assert_eq!(versions(&alice_b, &cid, &del).await.len(), before_del);
    assert_eq!(versions(&alice_b, &cid, &closed).await.len(), before_closed);
    let m = get_message(&alice_b, &cid, &del).await;
    assert_eq!(m["deleted"], json!(true), "{m}");
    let m = get_message(&alice_b, &cid, &closed).await;
    assert_eq!(m["data"], json!("answer is 42"), "{m}");
}

// ------------------------------------------------------------------------- (c)

const PER_NODE: usize = 50;
const IN_FLIGHT: usize = 4;
const ROUNDS: usize = 3;
const PREFIX: &str = "<start>";

/// What one append answered.
enum Answer {
    Applied { seq: i64 },
    Backpressure,
}

/// One append with the raw HTTP answer (for Retry-After).
async fn append_raw(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    path: &str,
    frag: &str,
) -> Answer {
    let resp = http
        .post(format!("{base}{path}"))
        .bearer_auth(token)
        .json(&json!({"data": frag}))
        .send()
        .await
        .unwrap_or_else(|e| panic!("append {frag}: {e}"));
    let status = resp.status().as_u16();
    let retry_after = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body: Value = resp.json().await.expect("JSON body");
    match status {
        200 => {
            assert_eq!(body["status"], json!("applied"), "{frag}: {body}");
            assert_eq!(body["event"]["payload"]["fragment"], json!(frag), "{body}");
            Answer::Applied {
                seq: i64_of(&body["event"]["seq"], "event seq"),
            }
        }
        503 => {
            assert_error(&(status, body.clone()), 503, "backpressure");
            let ra = retry_after.unwrap_or_else(|| panic!("503 without Retry-After: {body}"));
            assert!(
                ra.parse::<u64>().is_ok_and(|s| s >= 1),
                "Retry-After {ra:?}"
            );
            Answer::Backpressure
        }
        other => panic!("append {frag}: {other} {body}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_appends_from_two_nodes_succeed_or_back_off_cleanly() {
    let db = PgDatabase::fresh();
    let c = Cluster::start(&db.url(), 2).await;
    let (a, b) = (c.node(0), c.node(1));
    set_ai_transport(a, 1_048_576, 4096, 1024, 600).await;
    let alice_a = a.user("alice", "human", "member").await;
    a.create_entity("bob", "Bob", "human", "member").await;
    let alice_b = b.client("alice", &b.token_for("alice"));
    let ch = alice_a
        .create_group(&uniq("race"), &["bob"], json!({}))
        .await;
    let cid = str_of(&ch["id"], "channel id");
    let http = reqwest::Client::new();

    let mut backpressure_total = 0usize;
    for round in 0..ROUNDS {
        let mid = str_of(
            &alice_a.say(&cid, PREFIX).await["message"]["message_serial"],
            "serial",
        );
        // Both nodes' actors know the stream before the race.
        append_ok(&alice_a, &cid, &mid, "<a>").await;
        append_ok(&alice_b, &cid, &mid, "<b>").await;
        let path = format!("/api/channels/{cid}/messages/{mid}/append");
        let mut workers = Vec::new();
        for (node, client, base) in [
            (0usize, &alice_a, a.base_url()),
            (1, &alice_b, b.base_url()),
        ] {
            for w in 0..IN_FLIGHT {
                let (http, token, path, base) = (
                    http.clone(),
                    client.token.clone(),
                    path.clone(),
                    base.clone(),
                );
                workers.push(tokio::spawn(async move {
                    let mut out = Vec::new();
                    for i in (w..PER_NODE).step_by(IN_FLIGHT) {
                        let frag = format!("[{node}.{i:03}]");
                        let answer = append_raw(&http, &base, &token, &path, &frag).await;
                        out.push((frag, answer));
                    }
                    out
                }));
            }
        }
        let mut applied: BTreeMap<i64, String> = BTreeMap::new();
        let mut refused = Vec::new();
        for w in workers {
            for (frag, answer) in w.await.expect("appender") {
                match answer {
                    Answer::Applied { seq } => {
                        if let Some(prev) = applied.insert(seq, frag.clone()) {
                            panic!("seq {seq} acknowledged twice: {prev} and {frag}");
                        }
                    }
                    Answer::Backpressure => refused.push(frag),
                }
            }
        }
        backpressure_total += refused.len();
        eprintln!(
            "round {round}: {} applied, {} answered 503 backpressure {refused:?}",
            applied.len(),
            refused.len()
        );
        assert_eq!(applied.len() + refused.len(), 2 * PER_NODE);

        // The final text: the acknowledged fragments in seq order, on both nodes.
        let want = format!(
            "{PREFIX}<a><b>{}",
            applied.values().cloned().collect::<String>()
        );
        for who in [&alice_a, &alice_b] {
            let m = get_message(who, &cid, &mid).await;
            assert_eq!(m["data"], json!(want), "final text read through {}", who.id);
        }
        // The versions: create, the two warm-ups, then exactly the acknowledged appends at
        // their seqs, contiguous, no duplicate.
        let list = versions(&alice_a, &cid, &mid).await;
        assert_eq!(list.len(), 3 + applied.len(), "versions of round {round}");
        let first = i64_of(&list[0]["delivery_serial"], "delivery_serial");
        for (k, v) in list.iter().enumerate() {
            assert_eq!(
                i64_of(&v["delivery_serial"], "delivery_serial"),
                first + k as i64,
                "contiguous: {v}"
            );
        }
        for v in &list[3..] {
            let seq = i64_of(&v["delivery_serial"], "delivery_serial");
            assert_eq!(
                applied.get(&seq).map(|f| json!(f)),
                Some(v["data"].clone()),
                "the version at {seq} is the fragment acknowledged with it"
            );
        }
    }
    eprintln!(
        "cluster_streams: {backpressure_total} of {} concurrent appends answered 503",
        ROUNDS * 2 * PER_NODE
    );
    let conflicts = conflicts_seen(a).await + conflicts_seen(b).await;
    eprintln!("cluster_streams: {conflicts} writes refused or renumbered for the other node");
    assert!(
        conflicts > 0,
        "the two nodes never contended for the stream"
    );
}

// ------------------------------------------------------------------------- (d)

/// A stream past a few KiB whose appends alternate between two nodes: its appends between
/// checkpoints leave the message row to the versions (docs/versioned-messages.md, "Stored
/// text of a long stream"), and each node that takes over reads the row and folds them in.
/// Every node reads the whole text and the last version, before and after the close.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_long_stream_appended_from_two_nodes_reads_whole_everywhere() {
    let db = PgDatabase::fresh();
    let c = Cluster::start(&db.url(), 3).await;
    let (a, b, n3) = (c.node(0), c.node(1), c.node(2));
    let alice_a = a.user("alice", "human", "member").await;
    a.create_entity("bob", "Bob", "human", "member").await;
    let alice_b = b.client("alice", &b.token_for("alice"));
    let alice_c = n3.client("alice", &n3.token_for("alice"));
    let ch = alice_a
        .create_group(&uniq("long"), &["bob"], json!({}))
        .await;
    let cid = str_of(&ch["id"], "channel id");
    let mid = str_of(
        &alice_a.say(&cid, "<").await["message"]["message_serial"],
        "message_serial",
    );
    // 100-byte fragments, ten on A, ten on B, …: 12 KB, past the inline 2 KiB and one
    // checkpoint (8 KiB).
    let mut text = String::from("<");
    let mut last = Value::Null;
    for i in 0..120 {
        let f = format!("{i:05}{}", "y".repeat(95));
        text.push_str(&f);
        let who = if (i / 10) % 2 == 0 {
            &alice_a
        } else {
            &alice_b
        };
        last = append_ok(who, &cid, &mid, &f).await;
        assert_eq!(last["event"]["payload"]["length"], json!(text.len()));
    }
    assert_eq!(last["event"]["seq"], json!(121));
    for who in [&alice_a, &alice_b, &alice_c] {
        let m = get_message(who, &cid, &mid).await;
        assert_eq!(str_of(&m["data"], "data"), text, "read through {}", who.id);
        assert_eq!(m["version_serial"], json!("v000000000121"), "{}", who.id);
        assert_eq!(m["stream_status"], json!("open"), "{}", who.id);
    }
    let closed = act(
        &alice_b,
        &cid,
        &mid,
        "append",
        &json!({"data": "", "extras": {"status": "complete"}}),
    )
    .await;
    assert_eq!(closed.0, 200, "{}", closed.1);
    for who in [&alice_a, &alice_b, &alice_c] {
        let m = get_message(who, &cid, &mid).await;
        assert_eq!(str_of(&m["data"], "data"), text, "read through {}", who.id);
        assert_eq!(m["version_serial"], json!("v000000000122"), "{}", who.id);
        assert_eq!(m["stream_status"], json!("closed"), "{}", who.id);
        assert_eq!(m["extras"], json!({"status": "complete"}), "{}", who.id);
    }
}
