//! Per-workspace settings (feature flags and the limits of SPEC §7), stored as JSON.

use serde::{Deserialize, Serialize};

use crate::error::{ApiError, ApiResult};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct WorkspaceSettings {
    pub enable_client_messages: bool,
    pub allowed_origins: Vec<String>,
    /// Each entry is a [`Webhook`]; kept as JSON so a stored entry this build cannot read
    /// costs that webhook only, not the workspace's other settings.
    pub webhooks: Vec<serde_json::Value>,
    pub rate_limits: RateLimits,
    pub versioned_messages: VersionedMessageLimits,
    pub ai_transport: AiTransportLimits,
    pub min_group_members: usize,
    pub max_channel_members: usize,
    pub max_attachments: usize,
}

/// The webhook event names a workspace can subscribe to (Pusher's).
pub const WEBHOOK_EVENT_TYPES: [&str; 5] = [
    "channel_occupied",
    "channel_vacated",
    "member_added",
    "member_removed",
    "client_event",
];

/// Webhooks one workspace may configure: each costs a request per batch of events.
pub const MAX_WEBHOOKS: usize = 10;

/// One configured webhook: `{url, event_types?}`; no `event_types` (or `[]`) means all.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Webhook {
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_types: Option<Vec<String>>,
}

impl Webhook {
    /// Reads and checks one `webhooks` entry: an http(s) URL and known event names only.
    pub fn parse(raw: &serde_json::Value) -> Result<Self, String> {
        let hook: Self = serde_json::from_value(raw.clone())
            .map_err(|e| format!("a webhook is {{url, event_types?}}: {e}"))?;
        let url = reqwest::Url::parse(&hook.url)
            .map_err(|e| format!("webhook url '{}' is not a URL: {e}", hook.url))?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none_or(|h| h.is_empty())
        {
            return Err(format!(
                "webhook url '{}' must be http:// or https:// with a host",
                hook.url
            ));
        }
        for name in hook.event_types.iter().flatten() {
            if !WEBHOOK_EVENT_TYPES.contains(&name.as_str()) {
                return Err(format!(
                    "unknown webhook event type '{name}' (known: {})",
                    WEBHOOK_EVENT_TYPES.join(", ")
                ));
            }
        }
        Ok(hook)
    }

    /// Whether events named `name` go to this webhook.
    pub fn wants(&self, name: &str) -> bool {
        match &self.event_types {
            Some(types) if !types.is_empty() => types.iter().any(|t| t == name),
            _ => true,
        }
    }
}

/// Rate limits, off unless set (SPEC §5): `chat_api` per entity on every `/api` request,
/// `client_events` per socket (the Pusher face).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimits {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chat_api: Option<RateLimit>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_events: Option<RateLimit>,
}

