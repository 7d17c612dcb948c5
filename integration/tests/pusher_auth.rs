//! Authorization on the Pusher face (SPEC §4, §6): private and encrypted channel signatures,
//! presence members, `pusher:signin`, V2 tokens, and deactivated or blocked entities'
//! sockets. Chat channels reached by name are in `pusher_chat.rs`.

use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};
use switchboard_integration::harness::{mint_token, uniq, TestServer, FRAME_TIMEOUT};
use switchboard_integration::pusher_client::{
    assert_refused, channel_auth, error_code, fence, signin_auth, string_data, trigger,
};

// ------------------------------------------------------------------------- private

#[tokio::test]
async fn private_and_encrypted_channels_need_this_sockets_signature() {
    let server = TestServer::start().await;
    let app = server.app.clone();
    let mut other = server.pusher("?protocol=7").await;
    for (query, v2) in [("?protocol=7", false), ("?protocol=2", true)] {
        for channel in [uniq("private-room"), uniq("private-encrypted-vault")] {
            let mut c = server.pusher(query).await;
            // No auth.
            let err = c.subscribe_with(&channel, None, None).await;
            assert_refused(&err, 4009);
            // A signature made with another secret.
            let mut wrong = app.clone();
            wrong.secret = "not-the-secret".into();
            let forged = channel_auth(&wrong, &c.socket_id, &channel, None);
            assert_refused(&c.subscribe_with(&channel, Some(forged), None).await, 4009);
            // Right secret, other channel.
            let elsewhere = channel_auth(&app, &c.socket_id, "private-elsewhere", None);
            assert_refused(
                &c.subscribe_with(&channel, Some(elsewhere), None).await,
                4009,
            );
            // Another socket's signature.
            let stolen = channel_auth(&app, &other.socket_id, &channel, None);
            assert_refused(&c.subscribe_with(&channel, Some(stolen), None).await, 4009);
            // Garbage.
            assert_refused(
                &c.subscribe_with(&channel, Some("x".into()), None).await,
                4009,
            );
            // Still usable, and the right signature succeeds.
            c.assert_alive().await;
            let ok = c.subscribe_private(&app, &channel).await;
            assert_eq!(ok["data"], json!("{}"), "{ok}");
            if v2 {
                assert_eq!(
                    ok["event"],
                    json!("sockudo_internal:subscription_succeeded")
                );
            }
            trigger(&server, &channel, "secret", "s", None).await;
            assert_eq!(c.expect("secret", Some(&channel)).await["data"], json!("s"));
        }
    }
    // The socket whose signature was stolen subscribed to nothing.
    other.assert_alive().await;
}

// ------------------------------------------------------------------------- presence

