//! A table of bad inputs with their expected status and code; every error body is exactly
//! SPEC §8's envelope and a rejected request changes nothing.

use reqwest::Method;
use serde_json::{json, Value};
use switchboard_integration::harness::{assert_error, TestServer};

struct Case {
    what: &'static str,
    method: Method,
    path: String,
    bearer: Option<String>,
    content_type: Option<&'static str>,
    body: Option<Vec<u8>>,
    status: u16,
    code: &'static str,
}

#[tokio::test]
async fn bad_input_table() {
    let s = TestServer::start().await;
    let alice = s.user("alice", "human", "member").await;
    s.create_entity("bob", "Bob", "human", "member").await;
    let ch = alice.create_group("table", &["bob"], json!({})).await;
    let cid = ch["id"].as_str().expect("id").to_owned();
    let good = alice.say(&cid, "the only message").await;
    let events_before = alice.pull_all(None).await;

    let tok = Some(alice.token.clone());
    let msgs = format!("/api/channels/{cid}/messages");
    let big = serde_json::to_vec(&json!({"data": "x".repeat(1024 * 1024 + 16)})).expect("ser");
    let json_ct = Some("application/json");
    let case = |what,
                method,
                path: &str,
                bearer: Option<String>,
                ct,
                body: Option<Vec<u8>>,
                status,
                code| Case {
        what,
        method,
        path: path.to_owned(),
        bearer,
        content_type: ct,
        body,
        status,
        code,
    };
    let cases = vec![
        case(
            "malformed JSON",
            Method::POST,
            &msgs,
            tok.clone(),
            json_ct,
            Some(b"{\"data\": ".to_vec()),
            400,
            "invalid_input",
        ),
        case(
            "JSON that is not an object",
            Method::POST,
            &msgs,
            tok.clone(),
            json_ct,
            Some(b"[1,2]".to_vec()),
            400,
            "invalid_input",
        ),
        case(
            "wrong field type",
            Method::POST,
            &msgs,
            tok.clone(),
            json_ct,
            Some(br#"{"data":"x","tags":"not-a-list"}"#.to_vec()),
            400,
            "invalid_input",
        ),
        case(
            "missing data",
            Method::POST,
            &msgs,
            tok.clone(),
            json_ct,
            Some(br#"{"name":"x"}"#.to_vec()),
            400,
            "invalid_input",
        ),
        case(
            "wrong content type",
            Method::POST,
            &msgs,
            tok.clone(),
            Some("text/plain"),
            Some(br#"{"data":"x"}"#.to_vec()),
            400,
            "invalid_input",
        ),
        case(
            "form content type",
            Method::POST,
            &msgs,
            tok.clone(),
            Some("application/x-www-form-urlencoded"),
            Some(b"data=x".to_vec()),
            400,
            "invalid_input",
        ),
        case(
            "no content type",
            Method::POST,
            &msgs,
            tok.clone(),
            None,
            Some(br#"{"data":"x"}"#.to_vec()),
            400,
            "invalid_input",
        ),
        case(
            "body over 1 MiB",
            Method::POST,
            &msgs,
            tok.clone(),
            json_ct,
            Some(big),
            413,
            "payload_too_large",
        ),
        case(
            "unknown route under /api",
            Method::GET,
            "/api/no-such-thing",
            tok.clone(),
            None,
            None,
            404,
            "not_found",
        ),
        case(
            "unknown nested route",
            Method::POST,
            &format!("/api/channels/{cid}/nope"),
            tok.clone(),
            json_ct,
            Some(b"{}".to_vec()),
            404,
            "not_found",
        ),
        case(
            "unknown channel",
            Method::POST,
            "/api/channels/chn_01ARZ3NDEKTSV4RRFFQ69G5FAV/messages",
            tok.clone(),
            json_ct,
            Some(br#"{"data":"x"}"#.to_vec()),
            404,
            "not_found",
        ),
        case(
            "bad token",
            Method::POST,
            &msgs,
            Some("bad.token.here".into()),
            json_ct,
            Some(br#"{"data":"x"}"#.to_vec()),
            401,
            "auth_failed",
        ),
        case(
            "no token",
            Method::POST,
            &msgs,
            None,
            json_ct,
            Some(br#"{"data":"x"}"#.to_vec()),
            401,
            "auth_failed",
        ),
        case(
            "no token on GET",
            Method::GET,
            "/api/channels",
            None,
            None,
            None,
            401,
            "auth_failed",
        ),
        case(
            "bad limit",
            Method::GET,
            &format!("{msgs}?limit=abc"),
            tok.clone(),
            None,
            None,
            400,
            "invalid_input",
        ),
        case(
            "limit over 200",
            Method::GET,
            &format!("{msgs}?limit=201"),
            tok.clone(),
            None,
            None,
            400,
            "invalid_input",
        ),
        case(
            "thread_id of no message",
            Method::POST,
            &msgs,
            tok.clone(),
            json_ct,
            Some(br#"{"data":"x","thread_id":"nope"}"#.to_vec()),
            404,
            "not_found",
        ),
        case(
            "malformed JSON on channel create",
            Method::POST,
            "/api/channels",
            tok.clone(),
            json_ct,
            Some(b"{".to_vec()),
            400,
            "invalid_input",
        ),
        case(
            "malformed JSON on read",
            Method::POST,
            &format!("/api/channels/{cid}/read"),
            tok.clone(),
            json_ct,
            Some(b"nope".to_vec()),
            400,
            "invalid_input",
        ),
        case(
            "unknown admin workspace body",
            Method::POST,
            "/admin/workspaces",
            Some(s.admin_token.clone()),
            json_ct,
            Some(b"{oops".to_vec()),
            400,
            "invalid_input",
        ),
    ];
    for c in cases {
        let resp = s
            .raw(
                c.method.clone(),
                &c.path,
                c.bearer.as_deref(),
                c.content_type,
                c.body,
            )
            .await;
        assert_eq!(
            (resp.0, resp.1["code"].clone()),
            (c.status, json!(c.code)),
            "{}: {} {}",
            c.what,
            c.method,
            c.path
        );
        assert_error(&resp, c.status, c.code);
    }

    // Nothing changed: one message, no new event, the next post takes seq 2.
    let after = alice.messages(&cid).await;
    assert_eq!(after.len(), 1);
    assert_eq!(
        after[0]["message_serial"],
        good["message"]["message_serial"]
    );
    let events_after = alice.pull_all(None).await;
    let ids = |v: &[Value]| v.iter().map(|e| e["id"].clone()).collect::<Vec<_>>();
    assert_eq!(
        ids(&events_after),
        ids(&events_before),
        "no event from rejected requests"
    );
    assert_eq!(alice.channel(&cid).await["last_seq"], json!(1));
    assert_eq!(alice.say(&cid, "next").await["event"]["seq"], json!(2));
    // The admin CLI still lists just the bootstrap workspace.
    let (ok, stdout, stderr) = s
        .run_cli(&["admin", "workspace", "list", "--database", &s.db_url()])
        .await;
    assert!(ok, "workspace list: {stderr}");
    assert!(
        stdout.contains(&s.app.id),
        "bootstrap workspace listed: {stdout}"
    );
}

#[tokio::test]
async fn errors_outside_api_use_the_envelope_too() {
    let s = TestServer::start().await;
    // Signed API, unknown app.
    let resp = s
        .raw(Method::GET, "/apps/999/entities", None, None, None)
        .await;
    assert!(resp.0 == 401 || resp.0 == 404, "{resp:?}");
    assert_error(
        &resp,
        resp.0,
        if resp.0 == 401 {
            "auth_failed"
        } else {
            "app_not_found"
        },
    );
    // Admin without token.
    let resp = s
        .raw(
            Method::POST,
            "/admin/workspaces",
            None,
            Some("application/json"),
            Some(b"{}".to_vec()),
        )
        .await;
    assert_error(&resp, 401, "auth_failed");
}
