//! Privacy of direct-channel events, private-channel events and read receipts, on both the
//! WebSocket and `GET /api/realtime/events` pull replay.

use std::time::Duration;

use serde_json::{json, Value};
use switchboard_integration::harness::{cursor_str, TestServer, WsClient};

fn channel_of(e: &Value) -> Option<&str> {
    e["channel_id"].as_str()
}

fn is_read(e: &Value) -> bool {
    e["type"] == json!("channel.read") || e["type"] == json!("dm.read")
}

async fn until_marker(ws: &mut WsClient, marker_id: &Value) -> Vec<Value> {
    ws.collect_until(Duration::from_secs(10), |f| f["id"] == *marker_id)
        .await
}

#[tokio::test]
async fn direct_private_and_read_events_reach_only_recipients() {
    let s = TestServer::start().await;
    let alice = s.user("alice", "human", "member").await;
    let bob = s.user("bob", "human", "member").await;
    let carl = s.user("carl", "human", "member").await;

    let public = alice
        .create_group("town-square", &["bob"], json!({"visibility": "public"}))
        .await;
    let pubid = public["id"].as_str().expect("id").to_owned();
    let private = alice.create_group("back-room", &["bob"], json!({})).await;
    let privid = private["id"].as_str().expect("id").to_owned();
    let dm = alice.direct("bob").await;
    let dmid = dm["id"].as_str().expect("id").to_owned();
    let start = alice.say(&pubid, "start").await;
    let start_cursor = cursor_str(&start["event"]["cursor"]);

    let mut a_ws = s.ws(&alice.token, None).await;
    let mut b_ws = s.ws(&bob.token, None).await;
    let mut c_ws = s.ws(&carl.token, None).await;

    let dm_msg = alice.say(&dmid, "psst bob").await;
    let priv_msg = alice.say(&privid, "members only").await;
    bob.say(&dmid, "hi alice").await;
    // Read receipts: alice reads the DM and the private channel.
    let (st, _) = alice
        .post(&format!("/api/channels/{dmid}/read"), &json!({"seq": 2}))
        .await;
    assert_eq!(st, 200);
    let (st, _) = alice
        .post(&format!("/api/channels/{privid}/read"), &json!({"seq": 1}))
        .await;
    assert_eq!(st, 200);
    // bob reads the public channel.
    let (st, _) = bob
        .post(&format!("/api/channels/{pubid}/read"), &json!({"seq": 1}))
        .await;
    assert_eq!(st, 200);
    // A marker everyone may see, posted last.
    let marker = alice.say(&pubid, "marker").await;
    let marker_id = marker["event"]["id"].clone();

    // alice: her DM and private traffic, her own receipts, not bob's receipt.
    let a = until_marker(&mut a_ws, &marker_id).await;
    let a_dm: Vec<&Value> = a
        .iter()
        .filter(|e| e["type"] == json!("message.created") && channel_of(e) == Some(&dmid))
        .collect();
    assert_eq!(a_dm.len(), 2, "{a:?}");
    let a_reads: Vec<&Value> = a.iter().filter(|e| is_read(e)).collect();
    assert_eq!(
        a_reads.len(),
        2,
        "alice sees exactly her two receipts: {a:?}"
    );
    let dm_read = a_reads
        .iter()
        .find(|e| channel_of(e) == Some(&dmid))
        .expect("dm read event");
    assert_eq!(dm_read["type"], json!("dm.read"), "{dm_read}");
    assert_eq!(dm_read["payload"]["user_id"], json!("alice"), "{dm_read}");
    assert_eq!(dm_read["payload"]["channel_id"], json!(dmid), "{dm_read}");
    assert_eq!(dm_read["payload"]["last_read_seq"], json!(2), "{dm_read}");
    assert_eq!(dm_read["seq"], json!(2), "{dm_read}");
    let ch_read = a_reads
        .iter()
        .find(|e| channel_of(e) == Some(&privid))
        .expect("channel read event");
    assert_eq!(ch_read["type"], json!("channel.read"), "{ch_read}");
    assert_eq!(ch_read["payload"]["user_id"], json!("alice"));

    // bob: DM and private messages, with direct_conversation_id on DM events; his own
    // receipt only.
    let b = until_marker(&mut b_ws, &marker_id).await;
    let b_dm: Vec<&Value> = b
        .iter()
        .filter(|e| e["type"] == json!("message.created") && channel_of(e) == Some(&dmid))
        .collect();
    assert_eq!(b_dm.len(), 2, "{b:?}");
    assert_eq!(b_dm[0]["id"], dm_msg["event"]["id"]);
    for e in &b_dm {
        assert_eq!(e["payload"]["direct_conversation_id"], json!(dmid), "{e}");
    }
    assert!(
        b.iter().any(|e| e["id"] == priv_msg["event"]["id"]),
        "bob sees the private channel message: {b:?}"
    );
    let b_reads: Vec<&Value> = b.iter().filter(|e| is_read(e)).collect();
    assert_eq!(b_reads.len(), 1, "bob sees only his own receipt: {b:?}");
    assert_eq!(b_reads[0]["payload"]["user_id"], json!("bob"));

    // carl: only the public channel.
    let c = until_marker(&mut c_ws, &marker_id).await;
    for e in &c {
        assert_eq!(
            channel_of(e),
            Some(pubid.as_str()),
            "carl sees only public events: {e}"
        );
        assert!(!is_read(e), "carl sees no receipts: {e}");
    }
    assert_eq!(c.len(), 1, "carl's socket saw just the marker: {c:?}");

    // Pull replay from the same point gives each the same view.
    let a_pull = alice.pull_all(Some(&start_cursor)).await;
    let b_pull = bob.pull_all(Some(&start_cursor)).await;
    let c_pull = carl.pull_all(Some(&start_cursor)).await;
    let ids = |v: &[Value]| v.iter().map(|e| e["id"].clone()).collect::<Vec<_>>();
    assert_eq!(ids(&a_pull), ids(&a), "alice: pull == socket");
    assert_eq!(ids(&b_pull), ids(&b), "bob: pull == socket");
    assert_eq!(ids(&c_pull), ids(&c), "carl: pull == socket");

    // And a replaying socket from the beginning never leaks them to carl.
    let all_c = carl.pull_all(None).await;
    assert!(
        all_c
            .iter()
            .all(|e| channel_of(e) != Some(&dmid) && channel_of(e) != Some(&privid) && !is_read(e)),
        "{all_c:?}"
    );
    let mut c_replay = s.ws(&carl.token, Some(&start_cursor)).await;
    let c_replayed = until_marker(&mut c_replay, &marker_id).await;
    assert_eq!(ids(&c_replayed), ids(&c));
    let mut b_replay = s.ws(&bob.token, Some(&start_cursor)).await;
    let b_replayed = until_marker(&mut b_replay, &marker_id).await;
    assert_eq!(ids(&b_replayed), ids(&b));
}

