//! Gap repair: in a cluster the broker is only a notification pipe and may lose events (Redis
//! restarted, a network blip). Cursors are dense per workspace, so a WorkspaceActor that sees
//! a cursor above the one it expects reads the missing range back from the database and
//! delivers it first. Blocking: run it off the actor thread.

use std::sync::Arc;

use serde_json::Value;

use crate::domain::event::Event;
use crate::store::cluster_queries::{events_between, parse_recipients};
use crate::store::rows::{json_or, EventRow};
use crate::store::{queries, DbPool};

/// Rows read per query.
pub const PAGE: i64 = 500;
/// Past this many missing events the sockets resync instead: the actor must not stall.
pub const MAX_MISSING: i64 = 10_000;

#[derive(Debug)]
pub enum Repair {
    /// The events of the range that still exist, oldest first; the range ends at `through`.
    Events {
        events: Vec<Arc<Event>>,
        through: i64,
    },
    /// Too many are missing: the sockets must resync from their cursors.
    TooFar { through: i64 },
}

/// Reads `(after, upto]`; `upto = None` reads up to the last committed cursor (a catch-up).
pub fn read(
    pool: &DbPool,
    workspace_id: &str,
    after: i64,
    upto: Option<i64>,
) -> Result<Repair, String> {
    let mut conn = pool.get().map_err(|e| e.to_string())?;
    let through = match upto {
        Some(u) => u,
        None => {
            queries::workspace_cursor_state(&mut conn, workspace_id)
                .map_err(|e| e.to_string())?
                .0
        }
    };
    if through <= after {
        return Ok(Repair::Events {
            events: Vec::new(),
            through: after,
        });
    }
    if through - after > MAX_MISSING {
        return Ok(Repair::TooFar { through });
    }
    let mut events = Vec::new();
    let mut from = after;
    while from < through {
        let rows = events_between(&mut conn, workspace_id, from, through, PAGE)
            .map_err(|e| e.to_string())?;
        // Fewer rows than cursors: the rest were pruned; nothing more to deliver.
        let Some(last) = rows.last().map(|(r, _)| r.cursor) else {
            break;
        };
        from = last;
        events.extend(rows.into_iter().map(|(row, name)| rebuild(row, name)));
    }
    Ok(Repair::Events { events, through })
}

