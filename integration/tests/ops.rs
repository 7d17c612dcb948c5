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

#[tokio::test]
async fn graceful_shutdown_closes_sockets_4200_and_keeps_writes() {
    use std::time::Duration;
    let mut s = TestServer::start().await;
    let alice = s.user("alice", "human", "member").await;
    s.create_entity("bob", "Bob", "human", "member").await;
    let ch = alice
        .create_group("shutdown", &["bob"], serde_json::json!({}))
        .await;
    let cid = ch["id"].as_str().expect("id").to_owned();
    let mut answered = Vec::new();
    for i in 0..20 {
        answered.push(alice.say(&cid, &format!("m{i}")).await);
    }
    let mut ws = s.ws(&alice.token, None).await;
    let exited = s.terminate(Duration::from_secs(15)).await;
    let (_frames, code) = ws.read_until_close(Duration::from_secs(15)).await;
    assert_eq!(code, Some(4200), "sockets are closed with 4200 on shutdown");
    let status = exited.expect("the server exits within 15 s of SIGTERM");
    assert!(status.success(), "graceful shutdown exits 0: {status}");
    s.restart().await;
    let msgs = alice.messages(&cid).await;
    assert_eq!(msgs.len(), answered.len());
    assert_eq!(
        alice.say(&cid, "after").await["event"]["seq"],
        serde_json::json!(21)
    );
}
