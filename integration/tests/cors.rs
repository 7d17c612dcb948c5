//! CORS for `/api` (SPEC §3: `allowed_origins` also drives CORS): preflights from a listed
//! origin are answered, responses to it carry `Access-Control-Allow-Origin`, and nothing is
//! granted to other origins or outside `/api`.

use reqwest::header::{HeaderMap, ACCESS_CONTROL_ALLOW_ORIGIN};
use reqwest::Method;
use switchboard_integration::harness::TestServer;

const GOOD: &str = "https://good.example";
const EVIL: &str = "https://evil.example";

async fn send(
    s: &TestServer,
    method: Method,
    path: &str,
    origin: &str,
    bearer: Option<&str>,
) -> (u16, HeaderMap) {
    let mut req = reqwest::Client::new()
        .request(method.clone(), format!("{}{path}", s.base_url()))
        .header("origin", origin);
    if method == Method::OPTIONS {
        req = req.header("access-control-request-method", "POST").header(
            "access-control-request-headers",
            "authorization, content-type",
        );
    }
    if let Some(t) = bearer {
        req = req.bearer_auth(t);
    }
    let resp = req
        .send()
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    (resp.status().as_u16(), resp.headers().clone())
}

fn allow_origin(h: &HeaderMap) -> Option<&str> {
    h.get(ACCESS_CONTROL_ALLOW_ORIGIN)
        .and_then(|v| v.to_str().ok())
}

#[tokio::test]
async fn listed_origins_get_preflights_and_allow_origin_others_nothing() {
    let s = TestServer::builder()
        .env("SWITCHBOARD_ALLOWED_ORIGINS", GOOD)
        .start()
        .await;
    let alice = s.user("alice", "human", "member").await;

    let (status, h) = send(&s, Method::OPTIONS, "/api/channels", GOOD, None).await;
    assert_eq!(status, 204, "preflight from a listed origin");
    assert_eq!(allow_origin(&h), Some(GOOD));
    let methods = h
        .get("access-control-allow-methods")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    assert!(
        methods.contains("POST") && methods.contains("PATCH"),
        "{methods}"
    );
    let headers = h
        .get("access-control-allow-headers")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    assert!(headers.contains("authorization"), "{headers}");
    assert!(
        headers.contains("prefer"),
        "Prefer: return=minimal is allowed: {headers}"
    );

    let (status, h) = send(&s, Method::OPTIONS, "/api/channels", EVIL, None).await;
    assert_ne!(status, 204, "no preflight answer for an unlisted origin");
    assert_eq!(allow_origin(&h), None);

    let (status, h) = send(&s, Method::GET, "/api/me", GOOD, Some(&alice.token)).await;
    assert_eq!(status, 200);
    assert_eq!(allow_origin(&h), Some(GOOD));
    assert_eq!(h.get("vary").and_then(|v| v.to_str().ok()), Some("Origin"));
    assert_eq!(
        h.get("access-control-expose-headers")
            .and_then(|v| v.to_str().ok()),
        Some("preference-applied")
    );

    let (status, h) = send(&s, Method::GET, "/api/me", EVIL, Some(&alice.token)).await;
    assert_eq!(status, 200, "the server answers; the browser withholds it");
    assert_eq!(allow_origin(&h), None);

    // Errors carry the header too, so a browser can read the envelope.
    let (status, h) = send(&s, Method::GET, "/api/me", GOOD, None).await;
    assert_eq!(status, 401);
    assert_eq!(allow_origin(&h), Some(GOOD));

    // CORS is for `/api` only.
    let (_, h) = send(&s, Method::GET, "/healthz", GOOD, None).await;
    assert_eq!(allow_origin(&h), None);
}

#[tokio::test]
async fn no_origin_is_admitted_by_default() {
    let s = TestServer::start().await;
    let (status, h) = send(&s, Method::OPTIONS, "/api/channels", GOOD, None).await;
    assert_ne!(status, 204);
    assert_eq!(allow_origin(&h), None);
}
