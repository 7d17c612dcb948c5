//! Versioned messages through the chat API (docs/versioned-messages.md, SPEC §2, §7, §8):
//! update/delete/append rules, stream limits, op_id idempotency, immutable channels, the
//! feature flag, version listings, history and the realtime events they emit.

use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};
use switchboard_integration::harness::{
    assert_error, cursor_str, of_type, urlencode, ApiClient, TestServer, WsClient,
};

const WAIT: Duration = Duration::from_secs(10);

// ------------------------------------------------------------------------- helpers

fn serial(v: &Value) -> String {
    v["message_serial"]
        .as_str()
        .unwrap_or_else(|| panic!("message_serial is a string: {v}"))
        .to_owned()
}

/// `m` + 12 digits (the create's seq).
fn mser(n: u64) -> String {
    format!("m{n:012}")
}

/// `v` + 12 digits (the version's seq).
fn vser(n: u64) -> String {
    format!("v{n:012}")
}

/// A server with alice and bob, members of one private group; returns its id.
async fn setup(room: &str) -> (TestServer, ApiClient, ApiClient, String) {
    let s = TestServer::start().await;
    let alice = s.user("alice", "human", "member").await;
    let bob = s.user("bob", "human", "member").await;
    let ch = alice.create_group(room, &["bob"], json!({})).await;
    let cid = ch["id"].as_str().expect("channel id").to_owned();
    (s, alice, bob, cid)
}

fn action_path(cid: &str, ser: &str, action: &str) -> String {
    format!("/api/channels/{cid}/messages/{ser}/{action}")
}

async fn act(c: &ApiClient, cid: &str, ser: &str, action: &str, body: &Value) -> (u16, Value) {
    c.post(&action_path(cid, ser, action), body).await
}

/// A mutation that must be applied: 200 `{message, event, status: "applied"}`.
async fn apply(c: &ApiClient, cid: &str, ser: &str, action: &str, body: &Value) -> Value {
    let (st, resp) = act(c, cid, ser, action, body).await;
    assert_eq!(st, 200, "{action} {body} on {ser}: {st} {resp}");
    assert_eq!(
        resp["status"],
        json!("applied"),
        "{action} {body}: status applied: {resp}"
    );
    assert!(
        resp["message"].is_object(),
        "{action} answers a message: {resp}"
    );
    assert!(
        resp["event"].is_object(),
        "{action} answers an event: {resp}"
    );
    resp
}

/// `GET /api/channels/{id}/messages/{serial}` → the message object.
async fn get_msg(c: &ApiClient, cid: &str, ser: &str) -> Value {
    let (st, resp) = c.get(&format!("/api/channels/{cid}/messages/{ser}")).await;
    assert_eq!(st, 200, "get message {ser}: {resp}");
    resp["message"].clone()
}

/// One page of `GET .../versions?{query}`.
async fn versions_page(c: &ApiClient, cid: &str, ser: &str, query: &str) -> (u16, Value) {
    let q = if query.is_empty() {
        String::new()
    } else {
        format!("?{query}")
    };
    c.get(&format!("/api/channels/{cid}/messages/{ser}/versions{q}"))
        .await
}

/// Every version (one page of the maximum size), in the given direction.
async fn all_versions(c: &ApiClient, cid: &str, ser: &str, direction: &str) -> Vec<Value> {
    let (st, resp) = versions_page(c, cid, ser, &format!("limit=100&direction={direction}")).await;
    assert_eq!(st, 200, "versions of {ser}: {resp}");
    assert_eq!(resp["has_more"], json!(false), "one page holds all: {resp}");
    resp["versions"]
        .as_array()
        .unwrap_or_else(|| panic!("versions is an array: {resp}"))
        .clone()
}

fn field<'a>(items: &'a [Value], key: &str) -> Vec<&'a Value> {
    items.iter().map(|v| &v[key]).collect()
}

/// What a client can observe of one message and its channel.
async fn snapshot(c: &ApiClient, cid: &str, ser: &str) -> Value {
    let message = get_msg(c, cid, ser).await;
    let (vst, versions) = versions_page(c, cid, ser, "limit=100").await;
    let last_seq = c.channel(cid).await["last_seq"].clone();
    json!({"message": message, "versions_status": vst, "versions": versions, "last_seq": last_seq})
}

/// The request fails with `status`/`code` and changes nothing observable.
async fn assert_rejected(
    c: &ApiClient,
    cid: &str,
    ser: &str,
    action: &str,
    body: &Value,
    status: u16,
    code: &str,
) -> Value {
    let before = snapshot(c, cid, ser).await;
    let resp = act(c, cid, ser, action, body).await;
    assert_error(&resp, status, code);
    let after = snapshot(c, cid, ser).await;
    assert_eq!(
        before, after,
        "a rejected {action} {body} ({status} {code}) changed nothing"
    );
    resp.1
}

async fn settings_patch(s: &TestServer, patch: &Value) -> Value {
    let path = format!("/apps/{}/settings", s.app.id);
    let (st, body) = s.signed(Method::PATCH, &path, Some(patch)).await;
    assert_eq!(st, 200, "PATCH settings {patch}: {body}");
    body
}

/// Replaces the whole `ai_transport` object (all four keys).
async fn set_ai_transport(s: &TestServer, bytes: u64, appends: u64, open: u64, idle: u64) {
    let ai = json!({
        "max_accumulated_message_bytes": bytes,
        "max_appends_per_message": appends,
        "max_open_streaming_messages_per_channel": open,
        "stream_idle_timeout_seconds": idle,
    });
    let body = settings_patch(s, &json!({"ai_transport": ai})).await;
    assert_eq!(
        body["ai_transport"], ai,
        "settings echo ai_transport: {body}"
    );
}

async fn set_versioned_enabled(s: &TestServer, enabled: bool) {
    let vm = json!({
        "enabled": enabled,
        "max_page_size": 100,
        "retention_window_seconds": 0,
        "purge_batch_size": 1000,
    });
    let body = settings_patch(s, &json!({"versioned_messages": vm})).await;
    assert_eq!(
        body["versioned_messages"]["enabled"],
        json!(enabled),
        "settings echo versioned_messages.enabled: {body}"
    );
}

/// Posts a marker message and reads the socket up to its `message.created`; returns every
/// frame read (the marker's event last). Synchronizes on an event instead of sleeping.
async fn read_through_marker(
    ws: &mut WsClient,
    poster: &ApiClient,
    cid: &str,
    text: &str,
) -> Vec<Value> {
    let marker = poster.say(cid, text).await;
    let mser = serial(&marker["message"]);
    ws.collect_until(WAIT, |f| {
        f["type"] == json!("message.created") && f["payload"]["message_id"] == json!(mser)
    })
    .await
}

fn sentence(resp: &Value) -> String {
    resp["error"]
        .as_str()
        .unwrap_or_else(|| panic!("error sentence: {resp}"))
        .to_owned()
}

// ------------------------------------------------------------------------- update

