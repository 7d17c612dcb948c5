//! Identity: HS256 bearer tokens and Pusher-style request and channel signatures.
//! Every comparison of a signature or an owner is constant-time.

use hmac::{Hmac, Mac};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::error::{ApiError, ApiResult};

/// Longest token lifetime accepted (SPEC §3: `exp` at most 24 h after `iat`).
pub const MAX_TOKEN_TTL_SECONDS: i64 = 24 * 3600;
/// Signed requests must be within this many seconds of the server clock.
pub const SIGNATURE_WINDOW_SECONDS: i64 = 600;

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Claims {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    #[serde(
        default,
        rename = "x-sockudo-client-id",
        skip_serializing_if = "Option::is_none"
    )]
    pub sockudo_client_id: Option<String>,
    pub exp: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<serde_json::Value>,
    #[serde(
        default,
        rename = "x-sockudo-capability",
        skip_serializing_if = "Option::is_none"
    )]
    pub sockudo_capability: Option<serde_json::Value>,
}

impl Claims {
    pub fn subject(&self) -> Option<&str> {
        self.sub.as_deref().or(self.sockudo_client_id.as_deref())
    }
    pub fn capabilities(&self) -> Option<&serde_json::Value> {
        self.capabilities
            .as_ref()
            .or(self.sockudo_capability.as_ref())
    }
}

/// The workspace key named by a token's `kid`, read before the signature is checked.
pub fn token_key_id(token: &str) -> ApiResult<String> {
    let header =
        jsonwebtoken::decode_header(token).map_err(|_| ApiError::auth("malformed token"))?;
    if header.alg != Algorithm::HS256 {
        return Err(ApiError::auth("token must be HS256"));
    }
    header.kid.ok_or_else(|| ApiError::auth("token has no kid"))
}

/// Verifies signature, expiry and lifetime; returns the claims.
pub fn verify_token(token: &str, secret: &str, now: i64) -> ApiResult<Claims> {
    let mut validation = Validation::new(Algorithm::HS256);
    validation.leeway = 0;
    validation.set_required_spec_claims(&["exp"]);
    validation.validate_exp = true;
    let data = jsonwebtoken::decode::<Claims>(
        token,
        &DecodingKey::from_secret(secret.as_bytes()),
        &validation,
    )
    .map_err(|e| match e.kind() {
        jsonwebtoken::errors::ErrorKind::ExpiredSignature => ApiError::auth("token expired"),
        _ => ApiError::auth("invalid token"),
    })?;
    let claims = data.claims;
    let issued = claims.iat.unwrap_or(now);
    if claims.exp - issued > MAX_TOKEN_TTL_SECONDS {
        return Err(ApiError::auth("token lifetime exceeds 24 hours"));
    }
    if claims.exp <= now {
        return Err(ApiError::auth("token expired"));
    }
    if claims.subject().is_none() {
        return Err(ApiError::auth("token has no subject"));
    }
    Ok(claims)
}

