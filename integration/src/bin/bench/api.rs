//! HTTP setup calls: signed server API (entities), locally minted bearer tokens, channels,
//! readiness and Prometheus counters.

use std::collections::BTreeMap;
use std::time::Duration;

use hmac::{Hmac, Mac};
use md5::{Digest as _, Md5};
use reqwest::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use serde_json::{json, Value};
use sha2::Sha256;

use crate::server::AppCreds;

type HmacSha256 = Hmac<Sha256>;

pub fn now_secs() -> i64 {
    chrono::Utc::now().timestamp()
}

/// An HS256 JWT as any library mints it: header `kid` = workspace key.
pub fn mint_token(creds: &AppCreds, entity_id: &str, ttl: i64) -> Result<String, String> {
    let now = now_secs();
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    header.kid = Some(creds.key.clone());
    let claims = json!({"sub": entity_id, "iat": now, "exp": now + ttl});
    jsonwebtoken::encode(
        &header,
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(creds.secret.as_bytes()),
    )
    .map_err(|e| format!("mint token: {e}"))
}

pub fn bearer(token: &str) -> Result<HeaderValue, String> {
    HeaderValue::from_str(&format!("Bearer {token}")).map_err(|e| format!("bearer header: {e}"))
}

/// The Pusher-style signed query string for `method path` with `body`.
pub fn signed_query(creds: &AppCreds, method: &str, path: &str, body: &[u8]) -> String {
    let mut params: BTreeMap<&str, String> = BTreeMap::new();
    params.insert("auth_key", creds.key.clone());
    params.insert("auth_timestamp", now_secs().to_string());
    params.insert("auth_version", "1.0".into());
    params.insert("body_md5", hex::encode(Md5::digest(body)));
    let query = params
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&");
    let to_sign = format!("{method}\n{path}\n{query}");
    let sig = match HmacSha256::new_from_slice(creds.secret.as_bytes()) {
        Ok(mut mac) => {
            mac.update(to_sign.as_bytes());
            hex::encode(mac.finalize().into_bytes())
        }
        // HMAC takes keys of any length.
        Err(_) => String::new(),
    };
    format!("{query}&auth_signature={sig}")
}

pub fn http_client(pool: usize) -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(pool)
        // Below any keep-alive a server here is likely to use (Switchboard's 75 s, actix-web's
        // own 5 s, other Pusher servers'): a pooled connection the server is closing just as a
        // request goes out on it fails that request.
        .pool_idle_timeout(Duration::from_secs(4))
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(30))
        .connect_timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| format!("http client: {e}"))
}

/// An error with its causes ("error sending request: connection closed before message
/// completed"): reqwest's own text names only the request.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

/// Short text of a response body for error messages.
pub fn snippet(b: &[u8]) -> String {
    let s = String::from_utf8_lossy(b);
    s.chars().take(300).collect()
}

pub struct Api {
    pub client: reqwest::Client,
    pub base: String,
    pub creds: AppCreds,
}

impl Api {
    /// Polls `GET /readyz` until 200 (with `any_answer`: until any HTTP answer, for servers
    /// without `/readyz`) or `within` passes.
    pub async fn wait_ready(
        &self,
        within: Duration,
        any_answer: bool,
        mut still_running: impl FnMut() -> Result<(), String>,
    ) -> Result<Duration, String> {
        let start = std::time::Instant::now();
        let mut last = String::from("no answer yet");
        while start.elapsed() < within {
            still_running()?;
            match self
                .client
                .get(format!("{}/readyz", self.base))
                .timeout(Duration::from_secs(2))
                .send()
                .await
            {
                Ok(r) if any_answer || r.status().as_u16() == 200 => return Ok(start.elapsed()),
                Ok(r) => last = format!("status {}", r.status()),
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(format!("server not ready within {within:?} (last: {last})"))
    }

    /// `POST /apps/{id}/entities` (signed) → 201; `kind` is `human`, `agent` or `system`.
    pub async fn create_entity(&self, id: &str, name: &str, kind: &str) -> Result<(), String> {
        let path = format!("/apps/{}/entities", self.creds.id);
        let body =
            serde_json::to_vec(&json!({"id": id, "name": name, "kind": kind, "role": "member"}))
                .map_err(|e| e.to_string())?;
        let q = signed_query(&self.creds, "POST", &path, &body);
        let r = self
            .client
            .post(format!("{}{path}?{q}", self.base))
            .header(CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await
            .map_err(|e| format!("create entity {id}: {e}"))?;
        let status = r.status().as_u16();
        let bytes = r.bytes().await.map_err(|e| e.to_string())?;
        if status != 201 {
            return Err(format!(
                "create entity {id}: expected 201, got {status}: {}",
                snippet(&bytes)
            ));
        }
        Ok(())
    }

    /// A public, open group channel (`POST /api/channels`); the new channel's id.
    pub async fn create_channel(
        &self,
        token: &str,
        name: &str,
        members: &[String],
    ) -> Result<String, String> {
        let body = json!({
            "name": name,
            "visibility": "public",
            "join_policy": "open",
            "members": members,
        });
        self.post_channel(token, name, &body).await
    }

    /// A group channel with the server's defaults (private, invite-only): only its members
    /// see it and receive its events. The new channel's id.
    pub async fn create_private_channel(
        &self,
        token: &str,
        name: &str,
        members: &[String],
    ) -> Result<String, String> {
        let body = json!({"name": name, "members": members});
        self.post_channel(token, name, &body).await
    }

    /// `POST /api/channels` → 201; the new channel's id.
    async fn post_channel(&self, token: &str, name: &str, body: &Value) -> Result<String, String> {
        let r = self
            .client
            .post(format!("{}/api/channels", self.base))
            .header(AUTHORIZATION, bearer(token)?)
            .json(body)
            .send()
            .await
            .map_err(|e| format!("create channel {name}: {e}"))?;
        let status = r.status().as_u16();
        let bytes = r.bytes().await.map_err(|e| e.to_string())?;
        if status != 201 {
            return Err(format!(
                "create channel {name}: expected 201, got {status}: {}",
                snippet(&bytes)
            ));
        }
        let v: Value = serde_json::from_slice(&bytes)
            .map_err(|e| format!("create channel {name}: bad JSON: {e}"))?;
        v.pointer("/channel/id")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| {
                format!(
                    "create channel {name}: no channel.id in {}",
                    snippet(&bytes)
                )
            })
    }

    /// Counters of `GET /metrics` whose names start with `switchboard_` (unlabelled lines).
    pub async fn metrics(&self) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        let Ok(r) = self
            .client
            .get(format!("{}/metrics", self.base))
            .timeout(Duration::from_secs(5))
            .send()
            .await
        else {
            return out;
        };
        let Ok(text) = r.text().await else {
            return out;
        };
        for line in text.lines() {
            if line.starts_with('#') || !line.starts_with("switchboard_") {
                continue;
            }
            let mut parts = line.split_whitespace();
            if let (Some(name), Some(v)) = (parts.next(), parts.next()) {
                if let Ok(v) = v.parse::<f64>() {
                    out.insert(name.to_string(), v);
                }
            }
        }
        out
    }
}
