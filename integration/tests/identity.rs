//! Identity: JWT bearer tokens (any library), the signed server API, entity deactivation and
//! `POST /admin/workspaces`.

use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};
use switchboard_integration::harness::{
    assert_error, mint_token, random_string, AppCreds, Frame, SignOpts, TestServer,
};

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

#[tokio::test]
async fn tokens_local_and_minted() {
    let s = TestServer::start().await;
    s.create_entity("alice", "Alice", "human", "member").await;

    // Locally minted with the jsonwebtoken crate.
    let local = s.client("alice", &s.token_for("alice"));
    let (st, me) = local.get("/api/me").await;
    assert_eq!(st, 200, "{me}");
    assert_eq!(me["entity"]["id"], json!("alice"), "{me}");
    assert_eq!(me["entity"]["name"], json!("Alice"), "{me}");
    assert_eq!(me["entity"]["kind"], json!("human"), "{me}");
    assert_eq!(me["entity"]["role"], json!("member"), "{me}");
    assert_eq!(me["workspace"]["id"], json!(s.app.id), "{me}");
    assert!(
        me["workspace"].get("secret").is_none(),
        "the workspace secret never reaches an end user: {me}"
    );

    // Minted through the signed API.
    let minted = s.api_token("alice").await;
    let (st, me2) = s.client("alice", &minted).get("/api/me").await;
    assert_eq!(st, 200, "{me2}");
    assert_eq!(me2["entity"]["id"], json!("alice"));

    // Optional jti and Sockudo's client id claim.
    let t = now();
    let sockudo = mint_token(
        &s.app.key,
        &s.app.secret,
        &json!({"x-sockudo-client-id": "alice", "iat": t, "exp": t + 600, "jti": "j1"}),
    );
    let (st, me3) = s.client("alice", &sockudo).get("/api/me").await;
    assert_eq!(st, 200, "{me3}");
    assert_eq!(me3["entity"]["id"], json!("alice"));

    // The members list.
    s.create_entity("bob", "Bobby", "human", "member").await;
    let (st, members) = local.get("/api/members?q=bob").await;
    assert_eq!(st, 200, "{members}");
    let names: Vec<&str> = members["members"]
        .as_array()
        .unwrap_or_else(|| panic!("members array: {members}"))
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert_eq!(names, vec!["bob"], "{members}");

    // A token for an unknown entity.
    let ghost = s.client("ghost", &s.token_for("ghost"));
    assert_error(&ghost.get("/api/me").await, 401, "auth_failed");
    // Entity creation conflicts.
    let (st, body) = s
        .signed(
            Method::POST,
            &format!("/apps/{}/entities", s.app.id),
            Some(&json!({"id": "alice", "name": "Again", "kind": "human", "role": "member"})),
        )
        .await;
    assert_error(&(st, body), 409, "conflict");
    // Invalid entity ids.
    for bad in ["has:colon", "has space", ""] {
        let (st, body) = s
            .signed(
                Method::POST,
                &format!("/apps/{}/entities", s.app.id),
                Some(&json!({"id": bad, "name": "X", "kind": "human", "role": "member"})),
            )
            .await;
        assert_error(&(st, body), 400, "invalid_input");
    }
    let (st, body) = s
        .signed(
            Method::POST,
            &format!("/apps/{}/entities", s.app.id),
            Some(&json!({"id": "robot", "name": "R", "kind": "android", "role": "member"})),
        )
        .await;
    assert_error(&(st, body), 400, "invalid_input");
    // The entity list holds exactly the two created.
    let (st, list) = s
        .signed(Method::GET, &format!("/apps/{}/entities", s.app.id), None)
        .await;
    assert_eq!(st, 200, "{list}");
    let mut ids: Vec<&str> = list["entities"]
        .as_array()
        .unwrap_or_else(|| panic!("entities array: {list}"))
        .iter()
        .filter_map(|e| e["id"].as_str())
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, vec!["alice", "bob"]);
}

