//! Version retention (docs/versioned-messages.md "Retention"): with a retention window, the
//! purge pass deletes old versions in batches but never the newest version of a message, so
//! the latest state (with all appended text) stays readable and new versions keep their seqs.

use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};
use switchboard_integration::harness::{
    i64_of, mint_token, str_of, uniq, ApiClient, SignOpts, TestServer,
};

const PURGE_ENV: &str = "SWITCHBOARD_VERSIONED_MESSAGES_PURGE_INTERVAL_SECONDS";
const DEADLINE: Duration = Duration::from_secs(30);

async fn start_purging_server() -> TestServer {
    let s = TestServer::builder().env(PURGE_ENV, "1").start().await;
    let (st, resp) = s
        .signed(
            Method::PATCH,
            &format!("/apps/{}/settings", s.app.id),
            Some(
                &json!({"versioned_messages": {"enabled": true, "max_page_size": 100,
                                                "retention_window_seconds": 1,
                                                "purge_batch_size": 2}}),
            ),
        )
        .await;
    assert_eq!(st, 200, "PATCH settings: {resp}");
    let vm = &resp["versioned_messages"];
    assert_eq!(vm["retention_window_seconds"], json!(1), "{resp}");
    assert_eq!(vm["purge_batch_size"], json!(2), "{resp}");
    assert_eq!(vm["enabled"], json!(true), "{resp}");
    s
}

async fn mutate(c: &ApiClient, cid: &str, serial: &str, action: &str, body: Value) -> Value {
    let (st, resp) = c
        .post(
            &format!("/api/channels/{cid}/messages/{serial}/{action}"),
            &body,
        )
        .await;
    assert_eq!(st, 200, "{} {action} {body} on {serial}: {resp}", c.id);
    assert_eq!(resp["status"], json!("applied"), "{resp}");
    resp
}

/// One page (the maximum) of versions, newest first.
async fn chat_versions(c: &ApiClient, cid: &str, serial: &str) -> Vec<Value> {
    let (st, resp) = c
        .get(&format!(
            "/api/channels/{cid}/messages/{serial}/versions?limit=100"
        ))
        .await;
    assert_eq!(st, 200, "versions of {serial}: {resp}");
    resp["versions"]
        .as_array()
        .unwrap_or_else(|| panic!("versions is an array: {resp}"))
        .clone()
}

async fn get_message(c: &ApiClient, cid: &str, serial: &str) -> Value {
    let (st, resp) = c
        .get(&format!("/api/channels/{cid}/messages/{serial}"))
        .await;
    assert_eq!(st, 200, "GET {serial}: {resp}");
    resp["message"].clone()
}

/// What a message must look like once only its newest version is left.
struct Expected {
    label: &'static str,
    serial: String,
    created_at: Value,
    history_serial: Value,
    /// The newest version's serial and action.
    version_serial: Value,
    action: &'static str,
    name: Value,
    data: Value,
    extras: Value,
    deleted: bool,
}

fn check_state(e: &Expected, m: &Value) {
    let l = e.label;
    assert_eq!(m["message_serial"], json!(e.serial), "{l}: {m}");
    assert_eq!(m["history_serial"], e.history_serial, "{l}: {m}");
    assert_eq!(
        m["version_serial"], e.version_serial,
        "{l}: latest version: {m}"
    );
    assert_eq!(
        m["sender"],
        json!("alice"),
        "{l}: the creator stays the sender: {m}"
    );
    assert_eq!(m["name"], e.name, "{l}: {m}");
    assert_eq!(m["data"], e.data, "{l}: full latest data: {m}");
    assert_eq!(m["extras"], e.extras, "{l}: {m}");
    assert_eq!(m["deleted"], json!(e.deleted), "{l}: {m}");
    assert_eq!(
        m["created_at"], e.created_at,
        "{l}: created_at of the create: {m}"
    );
}

