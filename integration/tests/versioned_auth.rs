//! Who may update, delete and append to a versioned message (SPEC §6,
//! docs/versioned-messages.md "Authorization"): the chat API's member/capability/role rules
//! and the server API's privileged and connection-bound (`socket_id`) requests, with
//! capabilities in Switchboard's `{operation: [patterns]}` form and Sockudo's
//! `{pattern: [operations]}` form.
//!
//! The matrices collect every mismatch and fail once with the whole list, so one run shows
//! every cell that disagrees with the contract.

use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};
use switchboard_integration::harness::{
    cursor_str, mint_token, str_of, uniq, urlencode, ApiClient, SignOpts, TestServer, WsClient,
    WsOpts, FRAME_TIMEOUT,
};

const ACTIONS: [&str; 3] = ["update", "delete", "append"];
const ORIGINAL: &str = "original text";

// ------------------------------------------------------------------------- helpers

/// What a cell of a matrix expects.
#[derive(Clone, Debug, PartialEq)]
enum Expect {
    Applied,
    NotPermitted,
    NotAMember,
    NotFound,
    Forbidden,
    Invalid,
    /// 401 `auth_failed`; `Some(sentence)` also pins the error text.
    AuthFailed(Option<String>),
}

impl Expect {
    fn error(&self) -> Option<(u16, &'static str)> {
        match self {
            Expect::Applied => None,
            Expect::NotPermitted => Some((403, "mutable_not_permitted")),
            Expect::NotAMember => Some((403, "not_a_member")),
            Expect::NotFound => Some((404, "not_found")),
            Expect::Forbidden => Some((403, "forbidden")),
            Expect::Invalid => Some((400, "invalid_input")),
            Expect::AuthFailed(_) => Some((401, "auth_failed")),
        }
    }
}

/// Checks an error answer: status, code, the exact `{error, code, status}` envelope and,
/// for `AuthFailed(Some(..))`, the sentence.
fn check_error(resp: &(u16, Value), expect: &Expect) -> Result<(), String> {
    let (st, body) = resp;
    let (want_st, want_code) = expect
        .error()
        .unwrap_or_else(|| panic!("check_error called with {expect:?}"));
    if *st != want_st || body["code"] != json!(want_code) {
        return Err(format!("expected {want_st} {want_code}, got {st} {body}"));
    }
    let mut keys: Vec<&str> = body
        .as_object()
        .map(|o| o.keys().map(String::as_str).collect())
        .unwrap_or_default();
    keys.sort_unstable();
    if keys != ["code", "error", "status"] || body["status"] != json!(want_st) {
        return Err(format!(
            "error body is not exactly the SPEC §8 envelope: {body}"
        ));
    }
    if body["error"].as_str().is_none_or(|s| s.is_empty()) {
        return Err(format!("error sentence missing: {body}"));
    }
    if let Expect::AuthFailed(Some(sentence)) = expect {
        if body["error"] != json!(sentence) {
            return Err(format!(
                "expected error text {sentence:?}, got {:?}",
                body["error"]
            ));
        }
    }
    Ok(())
}

/// The body a matrix sends for `action` (`update`/`append` change `data`; `delete` is bare).
fn action_body(action: &str) -> Value {
    match action {
        "update" => json!({"data": "edited text"}),
        "delete" => json!({}),
        "append" => json!({"data": " +more"}),
        other => panic!("unknown action {other}"),
    }
}

fn event_type(action: &str) -> &'static str {
    match action {
        "update" => "message.updated",
        "delete" => "message.deleted",
        "append" => "message.appended",
        other => panic!("unknown action {other}"),
    }
}

/// Checks that a visible message state reflects `action_body(action)` applied to ORIGINAL.
fn check_state_after(action: &str, m: &Value) -> Result<(), String> {
    let ok = match action {
        "update" => m["data"] == json!("edited text") && m["deleted"] == json!(false),
        "delete" => m["deleted"] == json!(true) && m["data"].is_null(),
        "append" => m["data"] == json!(format!("{ORIGINAL} +more")) && m["deleted"] == json!(false),
        other => panic!("unknown action {other}"),
    };
    if ok {
        Ok(())
    } else {
        Err(format!("visible state after {action} is wrong: {m}"))
    }
}

/// `POST /api/channels/{cid}/messages/{serial}/{action}`.
async fn chat_mutate(
    c: &ApiClient,
    cid: &str,
    serial: &str,
    action: &str,
    body: &Value,
) -> (u16, Value) {
    c.post(
        &format!("/api/channels/{cid}/messages/{serial}/{action}"),
        body,
    )
    .await
}

/// Checks a chat-API answer against `expect`; on success also the `{message, event, status}`
/// shape and the new state.
fn check_chat(
    resp: &(u16, Value),
    expect: &Expect,
    action: &str,
    serial: &str,
) -> Result<(), String> {
    if *expect != Expect::Applied {
        return check_error(resp, expect);
    }
    let (st, body) = resp;
    if *st != 200 {
        return Err(format!("expected 200 applied, got {st} {body}"));
    }
    if body["status"] != json!("applied") {
        return Err(format!("status is not \"applied\": {body}"));
    }
    if body["message"]["message_serial"] != json!(serial) {
        return Err(format!("answer names another message: {body}"));
    }
    if body["event"]["type"] != json!(event_type(action)) {
        return Err(format!("event type is not {}: {body}", event_type(action)));
    }
    if body["event"]["payload"]["message_id"] != json!(serial) {
        return Err(format!("event payload message_id: {body}"));
    }
    check_state_after(action, &body["message"])
}

