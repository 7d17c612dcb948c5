//! Cluster mode: what one node caches (channel actors' views, verified tokens, apps and
//! settings) follows the changes another node makes, as soon as it hears of them: through the
//! committed events it receives (membership, channel fields, moderation) or a control
//! notification (settings, entities). When notifications are lost (Redis down), the caches
//! still expire within a bounded time (docs/cluster.md, "Cache coherence").
//!
//! Real processes only: two nodes on one fresh PostgreSQL database and a Redis of their own.
//! "At once" is checked as "within [`PROPAGATION`]", far below every cache's expiry (5 s for
//! tokens and settings, 10 s for channel views, 600 s for an idle channel actor before): what
//! passes here passed through a notification, not an expiry.

use std::future::Future;
use std::time::Duration;

use serde_json::{json, Value};
use switchboard_integration::cluster::Cluster;
use switchboard_integration::harness::{
    assert_error, uniq, ApiClient, Frame, TestServer, WsClient,
};
use switchboard_integration::pg_server::PgDatabase;
use switchboard_integration::pusher_client::{error_code, patch_settings};
use tokio::time::Instant;

/// How long a change on A may take to apply on B when notifications flow (one Redis hop).
const PROPAGATION: Duration = Duration::from_millis(1500);
/// The bound when the notification is lost: the channel views' (10 s), with slack.
const LOST_BOUND: Duration = Duration::from_secs(14);

/// Repeats `attempt` until it answers `Some`, for at most `within`; panics with `what` and
/// the last answer otherwise.
async fn eventually<T, F, Fut>(within: Duration, what: &str, mut attempt: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + within;
    loop {
        match attempt().await {
            Ok(v) => return v,
            Err(last) if Instant::now() >= deadline => {
                panic!("{what}: not within {within:?}; last: {last}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(25)).await,
        }
    }
}

/// Polls a request until it answers `status`; answers that response.
async fn until_status<F, Fut>(what: &str, within: Duration, status: u16, f: F) -> (u16, Value)
where
    F: Fn() -> Fut,
    Fut: Future<Output = (u16, Value)>,
{
    eventually(within, what, || {
        let fut = f();
        async move {
            let r = fut.await;
            if r.0 == status {
                Ok(r)
            } else {
                Err(format!("{} {}", r.0, r.1))
            }
        }
    })
    .await
}

fn id_of(channel: &Value) -> String {
    channel["id"]
        .as_str()
        .unwrap_or_else(|| panic!("channel id: {channel}"))
        .to_owned()
}

async fn post(c: &ApiClient, channel: &str, text: &str) -> (u16, Value) {
    c.post(
        &format!("/api/channels/{channel}/messages"),
        &json!({"data": text}),
    )
    .await
}

/// Two nodes: A (index 0) and B (index 1).
async fn two_nodes(db: &PgDatabase) -> Cluster {
    Cluster::start(&db.url(), 2).await
}

/// Reads chat frames for `window`; panics if the socket closes.
async fn frames_for(ws: &mut WsClient, window: Duration) -> Vec<Value> {
    let deadline = Instant::now() + window;
    let mut got = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return got;
        }
        match ws.next_frame(left).await {
            Frame::Json(v) => got.push(v),
            Frame::Timeout => return got,
            Frame::Closed(code) => panic!("socket closed ({code:?}) after {got:?}"),
        }
    }
}

