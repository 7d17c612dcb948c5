//! Per-workspace settings (feature flags and the limits of SPEC §7), stored as JSON.

use serde::{Deserialize, Serialize};

use crate::error::{ApiError, ApiResult};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct WorkspaceSettings {
    pub enable_client_messages: bool,
    pub allowed_origins: Vec<String>,
    pub webhooks: Vec<serde_json::Value>,
    pub rate_limits: RateLimits,
    pub versioned_messages: VersionedMessageLimits,
    pub ai_transport: AiTransportLimits,
    pub min_group_members: usize,
    pub max_channel_members: usize,
    pub max_attachments: usize,
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
        let next: Self = serde_json::from_value(merged)
            .map_err(|e| ApiError::invalid(format!("invalid settings: {e}")))?;
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
}
