//! ChannelActor: one per channel. It owns the channel's seq counter, its membership and
//! permissions, so every write of the channel on this node passes through it and needs no
//! lock. Writes are pipelined: the actor assigns seqs and hands writes to the persistence
//! actor without waiting for each commit, and the persistence actor refuses any write whose
//! seq does not follow the committed one, so seqs stay contiguous even after a failure.
//!
//! The actor keeps the latest state of the messages it is writing ("hot" messages): a
//! mutation must build on the previous one even before that one has committed, so 50
//! concurrent appenders get one order that every reader agrees on.
//!
//! Several nodes (or processes sharing one SQLite file) may host an actor for the same
//! channel. Each node's counter and hot states are then an optimistic view: every change of a
//! message's state takes a channel seq, so a write prepared on a stale view carries seqs that
//! no longer follow the committed ones, and the writer refuses it (`WriteError::StaleSeq`),
//! with the writes pipelined after it (its `SeqChain`). The actor then waits for its writes
//! in flight to settle, reloads the channel (seq, members, fields) and drops its hot states
//! and open-stream view, and prepares the refused requests again on the fresh state — up to
//! [`WRITE_ATTEMPTS`] times, after which the client gets 503 `backpressure` (Retry-After).
//! A new post builds on no earlier write: the writer rebuilds it on the next free seq instead
//! of refusing it (`persistence::Rebase`), and the actor resyncs after it commits.

mod versions;

pub use versions::{Mutate, MutationActor, MutationOutcome, VersionSettings};

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use serde_json::json;

use crate::domain::channel::{Channel, ChannelPatch, ChannelType, JoinOutcome};
use crate::domain::entity::Entity;
use crate::domain::event::{Event, EventDraft, LiveRoute};
use crate::domain::message::{validate_emoji, Message, NewMessage};
use crate::error::{ApiError, ApiResult};
use crate::persistence::{
    Apply, ChannelSeqs, Persistence, SeqChain, TypedWriteResult, Write, WriteError,
};
use crate::registry::Registry;
use crate::store::rows::VersionRow;
use crate::store::{queries, DbPool};

/// A channel actor with nothing to do stops after this long; the database rebuilds it.
const IDLE_STOP_AFTER: Duration = Duration::from_secs(600);

/// Cluster mode: how old this node's view of a channel (members, roles, fields, seq) may get
/// when the notification of another node's change was lost (Redis down). A channel in use is
/// reloaded every half of it, off the request path; one idle longer reloads on its next
/// request.
pub const CLUSTER_VIEW_TTL: Duration = Duration::from_secs(10);

/// How many times a seq-taking write is prepared and submitted before its client is told to
/// retry: another node writing the same channel refuses this node's stale seqs (see the
/// module documentation).
pub const WRITE_ATTEMPTS: u32 = 10;

/// The workspace limits a request is checked against.
#[derive(Debug, Clone, Copy)]
pub struct ChannelLimits {
    pub max_members: usize,
    pub max_attachments: usize,
}

#[derive(Message, Clone)]
#[rtype(result = "ApiResult<Channel>")]
pub struct GetChannel {
    pub viewer: Entity,
}

/// Who creates a message.
#[derive(Debug, Clone)]
pub enum Author {
    /// A member through the chat API: membership and moderation rules apply.
    Member(Entity),
    /// A signed server request; `client_id` names the creator when given.
    Server { client_id: Option<String> },
}

#[derive(Message, Clone)]
#[rtype(result = "ApiResult<PostOutcome>")]
pub struct PostMessage {
    pub author: Author,
    pub input: NewMessage,
    pub limits: ChannelLimits,
    /// A Pusher publisher's own socket, left out of the live delivery (`socket_id`).
    pub except_socket: Option<String>,
}

pub struct PostOutcome {
    pub message: Message,
    /// `None` for a nonce replay: nothing new was written.
    pub event: Option<Arc<Event>>,
    /// The thread root's `message.summary` (ephemeral) when this is a reply.
    pub summary: Option<Arc<Event>>,
}

#[derive(Message, Clone)]
#[rtype(result = "ApiResult<ReactionOutcome>")]
pub struct React {
    pub actor: Entity,
    pub message_serial: String,
    pub emoji: String,
    pub add: bool,
}

pub struct ReactionOutcome {
    pub message: Message,
    pub event: Option<Arc<Event>>,
    /// The message's `message.summary` (ephemeral) when the reactions changed.
    pub summary: Option<Arc<Event>>,
}

#[derive(Message, Clone)]
#[rtype(result = "ApiResult<ReadOutcome>")]
pub struct MarkRead {
    pub actor: Entity,
    pub seq: i64,
}

pub struct ReadOutcome {
    pub last_read_seq: i64,
    pub event: Option<Arc<Event>>,
}

#[derive(Debug, Clone)]
pub enum MembershipChange {
    Join,
    Leave,
    Add(String),
    Remove(String),
    Approve(String),
    Reject(String),
}

