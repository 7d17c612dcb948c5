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
    // Every commit is in the database file itself: the WAL was emptied at exit.
    let mut wal = s.db_path().into_os_string();
    wal.push("-wal");
    let wal_len = std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
    assert_eq!(wal_len, 0, "{wal:?} after a clean stop");
    s.restart().await;
    let msgs = alice.messages(&cid).await;
    assert_eq!(msgs.len(), answered.len());
    assert_eq!(
        alice.say(&cid, "after").await["event"]["seq"],
        serde_json::json!(21)
    );
}

/// Every open socket gets its 4200 close frame before the process exits, not only the
/// first few: shutdown waits for the sockets to write what they have queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn graceful_shutdown_closes_every_socket_4200() {
    use std::time::Duration;
    let mut s = TestServer::start().await;
    let alice = s.user("alice", "human", "member").await;
    let mut sockets = Vec::new();
    for _ in 0..300 {
        sockets.push(s.ws(&alice.token, None).await);
    }
    let exited = s.terminate(Duration::from_secs(15)).await;
    let codes = futures_util::future::join_all(
        sockets
            .iter_mut()
            .map(|ws| ws.read_until_close(Duration::from_secs(15))),
    )
    .await;
    let not_4200: Vec<Option<u16>> = codes
        .into_iter()
        .map(|(_, code)| code)
        .filter(|c| *c != Some(4200))
        .collect();
    assert!(not_4200.is_empty(), "closed otherwise: {not_4200:?}");
    assert!(exited.expect("exits within 15 s").success());
}

/// Sends `GET /healthz` on `conn` and reads its whole answer; its status line.
async fn healthz_on(conn: &mut tokio::net::TcpStream) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    conn.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .expect("send request");
    let mut answer = Vec::new();
    let mut chunk = [0u8; 1024];
    // The probe answers with a Content-Length body; read until headers and body are in.
    loop {
        let n = conn.read(&mut chunk).await.expect("read answer");
        assert!(n > 0, "the server closed before answering");
        answer.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&answer).to_string();
        if let Some(end) = text.find("\r\n\r\n") {
            let length = text[..end]
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .expect("content-length");
            if answer.len() >= end + 4 + length {
                return text.lines().next().unwrap_or_default().to_string();
            }
        }
    }
}

#[tokio::test]
async fn idle_keep_alive_connections_close_after_the_configured_time_only() {
    use std::time::Duration;
    use tokio::io::AsyncReadExt;
    // One second: an idle connection is closed by the server after it.
    let short = TestServer::builder()
        .env("SWITCHBOARD_HTTP_KEEP_ALIVE_SECONDS", "1")
        .start()
        .await;
    let mut conn = tokio::net::TcpStream::connect(short.addr())
        .await
        .expect("connect");
    assert!(healthz_on(&mut conn).await.contains(" 200 "));
    let mut byte = [0u8; 1];
    let closed = tokio::time::timeout(Duration::from_secs(3), conn.read(&mut byte))
        .await
        .expect("closed within 3 s");
    assert_eq!(closed.expect("clean close"), 0, "EOF after the keep-alive");

    // The default (75 s): the same connection still serves a request after 6 s idle (more
    // than actix-web's own default of 5 s).
    let default = TestServer::start().await;
    let mut conn = tokio::net::TcpStream::connect(default.addr())
        .await
        .expect("connect");
    assert!(healthz_on(&mut conn).await.contains(" 200 "));
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(healthz_on(&mut conn).await.contains(" 200 "));
}