#[tokio::test]
async fn purge_keeps_the_newest_version_and_the_full_latest_state() {
    let s = start_purging_server().await;
    let alice = s.user("alice", "human", "member").await;
    s.create_entity("bob", "Bob", "human", "member").await;
    let bob_token = {
        let (st, r) = s
            .signed(
                Method::POST,
                &format!("/apps/{}/tokens", s.app.id),
                Some(&json!({"entity_id": "bob",
                             "capabilities": {"message_append_any": ["*"]}})),
            )
            .await;
        assert_eq!(st, 201, "{r}");
        str_of(&r["token"], "token")
    };
    let bob = s.client("bob", &bob_token);
    let ch = alice
        .create_group(&uniq("retained"), &["bob"], json!({}))
        .await;
    let cid = str_of(&ch["id"], "id");

    // A control workspace keeps the default window (0: no expiry).
    let ctl = s.create_workspace("control").await;
    for id in ["carl", "cora"] {
        let (st, r) = s
            .signed_with(
                &ctl,
                Method::POST,
                &format!("/apps/{}/entities", ctl.id),
                Some(&json!({"id": id, "name": id, "kind": "human", "role": "member"})),
                SignOpts::default(),
            )
            .await;
        assert_eq!(st, 201, "control entity {id}: {r}");
    }
    let now = chrono::Utc::now().timestamp();
    let carl = s.client(
        "carl",
        &mint_token(
            &ctl.key,
            &ctl.secret,
            &json!({"sub": "carl", "iat": now, "exp": now + 3600}),
        ),
    );
    let cch = carl
        .create_group("control-room", &["cora"], json!({}))
        .await;
    let ccid = str_of(&cch["id"], "id");
    let cm = carl.say(&ccid, "c").await;
    let cserial = str_of(&cm["message"]["message_serial"], "serial");
    for f in ["1", "2", "3"] {
        mutate(&carl, &ccid, &cserial, "append", json!({"data": f})).await;
    }
    let control_written = tokio::time::Instant::now();

    let mut expected: Vec<Expected> = Vec::new();
    let mut total_versions = 0i64;

    // Appends only: the latest version is a fragment, the state the whole text.
    let m = alice.say(&cid, "s").await;
    let serial = str_of(&m["message"]["message_serial"], "serial");
    let mut last = Value::Null;
    for f in ["1", "2", "3", "4", "5"] {
        last = mutate(&alice, &cid, &serial, "append", json!({"data": f})).await;
    }
    total_versions += 6;
    expected.push(Expected {
        label: "appends",
        serial,
        created_at: m["message"]["created_at"].clone(),
        history_serial: m["message"]["history_serial"].clone(),
        version_serial: last["message"]["version_serial"].clone(),
        action: "append",
        name: m["message"]["name"].clone(),
        data: json!("s12345"),
        extras: json!({}),
        deleted: false,
    });

    // A long stream: many purge batches of 2 for one message.
    let m = alice.say(&cid, "L").await;
    let serial = str_of(&m["message"]["message_serial"], "serial");
    let mut long_text = "L".to_owned();
    let mut last = Value::Null;
    for i in 0..40 {
        let f = format!("<{i:02}>");
        long_text.push_str(&f);
        last = mutate(&alice, &cid, &serial, "append", json!({"data": f})).await;
    }
    total_versions += 41;
    expected.push(Expected {
        label: "long",
        serial,
        created_at: m["message"]["created_at"].clone(),
        history_serial: m["message"]["history_serial"].clone(),
        version_serial: last["message"]["version_serial"].clone(),
        action: "append",
        name: m["message"]["name"].clone(),
        data: json!(long_text),
        extras: json!({}),
        deleted: false,
    });

    // Updates of different fields: the latest state merges them.
    let m = alice.say(&cid, "a").await;
    let serial = str_of(&m["message"]["message_serial"], "serial");
    mutate(&alice, &cid, &serial, "update", json!({"data": "b"})).await;
    mutate(
        &alice,
        &cid,
        &serial,
        "update",
        json!({"name": "renamed", "extras": {"k": 1}}),
    )
    .await;
    let last = mutate(&alice, &cid, &serial, "update", json!({"data": "c"})).await;
    total_versions += 4;
    expected.push(Expected {
        label: "updates",
        serial,
        created_at: m["message"]["created_at"].clone(),
        history_serial: m["message"]["history_serial"].clone(),
        version_serial: last["message"]["version_serial"].clone(),
        action: "update",
        name: json!("renamed"),
        data: json!("c"),
        extras: json!({"k": 1}),
        deleted: false,
    });

    // Appends around an update, the last one by another entity.
    let m = alice.say(&cid, "x").await;
    let serial = str_of(&m["message"]["message_serial"], "serial");
    mutate(&alice, &cid, &serial, "append", json!({"data": "y"})).await;
    mutate(
        &alice,
        &cid,
        &serial,
        "update",
        json!({"extras": {"e": true}}),
    )
    .await;
    let last = mutate(&bob, &cid, &serial, "append", json!({"data": "z"})).await;
    total_versions += 4;
    expected.push(Expected {
        label: "mixed",
        serial,
        created_at: m["message"]["created_at"].clone(),
        history_serial: m["message"]["history_serial"].clone(),
        version_serial: last["message"]["version_serial"].clone(),
        action: "append",
        name: m["message"]["name"].clone(),
        data: json!("xyz"),
        extras: json!({"e": true}),
        deleted: false,
    });

    // A delete with a tombstone text.
    let m = alice.say(&cid, "gone").await;
    let serial = str_of(&m["message"]["message_serial"], "serial");
    mutate(&alice, &cid, &serial, "append", json!({"data": "!"})).await;
    let last = mutate(
        &alice,
        &cid,
        &serial,
        "delete",
        json!({"data": "[tombstone]"}),
    )
    .await;
    total_versions += 3;
    expected.push(Expected {
        label: "deleted",
        serial,
        created_at: m["message"]["created_at"].clone(),
        history_serial: m["message"]["history_serial"].clone(),
        version_serial: last["message"]["version_serial"].clone(),
        action: "delete",
        name: m["message"]["name"].clone(),
        data: json!("[tombstone]"),
        extras: json!({}),
        deleted: true,
    });

    // A message whose only version is its create.
    let m = alice.say(&cid, "solo").await;
    let serial = str_of(&m["message"]["message_serial"], "serial");
    total_versions += 1;
    expected.push(Expected {
        label: "single",
        serial,
        created_at: m["message"]["created_at"].clone(),
        history_serial: m["message"]["history_serial"].clone(),
        version_serial: m["message"]["version_serial"].clone(),
        action: "create",
        name: m["message"]["name"].clone(),
        data: json!("solo"),
        extras: json!({}),
        deleted: false,
    });

    // Wait (bounded) until every message is down to one version.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let mut counts = Vec::new();
        for e in &expected {
            counts.push((e.label, chat_versions(&alice, &cid, &e.serial).await.len()));
        }
        if counts.iter().all(|(_, n)| *n == 1) {
            break;
        }
        assert!(
            counts.iter().all(|(_, n)| *n >= 1),
            "a message lost its newest version: {counts:?}"
        );
        assert!(
            tokio::time::Instant::now() < deadline,
            "versions older than the 1 s window not purged within {DEADLINE:?}: {counts:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    for e in &expected {
        let v = chat_versions(&alice, &cid, &e.serial).await;
        assert_eq!(v.len(), 1, "{}: {v:?}", e.label);
        assert_eq!(
            v[0]["version_serial"], e.version_serial,
            "{}: kept the newest: {}",
            e.label, v[0]
        );
        assert_eq!(v[0]["action"], json!(e.action), "{}: {}", e.label, v[0]);
        check_state(e, &get_message(&alice, &cid, &e.serial).await);
    }
    // The channel listing shows the same latest states.
    let (st, list) = alice
        .get(&format!(
            "/api/channels/{cid}/messages?after_seq=0&limit=200"
        ))
        .await;
    assert_eq!(st, 200, "{list}");
    let list = list["messages"].as_array().expect("messages array").clone();
    assert_eq!(
        list.len(),
        expected.len(),
        "every message is still listed: {list:?}"
    );
    for e in &expected {
        let m = list
            .iter()
            .find(|m| m["message_serial"] == json!(e.serial))
            .unwrap_or_else(|| panic!("{} listed", e.label));
        check_state(e, m);
    }

    // New versions continue the channel's seqs and build on the retained state.
    let appends = &expected[0];
    let r = mutate(
        &alice,
        &cid,
        &appends.serial,
        "append",
        json!({"data": "6"}),
    )
    .await;
    assert_eq!(r["message"]["data"], json!("s123456"), "{r}");
    assert_eq!(r["event"]["seq"], json!(total_versions + 1), "{r}");
    assert_eq!(r["event"]["payload"]["length"], json!(7), "{r}");
    assert_eq!(
        alice.channel(&cid).await["last_seq"],
        json!(total_versions + 1)
    );
    let v = chat_versions(&alice, &cid, &appends.serial).await;
    assert!(
        v.first()
            .is_some_and(|x| x["delivery_serial"] == json!(total_versions + 1)),
        "the new version is listed first: {v:?}"
    );

    // The control workspace (no window) kept every version through several passes.
    let since = control_written.elapsed();
    if since < Duration::from_secs(4) {
        tokio::time::sleep(Duration::from_secs(4) - since).await;
    }
    let cv = chat_versions(&carl, &ccid, &cserial).await;
    assert_eq!(cv.len(), 4, "retention 0 never purges: {cv:?}");
    assert_eq!(
        get_message(&carl, &ccid, &cserial).await["data"],
        json!("c123")
    );
}