#[derive(Message, Clone)]
#[rtype(result = "ApiResult<MembershipOutcome>")]
pub struct ChangeMembership {
    pub actor: Entity,
    pub change: MembershipChange,
    pub limits: ChannelLimits,
}

pub struct MembershipOutcome {
    pub channel: Channel,
    pub event: Option<Arc<Event>>,
    /// `joined`, `requested`, `unchanged`, `added`, `removed` or `rejected`.
    pub status: &'static str,
}

#[derive(Message, Clone)]
#[rtype(result = "ApiResult<(Channel, Option<Arc<Event>>)>")]
pub struct PatchChannel {
    pub actor: Entity,
    pub patch: ChannelPatch,
}

/// Another node changed the channel (cluster mode): reload the view before checking
/// anything else (`now`), or before the next seq-taking write (a message changed: only the
/// hot states and the open-stream view are stale, and those matter to writes only).
#[derive(Message, Clone, Copy)]
#[rtype(result = "()")]
pub struct Refresh {
    pub now: bool,
}

pub struct ChannelActor {
    channel: Channel,
    pool: DbPool,
    persistence: Persistence,
    registry: Arc<Registry>,
    /// Last seq handed out (committed or in flight).
    last_seq: i64,
    in_flight: usize,
    /// A seq-taking write failed: new ones wait until in-flight writes settle, then the
    /// channel is reloaded from the store.
    resyncing: bool,
    /// Writes waiting for the reload (woken when it is done, or failed).
    resync_waiters: Vec<tokio::sync::oneshot::Sender<()>>,
    /// The chain of the seq-taking writes pipelined on the current view of the channel.
    chain: SeqChain,
    /// Nonces of posts in flight, so a concurrent replay is not written twice.
    pending_nonces: HashMap<(String, String), ()>,
    /// Reply counts of thread roots this actor has seen (it is their only writer).
    reply_counts: HashMap<String, i64>,
    /// Latest state of messages being written, including writes not yet committed.
    hot: HashMap<String, versions::HotMessage>,
    /// Open streams: message serial → unix ms of its last append. Loaded on first use.
    open_streams: Option<HashMap<String, i64>>,
    idle_timer: Option<SpawnHandle>,
    /// Cluster mode: when the view was last read from the store, and whether a request used
    /// it since the last periodic check (see [`CLUSTER_VIEW_TTL`]).
    cluster: bool,
    loaded_at: std::time::Instant,
    used: bool,
    /// The members as one shared list for private events, rebuilt when they change.
    shared_recipients: std::cell::RefCell<Option<Arc<[String]>>>,
}

impl ChannelActor {
    pub fn new(
        channel: Channel,
        pool: DbPool,
        persistence: Persistence,
        registry: Arc<Registry>,
    ) -> Self {
        let cluster = registry.cluster().is_some();
        Self {
            last_seq: channel.last_seq,
            channel,
            pool,
            persistence,
            registry,
            in_flight: 0,
            resyncing: false,
            resync_waiters: Vec::new(),
            chain: SeqChain::default(),
            pending_nonces: HashMap::new(),
            reply_counts: HashMap::new(),
            hot: HashMap::new(),
            open_streams: None,
            idle_timer: None,
            cluster,
            loaded_at: std::time::Instant::now(),
            used: false,
            shared_recipients: Default::default(),
        }
    }

    fn direct_id(&self) -> Option<&str> {
        (self.channel.channel_type == ChannelType::Direct).then_some(self.channel.id.as_str())
    }

    /// Who may receive the channel's events (`None`: public), shared between events while the
    /// members stay the same: a stream's appends do not copy the member list each.
    fn recipients(&self) -> Option<Arc<[String]>> {
        if self.channel.is_public() {
            return None;
        }
        let members = &self.channel.members;
        let mut cached = self.shared_recipients.borrow_mut();
        if let Some(list) = cached.as_ref() {
            if list.len() == members.len() && list.iter().eq(members.iter()) {
                return Some(list.clone());
            }
        }
        let list: Arc<[String]> = members.iter().cloned().collect();
        *cached = Some(list.clone());
        Some(list)
    }

    fn draft(&self, event_type: &'static str, payload: serde_json::Value) -> EventDraft {
        EventDraft::new(event_type, payload)
            .channel(&self.channel.id)
            .private_to_shared(self.recipients())
            .live(LiveRoute {
                channel_name: Some(Arc::from(self.channel.name.as_str())),
                except_socket: None,
            })
    }

    fn conn(&self) -> ApiResult<crate::store::PooledConn> {
        Ok(self.pool.get()?)
    }

    fn check_accepting(&self) -> ApiResult<()> {
        if self.resyncing {
            Err(ApiError::backpressure(
                "the channel is recovering from a failed write; retry",
            ))
        } else {
            Ok(())
        }
    }

