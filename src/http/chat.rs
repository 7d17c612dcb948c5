//! The chat API under `/api` (SPEC §3): members, channels, messages, reactions, reads.

use actix_web::http::StatusCode;
use actix_web::{web, HttpResponse};
use serde::Deserialize;
use serde_json::{json, Value};
use switchboard_actors::channel::{
    Author, ChangeMembership, ChannelLimits, GetChannel, MarkRead, MembershipChange, MutationActor,
    PatchChannel, PostMessage, React,
};
use switchboard_actors::domain::channel::{
    new_direct, Channel, ChannelPatch, GroupLimits, NewGroup,
};
use switchboard_actors::domain::entity::{Entity, Role};
use switchboard_actors::domain::event::{Event, EventDraft};
use switchboard_actors::domain::message::NewMessage;
use switchboard_actors::domain::versioned::MutationBody;
use switchboard_actors::error::{ApiError, ApiResult};
use switchboard_actors::persistence::Write;
use switchboard_actors::store::queries;
use switchboard_actors::workspace::CloseEntity;
use switchboard_actors::{error::close_code, ids};

use super::auth::Caller;
use super::error::HttpResult;
use super::prefer::{self, ReturnPreference};
use super::{json, versions, State};

pub fn routes(cfg: &mut web::ServiceConfig) {
    // The router tries resources in this order, matching each dynamic path with a regex:
    // the hot ones (posting, streaming appends) come first. Among the message routes, the
    // fixed names (`reactions`) must stay before `{action}`, which would take them.
    cfg.route("/channels/{id}/messages", web::post().to(post_message))
        .route(
            "/channels/{id}/messages/{serial}/reactions",
            web::post().to(add_reaction),
        )
        .route(
            "/channels/{id}/messages/{serial}/{action}",
            web::post().to(mutate_message),
        )
        .route("/channels/{id}/read", web::post().to(mark_read))
        .route("/me", web::get().to(me))
        .route("/members", web::get().to(list_members))
        .route("/members/{entity_id}", web::patch().to(moderate_member))
        .route("/channels", web::get().to(list_channels))
        .route("/channels", web::post().to(create_group))
        .route("/direct-channels", web::post().to(open_direct))
        .route("/channels/{id}", web::get().to(get_channel))
        .route("/channels/{id}", web::patch().to(patch_channel))
        .route("/channels/{id}/join", web::post().to(join))
        .route("/channels/{id}/leave", web::post().to(leave))
        .route("/channels/{id}/members", web::post().to(add_member))
        .route(
            "/channels/{id}/members/{entity_id}",
            web::delete().to(remove_member),
        )
        .route(
            "/channels/{id}/join-requests",
            web::get().to(list_join_requests),
        )
        .route(
            "/channels/{id}/join-requests/{entity_id}/approve",
            web::post().to(approve),
        )
        .route(
            "/channels/{id}/join-requests/{entity_id}/reject",
            web::post().to(reject),
        )
        .route("/channels/{id}/messages", web::get().to(list_messages))
        .route(
            "/channels/{id}/messages/{serial}",
            web::get().to(get_message),
        )
        .route(
            "/channels/{id}/messages/{serial}/thread",
            web::get().to(get_thread),
        )
        .route(
            "/channels/{id}/messages/{serial}/versions",
            web::get().to(list_versions),
        )
        .route(
            "/channels/{id}/messages/{serial}/reactions/{emoji}",
            web::delete().to(remove_reaction),
        );
}

/// `{[message, ]event[, status]}` written straight to text: the event is already a JSON
/// frame, so it is embedded as is (this is the answer to every post and every streamed
/// append). No message under `Prefer: return=minimal`.
fn message_and_event(
    message: Option<&switchboard_actors::domain::message::Message>,
    event: &Option<std::sync::Arc<Event>>,
    status: Option<&str>,
) -> ApiResult<String> {
    let mut body = String::from("{");
    if let Some(m) = message {
        body.push_str("\"message\":");
        body.push_str(&serde_json::to_string(m).map_err(ApiError::internal)?);
        body.push(',');
    }
    body.push_str("\"event\":");
    body.push_str(event.as_ref().map_or("null", |e| &e.frame));
    if let Some(s) = status {
        body.push_str(",\"status\":");
        body.push_str(&serde_json::to_string(s).map_err(ApiError::internal)?);
    }
    body.push('}');
    Ok(body)
}

