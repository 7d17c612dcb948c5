//! `/api/realtime/ws` ready frame and replay-then-live; `/api/realtime/events` paging.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use serde_json::{json, Value};
use switchboard_integration::harness::{
    assert_error, cursor_num, cursor_str, ApiClient, Frame, TestServer,
};

fn event_id(e: &Value) -> String {
    match &e["id"] {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        other => panic!("event id: {other} in {e}"),
    }
}

#[tokio::test]
async fn ready_frame_then_live() {
    let s = TestServer::start().await;
    let alice = s.user("alice", "human", "member").await;
    s.create_entity("bob", "Bob", "human", "member").await;
    let ch = alice.create_group("live", &["bob"], json!({})).await;
    let cid = ch["id"].as_str().expect("id").to_owned();
    let before = alice.say(&cid, "before connect").await;

    // No after_cursor: ready carries the tail, then live only (no replay).
    let mut ws = s.ws(&alice.token, None).await;
    let ready = ws.ready_cursor.clone().expect("ready cursor");
    assert_eq!(
        ready,
        cursor_str(&before["event"]["cursor"]),
        "ready cursor is the tail at connect"
    );
    assert!(matches!(
        ws.next_frame(Duration::from_millis(300)).await,
        Frame::Timeout
    ));
    let live = alice.say(&cid, "live one").await;
    let ev = ws.next_json(Duration::from_secs(10)).await;
    assert_eq!(ev["type"], json!("message.created"), "{ev}");
    assert_eq!(ev["id"], live["event"]["id"], "{ev}");
    assert_eq!(ev["cursor"], live["event"]["cursor"], "{ev}");
    assert_eq!(ev["seq"], json!(2), "{ev}");
    assert_eq!(ev["payload"]["data"], json!("live one"), "{ev}");
    assert_eq!(
        ev["payload"]["message_id"],
        live["message"]["message_serial"]
    );

    // With after_cursor: replay of what came after, then live.
    let mut ws2 = s.ws(&alice.token, Some(&ready)).await;
    let replayed = ws2.next_json(Duration::from_secs(10)).await;
    assert_eq!(replayed["id"], live["event"]["id"], "{replayed}");
    assert_eq!(
        ws2.ready_cursor.as_deref(),
        Some(cursor_str(&live["event"]["cursor"]).as_str())
    );
    // workspace_id must match the token's workspace when given.
    let ok = s
        .ws_connect(switchboard_integration::harness::WsOpts {
            token: Some(alice.token.clone()),
            workspace_id: Some(s.app.id.clone()),
            ..Default::default()
        })
        .await;
    assert!(ok.is_ok(), "matching workspace_id accepted: {:?}", ok.err());
    let bad = s
        .ws_connect(switchboard_integration::harness::WsOpts {
            token: Some(alice.token.clone()),
            workspace_id: Some("999999".to_owned()),
            ..Default::default()
        })
        .await;
    match bad {
        Err(switchboard_integration::harness::WsConnectError::Http(st, _)) => {
            assert!(
                st == 403 || st == 401 || st == 404,
                "mismatched workspace_id: {st}"
            )
        }
        Ok(mut c) => {
            let (_f, code) = c.read_until_close(Duration::from_secs(5)).await;
            assert!(code.is_some(), "mismatched workspace_id closes the socket");
        }
        Err(e) => panic!("{e:?}"),
    }
    // No token: refused.
    match s
        .ws_connect(switchboard_integration::harness::WsOpts::default())
        .await
    {
        Err(switchboard_integration::harness::WsConnectError::Http(st, _)) => assert_eq!(st, 401),
        other => panic!(
            "a socket without a token is refused with 401, got {:?}",
            other.map(|_| ())
        ),
    }
}

async fn poster(client: ApiClient, channel: String, tag: String, n: usize) -> Vec<Value> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let r = client.say(&channel, &format!("{tag}-{i}")).await;
        out.push(r["event"].clone());
    }
    out
}

