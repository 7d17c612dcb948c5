//! The test harness itself: a test server whose port another process took between the probe
//! and the bind still starts, on another port, and the harness talks to it and not to the
//! process that had the port.

use std::net::TcpListener;

use reqwest::Method;
use switchboard_integration::harness::TestServer;

#[tokio::test]
async fn a_port_held_by_another_server_is_not_mistaken_for_ours() {
    let first = TestServer::start().await;
    let second = TestServer::builder().port(first.port()).start().await;
    assert_ne!(second.port(), first.port());
    // Each answers signed requests with its own credentials only.
    let path = format!("/apps/{}/channels", second.app.id);
    let (status, body) = second.signed(Method::GET, &path, None).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = first.signed(Method::GET, &path, None).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn a_port_held_by_something_else_gets_a_fresh_one() {
    let holder = TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken = holder.local_addr().expect("addr").port();
    let server = TestServer::builder().port(taken).start().await;
    assert_ne!(server.port(), taken);
    let (status, body) = server
        .signed(
            Method::GET,
            &format!("/apps/{}/channels", server.app.id),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    drop(holder);
}