fn raw_json(status: StatusCode, body: String) -> HttpResponse {
    HttpResponse::build(status)
        .content_type("application/json")
        .body(body)
}

fn event_json(e: &Option<std::sync::Arc<Event>>) -> Value {
    e.as_ref().map(|e| e.to_json()).unwrap_or(Value::Null)
}

fn limits(caller: &Caller) -> ChannelLimits {
    let s = &caller.workspace.settings;
    ChannelLimits {
        max_members: s.max_channel_members,
        max_attachments: s.max_attachments,
    }
}

/// `limit` of list endpoints: 1..=200, default 100.
fn page_limit(limit: Option<i64>) -> ApiResult<i64> {
    match limit {
        None => Ok(100),
        Some(l) if (1..=200).contains(&l) => Ok(l),
        Some(_) => Err(ApiError::invalid("limit must be 1..200")),
    }
}

/// A channel's JSON with the caller's read pointer and unread count.
async fn channel_view(state: &State, channel: Channel, viewer: &str) -> ApiResult<Value> {
    let (cid, who) = (channel.id.clone(), viewer.to_string());
    let (last_read, unread) = state
        .read(move |conn| {
            let last_read = queries::last_read_seq(conn, &cid, &who)?.unwrap_or(0);
            let unread = queries::count_messages_after(conn, &cid, last_read)?;
            Ok((last_read, unread))
        })
        .await?;
    let mut v = serde_json::to_value(&channel).map_err(ApiError::internal)?;
    v["last_read_seq"] = json!(last_read);
    v["unread_count"] = json!(unread);
    Ok(v)
}

async fn me(caller: Caller) -> HttpResult<HttpResponse> {
    let w = &caller.workspace;
    Ok(json(
        StatusCode::OK,
        &json!({"entity": caller.entity, "workspace": {"id": w.id, "name": w.name, "key": w.key}}),
    ))
}

#[derive(Deserialize)]
struct MembersQuery {
    q: Option<String>,
    limit: Option<i64>,
    cursor: Option<String>,
}

