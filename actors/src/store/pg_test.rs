//! Throwaway PostgreSQL databases for unit tests. `SWITCHBOARD_TEST_POSTGRES` names a
//! database made for the test run (`make test` creates it); each test gets its own database
//! `<that name>_<random>` on the same server, dropped when the guard goes.

use diesel::connection::SimpleConnection;
use diesel::pg::PgConnection;
use diesel::Connection;

use super::{DatabaseUrl, DbPool};

pub const ENV: &str = "SWITCHBOARD_TEST_POSTGRES";

/// The run's PostgreSQL URL; a test that needs it fails (never skips) without it.
pub fn base_url() -> String {
    match std::env::var(ENV) {
        Ok(u) if !u.trim().is_empty() => u.trim().to_string(),
        _ => panic!(
            "this test needs PostgreSQL: set {ENV} to a throwaway database URL \
             (set SWITCHBOARD_TEST_POSTGRES (make test does))"
        ),
    }
}

/// A database of its own for one test; dropped (connections and all) on drop.
pub struct TestDb {
    admin_url: String,
    pub name: String,
    pub url: String,
}

/// Splits `postgres://…/db?params` into (`postgres://…/`, `db`, `?params`).
fn split(url: &str) -> (String, String, String) {
    let (base, params) = match url.split_once('?') {
        Some((b, p)) => (b.to_string(), format!("?{p}")),
        None => (url.to_string(), String::new()),
    };
    let cut = base.rfind('/').expect("postgres URL with a database");
    let (head, db) = base.split_at(cut + 1);
    (head.to_string(), db.to_string(), params)
}

impl TestDb {
    pub fn create() -> Self {
        let base = base_url();
        let (head, db, params) = split(&base);
        let name = format!("{db}_{:016x}", rand::random::<u64>());
        let mut admin = PgConnection::establish(&base)
            .unwrap_or_else(|e| panic!("cannot connect to {ENV}: {e}"));
        admin
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .expect("create test database");
        Self {
            admin_url: base,
            url: format!("{head}{name}{params}"),
            name,
        }
    }

    pub fn database_url(&self) -> DatabaseUrl {
        DatabaseUrl::parse(&self.url).expect("postgres url")
    }