    fn touch(&mut self, ctx: &mut Context<Self>) {
        if self.cluster {
            self.used = true;
            // Idle past the bound: the periodic check did not refresh it; do it now.
            if self.loaded_at.elapsed() >= CLUSTER_VIEW_TTL {
                // Tried once per bound even when the store is unreachable (writes then wait
                // at the gate, which retries); reads go on with the view they have.
                self.loaded_at = std::time::Instant::now();
                self.refresh(true);
            }
        }
        if let Some(h) = self.idle_timer.take() {
            ctx.cancel_future(h);
        }
        self.idle_timer = Some(ctx.run_later(IDLE_STOP_AFTER, |act, ctx| {
            if act.in_flight == 0 {
                act.registry.remove_channel(&act.channel.id, &ctx.address());
                ctx.stop();
            }
        }));
    }

    /// Hands a write to the persistence actor and settles the in-flight accounting when it
    /// commits or fails.
    fn submit(
        &mut self,
        takes_seq: Option<(i64, i64)>,
        apply: Apply,
        events: Vec<EventDraft>,
    ) -> impl ActorFuture<Self, Output = TypedWriteResult> {
        let write = Write::new(
            self.channel.workspace_id.clone(),
            takes_seq.map(|(a, b)| self.channel_seqs(a, b)),
            apply,
            events,
        );
        self.submit_write(takes_seq, write)
    }

    /// Seqs `first..=last` of this channel, on the current chain.
    fn channel_seqs(&self, first: i64, last: i64) -> ChannelSeqs {
        ChannelSeqs {
            chain: Some(self.chain.clone()),
            ..ChannelSeqs::new(self.channel.id.clone(), first, last)
        }
    }

    /// [`Self::submit`] of a write built by the caller (`takes_seq` as in its `channel_seqs`).
    fn submit_write(
        &mut self,
        takes_seq: Option<(i64, i64)>,
        write: Write,
    ) -> impl ActorFuture<Self, Output = TypedWriteResult> {
        self.in_flight += 1;
        let persistence = self.persistence.clone();
        // Queued here, in handler order, so a later seq never reaches the writer first.
        persistence
            .enqueue_typed(write)
            .into_actor(self)
            .map(move |res, act, _| {
                act.in_flight -= 1;
                if res.is_err() && takes_seq.is_some() {
                    act.resyncing = true;
                }
                if act.resyncing && act.in_flight == 0 {
                    act.reload();
                }
                res
            })
    }

    /// Reloads the channel from the store after a seq-taking write failed (another node may
    /// have written it): its seq, its members and fields; the hot states and the open-stream
    /// view go (uncommitted states may have been refused; another node may have changed
    /// them). Wakes the writes waiting for it either way; `false` when the store failed.
    fn reload(&mut self) -> bool {
        self.hot.clear();
        self.open_streams = None;
        self.reply_counts.clear();
        let loaded = self
            .conn()
            .and_then(|mut c| Ok(queries::channel(&mut c, &self.channel.id)?));
        let ok = match loaded {
            Ok(Some(channel)) => {
                self.loaded_at = std::time::Instant::now();
                self.last_seq = channel.last_seq;
                self.channel = channel;
                self.resyncing = false;
                self.chain = SeqChain::default();
                true
            }
            Ok(None) => {
                log::error!("channel {} is gone from the store", self.channel.id);
                false
            }
            Err(e) => {
                log::warn!("channel {} cannot reload: {e}", self.channel.id);
                false
            }
        };
        for w in self.resync_waiters.drain(..) {
            let _ = w.send(());
        }
        ok
    }

    /// The view may be stale (another node changed the channel): seq-taking writes wait for
    /// a reload, which happens at once when nothing is in flight and `now`, else when the
    /// writes in flight settle (or, lazily, at the next write's gate).
    fn refresh(&mut self, now: bool) {
        self.resyncing = true;
        if now && self.in_flight == 0 {
            self.reload();
        }
    }

    /// Whether a seq-taking write may be prepared now: at once, after the reload in progress
    /// (the receiver fires), or not at all (the store cannot be read).
    fn gate(&mut self) -> Gate {
        if !self.resyncing {
            return Gate::Go;
        }
        if self.in_flight == 0 {
            return if self.reload() {
                Gate::Go
            } else {
                Gate::Fail(ApiError::backpressure("the store is unreachable; retry").retry_after(1))
            };
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.resync_waiters.push(tx);
        Gate::Wait(rx)
    }

    /// Runs `then` (a new attempt of a seq-taking request) once the gate opens.
    fn gated<T: 'static>(
        &mut self,
        then: impl FnOnce(&mut Self) -> ResponseActFuture<Self, ApiResult<T>> + 'static,
    ) -> Option<ResponseActFuture<Self, ApiResult<T>>> {
        match self.gate() {
            Gate::Go => None,
            Gate::Fail(e) => Some(Box::pin(fut::ready(Err(e)))),
            Gate::Wait(rx) => Some(Box::pin(
                rx.into_actor(self).then(move |_, act, _| then(act)),
            )),
        }
    }