async fn list_members(
    state: State,
    caller: Caller,
    q: web::Query<MembersQuery>,
) -> HttpResult<HttpResponse> {
    let q = q.into_inner();
    let limit = page_limit(q.limit)?;
    let ws = caller.workspace.id.clone();
    let members = state
        .read(move |conn| {
            Ok(queries::list_entities(
                conn,
                &ws,
                q.q.as_deref(),
                q.cursor.as_deref(),
                limit,
            )?)
        })
        .await?;
    let next = (members.len() as i64 == limit)
        .then(|| members.last().map(|m| m.id.clone()))
        .flatten();
    Ok(json(
        StatusCode::OK,
        &json!({"members": members, "next_cursor": next}),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Moderation {
    role: Option<String>,
    timeout_minutes: Option<i64>,
    blocked: Option<bool>,
}

async fn moderate_member(
    state: State,
    caller: Caller,
    path: web::Path<String>,
    body: web::Json<Moderation>,
) -> HttpResult<HttpResponse> {
    let target_id = path.into_inner();
    let body = body.into_inner();
    let ws = caller.workspace.id.clone();
    let tid = target_id.clone();
    let (target, moderators) = state
        .read(move |conn| {
            let t = queries::entity(conn, &ws, &tid)?.filter(|e| e.active);
            Ok((t, queries::moderator_ids(conn, &ws)?))
        })
        .await?;
    let target = target.ok_or_else(|| ApiError::not_found("member not found"))?;
    caller.entity.check_can_moderate(&target)?;
    let next = apply_moderation(&caller.entity, target, body)?;
    let mut recipients = moderators;
    recipients.push(next.id.clone());
    recipients.sort();
    recipients.dedup();
    let event = EventDraft::new(
        "member.moderation_updated",
        json!({"user_id": next.id, "role": next.role, "timeout_until": next.timeout_until, "blocked": next.blocked,
               "moderated_by": caller.entity.id}),
    )
    .private_to(Some(recipients));
    let row = next.clone();
    let events = state
        .persistence
        .write(Write {
            workspace_id: caller.workspace.id.clone(),
            channel_seqs: None,
            apply: Box::new(move |conn| {
                queries::save_entity(conn, &row)?;
                Ok(true)
            }),
            events: vec![event],
            version: None,
            savepoint: true,
        })
        .await?;
    state.auth_cache.clear();
    if next.blocked {
        close_sessions_of(&state, &caller.workspace.id, &next.id, "blocked");
    }
    Ok(json(
        StatusCode::OK,
        &json!({"entity": next, "event": event_json(&events.into_iter().next())}),
    ))
}

fn apply_moderation(actor: &Entity, mut target: Entity, m: Moderation) -> ApiResult<Entity> {
    if m.role.is_none() && m.timeout_minutes.is_none() && m.blocked.is_none() {
        return Err(ApiError::invalid(
            "nothing to change: give role, timeout_minutes or blocked",
        ));
    }
    if let Some(r) = m.role {
        let role = Role::parse(&r)?;
        if role == Role::Owner && actor.role != Role::Owner {
            return Err(ApiError::forbidden("only an owner may make an owner"));
        }
        target.role = role;
    }
    if let Some(minutes) = m.timeout_minutes {
        if !(0..=525_600).contains(&minutes) {
            return Err(ApiError::invalid("timeout_minutes must be 0..525600"));
        }
        target.timeout_until = (minutes > 0)
            .then(|| ids::to_rfc3339(chrono::Utc::now() + chrono::Duration::minutes(minutes)));
    }
    if let Some(b) = m.blocked {
        target.blocked = b;
    }
    target.updated_at = ids::now_rfc3339();
    Ok(target)
}

/// Closes every realtime socket of an entity (blocked or deactivated): 1008.
pub fn close_sessions_of(state: &State, workspace_id: &str, entity_id: &str, reason: &'static str) {
    if let Some(w) = state.registry.running_workspace(workspace_id) {
        w.do_send(CloseEntity {
            entity_id: entity_id.to_string(),
            code: close_code::POLICY,
            reason,
        });
    }
}

#[derive(Deserialize)]
struct ListQuery {
    limit: Option<i64>,
    cursor: Option<String>,
}

async fn list_channels(
    state: State,
    caller: Caller,
    q: web::Query<ListQuery>,
) -> HttpResult<HttpResponse> {
    let limit = page_limit(q.limit)?;
    let (ws, who, guest, after) = (
        caller.workspace.id.clone(),
        caller.entity.id.clone(),
        caller.entity.is_guest(),
        q.cursor.clone(),
    );
    let rows = state
        .read(move |conn| {
            let ids =
                queries::visible_channel_ids(conn, &ws, &who, !guest, after.as_deref(), limit)?;
            Ok(queries::channels_with_reads(conn, &ids, &who)?)
        })
        .await?;
    let next = (rows.len() as i64 == limit)
        .then(|| rows.last().map(|(c, _, _)| c.id.clone()))
        .flatten();
    let channels: Vec<Value> = rows
        .into_iter()
        .map(|(c, r, u)| {
            let mut v = serde_json::to_value(&c).unwrap_or_default();
            v["last_read_seq"] = json!(r);
            v["unread_count"] = json!(u);
            v
        })
        .collect();
    Ok(json(
        StatusCode::OK,
        &json!({"channels": channels, "next_cursor": next}),
    ))
}

/// Commits a new channel with its `channel.created` event; `conflict` if the name is taken.
async fn insert_channel(
    state: &State,
    channel: Channel,
) -> ApiResult<Option<std::sync::Arc<Event>>> {
    let event = EventDraft::new(
        "channel.created",
        serde_json::to_value(&channel).map_err(ApiError::internal)?,
    )
    .channel(&channel.id)
    .private_to(channel.private_recipients());
    let row = channel.clone();
    let events = state
        .persistence
        .write(Write {
            workspace_id: channel.workspace_id.clone(),
            channel_seqs: None,
            apply: Box::new(move |conn| {
                if queries::channel_id_by_name(conn, &row.workspace_id, &row.name)?.is_some() {
                    return Err(ApiError::conflict(
                        "a channel with this name already exists",
                    ));
                }
                queries::insert_channel(conn, &row)?;
                Ok(true)
            }),
            events: vec![event],
            version: None,
            savepoint: true,
        })
        .await?;
    Ok(events.into_iter().next())
}

async fn create_group(
    state: State,
    caller: Caller,
    body: web::Json<NewGroup>,
) -> HttpResult<HttpResponse> {
    let now = ids::now_rfc3339();
    let s = &caller.workspace.settings;
    let limits = GroupLimits {
        min_members: s.min_group_members,
        max_members: s.max_channel_members,
    };
    let channel = body.into_inner().into_channel(
        ids::new_channel_id(),
        caller.workspace.id.clone(),
        &caller.entity,
        &limits,
        &now,
    )?;
    caller.entity.check_can_write(&now)?;
    let (ws, members): (String, Vec<String>) = (
        caller.workspace.id.clone(),
        channel.members.iter().cloned().collect(),
    );
    let missing = state
        .read(move |conn| {
            for m in members {
                if !queries::entity(conn, &ws, &m)?.is_some_and(|e| e.active) {
                    return Ok(Some(m));
                }
            }
            Ok(None)
        })
        .await?;
    if let Some(m) = missing {
        return Err(ApiError::not_found(format!("member '{m}' not found")).into());
    }
    let event = insert_channel(&state, channel.clone()).await?;
    let view = channel_view(&state, channel, &caller.entity.id).await?;
    Ok(json(
        StatusCode::CREATED,
        &json!({"channel": view, "event": event_json(&event)}),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OpenDirect {
    entity_id: String,
}

async fn open_direct(
    state: State,
    caller: Caller,
    body: web::Json<OpenDirect>,
) -> HttpResult<HttpResponse> {
    let now = ids::now_rfc3339();
    let channel = new_direct(
        ids::new_channel_id(),
        caller.workspace.id.clone(),
        &caller.entity,
        &body.entity_id,
        &now,
    )?;
    caller.entity.check_can_write(&now)?;
    let (ws, other, name) = (
        caller.workspace.id.clone(),
        body.entity_id.clone(),
        channel.name.clone(),
    );
    let lookup = {
        let (ws, name) = (ws.clone(), name.clone());
        move |conn: &mut switchboard_actors::store::PooledConn| -> ApiResult<Option<Channel>> {
            match queries::channel_id_by_name(conn, &ws, &name)? {
                Some(id) => Ok(queries::channel(conn, &id)?),
                None => Ok(None),
            }
        }
    };
    let other_exists = state
        .read(move |conn| Ok(queries::entity(conn, &ws, &other)?.is_some_and(|e| e.active)))
        .await?;
    if !other_exists {
        return Err(ApiError::not_found("entity not found").into());
    }
    if let Some(existing) = state.read(lookup.clone()).await? {
        let view = channel_view(&state, existing, &caller.entity.id).await?;
        return Ok(json(
            StatusCode::OK,
            &json!({"channel": view, "event": null}),
        ));
    }
    match insert_channel(&state, channel.clone()).await {
        Ok(event) => {
            let view = channel_view(&state, channel, &caller.entity.id).await?;
            Ok(json(
                StatusCode::CREATED,
                &json!({"channel": view, "event": event_json(&event)}),
            ))
        }
        // Created concurrently by the other member: answer with that one.
        Err(e) if e.code == switchboard_actors::error::ErrorCode::Conflict => {
            let existing = state.read(lookup).await?.ok_or(e)?;
            let view = channel_view(&state, existing, &caller.entity.id).await?;
            Ok(json(
                StatusCode::OK,
                &json!({"channel": view, "event": null}),
            ))
        }
        Err(e) => Err(e.into()),
    }
}

async fn get_channel(
    state: State,
    caller: Caller,
    path: web::Path<String>,
) -> HttpResult<HttpResponse> {
    let channel = state
        .ask_channel(
            &caller.workspace.id,
            &path,
            GetChannel {
                viewer: caller.entity.clone(),
            },
        )
        .await??;
    let view = channel_view(&state, channel, &caller.entity.id).await?;
    Ok(json(StatusCode::OK, &json!({"channel": view})))
}

async fn patch_channel(
    state: State,
    caller: Caller,
    path: web::Path<String>,
    body: web::Json<ChannelPatch>,
) -> HttpResult<HttpResponse> {
    caller.entity.check_can_write(&ids::now_rfc3339())?;
    let (channel, event) = state
        .ask_channel(
            &caller.workspace.id,
            &path,
            PatchChannel {
                actor: caller.entity.clone(),
                patch: body.into_inner(),
            },
        )
        .await??;
    // The name may have changed: the server API reads this workspace's names again.
    state.channel_names.forget_workspace(&caller.workspace.id);
    let view = channel_view(&state, channel, &caller.entity.id).await?;
    Ok(json(
        StatusCode::OK,
        &json!({"channel": view, "event": event_json(&event)}),
    ))
}

async fn membership(
    state: State,
    caller: Caller,
    id: &str,
    change: MembershipChange,
) -> HttpResult<HttpResponse> {
    caller.entity.check_can_write(&ids::now_rfc3339())?;
    let out = state
        .ask_channel(
            &caller.workspace.id,
            id,
            ChangeMembership {
                actor: caller.entity.clone(),
                change,
                limits: limits(&caller),
            },
        )
        .await??;
    let view = channel_view(&state, out.channel, &caller.entity.id).await?;
    Ok(json(
        StatusCode::OK,
        &json!({"channel": view, "event": event_json(&out.event), "status": out.status}),
    ))
}

async fn join(state: State, caller: Caller, path: web::Path<String>) -> HttpResult<HttpResponse> {
    membership(state, caller, &path, MembershipChange::Join).await
}

async fn leave(state: State, caller: Caller, path: web::Path<String>) -> HttpResult<HttpResponse> {
    membership(state, caller, &path, MembershipChange::Leave).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EntityRef {
    entity_id: String,
}

async fn add_member(
    state: State,
    caller: Caller,
    path: web::Path<String>,
    body: web::Json<EntityRef>,
) -> HttpResult<HttpResponse> {
    membership(
        state,
        caller,
        &path,
        MembershipChange::Add(body.into_inner().entity_id),
    )
    .await
}

async fn remove_member(
    state: State,
    caller: Caller,
    path: web::Path<(String, String)>,
) -> HttpResult<HttpResponse> {
    let (id, entity) = path.into_inner();
    membership(state, caller, &id, MembershipChange::Remove(entity)).await
}

async fn approve(
    state: State,
    caller: Caller,
    path: web::Path<(String, String)>,
) -> HttpResult<HttpResponse> {
    let (id, entity) = path.into_inner();
    membership(state, caller, &id, MembershipChange::Approve(entity)).await
}

async fn reject(
    state: State,
    caller: Caller,
    path: web::Path<(String, String)>,
) -> HttpResult<HttpResponse> {
    let (id, entity) = path.into_inner();
    membership(state, caller, &id, MembershipChange::Reject(entity)).await
}

async fn list_join_requests(
    state: State,
    caller: Caller,
    path: web::Path<String>,
) -> HttpResult<HttpResponse> {
    let channel = state
        .ask_channel(
            &caller.workspace.id,
            &path,
            GetChannel {
                viewer: caller.entity.clone(),
            },
        )
        .await??;
    channel.check_modifier(&caller.entity)?;
    let cid = channel.id.clone();
    let rows = state
        .read(move |conn| Ok(queries::join_requests_of(conn, &cid)?))
        .await?;
    let list: Vec<Value> = rows
        .into_iter()
        .map(|(e, at)| json!({"entity_id": e, "created_at": at}))
        .collect();
    Ok(json(StatusCode::OK, &json!({"join_requests": list})))
}

async fn post_message(
    state: State,
    caller: Caller,
    path: web::Path<String>,
    body: web::Json<NewMessage>,
) -> HttpResult<HttpResponse> {
    let out = state
        .ask_channel(
            &caller.workspace.id,
            &path,
            PostMessage {
                author: Author::Member(caller.entity.clone()),
                input: body.into_inner(),
                limits: limits(&caller),
                except_socket: None,
            },
        )
        .await??;
    if let Some(summary) = out.summary {
        state.broker.publish_ephemeral(summary);
    }
    let status = if out.event.is_some() {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(raw_json(
        status,
        message_and_event(Some(&out.message), &out.event, None)?,
    ))
}

/// Checks the caller may read the channel; returns it.
async fn readable(state: &State, caller: &Caller, id: &str) -> ApiResult<Channel> {
    state
        .ask_channel(
            &caller.workspace.id,
            id,
            GetChannel {
                viewer: caller.entity.clone(),
            },
        )
        .await?
}

#[derive(Deserialize)]
struct MessagesQuery {
    after_seq: Option<i64>,
    before_seq: Option<i64>,
    limit: Option<i64>,
}

async fn list_messages(
    state: State,
    caller: Caller,
    path: web::Path<String>,
    q: web::Query<MessagesQuery>,
) -> HttpResult<HttpResponse> {
    let limit = page_limit(q.limit)?;
    if q.after_seq.is_some() && q.before_seq.is_some() {
        return Err(ApiError::invalid("after_seq and before_seq exclude each other").into());
    }
    let channel = readable(&state, &caller, &path).await?;
    let (cid, after, before) = (channel.id.clone(), q.after_seq, q.before_seq);
    let messages = state
        .read(move |conn| Ok(queries::list_roots(conn, &cid, after, before, limit)?))
        .await?;
    let next = if messages.len() as i64 == limit {
        match before {
            Some(_) => messages.first().map(|m| m.history_serial.to_string()),
            None => messages.last().map(|m| m.history_serial.to_string()),
        }
    } else {
        None
    };
    Ok(json(
        StatusCode::OK,
        &json!({"messages": messages, "next_cursor": next}),
    ))
}

async fn get_message(
    state: State,
    caller: Caller,
    path: web::Path<(String, String)>,
) -> HttpResult<HttpResponse> {
    let (id, serial) = path.into_inner();
    switchboard_actors::domain::validation::serial(&serial)?;
    let channel = readable(&state, &caller, &id).await?;
    let (cid, who) = (channel.id.clone(), caller.entity.id.clone());
    let (message, reactions) = state
        .read(move |conn| {
            let m = queries::message(conn, &cid, &serial)?
                .ok_or_else(|| ApiError::not_found("message not found"))?;
            let r = queries::reaction_summary(conn, &cid, &m.message_serial, &who)?;
            Ok((m, r))
        })
        .await?;
    let mut v = serde_json::to_value(&message).map_err(ApiError::internal)?;
    v["reactions"] = reactions;
    Ok(json(StatusCode::OK, &json!({"message": v})))
}

#[derive(Deserialize)]
struct ThreadQuery {
    after_seq: Option<i64>,
    limit: Option<i64>,
}

async fn get_thread(
    state: State,
    caller: Caller,
    path: web::Path<(String, String)>,
    q: web::Query<ThreadQuery>,
) -> HttpResult<HttpResponse> {
    let (id, serial) = path.into_inner();
    let limit = page_limit(q.limit)?;
    let channel = readable(&state, &caller, &id).await?;
    let (cid, after) = (channel.id.clone(), q.after_seq.unwrap_or(0));
    let (root, replies) = state
        .read(move |conn| {
            let root = queries::message(conn, &cid, &serial)?
                .ok_or_else(|| ApiError::not_found("message not found"))?;
            if root.thread_id.is_some() {
                return Err(ApiError::invalid(
                    "this message is a reply, not a thread root",
                ));
            }
            let replies = queries::thread_replies(conn, &cid, &root.message_serial, after, limit)?;
            Ok((root, replies))
        })
        .await?;
    let next = (replies.len() as i64 == limit)
        .then(|| replies.last().map(|m| m.history_serial.to_string()))
        .flatten();
    Ok(json(
        StatusCode::OK,
        &json!({"root": root, "replies": replies, "next_cursor": next}),
    ))
}

async fn list_versions(
    state: State,
    caller: Caller,
    path: web::Path<(String, String)>,
    q: web::Query<versions::PageQuery>,
) -> HttpResult<HttpResponse> {
    let (id, serial) = path.into_inner();
    let settings = &caller.workspace.settings;
    let page = versions::page(
        &q,
        settings.versioned_messages.max_page_size,
        ids::parse_version_serial,
    )?;
    let channel = readable(&state, &caller, &id).await?;
    versions::check_enabled(settings)?;
    let listing =
        versions::list_versions(&state, &channel.id, &channel.name, &serial, &page).await?;
    Ok(json(
        StatusCode::OK,
        &json!({"versions": listing.items, "next_cursor": listing.next_cursor,
                "has_more": listing.has_more}),
    ))
}

/// `POST /api/channels/{id}/messages/{serial}/update|delete|append`.
async fn mutate_message(
    state: State,
    caller: Caller,
    path: web::Path<(String, String, String)>,
    body: web::Json<MutationBody>,
    prefer: ReturnPreference,
) -> HttpResult<HttpResponse> {
    let (id, serial, action) = path.into_inner();
    let action = versions::parse_action(&action)?;
    let actor = MutationActor::Member {
        entity: caller.entity.clone(),
        capabilities: caller.capabilities(),
    };
    let mut body = body.into_inner();
    // The caller is the token's entity; connection binding is a server-API matter.
    body.socket_id = None;
    body.client_id = None;
    let out = versions::mutate(
        &state,
        &caller.workspace.id,
        &id,
        actor,
        serial,
        action,
        body,
        &caller.workspace.settings,
    )
    .await?;
    let status = versions::status_word(&out);
    if prefer.minimal {
        let mut answer = raw_json(
            StatusCode::OK,
            message_and_event(None, &out.event, Some(status))?,
        );
        answer
            .headers_mut()
            .insert(prefer::PREFERENCE_APPLIED, prefer::RETURN_MINIMAL);
        return Ok(answer);
    }
    Ok(raw_json(
        StatusCode::OK,
        message_and_event(Some(&out.message), &out.event, Some(status))?,
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReactionBody {
    emoji: String,
}

async fn react(
    state: State,
    caller: Caller,
    id: String,
    serial: String,
    emoji: String,
    add: bool,
) -> HttpResult<HttpResponse> {
    let out = state
        .ask_channel(
            &caller.workspace.id,
            &id,
            React {
                actor: caller.entity.clone(),
                message_serial: serial,
                emoji,
                add,
            },
        )
        .await??;
    if let Some(summary) = out.summary.clone() {
        state.broker.publish_ephemeral(summary);
    }
    let (cid, s, who) = (
        out.message.channel_id.clone(),
        out.message.message_serial.clone(),
        caller.entity.id.clone(),
    );
    let reactions = state
        .read(move |conn| Ok(queries::reaction_summary(conn, &cid, &s, &who)?))
        .await?;
    let status = if add && out.event.is_some() {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(json(
        status,
        &json!({"message_id": out.message.message_serial, "reactions": reactions, "event": event_json(&out.event)}),
    ))
}

async fn add_reaction(
    state: State,
    caller: Caller,
    path: web::Path<(String, String)>,
    body: web::Json<ReactionBody>,
) -> HttpResult<HttpResponse> {
    let (id, serial) = path.into_inner();
    react(state, caller, id, serial, body.into_inner().emoji, true).await
}

async fn remove_reaction(
    state: State,
    caller: Caller,
    path: web::Path<(String, String, String)>,
) -> HttpResult<HttpResponse> {
    let (id, serial, emoji) = path.into_inner();
    react(state, caller, id, serial, emoji, false).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReadBody {
    seq: i64,
}

async fn mark_read(
    state: State,
    caller: Caller,
    path: web::Path<String>,
    body: web::Json<ReadBody>,
) -> HttpResult<HttpResponse> {
    let out = state
        .ask_channel(
            &caller.workspace.id,
            &path,
            MarkRead {
                actor: caller.entity.clone(),
                seq: body.seq,
            },
        )
        .await??;
    Ok(json(
        StatusCode::OK,
        &json!({"channel_id": path.into_inner(), "last_read_seq": out.last_read_seq, "event": event_json(&out.event)}),
    ))
}