/// Number of versions of a message through the chat API (default direction, one page).
async fn chat_version_count(c: &ApiClient, cid: &str, serial: &str) -> usize {
    let (st, resp) = c
        .get(&format!("/api/channels/{cid}/messages/{serial}/versions"))
        .await;
    assert_eq!(st, 200, "list versions of {serial}: {resp}");
    resp["versions"]
        .as_array()
        .unwrap_or_else(|| panic!("versions is an array: {resp}"))
        .len()
}

/// A fresh message by `author` with data ORIGINAL; returns its serial.
async fn fresh_message(author: &ApiClient, cid: &str) -> String {
    let r = author.say(cid, ORIGINAL).await;
    str_of(&r["message"]["message_serial"], "message_serial")
}

/// `POST /apps/{appId}/tokens {entity_id, capabilities}` → the token.
async fn token_with_caps(s: &TestServer, entity: &str, caps: Option<&Value>) -> String {
    let mut body = json!({"entity_id": entity});
    if let Some(c) = caps {
        body["capabilities"] = c.clone();
    }
    let (st, resp) = s
        .signed(
            Method::POST,
            &format!("/apps/{}/tokens", s.app.id),
            Some(&body),
        )
        .await;
    assert_eq!(st, 201, "mint token for {entity} with {caps:?}: {resp}");
    str_of(&resp["token"], "token")
}

/// A locally minted token with arbitrary extra claims (exp/iat added).
fn local_token(s: &TestServer, claims: Value) -> String {
    let now = chrono::Utc::now().timestamp();
    let mut c = claims;
    c["iat"] = json!(now);
    c["exp"] = json!(now + 3600);
    mint_token(&s.app.key, &s.app.secret, &c)
}

/// Connects to `/api/realtime/ws` and returns the socket with the `socket_id` announced in
/// its `realtime.ready` frame.
async fn socket(s: &TestServer, token: &str) -> (WsClient, String) {
    let mut ws = s
        .ws_connect(WsOpts {
            token: Some(token.to_owned()),
            ..WsOpts::default()
        })
        .await
        .unwrap_or_else(|e| panic!("websocket connect refused: {e:?}"));
    let ready = ws.next_json(FRAME_TIMEOUT).await;
    assert_eq!(
        ready["type"],
        json!("realtime.ready"),
        "first frame: {ready}"
    );
    assert!(
        !ready["cursor"].is_null(),
        "ready carries a cursor: {ready}"
    );
    let sid = match &ready["socket_id"] {
        Value::String(s) if !s.is_empty() => s.clone(),
        other => {
            panic!("realtime.ready announces a non-empty string socket_id, got {other} in {ready}")
        }
    };
    ws.ready_cursor = Some(cursor_str(&ready["cursor"]));
    (ws, sid)
}

/// A signed server-API request under `/apps/{appId}`.
async fn srv(
    s: &TestServer,
    method: Method,
    sub: &str,
    body: Option<&Value>,
    query: &[(&str, &str)],
) -> (u16, Value) {
    let opts = SignOpts {
        extra_query: query
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        ..SignOpts::default()
    };
    s.signed_with(
        &s.app,
        method,
        &format!("/apps/{}{sub}", s.app.id),
        body,
        opts,
    )
    .await
}

/// `POST /apps/{appId}/events` on one channel with `info`; returns the new message_serial.
async fn publish(s: &TestServer, channel: &str, data: &str, client_id: Option<&str>) -> String {
    let mut body = json!({"name": "message", "data": data, "channel": channel,
                          "info": "subscription_count"});
    if let Some(c) = client_id {
        body["client_id"] = json!(c);
    }
    let (st, resp) = srv(s, Method::POST, "/events", Some(&body), &[]).await;
    assert_eq!(st, 200, "publish on {channel} as {client_id:?}: {resp}");
    let info = &resp["channels"][channel];
    let serial = str_of(&info["message_serial"], "channels.<name>.message_serial");
    assert!(info["history_serial"].is_i64(), "{resp}");
    assert!(info["delivery_serial"].is_i64(), "{resp}");
    assert!(info["version_serial"].is_string(), "{resp}");
    serial
}

/// Server-API mutation.
async fn srv_mutate(
    s: &TestServer,
    channel: &str,
    serial: &str,
    action: &str,
    body: &Value,
) -> (u16, Value) {
    srv(
        s,
        Method::POST,
        &format!("/channels/{channel}/messages/{serial}/{action}"),
        Some(body),
        &[],
    )
    .await
}

/// Versions of a message through the server API, newest first (one page).
async fn srv_versions(s: &TestServer, channel: &str, serial: &str) -> Vec<Value> {
    let (st, resp) = srv(
        s,
        Method::GET,
        &format!("/channels/{channel}/messages/{serial}/versions"),
        None,
        &[],
    )
    .await;
    assert_eq!(st, 200, "server-API versions of {serial}: {resp}");
    resp["items"]
        .as_array()
        .unwrap_or_else(|| panic!("items is an array: {resp}"))
        .clone()
}

