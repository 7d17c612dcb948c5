//! Close code 4001 (resync required) and 410 `resync_required`: after a prune, for a cursor
//! beyond the tail, for an unknown cursor, and for a cursor beyond the replay budget.

use std::time::Duration;

use serde_json::{json, Value};
use switchboard_integration::harness::{
    assert_error, cursor_num, cursor_str, ApiClient, TestServer, WsConnectError, WsOpts,
};

/// Connects with `after_cursor` and expects close 4001 with no event delivered (a
/// `realtime.ready` frame before the close is tolerated).
async fn expect_4001(s: &TestServer, token: &str, cursor: &str) {
    let mut ws = match s
        .ws_connect(WsOpts {
            token: Some(token.to_owned()),
            after_cursor: Some(cursor.to_owned()),
            ..WsOpts::default()
        })
        .await
    {
        Ok(ws) => ws,
        Err(e) => panic!("cursor {cursor:?}: upgrade refused ({e:?}), expected close 4001"),
    };
    let (frames, code) = ws.read_until_close(Duration::from_secs(10)).await;
    assert_eq!(
        code,
        Some(4001),
        "cursor {cursor:?}: close code; frames {frames:?}"
    );
    assert!(
        frames.iter().all(|f| f["type"] == json!("realtime.ready")),
        "no event is delivered before 4001: {frames:?}"
    );
}

async fn setup(s: &TestServer, n: usize) -> (ApiClient, String, Vec<Value>) {
    let alice = s.user("alice", "human", "member").await;
    s.create_entity("bob", "Bob", "human", "member").await;
    let ch = alice.create_group("resync", &["bob"], json!({})).await;
    let cid = ch["id"].as_str().expect("id").to_owned();
    let mut events = Vec::new();
    for i in 0..n {
        events.push(alice.say(&cid, &format!("m{i}")).await["event"].clone());
    }
    (alice, cid, events)
}

#[tokio::test]
async fn prune_forces_resync() {
    let s = TestServer::start().await;
    let (alice, cid, events) = setup(&s, 5).await;
    let old = cursor_str(&events[0]["cursor"]);
    let newest = cursor_str(&events[4]["cursor"]);
    // Before the prune the old cursor replays fine.
    let mut ws = s.ws(&alice.token, Some(&old)).await;
    let f = ws.next_json(Duration::from_secs(10)).await;
    assert_eq!(f["id"], events[1]["id"]);
    drop(ws);

    s.prune_keep_latest(1).await;

    expect_4001(&s, &alice.token, &old).await;
    assert_error(
        &alice.events_page(Some(&old), 100).await,
        410,
        "resync_required",
    );
    // The newest retained event is still a valid resume point.
    let mut ok = s.ws(&alice.token, Some(&newest)).await;
    let next = alice.say(&cid, "after prune").await;
    let f = ok.next_json(Duration::from_secs(10)).await;
    assert_eq!(
        f["id"], next["event"]["id"],
        "resume after the newest retained event"
    );
    let (st, page) = alice.events_page(Some(&newest), 100).await;
    assert_eq!(st, 200, "{page}");
    assert_eq!(page["events"].as_array().map(Vec::len), Some(1), "{page}");
    // Messages are untouched by the prune.
    let msgs = alice.messages(&cid).await;
    assert_eq!(msgs.len(), 6);
    // The log from the start is now just what was kept plus what came later.
    let all = alice.pull_all(None).await;
    assert_eq!(
        all.iter().map(|e| e["id"].clone()).collect::<Vec<_>>(),
        vec![events[4]["id"].clone(), next["event"]["id"].clone()]
    );
}

#[tokio::test]
async fn beyond_tail_and_unknown_cursors() {
    let s = TestServer::start().await;
    let (alice, _cid, events) = setup(&s, 3).await;
    let tail = cursor_str(&events[2]["cursor"]);
    let beyond = match cursor_num(&tail) {
        Some(n) => (n + 1_000_000).to_string(),
        None => "99999999999999999999".to_owned(),
    };
    expect_4001(&s, &alice.token, &beyond).await;
    assert_error(
        &alice.events_page(Some(&beyond), 100).await,
        410,
        "resync_required",
    );
    for unknown in ["not-a-cursor", "-1", "abc123"] {
        expect_4001(&s, &alice.token, unknown).await;
        assert_error(
            &alice.events_page(Some(unknown), 100).await,
            410,
            "resync_required",
        );
    }
    // The tail itself is fine: ready, then silence.
    let mut ws = s.ws(&alice.token, Some(&tail)).await;
    let extra = ws.drain(Duration::from_millis(300)).await;
    assert!(extra.is_empty(), "{extra:?}");
}

#[tokio::test]
async fn replay_budget_forces_resync() {
    let s = TestServer::builder()
        .env("SWITCHBOARD_REALTIME_MAX_REPLAY", "10")
        .start()
        .await;
    let (alice, _cid, events) = setup(&s, 20).await;
    // 19 events behind: over the budget of 10.
    expect_4001(&s, &alice.token, &cursor_str(&events[0]["cursor"])).await;
    // 5 behind: replays.
    let mut ws = s
        .ws(&alice.token, Some(&cursor_str(&events[14]["cursor"])))
        .await;
    let mut got = Vec::new();
    for _ in 0..5 {
        got.push(ws.next_json(Duration::from_secs(10)).await["id"].clone());
    }
    let want: Vec<Value> = events[15..].iter().map(|e| e["id"].clone()).collect();
    assert_eq!(got, want);
    // Pull replay is paged, so the budget does not apply there.
    let (st, page) = alice
        .events_page(Some(&cursor_str(&events[0]["cursor"])), 500)
        .await;
    assert_eq!(st, 200, "{page}");
    assert_eq!(page["events"].as_array().map(Vec::len), Some(19));
    // Connect-refused is not what 4001 means.
    assert!(matches!(
        s.ws_connect(WsOpts {
            token: Some("garbage".into()),
            ..WsOpts::default()
        })
        .await,
        Err(WsConnectError::Http(401, _))
    ));
}
