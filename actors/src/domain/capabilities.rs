//! Capability maps (SPEC §6): which operations an actor may perform on which channel names.
//! Two spellings are accepted: the seed's `{operation: [patterns]}` and Sockudo's JWT claim
//! `{pattern: [operations]}`; operation names in snake or hyphen case.

use std::collections::HashMap;

use serde_json::Value;

use super::versioned::Action;
use crate::auth::constant_time_eq;

/// Every operation SPEC §6 names.
pub const OPERATIONS: &[&str] = &[
    "subscribe",
    "publish",
    "history",
    "presence",
    "message_update_own",
    "message_update_any",
    "message_delete_own",
    "message_delete_any",
    "message_append_own",
    "message_append_any",
];

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Capabilities {
    /// operation (snake case) → channel-name patterns.
    grants: HashMap<String, Vec<String>>,
}

fn canonical_op(op: &str) -> String {
    op.replace('-', "_")
}

fn string_list(v: &Value) -> Vec<String> {
    match v {
        Value::Array(items) => items
            .iter()
            .filter_map(|i| i.as_str().map(str::to_string))
            .collect(),
        Value::String(s) => vec![s.clone()],
        _ => Vec::new(),
    }
}

impl Capabilities {
    /// Reads a claim. Anything unreadable grants nothing: a malformed claim never widens
    /// rights.
    pub fn from_claim(claim: &Value) -> Self {
        let parsed;
        let claim = match claim {
            // Sockudo allows the claim as a string holding the JSON object.
            Value::String(s) => match serde_json::from_str::<Value>(s) {
                Ok(v) => {
                    parsed = v;
                    &parsed
                }
                Err(_) => return Self::default(),
            },
            other => other,
        };
        let Value::Object(map) = claim else {
            return Self::default();
        };
        let op_form = !map.is_empty()
            && map
                .keys()
                .all(|k| OPERATIONS.contains(&canonical_op(k).as_str()));
        let mut grants: HashMap<String, Vec<String>> = HashMap::new();
        for (key, value) in map {
            if op_form {
                grants
                    .entry(canonical_op(key))
                    .or_default()
                    .extend(string_list(value));
            } else {
                for op in string_list(value) {
                    grants
                        .entry(canonical_op(&op))
                        .or_default()
                        .push(key.clone());
                }
            }
        }
        Self { grants }
    }

    pub fn allows(&self, operation: &str, channel: &str) -> bool {
        self.grants
            .get(operation)
            .is_some_and(|patterns| patterns.iter().any(|p| pattern_matches(p, channel)))
    }
}

/// `*` matches any run of characters (including none); everything else literally.
pub fn pattern_matches(pattern: &str, name: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == name;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !name.starts_with(first) || name.len() < first.len() + last.len() || !name.ends_with(last) {
        return false;
    }
    let mut rest = &name[first.len()..name.len() - last.len()];
    for middle in &parts[1..parts.len() - 1] {
        match rest.find(middle) {
            Some(at) => rest = &rest[at + middle.len()..],
            None => return false,
        }
    }
    true
}

/// The seed's decision for a mutation by capabilities: `*_any` first; `*_own` needs an
/// identified actor, an identified creator and a constant-time match of the two.
pub fn allows_mutation(
    caps: &Capabilities,
    action: Action,
    channel: &str,
    actor: Option<&str>,
    creator: Option<&str>,
) -> bool {
    let verb = action.as_str();
    if caps.allows(&format!("message_{verb}_any"), channel) {
        return true;
    }
    if !caps.allows(&format!("message_{verb}_own"), channel) {
        return false;
    }
    match (actor, creator) {
        (Some(a), Some(c)) if !a.is_empty() && !c.is_empty() => constant_time_eq(a, c),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn wildcards() {
        assert!(pattern_matches("*", "anything"));
        assert!(pattern_matches(
            "private-ai:user-42:*",
            "private-ai:user-42:x"
        ));
        assert!(!pattern_matches(
            "private-ai:user-42:*",
            "private-ai:user-43:x"
        ));
        assert!(pattern_matches("a*c*e", "abcde"));
        assert!(!pattern_matches("a*c*e", "abde"));
        assert!(pattern_matches("exact", "exact"));
        assert!(!pattern_matches("exact", "exactly"));
        assert!(!pattern_matches("ab*ba", "aba"));
    }

    #[test]
    fn both_spellings_read_the_same() {
        let seed = Capabilities::from_claim(&json!({"message_append_own": ["chat-*"]}));
        let sockudo = Capabilities::from_claim(&json!({"chat-*": ["message-append-own"]}));
        let as_string = Capabilities::from_claim(&json!(r#"{"chat-*": ["message-append-own"]}"#));
        for c in [&seed, &sockudo, &as_string] {
            assert!(c.allows("message_append_own", "chat-1"));
            assert!(!c.allows("message_append_own", "other"));
            assert!(!c.allows("message_append_any", "chat-1"));
        }
    }

    #[test]
    fn malformed_claims_grant_nothing() {
        for claim in [json!(5), json!("not json"), json!([1, 2]), json!({})] {
            assert_eq!(Capabilities::from_claim(&claim), Capabilities::default());
        }
    }

    #[test]
    fn own_needs_identified_matching_actor_and_creator() {
        let own = Capabilities::from_claim(&json!({"message_update_own": ["*"]}));
        let any = Capabilities::from_claim(&json!({"message_update_any": ["*"]}));
        let u = Action::Update;
        assert!(allows_mutation(&own, u, "c", Some("alice"), Some("alice")));
        assert!(!allows_mutation(&own, u, "c", Some("alice"), Some("bob")));
        assert!(!allows_mutation(&own, u, "c", None, Some("alice")));
        assert!(!allows_mutation(&own, u, "c", Some("alice"), None));
        assert!(!allows_mutation(&own, u, "c", Some(""), Some("")));
        assert!(allows_mutation(&any, u, "c", None, None));
        assert!(!allows_mutation(&any, Action::Append, "c", None, None));
    }
}