/// A token bucket: `per_second` sustained, up to `burst` at once.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    pub per_second: f64,
    pub burst: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct VersionedMessageLimits {
    /// Update, delete, append and version listings; off → 422 `feature_disabled`.
    pub enabled: bool,
    pub max_page_size: usize,
    pub retention_window_seconds: u64,
    pub purge_batch_size: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AiTransportLimits {
    pub max_accumulated_message_bytes: usize,
    pub max_appends_per_message: usize,
    pub max_open_streaming_messages_per_channel: usize,
    pub stream_idle_timeout_seconds: u64,
}

impl Default for WorkspaceSettings {
    fn default() -> Self {
        Self {
            enable_client_messages: false,
            allowed_origins: Vec::new(),
            webhooks: Vec::new(),
            rate_limits: RateLimits::default(),
            versioned_messages: VersionedMessageLimits::default(),
            ai_transport: AiTransportLimits::default(),
            min_group_members: 2,
            max_channel_members: 1000,
            max_attachments: 100,
        }
    }
}

impl Default for VersionedMessageLimits {
    fn default() -> Self {
        Self {
            enabled: true,
            max_page_size: 100,
            retention_window_seconds: 0,
            purge_batch_size: 1000,
        }
    }
}

impl Default for AiTransportLimits {
    fn default() -> Self {
        Self {
            max_accumulated_message_bytes: 1_048_576,
            max_appends_per_message: 4096,
            max_open_streaming_messages_per_channel: 1024,
            stream_idle_timeout_seconds: 600,
        }
    }
}

impl WorkspaceSettings {
    /// The configured webhooks that are valid (PATCH refuses the others, so all of them
    /// unless the row was written some other way).
    pub fn webhook_targets(&self) -> Vec<Webhook> {
        self.webhooks
            .iter()
            .filter_map(|raw| Webhook::parse(raw).ok())
            .collect()
    }

    /// Reads stored settings; a damaged row falls back to the defaults rather than failing.
    pub fn from_stored(raw: &str) -> Self {
        serde_json::from_str(raw).unwrap_or_default()
    }

    /// Applies a PATCH: keys present replace, unknown keys are `invalid_input`.
    pub fn patched(&self, patch: &serde_json::Value) -> ApiResult<Self> {
        let serde_json::Value::Object(patch) = patch else {
            return Err(ApiError::invalid("settings must be a JSON object"));
        };
        let mut merged = serde_json::to_value(self).map_err(ApiError::internal)?;
        if let serde_json::Value::Object(base) = &mut merged {
            for (k, v) in patch {
                if !base.contains_key(k) {
                    return Err(ApiError::invalid(format!("unknown setting '{k}'")));
                }
                base.insert(k.clone(), v.clone());
            }
        }
        let mut next: Self = serde_json::from_value(merged)
            .map_err(|e| ApiError::invalid(format!("invalid settings: {e}")))?;
        if next.webhooks.len() > MAX_WEBHOOKS {
            return Err(ApiError::invalid(format!(
                "at most {MAX_WEBHOOKS} webhooks per app"
            )));
        }
        // Stored in the canonical shape, so `event_types: null` reads back as absent.
        next.webhooks = next
            .webhooks
            .iter()
            .map(|raw| {
                let hook = Webhook::parse(raw).map_err(ApiError::invalid)?;
                serde_json::to_value(hook).map_err(ApiError::internal)
            })
            .collect::<ApiResult<_>>()?;
        for limit in [next.rate_limits.chat_api, next.rate_limits.client_events]
            .into_iter()
            .flatten()
        {
            if !(limit.per_second > 0.0 && limit.per_second.is_finite()) || limit.burst == 0 {
                return Err(ApiError::invalid(
                    "a rate limit needs per_second > 0 and burst >= 1",
                ));
            }
        }
        Ok(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_setting_is_invalid_input() {
        let s = WorkspaceSettings::default();
        let err = s
            .patched(&serde_json::json!({"nope": 1}))
            .expect_err("must refuse");
        assert_eq!(err.code, crate::error::ErrorCode::InvalidInput);
    }

    #[test]
    fn patch_replaces_present_keys_only() {
        let s = WorkspaceSettings::default();
        let p = s
            .patched(&serde_json::json!({"enable_client_messages": true}))
            .expect("valid");
        assert!(p.enable_client_messages);
        assert_eq!(p.min_group_members, 2);
    }

    fn patch_webhooks(hooks: serde_json::Value) -> ApiResult<WorkspaceSettings> {
        WorkspaceSettings::default().patched(&serde_json::json!({ "webhooks": hooks }))
    }

    fn assert_invalid(hooks: serde_json::Value) {
        let err = patch_webhooks(hooks.clone()).expect_err(&format!("must refuse {hooks}"));
        assert_eq!(err.code, crate::error::ErrorCode::InvalidInput, "{hooks}");
    }

    #[test]
    fn valid_webhooks_are_stored_in_their_shape() {
        let hooks = serde_json::json!([
            {"url": "https://example.com/hook"},
            {"url": "http://127.0.0.1:8080/p?x=1", "event_types": ["member_added", "client_event"]},
            {"url": "https://example.com/all", "event_types": []},
        ]);
        let s = patch_webhooks(hooks.clone()).expect("valid");
        assert_eq!(serde_json::to_value(&s.webhooks).expect("json"), hooks);
        let targets = s.webhook_targets();
        assert_eq!(targets.len(), 3);
        assert!(targets[0].wants("channel_vacated"));
        assert!(targets[1].wants("client_event"));
        assert!(!targets[1].wants("channel_occupied"));
        assert!(targets[2].wants("channel_occupied"), "[] means all");
        // Round trip through storage, as GET returns it.
        let stored = serde_json::to_string(&s).expect("json");
        assert_eq!(WorkspaceSettings::from_stored(&stored).webhooks, s.webhooks);
    }

    #[test]
    fn null_event_types_reads_back_as_absent() {
        let s = patch_webhooks(serde_json::json!([{"url": "https://e.com", "event_types": null}]))
            .expect("valid");
        assert_eq!(
            serde_json::to_value(&s.webhooks).expect("json"),
            serde_json::json!([{"url": "https://e.com"}])
        );
    }

    #[test]
    fn clearing_webhooks_is_allowed() {
        let s = patch_webhooks(serde_json::json!([{"url": "https://e.com"}])).expect("valid");
        let cleared = s
            .patched(&serde_json::json!({"webhooks": []}))
            .expect("valid");
        assert!(cleared.webhooks.is_empty());
    }

    #[test]
    fn invalid_webhooks_are_invalid_input() {
        assert_invalid(serde_json::json!({"url": "https://e.com"}));
        assert_invalid(serde_json::json!(["https://e.com"]));
        assert_invalid(serde_json::json!([{}]));
        assert_invalid(serde_json::json!([{"url": 5}]));
        assert_invalid(serde_json::json!([{"url": ""}]));
        assert_invalid(serde_json::json!([{"url": "e.com/hook"}]));
        assert_invalid(serde_json::json!([{"url": "ftp://e.com/hook"}]));
        assert_invalid(serde_json::json!([{"url": "javascript:alert(1)"}]));
        assert_invalid(serde_json::json!([{"url": "http://"}]));
        assert_invalid(serde_json::json!([{"url": "https://e.com", "secret": "x"}]));
        assert_invalid(
            serde_json::json!([{"url": "https://e.com", "event_types": "client_event"}]),
        );
        assert_invalid(serde_json::json!([{"url": "https://e.com", "event_types": ["nope"]}]));
        assert_invalid(serde_json::json!([{"url": "https://e.com", "event_types": [1]}]));
        assert_invalid(serde_json::json!([
            {"url": "https://e.com/ok"},
            {"url": "https://e.com", "event_types": ["channel_occupied", "member_left"]}
        ]));
        let many: Vec<_> = (0..=MAX_WEBHOOKS)
            .map(|i| serde_json::json!({"url": format!("https://e.com/{i}")}))
            .collect();
        assert_invalid(serde_json::Value::Array(many));
    }

    #[test]
    fn unreadable_stored_webhook_costs_only_itself() {
        let raw = r#"{"enable_client_messages": true,
            "webhooks": [{"url": "nope"}, {"url": "https://e.com", "event_types": ["client_event"]}]}"#;
        let s = WorkspaceSettings::from_stored(raw);
        assert!(s.enable_client_messages);
        let targets = s.webhook_targets();
        assert_eq!(targets.len(), 1);
        assert_eq!(targets[0].url, "https://e.com");
    }
}