#[tokio::test]
async fn presence_members_come_and_go_once_per_user() {
    let server = TestServer::start().await;
    let app = server.app.clone();
    let room = uniq("presence-room");

    let mut watcher = server.pusher("?protocol=7").await;
    let p = watcher
        .join_presence(&app, &room, "w", json!({"name": "Watcher"}))
        .await;
    assert_eq!(
        p,
        json!({"presence": {"ids": ["w"], "hash": {"w": {"name": "Watcher"}}, "count": 1}})
    );

    // Unsigned channel data, or a signature over other channel data: refused.
    let mut ann = server.pusher("?protocol=2").await;
    let data = json!({"user_id": "ann", "user_info": {"name": "Ann"}}).to_string();
    assert_refused(
        &ann.subscribe_with(&room, None, Some(data.clone())).await,
        4009,
    );
    let other_data = json!({"user_id": "boss", "user_info": {}}).to_string();
    let sig = channel_auth(&app, &ann.socket_id, &room, Some(&other_data));
    assert_refused(
        &ann.subscribe_with(&room, Some(sig), Some(data)).await,
        4009,
    );

    let p = ann
        .join_presence(&app, &room, "ann", json!({"name": "Ann"}))
        .await;
    assert_eq!(p["presence"]["count"], json!(2), "{p}");
    let mut ids: Vec<String> = p["presence"]["ids"]
        .as_array()
        .unwrap_or_else(|| panic!("{p}"))
        .iter()
        .map(|v| v.as_str().unwrap_or_default().to_string())
        .collect();
    ids.sort();
    assert_eq!(ids, ["ann", "w"], "{p}");
    assert_eq!(p["presence"]["hash"]["ann"], json!({"name": "Ann"}), "{p}");
    assert_eq!(
        p["presence"]["hash"]["w"],
        json!({"name": "Watcher"}),
        "{p}"
    );

    let added = watcher
        .expect("pusher_internal:member_added", Some(&room))
        .await;
    assert_eq!(
        string_data(&added),
        json!({"user_id": "ann", "user_info": {"name": "Ann"}})
    );
    // The joiner is not told about itself.
    fence(&server, &room).await;
    let before = ann.frames_before(&room, "fence").await;
    assert!(before.is_empty(), "{before:?}");
    let _ = watcher.frames_before(&room, "fence").await;

    // Ann's second socket: no second member_added, the count stays.
    let mut ann2 = server.pusher("?protocol=7").await;
    let p = ann2
        .join_presence(&app, &room, "ann", json!({"name": "Ann"}))
        .await;
    assert_eq!(p["presence"]["count"], json!(2), "{p}");
    fence(&server, &room).await;
    let before = watcher.frames_before(&room, "fence").await;
    assert!(
        before.is_empty(),
        "a second socket of ann is no new member: {before:?}"
    );

    // Ann's second socket disconnects: she is still there.
    ann2.ws.close().await;
    // Bob joins and leaves by disconnecting: added then removed, in that order.
    let mut bob = server.pusher("?protocol=7").await;
    bob.join_presence(&app, &room, "bob", json!({})).await;
    bob.ws.close().await;
    let frames = watcher
        .until(|v| v["event"] == json!("pusher_internal:member_removed"))
        .await;
    let names: Vec<&Value> = frames.iter().map(|f| &f["event"]).collect();
    assert_eq!(
        names,
        vec![
            &json!("pusher_internal:member_added"),
            &json!("pusher_internal:member_removed")
        ],
        "ann's second socket leaving changes nothing; bob comes and goes: {frames:?}"
    );
    assert_eq!(string_data(&frames[0])["user_id"], json!("bob"));
    assert_eq!(string_data(&frames[1]), json!({"user_id": "bob"}));

    // Ann's last socket unsubscribes: member_removed (V2 spelling to ann's watcher peers).
    ann.send("sockudo:unsubscribe", json!({"channel": room}))
        .await;
    let removed = watcher
        .expect("pusher_internal:member_removed", Some(&room))
        .await;
    assert_eq!(string_data(&removed), json!({"user_id": "ann"}));

    // A V2 subscriber sees member events under the sockudo_internal: prefix.
    let mut v2 = server.pusher("?protocol=2").await;
    v2.join_presence(&app, &room, "v2", json!({})).await;
    let mut carl = server.pusher("?protocol=7").await;
    carl.join_presence(&app, &room, "carl", json!({"k": 1}))
        .await;
    let added = v2
        .expect("sockudo_internal:member_added", Some(&room))
        .await;
    assert_eq!(
        string_data(&added),
        json!({"user_id": "carl", "user_info": {"k": 1}})
    );
}

// ------------------------------------------------------------------------- signin

