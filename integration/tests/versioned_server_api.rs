//! Versioned messages through the signed server API (docs/versioned-messages.md "Server
//! API", SPEC §5): publishing with `/events`, implicit channels, the mutation answer, message
//! and version reads, history, and authentication errors.

use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};
use switchboard_integration::harness::{
    assert_error, cursor_str, random_string, AppCreds, SignOpts, TestServer,
};

const WAIT: Duration = Duration::from_secs(10);

const MUTATION_KEYS: &[&str] = &[
    "accepted",
    "action",
    "channel",
    "delivery_serial",
    "history_serial",
    "message_serial",
    "status",
    "version_serial",
];

const ITEM_KEYS: &[&str] = &[
    "channel",
    "message_serial",
    "history_serial",
    "version_serial",
    "delivery_serial",
    "action",
    "sender",
    "name",
    "data",
    "extras",
    "deleted",
    "thread_id",
    "version",
    "created_at",
    "updated_at",
];

// ------------------------------------------------------------------------- helpers

fn mser(n: u64) -> String {
    format!("m{n:012}")
}

fn vser(n: u64) -> String {
    format!("v{n:012}")
}

/// A channel name the chat API does not know (an implicit channel).
fn implicit(prefix: &str) -> String {
    format!("{prefix}-{}", random_string(8))
}

async fn events(s: &TestServer, body: &Value) -> (u16, Value) {
    s.signed(
        Method::POST,
        &format!("/apps/{}/events", s.app.id),
        Some(body),
    )
    .await
}

/// Publishes `data` on `channel` with `info`; returns the channel's acknowledgement.
async fn publish(s: &TestServer, channel: &str, data: &Value) -> Value {
    let (st, body) = events(
        s,
        &json!({"name": "chunk", "data": data, "channel": channel, "info": "subscription_count"}),
    )
    .await;
    assert_eq!(st, 200, "publish on {channel}: {body}");
    let ack = body["channels"][channel].clone();
    assert!(ack.is_object(), "acknowledged {channel}: {body}");
    ack
}

fn msg_path(s: &TestServer, channel: &str, ser: &str) -> String {
    format!("/apps/{}/channels/{channel}/messages/{ser}", s.app.id)
}

async fn mutate(
    s: &TestServer,
    channel: &str,
    ser: &str,
    action: &str,
    body: &Value,
) -> (u16, Value) {
    s.signed(
        Method::POST,
        &format!("{}/{action}", msg_path(s, channel, ser)),
        Some(body),
    )
    .await
}

/// A signed GET with (signed) query parameters.
async fn sget(s: &TestServer, path: &str, query: &[(&str, &str)]) -> (u16, Value) {
    s.signed_with(
        &s.app,
        Method::GET,
        path,
        None,
        SignOpts {
            extra_query: query
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            ..SignOpts::default()
        },
    )
    .await
}

fn items(page: &Value) -> Vec<Value> {
    page["items"]
        .as_array()
        .unwrap_or_else(|| panic!("items is an array: {page}"))
        .clone()
}

fn col(items: &[Value], key: &str) -> Vec<Value> {
    items.iter().map(|v| v[key].clone()).collect()
}

fn sorted_keys(v: &Value) -> Vec<String> {
    let mut k: Vec<String> = v
        .as_object()
        .unwrap_or_else(|| panic!("an object: {v}"))
        .keys()
        .cloned()
        .collect();
    k.sort_unstable();
    k
}

fn assert_item_shape(item: &Value) {
    for k in ITEM_KEYS {
        assert!(
            item.as_object().is_some_and(|o| o.contains_key(*k)),
            "item has {k}: {item}"
        );
    }
    for k in ["serial", "client_id", "created_at"] {
        assert!(
            item["version"]
                .as_object()
                .is_some_and(|o| o.contains_key(k)),
            "item.version has {k}: {item}"
        );
    }
    assert_eq!(
        item["version"]["serial"], item["version_serial"],
        "version.serial = version_serial: {item}"
    );
}

