//! Queries of cluster mode: a node reads back the committed events it missed (its broker lost
//! their notifications) so that its sockets see no gap.

use diesel::prelude::*;

use super::rows::EventRow;
use super::schema::{channels, events};
use super::Conn;

/// Events of a workspace with `after < cursor <= upto`, oldest first, at most `limit`, each
/// with the name of its channel (the Pusher face routes by name).
pub fn events_between(
    conn: &mut Conn,
    workspace_id: &str,
    after: i64,
    upto: i64,
    limit: i64,
) -> QueryResult<Vec<(EventRow, Option<String>)>> {
    events::table
        .left_join(channels::table.on(events::channel_id.eq(channels::id.nullable())))
        .filter(events::workspace_id.eq(workspace_id))
        .filter(events::cursor.gt(after))
        .filter(events::cursor.le(upto))
        .order(events::cursor.asc())
        .limit(limit)
        .select((EventRow::as_select(), channels::name.nullable()))
        .load(conn)
}

/// The stored recipients text (`,a,b,`) as a list; `None` for public events.
pub fn parse_recipients(row: &EventRow) -> Option<Vec<String>> {
    if !row.is_private {
        return None;
    }
    Some(
        row.recipients
            .as_deref()
            .unwrap_or("")
            .split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::queries;
    use crate::store::rows::recipients_text;

    fn event(cursor: i64, channel: Option<&str>, recipients: Option<&[String]>) -> EventRow {
        EventRow {
            workspace_id: "1".into(),
            cursor,
            id: format!("evt_{cursor}"),
            event_type: "message.created".into(),
            channel_id: channel.map(str::to_string),
            seq: Some(cursor),
            payload: "{}".into(),
            is_private: recipients.is_some(),
            created_at: "t".into(),
            recipients: recipients.map(recipients_text),
        }
    }

    #[test]
    fn reads_a_range_with_channel_names_and_recipients() {
        let mut conn = crate::store::test_conn();
        let channel = crate::store::seed_direct_channel(&mut conn);
        let pair = ["alice".to_string(), "bob".to_string()];
        for c in 1..=5 {
            let row = if c % 2 == 0 {
                event(c, None, None)
            } else {
                event(c, Some("c1"), Some(&pair))
            };
            queries::insert_event(&mut conn, &row).expect("insert event");
        }
        let rows = events_between(&mut conn, "1", 1, 4, 500).expect("range");
        let cursors: Vec<i64> = rows.iter().map(|(r, _)| r.cursor).collect();
        assert_eq!(cursors, vec![2, 3, 4]);
        assert_eq!(rows[1].1.as_deref(), Some(channel.name.as_str()));
        assert_eq!(rows[0].1, None);
        assert_eq!(parse_recipients(&rows[1].0), Some(pair.to_vec()));
        assert_eq!(parse_recipients(&rows[0].0), None);
        assert_eq!(
            events_between(&mut conn, "1", 0, 5, 2).expect("page").len(),
            2
        );
    }
}
