//! One function per query. Writers are called only by the persistence actor (one writer);
//! readers run on pooled connections.

use std::collections::BTreeSet;

use diesel::prelude::*;

use super::rows::*;
use super::schema::*;
use super::{on_engine, Conn};
use crate::domain::channel::Channel;
use crate::domain::entity::Entity;
use crate::domain::message::Message;

diesel::define_sql_function! {
    /// `lower(text)`, in both dialects.
    fn lower(x: diesel::sql_types::Text) -> diesel::sql_types::Text;
}

// ---- workspaces ----

pub fn insert_workspace(conn: &mut Conn, row: &WorkspaceRow) -> QueryResult<usize> {
    diesel::insert_into(workspaces::table)
        .values(row)
        .execute(conn)
}

pub fn workspace_by_id(conn: &mut Conn, id: &str) -> QueryResult<Option<Workspace>> {
    workspaces::table
        .find(id)
        .select(WorkspaceRow::as_select())
        .first(conn)
        .optional()
        .map(|r| r.map(Workspace::from))
}

pub fn workspace_by_key(conn: &mut Conn, key: &str) -> QueryResult<Option<Workspace>> {
    workspaces::table
        .filter(workspaces::app_key.eq(key))
        .select(WorkspaceRow::as_select())
        .first(conn)
        .optional()
        .map(|r| r.map(Workspace::from))
}

pub fn list_workspaces(conn: &mut Conn) -> QueryResult<Vec<Workspace>> {
    workspaces::table
        .order(workspaces::created_at)
        .select(WorkspaceRow::as_select())
        .load(conn)
        .map(|v| v.into_iter().map(Workspace::from).collect())
}

pub fn update_workspace_settings(conn: &mut Conn, id: &str, settings: &str) -> QueryResult<usize> {
    diesel::update(workspaces::table.find(id))
        .set(workspaces::settings.eq(settings))
        .execute(conn)
}

/// Cursor position of a workspace: (last committed cursor, highest pruned cursor).
pub fn workspace_cursor_state(conn: &mut Conn, id: &str) -> QueryResult<(i64, i64)> {
    on_engine!(conn, |c| workspaces::table
        .find(id)
        .select((workspaces::last_cursor, workspaces::pruned_through))
        .first(c))
}

/// Allocates `n` cursors for a workspace inside the caller's transaction; returns the first.
pub fn allocate_cursors(conn: &mut Conn, workspace_id: &str, n: i64) -> QueryResult<i64> {
    let last: i64 = diesel::update(workspaces::table.find(workspace_id))
        .set(workspaces::last_cursor.eq(workspaces::last_cursor + n))
        .returning(workspaces::last_cursor)
        .get_result(conn)?;
    Ok(last - n + 1)
}

/// Records the last cursor a batch allocated (inside the write transaction).
pub fn set_workspace_last_cursor(conn: &mut Conn, id: &str, last: i64) -> QueryResult<usize> {
    // Once per batch: a fixed statement, prepared once (see `fixed`).
    on_engine!(conn, |c| super::fixed::SetWorkspaceLastCursor(&(id, last))
        .execute(c))
}

// ---- entities ----

pub fn insert_entity(conn: &mut Conn, e: &Entity) -> QueryResult<usize> {
    diesel::insert_into(entities::table)
        .values(EntityRow::from(e))
        .execute(conn)
}

pub fn save_entity(conn: &mut Conn, e: &Entity) -> QueryResult<usize> {
    diesel::update(entities::table.find((&e.workspace_id, &e.id)))
        .set(EntityRow::from(e))
        .execute(conn)
}

pub fn entity(conn: &mut Conn, workspace_id: &str, id: &str) -> QueryResult<Option<Entity>> {
    entities::table
        .find((workspace_id, id))
        .select(EntityRow::as_select())
        .first(conn)
        .optional()
        .map(|r| r.map(Entity::from))
}

/// Active entities, filtered by a substring of id or name, paged by id.
pub fn list_entities(
    conn: &mut Conn,
    workspace_id: &str,
    q: Option<&str>,
    after_id: Option<&str>,
    limit: i64,
) -> QueryResult<Vec<Entity>> {
    let mut query = entities::table
        .filter(entities::workspace_id.eq(workspace_id))
        .filter(entities::active.eq(true))
        .into_boxed();
    if let Some(q) = q.filter(|q| !q.is_empty()) {
        let escaped = q
            .replace('\\', "\\\\")
            .replace('%', "\\%")
            .replace('_', "\\_");
        let pattern = format!("%{escaped}%");
        query = if conn.is_postgres() {
            // SQLite's LIKE ignores ASCII case; PostgreSQL's does not.
            let pattern = pattern.to_lowercase();
            query.filter(
                lower(entities::id)
                    .like(pattern.clone())
                    .escape('\\')
                    .or(lower(entities::name).like(pattern).escape('\\')),
            )
        } else {
            query.filter(
                entities::id
                    .like(pattern.clone())
                    .escape('\\')
                    .or(entities::name.like(pattern).escape('\\')),
            )
        };
    }
    if let Some(a) = after_id {
        query = query.filter(entities::id.gt(a.to_string()));
    }
    query
        .order(entities::id)
        .limit(limit)
        .select(EntityRow::as_select())
        .load(conn)
        .map(|v| v.into_iter().map(Entity::from).collect())
}

/// Owners and moderators: the audience of moderation events.
pub fn moderator_ids(conn: &mut Conn, workspace_id: &str) -> QueryResult<Vec<String>> {
    entities::table
        .filter(entities::workspace_id.eq(workspace_id))
        .filter(entities::active.eq(true))
        .filter(entities::role.eq_any(["owner", "moderator"]))
        .select(entities::id)
        .load(conn)
}

// ---- channels ----

pub fn insert_channel(conn: &mut Conn, c: &Channel) -> QueryResult<()> {
    diesel::insert_into(channels::table)
        .values(ChannelRow::from(c))
        .execute(conn)?;
    let rows: Vec<_> = c
        .members
        .iter()
        .map(|m| {
            (
                channel_members::channel_id.eq(&c.id),
                channel_members::entity_id.eq(m),
                channel_members::last_read_seq.eq(0i64),
                channel_members::joined_at.eq(&c.created_at),
            )
        })
        .collect();
    for chunk in rows.chunks(200) {
        on_engine!(&mut *conn, |c| diesel::insert_into(channel_members::table)
            .values(chunk)
            .execute(c))?;
    }
    Ok(())
}

/// Saves the channel's own fields (not members, not last_seq).
pub fn save_channel(conn: &mut Conn, c: &Channel) -> QueryResult<usize> {
    let row = ChannelRow::from(c);
    diesel::update(channels::table.find(&c.id))
        .set((
            channels::name.eq(row.name),
            channels::description.eq(row.description),
            channels::visibility.eq(row.visibility),
            channels::join_policy.eq(row.join_policy),
            channels::modify_members.eq(row.modify_members),
            channels::tags.eq(row.tags),
            channels::metadata.eq(row.metadata),
            channels::updated_at.eq(row.updated_at),
            channels::archived_at.eq(row.archived_at),
        ))
        .execute(conn)
}

pub fn set_channel_last_seq(
    conn: &mut Conn,
    channel_id: &str,
    last_seq: i64,
) -> QueryResult<usize> {
    // Once per channel per batch: a fixed statement, prepared once (see `fixed`).
    on_engine!(conn, |c| super::fixed::SetChannelLastSeq(&(
        channel_id, last_seq
    ))
    .execute(c))
}

pub fn channel_last_seq(conn: &mut Conn, channel_id: &str) -> QueryResult<i64> {
    on_engine!(conn, |c| channels::table
        .find(channel_id)
        .select(channels::last_seq)
        .first(c))
}

