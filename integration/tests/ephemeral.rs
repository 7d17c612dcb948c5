//! `POST /api/realtime/ephemeral`: authorization, targeting, server-set `user_id`, and never
//! stored.

use std::time::Duration;

use serde_json::{json, Value};
use switchboard_integration::harness::{assert_error, TestServer, WsClient};

const EPHEMERAL: &[&str] = &[
    "typing.started",
    "typing.stopped",
    "presence.changed",
    "agent.progress",
];

async fn until_type_on(ws: &mut WsClient, ty: &str, channel: &str) -> Vec<Value> {
    ws.collect_until(Duration::from_secs(10), |f| {
        f["type"] == json!(ty) && f["channel_id"] == json!(channel)
    })
    .await
}

#[tokio::test]
async fn ephemeral_rules() {
    let s = TestServer::start().await;
    let agent = s.user("robo", "agent", "member").await;
    let hal = s.user("hal", "human", "member").await;
    let carl = s.user("carl", "human", "member").await;
    let dm = agent.direct("hal").await;
    let dmid = dm["id"].as_str().expect("id").to_owned();
    let private = agent.create_group("agent-room", &["hal"], json!({})).await;
    let pid = private["id"].as_str().expect("id").to_owned();
    let public = agent
        .create_group("agent-square", &["hal"], json!({"visibility": "public"}))
        .await;
    let qid = public["id"].as_str().expect("id").to_owned();

    let mut hal_ws = s.ws(&hal.token, None).await;
    let mut carl_ws = s.ws(&carl.token, None).await;

    // A human types in the public channel: everyone who can see it is told.
    let (st, _) = hal
        .post(
            "/api/realtime/ephemeral",
            &json!({"type": "typing.started", "channel_id": qid}),
        )
        .await;
    assert_eq!(st, 202);
    let f = until_type_on(&mut carl_ws, "typing.started", &qid).await;
    let ev = f.last().expect("typing event");
    assert_eq!(ev["payload"]["user_id"], json!("hal"), "{ev}");
    assert_eq!(ev["workspace_id"], json!(s.app.id), "{ev}");
    // hal gets his own typing event too (or not) — either way drain up to it if present.

    // agent.progress: agents only, and exactly one channel.
    assert_error(
        &hal.post(
            "/api/realtime/ephemeral",
            &json!({"type": "agent.progress", "channel_id": qid, "payload": {"step": 1}}),
        )
        .await,
        403,
        "forbidden",
    );
    assert_error(
        &agent
            .post(
                "/api/realtime/ephemeral",
                &json!({"type": "agent.progress", "payload": {"step": 1}}),
            )
            .await,
        400,
        "invalid_input",
    );
    // Unknown type.
    assert_error(
        &agent
            .post(
                "/api/realtime/ephemeral",
                &json!({"type": "message.created", "channel_id": qid}),
            )
            .await,
        400,
        "invalid_input",
    );
    // A channel the sender may not see.
    assert_error(
        &carl
            .post(
                "/api/realtime/ephemeral",
                &json!({"type": "typing.started", "channel_id": pid}),
            )
            .await,
        404,
        "not_found",
    );

    // agent.progress to the direct channel with a spoofed user_id: only hal gets it, with
    // the server-set user_id.
    let (st, _) = agent
        .post(
            "/api/realtime/ephemeral",
            &json!({"type": "agent.progress", "channel_id": dmid,
                    "payload": {"user_id": "hal", "step": 7, "text": "thinking"}}),
        )
        .await;
    assert_eq!(st, 202);
    let f = until_type_on(&mut hal_ws, "agent.progress", &dmid).await;
    let ev = f.last().expect("agent.progress");
    assert_eq!(
        ev["payload"]["user_id"],
        json!("robo"),
        "server overwrites user_id: {ev}"
    );
    assert_eq!(ev["payload"]["step"], json!(7), "{ev}");
    assert_eq!(ev["payload"]["text"], json!("thinking"), "{ev}");

    // Typing in the private channel: members only.
    let (st, _) = agent
        .post(
            "/api/realtime/ephemeral",
            &json!({"type": "typing.started", "channel_id": pid}),
        )
        .await;
    assert_eq!(st, 202);
    let f = until_type_on(&mut hal_ws, "typing.started", &pid).await;
    assert_eq!(
        f.last().expect("typing")["payload"]["user_id"],
        json!("robo")
    );

    // A marker on the public channel: carl saw nothing of the DM or the private channel.
    let (st, _) = agent
        .post(
            "/api/realtime/ephemeral",
            &json!({"type": "typing.stopped", "channel_id": qid}),
        )
        .await;
    assert_eq!(st, 202);
    let f = until_type_on(&mut carl_ws, "typing.stopped", &qid).await;
    for e in &f {
        assert_eq!(
            e["channel_id"],
            json!(qid),
            "carl only sees the public channel: {e}"
        );
    }
    assert_eq!(
        f.last().expect("marker")["payload"]["user_id"],
        json!("robo")
    );

    // Never stored.
    for c in [&agent, &hal, &carl] {
        let all = c.pull_all(None).await;
        for e in &all {
            let ty = e["type"].as_str().unwrap_or_default();
            assert!(
                !EPHEMERAL.contains(&ty),
                "ephemeral event in the durable log: {e}"
            );
        }
    }
    // And not replayed to a resuming socket either.
    let evs = hal.pull_all(None).await;
    let first = evs.first().expect("some durable event");
    let mut replay = s
        .ws(
            &hal.token,
            Some(&switchboard_integration::harness::cursor_str(
                &first["cursor"],
            )),
        )
        .await;
    let frames = replay.drain(Duration::from_millis(500)).await;
    for e in &frames {
        let ty = e["type"].as_str().unwrap_or_default();
        assert!(!EPHEMERAL.contains(&ty), "ephemeral event replayed: {e}");
    }
    assert_eq!(
        frames.len(),
        evs.len() - 1,
        "replay holds exactly the durable events"
    );
}
