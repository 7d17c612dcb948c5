//! Update, delete and append on the ChannelActor: authorization, op_id idempotency, stream
//! limits, and the hot-message cache that lets mutations pipeline without losing order.

use std::collections::HashMap;
use std::sync::Arc;

use actix::prelude::*;

use super::ChannelActor;
use crate::auth::constant_time_eq;
use crate::domain::capabilities::{allows_mutation, Capabilities};
use crate::domain::channel::ChannelType;
use crate::domain::entity::{Entity, Role};
use crate::domain::event::Event;
use crate::domain::message::{Message, StreamStatus};
use crate::domain::versioned::{self, Action, Mutation, StreamContext};
use crate::error::{ApiError, ApiResult, ErrorCode};
use crate::persistence::{VersionWrite, Write};
use crate::settings::AiTransportLimits;
use crate::store::message_state::StateWrite;
use crate::store::queries;
use crate::store::rows::VersionRow;
use actix::ResponseActFuture;

/// Open streams whose latest state stays in memory between appends, and the largest text
/// kept that way: a bound on this actor's memory (≈ 64 × 256 KiB at most).
const HOT_OPEN_STREAMS: usize = 64;
const HOT_TEXT_MAX: usize = 256 * 1024;

/// The latest state of a message with writes possibly in flight.
pub(super) struct HotMessage {
    /// Shared with the outcome of its last mutation: the text is not copied to answer.
    pub(super) message: Arc<Message>,
    /// Writes of this message not yet committed or failed.
    pending: usize,
    /// op_ids of this actor's lifetime: (action, op_id) → (fingerprint, seq).
    ops: HashMap<(Action, String), (String, i64)>,
}

/// Who asks for a mutation, and so which rule authorizes it (SPEC §6).
#[derive(Debug, Clone)]
pub enum MutationActor {
    /// A chat-API member: own messages always, `*_any` by capability, moderators delete.
    Member {
        entity: Entity,
        capabilities: Capabilities,
    },
    /// A server request bound to a connected socket: its token's capabilities decide,
    /// within what its entity may see.
    Connection {
        entity: Entity,
        capabilities: Capabilities,
    },
    /// A signed server request without `socket_id`.
    Privileged { client_id: Option<String> },
}

impl MutationActor {
    fn id(&self) -> Option<&str> {
        match self {
            Self::Member { entity, .. } => Some(&entity.id),
            Self::Connection { entity, .. } => Some(&entity.id),
            Self::Privileged { client_id } => client_id.as_deref(),
        }
    }
}

/// The workspace settings a mutation is checked against.
#[derive(Debug, Clone)]
pub struct VersionSettings {
    pub enabled: bool,
    pub ai: AiTransportLimits,
}

#[derive(Message, Clone)]
#[rtype(result = "ApiResult<MutationOutcome>")]
pub struct Mutate {
    pub actor: MutationActor,
    pub serial: String,
    pub mutation: Mutation,
    pub settings: VersionSettings,
}

#[derive(Debug)]
pub struct MutationOutcome {
    /// The latest state after this mutation (for a duplicate: the latest state now).
    pub message: Arc<Message>,
    pub action: Action,
    pub version_serial: String,
    pub delivery_serial: i64,
    pub duplicate: bool,
    /// `None` for a duplicate: nothing was written or fanned out.
    pub event: Option<Arc<Event>>,
}

impl ChannelActor {
    /// Pins a message's state while a write of it is in flight.
    pub(super) fn hold_hot(&mut self, message: Arc<Message>) {
        match self.hot.get_mut(&message.message_serial) {
            Some(h) => {
                h.message = message;
                h.pending += 1;
            }
            None => {
                self.hot.insert(
                    message.message_serial.clone(),
                    HotMessage {
                        message,
                        pending: 1,
                        ops: HashMap::new(),
                    },
                );
            }
        }
    }