#[tokio::test]
async fn update_absent_keeps_present_replaces_clear_fields_clears() {
    let (_s, alice, _bob, cid) = setup("upd-tri").await;
    let created = alice
        .post_message(
            &cid,
            &json!({"name": "greeting", "data": "hello", "extras": {"a": 1}}),
        )
        .await;
    let ser = serial(&created["message"]);
    assert_eq!(ser, mser(1), "message_serial format: {created}");
    assert_eq!(created["message"]["version_serial"], json!(vser(1)));

    // Only data present: name and extras are kept.
    let r = apply(&alice, &cid, &ser, "update", &json!({"data": "bye"})).await;
    let m = &r["message"];
    assert_eq!(m["message_serial"], json!(ser), "{m}");
    assert_eq!(m["history_serial"], json!(1), "{m}");
    assert_eq!(m["version_serial"], json!(vser(2)), "{m}");
    assert_eq!(m["name"], json!("greeting"), "absent name keeps: {m}");
    assert_eq!(m["data"], json!("bye"), "present data replaces: {m}");
    assert_eq!(m["extras"], json!({"a": 1}), "absent extras keeps: {m}");
    assert_eq!(m["deleted"], json!(false), "{m}");
    assert_eq!(r["event"]["type"], json!("message.updated"), "{r}");
    assert_eq!(r["event"]["seq"], json!(2), "{r}");

    // "" is present: it replaces (it is not "absent" and not a clear).
    let r = apply(&alice, &cid, &ser, "update", &json!({"data": ""})).await;
    assert_eq!(
        r["message"]["data"],
        json!(""),
        "empty string replaces: {r}"
    );
    assert_eq!(r["message"]["name"], json!("greeting"), "{r}");

    // name replaces; data "" kept.
    let r = apply(&alice, &cid, &ser, "update", &json!({"name": "renamed"})).await;
    assert_eq!(r["message"]["name"], json!("renamed"), "{r}");
    assert_eq!(r["message"]["data"], json!(""), "{r}");
    assert_eq!(r["message"]["extras"], json!({"a": 1}), "{r}");

    // null is present too: it replaces data with null.
    apply(&alice, &cid, &ser, "update", &json!({"data": "again"})).await;
    let r = apply(&alice, &cid, &ser, "update", &json!({"data": null})).await;
    assert!(r["message"]["data"].is_null(), "null replaces: {r}");

    // clear_fields clears name (back to "message") and data (null); extras kept.
    apply(&alice, &cid, &ser, "update", &json!({"data": "text"})).await;
    let r = apply(
        &alice,
        &cid,
        &ser,
        "update",
        &json!({"clear_fields": ["name", "data"]}),
    )
    .await;
    assert_eq!(r["message"]["name"], json!("message"), "{r}");
    assert!(r["message"]["data"].is_null(), "{r}");
    assert_eq!(r["message"]["extras"], json!({"a": 1}), "{r}");

    // clear extras → {}.
    let r = apply(
        &alice,
        &cid,
        &ser,
        "update",
        &json!({"clear_fields": ["extras"]}),
    )
    .await;
    assert_eq!(r["message"]["extras"], json!({}), "{r}");
    assert_eq!(r["message"]["version_serial"], json!(vser(9)), "{r}");

    // The read shows the same latest state.
    let got = get_msg(&alice, &cid, &ser).await;
    for k in ["name", "data", "extras", "version_serial", "deleted"] {
        assert_eq!(got[k], r["message"][k], "GET agrees on {k}: {got}");
    }
    assert_eq!(
        all_versions(&alice, &cid, &ser, "oldest_first").await.len(),
        9
    );
}

#[tokio::test]
async fn update_invalid_combinations_are_400_and_change_nothing() {
    let (_s, alice, _bob, cid) = setup("upd-bad").await;
    let created = alice
        .post_message(
            &cid,
            &json!({"name": "n", "data": "keep me", "extras": {"a": 1}}),
        )
        .await;
    let ser = serial(&created["message"]);

    let bad = [
        (
            "replace and clear data",
            json!({"data": "x", "clear_fields": ["data"]}),
        ),
        (
            "replace and clear extras",
            json!({"extras": {"b": 1}, "clear_fields": ["extras"]}),
        ),
        (
            "replace and clear name",
            json!({"name": "x", "clear_fields": ["name"]}),
        ),
        (
            "field listed twice",
            json!({"clear_fields": ["data", "data"]}),
        ),
        ("unknown clear field", json!({"clear_fields": ["body"]})),
        ("empty update", json!({})),
        ("empty clear_fields only", json!({"clear_fields": []})),
        ("unknown body field", json!({"data": "x", "bogus": 1})),
        ("empty name", json!({"name": ""})),
        ("name over 200 bytes", json!({"name": "n".repeat(201)})),
        ("extras not an object", json!({"extras": [1, 2]})),
        ("clear_fields not a list", json!({"clear_fields": "data"})),
    ];
    for (what, body) in bad {
        eprintln!("case: {what}");
        assert_rejected(&alice, &cid, &ser, "update", &body, 400, "invalid_input").await;
    }
    // Still the create only.
    let m = get_msg(&alice, &cid, &ser).await;
    assert_eq!(m["data"], json!("keep me"), "{m}");
    assert_eq!(m["version_serial"], json!(vser(1)), "{m}");
    assert_eq!(alice.channel(&cid).await["last_seq"], json!(1));
    // A 200-byte name is fine.
    let r = apply(
        &alice,
        &cid,
        &ser,
        "update",
        &json!({"name": "n".repeat(200)}),
    )
    .await;
    assert_eq!(
        r["event"]["seq"],
        json!(2),
        "no seq was taken by rejections: {r}"
    );
}

#[tokio::test]
async fn patching_is_shallow_extras_replaced_whole() {
    let (_s, alice, _bob, cid) = setup("shallow").await;
    let created = alice
        .post_message(
            &cid,
            &json!({"data": "d", "extras": {"a": {"x": 1, "y": 2}, "b": true}}),
        )
        .await;
    let ser = serial(&created["message"]);
    let r = apply(
        &alice,
        &cid,
        &ser,
        "update",
        &json!({"extras": {"a": {"x": 9}}}),
    )
    .await;
    assert_eq!(
        r["message"]["extras"],
        json!({"a": {"x": 9}}),
        "extras replaced whole, not merged: {r}"
    );
    assert_eq!(r["message"]["data"], json!("d"), "{r}");
    assert_eq!(
        get_msg(&alice, &cid, &ser).await["extras"],
        json!({"a": {"x": 9}})
    );
}

// ------------------------------------------------------------------------- delete

#[tokio::test]
async fn delete_keeps_the_chain_and_clears_visible_data_and_extras() {
    let (_s, alice, _bob, cid) = setup("del-chain").await;
    let created = alice
        .post_message(
            &cid,
            &json!({"name": "note", "data": "secret", "extras": {"k": 1}}),
        )
        .await;
    let ser = serial(&created["message"]);
    apply(&alice, &cid, &ser, "update", &json!({"data": "edited"})).await;

    let r = apply(&alice, &cid, &ser, "delete", &json!({})).await;
    let m = &r["message"];
    assert_eq!(m["deleted"], json!(true), "{m}");
    assert!(m["data"].is_null(), "delete clears data: {m}");
    assert_eq!(m["extras"], json!({}), "delete clears extras: {m}");
    assert_eq!(m["name"], json!("note"), "name is kept: {m}");
    assert_eq!(m["version_serial"], json!(vser(3)), "{m}");
    assert_eq!(r["event"]["type"], json!("message.deleted"), "{r}");
    assert_eq!(r["event"]["seq"], json!(3), "{r}");

    let got = get_msg(&alice, &cid, &ser).await;
    assert_eq!(got["deleted"], json!(true), "{got}");
    assert!(got["data"].is_null(), "{got}");
    assert_eq!(got["extras"], json!({}), "{got}");

    // The chain is kept: older versions still carry their data.
    let vs = all_versions(&alice, &cid, &ser, "oldest_first").await;
    assert_eq!(
        field(&vs, "action"),
        vec![&json!("create"), &json!("update"), &json!("delete")],
        "{vs:?}"
    );
    assert_eq!(
        field(&vs, "data"),
        vec![&json!("secret"), &json!("edited"), &Value::Null],
        "{vs:?}"
    );
    assert_eq!(
        field(&vs, "extras"),
        vec![&json!({"k": 1}), &json!({"k": 1}), &json!({})],
        "{vs:?}"
    );
    assert_eq!(
        field(&vs, "deleted"),
        vec![&json!(false), &json!(false), &json!(true)],
        "{vs:?}"
    );

    // A deleted message can be deleted again: a new version.
    let r = apply(&alice, &cid, &ser, "delete", &json!({})).await;
    assert_eq!(r["message"]["version_serial"], json!(vser(4)), "{r}");
    assert_eq!(r["message"]["deleted"], json!(true), "{r}");
    assert_eq!(
        all_versions(&alice, &cid, &ser, "oldest_first").await.len(),
        4
    );
}

