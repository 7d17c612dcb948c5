//! The writer's hot statements with their SQL fixed at compile time. diesel never caches the
//! prepared statement of an UPDATE it builds (so each call re-parsed it: ~44k instructions),
//! and keys inserts by their SQL text, rebuilt on every call. The single-row statements here
//! carry a static query id instead: diesel caches them by type, so a call only binds and
//! steps. So do the multi-row inserts: one type, and one cached statement, per row count.
//!
//! Each statement is written once and implemented for both engines (SQLite and PostgreSQL),
//! and runs natively on the engine's own connection: `push_bind_param` writes each
//! dialect's placeholders (`?` or `$n`).

use diesel::pg::{Pg, PgConnection};
use diesel::query_builder::{AstPass, QueryFragment, QueryId};
use diesel::sql_types::{BigInt, Bool, Nullable, Text};
use diesel::sqlite::{Sqlite, SqliteConnection};
use diesel::{QueryResult, RunQueryDsl};

use super::rows::{to_json_text, EventRow, VersionRow};
use crate::domain::message::Message;

/// `(?, ?, …)` of one version row.
macro_rules! push_version_values {
    ($out:ident, $v:expr) => {{
        let v: &VersionRow = $v;
        let out = &mut $out;
        out.push_sql("(");
        out.push_bind_param::<Text, _>(&v.channel_id)?;
        out.push_sql(", ");
        out.push_bind_param::<BigInt, _>(&v.seq)?;
        out.push_sql(", ");
        out.push_bind_param::<Text, _>(&v.message_serial)?;
        out.push_sql(", ");
        out.push_bind_param::<Text, _>(&v.action)?;
        out.push_sql(", ");
        out.push_bind_param::<Nullable<Text>, _>(&v.actor)?;
        out.push_sql(", ");
        out.push_bind_param::<Nullable<Text>, _>(&v.op_id)?;
        out.push_sql(", ");
        out.push_bind_param::<Text, _>(&v.body)?;
        out.push_sql(", ");
        out.push_bind_param::<Text, _>(&v.created_at)?;
        out.push_sql(", ");
        out.push_bind_param::<Nullable<Text>, _>(&v.fingerprint)?;
        out.push_sql(")");
    }};
}

/// `(?, ?, …)` of one event row.
macro_rules! push_event_values {
    ($out:ident, $e:expr) => {{
        let e: &EventRow = $e;
        let out = &mut $out;
        out.push_sql("(");
        out.push_bind_param::<Text, _>(&e.workspace_id)?;
        out.push_sql(", ");
        out.push_bind_param::<BigInt, _>(&e.cursor)?;
        out.push_sql(", ");
        out.push_bind_param::<Text, _>(&e.id)?;
        out.push_sql(", ");
        out.push_bind_param::<Text, _>(&e.event_type)?;
        out.push_sql(", ");
        out.push_bind_param::<Nullable<Text>, _>(&e.channel_id)?;
        out.push_sql(", ");
        out.push_bind_param::<Nullable<BigInt>, _>(&e.seq)?;
        out.push_sql(", ");
        out.push_bind_param::<Text, _>(&e.payload)?;
        out.push_sql(", ");
        out.push_bind_param::<Bool, _>(&e.is_private)?;
        out.push_sql(", ");
        out.push_bind_param::<Text, _>(&e.created_at)?;
        out.push_sql(", ");
        out.push_bind_param::<Nullable<Text>, _>(&e.recipients)?;
        out.push_sql(")");
    }};
}

/// Implements `QueryFragment` for both engines with the same body.
macro_rules! both_engines {
    ($name:ident, |$this:ident, $out:ident| $body:block) => {
        both_engines!(@one $name, Sqlite, SqliteConnection, |$this, $out| $body);
        both_engines!(@one $name, Pg, PgConnection, |$this, $out| $body);
    };
    (@one $name:ident, $db:ty, $conn:ty, |$this:ident, $out:ident| $body:block) => {
        impl QueryFragment<$db> for $name<'_> {
            fn walk_ast<'b>(&'b self, mut $out: AstPass<'_, 'b, $db>) -> QueryResult<()> {
                let $this = self;
                $body
                Ok(())
            }
        }

        impl RunQueryDsl<$conn> for $name<'_> {}
    };
}

/// Implements `QueryFragment` for both engines for a statement over `N` rows.
macro_rules! rows_statement {
    ($name:ident, |$rows:ident, $out:ident| $body:block) => {
        rows_statement!(@one $name, Sqlite, SqliteConnection, |$rows, $out| $body);
        rows_statement!(@one $name, Pg, PgConnection, |$rows, $out| $body);
    };
    (@one $name:ident, $db:ty, $conn:ty, |$rows:ident, $out:ident| $body:block) => {
        impl<const N: usize> QueryFragment<$db> for $name<'_, N> {
            fn walk_ast<'b>(&'b self, mut $out: AstPass<'_, 'b, $db>) -> QueryResult<()> {
                let $rows = self.0;
                $body
                Ok(())
            }
        }

        impl<const N: usize> RunQueryDsl<$conn> for $name<'_, N> {}
    };
}