#[tokio::test]
async fn signin_needs_a_signature_over_socket_and_user_data() {
    let server = TestServer::start().await;
    let app = server.app.clone();
    for query in ["?protocol=7", "?protocol=2"] {
        let mut c = server.pusher(query).await;
        let user_data = json!({"id": "alice", "user_info": {"name": "Alice"}}).to_string();
        // Signed for another socket, or over other user data, or missing.
        let other = server.pusher("?protocol=7").await;
        let stolen = signin_auth(&app, &other.socket_id, &user_data);
        assert_refused(&c.signin_with(&user_data, &stolen).await, 4009);
        let for_bob = signin_auth(&app, &c.socket_id, r#"{"id":"bob"}"#);
        assert_refused(&c.signin_with(&user_data, &for_bob).await, 4009);
        assert_refused(&c.signin_with(&user_data, "").await, 4009);
        c.assert_alive().await;

        let ok = c.signin(&app, &user_data).await;
        assert_eq!(
            ok["event"],
            json!(format!("{}:signin_success", c.prefix)),
            "{ok}"
        );
        assert_eq!(ok["data"]["user_data"], json!(user_data), "{ok}");
    }
}

#[tokio::test]
async fn a_bad_token_refuses_the_v2_connection() {
    let server = TestServer::start().await;
    let key = server.app.key.clone();
    let mut ws = server
        .pusher_connect(&key, "?protocol=2&token=not.a.jwt", None)
        .await
        .unwrap_or_else(|e| panic!("{e:?}"));
    let (frames, code) = ws.read_until_close(FRAME_TIMEOUT).await;
    assert_eq!(frames.len(), 1, "{frames:?}");
    assert_eq!(error_code(&frames[0]), Some(4009), "{frames:?}");
    assert_eq!(code, Some(4009));
}

// ------------------------------------------------------------------------- deactivation

#[tokio::test]
async fn a_deactivated_entity_signed_in_on_a_pusher_socket_is_closed() {
    let server = TestServer::start().await;
    let app = server.app.clone();
    server.user("dave", "human", "member").await;
    server.user("erin", "human", "member").await;
    let mut dave = server.pusher("?protocol=7").await;
    dave.signin(&app, r#"{"id":"dave"}"#).await;
    let ch = uniq("lobby");
    dave.subscribe(&ch, None, None).await;
    let erin_token = server.token_for("erin");
    let mut erin = server
        .pusher(&format!("?protocol=2&token={erin_token}"))
        .await;
    erin.subscribe(&ch, None, None).await;
    let mut anon = server.pusher("?protocol=7").await;
    anon.subscribe(&ch, None, None).await;

    let (status, body) = server.delete_entity("dave").await;
    assert!(status == 200 || status == 204, "{status} {body}");
    let (_, code) = dave.ws.read_until_close(Duration::from_secs(5)).await;
    assert_eq!(code, Some(4009));

    // Others are untouched.
    trigger(&server, &ch, "after", "x", None).await;
    erin.expect("after", Some(&ch)).await;
    anon.expect("after", Some(&ch)).await;

    // A deactivated entity's token no longer opens a V2 socket.
    let (status, body) = server
        .signed(
            Method::DELETE,
            &format!("/apps/{}/entities/erin", app.id),
            None,
        )
        .await;
    assert!(status == 200 || status == 204, "{status} {body}");
    let (_, code) = erin.ws.read_until_close(Duration::from_secs(5)).await;
    assert_eq!(code, Some(4009));
    let mut again = server
        .pusher_connect(&app.key, &format!("?protocol=2&token={erin_token}"), None)
        .await
        .unwrap_or_else(|e| panic!("{e:?}"));
    let (_, code) = again.read_until_close(FRAME_TIMEOUT).await;
    assert_eq!(code, Some(4009));
}

#[tokio::test]
async fn a_blocked_member_signed_in_on_a_pusher_socket_is_closed() {
    let server = TestServer::start().await;
    let app = server.app.clone();
    let owner = server.user("olga", "human", "owner").await;
    server.user("mallory", "human", "member").await;
    let mut m = server.pusher("?protocol=7").await;
    m.signin(&app, r#"{"id":"mallory"}"#).await;
    let mut bystander = server.pusher("?protocol=7").await;
    bystander.signin(&app, r#"{"id":"olga"}"#).await;
    let (status, body) = owner
        .patch("/api/members/mallory", &json!({"blocked": true}))
        .await;
    assert_eq!(status, 200, "{body}");
    let (_, code) = m.ws.read_until_close(Duration::from_secs(5)).await;
    assert_eq!(code, Some(4009));
    bystander.assert_alive().await;
}

#[tokio::test]
async fn an_expiring_token_is_announced_and_can_be_refreshed() {
    let server = TestServer::start().await;
    server.user("tess", "human", "member").await;
    server.user("other", "human", "member").await;
    let now = chrono::Utc::now().timestamp();
    let short = mint_token(
        &server.app.key,
        &server.app.secret,
        &json!({"sub": "tess", "iat": now, "exp": now + 1}),
    );
    let mut c = server.pusher(&format!("?protocol=2&token={short}")).await;
    let expired = c.expect("sockudo:token_expired", None).await;
    assert_eq!(expired["data"]["code"], json!(40142), "{expired}");

    // Another user's token does not refresh this socket.
    c.send("sockudo:auth", json!({"token": server.token_for("other")}))
        .await;
    assert_refused(&c.expect_error().await, 4009);

    c.send("sockudo:auth", json!({"token": server.token_for("tess")}))
        .await;
    let ok = c.expect("sockudo:auth_success", None).await;
    assert_eq!(ok["data"]["client_id"], json!("tess"), "{ok}");
    c.assert_alive().await;
}