/// Checks a server-API answer; on success its documented shape, the version's recorded actor
/// and the new visible state.
async fn check_srv(
    s: &TestServer,
    resp: &(u16, Value),
    expect: &Expect,
    channel: &str,
    serial: &str,
    action: &str,
    actor: Option<&str>,
) -> Result<(), String> {
    if *expect != Expect::Applied {
        check_error(resp, expect)?;
        // A refused request changes nothing.
        let versions = srv_versions(s, channel, serial).await;
        if versions.len() != 1 {
            return Err(format!(
                "refused request still wrote a version: {} versions {versions:?}",
                versions.len()
            ));
        }
        return Ok(());
    }
    let (st, body) = resp;
    if *st != 200 {
        return Err(format!("expected 200 applied, got {st} {body}"));
    }
    let shape_ok = body["channel"] == json!(channel)
        && body["message_serial"] == json!(serial)
        && body["action"] == json!(action)
        && body["accepted"] == json!(true)
        && body["status"] == json!("applied")
        && body["version_serial"].is_string()
        && body["history_serial"].is_i64()
        && body["delivery_serial"].is_i64();
    if !shape_ok {
        return Err(format!("mutation answer shape: {body}"));
    }
    let versions = srv_versions(s, channel, serial).await;
    let newest = versions
        .first()
        .ok_or_else(|| format!("no versions after {action}"))?;
    if newest["action"] != json!(action) || newest["version_serial"] != body["version_serial"] {
        return Err(format!("newest version is not this {action}: {newest}"));
    }
    if newest["version"]["client_id"] != json!(actor) {
        return Err(format!(
            "version actor: expected {actor:?}, got {} in {newest}",
            newest["version"]["client_id"]
        ));
    }
    if action == "append" && newest["data"] != json!(" +more") {
        return Err(format!(
            "an append version carries its fragment as data: {newest}"
        ));
    }
    let (st, got) = srv(
        s,
        Method::GET,
        &format!("/channels/{channel}/messages/{serial}"),
        None,
        &[],
    )
    .await;
    if st != 200 || got["channel"] != json!(channel) {
        return Err(format!("GET message after {action}: {st} {got}"));
    }
    check_state_after(action, &got["item"])
}

// ------------------------------------------------------------------------- chat API