#[tokio::test]
async fn membership_changes_govern_private_delivery() {
    let s = TestServer::start().await;
    let alice = s.user("alice", "human", "member").await;
    let bob = s.user("bob", "human", "member").await;
    let carl = s.user("carl", "human", "member").await;
    let private = alice.create_group("vault", &["bob"], json!({})).await;
    let pid = private["id"].as_str().expect("id").to_owned();
    let public = alice
        .create_group("square", &["bob"], json!({"visibility": "public"}))
        .await;
    let pubid = public["id"].as_str().expect("id").to_owned();

    let mut c_ws = s.ws(&carl.token, None).await;
    alice.say(&pid, "before carl").await;
    let (st, _) = alice
        .post(
            &format!("/api/channels/{pid}/members"),
            &json!({"entity_id": "carl"}),
        )
        .await;
    assert!(st == 200 || st == 201);
    let after = alice.say(&pid, "after carl joined").await;
    let m = alice.say(&pubid, "marker").await;
    let frames = until_marker(&mut c_ws, &m["event"]["id"]).await;
    let msgs: Vec<&Value> = frames
        .iter()
        .filter(|e| e["type"] == json!("message.created") && channel_of(e) == Some(&pid))
        .collect();
    assert_eq!(
        msgs.len(),
        1,
        "carl gets only what was posted after he joined: {frames:?}"
    );
    assert_eq!(msgs[0]["id"], after["event"]["id"]);

    // Removed again: nothing more.
    let (st, _) = alice
        .delete(&format!("/api/channels/{pid}/members/carl"))
        .await;
    assert_eq!(st, 200);
    alice.say(&pid, "after carl left").await;
    let m2 = alice.say(&pubid, "marker2").await;
    let frames = until_marker(&mut c_ws, &m2["event"]["id"]).await;
    assert!(
        frames
            .iter()
            .all(|e| !(e["type"] == json!("message.created") && channel_of(e) == Some(&pid))),
        "{frames:?}"
    );
    drop(bob);
}