    /// After a retryable failure of attempt `attempt`: the next attempt after a random pause
    /// growing with the attempts (two nodes racing for a channel do not meet again at once),
    /// or the error.
    fn retry<T: 'static>(
        &mut self,
        error: WriteError,
        attempt: u32,
        again: impl FnOnce(&mut Self) -> ResponseActFuture<Self, ApiResult<T>> + 'static,
    ) -> ResponseActFuture<Self, ApiResult<T>> {
        if !error.is_retryable() || attempt >= WRITE_ATTEMPTS {
            if error.is_retryable() {
                log::warn!(
                    "channel {}: write refused {attempt} times; the client retries",
                    self.channel.id
                );
            }
            return Box::pin(fut::ready(Err(error.into_api())));
        }
        // Exponential, jittered: 0..4 ms, 0..8 ms, … up to 0..250 ms.
        let cap = (4u64 << (attempt - 1).min(6)).min(250);
        let pause = Duration::from_millis(rand::random::<u64>() % (cap + 1));
        Box::pin(
            actix::clock::sleep(pause)
                .into_actor(self)
                .then(move |_, act, _| again(act)),
        )
    }

    fn existing_message(&self, serial: &str) -> ApiResult<Message> {
        crate::domain::validation::serial(serial)?;
        if let Some(h) = self.hot.get(serial) {
            return Ok(Message::clone(&h.message));
        }
        queries::message(&mut *self.conn()?, &self.channel.id, serial)?
            .ok_or_else(|| ApiError::not_found("message not found"))
    }

    /// The ephemeral `message.summary` of a message (reaction and reply counts), read after
    /// the change committed.
    fn summary_event(&self, message: &Message) -> ApiResult<Arc<Event>> {
        let mut conn = self.conn()?;
        let reactions =
            queries::reaction_counts(&mut conn, &self.channel.id, &message.message_serial)?;
        let reply_count =
            queries::reply_count(&mut conn, &self.channel.id, &message.message_serial)?;
        Ok(Event::build(
            format!("eph_{}", ulid::Ulid::new().to_string().to_lowercase()),
            None,
            "message.summary".into(),
            self.channel.workspace_id.clone(),
            Some(self.channel.id.clone()),
            Some(message.history_serial),
            crate::ids::now_rfc3339(),
            json!({
                "message_id": message.message_serial,
                "reactions": reactions,
                "reply_count": reply_count,
                "direct_conversation_id": self.direct_id(),
            }),
            self.channel.private_recipients(),
        ))
    }
}

impl Actor for ChannelActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(4096);
        self.touch(ctx);
        if self.cluster {
            // A lost notification is outlived by CLUSTER_VIEW_TTL at most (see its doc).
            ctx.run_interval(CLUSTER_VIEW_TTL / 2, |act, _| {
                if act.used && act.loaded_at.elapsed() >= CLUSTER_VIEW_TTL / 2 {
                    act.used = false;
                    act.loaded_at = std::time::Instant::now();
                    act.refresh(true);
                }
            });
        }
    }
}

impl Handler<Refresh> for ChannelActor {
    type Result = ();

    fn handle(&mut self, msg: Refresh, _: &mut Self::Context) {
        self.refresh(msg.now);
    }
}

impl Handler<GetChannel> for ChannelActor {
    type Result = ApiResult<Channel>;

    fn handle(&mut self, msg: GetChannel, ctx: &mut Self::Context) -> Self::Result {
        self.touch(ctx);
        self.channel.check_visible(&msg.viewer)?;
        let mut c = self.channel.clone();
        c.last_seq = self.last_seq;
        Ok(c)
    }
}

impl Handler<PostMessage> for ChannelActor {
    type Result = ResponseActFuture<Self, ApiResult<PostOutcome>>;

    fn handle(&mut self, msg: PostMessage, ctx: &mut Self::Context) -> Self::Result {
        self.touch(ctx);
        self.post(msg, 1)
    }
}

/// Whether a seq-taking write may be prepared now (see [`ChannelActor::gate`]).
enum Gate {
    Go,
    Wait(tokio::sync::oneshot::Receiver<()>),
    Fail(ApiError),
}