/// Pages through `path` (versions or history) with `limit`, following `cursor` = the last
/// item's `cursor_key`; returns the pages' items in order and the number of pages.
async fn page_all(
    s: &TestServer,
    path: &str,
    direction: &str,
    limit: &str,
    cursor_key: &str,
) -> (Vec<Value>, usize) {
    let mut out = Vec::new();
    let mut cursor: Option<String> = None;
    for pages in 1..=20 {
        let mut q: Vec<(&str, &str)> = vec![("direction", direction), ("limit", limit)];
        if let Some(c) = &cursor {
            q.push(("cursor", c.as_str()));
        }
        let (st, page) = sget(s, path, &q).await;
        assert_eq!(st, 200, "{path} {q:?}: {page}");
        assert_eq!(page["direction"], json!(direction), "{page}");
        assert_eq!(page["limit"].to_string(), limit, "{page}");
        let got = items(&page);
        let n: usize = limit.parse().expect("numeric limit");
        assert!(got.len() <= n, "limit respected: {page}");
        let last = got.last().map(|v| v[cursor_key].clone());
        out.extend(got.clone());
        if page["has_more"] == json!(true) {
            assert_eq!(got.len(), n, "a page with more is full: {page}");
            let last = last.unwrap_or_else(|| panic!("a page with more has items: {page}"));
            if !page["next_cursor"].is_null() {
                assert_eq!(
                    cursor_str(&page["next_cursor"]),
                    cursor_str(&last),
                    "next_cursor is the last item's {cursor_key}: {page}"
                );
            }
            cursor = Some(cursor_str(&last));
        } else {
            assert_eq!(page["has_more"], json!(false), "{page}");
            return (out, pages);
        }
    }
    panic!("paging {path} did not end");
}

// ------------------------------------------------------------------------- /events

#[tokio::test]
async fn events_answers_empty_object_without_info() {
    let s = TestServer::start().await;
    let ch = implicit("plain");
    let (st, body) = events(&s, &json!({"name": "ev", "data": "hi", "channel": ch})).await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(body, json!({}), "no info: an empty object");
    // It was stored: history shows it.
    let (st, hist) = sget(
        &s,
        &format!("/apps/{}/channels/{ch}/history", s.app.id),
        &[],
    )
    .await;
    assert_eq!(st, 200, "{hist}");
    let it = items(&hist);
    assert_eq!(it.len(), 1, "{hist}");
    assert_eq!(it[0]["data"], json!("hi"), "{hist}");
    assert_eq!(it[0]["name"], json!("ev"), "{hist}");
    assert!(
        it[0]["sender"].is_null(),
        "no client_id: sender null: {hist}"
    );
}

/// `data` of each item of a channel's history, oldest first, by channel name.
async fn history_data(s: &TestServer, channel: &str) -> Vec<Value> {
    let path = format!("/apps/{}/channels/{channel}/history", s.app.id);
    let (st, hist) = sget(s, &path, &[("direction", "forwards")]).await;
    assert_eq!(st, 200, "{channel}: {hist}");
    col(&items(&hist), "data")
}

#[tokio::test]
async fn events_follow_a_channel_renamed_at_once() {
    // The server API remembers channel ids by name for a few seconds: a rename must not
    // leave the old name pointing at the renamed channel.
    let s = TestServer::start().await;
    let alice = s.user("alice", "human", "member").await;
    s.user("bob", "human", "member").await;
    let (before, after) = (implicit("before"), implicit("after"));
    let ch = alice.create_group(&before, &["bob"], json!({})).await;
    let cid = ch["id"]
        .as_str()
        .unwrap_or_else(|| panic!("{ch}"))
        .to_string();
    let (st, body) = events(&s, &json!({"name": "ev", "data": "one", "channel": before})).await;
    assert_eq!(st, 200, "{body}");
    let (st, patched) = alice
        .patch(&format!("/api/channels/{cid}"), &json!({"name": after}))
        .await;
    assert_eq!(st, 200, "{patched}");
    // The old name is free again: a publish on it makes a new implicit channel.
    let (st, body) = events(&s, &json!({"name": "ev", "data": "two", "channel": before})).await;
    assert_eq!(st, 200, "{body}");
    let (st, body) = events(
        &s,
        &json!({"name": "ev", "data": "three", "channel": after}),
    )
    .await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(
        history_data(&s, &after).await,
        vec![json!("one"), json!("three")]
    );
    assert_eq!(history_data(&s, &before).await, vec![json!("two")]);
}

