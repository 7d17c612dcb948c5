//! RFC 7240 `Prefer: return=minimal` on the chat API's message mutations: an agent streaming a
//! long reply does not need the whole message back after every append (the answer would grow
//! with the text, so a reply's answers would grow with its square). With it, the answer is
//! `{event, status}` and carries `Preference-Applied: return=minimal`.

use std::future::{ready, Ready};

use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::{dev::Payload, FromRequest, HttpRequest};

pub const PREFERENCE_APPLIED: HeaderName = HeaderName::from_static("preference-applied");
pub const RETURN_MINIMAL: HeaderValue = HeaderValue::from_static("return=minimal");

/// What the caller asked to get back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReturnPreference {
    pub minimal: bool,
}

impl ReturnPreference {
    /// Reads every `Prefer` header; an unreadable one is ignored, as RFC 7240 asks.
    pub fn of(req: &HttpRequest) -> Self {
        let minimal = req
            .headers()
            .get_all("prefer")
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(asks_minimal);
        Self { minimal }
    }
}

/// One preference, `token[=value][; params]`: `return=minimal`, any case, value maybe quoted.
fn asks_minimal(preference: &str) -> bool {
    let head = preference.split(';').next().unwrap_or_default();
    let Some((token, value)) = head.split_once('=') else {
        return false;
    };
    let value = value.trim().trim_matches('"');
    token.trim().eq_ignore_ascii_case("return") && value.eq_ignore_ascii_case("minimal")
}

impl FromRequest for ReturnPreference {
    type Error = actix_web::Error;
    type Future = Ready<Result<Self, Self::Error>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready(Ok(Self::of(req)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::test::TestRequest;

    fn preference(headers: &[&str]) -> bool {
        let mut req = TestRequest::default();
        for h in headers {
            req = req.append_header(("Prefer", *h));
        }
        ReturnPreference::of(&req.to_http_request()).minimal
    }

    #[test]
    fn return_minimal_is_found_among_other_preferences() {
        assert!(preference(&["return=minimal"]));
        assert!(preference(&["Return=\"Minimal\""]));
        assert!(preference(&[
            "respond-async, wait=10",
            " return = minimal ; x=1"
        ]));
        assert!(preference(&["handling=lenient, return=minimal"]));
    }

    #[test]
    fn other_preferences_or_none_keep_the_full_answer() {
        assert!(!preference(&[]));
        assert!(!preference(&["return=representation"]));
        assert!(!preference(&["minimal"]));
        assert!(!preference(&["return-minimal", "wait=5"]));
    }
}
