//! Channels and their rules (Stoneforge's direct/group model with permissions and join
//! policies). Everything here is pure; the ChannelActor applies it to its in-memory state.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use super::entity::Entity;
use crate::error::{ApiError, ApiResult, ErrorCode};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChannelType {
    Direct,
    Group,
    /// Named by a server or Pusher client without a chat channel of that name: private,
    /// member-less, so the chat API neither lists nor shows it.
    Implicit,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Visibility {
    Public,
    Private,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JoinPolicy {
    Open,
    InviteOnly,
    Request,
}

macro_rules! str_enum {
    ($t:ty { $($v:ident => $s:literal),* }) => {
        impl $t {
            pub fn as_str(self) -> &'static str { match self { $(Self::$v => $s),* } }
            pub fn parse(s: &str) -> ApiResult<Self> {
                match s { $($s => Ok(Self::$v),)* _ => Err(ApiError::invalid(format!(concat!("unknown ", stringify!($t), " '{}'"), s))) }
            }
        }
    };
}
str_enum!(ChannelType { Direct => "direct", Group => "group", Implicit => "implicit" });
str_enum!(Visibility { Public => "public", Private => "private" });
str_enum!(JoinPolicy { Open => "open", InviteOnly => "invite-only", Request => "request" });

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Permissions {
    pub visibility: Visibility,
    pub join_policy: JoinPolicy,
    pub modify_members: Vec<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Channel {
    pub id: String,
    pub workspace_id: String,
    pub name: String,
    pub description: String,
    pub channel_type: ChannelType,
    pub members: BTreeSet<String>,
    pub permissions: Permissions,
    pub immutable: bool,
    pub tags: Vec<String>,
    pub metadata: serde_json::Value,
    pub created_by: String,
    pub created_at: String,
    pub updated_at: String,
    pub archived_at: Option<String>,
    pub last_seq: i64,
}

/// The name of the direct channel between two entities: their ids sorted, joined by ':'.
pub fn direct_name(a: &str, b: &str) -> String {
    if a <= b {
        format!("{a}:{b}")
    } else {
        format!("{b}:{a}")
    }
}

/// What a join attempt leads to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JoinOutcome {
    AlreadyMember,
    Joined,
    Requested,
}

impl Channel {
    pub fn is_member(&self, entity_id: &str) -> bool {
        self.members.contains(entity_id)
    }

    pub fn is_public(&self) -> bool {
        self.channel_type == ChannelType::Group && self.permissions.visibility == Visibility::Public
    }

    pub fn can_modify_members(&self, entity_id: &str) -> bool {
        self.permissions
            .modify_members
            .iter()
            .any(|m| m == entity_id)
    }

    /// Public channels are visible to every member of the workspace but guests, who see
    /// only channels they belong to; private and direct channels only to their members.
    pub fn is_visible_to(&self, entity: &Entity) -> bool {
        self.is_member(&entity.id) || (self.is_public() && !entity.is_guest())
    }

    /// A channel the caller may not see is 404, one it sees but has not joined is 403.
    pub fn check_visible(&self, entity: &Entity) -> ApiResult<()> {
        if self.is_visible_to(entity) {
            Ok(())
        } else {
            Err(ApiError::not_found("channel not found"))
        }
    }

    pub fn check_member(&self, entity: &Entity) -> ApiResult<()> {
        self.check_visible(entity)?;
        if self.is_member(&entity.id) {
            Ok(())
        } else {
            Err(ApiError::new(
                ErrorCode::NotAMember,
                "you are not a member of this channel",
            ))
        }
    }

    /// Posting, reacting and the like: a member of a channel that is not archived.
    pub fn check_can_post(&self, entity: &Entity, now: &str) -> ApiResult<()> {
        self.check_member(entity)?;
        entity.check_can_write(now)?;
        if self.archived_at.is_some() {
            return Err(ApiError::forbidden("channel is archived"));
        }
        Ok(())
    }

    fn check_group(&self) -> ApiResult<()> {
        if self.channel_type == ChannelType::Direct {
            Err(ApiError::new(
                ErrorCode::DirectChannelMembership,
                "the membership of a direct channel never changes",
            ))
        } else {
            Ok(())
        }
    }

    fn check_capacity(&self, max_members: usize) -> ApiResult<()> {
        if self.members.len() >= max_members {
            Err(ApiError::limit(format!(
                "a channel has at most {max_members} members"
            )))
        } else {
            Ok(())
        }
    }

    /// Someone joining on their own.
    pub fn join(&self, entity: &Entity) -> ApiResult<JoinOutcome> {
        self.check_visible(entity)?;
        self.check_group()?;
        if self.is_member(&entity.id) {
            return Ok(JoinOutcome::AlreadyMember);
        }
        match self.permissions.join_policy {
            JoinPolicy::Open if self.is_public() => Ok(JoinOutcome::Joined),
            JoinPolicy::Request => Ok(JoinOutcome::Requested),
            _ => Err(ApiError::forbidden("this channel is invite-only")),
        }
    }

    /// `actor` adding `target` (also how join requests are approved).
    pub fn check_add_member(
        &self,
        actor: &Entity,
        target_id: &str,
        max_members: usize,
    ) -> ApiResult<bool> {
        self.check_visible(actor)?;
        self.check_group()?;
        self.check_modifier(actor)?;
        if self.is_member(target_id) {
            return Ok(false);
        }
        self.check_capacity(max_members)?;
        Ok(true)
    }

    /// `actor` removing `target`; leaving is `actor == target` and needs no permission.
    pub fn check_remove_member(&self, actor: &Entity, target_id: &str) -> ApiResult<()> {
        self.check_visible(actor)?;
        self.check_group()?;
        if actor.id != target_id {
            self.check_modifier(actor)?;
        }
        if !self.is_member(target_id) {
            return Err(ApiError::new(
                ErrorCode::NotAMember,
                "not a member of this channel",
            ));
        }
        Ok(())
    }

    pub fn check_modifier(&self, actor: &Entity) -> ApiResult<()> {
        if self.can_modify_members(&actor.id) {
            Ok(())
        } else {
            Err(ApiError::new(
                ErrorCode::CannotModifyMembers,
                "you may not change this channel's members",
            ))
        }
    }

    /// Recipients of this channel's events when they must be private; `None` when public.
    pub fn private_recipients(&self) -> Option<Vec<String>> {
        if self.is_public() {
            None
        } else {
            Some(self.members.iter().cloned().collect())
        }
    }
}

/// The request to create a group channel, already parsed.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewGroup {
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub visibility: Option<String>,
    #[serde(default)]
    pub join_policy: Option<String>,
    #[serde(default)]
    pub members: Vec<String>,
    #[serde(default)]
    pub modify_members: Vec<String>,
    #[serde(default)]
    pub immutable: bool,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub metadata: Option<serde_json::Value>,
}

pub struct GroupLimits {
    pub min_members: usize,
    pub max_members: usize,
}

impl NewGroup {
    /// Builds the channel: creator in members and modify_members, private and invite-only
    /// unless asked, between `min_members` (creator counted) and `max_members` members.
    pub fn into_channel(
        self,
        id: String,
        workspace_id: String,
        creator: &Entity,
        limits: &GroupLimits,
        now: &str,
    ) -> ApiResult<Channel> {
        if creator.is_guest() {
            return Err(ApiError::forbidden("guests cannot create channels"));
        }
        super::validation::channel_name(&self.name)?;
        let description = self.description.unwrap_or_default();
        if description.chars().count() > 1000 {
            return Err(ApiError::invalid("description is at most 1000 characters"));
        }
        super::validation::tags(&self.tags)?;
        let metadata = self.metadata.unwrap_or_else(|| serde_json::json!({}));
        super::validation::object("metadata", &metadata)?;
        let visibility = self
            .visibility
            .as_deref()
            .map(Visibility::parse)
            .transpose()?
            .unwrap_or(Visibility::Private);
        let join_policy = self
            .join_policy
            .as_deref()
            .map(JoinPolicy::parse)
            .transpose()?
            .unwrap_or(JoinPolicy::InviteOnly);
        if join_policy == JoinPolicy::Open && visibility == Visibility::Private {
            return Err(ApiError::invalid(
                "an open join policy needs a public channel",
            ));
        }
        let mut members: BTreeSet<String> = BTreeSet::new();
        members.insert(creator.id.clone());
        for m in self.members {
            super::validation::entity_id(&m)?;
            members.insert(m);
        }
        if members.len() < limits.min_members {
            return Err(ApiError::invalid(format!(
                "a group channel needs at least {} members, counting its creator",
                limits.min_members
            )));
        }
        if members.len() > limits.max_members {
            return Err(ApiError::limit(format!(
                "a channel has at most {} members",
                limits.max_members
            )));
        }
        let mut modify_members = vec![creator.id.clone()];
        for m in self.modify_members {
            if !members.contains(&m) {
                return Err(ApiError::invalid(format!(
                    "modify_members entry '{m}' is not a member"
                )));
            }
            if !modify_members.contains(&m) {
                modify_members.push(m);
            }
        }
        Ok(Channel {
            id,
            workspace_id,
            name: self.name,
            description,
            channel_type: ChannelType::Group,
            members,
            permissions: Permissions {
                visibility,
                join_policy,
                modify_members,
            },
            immutable: self.immutable,
            tags: self.tags,
            metadata,
            created_by: creator.id.clone(),
            created_at: now.to_string(),
            updated_at: now.to_string(),
            archived_at: None,
            last_seq: 0,
        })
    }
}

/// Builds the direct channel between `creator` and `other` (must be distinct).
pub fn new_direct(
    id: String,
    workspace_id: String,
    creator: &Entity,
    other: &str,
    now: &str,
) -> ApiResult<Channel> {
    if creator.is_guest() {
        return Err(ApiError::forbidden("guests cannot create channels"));
    }
    super::validation::entity_id(other)?;
    if other == creator.id {
        return Err(ApiError::invalid(
            "a direct channel needs two distinct members",
        ));
    }
    Ok(Channel {
        id,
        workspace_id,
        name: direct_name(&creator.id, other),
        description: String::new(),
        channel_type: ChannelType::Direct,
        members: [creator.id.clone(), other.to_string()]
            .into_iter()
            .collect(),
        permissions: Permissions {
            visibility: Visibility::Private,
            join_policy: JoinPolicy::InviteOnly,
            modify_members: Vec::new(),
        },
        immutable: false,
        tags: Vec::new(),
        metadata: serde_json::json!({}),
        created_by: creator.id.clone(),
        created_at: now.to_string(),
        updated_at: now.to_string(),
        archived_at: None,
        last_seq: 0,
    })
}

/// The implicit channel a server or Pusher client creates by naming it.
pub fn new_implicit(id: String, workspace_id: String, name: &str, now: &str) -> ApiResult<Channel> {
    super::validation::pusher_channel_name(name)?;
    Ok(Channel {
        id,
        workspace_id,
        name: name.to_string(),
        description: String::new(),
        channel_type: ChannelType::Implicit,
        members: BTreeSet::new(),
        permissions: Permissions {
            visibility: Visibility::Private,
            join_policy: JoinPolicy::InviteOnly,
            modify_members: Vec::new(),
        },
        immutable: false,
        tags: Vec::new(),
        metadata: serde_json::json!({}),
        created_by: String::new(),
        created_at: now.to_string(),
        updated_at: now.to_string(),
        archived_at: None,
        last_seq: 0,
    })
}

/// `PATCH /api/channels/{id}`: every field optional; `immutable` is fixed at creation.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelPatch {
    pub name: Option<String>,
    pub description: Option<String>,
    pub visibility: Option<String>,
    pub join_policy: Option<String>,
    pub modify_members: Option<Vec<String>>,
    pub tags: Option<Vec<String>>,
    pub metadata: Option<serde_json::Value>,
    pub archived: Option<bool>,
}