/// Locks the rows of these channels until the end of the transaction, in id order, so two
/// nodes locking overlapping sets never deadlock (PostgreSQL; on SQLite the write transaction
/// holds the database's write lock).
pub fn lock_channels_pg(conn: &mut diesel::pg::PgConnection, ids: &[&str]) -> QueryResult<()> {
    if !ids.is_empty() {
        channels::table
            .filter(channels::id.eq_any(ids))
            .order(channels::id)
            .select(channels::id)
            .for_update()
            .load::<String>(conn)?;
    }
    Ok(())
}

/// Locks the rows of these workspaces in id order (after the channels'): their cursors are
/// then allocated from the committed `last_cursor`, dense and in commit order.
pub fn lock_workspaces_pg(conn: &mut diesel::pg::PgConnection, ids: &[&str]) -> QueryResult<()> {
    if !ids.is_empty() {
        workspaces::table
            .filter(workspaces::id.eq_any(ids))
            .order(workspaces::id)
            .select(workspaces::id)
            .for_update()
            .load::<String>(conn)?;
    }
    Ok(())
}

pub fn channel_members_of(conn: &mut Conn, channel_id: &str) -> QueryResult<BTreeSet<String>> {
    channel_members::table
        .filter(channel_members::channel_id.eq(channel_id))
        .select(channel_members::entity_id)
        .load::<String>(conn)
        .map(|v| v.into_iter().collect())
}

pub fn channel(conn: &mut Conn, channel_id: &str) -> QueryResult<Option<Channel>> {
    let Some(row) = channels::table
        .find(channel_id)
        .select(ChannelRow::as_select())
        .first(conn)
        .optional()?
    else {
        return Ok(None);
    };
    let members = channel_members_of(conn, channel_id)?;
    Ok(Some(row.into_channel(members)))
}

#[derive(QueryableByName)]
struct UnreadRow {
    #[diesel(sql_type = diesel::sql_types::Text)]
    channel_id: String,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    unread: i64,
}

/// Channels with `viewer`'s read pointer and unread count, in `ids` order, in three queries
/// whatever the page size (a channel list is one page of these).
pub fn channels_with_reads(
    conn: &mut Conn,
    ids: &[String],
    viewer: &str,
) -> QueryResult<Vec<(Channel, i64, i64)>> {
    use std::collections::HashMap;
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let mut rows: HashMap<String, ChannelRow> = channels::table
        .filter(channels::id.eq_any(ids))
        .select(ChannelRow::as_select())
        .load::<ChannelRow>(conn)?
        .into_iter()
        .map(|r| (r.id.clone(), r))
        .collect();
    let mut members: HashMap<String, BTreeSet<String>> = HashMap::new();
    let mut last_read: HashMap<String, i64> = HashMap::new();
    let member_rows: Vec<(String, String, i64)> = channel_members::table
        .filter(channel_members::channel_id.eq_any(ids))
        .select((
            channel_members::channel_id,
            channel_members::entity_id,
            channel_members::last_read_seq,
        ))
        .load(conn)?;
    for (channel, entity, read) in member_rows {
        if entity == viewer {
            last_read.insert(channel.clone(), read);
        }
        members.entry(channel).or_default().insert(entity);
    }
    let pg = conn.is_postgres();
    let placeholder = |n: usize| if pg { format!("${n}") } else { "?".to_string() };
    let placeholders: Vec<String> = (2..ids.len() + 2).map(placeholder).collect();
    let mut unread_query = diesel::sql_query(format!(
        "SELECT m.channel_id AS channel_id, COUNT(*) AS unread FROM messages m \
         LEFT JOIN channel_members cm ON cm.channel_id = m.channel_id AND cm.entity_id = {} \
         WHERE m.channel_id IN ({}) AND m.history_seq > COALESCE(cm.last_read_seq, 0) \
         GROUP BY m.channel_id",
        placeholder(1),
        placeholders.join(","),
    ))
    .into_boxed::<super::MultiBackend>()
    .bind::<diesel::sql_types::Text, _>(viewer.to_string());
    for id in ids {
        unread_query = unread_query.bind::<diesel::sql_types::Text, _>(id.clone());
    }
    let unread: HashMap<String, i64> = unread_query
        .load::<UnreadRow>(conn)?
        .into_iter()
        .map(|r| (r.channel_id, r.unread))
        .collect();
    Ok(ids
        .iter()
        .filter_map(|id| {
            let row = rows.remove(id)?;
            let channel = row.into_channel(members.remove(id).unwrap_or_default());
            let read = last_read.get(id).copied().unwrap_or(0);
            Some((channel, read, unread.get(id).copied().unwrap_or(0)))
        })
        .collect())
}

pub fn channel_id_by_name(
    conn: &mut Conn,
    workspace_id: &str,
    name: &str,
) -> QueryResult<Option<String>> {
    channels::table
        .filter(channels::workspace_id.eq(workspace_id))
        .filter(channels::name.eq(name))
        .select(channels::id)
        .first(conn)
        .optional()
}

/// Ids of channels the entity may see: its own, and public groups unless it is a guest.
pub fn visible_channel_ids(
    conn: &mut Conn,
    workspace_id: &str,
    entity_id: &str,
    include_public: bool,
    after_id: Option<&str>,
    limit: i64,
) -> QueryResult<Vec<String>> {
    let mine = channel_members::table
        .filter(channel_members::entity_id.eq(entity_id.to_string()))
        .select(channel_members::channel_id);
    let mut query = channels::table
        .filter(channels::workspace_id.eq(workspace_id))
        .into_boxed();
    query = if include_public {
        query.filter(
            channels::id.eq_any(mine).or(channels::channel_type
                .eq("group")
                .and(channels::visibility.eq("public"))),
        )
    } else {
        query.filter(channels::id.eq_any(mine))
    };
    if let Some(a) = after_id {
        query = query.filter(channels::id.gt(a.to_string()));
    }
    query
        .order(channels::id)
        .limit(limit)
        .select(channels::id)
        .load(conn)
}

/// Channel ids an entity belongs to (guests' visibility on a realtime connection).
pub fn member_channel_ids(
    conn: &mut Conn,
    workspace_id: &str,
    entity_id: &str,
) -> QueryResult<Vec<String>> {
    channel_members::table
        .inner_join(channels::table)
        .filter(channels::workspace_id.eq(workspace_id))
        .filter(channel_members::entity_id.eq(entity_id))
        .select(channel_members::channel_id)
        .load(conn)
}

pub fn add_member(
    conn: &mut Conn,
    channel_id: &str,
    entity_id: &str,
    now: &str,
) -> QueryResult<usize> {
    on_engine!(conn, |c| diesel::insert_into(channel_members::table)
        .values((
            channel_members::channel_id.eq(channel_id),
            channel_members::entity_id.eq(entity_id),
            channel_members::last_read_seq.eq(0i64),
            channel_members::joined_at.eq(now),
        ))
        .on_conflict_do_nothing()
        .execute(c))
}

pub fn remove_member(conn: &mut Conn, channel_id: &str, entity_id: &str) -> QueryResult<usize> {
    diesel::delete(channel_members::table.find((channel_id, entity_id))).execute(conn)
}

pub fn last_read_seq(
    conn: &mut Conn,
    channel_id: &str,
    entity_id: &str,
) -> QueryResult<Option<i64>> {
    channel_members::table
        .find((channel_id, entity_id))
        .select(channel_members::last_read_seq)
        .first(conn)
        .optional()
}

/// Moves a read pointer forward only.
pub fn advance_read_pointer(
    conn: &mut Conn,
    channel_id: &str,
    entity_id: &str,
    seq: i64,
) -> QueryResult<usize> {
    diesel::update(channel_members::table.find((channel_id, entity_id)))
        .filter(channel_members::last_read_seq.lt(seq))
        .set(channel_members::last_read_seq.eq(seq))
        .execute(conn)
}