/// A stored event as live fan-out needs it: payload parsed (membership tracking and the
/// Pusher face read it), recipients, and the channel's name for the Pusher face.
pub fn rebuild(row: EventRow, channel_name: Option<String>) -> Arc<Event> {
    let recipients = parse_recipients(&row);
    let payload = json_or(&row.payload, Value::Null);
    let mut ev = Event::build_unshared(
        row.id,
        Some(row.cursor),
        row.event_type,
        row.workspace_id,
        row.channel_id,
        row.seq,
        row.created_at,
        payload,
        recipients,
    );
    ev.live.channel_name = channel_name.map(Arc::from);
    Arc::new(ev)
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use actix::prelude::*;

    use super::*;
    use crate::registry::Registry;
    use crate::store::rows::{recipients_text, WorkspaceRow};
    use crate::workspace::{CatchUp, Deliver, Outbound, Register, WorkspaceActor};

    /// A session that records the cursors it receives.
    struct Collect(Arc<Mutex<Vec<i64>>>);

    impl Actor for Collect {
        type Context = Context<Self>;
    }

    impl Handler<Outbound> for Collect {
        type Result = ();
        fn handle(&mut self, msg: Outbound, _: &mut Self::Context) {
            if let (Outbound::Event(e), Ok(mut v)) = (msg, self.0.lock()) {
                v.extend(e.cursor);
            }
        }
    }

    fn row(cursor: i64, private_to: Option<&[String]>) -> EventRow {
        EventRow {
            workspace_id: "1".into(),
            cursor,
            id: format!("evt_{cursor}"),
            event_type: "member.updated".into(),
            channel_id: None,
            seq: None,
            payload: format!("{{\"n\":{cursor}}}"),
            is_private: private_to.is_some(),
            created_at: "t".into(),
            recipients: private_to.map(recipients_text),
        }
    }

    /// A database holding events 1..=n of workspace 1 (event 2 private to someone else).
    fn setup(n: i64) -> (tempfile::TempDir, DbPool) {
        let (dir, pool) = crate::store::test_pool(4);
        fill(&pool, n);
        (dir, pool)
    }

    fn fill(pool: &DbPool, n: i64) {
        let mut conn = pool.get().expect("conn");
        queries::insert_workspace(&mut conn, &WorkspaceRow::for_tests("1")).expect("ws");
        let other = ["carol".to_string()];
        for c in 1..=n {
            let private = (c == 2).then_some(&other[..]);
            queries::insert_event(&mut conn, &row(c, private)).expect("event");
        }
        queries::set_workspace_last_cursor(&mut conn, "1", n).expect("last");
    }

    fn live(cursor: i64) -> Arc<Event> {
        rebuild(row(cursor, None), None)
    }

    async fn start(pool: &DbPool) -> (Addr<WorkspaceActor>, Arc<Mutex<Vec<i64>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let ws = WorkspaceActor::new("1".into(), 0, Registry::new(pool.clone())).start();
        let session = Collect(seen.clone()).start();
        ws.send(Register {
            session_id: 1,
            recipient: session.recipient(),
            entity_id: "alice".into(),
            is_guest: false,
            guest_channels: Default::default(),
        })
        .await
        .expect("register");
        (ws, seen)
    }

    async fn wait_for(seen: &Mutex<Vec<i64>>, n: usize) -> Vec<i64> {
        for _ in 0..200 {
            let v = seen.lock().expect("lock").clone();
            if v.len() >= n {
                tokio::time::sleep(Duration::from_millis(50)).await;
                return seen.lock().expect("lock").clone();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        seen.lock().expect("lock").clone()
    }

    #[actix::test]
    async fn a_gap_is_read_back_and_delivered_first_in_order() {
        let (_dir, pool) = setup(6);
        let (ws, seen) = start(&pool).await;
        // 1 arrives, 2..=4 are lost, then 5 and 6; then a repeat of 3.
        ws.do_send(Deliver(vec![live(1)]));
        ws.do_send(Deliver(vec![live(5), live(6)]));
        ws.do_send(Deliver(vec![live(3)]));
        // 2 is private to carol: read back, but not delivered to alice.
        assert_eq!(wait_for(&seen, 5).await, vec![1, 3, 4, 5, 6]);
    }

    #[actix::test]
    async fn catch_up_reads_to_the_last_commit() {
        let (_dir, pool) = setup(4);
        let (ws, seen) = start(&pool).await;
        ws.do_send(CatchUp);
        assert_eq!(wait_for(&seen, 3).await, vec![1, 3, 4]);
        ws.do_send(CatchUp);
        ws.do_send(Deliver(vec![live(4)]));
        assert_eq!(wait_for(&seen, 4).await, vec![1, 3, 4], "nothing twice");
    }

    #[test]
    fn a_repair_is_bounded() {
        let (_dir, pool) = setup(3);
        match read(&pool, "1", 0, Some(MAX_MISSING + 1)) {
            Ok(Repair::TooFar { through }) => assert_eq!(through, MAX_MISSING + 1),
            other => panic!("{other:?}"),
        }
        match read(&pool, "1", 0, None) {
            Ok(Repair::Events { events, through }) => {
                assert_eq!(through, 3);
                assert_eq!(events.len(), 3);
                assert_eq!(
                    events[1].recipients.as_deref(),
                    Some(&["carol".to_string()][..])
                );
                assert_eq!(events[2].payload["n"], 3);
            }
            other => panic!("{other:?}"),
        }
    }

    #[actix::test]
    async fn a_gap_is_repaired_from_postgres_too() {
        let db = crate::store::pg_test::TestDb::create();
        let pool = db.pool(4);
        fill(&pool, 6);
        let (ws, seen) = start(&pool).await;
        ws.do_send(Deliver(vec![live(1)]));
        ws.do_send(Deliver(vec![live(5), live(6)]));
        assert_eq!(wait_for(&seen, 5).await, vec![1, 3, 4, 5, 6]);
        match read(&pool, "1", 0, None) {
            Ok(Repair::Events { events, through }) => {
                assert_eq!(through, 6);
                assert_eq!(events.len(), 6);
            }
            other => panic!("{other:?}"),
        }
    }
}