    /// A migrated pool on this database.
    pub fn pool(&self, size: u32) -> DbPool {
        super::open(&self.database_url(), size).expect("open postgres")
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Ok(mut admin) = PgConnection::establish(&self.admin_url) {
            let _ = admin.batch_execute(&format!(
                "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
                self.name
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::TestDb;
    use crate::store::rows::{recipients_text, EventRow, VersionRow};
    use crate::store::{cluster_queries, queries, Conn};

    fn event(conn: &mut Conn, created_at: &str, recipients: Option<&[String]>) -> i64 {
        let cursor = queries::allocate_cursors(conn, "1", 1).expect("cursor");
        let row = EventRow {
            workspace_id: "1".into(),
            cursor,
            id: format!("evt_{cursor}"),
            event_type: "message.created".into(),
            channel_id: Some("c1".into()),
            seq: Some(cursor),
            payload: "{}".into(),
            is_private: recipients.is_some(),
            created_at: created_at.into(),
            recipients: recipients.map(recipients_text),
        };
        queries::insert_events(conn, &[&row]).expect("insert event");
        cursor
    }

    fn setup(db: &TestDb) -> crate::store::PooledConn {
        let pool = db.pool(2);
        let mut conn = pool.get().expect("conn");
        assert!(conn.is_postgres());
        crate::store::seed_direct_channel(&mut conn);
        conn
    }

    #[test]
    fn postgres_multi_row_inserts_keep_every_row() {
        let db = TestDb::create();
        let mut conn = setup(&db);
        queries::tests::multi_row_inserts_keep_every_row(&mut conn);
    }

    #[test]
    fn postgres_deferred_appends_are_read_from_their_versions() {
        let db = TestDb::create();
        let mut conn = setup(&db);
        queries::tests::deferred_appends_are_read_from_their_versions_until_a_whole_save(&mut conn);
    }

    #[test]
    fn postgres_schema_migrates_and_the_queries_run() {
        let db = TestDb::create();
        let mut conn = setup(&db);
        let conn = &mut *conn;
        // Migrating again is a no-op.
        crate::store::migrate(conn).expect("migrate twice");
        // Cursors, private replay (strpos), ranges with channel names.
        assert_eq!(queries::allocate_cursors(conn, "1", 3).expect("a"), 1);
        queries::set_workspace_last_cursor(conn, "1", 0).expect("reset");
        let alice = vec!["alice".to_string()];
        event(conn, "2026-01-01T00:00:00.000Z", None);
        event(conn, "2026-01-02T00:00:00.000Z", Some(&alice));
        event(conn, "2026-01-03T00:00:00.000Z", Some(&[]));
        let seen = |conn: &mut Conn, who: &str| {
            queries::events_after_for(conn, "1", who, 0, 10, 10)
                .expect("replay")
                .len()
        };
        assert_eq!(seen(conn, "alice"), 2);
        assert_eq!(seen(conn, "bob"), 1);
        assert_eq!(seen(conn, "ali"), 1);
        let range = cluster_queries::events_between(conn, "1", 0, 3, 10).expect("range");
        assert_eq!(range.len(), 3);
        assert!(range.iter().all(|(_, name)| name.is_some()));
        assert!(queries::event_exists(conn, "1", 2).expect("exists"));
        // Prune in its write transaction.
        assert_eq!(
            queries::prune_events(conn, "1", Some("2027-01-01T00:00:00.000Z"), 1).expect("p"),
            2
        );
        assert_eq!(
            queries::workspace_cursor_state(conn, "1").expect("state"),
            (3, 2)
        );
        // Inserts that ignore duplicates (ON CONFLICT DO NOTHING).
        assert_eq!(
            queries::add_member(conn, "c1", "carol", "t").expect("add"),
            1
        );
        assert_eq!(
            queries::add_member(conn, "c1", "carol", "t").expect("again"),
            0
        );
        assert_eq!(
            queries::insert_join_request(conn, "c1", "dan", "t").expect("jr"),
            1
        );
        assert_eq!(
            queries::insert_join_request(conn, "c1", "dan", "t").expect("jr"),
            0
        );
        // Messages, versions, reactions, unread counts (raw SQL with $n placeholders).
        let mut m = crate::domain::message::NewMessage {
            data: Some(serde_json::json!("hello")),
            ..Default::default()
        }
        .into_message("c1", "alice", 1, "2020-01-01T00:00:00.000Z");
        queries::insert_message(conn, &m, "1").expect("message");
        let version = |seq: i64, action: &str, created: &str| VersionRow {
            channel_id: "c1".into(),
            seq,
            message_serial: m.message_serial.clone(),
            action: action.into(),
            actor: Some("alice".into()),
            op_id: Some(format!("op{seq}")),
            body: serde_json::json!({"data": "hello"}).to_string(),
            created_at: created.into(),
            fingerprint: Some("f".into()),
        };
        queries::insert_version(conn, &version(1, "create", "2020-01-01T00:00:00.000Z"))
            .expect("v1");
        let v2 = version(2, "update", "2020-01-02T00:00:00.000Z");
        queries::insert_versions(conn, &[&v2]).expect("v2");
        m.data = serde_json::json!("bye");
        queries::save_message_state(conn, &m).expect("state");
        let stored = queries::message(conn, "c1", &m.message_serial)
            .expect("read")
            .expect("message");
        assert_eq!(stored.data, serde_json::json!("bye"));
        assert!(
            queries::version_by_op(conn, "c1", &m.message_serial, "update", "op2")
                .expect("op")
                .is_some()
        );
        assert_eq!(
            queries::add_reaction(conn, "c1", &m.message_serial, "bob", "👍", "t").expect("r"),
            1
        );
        assert_eq!(
            queries::add_reaction(conn, "c1", &m.message_serial, "bob", "👍", "t").expect("r"),
            0
        );
        assert_eq!(
            queries::reaction_counts(conn, "c1", &m.message_serial).expect("counts")["👍"],
            1
        );
        let reads = queries::channels_with_reads(conn, &["c1".to_string()], "bob").expect("reads");
        assert_eq!(reads.len(), 1);
        assert_eq!(reads[0].2, 1, "one unread message for bob");
        // Retention purges the old version but never the newest one.
        assert_eq!(
            queries::purge_versions(conn, "1", "2030-01-01T00:00:00.000Z", 10).expect("purge"),
            1
        );
        assert_eq!(
            queries::versions_of(conn, "c1", &m.message_serial)
                .expect("v")
                .len(),
            1
        );
        // Entity search ignores ASCII case, as SQLite's LIKE does.
        let mut e =
            crate::domain::entity::test_entity("Zed_1", crate::domain::entity::Role::Member);
        e.workspace_id = "1".into();
        queries::insert_entity(conn, &e).expect("entity");
        let found = queries::list_entities(conn, "1", Some("zed_"), None, 10).expect("list");
        assert_eq!(found.len(), 1);
        assert!(queries::list_entities(conn, "1", Some("zed%"), None, 10)
            .expect("list")
            .is_empty());
    }
}