#[tokio::test]
async fn events_with_info_reports_serials_per_channel() {
    let s = TestServer::start().await;
    let ch = implicit("info");
    let ack = publish(&s, &ch, &json!("one")).await;
    for k in [
        "message_serial",
        "history_serial",
        "delivery_serial",
        "version_serial",
    ] {
        assert!(!ack[k].is_null(), "ack has {k}: {ack}");
    }
    assert_eq!(ack["message_serial"], json!(mser(1)), "{ack}");
    assert_eq!(ack["history_serial"], json!(1), "{ack}");
    assert_eq!(ack["delivery_serial"], json!(1), "{ack}");
    assert_eq!(ack["version_serial"], json!(vser(1)), "{ack}");
    let ack2 = publish(&s, &ch, &json!("two")).await;
    assert_eq!(ack2["message_serial"], json!(mser(2)), "{ack2}");
    assert_eq!(ack2["delivery_serial"], json!(2), "{ack2}");

    // Two channels: both acknowledged, each with its own seqs.
    let other = implicit("info-b");
    let (st, body) = events(
        &s,
        &json!({"name": "ev", "data": "both", "channels": [ch, other], "info": "user_count"}),
    )
    .await;
    assert_eq!(st, 200, "{body}");
    let chans = body["channels"]
        .as_object()
        .unwrap_or_else(|| panic!("channels object: {body}"));
    assert_eq!(chans.len(), 2, "{body}");
    assert_eq!(body["channels"][&ch]["history_serial"], json!(3), "{body}");
    assert_eq!(
        body["channels"][&other]["history_serial"],
        json!(1),
        "{body}"
    );
    assert_eq!(
        body["channels"][&other]["message_serial"],
        json!(mser(1)),
        "{body}"
    );
}

#[tokio::test]
async fn events_channels_at_100_ok_over_100_limit_exceeded() {
    let s = TestServer::start().await;
    let prefix = random_string(6);
    let names: Vec<String> = (0..101).map(|i| format!("bulk-{prefix}-{i}")).collect();
    let resp = events(
        &s,
        &json!({"name": "ev", "data": "x", "channels": names, "info": "x"}),
    )
    .await;
    assert_error(&resp, 400, "limit_exceeded");
    // Nothing was created.
    let (st, hist) = sget(
        &s,
        &format!("/apps/{}/channels/{}/history", s.app.id, names[0]),
        &[],
    )
    .await;
    assert!(
        st == 404 || (st == 200 && items(&hist).is_empty()),
        "a refused publish creates nothing: {st} {hist}"
    );

    let (st, body) = events(
        &s,
        &json!({"name": "ev", "data": "x", "channels": &names[..100], "info": "x"}),
    )
    .await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(
        body["channels"].as_object().map(|o| o.len()),
        Some(100),
        "{body}"
    );
    assert_eq!(
        body["channels"][&names[0]]["history_serial"],
        json!(1),
        "the refused request took no seq: {body}"
    );
}

#[tokio::test]
async fn events_data_over_64_kib_is_413() {
    let s = TestServer::start().await;
    let ch = implicit("big");
    let resp = events(
        &s,
        &json!({"name": "ev", "data": "x".repeat(65 * 1024), "channel": ch}),
    )
    .await;
    assert_error(&resp, 413, "payload_too_large");
    let (st, hist) = sget(
        &s,
        &format!("/apps/{}/channels/{ch}/history", s.app.id),
        &[],
    )
    .await;
    assert!(
        st == 404 || (st == 200 && items(&hist).is_empty()),
        "a refused publish creates nothing: {st} {hist}"
    );
    // Well under the limit is fine.
    let ack = publish(&s, &ch, &json!("y".repeat(60 * 1024))).await;
    assert_eq!(ack["history_serial"], json!(1), "{ack}");
}