// ---- join requests ----

pub fn insert_join_request(
    conn: &mut Conn,
    channel_id: &str,
    entity_id: &str,
    now: &str,
) -> QueryResult<usize> {
    on_engine!(conn, |c| diesel::insert_into(join_requests::table)
        .values((
            join_requests::channel_id.eq(channel_id),
            join_requests::entity_id.eq(entity_id),
            join_requests::created_at.eq(now),
        ))
        .on_conflict_do_nothing()
        .execute(c))
}

pub fn delete_join_request(
    conn: &mut Conn,
    channel_id: &str,
    entity_id: &str,
) -> QueryResult<usize> {
    diesel::delete(join_requests::table.find((channel_id, entity_id))).execute(conn)
}

pub fn join_requests_of(conn: &mut Conn, channel_id: &str) -> QueryResult<Vec<(String, String)>> {
    join_requests::table
        .filter(join_requests::channel_id.eq(channel_id))
        .order(join_requests::created_at)
        .select((join_requests::entity_id, join_requests::created_at))
        .load(conn)
}

// ---- messages ----

pub fn insert_message(conn: &mut Conn, m: &Message, workspace_id: &str) -> QueryResult<usize> {
    let row = MessageRow::from_message(m, workspace_id);
    on_engine!(conn, |c| diesel::insert_into(messages::table)
        .values(&row)
        .execute(c))
}

/// Messages from their rows, each with its whole text (see [`complete_text`]).
fn complete_texts(conn: &mut Conn, rows: Vec<MessageRow>) -> QueryResult<Vec<Message>> {
    rows.into_iter().map(|r| complete_text(conn, r)).collect()
}

/// A message from its row, with the appends after it: a long stream's appends leave its row
/// as its last whole write left it (`fixed::MarkStateBehind`), so a row with `text_seq` gets
/// the versions after that one folded in — each an append that kept the stream open, which
/// the writer committed with its event.
fn complete_text(conn: &mut Conn, row: MessageRow) -> QueryResult<Message> {
    let Some(written_through) = row.text_seq else {
        return Ok(Message::from(row));
    };
    let appends: Vec<(i64, String, String)> = message_versions::table
        .filter(message_versions::channel_id.eq(&row.channel_id))
        .filter(message_versions::message_serial.eq(&row.message_serial))
        .filter(message_versions::seq.gt(written_through))
        .filter(message_versions::action.eq("append"))
        .order(message_versions::seq.asc())
        .select((
            message_versions::seq,
            message_versions::body,
            message_versions::created_at,
        ))
        .load(conn)?;
    let mut m = Message::from(row);
    let mut text = match std::mem::take(&mut m.data) {
        serde_json::Value::String(s) => s,
        _ => String::new(),
    };
    for (seq, body, created_at) in appends {
        let Ok(AppendBody { data, extras }) = serde_json::from_str(&body) else {
            continue;
        };
        text.push_str(&data);
        if let Some(e) = extras {
            m.extras = e;
        }
        m.version_serial = crate::ids::version_serial(seq);
        m.append_count += 1;
        m.last_append_at = Some(created_at.clone());
        m.updated_at = created_at;
        m.last_action = "append";
    }
    m.data = serde_json::Value::String(text);
    Ok(m)
}

/// What an append's version body holds of the message after it: the fragment and the
/// extras then.
#[derive(serde::Deserialize)]
struct AppendBody {
    data: String,
    extras: Option<serde_json::Value>,
}

pub fn insert_version(conn: &mut Conn, v: &VersionRow) -> QueryResult<usize> {
    on_engine!(conn, |c| super::fixed::InsertVersion(v).execute(c))
}

/// Runs `$statement` over `$rows` in statements of the first of `$sizes` rows that fit, then
/// the next: a few statement shapes, each prepared once (see `fixed::InsertEvents`). The
/// last size must be 1.
macro_rules! insert_rows {
    ($conn:expr, $rows:expr, $statement:ident, [$($size:literal),+]) => {{
        let mut rest = $rows;
        while !rest.is_empty() {
            $(
                if let Some((head, tail)) = rest.split_first_chunk::<$size>() {
                    on_engine!(&mut *$conn, |c| super::fixed::$statement(head).execute(c))?;
                    rest = tail;
                    continue;
                }
            )+
        }
        Ok(())
    }};
}

/// Inserts versions in statements of 64 rows, then 16, 4 and 1 for the rest.
pub fn insert_versions(conn: &mut Conn, rows: &[&VersionRow]) -> QueryResult<()> {
    insert_rows!(conn, rows, InsertVersions, [64, 16, 4, 1])
}

pub fn message(conn: &mut Conn, channel_id: &str, serial: &str) -> QueryResult<Option<Message>> {
    messages::table
        .find((channel_id, serial))
        .select(MessageRow::as_select())
        .first(conn)
        .optional()?
        .map(|r| complete_text(conn, r))
        .transpose()
}

pub fn message_by_nonce(
    conn: &mut Conn,
    channel_id: &str,
    sender: &str,
    nonce: &str,
) -> QueryResult<Option<Message>> {
    messages::table
        .filter(messages::channel_id.eq(channel_id))
        .filter(messages::sender.eq(sender))
        .filter(messages::nonce.eq(nonce))
        .select(MessageRow::as_select())
        .first(conn)
        .optional()?
        .map(|r| complete_text(conn, r))
        .transpose()
}

/// Root messages by history seq: after `after` ascending, or before `before` (newest page),
/// returned ascending either way.
pub fn list_roots(
    conn: &mut Conn,
    channel_id: &str,
    after: Option<i64>,
    before: Option<i64>,
    limit: i64,
) -> QueryResult<Vec<Message>> {
    let base = messages::table
        .filter(messages::channel_id.eq(channel_id))
        .filter(messages::thread_id.is_null())
        .select(MessageRow::as_select())
        .into_boxed();
    let rows: Vec<MessageRow> = match (after, before) {
        (Some(a), _) => base
            .filter(messages::history_seq.gt(a))
            .order(messages::history_seq.asc())
            .limit(limit)
            .load(conn)?,
        (None, Some(b)) => {
            let mut v = base
                .filter(messages::history_seq.lt(b))
                .order(messages::history_seq.desc())
                .limit(limit)
                .load(conn)?;
            v.reverse();
            v
        }
        (None, None) => base
            .order(messages::history_seq.asc())
            .limit(limit)
            .load(conn)?,
    };
    complete_texts(conn, rows)
}

pub fn thread_replies(
    conn: &mut Conn,
    channel_id: &str,
    root: &str,
    after: i64,
    limit: i64,
) -> QueryResult<Vec<Message>> {
    messages::table
        .filter(messages::channel_id.eq(channel_id))
        .filter(messages::thread_id.eq(root))
        .filter(messages::history_seq.gt(after))
        .order(messages::history_seq.asc())
        .limit(limit)
        .select(MessageRow::as_select())
        .load(conn)
        .and_then(|rows| complete_texts(conn, rows))
}

pub fn bump_reply_count(
    conn: &mut Conn,
    channel_id: &str,
    root: &str,
    now: &str,
) -> QueryResult<usize> {
    on_engine!(conn, |c| diesel::update(
        messages::table.find((channel_id, root))
    )
    .set((
        messages::reply_count.eq(messages::reply_count + 1),
        messages::last_reply_at.eq(now),
    ))
    .execute(c))
}

/// Versions of a message, oldest first.
pub fn versions_of(
    conn: &mut Conn,
    channel_id: &str,
    serial: &str,
) -> QueryResult<Vec<VersionRow>> {
    message_versions::table
        .filter(message_versions::channel_id.eq(channel_id))
        .filter(message_versions::message_serial.eq(serial))
        .order(message_versions::seq.asc())
        .select(VersionRow::as_select())
        .load(conn)
}

