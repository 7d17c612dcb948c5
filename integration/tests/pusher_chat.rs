//! Chat channels on the Pusher face (SPEC §4, §6): a channel made through the chat API is
//! the same channel under its name, open to signed-in members (signin or V2 token) or a
//! signature, and closed again to a member who is removed from it.

use serde_json::json;
use switchboard_integration::harness::{mint_token, uniq, TestServer, FRAME_TIMEOUT};
use switchboard_integration::pusher_client::{
    assert_refused, channel_auth, error_code, string_data, trigger,
};

#[tokio::test]
async fn chat_channels_are_subscribable_by_name_by_members() {
    let server = TestServer::start().await;
    let app = server.app.clone();
    let alice = server.user("alice", "human", "member").await;
    let bob = server.user("bob", "human", "member").await;
    server.user("carol", "human", "member").await;
    let name = uniq("team");
    let ch = alice.create_group(&name, &["bob"], json!({})).await;
    let cid = ch["id"]
        .as_str()
        .unwrap_or_else(|| panic!("{ch}"))
        .to_string();

    // Anonymous: no prefix, yet a chat channel needs a member or a signature.
    let mut anon = server.pusher("?protocol=7").await;
    assert_refused(&anon.subscribe_with(&name, None, None).await, 4009);

    // A signed-in non-member of this private group.
    let mut carol = server.pusher("?protocol=7").await;
    carol.signin(&app, r#"{"id":"carol"}"#).await;
    assert_refused(&carol.subscribe_with(&name, None, None).await, 4009);

    // A signed-in member.
    let mut bob_v1 = server.pusher("?protocol=7").await;
    bob_v1.signin(&app, r#"{"id":"bob"}"#).await;
    bob_v1.subscribe(&name, None, None).await;

    // A V2 socket with the member's chat token needs no signature.
    let mut bob_v2 = server
        .pusher(&format!("?protocol=2&token={}", bob.token))
        .await;
    let ok = bob_v2.subscribe(&name, None, None).await;
    assert_eq!(
        ok["stream_id"],
        json!(cid),
        "the stream of a chat channel is its id: {ok}"
    );

    // A channel auth signature also admits the anonymous socket.
    let sig = channel_auth(&app, &anon.socket_id, &name, None);
    anon.subscribe(&name, Some(sig), None).await;

    // A message posted through the chat API reaches them.
    let posted = alice.say(&cid, "hello team").await;
    let ev = bob_v1.expect("message", Some(&name)).await;
    assert_eq!(
        ev,
        json!({"event": "message", "channel": name, "data": "hello team"})
    );
    let ev = bob_v2.expect("message", Some(&name)).await;
    assert_eq!(ev["data"], json!("hello team"), "{ev}");
    assert_eq!(
        ev["serial"], posted["message"]["history_serial"],
        "{ev} {posted}"
    );
    assert_eq!(
        ev["message_id"], posted["message"]["message_serial"],
        "{ev} {posted}"
    );
    anon.expect("message", Some(&name)).await;

    // A trigger on the channel's name reaches a chat WebSocket of a member.
    let mut chat_ws = server.ws(&alice.token, None).await;
    trigger(&server, &name, "announce", "from the server", None).await;
    let frames = chat_ws
        .collect_until(FRAME_TIMEOUT, |f| f["type"] == json!("message.created"))
        .await;
    let ev = frames.last().unwrap_or_else(|| panic!("message.created"));
    assert_eq!(ev["channel_id"], json!(cid), "{ev}");
    assert_eq!(ev["payload"]["data"], json!("from the server"), "{ev}");
    assert_eq!(
        bob_v1.expect("announce", Some(&name)).await["data"],
        json!("from the server")
    );

    // A V2 token of a non-member does not open it either.
    let carol_token = server.token_for("carol");
    let mut carol_v2 = server
        .pusher(&format!("?protocol=2&token={carol_token}"))
        .await;
    assert_refused(&carol_v2.subscribe_with(&name, None, None).await, 4009);
}

#[tokio::test]
async fn a_member_removed_from_a_private_chat_channel_stops_receiving_it() {
    let server = TestServer::start().await;
    let app = server.app.clone();
    let alice = server.user("alice", "human", "member").await;
    let bob = server.user("bob", "human", "member").await;
    server.user("carol", "human", "member").await;
    let name = uniq("team");
    let ch = alice
        .create_group(&name, &["bob", "carol"], json!({}))
        .await;
    let cid = ch["id"]
        .as_str()
        .unwrap_or_else(|| panic!("{ch}"))
        .to_string();

    let mut bob_v1 = server.pusher("?protocol=7").await;
    bob_v1.signin(&app, r#"{"id":"bob"}"#).await;
    bob_v1.subscribe(&name, None, None).await;
    let mut bob_v2 = server
        .pusher(&format!("?protocol=2&token={}", bob.token))
        .await;
    bob_v2.subscribe(&name, None, None).await;
    // Admitted by a signature (the application's consent), not by bob's membership.
    let mut signed = server.pusher("?protocol=7").await;
    signed.signin(&app, r#"{"id":"bob"}"#).await;
    let sig = channel_auth(&app, &signed.socket_id, &name, None);
    signed.subscribe(&name, Some(sig), None).await;

    let (status, body) = alice
        .delete(&format!("/api/channels/{cid}/members/bob"))
        .await;
    assert!(status < 300, "{status} {body}");
    alice.say(&cid, "after bob left").await;
    assert_eq!(
        signed.expect("message", Some(&name)).await["data"],
        json!("after bob left")
    );

    // Bob's membership-admitted sockets can no longer read the channel's log either.
    bob_v2
        .send("sockudo:channel_history", json!({"channel": name}))
        .await;
    let err = bob_v2.expect_error().await;
    assert!(error_code(&err).is_some(), "{err}");
    bob_v2
        .send(
            "sockudo:resume",
            json!({"channel_positions": {name.clone(): {"serial": 0}}}),
        )
        .await;
    let frames = bob_v2
        .until(|v| v["event"] == json!("sockudo:resume_success"))
        .await;
    assert!(
        frames.iter().all(|f| f["data"] != json!("after bob left")),
        "{frames:?}"
    );
    assert_eq!(
        string_data(&frames[frames.len() - 1])["recovered"],
        json!([])
    );

    // Added back, bob receives again, and never received what was said meanwhile.
    let (status, body) = alice
        .post(
            &format!("/api/channels/{cid}/members"),
            &json!({"entity_id": "bob"}),
        )
        .await;
    assert!(status < 300, "{status} {body}");
    alice.say(&cid, "welcome back").await;
    for c in [&mut bob_v1, &mut bob_v2] {
        let frames = c
            .until(|v| v["event"] == json!("message") && v["data"] == json!("welcome back"))
            .await;
        assert!(
            frames.iter().all(|f| f["data"] != json!("after bob left")),
            "a removed member received: {frames:?}"
        );
    }
}

#[tokio::test]
async fn a_token_history_grant_does_not_reach_a_chat_channel_the_user_may_not_see() {
    let server = TestServer::start().await;
    let alice = server.user("alice", "human", "member").await;
    server.user("bob", "human", "member").await;
    server.user("carol", "human", "member").await;
    let name = uniq("team");
    let ch = alice.create_group(&name, &["bob"], json!({})).await;
    let cid = ch["id"]
        .as_str()
        .unwrap_or_else(|| panic!("{ch}"))
        .to_string();
    alice.say(&cid, "members only").await;
    let now = chrono::Utc::now().timestamp();
    let token = mint_token(
        &server.app.key,
        &server.app.secret,
        &json!({"sub": "carol", "iat": now, "exp": now + 600,
                "capabilities": {"history": ["*"], "subscribe": ["*"]}}),
    );
    let mut carol = server.pusher(&format!("?protocol=2&token={token}")).await;
    carol
        .send("sockudo:channel_history", json!({"channel": name}))
        .await;
    let got = carol
        .until(|v| {
            v["event"] == json!("sockudo:error") || v["event"] == json!("sockudo:channel_history")
        })
        .await;
    let last = &got[got.len() - 1];
    assert_eq!(
        last["event"],
        json!("sockudo:error"),
        "carol read the history: {last}"
    );

    // The same grant on an implicit channel reads its history.
    let open = uniq("open");
    trigger(&server, &open, "e", "x", None).await;
    carol
        .send("sockudo:channel_history", json!({"channel": open}))
        .await;
    let h = carol.expect("sockudo:channel_history", Some(&open)).await;
    assert_eq!(h["data"]["items"][0]["data"], json!("x"), "{h}");
}