#[tokio::test]
async fn replay_then_live_under_concurrent_posting() {
    let s = TestServer::start().await;
    let alice = s.user("alice", "human", "member").await;
    let bob = s.user("bob", "human", "member").await;
    let ch1 = alice
        .create_group("busy-public", &["bob"], json!({"visibility": "public"}))
        .await;
    let ch2 = alice
        .create_group("busy-private", &["bob"], json!({}))
        .await;
    let c1 = ch1["id"].as_str().expect("id").to_owned();
    let c2 = ch2["id"].as_str().expect("id").to_owned();

    // 20 messages before; resume from the middle.
    let mut pre = Vec::new();
    for i in 0..20 {
        pre.push(alice.say(&c1, &format!("pre-{i}")).await);
    }
    let mid = cursor_str(&pre[9]["event"]["cursor"]);

    // 4 concurrent posters × 50 messages; the socket connects while they run.
    let tasks = vec![
        tokio::spawn(poster(alice.clone(), c1.clone(), "a1".into(), 50)),
        tokio::spawn(poster(bob.clone(), c1.clone(), "b1".into(), 50)),
        tokio::spawn(poster(alice.clone(), c2.clone(), "a2".into(), 50)),
        tokio::spawn(poster(bob.clone(), c2.clone(), "b2".into(), 50)),
    ];
    tokio::time::sleep(Duration::from_millis(150)).await;
    let mut ws = s.ws(&alice.token, Some(&mid)).await;
    let mut posted: Vec<Value> = Vec::new();
    for t in tasks {
        posted.extend(t.await.expect("poster task"));
    }
    assert_eq!(posted.len(), 200);

    // The reference: pull replay after the same cursor, for the same viewer.
    let pulled = alice.pull_all(Some(&mid)).await;
    let pulled_ids: Vec<String> = pulled.iter().map(event_id).collect();
    let pulled_set: HashSet<&String> = pulled_ids.iter().collect();
    assert_eq!(
        pulled_set.len(),
        pulled_ids.len(),
        "pull replay has no duplicate"
    );
    for e in posted.iter().chain(pre[10..].iter().map(|r| &r["event"])) {
        assert!(
            pulled_set.contains(&event_id(e)),
            "every answered post is in the log after mid: {e}"
        );
    }
    assert_eq!(pulled.len(), 210, "exactly the 210 creates follow mid");

    // Read the socket until it has delivered as many events as the log holds.
    let last_id = pulled_ids.last().expect("non-empty").clone();
    let frames = ws
        .collect_until(Duration::from_secs(30), |f| event_id(f) == last_id)
        .await;
    // Nothing extra trails.
    let extra = ws.drain(Duration::from_millis(300)).await;
    assert!(extra.is_empty(), "no event after the last one: {extra:?}");

    let ws_ids: Vec<String> = frames.iter().map(event_id).collect();
    assert_eq!(
        ws_ids, pulled_ids,
        "socket delivered exactly the log after mid, each once, in cursor order"
    );
    // Cursor order strictly increasing (as the server orders them; numerically too when
    // cursors are decimal strings).
    let cursors: Vec<String> = frames.iter().map(|f| cursor_str(&f["cursor"])).collect();
    if let Some(nums) = cursors
        .iter()
        .map(|c| cursor_num(c))
        .collect::<Option<Vec<_>>>()
    {
        assert!(nums.windows(2).all(|w| w[0] < w[1]), "{cursors:?}");
    }
    assert!(cursors.iter().all(|c| *c != mid));

    // Per channel, seqs contiguous with no gap and no duplicate.
    let mut per: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for f in &frames {
        assert_eq!(f["type"], json!("message.created"), "{f}");
        per.entry(f["channel_id"].as_str().expect("channel_id").to_owned())
            .or_default()
            .push(f["seq"].as_i64().expect("seq"));
    }
    assert_eq!(per.get(&c1), Some(&(11..=120).collect::<Vec<_>>()));
    assert_eq!(per.get(&c2), Some(&(1..=100).collect::<Vec<_>>()));
}

/// The server reads a replay in pages of 500 and writes the next page once the socket has
/// taken the last: 1,300 events behind, with posting going on while the socket connects,
/// still arrive exactly once each, in cursor order, and live events follow.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replay_of_several_pages_then_live() {
    let s = TestServer::start().await;
    let alice = s.user("alice", "human", "member").await;
    let bob = s.user("bob", "human", "member").await;
    let ch = alice
        .create_group("pages", &["bob"], json!({"visibility": "public"}))
        .await;
    let cid = ch["id"].as_str().expect("id").to_owned();
    let before = s.ws(&bob.token, None).await;
    let from = before.ready_cursor.clone().expect("ready cursor");
    before.close().await;
    let behind: Vec<_> = (0..4)
        .map(|t| tokio::spawn(poster(alice.clone(), cid.clone(), format!("pre{t}"), 325)))
        .collect();
    for t in behind {
        t.await.expect("poster task");
    }
    let live: Vec<_> = (0..2)
        .map(|t| tokio::spawn(poster(alice.clone(), cid.clone(), format!("live{t}"), 40)))
        .collect();
    let mut ws = s.ws(&bob.token, Some(&from)).await;
    for t in live {
        t.await.expect("poster task");
    }
    let pulled = bob.pull_all(Some(&from)).await;
    assert_eq!(
        pulled.len(),
        1380,
        "the log after the cursor: 1,300 + 80 posts"
    );
    let last_id = event_id(pulled.last().expect("non-empty"));
    let frames = ws
        .collect_until(Duration::from_secs(30), |f| event_id(f) == last_id)
        .await;
    let extra = ws.drain(Duration::from_millis(300)).await;
    assert!(extra.is_empty(), "no event after the last one: {extra:?}");
    let got: Vec<String> = frames.iter().map(event_id).collect();
    let want: Vec<String> = pulled.iter().map(event_id).collect();
    assert_eq!(
        got, want,
        "each event once, in cursor order, replay then live"
    );
    let seqs: Vec<i64> = frames
        .iter()
        .map(|f| f["seq"].as_i64().expect("seq"))
        .collect();
    assert_eq!(seqs, (1..=1380).collect::<Vec<_>>());
}