impl ChannelActor {
    /// Attempt `attempt` of a post: prepared on the current view, retried on a fresh one
    /// when the writer refuses its seq.
    fn post(
        &mut self,
        msg: PostMessage,
        attempt: u32,
    ) -> ResponseActFuture<Self, ApiResult<PostOutcome>> {
        let again = msg.clone();
        if let Some(waiting) = self.gated(move |act| act.post(again, attempt)) {
            return waiting;
        }
        let again = msg.clone();
        match self.prepare_post(msg) {
            Err(e) => Box::pin(fut::ready(Err(e))),
            Ok(Prepared::Replay(message)) => Box::pin(fut::ready(Ok(PostOutcome {
                message,
                event: None,
                summary: None,
            }))),
            Ok(Prepared::New {
                message,
                apply,
                events,
                rebase,
                nonce_key,
                root,
            }) => {
                let seq = message.history_serial;
                self.hold_hot(Arc::new(message.clone()));
                let mut seqs = self.channel_seqs(seq, seq);
                seqs.rebase = Some(rebase);
                let write =
                    Write::new(self.channel.workspace_id.clone(), Some(seqs), apply, events);
                Box::pin(self.submit_write(Some((seq, seq)), write).then(
                    move |res, act, _| -> ResponseActFuture<Self, ApiResult<PostOutcome>> {
                        if let Some(k) = &nonce_key {
                            act.pending_nonces.remove(k);
                        }
                        act.release_hot(&message.message_serial);
                        match res {
                            Ok(events) => {
                                let committed = events.first().and_then(|e| e.seq);
                                let message = match committed {
                                    // Rebased by the writer: this node's view was stale.
                                    Some(c) if c != message.history_serial => {
                                        act.resyncing = true;
                                        at_seq(message, c)
                                    }
                                    _ => message,
                                };
                                let summary = root.and_then(|r| act.summary_event(&r).ok());
                                Box::pin(fut::ready(Ok(PostOutcome {
                                    message,
                                    event: events.into_iter().next(),
                                    summary,
                                })))
                            }
                            Err(e) => {
                                act.retry(e, attempt, move |act| act.post(again, attempt + 1))
                            }
                        }
                    },
                ))
            }
        }
    }
}

#[allow(clippy::large_enum_variant)]
enum Prepared {
    Replay(Message),
    New {
        message: Message,
        apply: Apply,
        events: Vec<EventDraft>,
        rebase: crate::persistence::Rebase,
        nonce_key: Option<(String, String)>,
        /// The thread root when this is a reply.
        root: Option<Message>,
    },
}

impl ChannelActor {
    fn prepare_post(&mut self, msg: PostMessage) -> ApiResult<Prepared> {
        let now = crate::ids::now_rfc3339();
        let sender = match &msg.author {
            Author::Member(actor) => {
                self.channel.check_can_post(actor, &now)?;
                actor.id.clone()
            }
            Author::Server { client_id } => client_id.clone().unwrap_or_default(),
        };
        self.check_accepting()?;
        msg.input.validate(msg.limits.max_attachments)?;
        let mut conn = self.conn()?;
        let nonce_key = msg.input.nonce.clone().map(|n| (sender.clone(), n));
        if let Some((sender, nonce)) = &nonce_key {
            if self
                .pending_nonces
                .contains_key(&(sender.clone(), nonce.clone()))
            {
                return Err(ApiError::conflict(
                    "a message with this nonce is being written; retry",
                ));
            }
            if let Some(existing) =
                queries::message_by_nonce(&mut conn, &self.channel.id, sender, nonce)?
            {
                return Ok(Prepared::Replay(existing));
            }
        }
        drop(conn);
        let root = match &msg.input.thread_id {
            Some(t) => {
                let root = self
                    .existing_message(t)
                    .map_err(|_| ApiError::not_found("thread root not found"))?;
                if root.thread_id.is_some() {
                    return Err(ApiError::invalid("nested thread replies are not supported"));
                }
                Some(root)
            }
            None => None,
        };
        let seq = self.last_seq + 1;
        let message = msg.input.into_message(&self.channel.id, &sender, seq, &now);
        let reply_count = root.as_ref().map(|root| {
            let count = self
                .reply_counts
                .entry(root.message_serial.clone())
                .or_insert(root.reply_count);
            *count += 1;
            *count
        });
        let parts = PostParts {
            route: self.draft("message.created", json!({})),
            direct_id: self.direct_id().map(str::to_string),
            except_socket: msg.except_socket.as_deref().map(Arc::from),
            workspace_id: self.channel.workspace_id.clone(),
            root: root
                .as_ref()
                .map(|r| (r.message_serial.clone(), r.history_serial)),
        };
        let (apply, events) = parts.build(&message, reply_count);
        self.last_seq = seq;
        if let Some(k) = &nonce_key {
            self.pending_nonces.insert(k.clone(), ());
        }
        // Should another node have taken this seq meanwhile, the writer rebuilds the post on
        // the next free one instead of refusing it (a post builds on no earlier write).
        let (stored, channel_id) = (message.clone(), self.channel.id.clone());
        let rebase: crate::persistence::Rebase = Box::new(move |conn, seq| {
            let message = at_seq(stored, seq);
            let reply_count = match &parts.root {
                Some((root, _)) => Some(queries::reply_count(conn, &channel_id, root)? + 1),
                None => None,
            };
            Ok(parts.build(&message, reply_count))
        });
        Ok(Prepared::New {
            message,
            apply,
            events,
            rebase,
            nonce_key,
            root,
        })
    }
}

/// What a post's write is built from besides its message, so the writer can build it again
/// on another seq (see [`crate::persistence::Rebase`]).
struct PostParts {
    /// A `message.created` draft of this channel: its channel, recipients and live route.
    route: EventDraft,
    direct_id: Option<String>,
    except_socket: Option<Arc<str>>,
    workspace_id: String,
    /// The thread root's serial and history seq when this is a reply.
    root: Option<(String, i64)>,
}