/// Signed server-API request under `/apps/{appId}` with extra (signed) query parameters.
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

#[tokio::test]
async fn purge_on_an_implicit_channel_keeps_server_api_reads_whole() {
    let s = start_purging_server().await;
    let channel = uniq("private-ai:retained");
    let (st, r) = srv(
        &s,
        Method::POST,
        "/events",
        Some(
            &json!({"name": "reply", "data": "Hel", "channel": channel, "info": "x",
                     "client_id": "agent-1"}),
        ),
        &[],
    )
    .await;
    assert_eq!(st, 200, "publish: {r}");
    let serial = str_of(&r["channels"][&channel]["message_serial"], "message_serial");
    let mut last = Value::Null;
    for f in ["lo", ", ", "wor", "ld"] {
        let (st, resp) = srv(
            &s,
            Method::POST,
            &format!("/channels/{channel}/messages/{serial}/append"),
            Some(&json!({"data": f})),
            &[],
        )
        .await;
        assert_eq!(st, 200, "append {f}: {resp}");
        last = resp;
    }
    let (st, other) = srv(
        &s,
        Method::POST,
        "/events",
        Some(&json!({"name": "note", "data": "only one", "channel": channel, "info": "x"})),
        &[],
    )
    .await;
    assert_eq!(st, 200, "publish: {other}");
    let other_serial = str_of(&other["channels"][&channel]["message_serial"], "serial");

    let versions_path = format!("/channels/{channel}/messages/{serial}/versions");
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let kept = loop {
        let (st, v) = srv(&s, Method::GET, &versions_path, None, &[]).await;
        assert_eq!(st, 200, "versions: {v}");
        let items = v["items"].as_array().expect("items array").clone();
        assert!(!items.is_empty(), "the newest version is never purged: {v}");
        if items.len() == 1 {
            break items;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not purged within {DEADLINE:?}: {} versions",
            items.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        kept[0]["version_serial"], last["version_serial"],
        "{kept:?}"
    );
    assert_eq!(kept[0]["action"], json!("append"), "{kept:?}");

    let (st, got) = srv(
        &s,
        Method::GET,
        &format!("/channels/{channel}/messages/{serial}"),
        None,
        &[],
    )
    .await;
    assert_eq!(st, 200, "{got}");
    let item = &got["item"];
    assert_eq!(
        item["data"],
        json!("Hello, world"),
        "full text after purge: {got}"
    );
    assert_eq!(item["sender"], json!("agent-1"), "{got}");
    assert_eq!(item["name"], json!("reply"), "{got}");
    assert_eq!(item["version_serial"], last["version_serial"], "{got}");

    // History lists one latest item per message, the single-version one included.
    let (st, h) = srv(
        &s,
        Method::GET,
        &format!("/channels/{channel}/history"),
        None,
        &[("direction", "oldest_first")],
    )
    .await;
    assert_eq!(st, 200, "{h}");
    let items = h["items"].as_array().expect("items array");
    let serials: Vec<&Value> = items.iter().map(|i| &i["message_serial"]).collect();
    assert_eq!(serials, vec![&json!(serial), &json!(other_serial)], "{h}");
    assert_eq!(items[0]["data"], json!("Hello, world"), "{h}");
    assert_eq!(items[1]["data"], json!("only one"), "{h}");
    assert_eq!(items[1]["action"], json!("create"), "{h}");
}

/// Waits (bounded) until a message is down to its newest version.
async fn wait_purged(c: &ApiClient, cid: &str, serial: &str) -> Value {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let v = chat_versions(c, cid, serial).await;
        assert!(!v.is_empty(), "the newest version is never purged");
        if v.len() == 1 {
            return v[0].clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{serial}: still {} versions after {DEADLINE:?}",
            v.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn purge_keeps_stream_limits_idempotency_and_replay_text() {
    let s = start_purging_server().await;
    let (st, r) = s
        .signed(
            Method::PATCH,
            &format!("/apps/{}/settings", s.app.id),
            Some(&json!({"ai_transport": {"max_appends_per_message": 5,
                                          "max_accumulated_message_bytes": 1_048_576,
                                          "max_open_streaming_messages_per_channel": 1024,
                                          "stream_idle_timeout_seconds": 600}})),
        )
        .await;
    assert_eq!(st, 200, "{r}");
    assert_eq!(
        r["versioned_messages"]["retention_window_seconds"],
        json!(1),
        "{r}"
    );
    let alice = s.user("alice", "human", "member").await;
    let bob = s.user("bob", "human", "member").await;
    let ch = alice
        .create_group(&uniq("limits"), &["bob"], json!({}))
        .await;
    let cid = str_of(&ch["id"], "id");
    let c0 = {
        let w = s.ws(&bob.token, None).await;
        let c = w.ready_cursor.clone().expect("ready cursor");
        w.close().await;
        c
    };

    // Stream 1: three appends (one with an op_id), purge, then up to the limit of 5.
    let m = alice.say(&cid, "s").await;
    let m1 = str_of(&m["message"]["message_serial"], "serial");
    let first = mutate(
        &alice,
        &cid,
        &m1,
        "append",
        json!({"data": "a", "op_id": "op-a"}),
    )
    .await;
    mutate(&alice, &cid, &m1, "append", json!({"data": "b"})).await;
    mutate(&alice, &cid, &m1, "append", json!({"data": "c"})).await;
    // Stream 2: an update between appends.
    let m = alice.say(&cid, "t").await;
    let m2 = str_of(&m["message"]["message_serial"], "serial");
    mutate(&alice, &cid, &m2, "append", json!({"data": "0"})).await;
    mutate(&alice, &cid, &m2, "update", json!({"data": "U"})).await;
    for f in ["1", "2", "3"] {
        mutate(&alice, &cid, &m2, "append", json!({"data": f})).await;
    }
    // While its version is retained, an op_id answers its stored result. (Retention forgets
    // op_ids with their versions: docs/versioned-messages.md.)
    let (st, dup) = alice
        .post(
            &format!("/api/channels/{cid}/messages/{m1}/append"),
            &json!({"data": "a", "op_id": "op-a"}),
        )
        .await;
    assert_eq!(st, 200, "{dup}");
    assert_eq!(dup["status"], json!("duplicate"), "{dup}");
    assert!(dup["event"].is_null(), "{dup}");
    assert_eq!(
        dup["message"]["data"],
        json!("sa"),
        "a duplicate answers the message as its version left it: {dup}"
    );
    // Through the server API (same channel, message, action and payload) the answer names the
    // original version.
    let (st, sdup) = s
        .signed(
            Method::POST,
            &format!(
                "/apps/{}/channels/{}/messages/{m1}/append",
                s.app.id,
                str_of(&ch["name"], "name")
            ),
            Some(&json!({"data": "a", "op_id": "op-a"})),
        )
        .await;
    assert_eq!(st, 200, "{sdup}");
    assert_eq!(sdup["status"], json!("duplicate"), "{sdup}");
    assert_eq!(
        sdup["version_serial"], first["message"]["version_serial"],
        "the stored result names the original version: {sdup}"
    );
    assert_eq!(sdup["delivery_serial"], first["event"]["seq"], "{sdup}");
    wait_purged(&alice, &cid, &m2).await;
    assert_eq!(wait_purged(&alice, &cid, &m1).await["data"], json!("c"));

    // The append count survives the purge: 4th and 5th pass, the 6th is over the limit.
    mutate(&alice, &cid, &m1, "append", json!({"data": "d"})).await;
    let fifth = mutate(&alice, &cid, &m1, "append", json!({"data": "e"})).await;
    assert_eq!(fifth["message"]["data"], json!("sabcde"), "{fifth}");
    assert_eq!(fifth["event"]["payload"]["length"], json!(6), "{fifth}");
    let (st, over) = alice
        .post(
            &format!("/api/channels/{cid}/messages/{m1}/append"),
            &json!({"data": "f"}),
        )
        .await;
    assert_eq!(
        (st, over["code"].as_str()),
        (413, Some("payload_too_large")),
        "a purge must not reset the append count: {over}"
    );
    assert_eq!(
        get_message(&alice, &cid, &m1).await["data"],
        json!("sabcde")
    );

    // Replay from before both streams rebuilds both texts (the event log is not purged).
    let last_seq = i64_of(&fifth["event"]["seq"], "the fifth append's seq");
    let mut ws = s.ws(&bob.token, Some(&c0)).await;
    let frames = ws
        .collect_until(Duration::from_secs(30), |f| f["seq"] == json!(last_seq))
        .await;
    for (mid, want) in [(&m1, "sabcde"), (&m2, "U123")] {
        let mut text: Option<String> = None;
        for f in frames
            .iter()
            .filter(|f| f["payload"]["message_id"] == json!(mid))
        {
            let p = &f["payload"];
            match f["type"].as_str() {
                Some("message.created") | Some("message.updated") => {
                    text = Some(str_of(&p["data"], "data"))
                }
                Some("message.appended") if p["compacted"] == json!(true) => {
                    text = Some(str_of(&p["data"], "compacted data"))
                }
                Some("message.appended") => text
                    .as_mut()
                    .unwrap_or_else(|| panic!("append before create: {f}"))
                    .push_str(&str_of(&p["fragment"], "fragment")),
                _ => {}
            }
            if f["type"] == json!("message.appended") {
                assert_eq!(
                    p["length"].as_u64(),
                    text.as_ref().map(|t| t.len() as u64),
                    "{f}"
                );
            }
        }
        assert_eq!(
            text.as_deref(),
            Some(want),
            "{mid} replayed after purge: {frames:?}"
        );
        assert_eq!(get_message(&alice, &cid, mid).await["data"], json!(want));
    }
}