#[tokio::test]
async fn chat_creator_may_update_delete_and_append_own_messages() {
    let s = TestServer::start().await;
    let alice = s.user("alice", "human", "member").await;
    s.create_entity("bob", "Bob", "human", "member").await;
    let ch = alice.create_group(&uniq("own"), &["bob"], json!({})).await;
    let cid = str_of(&ch["id"], "id");

    let mut failures = Vec::new();
    for action in ACTIONS {
        let serial = fresh_message(&alice, &cid).await;
        let resp = chat_mutate(&alice, &cid, &serial, action, &action_body(action)).await;
        if let Err(e) = check_chat(&resp, &Expect::Applied, action, &serial) {
            failures.push(format!("creator {action}: {e}"));
            continue;
        }
        let n = chat_version_count(&alice, &cid, &serial).await;
        if n != 2 {
            failures.push(format!("creator {action}: {n} versions, expected 2"));
        }
        let (st, got) = alice
            .get(&format!("/api/channels/{cid}/messages/{serial}"))
            .await;
        if st != 200 {
            failures.push(format!("GET after {action}: {st} {got}"));
        } else if let Err(e) = check_state_after(action, &got["message"]) {
            failures.push(format!("GET after {action}: {e}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test]
async fn chat_other_member_needs_a_matching_any_capability() {
    let s = TestServer::start().await;
    let alice = s.user("alice", "human", "member").await;
    s.create_entity("bob", "Bob", "human", "member").await;
    let name = uniq("vroom");
    let ch = alice.create_group(&name, &["bob"], json!({})).await;
    let cid = str_of(&ch["id"], "id");

    // (label, capabilities, allowed for [update, delete, append])
    let cases: Vec<(&str, Option<Value>, [bool; 3])> = vec![
        ("no capabilities", None, [false, false, false]),
        (
            "update_any on vroom-*",
            Some(json!({"message_update_any": ["vroom-*"]})),
            [true, false, false],
        ),
        (
            "delete_any on vroom-*",
            Some(json!({"message_delete_any": ["vroom-*"]})),
            [false, true, false],
        ),
        (
            "append_any on vroom-*",
            Some(json!({"message_append_any": ["vroom-*"]})),
            [false, false, true],
        ),
        (
            "all *_any on the exact name",
            Some(
                json!({"message_update_any": [name], "message_delete_any": [name],
                        "message_append_any": [name]}),
            ),
            [true, true, true],
        ),
        (
            "all *_any on *",
            Some(
                json!({"message_update_any": ["*"], "message_delete_any": ["*"],
                        "message_append_any": ["*"]}),
            ),
            [true, true, true],
        ),
        (
            "all *_any on a pattern that does not match",
            Some(
                json!({"message_update_any": ["other-*"], "message_delete_any": ["vroom"],
                        "message_append_any": ["*-nomatch"]}),
            ),
            [false, false, false],
        ),
        (
            "*_own only (another's message)",
            Some(
                json!({"message_update_own": ["*"], "message_delete_own": ["*"],
                        "message_append_own": ["*"]}),
            ),
            [false, false, false],
        ),
        (
            "unrelated capabilities",
            Some(json!({"subscribe": ["*"], "publish": ["*"], "history": ["*"]})),
            [false, false, false],
        ),
    ];

    let mut failures = Vec::new();
    for (label, caps, allowed) in &cases {
        let token = token_with_caps(&s, "bob", caps.as_ref()).await;
        let bob = s.client("bob", &token);
        for (i, action) in ACTIONS.iter().enumerate() {
            let serial = fresh_message(&alice, &cid).await;
            let expect = if allowed[i] {
                Expect::Applied
            } else {
                Expect::NotPermitted
            };
            let resp = chat_mutate(&bob, &cid, &serial, action, &action_body(action)).await;
            if let Err(e) = check_chat(&resp, &expect, action, &serial) {
                failures.push(format!("bob [{label}] {action} alice's message: {e}"));
                continue;
            }
            let n = chat_version_count(&alice, &cid, &serial).await;
            let want = if allowed[i] { 2 } else { 1 };
            if n != want {
                failures.push(format!(
                    "bob [{label}] {action}: {n} versions afterwards, expected {want}"
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test]
async fn chat_moderators_and_owners_may_delete_any_message_but_not_edit_it() {
    let s = TestServer::start().await;
    let alice = s.user("alice", "human", "member").await;
    let mo = s.user("mo", "human", "moderator").await;
    let olive = s.user("olive", "human", "owner").await;
    let ch = alice
        .create_group(&uniq("modroom"), &["mo", "olive"], json!({}))
        .await;
    let cid = str_of(&ch["id"], "id");

    let mut failures = Vec::new();
    for (who, client) in [("moderator", &mo), ("owner", &olive)] {
        for action in ACTIONS {
            let serial = fresh_message(&alice, &cid).await;
            let expect = if action == "delete" {
                Expect::Applied
            } else {
                Expect::NotPermitted
            };
            let resp = chat_mutate(client, &cid, &serial, action, &action_body(action)).await;
            if let Err(e) = check_chat(&resp, &expect, action, &serial) {
                failures.push(format!("{who} {action} of a member's message: {e}"));
            }
        }
        // A tombstone text on a moderation delete.
        let serial = fresh_message(&alice, &cid).await;
        let (st, resp) = chat_mutate(
            client,
            &cid,
            &serial,
            "delete",
            &json!({"data": "[removed]", "description": "spam"}),
        )
        .await;
        if st != 200
            || resp["message"]["deleted"] != json!(true)
            || resp["message"]["data"] != json!("[removed]")
            || resp["message"]["sender"] != json!("alice")
        {
            failures.push(format!("{who} tombstone delete: {st} {resp}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test]
async fn chat_non_members_and_invisible_channels() {
    let s = TestServer::start().await;
    let alice = s.user("alice", "human", "member").await;
    s.create_entity("bob", "Bob", "human", "member").await;
    let dave = s.user("dave", "human", "member").await;
    let public = alice
        .create_group(&uniq("pub"), &["bob"], json!({"visibility": "public"}))
        .await;
    let private = alice.create_group(&uniq("priv"), &["bob"], json!({})).await;
    let pub_id = str_of(&public["id"], "id");
    let priv_id = str_of(&private["id"], "id");
    let all_any = json!({"message_update_any": ["*"], "message_delete_any": ["*"],
                         "message_append_any": ["*"]});
    let dave_caps = s.client("dave", &token_with_caps(&s, "dave", Some(&all_any)).await);

    let mut failures = Vec::new();
    for (label, client) in [("dave", &dave), ("dave with *_any on *", &dave_caps)] {
        for action in ACTIONS {
            // Public channel dave has not joined: visible, so 403 not_a_member.
            let serial = fresh_message(&alice, &pub_id).await;
            let resp = chat_mutate(client, &pub_id, &serial, action, &action_body(action)).await;
            if let Err(e) = check_chat(&resp, &Expect::NotAMember, action, &serial) {
                failures.push(format!(
                    "{label} {action} in a public channel not joined: {e}"
                ));
            }
            // Private channel: invisible, so 404 (capabilities never reach beyond it).
            let serial = fresh_message(&alice, &priv_id).await;
            let resp = chat_mutate(client, &priv_id, &serial, action, &action_body(action)).await;
            if let Err(e) = check_chat(&resp, &Expect::NotFound, action, &serial) {
                failures.push(format!("{label} {action} in an invisible channel: {e}"));
            }
            if chat_version_count(&alice, &priv_id, &serial).await != 1 {
                failures.push(format!("{label} {action}: refused request wrote a version"));
            }
        }
    }
    // A channel that does not exist at all is 404 too.
    let resp = chat_mutate(
        &alice,
        "chn_01ARZ3NDEKTSV4RRFFQ69G5FAV",
        "m000000000001",
        "append",
        &json!({"data": "x"}),
    )
    .await;
    if let Err(e) = check_error(&resp, &Expect::NotFound) {
        failures.push(format!("unknown channel: {e}"));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test]
async fn chat_serials_are_validated_before_lookup() {
    let s = TestServer::start().await;
    let alice = s.user("alice", "human", "member").await;
    s.create_entity("bob", "Bob", "human", "member").await;
    let ch = alice
        .create_group(&uniq("serials"), &["bob"], json!({}))
        .await;
    let cid = str_of(&ch["id"], "id");
    fresh_message(&alice, &cid).await;

    let mut failures = Vec::new();
    let too_long = "m".repeat(129);
    for action in ACTIONS {
        for (serial, expect) in [
            ("m999999999999".to_owned(), Expect::NotFound),
            (urlencode("m 1"), Expect::Invalid),
            (too_long.clone(), Expect::Invalid),
        ] {
            let resp = chat_mutate(&alice, &cid, &serial, action, &action_body(action)).await;
            let res = check_error(&resp, &expect);
            if let Err(e) = res {
                failures.push(format!("{action} on serial {serial:.20}…: {e}"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test]
async fn chat_timed_out_member_is_forbidden_even_on_own_messages() {
    let s = TestServer::start().await;
    let olive = s.user("olive", "human", "owner").await;
    let tina = s.user("tina", "human", "member").await;
    let ch = tina
        .create_group(&uniq("timeout"), &["olive"], json!({}))
        .await;
    let cid = str_of(&ch["id"], "id");
    let serials = [
        fresh_message(&tina, &cid).await,
        fresh_message(&tina, &cid).await,
        fresh_message(&tina, &cid).await,
    ];
    let (st, resp) = olive
        .patch("/api/members/tina", &json!({"timeout_minutes": 10}))
        .await;
    assert_eq!(st, 200, "time tina out: {resp}");

    let mut failures = Vec::new();
    for (action, serial) in ACTIONS.iter().zip(serials.iter()) {
        let resp = chat_mutate(&tina, &cid, serial, action, &action_body(action)).await;
        if let Err(e) = check_chat(&resp, &Expect::Forbidden, action, serial) {
            failures.push(format!("timed-out author {action} own message: {e}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test]
async fn chat_body_socket_id_and_client_id_are_ignored() {
    let s = TestServer::start().await;
    let alice = s.user("alice", "human", "member").await;
    let bob = s.user("bob", "human", "member").await;
    let ch = alice
        .create_group(&uniq("ignored"), &["bob"], json!({}))
        .await;
    let cid = str_of(&ch["id"], "id");

    // Bob claiming to be alice gains nothing.
    let serial = fresh_message(&alice, &cid).await;
    let resp = chat_mutate(
        &bob,
        &cid,
        &serial,
        "append",
        &json!({"data": " +more", "client_id": "alice", "socket_id": "1.2"}),
    )
    .await;
    check_chat(&resp, &Expect::NotPermitted, "append", &serial)
        .unwrap_or_else(|e| panic!("bob with client_id=alice: {e}"));

    // Alice with a bogus socket and someone else's client_id acts as herself.
    let resp = chat_mutate(
        &alice,
        &cid,
        &serial,
        "append",
        &json!({"data": " +more", "client_id": "bob", "socket_id": "999999.999999"}),
    )
    .await;
    check_chat(&resp, &Expect::Applied, "append", &serial)
        .unwrap_or_else(|e| panic!("alice with a bogus socket_id and client_id=bob: {e}"));
    let (st, v) = alice
        .get(&format!(
            "/api/channels/{cid}/messages/{serial}/versions?direction=newest_first&limit=1"
        ))
        .await;
    assert_eq!(st, 200, "{v}");
    let newest = &v["versions"][0];
    assert_eq!(newest["action"], json!("append"), "{v}");
    assert_eq!(
        newest["version"]["client_id"],
        json!("alice"),
        "the actor is the token's entity, not the body's client_id: {v}"
    );
    assert_eq!(newest["sender"], json!("alice"), "{v}");
}

#[tokio::test]
async fn chat_sockudo_capability_claims_grant_any_rights() {
    let s = TestServer::start().await;
    let alice = s.user("alice", "human", "member").await;
    s.create_entity("bob", "Bob", "human", "member").await;
    let name = uniq("sockudo-chat");
    let ch = alice.create_group(&name, &["bob"], json!({})).await;
    let cid = str_of(&ch["id"], "id");

    // (label, x-sockudo-capability, allowed for [update, delete, append])
    let cases: Vec<(&str, Value, [bool; 3])> = vec![
        (
            "hyphen ops on matching pattern",
            json!({"sockudo-chat-*": ["message-update-any", "message-append-any"]}),
            [true, false, true],
        ),
        (
            "snake ops on *",
            json!({"*": ["message_delete_any"]}),
            [false, true, false],
        ),
        (
            "pattern that does not match",
            json!({"elsewhere-*": ["message-update-any", "message-delete-any",
                                   "message-append-any"]}),
            [false, false, false],
        ),
    ];
    let mut failures = Vec::new();
    for (label, cap, allowed) in &cases {
        let token = local_token(
            &s,
            json!({"x-sockudo-client-id": "bob", "x-sockudo-capability": cap}),
        );
        let bob = s.client("bob", &token);
        let (st, me) = bob.get("/api/me").await;
        assert_eq!(st, 200, "a Sockudo-claim token authenticates: {me}");
        for (i, action) in ACTIONS.iter().enumerate() {
            let serial = fresh_message(&alice, &cid).await;
            let expect = if allowed[i] {
                Expect::Applied
            } else {
                Expect::NotPermitted
            };
            let resp = chat_mutate(&bob, &cid, &serial, action, &action_body(action)).await;
            if let Err(e) = check_chat(&resp, &expect, action, &serial) {
                failures.push(format!("bob [{label}] {action}: {e}"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

// ------------------------------------------------------------------------- server API

#[derive(Clone, Copy, Debug)]
enum Creator {
    /// `/events` with `client_id: alice`.
    Alice,
    /// alice through the chat API.
    AliceChat,
    /// `/events` with `client_id: bob`.
    Bob,
    /// `/events` without `client_id`.
    Anon,
}

#[derive(Clone, Copy, Debug)]
enum Sock {
    /// alice's connected socket.
    Alice,
    /// A socket_id no connection has.
    Unknown,
    /// No socket_id: privileged.
    None,
}

struct Cell {
    creator: Creator,
    sock: Sock,
    client_id: Option<&'static str>,
    expect: Expect,
}

fn cell(creator: Creator, sock: Sock, client_id: Option<&'static str>, expect: Expect) -> Cell {
    Cell {
        creator,
        sock,
        client_id,
        expect,
    }
}

struct SrvFixture {
    s: TestServer,
    alice: ApiClient,
    channel: String,
    cid: String,
}

async fn srv_fixture(prefix: &str) -> SrvFixture {
    let s = TestServer::start().await;
    let alice = s.user("alice", "human", "member").await;
    s.create_entity("bob", "Bob", "human", "member").await;
    s.create_entity("carol", "Carol", "human", "member").await;
    let channel = uniq(prefix);
    let ch = alice
        .create_group(&channel, &["bob", "carol"], json!({}))
        .await;
    let cid = str_of(&ch["id"], "id");
    SrvFixture {
        s,
        alice,
        channel,
        cid,
    }
}

async fn create_as(f: &SrvFixture, creator: Creator) -> String {
    match creator {
        Creator::Alice => publish(&f.s, &f.channel, ORIGINAL, Some("alice")).await,
        Creator::Bob => publish(&f.s, &f.channel, ORIGINAL, Some("bob")).await,
        Creator::Anon => publish(&f.s, &f.channel, ORIGINAL, None).await,
        Creator::AliceChat => fresh_message(&f.alice, &f.cid).await,
    }
}

/// Runs one group of cells with alice's socket minted with `caps`; pushes mismatches.
async fn run_cells(
    f: &SrvFixture,
    label: &str,
    action: &str,
    token: &str,
    cells: &[Cell],
    failures: &mut Vec<String>,
) {
    let (ws, sid) = socket(&f.s, token).await;
    for c in cells {
        let serial = create_as(f, c.creator).await;
        let mut body = action_body(action);
        match c.sock {
            Sock::Alice => body["socket_id"] = json!(sid),
            Sock::Unknown => body["socket_id"] = json!("999999.999999"),
            Sock::None => {}
        }
        if let Some(cl) = c.client_id {
            body["client_id"] = json!(cl);
        }
        let resp = srv_mutate(&f.s, &f.channel, &serial, action, &body).await;
        // The recorded actor: the body's client_id, else the socket's entity, else none.
        let actor = match (c.client_id, c.sock) {
            (Some(cl), _) => Some(cl),
            (None, Sock::Alice) => Some("alice"),
            (None, _) => None,
        };
        if let Err(e) = check_srv(&f.s, &resp, &c.expect, &f.channel, &serial, action, actor).await
        {
            failures.push(format!(
                "[{label}] {action} on a message by {:?}, socket {:?}, client_id {:?}: {e}",
                c.creator, c.sock, c.client_id
            ));
        }
    }
    ws.close().await;
}

fn denied_sentence(action: &str, channel: &str) -> Expect {
    Expect::AuthFailed(Some(format!(
        "Connection is not allowed to {action} message on channel '{channel}'"
    )))
}

#[tokio::test]
async fn server_api_own_capabilities_with_socket_id() {
    let f = srv_fixture("ai-own").await;
    let pattern = format!("{}*", &f.channel[..7]);
    let mut failures = Vec::new();
    for action in ACTIONS {
        let caps = json!({ format!("message_{action}_own"): [pattern.clone()] });
        let token = token_with_caps(&f.s, "alice", Some(&caps)).await;
        let denied = denied_sentence(action, &f.channel);
        let cells = vec![
            // (a) own message, actor named and matching.
            cell(Creator::Alice, Sock::Alice, Some("alice"), Expect::Applied),
            // (a) own message created through the chat API.
            cell(
                Creator::AliceChat,
                Sock::Alice,
                Some("alice"),
                Expect::Applied,
            ),
            // (a) actor implied by the socket's entity.
            cell(Creator::Alice, Sock::Alice, None, Expect::Applied),
            // (b) another entity's message.
            cell(
                Creator::Bob,
                Sock::Alice,
                Some("alice"),
                Expect::NotPermitted,
            ),
            cell(Creator::Bob, Sock::Alice, None, Expect::NotPermitted),
            // (c) unidentified creator: no *_own right can match.
            cell(
                Creator::Anon,
                Sock::Alice,
                Some("alice"),
                Expect::NotPermitted,
            ),
            // (e) client_id that is not the socket's entity.
            cell(Creator::Alice, Sock::Alice, Some("bob"), denied.clone()),
            cell(Creator::Bob, Sock::Alice, Some("bob"), denied.clone()),
            // (f) unknown socket.
            cell(Creator::Alice, Sock::Unknown, Some("alice"), denied.clone()),
            cell(
                Creator::Alice,
                Sock::Unknown,
                None,
                Expect::AuthFailed(None),
            ),
            // (g) privileged.
            cell(Creator::Bob, Sock::None, None, Expect::Applied),
            cell(Creator::Anon, Sock::None, Some("carol"), Expect::Applied),
            cell(Creator::Alice, Sock::None, Some("bob"), Expect::Applied),
        ];
        run_cells(
            &f,
            &format!("{action}_own"),
            action,
            &token,
            &cells,
            &mut failures,
        )
        .await;
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test]
async fn server_api_any_capabilities_with_socket_id() {
    let f = srv_fixture("ai-any").await;
    let pattern = format!("{}*", &f.channel[..7]);
    let mut failures = Vec::new();
    for action in ACTIONS {
        let caps = json!({ format!("message_{action}_any"): [pattern.clone()] });
        let token = token_with_caps(&f.s, "alice", Some(&caps)).await;
        let denied = denied_sentence(action, &f.channel);
        let cells = vec![
            // (d) *_any: any creator.
            cell(Creator::Alice, Sock::Alice, Some("alice"), Expect::Applied),
            cell(Creator::Bob, Sock::Alice, Some("alice"), Expect::Applied),
            cell(Creator::Anon, Sock::Alice, Some("alice"), Expect::Applied),
            cell(Creator::Bob, Sock::Alice, None, Expect::Applied),
            // (e) / (f) the connection check comes before capabilities.
            cell(Creator::Bob, Sock::Alice, Some("bob"), denied.clone()),
            cell(Creator::Bob, Sock::Unknown, Some("alice"), denied.clone()),
            // (g) privileged.
            cell(Creator::Anon, Sock::None, None, Expect::Applied),
        ];
        run_cells(
            &f,
            &format!("{action}_any"),
            action,
            &token,
            &cells,
            &mut failures,
        )
        .await;
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test]
async fn server_api_socket_capabilities_that_do_not_apply() {
    let f = srv_fixture("ai-miss").await;
    let mut failures = Vec::new();
    for action in ACTIONS {
        let others: Vec<&str> = ACTIONS.iter().copied().filter(|a| *a != action).collect();
        let groups: Vec<(String, Option<Value>)> = vec![
            (
                "other operations only".to_owned(),
                Some(json!({
                    format!("message_{}_any", others[0]): ["*"],
                    format!("message_{}_own", others[1]): ["*"],
                })),
            ),
            (
                "pattern does not match the channel".to_owned(),
                Some(json!({
                    format!("message_{action}_any"): ["elsewhere-*"],
                    format!("message_{action}_own"): ["ai-miss"],
                })),
            ),
            ("no capabilities".to_owned(), None),
        ];
        for (label, caps) in groups {
            let token = token_with_caps(&f.s, "alice", caps.as_ref()).await;
            let cells = vec![
                cell(
                    Creator::Alice,
                    Sock::Alice,
                    Some("alice"),
                    Expect::NotPermitted,
                ),
                cell(
                    Creator::Bob,
                    Sock::Alice,
                    Some("alice"),
                    Expect::NotPermitted,
                ),
                // Privileged requests do not look at any socket.
                cell(Creator::Bob, Sock::None, None, Expect::Applied),
            ];
            run_cells(&f, &label, action, &token, &cells, &mut failures).await;
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test]
async fn server_api_socket_id_belongs_to_a_live_connection() {
    let f = srv_fixture("ai-live").await;
    let caps = json!({"message_append_any": ["*"]});
    let token = token_with_caps(&f.s, "alice", Some(&caps)).await;
    let (ws1, sid1) = socket(&f.s, &token).await;
    let (ws2, sid2) = socket(&f.s, &token).await;
    assert_ne!(sid1, sid2, "each connection gets its own socket_id");

    let serial = publish(&f.s, &f.channel, ORIGINAL, Some("bob")).await;
    for sid in [&sid1, &sid2] {
        let resp = srv_mutate(
            &f.s,
            &f.channel,
            &serial,
            "append",
            &json!({"data": "+", "socket_id": sid}),
        )
        .await;
        assert_eq!(resp.0, 200, "append through live socket {sid}: {}", resp.1);
    }

    // Once the socket is gone, its id no longer authorizes anything.
    ws1.close().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let last = loop {
        let resp = srv_mutate(
            &f.s,
            &f.channel,
            &serial,
            "append",
            &json!({"data": "+", "socket_id": sid1}),
        )
        .await;
        if resp.0 != 200 || tokio::time::Instant::now() > deadline {
            break resp;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    check_error(&last, &denied_sentence("append", &f.channel))
        .unwrap_or_else(|e| panic!("closed socket {sid1}: {e}"));
    // The other connection still works.
    let resp = srv_mutate(
        &f.s,
        &f.channel,
        &serial,
        "append",
        &json!({"data": "+", "socket_id": sid2}),
    )
    .await;
    assert_eq!(resp.0, 200, "append through the other socket: {}", resp.1);
    ws2.close().await;
}

#[tokio::test]
async fn server_api_sockudo_capability_form_on_a_socket() {
    let f = srv_fixture("ai-sockudo").await;
    let pattern = format!("{}*", &f.channel[..10]);
    let mut failures = Vec::new();

    // Hyphen-case own right, entity named by x-sockudo-client-id.
    let token = local_token(
        &f.s,
        json!({"x-sockudo-client-id": "alice",
               "x-sockudo-capability": {pattern.clone(): ["message-append-own"]}}),
    );
    let cells = vec![
        cell(Creator::Alice, Sock::Alice, Some("alice"), Expect::Applied),
        cell(Creator::AliceChat, Sock::Alice, None, Expect::Applied),
        cell(
            Creator::Bob,
            Sock::Alice,
            Some("alice"),
            Expect::NotPermitted,
        ),
        cell(
            Creator::Anon,
            Sock::Alice,
            Some("alice"),
            Expect::NotPermitted,
        ),
        cell(
            Creator::Alice,
            Sock::Alice,
            Some("bob"),
            denied_sentence("append", &f.channel),
        ),
    ];
    run_cells(
        &f,
        "sockudo append-own",
        "append",
        &token,
        &cells,
        &mut failures,
    )
    .await;
    // The same token grants nothing else.
    let cells = vec![cell(
        Creator::Alice,
        Sock::Alice,
        Some("alice"),
        Expect::NotPermitted,
    )];
    run_cells(
        &f,
        "sockudo append-own",
        "update",
        &token,
        &cells,
        &mut failures,
    )
    .await;

    // Snake-case and hyphen-case any rights mixed in one list.
    let token = local_token(
        &f.s,
        json!({"x-sockudo-client-id": "alice",
               "x-sockudo-capability": {"*": ["message_update_any", "message-delete-any"]}}),
    );
    for action in ["update", "delete"] {
        let cells = vec![
            cell(Creator::Bob, Sock::Alice, Some("alice"), Expect::Applied),
            cell(Creator::Anon, Sock::Alice, None, Expect::Applied),
        ];
        run_cells(&f, "sockudo any", action, &token, &cells, &mut failures).await;
    }
    let cells = vec![cell(
        Creator::Bob,
        Sock::Alice,
        Some("alice"),
        Expect::NotPermitted,
    )];
    run_cells(&f, "sockudo any", "append", &token, &cells, &mut failures).await;

    // A Sockudo pattern that does not match the channel.
    let token = local_token(
        &f.s,
        json!({"x-sockudo-client-id": "alice",
               "x-sockudo-capability": {"private-ai:*": ["message-append-own",
                                                          "message-append-any"]}}),
    );
    let cells = vec![
        cell(
            Creator::Alice,
            Sock::Alice,
            Some("alice"),
            Expect::NotPermitted,
        ),
        cell(
            Creator::Bob,
            Sock::Alice,
            Some("alice"),
            Expect::NotPermitted,
        ),
    ];
    run_cells(
        &f,
        "sockudo non-matching",
        "append",
        &token,
        &cells,
        &mut failures,
    )
    .await;

    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test]
async fn server_api_rejects_a_socket_of_another_workspace() {
    let f = srv_fixture("ai-tenant").await;
    // Workspace 2 has its own "alice" whose token grants every *_any right everywhere.
    let other = f.s.create_workspace("tenant-two").await;
    let (st, r) =
        f.s.signed_with(
            &other,
            Method::POST,
            &format!("/apps/{}/entities", other.id),
            Some(&json!({"id": "alice", "name": "alice", "kind": "human", "role": "owner"})),
            SignOpts::default(),
        )
        .await;
    assert_eq!(st, 201, "entity in workspace 2: {r}");
    let now = chrono::Utc::now().timestamp();
    let token = mint_token(
        &other.key,
        &other.secret,
        &json!({"sub": "alice", "iat": now, "exp": now + 3600,
                "capabilities": {"message_update_any": ["*"], "message_delete_any": ["*"],
                                 "message_append_any": ["*"]}}),
    );
    let (ws, sid) = socket(&f.s, &token).await;

    let mut failures = Vec::new();
    for action in ACTIONS {
        for client_id in [None, Some("alice")] {
            let serial = publish(&f.s, &f.channel, ORIGINAL, Some("alice")).await;
            let mut body = action_body(action);
            body["socket_id"] = json!(sid);
            if let Some(c) = client_id {
                body["client_id"] = json!(c);
            }
            let resp = srv_mutate(&f.s, &f.channel, &serial, action, &body).await;
            if let Err(e) = check_srv(
                &f.s,
                &resp,
                &denied_sentence(action, &f.channel),
                &f.channel,
                &serial,
                action,
                None,
            )
            .await
            {
                failures.push(format!(
                    "{action} in workspace 1 through workspace 2's socket (client_id {client_id:?}): {e}"
                ));
            }
        }
    }
    ws.close().await;
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test]
async fn server_api_socket_capabilities_never_reach_an_invisible_channel() {
    // SPEC §6: "Capabilities never reach beyond what the entity may see." The contract doc
    // names no code for a connection-bound request on a channel its entity cannot see, so any
    // refusal is accepted here; acceptance (200) is the failure.
    let f = srv_fixture("ai-hidden").await;
    f.s.create_entity("dave", "Dave", "human", "member").await;
    let dave = f.s.client("dave", &f.s.token_for("dave"));
    let mine = dave
        .create_group(&uniq("ai-daves"), &["bob"], json!({}))
        .await;
    let mine_name = str_of(&mine["name"], "name");
    let all_any = json!({"message_update_any": ["*"], "message_delete_any": ["*"],
                         "message_append_any": ["*"]});
    let token = token_with_caps(&f.s, "dave", Some(&all_any)).await;
    let (ws, sid) = socket(&f.s, &token).await;

    let mut failures = Vec::new();
    for action in ACTIONS {
        // Control: a private channel dave belongs to.
        let serial = publish(&f.s, &mine_name, ORIGINAL, Some("bob")).await;
        let mut body = action_body(action);
        body["socket_id"] = json!(sid);
        let resp = srv_mutate(&f.s, &mine_name, &serial, action, &body).await;
        if resp.0 != 200 {
            failures.push(format!(
                "control: dave's socket {action} in his own channel: {} {}",
                resp.0, resp.1
            ));
        }
        // alice's private channel, which dave cannot see.
        for client_id in [None, Some("dave")] {
            let serial = publish(&f.s, &f.channel, ORIGINAL, Some("alice")).await;
            let mut body = action_body(action);
            body["socket_id"] = json!(sid);
            if let Some(c) = client_id {
                body["client_id"] = json!(c);
            }
            let resp = srv_mutate(&f.s, &f.channel, &serial, action, &body).await;
            let refused = [
                Expect::AuthFailed(None),
                Expect::NotPermitted,
                Expect::NotAMember,
                Expect::NotFound,
            ]
            .iter()
            .any(|e| check_error(&resp, e).is_ok());
            if !refused {
                failures.push(format!(
                    "dave's socket (*_any on *) {action} in a private channel he cannot see \
                     (client_id {client_id:?}): expected a refusal, got {} {}",
                    resp.0, resp.1
                ));
            } else if srv_versions(&f.s, &f.channel, &serial).await.len() != 1 {
                failures.push(format!("{action}: refused request wrote a version"));
            }
        }
    }
    ws.close().await;

    // A former member keeps no *_own right on a channel it can no longer see: bob wrote
    // messages, then alice removed him.
    let mut by_bob = Vec::new();
    let mut by_bob_chat = Vec::new();
    let bob_plain = f.s.client("bob", &f.s.token_for("bob"));
    for _ in ACTIONS {
        by_bob.push(publish(&f.s, &f.channel, ORIGINAL, Some("bob")).await);
        by_bob_chat.push(fresh_message(&bob_plain, &f.cid).await);
    }
    let (st, r) = f
        .alice
        .delete(&format!("/api/channels/{}/members/bob", f.cid))
        .await;
    assert!(st == 200 || st == 204, "remove bob: {st} {r}");
    let own = json!({"message_update_own": ["*"], "message_delete_own": ["*"],
                     "message_append_own": ["*"]});
    let token = token_with_caps(&f.s, "bob", Some(&own)).await;
    let bob = f.s.client("bob", &token);
    let (ws, sid) = socket(&f.s, &token).await;
    for (i, action) in ACTIONS.iter().enumerate() {
        let resp = chat_mutate(&bob, &f.cid, &by_bob_chat[i], action, &action_body(action)).await;
        if let Err(e) = check_error(&resp, &Expect::NotFound) {
            failures.push(format!(
                "former member {action} own message (chat API): {e}"
            ));
        }
        let mut body = action_body(action);
        body["socket_id"] = json!(sid);
        let resp = srv_mutate(&f.s, &f.channel, &by_bob[i], action, &body).await;
        let refused = [
            Expect::AuthFailed(None),
            Expect::NotPermitted,
            Expect::NotAMember,
            Expect::NotFound,
        ]
        .iter()
        .any(|e| check_error(&resp, e).is_ok());
        if !refused {
            failures.push(format!(
                "former member's socket (*_own on *) {action} own message in a channel he \
                 left: expected a refusal, got {} {}",
                resp.0, resp.1
            ));
        }
    }
    ws.close().await;
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