#[tokio::test]
async fn pull_paging() {
    let s = TestServer::start().await;
    let alice = s.user("alice", "human", "member").await;
    s.create_entity("bob", "Bob", "human", "member").await;
    let ch = alice.create_group("paging", &["bob"], json!({})).await;
    let cid = ch["id"].as_str().expect("id").to_owned();
    let first = alice.say(&cid, "m0").await;
    let start = cursor_str(&first["event"]["cursor"]);
    let mut expected = Vec::new();
    for i in 1..=7 {
        expected.push(alice.say(&cid, &format!("m{i}")).await["event"]["id"].clone());
    }

    // Pages of 3 after `start`: 3, 3, 1, then empty; next_cursor never null.
    let mut cursor = start.clone();
    let mut got = Vec::new();
    let mut sizes = Vec::new();
    for _ in 0..6 {
        let (st, page) = alice.events_page(Some(&cursor), 3).await;
        assert_eq!(st, 200, "{page}");
        assert!(
            !page["next_cursor"].is_null(),
            "next_cursor never null: {page}"
        );
        let evs = page["events"].as_array().expect("events").clone();
        sizes.push(evs.len());
        if evs.is_empty() {
            assert_eq!(
                cursor_str(&page["next_cursor"]),
                cursor,
                "an empty page hands the same cursor back"
            );
            break;
        }
        assert_eq!(
            page["next_cursor"],
            evs.last().expect("last")["cursor"],
            "next_cursor is the last event's cursor: {page}"
        );
        got.extend(evs.iter().map(|e| e["id"].clone()));
        cursor = cursor_str(&page["next_cursor"]);
    }
    assert_eq!(sizes, vec![3, 3, 1, 0]);
    assert_eq!(got, expected);

    // Every event carries the documented fields.
    let all = alice.pull_all(None).await;
    assert!(
        all.iter().any(|e| e["type"] == json!("channel.created")),
        "{all:?}"
    );
    for e in &all {
        for f in [
            "id",
            "cursor",
            "type",
            "workspace_id",
            "created_at",
            "payload",
        ] {
            assert!(e.get(f).is_some(), "event has {f}: {e}");
        }
        assert_eq!(e["workspace_id"], json!(s.app.id));
    }

    // limit bounds.
    assert_error(
        &alice.events_page(Some(&start), 501).await,
        400,
        "invalid_input",
    );
    assert_error(
        &alice.events_page(Some(&start), 0).await,
        400,
        "invalid_input",
    );
    let (st, page) = alice.events_page(Some(&start), 500).await;
    assert_eq!(st, 200);
    assert_eq!(page["events"].as_array().map(Vec::len), Some(7));
    // Unauthenticated.
    assert_error(
        &s.raw(
            reqwest::Method::GET,
            "/api/realtime/events",
            None,
            None,
            None,
        )
        .await,
        401,
        "auth_failed",
    );
}

#[tokio::test]
async fn oversized_client_frame_closes_1009() {
    let s = TestServer::start().await;
    let alice = s.user("alice", "human", "member").await;
    let mut ws = s.ws(&alice.token, None).await;
    // A small frame is ignored or answered, but never closes the socket.
    ws.send_text("{}").await;
    assert!(
        !matches!(
            ws.next_frame(Duration::from_millis(300)).await,
            Frame::Closed(_)
        ),
        "a small client frame keeps the socket open"
    );
    ws.send_text(&"x".repeat(65 * 1024)).await;
    let (_frames, code) = ws.read_until_close(Duration::from_secs(10)).await;
    assert_eq!(code, Some(1009), "frames over 64 KiB close with 1009");
}