#[tokio::test]
async fn events_on_unknown_name_make_an_implicit_channel_the_chat_api_does_not_show() {
    let s = TestServer::start().await;
    let alice = s.user("alice", "human", "member").await;
    s.create_entity("bob", "Bob", "human", "member").await;
    let room = alice
        .create_group("visible", &["bob"], json!({"visibility": "public"}))
        .await;
    let rid = room["id"].as_str().expect("id").to_owned();
    let before = alice.channels().await.len();
    let mut ws = s.ws(&alice.token, None).await;

    let ch = implicit("ai-hidden");
    let ack = publish(&s, &ch, &json!("secret stream")).await;
    let ser = ack["message_serial"]
        .as_str()
        .unwrap_or_else(|| panic!("message_serial: {ack}"))
        .to_owned();

    let listed = alice.channels().await;
    assert_eq!(listed.len(), before, "no new chat channel: {listed:?}");
    assert!(
        listed.iter().all(|c| c["name"] != json!(ch)),
        "implicit channel not listed: {listed:?}"
    );
    // The server API reads it.
    let (st, got) = sget(&s, &msg_path(&s, &ch, &ser), &[]).await;
    assert_eq!(st, 200, "{got}");
    assert_eq!(got["item"]["data"], json!("secret stream"), "{got}");

    // Chat sockets see nothing of it: the next thing they see is a chat message.
    let marker = alice.say(&rid, "marker").await;
    let mid = marker["message"]["message_serial"].clone();
    let frames = ws
        .collect_until(WAIT, |f| {
            f["type"] == json!("message.created") && f["payload"]["message_id"] == mid
        })
        .await;
    assert_eq!(
        frames
            .iter()
            .filter(|f| f["type"]
                .as_str()
                .is_some_and(|t| t.starts_with("message.")))
            .count(),
        1,
        "only the chat message reached the chat socket: {frames:?}"
    );
}

#[tokio::test]
async fn events_on_a_chat_channel_name_post_into_it_and_reach_members() {
    let s = TestServer::start().await;
    let alice = s.user("alice", "human", "member").await;
    let bob = s.user("bob", "human", "member").await;
    let name = format!("room-{}", random_string(6));
    let ch = alice.create_group(&name, &["bob"], json!({})).await;
    let cid = ch["id"].as_str().expect("id").to_owned();
    alice.say(&cid, "first").await;
    let mut ws = s.ws(&bob.token, None).await;

    let ack = publish(&s, &name, &json!("from the server")).await;
    assert_eq!(
        ack["history_serial"],
        json!(2),
        "continues the chat seqs: {ack}"
    );
    let ser = ack["message_serial"].clone();

    let frames = ws
        .collect_until(WAIT, |f| f["type"] == json!("message.created"))
        .await;
    let ev = frames.last().expect("message.created");
    assert_eq!(ev["channel_id"], json!(cid), "{ev}");
    assert_eq!(ev["seq"], json!(2), "{ev}");
    assert_eq!(ev["payload"]["message_id"], ser, "{ev}");
    assert_eq!(ev["payload"]["data"], json!("from the server"), "{ev}");

    let msgs = alice.messages(&cid).await;
    assert_eq!(msgs.len(), 2, "{msgs:?}");
    assert_eq!(msgs[1]["data"], json!("from the server"), "{msgs:?}");
    assert_eq!(msgs[1]["name"], json!("chunk"), "{msgs:?}");
    assert!(msgs[1]["sender"].is_null(), "no client_id: {msgs:?}");

    // A server-API append on the chat channel reaches the member too.
    let ser = ser
        .as_str()
        .unwrap_or_else(|| panic!("serial: {ack}"))
        .to_owned();
    let (st, r) = mutate(&s, &name, &ser, "append", &json!({"data": "!"})).await;
    assert_eq!(st, 200, "{r}");
    let frames = ws
        .collect_until(WAIT, |f| f["type"] == json!("message.appended"))
        .await;
    let ev = frames.last().expect("message.appended");
    assert_eq!(ev["seq"], json!(3), "{ev}");
    assert_eq!(ev["payload"]["fragment"], json!("!"), "{ev}");
    assert_eq!(ev["payload"]["length"], json!(16), "{ev}");
}