#[tokio::test]
async fn bad_tokens_are_401() {
    let s = TestServer::start().await;
    s.create_entity("alice", "Alice", "human", "member").await;
    let other = s.create_workspace("Other").await;
    let t = now();
    let cases: Vec<(&str, String)> = vec![
        (
            "signed with another workspace's secret",
            mint_token(
                &s.app.key,
                &other.secret,
                &json!({"sub": "alice", "iat": t, "exp": t + 600}),
            ),
        ),
        (
            "another workspace's kid and secret",
            mint_token(
                &other.key,
                &other.secret,
                &json!({"sub": "alice", "iat": t, "exp": t + 600}),
            ),
        ),
        (
            "unknown kid",
            mint_token(
                "nope",
                &s.app.secret,
                &json!({"sub": "alice", "iat": t, "exp": t + 600}),
            ),
        ),
        (
            "expired",
            mint_token(
                &s.app.key,
                &s.app.secret,
                &json!({"sub": "alice", "iat": t - 7200, "exp": t - 3600}),
            ),
        ),
        (
            "exp more than 24 h after iat",
            mint_token(
                &s.app.key,
                &s.app.secret,
                &json!({"sub": "alice", "iat": t, "exp": t + 86400 + 3600}),
            ),
        ),
        (
            "no exp",
            mint_token(
                &s.app.key,
                &s.app.secret,
                &json!({"sub": "alice", "iat": t}),
            ),
        ),
        ("garbage", "not.a.jwt".to_owned()),
        ("empty", String::new()),
    ];
    for (what, token) in &cases {
        let c = s.client("alice", token);
        let resp = c.get("/api/me").await;
        assert_eq!(resp.0, 401, "{what}: {}", resp.1);
        assert_error(&resp, 401, "auth_failed");
        // Same on the socket: refused at upgrade.
        match s
            .ws_connect(switchboard_integration::harness::WsOpts {
                token: Some(token.clone()),
                ..Default::default()
            })
            .await
        {
            Err(switchboard_integration::harness::WsConnectError::Http(st, _)) => {
                assert_eq!(st, 401, "{what} on the socket")
            }
            Err(e) => panic!("{what}: {e:?}"),
            Ok(_) => panic!("{what}: socket admitted"),
        }
    }
    // An exactly-24 h token is fine.
    let ok = mint_token(
        &s.app.key,
        &s.app.secret,
        &json!({"sub": "alice", "iat": t, "exp": t + 86400}),
    );
    let (st, me) = s.client("alice", &ok).get("/api/me").await;
    assert_eq!(st, 200, "{me}");
}

#[tokio::test]
async fn deactivated_entity_loses_access_at_once() {
    let s = TestServer::start().await;
    let alice = s.user("alice", "human", "member").await;
    let bob = s.user("bob", "human", "member").await;
    let ch = alice.create_group("deact", &["bob"], json!({})).await;
    let cid = ch["id"].as_str().expect("id").to_owned();
    let kept = bob.say(&cid, "bob was here").await;
    let minted = s.api_token("bob").await;
    let mut ws = s.ws(&bob.token, None).await;

    let (st, body) = s.delete_entity("bob").await;
    assert_eq!(st, 200, "{body}");

    assert_error(&bob.get("/api/me").await, 401, "auth_failed");
    assert_error(
        &s.client("bob", &minted).get("/api/me").await,
        401,
        "auth_failed",
    );
    assert_error(
        &bob.post(
            &format!("/api/channels/{cid}/messages"),
            &json!({"data": "x"}),
        )
        .await,
        401,
        "auth_failed",
    );
    // Its socket closes.
    match ws.next_frame(Duration::from_secs(10)).await {
        Frame::Closed(_) => {}
        Frame::Json(f) => {
            // Tolerate an event already in flight, but the socket must then close.
            let (_rest, _code) = ws.read_until_close(Duration::from_secs(10)).await;
            eprintln!("frame before close: {f}");
        }
        Frame::Timeout => panic!("the deactivated entity's socket stayed open"),
    }
    // Messages and memberships stay.
    let msgs = alice.messages(&cid).await;
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0]["message_serial"], kept["message"]["message_serial"]);
    let members = alice.channel(&cid).await["members"].clone();
    assert!(
        members.to_string().contains("\"bob\""),
        "membership stays: {members}"
    );
    // Token minting for it is refused too.
    let (st, body) = s
        .signed(
            Method::POST,
            &format!("/apps/{}/tokens", s.app.id),
            Some(&json!({"entity_id": "bob"})),
        )
        .await;
    assert!(st == 404 || st == 409 || st == 400, "{st} {body}");
}