/// Writes the latest state of a message after an update, delete or append. The reply
/// counters are left alone: they have their own increments.
pub fn save_message_state(conn: &mut Conn, m: &Message) -> QueryResult<usize> {
    // Only the fields a version can change are encoded: this runs once per append.
    let state = super::fixed::MessageState::of(m);
    on_engine!(conn, |c| super::fixed::SaveMessageState(&state).execute(c))
}

/// Saves what one batch's appends to a message changed: onto its stored text when the delta
/// writes text and the row is current. Otherwise the row is left as it is, marked as behind
/// once, and readers fold the appends in from the versions ([`complete_text`]).
pub fn save_appended_state(
    conn: &mut Conn,
    d: &super::message_state::AppendDelta,
) -> QueryResult<usize> {
    use super::fixed::{MarkStateBehind, SaveAppendedState, SaveAppendedText};
    if d.writes_text {
        let state = super::fixed::AppendedState::of(d);
        // Most appends keep the status: the statement that leaves it out of `SET` first.
        let saved = on_engine!(conn, |c| SaveAppendedText(&state).execute(c))?;
        if saved > 0 {
            return Ok(saved);
        }
        let saved = on_engine!(conn, |c| SaveAppendedState(&state).execute(c))?;
        if saved > 0 {
            return Ok(saved);
        }
        // The row is already behind its versions: this batch's appends stay there too.
    }
    let key = (d.channel_id.as_str(), d.message_serial.as_str());
    on_engine!(conn, |c| MarkStateBehind(&key).execute(c))
}

/// The version an op_id produced for this message and action, if any.
pub fn version_by_op(
    conn: &mut Conn,
    channel_id: &str,
    serial: &str,
    action: &str,
    op_id: &str,
) -> QueryResult<Option<VersionRow>> {
    message_versions::table
        .filter(message_versions::channel_id.eq(channel_id))
        .filter(message_versions::message_serial.eq(serial))
        .filter(message_versions::action.eq(action))
        .filter(message_versions::op_id.eq(op_id))
        .select(VersionRow::as_select())
        .first(conn)
        .optional()
}

pub fn version_at(conn: &mut Conn, channel_id: &str, seq: i64) -> QueryResult<Option<VersionRow>> {
    message_versions::table
        .find((channel_id, seq))
        .select(VersionRow::as_select())
        .first(conn)
        .optional()
}

/// Several versions of a channel by seq, in one query (a history page's latest versions).
pub fn versions_at(
    conn: &mut Conn,
    channel_id: &str,
    seqs: &[i64],
) -> QueryResult<std::collections::HashMap<i64, VersionRow>> {
    let rows: Vec<VersionRow> = message_versions::table
        .filter(message_versions::channel_id.eq(channel_id))
        .filter(message_versions::seq.eq_any(seqs))
        .select(VersionRow::as_select())
        .load(conn)?;
    Ok(rows.into_iter().map(|r| (r.seq, r)).collect())
}

/// One page of a message's versions: after (oldest first) or before (newest first) the
/// version at `cursor_seq`.
pub fn versions_page(
    conn: &mut Conn,
    channel_id: &str,
    serial: &str,
    newest_first: bool,
    cursor_seq: Option<i64>,
    limit: i64,
) -> QueryResult<Vec<VersionRow>> {
    let q = message_versions::table
        .filter(message_versions::channel_id.eq(channel_id))
        .filter(message_versions::message_serial.eq(serial))
        .select(VersionRow::as_select())
        .limit(limit)
        .into_boxed();
    match (newest_first, cursor_seq) {
        (true, Some(c)) => q
            .filter(message_versions::seq.lt(c))
            .order(message_versions::seq.desc()),
        (true, None) => q.order(message_versions::seq.desc()),
        (false, Some(c)) => q
            .filter(message_versions::seq.gt(c))
            .order(message_versions::seq.asc()),
        (false, None) => q.order(message_versions::seq.asc()),
    }
    .load(conn)
}

/// One page of a channel's messages (replies included), latest state, by history serial.
pub fn history_page(
    conn: &mut Conn,
    channel_id: &str,
    newest_first: bool,
    cursor: Option<i64>,
    limit: i64,
) -> QueryResult<Vec<Message>> {
    let q = messages::table
        .filter(messages::channel_id.eq(channel_id))
        .select(MessageRow::as_select())
        .limit(limit)
        .into_boxed();
    let rows: Vec<MessageRow> = match (newest_first, cursor) {
        (true, Some(c)) => q
            .filter(messages::history_seq.lt(c))
            .order(messages::history_seq.desc())
            .load(conn)?,
        (true, None) => q.order(messages::history_seq.desc()).load(conn)?,
        (false, Some(c)) => q
            .filter(messages::history_seq.gt(c))
            .order(messages::history_seq.asc())
            .load(conn)?,
        (false, None) => q.order(messages::history_seq.asc()).load(conn)?,
    };
    complete_texts(conn, rows)
}

/// Messages of a channel whose stream is open, with the time of their last append.
pub fn open_streams(
    conn: &mut Conn,
    channel_id: &str,
) -> QueryResult<Vec<(String, Option<String>)>> {
    messages::table
        .filter(messages::channel_id.eq(channel_id))
        // A literal, not a bound value: the partial index `messages_open_streams` holds
        // only these rows, and a planner can use it only when the query names its term.
        .filter(diesel::dsl::sql::<diesel::sql_types::Bool>(
            "messages.stream_status = 'open'",
        ))
        .select((
            messages::message_serial,
            messages::last_append_at,
            messages::text_seq,
        ))
        .load::<(String, Option<String>, Option<i64>)>(conn)?
        .into_iter()
        .map(|(serial, last_append_at, text_seq)| {
            // A row behind its versions: its last append is the newest version's.
            let newest = match text_seq {
                Some(_) => message_versions::table
                    .filter(message_versions::channel_id.eq(channel_id))
                    .filter(message_versions::message_serial.eq(&serial))
                    .order(message_versions::seq.desc())
                    .select(message_versions::created_at)
                    .first::<String>(conn)
                    .optional()?,
                None => None,
            };
            Ok((serial, newest.or(last_append_at)))
        })
        .collect()
}

/// A message's text as of version `seq`: the data of the last create, update or delete at or
/// before it plus the fragments appended since. `None` when that base version was purged or
/// its data is not a string.
pub fn text_at(
    conn: &mut Conn,
    channel_id: &str,
    serial: &str,
    seq: i64,
) -> QueryResult<Option<String>> {
    let base: Option<(i64, String)> = message_versions::table
        .filter(message_versions::channel_id.eq(channel_id))
        .filter(message_versions::message_serial.eq(serial))
        .filter(message_versions::seq.le(seq))
        .filter(message_versions::action.ne("append"))
        .order(message_versions::seq.desc())
        .select((message_versions::seq, message_versions::body))
        .first(conn)
        .optional()?;
    let Some((base_seq, body)) = base else {
        return Ok(None);
    };
    let mut text = match json_or(&body, serde_json::Value::Null).get("data") {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Null) | None => String::new(),
        Some(_) => return Ok(None),
    };
    let fragments: Vec<(i64, String)> = message_versions::table
        .filter(message_versions::channel_id.eq(channel_id))
        .filter(message_versions::message_serial.eq(serial))
        .filter(message_versions::seq.gt(base_seq))
        .filter(message_versions::seq.le(seq))
        .order(message_versions::seq.asc())
        .select((message_versions::seq, message_versions::body))
        .load(conn)?;
    // Each append records the length after it: a purged fragment shows as a mismatch.
    let mut expected_len = text.len();
    for (_, body) in fragments {
        let body = json_or(&body, serde_json::Value::Null);
        match body.get("data") {
            Some(serde_json::Value::String(f)) => text.push_str(f),
            _ => return Ok(None),
        }
        expected_len = body
            .get("length")
            .and_then(serde_json::Value::as_u64)
            .map_or(text.len(), |l| l as usize);
    }
    if expected_len != text.len() {
        return Ok(None);
    }
    Ok(Some(text))
}