/// Mints a token as any JWT library would: HS256, `kid` = workspace key.
pub fn mint_token(
    key: &str,
    secret: &str,
    entity_id: &str,
    ttl_seconds: i64,
    capabilities: Option<serde_json::Value>,
    now: i64,
) -> ApiResult<(String, i64)> {
    if !(1..=MAX_TOKEN_TTL_SECONDS).contains(&ttl_seconds) {
        return Err(ApiError::invalid("ttl_seconds must be 1..86400"));
    }
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some(key.to_string());
    let exp = now + ttl_seconds;
    let claims = Claims {
        sub: Some(entity_id.to_string()),
        exp,
        iat: Some(now),
        jti: Some(ulid::Ulid::new().to_string()),
        capabilities,
        ..Default::default()
    };
    let token = jsonwebtoken::encode(
        &header,
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .map_err(ApiError::internal)?;
    Ok((token, exp))
}

pub fn hmac_sha256_hex(secret: &str, message: &str) -> String {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret.as_bytes()) {
        Ok(m) => m,
        Err(_) => return String::new(),
    };
    mac.update(message.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

pub fn constant_time_eq(a: &str, b: &str) -> bool {
    a.as_bytes().ct_eq(b.as_bytes()).into()
}

pub fn md5_hex(body: &[u8]) -> String {
    use md5::{Digest, Md5};
    hex::encode(Md5::digest(body))
}

/// The string a Pusher server SDK signs: `METHOD\n/path\nsorted_query` (keys lower-cased and
/// sorted, `auth_signature` left out).
pub fn string_to_sign(method: &str, path: &str, query: &[(String, String)]) -> String {
    let mut pairs: Vec<(String, &str)> = query
        .iter()
        .filter(|(k, _)| k != "auth_signature")
        .map(|(k, v)| (k.to_ascii_lowercase(), v.as_str()))
        .collect();
    pairs.sort();
    let q: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!("{}\n{}\n{}", method.to_ascii_uppercase(), path, q.join("&"))
}

/// Checks a signed server-API request. `key`/`secret` are the workspace's.
pub fn verify_signed_request(
    method: &str,
    path: &str,
    query: &[(String, String)],
    body: &[u8],
    key: &str,
    secret: &str,
    now: i64,
) -> ApiResult<()> {
    let get = |name: &str| {
        query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let auth_key = get("auth_key").ok_or_else(|| ApiError::auth("auth_key is missing"))?;
    if !constant_time_eq(auth_key, key) {
        return Err(ApiError::auth("unknown auth_key"));
    }
    let ts: i64 = get("auth_timestamp")
        .and_then(|t| t.parse().ok())
        .ok_or_else(|| ApiError::auth("auth_timestamp is missing or malformed"))?;
    if (now - ts).abs() > SIGNATURE_WINDOW_SECONDS {
        return Err(ApiError::auth(
            "auth_timestamp is outside the accepted window of 600 seconds",
        ));
    }
    if get("auth_version") != Some("1.0") {
        return Err(ApiError::auth("auth_version must be 1.0"));
    }
    match get("body_md5") {
        Some(md5) if !constant_time_eq(md5, &md5_hex(body)) => {
            return Err(ApiError::auth("body_md5 does not match the body"))
        }
        Some(_) => {}
        None if method.eq_ignore_ascii_case("POST") => {
            return Err(ApiError::auth("body_md5 is required on POST"))
        }
        None if !body.is_empty() => return Err(ApiError::auth("body_md5 is required with a body")),
        None => {}
    }
    let signature =
        get("auth_signature").ok_or_else(|| ApiError::auth("auth_signature is missing"))?;
    let expected = hmac_sha256_hex(secret, &string_to_sign(method, path, query));
    if !constant_time_eq(signature, &expected) {
        return Err(ApiError::auth("invalid signature"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pusher_documented_channel_signature() {
        // The worked example of Pusher's documentation.
        let sig = hmac_sha256_hex("7ad3773142a6692b25b8", "1234.1234:private-foobar");
        assert_eq!(
            sig,
            "58df8b0c36d6982b82c3ecf6b4662e34fe8c25bba48f5369f135bf843651c3a4"
        );
    }

    #[test]
    fn signed_request_round_trip_and_window() {
        let body = br#"{"name":"e"}"#;
        let now = 1_700_000_000;
        let mut q = vec![
            ("auth_key".to_string(), "k".to_string()),
            ("auth_timestamp".to_string(), now.to_string()),
            ("auth_version".to_string(), "1.0".to_string()),
            ("body_md5".to_string(), md5_hex(body)),
        ];
        let sig = hmac_sha256_hex("s", &string_to_sign("POST", "/apps/1/events", &q));
        q.push(("auth_signature".to_string(), sig));
        assert!(verify_signed_request("POST", "/apps/1/events", &q, body, "k", "s", now).is_ok());
        assert!(
            verify_signed_request("POST", "/apps/1/events", &q, body, "k", "s", now + 601).is_err()
        );
        assert!(verify_signed_request("POST", "/apps/1/events", &q, b"{}", "k", "s", now).is_err());
        assert!(
            verify_signed_request("POST", "/apps/1/events", &q, body, "k", "other", now).is_err()
        );
    }

    #[test]
    fn token_round_trip_and_limits() {
        let now = chrono::Utc::now().timestamp();
        let (t, exp) = mint_token("key", "secret", "alice", 60, None, now).expect("mint");
        assert_eq!(token_key_id(&t).expect("kid"), "key");
        let c = verify_token(&t, "secret", now).expect("valid");
        assert_eq!(c.subject(), Some("alice"));
        assert_eq!(c.exp, exp);
        assert!(verify_token(&t, "wrong", now).is_err());
        assert!(verify_token(&t, "secret", now + 61).is_err());
        assert!(mint_token("key", "secret", "alice", 86_401, None, now).is_err());
    }
}