    /// Once nothing of a message is in flight the store holds its latest state (and its
    /// op_ids), so the hot copy goes — except for a small number of open streams, whose next
    /// append would otherwise read the whole text back from the store.
    pub(super) fn release_hot(&mut self, serial: &str) {
        let keep_open_streams = self.hot.len() <= HOT_OPEN_STREAMS;
        if let Some(h) = self.hot.get_mut(serial) {
            h.pending = h.pending.saturating_sub(1);
            let streaming = h.message.stream_status == StreamStatus::Open
                && h.message
                    .data
                    .as_str()
                    .is_some_and(|d| d.len() <= HOT_TEXT_MAX);
            if h.pending == 0 && !(streaming && keep_open_streams) {
                self.hot.remove(serial);
            }
        }
    }

    /// The latest state: the hot copy (which may include writes in flight) or the store's.
    fn latest(&mut self, serial: &str) -> ApiResult<Arc<Message>> {
        crate::domain::validation::serial(serial)?;
        if let Some(h) = self.hot.get(serial) {
            return Ok(h.message.clone());
        }
        let stored = queries::message(&mut *self.conn()?, &self.channel.id, serial)?;
        stored.map(Arc::new).ok_or_else(|| {
            ApiError::not_found(format!(
                "Message '{serial}' was not found in channel '{}'",
                self.channel.name
            ))
        })
    }

    fn authorize(&self, actor: &MutationActor, action: Action, creator: &str) -> ApiResult<()> {
        let creator = (!creator.is_empty()).then_some(creator);
        let allowed = match actor {
            MutationActor::Privileged { .. } => true,
            MutationActor::Member {
                entity,
                capabilities,
            } => {
                let own = creator.is_some_and(|c| constant_time_eq(c, &entity.id));
                let moderates = action == Action::Delete
                    && matches!(entity.role, Role::Owner | Role::Moderator);
                own || moderates
                    || allows_mutation(
                        capabilities,
                        action,
                        &self.channel.name,
                        Some(&entity.id),
                        creator,
                    )
            }
            MutationActor::Connection {
                entity,
                capabilities,
            } => allows_mutation(
                capabilities,
                action,
                &self.channel.name,
                Some(&entity.id),
                creator,
            ),
        };
        if allowed {
            Ok(())
        } else {
            Err(ApiError::new(
                ErrorCode::MutableNotPermitted,
                format!(
                    "not allowed to {} this message on channel '{}'",
                    action.as_str(),
                    self.channel.name
                ),
            ))
        }
    }

    /// A previous mutation with the same op_id: its seq when the payload matches.
    fn replayed_op(&mut self, serial: &str, m: &Mutation) -> ApiResult<Option<i64>> {
        let Some(op) = &m.body.op_id else {
            return Ok(None);
        };
        let fingerprint = m.fingerprint();
        let known = self
            .hot
            .get(serial)
            .and_then(|h| h.ops.get(&(m.action, op.clone())).cloned());
        let known = match known {
            Some(k) => Some(k),
            None => queries::version_by_op(
                &mut *self.conn()?,
                &self.channel.id,
                serial,
                m.action.as_str(),
                op,
            )?
            .map(|v| (v.fingerprint.unwrap_or_default(), v.seq)),
        };
        match known {
            None => Ok(None),
            Some((f, seq)) if constant_time_eq(&f, &fingerprint) => Ok(Some(seq)),
            Some(_) => Err(ApiError::invalid(
                "op_id was already used with a different payload",
            )),
        }
    }

    /// The message as the version at `seq` left it: what a duplicate answers. Falls back to
    /// the latest state when that version is not committed yet or was purged.
    fn state_at(&self, mut latest: Message, seq: i64) -> ApiResult<Message> {
        let mut conn = self.conn()?;
        let Some(row) = queries::version_at(&mut conn, &self.channel.id, seq)? else {
            return Ok(latest);
        };
        let body: serde_json::Value = serde_json::from_str(&row.body).unwrap_or_default();
        if row.action == "append" {
            match queries::text_at(&mut conn, &self.channel.id, &row.message_serial, seq)? {
                Some(text) => latest.data = serde_json::Value::String(text),
                None => return Ok(latest),
            }
        } else {
            if let Some(n) = body.get("name").and_then(|n| n.as_str()) {
                latest.name = n.to_string();
            }
            latest.data = body.get("data").cloned().unwrap_or_default();
            latest.extras = body.get("extras").cloned().unwrap_or_default();
            latest.deleted = body
                .get("deleted")
                .and_then(|d| d.as_bool())
                .unwrap_or(false);
        }
        if let Some(e) = body.get("extras").filter(|e| e.is_object()) {
            latest.extras = e.clone();
        }
        latest.version_serial = crate::ids::version_serial(seq);
        latest.updated_at = row.created_at;
        latest.last_action = Action::parse(&row.action).map_or("create", Action::as_str);
        Ok(latest)
    }