#[tokio::test]
async fn a_member_removed_on_a_is_refused_on_b_and_hears_no_more() {
    let db = PgDatabase::fresh();
    let c = two_nodes(&db).await;
    let (a, b) = (c.node(0), c.node(1));
    let alice = a.user("alice", "human", "member").await;
    a.create_entity("bob", "bob", "human", "member").await;
    a.create_entity("carol", "carol", "human", "member").await;
    let public = id_of(
        &alice
            .create_group(
                &uniq("lobby"),
                &["bob", "carol"],
                json!({"visibility": "public"}),
            )
            .await,
    );
    let private = id_of(
        &alice
            .create_group(&uniq("inner"), &["bob", "carol"], json!({}))
            .await,
    );
    let bob_b = b.client("bob", &b.token_for("bob"));
    let carol_b = b.client("carol", &b.token_for("carol"));
    // B's channel actors run, with bob a member in their view.
    for ch in [&public, &private] {
        bob_b.say(ch, "bob on b").await;
        carol_b.say(ch, "carol on b").await;
    }
    let mut bob_ws = b.ws(&bob_b.token, None).await;
    frames_for(&mut bob_ws, Duration::from_millis(300)).await;

    for ch in [&public, &private] {
        let (st, body) = alice
            .delete(&format!("/api/channels/{ch}/members/bob"))
            .await;
        assert_eq!(st, 200, "remove bob from {ch}: {body}");
    }

    // Refused on B as on one node: 403 not_a_member where bob still sees the channel
    // (public), 404 where he no longer does (private).
    let r = until_status("bob's post on B refused (public)", PROPAGATION, 403, || {
        post(&bob_b, &public, "after removal")
    })
    .await;
    assert_error(&r, 403, "not_a_member");
    let r = until_status(
        "bob's post on B refused (private)",
        PROPAGATION,
        404,
        || post(&bob_b, &private, "after removal"),
    )
    .await;
    assert_error(&r, 404, "not_found");

    // Carol posts on B: B's actor addresses the private channel's members as they are now.
    let after = carol_b.say(&private, "bob must not see this").await;
    let after_id = after["message"]["message_serial"].clone();
    let frames = frames_for(&mut bob_ws, Duration::from_millis(800)).await;
    assert!(
        frames
            .iter()
            .any(|f| f["type"] == json!("channel.member_removed")
                && f["channel_id"] == json!(private)),
        "bob hears of his removal: {frames:?}"
    );
    let leaked: Vec<&Value> = frames
        .iter()
        .filter(|f| {
            f["type"] == json!("message.created")
                && f["channel_id"] == json!(private)
                && f["payload"]["message_id"] == after_id
        })
        .collect();
    assert!(
        leaked.is_empty(),
        "bob got a post after his removal: {leaked:?}"
    );
    // The channel's history on B agrees.
    let (st, _) = bob_b
        .get(&format!("/api/channels/{private}/messages"))
        .await;
    assert_eq!(st, 404, "bob no longer reads the private channel on B");
}

#[tokio::test]
async fn an_entity_deactivated_on_a_loses_access_on_b_at_once() {
    let db = PgDatabase::fresh();
    let c = two_nodes(&db).await;
    let (a, b) = (c.node(0), c.node(1));
    a.create_entity("dave", "dave", "human", "member").await;
    let dave_b = b.client("dave", &b.token_for("dave"));
    // B verified (and cached) dave's token.
    let (st, me) = dave_b.get("/api/me").await;
    assert_eq!(st, 200, "{me}");
    let mut ws = b.ws(&dave_b.token, None).await;

    let (st, body) = a.delete_entity("dave").await;
    assert_eq!(st, 200, "{body}");

    let r = until_status("dave's token refused on B", PROPAGATION, 401, || {
        dave_b.get("/api/me")
    })
    .await;
    assert_error(&r, 401, "auth_failed");
    // His socket on B closes as on the node that deactivated him (1008).
    let (_, code) = ws.read_until_close(PROPAGATION).await;
    assert_eq!(code, Some(1008), "dave's socket on B closes with 1008");
}

#[tokio::test]
async fn a_member_blocked_on_a_is_blocked_on_b_at_once() {
    let db = PgDatabase::fresh();
    let c = two_nodes(&db).await;
    let (a, b) = (c.node(0), c.node(1));
    let boss = a.user("boss", "human", "moderator").await;
    a.create_entity("erin", "erin", "human", "member").await;
    let erin_b = b.client("erin", &b.token_for("erin"));
    let (st, me) = erin_b.get("/api/me").await;
    assert_eq!(st, 200, "{me}");
    let mut ws = b.ws(&erin_b.token, None).await;

    let (st, body) = boss
        .patch("/api/members/erin", &json!({"blocked": true}))
        .await;
    assert_eq!(st, 200, "{body}");

    let r = until_status("erin refused on B", PROPAGATION, 403, || {
        erin_b.get("/api/me")
    })
    .await;
    assert_error(&r, 403, "forbidden");
    let (_, code) = ws.read_until_close(PROPAGATION).await;
    assert_eq!(code, Some(1008), "erin's socket on B closes with 1008");

    // Unblocked on A: B lets her in again at once.
    let (st, body) = boss
        .patch("/api/members/erin", &json!({"blocked": false}))
        .await;
    assert_eq!(st, 200, "{body}");
    until_status("erin admitted on B again", PROPAGATION, 200, || {
        erin_b.get("/api/me")
    })
    .await;
}