// ------------------------------------------------------------------------- mutations

#[tokio::test]
async fn server_mutations_answer_exactly_the_documented_fields() {
    let s = TestServer::start().await;
    let ch = implicit("mut");
    let ack = publish(&s, &ch, &json!("v1")).await;
    let ser = mser(1);
    assert_eq!(ack["message_serial"], json!(ser));

    let mut expected_seq = 1u64;
    for (action, body) in [
        ("update", json!({"data": "v2"})),
        ("append", json!({"data": "+"})),
        ("delete", json!({})),
    ] {
        expected_seq += 1;
        let (st, r) = mutate(&s, &ch, &ser, action, &body).await;
        assert_eq!(st, 200, "{action}: {r}");
        assert_eq!(
            sorted_keys(&r),
            MUTATION_KEYS
                .iter()
                .map(|k| (*k).to_owned())
                .collect::<Vec<_>>(),
            "{action}: exactly the documented fields: {r}"
        );
        assert_eq!(r["channel"], json!(ch), "{r}");
        assert_eq!(r["message_serial"], json!(ser), "{r}");
        assert_eq!(r["action"], json!(action), "{r}");
        assert_eq!(r["accepted"], json!(true), "{r}");
        assert_eq!(r["status"], json!("applied"), "{r}");
        assert_eq!(r["version_serial"], json!(vser(expected_seq)), "{r}");
        assert_eq!(r["history_serial"], json!(1), "{r}");
        assert_eq!(r["delivery_serial"], json!(expected_seq), "{r}");
    }

    // op_id replay: same answer with status duplicate, nothing new.
    let ack = publish(&s, &ch, &json!("w")).await;
    let ser2 = ack["message_serial"]
        .as_str()
        .unwrap_or_else(|| panic!("serial: {ack}"))
        .to_owned();
    let body = json!({"data": "x", "op_id": "op-a"});
    let (st, first) = mutate(&s, &ch, &ser2, "append", &body).await;
    assert_eq!(st, 200, "{first}");
    let (st, dup) = mutate(&s, &ch, &ser2, "append", &body).await;
    assert_eq!(st, 200, "{dup}");
    assert_eq!(dup["status"], json!("duplicate"), "{dup}");
    for k in [
        "version_serial",
        "delivery_serial",
        "message_serial",
        "action",
    ] {
        assert_eq!(dup[k], first[k], "duplicate answers the stored {k}: {dup}");
    }
    let resp = mutate(
        &s,
        &ch,
        &ser2,
        "append",
        &json!({"data": "y", "op_id": "op-a"}),
    )
    .await;
    assert_error(&resp, 400, "invalid_input");
    // A replay after a later version still answers the stored result of its own version.
    let (st, later) = mutate(&s, &ch, &ser2, "append", &json!({"data": "z"})).await;
    assert_eq!(st, 200, "{later}");
    let (st, dup) = mutate(&s, &ch, &ser2, "append", &body).await;
    assert_eq!(st, 200, "{dup}");
    assert_eq!(dup["status"], json!("duplicate"), "{dup}");
    for k in ["version_serial", "delivery_serial"] {
        assert_eq!(
            dup[k], first[k],
            "a late duplicate answers the stored {k}, not the latest ({}): {dup}",
            later[k]
        );
    }
    let (st, got) = sget(&s, &msg_path(&s, &ch, &ser2), &[]).await;
    assert_eq!(st, 200, "{got}");
    assert_eq!(got["item"]["data"], json!("wxz"), "{got}");

    // Unknown body fields are invalid_input.
    let resp = mutate(
        &s,
        &ch,
        &ser2,
        "update",
        &json!({"data": "z", "bogus": true}),
    )
    .await;
    assert_error(&resp, 400, "invalid_input");
}

// ------------------------------------------------------------------------- reads