impl PostParts {
    /// The change and events of posting `message` (a reply bumping its root to
    /// `reply_count`).
    fn build(&self, message: &Message, reply_count: Option<i64>) -> (Apply, Vec<EventDraft>) {
        let draft = |event_type: &'static str, payload: serde_json::Value, seq: i64| {
            let mut d = self.route.clone();
            d.event_type = event_type;
            d.payload = payload;
            d.seq(seq)
        };
        let mut created = draft(
            "message.created",
            message.event_payload(self.direct_id.as_deref()),
            message.history_serial,
        );
        created.live.except_socket = self.except_socket.clone();
        let mut events = vec![created];
        if let (Some((root, root_seq)), Some(count)) = (&self.root, reply_count) {
            let sender = &message.sender;
            let common = json!({
                "root_message_id": root,
                "thread_id": root,
                "message_id": message.message_serial,
                "author_id": (!sender.is_empty()).then_some(sender),
                "reply_count": count,
                "last_reply_at": message.created_at,
            });
            events.push(draft("thread.reply_created", common.clone(), *root_seq));
            events.push(draft("thread.state_updated", common, *root_seq));
        }
        let workspace_id = self.workspace_id.clone();
        let stored = message.clone();
        let root_serial = self.root.as_ref().map(|(r, _)| r.clone());
        let apply: Apply = Box::new(move |conn| {
            queries::insert_message(conn, &stored, &workspace_id)?;
            queries::insert_version(
                conn,
                &VersionRow {
                    channel_id: stored.channel_id.clone(),
                    seq: stored.history_serial,
                    message_serial: stored.message_serial.clone(),
                    action: "create".into(),
                    actor: (!stored.sender.is_empty()).then(|| stored.sender.clone()),
                    op_id: None,
                    body: serde_json::to_string(&stored).map_err(ApiError::internal)?,
                    created_at: stored.created_at.clone(),
                    fingerprint: None,
                },
            )?;
            if let Some(r) = &root_serial {
                queries::bump_reply_count(conn, &stored.channel_id, r, &stored.created_at)?;
            }
            Ok(true)
        });
        (apply, events)
    }
}

/// A new message as posted at channel seq `seq` instead.
fn at_seq(mut message: Message, seq: i64) -> Message {
    message.history_serial = seq;
    message.message_serial = crate::ids::message_serial(seq);
    message.version_serial = crate::ids::version_serial(seq);
    message
}

impl Handler<React> for ChannelActor {
    type Result = ResponseActFuture<Self, ApiResult<ReactionOutcome>>;

    fn handle(&mut self, msg: React, ctx: &mut Self::Context) -> Self::Result {
        self.touch(ctx);
        let prepared = (|| {
            let now = crate::ids::now_rfc3339();
            self.channel.check_can_post(&msg.actor, &now)?;
            validate_emoji(&msg.emoji)?;
            let message = self.existing_message(&msg.message_serial)?;
            let event_type = if msg.add {
                "reaction.added"
            } else {
                "reaction.removed"
            };
            let payload = json!({
                "message_id": message.message_serial,
                "emoji": msg.emoji,
                "user_id": msg.actor.id,
                "direct_conversation_id": self.direct_id(),
            });
            let draft = self.draft(event_type, payload).seq(message.history_serial);
            let (channel, serial, who, emoji, add) = (
                self.channel.id.clone(),
                message.message_serial.clone(),
                msg.actor.id.clone(),
                msg.emoji.clone(),
                msg.add,
            );
            let apply: Apply = Box::new(move |conn| {
                let changed = if add {
                    queries::add_reaction(conn, &channel, &serial, &who, &emoji, &now)?
                } else {
                    queries::remove_reaction(conn, &channel, &serial, &who, &emoji)?
                };
                Ok(changed > 0)
            });
            Ok::<_, ApiError>((message, apply, draft))
        })();
        match prepared {
            Err(e) => Box::pin(fut::ready(Err(e))),
            Ok((message, apply, draft)) => Box::pin(self.submit(None, apply, vec![draft]).map(
                move |res, act, _| {
                    let event = res.map_err(WriteError::into_api)?.into_iter().next();
                    let summary = match &event {
                        Some(_) => act.summary_event(&message).ok(),
                        None => None,
                    };
                    Ok(ReactionOutcome {
                        message,
                        event,
                        summary,
                    })
                },
            )),
        }
    }
}

impl Handler<MarkRead> for ChannelActor {
    type Result = ResponseActFuture<Self, ApiResult<ReadOutcome>>;