/// Declares a statement type over a borrowed value whose prepared statement diesel caches by
/// type, with the body that writes its SQL and binds.
macro_rules! fixed_statement {
    ($name:ident<$a:lifetime, $value:ty>, |$this:ident, $out:ident| $body:block) => {
        pub struct $name<$a>(pub &$a $value);

        impl QueryId for $name<'_> {
            type QueryId = $name<'static>;
            const HAS_STATIC_QUERY_ID: bool = true;
        }

        both_engines!($name, |this, $out| {
            let $this = this.0;
            $body
        });
    };
}

const INSERT_VERSIONS: &str = "INSERT INTO message_versions (channel_id, seq, message_serial, \
     action, actor, op_id, body, created_at, fingerprint) VALUES ";

fixed_statement!(InsertVersion<'a, VersionRow>, |v, out| {
    out.push_sql(INSERT_VERSIONS);
    push_version_values!(out, v);
});

/// `N` versions in one statement (see [`InsertEvents`]).
pub struct InsertVersions<'a, const N: usize>(pub &'a [&'a VersionRow; N]);

impl<const N: usize> QueryId for InsertVersions<'_, N> {
    type QueryId = InsertVersions<'static, N>;
    const HAS_STATIC_QUERY_ID: bool = true;
}

rows_statement!(InsertVersions, |rows, out| {
    out.push_sql(INSERT_VERSIONS);
    for (i, v) in rows.iter().enumerate() {
        if i > 0 {
            out.push_sql(", ");
        }
        push_version_values!(out, v);
    }
});

const INSERT_EVENTS: &str = "INSERT INTO events (workspace_id, cursor, id, event_type, \
     channel_id, seq, payload, is_private, created_at, recipients) VALUES ";

fixed_statement!(InsertEvent<'a, EventRow>, |e, out| {
    out.push_sql(INSERT_EVENTS);
    push_event_values!(out, e);
});

/// `N` events in one statement: one statement step and reset for all of them. Each row count
/// is a type of its own with a static query id, so diesel finds its prepared statement by
/// type instead of rebuilding and hashing the SQL text of every call; callers keep to a few
/// row counts ([`crate::store::queries::insert_events`]).
pub struct InsertEvents<'a, const N: usize>(pub &'a [&'a EventRow; N]);

impl<const N: usize> QueryId for InsertEvents<'_, N> {
    type QueryId = InsertEvents<'static, N>;
    const HAS_STATIC_QUERY_ID: bool = true;
}

rows_statement!(InsertEvents, |rows, out| {
    out.push_sql(INSERT_EVENTS);
    for (i, e) in rows.iter().enumerate() {
        if i > 0 {
            out.push_sql(", ");
        }
        push_event_values!(out, e);
    }
});

/// The columns of a message that a version can change, encoded for [`SaveMessageState`].
pub struct MessageState<'a> {
    message: &'a Message,
    data: Option<String>,
    extras: String,
}

impl<'a> MessageState<'a> {
    pub fn of(message: &'a Message) -> Self {
        Self {
            message,
            data: (!message.data.is_null()).then(|| to_json_text(&message.data)),
            extras: to_json_text(&message.extras),
        }
    }
}

fixed_statement!(SaveMessageState<'a, MessageState<'a>>, |s, out| {
    let m = s.message;
    out.push_sql("UPDATE messages SET name = ");
    out.push_bind_param::<Text, _>(&m.name)?;
    out.push_sql(", data = ");
    out.push_bind_param::<Nullable<Text>, _>(&s.data)?;
    out.push_sql(", extras = ");
    out.push_bind_param::<Text, _>(&s.extras)?;
    out.push_sql(", deleted = ");
    out.push_bind_param::<Bool, _>(&m.deleted)?;
    out.push_sql(", version_serial = ");
    out.push_bind_param::<Text, _>(&m.version_serial)?;
    out.push_sql(", updated_at = ");
    out.push_bind_param::<Text, _>(&m.updated_at)?;
    out.push_sql(", last_action = ");
    out.push_bind_param::<Text, _>(m.last_action)?;
    out.push_sql(", append_count = ");
    out.push_bind_param::<BigInt, _>(&m.append_count)?;
    out.push_sql(", stream_status = ");
    out.push_bind_param::<Text, _>(m.stream_status.as_str())?;
    out.push_sql(", last_append_at = ");
    out.push_bind_param::<Nullable<Text>, _>(&m.last_append_at)?;
    out.push_sql(", text_seq = NULL WHERE channel_id = ");
    out.push_bind_param::<Text, _>(&m.channel_id)?;
    out.push_sql(" AND message_serial = ");
    out.push_bind_param::<Text, _>(&m.message_serial)?;
});

/// The columns an append sets, encoded for the append statements ([`SaveAppendedText`] …).
pub struct AppendedState<'a> {
    delta: &'a super::message_state::AppendDelta,
    /// The fragments as the inside of a JSON string (escaped, without quotes): appended to
    /// the stored JSON text before its closing quote, it gives the encoding of the whole text.
    escaped: String,
    extras: Option<String>,
}