#[tokio::test]
async fn signed_api_rejects_bad_signatures() {
    let s = TestServer::start().await;
    let path = format!("/apps/{}/entities", s.app.id);
    let body = json!({"id": "eve", "name": "Eve", "kind": "human", "role": "member"});
    let cases: Vec<(&str, AppCreds, SignOpts)> = vec![
        (
            "wrong signature",
            s.app.clone(),
            SignOpts {
                tamper_signature: true,
                ..Default::default()
            },
        ),
        (
            "wrong secret",
            AppCreds {
                secret: random_string(32),
                ..s.app.clone()
            },
            SignOpts::default(),
        ),
        (
            "unknown key",
            AppCreds {
                key: "nokey".into(),
                ..s.app.clone()
            },
            SignOpts::default(),
        ),
        (
            "timestamp 700 s in the past",
            s.app.clone(),
            SignOpts {
                timestamp_offset: -700,
                ..Default::default()
            },
        ),
        (
            "timestamp 700 s in the future",
            s.app.clone(),
            SignOpts {
                timestamp_offset: 700,
                ..Default::default()
            },
        ),
        (
            "missing body_md5 on POST",
            s.app.clone(),
            SignOpts {
                include_body_md5: Some(false),
                ..Default::default()
            },
        ),
    ];
    for (what, creds, opts) in cases {
        let resp = s
            .signed_with(&creds, Method::POST, &path, Some(&body), opts)
            .await;
        assert_eq!(resp.0, 401, "{what}: {}", resp.1);
        assert_error(&resp, 401, "auth_failed");
    }
    // A body that does not match body_md5: sign one body, send another.
    {
        let signed_for = serde_json::to_vec(&json!({"id": "eve"})).expect("ser");
        let q = switchboard_integration::harness::sign_query(
            &s.app,
            "POST",
            &path,
            &signed_for,
            &[],
            now(),
            true,
            false,
        );
        let resp = s
            .raw(
                Method::POST,
                &format!("{path}?{q}"),
                None,
                Some("application/json"),
                Some(serde_json::to_vec(&body).expect("ser")),
            )
            .await;
        assert_error(&resp, 401, "auth_failed");
    }
    // Unsigned.
    assert_error(
        &s.raw(Method::GET, &path, None, None, None).await,
        401,
        "auth_failed",
    );
    // Nothing was created by the rejected calls.
    let (st, list) = s.signed(Method::GET, &path, None).await;
    assert_eq!(st, 200, "{list}");
    assert_eq!(list["entities"], json!([]), "{list}");
    // Within ±600 s is fine; body_md5 on GET must match the empty body.
    let ok = s
        .signed_with(
            &s.app,
            Method::POST,
            &path,
            Some(&body),
            SignOpts {
                timestamp_offset: -500,
                ..Default::default()
            },
        )
        .await;
    assert_eq!(ok.0, 201, "{}", ok.1);
    let get_md5 = s
        .signed_with(
            &s.app,
            Method::GET,
            &path,
            None,
            SignOpts {
                include_body_md5: Some(true),
                ..Default::default()
            },
        )
        .await;
    assert_eq!(
        get_md5.0, 200,
        "body_md5 of the empty body on GET: {}",
        get_md5.1
    );
    // Another app id with valid creds of this one.
    let resp = s.signed(Method::GET, "/apps/424242/entities", None).await;
    assert!(
        resp.0 == 404 || resp.0 == 401,
        "unknown app id: {} {}",
        resp.0,
        resp.1
    );
}