/// A client event from a fresh pair of sockets on `node`: `Ok` when relayed, `Err` when
/// refused.
async fn client_event_relayed(node: &TestServer, channel: &str) -> Result<(), String> {
    let mut s = node.pusher("?protocol=7").await;
    let mut r = node.pusher("?protocol=7").await;
    s.subscribe_private(&node.app, channel).await;
    r.subscribe_private(&node.app, channel).await;
    s.client_event(channel, "client-typing", json!({"t": 1}))
        .await;
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        tokio::select! {
            f = s.next(left) => match f {
                Frame::Json(v) if error_code(&v) == Some(4301) => return Err(v.to_string()),
                Frame::Json(_) => {}
                other => return Err(format!("sender: {other:?}")),
            },
            f = r.next(left) => match f {
                Frame::Json(v) if v["event"] == json!("client-typing") => return Ok(()),
                Frame::Json(_) => {}
                other => return Err(format!("receiver: {other:?}")),
            },
        }
    }
}

#[tokio::test]
async fn a_settings_patch_on_a_applies_on_b_at_once() {
    let db = PgDatabase::fresh();
    let c = two_nodes(&db).await;
    let (a, b) = (c.node(0), c.node(1));
    let ch = uniq("private-typing");
    // B reads (and caches) the app with client events disabled.
    let refused = client_event_relayed(b, &ch).await;
    assert!(refused.is_err(), "client events start disabled");

    let s = patch_settings(a, &json!({"enable_client_messages": true})).await;
    assert_eq!(s["enable_client_messages"], json!(true), "{s}");

    let started = Instant::now();
    let mut last = String::new();
    let mut relayed = false;
    while started.elapsed() < PROPAGATION {
        match client_event_relayed(b, &ch).await {
            Ok(()) => {
                relayed = true;
                break;
            }
            Err(e) => last = e,
        }
    }
    assert!(
        relayed,
        "client events enabled on B within {PROPAGATION:?}; last: {last}"
    );

    // And back: disabled on A, refused on B for sockets connected afterwards.
    patch_settings(a, &json!({"enable_client_messages": false})).await;
    let started = Instant::now();
    let mut refused = false;
    while started.elapsed() < PROPAGATION {
        if client_event_relayed(b, &ch).await.is_err() {
            refused = true;
            break;
        }
    }
    assert!(
        refused,
        "client events disabled on B within {PROPAGATION:?}"
    );
}

#[tokio::test]
async fn channel_changes_on_a_are_enforced_on_b() {
    let db = PgDatabase::fresh();
    let c = two_nodes(&db).await;
    let (a, b) = (c.node(0), c.node(1));
    let alice = a.user("alice", "human", "member").await;
    a.create_entity("bob", "bob", "human", "member").await;
    a.create_entity("carol", "carol", "human", "member").await;
    a.create_entity("dan", "dan", "human", "member").await;
    let ch = id_of(
        &alice
            .create_group(
                &uniq("open"),
                &["bob"],
                json!({"visibility": "public", "join_policy": "open"}),
            )
            .await,
    );
    let bob_b = b.client("bob", &b.token_for("bob"));
    let carol_b = b.client("carol", &b.token_for("carol"));
    let dan_b = b.client("dan", &b.token_for("dan"));
    bob_b.say(&ch, "warm").await;
    // Open: carol joins through B.
    let (st, body) = carol_b
        .post(&format!("/api/channels/{ch}/join"), &json!({}))
        .await;
    assert_eq!(st, 200, "{body}");

    // Invite-only on A: dan's join on B is refused.
    let (st, body) = alice
        .patch(
            &format!("/api/channels/{ch}"),
            &json!({"join_policy": "invite-only"}),
        )
        .await;
    assert_eq!(st, 200, "{body}");
    let join = format!("/api/channels/{ch}/join");
    let empty = json!({});
    let r = until_status("dan's join on B refused", PROPAGATION, 403, || {
        dan_b.post(&join, &empty)
    })
    .await;
    assert_error(&r, 403, "forbidden");

    // Archived on A: posting on B is refused.
    let (st, body) = alice
        .patch(&format!("/api/channels/{ch}"), &json!({"archived": true}))
        .await;
    assert_eq!(st, 200, "{body}");
    let r = until_status(
        "bob's post on B refused (archived)",
        PROPAGATION,
        403,
        || post(&bob_b, &ch, "archived?"),
    )
    .await;
    assert_error(&r, 403, "forbidden");
    // B's view of the channel shows it.
    let seen = bob_b.channel(&ch).await;
    assert!(seen["archived_at"].is_string(), "{seen}");
    assert_eq!(
        seen["permissions"]["join_policy"],
        json!("invite-only"),
        "{seen}"
    );
}