#[tokio::test]
async fn delete_body_may_replace_data_or_extras_as_a_tombstone() {
    let (_s, alice, _bob, cid) = setup("del-tomb").await;
    let a = serial(
        &alice
            .post_message(&cid, &json!({"data": "rude", "extras": {"z": 1}}))
            .await["message"],
    );
    let b = serial(
        &alice
            .post_message(&cid, &json!({"data": "spam", "extras": {"z": 2}}))
            .await["message"],
    );

    let r = apply(&alice, &cid, &a, "delete", &json!({"data": "[removed]"})).await;
    assert_eq!(r["message"]["deleted"], json!(true), "{r}");
    assert_eq!(
        r["message"]["data"],
        json!("[removed]"),
        "tombstone text: {r}"
    );
    assert_eq!(
        r["message"]["extras"],
        json!({}),
        "extras still cleared: {r}"
    );
    let got = get_msg(&alice, &cid, &a).await;
    assert_eq!(got["data"], json!("[removed]"), "{got}");

    let r = apply(
        &alice,
        &cid,
        &b,
        "delete",
        &json!({"extras": {"reason": "spam"}}),
    )
    .await;
    assert_eq!(r["message"]["deleted"], json!(true), "{r}");
    assert!(r["message"]["data"].is_null(), "data cleared: {r}");
    assert_eq!(r["message"]["extras"], json!({"reason": "spam"}), "{r}");

    // The older version still has the original data.
    let vs = all_versions(&alice, &cid, &a, "oldest_first").await;
    assert_eq!(vs[0]["data"], json!("rude"), "{vs:?}");
    assert_eq!(vs[0]["extras"], json!({"z": 1}), "{vs:?}");
}

#[tokio::test]
async fn delete_with_name_is_invalid_input() {
    let (_s, alice, _bob, cid) = setup("del-name").await;
    let ser = serial(&alice.say(&cid, "hello").await["message"]);
    assert_rejected(
        &alice,
        &cid,
        &ser,
        "delete",
        &json!({"name": "renamed"}),
        400,
        "invalid_input",
    )
    .await;
    assert_eq!(get_msg(&alice, &cid, &ser).await["deleted"], json!(false));
}

#[tokio::test]
async fn append_after_delete_is_invalid_input() {
    let (_s, alice, _bob, cid) = setup("del-append").await;
    let ser = serial(&alice.say(&cid, "partial").await["message"]);
    apply(&alice, &cid, &ser, "append", &json!({"data": " reply"})).await;
    apply(&alice, &cid, &ser, "delete", &json!({})).await;
    assert_rejected(
        &alice,
        &cid,
        &ser,
        "append",
        &json!({"data": " more"}),
        400,
        "invalid_input",
    )
    .await;
}

// ------------------------------------------------------------------------- append

#[tokio::test]
async fn append_concatenates_onto_string_data() {
    let (_s, alice, _bob, cid) = setup("app-str").await;
    let ser = serial(&alice.say(&cid, "Hel").await["message"]);
    let r = apply(&alice, &cid, &ser, "append", &json!({"data": "lo"})).await;
    assert_eq!(r["message"]["data"], json!("Hello"), "{r}");
    assert_eq!(r["event"]["type"], json!("message.appended"), "{r}");
    assert_eq!(r["event"]["seq"], json!(2), "{r}");
    let r = apply(&alice, &cid, &ser, "append", &json!({"data": " wörld"})).await;
    assert_eq!(r["message"]["data"], json!("Hello wörld"), "{r}");
    assert_eq!(r["message"]["version_serial"], json!(vser(3)), "{r}");
    assert_eq!(
        get_msg(&alice, &cid, &ser).await["data"],
        json!("Hello wörld")
    );
}

#[tokio::test]
async fn append_concatenates_onto_null_data() {
    let (_s, alice, _bob, cid) = setup("app-null").await;
    let ser = serial(&alice.say(&cid, "to be cleared").await["message"]);
    let r = apply(
        &alice,
        &cid,
        &ser,
        "update",
        &json!({"clear_fields": ["data"]}),
    )
    .await;
    assert!(r["message"]["data"].is_null(), "{r}");
    let r = apply(&alice, &cid, &ser, "append", &json!({"data": "first"})).await;
    assert_eq!(
        r["message"]["data"],
        json!("first"),
        "append onto null: {r}"
    );
    let r = apply(&alice, &cid, &ser, "append", &json!({"data": " second"})).await;
    assert_eq!(r["message"]["data"], json!("first second"), "{r}");
}

#[tokio::test]
async fn append_rejects_empty_and_non_string_fragments() {
    let (_s, alice, _bob, cid) = setup("app-frag").await;
    let ser = serial(&alice.say(&cid, "base").await["message"]);
    for body in [
        json!({"data": ""}),
        json!({"data": 42}),
        json!({"data": {"t": "x"}}),
        json!({"data": ["x"]}),
        json!({"data": null}),
        json!({}),
        json!({"data": "x", "name": "nope"}),
        json!({"data": "x", "clear_fields": ["extras"]}),
    ] {
        assert_rejected(&alice, &cid, &ser, "append", &body, 400, "invalid_input").await;
    }
    assert_eq!(get_msg(&alice, &cid, &ser).await["data"], json!("base"));
}

#[tokio::test]
async fn append_onto_json_object_data_is_invalid_input() {
    let (_s, alice, _bob, cid) = setup("app-json").await;
    let ser = serial(&alice.post_message(&cid, &json!({"data": {"k": 1}})).await["message"]);
    assert_rejected(
        &alice,
        &cid,
        &ser,
        "append",
        &json!({"data": "x"}),
        400,
        "invalid_input",
    )
    .await;
    assert_eq!(get_msg(&alice, &cid, &ser).await["data"], json!({"k": 1}));
}