#[tokio::test]
async fn server_get_message_returns_channel_and_latest_item() {
    let s = TestServer::start().await;
    let ch = implicit("get");
    publish(&s, &ch, &json!("Hel")).await;
    let ser = mser(1);
    let (st, _) = mutate(&s, &ch, &ser, "append", &json!({"data": "lo"})).await;
    assert_eq!(st, 200);
    let (st, r) = mutate(
        &s,
        &ch,
        &ser,
        "update",
        &json!({"extras": {"k": 1}, "client_id": "agent-7", "description": "tidy"}),
    )
    .await;
    assert_eq!(st, 200, "{r}");

    let (st, got) = sget(&s, &msg_path(&s, &ch, &ser), &[]).await;
    assert_eq!(st, 200, "{got}");
    assert_eq!(
        sorted_keys(&got),
        vec!["channel".to_owned(), "item".to_owned()],
        "{got}"
    );
    assert_eq!(got["channel"], json!(ch), "{got}");
    let item = &got["item"];
    assert_item_shape(item);
    assert_eq!(item["channel"], json!(ch), "{item}");
    assert_eq!(item["message_serial"], json!(ser), "{item}");
    assert_eq!(item["history_serial"], json!(1), "{item}");
    assert_eq!(
        item["version_serial"],
        json!(vser(3)),
        "latest version: {item}"
    );
    assert_eq!(item["delivery_serial"], json!(3), "{item}");
    assert_eq!(item["action"], json!("update"), "{item}");
    assert_eq!(item["data"], json!("Hello"), "{item}");
    assert_eq!(item["extras"], json!({"k": 1}), "{item}");
    assert_eq!(item["deleted"], json!(false), "{item}");
    assert!(item["thread_id"].is_null(), "{item}");
    assert_eq!(
        item["version"]["client_id"],
        json!("agent-7"),
        "client_id recorded as the version's actor: {item}"
    );
    assert_eq!(item["version"]["description"], json!("tidy"), "{item}");

    // Unknown message, unknown channel.
    assert_error(
        &sget(&s, &msg_path(&s, &ch, &mser(999)), &[]).await,
        404,
        "not_found",
    );
    assert_error(
        &mutate(&s, &ch, &mser(999), "append", &json!({"data": "x"})).await,
        404,
        "not_found",
    );
    assert_error(
        &sget(&s, &msg_path(&s, &implicit("nochan"), &ser), &[]).await,
        404,
        "not_found",
    );
}

#[tokio::test]
async fn server_versions_direction_limit_cursor() {
    let s = TestServer::start().await;
    let ch = implicit("vers");
    publish(&s, &ch, &json!("a")).await;
    let ser = mser(1);
    for body in [
        json!({"data": "b"}),
        json!({"data": "c"}),
        json!({"data": "d"}),
    ] {
        let (st, r) = mutate(&s, &ch, &ser, "append", &body).await;
        assert_eq!(st, 200, "{r}");
    }
    let (st, r) = mutate(&s, &ch, &ser, "update", &json!({"name": "renamed"})).await;
    assert_eq!(st, 200, "{r}");
    let path = format!("{}/versions", msg_path(&s, &ch, &ser));

    // Defaults: newest_first, limit = max_page_size.
    let (st, page) = sget(&s, &path, &[]).await;
    assert_eq!(st, 200, "{page}");
    assert_eq!(page["channel"], json!(ch), "{page}");
    assert_eq!(page["direction"], json!("newest_first"), "{page}");
    assert_eq!(page["limit"], json!(100), "{page}");
    assert_eq!(page["has_more"], json!(false), "{page}");
    let all = items(&page);
    for it in &all {
        assert_item_shape(it);
    }
    assert_eq!(
        col(&all, "delivery_serial"),
        vec![json!(5), json!(4), json!(3), json!(2), json!(1)],
        "{page}"
    );
    assert_eq!(
        col(&all, "action"),
        vec![
            json!("update"),
            json!("append"),
            json!("append"),
            json!("append"),
            json!("create")
        ],
        "{page}"
    );
    // Append items carry their fragment.
    assert_eq!(
        col(&all[1..4], "data"),
        vec![json!("d"), json!("c"), json!("b")],
        "{page}"
    );

    let (newest, pages) = page_all(&s, &path, "newest_first", "2", "version_serial").await;
    assert_eq!(pages, 3, "5 versions by 2");
    assert_eq!(
        col(&newest, "delivery_serial"),
        col(&all, "delivery_serial")
    );
    let (oldest, pages) = page_all(&s, &path, "oldest_first", "2", "version_serial").await;
    assert_eq!(pages, 3);
    assert_eq!(
        col(&oldest, "delivery_serial"),
        vec![json!(1), json!(2), json!(3), json!(4), json!(5)]
    );

    for (k, v) in [("limit", "0"), ("limit", "101"), ("direction", "sideways")] {
        assert_error(&sget(&s, &path, &[(k, v)]).await, 400, "invalid_input");
    }
}