/// Deletes up to `batch` versions created before `cutoff` in a workspace, never the newest
/// version of a message, nor an append whose fragment its message's stored text does not
/// hold yet (after its `text_seq`). Returns how many went.
pub fn purge_versions(
    conn: &mut Conn,
    workspace_id: &str,
    cutoff: &str,
    batch: i64,
) -> QueryResult<usize> {
    let sql = "DELETE FROM message_versions WHERE (channel_id, seq) IN (\
           SELECT v.channel_id, v.seq FROM message_versions v \
           JOIN channels c ON c.id = v.channel_id \
           WHERE c.workspace_id = ? AND v.created_at < ? \
             AND EXISTS (SELECT 1 FROM message_versions n \
                         WHERE n.channel_id = v.channel_id AND n.message_serial = v.message_serial \
                           AND n.seq > v.seq) \
             AND NOT EXISTS (SELECT 1 FROM messages m \
                             WHERE m.channel_id = v.channel_id \
                               AND m.message_serial = v.message_serial \
                               AND m.text_seq < v.seq) \
           LIMIT ?)";
    let sql = if conn.is_postgres() {
        numbered_placeholders(sql)
    } else {
        sql.to_string()
    };
    diesel::sql_query(sql)
        .bind::<diesel::sql_types::Text, _>(workspace_id)
        .bind::<diesel::sql_types::Text, _>(cutoff)
        .bind::<diesel::sql_types::BigInt, _>(batch)
        .execute(conn)
}

/// Workspace ids with their stored settings (the purge pass reads the retention window).
pub fn workspace_settings_all(conn: &mut Conn) -> QueryResult<Vec<(String, String)>> {
    workspaces::table
        .select((workspaces::id, workspaces::settings))
        .load(conn)
}

/// Per-emoji reaction counts of a message.
pub fn reaction_counts(
    conn: &mut Conn,
    channel_id: &str,
    serial: &str,
) -> QueryResult<std::collections::BTreeMap<String, i64>> {
    let rows: Vec<(String, i64)> = reactions::table
        .filter(reactions::channel_id.eq(channel_id))
        .filter(reactions::message_serial.eq(serial))
        .group_by(reactions::emoji)
        .select((reactions::emoji, diesel::dsl::count_star()))
        .load(conn)?;
    Ok(rows.into_iter().collect())
}

pub fn reply_count(conn: &mut Conn, channel_id: &str, serial: &str) -> QueryResult<i64> {
    messages::table
        .find((channel_id, serial))
        .select(messages::reply_count)
        .first(conn)
}

/// Unread roots and replies after a read pointer: the channel's seqs are all messages.
pub fn count_messages_after(conn: &mut Conn, channel_id: &str, after_seq: i64) -> QueryResult<i64> {
    messages::table
        .filter(messages::channel_id.eq(channel_id))
        .filter(messages::history_seq.gt(after_seq))
        .count()
        .get_result(conn)
}

// ---- reactions ----

pub fn add_reaction(
    conn: &mut Conn,
    channel_id: &str,
    serial: &str,
    entity_id: &str,
    emoji: &str,
    now: &str,
) -> QueryResult<usize> {
    on_engine!(conn, |c| diesel::insert_into(reactions::table)
        .values((
            reactions::channel_id.eq(channel_id),
            reactions::message_serial.eq(serial),
            reactions::entity_id.eq(entity_id),
            reactions::emoji.eq(emoji),
            reactions::created_at.eq(now),
        ))
        .on_conflict_do_nothing()
        .execute(c))
}

pub fn remove_reaction(
    conn: &mut Conn,
    channel_id: &str,
    serial: &str,
    entity_id: &str,
    emoji: &str,
) -> QueryResult<usize> {
    diesel::delete(reactions::table.find((channel_id, serial, entity_id, emoji))).execute(conn)
}

pub fn has_reaction(
    conn: &mut Conn,
    channel_id: &str,
    serial: &str,
    entity_id: &str,
    emoji: &str,
) -> QueryResult<bool> {
    diesel::select(diesel::dsl::exists(
        reactions::table.find((channel_id, serial, entity_id, emoji)),
    ))
    .get_result(conn)
}

/// Per-emoji counts of a message, and whether `viewer` reacted with each.
pub fn reaction_summary(
    conn: &mut Conn,
    channel_id: &str,
    serial: &str,
    viewer: &str,
) -> QueryResult<serde_json::Value> {
    let rows: Vec<(String, String)> = reactions::table
        .filter(reactions::channel_id.eq(channel_id))
        .filter(reactions::message_serial.eq(serial))
        .order((reactions::emoji, reactions::created_at))
        .select((reactions::emoji, reactions::entity_id))
        .load(conn)?;
    let mut out: Vec<serde_json::Value> = Vec::new();
    let mut i = 0;
    while i < rows.len() {
        let emoji = &rows[i].0;
        let group: Vec<&(String, String)> =
            rows[i..].iter().take_while(|(e, _)| e == emoji).collect();
        out.push(serde_json::json!({
            "emoji": emoji,
            "count": group.len(),
            "reacted_by_me": group.iter().any(|(_, who)| who == viewer),
        }));
        i += group.len();
    }
    Ok(serde_json::Value::Array(out))
}

// ---- events ----

pub fn insert_event(conn: &mut Conn, row: &EventRow) -> QueryResult<()> {
    on_engine!(conn, |c| super::fixed::InsertEvent(row).execute(c)).map(|_| ())
}

/// Inserts events in statements of 64 rows, then 16, 4 and 1 for the rest.
pub fn insert_events(conn: &mut Conn, rows: &[&EventRow]) -> QueryResult<()> {
    insert_rows!(conn, rows, InsertEvents, [64, 16, 4, 1])
}

/// Events after `after` up to `tail` (inclusive) that `viewer` may see by the recipients
/// rule, oldest first; the guest rule is applied by the caller with the same predicate as
/// live delivery.
pub fn events_after_for(
    conn: &mut Conn,
    workspace_id: &str,
    viewer: &str,
    after: i64,
    tail: i64,
    limit: i64,
) -> QueryResult<Vec<EventRow>> {
    use diesel::sql_types::{Bool, Text};
    // ",viewer," is in the recipients text: instr() on SQLite, strpos() on PostgreSQL.
    let find = if conn.is_postgres() {
        "strpos(recipients, "
    } else {
        "instr(recipients, "
    };
    let listed = diesel::dsl::sql::<Bool>(find)
        .bind::<Text, _>(format!(",{viewer},"))
        .sql(") > 0");
    events::table
        .filter(events::workspace_id.eq(workspace_id))
        .filter(events::cursor.gt(after))
        .filter(events::cursor.le(tail))
        .filter(events::is_private.eq(false).or(listed))
        .order(events::cursor.asc())
        .limit(limit)
        .select(EventRow::as_select())
        .load(conn)
}

/// The event at a cursor exists (a cursor a client holds has not been pruned).
pub fn event_exists(conn: &mut Conn, workspace_id: &str, cursor: i64) -> QueryResult<bool> {
    diesel::select(diesel::dsl::exists(
        events::table.find((workspace_id, cursor)),
    ))
    .get_result(conn)
}

