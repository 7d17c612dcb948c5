//! Moderation through `PATCH /api/members/{id}`: timeout, block, role, and who may do it.

use std::time::Duration;

use serde_json::json;
use switchboard_integration::harness::{assert_error, TestServer, WsConnectError, WsOpts};

#[tokio::test]
async fn only_owners_and_moderators_moderate() {
    let s = TestServer::start().await;
    let owner = s.user("olive", "human", "owner").await;
    let member = s.user("mike", "human", "member").await;
    s.create_entity("tina", "Tina", "human", "member").await;
    let ch = owner
        .create_group("mod", &["mike", "tina"], json!({}))
        .await;
    let cid = ch["id"].as_str().expect("id").to_owned();

    assert_error(
        &member
            .patch("/api/members/tina", &json!({"timeout_minutes": 10}))
            .await,
        403,
        "forbidden",
    );
    assert_error(
        &member
            .patch("/api/members/tina", &json!({"blocked": true}))
            .await,
        403,
        "forbidden",
    );
    assert_error(
        &member
            .patch("/api/members/mike", &json!({"role": "owner"}))
            .await,
        403,
        "forbidden",
    );
    // Nothing happened to tina.
    let tina = s.client("tina", &s.token_for("tina"));
    tina.say(&cid, "still fine").await;

    // An owner promotes mike to moderator; mike may now moderate.
    let (st, body) = owner
        .patch("/api/members/mike", &json!({"role": "moderator"}))
        .await;
    assert_eq!(st, 200, "{body}");
    let (st, me) = member.get("/api/me").await;
    assert_eq!(st, 200, "{me}");
    assert_eq!(me["entity"]["role"], json!("moderator"), "{me}");
    let (st, body) = member
        .patch("/api/members/tina", &json!({"timeout_minutes": 5}))
        .await;
    assert_eq!(st, 200, "{body}");
    assert_error(
        &tina
            .post(
                &format!("/api/channels/{cid}/messages"),
                &json!({"data": "x"}),
            )
            .await,
        403,
        "forbidden",
    );

    // Unknown member.
    assert_error(
        &owner
            .patch("/api/members/nobody", &json!({"timeout_minutes": 5}))
            .await,
        404,
        "not_found",
    );
}

#[tokio::test]
async fn timeout_forbids_writes_only() {
    let s = TestServer::start().await;
    let owner = s.user("olive", "human", "owner").await;
    let tim = s.user("tim", "human", "member").await;
    let ch = owner.create_group("timeouts", &["tim"], json!({})).await;
    let cid = ch["id"].as_str().expect("id").to_owned();
    let msg = tim.say(&cid, "before timeout").await;
    let ser = msg["message"]["message_serial"]
        .as_str()
        .expect("serial")
        .to_owned();

    let (st, body) = owner
        .patch("/api/members/tim", &json!({"timeout_minutes": 10}))
        .await;
    assert_eq!(st, 200, "{body}");

    // Writes are refused…
    assert_error(
        &tim.post(
            &format!("/api/channels/{cid}/messages"),
            &json!({"data": "x"}),
        )
        .await,
        403,
        "forbidden",
    );
    assert_error(
        &tim.post(
            &format!("/api/channels/{cid}/messages/{ser}/reactions"),
            &json!({"emoji": "x"}),
        )
        .await,
        403,
        "forbidden",
    );
    assert_error(
        &tim.post(
            "/api/channels",
            &json!({"name": "new", "members": ["olive"]}),
        )
        .await,
        403,
        "forbidden",
    );
    // …reads are not.
    let msgs = tim.messages(&cid).await;
    assert_eq!(msgs.len(), 1, "rejected writes changed nothing");
    let mut ws = s.ws(&tim.token, None).await;
    owner.say(&cid, "you can still read").await;
    let frames = ws
        .collect_until(Duration::from_secs(10), |f| {
            f["type"] == json!("message.created")
        })
        .await;
    assert_eq!(
        frames.last().expect("event")["payload"]["data"],
        json!("you can still read")
    );
    // The rejected writes took no seq.
    assert_eq!(owner.say(&cid, "next").await["event"]["seq"], json!(3));
}

#[tokio::test]
async fn block_forbids_everything_and_closes_sockets() {
    let s = TestServer::start().await;
    let owner = s.user("olive", "human", "owner").await;
    let bea = s.user("bea", "human", "member").await;
    let ch = owner.create_group("blocks", &["bea"], json!({})).await;
    let cid = ch["id"].as_str().expect("id").to_owned();

    let mut ws = s.ws(&bea.token, None).await;
    let (st, body) = owner
        .patch("/api/members/bea", &json!({"blocked": true}))
        .await;
    assert_eq!(st, 200, "{body}");

    // The open socket closes with 1008 (policy violation), delivering nothing of bea's.
    let (_frames, code) = ws.read_until_close(Duration::from_secs(10)).await;
    assert_eq!(code, Some(1008), "blocked member's socket closes with 1008");

    // 403 everywhere.
    assert_error(&bea.get("/api/me").await, 403, "forbidden");
    assert_error(&bea.get("/api/channels").await, 403, "forbidden");
    assert_error(
        &bea.get(&format!("/api/channels/{cid}/messages")).await,
        403,
        "forbidden",
    );
    assert_error(
        &bea.post(
            &format!("/api/channels/{cid}/messages"),
            &json!({"data": "x"}),
        )
        .await,
        403,
        "forbidden",
    );
    assert_error(&bea.get("/api/realtime/events").await, 403, "forbidden");
    // A new socket is refused: 403 at upgrade, or closed with 1008 at once.
    match s
        .ws_connect(WsOpts {
            token: Some(bea.token.clone()),
            ..WsOpts::default()
        })
        .await
    {
        Err(WsConnectError::Http(status, _)) => assert_eq!(status, 403),
        Err(WsConnectError::Other(e)) => panic!("unexpected connect error {e}"),
        Ok(mut c) => {
            let (frames, code) = c.read_until_close(Duration::from_secs(10)).await;
            assert_eq!(code, Some(1008), "{frames:?}");
            assert!(
                frames.iter().all(|f| f["type"] == json!("realtime.ready")),
                "{frames:?}"
            );
        }
    }

    // Unblock restores access.
    let (st, body) = owner
        .patch("/api/members/bea", &json!({"blocked": false}))
        .await;
    assert_eq!(st, 200, "{body}");
    let (st, me) = bea.get("/api/me").await;
    assert_eq!(st, 200, "{me}");
    assert_eq!(me["entity"]["id"], json!("bea"));
}