#[tokio::test]
async fn server_history_one_item_per_message_latest_state_paged() {
    let s = TestServer::start().await;
    let ch = implicit("hist");
    for i in 1..=5 {
        publish(&s, &ch, &json!(format!("m{i}"))).await;
    }
    let ok = |r: (u16, Value)| assert_eq!(r.0, 200, "{}", r.1);
    ok(mutate(&s, &ch, &mser(2), "update", &json!({"data": "two"})).await);
    ok(mutate(&s, &ch, &mser(3), "append", &json!({"data": "+"})).await);
    ok(mutate(&s, &ch, &mser(3), "append", &json!({"data": "+"})).await);
    ok(mutate(&s, &ch, &mser(4), "delete", &json!({})).await);
    ok(mutate(&s, &ch, &mser(2), "update", &json!({"data": "TWO"})).await);
    let path = format!("/apps/{}/channels/{ch}/history", s.app.id);

    let (oldest, pages) = page_all(&s, &path, "oldest_first", "2", "history_serial").await;
    assert_eq!(pages, 3, "5 messages by 2");
    assert_eq!(
        col(&oldest, "history_serial"),
        vec![json!(1), json!(2), json!(3), json!(4), json!(5)],
        "one item per message by history_serial: {oldest:?}"
    );
    for it in &oldest {
        assert_item_shape(it);
        assert_eq!(it["channel"], json!(ch), "{it}");
    }
    assert_eq!(
        col(&oldest, "data"),
        vec![
            json!("m1"),
            json!("TWO"),
            json!("m3++"),
            Value::Null,
            json!("m5")
        ],
        "latest state: {oldest:?}"
    );
    assert_eq!(oldest[3]["deleted"], json!(true), "{:?}", oldest[3]);
    assert_eq!(
        oldest[1]["version_serial"],
        json!(vser(10)),
        "{:?}",
        oldest[1]
    );
    assert_eq!(
        oldest[2]["version_serial"],
        json!(vser(8)),
        "{:?}",
        oldest[2]
    );

    let (newest, _) = page_all(&s, &path, "newest_first", "2", "history_serial").await;
    let mut rev = oldest.clone();
    rev.reverse();
    assert_eq!(
        col(&newest, "history_serial"),
        col(&rev, "history_serial"),
        "newest_first is the reverse"
    );

    let (st, page) = sget(&s, &path, &[]).await;
    assert_eq!(st, 200, "{page}");
    assert_eq!(page["channel"], json!(ch), "{page}");
    assert_eq!(page["direction"], json!("newest_first"), "default: {page}");
    assert_eq!(
        col(&items(&page), "history_serial"),
        col(&rev, "history_serial"),
        "{page}"
    );
    for (k, v) in [("limit", "0"), ("limit", "101")] {
        assert_error(&sget(&s, &path, &[(k, v)]).await, 400, "invalid_input");
    }
}

// ------------------------------------------------------------------------- auth

