//! Field rules shared by every surface.

use crate::error::{ApiError, ApiResult};

/// Entity ids: 1..64 bytes of `[A-Za-z0-9_.@-]` (no colon: it joins direct-channel names).
pub fn entity_id(id: &str) -> ApiResult<()> {
    let ok = (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'@' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid(
            "entity id must be 1..64 characters of [A-Za-z0-9_.@-]",
        ))
    }
}

/// Group channel names: 1..100 characters of `[A-Za-z0-9_:=@,.;-]`.
pub fn channel_name(name: &str) -> ApiResult<()> {
    let ok = (1..=100).contains(&name.chars().count())
        && name.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(b, b'_' | b':' | b'=' | b'@' | b',' | b'.' | b';' | b'-')
        });
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid(
            "channel name must be 1..100 characters of [A-Za-z0-9_:=@,.;-]",
        ))
    }
}

/// Channel names on the server API and the Pusher face: 1..164 characters (Pusher's limit)
/// of `[A-Za-z0-9_:=@,.;#-]`.
pub fn pusher_channel_name(name: &str) -> ApiResult<()> {
    let ok = (1..=164).contains(&name.len())
        && name.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'_' | b':' | b'=' | b'@' | b',' | b'.' | b';' | b'-' | b'#'
                )
        });
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid(format!(
            "channel name must be 1..164 characters of [A-Za-z0-9_:=@,.;#-]: '{}'",
            name.chars().take(64).collect::<String>()
        )))
    }
}

/// Names of entities, 1..100 characters.
pub fn display_name(name: &str) -> ApiResult<()> {
    if (1..=100).contains(&name.chars().count()) {
        Ok(())
    } else {
        Err(ApiError::invalid("name must be 1..100 characters"))
    }
}

/// Serials (message and version): 1..=128 bytes, no whitespace.
pub fn serial(s: &str) -> ApiResult<()> {
    if (1..=128).contains(&s.len()) && !s.chars().any(char::is_whitespace) {
        Ok(())
    } else {
        Err(ApiError::invalid(
            "serial must be 1..128 bytes without whitespace",
        ))
    }
}

/// A JSON value that must be an object when present.
pub fn object(field: &str, v: &serde_json::Value) -> ApiResult<()> {
    if v.is_object() {
        Ok(())
    } else {
        Err(ApiError::invalid(format!("{field} must be a JSON object")))
    }
}

/// Tags: at most 50, each 1..100 characters.
pub fn tags(tags: &[String]) -> ApiResult<()> {
    if tags.len() > 50 {
        return Err(ApiError::limit("at most 50 tags"));
    }
    if tags.iter().any(|t| !(1..=100).contains(&t.chars().count())) {
        return Err(ApiError::invalid("each tag must be 1..100 characters"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entity_ids() {
        assert!(entity_id("alice.smith@x-1_").is_ok());
        assert!(entity_id("").is_err());
        assert!(entity_id("a:b").is_err());
        assert!(entity_id(&"a".repeat(64)).is_ok());
        assert!(entity_id(&"a".repeat(65)).is_err());
    }

    #[test]
    fn channel_names() {
        assert!(channel_name("general").is_ok());
        assert!(channel_name("a:b=c@d,e.f;g-h_i").is_ok());
        assert!(channel_name(&"x".repeat(100)).is_ok());
        assert!(channel_name(&"x".repeat(101)).is_err());
        assert!(channel_name("has space").is_err());
        assert!(channel_name("").is_err());
        assert!(channel_name("é").is_err());
    }

    #[test]
    fn serials() {
        assert!(serial("m1").is_ok());
        assert!(serial(&"s".repeat(128)).is_ok());
        assert!(serial(&"s".repeat(129)).is_err());
        assert!(serial("a b").is_err());
        assert!(serial("").is_err());
    }
}