#[tokio::test]
async fn append_with_extras_status_complete_closes_the_stream() {
    let (_s, alice, _bob, cid) = setup("app-close").await;
    let ser = serial(&alice.say(&cid, "The answer").await["message"]);
    apply(&alice, &cid, &ser, "append", &json!({"data": " is 42"})).await;
    // A closing append may carry an empty fragment.
    let r = apply(
        &alice,
        &cid,
        &ser,
        "append",
        &json!({"data": "", "extras": {"status": "complete"}}),
    )
    .await;
    assert_eq!(r["message"]["data"], json!("The answer is 42"), "{r}");
    assert_eq!(
        r["message"]["extras"],
        json!({"status": "complete"}),
        "append extras replace the message's extras: {r}"
    );
    assert!(
        !r["event"]["payload"]["stream_status"].is_null(),
        "a closing append's event carries stream_status: {r}"
    );
    assert_rejected(
        &alice,
        &cid,
        &ser,
        "append",
        &json!({"data": "!"}),
        400,
        "invalid_input",
    )
    .await;

    // "cancelled" closes as well, here with a non-empty fragment.
    let ser2 = serial(&alice.say(&cid, "Partial").await["message"]);
    apply(
        &alice,
        &cid,
        &ser2,
        "append",
        &json!({"data": " answ", "extras": {"status": "cancelled"}}),
    )
    .await;
    assert_rejected(
        &alice,
        &cid,
        &ser2,
        "append",
        &json!({"data": "er"}),
        400,
        "invalid_input",
    )
    .await;
    assert_eq!(
        get_msg(&alice, &cid, &ser2).await["data"],
        json!("Partial answ")
    );
}

#[tokio::test]
async fn append_with_ai_transport_status_cancelled_closes_the_stream() {
    let (_s, alice, _bob, cid) = setup("app-sockudo").await;
    let ser = serial(&alice.say(&cid, "tok").await["message"]);
    apply(
        &alice,
        &cid,
        &ser,
        "append",
        &json!({"data": "en", "extras": {"ai": {"transport": {"status": "cancelled"}}}}),
    )
    .await;
    assert_rejected(
        &alice,
        &cid,
        &ser,
        "append",
        &json!({"data": "s"}),
        400,
        "invalid_input",
    )
    .await;

    // extras.ai.codec.status: complete, with an empty fragment.
    let ser2 = serial(&alice.say(&cid, "tok").await["message"]);
    apply(&alice, &cid, &ser2, "append", &json!({"data": "en"})).await;
    apply(
        &alice,
        &cid,
        &ser2,
        "append",
        &json!({"data": "", "extras": {"ai": {"codec": {"status": "complete"}}}}),
    )
    .await;
    assert_rejected(
        &alice,
        &cid,
        &ser2,
        "append",
        &json!({"data": "s"}),
        400,
        "invalid_input",
    )
    .await;

    // A non-closing status keeps the stream open.
    let ser3 = serial(&alice.say(&cid, "a").await["message"]);
    apply(
        &alice,
        &cid,
        &ser3,
        "append",
        &json!({"data": "b", "extras": {"status": "streaming"}}),
    )
    .await;
    let r = apply(&alice, &cid, &ser3, "append", &json!({"data": "c"})).await;
    assert_eq!(r["message"]["data"], json!("abc"), "{r}");
}

// ------------------------------------------------------------------------- limits

#[tokio::test]
async fn limit_max_appends_per_message_at_and_over() {
    let (s, alice, _bob, cid) = setup("lim-appends").await;
    set_ai_transport(&s, 1_048_576, 3, 1024, 600).await;
    let ser = serial(&alice.say(&cid, "x").await["message"]);
    for frag in ["1", "2", "3"] {
        apply(&alice, &cid, &ser, "append", &json!({"data": frag})).await;
    }
    let err = assert_rejected(
        &alice,
        &cid,
        &ser,
        "append",
        &json!({"data": "4"}),
        413,
        "payload_too_large",
    )
    .await;
    assert!(
        sentence(&err).contains('3'),
        "the sentence names the limit: {err}"
    );
    assert_eq!(get_msg(&alice, &cid, &ser).await["data"], json!("x123"));
    // Other messages have their own count.
    let other = serial(&alice.say(&cid, "y").await["message"]);
    apply(&alice, &cid, &other, "append", &json!({"data": "1"})).await;
}

#[tokio::test]
async fn limit_max_accumulated_message_bytes_at_and_over() {
    let (s, alice, _bob, cid) = setup("lim-bytes").await;
    set_ai_transport(&s, 10, 4096, 1024, 600).await;
    // 4 bytes + "éé" (4 bytes) = 8; + "é" (2 bytes) = exactly 10 (6 characters).
    let ser = serial(&alice.say(&cid, "abcd").await["message"]);
    apply(&alice, &cid, &ser, "append", &json!({"data": "éé"})).await;
    let r = apply(&alice, &cid, &ser, "append", &json!({"data": "é"})).await;
    assert_eq!(r["message"]["data"], json!("abcdééé"), "{r}");
    assert_rejected(
        &alice,
        &cid,
        &ser,
        "append",
        &json!({"data": "x"}),
        413,
        "payload_too_large",
    )
    .await;
    // Counted in UTF-8 bytes: a 9-byte text takes one more ASCII byte but not "é".
    let ser2 = serial(&alice.say(&cid, "123456").await["message"]);
    apply(&alice, &cid, &ser2, "append", &json!({"data": "789"})).await;
    assert_rejected(
        &alice,
        &cid,
        &ser2,
        "append",
        &json!({"data": "é"}),
        413,
        "payload_too_large",
    )
    .await;
    let r = apply(&alice, &cid, &ser2, "append", &json!({"data": "0"})).await;
    assert_eq!(r["message"]["data"], json!("1234567890"), "{r}");
}

#[tokio::test]
async fn limit_max_open_streaming_messages_per_channel_at_and_over() {
    let (s, alice, bob, cid) = setup("lim-open").await;
    set_ai_transport(&s, 1_048_576, 4096, 2, 600).await;
    let a = serial(&alice.say(&cid, "a").await["message"]);
    let b = serial(&alice.say(&cid, "b").await["message"]);
    let c = serial(&alice.say(&cid, "c").await["message"]);
    let d = serial(&alice.say(&cid, "d").await["message"]);
    apply(&alice, &cid, &a, "append", &json!({"data": "1"})).await;
    apply(&alice, &cid, &b, "append", &json!({"data": "1"})).await;
    // Two open: the first append of a third is refused…
    assert_rejected(
        &alice,
        &cid,
        &c,
        "append",
        &json!({"data": "1"}),
        413,
        "payload_too_large",
    )
    .await;
    // …but the open ones keep streaming.
    apply(&alice, &cid, &a, "append", &json!({"data": "2"})).await;
    // Another channel has its own count.
    let other = alice.create_group("lim-open-2", &["bob"], json!({})).await;
    let oid = other["id"].as_str().expect("id").to_owned();
    let o = serial(&bob.say(&oid, "o").await["message"]);
    apply(&bob, &oid, &o, "append", &json!({"data": "1"})).await;

    // Closing A lets C open.
    apply(
        &alice,
        &cid,
        &a,
        "append",
        &json!({"data": "", "extras": {"status": "complete"}}),
    )
    .await;
    let r = apply(&alice, &cid, &c, "append", &json!({"data": "1"})).await;
    assert_eq!(r["message"]["data"], json!("c1"), "{r}");
    // B and C open: D is refused; deleting B closes its stream and lets D open.
    assert_rejected(
        &alice,
        &cid,
        &d,
        "append",
        &json!({"data": "1"}),
        413,
        "payload_too_large",
    )
    .await;
    apply(&alice, &cid, &b, "delete", &json!({})).await;
    let r = apply(&alice, &cid, &d, "append", &json!({"data": "1"})).await;
    assert_eq!(r["message"]["data"], json!("d1"), "{r}");
}