#[tokio::test]
async fn server_api_auth_errors_unknown_message_and_unknown_app() {
    let s = TestServer::start().await;
    let ch = implicit("auth");
    publish(&s, &ch, &json!("x")).await;
    let ser = mser(1);
    let path = msg_path(&s, &ch, &ser);

    // Unsigned.
    assert_error(
        &s.raw(Method::GET, &path, None, None, None).await,
        401,
        "auth_failed",
    );
    assert_error(
        &s.raw(
            Method::POST,
            &format!("{path}/append"),
            None,
            Some("application/json"),
            Some(br#"{"data":"y"}"#.to_vec()),
        )
        .await,
        401,
        "auth_failed",
    );
    assert_error(
        &s.raw(
            Method::POST,
            &format!("/apps/{}/events", s.app.id),
            None,
            Some("application/json"),
            Some(br#"{"name":"e","data":"y","channel":"c"}"#.to_vec()),
        )
        .await,
        401,
        "auth_failed",
    );
    // Badly signed.
    let tampered = SignOpts {
        tamper_signature: true,
        ..SignOpts::default()
    };
    assert_error(
        &s.signed_with(&s.app, Method::GET, &path, None, tampered.clone())
            .await,
        401,
        "auth_failed",
    );
    assert_error(
        &s.signed_with(
            &s.app,
            Method::POST,
            &format!("{path}/append"),
            Some(&json!({"data": "y"})),
            tampered,
        )
        .await,
        401,
        "auth_failed",
    );
    let wrong_secret = AppCreds {
        secret: random_string(32),
        ..s.app.clone()
    };
    assert_error(
        &s.signed_with(
            &wrong_secret,
            Method::POST,
            &format!("{path}/update"),
            Some(&json!({"data": "y"})),
            SignOpts::default(),
        )
        .await,
        401,
        "auth_failed",
    );
    // None of that changed the message.
    let (st, got) = sget(&s, &path, &[]).await;
    assert_eq!(st, 200, "{got}");
    assert_eq!(got["item"]["data"], json!("x"), "{got}");
    assert_eq!(got["item"]["version_serial"], json!(vser(1)), "{got}");

    // Unknown message.
    assert_error(
        &sget(&s, &msg_path(&s, &ch, &mser(42)), &[]).await,
        404,
        "not_found",
    );
    // Unknown app (signed with real credentials, on an app id that does not exist).
    let ghost = format!("/apps/987654321/channels/{ch}/messages/{ser}");
    assert_error(
        &s.signed(Method::GET, &ghost, None).await,
        404,
        "app_not_found",
    );
    assert_error(
        &s.signed(
            Method::POST,
            "/apps/987654321/events",
            Some(&json!({"name": "e", "data": "y", "channel": ch})),
        )
        .await,
        404,
        "app_not_found",
    );
}

#[tokio::test]
async fn server_malformed_serial_is_400_unknown_is_404() {
    let s = TestServer::start().await;
    let ch = implicit("serial");
    publish(&s, &ch, &json!("x")).await;
    let long = format!("m{}", "1".repeat(199));
    let mut wrong: Vec<String> = Vec::new();
    for (bad, expect) in [
        (long.as_str(), (400, "invalid_input")),
        (mser(77).as_str(), (404, "not_found")),
    ] {
        let base = msg_path(&s, &ch, bad);
        let cases: Vec<(Method, String, Option<Value>)> = vec![
            (Method::GET, base.clone(), None),
            (Method::GET, format!("{base}/versions"), None),
            (
                Method::POST,
                format!("{base}/update"),
                Some(json!({"data": "y"})),
            ),
            (Method::POST, format!("{base}/delete"), Some(json!({}))),
            (
                Method::POST,
                format!("{base}/append"),
                Some(json!({"data": "y"})),
            ),
        ];
        for (method, path, body) in cases {
            let (st, resp) = s.signed(method.clone(), &path, body.as_ref()).await;
            if (st, resp["code"].as_str()) != (expect.0, Some(expect.1)) {
                wrong.push(format!(
                    "{method} {}: expected {} {}, got {st} {resp}",
                    path.replace(&long, "<200 chars>"),
                    expect.0,
                    expect.1
                ));
            } else {
                assert_error(&(st, resp), expect.0, expect.1);
            }
        }
    }
    assert!(wrong.is_empty(), "serial validation:\n{}", wrong.join("\n"));
}
