//! Channel kinds by prefix and the signatures a subscriber or a signing-in user presents:
//! `key:hex(HMAC-SHA256(secret, "socket_id:channel[:channel_data]"))` and
//! `key:hex(HMAC-SHA256(secret, "socket_id::user::user_data"))`, compared in constant time.

use crate::auth::{constant_time_eq, hmac_sha256_hex};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelKind {
    Public,
    Private,
    PrivateEncrypted,
    Presence,
}

impl ChannelKind {
    pub fn of(name: &str) -> Self {
        if name.starts_with("private-encrypted-") {
            Self::PrivateEncrypted
        } else if name.starts_with("private-") {
            Self::Private
        } else if name.starts_with("presence-") {
            Self::Presence
        } else {
            Self::Public
        }
    }

    /// Private, encrypted and presence channels need a signature (or a grant).
    pub fn needs_auth(self) -> bool {
        self != Self::Public
    }

    /// Client events travel on private and presence channels only (never encrypted ones:
    /// the server cannot see inside them).
    pub fn allows_client_events(self) -> bool {
        matches!(self, Self::Private | Self::Presence)
    }
}

/// The `auth` value a subscriber must present.
pub fn channel_signature(
    key: &str,
    secret: &str,
    socket_id: &str,
    channel: &str,
    channel_data: Option<&str>,
) -> String {
    let message = match channel_data {
        Some(d) if ChannelKind::of(channel) == ChannelKind::Presence => {
            format!("{socket_id}:{channel}:{d}")
        }
        _ => format!("{socket_id}:{channel}"),
    };
    format!("{key}:{}", hmac_sha256_hex(secret, &message))
}

pub fn verify_channel_auth(
    key: &str,
    secret: &str,
    socket_id: &str,
    channel: &str,
    channel_data: Option<&str>,
    given: &str,
) -> bool {
    let expected = channel_signature(key, secret, socket_id, channel, channel_data);
    constant_time_eq(&expected, given)
}

/// The `auth` value of `pusher:signin`.
pub fn signin_signature(key: &str, secret: &str, socket_id: &str, user_data: &str) -> String {
    let message = format!("{socket_id}::user::{user_data}");
    format!("{key}:{}", hmac_sha256_hex(secret, &message))
}

pub fn verify_signin(
    key: &str,
    secret: &str,
    socket_id: &str,
    user_data: &str,
    given: &str,
) -> bool {
    constant_time_eq(&signin_signature(key, secret, socket_id, user_data), given)
}

#[cfg(test)]
mod tests {
    use super::*;

    // The worked examples of Pusher's authentication documentation.
    const KEY: &str = "278d425bdf160c739803";
    const SECRET: &str = "7ad3773142a6692b25b8";

    #[test]
    fn private_channel_signature_matches_pushers_example() {
        assert_eq!(
            channel_signature(KEY, SECRET, "1234.1234", "private-foobar", None),
            "278d425bdf160c739803:58df8b0c36d6982b82c3ecf6b4662e34fe8c25bba48f5369f135bf843651c3a4"
        );
    }

    #[test]
    fn presence_signature_covers_channel_data() {
        let data = r#"{"user_id":10,"user_info":{"name":"Mr. Channel"}}"#;
        // Computed independently (Python's hmac) over "1234.1234:presence-foobar:<data>".
        assert_eq!(
            channel_signature(KEY, SECRET, "1234.1234", "presence-foobar", Some(data)),
            "278d425bdf160c739803:fc92c2263fd5b72721e20dd1a06a900e6b3c4fbfac6cb9b098d68eb7911498a2"
        );
        let good = channel_signature(KEY, SECRET, "1234.1234", "presence-foobar", Some(data));
        assert!(verify_channel_auth(
            KEY,
            SECRET,
            "1234.1234",
            "presence-foobar",
            Some(data),
            &good
        ));
        // Another socket's signature, or other channel data, does not verify.
        assert!(!verify_channel_auth(
            KEY,
            SECRET,
            "1234.9999",
            "presence-foobar",
            Some(data),
            &good
        ));
        assert!(!verify_channel_auth(
            KEY,
            SECRET,
            "1234.1234",
            "presence-foobar",
            Some(r#"{"user_id":11}"#),
            &good
        ));
    }

    #[test]
    fn kinds_follow_prefixes() {
        assert_eq!(ChannelKind::of("a"), ChannelKind::Public);
        assert_eq!(ChannelKind::of("private-a"), ChannelKind::Private);
        assert_eq!(
            ChannelKind::of("private-encrypted-a"),
            ChannelKind::PrivateEncrypted
        );
        assert_eq!(ChannelKind::of("presence-a"), ChannelKind::Presence);
        assert!(!ChannelKind::PrivateEncrypted.allows_client_events());
    }

    #[test]
    fn signin_signature_round_trips() {
        let ud = r#"{"id":"alice"}"#;
        let sig = signin_signature(KEY, SECRET, "1.2", ud);
        assert!(verify_signin(KEY, SECRET, "1.2", ud, &sig));
        assert!(!verify_signin(KEY, SECRET, "1.3", ud, &sig));
    }
}