/// Deletes events created before `cutoff` (if any) that are not among the newest
/// `keep_latest`; recipients go with them, messages are untouched. Returns the count.
///
/// The writer stamps events in cursor order, so `created_at` rises with the cursor: the
/// events older than `cutoff` are a prefix of the log, found by bisection over the cursor
/// instead of through an index on `created_at` that every event would pay for (give or take
/// a clock stepped back, or the clock skew between cluster nodes, at the prefix's end).
pub fn prune_events(
    conn: &mut Conn,
    workspace_id: &str,
    cutoff: Option<&str>,
    keep_latest: i64,
) -> QueryResult<usize> {
    super::write_transaction(conn, |conn| {
        let protected_from: Option<i64> = events::table
            .filter(events::workspace_id.eq(workspace_id))
            .order(events::cursor.desc())
            .offset(keep_latest)
            .limit(1)
            .select(events::cursor)
            .first(conn)
            .optional()?;
        // Everything above `protected_from` is among the newest `keep_latest`.
        let Some(max_prunable) = protected_from else {
            return Ok(0);
        };
        let through = match cutoff {
            Some(c) => last_cursor_before(conn, workspace_id, max_prunable, c)?,
            None => Some(max_prunable),
        };
        let Some(through) = through else {
            return Ok(0);
        };
        let pruned = diesel::delete(
            events::table
                .filter(events::workspace_id.eq(workspace_id))
                .filter(events::cursor.le(through)),
        )
        .execute(conn)?;
        diesel::update(workspaces::table.find(workspace_id))
            .filter(workspaces::pruned_through.lt(through))
            .set(workspaces::pruned_through.eq(through))
            .execute(conn)?;
        Ok(pruned)
    })
}

/// The highest stored cursor at or below `max` whose event was created before `cutoff`, by
/// bisection over the cursor (see [`prune_events`]): about 2·log2(events) primary-key reads.
fn last_cursor_before(
    conn: &mut Conn,
    workspace_id: &str,
    max: i64,
    cutoff: &str,
) -> QueryResult<Option<i64>> {
    // The first stored event at or after `from` (and at or below `max`), with its time.
    let first_from = |conn: &mut Conn, from: i64| -> QueryResult<Option<(i64, String)>> {
        events::table
            .filter(events::workspace_id.eq(workspace_id))
            .filter(events::cursor.ge(from))
            .filter(events::cursor.le(max))
            .order(events::cursor.asc())
            .select((events::cursor, events::created_at))
            .first(conn)
            .optional()
    };
    let Some((mut low, _)) = first_from(conn, i64::MIN)? else {
        return Ok(None);
    };
    let mut high = max;
    let mut found = None;
    while low <= high {
        let mid = low + (high - low) / 2;
        match first_from(conn, mid)? {
            Some((cursor, created_at)) if created_at.as_str() < cutoff => {
                found = Some(cursor);
                low = cursor + 1;
            }
            // Nothing stored in [mid, max], or the first there is not old enough: neither
            // is anything after it.
            _ => high = mid - 1,
        }
    }
    Ok(found)
}

/// A channel's versions with `after < seq <= until`, oldest first (V2 `resume`).
pub fn versions_after(
    conn: &mut Conn,
    channel_id: &str,
    after: i64,
    until: i64,
    limit: i64,
) -> QueryResult<Vec<VersionRow>> {
    message_versions::table
        .filter(message_versions::channel_id.eq(channel_id))
        .filter(message_versions::seq.gt(after))
        .filter(message_versions::seq.le(until))
        .order(message_versions::seq.asc())
        .limit(limit)
        .select(VersionRow::as_select())
        .load(conn)
}

/// How many versions a channel holds with `after < seq <= until`: the range is complete when
/// this is `until - after` (a channel's seqs are unique).
pub fn count_versions(
    conn: &mut Conn,
    channel_id: &str,
    after: i64,
    until: i64,
) -> QueryResult<i64> {
    message_versions::table
        .filter(message_versions::channel_id.eq(channel_id))
        .filter(message_versions::seq.gt(after))
        .filter(message_versions::seq.le(until))
        .count()
        .get_result(conn)
}