#[tokio::test]
async fn admin_workspaces_need_the_operator_token() {
    let s = TestServer::start().await;
    let body = serde_json::to_vec(&json!({"name": "Acme"})).expect("ser");
    for (what, bearer) in [("no token", None), ("wrong token", Some("wrong-token"))] {
        let resp = s
            .raw(
                Method::POST,
                "/admin/workspaces",
                bearer,
                Some("application/json"),
                Some(body.clone()),
            )
            .await;
        assert_eq!(resp.0, 401, "{what}: {}", resp.1);
        assert_error(&resp, 401, "auth_failed");
    }
    // With the operator token: 201 {workspace:{id,key,secret,name}}.
    let created = s.create_workspace("Acme").await;
    assert!(
        !created.id.is_empty()
            && created.id.len() <= 20
            && created.id.bytes().all(|b| b.is_ascii_digit()),
        "app id is 1..20 digits: {created:?}"
    );
    assert!(!created.key.is_empty() && !created.secret.is_empty());

    // Explicit id/key/secret are honoured; a duplicate id conflicts.
    let explicit: Value = json!({"id": "777", "name": "Explicit", "key": "key777-explicit", "secret": "s777secret-explicit"});
    let resp = s
        .raw(
            Method::POST,
            "/admin/workspaces",
            Some(&s.admin_token),
            Some("application/json"),
            Some(serde_json::to_vec(&explicit).expect("ser")),
        )
        .await;
    assert_eq!(resp.0, 201, "{}", resp.1);
    assert_eq!(resp.1["workspace"]["id"], json!("777"));
    assert_eq!(resp.1["workspace"]["key"], json!("key777-explicit"));
    let resp = s
        .raw(
            Method::POST,
            "/admin/workspaces",
            Some(&s.admin_token),
            Some("application/json"),
            Some(serde_json::to_vec(&explicit).expect("ser")),
        )
        .await;
    assert_error(&resp, 409, "conflict");
    let resp = s
        .raw(
            Method::POST,
            "/admin/workspaces",
            Some(&s.admin_token),
            Some("application/json"),
            Some(serde_json::to_vec(&json!({"id": "abc", "name": "Bad"})).expect("ser")),
        )
        .await;
    assert_error(&resp, 400, "invalid_input");

    // The new workspace works end to end, and is isolated from the first.
    let path = format!("/apps/{}/entities", created.id);
    let (st, ent) = s
        .signed_with(
            &created,
            Method::POST,
            &path,
            Some(&json!({"id": "wanda", "name": "Wanda", "kind": "human", "role": "owner"})),
            SignOpts::default(),
        )
        .await;
    assert_eq!(st, 201, "{ent}");
    let t = now();
    let token = mint_token(
        &created.key,
        &created.secret,
        &json!({"sub": "wanda", "iat": t, "exp": t + 600}),
    );
    let (st, me) = s.client("wanda", &token).get("/api/me").await;
    assert_eq!(st, 200, "{me}");
    assert_eq!(me["workspace"]["id"], json!(created.id));
    // The first workspace's credentials do not reach the second.
    let resp = s
        .signed_with(&s.app, Method::GET, &path, None, SignOpts::default())
        .await;
    assert!(resp.0 == 401 || resp.0 == 404, "{} {}", resp.0, resp.1);
    // And wanda is unknown in the first workspace.
    let foreign = s.client("wanda", &s.token_for("wanda"));
    assert_error(&foreign.get("/api/me").await, 401, "auth_failed");
}

/// The workspace of a signed request is cached (no store read per request): a cached app
/// still checks every signature, and a settings change applies to the very next request.
#[tokio::test]
async fn a_cached_app_checks_every_signature_and_sees_a_settings_change_at_once() {
    let s = TestServer::start().await;
    let path = format!("/apps/{}/settings", s.app.id);
    let (st, before) = s.signed(Method::GET, &path, None).await;
    assert_eq!(st, 200, "{before}");
    assert_eq!(before["enable_client_messages"], json!(false), "{before}");
    // Right after a good request (the app is cached), a wrong secret is still refused.
    let wrong = AppCreds {
        secret: random_string(32),
        ..s.app.clone()
    };
    let refused = s
        .signed_with(&wrong, Method::GET, &path, None, SignOpts::default())
        .await;
    assert_error(&refused, 401, "auth_failed");
    let tampered = s
        .signed_with(
            &s.app,
            Method::GET,
            &path,
            None,
            SignOpts {
                tamper_signature: true,
                ..Default::default()
            },
        )
        .await;
    assert_error(&tampered, 401, "auth_failed");
    // A settings change is what the next signed request sees.
    let patch = json!({"enable_client_messages": true});
    let (st, patched) = s.signed(Method::PATCH, &path, Some(&patch)).await;
    assert_eq!(st, 200, "{patched}");
    let (st, after) = s.signed(Method::GET, &path, None).await;
    assert_eq!(st, 200, "{after}");
    assert_eq!(after["enable_client_messages"], json!(true), "{after}");
}