/// A signed history read of a channel by name (the server API's lookup by name).
async fn history_by_name(node: &TestServer, name: &str) -> (u16, Value) {
    let path = format!("/apps/{}/channels/{name}/history", node.app.id);
    node.signed(reqwest::Method::GET, &path, None).await
}

#[tokio::test]
async fn a_channel_renamed_on_a_is_looked_up_again_on_b() {
    let db = PgDatabase::fresh();
    let c = two_nodes(&db).await;
    let (a, b) = (c.node(0), c.node(1));
    let alice = a.user("alice", "human", "member").await;
    a.create_entity("bob", "bob", "human", "member").await;
    let (before, after) = (uniq("before"), uniq("after"));
    let ch = id_of(&alice.create_group(&before, &["bob"], json!({})).await);
    alice.say(&ch, "one").await;
    // B looks the name up (and remembers its id for a few seconds).
    let (st, page) = history_by_name(b, &before).await;
    assert_eq!(st, 200, "{page}");
    let (st, body) = alice
        .patch(&format!("/api/channels/{ch}"), &json!({"name": after}))
        .await;
    assert_eq!(st, 200, "{body}");
    // Within the propagation bound (below the 5 s expiry), B no longer finds the old name.
    let r = until_status("the old name unknown on B", PROPAGATION, 404, || {
        history_by_name(b, &before)
    })
    .await;
    assert_error(&r, 404, "not_found");
    let (st, page) = history_by_name(b, &after).await;
    assert_eq!(st, 200, "{page}");
    assert_eq!(page["items"][0]["data"], json!("one"), "{page}");
}

#[tokio::test]
async fn after_a_redis_restart_caches_are_dropped_and_changes_apply() {
    let db = PgDatabase::fresh();
    let mut c = two_nodes(&db).await;
    let alice = c.node(0).user("alice", "human", "member").await;
    for e in ["bob", "carol", "dave"] {
        c.node(0).create_entity(e, e, "human", "member").await;
    }
    let ch = id_of(
        &alice
            .create_group(
                &uniq("outage"),
                &["bob", "carol"],
                json!({"visibility": "public"}),
            )
            .await,
    );
    let bob_b = c.node(1).client("bob", &c.node(1).token_for("bob"));
    let dave_b = c.node(1).client("dave", &c.node(1).token_for("dave"));
    bob_b.say(&ch, "warm").await;
    assert_eq!(dave_b.get("/api/me").await.0, 200);

    // Redis down: A's changes reach B through no notification.
    c.redis.kill();
    let (st, body) = alice
        .delete(&format!("/api/channels/{ch}/members/bob"))
        .await;
    assert_eq!(st, 200, "{body}");
    let (st, body) = c.node(0).delete_entity("dave").await;
    assert_eq!(st, 200, "{body}");

    // Still bounded: B's caches expire by themselves (tokens 5 s, channel views 10 s).
    let r = until_status("dave refused on B, Redis down", LOST_BOUND, 401, || {
        dave_b.get("/api/me")
    })
    .await;
    assert_error(&r, 401, "auth_failed");
    let r = until_status("bob refused on B, Redis down", LOST_BOUND, 403, || {
        post(&bob_b, &ch, "during the outage")
    })
    .await;
    assert_error(&r, 403, "not_a_member");

    // Redis back: B subscribes again and drops its caches; changes flow at once again.
    c.redis.restart().await;
    let carol_b = c.node(1).client("carol", &c.node(1).token_for("carol"));
    // Wait until both nodes are subscribed again: a post on A reaches a socket on B.
    let mut carol_ws = c.node(1).ws(&carol_b.token, None).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let sent = alice.say(&ch, "ping").await;
        let id = sent["message"]["message_serial"].clone();
        let frames = frames_for(&mut carol_ws, Duration::from_millis(300)).await;
        if frames
            .iter()
            .any(|f| f["type"] == json!("message.created") && f["payload"]["message_id"] == id)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "B does not hear A again: {frames:?}"
        );
    }
    carol_b.say(&ch, "carol on b").await;
    let (st, body) = alice
        .delete(&format!("/api/channels/{ch}/members/carol"))
        .await;
    assert_eq!(st, 200, "{body}");
    let r = until_status(
        "carol refused on B after the restart",
        PROPAGATION,
        403,
        || post(&carol_b, &ch, "after removal"),
    )
    .await;
    assert_error(&r, 403, "not_a_member");
    // Bob, removed during the outage, stays refused; Alice still posts through B.
    assert_error(&post(&bob_b, &ch, "still out").await, 403, "not_a_member");
    let alice_b = c.node(1).client("alice", &alice.token);
    alice_b.say(&ch, "alice on b").await;
}
