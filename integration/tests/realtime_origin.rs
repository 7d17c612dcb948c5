//! WebSocket `Origin`: absent is admitted (non-browser clients); a browser origin must be in
//! `allowed_origins` (empty: none admitted).

use switchboard_integration::harness::{TestServer, WsClient, WsConnectError, WsOpts};

async fn connect(
    s: &TestServer,
    token: &str,
    origin: Option<&str>,
) -> Result<WsClient, WsConnectError> {
    s.ws_connect(WsOpts {
        token: Some(token.to_owned()),
        origin: origin.map(str::to_owned),
        ..WsOpts::default()
    })
    .await
}

fn refused_403(r: Result<WsClient, WsConnectError>, what: &str) {
    match r {
        Err(WsConnectError::Http(status, _)) => assert_eq!(status, 403, "{what}"),
        Err(WsConnectError::Other(e)) => panic!("{what}: unexpected error {e}"),
        Ok(_) => panic!("{what}: upgrade was admitted"),
    }
}

#[tokio::test]
async fn allowed_origins_list() {
    let s = TestServer::builder()
        .env(
            "SWITCHBOARD_ALLOWED_ORIGINS",
            "https://good.example,https://also.example",
        )
        .start()
        .await;
    let alice = s.user("alice", "human", "member").await;

    refused_403(
        connect(&s, &alice.token, Some("https://evil.example")).await,
        "evil origin",
    );
    refused_403(
        connect(&s, &alice.token, Some("https://good.example.evil.example")).await,
        "suffix trick",
    );
    refused_403(
        connect(&s, &alice.token, Some("http://good.example")).await,
        "other scheme",
    );
    for origin in [
        None,
        Some("https://good.example"),
        Some("https://also.example"),
    ] {
        let mut ws = connect(&s, &alice.token, origin)
            .await
            .unwrap_or_else(|e| panic!("origin {origin:?} admitted: {e:?}"));
        ws.read_ready().await;
    }
}

#[tokio::test]
async fn empty_list_admits_no_browser() {
    let s = TestServer::start().await;
    let alice = s.user("alice", "human", "member").await;
    refused_403(
        connect(&s, &alice.token, Some("https://evil.example")).await,
        "any origin with an empty list",
    );
    refused_403(
        connect(&s, &alice.token, Some("null")).await,
        "null origin with an empty list",
    );
    let mut ws = connect(&s, &alice.token, None)
        .await
        .unwrap_or_else(|e| panic!("no Origin admitted: {e:?}"));
    ws.read_ready().await;
}
