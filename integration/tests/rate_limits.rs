//! Rate limits (SPEC §5): off by default; `rate_limits.chat_api` limits each entity's `/api`
//! requests with a token bucket and answers 429 `rate_limited` with `Retry-After`.

use reqwest::Method;
use serde_json::json;
use switchboard_integration::harness::{assert_error, TestServer};

#[tokio::test]
async fn chat_api_limit_is_per_entity_with_retry_after() {
    let s = TestServer::start().await;
    let alice = s.user("alice", "human", "member").await;
    let bob = s.user("bob", "human", "member").await;

    // Off by default: a burst of requests all pass.
    for _ in 0..20 {
        assert_eq!(alice.get("/api/me").await.0, 200);
    }

    let (status, settings) = s
        .signed(
            Method::PATCH,
            &format!("/apps/{}/settings", s.app.id),
            Some(&json!({"rate_limits": {"chat_api": {"per_second": 0.5, "burst": 3}}})),
        )
        .await;
    assert_eq!(status, 200, "{settings}");
    assert_eq!(settings["rate_limits"]["chat_api"]["burst"], json!(3));

    for i in 0..3 {
        assert_eq!(
            alice.get("/api/me").await.0,
            200,
            "request {i} is within the burst"
        );
    }
    let over = alice.get("/api/me").await;
    assert_error(&over, 429, "rate_limited");

    // The header says when a token is back (0.5/s: about 2 s), and other entities are not
    // affected by alice's bucket.
    let resp = reqwest::Client::new()
        .get(format!("{}/api/me", s.base_url()))
        .bearer_auth(&alice.token)
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status().as_u16(), 429);
    let retry: u64 = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("Retry-After in seconds");
    assert!((1..=2).contains(&retry), "Retry-After {retry}");
    assert_eq!(bob.get("/api/me").await.0, 200);

    // A refused request changes nothing: no message was posted.
    let ch = bob.create_group("limits", &["alice"], json!({})).await;
    let cid = ch["id"].as_str().expect("channel id").to_string();
    let refused = alice
        .post(
            &format!("/api/channels/{cid}/messages"),
            &json!({"data": "x"}),
        )
        .await;
    assert_error(&refused, 429, "rate_limited");
    assert!(bob.messages(&cid).await.is_empty());
}

#[tokio::test]
async fn malformed_rate_limits_are_invalid_input() {
    let s = TestServer::start().await;
    for bad in [
        json!({"rate_limits": {"chat_api": {"per_second": 0, "burst": 3}}}),
        json!({"rate_limits": {"chat_api": {"per_second": 1, "burst": 0}}}),
        json!({"rate_limits": {"chat_api": {"per_second": 1}}}),
        json!({"rate_limits": {"everything": {"per_second": 1, "burst": 1}}}),
    ] {
        let r = s
            .signed(
                Method::PATCH,
                &format!("/apps/{}/settings", s.app.id),
                Some(&bad),
            )
            .await;
        assert_error(&r, 400, "invalid_input");
    }
    let (_, now) = s
        .signed(Method::GET, &format!("/apps/{}/settings", s.app.id), None)
        .await;
    assert_eq!(
        now["rate_limits"],
        json!({}),
        "refused patches changed nothing"
    );
}
