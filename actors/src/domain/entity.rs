//! Entities (workspace members) and the moderation rules that apply to them.

use serde::{Deserialize, Serialize};

use crate::error::{ApiError, ApiResult};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EntityKind {
    Human,
    Agent,
    System,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Guest,
    Member,
    Moderator,
    Owner,
}

impl EntityKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Human => "human",
            Self::Agent => "agent",
            Self::System => "system",
        }
    }
    pub fn parse(s: &str) -> ApiResult<Self> {
        match s {
            "human" => Ok(Self::Human),
            "agent" => Ok(Self::Agent),
            "system" => Ok(Self::System),
            _ => Err(ApiError::invalid("kind must be human, agent or system")),
        }
    }
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Guest => "guest",
            Self::Member => "member",
            Self::Moderator => "moderator",
            Self::Owner => "owner",
        }
    }
    pub fn parse(s: &str) -> ApiResult<Self> {
        match s {
            "guest" => Ok(Self::Guest),
            "member" => Ok(Self::Member),
            "moderator" => Ok(Self::Moderator),
            "owner" => Ok(Self::Owner),
            _ => Err(ApiError::invalid(
                "role must be owner, moderator, member or guest",
            )),
        }
    }
    pub fn moderates(self) -> bool {
        matches!(self, Self::Owner | Self::Moderator)
    }
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Entity {
    pub id: String,
    pub workspace_id: String,
    pub name: String,
    pub kind: EntityKind,
    pub role: Role,
    pub metadata: serde_json::Value,
    pub timeout_until: Option<String>,
    pub blocked: bool,
    pub active: bool,
    pub created_at: String,
    pub updated_at: String,
}

impl Entity {
    pub fn is_guest(&self) -> bool {
        self.role == Role::Guest
    }

    /// Writes are refused while a timeout runs (`now` and `timeout_until` are RFC 3339 UTC).
    pub fn check_can_write(&self, now: &str) -> ApiResult<()> {
        match &self.timeout_until {
            Some(until) if until.as_str() > now => Err(ApiError::forbidden(format!(
                "you are timed out until {until}"
            ))),
            _ => Ok(()),
        }
    }

    /// Moderation is for owners and moderators, and a moderator cannot act on an owner.
    pub fn check_can_moderate(&self, target: &Entity) -> ApiResult<()> {
        if !self.role.moderates() {
            return Err(ApiError::forbidden(
                "only owners and moderators may moderate members",
            ));
        }
        if target.role == Role::Owner && self.role != Role::Owner {
            return Err(ApiError::forbidden("only an owner may moderate an owner"));
        }
        if target.id == self.id {
            return Err(ApiError::forbidden("you cannot moderate yourself"));
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) fn test_entity(id: &str, role: Role) -> Entity {
    Entity {
        id: id.into(),
        workspace_id: "1".into(),
        name: id.into(),
        kind: EntityKind::Human,
        role,
        metadata: serde_json::json!({}),
        timeout_until: None,
        blocked: false,
        active: true,
        created_at: String::new(),
        updated_at: String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeout_blocks_writes_until_it_passes() {
        let mut e = test_entity("a", Role::Member);
        e.timeout_until = Some("2026-01-01T00:10:00.000Z".into());
        assert!(e.check_can_write("2026-01-01T00:09:59.999Z").is_err());
        assert!(e.check_can_write("2026-01-01T00:10:00.001Z").is_ok());
    }

    #[test]
    fn moderation_needs_rank() {
        let owner = test_entity("o", Role::Owner);
        let moderator = test_entity("m", Role::Moderator);
        let member = test_entity("u", Role::Member);
        assert!(member.check_can_moderate(&moderator).is_err());
        assert!(moderator.check_can_moderate(&member).is_ok());
        assert!(moderator.check_can_moderate(&owner).is_err());
        assert!(owner.check_can_moderate(&moderator).is_ok());
        assert!(owner.check_can_moderate(&owner).is_err());
    }
}