/// Retries `body` (a request a limit refuses with 413, which changes nothing) until it is
/// applied; panics on any other answer or after `within`. Returns the time it took.
async fn append_when_allowed(
    c: &ApiClient,
    cid: &str,
    ser: &str,
    body: &Value,
    within: Duration,
) -> Duration {
    let start = tokio::time::Instant::now();
    loop {
        let (st, resp) = act(c, cid, ser, "append", body).await;
        match st {
            200 => return start.elapsed(),
            413 => assert_error(&(st, resp), 413, "payload_too_large"),
            _ => panic!("append {body} on {ser}: expected 200 or 413, got {st} {resp}"),
        }
        assert!(
            start.elapsed() < within,
            "append on {ser} still refused after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn idle_stream_stops_counting_as_open_but_is_not_closed() {
    let (s, alice, _bob, cid) = setup("lim-idle").await;
    set_ai_transport(&s, 1_048_576, 4096, 1, 1).await;
    let a = serial(&alice.say(&cid, "a").await["message"]);
    let b = serial(&alice.say(&cid, "b").await["message"]);
    apply(&alice, &cid, &a, "append", &json!({"data": "1"})).await;
    let started = tokio::time::Instant::now();
    assert_rejected(
        &alice,
        &cid,
        &b,
        "append",
        &json!({"data": "1"}),
        413,
        "payload_too_large",
    )
    .await;
    // After 1 s without appends A no longer counts as open: B may open.
    append_when_allowed(
        &alice,
        &cid,
        &b,
        &json!({"data": "1"}),
        Duration::from_secs(10),
    )
    .await;
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "B opened only once A was idle for the timeout ({:?})",
        started.elapsed()
    );
    // A was not closed: once B is idle in turn, A takes appends again (never 400).
    append_when_allowed(
        &alice,
        &cid,
        &a,
        &json!({"data": "2"}),
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(get_msg(&alice, &cid, &a).await["data"], json!("a12"));
    assert_eq!(get_msg(&alice, &cid, &b).await["data"], json!("b1"));
}

#[tokio::test]
async fn limit_413_sentences_differ() {
    let (s, alice, _bob, cid) = setup("lim-sentences").await;
    set_ai_transport(&s, 10, 3, 2, 600).await;
    // Appends: 3 allowed, the 4th refused (4 bytes total, under 10).
    let a = serial(&alice.say(&cid, "x").await["message"]);
    for f in ["a", "b", "c"] {
        apply(&alice, &cid, &a, "append", &json!({"data": f})).await;
    }
    let appends = assert_rejected(
        &alice,
        &cid,
        &a,
        "append",
        &json!({"data": "d"}),
        413,
        "payload_too_large",
    )
    .await;
    // Bytes: "x" + 9 = 10, one more refused.
    let b = serial(&alice.say(&cid, "x").await["message"]);
    apply(&alice, &cid, &b, "append", &json!({"data": "123456789"})).await;
    let bytes = assert_rejected(
        &alice,
        &cid,
        &b,
        "append",
        &json!({"data": "0"}),
        413,
        "payload_too_large",
    )
    .await;
    // Open streams: A and B are open.
    let c = serial(&alice.say(&cid, "x").await["message"]);
    let open = assert_rejected(
        &alice,
        &cid,
        &c,
        "append",
        &json!({"data": "1"}),
        413,
        "payload_too_large",
    )
    .await;
    let (sa, sb, so) = (sentence(&appends), sentence(&bytes), sentence(&open));
    assert_ne!(sa, sb, "appends vs bytes sentences");
    assert_ne!(sa, so, "appends vs open-streams sentences");
    assert_ne!(sb, so, "bytes vs open-streams sentences");
}

// ------------------------------------------------------------------------- op_id

#[tokio::test]
async fn op_id_duplicate_append_answers_stored_result_and_emits_nothing() {
    let (s, alice, bob, cid) = setup("op-append").await;
    let ser = serial(&alice.say(&cid, "a").await["message"]);
    let mut ws = s_ws(&s, &bob).await;

    let body = json!({"data": "b", "op_id": "op-1"});
    let first = apply(&alice, &cid, &ser, "append", &body).await;
    let n_versions = all_versions(&alice, &cid, &ser, "oldest_first").await.len();
    assert_eq!(n_versions, 2);

    let (st, dup) = act(&alice, &cid, &ser, "append", &body).await;
    assert_eq!(st, 200, "duplicate answers 200: {dup}");
    assert_eq!(dup["status"], json!("duplicate"), "{dup}");
    assert!(dup["event"].is_null(), "event null on a duplicate: {dup}");
    assert_eq!(
        dup["message"]["version_serial"], first["message"]["version_serial"],
        "the stored result: {dup}"
    );
    assert_eq!(
        dup["message"]["data"],
        json!("ab"),
        "not appended twice: {dup}"
    );
    assert_eq!(
        all_versions(&alice, &cid, &ser, "oldest_first").await.len(),
        n_versions,
        "no new version"
    );
    assert_eq!(get_msg(&alice, &cid, &ser).await["data"], json!("ab"));

    let frames = read_through_marker(&mut ws, &alice, &cid, "marker").await;
    let appended: Vec<&Value> = of_type(&frames, "message.appended");
    assert_eq!(
        appended.len(),
        1,
        "one message.appended for one applied append: {frames:?}"
    );
    // The marker took the next seq: the duplicate took none.
    assert_eq!(frames.last().expect("marker")["seq"], json!(3));

    // Same op_id, other payload.
    assert_rejected(
        &alice,
        &cid,
        &ser,
        "append",
        &json!({"data": "c", "op_id": "op-1"}),
        400,
        "invalid_input",
    )
    .await;
}

async fn s_ws(s: &TestServer, who: &ApiClient) -> WsClient {
    s.ws(&who.token, None).await
}

#[tokio::test]
async fn op_id_duplicate_update_answers_stored_result() {
    let (s, alice, bob, cid) = setup("op-update").await;
    let ser = serial(&alice.say(&cid, "v1").await["message"]);
    let mut ws = s_ws(&s, &bob).await;
    let u1 = json!({"data": "v2", "op_id": "u1"});
    let first = apply(&alice, &cid, &ser, "update", &u1).await;
    apply(
        &alice,
        &cid,
        &ser,
        "update",
        &json!({"data": "v3", "op_id": "u2"}),
    )
    .await;

    let (st, dup) = act(&alice, &cid, &ser, "update", &u1).await;
    assert_eq!(st, 200, "{dup}");
    assert_eq!(dup["status"], json!("duplicate"), "{dup}");
    assert!(dup["event"].is_null(), "{dup}");
    let m = get_msg(&alice, &cid, &ser).await;
    assert_eq!(m["data"], json!("v3"), "the replay did not reapply v2: {m}");
    assert_eq!(
        all_versions(&alice, &cid, &ser, "oldest_first").await.len(),
        3
    );

    let frames = read_through_marker(&mut ws, &alice, &cid, "marker").await;
    assert_eq!(
        of_type(&frames, "message.updated").len(),
        2,
        "two applied updates, no event for the replay: {frames:?}"
    );

    assert_rejected(
        &alice,
        &cid,
        &ser,
        "update",
        &json!({"data": "other", "op_id": "u1"}),
        400,
        "invalid_input",
    )
    .await;

    // A replay after a later update answers u1's stored result (its version and data),
    // not the message's current state (as the server API does with version_serial).
    assert_eq!(
        (&dup["message"]["version_serial"], &dup["message"]["data"]),
        (
            &first["message"]["version_serial"],
            &first["message"]["data"]
        ),
        "the stored result of u1: {dup}"
    );
}

#[tokio::test]
async fn op_id_duplicate_delete_answers_stored_result() {
    let (s, alice, bob, cid) = setup("op-delete").await;
    let ser = serial(&alice.say(&cid, "bye").await["message"]);
    let mut ws = s_ws(&s, &bob).await;
    let d1 = json!({"op_id": "d1", "data": "[gone]"});
    let first = apply(&alice, &cid, &ser, "delete", &d1).await;
    let (st, dup) = act(&alice, &cid, &ser, "delete", &d1).await;
    assert_eq!(st, 200, "{dup}");
    assert_eq!(dup["status"], json!("duplicate"), "{dup}");
    assert!(dup["event"].is_null(), "{dup}");
    assert_eq!(
        dup["message"]["version_serial"], first["message"]["version_serial"],
        "{dup}"
    );
    assert_eq!(
        all_versions(&alice, &cid, &ser, "oldest_first").await.len(),
        2
    );
    let frames = read_through_marker(&mut ws, &alice, &cid, "marker").await;
    assert_eq!(
        of_type(&frames, "message.deleted").len(),
        1,
        "one message.deleted: {frames:?}"
    );
    assert_rejected(
        &alice,
        &cid,
        &ser,
        "delete",
        &json!({"op_id": "d1", "data": "[other]"}),
        400,
        "invalid_input",
    )
    .await;
}

#[tokio::test]
async fn op_id_is_scoped_to_action_and_message() {
    let (_s, alice, _bob, cid) = setup("op-scope").await;
    let ser = serial(&alice.say(&cid, "a").await["message"]);
    let other = serial(&alice.say(&cid, "z").await["message"]);
    let u = apply(
        &alice,
        &cid,
        &ser,
        "update",
        &json!({"data": "b", "op_id": "same"}),
    )
    .await;
    // Same op_id on another action of the same message: independent, applied.
    let a = apply(
        &alice,
        &cid,
        &ser,
        "append",
        &json!({"data": "c", "op_id": "same"}),
    )
    .await;
    assert_ne!(
        u["message"]["version_serial"],
        a["message"]["version_serial"]
    );
    assert_eq!(a["message"]["data"], json!("bc"), "{a}");
    let d = apply(&alice, &cid, &ser, "delete", &json!({"op_id": "same"})).await;
    assert_eq!(d["message"]["deleted"], json!(true), "{d}");
    // Same op_id and action on another message: independent.
    let o = apply(
        &alice,
        &cid,
        &other,
        "update",
        &json!({"data": "b", "op_id": "same"}),
    )
    .await;
    assert_eq!(o["message"]["message_serial"], json!(other), "{o}");
    assert_eq!(
        all_versions(&alice, &cid, &ser, "oldest_first").await.len(),
        4
    );
    // op_id length: 64 ok, 65 invalid.
    apply(
        &alice,
        &cid,
        &other,
        "update",
        &json!({"data": "c", "op_id": "o".repeat(64)}),
    )
    .await;
    assert_rejected(
        &alice,
        &cid,
        &other,
        "update",
        &json!({"data": "d", "op_id": "o".repeat(65)}),
        400,
        "invalid_input",
    )
    .await;
}

// ------------------------------------------------------------------------- channel kinds, flag

#[tokio::test]
async fn immutable_channel_refuses_update_delete_append_with_409() {
    let s = TestServer::start().await;
    let alice = s.user("alice", "human", "member").await;
    s.create_entity("bob", "Bob", "human", "member").await;
    let ch = alice
        .create_group("audit", &["bob"], json!({"immutable": true}))
        .await;
    assert_eq!(ch["immutable"], json!(true), "{ch}");
    let cid = ch["id"].as_str().expect("id").to_owned();
    let ser = serial(&alice.say(&cid, "on the record").await["message"]);
    for (action, body) in [
        ("update", json!({"data": "x"})),
        ("delete", json!({})),
        ("append", json!({"data": "x"})),
    ] {
        assert_rejected(&alice, &cid, &ser, action, &body, 409, "message_immutable").await;
    }
    // Creates still work.
    assert_eq!(alice.say(&cid, "next").await["event"]["seq"], json!(2));
}

#[tokio::test]
async fn feature_disabled_refuses_mutations_and_versions_creates_still_work() {
    let (s, alice, _bob, cid) = setup("flag").await;
    let ser = serial(&alice.say(&cid, "before").await["message"]);
    set_versioned_enabled(&s, false).await;

    // Creates and reads keep working.
    let after = alice.say(&cid, "after").await;
    assert_eq!(after["event"]["seq"], json!(2), "{after}");
    assert_eq!(get_msg(&alice, &cid, &ser).await["data"], json!("before"));
    assert_eq!(alice.messages(&cid).await.len(), 2);

    for (action, body) in [
        ("update", json!({"data": "x"})),
        ("append", json!({"data": "x"})),
        ("delete", json!({})),
    ] {
        assert_error(
            &act(&alice, &cid, &ser, action, &body).await,
            422,
            "feature_disabled",
        );
    }
    assert_error(
        &versions_page(&alice, &cid, &ser, "").await,
        422,
        "feature_disabled",
    );
    let m = get_msg(&alice, &cid, &ser).await;
    assert_eq!(m["data"], json!("before"), "{m}");
    assert_eq!(m["version_serial"], json!(vser(1)), "{m}");
    assert_eq!(alice.channel(&cid).await["last_seq"], json!(2));

    // Switched back on, mutations work again.
    set_versioned_enabled(&s, true).await;
    let r = apply(&alice, &cid, &ser, "update", &json!({"data": "x"})).await;
    assert_eq!(r["event"]["seq"], json!(3), "{r}");
}

// ------------------------------------------------------------------------- versions listing

#[tokio::test]
async fn versions_newest_first_by_default_oldest_first_on_request() {
    let (_s, alice, _bob, cid) = setup("vers-order").await;
    let ser = serial(&alice.say(&cid, "a").await["message"]);
    apply(&alice, &cid, &ser, "append", &json!({"data": "b"})).await;
    apply(&alice, &cid, &ser, "update", &json!({"data": "X"})).await;
    apply(&alice, &cid, &ser, "append", &json!({"data": "yz"})).await;

    let (st, page) = versions_page(&alice, &cid, &ser, "").await;
    assert_eq!(st, 200, "{page}");
    assert_eq!(page["has_more"], json!(false), "{page}");
    let newest = page["versions"]
        .as_array()
        .unwrap_or_else(|| panic!("versions array: {page}"))
        .clone();
    assert_eq!(
        field(&newest, "action"),
        vec![
            &json!("append"),
            &json!("update"),
            &json!("append"),
            &json!("create")
        ],
        "newest first by default: {page}"
    );
    // Append items carry the fragment as data.
    assert_eq!(
        field(&newest, "data"),
        vec![&json!("yz"), &json!("X"), &json!("b"), &json!("a")],
        "{page}"
    );
    assert_eq!(
        field(&newest, "version_serial"),
        vec![
            &json!(vser(4)),
            &json!(vser(3)),
            &json!(vser(2)),
            &json!(vser(1))
        ],
        "{page}"
    );

    let oldest = all_versions(&alice, &cid, &ser, "oldest_first").await;
    let mut rev = newest.clone();
    rev.reverse();
    assert_eq!(oldest, rev, "oldest_first is the reverse");
    // version_serial strictly increases with delivery_serial.
    let pairs: Vec<(String, i64)> = oldest
        .iter()
        .map(|v| {
            (
                v["version_serial"]
                    .as_str()
                    .unwrap_or_else(|| panic!("version_serial string: {v}"))
                    .to_owned(),
                v["delivery_serial"]
                    .as_i64()
                    .unwrap_or_else(|| panic!("delivery_serial integer: {v}")),
            )
        })
        .collect();
    assert!(
        pairs.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 < w[1].1),
        "{pairs:?}"
    );
    for v in &oldest {
        assert_eq!(v["message_serial"], json!(ser), "{v}");
        assert_eq!(v["history_serial"], json!(1), "{v}");
    }
    assert_error(
        &versions_page(&alice, &cid, &ser, "direction=sideways").await,
        400,
        "invalid_input",
    );
}

#[tokio::test]
async fn versions_paging_with_limit_cursor_and_has_more() {
    let (_s, alice, _bob, cid) = setup("vers-page").await;
    let ser = serial(&alice.say(&cid, "0").await["message"]);
    for f in ["1", "2", "3", "4"] {
        apply(&alice, &cid, &ser, "append", &json!({"data": f})).await;
    }
    for (direction, expect) in [
        ("newest_first", vec![5, 4, 3, 2, 1]),
        ("oldest_first", vec![1, 2, 3, 4, 5]),
    ] {
        let mut seen: Vec<i64> = Vec::new();
        let mut cursor: Option<String> = None;
        let mut pages = 0;
        loop {
            pages += 1;
            assert!(pages <= 3, "paging ends");
            let q = match &cursor {
                Some(c) => format!("limit=2&direction={direction}&cursor={}", urlencode(c)),
                None => format!("limit=2&direction={direction}"),
            };
            let (st, page) = versions_page(&alice, &cid, &ser, &q).await;
            assert_eq!(st, 200, "{q}: {page}");
            let items = page["versions"]
                .as_array()
                .unwrap_or_else(|| panic!("versions array: {page}"))
                .clone();
            assert!(items.len() <= 2, "limit respected: {page}");
            seen.extend(items.iter().filter_map(|v| v["delivery_serial"].as_i64()));
            let last = items.last().expect("a page is not empty")["version_serial"].clone();
            if page["has_more"] == json!(true) {
                assert_eq!(items.len(), 2, "a page with more is full: {page}");
                assert_eq!(
                    page["next_cursor"], last,
                    "next_cursor is the last item's version_serial: {page}"
                );
                cursor = Some(cursor_str(&last));
            } else {
                assert_eq!(page["has_more"], json!(false), "{page}");
                break;
            }
        }
        assert_eq!(seen, expect, "{direction}");
        assert_eq!(pages, 3, "{direction}: 2 + 2 + 1");
    }
    for q in ["limit=0", "limit=101", "limit=-1", "limit=abc"] {
        assert_error(
            &versions_page(&alice, &cid, &ser, q).await,
            400,
            "invalid_input",
        );
    }
    let (st, page) = versions_page(&alice, &cid, &ser, "limit=100").await;
    assert_eq!(st, 200, "limit = max_page_size is fine: {page}");
}

#[tokio::test]
async fn delivery_serials_are_contiguous_channel_seqs_shared_across_messages() {
    let (_s, alice, bob, cid) = setup("vers-seq").await;
    let a = alice.say(&cid, "A").await;
    let b = bob.say(&cid, "B").await;
    let sa = serial(&a["message"]);
    let sb = serial(&b["message"]);
    assert_eq!(
        (sa.as_str(), sb.as_str()),
        (mser(1).as_str(), mser(2).as_str())
    );
    let r3 = apply(&alice, &cid, &sa, "append", &json!({"data": "+"})).await;
    let r4 = apply(&bob, &cid, &sb, "update", &json!({"data": "B2"})).await;
    let r5 = apply(&alice, &cid, &sa, "delete", &json!({})).await;
    for (r, n) in [(&r3, 3u64), (&r4, 4), (&r5, 5)] {
        assert_eq!(
            r["event"]["seq"],
            json!(n),
            "event seq = delivery serial: {r}"
        );
        assert_eq!(r["message"]["version_serial"], json!(vser(n)), "{r}");
    }
    let va = all_versions(&alice, &cid, &sa, "oldest_first").await;
    let vb = all_versions(&alice, &cid, &sb, "oldest_first").await;
    assert_eq!(
        field(&va, "delivery_serial"),
        vec![&json!(1), &json!(3), &json!(5)],
        "{va:?}"
    );
    assert_eq!(
        field(&vb, "delivery_serial"),
        vec![&json!(2), &json!(4)],
        "{vb:?}"
    );
    assert_eq!(alice.channel(&cid).await["last_seq"], json!(5));
    let c = alice.say(&cid, "C").await;
    assert_eq!(c["message"]["history_serial"], json!(6), "{c}");
    assert_eq!(serial(&c["message"]), mser(6));
}

#[tokio::test]
async fn history_lists_one_row_per_message_with_latest_state() {
    let (_s, alice, _bob, cid) = setup("hist").await;
    let a = serial(&alice.say(&cid, "a").await["message"]);
    let b = serial(&alice.say(&cid, "b").await["message"]);
    let c = serial(&alice.say(&cid, "c").await["message"]);
    apply(&alice, &cid, &a, "update", &json!({"data": "a2"})).await;
    apply(&alice, &cid, &b, "append", &json!({"data": "+1"})).await;
    apply(&alice, &cid, &a, "update", &json!({"data": "a3"})).await;
    apply(&alice, &cid, &b, "append", &json!({"data": "+2"})).await;
    apply(&alice, &cid, &c, "delete", &json!({})).await;

    let (st, page) = alice
        .get(&format!(
            "/api/channels/{cid}/messages?after_seq=0&limit=100"
        ))
        .await;
    assert_eq!(st, 200, "{page}");
    let rows = page["messages"]
        .as_array()
        .unwrap_or_else(|| panic!("messages array: {page}"))
        .clone();
    assert_eq!(
        rows.iter().map(serial).collect::<Vec<_>>(),
        vec![a.clone(), b.clone(), c.clone()],
        "one row per logical message, by history_serial: {page}"
    );
    assert_eq!(
        field(&rows, "history_serial"),
        vec![&json!(1), &json!(2), &json!(3)]
    );
    assert_eq!(rows[0]["data"], json!("a3"), "{page}");
    assert_eq!(rows[0]["version_serial"], json!(vser(6)), "{page}");
    assert_eq!(rows[1]["data"], json!("b+1+2"), "{page}");
    assert_eq!(rows[1]["version_serial"], json!(vser(7)), "{page}");
    assert_eq!(rows[2]["deleted"], json!(true), "{page}");
    assert!(rows[2]["data"].is_null(), "{page}");
    assert_eq!(rows[2]["version_serial"], json!(vser(8)), "{page}");

    // Paging by after_seq stays one row per message.
    let (st, page) = alice
        .get(&format!("/api/channels/{cid}/messages?after_seq=1&limit=1"))
        .await;
    assert_eq!(st, 200, "{page}");
    assert_eq!(
        page["messages"]
            .as_array()
            .map(|m| m.iter().map(serial).collect::<Vec<_>>()),
        Some(vec![b.clone()]),
        "{page}"
    );
}

// ------------------------------------------------------------------------- realtime

#[tokio::test]
async fn realtime_events_for_each_action_with_seq_equal_to_delivery_serial() {
    let (s, alice, bob, cid) = setup("rt").await;
    let mut ws = s.ws(&bob.token, None).await;
    let created = alice.say(&cid, "caf").await;
    let ser = serial(&created["message"]);
    let app1 = apply(&alice, &cid, &ser, "append", &json!({"data": "é"})).await;
    let app2 = apply(&alice, &cid, &ser, "append", &json!({"data": "é!"})).await;
    let upd = apply(&alice, &cid, &ser, "update", &json!({"data": "tea"})).await;
    let del = apply(&alice, &cid, &ser, "delete", &json!({})).await;

    let frames = ws
        .collect_until(WAIT, |f| f["type"] == json!("message.deleted"))
        .await;
    let mine: Vec<&Value> = frames
        .iter()
        .filter(|f| f["payload"]["message_id"] == json!(ser))
        .collect();
    let types: Vec<&Value> = mine.iter().map(|f| &f["type"]).collect();
    assert_eq!(
        types,
        vec![
            &json!("message.created"),
            &json!("message.appended"),
            &json!("message.appended"),
            &json!("message.updated"),
            &json!("message.deleted")
        ],
        "{frames:?}"
    );
    let seqs: Vec<&Value> = mine.iter().map(|f| &f["seq"]).collect();
    assert_eq!(
        seqs,
        vec![&json!(1), &json!(2), &json!(3), &json!(4), &json!(5)],
        "seq = delivery serial: {frames:?}"
    );
    for f in &mine {
        assert_eq!(f["channel_id"], json!(cid), "{f}");
        assert_eq!(f["payload"]["author_id"], json!("alice"), "{f}");
    }
    for (f, resp) in mine[1..].iter().zip([&app1, &app2, &upd, &del].into_iter()) {
        assert_eq!(
            f["payload"]["version_serial"], resp["message"]["version_serial"],
            "event version_serial: {f}"
        );
    }

    // message.appended carries the fragment and the UTF-8 byte length, not the whole text.
    let allowed = [
        "message_id",
        "author_id",
        "fragment",
        "length",
        "version_serial",
        "extras",
        "stream_status",
        "direct_conversation_id",
    ];
    for (f, frag, len) in [(mine[1], "é", 5), (mine[2], "é!", 8)] {
        let p = &f["payload"];
        assert_eq!(p["fragment"], json!(frag), "{f}");
        assert_eq!(p["length"], json!(len), "length in UTF-8 bytes: {f}");
        let keys: Vec<&String> = p
            .as_object()
            .unwrap_or_else(|| panic!("payload object: {f}"))
            .keys()
            .collect();
        assert!(
            keys.iter().all(|k| allowed.contains(&k.as_str())),
            "message.appended carries only its fields: {f}"
        );
    }
    assert_eq!(mine[3]["payload"]["data"], json!("tea"), "{:?}", mine[3]);
    assert_eq!(mine[4]["payload"]["deleted"], json!(true), "{:?}", mine[4]);
}

async fn until_summary(ws: &mut WsClient, ser: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let frames = ws
        .collect_until(WAIT, |f| {
            f["type"] == json!("message.summary")
                && f["payload"]["message_id"] == json!(ser)
                && pred(f)
        })
        .await;
    frames.last().expect("message.summary").clone()
}

fn assert_ephemeral(f: &Value) {
    assert!(
        f.get("cursor").is_none_or(Value::is_null),
        "message.summary is ephemeral (no cursor): {f}"
    );
}

#[tokio::test]
async fn message_summary_after_reaction_add_and_remove() {
    let (s, alice, bob, cid) = setup("summary-react").await;
    let ser = serial(&alice.say(&cid, "react").await["message"]);
    let mut ws = s.ws(&alice.token, None).await;
    let react = |who: ApiClient| {
        let path = format!("/api/channels/{cid}/messages/{ser}/reactions");
        async move {
            let (st, body) = who.post(&path, &json!({"emoji": "👍"})).await;
            assert!(st == 200 || st == 201, "add reaction: {st} {body}");
        }
    };
    react(bob.clone()).await;
    let f = until_summary(&mut ws, &ser, |_| true).await;
    assert_ephemeral(&f);
    assert_eq!(f["payload"]["reactions"], json!({"👍": 1}), "{f}");
    assert_eq!(f["payload"]["reply_count"], json!(0), "{f}");

    react(alice.clone()).await;
    let f = until_summary(&mut ws, &ser, |f| {
        f["payload"]["reactions"] == json!({"👍": 2})
    })
    .await;
    assert_ephemeral(&f);

    let (st, body) = bob
        .delete(&format!(
            "/api/channels/{cid}/messages/{ser}/reactions/{}",
            urlencode("👍")
        ))
        .await;
    assert_eq!(st, 200, "remove reaction: {body}");
    let f = until_summary(&mut ws, &ser, |f| {
        f["payload"]["reactions"] == json!({"👍": 1})
    })
    .await;
    assert_ephemeral(&f);

    // Never stored.
    let events = alice.pull_all(None).await;
    assert!(
        of_type(&events, "message.summary").is_empty(),
        "message.summary is not durable: {events:?}"
    );
}

#[tokio::test]
async fn message_summary_after_thread_reply_carries_reply_count() {
    let (s, alice, bob, cid) = setup("summary-thread").await;
    let root = serial(&alice.say(&cid, "root").await["message"]);
    let mut ws = s.ws(&alice.token, None).await;
    bob.post_message(&cid, &json!({"data": "r1", "thread_id": root}))
        .await;
    let f = until_summary(&mut ws, &root, |_| true).await;
    assert_ephemeral(&f);
    assert_eq!(f["payload"]["reply_count"], json!(1), "{f}");
    assert_eq!(f["payload"]["reactions"], json!({}), "{f}");
    bob.post_message(&cid, &json!({"data": "r2", "thread_id": root}))
        .await;
    let f = until_summary(&mut ws, &root, |f| f["payload"]["reply_count"] == json!(2)).await;
    assert_ephemeral(&f);
}

// ------------------------------------------------------------------------- serials in paths

#[tokio::test]
async fn malformed_serial_is_400_unknown_serial_is_404() {
    let (_s, alice, _bob, cid) = setup("serials").await;
    alice.say(&cid, "exists").await;
    let long = format!("m{}", "1".repeat(199));
    let unknown = mser(999_999);
    let cases: [(Method, &str, Option<Value>); 5] = [
        (Method::GET, "", None),
        (Method::GET, "/versions", None),
        (Method::POST, "/update", Some(json!({"data": "x"}))),
        (Method::POST, "/delete", Some(json!({}))),
        (Method::POST, "/append", Some(json!({"data": "x"}))),
    ];
    // Every endpoint is checked; the mismatches are reported together.
    let mut wrong: Vec<String> = Vec::new();
    for (method, suffix, body) in &cases {
        for (bad, expect) in [
            (long.as_str(), (400, "invalid_input")),
            ("a%20b", (400, "invalid_input")),
            (unknown.as_str(), (404, "not_found")),
        ] {
            let path = format!("/api/channels/{cid}/messages/{bad}{suffix}");
            let (st, resp) = alice.request(method.clone(), &path, body.as_ref()).await;
            if (st, resp["code"].as_str()) != (expect.0, Some(expect.1)) {
                let shown = if bad.len() > 128 { "<200 chars>" } else { bad };
                wrong.push(format!(
                    "{method} .../messages/{shown}{suffix}: expected {} {}, got {st} {resp}",
                    expect.0, expect.1
                ));
            } else {
                assert_error(&(st, resp), expect.0, expect.1);
            }
        }
    }
    assert!(wrong.is_empty(), "serial validation:\n{}", wrong.join("\n"));
    // 128 bytes is well-formed: unknown, not malformed.
    let edge = format!("m{}", "1".repeat(127));
    assert_error(
        &alice
            .get(&format!("/api/channels/{cid}/messages/{edge}"))
            .await,
        404,
        "not_found",
    );
    assert_eq!(alice.channel(&cid).await["last_seq"], json!(1));
}