    fn handle(&mut self, msg: MarkRead, ctx: &mut Self::Context) -> Self::Result {
        self.touch(ctx);
        if let Err(e) = self.channel.check_member(&msg.actor) {
            return Box::pin(fut::ready(Err(e)));
        }
        if msg.seq < 0 {
            return Box::pin(fut::ready(Err(ApiError::invalid(
                "seq must be a non-negative integer",
            ))));
        }
        let seq = msg.seq.min(
            self.channel
                .last_seq
                .max(self.last_seq - self.in_flight as i64)
                .max(0),
        );
        let event_type = if self.channel.channel_type == ChannelType::Direct {
            "dm.read"
        } else {
            "channel.read"
        };
        let draft = EventDraft::new(
            event_type,
            json!({"user_id": msg.actor.id, "channel_id": self.channel.id, "last_read_seq": seq,
                   "direct_conversation_id": self.direct_id()}),
        )
        .channel(&self.channel.id)
        .seq(seq)
        .private_to(Some(vec![msg.actor.id.clone()]));
        let (channel, who) = (self.channel.id.clone(), msg.actor.id.clone());
        let apply: Apply =
            Box::new(move |conn| Ok(queries::advance_read_pointer(conn, &channel, &who, seq)? > 0));
        let (channel, who) = (self.channel.id.clone(), msg.actor.id.clone());
        Box::pin(
            self.submit(None, apply, vec![draft])
                .map(move |res, act, _| {
                    let event = res.map_err(WriteError::into_api)?.into_iter().next();
                    let last_read_seq =
                        queries::last_read_seq(&mut *act.conn()?, &channel, &who)?.unwrap_or(0);
                    Ok(ReadOutcome {
                        last_read_seq,
                        event,
                    })
                }),
        )
    }
}

impl Handler<ChangeMembership> for ChannelActor {
    type Result = AtomicResponse<Self, ApiResult<MembershipOutcome>>;

    fn handle(&mut self, msg: ChangeMembership, ctx: &mut Self::Context) -> Self::Result {
        self.touch(ctx);
        match self.prepare_membership(msg) {
            Err(e) => AtomicResponse::new(Box::pin(fut::ready(Err(e)))),
            Ok(Membership::Unchanged(status)) => {
                let c = self.channel.clone();
                AtomicResponse::new(Box::pin(fut::ready(Ok(MembershipOutcome {
                    channel: c,
                    event: None,
                    status,
                }))))
            }
            Ok(Membership::Write {
                next,
                apply,
                event,
                status,
            }) => AtomicResponse::new(Box::pin(self.submit(None, apply, vec![event]).map(
                move |res, act, _| {
                    let event = res.map_err(WriteError::into_api)?.into_iter().next();
                    if let Some(next) = next {
                        act.channel.members = next.members;
                        act.channel.permissions.modify_members = next.permissions.modify_members;
                        act.channel.updated_at = next.updated_at;
                    }
                    Ok(MembershipOutcome {
                        channel: act.channel.clone(),
                        event,
                        status,
                    })
                },
            ))),
        }
    }
}

#[allow(clippy::large_enum_variant)]
enum Membership {
    Unchanged(&'static str),
    Write {
        next: Option<Channel>,
        apply: Apply,
        event: EventDraft,
        status: &'static str,
    },
}

impl ChannelActor {
    fn target_must_exist(&self, entity_id: &str) -> ApiResult<()> {
        crate::domain::validation::entity_id(entity_id)?;
        match queries::entity(&mut *self.conn()?, &self.channel.workspace_id, entity_id)? {
            Some(e) if e.active => Ok(()),
            _ => Err(ApiError::not_found(format!(
                "entity '{entity_id}' not found"
            ))),
        }
    }