    /// Open streams now, after dropping those idle past the timeout.
    fn stream_context(&mut self, serial: &str, idle_timeout_s: u64) -> ApiResult<StreamContext> {
        if self.open_streams.is_none() {
            let rows = queries::open_streams(&mut *self.conn()?, &self.channel.id)?;
            let map = rows
                .into_iter()
                .map(|(s, at)| (s, at.as_deref().map_or(0, crate::ids::rfc3339_millis)))
                .collect();
            self.open_streams = Some(map);
        }
        let now = crate::ids::now_millis();
        let idle_ms = (idle_timeout_s as i64).saturating_mul(1000);
        let streams = self.open_streams.get_or_insert_with(HashMap::new);
        streams.retain(|_, last| now - *last <= idle_ms);
        Ok(StreamContext {
            open_now: streams.contains_key(serial),
            open_in_channel: streams.len(),
        })
    }

    fn prepare_mutation(&mut self, msg: Mutate) -> ApiResult<Prepared> {
        let now = crate::ids::now_rfc3339();
        match &msg.actor {
            MutationActor::Member { entity, .. } => self.channel.check_can_post(entity, &now)?,
            // Capabilities never reach beyond what the entity may see. Implicit channels have
            // no chat members: there the capability patterns are the whole grant.
            MutationActor::Connection { entity, .. }
                if self.channel.channel_type != ChannelType::Implicit =>
            {
                self.channel.check_visible(entity)?
            }
            _ => {}
        }
        if !msg.settings.enabled {
            return Err(ApiError::new(
                ErrorCode::FeatureDisabled,
                "versioned messages are disabled in this workspace",
            ));
        }
        if self.channel.immutable {
            return Err(ApiError::new(
                ErrorCode::MessageImmutable,
                "this channel is immutable: its messages cannot be updated, deleted or appended to",
            ));
        }
        self.check_accepting()?;
        let current = self.latest(&msg.serial)?;
        let action = msg.mutation.action;
        self.authorize(&msg.actor, action, &current.sender)?;
        if let Some(seq) = self.replayed_op(&current.message_serial, &msg.mutation)? {
            let message = Arc::new(self.state_at(Arc::unwrap_or_clone(current), seq)?);
            return Ok(Prepared::Duplicate(MutationOutcome {
                message,
                action,
                version_serial: crate::ids::version_serial(seq),
                delivery_serial: seq,
                duplicate: true,
                event: None,
            }));
        }
        let stream = if action == Action::Append {
            self.stream_context(
                &current.message_serial,
                msg.settings.ai.stream_idle_timeout_seconds,
            )?
        } else {
            StreamContext {
                open_now: true,
                open_in_channel: 0,
            }
        };
        let seq = self.last_seq + 1;
        let mut mutation = msg.mutation;
        // The version records who made it: the authenticated actor, else the given client_id.
        mutation.body.client_id = msg.actor.id().map(str::to_string);
        let settings = &msg.settings.ai;
        // The hot copy is applied to where it stands, `current` let go first: with no other
        // holder an append extends the text in place instead of copying it per token.
        let (applied, next) = match self.hot.get_mut(&msg.serial) {
            Some(h) => {
                drop(current);
                let applied =
                    versioned::apply(&mut h.message, &mutation, seq, &now, settings, stream)?;
                (applied, h.message.clone())
            }
            None => {
                let mut state = current;
                let applied = versioned::apply(&mut state, &mutation, seq, &now, settings, stream)?;
                (applied, state)
            }
        };
        self.last_seq = seq;
        match next.stream_status {
            StreamStatus::Open => {
                if let Some(s) = self.open_streams.as_mut() {
                    s.insert(next.message_serial.clone(), crate::ids::now_millis());
                }
            }
            _ => {
                if let Some(s) = self.open_streams.as_mut() {
                    s.remove(&next.message_serial);
                }
            }
        }
        self.hold_hot(next.clone());
        if let (Some(op), Some(h)) = (&mutation.body.op_id, self.hot.get_mut(&next.message_serial))
        {
            h.ops
                .insert((action, op.clone()), (mutation.fingerprint(), seq));
        }
        let mut payload = applied.event_payload;
        if let Some(d) = self.direct_id() {
            payload["direct_conversation_id"] = serde_json::json!(d);
        }
        let draft = self.draft(action.event_type(), payload).seq(seq);
        let row = VersionRow {
            channel_id: self.channel.id.clone(),
            seq,
            message_serial: next.message_serial.clone(),
            action: action.as_str().to_string(),
            actor: mutation.body.client_id.clone(),
            op_id: mutation.body.op_id.clone(),
            body: applied.version_body.to_string(),
            created_at: now,
            fingerprint: mutation.body.op_id.as_ref().map(|_| mutation.fingerprint()),
        };
        // An append sends only what it changed: the stream's text is not copied per token.
        let state = match action {
            Action::Append => {
                StateWrite::of_append(&next, mutation.fragment(), mutation.body.extras.as_ref())
            }
            _ => StateWrite::Full(Box::new(Message::clone(&next))),
        };
        // The writer inserts the version and saves the message's row, once per batch (see
        // `VersionWrite`). Nothing here can fail once it has checked the seq: no savepoint.
        let write = Write {
            workspace_id: self.channel.workspace_id.clone(),
            channel_seqs: Some(self.channel_seqs(seq, seq)),
            apply: Box::new(|_| Ok(true)),
            events: vec![draft],
            version: Some(Box::new(VersionWrite { row, state })),
            savepoint: false,
        };
        Ok(Prepared::Write {
            message: next,
            action,
            seq,
            write,
        })
    }
}