impl<'a> AppendedState<'a> {
    pub fn of(delta: &'a super::message_state::AppendDelta) -> Self {
        let quoted = to_json_text(&delta.fragment);
        let escaped = quoted
            .strip_prefix('"')
            .and_then(|s| s.strip_suffix('"'))
            .unwrap_or_default()
            .to_string();
        Self {
            delta,
            escaped,
            extras: delta.extras.as_ref().map(to_json_text),
        }
    }
}

/// The stored JSON text of `data` without its closing quote, in each engine's SQL.
trait DataButLast {
    const SQL: &'static str;
}

// SQLite's `length` and `substr` count characters, scanning the whole text; as a BLOB both
// count bytes (the text is UTF-8 and its last byte is the quote).
impl DataButLast for Sqlite {
    const SQL: &'static str =
        "CAST(substr(CAST(data AS BLOB), 1, length(CAST(data AS BLOB)) - 1) AS TEXT)";
}

impl DataButLast for Pg {
    const SQL: &'static str = "substr(data, 1, length(data) - 1)";
}

fn data_but_last<DB: diesel::backend::Backend + DataButLast>(
    _: &AstPass<'_, '_, DB>,
) -> &'static str {
    DB::SQL
}

/// An append's `UPDATE`: the batch's fragments go onto the end of the stored text, which must
/// be current (`text_seq IS NULL`); only its end changes, the rest of the row is not
/// re-encoded. With `status` it sets the stream's status; without, it matches only a row
/// whose status is the append's, and so leaves the partial index on open streams alone.
macro_rules! push_append {
    ($out:ident, $s:ident, status: $status:literal) => {{
        let d = $s.delta;
        $out.push_sql("UPDATE messages SET data = CASE WHEN data IS NULL THEN '\"' || ");
        $out.push_bind_param::<Text, _>(&$s.escaped)?;
        $out.push_sql(" || '\"' ELSE ");
        $out.push_sql(data_but_last(&$out));
        $out.push_sql(" || ");
        $out.push_bind_param::<Text, _>(&$s.escaped)?;
        $out.push_sql(" || '\"' END, extras = COALESCE(");
        $out.push_bind_param::<Nullable<Text>, _>(&$s.extras)?;
        $out.push_sql(", extras), version_serial = ");
        $out.push_bind_param::<Text, _>(&d.version_serial)?;
        $out.push_sql(", updated_at = ");
        $out.push_bind_param::<Text, _>(&d.updated_at)?;
        $out.push_sql(", last_action = 'append', append_count = ");
        $out.push_bind_param::<BigInt, _>(&d.append_count)?;
        $out.push_sql(", last_append_at = ");
        $out.push_bind_param::<Text, _>(&d.updated_at)?;
        if $status {
            $out.push_sql(", stream_status = ");
            $out.push_bind_param::<Text, _>(d.stream_status.as_str())?;
        }
        $out.push_sql(" WHERE channel_id = ");
        $out.push_bind_param::<Text, _>(&d.channel_id)?;
        $out.push_sql(" AND message_serial = ");
        $out.push_bind_param::<Text, _>(&d.message_serial)?;
        if !$status {
            $out.push_sql(" AND stream_status = ");
            $out.push_bind_param::<Text, _>(d.stream_status.as_str())?;
        }
        $out.push_sql(" AND text_seq IS NULL");
    }};
}

fixed_statement!(SaveAppendedText<'a, AppendedState<'a>>, |s, out| {
    push_append!(out, s, status: false);
});

fixed_statement!(SaveAppendedState<'a, AppendedState<'a>>, |s, out| {
    push_append!(out, s, status: true);
});

// `(channel id, message serial)`: a long stream's first append after a whole write marks the
// row as written through its version; later ones match no row and leave it alone.
fixed_statement!(MarkStateBehind<'a, (&'a str, &'a str)>, |v, out| {
    out.push_sql(
        "UPDATE messages SET text_seq = CAST(substr(version_serial, 2) AS BIGINT) \
         WHERE channel_id = ",
    );
    out.push_bind_param::<Text, _>(&v.0)?;
    out.push_sql(" AND message_serial = ");
    out.push_bind_param::<Text, _>(&v.1)?;
    out.push_sql(" AND text_seq IS NULL");
});

// `(channel id, last seq)`: the writer marks each channel of a batch.
fixed_statement!(SetChannelLastSeq<'a, (&'a str, i64)>, |v, out| {
    out.push_sql("UPDATE channels SET last_seq = ");
    out.push_bind_param::<BigInt, _>(&v.1)?;
    out.push_sql(" WHERE id = ");
    out.push_bind_param::<Text, _>(&v.0)?;
});

// `(workspace id, last cursor)`: the writer marks each workspace of a batch.
fixed_statement!(SetWorkspaceLastCursor<'a, (&'a str, i64)>, |v, out| {
    out.push_sql("UPDATE workspaces SET last_cursor = ");
    out.push_bind_param::<BigInt, _>(&v.1)?;
    out.push_sql(" WHERE id = ");
    out.push_bind_param::<Text, _>(&v.0)?;
});