/// `?` placeholders as PostgreSQL's `$1, $2, …` (for SQL text without `?` in literals).
fn numbered_placeholders(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 8);
    let mut n = 0;
    for ch in sql.chars() {
        if ch == '?' {
            n += 1;
            out.push_str(&format!("${n}"));
        } else {
            out.push(ch);
        }
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::store::test_conn;

    fn workspace(conn: &mut Conn) {
        insert_workspace(conn, &WorkspaceRow::for_tests("1")).expect("insert workspace");
    }

    /// Workspace "1" with a direct channel "c1" between alice and bob.
    fn workspace_with_channel_c1() -> Conn {
        let mut conn = test_conn();
        crate::store::seed_direct_channel(&mut conn);
        conn
    }

    fn event(conn: &mut Conn, created_at: &str, recipients: Option<&[String]>) -> i64 {
        let cursor = allocate_cursors(conn, "1", 1).expect("cursor");
        let row = EventRow {
            workspace_id: "1".into(),
            cursor,
            id: format!("evt_{cursor}"),
            event_type: "message.created".into(),
            channel_id: None,
            seq: None,
            payload: "{}".into(),
            is_private: recipients.is_some(),
            created_at: created_at.into(),
            recipients: recipients.map(recipients_text),
        };
        insert_event(conn, &row).expect("insert event");
        cursor
    }

    /// Inserts batches of every shape `insert_rows!` splits (none, under 4, between sizes,
    /// exactly 64, over 64) and reads every row back once, in order, with its own values.
    /// Needs workspace "1" and channel "c1". Run on both engines.
    pub(crate) fn multi_row_inserts_keep_every_row(conn: &mut Conn) {
        let mut next = 0i64;
        for n in [0usize, 1, 3, 4, 17, 63, 64, 65, 150] {
            let rows: Vec<(EventRow, VersionRow)> = (next + 1..=next + n as i64)
                .map(|k| {
                    let event = EventRow {
                        workspace_id: "1".into(),
                        cursor: k,
                        id: format!("evt_{k}"),
                        event_type: "message.appended".into(),
                        channel_id: Some("c1".into()),
                        seq: Some(k),
                        payload: format!("{{\"k\":{k}}}"),
                        is_private: k % 2 == 0,
                        created_at: "2026-01-01T00:00:00.000Z".into(),
                        recipients: (k % 2 == 0).then(|| format!(",e{k},")),
                    };
                    let version = VersionRow {
                        channel_id: "c1".into(),
                        seq: k,
                        message_serial: "m1".into(),
                        action: "append".into(),
                        actor: Some(format!("e{k}")),
                        op_id: None,
                        body: format!("{{\"data\":\"{k}\"}}"),
                        created_at: "2026-01-01T00:00:00.000Z".into(),
                        fingerprint: None,
                    };
                    (event, version)
                })
                .collect();
            let events: Vec<&EventRow> = rows.iter().map(|(e, _)| e).collect();
            let versions: Vec<&VersionRow> = rows.iter().map(|(_, v)| v).collect();
            insert_events(conn, &events).expect("insert events");
            insert_versions(conn, &versions).expect("insert versions");
            next += n as i64;
        }
        // Public events, and the private ones listed for their viewer.
        let public = events_after_for(conn, "1", "nobody", 0, next, 1000).expect("events");
        assert_eq!(
            public.iter().map(|e| e.cursor).collect::<Vec<_>>(),
            (1..=next).filter(|k| k % 2 == 1).collect::<Vec<_>>()
        );
        for e in &public {
            assert_eq!(e.payload, format!("{{\"k\":{}}}", e.cursor));
            assert_eq!(e.seq, Some(e.cursor));
        }
        let private = events_after_for(conn, "1", "e64", 0, next, 1000).expect("events");
        assert_eq!(private.iter().filter(|e| e.is_private).count(), 1);
        let versions = versions_of(conn, "c1", "m1").expect("versions");
        assert_eq!(versions.len() as i64, next);
        for (v, k) in versions.iter().zip(1..) {
            assert_eq!(v.seq, k);
            assert_eq!(v.actor.as_deref(), Some(format!("e{k}").as_str()));
            assert_eq!(v.body, format!("{{\"data\":\"{k}\"}}"));
        }
    }

    #[test]
    fn multi_row_inserts_keep_every_row_sqlite() {
        let mut conn = workspace_with_channel_c1();
        multi_row_inserts_keep_every_row(&mut conn);
    }

    /// Open streams and thread replies are found through partial indexes that hold only
    /// those rows (migration 000005): the queries still find exactly them.
    #[test]
    fn open_streams_and_replies_are_found_through_their_partial_indexes() {
        use crate::domain::message::{NewMessage, StreamStatus};
        let mut conn = workspace_with_channel_c1();
        let statuses = [
            StreamStatus::None,
            StreamStatus::Open,
            StreamStatus::Closed,
            StreamStatus::Open,
        ];
        let mut serials = Vec::new();
        for (seq, status) in (1..).zip(statuses) {
            let mut m = NewMessage::default().into_message("c1", "alice", seq, "t");
            m.stream_status = status;
            insert_message(&mut conn, &m, "1").expect("insert message");
            serials.push(m.message_serial);
        }
        let root = serials[0].clone();
        for seq in 5..8 {
            let reply = NewMessage {
                thread_id: Some(root.clone()),
                ..Default::default()
            }
            .into_message("c1", "alice", seq, "t");
            insert_message(&mut conn, &reply, "1").expect("insert reply");
        }
        let mut open: Vec<String> = open_streams(&mut conn, "c1")
            .expect("open streams")
            .into_iter()
            .map(|(serial, _)| serial)
            .collect();
        open.sort();
        assert_eq!(open, vec![serials[1].clone(), serials[3].clone()]);
        assert!(open_streams(&mut conn, "other").expect("q").is_empty());
        let replies = thread_replies(&mut conn, "c1", &root, 0, 10).expect("replies");
        assert_eq!(
            replies.iter().map(|m| m.history_serial).collect::<Vec<_>>(),
            vec![5, 6, 7]
        );
        let roots = list_roots(&mut conn, "c1", None, None, 10).expect("roots");
        assert_eq!(
            roots.iter().map(|m| m.history_serial).collect::<Vec<_>>(),
            vec![1, 2, 3, 4]
        );
        // The planner uses the partial indexes for these queries' terms.
        let plan = |conn: &mut Conn, sql: &str| -> String {
            #[derive(diesel::QueryableByName)]
            struct Step {
                #[diesel(sql_type = diesel::sql_types::Text)]
                detail: String,
            }
            diesel::sql_query(format!("EXPLAIN QUERY PLAN {sql}"))
                .load::<Step>(conn)
                .expect("plan")
                .into_iter()
                .map(|s| s.detail)
                .collect::<Vec<_>>()
                .join("; ")
        };
        let open_plan = plan(
            &mut conn,
            "SELECT message_serial FROM messages WHERE channel_id = 'c1' \
             AND messages.stream_status = 'open'",
        );
        assert!(open_plan.contains("messages_open_streams"), "{open_plan}");
        let reply_plan = plan(
            &mut conn,
            "SELECT message_serial FROM messages WHERE channel_id = 'c1' AND thread_id = 'x' \
             AND history_seq > 0 ORDER BY history_seq",
        );
        assert!(reply_plan.contains("messages_thread"), "{reply_plan}");
    }

    /// Past the inline size an append leaves the stored text to its versions: readers still
    /// get the whole text, an append that would write text onto a row that is behind leaves
    /// it to the versions too, retention keeps the fragments the row does not hold, and a
    /// whole save writes the text and clears the mark.
    /// Needs workspace "1" and channel "c1". Run on both engines.
    pub(crate) fn deferred_appends_are_read_from_their_versions_until_a_whole_save(
        conn: &mut Conn,
    ) {
        use crate::domain::message::{NewMessage, StreamStatus};
        use crate::store::message_state::AppendDelta;
        use crate::store::schema::messages::dsl as m_dsl;
        let mut m = NewMessage {
            data: Some(serde_json::json!("")),
            ..Default::default()
        }
        .into_message("c1", "agent", 1, "t0");
        insert_message(conn, &m, "1").expect("insert");
        let stored_row = |conn: &mut Conn| -> (Option<String>, Option<i64>) {
            m_dsl::messages
                .select((m_dsl::data, m_dsl::text_seq))
                .first(conn)
                .expect("row")
        };
        // (fragment, writes text): seqs 2..=7, each with its version row.
        let steps = [
            ("one ", true),
            ("two \"", true),
            ("three ", false),
            ("four ", false),
            ("five ", true),
            ("six", false),
        ];
        let mut text = String::new();
        let mut extras = serde_json::json!({});
        for (seq, (fragment, writes_text)) in (2..).zip(steps) {
            text.push_str(fragment);
            // The fourth append (seq 5, left to the versions) sets extras.
            let set_extras = (seq == 5).then(|| serde_json::json!({"k": 4}));
            if let Some(e) = &set_extras {
                extras = e.clone();
            }
            let at = format!("2020-01-01T00:00:{seq:02}.000Z");
            let version = VersionRow {
                channel_id: "c1".into(),
                seq,
                message_serial: m.message_serial.clone(),
                action: "append".into(),
                actor: None,
                op_id: None,
                body: serde_json::json!({"data": fragment, "length": text.len(), "extras": extras})
                    .to_string(),
                created_at: at.clone(),
                fingerprint: None,
            };
            insert_version(conn, &version).expect("version");
            let delta = AppendDelta {
                channel_id: "c1".into(),
                message_serial: m.message_serial.clone(),
                fragment: fragment.into(),
                version_serial: crate::ids::version_serial(seq),
                updated_at: at.clone(),
                append_count: seq - 1,
                stream_status: StreamStatus::Open,
                extras: set_extras,
                writes_text,
            };
            let saved = save_appended_state(conn, &delta).expect("save");
            // Only the first append left to the versions marks the row; later ones skip it.
            assert_eq!(
                saved,
                usize::from(seq != 5 && seq != 6 && seq != 7),
                "seq {seq}"
            );
            let read = message(conn, "c1", &m.message_serial)
                .expect("read")
                .expect("message");
            assert_eq!(read.data, serde_json::json!(text), "after seq {seq}");
            assert_eq!(read.append_count, seq - 1);
            assert_eq!(read.version_serial, crate::ids::version_serial(seq));
            assert_eq!(read.updated_at, at);
            assert_eq!(read.last_append_at.as_deref(), Some(at.as_str()));
            assert_eq!(read.last_action, "append");
            assert_eq!(read.extras, extras, "after seq {seq}");
            assert_eq!(read.stream_status, StreamStatus::Open);
        }
        // Written through seq 3 ("one two"): seq 6 wanted to write text, but the row is behind.
        assert_eq!(
            stored_row(conn),
            (Some("\"one two \\\"\"".to_string()), Some(3))
        );
        // The open stream's last append is the newest version's, not the row's.
        assert_eq!(
            open_streams(conn, "c1").expect("open streams"),
            [(
                m.message_serial.clone(),
                Some("2020-01-01T00:00:07.000Z".to_string())
            )]
        );
        let listed = list_roots(conn, "c1", None, None, 10).expect("roots");
        assert_eq!(listed[0].data, serde_json::json!(text));
        let page = history_page(conn, "c1", true, None, 10).expect("history");
        assert_eq!(page[0].data, serde_json::json!(text));

        // Retention takes the old versions the stored text holds, not those after seq 3.
        let purged = purge_versions(conn, "1", "2030-01-01T00:00:00.000Z", 100).expect("purge");
        assert_eq!(purged, 2, "seqs 2 and 3 go");
        let read = message(conn, "c1", &m.message_serial)
            .expect("read")
            .expect("message");
        assert_eq!(read.data, serde_json::json!(text));

        // A whole save (a checkpoint, or the close) writes the text and clears the mark.
        m = read;
        m.stream_status = StreamStatus::Closed;
        save_message_state(conn, &m).expect("whole save");
        assert_eq!(
            stored_row(conn),
            (Some(serde_json::json!(text).to_string()), None)
        );
        let purged = purge_versions(conn, "1", "2030-01-01T00:00:00.000Z", 100).expect("purge");
        assert_eq!(
            purged, 3,
            "all but the newest version go once the text holds them"
        );
        let read = message(conn, "c1", &m.message_serial)
            .expect("read")
            .expect("message");
        assert_eq!(read.data, serde_json::json!(text));
    }

    #[test]
    fn deferred_appends_are_read_from_their_versions_until_a_whole_save_sqlite() {
        let mut conn = workspace_with_channel_c1();
        deferred_appends_are_read_from_their_versions_until_a_whole_save(&mut conn);
    }

    /// An append that keeps the stored status goes through the statement that leaves the
    /// status alone; one that changes it (a stream's first or closing append), or finds the
    /// stored status other than it expects, through the one that sets it.
    #[test]
    fn appended_states_keep_or_change_the_stream_status() {
        use crate::domain::message::{NewMessage, StreamStatus};
        use crate::store::message_state::AppendDelta;
        let mut conn = workspace_with_channel_c1();
        let m = NewMessage {
            data: Some(serde_json::json!("")),
            ..Default::default()
        }
        .into_message("c1", "agent", 1, "t0");
        insert_message(&mut conn, &m, "1").expect("insert");
        let delta = |fragment: &str, n: i64, status: StreamStatus| AppendDelta {
            channel_id: "c1".into(),
            message_serial: m.message_serial.clone(),
            fragment: fragment.into(),
            version_serial: format!("v{n}"),
            updated_at: format!("t{n}"),
            append_count: n,
            stream_status: status,
            extras: None,
            writes_text: true,
        };
        let open = |conn: &mut Conn| -> Vec<String> {
            open_streams(conn, "c1")
                .expect("open streams")
                .into_iter()
                .map(|(serial, _)| serial)
                .collect()
        };
        let steps = [
            ("a\"", StreamStatus::Open),
            ("b", StreamStatus::Open),
            ("c", StreamStatus::Open),
            ("", StreamStatus::Closed),
        ];
        let mut text = String::new();
        for (n, (fragment, status)) in (1..).zip(steps) {
            let saved = save_appended_state(&mut conn, &delta(fragment, n, status)).expect("save");
            assert_eq!(saved, 1, "append {n} saved one row");
            text.push_str(fragment);
            let stored = message(&mut conn, "c1", &m.message_serial)
                .expect("read")
                .expect("row");
            assert_eq!(stored.data, serde_json::json!(text), "append {n}");
            assert_eq!(stored.stream_status, status, "append {n}");
            assert_eq!(stored.append_count, n);
            assert_eq!(stored.version_serial, format!("v{n}"));
            let expect_open = status == StreamStatus::Open;
            assert_eq!(
                open(&mut conn) == [m.message_serial.clone()],
                expect_open,
                "append {n}"
            );
        }
        // A message that is not there: nothing saved, by either statement.
        let mut missing = delta("x", 9, StreamStatus::Open);
        missing.message_serial = "absent".into();
        assert_eq!(save_appended_state(&mut conn, &missing).expect("save"), 0);
    }

    #[test]
    fn cursors_are_dense_per_workspace() {
        let mut conn = test_conn();
        workspace(&mut conn);
        assert_eq!(allocate_cursors(&mut conn, "1", 3).expect("a"), 1);
        assert_eq!(allocate_cursors(&mut conn, "1", 1).expect("b"), 4);
    }

    #[test]
    fn private_events_replay_to_recipients_only() {
        let mut conn = test_conn();
        workspace(&mut conn);
        let alice = vec!["alice".to_string()];
        event(&mut conn, "t1", None);
        event(&mut conn, "t2", Some(&alice));
        event(&mut conn, "t3", Some(&[]));
        let for_alice = events_after_for(&mut conn, "1", "alice", 0, 10, 10).expect("q");
        let for_bob = events_after_for(&mut conn, "1", "bob", 0, 10, 10).expect("q");
        // An id that is a part of a recipient's id is not that recipient.
        let for_ali = events_after_for(&mut conn, "1", "ali", 0, 10, 10).expect("q");
        assert_eq!(for_alice.len(), 2);
        assert_eq!(for_bob.len(), 1);
        assert_eq!(for_ali.len(), 1);
    }

    #[test]
    fn prune_keeps_latest_and_cuts_by_time_with_recipients() {
        let mut conn = test_conn();
        workspace(&mut conn);
        let r = vec!["a".to_string()];
        for t in [
            "2026-01-01T00:00:00.000Z",
            "2026-01-02T00:00:00.000Z",
            "2026-01-03T00:00:00.000Z",
        ] {
            event(&mut conn, t, Some(&r));
        }
        // Cut-off after everything, but keep the newest one.
        assert_eq!(
            prune_events(&mut conn, "1", Some("2027-01-01T00:00:00.000Z"), 1).expect("prune"),
            2
        );
        assert!(!event_exists(&mut conn, "1", 2).expect("q"));
        assert!(event_exists(&mut conn, "1", 3).expect("q"));
        assert_eq!(
            workspace_cursor_state(&mut conn, "1").expect("state"),
            (3, 2)
        );
        // A cut-off before everything prunes nothing.
        assert_eq!(
            prune_events(&mut conn, "1", Some("2025-01-01T00:00:00.000Z"), 0).expect("prune"),
            0
        );
    }

    /// The cut by age falls exactly after the last event older than the cut-off, wherever it
    /// is in the log (the bisection's every branch), and never into the newest kept ones.
    #[test]
    fn prune_by_age_cuts_exactly_at_the_cutoff() {
        let mut conn = test_conn();
        workspace(&mut conn);
        let at = |minute: i64| format!("2026-01-01T{:02}:{:02}:00.000Z", minute / 60, minute % 60);
        // Event n (cursor n) was created at minute n.
        for minute in 1..=37 {
            event(&mut conn, &at(minute), None);
        }
        let oldest_left = |conn: &mut Conn| {
            (1..=37)
                .find(|&c| event_exists(conn, "1", c).expect("q"))
                .unwrap_or(38)
        };
        // (cut-off minute, keep_latest, events pruned by this call, oldest cursor left).
        let steps = [
            (0, 0, 0, 1),
            (1, 0, 0, 1), // strictly older: the event at minute 1 stays
            (2, 0, 1, 2),
            (11, 0, 9, 11),
            (12, 0, 1, 12),
            (26, 0, 14, 26),
            (26, 0, 0, 26),
            (60, 5, 7, 33), // everything is old enough; the newest 5 stay
            (60, 0, 5, 38),
        ];
        for (minute, keep, pruned, oldest) in steps {
            let cutoff = at(minute);
            let n = prune_events(&mut conn, "1", Some(&cutoff), keep).expect("prune");
            assert_eq!(
                (n, oldest_left(&mut conn)),
                (pruned, oldest),
                "cut-off {cutoff}"
            );
        }
        assert_eq!(
            workspace_cursor_state(&mut conn, "1").expect("state"),
            (37, 37)
        );
    }
}