impl ChannelPatch {
    /// Applies the patch to a copy of the channel after checking the actor may.
    pub fn apply(self, channel: &Channel, actor: &Entity, now: &str) -> ApiResult<Channel> {
        channel.check_visible(actor)?;
        if channel.channel_type == ChannelType::Direct {
            return Err(ApiError::forbidden("a direct channel cannot be changed"));
        }
        if !channel.can_modify_members(&actor.id) {
            return Err(ApiError::new(
                ErrorCode::CannotModifyMembers,
                "you may not change this channel",
            ));
        }
        let mut next = channel.clone();
        if let Some(name) = self.name {
            super::validation::channel_name(&name)?;
            next.name = name;
        }
        if let Some(d) = self.description {
            if d.chars().count() > 1000 {
                return Err(ApiError::invalid("description is at most 1000 characters"));
            }
            next.description = d;
        }
        if let Some(v) = self.visibility {
            next.permissions.visibility = Visibility::parse(&v)?;
        }
        if let Some(j) = self.join_policy {
            next.permissions.join_policy = JoinPolicy::parse(&j)?;
        }
        if next.permissions.join_policy == JoinPolicy::Open
            && next.permissions.visibility == Visibility::Private
        {
            return Err(ApiError::invalid(
                "an open join policy needs a public channel",
            ));
        }
        if let Some(mm) = self.modify_members {
            let mut list: Vec<String> = Vec::new();
            for m in mm {
                if !next.members.contains(&m) {
                    return Err(ApiError::invalid(format!(
                        "modify_members entry '{m}' is not a member"
                    )));
                }
                if !list.contains(&m) {
                    list.push(m);
                }
            }
            next.permissions.modify_members = list;
        }
        if let Some(t) = self.tags {
            super::validation::tags(&t)?;
            next.tags = t;
        }
        if let Some(m) = self.metadata {
            super::validation::object("metadata", &m)?;
            next.metadata = m;
        }
        if let Some(a) = self.archived {
            next.archived_at = match (a, &channel.archived_at) {
                (true, Some(at)) => Some(at.clone()),
                (true, None) => Some(now.to_string()),
                (false, _) => None,
            };
        }
        next.updated_at = now.to_string();
        Ok(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::entity::{test_entity, Role};

    const LIMITS: GroupLimits = GroupLimits {
        min_members: 2,
        max_members: 1000,
    };

    fn group(creator: &Entity, members: &[&str]) -> ApiResult<Channel> {
        NewGroup {
            name: "general".into(),
            members: members.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
        .into_channel("chn_1".into(), "1".into(), creator, &LIMITS, "now")
    }

    #[test]
    fn group_defaults_private_invite_only_with_creator_as_modifier() {
        let alice = test_entity("alice", Role::Member);
        let c = group(&alice, &["bob"]).expect("valid");
        assert_eq!(c.permissions.visibility, Visibility::Private);
        assert_eq!(c.permissions.join_policy, JoinPolicy::InviteOnly);
        assert!(c.is_member("alice") && c.is_member("bob"));
        assert_eq!(c.permissions.modify_members, vec!["alice".to_string()]);
    }

    #[test]
    fn group_needs_min_members_counting_creator() {
        let alice = test_entity("alice", Role::Member);
        assert_eq!(
            group(&alice, &[]).expect_err("too few").code,
            ErrorCode::InvalidInput
        );
        assert_eq!(
            group(&alice, &["alice"]).expect_err("dup creator").code,
            ErrorCode::InvalidInput
        );
    }

    #[test]
    fn group_member_cap() {
        let alice = test_entity("alice", Role::Member);
        let many: Vec<String> = (0..1000).map(|i| format!("u{i}")).collect();
        let refs: Vec<&str> = many.iter().map(String::as_str).collect();
        assert_eq!(
            group(&alice, &refs).expect_err("1001").code,
            ErrorCode::LimitExceeded
        );
        assert!(group(&alice, &refs[..999]).is_ok());
    }

    #[test]
    fn guests_create_nothing() {
        let g = test_entity("g", Role::Guest);
        assert_eq!(
            group(&g, &["bob"]).expect_err("guest").code,
            ErrorCode::Forbidden
        );
        assert!(new_direct("c".into(), "1".into(), &g, "bob", "now").is_err());
    }

    #[test]
    fn direct_rules() {
        let bob = test_entity("bob", Role::Member);
        let c = new_direct("c".into(), "1".into(), &bob, "alice", "now").expect("valid");
        assert_eq!(c.name, "alice:bob");
        assert!(c.permissions.modify_members.is_empty());
        assert_eq!(c.permissions.visibility, Visibility::Private);
        assert!(new_direct("c".into(), "1".into(), &bob, "bob", "now").is_err());
        let err = c.check_add_member(&bob, "carol", 1000).expect_err("direct");
        assert_eq!(err.code, ErrorCode::DirectChannelMembership);
        assert_eq!(
            c.join(&bob).expect_err("direct").code,
            ErrorCode::DirectChannelMembership
        );
    }

    #[test]
    fn visibility_and_membership_errors() {
        let alice = test_entity("alice", Role::Member);
        let carol = test_entity("carol", Role::Member);
        let guest = test_entity("g", Role::Guest);
        let mut c = group(&alice, &["bob"]).expect("valid");
        assert_eq!(
            c.check_member(&carol).expect_err("hidden").code,
            ErrorCode::NotFound
        );
        c.permissions.visibility = Visibility::Public;
        assert_eq!(
            c.check_member(&carol).expect_err("visible").code,
            ErrorCode::NotAMember
        );
        assert_eq!(
            c.check_member(&guest).expect_err("guest").code,
            ErrorCode::NotFound
        );
    }

    #[test]
    fn join_policies() {
        let alice = test_entity("alice", Role::Member);
        let carol = test_entity("carol", Role::Member);
        let mut c = group(&alice, &["bob"]).expect("valid");
        c.permissions.visibility = Visibility::Public;
        assert_eq!(
            c.join(&carol).expect_err("invite").code,
            ErrorCode::Forbidden
        );
        c.permissions.join_policy = JoinPolicy::Open;
        assert_eq!(c.join(&carol).expect("open"), JoinOutcome::Joined);
        c.permissions.join_policy = JoinPolicy::Request;
        assert_eq!(c.join(&carol).expect("request"), JoinOutcome::Requested);
        assert_eq!(c.join(&alice).expect("member"), JoinOutcome::AlreadyMember);
    }

    #[test]
    fn only_modifiers_change_members() {
        let alice = test_entity("alice", Role::Member);
        let bob = test_entity("bob", Role::Member);
        let c = group(&alice, &["bob"]).expect("valid");
        assert_eq!(
            c.check_add_member(&bob, "carol", 1000)
                .expect_err("bob")
                .code,
            ErrorCode::CannotModifyMembers
        );
        assert!(c.check_add_member(&alice, "carol", 1000).expect("alice"));
        assert!(
            c.check_remove_member(&bob, "bob").is_ok(),
            "leaving needs no permission"
        );
        assert_eq!(
            c.check_remove_member(&bob, "alice").expect_err("bob").code,
            ErrorCode::CannotModifyMembers
        );
        assert_eq!(
            c.check_add_member(&alice, "carol", 2)
                .expect_err("cap")
                .code,
            ErrorCode::LimitExceeded
        );
    }

    #[test]
    fn patch_keeps_rules() {
        let alice = test_entity("alice", Role::Member);
        let bob = test_entity("bob", Role::Member);
        let c = group(&alice, &["bob"]).expect("valid");
        let p = ChannelPatch {
            archived: Some(true),
            ..Default::default()
        };
        assert!(p.clone().apply(&c, &bob, "t").is_err());
        assert_eq!(
            p.apply(&c, &alice, "t").expect("ok").archived_at.as_deref(),
            Some("t")
        );
        let bad = ChannelPatch {
            modify_members: Some(vec!["zed".into()]),
            ..Default::default()
        };
        assert!(bad.apply(&c, &alice, "t").is_err());
    }
}
