//! `/healthz` and `/readyz`.

use switchboard_integration::harness::TestServer;

#[tokio::test]
async fn health_and_readiness() {
    let mut s = TestServer::start().await;
    let (st, _) = s.get_text("/healthz").await;
    assert_eq!(st, 200, "healthz");
    let (st, _) = s.get_text("/readyz").await;
    assert_eq!(st, 200, "readyz");
    // Both are plain probes: no token needed, and they are not under /api's auth.
    let (st, _) = s.get_text("/api/me").await;
    assert_eq!(st, 401, "/api needs a token while the probes do not");
    // After a crash and restart on the same database the probes answer again and the
    // bootstrap workspace is still usable (bootstrap is idempotent).
    s.create_entity("alice", "Alice", "human", "member").await;
    s.restart().await;
    let (st, _) = s.get_text("/readyz").await;
    assert_eq!(st, 200, "readyz after restart");
    let alice = s.client("alice", &s.token_for("alice"));
    let (st, me) = alice.get("/api/me").await;
    assert_eq!(st, 200, "{me}");
    assert_eq!(me["entity"]["id"], serde_json::json!("alice"));
}