#[allow(clippy::large_enum_variant)]
enum Prepared {
    Duplicate(MutationOutcome),
    Write {
        message: Arc<Message>,
        action: Action,
        seq: i64,
        write: Write,
    },
}

impl Handler<Mutate> for ChannelActor {
    type Result = ResponseActFuture<Self, ApiResult<MutationOutcome>>;

    fn handle(&mut self, msg: Mutate, ctx: &mut Self::Context) -> Self::Result {
        self.touch(ctx);
        self.mutate(msg, 1)
    }
}

impl ChannelActor {
    /// Attempt `attempt` of a mutation: prepared on the current view (hot state, open
    /// streams), prepared again on a fresh one when the writer refuses its seq.
    fn mutate(
        &mut self,
        msg: Mutate,
        attempt: u32,
    ) -> ResponseActFuture<Self, ApiResult<MutationOutcome>> {
        let again = msg.clone();
        if let Some(waiting) = self.gated(move |act| act.mutate(again, attempt)) {
            return waiting;
        }
        let again = msg.clone();
        match self.prepare_mutation(msg) {
            Err(e) => Box::pin(fut::ready(Err(e))),
            Ok(Prepared::Duplicate(outcome)) => Box::pin(fut::ready(Ok(outcome))),
            Ok(Prepared::Write {
                message,
                action,
                seq,
                write,
            }) => Box::pin(self.submit_write(Some((seq, seq)), write).then(
                move |res, act, _| -> ResponseActFuture<Self, ApiResult<MutationOutcome>> {
                    act.release_hot(&message.message_serial);
                    match res {
                        Ok(events) => Box::pin(fut::ready(Ok(MutationOutcome {
                            version_serial: message.version_serial.clone(),
                            message,
                            action,
                            delivery_serial: seq,
                            duplicate: false,
                            event: events.into_iter().next(),
                        }))),
                        Err(e) => act.retry(e, attempt, move |act| act.mutate(again, attempt + 1)),
                    }
                },
            )),
        }
    }
}