    fn prepare_membership(&mut self, msg: ChangeMembership) -> ApiResult<Membership> {
        let now = crate::ids::now_rfc3339();
        let actor = &msg.actor;
        let c = &self.channel;
        let channel_id = c.id.clone();
        let added = |this: &Self, target: &str, by: &str, approve: bool| -> ApiResult<Membership> {
            let mut next = this.channel.clone();
            next.members.insert(target.to_string());
            next.updated_at = now.clone();
            let event = EventDraft::new(
                "channel.member_added",
                json!({"channel_id": next.id, "entity_id": target, "added_by": by}),
            )
            .channel(&next.id)
            .private_to(next.private_recipients());
            let (cid, t, n) = (next.id.clone(), target.to_string(), now.clone());
            let apply: Apply = Box::new(move |conn| {
                queries::add_member(conn, &cid, &t, &n)?;
                queries::delete_join_request(conn, &cid, &t)?;
                Ok(true)
            });
            let status = if approve {
                "added"
            } else if by == target {
                "joined"
            } else {
                "added"
            };
            Ok(Membership::Write {
                next: Some(next),
                apply,
                event,
                status,
            })
        };
        match msg.change {
            MembershipChange::Join => match c.join(actor)? {
                JoinOutcome::AlreadyMember => Ok(Membership::Unchanged("unchanged")),
                JoinOutcome::Joined => {
                    if c.members.len() >= msg.limits.max_members {
                        return Err(ApiError::limit(format!(
                            "a channel has at most {} members",
                            msg.limits.max_members
                        )));
                    }
                    added(self, &actor.id, &actor.id, false)
                }
                JoinOutcome::Requested => {
                    let event = EventDraft::new(
                        "channel.join_requested",
                        json!({"channel_id": channel_id, "entity_id": actor.id}),
                    )
                    .channel(&channel_id)
                    .private_to(Some(c.permissions.modify_members.clone()));
                    let (cid, who) = (channel_id.clone(), actor.id.clone());
                    let apply: Apply = Box::new(move |conn| {
                        Ok(queries::insert_join_request(conn, &cid, &who, &now)? > 0)
                    });
                    Ok(Membership::Write {
                        next: None,
                        apply,
                        event,
                        status: "requested",
                    })
                }
            },
            MembershipChange::Add(target) => {
                self.target_must_exist(&target)?;
                if self
                    .channel
                    .check_add_member(actor, &target, msg.limits.max_members)?
                {
                    added(self, &target, &actor.id, false)
                } else {
                    Ok(Membership::Unchanged("unchanged"))
                }
            }
            MembershipChange::Approve(target) => {
                crate::domain::validation::entity_id(&target)?;
                c.check_visible(actor)?;
                c.check_modifier(actor)?;
                let pending = queries::join_requests_of(&mut *self.conn()?, &channel_id)?
                    .iter()
                    .any(|(e, _)| e == &target);
                if !pending {
                    return Err(ApiError::not_found("no join request from this entity"));
                }
                self.target_must_exist(&target)?;
                if self
                    .channel
                    .check_add_member(actor, &target, msg.limits.max_members)?
                {
                    added(self, &target, &actor.id, true)
                } else {
                    Ok(Membership::Unchanged("unchanged"))
                }
            }
            MembershipChange::Reject(target) => {
                crate::domain::validation::entity_id(&target)?;
                c.check_visible(actor)?;
                c.check_modifier(actor)?;
                let event = EventDraft::new(
                    "channel.updated",
                    json!({"channel_id": channel_id, "join_request_rejected": target}),
                )
                .channel(&channel_id)
                .private_to(Some(c.permissions.modify_members.clone()));
                let (cid, t) = (channel_id.clone(), target.clone());
                let apply: Apply =
                    Box::new(move |conn| Ok(queries::delete_join_request(conn, &cid, &t)? > 0));
                Ok(Membership::Write {
                    next: None,
                    apply,
                    event,
                    status: "rejected",
                })
            }
            MembershipChange::Leave | MembershipChange::Remove(_) => {
                let target = match &msg.change {
                    MembershipChange::Remove(t) => t.clone(),
                    _ => actor.id.clone(),
                };
                crate::domain::validation::entity_id(&target)?;
                c.check_remove_member(actor, &target)?;
                // Members before the removal hear of it, the removed one included.
                let event = EventDraft::new(
                    "channel.member_removed",
                    json!({"channel_id": channel_id, "entity_id": target, "removed_by": actor.id}),
                )
                .channel(&channel_id)
                .private_to(c.private_recipients());
                let mut next = c.clone();
                next.members.remove(&target);
                next.permissions.modify_members.retain(|m| m != &target);
                next.updated_at = now.clone();
                let (cid, t, row) = (channel_id.clone(), target.clone(), next.clone());
                let apply: Apply = Box::new(move |conn| {
                    queries::remove_member(conn, &cid, &t)?;
                    queries::save_channel(conn, &row)?;
                    Ok(true)
                });
                Ok(Membership::Write {
                    next: Some(next),
                    apply,
                    event,
                    status: "removed",
                })
            }
        }
    }
}

impl Handler<PatchChannel> for ChannelActor {
    type Result = AtomicResponse<Self, ApiResult<(Channel, Option<Arc<Event>>)>>;

    fn handle(&mut self, msg: PatchChannel, ctx: &mut Self::Context) -> Self::Result {
        self.touch(ctx);
        let now = crate::ids::now_rfc3339();
        let next = match msg.patch.apply(&self.channel, &msg.actor, &now) {
            Ok(n) => n,
            Err(e) => return AtomicResponse::new(Box::pin(fut::ready(Err(e)))),
        };
        let event = EventDraft::new(
            "channel.updated",
            serde_json::to_value(&next).unwrap_or_default(),
        )
        .channel(&next.id)
        .private_to(next.private_recipients());
        let row = next.clone();
        let apply: Apply = Box::new(move |conn| {
            if let Some(other) = queries::channel_id_by_name(conn, &row.workspace_id, &row.name)? {
                if other != row.id {
                    return Err(ApiError::conflict(
                        "a channel with this name already exists",
                    ));
                }
            }
            queries::save_channel(conn, &row)?;
            Ok(true)
        });
        AtomicResponse::new(Box::pin(self.submit(None, apply, vec![event]).map(
            move |res, act, _| {
                let event = res.map_err(WriteError::into_api)?.into_iter().next();
                let members = std::mem::take(&mut act.channel.members);
                act.channel = Channel {
                    members,
                    last_seq: act.channel.last_seq,
                    ..next
                };
                Ok((act.channel.clone(), event))
            },
        )))
    }
}
